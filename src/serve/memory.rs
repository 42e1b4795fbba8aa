//! What a connection remembers between its requests, so the same key and session token are
//! not hashed, decoded and decrypted again on every request; and what the worker's registry
//! sees of it ([`Activity`]).

use std::cell::Cell;

/// What a connection remembers between its requests, so the same key and session token are
/// not hashed, decoded and decrypted again on every request. Each entry is keyed by the exact
/// bytes the agent sent; the key's entry also by the policy it was looked up in (a reload
/// invalidates it).
#[derive(Default)]
pub struct ConnCache {
    /// The last bearer key, the policy it was looked up in, and its agent.
    pub key: Vec<u8>,
    pub key_policy: Option<crate::policy::live::LocalPolicy>,
    pub key_agent: usize,
    /// The last session token opened, and what it opened to.
    pub token: Vec<u8>,
    pub token_agent: String,
    pub token_upstream: String,
    pub token_session: Vec<u8>,
    /// The last session token hashed for the audit log, and its hash.
    pub hashed_token: Vec<u8>,
    pub token_hash: Vec<u8>,
    /// The connection was accepted while draining: it is there for answers to requests in
    /// flight (an agent's answer to a sampling or elicitation request), nothing else.
    pub draining: bool,
}

impl ConnCache {
    /// Whether anything here is the connection's (a key, a session token, a token's hash): then
    /// it must stay with the connection, not go back to the pool with the request state.
    pub fn remembers(&self) -> bool {
        !self.key.is_empty()
            || self.key_policy.is_some()
            || !self.token.is_empty()
            || !self.token_agent.is_empty()
            || !self.token_upstream.is_empty()
            || !self.token_session.is_empty()
            || !self.hashed_token.is_empty()
            || !self.token_hash.is_empty()
    }
}

/// What the worker's registry of connections sees of one: whether it waits between requests,
/// and how many requests it has begun, so a sweep can tell a connection that stayed idle from one
/// that served requests in between. The idle timeout is the sweep's (the worker's), not a timer
/// each idle connection holds: a timer is most of an idle connection's memory. A connection is
/// idle from its start (a TLS handshake counts) until the first byte of a request arrives.
pub struct Activity {
    idle: Cell<bool>,
    begun: Cell<u32>,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            idle: Cell::new(true),
            begun: Cell::new(0),
        }
    }
}

impl Activity {
    pub fn is_idle(&self) -> bool {
        self.idle.get()
    }

    pub fn begun(&self) -> u32 {
        self.begun.get()
    }

    pub(super) fn set_idle(&self, idle: bool) {
        self.idle.set(idle);
    }

    /// A request has begun (its first bytes are here): busy until it is answered.
    pub(super) fn begin(&self) {
        self.idle.set(false);
        self.begun.set(self.begun.get().wrapping_add(1));
    }
}
