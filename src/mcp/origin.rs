//! DNS-rebinding defence (Streamable HTTP, "Security Warning"): a browser page on another
//! origin must not reach a gateway on loopback through a rebound DNS name.

/// Whether `host` (a `Host` field value, with or without port) names this machine's loopback.
pub fn is_loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = strip_port(host.trim());
    if name.eq_ignore_ascii_case("localhost") || name == "[::1]" {
        return true;
    }
    name.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|ip| ip.is_loopback())
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
    if rest.contains('/') || rest.contains('@') {
        return false;
    }
    let name = strip_port(rest);
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1" || name == "[::1]"
}

fn strip_port(authority: &str) -> &str {
    if let Some(end) = authority.find(']') {
        // IPv6 literal: keep through the bracket.
        return &authority[..=end];
    }
    match authority.rfind(':') {
        Some(i) if authority[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &authority[..i],
        _ => authority,
    }
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
    }
}
