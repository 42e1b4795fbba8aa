//! The load generator: virtual MCP agents on keep-alive connections, each with its own key and
//! session, sending a weighted mix of messages, closed-loop (as fast as answers come back) or
//! open-loop at a fixed total rate with coordinated-omission correction.
//!
//! Latency is measured from when a request should have been sent: in open-loop mode, when a
//! connection is still busy with an earlier answer past the next request's scheduled time, the
//! wait counts (that is the queueing the server caused); when it is free early, the generator
//! sleeps until the scheduled time and measures from the actual send (so the generator's own
//! timer slack is not charged to the server).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use monoio::net::TcpStream;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use scopegate::http::conn::{Conn as SgConn, ReadError};
use scopegate::tls::stream::TlsStream;

/// What one virtual agent sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// tools/call of an allowed tool.
    Call,
    /// tools/call of a tool the policy refuses.
    Refused,
    /// tools/call of a tool with a tight rate limit.
    Limited,
    /// tools/list.
    List,
    /// A notification (202, no answer body).
    Notify,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Call => "call",
            Kind::Refused => "refused",
            Kind::Limited => "limited",
            Kind::List => "list",
            Kind::Notify => "notify",
        }
    }

    fn parse(name: &str) -> Option<Kind> {
        [
            Kind::Call,
            Kind::Refused,
            Kind::Limited,
            Kind::List,
            Kind::Notify,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    /// One key per virtual agent, used round-robin over connections (empty: no Authorization).
    pub keys: Vec<String>,
    pub connections: usize,
    pub threads: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Open loop: requests per second over all connections. None: closed loop.
    pub rate: Option<f64>,
    pub mix: Vec<(Kind, u32)>,
    pub tool: String,
    pub refused_tool: String,
    pub limited_tool: String,
    /// The tools/call arguments, a JSON object.
    pub args: String,
    /// Initialize a session per connection first (MCP 2025-06-18 lifecycle).
    pub sessions: bool,
    pub timeout: Duration,
    /// An `https://` target: how to verify it.
    pub tls: Option<TlsTarget>,
}

/// TLS to an `https://` target: the trust store and the name to verify.
#[derive(Debug, Clone)]
pub struct TlsTarget {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

impl TlsTarget {
    /// Trusts the CA certificates in `ca` (PEM) for `host`.
    pub fn new(ca: &Path, host: &str) -> Result<TlsTarget, String> {
        let roots = scopegate::tls::read_roots(ca, "--ca")?;
        let mut config = ClientConfig::builder_with_provider(scopegate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        Ok(TlsTarget {
            config: Arc::new(config),
            name,
        })
    }
}

impl LoadConfig {
    /// `http(s)://host:port/path` -> address, `Host`, path (see [`is_https`](Self::is_https)).
    pub fn parse_url(url: &str) -> Result<(SocketAddr, String, String), String> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or_else(|| format!("only http:// and https:// URLs: {url:?}"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
            .map_err(|e| format!("{hostport:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{hostport:?} resolves to nothing"))?;
        Ok((addr, hostport.to_owned(), path.to_owned()))
    }

    /// `call=90,list=5,notify=5` -> weights.
    pub fn parse_mix(text: &str) -> Result<Vec<(Kind, u32)>, String> {
        let mut mix = Vec::new();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("mix entries are kind=weight, got {part:?}"))?;
            let kind = Kind::parse(name.trim()).ok_or_else(|| {
                format!("unknown kind {name:?} (call, refused, limited, list, notify)")
            })?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("weight of {name} must be an integer, got {weight:?}"))?;
            if weight > 0 {
                mix.push((kind, weight));
            }
        }
        if mix.is_empty() {
            return Err("the mix is empty".into());
        }
        Ok(mix)
    }
}

/// What a run measured.
pub struct Report {
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
    /// Outcomes by message kind: ok, refused, rate_limited, rpc_error, http_NNN, ...
    pub outcomes: BTreeMap<(Kind, String), u64>,
    /// Transport errors by kind: connect, io, timeout, protocol.
    pub errors: BTreeMap<String, u64>,
    pub sessions: u64,
}

impl Report {
    pub fn requests(&self) -> u64 {
        self.latency_us.len()
    }

    pub fn rate(&self) -> f64 {
        self.requests() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile_us(&self, q: f64) -> u64 {
        self.latency_us.value_at_quantile(q)
    }

    pub fn to_json(&self) -> String {
        let mut outcomes = serde_json::Map::new();
        for ((kind, outcome), n) in &self.outcomes {
            let entry = outcomes
                .entry(kind.name())
                .or_insert_with(|| serde_json::json!({}));
            entry[outcome] = serde_json::json!(n);
        }
        let quantiles = [0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9999];
        let spectrum: Vec<serde_json::Value> = quantiles
            .iter()
            .map(|&q| serde_json::json!({"q": q, "us": self.percentile_us(q)}))
            .collect();
        serde_json::json!({
            "requests": self.requests(),
            "seconds": self.elapsed.as_secs_f64(),
            "rate": self.rate(),
            "sessions": self.sessions,
            "latency_us": {
                "p50": self.percentile_us(0.5),
                "p90": self.percentile_us(0.9),
                "p99": self.percentile_us(0.99),
                "p999": self.percentile_us(0.999),
                "max": self.latency_us.max(),
                "mean": self.latency_us.mean(),
                "spectrum": spectrum,
            },
            "outcomes": outcomes,
            "errors": self.errors,
        })
        .to_string()
    }

    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{} requests in {:.2} s: {:.0} req/s\nlatency us: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
            self.requests(),
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.percentile_us(0.5),
            self.percentile_us(0.9),
            self.percentile_us(0.99),
            self.percentile_us(0.999),
            self.latency_us.max()
        );
        for ((kind, outcome), n) in &self.outcomes {
            out.push_str(&format!("  {:8} {outcome:14} {n}\n", kind.name()));
        }
        if self.errors.is_empty() {
            out.push_str("errors: none\n");
        } else {
            for (kind, n) in &self.errors {
                out.push_str(&format!("error {kind}: {n}\n"));
            }
        }
        out
    }
}

