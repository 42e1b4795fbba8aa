//! The JSON-RPC envelope: the few fields of an MCP message that routing, authorization and
//! audit need, read once with simd-json.
//!
//! The body is copied once into a per-connection padded buffer and parsed there in place into a
//! reusable tape (simd-json unescapes strings in that copy); nothing is built but the tape, and
//! the fields below are slices of it. The bytes forwarded upstream are the bytes received, never
//! a re-serialization.
//!
//! Parsers disagree about duplicate keys (first wins, last wins, or both kept), so a duplicated
//! envelope key or argument name makes the body ambiguous and it is refused: what we authorize
//! must be what the upstream executes. Escapes are resolved before comparison (`"delete\u005frepo"`
//! is `delete_repo`), exactly as the upstream's parser will resolve them.

use simd_json::StaticNode;
use simd_json::{Buffers, Node, Tape};

use super::jsonrpc::{self, Id};
use super::tape::{Same, has_twins, node_span, variant_of};

/// What kind of JSON-RPC message a body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Notification,
    Response,
}

/// One JSON-RPC message's routing fields.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Message<'a> {
    pub kind: Kind,
    pub method: Option<&'a str>,
    pub id: Option<Id<'a>>,
    /// `params.name` (tools/call, prompts/get).
    pub name: Option<&'a str>,
    /// `params.uri` (resources/read, subscribe).
    pub uri: Option<&'a str>,
    /// `params.arguments`: the tape nodes of the value, `start..end`.
    pub arguments: Option<(u32, u32)>,
    /// `params._meta.progressToken`.
    pub progress_token: Option<Id<'a>>,
    /// `params.ref` (completion/complete): what is being completed.
    pub reference: Option<Reference<'a>>,
    /// `params.notifications` (2026-07-28 `subscriptions/listen`): the tape nodes of the
    /// filter, `start..end` (its `resourceSubscriptions` name resources).
    pub notifications: Option<(u32, u32)>,
    /// For responses: whether the message carries `error` (vs `result`).
    pub is_error: bool,
}

/// `params.ref` of completion/complete: `{"type": "ref/prompt", "name": ..}` or
/// `{"type": "ref/resource", "uri": ..}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reference<'a> {
    pub kind: Option<&'a str>,
    pub name: Option<&'a str>,
    pub uri: Option<&'a str>,
}

