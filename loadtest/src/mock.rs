//! A small, fast MCP Streamable HTTP server for tests and load runs.
//!
//! It speaks enough MCP for a gateway to be exercised end to end: `initialize` (with a session
//! id), `tools/list`, `tools/call`, `ping`, notifications and responses (202), a GET event
//! stream, DELETE. Its tools are test instruments:
//!
//! | tool              | answer |
//! |-------------------|--------|
//! | `echo`            | the arguments back as text (JSON, or SSE when `sse` is set) |
//! | `slow_events`     | SSE: `count` progress events `delay_ms` apart, then the result |
//! | `sse_raw`         | SSE with `id:`, `retry:`, `event:`, comments and an empty-data event |
//! | `status`          | HTTP status `code` with body `body` and extra response `headers` |
//! | `close_delimited` | JSON with neither length nor chunking, then close |
//! | `sleep`           | the result after `ms` milliseconds |
//! | `big`             | a text result of `bytes` bytes |
//!
//! A batch's `tools/list` is answered with the list; a GET with `Last-Event-ID` first replays a
//! `tools/list` answer, as a resuming server would.
//!
//! Every request it receives is recorded (method, path, headers, body) so tests can assert what
//! reached the upstream and what did not. HTTP/1.1 is parsed here with `httparse`
//! independently of scopegate's own framing, so the two check each other.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Answer requests with `text/event-stream` instead of `application/json`.
    pub sse: bool,
    /// GET opens an event stream (otherwise 405).
    pub get_stream: bool,
    /// Issue `Mcp-Session-Id` on initialize and require it afterwards.
    pub sessions: bool,
    /// Record requests (off for load runs).
    pub record: bool,
    /// Padding added to `echo` results, in bytes.
    pub pad: usize,
    /// Threads (each its own runtime and SO_REUSEPORT listener).
    pub threads: usize,
    /// tools/list pages of this many tools, with `nextCursor` (0: one page).
    pub page_size: usize,
    /// One more tool under this name, answering like `echo` (e.g. a name of 128 characters).
    pub extra_tool: Option<String>,
    /// `echo` answers after this long (a slow tool).
    pub delay: Duration,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            sse: false,
            get_stream: true,
            sessions: true,
            record: true,
            pad: 0,
            threads: 1,
            page_size: 0,
            extra_tool: None,
            delay: Duration::ZERO,
        }
    }
}

/// A request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

struct Shared {
    config: MockConfig,
    recorded: Mutex<Vec<Recorded>>,
    sessions: AtomicU64,
    /// Sessions numbered below this have expired (404), as a server that restarted or timed
    /// them out would say.
    expired_below: AtomicU64,
    stopped: AtomicBool,
    /// Connections accepted so far.
    accepted: AtomicU64,
}

/// A running mock; it serves until the process ends or [`MockServer::stop`].
pub struct MockServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl MockServer {
    /// Starts on 127.0.0.1 and a free port.
    pub fn start(config: MockConfig) -> MockServer {
        Self::start_on("127.0.0.1:0".parse().expect("literal address"), config)
    }

    pub fn start_on(addr: SocketAddr, config: MockConfig) -> MockServer {
        let threads = config.threads.max(1);
        let shared = Arc::new(Shared {
            config,
            recorded: Mutex::new(Vec::new()),
            sessions: AtomicU64::new(0),
            expired_below: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
        });
        // SO_REUSEPORT listeners, one per thread, the way scopegate binds its own.
        let listeners = scopegate::runtime::bind_listeners(addr, threads).expect("mock: bind");
        let bound = listeners[0].local_addr().expect("mock: local_addr");
        for l in listeners {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build()
                    .expect("mock: runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(l).expect("mock: listener");
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        shared.accepted.fetch_add(1, Ordering::Relaxed);
                        if shared.stopped.load(Ordering::Relaxed) {
                            drop(stream);
                            continue;
                        }
                        let _ = stream.set_nodelay(true);
                        monoio::spawn(serve(stream, shared.clone()));
                    }
                });
            });
        }
        MockServer {
            addr: bound,
            shared,
        }
    }

    /// `http://127.0.0.1:PORT/mcp`
    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.shared
            .recorded
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Recorded POST bodies' `method`s, in order.
    pub fn methods(&self) -> Vec<String> {
        self.recorded()
            .iter()
            .filter_map(|r| r.json())
            .filter_map(|v| v["method"].as_str().map(str::to_owned))
            .collect()
    }

    /// Every session issued so far expires: requests on them get 404.
    pub fn expire_sessions(&self) {
        let issued = self.shared.sessions.load(Ordering::Relaxed);
        self.shared.expired_below.store(issued, Ordering::Relaxed);
    }

    /// How many connections it has accepted.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// From now on, accepted connections are closed at once (an upstream that went away).
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
    }
}

