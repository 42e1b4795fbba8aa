//! Envelope extraction for tools/call bodies of 200 B, 2 KiB and 64 KiB.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use scopegate::mcp::envelope::EnvelopeParser;

/// A tools/call body of about `size` bytes: realistic arguments plus one padded string.
fn tools_call(size: usize) -> Vec<u8> {
    let head = r#"{"jsonrpc":"2.0","id":4711,"method":"tools/call","params":{"name":"create_issue","arguments":{"repo":"acme/web","title":"Crash on start","labels":["bug","p1"],"body":""#;
    let tail = r#""},"_meta":{"progressToken":"pt-4711"}}}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(head.as_bytes());
    body.extend(std::iter::repeat_n(b'x', pad));
    body.extend_from_slice(tail.as_bytes());
    body
}

fn envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    for size in [200usize, 2 * 1024, 64 * 1024] {
        let body = tools_call(size);
        let mut parser = EnvelopeParser::new();
        // Sanity: the bench measures a successful parse.
        {
            let env = parser.parse(&body).expect("valid body");
            assert_eq!(env.single().and_then(|m| m.name), Some("create_issue"));
        }
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("tools_call", body.len()),
            &body,
            |b, body| {
                b.iter(|| {
                    let env = parser
                        .parse(std::hint::black_box(body))
                        .expect("valid body");
                    std::hint::black_box(env.single().map(|m| (m.name, m.id, m.arguments)));
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, envelope);
criterion_main!(benches);
