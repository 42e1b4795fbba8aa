//! The aggregate endpoint through the real binary: several mock upstreams behind one `/mcp`.
//! Initialize fan-out and the sealed multi-session, prefixed and filtered lists with a combined
//! cursor, calls routed with only the name spliced, server requests whose ids never collide,
//! merged GET streams, DELETE, failures, tenants.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const BOT: &str = "bot-key-0123456789";
const GLOBEX: &str = "globex-key-0123456789";

fn policy_text(c_url: &str) -> String {
    format!(
        r#"
[[tenant]]
id = "acme"
[[tenant]]
id = "globex"

[[upstream]]
name = "a"
tenant = "acme"
[upstream.headers]
X-Upstream-Key = "key-of-a"

[[upstream]]
name = "b"
tenant = "acme"

[[upstream]]
name = "c"
url = "{c_url}"
tenant = "globex"
[upstream.headers]
X-Upstream-Key = "key-of-c"

[[agent]]
id = "bot"
tenant = "acme"
key_sha256 = "{bot}"
allow = ["a/echo", "a/slow_events", "a/ask", "b/*"]
deny = ["b/status"]

[agent.rate]
per_second = 1000
burst = 1000

[[agent]]
id = "globex-bot"
tenant = "globex"
key_sha256 = "{globex}"
allow = ["c/*"]
"#,
        bot = sha256_hex(BOT),
        globex = sha256_hex(GLOBEX),
    )
}

struct Setup {
    a: MockServer,
    b: MockServer,
    c: MockServer,
    gw: Running,
}

fn setup(extra: &[(&str, &str)]) -> Setup {
    let a = MockServer::start(MockConfig {
        page_size: 3,
        ..MockConfig::default()
    });
    let b = MockServer::start(MockConfig {
        sse: true,
        ..MockConfig::default()
    });
    let c = MockServer::start(MockConfig::default());
    let (mut g, _) = Gateway::open()
        .upstream("a", &a)
        .upstream("b", &b)
        .env(
            "SCOPEGATE_SESSION_SECRET",
            "test-secret-test-secret-test-secret!",
        )
        .policy(&policy_text(&c.url()));
    for (k, v) in extra {
        g = g.env(k, v);
    }
    Setup {
        gw: g.start(),
        a,
        b,
        c,
    }
}

fn post(c: &mut Client, key: &str, session: Option<&str>, body: &str) -> Response {
    let mut r = c
        .post("/mcp", body)
        .header("Authorization", &format!("Bearer {key}"));
    if let Some(s) = session {
        r = r.header("Mcp-Session-Id", s);
    }
    r.send()
}

/// The JSON-RPC response in a body that is JSON or an event stream.
fn message(r: &Response) -> Value {
    let text = r.text();
    if r.header("content-type")
        .is_some_and(|t| t.starts_with("text/event-stream"))
    {
        let last = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|v| v.get("result").is_some() || v.get("error").is_some());
        return last.unwrap_or_else(|| panic!("no response in {text:?}"));
    }
    r.json()
}

