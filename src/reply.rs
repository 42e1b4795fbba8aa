//! What scopegate answers itself, on every endpoint: one type for refusals (authentication,
//! policy, limits, malformed requests, upstream failures) and for its own results (health,
//! metrics, the aggregate endpoint's merged answers). A reply knows its HTTP status, its body,
//! its extra headers, whether the connection closes after it, and what the audit log records;
//! it becomes bytes in one place ([`Reply::render`]).

use crate::audit::entry::Decision;
use crate::http::response;
use crate::mcp::jsonrpc::{self, Id};

/// An answer scopegate writes itself.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Body,
    /// Extra header lines, each ending in CRLF.
    pub headers: String,
    /// Close the connection after answering (the rest of the stream cannot be trusted).
    pub close: bool,
    /// What the audit log records.
    pub decision: Decision,
    /// Why, in the audit log: the rule, the limit, the error. Defaults to an error's message.
    pub reason: Option<String>,
    /// The upstream the message concerned, when one did (the aggregate endpoint's calls).
    pub upstream: Option<usize>,
}

/// What a reply carries.
#[derive(Debug, Clone)]
pub enum Body {
    /// A JSON-RPC error answering the request (its id filled in when written, unless known).
    Error(Box<JsonRpcError>),
    /// A JSON document, as it is.
    Json(Vec<u8>),
    /// Plain text or any other type.
    Other {
        content_type: &'static str,
        bytes: Vec<u8>,
    },
    /// No body (202, or a HEAD).
    Empty,
}

/// A JSON-RPC error scopegate writes.
#[derive(Debug, Clone)]
pub struct JsonRpcError {
    pub code: i32,
    pub message: String,
    pub data: ErrorData,
    /// The id as JSON, when it was known where the reply was made.
    pub id: Option<Vec<u8>>,
}

/// `error.data` of a JSON-RPC error scopegate writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorData {
    None,
    /// `{"rule": ..}`: the policy rule that refused.
    Rule(String),
    /// `{"retry_after_ms": .., "limit": ..}`.
    RateLimit {
        retry_after_ms: u64,
        limit: String,
    },
    /// `{"supported": [..], "requested": ..}` (2026-07-28's unsupported-version error).
    Versions {
        supported: Vec<String>,
        requested: String,
    },
}

impl Reply {
    fn with(status: u16, body: Body, decision: Decision) -> Reply {
        Reply {
            status,
            body,
            headers: String::new(),
            close: false,
            decision,
            reason: None,
            upstream: None,
        }
    }

    /// A JSON-RPC error with this HTTP status: a request scopegate cannot take (`invalid` in
    /// the audit log unless marked otherwise).
    pub fn error(status: u16, code: i32, message: impl Into<String>) -> Reply {
        Reply::with(
            status,
            error_body(code, message.into(), ErrorData::None),
            Decision::Invalid,
        )
    }

    /// 2026-07-28's "unsupported protocol version" (HTTP 400, JSON-RPC -32022), naming the
    /// revisions that are served: a negotiation outcome, not an invalid request.
    pub fn unsupported_version(supported: Vec<String>, requested: String) -> Reply {
        let mut r = Reply::with(
            400,
            error_body(
                jsonrpc::UNSUPPORTED_PROTOCOL_VERSION,
                "Unsupported protocol version".into(),
                ErrorData::Versions {
                    supported,
                    requested,
                },
            ),
            Decision::Allowed,
        );
        r.reason = Some("unsupported protocol version".into());
        r
    }

    /// A call the policy refuses: HTTP 200 (the agent's session carries on), JSON-RPC -32004,
    /// `error.data.rule` naming the rule.
    pub fn policy_denied(rule: &str, reason: &str) -> Reply {
        let mut r = Reply::with(
            200,
            error_body(
                jsonrpc::POLICY_DENIED,
                reason.to_owned(),
                ErrorData::Rule(rule.to_owned()),
            ),
            Decision::Denied,
        );
        r.reason = Some(rule.to_owned());
        r
    }

