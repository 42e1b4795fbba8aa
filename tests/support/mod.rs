//! Test harness: run the real `scopegate` binary against mock upstreams, talk to it with a
//! raw HTTP/1.1 client so framing can be checked byte for byte.
//!
//! ```ignore
//! let up = MockServer::start(MockConfig::default());
//! let gw = Gateway::open().upstream("m", &up).start();
//! let mut c = gw.client();
//! let r = c.post("/mcp", INIT).send();
//! ```
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use scopegate_loadtest::mock::{MockConfig, MockServer};

pub const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;

pub fn call(id: u64, tool: &str, args: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{args}}}}}"#
    )
}

/// Builder for a scopegate process.
pub struct Gateway {
    env: Vec<(String, String)>,
    upstreams: Vec<String>,
    /// RLIMIT_NOFILE (soft and hard) for the process, when set.
    fd_limit: Option<u64>,
}

impl Gateway {
    /// Insecure-open mode, one worker, loopback, port 0.
    pub fn open() -> Gateway {
        Gateway {
            env: vec![
                ("SCOPEGATE_INSECURE_OPEN".into(), "1".into()),
                ("SCOPEGATE_LISTEN".into(), "127.0.0.1:0".into()),
                ("SCOPEGATE_THREADS".into(), "1".into()),
                ("SCOPEGATE_DRAIN_MS".into(), "5000".into()),
            ],
            upstreams: Vec::new(),
            fd_limit: None,
        }
    }

    /// Runs the gateway with at most `n` open files (soft and hard limit).
    pub fn fd_limit(mut self, n: u64) -> Gateway {
        self.fd_limit = Some(n);
        self
    }

    pub fn upstream(mut self, name: &str, mock: &MockServer) -> Gateway {
        self.upstreams.push(format!("{name}={}", mock.url()));
        self
    }

    pub fn upstream_url(mut self, name: &str, url: &str) -> Gateway {
        self.upstreams.push(format!("{name}={url}"));
        self
    }

    /// Policy mode: writes `policy` to a fresh file and points SCOPEGATE_POLICY at it.
    pub fn policy(self, policy: &str) -> (Gateway, std::path::PathBuf) {
        let dir = temp_dir("policy");
        let path = dir.join("policy.toml");
        std::fs::write(&path, policy).unwrap();
        let g = self
            .without("SCOPEGATE_INSECURE_OPEN")
            .env("SCOPEGATE_POLICY", path.to_str().unwrap());
        (g, path)
    }

    pub fn env(mut self, name: &str, value: &str) -> Gateway {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn without(mut self, name: &str) -> Gateway {
        self.env.retain(|(k, _)| k != name);
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scopegate"));
        cmd.env_clear();
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if !self.upstreams.is_empty() && !self.env.iter().any(|(k, _)| k == "SCOPEGATE_UPSTREAMS") {
            cmd.env("SCOPEGATE_UPSTREAMS", self.upstreams.join(","));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = self.fd_limit {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe; it touches only the child, before exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd
    }

    /// Runs the binary expecting it to exit at once; returns (exit code, stderr).
    pub fn run_to_exit(&self) -> (i32, String) {
        let out = self.command().output().expect("spawn scopegate");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn start(self) -> Running {
        let mut child = self.command().spawn().expect("spawn scopegate");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.split(" listening on ").nth(1)
                        && let Some(addr) = rest.split_whitespace().next()
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(addr.to_owned());
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!("scopegate did not start: {}", log.lock().unwrap());
            }
        };
        Running { child, addr, log }
    }
}

pub struct Running {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Running {
    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response as received.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the body came chunked.
    pub chunked: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.1 client on one connection.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

pub struct RequestBuilder<'c> {
    client: &'c mut Client,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn request(&mut self, method: &str, path: &str) -> RequestBuilder<'_> {
        RequestBuilder {
            client: self,
            method: method.into(),
            path: path.into(),
            headers: vec![
                ("Host".into(), "127.0.0.1".into()),
                (
                    "Accept".into(),
                    "application/json, text/event-stream".into(),
                ),
            ],
            body: Vec::new(),
        }
    }

    pub fn post(&mut self, path: &str, body: &str) -> RequestBuilder<'_> {
        self.request("POST", path)
            .header("Content-Type", "application/json")
            .body(body.as_bytes())
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 16384];
        match self.stream.read(&mut tmp) {
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                n
            }
            Err(e) => panic!(
                "read failed: {e} (have {:?})",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Whether the server closed the connection (reads end of stream).
    pub fn is_closed(&mut self) -> bool {
        let mut tmp = [0u8; 1];
        matches!(self.stream.read(&mut tmp), Ok(0) | Err(_))
    }

    /// Reads one response head and returns (status, headers).
    pub fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut fields);
            if let httparse::Status::Complete(n) = res.parse(&self.buf).expect("response head") {
                let status = res.code.unwrap();
                let headers = res
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                self.buf.drain(..n);
                return (status, headers);
            }
            assert!(self.fill() > 0, "closed before a response head");
        }
    }

