//! The request path, stage by stage, for one client connection.
//!
//! ```text
//! read_head -> check_framing -> route -> check_origin -> read_body -> parse_envelope
//!           -> forward (upstream exchange + response relay) -> keep-alive or close
//! ```
//!
//! Each stage either passes the request on or ends it with a [`Refusal`], which becomes an HTTP
//! status and a JSON-RPC error written by scopegate itself; a refused request never reaches an
//! upstream. Authentication, authorization, rate limits and audit slot in between
//! `parse_envelope` and `forward`.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use monoio::net::TcpStream;

use crate::audit::entry::{Decision as AuditDecision, Entry, encode_message};
use crate::auth::{self, AuthError};
use crate::debug;
use crate::forward::{self, Exchange};
use crate::http::conn::{Conn, ReadError};
use crate::http::framing::{self, ChunkedDecoder, Framing};
use crate::http::head::{self, Head, HeadError, Span};
use crate::http::response;
use crate::jwt::JwtVerifier;
use crate::mcp::envelope::{EnvelopeParser, Id};
use crate::mcp::lists::ListKind;
use crate::mcp::{jsonrpc, origin};
use crate::policy::Policy;
use crate::policy::decide::{self, Decision};
use crate::policy::live::PolicyView;
use crate::worker::{Worker, shutting_down};

/// A request scopegate answers itself instead of forwarding.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub code: i32,
    pub message: String,
    /// Close the connection after answering (the rest of the stream cannot be trusted).
    pub close: bool,
    /// Extra header lines, each ending in CRLF.
    pub headers: String,
    /// What the audit log records.
    pub decision: AuditDecision,
}

impl Refusal {
    pub fn new(status: u16, code: i32, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
            close: false,
            headers: String::new(),
            decision: AuditDecision::Invalid,
        }
    }

    /// A refusal by policy (authentication, origin, session), not a malformed request.
    pub fn denied(mut self) -> Refusal {
        self.decision = AuditDecision::Denied;
        self
    }

    pub fn closing(mut self) -> Refusal {
        self.close = true;
        self
    }
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    /// RFC 9728 protected resource metadata.
    ResourceMetadata,
    /// Prometheus metrics.
    Metrics,
    /// An MCP endpoint backed by upstream `index`; `None`: a name no upstream has (answered
    /// only after authentication, and exactly as an upstream the agent may not use).
    Mcp {
        upstream: Option<usize>,
    },
    /// `/mcp` with several upstreams: all of them behind one MCP server.
    Aggregate,
}

/// What serving one request needs besides the connection: the request head, the envelope
/// parser, the upstream exchange, the audit draft and the connection caches. Kept in a
/// per-worker pool and held only while a request is in progress, so an idle connection holds
/// none of it.
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

