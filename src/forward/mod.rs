//! The upstream exchange on `/mcp/<upstream>`: send the request (the body exactly as received),
//! read the response head, and relay the body to the agent as it arrives.
//!
//! - [`relay`]: the byte relay. Every read from the upstream is written to the agent before the
//!   next read is issued, so a Server-Sent Event reaches the agent the moment it is sent; bodies
//!   keep their framing where the agent can take it (chunked stays chunked, byte for byte).
//! - [`events`]: in policy mode, answers that may list what the agent must not see: a JSON list
//!   answer is read whole and filtered; an event stream (a POST's answer, or a GET stream that
//!   may replay earlier answers on `Last-Event-ID`) is relayed event by event and every list
//!   result in it is filtered.
//!
//! While a stream is quiet the agent's socket is watched, so an agent that leaves is noticed at
//! once and both connections are released.

mod events;
mod relay;
mod scan;

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;

use crate::core::Core;
use crate::fmt::push_decimal;
use crate::http::conn::Conn;
use crate::http::head::{self, Head};
use crate::mcp::jsonrpc;
use crate::mcp::jsonrpc::Id;
use crate::mcp::lists::Visible;
use crate::reply::Reply;
use crate::upstream::Upstream;
use crate::upstream::exchange::{self, HeadFailure, Target, exchange_head};
use crate::upstream::request::{Outgoing, write_head};
pub use scan::IsErrorScan;

/// Pieces at most this long are copied into one buffer with what precedes them so they go out
/// in a single write; larger ones are handed to the kernel as they are.
const COALESCE_LIMIT: usize = 16 * 1024;
/// The read size on an upstream event stream.
const STREAM_CHUNK: usize = 4 * 1024;
/// Scratch buffers larger than this are not kept for the next request.
const RETAIN_LIMIT: usize = 64 * 1024;

/// Per-connection scratch reused across requests, and what the audit log learns from the
/// exchange.
#[derive(Default)]
pub struct Exchange {
    out: Vec<u8>,
    response: Head,
    /// Microseconds from sending the request to the upstream's response head.
    pub upstream_us: Option<u64>,
    /// The upstream's status.
    pub status: u16,
    /// A tools/call result's `isError`, when it was seen in the relayed body.
    pub is_error: IsErrorScan,
}

/// Maps the upstream's session id to the token the agent sees.
pub type SealFn<'a> = &'a dyn Fn(&[u8]) -> Option<String>;

/// What the policy asks of one exchange beyond plain forwarding.
#[derive(Default)]
pub struct Plan<'a> {
    /// The upstream's own session id, sent instead of the agent's (sealed) `Mcp-Session-Id`.
    pub upstream_session: Option<&'a [u8]>,
    /// Turns an `Mcp-Session-Id` from the upstream into the token the agent sees.
    pub seal_session: Option<SealFn<'a>>,
    /// Policy mode: inject the upstream's credential (`[upstream.headers]`, replacing any the
    /// agent sent under those names), and drop response headers that carry upstream
    /// credentials (`Set-Cookie`, `WWW-Authenticate`, ...) and any named like an injected one.
    pub strip_credentials: bool,
    /// Policy mode: what the agent may see. Every list result it can receive is filtered with
    /// it: the JSON answer to a list request, and every event of an event stream.
    pub visible: Option<Visible<'a>>,
    /// The request asks for a list (or a batch holds one): a JSON answer is read whole and
    /// filtered.
    pub lists_asked: bool,
    /// Look for the result's `isError` (tools/call, audit on).
    pub scan_is_error: bool,
    /// The id of the request when the body is one request: an event stream answering it that
    /// fails mid-way ends with a JSON-RPC error for this id.
    pub request_id: Option<Id<'a>>,
    /// The answer is a stream meant to stay open while quiet (`subscriptions/listen`), like a
    /// GET stream: no `SCOPEGATE_STREAM_IDLE_MS` between its events.
    pub long_lived: bool,
}

impl Plan<'_> {
    /// The plan's parts that follow from the body's messages alone.
    pub fn for_messages(messages: &[crate::mcp::envelope::Message<'_>]) -> Self {
        use crate::policy::decide::{Access, access};
        Plan {
            lists_asked: messages
                .iter()
                .any(|m| matches!(access(m.method, m.kind), Access::List(_))),
            long_lived: messages
                .iter()
                .any(|m| access(m.method, m.kind) == Access::Listen),
            ..Plan::default()
        }
    }
}

pub struct Relayed {
    /// Whether the agent's connection can carry another request.
    pub keep_alive: bool,
    /// The answer was cut short by the upstream, and the agent told so in-band (an error event
    /// closing the stream): what went wrong, for the audit log.
    pub failure: Option<String>,
}

