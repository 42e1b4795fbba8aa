//! The aggregate endpoint: `/mcp` with several upstreams behind one MCP server.
//!
//! - `initialize` goes to every upstream the agent may use, in parallel; the answer is
//!   scopegate's own `serverInfo`, the merged capabilities and the lowest protocol version the
//!   upstreams agreed to. One sealed `sg2.` session token carries every upstream's session id (no
//!   table); an upstream that failed at initialize is joined lazily, per worker.
//! - Tools and prompts are named `<upstream><sep><name>`; resource URIs become
//!   `scopegate://<upstream>/<uri>`. Lists are merged, filtered by policy, and paged with a
//!   cursor that carries each upstream's own cursor. A call goes to its upstream with the name
//!   spliced back: the rest of the body is byte-identical.
//! - Server-to-client traffic is relayed event by event. Server requests get the id
//!   `sg:<upstream>:<original id as JSON>` so two upstreams can never collide, and the agent's
//!   answer is routed back to the upstream that asked with the original id spliced in.
//! - An upstream that fails loses its tools from lists (logged, counted) and calls to it get a
//!   JSON-RPC error, while the others keep working; `SCOPEGATE_AGGREGATE_FAIL_CLOSED=1` fails
//!   the whole fan-out instead.

pub mod json;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::task::Poll;
use std::time::Instant;

use serde_json::{Map, Value, json};

use crate::audit::entry::Decision as AuditDecision;
use crate::core::Core;
use crate::http::body::BodyError;
use crate::http::conn::Conn;
use crate::http::head::Head;
use crate::http::response;
use crate::http::sse::{self, SseSplitter};
use crate::mcp::envelope::{Envelope, Kind, Message};
use crate::mcp::jsonrpc;
use crate::mcp::jsonrpc::Id;
use crate::mcp::lists::{self, ListKind};
use crate::mcp::session::MultiSession;
use crate::policy::Policy;
use crate::policy::decide::{self, Access, Decision, Target};
use crate::reply::Reply;
use crate::upstream::Upstream;
use crate::upstream::client::{UpRequest, UpResponse, Upstreams, exchange, join_all, send};
use crate::{info, warn};

/// An upstream's answer to initialize: its session id (empty: none) and its result.
type Joined = (Vec<u8>, Value);

/// A boxed future borrowing the request.
type Fut<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

/// The longest tool or prompt name the specification allows.
pub const MAX_NAME: usize = 128;
/// The resource URI scheme of the aggregate endpoint.
const URI_SCHEME: &str = "scopegate://";
/// The prefix of server request ids as the agent sees them.
const ID_PREFIX: &str = "sg:";

/// What the pipeline records about an aggregate request.
#[derive(Debug, Default)]
pub struct Outcome {
    pub status: u16,
    pub decision: AuditDecision,
    pub reason: Option<String>,
    /// The upstream a routed message went to.
    pub upstream: Option<usize>,
    pub upstream_us: Option<u64>,
    pub keep_alive: bool,
}

/// One aggregate request.
pub struct Request<'a, 'b> {
    pub core: &'a Core,
    pub head: &'a Head,
    pub body: &'a [u8],
    pub env: Option<&'a Envelope<'b>>,
    pub policy: Option<&'a Policy>,
    /// The upstreams behind the endpoint (the policy's in policy mode).
    pub upstreams: &'a [Upstream],
    pub agent: Option<usize>,
    pub peer: SocketAddr,
    pub close: bool,
}

impl Request<'_, '_> {
    fn upstream_name(&self, i: usize) -> &str {
        &self.upstreams[i].name
    }

    /// The client's view of the upstreams.
    fn ups(&self) -> Upstreams<'_> {
        let c = &self.core.config;
        Upstreams {
            list: self.upstreams,
            pool: &self.core.pool,
            timeout: c.upstream_timeout,
            max_message: c.max_upstream_message,
        }
    }

    fn sep(&self) -> &str {
        &self.core.config.name_separator
    }

    /// Whether this agent may use upstream `i` (every one in insecure-open mode).
    fn may_use(&self, i: usize) -> bool {
        match (self.policy, self.agent) {
            (Some(p), Some(a)) => p.may_use_upstream(a, i),
            _ => true,
        }
    }

    /// The upstreams this agent may use.
    fn reachable(&self) -> Vec<usize> {
        (0..self.upstreams.len())
            .filter(|&i| self.may_use(i))
            .collect()
    }

    fn agent_id(&self) -> &str {
        match (self.policy, self.agent) {
            (Some(p), Some(a)) => &p.agents[a].id,
            _ => "",
        }
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| u.name == name)
    }

    /// For a call routed to one upstream.
    fn deadline(&self) -> Instant {
        Instant::now() + self.core.config.upstream_timeout
    }

    /// For each upstream of a fan-out (initialize, lists, notifications, joins): a slow one is
    /// left out after `SCOPEGATE_AGGREGATE_TIMEOUT_MS` while the others answer.
    fn fanout_deadline(&self) -> Instant {
        let c = &self.core.config;
        Instant::now() + c.aggregate_timeout.min(c.upstream_timeout)
    }

    fn version(&self) -> Option<&[u8]> {
        self.head.get("mcp-protocol-version")
    }

    fn up_request<'s>(
        &'s self,
        method: &'static str,
        body: &'s [u8],
        session: Option<&'s [u8]>,
    ) -> UpRequest<'s> {
        UpRequest {
            method,
            body,
            session,
            protocol_version: self.version(),
            peer: self.peer,
        }
    }

    /// A message from upstream `i` for the agent, with any list result in it filtered to what
    /// the agent may see (the same decision as everywhere: policy::decide::visible); `None`
    /// when it may hold a list and cannot be read (then it is not relayed).
    fn filter_lists(&self, i: usize, data: Vec<u8>) -> Option<Vec<u8>> {
        let (Some(p), Some(a)) = (self.policy, self.agent) else {
            return Some(data);
        };
        if !lists::may_hold_list(&data) {
            return Some(data);
        }
        match lists::filter_lists(&data, &|kind, item| decide::visible(p, a, i, kind, item)) {
            Ok(None) => Some(data),
            Ok(Some(filtered)) => Some(filtered),
            Err(_) => None,
        }
    }

    fn note_failure(&self, i: usize, why: &str) {
        self.core.stats.metrics.aggregate_failure(i);
        warn!(
            "aggregate: upstream {:?} left out: {why}",
            self.upstream_name(i)
        );
    }
}

/// A JSON-RPC error with HTTP 200 for an upstream's failure: one upstream's failure must not
/// look like the whole endpoint's (an HTTP error would end some clients' sessions).
fn upstream_failed(id: Option<Id<'_>>, r: Reply, upstream: usize) -> Reply {
    let mut r = r.for_id(id).upstream_error(Some(upstream));
    r.status = 200;
    r
}

/// A refusal by policy, for the upstream it concerned.
fn denied(id: Option<Id<'_>>, rule: &str, reason: &str, upstream: Option<usize>) -> Reply {
    let mut r = Reply::policy_denied(rule, reason).for_id(id);
    r.upstream = upstream;
    r
}

