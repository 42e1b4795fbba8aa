//! The round trip to an upstream: a pooled (or new) connection, the request sent, the response
//! head read; failures become the refusals the agent sees (502, 504).

use std::time::{Duration, Instant};

use bytes::Bytes;
use monoio::net::TcpStream;

use super::egress::Egress;
use super::resolve::Name;
use super::{Pool, Transport, Upstream};
use crate::http::conn::{Conn, ReadError};
use crate::http::head::{self, Head, HeadError};
use crate::mcp::jsonrpc;
use crate::reply::Reply;
use crate::tls::stream::TlsStream;

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
            _ => (
                connect(target.upstream, target.pool.egress(), deadline)
                    .await
                    .map_err(HeadFailure::Connect)?,
                false,
            ),
        };
        let result = match send_request(&mut conn, out, body, inline_body).await {
            Ok(()) => read_response_head(&mut conn, head, deadline).await,
            Err(e) => Err(UpstreamError::Io(e)),
        };
        match result {
            Ok(()) => return Ok(conn),
            Err(UpstreamError::Io(_) | UpstreamError::Closed) if reused => continue,
            // A peer may refuse our client certificate only after the handshake (TLS 1.3),
            // with an alert, or (some servers) by closing without a word.
            Err(UpstreamError::Io(e)) => {
                return Err(HeadFailure::Exchange(tls_or_io(target.upstream, e)));
            }
            Err(UpstreamError::Closed) => {
                if let Transport::Https(_, tls) = &target.upstream.transport {
                    let reason = if tls.options.client_cert_file.is_some() {
                        "closed by the peer (client certificate refused?)"
                    } else {
                        "closed by the peer (client certificate required?)"
                    };
                    crate::tls::count_failure(Some(&target.upstream.name), reason);
                    return Err(HeadFailure::Exchange(UpstreamError::Tls(reason)));
                }
                return Err(HeadFailure::Exchange(UpstreamError::Closed));
            }
            Err(e) => return Err(HeadFailure::Exchange(e)),
        }
    }
    Err(HeadFailure::Exchange(UpstreamError::Closed))
}

