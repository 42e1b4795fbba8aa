//! The egress proxy: where a network allows outbound connections only through an HTTP proxy,
//! `SCOPEGATE_EGRESS_PROXY=http://[user:password@]host:port` sends every upstream connection
//! through an HTTP CONNECT tunnel (opened in `connect.rs`; TLS to an `https://` upstream then
//! runs inside it, end to end). Hosts in `SCOPEGATE_EGRESS_NO_PROXY` are reached directly; by
//! default the loopback names. The conventional `HTTPS_PROXY`/`NO_PROXY` are deliberately not read: a gateway's
//! egress is configured on purpose, not inherited from a shell.

use std::sync::Arc;

use super::resolve::Name;

/// Hosts reached directly when `SCOPEGATE_EGRESS_NO_PROXY` is not set.
pub const DEFAULT_NO_PROXY: &str = "localhost,127.0.0.1,::1";

pub struct Egress {
    /// The proxy's address.
    pub proxy: Arc<Name>,
    /// `Proxy-Authorization` value, from the URL's user information.
    pub(super) authorization: Option<String>,
    /// Hosts (exact, lower case) and domain suffixes (`.example.com`) reached directly.
    no_proxy: Vec<String>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("proxy", &self.proxy)
            .field("authorization", &self.authorization.as_ref().map(|_| "***"))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl Egress {
    /// Reads the proxy URL and the direct-host list (`None`: the default; `"none"`: nothing
    /// bypasses the proxy).
    pub fn parse(url: &str, no_proxy: Option<&str>) -> Result<Egress, String> {
        // Errors show the URL without its password.
        let shown = match url
            .split_once("://")
            .and_then(|(s, r)| Some((s, r.split_once('@')?)))
        {
            Some((scheme, (_, host))) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{shown:?}: expected http://[user:password@]host:port"))?;
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') {
            return Err(format!("{shown:?}: a proxy URL has no path"));
        }
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((user, hostport)) => (Some(user), hostport),
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, port) = v6
                .split_once("]:")
                .ok_or_else(|| format!("{shown:?}: expected [v6address]:port"))?;
            (host, port)
        } else {
            hostport
                .rsplit_once(':')
                .ok_or_else(|| format!("{shown:?}: the port is required"))?
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{shown:?}: {port:?} is not a port"))?;
        if host.is_empty() {
            return Err(format!("{shown:?}: no host"));
        }
        let proxy = Name::new(host, port);
        if proxy.addrs().is_empty() {
            return Err(format!("the proxy's host: {}", proxy.unresolved_reason()));
        }
        let authorization =
            user.map(|u| format!("Basic {}", crate::token::base64(&percent_decode(u))));
        let no_proxy = match no_proxy.unwrap_or(DEFAULT_NO_PROXY).trim() {
            "none" => Vec::new(),
            list => list
                .split(',')
                .map(|h| h.trim().trim_matches(['[', ']']).to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
        };
        Ok(Egress {
            proxy,
            authorization,
            no_proxy,
        })
    }

    /// Whether connections to `host` go through the proxy.
    pub fn applies_to(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        !self.no_proxy.iter().any(|entry| {
            *entry == host
                || (entry.starts_with('.')
                    && (host.ends_with(entry.as_str()) || host == entry[1..]))
        })
    }
}

/// User information as written in a URL: `%XX` escapes decoded.
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_urls() {
        let e = Egress::parse("http://127.0.0.1:3128", None).unwrap();
        assert_eq!(e.proxy.port(), 3128);
        assert!(e.authorization.is_none());
        assert!(!e.applies_to("localhost") && !e.applies_to("127.0.0.1") && !e.applies_to("::1"));
        assert!(e.applies_to("api.example.com"));
        let e =
            Egress::parse("http://user:pa%20ss@[::1]:8080/", Some(".corp.example, db")).unwrap();
        assert_eq!(e.authorization.as_deref(), Some("Basic dXNlcjpwYSBzcw=="));
        assert!(!e.applies_to("mcp.corp.example") && !e.applies_to("corp.example"));
        assert!(!e.applies_to("DB") && e.applies_to("localhost"));
        let e = Egress::parse("http://127.0.0.1:3128", Some("none")).unwrap();
        assert!(e.applies_to("127.0.0.1"));
        for bad in [
            "https://p:1",
            "http://p",
            "http://p:0",
            "http://p:1/x",
            "http://:1",
        ] {
            assert!(Egress::parse(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_password_never_shows() {
        let e = Egress::parse("http://me:s3cret@127.0.0.1:0", None).unwrap_err();
        assert!(
            !e.contains("s3cret") && e.contains("***@127.0.0.1:0"),
            "{e}"
        );
        let e = Egress::parse("http://me:s3cret@proxy.invalid:3128", None).unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
        let ok = Egress::parse("http://me:s3cret@127.0.0.1:3128", None).unwrap();
        let shown = format!("{ok:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("bWU6czNjcmV0"),
            "{shown}"
        );
        assert_eq!(ok.authorization.as_deref(), Some("Basic bWU6czNjcmV0"));
    }
}
