//! Rate limits: GCRA buckets, each one atomic word, shared by every worker.
//!
//! A bucket stores its theoretical arrival time (TAT, nanoseconds on a process-wide monotonic
//! clock) in an `AtomicU64` updated by compare-and-swap. With emission interval `T = 1/rate`
//! and burst `b`, a request at `now` is admitted when `max(TAT, now) + T - now <= b·T`, and then
//! `TAT := max(TAT, now) + T`. So `b` requests pass at once, then one per `T`; a refusal says
//! how long until the next would pass.
//!
//! Buckets for everything the policy names (agents, tenants, upstreams, tool rules with a
//! literal `match`) are allocated when the policy loads and found by index. A tool rule whose
//! `match` is a glob limits each tool it matches separately; those keys appear at run time and
//! live in a sharded map (dashmap). A call must fit every bucket that applies; when one
//! refuses, the tokens already taken from the others are given back (GCRA state is additive,
//! so giving back `T` restores the bucket exactly). No mutex anywhere.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use dashmap::DashMap;

use crate::policy::{Policy, Rate};

/// Nanoseconds on a monotonic clock shared by all threads (its zero is the first call).
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    // Start at one second so a fresh bucket (TAT 0) is full from the first request.
    base.elapsed().as_nanos() as u64 + 1_000_000_000
}

/// One limit's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Emission interval T, in ns.
    pub interval: u64,
    /// Burst tolerance b·T, in ns.
    pub tolerance: u64,
}

impl Gcra {
    pub fn new(rate: &Rate) -> Gcra {
        let interval = ((1e9 / rate.per_second).round() as u64).max(1);
        Gcra {
            interval,
            tolerance: interval.saturating_mul(rate.burst),
        }
    }
}

/// A bucket: one atomic word of state and the limit it applies.
#[derive(Debug)]
pub struct Bucket {
    tat: AtomicU64,
    pub limit: Gcra,
    /// Says which limit this is, for the agent: `agent "triage-bot" (20/s, burst 40)`.
    pub label: String,
}

impl Bucket {
    pub fn new(limit: Gcra, label: String) -> Bucket {
        Bucket {
            tat: AtomicU64::new(0),
            limit,
            label,
        }
    }

    /// Takes one token at `now`; `Err(ns)` says how long until one would be available.
    pub fn try_take(&self, now: u64) -> Result<(), u64> {
        let Gcra {
            interval,
            tolerance,
        } = self.limit;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + interval;
            let ahead = next - now;
            if ahead > tolerance {
                return Err(ahead - tolerance);
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Returns a token taken by [`try_take`](Self::try_take).
    pub fn give_back(&self) {
        self.tat.fetch_sub(self.limit.interval, Ordering::AcqRel);
    }
}

/// A `[[agent.tool]]` rule's limit.
#[derive(Debug)]
enum ToolLimit {
    /// No `rate` on the rule.
    None,
    /// A literal `match`: one bucket.
    One(Arc<Bucket>),
    /// A glob `match`: one bucket per tool it matches, made on first use, at most
    /// [`MAX_TOOL_BUCKETS`] of them (see [`PerTool::bucket`]).
    PerTool(PerTool),
}

/// Most buckets a glob rule keeps: names come from agents (any name a glob matches), so the map
/// must not grow with every name an agent invents.
pub const MAX_TOOL_BUCKETS: usize = 4096;

/// The per-tool buckets of one glob rule.
#[derive(Debug)]
struct PerTool {
    limit: Gcra,
    label: String,
    buckets: DashMap<String, Arc<Bucket>>,
    /// Shared by every name that finds the map full: stricter, never unbounded.
    overflow: Arc<Bucket>,
    /// When full buckets were last swept out (ns), so a flood of new names sweeps once a
    /// second at most.
    last_sweep: AtomicU64,
}

impl PerTool {
    fn new(limit: Gcra, label: String) -> PerTool {
        PerTool {
            overflow: Arc::new(Bucket::new(
                limit,
                format!("{label} (tools past {MAX_TOOL_BUCKETS} names)"),
            )),
            limit,
            label,
            buckets: DashMap::new(),
            last_sweep: AtomicU64::new(0),
        }
    }

    /// The bucket of tool `name`. A new name gets its own bucket while the map has room; when
    /// it is full, buckets that are full again (their state equals a fresh bucket's) are
    /// dropped, and if that frees nothing the name shares the overflow bucket. `now: None`
    /// (giving a token back) never creates a bucket.
    fn bucket(&self, up_name: &str, name: &str, now: Option<u64>) -> Arc<Bucket> {
        if let Some(b) = self.buckets.get(name) {
            return b.clone();
        }
        let Some(now) = now else {
            return self.overflow.clone();
        };
        if self.buckets.len() >= MAX_TOOL_BUCKETS {
            let last = self.last_sweep.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= 1_000_000_000
                && self
                    .last_sweep
                    .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                self.buckets
                    .retain(|_, b| b.tat.load(Ordering::Relaxed) > now);
            }
            if self.buckets.len() >= MAX_TOOL_BUCKETS {
                return self.overflow.clone();
            }
        }
        self.buckets
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Bucket::new(
                    self.limit,
                    format!("{} on {up_name}/{name}", self.label),
                ))
            })
            .clone()
    }
}

