//! What one exchange leaves behind: the audit entries (one per JSON-RPC message; one for a
//! request refused before its body was read) and the metric counts, written after the answer,
//! whatever the outcome. The draft is filled as the stages run and reused across a
//! connection's requests, so steady state allocates nothing for it.

use std::time::{Instant, SystemTime};

use super::memory::ConnCache;
use crate::audit::AuditSink;
use crate::audit::entry::{Decision as AuditDecision, Entry, encode_message};
use crate::mcp::envelope::{Envelope, Kind};
use crate::metrics::Place;
use crate::metrics::WorkerMetrics;
use crate::policy::Policy;
use crate::reply::Reply;

/// Where a finished exchange is recorded.
pub struct Sinks<'a> {
    pub worker: usize,
    pub metrics: &'a WorkerMetrics,
    pub audit: Option<&'a AuditSink>,
    /// Each upstream's `,"upstream":<name>` for audit entries, encoded once.
    pub upstream_fragments: &'a [Vec<u8>],
    /// The upstreams (for the access log's names).
    pub upstreams: &'a [crate::upstream::Upstream],
    /// `SCOPEGATE_ACCESS_LOG`: a line per request (else only refusals, within a budget).
    pub access_log: bool,
    /// The live view is on (`SCOPEGATE_ADMIN_TOKEN`): agents, tools and refusals are tallied.
    pub live: bool,
}

/// What the audit log records of the request in progress; reused across a connection's
/// requests so steady state allocates nothing for it.
#[derive(Default)]
pub struct Draft {
    /// The audit log is on.
    pub active: bool,
    /// Not an MCP request (health, metadata): not audited.
    pub skip: bool,
    pub started: Option<Instant>,
    pub time: Option<SystemTime>,
    pub policy: Option<crate::policy::live::LocalPolicy>,
    pub agent: Option<usize>,
    pub upstream: Option<usize>,
    /// The request went to the aggregate endpoint (the metrics' `upstream="(aggregate)"` when
    /// no one upstream is named).
    pub aggregate: bool,
    /// 16 hex characters of SHA-256 of the agent's session token (empty: none); reused.
    pub session: Vec<u8>,
    /// Each message's method slot (for metrics).
    pub methods: Vec<usize>,
    /// The first message's tool, prompt or resource (for the log); reused.
    pub target: String,
    /// The agent's trace context and scopegate's span for the hop.
    pub trace: Option<crate::http::trace::Hop>,
    /// Pre-encoded message fragments, one range per message.
    pub frags: Vec<u8>,
    pub messages: Vec<(usize, usize)>,
    pub scratch: Vec<u8>,
    /// Per-connection memory of the last key and session token (an agent sends the same ones
    /// on every request of a connection).
    pub cache: ConnCache,
    pub decision: AuditDecision,
    pub reason: Option<String>,
    pub status: u16,
    pub upstream_us: Option<u64>,
    pub is_error: Option<bool>,
    /// Body bytes read beyond what was buffered with the head.
    pub bytes_in: u64,
}

impl Draft {
    /// Starts a new request; the wall clock is read only when entries will be written.
    pub fn reset(&mut self, started: Instant) {
        self.skip = false;
        self.started = Some(started);
        self.time = self.active.then(SystemTime::now);
        self.policy = None;
        self.agent = None;
        self.upstream = None;
        self.aggregate = false;
        self.session.clear();
        self.frags.clear();
        self.messages.clear();
        self.methods.clear();
        self.target.clear();
        self.trace = None;
        self.decision = AuditDecision::Allowed;
        self.reason = None;
        self.status = 0;
        self.upstream_us = None;
        self.is_error = None;
        self.bytes_in = 0;
    }

    /// Who is calling which upstream, once they are known: the policy is kept (audit on) to
    /// name the agent in the entries, and the session token is hashed for them.
    pub fn identify(
        &mut self,
        upstream: Option<usize>,
        agent: Option<usize>,
        policy: Option<&crate::policy::live::LocalPolicy>,
        head: &crate::http::head::Head,
    ) {
        self.upstream = upstream;
        self.agent = agent;
        // Kept to name the agent: in audit entries and in log lines (a refusal is logged
        // whatever the settings). A count on a per-worker `Rc`, nothing shared.
        self.policy = policy.cloned();
        if self.active {
            if let Some(token) = head.get("mcp-session-id") {
                self.set_session(token);
            }
        }
    }

    pub fn set_session(&mut self, token: &[u8]) {
        if self.cache.hashed_token == token {
            self.session.clone_from(&self.cache.token_hash);
            return;
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, token);
        self.session.clear();
        crate::fmt::push_hex(&digest.as_ref()[..8], &mut self.session);
        self.cache.hashed_token.clear();
        self.cache.hashed_token.extend_from_slice(token);
        self.cache.token_hash.clone_from(&self.session);
    }
}

impl Draft {
    /// A reply scopegate wrote itself: its status, and unless an earlier stage already said
    /// why, its decision and reason.
    pub fn replied(&mut self, reply: &Reply) {
        self.status = reply.status;
        if self.decision == AuditDecision::Allowed {
            self.decision = reply.decision;
        }
        if self.reason.is_none() {
            self.reason = reply.audit_reason();
        }
        if reply.upstream.is_some() {
            self.upstream = reply.upstream;
        }
    }

