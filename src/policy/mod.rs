//! The policy file: tenants, upstreams, agents and their rules.
//!
//! `examples/policy.toml` (the team's contract, `../shared/examples/policy.toml`) loads as written. A policy is read once
//! (and again on reload) into an immutable, indexed [`Policy`]: agents are found by the SHA-256 of
//! their key, rules are compiled globs and regexes, upstreams are indexes into the gateway's
//! upstream list. Every problem is reported with the file, the line and the field ([`load`]).
//! The rooms: [`load`] reads the file, [`args`] checks arguments, [`decide`] makes every
//! decision, [`live`] swaps the policy on reload; this module holds the compiled policy and
//! which rate limits a request falls in.

pub mod args;
pub mod decide;
mod fields;
pub mod integrity;
pub mod live;
pub mod load;
mod stdio;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use crate::glob::Glob;
use crate::ratelimit::{Limit, Use, Uses};
use crate::upstream::Upstream;
use args::Constraint;

#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub limit: Option<Limit>,
}

/// What the policy says of an upstream (by index into the gateway's upstream list).
#[derive(Debug, Clone)]
pub struct UpstreamRule {
    pub tenant: Option<usize>,
    pub limit: Option<Limit>,
}

#[derive(Debug, Clone)]
pub struct ToolRule {
    pub pattern: Glob,
    /// Per tool it matches when the pattern is a glob.
    pub limit: Option<Limit>,
    pub args: Vec<(String, Constraint)>,
}

#[derive(Debug, Clone)]
pub struct Agent {
    pub id: String,
    pub tenant: Option<usize>,
    pub user: Option<String>,
    pub allow: Vec<Glob>,
    pub deny: Vec<Glob>,
    pub limit: Option<Limit>,
    pub redact: Vec<Glob>,
    /// Upstream indexes this agent may use (`upstreams = [...]`), or all of its tenant's.
    pub upstreams: Option<Vec<usize>>,
    pub tools: Vec<ToolRule>,
    /// This agent's identity fields as the audit log writes them, encoded once.
    pub audit_identity: Vec<u8>,
}

/// The limits one request falls in ([`Policy::limits_for`]), each looked up as it is visited.
#[derive(Clone, Copy)]
pub struct LimitsFor<'a> {
    policy: &'a Policy,
    agent: &'a Agent,
    upstream: usize,
    /// The tool of a tools/call.
    tool: Option<&'a str>,
}

