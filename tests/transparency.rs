//! What goes through scopegate arrives as it was sent: bodies byte for byte, MCP headers,
//! statuses, event streams event by event.

mod support;

use support::*;

fn gateway() -> (MockServer, Running) {
    let up = MockServer::start(MockConfig::default());
    let gw = Gateway::open().upstream("m", &up).start();
    (up, gw)
}

#[test]
fn request_body_reaches_the_upstream_byte_for_byte() {
    let (up, gw) = gateway();
    let mut c = gw.client();
    // Odd spacing, key order, escapes: nothing may be normalised on the way.
    let body = "{ \"params\" : {\"arguments\":{\"s\":\"\\u00e9\\n\",\"n\":1.50},\"name\":\"echo\"},\n\"method\":\"tools/call\",\"id\":\"x-1\",\"jsonrpc\":\"2.0\"}  ";
    let r = c.post("/mcp", body).header("Mcp-Session-Id", "s1").send();
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = up.recorded();
    let last = rec.last().unwrap();
    assert_eq!(last.body, body.as_bytes());
    assert_eq!(last.path, "/mcp");
}

#[test]
fn json_answer_is_relayed_unchanged_with_session_header() {
    let (_up, gw) = gateway();
    let mut c = gw.client();
    let r = c.post("/mcp", INIT).send();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("mcp-session-id"), Some("mock-session-0"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["id"], 1);
    assert_eq!(v["result"]["serverInfo"]["name"], "sg-mock");
}

#[test]
fn mcp_headers_travel_and_credentials_and_hop_by_hop_do_not() {
    let (up, gw) = gateway();
    let mut c = gw.client();
    let r = c
        .post("/mcp/m?trace=1", &call(5, "echo", "{}"))
        .header("Mcp-Session-Id", "abc")
        .header("MCP-Protocol-Version", "2025-11-25")
        .header("Mcp-Method", "tools/call")
        .header("Mcp-Name", "echo")
        .header("Last-Event-ID", "ev-9")
        .header("Authorization", "Bearer agent-secret")
        .header("Connection", "keep-alive, X-Hop")
        .header("X-Hop", "must-not-pass")
        .header("Keep-Alive", "timeout=5")
        .header("X-Forwarded-For", "10.9.8.7")
        .header("X-Custom", "kept")
        .send();
    assert_eq!(r.status, 200);
    let rec = up.recorded();
    let seen = rec.last().unwrap();
    assert_eq!(seen.path, "/mcp?trace=1");
    assert_eq!(seen.header("mcp-session-id"), Some("abc"));
    assert_eq!(seen.header("mcp-protocol-version"), Some("2025-11-25"));
    assert_eq!(seen.header("mcp-method"), Some("tools/call"));
    assert_eq!(seen.header("mcp-name"), Some("echo"));
    assert_eq!(seen.header("last-event-id"), Some("ev-9"));
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(
        seen.header("authorization"),
        None,
        "agent credential leaked upstream"
    );
    assert_eq!(seen.header("x-hop"), None);
    assert_eq!(seen.header("keep-alive"), None);
    assert_eq!(seen.header("host"), Some(up.addr.to_string().as_str()));
    assert_eq!(seen.header("x-forwarded-for"), Some("10.9.8.7, 127.0.0.1"));
}

#[test]
fn notifications_and_responses_get_202() {
    let (up, gw) = gateway();
    let mut c = gw.client();
    let r = c
        .post(
            "/mcp",
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        )
        .header("Mcp-Session-Id", "s")
        .send();
    assert_eq!(r.status, 202);
    assert!(r.body.is_empty());
    let r = c
        .post(
            "/mcp",
            r#"{"jsonrpc":"2.0","id":"srv-1","result":{"roots":[]}}"#,
        )
        .header("Mcp-Session-Id", "s")
        .send();
    assert_eq!(r.status, 202);
    assert_eq!(up.methods(), vec!["notifications/initialized"]);
}

#[test]
fn upstream_error_statuses_and_bodies_are_relayed_unchanged() {
    let (_up, gw) = gateway();
    let mut c = gw.client();
    for code in [400u16, 404, 405, 406, 409, 415, 500, 503] {
        let body = format!(
            r#"{{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{{\"code\":-32000,\"message\":\"status {code}\"}}}}"#
        );
        let args =
            serde_json::json!({"code": code, "body": body.replace("\\\"", "\"")}).to_string();
        let r = c
            .post("/mcp", &call(1, "status", &args))
            .header("Mcp-Session-Id", "s")
            .send();
        assert_eq!(r.status, code);
        assert_eq!(r.text(), body.replace("\\\"", "\""));
    }
}

