//! One worker per core: its own monoio runtime (io_uring, else epoll) pinned to its core, its
//! own SO_REUSEPORT listener, its accept loop and its registry of open connections for the
//! drain. Each accepted connection is served by [`crate::serve::serve_connection`]. Nothing
//! here is shared with other workers except the read-only configuration and the shutdown flag.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use monoio::net::{TcpListener, TcpStream};

use crate::config::{Config, IoDriver};
use crate::core::{Core, shutting_down};
use crate::jwt::JwtVerifier;
use crate::mcp::session::SessionKeys;
use crate::metrics::WorkerStats;
use crate::policy::live::{LivePolicy, PolicyView};
use crate::ratelimit::{FleetLimiter, Limiter};
use crate::serve::Activity;
use crate::{debug, error, info, warn};

/// A connection as the registry knows it: its socket, what it is doing, whether it was accepted
/// while draining (then it is left to bring its answer, not closed for being idle), and what the
/// idle sweep saw of it.
struct OpenConnection {
    fd: RawFd,
    activity: Rc<Activity>,
    draining: bool,
    /// Requests begun when the sweep last looked, and how many sweeps in a row found it idle
    /// with none begun since.
    seen_begun: u32,
    quiet_sweeps: u32,
}

/// What every worker starts from: read-only configuration, the live policy, session keys.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    /// Fleet-wide rate limits (`SCOPEGATE_REDIS_URL`): each worker starts its link.
    pub fleet: Option<Arc<crate::ratelimit::Fleet>>,
    pub policy: Option<Arc<LivePolicy>>,
    pub sessions: Arc<SessionKeys>,
    pub jwt: Option<Arc<JwtVerifier>>,
    /// One audit channel per worker (indexed by worker id), when the audit log is on.
    pub audit: Vec<Arc<crate::audit::writer::Channel>>,
    /// Every worker's counters, for `/metrics` (read only at scrape time).
    pub all_stats: Arc<Vec<Arc<WorkerStats>>>,
    /// The HTTPS listener's configuration (reloaded in place), when serving TLS.
    pub tls: Option<Arc<crate::tls::server::ListenerTls>>,
    /// Each upstream's list changes, for every core's list cache.
    pub list_changes: Arc<crate::core::ListChanges>,
}

/// What is left of [`Shared`] once the config is taken.
struct SharedRest {
    config_audit: Option<crate::audit::writer::AuditConfig>,
    policy: Option<Arc<LivePolicy>>,
    sessions: Arc<SessionKeys>,
    jwt: Option<Arc<JwtVerifier>>,
    audit: Vec<Arc<crate::audit::writer::Channel>>,
    all_stats: Arc<Vec<Arc<WorkerStats>>>,
    tls: Option<Arc<crate::tls::server::ListenerTls>>,
}

/// A worker's open connections, for the idle sweep and the drain. Touched once per connection
/// (open/close); per request only the connection's `Activity` cells change.
#[derive(Default)]
struct Registry {
    connections: RefCell<HashMap<u64, OpenConnection>>,
    next: Cell<u64>,
}

