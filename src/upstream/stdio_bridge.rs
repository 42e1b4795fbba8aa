//! The Streamable HTTP face of a stdio upstream. A worker's connection to a stdio upstream is
//! one end of a socket pair; a bridge thread serves the other end as an MCP server would, and
//! turns each request into hub calls ([`Hub`]): `initialize` opens a session (its process),
//! a request's messages come back as its answer (one JSON body when the first message is the
//! answer, else an event stream), notifications and answers are accepted with 202, GET is the
//! session's stream, DELETE ends the session. So everything above the connection (the byte
//! relay, filtered lists, sealed session tokens, the aggregate endpoint's client) works on a
//! stdio upstream unchanged. The socket pair is private to the process: nothing else can reach
//! a bridge. The one header only scopegate sets, `Scopegate-Agent`, names the agent whose
//! sessionless requests share a process (the request writer drops any the agent sends).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::stdio_hub::{Hub, HubError, Line, Lines, Quiet};
use super::stdio_router::SessionId;
use crate::mcp::jsonrpc;

/// The header naming the agent, set by scopegate on requests to stdio upstreams.
pub const AGENT_HEADER: &str = "Scopegate-Agent";
/// The header of a bridge's failure answer saying what went wrong, for the audit log.
pub const FAILURE_HEADER: &str = "Scopegate-Stdio-Failure";
/// The longest request head the bridge reads (scopegate writes them, well under this).
const MAX_HEAD: usize = 64 * 1024;
/// The longest request body (scopegate has already applied `SCOPEGATE_MAX_BODY`).
const MAX_BODY: usize = 256 * 1024 * 1024;

/// Serves one connection from a worker until it closes.
pub fn serve(hub: Arc<Hub>, conn: UnixStream) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = conn;
    while let Some(req) = read_request(&mut reader) {
        if handle(&hub, &req, &mut out).is_err() {
            return;
        }
    }
}

/// A request as the bridge needs it.
struct Request {
    method: String,
    session: Option<String>,
    agent: String,
    accepts_json: bool,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<UnixStream>) -> Option<Request> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        if reader.read_until(b'\n', &mut head).ok()? == 0 || head.len() > MAX_HEAD {
            return None;
        }
        if head[before..] == *b"\r\n" {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(&head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let text = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let length: usize = text("content-length").map_or(Some(0), |v| v.parse().ok())?;
    if length > MAX_BODY || text("transfer-encoding").is_some() {
        return None;
    }
    let accepts_json = text("accept").is_none_or(|a| {
        a.contains("application/json") || a.contains("*/*") || !a.contains("text/event-stream")
    });
    let req = Request {
        method: parsed.method?.to_owned(),
        session: text("mcp-session-id").map(str::to_owned),
        agent: text(AGENT_HEADER).unwrap_or("").to_owned(),
        accepts_json,
        body: Vec::new(),
    };
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request { body, ..req })
}

/// What the agent sees as its session id: the hub's instance and the session's number.
pub fn session_token(hub: &Hub, session: SessionId) -> String {
    format!("{:016x}-{session}", hub.instance)
}

/// The session a token names on this hub, if it is this hub's.
pub fn session_of(hub: &Hub, token: &[u8]) -> Option<SessionId> {
    let text = std::str::from_utf8(token).ok()?;
    let (instance, n) = text.split_once('-')?;
    (u64::from_str_radix(instance, 16).ok()? == hub.instance).then_some(())?;
    n.parse().ok()
}

type Written = std::io::Result<()>;

fn handle(hub: &Hub, req: &Request, out: &mut UnixStream) -> Written {
    let session = match &req.session {
        // Only the agent that opened a session may use it (scopegate's sealed tokens already
        // ensure it; this is the second lock on the door).
        Some(token) => match session_of(hub, token.as_bytes()) {
            Some(s) if hub.owned_by(s, &req.agent) => Some(s),
            _ => return not_found(out),
        },
        None => None,
    };
    match req.method.as_str() {
        "POST" => post(hub, req, session, out),
        "GET" => match session.map(|s| hub.listen(s)) {
            None => error(out, 400, None, "a GET stream needs an Mcp-Session-Id"),
            Some(Err(_)) => not_found(out),
            Some(Ok(lines)) => {
                let r = Relay {
                    request: None,
                    token: None,
                    accepts_json: false,
                    first_within: None,
                    stream_now: true,
                };
                relay(hub, out, lines, r).map(|_| ())
            }
        },
        // A session here is known and the agent's (checked above).
        "DELETE" => match session {
            Some(s) => {
                hub.close(s);
                respond(out, 200, "application/json", None, b"", false)
            }
            None => error(out, 400, None, "DELETE needs an Mcp-Session-Id"),
        },
        _ => error(out, 405, None, "method not allowed"),
    }
}

