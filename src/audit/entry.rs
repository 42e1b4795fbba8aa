//! Audit entry encoding: one JSON object per line. The request path writes everything but the
//! closing `,"seq":N,"prev":"<hash>"}`, which the worker's writer thread appends when it chains
//! the line: so sequence numbers follow the file's order exactly, with no gaps.

use std::time::SystemTime;

use simd_json::{Node, StaticNode};

use crate::fmt::push_decimal;
use crate::glob::Glob;
use crate::mcp::envelope::{Kind, Message};
use crate::mcp::jsonrpc::write_json_string;

/// What scopegate decided about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decision {
    #[default]
    Allowed,
    Denied,
    RateLimited,
    Invalid,
    UpstreamError,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
            Decision::RateLimited => "rate_limited",
            Decision::Invalid => "invalid",
            Decision::UpstreamError => "upstream_error",
        }
    }
}

/// The fields of one entry. Strings are borrowed; `message` is a fragment made by
/// [`encode_message`] (empty when the request carried no JSON-RPC message).
pub struct Entry<'a> {
    pub time: SystemTime,
    pub worker: usize,
    pub http_method: &'a [u8],
    /// `,"agent":..,"tenant":..,"user":..` as made once per agent by [`identity_fragment`]
    /// (empty when no agent is known).
    pub identity: &'a [u8],
    /// `,"upstream":..` as made once per upstream by [`upstream_fragment`] (or empty).
    pub upstream: &'a [u8],
    /// A short hash of scopegate's session token, never the token.
    pub session: Option<&'a str>,
    pub message: &'a [u8],
    pub decision: Decision,
    /// The rule (denied) or limit (rate_limited) or error text.
    pub reason: Option<&'a str>,
    pub status: u16,
    pub upstream_us: Option<u64>,
    pub total_us: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub is_error: Option<bool>,
    /// The agent's trace context and scopegate's span for the hop.
    pub trace: Option<&'a crate::http::trace::Hop>,
}

/// `,"agent":<id>,"tenant":<t>,"user":<u>` (absent parts left out), made once per agent.
pub fn identity_fragment(agent: &str, tenant: Option<&str>, user: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b",\"agent\":");
    write_json_string(agent, &mut out);
    if let Some(t) = tenant {
        out.extend_from_slice(b",\"tenant\":");
        write_json_string(t, &mut out);
    }
    if let Some(u) = user {
        out.extend_from_slice(b",\"user\":");
        write_json_string(u, &mut out);
    }
    out
}

/// `,"upstream":<name>`, made once per upstream.
pub fn upstream_fragment(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(b",\"upstream\":");
    write_json_string(name, &mut out);
    out
}

/// Appends an event record (`{"ts":..,"worker":N,"audit":"<kind>"` and `fragment`), without
/// its closing brace, to `out`.
pub fn encode_event(
    time: SystemTime,
    worker: usize,
    kind: &str,
    fragment: &[u8],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"{\"ts\":\"");
    write_timestamp(time, out);
    out.extend_from_slice(b"\",\"worker\":");
    push_decimal(out, worker as u64);
    out.extend_from_slice(b",\"audit\":");
    write_json_string(kind, out);
    out.extend_from_slice(fragment);
}

/// A tool-integrity event: what scopegate saw of an upstream's tool or prompt, and what it did.
pub struct IntegrityEvent<'a> {
    /// `changed`, `unpinned` or `findings`.
    pub event: &'a str,
    /// `blocked`, `warned`, `hidden` or `allowed`.
    pub action: &'a str,
    pub upstream: &'a str,
    /// `tool` or `prompt`.
    pub kind: &'a str,
    pub name: &'a str,
    /// The pinned digest (`sha256:<hex>`), for a change.
    pub pinned: Option<&'a str>,
    /// The digest of the definition seen.
    pub seen: &'a str,
    pub findings: &'a [crate::integrity::scan::Finding],
}