    /// Over a rate limit: JSON-RPC -32007 with `retry_after_ms` and the limit, a `Retry-After`
    /// header, HTTP `status` (200 or 429, `SCOPEGATE_RATE_LIMIT_STATUS`).
    pub fn rate_limited(status: u16, limit: &str, retry_after_ns: u64) -> Reply {
        let retry_ms = retry_after_ns.div_ceil(1_000_000).max(1);
        let mut r = Reply::with(
            status,
            error_body(
                jsonrpc::RATE_LIMITED,
                format!("rate limited by {limit}; retry after {retry_ms} ms"),
                ErrorData::RateLimit {
                    retry_after_ms: retry_ms,
                    limit: limit.to_owned(),
                },
            ),
            Decision::RateLimited,
        );
        r.headers = format!("Retry-After: {}\r\n", retry_ms.div_ceil(1000).max(1));
        r.reason = Some(limit.to_owned());
        r
    }

    /// A JSON document scopegate answers with (an aggregate result, a batch of errors).
    pub fn json(status: u16, body: Vec<u8>) -> Reply {
        let body = if body.is_empty() {
            Body::Empty
        } else {
            Body::Json(body)
        };
        Reply::with(status, body, Decision::Allowed)
    }

    /// Any other body (health text, metrics, metadata).
    pub fn other(status: u16, content_type: &'static str, bytes: Vec<u8>) -> Reply {
        Reply::with(
            status,
            Body::Other {
                content_type,
                bytes,
            },
            Decision::Allowed,
        )
    }

    /// Recorded as refused by policy (authentication, origin, session), not as malformed.
    pub fn denied(mut self) -> Reply {
        self.decision = Decision::Denied;
        self
    }

    /// Recorded as the upstream's failure.
    pub fn upstream_error(mut self, upstream: Option<usize>) -> Reply {
        self.decision = Decision::UpstreamError;
        self.upstream = upstream;
        self
    }

    /// The connection closes after this reply.
    pub fn closing(mut self) -> Reply {
        self.close = true;
        self
    }

    /// One more header line (without its CRLF).
    pub fn header(mut self, line: &str) -> Reply {
        self.headers.push_str(line);
        self.headers.push_str("\r\n");
        self
    }

    /// Sets the JSON-RPC id an error answers, where it is known.
    pub fn for_id(mut self, request: Option<Id<'_>>) -> Reply {
        if let (Body::Error(e), Some(request)) = (&mut self.body, request) {
            let mut json = Vec::new();
            request.write_json(&mut json);
            e.id = Some(json);
        }
        self
    }

    /// The error's message, or what the audit log should say.
    pub fn message(&self) -> &str {
        match &self.body {
            Body::Error(e) => &e.message,
            _ => self.reason.as_deref().unwrap_or(""),
        }
    }

    /// What the audit log records as the reason.
    pub fn audit_reason(&self) -> Option<String> {
        self.reason.clone().or_else(|| match &self.body {
            Body::Error(e) => Some(e.message.clone()),
            _ => None,
        })
    }

    /// The body's bytes, for a request with id `request` (when the reply does not know it).
    pub fn body_bytes(&self, request: Option<Id<'_>>) -> Vec<u8> {
        match &self.body {
            Body::Error(e) => {
                let JsonRpcError {
                    code,
                    message,
                    data,
                    id,
                } = &**e;
                let mut out = match id {
                    Some(known) => {
                        let mut out = b"{\"jsonrpc\":\"2.0\",\"id\":".to_vec();
                        out.extend_from_slice(known);
                        let body = jsonrpc::error_body(None, *code, message);
                        // Everything after `"id":null`.
                        out.extend_from_slice(&body[b"{\"jsonrpc\":\"2.0\",\"id\":null".len()..]);
                        out
                    }
                    None => jsonrpc::error_body(request, *code, message),
                };
                match data {
                    ErrorData::None => {}
                    ErrorData::Rule(rule) => {
                        out.truncate(out.len() - 2);
                        out.extend_from_slice(b",\"data\":{\"rule\":");
                        jsonrpc::write_json_string(rule, &mut out);
                        out.extend_from_slice(b"}}}");
                    }
                    ErrorData::RateLimit {
                        retry_after_ms,
                        limit,
                    } => {
                        out.truncate(out.len() - 2);
                        out.extend_from_slice(b",\"data\":{\"retry_after_ms\":");
                        crate::fmt::push_decimal(&mut out, *retry_after_ms);
                        out.extend_from_slice(b",\"limit\":");
                        jsonrpc::write_json_string(limit, &mut out);
                        out.extend_from_slice(b"}}}");
                    }
                    ErrorData::Versions {
                        supported,
                        requested,
                    } => {
                        out.truncate(out.len() - 2);
                        out.extend_from_slice(b",\"data\":{\"supported\":[");
                        for (i, v) in supported.iter().enumerate() {
                            if i > 0 {
                                out.push(b',');
                            }
                            jsonrpc::write_json_string(v, &mut out);
                        }
                        out.extend_from_slice(b"],\"requested\":");
                        jsonrpc::write_json_string(requested, &mut out);
                        out.extend_from_slice(b"}}}");
                    }
                }
                out
            }
            Body::Json(bytes) | Body::Other { bytes, .. } => bytes.clone(),
            Body::Empty => Vec::new(),
        }
    }

