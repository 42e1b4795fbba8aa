//! TLS with certificates made by the openssl CLI per test: scopegate's TLS stream against
//! rustls's own blocking server, and scopegate to an HTTPS upstream: one handshake per pooled
//! connection, session resumption when a new connection is needed, a verified certificate.
//! (tests/e2e/test_tls.py covers the real SDK peers, mutual TLS and the failure cases.)

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{Gateway, INIT, call};

/// A CA and a certificate for localhost / 127.0.0.1 signed by it, in a fresh directory.
fn make_certs(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sg-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl CLI (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=scopegate test ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    dir
}

fn server_config(dir: &Path) -> Arc<rustls::ServerConfig> {
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(scopegate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Serving HTTPS with the test certificate.
trait Https {
    fn https(self, dir: &Path) -> Self;
}

impl Https for Gateway {
    fn https(self, dir: &Path) -> Gateway {
        self.env(
            "SCOPEGATE_TLS_CERT",
            dir.join("server.pem").to_str().unwrap(),
        )
        .env(
            "SCOPEGATE_TLS_KEY",
            dir.join("server.key").to_str().unwrap(),
        )
    }
}

/// An agent's TLS connection to scopegate (rustls's blocking client), trusting the test CA.
type TlsAgent = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

fn agent_over_tls(dir: &Path, addr: std::net::SocketAddr) -> TlsAgent {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(scopegate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// What the HTTPS upstream saw: one entry per TLS connection (resumed or not, ALPN, SNI).
#[derive(Debug, Clone)]
struct Handshake {
    resumed: bool,
    alpn: Option<Vec<u8>>,
    sni: Option<String>,
}

/// An HTTPS MCP upstream on rustls's blocking API: answers every POST with a JSON-RPC result
/// (closing the connection after it when `close_after` says so) and records each handshake.
struct HttpsUpstream {
    port: u16,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    requests: Arc<AtomicUsize>,
}

fn https_upstream(dir: &Path, close_after: bool) -> HttpsUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = server_config(dir);
    let handshakes = Arc::new(Mutex::new(Vec::new()));
    let requests = Arc::new(AtomicUsize::new(0));
    let (seen, count) = (handshakes.clone(), requests.clone());
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, seen, count) = (config.clone(), seen.clone(), count.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut reader = Vec::new();
                let mut first = true;
                loop {
                    // Read one request: head, then Content-Length bytes.
                    let mut buf = [0u8; 4096];
                    let head_end = loop {
                        if let Some(i) = reader.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match tls.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => reader.extend_from_slice(&buf[..n]),
                        }
                    };
                    if first {
                        first = false;
                        seen.lock().unwrap().push(Handshake {
                            resumed: tls.conn.handshake_kind()
                                == Some(rustls::HandshakeKind::Resumed),
                            alpn: tls.conn.alpn_protocol().map(<[u8]>::to_vec),
                            sni: tls.conn.server_name().map(str::to_owned),
                        });
                    }
                    let head = String::from_utf8_lossy(&reader[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while reader.len() < head_end + len {
                        match tls.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => reader.extend_from_slice(&buf[..n]),
                        }
                    }
                    reader.drain(..head_end + len);
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"over tls"}]}}"#;
                    let close = if close_after {
                        "Connection: close\r\n"
                    } else {
                        ""
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{close}Content-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tls.write_all(answer.as_bytes()).is_err() || close_after {
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                        return;
                    }
                }
            });
        }
    });
    HttpsUpstream {
        port,
        handshakes,
        requests,
    }
}

fn gateway_to(dir: &Path, up: &HttpsUpstream, host: &str) -> support::Running {
    Gateway::open()
        .upstream_url("t", &format!("https://{host}:{}/mcp", up.port))
        // The test CA is the machine's store for this process.
        .env("SSL_CERT_FILE", dir.join("ca.pem").to_str().unwrap())
        .env("SCOPEGATE_THREADS", "1")
        .start()
}

#[test]
fn pooled_tls_connections_pay_one_handshake() {
    let dir = make_certs("pool");
    let up = https_upstream(&dir, false);
    let gw = gateway_to(&dir, &up, "localhost");
    let mut c = gw.client();
    for i in 0..20 {
        let r = c.post("/mcp/t", &call(i, "x", "{}")).send();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("over tls"), "{}", r.text());
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 20);
    let handshakes = up.handshakes.lock().unwrap().clone();
    assert_eq!(
        handshakes.len(),
        1,
        "one pooled connection for 20 calls: {handshakes:?}"
    );
    assert_eq!(handshakes[0].alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(handshakes[0].sni.as_deref(), Some("localhost"));
}

