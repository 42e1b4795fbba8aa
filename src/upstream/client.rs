//! A small MCP client for the requests scopegate makes itself (the aggregate endpoint's
//! fan-outs and rewritten calls), on the worker's keep-alive pool, with the body read piece by
//! piece. Heads are written by the one writer ([`super::request`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::exchange::{HeadFailure, Target, UpstreamError, exchange_head};
use super::request::{Outgoing, write_head};
use super::{Pool, Upstream};
use crate::http::body::{BodyError, BodyReader};
use crate::http::conn::Conn;
use crate::http::framing;
use crate::http::head::{self, Head};
use crate::http::sse::{self, SseSplitter};
use crate::reply::Reply;

/// One request to an upstream.
pub struct UpRequest<'a> {
    pub method: &'static str,
    pub body: &'a [u8],
    pub session: Option<&'a [u8]>,
    pub protocol_version: Option<&'a [u8]>,
    pub peer: SocketAddr,
    /// The agent's id (policy mode), for a stdio upstream's bridge.
    pub agent_id: Option<&'a str>,
    /// More headers: the 2026-07-28 routing headers (`Mcp-Method`, `Mcp-Name`,
    /// `Mcp-Param-*`) of the message in `body`.
    pub routing: Vec<(String, Vec<u8>)>,
}

/// The upstreams a client reaches: their definitions, this worker's pool, and the limits.
#[derive(Clone, Copy)]
pub struct Upstreams<'a> {
    pub list: &'a [Upstream],
    pub pool: &'a Pool,
    /// `SCOPEGATE_UPSTREAM_TIMEOUT_MS`, for the messages of refusals.
    pub timeout: Duration,
    /// `SCOPEGATE_MAX_UPSTREAM_MESSAGE`.
    pub max_message: usize,
}

impl<'a> Upstreams<'a> {
    fn target(&self, index: usize) -> Target<'a> {
        Target {
            upstream: &self.list[index],
            pool: self.pool,
        }
    }
}

/// An upstream's answer: the head now, the body on demand.
pub struct UpResponse {
    /// Which of the client's upstreams answered.
    index: usize,
    conn: Conn,
    pub head: Head,
    body: BodyReader,
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
        head::is_event_stream(&self.head)
    }

    /// The next piece of the body (de-chunked), None at its end. `deadline` bounds the wait.
    pub async fn next(&mut self, deadline: Option<Instant>) -> Result<Option<Bytes>, String> {
        self.body
            .next(&mut self.conn, deadline)
            .await
            .map_err(|e| e.message())
    }

    /// [`next`](Self::next), watching `agent` meanwhile ([`BodyError::PeerGone`] when it
    /// leaves).
    pub async fn next_watching(
        &mut self,
        agent: &mut Conn,
        watch: &mut bool,
        deadline: Option<Instant>,
    ) -> Result<Option<Bytes>, BodyError> {
        self.body
            .next_watching(&mut self.conn, agent, watch, deadline.into())
            .await
    }

    /// The whole body, refused past `limit` bytes.
    pub async fn read_all(&mut self, deadline: Instant, limit: usize) -> Result<Vec<u8>, String> {
        self.body
            .read_all(&mut self.conn, deadline, limit)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| e.message())
    }

    /// Returns the connection to the pool when the body was read to its end and the upstream
    /// keeps it open.
    pub fn finish(self, ups: Upstreams<'_>) {
        if self.keep && self.body.left_clean(&self.conn) {
            ups.pool.put(ups.list[self.index].pool_id(), self.conn);
        }
    }
}

