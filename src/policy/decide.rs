//! Decisions: may this agent see this tool, may it make this call. Pure functions over the
//! policy and the envelope, so each is testable alone.

use simd_json::Node;

use super::Policy;
use super::args::arguments_iter;

/// The outcome of authorizing a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused; `rule` names what decided it, `reason` says why in words for the agent.
    Deny {
        rule: String,
        reason: String,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Whether `agent` may see and call tool `name` of upstream `upstream` at all (before
/// argument constraints): the upstream is reachable, no `deny` glob matches, an `allow` glob does.
pub fn tool_visible(policy: &Policy, agent: usize, upstream: usize, name: &str) -> bool {
    let a = &policy.agents[agent];
    let Some(up) = policy.upstreams().get(upstream) else {
        return false;
    };
    policy.may_use_upstream(agent, upstream)
        && !a.deny.iter().any(|g| g.matches_qualified(&up.name, name))
        && a.allow.iter().any(|g| g.matches_qualified(&up.name, name))
}

/// Authorizes a tools/call of `name` on `upstream` with `arguments` (tape nodes of the
/// arguments object, when present). Deny wins over allow; nothing is allowed by default; then
/// every `[[agent.tool]]` rule whose `match` covers the tool checks its argument constraints.
pub fn authorize_call(
    policy: &Policy,
    agent: usize,
    upstream: usize,
    name: &str,
    arguments: Option<&[Node<'_>]>,
) -> Decision {
    let a = &policy.agents[agent];
    let Some(up) = policy.upstreams().get(upstream) else {
        return unknown_tool(name);
    };
    if !policy.may_use_upstream(agent, upstream) {
        // Indistinguishable from a tool that does not exist: another tenant's tools are not
        // revealed.
        return unknown_tool(name);
    }
    if let Some(rule) = a.deny.iter().find(|g| g.matches_qualified(&up.name, name)) {
        return Decision::Deny {
            rule: format!("deny {:?}", rule.as_str()),
            reason: format!(
                "tool {}/{name} is denied by rule {:?}",
                up.name,
                rule.as_str()
            ),
        };
    }
    if !a.allow.iter().any(|g| g.matches_qualified(&up.name, name)) {
        return Decision::Deny {
            rule: "allow (no match)".into(),
            reason: format!(
                "tool {}/{name} is not allowed for agent {:?} (no allow rule matches)",
                up.name, a.id
            ),
        };
    }
    let args = arguments.filter(|n| matches!(n.first(), Some(Node::Object { .. })));
    if arguments.is_some() && args.is_none() {
        return Decision::Deny {
            rule: "arguments".into(),
            reason: "arguments must be a JSON object".into(),
        };
    }
    for rule in a
        .tools
        .iter()
        .filter(|r| r.pattern.matches_qualified(&up.name, name))
    {
        for (arg, constraint) in &rule.args {
            let Some(value) = args
                .and_then(|nodes| arguments_iter(nodes).find_map(|(k, v)| (k == arg).then_some(v)))
            else {
                continue;
            };
            if let Err(why) = constraint.check(value) {
                return Decision::Deny {
                    rule: format!("{:?} args.{arg}", rule.pattern.as_str()),
                    reason: format!("argument {arg:?} of {}/{name} {why}", up.name),
                };
            }
        }
    }
    Decision::Allow
}

/// Whether a prompt or resource is hidden from `agent`: prompts and resources of an upstream the
/// agent may use are visible unless a `deny` glob matches `"<upstream>/prompt:<name>"` or
/// `"<upstream>/resource:<uri>"`.
pub fn item_denied(
    policy: &Policy,
    agent: usize,
    upstream: usize,
    kind: &str,
    item: &str,
) -> Option<String> {
    let up = policy.upstreams().get(upstream)?;
    let a = &policy.agents[agent];
    // "<kind>:<item>" is matched as the tool part; build it once.
    let qualified = format!("{kind}:{item}");
    a.deny
        .iter()
        .find(|g| g.matches_qualified(&up.name, &qualified))
        .map(|g| g.as_str().to_owned())
}

/// Authorizes the use of a prompt or resource (`kind` is `"prompt"` or `"resource"`): allowed
/// unless a deny rule names it (see [`item_denied`]).
pub fn authorize_item(
    policy: &Policy,
    agent: usize,
    upstream: usize,
    kind: &str,
    item: &str,
) -> Decision {
    match item_denied(policy, agent, upstream, kind, item) {
        Some(rule) => Decision::Deny {
            reason: format!("{kind} {item:?} is denied by rule {rule:?}"),
            rule: format!("deny {rule:?}"),
        },
        None => Decision::Allow,
    }
}

/// Authorizes one JSON-RPC message from `agent` to `upstream`. tools/call is decided by
/// [`authorize_call`]; prompts/get and resources/* by [`item_denied`]; everything else (initialize,
/// ping, lists, notifications, responses to server requests) by access to the upstream, which
/// the caller has already checked.
pub fn authorize_message(
    policy: &Policy,
    agent: usize,
    upstream: usize,
    message: &crate::mcp::envelope::Message<'_>,
    arguments: Option<&[Node<'_>]>,
) -> Decision {
    let Some(method) = message.method else {
        return Decision::Allow;
    };
    match method {
        "tools/call" => match message.name {
            Some(name) => authorize_call(policy, agent, upstream, name, arguments),
            None => Decision::Deny {
                rule: "tools/call".into(),
                reason: "tools/call without params.name".into(),
            },
        },
        "prompts/get" => match message.name {
            Some(name) => authorize_item(policy, agent, upstream, "prompt", name),
            None => Decision::Allow,
        },
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => match message.uri {
            Some(uri) => authorize_item(policy, agent, upstream, "resource", uri),
            None => Decision::Allow,
        },
        _ => Decision::Allow,
    }
}

fn unknown_tool(name: &str) -> Decision {
    Decision::Deny {
        rule: "unknown tool".into(),
        reason: format!("unknown tool {name:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    fn policy() -> Policy {
        let env = HashMap::from([("GITHUB_TOKEN".to_string(), "t".to_string())]);
        Policy::parse(
            Path::new("p.toml"),
            include_str!("../../tests/fixtures/policy.toml"),
            &[],
            &env,
        )
        .unwrap()
    }

    fn decide(p: &Policy, agent: &str, upstream: usize, name: &str, args: &str) -> Decision {
        let a = p.agent_by_id(agent).unwrap();
        let mut bytes = args.as_bytes().to_vec();
        let tape = simd_json::to_tape(&mut bytes).unwrap();
        authorize_call(p, a, upstream, name, Some(&tape.0))
    }

    const GH: usize = 0;
    const FILES: usize = 1;

    #[test]
    fn allow_and_deny_globs() {
        let p = policy();
        assert!(decide(&p, "triage-bot", GH, "search_code", "{}").is_allowed());
        assert!(decide(&p, "triage-bot", GH, "get_issue", "{}").is_allowed());
        let d = decide(&p, "triage-bot", GH, "delete_repo", "{}");
        assert!(
            matches!(&d, Decision::Deny { rule, .. } if rule.contains("github/delete_*")),
            "{d:?}"
        );
        let d = decide(&p, "triage-bot", GH, "merge_pr", "{}");
        assert!(
            matches!(&d, Decision::Deny { reason, .. } if reason.contains("no allow rule")),
            "{d:?}"
        );
        assert!(
            decide(
                &p,
                "triage-bot",
                FILES,
                "read_file",
                r#"{"path":"/srv/shared/a"}"#
            )
            .is_allowed()
        );
        assert!(!decide(&p, "triage-bot", FILES, "write_file", "{}").is_allowed());
    }

    #[test]
    fn agents_outside_their_upstreams_see_unknown_tools() {
        let p = policy();
        let d = decide(&p, "nightly-report", GH, "search_code", "{}");
        assert_eq!(
            d,
            Decision::Deny {
                rule: "unknown tool".into(),
                reason: "unknown tool \"search_code\"".into()
            }
        );
        assert!(decide(&p, "nightly-report", FILES, "anything", "{}").is_allowed());
        let a = p.agent_by_id("nightly-report").unwrap();
        assert!(!tool_visible(&p, a, GH, "search_code"));
        assert!(tool_visible(&p, a, FILES, "stat"));
    }

    #[test]
    fn argument_constraints() {
        let p = policy();
        let ok = r#"{"repo":"acme/web","title":"Crash","labels":["bug"]}"#;
        assert!(decide(&p, "triage-bot", GH, "create_issue", ok).is_allowed());
        let d = decide(
            &p,
            "triage-bot",
            GH,
            "create_issue",
            r#"{"repo":"acme/secret","title":"x"}"#,
        );
        assert!(
            matches!(&d, Decision::Deny { reason, rule } if reason.contains("\"repo\"") && reason.contains("one of") && rule.contains("args.repo")),
            "{d:?}"
        );
        let long = format!(r#"{{"repo":"acme/api","title":"{}"}}"#, "t".repeat(201));
        assert!(!decide(&p, "triage-bot", GH, "create_issue", &long).is_allowed());
        let labels = r#"{"repo":"acme/api","labels":[1,2,3,4,5,6]}"#;
        assert!(!decide(&p, "triage-bot", GH, "create_issue", labels).is_allowed());
        assert!(
            !decide(
                &p,
                "triage-bot",
                FILES,
                "read_file",
                r#"{"path":"/etc/passwd"}"#
            )
            .is_allowed()
        );
        assert!(
            !decide(
                &p,
                "triage-bot",
                FILES,
                "read_file",
                r#"{"path":"/srv/shared/../x"}"#
            )
            .is_allowed()
        );
        assert!(decide(&p, "nightly-report", FILES, "stat", r#"{"depth":3}"#).is_allowed());
        assert!(!decide(&p, "nightly-report", FILES, "stat", r#"{"depth":4}"#).is_allowed());
        assert!(!decide(&p, "nightly-report", FILES, "stat", r#"{"depth":"2"}"#).is_allowed());
        // Arguments that are not an object are refused.
        assert!(!decide(&p, "nightly-report", FILES, "stat", "[1]").is_allowed());
    }

    #[test]
    fn prompts_and_resources_are_visible_unless_denied() {
        let env = HashMap::new();
        let text = r#"
[[upstream]]
name = "files"
url = "http://127.0.0.1:9/mcp"
[[agent]]
id = "a"
allow = ["files/read_*"]
deny = ["files/prompt:admin_*", "files/resource:file:///etc/*"]
"#;
        let p = Policy::parse(Path::new("p.toml"), text, &[], &env).unwrap();
        let a = p.agent_by_id("a").unwrap();
        assert_eq!(item_denied(&p, a, 0, "prompt", "summarize"), None);
        assert_eq!(
            item_denied(&p, a, 0, "prompt", "admin_reset").as_deref(),
            Some("files/prompt:admin_*")
        );
        assert_eq!(item_denied(&p, a, 0, "resource", "file:///srv/x"), None);
        assert!(item_denied(&p, a, 0, "resource", "file:///etc/passwd").is_some());

        let parse = |body: &str| {
            let mut parser = crate::mcp::envelope::EnvelopeParser::new();
            let env = parser.parse(body.as_bytes()).unwrap();
            let m = *env.single().unwrap();
            authorize_message(&p, a, 0, &m, env.arguments(&m))
        };
        assert!(
            parse(
                r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"summarize"}}"#
            )
            .is_allowed()
        );
        assert!(
            !parse(
                r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"admin_reset"}}"#
            )
            .is_allowed()
        );
        assert!(!parse(r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///etc/shadow"}}"#).is_allowed());
        assert!(!parse(r#"{"jsonrpc":"2.0","id":1,"method":"resources/subscribe","params":{"uri":"file:///etc/shadow"}}"#).is_allowed());
        assert!(parse(r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///srv/a"}}"#).is_allowed());
        assert!(parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).is_allowed());
        assert!(
            !parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#).is_allowed()
        );
    }
}
