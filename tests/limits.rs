//! Bad or hostile input gets a clear answer and never reaches the upstream.

mod support;

use std::time::Duration;
use support::*;

fn gateway(extra: &[(&str, &str)]) -> (MockServer, Running) {
    let up = MockServer::start(MockConfig::default());
    let mut g = Gateway::open().upstream("m", &up);
    for (k, v) in extra {
        g = g.env(k, v);
    }
    (up, g.start())
}

#[test]
fn invalid_json_is_a_parse_error_and_not_forwarded() {
    let (up, gw) = gateway(&[]);
    let mut c = gw.client();
    for body in [
        "{\"jsonrpc\":\"2.0\",",
        "",
        "\u{feff}{}",
        "[]",
        "{\"jsonrpc\":\"2.0\",\"id\":1}",
    ] {
        let r = c.post("/mcp", body).send();
        assert_eq!(r.status, 400, "{body:?}");
        let code = r.json()["error"]["code"].as_i64().unwrap();
        assert!(code == -32700 || code == -32600, "{body:?}: {code}");
    }
    let r = c.post("/mcp", "{nope").send();
    assert_eq!(r.json()["error"]["code"], -32700);
    assert!(r.json()["id"].is_null());
    assert!(
        up.recorded().is_empty(),
        "a malformed body reached the upstream"
    );
    // The connection is still usable.
    assert_eq!(c.post("/mcp", INIT).send().status, 200);
}

#[test]
fn duplicate_keys_are_refused_not_guessed() {
    let (up, gw) = gateway(&[]);
    let mut c = gw.client();
    let r = c
        .post("/mcp", r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"delete_repo"}}"#)
        .send();
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("duplicate key")
    );
    assert!(up.recorded().is_empty());
}

#[test]
fn oversized_heads_get_431() {
    let (up, gw) = gateway(&[]);
    let mut c = gw.client();
    let r = c
        .post("/mcp", INIT)
        .header("X-Big", &"a".repeat(20_000))
        .send();
    assert_eq!(r.status, 431);
    let mut c = gw.client();
    let mut req = c.post("/mcp", INIT);
    for i in 0..70 {
        req = req.header(&format!("X-H{i}"), "1");
    }
    assert_eq!(req.send().status, 431);
    assert!(up.recorded().is_empty());
}

#[test]
fn oversized_bodies_get_413_without_being_read() {
    let (up, gw) = gateway(&[("SCOPEGATE_MAX_BODY", "1024")]);
    let mut c = gw.client();
    let big = call(1, "echo", &format!("{{\"a\":\"{}\"}}", "x".repeat(2000)));
    let r = c.post("/mcp", &big).send();
    assert_eq!(r.status, 413);
    assert_eq!(r.header("connection"), Some("close"));
    // Announced length over the limit, with Expect: the body is never requested.
    let mut c = gw.client();
    c.send_raw(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999\r\nExpect: 100-continue\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 413);
    // Chunked, growing past the limit.
    let mut c = gw.client();
    let mut raw =
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        raw.extend_from_slice(format!("{:x}\r\n{}\r\n", 600, "y".repeat(600)).as_bytes());
    }
    c.send_raw(&raw);
    assert_eq!(c.read_response().status, 413);
    assert!(up.recorded().is_empty());
}

#[test]
fn ambiguous_framing_is_refused_and_never_forwarded() {
    let (up, gw) = gateway(&[]);
    let cases: [&[u8]; 4] = [
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /mcp HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    ];
    for raw in cases {
        let mut c = gw.client();
        c.send_raw(raw);
        let r = c.read_response();
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(raw));
        assert!(
            c.is_closed(),
            "connection must close after ambiguous framing"
        );
    }
    let mut c = gw.client();
    c.send_raw(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n");
    assert_eq!(c.read_response().status, 501);
    assert!(up.recorded().is_empty());
}

