//! Requests scopegate itself makes to an upstream for the aggregate endpoint (fan-out,
//! rewritten calls), on the worker's keep-alive pool, with the body read piece by piece.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::forward::{HeadFailure, UpstreamError, exchange_head};
use crate::http::conn::{Conn, ReadError};
use crate::http::framing::{self, ChunkedDecoder, Framing};
use crate::http::head::{self, Head};
use crate::pipeline::Refusal;
use crate::worker::Worker;

/// One request to an upstream.
pub struct UpRequest<'a> {
    pub method: &'static str,
    pub body: &'a [u8],
    pub session: Option<&'a [u8]>,
    pub protocol_version: Option<&'a [u8]>,
    /// The upstream's credential headers (from the policy).
    pub inject: &'a [(String, String)],
    pub peer: SocketAddr,
}

/// An upstream's answer: the head now, the body on demand.
pub struct UpResponse {
    index: usize,
    conn: Option<Conn>,
    pub head: Head,
    framing: Framing,
    chunked: ChunkedDecoder,
    left: u64,
    done: bool,
    keep: bool,
}

impl UpResponse {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.head.get(name)
    }

    pub fn is_event_stream(&self) -> bool {
        self.head
            .get("content-type")
            .is_some_and(|v| v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream"))
    }

    /// The next piece of the body (de-chunked), None at its end. `deadline` bounds the wait
    /// (None: event streams, which may be quiet for long).
    pub async fn next(&mut self, deadline: Option<Instant>) -> Result<Option<Vec<u8>>, String> {
        loop {
            if self.done {
                return Ok(None);
            }
            let Some(conn) = self.conn.as_mut() else {
                return Ok(None);
            };
            if !conn.buf.is_empty() {
                match self.framing {
                    Framing::Empty => {
                        self.done = true;
                        return Ok(None);
                    }
                    Framing::Length(_) => {
                        let n = (conn.buf.len() as u64).min(self.left) as usize;
                        let piece = conn.buf.split_to(n).to_vec();
                        self.left -= n as u64;
                        if self.left == 0 {
                            self.done = true;
                            self.keep &= conn.buf.is_empty();
                        }
                        return Ok(Some(piece));
                    }
                    Framing::Chunked => {
                        let mut out = BytesMut::new();
                        let used = self
                            .chunked
                            .feed(&conn.buf, Some(&mut out))
                            .map_err(|e| format!("bad chunked body: {e:?}"))?;
                        let _ = conn.buf.split_to(used);
                        if self.chunked.is_done() {
                            self.done = true;
                            self.keep &= conn.buf.is_empty();
                        }
                        if !out.is_empty() {
                            return Ok(Some(out.to_vec()));
                        }
                        if self.done {
                            return Ok(None);
                        }
                    }
                    Framing::UntilClose => return Ok(Some(conn.buf.split().to_vec())),
                }
            } else if matches!(self.framing, Framing::Empty)
                || (matches!(self.framing, Framing::Length(_)) && self.left == 0)
            {
                self.done = true;
                return Ok(None);
            }
            let limit = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match conn.fill_within(limit).await {
                Ok(0) if self.framing == Framing::UntilClose => {
                    self.done = true;
                    self.keep = false;
                    return Ok(None);
                }
                Ok(0) => return Err("closed the connection mid-body".into()),
                Ok(_) => {}
                Err(ReadError::TimedOut) => return Err("timed out mid-body".into()),
                Err(ReadError::Io(e)) => return Err(format!("failed mid-body: {e}")),
            }
        }
    }

    /// The whole body, up to `limit` bytes.
    pub async fn read_all(&mut self, deadline: Instant, limit: usize) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        while let Some(piece) = self.next(Some(deadline)).await? {
            body.extend_from_slice(&piece);
            if body.len() > limit {
                return Err(format!("answered with more than {limit} bytes"));
            }
        }
        Ok(body)
    }

    /// Returns the connection to the pool when the body was read to its end and the upstream
    /// keeps it open.
    pub fn finish(mut self, worker: &Worker) {
        if self.done
            && self.keep
            && let Some(conn) = self.conn.take()
        {
            worker.pool.put(self.index, conn);
        }
    }
}

