//! Decisions: may this agent see this tool, may it make this call. Pure functions over the
//! policy and the envelope, so each is testable alone.

use simd_json::Node;

use super::Policy;
use super::args::arguments_iter;
use super::integrity::CallVerdict;
use crate::integrity::Kind as ItemDef;
use crate::mcp::envelope::{Kind, Message, Reference};
use crate::mcp::lists::ListKind;
use crate::mcp::tape::fold_eq;
use crate::mcp::uri;

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

    /// This decision when it refuses, else `then`'s.
    pub fn and(self, then: impl FnOnce() -> Decision) -> Decision {
        match self {
            Decision::Allow => then(),
            deny => deny,
        }
    }
}

/// What a client-to-server method asks of the policy: the one table both endpoints (one
/// upstream at `/mcp/<name>`, several at `/mcp`) decide by, for every protocol revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Session plumbing: allowed to whoever may use the upstream (initialize, ping,
    /// `server/discover`, the lifecycle notifications, answers to the server's requests).
    Plumbing,
    /// A list: allowed, and its answer filtered to what the agent may see.
    List(ListKind),
    /// `tools/call`: `params.name` and `params.arguments`.
    Tool,
    /// `prompts/get`: `params.name`.
    Prompt,
    /// `resources/read`, `subscribe`, `unsubscribe`: `params.uri`.
    Resource,
    /// `completion/complete`: the prompt or resource template in `params.ref`.
    Completion,
    /// `subscriptions/listen` (2026-07-28): the resources in
    /// `params.notifications.resourceSubscriptions`.
    Listen,
    /// Tasks (2025-11-25, and the 2026-07-28 extension): about work this session started,
    /// which was authorized when it started.
    Task,
    /// Not a method of any MCP revision scopegate knows: refused, not forwarded unchecked.
    Unknown,
}

/// The access `method` needs, for a message of `kind`.
pub fn access(method: Option<&str>, kind: Kind) -> Access {
    let Some(method) = method else {
        // A response: the agent's answer to a request the server sent it.
        return Access::Plumbing;
    };
    // The call that matters for speed, first.
    if method == "tools/call" && kind == Kind::Request {
        return Access::Tool;
    }
    match kind {
        Kind::Response => Access::Plumbing,
        Kind::Notification => match method {
            "notifications/initialized"
            | "notifications/cancelled"
            | "notifications/progress"
            | "notifications/roots/list_changed"
            | "notifications/tasks/status" => Access::Plumbing,
            _ => Access::Unknown,
        },
        Kind::Request => match method {
            "initialize" | "ping" | "logging/setLevel" | "server/discover" => Access::Plumbing,
            "subscriptions/listen" => Access::Listen,
            "tools/call" => Access::Tool,
            "prompts/get" => Access::Prompt,
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Access::Resource,
            "completion/complete" => Access::Completion,
            "tasks/get" | "tasks/result" | "tasks/list" | "tasks/cancel" | "tasks/update" => {
                Access::Task
            }
            other => match ListKind::for_method(other) {
                Some(kind) => Access::List(kind),
                None => Access::Unknown,
            },
        },
    }
}

