//! The security review's classes, through the real binary: what an agent must not get past
//! (names before authentication, the operator's query, unauthorised traffic, lists in batches
//! and replays, numbers and URIs that compare wrongly) and what an upstream must not do to
//! scopegate (endless events, broken framing, streams left open by agents that went away).
//! The mock upstream's record is the ground truth for what reached an upstream.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::*;

const KEY: &str = "security-agent-key-0123456789";

fn bearer() -> String {
    format!("Bearer {KEY}")
}

/// Tenants acme and beta; the agent (acme) may use `m` and call echo and `big`, prompts
/// except `admin_*`, and resources except under `file:///etc/`.
fn policy(m_url: &str, other_url: &str) -> String {
    format!(
        r#"
[[tenant]]
id = "acme"
[[tenant]]
id = "beta"

[[upstream]]
name = "m"
url = "{m_url}"
tenant = "acme"

[[upstream]]
name = "other"
url = "{other_url}"
tenant = "beta"

[[agent]]
id = "bot"
tenant = "acme"
key_sha256 = "{}"
allow = ["m/echo", "m/big"]
deny = ["m/prompt:admin_*", "m/resource:file:///etc/*"]

[[agent.tool]]
match = "m/echo"
[agent.tool.args]
n = {{ max = 10000000000000000 }}
path = {{ prefix = "/srv/shared/" }}
"#,
        sha256_hex(KEY)
    )
}

struct Setup {
    up: MockServer,
    _other: MockServer,
    gw: Running,
}

fn setup_with(config: MockConfig, m_path: &str, env: &[(&str, &str)]) -> Setup {
    let up = MockServer::start(MockConfig {
        sessions: false,
        ..config
    });
    let other = MockServer::start(MockConfig::default());
    let m_url = format!("{}{}", up.url().trim_end_matches("/mcp"), m_path);
    let (mut g, _) = Gateway::open().policy(&policy(&m_url, &other.url()));
    for (k, v) in env {
        g = g.env(k, v);
    }
    Setup {
        up,
        _other: other,
        gw: g.start(),
    }
}

fn setup() -> Setup {
    setup_with(MockConfig::default(), "/mcp", &[])
}

fn post(s: &Setup, body: &str, headers: &[(&str, &str)]) -> Response {
    let mut c = s.gw.client();
    let mut r = c.post("/mcp/m", body).header("Authorization", &bearer());
    for (k, v) in headers {
        r = r.header(k, v);
    }
    r.send()
}

/// JSON-RPC methods of the POSTs the mock received.
fn upstream_methods(s: &Setup) -> Vec<String> {
    s.up.methods()
}

#[test]
fn names_are_not_revealed_before_authentication_and_forbidden_reads_as_unknown() {
    let s = setup();
    let mut c = s.gw.client();
    let anonymous: Vec<Response> = ["/mcp/nosuch", "/mcp/other", "/mcp/m"]
        .iter()
        .map(|p| c.post(p, INIT).send())
        .collect();
    for r in &anonymous {
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(!r.text().contains("other") && !r.text().contains("configured"));
    }
    assert_eq!(anonymous[0].body, anonymous[1].body);
    // The method is checked before the name, the same for every name.
    for p in ["/mcp/nosuch", "/mcp/other"] {
        let r = c.request("PUT", p).send();
        assert_eq!(r.status, 405, "{p}");
    }
    // Authenticated: an upstream of another tenant and one that does not exist read the same
    // (except for the name the agent itself sent).
    let forbidden = c
        .post("/mcp/other", INIT)
        .header("Authorization", &bearer())
        .send();
    let missing = c
        .post("/mcp/nosuch", INIT)
        .header("Authorization", &bearer())
        .send();
    assert_eq!(forbidden.status, 404);
    assert_eq!(missing.status, 404);
    let said = |r: &Response, name: &str| {
        let v = r.json();
        (
            v["error"]["code"].clone(),
            v["error"]["message"]
                .as_str()
                .unwrap()
                .replace(&format!("\"{name}\""), "NAME"),
        )
    };
    assert_eq!(said(&forbidden, "other"), said(&missing, "nosuch"));
    assert!(!missing.text().contains("configured"), "{}", missing.text());
    assert!(!missing.text().contains("\"m\""), "{}", missing.text());
}

