//! The round trip to an upstream: a pooled (or new) connection, the request sent, the response
//! head read; failures become the refusals the agent sees (502, 504).

use std::time::Instant;

use bytes::Bytes;

use super::connect::{connect, read_response_head, tls_or_io};
pub use super::error::{UpstreamError, unavailable};
use super::{Pool, Transport, Upstream};
use crate::http::conn::Conn;
use crate::http::head::Head;
use crate::timer::Until;

/// An upstream to exchange with: its definition and this worker's pool.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub upstream: &'a Upstream,
    pub pool: &'a Pool,
}

/// Why [`exchange_head`] got no response head.
pub enum HeadFailure {
    /// No connection to the upstream could be made.
    Connect(UpstreamError),
    /// The request was sent (or sending failed) and no valid head came back.
    Exchange(UpstreamError),
}

/// Sends `out` (then `body`, unless it is already inline in `out`) to the upstream and reads
/// the response head into `head`. The connection comes from the worker's pool when it has one;
/// a pooled connection may have been closed by the upstream while idle, so if it fails before
/// any response byte arrives the request is retried once on a fresh connection.
pub async fn exchange_head(
    target: Target<'_>,
    out: &mut Vec<u8>,
    body: &Bytes,
    inline_body: bool,
    head: &mut Head,
    deadline: Instant,
) -> Result<Conn, HeadFailure> {
    for attempt in 0..2 {
        let (mut conn, reused) = match target.pool.take(target.upstream.pool_id()) {
            Some(c) if attempt == 0 => (c, true),
            // Boxed: connecting is rare (connections are pooled), and its state machine (a
            // proxy tunnel, a TLS handshake) would otherwise size every request's.
            _ => (
                Box::pin(connect(target.upstream, target.pool.egress(), deadline))
                    .await
                    .map_err(HeadFailure::Connect)?,
                false,
            ),
        };
        let result = match send_request(&mut conn, out, body, inline_body, deadline).await {
            Ok(()) => read_response_head(&mut conn, head, deadline).await,
            Err(e) => Err(e),
        };
        // Closed without a word, or reset (a peer that closes with our request unread in
        // its buffer sends a reset instead: which one comes is a race).
        let quiet = match &result {
            Err(UpstreamError::Closed) => true,
            Err(UpstreamError::Io(e)) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            _ => false,
        };
        match result {
            Ok(()) => return Ok(conn),
            Err(UpstreamError::Io(_) | UpstreamError::Closed) if reused => continue,
            // A peer may refuse our client certificate only after the handshake (TLS 1.3),
            // with an alert, or (some servers) by closing without a word: nothing at all came
            // back on a new TLS connection.
            Err(e) if quiet && conn.buf.is_empty() => {
                if let Transport::Https(_, tls) = &target.upstream.transport {
                    let reason = if tls.options.client_cert_file.is_some() {
                        "closed by the peer (client certificate refused?)"
                    } else {
                        "closed by the peer (client certificate required?)"
                    };
                    crate::tls::count_failure(Some(&target.upstream.name), reason);
                    return Err(HeadFailure::Exchange(UpstreamError::Tls(reason)));
                }
                return Err(HeadFailure::Exchange(e));
            }
            Err(UpstreamError::Io(e)) => {
                return Err(HeadFailure::Exchange(tls_or_io(target.upstream, e)));
            }
            Err(e) => return Err(HeadFailure::Exchange(e)),
        }
    }
    Err(HeadFailure::Exchange(UpstreamError::Closed))
}

/// Writes the request by `deadline` (the upstream's answer's): an upstream that stops reading
/// it times out like one that does not answer, and its connection is dropped.
async fn send_request(
    up: &mut Conn,
    out: &mut Vec<u8>,
    body: &Bytes,
    inline_body: bool,
    deadline: Instant,
) -> Result<(), UpstreamError> {
    let send = async {
        let buf = std::mem::take(out);
        let (res, buf) = up.write_all(buf).await;
        *out = buf;
        res?;
        if !inline_body {
            let (res, _) = up.write_all(body.clone()).await;
            res?;
        }
        Ok(())
    };
    match crate::timer::bounded(Until::At(deadline), send).await {
        Ok(sent) => sent.map_err(UpstreamError::Io),
        Err(_) => {
            // A write given up midway: what the upstream got is unknown.
            up.broken = true;
            Err(UpstreamError::TimedOut)
        }
    }
}
