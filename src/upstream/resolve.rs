//! Upstream host names and the addresses they resolve to. A name is resolved when the upstream
//! is defined and again in the background: every [`REFRESH`], and soon (at most once a
//! [`MIN_GAP`]) when connecting to all its addresses failed. Connections take the latest
//! addresses without waiting: resolving (a blocking call that can take seconds) never runs on a
//! worker. IP literals are never resolved. A name that does not resolve at start is kept (a
//! name only the egress proxy can resolve is normal); [`check_resolved`] is what stops start-up
//! for one that will be connected to directly.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

/// How often every name is resolved again: hosted endpoints move, and DNS answers carry TTLs
/// of a minute or less.
pub const REFRESH: Duration = Duration::from_secs(10);

/// The least time between two refreshes asked for by failed connections.
pub const MIN_GAP: Duration = Duration::from_secs(1);

/// A host and port and their current addresses.
#[derive(Debug)]
pub struct Name {
    host: String,
    port: u16,
    /// Empty while the name does not resolve; then `why` says why.
    addrs: RwLock<(Arc<[SocketAddr]>, Option<String>)>,
    /// A refresh was asked for and has not run yet.
    asked: AtomicBool,
}

impl Name {
    /// Resolves `host` (a name, an IPv4 address or a bracket-less IPv6 address) now; a name
    /// that does not resolve is kept without addresses and tried again in the background.
    pub fn new(host: &str, port: u16) -> Arc<Name> {
        let literal = host.parse::<IpAddr>().ok();
        let addrs: (Arc<[SocketAddr]>, Option<String>) = match literal {
            Some(ip) => (Arc::new([SocketAddr::new(ip, port)]), None),
            None => match resolve(host, port) {
                Ok(addrs) => (addrs.into(), None),
                Err(why) => (Arc::new([]), Some(why)),
            },
        };
        let name = Arc::new(Name {
            host: host.to_owned(),
            port,
            addrs: RwLock::new(addrs),
            asked: AtomicBool::new(false),
        });
        if literal.is_none() {
            refresher().send(Msg::Watch(Arc::downgrade(&name))).ok();
        }
        name
    }

    /// Why the name has no address (empty when it has some).
    pub fn unresolved_reason(&self) -> String {
        let addrs = self.addrs.read().unwrap_or_else(|p| p.into_inner());
        addrs.1.clone().unwrap_or_default()
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The addresses to try, in the resolver's order (empty while unresolved).
    pub fn addrs(&self) -> Arc<[SocketAddr]> {
        self.addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// None of the addresses answered: resolve again soon rather than at the next refresh
    /// (one request at a time per name, however many connections fail meanwhile).
    pub fn failed(&self) {
        if self.host.parse::<IpAddr>().is_err() && !self.asked.swap(true, Ordering::Relaxed) {
            refresher().send(Msg::Now).ok();
        }
    }

    fn refresh(&self) {
        self.asked.store(false, Ordering::Relaxed);
        let mut addrs = self.addrs.write().unwrap_or_else(|p| p.into_inner());
        match resolve(&self.host, self.port) {
            Ok(new) => *addrs = (new.into(), None),
            // A name that stops resolving keeps its last addresses: a DNS hiccup is not an
            // outage.
            Err(why) if addrs.0.is_empty() => addrs.1 = Some(why),
            Err(_) => {}
        }
    }
}

/// Every name that will be connected to directly (`direct` says which) must resolve now: a
/// typo stops start-up rather than failing every call.
pub fn check_resolved<'a>(
    names: impl IntoIterator<Item = (&'a str, &'a Name)>,
    direct: impl Fn(&str) -> bool,
) -> Result<(), String> {
    for (upstream, name) in names {
        if name.addrs().is_empty() && direct(name.host()) {
            return Err(format!(
                "upstream {upstream:?}: {}",
                name.unresolved_reason()
            ));
        }
    }
    Ok(())
}

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host:?} resolves to no address"));
    }
    Ok(addrs)
}

enum Msg {
    Watch(Weak<Name>),
    Now,
}

/// The background resolver, started with the first name that needs it.
fn refresher() -> Sender<Msg> {
    static TX: OnceLock<Mutex<Sender<Msg>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("scopegate-dns".into())
            .spawn(move || {
                let mut names: Vec<Weak<Name>> = Vec::new();
                let mut last = Instant::now();
                loop {
                    match rx.recv_timeout(REFRESH.saturating_sub(last.elapsed())) {
                        Ok(Msg::Watch(name)) => {
                            names.push(name);
                            continue;
                        }
                        Ok(Msg::Now) => std::thread::sleep(MIN_GAP.saturating_sub(last.elapsed())),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    // Requests that came meanwhile are answered by this one refresh.
                    while let Ok(msg) = rx.try_recv() {
                        if let Msg::Watch(name) = msg {
                            names.push(name);
                        }
                    }
                    last = Instant::now();
                    names.retain(|n| n.strong_count() > 0);
                    for name in names.iter().filter_map(Weak::upgrade) {
                        name.refresh();
                    }
                }
            })
            .expect("spawn the DNS refresh thread");
        Mutex::new(tx)
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_names() {
        let v4 = Name::new("127.0.0.1", 9);
        assert_eq!(&v4.addrs()[..], &["127.0.0.1:9".parse().unwrap()]);
        let v6 = Name::new("::1", 9);
        assert_eq!(&v6.addrs()[..], &["[::1]:9".parse().unwrap()]);
        let local = Name::new("localhost", 9);
        assert!(!local.addrs().is_empty());
        assert!(local.addrs().iter().all(|a| a.ip().is_loopback()));
        local.failed();
        local.failed();
        let typo = Name::new("no-such-host.invalid", 9);
        assert!(typo.addrs().is_empty());
        assert!(typo.unresolved_reason().contains("no-such-host.invalid"));
        let names = [("a", &*v4), ("b", &*typo)];
        let e = check_resolved(names, |_| true).unwrap_err();
        assert!(e.starts_with("upstream \"b\": cannot resolve"), "{e}");
        // Reached through the egress proxy: the proxy resolves it.
        assert!(check_resolved(names, |h| h != "no-such-host.invalid").is_ok());
    }
}
