//! Policy mode through the real binary: authentication, filtered discovery, authorization of
//! exactly what the upstream executes, sealed sessions, credential isolation, tenants, reload.

mod support;

use std::time::Duration;
use support::*;

const BOT: &str = "bot-key-0123456789";
const OTHER: &str = "other-key-0123456789";
const GLOBEX: &str = "globex-key-0123456789";

fn policy_text(other_url: &str) -> String {
    format!(
        r#"
[[tenant]]
id = "acme"
[[tenant]]
id = "globex"

[[upstream]]
name = "m"
tenant = "acme"
[upstream.headers]
X-Upstream-Key = "Bearer ${{SG_TEST_UPSTREAM_TOKEN}}"

[[upstream]]
name = "other"
url = "{other_url}"
tenant = "globex"

[[agent]]
id = "bot"
tenant = "acme"
user = "alice@acme.example"
key_sha256 = "{bot}"
allow = ["m/echo", "m/s*", "m/big", "m/delete_*"]
deny = ["m/sleep", "m/delete_*", "m/prompt:secret*"]

[[agent.tool]]
match = "m/echo"
[agent.tool.args]
repo = {{ one_of = ["acme/web", "acme/api"] }}
path = {{ prefix = "/srv/shared/" }}
paths = {{ items = {{ prefix = "/srv/shared/" }} }}

[[agent]]
id = "other-bot"
tenant = "acme"
key_sha256 = "{other}"
allow = ["m/*"]

[[agent]]
id = "globex-bot"
tenant = "globex"
key_sha256 = "{globex}"
allow = ["other/*"]
"#,
        bot = sha256_hex(BOT),
        other = sha256_hex(OTHER),
        globex = sha256_hex(GLOBEX),
    )
}

struct Setup {
    up: MockServer,
    other: MockServer,
    gw: Running,
    policy: std::path::PathBuf,
}

fn setup_with(config: MockConfig, extra: &[(&str, &str)]) -> Setup {
    let up = MockServer::start(config);
    let other = MockServer::start(MockConfig::default());
    let (mut g, policy) = Gateway::open()
        .upstream("m", &up)
        .env("SG_TEST_UPSTREAM_TOKEN", "upstream-secret")
        .env(
            "SCOPEGATE_SESSION_SECRET",
            "test-secret-test-secret-test-secret!",
        )
        .policy(&policy_text(&other.url()));
    for (k, v) in extra {
        g = g.env(k, v);
    }
    Setup {
        gw: g.start(),
        up,
        other,
        policy,
    }
}

