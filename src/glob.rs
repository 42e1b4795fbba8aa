//! Globs over names (policy rules over `"<upstream>/<tool>"`, redaction rules over argument
//! names): `*` matches any run of characters (possibly empty), `?` exactly one; everything else
//! matches itself, case-sensitively unless asked otherwise.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
}

impl Glob {
    /// Checks the pattern's characters; `allowed` says which literal bytes may appear.
    pub fn new(pattern: &str, allowed: impl Fn(u8) -> bool) -> Result<Glob, String> {
        if pattern.is_empty() {
            return Err("empty pattern".into());
        }
        if let Some(bad) = pattern
            .bytes()
            .find(|&b| b != b'*' && b != b'?' && !allowed(b))
        {
            return Err(format!(
                "character {:?} is not allowed in {pattern:?}",
                bad as char
            ));
        }
        Ok(Glob {
            pattern: pattern.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    pub fn has_wildcard(&self) -> bool {
        self.pattern.bytes().any(|b| b == b'*' || b == b'?')
    }

    /// Whether the whole of `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        glob_match(self.pattern.as_bytes(), text.as_bytes())
    }

    /// Whether the whole of `text` matches, ignoring ASCII case (`redact` globs: `*password*`
    /// must catch `Password` and `DB_PASSWORD` too).
    pub fn matches_ignore_case(&self, text: &str) -> bool {
        glob_match_by(self.pattern.as_bytes(), text.as_bytes(), |a, b| {
            a.eq_ignore_ascii_case(&b)
        })
    }

    /// Matches `upstream` + "/" + `name` without building the joined string.
    pub fn matches_qualified(&self, upstream: &str, name: &str) -> bool {
        let p = self.pattern.as_bytes();
        // Fast path: a literal pattern compares piecewise.
        if !self.has_wildcard() {
            return p.len() == upstream.len() + 1 + name.len()
                && p.starts_with(upstream.as_bytes())
                && p[upstream.len()] == b'/'
                && p.ends_with(name.as_bytes());
        }
        let mut buf = [0u8; 512];
        let total = upstream.len() + 1 + name.len();
        if total <= buf.len() {
            buf[..upstream.len()].copy_from_slice(upstream.as_bytes());
            buf[upstream.len()] = b'/';
            buf[upstream.len() + 1..total].copy_from_slice(name.as_bytes());
            glob_match(p, &buf[..total])
        } else {
            glob_match(p, format!("{upstream}/{name}").as_bytes())
        }
    }
}

/// Iterative glob matching with single-star backtracking: O(len(p) * len(t)) worst case, no
/// recursion, no allocation.
fn glob_match(p: &[u8], t: &[u8]) -> bool {
    glob_match_by(p, t, |a, b| a == b)
}

fn glob_match_by(p: &[u8], t: &[u8], same: impl Fn(u8, u8) -> bool) -> bool {
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || same(p[pi], t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str) -> Glob {
        Glob::new(p, |b| b.is_ascii_alphanumeric() || b"_-./:".contains(&b)).unwrap()
    }

    #[test]
    fn matching() {
        assert!(g("github/search_*").matches("github/search_code"));
        assert!(g("github/search_*").matches("github/search_"));
        assert!(!g("github/search_*").matches("github/searc"));
        assert!(!g("github/search_*").matches("gitlab/search_code"));
        assert!(g("*").matches("anything/at_all"));
        assert!(g("files/*").matches("files/read_file"));
        assert!(g("*/read_*").matches("files/read_file"));
        assert!(g("github/get_?").matches("github/get_x"));
        assert!(!g("github/get_?").matches("github/get_xy"));
        assert!(g("a*b*c").matches("aXXbYYc"));
        assert!(!g("a*b*c").matches("aXXbYY"));
        assert!(g("github/create_issue").matches("github/create_issue"));
        assert!(!g("github/create_issue").matches("github/create_issues"));
    }

    #[test]
    fn case_insensitive_matching() {
        let p = Glob::new("*password*", |b| b.is_ascii_graphic()).unwrap();
        assert!(p.matches_ignore_case("DB_Password"));
        assert!(p.matches_ignore_case("password"));
        assert!(!p.matches("DB_Password"));
        assert!(!p.matches_ignore_case("passwd"));
    }

    #[test]
    fn qualified_matches_agree_with_joined() {
        for (p, u, n) in [
            ("github/search_*", "github", "search_code"),
            ("github/create_issue", "github", "create_issue"),
            ("github/create_issue", "github", "create_issu"),
            ("github/create_issue", "githu", "b/create_issue"),
            ("*/x", "files", "x"),
            ("f*s/r?ad", "files", "read"),
        ] {
            assert_eq!(
                g(p).matches_qualified(u, n),
                g(p).matches(&format!("{u}/{n}")),
                "{p} {u}/{n}"
            );
        }
    }

    #[test]
    fn refuses_odd_characters() {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-./".contains(&b);
        assert!(Glob::new("github/[a-z]", allowed).is_err());
        assert!(Glob::new("", allowed).is_err());
        assert!(Glob::new("git hub/x", allowed).is_err());
    }

    #[test]
    fn pathological_patterns_stay_linear() {
        let p = g(&"*a".repeat(30));
        let text = "a".repeat(29) + "b";
        assert!(!p.matches(&text));
    }
}
