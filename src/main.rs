//! Start-up: environment -> Config, one worker per core, signals.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use scopegate::config::Config;
use scopegate::core::SHUTTING_DOWN;
use scopegate::jwt::JwtVerifier;
use scopegate::mcp::session::SessionKeys;
use scopegate::metrics::WorkerStats;
use scopegate::policy::Policy;
use scopegate::policy::live::LivePolicy;
use scopegate::policy::load::ProcessEnv;
use scopegate::runtime::{self, Shared};
use scopegate::tls::server::ListenerTls;
use scopegate::{error, info, warn};

#[global_allocator]
static GLOBAL: scopegate::alloc::Counting<mimalloc::MiMalloc> =
    scopegate::alloc::Counting(mimalloc::MiMalloc);

const USAGE: &str = "\
scopegate: an MCP gateway

usage:
  scopegate                       run the gateway (configured by SCOPEGATE_* variables)
  scopegate hash-key [KEY]        print the key_sha256 of KEY; without KEY, make a strong
                                  random key and print both
  scopegate validate FILE         load a policy file and report the first problem, if any
  scopegate check --policy FILE --agent ID --tool UPSTREAM/NAME [--args JSON]
                                  print allow or deny and the rule that decided
  scopegate audit verify DIR      check the audit log's hash chains; name the first line
                                  that was changed, removed or reordered
  scopegate tools pin [UPSTREAM...]
                                  record what each upstream's tools and prompts say now in
                                  the pin file (SCOPEGATE_PINS)
  scopegate tools diff [UPSTREAM...]
                                  show what changed since pinned (exit 1 when anything did)
  scopegate tools approve UPSTREAM/TOOL [UPSTREAM/prompt:NAME...]
                                  re-pin reviewed definitions (SIGHUP applies them)
  scopegate tools scan [UPSTREAM...]
                                  run the poison scan on every definition (exit 1 on findings)
  scopegate --version             print the version

See README.md for every variable.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("serve") => serve(),
        Some("--version") | Some("-V") | Some("version") => {
            println!("scopegate {}", env!("CARGO_PKG_VERSION"));
        }
        Some("--help") | Some("-h") | Some("help") => println!("{USAGE}"),
        Some("hash-key") => std::process::exit(scopegate::cli::hash_key(&args[1..])),
        Some("validate") => std::process::exit(scopegate::cli::validate(&args[1..])),
        Some("check") => std::process::exit(scopegate::cli::check(&args[1..])),
        Some("audit") => std::process::exit(scopegate::cli::audit(&args[1..])),
        Some("tools") => std::process::exit(scopegate::cli::tools(&args[1..])),
        Some(other) => {
            eprintln!("scopegate: unknown command {other:?}\n\n{USAGE}");
            std::process::exit(2);
        }
    }
}