/// Serves requests on one client connection until it closes.
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
            match monoio::time::timeout(worker.config.idle_timeout, client.stream.readable(true))
                .await
            {
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

/// Reads and answers one request; false when the connection must close.
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
    // Stage 1: the request head.
    let head_len = match read_head(worker, client, head).await {
        Ok(Some(len)) => len,
        Ok(None) => return false,
        Err(refusal) => {
            draft.reset(Instant::now());
            let written = client.written;
            if respond(client, None, &refusal, true).await.is_ok() {
                linger_close(client).await;
            }
            draft.status = refusal.status;
            draft.decision = refusal.decision;
            draft.reason = Some(refusal.message);
            draft.bytes_in = client.buf.len() as u64;
            emit(worker, draft, b"", client.written - written).await;
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
    // Bytes in: the head and the body.
    draft.bytes_in += head_len as u64;
    emit(worker, draft, head.method(), client.written - written).await;
    // The head shares the connection's buffer: let it go, so the next read reuses the buffer
    // instead of allocating a new one.
    head.raw = Bytes::new();
    matches!(outcome, Ok(KeepAlive::Yes)) && !shutting_down()
}

/// What the audit log records of the request in progress; reused across a connection's
/// requests so steady state allocates nothing for it.
#[derive(Default)]
pub struct Draft {
    /// The audit log is on.
    active: bool,
    /// Not an MCP request (health, metadata): not audited.
    skip: bool,
    started: Option<Instant>,
    time: Option<SystemTime>,
    policy: Option<crate::policy::live::LocalPolicy>,
    agent: Option<usize>,
    upstream: Option<usize>,
    /// 16 hex characters of SHA-256 of the agent's session token (empty: none); reused.
    session: Vec<u8>,
    /// Each message's method slot (for metrics).
    methods: Vec<usize>,
    /// Pre-encoded message fragments, one range per message.
    frags: Vec<u8>,
    messages: Vec<(usize, usize)>,
    scratch: Vec<u8>,
    /// Per-connection memory of the last key and session token (an agent sends the same ones
    /// on every request of a connection).
    cache: ConnCache,
    decision: AuditDecision,
    reason: Option<String>,
    status: u16,
    upstream_us: Option<u64>,
    is_error: Option<bool>,
    /// Body bytes read beyond what was buffered with the head.
    bytes_in: u64,
}

impl Draft {
    /// Starts a new request; the wall clock is read only when entries will be written.
    fn reset(&mut self, started: Instant) {
        self.skip = false;
        self.started = Some(started);
        self.time = self.active.then(SystemTime::now);
        self.policy = None;
        self.agent = None;
        self.upstream = None;
        self.session.clear();
        self.frags.clear();
        self.messages.clear();
        self.methods.clear();
        self.decision = AuditDecision::Allowed;
        self.reason = None;
        self.status = 0;
        self.upstream_us = None;
        self.is_error = None;
        self.bytes_in = 0;
    }

    fn set_session(&mut self, token: &[u8]) {
        if self.cache.hashed_token == token {
            self.session.clone_from(&self.cache.token_hash);
            return;
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, token);
        self.session.clear();
        crate::fmt::push_hex(&digest.as_ref()[..8], &mut self.session);
        self.cache.hashed_token.clear();
        self.cache.hashed_token.extend_from_slice(token);
        self.cache.token_hash.clone_from(&self.session);
    }
}

/// What a connection remembers between its requests, so the same key and session token are
/// not hashed, decoded and decrypted again on every request. Each entry is keyed by the exact
/// bytes the agent sent; the key's entry also by the policy it was looked up in (a reload
/// invalidates it).
#[derive(Default)]
pub struct ConnCache {
    /// The last bearer key, the policy it was looked up in, and its agent.
    key: Vec<u8>,
    key_policy: Option<crate::policy::live::LocalPolicy>,
    key_agent: usize,
    /// The last session token opened, and what it opened to.
    token: Vec<u8>,
    token_agent: String,
    token_upstream: String,
    token_session: Vec<u8>,
    /// Where tokens are decoded and decrypted.
    scratch: Vec<u8>,
    /// The last session token hashed for the audit log, and its hash.
    hashed_token: Vec<u8>,
    token_hash: Vec<u8>,
}

/// Writes the request's entries to the audit log: one per JSON-RPC message (one for a request
/// that carried none).
async fn emit(worker: &Worker, draft: &Draft, http_method: &[u8], bytes_out: u64) {
    if draft.skip {
        return;
    }
    let metrics = &worker.stats.metrics;
    let total_us = draft.started.map_or(0, |s| s.elapsed().as_micros() as u64);
    metrics.observe(total_us, draft.upstream_us);
    if draft.methods.is_empty() {
        metrics.count(crate::metrics::NO_MESSAGE, draft.decision, draft.upstream);
    }
    for &m in &draft.methods {
        metrics.count(m, draft.decision, draft.upstream);
    }
    let Some(audit) = &worker.audit else {
        return;
    };
    let policy = draft.policy.as_deref().map(|p| &**p);
    let identity: &[u8] = match (policy, draft.agent) {
        (Some(p), Some(a)) => p.agents.get(a).map_or(&[], |a| a.audit_identity.as_slice()),
        _ => &[],
    };
    let upstream: &[u8] = draft
        .upstream
        .and_then(|u| worker.upstream_fragments.get(u))
        .map_or(&[], Vec::as_slice);
    let session = (!draft.session.is_empty())
        .then(|| std::str::from_utf8(&draft.session).ok())
        .flatten();
    let mut entry = Entry {
        time: draft.time.unwrap_or_else(SystemTime::now),
        worker: worker.id,
        http_method,
        identity,
        upstream,
        session,
        message: b"",
        decision: draft.decision,
        reason: draft.reason.as_deref(),
        status: draft.status,
        upstream_us: draft.upstream_us,
        total_us,
        bytes_in: draft.bytes_in,
        bytes_out,
        is_error: draft.is_error,
    };
    if draft.messages.is_empty() {
        audit.record(&entry).await;
        return;
    }
    for &(start, end) in &draft.messages {
        entry.message = &draft.frags[start..end];
        audit.record(&entry).await;
    }
}

enum KeepAlive {
    Yes,
    No,
}

async fn handle_request(
    worker: &Worker,
    client: &mut Conn,
    head: &Head,
    parser: &mut EnvelopeParser,
    exchange: &mut Exchange,
    peer: SocketAddr,
    draft: &mut Draft,
) -> Result<KeepAlive, ()> {
    let client_wants_close = head.minor_version == 0 || head::connection_has(head, "close");
    // One policy for the whole request, even if a reload lands meanwhile.
    let policy = worker.policy.as_ref().map(PolicyView::current);

    // Stage 2: how the body is framed. Ambiguous framing is refused and the connection closed,
    // since we cannot know where the next request would start.
    let body_framing = match check_framing(head) {
        Ok(f) => f,
        Err(refusal) => return finish(draft, client, None, &refusal, true).await,
    };
    // A body on GET or DELETE has no meaning in MCP, and nothing would look at it before it
    // reached the upstream: refused, and the connection closed (its end cannot be trusted).
    if matches!(head.method(), b"GET" | b"DELETE" | b"HEAD") && body_framing != Framing::Empty {
        let refusal = Refusal::new(
            400,
            jsonrpc::GATEWAY_REFUSED,
            "GET, HEAD and DELETE requests carry no body here; this one is refused unread",
        );
        return finish(draft, client, None, &refusal, true).await;
    }

    // Stage 3: route, the DNS-rebinding checks, and who is calling.
    let admitted = route(worker, head)
        .and_then(|r| check_origin(worker, head).map(|()| r))
        .and_then(|r| authenticate(worker, policy.as_ref(), head, r, &mut draft.cache));

    // Stage 4: the body, within SCOPEGATE_MAX_BODY and SCOPEGATE_BODY_TIMEOUT_MS. A refused
    // request's body is still read (within the same limits) so the connection stays usable;
    // one that announces `Expect: 100-continue` is answered at once instead.
    if let Err(refusal) = &admitted
        && body_framing != Framing::Empty
        && head.get("expect").is_some()
    {
        return finish(draft, client, None, refusal, true).await;
    }
    let body = match read_body(worker, client, head, body_framing).await {
        Ok(b) => b,
        Err(refusal) => return finish(draft, client, None, &refusal, true).await,
    };
    draft.bytes_in = body.len() as u64;
    let admitted = match admitted {
        Ok(a) => a,
        Err(refusal) => return finish(draft, client, None, &refusal, client_wants_close).await,
    };
    let (upstream, agent) = match admitted.route {
        Route::Health => {
            draft.skip = true;
            let reply = response::build_for(
                head.method(),
                200,
                "text/plain",
                "",
                b"ok\n",
                client_wants_close,
            );
            return write_reply(draft, client, reply, client_wants_close).await;
        }
        Route::Metrics => {
            draft.skip = true;
            let body = metrics_text(worker);
            let reply = response::build(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                "",
                body.as_bytes(),
                client_wants_close,
            );
            return write_reply(draft, client, reply, client_wants_close).await;
        }
        Route::ResourceMetadata => {
            draft.skip = true;
            let reply = resource_metadata(worker, head, client_wants_close);
            return write_reply(draft, client, reply, client_wants_close).await;
        }
        Route::Mcp {
            upstream: Some(upstream),
        } => (Some(upstream), admitted.agent),
        Route::Mcp { upstream: None } => {
            // Insecure-open mode (policy mode answered this at authentication, naming
            // nothing): with no agents to keep apart, the names help whoever set it up.
            let mut refusal = unknown_upstream(head);
            let names: Vec<&str> = worker
                .config
                .upstreams
                .iter()
                .map(|u| u.name.as_str())
                .collect();
            refusal.message = format!("{}; configured: {}", refusal.message, names.join(", "));
            return finish(draft, client, None, &refusal, client_wants_close).await;
        }
        Route::Aggregate => (None, admitted.agent),
    };
    draft.upstream = upstream;
    draft.agent = agent;
    if draft.active {
        draft.policy = policy.clone();
        if let Some(token) = head.get("mcp-session-id") {
            draft.set_session(token);
        }
    }

    // Stage 5: the JSON-RPC envelope of every POST.
    let envelope = if head.method() == b"POST" {
        match parser.parse(&body) {
            Ok(env) => Some(env),
            Err(e) => {
                let refusal = Refusal::new(400, e.code(), e.message());
                return finish(draft, client, None, &refusal, client_wants_close).await;
            }
        }
    } else {
        None
    };
    let request_id: Option<Id<'_>> = envelope
        .as_ref()
        .and_then(|e| e.single())
        .and_then(|m| m.id);
    if let Some(env) = &envelope {
        for m in env.messages() {
            draft.methods.push(crate::metrics::method_index(
                m.method,
                m.kind == crate::mcp::envelope::Kind::Response,
            ));
        }
    }
    if draft.active
        && let Some(env) = &envelope
    {
        let redact = match (&policy, agent) {
            (Some(p), Some(a)) => p.agents[a].redact.as_slice(),
            _ => &[],
        };
        let max_args = worker.audit.as_ref().map_or(4096, |a| a.max_args);
        for m in env.messages() {
            let start = draft.frags.len();
            encode_message(
                m,
                env.arguments(m),
                redact,
                max_args,
                &mut draft.scratch,
                &mut draft.frags,
            );
            draft.messages.push((start, draft.frags.len()));
        }
    }
    if let Some(audit) = &worker.audit
        && audit.refusing()
    {
        let refusal = Refusal::new(
            503,
            jsonrpc::AUDIT_UNAVAILABLE,
            "the audit log cannot be written; calls are refused until it can (SCOPEGATE_AUDIT_FAIL_CLOSED)",
        );
        return finish(draft, client, request_id, &refusal, client_wants_close).await;
    }
    if let Some(env) = &envelope
        && let Err(refusal) = check_envelope_headers(head, env)
    {
        return finish(draft, client, request_id, &refusal, client_wants_close).await;
    }

    let Some(upstream) = upstream else {
        // The aggregate endpoint: authorization, rate limits and routing per message inside.
        let request = crate::aggregate::Request {
            worker,
            head,
            body: &body,
            env: envelope.as_ref(),
            policy: policy.as_deref().map(|p| &**p),
            agent,
            peer,
            close: client_wants_close || shutting_down(),
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

    // Stage 6: authorize what the upstream will execute (policy mode).
    if let (Some(policy), Some(agent), Some(env)) = (&policy, agent, &envelope)
        && let Some(reply) = authorize(policy, agent, upstream, head, env)
    {
        draft.decision = if reply.0 == 400 {
            AuditDecision::Invalid
        } else {
            AuditDecision::Denied
        };
        draft.reason = Some(reply.2);
        let reply = response::build(
            reply.0,
            "application/json",
            "",
            &reply.1,
            client_wants_close,
        );
        return write_reply(draft, client, reply, client_wants_close).await;
    }

    // Stage 7: rate limits (policy mode). Only what was authorized takes tokens.
    if let (Some(policy), Some(agent)) = (&policy, agent)
        && let Some((status, headers, body, limit)) =
            rate_limit(worker, policy, agent, upstream, envelope.as_ref())
    {
        draft.decision = AuditDecision::RateLimited;
        draft.reason = Some(limit);
        let reply = response::build(
            status,
            "application/json",
            &headers,
            &body,
            client_wants_close,
        );
        return write_reply(draft, client, reply, client_wants_close).await;
    }

    // Stage 8: the session: the agent's token opens to the upstream's session id, bound to
    // this agent and upstream.
    let upstream_session = match (&policy, agent, head.get("mcp-session-id")) {
        (Some(policy), Some(agent), Some(token)) => {
            match open_session(worker, policy, agent, upstream, token, &mut draft.cache) {
                Some(s) => Some(s),
                None => {
                    let refusal = Refusal::new(
                        404,
                        jsonrpc::SESSION_NOT_FOUND,
                        "session not found: initialize a new session",
                    )
                    .denied();
                    return finish(draft, client, request_id, &refusal, client_wants_close).await;
                }
            }
        }
        _ => None,
    };

    // Stage 9: forward upstream and relay the answer.
    let seal;
    let visible;
    let mut plan = forward::Plan::default();
    if let (Some(policy), Some(agent)) = (&policy, agent) {
        let upstream_def = &policy.upstreams()[upstream];
        plan.inject = &upstream_def.headers;
        plan.strip_credentials = true;
        plan.upstream_session = upstream_session;
        let agent_id = policy.agents[agent].id.as_str();
        let upstream_name = upstream_def.name.as_str();
        let sessions = &worker.sessions;
        seal = move |id: &[u8]| sessions.seal(agent_id, upstream_name, id);
        plan.seal_session = Some(&seal);
        // Every list the agent can receive is filtered: JSON answers to its list requests,
        // and any list result on an event stream (replays included).
        let p: &Policy = policy;
        visible = move |kind: ListKind, item: &str| decide::visible(p, agent, upstream, kind, item);
        plan.visible = Some(&visible);
        plan.lists_asked = envelope.as_ref().is_some_and(|e| {
            e.messages()
                .iter()
                .any(|m| matches!(decide::access(m.method, m.kind), decide::Access::List(_)))
        });
    }
    plan.request_id = request_id;
    plan.long_lived = envelope.as_ref().is_some_and(|e| {
        e.messages()
            .iter()
            .any(|m| decide::access(m.method, m.kind) == decide::Access::Listen)
    });
    plan.scan_is_error = draft.active
        && envelope
            .as_ref()
            .and_then(|e| e.single())
            .is_some_and(|m| m.method == Some("tools/call"));
    let relayed = forward::forward(
        worker,
        exchange,
        client,
        head,
        body,
        upstream,
        peer,
        client_wants_close || shutting_down(),
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
        Err(forward::ForwardError::BeforeResponse(mut refusal)) => {
            refusal.decision = AuditDecision::UpstreamError;
            let close = client_wants_close || refusal.close;
            finish(draft, client, request_id, &refusal, close).await
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

/// A routed, authenticated request.
struct Admitted {
    route: Route,
    /// The agent (index into the policy), in policy mode.
    agent: Option<usize>,
}

/// Stage 3c. In policy mode every MCP request names an agent by its key; the agent must be
/// allowed to use the upstream (else it is told the upstream does not exist).
fn authenticate(
    worker: &Worker,
    local: Option<&crate::policy::live::LocalPolicy>,
    head: &Head,
    routed: Routed,
    cache: &mut ConnCache,
) -> Result<Admitted, Refusal> {
    let policy = local.map(|p| &***p);
    let Routed { route, path_key } = routed;
    let (Some(policy), Route::Mcp { .. } | Route::Aggregate) = (policy, route) else {
        return Ok(Admitted { route, agent: None });
    };
    let unauthorized = |e: AuthError| {
        let mut r = Refusal::new(401, jsonrpc::UNAUTHENTICATED, e.message()).denied();
        r.headers = format!(
            "WWW-Authenticate: Bearer resource_metadata=\"{}\"\r\n",
            metadata_url(worker, head)
        );
        r
    };
    let header_key = auth::bearer(head).map_err(unauthorized)?;
    let path_key = path_key.map(|span| span.get(&head.raw));
    let key = match (header_key, path_key) {
        (Some(_), Some(_)) => return Err(unauthorized(AuthError::Invalid)),
        (Some(k), None) | (None, Some(k)) => k,
        (None, None) => return Err(unauthorized(AuthError::Missing)),
    };
    let agent = match &worker.jwt {
        Some(jwt) if JwtVerifier::looks_like_jwt(key) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let id = jwt.verify(key, now).map_err(|e| {
                debug!("JWT refused: {e:?}");
                unauthorized(AuthError::Invalid)
            })?;
            policy
                .agent_by_id(&id)
                .ok_or_else(|| unauthorized(AuthError::Invalid))?
        }
        _ => match (local, &cache.key_policy) {
            (Some(l), Some(c)) if std::rc::Rc::ptr_eq(l, c) && cache.key == key => cache.key_agent,
            _ => {
                let agent = auth::agent_for_key(policy, key).map_err(unauthorized)?;
                cache.key.clear();
                cache.key.extend_from_slice(key);
                cache.key_policy = local.cloned();
                cache.key_agent = agent;
                agent
            }
        },
    };
    if let Route::Mcp { upstream } = route
        && !upstream.is_some_and(|u| policy.may_use_upstream(agent, u))
    {
        return Err(unknown_upstream(head));
    }
    Ok(Admitted {
        route,
        agent: Some(agent),
    })
}

/// `/metrics`: every worker's counters, summed now.
fn metrics_text(worker: &Worker) -> String {
    use std::sync::atomic::Ordering;
    let workers: Vec<&crate::metrics::WorkerMetrics> =
        worker.all_stats.iter().map(|s| &s.metrics).collect();
    let names: Vec<String> = worker
        .config
        .upstreams
        .iter()
        .map(|u| u.name.clone())
        .collect();
    let audit = (!worker.all_audit.is_empty()).then(|| crate::metrics::AuditGauges {
        written: worker
            .all_audit
            .iter()
            .map(|c| c.written.load(Ordering::Relaxed))
            .sum(),
        pending_bytes: worker.all_audit.iter().map(|c| c.ring.used() as u64).sum(),
        write_errors: worker
            .all_audit
            .iter()
            .map(|c| c.write_errors.load(Ordering::Relaxed))
            .sum(),
        failing: worker
            .all_audit
            .iter()
            .any(|c| c.failing.load(Ordering::Relaxed)),
    });
    crate::metrics::render(&crate::metrics::Scrape {
        workers: &workers,
        upstream_names: &names,
        heap_allocations: worker
            .all_stats
            .iter()
            .map(|s| s.allocations.load(Ordering::Relaxed))
            .sum(),
        open_connections: worker
            .all_stats
            .iter()
            .map(|s| s.open_connections.load(Ordering::Relaxed) as u64)
            .sum(),
        audit,
    })
}

/// The URL of this gateway's protected resource metadata (RFC 9728).
fn metadata_url(worker: &Worker, head: &Head) -> String {
    format!(
        "{}/.well-known/oauth-protected-resource",
        public_base(worker, head)
    )
}

fn public_base(worker: &Worker, head: &Head) -> String {
    match &worker.config.public_url {
        Some(url) => url.clone(),
        None => {
            let host = head.get("host").unwrap_or(b"localhost");
            format!("http://{}", String::from_utf8_lossy(host))
        }
    }
}

/// `GET /.well-known/oauth-protected-resource`: RFC 9728 metadata for MCP's authorization.
fn resource_metadata(worker: &Worker, head: &Head, close: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(b"{\"resource\":");
    jsonrpc::write_json_string(&format!("{}/mcp", public_base(worker, head)), &mut body);
    body.extend_from_slice(b",\"authorization_servers\":[");
    for (i, server) in worker.config.auth_servers.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        jsonrpc::write_json_string(server, &mut body);
    }
    body.extend_from_slice(
        b"],\"bearer_methods_supported\":[\"header\"],\"resource_name\":\"scopegate\"}",
    );
    response::build_for(
        head.method(),
        200,
        "application/json",
        "Cache-Control: max-age=300\r\n",
        &body,
        close,
    )
}

/// 2026-07-28 routing headers must agree with the body: the body is what executes.
fn check_envelope_headers(
    head: &Head,
    env: &crate::mcp::envelope::Envelope<'_>,
) -> Result<(), Refusal> {
    let mismatch = |what: &str| {
        Refusal::new(
            400,
            jsonrpc::INVALID_REQUEST,
            format!("{what} header does not match the body"),
        )
    };
    let method_header = head.get("mcp-method");
    let name_header = head.get("mcp-name");
    if method_header.is_none() && name_header.is_none() {
        return Ok(());
    }
    if head.count("mcp-method") > 1 || head.count("mcp-name") > 1 {
        return Err(mismatch("a repeated Mcp-Method or Mcp-Name"));
    }
    let Some(message) = env.single() else {
        return Err(mismatch("Mcp-Method/Mcp-Name on a batch:"));
    };
    if let Some(h) = method_header
        && Some(h) != message.method.map(str::as_bytes)
    {
        return Err(mismatch("Mcp-Method"));
    }
    if let Some(h) = name_header
        && Some(h) != message.name.or(message.uri).map(str::as_bytes)
    {
        return Err(mismatch("Mcp-Name"));
    }
    Ok(())
}

/// Stage 6. `Some((status, body))` when scopegate answers itself: a refused call (JSON-RPC
/// error, HTTP 200, so the agent's session carries on), or a batch where the negotiated revision
/// has none. A batch is authorized element by element and refused whole if any element is.
fn authorize(
    policy: &Policy,
    agent: usize,
    upstream: usize,
    head: &Head,
    env: &crate::mcp::envelope::Envelope<'_>,
) -> Option<(u16, Vec<u8>, String)> {
    if env.is_batch() {
        let version = head.get("mcp-protocol-version").unwrap_or(b"2025-03-26");
        if version != b"2025-03-26" {
            let body = jsonrpc::error_body(
                None,
                jsonrpc::INVALID_REQUEST,
                "JSON-RPC batches are not part of this MCP revision (only 2025-03-26 has them)",
            );
            return Some((400, body, "batch outside 2025-03-26".into()));
        }
    }
    let mut refusal: Option<(usize, String, String)> = None;
    for (i, m) in env.messages().iter().enumerate() {
        if let Decision::Deny { rule, reason } = decide::authorize_message(
            policy,
            agent,
            upstream,
            m,
            env.arguments(m),
            env.notifications(m),
        ) {
            refusal = Some((i, rule, reason));
            break;
        }
    }
    let (index, rule, reason) = refusal?;
    if !env.is_batch() {
        let m = &env.messages()[0];
        // A refused request is answered with a JSON-RPC error (HTTP 200, the session carries
        // on); a notification has no answer to carry it, so the HTTP status says it.
        let status = if m.kind == crate::mcp::envelope::Kind::Notification {
            403
        } else {
            200
        };
        return Some((
            status,
            jsonrpc::denied_body(m.id, jsonrpc::POLICY_DENIED, &reason, &rule),
            rule,
        ));
    }
    let mut body = vec![b'['];
    let mut first = true;
    for (i, m) in env.messages().iter().enumerate() {
        if m.kind != crate::mcp::envelope::Kind::Request {
            continue;
        }
        if !first {
            body.push(b',');
        }
        first = false;
        let message = if i == index {
            reason.clone()
        } else {
            format!("batch refused: element {index} was denied ({reason})")
        };
        body.extend(jsonrpc::denied_body(
            m.id,
            jsonrpc::POLICY_DENIED,
            &message,
            &rule,
        ));
    }
    body.push(b']');
    Some((200, body, rule))
}

/// Stage 7. JSON-RPC requests take from the buckets (tools/call: the agent's tool rules, the
/// agent, its tenant, the upstream; any other request: the agent's own bucket). Notifications,
/// responses, the session's GET event stream and DELETE are session plumbing and never limited,
/// so cancellations and answers to server requests always get through (and an SDK's background
/// GET does not eat an agent's burst). `Some((status, headers, body))` refuses.
fn rate_limit(
    worker: &Worker,
    policy: &Policy,
    agent: usize,
    upstream: usize,
    env: Option<&crate::mcp::envelope::Envelope<'_>>,
) -> Option<(u16, String, Vec<u8>, String)> {
    use crate::mcp::envelope::Kind;
    let limits = &policy.limits;
    let now = crate::ratelimit::now_ns();
    fn tool_of<'a>(m: &crate::mcp::envelope::Message<'a>) -> Option<&'a str> {
        if m.method == Some("tools/call") {
            m.name
        } else {
            None
        }
    }
    let refused = match env {
        None => None,
        Some(env) => {
            let messages = env.messages();
            let mut refused = None;
            for (i, m) in messages.iter().enumerate() {
                if m.kind != Kind::Request {
                    continue;
                }
                if let Err(limited) = limits.admit(policy, agent, upstream, tool_of(m), now) {
                    // A batch is admitted whole or not at all.
                    for earlier in messages[..i].iter().filter(|m| m.kind == Kind::Request) {
                        limits.release(policy, agent, upstream, tool_of(earlier));
                    }
                    refused = Some(limited);
                    break;
                }
            }
            refused
        }
    }?;
    let retry_ms = refused.retry_after_ns.div_ceil(1_000_000).max(1);
    let message = format!(
        "rate limited by {}; retry after {retry_ms} ms",
        refused.label
    );
    let headers = format!("Retry-After: {}\r\n", retry_ms.div_ceil(1000).max(1));
    let status = if env.is_none() {
        429
    } else {
        worker.config.rate_limit_status
    };
    let body = match env {
        Some(env) if env.is_batch() => {
            let mut body = vec![b'['];
            for m in env.messages().iter().filter(|m| m.kind == Kind::Request) {
                if body.len() > 1 {
                    body.push(b',');
                }
                body.extend(jsonrpc::rate_limited_body(
                    m.id,
                    &message,
                    retry_ms,
                    &refused.label,
                ));
            }
            body.push(b']');
            body
        }
        Some(env) => jsonrpc::rate_limited_body(
            env.single().and_then(|m| m.id),
            &message,
            retry_ms,
            &refused.label,
        ),
        None => return None,
    };
    Some((status, headers, body, refused.label))
}

/// Opens the agent's session token: it must be scopegate's, sealed for this agent and upstream.
fn open_session<'c>(
    worker: &Worker,
    policy: &Policy,
    agent: usize,
    upstream: usize,
    token: &[u8],
    cache: &'c mut ConnCache,
) -> Option<&'c [u8]> {
    if cache.token != token {
        cache.token.clear();
        let s = worker.sessions.open_in(token, &mut cache.scratch)?;
        cache.token_agent.clear();
        cache.token_agent.push_str(s.agent);
        cache.token_upstream.clear();
        cache.token_upstream.push_str(s.upstream);
        cache.token_session.clear();
        cache.token_session.extend_from_slice(s.upstream_session);
        cache.token.extend_from_slice(token);
    }
    // The binding is checked on every request, against the policy of this request.
    (cache.token_agent == policy.agents[agent].id
        && cache.token_upstream == policy.upstreams()[upstream].name)
        .then_some(cache.token_session.as_slice())
}

/// Stage 1. `Ok(None)`: the client closed (or went idle past the timeout) between requests.
async fn read_head(
    worker: &Worker,
    client: &mut Conn,
    head: &mut Head,
) -> Result<Option<usize>, Refusal> {
    let config = &worker.config;
    let mut deadline: Option<Instant> = None;
    loop {
        if !client.buf.is_empty() {
            match head::parse_request(&client.buf, head) {
                Ok(Some(len)) => return Ok(Some(len)),
                Ok(None) => {}
                Err(HeadError::TooLarge) => {
                    return Err(Refusal::new(
                        431,
                        jsonrpc::GATEWAY_REFUSED,
                        format!(
                            "request head over {} bytes or {} fields",
                            head::MAX_REQUEST_HEAD,
                            head::MAX_HEADERS
                        ),
                    ));
                }
                Err(HeadError::Malformed(why)) => {
                    return Err(Refusal::new(
                        400,
                        jsonrpc::GATEWAY_REFUSED,
                        format!("malformed request head: {why}"),
                    ));
                }
            }
            deadline.get_or_insert_with(|| Instant::now() + config.header_timeout);
        }
        // Waiting for the first byte is idling; once a head has started it must finish within
        // the header timeout (slow clients are cut off).
        let limit = match deadline {
            None => config.idle_timeout,
            Some(d) => d.saturating_duration_since(Instant::now()),
        };
        match client.fill_within(Some(limit)).await {
            Ok(0) => {
                return if client.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Refusal::new(
                        400,
                        jsonrpc::GATEWAY_REFUSED,
                        "connection closed mid-head",
                    ))
                };
            }
            Ok(_) => {}
            Err(ReadError::TimedOut) if deadline.is_some() => {
                return Err(Refusal::new(
                    408,
                    jsonrpc::GATEWAY_REFUSED,
                    "request head not received within SCOPEGATE_HEADER_TIMEOUT_MS",
                ));
            }
            Err(_) => return Ok(None),
        }
    }
}