/// A request refused before its body (no key, a wrong one, an unknown upstream) whose body is
/// larger than a typical request is answered at once, its body not read or waited for, and its
/// connection closed: nobody unauthenticated makes the gateway hold or wait for
/// SCOPEGATE_MAX_BODY. (A small one is read, so the connection stays usable.)
#[test]
fn an_unauthenticated_body_is_neither_read_nor_awaited() {
    let s = setup_with(
        MockConfig::default(),
        "/mcp",
        &[("SCOPEGATE_BODY_TIMEOUT_MS", "20000")],
    );
    for auth in ["", "Authorization: Bearer not-a-key-0123456789\r\n"] {
        let mut c = s.gw.client();
        // A body announced (4 MiB), none of it sent: the answer must not wait for it.
        c.send_raw(
            format!(
                "POST /mcp/m HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n\
                 Content-Length: 4000000\r\n\r\n"
            )
            .as_bytes(),
        );
        // (Waiting for the body would outlast the client's 15 s read timeout: the body
        // timeout is 20 s.)
        let r = c.read_response();
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(c.is_closed());
    }
    // An agent whose key went stale sends its large body whole: it still gets to read its 401
    // (the body is drained a buffer at a time before the close, never held).
    let mut c = s.gw.client();
    let pad = "a".repeat(4_000_000);
    c.send_raw(
        format!(
            "POST /mcp/m HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer stale-key-0123456789\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{pad}",
            pad.len()
        )
        .as_bytes(),
    );
    assert_eq!(c.read_response().status, 401);
    assert!(upstream_methods(&s).is_empty());
}

#[test]
fn the_agent_cannot_change_the_operator_s_query() {
    let s = setup_with(MockConfig::default(), "/mcp?scope=acme", &[]);
    let mut c = s.gw.client();
    let r = c
        .post("/mcp/m?scope=other&x=1", &call(1, "echo", "{}"))
        .header("Authorization", &bearer())
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.up.recorded();
    assert_eq!(seen.last().unwrap().path, "/mcp?scope=acme");
    // Without an operator query, the agent's goes along unchanged.
    let s = setup();
    let mut c = s.gw.client();
    c.post("/mcp/m?x=1&y=2", &call(1, "echo", "{}"))
        .header("Authorization", &bearer())
        .send();
    assert_eq!(s.up.recorded().last().unwrap().path, "/mcp?x=1&y=2");
}

