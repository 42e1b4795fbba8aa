//! Rate limits through the real binary: per agent, per tool, per tenant, per upstream; refusals
//! that take nothing; the refusal's shape; reload keeping bucket state.

mod support;

use std::time::Duration;
use support::*;

const A: &str = "agent-a-key-0123456789";
const B: &str = "agent-b-key-0123456789";

struct Setup {
    m: MockServer,
    gw: Running,
    policy: std::path::PathBuf,
}

fn setup(policy: &str, extra: &[(&str, &str)]) -> Setup {
    let m = MockServer::start(MockConfig {
        sessions: false,
        ..MockConfig::default()
    });
    let n = MockServer::start(MockConfig {
        sessions: false,
        ..MockConfig::default()
    });
    let (mut g, path) = Gateway::open().upstream("m", &m).upstream("n", &n).policy(
        &policy
            .replace("{A}", &sha256_hex(A))
            .replace("{B}", &sha256_hex(B)),
    );
    for (k, v) in extra {
        g = g.env(k, v);
    }
    Setup {
        gw: g.start(),
        m,
        policy: path,
    }
}

fn call_as(c: &mut Client, key: &str, upstream: &str, tool: &str) -> Response {
    c.post(
        &format!("/mcp/{upstream}"),
        &call(1, tool, r#"{"code":200,"body":"{}"}"#),
    )
    .header("Authorization", &format!("Bearer {key}"))
    .send()
}

fn limited(r: &Response) -> bool {
    r.text().contains("-32007")
}

#[test]
fn the_burst_passes_then_refusals_say_which_limit_and_when() {
    let s = setup(
        r#"
[[agent]]
id = "a"
key_sha256 = "{A}"
allow = ["m/*"]
rate = { per_second = 2, burst = 3 }
"#,
        &[],
    );
    let mut c = s.gw.client();
    let results: Vec<Response> = (0..5).map(|_| call_as(&mut c, A, "m", "echo")).collect();
    let passed = results.iter().filter(|r| !limited(r)).count();
    assert_eq!(passed, 3, "exactly the burst passes at once");
    let refusal = results.last().unwrap();
    assert_eq!(
        refusal.status, 200,
        "a JSON-RPC error, so the SDK session carries on"
    );
    assert_eq!(refusal.header("retry-after"), Some("1"));
    let v = refusal.json();
    assert_eq!(v["id"], 1);
    assert_eq!(v["error"]["code"], -32007);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("rate limited by agent \"a\" (2/s, burst 3)"),
        "{msg}"
    );
    let retry = v["error"]["data"]["retry_after_ms"].as_u64().unwrap();
    assert!((1..=500).contains(&retry), "{retry}");
    assert_eq!(v["error"]["data"]["limit"], "agent \"a\" (2/s, burst 3)");
    assert_eq!(
        s.m.methods().len(),
        3,
        "refused calls never reach the upstream"
    );
    // After the advertised wait, the same connection is admitted again.
    std::thread::sleep(Duration::from_millis(retry + 20));
    assert!(!limited(&call_as(&mut c, A, "m", "echo")));
}

#[test]
fn a_refused_call_takes_nothing_from_any_bucket() {
    // Upstream m admits one call an hour; agent a has three. A call refused by m's bucket is
    // checked after a's: a's token must be given back.
    let s = setup(
        r#"
[[upstream]]
name = "m"
rate = { per_hour = 1, burst = 1 }

[[agent]]
id = "a"
key_sha256 = "{A}"
allow = ["m/*", "n/*"]
rate = { per_hour = 1, burst = 3 }
"#,
        &[],
    );
    let mut c = s.gw.client();
    assert!(!limited(&call_as(&mut c, A, "m", "echo")));
    let r = call_as(&mut c, A, "m", "echo");
    assert!(r.text().contains("upstream \\\"m\\\""), "{}", r.text());
    assert!(
        !limited(&call_as(&mut c, A, "n", "echo")),
        "agent a must still have 2 tokens"
    );
    assert!(
        !limited(&call_as(&mut c, A, "n", "echo")),
        "agent a must still have 1 token"
    );
    let r = call_as(&mut c, A, "n", "echo");
    assert!(r.text().contains("agent \\\"a\\\""), "{}", r.text());
}

