//! The upstream exchange: send the request (the body exactly as received), read the response
//! head, and relay the body to the agent as it arrives.
//!
//! Every read from the upstream is written to the agent before the next read is issued, so a
//! Server-Sent Event reaches the agent the moment the upstream sends it. Bodies are relayed in
//! their own framing where the agent can take it (chunked stays chunked, byte for byte); a
//! close-delimited body is re-framed as chunked so the agent's connection survives it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::net::TcpStream;

use crate::fmt::push_decimal;
use crate::http::conn::{Conn, ReadError};
use crate::http::framing::{self, ChunkedDecoder, Framing};
use crate::http::head::{self, Head, HeadError};
use crate::mcp::jsonrpc;
use crate::pipeline::Refusal;
use crate::worker::Worker;

/// Pieces at most this long are copied into one buffer with what precedes them so they go out
/// in a single write; larger ones are handed to the kernel as they are.
const COALESCE_LIMIT: usize = 16 * 1024;
/// The read size on an upstream event stream.
const STREAM_CHUNK: usize = 4 * 1024;

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

/// Finds a result's `"isError": true|false` in a relayed body, piece by piece, without parsing
/// it: in JSON text an unescaped `"isError"` followed by `:` can only be a key. The last
/// `PATTERN_CARRY` bytes of each piece are kept so a key split across reads is still found.
#[derive(Default)]
pub struct IsErrorScan {
    pub found: Option<bool>,
    carry: Vec<u8>,
}

const PATTERN_CARRY: usize = 24;

impl IsErrorScan {
    pub fn reset(&mut self) {
        self.found = None;
        self.carry.clear();
    }

    pub fn feed(&mut self, piece: &[u8]) {
        if self.found.is_some() || piece.is_empty() {
            return;
        }
        // The boundary: the end of the last piece with the start of this one.
        if !self.carry.is_empty() {
            let take = piece.len().min(PATTERN_CARRY);
            self.carry.extend_from_slice(&piece[..take]);
            if let Some(v) = Self::scan(&self.carry) {
                self.found = Some(v);
                return;
            }
        }
        if let Some(v) = Self::scan(piece) {
            self.found = Some(v);
            return;
        }
        self.carry.clear();
        self.carry
            .extend_from_slice(&piece[piece.len().saturating_sub(PATTERN_CARRY)..]);
    }

    fn scan(data: &[u8]) -> Option<bool> {
        // Built once: `memmem::find` would build (and allocate) a searcher on every call.
        static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"isError\""));
        let mut from = 0;
        while let Some(i) = FINDER.find(&data[from..]) {
            let mut j = from + i + 9;
            while j < data.len() && matches!(data[j], b' ' | b'\t' | b'\r' | b'\n') {
                j += 1;
            }
            if data.get(j) == Some(&b':') {
                j += 1;
                while j < data.len() && matches!(data[j], b' ' | b'\t' | b'\r' | b'\n') {
                    j += 1;
                }
                if data[j..].starts_with(b"true") {
                    return Some(true);
                }
                if data[j..].starts_with(b"false") {
                    return Some(false);
                }
            }
            from += i + 9;
        }
        None
    }
}

/// Maps the upstream's session id to the token the agent sees.
pub type SealFn<'a> = &'a dyn Fn(&[u8]) -> Option<String>;
/// Whether a listed item (tool name, prompt name, resource URI) is kept.
pub type KeepFn<'a> = &'a dyn Fn(&str) -> bool;

/// What the policy asks of one exchange beyond plain forwarding.
#[derive(Default)]
pub struct Plan<'a> {
    /// Headers injected into the upstream request (the upstream's credential); they replace any
    /// the agent sent under the same names.
    pub inject: &'a [(String, String)],
    /// The upstream's own session id, sent instead of the agent's (sealed) `Mcp-Session-Id`.
    pub upstream_session: Option<&'a [u8]>,
    /// Turns an `Mcp-Session-Id` from the upstream into the token the agent sees.
    pub seal_session: Option<SealFn<'a>>,
    /// Drop response headers that carry upstream credentials (`Set-Cookie`,
    /// `WWW-Authenticate`, ...), and any named like an injected header.
    pub strip_credentials: bool,
    /// Rewrite a list result to what the agent may see.
    pub filter: Option<(crate::mcp::lists::ListKind, KeepFn<'a>)>,
    /// Look for the result's `isError` (tools/call, audit on).
    pub scan_is_error: bool,
}

