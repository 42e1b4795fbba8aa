//! Who is calling, and what they may do: the stages between reading a request and forwarding
//! it. Each is a function over plain inputs (the head, the envelope, the policy), so each is
//! tested alone.
//!
//! - [`admit`]: the route, the origin check, then [`authenticate`]: bearer key, path key or JWT -> the agent; then the upstream it named
//!   (unknown and forbidden read the same).
//! - [`authorize`]: every message, by the one method table (`policy::decide`).
//! - [`rate_limit`]: every bucket that applies; a batch admitted whole or not at all.
//! - [`open_session`]: the agent's sealed token -> the upstream's session id.
//! - [`admit_call`]: the last three for a request to one upstream, in policy mode.
//! - [`audit_available`]: 503 while the audit log fails (`SCOPEGATE_AUDIT_FAIL_CLOSED`).

use super::admin::metadata_url;
use super::memory::ConnCache;
use super::route::{self, Route, Routed, unknown_upstream};
use crate::audit::AuditSink;
use crate::auth::{self, AuthError};
use crate::config::Config;
use crate::debug;
use crate::http::head::Head;
use crate::jwt::JwtVerifier;
use crate::mcp::envelope::{Envelope, Kind, Message};
use crate::mcp::jsonrpc;
use crate::mcp::session::SessionKeys;
use crate::policy::Policy;
use crate::policy::decide::{self, Decision};
use crate::policy::live::LocalPolicy;
use crate::ratelimit::Limiter;
use crate::reply::Reply;

/// A routed, authenticated request.
pub struct Admitted {
    pub route: Route,
    /// The agent (index into the policy), in policy mode.
    pub agent: Option<usize>,
}

/// Where the request goes ([`route::route`]), whether its origin may call
/// ([`route::check_origin`]), and who is calling ([`authenticate`]).
pub fn admit(
    config: &Config,
    jwt: Option<&JwtVerifier>,
    local: Option<&LocalPolicy>,
    head: &Head,
    cache: &mut ConnCache,
) -> Result<Admitted, Reply> {
    let routed = route::route(config, head)?;
    route::check_origin(config, head)?;
    authenticate(config, jwt, local, head, routed, cache)
}

/// `SCOPEGATE_AUDIT_FAIL_CLOSED=1` with a failing audit log: new calls are refused (503).
pub fn audit_available(audit: Option<&AuditSink>) -> Result<(), Reply> {
    match audit {
        Some(a) if a.refusing() => Err(Reply::error(
            503,
            jsonrpc::AUDIT_UNAVAILABLE,
            "the audit log cannot be written; calls are refused until it can (SCOPEGATE_AUDIT_FAIL_CLOSED)",
        )),
        _ => Ok(()),
    }
}

/// Who is calling. In policy mode every MCP request names an agent by its key; the agent must be
/// allowed to use the upstream (else it is told the upstream does not exist).
pub fn authenticate(
    config: &Config,
    jwt: Option<&JwtVerifier>,
    local: Option<&LocalPolicy>,
    head: &Head,
    routed: Routed,
    cache: &mut ConnCache,
) -> Result<Admitted, Reply> {
    let policy = local.map(|p| &***p);
    let Routed { route, path_key } = routed;
    let (Some(policy), Route::Mcp { .. } | Route::Aggregate) = (policy, route) else {
        return Ok(Admitted { route, agent: None });
    };
    let unauthorized = |e: AuthError| {
        Reply::error(401, jsonrpc::UNAUTHENTICATED, e.message())
            .denied()
            .header(&format!(
                "WWW-Authenticate: Bearer resource_metadata=\"{}\"",
                metadata_url(config, head)
            ))
    };
    let header_key = auth::bearer(head).map_err(unauthorized)?;
    let path_key = path_key.map(|span| span.get(&head.raw));
    let key = match (header_key, path_key) {
        (Some(_), Some(_)) => return Err(unauthorized(AuthError::Invalid)),
        (Some(k), None) | (None, Some(k)) => k,
        (None, None) => return Err(unauthorized(AuthError::Missing)),
    };
    let agent = match jwt {
        Some(jwt) if JwtVerifier::looks_like_jwt(key) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let id = jwt.verify(key, now).map_err(|e| {
                debug!("JWT refused: {e:?}");
                unauthorized(AuthError::Invalid)
            })?;
            policy
                .agent_by_id(&id)
                .ok_or_else(|| unauthorized(AuthError::Invalid))?
        }
        _ => match (local, &cache.key_policy) {
            (Some(l), Some(c)) if std::rc::Rc::ptr_eq(l, c) && cache.key == key => cache.key_agent,
            _ => {
                let agent = auth::agent_for_key(policy, key).map_err(unauthorized)?;
                cache.key.clear();
                cache.key.extend_from_slice(key);
                cache.key_policy = local.cloned();
                cache.key_agent = agent;
                agent
            }
        },
    };
    if let Route::Mcp { upstream } = route
        && !upstream.is_some_and(|u| policy.may_use_upstream(agent, u))
    {
        return Err(unknown_upstream(head));
    }
    Ok(Admitted {
        route,
        agent: Some(agent),
    })
}

