//! Answers that may list what the agent must not see (policy mode): a JSON list answer read
//! whole and filtered, and event streams relayed event by event with every list result in
//! them filtered. The second covers what a request-by-request filter cannot: a batch holding a
//! list, and a GET stream with `Last-Event-ID` on which the upstream replays earlier answers
//! (an unfiltered list among them).

use std::time::Instant;

use bytes::Bytes;

use super::plan::{ForwardError, Leg, Relayed};
use super::respond::{flush, release_quiet, send, start_response, stream_buffers};
use crate::fmt::push_decimal;
use crate::http::body::{BodyError, BodyReader};
use crate::http::framing;
use crate::http::head::{self};
use crate::http::sse::{self, SseSplitter};
use crate::integrity::scan;
use crate::mcp::lists::{ListKind, Visible};
use crate::mcp::{jsonrpc, lists};
use crate::metrics::StreamGauge;
use crate::policy::live::{VIEW_CHECK, ViewChange};
use crate::policy::{Policy, decide};
use crate::reply::Reply;
use crate::timer::Until;
use crate::upstream::Upstream;
use std::sync::Arc;

fn invalid(upstream: &Upstream, why: &str) -> ForwardError {
    ForwardError::BeforeResponse(Reply::error(
        502,
        jsonrpc::UPSTREAM_UNAVAILABLE,
        format!("upstream {:?} {why}", upstream.name),
    ))
}