/// The fields of an integrity event record (after `"audit":"integrity"`, see [`encode_event`]).
pub fn integrity_fragment(e: &IntegrityEvent<'_>, out: &mut Vec<u8>) {
    for (key, value) in [
        ("event", e.event),
        ("action", e.action),
        ("upstream", e.upstream),
        ("kind", e.kind),
        ("name", e.name),
    ] {
        out.push(b',');
        write_json_string(key, out);
        out.push(b':');
        write_json_string(value, out);
    }
    if let Some(pinned) = e.pinned {
        out.extend_from_slice(b",\"pinned\":");
        write_json_string(pinned, out);
    }
    out.extend_from_slice(b",\"seen\":");
    write_json_string(e.seen, out);
    if !e.findings.is_empty() {
        out.extend_from_slice(b",\"findings\":[");
        for (n, f) in e.findings.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"check\":");
            write_json_string(f.check, out);
            out.extend_from_slice(b",\"at\":");
            write_json_string(&f.at, out);
            out.extend_from_slice(b",\"detail\":");
            write_json_string(&f.detail, out);
            out.push(b'}');
        }
        out.push(b']');
    }
}

/// Appends the entry, without its closing brace, to `out`.
pub fn encode(e: &Entry<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"ts\":\"");
    write_timestamp(e.time, out);
    out.extend_from_slice(b"\",\"worker\":");
    push_decimal(out, e.worker as u64);
    match e.http_method {
        b"POST" => out.extend_from_slice(b",\"http\":\"POST\""),
        b"GET" => out.extend_from_slice(b",\"http\":\"GET\""),
        b"DELETE" => out.extend_from_slice(b",\"http\":\"DELETE\""),
        other => {
            out.extend_from_slice(b",\"http\":");
            write_json_string(&String::from_utf8_lossy(other), out);
        }
    }
    // Identity and upstream were encoded once, when the policy loaded: copied, not re-escaped.
    out.extend_from_slice(e.identity);
    out.extend_from_slice(e.upstream);
    if let Some(session) = e.session {
        out.extend_from_slice(b",\"session\":");
        write_json_string(session, out);
    }
    if let Some(t) = e.trace {
        out.extend_from_slice(b",\"trace_id\":\"");
        out.extend_from_slice(&t.trace_id);
        out.extend_from_slice(b"\",\"span_id\":\"");
        out.extend_from_slice(&t.span_id);
        out.extend_from_slice(b"\",\"parent_span_id\":\"");
        out.extend_from_slice(&t.parent_id);
        out.push(b'"');
    }
    if !e.message.is_empty() {
        out.push(b',');
        out.extend_from_slice(e.message);
    }
    out.extend_from_slice(b",\"decision\":\"");
    out.extend_from_slice(e.decision.as_str().as_bytes());
    out.push(b'"');
    if let Some(r) = e.reason {
        out.extend_from_slice(b",\"reason\":");
        write_json_string(r, out);
    }
    out.extend_from_slice(b",\"status\":");
    push_decimal(out, u64::from(e.status));
    if let Some(us) = e.upstream_us {
        out.extend_from_slice(b",\"upstream_us\":");
        push_decimal(out, us);
    }
    out.extend_from_slice(b",\"total_us\":");
    push_decimal(out, e.total_us);
    out.extend_from_slice(b",\"bytes_in\":");
    push_decimal(out, e.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    push_decimal(out, e.bytes_out);
    if let Some(is_error) = e.is_error {
        out.extend_from_slice(if is_error {
            b",\"is_error\":true"
        } else {
            b",\"is_error\":false"
        });
    }
}

