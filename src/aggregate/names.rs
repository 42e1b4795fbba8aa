//! How upstream names, resource URIs, server request ids and list cursors appear to the
//! agent, and the rewrite of an upstream's messages into those forms.

use serde_json::{Map, Value};

/// The longest tool or prompt name the specification allows.
pub const MAX_NAME: usize = 128;
/// The resource URI scheme of the aggregate endpoint.
pub(super) const URI_SCHEME: &str = "scopegate://";
/// The prefix of server request ids as the agent sees them.
pub(super) const ID_PREFIX: &str = "sg:";

/// The name an item is exposed under: `<upstream><sep><name>`, or, past the specification's
/// 128 characters, cut to fit and ended by `~` and 8 hex digits of the name's SHA-256 (the
/// call then finds the original by listing that upstream's items again).
pub fn exposed_name(upstream: &str, sep: &str, name: &str) -> String {
    let full = format!("{upstream}{sep}{name}");
    if full.len() <= MAX_NAME {
        return full;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut suffix = String::from("~");
    for b in &digest.as_ref()[..4] {
        suffix.push_str(&format!("{b:02x}"));
    }
    let mut keep = MAX_NAME - suffix.len();
    while !full.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &full[..keep])
}

pub(super) fn scoped_uri(upstream: &str, uri: &str) -> String {
    format!("{URI_SCHEME}{upstream}/{uri}")
}

/// `scopegate://<upstream>/<uri>` -> (upstream, uri).
pub(super) fn unscope_uri(uri: &str) -> Option<(&str, &str)> {
    uri.strip_prefix(URI_SCHEME)?.split_once('/')
}

/// Our cursor: base64url of a JSON object `{upstream: its cursor}` for the upstreams with more.
pub(super) fn encode_cursor(cursors: &Map<String, Value>) -> String {
    crate::token::base64url(Value::Object(cursors.clone()).to_string().as_bytes())
}

pub(super) fn decode_cursor(cursor: &str) -> Option<Map<String, Value>> {
    let raw = crate::token::base64url_decode(cursor.as_bytes())?;
    match serde_json::from_slice(&raw).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// How messages from an upstream are rewritten for the agent.
pub(super) struct Rewrite {
    pub(super) upstream: String,
    /// The agent's owner secret ([`crate::mcp::session::SessionKeys::owner`]): the task ids
    /// it is given are bound to it ([`map_task`]).
    pub(super) owner: [u8; 32],
    /// What the answer is a result of, for the resource URIs in it.
    pub(super) answer: Answer,
}

/// The request an upstream's answer answers, as far as rewriting URIs is concerned.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// resources/read: its contents' URIs are scoped.
    Read,
    /// tools/call: `resource_link` and embedded `resource` blocks of its content are scoped.
    Call,
    /// prompts/get: the same blocks in its messages.
    Prompt,
    /// tasks/get, tasks/cancel, tasks/update: the task's id; tasks/result: the call's result.
    Task,
    Other,
}

impl Answer {
    pub(super) fn of(method: &str) -> Answer {
        match method {
            "resources/read" => Answer::Read,
            "tools/call" => Answer::Call,
            "prompts/get" => Answer::Prompt,
            "tasks/get" | "tasks/cancel" | "tasks/update" | "tasks/result" => Answer::Task,
            _ => Answer::Other,
        }
    }
}

/// The task id agent `owner` sees for upstream `up`'s task `id`: `sgt:<up>:<tag>:<id as JSON>`,
/// the tag 12 bytes of HMAC-SHA256 of the rest under the agent's owner secret. Ids of two
/// upstreams never collide, and an id is good only for the agent it was given to: one agent
/// cannot follow, cancel or answer another's task even where the upstream cannot tell agents
/// apart (sessionless requests, an upstream without sessions).
pub(super) fn map_task(owner: &[u8; 32], up: &str, id: &str) -> String {
    let json = Value::String(id.to_owned()).to_string();
    format!("sgt:{up}:{}:{json}", task_tag(owner, up, &json))
}

/// The upstream and its own task id behind a task id agent `owner` was given; `None` for any
/// other string, an id given to another agent included.
pub(super) fn unmap_task<'a>(owner: &[u8; 32], mapped: &'a str) -> Option<(&'a str, String)> {
    let rest = mapped.strip_prefix("sgt:")?;
    let (up, rest) = rest.split_once(':')?;
    let (tag, json) = rest.split_once(':')?;
    let expected = task_tag(owner, up, json);
    // Compared in full whatever the first difference (no timing hint at the tag).
    let same = tag.len() == expected.len()
        && tag
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return None;
    }
    Some((up, serde_json::from_str::<String>(json).ok()?))
}