fn serve() {
    let mut config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("scopegate: configuration error: {e}");
            std::process::exit(2);
        }
    };
    scopegate::log::set_level(config.log_level);
    scopegate::log::set_json(config.log_json);

    // The policy names the agents and may add upstreams to those of SCOPEGATE_UPSTREAMS.
    let env_upstreams = config.upstreams.clone();
    let live = match &config.policy {
        None => None,
        Some(path) => {
            match Policy::load_with_pins(path, config.pins.as_deref(), &env_upstreams, &ProcessEnv)
            {
                Ok(p) => {
                    info!(
                        "policy {}: {} tenant(s), {} upstream(s), {} agent(s)",
                        path.display(),
                        p.tenants.len(),
                        p.upstreams().len(),
                        p.agents.len()
                    );
                    config.upstreams = p.upstreams().to_vec();
                    Some(Arc::new(LivePolicy::new(p)))
                }
                Err(e) => {
                    eprintln!("scopegate: policy error: {e}");
                    std::process::exit(2);
                }
            }
        }
    };
    if config.upstreams.is_empty() {
        eprintln!(
            "scopegate: configuration error: no upstream in SCOPEGATE_UPSTREAMS or the policy"
        );
        std::process::exit(2);
    }
    if let Err(e) = check_names(&config) {
        eprintln!("scopegate: configuration error: {e}");
        std::process::exit(2);
    }
    if config.upstreams.len() > 1
        && let Some(u) = config
            .upstreams
            .iter()
            .find(|u| u.name.contains(config.name_separator.as_str()))
    {
        eprintln!(
            "scopegate: configuration error: upstream name {:?} contains the aggregate name separator {:?} \
             (SCOPEGATE_NAME_SEPARATOR): tool names would be ambiguous; rename it or choose another separator",
            u.name, config.name_separator
        );
        std::process::exit(2);
    }
    if live.is_some() && config.session_secret.is_none() {
        warn!(
            "SCOPEGATE_SESSION_SECRET is unset: session tokens use a random key for this process; \
             sessions will not survive a restart or move between replicas"
        );
    }
    let sessions = match SessionKeys::new(config.session_secret.as_deref()) {
        Ok(k) => Arc::new(k),
        Err(e) => {
            error!("{e}");
            std::process::exit(1);
        }
    };

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

    let listeners = match runtime::bind_listeners(config.listen, config.threads) {
        Ok(l) => l,
        Err(e) => {
            error!("cannot listen on {}: {e}", config.listen);
            std::process::exit(1);
        }
    };
    let bound = listeners[0].local_addr().unwrap_or(config.listen);

    let config = Arc::new(config);
    let tls = config.tls.as_ref().map(|files| {
        let tls = ListenerTls::load(files.clone()).unwrap_or_else(|e| {
            eprintln!("scopegate: configuration error: {e}");
            std::process::exit(2);
        });
        info!(
            "serving HTTPS with {}{}",
            files.cert.display(),
            if tls.requires_client_certificate() {
                " (agents must present a client certificate)"
            } else {
                ""
            }
        );
        Arc::new(tls)
    });
    let jwt = config.jwt.as_ref().map(|j| {
        let jwks = std::fs::read_to_string(&j.keys).unwrap_or_else(|e| {
            eprintln!(
                "scopegate: configuration error: SCOPEGATE_JWT_KEYS: cannot read {}: {e}",
                j.keys.display()
            );
            std::process::exit(2);
        });
        let verifier =
            JwtVerifier::from_jwks(&jwks, &j.issuer, &j.audience, &j.agent_claim, j.leeway_s)
                .unwrap_or_else(|e| {
                    eprintln!(
                        "scopegate: configuration error: SCOPEGATE_JWT_KEYS: {}: {e}",
                        j.keys.display()
                    );
                    std::process::exit(2);
                });
        info!(
            "JWT bearer tokens accepted from issuer {} for audience {}",
            j.issuer, j.audience
        );
        Arc::new(verifier)
    });
    // The audit log: a channel and a writer thread per worker.
    let mut audit_channels = Vec::new();
    let mut audit_writers = Vec::new();
    if let Some(audit) = &config.audit {
        // The manifest first: which chains belong in this directory (earlier runs' included).
        let listed = match scopegate::audit::chain::update_manifest(&audit.dir, config.threads) {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "scopegate: configuration error: SCOPEGATE_AUDIT_DIR: {}: {e}",
                    audit.dir.display()
                );
                std::process::exit(2);
            }
        };
        for id in 0..config.threads {
            let channel = Arc::new(scopegate::audit::writer::Channel::new(audit.ring_bytes));
            match scopegate::audit::writer::spawn(
                id,
                audit.clone(),
                channel.clone(),
                listed.contains(&id),
            ) {
                Ok(handle) => audit_writers.push(handle),
                Err(e) => {
                    eprintln!(
                        "scopegate: configuration error: SCOPEGATE_AUDIT_DIR: {}: {e}",
                        audit.dir.display()
                    );
                    std::process::exit(2);
                }
            }
            audit_channels.push(channel);
        }
        info!(
            "audit log in {} (flush every {} ms{}{})",
            audit.dir.display(),
            audit.flush.as_millis(),
            if audit.fsync { ", fsync" } else { "" },
            if audit.fail_closed {
                ", fail-closed"
            } else {
                ""
            }
        );
    } else if live.is_some() {
        warn!("SCOPEGATE_AUDIT_DIR is unset: no audit log is written");
    }
    let all_stats: Arc<Vec<Arc<WorkerStats>>> = Arc::new(
        (0..config.threads)
            .map(|_| Arc::new(WorkerStats::new(config.upstreams.len())))
            .collect(),
    );
    let fleet = match &config.redis {
        None => None,
        Some(settings) => {
            match scopegate::ratelimit::Fleet::new(settings.clone(), config.threads) {
                Ok(fleet) => {
                    info!(
                        "rate limits are fleet-wide, leased from {} (timeout {} ms, fallback {})",
                        settings.url,
                        settings.timeout.as_millis(),
                        settings.fallback.name()
                    );
                    Some(fleet)
                }
                Err(e) => {
                    error!("SCOPEGATE_REDIS_URL: {e}");
                    std::process::exit(2);
                }
            }
        }
    };
    let shared = Shared {
        config: config.clone(),
        fleet,
        policy: live.clone(),
        sessions,
        jwt,
        audit: audit_channels.clone(),
        all_stats: all_stats.clone(),
        tls: tls.clone(),
        list_changes: Arc::new(scopegate::core::ListChanges::new()),
    };
    for u in &config.upstreams {
        info!("upstream {} -> {}", u.name, u.transport);
    }
    let mut workers = Vec::new();
    for (id, listener) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let stats = all_stats[id].clone();
        let handle = std::thread::Builder::new()
            .name(format!("scopegate-w{id}"))
            .spawn({
                let stats = stats.clone();
                move || runtime::run(id, shared, listener, stats)
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

    let mut watched = config.policy.as_deref().and_then(file_stamp);
    loop {
        match wait_signal(&signals, Duration::from_secs(1)) {
            None => {
                // Reload when the policy file changed (checked once a second).
                if let Some(path) = config.policy.as_deref() {
                    let now = file_stamp(path);
                    if now.is_some() && now != watched {
                        watched = now;
                        info!("policy file changed; reloading");
                        reload(&config, live.as_deref(), &env_upstreams);
                    }
                }
            }
            Some(libc::SIGHUP) => {
                if let Some(tls) = &tls {
                    // A renewed certificate: new handshakes use it, open connections go on.
                    match tls.reload() {
                        Ok(()) => info!("SIGHUP: TLS certificate and key reloaded"),
                        Err(e) => {
                            error!("SIGHUP: TLS reload failed, the old certificate stays: {e}")
                        }
                    }
                }
                info!("SIGHUP: reloading the policy");
                if let Some(path) = config.policy.as_deref() {
                    watched = file_stamp(path);
                }
                reload(&config, live.as_deref(), &env_upstreams);
            }
            Some(sig) => {
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

    // Each worker sees it within 50 ms: it closes its idle connections, takes only answers to
    // requests in flight on new ones, and shuts its listener when none is left in flight.
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
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
        info!("drained");
    }
    // Every stdio server's process group ends (stdin closed, SIGTERM, then SIGKILL).
    scopegate::upstream::stdio::shutdown();
    // Flush the audit log: every entry recorded so far is written before exit. A sink that
    // keeps failing is given a bounded time, then what could not be written is reported.
    if !audit_channels.is_empty() {
        for c in &audit_channels {
            c.stop.store(true, Ordering::Release);
            c.wake();
        }
        let flush_deadline = Instant::now() + AUDIT_FLUSH_GRACE;
        while Instant::now() < flush_deadline && !audit_writers.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let written: u64 = audit_channels
            .iter()
            .map(|c| c.written.load(Ordering::Relaxed))
            .sum();
        let pending: usize = audit_channels.iter().map(|c| c.ring.used()).sum();
        if audit_writers.iter().all(|h| h.is_finished()) {
            info!("audit: flushed; {written} entries written by this process");
        } else {
            error!(
                "audit: could not flush everything (the sink is failing); {pending} bytes of entries not written"
            );
            std::process::exit(1);
        }
    }
    info!("exiting");
    std::process::exit(0);
}

/// How long the audit writers may take to flush after the drain.
const AUDIT_FLUSH_GRACE: Duration = Duration::from_secs(10);

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

/// The next blocked signal, or `None` after `timeout`.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` was initialised by blocked_signals; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// What identifies a version of the policy file: modification time and length.
fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Every upstream host scopegate connects to directly must resolve at start (a name reached
/// through the egress proxy is the proxy's to resolve).
fn check_names(config: &Config) -> Result<(), String> {
    let names = config
        .upstreams
        .iter()
        .filter_map(|u| Some((u.name.as_str(), &*u.transport.endpoint()?.name)));
    let direct = |host: &str| config.egress.as_ref().is_none_or(|e| !e.applies_to(host));
    scopegate::upstream::resolve::check_resolved(names, direct)
}

/// Loads the policy again; an invalid file, or one that changes the set of upstreams (which
/// the workers' connection pools are built on), leaves the running policy in place.
fn reload(
    config: &Config,
    live: Option<&LivePolicy>,
    env_upstreams: &[scopegate::upstream::Upstream],
) {
    let (Some(path), Some(live)) = (config.policy.as_deref(), live) else {
        info!("no policy file to reload");
        return;
    };
    match Policy::load_with_pins(path, config.pins.as_deref(), env_upstreams, &ProcessEnv) {
        Ok(p) => {
            let same_upstreams = p.upstreams().len() == config.upstreams.len()
                && p.upstreams()
                    .iter()
                    .zip(&config.upstreams)
                    .all(|(a, b)| a.name == b.name && a.transport == b.transport);
            if !same_upstreams {
                error!(
                    "policy reload refused: the set of upstreams (names or URLs) changed; restart \
                     scopegate to apply it. The running policy stays in place."
                );
                return;
            }
            let counts = (p.tenants.len(), p.upstreams().len(), p.agents.len());
            // Which agent may still use which upstream: a stdio session of any other ends.
            let allowed: std::collections::HashSet<(&str, &str)> = (0..p.agents.len())
                .flat_map(|a| {
                    let p = &p;
                    p.upstreams()
                        .iter()
                        .enumerate()
                        .filter(move |&(i, _)| p.may_use_upstream(a, i))
                        .map(move |(_, u)| (p.agents[a].id.as_str(), u.name.as_str()))
                })
                .collect();
            let ended = scopegate::upstream::stdio::retain_agents(|a, u| allowed.contains(&(a, u)));
            drop(allowed);
            if ended > 0 {
                info!("policy reload: {ended} stdio session(s) of agents no longer allowed ended");
            }
            // Logged once in effect: the next request on any worker sees the new policy.
            live.replace(p);
            info!(
                "policy reloaded: {} tenant(s), {} upstream(s), {} agent(s)",
                counts.0, counts.1, counts.2
            );
        }
        Err(e) => error!("policy reload failed, the running policy stays in place: {e}"),
    }
}