fn setup() -> Setup {
    setup_with(MockConfig::default(), &[])
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Initializes as `key`; returns the session token the agent sees.
fn initialize(c: &mut Client, path: &str, key: &str) -> String {
    let r = c
        .post(path, INIT)
        .header("Authorization", &bearer(key))
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("mcp-session-id").expect("session id").to_owned()
}

fn tool_names(r: &Response) -> Vec<String> {
    let text = r.text();
    let json = match text.find("data: ") {
        Some(i) => text[i + 6..].lines().next().unwrap().to_owned(),
        None => text,
    };
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn requests_without_valid_credentials_get_401_with_resource_metadata() {
    let s = setup_with(
        MockConfig::default(),
        &[("SCOPEGATE_AUTH_SERVERS", "https://auth.acme.example")],
    );
    let mut c = s.gw.client();
    for auth in [
        None,
        Some("Bearer wrong-key"),
        Some("Basic Ym90OmtleQ=="),
        Some("Bearer "),
    ] {
        let mut req = c.post("/mcp/m", INIT);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.send();
        assert_eq!(r.status, 401, "{auth:?}");
        let www = r.header("www-authenticate").unwrap();
        assert!(
            www.starts_with(
                "Bearer resource_metadata=\"http://127.0.0.1/.well-known/oauth-protected-resource\""
            ),
            "{www}"
        );
    }
    assert!(
        s.up.recorded().is_empty(),
        "an unauthenticated request reached the upstream"
    );
    let r = c
        .request("GET", "/.well-known/oauth-protected-resource")
        .send();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["resource"], "http://127.0.0.1/mcp");
    assert_eq!(v["authorization_servers"][0], "https://auth.acme.example");
    assert_eq!(v["bearer_methods_supported"][0], "header");
}

#[test]
fn tools_list_shows_only_allowed_tools_json_and_sse() {
    for sse in [false, true] {
        let s = setup_with(
            MockConfig {
                sse,
                ..MockConfig::default()
            },
            &[],
        );
        let mut c = s.gw.client();
        let token = initialize(&mut c, "/mcp/m", BOT);
        let r = c
            .post(
                "/mcp/m",
                r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
            )
            .header("Authorization", &bearer(BOT))
            .header("Mcp-Session-Id", &token)
            .send();
        assert_eq!(r.status, 200);
        let mut names = tool_names(&r);
        names.sort();
        assert_eq!(
            names,
            ["big", "echo", "slow_events", "sse_raw", "status"],
            "sse={sse}"
        );
        // Another agent with a wider profile sees more through the same gateway.
        let token = initialize(&mut c, "/mcp/m", OTHER);
        let r = c
            .post(
                "/mcp/m",
                r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#,
            )
            .header("Authorization", &bearer(OTHER))
            .header("Mcp-Session-Id", &token)
            .send();
        assert_eq!(tool_names(&r).len(), 8, "sse={sse}");
    }
}

/// Sends a tools/call body as BOT; returns the response.
fn call_as_bot(s: &Setup, body: &str, headers: &[(&str, &str)]) -> Response {
    let mut c = s.gw.client();
    let token = initialize(&mut c, "/mcp/m", BOT);
    let mut req = c
        .post("/mcp/m", body)
        .header("Authorization", &bearer(BOT))
        .header("Mcp-Session-Id", &token);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    req.send()
}

/// tools/call names the upstream received, in order (batch elements included).
fn executed_tools(up: &MockServer) -> Vec<String> {
    up.recorded()
        .iter()
        .filter_map(|r| r.json())
        .flat_map(|v| match v {
            serde_json::Value::Array(items) => items,
            one => vec![one],
        })
        .filter(|v| v["method"] == "tools/call")
        .map(|v| v["params"]["name"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[test]
fn refused_calls_are_answered_by_scopegate_and_never_reach_the_upstream() {
    let s = setup();
    let r = call_as_bot(&s, &call(5, "sleep", "{}"), &[]);
    assert_eq!(
        r.status, 200,
        "a refusal is a JSON-RPC error, so SDK sessions carry on"
    );
    let v = r.json();
    assert_eq!(v["id"], 5);
    assert_eq!(v["error"]["code"], -32004);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("denied by rule \"m/sleep\""),
        "{v}"
    );
    assert_eq!(v["error"]["data"]["rule"], "deny \"m/sleep\"");

    // deny wins over allow (m/delete_* is in both)
    let v = call_as_bot(&s, &call(6, "delete_repo", "{}"), &[]).json();
    assert_eq!(v["error"]["data"]["rule"], "deny \"m/delete_*\"");
    // not allowed at all
    let v = call_as_bot(&s, &call(7, "close_delimited", "{}"), &[]).json();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no allow rule"),
        "{v}"
    );
    // unknown tool
    let v = call_as_bot(&s, &call(8, "no_such_tool", "{}"), &[]).json();
    assert_eq!(v["error"]["code"], -32004);
    // argument constraints
    let v = call_as_bot(&s, &call(9, "echo", r#"{"repo":"acme/secret"}"#), &[]).json();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("\"repo\""),
        "{v}"
    );
    let v = call_as_bot(
        &s,
        &call(10, "echo", r#"{"path":"/srv/shared/../../etc/passwd"}"#),
        &[],
    )
    .json();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("\"path\""),
        "{v}"
    );
    // Each item of an array of paths (server-filesystem's read_multiple_files).
    for paths in [
        r#"["/srv/shared/a","/etc/passwd"]"#,
        r#"["/srv/shared/../etc/passwd"]"#,
        r#""/srv/shared/a""#,
    ] {
        let args = format!(r#"{{"paths":{paths}}}"#);
        let v = call_as_bot(&s, &call(12, "echo", &args), &[]).json();
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("\"paths\""), "{paths}: {v}");
    }
    assert!(
        executed_tools(&s.up).is_empty(),
        "refused calls reached the upstream: {:?}",
        executed_tools(&s.up)
    );

    // Allowed calls do reach it.
    let v = call_as_bot(
        &s,
        &call(
            11,
            "echo",
            r#"{"repo":"acme/web","path":"/srv/shared/x","paths":["/srv/shared/y","/srv/shared/z/w"]}"#,
        ),
        &[],
    )
    .json();
    assert_eq!(v["result"]["isError"], false, "{v}");
    assert_eq!(executed_tools(&s.up), ["echo"]);
}

/// (what, body, extra headers)
type Case = (&'static str, String, Vec<(&'static str, &'static str)>);

#[test]
fn ambiguous_bodies_never_let_a_refused_tool_run() {
    let s = setup();
    let cases: Vec<Case> = vec![
        (
            "duplicate name",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"sleep","arguments":{}}}"#.into(),
            vec![],
        ),
        (
            "duplicate method",
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":{"name":"sleep"}}"#.into(),
            vec![],
        ),
        (
            "escaped name",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"sl\u0065ep","arguments":{}}}"#.into(),
            vec![],
        ),
        (
            "escaped key",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"n\u0061me":"sleep","arguments":{}}}"#.into(),
            vec![],
        ),
        (
            "name before method",
            r#"{"params":{"arguments":{},"name":"sleep"},"id":1,"jsonrpc":"2.0","method":"tools/call"}"#.into(),
            vec![],
        ),
        (
            "duplicate argument",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"repo":"acme/web","repo":"acme/secret"}}}"#.into(),
            vec![],
        ),
        (
            "headers disagree with the body",
            call(1, "sleep", "{}"),
            vec![("Mcp-Method", "tools/call"), ("Mcp-Name", "echo")],
        ),
        (
            "method header disagrees",
            call(1, "sleep", "{}"),
            vec![("Mcp-Method", "ping")],
        ),
        (
            "batch in a revision without batches",
            format!("[{}]", call(1, "sleep", "{}")),
            vec![("MCP-Protocol-Version", "2025-06-18")],
        ),
        (
            "batch hiding a refused call",
            format!("[{},{}]", call(1, "echo", "{}"), call(2, "sleep", "{}")),
            vec![("MCP-Protocol-Version", "2025-03-26")],
        ),
    ];
    for (what, body, headers) in &cases {
        let r = call_as_bot(&s, body, headers);
        let text = r.text();
        assert!(
            r.status == 400 || text.contains("\"error\""),
            "{what}: status {} body {text}",
            r.status
        );
    }
    assert!(
        executed_tools(&s.up).is_empty(),
        "a refused tool ran: {:?}",
        executed_tools(&s.up)
    );
    // The batch refusal answers every request in it.
    let r = call_as_bot(
        &s,
        &format!("[{},{}]", call(1, "echo", "{}"), call(2, "sleep", "{}")),
        &[("MCP-Protocol-Version", "2025-03-26")],
    );
    let v = r.json();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["id"], 1);
    assert_eq!(v[1]["id"], 2);
    // A batch of allowed calls in 2025-03-26 goes through.
    let r = call_as_bot(
        &s,
        &format!(
            "[{},{}]",
            call(1, "echo", "{}"),
            call(2, "status", r#"{"code":200,"body":"{}"}"#)
        ),
        &[("MCP-Protocol-Version", "2025-03-26")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(executed_tools(&s.up), ["echo", "status"]);
}

#[test]
fn sessions_are_sealed_and_bound_to_the_agent() {
    let s = setup();
    let mut c = s.gw.client();
    let token = initialize(&mut c, "/mcp/m", BOT);
    assert!(token.starts_with("sg1."), "{token}");
    assert!(
        !token.contains("mock-session"),
        "the upstream's id must not show: {token}"
    );
    let r = c
        .post("/mcp/m", &call(2, "echo", "{}"))
        .header("Authorization", &bearer(BOT))
        .header("Mcp-Session-Id", &token)
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = s.up.recorded();
    assert_eq!(
        rec.last().unwrap().header("mcp-session-id"),
        Some("mock-session-0"),
        "the upstream sees its own id"
    );

    // Another agent presenting BOT's session is refused with 404 (re-initialize).
    let r = c
        .post("/mcp/m", &call(3, "echo", "{}"))
        .header("Authorization", &bearer(OTHER))
        .header("Mcp-Session-Id", &token)
        .send();
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["id"], 3);
    // Forged and raw upstream ids too.
    for forged in [
        "mock-session-0",
        "sg1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        &token[..token.len() - 2],
    ] {
        let r = c
            .post("/mcp/m", &call(4, "echo", "{}"))
            .header("Authorization", &bearer(BOT))
            .header("Mcp-Session-Id", forged)
            .send();
        assert_eq!(r.status, 404, "{forged}");
    }
    assert_eq!(executed_tools(&s.up), ["echo"]);
    // DELETE carries the upstream's id.
    let r = c
        .request("DELETE", "/mcp/m")
        .header("Authorization", &bearer(BOT))
        .header("Mcp-Session-Id", &token)
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(
        s.up.recorded().last().unwrap().header("mcp-session-id"),
        Some("mock-session-0")
    );
}

#[test]
fn a_session_token_opens_on_another_replica_with_the_same_secret() {
    let s = setup();
    let mut c = s.gw.client();
    let token = initialize(&mut c, "/mcp/m", BOT);
    // A second gateway process, same policy and secret: it can open the first one's token.
    let (g, _) = Gateway::open()
        .upstream("m", &s.up)
        .env("SG_TEST_UPSTREAM_TOKEN", "upstream-secret")
        .env(
            "SCOPEGATE_SESSION_SECRET",
            "test-secret-test-secret-test-secret!",
        )
        .policy(&policy_text(&s.other.url()));
    let replica = g.start();
    let r = replica
        .client()
        .post("/mcp/m", &call(2, "echo", "{}"))
        .header("Authorization", &bearer(BOT))
        .header("Mcp-Session-Id", &token)
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn credentials_are_isolated_both_ways() {
    let s = setup();
    let r = call_as_bot(
        &s,
        &call(
            3,
            "status",
            r#"{"code":200,"body":"{\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{}}","headers":{"Set-Cookie":"upstream-session=1","WWW-Authenticate":"Bearer realm=upstream","X-Upstream-Key":"echoed","X-Fine":"yes"}}"#,
        ),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("set-cookie"), None);
    assert_eq!(r.header("www-authenticate"), None);
    assert_eq!(r.header("x-upstream-key"), None);
    assert_eq!(r.header("x-fine"), Some("yes"));
    for rec in s.up.recorded() {
        assert_eq!(
            rec.header("authorization"),
            None,
            "the agent's key went upstream"
        );
        assert_eq!(
            rec.header("x-upstream-key"),
            Some("Bearer upstream-secret"),
            "injected credential missing"
        );
    }
}

#[test]
fn path_keys_work_and_never_travel() {
    let s = setup_with(MockConfig::default(), &[("SCOPEGATE_PATH_KEYS", "1")]);
    let mut c = s.gw.client();
    let r = c.post(&format!("/key/{BOT}/mcp/m"), INIT).send();
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("mcp-session-id").unwrap().to_owned();
    let r = c
        .post(
            &format!("/key/{BOT}/mcp/m"),
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
        )
        .header("Mcp-Session-Id", &token)
        .send();
    assert_eq!(tool_names(&r).len(), 5);
    assert_eq!(c.post("/key/wrong/mcp/m", INIT).send().status, 401);
    for rec in s.up.recorded() {
        assert_eq!(rec.path, "/mcp");
        assert!(!format!("{:?}", rec.headers).contains(BOT));
        assert!(!String::from_utf8_lossy(&rec.body).contains(BOT));
    }
    assert!(!s.gw.log().contains(BOT), "the path key was logged");
}

#[test]
fn tenants_do_not_see_each_others_upstreams() {
    let s = setup();
    let mut c = s.gw.client();
    // acme's bot cannot reach globex's upstream, and is told it does not exist.
    let r = c
        .post("/mcp/other", INIT)
        .header("Authorization", &bearer(BOT))
        .send();
    assert_eq!(r.status, 404);
    let r = c
        .post("/mcp/m", INIT)
        .header("Authorization", &bearer(GLOBEX))
        .send();
    assert_eq!(r.status, 404);
    let r = c
        .post("/mcp/other", INIT)
        .header("Authorization", &bearer(GLOBEX))
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(s.other.recorded().len(), 1);
    assert!(
        s.other.recorded()[0].header("x-upstream-key").is_none(),
        "acme's credential went to globex's upstream"
    );
}

#[test]
fn reload_switches_policy_and_keeps_the_old_one_when_invalid() {
    let s = setup();
    let mut c = s.gw.client();
    let token = initialize(&mut c, "/mcp/m", BOT);
    let list = |c: &mut Client, token: &str| {
        let r = c
            .post(
                "/mcp/m",
                r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
            )
            .header("Authorization", &bearer(BOT))
            .header("Mcp-Session-Id", token)
            .send();
        tool_names(&r).len()
    };
    assert_eq!(list(&mut c, &token), 5);

    // An invalid file: the running policy stays, the log says why.
    std::fs::write(&s.policy, "[[agent]]\nid = \"x\"\ncolour = 1\n").unwrap();
    s.gw.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(5), || s
            .gw
            .log()
            .contains("policy reload failed")),
        "{}",
        s.gw.log()
    );
    assert!(s.gw.log().contains("colour"));
    assert_eq!(list(&mut c, &token), 5);

    // A valid change: bot may now use everything but sleep. The session survives.
    let widened = policy_text(&s.other.url()).replace(
        r#"allow = ["m/echo", "m/s*", "m/big", "m/delete_*"]"#,
        r#"allow = ["m/*"]"#,
    );
    std::fs::write(&s.policy, widened).unwrap();
    s.gw.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(5), || s
            .gw
            .log()
            .contains("policy reloaded")),
        "{}",
        s.gw.log()
    );
    assert_eq!(list(&mut c, &token), 7);

    // A change of the file alone (no signal) is picked up too.
    let narrowed = policy_text(&s.other.url()).replace(
        r#"allow = ["m/echo", "m/s*", "m/big", "m/delete_*"]"#,
        r#"allow = ["m/echo"]"#,
    );
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&s.policy, narrowed).unwrap();
    assert!(eventually(Duration::from_secs(10), || list(&mut c, &token) == 1));
}