/// RFC 3339 with microseconds, UTC. The `YYYY-MM-DDTHH:MM:SS.` part changes once a second, so
/// each thread keeps it formatted and only the microseconds are written per entry.
fn write_timestamp(t: SystemTime, out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static PREFIX: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    PREFIX.with(|p| {
        let mut p = p.borrow_mut();
        if p.0 != secs {
            let mut s = String::with_capacity(32);
            crate::log::rfc3339_micros(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
                &mut s,
            );
            // Keep through the '.', drop "000000Z".
            p.1.clear();
            p.1.extend_from_slice(&s.as_bytes()[..s.len() - 7]);
            p.0 = secs;
        }
        out.extend_from_slice(&p.1);
    });
    let mut micros = d.subsec_micros();
    let mut digits = [b'0'; 6];
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// Appends `"kind":..,"method":..,"id":..,"name":..,"args":..` for one message. Arguments whose
/// names match a `redact` glob (at any depth) are written as `"[redacted]"`; arguments longer
/// than `max_args` bytes are cut to a string prefix and marked `"args_truncated":true`.
pub fn encode_message(
    m: &Message<'_>,
    args: Option<&[Node<'_>]>,
    redact: &[Glob],
    max_args: usize,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"\"kind\":\"");
    out.extend_from_slice(match m.kind {
        Kind::Request => b"request".as_slice(),
        Kind::Notification => b"notification",
        Kind::Response => b"response",
    });
    out.push(b'"');
    if let Some(method) = m.method {
        out.extend_from_slice(b",\"method\":");
        write_json_string(method, out);
    }
    if let Some(id) = m.id {
        out.extend_from_slice(b",\"id\":");
        id.write_json(out);
    }
    if let Some(name) = m.name {
        out.extend_from_slice(b",\"name\":");
        write_json_string(name, out);
    }
    if let Some(uri) = m.uri {
        out.extend_from_slice(b",\"uri\":");
        write_json_string(uri, out);
    }
    if let Some(nodes) = args {
        scratch.clear();
        write_value(nodes, redact, scratch);
        out.extend_from_slice(b",\"args\":");
        if scratch.len() <= max_args {
            out.extend_from_slice(scratch);
        } else {
            let mut cut = max_args;
            // Cut on a character boundary of the UTF-8 text.
            while cut > 0 && (scratch[cut] & 0xC0) == 0x80 {
                cut -= 1;
            }
            write_json_string(&String::from_utf8_lossy(&scratch[..cut]), out);
            out.extend_from_slice(b",\"args_truncated\":true,\"args_bytes\":");
            push_decimal(out, scratch.len() as u64);
        }
    }
}

/// Whether an argument named `key` is redacted (globs match ignoring ASCII case).
fn redacts(redact: &[Glob], key: &str) -> bool {
    redact.iter().any(|g| g.matches_ignore_case(key))
}

/// How deep JSON held in strings (held in strings ...) is looked into.
const MAX_EMBEDDED_DEPTH: usize = 3;
/// Strings longer than this are not parsed for embedded JSON (the entry cuts arguments at
/// `SCOPEGATE_AUDIT_MAX_ARGS` anyway; a huge string is not parsed to be cut).
const MAX_EMBEDDED_BYTES: usize = 64 * 1024;

/// `s` with its redacted fields replaced, when `s` is JSON text that has any; `None` when it is
/// not JSON or holds nothing to redact (then it is written as it is).
fn redact_embedded(s: &str, redact: &[Glob], depth: usize) -> Option<String> {
    if redact.is_empty() || depth >= MAX_EMBEDDED_DEPTH || s.len() > MAX_EMBEDDED_BYTES {
        return None;
    }
    // An object, an array, or a JSON string that holds one (JSON encoded twice).
    let trimmed = s.trim_start();
    if !(trimmed.starts_with('{') || trimmed.starts_with('[') || trimmed.starts_with('"')) {
        return None;
    }
    let mut value: serde_json::Value = serde_json::from_str(s).ok()?;
    redact_tree(&mut value, redact, depth).then(|| value.to_string())
}

/// Redacts inside a parsed value; true when anything changed.
fn redact_tree(value: &mut serde_json::Value, redact: &[Glob], depth: usize) -> bool {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut changed = false;
            for (k, v) in map.iter_mut() {
                if redacts(redact, k) {
                    *v = Value::String("[redacted]".into());
                    changed = true;
                } else {
                    changed |= redact_tree(v, redact, depth);
                }
            }
            changed
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |c, v| redact_tree(v, redact, depth) | c),
        Value::String(s) => match redact_embedded(s, redact, depth + 1) {
            Some(r) => {
                *s = r;
                true
            }
            None => false,
        },
        _ => false,
    }
}

