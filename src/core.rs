//! What one core's connection tasks share below the request path: the configuration, the
//! upstreams' keep-alive pool, the counters, the session keys, the rate limiter and the
//! aggregate endpoint's late joins. The forwarding and aggregate code take a `&Core`, never the
//! whole worker; the shutdown flag lives here so that every layer can ask it. Also what those
//! layers are handed: a request that [`Passed`] the gates.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::Config;
use crate::http::head::Head;
use crate::mcp::envelope::Envelope;
use crate::mcp::lists;
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

/// Per upstream (by name), how many times one of its lists changed (a `list_changed`
/// notification any core relayed): shared by the cores, so a result cached before the change
/// is not served by any of them.
#[derive(Default)]
pub struct ListChanges(dashmap::DashMap<String, u64>);

impl ListChanges {
    pub fn new() -> ListChanges {
        ListChanges::default()
    }

    /// How many changes of upstream `name` were seen so far.
    pub fn epoch(&self, name: &str) -> u64 {
        self.0.get(name).map_or(0, |e| *e)
    }

    fn changed(&self, name: &str) {
        *self.0.entry(name.to_owned()).or_insert(0) += 1;
    }
}

/// What a cached list result answers: one page of one list of one upstream (its definition:
/// name, address and injected headers, so a reload that changes any of them shares nothing),
/// in one revision, for one set of client capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListKey {
    pub upstream: String,
    pub method: &'static str,
    /// The upstream's own cursor, as JSON.
    pub cursor: Option<String>,
    pub version: Vec<u8>,
    /// The client capabilities sent with the request (2026-07-28 `_meta`), as JSON.
    pub capabilities: Vec<u8>,
}

impl ListKey {
    /// The part of the key that names upstream `u`.
    pub fn upstream_of(u: &Upstream) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        u.headers.hash(&mut h);
        format!("{}\0{}\0{:x}", u.name, u.transport, h.finish())
    }
}

/// Upstream list results that the upstream let be shared (`cacheScope: "public"`, 2026-07-28
/// caching hints, read by [`lists::shared_for`]), kept on this core for their `ttlMs`. They
/// are the upstream's answers before any policy: each agent's answer is still filtered for
/// that agent. A `list_changed` from the upstream ends them early ([`ListCache::saw`]).
pub struct ListCache {
    entries: RefCell<HashMap<ListKey, Cached>>,
    /// The bytes of the cached answers, as the upstream sent them.
    bytes: std::cell::Cell<usize>,
    changes: Arc<ListChanges>,
}

struct Cached {
    expires: Instant,
    /// The upstream's change count when the request was sent.
    epoch: u64,
    name: String,
    size: usize,
    result: serde_json::Value,
}

/// What one core keeps at most: past it, expired entries go, then everything.
const LIST_CACHE_BYTES: usize = 32 << 20;
/// A larger answer is not kept.
const LIST_CACHE_MAX_ANSWER: usize = 1 << 20;
/// The longest a result is kept, whatever its `ttlMs` says.
const LIST_CACHE_MAX_TTL: Duration = Duration::from_secs(3600);

impl ListCache {
    pub fn new(changes: Arc<ListChanges>) -> ListCache {
        ListCache {
            entries: RefCell::new(HashMap::new()),
            bytes: std::cell::Cell::new(0),
            changes,
        }
    }

    /// A fresh cached result (its `ttlMs` what is left of it), or `None`.
    pub fn get(&self, key: &ListKey, name: &str) -> Option<serde_json::Value> {
        let mut entries = self.entries.borrow_mut();
        let entry = entries.get(key)?;
        let now = Instant::now();
        if entry.expires > now && entry.epoch == self.changes.epoch(name) {
            // Fresh for what is left of its TTL, not for a whole TTL again.
            let mut result = entry.result.clone();
            let left = entry.expires.duration_since(now).as_millis() as u64;
            result["ttlMs"] = left.max(1).into();
            return Some(result);
        }
        if let Some(gone) = entries.remove(key) {
            self.bytes.set(self.bytes.get() - gone.size);
        }
        None
    }

