//! Upstream MCP servers: where they are, and each worker's keep-alive pool of connections.
//!
//! The pool is per worker (`Rc<RefCell<..>>`, never shared across threads): a connection is
//! taken for one request/response exchange and given back only when the response was read to
//! its end and the upstream did not ask to close.

use std::cell::RefCell;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::http::conn::Conn;

/// One configured upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub url: UpstreamUrl,
    /// Injected on every request to this upstream (from the policy's `[upstream.headers]`).
    pub headers: Vec<(String, String)>,
}

/// A parsed `http://host:port/path` URL. Only plain HTTP: upstreams are expected on the same
/// host or a private network; TLS to upstreams is a separate piece of work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// What the upstream gets as `Host`.
    pub host_header: String,
    pub addr: SocketAddr,
    /// Path (and query) requests are sent to; `/` when the URL has none.
    pub path: String,
}

impl UpstreamUrl {
    pub fn parse(url: &str) -> Result<UpstreamUrl, String> {
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            return Err(format!(
                "{url:?}: https upstreams are not supported; use http:// on a trusted network"
            ));
        } else {
            return Err(format!("{url:?} is not an http:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!(
                "{url:?} has no usable host (user info is not allowed)"
            ));
        }
        let with_port = if has_port(authority) {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url:?}: cannot resolve {authority:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url:?}: {authority:?} resolves to no address"))?;
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!(
                "{url:?}: the path has spaces or control characters"
            ));
        }
        Ok(UpstreamUrl {
            host_header: authority.to_owned(),
            addr,
            path: path.to_owned(),
        })
    }
}

fn has_port(authority: &str) -> bool {
    match authority.rfind(':') {
        // `[::1]:8080` has a port; `[::1]` does not.
        Some(i) => !authority[i..].contains(']'),
        None => false,
    }
}

/// How long a pooled connection may sit idle before it is dropped rather than reused. Kept
/// below common server keep-alive timeouts so we rarely reuse a connection the server is about
/// to close (uvicorn: 5 s; nginx: 75 s).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Idle connections kept per upstream per worker; beyond that, returned connections are closed.
pub const POOL_MAX_IDLE: usize = 256;

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One worker's idle upstream connections, indexed like `Config::upstreams`.
pub struct Pool {
    idle: RefCell<Vec<Vec<Idle>>>,
}

impl Pool {
    pub fn new(upstreams: usize) -> Pool {
        Pool {
            idle: RefCell::new((0..upstreams).map(|_| Vec::new()).collect()),
        }
    }

    /// The most recently returned live connection to upstream `index`, if any.
    pub fn take(&self, index: usize) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(index)?;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(conn.conn);
            }
            // Too old: the oldest are at the front, so everything left is older still.
            list.clear();
        }
        None
    }

    pub fn put(&self, index: usize, mut conn: Conn) {
        let mut idle = self.idle.borrow_mut();
        if let Some(list) = idle.get_mut(index)
            && list.len() < POOL_MAX_IDLE
        {
            conn.buf.clear();
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = UpstreamUrl::parse("http://127.0.0.1:9001/mcp").unwrap();
        assert_eq!(u.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(u.host_header, "127.0.0.1:9001");
        assert_eq!(u.path, "/mcp");
        let u = UpstreamUrl::parse("http://127.0.0.1").unwrap();
        assert_eq!(u.addr.port(), 80);
        assert_eq!(u.path, "/");
        let u = UpstreamUrl::parse("http://[::1]:7/x?y=1").unwrap();
        assert_eq!(u.addr, "[::1]:7".parse().unwrap());
        assert_eq!(u.path, "/x?y=1");
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        assert!(UpstreamUrl::parse("https://127.0.0.1/").is_err());
        assert!(UpstreamUrl::parse("ftp://127.0.0.1/").is_err());
        assert!(UpstreamUrl::parse("http://user@127.0.0.1/").is_err());
        assert!(UpstreamUrl::parse("http:///mcp").is_err());
        assert!(UpstreamUrl::parse("http://127.0.0.1:99999/").is_err());
    }
}
