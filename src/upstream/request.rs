//! The one writer of request heads for upstreams, for the agent's forwarded requests and for
//! the requests scopegate makes itself (the aggregate endpoint's fan-outs). The upstream's own
//! parts come from its definition: the path, `Host`, the injected credential.

use std::net::SocketAddr;

use super::stdio_bridge::AGENT_HEADER;
use super::{Transport, Upstream};
use crate::fmt::push_decimal;
use crate::http::head::{self, Head};

/// What goes into one request head beside the upstream's own parts.
pub struct Outgoing<'a> {
    pub method: &'a [u8],
    /// The agent's request, when forwarding it: its query string (unless the operator's URL has
    /// one) and its end-to-end headers go along, minus its credential, hop-by-hop fields and
    /// anything scopegate sets itself.
    pub agent: Option<&'a Head>,
    /// Headers scopegate sets on its own requests (`Accept`, `Content-Type`,
    /// `MCP-Protocol-Version`).
    pub set: &'a [(&'a str, &'a [u8])],
    /// The upstream's own session id (an agent's sealed token is never sent on).
    pub session: Option<&'a [u8]>,
    /// The agent's `Mcp-Session-Id` is replaced by `session`.
    pub replace_session: bool,
    /// The answer must be read as written (it is filtered): the agent's `Accept-Encoding` is
    /// not passed on.
    pub plain_answer: bool,
    /// Inject the upstream's `[upstream.headers]` (its credential), replacing any of the
    /// agent's under those names.
    pub inject: bool,
    /// The agent's address, appended to `X-Forwarded-For`.
    pub peer: SocketAddr,
    pub content_length: Option<usize>,
    /// The `traceparent` the upstream is sent (scopegate's span in the agent's trace); the
    /// agent's own is never passed on (an invalid one must not be).
    pub traceparent: Option<&'a [u8]>,
    /// The agent's id, told to a stdio upstream's bridge (its sessionless requests share a
    /// process per agent); never sent to a network upstream.
    pub agent_id: Option<&'a str>,
}

