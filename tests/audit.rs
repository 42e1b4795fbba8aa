//! The audit log through the real binary: every request has its entry, nothing is lost on
//! SIGTERM, the chain catches tampering, a failing sink behaves as documented.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use support::*;

const KEY: &str = "audit-agent-key-0123456789";

fn policy() -> String {
    format!(
        r#"
[[tenant]]
id = "acme"
[[agent]]
id = "bot"
tenant = "acme"
user = "alice@acme.example"
key_sha256 = "{}"
allow = ["m/echo", "m/status"]
redact = ["token", "*password*"]
"#,
        sha256_hex(KEY)
    )
}

fn start(dir: &Path, extra: &[(&str, &str)]) -> (MockServer, Running) {
    let up = MockServer::start(MockConfig {
        sessions: false,
        record: false,
        ..MockConfig::default()
    });
    let (mut g, _) = Gateway::open()
        .upstream("m", &up)
        .env("SCOPEGATE_AUDIT_DIR", dir.to_str().unwrap())
        .env("SCOPEGATE_AUDIT_FLUSH_MS", "50")
        .env("SCOPEGATE_THREADS", "2")
        .policy(&policy());
    for (k, v) in extra {
        g = g.env(k, v);
    }
    (up, g.start())
}

fn post(c: &mut Client, id: u64, tool: &str, args: &str) -> Response {
    c.post("/mcp", &call(id, tool, args))
        .header("Authorization", &format!("Bearer {KEY}"))
        .send()
}

