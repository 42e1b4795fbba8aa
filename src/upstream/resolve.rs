//! Upstream host names and the addresses they resolve to. A name is resolved when the upstream
//! is defined (so a typo stops start-up) and again in the background: every [`REFRESH`], and
//! at once when connecting to all its addresses failed. Connections take the latest addresses
//! without waiting: resolving (a blocking call that can take seconds) never runs on a worker.
//! IP literals are never resolved.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

/// How often every name is resolved again: hosted endpoints move, and DNS answers carry TTLs
/// of a minute or less.
pub const REFRESH: Duration = Duration::from_secs(10);

/// A host and port and their current addresses.
#[derive(Debug)]
pub struct Name {
    host: String,
    port: u16,
    addrs: RwLock<Arc<[SocketAddr]>>,
}

impl Name {
    /// Resolves `host` (a name, an IPv4 address or a bracket-less IPv6 address) now.
    pub fn new(host: &str, port: u16) -> Result<Arc<Name>, String> {
        let literal = host.parse::<IpAddr>().ok();
        let addrs: Arc<[SocketAddr]> = match literal {
            Some(ip) => Arc::new([SocketAddr::new(ip, port)]),
            None => resolve(host, port)?.into(),
        };
        let name = Arc::new(Name {
            host: host.to_owned(),
            port,
            addrs: RwLock::new(addrs),
        });
        if literal.is_none() {
            refresher().send(Msg::Watch(Arc::downgrade(&name))).ok();
        }
        Ok(name)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The addresses to try, in the resolver's order.
    pub fn addrs(&self) -> Arc<[SocketAddr]> {
        self.addrs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// None of the addresses answered: resolve again soon rather than at the next refresh.
    pub fn failed(&self) {
        if self.host.parse::<IpAddr>().is_err() {
            refresher().send(Msg::Now).ok();
        }
    }

    fn refresh(&self) {
        // A name that stops resolving keeps its last addresses: a DNS hiccup is not an outage.
        if let Ok(addrs) = resolve(&self.host, self.port) {
            *self.addrs.write().unwrap_or_else(|p| p.into_inner()) = addrs.into();
        }
    }
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
                loop {
                    match rx.recv_timeout(REFRESH) {
                        Ok(Msg::Watch(name)) => {
                            names.push(name);
                            continue;
                        }
                        Ok(Msg::Now) | Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
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
        let v4 = Name::new("127.0.0.1", 9).unwrap();
        assert_eq!(&v4.addrs()[..], &["127.0.0.1:9".parse().unwrap()]);
        let v6 = Name::new("::1", 9).unwrap();
        assert_eq!(&v6.addrs()[..], &["[::1]:9".parse().unwrap()]);
        let local = Name::new("localhost", 9).unwrap();
        assert!(local.addrs().iter().all(|a| a.ip().is_loopback()));
        local.failed();
        assert!(Name::new("no-such-host.invalid", 9).is_err());
    }
}
