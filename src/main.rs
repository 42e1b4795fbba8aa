//! Start-up: environment -> Config, one worker per core, signals.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use scopegate::config::Config;
use scopegate::worker::{self, SHUTTING_DOWN, WorkerStats};
use scopegate::{error, info, warn};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
scopegate: an MCP gateway

usage:
  scopegate            run the gateway (configured by SCOPEGATE_* environment variables)
  scopegate --version  print the version
  scopegate --help     print this help

See README.md for every variable.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("serve") => serve(),
        Some("--version") | Some("-V") | Some("version") => {
            println!("scopegate {}", env!("CARGO_PKG_VERSION"));
        }
        Some("--help") | Some("-h") | Some("help") => println!("{USAGE}"),
        Some(other) => {
            eprintln!("scopegate: unknown command {other:?}\n\n{USAGE}");
            std::process::exit(2);
        }
    }
}

fn serve() {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("scopegate: configuration error: {e}");
            std::process::exit(2);
        }
    };
    scopegate::log::set_level(config.log_level);

    if config.insecure_open {
        for line in [
            "*****************************************************************",
            "SCOPEGATE_INSECURE_OPEN=1: NO AUTHENTICATION, NO AUTHORIZATION.",
            "Every request is forwarded to the upstreams as it is. Use this for",
            "local development only, never where anyone else can connect.",
            "*****************************************************************",
        ] {
            warn!("{line}");
        }
    }

    // Signals are taken by the main thread alone (sigwait below): block them before any worker
    // thread exists so every thread inherits the mask.
    let signals = blocked_signals();

    let listeners = match worker::bind_listeners(config.listen, config.threads) {
        Ok(l) => l,
        Err(e) => {
            error!("cannot listen on {}: {e}", config.listen);
            std::process::exit(1);
        }
    };
    let bound = listeners[0].local_addr().unwrap_or(config.listen);
    let listener_fds: Vec<i32> = listeners
        .iter()
        .map(std::os::fd::AsRawFd::as_raw_fd)
        .collect();

    let config = Arc::new(config);
    for u in &config.upstreams {
        info!(
            "upstream {} -> http://{}{}",
            u.name, u.url.host_header, u.url.path
        );
    }
    let mut workers = Vec::new();
    for (id, listener) in listeners.into_iter().enumerate() {
        let config = config.clone();
        let stats = Arc::new(WorkerStats::default());
        let handle = std::thread::Builder::new()
            .name(format!("scopegate-w{id}"))
            .spawn({
                let stats = stats.clone();
                move || worker::run(id, config, listener, stats)
            });
        match handle {
            Ok(h) => workers.push((h, stats)),
            Err(e) => {
                error!("cannot start worker {id}: {e}");
                std::process::exit(1);
            }
        }
    }
    info!("listening on {bound} with {} worker(s)", config.threads);

    loop {
        match wait_signal(&signals) {
            libc::SIGHUP => info!("SIGHUP: nothing to reload (no policy file in this build)"),
            sig => {
                let name = if sig == libc::SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                info!(
                    "{name}: no longer accepting; draining in-flight requests (up to {} ms)",
                    config.drain.as_millis()
                );
                break;
            }
        }
    }

    SHUTTING_DOWN.store(true, Ordering::SeqCst);
    for fd in &listener_fds {
        // Wakes each worker's pending accept with an error and refuses new connections;
        // the worker then drops its listener.
        // SAFETY: the fds are the listeners created above; the workers own them and close them
        // only after their accept loop ends, which this call causes.
        unsafe {
            libc::shutdown(*fd, libc::SHUT_RDWR);
        }
    }
    let deadline = Instant::now() + config.drain;
    while Instant::now() < deadline && !workers.iter().all(|(h, _)| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let open: usize = workers
        .iter()
        .map(|(_, s)| s.open_connections.load(Ordering::Relaxed))
        .sum();
    if open > 0 {
        warn!("drain deadline reached with {open} connection(s) still open; closing them");
    } else {
        info!("drained; exiting");
    }
    std::process::exit(0);
}

fn blocked_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a zeroed, then initialised, set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` was initialised by blocked_signals; sigwait writes one int.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc == 0 {
            return sig;
        }
    }
}