    /// Each message of the body, for the metrics and (audit log on) as entry fragments with
    /// the agent's `redact` rules applied.
    pub fn messages_of(
        &mut self,
        env: &Envelope<'_>,
        policy: Option<&Policy>,
        agent: Option<usize>,
        max_args: usize,
    ) {
        for m in env.messages() {
            self.methods.push(crate::metrics::method_index(
                m.method,
                m.kind == Kind::Response,
            ));
        }
        if let Some(name) = env.messages().first().and_then(|m| m.name.or(m.uri)) {
            // An agent's string, kept short: logs and tallies must not carry megabytes.
            let mut end = name.len().min(MAX_TARGET);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            self.target.push_str(&name[..end]);
            if end < name.len() {
                self.target.push_str("...");
            }
        }
        if !self.active {
            return;
        }
        let redact = match (policy, agent) {
            (Some(p), Some(a)) => p.agents[a].redact.as_slice(),
            _ => &[],
        };
        for m in env.messages() {
            let start = self.frags.len();
            encode_message(
                m,
                env.arguments(m),
                redact,
                max_args,
                &mut self.scratch,
                &mut self.frags,
            );
            self.messages.push((start, self.frags.len()));
        }
    }
}

/// The most of an agent's tool, prompt or resource name a log line or tally keeps.
const MAX_TARGET: usize = 128;

/// Counts the request for the live view: its agent, the tool it called (as
/// `<upstream>/<tool>`), why it was refused, its upstream's latency.
fn tally(sink: &Sinks<'_>, draft: &Draft, refused: bool) {
    let policy = draft.policy.as_deref().map(|p| &**p);
    let agent = match (policy, draft.agent) {
        (Some(p), Some(a)) => p.agents.get(a).map_or("", |a| a.id.as_str()),
        _ => "",
    };
    let call = crate::metrics::method_index(Some("tools/call"), false);
    let upstream = draft.upstream.and_then(|u| sink.upstreams.get(u));
    // Only calls that ran: names an agent invents (refused as unknown) cannot crowd the tally.
    let ran = draft.decision == AuditDecision::Allowed;
    let tool =
        (ran && draft.methods.first() == Some(&call) && !draft.target.is_empty()).then(|| {
            // On /mcp the name already says its upstream (`<upstream>__<tool>`).
            match (upstream, draft.aggregate) {
                (Some(u), false) => format!("{}/{}", u.name, draft.target),
                _ => draft.target.clone(),
            }
        });
    let refusal = refused.then(|| {
        draft
            .reason
            .clone()
            .unwrap_or_else(|| draft.decision.as_str().to_owned())
    });
    let latency = draft.upstream.zip(draft.upstream_us);
    sink.metrics
        .tally(agent, tool.as_deref(), refusal.as_deref(), latency);
}

/// One log line for a request: every request with `SCOPEGATE_ACCESS_LOG=1` (at info), else
/// the refused ones (denied, rate limited) with their reason, within the per-worker budget
/// ([`crate::log::budget`]) so an attack cannot flood the log.
fn log_line(sink: &Sinks<'_>, draft: &Draft, http_method: &[u8], total_us: u64) {
    use crate::log::Field::{Num, Str};
    let dropped = if sink.access_log {
        0
    } else {
        match crate::log::budget() {
            Some(n) => n,
            None => return,
        }
    };
    let policy = draft.policy.as_deref().map(|p| &**p);
    let agent = match (policy, draft.agent) {
        (Some(p), Some(a)) => p.agents.get(a).map_or("", |a| a.id.as_str()),
        _ => "",
    };
    let method = match draft.methods.first() {
        Some(&m) => crate::metrics::method_label(m),
        None => std::str::from_utf8(http_method).unwrap_or("?"),
    };
    let upstream = match (draft.upstream, draft.aggregate) {
        (Some(u), _) => sink.upstreams.get(u).map_or("?", |u| u.name.as_str()),
        (None, true) => "(aggregate)",
        (None, false) => "",
    };
    let mut fields = vec![
        ("agent", Str(agent)),
        ("method", Str(method)),
        ("tool", Str(&draft.target)),
        ("upstream", Str(upstream)),
        ("decision", Str(draft.decision.as_str())),
        ("status", Num(u64::from(draft.status))),
        ("us", Num(total_us)),
    ];
    if let Some(why) = &draft.reason {
        fields.push(("reason", Str(why)));
    }
    if let Some(t) = &draft.trace {
        fields.push(("trace_id", Str(t.trace_id())));
        fields.push(("span_id", Str(t.span_id())));
    }
    if dropped > 0 {
        fields.push(("dropped_before", Num(dropped)));
    }
    fields.retain(|(_, v)| !matches!(v, Str("")));
    let message = if sink.access_log { "access" } else { "refused" };
    crate::log::record(crate::log::Level::Info, message, &fields);
}

