//! DNS-rebinding defence: foreign Origins and, on loopback, foreign Hosts get 403.

mod support;

use support::*;

#[test]
fn loopback_listener_refuses_foreign_host_and_origin() {
    let up = MockServer::start(MockConfig::default());
    let gw = Gateway::open().upstream("m", &up).start();
    let mut c = gw.client();
    let r = c
        .post("/mcp", INIT)
        .header("Host", "evil.example:8080")
        .send();
    assert_eq!(r.status, 403);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Host")
    );
    let r = c
        .post("/mcp", INIT)
        .header("Origin", "https://evil.example")
        .send();
    assert_eq!(r.status, 403);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Origin")
    );
    let r = c.post("/mcp", INIT).header("Origin", "null").send();
    assert_eq!(r.status, 403);
    assert!(
        up.recorded().is_empty(),
        "a refused request reached the upstream"
    );

    for (host, origin) in [
        ("127.0.0.1", "http://localhost:5173"),
        ("localhost:9", "http://127.0.0.1"),
        ("[::1]:80", "https://[::1]:8443"),
    ] {
        let r = c
            .post("/mcp", INIT)
            .header("Host", host)
            .header("Origin", origin)
            .send();
        assert_eq!(r.status, 200, "{host} {origin}");
    }
    // No Origin at all (non-browser clients) passes.
    assert_eq!(c.post("/mcp", INIT).send().status, 200);
}

#[test]
fn configured_origins_are_allowed() {
    let up = MockServer::start(MockConfig::default());
    let gw = Gateway::open()
        .upstream("m", &up)
        .env(
            "SCOPEGATE_ALLOWED_ORIGINS",
            "https://app.example.com, http://tools.internal:8080",
        )
        .start();
    let mut c = gw.client();
    let ok = |c: &mut Client, o: &str| c.post("/mcp", INIT).header("Origin", o).send().status;
    assert_eq!(ok(&mut c, "https://app.example.com"), 200);
    assert_eq!(ok(&mut c, "http://tools.internal:8080"), 200);
    assert_eq!(ok(&mut c, "http://localhost:3000"), 200);
    assert_eq!(ok(&mut c, "https://app.example.com.evil"), 403);
    assert_eq!(ok(&mut c, "http://tools.internal:8081"), 403);
}