pub enum ForwardError {
    /// Nothing was sent to the agent yet: answer with this refusal (502/504).
    BeforeResponse(Reply),
    /// The response was partly relayed when the upstream failed: the agent's connection must be
    /// closed (an incomplete body is signalled by the close). Says what happened.
    MidResponse(String),
    /// The agent closed its connection while the answer was relayed: its doing, not the
    /// upstream's.
    AgentGone,
}

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
    let timeout = core.config.upstream_timeout;
    let deadline = Instant::now() + timeout;

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
        },
    );
    let inline_body = body.len() <= COALESCE_LIMIT;
    if inline_body {
        ex.out.extend_from_slice(&body);
    }

    ex.upstream_us = None;
    ex.status = 0;
    ex.is_error.reset();
    let sent_at = Instant::now();
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

    let written_before = client.written;
    let filtered = plan.visible.is_some() && (200..300).contains(&ex.response.status);
    // Looked up once: every later stage asks.
    let event_stream = head::is_event_stream(&ex.response);
    if filtered && (event_stream || plan.lists_asked) && !plain_coding(&ex.response) {
        return Err(ForwardError::BeforeResponse(Reply::error(
            502,
            jsonrpc::UPSTREAM_UNAVAILABLE,
            format!(
                "upstream {:?} sent a compressed answer (Content-Encoding) that scopegate must read to filter; it is not relayed",
                upstream.name
            ),
        )));
    }
    let result = if filtered && event_stream {
        // Boxed, like the filtered JSON relay: rarer than plain calls, and their state machines
        // would otherwise size every connection's task.
        Box::pin(events::relay_events(
            core,
            ex,
            client,
            request,
            &mut up,
            target,
            close_after,
            plan,
        ))
        .await
    } else if filtered && plan.lists_asked {
        Box::pin(events::relay_filtered_json(
            core,
            ex,
            client,
            request,
            &mut up,
            target,
            close_after,
            plan,
        ))
        .await
    } else {
        relay::relay(
            core,
            ex,
            client,
            request,
            &mut up,
            target,
            close_after,
            plan,
            event_stream,
        )
        .await
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
        core.pool.put(upstream.transport.pool_key(), up);
    }
    Ok(relayed)
}

/// A long-lived stream holds small buffers: the response head's share of the upstream buffer is
/// let go, the stream is read in small pieces into a small buffer, and a large scratch buffer
/// left by an earlier request is not kept for the stream's whole life.
fn stream_buffers(ex: &mut Exchange, up: &mut Conn) {
    ex.response.raw = Bytes::new();
    let mut small = bytes::BytesMut::with_capacity(STREAM_CHUNK.max(up.buf.len()));
    small.extend_from_slice(&up.buf);
    up.buf = small;
    up.read_chunk = STREAM_CHUNK;
    ex.out.shrink_to(STREAM_CHUNK);
}

/// Whether a response's body is as written (no `Content-Encoding`, or `identity`).
fn plain_coding(response: &Head) -> bool {
    response
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"content-encoding"))
        .all(|(_, v)| v.trim_ascii().is_empty() || v.trim_ascii().eq_ignore_ascii_case(b"identity"))
}

/// Writes what is pending in `out` plus `piece`: in one write when small, else two.
async fn send(client: &mut Conn, out: &mut Vec<u8>, piece: Bytes) -> std::io::Result<()> {
    send_scanned(client, out, piece, None).await
}

/// [`send`], feeding the body piece to the `isError` scan first.
async fn send_scanned(
    client: &mut Conn,
    out: &mut Vec<u8>,
    piece: Bytes,
    scan: Option<&mut IsErrorScan>,
) -> std::io::Result<()> {
    if let Some(scan) = scan {
        scan.feed(&piece);
    }
    if out.len() + piece.len() <= COALESCE_LIMIT || piece.is_empty() {
        out.extend_from_slice(&piece);
        return flush(client, out).await;
    }
    flush(client, out).await?;
    let (res, _) = client.write_all(piece).await;
    res
}

async fn flush(client: &mut Conn, out: &mut Vec<u8>) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let buf = std::mem::take(out);
    let (res, mut buf) = client.write_all(buf).await;
    buf.clear();
    *out = buf;
    res
}

/// The status line and end-to-end headers for the agent (see [`write_response_headers`]).
fn start_response(
    out: &mut Vec<u8>,
    response: &Head,
    plan: &Plan<'_>,
    upstream: &Upstream,
) -> Result<(), ForwardError> {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(response.status));
    out.push(b' ');
    out.extend_from_slice(response.reason());
    out.extend_from_slice(b"\r\n");
    if !write_response_headers(out, response, plan, &upstream.headers) {
        return Err(ForwardError::BeforeResponse(session_refusal()));
    }
    Ok(())
}

fn session_refusal() -> Reply {
    Reply::error(
        502,
        jsonrpc::UPSTREAM_UNAVAILABLE,
        "the upstream's session id cannot be carried (too long or not visible ASCII)",
    )
}

/// Response headers for the agent: end-to-end headers, minus upstream credentials when asked,
/// with the upstream's session id sealed. `false` when a session id could not be sealed.
fn write_response_headers(
    out: &mut Vec<u8>,
    response: &Head,
    plan: &Plan<'_>,
    injected: &[(String, String)],
) -> bool {
    for (name, value) in response.iter() {
        if head::is_hop_by_hop(name) || head::named_by_connection(response, name) {
            continue;
        }
        if plan.strip_credentials
            && (CREDENTIAL_HEADERS
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
                || injected
                    .iter()
                    .any(|(n, _)| name.eq_ignore_ascii_case(n.as_bytes())))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        match plan.seal_session {
            Some(seal) if name.eq_ignore_ascii_case(b"mcp-session-id") => {
                if !value.iter().all(|b| (0x21..=0x7e).contains(b)) {
                    return false;
                }
                match seal(value) {
                    Some(token) => out.extend_from_slice(token.as_bytes()),
                    None => return false,
                }
            }
            _ => out.extend_from_slice(value),
        }
        out.extend_from_slice(b"\r\n");
    }
    true
}

/// Response headers that carry or request upstream credentials; never relayed to agents in
/// policy mode (the agent authenticates to scopegate, not to the upstream).
const CREDENTIAL_HEADERS: [&str; 4] = [
    "set-cookie",
    "www-authenticate",
    "proxy-authenticate",
    "authentication-info",
];
