//! A replica's lease on a fleet-wide bucket: tokens taken from Redis ahead of time in one step
//! and spent here with one atomic word, like a local bucket's. The lease asks for more before
//! it runs out (at half its size), and remembers for how long Redis said the bucket is empty
//! (so a flood of refused calls costs no Redis traffic).
//!
//! Tokens are never given back to Redis: in GCRA a granted token is time already spent, and
//! giving it back later could credit a bucket that has since refilled (minting tokens). What a
//! replica holds unspent, or loses when it dies, is earned back by the bucket within as many
//! emission intervals.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
/// A bucket Redis said is empty is asked again after this at the latest, whatever the wait
/// it gave: tokens given back by other replicas (or a Redis that restarted empty) are found.
pub const RECHECK_NS: u64 = 100_000_000;

/// What [`Lease::take`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Taken,
    /// Taken, and the lease is low: ask Redis for more now (this caller won the right to).
    TakenRefill,
    Empty,
}

/// One bucket's lease on this replica.
#[derive(Debug, Default)]
pub struct Lease {
    tokens: AtomicI64,
    /// Ask for more when the tokens fall to this.
    low: AtomicU64,
    /// A refill is on its way.
    refilling: AtomicBool,
    /// Redis said the bucket has nothing before this instant (ns, `now_ns` clock).
    empty_until: AtomicU64,
    /// Refuse without asking Redis until this instant (at most [`RECHECK_NS`] after it said
    /// empty).
    recheck_at: AtomicU64,
    /// This replica's view of the bucket's arrival time in Redis (ns, `now_ns` clock): its
    /// grants added up. Past it the bucket is full again as far as this replica knows.
    seen_tat: AtomicU64,
}

impl Lease {
    /// Takes one leased token.
    #[inline]
    pub fn take(&self) -> Take {
        let mut n = self.tokens.load(Ordering::Relaxed);
        loop {
            if n <= 0 {
                return Take::Empty;
            }
            match self
                .tokens
                .compare_exchange_weak(n, n - 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    let low = (n - 1) as u64 <= self.low.load(Ordering::Relaxed);
                    return if low && self.start_refill() {
                        Take::TakenRefill
                    } else {
                        Take::Taken
                    };
                }
                Err(actual) => n = actual,
            }
        }
    }

    /// Adds `n` tokens granted at `now` by a lease of size `size`, of a bucket whose emission
    /// interval is `interval` ns.
    pub fn put(&self, n: u64, now: u64, size: u64, interval: u64) {
        self.low.store(size / 2, Ordering::Relaxed);
        self.recheck_at.store(0, Ordering::Relaxed);
        let spent = n.saturating_mul(interval);
        let _ = self
            .seen_tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| {
                Some(t.max(now).saturating_add(spent))
            });
        self.tokens
            .fetch_add(n.min(i64::MAX as u64 / 2) as i64, Ordering::AcqRel);
    }

    /// Holds anything worth keeping at `now`: tokens, a refill under way, Redis's word that the
    /// bucket is drained, or grants the bucket has not yet earned back.
    pub fn busy(&self, now: u64) -> bool {
        self.tokens.load(Ordering::Relaxed) > 0
            || self.refilling.load(Ordering::Relaxed)
            || self.recheck_at.load(Ordering::Relaxed) > now
            || self.seen_tat.load(Ordering::Relaxed) > now
    }

    /// Returns a token [`take`](Self::take) gave (a call refused by another limit).
    pub fn put_back(&self) {
        self.tokens.fetch_add(1, Ordering::AcqRel);
    }

    /// Claims the right to ask for a refill (one at a time per bucket).
    pub fn start_refill(&self) -> bool {
        !self.refilling.load(Ordering::Relaxed)
            && self
                .refilling
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    pub fn end_refill(&self) {
        self.refilling.store(false, Ordering::Release);
    }

    /// While Redis's last word (at most [`RECHECK_NS`] old) is that the bucket is empty: how
    /// long until it has a token.
    pub fn known_empty(&self, now: u64) -> Option<u64> {
        if self.recheck_at.load(Ordering::Relaxed) <= now {
            return None;
        }
        Some(
            self.empty_until
                .load(Ordering::Relaxed)
                .saturating_sub(now)
                .max(1),
        )
    }

    /// Redis said at `now` that the bucket has no token for `wait` ns; it is asked again
    /// after `accrue` ns at the soonest (what a lease's worth takes to accrue), and
    /// [`RECHECK_NS`] at the latest.
    pub fn set_empty(&self, now: u64, wait: u64, accrue: u64) {
        self.empty_until
            .store(now.saturating_add(wait), Ordering::Relaxed);
        let recheck = wait.max(accrue).min(RECHECK_NS);
        self.recheck_at.store(now + recheck, Ordering::Relaxed);
    }

    /// Tokens held now.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed).max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn spends_asks_early_and_ends() {
        let l = Lease::default();
        let t = 10 * SEC;
        assert_eq!(l.take(), Take::Empty);
        l.put(4, t, 4, 1000);
        assert_eq!(l.take(), Take::Taken); // 3 left
        assert_eq!(l.take(), Take::TakenRefill); // 2 left: low, and nobody asked yet
        assert_eq!(l.take(), Take::Taken); // a refill is already on its way
        l.end_refill();
        assert_eq!(l.take(), Take::TakenRefill);
        assert_eq!(l.take(), Take::Empty);
        l.put_back();
        l.put(2, t, 4, 1000);
        assert_eq!(l.tokens(), 3);
    }

    #[test]
    fn busy_while_it_holds_anything() {
        let l = Lease::default();
        let t = 10 * SEC;
        assert!(!l.busy(t));
        // Six tokens of 1 ms each, granted at t: the bucket earns them back by t + 6 ms.
        l.put(6, t, 6, SEC / 1000);
        while l.take() != Take::Empty {}
        l.end_refill();
        assert!(l.busy(t + 6 * SEC / 1000 - 1));
        assert!(!l.busy(t + 6 * SEC / 1000));
        l.set_empty(t, SEC, 0);
        assert!(l.busy(t + 1));
    }

    #[test]
    fn an_empty_bucket_is_asked_again_soon_but_the_wait_is_told_whole() {
        let l = Lease::default();
        let t = 10 * SEC;
        assert_eq!(l.known_empty(t), None);
        l.set_empty(t, 3600 * SEC, 0);
        assert_eq!(l.known_empty(t + 1), Some(3600 * SEC - 1));
        assert_eq!(l.known_empty(t + RECHECK_NS), None);
        l.set_empty(t, SEC / 100, 0);
        assert_eq!(l.known_empty(t + SEC / 200), Some(SEC / 200));
        assert_eq!(l.known_empty(t + SEC / 100), None);
        // A token in 200 µs, a lease of 50 in 10 ms: asked again in 10 ms, the wait told as is.
        l.set_empty(t, SEC / 5000, SEC / 100);
        assert_eq!(l.known_empty(t + SEC / 1000), Some(1));
        assert!(l.known_empty(t + SEC / 100 - 1).is_some());
        assert_eq!(l.known_empty(t + SEC / 100), None);
        l.put(1, t, 1, 1000);
        assert_eq!(l.known_empty(t), None);
    }
}