/// Every bucket of a policy.
#[derive(Debug, Default)]
pub struct RateLimits {
    agents: Vec<Option<Arc<Bucket>>>,
    tenants: Vec<Option<Arc<Bucket>>>,
    upstreams: Vec<Option<Arc<Bucket>>>,
    /// Per agent, per `[[agent.tool]]` rule (same order as the policy's).
    tools: Vec<Vec<ToolLimit>>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub label: String,
    pub retry_after_ns: u64,
}

fn rate_text(rate: &Rate) -> String {
    format!("{}, burst {}", rate.text, rate.burst)
}

fn bucket(rate: &Option<Rate>, what: String) -> Option<Arc<Bucket>> {
    rate.as_ref().map(|r| {
        Arc::new(Bucket::new(
            Gcra::new(r),
            format!("{what} ({})", rate_text(r)),
        ))
    })
}

impl RateLimits {
    /// Allocates the buckets a policy names.
    pub fn for_policy(policy: &Policy) -> RateLimits {
        RateLimits {
            agents: policy
                .agents
                .iter()
                .map(|a| bucket(&a.rate, format!("agent {:?}", a.id)))
                .collect(),
            tenants: policy
                .tenants
                .iter()
                .map(|t| bucket(&t.rate, format!("tenant {:?}", t.id)))
                .collect(),
            upstreams: policy
                .upstream_rules
                .iter()
                .zip(policy.upstreams())
                .map(|(r, u)| bucket(&r.rate, format!("upstream {:?}", u.name)))
                .collect(),
            tools: policy
                .agents
                .iter()
                .map(|a| {
                    a.tools
                        .iter()
                        .map(|t| match &t.rate {
                            None => ToolLimit::None,
                            Some(rate) => {
                                let label = format!(
                                    "tool {} for agent {:?} ({})",
                                    t.pattern.as_str(),
                                    a.id,
                                    rate_text(rate)
                                );
                                if t.pattern.has_wildcard() {
                                    ToolLimit::PerTool(PerTool::new(Gcra::new(rate), label))
                                } else {
                                    ToolLimit::One(Arc::new(Bucket::new(Gcra::new(rate), label)))
                                }
                            }
                        })
                        .collect()
                })
                .collect(),
        }
    }

    /// After a reload: keep the state of every bucket whose key and limit did not change.
    pub fn inherit(&mut self, new: &Policy, old_limits: &RateLimits, old: &Policy) {
        let keep = |slot: &mut Option<Arc<Bucket>>, prior: Option<&Option<Arc<Bucket>>>| {
            if let (Some(b), Some(Some(p))) = (slot.as_ref(), prior)
                && b.limit == p.limit
            {
                *slot = Some(p.clone());
            }
        };
        for (i, a) in new.agents.iter().enumerate() {
            let Some(j) = old.agent_by_id(&a.id) else {
                continue;
            };
            keep(&mut self.agents[i], old_limits.agents.get(j));
            for (k, rule) in a.tools.iter().enumerate() {
                let Some(m) = old.agents[j]
                    .tools
                    .iter()
                    .position(|r| r.pattern == rule.pattern)
                else {
                    continue;
                };
                let Some(prior) = old_limits.tools.get(j).and_then(|t| t.get(m)) else {
                    continue;
                };
                match (&mut self.tools[i][k], prior) {
                    (ToolLimit::One(b), ToolLimit::One(p)) if b.limit == p.limit => *b = p.clone(),
                    (ToolLimit::PerTool(now), ToolLimit::PerTool(before))
                        if now.limit == before.limit =>
                    {
                        for entry in before.buckets.iter().take(MAX_TOOL_BUCKETS) {
                            now.buckets
                                .insert(entry.key().clone(), entry.value().clone());
                        }
                        now.overflow = before.overflow.clone();
                    }
                    _ => {}
                }
            }
        }
        for (i, t) in new.tenants.iter().enumerate() {
            if let Some(j) = old.tenants.iter().position(|o| o.id == t.id) {
                keep(&mut self.tenants[i], old_limits.tenants.get(j));
            }
        }
        for (i, u) in new.upstreams().iter().enumerate() {
            if let Some(j) = old.upstreams().iter().position(|o| o.name == u.name) {
                keep(&mut self.upstreams[i], old_limits.upstreams.get(j));
            }
        }
    }

