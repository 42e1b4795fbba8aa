//! Rate limits: what a limit is, and the limiter that takes tokens.
//!
//! A [`Limit`] is one `rate` of the policy file under a key that names it by ids
//! (`agent/<id>`, `tenant/<id>`, `upstream/<name>`, `tool/<agent>/<pattern>`), so the same
//! limit keeps its state across a reload and means the same thing on every replica. The policy
//! decides which limits a request falls in ([`Uses`], in a fixed order); the [`Limiter`] takes
//! one token from each, all or none.
//!
//! The local limiter keeps each limit's state in the limit itself: GCRA buckets of one atomic
//! word ([`bucket`]), shared by every worker, no mutex. [`Limiter::admit`] is `async` so that a
//! limiter backed by another process (limits shared across replicas) is one more variant; the
//! local one never waits.

pub mod bucket;

use std::sync::Arc;

pub use bucket::{Bucket, Gcra, Limited, MAX_TOOL_BUCKETS, now_ns};
use bucket::{PerName, State};

/// A rate: `per_second`, `per_minute` or `per_hour` (exactly one), and `burst`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    /// Requests per second (the per-minute/per-hour forms are converted).
    pub per_second: f64,
    pub burst: u64,
    /// As written, for messages: `20/s`, `10/min`, `120/h`.
    pub text: String,
}

impl Rate {
    /// For messages: `20/s, burst 40`.
    pub fn describe(&self) -> String {
        format!("{}, burst {}", self.text, self.burst)
    }
}

/// One limit of the policy.
#[derive(Debug, Clone)]
pub struct Limit {
    /// Names the limit by ids: the same key after a reload or on another replica is the same
    /// limit.
    pub key: String,
    pub rate: Rate,
    /// Says which limit this is, for the agent: `agent "triage-bot" (20/s, burst 40)`.
    pub label: String,
    /// The local state; shared with the limit of the same key and rate in the policy this one
    /// replaced.
    state: Arc<State>,
}

impl Limit {
    /// A limit with one bucket.
    pub fn new(key: String, rate: Rate, label: String) -> Limit {
        Limit::with(key, rate, label, false)
    }

    /// A limit with one bucket per name it is used with (a tool rule whose `match` is a glob
    /// limits each tool it matches separately), at most [`MAX_TOOL_BUCKETS`] of them.
    pub fn per_name(key: String, rate: Rate, label: String) -> Limit {
        Limit::with(key, rate, label, true)
    }

    fn with(key: String, rate: Rate, label: String, per_name: bool) -> Limit {
        let gcra = Gcra::new(rate.per_second, rate.burst);
        let state = if per_name {
            State::PerName(PerName::new(gcra, label.clone()))
        } else {
            State::One(Bucket::new(gcra, label.clone()))
        };
        Limit {
            state: Arc::new(state),
            key,
            rate,
            label,
        }
    }

    pub fn gcra(&self) -> Gcra {
        self.state.gcra()
    }

    /// After a reload: keep `old`'s state when it is the same limit (same key, same rate).
    pub fn inherit(&mut self, old: &Limit) {
        if self.key == old.key
            && self.gcra() == old.gcra()
            && std::mem::discriminant(&*self.state) == std::mem::discriminant(&*old.state)
        {
            self.state = old.state.clone();
        }
    }

    /// How many per-name buckets it holds (0 for a single-bucket limit).
    pub fn names(&self) -> usize {
        match &*self.state {
            State::One(_) => 0,
            State::PerName(p) => p.len(),
        }
    }
}

/// A limit one request falls in; `name` picks the bucket of a per-name limit
/// (`(upstream, tool)`).
#[derive(Debug, Clone, Copy)]
pub struct Use<'a> {
    pub limit: &'a Limit,
    pub name: Option<(&'a str, &'a str)>,
}

/// The limits one request falls in, in a fixed order. `visit` calls `f` with each until `f`
/// says stop (returns false); visiting again gives the same limits in the same order.
pub trait Uses<'a> {
    fn visit(&self, f: impl FnMut(Use<'a>) -> bool);
}

/// One limit alone.
impl<'a> Uses<'a> for Use<'a> {
    fn visit(&self, mut f: impl FnMut(Use<'a>) -> bool) {
        f(*self);
    }
}

/// Takes tokens from limits held in memory (this process's state).
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Local {
    /// Takes one token from every limit of `uses` at `now`, or none: when one refuses, the
    /// tokens already taken are given back (GCRA state is additive, so giving back restores the
    /// bucket exactly).
    pub fn admit<'a>(&self, uses: &impl Uses<'a>, now: u64) -> Result<(), Limited> {
        let mut taken = 0usize;
        let mut refused = None;
        uses.visit(|u| {
            let ok = u.limit.state.try_take(u.name, now, &mut refused);
            taken += usize::from(ok);
            ok
        });
        let Some(limited) = refused else {
            return Ok(());
        };
        uses.visit(|u| {
            if taken == 0 {
                return false;
            }
            u.limit.state.give_back(u.name);
            taken -= 1;
            true
        });
        Err(limited)
    }

    /// Gives back what [`admit`](Self::admit) took (a batch refused after some elements
    /// passed).
    pub fn release<'a>(&self, uses: &impl Uses<'a>) {
        uses.visit(|u| {
            u.limit.state.give_back(u.name);
            true
        });
    }
}

/// The limiter a worker uses. Only [`Local`] today; a limiter shared across replicas (state in
/// Redis) is another variant, which is why taking is awaited.
#[derive(Debug, Clone, Copy)]
pub enum Limiter {
    Local(Local),
}

impl Default for Limiter {
    fn default() -> Limiter {
        Limiter::Local(Local)
    }
}

impl Limiter {
    /// Takes one token from every limit in `uses`, or none.
    pub async fn admit<'a>(&self, uses: &impl Uses<'a>) -> Result<(), Limited> {
        match self {
            Limiter::Local(local) => local.admit(uses, now_ns()),
        }
    }

    /// Gives back what [`admit`](Self::admit) took.
    pub async fn release<'a>(&self, uses: &impl Uses<'a>) {
        match self {
            Limiter::Local(local) => local.release(uses),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_glob_rule_keeps_a_bounded_number_of_buckets() {
        // A `[[agent.tool]]` rule `match = "files/read_*"` with `rate = { per_second = 1,
        // burst = 1 }`, as the policy builds it.
        let limit = Limit::per_name(
            "tool/a/files/read_*".into(),
            Rate {
                per_second: 1.0,
                burst: 1,
                text: "1/s".into(),
            },
            "t".into(),
        );
        let admit = |name: &str, now: u64| {
            let one = Use {
                limit: &limit,
                name: Some(("files", name)),
            };
            Local.admit(&one, now)
        };
        let t0 = 100 * SEC;
        let per_tool = || limit.names();
        // Each new name gets its own bucket, up to the bound.
        for i in 0..MAX_TOOL_BUCKETS {
            assert!(admit(&format!("read_{i}"), t0).is_ok());
        }
        assert_eq!(per_tool(), MAX_TOOL_BUCKETS);
        // Past it, new names share one bucket (stricter, and no growth).
        assert!(admit("read_x", t0).is_ok());
        assert!(admit("read_y", t0).is_err());
        assert_eq!(per_tool(), MAX_TOOL_BUCKETS);
        // Once buckets are full again they are swept, and new names get their own again.
        let later = t0 + 10 * SEC;
        assert!(admit("read_z", later).is_ok());
        assert_eq!(per_tool(), 1);
        // Known names keep their own state throughout.
        assert!(admit("read_z", later).is_err());
    }
}