/// While draining, a connection accepted after shutdown began takes only answers to requests in
/// flight (an agent's answer to a sampling or elicitation request a running call waits for) and
/// notifications; anything else is 503, so it goes to another replica. `env` is `None` before
/// the body is parsed (only the HTTP method is looked at then).
pub fn drain_admits(method: &[u8], env: Option<&Envelope<'_>>) -> Result<(), Reply> {
    let refuse = || {
        let mut r = Reply::error(
            503,
            jsonrpc::GATEWAY_REFUSED,
            "scopegate is shutting down: it takes only answers to requests in flight",
        );
        r.headers = "Retry-After: 1\r\n".into();
        r
    };
    if method != b"POST" {
        return Err(refuse());
    }
    match env {
        None => Ok(()),
        Some(e) if e.messages().iter().all(|m| m.kind != Kind::Request) => Ok(()),
        Some(_) => Err(refuse()),
    }
}

/// Authorize what the upstream will execute. `Some` answers instead: a refused call
/// (a JSON-RPC error with HTTP 200, so the agent's session carries on; 403 for a notification,
/// which has no answer to carry an error), or a batch where the negotiated revision has none. A
/// batch is authorized element by element and refused whole if any element is.
pub fn authorize(
    policy: &Policy,
    agent: usize,
    upstream: usize,
    head: &Head,
    env: &Envelope<'_>,
) -> Option<Reply> {
    if env.is_batch() {
        let version = head.get("mcp-protocol-version").unwrap_or(b"2025-03-26");
        if version != b"2025-03-26" {
            let mut r = Reply::error(
                400,
                jsonrpc::INVALID_REQUEST,
                "JSON-RPC batches are not part of this MCP revision (only 2025-03-26 has them)",
            );
            r.reason = Some("batch outside 2025-03-26".into());
            return Some(r);
        }
    }
    let (index, rule, reason) = env.messages().iter().enumerate().find_map(|(i, m)| {
        match decide::authorize_message(
            policy,
            agent,
            upstream,
            m,
            env.arguments(m),
            env.notifications(m),
        ) {
            Decision::Deny { rule, reason } => Some((i, rule, reason)),
            Decision::Allow => None,
        }
    })?;
    let requests = env.messages().iter().any(|m| m.kind == Kind::Request);
    if !env.is_batch() || !requests {
        // One message, or a batch with no request (nothing an answer could carry an error for:
        // JSON-RPC sends no empty array): 403 for notifications, as for one alone.
        let m = &env.messages()[index];
        let mut reply = Reply::policy_denied(&rule, &reason);
        if !env.is_batch() {
            reply = reply.for_id(m.id);
        }
        if m.kind == Kind::Notification || !requests {
            reply.status = 403;
        }
        return Some(reply);
    }
    let mut body = vec![b'['];
    for (i, m) in env.messages().iter().enumerate() {
        if m.kind != Kind::Request {
            continue;
        }
        if body.len() > 1 {
            body.push(b',');
        }
        let message = if i == index {
            reason.clone()
        } else {
            format!("batch refused: element {index} was denied ({reason})")
        };
        body.extend(Reply::policy_denied(&rule, &message).body_bytes(m.id));
    }
    body.push(b']');
    let mut reply = Reply::json(200, body).denied();
    reply.reason = Some(rule);
    Some(reply)
}