fn post(hub: &Hub, req: &Request, session: Option<SessionId>, out: &mut UnixStream) -> Written {
    let Ok(msg) = serde_json::from_slice::<Value>(&req.body) else {
        return error(out, 400, None, "the body is not JSON");
    };
    if msg.is_array() {
        return error(
            out,
            400,
            None,
            "JSON-RPC batches are not supported by stdio upstreams; send one message per POST",
        );
    }
    let is_request = msg.get("method").is_some() && msg.get("id").is_some();
    let id = msg.get("id").cloned();
    let initialize = is_request && msg["method"] == "initialize";
    // The session: a new one for initialize, the agent's own for a sessionless request.
    let (session, opened, probe) = match session {
        Some(s) => (s, false, false),
        None if initialize => match hub.open(&req.agent) {
            Ok(s) => (s, true, false),
            Err(e) => return refuse(hub, out, id, e),
        },
        None if is_request => match hub.agent_session(&req.agent) {
            Ok((s, fresh)) => (s, false, fresh),
            Err(e) => return refuse(hub, out, id, e),
        },
        None => return error(out, 400, id, "no Mcp-Session-Id: initialize first"),
    };
    if !is_request {
        return match hub.send(session, msg) {
            Ok(()) | Err(HubError::Unroutable) => {
                respond(out, 202, "application/json", None, b"", false)
            }
            Err(_) => not_found(out),
        };
    }
    let (n, lines) = match hub.request(session, msg) {
        Ok(stream) => stream,
        Err(HubError::NoSession) => return not_found(out),
        Err(e) => return refuse(hub, out, id, e),
    };
    let token = opened.then(|| session_token(hub, session));
    // A request that started a process (initialize, or an agent's first sessionless one) has
    // the startup time for its first message.
    let startup = (opened || probe).then_some(hub.options.startup_timeout);
    let r = Relay {
        request: Some((session, n)),
        token: token.as_deref(),
        accepts_json: req.accepts_json,
        first_within: startup,
        stream_now: false,
    };
    match relay(hub, out, lines, r) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            hub.close(session);
            let why = format!(
                "upstream {:?} did not answer within {} s of starting (startup_timeout_s)",
                hub.name,
                hub.options.startup_timeout.as_secs()
            );
            crate::warn!("stdio: {why}");
            error(out, 504, id, &why)
        }
        result => {
            let refused = result.as_ref().is_ok_and(|&error| error);
            // A session whose initialize failed is not the agent's to keep; nor a process
            // started for a sessionless request it refused (a server of an earlier revision
            // answering a client's `server/discover` probe: the client initializes next).
            if (opened && (result.is_err() || hub.ended(session).is_some())) || (probe && refused) {
                hub.close(session);
            }
            result.map(|_| ())
        }
    }
}

/// How often a bridge waiting on a quiet child looks whether its worker is still there.
const WATCH: Duration = Duration::from_secs(1);

/// What a request's stream is: whose, and how it is answered.
struct Relay<'a> {
    /// The hub's request number and session, so a stream the worker gave up on is abandoned.
    request: Option<(SessionId, u64)>,
    /// A new session's token, sent with the answer.
    token: Option<&'a str>,
    accepts_json: bool,
    /// The first message must come within this (startup), else `TimedOut` with nothing sent.
    first_within: Option<Duration>,
    /// A GET stream: its head goes at once (a quiet server may say nothing for hours).
    stream_now: bool,
}

