//! GCRA buckets, each one atomic word.
//!
//! A bucket stores its theoretical arrival time (TAT, nanoseconds on a process-wide monotonic
//! clock) in an `AtomicU64` updated by compare-and-swap. With emission interval `T = 1/rate`
//! and burst `b`, a request at `now` is admitted when `max(TAT, now) + T - now <= b·T`, and then
//! `TAT := max(TAT, now) + T`. So `b` requests pass at once, then one per `T`; a refusal says
//! how long until the next would pass. Per-name buckets (a glob tool rule limits each tool it
//! matches separately) live in a sharded map (dashmap), bounded.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use dashmap::DashMap;

use super::lease::Lease;

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
    /// `per_second` tokens a second, `burst` at once.
    pub fn new(per_second: f64, burst: u64) -> Gcra {
        let interval = ((1e9 / per_second).round() as u64).max(1);
        Gcra {
            interval,
            tolerance: interval.saturating_mul(burst),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub label: String,
    pub retry_after_ns: u64,
}

/// A bucket: one atomic word of state and the limit it applies. With fleet-wide limits the
/// word is the fallback used while Redis is unreachable, and the tokens spent come from the
/// bucket's [`Lease`].
#[derive(Debug)]
pub struct Bucket {
    tat: AtomicU64,
    pub limit: Gcra,
    /// Says which limit this is, for the agent: `agent "triage-bot" (20/s, burst 40)`.
    pub label: String,
    /// Names the bucket across replicas: the limit's key (and the tool, for a per-name limit).
    pub key: Box<str>,
    pub lease: Lease,
}

impl Bucket {
    pub fn new(limit: Gcra, label: String, key: Box<str>) -> Bucket {
        Bucket {
            tat: AtomicU64::new(0),
            limit,
            label,
            key,
            lease: Lease::default(),
        }
    }

    /// Takes one token at `now`; `Err(ns)` says how long until one would be available.
    #[inline]
    pub fn try_take(&self, now: u64) -> Result<(), u64> {
        self.try_take_with(self.limit, now)
    }

    /// [`try_take`](Self::try_take) under another limit (a replica's share of this one).
    pub fn try_take_with(&self, limit: Gcra, now: u64) -> Result<(), u64> {
        let Gcra {
            interval,
            tolerance,
        } = limit;
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

    /// [`try_take`](Self::try_take), saying why in `refused` when it refuses.
    #[inline(always)]
    fn take_or_say(&self, now: u64, refused: &mut Option<Limited>) -> bool {
        match self.try_take(now) {
            Ok(()) => true,
            Err(wait) => {
                *refused = Some(self.refusal(wait));
                false
            }
        }
    }

    /// What a refusal by this bucket says (off the hot path: it copies the label).
    #[cold]
    pub fn refusal(&self, wait: u64) -> Limited {
        Limited {
            label: self.label.clone(),
            retry_after_ns: wait,
        }
    }

    /// Returns a token taken by [`try_take`](Self::try_take).
    pub fn give_back(&self) {
        self.give_back_with(self.limit);
    }

    /// Returns a token [`try_take_with`](Self::try_take_with) took under `limit` (never below
    /// zero: a token given back to a bucket made since, by mistake, is lost, not wrapped).
    pub fn give_back_with(&self, limit: Gcra) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(limit.interval))
            });
    }

    /// Holds state worth keeping at `now`: tokens taken and not yet earned back (locally or, for
    /// a fleet-wide limit, from Redis), or a lease.
    fn busy(&self, now: u64) -> bool {
        self.tat.load(Ordering::Relaxed) > now || self.lease.busy(now)
    }
}

/// The local state of one limit.
#[derive(Debug)]
pub(super) enum State {
    One(Arc<Bucket>),
    PerName(PerName),
}

/// A bucket found for a request: a single-bucket limit's, borrowed, or a per-name one's.
pub(super) enum BucketRef<'a> {
    Borrowed(&'a Arc<Bucket>),
    Owned(Arc<Bucket>),
}

impl std::ops::Deref for BucketRef<'_> {
    type Target = Arc<Bucket>;
    fn deref(&self) -> &Arc<Bucket> {
        match self {
            BucketRef::Borrowed(b) => b,
            BucketRef::Owned(b) => b,
        }
    }
}

impl State {
    pub(super) fn gcra(&self) -> Gcra {
        match self {
            State::One(b) => b.limit,
            State::PerName(p) => p.limit,
        }
    }

    /// Takes a token at `now` from the bucket for `name` (`(upstream, tool)`; a single-bucket
    /// limit has one bucket for every name). On a refusal, says which bucket and how long to
    /// wait in `refused` and returns false (the common case stays a plain boolean).
    #[inline(always)]
    pub(super) fn try_take(
        &self,
        name: Option<(&str, &str)>,
        now: u64,
        refused: &mut Option<Limited>,
    ) -> bool {
        match self {
            State::One(b) => b.take_or_say(now, refused),
            State::PerName(p) => p.try_take(name, now, refused),
        }
    }

