//! One worker's connection to Redis: commands queued by the worker's tasks are written in one
//! batch (pipelined) and their replies handed back in order. The link connects at start, sends
//! `PING` when idle so a dead server is noticed without traffic, and reconnects every
//! [`RETRY`] while it is down. While down, [`Link::send`] refuses at once: nothing waits on a
//! server that is known to be gone.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Buf;

use super::client::{Client, Script};
use super::resp::{self, Value};
use crate::http::conn::{Conn, ReadError};
use crate::tls::stream::TlsStream;
use crate::upstream::connect::connect_tcp;
use crate::upstream::error::UpstreamError;

/// Between two connection attempts while Redis is unreachable.
pub const RETRY: Duration = Duration::from_millis(250);
/// An idle link sends `PING` this often.
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// Most commands written in one batch.
const MAX_BATCH: usize = 256;
/// Most bytes of replies held unparsed (the limiter's replies are a few dozen bytes each).
const MAX_PENDING: usize = 2 * 1024 * 1024;

/// Why a command got no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The link is down (or went down before the reply came); says why.
    Down(String),
}

/// Called with a command's reply (or why there is none), on the worker's thread.
pub type Done = Box<dyn FnOnce(Result<Value, Failure>)>;

struct Job {
    command: Vec<u8>,
    done: Done,
}

/// One worker's connection (cheap to clone: a handle).
#[derive(Clone)]
pub struct Link {
    inner: Rc<Inner>,
}

struct Inner {
    client: Arc<Client>,
    queue: RefCell<VecDeque<Job>>,
    /// The link's task, waiting for work.
    waker: Cell<Option<Waker>>,
    up: Cell<bool>,
}

impl Link {
    /// Starts the link's task on the current (worker's) runtime.
    pub fn start(client: Arc<Client>) -> Link {
        let inner = Rc::new(Inner {
            client,
            queue: RefCell::new(VecDeque::new()),
            waker: Cell::new(None),
            up: Cell::new(false),
        });
        monoio::spawn(run(inner.clone()));
        Link { inner }
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.inner.client
    }

    /// Connected now.
    pub fn is_up(&self) -> bool {
        self.inner.up.get()
    }

    /// Queues `command` (RESP-encoded); `done` gets its reply. When the link is down the
    /// command is not queued and `done` is handed back.
    pub fn send(&self, command: Vec<u8>, done: Done) -> Result<(), Done> {
        if !self.inner.up.get() {
            return Err(done);
        }
        self.inner
            .queue
            .borrow_mut()
            .push_back(Job { command, done });
        if let Some(w) = self.inner.waker.take() {
            w.wake();
        }
        Ok(())
    }
}

impl Inner {
    fn set_up(&self, up: bool, why: &str) {
        if self.up.replace(up) != up {
            self.client.link_changed(up, why);
        } else if !up {
            self.client.mark_down(why);
        }
    }

    fn fail_queued(&self, why: &str) {
        let jobs: Vec<Job> = self.queue.borrow_mut().drain(..).collect();
        for job in jobs {
            (job.done)(Err(Failure::Down(why.to_owned())));
        }
    }
}

async fn run(inner: Rc<Inner>) {
    loop {
        let why = match connect(&inner.client).await {
            Ok(mut conn) => {
                inner.set_up(true, "");
                serve(&inner, &mut conn).await
            }
            Err(why) => why,
        };
        inner.set_up(false, &why);
        inner.fail_queued(&why);
        monoio::time::sleep(RETRY).await;
    }
}