#[test]
fn sse_events_reach_the_agent_before_the_upstream_writes_the_next() {
    let (_up, gw) = gateway();
    let mut c = gw.client();
    // The upstream sends one event, then waits 60 s before the next. The client's read timeout
    // is 15 s: only an unbuffered relay lets this read succeed.
    c.post(
        "/mcp",
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"slow_events","arguments":{"count":2,"delay_ms":60000},"_meta":{"progressToken":"tok"}}}"#,
    )
    .header("Mcp-Session-Id", "s")
    .write();
    let (status, headers) = c.read_head();
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("content-type")
                && v.starts_with("text/event-stream"))
    );
    let got = c.read_until("\n\n");
    assert!(got.contains("notifications/progress"), "{got}");
    assert!(got.contains("\"progressToken\":\"tok\""), "{got}");
    assert!(
        !got.contains("\"result\""),
        "the final result cannot have arrived yet: {got}"
    );
}

#[test]
fn sse_ids_retry_comments_and_empty_data_pass_unchanged() {
    let (_up, gw) = gateway();
    let mut c = gw.client();
    let r = c
        .post("/mcp", &call(4, "sse_raw", "{}"))
        .header("Mcp-Session-Id", "s")
        .send();
    assert_eq!(r.status, 200);
    assert!(r.chunked);
    let text = r.text();
    let expected = concat!(
        ": a comment\n\n",
        "id: ev-1\nretry: 1500\ndata:\n\n",
        "id: ev-2\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"level\":\"info\",\"data\":\"hi\"}}\n\n",
    );
    assert!(text.starts_with(expected), "{text}");
    assert!(text.contains("raw done"));
}

#[test]
fn get_stream_stays_open_and_relays_events_with_last_event_id() {
    let (up, gw) = gateway();
    let mut c = gw.client();
    c.request("GET", "/mcp")
        .header("Accept", "text/event-stream")
        .header("Mcp-Session-Id", "s")
        .header("Last-Event-ID", "get-0")
        .write();
    let (status, _) = c.read_head();
    assert_eq!(status, 200);
    let got = c.read_until("list_changed");
    assert!(got.contains("last-event-id=get-0"), "{got}");
    // Heartbeats keep arriving: the stream is long-lived, not cut by the upstream timeout.
    let got = c.read_until(": ping");
    assert!(got.contains(": ping"));
    assert_eq!(up.recorded().last().unwrap().method, "GET");
}

#[test]
fn get_without_stream_and_delete_are_relayed() {
    let up = MockServer::start(MockConfig {
        get_stream: false,
        ..MockConfig::default()
    });
    let gw = Gateway::open().upstream("m", &up).start();
    let mut c = gw.client();
    let r = c
        .request("GET", "/mcp")
        .header("Mcp-Session-Id", "s")
        .send();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = c
        .request("DELETE", "/mcp")
        .header("Mcp-Session-Id", "s")
        .send();
    assert_eq!(r.status, 200);
    let rec = up.recorded();
    assert_eq!(rec.last().unwrap().method, "DELETE");
    assert_eq!(rec.last().unwrap().header("mcp-session-id"), Some("s"));
}

#[test]
fn close_delimited_answer_is_reframed_and_the_connection_survives() {
    let (_up, gw) = gateway();
    let mut c = gw.client();
    let r = c
        .post("/mcp", &call(6, "close_delimited", "{}"))
        .header("Mcp-Session-Id", "s")
        .send();
    assert_eq!(r.status, 200);
    assert!(r.chunked, "a close-delimited body is re-framed as chunked");
    assert_eq!(r.json()["result"]["content"][0]["text"], "no length");
    let r = c
        .post("/mcp", &call(7, "echo", "{\"a\":1}"))
        .header("Mcp-Session-Id", "s")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], 7);
}

#[test]
fn large_bodies_both_ways() {
    let (up, gw) = gateway();
    let mut c = gw.client();
    let big_arg = "z".repeat(300_000);
    let body = call(8, "echo", &format!("{{\"blob\":\"{big_arg}\"}}"));
    let r = c.post("/mcp", &body).header("Mcp-Session-Id", "s").send();
    assert_eq!(r.status, 200);
    assert_eq!(up.recorded().last().unwrap().body.len(), body.len());
    let r = c
        .post("/mcp", &call(9, "big", "{\"bytes\":2000000}"))
        .header("Mcp-Session-Id", "s")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .len(),
        2_000_000
    );
}

#[test]
fn sse_mode_upstream_and_pipelined_requests() {
    let up = MockServer::start(MockConfig {
        sse: true,
        ..MockConfig::default()
    });
    let gw = Gateway::open().upstream("m", &up).start();
    let mut c = gw.client();
    // Two requests written back to back before reading: both answered, in order.
    let mut bytes = c.post("/mcp", INIT).bytes();
    bytes.extend(
        c.post("/mcp", &call(2, "echo", "{}"))
            .header("Mcp-Session-Id", "s")
            .bytes(),
    );
    c.send_raw(&bytes);
    let a = c.read_response();
    let b = c.read_response();
    assert!(a.text().contains("\"id\":1"), "{}", a.text());
    assert!(b.text().contains("\"id\":2"), "{}", b.text());
    assert!(a.text().starts_with("event: message\ndata: "));
}

