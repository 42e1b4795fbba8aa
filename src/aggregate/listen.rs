//! `subscriptions/listen` (2026-07-28) over several upstreams: the agent's one long POST
//! becomes one to every upstream it may use, each asked only for its own resources (URIs back
//! in the upstream's names, each authorized as a read would be), and their streams are merged
//! into the agent's (see [`super::stream::Listen`]). The subscription id is the agent's
//! request id on every stream, so the notifications need no rewriting beyond their URIs.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::http::conn::Conn;
use crate::mcp::envelope::Message;
use crate::mcp::jsonrpc;
use crate::mcp::session::MultiSession;
use crate::policy::decide::{self, Decision, Target};
use crate::reply::Reply;
use crate::upstream::client::{UpResponse, join_all, send};

use super::names::unscope_uri;
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
    // Each subscribed resource at its upstream, in the upstream's own URI.
    let mut resources: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
    if let Some(subscriptions) = filter.get("resourceSubscriptions") {
        let Some(list) = subscriptions.as_array() else {
            return write(
                req,
                client,
                malformed("resourceSubscriptions must be a list of URIs"),
            )
            .await;
        };
        for uri in list {
            let Some(uri) = uri.as_str() else {
                return write(
                    req,
                    client,
                    malformed("resourceSubscriptions must be a list of URIs"),
                )
                .await;
            };
            let unknown = || {
                denied(
                    m.id,
                    "unknown resource",
                    &format!("unknown resource {uri:?}"),
                    None,
                )
            };
            let Some((i, original)) = unscope_uri(uri)
                .and_then(|(up, u)| Some((req.index_of(up)?, u)))
                .filter(|&(i, _)| req.may_use(i))
            else {
                return write(req, client, unknown()).await;
            };
            if let (Some(p), Some(a)) = (req.policy, req.agent)
                && let Decision::Deny { rule, reason } =
                    decide::authorize(p, a, i, &Target::Resource(original))
            {
                return write(req, client, denied(m.id, &rule, &reason, Some(i))).await;
            }
            resources
                .entry(i)
                .or_default()
                .push(Value::String(original.to_owned()));
        }
    }
    let targets = joined(req, session);
    let bodies: Vec<Vec<u8>> = targets
        .iter()
        .map(|(i, _)| {
            let mut own = body.clone();
            if let Some(Value::Object(n)) = own
                .get_mut("params")
                .and_then(|p| p.get_mut("notifications"))
            {
                match resources.get(i) {
                    Some(uris) => {
                        n.insert("resourceSubscriptions".into(), Value::Array(uris.clone()));
                    }
                    None => {
                        n.remove("resourceSubscriptions");
                    }
                }
            }
            Value::Object(own).to_string().into_bytes()
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
        return write(req, client, Reply::json(200, body)).await;
    }
    let id = serde_json::from_slice(&id).unwrap_or(Value::Null);
    merge(req, client, streams, Some(Listen { id })).await
}
