//! The stdio hub of one upstream: its agent sessions and the processes they use (one per
//! session, or one shared; each a [`Proc`] with its pipes and routing). Workers on any core
//! reach a session's process through the hub (by way of the bridge, [`super::stdio_bridge`]);
//! an agent's request gets back a [`Lines`] queue carrying, one JSON line each, the messages
//! for that request (progress, the child's own requests, then the answer), which ends after
//! the answer. Nothing here blocks a worker, and no reader holds up another.
//!
//! Sessions end on `close` (DELETE), when idle longer than the upstream's `idle_timeout_s`
//! ([`Hub::sweep`]), when their agent is removed ([`Hub::close_agents`]), when their process
//! dies, and at shutdown ([`Hub::close_all`]); a process ends with its last session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::process::Spec;
use super::stdio_lines::Sink;
pub use super::stdio_lines::{Line, Lines, Quiet};
use super::stdio_proc::{Proc, lock};
use super::stdio_router::SessionId;

/// An upstream's process settings (the policy's `[[upstream]]` fields).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Options {
    /// One process serves every session (`share = true`).
    pub share: bool,
    pub max_processes: usize,
    pub idle_timeout: Duration,
    pub startup_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            share: false,
            max_processes: 64,
            idle_timeout: Duration::from_secs(600),
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// Why the hub could not take a message.
#[derive(Debug, PartialEq, Eq)]
pub enum HubError {
    /// `max_processes` are running.
    Full(usize),
    /// The session is unknown or its process has ended (the agent initializes again).
    NoSession,
    /// The process could not be started.
    Spawn(String),
    /// Not a message the process can take (an answer to nothing, a foreign cancellation).
    Unroutable,
}

/// One stdio upstream's processes.
pub struct Hub {
    pub name: String,
    pub spec: Spec,
    pub options: Options,
    /// Random per hub: a session number from another run (or another hub) means nothing here.
    pub instance: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_session: SessionId,
    sessions: HashMap<SessionId, Session>,
    procs: Vec<Arc<Proc>>,
    /// Sessionless requests (2026-07-28): one session per agent.
    by_agent: HashMap<String, SessionId>,
}

struct Session {
    proc: Arc<Proc>,
    agent: String,
    last_used: Instant,
}

impl Hub {
    pub fn new(name: &str, spec: Spec, options: Options) -> Hub {
        let mut random = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
        Hub {
            name: name.to_owned(),
            spec,
            options: Options {
                max_processes: options.max_processes.max(1),
                ..options
            },
            instance: u64::from_le_bytes(random),
            state: Mutex::new(State::default()),
        }
    }

    /// A new session for `agent`: its own process, or (shared) the process every session uses.
    pub fn open(&self, agent: &str) -> Result<SessionId, HubError> {
        self.open_locked(&mut lock(&self.state), agent)
    }

    fn open_locked(&self, state: &mut State, agent: &str) -> Result<SessionId, HubError> {
        state.procs.retain(|p| p.alive());
        let proc = match state.procs.first() {
            Some(p) if self.options.share => p.clone(),
            _ if state.procs.len() >= self.options.max_processes => {
                return Err(HubError::Full(self.options.max_processes));
            }
            _ => {
                let p = Proc::start(&self.name, &self.spec, self.options.share)
                    .map_err(|e| HubError::Spawn(e.to_string()))?;
                state.procs.push(p.clone());
                p
            }
        };
        state.next_session += 1;
        let session = state.next_session;
        state.sessions.insert(
            session,
            Session {
                proc,
                agent: agent.to_owned(),
                last_used: Instant::now(),
            },
        );
        Ok(session)
    }

    /// The session an agent's sessionless requests use (opened on the first: then `true`).
    pub fn agent_session(&self, agent: &str) -> Result<(SessionId, bool), HubError> {
        // Looked up and opened under one lock: two requests at once share one process.
        let mut state = lock(&self.state);
        let old = state.by_agent.get(agent).copied();
        if let Some(s) = old
            && state.sessions.get(&s).is_some_and(|s| s.proc.alive())
        {
            return Ok((s, false));
        }
        let session = self.open_locked(&mut state, agent)?;
        state.by_agent.insert(agent.to_owned(), session);
        drop(state);
        if let Some(old) = old {
            // Its process died: the session goes too.
            self.close(old);
        }
        Ok((session, true))
    }

