//! What scopegate serves about itself, without a key: `/healthz`, `/metrics` (Prometheus text,
//! every worker's counters summed at scrape time) and the RFC 9728 protected resource metadata
//! MCP clients read to find the authorization server.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::route::Route;
use crate::audit::writer::Channel;
use crate::config::Config;
use crate::http::head::Head;
use crate::mcp::jsonrpc;
use crate::metrics::WorkerStats;
use crate::ratelimit::Fleet;
use crate::reply::Reply;

/// The answer for an administrative route; `None` for the MCP routes.
pub fn answer(
    route: Route,
    config: &Config,
    head: &Head,
    all_stats: &[Arc<WorkerStats>],
    all_audit: &[Arc<Channel>],
    fleet: Option<&Arc<Fleet>>,
) -> Option<Reply> {
    match route {
        Route::Health => Some(Reply::other(200, "text/plain", b"ok\n".to_vec())),
        Route::AdminPage => Some(super::live::page()),
        Route::AdminStats if super::live::authorized(config, head) => {
            Some(super::live::stats(config, all_stats, all_audit))
        }
        Route::AdminStats => Some(super::live::unauthorized()),
        Route::Metrics if config.metrics_need_admin && !super::live::authorized(config, head) => {
            Some(super::live::unauthorized())
        }
        Route::Metrics => Some(Reply::other(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics_text(config, all_stats, all_audit, fleet).into_bytes(),
        )),
        Route::ResourceMetadata => Some(resource_metadata(config, head)),
        Route::Mcp { .. } | Route::Aggregate => None,
    }
}

/// `/metrics`: every worker's counters, summed now.
pub fn metrics_text(
    config: &Config,
    all_stats: &[Arc<WorkerStats>],
    all_audit: &[Arc<Channel>],
    fleet: Option<&Arc<Fleet>>,
) -> String {
    let workers: Vec<&crate::metrics::WorkerMetrics> =
        all_stats.iter().map(|s| &s.metrics).collect();
    let names: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
    let audit = (!all_audit.is_empty()).then(|| crate::metrics::AuditGauges {
        written: all_audit
            .iter()
            .map(|c| c.written.load(Ordering::Relaxed))
            .sum(),
        pending_bytes: all_audit.iter().map(|c| c.ring.used() as u64).sum(),
        write_errors: all_audit
            .iter()
            .map(|c| c.write_errors.load(Ordering::Relaxed))
            .sum(),
        failing: all_audit.iter().any(|c| c.failing.load(Ordering::Relaxed)),
    });
    let redis = fleet.map(|f| crate::metrics::RedisGauges {
        up: f.client.is_up(),
        replicas: f.replicas(),
        commands: f.client.commands.load(Ordering::Relaxed),
        leased: f.leased(),
        fallbacks: f.fallbacks(),
    });
    crate::metrics::render(&crate::metrics::Scrape {
        redis,
        workers: &workers,
        upstream_names: &names,
        heap_allocations: all_stats
            .iter()
            .map(|s| s.allocations.load(Ordering::Relaxed))
            .sum(),
        open_connections: all_stats
            .iter()
            .map(|s| s.open_connections.load(Ordering::Relaxed) as u64)
            .sum(),
        audit,
        stdio: config
            .upstreams
            .iter()
            .filter_map(|u| match &u.transport {
                crate::upstream::Transport::Stdio(s) => Some(crate::metrics::StdioGauges {
                    upstream: u.name.clone(),
                    processes: s.hub.processes(),
                    sessions: s.hub.sessions(),
                }),
                _ => None,
            })
            .collect(),
    })
}

/// The URL of this gateway's protected resource metadata (RFC 9728).
pub fn metadata_url(config: &Config, head: &Head) -> String {
    format!(
        "{}/.well-known/oauth-protected-resource",
        public_base(config, head)
    )
}

fn public_base(config: &Config, head: &Head) -> String {
    match &config.public_url {
        Some(url) => url.clone(),
        None => {
            let host = head.get("host").unwrap_or(b"localhost");
            let scheme = if config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", String::from_utf8_lossy(host))
        }
    }
}

/// `GET /.well-known/oauth-protected-resource`: RFC 9728 metadata for MCP's authorization.
fn resource_metadata(config: &Config, head: &Head) -> Reply {
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(b"{\"resource\":");
    jsonrpc::write_json_string(&format!("{}/mcp", public_base(config, head)), &mut body);
    body.extend_from_slice(b",\"authorization_servers\":[");
    for (i, server) in config.auth_servers.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        jsonrpc::write_json_string(server, &mut body);
    }
    body.extend_from_slice(
        b"],\"bearer_methods_supported\":[\"header\"],\"resource_name\":\"scopegate\"}",
    );
    Reply::other(200, "application/json", body).header("Cache-Control: max-age=300")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_names_this_gateway_and_its_authorization_servers() {
        let config = Config::from_pairs(&[
            ("SCOPEGATE_INSECURE_OPEN", "1"),
            ("SCOPEGATE_UPSTREAMS", "a=http://127.0.0.1:9/mcp"),
            ("SCOPEGATE_AUTH_SERVERS", "https://auth.example"),
        ])
        .unwrap();
        let raw = "GET /.well-known/oauth-protected-resource HTTP/1.1\r\nHost: gw:8080\r\n\r\n";
        let head = crate::http::head::request_head(raw);
        let reply = answer(Route::ResourceMetadata, &config, &head, &[], &[], None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&reply.body_bytes(None)).unwrap();
        assert_eq!(v["resource"], "http://gw:8080/mcp");
        assert_eq!(v["authorization_servers"][0], "https://auth.example");
        assert_eq!(
            metadata_url(&config, &head),
            "http://gw:8080/.well-known/oauth-protected-resource"
        );
        assert!(answer(Route::Aggregate, &config, &head, &[], &[], None).is_none());
        let metrics = answer(Route::Metrics, &config, &head, &[], &[], None).unwrap();
        assert!(
            String::from_utf8(metrics.body_bytes(None))
                .unwrap()
                .contains("scopegate_")
        );
    }
}
