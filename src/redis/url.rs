//! Where the fleet's Redis is: `redis://[user:password@]host[:port][/db]`, or `rediss://` for
//! TLS. The password never appears in what the URL prints.

use std::fmt;

/// `redis://[user:password@]host[:port][/db]` or `rediss://...` (TLS).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub tls: bool,
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

/// Never prints the password.
impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// `redis://host:port/db`, credentials left out (this is what logs show).
impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}/{}", self.host, self.port, self.db)
        } else {
            write!(f, "{scheme}://{}:{}/{}", self.host, self.port, self.db)
        }
    }
}

impl RedisUrl {
    pub fn parse(text: &str) -> Result<RedisUrl, String> {
        let (tls, rest) = if let Some(r) = text.strip_prefix("redis://") {
            (false, r)
        } else if let Some(r) = text.strip_prefix("rediss://") {
            (true, r)
        } else {
            return Err(format!(
                "{text:?}: expected redis://[user:password@]host:port/db (or rediss:// for TLS)"
            ));
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (credentials, hostport) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, authority),
        };
        let (user, password) = match credentials {
            None => (None, None),
            Some(c) => {
                let Some((u, p)) = c.split_once(':') else {
                    return Err(
                        "credentials are user:password@ or :password@ (a password alone)".into(),
                    );
                };
                let user = (!u.is_empty()).then(|| percent_decode(u)).transpose()?;
                let password = Some(percent_decode(p)?).filter(|p| !p.is_empty());
                if user.is_some() && password.is_none() {
                    return Err("a user without a password: give user:password@".into());
                }
                (user, password)
            }
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{hostport:?}: an IPv6 address needs its closing ]"))?;
            match after {
                "" => (h, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (h, Some(port)),
                    None => return Err(format!("{hostport:?}: expected :port after the ]")),
                },
            }
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{text:?}: no host"));
        }
        let port = match port {
            None => 6379,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{p:?} is not a port"))?,
        };
        let db = match path.split(['?', '#']).next().unwrap_or("") {
            "" => 0,
            d => d
                .parse::<u32>()
                .map_err(|_| format!("{d:?} is not a database number"))?,
        };
        Ok(RedisUrl {
            tls,
            host: host.to_owned(),
            port,
            user,
            password,
            db,
        })
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "a bad %-escape in the credentials".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "credentials that are not UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_their_defaults_and_never_print_the_password() {
        let u = RedisUrl::parse("redis://127.0.0.1").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.db),
            (false, "127.0.0.1", 6379, 0)
        );
        assert_eq!((u.user, u.password), (None, None));
        let u = RedisUrl::parse("rediss://app:p%40ss%3Aw@redis.internal:6380/3").unwrap();
        assert!(u.tls);
        assert_eq!(u.user.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("p@ss:w"));
        assert_eq!((u.host.as_str(), u.port, u.db), ("redis.internal", 6380, 3));
        assert_eq!(u.to_string(), "rediss://redis.internal:6380/3");
        assert!(!format!("{u:?}").contains("p@ss"));
        // A password alone (the `requirepass` form), and IPv6.
        let u = RedisUrl::parse("redis://:secret@[::1]:7000/1").unwrap();
        assert_eq!(
            (u.user.as_deref(), u.password.as_deref()),
            (None, Some("secret"))
        );
        assert_eq!((u.host.as_str(), u.port), ("::1", 7000));
        assert_eq!(u.to_string(), "redis://[::1]:7000/1");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("http://127.0.0.1:6379", "expected redis://"),
            ("redis://", "no host"),
            ("redis://h:0", "is not a port"),
            ("redis://h:99999", "is not a port"),
            ("redis://h:6379/x", "not a database number"),
            ("redis://[::1:6379", "closing ]"),
            ("redis://u:%zz@h", "%-escape"),
            ("redis://secret@h", "user:password@"),
            ("redis://user:@h", "without a password"),
            ("redis://[::1]x:6379", "expected :port"),
        ] {
            let e = RedisUrl::parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
    }
}