    /// Whether `session` is `agent`'s (the bridge checks every request against it).
    pub fn owned_by(&self, session: SessionId, agent: &str) -> bool {
        lock(&self.state)
            .sessions
            .get(&session)
            .is_some_and(|s| s.agent == agent)
    }

    /// The session's process, its use noted.
    fn proc_of(&self, session: SessionId) -> Result<Arc<Proc>, HubError> {
        let mut state = lock(&self.state);
        let s = state
            .sessions
            .get_mut(&session)
            .ok_or(HubError::NoSession)?;
        if !s.proc.alive() {
            return Err(HubError::NoSession);
        }
        s.last_used = Instant::now();
        Ok(s.proc.clone())
    }

    /// An agent's request: the returned socket carries its messages, one JSON line each, and
    /// closes after the answer.
    pub fn request(&self, session: SessionId, msg: Value) -> Result<(u64, Lines), HubError> {
        let proc = self.proc_of(session)?;
        let (ours, theirs) = Sink::pair();
        let initialize = self.options.share && msg["method"] == "initialize";
        if initialize && let Some(result) = lock(&proc.init).result.clone() {
            // A shared process was initialized by an earlier session: its answer again.
            let answer = json!({"jsonrpc": "2.0", "id": msg["id"].clone(), "result": result});
            ours.send(Line::Answer(answer.to_string(), false));
            return Ok((0, theirs));
        }
        let out = lock(&proc.router)
            .from_agent(session, msg)
            .ok_or(HubError::Unroutable)?;
        let n = out["id"].as_u64().ok_or(HubError::Unroutable)?;
        if initialize {
            lock(&proc.init).asked.get_or_insert(n);
        }
        {
            let mut sinks = lock(&proc.sinks);
            // The process ended since: its requests were failed, this one would wait forever.
            if sinks.ended.is_some() {
                return Err(HubError::NoSession);
            }
            sinks.requests.insert(n, (session, ours));
        }
        if !lock(&proc.router).is_pending(n) {
            // Cancelled (by the session, on another connection) before its stream was in
            // place: the stream ends at once.
            lock(&proc.sinks).requests.remove(&n);
            return Ok((n, theirs));
        }
        if !proc.write(&out) {
            lock(&proc.sinks).requests.remove(&n);
            lock(&proc.router).abandon(n);
            return Err(HubError::NoSession);
        }
        Ok((n, theirs))
    }

    /// The requester gave up on request `n` (its agent left, or the worker timed out): its
    /// answer, if one still comes, goes nowhere.
    pub fn abandon(&self, session: SessionId, n: u64) {
        let Ok(proc) = self.proc_of(session) else {
            return;
        };
        lock(&proc.router).abandon(n);
        lock(&proc.sinks).requests.remove(&n);
    }

    /// An agent's notification, or its answer to a request of the child's.
    pub fn send(&self, session: SessionId, msg: Value) -> Result<(), HubError> {
        let proc = self.proc_of(session)?;
        if self.options.share && msg["method"] == "notifications/initialized" {
            let mut init = lock(&proc.init);
            if init.initialized {
                // A shared process hears it once.
                return Ok(());
            }
            init.initialized = true;
        }
        let cancelled = msg["method"] == "notifications/cancelled";
        let out = lock(&proc.router)
            .from_agent(session, msg)
            .ok_or(HubError::Unroutable)?;
        if cancelled && let Some(n) = out.pointer("/params/requestId").and_then(Value::as_u64) {
            // The request will not be answered: its stream ends now.
            lock(&proc.sinks).requests.remove(&n);
        }
        if proc.write(&out) {
            Ok(())
        } else {
            Err(HubError::NoSession)
        }
    }

