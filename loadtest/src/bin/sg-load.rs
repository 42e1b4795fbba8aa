//! sg-load: scopegate's load generator. Virtual MCP agents, each on its own keep-alive
//! connection with its own key and session, send a weighted mix of messages.
//!
//! usage: sg-load --url http(s)://127.0.0.1:8080/mcp [options]
//!   --ca FILE           for https://: the CA bundle (PEM) to verify the target with
//!   --connections N     virtual agents, one connection each (default 32)
//!   --threads N         generator threads, one runtime each (default 1)
//!   --duration S        measured seconds (default 10), after --warmup S (default 1)
//!   --rate R            open loop at R requests/s in total (default: closed loop)
//!   --keys K1,K2,...    agent keys, round robin over connections (--keys-file: one per line)
//!   --mix call=90,list=5,notify=5,refused=0,limited=0
//!   --tool NAME --refused-tool NAME --limited-tool NAME --args JSON
//!   --no-session        skip initialize (a server without sessions)
//!   --timeout-ms N      per request (default 10000)
//!   --json              one JSON object on stdout instead of text
//!   --idle N --hold S   hold N idle keep-alive connections (one GET --path each) for S seconds
//!   --idle-after-call N --hold S  hold N idle keep-alive connections, each after an
//!                       initialize and one tools/call (the proxy remembers key and session)
//!   --streams N --hold S  hold N open MCP GET event streams for S seconds
use std::time::Duration;

use scopegate_loadtest::load::{self, LoadConfig};

fn main() {
    let mut url = String::from("http://127.0.0.1:8080/mcp");
    let mut connections = 32usize;
    let mut threads = 1usize;
    let mut duration = 10.0f64;
    let mut warmup = 1.0f64;
    let mut rate: Option<f64> = None;
    let mut keys: Vec<String> = Vec::new();
    let mut mix = String::from("call=100");
    let mut tool = String::from("echo");
    let mut refused_tool = String::from("delete_everything");
    let mut limited_tool = String::from("limited");
    let mut args = String::from(r#"{"repo":"acme/web","title":"load","labels":["a"]}"#);
    let mut sessions = true;
    let mut timeout_ms = 10_000u64;
    let mut json = false;
    let mut idle: Option<usize> = None;
    let mut idle_after_call: Option<usize> = None;
    let mut streams: Option<usize> = None;
    let mut hold = 5.0f64;
    let mut idle_path = String::from("/healthz");
    let mut ca: Option<String> = None;

    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next().unwrap_or_else(|| {
                eprintln!("sg-load: {name} needs a value");
                std::process::exit(2)
            })
        };
        match arg.as_str() {
            "--url" => url = value("--url"),
            "--connections" => connections = num(&value("--connections"), "--connections"),
            "--threads" => threads = num(&value("--threads"), "--threads"),
            "--duration" => duration = num(&value("--duration"), "--duration"),
            "--warmup" => warmup = num(&value("--warmup"), "--warmup"),
            "--rate" => rate = Some(num(&value("--rate"), "--rate")),
            "--keys" => keys = value("--keys").split(',').map(str::to_owned).collect(),
            "--keys-file" => {
                let path = value("--keys-file");
                let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                    eprintln!("sg-load: --keys-file {path}: {e}");
                    std::process::exit(2)
                });
                keys = text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| l.trim().to_owned())
                    .collect();
            }
            "--mix" => mix = value("--mix"),
            "--tool" => tool = value("--tool"),
            "--refused-tool" => refused_tool = value("--refused-tool"),
            "--limited-tool" => limited_tool = value("--limited-tool"),
            "--args" => args = value("--args"),
            "--no-session" => sessions = false,
            "--timeout-ms" => timeout_ms = num(&value("--timeout-ms"), "--timeout-ms"),
            "--json" => json = true,
            "--idle" => idle = Some(num(&value("--idle"), "--idle")),
            "--idle-after-call" => {
                idle_after_call = Some(num(&value("--idle-after-call"), "--idle-after-call"))
            }
            "--streams" => streams = Some(num(&value("--streams"), "--streams")),
            "--hold" => hold = num(&value("--hold"), "--hold"),
            "--path" => idle_path = value("--path"),
            "--ca" => ca = Some(value("--ca")),
            "-h" | "--help" => {
                println!("see the top of loadtest/src/bin/sg-load.rs, or README.md (Benchmarks)");
                return;
            }
            other => {
                eprintln!("sg-load: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let (addr, host, path) = LoadConfig::parse_url(&url).unwrap_or_else(|e| {
        eprintln!("sg-load: --url: {e}");
        std::process::exit(2)
    });
    if !serde_json::from_str::<serde_json::Value>(&args).is_ok_and(|v| v.is_object()) {
        eprintln!("sg-load: --args must be a JSON object");
        std::process::exit(2);
    }
    let mix = LoadConfig::parse_mix(&mix).unwrap_or_else(|e| {
        eprintln!("sg-load: --mix: {e}");
        std::process::exit(2)
    });
    let config = LoadConfig {
        addr,
        host,
        path,
        keys,
        connections: connections.max(1),
        threads,
        duration: Duration::from_secs_f64(duration),
        warmup: Duration::from_secs_f64(warmup),
        rate,
        mix,
        tool,
        refused_tool,
        limited_tool,
        args,
        sessions,
        timeout: Duration::from_millis(timeout_ms),
        tls: None,
    };
    let mut config = config;
    if url.starts_with("https://") {
        let host = config
            .host
            .rsplit_once(':')
            .map_or(config.host.as_str(), |(h, _)| h);
        let ca = ca.unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".to_owned());
        config.tls = Some(
            load::TlsTarget::new(std::path::Path::new(&ca), host.trim_matches(['[', ']']))
                .unwrap_or_else(|e| {
                    eprintln!("sg-load: {e}");
                    std::process::exit(2)
                }),
        );
    }
    if let Some(n) = idle {
        let held = load::hold_idle(
            config.addr,
            &config.host,
            &idle_path,
            n,
            Duration::from_secs_f64(hold),
        );
        std::process::exit(if held == n { 0 } else { 1 });
    }
    if let Some(n) = idle_after_call {
        let held = load::hold_idle_after_call(&config, n, Duration::from_secs_f64(hold));
        std::process::exit(if held == n { 0 } else { 1 });
    }
    if let Some(n) = streams {
        let held = load::hold_streams(&config, n, Duration::from_secs_f64(hold));
        std::process::exit(if held == n { 0 } else { 1 });
    }
    let report = load::run(&config);
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
}

fn num<T: std::str::FromStr>(v: &str, name: &str) -> T {
    v.parse().unwrap_or_else(|_| {
        eprintln!("sg-load: {name} wants a number, got {v:?}");
        std::process::exit(2)
    })
}
