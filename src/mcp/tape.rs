//! Walking a simd-json tape, and the keys that parsers read differently.
//!
//! Some parsers match object keys without regard to letter case, Unicode's included (Go's
//! `encoding/json` binds `"Method"`, `"METHOD"` and `"method"` to one field, `ſ` reads as `s`,
//! the Kelvin sign as `k`), and the last one wins. A body with two such keys in one object, or
//! with a case variant of a field scopegate reads, would run something other than what was
//! authorized on such an upstream, so it is refused.

use simd_json::Node;

/// Number of tape nodes a value occupies, header included.
pub fn node_span(node: &Node<'_>) -> usize {
    match node {
        Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
        _ => 1,
    }
}

/// Whether two keys are the same to a parser that ignores letter case (simple case folding,
/// character for character, as Go's `strings.EqualFold`: `ſ` is `s`, the Kelvin sign `k`, but
/// `ß` is not `ss`).
pub fn fold_eq(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    a.chars().map(fold_char).eq(b.chars().map(fold_char))
}

/// One character folded: its upper case's lower case, where both are one character.
fn fold_char(c: char) -> char {
    let mut upper = c.to_uppercase();
    let (Some(u), None) = (upper.next(), upper.next()) else {
        return c;
    };
    let mut lower = u.to_lowercase();
    match (lower.next(), lower.next()) {
        (Some(l), None) => l,
        _ => c,
    }
}

/// The field of `known` that `key` is a case variant of (equal when folded, not as written).
pub fn variant_of(key: &str, known: &[&'static str]) -> Option<&'static str> {
    known
        .iter()
        .find(|k| **k != key && fold_eq(key, k))
        .copied()
}

/// When two keys are the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Same {
    /// As written (escapes resolved): a duplicate.
    Exact,
    /// Once folded ([`fold_eq`]).
    Folded,
}

/// Whether the object at `nodes[at]`, or an object that is a member of it down to `depth`
/// levels, has two keys that are the `same`. Deeper objects are data to scopegate (nothing it
/// checks reads them; a case-blind parser keeps a map's keys apart).
pub fn has_twins(nodes: &[Node<'_>], at: usize, depth: usize, same: Same) -> bool {
    let Some(Node::Object { len, .. }) = nodes.get(at) else {
        return false;
    };
    let mut small = [""; SMALL];
    let mut many: Vec<&str> = Vec::new();
    let mut idx = at + 1;
    for i in 0..*len {
        let (Some(Node::String(key)), Some(value)) = (nodes.get(idx), nodes.get(idx + 1)) else {
            return false;
        };
        if depth > 0 && has_twins(nodes, idx + 1, depth - 1, same) {
            return true;
        }
        match small.get_mut(i) {
            Some(slot) if *len <= SMALL => *slot = key,
            _ => many.push(key),
        }
        idx += 1 + node_span(value);
    }
    let keys = match *len <= SMALL {
        true => &mut small[..*len],
        false => &mut many[..],
    };
    match same {
        Same::Exact => exact_twins(keys),
        Same::Folded => folded_twins(keys),
    }
}

/// Objects with at most this many keys are checked without allocating (unless a key is not
/// ASCII).
const SMALL: usize = 16;

/// Whether two of `keys` are equal (the order of `keys` is lost).
fn exact_twins(keys: &mut [&str]) -> bool {
    if keys.len() <= SMALL {
        return (1..keys.len()).any(|i| keys[..i].contains(&keys[i]));
    }
    keys.sort_unstable();
    keys.windows(2).any(|w| w[0] == w[1])
}

/// Whether two of `keys` are the same when folded (the order of `keys` is lost).
fn folded_twins(keys: &mut [&str]) -> bool {
    if keys.iter().all(|k| k.is_ascii()) {
        if keys.len() <= SMALL {
            return (1..keys.len())
                .any(|i| keys[..i].iter().any(|k| k.eq_ignore_ascii_case(keys[i])));
        }
        keys.sort_unstable_by(|a, b| {
            let a = a.bytes().map(|c| c.to_ascii_lowercase());
            a.cmp(b.bytes().map(|c| c.to_ascii_lowercase()))
        });
        return keys.windows(2).any(|w| w[0].eq_ignore_ascii_case(w[1]));
    }
    // Folded once each, then compared as strings.
    let mut all: Vec<String> = keys
        .iter()
        .map(|k| k.chars().map(fold_char).collect())
        .collect();
    all.sort_unstable();
    all.windows(2).any(|w| w[0] == w[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fold_as_a_case_blind_parser_reads_them() {
        assert!(fold_eq("method", "METHOD"));
        assert!(fold_eq("params", "param\u{17f}"), "long s");
        assert!(fold_eq("kind", "\u{212a}ind"), "Kelvin sign");
        assert!(!fold_eq("name", "names"));
        assert!(
            !fold_eq("stra\u{df}e", "STRASSE"),
            "simple folding: ß is not ss"
        );
        assert_eq!(variant_of("Name", &["name", "uri"]), Some("name"));
        assert_eq!(variant_of("name", &["name", "uri"]), None);
        assert_eq!(variant_of("cursor", &["name", "uri"]), None);
    }

    #[test]
    fn twins_are_found_in_small_and_large_objects_at_any_depth() {
        let tape_of = |json: &str| {
            let mut bytes = json.as_bytes().to_vec();
            let tape = simd_json::to_tape(&mut bytes).unwrap();
            has_twins(&tape.0, 0, 1, Same::Folded)
        };
        assert!(!tape_of(r#"{"path":"/a","n":1}"#));
        assert!(tape_of(r#"{"path":"/a","PATH":"/etc/passwd"}"#));
        assert!(
            tape_of(r#"{"o":{"mode":"r","MODE":"w"}}"#),
            "a member object"
        );
        // Deeper, and in arrays: data (maps keep their keys apart).
        assert!(!tape_of(r#"{"a":{"files":{"README":1,"readme":2}}}"#));
        assert!(!tape_of(r#"{"a":[{"x":1},{"mode":"r","MODE":"w"}]}"#));
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        assert!(!tape_of(&format!("{{{}}}", many.join(","))));
        assert!(tape_of(&format!("{{{},\"K7\":0}}", many.join(","))));
        assert!(tape_of(&format!("{{{},\"\u{212a}7\":0}}", many.join(","))));
    }
}