/// The first page of tools/list in open mode (no key), by name.
fn open_tool_names(c: &mut Client, token: &str) -> Vec<String> {
    let r = c
        .post("/mcp", r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#)
        .header("Mcp-Session-Id", token)
        .send();
    message(&r)["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

fn initialize(c: &mut Client, key: &str) -> String {
    let r = post(c, key, None, INIT);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["result"]["serverInfo"]["name"], "scopegate");
    let token = r.header("mcp-session-id").expect("session").to_owned();
    assert!(token.starts_with("sg2."), "{token}");
    let r = post(
        c,
        key,
        Some(&token),
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    );
    assert_eq!(r.status, 202);
    token
}

fn all_tools(c: &mut Client, key: &str, token: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0..10 {
        let body = match &cursor {
            Some(cur) => format!(
                r#"{{"jsonrpc":"2.0","id":{page},"method":"tools/list","params":{{"cursor":"{cur}"}}}}"#
            ),
            None => r#"{"jsonrpc":"2.0","id":0,"method":"tools/list"}"#.to_owned(),
        };
        let r = post(c, key, Some(token), &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = message(&r);
        for t in v["result"]["tools"].as_array().expect("tools") {
            names.push(t["name"].as_str().unwrap().to_owned());
        }
        match v["result"]["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return names,
        }
    }
    panic!("more pages than tools");
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn initialize_fans_out_and_lists_are_merged_filtered_prefixed_and_paged() {
    let s = setup(&[]);
    let mut c = s.gw.client();
    let token = initialize(&mut c, BOT);

    // Both of the agent's upstreams were initialized, each with its own credential; the other
    // tenant's upstream was not contacted.
    let inits = |m: &MockServer| {
        m.recorded()
            .into_iter()
            .filter(|r| r.json().is_some_and(|v| v["method"] == "initialize"))
            .collect::<Vec<_>>()
    };
    let a_init = inits(&s.a);
    assert_eq!(a_init.len(), 1);
    assert_eq!(a_init[0].header("x-upstream-key"), Some("key-of-a"));
    assert!(a_init[0].header("authorization").is_none());
    let b_init = inits(&s.b);
    assert_eq!(b_init.len(), 1);
    assert!(b_init[0].header("x-upstream-key").is_none());
    assert!(s.c.recorded().is_empty());

    // a pages by 3, b answers on an event stream: the merged list follows both.
    let names = all_tools(&mut c, BOT, &token);
    let expected = sorted(
        [
            "a__echo",
            "a__slow_events",
            "a__ask",
            "b__echo",
            "b__slow_events",
            "b__sse_raw",
            "b__close_delimited",
            "b__sleep",
            "b__big",
            "b__ask",
        ]
        .map(String::from)
        .to_vec(),
    );
    assert_eq!(sorted(names.clone()), expected);
    assert_eq!(names.len(), expected.len(), "no duplicates across pages");
    // a was asked for each of its pages with its own cursor, and with its own session.
    let a_lists: Vec<Value> =
        s.a.recorded()
            .into_iter()
            .filter_map(|r| r.json())
            .filter(|v| v["method"] == "tools/list")
            .collect();
    let cursors: Vec<Value> = a_lists
        .iter()
        .map(|v| v["params"]["cursor"].clone())
        .collect();
    assert_eq!(cursors, vec![Value::Null, json!("3"), json!("6")]);
    let sessions: Vec<String> =
        s.a.recorded()
            .into_iter()
            .filter(|r| r.json().is_some_and(|v| v["method"] == "tools/list"))
            .map(|r| r.header("mcp-session-id").unwrap_or("").to_owned())
            .collect();
    assert!(
        sessions.iter().all(|id| id.starts_with("mock-session-")),
        "{sessions:?}"
    );

    // A forged or another agent's cursor does not open other upstreams.
    let r = post(
        &mut c,
        BOT,
        Some(&token),
        r#"{"jsonrpc":"2.0","id":9,"method":"tools/list","params":{"cursor":"eyJjIjoiMCJ9"}}"#,
    );
    assert_eq!(message(&r)["result"]["tools"], json!([]));
    assert!(s.c.recorded().is_empty());
}

#[test]
fn calls_go_to_their_upstream_with_only_the_name_spliced() {
    let s = setup(&[]);
    let mut c = s.gw.client();
    let token = initialize(&mut c, BOT);
    // Odd spacing, a decoy "name" inside the arguments, unicode: all must arrive as sent.
    let body = r#"{ "jsonrpc" : "2.0", "id" : 7, "method":"tools/call", "params" : { "arguments" : {"name":"a__echo", "note":"h\u00e9 \"q\""} , "name" :  "a__echo" } }"#;
    let r = post(&mut c, BOT, Some(&token), body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = message(&r);
    assert_eq!(v["id"], 7);
    assert!(
        v["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("a__echo")
    );
    let calls: Vec<_> =
        s.a.recorded()
            .into_iter()
            .filter(|r| r.json().is_some_and(|v| v["method"] == "tools/call"))
            .collect();
    assert_eq!(calls.len(), 1);
    let expected = body.replacen(r#""name" :  "a__echo""#, r#""name" :  "echo""#, 1);
    assert_eq!(String::from_utf8_lossy(&calls[0].body), expected);
    assert_eq!(calls[0].header("x-upstream-key"), Some("key-of-a"));
    assert!(
        s.b.recorded()
            .iter()
            .all(|r| !r.json().is_some_and(|v| v["method"] == "tools/call"))
    );

    // b answers on an event stream; progress is relayed as it comes.
    let r = post(
        &mut c,
        BOT,
        Some(&token),
        &call(8, "b__slow_events", r#"{"count":2,"delay_ms":10}"#),
    );
    assert!(r.text().contains("notifications/progress"), "{}", r.text());
    assert_eq!(message(&r)["result"]["content"][0]["text"], "2 events");

    // Refusals never reach an upstream: denied, not allowed, another tenant's, unknown.
    let before = s.a.recorded().len() + s.b.recorded().len();
    for (name, rule) in [
        ("b__status", "deny \"b/status\""),
        ("a__sleep", "allow (no match)"),
        ("c__echo", "unknown tool"),
        ("zzz__echo", "unknown tool"),
        ("echo", "unknown tool"),
    ] {
        let r = post(&mut c, BOT, Some(&token), &call(9, name, "{}"));
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["error"]["code"], -32004, "{name}: {v}");
        assert_eq!(v["error"]["data"]["rule"], rule, "{name}");
    }
    assert_eq!(s.a.recorded().len() + s.b.recorded().len(), before);
    assert!(s.c.recorded().is_empty());
}

/// The other tenant's agent may use one upstream (c): on `/mcp` it gets that upstream as it is,
/// names unprefixed, whatever else the gateway serves; so adding upstreams it cannot use
/// changes nothing it sees.
#[test]
fn the_other_tenant_sees_only_its_upstream_under_its_own_names() {
    let s = setup(&[]);
    let mut c = s.gw.client();
    let r = post(&mut c, GLOBEX, None, INIT);
    assert_eq!(r.status, 200, "{}", r.text());
    // The upstream's own answer and a single-upstream session token.
    assert_ne!(
        r.json()["result"]["serverInfo"]["name"],
        "scopegate",
        "{}",
        r.text()
    );
    let token = r.header("mcp-session-id").expect("session").to_owned();
    assert!(token.starts_with("sg1."), "{token}");
    let names = all_tools(&mut c, GLOBEX, &token);
    assert!(!names.is_empty());
    assert!(names.iter().all(|n| !n.contains("__")), "{names:?}");
    assert!(names.contains(&"echo".to_owned()), "{names:?}");
    // Another upstream's prefixed name is just a name c does not have.
    let r = post(&mut c, GLOBEX, Some(&token), &call(3, "a__echo", "{}"));
    let v = message(&r);
    assert!(
        v["error"].is_object() || v["result"]["isError"] == true,
        "{v}"
    );
    let r = post(&mut c, GLOBEX, Some(&token), &call(4, "echo", r#"{"x":1}"#));
    assert!(message(&r)["result"].is_object(), "{}", r.text());
    let c_calls: Vec<_> = s.c.recorded();
    assert!(
        c_calls
            .iter()
            .all(|r| r.header("x-upstream-key") == Some("key-of-c"))
    );
    assert!(s.a.recorded().is_empty() && s.b.recorded().is_empty());
    // A session of one agent does not open for another, either way.
    let bot_token = initialize(&mut c, BOT);
    let r = post(&mut c, GLOBEX, Some(&bot_token), &call(5, "echo", "{}"));
    assert_eq!(r.status, 404);
    let r = post(&mut c, BOT, Some(&token), &call(6, "a__echo", "{}"));
    assert_eq!(r.status, 404, "{}", r.text());
}

#[test]
fn server_requests_of_two_upstreams_get_distinct_ids_and_answers_go_back() {
    let s = setup(&[]);
    let mut c = s.gw.client();
    let token = initialize(&mut c, BOT);
    for (up, mock) in [("a", &s.a), ("b", &s.b)] {
        // Both mocks ask with id 0; the agent sees ids that name the upstream.
        let mut stream = s.gw.client();
        stream
            .post("/mcp", &call(20, &format!("{up}__ask"), "{}"))
            .header("Authorization", &format!("Bearer {BOT}"))
            .header("Mcp-Session-Id", &token)
            .write();
        let (status, _) = stream.read_head();
        assert_eq!(status, 200);
        let text = stream.read_until("sampling/createMessage");
        let line = text
            .lines()
            .find(|l| l.contains("sampling/createMessage"))
            .unwrap();
        let v: Value = serde_json::from_str(line.trim_start_matches("data: ")).unwrap();
        let id = v["id"].as_str().expect("string id").to_owned();
        assert_eq!(id, format!("sg:{up}:0"));
        let answer = format!(
            r#"{{"jsonrpc":"2.0","id":"{id}","result":{{"role":"assistant","content":{{"type":"text","text":"from the agent to {up}"}},"model":"m"}}}}"#
        );
        let r = post(&mut c, BOT, Some(&token), &answer);
        assert_eq!(r.status, 202, "{}", r.text());
        let text = stream.read_until("\"id\":20");
        assert!(text.contains(&format!("from the agent to {up}")), "{text}");
        // The upstream got the original id back, on its own session.
        let got: Vec<_> = mock
            .recorded()
            .into_iter()
            .filter(|r| r.json().is_some_and(|v| v.get("result").is_some()))
            .collect();
        assert_eq!(got.len(), 1, "{up}");
        let v = got[0].json().unwrap();
        assert_eq!(v["id"], 0);
        assert!(
            got[0]
                .header("mcp-session-id")
                .is_some_and(|s| s.starts_with("mock-session-"))
        );
    }
    // A cancellation of a server request goes to the upstream that made it, with its own id.
    let r = post(
        &mut c,
        BOT,
        Some(&token),
        r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"sg:b:0","reason":"user"}}"#,
    );
    assert_eq!(r.status, 202);
    let cancels = |m: &MockServer| -> Vec<Value> {
        m.recorded()
            .into_iter()
            .filter_map(|r| r.json())
            .filter(|v| v["method"] == "notifications/cancelled")
            .collect()
    };
    assert!(eventually(Duration::from_secs(5), || cancels(&s.b).len() == 1));
    assert_eq!(cancels(&s.b)[0]["params"]["requestId"], 0);
    assert!(cancels(&s.a).is_empty());
    // The agent's own cancellations go to every upstream (only the one with the request acts).
    let r = post(
        &mut c,
        BOT,
        Some(&token),
        r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":77}}"#,
    );
    assert_eq!(r.status, 202);
    assert_eq!(cancels(&s.a).len(), 1);
    assert_eq!(cancels(&s.b).len(), 2);

    // An answer to a request nobody made is refused.
    let r = post(
        &mut c,
        BOT,
        Some(&token),
        r#"{"jsonrpc":"2.0","id":"sg:zzz:0","result":{}}"#,
    );
    assert_eq!(r.status, 400);
    let r = post(
        &mut c,
        BOT,
        Some(&token),
        r#"{"jsonrpc":"2.0","id":5,"result":{}}"#,
    );
    assert_eq!(r.status, 400);
}

#[test]
fn get_merges_the_upstreams_event_streams_and_delete_ends_every_session() {
    let s = setup(&[]);
    let mut c = s.gw.client();
    let token = initialize(&mut c, BOT);
    let mut stream = s.gw.client();
    stream
        .request("GET", "/mcp")
        .header("Authorization", &format!("Bearer {BOT}"))
        .header("Mcp-Session-Id", &token)
        .write();
    let (status, headers) = stream.read_head();
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("content-type")
                && v.starts_with("text/event-stream"))
    );
    // Each mock's GET stream opens with a comment and a list_changed notification.
    let text = stream.read_until_count("notifications/tools/list_changed", 2);
    assert_eq!(text.matches(": stream open").count(), 2, "{text}");
    for m in [&s.a, &s.b] {
        assert!(m.recorded().iter().any(|r| {
            r.method == "GET"
                && r.header("mcp-session-id")
                    .is_some_and(|s| s.starts_with("mock-session-"))
        }));
    }
    drop(stream);

    let r = c
        .request("DELETE", "/mcp")
        .header("Authorization", &format!("Bearer {BOT}"))
        .header("Mcp-Session-Id", &token)
        .send();
    assert_eq!(r.status, 200);
    for m in [&s.a, &s.b] {
        assert!(eventually(Duration::from_secs(5), || m
            .recorded()
            .iter()
            .any(|r| r.method == "DELETE")));
    }
}

#[test]
fn a_dead_upstream_loses_its_tools_the_other_keeps_serving_and_it_is_joined_when_back() {
    let a = MockServer::start(MockConfig::default());
    let port = dead_port();
    let gw = Gateway::open()
        .upstream("a", &a)
        .upstream_url("b", &format!("http://127.0.0.1:{port}/mcp"))
        .env("SCOPEGATE_UPSTREAM_TIMEOUT_MS", "2000")
        .start();
    let mut c = gw.client();
    let r = c.post("/mcp", INIT).send();
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("mcp-session-id").unwrap().to_owned();
    let list = |c: &mut Client| open_tool_names(c, &token);
    let names = list(&mut c);
    assert!(names.iter().all(|n| n.starts_with("a__")) && !names.is_empty());
    let r = c
        .post("/mcp", &call(3, "b__echo", "{}"))
        .header("Mcp-Session-Id", &token)
        .send();
    assert_eq!(
        r.status, 200,
        "one upstream's failure is a JSON-RPC error, not an HTTP one"
    );
    assert_eq!(r.json()["error"]["code"], -32001, "{}", r.text());
    let r = c
        .post("/mcp", &call(4, "a__echo", r#"{"ok":1}"#))
        .header("Mcp-Session-Id", &token)
        .send();
    assert!(message(&r)["result"].is_object());
    let metrics = c.request("GET", "/metrics").send().text();
    let failures: u64 = metrics
        .lines()
        .find(|l| l.starts_with("scopegate_aggregate_upstream_failures_total{upstream=\"b\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("failure counter");
    assert!(failures >= 2, "{metrics}");
    assert!(gw.log().contains("upstream \"b\" left out"));

    // b comes up: the same session joins it on first use.
    let b = MockServer::start_on(
        format!("127.0.0.1:{port}").parse().unwrap(),
        MockConfig::default(),
    );
    let names = list(&mut c);
    assert!(names.iter().any(|n| n == "b__echo"), "{names:?}");
    let r = c
        .post("/mcp", &call(5, "b__echo", r#"{"now":1}"#))
        .header("Mcp-Session-Id", &token)
        .send();
    assert!(message(&r)["result"].is_object(), "{}", r.text());
    let methods = b.methods();
    assert_eq!(
        methods.first().map(String::as_str),
        Some("initialize"),
        "{methods:?}"
    );
    assert_eq!(
        b.methods().iter().filter(|m| *m == "initialize").count(),
        1,
        "joined once, then remembered"
    );
    // What b advertised when it joined is remembered too: it offers no prompts, so it is not
    // asked for them (nor counted as failing).
    let r = c
        .post(
            "/mcp",
            r#"{"jsonrpc":"2.0","id":6,"method":"prompts/list"}"#,
        )
        .header("Mcp-Session-Id", &token)
        .send();
    assert!(message(&r)["result"]["prompts"].is_array(), "{}", r.text());
    assert!(
        !b.methods().iter().any(|m| m == "prompts/list"),
        "{:?}",
        b.methods()
    );
}

#[test]
fn fail_closed_fans_out_all_or_nothing() {
    let a = MockServer::start(MockConfig::default());
    let gw = Gateway::open()
        .upstream("a", &a)
        .upstream_url("b", &format!("http://127.0.0.1:{}/mcp", dead_port()))
        .env("SCOPEGATE_AGGREGATE_FAIL_CLOSED", "1")
        .start();
    let mut c = gw.client();
    let r = c.post("/mcp", INIT).send();
    let v = r.json();
    assert_eq!(v["error"]["code"], -32001, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("\"b\""));
}

#[test]
fn bad_separators_and_ambiguous_upstream_names_refuse_to_start() {
    let a = MockServer::start(MockConfig::default());
    let (code, err) = Gateway::open()
        .upstream("a", &a)
        .upstream("b", &a)
        .env("SCOPEGATE_NAME_SEPARATOR", "/")
        .run_to_exit();
    assert_eq!(code, 2);
    assert!(err.contains("SCOPEGATE_NAME_SEPARATOR"), "{err}");
    let (code, err) = Gateway::open()
        .upstream("a__x", &a)
        .upstream("b", &a)
        .run_to_exit();
    assert_eq!(code, 2);
    assert!(err.contains("\"a__x\""), "{err}");
    // Another separator makes the same names fine.
    let gw = Gateway::open()
        .upstream("a__x", &a)
        .upstream("b", &a)
        .env("SCOPEGATE_NAME_SEPARATOR", "--")
        .start();
    let mut c = gw.client();
    let r = c.post("/mcp", INIT).send();
    let token = r.header("mcp-session-id").unwrap().to_owned();
    let r = c
        .post("/mcp", &call(2, "a__x--echo", r#"{"k":2}"#))
        .header("Mcp-Session-Id", &token)
        .send();
    assert!(message(&r)["result"].is_object(), "{}", r.text());
}

#[test]
fn single_upstream_mcp_stays_a_pass_through() {
    let a = MockServer::start(MockConfig::default());
    let gw = Gateway::open().upstream("a", &a).start();
    let mut c = gw.client();
    let r = c.post("/mcp", INIT).send();
    assert_eq!(r.json()["result"]["serverInfo"]["name"], "sg-mock");
    assert_eq!(r.header("mcp-session-id"), Some("mock-session-0"));
}

#[test]
fn names_past_128_characters_are_cut_and_still_callable() {
    let long = format!("tool_{}", "x".repeat(140));
    let a = MockServer::start(MockConfig {
        extra_tool: Some(long.clone()),
        ..MockConfig::default()
    });
    let b = MockServer::start(MockConfig::default());
    let gw = Gateway::open().upstream("a", &a).upstream("b", &b).start();
    let mut c = gw.client();
    let r = c.post("/mcp", INIT).send();
    let token = r.header("mcp-session-id").unwrap().to_owned();
    let names = open_tool_names(&mut c, &token);
    let cut = names
        .iter()
        .find(|n| n.starts_with("a__tool_"))
        .expect("the long tool is listed")
        .clone();
    assert_eq!(cut.len(), 128);
    assert!(names.iter().all(|n| n.len() <= 128));
    let r = c
        .post("/mcp", &call(3, &cut, r#"{"long":true}"#))
        .header("Mcp-Session-Id", &token)
        .send();
    assert!(message(&r)["result"].is_object(), "{}", r.text());
    let called: Vec<Value> = a
        .recorded()
        .into_iter()
        .filter_map(|r| r.json())
        .filter(|v| v["method"] == "tools/call")
        .collect();
    assert_eq!(called.len(), 1);
    assert_eq!(called[0]["params"]["name"], long.as_str());
}

#[test]
fn a_slow_upstream_is_left_out_after_the_fan_out_timeout() {
    let a = MockServer::start(MockConfig::default());
    // Accepts connections (the kernel's backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let gw = Gateway::open()
        .upstream("a", &a)
        .upstream_url("slow", &format!("http://127.0.0.1:{port}/mcp"))
        .env("SCOPEGATE_AGGREGATE_TIMEOUT_MS", "300")
        .start();
    let mut c = gw.client();
    // Without the fan-out timeout these would wait for SCOPEGATE_UPSTREAM_TIMEOUT_MS (30 s),
    // past the test client's 15 s read timeout.
    let r = c.post("/mcp", INIT).send();
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("mcp-session-id").unwrap().to_owned();
    let names = open_tool_names(&mut c, &token);
    assert!(
        !names.is_empty() && names.iter().all(|n| n.starts_with("a__")),
        "{names:?}"
    );
    assert!(
        gw.log().contains("upstream \"slow\" left out"),
        "{}",
        gw.log()
    );
    drop(silent);
}

#[test]
fn prompts_resources_and_completions_are_routed_with_their_names_spliced() {
    let s = setup(&[]);
    let mut c = s.gw.client();
    let token = initialize(&mut c, BOT);
    let sent = [
        (
            &s.a,
            r#"{"jsonrpc":"2.0","id":31,"method":"resources/read","params":{"uri":"scopegate://a/file:///srv/notes.txt"}}"#,
            r#"{"jsonrpc":"2.0","id":31,"method":"resources/read","params":{"uri":"file:///srv/notes.txt"}}"#,
        ),
        (
            &s.b,
            r#"{"jsonrpc":"2.0","id":32,"method":"prompts/get","params":{"name":"b__greet","arguments":{"who":"b__greet"}}}"#,
            r#"{"jsonrpc":"2.0","id":32,"method":"prompts/get","params":{"name":"greet","arguments":{"who":"b__greet"}}}"#,
        ),
        (
            &s.a,
            r#"{"jsonrpc":"2.0","id":33,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"a__greet"},"argument":{"name":"who","value":"a"}}}"#,
            r#"{"jsonrpc":"2.0","id":33,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"greet"},"argument":{"name":"who","value":"a"}}}"#,
        ),
        (
            &s.b,
            r#"{"jsonrpc":"2.0","id":34,"method":"resources/subscribe","params":{"uri":"scopegate://b/db://orders"}}"#,
            r#"{"jsonrpc":"2.0","id":34,"method":"resources/subscribe","params":{"uri":"db://orders"}}"#,
        ),
    ];
    for (mock, body, expected) in sent {
        let r = post(&mut c, BOT, Some(&token), body);
        assert_eq!(r.status, 200, "{}", r.text());
        // The mock has no such methods: its JSON-RPC error comes back, relayed.
        assert!(message(&r)["error"].is_object(), "{}", r.text());
        let got = mock
            .recorded()
            .into_iter()
            .rev()
            .find(|r| {
                r.method == "POST"
                    && r.json()
                        .is_some_and(|v| v.get("id").is_some() && v["method"] != "initialize")
            })
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&got.body), expected);
    }
    // A resource of another tenant's upstream, or of no upstream, is unknown.
    for uri in ["scopegate://c/file:///x", "file:///x", "scopegate://zzz/x"] {
        let r = post(
            &mut c,
            BOT,
            Some(&token),
            &format!(
                r#"{{"jsonrpc":"2.0","id":35,"method":"resources/read","params":{{"uri":"{uri}"}}}}"#
            ),
        );
        assert_eq!(
            r.json()["error"]["data"]["rule"],
            "unknown resource",
            "{uri}"
        );
    }
    assert!(s.c.recorded().is_empty());
}

#[test]
fn requests_answered_from_several_upstreams_count_against_the_agent_bucket() {
    let a = MockServer::start(MockConfig::default());
    let b = MockServer::start(MockConfig::default());
    let policy = format!(
        r#"
[[upstream]]
name = "a"
[[upstream]]
name = "b"

[[agent]]
id = "bot"
key_sha256 = "{}"
allow = ["a/*", "b/*"]
rate = {{ per_minute = 3, burst = 3 }}
"#,
        sha256_hex(BOT)
    );
    let (g, _) = Gateway::open()
        .upstream("a", &a)
        .upstream("b", &b)
        .policy(&policy);
    let gw = g.start();
    let mut c = gw.client();
    let token = initialize(&mut c, BOT); // 1 (the notification is not limited)
    let list = r#"{"jsonrpc":"2.0","id":5,"method":"tools/list"}"#;
    for _ in 0..2 {
        let r = post(&mut c, BOT, Some(&token), list); // 2, 3
        assert!(message(&r)["result"]["tools"].is_array(), "{}", r.text());
    }
    let lists_before = a.methods().iter().filter(|m| *m == "tools/list").count();
    let r = post(&mut c, BOT, Some(&token), list);
    let v = r.json();
    assert_eq!(v["error"]["code"], -32007, "{v}");
    assert!(
        v["error"]["data"]["limit"]
            .as_str()
            .unwrap()
            .contains("bot")
    );
    assert_eq!(
        a.methods().iter().filter(|m| *m == "tools/list").count(),
        lists_before,
        "a limited list reached an upstream"
    );
}

#[test]
fn ping_is_answered_here_and_set_level_reaches_every_upstream() {
    let s = setup(&[]);
    let mut c = s.gw.client();
    let token = initialize(&mut c, BOT);
    let r = post(
        &mut c,
        BOT,
        Some(&token),
        r#"{"jsonrpc":"2.0","id":"p1","method":"ping"}"#,
    );
    assert_eq!(r.json(), json!({"jsonrpc":"2.0","id":"p1","result":{}}));
    let r = post(
        &mut c,
        BOT,
        Some(&token),
        r#"{"jsonrpc":"2.0","id":7,"method":"logging/setLevel","params":{"level":"debug"}}"#,
    );
    assert_eq!(r.json()["result"], json!({}));
    for m in [&s.a, &s.b] {
        let methods = m.methods();
        assert!(!methods.iter().any(|x| x == "ping"), "{methods:?}");
        assert!(
            methods.iter().any(|x| x == "logging/setLevel"),
            "{methods:?}"
        );
    }
}

/// Issue 16, names that do not move: the operator adds upstreams the agent cannot use (a gateway
/// with c alone, then with a, b and c) and the agent's tool names on `/mcp` stay the same.
#[test]
fn adding_upstreams_an_agent_cannot_use_leaves_its_names_alone() {
    let s = setup(&[]);
    let alone = Gateway::open()
        .env(
            "SCOPEGATE_SESSION_SECRET",
            "test-secret-test-secret-test-secret!",
        )
        .policy(&format!(
            r#"
[[upstream]]
name = "c"
url = "{}"

[[agent]]
id = "globex-bot"
key_sha256 = "{}"
allow = ["c/*"]
"#,
            s.c.url(),
            sha256_hex(GLOBEX)
        ))
        .0
        .start();
    let names_of = |gw: &Running| {
        let mut c = gw.client();
        let r = post(&mut c, GLOBEX, None, INIT);
        let token = r.header("mcp-session-id").expect("session").to_owned();
        let mut names = all_tools(&mut c, GLOBEX, &token);
        names.sort();
        names
    };
    let before = names_of(&alone);
    assert!(before.contains(&"echo".to_owned()), "{before:?}");
    assert_eq!(names_of(&s.gw), before);
}

/// Issue 16, upstreams without every capability: the mocks advertise tools (and logging) only,
/// so prompts and resources lists do not ask them, warn nothing, count no failure, and even
/// fail-closed answers them (empty).
#[test]
fn upstreams_are_asked_only_for_what_they_advertised() {
    let s = setup(&[("SCOPEGATE_AGGREGATE_FAIL_CLOSED", "1")]);
    let mut c = s.gw.client();
    let token = initialize(&mut c, BOT);
    for (id, method, field) in [
        (1, "prompts/list", "prompts"),
        (2, "resources/list", "resources"),
        (3, "resources/templates/list", "resourceTemplates"),
    ] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}"}}"#);
        let r = post(&mut c, BOT, Some(&token), &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = message(&r);
        assert_eq!(v["result"][field], serde_json::json!([]), "{v}");
    }
    // Tools are still asked of both.
    assert!(!all_tools(&mut c, BOT, &token).is_empty());
    for mock in [&s.a, &s.b] {
        let methods = mock.methods();
        assert!(methods.contains(&"tools/list".to_owned()), "{methods:?}");
        assert!(
            !methods
                .iter()
                .any(|m| m.starts_with("prompts/") || m.starts_with("resources/")),
            "{methods:?}"
        );
    }
    assert!(!s.gw.log().contains("left out"), "{}", s.gw.log());
    let metrics = c.request("GET", "/metrics").send().text();
    for up in ["a", "b"] {
        let line = format!("scopegate_aggregate_upstream_failures_total{{upstream=\"{up}\"}} ");
        let failures = metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .unwrap_or("0");
        assert_eq!(failures, "0", "{metrics}");
    }
}

/// Issue 16, an expired upstream session: upstream a forgets its sessions mid-session (404);
/// the next call and list through the aggregate session re-initialize a and go on, and b's
/// session is untouched.
#[test]
fn an_expired_upstream_session_is_joined_again_inside_the_aggregate_session() {
    let s = setup(&[]);
    let mut c = s.gw.client();
    let token = initialize(&mut c, BOT);
    let r = post(&mut c, BOT, Some(&token), &call(1, "a__echo", r#"{"n":1}"#));
    assert!(message(&r)["result"].is_object(), "{}", r.text());
    let inits = |m: &MockServer| m.methods().iter().filter(|x| *x == "initialize").count();
    assert_eq!((inits(&s.a), inits(&s.b)), (1, 1));
    s.a.expire_sessions();
    let r = post(&mut c, BOT, Some(&token), &call(2, "a__echo", r#"{"n":2}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(message(&r)["result"].is_object(), "{}", r.text());
    assert_eq!(
        (inits(&s.a), inits(&s.b)),
        (2, 1),
        "a joined again, b left alone"
    );
    // Lists and calls go on on the new session.
    let names = all_tools(&mut c, BOT, &token);
    assert!(names.contains(&"a__echo".to_owned()), "{names:?}");
    let r = post(&mut c, BOT, Some(&token), &call(3, "a__echo", r#"{"n":3}"#));
    assert!(message(&r)["result"].is_object(), "{}", r.text());
    assert_eq!(inits(&s.a), 2);
    // Lists meet an expiry the same way.
    s.a.expire_sessions();
    let names = all_tools(&mut c, BOT, &token);
    assert!(names.contains(&"a__echo".to_owned()), "{names:?}");
    assert_eq!(inits(&s.a), 3);
    // And so does the GET stream: a's is opened on a new session, merged with b's.
    s.a.expire_sessions();
    let mut stream = s.gw.client();
    stream
        .request("GET", "/mcp")
        .header("Authorization", &format!("Bearer {BOT}"))
        .header("Mcp-Session-Id", &token)
        .write();
    let (status, _) = stream.read_head();
    assert_eq!(status, 200);
    let text = stream.read_until_count("notifications/tools/list_changed", 2);
    assert_eq!(text.matches(": stream open").count(), 2, "{text}");
    assert_eq!(inits(&s.a), 4);
}

#[test]
fn tasks_of_every_upstream_are_listed_page_by_page_and_reached_by_their_mapped_ids() {
    let s = setup(&[]);
    let mut c = s.gw.client();
    let token = initialize(&mut c, BOT);
    // a pages its five tasks by 3, b answers all five at once: the merged list follows both.
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let params = match &cursor {
            Some(c) => json!({ "cursor": c }),
            None => json!({}),
        };
        let body = json!({"jsonrpc": "2.0", "id": 4, "method": "tasks/list", "params": params});
        let result = message(&post(&mut c, BOT, Some(&token), &body.to_string()))["result"].clone();
        for t in result["tasks"].as_array().unwrap() {
            ids.push(t["taskId"].as_str().unwrap().to_owned());
        }
        cursor = result["nextCursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    // Ten ids, five of each upstream, none twice; each bound to its upstream and this agent.
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 10, "{ids:?}");
    for up in ["a", "b"] {
        let prefix = format!("sgt:{up}:");
        assert_eq!(ids.iter().filter(|i| i.starts_with(&prefix)).count(), 5);
    }
    // A mapped id reaches the upstream that made it, with its own id.
    let t4 = ids
        .iter()
        .find(|i| i.starts_with("sgt:a:") && i.ends_with(":\"t4\""))
        .unwrap()
        .clone();
    let body = json!({"jsonrpc": "2.0", "id": 5, "method": "tasks/get", "params": {"taskId": t4}});
    let got = message(&post(&mut c, BOT, Some(&token), &body.to_string()));
    assert_eq!(got["result"]["taskId"], t4.as_str());
    let asked: Vec<Value> =
        s.a.recorded()
            .into_iter()
            .filter_map(|r| r.json())
            .filter(|v| v["method"] == "tasks/get")
            .collect();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0]["params"]["taskId"], "t4");
    // An id whose tag was not made for this agent reaches nothing.
    let forged = format!("sgt:a:AAAAAAAAAAAAAAAA:{}", "\"t4\"");
    let body =
        json!({"jsonrpc": "2.0", "id": 7, "method": "tasks/get", "params": {"taskId": forged}});
    assert!(message(&post(&mut c, BOT, Some(&token), &body.to_string()))["error"].is_object());
    assert_eq!(
        s.a.methods().iter().filter(|m| *m == "tasks/get").count(),
        1
    );
    // The other tenant's upstream is neither listed nor reachable.
    let body = r#"{"jsonrpc":"2.0","id":6,"method":"tasks/get","params":{"taskId":"sgt:c:AAAAAAAAAAAAAAAA:\"t0\""}}"#;
    assert!(message(&post(&mut c, BOT, Some(&token), body))["error"].is_object());
    assert!(s.c.recorded().is_empty());
}
