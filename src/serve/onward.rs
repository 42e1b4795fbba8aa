//! The last stage: a request that passed every gate goes on, either to the aggregate endpoint
//! (which runs the gates per message itself) or to one upstream, and what came of it is noted
//! in the audit draft.

use super::answer::{KeepAlive, answer};
use super::gate;
use super::memory::ConnCache;
use super::record::Draft;
use crate::audit::entry::Decision as AuditDecision;
use crate::core::Passed;
use crate::forward::{self, Exchange, ForwardError, Plan, ReloadNotice};
use crate::http::conn::Conn;
use crate::mcp::envelope::Envelope;
use crate::mcp::lists::ListKind;
use crate::mcp::lists::{LIST_CHANGED, list_changes_asked, subscription_meta};
use crate::policy::Policy;
use crate::policy::decide::{self, Target};
use crate::policy::live::ViewWatch;
use crate::upstream::Transport;
use crate::upstream::client::{UpRequest, Upstreams};
use crate::upstream::stdio::Stdio;
use std::time::Instant;

/// A stdio server that failed during the exchange (it exited, broke the protocol, could not
/// start): the audit says `upstream_error` and why. The bridge says so in a header of its
/// answer, or by cutting an answer short after the process ended.
fn stdio_failure(
    stdio: &Stdio,
    session: Option<&[u8]>,
    exchange: &Exchange,
    relayed: &Result<forward::Relayed, ForwardError>,
) -> Option<String> {
    let cut = match relayed {
        Ok(r) => r.failure.is_some(),
        Err(ForwardError::MidResponse(_)) => true,
        Err(_) => false,
    };
    if cut {
        session.and_then(|s| stdio.ended(s))
    } else {
        exchange.stdio_failure.clone()
    }
}

/// `/mcp` with several upstreams: authorization, limits and routing per message inside.
pub async fn to_aggregate(
    p: &Passed<'_>,
    client: &mut Conn,
    draft: &mut Draft,
) -> Result<KeepAlive, ()> {
    let result = Box::pin(crate::aggregate::handle(p, client)).await;
    let (Ok(outcome) | Err(outcome)) = &result;
    draft.aggregate = true;
    draft.status = outcome.status;
    draft.decision = outcome.decision;
    draft.reason = outcome.reason.clone();
    draft.upstream = outcome.upstream;
    draft.upstream_us = outcome.upstream_us;
    match result {
        Ok(o) if o.keep_alive => Ok(KeepAlive::Yes),
        Ok(_) => Ok(KeepAlive::No),
        Err(_) => Err(()),
    }
}

/// One upstream: in policy mode the call's own gates first ([`gate::admit_call`]); then the
/// request forwarded as received (with the plan's changes) and the answer relayed as it comes.
pub async fn to_upstream(
    p: &mut Passed<'_>,
    upstream: usize,
    exchange: &mut Exchange,
    client: &mut Conn,
    draft: &mut Draft,
) -> Result<KeepAlive, ()> {
    // Taken by reference and looked at in place: the request is not copied into this frame,
    // which a long event stream keeps for its whole life.
    let (core, head, policy, agent, close) = (p.core, p.head, p.policy, p.agent, p.close);
    let body = std::mem::take(&mut p.body);
    let (env, upstreams, peer) = (p.env.as_ref(), p.upstreams, p.peer);
    let method = head.method();
    let request_id = env.and_then(|e| e.single()?.id);
    let mut upstream_session = None;
    if let (Some(policy), Some(agent), Some(env)) = (policy, agent, env)
        && policy.integrity.is_active()
    {
        list_unseen(p, policy, agent, upstream, env, &body, &mut draft.cache).await;
    }
    if let (Some(policy), Some(agent)) = (policy, agent) {
        let status = core.config.rate_limit_status;
        let (limiter, sessions, cache) = (&core.limiter, &core.sessions, &mut draft.cache);
        let call = gate::admit_call(
            limiter, status, sessions, policy, agent, upstream, head, env, cache,
        );
        match call.await {
            Ok(session) => upstream_session = session,
            Err(reply) => return answer(draft, client, method, request_id, &reply, close).await,
        }
    }
    let messages = env.map_or(&[][..], |e| e.messages());
    let traceparent = p.trace.map(|t| t.header());
    let mut plan = Plan::for_messages(messages);
    plan.traceparent = traceparent.as_ref().map(|t| &t[..]);
    plan.request_id = request_id;
    plan.strip_hidden = policy.is_some_and(|p| {
        env.is_some_and(|e| e.messages().iter().any(|m| p.integrity.strips(m.method)))
    });
    plan.scan_is_error = draft.active
        && env
            .and_then(|e| e.single())
            .is_some_and(|m| m.method == Some("tools/call"));
    let seal;
    let visible;
    if let (Some(policy), Some(agent)) = (policy, agent) {
        let agent_id = policy.agents[agent].id.as_str();
        let upstream_name = upstreams[upstream].name.as_str();
        let sessions = &core.sessions;
        seal = move |id: &[u8]| sessions.seal(agent_id, upstream_name, id);
        visible = move |kind: ListKind, item: &mut serde_json::Value| {
            decide::vet(policy, agent, upstream, kind, item)
        };
        plan.strip_credentials = true;
        plan.agent_id = Some(agent_id);
        plan.upstream_session = upstream_session;
        plan.seal_session = Some(&seal);
        // Every list the agent can receive is filtered: JSON answers to its list requests,
        // and any list result on an event stream (replays included).
        plan.visible = Some(&visible);
        if let Some(live) = &core.live_policy
            && (method == b"GET" || plan.long_lived)
        {
            plan.reload = Some(reload_notice(live, policy, agent, &body, request_id));
        }
    }
    let relayed = forward::forward(
        core,
        exchange,
        client,
        head,
        body,
        &upstreams[upstream],
        peer,
        close,
        &plan,
    )
    .await;
    draft.upstream_us = exchange.upstream_us;
    draft.is_error = exchange.is_error.found;
    let stdio_failed = match &upstreams[upstream].transport {
        Transport::Stdio(stdio) => stdio_failure(stdio, upstream_session, exchange, &relayed),
        _ => None,
    };
    let result = match relayed {
        Ok(relayed) => {
            draft.status = exchange.status;
            if let Some(why) = relayed.failure {
                draft.decision = AuditDecision::UpstreamError;
                draft.reason = Some(why);
            }
            Ok(if relayed.keep_alive {
                KeepAlive::Yes
            } else {
                KeepAlive::No
            })
        }
        Err(ForwardError::BeforeResponse(reply)) => {
            let reply = reply.upstream_error(draft.upstream);
            answer(draft, client, method, request_id, &reply, close).await
        }
        Err(ForwardError::MidResponse(why)) => {
            draft.status = exchange.status;
            draft.decision = AuditDecision::UpstreamError;
            draft.reason = Some(format!("the response was cut off mid-body: {why}"));
            Err(())
        }
        Err(ForwardError::AgentGone) => {
            // The agent's doing: the call was allowed and relayed until it left.
            draft.status = exchange.status;
            draft.reason = Some(
                "the agent closed the connection, or took less than 64 KiB per \
                 SCOPEGATE_SEND_TIMEOUT_MS, while the answer was relayed"
                    .into(),
            );
            Err(())
        }
    };
    if let Some(why) = stdio_failed {
        draft.decision = AuditDecision::UpstreamError;
        draft.reason = Some(why);
    }
    result
}

