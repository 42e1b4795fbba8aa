//! Argument constraints (`[agent.tool.args]`), checked against the parsed arguments of a
//! tools/call without converting them: the values are read straight off the envelope's tape.
//!
//! Semantics: a constraint applies to an argument when it is present; absent arguments pass
//! (the tool's own schema decides whether they are required). A value of the wrong type for its
//! constraint is refused.

use std::cmp::Ordering;

use simd_json::{Node, StaticNode};

use crate::mcp::uri;

/// A literal in `one_of`.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// A `min` or `max` as written: integers stay integers, so a bound of 10^16 is compared with
/// 10^16 + 1 exactly (as f64 both are 10^16, and the call would pass).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    Int(i64),
    Float(f64),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Int(n) => write!(f, "{n}"),
            Bound::Float(x) => write!(f, "{x}"),
        }
    }
}

impl Bound {
    /// How a JSON number compares with this bound, exactly. The envelope parser refuses
    /// integers beyond 64 bits, so every number that reaches here is exact as parsed.
    pub fn compare(self, value: &StaticNode) -> Option<Ordering> {
        match (value, self) {
            (StaticNode::I64(v), Bound::Int(b)) => Some(v.cmp(&b)),
            (StaticNode::U64(v), Bound::Int(b)) => Some(i128::from(*v).cmp(&i128::from(b))),
            (StaticNode::I64(v), Bound::Float(b)) => cmp_int_float(i128::from(*v), b),
            (StaticNode::U64(v), Bound::Float(b)) => cmp_int_float(i128::from(*v), b),
            (StaticNode::F64(v), Bound::Int(b)) => {
                cmp_int_float(i128::from(b), *v).map(Ordering::reverse)
            }
            (StaticNode::F64(v), Bound::Float(b)) => v.partial_cmp(&b),
            _ => None,
        }
    }
}

/// `i` compared with `f`, exactly (no rounding of either).
fn cmp_int_float(i: i128, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    // Beyond i128 (about 1.7e38) every 64-bit integer is on one side.
    if f >= 1.0e38 {
        return Some(Ordering::Less);
    }
    if f <= -1.0e38 {
        return Some(Ordering::Greater);
    }
    let floor = f.floor();
    // Exact: an integral f64 below 2^127 converts to i128 without loss.
    let whole = floor as i128;
    Some(match i.cmp(&whole) {
        Ordering::Equal if f > floor => Ordering::Less,
        other => other,
    })
}

/// A `prefix` constraint. What the prefix looks like says what the argument is: a prefix that
/// is a URI (`file:///srv/`) makes the argument a URI, compared in its canonical form; one with
/// a `/` in it (`/srv/`, `data/`, `~/notes/`) makes it a filesystem path, compared in its
/// canonical form ([`crate::mcp::uri::canonical_path`]: `..` refused, `//` and `/./` folded);
/// anything else is a plain string prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    pub text: String,
    pub kind: PrefixKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixKind {
    Plain,
    Path,
    Uri,
}

impl Prefix {
    /// Reads a prefix from the policy; `Err` says how to write it (a path or URI prefix must be
    /// written in canonical form, since values are compared in theirs).
    pub fn new(text: &str) -> Result<Prefix, String> {
        let looks_like_uri = text.contains("://") || text.starts_with("file:");
        let (kind, canonical) = if looks_like_uri {
            let c = uri::canonical(text, uri::Mode::Uri)
                .map_err(|e| format!("prefix {text:?} {}", e.message()))?;
            (PrefixKind::Uri, c)
        } else if text.contains('/') {
            let c = uri::canonical_path(text)
                .map_err(|e| format!("prefix {text:?} {}", e.message()))?;
            (PrefixKind::Path, c)
        } else {
            (PrefixKind::Plain, text.to_owned())
        };
        if canonical != text {
            return Err(format!(
                "prefix {text:?} is not in canonical form: write it as {canonical:?} (values are compared in that form)"
            ));
        }
        Ok(Prefix {
            text: canonical,
            kind,
        })
    }

