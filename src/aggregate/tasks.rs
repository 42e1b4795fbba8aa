//! Tasks on the aggregate endpoint: a task-augmented `tools/call` creates the task on one
//! upstream, and its id reaches the agent mapped as server-request ids are
//! (`sg:<upstream>:<id as JSON>`, [`super::names::map_id`]), so ids of two upstreams never
//! collide and every later `tasks/get`, `tasks/result`, `tasks/cancel` or `tasks/update` goes to
//! the upstream that created the task, with its own id spliced back. `tasks/list` asks every
//! upstream of the session that advertised tasks and merges the lists (each upstream's first
//! page).

use serde_json::Value;

use crate::http::conn::Conn;
use crate::mcp::caps;
use crate::mcp::envelope::Message;
use crate::mcp::jsonrpc;
use crate::mcp::session::MultiSession;
use crate::reply::Reply;
use crate::upstream::client::{exchange, join_all};

use super::names::{map_id, unmap_id};
use super::request::{Fut, Outcome, Request, rpc_result, write};
use super::routed::forward;
use super::session::{caps_of, session_for};

/// The upstream and its own task id behind a task id the agent was given.
pub(super) fn unmap_task(mapped: &str) -> Option<(&str, String)> {
    let (up, original) = unmap_id(mapped)?;
    Some((up, serde_json::from_str::<String>(original).ok()?))
}

/// The task id the agent sees for upstream `up`'s task `id`.
pub(super) fn map_task(up: &str, id: &str) -> String {
    map_id(up, &Value::String(id.to_owned()))
}

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
    let found = mapped.as_deref().and_then(unmap_task).and_then(|(up, id)| {
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
/// were not kept), their tasks with mapped ids, in one list.
async fn list(req: &Request<'_>, session: &MultiSession, m: &Message<'_>) -> Reply {
    let targets: Vec<usize> = req
        .reachable()
        .into_iter()
        .filter(|&i| caps::offers(caps_of(req, session, i), caps::TASKS))
        .collect();
    let mut id_json = Vec::new();
    match m.id {
        Some(id) => id.write_json(&mut id_json),
        None => id_json.extend_from_slice(b"null"),
    }
    let body = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"tasks/list\"}}",
        String::from_utf8_lossy(&id_json)
    );
    let futures: Vec<Fut<'_, Result<Value, Reply>>> = targets
        .iter()
        .map(|&i| {
            let body = body.as_bytes();
            Box::pin(async move {
                let sid = session_for(req, session, i).await?;
                let r = req.up_request("POST", body, Some(&sid));
                let (resp, answer) = exchange(req.ups(), i, &r, req.fanout_deadline()).await?;
                let status = resp.status();
                resp.finish(req.ups());
                rpc_result(req, i, "tasks/list", status, &answer)
            }) as Fut<'_, _>
        })
        .collect();
    let mut tasks = Vec::new();
    for (&i, result) in targets.iter().zip(join_all(futures).await) {
        let up = req.upstream_name(i);
        match result {
            Ok(result) => {
                for mut t in result["tasks"].as_array().cloned().unwrap_or_default() {
                    if let Some(Value::String(id)) = t.get_mut("taskId") {
                        *id = map_task(up, id);
                    }
                    tasks.push(t);
                }
            }
            Err(e) => req.note_failure(i, e.message()),
        }
    }
    let mut out = b"{\"jsonrpc\":\"2.0\",\"id\":".to_vec();
    out.extend_from_slice(&id_json);
    out.extend_from_slice(b",\"result\":");
    out.extend_from_slice(serde_json::json!({ "tasks": tasks }).to_string().as_bytes());
    out.push(b'}');
    Reply::json(200, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_map_and_unmap() {
        let mapped = map_task("ev", "t:1");
        assert_eq!(mapped, "sg:ev:\"t:1\"");
        assert_eq!(unmap_task(&mapped), Some(("ev", "t:1".to_owned())));
        assert_eq!(unmap_task("t-1"), None);
        assert_eq!(unmap_task("sg:ev:7"), None, "a task id is a string");
    }
}