fn task_tag(owner: &[u8; 32], up: &str, json: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, owner);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(up.as_bytes());
    ctx.update(b"\0");
    ctx.update(json.as_bytes());
    crate::token::base64url(&ctx.sign().as_ref()[..12])
}

impl Rewrite {
    /// Maps the task id at `v` (a string) to the id the agent sees.
    fn map_task_id(&self, v: Option<&mut Value>) -> bool {
        match v {
            Some(Value::String(id)) => {
                *id = map_task(&self.owner, &self.upstream, id);
                true
            }
            _ => false,
        }
    }

    /// Maps the related-task id in a message's `_meta` (a server request or a result that
    /// belongs to a task).
    fn map_related_task(&self, holder: Option<&mut Value>) -> bool {
        let related = holder
            .and_then(|h| h.get_mut("_meta"))
            .and_then(|m| m.get_mut("io.modelcontextprotocol/related-task"))
            .and_then(|r| r.get_mut("taskId"));
        self.map_task_id(related)
    }
}

/// Scopes the URI of a content block that names a resource: a `resource_link`'s `uri`, an
/// embedded `resource`'s `resource.uri`. So an agent following a link a tool returned reads
/// it through the same upstream.
fn scope_block(upstream: &str, block: &mut Value) -> bool {
    let uri = match block.get("type").and_then(Value::as_str) {
        Some("resource_link") => block.get_mut("uri"),
        Some("resource") => block.get_mut("resource").and_then(|r| r.get_mut("uri")),
        _ => None,
    };
    match uri {
        Some(Value::String(uri)) => {
            *uri = scoped_uri(upstream, uri);
            true
        }
        _ => false,
    }
}

