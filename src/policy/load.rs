//! Loading the policy: the file's tables (`fields`) put together into a [`Policy`],
//! merged with the upstreams of the environment. Every problem is reported with the file, the line and the field.

use std::collections::HashMap;
use std::path::Path;

use toml::Spanned;

pub use super::fields::{Env, ProcessEnv};
use super::fields::{
    RawPolicy, RawUpstream, check_id, compile_constraint, compile_rate, compile_rule_glob,
    expand_env, limit, line_of, parse_sha256, valid_header_name,
};
use super::{Agent, Policy, PolicyError, Tenant, ToolRule, UpstreamRule};
use crate::glob::Glob;
use crate::ratelimit::Limit;
use crate::upstream::{TlsOptions, Transport, Upstream};

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

    /// [`Policy::load`], and the pin file of tool integrity when one is set
    /// (`SCOPEGATE_PINS`): what the gateway runs with, at start and on each reload.
    pub fn load_with_pins(
        path: &Path,
        pins: Option<&Path>,
        configured: &[Upstream],
        env: &dyn Env,
    ) -> Result<Policy, PolicyError> {
        let mut policy = Policy::load(path, configured, env)?;
        if let Some(pins) = pins {
            let read = crate::integrity::pins::Pins::load(pins).map_err(|message| PolicyError {
                file: pins.to_owned(),
                line: None,
                field: String::new(),
                message,
            })?;
            policy.integrity.set_pins(read);
        }
        Ok(policy)
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
        // A TLS setting's error, at the line of the field it names.
        let tls_error = |u: &RawUpstream, e: crate::upstream::TlsSettingError| {
            let span = match e.field {
                "upstream.ca_file" => u.ca_file.as_ref(),
                "upstream.client_cert_file" => u.client_cert_file.as_ref(),
                "upstream.client_key_file" => u.client_key_file.as_ref(),
                "upstream.tls_server_name" => u.tls_server_name.as_ref(),
                _ => u.url.as_ref(),
            };
            at(span.map(|s| s.span()), e.field, e.problem)
        };

        // Tenants.
        let mut tenants: Vec<Tenant> = Vec::new();
        for t in &raw.tenant {
            let id = t.id.get_ref();
            let defined = tenants.iter().any(|x| &x.id == id);
            check_id(&t.id, "tenant.id", "tenant", defined, &at)?;
            let rate = compile_rate(&t.rate, "tenant.rate", &at)?;
            tenants.push(Tenant {
                id: id.clone(),
                limit: rate.map(|r| limit(format!("tenant/{id}"), format!("tenant {id:?}"), r)),
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
                limit: None,
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
            let from_env = upstreams.iter().position(|x| &x.name == name);
            let stdio = super::stdio::transport(u, path, env, &at)?;
            if let (Some(_), Some(command)) = (from_env, &u.command) {
                return Err(at(
                    Some(command.span()),
                    "upstream.command",
                    format!(
                        "upstream {name:?} is in SCOPEGATE_UPSTREAMS with a URL: it cannot also \
                         be a stdio server"
                    ),
                ));
            }
            let index = match from_env {
                // Named in SCOPEGATE_UPSTREAMS too: the environment's URL wins, the policy adds
                // headers, tenant, rate and TLS settings.
                Some(i) => i,
                None if stdio.is_some() => {
                    upstreams.push(Upstream {
                        name: name.clone(),
                        transport: stdio.expect("checked"),
                        headers: Vec::new(),
                    });
                    rules.push(UpstreamRule {
                        tenant: None,
                        limit: None,
                    });
                    upstreams.len() - 1
                }
                None => {
                    let Some(url) = &u.url else {
                        return Err(at(
                            Some(u.name.span()),
                            "upstream.url",
                            format!(
                                "upstream {name:?} has no url or command (and is not in \
                                 SCOPEGATE_UPSTREAMS)"
                            ),
                        ));
                    };
                    // With its TLS settings at once: a private CA needs no system store.
                    let transport = Transport::parse_with(url.get_ref(), tls_options(u, path))
                        .map_err(|e| tls_error(u, e))?;
                    upstreams.push(Upstream {
                        name: name.clone(),
                        transport,
                        headers: Vec::new(),
                    });
                    rules.push(UpstreamRule {
                        tenant: None,
                        limit: None,
                    });
                    upstreams.len() - 1
                }
            };
            let tls = tls_options(u, path);
            if !tls.is_empty() && from_env.is_some() {
                // The environment's URL, the policy's TLS settings.
                let transport = upstreams[index].transport.clone();
                upstreams[index].transport =
                    transport.with_tls(tls).map_err(|e| tls_error(u, e))?;
            }
            upstreams[index].headers = headers;
            rules[index] = UpstreamRule {
                tenant,
                limit: rate
                    .map(|r| limit(format!("upstream/{name}"), format!("upstream {name:?}"), r)),
            };
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
            check_id(&a.id, "agent.id", "agent", by_id.contains_key(id), &at)?;
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
                let limit = rate.map(|r| {
                    let key = format!("tool/{id}/{}", pattern.as_str());
                    let label = format!(
                        "tool {} for agent {id:?} ({})",
                        pattern.as_str(),
                        r.describe()
                    );
                    if pattern.has_wildcard() {
                        Limit::per_name(key, r, label)
                    } else {
                        Limit::new(key, r, label)
                    }
                });
                tools.push(ToolRule {
                    pattern,
                    limit,
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
                limit: rate.map(|r| limit(format!("agent/{id}"), format!("agent {id:?}"), r)),
                redact,
                upstreams: agent_upstreams,
                tools,
            });
        }

        let integrity = super::fields::compile_integrity(&raw, &upstreams, &at)?;
        Ok(Policy {
            integrity,
            source: path.to_owned(),
            tenants,
            upstream_rules: rules,
            upstream_list: upstreams,
            agents,
            by_key,
            by_id,
        })
    }
}

/// An upstream's TLS settings; relative file names are relative to the policy file.
fn tls_options(u: &RawUpstream, policy: &Path) -> TlsOptions {
    let dir = policy.parent().unwrap_or(Path::new("."));
    let file = |f: &Option<Spanned<String>>| f.as_ref().map(|f| dir.join(f.get_ref()));
    TlsOptions {
        ca_file: file(&u.ca_file),
        client_cert_file: file(&u.client_cert_file),
        client_key_file: file(&u.client_key_file),
        server_name: u.tls_server_name.as_ref().map(|n| n.get_ref().clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::hash_key;

    const EXAMPLE: &str = include_str!("../../examples/policy.toml");

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
        let rate = p.agents[nightly].limit.clone().unwrap().rate;
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

        // items beside a string constraint could never be met; inside items it is an error
        // of its own, named with the path to it.
        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\n[[agent.tool]]\nmatch = \"gh/x\"\n[agent.tool.args]\np = {{ prefix = \"/x/\", items = {{ max_len = 3 }} }}\n"
        ));
        assert!(e.message.contains("put them inside items"), "{e}");
        let e = error_of(&format!(
            "{BASE}[[agent]]\nid = \"a\"\n[[agent.tool]]\nmatch = \"gh/x\"\n[agent.tool.args]\np = {{ max_len = 9, items = {{ pattern = \"(\" }} }}\n"
        ));
        assert_eq!(e.field, "agent.tool.args.p.items", "{e}");

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
            p.upstreams()[0].transport.endpoint().unwrap().name.port(),
            7777,
            "the environment's URL wins"
        );
        assert_eq!(
            p.upstreams()[0].headers,
            vec![("X-Api-Key".to_string(), "k".to_string())]
        );
        assert_eq!(p.upstream_rules[0].tenant, Some(0));
    }

    #[test]
    fn bad_settings_name_the_field() {
        let env = HashMap::<String, String>::new();
        for (text, field) in [
            ("[integrity]\nunpinned = \"maybe\"\n", "integrity.unpinned"),
            (
                "[integrity]\non_finding = \"ignore\"\n",
                "integrity.on_finding",
            ),
            (
                "[integrity]\nmax_description = 0\n",
                "integrity.max_description",
            ),
        ] {
            let full = format!("{text}[[upstream]]\nname = \"w\"\nurl = \"http://127.0.0.1:9/\"\n");
            let e = Policy::parse(Path::new("p.toml"), &full, &[], &env).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        let twice = "[[upstream]]\nname = \"w\"\nurl = \"http://127.0.0.1:9/\"\n\
                     [[upstream.tool]]\nname = \"t\"\ndescription = \"a\"\n\
                     [[upstream.tool]]\nname = \"t\"\ndescription = \"b\"\n";
        let e = Policy::parse(Path::new("p.toml"), twice, &[], &env).unwrap_err();
        assert!(e.message.contains("two overrides"), "{e}");
    }
}
