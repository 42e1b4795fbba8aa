//! A stdio upstream as the rest of scopegate sees it: a [`Transport`](super::Transport) whose
//! connections are socket pairs served by bridge threads ([`super::stdio_bridge`]), over the
//! upstream's hub of processes ([`super::stdio_hub`]).
//!
//! Hubs outlive the policy that named them: a reload builds new upstream definitions, and an
//! unchanged stdio upstream (same name, command, environment, directory and settings) keeps
//! its hub, so open sessions and their processes carry on. One janitor thread ends idle
//! sessions for every hub.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::process::Spec;
use super::stdio_bridge;
use super::stdio_hub::Hub;
pub use super::stdio_hub::Options;

/// One stdio upstream: how its processes start and the hub that runs them.
pub struct Stdio {
    pub hub: Arc<Hub>,
    key: u64,
}

impl std::fmt::Debug for Stdio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stdio")
            .field("command", &self.hub.spec.command)
            .field("options", &self.hub.options)
            .finish()
    }
}

impl PartialEq for Stdio {
    fn eq(&self, other: &Stdio) -> bool {
        self.hub.spec == other.hub.spec && self.hub.options == other.hub.options
    }
}

impl Eq for Stdio {}

/// Every hub alive, for reloads to find and the janitor to sweep.
fn registry() -> &'static Mutex<Vec<Weak<Hub>>> {
    static HUBS: OnceLock<Mutex<Vec<Weak<Hub>>>> = OnceLock::new();
    HUBS.get_or_init(|| Mutex::new(Vec::new()))
}

fn hubs() -> Vec<Arc<Hub>> {
    let mut all = registry().lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|w| w.strong_count() > 0);
    all.iter().filter_map(Weak::upgrade).collect()
}

impl Stdio {
    /// The upstream `name` started as `spec`: the hub of an equal upstream already running,
    /// else a new one (no process starts until a session opens).
    pub fn new(name: &str, spec: Spec, options: Options) -> Stdio {
        let hub = {
            let mut all = registry().lock().unwrap_or_else(|p| p.into_inner());
            all.retain(|w| w.strong_count() > 0);
            let same = all.iter().filter_map(Weak::upgrade).find(|h| {
                h.name == name
                    && h.spec == spec
                    && h.options
                        == Options {
                            max_processes: options.max_processes.max(1),
                            ..options.clone()
                        }
            });
            match same {
                Some(hub) => hub,
                None => {
                    let hub = Arc::new(Hub::new(name, spec, options));
                    all.push(Arc::downgrade(&hub));
                    hub
                }
            }
        };
        start_janitor();
        // Pooled connections are bridges to this hub and no other.
        let key = hub.instance;
        Stdio { hub, key }
    }

    /// A new connection: one end of a socket pair whose other end a bridge thread serves.
    pub fn connect(&self) -> std::io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        let hub = self.hub.clone();
        std::thread::Builder::new()
            .name(format!("bridge-{}", self.hub.name))
            .spawn(move || stdio_bridge::serve(hub, theirs))?;
        Ok(ours)
    }

    /// Why the process behind a session token (as the bridge issued it) ended, if it did.
    pub fn ended(&self, token: &[u8]) -> Option<String> {
        let session = stdio_bridge::session_of(&self.hub, token)?;
        self.hub.ended(session)
    }

    /// Which connections are interchangeable: this upstream's.
    pub fn pool_key(&self) -> u64 {
        self.key
    }

    /// The command as a line for the log.
    pub fn describe(&self) -> String {
        format!("stdio: {}", self.hub.spec.command.join(" "))
    }
}

/// After a policy reload: sessions of agents that `keeps(agent, upstream name)` says are gone
/// (removed, or no longer allowed that upstream) end, with their processes.
pub fn retain_agents(keeps: impl Fn(&str, &str) -> bool) -> usize {
    hubs()
        .iter()
        .map(|hub| hub.close_agents(|agent| !keeps(agent, &hub.name)))
        .sum()
}

/// scopegate is stopping: every session and process ends.
pub fn shutdown() {
    for hub in hubs() {
        hub.close_all();
    }
}

/// Processes running over every stdio upstream.
pub fn processes() -> usize {
    hubs().iter().map(|h| h.processes()).sum()
}

/// The one thread that ends idle sessions (and those whose process died), once a second.
fn start_janitor() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let started = std::thread::Builder::new()
            .name("stdio-janitor".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let now = Instant::now();
                    for hub in hubs() {
                        let ended = hub.sweep(now);
                        if ended > 0 {
                            crate::info!(
                                "stdio upstream {:?}: {ended} idle or ended session(s) closed",
                                hub.name
                            );
                        }
                    }
                }
            });
        if let Err(e) = started {
            crate::error!("cannot start the stdio janitor thread: {e}");
        }
    });
}