#[test]
fn routes_by_upstream_name() {
    let a = MockServer::start(MockConfig::default());
    let b = MockServer::start(MockConfig::default());
    let gw = Gateway::open()
        .upstream("alpha", &a)
        .upstream("beta", &b)
        .start();
    let mut c = gw.client();
    assert_eq!(c.post("/mcp/alpha", INIT).send().status, 200);
    assert_eq!(c.post("/mcp/beta", INIT).send().status, 200);
    assert_eq!(c.post("/mcp/beta", INIT).send().status, 200);
    assert_eq!(a.recorded().len(), 1);
    assert_eq!(b.recorded().len(), 2);
    let r = c.post("/mcp/gamma", INIT).send();
    assert_eq!(r.status, 404);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("alpha, beta")
    );
    // Several upstreams: /mcp is the aggregate endpoint (tests/aggregate.rs), serving both.
    let r = c.post("/mcp", INIT).send();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"]["serverInfo"]["name"], "scopegate");
    assert_eq!(a.recorded().len(), 2);
    assert_eq!(b.recorded().len(), 3);
    let r = c.request("GET", "/healthz").send();
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = c.request("PUT", "/mcp/alpha").send();
    assert_eq!(r.status, 405);
    assert_eq!(c.request("GET", "/other").send().status, 404);
}

#[test]
fn batches_of_2025_03_26_pass_through() {
    let (up, gw) = gateway();
    let mut c = gw.client();
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":2,"method":"tools/list"}]"#;
    let r = c
        .post("/mcp", batch)
        .header("Mcp-Session-Id", "s")
        .header("MCP-Protocol-Version", "2025-03-26")
        .send();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(up.recorded().last().unwrap().body, batch.as_bytes());
}

#[test]
fn http_1_0_agents_get_a_delimited_answer() {
    let up = MockServer::start(MockConfig {
        sse: true,
        ..MockConfig::default()
    });
    let gw = Gateway::open().upstream("m", &up).start();
    let mut c = gw.client();
    let body = call(1, "echo", "{\"v\":1}");
    c.send_raw(
        format!(
            "POST /mcp HTTP/1.0\r\nHost: 127.0.0.1\r\nMcp-Session-Id: s\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert!(!r.chunked, "HTTP/1.0 cannot take chunked");
    assert!(r.text().contains("\"id\":1"), "{}", r.text());
    assert!(
        r.text().starts_with("event: message"),
        "de-chunked SSE body: {}",
        r.text()
    );
}

#[test]
fn head_requests_get_a_head_and_no_body() {
    let (_up, gw) = gateway();
    let mut c = gw.client();
    c.request("HEAD", "/healthz").write();
    let r = c.read_head_response();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some("3"),
        "the length GET would have"
    );
    // Had a body followed the head, this next response would be misread.
    let r = c.request("GET", "/healthz").send();
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    c.request("HEAD", "/.well-known/oauth-protected-resource")
        .write();
    assert_eq!(c.read_head_response().status, 200);
    assert_eq!(c.request("GET", "/healthz").send().text(), "ok\n");
}

#[test]
fn metrics_count_open_event_streams() {
    let (_up, gw) = gateway();
    let mut stream = gw.client();
    stream
        .request("GET", "/mcp")
        .header("Mcp-Session-Id", "s")
        .write();
    let _ = stream.read_until("list_changed");
    let mut c = gw.client();
    let text = c.request("GET", "/metrics").send().text();
    assert!(text.contains("scopegate_open_sse_streams 1\n"), "{text}");
    drop(stream);
    // The relay notices the departed client at the upstream's next heartbeat (500 ms).
    assert!(eventually(std::time::Duration::from_secs(10), || {
        c.request("GET", "/metrics")
            .send()
            .text()
            .contains("scopegate_open_sse_streams 0\n")
    }));
}

/// IPv6 upstreams: an address literal, and a name (`localhost`) whose addresses are tried in
/// turn until one answers (the mock listens on one family only).
#[test]
fn upstreams_over_ipv6_and_by_name() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback on this machine; skipped");
        return;
    };
    drop(probe);
    let v6 = MockServer::start_on("[::1]:0".parse().unwrap(), MockConfig::default());
    let v4 = MockServer::start(MockConfig::default());
    let gw = Gateway::open()
        .upstream_url("six", &format!("http://[::1]:{}/mcp", v6.addr.port()))
        .upstream_url(
            "byname",
            &format!("http://localhost:{}/mcp", v4.addr.port()),
        )
        .start();
    let mut c = gw.client();
    for path in ["/mcp/six", "/mcp/byname"] {
        let r = c.post(path, INIT).send();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert_eq!(v6.methods(), ["initialize"]);
    assert_eq!(v4.methods(), ["initialize"]);
    assert_eq!(
        v6.recorded()[0].header("host"),
        Some(format!("[::1]:{}", v6.addr.port()).as_str())
    );
}
