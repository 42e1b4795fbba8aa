//! `/metrics` in Prometheus text format. Each worker owns its counters (single writer, relaxed
//! atomics on its own cache lines, so nothing is contended on the request path); a scrape sums
//! every worker's.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::audit::entry::Decision;

/// JSON-RPC methods counted by name; anything else is `other`.
pub const METHODS: [&str; 17] = [
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "completion/complete",
    "logging/setLevel",
    "server/discover",
    "notification",
    "response",
    "other",
];
/// The labels of requests that carried no JSON-RPC message, by HTTP method: a GET stream, a
/// DELETE of a session, and any other request refused before a message was read.
const NO_MESSAGE: [&str; 3] = ["GET", "DELETE", "(no message)"];
const METHOD_SLOTS: usize = METHODS.len() + NO_MESSAGE.len();

/// The method slot of a request that carried no JSON-RPC message.
pub fn no_message_index(http_method: &[u8]) -> usize {
    METHODS.len()
        + match http_method {
            b"GET" => 0,
            b"DELETE" => 1,
            _ => 2,
        }
}

/// The label of method slot `m`.
pub fn method_label(m: usize) -> &'static str {
    METHODS
        .get(m)
        .or_else(|| NO_MESSAGE.get(m - METHODS.len()))
        .copied()
        .unwrap_or("other")
}

/// Where a counted request went: an upstream, the aggregate endpoint (a message answered from
/// several upstreams or by scopegate), or nowhere (refused before routing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Upstream(usize),
    Aggregate,
    Nowhere,
}

/// The `upstream` label of the places that are no upstream.
const AGGREGATE_LABEL: &str = "(aggregate)";
const NOWHERE_LABEL: &str = "(none)";

const DECISIONS: [Decision; 5] = [
    Decision::Allowed,
    Decision::Denied,
    Decision::RateLimited,
    Decision::Invalid,
    Decision::UpstreamError,
];

/// Histogram bucket bounds, in microseconds.
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// The method slot of a message.
pub fn method_index(method: Option<&str>, is_response: bool) -> usize {
    match method {
        None if is_response => METHODS.len() - 2,
        None => METHODS.len() - 1,
        Some(m) if m.starts_with("notifications/") => METHODS.len() - 3,
        Some(m) => METHODS[..METHODS.len() - 3]
            .iter()
            .position(|x| *x == m)
            .unwrap_or(METHODS.len() - 1),
    }
}

fn decision_index(d: Decision) -> usize {
    DECISIONS.iter().position(|x| *x == d).unwrap_or(0)
}

