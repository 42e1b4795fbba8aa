//! Session tokens: sealing one (initialize answers) and opening one (every later request of a
//! connection's first use of a token; later requests on the connection hit its cache).

use criterion::{Criterion, criterion_group, criterion_main};
use scopegate::mcp::session::SessionKeys;

fn bench(c: &mut Criterion) {
    let keys = SessionKeys::new(Some(b"bench-secret-bench-secret-bench-secret")).expect("keys");
    let upstream_session = b"1868a90c-7f1c-4b9e-9c1e-5a8f3f7a2b61";
    c.bench_function("session/seal", |b| {
        b.iter(|| {
            keys.seal(
                "triage-bot",
                "github",
                std::hint::black_box(upstream_session),
            )
        })
    });
    let token = keys
        .seal("triage-bot", "github", upstream_session)
        .expect("seal");
    let mut scratch = Vec::new();
    c.bench_function("session/open", |b| {
        b.iter(|| {
            let s = keys
                .open_in(std::hint::black_box(token.as_bytes()), &mut scratch)
                .expect("opens");
            std::hint::black_box(s.upstream_session.len())
        })
    });
    let multi = keys
        .seal_multi(
            "triage-bot",
            &[
                ("github".into(), upstream_session.to_vec()),
                ("jira".into(), upstream_session.to_vec()),
            ],
            &[0x81, 0x87],
        )
        .expect("seal");
    c.bench_function("session/open_aggregate_2_upstreams", |b| {
        b.iter(|| keys.open_multi(std::hint::black_box(multi.as_bytes())))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
