//! Request and response heads: parsed with `httparse`, kept as byte spans into the received
//! head so nothing is copied or allocated per header.

use bytes::Bytes;

/// Largest request head (request line + headers) accepted from an agent; larger -> 431.
/// RFC 9110 §5.4 leaves the limit to the server; 16 KiB is above any MCP client's head and
/// bounds what a slow or hostile client can make a worker hold.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Largest response head accepted from an upstream; larger -> 502.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Most header fields in one head; more -> 431 (request) or 502 (response).
pub const MAX_HEADERS: usize = 64;

/// A byte range within a head's buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn of(buf: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    /// The span of `part`, a subslice of `buf`.
    pub fn within(buf: &[u8], part: &[u8]) -> Span {
        Span::of(buf, part)
    }

    pub fn get<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start as usize..self.end as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Over [`MAX_REQUEST_HEAD`] / [`MAX_RESPONSE_HEAD`] bytes or [`MAX_HEADERS`] fields.
    TooLarge,
    /// Not HTTP/1.x, or a malformed line.
    Malformed(&'static str),
}

/// A parsed head. Reused across requests on one connection: `headers` keeps its capacity.
#[derive(Debug, Default)]
pub struct Head {
    /// The head's bytes, through the blank line.
    pub raw: Bytes,
    pub method: Span,
    pub target: Span,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub status: u16,
    pub reason: Span,
    pub headers: Vec<(Span, Span)>,
}

impl Head {
    pub fn method(&self) -> &[u8] {
        self.method.get(&self.raw)
    }

    pub fn target(&self) -> &[u8] {
        self.target.get(&self.raw)
    }

    pub fn reason(&self) -> &[u8] {
        self.reason.get(&self.raw)
    }

    /// Iterates `(name, value)` pairs in received order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (n.get(&self.raw), v.get(&self.raw)))
    }

    /// The first value of header `name` (ASCII case-insensitive).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// How many fields named `name` the head carries.
    pub fn count(&self, name: &str) -> usize {
        self.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .count()
    }
}

/// Whether a response is an event stream (`Content-Type: text/event-stream`).
pub fn is_event_stream(response: &Head) -> bool {
    response
        .get("content-type")
        .is_some_and(|v| v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream"))
}

/// The complete request head at the start of `text`, with `raw` set: for tests, which panic
/// on text that holds no complete, valid head.
#[cfg(test)]
pub fn request_head(text: &str) -> Head {
    let mut head = Head::default();
    let len = parse_request(text.as_bytes(), &mut head)
        .expect("a valid request head")
        .expect("a complete request head");
    head.raw = bytes::Bytes::copy_from_slice(&text.as_bytes()[..len]);
    head
}

/// Parses a request head at the start of `buf`. `Ok(None)`: incomplete, read more.
/// On success returns the head's length; `head.raw` is left for the caller to set from
/// `buf[..len]` (so the caller decides whether to split or copy).
pub fn parse_request(buf: &[u8], head: &mut Head) -> Result<Option<usize>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_REQUEST_HEAD {
                Err(HeadError::TooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(parse_error_text(e))),
    };
    if len > MAX_REQUEST_HEAD {
        return Err(HeadError::TooLarge);
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    head.method = Span::of(buf, method.as_bytes());
    head.target = Span::of(buf, path.as_bytes());
    head.minor_version = version;
    head.status = 0;
    head.reason = Span::default();
    head.headers.clear();
    for h in req.headers.iter() {
        head.headers
            .push((Span::of(buf, h.name.as_bytes()), Span::of(buf, h.value)));
    }
    Ok(Some(len))
}

/// Parses a response head at the start of `buf`. `Ok(None)`: incomplete, read more.
pub fn parse_response(buf: &[u8], head: &mut Head) -> Result<Option<usize>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut fields);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_RESPONSE_HEAD {
                Err(HeadError::TooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(parse_error_text(e))),
    };
    let (Some(version), Some(code)) = (res.version, res.code) else {
        return Err(HeadError::Malformed("incomplete status line"));
    };
    head.method = Span::default();
    head.target = Span::default();
    head.minor_version = version;
    head.status = code;
    head.reason = res
        .reason
        .map(|r| Span::of(buf, r.as_bytes()))
        .unwrap_or_default();
    head.headers.clear();
    for h in res.headers.iter() {
        head.headers
            .push((Span::of(buf, h.name.as_bytes()), Span::of(buf, h.value)));
    }
    Ok(Some(len))
}

fn parse_error_text(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::Version => "unsupported HTTP version",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1): meaningful for one connection only, never relayed.
/// `Content-Length` and `Transfer-Encoding` are re-framed by us, so they are dropped too.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&str; 10] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Whether the head's `Connection` field lists `token` (e.g. `close`), case-insensitively.
pub fn connection_has(head: &Head, token: &str) -> bool {
    head.iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether a field was named in `Connection` (which makes it hop-by-hop for this message).
pub fn named_by_connection(head: &Head, name: &[u8]) -> bool {
    head.iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_head_spans() {
        let raw = b"POST /mcp/a?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}";
        let mut h = Head::default();
        let len = parse_request(raw, &mut h).unwrap().unwrap();
        assert_eq!(&raw[len..], b"{}");
        h.raw = Bytes::copy_from_slice(&raw[..len]);
        assert_eq!(h.method(), b"POST");
        assert_eq!(h.target(), b"/mcp/a?x=1");
        assert_eq!(h.minor_version, 1);
        assert_eq!(h.get("content-length"), Some(&b"2"[..]));
        assert_eq!(h.get("HOST"), Some(&b"127.0.0.1"[..]));
        assert_eq!(h.count("host"), 1);
    }

    #[test]
    fn partial_and_oversized_heads() {
        let mut h = Head::default();
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHo", &mut h), Ok(None));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_REQUEST_HEAD + 1, b'a');
        assert_eq!(parse_request(&big, &mut h), Err(HeadError::TooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_request(&many, &mut h), Err(HeadError::TooLarge));
        assert!(matches!(
            parse_request(b"GET / HTTP/2.0\r\n\r\n", &mut h),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn connection_tokens() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\r\n";
        let mut h = Head::default();
        let len = parse_response(raw, &mut h).unwrap().unwrap();
        h.raw = Bytes::copy_from_slice(&raw[..len]);
        assert_eq!(h.status, 200);
        assert_eq!(h.reason(), b"OK");
        assert!(named_by_connection(&h, b"x-secret"));
        assert!(!connection_has(&h, "close"));
        assert!(is_hop_by_hop(b"Transfer-Encoding"));
        assert!(!is_hop_by_hop(b"Mcp-Session-Id"));
    }
}
