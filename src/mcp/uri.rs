//! The canonical form of a resource URI: what policy rules about resources are matched against.
//!
//! MCP servers do not use the URI an agent sends as it is: the official SDKs parse it first
//! (Python's pydantic `AnyUrl` follows the WHATWG URL rules), so `FILE:///etc/./secret`,
//! `file://localhost/etc/secret` and `file:/etc/secret` all read `/etc/secret`. A rule compared
//! with the raw text would miss each of them. So every URI a decision depends on is first
//! brought to one form (RFC 3986 §6.2.2 syntax-based normalisation, plus the `file:` scheme's
//! own equivalences), and what has no safe canonical form is refused instead of guessed:
//!
//! - scheme and host are lower-cased; `file://localhost/` is `file:///`; `file:/x` is `file:///x`;
//!   an empty or default port (`:80` for http, `:443` for https) is dropped;
//! - percent-encodings get upper-case hex; an encoded unreserved character (`%2e`, `%41`) is
//!   decoded; characters that may not appear raw (space, `"`, `<`, non-ASCII, ...) are encoded;
//! - in the path, repeated slashes are one slash and `.`/`..` segments are resolved
//!   (RFC 3986 §5.2.4), after decoding, so `%2e%2e` counts as `..`;
//! - refused: control characters (raw or encoded), backslashes (raw or encoded: some parsers
//!   read them as `/`), an encoded `/` in the authority or path (servers disagree on whether it
//!   separates segments), a `%` not followed by two hex digits, spaces around the URI, and a
//!   URI without a scheme.
//!
//! The bytes forwarded upstream are still the agent's own: the canonical form is what is
//! decided on, never a rewrite.

use std::fmt::Write as _;

/// Longest URI accepted (the canonical form can be up to three times longer, for encodings).
pub const MAX_URI: usize = 8 * 1024;

/// Why a URI has no canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriError {
    Empty,
    TooLong,
    /// Leading or trailing whitespace.
    SurroundingSpace,
    /// A control character, raw or percent-encoded.
    Control,
    /// A backslash, raw or percent-encoded.
    Backslash,
    /// No `scheme:` at the start.
    NoScheme,
    /// A `%` not followed by two hex digits.
    BadPercent,
    /// `%2F` in the authority or path.
    EncodedSlash,
    /// An unclosed `{` in a URI template.
    BadTemplate,
    /// A host that is neither a plain ASCII name, a dotted-quad address nor a bracketed IP
    /// literal: a stray `:`, `[` or `]`, non-ASCII or percent-encoded characters (which host
    /// parsers map: `ｌｏｃａｌｈｏｓｔ` is `localhost` to them), or a number in another form
    /// (`2130706433` and `0x7f.1` are 127.0.0.1 to them).
    BadHost,
    /// A `..` segment right after an empty one (`/etc//../x`), which URL parsers and
    /// filesystems resolve differently.
    AmbiguousDotSegment,
    /// User information in a `file:` URI.
    FileUserinfo,
}

impl UriError {
    pub fn message(self) -> &'static str {
        match self {
            UriError::Empty => "is empty",
            UriError::TooLong => "is too long",
            UriError::SurroundingSpace => "has spaces around it",
            UriError::Control => "contains a control character",
            UriError::Backslash => "contains a backslash",
            UriError::NoScheme => "has no scheme",
            UriError::BadPercent => "has a % that is not a percent-encoding",
            UriError::EncodedSlash => "has an encoded / (%2F) in its path",
            UriError::BadTemplate => "has an unclosed { expression",
            UriError::BadHost => "has a host that is not a plain name or address",
            UriError::AmbiguousDotSegment => "has a \"..\" right after an empty segment",
            UriError::FileUserinfo => "is a file: URI with user information",
        }
    }
}

/// How the text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A URI as an agent sends it (`resources/read`).
    Uri,
    /// An RFC 6570 template (`uriTemplate`, `ref/resource`): `{...}` expressions are kept as
    /// they are, everything around them is normalised.
    Template,
    /// A policy rule's glob: `*` and `?` are pattern characters and kept as they are (a `?`
    /// does not start a query).
    Pattern,
}

