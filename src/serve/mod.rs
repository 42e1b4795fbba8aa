//! The request path for one agent connection. [`serve_connection`] reads requests off the
//! connection; `serve_one` reads a head, runs `handle_request` (the stages up to where the
//! request goes on, in order) and then the onward stage, after the gates' state is dropped so a
//! long answer holds only what relaying it needs. Each stage is a function
//! over plain inputs (a head, a body, the policy) that passes the request on or refuses it with
//! a [`Reply`](crate::reply::Reply) that never reaches an upstream, and each is unit-tested in its room:
//!
//! ```text
//! ingress::read_head             head size/count limits (431), idle and header timeouts (408)
//! ingress::framing               Content-Length / chunked rules (400/501), one Host;
//!                                no body on GET/HEAD/DELETE (400)
//! gate::admit                    route::route: /mcp, /mcp/<upstream>, admin routes (404/405);
//!                                route::check_origin: Host and Origin (403);
//!                                gate::authenticate: key / path key / JWT -> agent (401/404)
//! ingress::read_body             SCOPEGATE_MAX_BODY (413), 100-continue, body timeout
//! admin::answer                  /healthz, /metrics, resource metadata
//! route::upstream_of             the upstream, or the aggregate endpoint
//! ingress::envelope              the JSON-RPC fields, once (400 -32700/-32600)
//! gate::audit_available          503 while the audit log fails (SCOPEGATE_AUDIT_FAIL_CLOSED)
//! headers::check_envelope_headers Mcp-Method / Mcp-Name agree with the body (400)
//! onward::to_aggregate           /mcp over several upstreams: the gates below per message
//! onward::to_upstream            gate::admit_call, in policy mode:
//!                                  gate::authorize: every message, one method table (-32004);
//!                                  gate::rate_limit: every limit that applies (-32007);
//!                                  gate::open_session: sealed token -> upstream session (404)
//!                                forward::forward: the exchange and the relay of its answer
//! record::emit                   audit entries and metrics, for every outcome
//! ```
//!
//! The other rooms: `worker` (what a worker's connections share, its pools), `answer` (the one
//! writer of scopegate's own replies), `memory` (a connection's memory of its key and token).

pub mod admin;
mod answer;
pub mod gate;
pub mod headers;
pub mod ingress;
mod live;
pub mod memory;
mod onward;
pub mod record;
pub mod route;
mod worker;

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use monoio::net::TcpStream;

use crate::core::{Passed, shutting_down};
use crate::http;
use crate::http::conn::Conn;
use crate::http::head::Head;
use crate::mcp::envelope::EnvelopeParser;
use crate::mcp::jsonrpc::Id;
use crate::policy::Policy;
use crate::policy::live::{LocalPolicy, PolicyView};
use crate::tls::server::ListenerTls;
use crate::tls::stream::TlsStream;

use crate::http::trace::Hop;
use answer::{KeepAlive, answer};
pub use memory::Activity;
use memory::ConnCache;
use record::Draft;
pub use worker::{RequestState, Worker};

/// Serves requests on one agent connection until it closes (or the worker's idle sweep shuts
/// its read side, which the wait here sees as the end).
/// Owns what it needs (the worker's handle, the registry's guard, dropped when it ends), so the
/// connection's task is this future alone.
pub async fn serve_connection<A: std::ops::Deref<Target = Activity>>(
    worker: std::rc::Rc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    activity: A,
    draining: bool,
) {
    let worker = &*worker;
    let activity = &*activity;
    let mut client = match &worker.tls {
        None => Conn::new(stream),
        // Boxed: the handshake's state is large, and a connection's task should not carry it
        // once the handshake is done (nor plain connections at all).
        Some(tls) => match Box::pin(accept_tls(worker, tls, stream)).await {
            Some(tls) => Conn::new(tls),
            None => return,
        },
    };
    // Bounded when configured (at most u32::MAX ms: the configuration checks).
    client.write_limit_ms = worker.core.config.send_timeout.as_millis() as u32;
    // The connection's memory of its key and session token stays with the connection (the
    // request state it is lent to goes back to a pool shared by all connections), boxed once it
    // remembers something: a connection that never authenticated holds none.
    let mut memory: Option<Box<ConnCache>> = None;
    loop {
        activity.set_idle(client.buf.is_empty());
        if client.buf.is_empty() && client.buf.capacity() == 0 {
            // Idle with nothing buffered: wait for the agent holding no buffer, no request
            // state and no timer, then take the buffer and state from the worker's pools.
            match client.stream.readable(true).await {
                Ok(()) => client.buf = worker.take_buffer(),
                Err(_) => return,
            }
        }
        let mut state = worker.take_state();
        // A pooled state's cache remembers nothing (below), so nothing crosses connections.
        if let Some(memory) = &mut memory {
            std::mem::swap(&mut state.draft.cache, memory);
        }
        state.draft.cache.draining = draining;
        // Out of the connection's task: the request's state machine (every stage's locals, the
        // upstream exchange) lives in a block of the worker's while the request runs, so an
        // idle connection does not carry it and a request allocates nothing.
        let request = serve_one(worker, &mut client, peer, activity, &mut state);
        let keep = worker.request_blocks.run(request).await;
        match &mut memory {
            Some(memory) => std::mem::swap(&mut state.draft.cache, memory),
            None if state.draft.cache.remembers() => {
                memory = Some(Box::new(std::mem::take(&mut state.draft.cache)));
            }
            None => {}
        }
        worker.give_state(state);
        if !keep || client.broken {
            client.finish().await;
            return;
        }
        if let Some(buf) = client.take_idle_buffer() {
            worker.give_buffer(buf);
        }
    }
}

