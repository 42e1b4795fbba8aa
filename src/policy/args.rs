//! Argument constraints (`[agent.tool.args]`), checked against the parsed arguments of a
//! tools/call without converting them: the values are read straight off the envelope's tape.
//!
//! Semantics: a constraint applies to an argument when it is present; absent arguments pass
//! (the tool's own schema decides whether they are required). A value of the wrong type for its
//! constraint is refused.

use simd_json::{Node, StaticNode};

/// A literal in `one_of`.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

#[derive(Debug, Clone)]
pub struct Constraint {
    pub one_of: Option<Vec<Literal>>,
    pub prefix: Option<String>,
    pub pattern: Option<regex::Regex>,
    pub max_len: Option<u64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
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
                return Err(format!("must be a string starting with {prefix:?}"));
            };
            if !s.starts_with(prefix.as_str()) {
                return Err(format!("must start with {prefix:?}"));
            }
            // A path-like prefix must not be escaped with `..` segments.
            if prefix.ends_with('/') && s.split('/').any(|seg| seg == "..") {
                return Err(format!(
                    "must stay under {prefix:?} (\"..\" path segments are refused)"
                ));
            }
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
            let n = match first {
                Node::Static(StaticNode::I64(n)) => *n as f64,
                Node::Static(StaticNode::U64(n)) => *n as f64,
                Node::Static(StaticNode::F64(f)) => *f,
                _ => return Err("must be a number".into()),
            };
            if let Some(min) = self.min
                && n < min
            {
                return Err(format!("is {n}, below the minimum {min}"));
            }
            if let Some(max) = self.max
                && n > max
            {
                return Err(format!("is {n}, above the maximum {max}"));
            }
        }
        Ok(())
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

/// Number of tape nodes a value occupies, header included.
pub fn node_span(node: &Node<'_>) -> usize {
    match node {
        Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
        _ => 1,
    }
}

/// Iterates `(name, value nodes)` over an arguments object's tape nodes.
pub fn arguments_iter<'t, 'a>(
    args: &'t [Node<'a>],
) -> impl Iterator<Item = (&'a str, &'t [Node<'a>])> + 't {
    crate::mcp::envelope::object_entries(args, 0)
        .map_while(Result::ok)
        .filter_map(move |(key, at)| {
            let end = at + node_span(args.get(at)?);
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
        }
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
            prefix: Some("/srv/shared/".into()),
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
            min: Some(0.0),
            max: Some(3.0),
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
    fn iterates_arguments() {
        let mut bytes = br#"{"a":1,"b":{"c":[1,2]},"d":"x"}"#.to_vec();
        let tape = simd_json::to_tape(&mut bytes).unwrap();
        let names: Vec<&str> = arguments_iter(&tape.0).map(|(k, _)| k).collect();
        assert_eq!(names, ["a", "b", "d"]);
    }
}
