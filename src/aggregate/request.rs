//! One aggregate request: what it carries (the agent, its policy, the upstream list) and
//! what every stage shares: the reply shapes, the client for the fan-outs, the writes to the
//! agent.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::audit::entry::Decision as AuditDecision;
use crate::http::conn::Conn;
use crate::mcp::envelope::Message;
use crate::mcp::jsonrpc;
use crate::mcp::jsonrpc::Id;
use crate::mcp::lists;
use crate::mcp::modern;
use crate::policy::{Policy, decide};
use crate::reply::Reply;
use crate::upstream::client::{UpRequest, Upstreams, send};
use crate::warn;

/// An upstream's answer to initialize: its session id (empty: none) and its result.
pub(super) type Joined = (Vec<u8>, Value);

/// A policy a reload installed while a stream was open, and the agent's index in it.
pub(super) type View = (Arc<Policy>, usize);

/// A boxed future borrowing the request.
pub(super) type Fut<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

/// What the request path records about an aggregate request.
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

/// One aggregate request: a request that passed the request path's gates. The methods here
/// are the aggregate endpoint's own (its upstream client, its deadlines, its list filter).
pub use crate::core::Passed as Request;

impl Request<'_> {
    pub(super) fn upstream_name(&self, i: usize) -> &str {
        &self.upstreams[i].name
    }

    /// The client's view of the upstreams.
    pub(super) fn ups(&self) -> Upstreams<'_> {
        let c = &self.core.config;
        Upstreams {
            list: self.upstreams,
            pool: &self.core.pool,
            timeout: c.upstream_timeout,
            max_message: c.max_upstream_message,
        }
    }

    pub(super) fn sep(&self) -> &str {
        &self.core.config.name_separator
    }

    /// Whether this agent may use upstream `i` (every one in insecure-open mode).
    pub(super) fn may_use(&self, i: usize) -> bool {
        match (self.policy, self.agent) {
            (Some(p), Some(a)) => p.may_use_upstream(a, i),
            _ => true,
        }
    }

    /// The upstreams this agent may use.
    pub(super) fn reachable(&self) -> Vec<usize> {
        (0..self.upstreams.len())
            .filter(|&i| self.may_use(i))
            .collect()
    }

    pub(super) fn agent_id(&self) -> &str {
        match (self.policy, self.agent) {
            (Some(p), Some(a)) => &p.agents[a].id,
            _ => "",
        }
    }

    pub(super) fn index_of(&self, name: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| u.name == name)
    }

    /// For a call routed to one upstream.
    pub(super) fn deadline(&self) -> Instant {
        Instant::now() + self.core.config.upstream_timeout
    }

    /// For each upstream of a fan-out (initialize, lists, notifications, joins): a slow one is
    /// left out after `SCOPEGATE_AGGREGATE_TIMEOUT_MS` while the others answer.
    pub(super) fn fanout_deadline(&self) -> Instant {
        let c = &self.core.config;
        Instant::now() + c.aggregate_timeout.min(c.upstream_timeout)
    }

    pub(super) fn version(&self) -> Option<&[u8]> {
        self.head.get("mcp-protocol-version")
    }

    pub(super) fn up_request<'s>(
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
            agent_id: self
                .policy
                .zip(self.agent)
                .map(|(p, a)| p.agents[a].id.as_str()),
            routing: {
                let mut extra = if self.modern() && method == "POST" {
                    routing_headers(self.head, body)
                } else {
                    Vec::new()
                };
                // The agent's trace context goes on, with scopegate's span for the hop.
                if let Some(t) = &self.trace {
                    extra.push(("traceparent".to_owned(), t.header().to_vec()));
                    if let Some(state) = self.head.get("tracestate") {
                        extra.push(("tracestate".to_owned(), state.to_vec()));
                    }
                }
                extra
            },
        }
    }

    /// The agent's owner secret, which binds the task ids it is given to it
    /// ([`super::names::map_task`]).
    pub(super) fn owner(&self) -> [u8; 32] {
        self.core.sessions.owner(self.agent_id())
    }

    /// Whether the agent speaks a sessionless revision (2026-07-28 or later).
    pub(super) fn modern(&self) -> bool {
        self.version().is_some_and(modern::is_modern)
    }

    /// The raw `params._meta` of the agent's message: in 2026-07-28 it carries the revision
    /// and the client's capabilities, which every request scopegate makes for it carries too.
    pub(super) fn meta(&self) -> Option<&[u8]> {
        let (a, b) = super::json::locate(&self.body, &["params", "_meta"])?;
        Some(&self.body[a..b])
    }

    /// A message from upstream `i` for the agent, with any list result in it filtered to what
    /// the agent may see (the same decision as everywhere: policy::decide::visible); `None`
    /// when it may hold a list and cannot be read (then it is not relayed).
    pub(super) fn filter_lists(&self, i: usize, data: Vec<u8>) -> Option<Vec<u8>> {
        let (Some(p), Some(a)) = (self.policy, self.agent) else {
            return Some(data);
        };
        let data = self.strip_hidden(p, data);
        if !lists::may_hold_list(&data) {
            return Some(data);
        }
        match lists::filter_lists(&data, &|kind, item| decide::vet(p, a, i, kind, item)) {
            Ok(None) => Some(data),
            Ok(Some(filtered)) => Some(filtered),
            Err(_) => None,
        }
    }

    /// [`Request::filter_lists`] under the policy a reload installed after the request began
    /// (`view`: that policy and the agent's index in it), when there was one: a message of an
    /// upstream the agent may no longer use is not relayed (`None`).
    pub(super) fn filter_lists_under(
        &self,
        view: Option<&View>,
        i: usize,
        data: Vec<u8>,
    ) -> Option<Vec<u8>> {
        let Some((p, a)) = view else {
            return self.filter_lists(i, data);
        };
        let data = self.strip_hidden(p, data);
        let name = self.upstream_name(i);
        let now = p.upstreams().iter().position(|u| u.name == name);
        let now = now.filter(|&n| p.may_use_upstream(*a, n))?;
        if !lists::may_hold_list(&data) {
            return Some(data);
        }
        match lists::filter_lists(&data, &|kind, item| decide::vet(p, *a, now, kind, item)) {
            Ok(None) => Some(data),
            Ok(Some(filtered)) => Some(filtered),
            Err(_) => None,
        }
    }

    /// Tool integrity: a message answering a tool's call without its hidden Unicode, when
    /// the policy says (`strip_hidden_unicode`).
    fn strip_hidden(&self, p: &Policy, data: Vec<u8>) -> Vec<u8> {
        let strips = self
            .env
            .as_ref()
            .is_some_and(|e| e.messages().iter().any(|m| p.integrity.strips(m.method)));
        match strips {
            true => crate::integrity::scan::strip_body(&data).unwrap_or(data),
            false => data,
        }
    }

    pub(super) fn note_failure(&self, i: usize, why: &str) {
        self.core.stats.metrics.aggregate_failure(i);
        warn!(
            "aggregate: upstream {:?} left out: {why}",
            self.upstream_name(i)
        );
    }
}