/// Stage 2.
fn check_framing(head: &Head) -> Result<Framing, Refusal> {
    let framing = framing::request_framing(head).map_err(|e| {
        let status = if e == framing::FramingError::UnsupportedTransferEncoding {
            501
        } else {
            400
        };
        Refusal::new(status, jsonrpc::GATEWAY_REFUSED, e.message())
    })?;
    if head.minor_version == 1 && head.count("host") != 1 {
        return Err(Refusal::new(
            400,
            jsonrpc::GATEWAY_REFUSED,
            "HTTP/1.1 requires exactly one Host header",
        ));
    }
    Ok(framing)
}

/// A route, and the key carried in the path (`/key/<key>/mcp...`) when path keys are on.
pub struct Routed {
    pub route: Route,
    pub path_key: Option<Span>,
}

/// Stage 3a: which endpoint. `/mcp/<name>` names an upstream; `/mcp` is the only upstream.
pub fn route(worker: &Worker, head: &Head) -> Result<Routed, Refusal> {
    let target = head.target();
    let mut path = match memchr::memchr(b'?', target) {
        Some(i) => &target[..i],
        None => target,
    };
    let mut path_key = None;
    if worker.config.path_keys
        && let Some(rest) = path.strip_prefix(b"/key/")
    {
        let end = memchr::memchr(b'/', rest).unwrap_or(rest.len());
        if end == 0 {
            return Err(Refusal::new(
                404,
                jsonrpc::GATEWAY_REFUSED,
                "empty path key",
            ));
        }
        path_key = Some(Span::within(&head.raw, &rest[..end]));
        path = &rest[end..];
    }
    if path.starts_with(b"/.well-known/oauth-protected-resource") && path_key.is_none() {
        return if head.method() == b"GET" || head.method() == b"HEAD" {
            Ok(Routed {
                route: Route::ResourceMetadata,
                path_key,
            })
        } else {
            Err(method_not_allowed("GET, HEAD"))
        };
    }
    route_path(worker, head, path).map(|route| Routed { route, path_key })
}

