//! What one core's connection tasks share below the request path: the configuration, the
//! upstreams' keep-alive pool, the counters, the session keys, the rate limiter and the
//! aggregate endpoint's late joins. The forwarding and aggregate code take a `&Core`, never the
//! whole worker; the shutdown flag lives here so that every layer can ask it. Also what those
//! layers are handed: a request that [`Passed`] the gates.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::Config;
use crate::http::head::Head;
use crate::mcp::envelope::Envelope;
use crate::mcp::session::{LazyJoins, SessionKeys};
use crate::metrics::WorkerStats;
use crate::policy::Policy;
use crate::policy::live::LivePolicy;
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
    /// Upstream list results the upstreams let be shared.
    pub list_cache: ListCache,
    /// The running policy (policy mode), which long-lived streams watch across reloads.
    pub live_policy: Option<Arc<LivePolicy>>,
}

impl Core {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        stats: Arc<WorkerStats>,
        sessions: Arc<SessionKeys>,
        limiter: Limiter,
        list_changes: Arc<ListChanges>,
        live_policy: Option<Arc<LivePolicy>>,
    ) -> Core {
        Core {
            id,
            pool: Pool::new(config.egress.clone()),
            config,
            stats,
            sessions,
            limiter,
            lazy_joins: LazyJoins::default(),
            list_cache: ListCache::new(list_changes),
            live_policy,
        }
    }
}

/// Per upstream, how many times one of its lists changed (a `list_changed` notification any
/// core relayed): shared by the cores, so a result cached before the change is not served by
/// any of them.
pub struct ListChanges(Vec<AtomicU64>);

impl ListChanges {
    pub fn new(upstreams: usize) -> ListChanges {
        ListChanges((0..upstreams).map(|_| AtomicU64::new(0)).collect())
    }

    fn epoch(&self, upstream: usize) -> u64 {
        self.0
            .get(upstream)
            .map_or(0, |e| e.load(Ordering::Acquire))
    }
}

/// What a cached list result answers: one page of one list of one upstream, in one revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListKey {
    pub upstream: usize,
    pub method: &'static str,
    /// The upstream's own cursor, as JSON.
    pub cursor: Option<String>,
    pub version: Vec<u8>,
}

/// Upstream list results that the upstream marked `cacheScope: "public"` (2026-07-28 caching
/// hints), kept on this core for their `ttlMs`. They are the upstream's answers before any
/// policy: each agent's answer is still filtered for that agent. A `list_changed` from the
/// upstream ends them early ([`ListCache::changed`]).
pub struct ListCache {
    entries: RefCell<HashMap<ListKey, Cached>>,
    changes: Arc<ListChanges>,
}

struct Cached {
    expires: Instant,
    epoch: u64,
    result: serde_json::Value,
}

/// Entries per core; past it, expired entries go, then everything.
const LIST_CACHE_ENTRIES: usize = 4096;
/// The longest a result is kept, whatever its `ttlMs` says.
const LIST_CACHE_MAX_TTL: Duration = Duration::from_secs(3600);

impl ListCache {
    pub fn new(changes: Arc<ListChanges>) -> ListCache {
        ListCache {
            entries: RefCell::new(HashMap::new()),
            changes,
        }
    }

    /// A fresh cached result, counted as a hit; `None` (counted as a miss by the caller's
    /// request upstream) otherwise.
    pub fn get(&self, key: &ListKey) -> Option<serde_json::Value> {
        let mut entries = self.entries.borrow_mut();
        let entry = entries.get(key)?;
        let now = Instant::now();
        if entry.expires > now && entry.epoch == self.changes.epoch(key.upstream) {
            // Fresh for what is left of its TTL, not for a whole TTL again.
            let mut result = entry.result.clone();
            let left = entry.expires.duration_since(now).as_millis() as u64;
            result["ttlMs"] = left.max(1).into();
            return Some(result);
        }
        entries.remove(key);
        None
    }

    /// Keeps `result` when its upstream let it be shared (`cacheScope: "public"`, `ttlMs` > 0).
    pub fn put(&self, key: ListKey, result: &serde_json::Value) {
        let public = result.get("cacheScope").and_then(|v| v.as_str()) == Some("public");
        let ttl = result.get("ttlMs").and_then(|v| v.as_u64()).unwrap_or(0);
        if !public || ttl == 0 {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= LIST_CACHE_ENTRIES {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= LIST_CACHE_ENTRIES {
                entries.clear();
            }
        }
        let epoch = self.changes.epoch(key.upstream);
        let expires = now + Duration::from_millis(ttl).min(LIST_CACHE_MAX_TTL);
        entries.insert(
            key,
            Cached {
                expires,
                epoch,
                result: result.clone(),
            },
        );
    }

    /// Upstream `upstream` announced that a list changed: every core's results from it are
    /// stale.
    pub fn changed(&self, upstream: usize) {
        if let Some(e) = self.changes.0.get(upstream) {
            e.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Notes an upstream message relayed to an agent: a `list_changed` notification in it ends
    /// that upstream's cached results.
    pub fn saw(&self, upstream: usize, message: &[u8]) {
        if memchr::memmem::find(message, b"/list_changed").is_some() {
            self.changed(upstream);
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
