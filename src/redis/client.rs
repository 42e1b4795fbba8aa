//! What every worker's link to Redis shares: where it is, how to log in, the scripts to load,
//! and whether the links are up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::url::RedisUrl;
use crate::upstream::resolve::Name;
use crate::upstream::tls::{TlsClient, TlsOptions};

/// A Lua script, run by its SHA-1 (`EVALSHA`) once loaded on a connection.
#[derive(Debug, Clone)]
pub struct Script {
    pub text: &'static str,
    pub sha: String,
}

impl Script {
    pub fn new(text: &'static str) -> Script {
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, text.as_bytes());
        let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Script { text, sha }
    }
}

/// Whether the workers reach Redis, as logged and shown by `/metrics`.
const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// What every worker's link shares: where Redis is and how to log in, the scripts each
/// connection loads, and whether the links are up.
pub struct Client {
    pub url: RedisUrl,
    pub(super) name: Arc<Name>,
    pub(super) tls: Option<TlsClient>,
    /// No reply (or connection) takes longer than this.
    pub timeout: Duration,
    pub scripts: Vec<Script>,
    /// What a lost connection means for the gateway, for the log (`limits fall back to ...`).
    pub when_down: String,
    links: usize,
    links_up: AtomicUsize,
    state: AtomicU8,
    /// Commands sent, heartbeats (`PING`) included.
    pub commands: AtomicU64,
}

impl Client {
    /// `links` is how many workers will each start a [`Link`]; `ca_file` (for `rediss://`)
    /// is trusted instead of the machine's CA store.
    pub fn new(
        url: RedisUrl,
        ca_file: Option<std::path::PathBuf>,
        timeout: Duration,
        scripts: Vec<Script>,
        when_down: String,
        links: usize,
    ) -> Result<Client, String> {
        let tls = if url.tls {
            let options = TlsOptions {
                ca_file,
                ..TlsOptions::default()
            };
            let mut tls = TlsClient::new(&url.host, options).map_err(|e| e.problem)?;
            // Redis speaks no ALPN protocol; offering HTTP/1.1 would be wrong.
            let mut config = (*tls.config).clone();
            config.alpn_protocols.clear();
            tls.config = Arc::new(config);
            Some(tls)
        } else {
            None
        };
        Ok(Client {
            name: Name::new(&url.host, url.port),
            url,
            tls,
            timeout,
            scripts,
            when_down,
            links,
            links_up: AtomicUsize::new(0),
            state: AtomicU8::new(UNKNOWN),
            commands: AtomicU64::new(0),
        })
    }

    /// How long a link waits for a reply (or a write) before it counts Redis as unreachable:
    /// twice what a call waits, at least 250 ms, so one slow reply makes a call fall back
    /// but does not drop the connection.
    pub fn liveness(&self) -> Duration {
        (self.timeout * 2).max(Duration::from_millis(250))
    }

    /// Every worker's link is connected.
    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// One link connected (`up`) or lost its connection; logs the process's transitions once.
    pub(super) fn link_changed(&self, up: bool, why: &str) {
        if up {
            let now = self.links_up.fetch_add(1, Ordering::AcqRel) + 1;
            if now == self.links && self.state.swap(UP, Ordering::AcqRel) != UP {
                crate::info!(
                    "Redis at {} reachable: rate limits are fleet-wide",
                    self.url
                );
            }
        } else {
            self.links_up.fetch_sub(1, Ordering::AcqRel);
            self.mark_down(why);
        }
    }

    /// A link could not connect (or lost its connection before being counted up).
    pub(super) fn mark_down(&self, why: &str) {
        if self.state.swap(DOWN, Ordering::AcqRel) != DOWN {
            crate::warn!(
                "Redis at {} unreachable ({why}): {}",
                self.url,
                self.when_down
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_digests_are_redis_sha1() {
        // SHA-1 of "return 1", as `SCRIPT LOAD "return 1"` answers.
        assert_eq!(
            Script::new("return 1").sha,
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }
}