/// Largest list response scopegate buffers to filter; larger is refused (502) rather than
/// relayed unfiltered.
pub const MAX_FILTERED_BODY: usize = 16 * 1024 * 1024;

pub struct Relayed {
    /// Whether the agent's connection can carry another request.
    pub keep_alive: bool,
}

pub enum ForwardError {
    /// Nothing was sent to the agent yet: answer with this refusal (502/504).
    BeforeResponse(Refusal),
    /// The response was partly relayed when the upstream or the agent failed: the agent's
    /// connection must be closed (an incomplete body is signalled by the close).
    MidResponse,
}

#[allow(clippy::too_many_arguments)]
pub async fn forward(
    worker: &Worker,
    ex: &mut Exchange,
    client: &mut Conn,
    request: &Head,
    body: Bytes,
    upstream_index: usize,
    peer: SocketAddr,
    close_after: bool,
    plan: &Plan<'_>,
) -> Result<Relayed, ForwardError> {
    let upstream = &worker.config.upstreams[upstream_index];
    let timeout = worker.config.upstream_timeout;
    let deadline = Instant::now() + timeout;

    build_request(&mut ex.out, request, &body, upstream, peer, plan);
    let inline_body = body.len() <= COALESCE_LIMIT;
    if inline_body {
        ex.out.extend_from_slice(&body);
    }

    ex.upstream_us = None;
    ex.status = 0;
    ex.is_error.reset();
    let sent_at = Instant::now();
    let mut up = match exchange_head(
        worker,
        upstream_index,
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
            return Err(ForwardError::BeforeResponse(unavailable(&upstream.name, e)));
        }
        Err(HeadFailure::Exchange(e)) => {
            return Err(ForwardError::BeforeResponse(
                e.refusal(&upstream.name, timeout),
            ));
        }
    };
    ex.upstream_us = Some(sent_at.elapsed().as_micros() as u64);
    ex.status = ex.response.status;

    let (relayed, reusable) = relay(
        worker,
        ex,
        client,
        request,
        &mut up,
        upstream_index,
        close_after,
        plan,
    )
    .await?;
    // The response head shares the upstream connection's buffer: let it go before the
    // connection is reused, so its next read does not allocate a new buffer.
    ex.response.raw = Bytes::new();
    if reusable {
        up.read_chunk = crate::http::conn::READ_CHUNK;
        worker.pool.put(upstream_index, up);
    }
    Ok(relayed)
}