/// Handles one request on the aggregate endpoint, writing the answer to `client`. `Err`: the
/// connection must be closed (a response was cut off).
pub async fn handle(req: &Request<'_, '_>, client: &mut Conn) -> Result<Outcome, Outcome> {
    let method = req.head.method();
    if method == b"POST" {
        return post(req, client).await;
    }
    // GET and DELETE need a session.
    let session = match open(req) {
        Ok(s) => s,
        Err(reply) => return write(req, client, reply).await,
    };
    match method {
        b"GET" => get_stream(req, client, &session).await,
        b"DELETE" => {
            let futures: Vec<Fut<'_, ()>> = joined(req, &session)
                .into_iter()
                .map(|(i, s)| {
                    Box::pin(async move {
                        let r = req.up_request("DELETE", b"", Some(&s));
                        if let Ok(mut resp) = send(req.ups(), i, &r, req.fanout_deadline()).await {
                            let _ = resp.read_all(req.fanout_deadline(), 1 << 20).await;
                            resp.finish(&req.core.pool);
                        }
                    }) as Fut<'_, ()>
                })
                .collect();
            join_all(futures).await;
            write(req, client, Reply::json(200, Vec::new())).await
        }
        _ => {
            let mut r = Reply::error(405, jsonrpc::INVALID_REQUEST, "method not allowed");
            r.headers = "Allow: GET, POST, DELETE\r\n".into();
            write(req, client, r).await
        }
    }
}

/// The agent's aggregate session, from its `Mcp-Session-Id`.
fn open(req: &Request<'_, '_>) -> Result<MultiSession, Reply> {
    let not_found = || {
        Reply::error(
            404,
            jsonrpc::SESSION_NOT_FOUND,
            "session not found: initialize a new session",
        )
        .denied()
    };
    let Some(token) = req.head.get("mcp-session-id") else {
        return Err(Reply::error(
            400,
            jsonrpc::INVALID_REQUEST,
            "Mcp-Session-Id is required after initialize",
        ));
    };
    let session = req.core.sessions.open_multi(token).ok_or_else(not_found)?;
    if session.agent != req.agent_id() {
        return Err(not_found());
    }
    Ok(session)
}

fn token_key(req: &Request<'_, '_>) -> u64 {
    let token = req.head.get("mcp-session-id").unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut k = [0u8; 8];
    k.copy_from_slice(&d.as_ref()[..8]);
    u64::from_le_bytes(k)
}

/// The upstreams of this session that the agent may still use, with their session ids:
/// those joined at initialize and those this worker joined later.
fn joined(req: &Request<'_, '_>, session: &MultiSession) -> Vec<(usize, Vec<u8>)> {
    let reachable = req.reachable();
    let key = token_key(req);
    let lazy = &req.core.lazy_joins;
    reachable
        .into_iter()
        .filter_map(|i| {
            let name = req.upstream_name(i);
            session
                .upstreams
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| (i, s.clone()))
                .or_else(|| lazy.get(key, i).map(|s| (i, s)))
        })
        .collect()
}

/// The session id to use for upstream `i`, joining it now when it was not joined yet.
async fn session_for(
    req: &Request<'_, '_>,
    session: &MultiSession,
    i: usize,
) -> Result<Vec<u8>, Reply> {
    let name = req.upstream_name(i);
    if let Some((_, s)) = session.upstreams.iter().find(|(n, _)| n == name) {
        return Ok(s.clone());
    }
    let key = token_key(req);
    if let Some(s) = req.core.lazy_joins.get(key, i) {
        return Ok(s);
    }
    let version = req
        .version()
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("2025-06-18");
    let init = json!({
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "scopegate", "version": env!("CARGO_PKG_VERSION")}
        }
    })
    .to_string();
    let r = req.up_request("POST", init.as_bytes(), None);
    let (sid, _) = initialize_upstream(req, i, &r).await?;
    let done = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let r = req.up_request("POST", done, Some(&sid));
    if let Ok(mut resp) = send(req.ups(), i, &r, req.fanout_deadline()).await {
        let _ = resp.read_all(req.fanout_deadline(), 1 << 20).await;
        resp.finish(&req.core.pool);
    }
    info!("aggregate: joined upstream {name:?} for an existing session");
    req.core.lazy_joins.insert(key, i, sid.clone());
    Ok(sid)
}

/// Sends an initialize request to upstream `i`: its session id (empty: none) and its result.
async fn initialize_upstream(
    req: &Request<'_, '_>,
    i: usize,
    r: &UpRequest<'_>,
) -> Result<Joined, Reply> {
    let (resp, body) = exchange(req.ups(), i, r, req.fanout_deadline()).await?;
    let status = resp.status();
    let sid = resp
        .header("mcp-session-id")
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    resp.finish(&req.core.pool);
    Ok((sid, rpc_result(req, i, "initialize", status, &body)?))
}

/// The `result` of upstream `i`'s answer to `what`, or a refusal saying what came instead.
fn rpc_result(
    req: &Request<'_, '_>,
    i: usize,
    what: &str,
    status: u16,
    body: &[u8],
) -> Result<Value, Reply> {
    let result = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut m)) if status == 200 => m.remove("result"),
        _ => None,
    };
    result.ok_or_else(|| {
        Reply::error(
            502,
            jsonrpc::UPSTREAM_UNAVAILABLE,
            format!(
                "upstream {:?} failed {what} (HTTP {status}): {}",
                req.upstream_name(i),
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        )
    })
}

async fn post(req: &Request<'_, '_>, client: &mut Conn) -> Result<Outcome, Outcome> {
    let Some(env) = req.env else {
        let r = Reply::error(400, jsonrpc::INVALID_REQUEST, "no JSON-RPC message");
        return write(req, client, r).await;
    };
    let Some(m) = env.single() else {
        let r = Reply::error(
            400,
            jsonrpc::INVALID_REQUEST,
            "JSON-RPC batches are not supported on the aggregate endpoint; send one message per POST",
        );
        return write(req, client, r).await;
    };
    // The one method table (policy::decide) says what each message needs.
    let access = decide::access(m.method, m.kind);
    if access == Access::Unknown {
        let method = m.method.unwrap_or_default();
        let reason = format!(
            "method {method:?} is not part of any MCP revision scopegate knows; it is refused rather than forwarded unchecked"
        );
        let mut reply = denied(m.id, "unknown method", &reason, None);
        if m.kind == Kind::Notification {
            // A notification has no answer to carry the error: the HTTP status says it.
            reply.status = 403;
        }
        return write(req, client, reply).await;
    }
    // A request scopegate answers from several upstreams (or itself) counts against the agent's
    // own bucket, as on a single upstream; routed calls are limited with their upstream below.
    let routed_access = matches!(
        access,
        Access::Tool | Access::Prompt | Access::Resource | Access::Completion
    );
    if m.kind == Kind::Request
        && !routed_access
        && let Some(reply) = agent_limit(req, m).await
    {
        return write(req, client, reply).await;
    }
    if m.method == Some("initialize") {
        let reply = initialize(req, m).await;
        return write(req, client, reply).await;
    }
    let session = match open(req) {
        Ok(s) => s,
        Err(reply) => return write(req, client, reply).await,
    };
    match m.kind {
        Kind::Notification => {
            let reply = notify(req, &session, m).await;
            write(req, client, reply).await
        }
        Kind::Response => {
            let reply = answer_server_request(req, &session).await;
            write(req, client, reply).await
        }
        Kind::Request => {
            let method = m.method.unwrap_or_default();
            match access {
                Access::List(kind) => {
                    let reply = list(req, &session, m, kind).await;
                    write(req, client, reply).await
                }
                Access::Tool | Access::Prompt | Access::Resource | Access::Completion => {
                    routed(req, client, &session, m, access).await
                }
                _ if method == "ping" => {
                    let mut body = b"{\"jsonrpc\":\"2.0\",\"id\":".to_vec();
                    if let Some(id) = m.id {
                        id.write_json(&mut body);
                    }
                    body.extend_from_slice(b",\"result\":{}}");
                    write(req, client, Reply::json(200, body)).await
                }
                _ if method == "logging/setLevel" => {
                    broadcast(req, &session, req.body).await;
                    let mut body = b"{\"jsonrpc\":\"2.0\",\"id\":".to_vec();
                    if let Some(id) = m.id {
                        id.write_json(&mut body);
                    }
                    body.extend_from_slice(b",\"result\":{}}");
                    write(req, client, Reply::json(200, body)).await
                }
                _ => {
                    let body = jsonrpc::error_body(
                        m.id,
                        jsonrpc::METHOD_NOT_FOUND,
                        &format!("method {method:?} is not available on the aggregate endpoint"),
                    );
                    write(req, client, Reply::json(200, body)).await
                }
            }
        }
    }
}

