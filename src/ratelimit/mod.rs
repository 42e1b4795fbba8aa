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
pub mod fleet;
pub mod lease;
mod leased;
mod limit;

use std::rc::Rc;
use std::sync::Arc;

pub use bucket::{Bucket, Gcra, Limited, MAX_TOOL_BUCKETS, now_ns};
pub use fleet::{Fallback, Fleet, FleetSettings};
pub use leased::FleetLimiter;
pub use limit::{Limit, Rate, Use, Uses};

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

/// The limiter a worker uses: [`Local`], or [`FleetLimiter`] when limits hold across
/// replicas (state in Redis, leased; see [`fleet`]), which is why taking is awaited.
#[derive(Clone)]
pub enum Limiter {
    Local(Local),
    Fleet(Rc<FleetLimiter>),
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
            Limiter::Fleet(fleet) => fleet.admit(uses).await,
        }
    }

    /// Gives back what [`admit`](Self::admit) took.
    pub async fn release<'a>(&self, uses: &impl Uses<'a>) {
        match self {
            Limiter::Local(local) => local.release(uses),
            Limiter::Fleet(fleet) => fleet.release(uses),
        }
    }

    /// The fleet this limiter shares its limits with, if any.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        match self {
            Limiter::Local(_) => None,
            Limiter::Fleet(f) => Some(f.fleet()),
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