/// Rate limits. JSON-RPC requests take from the buckets (tools/call: the agent's tool
/// rules, the agent, its tenant, the upstream; any other request: the agent's own bucket).
/// Notifications, responses, the session's GET event stream and DELETE are session plumbing and
/// never limited, so cancellations and answers to server requests always get through (and an
/// SDK's background GET does not eat an agent's burst). `Some` refuses, with HTTP `status`
/// (`SCOPEGATE_RATE_LIMIT_STATUS`).
pub async fn rate_limit(
    limiter: &Limiter,
    status: u16,
    policy: &Policy,
    agent: usize,
    upstream: usize,
    env: &Envelope<'_>,
) -> Option<Reply> {
    fn tool_of<'a>(m: &Message<'a>) -> Option<&'a str> {
        if m.method == Some("tools/call") {
            m.name
        } else {
            None
        }
    }
    let messages = env.messages();
    let mut limited = None;
    for (i, m) in messages.iter().enumerate() {
        if m.kind != Kind::Request {
            continue;
        }
        let uses = policy.limits_for(agent, upstream, tool_of(m));
        if let Err(refused) = limiter.admit(&uses).await {
            // A batch is admitted whole or not at all.
            for earlier in messages[..i].iter().filter(|m| m.kind == Kind::Request) {
                let uses = policy.limits_for(agent, upstream, tool_of(earlier));
                limiter.release(&uses).await;
            }
            limited = Some(refused);
            break;
        }
    }
    let limited = limited?;
    let reply = Reply::rate_limited(status, &limited.label, limited.retry_after_ns);
    if !env.is_batch() {
        return Some(reply.for_id(env.single().and_then(|m| m.id)));
    }
    let mut body = vec![b'['];
    for m in messages.iter().filter(|m| m.kind == Kind::Request) {
        if body.len() > 1 {
            body.push(b',');
        }
        body.extend(reply.body_bytes(m.id));
    }
    body.push(b']');
    let mut batch = Reply::json(status, body);
    batch.headers = reply.headers.clone();
    batch.decision = reply.decision;
    batch.reason = reply.reason.clone();
    Some(batch)
}

thread_local! {
    /// Where session tokens are decoded and decrypted, one per thread: what a token holds is
    /// copied into the connection's memory at once, so no connection keeps a buffer for it.
    static OPEN_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Opens the agent's session token: it must be scopegate's, sealed for this agent and upstream.
pub fn open_session<'c>(
    sessions: &SessionKeys,
    policy: &Policy,
    agent: usize,
    upstream: usize,
    token: &[u8],
    cache: &'c mut ConnCache,
) -> Option<&'c [u8]> {
    if token.is_empty() {
        return None;
    }
    if cache.token != token {
        // Forgotten first: a token that fails to open leaves nothing a later one could match.
        cache.token.clear();
        cache.token_agent.clear();
        cache.token_upstream.clear();
        cache.token_session.clear();
        OPEN_SCRATCH.with_borrow_mut(|scratch| {
            let s = sessions.open_in(token, scratch)?;
            cache.token_agent.push_str(s.agent);
            cache.token_upstream.push_str(s.upstream);
            cache.token_session.extend_from_slice(s.upstream_session);
            Some(())
        })?;
        cache.token.extend_from_slice(token);
    }
    // The binding is checked on every request, against the policy of this request.
    (cache.token_agent == policy.agents[agent].id
        && cache.token_upstream == policy.upstreams()[upstream].name)
        .then_some(cache.token_session.as_slice())
}

