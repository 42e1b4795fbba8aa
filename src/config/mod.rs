//! Every `SCOPEGATE_*` environment variable, parsed once at start-up.
//!
//! Each variable has one parser and one default here, and a bad value becomes a
//! [`ConfigError`] naming the variable and the problem (the binary exits 2 with it).
//! The README's configuration table lists the same variables in the same order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::ratelimit::FleetSettings;
use crate::upstream::Upstream;
use crate::upstream::egress::Egress;

mod redis;
mod values;

use redis::parse_redis;
pub use values::ConfigError;
use values::{err, leak_name, parse_bool, parse_listen, parse_ms, parse_origins, parse_u64};
pub use values::{parse_size, parse_upstreams};

/// The whole runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub threads: usize,
    pub io_driver: IoDriver,
    pub upstreams: Vec<Upstream>,
    pub upstream_timeout: Duration,
    pub max_body: usize,
    /// The most scopegate holds of one upstream message: a JSON answer it reads whole (a list
    /// to filter, an aggregate answer to rewrite) or one event of an event stream.
    pub max_upstream_message: usize,
    /// The longest silence between events on the event stream answering a POST before the
    /// request is given up (GET streams may stay quiet: they end when either side leaves).
    pub stream_idle: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// How long an agent may take to accept each 64 KiB written to it (one that stops reading is
    /// cut off).
    pub send_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain: Duration,
    pub allowed_origins: Vec<String>,
    pub policy: Option<PathBuf>,
    /// `SCOPEGATE_PINS`: the pin file of tool integrity (read with the policy, and again on
    /// reload).
    pub pins: Option<PathBuf>,
    pub insecure_open: bool,
    pub log_level: crate::log::Level,
    /// `SCOPEGATE_LOG_FORMAT=json`: log lines as JSON objects.
    pub log_json: bool,
    /// `SCOPEGATE_ACCESS_LOG=1`: one line per request.
    pub access_log: bool,
    /// `SCOPEGATE_ADMIN_TOKEN`: the live view (`/admin`) and its data, for whoever holds it.
    pub admin_token: Option<String>,
    /// `SCOPEGATE_METRICS_AUTH=admin`: `/metrics` wants the admin token too.
    pub metrics_need_admin: bool,
    /// Accept `/key/<key>/mcp[/<upstream>]` for clients that cannot set headers.
    pub path_keys: bool,
    /// `authorization_servers` in the protected resource metadata.
    pub auth_servers: Vec<String>,
    /// The URL agents reach scopegate at (for resource metadata); else `http://<Host>`.
    pub public_url: Option<String>,
    /// Key material for session tokens; `None`: random per start.
    pub session_secret: Option<Vec<u8>>,
    /// JWT bearer tokens, when a key set is configured.
    pub jwt: Option<JwtConfig>,
    /// HTTP status of a rate-limit refusal: 200 (JSON-RPC error, the default) or 429.
    pub rate_limit_status: u16,
    /// The audit log, when `SCOPEGATE_AUDIT_DIR` is set.
    pub audit: Option<crate::audit::writer::AuditConfig>,
    /// The aggregate endpoint's `<upstream><sep><name>` separator.
    pub name_separator: String,
    /// On the aggregate endpoint, fail a fan-out (initialize, lists) when any upstream fails,
    /// instead of answering with the upstreams that did answer.
    pub aggregate_fail_closed: bool,
    /// How long a fan-out waits for each upstream before leaving it out.
    pub aggregate_timeout: Duration,
    /// Serve HTTPS: `SCOPEGATE_TLS_CERT`, `SCOPEGATE_TLS_KEY`, `SCOPEGATE_TLS_CLIENT_CA`.
    pub tls: Option<crate::tls::server::ListenerFiles>,
    /// `SCOPEGATE_EGRESS_PROXY` (and `SCOPEGATE_EGRESS_NO_PROXY`): upstream connections
    /// through an HTTP CONNECT proxy.
    pub egress: Option<Arc<Egress>>,
    /// `SCOPEGATE_REDIS_*`: rate limits that hold across a fleet of replicas.
    pub redis: Option<FleetSettings>,
}

