//! What one core's connection tasks share below the request path: the configuration, the
//! upstreams' keep-alive pool, the counters, the session keys, the rate limiter and the aggregate endpoint's late
//! joins. The forwarding and aggregate code take a `&Core`, never the whole worker; the shutdown
//! flag lives here so that every layer can ask it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Config;
use crate::mcp::session::{LazyJoins, SessionKeys};
use crate::metrics::WorkerStats;
use crate::ratelimit::Limiter;
use crate::upstream::Pool;

/// Set once by the main thread on SIGTERM/SIGINT; read between requests.
pub static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

pub fn shutting_down() -> bool {
    SHUTTING_DOWN.load(Ordering::Relaxed)
}

/// One core's shared handles (single-threaded: the pool and the joins are `RefCell`s).
pub struct Core {
    pub id: usize,
    pub config: Arc<Config>,
    pub pool: Pool,
    /// This core's counters (written only by it).
    pub stats: Arc<WorkerStats>,
    pub sessions: Arc<SessionKeys>,
    /// Takes rate-limit tokens.
    pub limiter: Limiter,
    /// Upstreams the aggregate endpoint joined after a session's initialize.
    pub lazy_joins: LazyJoins,
}

impl Core {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        stats: Arc<WorkerStats>,
        sessions: Arc<SessionKeys>,
    ) -> Core {
        Core {
            id,
            pool: Pool::new(),
            config,
            stats,
            sessions,
            limiter: Limiter::default(),
            lazy_joins: LazyJoins::default(),
        }
    }
}