/// Starts a worker on the current thread and runs it until shutdown drains it.
pub fn run(id: usize, shared: Shared, listener: std::net::TcpListener, stats: Arc<WorkerStats>) {
    let config = shared.config.clone();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let core = id % cores;
    let pinned = monoio::utils::bind_to_cpu_set([core]).is_ok();
    // The stats live for the whole process (held by `Shared`); leaking one Arc makes the
    // counter's lifetime explicit for the allocator.
    let counter: &'static Arc<WorkerStats> = Box::leak(Box::new(stats.clone()));
    crate::alloc::count_into(&counter.allocations);

    let uring_available = monoio::utils::detect_uring();
    let use_uring = match config.io_driver {
        IoDriver::Auto => uring_available,
        IoDriver::IoUring => {
            if !uring_available {
                error!(
                    "worker {id}: SCOPEGATE_IO_DRIVER=io_uring but io_uring is unavailable here"
                );
                std::process::exit(2);
            }
            true
        }
        IoDriver::Epoll => false,
    };
    let driver = if use_uring { "io_uring" } else { "epoll" };
    info!(
        "worker {id}: {driver} driver{}{}",
        if pinned {
            format!(", pinned to core {core}")
        } else {
            ", not pinned".into()
        },
        if !uring_available && config.io_driver == IoDriver::Auto {
            " (io_uring unavailable: seccomp or kernel.io_uring_disabled)"
        } else {
            ""
        }
    );

    let main = worker_main(id, shared, listener, stats);
    if use_uring {
        match build_uring_runtime() {
            Ok((mut rt, flags)) => {
                info!("worker {id}: io_uring setup: {flags}");
                rt.block_on(main);
                drop(rt);
                crate::timer::end_of_runtime();
            }
            Err(e) => {
                error!("worker {id}: cannot build the io_uring runtime: {e}");
                std::process::exit(1);
            }
        }
    } else {
        match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
        {
            Ok(mut rt) => {
                rt.block_on(main);
                drop(rt);
                crate::timer::end_of_runtime();
            }
            Err(e) => {
                error!("worker {id}: cannot build the epoll runtime: {e}");
                std::process::exit(1);
            }
        }
    }
}

type UringRuntime = monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>;

/// io_uring with the flags that suit one thread owning its ring: completions are delivered when
/// the worker next enters the kernel instead of by interrupting it (COOP_TASKRUN, TASKRUN_FLAG),
/// and the kernel may skip cross-thread locking (SINGLE_ISSUER). Measured with scripts/bench.sh
/// on this project's 2-core machine: ~21 -> ~14 µs of CPU per forwarded request. Kernels before
/// 6.0 reject the flags; then the ring is built without them.
fn build_uring_runtime() -> std::io::Result<(UringRuntime, &'static str)> {
    let mut tuned = io_uring::IoUring::builder();
    tuned
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_single_issuer();
    let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .with_entries(URING_ENTRIES)
        .uring_builder(tuned)
        .build();
    match built {
        Ok(rt) => Ok((rt, "COOP_TASKRUN | TASKRUN_FLAG | SINGLE_ISSUER")),
        Err(_) => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .with_entries(URING_ENTRIES)
            .build()
            .map(|rt| {
                (
                    rt,
                    "default flags (the kernel refused COOP_TASKRUN/SINGLE_ISSUER)",
                )
            }),
    }
}

/// Submission queue depth per worker.
const URING_ENTRIES: u32 = 1024;