/// `SCOPEGATE_JWT_*`: accept JWTs issued by `issuer` for `audience`, verified with the JWKS
/// in `keys`.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub keys: PathBuf,
    pub issuer: String,
    pub audience: String,
    pub agent_claim: String,
    pub leeway_s: u64,
}

/// Which io driver each worker runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring where the kernel allows it, epoll otherwise.
    Auto,
    IoUring,
    Epoll,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;
pub const DEFAULT_MAX_UPSTREAM_MESSAGE: usize = 16 * 1024 * 1024;
pub const DEFAULT_STREAM_IDLE_MS: u64 = 300_000;
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_SEND_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_DRAIN_MS: u64 = 10_000;

/// Upper bound on worker threads: far past any core count we run on, low enough that a typo
/// (`SCOPEGATE_THREADS=20000`) is an error and not thousands of runtimes.
const MAX_THREADS: usize = 1024;

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with("SCOPEGATE_"))
            .collect();
        // A variable that is not valid UTF-8 would otherwise be silently ignored.
        for (k, v) in std::env::vars_os() {
            if let Some(name) = k.to_str()
                && name.starts_with("SCOPEGATE_")
                && v.to_str().is_none()
            {
                return Err(ConfigError {
                    variable: leak_name(name),
                    problem: "value is not valid UTF-8".into(),
                });
            }
        }
        Config::from_vars(&vars)
    }

    /// [`from_vars`](Self::from_vars) from `(name, value)` pairs.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_vars(&vars)
    }

    /// Parses a given set of variables (the environment, or a test's map).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let get = |name: &str| vars.get(name).map(|s| s.trim()).filter(|s| !s.is_empty());
        // Each variable named once: milliseconds, sizes and flags with their defaults.
        let ms = |name: &'static str, default: u64| parse_ms(name, get(name), default);
        let size = |name: &'static str, default: usize| match get(name) {
            None => Ok(default),
            Some(v) => parse_size(name, v),
        };
        let flag = |name: &'static str| parse_bool(name, get(name));

        for name in vars.keys() {
            if !KNOWN_VARIABLES.contains(&name.as_str()) {
                return Err(ConfigError {
                    variable: leak_name(name),
                    problem: format!(
                        "unknown variable (a typo?); known: {}",
                        KNOWN_VARIABLES.join(", ")
                    ),
                });
            }
        }

        let listen = parse_listen(get("SCOPEGATE_LISTEN").unwrap_or(DEFAULT_LISTEN))?;
        let threads = match get("SCOPEGATE_THREADS") {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(v) => {
                let n = parse_u64("SCOPEGATE_THREADS", v)? as usize;
                if n == 0 || n > MAX_THREADS {
                    return Err(err(
                        "SCOPEGATE_THREADS",
                        format!("must be between 1 and {MAX_THREADS}, got {n}"),
                    ));
                }
                n
            }
        };
        let io_driver = match get("SCOPEGATE_IO_DRIVER") {
            None | Some("auto") => IoDriver::Auto,
            Some("io_uring") | Some("uring") => IoDriver::IoUring,
            Some("epoll") | Some("legacy") => IoDriver::Epoll,
            Some(other) => {
                return Err(err(
                    "SCOPEGATE_IO_DRIVER",
                    format!("expected auto, io_uring or epoll, got {other:?}"),
                ));
            }
        };
        let upstreams = match get("SCOPEGATE_UPSTREAMS") {
            None => Vec::new(),
            Some(v) => parse_upstreams(v)?,
        };
        let upstream_timeout = ms("SCOPEGATE_UPSTREAM_TIMEOUT_MS", DEFAULT_UPSTREAM_TIMEOUT_MS)?;
        let max_upstream_message = match get("SCOPEGATE_MAX_UPSTREAM_MESSAGE") {
            None => DEFAULT_MAX_UPSTREAM_MESSAGE,
            Some(v) => {
                let n = parse_size("SCOPEGATE_MAX_UPSTREAM_MESSAGE", v)?;
                if n < 64 * 1024 {
                    return Err(err(
                        "SCOPEGATE_MAX_UPSTREAM_MESSAGE",
                        "must be at least 64K (an initialize answer or a tool list must fit)",
                    ));
                }
                n
            }
        };
        let stream_idle = ms("SCOPEGATE_STREAM_IDLE_MS", DEFAULT_STREAM_IDLE_MS)?;
        let max_body = size("SCOPEGATE_MAX_BODY", DEFAULT_MAX_BODY)?;
        let header_timeout = ms("SCOPEGATE_HEADER_TIMEOUT_MS", DEFAULT_HEADER_TIMEOUT_MS)?;
        let body_timeout = ms("SCOPEGATE_BODY_TIMEOUT_MS", DEFAULT_BODY_TIMEOUT_MS)?;
        let send_timeout = ms("SCOPEGATE_SEND_TIMEOUT_MS", DEFAULT_SEND_TIMEOUT_MS)?;
        if send_timeout > Duration::from_millis(u32::MAX.into()) {
            return Err(err(
                "SCOPEGATE_SEND_TIMEOUT_MS",
                format!("at most {} (about 49 days)", u32::MAX),
            ));
        }
        let idle_timeout = ms("SCOPEGATE_IDLE_TIMEOUT_MS", DEFAULT_IDLE_TIMEOUT_MS)?;
        let drain = ms("SCOPEGATE_DRAIN_MS", DEFAULT_DRAIN_MS)?;
        let allowed_origins = match get("SCOPEGATE_ALLOWED_ORIGINS") {
            None => Vec::new(),
            Some(v) => parse_origins(v)?,
        };
        let policy = get("SCOPEGATE_POLICY").map(PathBuf::from);
        let pins = get("SCOPEGATE_PINS").map(PathBuf::from);
        if pins.is_some() && policy.is_none() {
            return Err(err(
                "SCOPEGATE_PINS",
                "tool pins are checked under a policy: set SCOPEGATE_POLICY too",
            ));
        }
        let insecure_open = flag("SCOPEGATE_INSECURE_OPEN")?;
        let log_level = match get("SCOPEGATE_LOG") {
            None => crate::log::Level::Info,
            Some(v) => crate::log::Level::parse(v).ok_or_else(|| {
                err(
                    "SCOPEGATE_LOG",
                    format!("expected error, warn, info or debug, got {v:?}"),
                )
            })?,
        };

        let log_json = match get("SCOPEGATE_LOG_FORMAT") {
            None | Some("text") => false,
            Some("json") => true,
            Some(v) => {
                return Err(err(
                    "SCOPEGATE_LOG_FORMAT",
                    format!("expected text or json, got {v:?}"),
                ));
            }
        };
        let access_log = flag("SCOPEGATE_ACCESS_LOG")?;
        let admin_token = match get("SCOPEGATE_ADMIN_TOKEN") {
            None => None,
            Some(t) if t.len() >= 16 && t.bytes().all(|b| b.is_ascii_graphic()) => {
                Some(t.to_owned())
            }
            Some(_) => {
                return Err(err(
                    "SCOPEGATE_ADMIN_TOKEN",
                    "wants at least 16 printable characters (e.g. `openssl rand -hex 24`)",
                ));
            }
        };
        let metrics_need_admin = match get("SCOPEGATE_METRICS_AUTH") {
            None | Some("none") => false,
            Some("admin") if admin_token.is_some() => true,
            Some("admin") => {
                return Err(err(
                    "SCOPEGATE_METRICS_AUTH",
                    "admin needs SCOPEGATE_ADMIN_TOKEN set",
                ));
            }
            Some(v) => {
                return Err(err(
                    "SCOPEGATE_METRICS_AUTH",
                    format!("expected none or admin, got {v:?}"),
                ));
            }
        };

        if policy.is_none() && !insecure_open {
            return Err(err(
                "SCOPEGATE_POLICY",
                "no policy file: scopegate refuses to start without one. Set SCOPEGATE_POLICY, \
                 or SCOPEGATE_INSECURE_OPEN=1 to forward everything without authentication \
                 (local development only)",
            ));
        }
        let path_keys = flag("SCOPEGATE_PATH_KEYS")?;
        let auth_servers = match get("SCOPEGATE_AUTH_SERVERS") {
            None => Vec::new(),
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if s.starts_with("https://") || s.starts_with("http://") {
                        Ok(s.to_owned())
                    } else {
                        Err(err(
                            "SCOPEGATE_AUTH_SERVERS",
                            format!("{s:?} is not an http(s) URL"),
                        ))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let public_url = match get("SCOPEGATE_PUBLIC_URL") {
            None => None,
            Some(v) if v.starts_with("https://") || v.starts_with("http://") => {
                Some(v.trim_end_matches('/').to_owned())
            }
            Some(v) => {
                return Err(err(
                    "SCOPEGATE_PUBLIC_URL",
                    format!("{v:?} is not an http(s) URL"),
                ));
            }
        };
        let tls = match (get("SCOPEGATE_TLS_CERT"), get("SCOPEGATE_TLS_KEY")) {
            (Some(cert), Some(key)) => Some(crate::tls::server::ListenerFiles {
                cert: cert.into(),
                key: key.into(),
                client_ca: get("SCOPEGATE_TLS_CLIENT_CA").map(PathBuf::from),
            }),
            (None, None) if get("SCOPEGATE_TLS_CLIENT_CA").is_some() => {
                return Err(err(
                    "SCOPEGATE_TLS_CLIENT_CA",
                    "client certificates need HTTPS: set SCOPEGATE_TLS_CERT and SCOPEGATE_TLS_KEY",
                ));
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(err(
                    "SCOPEGATE_TLS_KEY",
                    "SCOPEGATE_TLS_CERT is set: give its private key too (PEM)",
                ));
            }
            (None, Some(_)) => {
                return Err(err(
                    "SCOPEGATE_TLS_CERT",
                    "SCOPEGATE_TLS_KEY is set: give its certificate chain too (PEM)",
                ));
            }
        };
        let egress = match get("SCOPEGATE_EGRESS_PROXY") {
            None if get("SCOPEGATE_EGRESS_NO_PROXY").is_some() => {
                return Err(err(
                    "SCOPEGATE_EGRESS_NO_PROXY",
                    "set only with SCOPEGATE_EGRESS_PROXY",
                ));
            }
            None => None,
            Some(url) => Some(Arc::new(
                Egress::parse(url, get("SCOPEGATE_EGRESS_NO_PROXY"))
                    .map_err(|e| err("SCOPEGATE_EGRESS_PROXY", e))?,
            )),
        };
        let session_secret = match get("SCOPEGATE_SESSION_SECRET") {
            None => None,
            Some(v) if v.len() < 32 => {
                return Err(err(
                    "SCOPEGATE_SESSION_SECRET",
                    "must be at least 32 characters (e.g. `openssl rand -hex 32`)",
                ));
            }
            Some(v) => Some(v.as_bytes().to_vec()),
        };
        let jwt = match get("SCOPEGATE_JWT_KEYS") {
            None => {
                for name in ["SCOPEGATE_JWT_ISSUER", "SCOPEGATE_JWT_AUDIENCE", "SCOPEGATE_JWT_AGENT_CLAIM", "SCOPEGATE_JWT_LEEWAY_S"] {
                    if get(name).is_some() {
                        return Err(ConfigError {
                            variable: leak_name(name),
                            problem: "set without SCOPEGATE_JWT_KEYS (the JWKS file to verify tokens with)".into(),
                        });
                    }
                }
                None
            }
            Some(keys) => Some(JwtConfig {
                keys: PathBuf::from(keys),
                issuer: get("SCOPEGATE_JWT_ISSUER")
                    .ok_or_else(|| err("SCOPEGATE_JWT_ISSUER", "required with SCOPEGATE_JWT_KEYS: the issuer (iss) tokens must name"))?
                    .to_owned(),
                audience: get("SCOPEGATE_JWT_AUDIENCE")
                    .ok_or_else(|| err("SCOPEGATE_JWT_AUDIENCE", "required with SCOPEGATE_JWT_KEYS: this server's resource URL (aud), e.g. https://gw.example.com/mcp"))?
                    .to_owned(),
                agent_claim: get("SCOPEGATE_JWT_AGENT_CLAIM").unwrap_or("sub").to_owned(),
                leeway_s: match get("SCOPEGATE_JWT_LEEWAY_S") {
                    None => 60,
                    Some(v) => parse_u64("SCOPEGATE_JWT_LEEWAY_S", v)?,
                },
            }),
        };
        let rate_limit_status = match get("SCOPEGATE_RATE_LIMIT_STATUS") {
            None | Some("200") => 200,
            Some("429") => 429,
            Some(other) => {
                return Err(err(
                    "SCOPEGATE_RATE_LIMIT_STATUS",
                    format!("expected 200 or 429, got {other:?}"),
                ));
            }
        };
        let name_separator = get("SCOPEGATE_NAME_SEPARATOR").unwrap_or("__").to_owned();
        if name_separator.is_empty()
            || name_separator.len() > 8
            || !name_separator
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(err(
                "SCOPEGATE_NAME_SEPARATOR",
                format!(
                    "expected 1 to 8 characters allowed in tool names (letters, digits, _ - .), got {name_separator:?}"
                ),
            ));
        }
        let aggregate_timeout = ms("SCOPEGATE_AGGREGATE_TIMEOUT_MS", 5_000)?;
        let aggregate_fail_closed = flag("SCOPEGATE_AGGREGATE_FAIL_CLOSED")?;
        let audit = match get("SCOPEGATE_AUDIT_DIR") {
            None => {
                for name in [
                    "SCOPEGATE_AUDIT_FLUSH_MS",
                    "SCOPEGATE_AUDIT_MAX_FILE_MB",
                    "SCOPEGATE_AUDIT_FSYNC",
                    "SCOPEGATE_AUDIT_FAIL_CLOSED",
                    "SCOPEGATE_AUDIT_MAX_ARGS",
                    "SCOPEGATE_AUDIT_RING",
                ] {
                    if get(name).is_some() {
                        return Err(ConfigError {
                            variable: leak_name(name),
                            problem: "set without SCOPEGATE_AUDIT_DIR (where the audit log goes)"
                                .into(),
                        });
                    }
                }
                None
            }
            Some(dir) => {
                let max_args = size("SCOPEGATE_AUDIT_MAX_ARGS", 4096)?;
                let ring_bytes = size("SCOPEGATE_AUDIT_RING", 4 << 20)?;
                if ring_bytes < 16 * max_args + (64 << 10) {
                    return Err(err(
                        "SCOPEGATE_AUDIT_RING",
                        format!(
                            "{ring_bytes} bytes is too small for SCOPEGATE_AUDIT_MAX_ARGS={max_args}: \
                             needs at least 16 entries of the largest size plus 64 KiB"
                        ),
                    ));
                }
                let max_file_mb = match get("SCOPEGATE_AUDIT_MAX_FILE_MB") {
                    None => 100,
                    Some(v) => parse_u64("SCOPEGATE_AUDIT_MAX_FILE_MB", v)?,
                };
                if max_file_mb == 0 {
                    return Err(err("SCOPEGATE_AUDIT_MAX_FILE_MB", "must be at least 1"));
                }
                Some(crate::audit::writer::AuditConfig {
                    dir: PathBuf::from(dir),
                    flush: ms("SCOPEGATE_AUDIT_FLUSH_MS", 200)?,
                    max_file_bytes: max_file_mb << 20,
                    fsync: flag("SCOPEGATE_AUDIT_FSYNC")?,
                    fail_closed: flag("SCOPEGATE_AUDIT_FAIL_CLOSED")?,
                    ring_bytes,
                    max_args,
                })
            }
        };
        let redis = parse_redis(vars)?;
        if jwt.is_some() && policy.is_none() {
            return Err(err(
                "SCOPEGATE_JWT_KEYS",
                "JWTs name agents of a policy: set SCOPEGATE_POLICY too",
            ));
        }
        if insecure_open && policy.is_some() {
            return Err(err(
                "SCOPEGATE_INSECURE_OPEN",
                "set together with SCOPEGATE_POLICY; choose one (a policy, or no authentication)",
            ));
        }
        if upstreams.is_empty() && policy.is_none() {
            return Err(err(
                "SCOPEGATE_UPSTREAMS",
                "no upstream configured; expected name=http://host:port/path[,name=url...]",
            ));
        }

        Ok(Config {
            listen,
            threads,
            io_driver,
            upstreams,
            upstream_timeout,
            max_body,
            max_upstream_message,
            stream_idle,
            header_timeout,
            body_timeout,
            send_timeout,
            idle_timeout,
            drain,
            allowed_origins,
            policy,
            pins,
            insecure_open,
            log_level,
            log_json,
            access_log,
            admin_token,
            metrics_need_admin,
            path_keys,
            auth_servers,
            public_url,
            session_secret,
            jwt,
            rate_limit_status,
            audit,
            name_separator,
            aggregate_fail_closed,
            aggregate_timeout,
            tls,
            egress,
            redis,
        })
    }

    /// Whether the listener is on a loopback address, which turns on the loopback-only `Host`
    /// and `Origin` defaults (DNS-rebinding defence).
    pub fn listens_on_loopback(&self) -> bool {
        self.listen.ip().is_loopback()
    }
}

