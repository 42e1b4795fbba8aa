//! Tasks on the aggregate endpoint: a task-augmented `tools/call` creates the task on one
//! upstream, and its id reaches the agent mapped as server-request ids are
//! (`sg:<upstream>:<id as JSON>`, [`super::names::map_id`]), so ids of two upstreams never
//! collide and every later `tasks/get`, `tasks/result`, `tasks/cancel` or `tasks/update` goes to
//! the upstream that created the task, with its own id spliced back. `tasks/list` asks every
//! upstream of the session that advertised tasks and merges the lists, paged with a cursor that
//! carries each upstream's own. The 2026-07-28 tasks extension (a call answered with
//! `resultType: "task"` and a top-level `taskId`, `tasks/get` carrying the final result or the
//! input requests, `tasks/update`, `notifications/tasks`, `taskIds` in a subscription) is
//! mapped the same way (see [`super::names`] and [`super::listen`]).

use serde_json::{Map, Value};

use crate::http::conn::Conn;
use crate::mcp::caps;
use crate::mcp::envelope::Message;
use crate::mcp::jsonrpc;
use crate::mcp::session::MultiSession;
use crate::reply::Reply;
use crate::upstream::client::join_all;

use super::listing::{ask, list_body, targets};
use super::names::{encode_cursor, map_task, unmap_task};
use super::request::{Fut, Outcome, Request, write};
use super::routed::forward;
use super::session::{caps_of, joined};

/// `tasks/get`, `tasks/result`, `tasks/cancel`, `tasks/update` (to the task's upstream) and
/// `tasks/list` (merged).
pub(super) async fn task(
    req: &Request<'_>,
    client: &mut Conn,
    session: &MultiSession,
    m: &Message<'_>,
) -> Result<Outcome, Outcome> {
    let method = m.method.unwrap_or_default();
    if method == "tasks/list" {
        let reply = list(req, session, m).await;
        return write(req, client, reply).await;
    }
    let unknown = |why: &str| {
        let body = jsonrpc::error_body(m.id, jsonrpc::INVALID_PARAMS, why);
        Reply::json(200, body)
    };
    let Some(range) = super::json::locate(&req.body, &["params", "taskId"]) else {
        return write(req, client, unknown("params.taskId is required")).await;
    };
    let mapped = serde_json::from_slice::<String>(&req.body[range.0..range.1]).ok();
    let owner = req.owner();
    let found = mapped
        .as_deref()
        .and_then(|t| unmap_task(&owner, t))
        .and_then(|(up, id)| {
            let i = req.index_of(up).filter(|&i| req.may_use(i))?;
            Some((i, id))
        });
    let Some((i, original)) = found else {
        return write(req, client, unknown("unknown task")).await;
    };
    let mut with = Vec::with_capacity(original.len() + 2);
    jsonrpc::write_json_string(&original, &mut with);
    let body = super::json::splice(&req.body, range, &with);
    forward(req, client, session, m, i, &body).await
}

/// `tasks/list`: every upstream of the session that advertised tasks (or whose capabilities
/// were not kept), their tasks with mapped ids, in one list paged like the other lists (the
/// cursor carries each upstream's own).
async fn list(req: &Request<'_>, session: &MultiSession, m: &Message<'_>) -> Reply {
    let cursor = super::json::locate(&req.body, &["params", "cursor"])
        .and_then(|(a, b)| serde_json::from_slice::<String>(&req.body[a..b]).ok());
    let Some(mut targets) = targets(req, cursor.as_deref()) else {
        let body = jsonrpc::error_body(m.id, jsonrpc::INVALID_PARAMS, "invalid cursor");
        return Reply::json(200, body);
    };
    // Only upstreams where this agent has a session of its own: where the upstream cannot
    // tell agents apart (no session), its list would hold other agents' tasks.
    let own: Vec<usize> = joined(req, session)
        .into_iter()
        .filter(|(_, sid)| !sid.is_empty())
        .map(|(i, _)| i)
        .collect();
    targets
        .retain(|(i, _)| own.contains(i) && caps::offers(caps_of(req, session, *i), caps::TASKS));
    let owner = req.owner();
    let mut id_json = Vec::new();
    match m.id {
        Some(id) => id.write_json(&mut id_json),
        None => id_json.extend_from_slice(b"null"),
    }
    let id_text = String::from_utf8_lossy(&id_json).into_owned();
    let futures: Vec<Fut<'_, Result<Value, Reply>>> = targets
        .iter()
        .map(|(i, cursor)| {
            let body = list_body(req, &id_text, "tasks/list", cursor.as_ref());
            Box::pin(ask(req, session, *i, "tasks/list", body)) as Fut<'_, _>
        })
        .collect();
    let mut tasks = Vec::new();
    let mut next = Map::new();
    let mut failures = Vec::new();
    for ((i, _), result) in targets.iter().zip(join_all(futures).await) {
        let up = req.upstream_name(*i);
        match result {
            Ok(result) => {
                for mut t in result["tasks"].as_array().cloned().unwrap_or_default() {
                    if let Some(Value::String(id)) = t.get_mut("taskId") {
                        *id = map_task(&owner, up, id);
                    }
                    tasks.push(t);
                }
                if let Some(c) = result.get("nextCursor").filter(|c| !c.is_null()) {
                    next.insert(up.to_owned(), c.clone());
                }
            }
            Err(e) => {
                req.note_failure(*i, e.message());
                failures.push(e.message().to_owned());
            }
        }
    }
    if req.core.config.aggregate_fail_closed && !failures.is_empty() {
        let r = Reply::error(
            502,
            jsonrpc::UPSTREAM_UNAVAILABLE,
            format!("tasks/list failed: {}", failures.join("; ")),
        );
        let mut r = r.for_id(m.id);
        r.status = 200;
        return r;
    }
    let mut result = serde_json::json!({ "tasks": tasks });
    if !next.is_empty() {
        result["nextCursor"] = Value::String(encode_cursor(&next));
    }
    let mut out = b"{\"jsonrpc\":\"2.0\",\"id\":".to_vec();
    out.extend_from_slice(&id_json);
    out.extend_from_slice(b",\"result\":");
    out.extend_from_slice(result.to_string().as_bytes());
    out.push(b'}');
    Reply::json(200, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_are_bound_to_their_upstream_and_their_agent() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mapped = map_task(&a, "ev", "t:1");
        assert!(mapped.starts_with("sgt:ev:"), "{mapped}");
        assert_eq!(unmap_task(&a, &mapped), Some(("ev", "t:1".to_owned())));
        assert_eq!(unmap_task(&b, &mapped), None, "another agent's id");
        let forged = mapped.replacen("sgt:ev:", "sgt:gh:", 1);
        assert_eq!(unmap_task(&a, &forged), None, "moved to another upstream");
        assert_eq!(unmap_task(&a, "t-1"), None);
        assert_eq!(unmap_task(&a, "sg:ev:\"t-1\""), None);
    }
}