/// Every line of every audit file of `dir`, parsed.
fn entries(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn verify(dir: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scopegate"))
        .args(["audit", "verify", dir.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Per worker, seq runs 1, 2, 3, ... in file order.
fn assert_no_gaps(all: &[serde_json::Value]) {
    let mut last: std::collections::HashMap<u64, u64> = Default::default();
    for e in all {
        let w = e["worker"].as_u64().unwrap();
        let seq = e["seq"].as_u64().unwrap();
        let prev = last.insert(w, seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "worker {w}: seq {seq} after {prev}");
    }
}

#[test]
fn n_requests_under_load_give_exactly_n_entries() {
    let dir = temp_dir("audit-load");
    let (_up, mut gw) = start(&dir, &[]);
    let addr = gw.addr;
    let threads = 8;
    let per_thread = 150;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                for i in 0..per_thread {
                    let id = t * 10_000 + i;
                    let r = post(&mut c, id, "echo", r#"{"token":"s3cret","n":1}"#);
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    gw.signal(libc::SIGTERM);
    assert_eq!(
        gw.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        gw.log()
    );
    let all = entries(&dir);
    assert_eq!(all.len() as u64, threads * per_thread);
    assert_no_gaps(&all);
    let mut ids: Vec<u64> = all.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len() as u64,
        threads * per_thread,
        "one entry per request"
    );
    let e = &all[0];
    assert_eq!(e["agent"], "bot");
    assert_eq!(e["tenant"], "acme");
    assert_eq!(e["user"], "alice@acme.example");
    assert_eq!(e["upstream"], "m");
    assert_eq!(e["method"], "tools/call");
    assert_eq!(e["name"], "echo");
    assert_eq!(e["decision"], "allowed");
    assert_eq!(e["status"], 200);
    assert_eq!(e["is_error"], false);
    assert_eq!(e["args"]["token"], "[redacted]");
    assert!(e["upstream_us"].as_u64().unwrap() <= e["total_us"].as_u64().unwrap());
    assert!(e["bytes_in"].as_u64().unwrap() > 100);
    assert!(e["bytes_out"].as_u64().unwrap() > 100);
    assert!(e["ts"].as_str().unwrap().ends_with('Z'));
    for file in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(file.path()).unwrap();
        assert!(!text.contains("s3cret"), "a redacted value reached the log");
        assert!(!text.contains(KEY), "the agent's key reached the log");
    }
    let (ok, out) = verify(&dir);
    assert!(ok, "{out}");
}

#[test]
fn refusals_have_entries_with_their_decision() {
    let dir = temp_dir("audit-decisions");
    let (_up, mut gw) = start(&dir, &[]);
    let mut c = gw.client();
    post(&mut c, 1, "echo", "{}");
    post(&mut c, 2, "delete_all", "{}");
    c.post("/mcp", &call(3, "echo", "{}")).send(); // no key
    c.post("/mcp", "{broken")
        .header("Authorization", &format!("Bearer {KEY}"))
        .send();
    post(
        &mut c,
        5,
        "status",
        r#"{"code":200,"body":"{\"jsonrpc\":\"2.0\",\"id\":5,\"result\":{\"content\":[],\"isError\":true}}"}"#,
    );
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
    // Two connections, perhaps on two workers: their entries come in no fixed order.
    let all = entries(&dir);
    let mut decisions: Vec<(&str, u64)> = all
        .iter()
        .map(|e| {
            (
                e["decision"].as_str().unwrap(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    decisions.sort();
    assert_eq!(
        decisions,
        [
            ("allowed", 200),
            ("allowed", 200),
            ("denied", 200),
            ("denied", 401),
            ("invalid", 400),
        ]
    );
    let by_id = |id: u64| all.iter().find(|e| e["id"] == id).unwrap();
    assert_eq!(by_id(2)["reason"], "allow (no match)");
    assert_eq!(by_id(2)["name"], "delete_all");
    assert_eq!(by_id(5)["is_error"], true);
}

#[test]
fn sigterm_in_the_middle_of_load_loses_nothing() {
    let dir = temp_dir("audit-sigterm");
    let (_up, mut gw) = start(&dir, &[("SCOPEGATE_AUDIT_FLUSH_MS", "1000")]);
    let addr = gw.addr;
    let answered = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..6)
        .map(|t| {
            let answered = answered.clone();
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                let Ok(stream) = std::net::TcpStream::connect(addr) else {
                    return ids;
                };
                drop(stream);
                let mut c = Client::connect(addr);
                for i in 0..100_000u64 {
                    let id = t * 1_000_000 + i;
                    let body = call(id, "echo", "{}");
                    let req = format!(
                        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    use std::io::Write;
                    if c.stream.write_all(req.as_bytes()).is_err() {
                        break;
                    }
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.read_response())) {
                        Ok(r) => {
                            ids.push(id);
                            answered.fetch_add(1, Ordering::Relaxed);
                            if r.header("connection") == Some("close") {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                ids
            })
        })
        .collect();
    // Let the load run, then stop scopegate under it (the flush interval is long, so entries
    // are sitting in the rings).
    assert!(eventually(Duration::from_secs(10), || answered
        .load(Ordering::Relaxed)
        > 500));
    gw.signal(libc::SIGTERM);
    let mut answered_ids: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(
        gw.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        gw.log()
    );
    let all = entries(&dir);
    assert_no_gaps(&all);
    let mut logged: Vec<u64> = all.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    logged.sort_unstable();
    answered_ids.sort_unstable();
    // Every request an agent got an answer to is in the log; nothing else is.
    assert_eq!(logged, answered_ids);
    let (ok, out) = verify(&dir);
    assert!(ok, "{out}");
}

/// Copies `src` into a fresh directory and applies `edit` to its file's lines.
fn tampered(src: &Path, edit: impl FnOnce(&mut Vec<String>)) -> PathBuf {
    let dir = temp_dir("audit-tamper");
    for f in std::fs::read_dir(src).unwrap().flatten() {
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let file = dir.join("audit-w0.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    edit(&mut lines);
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    dir
}

#[test]
fn verify_names_edited_deleted_and_swapped_lines() {
    let dir = temp_dir("audit-verify");
    let (_up, mut gw) = start(&dir, &[("SCOPEGATE_THREADS", "1")]);
    let mut c = gw.client();
    for i in 0..10 {
        post(&mut c, i, "echo", "{}");
    }
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(verify(&dir).0);

    let edited = tampered(&dir, |l| l[3] = l[3].replace("\"allowed\"", "\"denied\""));
    let (ok, out) = verify(&edited);
    assert!(!ok);
    assert!(out.contains("audit-w0.jsonl:4 was changed"), "{out}");

    let deleted = tampered(&dir, |l| {
        l.remove(5);
    });
    let (ok, out) = verify(&deleted);
    assert!(!ok);
    assert!(out.contains("1 line(s) were removed"), "{out}");
    assert!(out.contains("audit-w0.jsonl:6"), "{out}");

    let swapped = tampered(&dir, |l| l.swap(2, 3));
    let (ok, out) = verify(&swapped);
    assert!(!ok);
    assert!(out.contains("audit-w0.jsonl:3"), "{out}");

    let truncated = tampered(&dir, |l| {
        l.pop();
    });
    let (ok, out) = verify(&truncated);
    assert!(!ok);
    assert!(out.contains("removed from the end"), "{out}");
}

#[test]
fn the_chain_continues_across_rotation_and_restart() {
    let dir = temp_dir("audit-rotate");
    let big = format!(r#"{{"blob":"{}"}}"#, "r".repeat(3000));
    for round in 0..2 {
        let (_up, mut gw) = start(
            &dir,
            &[
                ("SCOPEGATE_THREADS", "1"),
                ("SCOPEGATE_AUDIT_MAX_FILE_MB", "1"),
                ("SCOPEGATE_AUDIT_MAX_ARGS", "8KiB"),
            ],
        );
        let mut c = gw.client();
        for i in 0..250 {
            assert_eq!(post(&mut c, round * 1000 + i, "echo", &big).status, 200);
        }
        gw.signal(libc::SIGTERM);
        assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
    }
    let rotated = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().starts_with("audit-w0.0"))
        .count();
    assert!(rotated >= 1, "expected rotated files");
    let all = entries(&dir);
    assert_eq!(all.len(), 500);
    assert_no_gaps(&all);
    let (ok, out) = verify(&dir);
    assert!(ok, "{out}");
}

/// The audit file is pointed at /dev/full (every write fails with ENOSPC), then restored.
fn failing_sink(fail_closed: bool) {
    let dir = temp_dir("audit-fail");
    std::os::unix::fs::symlink("/dev/full", dir.join("audit-w0.jsonl")).unwrap();
    let mut extra = vec![
        ("SCOPEGATE_THREADS", "1"),
        ("SCOPEGATE_AUDIT_FLUSH_MS", "20"),
    ];
    if fail_closed {
        extra.push(("SCOPEGATE_AUDIT_FAIL_CLOSED", "1"));
    }
    let (_up, mut gw) = start(&dir, &extra);
    let mut c = gw.client();
    assert_eq!(post(&mut c, 1, "echo", "{}").status, 200);
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .contains("audit: write to")),
        "{}",
        gw.log()
    );
    let r = post(&mut c, 2, "echo", "{}");
    if fail_closed {
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"]["code"], -32008);
    } else {
        assert_eq!(r.status, 200, "fail-open keeps serving while entries wait");
    }
    // The disk comes back: everything kept is written, in order.
    std::fs::remove_file(dir.join("audit-w0.jsonl")).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || gw.log().contains("writing to")),
        "{}",
        gw.log()
    );
    assert_eq!(post(&mut c, 3, "echo", "{}").status, 200);
    gw.signal(libc::SIGTERM);
    assert_eq!(
        gw.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        gw.log()
    );
    let all = entries(&dir);
    let ids: Vec<u64> = all.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3]);
    if fail_closed {
        assert_eq!(all[1]["status"], 503);
    }
    assert_no_gaps(&all);
    assert!(verify(&dir).0);
}

#[test]
fn a_failing_sink_keeps_entries_and_retries_fail_open() {
    failing_sink(false);
}

#[test]
fn a_failing_sink_refuses_calls_when_fail_closed() {
    failing_sink(true);
}

#[test]
fn metrics_count_requests_decisions_and_the_audit_log() {
    let dir = temp_dir("audit-metrics");
    let (_up, gw) = start(&dir, &[("SCOPEGATE_THREADS", "1")]);
    let mut c = gw.client();
    for i in 0..3 {
        post(&mut c, i, "echo", "{}");
    }
    post(&mut c, 9, "forbidden_tool", "{}");
    assert!(eventually(Duration::from_secs(5), || {
        let r = c.request("GET", "/metrics").send();
        r.text().contains("scopegate_audit_entries_written_total 4")
    }));
    let r = c.request("GET", "/metrics").send();
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.text();
    assert!(text.contains("scopegate_requests_total{method=\"tools/call\",decision=\"allowed\",upstream=\"m\"} 3\n"), "{text}");
    assert!(
        text.contains(
            "scopegate_requests_total{method=\"tools/call\",decision=\"denied\",upstream=\"m\"} 1\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("scopegate_request_duration_seconds_count 4\n"),
        "{text}"
    );
    assert!(text.contains("scopegate_open_connections 1\n"), "{text}");
    assert!(
        text.contains("scopegate_audit_write_errors_total 0\n"),
        "{text}"
    );
    // Every sample line is `name{labels} value`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

#[test]
fn a_torn_last_line_is_cut_off_and_the_chain_continues() {
    let dir = temp_dir("audit-torn");
    for round in 0..2 {
        let (_up, mut gw) = start(&dir, &[("SCOPEGATE_THREADS", "1")]);
        let mut c = gw.client();
        for i in 0..3 {
            assert_eq!(post(&mut c, round * 10 + i, "echo", "{}").status, 200);
        }
        gw.signal(libc::SIGTERM);
        assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
        if round == 0 {
            // A crash while the disk was full left half a line behind.
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(dir.join("audit-w0.jsonl"))
                .unwrap();
            f.write_all(br#"{"ts":"2026-11-24T00:00:00.000000Z","worker":0,"ht"#)
                .unwrap();
            assert!(
                !verify(&dir).0,
                "the torn line is visible before the restart"
            );
        }
    }
    let all = entries(&dir);
    assert_eq!(all.len(), 6);
    assert_no_gaps(&all);
    let (ok, out) = verify(&dir);
    assert!(ok, "{out}");
}

/// Runs one gateway in `dir`, makes `calls` allowed calls, stops it with SIGTERM.
fn run_once(dir: &Path, threads: &str, calls: u64, args: &str) {
    let (_up, mut gw) = start(dir, &[("SCOPEGATE_THREADS", threads)]);
    let mut c = gw.client();
    for i in 0..calls {
        assert_eq!(post(&mut c, i, "echo", args).status, 200);
    }
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
}

/// A copy of `src` with `change` applied to its files.
fn copy_with(src: &Path, change: impl FnOnce(&Path)) -> PathBuf {
    let dir = temp_dir("audit-copy");
    for f in std::fs::read_dir(src).unwrap().flatten() {
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    change(&dir);
    dir
}

fn cut_last_lines(file: &Path, n: usize) {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let kept = &lines[..lines.len() - n];
    std::fs::write(file, kept.join("\n") + "\n").unwrap();
}

#[test]
fn an_argument_named_seq_or_prev_does_not_confuse_verify() {
    let dir = temp_dir("audit-seq-arg");
    run_once(
        &dir,
        "1",
        5,
        r#"{"seq":999,"prev":"0000","x":{"seq":1},"s":",\"seq\":7,\"prev\":\"00\"}"}"#,
    );
    let (ok, out) = verify(&dir);
    assert!(ok, "{out}");
    let all = entries(&dir);
    assert_eq!(all.len(), 5);
    assert_no_gaps(&all);
    assert_eq!(all[0]["args"]["seq"], 999);
}

#[test]
fn a_cut_tail_a_missing_head_or_a_deleted_chain_fails_verify() {
    let dir = temp_dir("audit-missing");
    run_once(&dir, "2", 6, "{}");
    let (ok, out) = verify(&dir);
    assert!(ok, "{out}");
    // One connection: every call went to one worker; the other's chain has no entry.
    let busy = if entries(&dir).iter().all(|e| e["worker"] == 0) {
        0
    } else {
        1
    };
    let idle = 1 - busy;
    let file = |d: &Path| d.join(format!("audit-w{busy}.jsonl"));

    let cut = copy_with(&dir, |d| cut_last_lines(&file(d), 2));
    let (ok, out) = verify(&cut);
    assert!(!ok && out.contains("removed from the end"), "{out}");

    let cut_and_headless = copy_with(&dir, |d| {
        cut_last_lines(&file(d), 2);
        std::fs::remove_file(d.join(format!("audit-w{busy}.head"))).unwrap();
    });
    let (ok, out) = verify(&cut_and_headless);
    assert!(
        !ok && out.contains(&format!("audit-w{busy}.head is missing")),
        "{out}"
    );

    // The idle worker's chain is part of the log all the same, and so is the busy one's.
    for w in [idle, busy] {
        let worker_gone = copy_with(&dir, |d| {
            for f in std::fs::read_dir(d).unwrap().flatten() {
                if f.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("audit-w{w}"))
                {
                    std::fs::remove_file(f.path()).unwrap();
                }
            }
        });
        let (ok, out) = verify(&worker_gone);
        assert!(!ok && out.contains(&format!("worker {w}")), "{out}");
    }

    let no_manifest = copy_with(&dir, |d| {
        std::fs::remove_file(d.join("audit.manifest")).unwrap();
    });
    let (ok, out) = verify(&no_manifest);
    assert!(!ok && out.contains("audit.manifest is missing"), "{out}");
}

#[test]
fn a_restart_after_the_log_was_cut_or_deleted_records_it_in_the_chain() {
    // The tail cut while scopegate was stopped, then a restart: the chain says so.
    let dir = temp_dir("audit-restart-cut");
    run_once(&dir, "1", 5, "{}");
    cut_last_lines(&dir.join("audit-w0.jsonl"), 2);
    run_once(&dir, "1", 2, "{}");
    let (ok, out) = verify(&dir);
    assert!(!ok, "{out}");
    assert!(
        out.contains("tampered with") && out.contains("after seq 3 were removed"),
        "{out}"
    );
    // The entries after the restart number on past the lost ones.
    let seqs: Vec<u64> = entries(&dir)
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 6, 7, 8]);

    // A chain deleted whole (files and head), then a restart: the manifest knew it.
    let dir = temp_dir("audit-restart-gone");
    run_once(&dir, "1", 3, "{}");
    std::fs::remove_file(dir.join("audit-w0.jsonl")).unwrap();
    std::fs::remove_file(dir.join("audit-w0.head")).unwrap();
    run_once(&dir, "1", 1, "{}");
    let (ok, out) = verify(&dir);
    assert!(
        !ok && out.contains("every file of this chain was missing"),
        "{out}"
    );
}

#[test]
fn secrets_in_json_strings_and_in_any_case_are_redacted_in_the_log() {
    let dir = temp_dir("audit-redact-json");
    run_once(
        &dir,
        "1",
        1,
        r#"{"settings":"{\"user\":\"u\",\"DB_Password\":\"hunter2\"}","TOKEN":"s3cret","plain":"ok"}"#,
    );
    let text: String = std::fs::read_to_string(dir.join("audit-w0.jsonl")).unwrap();
    assert!(
        !text.contains("hunter2") && !text.contains("s3cret"),
        "{text}"
    );
    let all = entries(&dir);
    assert_eq!(all[0]["args"]["TOKEN"], "[redacted]");
    assert_eq!(all[0]["args"]["plain"], "ok");
    let settings: serde_json::Value =
        serde_json::from_str(all[0]["args"]["settings"].as_str().unwrap()).unwrap();
    assert_eq!(settings["DB_Password"], "[redacted]");
    assert_eq!(settings["user"], "u");
}