/// The agent's own bucket, for a request that is not routed to one upstream (in policy mode).
async fn agent_limit(req: &Request<'_, '_>, m: &Message<'_>) -> Option<Reply> {
    let (Some(p), Some(a)) = (req.policy, req.agent) else {
        return None;
    };
    // Without a tool name only the agent's bucket applies; the upstream index is not used.
    let uses = p.limits_for(a, 0, None);
    let limited = req.core.limiter.admit(uses).await.err()?;
    Some(rate_limited(req, m, limited))
}

fn rate_limited(
    req: &Request<'_, '_>,
    m: &Message<'_>,
    limited: crate::ratelimit::Limited,
) -> Reply {
    let status = req.core.config.rate_limit_status;
    Reply::rate_limited(status, &limited.label, limited.retry_after_ns).for_id(m.id)
}

/// A notification from the agent. One that names a server request (a cancellation of it, or
/// progress on a token a server chose) goes to that upstream with the original value spliced
/// back; the others go to every upstream.
async fn notify(req: &Request<'_, '_>, session: &MultiSession, m: &Message<'_>) -> Reply {
    let path: &[&str] = match m.method {
        Some("notifications/cancelled") => &["params", "requestId"],
        Some("notifications/progress") => &["params", "progressToken"],
        _ => &[],
    };
    let mapped = (!path.is_empty())
        .then(|| json::locate(req.body, path))
        .flatten()
        .and_then(|range| {
            let value = serde_json::from_slice::<String>(&req.body[range.0..range.1]).ok()?;
            let (up, original) = unmap_id(&value)?;
            serde_json::from_str::<Value>(original).ok()?;
            let i = req.index_of(up).filter(|&i| req.may_use(i))?;
            Some((i, json::splice(req.body, range, original.as_bytes())))
        });
    let Some((i, body)) = mapped else {
        broadcast(req, session, req.body).await;
        return Reply::json(202, Vec::new());
    };
    let mut reply = Reply::json(202, Vec::new());
    reply.upstream = Some(i);
    let sid = match session_for(req, session, i).await {
        Ok(s) => s,
        Err(e) => {
            req.note_failure(i, e.message());
            return reply;
        }
    };
    let r = req.up_request("POST", &body, Some(&sid));
    if let Err(e) = exchange_or_accepted(req, i, &r).await {
        req.note_failure(i, e.message());
    }
    reply
}

/// Sends a notification (or logging/setLevel) to every joined upstream and waits for them.
async fn broadcast(req: &Request<'_, '_>, session: &MultiSession, body: &[u8]) {
    let futures: Vec<Fut<'_, ()>> = joined(req, session)
        .into_iter()
        .map(|(i, s)| {
            Box::pin(async move {
                let r = req.up_request("POST", body, Some(&s));
                match exchange_or_accepted(req, i, &r).await {
                    Ok(()) => {}
                    Err(e) => req.note_failure(i, e.message()),
                }
            }) as Fut<'_, ()>
        })
        .collect();
    join_all(futures).await;
}

/// Sends a message whose answer is 202 (or a JSON-RPC response that is discarded).
async fn exchange_or_accepted(
    req: &Request<'_, '_>,
    i: usize,
    r: &UpRequest<'_>,
) -> Result<(), Reply> {
    let mut resp = send(req.ups(), i, r, req.fanout_deadline()).await?;
    if resp.is_event_stream() {
        // A response on a stream: not awaited, and the connection is not reused.
        return Ok(());
    }
    let _ = resp.read_all(req.fanout_deadline(), 1 << 20).await;
    resp.finish(&req.core.pool);
    Ok(())
}

async fn initialize(req: &Request<'_, '_>, m: &Message<'_>) -> Reply {
    let reachable = req.reachable();
    if reachable.is_empty() {
        let r = Reply::error(
            404,
            jsonrpc::GATEWAY_REFUSED,
            "no upstream is available to this agent",
        )
        .denied();
        return r.for_id(m.id);
    }
    let futures: Vec<Fut<'_, Result<Joined, Reply>>> = reachable
        .iter()
        .map(|&i| {
            Box::pin(async move {
                let r = UpRequest {
                    method: "POST",
                    body: req.body,
                    session: None,
                    protocol_version: None,
                    peer: req.peer,
                };
                initialize_upstream(req, i, &r).await
            }) as Fut<'_, _>
        })
        .collect();
    let results = join_all(futures).await;
    let mut sessions = Vec::new();
    let mut answers = Vec::new();
    let mut failures = Vec::new();
    for (&i, result) in reachable.iter().zip(results) {
        match result {
            Ok((sid, answer)) => {
                sessions.push((req.upstream_name(i).to_owned(), sid));
                answers.push((i, answer));
            }
            Err(e) => {
                req.note_failure(i, e.message());
                failures.push(e.message().to_owned());
            }
        }
    }
    if answers.is_empty() || (req.core.config.aggregate_fail_closed && !failures.is_empty()) {
        let r = Reply::error(
            502,
            jsonrpc::UPSTREAM_UNAVAILABLE,
            format!("initialize failed: {}", failures.join("; ")),
        );
        let mut reply = upstream_failed(m.id, r, reachable[0]);
        reply.upstream = None;
        return reply;
    }
    let Some(token) = req.core.sessions.seal_multi(req.agent_id(), &sessions) else {
        let r = Reply::error(
            500,
            jsonrpc::GATEWAY_REFUSED,
            "the upstream session ids do not fit a session token",
        );
        return r.for_id(m.id);
    };
    let named: Vec<(&str, &Value)> = answers
        .iter()
        .map(|(i, a)| (req.upstream_name(*i), a))
        .collect();
    let result = merge_initialize(&named);
    let mut body = b"{\"jsonrpc\":\"2.0\",\"id\":".to_vec();
    if let Some(id) = m.id {
        id.write_json(&mut body);
    } else {
        body.extend_from_slice(b"null");
    }
    body.extend_from_slice(b",\"result\":");
    body.extend_from_slice(result.to_string().as_bytes());
    body.push(b'}');
    let mut reply = Reply::json(200, body);
    reply.headers = format!("Mcp-Session-Id: {token}\r\n");
    reply
}