fn route_path(worker: &Worker, head: &Head, path: &[u8]) -> Result<Route, Refusal> {
    if path == b"/metrics" {
        return if head.method() == b"GET" {
            Ok(Route::Metrics)
        } else {
            Err(method_not_allowed("GET"))
        };
    }
    if path == b"/healthz" {
        return if head.method() == b"GET" || head.method() == b"HEAD" {
            Ok(Route::Health)
        } else {
            Err(method_not_allowed("GET, HEAD"))
        };
    }
    let upstreams = &worker.config.upstreams;
    let index = if path == b"/mcp" || path == b"/mcp/" {
        if upstreams.len() > 1 {
            // Every upstream behind one MCP server.
            return match head.method() {
                b"POST" | b"GET" | b"DELETE" => Ok(Route::Aggregate),
                _ => Err(method_not_allowed("GET, POST, DELETE")),
            };
        }
        Some(0)
    } else if let Some(name) = path.strip_prefix(b"/mcp/") {
        // Whether the name exists is not said before the agent is authenticated: the
        // method is checked first, the same for every name.
        let name = name.strip_suffix(b"/").unwrap_or(name);
        upstreams.iter().position(|u| u.name.as_bytes() == name)
    } else {
        return Err(Refusal::new(
            404,
            jsonrpc::GATEWAY_REFUSED,
            "not found: MCP endpoints are /mcp and /mcp/<upstream>",
        ));
    };
    match head.method() {
        b"POST" | b"GET" | b"DELETE" => Ok(Route::Mcp { upstream: index }),
        _ => Err(method_not_allowed("GET, POST, DELETE")),
    }
}

