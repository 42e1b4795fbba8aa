//! Where each message on a stdio server's pipes goes. A stdio server is one JSON-RPC peer, and
//! several agent sessions may share it (`share = true`), so every id that crosses is mapped:
//! the agents' request ids (and progress tokens) are replaced by ids the router hands out before
//! a request reaches the child, and put back on the answer; the child's own requests (sampling,
//! elicitation, roots) get agent-facing ids `sg-<n>`, and the agent's answer goes back to the
//! child with the child's id. No two sessions' ids can collide in the child, and an answer can
//! reach only the session that asked. Pure bookkeeping: no I/O, so every rule is a unit test.

use std::collections::HashMap;

use serde_json::Value;

/// An agent session using the process (the bridge's own number for it).
pub type SessionId = u64;

/// Where a message from the child goes.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// To this session, as the answer to its request (the message, with the agent's id back).
    Answer(SessionId, Value),
    /// To this session's stream (a notification or a request for the agent, ids mapped).
    Stream(SessionId, Value),
    /// To every session of the process (a shared server's lists changed).
    Broadcast(Value),
    /// Nowhere: no session it can be attributed to (said why, for the log).
    Drop(&'static str),
    /// Back to the child: an error answer to its request that cannot be routed.
    Refuse(Value),
}

/// One process's routing tables.
#[derive(Debug, Default)]
pub struct Router {
    next: u64,
    /// The child sees request id `n`: whose request it is and the id the agent gave it.
    pending: HashMap<u64, (SessionId, Value)>,
    /// The child sees progress token `p<n>`: whose it is and the agent's token.
    tokens: HashMap<String, (SessionId, Value)>,
    /// The agent sees request id `sg-<n>`: the session asked and the child's own id.
    asked: HashMap<String, (SessionId, Value)>,
    /// Requests the agent cancelled: an answer that still comes is dropped quietly.
    cancelled: std::collections::HashSet<u64>,
    /// Whether several sessions share the process.
    shared: bool,
    /// The session of a process that is not shared.
    only: Option<SessionId>,
}

impl Router {
    pub fn new(shared: bool) -> Router {
        Router {
            shared,
            ..Router::default()
        }
    }

