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

/// Whether two keys are the same to a parser that ignores letter case (Unicode simple case
/// folding, approximated as upper case then lower case, character by character: it folds
/// `ſ` with `s` and the Kelvin sign with `k`, and a little more, which only refuses more).
pub fn fold_eq(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(b);
    }
    folded(a).eq(folded(b))
}

fn folded(s: &str) -> impl Iterator<Item = char> + '_ {
    s.chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
}

/// The field of `known` that `key` is a case variant of (equal when folded, not as written).
pub fn variant_of(key: &str, known: &[&'static str]) -> Option<&'static str> {
    known
        .iter()
        .find(|k| **k != key && fold_eq(key, k))
        .copied()
}

/// Whether any object in the value at `nodes[at]` (itself or nested at any depth) has two keys
/// that are the same when folded.
pub fn has_folded_twins(nodes: &[Node<'_>], at: usize) -> bool {
    let Some(first) = nodes.get(at) else {
        return false;
    };
    let end = (at + node_span(first)).min(nodes.len());
    (at..end).any(|i| match nodes[i] {
        Node::Object { len, .. } => {
            let keys = (0..len).scan(i + 1, |idx, _| {
                let (Some(Node::String(key)), Some(value)) = (nodes.get(*idx), nodes.get(*idx + 1))
                else {
                    return None;
                };
                *idx += 1 + node_span(value);
                Some(*key)
            });
            // Small objects (the norm) on the stack, compared pairwise: no allocation.
            if len <= SMALL {
                let mut small = [""; SMALL];
                let mut n = 0;
                for key in keys {
                    small[n] = key;
                    n += 1;
                }
                twins(&mut small[..n])
            } else {
                twins(&mut keys.collect::<Vec<_>>())
            }
        }
        _ => false,
    })
}

/// Objects with at most this many keys are checked without allocating.
const SMALL: usize = 16;

/// Whether two of `keys` are the same when folded (the order of `keys` is lost).
fn twins(keys: &mut [&str]) -> bool {
    if keys.len() <= SMALL {
        return (1..keys.len()).any(|i| keys[..i].iter().any(|k| fold_eq(k, keys[i])));
    }
    if keys.iter().all(|k| k.is_ascii()) {
        keys.sort_unstable_by(|a, b| {
            let a = a.bytes().map(|c| c.to_ascii_lowercase());
            a.cmp(b.bytes().map(|c| c.to_ascii_lowercase()))
        });
        return keys.windows(2).any(|w| w[0].eq_ignore_ascii_case(w[1]));
    }
    let mut all: Vec<String> = keys.iter().map(|k| folded(k).collect()).collect();
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
        assert_eq!(variant_of("Name", &["name", "uri"]), Some("name"));
        assert_eq!(variant_of("name", &["name", "uri"]), None);
        assert_eq!(variant_of("cursor", &["name", "uri"]), None);
    }

    #[test]
    fn twins_are_found_in_small_and_large_objects_at_any_depth() {
        let tape_of = |json: &str| {
            let mut bytes = json.as_bytes().to_vec();
            let tape = simd_json::to_tape(&mut bytes).unwrap();
            has_folded_twins(&tape.0, 0)
        };
        assert!(!tape_of(r#"{"path":"/a","n":1}"#));
        assert!(tape_of(r#"{"path":"/a","PATH":"/etc/passwd"}"#));
        assert!(tape_of(r#"{"a":[{"x":1},{"mode":"r","MODE":"w"}]}"#));
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        assert!(!tape_of(&format!("{{{}}}", many.join(","))));
        assert!(tape_of(&format!("{{{},\"K7\":0}}", many.join(","))));
        assert!(tape_of(&format!("{{{},\"\u{212a}7\":0}}", many.join(","))));
    }
}