/// Writes what list answers told of tool integrity since the last request's record stage;
/// also called as a worker drains, so that none is left unwritten at shutdown.
pub async fn write_integrity_events(audit: &crate::audit::AuditSink) {
    for fragment in &crate::policy::integrity::take_events() {
        audit.record_event("integrity", fragment).await;
    }
}

/// Writes the request's entries to the audit log: one per JSON-RPC message (one for a request
/// that carried none).
pub async fn emit(sink: &Sinks<'_>, draft: &Draft, http_method: &[u8], bytes_out: u64) {
    // What list answers told of tool integrity (drifts, findings) goes in first: the answer
    // that showed it is this request's, or an earlier one's.
    if let Some(audit) = sink.audit {
        write_integrity_events(audit).await;
    }
    if draft.skip {
        return;
    }
    let metrics = sink.metrics;
    let total_us = draft.started.map_or(0, |s| s.elapsed().as_micros() as u64);
    metrics.observe(total_us, draft.upstream_us);
    let place = match (draft.upstream, draft.aggregate) {
        (Some(u), _) => Place::Upstream(u),
        (None, true) => Place::Aggregate,
        (None, false) => Place::Nowhere,
    };
    if draft.methods.is_empty() {
        metrics.count(
            crate::metrics::no_message_index(http_method),
            draft.decision,
            place,
        );
    }
    for &m in &draft.methods {
        metrics.count(m, draft.decision, place);
    }
    let refused = matches!(
        draft.decision,
        AuditDecision::Denied | AuditDecision::RateLimited
    );
    if sink.access_log || refused {
        log_line(sink, draft, http_method, total_us);
    }
    if sink.live {
        tally(sink, draft, refused);
    }
    let Some(audit) = sink.audit else {
        return;
    };
    let policy = draft.policy.as_deref().map(|p| &**p);
    let identity: &[u8] = match (policy, draft.agent) {
        (Some(p), Some(a)) => p.agents.get(a).map_or(&[], |a| a.audit_identity.as_slice()),
        _ => &[],
    };
    let upstream: &[u8] = draft
        .upstream
        .and_then(|u| sink.upstream_fragments.get(u))
        .map_or(&[], Vec::as_slice);
    let session = (!draft.session.is_empty())
        .then(|| std::str::from_utf8(&draft.session).ok())
        .flatten();
    let mut entry = Entry {
        time: draft.time.unwrap_or_else(SystemTime::now),
        worker: sink.worker,
        http_method,
        identity,
        upstream,
        session,
        message: b"",
        decision: draft.decision,
        reason: draft.reason.as_deref(),
        status: draft.status,
        upstream_us: draft.upstream_us,
        total_us,
        bytes_in: draft.bytes_in,
        bytes_out,
        is_error: draft.is_error,
        trace: draft.trace.as_ref(),
    };
    if draft.messages.is_empty() {
        audit.record(&entry).await;
        return;
    }
    for &(start, end) in &draft.messages {
        entry.message = &draft.frags[start..end];
        audit.record(&entry).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::request_head as head;
    use crate::mcp::envelope::EnvelopeParser;

    #[test]
    fn a_reply_is_recorded_without_overwriting_an_earlier_verdict() {
        let mut draft = Draft::default();
        draft.reset(Instant::now());
        draft.replied(&Reply::error(502, -32001, "upstream down").upstream_error(Some(1)));
        assert_eq!(draft.status, 502);
        assert_eq!(draft.decision, AuditDecision::UpstreamError);
        assert_eq!(draft.reason.as_deref(), Some("upstream down"));
        assert_eq!(draft.upstream, Some(1));
        // A later reply gives its status; the first verdict and reason stand.
        draft.replied(&Reply::error(429, -32007, "limited").denied());
        assert_eq!(draft.status, 429);
        assert_eq!(draft.decision, AuditDecision::UpstreamError);
        assert_eq!(draft.reason.as_deref(), Some("upstream down"));
        // The next request starts clean.
        draft.reset(Instant::now());
        assert_eq!(
            (draft.status, draft.decision, draft.reason.is_none()),
            (0, AuditDecision::Allowed, true)
        );
    }

    #[test]
    fn who_and_what_are_noted_once_known() {
        let mut draft = Draft {
            active: true,
            ..Draft::default()
        };
        draft.reset(Instant::now());
        let h = head("POST /mcp/a HTTP/1.1\r\nHost: x\r\nMcp-Session-Id: tok\r\n\r\n");
        draft.identify(Some(0), None, None, &h);
        assert_eq!(draft.upstream, Some(0));
        assert_eq!(
            draft.session.len(),
            16,
            "8 bytes of the token's SHA-256, in hex"
        );
        let mut parser = EnvelopeParser::new();
        let env = parser
            .parse(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#)
            .unwrap();
        draft.messages_of(&env, None, None, 4096);
        assert_eq!(draft.messages.len(), 2, "one audit entry per message");
        assert_eq!(draft.methods.len(), 2);
        let first = &draft.frags[draft.messages[0].0..draft.messages[0].1];
        assert!(String::from_utf8_lossy(first).contains("ping"));
    }
}