/// scopegate's initialize result: its own serverInfo, the union of the upstreams' capabilities
/// and the lowest protocol version any of them answered (revisions are dates, so they order as
/// strings).
fn merge_initialize(answers: &[(&str, &Value)]) -> Value {
    let mut version: Option<String> = None;
    let mut caps = Map::new();
    let mut instructions = Vec::new();
    for (name, a) in answers {
        if let Some(v) = a.get("protocolVersion").and_then(Value::as_str)
            && version.as_deref().is_none_or(|cur| v < cur)
        {
            version = Some(v.to_owned());
        }
        if let Some(Value::Object(c)) = a.get("capabilities") {
            for (k, v) in c {
                merge_capability(caps.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        if let Some(text) = a.get("instructions").and_then(Value::as_str) {
            instructions.push(format!("[{name}] {text}"));
        }
    }
    let mut result = json!({
        "protocolVersion": version.unwrap_or_else(|| "2025-06-18".into()),
        "capabilities": caps,
        "serverInfo": {"name": "scopegate", "version": env!("CARGO_PKG_VERSION")},
    });
    if !instructions.is_empty() {
        result["instructions"] = Value::String(instructions.join("\n"));
    }
    result
}

fn merge_capability(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge_capability(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (Value::Bool(a), Value::Bool(b)) => *a |= *b,
        (slot @ Value::Null, v) => *slot = v.clone(),
        _ => {}
    }
}

/// The name an item is exposed under: `<upstream><sep><name>`, or, past the specification's
/// 128 characters, cut to fit and ended by `~` and 8 hex digits of the name's SHA-256 (the
/// call then finds the original by listing that upstream's items again).
pub fn exposed_name(upstream: &str, sep: &str, name: &str) -> String {
    let full = format!("{upstream}{sep}{name}");
    if full.len() <= MAX_NAME {
        return full;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut suffix = String::from("~");
    for b in &digest.as_ref()[..4] {
        suffix.push_str(&format!("{b:02x}"));
    }
    let mut keep = MAX_NAME - suffix.len();
    while !full.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &full[..keep])
}

fn scoped_uri(upstream: &str, uri: &str) -> String {
    format!("{URI_SCHEME}{upstream}/{uri}")
}

/// `scopegate://<upstream>/<uri>` -> (upstream, uri).
fn unscope_uri(uri: &str) -> Option<(&str, &str)> {
    uri.strip_prefix(URI_SCHEME)?.split_once('/')
}

/// Our cursor: base64url of a JSON object `{upstream: its cursor}` for the upstreams with more.
fn encode_cursor(cursors: &Map<String, Value>) -> String {
    crate::token::base64url(Value::Object(cursors.clone()).to_string().as_bytes())
}

fn decode_cursor(cursor: &str) -> Option<Map<String, Value>> {
    let raw = crate::token::base64url_decode(cursor.as_bytes())?;
    match serde_json::from_slice(&raw).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

async fn list(
    req: &Request<'_, '_>,
    session: &MultiSession,
    m: &Message<'_>,
    kind: ListKind,
) -> Reply {
    let (method, key, item_key) = (kind.method(), kind.field(), kind.key());
    let params: Value = serde_json::from_slice::<Value>(req.body)
        .ok()
        .and_then(|v| v.get("params").cloned())
        .unwrap_or(Value::Null);
    // Which upstreams to ask, each with its own cursor.
    let mut targets: Vec<(usize, Option<Value>)> = Vec::new();
    match params.get("cursor").and_then(Value::as_str) {
        Some(c) => {
            let Some(cursors) = decode_cursor(c) else {
                let body = jsonrpc::error_body(m.id, jsonrpc::INVALID_PARAMS, "invalid cursor");
                return Reply::json(200, body);
            };
            for (name, cur) in cursors {
                match req.index_of(&name) {
                    Some(i) if req.may_use(i) => targets.push((i, Some(cur))),
                    _ => {}
                }
            }
        }
        None => targets.extend(req.reachable().into_iter().map(|i| (i, None))),
    }
    let id_json = match m.id {
        Some(id) => {
            let mut v = Vec::new();
            id.write_json(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        }
        None => "null".into(),
    };
    let futures: Vec<Fut<'_, Result<Value, Reply>>> = targets
        .iter()
        .map(|(i, cursor)| {
            let i = *i;
            let body = match cursor {
                Some(c) => format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{id_json},\"method\":\"{method}\",\"params\":{{\"cursor\":{c}}}}}"
                ),
                None => format!("{{\"jsonrpc\":\"2.0\",\"id\":{id_json},\"method\":\"{method}\"}}"),
            };
            Box::pin(async move {
                let sid = session_for(req, session, i).await?;
                let r = req.up_request("POST", body.as_bytes(), Some(&sid));
                let (resp, answer) = exchange(req.ups(), i, &r, req.fanout_deadline()).await?;
                let status = resp.status();
                resp.finish(&req.core.pool);
                rpc_result(req, i, method, status, &answer)
            }) as Fut<'_, _>
        })
        .collect();
    let results = join_all(futures).await;
    let mut items = Vec::new();
    let mut next = Map::new();
    let mut failures = Vec::new();
    let sep = req.sep();
    for ((i, _), result) in targets.iter().zip(results) {
        let i = *i;
        let up = req.upstream_name(i);
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                req.note_failure(i, e.message());
                failures.push(e.message().to_owned());
                continue;
            }
        };
        if let Some(c) = result.get("nextCursor").filter(|c| !c.is_null()) {
            next.insert(up.to_owned(), c.clone());
        }
        let Some(Value::Array(list)) = result.get(key) else {
            continue;
        };
        for mut item in list.iter().cloned() {
            // The item the policy decides on, kept only when the agent may see it; the
            // same decision as on /mcp/<upstream> (policy::decide::visible).
            let Some(original) = item.get(item_key).and_then(Value::as_str) else {
                continue;
            };
            let visible = match (req.policy, req.agent) {
                (Some(p), Some(a)) => decide::visible(p, a, i, kind, original),
                _ => true,
            };
            if !visible {
                continue;
            }
            let exposed = match kind {
                ListKind::Tools | ListKind::Prompts => exposed_name(up, sep, original),
                ListKind::Resources | ListKind::ResourceTemplates => scoped_uri(up, original),
            };
            item[item_key] = Value::String(exposed);
            items.push(item);
        }
    }
    if req.core.config.aggregate_fail_closed && !failures.is_empty() {
        let r = Reply::error(
            502,
            jsonrpc::UPSTREAM_UNAVAILABLE,
            format!("{method} failed: {}", failures.join("; ")),
        );
        let mut r = r.for_id(m.id);
        r.status = 200;
        return r;
    }
    let mut result = Map::new();
    result.insert(key.to_owned(), Value::Array(items));
    if !next.is_empty() {
        result.insert("nextCursor".into(), Value::String(encode_cursor(&next)));
    }
    let body = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{id_json},\"result\":{}}}",
        Value::Object(result)
    );
    Reply::json(200, body.into_bytes())
}

/// The upstream and original name behind an exposed tool or prompt name.
async fn resolve_name(
    req: &Request<'_, '_>,
    session: &MultiSession,
    exposed: &str,
    kind: ListKind,
) -> Option<(usize, String)> {
    let method = kind.method();
    let sep = req.sep();
    let (up, rest) = exposed.split_once(sep)?;
    let i = req.index_of(up)?;
    if !req.may_use(i) {
        return None;
    }
    let looks_cut = exposed.len() == MAX_NAME
        && exposed
            .rsplit_once('~')
            .is_some_and(|(_, h)| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if !looks_cut {
        return Some((i, rest.to_owned()));
    }
    // A cut name: find the original among the upstream's items.
    let key = kind.field();
    let sid = session_for(req, session, i).await.ok()?;
    let mut cursor: Option<Value> = None;
    for _ in 0..100 {
        let body = match &cursor {
            Some(c) => format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"{method}\",\"params\":{{\"cursor\":{c}}}}}"
            ),
            None => format!("{{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"{method}\"}}"),
        };
        let r = req.up_request("POST", body.as_bytes(), Some(&sid));
        let (resp, answer) = exchange(req.ups(), i, &r, req.fanout_deadline())
            .await
            .ok()?;
        resp.finish(&req.core.pool);
        let value: Value = serde_json::from_slice(&answer).ok()?;
        let result = value.get("result")?;
        if let Some(Value::Array(items)) = result.get(key) {
            for item in items {
                if let Some(n) = item.get("name").and_then(Value::as_str)
                    && exposed_name(up, sep, n) == exposed
                {
                    return Some((i, n.to_owned()));
                }
            }
        }
        cursor = result.get("nextCursor").filter(|c| !c.is_null()).cloned();
        cursor.as_ref()?;
    }
    None
}

/// A message that belongs to one upstream: a call, a prompt, a resource, a completion.
async fn routed(
    req: &Request<'_, '_>,
    client: &mut Conn,
    session: &MultiSession,
    m: &Message<'_>,
    access: Access,
) -> Result<Outcome, Outcome> {
    let unknown = |what: &str, name: &str| {
        denied(
            m.id,
            &format!("unknown {what}"),
            &format!("unknown {what} {name:?}"),
            None,
        )
    };
    let arguments = req.env.and_then(|e| e.arguments(m));
    // What the agent named (in the aggregate's names), read off the envelope by the same
    // table as on one upstream.
    let asked = Target::of(m, arguments, req.env.and_then(|e| e.notifications(m)));
    if let Target::Malformed(why) = asked {
        let body = jsonrpc::error_body(m.id, jsonrpc::INVALID_PARAMS, why);
        return write(req, client, Reply::json(200, body)).await;
    }
    // Where the name (or URI) sits in the body, which upstream has it, and what that upstream
    // calls it.
    let (path, (i, original)): (&[&str], (usize, String)) = match asked {
        Target::Tool { name, .. } => {
            match resolve_name(req, session, name, ListKind::Tools).await {
                Some(found) => (&["params", "name"], found),
                None => return write(req, client, unknown("tool", name)).await,
            }
        }
        Target::Prompt(name) => {
            let path: &[&str] = if access == Access::Completion {
                &["params", "ref", "name"]
            } else {
                &["params", "name"]
            };
            match resolve_name(req, session, name, ListKind::Prompts).await {
                Some(found) => (path, found),
                None => return write(req, client, unknown("prompt", name)).await,
            }
        }
        Target::Resource(uri) | Target::ResourceTemplate(uri) => {
            let path: &[&str] = if access == Access::Completion {
                &["params", "ref", "uri"]
            } else {
                &["params", "uri"]
            };
            match unscope_uri(uri).and_then(|(up, u)| Some((req.index_of(up)?, u))) {
                Some((i, u)) if req.may_use(i) => (path, (i, u.to_owned())),
                _ => return write(req, client, unknown("resource", uri)).await,
            }
        }
        Target::Upstream | Target::Unknown(_) | Target::Malformed(_) | Target::Subscriptions(_) => {
            let body = jsonrpc::error_body(m.id, jsonrpc::INVALID_REQUEST, "not a routed message");
            return write(req, client, Reply::json(400, body)).await;
        }
    };
    // The same target in the upstream's own names: what the upstream will execute.
    let target = match asked {
        Target::Tool { arguments, .. } => Target::Tool {
            name: &original,
            arguments,
        },
        Target::Prompt(_) => Target::Prompt(&original),
        Target::ResourceTemplate(_) => Target::ResourceTemplate(&original),
        _ => Target::Resource(&original),
    };

    if let (Some(p), Some(a)) = (req.policy, req.agent) {
        if let Decision::Deny { rule, reason } = decide::authorize(p, a, i, &target) {
            return write(req, client, denied(m.id, &rule, &reason, Some(i))).await;
        }
        // Rate limits: every bucket the call falls in, with the upstream's own tool name.
        let tool = matches!(target, Target::Tool { .. }).then_some(original.as_str());
        if let Err(limited) = req.core.limiter.admit(p.limits_for(a, i, tool)).await {
            let mut reply = rate_limited(req, m, limited);
            reply.upstream = Some(i);
            return write(req, client, reply).await;
        }
    }
    let method = m.method.unwrap_or_default();
    let exposed = match asked {
        Target::Tool { name, .. } | Target::Prompt(name) => name,
        Target::Resource(uri) | Target::ResourceTemplate(uri) => uri,
        _ => "",
    };

    // The one rewrite on the call path: the name (or URI) spliced back, the rest byte-identical.
    let Some(range) = json::locate(req.body, path).filter(|&(a, b)| {
        serde_json::from_slice::<String>(&req.body[a..b]).is_ok_and(|s| s == exposed)
    }) else {
        let body = jsonrpc::error_body(
            m.id,
            jsonrpc::INVALID_REQUEST,
            "the name could not be rewritten (write it without escapes)",
        );
        return write(req, client, Reply::json(400, body)).await;
    };
    let mut with = Vec::with_capacity(original.len() + 2);
    jsonrpc::write_json_string(&original, &mut with);
    let body = json::splice(req.body, range, &with);

    let sid = match session_for(req, session, i).await {
        Ok(s) => s,
        Err(e) => return write(req, client, upstream_failed(m.id, e, i)).await,
    };
    let r = req.up_request("POST", &body, Some(&sid));
    let sent_at = Instant::now();
    let resp = match send(req.ups(), i, &r, req.deadline()).await {
        Ok(resp) => resp,
        Err(e) => {
            req.note_failure(i, e.message());
            return write(req, client, upstream_failed(m.id, e, i)).await;
        }
    };
    let upstream_us = Some(sent_at.elapsed().as_micros() as u64);
    let rewrite = Rewrite {
        upstream: req.upstream_name(i).to_owned(),
        read_result: method == "resources/read",
    };
    relay(req, client, resp, &rewrite, m, i, upstream_us).await
}

/// How messages from an upstream are rewritten for the agent.
struct Rewrite {
    upstream: String,
    /// The answer is a resources/read result: its contents' URIs are scoped.
    read_result: bool,
}

impl Rewrite {
    /// Server requests get collision-free ids; resource URIs get the aggregate scheme. Returns
    /// the bytes unchanged when nothing needed rewriting.
    fn apply(&self, data: &[u8]) -> Vec<u8> {
        let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
            return data.to_vec();
        };
        let changed = match &mut v {
            Value::Array(list) => list.iter_mut().fold(false, |c, m| self.one(m) | c),
            m => self.one(m),
        };
        if changed {
            v.to_string().into_bytes()
        } else {
            data.to_vec()
        }
    }

    fn one(&self, m: &mut Value) -> bool {
        let Value::Object(obj) = m else {
            return false;
        };
        let method = obj.get("method").and_then(Value::as_str).map(str::to_owned);
        let mut changed = false;
        match method.as_deref() {
            Some(method) => {
                if let Some(id) = obj.get_mut("id") {
                    *id = Value::String(map_id(&self.upstream, id));
                    changed = true;
                    // A server request may ask the agent for progress on its own token.
                    if let Some(token) = obj
                        .get_mut("params")
                        .and_then(|p| p.get_mut("_meta"))
                        .and_then(|m| m.get_mut("progressToken"))
                    {
                        *token = Value::String(map_id(&self.upstream, token));
                    }
                }
                let params = obj.get_mut("params");
                match (method, params) {
                    ("notifications/cancelled", Some(Value::Object(p))) => {
                        if let Some(id) = p.get_mut("requestId") {
                            *id = Value::String(map_id(&self.upstream, id));
                            changed = true;
                        }
                    }
                    ("notifications/resources/updated", Some(Value::Object(p))) => {
                        if let Some(Value::String(uri)) = p.get_mut("uri") {
                            *uri = scoped_uri(&self.upstream, uri);
                            changed = true;
                        }
                    }
                    _ => {}
                }
            }
            None if self.read_result => {
                if let Some(Value::Array(contents)) =
                    obj.get_mut("result").and_then(|r| r.get_mut("contents"))
                {
                    for c in contents {
                        if let Some(Value::String(uri)) = c.get_mut("uri") {
                            *uri = scoped_uri(&self.upstream, uri);
                            changed = true;
                        }
                    }
                }
            }
            None => {}
        }
        changed
    }
}