/// The TLS handshake with an agent, within the header timeout. A failure is counted
/// (`scopegate_listener_tls_failures_total`) and ends the connection.
async fn accept_tls(worker: &Worker, tls: &ListenerTls, stream: TcpStream) -> Option<TlsStream> {
    let handshake = TlsStream::accept(stream, tls.config());
    let limit = worker.core.config.header_timeout;
    let reason = match crate::timer::timeout(limit, handshake).await {
        Ok(Ok(tls)) => return Some(tls),
        Ok(Err(e)) => match crate::tls::tls_error(&e) {
            Some(e) => crate::tls::failure_reason(e),
            None => "connection lost during the handshake",
        },
        Err(_) => "handshake timed out",
    };
    crate::tls::count_failure(None, reason);
    crate::debug!("TLS handshake with an agent failed: {reason}");
    None
}

/// Reads and answers one request, then records it; false when the connection must close.
async fn serve_one(
    worker: &Worker,
    client: &mut Conn,
    peer: SocketAddr,
    activity: &Activity,
    state: &mut RequestState,
) -> bool {
    let RequestState {
        head,
        parser,
        exchange,
        draft,
    } = state;
    let head_len = match ingress::read_head(&worker.core.config, client, head, activity).await {
        Ok(Some(len)) => len,
        Ok(None) => return false,
        Err(reply) => {
            draft.reset(Instant::now());
            draft.bytes_in = client.buf.len() as u64;
            let written = client.written;
            let answered = answer(draft, client, b"", None, &reply, true).await;
            record::emit(&worker.sinks(), draft, b"", client.written - written).await;
            if let Ok(KeepAlive::Linger) = answered {
                ingress::linger_close(client).await;
            }
            return false;
        }
    };
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
        // A GET has no body to parse: the parser's buffers (sized by earlier bodies) go too.
        parser.release();
    } else {
        head.raw = client.buf.split_to(head_len).freeze();
    }
    // One policy for the whole request, even if a reload lands meanwhile.
    let policy = worker.policy.as_ref().map(PolicyView::current);
    // The gates' state is gone before the upstream's answer is awaited: a long stream holds
    // only what relaying it needs.
    let step = handle_request(worker, client, head, parser, policy.as_ref(), peer, draft);
    // Matched in place (not moved out): the passed request is kept once, in `step`.
    let outcome = match &mut step.await {
        Step::Answered(outcome) => *outcome,
        Step::Aggregate(passed) => onward::to_aggregate(passed, client, draft).await,
        Step::Upstream(passed, upstream) => {
            onward::to_upstream(passed, *upstream, exchange, client, draft).await
        }
    };
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
    if let Ok(KeepAlive::Linger) = outcome {
        ingress::linger_close(client).await;
    }
    matches!(outcome, Ok(KeepAlive::Yes)) && !shutting_down()
}