    /// The bucket for `name`; `now` lets a per-name limit make one (else a missing name gets
    /// the overflow bucket).
    #[inline]
    pub(super) fn bucket(&self, name: Option<(&str, &str)>, now: Option<u64>) -> BucketRef<'_> {
        match (self, name) {
            (State::One(b), _) => BucketRef::Borrowed(b),
            (State::PerName(p), None) => BucketRef::Borrowed(&p.overflow),
            (State::PerName(p), Some(name)) => BucketRef::Owned(p.bucket(name, now)),
        }
    }

    /// Gives back a token [`try_take`](Self::try_take) took (never creating a bucket).
    #[inline]
    pub(super) fn give_back(&self, name: Option<(&str, &str)>) {
        match (self, name) {
            (State::One(b), _) => b.give_back(),
            (State::PerName(p), None) => p.overflow.give_back(),
            (State::PerName(p), Some(name)) => p.bucket(name, None).give_back(),
        }
    }
}

/// A tool name as part of a bucket's key: as is when short, else its SHA-256 (names come from
/// agents, and the key goes to Redis with every request for the bucket).
fn key_part(tool: &str) -> std::borrow::Cow<'_, str> {
    if tool.len() <= 64 {
        return tool.into();
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, tool.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}").into()
}

/// Most buckets a per-name limit keeps: names come from agents (any name a glob matches), so
/// the map must not grow with every name an agent invents.
pub const MAX_TOOL_BUCKETS: usize = 4096;

/// The per-name buckets of one limit, keyed by tool name.
#[derive(Debug)]
pub(super) struct PerName {
    limit: Gcra,
    label: String,
    key: String,
    buckets: DashMap<Box<str>, Arc<Bucket>>,
    /// Shared by every name that finds the map full: stricter, never unbounded.
    overflow: Arc<Bucket>,
    /// When full buckets were last swept out (ns), so a flood of new names sweeps once a
    /// second at most.
    last_sweep: AtomicU64,
}

impl PerName {
    pub(super) fn new(limit: Gcra, label: String, key: String) -> PerName {
        PerName {
            overflow: Arc::new(Bucket::new(
                limit,
                format!("{label} (tools past {MAX_TOOL_BUCKETS} names)"),
                format!("{key}\0").into(),
            )),
            limit,
            label,
            key,
            buckets: DashMap::new(),
            last_sweep: AtomicU64::new(0),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.buckets.len()
    }

    /// [`State::try_take`] for a per-name limit (kept out of line: the map lookup is large).
    #[inline(never)]
    fn try_take(
        &self,
        name: Option<(&str, &str)>,
        now: u64,
        refused: &mut Option<Limited>,
    ) -> bool {
        match name {
            None => self.overflow.take_or_say(now, refused),
            Some(name) => self.bucket(name, Some(now)).take_or_say(now, refused),
        }
    }

    /// The bucket of `tool` (named on `upstream`, for the label). Keyed by the tool's name: a
    /// rule whose upstream part is a glob limits a tool name across the upstreams it matches
    /// together, never more loosely. A new name gets its own bucket while the map has room;
    /// when it is full, buckets that are full again (their state equals a fresh bucket's; for a
    /// fleet-wide limit, as far as this replica's grants show, and with no lease left) are
    /// dropped, and if that frees nothing the name shares the overflow bucket.
    fn bucket(&self, (upstream, tool): (&str, &str), now: Option<u64>) -> Arc<Bucket> {
        if let Some(b) = self.buckets.get(tool) {
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
                self.buckets.retain(|_, b| b.busy(now));
            }
            if self.buckets.len() >= MAX_TOOL_BUCKETS {
                return self.overflow.clone();
            }
        }
        self.buckets
            .entry(tool.into())
            .or_insert_with(|| {
                let label = format!("{} on {upstream}/{tool}", self.label);
                let key = format!("{}\0{}", self.key, key_part(tool));
                Arc::new(Bucket::new(self.limit, label, key.into()))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn rate(per_second: f64, burst: u64) -> Gcra {
        Gcra::new(per_second, burst)
    }

    #[test]
    fn burst_then_steady_rate_then_refill() {
        let b = Bucket::new(rate(10.0, 5), "t".into(), "k".into());
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
        let b = Bucket::new(rate(10.0 / 60.0, 3), "t".into(), "k".into());
        let t0 = 10 * SEC;
        assert!((0..3).all(|_| b.try_take(t0).is_ok()));
        let wait = b.try_take(t0).unwrap_err();
        assert_eq!(wait, 6 * SEC);
        assert!(b.try_take(t0 + 6 * SEC).is_ok());
        let h = Bucket::new(rate(1.0 / 3600.0, 1), "t".into(), "k".into());
        assert!(h.try_take(t0).is_ok());
        assert_eq!(h.try_take(t0).unwrap_err(), 3600 * SEC);
    }

    #[test]
    fn give_back_restores_exactly() {
        let b = Bucket::new(rate(1.0, 2), "t".into(), "k".into());
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
        let b = Arc::new(Bucket::new(rate(per_second, burst), "t".into(), "k".into()));
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
}
