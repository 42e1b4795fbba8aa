//! Why an upstream gave no answer, and the refusal the agent gets for it (502, 504).

use std::time::Duration;

use crate::mcp::jsonrpc;
use crate::reply::Reply;

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
    /// The upstream's host name has no address (yet).
    Unresolved(String),
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
        UpstreamError::Unresolved(why) => format!("is unreachable: {why}"),
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