#[derive(Default)]
struct Histogram {
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            buckets: (0..=LATENCY_BOUNDS_US.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, us: u64) {
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts an event stream as open for as long as it is relayed (`scopegate_open_sse_streams`).
pub struct StreamGauge<'a>(&'a AtomicU64);

impl<'a> StreamGauge<'a> {
    pub fn open(gauge: &'a AtomicU64) -> StreamGauge<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        StreamGauge(gauge)
    }
}

impl Drop for StreamGauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters a worker publishes for the main thread. Each worker writes only its own (one
/// cache line each), so there is no contention on the request path.
#[repr(align(64))]
pub struct WorkerStats {
    pub open_connections: AtomicUsize,
    /// Heap allocations made on this worker's thread.
    pub allocations: std::sync::atomic::AtomicU64,
    pub metrics: WorkerMetrics,
}

impl WorkerStats {
    pub fn new(upstreams: usize) -> WorkerStats {
        WorkerStats {
            open_connections: AtomicUsize::new(0),
            allocations: std::sync::atomic::AtomicU64::new(0),
            metrics: WorkerMetrics::new(upstreams),
        }
    }
}

/// One worker's counters.
pub struct WorkerMetrics {
    upstreams: usize,
    /// [method][decision][upstream or none]
    requests: Vec<AtomicU64>,
    total_latency: Histogram,
    upstream_latency: Histogram,
    pub sse_streams: AtomicU64,
    /// Per upstream: times the aggregate endpoint left it out (failed or timed out).
    aggregate_failures: Vec<AtomicU64>,
    /// Upstream list pages the aggregate endpoint took from its cache, and those it asked for.
    list_cache: [AtomicU64; 2],
    /// Per upstream: its latency (for the live view's p50/p99 per upstream).
    by_upstream: Vec<Histogram>,
    /// Calls per agent and per tool, refusals per reason (only with the live view on).
    tally: std::sync::Mutex<Tally>,
}

/// Counts by name for the live view, each bounded: past [`TALLY_KEYS`] names, new ones count
/// under `(other)`.
#[derive(Default)]
pub struct Tally {
    pub agents: std::collections::HashMap<String, u64>,
    pub tools: std::collections::HashMap<String, u64>,
    pub refusals: std::collections::HashMap<String, u64>,
}

const TALLY_KEYS: usize = 512;

fn bump(map: &mut std::collections::HashMap<String, u64>, key: &str) {
    let mut end = key.len().min(128);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    let key = &key[..end];
    if let Some(n) = map.get_mut(key) {
        *n += 1;
    } else if map.len() < TALLY_KEYS {
        map.insert(key.to_owned(), 1);
    } else {
        *map.entry("(other)".to_owned()).or_insert(0) += 1;
    }
}

impl WorkerMetrics {
    pub fn new(upstreams: usize) -> WorkerMetrics {
        WorkerMetrics {
            upstreams,
            requests: (0..METHOD_SLOTS * DECISIONS.len() * (upstreams + 2))
                .map(|_| AtomicU64::new(0))
                .collect(),
            total_latency: Histogram::new(),
            upstream_latency: Histogram::new(),
            sse_streams: AtomicU64::new(0),
            aggregate_failures: (0..upstreams).map(|_| AtomicU64::new(0)).collect(),
            list_cache: [AtomicU64::new(0), AtomicU64::new(0)],
            by_upstream: (0..upstreams).map(|_| Histogram::new()).collect(),
            tally: std::sync::Mutex::new(Tally::default()),
        }
    }

    /// Counts one request for the live view: its agent, the tool it called, the reason it was
    /// refused; and its upstream's latency.
    pub fn tally(
        &self,
        agent: &str,
        tool: Option<&str>,
        refusal: Option<&str>,
        upstream: Option<(usize, u64)>,
    ) {
        if let Some((u, us)) = upstream
            && let Some(h) = self.by_upstream.get(u)
        {
            h.observe(us);
        }
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        if !agent.is_empty() {
            bump(&mut t.agents, agent);
        }
        if let Some(tool) = tool {
            bump(&mut t.tools, tool);
        }
        if let Some(why) = refusal {
            bump(&mut t.refusals, why);
        }
    }

    /// Adds this worker's tallies into `into`.
    pub fn tally_into(&self, into: &mut Tally) {
        let t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        for (from, to) in [
            (&t.agents, &mut into.agents),
            (&t.tools, &mut into.tools),
            (&t.refusals, &mut into.refusals),
        ] {
            for (k, v) in from {
                *to.entry(k.clone()).or_insert(0) += v;
            }
        }
    }

    /// Upstream `u`'s latency histogram: its observations per bucket of [`LATENCY_BOUNDS_US`]
    /// (the last bucket is everything above).
    pub fn upstream_buckets(&self, u: usize) -> Vec<u64> {
        self.by_upstream.get(u).map_or_else(Vec::new, |h| {
            h.buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect()
        })
    }

    /// Messages counted, by decision (in [`DECISIONS`] order), over every method and place.
    pub fn by_decision(&self) -> Vec<(Decision, u64)> {
        DECISIONS
            .iter()
            .map(|&d| {
                let mut n = 0;
                for m in 0..METHOD_SLOTS {
                    for p in 0..self.upstreams + 2 {
                        n += self.requests[self.slot(m, d, p)].load(Ordering::Relaxed);
                    }
                }
                (d, n)
            })
            .collect()
    }

    /// `tools/call` messages counted (every decision, every place).
    pub fn calls(&self) -> u64 {
        let m = method_index(Some("tools/call"), false);
        let mut n = 0;
        for &d in &DECISIONS {
            for p in 0..self.upstreams + 2 {
                n += self.requests[self.slot(m, d, p)].load(Ordering::Relaxed);
            }
        }
        n
    }

    /// Counts an upstream list page served from the cache (`hit`) or asked of the upstream.
    pub fn list_page(&self, hit: bool) {
        self.list_cache[usize::from(!hit)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an upstream the aggregate endpoint had to leave out.
    pub fn aggregate_failure(&self, upstream: usize) {
        if let Some(c) = self.aggregate_failures.get(upstream) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn slot(&self, method: usize, decision: Decision, place: usize) -> usize {
        (method * DECISIONS.len() + decision_index(decision)) * (self.upstreams + 2) + place
    }

    /// Upstreams first, then the aggregate endpoint, then nowhere.
    fn place_index(&self, place: Place) -> usize {
        match place {
            Place::Upstream(u) if u < self.upstreams => u,
            Place::Aggregate => self.upstreams,
            _ => self.upstreams + 1,
        }
    }

    /// Counts one message.
    pub fn count(&self, method: usize, decision: Decision, place: Place) {
        let slot = self.slot(
            method.min(METHOD_SLOTS - 1),
            decision,
            self.place_index(place),
        );
        self.requests[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Observes one request's latencies.
    pub fn observe(&self, total_us: u64, upstream_us: Option<u64>) {
        self.total_latency.observe(total_us);
        if let Some(us) = upstream_us {
            self.upstream_latency.observe(us);
        }
    }
}

/// What a scrape needs besides the workers' counters.
pub struct Scrape<'a> {
    pub workers: &'a [&'a WorkerMetrics],
    pub upstream_names: &'a [String],
    pub open_connections: u64,
    /// Heap allocations made on worker threads since start.
    pub heap_allocations: u64,
    pub audit: Option<AuditGauges>,
    /// Per stdio upstream.
    pub stdio: Vec<StdioGauges>,
    /// Fleet-wide limits, when `SCOPEGATE_REDIS_URL` is set.
    pub redis: Option<RedisGauges>,
}

pub struct RedisGauges {
    /// Every worker's link to Redis is connected.
    pub up: bool,
    /// Replicas sharing the limits (seen lately, at least `SCOPEGATE_REDIS_REPLICAS`).
    pub replicas: u64,
    pub commands: u64,
    /// Tokens Redis granted to this replica's leases.
    pub leased: u64,
    /// Limit decisions made without Redis.
    pub fallbacks: u64,
}

pub struct StdioGauges {
    pub upstream: String,
    /// Processes running now.
    pub processes: usize,
    /// Agent sessions open now.
    pub sessions: usize,
}

pub struct AuditGauges {
    pub written: u64,
    pub pending_bytes: u64,
    pub write_errors: u64,
    pub failing: bool,
}

/// Renders the Prometheus text exposition format (version 0.0.4).
pub fn render<'a>(s: &Scrape<'a>) -> String {
    let mut out = String::with_capacity(8192);
    let n = s.upstream_names.len();
    let upstream_label = |u: usize| match u {
        _ if u < n => s.upstream_names[u].as_str(),
        _ if u == n => AGGREGATE_LABEL,
        _ => NOWHERE_LABEL,
    };

    out.push_str("# HELP scopegate_requests_total JSON-RPC messages handled, by method, decision and upstream.\n");
    out.push_str("# TYPE scopegate_requests_total counter\n");
    let mut upstream_errors = vec![0u64; n + 2];
    let mut rate_limited = vec![0u64; n + 2];
    // `m` also addresses the counters, which have one more slot than METHODS has names.
    #[allow(clippy::needless_range_loop)]
    for m in 0..METHOD_SLOTS {
        for d in DECISIONS {
            for u in 0..n + 2 {
                let total: u64 = s
                    .workers
                    .iter()
                    .map(|w| w.requests[w.slot(m, d, u)].load(Ordering::Relaxed))
                    .sum();
                if total == 0 {
                    continue;
                }
                match d {
                    Decision::UpstreamError => upstream_errors[u] += total,
                    Decision::RateLimited => rate_limited[u] += total,
                    _ => {}
                }
                let method = method_label(m);
                let _ = writeln!(
                    out,
                    "scopegate_requests_total{{method=\"{method}\",decision=\"{}\",upstream=\"{}\"}} {total}",
                    d.as_str(),
                    escape(upstream_label(u))
                );
            }
        }
    }
    out.push_str("# HELP scopegate_upstream_errors_total Requests that failed at the upstream (refused, reset, timed out, invalid).\n");
    out.push_str("# TYPE scopegate_upstream_errors_total counter\n");
    for (u, v) in upstream_errors.iter().enumerate().take(n) {
        let _ = writeln!(
            out,
            "scopegate_upstream_errors_total{{upstream=\"{}\"}} {v}",
            escape(upstream_label(u))
        );
    }
    out.push_str("# HELP scopegate_aggregate_upstream_failures_total Times the aggregate endpoint left an upstream out (down, slow or failing).\n");
    out.push_str("# TYPE scopegate_aggregate_upstream_failures_total counter\n");
    for u in 0..n {
        let total: u64 = s
            .workers
            .iter()
            .map(|w| {
                w.aggregate_failures
                    .get(u)
                    .map_or(0, |c| c.load(Ordering::Relaxed))
            })
            .sum();
        let _ = writeln!(
            out,
            "scopegate_aggregate_upstream_failures_total{{upstream=\"{}\"}} {total}",
            escape(upstream_label(u))
        );
    }
    out.push_str("# HELP scopegate_aggregate_list_pages_total Upstream list pages the aggregate endpoint served from its cache of public results (hit) or asked the upstream for (miss).\n");
    out.push_str("# TYPE scopegate_aggregate_list_pages_total counter\n");
    for (k, label) in ["hit", "miss"].iter().enumerate() {
        let total: u64 = s
            .workers
            .iter()
            .map(|w| w.list_cache[k].load(Ordering::Relaxed))
            .sum();
        let _ = writeln!(
            out,
            "scopegate_aggregate_list_pages_total{{result=\"{label}\"}} {total}"
        );
    }
    let tls = crate::tls::failures();
    out.push_str("# HELP scopegate_upstream_tls_failures_total Failed TLS handshakes with an upstream, by reason.\n");
    out.push_str("# TYPE scopegate_upstream_tls_failures_total counter\n");
    for (upstream, reason, n) in &tls {
        if let Some(upstream) = upstream {
            let _ = writeln!(
                out,
                "scopegate_upstream_tls_failures_total{{upstream=\"{}\",reason=\"{}\"}} {n}",
                escape(upstream),
                escape(reason)
            );
        }
    }
    out.push_str("# HELP scopegate_listener_tls_failures_total Failed TLS handshakes with agents, by reason.\n");
    out.push_str("# TYPE scopegate_listener_tls_failures_total counter\n");
    for (upstream, reason, n) in &tls {
        if upstream.is_none() {
            let _ = writeln!(
                out,
                "scopegate_listener_tls_failures_total{{reason=\"{}\"}} {n}",
                escape(reason)
            );
        }
    }
    out.push_str("# HELP scopegate_tool_integrity_events_total Tool and prompt definitions that changed since pinned, are not pinned, or were flagged by the poison scan, by what was done.\n");
    out.push_str("# TYPE scopegate_tool_integrity_events_total counter\n");
    for (upstream, event, action, n) in crate::integrity::counts() {
        let _ = writeln!(
            out,
            "scopegate_tool_integrity_events_total{{upstream=\"{}\",event=\"{event}\",action=\"{action}\"}} {n}",
            escape(&upstream)
        );
    }
    out.push_str("# HELP scopegate_rate_limited_total Requests refused by a rate limit.\n");
    out.push_str("# TYPE scopegate_rate_limited_total counter\n");
    let _ = writeln!(
        out,
        "scopegate_rate_limited_total {}",
        rate_limited.iter().sum::<u64>()
    );

    for (name, help, pick) in [
        (
            "scopegate_request_duration_seconds",
            "Time from request head to the end of the answer.",
            0,
        ),
        (
            "scopegate_upstream_duration_seconds",
            "Time from sending upstream to its response head.",
            1,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        fn pick_of(w: &WorkerMetrics, pick: u8) -> &Histogram {
            if pick == 0 {
                &w.total_latency
            } else {
                &w.upstream_latency
            }
        }
        let hist = |w: &'a WorkerMetrics| pick_of(w, pick);
        let mut cumulative = 0u64;
        for (i, bound) in LATENCY_BOUNDS_US.iter().enumerate() {
            cumulative += s
                .workers
                .iter()
                .map(|w| hist(w).buckets[i].load(Ordering::Relaxed))
                .sum::<u64>();
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        cumulative += s
            .workers
            .iter()
            .map(|w| hist(w).buckets[LATENCY_BOUNDS_US.len()].load(Ordering::Relaxed))
            .sum::<u64>();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum: u64 = s
            .workers
            .iter()
            .map(|w| hist(w).sum.load(Ordering::Relaxed))
            .sum();
        let count: u64 = s
            .workers
            .iter()
            .map(|w| hist(w).count.load(Ordering::Relaxed))
            .sum();
        let _ = writeln!(out, "{name}_sum {}", sum as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }

    // Per stdio upstream: processes running, sessions open.
    let stdio_gauges = [
        (
            "scopegate_stdio_processes",
            "stdio server processes running now.",
        ),
        (
            "scopegate_stdio_sessions",
            "Agent sessions open on stdio servers now.",
        ),
    ];
    for (i, (metric, help)) in stdio_gauges.iter().enumerate() {
        if s.stdio.is_empty() {
            break;
        }
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
        for g in &s.stdio {
            let value = if i == 0 { g.processes } else { g.sessions };
            let upstream = escape(&g.upstream);
            let _ = writeln!(out, "{metric}{{upstream=\"{upstream}\"}} {value}");
        }
    }
    if let Some(r) = &s.redis {
        let gauges = [
            (
                "scopegate_redis_up",
                "gauge",
                "1 when every worker reaches the fleet's Redis.",
                u64::from(r.up),
            ),
            (
                "scopegate_redis_replicas",
                "gauge",
                "Replicas sharing the fleet-wide limits.",
                r.replicas,
            ),
            (
                "scopegate_redis_commands_total",
                "counter",
                "Commands sent to Redis (heartbeats included).",
                r.commands,
            ),
            (
                "scopegate_ratelimit_leased_tokens_total",
                "counter",
                "Rate-limit tokens leased from Redis.",
                r.leased,
            ),
            (
                "scopegate_ratelimit_fallback_total",
                "counter",
                "Rate-limit decisions made while Redis was unreachable (SCOPEGATE_REDIS_FALLBACK).",
                r.fallbacks,
            ),
        ];
        for (metric, kind, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {metric} {help}\n# TYPE {metric} {kind}\n{metric} {value}"
            );
        }
    }
    out.push_str("# HELP scopegate_open_connections Client connections open now.\n");
    out.push_str("# TYPE scopegate_open_connections gauge\n");
    let _ = writeln!(out, "scopegate_open_connections {}", s.open_connections);
    out.push_str(
        "# HELP scopegate_heap_allocations_total Heap allocations made on worker threads.\n",
    );
    out.push_str("# TYPE scopegate_heap_allocations_total counter\n");
    let _ = writeln!(
        out,
        "scopegate_heap_allocations_total {}",
        s.heap_allocations
    );
    out.push_str("# HELP scopegate_open_sse_streams Event streams being relayed now.\n");
    out.push_str("# TYPE scopegate_open_sse_streams gauge\n");
    let streams: u64 = s
        .workers
        .iter()
        .map(|w| w.sse_streams.load(Ordering::Relaxed))
        .sum();
    let _ = writeln!(out, "scopegate_open_sse_streams {streams}");

    if let Some(a) = &s.audit {
        out.push_str(
            "# HELP scopegate_audit_entries_written_total Audit entries written to disk.\n",
        );
        out.push_str("# TYPE scopegate_audit_entries_written_total counter\n");
        let _ = writeln!(out, "scopegate_audit_entries_written_total {}", a.written);
        out.push_str(
            "# HELP scopegate_audit_pending_bytes Encoded audit entries waiting to be written.\n",
        );
        out.push_str("# TYPE scopegate_audit_pending_bytes gauge\n");
        let _ = writeln!(out, "scopegate_audit_pending_bytes {}", a.pending_bytes);
        out.push_str(
            "# HELP scopegate_audit_write_errors_total Failed audit writes (each retried).\n",
        );
        out.push_str("# TYPE scopegate_audit_write_errors_total counter\n");
        let _ = writeln!(out, "scopegate_audit_write_errors_total {}", a.write_errors);
        out.push_str("# HELP scopegate_audit_failing Whether the audit sink is failing now.\n");
        out.push_str("# TYPE scopegate_audit_failing gauge\n");
        let _ = writeln!(out, "scopegate_audit_failing {}", u8::from(a.failing));
    }
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_across_workers() {
        let a = WorkerMetrics::new(2);
        let b = WorkerMetrics::new(2);
        a.count(
            method_index(Some("tools/call"), false),
            Decision::Allowed,
            Place::Upstream(0),
        );
        b.count(
            method_index(Some("tools/call"), false),
            Decision::Allowed,
            Place::Upstream(0),
        );
        b.count(
            method_index(Some("tools/call"), false),
            Decision::RateLimited,
            Place::Upstream(1),
        );
        a.count(no_message_index(b"GET"), Decision::Denied, Place::Nowhere);
        b.count(
            no_message_index(b"DELETE"),
            Decision::Allowed,
            Place::Aggregate,
        );
        a.observe(300, Some(120));
        b.observe(20_000_000, None);
        let names = vec!["gh".to_string(), "files".to_string()];
        let text = render(&Scrape {
            workers: &[&a, &b],
            upstream_names: &names,
            open_connections: 3,
            redis: None,
            stdio: vec![StdioGauges {
                upstream: "fs".into(),
                processes: 2,
                sessions: 5,
            }],
            heap_allocations: 12,
            audit: None,
        });
        assert!(text.contains("scopegate_requests_total{method=\"tools/call\",decision=\"allowed\",upstream=\"gh\"} 2\n"), "{text}");
        assert!(text.contains(
            "scopegate_requests_total{method=\"GET\",decision=\"denied\",upstream=\"(none)\"} 1\n"
        ));
        assert!(text.contains(
            "scopegate_requests_total{method=\"DELETE\",decision=\"allowed\",upstream=\"(aggregate)\"} 1\n"
        ));
        assert!(!text.contains("=\"\""), "no empty label: {text}");
        assert!(text.contains("scopegate_rate_limited_total 1\n"));
        assert!(
            text.contains("scopegate_request_duration_seconds_bucket{le=\"0.0005\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("scopegate_request_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("scopegate_request_duration_seconds_count 2\n"));
        assert!(text.contains("scopegate_upstream_duration_seconds_count 1\n"));
        assert!(text.contains("scopegate_open_connections 3\n"));
        assert!(text.contains("scopegate_stdio_processes{upstream=\"fs\"} 2\n"));
        assert!(text.contains("scopegate_stdio_sessions{upstream=\"fs\"} 5\n"));
        assert!(text.contains("scopegate_heap_allocations_total 12\n"));
    }

    #[test]
    fn method_slots() {
        assert_eq!(
            METHODS[method_index(Some("tools/call"), false)],
            "tools/call"
        );
        assert_eq!(
            METHODS[method_index(Some("notifications/progress"), false)],
            "notification"
        );
        assert_eq!(METHODS[method_index(None, true)], "response");
        assert_eq!(METHODS[method_index(Some("x/y"), false)], "other");
    }
}
