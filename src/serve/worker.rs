//! What one worker's connection tasks share on the request path, and the per-worker pools
//! that let an idle connection hold no read buffer and no request state.

use std::cell::RefCell;
use std::sync::Arc;

use crate::tls::server::ListenerTls;

use bytes::BytesMut;

use super::record::{Draft, Sinks};
use crate::audit::AuditSink;
use crate::core::Core;
use crate::forward::Exchange;
use crate::http::head::Head;
use crate::jwt::JwtVerifier;
use crate::mcp::envelope::EnvelopeParser;
use crate::metrics::WorkerStats;
use crate::policy::live::PolicyView;

/// What one worker's connection tasks share on the request path: the core's handles, the
/// policy as this worker sees it, the JWT verifier, the audit sink, and the pools of read
/// buffers and request state that idle connections do not hold.
pub struct Worker {
    pub core: Core,
    /// The policy as this worker sees it (refreshed between requests after a reload).
    pub policy: Option<PolicyView>,
    pub jwt: Option<Arc<JwtVerifier>>,
    pub audit: Option<AuditSink>,
    /// Each upstream's `,"upstream":<name>` for audit entries, encoded once.
    pub upstream_fragments: Vec<Vec<u8>>,
    /// Every worker's counters and audit channels, for `/metrics`.
    pub all_stats: Arc<Vec<Arc<WorkerStats>>>,
    pub all_audit: Vec<Arc<crate::audit::writer::Channel>>,
    /// The HTTPS listener's configuration, when serving TLS.
    pub tls: Option<Arc<ListenerTls>>,
    /// Client read buffers between requests: a connection takes one when its agent sends
    /// something and gives it back when the request is done.
    read_buffers: RefCell<Vec<BytesMut>>,
    /// Request state between requests; boxed so a connection takes and returns it as one
    /// pointer, not a copy of the whole state.
    #[allow(clippy::vec_box)]
    request_states: RefCell<Vec<Box<RequestState>>>,
    /// Memory for the requests' state machines, reused ([`crate::alloc::FutureBlocks`]).
    pub request_blocks: crate::alloc::FutureBlocks,
}

/// Buffers and states kept for reuse per worker; beyond this, returned ones are freed.
const MAX_POOLED: usize = 128;
/// A buffer that grew past this (a large body) is freed rather than pooled.
const MAX_POOLED_CAPACITY: usize = 4 * crate::http::conn::READ_CHUNK;

impl Worker {
    pub fn new(
        core: Core,
        policy: Option<PolicyView>,
        jwt: Option<Arc<JwtVerifier>>,
        audit: Option<AuditSink>,
        all_stats: Arc<Vec<Arc<WorkerStats>>>,
        all_audit: Vec<Arc<crate::audit::writer::Channel>>,
        tls: Option<Arc<ListenerTls>>,
    ) -> Worker {
        Worker {
            upstream_fragments: core
                .config
                .upstreams
                .iter()
                .map(|u| crate::audit::entry::upstream_fragment(&u.name))
                .collect(),
            core,
            policy,
            jwt,
            audit,
            all_stats,
            all_audit,
            tls,
            read_buffers: RefCell::new(Vec::new()),
            request_states: RefCell::new(Vec::new()),
            request_blocks: crate::alloc::FutureBlocks::new(MAX_POOLED),
        }
    }

    pub(super) fn take_buffer(&self) -> BytesMut {
        self.read_buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(crate::http::conn::READ_CHUNK))
    }

    pub(super) fn give_buffer(&self, mut buf: BytesMut) {
        let mut pool = self.read_buffers.borrow_mut();
        if pool.len() < MAX_POOLED && buf.capacity() <= MAX_POOLED_CAPACITY {
            buf.clear();
            pool.push(buf);
        }
    }

    pub(super) fn take_state(&self) -> Box<RequestState> {
        self.request_states
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Box::new(RequestState::new(self.audit.is_some())))
    }

    pub(super) fn give_state(&self, mut state: Box<RequestState>) {
        // A pooled state holds nothing of its last request: not the policy it saw (a reload's
        // old policy would live on), nor the upstream answer's head (it shares the upstream
        // connection's read buffer, which a failed exchange did not reuse).
        state.draft.policy = None;
        state.exchange.release();
        let mut pool = self.request_states.borrow_mut();
        if pool.len() < MAX_POOLED {
            pool.push(state);
        }
    }

    /// `SCOPEGATE_AUDIT_MAX_ARGS`: how much of a call's arguments an audit entry keeps.
    pub(super) fn max_args(&self) -> usize {
        self.audit.as_ref().map_or(4096, |a| a.max_args)
    }

    pub(super) fn sinks(&self) -> Sinks<'_> {
        Sinks {
            worker: self.core.id,
            metrics: &self.core.stats.metrics,
            audit: self.audit.as_ref(),
            upstream_fragments: &self.upstream_fragments,
            upstreams: &self.core.config.upstreams,
            access_log: self.core.config.access_log,
            live: self.core.config.admin_token.is_some(),
        }
    }
}

/// What serving one request needs besides the connection: the request head, the envelope
/// parser, the upstream exchange, the audit draft. Kept in a per-worker pool and held only
/// while a request is in progress, so an idle connection holds none of it.
pub struct RequestState {
    pub(super) head: Head,
    pub(super) parser: EnvelopeParser,
    pub(super) exchange: Exchange,
    pub(super) draft: Draft,
}

impl RequestState {
    pub fn new(audit: bool) -> RequestState {
        RequestState {
            head: Head::default(),
            parser: EnvelopeParser::new(),
            exchange: Exchange::default(),
            draft: Draft {
                active: audit,
                ..Draft::default()
            },
        }
    }
}