    /// The whole HTTP response for a request with `method` (a HEAD gets the head only) and id
    /// `request`; `close` adds `Connection: close` (also when the reply itself closes).
    pub fn render(&self, method: &[u8], request: Option<Id<'_>>, close: bool) -> Vec<u8> {
        let body = self.body_bytes(request);
        let content_type = match &self.body {
            Body::Error(_) | Body::Json(_) => "application/json",
            Body::Other { content_type, .. } => content_type,
            Body::Empty => "",
        };
        response::build_for(
            method,
            self.status,
            content_type,
            &self.headers,
            &body,
            close || self.close,
        )
    }
}

fn error_body(code: i32, message: String, data: ErrorData) -> Body {
    Body::Error(Box::new(JsonRpcError {
        code,
        message,
        data,
        id: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(r: &Reply, id: Option<Id<'_>>) -> serde_json::Value {
        serde_json::from_slice(&r.body_bytes(id)).unwrap()
    }

    #[test]
    fn errors_carry_the_id_they_answer() {
        let r = Reply::error(404, jsonrpc::GATEWAY_REFUSED, "not here");
        assert_eq!(json(&r, Some(Id::Int(7)))["id"], 7);
        assert_eq!(json(&r, None)["id"], serde_json::Value::Null);
        let r = r.for_id(Some(Id::Str("x")));
        assert_eq!(json(&r, Some(Id::Int(7)))["id"], "x", "a known id wins");
        assert_eq!(json(&r, None)["error"]["message"], "not here");
    }

    #[test]
    fn denials_and_limits_say_why() {
        let r = Reply::policy_denied("deny \"gh/delete_*\"", "tool gh/delete_repo is denied");
        let v = json(&r, Some(Id::Int(1)));
        assert_eq!(v["error"]["code"], jsonrpc::POLICY_DENIED);
        assert_eq!(v["error"]["data"]["rule"], "deny \"gh/delete_*\"");
        assert_eq!(r.status, 200);
        assert_eq!(r.decision, Decision::Denied);
        let r = Reply::rate_limited(429, "agent \"a\" (1/s, burst 1)", 1_500_000_000);
        let v = json(&r, None);
        assert_eq!(v["error"]["code"], jsonrpc::RATE_LIMITED);
        assert_eq!(v["error"]["data"]["retry_after_ms"], 1500);
        assert_eq!(r.headers, "Retry-After: 2\r\n");
        assert_eq!(r.decision, Decision::RateLimited);
    }

    #[test]
    fn renders_whole_responses() {
        let r = Reply::error(405, jsonrpc::GATEWAY_REFUSED, "no").header("Allow: GET");
        let text = String::from_utf8(r.render(b"POST", None, false)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("Allow: GET\r\n") && !text.contains("Connection: close"));
        let r = Reply::other(200, "text/plain", b"ok\n".to_vec());
        let head_only = r.render(b"HEAD", None, true);
        assert!(
            String::from_utf8(head_only)
                .unwrap()
                .ends_with("Connection: close\r\n\r\n")
        );
    }
}