    /// The change count of upstream `name`, read before asking it: a change that lands while
    /// the answer is on its way makes that answer stale at once.
    pub fn epoch(&self, name: &str) -> u64 {
        self.changes.epoch(name)
    }

    /// Keeps `result` (an answer of `size` bytes, asked when upstream `name` was at change
    /// count `epoch`) when its upstream let it be shared.
    pub fn put(
        &self,
        key: ListKey,
        name: &str,
        epoch: u64,
        size: usize,
        result: &serde_json::Value,
    ) {
        let Some(ttl) = lists::shared_for(result) else {
            return;
        };
        if size > LIST_CACHE_MAX_ANSWER || epoch != self.changes.epoch(name) {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.borrow_mut();
        if self.bytes.get() + size > LIST_CACHE_BYTES {
            entries.retain(|_, e| e.expires > now);
            if entries.values().map(|e| e.size).sum::<usize>() + size > LIST_CACHE_BYTES {
                entries.clear();
            }
            self.bytes.set(entries.values().map(|e| e.size).sum());
        }
        let entry = Cached {
            expires: now + ttl.min(LIST_CACHE_MAX_TTL),
            epoch,
            name: name.to_owned(),
            size,
            result: result.clone(),
        };
        self.bytes.set(self.bytes.get() + size);
        if let Some(old) = entries.insert(key, entry) {
            self.bytes.set(self.bytes.get() - old.size);
        }
    }

    /// Notes an upstream message relayed to an agent: a `list_changed` notification in it ends
    /// every core's cached results of upstream `name`.
    pub fn saw(&self, name: &str, message: &[u8]) {
        if lists::is_list_changed(message) {
            self.changes.changed(name);
            let mut entries = self.entries.borrow_mut();
            entries.retain(|_, e| e.name != name);
            self.bytes.set(entries.values().map(|e| e.size).sum());
        }
    }
}

/// A request that passed the request path's gates, as the layers below take it (the aggregate
/// endpoint, or one upstream's exchange): the head and body as received, the envelope parsed
/// once, who sent it under which policy, and the upstreams behind the gateway.
pub struct Passed<'a> {
    pub core: &'a Core,
    /// The agent's trace context (W3C `traceparent`), and scopegate's span for the hop.
    pub trace: Option<crate::http::trace::Hop>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(up: &str) -> ListKey {
        ListKey {
            upstream: up.into(),
            method: "tools/list",
            cursor: None,
            version: b"2026-07-28".to_vec(),
            capabilities: b"{}".to_vec(),
        }
    }

    #[test]
    fn only_public_results_are_kept_and_a_list_change_ends_them_on_every_core() {
        let changes = Arc::new(ListChanges::new());
        let (one, two) = (ListCache::new(changes.clone()), ListCache::new(changes));
        let public = json!({"tools": [], "cacheScope": "public", "ttlMs": 60_000});
        let private = json!({"tools": [], "cacheScope": "private", "ttlMs": 60_000});
        one.put(key("p"), "gh", one.epoch("gh"), 10, &private);
        assert!(one.get(&key("p"), "gh").is_none(), "private is not shared");
        for cache in [&one, &two] {
            cache.put(key("a"), "gh", cache.epoch("gh"), 10, &public);
            let hit = cache.get(&key("a"), "gh").unwrap();
            assert!(hit["ttlMs"].as_u64().unwrap() <= 60_000);
        }
        // gh's list changed, seen on core one: core two's copy is stale too.
        one.saw(
            "gh",
            br#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#,
        );
        assert!(two.get(&key("a"), "gh").is_none());
        // A change while an answer was on its way: that answer is not kept.
        let before = two.epoch("gh");
        two.saw("gh", b"notifications/prompts/list_changed");
        two.put(key("a"), "gh", before, 10, &public);
        assert!(two.get(&key("a"), "gh").is_none());
        // Too large to keep.
        two.put(
            key("b"),
            "gh",
            two.epoch("gh"),
            LIST_CACHE_MAX_ANSWER + 1,
            &public,
        );
        assert!(two.get(&key("b"), "gh").is_none());
    }
}