/// Why a body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not JSON at all (JSON-RPC -32700).
    Parse,
    /// JSON, but not a JSON-RPC message we can route (-32600); the text says why.
    Invalid(&'static str),
    /// A key that decides what runs appears twice (-32600).
    DuplicateKey(&'static str),
    /// Keys that differ only in letter case, which some parsers read as one (-32600): two in
    /// one object, or a variant of a field scopegate reads ([`super::tape`]).
    CaseVariant(&'static str),
}

impl EnvelopeError {
    pub fn message(&self) -> String {
        match self {
            EnvelopeError::Parse => "Parse error: body is not valid JSON".to_owned(),
            EnvelopeError::Invalid(why) => format!("Invalid Request: {why}"),
            EnvelopeError::DuplicateKey(key) => format!(
                "Invalid Request: duplicate key {key:?}; an ambiguous message is refused rather than guessed"
            ),
            EnvelopeError::CaseVariant(key) => format!(
                "Invalid Request: keys in {key:?} that differ only in letter case, which some parsers read as one; an ambiguous message is refused rather than guessed"
            ),
        }
    }

    pub fn code(&self) -> i32 {
        match self {
            EnvelopeError::Parse => jsonrpc::PARSE_ERROR,
            _ => jsonrpc::INVALID_REQUEST,
        }
    }
}

/// Deepest nesting accepted in a body (simd-json's own stack bound is higher); MCP messages are
/// shallow, and this bounds the work a hostile body can cause.
pub const MAX_DEPTH: usize = 128;

/// Per-connection parsing state, reused request after request so steady state allocates nothing.
pub struct EnvelopeParser {
    input: Vec<u8>,
    /// simd-json's working buffers, made at the first parse (and again after a release).
    buffers: Option<Buffers>,
    spare_tape: Option<Tape<'static>>,
}

impl Default for EnvelopeParser {
    fn default() -> Self {
        Self::new()
    }
}

/// Buffers above this size are released after use so one large body does not pin memory on an
/// idle connection.
const RETAIN_LIMIT: usize = 64 * 1024;

impl EnvelopeParser {
    pub fn new() -> EnvelopeParser {
        EnvelopeParser {
            input: Vec::new(),
            buffers: None,
            spare_tape: None,
        }
    }

    /// Lets every buffer go (a request that parses nothing and may last for hours, an event
    /// stream, should not hold the last body's); the next parse makes them again.
    pub fn release(&mut self) {
        *self = EnvelopeParser::new();
    }

    /// Parses `body`. The returned envelope borrows this parser until dropped.
    pub fn parse(&mut self, body: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
        if self.input.capacity() > RETAIN_LIMIT && body.len() <= RETAIN_LIMIT {
            self.release();
        }
        let len = body.len();
        self.input.clear();
        self.input.reserve(len + simd_json::INPUT_PADDING);
        self.input.extend_from_slice(body);
        self.input.resize(len + simd_json::INPUT_PADDING, 0);

        let mut tape: Tape<'_> = self.spare_tape.take().unwrap_or_else(Tape::null).reset();
        // Only batches (2025-03-26 clients) allocate this.
        let mut batch: Vec<Message<'_>> = Vec::new();

        let buffers = self.buffers.get_or_insert_with(|| Buffers::new(512));
        let parsed = simd_json::fill_tape_padded(&mut self.input, len, buffers, &mut tape);
        let slot = &mut self.spare_tape;
        if parsed.is_err() {
            *slot = Some(tape.reset());
            return Err(EnvelopeError::Parse);
        }
        let nodes = &tape.0;
        let result = match nodes.first() {
            Some(Node::Object { .. }) => read_message(nodes, 0).map(Shape::Single),
            Some(Node::Array { len, .. }) => {
                if *len == 0 {
                    Err(EnvelopeError::Invalid("empty batch"))
                } else {
                    read_batch(nodes, &mut batch).map(|()| Shape::Batch)
                }
            }
            _ => Err(EnvelopeError::Invalid(
                "a message must be a JSON object or array",
            )),
        };
        let depth_ok = depth_within(nodes, MAX_DEPTH);
        match result {
            Ok(_) if !depth_ok => {
                *slot = Some(tape.reset());
                Err(EnvelopeError::Invalid("nested too deeply"))
            }
            Ok(shape) => Ok(Envelope {
                tape,
                shape,
                batch,
                slot,
            }),
            Err(e) => {
                *slot = Some(tape.reset());
                Err(e)
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Shape<'a> {
    Single(Message<'a>),
    Batch,
}

/// A parsed body: one message, or a batch of them.
pub struct Envelope<'a> {
    tape: Tape<'a>,
    shape: Shape<'a>,
    batch: Vec<Message<'a>>,
    slot: &'a mut Option<Tape<'static>>,
}

impl<'a> Envelope<'a> {
    /// The message, when the body is not a batch.
    pub fn single(&self) -> Option<&Message<'a>> {
        match &self.shape {
            Shape::Single(m) => Some(m),
            Shape::Batch => None,
        }
    }

    pub fn is_batch(&self) -> bool {
        matches!(self.shape, Shape::Batch)
    }

    /// Every message: the one, or each element of the batch in order.
    pub fn messages(&self) -> &[Message<'a>] {
        match &self.shape {
            Shape::Single(m) => std::slice::from_ref(m),
            Shape::Batch => &self.batch,
        }
    }

    /// The tape nodes of a message's `params.arguments`.
    pub fn arguments(&self, message: &Message<'a>) -> Option<&[Node<'a>]> {
        let (start, end) = message.arguments?;
        self.tape.0.get(start as usize..end as usize)
    }

    /// The tape nodes of a message's `params.notifications` (subscriptions/listen).
    pub fn notifications(&self, message: &Message<'a>) -> Option<&[Node<'a>]> {
        let (start, end) = message.notifications?;
        self.tape.0.get(start as usize..end as usize)
    }
}

impl Drop for Envelope<'_> {
    fn drop(&mut self) {
        // Hand the allocations back for the next request on this connection.
        let tape = std::mem::replace(&mut self.tape, Tape(Vec::new()));
        *self.slot = Some(tape.reset());
    }
}

#[cfg(test)]
fn unreachable_message() -> Message<'static> {
    Message {
        kind: Kind::Notification,
        method: None,
        id: None,
        name: None,
        uri: None,
        arguments: None,
        progress_token: None,
        reference: None,
        notifications: None,
        is_error: false,
    }
}

/// The `(key, value index)` pairs of the object at `nodes[at]`, in order; an `Err` item if the
/// tape is not shaped like an object there.
pub fn object_entries<'t, 'a>(
    nodes: &'t [Node<'a>],
    at: usize,
) -> impl Iterator<Item = Result<(&'a str, usize), EnvelopeError>> + 't {
    let len = match nodes.get(at) {
        Some(Node::Object { len, .. }) => *len,
        _ => 0,
    };
    let mut idx = at + 1;
    (0..len).map(move |_| {
        let (Some(Node::String(key)), Some(value)) = (nodes.get(idx), nodes.get(idx + 1)) else {
            return Err(EnvelopeError::Invalid("malformed object"));
        };
        let value_at = idx + 1;
        idx = value_at + node_span(value);
        Ok((*key, value_at))
    })
}

/// Records that the key with `bit` was seen; a second sighting is an ambiguous body.
fn mark_seen(seen: &mut u8, bit: u8, name: &'static str) -> Result<(), EnvelopeError> {
    if bit != 0 {
        if *seen & bit != 0 {
            return Err(EnvelopeError::DuplicateKey(name));
        }
        *seen |= bit;
    }
    Ok(())
}

fn read_batch<'a>(nodes: &[Node<'a>], out: &mut Vec<Message<'a>>) -> Result<(), EnvelopeError> {
    let Some(Node::Array { len, .. }) = nodes.first() else {
        return Err(EnvelopeError::Invalid("not a batch"));
    };
    let mut idx = 1;
    for _ in 0..*len {
        match nodes.get(idx) {
            Some(Node::Object { .. }) => {
                out.push(read_message(nodes, idx)?);
                idx += node_span(&nodes[idx]);
            }
            _ => return Err(EnvelopeError::Invalid("a batch element is not an object")),
        }
    }
    Ok(())
}

