//! The mock MCP upstream as a standalone process, for the demo and the load scripts.
//!
//! usage: sg-mock [--listen ADDR] [--sse] [--no-sessions] [--no-get] [--pad BYTES] [--threads N] [--page-size N] [--delay-ms N]

use scopegate_loadtest::mock::{MockConfig, MockServer};

fn main() {
    let mut config = MockConfig {
        record: false,
        ..MockConfig::default()
    };
    let mut listen = "127.0.0.1:0".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("sg-mock: {name} needs a value");
                std::process::exit(2)
            })
        };
        match arg.as_str() {
            "--listen" => listen = value("--listen"),
            "--sse" => config.sse = true,
            "--no-sessions" => config.sessions = false,
            "--no-get" => config.get_stream = false,
            "--pad" => config.pad = parse(&value("--pad"), "--pad"),
            "--threads" => config.threads = parse(&value("--threads"), "--threads"),
            "--page-size" => config.page_size = parse(&value("--page-size"), "--page-size"),
            "--delay-ms" => {
                config.delay = std::time::Duration::from_millis(parse(
                    &value("--delay-ms"),
                    "--delay-ms",
                ) as u64)
            }
            other => {
                eprintln!("sg-mock: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let addr = listen.parse().unwrap_or_else(|_| {
        eprintln!("sg-mock: --listen wants host:port, got {listen:?}");
        std::process::exit(2)
    });
    let server = MockServer::start_on(addr, config);
    println!("sg-mock listening on {}", server.addr);
    loop {
        std::thread::park();
    }
}

fn parse(v: &str, name: &str) -> usize {
    v.parse().unwrap_or_else(|_| {
        eprintln!("sg-mock: {name} wants a number, got {v:?}");
        std::process::exit(2)
    })
}