    /// The session's stream for messages that belong to no request (its GET stream).
    pub fn listen(&self, session: SessionId) -> Result<Lines, HubError> {
        let proc = self.proc_of(session)?;
        let (ours, theirs) = Sink::pair();
        let mut sinks = lock(&proc.sinks);
        if sinks.ended.is_some() {
            return Err(HubError::NoSession);
        }
        sinks.streams.insert(session, ours);
        Ok(theirs)
    }

    /// Why the session's process ended, if it did.
    pub fn ended(&self, session: SessionId) -> Option<String> {
        let state = lock(&self.state);
        let s = state.sessions.get(&session)?;
        lock(&s.proc.sinks).ended.clone()
    }

    /// The session ends (DELETE, idle, its agent removed): its process is killed unless shared
    /// with sessions still open.
    pub fn close(&self, session: SessionId) {
        let mut state = lock(&self.state);
        let Some(s) = state.sessions.remove(&session) else {
            return;
        };
        if state.by_agent.get(&s.agent) == Some(&session) {
            state.by_agent.remove(&s.agent);
        }
        let proc = s.proc;
        lock(&proc.router).forget(session);
        {
            let mut sinks = lock(&proc.sinks);
            sinks.requests.retain(|_, (s, _)| *s != session);
            sinks.streams.remove(&session);
        }
        let still_used = state.sessions.values().any(|s| Arc::ptr_eq(&s.proc, &proc));
        if !still_used {
            state.procs.retain(|p| !Arc::ptr_eq(p, &proc));
            drop(state);
            proc.end("the session ended");
        }
    }

    /// Ends every session whose agent `gone` says is gone (a policy reload removed it or its
    /// access); how many.
    pub fn close_agents(&self, gone: impl Fn(&str) -> bool) -> usize {
        let doomed: Vec<SessionId> = lock(&self.state)
            .sessions
            .iter()
            .filter(|(_, s)| gone(&s.agent))
            .map(|(&id, _)| id)
            .collect();
        for &s in &doomed {
            self.close(s);
        }
        doomed.len()
    }

    /// Ends sessions idle longer than `idle_timeout` (no request in flight, none made since)
    /// and those whose process died; how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let idle = self.options.idle_timeout;
        let doomed: Vec<SessionId> = lock(&self.state)
            .sessions
            .iter()
            .filter(|&(&id, s)| {
                let sinks = lock(&s.proc.sinks);
                sinks.ended.is_some()
                    || (now.saturating_duration_since(s.last_used) >= idle
                        && !sinks.requests.values().any(|(owner, _)| *owner == id))
            })
            .map(|(&id, _)| id)
            .collect();
        for &s in &doomed {
            self.close(s);
        }
        doomed.len()
    }

    /// Ends every session and process (scopegate is stopping).
    /// Returns when every process group is gone (they are ended side by side).
    pub fn close_all(&self) {
        let procs = {
            let mut state = lock(&self.state);
            state.sessions.clear();
            state.by_agent.clear();
            std::mem::take(&mut state.procs)
        };
        let enders: Vec<_> = procs
            .into_iter()
            .map(|p| std::thread::spawn(move || p.end_now("scopegate is stopping")))
            .collect();
        for e in enders {
            let _ = e.join();
        }
    }

    /// Processes running now.
    pub fn processes(&self) -> usize {
        lock(&self.state).procs.iter().filter(|p| p.alive()).count()
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        lock(&self.state).sessions.len()
    }
}

