//! The aggregate session: `initialize` fanned out to every upstream the agent may use, the
//! sealed `sg2.` token that carries each upstream's session id, and late joins.

use serde_json::{Map, Value, json};

use crate::info;
use crate::mcp::caps;
use crate::mcp::envelope::Message;
use crate::mcp::jsonrpc;
use crate::mcp::session::MultiSession;
use crate::reply::Reply;
use crate::upstream::client::{UpRequest, UpResponse, exchange, join_all, send};

use super::request::{Fut, Joined, Request, answered, fanout_failed, no_upstream, rpc_result};

/// The agent's aggregate session, from its `Mcp-Session-Id`.
pub(super) fn open(req: &Request<'_>) -> Result<MultiSession, Reply> {
    let not_found = || {
        Reply::error(
            404,
            jsonrpc::SESSION_NOT_FOUND,
            "session not found: initialize a new session",
        )
        .denied()
    };
    let Some(token) = req.head.get("mcp-session-id") else {
        if req.modern() {
            return Ok(sessionless(req));
        }
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

/// A 2026-07-28 request has no session: every upstream the agent may use is asked without
/// one (their capabilities unknown: an upstream without a kind of list says so).
fn sessionless(req: &Request<'_>) -> MultiSession {
    let reachable = req.reachable();
    MultiSession {
        agent: req.agent_id().to_owned(),
        caps: vec![0; reachable.len()],
        upstreams: reachable
            .into_iter()
            .map(|i| (req.upstream_name(i).to_owned(), Vec::new()))
            .collect(),
    }
}

/// Whether the request has no aggregate session (2026-07-28): nothing is joined for it.
fn is_sessionless(req: &Request<'_>) -> bool {
    req.head.get("mcp-session-id").is_none()
}

pub(super) fn token_key(req: &Request<'_>) -> u64 {
    let token = req.head.get("mcp-session-id").unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut k = [0u8; 8];
    k.copy_from_slice(&d.as_ref()[..8]);
    u64::from_le_bytes(k)
}

/// The upstreams of this session that the agent may still use, with their session ids:
/// those joined at initialize and those this worker joined later.
pub(super) fn joined(req: &Request<'_>, session: &MultiSession) -> Vec<(usize, Vec<u8>)> {
    let reachable = req.reachable();
    let key = token_key(req);
    let lazy = &req.core.lazy_joins;
    reachable
        .into_iter()
        .filter_map(|i| {
            let name = req.upstream_name(i);
            let late = if is_sessionless(req) {
                None
            } else {
                lazy.get(key, i)
            };
            late.map(|s| (i, s)).or_else(|| {
                session
                    .upstreams
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, s)| (i, s.clone()))
            })
        })
        .collect()
}

/// The session id to use for upstream `i`, joining it now when it was not joined yet. A join
/// this worker made (a late one, or a new session after the upstream's expired) comes first.
pub(super) async fn session_for(
    req: &Request<'_>,
    session: &MultiSession,
    i: usize,
) -> Result<Vec<u8>, Reply> {
    let name = req.upstream_name(i);
    if is_sessionless(req) {
        return Ok(Vec::new());
    }
    if let Some(s) = req.core.lazy_joins.get(token_key(req), i) {
        return Ok(s);
    }
    if let Some((_, s)) = session.upstreams.iter().find(|(n, _)| n == name) {
        return Ok(s.clone());
    }
    join(req, i).await
}

/// Whether an answer with this status may say that the session `sid` is gone: then its body
/// decides ([`expired`]).
pub(super) fn may_be_expired(status: u16, sid: &[u8]) -> bool {
    !sid.is_empty() && (status == 404 || status == 400)
}

