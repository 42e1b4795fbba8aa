//! `server/discover` (2026-07-28) over several upstreams: the agent's probe goes to every
//! upstream it may use, and the answer is scopegate's own. Its versions are the handshake
//! revisions (the aggregate session joins any upstream with initialize) and the sessionless
//! ones that every upstream answered: one upstream without 2026-07-28 sends the agent to
//! initialize, where all of them work. Its capabilities are the union of the upstreams', its
//! caching hint private (what it lists depends on the agent) and as fresh as the least fresh.

use serde_json::{Map, Value, json};

use crate::mcp::envelope::Message;
use crate::mcp::jsonrpc;
use crate::mcp::modern;
use crate::reply::Reply;
use crate::upstream::client::{exchange, join_all};

use super::request::{Fut, Request, answered, fanout_failed, no_upstream};
use super::session::merge_capability;

/// An upstream's HTTP status and body, or why there was none.
type Probed = Result<(u16, Vec<u8>), Reply>;

/// What one upstream said to the probe.
enum Probe {
    /// A discover result.
    Answered(Value),
    /// The revision's "unsupported version" error, with the versions it supports.
    Versions(Vec<String>),
    /// Anything else (400, 404, "method not found"): a server of a handshake revision.
    Handshake,
}

pub(super) async fn discover(req: &Request<'_>, m: &Message<'_>) -> Reply {
    let reachable = req.reachable();
    if reachable.is_empty() {
        return no_upstream(m.id);
    }
    let futures: Vec<Fut<'_, Probed>> = reachable
        .iter()
        .map(|&i| {
            Box::pin(async move {
                let r = req.up_request("POST", &req.body, None);
                let (resp, body) = exchange(req.ups(), i, &r, req.fanout_deadline()).await?;
                let status = resp.status();
                resp.finish(req.ups());
                Ok((status, body))
            }) as Fut<'_, _>
        })
        .collect();
    let mut probes = Vec::new();
    let mut failures = Vec::new();
    for (&i, result) in reachable.iter().zip(join_all(futures).await) {
        match result {
            Ok((status, body)) => probes.push((req.upstream_name(i), classify(status, &body))),
            Err(e) => {
                req.note_failure(i, e.message());
                failures.push(e.message().to_owned());
            }
        }
    }
    if let Some(reply) = fanout_failed(req, m.id, "server/discover", probes.len(), &failures) {
        return reply;
    }
    let requested = super::json::locate(
        &req.body,
        &["params", "_meta", "io.modelcontextprotocol/protocolVersion"],
    )
    .and_then(|(a, b)| serde_json::from_slice::<String>(&req.body[a..b]).ok());
    match merge(&probes, requested.as_deref()) {
        Ok(result) => answered(m.id, &result),
        Err((supported, requested)) => {
            Reply::unsupported_version(supported, requested).for_id(m.id)
        }
    }
}

fn classify(status: u16, body: &[u8]) -> Probe {
    let Ok(Value::Object(mut answer)) = serde_json::from_slice::<Value>(body) else {
        return Probe::Handshake;
    };
    if status == 200
        && let Some(result) = answer.remove("result")
        && result.get("supportedVersions").is_some_and(Value::is_array)
    {
        return Probe::Answered(result);
    }
    let error = answer.get("error");
    if error.and_then(|e| e.get("code")).and_then(Value::as_i64)
        == Some(i64::from(jsonrpc::UNSUPPORTED_PROTOCOL_VERSION))
        && let Some(Value::Array(list)) = error.and_then(|e| e.pointer("/data/supported"))
    {
        return Probe::Versions(strings(list));
    }
    Probe::Handshake
}