impl<'a> Uses<'a> for LimitsFor<'a> {
    fn visit(&self, mut f: impl FnMut(Use<'a>) -> bool) {
        let Some(tool) = self.tool else {
            // Anything but a tools/call: the agent's own limit only.
            if let Some(limit) = &self.agent.limit {
                f(Use { limit, name: None });
            }
            return;
        };
        let up_name = self
            .policy
            .upstream_list
            .get(self.upstream)
            .map_or("", |u| u.name.as_str());
        for rule in &self.agent.tools {
            if let Some(limit) = &rule.limit
                && rule.pattern.matches_qualified(up_name, tool)
                && !f(Use {
                    limit,
                    name: Some((up_name, tool)),
                })
            {
                return;
            }
        }
        let tenant = self.agent.tenant.map(|t| &self.policy.tenants[t].limit);
        let upstream = self
            .policy
            .upstream_rules
            .get(self.upstream)
            .map(|r| &r.limit);
        for limit in [
            &self.agent.limit,
            tenant.unwrap_or(&None),
            upstream.unwrap_or(&None),
        ] {
            if let Some(limit) = limit
                && !f(Use { limit, name: None })
            {
                return;
            }
        }
    }
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
    /// Tool integrity: pins, the poison scan, overrides.
    pub integrity: integrity::Integrity,
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

impl Policy {
    /// The limits a request of `agent` to `upstream` falls in, in a fixed order: for
    /// tools/call (`tool` is its name) the agent's matching tool rules, the agent, its tenant,
    /// the upstream; for any other request the agent's own limit.
    pub fn limits_for<'a>(
        &'a self,
        agent: usize,
        upstream: usize,
        tool: Option<&'a str>,
    ) -> LimitsFor<'a> {
        LimitsFor {
            policy: self,
            agent: &self.agents[agent],
            upstream,
            tool,
        }
    }

    /// Every limit in the file.
    fn limits_mut(&mut self) -> impl Iterator<Item = &mut Limit> {
        let tenants = self.tenants.iter_mut().filter_map(|t| t.limit.as_mut());
        let upstreams = self
            .upstream_rules
            .iter_mut()
            .filter_map(|r| r.limit.as_mut());
        let agents = self.agents.iter_mut().flat_map(|a| {
            let rules = a.tools.iter_mut().filter_map(|r| r.limit.as_mut());
            a.limit.as_mut().into_iter().chain(rules)
        });
        tenants.chain(upstreams).chain(agents)
    }

    /// After a reload: limits whose key and rate did not change keep their state.
    pub fn inherit_rate_state(&mut self, old: &Policy) {
        let mut before: HashMap<&str, &Limit> = HashMap::new();
        let old_limits = (old.tenants.iter().filter_map(|t| t.limit.as_ref()))
            .chain(old.upstream_rules.iter().filter_map(|r| r.limit.as_ref()))
            .chain(old.agents.iter().flat_map(|a| {
                let rules = a.tools.iter().filter_map(|r| r.limit.as_ref());
                a.limit.iter().chain(rules)
            }));
        for l in old_limits {
            before.entry(l.key.as_str()).or_insert(l);
        }
        for l in self.limits_mut() {
            if let Some(prior) = before.get(l.key.as_str()) {
                l.inherit(prior);
            }
        }
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

    /// A digest of what `agent` may see: its allow and deny rules, the upstreams it may use
    /// (by name), and the tool integrity checks. Equal digests in two policies mean the agent's lists are the same in both;
    /// a reload that changes it is what streams tell the agent about (`list_changed`).
    pub fn view_of(&self, agent: usize) -> u64 {
        use std::hash::{Hash, Hasher};
        let a = &self.agents[agent];
        let mut h = std::hash::DefaultHasher::new();
        for g in &a.allow {
            g.as_str().hash(&mut h);
        }
        0xa1u8.hash(&mut h);
        for g in &a.deny {
            g.as_str().hash(&mut h);
        }
        0xd0u8.hash(&mut h);
        for (i, u) in self.upstream_list.iter().enumerate() {
            if self.may_use_upstream(agent, i) {
                u.name.hash(&mut h);
            }
        }
        // Pins, overrides and integrity settings decide what of those lists it sees.
        self.integrity.fingerprint().hash(&mut h);
        h.finish()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::{Local, now_ns};
    use std::path::Path;

    const BASE: &str = r#"
[[tenant]]
id = "t"
rate = { per_second = 100, burst = 100 }
[[upstream]]
name = "gh"
url = "http://127.0.0.1:9/mcp"
tenant = "t"
rate = { per_second = 100, burst = 100 }
"#;

    fn load(text: &str) -> Policy {
        let env = HashMap::<String, String>::new();
        Policy::parse(Path::new("p.toml"), text, &[], &env).unwrap()
    }

    fn keys(p: &Policy, agent: usize, tool: Option<&str>) -> Vec<String> {
        let mut keys = Vec::new();
        p.limits_for(agent, 0, tool).visit(|u| {
            keys.push(u.limit.key.clone());
            true
        });
        keys
    }

    #[test]
    fn limits_apply_in_a_fixed_order_keyed_by_ids() {
        let p = load(&format!(
            r#"{BASE}
[[agent]]
id = "a"
tenant = "t"
allow = ["gh/*"]
rate = {{ per_second = 10, burst = 10 }}
[[agent.tool]]
match = "gh/create_*"
rate = {{ per_second = 1, burst = 1 }}
[[agent.tool]]
match = "gh/other"
rate = {{ per_second = 1, burst = 1 }}
"#
        ));
        assert_eq!(
            keys(&p, 0, Some("create_issue")),
            ["tool/a/gh/create_*", "agent/a", "tenant/t", "upstream/gh"]
        );
        // Anything but tools/call: the agent's own limit only.
        assert_eq!(keys(&p, 0, None), ["agent/a"]);
        // A glob rule limits each tool it matches separately.
        let take = |tool| Local.admit(&p.limits_for(0, 0, Some(tool)), now_ns());
        assert!(take("create_issue").is_ok());
        assert!(take("create_pr").is_ok());
        let refused = take("create_issue").unwrap_err();
        assert!(refused.label.contains("on gh/create_issue"), "{refused:?}");
        // Refused whole: the agent gave two tokens of its ten, not a third.
        let now = now_ns();
        let left = (0..20)
            .take_while(|_| Local.admit(&p.limits_for(0, 0, None), now).is_ok())
            .count();
        assert_eq!(left, 8);
        // A refusal by a later limit gives back what the earlier ones gave.
        let tight = load(&format!(
            "{}\n[[agent]]\nid = \"a\"\ntenant = \"t\"\nallow = [\"gh/*\"]\nrate = {{ per_hour = 1, burst = 5 }}\n",
            BASE.replace(
                "rate = { per_second = 100, burst = 100 }\n[[upstream]]",
                "rate = { per_hour = 1, burst = 1 }\n[[upstream]]"
            )
        ));
        let now = now_ns();
        assert!(Local.admit(&tight.limits_for(0, 0, Some("x")), now).is_ok());
        let refused = Local
            .admit(&tight.limits_for(0, 0, Some("x")), now)
            .unwrap_err();
        assert!(refused.label.starts_with("tenant \"t\""), "{refused:?}");
        let left = (0..20)
            .take_while(|_| Local.admit(&tight.limits_for(0, 0, None), now).is_ok())
            .count();
        assert_eq!(left, 4, "the refused call's agent token was given back");
    }

    #[test]
    fn a_reload_keeps_state_by_key_even_when_indexes_move() {
        let agent = |id: &str, burst: u32| {
            format!(
                "[[agent]]\nid = \"{id}\"\nallow = [\"gh/*\"]\nrate = {{ per_hour = 1, burst = {burst} }}\n[[agent.tool]]\nmatch = \"gh/*\"\nrate = {{ per_hour = 1, burst = 1 }}\n"
            )
        };
        let old = load(&format!("{BASE}{}", agent("a", 1)));
        let now = now_ns();
        assert!(Local.admit(&old.limits_for(0, 0, Some("x")), now).is_ok());
        assert!(Local.admit(&old.limits_for(0, 0, None), now).is_err());
        // A new agent before "a": "a" moves from index 0 to 1 and keeps its state, for its own
        // limit and for the per-tool buckets of its glob rule.
        let mut new = load(&format!("{BASE}{}{}", agent("b", 1), agent("a", 1)));
        new.inherit_rate_state(&old);
        assert!(Local.admit(&new.limits_for(1, 0, None), now).is_err());
        let tool_rule = new.agents[1].tools[0].limit.as_ref().unwrap();
        assert_eq!(
            tool_rule.names(),
            1,
            "the per-tool bucket of \"x\" came along"
        );
        assert!(
            Local.admit(&new.limits_for(0, 0, None), now).is_ok(),
            "b is fresh"
        );
        // A changed rate is a new limit.
        let mut changed = load(&format!("{BASE}{}", agent("a", 2)));
        changed.inherit_rate_state(&new);
        assert!(Local.admit(&changed.limits_for(0, 0, None), now).is_ok());
    }

    #[test]
    fn a_view_changes_with_the_pins_and_overrides() {
        // A reload that changes them changes what the agent's lists show: its streams are told.
        let agent = "[[agent]]\nid = \"a\"\ntenant = \"t\"\nallow = [\"gh/*\"]\n";
        let plain = load(&format!("{BASE}{agent}"));
        let mut pinned = load(&format!("{BASE}{agent}"));
        pinned
            .integrity
            .set_pins(crate::integrity::pins::Pins::default());
        let overridden = load(&format!(
            "{BASE}[[upstream.tool]]\nname = \"x\"\ndescription = \"y\"\n{agent}"
        ));
        assert_eq!(plain.view_of(0), load(&format!("{BASE}{agent}")).view_of(0));
        assert_ne!(plain.view_of(0), pinned.view_of(0));
        assert_ne!(plain.view_of(0), overridden.view_of(0));
    }
}