/// Whether an upstream's answer says the session `sid` is gone: 404 on a request that carried
/// one (what the specification says), or a 400 whose JSON-RPC error names the session (what
/// servers built on the TypeScript SDK's examples answer for a session they do not know,
/// npm server-everything among them: "Bad Request: No valid session ID provided"). The
/// aggregate session then joins that upstream again ([`rejoin`]), once.
pub(super) fn expired(status: u16, sid: &[u8], body: &[u8]) -> bool {
    if !may_be_expired(status, sid) {
        return false;
    }
    if status == 404 {
        return true;
    }
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    // The transport's refusal, not a request's error: no id (or null), the SDK's generic
    // server-error code, a message about the session.
    let error = answer.get("error");
    answer.get("id").is_none_or(Value::is_null)
        && error.and_then(|e| e.get("code")).and_then(Value::as_i64) == Some(-32000)
        && error
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .is_some_and(|m| m.to_ascii_lowercase().contains("session"))
}

/// A session on upstream `i` to use instead of `expired_sid`: one another request on this
/// worker joined meanwhile, else a new one. Remembered on this worker only: another worker
/// (or replica) meeting the expiry joins its own.
pub(super) async fn rejoin(
    req: &Request<'_>,
    i: usize,
    expired_sid: &[u8],
) -> Result<Vec<u8>, Reply> {
    match req.core.lazy_joins.get(token_key(req), i) {
        Some(s) if s != expired_sid => Ok(s),
        _ => join(req, i).await,
    }
}

/// The same answer again on the session [`rejoin`] gave: it was not about the session. The
/// join is forgotten and the agent gets an error, never the 404 (which would end its whole
/// session).
pub(super) fn not_expired(req: &Request<'_>, i: usize, status: u16) -> Reply {
    req.core.lazy_joins.remove(token_key(req), i);
    let why = format!(
        "upstream {:?} answered {status} on a new session too",
        req.upstream_name(i)
    );
    req.note_failure(i, &why);
    Reply::error(502, jsonrpc::UPSTREAM_UNAVAILABLE, why)
}

/// An upstream's answer: still to be read, or read already (an answer that had to be looked
/// at to know whether it was about the session).
pub(super) enum Sent {
    Open(Box<UpResponse>),
    Read(u16, Vec<u8>),
}

/// Sends `body` to upstream `i` again after its session `expired_sid` expired: on a session
/// from [`rejoin`], once.
pub(super) async fn resend_on_new_session(
    req: &Request<'_>,
    i: usize,
    body: &[u8],
    expired_sid: &[u8],
) -> Result<Sent, Reply> {
    let sid = rejoin(req, i, expired_sid).await?;
    let r = req.up_request("POST", body, Some(&sid));
    let mut resp = send(req.ups(), i, &r, req.deadline())
        .await
        .inspect_err(|e| req.note_failure(i, e.message()))?;
    let status = resp.status();
    if may_be_expired(status, &sid) {
        let body = resp
            .read_all(req.deadline(), req.core.config.max_upstream_message)
            .await;
        resp.finish(req.ups());
        let body = body.unwrap_or_default();
        if expired(status, &sid, &body) {
            return Err(not_expired(req, i, status));
        }
        return Ok(Sent::Read(status, body));
    }
    Ok(Sent::Open(Box::new(resp)))
}

/// Opens a new session on upstream `i` for this aggregate session (initialize +
/// notifications/initialized) and remembers it on this worker.
pub(super) async fn join(req: &Request<'_>, i: usize) -> Result<Vec<u8>, Reply> {
    let name = req.upstream_name(i);
    let key = token_key(req);
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
    let (sid, result) = initialize_upstream(req, i, &r).await?;
    let caps = caps_advertised(&result);
    let done = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let r = req.up_request("POST", done, Some(&sid));
    if let Ok(mut resp) = send(req.ups(), i, &r, req.fanout_deadline()).await {
        let _ = resp.read_all(req.fanout_deadline(), 1 << 20).await;
        resp.finish(req.ups());
    }
    info!("aggregate: joined upstream {name:?} for an existing session");
    req.core.lazy_joins.insert(key, i, sid.clone(), caps);
    Ok(sid)
}

