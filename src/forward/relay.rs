//! The byte relay: the upstream's answer reaches the agent read by read, in its own framing
//! where the agent can take it.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::plan::{ForwardError, Leg, Relayed};
use super::respond::{flush, release_quiet, send, send_scanned, start_response, stream_buffers};
use crate::fmt::push_decimal;
use crate::http::conn::{Conn, ReadError, Waited, wait_readable_watching};
use crate::http::framing::{self, ChunkedDecoder, Framing};
use crate::http::head::{self};

use crate::metrics::StreamGauge;
use crate::upstream::Upstream;
use crate::upstream::exchange::{UpstreamError, unavailable};

/// How the agent receives the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Downstream {
    Empty,
    Length(u64),
    /// Upstream chunked, relayed byte for byte.
    ChunkedRaw,
    /// Upstream chunked, de-chunked for an HTTP/1.0 agent and ended by close.
    ChunkedDecoded,
    /// Upstream close-delimited, re-framed as chunks.
    ChunkedWrapped,
    /// Upstream close-delimited, relayed close-delimited (HTTP/1.0 agent).
    UntilClose,
}

/// An upstream response whose framing cannot be read: refused (502) as every invalid
/// response is, by the one writer of that refusal.
pub(super) fn bad_framing(upstream: &Upstream, e: framing::FramingError) -> ForwardError {
    ForwardError::BeforeResponse(unavailable(
        &upstream.name,
        UpstreamError::BadHead(e.message()),
    ))
}

