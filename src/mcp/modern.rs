//! The 2026-07-28 wire: no session and no handshake. Each request carries its revision and the
//! client's capabilities in `params._meta`, and routing headers (`Mcp-Method`, `Mcp-Name`,
//! `Mcp-Param-*`) that must agree with the body: the body is what executes.

use std::borrow::Cow;

/// The newest revision scopegate knows, the first without sessions.
pub const LATEST: &str = "2026-07-28";

/// The revisions with an initialize handshake, oldest first.
pub const HANDSHAKE: [&str; 3] = ["2025-03-26", "2025-06-18", "2025-11-25"];

/// The lowercase prefix of the headers that mirror a tool's marked arguments.
pub const PARAM_PREFIX: &[u8] = b"mcp-param-";

/// Whether a header is an `Mcp-Param-*` header.
pub fn is_param_header(name: &[u8]) -> bool {
    name.len() > PARAM_PREFIX.len() && name[..PARAM_PREFIX.len()].eq_ignore_ascii_case(PARAM_PREFIX)
}

/// Whether `version` is a sessionless revision: 2026-07-28 or later (revisions are dates, so
/// they order as strings).
pub fn is_modern(version: &[u8]) -> bool {
    let date = version.len() == LATEST.len()
        && version.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
    date && version >= LATEST.as_bytes()
}

/// The `params` field a method's `Mcp-Name` header mirrors.
pub fn name_field(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    }
}

/// A routing header's value as the client meant it: verbatim, or the UTF-8 inside a
/// `=?base64?...?=` sentinel. `None` for a sentinel that is malformed (not canonical base64,
/// not UTF-8): it can never match a body.
pub fn decode_header_value(value: &[u8]) -> Option<Cow<'_, [u8]>> {
    let Some(payload) = value
        .strip_prefix(b"=?base64?")
        .and_then(|v| v.strip_suffix(b"?="))
    else {
        return Some(Cow::Borrowed(value));
    };
    let decoded = crate::token::base64_decode(payload)?;
    std::str::from_utf8(&decoded).ok()?;
    Some(Cow::Owned(decoded))
}

/// A value for a routing header: verbatim when it is printable ASCII without edge whitespace
/// (and does not look like a sentinel), else wrapped in a base64 sentinel.
pub fn encode_header_value(value: &str) -> Cow<'_, str> {
    let plain = value.bytes().all(|b| (0x20..0x7f).contains(&b))
        && value.trim() == value
        && !(value.starts_with("=?base64?") && value.ends_with("?="));
    if plain {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(format!(
            "=?base64?{}?=",
            crate::token::base64(value.as_bytes())
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_from_2026_07_28_on_are_sessionless() {
        assert!(is_modern(b"2026-07-28"));
        assert!(is_modern(b"2027-01-01"));
        for old in HANDSHAKE {
            assert!(!is_modern(old.as_bytes()));
        }
        assert!(!is_modern(b"2026-07-28x"));
        assert!(!is_modern(b"zzzzzzzzzz"), "a revision is a date");
        assert!(!is_modern(b""));
    }

    #[test]
    fn header_values_round_trip_through_the_sentinel() {
        for v in [
            "echo",
            "fm__add",
            " lead",
            "tail ",
            "caf\u{e9}",
            "a\nb",
            "=?base64?x?=",
        ] {
            let encoded = encode_header_value(v);
            assert!(
                encoded.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "{encoded}"
            );
            assert_eq!(
                decode_header_value(encoded.as_bytes()).unwrap(),
                v.as_bytes()
            );
        }
        assert_eq!(encode_header_value("echo"), "echo");
        assert_eq!(encode_header_value("caf\u{e9}"), "=?base64?Y2Fmw6k=?=");
        // Not base64, non-canonical base64, not UTF-8.
        for bad in [
            &b"=?base64?!!?="[..],
            b"=?base64?Zh==?=",
            b"=?base64?/w==?=",
        ] {
            assert!(decode_header_value(bad).is_none(), "{bad:?}");
        }
    }
}
