//! The load generator (`loadtest/`) against the real binary: it speaks MCP (sessions, keys),
//! classifies every answer, and holds idle connections and event streams.

mod support;

use std::time::Duration;

use scopegate_loadtest::load::{self, Kind, LoadConfig};
use support::*;

const KEY: &str = "load-key-0123456789";

fn policy() -> String {
    format!(
        r#"
[[upstream]]
name = "m"

[[agent]]
id = "loader"
key_sha256 = "{}"
allow = ["m/echo", "m/sleep"]
deny = ["m/big"]

[[agent.tool]]
match = "m/sleep"
rate = {{ per_minute = 1, burst = 1 }}
"#,
        sha256_hex(KEY)
    )
}

fn config(gw: &Running, mix: &str) -> LoadConfig {
    let url = format!("http://{}/mcp", gw.addr);
    let (addr, host, path) = LoadConfig::parse_url(&url).unwrap();
    LoadConfig {
        addr,
        host,
        path,
        keys: vec![KEY.into()],
        connections: 4,
        threads: 1,
        duration: Duration::from_millis(800),
        warmup: Duration::ZERO,
        rate: None,
        mix: LoadConfig::parse_mix(mix).unwrap(),
        tool: "echo".into(),
        refused_tool: "big".into(),
        limited_tool: "sleep".into(),
        args: r#"{"ms":1}"#.into(),
        sessions: true,
        timeout: Duration::from_secs(5),
        tls: None,
    }
}

#[test]
fn a_mixed_load_is_classified_by_what_came_back() {
    let up = MockServer::start(MockConfig::default());
    let (g, _) = Gateway::open().upstream("m", &up).policy(&policy());
    let gw = g.start();
    let report = load::run(&config(&gw, "call=6,refused=1,limited=1,list=1,notify=1"));
    let count = |kind: Kind, outcome: &str| {
        report
            .outcomes
            .get(&(kind, outcome.to_string()))
            .copied()
            .unwrap_or(0)
    };
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        report.sessions, 4,
        "each virtual agent initialized its session"
    );
    assert!(count(Kind::Call, "ok") > 0, "{}", report.to_text());
    assert!(count(Kind::Refused, "refused") > 0, "{}", report.to_text());
    assert!(count(Kind::List, "ok") > 0, "{}", report.to_text());
    assert!(count(Kind::Notify, "accepted") > 0, "{}", report.to_text());
    // One sleep call per minute is allowed: at most one got through, the rest were limited.
    assert!(count(Kind::Limited, "ok") <= 1, "{}", report.to_text());
    assert!(
        count(Kind::Limited, "rate_limited") > 0,
        "{}",
        report.to_text()
    );
    // Every answer was counted exactly once, and the refused calls never reached the upstream.
    let total: u64 = report.outcomes.values().sum();
    assert_eq!(total, report.requests());
    assert!(
        up.recorded()
            .iter()
            .filter_map(|r| r.json())
            .all(|v| v["params"]["name"] != "big")
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["requests"], report.requests());
    assert!(
        json["latency_us"]["p99"].as_u64().unwrap() >= json["latency_us"]["p50"].as_u64().unwrap()
    );
}

#[test]
fn open_loop_runs_at_a_fixed_rate_and_streams_are_held() {
    let up = MockServer::start(MockConfig::default());
    let (g, _) = Gateway::open().upstream("m", &up).policy(&policy());
    let gw = g.start();
    let mut c = config(&gw, "call=1");
    c.rate = Some(200.0);
    let report = load::run(&c);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.requests() > 0);
    // Event streams: each initializes a session and opens the GET stream through scopegate.
    let held = load::hold_streams(&config(&gw, "call=1"), 5, Duration::from_millis(200));
    assert_eq!(held, 5);
    assert_eq!(
        up.recorded().iter().filter(|r| r.method == "GET").count(),
        5
    );
}