const MAX_HEAD: usize = 64 * 1024;

async fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        // Head.
        let (head_len, method, path, headers, content_length) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut fields);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, String)> = req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    let cl = headers
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    break (
                        n,
                        req.method.unwrap_or("").to_owned(),
                        req.path.unwrap_or("").to_owned(),
                        headers,
                        cl,
                    );
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                _ => return,
            }
            if !read_more(&mut stream, &mut buf).await {
                return;
            }
        };
        while buf.len() < head_len + content_length {
            if !read_more(&mut stream, &mut buf).await {
                return;
            }
        }
        let _ = buf.split_to(head_len);
        let body = buf.split_to(content_length).to_vec();
        if shared.config.record
            && let Ok(mut r) = shared.recorded.lock()
        {
            r.push(Recorded {
                method: method.clone(),
                path: path.clone(),
                headers: headers.clone(),
                body: body.clone(),
            });
        }
        let keep = match method.as_str() {
            "POST" => handle_post(&mut stream, &shared, &headers, &body).await,
            "GET" => handle_get(&mut stream, &shared, &headers).await,
            "DELETE" => {
                if shared.config.sessions {
                    write(&mut stream, response(200, "application/json", "", b"")).await
                } else {
                    write(&mut stream, response(405, "text/plain", "", b"no sessions")).await
                }
            }
            _ => write(&mut stream, response(405, "text/plain", "", b"method")).await,
        };
        if !keep {
            return;
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut) -> bool {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let len = buf.len();
    let owned = std::mem::take(buf);
    let (res, slice) = stream.read(owned.slice_mut(len..)).await;
    *buf = slice.into_inner();
    matches!(res, Ok(n) if n > 0)
}

async fn write(stream: &mut TcpStream, data: Vec<u8>) -> bool {
    stream.write_all(data).await.0.is_ok()
}

fn response(status: u16, content_type: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn sse_head(extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

fn event(message: &Value) -> Vec<u8> {
    format!("event: message\ndata: {message}\n\n").into_bytes()
}

async fn handle_post(
    stream: &mut TcpStream,
    shared: &Shared,
    headers: &[(String, String)],
    body: &[u8],
) -> bool {
    let Ok(msg) = serde_json::from_slice::<Value>(body) else {
        let err = json!({"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"mock: parse error"}});
        return write(
            stream,
            response(400, "application/json", "", err.to_string().as_bytes()),
        )
        .await;
    };
    if let Value::Array(items) = &msg {
        let answers: Vec<Value> = items
            .iter()
            .filter(|m| m.get("method").is_some() && m.get("id").is_some())
            .map(|m| match m["method"].as_str() {
                Some("tools/list") => json!({"jsonrpc":"2.0","id":m["id"],"result":tools_list()}),
                _ => json!({"jsonrpc":"2.0","id":m["id"],"result":{"batched":m["method"]}}),
            })
            .collect();
        if answers.is_empty() {
            return write(stream, response(202, "application/json", "", b"")).await;
        }
        return write(
            stream,
            response(
                200,
                "application/json",
                "",
                Value::Array(answers).to_string().as_bytes(),
            ),
        )
        .await;
    }
    let id = msg.get("id").cloned();
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    let Some(id) = id.filter(|_| !method.is_empty()) else {
        // Notification or response.
        return write(stream, response(202, "application/json", "", b"")).await;
    };
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    if shared.config.sessions && method != "initialize" && header("mcp-session-id").is_none() {
        let err = json!({"jsonrpc":"2.0","id":id,"error":{"code":-32000,"message":"Bad Request: missing session id"}});
        return write(
            stream,
            response(400, "application/json", "", err.to_string().as_bytes()),
        )
        .await;
    }
    let expired = header("mcp-session-id")
        .and_then(|s| s.strip_prefix("mock-session-"))
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n < shared.expired_below.load(Ordering::Relaxed));
    if shared.config.sessions && method != "initialize" && expired {
        let err =
            json!({"jsonrpc":"2.0","id":id,"error":{"code":-32001,"message":"Session not found"}});
        return write(
            stream,
            response(404, "application/json", "", err.to_string().as_bytes()),
        )
        .await;
    }
    let reply = |result: Value| json!({"jsonrpc":"2.0","id":id,"result":result});
    match method {
        "initialize" => {
            let version = msg["params"]["protocolVersion"]
                .as_str()
                .unwrap_or("2025-06-18")
                .to_owned();
            let result = reply(json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": true}, "logging": {},
                    "tasks": {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}},
                "serverInfo": {"name": "sg-mock", "version": "0.1.0"}
            }));
            let extra = if shared.config.sessions {
                let n = shared.sessions.fetch_add(1, Ordering::Relaxed);
                format!("Mcp-Session-Id: mock-session-{n}\r\n")
            } else {
                String::new()
            };
            answer(stream, shared, &result, &extra).await
        }
        "ping" => answer(stream, shared, &reply(json!({})), "").await,
        "tools/list" => {
            let mut list = tools_list();
            if let (Some(extra), Some(Value::Array(tools))) =
                (&shared.config.extra_tool, list.get_mut("tools"))
            {
                tools.push(json!({"name": extra, "description": "like echo", "inputSchema": {"type": "object"}}));
            }
            let size = shared.config.page_size;
            if size > 0 {
                let start: usize = msg["params"]["cursor"]
                    .as_str()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let all = list["tools"].as_array().cloned().unwrap_or_default();
                let end = (start + size).min(all.len());
                list["tools"] = Value::Array(all[start.min(end)..end].to_vec());
                if end < all.len() {
                    list["nextCursor"] = Value::String(end.to_string());
                }
            }
            answer(stream, shared, &reply(list), "").await
        }
        "tools/call" => call_tool(stream, shared, &msg, &id).await,
        // Five finished tasks, paged like tools/list; tasks/get answers for any id.
        "tasks/list" => {
            let size = match shared.config.page_size {
                0 => 5,
                n => n,
            };
            let start: usize = msg["params"]["cursor"]
                .as_str()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let end = (start + size).min(5);
            let tasks: Vec<Value> = (start.min(end)..end)
                .map(|n| json!({"taskId": format!("t{n}"), "status": "completed"}))
                .collect();
            let mut result = json!({ "tasks": tasks });
            if end < 5 {
                result["nextCursor"] = Value::String(end.to_string());
            }
            answer(stream, shared, &reply(result), "").await
        }
        "tasks/get" => {
            let task = json!({"taskId": msg["params"]["taskId"], "status": "completed"});
            answer(stream, shared, &reply(task), "").await
        }
        _ => {
            let err = json!({"jsonrpc":"2.0","id":id,"error":{"code":-32601,"message":format!("mock: no method {method}")}});
            answer(stream, shared, &err, "").await
        }
    }
}

