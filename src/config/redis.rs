//! `SCOPEGATE_REDIS_*`: the Redis that holds fleet-wide rate limits.

use std::collections::HashMap;
use std::path::PathBuf;

use super::values::{ConfigError, err, parse_ms, parse_u64};
use crate::ratelimit::{Fallback, FleetSettings, fleet};
use crate::redis::RedisUrl;

/// `SCOPEGATE_REDIS_URL` and the settings that go with it.
pub(super) fn parse_redis(
    vars: &HashMap<String, String>,
) -> Result<Option<FleetSettings>, ConfigError> {
    let get = |name: &str| vars.get(name).map(|s| s.trim()).filter(|s| !s.is_empty());
    const WITH_URL: [&str; 5] = [
        "SCOPEGATE_REDIS_CA_FILE",
        "SCOPEGATE_REDIS_TIMEOUT_MS",
        "SCOPEGATE_REDIS_FALLBACK",
        "SCOPEGATE_REDIS_PREFIX",
        "SCOPEGATE_REDIS_REPLICAS",
    ];
    let Some(url) = get("SCOPEGATE_REDIS_URL") else {
        if let Some(name) = WITH_URL.into_iter().find(|n| get(n).is_some()) {
            return Err(err(
                name,
                "set without SCOPEGATE_REDIS_URL (the Redis that holds fleet-wide limits)",
            ));
        }
        return Ok(None);
    };
    let url = RedisUrl::parse(url).map_err(|e| err("SCOPEGATE_REDIS_URL", e))?;
    let ca_file = get("SCOPEGATE_REDIS_CA_FILE").map(PathBuf::from);
    if ca_file.is_some() && !url.tls {
        return Err(err(
            "SCOPEGATE_REDIS_CA_FILE",
            "set for a redis:// URL; a CA file is for rediss:// (TLS)",
        ));
    }
    let timeout = parse_ms(
        "SCOPEGATE_REDIS_TIMEOUT_MS",
        get("SCOPEGATE_REDIS_TIMEOUT_MS"),
        fleet::DEFAULT_TIMEOUT_MS,
    )?;
    let fallback = match get("SCOPEGATE_REDIS_FALLBACK") {
        None | Some("local") => Fallback::Local,
        Some("closed") => Fallback::Closed,
        Some(other) => {
            return Err(err(
                "SCOPEGATE_REDIS_FALLBACK",
                format!(
                    "expected local (each replica enforces its share of every limit) or closed \
                     (refuse limited calls) while Redis is unreachable, got {other:?}"
                ),
            ));
        }
    };
    let prefix = get("SCOPEGATE_REDIS_PREFIX")
        .unwrap_or(fleet::DEFAULT_PREFIX)
        .to_owned();
    let replicas = match get("SCOPEGATE_REDIS_REPLICAS") {
        None => 1,
        Some(v) => match parse_u64("SCOPEGATE_REDIS_REPLICAS", v)? {
            n @ 1..=10_000 => n as u32,
            n => {
                return Err(err(
                    "SCOPEGATE_REDIS_REPLICAS",
                    format!("must be between 1 and 10000, got {n}"),
                ));
            }
        },
    };
    Ok(Some(FleetSettings {
        url,
        ca_file,
        timeout,
        fallback,
        prefix,
        replicas,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn redis(pairs: &[(&str, &str)]) -> Result<Option<FleetSettings>, ConfigError> {
        let vars = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        parse_redis(&vars.collect())
    }

    #[test]
    fn redis_settings_parse_and_bad_ones_name_the_variable() {
        assert_eq!(redis(&[]).unwrap(), None);
        let r = redis(&[("SCOPEGATE_REDIS_URL", "redis://10.0.0.5/2")])
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.url.host.as_str(), r.url.port, r.url.db),
            ("10.0.0.5", 6379, 2)
        );
        assert_eq!(r.timeout, Duration::from_millis(fleet::DEFAULT_TIMEOUT_MS));
        assert_eq!(
            (r.fallback, r.prefix.as_str(), r.replicas),
            (Fallback::Local, "scopegate:", 1)
        );
        let r = redis(&[
            ("SCOPEGATE_REDIS_URL", "rediss://r:6380"),
            ("SCOPEGATE_REDIS_FALLBACK", "closed"),
            ("SCOPEGATE_REDIS_TIMEOUT_MS", "20"),
            ("SCOPEGATE_REDIS_PREFIX", "fleet-a:"),
            ("SCOPEGATE_REDIS_REPLICAS", "4"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(r.fallback, Fallback::Closed);
        assert_eq!(
            (r.timeout, r.prefix.as_str(), r.replicas),
            (Duration::from_millis(20), "fleet-a:", 4)
        );
        for (pairs, variable, says) in [
            (
                vec![("SCOPEGATE_REDIS_URL", "redis:/x")],
                "SCOPEGATE_REDIS_URL",
                "expected redis://",
            ),
            (
                vec![("SCOPEGATE_REDIS_FALLBACK", "local")],
                "SCOPEGATE_REDIS_FALLBACK",
                "without SCOPEGATE_REDIS_URL",
            ),
            (
                vec![
                    ("SCOPEGATE_REDIS_URL", "redis://h"),
                    ("SCOPEGATE_REDIS_FALLBACK", "open"),
                ],
                "SCOPEGATE_REDIS_FALLBACK",
                "expected local",
            ),
            (
                vec![
                    ("SCOPEGATE_REDIS_URL", "redis://h"),
                    ("SCOPEGATE_REDIS_TIMEOUT_MS", "0"),
                ],
                "SCOPEGATE_REDIS_TIMEOUT_MS",
                "at least 1",
            ),
            (
                vec![
                    ("SCOPEGATE_REDIS_URL", "redis://h"),
                    ("SCOPEGATE_REDIS_REPLICAS", "0"),
                ],
                "SCOPEGATE_REDIS_REPLICAS",
                "between 1 and 10000",
            ),
            (
                vec![
                    ("SCOPEGATE_REDIS_URL", "redis://h"),
                    ("SCOPEGATE_REDIS_CA_FILE", "/ca.pem"),
                ],
                "SCOPEGATE_REDIS_CA_FILE",
                "rediss://",
            ),
        ] {
            let e = redis(&pairs).unwrap_err();
            assert_eq!(e.variable, variable, "{pairs:?}");
            assert!(e.problem.contains(says), "{pairs:?}: {}", e.problem);
        }
    }
}