/// `sg:<upstream>:<id as JSON>`: the id a server request gets on the aggregate endpoint.
pub fn map_id(upstream: &str, id: &Value) -> String {
    format!("{ID_PREFIX}{upstream}:{id}")
}

/// The upstream and original id (as JSON text) behind a mapped id.
pub fn unmap_id(id: &str) -> Option<(&str, &str)> {
    id.strip_prefix(ID_PREFIX)?.split_once(':')
}

/// The agent's answer to a server request goes back to the upstream that asked, with the
/// original id.
async fn answer_server_request(req: &Request<'_, '_>, session: &MultiSession) -> Reply {
    let bad = |why: &str| Reply::error(400, jsonrpc::INVALID_REQUEST, why);
    let Some(range) = json::locate(req.body, &["id"]) else {
        return bad("a response needs an id");
    };
    let Ok(id) = serde_json::from_slice::<String>(&req.body[range.0..range.1]) else {
        return bad("this response answers no request scopegate relayed");
    };
    let Some((up, original)) = unmap_id(&id) else {
        return bad("this response answers no request scopegate relayed");
    };
    let Some(i) = req.index_of(up).filter(|&i| req.may_use(i)) else {
        return bad("this response answers no request scopegate relayed");
    };
    if serde_json::from_str::<Value>(original).is_err() {
        return bad("this response answers no request scopegate relayed");
    }
    let body = json::splice(req.body, range, original.as_bytes());
    let sid = match session_for(req, session, i).await {
        Ok(s) => s,
        Err(e) => return upstream_failed(None, e, i),
    };
    let r = req.up_request("POST", &body, Some(&sid));
    match exchange_or_accepted(req, i, &r).await {
        Ok(()) => {
            let mut reply = Reply::json(202, Vec::new());
            reply.upstream = Some(i);
            reply
        }
        Err(e) => {
            req.note_failure(i, e.message());
            let mut reply = e;
            reply.upstream = Some(i);
            reply.decision = AuditDecision::UpstreamError;
            reply
        }
    }
}