/// The canonical form of `uri`.
pub fn canonical(uri: &str, mode: Mode) -> Result<String, UriError> {
    if uri.is_empty() {
        return Err(UriError::Empty);
    }
    if uri.len() > MAX_URI {
        return Err(UriError::TooLong);
    }
    let first = uri.chars().next().unwrap_or(' ');
    let last = uri.chars().next_back().unwrap_or(' ');
    if first.is_whitespace() || last.is_whitespace() {
        return Err(UriError::SurroundingSpace);
    }
    for c in uri.chars() {
        if c.is_control() {
            return Err(UriError::Control);
        }
        if c == '\\' {
            return Err(UriError::Backslash);
        }
    }
    let colon = uri.find(':').ok_or(UriError::NoScheme)?;
    let scheme = &uri[..colon];
    let scheme_ok = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return Err(UriError::NoScheme);
    }
    let scheme = scheme.to_ascii_lowercase();
    let rest = &uri[colon + 1..];
    let is_file = scheme == "file";

    // Split off the fragment and the query (a template's `{...}` and a pattern's `?` do not
    // split).
    let (before_fragment, fragment) = split_at_outside(rest, '#', mode);
    let (hier, query) = if mode == Mode::Pattern {
        (before_fragment, None)
    } else {
        split_at_outside(before_fragment, '?', mode)
    };

    let (authority, path) = match hier.strip_prefix("//") {
        Some(after) => {
            let end = after.find('/').unwrap_or(after.len());
            (Some(&after[..end]), &after[end..])
        }
        None => (None, hier),
    };

    let mut out = String::with_capacity(uri.len() + 8);
    out.push_str(&scheme);
    out.push(':');
    let authority = match authority {
        Some(a) => Some(normal_authority(a, &scheme, mode)?),
        // `file:/etc/x` and `file:etc/x` name the same file as `file:///etc/x`.
        None if is_file => Some(String::new()),
        None => None,
    };
    let mut path = encode_part(path, mode, Part::Path)?;
    if let Some(a) = &authority {
        out.push_str("//");
        out.push_str(a);
        if !path.starts_with('/') && (!path.is_empty() || is_file || is_http(&scheme)) {
            path.insert(0, '/');
        }
    }
    if authority.is_some() || path.starts_with('/') {
        // A template's expressions are not path segments (`{/var}`, `{a.b}`): they stand aside
        // as one private-use character each while slashes and dot segments are resolved.
        let (plain, expressions) = set_aside_expressions(&path, mode)?;
        let resolved = collapse_slashes(&remove_dot_segments(&plain)?);
        path = if expressions.is_empty() {
            resolved
        } else {
            restore_expressions(&resolved, &expressions)
        };
    }
    out.push_str(&path);
    // A fragment never names another resource, and a file: URI's query names no other file:
    // both are checked (they must be well formed) and left out of the canonical form, so a rule
    // for `file:///etc/secret` also covers `file:///etc/secret?x#y`.
    if let Some(q) = query {
        let q = encode_part(q, mode, Part::Query)?;
        if !is_file {
            out.push('?');
            out.push_str(&q);
        }
    }
    if let Some(f) = fragment {
        encode_part(f, mode, Part::Query)?;
    }
    Ok(out)
}

fn is_http(scheme: &str) -> bool {
    matches!(scheme, "http" | "https" | "ws" | "wss")
}

/// Splits `s` at the first `sep` outside a template's `{...}` (expressions do not nest: one
/// ends at the first `}`, as [`encode_part`] reads them).
fn split_at_outside(s: &str, sep: char, mode: Mode) -> (&str, Option<&str>) {
    let mut in_expression = false;
    for (i, c) in s.char_indices() {
        match c {
            '{' if mode == Mode::Template => in_expression = true,
            '}' if mode == Mode::Template => in_expression = false,
            c if c == sep && !in_expression => return (&s[..i], Some(&s[i + 1..])),
            _ => {}
        }
    }
    (s, None)
}