fn strings(list: &[Value]) -> Vec<String> {
    list.iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

/// The merged result, or (when the agent asked for a sessionless revision that some upstream
/// lacks while all of them share another) the versions to offer in the revision's error.
fn merge(
    probes: &[(&str, Probe)],
    requested: Option<&str>,
) -> Result<Value, (Vec<String>, String)> {
    // The sessionless revisions every upstream serves.
    let mut shared: Option<Vec<String>> = None;
    let mut caps = Map::new();
    let mut instructions = Vec::new();
    let mut ttl: Option<u64> = None;
    for (name, probe) in probes {
        let versions = match probe {
            Probe::Answered(r) => {
                if let Some(Value::Object(c)) = r.get("capabilities") {
                    for (k, v) in c {
                        merge_capability(caps.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
                if let Some(text) = r.get("instructions").and_then(Value::as_str) {
                    instructions.push(format!("[{name}] {text}"));
                }
                let t = r.get("ttlMs").and_then(Value::as_u64).unwrap_or(0);
                ttl = Some(ttl.map_or(t, |cur| cur.min(t)));
                r.get("supportedVersions")
                    .and_then(Value::as_array)
                    .map(|l| strings(l))
                    .unwrap_or_default()
            }
            Probe::Versions(v) => v.clone(),
            Probe::Handshake => Vec::new(),
        };
        let sessionless: Vec<String> = versions
            .into_iter()
            .filter(|v| modern::is_modern(v.as_bytes()))
            .collect();
        shared = Some(match shared {
            None => sessionless,
            Some(cur) => cur
                .into_iter()
                .filter(|v| sessionless.contains(v))
                .collect(),
        });
    }
    let shared = shared.unwrap_or_default();
    let mut supported: Vec<String> = modern::HANDSHAKE.iter().map(|v| v.to_string()).collect();
    supported.extend(shared.iter().cloned());
    if let Some(r) = requested
        && modern::is_modern(r.as_bytes())
        && !shared.is_empty()
        && !shared.iter().any(|v| v == r)
    {
        return Err((supported, r.to_owned()));
    }
    let mut result = json!({
        "supportedVersions": supported,
        "capabilities": caps,
        "cacheScope": "private",
        "ttlMs": ttl.unwrap_or(0),
        "resultType": "complete",
        "_meta": {"io.modelcontextprotocol/serverInfo":
            {"name": "scopegate", "version": env!("CARGO_PKG_VERSION")}},
    });
    if !instructions.is_empty() {
        result["instructions"] = Value::String(instructions.join("\n"));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(versions: &[&str], caps: Value, ttl: u64) -> Probe {
        Probe::Answered(json!({"supportedVersions": versions, "capabilities": caps,
            "ttlMs": ttl, "cacheScope": "public", "resultType": "complete"}))
    }

    #[test]
    fn every_upstream_on_2026_07_28_offers_it() {
        let probes = [
            ("a", answered(&["2026-07-28"], json!({"tools": {}}), 60_000)),
            (
                "b",
                answered(&["2026-07-28"], json!({"prompts": {}}), 5_000),
            ),
        ];
        let r = merge(&probes, Some("2026-07-28")).unwrap();
        assert_eq!(
            r["supportedVersions"],
            json!(["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"])
        );
        assert_eq!(r["capabilities"], json!({"tools": {}, "prompts": {}}));
        assert_eq!(
            (r["ttlMs"].as_u64(), r["cacheScope"].as_str()),
            (Some(5_000), Some("private"))
        );
        assert_eq!(
            r["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
            "scopegate"
        );
    }

    #[test]
    fn one_upstream_of_a_handshake_revision_sends_the_agent_to_initialize() {
        let probes = [
            ("a", answered(&["2026-07-28"], json!({"tools": {}}), 0)),
            ("old", classify(400, br#"{"jsonrpc":"2.0","id":"server-error","error":{"code":-32600,"message":"Bad Request: Missing session ID"}}"#)),
        ];
        let r = merge(&probes, Some("2026-07-28")).unwrap();
        assert_eq!(
            r["supportedVersions"],
            json!(["2025-03-26", "2025-06-18", "2025-11-25"])
        );
    }

    #[test]
    fn a_sessionless_revision_not_shared_is_the_revisions_error() {
        let later = classify(
            400,
            br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32022,"message":"x","data":{"supported":["2026-07-28","2027-03-01"]}}}"#,
        );
        let probes = [("a", answered(&["2026-07-28"], json!({}), 0)), ("b", later)];
        let (supported, requested) = merge(&probes, Some("2027-03-01")).unwrap_err();
        assert_eq!(requested, "2027-03-01");
        assert_eq!(supported.last().map(String::as_str), Some("2026-07-28"));
    }
}