/// The 2026-07-28 routing headers of a message scopegate sends: `Mcp-Method` and `Mcp-Name`
/// from the body itself (so they agree with what the upstream executes, in its own names),
/// and, on a call, the agent's `Mcp-Param-*` (the arguments go on byte for byte).
fn routing_headers(agent: &crate::http::head::Head, body: &[u8]) -> Vec<(String, Vec<u8>)> {
    let string_at = |path: &[&str]| {
        let (a, b) = super::json::locate(body, path)?;
        serde_json::from_slice::<String>(&body[a..b]).ok()
    };
    let Some(method) = string_at(&["method"]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(name) = modern::name_field(&method).and_then(|f| string_at(&["params", f])) {
        let value = modern::encode_header_value(&name).into_owned().into_bytes();
        out.push(("Mcp-Name".to_owned(), value));
    }
    if method == "tools/call" {
        for (name, value) in agent.iter().filter(|(n, _)| modern::is_param_header(n)) {
            let name = String::from_utf8_lossy(name).into_owned();
            out.push((name, value.to_vec()));
        }
    }
    out.insert(0, ("Mcp-Method".to_owned(), method.into_bytes()));
    out
}

/// A JSON-RPC error with HTTP 200 for an upstream's failure: one upstream's failure must not
/// look like the whole endpoint's (an HTTP error would end some clients' sessions).
pub(super) fn upstream_failed(id: Option<Id<'_>>, r: Reply, upstream: usize) -> Reply {
    let mut r = r.for_id(id).upstream_error(Some(upstream));
    r.status = 200;
    r
}

/// A request scopegate answers itself from its upstreams (initialize, server/discover): the
/// JSON-RPC response carrying `result`.
pub(super) fn answered(id: Option<Id<'_>>, result: &Value) -> Reply {
    let mut body = b"{\"jsonrpc\":\"2.0\",\"id\":".to_vec();
    match id {
        Some(id) => id.write_json(&mut body),
        None => body.extend_from_slice(b"null"),
    }
    body.extend_from_slice(b",\"result\":");
    body.extend_from_slice(result.to_string().as_bytes());
    body.push(b'}');
    Reply::json(200, body)
}

/// The agent may use no upstream: there is nothing to initialize or discover.
pub(super) fn no_upstream(id: Option<Id<'_>>) -> Reply {
    let r = Reply::error(
        404,
        jsonrpc::GATEWAY_REFUSED,
        "no upstream is available to this agent",
    );
    r.denied().for_id(id)
}

/// A fan-out that every upstream failed (or one did, with `SCOPEGATE_AGGREGATE_FAIL_CLOSED`):
/// `None` when it may go on with the answers it has.
pub(super) fn fanout_failed(
    req: &Request<'_>,
    id: Option<Id<'_>>,
    what: &str,
    answered: usize,
    failures: &[String],
) -> Option<Reply> {
    if answered > 0 && (failures.is_empty() || !req.core.config.aggregate_fail_closed) {
        return None;
    }
    let r = Reply::error(
        502,
        jsonrpc::UPSTREAM_UNAVAILABLE,
        format!("{what} failed: {}", failures.join("; ")),
    );
    let mut reply = r.for_id(id).upstream_error(None);
    reply.status = 200;
    reply.upstream = None;
    Some(reply)
}

/// A refusal by policy, for the upstream it concerned.
pub(super) fn denied(
    id: Option<Id<'_>>,
    rule: &str,
    reason: &str,
    upstream: Option<usize>,
) -> Reply {
    let mut r = Reply::policy_denied(rule, reason).for_id(id);
    r.upstream = upstream;
    r
}

/// The `result` of upstream `i`'s answer to `what`, or a refusal saying what came instead.
pub(super) fn rpc_result(
    req: &Request<'_>,
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
        // A POST refused outright: not a Streamable HTTP server (legacy HTTP+SSE, most likely).
        let advice = match status {
            405 => format!("; {}", crate::upstream::LEGACY_SSE_ADVICE),
            _ => String::new(),
        };
        Reply::error(
            502,
            jsonrpc::UPSTREAM_UNAVAILABLE,
            format!(
                "upstream {:?} failed {what} (HTTP {status}): {}{advice}",
                req.upstream_name(i),
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        )
    })
}