    /// Calls `f` with every bucket a request takes from, in a fixed order: for tools/call (when
    /// `tool` is given) the agent's matching tool rules, the agent, its tenant, the upstream;
    /// for anything else the agent's own bucket. Stops early when `f` returns false.
    fn each_bucket(
        &self,
        policy: &Policy,
        agent: usize,
        upstream: usize,
        tool: Option<&str>,
        now: Option<u64>,
        mut f: impl FnMut(&Bucket) -> bool,
    ) {
        let a = &policy.agents[agent];
        if let Some(name) = tool {
            let up_name = &policy.upstreams()[upstream].name;
            for (k, rule) in a.tools.iter().enumerate() {
                let limit = &self.tools[agent][k];
                if matches!(limit, ToolLimit::None)
                    || !rule.pattern.matches_qualified(up_name, name)
                {
                    continue;
                }
                let go_on = match limit {
                    ToolLimit::None => true,
                    ToolLimit::One(b) => f(b),
                    ToolLimit::PerTool(per_tool) => f(&per_tool.bucket(up_name, name, now)),
                };
                if !go_on {
                    return;
                }
            }
        }
        if let Some(Some(b)) = self.agents.get(agent)
            && !f(b)
        {
            return;
        }
        if tool.is_none() {
            return;
        }
        if let Some(t) = a.tenant
            && let Some(Some(b)) = self.tenants.get(t)
            && !f(b)
        {
            return;
        }
        if let Some(Some(b)) = self.upstreams.get(upstream) {
            f(b);
        }
    }

    /// Admits one request or refuses it taking nothing. `tool` is the name for tools/call.
    pub fn admit(
        &self,
        policy: &Policy,
        agent: usize,
        upstream: usize,
        tool: Option<&str>,
        now: u64,
    ) -> Result<(), Limited> {
        let mut taken = 0usize;
        let mut refused: Option<Limited> = None;
        self.each_bucket(policy, agent, upstream, tool, Some(now), |b| {
            match b.try_take(now) {
                Ok(()) => {
                    taken += 1;
                    true
                }
                Err(wait) => {
                    refused = Some(Limited {
                        label: b.label.clone(),
                        retry_after_ns: wait,
                    });
                    false
                }
            }
        });
        let Some(limited) = refused else {
            return Ok(());
        };
        self.each_bucket(policy, agent, upstream, tool, Some(now), |b| {
            if taken == 0 {
                return false;
            }
            b.give_back();
            taken -= 1;
            true
        });
        Err(limited)
    }