#[test]
fn bad_policies_refuse_to_start_naming_the_line() {
    let up = MockServer::start(MockConfig::default());
    let (g, _) = Gateway::open()
        .upstream("m", &up)
        .policy("[[agent]]\nid = \"a\"\nallow = [\"nowhere/x\"]\n");
    let (code, err) = g.run_to_exit();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("policy.toml:3"), "{err}");
    assert!(err.contains("agent.allow"), "{err}");
}

#[test]
fn the_shared_example_policy_validates_and_serves() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policy.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scopegate"))
        .args(["validate", example.to_str().unwrap()])
        .env("GITHUB_TOKEN", "t")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The contract as shipped in ../shared, when it is there, is the same file.
    let shared =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/examples/policy.toml");
    if let Ok(text) = std::fs::read_to_string(&shared) {
        assert_eq!(
            text,
            std::fs::read_to_string(&example).unwrap(),
            "examples/policy.toml drifted from the contract"
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scopegate"))
        .args([
            "check",
            "--policy",
            example.to_str().unwrap(),
            "--agent",
            "triage-bot",
            "--tool",
            "github/delete_repo",
        ])
        .env("GITHUB_TOKEN", "t")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("deny \"github/delete_*\""));
}

fn hs256(secret: &[u8], claims: &str) -> String {
    use scopegate::token::base64url;
    let signed = format!(
        "{}.{}",
        base64url(br#"{"alg":"HS256","typ":"JWT"}"#),
        base64url(claims.as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    format!(
        "{signed}.{}",
        base64url(ring::hmac::sign(&key, signed.as_bytes()).as_ref())
    )
}

#[test]
fn jwt_bearer_tokens_name_agents() {
    let secret = b"jwt-secret-for-tests-0123456789ab";
    let dir = temp_dir("jwks");
    let jwks = dir.join("jwks.json");
    std::fs::write(
        &jwks,
        format!(
            r#"{{"keys":[{{"kty":"oct","k":"{}"}}]}}"#,
            scopegate::token::base64url(secret)
        ),
    )
    .unwrap();
    let s = setup_with(
        MockConfig::default(),
        &[
            ("SCOPEGATE_JWT_KEYS", jwks.to_str().unwrap()),
            ("SCOPEGATE_JWT_ISSUER", "https://auth.test"),
            ("SCOPEGATE_JWT_AUDIENCE", "http://127.0.0.1/mcp"),
        ],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |sub: &str, aud: &str, exp: u64| {
        format!(r#"{{"iss":"https://auth.test","aud":"{aud}","sub":"{sub}","exp":{exp}}}"#)
    };
    let mut c = s.gw.client();
    let good = hs256(secret, &claims("bot", "http://127.0.0.1/mcp", now + 300));
    let token = initialize(&mut c, "/mcp/m", &good);
    let r = c
        .post(
            "/mcp/m",
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
        )
        .header("Authorization", &bearer(&good))
        .header("Mcp-Session-Id", &token)
        .send();
    assert_eq!(tool_names(&r).len(), 5, "the JWT's sub is agent bot");
    for bad in [
        hs256(secret, &claims("bot", "http://other/mcp", now + 300)),
        hs256(secret, &claims("bot", "http://127.0.0.1/mcp", now - 3600)),
        hs256(secret, &claims("nobody", "http://127.0.0.1/mcp", now + 300)),
        hs256(
            b"wrong-secret-wrong-secret-wrong!!",
            &claims("bot", "http://127.0.0.1/mcp", now + 300),
        ),
    ] {
        let r = c
            .post("/mcp/m", INIT)
            .header("Authorization", &bearer(&bad))
            .send();
        assert_eq!(r.status, 401, "{bad}");
    }
    // Keys still work beside JWTs.
    assert_eq!(
        c.post("/mcp/m", INIT)
            .header("Authorization", &bearer(OTHER))
            .send()
            .status,
        200
    );
}

#[test]
fn hash_key_prints_the_digest_or_makes_a_key() {
    let bin = env!("CARGO_BIN_EXE_scopegate");
    let out = std::process::Command::new(bin)
        .args(["hash-key", "password"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    );
    let out = std::process::Command::new(bin)
        .arg("hash-key")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim()
        .to_owned();
    let digest = text
        .lines()
        .find_map(|l| l.strip_prefix("key_sha256:"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(key.len() >= 40, "a strong key: {key}");
    assert_eq!(digest, sha256_hex(&key));
    let again = std::process::Command::new(bin)
        .arg("hash-key")
        .output()
        .unwrap();
    assert_ne!(out.stdout, again.stdout, "keys are random");
}

#[test]
fn upstreams_can_come_from_the_policy_alone() {
    let up = MockServer::start(MockConfig::default());
    let (g, _) = Gateway::open().policy(&format!(
        "[[upstream]]\nname = \"only\"\nurl = \"{}\"\n[[agent]]\nid = \"a\"\nkey_sha256 = \"{}\"\nallow = [\"only/*\"]\n",
        up.url(),
        sha256_hex(BOT)
    ));
    let gw = g.start();
    let mut c = gw.client();
    // One upstream, so /mcp reaches it too.
    let r = c
        .post("/mcp", INIT)
        .header("Authorization", &bearer(BOT))
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.recorded().len(), 1);
}

#[test]
fn a_key_revoked_by_reload_is_refused_on_a_connection_that_used_it() {
    let s = setup();
    let mut c = s.gw.client();
    let token = initialize(&mut c, "/mcp/m", BOT);
    let send = |c: &mut Client| {
        c.post("/mcp/m", &call(2, "echo", "{}"))
            .header("Authorization", &bearer(BOT))
            .header("Mcp-Session-Id", &token)
            .send()
    };
    assert_eq!(send(&mut c).status, 200);
    assert_eq!(send(&mut c).status, 200);
    // The bot's key is replaced in the policy; the same keep-alive connection presents the old
    // key again and must not be served from anything remembered about it.
    let revoked = policy_text(&s.other.url()).replace(
        &sha256_hex(BOT),
        &sha256_hex("a-new-key-for-the-bot-0123456789"),
    );
    std::fs::write(&s.policy, revoked).unwrap();
    s.gw.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || s
        .gw
        .log()
        .contains("policy reloaded")));
    let r = send(&mut c);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(executed_tools(&s.up), ["echo", "echo"]);
}

/// An upstream the policy defines keeps its connections alive like one from the environment
/// (the pool keeps connections by the server they go to).
#[test]
fn policy_upstreams_keep_their_connections_alive() {
    let s = setup();
    let mut c = s.gw.client();
    let token = initialize(&mut c, "/mcp/other", GLOBEX);
    let ping = |c: &mut Client| {
        c.post("/mcp/other", r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
            .header("Authorization", &bearer(GLOBEX))
            .header("Mcp-Session-Id", &token)
            .send()
    };
    for _ in 0..10 {
        assert_eq!(ping(&mut c).status, 200);
    }
    assert_eq!(s.other.methods().len(), 11, "initialize and ten pings");
    assert_eq!(s.other.connections(), 1, "one kept-alive connection");
}

/// Two upstreams behind one address keep their own connections: a server that routes a whole
/// connection by its first request must never get one upstream's requests (and injected
/// credential) on the other's connection.
#[test]
fn upstreams_behind_one_address_do_not_share_connections() {
    let up = MockServer::start(MockConfig::default());
    let gw = Gateway::open()
        .upstream("a", &up)
        .upstream("b", &up)
        .start();
    let mut c = gw.client();
    for path in ["/mcp/a", "/mcp/b", "/mcp/a", "/mcp/b", "/mcp/a"] {
        assert_eq!(c.post(path, INIT).send().status, 200);
    }
    assert_eq!(up.methods().len(), 5);
    assert_eq!(
        up.connections(),
        2,
        "one kept-alive connection per upstream"
    );
}

#[test]
fn check_needs_no_secrets_takes_both_flag_forms_and_says_the_real_reason() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policy.toml");
    let check = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_scopegate"))
            .arg("check")
            .args(args)
            // The policy's ${GITHUB_TOKEN} is deliberately not set.
            .env_remove("GITHUB_TOKEN")
            .env_remove("SCOPEGATE_UPSTREAMS")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let policy = format!("--policy={}", example.display());
    let (code, text) = check(&[&policy, "--agent=triage-bot", "--tool=files/read_file"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("allow"), "{text}");
    // An agent whose `upstreams` list leaves github out: the operator hears why.
    let (code, text) = check(&[
        &policy,
        "--agent",
        "nightly-report",
        "--tool",
        "github/list_issues",
    ]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("deny: unknown tool: upstream \"github\" is not in agent \"nightly-report\"'s `upstreams` list"),
        "{text}"
    );
}
