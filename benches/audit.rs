//! The cost of recording one audit entry on the request path: encoding it (timestamp, names,
//! message fragment) and pushing it into the worker's ring, while a consumer thread drains the
//! ring as the writer does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use scopegate::audit::chain::chain_line;
use scopegate::audit::entry::{
    Decision, Entry, encode, encode_message, identity_fragment, upstream_fragment,
};
use scopegate::audit::ring::ByteRing;
use scopegate::mcp::envelope::EnvelopeParser;

/// A typical allowed tools/call entry.
fn sample_entry<'a>(identity: &'a [u8], upstream: &'a [u8], fragment: &'a [u8]) -> Entry<'a> {
    Entry {
        time: SystemTime::now(),
        worker: 0,
        http_method: b"POST",
        identity,
        upstream,
        session: Some("0123456789abcdef"),
        message: fragment,
        decision: Decision::Allowed,
        reason: None,
        status: 200,
        upstream_us: Some(310),
        total_us: 420,
        bytes_in: 412,
        bytes_out: 236,
        is_error: Some(false),
        trace: None,
    }
}

fn bench(c: &mut Criterion) {
    let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"create_issue","arguments":{"repo":"acme/web","title":"Crash on start","labels":["bug","p1"]}}}"#;
    let mut parser = EnvelopeParser::new();
    let env = parser.parse(body).expect("valid");
    let m = *env.single().expect("one");
    let mut fragment = Vec::new();
    encode_message(
        &m,
        env.arguments(&m),
        &[],
        4096,
        &mut Vec::new(),
        &mut fragment,
    );

    // Made once per agent and upstream when the policy loads.
    let identity = identity_fragment("triage-bot", Some("acme"), Some("alice@acme.example"));
    let upstream = upstream_fragment("github");
    let ring = Arc::new(ByteRing::new(4 << 20));
    let mut buf = Vec::with_capacity(1024);
    // What the request path does: encode, push. The ring is drained between timed stretches
    // (the writer thread's work is off the request path).
    c.bench_function("audit/record_entry", |b| {
        b.iter_custom(|iters| {
            let mut timed = std::time::Duration::ZERO;
            let mut start = Instant::now();
            for _ in 0..iters {
                let entry = sample_entry(&identity, &upstream, &fragment);
                buf.clear();
                encode(&entry, &mut buf);
                if !ring.try_push(&buf) {
                    timed += start.elapsed();
                    ring.drain(|r| {
                        std::hint::black_box(r);
                    });
                    start = Instant::now();
                    assert!(ring.try_push(&buf));
                }
            }
            timed + start.elapsed()
        })
    });
    // The same with a writer thread draining concurrently on the other core (cache lines of
    // the ring move between cores; on 2 cores the bench itself competes with it).
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (ring, stop) = (ring.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                ring.drain(|r| {
                    std::hint::black_box(r);
                });
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    c.bench_function("audit/record_entry_with_writer_draining", |b| {
        b.iter(|| {
            buf.clear();
            let entry = sample_entry(&identity, &upstream, &fragment);
            encode(&entry, &mut buf);
            while !ring.try_push(&buf) {
                std::hint::spin_loop();
            }
        })
    });
    c.bench_function("audit/encode_message_fragment", |b| {
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        b.iter(|| {
            out.clear();
            encode_message(&m, env.arguments(&m), &[], 4096, &mut scratch, &mut out);
            std::hint::black_box(&out);
        })
    });
    stop.store(true, Ordering::Relaxed);
    let _ = consumer.join();

    // The writer thread's work per line (off the request path, on the worker's core): append
    // seq and the previous line's hash, and hash the finished line for the next.
    let entry = sample_entry(&identity, &upstream, &fragment);
    buf.clear();
    encode(&entry, &mut buf);
    c.bench_function("audit/writer_chain_line", |b| {
        let mut batch = Vec::with_capacity(1 << 20);
        let mut prev = [0u8; 32];
        let mut seq = 0;
        b.iter(|| {
            if batch.len() > (1 << 20) - 1024 {
                batch.clear();
            }
            seq += 1;
            prev = chain_line(&mut batch, &buf, seq, &prev);
        })
    });
    c.bench_function("audit/sha256_line", |b| {
        b.iter(|| std::hint::black_box(scopegate::audit::chain::sha256(std::hint::black_box(&buf))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
