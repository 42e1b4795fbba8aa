//! Authenticating a key and deciding a tools/call with three argument constraints (the shared
//! example policy's triage-bot calling github/create_issue: repo one_of, title max_len,
//! labels max_len). The same decision with tool integrity on (the verdict looked up), and what
//! integrity costs when a list is seen (a known definition: digest and lookup; a new one: the
//! scan too).

use std::collections::HashMap;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use scopegate::auth::agent_for_key;
use scopegate::integrity::Kind;
use scopegate::integrity::pins::Pins;
use scopegate::mcp::envelope::EnvelopeParser;
use scopegate::mcp::lists::ListKind;
use scopegate::policy::Policy;
use scopegate::policy::decide::{Target, authorize, authorize_call};

fn policy() -> Policy {
    let env = HashMap::from([("GITHUB_TOKEN".to_string(), "bench".to_string())]);
    let text = include_str!("../examples/policy.toml");
    Policy::parse(Path::new("policy.toml"), text, &[], &env).expect("example policy")
}

fn bench(c: &mut Criterion) {
    let p = policy();
    let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"create_issue","arguments":{"repo":"acme/web","title":"Crash on start","labels":["bug","p1"]}}}"#;
    let mut parser = EnvelopeParser::new();
    let env = parser.parse(body).expect("valid body");
    let message = *env.single().expect("one message");
    let args = env.arguments(&message);
    let github = 0;

    c.bench_function("policy/authenticate_key", |b| {
        b.iter(|| agent_for_key(&p, std::hint::black_box(b"password")).expect("known key"))
    });
    c.bench_function("policy/decide_create_issue_3_constraints", |b| {
        let agent = agent_for_key(&p, b"password").expect("known key");
        b.iter(|| {
            let d = authorize_call(
                &p,
                agent,
                github,
                std::hint::black_box("create_issue"),
                args,
            );
            assert!(d.is_allowed());
        })
    });
    c.bench_function("policy/authenticate_and_decide", |b| {
        b.iter(|| {
            let agent = agent_for_key(&p, std::hint::black_box(b"password")).expect("known key");
            let d = authorize_call(
                &p,
                agent,
                github,
                std::hint::black_box("create_issue"),
                args,
            );
            assert!(d.is_allowed());
        })
    });
    // Tool integrity: the same call through `authorize` (rules, then the verdict), off and on.
    let tool = serde_json::json!({
        "name": "create_issue",
        "description": "Create an issue in a repository.",
        "inputSchema": { "type": "object", "properties": {
            "repo": { "type": "string" }, "title": { "type": "string" },
            "labels": { "type": "array", "items": { "type": "string" } } } }
    });
    let mut on = policy();
    let mut pins = Pins::default();
    pins.set(
        "github",
        Kind::Tool,
        "create_issue",
        &scopegate::integrity::definition(&tool),
    );
    on.integrity.set_pins(pins);
    assert!(on.integrity.vet(github, ListKind::Tools, &mut tool.clone()));
    let agent = agent_for_key(&p, b"password").expect("known key");
    let target = Target::Tool {
        name: "create_issue",
        arguments: args,
    };
    c.bench_function("policy/authorize_call_integrity_off", |b| {
        b.iter(|| assert!(authorize(&p, agent, github, std::hint::black_box(&target)).is_allowed()))
    });
    c.bench_function("policy/authorize_call_integrity_on", |b| {
        b.iter(|| {
            assert!(authorize(&on, agent, github, std::hint::black_box(&target)).is_allowed())
        })
    });
    c.bench_function("integrity/vet_listed_tool_known", |b| {
        b.iter(|| {
            let mut item = tool.clone();
            assert!(
                on.integrity
                    .vet(github, ListKind::Tools, std::hint::black_box(&mut item))
            )
        })
    });
    c.bench_function("integrity/scan_definition", |b| {
        let def = scopegate::integrity::definition(&tool);
        b.iter(|| scopegate::integrity::scan::scan(std::hint::black_box(&def), 4096))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
