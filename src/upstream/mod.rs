//! Upstream MCP servers: what an upstream is (its name, how it is reached, the credential
//! injected for it), defined once from the environment and the policy together, and everything
//! about reaching it: the transport ([`Transport`]: HTTP or HTTPS; stdio lands here as a variant), the
//! names it resolves ([`resolve`]), its TLS settings ([`tls`]), each worker's keep-alive [`pool`], the one request-head writer ([`request`]), the
//! round trip ([`exchange`]) and the small MCP client the aggregate endpoint fans out with
//! ([`client`]). Nothing above this module knows how a byte reaches an upstream.

pub mod client;
pub mod connect;
pub mod egress;
pub mod error;
pub mod exchange;
pub mod pool;
pub mod process;
pub mod request;
pub mod resolve;
pub mod stdio;
pub mod stdio_bridge;
pub mod stdio_hub;
mod stdio_lines;
mod stdio_proc;
pub mod stdio_router;
pub mod tls;

use std::fmt;
use std::sync::Arc;

pub use pool::{Pool, PoolId, PoolKey};
use resolve::Name;
pub use tls::{TlsClient, TlsOptions, TlsSettingError};

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
    Http(Endpoint),
    /// HTTP/1.1 over TLS (`https://`), verified against the machine's or the upstream's CAs.
    Https(Endpoint, Arc<TlsClient>),
    /// A stdio server started by scopegate (`command = [...]`), reached through its bridge.
    Stdio(Arc<stdio::Stdio>),
}

/// What to do when an upstream URL names the legacy HTTP+SSE transport (2024-11-05: a GET
/// stream at `/sse` and POSTs to an endpoint it announces), which scopegate does not speak.
pub const LEGACY_SSE_ADVICE: &str = "scopegate speaks Streamable HTTP (2025-03-26 and later) and \
     stdio, not the legacy HTTP+SSE transport (2024-11-05): point the upstream at the server's \
     Streamable HTTP endpoint (often /mcp; many servers serve both), or run the server as a \
     stdio upstream (`command = [...]`)";

/// Why `url` is refused as a legacy HTTP+SSE endpoint (its path ends in `/sse`), if it is.
fn legacy_sse(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let path = path.trim_end_matches('/');
    path.ends_with("/sse")
        .then(|| format!("{url:?} looks like a legacy HTTP+SSE endpoint: {LEGACY_SSE_ADVICE}"))
}

impl Transport {
    /// Reads an upstream URL; an `https://` one is verified against the system roots.
    pub fn parse(url: &str) -> Result<Transport, String> {
        Transport::parse_with(url, TlsOptions::default()).map_err(|e| e.problem)
    }

    /// Reads an upstream URL with its TLS settings (only an `https://` URL takes any).
    pub fn parse_with(url: &str, options: TlsOptions) -> Result<Transport, TlsSettingError> {
        let url_error = |problem: String| TlsSettingError {
            field: "upstream.url",
            problem,
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(url_error(format!(
                "{url:?} is not an http:// or https:// URL"
            )));
        };
        let mut endpoint =
            Endpoint::parse(url, rest, if tls { 443 } else { 80 }).map_err(url_error)?;
        if let Some(why) = legacy_sse(url) {
            return Err(url_error(why));
        }
        if !tls {
            if !options.is_empty() {
                return Err(url_error(format!(
                    "{url:?} is http://: ca_file, client_cert_file, client_key_file and \
                     tls_server_name are for https:// upstreams"
                )));
            }
            return Ok(Transport::Http(endpoint));
        }
        let client = TlsClient::new(endpoint.host(), options).map_err(|mut e| {
            if e.field == "upstream.url" {
                e.problem = format!("{url:?}: {}", e.problem);
            }
            e
        })?;
        endpoint.key = pool_key(url, Some(&client.options));
        Ok(Transport::Https(endpoint, Arc::new(client)))
    }

    /// The transport with the policy's TLS settings for it (the environment's URL, the
    /// policy's TLS fields).
    pub fn with_tls(self, options: TlsOptions) -> Result<Transport, TlsSettingError> {
        let Some(endpoint) = self.endpoint() else {
            return Err(TlsSettingError {
                field: "upstream.command",
                problem: "TLS settings are for https:// upstreams, not stdio servers".into(),
            });
        };
        let url = endpoint.url.clone();
        Transport::parse_with(&url, options)
    }

    /// Where a network upstream listens (`None` for a stdio server).
    pub fn endpoint(&self) -> Option<&Endpoint> {
        match self {
            Transport::Http(e) | Transport::Https(e, _) => Some(e),
            Transport::Stdio(_) => None,
        }
    }

    /// Where requests go: the path (and query) on the upstream.
    pub fn path(&self) -> &str {
        self.endpoint().map_or("/", |e| &e.path)
    }