impl Rewrite {
    /// Server requests get collision-free ids; resource URIs get the aggregate scheme. Returns
    /// the bytes unchanged when nothing needed rewriting.
    pub(super) fn apply(&self, data: &[u8]) -> Vec<u8> {
        let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
            return data.to_vec();
        };
        let changed = match &mut v {
            Value::Array(list) => list.iter_mut().fold(false, |c, m| self.one(m) | c),
            m => self.one(m),
        };
        if changed {
            v.to_string().into_bytes()
        } else {
            data.to_vec()
        }
    }

    pub(super) fn one(&self, m: &mut Value) -> bool {
        let Value::Object(obj) = m else {
            return false;
        };
        let method = obj.get("method").and_then(Value::as_str).map(str::to_owned);
        let mut changed = false;
        match method.as_deref() {
            Some(method) => {
                if let Some(id) = obj.get_mut("id") {
                    *id = Value::String(map_id(&self.upstream, id));
                    changed = true;
                    // A server request may ask the agent for progress on its own token.
                    if let Some(token) = obj
                        .get_mut("params")
                        .and_then(|p| p.get_mut("_meta"))
                        .and_then(|m| m.get_mut("progressToken"))
                    {
                        *token = Value::String(map_id(&self.upstream, token));
                    }
                }
                changed |= self.map_related_task(obj.get_mut("params"));
                let params = obj.get_mut("params");
                match (method, params) {
                    // 2025-11-25's status notification; the 2026-07-28 extension's.
                    (
                        "notifications/tasks/status" | "notifications/tasks",
                        Some(Value::Object(p)),
                    ) => {
                        changed |= self.map_task_id(p.get_mut("taskId"));
                    }
                    ("notifications/cancelled", Some(Value::Object(p))) => {
                        if let Some(id) = p.get_mut("requestId") {
                            *id = Value::String(map_id(&self.upstream, id));
                            changed = true;
                        }
                    }
                    ("notifications/resources/updated", Some(Value::Object(p))) => {
                        if let Some(Value::String(uri)) = p.get_mut("uri") {
                            *uri = scoped_uri(&self.upstream, uri);
                            changed = true;
                        }
                    }
                    _ => {}
                }
            }
            None => {
                let up = &self.upstream;
                let result = obj.get_mut("result");
                match (self.answer, result) {
                    (Answer::Read, Some(r)) => {
                        if let Some(Value::Array(contents)) = r.get_mut("contents") {
                            for c in contents {
                                if let Some(Value::String(uri)) = c.get_mut("uri") {
                                    *uri = scoped_uri(up, uri);
                                    changed = true;
                                }
                            }
                        }
                    }
                    (Answer::Call | Answer::Task, Some(r)) => {
                        if let Some(Value::Array(blocks)) = r.get_mut("content") {
                            for b in blocks {
                                changed |= scope_block(up, b);
                            }
                        }
                        // A task-augmented call's CreateTaskResult (2025-11-25: `task.taskId`;
                        // the 2026-07-28 extension: `resultType: "task"` and a top-level
                        // `taskId`); a task's own state.
                        changed |=
                            self.map_task_id(r.get_mut("task").and_then(|t| t.get_mut("taskId")));
                        let created = r.get("resultType").and_then(Value::as_str) == Some("task");
                        if self.answer == Answer::Task || created {
                            changed |= self.map_task_id(r.get_mut("taskId"));
                        }
                        // A finished task's result (2026-07-28 tasks/get) names resources too.
                        if self.answer == Answer::Task
                            && let Some(Value::Array(blocks)) =
                                r.get_mut("result").and_then(|x| x.get_mut("content"))
                        {
                            for b in blocks {
                                changed |= scope_block(up, b);
                            }
                        }
                        changed |= self.map_related_task(Some(r));
                    }
                    (Answer::Prompt, Some(r)) => {
                        if let Some(Value::Array(messages)) = r.get_mut("messages") {
                            for m in messages {
                                if let Some(b) = m.get_mut("content") {
                                    changed |= scope_block(up, b);
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        changed
    }
}

/// `sg:<upstream>:<id as JSON>`: the id a server request gets on the aggregate endpoint.
pub fn map_id(upstream: &str, id: &Value) -> String {
    format!("{ID_PREFIX}{upstream}:{id}")
}

/// The upstream and original id (as JSON text) behind a mapped id.
pub fn unmap_id(id: &str) -> Option<(&str, &str)> {
    id.strip_prefix(ID_PREFIX)?.split_once(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: [u8; 32] = [7; 32];
    use serde_json::{Map, json};

    #[test]
    fn long_names_are_cut_to_128_with_a_hash() {
        assert_eq!(exposed_name("gh", "__", "create"), "gh__create");
        let long = "x".repeat(200);
        let e = exposed_name("gh", "__", &long);
        assert_eq!(e.len(), MAX_NAME);
        assert!(e.starts_with("gh__xxx"));
        let (_, hash) = e.rsplit_once('~').unwrap();
        assert_eq!(hash.len(), 8);
        assert_ne!(e, exposed_name("gh", "__", &"x".repeat(201)));
    }

    #[test]
    fn server_request_ids_map_and_unmap() {
        let id = map_id("jira", &json!(0));
        assert_eq!(id, "sg:jira:0");
        assert_eq!(unmap_id(&id), Some(("jira", "0")));
        let id = map_id("gh", &json!("a:b"));
        assert_eq!(unmap_id(&id), Some(("gh", "\"a:b\"")));
        assert_eq!(unmap_id("7"), None);
    }

    #[test]
    fn rewrite_maps_server_requests_and_resource_uris_only() {
        let r = Rewrite {
            upstream: "gh".into(),
            owner: OWNER,
            answer: Answer::Other,
        };
        let progress = br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}}"#;
        assert_eq!(r.apply(progress), progress.to_vec());
        let response = br#"{"jsonrpc":"2.0","id":5,"result":{}}"#;
        assert_eq!(r.apply(response), response.to_vec());
        let sampling: Value = serde_json::from_slice(
            &r.apply(br#"{"jsonrpc":"2.0","id":0,"method":"sampling/createMessage","params":{}}"#),
        )
        .unwrap();
        assert_eq!(sampling["id"], "sg:gh:0");
        let asks: Value = serde_json::from_slice(&r.apply(
            br#"{"jsonrpc":"2.0","id":"x","method":"elicitation/create","params":{"_meta":{"progressToken":5}}}"#,
        ))
        .unwrap();
        assert_eq!(asks["id"], "sg:gh:\"x\"");
        assert_eq!(asks["params"]["_meta"]["progressToken"], "sg:gh:5");
        let updated: Value = serde_json::from_slice(&r.apply(
            br#"{"jsonrpc":"2.0","method":"notifications/resources/updated","params":{"uri":"file:///a"}}"#,
        ))
        .unwrap();
        assert_eq!(updated["params"]["uri"], "scopegate://gh/file:///a");
        assert_eq!(
            unscope_uri("scopegate://gh/file:///a"),
            Some(("gh", "file:///a"))
        );
    }

    #[test]
    fn resource_links_and_embedded_resources_in_results_are_scoped() {
        let call = Rewrite {
            upstream: "fs".into(),
            owner: OWNER,
            answer: Answer::Call,
        };
        let out: Value = serde_json::from_slice(&call.apply(
            br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"file:///x"},
            {"type":"resource_link","uri":"file:///srv/a.txt","name":"a"},
            {"type":"resource","resource":{"uri":"demo://r/1","text":"t"}}]}}"#,
        ))
        .unwrap();
        let c = &out["result"]["content"];
        assert_eq!(c[0]["text"], "file:///x", "text is not a link");
        assert_eq!(c[1]["uri"], "scopegate://fs/file:///srv/a.txt");
        assert_eq!(c[2]["resource"]["uri"], "scopegate://fs/demo://r/1");
        let prompt = Rewrite {
            upstream: "fs".into(),
            owner: OWNER,
            answer: Answer::Prompt,
        };
        let out: Value = serde_json::from_slice(&prompt.apply(
            br#"{"jsonrpc":"2.0","id":2,"result":{"messages":[{"role":"user","content":{"type":"resource","resource":{"uri":"demo://r/2","text":"t"}}}]}}"#,
        ))
        .unwrap();
        assert_eq!(
            out["result"]["messages"][0]["content"]["resource"]["uri"],
            "scopegate://fs/demo://r/2"
        );
        // A result with no link passes as the bytes it was.
        let plain =
            br#"{"jsonrpc":"2.0","id":3,"result":{"content":[{"type":"text","text":"hi"}]}}"#;
        assert_eq!(call.apply(plain), plain.to_vec());
    }

    #[test]
    fn task_ids_are_mapped_wherever_they_appear() {
        let call = Rewrite {
            upstream: "ev".into(),
            owner: OWNER,
            answer: Answer::Call,
        };
        let created: Value = serde_json::from_slice(&call.apply(
            br#"{"jsonrpc":"2.0","id":1,"result":{"task":{"taskId":"t-1","status":"working"}}}"#,
        ))
        .unwrap();
        assert_eq!(
            created["result"]["task"]["taskId"],
            map_task(&OWNER, "ev", "t-1")
        );
        let get = Rewrite {
            upstream: "ev".into(),
            owner: OWNER,
            answer: Answer::Task,
        };
        let state: Value = serde_json::from_slice(&get.apply(
            br#"{"jsonrpc":"2.0","id":2,"result":{"taskId":"t-1","status":"completed","_meta":{"io.modelcontextprotocol/related-task":{"taskId":"t-1"}}}}"#,
        ))
        .unwrap();
        assert_eq!(state["result"]["taskId"], map_task(&OWNER, "ev", "t-1"));
        assert_eq!(
            state["result"]["_meta"]["io.modelcontextprotocol/related-task"]["taskId"],
            map_task(&OWNER, "ev", "t-1")
        );
        let status: Value = serde_json::from_slice(&Rewrite {
            upstream: "ev".into(),
            owner: OWNER,
            answer: Answer::Other,
        }
        .apply(br#"{"jsonrpc":"2.0","method":"notifications/tasks/status","params":{"taskId":"t-1","status":"working"}}"#))
        .unwrap();
        assert_eq!(status["params"]["taskId"], map_task(&OWNER, "ev", "t-1"));
    }

    #[test]
    fn the_2026_07_28_tasks_extension_is_mapped_too() {
        let rewrite = |answer, data: &[u8]| -> Value {
            let r = Rewrite {
                upstream: "ev".into(),
                owner: OWNER,
                answer,
            };
            serde_json::from_slice(&r.apply(data)).unwrap()
        };
        let created = rewrite(
            Answer::Call,
            br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"task","taskId":"t-1","status":"working"}}"#,
        );
        assert_eq!(created["result"]["taskId"], map_task(&OWNER, "ev", "t-1"));
        // A call result that only happens to have a `taskId` field is not a task.
        let plain = rewrite(
            Answer::Call,
            br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"complete","taskId":"x","content":[]}}"#,
        );
        assert_eq!(plain["result"]["taskId"], "x");
        let done = rewrite(
            Answer::Task,
            br#"{"jsonrpc":"2.0","id":2,"result":{"resultType":"complete","taskId":"t-1","status":"completed","result":{"content":[{"type":"resource_link","uri":"demo://r/1","name":"r"}]}}}"#,
        );
        assert_eq!(done["result"]["taskId"], map_task(&OWNER, "ev", "t-1"));
        assert_eq!(
            done["result"]["result"]["content"][0]["uri"],
            "scopegate://ev/demo://r/1"
        );
        let note = rewrite(
            Answer::Other,
            br#"{"jsonrpc":"2.0","method":"notifications/tasks","params":{"taskId":"t-1","status":"input_required","inputRequests":{}}}"#,
        );
        assert_eq!(note["params"]["taskId"], map_task(&OWNER, "ev", "t-1"));
    }

    #[test]
    fn cursors_round_trip() {
        let mut m = Map::new();
        m.insert("gh".into(), json!("abc"));
        m.insert("jira".into(), json!(2));
        assert_eq!(decode_cursor(&encode_cursor(&m)), Some(m));
        assert_eq!(decode_cursor("!!"), None);
    }
}
