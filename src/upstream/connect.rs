//! New connections to an upstream: its addresses tried in turn (the latest the resolver has,
//! each given a share of the deadline), through the egress proxy when one applies, then the
//! TLS handshake for an `https://` upstream. TLS failures are counted by upstream and reason.

use std::time::Instant;

use monoio::net::TcpStream;

use super::egress::Egress;
use super::error::UpstreamError;
use super::resolve::Name;
use super::{Transport, Upstream};
use crate::http::conn::Conn;
use crate::tls::stream::TlsStream;

/// A new connection to `upstream`, ready for a request.
pub async fn connect(
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
    // Boxed: a handshake's state is large and needed only for new connections, not in every
    // request's state.
    let handshake = Box::pin(TlsStream::connect(
        tcp,
        tls.config.clone(),
        tls.server_name.clone(),
    ));
    match monoio::time::timeout(left, handshake).await {
        Ok(Ok(stream)) => Ok(Conn::new(stream)),
        Ok(Err(e)) => Err(tls_or_io(upstream, e)),
        Err(_) => Err(UpstreamError::TimedOut),
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
async fn connect_tcp(name: &Name, deadline: Instant) -> Result<TcpStream, UpstreamError> {
    let addrs = name.addrs();
    if addrs.is_empty() {
        name.failed();
        return Err(UpstreamError::Unresolved(name.unresolved_reason()));
    }
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let share = left / (addrs.len() - i) as u32;
        match monoio::time::timeout(share, TcpStream::connect_addr(*addr)).await {
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