/// Sends `req` to upstream `index` and reads the response head.
pub async fn send(
    ups: Upstreams<'_>,
    index: usize,
    req: &UpRequest<'_>,
    deadline: Instant,
) -> Result<UpResponse, Reply> {
    let upstream = &ups.list[index];
    let accept: &[u8] = if req.method == "GET" {
        b"text/event-stream"
    } else {
        b"application/json, text/event-stream"
    };
    let mut set: Vec<(&str, &[u8])> = Vec::with_capacity(3 + req.routing.len());
    set.push(("Accept", accept));
    if req.method == "POST" {
        set.push(("Content-Type", b"application/json"));
    }
    if let Some(v) = req.protocol_version {
        set.push(("MCP-Protocol-Version", v));
    }
    set.extend(req.routing.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    let mut out = Vec::with_capacity(512 + req.body.len());
    write_head(
        &mut out,
        upstream,
        &Outgoing {
            method: req.method.as_bytes(),
            agent: None,
            set: &set,
            session: req.session,
            replace_session: false,
            plain_answer: true,
            inject: true,
            peer: req.peer,
            content_length: Some(req.body.len()),
            agent_id: req.agent_id,
            traceparent: None,
        },
    );
    out.extend_from_slice(req.body);

    let mut head = Head::default();
    let conn = exchange_head(
        ups.target(index),
        &mut out,
        &Bytes::new(),
        true,
        &mut head,
        deadline,
    )
    .await
    .map_err(|(HeadFailure::Connect(e) | HeadFailure::Exchange(e))| {
        e.refusal(&upstream.name, ups.timeout)
    })?;
    let framing = framing::response_framing(&head, req.method.as_bytes())
        .map_err(|e| UpstreamError::BadHead(e.message()).refusal(&upstream.name, ups.timeout))?;
    let keep = head.minor_version == 1 && !head::connection_has(&head, "close");
    Ok(UpResponse {
        index,
        conn,
        head,
        body: BodyReader::new(framing),
        keep,
    })
}

/// The JSON-RPC response to a request, read from a JSON body or from an event stream (other
/// messages on the stream, such as progress, are skipped: fan-out requests have nobody to
/// relay them to).
pub async fn exchange(
    ups: Upstreams<'_>,
    index: usize,
    req: &UpRequest<'_>,
    deadline: Instant,
) -> Result<(UpResponse, Vec<u8>), Reply> {
    let name = &ups.list[index].name;
    let bad = |why: String| {
        Reply::error(
            502,
            crate::mcp::jsonrpc::UPSTREAM_UNAVAILABLE,
            format!("upstream {name:?} {why}"),
        )
    };
    let mut resp = send(ups, index, req, deadline).await?;
    let limit = ups.max_message;
    if resp.is_event_stream() {
        let mut sse = SseSplitter::new(limit);
        loop {
            while let Some(event) = sse.next_event().map_err(|_| {
                bad(format!(
                    "sent an event over {limit} bytes (SCOPEGATE_MAX_UPSTREAM_MESSAGE)"
                ))
            })? {
                if let Some(data) = sse::event_parts(event).data
                    && is_response(&data)
                {
                    // The rest of the stream is not read: the connection is not reused.
                    return Ok((resp, data));
                }
            }
            let Some(piece) = resp.next(Some(deadline)).await.map_err(bad)? else {
                return Err(bad("ended its event stream without a response".into()));
            };
            sse.push(&piece);
        }
    }
    let body = resp.read_all(deadline, limit).await.map_err(bad)?;
    Ok((resp, body))
}

/// Walks every page of a list (`method`, whose result holds its items in `field`), giving
/// each item to `each`. Each page is `base` with its own body (and, for a 2026-07-28
/// upstream, its `Mcp-Method`); `meta` (raw JSON) goes in each page's `params._meta`. At
/// most 100 pages.
#[allow(clippy::too_many_arguments)]
pub async fn walk_list(
    ups: Upstreams<'_>,
    index: usize,
    base: &UpRequest<'_>,
    method: &str,
    field: &str,
    meta: Option<&[u8]>,
    deadline: Instant,
    each: &mut dyn FnMut(&mut serde_json::Value),
) -> Result<(), Reply> {
    use serde_json::Value;
    let name = &ups.list[index].name;
    let bad = |why: &str| {
        Reply::error(
            502,
            crate::mcp::jsonrpc::UPSTREAM_UNAVAILABLE,
            format!("upstream {name:?} {why}"),
        )
    };
    let mut cursor: Option<Value> = None;
    for _ in 0..100 {
        let mut params = serde_json::Map::new();
        if let Some(c) = cursor.take() {
            params.insert("cursor".into(), c);
        }
        if let Some(m) = meta.and_then(|m| serde_json::from_slice::<Value>(m).ok()) {
            params.insert("_meta".into(), m);
        }
        let body = serde_json::json!({
            "jsonrpc": "2.0", "id": "scopegate-list", "method": method, "params": params,
        });
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let mut routing = base.routing.clone();
        if base
            .protocol_version
            .is_some_and(crate::mcp::modern::is_modern)
        {
            routing.push(("Mcp-Method".to_owned(), method.as_bytes().to_vec()));
        }
        let page = UpRequest {
            method: "POST",
            body: &body,
            session: base.session,
            protocol_version: base.protocol_version,
            peer: base.peer,
            agent_id: base.agent_id,
            routing,
        };
        let (resp, answer) = exchange(ups, index, &page, deadline).await?;
        resp.finish(ups);
        let mut value: Value = serde_json::from_slice(&answer)
            .map_err(|_| bad(&format!("answered {method} with something not JSON")))?;
        let Some(result) = value.get_mut("result") else {
            return Err(bad(&format!("answered {method} with an error")));
        };
        if let Some(Value::Array(items)) = result.get_mut(field) {
            items.iter_mut().for_each(&mut *each);
        }
        cursor = result.get("nextCursor").filter(|c| !c.is_null()).cloned();
        if cursor.is_none() {
            return Ok(());
        }
    }
    Err(bad(&format!("sent over 100 pages of {method}")))
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