/// What one message asks to use, with the names the upstream will see.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Nothing beyond the upstream (plumbing, lists, tasks).
    Upstream,
    Tool {
        name: &'a str,
        arguments: Option<&'a [Node<'a>]>,
    },
    Prompt(&'a str),
    /// A URI (`resources/read`).
    Resource(&'a str),
    /// A URI template (`completion/complete` with `ref/resource`).
    ResourceTemplate(&'a str),
    /// The subscription filter of `subscriptions/listen` (its tape nodes): each URI in its
    /// `resourceSubscriptions` is a resource the agent asks to follow.
    Subscriptions(Option<&'a [Node<'a>]>),
    /// A method scopegate does not know.
    Unknown(&'a str),
    /// A message missing what its method needs; the text says what.
    Malformed(&'static str),
}

impl<'a> Target<'a> {
    /// What `message` asks for, read off its envelope fields (`arguments` and `notifications`:
    /// the tape nodes of those params, from the envelope).
    pub fn of(
        message: &Message<'a>,
        arguments: Option<&'a [Node<'a>]>,
        notifications: Option<&'a [Node<'a>]>,
    ) -> Target<'a> {
        match access(message.method, message.kind) {
            Access::Listen => Target::Subscriptions(notifications),
            Access::Plumbing | Access::List(_) | Access::Task => Target::Upstream,
            Access::Unknown => Target::Unknown(message.method.unwrap_or_default()),
            Access::Tool => match message.name {
                Some(name) => Target::Tool { name, arguments },
                None => Target::Malformed("tools/call without params.name"),
            },
            Access::Prompt => match message.name {
                Some(name) => Target::Prompt(name),
                None => Target::Malformed("prompts/get without params.name"),
            },
            Access::Resource => match message.uri {
                Some(uri) => Target::Resource(uri),
                None => Target::Malformed("a resources request without params.uri"),
            },
            Access::Completion => match message.reference {
                Some(Reference {
                    kind: Some("ref/prompt"),
                    name: Some(name),
                    ..
                }) => Target::Prompt(name),
                Some(Reference {
                    kind: Some("ref/resource"),
                    uri: Some(uri),
                    ..
                }) => Target::ResourceTemplate(uri),
                _ => Target::Malformed(
                    "completion/complete needs params.ref of type ref/prompt (with name) or ref/resource (with uri)",
                ),
            },
        }
    }
}

/// Authorizes one message from `agent` to upstream `upstream`, which the caller has already
/// found the agent may use.
pub fn authorize(policy: &Policy, agent: usize, upstream: usize, target: &Target<'_>) -> Decision {
    match *target {
        Target::Upstream => Decision::Allow,
        Target::Tool { name, arguments } => {
            authorize_call(policy, agent, upstream, name, arguments)
                .and(|| integrity(policy, upstream, ItemDef::Tool, name))
        }
        Target::Prompt(name) => authorize_item(policy, agent, upstream, ItemKind::Prompt, name)
            .and(|| integrity(policy, upstream, ItemDef::Prompt, name)),
        Target::Resource(uri) => authorize_item(policy, agent, upstream, ItemKind::Resource, uri),
        Target::ResourceTemplate(uri) => {
            authorize_item(policy, agent, upstream, ItemKind::ResourceTemplate, uri)
        }
        Target::Subscriptions(filter) => {
            let Some(nodes) = filter else {
                return Decision::Allow;
            };
            let field = "resourceSubscriptions";
            if arguments_iter(nodes).any(|(k, _)| k != field && fold_eq(k, field)) {
                return Decision::Deny {
                    rule: field.into(),
                    reason: format!("a key differing from {field:?} only in letter case"),
                };
            }
            let Some(uris) = arguments_iter(nodes).find_map(|(k, v)| (k == field).then_some(v))
            else {
                return Decision::Allow;
            };
            let Some(Node::Array { len, .. }) = uris.first() else {
                return Decision::Deny {
                    rule: "malformed".into(),
                    reason: "resourceSubscriptions must be a list of URIs".into(),
                };
            };
            if uris.len() != len + 1 {
                return Decision::Deny {
                    rule: "malformed".into(),
                    reason: "resourceSubscriptions must be a list of URIs".into(),
                };
            }
            for node in &uris[1..] {
                let Node::String(uri) = node else {
                    return Decision::Deny {
                        rule: "malformed".into(),
                        reason: "resourceSubscriptions must be a list of URIs".into(),
                    };
                };
                let d = authorize_item(policy, agent, upstream, ItemKind::Resource, uri);
                if !d.is_allowed() {
                    return d;
                }
            }
            Decision::Allow
        }
        Target::Unknown(method) => Decision::Deny {
            rule: "unknown method".into(),
            reason: format!(
                "method {method:?} is not part of any MCP revision scopegate knows; it is refused rather than forwarded unchecked"
            ),
        },
        Target::Malformed(why) => Decision::Deny {
            rule: "malformed".into(),
            reason: why.into(),
        },
    }
}

