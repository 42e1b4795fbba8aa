//! The policy file: tenants, upstreams, agents and their rules.
//!
//! `../shared/examples/policy.toml` is the contract: it loads as written. A policy is read once
//! (and again on reload) into an immutable, indexed [`Policy`]: agents are found by the SHA-256 of
//! their key, rules are compiled globs and regexes, upstreams are indexes into the gateway's
//! upstream list. Every problem is reported with the file, the line and the field.

pub mod args;
pub mod decide;
pub mod live;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::glob::Glob;
use crate::upstream::{Transport, Upstream};
use args::{Constraint, Literal};

/// A rate: `per_second`, `per_minute` or `per_hour` (exactly one), and `burst`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    /// Requests per second (the per-minute/per-hour forms are converted).
    pub per_second: f64,
    pub burst: u64,
    /// As written, for messages: `20/s`, `10/min`, `120/h`.
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub rate: Option<Rate>,
}

/// What the policy says of an upstream (by index into the gateway's upstream list).
#[derive(Debug, Clone)]
pub struct UpstreamRule {
    pub tenant: Option<usize>,
    pub rate: Option<Rate>,
}

#[derive(Debug, Clone)]
pub struct ToolRule {
    pub pattern: Glob,
    pub rate: Option<Rate>,
    pub args: Vec<(String, Constraint)>,
}

#[derive(Debug, Clone)]
pub struct Agent {
    pub id: String,
    pub tenant: Option<usize>,
    pub user: Option<String>,
    pub allow: Vec<Glob>,
    pub deny: Vec<Glob>,
    pub rate: Option<Rate>,
    pub redact: Vec<Glob>,
    /// Upstream indexes this agent may use (`upstreams = [...]`), or all of its tenant's.
    pub upstreams: Option<Vec<usize>>,
    pub tools: Vec<ToolRule>,
    /// This agent's identity fields as the audit log writes them, encoded once.
    pub audit_identity: Vec<u8>,
}

