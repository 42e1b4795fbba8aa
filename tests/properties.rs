//! Property-based tests for everything an agent or an upstream controls: the JSON-RPC envelope
//! (differentially against serde_json), HTTP request heads, chunked bodies, the SSE splitter,
//! the canonical URI and path forms, argument constraints, and tool pins and digests. Case counts are bounded so CI
//! stays quick; `PROPTEST_CASES=100000 cargo test --test properties` searches harder.

use bytes::BytesMut;
use proptest::prelude::*;
use scopegate::http::framing::ChunkedDecoder;
use scopegate::http::head::{Head, parse_request};
use scopegate::http::sse::{SseSplitter, event_parts};
use scopegate::mcp::envelope::{EnvelopeParser, Kind};
use scopegate::mcp::jsonrpc::Id;
use scopegate::mcp::uri::{Mode, canonical, canonical_path};
use scopegate::policy::args::{Bound, Constraint};
use serde_json::Value;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

// ---- the envelope, against serde_json ------------------------------------------------------

/// A JSON string literal for `s`, each character written raw or as a \u escape at random
/// (escapes are resolved before anyone looks: the parsers must agree on what they mean).
fn json_string(s: &str, escapes: &[bool]) -> String {
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        let escape = escapes
            .get(i % escapes.len().max(1))
            .copied()
            .unwrap_or(false);
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if escape && (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Debug, Clone)]
enum Arg {
    Int(i64),
    Big(u64),
    Float(f64),
    Str(String),
    Bool(bool),
    Null,
    List(Vec<i64>),
}

fn arg() -> impl Strategy<Value = Arg> {
    prop_oneof![
        any::<i64>().prop_map(Arg::Int),
        any::<u64>().prop_map(Arg::Big),
        (-1e20f64..1e20).prop_map(Arg::Float),
        "\\PC{0,12}".prop_map(Arg::Str),
        any::<bool>().prop_map(Arg::Bool),
        Just(Arg::Null),
        prop::collection::vec(any::<i64>(), 0..4).prop_map(Arg::List),
    ]
}

fn arg_json(a: &Arg, escapes: &[bool]) -> String {
    match a {
        Arg::Int(n) => n.to_string(),
        Arg::Big(n) => n.to_string(),
        Arg::Float(f) => format!("{f:?}"),
        Arg::Str(s) => json_string(s, escapes),
        Arg::Bool(b) => b.to_string(),
        Arg::Null => "null".into(),
        Arg::List(l) => format!(
            "[{}]",
            l.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        ),
    }
}

#[derive(Debug, Clone)]
struct Message {
    method: Option<String>,
    id: Option<Arg>,
    name: Option<String>,
    uri: Option<String>,
    arguments: Vec<(String, Arg)>,
    /// The order the top-level keys are written in.
    order: Vec<usize>,
    /// A key written twice (index into the keys), to check ambiguity is refused.
    duplicate: Option<usize>,
    escapes: Vec<bool>,
    space: String,
}

fn message() -> impl Strategy<Value = Message> {
    (
        prop::option::of(prop_oneof![
            Just("tools/call".to_string()),
            Just("tools/list".to_string()),
            Just("resources/read".to_string()),
            "[a-z/]{1,12}",
        ]),
        prop::option::of(prop_oneof![
            any::<i64>().prop_map(Arg::Int),
            "\\PC{0,8}".prop_map(Arg::Str),
            Just(Arg::Null),
            (-1e6f64..1e6).prop_map(Arg::Float),
        ]),
        prop::option::of("\\PC{0,16}"),
        prop::option::of("[a-zA-Z:/._%-]{0,20}"),
        prop::collection::vec(("[a-z_]{1,6}", arg()), 0..5),
        Just(()).prop_perturb(|_, mut rng| {
            let mut order: Vec<usize> = (0..4).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            order
        }),
        prop::option::weighted(0.2, 0usize..4),
        prop::collection::vec(any::<bool>(), 1..6),
        prop_oneof![
            Just(String::new()),
            Just(" ".to_string()),
            Just("\n\t ".to_string())
        ],
    )
        .prop_map(
            |(method, id, name, uri, arguments, order, duplicate, escapes, space)| Message {
                method,
                id,
                name,
                uri,
                arguments,
                order,
                duplicate,
                escapes,
                space,
            },
        )
}