pub(super) async fn relay(
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
    is_event_stream: bool,
) -> Result<(Relayed, bool), ForwardError> {
    let response = &ex.response;
    let upstream_framing = framing::response_framing(response, request.method())
        .map_err(|e| bad_framing(upstream, e))?;
    let agent_is_http10 = request.minor_version == 0;
    let downstream = match (upstream_framing, agent_is_http10) {
        (Framing::Empty, _) => Downstream::Empty,
        (Framing::Length(n), _) => Downstream::Length(n),
        (Framing::Chunked, false) => Downstream::ChunkedRaw,
        (Framing::Chunked, true) => Downstream::ChunkedDecoded,
        (Framing::UntilClose, false) => Downstream::ChunkedWrapped,
        (Framing::UntilClose, true) => Downstream::UntilClose,
    };
    // Decided now, not when the request arrived: a drain that began meanwhile closes it.
    let keep_client = !close_after
        && !crate::core::shutting_down()
        && !matches!(
            downstream,
            Downstream::ChunkedDecoded | Downstream::UntilClose
        );
    let mut keep_upstream = response.minor_version == 1
        && !head::connection_has(response, "close")
        && upstream_framing != Framing::UntilClose;
    // Every read has a deadline: a plain body must keep flowing (SCOPEGATE_UPSTREAM_TIMEOUT_MS);
    // the event stream answering a POST may pause between events up to
    // SCOPEGATE_STREAM_IDLE_MS; a GET stream may stay quiet as long as both sides stay, and
    // the agent is watched so its leaving is noticed at once.
    let config = &core.config;
    let limit = if !is_event_stream {
        Some(config.upstream_timeout)
    } else if request.method() == b"POST" && !plan.long_lived {
        Some(config.stream_idle)
    } else {
        None
    };
    let _stream_gauge = is_event_stream.then(|| StreamGauge::open(&core.stats.metrics.sse_streams));
    let mut wait = Wait {
        limit,
        watch: is_event_stream,
        // A stream that stays open (GET, subscriptions/listen) ends at a drain: no request
        // waits on it, and its agent comes back with Last-Event-ID.
        ends_at_drain: is_event_stream && limit.is_none(),
    };
    // Ended by a drain: the agent's connection closes after it.
    let mut drained = false;

    // The response head for the agent.
    start_response(&mut ex.out, response, plan, upstream)?;
    let out = &mut ex.out;
    match downstream {
        Downstream::Empty => {
            if !matches!(response.status, 204 | 304) && request.method() != b"HEAD" {
                out.extend_from_slice(b"Content-Length: 0\r\n");
            }
        }
        Downstream::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Downstream::ChunkedRaw | Downstream::ChunkedWrapped => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n")
        }
        Downstream::ChunkedDecoded | Downstream::UntilClose => {}
    }
    if !keep_client {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if is_event_stream {
        // A long-lived stream: let go of the response head's share of the upstream buffer and
        // read the stream into a small one (events are small; an idle stream should cost
        // little memory).
        stream_buffers(ex, up);
    }
    let out = &mut ex.out;

    let mid = |_| ForwardError::AgentGone;
    match downstream {
        Downstream::Empty => {
            flush(client, out).await.map_err(mid)?;
            if !up.buf.is_empty() {
                keep_upstream = false;
            }
        }
        Downstream::Length(n) => {
            let mut remaining = n;
            loop {
                let take = (up.buf.len() as u64).min(remaining) as usize;
                let piece = up.buf.split_to(take).freeze();
                remaining -= take as u64;
                // The head goes with the first bytes of the body, not before: an upstream that
                // fails before any arrive gets the agent a plain 502.
                if !piece.is_empty() {
                    send_scanned(
                        client,
                        out,
                        piece,
                        plan.scan_is_error.then_some(&mut ex.is_error),
                    )
                    .await
                    .map_err(mid)?;
                }
                if remaining == 0 {
                    break;
                }
                if is_event_stream {
                    flush(client, out).await.map_err(mid)?;
                    wait.release_quiet(out, up);
                }
                if wait.fill(up, client).await? == Filled::Draining {
                    // A length cannot be ended early: the connection closes.
                    return Err(ForwardError::MidResponse("ended by the drain".into()));
                }
            }
            if !up.buf.is_empty() {
                keep_upstream = false;
            }
        }
        Downstream::ChunkedRaw | Downstream::ChunkedDecoded => {
            let decode = downstream == Downstream::ChunkedDecoded;
            let mut decoder = ChunkedDecoder::default();
            let mut decoded = BytesMut::new();
            loop {
                let consumed = decoder
                    .feed(&up.buf, decode.then_some(&mut decoded))
                    .map_err(|e| {
                        ForwardError::MidResponse(format!("sent a bad chunked body: {e:?}"))
                    })?;
                let raw = up.buf.split_to(consumed).freeze();
                let piece = if decode {
                    decoded.split().freeze()
                } else {
                    raw
                };
                if !piece.is_empty() {
                    send_scanned(
                        client,
                        out,
                        piece,
                        plan.scan_is_error.then_some(&mut ex.is_error),
                    )
                    .await
                    .map_err(mid)?;
                }
                if decoder.is_done() {
                    flush(client, out).await.map_err(mid)?;
                    break;
                }
                if is_event_stream {
                    // A stream may stay quiet: the agent sees it open before the wait.
                    flush(client, out).await.map_err(mid)?;
                    wait.release_quiet(out, up);
                }
                if wait.fill(up, client).await? == Filled::Draining {
                    if decode || !decoder.between_chunks() {
                        // Ended by the connection's close (HTTP/1.0), or mid-chunk.
                        return Err(ForwardError::MidResponse("ended by the drain".into()));
                    }
                    send(client, out, Bytes::from_static(framing::LAST_CHUNK))
                        .await
                        .map_err(mid)?;
                    drained = true;
                    keep_upstream = false;
                    break;
                }
            }
            if !up.buf.is_empty() {
                keep_upstream = false;
            }
        }
        Downstream::ChunkedWrapped | Downstream::UntilClose => {
            let wrap = downstream == Downstream::ChunkedWrapped;
            let mut chunk = BytesMut::new();
            loop {
                if !up.buf.is_empty() {
                    let data = up.buf.split().freeze();
                    let piece = if wrap {
                        framing::encode_chunk(&data, &mut chunk);
                        chunk.split().freeze()
                    } else {
                        data
                    };
                    send_scanned(
                        client,
                        out,
                        piece,
                        plan.scan_is_error.then_some(&mut ex.is_error),
                    )
                    .await
                    .map_err(mid)?;
                }
                if is_event_stream {
                    flush(client, out).await.map_err(mid)?;
                    wait.release_quiet(out, up);
                }
                let filled = wait.fill_or_end(up, client).await?;
                if filled == Filled::Draining {
                    drained = true;
                    keep_upstream = false;
                    break;
                }
                if filled == Filled::Bytes(0) {
                    if !up.ended_cleanly() {
                        // TLS without close_notify: anyone on the path can forge that end.
                        return Err(ForwardError::MidResponse(
                            "closed its TLS connection without close_notify mid-body".into(),
                        ));
                    }
                    break;
                }
            }
            if wrap {
                send(client, out, Bytes::from_static(framing::LAST_CHUNK))
                    .await
                    .map_err(mid)?;
            }
        }
    }

    Ok((
        Relayed {
            keep_alive: keep_client && !drained,
            failure: None,
        },
        keep_upstream,
    ))
}

