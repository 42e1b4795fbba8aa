//! What one core's connection tasks share below the request path: the configuration, the
//! upstreams' keep-alive pool, the counters, the session keys, the rate limiter and the
//! aggregate endpoint's late joins. The forwarding and aggregate code take a `&Core`, never the
//! whole worker; the shutdown flag lives here so that every layer can ask it. Also what those
//! layers are handed: a request that [`Passed`] the gates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use crate::config::Config;
use crate::http::head::Head;
use crate::mcp::envelope::Envelope;
use crate::mcp::session::{LazyJoins, SessionKeys};
use crate::metrics::WorkerStats;
use crate::policy::Policy;
use crate::ratelimit::Limiter;
use crate::upstream::{Pool, Upstream};

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
        limiter: Limiter,
    ) -> Core {
        Core {
            id,
            pool: Pool::new(config.egress.clone()),
            config,
            stats,
            sessions,
            limiter,
            lazy_joins: LazyJoins::default(),
        }
    }
}

/// A request that passed the request path's gates, as the layers below take it (the aggregate
/// endpoint, or one upstream's exchange): the head and body as received, the envelope parsed
/// once, who sent it under which policy, and the upstreams behind the gateway.
pub struct Passed<'a> {
    pub core: &'a Core,
    pub head: &'a Head,
    pub body: Bytes,
    /// The JSON-RPC envelope of a POST, parsed once.
    pub env: Option<Envelope<'a>>,
    pub policy: Option<&'a Policy>,
    /// The upstreams behind the gateway (the policy's in policy mode).
    pub upstreams: &'a [Upstream],
    pub agent: Option<usize>,
    pub peer: SocketAddr,
    /// The connection closes after this request (the agent asked, spoke HTTP/1.0, or
    /// scopegate is shutting down).
    pub close: bool,
}