    /// What the upstream gets as `Host`.
    pub fn host_header(&self) -> &str {
        self.endpoint().map_or("stdio", |e| &e.host_header)
    }

    /// Which connections are interchangeable: same URL, same TLS settings (same stdio
    /// upstream).
    pub fn pool_key(&self) -> PoolKey {
        match self {
            Transport::Http(e) | Transport::Https(e, _) => PoolKey(e.key),
            Transport::Stdio(s) => PoolKey(s.pool_key()),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Stdio(s) => f.write_str(&s.describe()),
            _ => f.write_str(self.endpoint().map_or("", |e| &e.url)),
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

/// Where an upstream listens: a parsed `http(s)://host[:port]/path` URL and its addresses.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The URL as configured.
    pub url: String,
    /// What the upstream gets as `Host`.
    pub host_header: String,
    /// Path (and query) requests are sent to; `/` when the URL has none.
    pub path: String,
    /// The host (without brackets) and port, and the addresses they resolve to now.
    pub name: Arc<Name>,
    key: u64,
}

impl PartialEq for Endpoint {
    fn eq(&self, other: &Endpoint) -> bool {
        self.url == other.url
    }
}

impl Eq for Endpoint {}

impl Endpoint {
    fn parse(url: &str, rest: &str, default_port: u16) -> Result<Endpoint, String> {
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!(
                "{url:?} has no usable host (user info is not allowed)"
            ));
        }
        let (host, port) = split_authority(authority)
            .ok_or_else(|| format!("{url:?}: {authority:?} is not host[:port]"))?;
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("{url:?}: {p:?} is not a port"))?,
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!(
                "{url:?}: the path has spaces or control characters"
            ));
        }
        let name = Name::new(host, port);
        Ok(Endpoint {
            url: url.to_owned(),
            host_header: authority.to_owned(),
            path,
            name,
            key: pool_key(url, None),
        })
    }

    /// The host, without brackets around an IPv6 address.
    pub fn host(&self) -> &str {
        self.name.host()
    }
}

/// `host[:port]`, `[v6][:port]`: the host (brackets removed) and the port text, if any.
fn split_authority(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        return Some((host, port));
    }
    match authority.split_once(':') {
        Some((host, port)) if !port.contains(':') && !host.is_empty() => Some((host, Some(port))),
        Some(_) => None,
        None => Some((authority, None)),
    }
}

fn pool_key(url: &str, tls: Option<&TlsOptions>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    url.hash(&mut h);
    tls.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Endpoint {
        Transport::parse(url).unwrap().endpoint().unwrap().clone()
    }

    #[test]
    fn parses_urls() {
        let u = endpoint("http://127.0.0.1:9001/mcp");
        assert_eq!(&u.name.addrs()[..], &["127.0.0.1:9001".parse().unwrap()]);
        assert_eq!(u.host_header, "127.0.0.1:9001");
        assert_eq!(u.path, "/mcp");
        let u = endpoint("http://127.0.0.1");
        assert_eq!(u.name.port(), 80);
        assert_eq!(u.path, "/");
        let u = endpoint("http://[::1]:7/x?y=1");
        assert_eq!(&u.name.addrs()[..], &["[::1]:7".parse().unwrap()]);
        assert_eq!(u.host(), "::1");
        assert_eq!(u.path, "/x?y=1");
        let u = endpoint("http://127.0.0.1:7?y=1");
        assert_eq!(u.path, "/?y=1");
        let u = endpoint("https://localhost/mcp");
        assert_eq!(u.name.port(), 443);
        assert_eq!(u.host_header, "localhost");
        assert!(matches!(
            Transport::parse("https://127.0.0.1:8443/").unwrap(),
            Transport::Https(..)
        ));
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        assert!(Transport::parse("ftp://127.0.0.1/").is_err());
        assert!(Transport::parse("http://user@127.0.0.1/").is_err());
        assert!(Transport::parse("http:///mcp").is_err());
        assert!(Transport::parse("http://127.0.0.1:99999/").is_err());
        assert!(Transport::parse("http://127.0.0.1:0/").is_err());
        assert!(Transport::parse("http://::1/").is_err());
        assert!(Transport::parse("http://[::1/").is_err());
    }

    #[test]
    fn tls_settings_only_for_https() {
        let ca = TlsOptions {
            ca_file: Some("/nonexistent".into()),
            ..TlsOptions::default()
        };
        let http = Transport::parse("http://127.0.0.1:1/").unwrap();
        assert_eq!(http.clone().with_tls(TlsOptions::default()).unwrap(), http);
        assert_eq!(http.with_tls(ca.clone()).unwrap_err().field, "upstream.url");
        let https = Transport::parse("https://127.0.0.1:1/").unwrap();
        assert_eq!(https.with_tls(ca).unwrap_err().field, "upstream.ca_file");
    }
}
