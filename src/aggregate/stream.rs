//! Server-to-client traffic: a routed request's event stream relayed event by event, and the
//! GET stream merging every upstream's.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Instant;

use serde_json::{Map, Value, json};

use crate::audit::entry::Decision as AuditDecision;
use crate::http::body::BodyError;
use crate::http::conn::Conn;
use crate::http::response;
use crate::http::sse::{self, SseSplitter};
use crate::mcp::envelope::Message;
use crate::mcp::jsonrpc;
use crate::mcp::lists::{LIST_CHANGED, SUBSCRIPTION_ID, list_changed_events, subscription_meta};
use crate::mcp::session::MultiSession;
use crate::policy::live::{VIEW_CHECK, ViewChange, ViewWatch};
use crate::reply::Reply;
use crate::upstream::client::{UpResponse, join_all, send};

use super::names::{Answer, Rewrite, map_task, scoped_uri};
use super::request::{
    Fut, Outcome, Request, View, upstream_failed, write, write_bytes, write_chunk,
};
use super::session::{expired, joined, rejoin};

/// Relays a routed call's answer: JSON read whole and rewritten, or an event stream event by
/// event.
pub(super) async fn relay(
    req: &Request<'_>,
    client: &mut Conn,
    mut resp: UpResponse,
    rewrite: &Rewrite,
    m: &Message<'_>,
    i: usize,
    upstream_us: Option<u64>,
) -> Result<Outcome, Outcome> {
    let status = resp.status();
    if !resp.is_event_stream() {
        let limit = req.core.config.max_upstream_message;
        let body = match resp.read_all(req.deadline(), limit).await {
            Ok(b) => b,
            Err(why) => {
                let r = Reply::error(
                    502,
                    jsonrpc::UPSTREAM_UNAVAILABLE,
                    format!("upstream {:?} {why}", rewrite.upstream),
                );
                req.note_failure(i, r.message());
                return write(req, client, upstream_failed(m.id, r, i)).await;
            }
        };
        resp.finish(req.ups());
        let body = if body.is_empty() {
            body
        } else {
            match req.filter_lists(i, rewrite.apply(&body)) {
                Some(b) => b,
                None => {
                    let r = Reply::error(
                        502,
                        jsonrpc::UPSTREAM_UNAVAILABLE,
                        format!(
                            "upstream {:?} answered with something that may list hidden items and is not JSON; not relayed",
                            rewrite.upstream
                        ),
                    );
                    return write(req, client, upstream_failed(m.id, r, i)).await;
                }
            }
        };
        let mut reply = Reply::json(status, body);
        reply.upstream = Some(i);
        if status >= 500 {
            reply.decision = AuditDecision::UpstreamError;
        }
        let mut out = write(req, client, reply).await;
        match &mut out {
            Ok(o) | Err(o) => o.upstream_us = upstream_us,
        }
        return out;
    }
    let mut outcome = Outcome {
        status,
        upstream: Some(i),
        upstream_us,
        keep_alive: !req.close,
        ..Outcome::default()
    };
    let _gauge = crate::metrics::StreamGauge::open(&req.core.stats.metrics.sse_streams);
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n",
        response::reason(status)
    );
    if req.close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    if write_bytes(client, head.into_bytes()).await.is_err() {
        outcome.keep_alive = false;
        return Err(outcome);
    }
    // Every read has a deadline (an event that started must end within the upstream timeout;
    // between events the stream may pause up to SCOPEGATE_STREAM_IDLE_MS), events are bounded
    // by SCOPEGATE_MAX_UPSTREAM_MESSAGE, and the agent is watched while the upstream is quiet.
    let config = &req.core.config;
    let mut sse = SseSplitter::new(config.max_upstream_message);
    let mut watch = true;
    let mut answered = false;
    let mut event_deadline: Option<Instant> = None;
    let failure = loop {
        let mut out = Vec::new();
        let mut too_large = false;
        loop {
            match sse.next_event() {
                Ok(Some(event)) => {
                    event_deadline = None;
                    req.core.list_cache.saw(req.upstream_name(i), event);
                    let parts = sse::event_parts(event);
                    let data = match parts.data.map(|d| req.filter_lists(i, rewrite.apply(&d))) {
                        Some(None) => continue,
                        Some(Some(d)) => Some(d),
                        None => None,
                    };
                    if data.is_none() && parts.other.is_empty() {
                        continue;
                    }
                    if !answered {
                        answered = data.as_deref().is_some_and(is_answer);
                    }
                    // Event ids of several upstreams would collide: not relayed.
                    sse::write_event(&parts.other, None, data.as_deref(), &mut out);
                }
                Ok(None) => break,
                Err(_) => {
                    too_large = true;
                    break;
                }
            }
        }
        if !out.is_empty() && write_chunk(client, &out).await.is_err() {
            outcome.keep_alive = false;
            return Err(outcome);
        }
        if too_large {
            break Some(format!(
                "sent an event over {} bytes (SCOPEGATE_MAX_UPSTREAM_MESSAGE)",
                config.max_upstream_message
            ));
        }
        // An event that has begun must end within the upstream timeout (one deadline for the
        // whole event, however it trickles in); between events the stream may pause.
        if sse.pending() > 0 && event_deadline.is_none() {
            event_deadline = Some(Instant::now() + config.upstream_timeout);
        }
        let wait = if event_deadline.is_some() {
            config.upstream_timeout
        } else {
            config.stream_idle
        };
        let deadline = event_deadline.unwrap_or_else(|| Instant::now() + config.stream_idle);
        match resp.next_watching(client, &mut watch, Some(deadline)).await {
            Ok(Some(piece)) => sse.push(&piece),
            Ok(None) => break None,
            Err(BodyError::PeerGone) => {
                outcome.reason = Some("the agent closed the connection mid-answer".into());
                outcome.keep_alive = false;
                return Err(outcome);
            }
            Err(BodyError::TimedOut) => {
                break Some(format!(
                    "sent nothing for {} ms mid-answer",
                    wait.as_millis()
                ));
            }
            Err(e) => break Some(e.message()),
        }
    };
    let mut tail = Vec::new();
    if let Some(why) = failure {
        // Tell the agent in-band and end the stream properly: its connection stays usable.
        let why = format!("upstream {:?} {why}", rewrite.upstream);
        req.note_failure(i, &why);
        if !answered {
            let error = jsonrpc::error_body(m.id, jsonrpc::UPSTREAM_UNAVAILABLE, &why);
            sse::write_event(&[b"event: message"], None, Some(&error), &mut tail);
        }
        outcome.decision = AuditDecision::UpstreamError;
        outcome.reason = Some(why);
    } else {
        resp.finish(req.ups());
    }
    if !tail.is_empty() && write_chunk(client, &tail).await.is_err() {
        outcome.keep_alive = false;
        return Err(outcome);
    }
    if write_bytes(client, b"0\r\n\r\n".to_vec()).await.is_err() {
        outcome.keep_alive = false;
        return Err(outcome);
    }
    Ok(outcome)
}

