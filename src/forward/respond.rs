//! Writing to the agent: the response head (credentials stripped, the session id sealed) and
//! the body pieces, coalesced into few writes.

use bytes::Bytes;

use super::plan::{Exchange, ForwardError, Plan};
use super::scan::IsErrorScan;
use crate::fmt::push_decimal;
use crate::http::conn::Conn;
use crate::http::head::{self, Head};
use crate::mcp::jsonrpc;
use crate::reply::Reply;
use crate::upstream::Upstream;

/// Pieces at most this long are copied into one buffer with what precedes them so they go out
/// in a single write; larger ones are handed to the kernel as they are.
pub(super) const COALESCE_LIMIT: usize = 16 * 1024;
/// The read size on an upstream event stream.
const STREAM_CHUNK: usize = 4 * 1024;
/// A long-lived stream holds small buffers: the response head's share of the upstream buffer is
/// let go, the stream is read in small pieces into a small buffer, and a large scratch buffer
/// left by an earlier request is not kept for the stream's whole life.
pub(super) fn stream_buffers(ex: &mut Exchange, up: &mut Conn) {
    ex.response.raw = Bytes::new();
    let mut small = bytes::BytesMut::with_capacity(STREAM_CHUNK.max(up.buf.len()));
    small.extend_from_slice(&up.buf);
    up.buf = small;
    up.read_chunk = STREAM_CHUNK;
    ex.out.shrink_to(STREAM_CHUNK);
}

/// A long-lived stream about to wait for its next event holds no buffers: what it read is
/// consumed and what it wrote is sent, so both are let go and allocated again when more comes
/// (an allocation or two per event, on a stream quiet enough to wait for one).
pub(super) fn release_quiet(out: &mut Vec<u8>, up: &mut Conn) {
    if out.is_empty() {
        *out = Vec::new();
    }
    if up.buf.is_empty() {
        up.buf = bytes::BytesMut::new();
    }
}

/// Writes what is pending in `out` plus `piece`: in one write when small, else two.
pub(super) async fn send(
    client: &mut Conn,
    out: &mut Vec<u8>,
    piece: Bytes,
) -> std::io::Result<()> {
    send_scanned(client, out, piece, None).await
}

/// [`send`], feeding the body piece to the `isError` scan first.
pub(super) async fn send_scanned(
    client: &mut Conn,
    out: &mut Vec<u8>,
    piece: Bytes,
    scan: Option<&mut IsErrorScan>,
) -> std::io::Result<()> {
    if let Some(scan) = scan {
        scan.feed(&piece);
    }
    if out.len() + piece.len() <= COALESCE_LIMIT || piece.is_empty() {
        out.extend_from_slice(&piece);
        return flush(client, out).await;
    }
    flush(client, out).await?;
    let (res, _) = client.write_all(piece).await;
    res
}

pub(super) async fn flush(client: &mut Conn, out: &mut Vec<u8>) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let buf = std::mem::take(out);
    let (res, mut buf) = client.write_all(buf).await;
    buf.clear();
    *out = buf;
    res
}

/// The status line and end-to-end headers for the agent (see [`write_response_headers`]).
pub(super) fn start_response(
    out: &mut Vec<u8>,
    response: &Head,
    plan: &Plan<'_>,
    upstream: &Upstream,
) -> Result<(), ForwardError> {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(response.status));
    out.push(b' ');
    out.extend_from_slice(response.reason());
    out.extend_from_slice(b"\r\n");
    if !write_response_headers(out, response, plan, &upstream.headers) {
        return Err(ForwardError::BeforeResponse(session_refusal()));
    }
    Ok(())
}

fn session_refusal() -> Reply {
    Reply::error(
        502,
        jsonrpc::UPSTREAM_UNAVAILABLE,
        "the upstream's session id cannot be carried (too long or not visible ASCII)",
    )
}

/// Response headers for the agent: end-to-end headers, minus upstream credentials when asked,
/// with the upstream's session id sealed. `false` when a session id could not be sealed.
fn write_response_headers(
    out: &mut Vec<u8>,
    response: &Head,
    plan: &Plan<'_>,
    injected: &[(String, String)],
) -> bool {
    for (name, value) in response.iter() {
        if head::is_hop_by_hop(name) || head::named_by_connection(response, name) {
            continue;
        }
        if plan.strip_credentials
            && (CREDENTIAL_HEADERS
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
                || injected
                    .iter()
                    .any(|(n, _)| name.eq_ignore_ascii_case(n.as_bytes())))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        match plan.seal_session {
            Some(seal) if name.eq_ignore_ascii_case(b"mcp-session-id") => {
                if !value.iter().all(|b| (0x21..=0x7e).contains(b)) {
                    return false;
                }
                match seal(value) {
                    Some(token) => out.extend_from_slice(token.as_bytes()),
                    None => return false,
                }
            }
            _ => out.extend_from_slice(value),
        }
        out.extend_from_slice(b"\r\n");
    }
    true
}

/// Response headers that carry or request upstream credentials; never relayed to agents in
/// policy mode (the agent authenticates to scopegate, not to the upstream).
const CREDENTIAL_HEADERS: [&str; 4] = [
    "set-cookie",
    "www-authenticate",
    "proxy-authenticate",
    "authentication-info",
];
