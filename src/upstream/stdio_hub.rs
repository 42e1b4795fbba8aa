//! The stdio hub of one upstream: its processes (one per agent session, or one shared), what
//! goes into their stdin and where each line of their stdout goes ([`Router`]). Workers on any
//! core reach a session's process through the hub (by way of the bridge,
//! [`super::stdio_bridge`]); an agent's request gets back a [`Lines`] receiver on which the hub
//! puts, one JSON line each, the messages for that request (progress, the child's own
//! requests, then the answer) and which ends after the answer. A thread per process reads its
//! stdout and one writes its stdin, so a slow or stuck child never blocks a worker; the hub
//! never waits on a reader (a queue past [`SINK_LIMIT`] bytes is dropped), so a slow agent
//! never holds up another.
//!
//! Sessions end on `close` (DELETE), when idle longer than the upstream's `idle_timeout_s`
//! ([`Hub::sweep`]), when their agent is removed ([`Hub::close_agents`]), when their process
//! dies, and at shutdown ([`Hub::close_all`]); a process ends with its last session.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::process::{Process, Spec};
use super::stdio_router::{Route, Router, SessionId};

/// The most a request's (or a GET stream's) queue may hold unread; past it the queue is dropped
/// and its reader sees the stream end.
pub const SINK_LIMIT: usize = 64 * 1024 * 1024;
/// The longest line a child may write to stdout (a longer one breaks the protocol).
pub const MAX_LINE: usize = 64 * 1024 * 1024;
/// Lines waiting for a child's stdin; past this, senders wait (they are bridge threads).
const STDIN_QUEUE: usize = 256;

/// One message for a request's (or a session's) reader.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// A message of the child's, ids mapped back.
    Message(String),
    /// The process failed: the JSON-RPC error for the request.
    Failed(String),
}

impl Line {
    fn len(&self) -> usize {
        match self {
            Line::Message(l) | Line::Failed(l) => l.len(),
        }
    }
}

/// Nothing came within the time asked.
#[derive(Debug, PartialEq, Eq)]
pub struct Quiet;

/// The reading end of a request's messages.
pub struct Lines {
    rx: mpsc::Receiver<Line>,
    queued: Arc<AtomicUsize>,
}

impl Lines {
    /// The next message, `Ok(None)` when the stream ended (after the answer, or dropped);
    /// `Err` when `within` passed first.
    pub fn next(&self, within: Option<Duration>) -> Result<Option<Line>, Quiet> {
        let line = match within {
            None => self.rx.recv().ok(),
            Some(d) => match self.rx.recv_timeout(d) {
                Ok(l) => Some(l),
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(Quiet),
                Err(mpsc::RecvTimeoutError::Disconnected) => None,
            },
        };
        if let Some(l) = &line {
            self.queued.fetch_sub(l.len(), Ordering::Relaxed);
        }
        Ok(line)
    }
}

/// The hub's end of a [`Lines`]: never blocks.
struct Sink {
    tx: mpsc::Sender<Line>,
    queued: Arc<AtomicUsize>,
}

impl Sink {
    fn pair() -> (Sink, Lines) {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (
            Sink {
                tx,
                queued: queued.clone(),
            },
            Lines { rx, queued },
        )
    }

    /// False when the reader is gone or too far behind: the sink should go.
    fn send(&self, line: Line) -> bool {
        let n = line.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > SINK_LIMIT {
            return false;
        }
        self.tx.send(line).is_ok()
    }
}

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

/// One running process and its routing.
struct Proc {
    router: Mutex<Router>,
    sinks: Mutex<Sinks>,
    /// Set once the process is done for (why is in `sinks.ended`); read without a lock.
    dead: AtomicBool,
    to_child: Mutex<Option<mpsc::SyncSender<Vec<u8>>>>,
    process: Mutex<Option<Process>>,
    /// A shared process is initialized once; later sessions get its answer.
    init: Mutex<Init>,
}

#[derive(Default)]
struct Init {
    /// The child's id of the initialize request in flight.
    asked: Option<u64>,
    result: Option<Value>,
    initialized: bool,
}

#[derive(Default)]
struct Sinks {
    /// The child's id for a request -> the requesting session and its stream.
    requests: HashMap<u64, (SessionId, Sink)>,
    /// A session's GET stream (messages that belong to no request).
    streams: HashMap<SessionId, Sink>,
    /// The process ended: why.
    ended: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
                let p = self.spawn()?;
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

