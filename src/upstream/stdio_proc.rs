//! One running stdio process of a hub: its stdin writer and stdout reader threads, where each
//! line of its stdout goes (the [`Router`] maps ids back; the message lands in the requesting
//! stream's queue), and how it ends (every open request told why, then the group killed).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::{Value, json};

use super::process::{Process, Spec};
use super::stdio_lines::{Line, Sink};
use super::stdio_router::{Route, Router, SessionId};

/// The longest line a child may write to stdout (a longer one breaks the protocol).
pub const MAX_LINE: usize = 64 * 1024 * 1024;
/// Lines waiting for a child's stdin; past this, senders wait (they are bridge threads).
pub(super) const STDIN_QUEUE: usize = 256;

/// One running process and its routing.
pub(super) struct Proc {
    pub(super) router: Mutex<Router>,
    pub(super) sinks: Mutex<Sinks>,
    /// Set once the process is done for (why is in `sinks.ended`); read without a lock.
    pub(super) dead: AtomicBool,
    pub(super) to_child: Mutex<Option<mpsc::SyncSender<Vec<u8>>>>,
    pub(super) process: Mutex<Option<Process>>,
    /// A shared process is initialized once; later sessions get its answer.
    pub(super) init: Mutex<Init>,
}

#[derive(Default)]
pub(super) struct Init {
    /// The child's id of the initialize request in flight.
    pub(super) asked: Option<u64>,
    pub(super) result: Option<Value>,
    pub(super) initialized: bool,
}

#[derive(Default)]
pub(super) struct Sinks {
    /// The child's id for a request -> the requesting session and its stream.
    pub(super) requests: HashMap<u64, (SessionId, Sink)>,
    /// A session's GET stream (messages that belong to no request).
    pub(super) streams: HashMap<SessionId, Sink>,
    /// The process ended: why.
    pub(super) ended: Option<String>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Proc {
    /// Starts `spec` for upstream `name` with its stdin writer and stdout reader threads.
    pub(super) fn start(name: &str, spec: &Spec, shared: bool) -> std::io::Result<Arc<Proc>> {
        let mut process = Process::spawn_lasting(name, spec)?;
        let stdout = process.stdout.take().expect("piped stdout");
        let mut stdin = process.stdin.take().expect("piped stdin");
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(STDIN_QUEUE);
        let proc = Arc::new(Proc {
            router: Mutex::new(Router::new(shared)),
            sinks: Mutex::new(Sinks::default()),
            dead: AtomicBool::new(false),
            to_child: Mutex::new(Some(tx)),
            process: Mutex::new(Some(process)),
            init: Mutex::new(Init::default()),
        });
        let name = name.to_owned();
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
            })?;
        let reader = proc.clone();
        std::thread::Builder::new()
            .name(format!("stdout-{name}"))
            .spawn(move || reader.read_stdout(stdout, &name))?;
        Ok(proc)
    }

    pub(super) fn alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
    }

    /// Queues `msg` for the child's stdin; false when the process takes no more.
    pub(super) fn write(&self, msg: &Value) -> bool {
        let Ok(mut line) = serde_json::to_vec(msg) else {
            return false;
        };
        line.push(b'\n');
        // Sent without the lock held: a full queue (a child that stopped reading) blocks this
        // sender only, never `end`, which must take the lock to close the queue.
        let tx = lock(&self.to_child).clone();
        tx.is_some_and(|tx| tx.send(line).is_ok())
    }

    /// Kills the process; requests still open get an error answer saying `why`. The kill
    /// (which may wait out the SIGTERM grace) runs on its own thread: a DELETE is not kept
    /// waiting for a slow exit.
    pub(super) fn end(&self, why: &str) {
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
    pub(super) fn end_now(&self, why: &str) {
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
                    sink.send(Line::Answer(m.to_string(), m.get("error").is_some()));
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
