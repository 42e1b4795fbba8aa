//! Responses scopegate writes itself (errors, health), as complete byte strings.

use std::fmt::Write as _;

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// A whole response: status line, `extra` header lines (each ending `\r\n`), framing, body.
pub fn build(status: u16, content_type: &str, extra: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut head = String::with_capacity(160 + extra.len());
    let _ = write!(
        head,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}",
        reason(status),
        body.len()
    );
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// [`build`] for a request with `method`: a HEAD request gets the same head, without the body
/// (RFC 9110 §9.3.2), so the connection's next response is framed right.
pub fn build_for(
    method: &[u8],
    status: u16,
    content_type: &str,
    extra: &str,
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut out = build(status, content_type, extra, body, close);
    if method == b"HEAD" {
        out.truncate(out.len() - body.len());
    }
    out
}

pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
