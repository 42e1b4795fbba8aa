//! Start-up, configuration errors, drivers, signals.

mod support;

use std::time::Duration;
use support::*;

#[test]
fn refuses_to_start_without_a_policy() {
    let up = MockServer::start(MockConfig::default());
    let (code, err) = Gateway::open()
        .upstream("m", &up)
        .without("SCOPEGATE_INSECURE_OPEN")
        .run_to_exit();
    assert_eq!(code, 2);
    assert!(err.contains("SCOPEGATE_POLICY"), "{err}");
    assert!(err.contains("refuses to start"), "{err}");
}

#[test]
fn bad_values_exit_2_naming_the_variable() {
    let up = MockServer::start(MockConfig::default());
    for (name, value) in [
        ("SCOPEGATE_THREADS", "lots"),
        ("SCOPEGATE_MAX_BODY", "-1"),
        ("SCOPEGATE_LISTEN", "not an address"),
        ("SCOPEGATE_UPSTREAM_TIMEOUT_MS", "0"),
        ("SCOPEGATE_UPSTREAMS", "x=ftp://127.0.0.1/mcp"),
        ("SCOPEGATE_TLS_CERT", "/nonexistent/cert.pem"),
        ("SCOPEGATE_IO_DRIVER", "select"),
        ("SCOPEGATE_TYPO", "1"),
    ] {
        let (code, err) = Gateway::open()
            .upstream("m", &up)
            .env(name, value)
            .run_to_exit();
        assert_eq!(code, 2, "{name}={value}: {err}");
        assert!(err.contains(name), "{name}={value}: {err}");
    }
}

#[test]
fn an_upstream_name_that_does_not_resolve_stops_start() {
    let (code, err) = Gateway::open()
        .upstream_url("x", "https://no-such-host.invalid/mcp")
        .run_to_exit();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(r#"upstream "x": cannot resolve "no-such-host.invalid""#),
        "{err}"
    );
}

#[test]
fn insecure_open_says_so_loudly() {
    let up = MockServer::start(MockConfig::default());
    let gw = Gateway::open().upstream("m", &up).start();
    assert!(gw.log().contains("NO AUTHENTICATION"), "{}", gw.log());
}

#[test]
fn epoll_driver_serves_and_is_logged() {
    let up = MockServer::start(MockConfig::default());
    let gw = Gateway::open()
        .upstream("m", &up)
        .env("SCOPEGATE_IO_DRIVER", "epoll")
        .env("SCOPEGATE_THREADS", "2")
        .start();
    let mut c = gw.client();
    assert_eq!(c.post("/mcp", INIT).send().status, 200);
    let r = c
        .post("/mcp", r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"slow_events","arguments":{"count":2,"delay_ms":50}}}"#)
        .header("Mcp-Session-Id", "s")
        .send();
    assert!(r.text().contains("2 events"));
    assert!(
        eventually(Duration::from_secs(5), || gw
            .log()
            .matches("epoll driver")
            .count()
            == 2),
        "{}",
        gw.log()
    );
}

#[test]
fn default_driver_is_logged_per_worker() {
    let up = MockServer::start(MockConfig::default());
    let gw = Gateway::open()
        .upstream("m", &up)
        .env("SCOPEGATE_THREADS", "2")
        .start();
    assert!(
        eventually(Duration::from_secs(5), || {
            let log = gw.log();
            log.contains("worker 0:") && log.contains("worker 1:") && log.contains(" driver")
        }),
        "{}",
        gw.log()
    );
    let mut c = gw.client();
    assert_eq!(c.post("/mcp", INIT).send().status, 200);
}

fn drains_in_flight_then_exits_0(sig: i32) {
    let up = MockServer::start(MockConfig::default());
    let mut gw = Gateway::open().upstream("m", &up).start();
    let mut busy = gw.client();
    let mut idle = gw.client();
    assert_eq!(idle.post("/mcp", INIT).send().status, 200);
    busy.post("/mcp", &call(7, "sleep", "{\"ms\":1000}"))
        .header("Mcp-Session-Id", "s")
        .write();
    assert!(eventually(Duration::from_secs(5), || up.recorded().len() == 2));
    gw.signal(sig);
    // The in-flight call completes, told the connection is closing.
    let r = busy.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], 7);
    assert_eq!(r.header("connection"), Some("close"));
    // The idle keep-alive connection is closed, new connections are refused.
    assert!(idle.is_closed());
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(std::net::TcpStream::connect(gw.addr).is_err());
    assert!(
        eventually(Duration::from_secs(5), || gw.log().contains("drained")),
        "{}",
        gw.log()
    );
}

#[test]
fn sigterm_drains_in_flight_then_exits_0() {
    drains_in_flight_then_exits_0(libc::SIGTERM);
}

#[test]
fn sigint_drains_in_flight_then_exits_0() {
    drains_in_flight_then_exits_0(libc::SIGINT);
}

#[test]
fn drain_is_bounded() {
    // A call that outlasts SCOPEGATE_DRAIN_MS: the process still exits at the deadline.
    let up = MockServer::start(MockConfig::default());
    let mut gw = Gateway::open()
        .upstream("m", &up)
        .env("SCOPEGATE_DRAIN_MS", "300")
        .start();
    let mut busy = gw.client();
    busy.post("/mcp", &call(7, "sleep", "{\"ms\":20000}"))
        .header("Mcp-Session-Id", "s")
        .write();
    assert!(eventually(Duration::from_secs(5), || up.recorded().len() == 1));
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    // The log is read by another thread: its last lines may come just after the exit.
    let said = |s: &str| eventually(Duration::from_secs(5), || gw.log().contains(s));
    assert!(said("drain deadline reached"), "{}", gw.log());
}

#[test]
fn an_open_event_stream_does_not_hold_the_drain() {
    // A GET stream no request waits on ends at the drain (properly: the last chunk), so the
    // drain finishes before its deadline.
    let up = MockServer::start(MockConfig::default());
    let mut gw = Gateway::open()
        .upstream("m", &up)
        .env("SCOPEGATE_DRAIN_MS", "20000")
        .start();
    let mut stream = gw.client();
    stream
        .request("GET", "/mcp")
        .header("Mcp-Session-Id", "s")
        .write();
    let _ = stream.read_until("list_changed");
    gw.signal(libc::SIGTERM);
    let _ = stream.read_until("0\r\n\r\n");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    // The log is read by another thread: its last lines may come just after the exit.
    assert!(
        eventually(Duration::from_secs(5), || gw.log().contains("exiting")),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("drained"), "{}", gw.log());
    assert!(!gw.log().contains("drain deadline reached"), "{}", gw.log());
}