fn render(m: &Message) -> String {
    let sp = &m.space;
    let mut params = Vec::new();
    if let Some(n) = &m.name {
        params.push(format!(
            "{}:{sp}{}",
            json_string("name", &m.escapes),
            json_string(n, &m.escapes)
        ));
    }
    if let Some(u) = &m.uri {
        params.push(format!("\"uri\":{}", json_string(u, &m.escapes)));
    }
    if !m.arguments.is_empty() {
        let args: Vec<String> = m
            .arguments
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}:{sp}{}",
                    json_string(k, &m.escapes),
                    arg_json(v, &m.escapes)
                )
            })
            .collect();
        params.push(format!("\"arguments\":{sp}{{{}}}", args.join(",")));
    }
    let mut fields: Vec<String> = vec![format!("\"jsonrpc\":{sp}\"2.0\"")];
    let mut keyed: Vec<Option<String>> = vec![
        m.method.as_ref().map(|me| {
            format!(
                "{}:{sp}{}",
                json_string("method", &m.escapes),
                json_string(me, &m.escapes)
            )
        }),
        m.id.as_ref()
            .map(|id| format!("\"id\":{}", arg_json(id, &m.escapes))),
        (!params.is_empty())
            .then(|| format!("\"params\":{sp}{{{}}}", params.join(&format!(",{sp}")))),
        None,
    ];
    if let Some(d) = m.duplicate
        && let Some(Some(f)) = keyed.get(d).cloned()
    {
        keyed[3] = Some(f);
    }
    for &i in &m.order {
        if let Some(f) = &keyed[i] {
            fields.push(f.clone());
        }
    }
    format!("{sp}{{{}}}{sp}", fields.join(&format!(",{sp}")))
}

/// An id as serde_json reads it.
fn id_value(id: &Id<'_>) -> Value {
    match id {
        Id::Str(s) => Value::String((*s).to_owned()),
        Id::Int(n) => Value::from(*n),
        Id::UInt(n) => Value::from(*n),
        Id::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
    }
}

/// Whether any object in `text` names a key twice (parsed by serde with a strict visitor).
fn has_duplicate_keys(text: &str) -> bool {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Strict;
    impl<'de> Deserialize<'de> for Strict {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
            d.deserialize_any(StrictVisitor)
        }
    }
    struct StrictVisitor;
    impl<'de> Visitor<'de> for StrictVisitor {
        type Value = Strict;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = map.next_key::<String>()? {
                if !seen.insert(k) {
                    return Err(serde::de::Error::custom("duplicate"));
                }
                map.next_value::<Strict>()?;
            }
            Ok(Strict)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
            while seq.next_element::<Strict>()?.is_some() {}
            Ok(Strict)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
            Ok(Strict)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
            Ok(Strict)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
            Ok(Strict)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
            Ok(Strict)
        }
        fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
            Ok(Strict)
        }
        fn visit_unit<E>(self) -> Result<Strict, E> {
            Ok(Strict)
        }
    }
    serde_json::from_str::<Strict>(text).is_err() && serde_json::from_str::<Value>(text).is_ok()
}

/// JSON values equal, numbers compared by value (the audit encoder writes 1.0 as 1).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