/// Reads a JSON answer whole (within `SCOPEGATE_MAX_UPSTREAM_MESSAGE`), filters every list in
/// it, and sends it with a length. An answer that cannot be read is refused (502) rather than
/// relayed unfiltered.
pub(super) async fn relay_filtered_json(
    Leg {
        core,
        ex,
        client,
        request,
        up,
        upstream,
        close_after,
        plan,
    }: Leg<'_, '_>,
) -> Result<(Relayed, bool), ForwardError> {
    let bad = |why: &str| invalid(upstream, why);
    let Some(visible) = plan.visible else {
        return Err(bad("internal: no visibility rule"));
    };
    let response = &ex.response;
    let framing = framing::response_framing(response, request.method())
        .map_err(|e| bad(&format!("sent an invalid response: {}", e.message())))?;
    let deadline = Instant::now() + core.config.upstream_timeout;
    let mut reader = BodyReader::new(framing);
    let body = reader
        .read_all(up, deadline, core.config.max_upstream_message)
        .await
        .map_err(|e| bad(&e.message()))?;
    let reusable = reader.left_clean(up)
        && response.minor_version == 1
        && !head::connection_has(response, "close");
    let filtered = if body.is_empty() {
        None
    } else {
        lists::filter_lists(&body, visible).map_err(|_| {
            bad("answered a list request with something that is not JSON; not relayed unfiltered")
        })?
    };
    let body = filtered.map_or_else(|| body.freeze(), Bytes::from);
    let body = match plan.strip_hidden.then(|| scan::strip_body(&body)).flatten() {
        Some(clean) => Bytes::from(clean),
        None => body,
    };

    let keep_client = !close_after && !crate::core::shutting_down();
    start_response(&mut ex.out, response, plan, upstream)?;
    let out = &mut ex.out;
    out.extend_from_slice(b"Content-Length: ");
    push_decimal(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if !keep_client {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    send(client, out, body)
        .await
        .map_err(|_| ForwardError::AgentGone)?;
    Ok((
        Relayed {
            keep_alive: keep_client,
            failure: None,
        },
        reusable,
    ))
}

/// Relays an event stream event by event. Each complete event is passed on as it was, unless
/// it may hold a list result ([`lists::may_hold_list`]): then its data is filtered (or, when
/// unreadable, the event is dropped). Events are bounded by `SCOPEGATE_MAX_UPSTREAM_MESSAGE`; an
/// event that has started must end within `SCOPEGATE_UPSTREAM_TIMEOUT_MS`; the answer to a POST
/// may pause between events for `SCOPEGATE_STREAM_IDLE_MS`. When the upstream fails after the
/// stream began, a POST's stream ends with a JSON-RPC error for its request (the agent is told,
/// and its connection stays usable).
pub(super) async fn relay_events(
    Leg {
        core,
        ex,
        client,
        request,
        up,
        upstream,
        close_after,
        plan,
    }: Leg<'_, '_>,
) -> Result<(Relayed, bool), ForwardError> {
    let config = &core.config;
    let framing = framing::response_framing(&ex.response, request.method())
        .map_err(|e| super::relay::bad_framing(upstream, e))?;
    let chunked = request.minor_version == 1;
    let keep_client = !close_after && !crate::core::shutting_down() && chunked;
    let keep_upstream =
        ex.response.minor_version == 1 && !head::connection_has(&ex.response, "close");
    start_response(&mut ex.out, &ex.response, plan, upstream)?;
    if chunked {
        ex.out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if !keep_client {
        ex.out.extend_from_slice(b"Connection: close\r\n");
    }
    ex.out.extend_from_slice(b"\r\n");

    // A long-lived stream: let go of the response head's share of the upstream buffer and read
    // the stream in small pieces (an idle stream should cost little memory).
    stream_buffers(ex, up);
    let _gauge = StreamGauge::open(&core.stats.metrics.sse_streams);

    let is_post = request.method() == b"POST";
    let idle_limit = is_post && !plan.long_lived;
    let mut body = BodyReader::new(framing);
    let mut splitter = SseSplitter::new(config.max_upstream_message);
    let mut events: Vec<u8> = Vec::new();
    let mut watch = true;
    let mut event_deadline: Option<Instant> = None;
    let mut next_check = Instant::now() + VIEW_CHECK;
    let mut answered = false;
    let written_before = client.written;
    // The policy a reload installed, when it changed what the agent may see: the agent, and
    // this upstream, as that policy numbers them. What follows is filtered by it.
    let mut refreshed: Option<(Arc<Policy>, usize, usize)> = None;
    let failure = loop {
        // Every event complete so far.
        let mut too_large = None;
        let fresh = refreshed.as_ref().map(|(p, a, u)| {
            move |kind: ListKind, item: &mut serde_json::Value| decide::vet(p, *a, *u, kind, item)
        });
        let visible: Option<Visible<'_>> = match &fresh {
            Some(f) => Some(f),
            None => plan.visible,
        };
        loop {
            match splitter.next_event() {
                Ok(Some(event)) => {
                    event_deadline = None;
                    if is_post && !answered {
                        answered = is_response_event(event);
                    }
                    core.list_cache.saw(&upstream.name, event);
                    pass_event(event, visible, plan.strip_hidden, &mut events);
                }
                Ok(None) => break,
                Err(sse::TooLarge(limit)) => {
                    too_large = Some(format!(
                        "sent an event over {limit} bytes (SCOPEGATE_MAX_UPSTREAM_MESSAGE)"
                    ));
                    break;
                }
            }
        }
        if let Some(why) = too_large {
            break Some(why);
        }
        // Bytes that are already here are read before anything is sent: a broken first chunk
        // then still gets a plain 502.
        match body.take(up) {
            Ok(Some(piece)) => {
                if plan.scan_is_error {
                    ex.is_error.feed(&piece);
                }
                splitter.push(&piece);
                continue;
            }
            Ok(None) if body.is_done() => break None,
            Ok(None) => {}
            Err(e) => break Some(e.message()),
        }
        // Send what is complete before waiting for more.
        write_events(&mut ex.out, &events, chunked);
        events.clear();
        flush(client, &mut ex.out)
            .await
            .map_err(|_| ForwardError::AgentGone)?;
        // A stream that stays open (GET, subscriptions/listen) looks up now and then, whatever
        // the upstream sends meanwhile:
        // - at a drain it ends, properly: no request waits on it, and its agent comes back (to
        //   the next process or another replica) with Last-Event-ID;
        // - the policy: a reload that changes what the agent may see is told as list_changed
        //   and filters what follows; one that removes the agent, or this upstream from its
        //   reach, ends the stream.
        if !idle_limit && Instant::now() >= next_check {
            next_check = Instant::now() + VIEW_CHECK;
            if crate::core::shutting_down() {
                break None;
            }
            if let Some(notice) = &plan.reload {
                match notice.watch.check() {
                    ViewChange::Same => {}
                    ViewChange::Changed(policy, agent) => {
                        let list = policy.upstreams();
                        let Some(u) = list
                            .iter()
                            .position(|u| u.name == upstream.name)
                            .filter(|&u| policy.may_use_upstream(agent, u))
                        else {
                            break None;
                        };
                        refreshed = Some((policy, agent, u));
                        events.extend_from_slice(&lists::list_changed_events(
                            &notice.methods,
                            notice.meta.as_deref(),
                        ));
                        continue;
                    }
                    ViewChange::Revoked => break None,
                }
            }
        }
        if splitter.pending() > 0 && event_deadline.is_none() {
            event_deadline = Some(Instant::now() + config.upstream_timeout);
        }
        let deadline =
            event_deadline.or_else(|| idle_limit.then(|| Instant::now() + config.stream_idle));
        // A stream that stays open wakes now and then to look up (above): at the thread's next
        // tick, a timer it shares, unless an event under way must end sooner.
        let until = match (idle_limit, deadline) {
            (false, None) => Until::NextTick,
            (false, Some(d)) => Until::At(d.min(next_check)),
            (true, deadline) => deadline.into(),
        };
        if !idle_limit {
            // A stream that stays open holds no buffers while it waits.
            release_quiet(&mut ex.out, up);
            events = Vec::new();
            splitter.release_if_empty();
        }
        match body.next_watching(up, client, &mut watch, until).await {
            Ok(Some(piece)) => {
                if plan.scan_is_error {
                    ex.is_error.feed(&piece);
                }
                splitter.push(&piece);
            }
            // The end (an unfinished last event is dropped, as an SSE reader would).
            Ok(None) => break None,
            Err(BodyError::PeerGone) => return Err(ForwardError::AgentGone),
            // Time to look at the policy (above).
            Err(BodyError::TimedOut)
                if event_deadline.is_none_or(|d| Instant::now() < d) && !idle_limit => {}
            Err(BodyError::TimedOut) if event_deadline.is_some() => {
                break Some(format!(
                    "did not finish an event within {} ms (SCOPEGATE_UPSTREAM_TIMEOUT_MS)",
                    config.upstream_timeout.as_millis()
                ));
            }
            Err(BodyError::TimedOut) => {
                break Some(format!(
                    "sent no event for {} ms (SCOPEGATE_STREAM_IDLE_MS)",
                    config.stream_idle.as_millis()
                ));
            }
            Err(e) => break Some(e.message()),
        }
    };
    let Some(why) = failure else {
        write_events(&mut ex.out, &events, chunked);
        if chunked {
            ex.out.extend_from_slice(framing::LAST_CHUNK);
        }
        flush(client, &mut ex.out)
            .await
            .map_err(|_| ForwardError::AgentGone)?;
        return Ok((
            Relayed {
                keep_alive: keep_client,
                failure: None,
            },
            keep_upstream && body.left_clean(up),
        ));
    };
    let name = &upstream.name;
    if client.written == written_before && events.is_empty() {
        // Nothing reached the agent: a plain refusal says it best.
        return Err(ForwardError::BeforeResponse(Reply::error(
            502,
            jsonrpc::UPSTREAM_UNAVAILABLE,
            format!("upstream {name:?} {why}"),
        )));
    }
    let why = format!("upstream {name:?} {why}");
    if !chunked {
        write_events(&mut ex.out, &events, chunked);
        let _ = flush(client, &mut ex.out).await;
        return Err(ForwardError::MidResponse(why));
    }
    // The complete events first, then tell the agent in-band and end the stream properly: its
    // connection stays usable.
    if is_post
        && !answered
        && let Some(id) = plan.request_id
    {
        let error = jsonrpc::error_body(Some(id), jsonrpc::UPSTREAM_UNAVAILABLE, &why);
        sse::write_event(&[b"event: message"], None, Some(&error), &mut events);
    }
    write_events(&mut ex.out, &events, chunked);
    ex.out.extend_from_slice(framing::LAST_CHUNK);
    flush(client, &mut ex.out)
        .await
        .map_err(|_| ForwardError::AgentGone)?;
    Ok((
        Relayed {
            keep_alive: keep_client,
            failure: Some(why),
        },
        false,
    ))
}

/// Appends one event for the agent: as it came, or with its list results filtered.
fn pass_event(event: &[u8], visible: Option<Visible<'_>>, strip: bool, out: &mut Vec<u8>) {
    // Tool integrity: hidden Unicode out of the event first (whatever it holds).
    if strip && let Some(clean) = scan::strip_body(event) {
        return pass_event(&clean, visible, false, out);
    }
    let Some(visible) = visible.filter(|_| lists::may_hold_list(event)) else {
        out.extend_from_slice(event);
        return;
    };
    let parts = sse::event_parts(event);
    let Some(data) = parts.data.as_deref() else {
        out.extend_from_slice(event);
        return;
    };
    match lists::filter_lists(data, visible) {
        Ok(None) => out.extend_from_slice(event),
        Ok(Some(filtered)) => sse::write_event(&parts.other, parts.id, Some(&filtered), out),
        // Not JSON yet it looks like a list: not relayed unfiltered.
        Err(_) => crate::debug!("an upstream event that may hold a list is not JSON: dropped"),
    }
}

/// Whether an event carries a JSON-RPC response (the answer a POST's stream exists for): a
/// `"result"` or `"error"` key (followed by `:`, so a log message's `"level":"error"` is not
/// one) in a message that is not a notification. A cheap look: it decides only whether a
/// failing stream still owes the agent an error.
fn is_response_event(event: &[u8]) -> bool {
    (has_key(event, b"\"result\"") || has_key(event, b"\"error\""))
        && !has_key(event, b"\"method\"")
}

/// Whether `key` (with its quotes) appears followed by `:` (whitespace allowed between).
fn has_key(data: &[u8], key: &[u8]) -> bool {
    let mut from = 0;
    while let Some(i) = memchr::memmem::find(&data[from..], key) {
        let mut j = from + i + key.len();
        while matches!(data.get(j), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            j += 1;
        }
        if data.get(j) == Some(&b':') {
            return true;
        }
        from += i + key.len();
    }
    false
}

/// Appends `events` to `out` as one chunk (or raw, for an HTTP/1.0 agent).
fn write_events(out: &mut Vec<u8>, events: &[u8], chunked: bool) {
    if events.is_empty() {
        return;
    }
    if chunked {
        crate::fmt::push_hex_len(out, events.len());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(events);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(events);
    }
}