/// The capability bits of an initialize result (0, nothing known, without a capabilities
/// object: everything is asked then).
fn caps_advertised(result: &Value) -> u8 {
    let advertised = result.get("capabilities").and_then(Value::as_object);
    advertised.map_or(0, |o| caps::from_names(o.keys().map(String::as_str)))
}

/// The capability bits of upstream `i` in this session: its latest join on this worker's, else
/// the token's.
pub(super) fn caps_of(req: &Request<'_>, session: &MultiSession, i: usize) -> u8 {
    let late = if is_sessionless(req) {
        None
    } else {
        req.core.lazy_joins.caps(token_key(req), i)
    };
    late.unwrap_or_else(|| session.caps_of(req.upstream_name(i)))
}

/// Sends an initialize request to upstream `i`: its session id (empty: none) and its result.
pub(super) async fn initialize_upstream(
    req: &Request<'_>,
    i: usize,
    r: &UpRequest<'_>,
) -> Result<Joined, Reply> {
    let (resp, body) = exchange(req.ups(), i, r, req.fanout_deadline()).await?;
    let status = resp.status();
    let sid = resp
        .header("mcp-session-id")
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    resp.finish(req.ups());
    Ok((sid, rpc_result(req, i, "initialize", status, &body)?))
}

pub(super) async fn initialize(req: &Request<'_>, m: &Message<'_>) -> Reply {
    let reachable = req.reachable();
    if reachable.is_empty() {
        return no_upstream(m.id);
    }
    let futures: Vec<Fut<'_, Result<Joined, Reply>>> = reachable
        .iter()
        .map(|&i| {
            Box::pin(async move {
                let r = UpRequest {
                    method: "POST",
                    body: &req.body,
                    session: None,
                    protocol_version: None,
                    ..req.up_request("POST", &req.body, None)
                };
                initialize_upstream(req, i, &r).await
            }) as Fut<'_, _>
        })
        .collect();
    let results = join_all(futures).await;
    let mut sessions = Vec::new();
    let mut caps = Vec::new();
    let mut answers = Vec::new();
    let mut failures = Vec::new();
    for (&i, result) in reachable.iter().zip(results) {
        match result {
            Ok((sid, answer)) => {
                sessions.push((req.upstream_name(i).to_owned(), sid));
                caps.push(caps_advertised(&answer));
                answers.push((i, answer));
            }
            Err(e) => {
                req.note_failure(i, e.message());
                failures.push(e.message().to_owned());
            }
        }
    }
    if let Some(reply) = fanout_failed(req, m.id, "initialize", answers.len(), &failures) {
        return reply;
    }
    let Some(token) = req
        .core
        .sessions
        .seal_multi(req.agent_id(), &sessions, &caps)
    else {
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
    let mut reply = answered(m.id, &result);
    reply.headers = format!("Mcp-Session-Id: {token}\r\n");
    reply
}

/// scopegate's initialize result: its own serverInfo, the union of the upstreams' capabilities
/// and the lowest protocol version any of them answered (revisions are dates, so they order as
/// strings).
pub(super) fn merge_initialize(answers: &[(&str, &Value)]) -> Value {
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

pub(super) fn merge_capability(into: &mut Value, from: &Value) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_expired_session_is_a_404_or_a_400_about_the_session() {
        let sid = b"s-1";
        assert!(expired(404, sid, b""));
        let everything = br#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"}}"#;
        assert!(expired(400, sid, everything));
        let other =
            br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"bad arguments"}}"#;
        assert!(!expired(400, sid, other));
        assert!(!expired(400, sid, b"not json"));
        // Without a session id there is nothing to expire.
        assert!(!expired(404, b"", b""));
        assert!(!expired(400, b"", everything));
        assert!(!may_be_expired(500, sid));
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
}