/// Whether an event's data is a JSON-RPC response (the answer a routed request waits for).
pub(super) fn is_answer(data: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<Value>(data),
        Ok(Value::Object(m)) if m.contains_key("id") && !m.contains_key("method")
    )
}

/// GET: one event stream for the agent, merged from every joined upstream's.
pub(super) async fn get_stream(
    req: &Request<'_>,
    client: &mut Conn,
    session: &MultiSession,
) -> Result<Outcome, Outcome> {
    let targets = joined(req, session);
    let futures: Vec<Fut<'_, Option<(usize, UpResponse)>>> = targets
        .iter()
        .map(|(i, s)| {
            let i = *i;
            Box::pin(async move {
                let mut sid = s.clone();
                // Twice at most: once more on a new session when the upstream's expired.
                for _ in 0..2 {
                    let r = req.up_request("GET", b"", Some(&sid));
                    let mut resp = match send(req.ups(), i, &r, req.fanout_deadline()).await {
                        Ok(resp) => resp,
                        Err(e) => {
                            req.note_failure(i, e.message());
                            return None;
                        }
                    };
                    let status = resp.status();
                    if status == 200 && resp.is_event_stream() {
                        return Some((i, resp));
                    }
                    let body = resp.read_all(req.fanout_deadline(), 64 * 1024).await;
                    resp.finish(req.ups());
                    if !expired(status, &sid, &body.unwrap_or_default()) {
                        return None;
                    }
                    sid = rejoin(req, i, &sid).await.ok()?;
                }
                None
            }) as Fut<'_, _>
        })
        .collect();
    let streams: Vec<(usize, UpResponse)> = join_all(futures).await.into_iter().flatten().collect();
    if streams.is_empty() {
        let mut r = Reply::error(
            405,
            jsonrpc::INVALID_REQUEST,
            "no upstream offers an event stream",
        );
        r.headers = "Allow: POST, DELETE\r\n".into();
        return write(req, client, r).await;
    }
    merge(req, client, streams, None).await
}