fn normal_authority(a: &str, scheme: &str, mode: Mode) -> Result<String, UriError> {
    let (userinfo, hostport) = match a.rfind('@') {
        Some(i) => (Some(&a[..i]), &a[i + 1..]),
        None => (None, a),
    };
    // The port: digits after the last ':' that is not inside an IPv6 literal.
    let (host, port) = match hostport.rfind(':') {
        Some(i)
            if !hostport[i..].contains(']')
                && hostport[i + 1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            (&hostport[..i], Some(&hostport[i + 1..]))
        }
        _ => (hostport, None),
    };
    let literal = host.starts_with('[') && host.ends_with(']');
    let inner = if literal {
        &host[1..host.len() - 1]
    } else {
        host
    };
    let name_ok = |h: &str| {
        h.bytes().all(|b| {
            is_unreserved(b)
                || matches!(
                    b,
                    b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
                )
                || (mode == Mode::Pattern && b == b'?')
        })
    };
    let host_ok = if literal {
        inner
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'v' | b'V'))
    } else {
        name_ok(inner) && !numeric_in_another_form(inner)
    };
    if !host_ok {
        return Err(UriError::BadHost);
    }
    if scheme == "file" && userinfo.is_some() {
        return Err(UriError::FileUserinfo);
    }
    let mut out = String::with_capacity(a.len());
    if let Some(u) = userinfo {
        out.push_str(&encode_part(u, mode, Part::Authority)?);
        out.push('@');
    }
    let host = encode_part(host, mode, Part::Authority)?.to_ascii_lowercase();
    if !(scheme == "file" && host == "localhost") {
        out.push_str(&host);
    }
    let default_port = match scheme {
        "http" | "ws" => Some("80"),
        "https" | "wss" => Some("443"),
        _ => None,
    };
    if let Some(p) = port {
        let p = p.trim_start_matches('0');
        let p = if p.is_empty() && port.is_some_and(|x| !x.is_empty()) {
            "0"
        } else {
            p
        };
        if !p.is_empty() && Some(p) != default_port {
            out.push(':');
            out.push_str(p);
        }
    }
    Ok(out)
}

/// Whether a host's last label is a number (WHATWG hosts then read the whole host as an IPv4
/// address, in decimal, octal or hex, in one to four parts) and the host is not the one
/// canonical spelling of an address, `a.b.c.d` with each part 0-255 without leading zeros.
fn numeric_in_another_form(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    let last = host.rsplit('.').next().unwrap_or(host);
    let numeric = !last.is_empty()
        && (last.bytes().all(|b| b.is_ascii_digit())
            || (last.len() > 1
                && (last.starts_with("0x") || last.starts_with("0X"))
                && last[2..].bytes().all(|b| b.is_ascii_hexdigit())));
    if !numeric {
        return false;
    }
    let parts: Vec<&str> = host.split('.').collect();
    let dotted_quad = parts.len() == 4
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p.len() == 1 || !p.starts_with('0'))
                && p.parse::<u16>().is_ok_and(|n| n <= 255)
        });
    !dotted_quad || host.len() != host.strip_suffix('.').map_or(host.len(), str::len)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Authority,
    Path,
    Query,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters that may stand raw in a URI (RFC 3986 unreserved, sub-delims, `:` `@` `/` `?`,
/// and `[` `]` for IPv6 literals); everything else is percent-encoded.
fn may_stand_raw(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
                | b'?'
                | b'['
                | b']'
        )
}

/// Normalises the percent-encodings of one part and encodes what may not stand raw.
fn encode_part(s: &str, mode: Mode, part: Part) -> Result<String, UriError> {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'{' && mode == Mode::Template {
            let end = s[i..].find('}').ok_or(UriError::BadTemplate)?;
            out.push_str(&s[i..=i + end]);
            i += end + 1;
            continue;
        }
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(UriError::BadPercent)?;
            let value = match (hex_value(hex[0]), hex_value(hex[1])) {
                (Some(h), Some(l)) => h * 16 + l,
                _ => return Err(UriError::BadPercent),
            };
            if value < 0x20 || value == 0x7f {
                return Err(UriError::Control);
            }
            if value == b'\\' {
                return Err(UriError::Backslash);
            }
            if value == b'/' && part != Part::Query {
                return Err(UriError::EncodedSlash);
            }
            if is_unreserved(value) {
                out.push(value as char);
            } else {
                let _ = write!(out, "%{value:02X}");
            }
            i += 3;
            continue;
        }
        if may_stand_raw(b) || (mode == Mode::Pattern && b == b'*') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        i += 1;
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Private-use characters stand for a template's expressions (the text has none of its own:
/// non-ASCII is percent-encoded before this runs).
const EXPRESSION_BASE: u32 = 0xE000;
const MAX_EXPRESSIONS: usize = 6400;

