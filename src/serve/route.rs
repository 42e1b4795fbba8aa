//! Where a request goes (`/mcp`, `/mcp/<upstream>`, `/healthz`, `/metrics`, the resource
//! metadata, path keys), and the DNS-rebinding defence (`Host`, `Origin`). Whether an upstream
//! name exists is not said here: that waits for authentication (see [`super::gate`]).

use crate::config::Config;
use crate::http::head::{Head, Span};
use crate::mcp::{jsonrpc, origin};
use crate::policy::Policy;
use crate::reply::Reply;

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    /// RFC 9728 protected resource metadata.
    ResourceMetadata,
    /// Prometheus metrics.
    Metrics,
    /// An MCP endpoint backed by upstream `index`; `None`: a name no upstream has (answered
    /// only after authentication, and exactly as an upstream the agent may not use).
    Mcp {
        upstream: Option<usize>,
    },
    /// `/mcp` with several upstreams: all of them behind one MCP server.
    Aggregate,
    /// The live view's page (`/admin`; `SCOPEGATE_ADMIN_TOKEN` set).
    AdminPage,
    /// The live view's numbers (`/admin/stats.json`), for the admin token only.
    AdminStats,
}

/// A route, and the key carried in the path (`/key/<key>/mcp...`) when path keys are on.
pub struct Routed {
    pub route: Route,
    pub path_key: Option<Span>,
}

/// Which endpoint. `/mcp/<name>` names an upstream; `/mcp` is the only upstream.
pub fn route(config: &Config, head: &Head) -> Result<Routed, Reply> {
    let target = head.target();
    let mut path = match memchr::memchr(b'?', target) {
        Some(i) => &target[..i],
        None => target,
    };
    let mut path_key = None;
    if config.path_keys
        && let Some(rest) = path.strip_prefix(b"/key/")
    {
        let end = memchr::memchr(b'/', rest).unwrap_or(rest.len());
        if end == 0 {
            return Err(Reply::error(
                404,
                jsonrpc::GATEWAY_REFUSED,
                "empty path key",
            ));
        }
        path_key = Some(Span::within(&head.raw, &rest[..end]));
        path = &rest[end..];
    }
    if path.starts_with(b"/.well-known/oauth-protected-resource") && path_key.is_none() {
        return if head.method() == b"GET" || head.method() == b"HEAD" {
            Ok(Routed {
                route: Route::ResourceMetadata,
                path_key,
            })
        } else {
            Err(method_not_allowed("GET, HEAD"))
        };
    }
    route_path(config, head, path).map(|route| Routed { route, path_key })
}

fn route_path(config: &Config, head: &Head, path: &[u8]) -> Result<Route, Reply> {
    if path == b"/metrics" {
        return if head.method() == b"GET" {
            Ok(Route::Metrics)
        } else {
            Err(method_not_allowed("GET"))
        };
    }
    if config.admin_token.is_some() && (path == b"/admin" || path == b"/admin/stats.json") {
        return if head.method() == b"GET" {
            Ok(if path == b"/admin" {
                Route::AdminPage
            } else {
                Route::AdminStats
            })
        } else {
            Err(method_not_allowed("GET"))
        };
    }
    if path == b"/healthz" {
        return if head.method() == b"GET" || head.method() == b"HEAD" {
            Ok(Route::Health)
        } else {
            Err(method_not_allowed("GET, HEAD"))
        };
    }
    let upstreams = &config.upstreams;
    let index = if path == b"/mcp" || path == b"/mcp/" {
        if upstreams.len() > 1 {
            // Every upstream behind one MCP server.
            return match head.method() {
                b"POST" | b"GET" | b"DELETE" => Ok(Route::Aggregate),
                _ => Err(method_not_allowed("GET, POST, DELETE")),
            };
        }
        Some(0)
    } else if let Some(name) = path.strip_prefix(b"/mcp/") {
        // Whether the name exists is not said before the agent is authenticated: the
        // method is checked first, the same for every name.
        let name = name.strip_suffix(b"/").unwrap_or(name);
        upstreams.iter().position(|u| u.name.as_bytes() == name)
    } else {
        return Err(Reply::error(
            404,
            jsonrpc::GATEWAY_REFUSED,
            "not found: MCP endpoints are /mcp and /mcp/<upstream>",
        ));
    };
    match head.method() {
        b"POST" | b"GET" | b"DELETE" => Ok(Route::Mcp { upstream: index }),
        _ => Err(method_not_allowed("GET, POST, DELETE")),
    }
}

