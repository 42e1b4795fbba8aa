//! The policy file as written (the TOML tables, fields checked by serde) and the compilation
//! of single fields: rates, rule globs, argument constraints, `${VAR}` in header values. Each
//! error names the file, the line and the field.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use toml::Spanned;

use super::PolicyError;
use super::args::{self, Constraint, Literal};
use super::integrity::{Action, Integrity, Settings, UpstreamIntegrity};
use crate::glob::Glob;
use crate::integrity::scan;
use crate::ratelimit::{Limit, Rate};
use crate::upstream::Upstream;

/// Environment lookups for `${VAR}` in upstream headers (the process environment, or a map in
/// tests).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<S: std::hash::BuildHasher> Env for HashMap<String, String, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default)]
    pub(super) tenant: Vec<RawTenant>,
    #[serde(default)]
    pub(super) upstream: Vec<RawUpstream>,
    #[serde(default)]
    pub(super) agent: Vec<RawAgent>,
    pub(super) integrity: Option<Spanned<RawIntegrity>>,
}

/// `[integrity]`: pins, the poison scan, hidden Unicode in results.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntegrity {
    pub(super) unpinned: Option<Spanned<String>>,
    pub(super) on_change: Option<Spanned<String>>,
    pub(super) on_finding: Option<Spanned<String>>,
    pub(super) max_description: Option<Spanned<i64>>,
    pub(super) strip_hidden_unicode: Option<bool>,
}