    /// Gives back what [`admit`](Self::admit) took (a batch refused after some elements passed).
    pub fn release(&self, policy: &Policy, agent: usize, upstream: usize, tool: Option<&str>) {
        self.each_bucket(policy, agent, upstream, tool, None, |b| {
            b.give_back();
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn rate(per_second: f64, burst: u64) -> Rate {
        Rate {
            per_second,
            burst,
            text: format!("{per_second}/s"),
        }
    }

    #[test]
    fn burst_then_steady_rate_then_refill() {
        let b = Bucket::new(Gcra::new(&rate(10.0, 5)), "t".into());
        let t0 = 100 * SEC;
        for i in 0..5 {
            assert!(b.try_take(t0).is_ok(), "burst token {i}");
        }
        let wait = b.try_take(t0).unwrap_err();
        assert_eq!(wait, SEC / 10, "one interval until the next token");
        // Exactly one token per 100 ms afterwards.
        assert!(b.try_take(t0 + SEC / 10 - 1).is_err());
        assert!(b.try_take(t0 + SEC / 10).is_ok());
        assert!(b.try_take(t0 + SEC / 10).is_err());
        // Over 1 s at the steady rate: 10 more, nothing more.
        let mut admitted = 0;
        for ms in (200..=1100).step_by(1) {
            if b.try_take(t0 + ms * 1_000_000).is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10);
        // After a long pause the full burst is back, not more.
        let later = t0 + 60 * SEC;
        let mut burst = 0;
        while b.try_take(later).is_ok() {
            burst += 1;
        }
        assert_eq!(burst, 5);
    }

    #[test]
    fn per_minute_and_per_hour() {
        let b = Bucket::new(Gcra::new(&rate(10.0 / 60.0, 3)), "t".into());
        let t0 = 10 * SEC;
        assert!((0..3).all(|_| b.try_take(t0).is_ok()));
        let wait = b.try_take(t0).unwrap_err();
        assert_eq!(wait, 6 * SEC);
        assert!(b.try_take(t0 + 6 * SEC).is_ok());
        let h = Bucket::new(Gcra::new(&rate(1.0 / 3600.0, 1)), "t".into());
        assert!(h.try_take(t0).is_ok());
        assert_eq!(h.try_take(t0).unwrap_err(), 3600 * SEC);
    }

    #[test]
    fn give_back_restores_exactly() {
        let b = Bucket::new(Gcra::new(&rate(1.0, 2)), "t".into());
        let t = 5 * SEC;
        assert!(b.try_take(t).is_ok());
        assert!(b.try_take(t).is_ok());
        assert!(b.try_take(t).is_err());
        b.give_back();
        assert!(b.try_take(t).is_ok());
        assert!(b.try_take(t).is_err());
    }

    /// Several threads hammering one bucket for a fixed time admit within one token of the
    /// ideal count (burst + rate x elapsed), measured on the bucket's own clock.
    #[test]
    fn contention_admits_within_one_token_of_ideal() {
        let per_second = 2000.0;
        let burst = 50;
        let b = Arc::new(Bucket::new(Gcra::new(&rate(per_second, burst)), "t".into()));
        // Take the burst at `start`, so tokens accrue from an empty bucket from then on (a full
        // bucket cannot accrue past its burst while the threads start).
        let start = now_ns();
        let mut drained = 0u64;
        while b.try_take(start).is_ok() {
            drained += 1;
        }
        assert_eq!(drained, burst);
        let end = start + SEC / 2;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut admitted = 0u64;
                    let mut last = 0;
                    loop {
                        let now = now_ns();
                        if now >= end {
                            break;
                        }
                        last = now;
                        if b.try_take(now).is_ok() {
                            admitted += 1;
                        }
                    }
                    (admitted, last)
                })
            })
            .collect();
        let results: Vec<(u64, u64)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let admitted: u64 = drained + results.iter().map(|r| r.0).sum::<u64>();
        let last = results.iter().map(|r| r.1).max().unwrap();
        let ideal = burst as f64 + (last - start) as f64 / 1e9 * per_second;
        // Never more than the ideal...
        assert!(
            admitted as f64 <= ideal + 1.0,
            "admitted {admitted}, ideal {ideal:.2}"
        );
        // ...and nothing lost: what was admitted plus what is still available at the last
        // instant any thread saw is the ideal, whatever the scheduler did to the threads.
        let mut left = 0u64;
        while b.try_take(last).is_ok() {
            left += 1;
        }
        let total = (admitted + left) as f64;
        assert!(
            (total - ideal).abs() <= 1.0 + 1e-9,
            "admitted {admitted} + left {left}, ideal {ideal:.2}"
        );
        assert!(admitted > burst, "the threads did contend past the burst");
    }

    #[test]
    fn a_glob_rule_keeps_a_bounded_number_of_buckets() {
        let env = std::collections::HashMap::new();
        let text = r#"
[[upstream]]
name = "files"
url = "http://127.0.0.1:9/mcp"
[[agent]]
id = "a"
allow = ["files/*"]
[[agent.tool]]
match = "files/read_*"
rate = { per_second = 1, burst = 1 }
"#;
        let p = Policy::parse(std::path::Path::new("p.toml"), text, &[], &env).unwrap();
        let t0 = 100 * SEC;
        let per_tool = |p: &Policy| match &p.limits.tools[0][0] {
            ToolLimit::PerTool(t) => t.buckets.len(),
            _ => panic!("a glob rule has per-tool buckets"),
        };
        // Each new name gets its own bucket, up to the bound.
        for i in 0..MAX_TOOL_BUCKETS {
            assert!(
                p.limits
                    .admit(&p, 0, 0, Some(&format!("read_{i}")), t0)
                    .is_ok()
            );
        }
        assert_eq!(per_tool(&p), MAX_TOOL_BUCKETS);
        // Past it, new names share one bucket (stricter, and no growth).
        assert!(p.limits.admit(&p, 0, 0, Some("read_x"), t0).is_ok());
        assert!(p.limits.admit(&p, 0, 0, Some("read_y"), t0).is_err());
        assert_eq!(per_tool(&p), MAX_TOOL_BUCKETS);
        // Once buckets are full again they are swept, and new names get their own again.
        let later = t0 + 10 * SEC;
        assert!(p.limits.admit(&p, 0, 0, Some("read_z"), later).is_ok());
        assert_eq!(per_tool(&p), 1);
        // Known names keep their own state throughout.
        assert!(p.limits.admit(&p, 0, 0, Some("read_z"), later).is_err());
    }
}