struct ThreadResult {
    latency: Histogram<u64>,
    outcomes: BTreeMap<(Kind, String), u64>,
    errors: BTreeMap<String, u64>,
    sessions: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

/// Runs the load and returns what it measured.
pub fn run(config: &LoadConfig) -> Report {
    let threads = config.threads.max(1).min(config.connections.max(1));
    let start = Instant::now();
    let measure_from = start + config.warmup;
    let end = measure_from + config.duration;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let config = config.clone();
            let conns: Vec<usize> = (0..config.connections)
                .filter(|c| c % threads == t)
                .collect();
            std::thread::spawn(move || {
                let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build()
                    .expect("load: runtime");
                rt.block_on(async move {
                    let tasks: Vec<_> = conns
                        .into_iter()
                        .map(|c| {
                            let config = config.clone();
                            monoio::spawn(async move {
                                agent(&config, c, start, measure_from, end).await
                            })
                        })
                        .collect();
                    let mut total = ThreadResult {
                        latency: histogram(),
                        outcomes: BTreeMap::new(),
                        errors: BTreeMap::new(),
                        sessions: 0,
                    };
                    for t in tasks {
                        let r = t.await;
                        let _ = total.latency.add(&r.latency);
                        merge(&mut total.outcomes, r.outcomes);
                        merge(&mut total.errors, r.errors);
                        total.sessions += r.sessions;
                    }
                    total
                })
            })
        })
        .collect();
    let mut report = Report {
        elapsed: config.duration,
        latency_us: histogram(),
        outcomes: BTreeMap::new(),
        errors: BTreeMap::new(),
        sessions: 0,
    };
    for h in handles {
        let r = h.join().expect("load thread");
        let _ = report.latency_us.add(&r.latency);
        merge(&mut report.outcomes, r.outcomes);
        merge(&mut report.errors, r.errors);
        report.sessions += r.sessions;
    }
    report
}

fn merge<K: Ord>(into: &mut BTreeMap<K, u64>, from: BTreeMap<K, u64>) {
    for (k, v) in from {
        *into.entry(k).or_insert(0) += v;
    }
}