async fn worker_main(
    id: usize,
    shared: Shared,
    listener: std::net::TcpListener,
    stats: Arc<WorkerStats>,
) {
    let config = shared.config;
    let fleet = shared.fleet;
    let list_changes = shared.list_changes;
    let shared = SharedRest {
        config_audit: config.audit.clone(),
        policy: shared.policy,
        sessions: shared.sessions,
        jwt: shared.jwt,
        audit: shared.audit,
        all_stats: shared.all_stats,
        tls: shared.tls,
    };
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            error!("worker {id}: cannot adopt the listener: {e}");
            std::process::exit(1);
        }
    };
    let limiter = match fleet {
        None => Limiter::default(),
        Some(fleet) => Limiter::Fleet(Rc::new(FleetLimiter::start(fleet, id))),
    };
    let core = Core::new(
        id,
        config.clone(),
        stats,
        shared.sessions,
        limiter,
        list_changes,
        shared.policy.clone(),
    );
    let audit = shared.audit.get(id).map(|channel| {
        let cfg = shared.config_audit.as_ref();
        crate::audit::AuditSink::new(
            id,
            channel.clone(),
            cfg.is_some_and(|c| c.fail_closed),
            cfg.map_or(4096, |c| c.max_args),
        )
    });
    let worker = Rc::new(crate::serve::Worker::new(
        core,
        shared.policy.map(PolicyView::new),
        shared.jwt,
        audit,
        shared.all_stats.clone(),
        shared.audit.clone(),
        shared.tls,
    ));
    let registry = Rc::new(Registry::default());
    monoio::spawn(drain_watch(registry.clone(), listener.as_raw_fd()));
    monoio::spawn(idle_sweep(registry.clone(), config.idle_timeout));

    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Accepted while draining: only for answers to requests in flight.
                let draining = shutting_down();
                let _ = stream.set_nodelay(true);
                let guard = register(&registry, &worker.core.stats, &stream, draining);
                // One allocation per connection: its task, which holds the connection's future
                // inline (the guard leaves the registry when the future is dropped, however it
                // ends). A bug that panics while serving a connection ends that connection (its
                // socket is closed), not the worker and every connection it serves.
                let served =
                    crate::serve::serve_connection(worker.clone(), stream, peer, guard, draining);
                monoio::spawn(Contained {
                    future: served,
                    worker: id,
                });
            }
            Err(e) => {
                if shutting_down() {
                    break;
                }
                // EMFILE and friends: back off briefly instead of spinning. Peers cause it (a
                // flood of connections), so it is told within the log's budget for them.
                if let Some(dropped) = crate::log::budget() {
                    match dropped {
                        0 => warn!("worker {id}: accept failed: {e}"),
                        n => warn!(
                            "worker {id}: accept failed: {e} ({n} lines dropped before this one)"
                        ),
                    }
                }
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    drop(listener);

    // Drain: idle keep-alive connections are closed now (their pending read sees end of
    // stream); busy ones finish their request and close. The main thread bounds the wait.
    close_idle_connections(&registry, true);
    while !registry.connections.borrow().is_empty() {
        monoio::time::sleep(Duration::from_millis(5)).await;
        close_idle_connections(&registry, true);
    }
    // Integrity events no request's record stage wrote (the answer that showed them was the
    // last before shutdown, or its agent went away) go in before the audit writer stops.
    if let Some(audit) = &worker.audit {
        crate::serve::record::write_integrity_events(audit).await;
    }
    debug!("worker {id}: drained");
}