/// A merged `subscriptions/listen` stream (2026-07-28): each upstream's acknowledgement is
/// held back until all have come (or the fan-out deadline passed) and the agent gets one, the
/// union of what they agreed to ([`merged_ack`]); each upstream's closing result is dropped
/// and the agent gets one when the last has ended.
pub(super) struct Listen {
    /// The listen request's id: the subscription's id on every frame.
    pub(super) id: Value,
    /// The list changes the agent asked for: a reload that changes its view is told only as
    /// those.
    pub(super) asked: Vec<&'static str>,
}

/// One event stream for the agent, merged from the upstreams' `streams` (GET streams, or the
/// answers to `subscriptions/listen`).
pub(super) async fn merge(
    req: &Request<'_>,
    client: &mut Conn,
    streams: Vec<(usize, UpResponse)>,
    listen: Option<Listen>,
) -> Result<Outcome, Outcome> {
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n",
    );
    if req.close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut outcome = Outcome {
        status: 200,
        keep_alive: false,
        ..Outcome::default()
    };
    if write_bytes(client, head.into_bytes()).await.is_err() {
        return Err(outcome);
    }
    let _gauge = crate::metrics::StreamGauge::open(&req.core.stats.metrics.sse_streams);
    // Readers push rewritten events into one queue; the writer sends them on. All of them run
    // on this task: whenever any is woken, every one is polled again. The queue holds at most
    // SCOPEGATE_MAX_UPSTREAM_MESSAGE bytes: past that the readers wait for the agent.
    let limit = req.core.config.max_upstream_message;
    let queue: Rc<RefCell<MergedQueue>> = Rc::new(RefCell::new(MergedQueue {
        events: VecDeque::new(),
        bytes: 0,
        open: streams.len(),
        acks: Vec::new(),
        settled: 0,
    }));
    let listening = listen.is_some();
    let owner = req.owner();
    // The policy a reload installed since the stream opened, when it changed what the agent
    // may see: from then on the readers filter by it.
    let current: Rc<RefCell<Option<View>>> = Rc::new(RefCell::new(None));
    let mut readers: Vec<Option<Fut<'_, ()>>> = streams
        .into_iter()
        .map(|(i, mut resp)| {
            let queue = queue.clone();
            let current = current.clone();
            let rewrite = Rewrite {
                upstream: req.upstream_name(i).to_owned(),
                owner,
                answer: Answer::Other,
            };
            Some(Box::pin(async move {
                let mut sse = SseSplitter::new(limit);
                // Whether this upstream acknowledged its subscription (once: a repeat is
                // dropped, and cannot grow what is held for the agent).
                let mut acked = false;
                let mut event_started: Option<Instant> = None;
                'read: loop {
                    loop {
                        match sse.next_event() {
                            Ok(Some(event)) => {
                                event_started = None;
                                req.core.list_cache.saw(req.upstream_name(i), event);
                                let parts = sse::event_parts(event);
                                let data = match parts.data.map(|d| {
                                    let view = current.borrow();
                                    req.filter_lists_under(view.as_ref(), i, rewrite.apply(&d))
                                }) {
                                    Some(None) => continue,
                                    Some(Some(d)) => Some(d),
                                    None => None,
                                };
                                if data.is_none() && parts.other.is_empty() {
                                    continue;
                                }
                                if listening && let Some(d) = &data {
                                    match listen_event(d, &rewrite.upstream, &owner) {
                                        ListenEvent::Ack(filter) => {
                                            if !acked {
                                                acked = true;
                                                let mut q = queue.borrow_mut();
                                                q.acks.push(filter);
                                                q.settled += 1;
                                            }
                                            continue;
                                        }
                                        ListenEvent::End => continue,
                                        ListenEvent::Other => {}
                                    }
                                }
                                let mut out = Vec::new();
                                sse::write_event(&parts.other, None, data.as_deref(), &mut out);
                                let mut q = queue.borrow_mut();
                                q.bytes += out.len();
                                q.events.push_back(out);
                            }
                            Ok(None) => break,
                            Err(_) => {
                                req.note_failure(
                                    i,
                                    &format!(
                                        "sent an event over {limit} bytes on its GET stream (SCOPEGATE_MAX_UPSTREAM_MESSAGE)"
                                    ),
                                );
                                break 'read;
                            }
                        }
                    }
                    // Backpressure: wait while the agent has not taken what is queued.
                    std::future::poll_fn(|_| {
                        if queue.borrow().bytes < limit {
                            Poll::Ready(())
                        } else {
                            Poll::Pending
                        }
                    })
                    .await;
                    // A quiet stream waits as long as the agent stays (the writer watches
                    // it); an event that has begun must end within the upstream timeout.
                    if sse.pending() > 0 && event_started.is_none() {
                        event_started = Some(Instant::now());
                    }
                    let deadline = event_started.map(|t| t + req.core.config.upstream_timeout);
                    match resp.next(deadline).await {
                        Ok(Some(piece)) => sse.push(&piece),
                        Ok(None) => break,
                        Err(why) => {
                            req.note_failure(i, &format!("its GET stream {why}"));
                            break;
                        }
                    }
                }
                let mut q = queue.borrow_mut();
                q.open -= 1;
                if !acked {
                    q.settled += 1;
                }
            }) as Fut<'_, ()>)
        })
        .collect();
    let writer_queue = queue.clone();
    let writer_current = current.clone();
    let mut next_check = Instant::now() + VIEW_CHECK;
    let expected = readers.len();
    let view = match (&req.core.live_policy, req.policy, req.agent) {
        (Some(live), Some(p), Some(a)) => Some(ViewWatch::new(live, p, a)),
        _ => None,
    };
    // What a changed view is told as: every list on a GET stream; on a listen stream only the
    // changes the agent asked for, with the subscription's id.
    let (kinds, meta): (Vec<&str>, Option<String>) = match &listen {
        None => (LIST_CHANGED.iter().map(|(_, m)| *m).collect(), None),
        Some(l) => (
            l.asked.clone(),
            Some(subscription_meta(l.id.to_string().as_bytes())),
        ),
    };
    let writer = async move {
        let mut watch = true;
        if let Some(l) = &listen {
            // The acknowledgement comes first: once every upstream's is in (or none can come).
            let all_in = std::future::poll_fn(|_| {
                let q = writer_queue.borrow();
                if q.settled >= expected {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            });
            let wait = req
                .fanout_deadline()
                .saturating_duration_since(Instant::now());
            let _ = crate::timer::timeout(wait, all_in).await;
            let ack = merged_ack(&l.id, &writer_queue.borrow().acks);
            let mut out = Vec::new();
            sse::write_event(&[b"event: message"], None, Some(&ack), &mut out);
            if write_chunk(client, &out).await.is_err() {
                return Ended::AgentGone;
            }
        }
        loop {
            // At a drain the merged stream ends as if every upstream's had: what is queued
            // goes out, then the end (no request waits on it; its agent comes back with
            // Last-Event-ID, or listens again).
            let draining = crate::core::shutting_down();
            let next = std::future::poll_fn(|_| {
                let mut q = writer_queue.borrow_mut();
                match q.events.pop_front() {
                    Some(e) => {
                        q.bytes -= e.len();
                        Poll::Ready(Some(e))
                    }
                    None if q.open == 0 || draining => Poll::Ready(None),
                    None => Poll::Pending,
                }
            });
            // Now and then (and whatever the upstreams send meanwhile), the policy: a reload
            // that changes what the agent may see is told as list_changed and filters what
            // follows; one that removes the agent ends the stream.
            if let Some(v) = &view
                && Instant::now() >= next_check
            {
                next_check = Instant::now() + VIEW_CHECK;
                match v.check() {
                    ViewChange::Same => {}
                    ViewChange::Changed(policy, agent) => {
                        *writer_current.borrow_mut() = Some((policy, agent));
                        let events = list_changed_events(&kinds, meta.as_deref());
                        if write_chunk(client, &events).await.is_err() {
                            return Ended::AgentGone;
                        }
                    }
                    ViewChange::Revoked => {
                        // The agent is no longer in the policy: its stream ends, properly.
                        let _ = write_bytes(client, b"0\r\n\r\n".to_vec()).await;
                        return Ended::Revoked;
                    }
                }
            }
            // Wakes now and then: for the policy, and to notice a drain.
            let tick = async {
                if Instant::now() >= next_check {
                    next_check = Instant::now() + VIEW_CHECK;
                }
                let wait = next_check.saturating_duration_since(Instant::now());
                crate::timer::sleep(wait).await
            };
            // While nothing is to be written, watch the agent: a closed stream releases every
            // upstream stream at once.
            let next = monoio::select! {
                e = next => e,
                _ = client.stream.readable(false), if watch => {
                    match client.peer_closed() {
                        Some(true) => return Ended::AgentGone,
                        Some(false) => watch = false,
                        None => {}
                    }
                    continue;
                }
                _ = tick => continue,
            };
            let Some(event) = next else {
                if let Some(l) = &listen {
                    let mut chunk = Vec::new();
                    let end = json!({"jsonrpc": "2.0", "id": l.id,
                        "result": {"_meta": {SUBSCRIPTION_ID: l.id}, "resultType": "complete"}});
                    let end = end.to_string().into_bytes();
                    sse::write_event(&[b"event: message"], None, Some(&end), &mut chunk);
                    if write_chunk(client, &chunk).await.is_err() {
                        return Ended::AgentGone;
                    }
                }
                return match write_bytes(client, b"0\r\n\r\n".to_vec()).await {
                    Ok(()) => Ended::Clean,
                    Err(_) => Ended::AgentGone,
                };
            };
            if write_chunk(client, &event).await.is_err() {
                return Ended::AgentGone;
            }
        }
    };
    let mut writer = pin!(writer);
    let ended = std::future::poll_fn(|cx| {
        for slot in readers.iter_mut() {
            if let Some(r) = slot
                && r.as_mut().poll(cx).is_ready()
            {
                *slot = None;
            }
        }
        writer.as_mut().poll(cx)
    })
    .await;
    match ended {
        Ended::Clean => {}
        Ended::AgentGone => outcome.reason = Some("the agent closed the stream".into()),
        Ended::Revoked => outcome.reason = Some("the agent was removed from the policy".into()),
    }
    Ok(outcome)
}

