//! Rate-limit checks: one bucket uncontended, one token from a fleet-wide limit's lease, one bucket with a second thread hammering it,
//! and a tools/call admitted through all four kinds of bucket (tool rule, agent, tenant,
//! upstream) of a loaded policy.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use scopegate::policy::Policy;
use scopegate::ratelimit::{Bucket, Gcra, Local, Rate, now_ns};

fn fast_bucket() -> Bucket {
    // A rate high enough that the bench never runs the bucket dry.
    let rate = Rate {
        per_second: 1e9,
        burst: u64::MAX / 4,
        text: "bench".into(),
    };
    Bucket::new(
        Gcra::new(rate.per_second, rate.burst),
        "bench".into(),
        "bench".into(),
    )
}

fn bench(c: &mut Criterion) {
    let b = fast_bucket();
    let mut now = now_ns();
    c.bench_function("ratelimit/uncontended_check", |bench| {
        bench.iter(|| {
            now += 1;
            std::hint::black_box(b.try_take(std::hint::black_box(now))).ok();
        })
    });
    c.bench_function("ratelimit/uncontended_check_with_clock", |bench| {
        bench.iter(|| std::hint::black_box(b.try_take(now_ns())).ok())
    });

    // A fleet-wide limit's call path: a token from the bucket's lease (the refill it asks for
    // now and then is Redis's business, off this path).
    let lease = scopegate::ratelimit::lease::Lease::default();
    let start = now_ns();
    lease.put(u64::MAX / 4, start, 1000, 1);
    c.bench_function("ratelimit/leased_take", |bench| {
        bench.iter(|| std::hint::black_box(lease.take()))
    });

    // Two threads on one bucket: this thread is measured while another takes in a loop.
    let shared = Arc::new(fast_bucket());
    c.bench_function("ratelimit/two_threads_one_bucket", |bench| {
        bench.iter_custom(|iters| {
            let stop = Arc::new(AtomicBool::new(false));
            let other = {
                let (shared, stop) = (shared.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = shared.try_take(now_ns());
                    }
                })
            };
            let start = Instant::now();
            for _ in 0..iters {
                let _ = std::hint::black_box(shared.try_take(now_ns()));
            }
            let elapsed = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            let _ = other.join();
            elapsed
        })
    });

    let text = r#"
[[tenant]]
id = "t"
rate = { per_second = 1000000000, burst = 1000000000 }
[[upstream]]
name = "gh"
url = "http://127.0.0.1:9/mcp"
tenant = "t"
rate = { per_second = 1000000000, burst = 1000000000 }
[[agent]]
id = "a"
tenant = "t"
key_sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
allow = ["gh/*"]
rate = { per_second = 1000000000, burst = 1000000000 }
[[agent.tool]]
match = "gh/create_issue"
rate = { per_second = 1000000000, burst = 1000000000 }
"#;
    let policy = Policy::parse(
        Path::new("bench.toml"),
        text,
        &[],
        &HashMap::<String, String>::new(),
    )
    .expect("policy");
    c.bench_function("ratelimit/admit_tools_call_4_buckets", |bench| {
        bench.iter(|| {
            let tool = Some(std::hint::black_box("create_issue"));
            Local
                .admit(&policy.limits_for(0, 0, tool), now_ns())
                .expect("admitted")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