/// A deterministic, evenly spread sequence of kinds with the mix's weights (a smooth weighted
/// round robin), started at a different place on each connection.
fn schedule(mix: &[(Kind, u32)], offset: usize) -> Vec<Kind> {
    let total: u32 = mix.iter().map(|(_, w)| w).sum();
    let mut current: Vec<i64> = vec![0; mix.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, (_, w)) in current.iter_mut().zip(mix) {
            *c += i64::from(*w);
        }
        let best = (0..mix.len()).max_by_key(|&i| current[i]).unwrap_or(0);
        current[best] -= i64::from(total);
        out.push(mix[best].0);
    }
    let n = out.len().max(1);
    out.rotate_left(offset % n);
    out
}

/// One connection to the target: scopegate's own connection code (plain or TLS).
struct Conn {
    inner: SgConn,
    /// Bytes read and not yet consumed (the connection's buffer).
    buf: BytesMut,
}

impl Conn {
    async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&TlsTarget>,
    ) -> Result<Conn, String> {
        let tcp = match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return Err("connect".into()),
            Err(_) => return Err("connect_timeout".into()),
        };
        let _ = tcp.set_nodelay(true);
        let inner = match tls {
            None => SgConn::new(tcp),
            Some(t) => {
                let handshake = TlsStream::connect(tcp, t.config.clone(), t.name.clone());
                match monoio::time::timeout(timeout, handshake).await {
                    Ok(Ok(s)) => SgConn::new(s),
                    Ok(Err(_)) => return Err("tls_handshake".into()),
                    Err(_) => return Err("connect_timeout".into()),
                }
            }
        };
        Ok(Conn {
            inner,
            buf: BytesMut::with_capacity(16 * 1024),
        })
    }

    async fn send(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        let (res, _) = self.inner.write_all(bytes).await;
        res.map_err(|_| "io".to_string())
    }

    async fn fill(&mut self, deadline: Instant) -> Result<(), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        std::mem::swap(&mut self.inner.buf, &mut self.buf);
        let read = self.inner.fill_within(Some(left)).await;
        std::mem::swap(&mut self.inner.buf, &mut self.buf);
        match read {
            Ok(0) => Err("closed".into()),
            Ok(_) => Ok(()),
            Err(ReadError::Io(_)) => Err("io".into()),
            Err(ReadError::TimedOut) => Err("timeout".into()),
        }
    }

    /// Reads one response: status, session header, body (de-chunked), and whether the server
    /// keeps the connection.
    async fn response(&mut self, deadline: Instant) -> Result<Answer, String> {
        loop {
            if let Some(answer) = parse_response(&mut self.buf)? {
                return Ok(answer);
            }
            self.fill(deadline).await?;
        }
    }
}

struct Answer {
    status: u16,
    session: Option<String>,
    body: Vec<u8>,
    close: bool,
    event_stream: bool,
}

/// One complete response at the front of `buf` (consumed), None when more bytes are needed.
fn parse_response(buf: &mut BytesMut) -> Result<Option<Answer>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("protocol".into()),
    };
    let status = resp.code.unwrap_or(0);
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut session = None;
    let mut close = resp.version == Some(0);
    let mut event_stream = false;
    for h in resp.headers.iter() {
        let v = std::str::from_utf8(h.value).unwrap_or("");
        if h.name.eq_ignore_ascii_case("content-length") {
            length = v.trim().parse().ok();
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        } else if h.name.eq_ignore_ascii_case("mcp-session-id") {
            session = Some(v.to_owned());
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = v.eq_ignore_ascii_case("close");
        } else if h.name.eq_ignore_ascii_case("content-type") {
            event_stream = v.starts_with("text/event-stream");
        }
    }
    let rest = &buf[head_len..];
    let (body, used) = if chunked {
        match dechunk(rest)? {
            Some(x) => x,
            None => return Ok(None),
        }
    } else {
        let n = length.unwrap_or(0);
        if rest.len() < n {
            return Ok(None);
        }
        (rest[..n].to_vec(), n)
    };
    let _ = buf.split_to(head_len + used);
    Ok(Some(Answer {
        status,
        session,
        body,
        close,
        event_stream,
    }))
}

