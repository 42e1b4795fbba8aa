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
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use monoio::net::TcpStream;

use crate::forward::{self, Exchange};
use crate::http::conn::{Conn, ReadError};
use crate::http::framing::{self, ChunkedDecoder, Framing};
use crate::http::head::{self, Head, HeadError};
use crate::http::response;
use crate::mcp::envelope::{EnvelopeParser, Id};
use crate::mcp::{jsonrpc, origin};
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
    pub headers: &'static str,
}

impl Refusal {
    pub fn new(status: u16, code: i32, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
            close: false,
            headers: "",
        }
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
    /// An MCP endpoint backed by upstream `index`.
    Mcp {
        upstream: usize,
    },
}

/// Serves requests on one client connection until it closes.
pub async fn serve_connection(
    worker: &Worker,
    stream: TcpStream,
    peer: SocketAddr,
    idle: &Cell<bool>,
) {
    let mut client = Conn::new(stream);
    let mut head = Head::default();
    let mut parser = EnvelopeParser::new();
    let mut exchange = Exchange::default();

    loop {
        // Stage 1: the request head.
        idle.set(client.buf.is_empty());
        let head_len = match read_head(worker, &mut client, &mut head).await {
            Ok(Some(len)) => len,
            Ok(None) => return,
            Err(refusal) => {
                if respond(&mut client, None, &refusal, true).await.is_ok() {
                    linger_close(&mut client).await;
                }
                return;
            }
        };
        idle.set(false);
        let started = Instant::now();
        head.raw = client.buf.split_to(head_len).freeze();

        let outcome = handle_request(
            worker,
            &mut client,
            &head,
            &mut parser,
            &mut exchange,
            peer,
            started,
        )
        .await;
        match outcome {
            Ok(KeepAlive::Yes) if !shutting_down() => {}
            _ => return,
        }
        client.release_idle_buffer();
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
    _started: Instant,
) -> Result<KeepAlive, ()> {
    let client_wants_close = head.minor_version == 0 || head::connection_has(head, "close");

    // Stage 2: how the body is framed. Ambiguous framing is refused and the connection closed,
    // since we cannot know where the next request would start.
    let body_framing = match check_framing(head) {
        Ok(f) => f,
        Err(refusal) => return finish(client, None, &refusal, true).await,
    };

    // Stage 3: route, and the DNS-rebinding checks.
    let route = route(worker, head).and_then(|r| check_origin(worker, head).map(|()| r));

    // Stage 4: the body, within SCOPEGATE_MAX_BODY and SCOPEGATE_BODY_TIMEOUT_MS. A refused
    // request's body is still read (within the same limits) so the connection stays usable;
    // one that announces `Expect: 100-continue` is answered at once instead.
    if let Err(refusal) = &route
        && body_framing != Framing::Empty
        && head.get("expect").is_some()
    {
        return finish(client, None, refusal, true).await;
    }
    let body = match read_body(worker, client, head, body_framing).await {
        Ok(b) => b,
        Err(refusal) => return finish(client, None, &refusal, true).await,
    };
    let route = match route {
        Ok(r) => r,
        Err(refusal) => return finish(client, None, &refusal, client_wants_close).await,
    };
    if route == Route::Health {
        let reply = response::build(200, "text/plain", "", b"ok\n", client_wants_close);
        return write_reply(client, reply, client_wants_close).await;
    }
    let Route::Mcp { upstream } = route else {
        return Err(());
    };

    // Stage 5: the JSON-RPC envelope of every POST.
    let envelope = if head.method() == b"POST" {
        match parser.parse(&body) {
            Ok(env) => Some(env),
            Err(e) => {
                let refusal = Refusal::new(400, e.code(), e.message());
                return finish(client, None, &refusal, client_wants_close).await;
            }
        }
    } else {
        None
    };
    let request_id: Option<Id<'_>> = envelope
        .as_ref()
        .and_then(|e| e.single())
        .and_then(|m| m.id);

    // Stage 6: forward upstream and relay the answer.
    let relayed = forward::forward(
        worker,
        exchange,
        client,
        head,
        body,
        upstream,
        peer,
        client_wants_close || shutting_down(),
    )
    .await;
    drop(envelope);
    match relayed {
        Ok(forward::Relayed { keep_alive: true }) => Ok(KeepAlive::Yes),
        Ok(forward::Relayed { keep_alive: false }) => Ok(KeepAlive::No),
        Err(forward::ForwardError::BeforeResponse(refusal)) => {
            let close = client_wants_close || refusal.close;
            finish(client, request_id, &refusal, close).await
        }
        Err(forward::ForwardError::MidResponse) => Err(()),
    }
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

/// Stage 3a: which endpoint. `/mcp/<name>` names an upstream; `/mcp` is the only upstream.
pub fn route(worker: &Worker, head: &Head) -> Result<Route, Refusal> {
    let target = head.target();
    let path = match memchr::memchr(b'?', target) {
        Some(i) => &target[..i],
        None => target,
    };
    if path == b"/healthz" {
        return if head.method() == b"GET" || head.method() == b"HEAD" {
            Ok(Route::Health)
        } else {
            Err(method_not_allowed("GET, HEAD"))
        };
    }
    let upstreams = &worker.config.upstreams;
    let index = if path == b"/mcp" || path == b"/mcp/" {
        if upstreams.len() != 1 {
            return Err(Refusal::new(
                404,
                jsonrpc::GATEWAY_REFUSED,
                format!(
                    "several upstreams are configured; use /mcp/<name> with one of: {}",
                    upstream_names(worker)
                ),
            ));
        }
        0
    } else if let Some(name) = path.strip_prefix(b"/mcp/") {
        let name = name.strip_suffix(b"/").unwrap_or(name);
        upstreams
            .iter()
            .position(|u| u.name.as_bytes() == name)
            .ok_or_else(|| {
                Refusal::new(
                    404,
                    jsonrpc::GATEWAY_REFUSED,
                    format!(
                        "unknown upstream {:?}; configured: {}",
                        String::from_utf8_lossy(name),
                        upstream_names(worker)
                    ),
                )
            })?
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

fn method_not_allowed(allow: &'static str) -> Refusal {
    let mut r = Refusal::new(
        405,
        jsonrpc::GATEWAY_REFUSED,
        format!("method not allowed; allowed: {allow}"),
    );
    r.headers = match allow {
        "GET, HEAD" => "Allow: GET, HEAD\r\n",
        _ => "Allow: GET, POST, DELETE\r\n",
    };
    r
}

fn upstream_names(worker: &Worker) -> String {
    worker
        .config
        .upstreams
        .iter()
        .map(|u| u.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
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
        ));
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
        ));
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
    let timed_out = || {
        Refusal::new(
            408,
            jsonrpc::GATEWAY_REFUSED,
            "request body not received within SCOPEGATE_BODY_TIMEOUT_MS",
        )
    };
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
                match client
                    .fill_within(Some(deadline.saturating_duration_since(Instant::now())))
                    .await
                {
                    Ok(0) | Err(ReadError::Io(_)) => {
                        return Err(Refusal::new(
                            400,
                            jsonrpc::GATEWAY_REFUSED,
                            "body shorter than Content-Length",
                        ));
                    }
                    Ok(_) => {}
                    Err(ReadError::TimedOut) => return Err(timed_out()),
                }
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
                match client
                    .fill_within(Some(deadline.saturating_duration_since(Instant::now())))
                    .await
                {
                    Ok(0) | Err(ReadError::Io(_)) => {
                        return Err(Refusal::new(
                            400,
                            jsonrpc::GATEWAY_REFUSED,
                            "chunked body cut short",
                        ));
                    }
                    Ok(_) => {}
                    Err(ReadError::TimedOut) => return Err(timed_out()),
                }
            }
        }
        Framing::Empty | Framing::UntilClose => Ok(Bytes::new()),
    }
}

/// Writes a refusal; `Ok(KeepAlive::Yes)` when the connection can serve another request.
async fn finish(
    client: &mut Conn,
    id: Option<Id<'_>>,
    refusal: &Refusal,
    close: bool,
) -> Result<KeepAlive, ()> {
    let close = close || refusal.close;
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
        refusal.headers,
        &body,
        close,
    );
    let (res, _) = client.write_all(reply).await;
    res.map_err(|_| ())
}

async fn write_reply(client: &mut Conn, reply: Vec<u8>, close: bool) -> Result<KeepAlive, ()> {
    let (res, _) = client.write_all(reply).await;
    res.map_err(|_| ())?;
    Ok(if close { KeepAlive::No } else { KeepAlive::Yes })
}
