//! Messages that go to one upstream: calls with the name spliced back, answers to server
//! requests, and notifications.

use std::time::Instant;

use serde_json::Value;

use crate::audit::entry::Decision as AuditDecision;
use crate::http::conn::Conn;
use crate::mcp::envelope::Message;
use crate::mcp::jsonrpc;
use crate::mcp::lists::ListKind;
use crate::mcp::session::MultiSession;
use crate::policy::decide::{self, Access, Decision, Target};
use crate::reply::Reply;
use crate::upstream::client::{join_all, send};

use super::listing::{list_to_vet, resolve_name};
use super::names::{Answer, Rewrite, unmap_id, unscope_uri};
use super::request::{
    Fut, Outcome, Request, denied, exchange_or_accepted, rate_limited, upstream_failed, write,
};
use super::session::{Sent, expired, joined, may_be_expired, resend_on_new_session, session_for};
use super::stream::relay;

/// A notification from the agent. One that names a server request (a cancellation of it, or
/// progress on a token a server chose) goes to that upstream with the original value spliced
/// back; the others go to every upstream.
pub(super) async fn notify(req: &Request<'_>, session: &MultiSession, m: &Message<'_>) -> Reply {
    let path: &[&str] = match m.method {
        Some("notifications/cancelled") => &["params", "requestId"],
        Some("notifications/progress") => &["params", "progressToken"],
        _ => &[],
    };
    let mapped = (!path.is_empty())
        .then(|| super::json::locate(&req.body, path))
        .flatten()
        .and_then(|range| {
            let value = serde_json::from_slice::<String>(&req.body[range.0..range.1]).ok()?;
            let (up, original) = unmap_id(&value)?;
            serde_json::from_str::<Value>(original).ok()?;
            let i = req.index_of(up).filter(|&i| req.may_use(i))?;
            Some((
                i,
                super::json::splice(&req.body, range, original.as_bytes()),
            ))
        });
    let Some((i, body)) = mapped else {
        broadcast(req, session, &req.body).await;
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
pub(super) async fn broadcast(req: &Request<'_>, session: &MultiSession, body: &[u8]) {
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

/// A message that belongs to one upstream: a call, a prompt, a resource, a completion.
pub(super) async fn routed(
    req: &Request<'_>,
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
    let arguments = req.env.as_ref().and_then(|e| e.arguments(m));
    // What the agent named (in the aggregate's names), read off the envelope by the same
    // table as on one upstream.
    let asked = Target::of(
        m,
        arguments,
        req.env.as_ref().and_then(|e| e.notifications(m)),
    );
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
        let mut decision = decide::authorize(p, a, i, &target);
        if decide::is_unseen(&decision) {
            let kind = match target {
                Target::Prompt(_) => crate::integrity::Kind::Prompt,
                _ => crate::integrity::Kind::Tool,
            };
            list_to_vet(req, session, i, kind).await;
            decision = decide::authorize(p, a, i, &target);
        }
        if let Decision::Deny { rule, reason } = decision {
            return write(req, client, denied(m.id, &rule, &reason, Some(i))).await;
        }
        // Rate limits: every bucket the call falls in, with the upstream's own tool name.
        let tool = matches!(target, Target::Tool { .. }).then_some(original.as_str());
        if let Err(limited) = req.core.limiter.admit(&p.limits_for(a, i, tool)).await {
            let mut reply = rate_limited(req, m, limited);
            reply.upstream = Some(i);
            return write(req, client, reply).await;
        }
    }
    let exposed = match asked {
        Target::Tool { name, .. } | Target::Prompt(name) => name,
        Target::Resource(uri) | Target::ResourceTemplate(uri) => uri,
        _ => "",
    };

    // The one rewrite on the call path: the name (or URI) spliced back, the rest byte-identical.
    let Some(range) = super::json::locate(&req.body, path).filter(|&(a, b)| {
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
    let body = super::json::splice(&req.body, range, &with);

    forward(req, client, session, m, i, &body).await
}

/// Sends `body` (the agent's message, rewritten for upstream `i`) on the session's upstream
/// session, joining the upstream again once if that session expired, and relays the answer
/// through the rewrite for the message's method.
pub(super) async fn forward(
    req: &Request<'_>,
    client: &mut Conn,
    session: &MultiSession,
    m: &Message<'_>,
    i: usize,
    body: &[u8],
) -> Result<Outcome, Outcome> {
    let sid = match session_for(req, session, i).await {
        Ok(s) => s,
        Err(e) => return write(req, client, upstream_failed(m.id, e, i)).await,
    };
    let r = req.up_request("POST", body, Some(&sid));
    let sent_at = Instant::now();
    let mut resp = match send(req.ups(), i, &r, req.deadline()).await {
        Ok(resp) => resp,
        Err(e) => {
            req.note_failure(i, e.message());
            return write(req, client, upstream_failed(m.id, e, i)).await;
        }
    };
    let rewrite = Rewrite {
        upstream: req.upstream_name(i).to_owned(),
        owner: req.owner(),
        answer: Answer::of(m.method.unwrap_or_default()),
    };
    let status = resp.status();
    if may_be_expired(status, &sid) {
        // Perhaps the upstream's session expired: then a new one, and the request again on it
        // (once); else the answer, read already, is the agent's.
        let answer = resp
            .read_all(req.deadline(), req.core.config.max_upstream_message)
            .await;
        resp.finish(req.ups());
        let answer = answer.unwrap_or_default();
        let sent = if expired(status, &sid, &answer) {
            match resend_on_new_session(req, i, body, &sid).await {
                Ok(sent) => sent,
                Err(e) => return write(req, client, upstream_failed(m.id, e, i)).await,
            }
        } else {
            Sent::Read(status, answer)
        };
        resp = match sent {
            Sent::Open(resp) => *resp,
            Sent::Read(status, answer) => {
                let Some(answer) = req.filter_lists(i, rewrite.apply(&answer)) else {
                    let r = Reply::error(
                        502,
                        jsonrpc::UPSTREAM_UNAVAILABLE,
                        "the upstream's answer may list hidden items and is not JSON; not relayed",
                    );
                    return write(req, client, upstream_failed(m.id, r, i)).await;
                };
                let mut reply = Reply::json(status, answer);
                reply.upstream = Some(i);
                if status >= 500 {
                    reply.decision = AuditDecision::UpstreamError;
                }
                return write(req, client, reply).await;
            }
        };
    }
    let upstream_us = Some(sent_at.elapsed().as_micros() as u64);
    relay(req, client, resp, &rewrite, m, i, upstream_us).await
}

/// The agent's answer to a server request goes back to the upstream that asked, with the
/// original id.
pub(super) async fn answer_server_request(req: &Request<'_>, session: &MultiSession) -> Reply {
    let bad = |why: &str| Reply::error(400, jsonrpc::INVALID_REQUEST, why);
    let Some(range) = super::json::locate(&req.body, &["id"]) else {
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
    let body = super::json::splice(&req.body, range, original.as_bytes());
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