/// Walks the object at `nodes[at]` and picks out the envelope fields.
fn read_message<'a>(nodes: &[Node<'a>], at: usize) -> Result<Message<'a>, EnvelopeError> {
    if !matches!(nodes.get(at), Some(Node::Object { .. })) {
        return Err(EnvelopeError::Invalid("a message must be a JSON object"));
    }
    let mut jsonrpc: Option<&str> = None;
    let mut method: Option<&str> = None;
    let mut id: Option<Id<'a>> = None;
    let mut params: Option<usize> = None;
    let mut has_result = false;
    let mut has_error = false;
    let mut seen = 0u8;

    for entry in object_entries(nodes, at) {
        let (key, value_at) = entry?;
        let value = &nodes[value_at];
        let (bit, name): (u8, &'static str) = match key {
            "jsonrpc" => (1, "jsonrpc"),
            "method" => (2, "method"),
            "id" => (4, "id"),
            "params" => (8, "params"),
            "result" => (16, "result"),
            "error" => (32, "error"),
            _ => match variant_of(
                key,
                &["jsonrpc", "method", "id", "params", "result", "error"],
            ) {
                Some(_) => return Err(EnvelopeError::CaseVariant("the message")),
                None => (0, ""),
            },
        };
        mark_seen(&mut seen, bit, name)?;
        match key {
            "jsonrpc" => {
                jsonrpc = Some(
                    as_str(value).ok_or(EnvelopeError::Invalid("\"jsonrpc\" must be \"2.0\""))?,
                )
            }
            "method" => {
                method = Some(
                    as_str(value).ok_or(EnvelopeError::Invalid("\"method\" must be a string"))?,
                )
            }
            "id" => {
                id = Some(as_id(value).ok_or(EnvelopeError::Invalid(
                    "\"id\" must be a string or a number",
                ))?)
            }
            "params" => params = Some(value_at),
            "result" => has_result = true,
            "error" => has_error = true,
            _ => {}
        }
    }

    if jsonrpc != Some("2.0") {
        return Err(EnvelopeError::Invalid("\"jsonrpc\" must be \"2.0\""));
    }
    let kind = match (method, id, has_result || has_error) {
        (Some(_), Some(_), false) => Kind::Request,
        (Some(_), None, false) => Kind::Notification,
        (None, Some(_), true) if !(has_result && has_error) => Kind::Response,
        _ => {
            return Err(EnvelopeError::Invalid(
                "not a request, notification or response",
            ));
        }
    };
    let mut message = Message {
        kind,
        method,
        id,
        name: None,
        uri: None,
        arguments: None,
        progress_token: None,
        reference: None,
        notifications: None,
        is_error: has_error,
    };
    if let Some(p) = params {
        read_params(nodes, p, &mut message)?;
    }
    Ok(message)
}

