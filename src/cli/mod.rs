//! The commands: `hash-key`, `validate`, `check`, `audit verify`, and `tools` (tool
//! integrity, [`tools`]). Each returns the process exit status:
//! 0 success (or allow), 1 a problem found (or deny), 2 a usage error.

mod tools;

use std::path::Path;

pub use tools::tools;

use crate::config;
use crate::policy::decide::{Decision, authorize_call};
use crate::policy::load::ProcessEnv;
use crate::policy::{Policy, hash_key as sha256_hex};

/// `scopegate hash-key [KEY]`
pub fn hash_key(args: &[String]) -> i32 {
    match args {
        [key] => {
            println!("{}", sha256_hex(key));
            0
        }
        [] => {
            let mut bytes = [0u8; 32];
            if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err()
            {
                eprintln!("scopegate: no system randomness available");
                return 1;
            }
            let key = format!("sg_{}", crate::token::base64url(&bytes));
            println!("key:        {key}");
            println!("key_sha256: {}", sha256_hex(&key));
            0
        }
        _ => {
            eprintln!("usage: scopegate hash-key [KEY]");
            2
        }
    }
}

fn upstreams_from_env() -> Result<Vec<crate::upstream::Upstream>, String> {
    match std::env::var("SCOPEGATE_UPSTREAMS") {
        Ok(v) if !v.trim().is_empty() => config::parse_upstreams(&v).map_err(|e| e.to_string()),
        _ => Ok(Vec::new()),
    }
}

fn load(path: &str) -> Result<Policy, String> {
    let upstreams = upstreams_from_env()?;
    Policy::load(Path::new(path), &upstreams, &ProcessEnv).map_err(|e| e.to_string())
}

/// The environment for `check`: a `${VAR}` that is not set reads as a placeholder, since a
/// rule is checked without the secrets it will be served with (the injected headers decide
/// nothing).
struct SecretsNotNeeded;

impl crate::policy::load::Env for SecretsNotNeeded {
    fn var(&self, name: &str) -> Option<String> {
        Some(std::env::var(name).unwrap_or_else(|_| format!("<{name} not set>")))
    }
}

/// `scopegate validate FILE`
pub fn validate(args: &[String]) -> i32 {
    let [path] = args else {
        eprintln!("usage: scopegate validate FILE");
        return 2;
    };
    // The listener's certificate and key too, when the environment names them.
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let (Some(cert), Some(key)) = (var("SCOPEGATE_TLS_CERT"), var("SCOPEGATE_TLS_KEY")) {
        let files = crate::tls::server::ListenerFiles {
            cert: cert.into(),
            key: key.into(),
            client_ca: var("SCOPEGATE_TLS_CLIENT_CA").map(Into::into),
        };
        if let Err(e) = crate::tls::server::ListenerTls::load(files) {
            eprintln!("{e}");
            return 1;
        }
    }
    match load(path) {
        Ok(p) => {
            let egress = var("SCOPEGATE_EGRESS_PROXY").and_then(|url| {
                let no_proxy = var("SCOPEGATE_EGRESS_NO_PROXY");
                let no_proxy = no_proxy.as_ref().and_then(|v| v.to_str());
                crate::upstream::egress::Egress::parse(url.to_str()?, no_proxy).ok()
            });
            let names = p
                .upstreams()
                .iter()
                .filter_map(|u| Some((u.name.as_str(), &*u.transport.endpoint()?.name)));
            let direct = |host: &str| egress.as_ref().is_none_or(|e| !e.applies_to(host));
            if let Err(e) = crate::upstream::resolve::check_resolved(names, direct) {
                eprintln!("{path}: {e}");
                return 1;
            }
            println!(
                "{path}: ok ({} tenant(s), {} upstream(s), {} agent(s))",
                p.tenants.len(),
                p.upstreams().len(),
                p.agents.len()
            );
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// Why agent `a` may not use upstream `u`, in the policy's words.
fn why_unreachable(p: &Policy, a: usize, u: usize) -> String {
    let agent = &p.agents[a];
    let name = &p.upstreams()[u].name;
    let tenant_of = |t: Option<usize>| t.map(|t| p.tenants[t].id.as_str());
    match (p.upstream_rules[u].tenant, agent.tenant) {
        (Some(t), mine) if Some(t) != mine => format!(
            "upstream {name:?} belongs to tenant {:?} and agent {:?} to {}",
            p.tenants[t].id,
            agent.id,
            tenant_of(mine).map_or("no tenant".into(), |m| format!("tenant {m:?}"))
        ),
        _ => format!(
            "upstream {name:?} is not in agent {:?}'s `upstreams` list",
            agent.id
        ),
    }
}

/// `scopegate check --policy FILE --agent ID --tool UPSTREAM/NAME [--args JSON]`
pub fn check(args: &[String]) -> i32 {
    let usage = || {
        eprintln!(
            "usage: scopegate check --policy FILE --agent ID --tool UPSTREAM/NAME [--args JSON]"
        );
        2
    };
    let (mut policy, mut agent, mut tool, mut json) = (None, None, None, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        // `--flag VALUE` or `--flag=VALUE`.
        let (flag, value) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, v.to_owned()),
            _ => match it.next() {
                Some(v) => (arg.as_str(), v.clone()),
                None => return usage(),
            },
        };
        let value = &value;
        match flag {
            "--policy" => policy = Some(value.clone()),
            "--agent" => agent = Some(value.clone()),
            "--tool" => tool = Some(value.clone()),
            "--args" => json = Some(value.clone()),
            _ => return usage(),
        }
    }
    let (Some(policy), Some(agent), Some(tool)) = (policy, agent, tool) else {
        return usage();
    };
    let configured = match upstreams_from_env() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let p = match Policy::load(Path::new(&policy), &configured, &SecretsNotNeeded) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let Some(a) = p.agent_by_id(&agent) else {
        eprintln!("no agent {agent:?} in {policy}");
        return 1;
    };
    let Some((upstream, name)) = tool.split_once('/') else {
        eprintln!("--tool wants UPSTREAM/NAME, got {tool:?}");
        return 2;
    };
    let Some(u) = p.upstreams().iter().position(|x| x.name == upstream) else {
        println!("deny: unknown tool: no upstream {upstream:?}");
        return 1;
    };
    if !p.may_use_upstream(a, u) {
        // The agent is told only "unknown tool" (it learns nothing of upstreams it cannot
        // use); the operator is told why.
        println!("deny: unknown tool: {}", why_unreachable(&p, a, u));
        return 1;
    }
    let mut bytes = json.unwrap_or_else(|| "{}".into()).into_bytes();
    let tape = match simd_json::to_tape(&mut bytes) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("--args is not JSON: {e}");
            return 2;
        }
    };
    match authorize_call(&p, a, u, name, Some(&tape.0)) {
        Decision::Allow => {
            println!("allow");
            0
        }
        Decision::Deny { rule, reason } => {
            println!("deny: {rule}: {reason}");
            1
        }
    }
}

/// `scopegate audit verify DIR`
pub fn audit(args: &[String]) -> i32 {
    let [verb, dir] = args else {
        eprintln!("usage: scopegate audit verify DIR");
        return 2;
    };
    if verb != "verify" {
        eprintln!("usage: scopegate audit verify DIR");
        return 2;
    }
    match crate::audit::verify::verify_dir(Path::new(dir)) {
        Ok(r) => {
            println!(
                "{dir}: ok ({} entries in {} file(s), every chain intact)",
                r.entries, r.files
            );
            0
        }
        Err(e) => {
            println!("{e}");
            1
        }
    }
}