/// The request line and headers for the upstream: end-to-end headers as received, minus the
/// agent's credentials and hop-by-hop fields, with `Host` set for the upstream and the agent's
/// address added to `X-Forwarded-For`.
fn build_request(
    out: &mut Vec<u8>,
    request: &Head,
    body: &Bytes,
    upstream: &crate::upstream::Upstream,
    peer: SocketAddr,
    plan: &Plan<'_>,
) {
    out.clear();
    out.extend_from_slice(request.method());
    out.push(b' ');
    out.extend_from_slice(upstream.url.path.as_bytes());
    let target = request.target();
    if let Some(q) = memchr::memchr(b'?', target) {
        let query = &target[q + 1..];
        if !query.is_empty() {
            out.push(if upstream.url.path.contains('?') {
                b'&'
            } else {
                b'?'
            });
            out.extend_from_slice(query);
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(upstream.url.host_header.as_bytes());
    out.extend_from_slice(b"\r\n");

    let mut forwarded_for: Option<&[u8]> = None;
    for (name, value) in request.iter() {
        if head::is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"host")
            || name.eq_ignore_ascii_case(b"expect")
            // The agent's credential is scopegate's business, never the upstream's.
            || name.eq_ignore_ascii_case(b"authorization")
            || head::named_by_connection(request, name)
            || (plan.upstream_session.is_some() && name.eq_ignore_ascii_case(b"mcp-session-id"))
            || plan.inject.iter().any(|(n, _)| name.eq_ignore_ascii_case(n.as_bytes()))
        {
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            forwarded_for = Some(value);
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in plan.inject {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(session) = plan.upstream_session {
        out.extend_from_slice(b"Mcp-Session-Id: ");
        out.extend_from_slice(session);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    if let Some(prior) = forwarded_for {
        out.extend_from_slice(prior);
        out.extend_from_slice(b", ");
    }
    {
        use std::io::Write as _;
        let _ = write!(out, "{}", peer.ip());
    }
    out.extend_from_slice(b"\r\n");
    if !body.is_empty() || request.method() == b"POST" {
        out.extend_from_slice(b"Content-Length: ");
        push_decimal(out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Why [`exchange_head`] got no response head.
pub(crate) enum HeadFailure {
    /// No connection to the upstream could be made.
    Connect(UpstreamError),
    /// The request was sent (or sending failed) and no valid head came back.
    Exchange(UpstreamError),
}

/// Sends `out` (then `body`, unless it is already inline in `out`) to upstream `index` and reads
/// the response head into `head`. The connection comes from the worker's pool when it has one;
/// a pooled connection may have been closed by the upstream while idle, so if it fails before
/// any response byte arrives the request is retried once on a fresh connection.
pub(crate) async fn exchange_head(
    worker: &Worker,
    index: usize,
    out: &mut Vec<u8>,
    body: &Bytes,
    inline_body: bool,
    head: &mut Head,
    deadline: Instant,
) -> Result<Conn, HeadFailure> {
    let addr = worker.config.upstreams[index].url.addr;
    for attempt in 0..2 {
        let (mut conn, reused) = match worker.pool.take(index) {
            Some(c) if attempt == 0 => (c, true),
            _ => (
                connect(addr, deadline)
                    .await
                    .map_err(HeadFailure::Connect)?,
                false,
            ),
        };
        let result = match send_request(&mut conn, out, body, inline_body).await {
            Ok(()) => read_response_head(&mut conn, head, deadline).await,
            Err(e) => Err(UpstreamError::Io(e)),
        };
        match result {
            Ok(()) => return Ok(conn),
            Err(UpstreamError::Io(_) | UpstreamError::Closed) if reused => continue,
            Err(e) => return Err(HeadFailure::Exchange(e)),
        }
    }
    Err(HeadFailure::Exchange(UpstreamError::Closed))
}

#[derive(Debug)]
pub(crate) enum UpstreamError {
    Io(std::io::Error),
    /// The upstream closed before a complete response head.
    Closed,
    TimedOut,
    BadHead(&'static str),
}

impl UpstreamError {
    pub(crate) fn refusal(self, name: &str, timeout: Duration) -> Refusal {
        match self {
            UpstreamError::TimedOut => Refusal::new(
                504,
                jsonrpc::UPSTREAM_TIMEOUT,
                format!(
                    "upstream {name:?} did not answer within {} ms (SCOPEGATE_UPSTREAM_TIMEOUT_MS)",
                    timeout.as_millis()
                ),
            ),
            UpstreamError::BadHead(why) => Refusal::new(
                502,
                jsonrpc::UPSTREAM_UNAVAILABLE,
                format!("upstream {name:?} sent an invalid response: {why}"),
            ),
            other => unavailable(name, other),
        }
    }
}

fn unavailable(name: &str, e: UpstreamError) -> Refusal {
    let what = match &e {
        UpstreamError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "refused the connection".to_owned()
        }
        UpstreamError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset => {
            "reset the connection".to_owned()
        }
        UpstreamError::Io(io) => format!("failed: {io}"),
        UpstreamError::Closed => "closed the connection before answering".to_owned(),
        UpstreamError::TimedOut => "timed out".to_owned(),
        UpstreamError::BadHead(why) => format!("sent an invalid response: {why}"),
    };
    if matches!(e, UpstreamError::TimedOut) {
        return Refusal::new(
            504,
            jsonrpc::UPSTREAM_TIMEOUT,
            format!("upstream {name:?} {what}"),
        );
    }
    Refusal::new(
        502,
        jsonrpc::UPSTREAM_UNAVAILABLE,
        format!("upstream {name:?} {what}"),
    )
}

async fn connect(addr: SocketAddr, deadline: Instant) -> Result<Conn, UpstreamError> {
    let left = deadline.saturating_duration_since(Instant::now());
    match monoio::time::timeout(left, TcpStream::connect_addr(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(Conn::new(stream))
        }
        Ok(Err(e)) => Err(UpstreamError::Io(e)),
        Err(_) => Err(UpstreamError::TimedOut),
    }
}

async fn send_request(
    up: &mut Conn,
    out: &mut Vec<u8>,
    body: &Bytes,
    inline_body: bool,
) -> std::io::Result<()> {
    let buf = std::mem::take(out);
    let (res, buf) = up.write_all(buf).await;
    *out = buf;
    res?;
    if !inline_body {
        let (res, _) = up.write_all(body.clone()).await;
        res?;
    }
    Ok(())
}

async fn read_response_head(
    up: &mut Conn,
    response: &mut Head,
    deadline: Instant,
) -> Result<(), UpstreamError> {
    up.buf.clear();
    loop {
        if !up.buf.is_empty() {
            match head::parse_response(&up.buf, response) {
                Ok(Some(len)) => {
                    if (100..200).contains(&response.status) {
                        if response.status == 101 {
                            return Err(UpstreamError::BadHead("unexpected protocol switch (101)"));
                        }
                        // Interim response (100 Continue, 103 Early Hints): not relayed.
                        let _ = up.buf.split_to(len);
                        continue;
                    }
                    response.raw = up.buf.split_to(len).freeze();
                    return Ok(());
                }
                Ok(None) => {}
                Err(HeadError::TooLarge) => {
                    return Err(UpstreamError::BadHead("response head too large"));
                }
                Err(HeadError::Malformed(why)) => return Err(UpstreamError::BadHead(why)),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match up.fill_within(Some(left)).await {
            Ok(0) => return Err(UpstreamError::Closed),
            Ok(_) => {}
            Err(ReadError::TimedOut) => return Err(UpstreamError::TimedOut),
            Err(ReadError::Io(e)) => return Err(UpstreamError::Io(e)),
        }
    }
}

/// How the agent receives the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Downstream {
    Empty,
    Length(u64),
    /// Upstream chunked, relayed byte for byte.
    ChunkedRaw,
    /// Upstream chunked, de-chunked for an HTTP/1.0 agent and ended by close.
    ChunkedDecoded,
    /// Upstream close-delimited, re-framed as chunks.
    ChunkedWrapped,
    /// Upstream close-delimited, relayed close-delimited (HTTP/1.0 agent).
    UntilClose,
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    worker: &Worker,
    ex: &mut Exchange,
    client: &mut Conn,
    request: &Head,
    up: &mut Conn,
    upstream_index: usize,
    close_after: bool,
    plan: &Plan<'_>,
) -> Result<(Relayed, bool), ForwardError> {
    if let Some((kind, keep)) = plan.filter
        && ex.response.status == 200
    {
        // Boxed: list filtering is rare next to calls, and its state machine would otherwise
        // size every connection's task.
        return Box::pin(relay_filtered(
            worker,
            ex,
            client,
            request,
            up,
            upstream_index,
            close_after,
            plan,
            kind,
            keep,
        ))
        .await;
    }
    let response = &ex.response;
    let upstream_framing = match framing::response_framing(response, request.method()) {
        Ok(f) => f,
        Err(e) => {
            return Err(ForwardError::BeforeResponse(Refusal::new(
                502,
                jsonrpc::UPSTREAM_UNAVAILABLE,
                format!(
                    "upstream {:?} sent an invalid response: {}",
                    worker.config.upstreams[upstream_index].name,
                    e.message()
                ),
            )));
        }
    };
    let agent_is_http10 = request.minor_version == 0;
    let downstream = match (upstream_framing, agent_is_http10) {
        (Framing::Empty, _) => Downstream::Empty,
        (Framing::Length(n), _) => Downstream::Length(n),
        (Framing::Chunked, false) => Downstream::ChunkedRaw,
        (Framing::Chunked, true) => Downstream::ChunkedDecoded,
        (Framing::UntilClose, false) => Downstream::ChunkedWrapped,
        (Framing::UntilClose, true) => Downstream::UntilClose,
    };
    // Decided now, not when the request arrived: a drain that began meanwhile closes it.
    let keep_client = !close_after
        && !crate::worker::shutting_down()
        && !matches!(
            downstream,
            Downstream::ChunkedDecoded | Downstream::UntilClose
        );
    let mut keep_upstream = response.minor_version == 1
        && !head::connection_has(response, "close")
        && upstream_framing != Framing::UntilClose;
    // Long-lived event streams have no read deadline; other bodies must keep flowing.
    let is_event_stream = response
        .get("content-type")
        .is_some_and(|v| v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream"));
    let read_limit = (!is_event_stream).then_some(worker.config.upstream_timeout);
    let _stream_gauge =
        is_event_stream.then(|| StreamGauge::open(&worker.stats.metrics.sse_streams));

    // The response head for the agent.
    let out = &mut ex.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(response.status));
    out.push(b' ');
    out.extend_from_slice(response.reason());
    out.extend_from_slice(b"\r\n");
    if !write_response_headers(out, response, plan) {
        return Err(ForwardError::BeforeResponse(session_refusal()));
    }
    match downstream {
        Downstream::Empty => {
            if !matches!(response.status, 204 | 304) && request.method() != b"HEAD" {
                out.extend_from_slice(b"Content-Length: 0\r\n");
            }
        }
        Downstream::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Downstream::ChunkedRaw | Downstream::ChunkedWrapped => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n")
        }
        Downstream::ChunkedDecoded | Downstream::UntilClose => {}
    }
    if !keep_client {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if is_event_stream {
        // A long-lived stream: let go of the response head's share of the upstream buffer and
        // read the stream into a small one (events are small; an idle stream should cost
        // little memory).
        ex.response.raw = Bytes::new();
        let mut small = BytesMut::with_capacity(STREAM_CHUNK.max(up.buf.len()));
        small.extend_from_slice(&up.buf);
        up.buf = small;
        up.read_chunk = STREAM_CHUNK;
    }
    let out = &mut ex.out;

    let mid = |_| ForwardError::MidResponse;
    match downstream {
        Downstream::Empty => {
            flush(client, out).await.map_err(mid)?;
            if !up.buf.is_empty() {
                keep_upstream = false;
            }
        }
        Downstream::Length(n) => {
            let mut remaining = n;
            loop {
                let take = (up.buf.len() as u64).min(remaining) as usize;
                let piece = up.buf.split_to(take).freeze();
                remaining -= take as u64;
                send_scanned(
                    client,
                    out,
                    piece,
                    plan.scan_is_error.then_some(&mut ex.is_error),
                )
                .await
                .map_err(mid)?;
                if remaining == 0 {
                    break;
                }
                fill(up, read_limit).await?;
            }
            if !up.buf.is_empty() {
                keep_upstream = false;
            }
        }
        Downstream::ChunkedRaw | Downstream::ChunkedDecoded => {
            let decode = downstream == Downstream::ChunkedDecoded;
            let mut decoder = ChunkedDecoder::default();
            let mut decoded = BytesMut::new();
            loop {
                let consumed = decoder
                    .feed(&up.buf, decode.then_some(&mut decoded))
                    .map_err(|_| ForwardError::MidResponse)?;
                let raw = up.buf.split_to(consumed).freeze();
                let piece = if decode {
                    decoded.split().freeze()
                } else {
                    raw
                };
                send_scanned(
                    client,
                    out,
                    piece,
                    plan.scan_is_error.then_some(&mut ex.is_error),
                )
                .await
                .map_err(mid)?;
                if decoder.is_done() {
                    break;
                }
                fill(up, read_limit).await?;
            }
            if !up.buf.is_empty() {
                keep_upstream = false;
            }
        }
        Downstream::ChunkedWrapped | Downstream::UntilClose => {
            let wrap = downstream == Downstream::ChunkedWrapped;
            let mut chunk = BytesMut::new();
            loop {
                if !up.buf.is_empty() {
                    let data = up.buf.split().freeze();
                    let piece = if wrap {
                        framing::encode_chunk(&data, &mut chunk);
                        chunk.split().freeze()
                    } else {
                        data
                    };
                    send_scanned(
                        client,
                        out,
                        piece,
                        plan.scan_is_error.then_some(&mut ex.is_error),
                    )
                    .await
                    .map_err(mid)?;
                }
                match up.fill_within(read_limit).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => return Err(ForwardError::MidResponse),
                }
            }
            if wrap {
                send(client, out, Bytes::from_static(framing::LAST_CHUNK))
                    .await
                    .map_err(mid)?;
            }
        }
    }

    Ok((
        Relayed {
            keep_alive: keep_client,
        },
        keep_upstream,
    ))
}

async fn fill(up: &mut Conn, limit: Option<Duration>) -> Result<(), ForwardError> {
    match up.fill_within(limit).await {
        Ok(0) | Err(_) => Err(ForwardError::MidResponse),
        Ok(_) => Ok(()),
    }
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

fn session_refusal() -> Refusal {
    Refusal::new(
        502,
        jsonrpc::UPSTREAM_UNAVAILABLE,
        "the upstream's session id cannot be carried (too long or not visible ASCII)",
    )
}

/// Response headers for the agent: end-to-end headers, minus upstream credentials when asked,
/// with the upstream's session id sealed. `false` when a session id could not be sealed.
fn write_response_headers(out: &mut Vec<u8>, response: &Head, plan: &Plan<'_>) -> bool {
    for (name, value) in response.iter() {
        if head::is_hop_by_hop(name) || head::named_by_connection(response, name) {
            continue;
        }
        if plan.strip_credentials
            && (CREDENTIAL_HEADERS
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
                || plan
                    .inject
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

/// Reads a list response whole, filters it, and sends it with a length.
#[allow(clippy::too_many_arguments)]
async fn relay_filtered(
    worker: &Worker,
    ex: &mut Exchange,
    client: &mut Conn,
    request: &Head,
    up: &mut Conn,
    upstream_index: usize,
    close_after: bool,
    plan: &Plan<'_>,
    kind: crate::mcp::lists::ListKind,
    keep: &dyn Fn(&str) -> bool,
) -> Result<(Relayed, bool), ForwardError> {
    let name = &worker.config.upstreams[upstream_index].name;
    let bad = |why: &str| {
        ForwardError::BeforeResponse(Refusal::new(
            502,
            jsonrpc::UPSTREAM_UNAVAILABLE,
            format!("upstream {name:?}: {why}"),
        ))
    };
    let response = &ex.response;
    let framing =
        framing::response_framing(response, request.method()).map_err(|e| bad(e.message()))?;
    let limit = Some(worker.config.upstream_timeout);
    let mut body = BytesMut::new();
    let mut reusable = response.minor_version == 1 && !head::connection_has(response, "close");
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => {
            if n as usize > MAX_FILTERED_BODY {
                return Err(bad("list response too large to filter"));
            }
            while (up.buf.len() as u64) < n {
                fill(up, limit)
                    .await
                    .map_err(|_| bad("list response cut short"))?;
            }
            body = up.buf.split_to(n as usize);
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::default();
            loop {
                let consumed = decoder
                    .feed(&up.buf, Some(&mut body))
                    .map_err(|_| bad("bad chunked list response"))?;
                let _ = up.buf.split_to(consumed);
                if body.len() > MAX_FILTERED_BODY {
                    return Err(bad("list response too large to filter"));
                }
                if decoder.is_done() {
                    break;
                }
                fill(up, limit)
                    .await
                    .map_err(|_| bad("list response cut short"))?;
            }
        }
        Framing::UntilClose => {
            reusable = false;
            loop {
                body.extend_from_slice(&up.buf.split());
                if body.len() > MAX_FILTERED_BODY {
                    return Err(bad("list response too large to filter"));
                }
                match up.fill_within(limit).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => return Err(bad("list response cut short")),
                }
            }
        }
    }
    if !up.buf.is_empty() {
        reusable = false;
    }
    let is_sse = response
        .get("content-type")
        .is_some_and(|v| v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream"));
    let filtered = if is_sse {
        crate::mcp::lists::filter_sse(&body, kind, keep)
    } else {
        crate::mcp::lists::filter_json(&body, kind, keep)
    }
    .ok_or_else(|| bad("list response is not a readable list result; not relayed unfiltered"))?;

    let keep_client = !close_after && !crate::worker::shutting_down();
    let out = &mut ex.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 200 ");
    out.extend_from_slice(response.reason());
    out.extend_from_slice(b"\r\n");
    if !write_response_headers(out, response, plan) {
        return Err(ForwardError::BeforeResponse(session_refusal()));
    }
    out.extend_from_slice(b"Content-Length: ");
    push_decimal(out, filtered.len() as u64);
    out.extend_from_slice(b"\r\n");
    if !keep_client {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    send(client, out, Bytes::from(filtered))
        .await
        .map_err(|_| ForwardError::MidResponse)?;
    Ok((
        Relayed {
            keep_alive: keep_client,
        },
        reusable,
    ))
}

/// Counts an event stream as open for as long as it is relayed.
pub(crate) struct StreamGauge<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> StreamGauge<'a> {
    pub(crate) fn open(gauge: &'a std::sync::atomic::AtomicU64) -> StreamGauge<'a> {
        gauge.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        StreamGauge(gauge)
    }
}

impl Drop for StreamGauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
