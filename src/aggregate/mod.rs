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
//!
//! - 2026-07-28 (sessionless) agents are served too: `server/discover` is merged (offering the
//!   sessionless revision only when every upstream has it, so one older upstream sends the
//!   agent to initialize), each message is routed on its own with routing headers in the
//!   upstream's names, `input_required` results travel back by the call's own name, and
//!   `subscriptions/listen` is fanned in.
//!
//! The rooms, each importing only those above it in this list: [`json`] (byte-level splices),
//! `request` (what a request carries, reply shapes, writes to the agent), `names` (names,
//! URIs, ids and cursors as the agent sees them), `session` (initialize, the session token,
//! sessionless requests), `discover` (server/discover), `listing` (merged lists), `stream`
//! (relayed and merged event streams), `listen` (subscriptions/listen), `routed` (messages
//! for one upstream); this module dispatches. Every decision is `policy::decide`'s, every
//! limit the core's limiter, every request head `upstream::request`'s.

mod discover;
pub mod json;
mod listen;
mod listing;
mod names;
mod request;
mod routed;
mod session;
mod stream;
mod tasks;

use crate::http::conn::Conn;
use crate::mcp::envelope::{Kind, Message};
use crate::mcp::jsonrpc;
use crate::policy::decide::{self, Access};
use crate::reply::Reply;
use crate::upstream::client::{join_all, send};

use listing::list;
pub use names::MAX_NAME;
use request::{Fut, denied, rate_limited, write};
pub use request::{Outcome, Request};
use routed::{answer_server_request, broadcast, notify, routed};
use session::{initialize, joined, open};
use stream::get_stream;

/// Handles one request on the aggregate endpoint, writing the answer to `client`. `Err`: the
/// connection must be closed (a response was cut off).
pub async fn handle(req: &Request<'_>, client: &mut Conn) -> Result<Outcome, Outcome> {
    let method = req.head.method();
    if method == b"POST" {
        return post(req, client).await;
    }
    if req.modern() && req.head.get("mcp-session-id").is_none() {
        // 2026-07-28 has no session to end and no GET stream.
        let mut r = Reply::error(
            405,
            jsonrpc::INVALID_REQUEST,
            "2026-07-28 has no sessions and no GET stream: POST subscriptions/listen for notifications",
        );
        r.headers = "Allow: POST\r\n".into();
        return write(req, client, r).await;
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
                            resp.finish(req.ups());
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

async fn post(req: &Request<'_>, client: &mut Conn) -> Result<Outcome, Outcome> {
    let Some(env) = &req.env else {
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
    if m.method == Some("server/discover") && m.kind == Kind::Request {
        let reply = discover::discover(req, m).await;
        return write(req, client, reply).await;
    }
    let session = match open(req) {
        Ok(s) => s,
        Err(reply) => return write(req, client, reply).await,
    };
    match m.kind {
        // 2026-07-28 has no client-to-server notifications over HTTP (a cancellation is the
        // closed request): acknowledged here, not fanned out to every upstream.
        Kind::Notification if req.modern() && req.head.get("mcp-session-id").is_none() => {
            write(req, client, Reply::json(202, Vec::new())).await
        }
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
                Access::Task => tasks::task(req, client, &session, m).await,
                Access::Listen => listen::listen(req, client, &session, m).await,
                _ if method == "ping" => {
                    let mut body = b"{\"jsonrpc\":\"2.0\",\"id\":".to_vec();
                    if let Some(id) = m.id {
                        id.write_json(&mut body);
                    }
                    body.extend_from_slice(b",\"result\":{}}");
                    write(req, client, Reply::json(200, body)).await
                }
                _ if method == "logging/setLevel" => {
                    broadcast(req, &session, &req.body).await;
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
async fn agent_limit(req: &Request<'_>, m: &Message<'_>) -> Option<Reply> {
    let (Some(p), Some(a)) = (req.policy, req.agent) else {
        return None;
    };
    // Without a tool name only the agent's bucket applies; the upstream index is not used.
    let uses = p.limits_for(a, 0, None);
    let limited = req.core.limiter.admit(&uses).await.err()?;
    Some(rate_limited(req, m, limited))
}
