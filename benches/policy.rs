//! Authenticating a key and deciding a tools/call with three argument constraints (the shared
//! example policy's triage-bot calling github/create_issue: repo one_of, title max_len,
//! labels max_len).

use std::collections::HashMap;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use scopegate::auth::agent_for_key;
use scopegate::mcp::envelope::EnvelopeParser;
use scopegate::policy::Policy;
use scopegate::policy::decide::authorize_call;

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
}

criterion_group!(benches, bench);
criterion_main!(benches);