#[test]
fn chunked_request_bodies_are_forwarded_with_a_length() {
    let (up, gw) = gateway(&[]);
    let mut c = gw.client();
    let body = call(3, "echo", "{\"k\":\"v\"}");
    let (a, b) = body.split_at(10);
    let raw = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nMcp-Session-Id: s\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    c.send_raw(raw.as_bytes());
    let r = c.read_response();
    assert_eq!(r.status, 200);
    let rec = up.recorded();
    let seen = rec.last().unwrap();
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(
        seen.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(seen.header("transfer-encoding"), None);
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let (up, gw) = gateway(&[]);
    let mut c = gw.client();
    let body = call(4, "echo", "{}");
    c.send_raw(
        format!(
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nMcp-Session-Id: s\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let (status, _) = c.read_head();
    assert_eq!(status, 100);
    c.send_raw(body.as_bytes());
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(up.recorded().last().unwrap().header("expect"), None);
}

#[test]
fn slow_clients_are_cut_off() {
    let (up, gw) = gateway(&[
        ("SCOPEGATE_HEADER_TIMEOUT_MS", "300"),
        ("SCOPEGATE_BODY_TIMEOUT_MS", "300"),
        ("SCOPEGATE_IDLE_TIMEOUT_MS", "400"),
    ]);
    // A head that never finishes.
    let mut c = gw.client();
    c.send_raw(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 408);
    assert!(c.is_closed());
    // A body that never finishes.
    let mut c = gw.client();
    c.send_raw(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"jsonrpc\"");
    assert_eq!(c.read_response().status, 408);
    // An idle connection is closed.
    let mut c = gw.client();
    assert!(c.is_closed(), "idle connection not closed");
    assert!(up.recorded().is_empty());
}

/// Deadlines fire whatever waited on the worker before: connections whose heads came in two
/// pieces (each read waited under a deadline, met in time) leave their timers to the ones after
/// them, and a head that never finishes on a later connection is still cut off.
#[test]
fn a_deadline_fires_after_other_connections_waited_under_theirs() {
    let (_up, gw) = gateway(&[
        ("SCOPEGATE_THREADS", "1"),
        ("SCOPEGATE_HEADER_TIMEOUT_MS", "300"),
    ]);
    for _ in 0..3 {
        let mut c = gw.client();
        c.send_raw(b"GET /healthz HTTP/1.1\r\n");
        std::thread::sleep(Duration::from_millis(30));
        c.send_raw(b"Host: 127.0.0.1\r\n\r\n");
        assert_eq!(c.read_response().status, 200);
    }
    for _ in 0..3 {
        let mut c = gw.client();
        c.send_raw(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        assert_eq!(c.read_response().status, 408);
        assert!(c.is_closed());
    }
}

/// An upstream that takes the connection but never reads the request gets it no longer than
/// the upstream timeout: the agent is answered 504 with its id, as for one that never answers.
#[test]
fn an_upstream_that_reads_nothing_times_out() {
    let deaf = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = deaf.local_addr().unwrap().port();
    // Accepts, holds, never reads (until the test ends).
    let held = std::thread::spawn(move || {
        let (conn, _) = deaf.accept().unwrap();
        std::thread::sleep(Duration::from_secs(5));
        drop(conn);
    });
    let gw = Gateway::open()
        .upstream_url("deaf", &format!("http://127.0.0.1:{port}/mcp"))
        .env("SCOPEGATE_UPSTREAM_TIMEOUT_MS", "500")
        .env("SCOPEGATE_MAX_BODY", "64MiB")
        .start();
    // Far more than the socket buffers on both sides hold.
    let pad = "a".repeat(48 << 20);
    let body = call(7, "echo", &format!("{{\"pad\":\"{pad}\"}}"));
    let mut c = gw.client();
    let r = c.post("/mcp/deaf", &body).send();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["id"], 7);
    held.join().unwrap();
}

/// An agent that stops reading its answer is cut off after SCOPEGATE_SEND_TIMEOUT_MS: its
/// connection is closed, the rest of the answer is not held for it.
#[test]
fn an_agent_that_reads_nothing_is_cut_off() {
    let (_up, gw) = gateway(&[("SCOPEGATE_SEND_TIMEOUT_MS", "300")]);
    let mut c = gw.client();
    let bytes = 64 << 20;
    c.post("/mcp", &call(8, "big", &format!("{{\"bytes\":{bytes}}}")))
        .header("Mcp-Session-Id", "s")
        .write();
    // Reads nothing for well past the send timeout (which is looked at once a second).
    std::thread::sleep(Duration::from_millis(3000));
    let mut got = 0usize;
    let mut tmp = vec![0u8; 1 << 16];
    loop {
        match std::io::Read::read(&mut c.stream, &mut tmp) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("read failed after {got} bytes: {e}\n{}", gw.log()),
        }
    }
    assert!(
        got < bytes,
        "the whole answer ({got} bytes) came: not cut off"
    );
    // The gateway goes on serving.
    assert_eq!(gw.client().request("GET", "/healthz").send().status, 200);
}

/// Out of file descriptors (a flood of connections), the gateway says so within the log's
/// budget for what peers cause, not once per failed accept, and serves again once they go.
#[test]
fn failed_accepts_do_not_flood_the_log() {
    let up = MockServer::start(MockConfig::default());
    let gw = Gateway::open().upstream("m", &up).fd_limit(64).start();
    // Far more connections than the gateway may hold: the rest wait in the backlog while its
    // accepts fail (EMFILE), every 10 ms, for two seconds.
    let flood: Vec<std::net::TcpStream> = (0..150)
        .filter_map(|_| std::net::TcpStream::connect(gw.addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(2000));
    let told = gw.log().matches("accept failed").count();
    assert!(told > 0, "the failures were not told:\n{}", gw.log());
    // The budget: a burst of 20, then 10 a second (a failure every 10 ms would be 200).
    assert!(told <= 45, "{told} lines for failed accepts");
    drop(flood);
    assert_eq!(gw.client().request("GET", "/healthz").send().status, 200);
}

/// The idle timeout counts from a connection's last request (the worker's sweep sees requests
/// begun in between), and a connection quiet for longer is closed.
#[test]
fn the_idle_timeout_counts_from_the_last_request() {
    let (_up, gw) = gateway(&[("SCOPEGATE_IDLE_TIMEOUT_MS", "1000")]);
    let mut c = gw.client();
    let start = std::time::Instant::now();
    // Busier than the timeout for twice its length: the connection stays open.
    while start.elapsed() < Duration::from_millis(2000) {
        assert_eq!(c.request("GET", "/healthz").send().status, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Then quiet: closed, and not before the timeout has passed since the last request.
    let quiet = std::time::Instant::now();
    assert!(c.is_closed(), "idle connection not closed");
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(800),
        "closed {after:?} after the last request"
    );
}

/// A request that starts late in the idle window is under the header timeout from its first
/// byte, not cut by the idle timeout while its head trickles in.
#[test]
fn a_head_begun_before_the_idle_timeout_is_not_cut_by_it() {
    let (_up, gw) = gateway(&[
        ("SCOPEGATE_IDLE_TIMEOUT_MS", "1000"),
        ("SCOPEGATE_HEADER_TIMEOUT_MS", "5000"),
    ]);
    let mut c = gw.client();
    std::thread::sleep(Duration::from_millis(600));
    c.send_raw(b"GET /healthz HTTP/1.1\r\n");
    // Past the idle timeout since the connection opened, within the header timeout.
    std::thread::sleep(Duration::from_millis(1200));
    c.send_raw(b"Host: 127.0.0.1\r\n\r\n");
    assert_eq!(c.read_response().status, 200);
}

#[test]
fn upstream_failures_answer_with_the_request_id_and_keep_the_connection() {
    let up = MockServer::start(MockConfig::default());
    let dead = dead_port();
    let gw = Gateway::open()
        .upstream("live", &up)
        .upstream_url("dead", &format!("http://127.0.0.1:{dead}/mcp"))
        .env("SCOPEGATE_UPSTREAM_TIMEOUT_MS", "500")
        .start();
    let mut c = gw.client();
    let r = c.post("/mcp/dead", &call(41, "echo", "{}")).send();
    assert_eq!(r.status, 502);
    let v = r.json();
    assert_eq!(v["id"], 41);
    assert_eq!(v["error"]["code"], -32001);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("refused"),
        "{v}"
    );
    // Same connection: a slow upstream times out with 504, id intact.
    let r = c
        .post("/mcp/live", r#"{"jsonrpc":"2.0","id":"slow-1","method":"tools/call","params":{"name":"sleep","arguments":{"ms":3000}}}"#)
        .header("Mcp-Session-Id", "s")
        .send();
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["id"], "slow-1");
    assert_eq!(r.json()["error"]["code"], -32002);
    // And the same connection still works.
    let r = c
        .post("/mcp/live", &call(43, "echo", "{}"))
        .header("Mcp-Session-Id", "s")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], 43);
}

#[test]
fn an_upstream_that_goes_away_is_reported_and_comes_back() {
    let up = MockServer::start(MockConfig::default());
    let gw = Gateway::open()
        .upstream("m", &up)
        .env("SCOPEGATE_UPSTREAM_TIMEOUT_MS", "2000")
        .start();
    let mut c = gw.client();
    assert_eq!(c.post("/mcp", INIT).send().status, 200);
    up.stop();
    // New connections are accepted then closed by the upstream: 502, not a hang.
    std::thread::sleep(Duration::from_millis(4500)); // let pooled connections expire
    let r = c
        .post("/mcp", &call(2, "echo", "{}"))
        .header("Mcp-Session-Id", "s")
        .send();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["id"], 2);
}
