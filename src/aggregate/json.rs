//! Byte-level helpers for the aggregate endpoint: find where a value sits in a JSON text, so it
//! can be spliced with the rest of the body left byte-identical.

/// The byte range of the value at `path` (object keys, from the top) in `body`, a JSON text the
/// envelope parser has already validated (so it is well formed and has no duplicate keys). Keys
/// are compared as written; a key spelled with escapes is not found, and the caller refuses the
/// request rather than guess.
pub fn locate(body: &[u8], path: &[&str]) -> Option<(usize, usize)> {
    let mut i = skip_ws(body, 0);
    for key in path {
        if body.get(i) != Some(&b'{') {
            return None;
        }
        i = skip_ws(body, i + 1);
        let mut found = None;
        while body.get(i) == Some(&b'"') {
            let key_end = string_end(body, i)?;
            let this = &body[i + 1..key_end - 1];
            i = skip_ws(body, key_end);
            if body.get(i) != Some(&b':') {
                return None;
            }
            let value = skip_ws(body, i + 1);
            let value_end = value_end(body, value)?;
            if this == key.as_bytes() {
                found = Some(value);
                break;
            }
            i = skip_ws(body, value_end);
            match body.get(i) {
                Some(b',') => i = skip_ws(body, i + 1),
                _ => break,
            }
        }
        i = found?;
    }
    Some((i, value_end(body, i)?))
}

fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while matches!(body.get(i), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        i += 1;
    }
    i
}

/// `i` at an opening quote: the index just past the closing one.
fn string_end(body: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        match body.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The index just past the value starting at `i`.
fn value_end(body: &[u8], i: usize) -> Option<usize> {
    match body.get(i)? {
        b'"' => string_end(body, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match body.get(j)? {
                    b'"' => {
                        j = string_end(body, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while let Some(b) = body.get(j) {
                if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n') {
                    break;
                }
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// `body` with `range` replaced by `with`.
pub fn splice(body: &[u8], range: (usize, usize), with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + with.len());
    out.extend_from_slice(&body[..range.0]);
    out.extend_from_slice(with);
    out.extend_from_slice(&body[range.1..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_values_and_skips_lookalikes() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{"name":"decoy","x":[{"name":"n"}]},"name" : "gh__create","z":"\"name\""}}"#;
        let (a, b) = locate(body, &["params", "name"]).unwrap();
        assert_eq!(&body[a..b], br#""gh__create""#);
        let (a, b) = locate(body, &["id"]).unwrap();
        assert_eq!(&body[a..b], b"1");
        let (a, b) = locate(body, &["params", "arguments"]).unwrap();
        assert_eq!(&body[a..b], br#"{"name":"decoy","x":[{"name":"n"}]}"#);
        assert!(locate(body, &["params", "missing"]).is_none());
        assert!(locate(body, &["id", "x"]).is_none());
        let spliced = splice(
            body,
            locate(body, &["params", "name"]).unwrap(),
            br#""create""#,
        );
        assert_eq!(
            spliced,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{"name":"decoy","x":[{"name":"n"}]},"name" : "create","z":"\"name\""}}"#
        );
    }

    #[test]
    fn escaped_keys_are_not_guessed() {
        let body = br#"{"params":{"na\u006de":"x"}}"#;
        assert!(locate(body, &["params", "name"]).is_none());
        let body = br#"{"params":{"a":"\\","name":"y\"z"}}"#;
        let (a, b) = locate(body, &["params", "name"]).unwrap();
        assert_eq!(&body[a..b], br#""y\"z""#);
    }
}