/// The upstream of an MCP route (`None`: the aggregate endpoint, or a route that is
/// not MCP). A name no upstream has gets here only in insecure-open mode (policy mode refused
/// it at authentication, naming nothing); with no agents to keep apart, the answer lists the
/// configured names to help whoever set it up.
pub fn upstream_of(route: Route, config: &Config, head: &Head) -> Result<Option<usize>, Reply> {
    match route {
        Route::Mcp { upstream: None } => {
            let mut reply = unknown_upstream(head);
            let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
            if let crate::reply::Body::Error(e) = &mut reply.body {
                e.message.push_str("; configured: ");
                e.message.push_str(&names.join(", "));
            }
            Err(reply)
        }
        Route::Mcp { upstream } => Ok(upstream),
        _ => Ok(None),
    }
}

/// The aggregate endpoint for an agent that may use exactly one upstream is that upstream:
/// its names pass through unprefixed, as they do when the gateway has one upstream. So an
/// agent's names depend only on the upstreams it may use: adding an upstream that the agent
/// cannot use changes nothing it sees (giving it a second one prefixes its names, and its
/// session starts again).
pub fn sole_upstream(policy: Option<&Policy>, agent: Option<usize>, count: usize) -> Option<usize> {
    let (policy, agent) = (policy?, agent?);
    let mut usable = (0..count).filter(|&i| policy.may_use_upstream(agent, i));
    match (usable.next(), usable.next()) {
        (Some(i), None) => Some(i),
        _ => None,
    }
}

/// The answer for an upstream name the agent cannot reach, whether no upstream has it or
/// its policy keeps the agent away from it: the two must read the same.
pub fn unknown_upstream(head: &Head) -> Reply {
    let target = head.target();
    let path = &target[..memchr::memchr(b'?', target).unwrap_or(target.len())];
    let name = path
        .rsplit(|&b| b == b'/')
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    Reply::error(
        404,
        jsonrpc::GATEWAY_REFUSED,
        format!("unknown upstream {:?}", String::from_utf8_lossy(name)),
    )
    .denied()
}

fn method_not_allowed(allow: &'static str) -> Reply {
    Reply::error(
        405,
        jsonrpc::GATEWAY_REFUSED,
        format!("method not allowed; allowed: {allow}"),
    )
    .header(&format!("Allow: {allow}"))
}

