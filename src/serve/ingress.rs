//! Reading a request off the agent's connection: the head (size limits, idle and header
//! timeouts), how its body is framed, and the body itself (size limit, 100-continue, body
//! timeout, de-chunked). Also the lingering close after an error, so the answer is not lost to
//! a reset. No policy here: what is read is handed to the stages that decide.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::memory::Activity;
use crate::config::Config;
use crate::http::conn::{Conn, ReadError};
use crate::http::framing::{self, ChunkedDecoder, Framing};
use crate::http::head::{self, Head, HeadError};
use crate::http::response;
use crate::mcp::envelope::{Envelope, EnvelopeParser};
use crate::mcp::jsonrpc;
use crate::reply::Reply;

/// The request head. `Ok(None)`: the client closed (or went idle past the timeout) between
/// requests.
pub async fn read_head(
    config: &Config,
    client: &mut Conn,
    head: &mut Head,
    activity: &Activity,
) -> Result<Option<usize>, Reply> {
    let mut deadline: Option<Instant> = None;
    let mut began = false;
    loop {
        if !client.buf.is_empty() {
            if !began {
                // The first bytes of a request: busy from now on (the idle sweep leaves it to
                // the header timeout).
                activity.begin();
                began = true;
            }
            match head::parse_request(&client.buf, head) {
                Ok(Some(len)) => return Ok(Some(len)),
                Ok(None) => {}
                Err(HeadError::TooLarge) => {
                    return Err(Reply::error(
                        431,
                        jsonrpc::GATEWAY_REFUSED,
                        format!(
                            "request head over {} bytes or {} fields",
                            head::MAX_REQUEST_HEAD,
                            head::MAX_HEADERS
                        ),
                    ));
                }
                Err(HeadError::Malformed(why)) => {
                    return Err(Reply::error(
                        400,
                        jsonrpc::GATEWAY_REFUSED,
                        format!("malformed request head: {why}"),
                    ));
                }
            }
            deadline.get_or_insert_with(|| Instant::now() + config.header_timeout);
        }
        // Waiting for the first byte is idling (the connection counts as idle, and the worker's
        // sweep closes it past SCOPEGATE_IDLE_TIMEOUT_MS); once a head has started it must
        // finish within the header timeout (slow clients are cut off).
        match client.fill_until(deadline).await {
            Ok(0) => {
                return if client.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Reply::error(
                        400,
                        jsonrpc::GATEWAY_REFUSED,
                        "connection closed mid-head",
                    ))
                };
            }
            Ok(_) => {}
            Err(ReadError::TimedOut) if deadline.is_some() => {
                return Err(Reply::error(
                    408,
                    jsonrpc::GATEWAY_REFUSED,
                    "request head not received within SCOPEGATE_HEADER_TIMEOUT_MS",
                ));
            }
            Err(_) => return Ok(None),
        }
    }
}

/// How the body is framed, refused when ambiguous ([`check_framing`]) or present
/// where MCP has none ([`no_body_without_post`]).
pub fn framing(head: &Head) -> Result<Framing, Reply> {
    let framing = check_framing(head)?;
    no_body_without_post(head, framing)?;
    Ok(framing)
}

/// The largest body of a request refused before it is read that is still read (and dropped),
/// so that the connection stays usable: a typical MCP request, not `SCOPEGATE_MAX_BODY`.
pub const REFUSED_BODY_READ: u64 = 64 * 1024;

/// Whether a request with this framing carries a body longer than `limit` bytes, or one of
/// unknown length (chunked).
pub fn body_over(framing: Framing, limit: u64) -> bool {
    match framing {
        Framing::Empty => false,
        Framing::Length(n) => n > limit,
        Framing::Chunked | Framing::UntilClose => true,
    }
}

/// The JSON-RPC envelope of a POST's body, parsed once (the fields routing and
/// authorization need; the body stays as received). `None` for GET and DELETE.
pub fn envelope<'p>(
    parser: &'p mut EnvelopeParser,
    method: &[u8],
    body: &[u8],
) -> Result<Option<Envelope<'p>>, Reply> {
    if method != b"POST" {
        return Ok(None);
    }
    parser
        .parse(body)
        .map(Some)
        .map_err(|e| Reply::error(400, e.code(), e.message()))
}

/// Ambiguous framing (Content-Length and chunked, two Hosts, an unknown coding).
pub fn check_framing(head: &Head) -> Result<Framing, Reply> {
    let framing = framing::request_framing(head).map_err(|e| {
        let status = if e == framing::FramingError::UnsupportedTransferEncoding {
            501
        } else {
            400
        };
        Reply::error(status, jsonrpc::GATEWAY_REFUSED, e.message())
    })?;
    if head.minor_version == 1 && head.count("host") != 1 {
        return Err(Reply::error(
            400,
            jsonrpc::GATEWAY_REFUSED,
            "HTTP/1.1 requires exactly one Host header",
        ));
    }
    Ok(framing)
}

/// A body on GET, HEAD or DELETE has no meaning in MCP, and nothing would look at it
/// before it reached the upstream: refused unread, and the connection closed (its end cannot be
/// trusted).
pub fn no_body_without_post(head: &Head, framing: Framing) -> Result<(), Reply> {
    if matches!(head.method(), b"GET" | b"DELETE" | b"HEAD") && framing != Framing::Empty {
        return Err(Reply::error(
            400,
            jsonrpc::GATEWAY_REFUSED,
            "GET, HEAD and DELETE requests carry no body here; this one is refused unread",
        )
        .closing());
    }
    Ok(())
}

