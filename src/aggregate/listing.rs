//! Merged lists (tools, prompts, resources, templates) filtered by policy and paged with a
//! cursor that carries each upstream's own cursor; finding which upstream an exposed name is.

use serde_json::{Map, Value};

use crate::core::ListKey;
use crate::mcp::caps;
use crate::mcp::envelope::Message;
use crate::mcp::jsonrpc;
use crate::mcp::lists::ListKind;
use crate::mcp::session::MultiSession;
use crate::policy::decide;
use crate::reply::Reply;
use crate::upstream::client::{exchange, join_all};

use super::names::{MAX_NAME, decode_cursor, encode_cursor, exposed_name, scoped_uri};
use super::request::{Fut, Request, rpc_result};
use super::session::{caps_of, expired, not_expired, rejoin, session_for};

pub(super) async fn list(
    req: &Request<'_>,
    session: &MultiSession,
    m: &Message<'_>,
    kind: ListKind,
) -> Reply {
    let (method, key, item_key) = (kind.method(), kind.field(), kind.key());
    let params: Value = serde_json::from_slice::<Value>(&req.body)
        .ok()
        .and_then(|v| v.get("params").cloned())
        .unwrap_or(Value::Null);
    // Which upstreams to ask, each with its own cursor.
    let Some(mut targets) = targets(req, params.get("cursor").and_then(Value::as_str)) else {
        let body = jsonrpc::error_body(m.id, jsonrpc::INVALID_PARAMS, "invalid cursor");
        return Reply::json(200, body);
    };
    // Only upstreams that offer this kind are asked (those whose initialize answer the session
    // kept; the others are asked anyway): a tools-only server is not a failure on prompts/list.
    targets.retain(|(i, _)| caps::offers(caps_of(req, session, *i), kind.capability()));
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
            let body = list_body(req, &id_json, method, cursor.as_ref());
            Box::pin(page(req, session, *i, method, body)) as Fut<'_, _>
        })
        .collect();
    let results = join_all(futures).await;
    let mut items = Vec::new();
    let mut next = Map::new();
    let mut failures = Vec::new();
    let mut ttl: Option<u64> = None;
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
        if let Some(t) = result.get("ttlMs").and_then(Value::as_u64) {
            ttl = Some(ttl.map_or(t, |cur: u64| cur.min(t)));
        }
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
            let original = original.to_owned();
            let visible = match (req.policy, req.agent) {
                (Some(p), Some(a)) => decide::vet(p, a, i, kind, &mut item),
                _ => true,
            };
            if !visible {
                continue;
            }
            let exposed = match kind {
                ListKind::Tools | ListKind::Prompts => exposed_name(up, sep, &original),
                ListKind::Resources | ListKind::ResourceTemplates => scoped_uri(up, &original),
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
    if req.modern() {
        // The revision's caching hints: filtered for this agent, the list is private; merged,
        // it is fresh as long as its shortest-lived upstream list.
        result.insert("resultType".into(), "complete".into());
        result.insert("cacheScope".into(), "private".into());
        result.insert("ttlMs".into(), ttl.unwrap_or(0).into());
    }
    let body = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{id_json},\"result\":{}}}",
        Value::Object(result)
    );
    Reply::json(200, body.into_bytes())
}

/// One page of a list from upstream `i`: the result, `{}` when the upstream has no such list
/// (it said "method not found"), or why not. A result the upstream marked public is kept for
/// its TTL on this core (`core::ListCache`) and given to every agent asking for the same page
/// (each filtered by its own policy below). An expired upstream session is joined again and
/// the page asked again, once.
pub(super) async fn page(
    req: &Request<'_>,
    session: &MultiSession,
    i: usize,
    method: &'static str,
    body: String,
) -> Result<Value, Reply> {
    // A result the upstream let be shared, still fresh: no need to ask.
    let name = req.upstream_name(i);
    let key = ListKey {
        upstream: ListKey::upstream_of(&req.upstreams[i]),
        method,
        cursor: cursor_of(&body),
        version: req.version().unwrap_or_default().to_vec(),
        capabilities: capabilities_of(&body),
    };
    let (cache, metrics) = (&req.core.list_cache, &req.core.stats.metrics);
    if let Some(result) = cache.get(&key, name) {
        metrics.list_page(true);
        return Ok(result);
    }
    metrics.list_page(false);
    let epoch = cache.epoch(name);
    let (result, size) = ask_sized(req, session, i, method, body).await?;
    cache.put(key, name, epoch, size, &result);
    Ok(result)
}

/// The client capabilities in a list request scopegate wrote (2026-07-28 `_meta`), as JSON.
fn capabilities_of(body: &str) -> Vec<u8> {
    let path = [
        "params",
        "_meta",
        "io.modelcontextprotocol/clientCapabilities",
    ];
    super::json::locate(body.as_bytes(), &path)
        .map(|(a, b)| body.as_bytes()[a..b].to_vec())
        .unwrap_or_default()
}

/// The upstream cursor in a list request scopegate wrote, as JSON.
fn cursor_of(body: &str) -> Option<String> {
    let (a, b) = super::json::locate(body.as_bytes(), &["params", "cursor"])?;
    Some(body[a..b].to_owned())
}