/// Relays the hub's lines for one request (or a GET stream) to the worker: one JSON body when
/// the first line is the answer and the agent takes JSON, else an event stream. A failure
/// before anything was sent is the answer (with [`FAILURE_HEADER`]); after, its error event is
/// the last, and the connection is dropped unfinished so the worker records the failure. A
/// worker that hangs up (its agent left, or it timed out) ends the relay, and the request is
/// abandoned. `Ok(true)`: the answer was a JSON-RPC error.
fn relay(hub: &Hub, out: &mut UnixStream, lines: Lines, r: Relay<'_>) -> std::io::Result<bool> {
    let mut head_sent = false;
    if r.stream_now {
        send_stream_head(out, r.token)?;
        head_sent = true;
    }
    let started = Instant::now();
    let mut answer_error = false;
    let mut answered = false;
    loop {
        let line = match lines.next(Some(WATCH)) {
            Ok(Some(line)) => line,
            Ok(None) => {
                if !head_sent {
                    // Ended without a word (the session ended, or the request was cancelled).
                    return error(out, 502, None, "upstream stdio server: the session ended")
                        .map(|()| true);
                }
                if r.request.is_some() && !answered {
                    // The request's stream ended without its answer (dropped past its limit,
                    // or the process failed without room to say so): cut, not finished, so
                    // the worker records the failure.
                    return Err(std::io::Error::other("the stream ended without an answer"));
                }
                return out.write_all(b"0\r\n\r\n").map(|()| answer_error);
            }
            Err(Quiet) => {
                if !head_sent
                    && let Some(limit) = r.first_within
                    && started.elapsed() >= limit
                {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                if worker_gone(out) {
                    if let Some((session, n)) = r.request {
                        hub.abandon(session, n);
                    }
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
                continue;
            }
        };
        // `answer`: the answer to the request, and whether it is an error (the hub says so).
        let (failed, answer) = match &line {
            Line::Failed(_) => (true, None),
            Line::Answer(_, error) => (false, Some(*error)),
            Line::Message(_) => (false, None),
        };
        let json = line.text().as_bytes();
        answer_error = failed || answer == Some(true);
        answered |= answer.is_some();
        if !head_sent {
            if failed || (answer.is_some() && r.accepts_json) {
                // A failed request is answered in-band (a JSON-RPC error, HTTP 200), as the
                // process itself would have: the agent's SDK reads it as the call's error.
                let token = if failed { None } else { r.token };
                return respond(out, 200, "application/json", token, json, failed)
                    .map(|()| answer_error);
            }
            send_stream_head(out, r.token)?;
            head_sent = true;
        }
        let event = [b"event: message\ndata: ", json, b"\n\n"].concat();
        let mut chunk = format!("{:x}\r\n", event.len()).into_bytes();
        chunk.extend_from_slice(&event);
        chunk.extend_from_slice(b"\r\n");
        out.write_all(&chunk)?;
        if failed {
            // Unfinished on purpose: the worker sees the stream cut and records the failure.
            return Err(std::io::Error::other("the process failed mid-answer"));
        }
    }
}

fn send_stream_head(out: &mut UnixStream, token: Option<&str>) -> Written {
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
         Transfer-Encoding: chunked\r\n",
    );
    if let Some(t) = token {
        head.push_str(&format!("Mcp-Session-Id: {t}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

/// Whether the worker closed its end (looked at without reading anything).
fn worker_gone(out: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local buffer on a socket this thread owns.
    let n = unsafe {
        libc::recv(
            out.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
        || (n < 0
            && !matches!(
                std::io::Error::last_os_error().kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ))
}

fn refuse(hub: &Hub, out: &mut UnixStream, id: Option<Value>, e: HubError) -> Written {
    let name = &hub.name;
    match e {
        HubError::Full(max) => {
            let why = format!(
                "upstream {name:?} runs its maximum of {max} processes (max_processes); try again \
                 when a session ends"
            );
            crate::warn!("stdio: {why}");
            error(out, 503, id, &why)
        }
        HubError::Spawn(e) => {
            let why = format!("upstream {name:?} could not be started: {e}");
            crate::error!("stdio: {why}");
            error(out, 502, id, &why)
        }
        HubError::NoSession => not_found(out),
        HubError::Unroutable => error(out, 400, id, "a message the stdio server cannot take"),
    }
}

fn not_found(out: &mut UnixStream) -> Written {
    error(
        out,
        404,
        None,
        "session not found: initialize a new session",
    )
}

fn error(out: &mut UnixStream, status: u16, id: Option<Value>, why: &str) -> Written {
    let code = match status {
        400 | 404 | 405 => jsonrpc::INVALID_REQUEST,
        _ => jsonrpc::UPSTREAM_UNAVAILABLE,
    };
    let body = json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": why}});
    let failed = status >= 500;
    respond(
        out,
        status,
        "application/json",
        None,
        body.to_string().as_bytes(),
        failed,
    )
}

fn respond(
    out: &mut UnixStream,
    status: u16,
    content_type: &str,
    token: Option<&str>,
    body: &[u8],
    failed: bool,
) -> Written {
    let reason = crate::http::response::reason(status);
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    if !body.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if let Some(t) = token {
        head.push_str(&format!("Mcp-Session-Id: {t}\r\n"));
    }
    if failed {
        // What failed, for the audit log: the error's message.
        let why = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| "the stdio server failed".into());
        let why: String = why.chars().filter(|c| !c.is_control()).collect();
        head.push_str(&format!("{FAILURE_HEADER}: {why}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut all = head.into_bytes();
    all.extend_from_slice(body);
    out.write_all(&all)
}