/// Relays a routed call's answer: JSON read whole and rewritten, or an event stream event by
/// event.
async fn relay(
    req: &Request<'_, '_>,
    client: &mut Conn,
    mut resp: UpResponse,
    rewrite: &Rewrite,
    m: &Message<'_>,
    i: usize,
    upstream_us: Option<u64>,
) -> Result<Outcome, Outcome> {
    let status = resp.status();
    if !resp.is_event_stream() {
        let limit = req.core.config.max_upstream_message;
        let body = match resp.read_all(req.deadline(), limit).await {
            Ok(b) => b,
            Err(why) => {
                let r = Reply::error(
                    502,
                    jsonrpc::UPSTREAM_UNAVAILABLE,
                    format!("upstream {:?} {why}", rewrite.upstream),
                );
                req.note_failure(i, r.message());
                return write(req, client, upstream_failed(m.id, r, i)).await;
            }
        };
        resp.finish(&req.core.pool);
        let body = if body.is_empty() {
            body
        } else {
            match req.filter_lists(i, rewrite.apply(&body)) {
                Some(b) => b,
                None => {
                    let r = Reply::error(
                        502,
                        jsonrpc::UPSTREAM_UNAVAILABLE,
                        format!(
                            "upstream {:?} answered with something that may list hidden items and is not JSON; not relayed",
                            rewrite.upstream
                        ),
                    );
                    return write(req, client, upstream_failed(m.id, r, i)).await;
                }
            }
        };
        let mut reply = Reply::json(status, body);
        reply.upstream = Some(i);
        if status >= 500 {
            reply.decision = AuditDecision::UpstreamError;
        }
        let mut out = write(req, client, reply).await;
        match &mut out {
            Ok(o) | Err(o) => o.upstream_us = upstream_us,
        }
        return out;
    }
    let mut outcome = Outcome {
        status,
        upstream: Some(i),
        upstream_us,
        keep_alive: !req.close,
        ..Outcome::default()
    };
    let _gauge = crate::metrics::StreamGauge::open(&req.core.stats.metrics.sse_streams);
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n",
        response::reason(status)
    );
    if req.close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    if write_bytes(client, head.into_bytes()).await.is_err() {
        outcome.keep_alive = false;
        return Err(outcome);
    }
    // Every read has a deadline (an event that started must end within the upstream timeout;
    // between events the stream may pause up to SCOPEGATE_STREAM_IDLE_MS), events are bounded
    // by SCOPEGATE_MAX_UPSTREAM_MESSAGE, and the agent is watched while the upstream is quiet.
    let config = &req.core.config;
    let mut sse = SseSplitter::new(config.max_upstream_message);
    let mut watch = true;
    let mut answered = false;
    let mut event_deadline: Option<Instant> = None;
    let failure = loop {
        let mut out = Vec::new();
        let mut too_large = false;
        loop {
            match sse.next_event() {
                Ok(Some(event)) => {
                    event_deadline = None;
                    let parts = sse::event_parts(event);
                    let data = match parts.data.map(|d| req.filter_lists(i, rewrite.apply(&d))) {
                        Some(None) => continue,
                        Some(Some(d)) => Some(d),
                        None => None,
                    };
                    if data.is_none() && parts.other.is_empty() {
                        continue;
                    }
                    if !answered {
                        answered = data.as_deref().is_some_and(is_answer);
                    }
                    // Event ids of several upstreams would collide: not relayed.
                    sse::write_event(&parts.other, None, data.as_deref(), &mut out);
                }
                Ok(None) => break,
                Err(_) => {
                    too_large = true;
                    break;
                }
            }
        }
        if !out.is_empty() && write_chunk(client, &out).await.is_err() {
            outcome.keep_alive = false;
            return Err(outcome);
        }
        if too_large {
            break Some(format!(
                "sent an event over {} bytes (SCOPEGATE_MAX_UPSTREAM_MESSAGE)",
                config.max_upstream_message
            ));
        }
        // An event that has begun must end within the upstream timeout (one deadline for the
        // whole event, however it trickles in); between events the stream may pause.
        if sse.pending() > 0 && event_deadline.is_none() {
            event_deadline = Some(Instant::now() + config.upstream_timeout);
        }
        let wait = if event_deadline.is_some() {
            config.upstream_timeout
        } else {
            config.stream_idle
        };
        let deadline = event_deadline.unwrap_or_else(|| Instant::now() + config.stream_idle);
        match resp.next_watching(client, &mut watch, Some(deadline)).await {
            Ok(Some(piece)) => sse.push(&piece),
            Ok(None) => break None,
            Err(BodyError::PeerGone) => {
                outcome.reason = Some("the agent closed the connection mid-answer".into());
                outcome.keep_alive = false;
                return Err(outcome);
            }
            Err(BodyError::TimedOut) => {
                break Some(format!(
                    "sent nothing for {} ms mid-answer",
                    wait.as_millis()
                ));
            }
            Err(e) => break Some(e.message()),
        }
    };
    let mut tail = Vec::new();
    if let Some(why) = failure {
        // Tell the agent in-band and end the stream properly: its connection stays usable.
        let why = format!("upstream {:?} {why}", rewrite.upstream);
        req.note_failure(i, &why);
        if !answered {
            let error = jsonrpc::error_body(m.id, jsonrpc::UPSTREAM_UNAVAILABLE, &why);
            sse::write_event(&[b"event: message"], None, Some(&error), &mut tail);
        }
        outcome.decision = AuditDecision::UpstreamError;
        outcome.reason = Some(why);
    } else {
        resp.finish(&req.core.pool);
    }
    if !tail.is_empty() && write_chunk(client, &tail).await.is_err() {
        outcome.keep_alive = false;
        return Err(outcome);
    }
    if write_bytes(client, b"0\r\n\r\n".to_vec()).await.is_err() {
        outcome.keep_alive = false;
        return Err(outcome);
    }
    Ok(outcome)
}