/// A loaded policy.
#[derive(Debug)]
pub struct Policy {
    pub source: PathBuf,
    pub tenants: Vec<Tenant>,
    /// Indexed like the gateway's upstream list ([`Policy::upstreams`] returns that list).
    pub upstream_rules: Vec<UpstreamRule>,
    upstream_list: Vec<Upstream>,
    pub agents: Vec<Agent>,
    by_key: HashMap<[u8; 32], usize>,
    by_id: HashMap<String, usize>,
    /// The buckets of every `rate` in the file (shared by all workers; atomics inside).
    pub limits: crate::ratelimit::RateLimits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for PolicyError {}

// ---- the file as written -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    tenant: Vec<RawTenant>,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    #[serde(default)]
    agent: Vec<RawAgent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    id: Spanned<String>,
    rate: Option<Spanned<RawRate>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: Option<u64>,
    per_minute: Option<u64>,
    per_hour: Option<u64>,
    burst: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: Spanned<String>,
    url: Option<Spanned<String>>,
    tenant: Option<Spanned<String>>,
    rate: Option<Spanned<RawRate>>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    id: Spanned<String>,
    tenant: Option<Spanned<String>>,
    user: Option<String>,
    key_sha256: Option<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    rate: Option<Spanned<RawRate>>,
    #[serde(default)]
    redact: Vec<Spanned<String>>,
    upstreams: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    tool: Vec<RawToolRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToolRule {
    #[serde(rename = "match")]
    pattern: Spanned<String>,
    rate: Option<Spanned<RawRate>>,
    #[serde(default)]
    args: BTreeMap<String, Spanned<RawConstraint>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConstraint {
    one_of: Option<Vec<toml::Value>>,
    prefix: Option<String>,
    pattern: Option<String>,
    max_len: Option<u64>,
    min: Option<Number>,
    max: Option<Number>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
enum Number {
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

// ---- loading --------------------------------------------------------------------------------

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

impl Policy {
    /// Reads and compiles the policy at `path`, merging its `[[upstream]]` tables with the
    /// upstreams named in `SCOPEGATE_UPSTREAMS` (`configured`).
    pub fn load(
        path: &Path,
        configured: &[Upstream],
        env: &dyn Env,
    ) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: path.to_owned(),
            line: None,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Policy::parse(path, &text, configured, env)
    }

    pub fn parse(
        path: &Path,
        text: &str,
        configured: &[Upstream],
        env: &dyn Env,
    ) -> Result<Policy, PolicyError> {
        let at = |span: Option<std::ops::Range<usize>>, field: &str, message: String| PolicyError {
            file: path.to_owned(),
            line: span.map(|s| line_of(text, s.start)),
            field: field.to_owned(),
            message,
        };
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| at(e.span(), "", e.message().trim().to_owned()))?;

        // Tenants.
        let mut tenants: Vec<Tenant> = Vec::new();
        for t in &raw.tenant {
            let id = t.id.get_ref();
            if !valid_id(id) {
                return Err(at(
                    Some(t.id.span()),
                    "tenant.id",
                    format!("{id:?} must be 1-64 letters, digits, '_', '-', '.' or '@'"),
                ));
            }
            if tenants.iter().any(|x| &x.id == id) {
                return Err(at(
                    Some(t.id.span()),
                    "tenant.id",
                    format!("tenant {id:?} is defined twice"),
                ));
            }
            let rate = compile_rate(&t.rate, "tenant.rate", &at)?;
            tenants.push(Tenant {
                id: id.clone(),
                rate,
            });
        }
        let tenant_index = |name: &Spanned<String>, field: &str| {
            tenants
                .iter()
                .position(|t| &t.id == name.get_ref())
                .ok_or_else(|| {
                    at(
                        Some(name.span()),
                        field,
                        format!("unknown tenant {:?}", name.get_ref()),
                    )
                })
        };

        // Upstreams: those from SCOPEGATE_UPSTREAMS first, then the policy's new ones.
        let mut upstreams: Vec<Upstream> = configured.to_vec();
        let mut rules: Vec<UpstreamRule> = configured
            .iter()
            .map(|_| UpstreamRule {
                tenant: None,
                rate: None,
            })
            .collect();
        let mut seen_in_policy: Vec<&str> = Vec::new();
        for u in &raw.upstream {
            let name = u.name.get_ref();
            if !crate::upstream::valid_name(name) {
                return Err(at(
                    Some(u.name.span()),
                    "upstream.name",
                    format!("{name:?} must be 1-64 letters, digits, '_' or '-'"),
                ));
            }
            if seen_in_policy.contains(&name.as_str()) {
                return Err(at(
                    Some(u.name.span()),
                    "upstream.name",
                    format!("upstream {name:?} is defined twice"),
                ));
            }
            seen_in_policy.push(name);
            let mut headers = Vec::new();
            for (header, value) in &u.headers {
                if !valid_header_name(header) {
                    return Err(at(
                        Some(value.span()),
                        "upstream.headers",
                        format!("{header:?} is not a valid header name"),
                    ));
                }
                let lower = header.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "host" | "content-length" | "transfer-encoding" | "connection"
                ) {
                    return Err(at(
                        Some(value.span()),
                        "upstream.headers",
                        format!("{header} is set by scopegate and cannot be injected"),
                    ));
                }
                let expanded = expand_env(value.get_ref(), env).map_err(|m| {
                    at(Some(value.span()), &format!("upstream.headers.{header}"), m)
                })?;
                if expanded.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                    return Err(at(
                        Some(value.span()),
                        &format!("upstream.headers.{header}"),
                        "value contains a line break".into(),
                    ));
                }
                headers.push((header.clone(), expanded));
            }
            let tenant = match &u.tenant {
                Some(t) => Some(tenant_index(t, "upstream.tenant")?),
                None => None,
            };
            let rate = compile_rate(&u.rate, "upstream.rate", &at)?;
            let index = match upstreams.iter().position(|x| &x.name == name) {
                // Named in SCOPEGATE_UPSTREAMS too: the environment's URL wins, the policy adds
                // headers, tenant and rate.
                Some(i) => i,
                None => {
                    let Some(url) = &u.url else {
                        return Err(at(
                            Some(u.name.span()),
                            "upstream.url",
                            format!(
                                "upstream {name:?} has no url (and is not in SCOPEGATE_UPSTREAMS)"
                            ),
                        ));
                    };
                    let transport = Transport::parse(url.get_ref())
                        .map_err(|m| at(Some(url.span()), "upstream.url", m))?;
                    upstreams.push(Upstream {
                        name: name.clone(),
                        transport,
                        headers: Vec::new(),
                    });
                    rules.push(UpstreamRule {
                        tenant: None,
                        rate: None,
                    });
                    upstreams.len() - 1
                }
            };
            upstreams[index].headers = headers;
            rules[index] = UpstreamRule { tenant, rate };
        }
        if upstreams.is_empty() {
            return Err(at(
                None,
                "upstream",
                "no upstream: name some in SCOPEGATE_UPSTREAMS or [[upstream]]".into(),
            ));
        }

        // Agents.
        let mut agents: Vec<Agent> = Vec::new();
        let mut by_key: HashMap<[u8; 32], usize> = HashMap::new();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        for a in &raw.agent {
            let id = a.id.get_ref();
            if !valid_id(id) {
                return Err(at(
                    Some(a.id.span()),
                    "agent.id",
                    format!("{id:?} must be 1-64 letters, digits, '_', '-', '.' or '@'"),
                ));
            }
            if by_id.contains_key(id) {
                return Err(at(
                    Some(a.id.span()),
                    "agent.id",
                    format!("agent {id:?} is defined twice"),
                ));
            }
            let tenant = match &a.tenant {
                Some(t) => Some(tenant_index(t, "agent.tenant")?),
                None => None,
            };
            if let Some(key) = &a.key_sha256 {
                let digest = parse_sha256(key.get_ref()).ok_or_else(|| {
                    at(
                        Some(key.span()),
                        "agent.key_sha256",
                        "must be 64 hex characters (scopegate hash-key KEY prints it)".into(),
                    )
                })?;
                if let Some(other) = by_key.get(&digest) {
                    return Err(at(
                        Some(key.span()),
                        "agent.key_sha256",
                        format!("the same key is already agent {:?}'s", agents[*other].id),
                    ));
                }
                by_key.insert(digest, agents.len());
            }
            let names: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
            let rule_glob =
                |s: &Spanned<String>, field: &str| compile_rule_glob(s, field, &names, &at);
            let allow = a
                .allow
                .iter()
                .map(|g| rule_glob(g, "agent.allow"))
                .collect::<Result<Vec<_>, _>>()?;
            let deny = a
                .deny
                .iter()
                .map(|g| rule_glob(g, "agent.deny"))
                .collect::<Result<Vec<_>, _>>()?;
            let redact = a
                .redact
                .iter()
                .map(|g| {
                    Glob::new(g.get_ref(), |b| b.is_ascii_graphic())
                        .map_err(|m| at(Some(g.span()), "agent.redact", m))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let agent_upstreams = match &a.upstreams {
                None => None,
                Some(list) => Some(
                    list.iter()
                        .map(|n| {
                            let i = upstreams
                                .iter()
                                .position(|u| &u.name == n.get_ref())
                                .ok_or_else(|| {
                                    at(
                                        Some(n.span()),
                                        "agent.upstreams",
                                        format!("unknown upstream {:?}", n.get_ref()),
                                    )
                                })?;
                            if let (Some(ut), at_tenant) = (rules[i].tenant, tenant)
                                && Some(ut) != at_tenant
                            {
                                return Err(at(
                                    Some(n.span()),
                                    "agent.upstreams",
                                    format!(
                                        "upstream {:?} belongs to tenant {:?}, not to this agent's",
                                        n.get_ref(),
                                        tenants[ut].id
                                    ),
                                ));
                            }
                            Ok(i)
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            let mut tools = Vec::new();
            for t in &a.tool {
                let pattern = rule_glob(&t.pattern, "agent.tool.match")?;
                let rate = compile_rate(&t.rate, "agent.tool.rate", &at)?;
                let mut constraints = Vec::new();
                for (arg, c) in &t.args {
                    let field = format!("agent.tool.args.{arg}");
                    constraints.push((arg.clone(), compile_constraint(c, &field, &at)?));
                }
                tools.push(ToolRule {
                    pattern,
                    rate,
                    args: constraints,
                });
            }
            let rate = compile_rate(&a.rate, "agent.rate", &at)?;
            by_id.insert(id.clone(), agents.len());
            let audit_identity = crate::audit::entry::identity_fragment(
                id,
                tenant.map(|t| tenants[t].id.as_str()),
                a.user.as_deref(),
            );
            agents.push(Agent {
                audit_identity,
                id: id.clone(),
                tenant,
                user: a.user.clone(),
                allow,
                deny,
                rate,
                redact,
                upstreams: agent_upstreams,
                tools,
            });
        }

        let mut policy = Policy {
            source: path.to_owned(),
            tenants,
            upstream_rules: rules,
            upstream_list: upstreams,
            agents,
            by_key,
            by_id,
            limits: crate::ratelimit::RateLimits::default(),
        };
        policy.limits = crate::ratelimit::RateLimits::for_policy(&policy);
        Ok(policy)
    }

    /// After a reload: buckets whose key and limit did not change keep their state.
    pub fn inherit_rate_state(&mut self, old: &Policy) {
        let mut limits = std::mem::take(&mut self.limits);
        limits.inherit(self, &old.limits, old);
        self.limits = limits;
    }

    /// The gateway's upstreams: `SCOPEGATE_UPSTREAMS` merged with the policy's.
    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstream_list
    }

    /// The agent whose key hashes to `digest`.
    pub fn agent_by_key_digest(&self, digest: &[u8; 32]) -> Option<usize> {
        self.by_key.get(digest).copied()
    }

    pub fn agent_by_id(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// Whether `agent` may use upstream `index` at all: same tenant (or a shared upstream), and
    /// in the agent's `upstreams` list when it has one.
    pub fn may_use_upstream(&self, agent: usize, index: usize) -> bool {
        let a = &self.agents[agent];
        let Some(rule) = self.upstream_rules.get(index) else {
            return false;
        };
        if let Some(t) = rule.tenant
            && a.tenant != Some(t)
        {
            return false;
        }
        match &a.upstreams {
            Some(list) => list.contains(&index),
            None => true,
        }
    }
}

/// The hex SHA-256 of a key, as `key_sha256` wants it.
pub fn hash_key(key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.@".contains(&b))
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
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
fn expand_env(value: &str, env: &dyn Env) -> Result<String, String> {
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

type At<'a> = dyn Fn(Option<std::ops::Range<usize>>, &str, String) -> PolicyError + 'a;

fn compile_rate(
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
fn compile_rule_glob(
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

fn compile_constraint(
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
    let constraint = Constraint {
        one_of,
        prefix,
        pattern,
        max_len: raw.max_len,
        min,
        max,
    };
    if constraint.one_of.is_none()
        && constraint.prefix.is_none()
        && constraint.pattern.is_none()
        && constraint.max_len.is_none()
        && min.is_none()
        && max.is_none()
    {
        return Err(at(
            span,
            field,
            "constrains nothing (one_of, prefix, pattern, max_len, min, max)".into(),
        ));
    }
    Ok(constraint)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../tests/fixtures/policy.toml");

    fn env() -> HashMap<String, String> {
        HashMap::from([("GITHUB_TOKEN".to_string(), "ghp_test".to_string())])
    }

    fn load(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(Path::new("policy.toml"), text, &[], &env())
    }

    #[test]
    fn the_contract_example_loads_as_written() {
        let p = load(EXAMPLE).unwrap();
        assert_eq!(p.tenants.len(), 1);
        assert_eq!(p.upstreams().len(), 2);
        assert_eq!(
            p.upstreams()[0].headers,
            vec![("Authorization".to_string(), "Bearer ghp_test".to_string())]
        );
        assert_eq!(p.agents.len(), 2);
        let triage = p
            .agent_by_key_digest(&parse_sha256(&hash_key("password")).unwrap())
            .unwrap();
        assert_eq!(p.agents[triage].id, "triage-bot");
        let nightly = p.agent_by_id("nightly-report").unwrap();
        assert_eq!(p.agents[nightly].upstreams, Some(vec![1]));
        assert!(p.may_use_upstream(nightly, 1));
        assert!(!p.may_use_upstream(nightly, 0));
        let rate = p.agents[nightly].rate.clone().unwrap();
        assert_eq!(rate.burst, 10);
        assert!((rate.per_second - 2.0).abs() < 1e-9);
    }

    #[test]
    fn hash_key_matches_the_examples() {
        assert_eq!(
            hash_key("password"),
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
        assert_eq!(
            hash_key("hello world"),
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
    }

    fn error_of(text: &str) -> PolicyError {
        load(text).unwrap_err()
    }

    const BASE: &str = "[[tenant]]\nid = \"acme\"\n[[upstream]]\nname = \"gh\"\nurl = \"http://127.0.0.1:9/mcp\"\ntenant = \"acme\"\n";

    #[test]
    fn errors_name_file_line_and_field() {
        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\ntenant = \"acme\"\nallow = [\"gh/x\"]\ncolour = \"red\"\n"
        ));
        assert_eq!(e.line, Some(11), "{e}");
        assert!(e.message.contains("colour"), "{e}");
        assert!(e.to_string().starts_with("policy.toml:11"), "{e}");

        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\ntenant = \"nobody\"\n"
        ));
        assert_eq!((e.line, e.field.as_str()), (Some(9), "agent.tenant"), "{e}");

        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\nallow = [\"gihtub/x\"]\n"
        ));
        assert_eq!((e.line, e.field.as_str()), (Some(9), "agent.allow"), "{e}");
        assert!(e.message.contains("unknown upstream"), "{e}");

        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\nupstreams = [\"files\"]\n"
        ));
        assert_eq!(e.field, "agent.upstreams", "{e}");

        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\n[[agent]]\nid = \"a\"\n"
        ));
        assert_eq!((e.line, e.field.as_str()), (Some(10), "agent.id"), "{e}");

        let key = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\nkey_sha256 = \"{key}\"\n[[agent]]\nid = \"b\"\nkey_sha256 = \"{key}\"\n"
        ));
        assert_eq!(e.field, "agent.key_sha256", "{e}");
        assert!(e.message.contains("\"a\""), "{e}");

        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\nkey_sha256 = \"abc\"\n"
        ));
        assert_eq!(e.field, "agent.key_sha256");

        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\nallow = [\"gh/[x]\"]\n"
        ));
        assert_eq!(e.field, "agent.allow");

        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\n[[agent.tool]]\nmatch = \"gh/x\"\n[agent.tool.args]\np = {{ pattern = \"(\" }}\n"
        ));
        assert_eq!(
            (e.line, e.field.as_str()),
            (Some(12), "agent.tool.args.p"),
            "{e}"
        );

        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\n[[agent.tool]]\nmatch = \"gh/x\"\n[agent.tool.args]\np = {{ maxlen = 3 }}\n"
        ));
        assert!(e.message.contains("maxlen"), "{e}");

        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\nrate = {{ per_second = 1, per_minute = 2, burst = 1 }}\n"
        ));
        assert_eq!(e.field, "agent.rate");

        let e = error_of(
            "[[upstream]]\nname = \"gh\"\nurl = \"http://127.0.0.1:9/\"\n[upstream.headers]\nAuthorization = \"Bearer ${MISSING_TOKEN}\"\n",
        );
        assert!(e.message.contains("MISSING_TOKEN"), "{e}");
        assert_eq!(e.line, Some(5));

        let e = error_of("not toml [");
        assert_eq!(e.line, Some(1));
    }

    #[test]
    fn policy_upstream_extends_an_environment_upstream() {
        let configured = vec![Upstream {
            name: "gh".into(),
            transport: Transport::parse("http://127.0.0.1:7777/mcp").unwrap(),
            headers: Vec::new(),
        }];
        let p = Policy::parse(
            Path::new("p.toml"),
            &format!("{BASE}[upstream.headers]\nX-Api-Key = \"k\"\n"),
            &configured,
            &env(),
        )
        .unwrap();
        assert_eq!(p.upstreams().len(), 1);
        assert_eq!(
            match &p.upstreams()[0].transport {
                Transport::Http(t) => t.addr.port(),
            },
            7777,
            "the environment's URL wins"
        );
        assert_eq!(
            p.upstreams()[0].headers,
            vec![("X-Api-Key".to_string(), "k".to_string())]
        );
        assert_eq!(p.upstream_rules[0].tenant, Some(0));
    }
}