    fn spawn(&self) -> Result<Arc<Proc>, HubError> {
        let mut process = Process::spawn_lasting(&self.name, &self.spec)
            .map_err(|e| HubError::Spawn(e.to_string()))?;
        let stdout = process.stdout.take().expect("piped stdout");
        let mut stdin = process.stdin.take().expect("piped stdin");
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(STDIN_QUEUE);
        let proc = Arc::new(Proc {
            router: Mutex::new(Router::new(self.options.share)),
            sinks: Mutex::new(Sinks::default()),
            dead: AtomicBool::new(false),
            to_child: Mutex::new(Some(tx)),
            process: Mutex::new(Some(process)),
            init: Mutex::new(Init::default()),
        });
        let name = self.name.clone();
        let writer: Weak<Proc> = Arc::downgrade(&proc);
        std::thread::Builder::new()
            .name(format!("stdin-{name}"))
            .spawn(move || {
                let mut broken = false;
                for line in &rx {
                    if stdin.write_all(&line).is_err() || stdin.flush().is_err() {
                        broken = true;
                        break;
                    }
                }
                // The queue closes first, so a sender blocked on it is released.
                drop(rx);
                if broken && let Some(proc) = writer.upgrade() {
                    // A child that closed its stdin takes no more requests: done for.
                    proc.end("the process closed its stdin");
                }
            })
            .map_err(|e| HubError::Spawn(e.to_string()))?;
        let reader = proc.clone();
        std::thread::Builder::new()
            .name(format!("stdout-{name}"))
            .spawn(move || reader.read_stdout(stdout, &name))
            .map_err(|e| HubError::Spawn(e.to_string()))?;
        Ok(proc)
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
            ours.send(Line::Message(answer.to_string()));
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
        if let Err(e) = proc.write(&out) {
            lock(&proc.sinks).requests.remove(&n);
            lock(&proc.router).abandon(n);
            return Err(e);
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
        proc.write(&out)
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

    /// Whether the session is open (its process may have ended).
    pub fn knows(&self, session: SessionId) -> bool {
        lock(&self.state).sessions.contains_key(&session)
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

impl Proc {
    fn alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
    }

    fn write(&self, msg: &Value) -> Result<(), HubError> {
        let mut line = serde_json::to_vec(msg).map_err(|_| HubError::Unroutable)?;
        line.push(b'\n');
        // Sent without the lock held: a full queue (a child that stopped reading) blocks this
        // sender only, never `end`, which must take the lock to close the queue.
        let tx = lock(&self.to_child).clone();
        match tx.map(|tx| tx.send(line)) {
            Some(Ok(())) => Ok(()),
            _ => Err(HubError::NoSession),
        }
    }

    /// Kills the process; requests still open get an error answer saying `why`. The kill
    /// (which may wait out the SIGTERM grace) runs on its own thread: a DELETE is not kept
    /// waiting for a slow exit.
    fn end(&self, why: &str) {
        self.fail(why);
        *lock(&self.to_child) = None;
        if let Some(mut process) = lock(&self.process).take() {
            let killer = std::thread::Builder::new()
                .name("stdio-kill".into())
                .spawn(move || process.kill());
            if let Err(e) = killer {
                crate::warn!("stdio: no thread to end a process ({e}); ending it here");
            }
        }
    }

    /// [`end`](Self::end), returning only when the process group is gone (shutdown).
    fn end_now(&self, why: &str) {
        self.fail(why);
        *lock(&self.to_child) = None;
        if let Some(mut process) = lock(&self.process).take() {
            process.kill();
        }
    }

    /// The process is done for: every open request gets a JSON-RPC error saying why, marked
    /// as the hub's ([`FAILED`]).
    fn fail(&self, why: &str) {
        let pending = lock(&self.router).drain();
        let mut sinks = lock(&self.sinks);
        if sinks.ended.is_none() {
            sinks.ended = Some(why.to_owned());
        }
        self.dead.store(true, Ordering::Release);
        let why = sinks.ended.clone().unwrap_or_default();
        for (n, _, agent_id) in pending {
            if let Some((_, sink)) = sinks.requests.remove(&n) {
                let err = json!({
                    "jsonrpc": "2.0",
                    "id": agent_id,
                    "error": {"code": crate::mcp::jsonrpc::UPSTREAM_UNAVAILABLE,
                              "message": format!("upstream stdio server: {why}")}
                });
                sink.send(Line::Failed(err.to_string()));
            }
        }
        sinks.requests.clear();
        sinks.streams.clear();
    }

    fn read_stdout(&self, stdout: std::process::ChildStdout, name: &str) {
        let mut reader = BufReader::new(stdout).take(MAX_LINE as u64 + 1);
        let mut line = Vec::new();
        loop {
            line.clear();
            reader.set_limit(MAX_LINE as u64 + 1);
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => {
                    let why = self.exit_status();
                    self.fail(&why);
                    return;
                }
                Ok(_) if line.len() > MAX_LINE => {
                    crate::warn!(
                        "[{name}] wrote a line over {MAX_LINE} bytes to stdout; ending it"
                    );
                    self.end("the process wrote a line over the size limit to stdout");
                    return;
                }
                Ok(_) => {}
            }
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            let Ok(msg) = serde_json::from_slice::<Value>(text) else {
                // A server that writes anything but JSON-RPC to stdout has broken the
                // protocol: its session ends, its requests are told.
                crate::warn!("[{name}] wrote a line that is not JSON to stdout; ending it");
                self.end("the process wrote something that is not JSON-RPC to stdout");
                return;
            };
            self.deliver(msg);
        }
    }

    /// Why the process's stdout ended: its exit status when it has exited.
    fn exit_status(&self) -> String {
        // The pipe closes a moment before the exit is seen.
        let mut exited = None;
        for _ in 0..20 {
            exited = lock(&self.process).as_ref().and_then(Process::exit_code);
            if exited.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match exited {
            Some(code) => format!("the process exited ({code})"),
            None => "the process closed its stdout".into(),
        }
    }

    /// Sends one message of the child's where the router says.
    fn deliver(&self, msg: Value) {
        // Which request a message is for, in the child's ids, before the router maps them.
        let answer_to = msg
            .get("method")
            .is_none()
            .then(|| msg["id"].as_u64())
            .flatten();
        let progress_of = msg
            .pointer("/params/progressToken")
            .and_then(Value::as_str)
            .and_then(|t| t.strip_prefix('p'))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = answer_to {
            let mut init = lock(&self.init);
            if init.asked == Some(n) {
                // Cached when it succeeded; a refusal lets the next initialize ask again.
                init.result = msg.get("result").cloned();
                init.asked = None;
            }
        }
        let route = lock(&self.router).from_child(msg);
        let mut sinks = lock(&self.sinks);
        let line = |m: &Value| Line::Message(m.to_string());
        match route {
            Route::Answer(_, m) => {
                if let Some((_, sink)) = answer_to.and_then(|n| sinks.requests.remove(&n)) {
                    sink.send(line(&m));
                }
            }
            Route::Stream(session, m) => {
                // The request's own stream, else the session's latest request, else its GET
                // stream.
                let n = progress_of
                    .filter(|n| sinks.requests.contains_key(n))
                    .or_else(|| {
                        sinks
                            .requests
                            .iter()
                            .filter(|(_, (s, _))| *s == session)
                            .map(|(n, _)| *n)
                            .max()
                    });
                let sink = match n {
                    Some(n) => sinks.requests.get(&n).map(|(_, s)| s),
                    None => sinks.streams.get(&session),
                };
                if let Some(sink) = sink
                    && !sink.send(line(&m))
                {
                    // A requester that stopped reading: its stream goes.
                    if let Some(n) = n {
                        sinks.requests.remove(&n);
                    } else {
                        sinks.streams.remove(&session);
                    }
                }
            }
            Route::Broadcast(m) => {
                let text = m.to_string();
                sinks
                    .streams
                    .retain(|_, s| s.send(Line::Message(text.clone())));
            }
            Route::Refuse(err) => {
                drop(sinks);
                let _ = self.write(&err);
            }
            Route::Drop(why) => crate::debug!("stdio: a message dropped: {why}"),
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
            let (Line::Message(text) | Line::Failed(text)) = line;
            out.push(serde_json::from_str(&text).unwrap());
        }
        out
    }

    fn next(l: &Lines) -> Value {
        let (Line::Message(text) | Line::Failed(text)) = l.next(None).unwrap().unwrap();
        serde_json::from_str(&text).unwrap()
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
                for i in 0..(STDIN_QUEUE + 16) {
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
        let (done_tx, done_rx) = mpsc::channel();
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
    fn max_processes_is_a_clear_refusal() {
        let h = hub(false, 1);
        let s = h.open("a").unwrap();
        assert_eq!(h.open("a").unwrap_err(), HubError::Full(1));
        h.close(s);
        assert!(h.open("a").is_ok());
    }
}