/// Every variable scopegate reads; anything else starting with `SCOPEGATE_` is refused so a
/// misspelt setting does not silently fall back to its default.
pub const KNOWN_VARIABLES: &[&str] = &[
    "SCOPEGATE_LISTEN",
    "SCOPEGATE_THREADS",
    "SCOPEGATE_IO_DRIVER",
    "SCOPEGATE_UPSTREAMS",
    "SCOPEGATE_UPSTREAM_TIMEOUT_MS",
    "SCOPEGATE_MAX_BODY",
    "SCOPEGATE_MAX_UPSTREAM_MESSAGE",
    "SCOPEGATE_STREAM_IDLE_MS",
    "SCOPEGATE_HEADER_TIMEOUT_MS",
    "SCOPEGATE_BODY_TIMEOUT_MS",
    "SCOPEGATE_SEND_TIMEOUT_MS",
    "SCOPEGATE_IDLE_TIMEOUT_MS",
    "SCOPEGATE_DRAIN_MS",
    "SCOPEGATE_ALLOWED_ORIGINS",
    "SCOPEGATE_POLICY",
    "SCOPEGATE_PINS",
    "SCOPEGATE_INSECURE_OPEN",
    "SCOPEGATE_LOG",
    "SCOPEGATE_LOG_FORMAT",
    "SCOPEGATE_ACCESS_LOG",
    "SCOPEGATE_ADMIN_TOKEN",
    "SCOPEGATE_METRICS_AUTH",
    "SCOPEGATE_PATH_KEYS",
    "SCOPEGATE_AUTH_SERVERS",
    "SCOPEGATE_PUBLIC_URL",
    "SCOPEGATE_TLS_CERT",
    "SCOPEGATE_TLS_KEY",
    "SCOPEGATE_TLS_CLIENT_CA",
    "SCOPEGATE_EGRESS_PROXY",
    "SCOPEGATE_EGRESS_NO_PROXY",
    "SCOPEGATE_SESSION_SECRET",
    "SCOPEGATE_JWT_KEYS",
    "SCOPEGATE_JWT_ISSUER",
    "SCOPEGATE_JWT_AUDIENCE",
    "SCOPEGATE_JWT_AGENT_CLAIM",
    "SCOPEGATE_JWT_LEEWAY_S",
    "SCOPEGATE_RATE_LIMIT_STATUS",
    "SCOPEGATE_AUDIT_DIR",
    "SCOPEGATE_AUDIT_FLUSH_MS",
    "SCOPEGATE_AUDIT_MAX_FILE_MB",
    "SCOPEGATE_AUDIT_FSYNC",
    "SCOPEGATE_AUDIT_FAIL_CLOSED",
    "SCOPEGATE_AUDIT_MAX_ARGS",
    "SCOPEGATE_AUDIT_RING",
    "SCOPEGATE_NAME_SEPARATOR",
    "SCOPEGATE_AGGREGATE_FAIL_CLOSED",
    "SCOPEGATE_AGGREGATE_TIMEOUT_MS",
    "SCOPEGATE_REDIS_URL",
    "SCOPEGATE_REDIS_CA_FILE",
    "SCOPEGATE_REDIS_TIMEOUT_MS",
    "SCOPEGATE_REDIS_FALLBACK",
    "SCOPEGATE_REDIS_PREFIX",
    "SCOPEGATE_REDIS_REPLICAS",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn open(extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut v = vars(&[
            ("SCOPEGATE_INSECURE_OPEN", "1"),
            ("SCOPEGATE_UPSTREAMS", "a=http://127.0.0.1:9001/mcp"),
        ]);
        v.extend(vars(extra));
        v
    }

    #[test]
    fn defaults_apply_in_open_mode() {
        let c = Config::from_vars(&open(&[])).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.max_body, DEFAULT_MAX_BODY);
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].name, "a");
        assert!(c.threads >= 1);
        assert!(c.listens_on_loopback());
    }

    #[test]
    fn no_policy_refuses_to_start() {
        let e = Config::from_vars(&vars(&[(
            "SCOPEGATE_UPSTREAMS",
            "a=http://127.0.0.1:1/mcp",
        )]))
        .unwrap_err();
        assert_eq!(e.variable, "SCOPEGATE_POLICY");
        assert!(e.problem.contains("refuses to start"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases = [
            ("SCOPEGATE_THREADS", "zero"),
            ("SCOPEGATE_THREADS", "0"),
            ("SCOPEGATE_MAX_BODY", "lots"),
            ("SCOPEGATE_LISTEN", "nowhere"),
            ("SCOPEGATE_UPSTREAM_TIMEOUT_MS", "-5"),
            ("SCOPEGATE_SEND_TIMEOUT_MS", "0"),
            ("SCOPEGATE_SEND_TIMEOUT_MS", "4294967296"),
            ("SCOPEGATE_UPSTREAMS", "a=ftp://x/"),
            ("SCOPEGATE_UPSTREAMS", "just-a-url"),
            (
                "SCOPEGATE_UPSTREAMS",
                "a=http://127.0.0.1:1/,a=http://127.0.0.1:2/",
            ),
            ("SCOPEGATE_ALLOWED_ORIGINS", "*"),
            ("SCOPEGATE_INSECURE_OPEN", "maybe"),
            ("SCOPEGATE_IO_DRIVER", "kqueue"),
            ("SCOPEGATE_LOG", "loud"),
            ("SCOPEGATE_LOG_FORMAT", "xml"),
            ("SCOPEGATE_ACCESS_LOG", "perhaps"),
            ("SCOPEGATE_ADMIN_TOKEN", "short"),
            ("SCOPEGATE_METRICS_AUTH", "admin"),
        ];
        for (name, value) in cases {
            let e = Config::from_vars(&open(&[(name, value)])).unwrap_err();
            assert_eq!(e.variable, name, "{name}={value}: {e}");
        }
    }

    #[test]
    fn unknown_variable_is_refused() {
        let e = Config::from_vars(&open(&[("SCOPEGATE_MAX_BDOY", "1")])).unwrap_err();
        assert_eq!(e.variable, "SCOPEGATE_MAX_BDOY");
    }

    #[test]
    fn upstream_list_parses() {
        let c = Config::from_vars(&open(&[(
            "SCOPEGATE_UPSTREAMS",
            "github=http://127.0.0.1:9001/mcp, files=http://localhost:9002",
        )]))
        .unwrap();
        assert_eq!(c.upstreams[0].name, "github");
        assert_eq!(c.upstreams[0].transport.path(), "/mcp");
        assert_eq!(c.upstreams[1].transport.path(), "/");
        assert_eq!(c.upstreams[1].transport.host_header(), "localhost:9002");
    }
}