/// The answer for an upstream name the agent cannot reach, whether no upstream has it or
/// its policy keeps the agent away from it: the two must read the same.
fn unknown_upstream(head: &Head) -> Refusal {
    let target = head.target();
    let path = &target[..memchr::memchr(b'?', target).unwrap_or(target.len())];
    let name = path
        .rsplit(|&b| b == b'/')
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    Refusal::new(
        404,
        jsonrpc::GATEWAY_REFUSED,
        format!("unknown upstream {:?}", String::from_utf8_lossy(name)),
    )
    .denied()
}

fn method_not_allowed(allow: &'static str) -> Refusal {
    let mut r = Refusal::new(
        405,
        jsonrpc::GATEWAY_REFUSED,
        format!("method not allowed; allowed: {allow}"),
    );
    r.headers = format!("Allow: {allow}\r\n");
    r
}

/// Stage 3b: DNS-rebinding defence. On a loopback listener the `Host` must be a loopback
/// name; an `Origin`, when present, must be allowed.
fn check_origin(worker: &Worker, head: &Head) -> Result<(), Refusal> {
    let loopback = worker.config.listens_on_loopback();
    if loopback
        && let Some(host) = head.get("host")
        && !origin::is_loopback_host(host)
    {
        return Err(Refusal::new(
            403,
            jsonrpc::GATEWAY_REFUSED,
            format!(
                "Host {:?} is not a loopback name; scopegate listens on loopback and refuses \
                 other hosts (DNS-rebinding defence)",
                String::from_utf8_lossy(host)
            ),
        )
        .denied());
    }
    if let Some(value) = head.get("origin")
        && !origin::origin_allowed(value, &worker.config.allowed_origins, loopback)
    {
        return Err(Refusal::new(
            403,
            jsonrpc::GATEWAY_REFUSED,
            format!(
                "Origin {:?} is not allowed (SCOPEGATE_ALLOWED_ORIGINS)",
                String::from_utf8_lossy(value)
            ),
        )
        .denied());
    }
    Ok(())
}

