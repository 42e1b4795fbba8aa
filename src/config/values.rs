//! The parsers of single values (addresses, numbers, durations, flags, sizes, the upstream
//! and origin lists), each failing with a [`ConfigError`] that names the variable.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::upstream::{Transport, Upstream};
use std::fmt;

/// A bad value: the variable, and what is wrong with it (the binary exits 2 with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.variable, self.problem)
    }
}

impl std::error::Error for ConfigError {}

pub(super) fn err(variable: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        problem: problem.into(),
    }
}

pub(super) fn leak_name(name: &str) -> &'static str {
    // Only on the error path at start-up, once.
    Box::leak(name.to_owned().into_boxed_str())
}

pub(super) fn parse_listen(v: &str) -> Result<SocketAddr, ConfigError> {
    let mut addrs = v.to_socket_addrs().map_err(|e| {
        err(
            "SCOPEGATE_LISTEN",
            format!("expected host:port (e.g. 127.0.0.1:8080), got {v:?}: {e}"),
        )
    })?;
    addrs
        .next()
        .ok_or_else(|| err("SCOPEGATE_LISTEN", format!("{v:?} resolves to no address")))
}

pub(super) fn parse_u64(variable: &'static str, v: &str) -> Result<u64, ConfigError> {
    v.parse::<u64>().map_err(|_| {
        err(
            variable,
            format!("expected a non-negative integer, got {v:?}"),
        )
    })
}

pub(super) fn parse_ms(
    variable: &'static str,
    v: Option<&str>,
    default_ms: u64,
) -> Result<Duration, ConfigError> {
    let ms = match v {
        None => default_ms,
        Some(v) => parse_u64(variable, v)?,
    };
    if ms == 0 {
        return Err(err(variable, "must be at least 1 millisecond"));
    }
    Ok(Duration::from_millis(ms))
}

pub(super) fn parse_bool(variable: &'static str, v: Option<&str>) -> Result<bool, ConfigError> {
    match v {
        None => Ok(false),
        Some("1") | Some("true") | Some("yes") | Some("on") => Ok(true),
        Some("0") | Some("false") | Some("no") | Some("off") => Ok(false),
        Some(other) => Err(err(variable, format!("expected 1 or 0, got {other:?}"))),
    }
}

/// Bytes, with an optional `KiB`/`MiB`/`GiB` (or `k`/`m`/`g`) suffix.
pub fn parse_size(variable: &'static str, v: &str) -> Result<usize, ConfigError> {
    let lower = v.to_ascii_lowercase();
    let (digits, multiplier) = [
        ("kib", 1usize << 10),
        ("mib", 1 << 20),
        ("gib", 1 << 30),
        ("k", 1 << 10),
        ("m", 1 << 20),
        ("g", 1 << 30),
    ]
    .iter()
    .find_map(|(suffix, m)| lower.strip_suffix(suffix).map(|d| (d.trim(), *m)))
    .unwrap_or((lower.as_str(), 1));
    let n: usize = digits.parse().map_err(|_| {
        err(
            variable,
            format!("expected a size in bytes (e.g. 4194304 or 4MiB), got {v:?}"),
        )
    })?;
    let size = n
        .checked_mul(multiplier)
        .ok_or_else(|| err(variable, format!("{v:?} is too large")))?;
    if size == 0 {
        return Err(err(variable, "must be at least 1 byte"));
    }
    Ok(size)
}

pub fn parse_upstreams(v: &str) -> Result<Vec<Upstream>, ConfigError> {
    let mut out: Vec<Upstream> = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, url) = item.split_once('=').ok_or_else(|| {
            err(
                "SCOPEGATE_UPSTREAMS",
                format!("expected name=http://host:port/path, got {item:?}"),
            )
        })?;
        let name = name.trim();
        if !crate::upstream::valid_name(name) {
            return Err(err(
                "SCOPEGATE_UPSTREAMS",
                format!(
                    "upstream name {name:?} must be 1-64 characters of letters, digits, '_' or '-'"
                ),
            ));
        }
        if out.iter().any(|u| u.name == name) {
            return Err(err(
                "SCOPEGATE_UPSTREAMS",
                format!("upstream {name:?} is named twice"),
            ));
        }
        let transport = Transport::parse(url.trim()).map_err(|problem| {
            err(
                "SCOPEGATE_UPSTREAMS",
                format!("upstream {name:?}: {problem}"),
            )
        })?;
        out.push(Upstream {
            name: name.to_owned(),
            transport,
            headers: Vec::new(),
        });
    }
    if out.is_empty() {
        return Err(err("SCOPEGATE_UPSTREAMS", "names no upstream"));
    }
    Ok(out)
}

pub(super) fn parse_origins(v: &str) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item == "*" {
            return Err(err(
                "SCOPEGATE_ALLOWED_ORIGINS",
                "\"*\" is not accepted: list each allowed origin (scheme://host[:port])",
            ));
        }
        let rest = item
            .strip_prefix("http://")
            .or_else(|| item.strip_prefix("https://"))
            .ok_or_else(|| {
                err(
                    "SCOPEGATE_ALLOWED_ORIGINS",
                    format!("{item:?} is not an origin (expected scheme://host[:port])"),
                )
            })?;
        if rest.is_empty() || rest.contains('/') {
            return Err(err(
                "SCOPEGATE_ALLOWED_ORIGINS",
                format!("{item:?} is not an origin (expected scheme://host[:port], no path)"),
            ));
        }
        out.push(item.to_ascii_lowercase());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("X", "4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("X", "64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("X", "123").unwrap(), 123);
        assert!(parse_size("X", "0").is_err());
    }
}