#[test]
fn tool_tenant_and_upstream_limits() {
    let s = setup(
        r#"
[[tenant]]
id = "t"
rate = { per_hour = 1, burst = 4 }

[[agent]]
id = "a"
tenant = "t"
key_sha256 = "{A}"
allow = ["m/*", "n/*"]

[[agent.tool]]
match = "m/s*"
rate = { per_hour = 1, burst = 1 }

[[agent]]
id = "b"
tenant = "t"
key_sha256 = "{B}"
allow = ["m/*", "n/*"]
"#,
        &[],
    );
    let mut c = s.gw.client();
    // A glob rule limits each tool it matches separately: status and sse_raw, one each.
    assert!(!limited(&call_as(&mut c, A, "m", "status")));
    let r = call_as(&mut c, A, "m", "status");
    assert!(
        r.text().contains("tool m/s* for agent \\\"a\\\""),
        "{}",
        r.text()
    );
    assert!(!limited(&call_as(&mut c, A, "m", "sse_raw")));
    // The tenant's 4 are shared by a and b: 2 used by a, 2 left.
    assert!(!limited(&call_as(&mut c, B, "n", "echo")));
    assert!(!limited(&call_as(&mut c, B, "n", "echo")));
    let r = call_as(&mut c, B, "n", "echo");
    assert!(r.text().contains("tenant \\\"t\\\""), "{}", r.text());
    let r = call_as(&mut c, A, "n", "echo");
    assert!(r.text().contains("tenant \\\"t\\\""), "{}", r.text());
}

#[test]
fn other_requests_count_on_the_agent_bucket_and_notifications_never() {
    let s = setup(
        r#"
[[agent]]
id = "a"
key_sha256 = "{A}"
allow = ["m/*"]
rate = { per_hour = 1, burst = 2 }
"#,
        &[("SCOPEGATE_RATE_LIMIT_STATUS", "429")],
    );
    let mut c = s.gw.client();
    let list = |c: &mut Client| {
        c.post(
            "/mcp/m",
            r#"{"jsonrpc":"2.0","id":9,"method":"tools/list"}"#,
        )
        .header("Authorization", &format!("Bearer {A}"))
        .send()
    };
    assert_eq!(list(&mut c).status, 200);
    for _ in 0..5 {
        let r = c
            .post(
                "/mcp/m",
                r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#,
            )
            .header("Authorization", &format!("Bearer {A}"))
            .send();
        assert_eq!(r.status, 202, "notifications are never limited");
    }
    assert_eq!(list(&mut c).status, 200);
    let r = list(&mut c);
    assert_eq!(r.status, 429, "SCOPEGATE_RATE_LIMIT_STATUS=429");
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.json()["error"]["code"], -32007);
}

#[test]
fn reload_keeps_the_state_of_unchanged_buckets() {
    let policy = r#"
[[agent]]
id = "a"
key_sha256 = "{A}"
allow = ["m/*"]
rate = { per_hour = 1, burst = 2 }
"#;
    let s = setup(policy, &[]);
    let mut c = s.gw.client();
    assert!(!limited(&call_as(&mut c, A, "m", "echo")));
    assert!(!limited(&call_as(&mut c, A, "m", "echo")));
    assert!(limited(&call_as(&mut c, A, "m", "echo")));
    // An unrelated change: a's bucket keeps its state (still empty).
    let with_b = format!(
        "{}\n[[agent]]\nid = \"b\"\nkey_sha256 = \"{}\"\nallow = [\"m/*\"]\n",
        policy.replace("{A}", &sha256_hex(A)),
        sha256_hex(B)
    );
    std::fs::write(&s.policy, &with_b).unwrap();
    s.gw.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || s
        .gw
        .log()
        .contains("policy reloaded")));
    assert!(
        limited(&call_as(&mut c, A, "m", "echo")),
        "reload must not refill an unchanged bucket"
    );
    assert!(
        !limited(&call_as(&mut c, B, "m", "echo")),
        "the new agent works"
    );
    // A changed limit is a new bucket.
    std::fs::write(&s.policy, with_b.replace("burst = 2", "burst = 5")).unwrap();
    s.gw.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || s
        .gw
        .log()
        .matches("policy reloaded")
        .count()
        == 2));
    assert!(!limited(&call_as(&mut c, A, "m", "echo")));
}
