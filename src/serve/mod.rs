//! The request path for one agent connection. [`handle_request`] is the sequence of stages, in
//! order; each stage either passes the request on or answers it with a [`Reply`] that never
//! reaches an upstream:
//!
//! ```text
//! ingress::read_head             head size/count limits (431), idle and header timeouts (408)
//! ingress::check_framing         Content-Length / chunked rules (400/501), one Host
//! ingress::no_body_without_post  no body on GET/HEAD/DELETE (400)
//! route::route                   /mcp, /mcp/<upstream>, admin routes (404/405)
//! route::check_origin            Host and Origin (403)
//! gate::authenticate             key / path key / JWT -> agent; upstream access (401/404)
//! ingress::read_body             SCOPEGATE_MAX_BODY (413), 100-continue, body timeout
//! admin::answer                  /healthz, /metrics, resource metadata
//! envelope                       the JSON-RPC fields, once (400 -32700/-32600)
//! audit gate                     503 while the audit log fails (SCOPEGATE_AUDIT_FAIL_CLOSED)
//! gate::check_envelope_headers   Mcp-Method / Mcp-Name agree with the body (400)
//! aggregate::handle              /mcp over several upstreams: the stages below per message
//! gate::authorize                every message, by the one method table (-32004)
//! gate::rate_limit               every bucket that applies (-32007)
//! gate::open_session             the sealed token -> the upstream's session id (404)
//! forward::forward               the upstream exchange and the relay of its answer
//! record::emit                   audit entries and metrics, for every outcome
//! ```

pub mod admin;
pub mod gate;
pub mod ingress;
pub mod memory;
pub mod record;
pub mod route;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use monoio::net::TcpStream;

use crate::audit::AuditSink;
use crate::audit::entry::Decision as AuditDecision;
use crate::core::{Core, shutting_down};
use crate::forward::{self, Exchange};
use crate::http::conn::Conn;
use crate::http::framing::Framing;
use crate::http::head::Head;
use crate::jwt::JwtVerifier;
use crate::mcp::envelope::EnvelopeParser;
use crate::mcp::jsonrpc::{self, Id};
use crate::mcp::lists::ListKind;
use crate::metrics::WorkerStats;
use crate::policy::Policy;
use crate::policy::decide;
use crate::policy::live::PolicyView;
use crate::reply::Reply;
use memory::ConnCache;
use record::{Draft, Sinks};
use route::Route;

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
    /// Client read buffers between requests: a connection takes one when its agent sends
    /// something and gives it back when the request is done.
    read_buffers: RefCell<Vec<BytesMut>>,
    /// Request state between requests; boxed so a connection takes and returns it as one
    /// pointer, not a copy of the whole state.
    #[allow(clippy::vec_box)]
    request_states: RefCell<Vec<Box<RequestState>>>,
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
            read_buffers: RefCell::new(Vec::new()),
            request_states: RefCell::new(Vec::new()),
        }
    }

    fn take_buffer(&self) -> BytesMut {
        self.read_buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(crate::http::conn::READ_CHUNK))
    }

    fn give_buffer(&self, mut buf: BytesMut) {
        let mut pool = self.read_buffers.borrow_mut();
        if pool.len() < MAX_POOLED && buf.capacity() <= MAX_POOLED_CAPACITY {
            buf.clear();
            pool.push(buf);
        }
    }

    fn take_state(&self) -> Box<RequestState> {
        self.request_states
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Box::new(RequestState::new(self.audit.is_some())))
    }

    fn give_state(&self, state: Box<RequestState>) {
        let mut pool = self.request_states.borrow_mut();
        if pool.len() < MAX_POOLED {
            pool.push(state);
        }
    }

    fn sinks(&self) -> Sinks<'_> {
        Sinks {
            worker: self.core.id,
            metrics: &self.core.stats.metrics,
            audit: self.audit.as_ref(),
            upstream_fragments: &self.upstream_fragments,
        }
    }
}