proptest! {
    #![proptest_config(config())]

    /// What scopegate reads off a body is what serde_json (any conforming parser) reads: the
    /// same method, id, name, URI and arguments, or scopegate refuses the body.
    #[test]
    fn the_envelope_agrees_with_serde_json(m in message()) {
        let text = render(&m);
        let mut parser = EnvelopeParser::new();
        let ours = parser.parse(text.as_bytes());
        let theirs: Result<Value, _> = serde_json::from_str(&text);
        match ours {
            Ok(env) => {
                let v = theirs.expect("scopegate accepted what serde_json refuses");
                prop_assert!(!has_duplicate_keys(&text), "accepted an ambiguous body: {text}");
                let msg = env.single().expect("one message");
                prop_assert_eq!(msg.method, v.get("method").and_then(Value::as_str));
                prop_assert_eq!(msg.id.as_ref().map(id_value), v.get("id").cloned());
                let params = v.get("params");
                prop_assert_eq!(msg.name, params.and_then(|p| p.get("name")).and_then(Value::as_str));
                prop_assert_eq!(msg.uri, params.and_then(|p| p.get("uri")).and_then(Value::as_str));
                if let Some(nodes) = env.arguments(msg) {
                    // Re-serialized by the audit encoder, the arguments are serde_json's.
                    let mut out = Vec::new();
                    scopegate::audit::entry::encode_message(msg, Some(nodes), &[], usize::MAX, &mut Vec::new(), &mut out);
                    let ours: Value = serde_json::from_slice(&[b"{", out.as_slice(), b"}"].concat()).unwrap();
                    prop_assert!(same_json(&ours["args"], &params.unwrap()["arguments"]), "{} vs {}", ours["args"], params.unwrap()["arguments"]);
                }
                prop_assert!(matches!(msg.kind, Kind::Request | Kind::Notification));
            }
            Err(_) => {
                // Refusing is always safe; refusing a well-formed, unambiguous request or
                // notification would not be useful.
                let well_formed = m.method.is_some() && !matches!(m.id, Some(Arg::Null));
                if well_formed && theirs.is_ok() {
                    prop_assert!(has_duplicate_keys(&text), "refused a clean body: {text}");
                }
            }
        }
    }

    /// Arbitrary bytes never panic the envelope parser.
    #[test]
    fn the_envelope_survives_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut parser = EnvelopeParser::new();
        let _ = parser.parse(&bytes);
    }
}

// ---- HTTP heads and chunked bodies --------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// A request head written with any header-name case and optional whitespace parses back
    /// to what was written.
    #[test]
    fn request_heads_parse_back(
        method in "(GET|POST|DELETE)",
        path in "/[a-z0-9/_.-]{0,30}",
        headers in prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,15}", "[ -~]{0,30}"), 0..10),
        lead in "( |\t)?",
    ) {
        let mut raw = format!("{method} {path} HTTP/1.1\r\n");
        for (n, v) in &headers {
            raw.push_str(&format!("{n}:{lead}{v}\r\n"));
        }
        raw.push_str("\r\n");
        let mut head = Head::default();
        let len = parse_request(raw.as_bytes(), &mut head).unwrap().unwrap();
        head.raw = bytes::Bytes::copy_from_slice(&raw.as_bytes()[..len]);
        prop_assert_eq!(len, raw.len());
        prop_assert_eq!(head.method(), method.as_bytes());
        prop_assert_eq!(head.target(), path.as_bytes());
        let got: Vec<(Vec<u8>, Vec<u8>)> = head.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> = headers.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.trim_matches([' ', '\t']).as_bytes().to_vec())).collect();
        prop_assert_eq!(got, want);
    }

    /// Heads of arbitrary bytes, cut anywhere, never panic and never read past the buffer.
    #[test]
    fn request_heads_survive_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut head = Head::default();
        for cut in [bytes.len() / 3, bytes.len()] {
            if let Ok(Some(len)) = parse_request(&bytes[..cut], &mut head) {
                prop_assert!(len <= cut);
            }
        }
    }

    /// A chunked body with any chunk sizes and extensions, fed in pieces of any size, decodes
    /// to the body, and consumption stops exactly at its end.
    #[test]
    fn chunked_bodies_decode_in_any_pieces(
        body in prop::collection::vec(any::<u8>(), 0..2000),
        sizes in prop::collection::vec(1usize..300, 1..20),
        pieces in prop::collection::vec(1usize..97, 1..40),
        ext in any::<bool>(),
        trailing in prop::collection::vec(any::<u8>(), 0..20),
    ) {
        let mut wire = Vec::new();
        let mut rest = &body[..];
        let mut k = 0;
        while !rest.is_empty() {
            let n = sizes[k % sizes.len()].min(rest.len());
            wire.extend_from_slice(format!("{n:x}{}\r\n", if ext { ";x=y" } else { "" }).as_bytes());
            wire.extend_from_slice(&rest[..n]);
            wire.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            k += 1;
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let end = wire.len();
        wire.extend_from_slice(&trailing);
        let mut d = ChunkedDecoder::default();
        let mut out = BytesMut::new();
        let mut at = 0;
        let mut k = 0;
        while at < wire.len() && !d.is_done() {
            let n = pieces[k % pieces.len()].min(wire.len() - at);
            at += d.feed(&wire[at..at + n], Some(&mut out)).unwrap();
            k += 1;
        }
        prop_assert!(d.is_done());
        prop_assert_eq!(at, end);
        prop_assert_eq!(&out[..], &body[..]);
    }

    /// Garbage never panics the decoder and never makes it claim more input than it got.
    #[test]
    fn chunked_decoding_survives_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut d = ChunkedDecoder::default();
        let mut out = BytesMut::new();
        if let Ok(n) = d.feed(&bytes, Some(&mut out)) {
            prop_assert!(n <= bytes.len());
            prop_assert!(out.len() <= bytes.len());
        }
    }
}