    /// A directory prefix without its final `/` also admits its siblings
    /// (`/srv/shared` admits `/srv/shared-other`): worth a warning at load.
    pub fn admits_siblings(&self) -> bool {
        self.kind != PrefixKind::Plain && !self.text.ends_with('/')
    }

    fn check(&self, s: &str) -> Result<(), String> {
        let prefix = &self.text;
        let canonical = match self.kind {
            PrefixKind::Plain => None,
            PrefixKind::Path => Some(uri::canonical_path(s).map_err(|e| {
                format!("must be a path under {prefix:?}; this one {}", e.message())
            })?),
            PrefixKind::Uri => Some(uri::canonical(s, uri::Mode::Uri).map_err(|e| {
                format!("must be a URI under {prefix:?}; this one {}", e.message())
            })?),
        };
        let value = canonical.as_deref().unwrap_or(s);
        if !value.starts_with(prefix.as_str()) {
            return Err(match canonical {
                Some(c) if c != s => {
                    format!("must start with {prefix:?} (it is {c:?} in canonical form)")
                }
                _ => format!("must start with {prefix:?}"),
            });
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Constraint {
    pub one_of: Option<Vec<Literal>>,
    pub prefix: Option<Prefix>,
    pub pattern: Option<regex::Regex>,
    pub max_len: Option<u64>,
    pub min: Option<Bound>,
    pub max: Option<Bound>,
    /// The value must be an array, and each of its items meets this (`paths = { items = {
    /// prefix = "/srv/" } }`).
    pub items: Option<Box<Constraint>>,
}

impl Constraint {
    /// Checks one value (its tape nodes, header first). `Err` says why, in words for the agent.
    pub fn check(&self, value: &[Node<'_>]) -> Result<(), String> {
        let Some(first) = value.first() else {
            return Err("missing value".into());
        };
        if let Some(options) = &self.one_of
            && !options.iter().any(|o| literal_equals(o, first))
        {
            return Err(format!("must be one of {}", describe(options)));
        }
        if let Some(prefix) = &self.prefix {
            let Node::String(s) = first else {
                return Err(format!("must be a string starting with {:?}", prefix.text));
            };
            prefix.check(s)?;
        }
        if let Some(re) = &self.pattern {
            let Node::String(s) = first else {
                return Err(format!("must be a string matching {}", re.as_str()));
            };
            if !re.is_match(s) {
                return Err(format!("must match {}", re.as_str()));
            }
        }
        if let Some(max_len) = self.max_len {
            match first {
                Node::String(s) => {
                    let n = s.chars().count() as u64;
                    if n > max_len {
                        return Err(format!("is {n} characters, the limit is {max_len}"));
                    }
                }
                Node::Array { len, .. } => {
                    if *len as u64 > max_len {
                        return Err(format!("has {len} items, the limit is {max_len}"));
                    }
                }
                _ => return Err(format!("must be a string or an array (max_len {max_len})")),
            }
        }
        if self.min.is_some() || self.max.is_some() {
            let Node::Static(n @ (StaticNode::I64(_) | StaticNode::U64(_) | StaticNode::F64(_))) =
                first
            else {
                return Err("must be a number".into());
            };
            // Past 2^53 a decimal written with a fraction or an exponent no longer has one
            // reading: parsed to the nearest double here, exactly by a server with decimals
            // (`10000000000000001.0` is 10^16 as a double). Integers are exact; such floats
            // are refused rather than compared.
            if let StaticNode::F64(f) = n
                && f.abs() >= 9_007_199_254_740_992.0
            {
                return Err(
                    "is a number written as a decimal beyond 2^53, which cannot be compared exactly: write it as an integer".into(),
                );
            }
            if let Some(min) = self.min
                && min.compare(n) != Some(Ordering::Greater)
                && min.compare(n) != Some(Ordering::Equal)
            {
                return Err(format!("is {}, below the minimum {min}", show(n)));
            }
            if let Some(max) = self.max
                && max.compare(n) != Some(Ordering::Less)
                && max.compare(n) != Some(Ordering::Equal)
            {
                return Err(format!("is {}, above the maximum {max}", show(n)));
            }
        }
        if let Some(each) = &self.items {
            let Node::Array { len, .. } = first else {
                return Err("must be an array".into());
            };
            let mut at = 1;
            for i in 0..*len {
                let span = value
                    .get(at)
                    .map(crate::mcp::tape::node_span)
                    .ok_or("is a malformed array")?;
                let item = value.get(at..at + span).ok_or("is a malformed array")?;
                each.check(item).map_err(|why| format!("item {i} {why}"))?;
                at += span;
            }
        }
        Ok(())
    }
}

fn show(n: &StaticNode) -> String {
    match n {
        StaticNode::I64(v) => v.to_string(),
        StaticNode::U64(v) => v.to_string(),
        StaticNode::F64(v) => v.to_string(),
        _ => String::new(),
    }
}

fn literal_equals(lit: &Literal, node: &Node<'_>) -> bool {
    match (lit, node) {
        (Literal::Str(a), Node::String(b)) => a == b,
        (Literal::Bool(a), Node::Static(StaticNode::Bool(b))) => a == b,
        (Literal::Int(a), Node::Static(StaticNode::I64(b))) => a == b,
        (Literal::Int(a), Node::Static(StaticNode::U64(b))) => {
            i64::try_from(*b).is_ok_and(|b| *a == b)
        }
        (Literal::Int(a), Node::Static(StaticNode::F64(b))) => (*a as f64) == *b,
        (Literal::Float(a), Node::Static(StaticNode::F64(b))) => a == b,
        (Literal::Float(a), Node::Static(StaticNode::I64(b))) => *a == *b as f64,
        (Literal::Float(a), Node::Static(StaticNode::U64(b))) => *a == *b as f64,
        _ => false,
    }
}

fn describe(options: &[Literal]) -> String {
    let items: Vec<String> = options
        .iter()
        .map(|o| match o {
            Literal::Str(s) => format!("{s:?}"),
            Literal::Int(n) => n.to_string(),
            Literal::Float(f) => f.to_string(),
            Literal::Bool(b) => b.to_string(),
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// Iterates `(name, value nodes)` over an arguments object's tape nodes.
pub fn arguments_iter<'t, 'a>(
    args: &'t [Node<'a>],
) -> impl Iterator<Item = (&'a str, &'t [Node<'a>])> + 't {
    crate::mcp::envelope::object_entries(args, 0)
        .map_while(Result::ok)
        .filter_map(move |(key, at)| {
            let end = at + crate::mcp::tape::node_span(args.get(at)?);
            Some((key, args.get(at..end)?))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(c: &Constraint, json: &str) -> Result<(), String> {
        let mut bytes = json.as_bytes().to_vec();
        let tape = simd_json::to_tape(&mut bytes).unwrap();
        c.check(&tape.0)
    }

    fn none() -> Constraint {
        Constraint {
            one_of: None,
            prefix: None,
            pattern: None,
            max_len: None,
            min: None,
            max: None,
            items: None,
        }
    }

    #[test]
    fn items_each_meet_the_constraint() {
        let c = Constraint {
            items: Some(Box::new(Constraint {
                prefix: Some(Prefix::new("/srv/data/").unwrap()),
                ..none()
            })),
            ..none()
        };
        assert!(check(&c, r#"["/srv/data/a", "/srv/data/b/c"]"#).is_ok());
        assert!(check(&c, "[]").is_ok());
        let e = check(&c, r#"["/srv/data/a", "/etc/passwd"]"#).unwrap_err();
        assert!(e.starts_with("item 1 "), "{e}");
        assert!(check(&c, r#"["/srv/data/../etc/passwd"]"#).is_err());
        assert!(check(&c, r#""/srv/data/a""#).unwrap_err().contains("array"));
        // Items that are containers are skipped over whole, not read into.
        let c = Constraint {
            items: Some(Box::new(Constraint {
                max_len: Some(2),
                ..none()
            })),
            ..none()
        };
        assert!(check(&c, r#"[[1,2],"ab",[3]]"#).is_ok());
        assert!(
            check(&c, r#"[[1,2],[1,2,3]]"#)
                .unwrap_err()
                .starts_with("item 1 ")
        );
        assert!(check(&c, r#"[{"a":[1,2,3]},"abc"]"#).is_err());
    }

    #[test]
    fn one_of() {
        let c = Constraint {
            one_of: Some(vec![
                Literal::Str("acme/web".into()),
                Literal::Str("acme/api".into()),
            ]),
            ..none()
        };
        assert!(check(&c, r#""acme/web""#).is_ok());
        assert!(
            check(&c, r#""acme/secret""#)
                .unwrap_err()
                .contains("one of")
        );
        assert!(check(&c, "3").is_err());
        let c = Constraint {
            one_of: Some(vec![Literal::Int(1), Literal::Bool(true)]),
            ..none()
        };
        assert!(check(&c, "1").is_ok());
        assert!(check(&c, "1.0").is_ok());
        assert!(check(&c, "true").is_ok());
        assert!(check(&c, "2").is_err());
    }

    #[test]
    fn prefix_and_pattern() {
        let c = Constraint {
            prefix: Some(Prefix::new("/srv/shared/").unwrap()),
            pattern: Some(regex::Regex::new("^[A-Za-z0-9_./-]+$").unwrap()),
            ..none()
        };
        assert!(check(&c, r#""/srv/shared/a/b.txt""#).is_ok());
        assert!(
            check(&c, r#""/etc/passwd""#)
                .unwrap_err()
                .contains("start with")
        );
        assert!(
            check(&c, r#""/srv/shared/../../etc/passwd""#)
                .unwrap_err()
                .contains("..")
        );
        assert!(
            check(&c, r#""/srv/shared/a b""#)
                .unwrap_err()
                .contains("match")
        );
        assert!(check(&c, "42").is_err());
        // Escapes are resolved before the check, as the tool will see them.
        assert!(check(&c, r#""\/srv\/shared\/x""#).is_ok());
        assert!(check(&c, r#""/srv/shared/\u002e\u002e/x""#).is_err());
    }

    #[test]
    fn lengths_and_bounds() {
        let c = Constraint {
            max_len: Some(5),
            ..none()
        };
        assert!(check(&c, r#""héllo""#).is_ok(), "characters, not bytes");
        assert!(check(&c, r#""hello!""#).is_err());
        assert!(check(&c, "[1,2,3,4,5]").is_ok());
        assert!(check(&c, "[1,2,3,4,5,6]").unwrap_err().contains("6 items"));
        assert!(check(&c, "{}").is_err());
        let c = Constraint {
            min: Some(Bound::Int(0)),
            max: Some(Bound::Int(3)),
            ..none()
        };
        assert!(check(&c, "0").is_ok());
        assert!(check(&c, "3").is_ok());
        assert!(check(&c, "2.5").is_ok());
        assert!(check(&c, "4").unwrap_err().contains("maximum"));
        assert!(check(&c, "-1").unwrap_err().contains("minimum"));
        assert!(check(&c, r#""2""#).is_err());
    }

    #[test]
    fn bounds_compare_exactly() {
        let c = Constraint {
            max: Some(Bound::Int(10_000_000_000_000_000)),
            ..none()
        };
        assert!(check(&c, "10000000000000000").is_ok());
        assert!(check(&c, "10000000000000001").is_err(), "one above 10^16");
        assert!(
            check(&c, "10000000000000000.5").is_err(),
            "a decimal past 2^53"
        );
        assert!(check(&c, "10000000000000001.0").is_err());
        assert!(check(&c, "1e16").is_err());
        assert!(check(&c, "9007199254740991.0").is_ok());
        let c = Constraint {
            min: Some(Bound::Float(0.5)),
            max: Some(Bound::Float(1e19)),
            ..none()
        };
        assert!(check(&c, "0").unwrap_err().contains("minimum"));
        assert!(check(&c, "1").is_ok());
        assert!(check(&c, "10000000000000000000").is_ok());
        assert!(check(&c, "10000000000000000001").is_err());
        assert!(check(&c, "1e18").is_err(), "a decimal past 2^53");
        assert!(check(&c, "18446744073709551615").is_err());
        let c = Constraint {
            min: Some(Bound::Int(i64::MIN)),
            max: Some(Bound::Int(-1)),
            ..none()
        };
        assert!(check(&c, "-9223372036854775808").is_ok());
        assert!(check(&c, "-1.5").is_ok());
        assert!(check(&c, "-0.5").is_err());
        assert!(check(&c, "-0.0").is_err());
        assert!(check(&c, "9223372036854775808").is_err());
    }

    #[test]
    fn path_and_uri_prefixes_compare_canonical_forms() {
        let c = Constraint {
            prefix: Some(Prefix::new("/srv/shared/").unwrap()),
            ..none()
        };
        assert!(check(&c, r#""/srv/shared/a""#).is_ok());
        assert!(check(&c, r#""/srv//shared/./a""#).is_ok());
        assert!(check(&c, r#""/srv/shared//../etc/passwd""#).is_err());
        assert!(check(&c, r#""//etc/passwd""#).is_err());
        assert!(check(&c, r#""/srv/shared\\..\\x""#).is_err());
        assert!(check(&c, r#"" /srv/shared/a""#).is_err());
        assert!(check(&c, r#""/srv/shared/a\u0000""#).is_err());
        assert!(
            check(&c, r#""/srv/shared""#).is_err(),
            "the directory itself is not under it"
        );
        let c = Constraint {
            prefix: Some(Prefix::new("file:///srv/").unwrap()),
            ..none()
        };
        assert!(check(&c, r#""FILE://localhost/srv/x""#).is_ok());
        assert!(check(&c, r#""file:///srv/../etc/x""#).is_err());
        assert!(check(&c, r#""file:///srv/%2e%2e/etc/x""#).is_err());
        // Plain prefixes stay plain.
        let c = Constraint {
            prefix: Some(Prefix::new("acme-").unwrap()),
            ..none()
        };
        assert!(check(&c, r#""acme-x""#).is_ok());
        assert!(Prefix::new("/srv//x/").is_err());
        assert!(Prefix::new("/srv/../x/").is_err());
        assert!(Prefix::new("FILE:///srv/").is_err());
        assert!(Prefix::new("/srv/shared").unwrap().admits_siblings());
        // A relative directory prefix is a path prefix too (never a plain one).
        assert!(Prefix::new("./data/").is_err());
        let c = Constraint {
            prefix: Some(Prefix::new("data/").unwrap()),
            ..none()
        };
        assert!(check(&c, r#""data/x""#).is_ok());
        assert!(check(&c, r#""./data/x""#).is_ok());
        assert!(check(&c, r#""data/../../etc/passwd""#).is_err());
    }

    #[test]
    fn iterates_arguments() {
        let mut bytes = br#"{"a":1,"b":{"c":[1,2]},"d":"x"}"#.to_vec();
        let tape = simd_json::to_tape(&mut bytes).unwrap();
        let names: Vec<&str> = arguments_iter(&tape.0).map(|(k, _)| k).collect();
        assert_eq!(names, ["a", "b", "d"]);
    }
}