/// With integrity checks on, a call of a tool (or a prompt) that no list has shown yet
/// ([`decide::UNSEEN`]): the upstream's whole list is walked first, on the agent's session, and
/// every definition judged, so the call is decided on what the upstream says the tool is. A
/// failure is logged, and the call is then refused as not listed.
async fn list_unseen(
    p: &Passed<'_>,
    policy: &Policy,
    agent: usize,
    upstream: usize,
    env: &Envelope<'_>,
    body: &[u8],
    cache: &mut ConnCache,
) {
    for m in env.messages() {
        let target = Target::of(m, env.arguments(m), env.notifications(m));
        let (def_kind, name) = match target {
            Target::Tool { name, .. } => (crate::integrity::Kind::Tool, name),
            Target::Prompt(name) => (crate::integrity::Kind::Prompt, name),
            _ => continue,
        };
        // The common case, a verdict made when the tool was listed, costs one lookup; the
        // rules are asked only before walking a list (a call they refuse never causes one).
        if !policy.integrity.unseen(upstream, def_kind, name)
            || !decide::is_unseen(&decide::authorize(policy, agent, upstream, &target))
        {
            continue;
        }
        let sessions = &p.core.sessions;
        let session = p
            .head
            .get("mcp-session-id")
            .and_then(|t| gate::open_session(sessions, policy, agent, upstream, t, cache))
            .map(<[u8]>::to_vec);
        let c = &p.core.config;
        let ups = Upstreams {
            list: p.upstreams,
            pool: &p.core.pool,
            timeout: c.upstream_timeout,
            max_message: c.max_upstream_message,
        };
        let base = UpRequest {
            method: "POST",
            body: b"",
            session: session.as_deref(),
            protocol_version: p.head.get("mcp-protocol-version"),
            peer: p.peer,
            agent_id: Some(policy.agents[agent].id.as_str()),
            routing: Vec::new(),
        };
        // 2026-07-28: each request carries the agent's revision and capabilities (older
        // revisions' `_meta` is the call's own: a progress token, not the list's).
        let modern = base
            .protocol_version
            .is_some_and(crate::mcp::modern::is_modern);
        let meta = crate::aggregate::json::locate(body, &["params", "_meta"])
            .filter(|_| modern)
            .map(|(a, b)| &body[a..b]);
        let deadline = Instant::now() + c.upstream_timeout.min(c.aggregate_timeout);
        // Boxed: a walk is rare (a call to a tool no list has shown), and its state machine
        // would otherwise size every request's.
        let walked = policy
            .integrity
            .walk(ups, upstream, def_kind, &base, meta, deadline);
        if let Err(e) = Box::pin(walked).await {
            crate::warn!(
                "tool integrity: {} of upstream {:?}, to check a call, failed: {}",
                def_kind.list().method(),
                p.upstreams[upstream].name,
                e.message()
            );
        }
        // One walk per request: the others of a batch find the verdicts it made.
        return;
    }
}

/// What an open stream tells its agent when a reload changes what it may see: on a GET stream
/// every list change; on a `subscriptions/listen` stream only the changes it asked for, with
/// its subscription id.
fn reload_notice(
    live: &std::sync::Arc<crate::policy::live::LivePolicy>,
    policy: &crate::policy::Policy,
    agent: usize,
    body: &[u8],
    request_id: Option<crate::mcp::jsonrpc::Id<'_>>,
) -> ReloadNotice {
    let watch = ViewWatch::new(live, policy, agent);
    let Some(id) = request_id else {
        return ReloadNotice {
            watch,
            methods: LIST_CHANGED.iter().map(|(_, m)| *m).collect(),
            meta: None,
        };
    };
    let filter = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/params/notifications").cloned())
        .unwrap_or_default();
    let mut id_json = Vec::new();
    id.write_json(&mut id_json);
    ReloadNotice {
        watch,
        methods: list_changes_asked(&filter),
        meta: Some(subscription_meta(&id_json)),
    }
}