fn read_params<'a>(
    nodes: &[Node<'a>],
    at: usize,
    message: &mut Message<'a>,
) -> Result<(), EnvelopeError> {
    match nodes.get(at) {
        Some(Node::Object { .. }) => {}
        // JSON-RPC allows positional params; MCP never uses them, and there is nothing to read.
        Some(Node::Array { .. }) => return Ok(()),
        _ => return Err(EnvelopeError::Invalid("\"params\" must be an object")),
    }
    let mut seen = 0u8;
    for entry in object_entries(nodes, at) {
        let (key, value_at) = entry?;
        let value = &nodes[value_at];
        let (bit, name): (u8, &'static str) = match key {
            "name" => (1, "params.name"),
            "uri" => (2, "params.uri"),
            "arguments" => (4, "params.arguments"),
            "_meta" => (8, "params._meta"),
            "ref" => (16, "params.ref"),
            "notifications" => (32, "params.notifications"),
            _ => match variant_of(key, &PARAMS_KEYS) {
                Some(_) => return Err(EnvelopeError::CaseVariant("params")),
                None => (0, ""),
            },
        };
        mark_seen(&mut seen, bit, name)?;
        match key {
            "name" => {
                message.name = Some(
                    as_str(value)
                        .ok_or(EnvelopeError::Invalid("\"params.name\" must be a string"))?,
                )
            }
            "uri" => {
                message.uri = Some(
                    as_str(value)
                        .ok_or(EnvelopeError::Invalid("\"params.uri\" must be a string"))?,
                )
            }
            "arguments" => {
                // A constraint checked on one copy of an argument must not be bypassed by the
                // upstream reading the other.
                if has_twins(nodes, value_at, 0, Same::Exact) {
                    return Err(EnvelopeError::DuplicateKey("params.arguments"));
                }
                message.arguments = Some((value_at as u32, (value_at + node_span(value)) as u32));
            }
            "_meta" => message.progress_token = read_progress_token(nodes, value_at)?,
            "ref" => message.reference = Some(read_reference(nodes, value_at)?),
            "notifications" => {
                if has_twins(nodes, value_at, 0, Same::Exact) {
                    return Err(EnvelopeError::DuplicateKey("params.arguments"));
                }
                message.notifications =
                    Some((value_at as u32, (value_at + node_span(value)) as u32));
            }
            _ => {}
        }
    }
    // Exact duplicates are refused above, naming the key; then any two keys alike but for
    // letter case in the params and their members (the arguments, `_meta`, `ref`).
    if has_twins(nodes, at, 1, Same::Folded) {
        return Err(EnvelopeError::CaseVariant("params"));
    }
    Ok(())
}

/// The fields of `params` scopegate reads.
const PARAMS_KEYS: [&str; 6] = ["name", "uri", "arguments", "_meta", "ref", "notifications"];

fn read_reference<'a>(nodes: &[Node<'a>], at: usize) -> Result<Reference<'a>, EnvelopeError> {
    if !matches!(nodes.get(at), Some(Node::Object { .. })) {
        return Err(EnvelopeError::Invalid("\"params.ref\" must be an object"));
    }
    let mut r = Reference {
        kind: None,
        name: None,
        uri: None,
    };
    let mut seen = 0u8;
    for entry in object_entries(nodes, at) {
        let (key, value_at) = entry?;
        let (bit, name): (u8, &'static str) = match key {
            "type" => (1, "params.ref.type"),
            "name" => (2, "params.ref.name"),
            "uri" => (4, "params.ref.uri"),
            _ => match variant_of(key, &["type", "name", "uri"]) {
                Some(_) => return Err(EnvelopeError::CaseVariant("params.ref")),
                None => (0, ""),
            },
        };
        mark_seen(&mut seen, bit, name)?;
        let value = &nodes[value_at];
        let text = || {
            as_str(value).ok_or(EnvelopeError::Invalid(
                "\"params.ref\" fields must be strings",
            ))
        };
        match key {
            "type" => r.kind = Some(text()?),
            "name" => r.name = Some(text()?),
            "uri" => r.uri = Some(text()?),
            _ => {}
        }
    }
    Ok(r)
}