fn set_aside_expressions(path: &str, mode: Mode) -> Result<(String, Vec<String>), UriError> {
    if mode != Mode::Template || !path.contains('{') {
        return Ok((path.to_owned(), Vec::new()));
    }
    let mut plain = String::with_capacity(path.len());
    let mut expressions = Vec::new();
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').ok_or(UriError::BadTemplate)? + start;
        plain.push_str(&rest[..start]);
        if expressions.len() >= MAX_EXPRESSIONS {
            return Err(UriError::BadTemplate);
        }
        let mark = char::from_u32(EXPRESSION_BASE + expressions.len() as u32)
            .ok_or(UriError::BadTemplate)?;
        plain.push(mark);
        expressions.push(rest[start..=end].to_owned());
        rest = &rest[end + 1..];
    }
    plain.push_str(rest);
    Ok((plain, expressions))
}

fn restore_expressions(path: &str, expressions: &[String]) -> String {
    let mut out = String::with_capacity(path.len() + 16);
    for c in path.chars() {
        match (c as u32).checked_sub(EXPRESSION_BASE) {
            Some(i) if (i as usize) < expressions.len() => out.push_str(&expressions[i as usize]),
            _ => out.push(c),
        }
    }
    out
}

fn collapse_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut prev_slash = false;
    for c in path.chars() {
        if c == '/' && prev_slash {
            continue;
        }
        prev_slash = c == '/';
        out.push(c);
    }
    out
}

