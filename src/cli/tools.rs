//! `scopegate tools pin|diff|approve|scan`: the operator's side of tool integrity. Each
//! command reads the gateway's own configuration (the `SCOPEGATE_*` variables, the policy,
//! `SCOPEGATE_PINS`), asks the upstreams for their tools and prompts as scopegate does
//! (initialize, then every page of `tools/list` and `prompts/list`, with the injected
//! credentials), and compares what they say with the pin file.
//!
//! Exit status: 0 done (nothing to report), 1 something to report (a drift, a finding) or a
//! failure, 2 a usage error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use crate::config::Config;
use crate::integrity::pins::Pins;
use crate::integrity::scan::{self, Finding};
use crate::integrity::{self, Kind, digest, digest_text};
use crate::policy::Policy;
use crate::policy::load::ProcessEnv;
use crate::upstream::Pool;
use crate::upstream::client::{UpRequest, Upstreams, exchange, walk_list};

const USAGE: &str = "usage: scopegate tools pin [UPSTREAM...]
       scopegate tools diff [UPSTREAM...]
       scopegate tools approve UPSTREAM/TOOL [UPSTREAM/prompt:NAME...]
       scopegate tools scan [UPSTREAM...]";

/// One upstream's definitions as it lists them now.
struct Listed {
    upstream: String,
    items: Vec<(Kind, String, Value)>,
}

/// `scopegate tools ...`
pub fn tools(args: &[String]) -> i32 {
    let Some((verb, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return 2;
    };
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("scopegate: configuration error: {e}");
            return 2;
        }
    };
    let Some(policy_path) = config.policy.clone() else {
        eprintln!("scopegate tools: set SCOPEGATE_POLICY (the upstreams and their overrides)");
        return 2;
    };
    let policy = match Policy::load(&policy_path, &config.upstreams, &ProcessEnv) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("scopegate: policy error: {e}");
            return 1;
        }
    };
    let needs_pins = verb != "scan";
    let pins_path = config.pins.clone();
    if needs_pins && pins_path.is_none() {
        eprintln!("scopegate tools {verb}: set SCOPEGATE_PINS (the pin file to read and write)");
        return 2;
    }
    let done = match verb.as_str() {
        "pin" => pin(
            &config,
            &policy,
            rest,
            pins_path.as_deref().unwrap_or(Path::new("")),
        ),
        "diff" => diff(
            &config,
            &policy,
            rest,
            pins_path.as_deref().unwrap_or(Path::new("")),
        ),
        "approve" => approve(&config, &policy, rest, pins_path.unwrap_or_default()),
        "scan" => scan_all(&config, &policy, rest),
        _ => {
            eprintln!("{USAGE}");
            Ok(2)
        }
    };
    done.unwrap_or_else(fail)
}

/// The upstreams named (all when none is), or the first unknown name.
fn chosen(policy: &Policy, names: &[String]) -> Result<Vec<usize>, String> {
    let ups = policy.upstreams();
    if names.is_empty() {
        return Ok((0..ups.len()).collect());
    }
    names
        .iter()
        .map(|n| {
            ups.iter()
                .position(|u| &u.name == n)
                .ok_or_else(|| format!("no upstream {n:?} in the policy or SCOPEGATE_UPSTREAMS"))
        })
        .collect()
}

/// Lists the chosen upstreams; the first failure ends the command.
fn list(config: &Config, policy: &Policy, chosen: &[usize]) -> Result<Vec<Listed>, String> {
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let result = rt.block_on(async {
        let pool = Pool::new(config.egress.clone());
        let ups = Upstreams {
            list: policy.upstreams(),
            pool: &pool,
            timeout: config.upstream_timeout,
            max_message: config.max_upstream_message,
        };
        let mut out = Vec::new();
        for &i in chosen {
            out.push(list_one(ups, i, config).await?);
        }
        Ok(out)
    });
    drop(rt);
    crate::timer::end_of_runtime();
    crate::upstream::stdio::shutdown();
    result
}