/// One response: JSON, or a one-event SSE stream when the mock is in SSE mode.
async fn answer(stream: &mut TcpStream, shared: &Shared, message: &Value, extra: &str) -> bool {
    if shared.config.sse {
        let mut out = sse_head(extra);
        out.extend(chunk(&event(message)));
        out.extend_from_slice(b"0\r\n\r\n");
        write(stream, out).await
    } else {
        write(
            stream,
            response(
                200,
                "application/json",
                extra,
                message.to_string().as_bytes(),
            ),
        )
        .await
    }
}

fn tools_list() -> Value {
    let tool = |name: &str, description: &str| json!({"name": name, "description": description, "inputSchema": {"type": "object"}});
    json!({"tools": [
        tool("echo", "returns its arguments"),
        tool("slow_events", "SSE: count progress events delay_ms apart"),
        tool("sse_raw", "SSE with ids, retry, comments and empty data"),
        tool("status", "answers with HTTP status code"),
        tool("close_delimited", "JSON without length or chunking"),
        tool("sleep", "answers after ms milliseconds"),
        tool("big", "a result of bytes bytes"),
        tool("ask", "SSE: asks the client to sample (server request id 0), answers with its reply"),
    ]})
}

async fn call_tool(stream: &mut TcpStream, shared: &Shared, msg: &Value, id: &Value) -> bool {
    let name = msg["params"]["name"].as_str().unwrap_or("");
    let args = &msg["params"]["arguments"];
    let text_result = |text: String| json!({"jsonrpc":"2.0","id":id,"result":{"content":[{"type":"text","text":text}],"isError":false}});
    let name = if shared.config.extra_tool.as_deref() == Some(name) {
        "echo"
    } else {
        name
    };
    match name {
        "echo" => {
            if !shared.config.delay.is_zero() {
                monoio::time::sleep(shared.config.delay).await;
            }
            let mut text = args.to_string();
            text.extend(std::iter::repeat_n('x', shared.config.pad));
            answer(stream, shared, &text_result(text), "").await
        }
        "big" => {
            let n = args["bytes"].as_u64().unwrap_or(1024) as usize;
            answer(stream, shared, &text_result("y".repeat(n)), "").await
        }
        "sleep" => {
            let ms = args["ms"].as_u64().unwrap_or(100);
            monoio::time::sleep(Duration::from_millis(ms)).await;
            answer(stream, shared, &text_result(format!("slept {ms}")), "").await
        }
        "status" => {
            let code = args["code"].as_u64().unwrap_or(500) as u16;
            let body = args["body"].as_str().unwrap_or("");
            let mut extra = String::new();
            if let Some(headers) = args["headers"].as_object() {
                for (name, value) in headers {
                    extra.push_str(&format!("{name}: {}\r\n", value.as_str().unwrap_or("")));
                }
            }
            write(
                stream,
                response(code, "application/json", &extra, body.as_bytes()),
            )
            .await
        }
        "close_delimited" => {
            let body = text_result("no length".into()).to_string();
            let mut out =
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
                    .to_vec();
            out.extend_from_slice(body.as_bytes());
            let _ = write(stream, out).await;
            false
        }
        "slow_events" => {
            let count = args["count"].as_u64().unwrap_or(2);
            let delay = Duration::from_millis(args["delay_ms"].as_u64().unwrap_or(500));
            let token = msg["params"]["_meta"]["progressToken"].clone();
            if !write(stream, sse_head("")).await {
                return false;
            }
            for i in 0..count {
                let note = json!({"jsonrpc":"2.0","method":"notifications/progress",
                    "params":{"progressToken":token,"progress":i+1,"total":count}});
                if !write(stream, chunk(&event(&note))).await {
                    return false;
                }
                monoio::time::sleep(delay).await;
            }
            let mut out = chunk(&event(&text_result(format!("{count} events"))));
            out.extend_from_slice(b"0\r\n\r\n");
            write(stream, out).await
        }
        "ask" => {
            // A server-to-client request on the call's stream, then the client's answer (which
            // arrives as another POST) in the result.
            if !write(stream, sse_head("")).await {
                return false;
            }
            let seen = shared.recorded.lock().map_or(0, |r| r.len());
            let request = json!({"jsonrpc":"2.0","id":0,"method":"sampling/createMessage",
                "params":{"messages":[{"role":"user","content":{"type":"text","text":"hello?"}}],"maxTokens":10}});
            if !write(stream, chunk(&event(&request))).await {
                return false;
            }
            let mut answer_text = String::from("no answer");
            for _ in 0..1000 {
                let found = shared.recorded.lock().ok().and_then(|r| {
                    r[seen.min(r.len())..].iter().find_map(|rec| {
                        let v: Value = serde_json::from_slice(&rec.body).ok()?;
                        (v["id"] == json!(0) && v.get("result").is_some())
                            .then(|| v["result"].to_string())
                    })
                });
                if let Some(text) = found {
                    answer_text = text;
                    break;
                }
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut out = chunk(&event(&text_result(answer_text)));
            out.extend_from_slice(b"0\r\n\r\n");
            write(stream, out).await
        }
        "sse_raw" => {
            let mut out = sse_head("");
            out.extend(chunk(b": a comment\n\n"));
            out.extend(chunk(b"id: ev-1\nretry: 1500\ndata:\n\n"));
            out.extend(chunk(b"id: ev-2\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"level\":\"info\",\"data\":\"hi\"}}\n\n"));
            out.extend(chunk(&event(&text_result("raw done".into()))));
            out.extend_from_slice(b"0\r\n\r\n");
            write(stream, out).await
        }
        _ => {
            let err = json!({"jsonrpc":"2.0","id":id,"error":{"code":-32602,"message":format!("mock: unknown tool {name}")}});
            answer(stream, shared, &err, "").await
        }
    }
}

async fn handle_get(stream: &mut TcpStream, shared: &Shared, headers: &[(String, String)]) -> bool {
    if !shared.config.get_stream {
        return write(
            stream,
            response(405, "text/plain", "Allow: POST\r\n", b"no GET stream"),
        )
        .await;
    }
    let expired = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("mcp-session-id"))
        .and_then(|(_, s)| s.strip_prefix("mock-session-"))
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n < shared.expired_below.load(Ordering::Relaxed));
    if shared.config.sessions && expired {
        let err = json!({"jsonrpc":"2.0","error":{"code":-32001,"message":"Session not found"}});
        return write(
            stream,
            response(404, "application/json", "", err.to_string().as_bytes()),
        )
        .await;
    }
    let last = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("last-event-id"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut out = sse_head("");
    out.extend(chunk(
        format!(": stream open, last-event-id={last}\n\n").as_bytes(),
    ));
    if !last.is_empty() {
        // Resumption: replay what the stream carried after that event, here the answer to an
        // earlier tools/list (whatever a gateway filtered from it the first time).
        let replay = json!({"jsonrpc":"2.0","id":"replayed","result":tools_list()});
        out.extend(chunk(
            format!("id: replay-1\nevent: message\ndata: {replay}\n\n").as_bytes(),
        ));
    }
    let note = json!({"jsonrpc":"2.0","method":"notifications/tools/list_changed"});
    out.extend(chunk(
        format!("id: get-1\nevent: message\ndata: {note}\n\n").as_bytes(),
    ));
    if !write(stream, out).await {
        return false;
    }
    // Hold the stream open, with a heartbeat comment so a departed client is noticed.
    loop {
        monoio::time::sleep(Duration::from_millis(500)).await;
        if !write(stream, chunk(b": ping\n\n")).await {
            return false;
        }
    }
}