/// Stage 4: the whole body, de-chunked, as `Bytes` sharing the read buffer where it can.
async fn read_body(
    worker: &Worker,
    client: &mut Conn,
    head: &Head,
    framing: Framing,
) -> Result<Bytes, Refusal> {
    let max = worker.config.max_body;
    let too_large = || {
        Refusal::new(
            413,
            jsonrpc::GATEWAY_REFUSED,
            format!("request body over SCOPEGATE_MAX_BODY ({max} bytes)"),
        )
    };
    let expect = head.get("expect");
    if let Some(value) = expect
        && !value.eq_ignore_ascii_case(b"100-continue")
    {
        return Err(Refusal::new(
            417,
            jsonrpc::GATEWAY_REFUSED,
            "unsupported Expect value",
        ));
    }
    match framing {
        Framing::Empty | Framing::UntilClose => return Ok(Bytes::new()),
        Framing::Length(n) if n > max as u64 => return Err(too_large()),
        _ => {}
    }
    let deadline = Instant::now() + worker.config.body_timeout;
    let needs_more = match framing {
        Framing::Length(n) => (client.buf.len() as u64) < n,
        _ => true,
    };
    if expect.is_some() && head.minor_version == 1 && needs_more {
        let (res, _) = client.write_all(response::CONTINUE).await;
        res.map_err(|_| Refusal::new(400, jsonrpc::GATEWAY_REFUSED, "client went away"))?;
    }

    match framing {
        Framing::Length(n) => {
            let n = n as usize;
            while client.buf.len() < n {
                client.buf.reserve(n - client.buf.len());
                fill_body(client, deadline, "body shorter than Content-Length").await?;
            }
            Ok(client.buf.split_to(n).freeze())
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::default();
            let mut body = BytesMut::new();
            loop {
                let consumed = decoder.feed(&client.buf, Some(&mut body)).map_err(|e| {
                    Refusal::new(
                        400,
                        jsonrpc::GATEWAY_REFUSED,
                        format!("bad chunked body: {e:?}"),
                    )
                })?;
                let _ = client.buf.split_to(consumed);
                if body.len() > max {
                    return Err(too_large());
                }
                if decoder.is_done() {
                    return Ok(body.freeze());
                }
                fill_body(client, deadline, "chunked body cut short").await?;
            }
        }
        Framing::Empty | Framing::UntilClose => Ok(Bytes::new()),
    }
}