/// What serving one request needs besides the connection: the request head, the envelope
/// parser, the upstream exchange, the audit draft. Kept in a per-worker pool and held only
/// while a request is in progress, so an idle connection holds none of it.
pub struct RequestState {
    head: Head,
    parser: EnvelopeParser,
    exchange: Exchange,
    draft: Draft,
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

/// Serves requests on one agent connection until it closes.
pub async fn serve_connection(
    worker: &Worker,
    stream: TcpStream,
    peer: SocketAddr,
    idle: &Cell<bool>,
) {
    let mut client = Conn::new(stream);
    // The connection's memory of its key and session token stays with the connection (the
    // request state it is lent to goes back to a pool shared by all connections).
    let mut cache = ConnCache::default();
    loop {
        idle.set(client.buf.is_empty());
        if client.buf.is_empty() && client.buf.capacity() == 0 {
            // Idle with nothing buffered: wait for the agent holding no buffer and no request
            // state, then take both from the worker's pools.
            let wait = client.stream.readable(true);
            match monoio::time::timeout(worker.core.config.idle_timeout, wait).await {
                Ok(Ok(())) => client.buf = worker.take_buffer(),
                Ok(Err(_)) | Err(_) => return,
            }
        }
        let mut state = worker.take_state();
        std::mem::swap(&mut state.draft.cache, &mut cache);
        // Boxed: the request's state machine (every stage's locals, the upstream exchange) is
        // allocated while the request runs, not kept in every connection's task.
        let keep = Box::pin(serve_one(worker, &mut client, peer, idle, &mut state)).await;
        std::mem::swap(&mut state.draft.cache, &mut cache);
        worker.give_state(state);
        if !keep {
            return;
        }
        if let Some(buf) = client.take_idle_buffer() {
            worker.give_buffer(buf);
        }
    }
}

/// Whether the agent's connection carries another request.
enum KeepAlive {
    Yes,
    No,
}

/// Reads and answers one request, then records it; false when the connection must close.
async fn serve_one(
    worker: &Worker,
    client: &mut Conn,
    peer: SocketAddr,
    idle: &Cell<bool>,
    state: &mut RequestState,
) -> bool {
    let RequestState {
        head,
        parser,
        exchange,
        draft,
    } = state;
    let head_len = match ingress::read_head(&worker.core.config, client, head).await {
        Ok(Some(len)) => len,
        Ok(None) => return false,
        Err(reply) => {
            draft.reset(Instant::now());
            draft.bytes_in = client.buf.len() as u64;
            let written = client.written;
            let _ = answer(draft, client, b"", None, &reply, true).await;
            record::emit(&worker.sinks(), draft, b"", client.written - written).await;
            return false;
        }
    };
    idle.set(false);
    draft.reset(Instant::now());
    let written = client.written;
    // The head's spans point into the connection's buffer until `raw` is set.
    if head.method.get(&client.buf) == b"GET" {
        // A GET is usually an event stream that stays open: copy its head out and give the
        // read buffer back to the pool for as long as the stream lasts.
        head.raw = Bytes::copy_from_slice(&client.buf[..head_len]);
        let _ = client.buf.split_to(head_len);
        if let Some(buf) = client.take_idle_buffer() {
            worker.give_buffer(buf);
        }
    } else {
        head.raw = client.buf.split_to(head_len).freeze();
    }
    let outcome = handle_request(worker, client, head, parser, exchange, peer, draft).await;
    draft.bytes_in += head_len as u64;
    record::emit(
        &worker.sinks(),
        draft,
        head.method(),
        client.written - written,
    )
    .await;
    // The head shares the connection's buffer: let it go, so the next read reuses the buffer.
    head.raw = Bytes::new();
    matches!(outcome, Ok(KeepAlive::Yes)) && !shutting_down()
}

/// The stages of one request after its head, in order.
async fn handle_request(
    worker: &Worker,
    client: &mut Conn,
    head: &Head,
    parser: &mut EnvelopeParser,
    exchange: &mut Exchange,
    peer: SocketAddr,
    draft: &mut Draft,
) -> Result<KeepAlive, ()> {
    let config = &worker.core.config;
    let close = head.minor_version == 0 || crate::http::head::connection_has(head, "close");
    // One policy for the whole request, even if a reload lands meanwhile.
    let policy = worker.policy.as_ref().map(PolicyView::current);
    let method = head.method();

    // Ambiguous framing is refused and the connection closed: where would the next request
    // start?
    let framing = match ingress::check_framing(head)
        .and_then(|f| ingress::no_body_without_post(head, f).map(|()| f))
    {
        Ok(f) => f,
        Err(reply) => return answer(draft, client, method, None, &reply, true).await,
    };
    let admitted = route::route(config, head)
        .and_then(|r| route::check_origin(config, head).map(|()| r))
        .and_then(|r| {
            let jwt = worker.jwt.as_deref();
            gate::authenticate(config, jwt, policy.as_ref(), head, r, &mut draft.cache)
        });
    // A refused request's body is still read (within the same limits) so the connection stays
    // usable; one that announces `Expect: 100-continue` is answered at once instead.
    if let Err(reply) = &admitted
        && framing != Framing::Empty
        && head.get("expect").is_some()
    {
        return answer(draft, client, method, None, reply, true).await;
    }
    let body = match ingress::read_body(config, client, head, framing).await {
        Ok(b) => b,
        Err(reply) => return answer(draft, client, method, None, &reply, true).await,
    };
    draft.bytes_in = body.len() as u64;
    let admitted = match admitted {
        Ok(a) => a,
        Err(reply) => return answer(draft, client, method, None, &reply, close).await,
    };
    if let Some(reply) = admin::answer(
        admitted.route,
        config,
        head,
        &worker.all_stats,
        &worker.all_audit,
    ) {
        draft.skip = true;
        return answer(draft, client, method, None, &reply, close).await;
    }
    let upstream = match admitted.route {
        Route::Mcp { upstream: None } => {
            // Insecure-open mode (policy mode answered this at authentication, naming
            // nothing): with no agents to keep apart, the names help whoever set it up.
            let reply = unknown_upstream_listing(config, head);
            return answer(draft, client, method, None, &reply, close).await;
        }
        Route::Mcp { upstream } => upstream,
        _ => None,
    };
    let agent = admitted.agent;
    draft.upstream = upstream;
    draft.agent = agent;
    if draft.active {
        draft.policy = policy.clone();
        if let Some(token) = head.get("mcp-session-id") {
            draft.set_session(token);
        }
    }

    let envelope = match (method == b"POST").then(|| parser.parse(&body)) {
        None => None,
        Some(Ok(env)) => Some(env),
        Some(Err(e)) => {
            let reply = Reply::error(400, e.code(), e.message());
            return answer(draft, client, method, None, &reply, close).await;
        }
    };
    let request_id: Option<Id<'_>> = envelope.as_ref().and_then(|e| e.single()?.id);
    let p: Option<&Policy> = policy.as_deref().map(|p| &**p);
    let upstreams = p.map_or(&config.upstreams[..], |p| p.upstreams());
    if let Some(env) = &envelope {
        let max_args = worker.audit.as_ref().map_or(4096, |a| a.max_args);
        draft.messages_of(env, p, agent, max_args);
    }
    if let Some(reply) = audit_gate(worker.audit.as_ref()) {
        return answer(draft, client, method, request_id, &reply, close).await;
    }
    if let Some(env) = &envelope
        && let Err(reply) = gate::check_envelope_headers(head, env)
    {
        return answer(draft, client, method, request_id, &reply, close).await;
    }

    let Some(upstream) = upstream else {
        // The aggregate endpoint: authorization, limits and routing per message inside.
        let request = crate::aggregate::Request {
            core: &worker.core,
            head,
            body: &body,
            env: envelope.as_ref(),
            policy: p,
            upstreams,
            agent,
            peer,
            close: close || shutting_down(),
        };
        let result = Box::pin(crate::aggregate::handle(&request, client)).await;
        let (Ok(outcome) | Err(outcome)) = &result;
        draft.status = outcome.status;
        draft.decision = outcome.decision;
        draft.reason = outcome.reason.clone();
        draft.upstream = outcome.upstream;
        draft.upstream_us = outcome.upstream_us;
        return match result {
            Ok(o) if o.keep_alive => Ok(KeepAlive::Yes),
            Ok(_) => Ok(KeepAlive::No),
            Err(_) => Err(()),
        };
    };

    // Policy mode: authorize, limit, open the session; then forward what passed.
    let mut upstream_session: Option<&[u8]> = None;
    if let (Some(policy), Some(agent)) = (p, agent) {
        let mut refused = envelope
            .as_ref()
            .and_then(|env| gate::authorize(policy, agent, upstream, head, env));
        if refused.is_none()
            && let Some(env) = &envelope
        {
            let (limiter, status) = (&worker.core.limiter, config.rate_limit_status);
            refused = gate::rate_limit(limiter, status, policy, agent, upstream, env).await;
        }
        if let Some(reply) = refused {
            return answer(draft, client, method, None, &reply, close).await;
        }
        if let Some(token) = head.get("mcp-session-id") {
            let sessions = &worker.core.sessions;
            match gate::open_session(sessions, policy, agent, upstream, token, &mut draft.cache) {
                Some(s) => upstream_session = Some(s),
                None => {
                    let reply = Reply::error(
                        404,
                        jsonrpc::SESSION_NOT_FOUND,
                        "session not found: initialize a new session",
                    )
                    .denied();
                    return answer(draft, client, method, request_id, &reply, close).await;
                }
            }
        }
    }

    let messages = envelope.as_ref().map_or(&[][..], |e| e.messages());
    let seal;
    let visible;
    let mut plan = forward::Plan::for_messages(messages);
    plan.request_id = request_id;
    plan.scan_is_error = draft.active
        && envelope
            .as_ref()
            .and_then(|e| e.single())
            .is_some_and(|m| m.method == Some("tools/call"));
    if let (Some(policy), Some(agent)) = (p, agent) {
        let (agent_id, upstream_name) = (
            policy.agents[agent].id.as_str(),
            upstreams[upstream].name.as_str(),
        );
        let sessions = &worker.core.sessions;
        seal = move |id: &[u8]| sessions.seal(agent_id, upstream_name, id);
        visible =
            move |kind: ListKind, item: &str| decide::visible(policy, agent, upstream, kind, item);
        plan.strip_credentials = true;
        plan.upstream_session = upstream_session;
        plan.seal_session = Some(&seal);
        // Every list the agent can receive is filtered: JSON answers to its list requests,
        // and any list result on an event stream (replays included).
        plan.visible = Some(&visible);
    }
    let close_after = close || shutting_down();
    let relayed = forward::forward(
        &worker.core,
        exchange,
        client,
        head,
        body,
        &upstreams[upstream],
        peer,
        close_after,
        &plan,
    )
    .await;
    draft.upstream_us = exchange.upstream_us;
    draft.is_error = exchange.is_error.found;
    match relayed {
        Ok(relayed) => {
            draft.status = exchange.status;
            if let Some(why) = relayed.failure {
                draft.decision = AuditDecision::UpstreamError;
                draft.reason = Some(why);
            }
            Ok(if relayed.keep_alive {
                KeepAlive::Yes
            } else {
                KeepAlive::No
            })
        }
        Err(forward::ForwardError::BeforeResponse(reply)) => {
            let reply = reply.upstream_error(draft.upstream);
            answer(draft, client, method, request_id, &reply, close).await
        }
        Err(forward::ForwardError::MidResponse(why)) => {
            draft.status = exchange.status;
            draft.decision = AuditDecision::UpstreamError;
            draft.reason = Some(format!("the response was cut off mid-body: {why}"));
            Err(())
        }
        Err(forward::ForwardError::AgentGone) => {
            // The agent's doing: the call was allowed and relayed until it left.
            draft.status = exchange.status;
            draft.reason =
                Some("the agent closed the connection while the answer was relayed".into());
            Err(())
        }
    }
}

/// `SCOPEGATE_AUDIT_FAIL_CLOSED=1` with a failing audit log: new calls are refused (503).
fn audit_gate(audit: Option<&AuditSink>) -> Option<Reply> {
    audit.filter(|a| a.refusing()).map(|_| {
        Reply::error(
            503,
            jsonrpc::AUDIT_UNAVAILABLE,
            "the audit log cannot be written; calls are refused until it can (SCOPEGATE_AUDIT_FAIL_CLOSED)",
        )
    })
}

/// An unknown upstream in insecure-open mode, with the configured names.
fn unknown_upstream_listing(config: &crate::config::Config, head: &Head) -> Reply {
    let mut reply = route::unknown_upstream(head);
    let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
    if let crate::reply::Body::Error(e) = &mut reply.body {
        e.message.push_str("; configured: ");
        e.message.push_str(&names.join(", "));
    }
    reply
}

/// Writes a reply scopegate answers with, records it in the draft, and says whether the
/// connection goes on. The one place such replies are written.
async fn answer(
    draft: &mut Draft,
    client: &mut Conn,
    method: &[u8],
    id: Option<Id<'_>>,
    reply: &Reply,
    close: bool,
) -> Result<KeepAlive, ()> {
    let close = close || reply.close;
    draft.replied(reply);
    let (res, _) = client.write_all(reply.render(method, id, close)).await;
    res.map_err(|_| ())?;
    if close {
        if reply.status >= 400 {
            ingress::linger_close(client).await;
        }
        return Ok(KeepAlive::No);
    }
    Ok(KeepAlive::Yes)
}