/// Re-serializes the value at `nodes[0]`; returns how many nodes it spans.
fn write_value(nodes: &[Node<'_>], redact: &[Glob], out: &mut Vec<u8>) -> usize {
    match nodes.first() {
        None => {
            out.extend_from_slice(b"null");
            0
        }
        Some(Node::String(s)) => {
            // A string holding JSON (`"{\"password\": ..}"`) is parsed by many servers: a
            // secret inside it is redacted as if it were a field of its own.
            match (!redact.is_empty())
                .then(|| redact_embedded(s, redact, 0))
                .flatten()
            {
                Some(redacted) => write_json_string(&redacted, out),
                None => write_json_string(s, out),
            }
            1
        }
        Some(Node::Static(v)) => {
            match v {
                StaticNode::Null => out.extend_from_slice(b"null"),
                StaticNode::Bool(true) => out.extend_from_slice(b"true"),
                StaticNode::Bool(false) => out.extend_from_slice(b"false"),
                StaticNode::I64(n) if *n >= 0 => push_decimal(out, *n as u64),
                StaticNode::I64(n) => {
                    out.push(b'-');
                    push_decimal(out, n.unsigned_abs());
                }
                StaticNode::U64(n) => push_decimal(out, *n),
                StaticNode::F64(f) => out.extend_from_slice(f.to_string().as_bytes()),
            }
            1
        }
        Some(Node::Array { len, count }) => {
            out.push(b'[');
            let mut i = 1;
            for k in 0..*len {
                if k > 0 {
                    out.push(b',');
                }
                i += write_value(&nodes[i..], redact, out);
            }
            out.push(b']');
            count + 1
        }
        Some(Node::Object { len, count }) => {
            out.push(b'{');
            let mut i = 1;
            for k in 0..*len {
                if k > 0 {
                    out.push(b',');
                }
                let key = match nodes.get(i) {
                    Some(Node::String(key)) => *key,
                    _ => "",
                };
                write_json_string(key, out);
                out.push(b':');
                i += 1;
                if redacts(redact, key) {
                    out.extend_from_slice(b"\"[redacted]\"");
                    i += crate::mcp::tape::node_span(&nodes[i]);
                } else {
                    i += write_value(&nodes[i..], redact, out);
                }
            }
            out.push(b'}');
            count + 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::envelope::EnvelopeParser;

    fn glob(p: &str) -> Glob {
        Glob::new(p, |b| b.is_ascii_graphic()).unwrap()
    }

    fn fragment(body: &str, redact: &[Glob], max: usize) -> String {
        let mut p = EnvelopeParser::new();
        let env = p.parse(body.as_bytes()).unwrap();
        let m = env.single().unwrap();
        let mut out = Vec::new();
        encode_message(m, env.arguments(m), redact, max, &mut Vec::new(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn secrets_inside_json_strings_and_in_any_case_are_redacted() {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"configure","arguments":{"settings":"{\"host\":\"db\",\"Password\":\"hunter2\",\"nested\":\"{\\\"token\\\":\\\"t0k\\\"}\"}","Token":"abc","note":"{not json","list":"[{\"PASSWORD\":\"x\"}]"}}}"#;
        let out = fragment(body, &[glob("token"), glob("*password*")], 4096);
        assert!(!out.contains("hunter2"), "{out}");
        assert!(!out.contains("t0k"), "{out}");
        assert!(!out.contains("abc"), "{out}");
        assert!(!out.contains("\\\"x\\\""), "{out}");
        let v: serde_json::Value = serde_json::from_str(&format!("{{{out}}}")).unwrap();
        let settings: serde_json::Value =
            serde_json::from_str(v["args"]["settings"].as_str().unwrap()).unwrap();
        assert_eq!(settings["Password"], "[redacted]");
        assert_eq!(settings["host"], "db");
        assert_eq!(v["args"]["Token"], "[redacted]");
        assert_eq!(v["args"]["note"], "{not json");
        // JSON encoded twice: a string whose text is a JSON string holding an object.
        let twice = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"c","arguments":{"cfg":"\"{\\\"password\\\":\\\"hunter3\\\"}\""}}}"#;
        let out = fragment(twice, &[glob("*password*")], 4096);
        assert!(!out.contains("hunter3"), "{out}");
    }

    #[test]
    fn messages_with_redaction_at_any_depth() {
        let f = fragment(
            r#"{"jsonrpc":"2.0","id":"q-1","method":"tools/call","params":{"name":"login","arguments":{"user":"al\"ice","token":"s3cret","nested":{"db_password":"x","n":[1,2.5,true,null]}}}}"#,
            &[glob("token"), glob("*password*")],
            4096,
        );
        let v: serde_json::Value = serde_json::from_str(&format!("{{{f}}}")).unwrap();
        assert_eq!(v["method"], "tools/call");
        assert_eq!(v["id"], "q-1");
        assert_eq!(v["name"], "login");
        assert_eq!(v["args"]["user"], "al\"ice");
        assert_eq!(v["args"]["token"], "[redacted]");
        assert_eq!(v["args"]["nested"]["db_password"], "[redacted]");
        assert_eq!(
            v["args"]["nested"]["n"],
            serde_json::json!([1, 2.5, true, null])
        );
        assert!(!f.contains("s3cret"));
    }

    #[test]
    fn long_arguments_are_truncated_and_marked() {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"w","arguments":{{"text":"{}é"}}}}}}"#,
            "a".repeat(200)
        );
        let f = fragment(&body, &[], 64);
        let v: serde_json::Value = serde_json::from_str(&format!("{{{f}}}")).unwrap();
        assert_eq!(v["args_truncated"], true);
        assert!(v["args_bytes"].as_u64().unwrap() > 200);
        assert!(v["args"].as_str().unwrap().len() <= 64);
    }

    #[test]
    fn entries_are_json_once_closed() {
        let frag = fragment(r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#, &[], 100);
        let e = Entry {
            time: SystemTime::UNIX_EPOCH,
            worker: 1,
            http_method: b"POST",
            identity: &identity_fragment("bot", None, Some("u@x")),
            upstream: &upstream_fragment("m"),
            session: Some("abcd"),
            message: frag.as_bytes(),
            decision: Decision::Denied,
            reason: Some("deny \"m/x\""),
            status: 200,
            upstream_us: None,
            total_us: 17,
            bytes_in: 10,
            bytes_out: 20,
            is_error: Some(false),
            trace: None,
        };
        let mut out = Vec::new();
        encode(&e, &mut out);
        out.push(b'}');
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000000Z");
        let mut ts = Vec::new();
        write_timestamp(
            SystemTime::UNIX_EPOCH + std::time::Duration::new(1_795_478_400, 123_456_000),
            &mut ts,
        );
        assert_eq!(ts, b"2026-11-24T00:00:00.123456Z");
        ts.clear();
        write_timestamp(
            SystemTime::UNIX_EPOCH + std::time::Duration::new(1_795_478_401, 7_000),
            &mut ts,
        );
        assert_eq!(ts, b"2026-11-24T00:00:01.000007Z");
        assert_eq!(v["worker"], 1);
        assert_eq!(v["decision"], "denied");
        assert_eq!(v["reason"], "deny \"m/x\"");
        assert_eq!(v["method"], "ping");
        assert!(v.get("tenant").is_none());
        assert_eq!(v["agent"], "bot");
        assert_eq!(v["user"], "u@x");
        assert_eq!(v["upstream"], "m");
        assert_eq!(v["http"], "POST");
    }
}
