//! The running policy, replaceable on reload. Workers cache an `Arc` and compare a generation
//! number between requests (one atomic load of a word written only on reload); only a reload
//! touches the mutex. A request holds the policy through a per-worker `Rc`, so no reference
//! count shared between cores changes per request.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Policy;

pub struct LivePolicy {
    generation: AtomicU64,
    current: Mutex<Arc<Policy>>,
}

impl LivePolicy {
    pub fn new(policy: Policy) -> LivePolicy {
        LivePolicy {
            generation: AtomicU64::new(1),
            current: Mutex::new(Arc::new(policy)),
        }
    }

    /// Installs a new policy; rate-limit buckets whose limit did not change keep their state.
    pub fn replace(&self, mut policy: Policy) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        policy.inherit_rate_state(&current);
        *current = Arc::new(policy);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn snapshot(&self) -> Arc<Policy> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The policy as a request holds it. The `Rc` is the point: cloning it per request touches a
/// counter only this worker uses, where cloning the `Arc` would make every core write the same
/// shared reference count.
#[allow(clippy::redundant_allocation)]
pub type LocalPolicy = Rc<Arc<Policy>>;

/// A worker's view: the policy it serves with until the generation moves.
pub struct PolicyView {
    live: Arc<LivePolicy>,
    cached: RefCell<(u64, LocalPolicy)>,
}

impl PolicyView {
    pub fn new(live: Arc<LivePolicy>) -> PolicyView {
        let generation = live.generation.load(Ordering::Acquire);
        let policy = live.snapshot();
        PolicyView {
            live,
            cached: RefCell::new((generation, Rc::new(policy))),
        }
    }

    /// The current policy; called once per request, so a request sees one policy throughout.
    pub fn current(&self) -> LocalPolicy {
        let generation = self.live.generation.load(Ordering::Acquire);
        let mut cached = self.cached.borrow_mut();
        if cached.0 != generation {
            *cached = (generation, Rc::new(self.live.snapshot()));
        }
        cached.1.clone()
    }
}