#[derive(Debug)]
pub enum UpstreamError {
    Io(std::io::Error),
    /// The upstream closed before a complete response head.
    Closed,
    TimedOut,
    BadHead(&'static str),
    /// The TLS handshake failed, for this reason (a fixed phrase: nothing the peer sent).
    Tls(&'static str),
    /// The egress proxy refused the tunnel with this status.
    Egress(u16),
}

impl UpstreamError {
    pub fn refusal(self, name: &str, timeout: Duration) -> Reply {
        match self {
            UpstreamError::TimedOut => Reply::error(
                504,
                jsonrpc::UPSTREAM_TIMEOUT,
                format!(
                    "upstream {name:?} did not answer within {} ms (SCOPEGATE_UPSTREAM_TIMEOUT_MS)",
                    timeout.as_millis()
                ),
            ),
            UpstreamError::BadHead(why) => Reply::error(
                502,
                jsonrpc::UPSTREAM_UNAVAILABLE,
                format!("upstream {name:?} sent an invalid response: {why}"),
            ),
            other => unavailable(name, other),
        }
    }
}

pub fn unavailable(name: &str, e: UpstreamError) -> Reply {
    let what = match &e {
        UpstreamError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "refused the connection".to_owned()
        }
        UpstreamError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset => {
            "reset the connection".to_owned()
        }
        UpstreamError::Io(io) => format!("failed: {io}"),
        UpstreamError::Closed => "closed the connection before answering".to_owned(),
        UpstreamError::TimedOut => "timed out".to_owned(),
        UpstreamError::BadHead(why) => format!("sent an invalid response: {why}"),
        UpstreamError::Tls(why) => format!("TLS handshake failed: {why}"),
        UpstreamError::Egress(status) => {
            format!("is unreachable: the egress proxy refused the tunnel ({status})")
        }
    };
    if matches!(e, UpstreamError::TimedOut) {
        return Reply::error(
            504,
            jsonrpc::UPSTREAM_TIMEOUT,
            format!("upstream {name:?} {what}"),
        );
    }
    Reply::error(
        502,
        jsonrpc::UPSTREAM_UNAVAILABLE,
        format!("upstream {name:?} {what}"),
    )
}

/// A new connection over the upstream's transport: its addresses tried in turn (the latest the
/// resolver has), then the TLS handshake for an `https://` upstream.
async fn connect(
    upstream: &Upstream,
    egress: Option<&Egress>,
    deadline: Instant,
) -> Result<Conn, UpstreamError> {
    let endpoint = upstream.transport.endpoint();
    let tcp = match egress.filter(|e| e.applies_to(endpoint.host())) {
        None => connect_tcp(&endpoint.name, deadline).await?,
        Some(egress) => {
            let tcp = connect_tcp(&egress.proxy, deadline).await?;
            egress.tunnel(tcp, &endpoint.name, deadline).await?
        }
    };
    let Transport::Https(_, tls) = &upstream.transport else {
        return Ok(Conn::new(tcp));
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let handshake = TlsStream::connect(tcp, tls.config.clone(), tls.server_name.clone());
    match monoio::time::timeout(left, handshake).await {
        Ok(Ok(stream)) => Ok(Conn::new(stream)),
        Ok(Err(e)) => Err(tls_or_io(upstream, e)),
        Err(_) => Err(UpstreamError::TimedOut),
    }
}

/// A TLS failure (counted by upstream and reason) or a plain I/O error.
fn tls_or_io(upstream: &Upstream, e: std::io::Error) -> UpstreamError {
    match crate::tls::tls_error(&e) {
        Some(tls_error) => {
            let reason = crate::tls::failure_reason(tls_error);
            crate::tls::count_failure(Some(&upstream.name), reason);
            UpstreamError::Tls(reason)
        }
        None => UpstreamError::Io(e),
    }
}

/// A TCP connection to the first of `name`'s addresses that answers.
async fn connect_tcp(name: &Name, deadline: Instant) -> Result<TcpStream, UpstreamError> {
    let mut last = None;
    for addr in name.addrs().iter() {
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, TcpStream::connect_addr(*addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => return Err(UpstreamError::TimedOut),
        }
    }
    name.failed();
    Err(UpstreamError::Io(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
    })))
}

async fn send_request(
    up: &mut Conn,
    out: &mut Vec<u8>,
    body: &Bytes,
    inline_body: bool,
) -> std::io::Result<()> {
    let buf = std::mem::take(out);
    let (res, buf) = up.write_all(buf).await;
    *out = buf;
    res?;
    if !inline_body {
        let (res, _) = up.write_all(body.clone()).await;
        res?;
    }
    Ok(())
}

async fn read_response_head(
    up: &mut Conn,
    response: &mut Head,
    deadline: Instant,
) -> Result<(), UpstreamError> {
    up.buf.clear();
    loop {
        if !up.buf.is_empty() {
            match head::parse_response(&up.buf, response) {
                Ok(Some(len)) => {
                    if (100..200).contains(&response.status) {
                        if response.status == 101 {
                            return Err(UpstreamError::BadHead("unexpected protocol switch (101)"));
                        }
                        // Interim response (100 Continue, 103 Early Hints): not relayed.
                        let _ = up.buf.split_to(len);
                        continue;
                    }
                    response.raw = up.buf.split_to(len).freeze();
                    return Ok(());
                }
                Ok(None) => {}
                Err(HeadError::TooLarge) => {
                    return Err(UpstreamError::BadHead("response head too large"));
                }
                Err(HeadError::Malformed(why)) => return Err(UpstreamError::BadHead(why)),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match up.fill_within(Some(left)).await {
            Ok(0) => return Err(UpstreamError::Closed),
            Ok(_) => {}
            Err(ReadError::TimedOut) => return Err(UpstreamError::TimedOut),
            Err(ReadError::Io(e)) => return Err(UpstreamError::Io(e)),
        }
    }
}