async fn list_one(ups: Upstreams<'_>, i: usize, config: &Config) -> Result<Listed, String> {
    let name = ups.list[i].name.clone();
    let deadline = Instant::now() + config.upstream_timeout;
    let peer: SocketAddr = ([127, 0, 0, 1], 0).into();
    let init = UpRequest {
        method: "POST",
        body: br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"scopegate-tools","version":"1"}}}"#,
        session: None,
        protocol_version: None,
        peer,
        agent_id: Some("scopegate-tools"),
        routing: Vec::new(),
    };
    let (resp, answer) = exchange(ups, i, &init, deadline)
        .await
        .map_err(|e| format!("upstream {name:?}: initialize failed: {}", e.message()))?;
    let session = resp.header("mcp-session-id").map(<[u8]>::to_vec);
    resp.finish(ups);
    let answer: Value = serde_json::from_slice(&answer).unwrap_or_default();
    let Some(caps) = answer.pointer("/result/capabilities") else {
        return Err(format!(
            "upstream {name:?}: initialize was not answered: {answer}"
        ));
    };
    let caps = caps.clone();
    // Later requests carry the revision the upstream agreed to.
    let version = answer
        .pointer("/result/protocolVersion")
        .and_then(Value::as_str)
        .unwrap_or("2025-03-26")
        .as_bytes()
        .to_vec();
    let base = UpRequest {
        method: "POST",
        body: b"",
        session: session.as_deref(),
        protocol_version: Some(&version),
        peer,
        agent_id: Some("scopegate-tools"),
        routing: Vec::new(),
    };
    let initialized = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let note = UpRequest {
        body: initialized,
        routing: Vec::new(),
        ..base
    };
    if let Ok((resp, _)) = exchange(ups, i, &note, deadline).await {
        resp.finish(ups);
    }
    let mut items = Vec::new();
    for kind in [Kind::Tool, Kind::Prompt] {
        let lk = kind.list();
        // The capability is named like the list's field (`tools`, `prompts`).
        if caps.get(lk.field()).is_none() {
            continue;
        }
        let base = UpRequest {
            routing: Vec::new(),
            ..base
        };
        let mut each = |item: &mut Value| {
            if let Some(n) = item.get("name").and_then(Value::as_str) {
                items.push((kind, n.to_owned(), integrity::definition(item)));
            }
        };
        walk_list(
            ups,
            i,
            &base,
            lk.method(),
            lk.field(),
            None,
            deadline,
            &mut each,
        )
        .await
        .map_err(|e| format!("upstream {name:?}: {} failed: {}", lk.method(), e.message()))?;
    }
    if let Some(s) = &session {
        let end = UpRequest {
            method: "DELETE",
            body: b"",
            session: Some(s),
            protocol_version: Some(&version),
            peer,
            agent_id: Some("scopegate-tools"),
            routing: Vec::new(),
        };
        if let Ok(resp) = crate::upstream::client::send(ups, i, &end, deadline).await {
            drop(resp);
        }
    }
    Ok(Listed {
        upstream: name,
        items,
    })
}