/// The rule of a refusal that only says no list has shown the tool (or prompt) yet: the
/// request path lists the upstream ([`crate::upstream::client::walk_list`]) and asks again.
pub const UNSEEN: &str = "integrity (not listed yet)";

/// The integrity checks on a call the rules allow: a verdict made when the definition was
/// listed ([`super::integrity`]).
fn integrity(policy: &Policy, upstream: usize, kind: ItemDef, name: &str) -> Decision {
    match policy.integrity.call(upstream, kind, name) {
        CallVerdict::Pass => Decision::Allow,
        CallVerdict::Block(why) => Decision::Deny {
            rule: "integrity".into(),
            reason: why.to_string(),
        },
        CallVerdict::Unseen => Decision::Deny {
            rule: UNSEEN.into(),
            reason: format!(
                "{} {name:?} has not been listed by its upstream yet: list it first",
                kind.as_str()
            ),
        },
    }
}

/// Whether a refusal is [`UNSEEN`]'s.
pub fn is_unseen(d: &Decision) -> bool {
    matches!(d, Decision::Deny { rule, .. } if rule == UNSEEN)
}

/// Authorizes one JSON-RPC message of the single-upstream endpoint (see [`Target::of`]).
pub fn authorize_message(
    policy: &Policy,
    agent: usize,
    upstream: usize,
    message: &Message<'_>,
    arguments: Option<&[Node<'_>]>,
    notifications: Option<&[Node<'_>]>,
) -> Decision {
    authorize(
        policy,
        agent,
        upstream,
        &Target::of(message, arguments, notifications),
    )
}

/// Whether `agent` may see a listed item of `upstream`: a tool it may call (before argument
/// constraints), a prompt or resource no deny rule names. Used to filter every list answer, on
/// every endpoint and stream.
pub fn visible(policy: &Policy, agent: usize, upstream: usize, kind: ListKind, item: &str) -> bool {
    match kind {
        ListKind::Tools => tool_visible(policy, agent, upstream, item),
        ListKind::Prompts => item_denied(policy, agent, upstream, ItemKind::Prompt, item).is_none(),
        ListKind::Resources => {
            item_denied(policy, agent, upstream, ItemKind::Resource, item).is_none()
        }
        ListKind::ResourceTemplates => {
            item_denied(policy, agent, upstream, ItemKind::ResourceTemplate, item).is_none()
        }
    }
}

/// Whether `agent` may see a listed item of `upstream`: its name or URI by [`visible`], then its
/// definition by the integrity checks (which may give the agent's copy the operator's
/// description). What every list filter asks.
pub fn vet(
    policy: &Policy,
    agent: usize,
    upstream: usize,
    kind: ListKind,
    item: &mut serde_json::Value,
) -> bool {
    let Some(name) = crate::mcp::lists::item_name(kind, item) else {
        return false;
    };
    visible(policy, agent, upstream, kind, name) && policy.integrity.vet(upstream, kind, item)
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
            // One pass: the argument, and whether it is also written in another letter case
            // (to a case-blind parser, Go's encoding/json, that is the same argument: refused,
            // not left unchecked).
            let mut value = None;
            for (k, v) in args.into_iter().flat_map(arguments_iter) {
                if k == arg {
                    value = Some(v);
                } else if k.len() == arg.len() || !k.is_ascii() || !arg.is_ascii() {
                    // (ASCII both: a variant has the same length.)
                    if fold_eq(k, arg) {
                        return Decision::Deny {
                            rule: format!("{:?} args.{arg}", rule.pattern.as_str()),
                            reason: format!(
                                "argument {k:?} of {}/{name} differs from the constrained {arg:?} only in letter case",
                                up.name
                            ),
                        };
                    }
                }
            }
            let Some(value) = value else {
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

/// A prompt or a resource, as deny rules name them: `"<upstream>/prompt:<name>"`,
/// `"<upstream>/resource:<canonical uri>"` (templates are matched as resources).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    Prompt,
    Resource,
    ResourceTemplate,
}

impl ItemKind {
    fn word(self) -> &'static str {
        match self {
            ItemKind::Prompt => "prompt",
            ItemKind::Resource => "resource",
            ItemKind::ResourceTemplate => "resource template",
        }
    }
}

/// Whether a prompt or resource is hidden from `agent`, and the rule (or the reason) that
/// hides it. Prompts and resources of an upstream the agent may use are visible unless a `deny`
/// glob matches; a resource is matched in its canonical form ([`crate::mcp::uri`]), and a URI
/// that has none is hidden.
pub fn item_denied(
    policy: &Policy,
    agent: usize,
    upstream: usize,
    kind: ItemKind,
    item: &str,
) -> Option<String> {
    let up = policy.upstreams().get(upstream)?;
    if !policy.may_use_upstream(agent, upstream) {
        return Some("unknown upstream".into());
    }
    let a = &policy.agents[agent];
    // "<kind>:<item>" is matched as the tool part; built once.
    let qualified = match kind {
        ItemKind::Prompt => format!("prompt:{item}"),
        ItemKind::Resource | ItemKind::ResourceTemplate => {
            let mode = if kind == ItemKind::Resource {
                uri::Mode::Uri
            } else {
                uri::Mode::Template
            };
            match uri::canonical(item, mode) {
                Ok(c) => format!("resource:{c}"),
                Err(e) => return Some(format!("the URI {}", e.message())),
            }
        }
    };
    a.deny
        .iter()
        .find(|g| g.matches_qualified(&up.name, &qualified))
        .map(|g| format!("rule {:?}", g.as_str()))
}

/// Authorizes the use of a prompt or resource: allowed unless [`item_denied`] hides it.
pub fn authorize_item(
    policy: &Policy,
    agent: usize,
    upstream: usize,
    kind: ItemKind,
    item: &str,
) -> Decision {
    match item_denied(policy, agent, upstream, kind, item) {
        Some(why) => Decision::Deny {
            reason: format!("{} {item:?} is denied: {why}", kind.word()),
            rule: match why.strip_prefix("rule ") {
                Some(rule) => format!("deny {rule}"),
                None => format!("{} {why}", kind.word()),
            },
        },
        None => Decision::Allow,
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
            include_str!("../../examples/policy.toml"),
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
        // A constrained argument in another letter case, alone, is not left unchecked.
        let d = decide(
            &p,
            "triage-bot",
            FILES,
            "read_file",
            r#"{"PATH":"/etc/passwd"}"#,
        );
        assert!(
            matches!(&d, Decision::Deny { reason, .. } if reason.contains("letter case")),
            "{d:?}"
        );
        assert!(!decide(&p, "nightly-report", FILES, "stat", r#"{"DEPTH":9}"#).is_allowed());
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
        assert_eq!(item_denied(&p, a, 0, ItemKind::Prompt, "summarize"), None);
        assert_eq!(
            item_denied(&p, a, 0, ItemKind::Prompt, "admin_reset").as_deref(),
            Some("rule \"files/prompt:admin_*\"")
        );
        assert_eq!(
            item_denied(&p, a, 0, ItemKind::Resource, "file:///srv/x"),
            None
        );
        assert!(item_denied(&p, a, 0, ItemKind::Resource, "file:///etc/passwd").is_some());

        let parse = |body: &str| {
            let mut parser = crate::mcp::envelope::EnvelopeParser::new();
            let env = parser.parse(body.as_bytes()).unwrap();
            let m = *env.single().unwrap();
            authorize_message(&p, a, 0, &m, env.arguments(&m), env.notifications(&m))
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
        // Every spelling of a denied resource is the same resource.
        for uri in [
            "FILE:///etc/secret",
            "File:///etc/./secret",
            "file:///srv/../etc/secret",
            "file://localhost/etc/secret",
            "file:/etc/secret",
            "file:////etc/secret",
            "file:///%65tc/secret",
        ] {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{{"uri":"{uri}"}}}}"#
            );
            assert!(!parse(&body).is_allowed(), "{uri}");
        }
        // What has no canonical form is refused, never guessed.
        for uri in [
            " file:///etc/secret",
            "file:///etc\\\\secret",
            "file:///srv/%2Fetc",
        ] {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{{"uri":"{uri}"}}}}"#
            );
            assert!(!parse(&body).is_allowed(), "{uri}");
        }
        // completion/complete asks about a prompt or a resource template: the same rules.
        assert!(!parse(r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"admin_reset"},"argument":{"name":"a","value":""}}}"#).is_allowed());
        assert!(parse(r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"summarize"},"argument":{"name":"a","value":""}}}"#).is_allowed());
        assert!(!parse(r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/resource","uri":"FILE:///etc/{name}"},"argument":{"name":"name","value":""}}}"#).is_allowed());
        assert!(parse(r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/resource","uri":"file:///srv/{name}"},"argument":{"name":"name","value":""}}}"#).is_allowed());
        assert!(!parse(r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"argument":{}}}"#).is_allowed());
        // Methods of no MCP revision are refused; known plumbing passes.
        assert!(!parse(r#"{"jsonrpc":"2.0","id":1,"method":"admin/exec"}"#).is_allowed());
        assert!(!parse(r#"{"jsonrpc":"2.0","method":"notifications/anything"}"#).is_allowed());
        assert!(parse(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).is_allowed());
        assert!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"taskId":"t"}}"#)
                .is_allowed()
        );
        assert!(parse(r#"{"jsonrpc":"2.0","id":"sg:1","result":{}}"#).is_allowed());
        // 2026-07-28 subscriptions name resources too.
        assert!(!parse(r#"{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen","params":{"notifications":{"toolsListChanged":true,"resourceSubscriptions":["file:///srv/a","FILE:///etc/secret"]}}}"#).is_allowed());
        assert!(parse(r#"{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen","params":{"notifications":{"resourceSubscriptions":["file:///srv/a"]}}}"#).is_allowed());
        assert!(!parse(r#"{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen","params":{"notifications":{"resourceSubscriptions":"file:///etc/x"}}}"#).is_allowed());
        // Listed templates are visible by the same canonical form.
        assert!(!visible(
            &p,
            a,
            0,
            ListKind::ResourceTemplates,
            "FILE:///etc/{name}"
        ));
        assert!(visible(
            &p,
            a,
            0,
            ListKind::ResourceTemplates,
            "file:///srv/{name}"
        ));
        assert!(!visible(
            &p,
            a,
            0,
            ListKind::Resources,
            "file:///srv/..//etc/x"
        ));
        assert!(!visible(&p, a, 0, ListKind::Resources, "file:///srv/a b\t"));
    }

    #[test]
    fn resource_rules_must_be_written_canonically() {
        let env = HashMap::new();
        let text = |deny: &str| {
            format!(
                "[[upstream]]\nname = \"files\"\nurl = \"http://127.0.0.1:9/mcp\"\n[[agent]]\nid = \"a\"\nallow = [\"files/*\"]\ndeny = [\"{deny}\"]\n"
            )
        };
        let load = |deny: &str| Policy::parse(Path::new("p.toml"), &text(deny), &[], &env);
        assert!(load("files/resource:file:///etc/*").is_ok());
        assert!(load("files/resource:*secret*").is_ok());
        let e = load("files/resource:FILE:///etc/*").unwrap_err();
        assert!(e.message.contains("files/resource:file:///etc/*"), "{e}");
        assert!(load("files/resource:file:///srv/../etc/*").is_err());
    }
}
