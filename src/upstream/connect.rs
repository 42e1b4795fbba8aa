//! New connections to an upstream: its addresses tried in turn (the latest the resolver has,
//! each given a share of the deadline), through the egress proxy when one applies, then the
//! TLS handshake for an `https://` upstream. TLS failures are counted by upstream and reason.

use std::time::Instant;

use monoio::net::TcpStream;

use super::egress::Egress;
use super::error::UpstreamError;
use super::resolve::Name;
use super::{Transport, Upstream};
use crate::http::conn::{Conn, ReadError, Stream};
use crate::http::head::{self, Head, HeadError};
use crate::tls::stream::TlsStream;

/// A new connection to `upstream`, ready for a request.
pub async fn connect(
    upstream: &Upstream,
    egress: Option<&Egress>,
    deadline: Instant,
) -> Result<Conn, UpstreamError> {
    let endpoint = match &upstream.transport {
        Transport::Stdio(stdio) => {
            let unix = stdio.connect().map_err(UpstreamError::Io)?;
            let unix = monoio::net::UnixStream::from_std(unix).map_err(UpstreamError::Io)?;
            return Ok(Conn::new(unix));
        }
        Transport::Http(e) | Transport::Https(e, _) => e,
    };
    let tcp = match egress.filter(|e| e.applies_to(endpoint.host())) {
        None => connect_tcp(&endpoint.name, deadline).await?,
        Some(egress) => {
            let tcp = connect_tcp(&egress.proxy, deadline).await?;
            tunnel(egress, tcp, &endpoint.name, deadline).await?
        }
    };
    let Transport::Https(_, tls) = &upstream.transport else {
        return Ok(Conn::new(tcp));
    };
    let left = deadline.saturating_duration_since(Instant::now());
    // Boxed: a handshake's state is large and needed only for new connections, not in every
    // request's state.
    let handshake = Box::pin(TlsStream::connect(
        tcp,
        tls.config.clone(),
        tls.server_name.clone(),
    ));
    match crate::timer::timeout(left, handshake).await {
        Ok(Ok(stream)) => Ok(Conn::new(stream)),
        Ok(Err(e)) => Err(tls_or_io(upstream, e)),
        Err(_) => Err(UpstreamError::TimedOut),
    }
}

/// Asks the egress proxy, on `tcp`, for a tunnel to `name`; the stream then reaches the
/// upstream.
async fn tunnel(
    egress: &Egress,
    tcp: TcpStream,
    name: &Name,
    deadline: Instant,
) -> Result<TcpStream, UpstreamError> {
    let target = if name.host().contains(':') {
        format!("[{}]:{}", name.host(), name.port())
    } else {
        format!("{}:{}", name.host(), name.port())
    };
    let mut out = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = &egress.authorization {
        out.push_str("Proxy-Authorization: ");
        out.push_str(auth);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut conn = Conn::new(tcp);
    let (res, _) = conn.write_all(out.into_bytes()).await;
    res.map_err(UpstreamError::Io)?;
    let mut response = Head::default();
    read_response_head(&mut conn, &mut response, deadline).await?;
    if !(200..300).contains(&response.status) {
        return Err(UpstreamError::Egress(response.status));
    }
    if !conn.buf.is_empty() {
        // The upstream speaks only after our request: bytes now are the proxy's.
        return Err(UpstreamError::BadHead(
            "egress proxy sent data after CONNECT",
        ));
    }
    match conn.stream {
        Stream::Tcp(tcp) => Ok(tcp),
        Stream::Tls(_) | Stream::Unix(_) => unreachable!("the proxy connection is plain TCP"),
    }
}

/// A TLS failure (counted by upstream and reason) or a plain I/O error.
pub fn tls_or_io(upstream: &Upstream, e: std::io::Error) -> UpstreamError {
    match crate::tls::tls_error(&e) {
        Some(tls_error) => {
            let reason = crate::tls::failure_reason(tls_error);
            crate::tls::count_failure(Some(&upstream.name), reason);
            UpstreamError::Tls(reason)
        }
        None => UpstreamError::Io(e),
    }
}

/// A TCP connection to the first of `name`'s addresses that answers. Each address gets an
/// equal share of what is left of the deadline, so one unreachable address (IPv6 on an
/// IPv4-only host) does not use up the time of the others.
pub async fn connect_tcp(name: &Name, deadline: Instant) -> Result<TcpStream, UpstreamError> {
    let addrs = name.addrs();
    if addrs.is_empty() {
        name.failed();
        return Err(UpstreamError::Unresolved(name.unresolved_reason()));
    }
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let share = left / (addrs.len() - i) as u32;
        match crate::timer::timeout(share, TcpStream::connect_addr(*addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = Some(UpstreamError::Io(e)),
            Err(_) => last = Some(UpstreamError::TimedOut),
        }
    }
    name.failed();
    Err(last.unwrap_or(UpstreamError::TimedOut))
}

/// Reads a response head into `response` (interim 1xx answers skipped), leaving what follows
/// it in `up.buf`.
pub(super) async fn read_response_head(
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
        match up.fill_until(Some(deadline)).await {
            Ok(0) => return Err(UpstreamError::Closed),
            Ok(_) => {}
            Err(ReadError::TimedOut) => return Err(UpstreamError::TimedOut),
            Err(ReadError::Io(e)) => return Err(UpstreamError::Io(e)),
        }
    }
}