fn load_pins(path: &Path, missing_ok: bool) -> Result<Pins, String> {
    if missing_ok && !path.exists() {
        return Ok(Pins::default());
    }
    Pins::load(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes the pin file, naming it in the error.
fn write_pins(pins: &Pins, path: &Path) -> Result<(), String> {
    pins.write(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn fail(e: String) -> i32 {
    eprintln!("scopegate tools: {e}");
    1
}

fn pin(config: &Config, policy: &Policy, names: &[String], path: &Path) -> Result<i32, String> {
    let chosen = chosen(policy, names)?;
    let mut pins = load_pins(path, true)?;
    let listed = list(config, policy, &chosen)?;
    let max = policy.integrity.settings().max_description;
    for l in &listed {
        // What changed since the last pin, and what the scan finds, is said before it is
        // pinned: `pin` is no way to approve a drift unseen.
        for (kind, name, def) in &l.items {
            let what = format!(
                "{} {}/{}",
                kind.as_str(),
                l.upstream,
                scan::visible(name, 128)
            );
            if let Some(pin) = pins.get(&l.upstream, *kind, name)
                && pin.digest != digest(def)
            {
                println!(
                    "re-pinned {what}: it changed since pinned (see it first with `scopegate tools diff`)"
                );
            }
            for f in scan::scan(def, max) {
                println!(
                    "warning: {what}: {} at {}: {}",
                    f.check,
                    scan::visible(&f.at, 128),
                    scan::visible(&f.detail, 200)
                );
            }
        }
        pins.remove_upstream(&l.upstream);
        let mut counts = [0usize; 2];
        for (kind, name, def) in &l.items {
            pins.set(&l.upstream, *kind, name, def);
            counts[*kind as usize] += 1;
        }
        println!(
            "pinned upstream {:?}: {} tool(s), {} prompt(s)",
            l.upstream, counts[0], counts[1]
        );
    }
    write_pins(&pins, path)?;
    println!(
        "wrote {} ({} pin(s)); a running scopegate applies it on SIGHUP",
        path.display(),
        pins.len()
    );
    Ok(0)
}

/// Shows a value for a reader: JSON, with hidden characters written as escapes.
fn shown(v: Option<&Value>) -> String {
    match v {
        None => "(absent)".into(),
        Some(v) => {
            let text = serde_json::to_string(v).unwrap_or_default();
            text.chars()
                .map(|c| match scan::hidden(c) {
                    Some(_) => format!("\\u{{{:X}}}", c as u32),
                    None => c.to_string(),
                })
                .collect()
        }
    }
}

fn diff(config: &Config, policy: &Policy, names: &[String], path: &Path) -> Result<i32, String> {
    let chosen = chosen(policy, names)?;
    let pins = load_pins(path, false)?;
    let listed = list(config, policy, &chosen)?;
    let mut differences = 0;
    for l in &listed {
        for (kind, name, def) in &l.items {
            let what = format!(
                "{} {}/{}",
                kind.as_str(),
                l.upstream,
                scan::visible(name, 128)
            );
            let d = digest(def);
            match pins.get(&l.upstream, *kind, name) {
                None => {
                    differences += 1;
                    println!("+ {what}: not pinned ({})", digest_text(&d));
                }
                Some(pin) if pin.digest != d => {
                    differences += 1;
                    println!(
                        "~ {what}: changed (pinned {}, now {})",
                        digest_text(&pin.digest),
                        digest_text(&d)
                    );
                    let Some(old) = &pin.definition else {
                        println!("    (the pin has no definition to compare with)");
                        continue;
                    };
                    let mut fields: Vec<&String> = old
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, _)| k)
                        .collect();
                    fields.extend(def.as_object().into_iter().flatten().map(|(k, _)| k));
                    fields.sort();
                    fields.dedup();
                    for field in fields {
                        let (a, b) = (old.get(field), def.get(field));
                        if a != b {
                            println!(
                                "    {}:\n      - {}\n      + {}",
                                scan::visible(field, 64),
                                shown(a),
                                shown(b)
                            );
                        }
                    }
                }
                Some(_) => {}
            }
        }
        for ((up, kind, name), _) in pins.iter() {
            let offered = l.items.iter().any(|(k, n, _)| k == kind && n == name);
            if up == &l.upstream && !offered {
                differences += 1;
                let name = scan::visible(name, 128);
                println!("- {} {up}/{name}: pinned, no longer offered", kind.as_str());
            }
        }
    }
    if differences == 0 {
        println!("no differences: every definition matches its pin");
        Ok(0)
    } else {
        println!(
            "{differences} difference(s); `scopegate tools approve UPSTREAM/TOOL` re-pins one after review"
        );
        Ok(1)
    }
}

fn approve(
    config: &Config,
    policy: &Policy,
    names: &[String],
    path: PathBuf,
) -> Result<i32, String> {
    if names.is_empty() {
        eprintln!("{USAGE}");
        return Ok(2);
    }
    let mut wanted = Vec::new();
    for n in names {
        let Some((up, item)) = n.split_once('/') else {
            eprintln!("scopegate tools approve: {n:?} is not UPSTREAM/TOOL");
            return Ok(2);
        };
        let (kind, item) = match item.strip_prefix("prompt:") {
            Some(p) => (Kind::Prompt, p),
            None => (Kind::Tool, item),
        };
        wanted.push((up.to_owned(), kind, item.to_owned()));
    }
    let mut unique: Vec<String> = wanted.iter().map(|(u, _, _)| u.clone()).collect();
    unique.sort();
    unique.dedup();
    let chosen = chosen(policy, &unique)?;
    let mut pins = load_pins(&path, true)?;
    let listed = list(config, policy, &chosen)?;
    for (up, kind, name) in &wanted {
        let found = listed
            .iter()
            .filter(|l| &l.upstream == up)
            .flat_map(|l| &l.items)
            .find(|(k, n, _)| k == kind && n == name);
        let Some((_, _, def)) = found else {
            return Err(format!(
                "upstream {up:?} does not offer {} {name:?}: nothing approved",
                kind.as_str()
            ));
        };
        pins.set(up, *kind, name, def);
        println!(
            "approved {} {up}/{name}: {}",
            kind.as_str(),
            digest_text(&digest(def))
        );
    }
    write_pins(&pins, &path)?;
    println!(
        "wrote {}; a running scopegate applies it on SIGHUP",
        path.display()
    );
    Ok(0)
}

fn scan_all(config: &Config, policy: &Policy, names: &[String]) -> Result<i32, String> {
    let chosen = chosen(policy, names)?;
    let listed = list(config, policy, &chosen)?;
    let max = policy.integrity.settings().max_description;
    let mut total = 0;
    for (l, &i) in listed.iter().zip(&chosen) {
        for (kind, name, def) in &l.items {
            // What agents read: the operator's description when there is one.
            let mut served = def.clone();
            if *kind == Kind::Tool
                && let Some(text) = policy.integrity.override_for(i, name)
            {
                served["description"] = Value::String(text.to_owned());
            }
            let findings: Vec<Finding> = scan::scan(&served, max);
            for f in &findings {
                println!(
                    "{} {}/{}: {} at {}: {}",
                    kind.as_str(),
                    l.upstream,
                    scan::visible(name, 128),
                    f.check,
                    scan::visible(&f.at, 128),
                    scan::visible(&f.detail, 200)
                );
            }
            total += findings.len();
        }
    }
    let items: usize = listed.iter().map(|l| l.items.len()).sum();
    if total == 0 {
        println!("scanned {items} definition(s): nothing found");
        Ok(0)
    } else {
        println!("scanned {items} definition(s): {total} finding(s)");
        Ok(1)
    }
}