/// What the gates made of a request: answered (with whether the connection goes on), or passed
/// on to the aggregate endpoint or to one upstream.
enum Step<'r> {
    Answered(Result<KeepAlive, ()>),
    Aggregate(Passed<'r>),
    Upstream(Passed<'r>, usize),
}

/// The stages of one request after its head, in order, up to where it goes on. A stage either
/// passes the request on or refuses it with a `Reply`: `pass!` hands a refusal to `end!`,
/// which answers it (with the request's id once it is known; closing the connection when the
/// agent asked, or when told) and ends the request.
async fn handle_request<'r>(
    worker: &'r Worker,
    client: &mut Conn,
    head: &'r Head,
    parser: &'r mut EnvelopeParser,
    policy: Option<&'r LocalPolicy>,
    peer: SocketAddr,
    draft: &mut Draft,
) -> Step<'r> {
    let config = &worker.core.config;
    let close = head.minor_version == 0 || http::head::connection_has(head, "close");
    let method = head.method();
    let mut id: Option<Id<'_>> = None;
    macro_rules! end {
        ($reply:expr, $close:expr) => {
            return Step::Answered(answer(draft, client, method, id, &$reply, $close).await)
        };
    }
    macro_rules! pass {
        ($stage:expr) => {
            pass!($stage, close)
        };
        ($stage:expr, $close:expr) => {
            match $stage {
                Ok(passed) => passed,
                Err(reply) => end!(reply, $close),
            }
        };
    }
    // Ambiguous framing closes the connection: where would the next request start?
    let framing = pass!(ingress::framing(head), true);
    let jwt = worker.jwt.as_deref();
    let admitted = gate::admit(config, jwt, policy, head, &mut draft.cache);
    // A request refused here (no or a wrong key, an unknown upstream) has its body read only
    // when it is small, so the connection stays usable; a larger one (or one of unknown length)
    // is left unread and the connection closed (its unread input drained briefly, not kept). So
    // nobody unauthenticated makes the gateway hold or wait for SCOPEGATE_MAX_BODY.
    // (An agent waiting for `100 Continue` is answered at once too: its body is not coming.)
    let unread = ingress::body_over(framing, ingress::REFUSED_BODY_READ)
        || (ingress::body_over(framing, 0) && head.get("expect").is_some());
    let admitted = match admitted {
        Err(reply) if unread => end!(reply, true),
        admitted => admitted,
    };
    let body = pass!(
        ingress::read_body(config, client, head, framing).await,
        true
    );
    draft.bytes_in = body.len() as u64;
    let gate::Admitted {
        route: endpoint,
        agent,
    } = pass!(admitted);
    if draft.cache.draining {
        pass!(gate::drain_admits(method, None), true);
    }
    let (stats, audit) = (&worker.all_stats, &worker.all_audit);
    let fleet = worker.core.limiter.fleet();
    if let Some(reply) = admin::answer(endpoint, config, head, stats, audit, fleet) {
        draft.skip = true;
        end!(reply, close);
    }
    let p: Option<&Policy> = policy.map(|p| &***p);
    let upstreams = p.map_or(&config.upstreams[..], |p| p.upstreams());
    let upstream = pass!(route::upstream_of(endpoint, config, head))
        .or_else(|| route::sole_upstream(p, agent, upstreams.len()));
    draft.identify(upstream, agent, policy, head);
    // The agent's trace context, one header (two are invalid, and then none is passed on).
    // (The common case, no header, costs one lookup.)
    draft.trace = head
        .get("traceparent")
        .filter(|_| head.count("traceparent") == 1)
        .and_then(Hop::of);
    let env = pass!(ingress::envelope(parser, method, &body));
    id = env.as_ref().and_then(|e| e.single()?.id);
    if draft.cache.draining {
        pass!(gate::drain_admits(method, env.as_ref()), true);
    }
    if let Some(env) = &env {
        draft.messages_of(env, p, agent, worker.max_args());
    }
    pass!(gate::audit_available(worker.audit.as_ref()));
    if let Some(env) = &env {
        pass!(headers::check_envelope_headers(head, env, &body));
    }
    let core = &worker.core;
    let close = close || shutting_down();
    let passed = Passed {
        core,
        trace: draft.trace,
        head,
        body,
        env,
        policy: p,
        upstreams,
        agent,
        peer,
        close,
    };
    match upstream {
        None => Step::Aggregate(passed),
        Some(upstream) => Step::Upstream(passed, upstream),
    }
}

#[cfg(test)]
mod tests {
    use super::{SocketAddr, TcpStream};

    /// The size of the future `f` returns for these argument types.
    fn future_size<A: std::ops::Deref<Target = super::Activity>, R>(
        _f: fn(std::rc::Rc<super::Worker>, TcpStream, SocketAddr, A, bool) -> R,
    ) -> usize {
        std::mem::size_of::<R>()
    }

    /// Most of what an idle connection costs is its task: this future. It holds no timer (the
    /// worker's sweep closes idle connections), no request state (pooled), no TLS goodbye
    /// (boxed when needed) and no memory of a key it was never shown (boxed when there is
    /// one). scripts/bench.sh measures the whole cost (10,000 idle connections).
    #[test]
    fn an_idle_connections_future_is_small() {
        let size = future_size::<std::rc::Rc<super::Activity>, _>(super::serve_connection);
        assert!(size <= 640, "a connection's future is {size} bytes");
    }
}