#[test]
fn nothing_reaches_the_upstream_that_the_policy_did_not_look_at() {
    let s = setup();
    // A notification of no MCP revision: refused, not forwarded.
    let r = post(
        &s,
        r#"{"jsonrpc":"2.0","method":"notifications/exfiltrate","params":{}}"#,
        &[],
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = post(&s, r#"{"jsonrpc":"2.0","id":1,"method":"admin/exec"}"#, &[]);
    assert_eq!(r.json()["error"]["data"]["rule"], "unknown method");
    // Bodies on GET and DELETE are refused unread.
    let mut c = s.gw.client();
    for method in ["GET", "DELETE"] {
        let r = c
            .request(method, "/mcp/m")
            .header("Authorization", &bearer())
            .body(&call(9, "delete_everything", "{}").into_bytes())
            .send();
        assert_eq!(r.status, 400, "{method}: {}", r.text());
        c = s.gw.client();
    }
    // A Host that only starts like a loopback name.
    let r = c
        .post("/mcp/m", INIT)
        .header("Host", "[::1].evil.example")
        .header("Authorization", &bearer())
        .send();
    assert_eq!(r.status, 403);
    // completion/complete on a denied prompt or resource template; prompts/get without a name.
    let mut c = s.gw.client();
    for body in [
        r#"{"jsonrpc":"2.0","id":2,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"admin_reset"},"argument":{"name":"a","value":""}}}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"completion/complete","params":{"ref":{"type":"ref/resource","uri":"FILE:///etc/{name}"},"argument":{"name":"name","value":""}}}"#,
        r#"{"jsonrpc":"2.0","id":4,"method":"completion/complete","params":{"argument":{"name":"a","value":""}}}"#,
        r#"{"jsonrpc":"2.0","id":5,"method":"prompts/get","params":{}}"#,
    ] {
        let r = c
            .post("/mcp/m", body)
            .header("Authorization", &bearer())
            .send();
        assert_eq!(r.json()["error"]["code"], -32004, "{body}: {}", r.text());
    }
    // Every spelling of a denied resource, and what has no canonical form.
    for uri in [
        "FILE:///etc/secret",
        "File:///etc/./secret",
        "file:///srv/../etc/secret",
        "file://localhost/etc/secret",
        "file:/etc/secret",
        "file:////etc/secret",
        "file:///etc%2Fsecret",
        "file:///%65tc/secret",
        " file:///etc/secret",
        "file:\\\\\\\\/etc/secret",
    ] {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":6,"method":"resources/read","params":{{"uri":"{uri}"}}}}"#
        );
        let r = c
            .post("/mcp/m", &body)
            .header("Authorization", &bearer())
            .send();
        assert_eq!(r.json()["error"]["code"], -32004, "{uri}: {}", r.text());
    }
    // A number just above its bound, and paths out of their prefix.
    for args in [
        r#"{"n":10000000000000001}"#,
        r#"{"path":"/srv/shared/../../etc/passwd"}"#,
        r#"{"path":"/srv//shared/..//x"}"#,
        r#"{"path":" /srv/shared/x"}"#,
    ] {
        let r = c
            .post("/mcp/m", &call(7, "echo", args))
            .header("Authorization", &bearer())
            .send();
        assert_eq!(r.json()["error"]["code"], -32004, "{args}: {}", r.text());
    }
    assert!(
        upstream_methods(&s).is_empty(),
        "reached the upstream: {:?}",
        upstream_methods(&s)
    );
    // What is allowed still passes.
    let r = post(&s, &call(8, "echo", r#"{"n":10000000000000000}"#), &[]);
    assert_eq!(r.status, 200);
    assert!(r.json()["result"].is_object(), "{}", r.text());
    assert_eq!(upstream_methods(&s), ["tools/call"]);
}

fn listed(v: &serde_json::Value) -> Vec<String> {
    v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn lists_in_batches_and_in_replayed_streams_are_filtered() {
    let s = setup();
    // A 2025-03-26 batch holding tools/list.
    let r = post(
        &s,
        r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#,
        &[("MCP-Protocol-Version", "2025-03-26")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answers = r.json();
    let list = answers
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == 1)
        .unwrap();
    assert_eq!(listed(list), ["echo", "big"]);
    // A GET resuming a stream: the upstream replays an earlier tools/list answer.
    let mut c = s.gw.client();
    c.request("GET", "/mcp/m")
        .header("Authorization", &bearer())
        .header("Accept", "text/event-stream")
        .header("Last-Event-ID", "ev-1")
        .write();
    let (status, _) = c.read_head();
    assert_eq!(status, 200);
    let got = c.read_until("list_changed");
    assert!(got.contains("replay-1"), "{got}");
    assert!(got.contains("\"echo\""), "{got}");
    assert!(
        !got.contains("slow_events") && !got.contains("sse_raw"),
        "{got}"
    );
    // And the answer to a list over SSE, first-hand.
    let s = setup_with(
        MockConfig {
            sse: true,
            ..MockConfig::default()
        },
        "/mcp",
        &[],
    );
    let r = post(&s, r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#, &[]);
    let text = r.text();
    assert!(
        text.contains("\"echo\"") && !text.contains("slow_events"),
        "{text}"
    );
}

/// A hand-written upstream: answers every request with `script` and counts connections that
/// scopegate closed.
struct RawUpstream {
    addr: SocketAddr,
    /// Connections scopegate closed.
    closed: Arc<AtomicUsize>,
    /// Of those, GET streams.
    closed_get: Arc<AtomicUsize>,
}

fn raw_upstream(script: fn(&mut TcpStream, &str, &[u8])) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let closed_get = Arc::new(AtomicUsize::new(0));
    let counter = closed.clone();
    let get_counter = closed_get.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counter = counter.clone();
            let get_counter = get_counter.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                let mut body = vec![0u8; length];
                let _ = stream.read_exact(&mut body);
                script(&mut stream, &head, &body);
                // Wait for scopegate to close its side.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                counter.fetch_add(1, Ordering::SeqCst);
                if head.starts_with("GET") {
                    get_counter.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    RawUpstream {
        addr,
        closed,
        closed_get,
    }
}

fn raw_gateway(up: &RawUpstream, env: &[(&str, &str)]) -> Running {
    let text = format!(
        r#"
[[upstream]]
name = "h"
url = "http://{}/mcp"
[[agent]]
id = "bot"
key_sha256 = "{}"
allow = ["h/*"]
"#,
        up.addr,
        sha256_hex(KEY)
    );
    let (mut g, _) = Gateway::open().policy(&text);
    for (k, v) in env {
        g = g.env(k, v);
    }
    g.start()
}

const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";

#[test]
fn an_endless_event_is_cut_at_the_limit_and_the_agent_told() {
    let up = raw_upstream(|s, _, _| {
        let _ = s.write_all(SSE_HEAD);
        let _ = s.write_all(b"6\r\ndata: \r\n");
        let piece = vec![b'x'; 8192];
        let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
        chunk.extend_from_slice(&piece);
        chunk.extend_from_slice(b"\r\n");
        // Far more than the limit, and no event end: scopegate must stop reading.
        for _ in 0..1024 {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let gw = raw_gateway(&up, &[("SCOPEGATE_MAX_UPSTREAM_MESSAGE", "64K")]);
    let mut c = gw.client();
    let r = c
        .post("/mcp/h", &call(41, "anything", "{}"))
        .header("Authorization", &bearer())
        .send();
    // The stream had begun (its head was sent): it ends with an error for the request.
    let text = r.text();
    assert_eq!(r.status, 200, "{text}");
    assert!(
        text.contains("\"id\":41") && text.contains("SCOPEGATE_MAX_UPSTREAM_MESSAGE"),
        "{text}"
    );
    assert!(text.len() < 4096, "the oversized event was not relayed");
    // The connection is still usable.
    assert_eq!(c.request("GET", "/healthz").send().status, 200);
    assert!(eventually(Duration::from_secs(10), || up
        .closed
        .load(Ordering::SeqCst)
        >= 1));
}

#[test]
fn an_event_stream_failing_mid_way_ends_with_an_error_for_the_request() {
    let up = raw_upstream(|s, _, _| {
        let _ = s.write_all(SSE_HEAD);
        let event = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progressToken\":1,\"progress\":1}}\n\n";
        let _ = s.write_all(format!("{:x}\r\n", event.len()).as_bytes());
        let _ = s.write_all(event);
        let _ = s.write_all(b"\r\n");
        // Then silence, past SCOPEGATE_STREAM_IDLE_MS.
        std::thread::sleep(Duration::from_secs(3));
    });
    let gw = raw_gateway(&up, &[("SCOPEGATE_STREAM_IDLE_MS", "300")]);
    let mut c = gw.client();
    let r = c
        .post("/mcp/h", &call(42, "anything", "{}"))
        .header("Authorization", &bearer())
        .send();
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("notifications/progress"), "{text}");
    assert!(
        text.contains("\"id\":42") && text.contains("SCOPEGATE_STREAM_IDLE_MS"),
        "{text}"
    );
    assert_eq!(c.request("GET", "/healthz").send().status, 200);
}

#[test]
fn a_malformed_first_chunk_gets_a_502_not_a_closed_connection() {
    let together = raw_upstream(|s, _, _| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz-not-a-size\r\n",
        );
    });
    // The head first, the broken chunk in a later packet.
    let apart = raw_upstream(|s, _, _| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let _ = s.flush();
        std::thread::sleep(Duration::from_millis(200));
        let _ = s.write_all(b"zz-not-a-size\r\n");
    });
    for (up, open) in [
        (&together, true),
        (&together, false),
        (&apart, true),
        (&apart, false),
    ] {
        let gw = if open {
            Gateway::open()
                .upstream_url("h", &format!("http://{}/mcp", up.addr))
                .start()
        } else {
            raw_gateway(up, &[])
        };
        let mut c = gw.client();
        let r = c
            .post("/mcp/h", &call(43, "anything", "{}"))
            .header("Authorization", &bearer())
            .send();
        assert_eq!(r.status, 502, "open={open}: {}", r.text());
        assert_eq!(r.json()["id"], 43);
        assert_eq!(r.json()["error"]["code"], -32001, "{}", r.text());
    }
}

#[test]
fn agents_closing_quiet_streams_release_the_upstream_connections() {
    let up = raw_upstream(|s, _, _| {
        let _ = s.write_all(SSE_HEAD);
        let _ = s.write_all(b"a\r\n: opened\n\n\r\n");
        // Quiet from now on (no heartbeat to fail on): the harness waits for the close.
    });
    // On io_uring and on the epoll fallback alike.
    let uring = raw_gateway(&up, &[]);
    let epoll = raw_gateway(&up, &[("SCOPEGATE_IO_DRIVER", "epoll")]);
    for i in 0..6 {
        let gw = if i % 2 == 0 { &uring } else { &epoll };
        let mut c = gw.client();
        c.request("GET", "/mcp/h")
            .header("Authorization", &bearer())
            .header("Accept", "text/event-stream")
            .write();
        let (status, _) = c.read_head();
        assert_eq!(status, 200);
        c.read_until("opened");
        drop(c);
    }
    assert!(
        eventually(Duration::from_secs(5), || up.closed.load(Ordering::SeqCst)
            == 6),
        "upstream connections still open: {} of 6 closed",
        up.closed.load(Ordering::SeqCst)
    );
    // The agent's doing: no upstream error counted.
    let metrics = uring.client().request("GET", "/metrics").send().text();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("scopegate_upstream_errors_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// Answers initialize and notifications like an MCP server; `tools/call` and GET with
/// `hostile`.
fn mcp_or(s: &mut TcpStream, head: &str, body: &[u8], hostile: fn(&mut TcpStream)) {
    let text = String::from_utf8_lossy(body);
    if text.contains("\"initialize\"") {
        let answer = r#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"raw","version":"1"}}}"#;
        let _ = s.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: raw-1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            )
            .as_bytes(),
        );
    } else if head.starts_with("GET") || text.contains("tools/call") {
        hostile(s);
    } else {
        let _ =
            s.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
}

/// The aggregate `/mcp` over a hand-written upstream `h` and a mock `m`, initialized.
fn aggregate(up: &RawUpstream, env: &[(&str, &str)]) -> (MockServer, Running, String) {
    // No GET stream from the mock: its heartbeats would reveal a departed agent by themselves.
    let m = MockServer::start(MockConfig {
        get_stream: false,
        ..MockConfig::default()
    });
    let text = format!(
        r#"
[[upstream]]
name = "h"
url = "http://{}/mcp"
[[upstream]]
name = "m"
url = "{}"
[[agent]]
id = "bot"
key_sha256 = "{}"
allow = ["h/*", "m/echo"]
deny = ["h/hidden_*", "m/prompt:admin_*", "m/resource:file:///etc/*"]
"#,
        up.addr,
        m.url(),
        sha256_hex(KEY)
    );
    let (mut g, _) = Gateway::open().policy(&text);
    for (k, v) in env {
        g = g.env(k, v);
    }
    let gw = g.start();
    let r = gw
        .client()
        .post("/mcp", INIT)
        .header("Authorization", &bearer())
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("mcp-session-id").unwrap().to_owned();
    (m, gw, token)
}

#[test]
fn the_aggregate_endpoint_holds_the_same_rules_and_limits() {
    let up = raw_upstream(|s, head, body| {
        mcp_or(s, head, body, |s| {
            let _ = s.write_all(SSE_HEAD);
            let _ = s.write_all(b"6\r\ndata: \r\n");
            let chunk = format!("2000\r\n{}\r\n", "x".repeat(8192));
            for _ in 0..1024 {
                if s.write_all(chunk.as_bytes()).is_err() {
                    return;
                }
            }
        })
    });
    let (m, gw, token) = aggregate(&up, &[("SCOPEGATE_MAX_UPSTREAM_MESSAGE", "64K")]);
    let mut c = gw.client();
    let mut send = |body: &str| {
        c.post("/mcp", body)
            .header("Authorization", &bearer())
            .header("Mcp-Session-Id", &token)
            .send()
    };
    // A notification of no MCP revision is not fanned out.
    let before = m.methods().len();
    let r = send(r#"{"jsonrpc":"2.0","method":"notifications/exfiltrate"}"#);
    assert_eq!(r.status, 403, "{}", r.text());
    // The same decisions as on one upstream, on the upstream's own names.
    for body in [
        r#"{"jsonrpc":"2.0","id":2,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"m__admin_reset"},"argument":{"name":"a","value":""}}}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"resources/read","params":{"uri":"scopegate://m/FILE:///etc/secret"}}"#,
        r#"{"jsonrpc":"2.0","id":4,"method":"resources/read","params":{"uri":"scopegate://m/file://localhost/srv/../etc/secret"}}"#,
        r#"{"jsonrpc":"2.0","id":5,"method":"resources/read","params":{"uri":"scopegate://m/ file:///srv/x"}}"#,
        r#"{"jsonrpc":"2.0","id":6,"method":"admin/exec"}"#,
    ] {
        let r = send(body);
        assert_eq!(r.json()["error"]["code"], -32004, "{body}: {}", r.text());
    }
    assert_eq!(m.methods().len(), before, "{:?}", m.methods());
    // An endless event from an upstream is cut at the limit; the agent is told.
    let r = send(&call(7, "h__anything", "{}"));
    let text = r.text();
    assert!(
        text.contains("\"id\":7") && text.contains("SCOPEGATE_MAX_UPSTREAM_MESSAGE"),
        "{text}"
    );
    assert!(text.len() < 4096);
}

#[test]
fn agents_closing_the_merged_stream_release_every_upstream_stream() {
    let up = raw_upstream(|s, head, body| {
        mcp_or(s, head, body, |s| {
            let _ = s.write_all(SSE_HEAD);
            let _ = s.write_all(b"a\r\n: opened\n\n\r\n");
        })
    });
    let (_m, gw, token) = aggregate(&up, &[]);
    for _ in 0..3 {
        let mut c = gw.client();
        c.request("GET", "/mcp")
            .header("Authorization", &bearer())
            .header("Mcp-Session-Id", &token)
            .header("Accept", "text/event-stream")
            .write();
        let (status, _) = c.read_head();
        assert_eq!(status, 200);
        c.read_until("opened");
        drop(c);
    }
    assert!(
        eventually(Duration::from_secs(5), || up
            .closed_get
            .load(Ordering::SeqCst)
            == 3),
        "{} of 3 upstream streams closed",
        up.closed_get.load(Ordering::SeqCst)
    );
}

#[test]
fn answers_to_filter_come_uncompressed_or_not_at_all() {
    // The agent's Accept-Encoding does not reach the upstream in policy mode.
    let s = setup();
    let r = post(
        &s,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        &[("Accept-Encoding", "gzip, br")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        s.up.recorded().last().unwrap().header("accept-encoding"),
        None
    );
    // An upstream that compresses a list anyway: refused, never relayed unread.
    let up = raw_upstream(|s, _, _| {
        let body = b"\x1f\x8b\x08\x00garbled";
        let _ = s.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        let _ = s.write_all(body);
    });
    let gw = raw_gateway(&up, &[]);
    let r = gw
        .client()
        .post(
            "/mcp/h",
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#,
        )
        .header("Authorization", &bearer())
        .send();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("Content-Encoding"), "{}", r.text());
}

#[test]
fn lists_on_the_aggregate_s_streams_are_filtered_too() {
    let up = raw_upstream(|s, head, body| {
        mcp_or(s, head, body, |s| {
            let _ = s.write_all(SSE_HEAD);
            let event = br#"data: {"jsonrpc":"2.0","id":9,"result":{"tools":[{"name":"hidden_tool"},{"name":"fine_tool"}]}}"#;
            let mut out = event.to_vec();
            out.extend_from_slice(b"\n\n");
            let _ = s.write_all(format!("{:x}\r\n", out.len()).as_bytes());
            let _ = s.write_all(&out);
            let _ = s.write_all(b"\r\n0\r\n\r\n");
        })
    });
    let (_m, gw, token) = aggregate(&up, &[]);
    let r = gw
        .client()
        .post("/mcp", &call(9, "h__anything", "{}"))
        .header("Authorization", &bearer())
        .header("Mcp-Session-Id", &token)
        .send();
    let text = r.text();
    assert!(text.contains("fine_tool"), "{text}");
    assert!(!text.contains("hidden_tool"), "{text}");
}