    /// Reads the response to a HEAD request: a head, never a body.
    pub fn read_head_response(&mut self) -> Response {
        let (status, headers) = self.read_head();
        Response {
            status,
            headers,
            body: Vec::new(),
            chunked: false,
        }
    }

    /// Reads one whole response (skipping 1xx).
    pub fn read_response(&mut self) -> Response {
        let (mut status, mut headers) = self.read_head();
        while (100..200).contains(&status) {
            (status, headers) = self.read_head();
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let chunked = get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let body = if chunked {
            self.read_chunked()
        } else if let Some(len) = get("content-length") {
            let len: usize = len.trim().parse().unwrap();
            while self.buf.len() < len {
                assert!(self.fill() > 0, "closed mid-body");
            }
            self.buf.drain(..len).collect()
        } else if matches!(status, 204 | 304) {
            Vec::new()
        } else {
            while self.fill() > 0 {}
            std::mem::take(&mut self.buf)
        };
        Response {
            status,
            headers,
            body,
            chunked,
        }
    }

    fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(self.fill() > 0, "closed mid-chunk");
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
            self.buf.drain(..line_end + 2);
            if size == 0 {
                while !self.buf.starts_with(b"\r\n") {
                    assert!(self.fill() > 0, "closed in trailers");
                }
                self.buf.drain(..2);
                return body;
            }
            while self.buf.len() < size + 2 {
                assert!(self.fill() > 0, "closed mid-chunk");
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Reads until `needle` has arrived `n` times; returns all so far.
    pub fn read_until_count(&mut self, needle: &str, n: usize) -> String {
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            if text.matches(needle).count() >= n {
                return text;
            }
            assert!(self.fill() > 0, "closed before {n} x {needle:?}: {text}");
        }
    }

    /// Reads body bytes of a chunked response until `needle` has arrived; returns all so far.
    pub fn read_until(&mut self, needle: &str) -> String {
        loop {
            if String::from_utf8_lossy(&self.buf).contains(needle) {
                return String::from_utf8_lossy(&self.buf).into_owned();
            }
            assert!(self.fill() > 0, "closed before {needle:?}");
        }
    }
}

impl RequestBuilder<'_> {
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn without(mut self, name: &str) -> Self {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    pub fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.path).into_bytes();
        for (n, v) in &self.headers {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        if !self.body.is_empty() || self.method == "POST" {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// Writes the request without reading the answer.
    pub fn write(self) {
        let bytes = self.bytes();
        self.client.send_raw(&bytes);
    }

    pub fn send(self) -> Response {
        let bytes = self.bytes();
        let client = self.client;
        client.send_raw(&bytes);
        client.read_response()
    }
}

/// A port on 127.0.0.1 with nothing listening.
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Polls `f` until it holds or `limit` passes (for state that settles asynchronously, such
/// as the mock's record of what it received).
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// A fresh directory under the system temp dir, unique to this process and call.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "scopegate-{tag}-{}-{n}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `hex(sha256(key))`, as the policy's key_sha256 wants it.
pub fn sha256_hex(key: &str) -> String {
    scopegate::policy::hash_key(key)
}
