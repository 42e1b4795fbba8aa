//! JSON-RPC ids and the error responses that scopegate writes itself.

/// A JSON-RPC id (or progress token) as received.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Id<'a> {
    Str(&'a str),
    Int(i64),
    UInt(u64),
    Float(f64),
}

impl Id<'_> {
    /// Appends the id as JSON.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Id::Str(s) => write_json_string(s, out),
            Id::Int(n) => {
                if *n < 0 {
                    out.push(b'-');
                }
                crate::fmt::push_decimal(out, n.unsigned_abs());
            }
            Id::UInt(n) => crate::fmt::push_decimal(out, *n),
            Id::Float(f) => {
                use std::io::Write as _;
                let _ = write!(out, "{f}");
            }
        }
    }
}

pub const PARSE_ERROR: i32 = -32700;
pub const INVALID_REQUEST: i32 = -32600;
pub const METHOD_NOT_FOUND: i32 = -32601;
pub const INVALID_PARAMS: i32 = -32602;
/// 2026-07-28: a routing header (`Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`) disagrees with the body.
pub const HEADER_MISMATCH: i32 = -32020;
/// 2026-07-28: the requested revision is not served; `data` says which are.
pub const UNSUPPORTED_PROTOCOL_VERSION: i32 = -32022;
/// Implementation-defined server errors (-32000..-32099), scopegate's own:
/// the upstream could not be reached or failed before answering.
pub const UPSTREAM_UNAVAILABLE: i32 = -32001;
/// The upstream did not answer within `SCOPEGATE_UPSTREAM_TIMEOUT_MS`.
pub const UPSTREAM_TIMEOUT: i32 = -32002;
/// The request was refused by scopegate before reaching any upstream (HTTP-level problem).
pub const GATEWAY_REFUSED: i32 = -32003;

/// A tools/call (or other message) refused by the policy.
pub const POLICY_DENIED: i32 = -32004;
/// The agent's session token did not open (with HTTP 404: the agent re-initializes).
pub const SESSION_NOT_FOUND: i32 = -32006;
/// Over a rate limit; `error.data` has `retry_after_ms` and `limit`.
pub const RATE_LIMITED: i32 = -32007;

/// `{"jsonrpc":"2.0","id":..,"error":{"code":-32007,"message":..,"data":{"retry_after_ms":N,"limit":..}}}`
pub fn rate_limited_body(
    id: Option<Id<'_>>,
    message: &str,
    retry_after_ms: u64,
    limit: &str,
) -> Vec<u8> {
    let mut out = error_body(id, RATE_LIMITED, message);
    out.truncate(out.len() - 2);
    out.extend_from_slice(b",\"data\":{\"retry_after_ms\":");
    out.extend_from_slice(retry_after_ms.to_string().as_bytes());
    out.extend_from_slice(b",\"limit\":");
    write_json_string(limit, &mut out);
    out.extend_from_slice(b"}}}");
    out
}

/// The audit log cannot be written and `SCOPEGATE_AUDIT_FAIL_CLOSED=1` (with HTTP 503).
pub const AUDIT_UNAVAILABLE: i32 = -32008;
/// Missing or invalid credentials (with HTTP 401).
pub const UNAUTHENTICATED: i32 = -32005;

/// An error object with `data: {"rule": <rule>}`, for policy refusals.
pub fn denied_body(id: Option<Id<'_>>, code: i32, message: &str, rule: &str) -> Vec<u8> {
    let mut out = error_body(id, code, message);
    // Replace the closing "}}" with the data member.
    out.truncate(out.len() - 2);
    out.extend_from_slice(b",\"data\":{\"rule\":");
    write_json_string(rule, &mut out);
    out.extend_from_slice(b"}}}");
    out
}

/// `{"jsonrpc":"2.0","id":<id|null>,"error":{"code":<code>,"message":<message>}}`
pub fn error_body(id: Option<Id<'_>>, code: i32, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + message.len());
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    match id {
        Some(id) => id.write_json(&mut out),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"error\":{\"code\":");
    out.extend_from_slice(code.to_string().as_bytes());
    out.extend_from_slice(b",\"message\":");
    write_json_string(message, &mut out);
    out.extend_from_slice(b"}}");
    out
}

/// Appends `s` as a JSON string literal.
pub fn write_json_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Most strings (names, ids, methods) need no escaping: copy them whole.
    // A fold without early exit, so the compiler can vectorize the check.
    let needs_escape = bytes.iter().fold(false, |acc, &b| {
        acc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs_escape {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escaped {
            Some(e) => out.extend_from_slice(e),
            None => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_valid_json() {
        let body = error_body(
            Some(Id::Str("a\"b")),
            UPSTREAM_TIMEOUT,
            "took\ttoo long\u{1}",
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], "a\"b");
        assert_eq!(v["error"]["code"], -32002);
        assert_eq!(v["error"]["message"], "took\ttoo long\u{1}");
        let body = error_body(None, PARSE_ERROR, "x");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["id"].is_null());
        let body = error_body(Some(Id::Int(-3)), PARSE_ERROR, "x");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], -3);
        let body = denied_body(Some(Id::Int(4)), POLICY_DENIED, "no", "deny \"x/*\"");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["data"]["rule"], "deny \"x/*\"");
        assert_eq!(v["error"]["message"], "no");
    }
}