#[test]
fn new_connections_resume_the_session() {
    let dir = make_certs("resume");
    // The upstream closes after every answer: every call needs a new connection.
    let up = https_upstream(&dir, true);
    let gw = gateway_to(&dir, &up, "127.0.0.1");
    let mut c = gw.client();
    for i in 0..3 {
        let r = c.post("/mcp/t", &call(i, "x", "{}")).send();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let handshakes = up.handshakes.lock().unwrap().clone();
    assert_eq!(handshakes.len(), 3, "{handshakes:?}");
    assert!(!handshakes[0].resumed);
    assert!(
        handshakes[1..].iter().all(|h| h.resumed),
        "later connections resume: {handshakes:?}"
    );
    // No SNI for an IP address.
    assert_eq!(handshakes[0].sni, None);
}

#[test]
fn an_unknown_ca_is_a_clear_502() {
    let dir = make_certs("unknown");
    let up = https_upstream(&dir, false);
    // The machine's real store, which does not hold the test CA.
    let gw = Gateway::open()
        .upstream_url("t", &format!("https://localhost:{}/mcp", up.port))
        .start();
    let r = gw.client().post("/mcp/t", INIT).send();
    assert_eq!(r.status, 502);
    let text = r.text();
    assert!(
        text.contains(r#"upstream \"t\" TLS handshake failed: certificate from an unknown CA"#),
        "{text}"
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    let metrics = gw.client().request("GET", "/metrics").send().text();
    assert!(
        metrics.contains(
            r#"scopegate_upstream_tls_failures_total{upstream="t",reason="certificate from an unknown CA"} 1"#
        ),
        "{metrics}"
    );
}

/// scopegate's own TLS stream: the listener side against a rustls blocking client, with a
/// payload larger than several records in both directions.
#[test]
fn listener_round_trips_large_bodies() {
    let dir = make_certs("listener");
    let up = support::MockServer::start(support::MockConfig {
        sessions: false,
        ..support::MockConfig::default()
    });
    let gw = Gateway::open().upstream("m", &up).https(&dir).start();
    let mut tls = agent_over_tls(&dir, gw.addr);
    let big = "x".repeat(200_000);
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{big}"}}}}}}"#
    );
    for _ in 0..2 {
        let req = format!(
            "POST /mcp/m HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(req.as_bytes()).unwrap();
        let mut reader = BufReader::new(&mut tls);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut len = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut answer = vec![0; len];
        reader.read_exact(&mut answer).unwrap();
        // The upstream got the whole body, through the TLS listener, on one connection.
        assert!(len > 0);
    }
    let seen = up.recorded();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|r| r.body.len() == body.len()));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// sg-load (the benchmarks' generator) speaks HTTPS through scopegate's own TLS stream: every
/// virtual agent's session and calls succeed over the HTTPS listener.
#[test]
fn the_load_generator_drives_an_https_listener() {
    use scopegate_loadtest::load::{self, Kind, LoadConfig, TlsTarget};
    let dir = make_certs("load");
    let up = support::MockServer::start(support::MockConfig::default());
    let gw = Gateway::open().upstream("m", &up).https(&dir).start();
    let url = format!("https://localhost:{}/mcp/m", gw.addr.port());
    let (_, host, path) = LoadConfig::parse_url(&url).unwrap();
    let config = LoadConfig {
        addr: gw.addr,
        host,
        path,
        keys: Vec::new(),
        connections: 3,
        threads: 1,
        duration: std::time::Duration::from_millis(500),
        warmup: std::time::Duration::ZERO,
        rate: None,
        mix: LoadConfig::parse_mix("call=1").unwrap(),
        tool: "echo".into(),
        refused_tool: "x".into(),
        limited_tool: "y".into(),
        args: "{}".into(),
        sessions: true,
        timeout: std::time::Duration::from_secs(5),
        tls: Some(TlsTarget::new(&dir.join("ca.pem"), "localhost").unwrap()),
    };
    let report = load::run(&config);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.sessions, 3);
    let ok = report
        .outcomes
        .get(&(Kind::Call, "ok".to_string()))
        .copied()
        .unwrap_or(0);
    assert!(ok > 0, "{}", report.to_text());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An agent that sends close_notify followed by more bytes in the same packet (data after the
/// alert must be ignored) neither hangs its worker nor disturbs other agents.
#[test]
fn bytes_after_close_notify_do_not_hang_the_worker() {
    let dir = make_certs("after-close");
    let up = support::MockServer::start(support::MockConfig::default());
    let gw = Gateway::open()
        .upstream("m", &up)
        .env("SCOPEGATE_THREADS", "1")
        .https(&dir)
        .start();
    let connect = || agent_over_tls(&dir, gw.addr);
    let healthz = |tls: &mut TlsAgent| {
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tls.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut rude = connect();
    assert!(healthz(&mut rude).starts_with("HTTP/1.1 200"));
    // close_notify, then 64 KiB more in the same write.
    rude.conn.send_close_notify();
    let mut wire = Vec::new();
    while rude.conn.wants_write() {
        rude.conn.write_tls(&mut wire).unwrap();
    }
    wire.extend(std::iter::repeat_n(0x17u8, 64 * 1024));
    let _ = rude.sock.write_all(&wire);
    // The one worker still serves others.
    let mut polite = connect();
    assert!(healthz(&mut polite).starts_with("HTTP/1.1 200"));
    std::fs::remove_dir_all(&dir).unwrap();
}