/// A complete chunked body at the front of `data`: (body, bytes used), None if incomplete.
fn dechunk(data: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut i = 0;
    loop {
        let Some(eol) = memchr_crlf(&data[i..]) else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&data[i..i + eol]).map_err(|_| "protocol")?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "protocol".to_string())?;
        i += eol + 2;
        if size == 0 {
            // No trailers expected: the final CRLF.
            if data.len() < i + 2 {
                return Ok(None);
            }
            return Ok(Some((body, i + 2)));
        }
        if data.len() < i + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[i..i + size]);
        i += size + 2;
    }
}

fn memchr_crlf(data: &[u8]) -> Option<usize> {
    data.windows(2).position(|w| w == b"\r\n")
}

/// The outcome of one answer, by what it carried.
fn classify(answer: &Answer) -> String {
    if answer.status == 202 {
        return "accepted".into();
    }
    if answer.status != 200 {
        return format!("http_{}", answer.status);
    }
    let body = &answer.body;
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    if has(b"\"code\":-32004") {
        "refused".into()
    } else if has(b"\"code\":-32007") {
        "rate_limited".into()
    } else if has(b"\"error\"") {
        "rpc_error".into()
    } else if has(b"\"result\"") {
        if answer.event_stream {
            "ok_sse".into()
        } else {
            "ok".into()
        }
    } else {
        "no_result".into()
    }
}

fn request(config: &LoadConfig, key: Option<&str>, session: Option<&str>, body: &str) -> Vec<u8> {
    let mut out = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n",
        config.path, config.host
    );
    if let Some(k) = key {
        out.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(s) = session {
        out.push_str(&format!(
            "Mcp-Session-Id: {s}\r\nMCP-Protocol-Version: 2025-06-18\r\n"
        ));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

fn body_for(config: &LoadConfig, kind: Kind, id: u64) -> String {
    let call = |tool: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{}}}}}"#,
            config.args
        )
    };
    match kind {
        Kind::Call => call(&config.tool),
        Kind::Refused => call(&config.refused_tool),
        Kind::Limited => call(&config.limited_tool),
        Kind::List => format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#),
        Kind::Notify => r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"load-test","reason":"load"}}"#.into(),
    }
}

const INIT: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"sg-load","version":"0.1.0"}}}"#;

