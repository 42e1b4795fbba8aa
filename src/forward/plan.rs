//! What one forwarded exchange is asked to do ([`Plan`]), the scratch it reuses
//! ([`Exchange`]), the exchange under way as each relay takes it ([`Leg`]) and how it ends
//! ([`Relayed`], [`ForwardError`]).

use super::scan::IsErrorScan;
use crate::core::Core;
use crate::http::conn::Conn;
use crate::http::head::Head;
use crate::mcp::jsonrpc::Id;
use crate::mcp::lists::Visible;
use crate::policy::live::ViewWatch;
use crate::reply::Reply;
use crate::upstream::Upstream;

/// Per-connection scratch reused across requests, and what the audit log learns from the
/// exchange.
#[derive(Default)]
pub struct Exchange {
    pub(super) out: Vec<u8>,
    pub(super) response: Head,
    /// Microseconds from sending the request to the upstream's response head.
    pub upstream_us: Option<u64>,
    /// The upstream's status.
    pub status: u16,
    /// A tools/call result's `isError`, when it was seen in the relayed body.
    pub is_error: IsErrorScan,
    /// A stdio upstream's bridge said its process failed on this request: why.
    pub stdio_failure: Option<String>,
}

impl Exchange {
    /// Lets go of the last answer's head, which shares the upstream connection's read buffer
    /// (kept from a failed exchange, it would hold that buffer while the state is pooled).
    pub fn release(&mut self) {
        self.response.raw = bytes::Bytes::new();
    }
}

/// Maps the upstream's session id to the token the agent sees.
pub type SealFn<'a> = &'a dyn Fn(&[u8]) -> Option<String>;

/// What the policy asks of one exchange beyond plain forwarding.
#[derive(Default)]
pub struct Plan<'a> {
    /// The upstream's own session id, sent instead of the agent's (sealed) `Mcp-Session-Id`.
    pub upstream_session: Option<&'a [u8]>,
    /// Turns an `Mcp-Session-Id` from the upstream into the token the agent sees.
    pub seal_session: Option<SealFn<'a>>,
    /// Policy mode: inject the upstream's credential (`[upstream.headers]`, replacing any the
    /// agent sent under those names), and drop response headers that carry upstream
    /// credentials (`Set-Cookie`, `WWW-Authenticate`, ...) and any named like an injected one.
    pub strip_credentials: bool,
    /// Policy mode: what the agent may see. Every list result it can receive is filtered with
    /// it: the JSON answer to a list request, and every event of an event stream.
    pub visible: Option<Visible<'a>>,
    /// The request asks for a list (or a batch holds one): a JSON answer is read whole and
    /// filtered.
    pub lists_asked: bool,
    /// Take hidden Unicode out of the answer's results (tool integrity's
    /// `strip_hidden_unicode`, on a tools/call): a JSON answer is read whole for it.
    pub strip_hidden: bool,
    /// Look for the result's `isError` (tools/call, audit on).
    pub scan_is_error: bool,
    /// The id of the request when the body is one request: an event stream answering it that
    /// fails mid-way ends with a JSON-RPC error for this id.
    pub request_id: Option<Id<'a>>,
    /// The answer is a stream meant to stay open while quiet (`subscriptions/listen`), like a
    /// GET stream: no `SCOPEGATE_STREAM_IDLE_MS` between its events.
    pub long_lived: bool,
    /// The agent's id (policy mode), for a stdio upstream's bridge.
    pub agent_id: Option<&'a str>,
    /// The `traceparent` the upstream is sent: scopegate's span in the agent's trace.
    pub traceparent: Option<&'a [u8]>,
    /// Policy mode, a stream meant to stay open (GET, `subscriptions/listen`): the agent's view
    /// watched across reloads, and how a change is told.
    pub reload: Option<ReloadNotice>,
}

/// How an open stream tells its agent that a reload changed what it may see: these
/// list-change notifications, with this `_meta` (a subscription's id). A reload that removes
/// the agent ends the stream.
pub struct ReloadNotice {
    pub watch: ViewWatch,
    pub methods: Vec<&'static str>,
    pub meta: Option<String>,
}

impl Plan<'_> {
    /// The plan's parts that follow from the body's messages alone.
    pub fn for_messages(messages: &[crate::mcp::envelope::Message<'_>]) -> Self {
        use crate::policy::decide::{Access, access};
        Plan {
            lists_asked: messages
                .iter()
                .any(|m| matches!(access(m.method, m.kind), Access::List(_))),
            long_lived: messages
                .iter()
                .any(|m| access(m.method, m.kind) == Access::Listen),
            ..Plan::default()
        }
    }
}

pub struct Relayed {
    /// Whether the agent's connection can carry another request.
    pub keep_alive: bool,
    /// The answer was cut short by the upstream, and the agent told so in-band (an error event
    /// closing the stream): what went wrong, for the audit log.
    pub failure: Option<String>,
}

pub enum ForwardError {
    /// Nothing was sent to the agent yet: answer with this refusal (502/504).
    BeforeResponse(Reply),
    /// The response was partly relayed when the upstream failed: the agent's connection must be
    /// closed (an incomplete body is signalled by the close). Says what happened.
    MidResponse(String),
    /// The agent closed its connection while the answer was relayed: its doing, not the
    /// upstream's.
    AgentGone,
}

/// The exchange under way, as each relay takes it: the upstream's response head is read (in
/// `ex.response`), its body is still on `up`.
pub struct Leg<'a, 'p> {
    pub core: &'a Core,
    pub ex: &'a mut Exchange,
    pub client: &'a mut Conn,
    /// The agent's request.
    pub request: &'a Head,
    pub up: &'a mut Conn,
    pub upstream: &'a Upstream,
    /// The agent's connection closes after this answer.
    pub close_after: bool,
    pub plan: &'a Plan<'p>,
}