/// What a wait for the upstream brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filled {
    /// This many more bytes (0: the upstream closed).
    Bytes(usize),
    /// Nothing yet, and a drain began: a stream that ends at a drain ends now.
    Draining,
}

/// How the relay waits for the upstream's next bytes.
struct Wait {
    limit: Option<Duration>,
    /// Watch the agent while waiting (event streams).
    watch: bool,
    /// Wake now and then, and give up waiting once a drain began.
    ends_at_drain: bool,
}

impl Wait {
    /// More of the body, which must come (or the drain).
    async fn fill(&mut self, up: &mut Conn, client: &mut Conn) -> Result<Filled, ForwardError> {
        match self.fill_or_end(up, client).await? {
            Filled::Bytes(0) => Err(ForwardError::MidResponse(
                "closed the connection mid-body".into(),
            )),
            filled => Ok(filled),
        }
    }

    /// More of the body, or 0 at the upstream's close, or the drain.
    async fn fill_or_end(
        &mut self,
        up: &mut Conn,
        client: &mut Conn,
    ) -> Result<Filled, ForwardError> {
        loop {
            if self.ends_at_drain && crate::core::shutting_down() {
                return Ok(Filled::Draining);
            }
            let failed = |e| ForwardError::MidResponse(format!("failed mid-body: {e}"));
            if self.ends_at_drain {
                // A stream that ends at a drain looks up at the thread's next tick (a timer it
                // shares). Only the readiness wait is given up then, never a read.
                let until = crate::timer::Until::NextTick;
                match wait_readable_watching(up, client, &mut self.watch, until).await {
                    Waited::Readable => {}
                    Waited::AgentGone => return Err(ForwardError::AgentGone),
                    Waited::TimedOut => continue,
                }
                return match up.fill_ready().await {
                    Ok(Some(n)) => Ok(Filled::Bytes(n)),
                    Ok(None) => continue,
                    Err(e) => Err(failed(e)),
                };
            }
            // Other waits have their limit; a read that outlasts it ends the relay.
            let deadline = self.limit.map(|d| Instant::now() + d);
            if self.watch {
                match wait_readable_watching(up, client, &mut self.watch, deadline.into()).await {
                    Waited::Readable => {}
                    Waited::AgentGone => return Err(ForwardError::AgentGone),
                    Waited::TimedOut => return Err(self.timed_out()),
                }
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            return match up.fill_within(left).await {
                Ok(n) => Ok(Filled::Bytes(n)),
                Err(ReadError::TimedOut) => Err(self.timed_out()),
                Err(ReadError::Io(e)) => Err(failed(e)),
            };
        }
    }

    /// A stream that stays open lets its buffers go while it waits ([`release_quiet`]).
    fn release_quiet(&self, out: &mut Vec<u8>, up: &mut Conn) {
        if self.ends_at_drain {
            release_quiet(out, up);
        }
    }

    fn timed_out(&self) -> ForwardError {
        ForwardError::MidResponse(format!(
            "sent nothing for {} ms mid-body",
            self.limit.map_or(0, |d| d.as_millis())
        ))
    }
}