/// Asks upstream `i` for one page (see [`page`]), never from the cache.
pub(super) async fn ask(
    req: &Request<'_>,
    session: &MultiSession,
    i: usize,
    method: &'static str,
    body: String,
) -> Result<Value, Reply> {
    ask_sized(req, session, i, method, body)
        .await
        .map(|(v, _)| v)
}

/// [`ask`], with the size of the answer as the upstream sent it.
async fn ask_sized(
    req: &Request<'_>,
    session: &MultiSession,
    i: usize,
    method: &'static str,
    body: String,
) -> Result<(Value, usize), Reply> {
    let sid = session_for(req, session, i).await?;
    let r = req.up_request("POST", body.as_bytes(), Some(&sid));
    let (mut resp, mut answer) = exchange(req.ups(), i, &r, req.fanout_deadline()).await?;
    if expired(resp.status(), &sid, &answer) {
        resp.finish(req.ups());
        let sid = rejoin(req, i, &sid).await?;
        let r = req.up_request("POST", body.as_bytes(), Some(&sid));
        (resp, answer) = exchange(req.ups(), i, &r, req.fanout_deadline()).await?;
        let status = resp.status();
        if expired(status, &sid, &answer) {
            resp.finish(req.ups());
            return Err(not_expired(req, i, status));
        }
    }
    let status = resp.status();
    resp.finish(req.ups());
    if not_offered(&answer) {
        // An upstream without this kind of list (one whose capabilities are not known, in a
        // sessionless request) has nothing to add; it has not failed.
        return Ok((Value::Object(Map::new()), 0));
    }
    rpc_result(req, i, method, status, &answer).map(|v| (v, answer.len()))
}

/// The upstreams a list request asks, each with its own cursor (from the agent's merged
/// cursor, or none: every upstream the agent may use). `None`: the cursor is not one of ours.
pub(super) fn targets(
    req: &Request<'_>,
    cursor: Option<&str>,
) -> Option<Vec<(usize, Option<Value>)>> {
    let Some(c) = cursor else {
        return Some(req.reachable().into_iter().map(|i| (i, None)).collect());
    };
    let cursors = decode_cursor(c)?;
    Some(
        cursors
            .into_iter()
            .filter_map(|(name, cur)| {
                let i = req.index_of(&name).filter(|&i| req.may_use(i))?;
                Some((i, Some(cur)))
            })
            .collect(),
    )
}

/// A list request for one upstream, with its own cursor; in 2026-07-28 with the agent's
/// `_meta` (its revision and capabilities travel with every request).
pub(super) fn list_body(
    req: &Request<'_>,
    id_json: &str,
    method: &str,
    cursor: Option<&Value>,
) -> String {
    let mut params = Vec::new();
    if let Some(meta) = req.meta().filter(|_| req.modern()) {
        params.push(format!("\"_meta\":{}", String::from_utf8_lossy(meta)));
    }
    if let Some(c) = cursor {
        params.push(format!("\"cursor\":{c}"));
    }
    let mut body = format!("{{\"jsonrpc\":\"2.0\",\"id\":{id_json},\"method\":\"{method}\"");
    if !params.is_empty() {
        body.push_str(&format!(",\"params\":{{{}}}", params.join(",")));
    }
    body.push('}');
    body
}

/// Whether an answer is the JSON-RPC error "method not found".
pub(super) fn not_offered(answer: &[u8]) -> bool {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(answer) else {
        return false;
    };
    m.get("error")
        .and_then(|e| e.get("code"))
        .and_then(Value::as_i64)
        == Some(i64::from(jsonrpc::METHOD_NOT_FOUND))
}

/// The upstream and original name behind an exposed tool or prompt name.
pub(super) async fn resolve_name(
    req: &Request<'_>,
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
        let body = list_body(req, "0", method, cursor.as_ref());
        let r = req.up_request("POST", body.as_bytes(), Some(&sid));
        let (resp, answer) = exchange(req.ups(), i, &r, req.fanout_deadline())
            .await
            .ok()?;
        resp.finish(req.ups());
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

/// With integrity checks on, a call of a tool (or a prompt) of upstream `i` that no list has
/// shown yet: the upstream's whole list is walked on the agent's session and every definition
/// judged ([`crate::policy::integrity::Integrity::walk`]). A failure is logged; the call is
/// then refused as not listed.
pub(super) async fn list_to_vet(
    req: &Request<'_>,
    session: &MultiSession,
    i: usize,
    kind: crate::integrity::Kind,
) {
    let Some(p) = req.policy else {
        return;
    };
    let walked = match session_for(req, session, i).await {
        Ok(sid) => {
            // The body is each page's own (and its routing headers the walk's).
            let base = req.up_request("POST", b"", Some(&sid));
            // 2026-07-28 requests carry the agent's revision and capabilities; an older
            // revision's `_meta` is the call's own (a progress token).
            let meta = req.meta().filter(|_| req.modern());
            let deadline = req.fanout_deadline();
            p.integrity
                .walk(req.ups(), i, kind, &base, meta, deadline)
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = walked {
        req.note_failure(i, e.message());
    }
}
