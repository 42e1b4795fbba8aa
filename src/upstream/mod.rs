//! Upstream MCP servers: what an upstream is (its name, how it is reached, the credential
//! injected for it), defined once from the environment and the policy together, and everything
//! about reaching it: the transport ([`Transport`]: plain HTTP today; TLS and stdio land here as
//! variants), each worker's keep-alive [`pool`], the one request-head writer ([`request`]), the
//! round trip ([`exchange`]) and the small MCP client the aggregate endpoint fans out with
//! ([`client`]). Nothing above this module knows how a byte reaches an upstream.

pub mod client;
pub mod exchange;
pub mod pool;
pub mod request;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

pub use pool::{Pool, PoolId, PoolKey};

/// One upstream, as configured (`SCOPEGATE_UPSTREAMS` and `[[upstream]]` merged).
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub transport: Transport,
    /// Injected on every request to this upstream (from the policy's `[upstream.headers]`).
    pub headers: Vec<(String, String)>,
}

impl Upstream {
    /// Which pooled connections requests to this upstream may reuse: its own.
    pub fn pool_id(&self) -> PoolId<'_> {
        PoolId {
            name: &self.name,
            peer: self.transport.pool_key(),
        }
    }
}

/// How an upstream is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP/1.1 (`http://`).
    Http(HttpTarget),
}

impl Transport {
    /// Reads an upstream URL.
    pub fn parse(url: &str) -> Result<Transport, String> {
        HttpTarget::parse(url).map(Transport::Http)
    }

    /// Where requests go: the path (and query) on the upstream.
    pub fn path(&self) -> &str {
        match self {
            Transport::Http(t) => &t.path,
        }
    }

    /// What the upstream gets as `Host`.
    pub fn host_header(&self) -> &str {
        match self {
            Transport::Http(t) => &t.host_header,
        }
    }

    /// The peer a connection to this upstream is connected to.
    pub fn pool_key(&self) -> PoolKey {
        match self {
            Transport::Http(t) => PoolKey::Tcp(t.addr),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Http(t) => write!(f, "http://{}{}", t.host_header, t.path),
        }
    }
}

/// Names are letters, digits, `_` and `-`, 1-64 of them (they appear in paths, tool names and
/// metric labels).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A parsed `http://host:port/path` URL. Only plain HTTP: upstreams are expected on the same
/// host or a private network; TLS to upstreams is a separate piece of work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// What the upstream gets as `Host`.
    pub host_header: String,
    pub addr: SocketAddr,
    /// Path (and query) requests are sent to; `/` when the URL has none.
    pub path: String,
}

impl HttpTarget {
    pub fn parse(url: &str) -> Result<HttpTarget, String> {
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
        Ok(HttpTarget {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = HttpTarget::parse("http://127.0.0.1:9001/mcp").unwrap();
        assert_eq!(u.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(u.host_header, "127.0.0.1:9001");
        assert_eq!(u.path, "/mcp");
        let u = HttpTarget::parse("http://127.0.0.1").unwrap();
        assert_eq!(u.addr.port(), 80);
        assert_eq!(u.path, "/");
        let u = HttpTarget::parse("http://[::1]:7/x?y=1").unwrap();
        assert_eq!(u.addr, "[::1]:7".parse().unwrap());
        assert_eq!(u.path, "/x?y=1");
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        assert!(HttpTarget::parse("https://127.0.0.1/").is_err());
        assert!(HttpTarget::parse("ftp://127.0.0.1/").is_err());
        assert!(HttpTarget::parse("http://user@127.0.0.1/").is_err());
        assert!(HttpTarget::parse("http:///mcp").is_err());
        assert!(HttpTarget::parse("http://127.0.0.1:99999/").is_err());
    }
}