/// Reads more of a request body before `deadline`; `cut_short` says what an early end means.
async fn fill_body(client: &mut Conn, deadline: Instant, cut_short: &str) -> Result<(), Refusal> {
    match client
        .fill_within(Some(deadline.saturating_duration_since(Instant::now())))
        .await
    {
        Ok(0) | Err(ReadError::Io(_)) => {
            Err(Refusal::new(400, jsonrpc::GATEWAY_REFUSED, cut_short))
        }
        Ok(_) => Ok(()),
        Err(ReadError::TimedOut) => Err(Refusal::new(
            408,
            jsonrpc::GATEWAY_REFUSED,
            "request body not received within SCOPEGATE_BODY_TIMEOUT_MS",
        )),
    }
}

/// Writes a refusal; `Ok(KeepAlive::Yes)` when the connection can serve another request.
async fn finish(
    draft: &mut Draft,
    client: &mut Conn,
    id: Option<Id<'_>>,
    refusal: &Refusal,
    close: bool,
) -> Result<KeepAlive, ()> {
    let close = close || refusal.close;
    draft.status = refusal.status;
    if draft.decision == AuditDecision::Allowed {
        draft.decision = refusal.decision;
    }
    if draft.reason.is_none() {
        draft.reason = Some(refusal.message.clone());
    }
    respond(client, id, refusal, close).await?;
    if close {
        linger_close(client).await;
        return Ok(KeepAlive::No);
    }
    Ok(KeepAlive::Yes)
}