/// `[[upstream.tool]]`: the description agents see instead of the upstream's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTool {
    pub(super) name: Spanned<String>,
    pub(super) description: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    pub(super) id: Spanned<String>,
    pub(super) rate: Option<Spanned<RawRate>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRate {
    pub(super) per_second: Option<u64>,
    pub(super) per_minute: Option<u64>,
    pub(super) per_hour: Option<u64>,
    pub(super) burst: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) name: Spanned<String>,
    pub(super) url: Option<Spanned<String>>,
    pub(super) tenant: Option<Spanned<String>>,
    pub(super) rate: Option<Spanned<RawRate>>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, Spanned<String>>,
    /// TLS to an `https://` upstream: a private CA, a client certificate, the name to verify.
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) client_cert_file: Option<Spanned<String>>,
    pub(super) client_key_file: Option<Spanned<String>>,
    pub(super) tls_server_name: Option<Spanned<String>>,
    /// A stdio server: the program and its arguments, and how its processes run.
    pub(super) command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) env: BTreeMap<String, Spanned<String>>,
    pub(super) cwd: Option<Spanned<String>>,
    pub(super) max_processes: Option<Spanned<i64>>,
    pub(super) idle_timeout_s: Option<Spanned<i64>>,
    pub(super) startup_timeout_s: Option<Spanned<i64>>,
    pub(super) share: Option<Spanned<bool>>,
    /// Tool integrity: what a definition that no longer matches its pin does.
    pub(super) on_change: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) tool: Vec<RawUpstreamTool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub(super) id: Spanned<String>,
    pub(super) tenant: Option<Spanned<String>>,
    pub(super) user: Option<String>,
    pub(super) key_sha256: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) deny: Vec<Spanned<String>>,
    pub(super) rate: Option<Spanned<RawRate>>,
    #[serde(default)]
    pub(super) redact: Vec<Spanned<String>>,
    pub(super) upstreams: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) tool: Vec<RawToolRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToolRule {
    #[serde(rename = "match")]
    pub(super) pattern: Spanned<String>,
    pub(super) rate: Option<Spanned<RawRate>>,
    #[serde(default)]
    pub(super) args: BTreeMap<String, Spanned<RawConstraint>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConstraint {
    /// For an array: the constraint each item meets.
    pub(super) items: Option<Box<Spanned<RawConstraint>>>,
    pub(super) one_of: Option<Vec<toml::Value>>,
    pub(super) prefix: Option<String>,
    pub(super) pattern: Option<String>,
    pub(super) max_len: Option<u64>,
    pub(super) min: Option<Number>,
    pub(super) max: Option<Number>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
pub(super) enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    fn bound(self) -> args::Bound {
        match self {
            Number::Int(n) => args::Bound::Int(n),
            Number::Float(f) => args::Bound::Float(f),
        }
    }
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// An `id` (`tenant.id`, `agent.id`): well formed, and not one already `defined`.
pub(super) fn check_id(
    id: &Spanned<String>,
    field: &str,
    what: &str,
    defined: bool,
    at: &At<'_>,
) -> Result<(), PolicyError> {
    let (span, text) = (Some(id.span()), id.get_ref());
    if !valid_id(text) {
        let message = format!("{text:?} must be 1-64 letters, digits, '_', '-', '.' or '@'");
        return Err(at(span, field, message));
    }
    if defined {
        return Err(at(span, field, format!("{what} {text:?} is defined twice")));
    }
    Ok(())
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.@".contains(&b))
}

pub(super) fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

pub(super) fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Expands `${VAR}` from the environment; an unset variable is an error (an injected credential
/// silently empty would fail far from its cause).
pub(super) fn expand_env(value: &str, env: &dyn Env) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated ${{ in {value:?}"))?;
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("${{{name}}} is not a variable name"));
        }
        let v = env
            .var(name)
            .ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub(super) type At<'a> = dyn Fn(Option<std::ops::Range<usize>>, &str, String) -> PolicyError + 'a;

/// A limit of one bucket, labelled `<what> (<rate>)`.
pub(super) fn limit(key: String, what: String, rate: Rate) -> Limit {
    let label = format!("{what} ({})", rate.describe());
    Limit::new(key, rate, label)
}

pub(super) fn compile_rate(
    raw: &Option<Spanned<RawRate>>,
    field: &str,
    at: &At<'_>,
) -> Result<Option<Rate>, PolicyError> {
    let Some(r) = raw else {
        return Ok(None);
    };
    let span = Some(r.span());
    let v = *r.get_ref();
    let (per_second, text) = match (v.per_second, v.per_minute, v.per_hour) {
        (Some(n), None, None) => (n as f64, format!("{n}/s")),
        (None, Some(n), None) => (n as f64 / 60.0, format!("{n}/min")),
        (None, None, Some(n)) => (n as f64 / 3600.0, format!("{n}/h")),
        _ => {
            return Err(at(
                span,
                field,
                "needs exactly one of per_second, per_minute, per_hour".into(),
            ));
        }
    };
    if per_second <= 0.0 {
        return Err(at(span, field, "the rate must be above zero".into()));
    }
    let burst = v.burst.ok_or_else(|| {
        at(
            span.clone(),
            field,
            "needs burst (how many requests may come at once)".into(),
        )
    })?;
    if burst == 0 {
        return Err(at(span, field, "burst must be at least 1".into()));
    }
    Ok(Some(Rate {
        per_second,
        burst,
        text,
    }))
}

/// A rule glob over `"<upstream>/<tool>"`. When the upstream part is literal it must name a
/// configured upstream, so a typo is an error and not a rule that silently matches nothing.
pub(super) fn compile_rule_glob(
    s: &Spanned<String>,
    field: &str,
    upstreams: &[&str],
    at: &At<'_>,
) -> Result<Glob, PolicyError> {
    let text = s.get_ref();
    let glob = Glob::new(text, |b| b.is_ascii_alphanumeric() || b"_-./:".contains(&b))
        .map_err(|m| at(Some(s.span()), field, m))?;
    let Some((upstream, tool)) = text.split_once('/') else {
        return Err(at(
            Some(s.span()),
            field,
            format!("{text:?} must be \"<upstream>/<tool>\""),
        ));
    };
    if tool.is_empty() || upstream.is_empty() {
        return Err(at(
            Some(s.span()),
            field,
            format!("{text:?} must be \"<upstream>/<tool>\""),
        ));
    }
    if !upstream.contains(['*', '?']) && !upstreams.contains(&upstream) {
        return Err(at(
            Some(s.span()),
            field,
            format!("{text:?} names unknown upstream {upstream:?}"),
        ));
    }
    // Resources are matched in their canonical form, so a rule must be written in it too (a
    // rule for `FILE:///etc/*` would never match anything).
    if let Some(uri) = tool.strip_prefix("resource:")
        && !uri.starts_with(['*', '?'])
    {
        match crate::mcp::uri::canonical(uri, crate::mcp::uri::Mode::Pattern) {
            Ok(c) if c == uri => {}
            Ok(c) => {
                return Err(at(
                    Some(s.span()),
                    field,
                    format!(
                        "{text:?}: resource URIs are matched in canonical form; write it as \"{upstream}/resource:{c}\""
                    ),
                ));
            }
            Err(e) => {
                return Err(at(
                    Some(s.span()),
                    field,
                    format!("{text:?}: the resource URI {}", e.message()),
                ));
            }
        }
    }
    Ok(glob)
}

pub(super) fn compile_constraint(
    c: &Spanned<RawConstraint>,
    field: &str,
    at: &At<'_>,
) -> Result<Constraint, PolicyError> {
    let span = Some(c.span());
    let raw = c.get_ref();
    let one_of = match &raw.one_of {
        None => None,
        Some(list) => {
            if list.is_empty() {
                return Err(at(
                    span,
                    field,
                    "one_of is empty: nothing could pass".into(),
                ));
            }
            Some(
                list.iter()
                    .map(|v| match v {
                        toml::Value::String(s) => Ok(Literal::Str(s.clone())),
                        toml::Value::Integer(n) => Ok(Literal::Int(*n)),
                        toml::Value::Float(f) => Ok(Literal::Float(*f)),
                        toml::Value::Boolean(b) => Ok(Literal::Bool(*b)),
                        other => Err(at(
                            span.clone(),
                            field,
                            format!(
                                "one_of takes strings, numbers or booleans, not {}",
                                other.type_str()
                            ),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
        }
    };
    let pattern = match &raw.pattern {
        None => None,
        Some(p) => Some(
            regex::Regex::new(p)
                .map_err(|e| at(span.clone(), field, format!("bad pattern {p:?}: {e}")))?,
        ),
    };
    let (min, max) = (raw.min.map(Number::bound), raw.max.map(Number::bound));
    if let (Some(lo), Some(hi)) = (min, max)
        && let Some(std::cmp::Ordering::Greater) = match lo {
            args::Bound::Int(n) => hi.compare(&simd_json::StaticNode::I64(n)),
            args::Bound::Float(f) => hi.compare(&simd_json::StaticNode::F64(f)),
        }
    {
        return Err(at(span, field, format!("min {lo} is above max {hi}")));
    }
    let prefix = match &raw.prefix {
        None => None,
        Some(p) => Some(args::Prefix::new(p).map_err(|m| at(span.clone(), field, m))?),
    };
    if let Some(p) = &prefix
        && p.admits_siblings()
    {
        let warning = at(
            span.clone(),
            field,
            format!(
                "prefix {:?} also admits {:?}; end it with '/' to confine the argument to the directory",
                p.text,
                format!("{}-other", p.text)
            ),
        );
        crate::warn!("{warning}");
    }
    if raw.items.is_some()
        && (raw.one_of.is_some()
            || raw.prefix.is_some()
            || raw.pattern.is_some()
            || raw.min.is_some()
            || raw.max.is_some())
    {
        return Err(at(
            span,
            field,
            "items is for arrays, and one_of, prefix, pattern, min and max are not: put them inside items (max_len beside it limits the array's length)".into(),
        ));
    }
    let items = match &raw.items {
        None => None,
        Some(each) => Some(Box::new(compile_constraint(
            each,
            &format!("{field}.items"),
            at,
        )?)),
    };
    let constraint = Constraint {
        one_of,
        prefix,
        pattern,
        max_len: raw.max_len,
        min,
        max,
        items,
    };
    if constraint.one_of.is_none()
        && constraint.prefix.is_none()
        && constraint.pattern.is_none()
        && constraint.max_len.is_none()
        && min.is_none()
        && max.is_none()
        && constraint.items.is_none()
    {
        return Err(at(
            span,
            field,
            "constrains nothing (one_of, prefix, pattern, max_len, min, max, items)".into(),
        ));
    }
    Ok(constraint)
}

/// Compiles `[integrity]` and each upstream's `on_change` and `[[upstream.tool]]` (upstreams
/// of the environment the policy does not name take the defaults).
pub(super) fn compile_integrity(
    raw: &RawPolicy,
    upstreams: &[Upstream],
    at: &At<'_>,
) -> Result<Integrity, PolicyError> {
    let action = |v: &Option<Spanned<String>>, field: &str, default: Action| match v {
        None => Ok(default),
        Some(s) => match s.get_ref().as_str() {
            "block" => Ok(Action::Block),
            "warn" => Ok(Action::Warn),
            other => Err(at(
                Some(s.span()),
                field,
                format!("{other:?} is not \"block\" or \"warn\""),
            )),
        },
    };
    let table = raw.integrity.as_ref().map(|t| t.get_ref());
    let on_change = action(
        &table.and_then(|t| t.on_change.clone()),
        "integrity.on_change",
        Action::Block,
    )?;
    let settings = match table {
        None => None,
        Some(t) => Some(Settings {
            hide_unpinned: match &t.unpinned {
                None => None,
                Some(s) => match s.get_ref().as_str() {
                    "hide" => Some(true),
                    "allow" => Some(false),
                    other => {
                        return Err(at(
                            Some(s.span()),
                            "integrity.unpinned",
                            format!("{other:?} is not \"allow\" or \"hide\""),
                        ));
                    }
                },
            },
            on_finding: action(&t.on_finding, "integrity.on_finding", Action::Warn)?,
            max_description: match &t.max_description {
                None => scan::DEFAULT_MAX_DESCRIPTION,
                Some(n) if (1..=1_048_576).contains(n.get_ref()) => *n.get_ref() as usize,
                Some(n) => {
                    return Err(at(
                        Some(n.span()),
                        "integrity.max_description",
                        "must be 1 to 1048576 (bytes)".into(),
                    ));
                }
            },
            strip_results: t.strip_hidden_unicode.unwrap_or(false),
        }),
    };
    let mut per = Vec::with_capacity(upstreams.len());
    for u in upstreams {
        let mut own = UpstreamIntegrity {
            on_change,
            overrides: HashMap::new(),
        };
        if let Some(r) = raw.upstream.iter().find(|r| r.name.get_ref() == &u.name) {
            own.on_change = action(&r.on_change, "upstream.on_change", on_change)?;
            for t in &r.tool {
                let name = t.name.get_ref();
                if name.is_empty() {
                    return Err(at(
                        Some(t.name.span()),
                        "upstream.tool.name",
                        "empty".into(),
                    ));
                }
                let text = t.description.get_ref().clone();
                if own.overrides.insert(name.clone(), text).is_some() {
                    return Err(at(
                        Some(t.name.span()),
                        "upstream.tool.name",
                        format!("tool {name:?} of upstream {:?} has two overrides", u.name),
                    ));
                }
            }
        }
        per.push(own);
    }
    Ok(Integrity::new(
        settings,
        per,
        upstreams.iter().map(|u| u.name.clone()).collect(),
    ))
}