fn read_progress_token<'a>(nodes: &[Node<'a>], at: usize) -> Result<Option<Id<'a>>, EnvelopeError> {
    let mut token = None;
    for entry in object_entries(nodes, at) {
        let (key, value_at) = entry?;
        if key == "progressToken" {
            if token.is_some() {
                return Err(EnvelopeError::DuplicateKey("params._meta.progressToken"));
            }
            token = Some(as_id(&nodes[value_at]).ok_or(EnvelopeError::Invalid(
                "\"progressToken\" must be a string or a number",
            ))?);
        }
    }
    Ok(token)
}

fn as_str<'a>(node: &Node<'a>) -> Option<&'a str> {
    match node {
        Node::String(s) => Some(s),
        _ => None,
    }
}

fn as_id<'a>(node: &Node<'a>) -> Option<Id<'a>> {
    match node {
        Node::String(s) => Some(Id::Str(s)),
        Node::Static(StaticNode::I64(n)) => Some(Id::Int(*n)),
        // simd-json reads non-negative integers as u64; one representation per value.
        Node::Static(StaticNode::U64(n)) => Some(match i64::try_from(*n) {
            Ok(i) => Id::Int(i),
            Err(_) => Id::UInt(*n),
        }),
        Node::Static(StaticNode::F64(f)) => Some(Id::Float(*f)),
        _ => None,
    }
}