/// RFC 3986 §5.2.4, on a path that starts with `/`: `.` segments go, `..` removes the segment
/// before it (never above the root).
fn remove_dot_segments(path: &str) -> Result<String, UriError> {
    let mut segments: Vec<&str> = Vec::new();
    let body = path.strip_prefix('/').unwrap_or(path);
    let count = body.split('/').count();
    let mut trailing_slash = false;
    for (i, seg) in body.split('/').enumerate() {
        let last = i == count - 1;
        match seg {
            "." => trailing_slash = last,
            // `/etc//../x`: the URL rules drop the empty segment (`/etc/x`), a filesystem
            // folds the slashes first (`/x`). No safe reading: refused.
            ".." if segments.last() == Some(&"") => return Err(UriError::AmbiguousDotSegment),
            ".." => {
                segments.pop();
                trailing_slash = last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    if path.starts_with('/') {
        out.push('/');
    }
    out.push_str(&segments.join("/"));
    if trailing_slash && !out.ends_with('/') {
        out.push('/');
    }
    Ok(out)
}

/// The canonical form of a filesystem path an argument names (a `prefix` constraint on a
/// path-like argument): repeated slashes are one, `.` segments go; `..` segments, control
/// characters, backslashes and surrounding spaces have no safe canonical form (a `..` can
/// leave the directory through a symbolic link whatever the text says).
pub fn canonical_path(path: &str) -> Result<String, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.starts_with(char::is_whitespace) || path.ends_with(char::is_whitespace) {
        return Err(PathError::SurroundingSpace);
    }
    if path.chars().any(char::is_control) {
        return Err(PathError::Control);
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    let mut out = String::with_capacity(path.len());
    if path.starts_with('/') {
        out.push('/');
    }
    let mut first = true;
    let segments: Vec<&str> = path.split('/').collect();
    let count = segments.len();
    for (i, seg) in segments.into_iter().enumerate() {
        match seg {
            "" | "." => {
                // A trailing `/` or `/.` keeps the path a directory.
                if i == count - 1 && !out.ends_with('/') && !out.is_empty() {
                    out.push('/');
                }
            }
            ".." => return Err(PathError::DotDot),
            // " ." and ". " read like dot segments to a person and to some tools.
            s if s.starts_with(char::is_whitespace) || s.ends_with(char::is_whitespace) => {
                return Err(PathError::SurroundingSpace);
            }
            s => {
                if !first && !out.ends_with('/') {
                    out.push('/');
                }
                out.push_str(s);
                first = false;
            }
        }
    }
    if out.is_empty() {
        // A relative path of only `.` segments: the current directory.
        out.push('.');
    }
    Ok(out)
}

/// Why a path argument has no canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    Empty,
    SurroundingSpace,
    Control,
    Backslash,
    DotDot,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::Empty => "is empty",
            PathError::SurroundingSpace => "has spaces around it or one of its segments",
            PathError::Control => "contains a control character",
            PathError::Backslash => "contains a backslash",
            PathError::DotDot => "has a \"..\" segment",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(uri: &str) -> Result<String, UriError> {
        canonical(uri, Mode::Uri)
    }

    #[test]
    fn the_probes_of_the_security_review_all_read_etc_secret() {
        for probe in [
            "file:///etc/secret",
            "FILE:///etc/secret",
            "File:///etc/./secret",
            "file:///srv/../etc/secret",
            "file://localhost/etc/secret",
            "file://LOCALHOST/etc/secret",
            "file:/etc/secret",
            "file:////etc/secret",
            "file:///etc//secret",
            "file:///%65tc/secret",
            "file:///etc/%2e/secret",
            "file:///srv/%2E%2E/etc/secret",
            "file:///srv/x/../../etc/secret",
            "file:///../etc/secret",
            "file:///etc/secret?x",
            "file:///etc/secret#frag",
            "file://127.0.0.1/etc/secret"
                .replace("127.0.0.1", "localhost")
                .as_str(),
        ] {
            assert_eq!(c(probe).as_deref(), Ok("file:///etc/secret"), "{probe}");
        }
    }

    #[test]
    fn what_has_no_safe_form_is_refused() {
        assert_eq!(c(" file:///etc/secret"), Err(UriError::SurroundingSpace));
        assert_eq!(c("file:///etc/secret "), Err(UriError::SurroundingSpace));
        assert_eq!(c("file:///etc\\secret"), Err(UriError::Backslash));
        assert_eq!(c("file:///etc%5csecret"), Err(UriError::Backslash));
        assert_eq!(c("file:///etc/sec\u{0}ret"), Err(UriError::Control));
        assert_eq!(c("file:///etc/sec%00ret"), Err(UriError::Control));
        assert_eq!(c("file:///etc/\nsecret"), Err(UriError::Control));
        assert_eq!(c("file:///etc%2fsecret"), Err(UriError::EncodedSlash));
        assert_eq!(c("file:///etc/%zzsecret"), Err(UriError::BadPercent));
        assert_eq!(c("file:///etc/secret%"), Err(UriError::BadPercent));
        assert_eq!(c("/etc/secret"), Err(UriError::NoScheme));
        assert_eq!(c("1x:/etc"), Err(UriError::NoScheme));
        assert_eq!(c(""), Err(UriError::Empty));
        assert_eq!(c("x://a:b:/"), Err(UriError::BadHost));
        assert_eq!(
            c("file:///etc//../secret"),
            Err(UriError::AmbiguousDotSegment)
        );
        assert_eq!(c("file:///srv//./../x"), Err(UriError::AmbiguousDotSegment));
        assert_eq!(
            c("file://ｌｏｃａｌｈｏｓｔ/etc/secret"),
            Err(UriError::BadHost)
        );
        assert_eq!(
            c("file://local%C2%ADhost/etc/secret"),
            Err(UriError::BadHost)
        );
        assert_eq!(
            c("file://local\u{ad}host/etc/secret"),
            Err(UriError::BadHost)
        );
        assert_eq!(c("http://2130706433/"), Err(UriError::BadHost));
        assert_eq!(c("http://0x7f.1/"), Err(UriError::BadHost));
        assert_eq!(c("http://127.1/"), Err(UriError::BadHost));
        assert_eq!(c("http://017.0.0.1/"), Err(UriError::BadHost));
        assert_eq!(c("http://127.0.0.1/").as_deref(), Ok("http://127.0.0.1/"));
        assert_eq!(c("http://v1.example/").as_deref(), Ok("http://v1.example/"));
        assert_eq!(
            c("file://user@localhost/etc/x"),
            Err(UriError::FileUserinfo)
        );
        assert_eq!(c("x://[::1]x/"), Err(UriError::BadHost));
        assert_eq!(c("x://[zz]/"), Err(UriError::BadHost));
        assert_eq!(c("HTTP://[::1]:80/a").as_deref(), Ok("http://[::1]/a"));
    }

    #[test]
    fn other_schemes() {
        assert_eq!(
            c("HTTP://Example.COM:80/a/./b/../c?Q=%7e%41#F").as_deref(),
            Ok("http://example.com/a/c?Q=~A")
        );
        assert_eq!(
            c("https://example.com:443").as_deref(),
            Ok("https://example.com/")
        );
        assert_eq!(
            c("https://example.com:8443/x").as_deref(),
            Ok("https://example.com:8443/x")
        );
        assert_eq!(
            c("demo://resource/static/1").as_deref(),
            Ok("demo://resource/static/1")
        );
        assert_eq!(
            c("urn:isbn:0451450523").as_deref(),
            Ok("urn:isbn:0451450523")
        );
        assert_eq!(
            c("file:///my file/é").as_deref(),
            Ok("file:///my%20file/%C3%A9")
        );
        assert_eq!(
            c("file:///a%2Fb?x=%2f").unwrap_err(),
            UriError::EncodedSlash
        );
        assert_eq!(c("x:/a?x=%2f").as_deref(), Ok("x:/a?x=%2F"));
    }

    #[test]
    fn templates_and_patterns() {
        assert_eq!(
            canonical("FILE:///etc/{name}", Mode::Template).as_deref(),
            Ok("file:///etc/{name}")
        );
        assert_eq!(
            canonical("file:///srv/{+path}{?q}", Mode::Template).as_deref(),
            Ok("file:///srv/{+path}{?q}")
        );
        assert_eq!(
            canonical("file:///etc/{name", Mode::Template),
            Err(UriError::BadTemplate)
        );
        assert_eq!(
            canonical("file:///etc/*", Mode::Pattern).as_deref(),
            Ok("file:///etc/*")
        );
        assert_eq!(
            canonical("file:///etc/?ecret", Mode::Pattern).as_deref(),
            Ok("file:///etc/?ecret")
        );
        assert_eq!(
            canonical("FILE://localhost/etc/*", Mode::Pattern).as_deref(),
            Ok("file:///etc/*")
        );
    }

    #[test]
    fn paths() {
        assert_eq!(
            canonical_path("/srv/shared/a").as_deref(),
            Ok("/srv/shared/a")
        );
        assert_eq!(
            canonical_path("/srv//shared/./a/").as_deref(),
            Ok("/srv/shared/a/")
        );
        assert_eq!(canonical_path("//srv/shared").as_deref(), Ok("/srv/shared"));
        assert_eq!(
            canonical_path("/srv/shared/.").as_deref(),
            Ok("/srv/shared/")
        );
        assert_eq!(canonical_path("/srv/shared/../x"), Err(PathError::DotDot));
        assert_eq!(canonical_path("/srv/shared/.."), Err(PathError::DotDot));
        assert_eq!(canonical_path("/srv\\x"), Err(PathError::Backslash));
        assert_eq!(canonical_path(" /srv"), Err(PathError::SurroundingSpace));
        assert_eq!(canonical_path("/srv/a\0"), Err(PathError::Control));
        assert_eq!(canonical_path("rel/./x").as_deref(), Ok("rel/x"));
        assert_eq!(canonical_path("/").as_deref(), Ok("/"));
        assert_eq!(canonical_path("/.").as_deref(), Ok("/"));
        assert_eq!(canonical_path(".").as_deref(), Ok("."));
        assert_eq!(canonical_path("./ ./."), Err(PathError::SurroundingSpace));
        assert_eq!(canonical_path("/srv/a b/c").as_deref(), Ok("/srv/a b/c"));
        assert_eq!(canonical_path("./.").as_deref(), Ok("."));
    }
}