/// How a merged stream ended.
enum Ended {
    /// Every upstream stream ended and the agent was told.
    Clean,
    AgentGone,
    /// A reload removed the agent from the policy.
    Revoked,
}

/// The merged stream's events waiting for the agent.
pub(super) struct MergedQueue {
    events: VecDeque<Vec<u8>>,
    /// Bytes in `events`.
    bytes: usize,
    /// Upstream streams still open.
    open: usize,
    /// The upstreams' acknowledgements of a `subscriptions/listen`: their `notifications`.
    acks: Vec<Value>,
    /// Upstream streams that acknowledged, or ended without.
    settled: usize,
}

enum ListenEvent {
    Ack(Value),
    End,
    Other,
}

/// What an event on a listen stream is: an upstream's acknowledgement (its agreed filter, URIs
/// already scoped), its closing result, or a notification for the agent.
fn listen_event(data: &[u8], upstream: &str, owner: &[u8; 32]) -> ListenEvent {
    let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(data) else {
        return ListenEvent::Other;
    };
    if m.get("method").and_then(Value::as_str) == Some("notifications/subscriptions/acknowledged") {
        let mut filter = m
            .get_mut("params")
            .and_then(|p| p.get_mut("notifications"))
            .map(Value::take)
            .unwrap_or(Value::Null);
        if let Some(Value::Array(uris)) = filter.get_mut("resourceSubscriptions") {
            for uri in uris {
                if let Value::String(u) = uri {
                    *u = scoped_uri(upstream, u);
                }
            }
        }
        if let Some(Value::Array(ids)) = filter.get_mut("taskIds") {
            for id in ids.iter_mut() {
                if let Value::String(t) = id {
                    *t = map_task(owner, upstream, t);
                }
            }
        }
        return ListenEvent::Ack(filter);
    }
    if m.contains_key("id") && !m.contains_key("method") {
        return ListenEvent::End;
    }
    ListenEvent::Other
}