fn depth_within(nodes: &[Node<'_>], max: usize) -> bool {
    // Ends of the open containers, innermost last.
    let mut open: [usize; MAX_DEPTH] = [0; MAX_DEPTH];
    let mut depth = 0usize;
    for (i, node) in nodes.iter().enumerate() {
        while depth > 0 && open[depth - 1] <= i {
            depth -= 1;
        }
        if let Node::Object { count, .. } | Node::Array { count, .. } = node {
            if depth == max {
                return false;
            }
            open[depth] = i + count + 1;
            depth += 1;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_one(body: &str) -> Result<Message<'static>, EnvelopeError> {
        let mut p = EnvelopeParser::new();
        let env = p.parse(body.as_bytes())?;
        let m = *env.single().expect("single");
        // Leak the strings so the test can return them.
        Ok(Message {
            method: m.method.map(|s| &*Box::leak(s.to_owned().into_boxed_str())),
            name: m.name.map(|s| &*Box::leak(s.to_owned().into_boxed_str())),
            uri: m.uri.map(|s| &*Box::leak(s.to_owned().into_boxed_str())),
            id: m.id.map(leak_id),
            progress_token: m.progress_token.map(leak_id),
            ..unreachable_message_with(m)
        })
    }

    fn leak_id(id: Id<'_>) -> Id<'static> {
        match id {
            Id::Str(s) => Id::Str(Box::leak(s.to_owned().into_boxed_str())),
            Id::Int(n) => Id::Int(n),
            Id::UInt(n) => Id::UInt(n),
            Id::Float(f) => Id::Float(f),
        }
    }

    fn unreachable_message_with(m: Message<'_>) -> Message<'static> {
        Message {
            kind: m.kind,
            arguments: m.arguments,
            is_error: m.is_error,
            ..unreachable_message()
        }
    }

    #[test]
    fn tools_call_fields() {
        let m = parse_one(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_issue","arguments":{"repo":"acme/web","n":3},"_meta":{"progressToken":"p1"}}}"#,
        )
        .unwrap();
        assert_eq!(m.kind, Kind::Request);
        assert_eq!(m.method, Some("tools/call"));
        assert_eq!(m.id, Some(Id::Int(7)));
        assert_eq!(m.name, Some("get_issue"));
        assert_eq!(m.progress_token, Some(Id::Str("p1")));
        assert!(m.arguments.is_some());
    }

    #[test]
    fn arguments_nodes_are_reachable() {
        let mut p = EnvelopeParser::new();
        let env = p
            .parse(br#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"arguments":{"path":"/srv/x","deep":{"k":[1,2]}},"name":"read"}}"#)
            .unwrap();
        let m = env.single().unwrap();
        let args = env.arguments(m).unwrap();
        assert!(matches!(args[0], Node::Object { len: 2, .. }));
        assert_eq!(args[1], Node::String("path"));
        assert_eq!(args[2], Node::String("/srv/x"));
        assert_eq!(m.name, Some("read"));
    }

    #[test]
    fn kinds() {
        let n = parse_one(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert_eq!(n.kind, Kind::Notification);
        let r = parse_one(r#"{"jsonrpc":"2.0","id":"x","result":{}}"#).unwrap();
        assert_eq!(r.kind, Kind::Response);
        let e = parse_one(r#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m"}}"#).unwrap();
        assert!(e.is_error);
    }

    #[test]
    fn escapes_are_resolved_before_anyone_looks() {
        let m = parse_one(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools\/call","params":{"name":"delete\u005frepo"}}"#,
        )
        .unwrap();
        assert_eq!(m.method, Some("tools/call"));
        assert_eq!(m.name, Some("delete_repo"));
    }

    #[test]
    fn duplicates_are_refused() {
        let cases = [
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping"}"#,
                "method",
            ),
            (r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}"#, "id"),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#,
                "params.name",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"p":1,"p":2}}}"#,
                "params.arguments",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","n\u0061me":"b"}}"#,
                "params.name",
            ),
        ];
        for (body, key) in cases {
            assert_eq!(
                parse_one(body),
                Err(EnvelopeError::DuplicateKey(key)),
                "{body}"
            );
        }
    }

    #[test]
    fn keys_alike_but_for_letter_case_are_refused() {
        // A case-blind parser (Go's encoding/json) would run sleep, or read PATH and N.
        let cases = [
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","Params":{"name":"sleep"}}"#,
                "the message",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"n":1},"NAME":"sleep"}}"#,
                "params",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"},"param\u017f":{"name":"sleep"}}"#,
                "the message",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"path":"/srv/data/ok","PATH":"/etc/passwd"}}}"#,
                "params",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","NAME":"secret"}}}"#,
                "params.ref",
            ),
        ];
        for (body, key) in cases {
            assert_eq!(
                parse_one(body),
                Err(EnvelopeError::CaseVariant(key)),
                "{body}"
            );
        }
        // Keys scopegate does not read may differ from each other (and from known ones) freely.
        assert!(
            parse_one(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"cursor":"c"}}"#)
                .is_ok()
        );
    }

    #[test]
    fn many_argument_keys_are_checked_too() {
        let mut args: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        let ok = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"a","arguments":{{{}}}}}}}"#,
            args.join(",")
        );
        assert!(parse_one(&ok).is_ok());
        args.push("\"k3\":0".into());
        let dup = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"a","arguments":{{{}}}}}}}"#,
            args.join(",")
        );
        assert_eq!(
            parse_one(&dup),
            Err(EnvelopeError::DuplicateKey("params.arguments"))
        );
    }

    #[test]
    fn invalid_bodies() {
        assert_eq!(parse_one("{"), Err(EnvelopeError::Parse));
        assert_eq!(parse_one(""), Err(EnvelopeError::Parse));
        assert_eq!(parse_one("{\"a\":1} x"), Err(EnvelopeError::Parse));
        assert!(matches!(parse_one("[]"), Err(EnvelopeError::Invalid(_))));
        assert!(matches!(parse_one("42"), Err(EnvelopeError::Invalid(_))));
        assert!(matches!(
            parse_one(r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#),
            Err(EnvelopeError::Invalid(_))
        ));
        assert!(matches!(
            parse_one(r#"{"jsonrpc":"2.0","id":null,"method":"x"}"#),
            Err(EnvelopeError::Invalid(_))
        ));
        assert!(matches!(
            parse_one(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}"#),
            Err(EnvelopeError::Invalid(_))
        ));
        let deep = format!(
            r#"{{"jsonrpc":"2.0","method":"x","params":{{"a":{}1{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(parse_one(&deep).is_err());
    }

    #[test]
    fn batches_list_every_message() {
        let mut p = EnvelopeParser::new();
        let body = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}},{"jsonrpc":"2.0","method":"notifications/x"}]"#;
        let env = p.parse(body).unwrap();
        assert!(env.is_batch());
        assert_eq!(env.messages().len(), 2);
        assert_eq!(env.messages()[0].name, Some("a"));
        assert_eq!(env.messages()[1].kind, Kind::Notification);
        drop(env);
        // The parser is reusable after a batch, and after an error.
        assert!(p.parse(b"nope").is_err());
        let env = p
            .parse(br#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#)
            .unwrap();
        assert_eq!(env.single().unwrap().method, Some("ping"));
    }

    #[test]
    fn body_bytes_are_not_modified() {
        let body =
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a\u005fb"}}"#
                .to_vec();
        let copy = body.clone();
        let mut p = EnvelopeParser::new();
        let env = p.parse(&body).unwrap();
        assert_eq!(env.single().unwrap().name, Some("a_b"));
        drop(env);
        assert_eq!(body, copy);
    }
}