/// Sends `req` to upstream `index` and reads the response head.
pub async fn send(
    worker: &Worker,
    index: usize,
    req: &UpRequest<'_>,
    deadline: Instant,
) -> Result<UpResponse, Refusal> {
    let upstream = &worker.config.upstreams[index];
    let mut out = Vec::with_capacity(512 + req.body.len());
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(upstream.url.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(upstream.url.host_header.as_bytes());
    out.extend_from_slice(b"\r\n");
    if req.method == "GET" {
        out.extend_from_slice(b"Accept: text/event-stream\r\n");
    } else {
        out.extend_from_slice(b"Accept: application/json, text/event-stream\r\n");
    }
    if req.method == "POST" {
        out.extend_from_slice(b"Content-Type: application/json\r\n");
    }
    if let Some(s) = req.session.filter(|s| !s.is_empty()) {
        out.extend_from_slice(b"Mcp-Session-Id: ");
        out.extend_from_slice(s);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(v) = req.protocol_version {
        out.extend_from_slice(b"MCP-Protocol-Version: ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in req.inject {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("X-Forwarded-For: {}\r\n", req.peer.ip()).as_bytes());
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", req.body.len()).as_bytes());
    out.extend_from_slice(req.body);

    let timeout = worker.config.upstream_timeout;
    let mut head = Head::default();
    let conn = exchange_head(
        worker,
        index,
        &mut out,
        &Bytes::new(),
        true,
        &mut head,
        deadline,
    )
    .await
    .map_err(|(HeadFailure::Connect(e) | HeadFailure::Exchange(e))| {
        e.refusal(&upstream.name, timeout)
    })?;
    let framing = framing::response_framing(&head, req.method.as_bytes())
        .map_err(|e| UpstreamError::BadHead(e.message()).refusal(&upstream.name, timeout))?;
    let keep = head.minor_version == 1
        && !head::connection_has(&head, "close")
        && framing != Framing::UntilClose;
    let left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    Ok(UpResponse {
        index,
        conn: Some(conn),
        head,
        framing,
        chunked: ChunkedDecoder::default(),
        left,
        done: false,
        keep,
    })
}

/// The JSON-RPC response to a request, read from a JSON body or from an event stream (other
/// messages on the stream, such as progress, are skipped: fan-out requests have nobody to
/// relay them to).
pub async fn exchange(
    worker: &Worker,
    index: usize,
    req: &UpRequest<'_>,
    deadline: Instant,
) -> Result<(UpResponse, Vec<u8>), Refusal> {
    let name = &worker.config.upstreams[index].name;
    let bad = |why: String| {
        Refusal::new(
            502,
            crate::mcp::jsonrpc::UPSTREAM_UNAVAILABLE,
            format!("upstream {name:?} {why}"),
        )
    };
    let mut resp = send(worker, index, req, deadline).await?;
    let limit = worker.config.max_body.max(1 << 20) * 16;
    if resp.is_event_stream() {
        let mut sse = super::json::SseSplitter::default();
        loop {
            let Some(piece) = resp.next(Some(deadline)).await.map_err(bad)? else {
                return Err(bad("ended its event stream without a response".into()));
            };
            sse.push(&piece);
            while let Some(event) = sse.next_event() {
                if let (Some(data), _) = super::json::event_parts(&event)
                    && is_response(&data)
                {
                    // The rest of the stream is not read: the connection is not reused.
                    return Ok((resp, data));
                }
            }
        }
    }
    let body = resp.read_all(deadline, limit).await.map_err(bad)?;
    Ok((resp, body))
}

fn is_response(data: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<serde_json::Value>(data),
        Ok(serde_json::Value::Object(m)) if m.contains_key("id") && !m.contains_key("method")
    )
}

/// Runs futures concurrently on this task and returns their outputs in order.
pub async fn join_all<'a, T>(futures: Vec<Pin<Box<dyn Future<Output = T> + 'a>>>) -> Vec<T> {
    let mut futures: Vec<Option<Pin<Box<dyn Future<Output = T> + 'a>>>> =
        futures.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (slot, result) in futures.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *result = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(out.iter_mut().filter_map(Option::take).collect())
        }
    })
    .await
}