    fn fresh(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// A message from an agent's session, as the child should see it. `None`: nothing to
    /// send (an answer to a request this router never made, or already answered).
    pub fn from_agent(&mut self, session: SessionId, mut msg: Value) -> Option<Value> {
        if !self.shared {
            self.only.get_or_insert(session);
        }
        let is_request = msg.get("method").is_some() && msg.get("id").is_some();
        if is_request {
            let id = msg["id"].take();
            let n = self.fresh();
            msg["id"] = Value::from(n);
            if let Some(token) = msg.pointer_mut("/params/_meta/progressToken") {
                let ours = format!("p{n}");
                let theirs = std::mem::replace(token, Value::from(ours.clone()));
                self.tokens.insert(ours, (session, theirs));
            }
            self.pending.insert(n, (session, id));
            return Some(msg);
        }
        if msg.get("method").is_none() {
            // An answer to a request of the child's: only the session that was asked.
            let key = msg.get("id")?.as_str()?.to_owned();
            let (asker, child_id) = self.asked.get(&key)?;
            if *asker != session {
                return None;
            }
            let child_id = child_id.clone();
            self.asked.remove(&key);
            msg["id"] = child_id;
            return Some(msg);
        }
        // A notification. A cancellation names the agent's request id: the child's instead; the
        // request is done (a server does not answer a cancelled request).
        if msg["method"] == "notifications/cancelled" {
            let theirs = msg.pointer("/params/requestId")?.clone();
            let n = self
                .pending
                .iter()
                .find(|(_, (s, id))| *s == session && *id == theirs)
                .map(|(n, _)| *n)?;
            msg["params"]["requestId"] = Value::from(n);
            self.abandon(n);
        }
        // Progress for a request of the child's: only from the session it asked.
        if msg["method"] == "notifications/progress"
            && !self.asked.values().any(|(s, _)| *s == session)
        {
            return None;
        }
        Some(msg)
    }

    /// A message from the child: where it goes, ids put back.
    pub fn from_child(&mut self, mut msg: Value) -> Route {
        let has_method = msg.get("method").is_some();
        match (has_method, msg.get("id").cloned()) {
            // An answer to one of the agents' requests.
            (false, Some(id)) => {
                let Some(n) = id.as_u64() else {
                    return Route::Drop("an answer with an id the router never gave");
                };
                let Some((session, theirs)) = self.pending.remove(&n) else {
                    if self.cancelled.remove(&n) {
                        return Route::Drop("an answer to a cancelled request");
                    }
                    return Route::Drop("an answer to no pending request");
                };
                self.tokens.remove(&format!("p{n}"));
                msg["id"] = theirs;
                Route::Answer(session, msg)
            }
            // A request of the child's, for an agent.
            (true, Some(child_id)) => match self.owner() {
                Some(session) => {
                    let key = format!("sg-{}", self.fresh());
                    self.asked.insert(key.clone(), (session, child_id));
                    msg["id"] = Value::from(key);
                    Route::Stream(session, msg)
                }
                None => Route::Refuse(serde_json::json!({
                    "jsonrpc": "2.0",
                    "id": child_id,
                    "error": {
                        "code": -32603,
                        "message": "scopegate: this server is shared by several sessions; its requests cannot be routed to one agent (run it per session)"
                    }
                })),
            },
            // A notification: progress by its token, the rest to the only session, if one.
            (true, None) => {
                // The child gives up a request it made of an agent: tell the session asked,
                // in the ids it knows.
                if msg["method"] == "notifications/cancelled" {
                    let child_id = msg.pointer("/params/requestId").cloned();
                    let key = self
                        .asked
                        .iter()
                        .find(|(_, (_, id))| Some(id) == child_id.as_ref())
                        .map(|(k, (s, _))| (k.clone(), *s));
                    let Some((key, session)) = key else {
                        return Route::Drop("a cancellation of no request made of an agent");
                    };
                    self.asked.remove(&key);
                    msg["params"]["requestId"] = Value::from(key);
                    return Route::Stream(session, msg);
                }
                if let Some(token) = msg.pointer("/params/progressToken").cloned() {
                    let Some((session, theirs)) =
                        token.as_str().and_then(|t| self.tokens.get(t)).cloned()
                    else {
                        return Route::Drop("progress for no pending request");
                    };
                    msg["params"]["progressToken"] = theirs;
                    return Route::Stream(session, msg);
                }
                if self.shared {
                    let method = msg["method"].as_str().unwrap_or_default();
                    // A list every agent sees changed: all of them hear it.
                    if method.ends_with("/list_changed") {
                        return Route::Broadcast(msg);
                    }
                    // A log line of a shared server is nobody's in particular.
                    if method == "notifications/message" {
                        return Route::Drop("a log message of a shared server names no session");
                    }
                }
                match self.owner() {
                    Some(session) => Route::Stream(session, msg),
                    None => Route::Drop("a notification of a shared server names no session"),
                }
            }
            (false, None) => Route::Drop("not a JSON-RPC message"),
        }
    }

    /// The one session a message without an id belongs to: the process's own session, or,
    /// when shared, the only session with a request in flight.
    fn owner(&self) -> Option<SessionId> {
        if !self.shared {
            return self.only;
        }
        let mut sessions = self.pending.values().map(|(s, _)| *s);
        let first = sessions.next()?;
        sessions.all(|s| s == first).then_some(first)
    }

    /// Request `n` (the child's id for it) will not be answered to anyone: cancelled, or given
    /// up by the bridge. Its answer, if one still comes, is dropped.
    pub fn abandon(&mut self, n: u64) {
        if self.pending.remove(&n).is_some() {
            self.tokens.remove(&format!("p{n}"));
            self.cancelled.insert(n);
        }
    }

    /// A session ended: its pending requests and tokens are forgotten (their answers, if any
    /// come, are dropped), and the child's requests to it go unanswered.
    pub fn forget(&mut self, session: SessionId) {
        self.pending.retain(|_, (s, _)| *s != session);
        self.tokens.retain(|_, (s, _)| *s != session);
        self.asked.retain(|_, (s, _)| *s != session);
    }

    /// Every request still waiting for the child, forgotten: (the child's id, the session,
    /// the agent's id), for the error answers of a process that ended.
    pub fn drain(&mut self) -> Vec<(u64, SessionId, Value)> {
        self.tokens.clear();
        self.asked.clear();
        self.pending
            .drain()
            .map(|(n, (session, id))| (n, session, id))
            .collect()
    }

    /// Requests the child has not answered yet.
    /// Whether request `n` (the child's id) still waits for its answer.
    pub fn is_pending(&self, n: u64) -> bool {
        self.pending.contains_key(&n)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_mapped_both_ways_and_never_collide() {
        let mut r = Router::new(true);
        // Two sessions, the same id.
        let a = r
            .from_agent(1, json!({"jsonrpc":"2.0","id":7,"method":"tools/call"}))
            .unwrap();
        let b = r
            .from_agent(2, json!({"jsonrpc":"2.0","id":7,"method":"tools/call"}))
            .unwrap();
        assert_ne!(a["id"], b["id"]);
        // Answers come back to the right session with the agent's id.
        let to_b = r.from_child(json!({"jsonrpc":"2.0","id":b["id"],"result":{"x":2}}));
        assert_eq!(
            to_b,
            Route::Answer(2, json!({"jsonrpc":"2.0","id":7,"result":{"x":2}}))
        );
        let to_a = r.from_child(json!({"jsonrpc":"2.0","id":a["id"],"result":{"x":1}}));
        assert!(matches!(to_a, Route::Answer(1, _)));
        // A second answer to the same id goes nowhere.
        let again = r.from_child(json!({"jsonrpc":"2.0","id":a["id"],"result":{}}));
        assert!(matches!(again, Route::Drop(_)));
        assert_eq!(r.in_flight(), 0);
        // String ids are the agent's business: kept as they were.
        let s = r
            .from_agent(1, json!({"jsonrpc":"2.0","id":"abc","method":"ping"}))
            .unwrap();
        let back = r.from_child(json!({"jsonrpc":"2.0","id":s["id"],"result":{}}));
        assert_eq!(
            back,
            Route::Answer(1, json!({"jsonrpc":"2.0","id":"abc","result":{}}))
        );
    }

    #[test]
    fn progress_tokens_are_mapped_to_their_session() {
        let mut r = Router::new(true);
        let a = r
            .from_agent(1, json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"progressToken":"t"}}}))
            .unwrap();
        r.from_agent(2, json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"progressToken":"t"}}}))
            .unwrap();
        let token = a.pointer("/params/_meta/progressToken").unwrap().clone();
        assert_ne!(token, json!("t"));
        let p = r.from_child(json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":token,"progress":1}}));
        assert_eq!(
            p,
            Route::Stream(
                1,
                json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t","progress":1}})
            )
        );
        let unknown = r.from_child(json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"p999","progress":1}}));
        assert!(matches!(unknown, Route::Drop(_)));
    }

    #[test]
    fn the_childs_requests_reach_one_agent_and_only_its_answer_returns() {
        let mut r = Router::new(false);
        r.from_agent(5, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
            .unwrap();
        let Route::Stream(5, ask) = r.from_child(
            json!({"jsonrpc":"2.0","id":0,"method":"sampling/createMessage","params":{}}),
        ) else {
            panic!("not routed to the session");
        };
        let key = ask["id"].clone();
        assert!(key.as_str().unwrap().starts_with("sg-"));
        // Another session cannot answer it; the right one can, once.
        assert_eq!(
            r.from_agent(6, json!({"jsonrpc":"2.0","id":key,"result":{}})),
            None
        );
        let back = r
            .from_agent(5, json!({"jsonrpc":"2.0","id":key,"result":{"ok":true}}))
            .unwrap();
        assert_eq!(back, json!({"jsonrpc":"2.0","id":0,"result":{"ok":true}}));
        assert_eq!(
            r.from_agent(5, json!({"jsonrpc":"2.0","id":key,"result":{}})),
            None
        );
    }

    #[test]
    fn a_cancelled_request_is_done_and_its_late_answer_dropped() {
        let mut r = Router::new(true);
        let a = r
            .from_agent(1, json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"progressToken":5}}}))
            .unwrap();
        r.from_agent(
            1,
            json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}),
        )
        .unwrap();
        assert_eq!(r.in_flight(), 0);
        assert!(r.tokens.is_empty());
        // Session 1 is no longer busy: session 2 alone is, and gets the child's request.
        r.from_agent(2, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
            .unwrap();
        let ask = r.from_child(json!({"jsonrpc":"2.0","id":4,"method":"roots/list"}));
        assert!(matches!(ask, Route::Stream(2, _)), "{ask:?}");
        let late = r.from_child(json!({"jsonrpc":"2.0","id":a["id"],"result":{}}));
        assert_eq!(late, Route::Drop("an answer to a cancelled request"));
    }

    #[test]
    fn the_child_cancelling_its_own_request_reaches_the_session_asked() {
        let mut r = Router::new(false);
        r.from_agent(4, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
            .unwrap();
        let Route::Stream(4, ask) =
            r.from_child(json!({"jsonrpc":"2.0","id":"c1","method":"sampling/createMessage"}))
        else {
            panic!()
        };
        let cancel = r.from_child(
            json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"c1"}}),
        );
        let Route::Stream(4, cancel) = cancel else {
            panic!("{cancel:?}")
        };
        assert_eq!(cancel["params"]["requestId"], ask["id"]);
        // Its answer no longer goes back.
        assert_eq!(
            r.from_agent(4, json!({"jsonrpc":"2.0","id":ask["id"],"result":{}})),
            None
        );
    }

    #[test]
    fn a_shared_server_broadcasts_list_changes_and_keeps_its_logs() {
        let mut r = Router::new(true);
        r.from_agent(1, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
            .unwrap();
        let changed =
            r.from_child(json!({"jsonrpc":"2.0","method":"notifications/tools/list_changed"}));
        assert!(matches!(changed, Route::Broadcast(_)));
        let log = r.from_child(
            json!({"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info"}}),
        );
        assert!(matches!(log, Route::Drop(_)));
        // Progress for a request of the child's is accepted only from the session asked.
        assert_eq!(
            r.from_agent(2, json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"x","progress":1}})),
            None
        );
    }

    #[test]
    fn a_process_of_its_own_sends_everything_to_its_session() {
        let mut r = Router::new(false);
        let a = r
            .from_agent(3, json!({"jsonrpc":"2.0","id":1,"method":"initialize"}))
            .unwrap();
        r.from_child(json!({"jsonrpc":"2.0","id":a["id"],"result":{}}));
        // Nothing in flight: a log line still belongs to the process's one session.
        let log = r.from_child(
            json!({"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info"}}),
        );
        assert!(matches!(log, Route::Stream(3, _)), "{log:?}");
        let garbage = r.from_child(json!({"hello":"world"}));
        assert!(matches!(garbage, Route::Drop(_)));
    }

    #[test]
    fn a_shared_process_with_two_sessions_busy_refuses_what_it_cannot_route() {
        let mut r = Router::new(true);
        r.from_agent(1, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
            .unwrap();
        r.from_agent(2, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
            .unwrap();
        let refused =
            r.from_child(json!({"jsonrpc":"2.0","id":9,"method":"elicitation/create","params":{}}));
        let Route::Refuse(err) = refused else {
            panic!("{refused:?}")
        };
        assert_eq!(err["id"], 9);
        let log = r.from_child(
            json!({"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info"}}),
        );
        assert!(matches!(log, Route::Drop(_)));
    }

    #[test]
    fn cancellation_names_the_childs_id_and_forgetting_a_session_drops_its_answers() {
        let mut r = Router::new(true);
        let a = r
            .from_agent(1, json!({"jsonrpc":"2.0","id":"q","method":"tools/call"}))
            .unwrap();
        let cancel = r
            .from_agent(1, json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"q"}}))
            .unwrap();
        assert_eq!(cancel["params"]["requestId"], a["id"]);
        // Another session cannot cancel it.
        assert_eq!(
            r.from_agent(2, json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"q"}})),
            None
        );
        r.forget(1);
        let late = r.from_child(json!({"jsonrpc":"2.0","id":a["id"],"result":{}}));
        assert!(matches!(late, Route::Drop(_)));
    }
}