/// The gates of a request to one upstream in policy mode: every message authorized, every
/// limit taken, the agent's session token opened. `Ok` carries the upstream's session id.
#[allow(clippy::too_many_arguments)]
pub async fn admit_call<'c>(
    limiter: &Limiter,
    limited_status: u16,
    sessions: &SessionKeys,
    policy: &Policy,
    agent: usize,
    upstream: usize,
    head: &Head,
    env: Option<&Envelope<'_>>,
    cache: &'c mut ConnCache,
) -> Result<Option<&'c [u8]>, Reply> {
    if let Some(env) = env {
        if let Some(refused) = authorize(policy, agent, upstream, head, env) {
            return Err(refused);
        }
        let limited = rate_limit(limiter, limited_status, policy, agent, upstream, env).await;
        if let Some(refused) = limited {
            return Err(refused);
        }
    }
    let Some(token) = head.get("mcp-session-id") else {
        return Ok(None);
    };
    match open_session(sessions, policy, agent, upstream, token, cache) {
        Some(s) => Ok(Some(s)),
        None => Err(Reply::error(
            404,
            jsonrpc::SESSION_NOT_FOUND,
            "session not found: initialize a new session",
        )
        .denied()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::request_head as head;
    use crate::mcp::envelope::EnvelopeParser;

    use std::collections::HashMap;
    use std::path::Path;
    use std::rc::Rc;

    /// A stage's future with the local limiter, which never waits: ready at once.
    fn ready<T>(future: impl std::future::Future<Output = T>) -> T {
        let future = std::pin::pin!(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match future.poll(&mut cx) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => panic!("the local limiter waited"),
        }
    }

    fn rate_limit(status: u16, p: &Policy, a: usize, u: usize, env: &Envelope) -> Option<Reply> {
        ready(super::rate_limit(&Limiter::default(), status, p, a, u, env))
    }
    use std::sync::Arc;

    const KEY: &str = "gate-test-key";

    fn policy() -> LocalPolicy {
        let text = format!(
            r#"
[[upstream]]
name = "a"
url = "http://127.0.0.1:9/mcp"
[[upstream]]
name = "b"
url = "http://127.0.0.1:9/mcp"
[[agent]]
id = "bot"
key_sha256 = "{}"
upstreams = ["a"]
allow = ["a/echo"]
[agent.rate]
per_second = 1
burst = 2
"#,
            crate::policy::hash_key(KEY)
        );
        let p = Policy::parse(
            Path::new("p.toml"),
            &text,
            &[],
            &HashMap::<String, String>::new(),
        )
        .unwrap();
        Rc::new(Arc::new(p))
    }

    fn config() -> Config {
        let upstreams = "a=http://127.0.0.1:9/mcp,b=http://127.0.0.1:9/mcp";
        let vars = [
            ("SCOPEGATE_POLICY", "/dev/null"),
            ("SCOPEGATE_UPSTREAMS", upstreams),
        ];
        Config::from_pairs(&vars).unwrap()
    }

    fn auth(p: &LocalPolicy, raw: &str) -> Result<Admitted, u16> {
        let h = head(raw);
        let routed = crate::serve::route::route(&config(), &h).map_err(|r| r.status)?;
        authenticate(
            &config(),
            None,
            Some(p),
            &h,
            routed,
            &mut ConnCache::default(),
        )
        .map_err(|r| r.status)
    }

    #[test]
    fn authentication_then_upstream_access() {
        let p = policy();
        let ok = auth(
            &p,
            &format!("POST /mcp/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"),
        );
        assert_eq!(ok.unwrap().agent, Some(0));
        assert_eq!(
            auth(&p, "POST /mcp/a HTTP/1.1\r\nHost: x\r\n\r\n").err(),
            Some(401)
        );
        assert_eq!(
            auth(
                &p,
                "POST /mcp/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n\r\n"
            )
            .err(),
            Some(401)
        );
        // Forbidden and unknown alike, after authentication only.
        let forbidden =
            format!("POST /mcp/b HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n");
        let unknown =
            format!("POST /mcp/zz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n");
        assert_eq!(auth(&p, &forbidden).err(), Some(404));
        assert_eq!(auth(&p, &unknown).err(), Some(404));
        assert_eq!(
            auth(&p, "POST /mcp/zz HTTP/1.1\r\nHost: x\r\n\r\n").err(),
            Some(401)
        );
    }

    #[test]
    fn authorization_of_single_messages_and_batches() {
        let p = policy();
        let h = head("POST /mcp/a HTTP/1.1\r\nHost: x\r\nMCP-Protocol-Version: 2025-03-26\r\n\r\n");
        let mut parser = EnvelopeParser::new();
        let env = parser
            .parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}"#)
            .unwrap();
        assert!(authorize(&p, 0, 0, &h, &env).is_none());
        drop(env);
        let env = parser
            .parse(br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"rm"}}"#)
            .unwrap();
        let r = authorize(&p, 0, 0, &h, &env).unwrap();
        assert_eq!(
            (r.status, r.decision),
            (200, crate::audit::entry::Decision::Denied)
        );
        drop(env);
        let env = parser
            .parse(br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"rm"}}]"#)
            .unwrap();
        let r = authorize(&p, 0, 0, &h, &env).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.body_bytes(None)).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2, "the whole batch is refused");
        assert!(
            v[0]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("batch refused")
        );
        drop(env);
        // A batch of notifications only: no empty array, 403 as for one alone.
        let env = parser
            .parse(br#"[{"jsonrpc":"2.0","method":"tools/call","params":{"name":"rm"}}]"#)
            .unwrap();
        let r = authorize(&p, 0, 0, &h, &env).unwrap();
        assert_eq!(r.status, 403);
        let v: serde_json::Value = serde_json::from_slice(&r.body_bytes(None)).unwrap();
        assert!(v.is_object(), "{v}");
        drop(env);
        let newer =
            head("POST /mcp/a HTTP/1.1\r\nHost: x\r\nMCP-Protocol-Version: 2025-06-18\r\n\r\n");
        let env = parser
            .parse(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#)
            .unwrap();
        assert_eq!(authorize(&p, 0, 0, &newer, &env).unwrap().status, 400);
    }

    #[test]
    fn rate_limits_take_whole_batches_or_nothing() {
        let p = policy();
        let mut parser = EnvelopeParser::new();
        let one = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
        let three = br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"},{"jsonrpc":"2.0","id":3,"method":"ping"}]"#;
        // A burst of 2: a batch of three is refused and takes nothing...
        let env = parser.parse(three).unwrap();
        let r = rate_limit(429, &p, 0, 0, &env).unwrap();
        assert_eq!(
            (r.status, r.decision),
            (429, crate::audit::entry::Decision::RateLimited)
        );
        assert!(r.headers.starts_with("Retry-After: "));
        drop(env);
        // ...so two single requests still pass, and the third does not.
        for _ in 0..2 {
            let env = parser.parse(one).unwrap();
            assert!(rate_limit(200, &p, 0, 0, &env).is_none());
        }
        let env = parser.parse(one).unwrap();
        assert_eq!(rate_limit(200, &p, 0, 0, &env).unwrap().status, 200);
        // Notifications are never limited.
        drop(env);
        let env = parser
            .parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .unwrap();
        assert!(rate_limit(200, &p, 0, 0, &env).is_none());
    }

    #[test]
    fn sessions_open_only_for_their_agent_and_upstream() {
        let p = policy();
        let keys = SessionKeys::new(Some(b"a-session-secret-a-session-secret")).unwrap();
        let token = keys.seal("bot", "a", b"up-1").unwrap();
        let mut cache = ConnCache::default();
        assert_eq!(
            open_session(&keys, &p, 0, 0, token.as_bytes(), &mut cache),
            Some(&b"up-1"[..])
        );
        assert_eq!(
            open_session(&keys, &p, 0, 1, token.as_bytes(), &mut cache),
            None
        );
        assert_eq!(
            open_session(&keys, &p, 0, 0, b"sg1.forged", &mut cache),
            None
        );
        // After a token that failed to open, nothing is left to match: not an empty token,
        // and the good one is opened again.
        assert_eq!(open_session(&keys, &p, 0, 0, b"", &mut cache), None);
        assert!(cache.token_session.is_empty() && cache.token_agent.is_empty());
        assert_eq!(
            open_session(&keys, &p, 0, 0, token.as_bytes(), &mut cache),
            Some(&b"up-1"[..])
        );
    }

    #[test]
    fn a_call_passes_authorization_limits_and_its_session_in_turn() {
        let p = policy();
        let keys = SessionKeys::new(Some(b"a-session-secret-a-session-secret")).unwrap();
        let mut parser = EnvelopeParser::new();
        let mut cache = ConnCache::default();
        let plain = head("POST /mcp/a HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut call = |h: &Head, body: &[u8]| {
            let env = parser.parse(body).unwrap();
            let limiter = Limiter::default();
            let r = ready(admit_call(
                &limiter,
                429,
                &keys,
                &p,
                0,
                0,
                h,
                Some(&env),
                &mut cache,
            ));
            r.map(|s| s.map(<[u8]>::to_vec)).map_err(|r| r.status)
        };
        let echo = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}"#;
        let sleep = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"sleep"}}"#;
        // Refused by policy (a JSON-RPC error: HTTP 200), taking no token.
        assert_eq!(call(&plain, sleep), Err(200));
        // Allowed, no session yet.
        assert_eq!(call(&plain, echo), Ok(None));
        // A token for another upstream does not open here.
        let other = keys.seal("bot", "b", b"up-b").unwrap();
        let with = |t: &str| {
            head(&format!(
                "POST /mcp/a HTTP/1.1\r\nHost: x\r\nMcp-Session-Id: {t}\r\n\r\n"
            ))
        };
        assert_eq!(call(&with(&other), echo), Err(404));
        // The burst of 2 is spent by the allowed call and the one refused at its session.
        let mine = keys.seal("bot", "a", b"up-a").unwrap();
        assert_eq!(call(&with(&mine), echo), Err(429));
    }

    #[test]
    fn the_audit_gate_closes_only_when_told_and_failing() {
        use std::sync::atomic::Ordering;
        assert!(audit_available(None).is_ok());
        let channel = Arc::new(crate::audit::writer::Channel::new(1 << 16));
        let open = AuditSink::new(0, channel.clone(), false, 4096);
        let closed = AuditSink::new(0, channel.clone(), true, 4096);
        assert!(audit_available(Some(&closed)).is_ok(), "not failing yet");
        channel.failing.store(true, Ordering::Release);
        assert!(
            audit_available(Some(&open)).is_ok(),
            "fail-open keeps serving"
        );
        assert_eq!(audit_available(Some(&closed)).unwrap_err().status, 503);
    }
}