/// One virtual agent on one connection.
async fn agent(
    config: &LoadConfig,
    index: usize,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> ThreadResult {
    let mut result = ThreadResult {
        latency: histogram(),
        outcomes: BTreeMap::new(),
        errors: BTreeMap::new(),
        sessions: 0,
    };
    let key = (!config.keys.is_empty()).then(|| config.keys[index % config.keys.len()].as_str());
    let mut conn: Option<Conn> = None;
    let mut session: Option<String> = None;
    let kinds = schedule(&config.mix, index * 7);
    // Open loop: this connection's share of the rate, its first send spread over one interval.
    let interval = config
        .rate
        .map(|r| Duration::from_secs_f64(config.connections as f64 / r.max(1e-9)));
    let mut next_due = start
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(index as f64 / config.connections.max(1) as f64)
        });
    let mut n: u64 = 0;
    let fail = |result: &mut ThreadResult, what: String| {
        *result.errors.entry(what).or_insert(0) += 1;
    };
    while Instant::now() < end {
        if conn.is_none() {
            match Conn::connect(config.addr, config.timeout, config.tls.as_ref()).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    fail(&mut result, e);
                    monoio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        if config.sessions && session.is_none() {
            let deadline = Instant::now() + config.timeout;
            let opened = async {
                c.send(request(config, key, None, INIT)).await?;
                let a = c.response(deadline).await?;
                if a.status != 200 {
                    return Err(format!("initialize_http_{}", a.status));
                }
                let s = a.session.clone();
                let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
                c.send(request(config, key, s.as_deref(), note)).await?;
                let b = c.response(deadline).await?;
                if b.status != 202 && b.status != 200 {
                    return Err(format!("initialized_http_{}", b.status));
                }
                Ok::<_, String>((s, a.close || b.close))
            }
            .await;
            match opened {
                Ok((s, close)) => {
                    // A server without sessions gives none; the agent carries on without.
                    session = Some(s.unwrap_or_default());
                    result.sessions += 1;
                    if close {
                        conn = None;
                    }
                }
                Err(e) => {
                    fail(&mut result, e);
                    conn = None;
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            continue;
        }
        let kind = kinds[(n as usize) % kinds.len()];
        n += 1;
        // When is this request due?
        let measured_from = match interval {
            None => Instant::now(),
            Some(i) => {
                let due = next_due;
                next_due += i;
                let now = Instant::now();
                if now < due {
                    monoio::time::sleep(due - now).await;
                    Instant::now()
                } else {
                    due
                }
            }
        };
        if measured_from >= end {
            break;
        }
        let sid = session.as_deref().filter(|s| !s.is_empty());
        let bytes = request(config, key, sid, &body_for(config, kind, n));
        let deadline = Instant::now() + config.timeout;
        let outcome = async {
            c.send(bytes).await?;
            c.response(deadline).await
        }
        .await;
        let done = Instant::now();
        match outcome {
            Ok(answer) => {
                if measured_from >= measure_from {
                    let us = done.duration_since(measured_from).as_micros() as u64;
                    let _ = result.latency.record(us.max(1));
                    *result
                        .outcomes
                        .entry((kind, classify(&answer)))
                        .or_insert(0) += 1;
                }
                if answer.status == 404 && sid.is_some() {
                    // The session is gone: initialize again.
                    session = None;
                }
                if answer.close {
                    conn = None;
                }
            }
            Err(e) => {
                if measured_from >= measure_from {
                    fail(&mut result, e);
                }
                conn = None;
            }
        }
    }
    result
}

/// Holds `n` idle keep-alive connections (each has made one `GET path` request) until `hold`
/// passes; prints `ready <n>` on stdout once all are established. Returns how many were.
pub fn hold_idle(addr: SocketAddr, host: &str, path: &str, n: usize, hold: Duration) -> usize {
    let host = host.to_owned();
    let path = path.to_owned();
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("load: runtime");
    rt.block_on(async move {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let Ok(mut c) = Conn::connect(addr, Duration::from_secs(10), None).await else {
                continue;
            };
            let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes();
            if c.send(req).await.is_err() {
                continue;
            }
            match c.response(Instant::now() + Duration::from_secs(10)).await {
                Ok(a) if !a.close => conns.push(c),
                _ => {}
            }
        }
        println!("ready {}", conns.len());
        monoio::time::sleep(hold).await;
        conns.len()
    })
}

/// Connection `i` of a hold: connected, with its key (round robin over the configured ones),
/// and an MCP session initialized on it; with the deadline its remaining requests share.
async fn open_session(
    config: &LoadConfig,
    i: usize,
) -> Option<(Conn, Option<String>, String, Instant)> {
    let key = (!config.keys.is_empty()).then(|| config.keys[i % config.keys.len()].clone());
    let mut c = Conn::connect(config.addr, config.timeout, config.tls.as_ref())
        .await
        .ok()?;
    let deadline = Instant::now() + config.timeout;
    c.send(request(config, key.as_deref(), None, INIT))
        .await
        .ok()?;
    let sid = c.response(deadline).await.ok()?.session?;
    Some((c, key, sid, deadline))
}

/// Holds `n` idle keep-alive connections of agents that have each initialized a session and made
/// one allowed `tools/call` (so the proxy remembers its key and session on each) until `hold`
/// passes; prints `ready <n>` on stdout once all are established. Returns how many were.
pub fn hold_idle_after_call(config: &LoadConfig, n: usize, hold: Duration) -> usize {
    let config = config.clone();
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("load: runtime");
    rt.block_on(async move {
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let Some((mut c, key, sid, deadline)) = open_session(&config, i).await else {
                continue;
            };
            let call = body_for(&config, Kind::Call, 1);
            if c.send(request(&config, key.as_deref(), Some(&sid), &call))
                .await
                .is_err()
            {
                continue;
            }
            match c.response(deadline).await {
                Ok(a) if a.status == 200 && !a.close => conns.push(c),
                _ => {}
            }
        }
        println!("ready {}", conns.len());
        monoio::time::sleep(hold).await;
        conns.len()
    })
}