/// Writes the request line and headers for `upstream` into `out` (cleared first).
pub fn write_head(out: &mut Vec<u8>, upstream: &Upstream, req: &Outgoing<'_>) {
    let path = upstream.transport.path();
    out.clear();
    out.extend_from_slice(req.method);
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    // The agent's query string goes along only when the operator's URL has none: parameters the
    // operator set are not the agent's to add to or override (servers read the first or the
    // last of a repeated name, and decode names in ways we cannot know).
    if let Some(agent) = req.agent {
        let target = agent.target();
        if !path.contains('?')
            && let Some(q) = memchr::memchr(b'?', target)
            && q + 1 < target.len()
        {
            out.extend_from_slice(&target[q..]);
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(upstream.transport.host_header().as_bytes());
    out.extend_from_slice(b"\r\n");

    let inject: &[(String, String)] = if req.inject { &upstream.headers } else { &[] };
    let mut forwarded_for: Option<&[u8]> = None;
    if let Some(agent) = req.agent {
        for (name, value) in agent.iter() {
            if head::is_hop_by_hop(name)
                || name.eq_ignore_ascii_case(b"host")
                || name.eq_ignore_ascii_case(b"expect")
                // The agent's credential is scopegate's business, never the upstream's.
                || name.eq_ignore_ascii_case(b"authorization")
                || head::named_by_connection(agent, name)
                || (req.replace_session && name.eq_ignore_ascii_case(b"mcp-session-id"))
                || (req.plain_answer && name.eq_ignore_ascii_case(b"accept-encoding"))
                // Only scopegate says which agent a request is from.
                || name.eq_ignore_ascii_case(AGENT_HEADER.as_bytes())
                || name.eq_ignore_ascii_case(b"traceparent")
                // Trace state belongs to the trace: none passed on, none sent (W3C).
                || (req.traceparent.is_none() && name.eq_ignore_ascii_case(b"tracestate"))
                || inject.iter().any(|(n, _)| name.eq_ignore_ascii_case(n.as_bytes()))
            {
                continue;
            }
            if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                forwarded_for = Some(value);
                continue;
            }
            header(out, name, value);
        }
    }
    for (name, value) in req.set {
        header(out, name.as_bytes(), value);
    }
    if let Some(tp) = req.traceparent {
        header(out, b"traceparent", tp);
    }
    for (name, value) in inject {
        header(out, name.as_bytes(), value.as_bytes());
    }
    if let Some(session) = req.session.filter(|s| !s.is_empty()) {
        header(out, b"Mcp-Session-Id", session);
    }
    if let (Transport::Stdio(_), Some(agent)) = (&upstream.transport, req.agent_id) {
        header(out, AGENT_HEADER.as_bytes(), agent.as_bytes());
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    if let Some(prior) = forwarded_for {
        out.extend_from_slice(prior);
        out.extend_from_slice(b", ");
    }
    crate::fmt::push_ip(out, req.peer.ip());
    out.extend_from_slice(b"\r\n");
    if let Some(n) = req.content_length {
        out.extend_from_slice(b"Content-Length: ");
        push_decimal(out, n as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::request_head as agent;

    fn upstream(url: &str) -> Upstream {
        Upstream {
            name: "u".into(),
            transport: Transport::parse(url).unwrap(),
            headers: vec![("X-Api-Key".into(), "secret".into())],
        }
    }

    fn outgoing<'a>(agent: Option<&'a Head>) -> Outgoing<'a> {
        Outgoing {
            method: b"POST",
            agent,
            set: &[],
            session: None,
            replace_session: false,
            plain_answer: false,
            inject: true,
            peer: "10.0.0.9:5000".parse().unwrap(),
            content_length: Some(2),
            agent_id: Some("agent-1"),
            traceparent: None,
        }
    }

    fn written(u: &Upstream, req: &Outgoing<'_>) -> String {
        let mut out = Vec::new();
        write_head(&mut out, u, req);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn forwarded_heads_keep_what_is_end_to_end_and_nothing_of_the_agent_s_credential() {
        let a = agent(
            "POST /mcp/u?x=1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer k\r\nX-Api-Key: agent's\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nMcp-Session-Id: sg1.token\r\nAccept-Encoding: gzip\r\nX-Forwarded-For: 1.2.3.4\r\nX-Trace: t\r\nScopegate-Agent: forged\r\n\r\n",
        );
        let mut req = outgoing(Some(&a));
        req.session = Some(b"upstream-session");
        req.replace_session = true;
        req.plain_answer = true;
        let text = written(&upstream("http://127.0.0.1:9/mcp"), &req);
        assert!(
            text.starts_with("POST /mcp?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"),
            "{text}"
        );
        for gone in [
            "Bearer k",
            "agent's",
            "X-Hop",
            "sg1.token",
            "gzip",
            "Connection",
            // Never told to a network upstream, and never the agent's to say.
            "Scopegate-Agent",
        ] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
        for kept in [
            "X-Trace: t\r\n",
            "X-Api-Key: secret\r\n",
            "Mcp-Session-Id: upstream-session\r\n",
            "X-Forwarded-For: 1.2.3.4, 10.0.0.9\r\n",
            "Content-Length: 2\r\n\r\n",
        ] {
            assert!(text.contains(kept), "{kept:?} not in {text}");
        }
        // The operator's query is not the agent's to extend.
        let text = written(&upstream("http://127.0.0.1:9/mcp?scope=acme"), &req);
        assert!(
            text.starts_with("POST /mcp?scope=acme HTTP/1.1\r\n"),
            "{text}"
        );
    }

    #[test]
    fn a_stdio_bridge_is_told_the_agent_and_only_by_scopegate() {
        let a = agent("POST /mcp/u HTTP/1.1\r\nHost: gw\r\nScopegate-Agent: forged\r\n\r\n");
        let spec = crate::upstream::process::Spec {
            command: vec!["true".into()],
            env: Vec::new(),
            cwd: None,
        };
        let stdio = crate::upstream::stdio::Stdio::new("u", spec, Default::default());
        let u = Upstream {
            name: "u".into(),
            transport: Transport::Stdio(std::sync::Arc::new(stdio)),
            headers: Vec::new(),
        };
        let text = written(&u, &outgoing(Some(&a)));
        assert!(text.contains("Scopegate-Agent: agent-1\r\n"), "{text}");
        assert!(!text.contains("forged"), "{text}");
    }

    #[test]
    fn scopegate_s_own_requests_set_their_headers() {
        let mut req = outgoing(None);
        req.set = &[("Accept", b"application/json, text/event-stream")];
        req.session = Some(b"s-1");
        let text = written(&upstream("http://127.0.0.1:9/mcp"), &req);
        assert!(text.contains("Accept: application/json, text/event-stream\r\n"));
        assert!(text.contains("Mcp-Session-Id: s-1\r\nX-Forwarded-For: 10.0.0.9\r\n"));
    }
}