/// The DNS-rebinding defence. On a loopback listener the `Host` must be a loopback
/// name; an `Origin`, when present, must be allowed.
pub fn check_origin(config: &Config, head: &Head) -> Result<(), Reply> {
    let loopback = config.listens_on_loopback();
    if loopback
        && let Some(host) = head.get("host")
        && !origin::is_loopback_host(host)
    {
        return Err(Reply::error(
            403,
            jsonrpc::GATEWAY_REFUSED,
            format!(
                "Host {:?} is not a loopback name; scopegate listens on loopback and refuses \
                 other hosts (DNS-rebinding defence)",
                String::from_utf8_lossy(host)
            ),
        )
        .denied());
    }
    if let Some(value) = head.get("origin")
        && !origin::origin_allowed(value, &config.allowed_origins, loopback)
    {
        return Err(Reply::error(
            403,
            jsonrpc::GATEWAY_REFUSED,
            format!(
                "Origin {:?} is not allowed (SCOPEGATE_ALLOWED_ORIGINS)",
                String::from_utf8_lossy(value)
            ),
        )
        .denied());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::request_head as head;

    fn config(extra: &[(&str, &str)]) -> Config {
        let upstreams = "a=http://127.0.0.1:9/mcp,b=http://127.0.0.1:9/mcp";
        let mut vars = vec![
            ("SCOPEGATE_INSECURE_OPEN", "1"),
            ("SCOPEGATE_UPSTREAMS", upstreams),
        ];
        vars.extend_from_slice(extra);
        Config::from_pairs(&vars).unwrap()
    }

    fn routed(c: &Config, line: &str) -> Result<Route, u16> {
        route(
            c,
            &head(&format!("{line} HTTP/1.1\r\nHost: localhost\r\n\r\n")),
        )
        .map(|r| r.route)
        .map_err(|r| r.status)
    }

    #[test]
    fn routes() {
        let c = config(&[]);
        assert_eq!(routed(&c, "POST /mcp"), Ok(Route::Aggregate));
        assert_eq!(
            routed(&c, "GET /mcp/b"),
            Ok(Route::Mcp { upstream: Some(1) })
        );
        assert_eq!(
            routed(&c, "POST /mcp/b/?x=1"),
            Ok(Route::Mcp { upstream: Some(1) })
        );
        // An unknown name is routed like a known one: the answer waits for authentication.
        assert_eq!(
            routed(&c, "POST /mcp/zz"),
            Ok(Route::Mcp { upstream: None })
        );
        assert_eq!(routed(&c, "PUT /mcp/zz"), Err(405));
        assert_eq!(routed(&c, "PUT /mcp/a"), Err(405));
        assert_eq!(routed(&c, "GET /healthz"), Ok(Route::Health));
        assert_eq!(routed(&c, "POST /healthz"), Err(405));
        assert_eq!(routed(&c, "GET /metrics"), Ok(Route::Metrics));
        assert_eq!(
            routed(&c, "GET /.well-known/oauth-protected-resource"),
            Ok(Route::ResourceMetadata)
        );
        assert_eq!(routed(&c, "GET /other"), Err(404));
        // Path keys only when enabled.
        assert_eq!(routed(&c, "POST /key/k1/mcp/a"), Err(404));
        let c = config(&[("SCOPEGATE_PATH_KEYS", "1")]);
        let h = head("POST /key/k1/mcp/a HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let r = route(&c, &h).unwrap();
        assert_eq!(r.route, Route::Mcp { upstream: Some(0) });
        assert_eq!(r.path_key.unwrap().get(&h.raw), b"k1");
        assert_eq!(routed(&c, "POST /key//mcp/a"), Err(404));
    }

    #[test]
    fn origins_and_hosts() {
        let c = config(&[]);
        let check = |extra: &str| {
            check_origin(&c, &head(&format!("POST /mcp HTTP/1.1\r\n{extra}\r\n")))
                .map_err(|r| r.status)
        };
        assert_eq!(check("Host: localhost:8080\r\n"), Ok(()));
        assert_eq!(check("Host: [::1].evil.example\r\n"), Err(403));
        assert_eq!(
            check("Host: localhost\r\nOrigin: http://evil.example\r\n"),
            Err(403)
        );
        assert_eq!(
            check("Host: localhost\r\nOrigin: http://localhost:3000\r\n"),
            Ok(())
        );
    }

    #[test]
    fn the_upstream_of_a_route() {
        let c = config(&[]);
        let h = head("POST /mcp/zz HTTP/1.1\r\nHost: a\r\n\r\n");
        let mcp = |upstream| Route::Mcp { upstream };
        assert_eq!(upstream_of(mcp(Some(1)), &c, &h).unwrap(), Some(1));
        assert_eq!(upstream_of(Route::Aggregate, &c, &h).unwrap(), None);
        assert_eq!(upstream_of(Route::Health, &c, &h).unwrap(), None);
        let unknown = upstream_of(mcp(None), &c, &h).unwrap_err();
        assert_eq!(unknown.status, 404);
        assert_eq!(
            unknown.message(),
            "unknown upstream \"zz\"; configured: a, b"
        );
    }

    #[test]
    fn unknown_and_forbidden_read_the_same() {
        let r = unknown_upstream(&head("POST /mcp/zz?x HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert_eq!(r.status, 404);
        assert_eq!(r.message(), "unknown upstream \"zz\"");
    }
}