/// The whole body, de-chunked, as `Bytes` sharing the read buffer where it can.
pub async fn read_body(
    config: &Config,
    client: &mut Conn,
    head: &Head,
    framing: Framing,
) -> Result<Bytes, Reply> {
    let max = config.max_body;
    let too_large = || {
        Reply::error(
            413,
            jsonrpc::GATEWAY_REFUSED,
            format!("request body over SCOPEGATE_MAX_BODY ({max} bytes)"),
        )
    };
    let expect = head.get("expect");
    if let Some(value) = expect
        && !value.eq_ignore_ascii_case(b"100-continue")
    {
        return Err(Reply::error(
            417,
            jsonrpc::GATEWAY_REFUSED,
            "unsupported Expect value",
        ));
    }
    match framing {
        Framing::Empty | Framing::UntilClose => return Ok(Bytes::new()),
        Framing::Length(n) if n > max as u64 => return Err(too_large()),
        _ => {}
    }
    let needs_more = match framing {
        Framing::Length(n) => (client.buf.len() as u64) < n,
        _ => true,
    };
    // The body's deadline, set once more must be read (most bodies come with their head).
    let mut deadline = None;
    let mut by = || *deadline.get_or_insert_with(|| Instant::now() + config.body_timeout);
    if expect.is_some() && head.minor_version == 1 && needs_more {
        let (res, _) = client.write_all(response::CONTINUE).await;
        res.map_err(|_| Reply::error(400, jsonrpc::GATEWAY_REFUSED, "client went away"))?;
    }

    match framing {
        Framing::Length(n) => {
            let n = n as usize;
            while client.buf.len() < n {
                client.buf.reserve(n - client.buf.len());
                fill_body(client, by(), "body shorter than Content-Length").await?;
            }
            Ok(client.buf.split_to(n).freeze())
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::default();
            let mut body = BytesMut::new();
            loop {
                let consumed = decoder.feed(&client.buf, Some(&mut body)).map_err(|e| {
                    Reply::error(
                        400,
                        jsonrpc::GATEWAY_REFUSED,
                        format!("bad chunked body: {e:?}"),
                    )
                })?;
                let _ = client.buf.split_to(consumed);
                if body.len() > max {
                    return Err(too_large());
                }
                if decoder.is_done() {
                    return Ok(body.freeze());
                }
                fill_body(client, by(), "chunked body cut short").await?;
            }
        }
        Framing::Empty | Framing::UntilClose => Ok(Bytes::new()),
    }
}

/// Reads more of a request body before `deadline`; `cut_short` says what an early end means.
async fn fill_body(client: &mut Conn, deadline: Instant, cut_short: &str) -> Result<(), Reply> {
    match client.fill_until(Some(deadline)).await {
        Ok(0) | Err(ReadError::Io(_)) => {
            Err(Reply::error(400, jsonrpc::GATEWAY_REFUSED, cut_short))
        }
        Ok(_) => Ok(()),
        Err(ReadError::TimedOut) => Err(Reply::error(
            408,
            jsonrpc::GATEWAY_REFUSED,
            "request body not received within SCOPEGATE_BODY_TIMEOUT_MS",
        )),
    }
}

/// Most bytes read and discarded while closing after an error (a body refused unread can be
/// several MiB: the agent must get to read its answer before the close): read and dropped a
/// buffer at a time, never held.
const LINGER_BYTES: usize = 8 * 1024 * 1024;
/// Longest wait for the client to stop sending while closing after an error.
const LINGER_TIME: Duration = Duration::from_millis(1000);

/// Closes after an error without destroying the answer: closing a socket with unread input
/// makes the kernel send RST, which can discard the response before the client reads it
/// (RFC 9112 §9.6). So: stop writing, then read and drop what the client still sends, briefly.
pub async fn linger_close(client: &mut Conn) {
    client.close_write().await;
    let deadline = Instant::now() + LINGER_TIME;
    let mut drained = 0;
    while drained < LINGER_BYTES {
        client.buf.clear();
        match client
            .fill_within(Some(deadline.saturating_duration_since(Instant::now())))
            .await
        {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::request_head as head;

    #[test]
    fn framing_and_host_rules() {
        let ok = head("POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(check_framing(&ok).unwrap(), Framing::Length(3));
        let two_hosts = head("POST /mcp HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n");
        assert_eq!(check_framing(&two_hosts).unwrap_err().status, 400);
        let gzip = head("POST /mcp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!(check_framing(&gzip).unwrap_err().status, 501);
        let smuggle = head(
            "POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(check_framing(&smuggle).unwrap_err().status, 400);
    }

    #[test]
    fn envelopes_of_posts_only() {
        let mut parser = EnvelopeParser::new();
        let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#;
        let env = envelope(&mut parser, b"POST", body).unwrap().unwrap();
        assert_eq!(env.single().unwrap().method, Some("tools/list"));
        drop(env);
        assert!(envelope(&mut parser, b"GET", b"").unwrap().is_none());
        let bad = envelope(&mut parser, b"POST", b"{not json").err().unwrap();
        assert_eq!(bad.status, 400);
        let small = head("POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n");
        assert!(!body_over(framing(&small).unwrap(), REFUSED_BODY_READ));
        let large = head("POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n");
        assert!(body_over(framing(&large).unwrap(), REFUSED_BODY_READ));
        let chunked = head("POST /mcp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(body_over(framing(&chunked).unwrap(), REFUSED_BODY_READ));
        let get = head("GET /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n");
        assert!(framing(&get).unwrap_err().close);
    }

    #[test]
    fn bodies_only_on_post() {
        let get = head("GET /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n");
        let refusal = no_body_without_post(&get, check_framing(&get).unwrap()).unwrap_err();
        assert!(refusal.close && refusal.status == 400);
        let plain_get = head("GET /mcp HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(no_body_without_post(&plain_get, Framing::Empty).is_ok());
        let post = head("POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n");
        assert!(no_body_without_post(&post, Framing::Length(3)).is_ok());
    }
}
