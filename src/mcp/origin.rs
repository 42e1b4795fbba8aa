//! DNS-rebinding defence (Streamable HTTP, "Security Warning"): a browser page on another
//! origin must not reach a gateway on loopback through a rebound DNS name.

/// Whether `host` (a `Host` field value, with or without port) names this machine's loopback.
pub fn is_loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    split_authority(host.trim()).is_some_and(is_loopback_name)
}

/// Whether an `Origin` value is allowed: listed exactly in `allowed` (lower-cased
/// `scheme://host[:port]`), or, when `loopback_default` holds, an http(s) origin whose host is
/// `localhost`, `127.0.0.1` or `[::1]` on any port.
pub fn origin_allowed(origin: &[u8], allowed: &[String], loopback_default: bool) -> bool {
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let origin = origin.trim();
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    if !loopback_default {
        return false;
    }
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    split_authority(rest).is_some_and(|name| {
        name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1" || name == "[::1]"
    })
}

fn is_loopback_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost")
        || name == "[::1]"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The host of `host[:port]`, read strictly: an IPv6 literal is `[...]` followed by nothing or
/// a port, a port is digits, and nothing else may follow (`[::1].evil.example` is no
/// loopback name, and neither is `localhost/x` or `localhost@evil`).
fn split_authority(authority: &str) -> Option<&str> {
    let (name, rest) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        (&authority[..=end], &authority[end + 1..])
    } else {
        match authority.find(':') {
            Some(i) => (&authority[..i], &authority[i..]),
            None => (authority, ""),
        }
    };
    let port_ok = match rest.strip_prefix(':') {
        None => rest.is_empty(),
        Some(port) => !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()),
    };
    // Only names compared against fixed loopback and origin names come out of here, so the
    // characters need no check of their own beyond the structure above.
    (port_ok && !name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.0.0.1:9",
            "[::1]:80",
            "[::1]",
            "127.1.2.3",
        ] {
            assert!(is_loopback_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1",
            "",
            "[::2]",
            "[::1].evil.example",
            "[::1]evil",
            "[::1]:80x",
            "localhost:",
            "localhost:80:80",
            "127.0.0.1.evil.example",
            "localhost@evil.example",
            "localhost/x",
        ] {
            assert!(!is_loopback_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn origins() {
        let allowed = vec!["https://app.example.com".to_string()];
        assert!(origin_allowed(b"https://app.example.com", &allowed, false));
        assert!(!origin_allowed(
            b"https://app.example.com.evil",
            &allowed,
            false
        ));
        assert!(!origin_allowed(b"http://localhost:3000", &allowed, false));
        assert!(origin_allowed(b"http://localhost:3000", &allowed, true));
        assert!(origin_allowed(b"http://127.0.0.1", &[], true));
        assert!(origin_allowed(b"https://[::1]:8443", &[], true));
        assert!(!origin_allowed(b"http://evil.example", &[], true));
        assert!(!origin_allowed(b"null", &[], true));
        assert!(!origin_allowed(b"http://localhost.evil.example", &[], true));
        assert!(!origin_allowed(b"http://localhost@evil.example", &[], true));
        assert!(!origin_allowed(b"http://[::1].evil.example", &[], true));
        assert!(!origin_allowed(b"http://localhost:3000/x", &[], true));
    }
}