/// Whether an event's data is a JSON-RPC response (the answer a routed request waits for).
fn is_answer(data: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<Value>(data),
        Ok(Value::Object(m)) if m.contains_key("id") && !m.contains_key("method")
    )
}

/// GET: one event stream for the agent, merged from every joined upstream's.
async fn get_stream(
    req: &Request<'_, '_>,
    client: &mut Conn,
    session: &MultiSession,
) -> Result<Outcome, Outcome> {
    let targets = joined(req, session);
    let futures: Vec<Fut<'_, Option<(usize, UpResponse)>>> = targets
        .iter()
        .map(|(i, s)| {
            let i = *i;
            Box::pin(async move {
                let r = req.up_request("GET", b"", Some(s));
                match send(req.ups(), i, &r, req.fanout_deadline()).await {
                    Ok(resp) if resp.status() == 200 && resp.is_event_stream() => Some((i, resp)),
                    Ok(_) => None,
                    Err(e) => {
                        req.note_failure(i, e.message());
                        None
                    }
                }
            }) as Fut<'_, _>
        })
        .collect();
    let streams: Vec<(usize, UpResponse)> = join_all(futures).await.into_iter().flatten().collect();
    if streams.is_empty() {
        let mut r = Reply::error(
            405,
            jsonrpc::INVALID_REQUEST,
            "no upstream offers an event stream",
        );
        r.headers = "Allow: POST, DELETE\r\n".into();
        return write(req, client, r).await;
    }
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n",
    );
    if req.close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut outcome = Outcome {
        status: 200,
        keep_alive: false,
        ..Outcome::default()
    };
    if write_bytes(client, head.into_bytes()).await.is_err() {
        return Err(outcome);
    }
    let _gauge = crate::metrics::StreamGauge::open(&req.core.stats.metrics.sse_streams);
    // Readers push rewritten events into one queue; the writer sends them on. All of them run
    // on this task: whenever any is woken, every one is polled again. The queue holds at most
    // SCOPEGATE_MAX_UPSTREAM_MESSAGE bytes: past that the readers wait for the agent.
    let limit = req.core.config.max_upstream_message;
    let queue: Rc<RefCell<MergedQueue>> = Rc::new(RefCell::new(MergedQueue {
        events: VecDeque::new(),
        bytes: 0,
        open: streams.len(),
    }));
    let mut readers: Vec<Option<Fut<'_, ()>>> = streams
        .into_iter()
        .map(|(i, mut resp)| {
            let queue = queue.clone();
            let rewrite = Rewrite {
                upstream: req.upstream_name(i).to_owned(),
                read_result: false,
            };
            Some(Box::pin(async move {
                let mut sse = SseSplitter::new(limit);
                let mut event_started: Option<Instant> = None;
                'read: loop {
                    loop {
                        match sse.next_event() {
                            Ok(Some(event)) => {
                                event_started = None;
                                let parts = sse::event_parts(event);
                                let data = match parts
                                    .data
                                    .map(|d| req.filter_lists(i, rewrite.apply(&d)))
                                {
                                    Some(None) => continue,
                                    Some(Some(d)) => Some(d),
                                    None => None,
                                };
                                if data.is_none() && parts.other.is_empty() {
                                    continue;
                                }
                                let mut out = Vec::new();
                                sse::write_event(&parts.other, None, data.as_deref(), &mut out);
                                let mut q = queue.borrow_mut();
                                q.bytes += out.len();
                                q.events.push_back(out);
                            }
                            Ok(None) => break,
                            Err(_) => {
                                req.note_failure(
                                    i,
                                    &format!(
                                        "sent an event over {limit} bytes on its GET stream (SCOPEGATE_MAX_UPSTREAM_MESSAGE)"
                                    ),
                                );
                                break 'read;
                            }
                        }
                    }
                    // Backpressure: wait while the agent has not taken what is queued.
                    std::future::poll_fn(|_| {
                        if queue.borrow().bytes < limit {
                            Poll::Ready(())
                        } else {
                            Poll::Pending
                        }
                    })
                    .await;
                    // A quiet stream waits as long as the agent stays (the writer watches
                    // it); an event that has begun must end within the upstream timeout.
                    if sse.pending() > 0 && event_started.is_none() {
                        event_started = Some(Instant::now());
                    }
                    let deadline = event_started.map(|t| t + req.core.config.upstream_timeout);
                    match resp.next(deadline).await {
                        Ok(Some(piece)) => sse.push(&piece),
                        Ok(None) => break,
                        Err(why) => {
                            req.note_failure(i, &format!("its GET stream {why}"));
                            break;
                        }
                    }
                }
                queue.borrow_mut().open -= 1;
            }) as Fut<'_, ()>)
        })
        .collect();
    let writer_queue = queue.clone();
    let writer = async move {
        let mut watch = true;
        loop {
            let next = std::future::poll_fn(|_| {
                let mut q = writer_queue.borrow_mut();
                match q.events.pop_front() {
                    Some(e) => {
                        q.bytes -= e.len();
                        Poll::Ready(Some(e))
                    }
                    None if q.open == 0 => Poll::Ready(None),
                    None => Poll::Pending,
                }
            });
            // While nothing is to be written, watch the agent: a closed stream releases every
            // upstream stream at once.
            let next = if watch {
                monoio::select! {
                    e = next => e,
                    _ = client.stream.readable(false) => {
                        match client.peer_closed() {
                            Some(true) => return false,
                            Some(false) => watch = false,
                            None => {}
                        }
                        continue;
                    }
                }
            } else {
                next.await
            };
            let Some(event) = next else {
                return write_bytes(client, b"0\r\n\r\n".to_vec()).await.is_ok();
            };
            if write_chunk(client, &event).await.is_err() {
                return false;
            }
        }
    };
    let mut writer = pin!(writer);
    let ended_cleanly = std::future::poll_fn(|cx| {
        for slot in readers.iter_mut() {
            if let Some(r) = slot
                && r.as_mut().poll(cx).is_ready()
            {
                *slot = None;
            }
        }
        writer.as_mut().poll(cx)
    })
    .await;
    if !ended_cleanly {
        outcome.reason = Some("the agent closed the stream".into());
    }
    Ok(outcome)
}