/// A new connection, logged in, on the right database, with the scripts loaded.
async fn connect(client: &Client) -> Result<Conn, String> {
    let deadline = Instant::now() + client.timeout.max(Duration::from_millis(500));
    let tcp = connect_tcp(&client.name, deadline)
        .await
        .map_err(|e| match e {
            UpstreamError::Io(e) => format!("connect: {e}"),
            UpstreamError::TimedOut => "connect: timed out".to_owned(),
            UpstreamError::Unresolved(why) => format!("connect: {why}"),
            other => format!("connect: {other:?}"),
        })?;
    let mut conn = match &client.tls {
        None => Conn::new(tcp),
        Some(tls) => {
            let left = deadline.saturating_duration_since(Instant::now());
            let handshake = TlsStream::connect(tcp, tls.config.clone(), tls.server_name.clone());
            match monoio::time::timeout(left, Box::pin(handshake)).await {
                Ok(Ok(stream)) => Conn::new(stream),
                Ok(Err(e)) => return Err(format!("TLS handshake: {e}")),
                Err(_) => return Err("TLS handshake timed out".into()),
            }
        }
    };
    let mut out = Vec::new();
    let mut what: Vec<&str> = Vec::new();
    if let Some(password) = &client.url.password {
        match &client.url.user {
            Some(user) => resp::encode(&mut out, &[b"AUTH", user.as_bytes(), password.as_bytes()]),
            None => resp::encode(&mut out, &[b"AUTH", password.as_bytes()]),
        }
        what.push("AUTH");
    }
    let db = client.url.db.to_string();
    if client.url.db != 0 {
        resp::encode(&mut out, &[b"SELECT", db.as_bytes()]);
        what.push("SELECT");
    }
    for Script { text, .. } in &client.scripts {
        resp::encode(&mut out, &[b"SCRIPT", b"LOAD", text.as_bytes()]);
        what.push("SCRIPT LOAD");
    }
    if out.is_empty() {
        resp::encode(&mut out, &[b"PING"]);
        what.push("PING");
    }
    let deadline = Instant::now() + client.liveness().max(Duration::from_millis(500));
    match monoio::time::timeout_at(deadline.into(), conn.write_all(out)).await {
        Ok((res, _)) => res.map_err(|e| format!("write: {e}"))?,
        Err(_) => return Err("write: no progress in time".into()),
    }
    for (i, command) in what.iter().enumerate() {
        match read_reply(&mut conn, deadline).await? {
            Value::Error(e) => return Err(format!("{command}: {e}")),
            reply if *command == "SCRIPT LOAD" => {
                let script = &client.scripts[i + client.scripts.len() - what.len()];
                if reply != Value::Bulk(Some(script.sha.as_bytes().to_vec())) {
                    return Err(format!(
                        "SCRIPT LOAD answered {reply:?}, not the script's SHA-1"
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(conn)
}

/// Serves the queue until the connection fails; returns why.
async fn serve(inner: &Inner, conn: &mut Conn) -> String {
    let client = &inner.client;
    let mut out = Vec::with_capacity(4096);
    let mut batch: Vec<Done> = Vec::with_capacity(16);
    loop {
        let _ = monoio::time::timeout(PING_EVERY, work(inner)).await;
        out.clear();
        {
            let mut queue = inner.queue.borrow_mut();
            while batch.len() < MAX_BATCH {
                let Some(job) = queue.pop_front() else { break };
                out.extend_from_slice(&job.command);
                batch.push(job.done);
            }
        }
        if batch.is_empty() {
            resp::encode(&mut out, &[b"PING"]);
            batch.push(Box::new(|_| {}));
        }
        client
            .commands
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let deadline = Instant::now() + client.liveness();
        let written = monoio::time::timeout(client.liveness(), conn.write_all(out)).await;
        let mut failed;
        (failed, out) = match written {
            Ok((res, back)) => (res.err().map(|e| format!("write: {e}")), back),
            Err(_) => (
                Some("write: no progress in time".to_owned()),
                Vec::with_capacity(4096),
            ),
        };
        for done in batch.drain(..) {
            if let Some(why) = &failed {
                done(Err(Failure::Down(why.clone())));
                continue;
            }
            match read_reply(conn, deadline).await {
                Ok(Value::Error(e)) => {
                    // None of the link's commands should fail: the server cannot serve it as
                    // it is (NOSCRIPT after SCRIPT FLUSH, READONLY after a failover, LOADING,
                    // OOM, NOAUTH, ...). Calls go on without it; a new connection (names
                    // resolved again, scripts loaded again) is tried in a moment.
                    let why = format!("it answered {:?}", e.chars().take(200).collect::<String>());
                    done(Err(Failure::Down(why.clone())));
                    failed = Some(why);
                }
                Ok(v) => done(Ok(v)),
                Err(why) => {
                    done(Err(Failure::Down(why.clone())));
                    failed = Some(why);
                }
            }
        }
        if let Some(why) = failed {
            return why;
        }
    }
}

/// Ready when the queue has a command.
async fn work(inner: &Inner) {
    poll_fn(|cx| {
        if inner.queue.borrow().is_empty() {
            inner.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await
}

/// The next reply, read by `deadline`.
async fn read_reply(conn: &mut Conn, deadline: Instant) -> Result<Value, String> {
    loop {
        match resp::parse(&conn.buf) {
            Ok(Some((v, n))) => {
                conn.buf.advance(n);
                return Ok(v);
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        if conn.buf.len() > MAX_PENDING {
            return Err(format!("a reply past {MAX_PENDING} bytes"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no reply in time".into());
        }
        match conn.fill_within(Some(left)).await {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(_) => {}
            Err(ReadError::TimedOut) => return Err("no reply in time".into()),
            Err(ReadError::Io(e)) => return Err(format!("read: {e}")),
        }
    }
}
