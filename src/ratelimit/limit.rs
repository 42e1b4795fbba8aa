//! What a limit is: a policy `rate` under a key that names it, and the uses a request makes
//! of limits.

use std::sync::Arc;

use super::bucket::{Bucket, Gcra, PerName, State};

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
    pub(super) state: Arc<State>,
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
            State::PerName(PerName::new(gcra, label.clone(), key.clone()))
        } else {
            State::One(Arc::new(Bucket::new(
                gcra,
                label.clone(),
                key.as_str().into(),
            )))
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