/// Most bytes read and discarded while closing after an error.
const LINGER_BYTES: usize = 256 * 1024;
/// Longest wait for the client to stop sending while closing after an error.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_millis(500);

/// Closes after an error without destroying the answer: closing a socket with unread input
/// makes the kernel send RST, which can discard the response before the client reads it
/// (RFC 9112 §9.6). So: stop writing, then read and drop what the client still sends, briefly.
async fn linger_close(client: &mut Conn) {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is this connection's open socket.
    unsafe {
        libc::shutdown(client.stream.as_raw_fd(), libc::SHUT_WR);
    }
    let deadline = Instant::now() + LINGER_TIME;
    let mut drained = 0;
    while drained < LINGER_BYTES {
        client.buf.clear();
        match client
            .fill_within(Some(deadline.saturating_duration_since(Instant::now())))
            .await
        {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
}

async fn respond(
    client: &mut Conn,
    id: Option<Id<'_>>,
    refusal: &Refusal,
    close: bool,
) -> Result<(), ()> {
    let body = jsonrpc::error_body(id, refusal.code, &refusal.message);
    let reply = response::build(
        refusal.status,
        "application/json",
        &refusal.headers,
        &body,
        close,
    );
    let (res, _) = client.write_all(reply).await;
    res.map_err(|_| ())
}

async fn write_reply(
    draft: &mut Draft,
    client: &mut Conn,
    reply: Vec<u8>,
    close: bool,
) -> Result<KeepAlive, ()> {
    // "HTTP/1.1 NNN ..."
    draft.status = reply
        .get(9..12)
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    let (res, _) = client.write_all(reply).await;
    res.map_err(|_| ())?;
    Ok(if close { KeepAlive::No } else { KeepAlive::Yes })
}