/// The merged GET stream's events waiting for the agent.
struct MergedQueue {
    events: VecDeque<Vec<u8>>,
    /// Bytes in `events`.
    bytes: usize,
    /// Upstream streams still open.
    open: usize,
}

async fn write_bytes(client: &mut Conn, data: Vec<u8>) -> std::io::Result<()> {
    let (res, _) = client.write_all(data).await;
    res
}

async fn write_chunk(client: &mut Conn, data: &[u8]) -> std::io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    write_bytes(client, out).await
}

async fn write(req: &Request<'_, '_>, client: &mut Conn, reply: Reply) -> Result<Outcome, Outcome> {
    let bytes = reply.render(b"POST", None, req.close);
    let outcome = Outcome {
        status: reply.status,
        decision: reply.decision,
        reason: reply.audit_reason(),
        upstream: reply.upstream,
        upstream_us: None,
        keep_alive: !req.close,
    };
    match write_bytes(client, bytes).await {
        Ok(()) => Ok(outcome),
        Err(_) => Err(outcome),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_to_128_with_a_hash() {
        assert_eq!(exposed_name("gh", "__", "create"), "gh__create");
        let long = "x".repeat(200);
        let e = exposed_name("gh", "__", &long);
        assert_eq!(e.len(), MAX_NAME);
        assert!(e.starts_with("gh__xxx"));
        let (_, hash) = e.rsplit_once('~').unwrap();
        assert_eq!(hash.len(), 8);
        assert_ne!(e, exposed_name("gh", "__", &"x".repeat(201)));
    }

    #[test]
    fn server_request_ids_map_and_unmap() {
        let id = map_id("jira", &json!(0));
        assert_eq!(id, "sg:jira:0");
        assert_eq!(unmap_id(&id), Some(("jira", "0")));
        let id = map_id("gh", &json!("a:b"));
        assert_eq!(unmap_id(&id), Some(("gh", "\"a:b\"")));
        assert_eq!(unmap_id("7"), None);
    }

    #[test]
    fn rewrite_maps_server_requests_and_resource_uris_only() {
        let r = Rewrite {
            upstream: "gh".into(),
            read_result: false,
        };
        let progress = br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}}"#;
        assert_eq!(r.apply(progress), progress.to_vec());
        let response = br#"{"jsonrpc":"2.0","id":5,"result":{}}"#;
        assert_eq!(r.apply(response), response.to_vec());
        let sampling: Value = serde_json::from_slice(
            &r.apply(br#"{"jsonrpc":"2.0","id":0,"method":"sampling/createMessage","params":{}}"#),
        )
        .unwrap();
        assert_eq!(sampling["id"], "sg:gh:0");
        let asks: Value = serde_json::from_slice(&r.apply(
            br#"{"jsonrpc":"2.0","id":"x","method":"elicitation/create","params":{"_meta":{"progressToken":5}}}"#,
        ))
        .unwrap();
        assert_eq!(asks["id"], "sg:gh:\"x\"");
        assert_eq!(asks["params"]["_meta"]["progressToken"], "sg:gh:5");
        let updated: Value = serde_json::from_slice(&r.apply(
            br#"{"jsonrpc":"2.0","method":"notifications/resources/updated","params":{"uri":"file:///a"}}"#,
        ))
        .unwrap();
        assert_eq!(updated["params"]["uri"], "scopegate://gh/file:///a");
        assert_eq!(
            unscope_uri("scopegate://gh/file:///a"),
            Some(("gh", "file:///a"))
        );
    }

    #[test]
    fn capabilities_merge_as_a_union() {
        let mut into = Value::Null;
        merge_capability(&mut into, &json!({"tools": {"listChanged": false}}));
        merge_capability(
            &mut into,
            &json!({"tools": {"listChanged": true}, "prompts": {}}),
        );
        assert_eq!(into, json!({"tools": {"listChanged": true}, "prompts": {}}));
    }

    #[test]
    fn initialize_answers_merge_to_the_lowest_version_and_named_instructions() {
        let gh = json!({"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
            "instructions": "Use issues."});
        let jira = json!({"protocolVersion": "2025-06-18", "capabilities": {"prompts": {}}});
        let merged = merge_initialize(&[("gh", &gh), ("jira", &jira)]);
        assert_eq!(merged["protocolVersion"], "2025-06-18");
        assert_eq!(merged["capabilities"], json!({"tools": {}, "prompts": {}}));
        assert_eq!(merged["serverInfo"]["name"], "scopegate");
        assert_eq!(merged["instructions"], "[gh] Use issues.");
    }

    #[test]
    fn cursors_round_trip() {
        let mut m = Map::new();
        m.insert("gh".into(), json!("abc"));
        m.insert("jira".into(), json!(2));
        assert_eq!(decode_cursor(&encode_cursor(&m)), Some(m));
        assert_eq!(decode_cursor("!!"), None);
    }
}
