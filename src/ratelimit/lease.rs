//! A replica's lease on a fleet-wide bucket: tokens reserved from Redis in one step and spent
//! here with one atomic word, like a local bucket's. The lease asks for more before it runs
//! out (at half its size), remembers for how long Redis said the bucket is empty (so a flood
//! of refused calls costs no Redis traffic), and ends: tokens unspent after [`LEASE_TTL`] go
//! back to the bucket, so a replica that stops calling does not sit on them.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// How long leased tokens stay spendable here before they are given back.
pub const LEASE_TTL_NS: u64 = 1_000_000_000;
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
    /// The lease had ended: its tokens (this many) are to be given back, and it is empty.
    Expired(u64),
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
    /// The tokens held are spendable until this instant.
    expires: AtomicU64,
}

impl Lease {
    /// Takes one leased token at `now`.
    #[inline]
    pub fn take(&self, now: u64) -> Take {
        let mut n = self.tokens.load(Ordering::Relaxed);
        loop {
            if n <= 0 {
                return Take::Empty;
            }
            if now > self.expires.load(Ordering::Relaxed) {
                let back = self.tokens.swap(0, Ordering::AcqRel);
                return Take::Expired(back.max(0) as u64);
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

    /// Adds `n` tokens granted at `now` by a lease of size `size`.
    pub fn put(&self, n: u64, now: u64, size: u64) {
        self.low.store(size / 2, Ordering::Relaxed);
        self.expires.store(now + LEASE_TTL_NS, Ordering::Relaxed);
        self.recheck_at.store(0, Ordering::Relaxed);
        self.tokens.fetch_add(n as i64, Ordering::AcqRel);
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
        self.empty_until.store(now + wait, Ordering::Relaxed);
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
        assert_eq!(l.take(t), Take::Empty);
        l.put(4, t, 4);
        assert_eq!(l.take(t), Take::Taken); // 3 left
        assert_eq!(l.take(t), Take::TakenRefill); // 2 left: low, and nobody asked yet
        assert_eq!(l.take(t), Take::Taken); // a refill is already on its way
        l.end_refill();
        assert_eq!(l.take(t), Take::TakenRefill);
        assert_eq!(l.take(t), Take::Empty);
        l.put_back();
        l.put(2, t, 4);
        assert_eq!(l.tokens(), 3);
        // Past its end the lease gives its tokens back instead.
        assert_eq!(l.take(t + LEASE_TTL_NS + 1), Take::Expired(3));
        assert_eq!(l.take(t + LEASE_TTL_NS + 1), Take::Empty);
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
        l.put(1, t, 1);
        assert_eq!(l.known_empty(t), None);
    }
}
