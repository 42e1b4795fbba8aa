//! The upstream exchange on `/mcp/<upstream>`: send the request (the body exactly as received),
//! read the response head, and relay the body to the agent as it arrives.
//!
//! - `plan`: what the exchange is asked to do and how it ends; `respond`: the writes to
//!   the agent (response head with credentials stripped and the session sealed, coalesced body
//!   pieces); `scan`: the `isError` scan for the audit log.
//! - `relay`: the byte relay. Every read from the upstream is written to the agent before the
//!   next read is issued, so a Server-Sent Event reaches the agent the moment it is sent; bodies
//!   keep their framing where the agent can take it (chunked stays chunked, byte for byte).
//! - `events`: in policy mode, answers that may list what the agent must not see: a JSON list
//!   answer is read whole and filtered; an event stream (a POST's answer, or a GET stream that
//!   may replay earlier answers on `Last-Event-ID`) is relayed event by event and every list
//!   result in it is filtered.
//!
//! While a stream is quiet the agent's socket is watched, so an agent that leaves is noticed at
//! once and both connections are released.

mod events;
mod plan;
mod relay;
mod respond;
mod scan;

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;

use crate::core::Core;
use crate::http::conn::Conn;
use crate::http::head::{self, Head};
use crate::mcp::jsonrpc;
use crate::reply::Reply;
use crate::upstream::Upstream;
use crate::upstream::exchange::{self, HeadFailure, Target, exchange_head};
use crate::upstream::request::{Outgoing, write_head};
use crate::upstream::stdio_bridge::FAILURE_HEADER as STDIO_FAILURE;
use plan::Leg;
pub use plan::{Exchange, ForwardError, Plan, Relayed, ReloadNotice, SealFn};
use respond::COALESCE_LIMIT;
pub use scan::IsErrorScan;

/// Scratch buffers larger than this are not kept for the next request.
const RETAIN_LIMIT: usize = 64 * 1024;

#[allow(clippy::too_many_arguments)]
pub async fn forward(
    core: &Core,
    ex: &mut Exchange,
    client: &mut Conn,
    request: &Head,
    body: Bytes,
    upstream: &Upstream,
    peer: SocketAddr,
    close_after: bool,
    plan: &Plan<'_>,
) -> Result<Relayed, ForwardError> {
    let target = Target {
        upstream,
        pool: &core.pool,
    };
    let upstream = target.upstream;
    let mut timeout = core.config.upstream_timeout;
    if let crate::upstream::Transport::Stdio(stdio) = &upstream.transport
        && plan.upstream_session.is_none()
    {
        // A request without a session may start a process: it has the upstream's startup
        // time, and the bridge's own startup timeout (a clear 504) comes first.
        let startup = stdio.hub.options.startup_timeout + std::time::Duration::from_secs(1);
        timeout = timeout.max(startup);
    }
    // One clock read: the deadline, and when the request went to the upstream.
    let sent_at = Instant::now();
    let deadline = sent_at + timeout;

    write_head(
        &mut ex.out,
        upstream,
        &Outgoing {
            method: request.method(),
            agent: Some(request),
            set: &[],
            session: plan.upstream_session,
            replace_session: plan.upstream_session.is_some(),
            plain_answer: plan.visible.is_some(),
            inject: plan.strip_credentials,
            peer,
            content_length: (!body.is_empty() || request.method() == b"POST").then_some(body.len()),
            agent_id: plan.agent_id,
            traceparent: plan.traceparent,
        },
    );
    let inline_body = body.len() <= COALESCE_LIMIT;
    if inline_body {
        ex.out.extend_from_slice(&body);
    }

    ex.upstream_us = None;
    ex.status = 0;
    ex.stdio_failure = None;
    ex.is_error.reset();
    let mut up = match exchange_head(
        target,
        &mut ex.out,
        &body,
        inline_body,
        &mut ex.response,
        deadline,
    )
    .await
    {
        Ok(conn) => conn,
        Err(HeadFailure::Connect(e)) => {
            return Err(ForwardError::BeforeResponse(exchange::unavailable(
                &upstream.name,
                e,
            )));
        }
        Err(HeadFailure::Exchange(e)) => {
            return Err(ForwardError::BeforeResponse(
                e.refusal(&upstream.name, timeout),
            ));
        }
    };
    ex.upstream_us = Some(sent_at.elapsed().as_micros() as u64);
    ex.status = ex.response.status;
    if ex.response.status == 405 && request.method() == b"POST" {
        // Every Streamable HTTP server takes POST: this one speaks something else (the legacy
        // HTTP+SSE transport, most likely). The answer is relayed as it is; the log says what
        // to do, once.
        crate::log::warn_once(
            &upstream.name,
            &format!(
                "upstream {:?} refused POST (405 Method Not Allowed): {}",
                upstream.name,
                crate::upstream::LEGACY_SSE_ADVICE
            ),
        );
    }
    ex.stdio_failure = None;
    if let crate::upstream::Transport::Stdio(_) = upstream.transport
        && let Some(why) = ex.response.get(STDIO_FAILURE)
    {
        ex.stdio_failure = Some(String::from_utf8_lossy(why).into_owned());
    }

    let written_before = client.written;
    let filtered = plan.visible.is_some() && (200..300).contains(&ex.response.status);
    // Looked up once: every later stage asks.
    let event_stream = head::is_event_stream(&ex.response);
    let read_whole = plan.lists_asked || plan.strip_hidden;
    if filtered && (event_stream || read_whole) && !plain_coding(&ex.response) {
        return Err(ForwardError::BeforeResponse(Reply::error(
            502,
            jsonrpc::UPSTREAM_UNAVAILABLE,
            format!(
                "upstream {:?} sent a compressed answer (Content-Encoding) that scopegate must read to filter; it is not relayed",
                upstream.name
            ),
        )));
    }
    let leg = Leg {
        core,
        ex: &mut *ex,
        client: &mut *client,
        request,
        up: &mut up,
        upstream,
        close_after,
        plan,
    };
    // Not boxed: the request's state machine lives in a block the worker reuses, no larger
    // for them (a plain relay's wait is as large), and an event stream then holds no box.
    let result = if filtered && event_stream {
        events::relay_events(leg).await
    } else if filtered && read_whole {
        events::relay_filtered_json(leg).await
    } else {
        relay::relay(leg, event_stream).await
    };
    if ex.out.capacity() > RETAIN_LIMIT {
        ex.out = Vec::new();
    }
    let (relayed, reusable) = match result {
        Ok(r) => r,
        // Nothing reached the agent yet: it gets a clear answer instead of a closed connection.
        Err(ForwardError::MidResponse(why)) if client.written == written_before => {
            return Err(ForwardError::BeforeResponse(Reply::error(
                502,
                jsonrpc::UPSTREAM_UNAVAILABLE,
                format!("upstream {:?} {why}", upstream.name),
            )));
        }
        Err(e) => return Err(e),
    };
    // The response head shares the upstream connection's buffer: let it go before the
    // connection is reused, so its next read does not allocate a new buffer.
    ex.response.raw = Bytes::new();
    if reusable {
        up.read_chunk = crate::http::conn::READ_CHUNK;
        core.pool.put(upstream.pool_id(), up);
    }
    Ok(relayed)
}

/// Whether a response's body is as written (no `Content-Encoding`, or `identity`).
fn plain_coding(response: &Head) -> bool {
    response
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"content-encoding"))
        .all(|(_, v)| v.trim_ascii().is_empty() || v.trim_ascii().eq_ignore_ascii_case(b"identity"))
}