/// Waits for shutdown, then drains: idle connections are closed (their pending read sees end of
/// stream), and the listener keeps taking connections while any request is in flight, because
/// an answer it waits for (sampling, elicitation) comes on a new POST; once none is, the
/// listener is shut, which ends the accept loop. The main thread bounds the wait.
async fn drain_watch(registry: Rc<Registry>, listener: RawFd) {
    while !shutting_down() {
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        close_idle_connections(&registry, false);
        let busy = registry
            .connections
            .borrow()
            .values()
            .any(|c| !c.activity.is_idle());
        if !busy {
            // SAFETY: the listener's fd stays open until the accept loop, which this ends, drops
            // the listener.
            unsafe {
                libc::shutdown(listener, libc::SHUT_RDWR);
            }
            return;
        }
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Removes a connection from the registry when its task ends, however it ends.
pub struct ConnectionGuard {
    registry: Rc<Registry>,
    stats: Arc<WorkerStats>,
    key: u64,
    pub activity: Rc<Activity>,
}

impl std::ops::Deref for ConnectionGuard {
    type Target = Activity;

    fn deref(&self) -> &Activity {
        &self.activity
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.registry.connections.borrow_mut().remove(&self.key);
        self.stats.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

fn register(
    registry: &Rc<Registry>,
    stats: &Arc<WorkerStats>,
    stream: &TcpStream,
    draining: bool,
) -> ConnectionGuard {
    let key = registry.next.get();
    registry.next.set(key + 1);
    let activity = Rc::new(Activity::default());
    let open = OpenConnection {
        fd: stream.as_raw_fd(),
        activity: activity.clone(),
        draining,
        seen_begun: 0,
        quiet_sweeps: 0,
    };
    registry.connections.borrow_mut().insert(key, open);
    stats.open_connections.fetch_add(1, Ordering::Relaxed);
    ConnectionGuard {
        registry: registry.clone(),
        stats: stats.clone(),
        key,
        activity,
    }
}

/// Closes connections idle for `SCOPEGATE_IDLE_TIMEOUT_MS`: a sweep every quarter of it (at least
/// every 10 ms, at most every second) counts the sweeps in a row that found each connection
/// idle with no request begun since, and shuts the read side of those past the timeout (their
/// wait sees the end). One task per worker instead of a timer per connection; a connection is
/// closed between the timeout and the timeout plus one sweep after it went idle.
async fn idle_sweep(registry: Rc<Registry>, timeout: Duration) {
    let every = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    // The first sweep that finds a connection idle may come just after it went idle: one more
    // than the timeout's worth, so none is closed before the timeout.
    let quiet_needed = timeout
        .as_nanos()
        .div_ceil(every.as_nanos())
        .saturating_add(1);
    let quiet_needed = u32::try_from(quiet_needed).unwrap_or(u32::MAX);
    // Through a drain too (it ends with the runtime): a connection accepted then for an answer
    // that never comes is closed when idle for the timeout, like any other.
    loop {
        monoio::time::sleep(every).await;
        for c in registry.connections.borrow_mut().values_mut() {
            let begun = c.activity.begun();
            if !c.activity.is_idle() || begun != c.seen_begun {
                c.seen_begun = begun;
                c.quiet_sweeps = 0;
                continue;
            }
            c.quiet_sweeps += 1;
            if c.quiet_sweeps >= quiet_needed {
                // SAFETY: the fd belongs to a live connection task of this thread (the entry is
                // removed before the stream is dropped).
                unsafe {
                    libc::shutdown(c.fd, libc::SHUT_RD);
                }
            }
        }
    }
}

/// Closes the idle connections; those accepted while draining too when `all`.
fn close_idle_connections(registry: &Registry, all: bool) {
    for c in registry.connections.borrow().values() {
        if c.activity.is_idle() && (all || !c.draining) {
            // Ends the pending read with end-of-stream; the task then closes the socket.
            // SAFETY: the fd belongs to a live connection task of this thread (the entry is
            // removed before the stream is dropped).
            unsafe {
                libc::shutdown(c.fd, libc::SHUT_RD);
            }
        }
    }
}

/// Creates `n` listening sockets on `addr` with SO_REUSEPORT, so the kernel spreads new
/// connections across workers. The first resolves port 0; the rest bind to the same port.
pub fn bind_listeners(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.set_nodelay(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        if addr.port() == 0 {
            addr = listener.local_addr()?;
        }
        out.push(listener);
    }
    Ok(out)
}

/// Runs a connection's future and turns a panic inside it into `None`, logged (the panic
/// message has been printed by the panic hook). The future is held inline.
pub struct Contained<F> {
    pub future: F,
    /// The worker, for the log line.
    pub worker: usize,
}

impl<F: std::future::Future> std::future::Future for Contained<F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let worker = self.worker;
        // SAFETY: the future is structurally pinned: it is never moved out of `self`, and
        // `Contained` has no Drop or Unpin impl of its own that could move it.
        let inner = unsafe { self.as_mut().map_unchecked_mut(|c| &mut c.future) };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Some(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => {
                crate::error!("worker {worker}: a connection's task panicked; it was closed");
                std::task::Poll::Ready(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Contained;

    #[test]
    fn a_panicking_task_is_contained() {
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .build()
            .expect("runtime");
        let (panicked, fine) = rt.block_on(async {
            let panicked = Contained {
                future: async {
                    if std::hint::black_box(true) {
                        panic!("a bug");
                    }
                    1
                },
                worker: 0,
            }
            .await;
            let fine = Contained {
                future: async { 2 },
                worker: 0,
            }
            .await;
            (panicked, fine)
        });
        assert_eq!(panicked, None);
        assert_eq!(fine, Some(2));
    }
}