// ---- the SSE splitter ----------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Events written with any line endings and delivered in pieces of any size come out of
    /// the splitter as they went in.
    #[test]
    fn events_split_back_whatever_the_pieces(
        events in prop::collection::vec((prop::option::of("[a-z0-9-]{1,8}"), prop::collection::vec("[ -~]{0,40}", 0..3)), 1..12),
        ending in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        pieces in prop::collection::vec(1usize..50, 1..30),
    ) {
        let mut wire = String::new();
        for (id, data) in &events {
            if let Some(id) = id {
                wire.push_str(&format!("id: {id}{ending}"));
            }
            if data.is_empty() {
                wire.push_str(&format!(": keep-alive{ending}"));
            }
            for line in data {
                wire.push_str(&format!("data: {line}{ending}"));
            }
            wire.push_str(ending);
        }
        let mut s = SseSplitter::new(1 << 20);
        let mut got = Vec::new();
        let bytes = wire.as_bytes();
        let mut at = 0;
        let mut k = 0;
        while at < bytes.len() {
            let n = pieces[k % pieces.len()].min(bytes.len() - at);
            s.push(&bytes[at..at + n]);
            at += n;
            k += 1;
            while let Some(e) = s.next_event().unwrap() {
                let p = event_parts(e);
                got.push((p.id.map(|i| String::from_utf8_lossy(i).into_owned()), p.data.map(|d| String::from_utf8_lossy(&d).into_owned())));
            }
        }
        let want: Vec<(Option<String>, Option<String>)> = events
            .iter()
            .map(|(id, data)| (id.clone(), (!data.is_empty()).then(|| data.join("\n"))))
            .collect();
        prop_assert_eq!(got, want);
    }

    /// However the bytes come, the splitter never holds more than its limit of an unfinished
    /// event without saying so.
    #[test]
    fn the_splitter_is_bounded(bytes in prop::collection::vec(any::<u8>(), 0..4000), limit in 16usize..512) {
        let mut s = SseSplitter::new(limit);
        for piece in bytes.chunks(64) {
            s.push(piece);
            loop {
                match s.next_event() {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        prop_assert!(s.pending() <= limit);
                        break;
                    }
                    Err(_) => return Ok(()),
                }
            }
        }
    }
}

// ---- canonical URIs and paths ---------------------------------------------------------------

/// A canonical file URI made of plain segments.
fn file_uri() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9_]{1,6}", 1..5)
        .prop_map(|segs| format!("file:///{}", segs.join("/")))
}