pub(super) fn rate_limited(
    req: &Request<'_>,
    m: &Message<'_>,
    limited: crate::ratelimit::Limited,
) -> Reply {
    let status = req.core.config.rate_limit_status;
    Reply::rate_limited(status, &limited.label, limited.retry_after_ns).for_id(m.id)
}

/// Sends a message whose answer is 202 (or a JSON-RPC response that is discarded).
pub(super) async fn exchange_or_accepted(
    req: &Request<'_>,
    i: usize,
    r: &UpRequest<'_>,
) -> Result<(), Reply> {
    let mut resp = send(req.ups(), i, r, req.fanout_deadline()).await?;
    if resp.is_event_stream() {
        // A response on a stream: not awaited, and the connection is not reused.
        return Ok(());
    }
    let _ = resp.read_all(req.fanout_deadline(), 1 << 20).await;
    resp.finish(req.ups());
    Ok(())
}

pub(super) async fn write_bytes(client: &mut Conn, data: Vec<u8>) -> std::io::Result<()> {
    let (res, _) = client.write_all(data).await;
    res
}

pub(super) async fn write_chunk(client: &mut Conn, data: &[u8]) -> std::io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    write_bytes(client, out).await
}

pub(super) async fn write(
    req: &Request<'_>,
    client: &mut Conn,
    reply: Reply,
) -> Result<Outcome, Outcome> {
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