/// Holds `n` open MCP event streams (each connection initializes a session, then GETs the
/// endpoint's stream) until `hold` passes; prints `ready <n>` once all are open.
pub fn hold_streams(config: &LoadConfig, n: usize, hold: Duration) -> usize {
    let config = config.clone();
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("load: runtime");
    rt.block_on(async move {
        let mut streams = Vec::with_capacity(n);
        for i in 0..n {
            let Some((mut c, key, sid, deadline)) = open_session(&config, i).await else {
                continue;
            };
            let mut get = format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nMcp-Session-Id: {sid}\r\nMCP-Protocol-Version: 2025-06-18\r\n",
                config.path, config.host
            );
            if let Some(k) = &key {
                get.push_str(&format!("Authorization: Bearer {k}\r\n"));
            }
            get.push_str("\r\n");
            if c.send(get.into_bytes()).await.is_err() {
                continue;
            }
            // The head of the stream's response is enough: the stream is open.
            let mut ok = false;
            while Instant::now() < deadline {
                if memchr_crlf(&c.buf).is_some()
                    && c.buf.windows(4).any(|w| w == b"\r\n\r\n")
                {
                    ok = c.buf.starts_with(b"HTTP/1.1 200");
                    break;
                }
                if c.fill(deadline).await.is_err() {
                    break;
                }
            }
            if ok {
                streams.push(c);
            }
        }
        println!("ready {}", streams.len());
        let count = streams.len();
        // Keep reading (heartbeats) so the streams stay healthy.
        let end = Instant::now() + hold;
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut c| {
                monoio::spawn(async move {
                    while Instant::now() < end {
                        c.buf.clear();
                        if c.fill(end).await.is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        for r in readers {
            r.await;
        }
        count
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_the_weights_evenly() {
        let mix = LoadConfig::parse_mix("call=6,list=3,notify=1").unwrap();
        let s = schedule(&mix, 0);
        assert_eq!(s.len(), 10);
        assert_eq!(s.iter().filter(|k| **k == Kind::Call).count(), 6);
        assert_eq!(s.iter().filter(|k| **k == Kind::List).count(), 3);
        // Spread out: never three calls in a row.
        assert!(!s.windows(3).any(|w| w.iter().all(|k| *k == Kind::Call)));
        assert!(LoadConfig::parse_mix("bogus=1").is_err());
        assert!(LoadConfig::parse_mix("call=0").is_err());
    }

    #[test]
    fn responses_parse_with_length_and_chunks() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nMcp-Session-Id: s1\r\n\r\n{}HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        );
        let a = parse_response(&mut buf).unwrap().unwrap();
        assert_eq!(
            (a.status, a.session.as_deref(), &a.body[..]),
            (200, Some("s1"), &b"{}"[..])
        );
        let b = parse_response(&mut buf).unwrap().unwrap();
        assert_eq!(&b.body[..], b"hello");
        assert!(b.event_stream);
        assert!(buf.is_empty());
        let mut partial =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"[..]);
        assert!(parse_response(&mut partial).unwrap().is_none());
    }

    #[test]
    fn outcomes_are_classified_by_what_came_back() {
        let a = |status, body: &str| Answer {
            status,
            session: None,
            body: body.as_bytes().to_vec(),
            close: false,
            event_stream: false,
        };
        assert_eq!(classify(&a(200, r#"{"result":{}}"#)), "ok");
        assert_eq!(classify(&a(200, r#"{"error":{"code":-32004}}"#)), "refused");
        assert_eq!(
            classify(&a(200, r#"{"error":{"code":-32007}}"#)),
            "rate_limited"
        );
        assert_eq!(classify(&a(429, "")), "http_429");
        assert_eq!(classify(&a(202, "")), "accepted");
    }
}