/// Rewrites `uri` into an equivalent spelling (what an agent might send to slip past a rule).
fn respell(uri: &str, choices: &[u8]) -> String {
    let path = uri.strip_prefix("file:///").unwrap();
    let mut out = String::new();
    out.push_str(match choices[0] % 4 {
        0 => "file:///",
        1 => "FILE:///",
        2 => "file://localhost/",
        _ => "File:/",
    });
    for (i, seg) in path.split('/').enumerate() {
        let c = choices[(i + 1) % choices.len()];
        if i > 0 {
            out.push_str(if c % 3 == 0 { "//" } else { "/" });
        }
        if c % 5 == 1 {
            out.push_str("./");
        }
        if c % 7 == 2 {
            out.push_str("zz/../");
        }
        for (j, ch) in seg.chars().enumerate() {
            if (c as usize + j) % 4 == 0 {
                out.push_str(&format!("%{:02x}", ch as u32));
            } else {
                out.push(ch);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(config())]

    /// Every respelling of a URI has the URI's canonical form.
    #[test]
    fn respellings_share_one_canonical_form(uri in file_uri(), choices in prop::collection::vec(any::<u8>(), 2..10)) {
        let spelled = respell(&uri, &choices);
        prop_assert_eq!(canonical(&spelled, Mode::Uri), Ok(uri.clone()), "{}", spelled);
    }

    /// The canonical form is a fixed point and holds nothing a server could read two ways.
    #[test]
    fn the_canonical_form_is_stable(text in "[a-zA-Z][a-zA-Z0-9+.-]{0,5}:[ -~]{0,40}") {
        if let Ok(c) = canonical(&text, Mode::Uri) {
            prop_assert_eq!(canonical(&c, Mode::Uri), Ok(c.clone()));
            prop_assert!(!c.contains('\\') && !c.chars().any(char::is_control) && !c.contains(' '));
            let scheme_end = c.find(':').unwrap();
            prop_assert_eq!(&c[..scheme_end], c[..scheme_end].to_ascii_lowercase());
            let path = c[scheme_end + 1..].split(['?', '#']).next().unwrap();
            let path = path.strip_prefix("//").map_or(path, |p| &p[p.find('/').unwrap_or(p.len())..]);
            if path.starts_with('/') {
                prop_assert!(!path.contains("//"), "{}", c);
                prop_assert!(!path.split('/').any(|s| s == "." || s == ".."), "{}", c);
            }
        }
    }

    /// A path accepted under a prefix stays under it once a filesystem resolves it.
    #[test]
    fn canonical_paths_stay_under_their_prefix(segs in prop::collection::vec(prop_oneof![Just("..".to_string()), Just(".".to_string()), Just(String::new()), "[a-z]{1,4}"], 0..8)) {
        let path = format!("/srv/shared/{}", segs.join("/"));
        if let Ok(c) = canonical_path(&path) {
            // Resolve the way a kernel would (no symbolic links here).
            let mut stack: Vec<&str> = Vec::new();
            for s in path.split('/') {
                match s {
                    "" | "." => {}
                    ".." => { stack.pop(); }
                    s => stack.push(s),
                }
            }
            let resolved = format!("/{}", stack.join("/"));
            prop_assert!(c.starts_with("/srv/shared"));
            prop_assert!(resolved.starts_with("/srv/shared"), "{} resolves to {}", path, resolved);
        }
    }
}

// ---- argument constraints ------------------------------------------------------------------

fn check(c: &Constraint, json: &str) -> bool {
    let mut bytes = json.as_bytes().to_vec();
    let tape = simd_json::to_tape(&mut bytes).unwrap();
    c.check(&tape.0).is_ok()
}

fn bounds(min: Option<i64>, max: Option<i64>) -> Constraint {
    Constraint {
        one_of: None,
        prefix: None,
        pattern: None,
        max_len: None,
        min: min.map(Bound::Int),
        max: max.map(Bound::Int),
        items: None,
    }
}

proptest! {
    #![proptest_config(config())]

    /// Integer bounds hold exactly for every 64-bit integer, signed or not.
    #[test]
    fn integer_bounds_are_exact(lo in any::<i64>(), hi in any::<i64>(), v in prop_oneof![any::<i64>().prop_map(i128::from), any::<u64>().prop_map(i128::from)]) {
        let c = bounds(Some(lo.min(hi)), Some(lo.max(hi)));
        let inside = i128::from(lo.min(hi)) <= v && v <= i128::from(lo.max(hi));
        prop_assert_eq!(check(&c, &v.to_string()), inside, "{} in [{}, {}]", v, lo.min(hi), lo.max(hi));
    }

    /// A float compared with an integer bound is compared exactly too, or refused.
    #[test]
    fn float_values_against_integer_bounds(max in any::<i64>(), v in -1e19f64..1e19) {
        let c = bounds(None, Some(max));
        let text = format!("{v:?}");
        let parsed: f64 = text.parse().unwrap();
        // v <= max for an integer max exactly when ceil(v) <= max; ceil(v) is an integer
        // below 2^127, so it converts to i128 without loss.
        // Past 2^53 a decimal cannot be compared exactly (a server reading decimals exactly
        // would see another number): refused, whatever the bound.
        let inside = parsed.abs() < 9_007_199_254_740_992.0 && (parsed.ceil() as i128) <= i128::from(max);
        prop_assert_eq!(check(&c, &text), inside, "{} <= {}", text, max);
    }

    /// `items` holds exactly when every item does, nested values skipped whole.
    #[test]
    fn items_hold_for_every_item(lo in -50i64..50, hi in -50i64..50, vs in proptest::collection::vec(-100i64..100, 0..12), nest in any::<bool>()) {
        let each = bounds(Some(lo.min(hi)), Some(lo.max(hi)));
        let c = Constraint { items: Some(Box::new(each)), ..bounds(None, None) };
        let inside = vs.iter().all(|v| lo.min(hi) <= *v && *v <= lo.max(hi));
        let items: Vec<String> = vs.iter().map(i64::to_string).collect();
        let json = format!("[{}]", items.join(","));
        prop_assert_eq!(check(&c, &json), inside, "{}", json);
        if nest && !vs.is_empty() {
            // An array in the middle is an item that is not a number: refused.
            let json = format!("[{},[{}]]", items.join(","), items.join(","));
            prop_assert!(!check(&c, &json), "{}", json);
        }
    }
}

// ---- tool integrity: the pin file and digests ----------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Any name and description (hidden characters, quotes, controls, any script) survive the
    /// pin file's text and read back with the same digest.
    #[test]
    fn pins_read_back_what_was_written(
        name in "\\PC{0,40}",
        description in any::<String>(),
        upstream in "[a-z][a-z0-9_-]{0,15}",
    ) {
        use scopegate::integrity::{Kind, definition, digest, pins::Pins};
        let item = serde_json::json!({"name": name, "description": description,
            "inputSchema": {"type": "object", "properties": {description.clone(): {"type": "string"}}}});
        let def = definition(&item);
        let mut pins = Pins::default();
        pins.set(&upstream, Kind::Tool, &name, &def);
        let back = Pins::parse(&pins.render()).map_err(TestCaseError::fail)?;
        let pin = back.get(&upstream, Kind::Tool, &name).expect("the pin is there");
        prop_assert_eq!(pin.digest, digest(&def));
        prop_assert_eq!(back, pins);
    }

    /// A definition's digest does not depend on member order or on how its JSON text spells
    /// strings (escaped or raw).
    #[test]
    fn digests_ignore_member_order_and_escapes(
        members in prop::collection::btree_map("[a-z]{1,8}", "\\PC{0,12}", 1..6),
        escapes in prop::collection::vec(any::<bool>(), 1..8),
    ) {
        use scopegate::integrity::{definition, digest};
        prop_assume!(!members.contains_key("name"));
        let forward: Vec<String> = members.iter()
            .map(|(k, v)| format!("{}:{}", json_string(k, &escapes), json_string(v, &escapes)))
            .collect();
        let mut backward = forward.clone();
        backward.reverse();
        let a: Value = serde_json::from_str(&format!("{{\"name\":\"t\",{}}}", forward.join(","))).unwrap();
        let b: Value = serde_json::from_str(&format!("{{{},\"name\":\"t\"}}", backward.join(","))).unwrap();
        prop_assert_eq!(digest(&definition(&a)), digest(&definition(&b)));
    }
}
