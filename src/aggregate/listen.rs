//! `subscriptions/listen` (2026-07-28) over several upstreams: the agent's one long POST
//! becomes one to every upstream it may use, each asked only for its own resources (URIs back
//! in the upstream's names, each authorized as a read would be), and their streams are merged
//! into the agent's (see [`super::stream::Listen`]); tasks followed (the 2026-07-28 tasks
//! extension's `taskIds`) go to the upstream that created them. The subscription id is the agent's
//! request id on every stream, so the notifications need no rewriting beyond their URIs.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::http::conn::Conn;
use crate::mcp::envelope::Message;
use crate::mcp::jsonrpc;
use crate::mcp::lists;
use crate::mcp::session::MultiSession;
use crate::policy::decide::{self, Decision, Target};
use crate::reply::Reply;
use crate::upstream::client::{UpResponse, join_all, send};

use super::names::{unmap_task, unscope_uri};
use super::request::{Fut, Outcome, Request, denied, write};
use super::session::joined;
use super::stream::{Listen, merge};

pub(super) async fn listen(
    req: &Request<'_>,
    client: &mut Conn,
    session: &MultiSession,
    m: &Message<'_>,
) -> Result<Outcome, Outcome> {
    let malformed =
        |why: &str| Reply::json(200, jsonrpc::error_body(m.id, jsonrpc::INVALID_PARAMS, why));
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&req.body) else {
        return write(req, client, malformed("not a JSON object")).await;
    };
    let filter = body
        .get("params")
        .and_then(|p| p.get("notifications"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    // Each subscribed resource and task at its upstream, in the upstream's own names.
    let mut own: [BTreeMap<usize, Vec<Value>>; 2] = Default::default();
    for (k, key) in FOLLOWED.iter().enumerate() {
        match split(req, m, &filter, key) {
            Ok(found) => own[k] = found,
            Err(reply) => return write(req, client, reply).await,
        }
    }
    let targets = joined(req, session);
    let bodies: Vec<Vec<u8>> = targets
        .iter()
        .map(|(i, _)| {
            let mut mine = body.clone();
            if let Some(Value::Object(n)) = mine
                .get_mut("params")
                .and_then(|p| p.get_mut("notifications"))
            {
                for (k, key) in FOLLOWED.iter().enumerate() {
                    match own[k].get(i) {
                        Some(list) => {
                            n.insert((*key).into(), Value::Array(list.clone()));
                        }
                        None => {
                            n.remove(*key);
                        }
                    }
                }
            }
            Value::Object(mine).to_string().into_bytes()
        })
        .collect();
    let futures: Vec<Fut<'_, Option<(usize, UpResponse)>>> = targets
        .iter()
        .zip(&bodies)
        .map(|((i, sid), body)| {
            let i = *i;
            Box::pin(async move {
                let r = req.up_request("POST", body, Some(sid));
                let mut resp = match send(req.ups(), i, &r, req.fanout_deadline()).await {
                    Ok(resp) => resp,
                    Err(e) => {
                        req.note_failure(i, e.message());
                        return None;
                    }
                };
                if resp.status() == 200 && resp.is_event_stream() {
                    return Some((i, resp));
                }
                let status = resp.status();
                let answer = resp.read_all(req.fanout_deadline(), 64 * 1024).await;
                resp.finish(req.ups());
                // An upstream without subscriptions says "method not found": not a failure.
                if !answer.as_deref().is_ok_and(super::listing::not_offered) {
                    let why = format!("answered subscriptions/listen with HTTP {status}");
                    req.note_failure(i, &why);
                }
                None
            }) as Fut<'_, _>
        })
        .collect();
    let streams: Vec<(usize, UpResponse)> = join_all(futures).await.into_iter().flatten().collect();
    let mut id = Vec::new();
    match m.id {
        Some(i) => i.write_json(&mut id),
        None => id.extend_from_slice(b"null"),
    }
    if streams.is_empty() {
        let body = jsonrpc::error_body(
            m.id,
            jsonrpc::METHOD_NOT_FOUND,
            "no upstream available to this agent offers subscriptions/listen",
        );
        return write(req, client, Reply::json(404, body)).await;
    }
    let id = serde_json::from_slice(&id).unwrap_or(Value::Null);
    let asked = lists::list_changes_asked(&filter);
    merge(req, client, streams, Some(Listen { id, asked })).await
}

/// The filter fields that name things of one upstream: resources (scoped URIs) and tasks
/// (mapped ids, the 2026-07-28 tasks extension).
const FOLLOWED: [&str; 2] = ["resourceSubscriptions", "taskIds"];

/// The entries of `filter[key]` by upstream, in the upstream's own names: each resource
/// authorized as a read of it would be, each task one of an upstream the agent may use. A
/// refusal otherwise, saying which.
fn split(
    req: &Request<'_>,
    m: &Message<'_>,
    filter: &Value,
    key: &str,
) -> Result<BTreeMap<usize, Vec<Value>>, Reply> {
    let mut out: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
    let Some(entries) = filter.get(key) else {
        return Ok(out);
    };
    let malformed = || {
        let why = format!("{key} must be a list of strings");
        Reply::json(
            200,
            jsonrpc::error_body(m.id, jsonrpc::INVALID_PARAMS, &why),
        )
    };
    for entry in entries.as_array().ok_or_else(malformed)? {
        let name = entry.as_str().ok_or_else(malformed)?;
        let found = if key == "taskIds" {
            unmap_task(&req.owner(), name).and_then(|(up, id)| Some((req.index_of(up)?, id)))
        } else {
            unscope_uri(name).and_then(|(up, u)| Some((req.index_of(up)?, u.to_owned())))
        };
        let what = if key == "taskIds" { "task" } else { "resource" };
        let unknown = || {
            let reason = format!("unknown {what} {name:?}");
            denied(m.id, &format!("unknown {what}"), &reason, None)
        };
        let (i, original) = found.filter(|&(i, _)| req.may_use(i)).ok_or_else(unknown)?;
        if key != "taskIds"
            && let (Some(p), Some(a)) = (req.policy, req.agent)
            && let Decision::Deny { rule, reason } =
                decide::authorize(p, a, i, &Target::Resource(&original))
        {
            return Err(denied(m.id, &rule, &reason, Some(i)));
        }
        out.entry(i).or_default().push(Value::String(original));
    }
    Ok(out)
}