impl Drop for Hub {
    /// The last policy naming this upstream is gone: its processes end (on their own threads:
    /// this may run on a worker).
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for proc in state.procs.drain(..) {
            proc.end("the upstream is no longer configured");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A small stdio MCP server in Python: answers tools/call after a progress notification
    /// (when asked for progress), asks the client for sampling on tool "ask" and answers with
    /// the client's answer, exits on tool "die", writes garbage on tool "garbage".
    const SERVER: &str = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if "method" not in m:
        continue
    if m.get("id") is None:
        continue
    name = m.get("params", {}).get("name")
    token = m.get("params", {}).get("_meta", {}).get("progressToken")
    if token is not None:
        print(json.dumps({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":token,"progress":1}}), flush=True)
    if name == "die":
        sys.exit(3)
    if name == "garbage":
        print("this is not json", flush=True)
        continue
    if name == "ask":
        print(json.dumps({"jsonrpc":"2.0","id":"s1","method":"sampling/createMessage","params":{}}), flush=True)
        reply = json.loads(sys.stdin.readline())
        print(json.dumps({"jsonrpc":"2.0","id":m["id"],"result":{"client_said":reply.get("result")}}), flush=True)
        continue
    print(json.dumps({"jsonrpc":"2.0","id":m["id"],"result":{"echo":m.get("params")}}), flush=True)
"#;

    fn hub(shared: bool, max: usize) -> Hub {
        let spec = Spec {
            command: vec!["python3".into(), "-c".into(), SERVER.into()],
            env: Vec::new(),
            cwd: None,
        };
        let options = Options {
            share: shared,
            max_processes: max,
            ..Options::default()
        };
        Hub::new("test", spec, options)
    }

    fn lines((_, l): (u64, Lines)) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(Some(line)) = l.next(None) {
            out.push(serde_json::from_str(line.text()).unwrap());
        }
        out
    }

    fn next(l: &Lines) -> Value {
        serde_json::from_str(l.next(None).unwrap().unwrap().text()).unwrap()
    }

    fn call(id: Value, name: &str, token: Option<&str>) -> Value {
        let mut m = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":name}});
        if let Some(t) = token {
            m["params"]["_meta"] = json!({"progressToken": t});
        }
        m
    }

    #[test]
    fn answers_and_progress_come_back_on_the_request_with_the_agents_ids() {
        let h = hub(false, 4);
        let s = h.open("a").unwrap();
        let got = lines(
            h.request(s, call(json!("a-1"), "echo", Some("tok")))
                .unwrap(),
        );
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["method"], "notifications/progress");
        assert_eq!(got[0]["params"]["progressToken"], "tok");
        assert_eq!(got[1]["id"], "a-1");
        assert_eq!(got[1]["result"]["echo"]["name"], "echo");
        h.close(s);
        assert_eq!(h.processes(), 0);
    }

    #[test]
    fn shared_sessions_with_the_same_id_get_their_own_answers() {
        let h = hub(true, 1);
        let (a, b) = (h.open("a").unwrap(), h.open("a").unwrap());
        assert_eq!(h.processes(), 1);
        let ra = h.request(a, call(json!(1), "first", None)).unwrap();
        let rb = h.request(b, call(json!(1), "second", None)).unwrap();
        let (ga, gb) = (lines(ra), lines(rb));
        assert_eq!(ga[0]["result"]["echo"]["name"], "first");
        assert_eq!(gb[0]["result"]["echo"]["name"], "second");
        assert_eq!(
            (ga[0]["id"].clone(), gb[0]["id"].clone()),
            (json!(1), json!(1))
        );
        h.close(a);
        assert_eq!(h.processes(), 1, "still used by the other session");
        h.close(b);
        assert_eq!(h.processes(), 0);
    }

    #[test]
    fn the_childs_request_reaches_the_agent_and_its_answer_the_child() {
        let h = hub(false, 4);
        let s = h.open("a").unwrap();
        let (_, stream) = h.request(s, call(json!(9), "ask", None)).unwrap();
        let ask = next(&stream);
        assert_eq!(ask["method"], "sampling/createMessage");
        h.send(
            s,
            json!({"jsonrpc":"2.0","id":ask["id"],"result":{"text":"hi"}}),
        )
        .unwrap();
        let answer = next(&stream);
        assert_eq!(answer["id"], 9);
        assert_eq!(answer["result"]["client_said"]["text"], "hi");
    }

    #[test]
    fn a_cancelled_request_s_stream_ends_and_the_session_goes_on() {
        let h = hub(false, 4);
        let s = h.open("a").unwrap();
        // "ask" waits for a line on stdin: the cancellation is what it reads.
        let (_, stream) = h.request(s, call(json!("c-1"), "ask", None)).unwrap();
        assert_eq!(next(&stream)["method"], "sampling/createMessage");
        let cancel = json!({"jsonrpc":"2.0","method":"notifications/cancelled",
                            "params":{"requestId":"c-1"}});
        h.send(s, cancel).unwrap();
        assert_eq!(stream.next(None), Ok(None), "the stream ends");
        let got = lines(h.request(s, call(json!(2), "echo", None)).unwrap());
        assert_eq!(got.last().unwrap()["id"], 2, "{got:?}");
    }

    #[test]
    fn sessions_are_their_agents_and_sessionless_requests_share_one_per_agent() {
        let h = hub(false, 4);
        let s = h.open("a").unwrap();
        assert!(h.owned_by(s, "a") && !h.owned_by(s, "b"));
        let (first, opened) = h.agent_session("b").unwrap();
        assert!(opened);
        assert_eq!(h.agent_session("b").unwrap(), (first, false));
        assert_ne!(h.agent_session("c").unwrap().0, first);
        assert_eq!(h.processes(), 3);
        assert_eq!(h.close_agents(|agent| agent != "a"), 2);
        assert_eq!(h.processes(), 1);
    }

    #[test]
    fn a_process_that_dies_or_breaks_the_protocol_fails_its_requests_and_its_session() {
        let h = hub(false, 4);
        for tool in ["die", "garbage"] {
            let s = h.open("a").unwrap();
            let got = lines(h.request(s, call(json!(5), tool, None)).unwrap());
            let last = got.last().unwrap();
            assert_eq!(last["id"], 5, "{tool}: {got:?}");
            assert!(
                last["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("stdio server")
            );
            assert_eq!(
                h.request(s, call(json!(6), "echo", None)).err(),
                Some(HubError::NoSession),
                "{tool}: the session ends with its process"
            );
            h.close(s);
        }
    }

    #[test]
    fn a_child_that_stops_reading_stdin_can_still_be_ended() {
        // It never reads: its pipe and the stdin queue fill, and a sender blocks.
        let spec = Spec {
            command: vec![
                "python3".into(),
                "-c".into(),
                "import time; time.sleep(60)".into(),
            ],
            env: Vec::new(),
            cwd: None,
        };
        let h = Arc::new(Hub::new("stuck", spec, Options::default()));
        let s = h.open("a").unwrap();
        let big = "x".repeat(64 * 1024);
        let sender = {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..(crate::upstream::stdio_proc::STDIN_QUEUE + 16) {
                    let msg = json!({"jsonrpc":"2.0","method":"notifications/message",
                                     "params":{"i": i, "pad": big}});
                    if h.send(s, msg).is_err() {
                        return i;
                    }
                }
                usize::MAX
            })
        };
        // Until the sender is stuck on the full queue.
        std::thread::sleep(Duration::from_millis(500));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let closer = h.clone();
        std::thread::spawn(move || {
            closer.close(s);
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(30)).is_ok(),
            "close hung behind a blocked sender"
        );
        assert_ne!(
            sender.join().unwrap(),
            usize::MAX,
            "the blocked sender was released"
        );
    }

    #[test]
    fn a_line_over_the_limit_ends_the_process() {
        let script = format!(
            "import sys, time\nsys.stdin.readline()\nsys.stdout.write('x' * {})\n\
             sys.stdout.write('\\n')\nsys.stdout.flush()\ntime.sleep(30)",
            crate::upstream::stdio_proc::MAX_LINE + 1
        );
        let spec = Spec {
            command: vec!["python3".into(), "-c".into(), script],
            env: Vec::new(),
            cwd: None,
        };
        let h = Hub::new("long", spec, Options::default());
        let s = h.open("a").unwrap();
        let got = lines(h.request(s, call(json!(1), "echo", None)).unwrap());
        let message = got.last().unwrap()["error"]["message"].to_string();
        assert!(message.contains("over the size limit"), "{message}");
        assert_eq!(
            h.ended(s).as_deref(),
            Some("the process wrote a line over the size limit to stdout")
        );
    }

    #[test]
    fn max_processes_is_a_clear_refusal() {
        let h = hub(false, 1);
        let s = h.open("a").unwrap();
        assert_eq!(h.open("a").unwrap_err(), HubError::Full(1));
        h.close(s);
        assert!(h.open("a").is_ok());
    }
}