/// One acknowledgement for the agent: what any upstream agreed to send (each only sends what
/// it agreed to), every resource some upstream agreed to follow.
fn merged_ack(id: &Value, acks: &[Value]) -> Vec<u8> {
    let mut filter = Map::new();
    let mut uris = Vec::new();
    let mut tasks = Vec::new();
    for ack in acks {
        let Value::Object(a) = ack else { continue };
        for (k, v) in a {
            match (k.as_str(), v) {
                ("resourceSubscriptions", Value::Array(list)) => uris.extend(list.iter().cloned()),
                ("taskIds", Value::Array(list)) => tasks.extend(list.iter().cloned()),
                (_, Value::Bool(true)) => {
                    filter.insert(k.clone(), Value::Bool(true));
                }
                _ => {}
            }
        }
    }
    if !uris.is_empty() {
        filter.insert("resourceSubscriptions".into(), Value::Array(uris));
    }
    if !tasks.is_empty() {
        filter.insert("taskIds".into(), Value::Array(tasks));
    }
    json!({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
        "params": {"_meta": {SUBSCRIPTION_ID: id}, "notifications": filter}})
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_merge_to_what_any_upstream_agreed() {
        let acks = [
            json!({"toolsListChanged": true, "resourceSubscriptions": ["scopegate://a/memo://x"]}),
            json!({"toolsListChanged": true, "promptsListChanged": true}),
        ];
        let ack: Value = serde_json::from_slice(&merged_ack(&json!(7), &acks)).unwrap();
        assert_eq!(ack["params"]["_meta"][SUBSCRIPTION_ID], 7);
        assert_eq!(
            ack["params"]["notifications"],
            json!({"toolsListChanged": true, "promptsListChanged": true,
                "resourceSubscriptions": ["scopegate://a/memo://x"]})
        );
    }
}
