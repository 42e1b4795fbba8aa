//! The live view (`SCOPEGATE_ADMIN_TOKEN`): `/admin` is one page that refreshes itself (no
//! external assets, no build step) and shows what `/metrics` holds, read for a person: calls per
//! second, refusals by reason, rate-limit hits, p50/p99 per upstream, top agents and tools, open
//! streams and connections, the audit writer's state. The page holds no data; its numbers come
//! from `/admin/stats.json`, which wants the admin token as a bearer token (the page takes it
//! from its URL's `#token=` fragment, which browsers never send, or asks for it).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use crate::audit::writer::Channel;
use crate::config::Config;
use crate::http::head::Head;
use crate::mcp::jsonrpc;
use crate::metrics::{LATENCY_BOUNDS_US, Tally, WorkerStats};
use crate::reply::Reply;

/// Whether the request carries the admin token. Their SHA-256 digests are compared, in full:
/// the time taken says nothing of the token, not even its length.
pub fn authorized(config: &Config, head: &Head) -> bool {
    let Some(token) = &config.admin_token else {
        return false;
    };
    let Ok(Some(sent)) = crate::auth::bearer(head) else {
        return false;
    };
    let digest = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
    let (a, b) = (digest(sent), digest(token.as_bytes()));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

pub fn unauthorized() -> Reply {
    Reply::error(401, jsonrpc::UNAUTHENTICATED, "the admin token is required")
        .denied()
        .header("WWW-Authenticate: Bearer realm=\"scopegate admin\"")
}

pub fn page() -> Reply {
    Reply::other(200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec())
        .header("Cache-Control: no-store")
        .header("Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'")
}

/// The numbers, summed over every worker.
pub fn stats(config: &Config, all_stats: &[Arc<WorkerStats>], all_audit: &[Arc<Channel>]) -> Reply {
    let mut tally = Tally::default();
    let mut decisions: Vec<(&str, u64)> = Vec::new();
    let mut calls = 0;
    let mut streams = 0;
    for s in all_stats {
        let m = &s.metrics;
        m.tally_into(&mut tally);
        calls += m.calls();
        streams += m.sse_streams.load(Ordering::Relaxed);
        for (d, n) in m.by_decision() {
            match decisions.iter_mut().find(|(name, _)| *name == d.as_str()) {
                Some((_, total)) => *total += n,
                None => decisions.push((d.as_str(), n)),
            }
        }
    }
    let upstreams: Vec<Value> = config
        .upstreams
        .iter()
        .enumerate()
        .map(|(u, up)| {
            let mut buckets = vec![0u64; LATENCY_BOUNDS_US.len() + 1];
            for s in all_stats {
                for (i, n) in s.metrics.upstream_buckets(u).into_iter().enumerate() {
                    buckets[i] += n;
                }
            }
            json!({
                "name": up.name,
                "requests": buckets.iter().sum::<u64>(),
                "p50_ms": quantile(&buckets, 0.50),
                "p99_ms": quantile(&buckets, 0.99),
            })
        })
        .collect();
    let audit = (!all_audit.is_empty()).then(|| {
        json!({
            "written": all_audit.iter().map(|c| c.written.load(Ordering::Relaxed)).sum::<u64>(),
            "pending_bytes": all_audit.iter().map(|c| c.ring.used() as u64).sum::<u64>(),
            "write_errors": all_audit.iter().map(|c| c.write_errors.load(Ordering::Relaxed)).sum::<u64>(),
            "failing": all_audit.iter().any(|c| c.failing.load(Ordering::Relaxed)),
        })
    });
    let body = json!({
        "calls": calls,
        "decisions": decisions.iter().map(|(d, n)| (d.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "refusals": top(&tally.refusals),
        "agents": top(&tally.agents),
        "tools": top(&tally.tools),
        "upstreams": upstreams,
        "open_streams": streams,
        "open_connections": all_stats.iter().map(|s| s.open_connections.load(Ordering::Relaxed) as u64).sum::<u64>(),
        "audit": audit,
    });
    Reply::json(200, body.to_string().into_bytes()).header("Cache-Control: no-store")
}

/// The ten largest counts, largest first.
fn top(map: &std::collections::HashMap<String, u64>) -> Vec<Value> {
    let mut all: Vec<(&String, &u64)> = map.iter().collect();
    all.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    all.into_iter()
        .take(10)
        .map(|(k, n)| json!({"name": k, "count": n}))
        .collect()
}

/// The bucket bound (in ms) under which fraction `q` of the observations fall; `null` when
/// there are none.
fn quantile(buckets: &[u64], q: f64) -> Value {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return Value::Null;
    }
    let want = (total as f64 * q).ceil() as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= want {
            return match LATENCY_BOUNDS_US.get(i) {
                Some(&us) => json!(us as f64 / 1000.0),
                None => json!(format!(
                    ">{}",
                    LATENCY_BOUNDS_US[LATENCY_BOUNDS_US.len() - 1] / 1000
                )),
            };
        }
    }
    Value::Null
}

const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scopegate: live</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .8em}
h2{font-size:1em;margin:0 0 .4em;color:#555}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(17em,1fr));gap:1em}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em}
.big{font-size:2em;font-weight:600}
table{border-collapse:collapse;width:100%}
td{padding:.15em .3em;border-top:1px solid #eee}
td.n{text-align:right;font-variant-numeric:tabular-nums}
#state{color:#777;font-size:.9em}
.bad{color:#b00020}
</style></head><body>
<h1>scopegate <span id="state">connecting...</span></h1>
<div class="grid">
<div class="card"><h2>calls per second</h2><div class="big" id="calls-per-second">-</div><div id="calls-total"></div></div>
<div class="card"><h2>rate-limit hits</h2><div class="big" id="rate-limited">-</div><div id="decisions"></div></div>
<div class="card"><h2>open</h2><div id="open"></div></div>
<div class="card"><h2>audit writer</h2><div id="audit"></div></div>
<div class="card"><h2>refusals by reason</h2><table id="refusals"></table></div>
<div class="card"><h2>upstreams (p50 / p99 ms)</h2><table id="upstreams"></table></div>
<div class="card"><h2>top agents</h2><table id="agents"></table></div>
<div class="card"><h2>top tools</h2><table id="tools"></table></div>
</div>
<script>
"use strict";
const m = /token=([^&]+)/.exec(location.hash);
let token = m ? decodeURIComponent(m[1]) : sessionStorage.getItem("sg-admin");
// The token leaves the address (and so the history) once read.
if (m) { history.replaceState(null, "", location.pathname + location.search); }
if (!token) { token = prompt("scopegate admin token"); }
if (token) { sessionStorage.setItem("sg-admin", token); }
const $ = (id) => document.getElementById(id);
function rows(id, items, cells) {
  const t = $(id); t.textContent = "";
  for (const it of items) {
    const tr = t.insertRow();
    cells(it).forEach((c, i) => { const td = tr.insertCell(); td.textContent = c; if (i > 0) td.className = "n"; });
  }
  if (!items.length) { t.insertRow().insertCell().textContent = "none yet"; }
}
let last = null;
async function tick() {
  try {
    const r = await fetch("/admin/stats.json", {headers: {Authorization: "Bearer " + token}, cache: "no-store"});
    if (!r.ok) { $("state").textContent = "HTTP " + r.status + (r.status == 401 ? ": wrong admin token" : ""); $("state").className = "bad"; return; }
    const s = await r.json(), now = performance.now();
    if (last) {
      const dt = (now - last.at) / 1000;
      $("calls-per-second").textContent = ((s.calls - last.calls) / dt).toFixed(1);
    }
    last = {at: now, calls: s.calls};
    $("calls-total").textContent = s.calls + " tools/call so far";
    $("rate-limited").textContent = s.decisions.rate_limited || 0;
    $("decisions").textContent = Object.entries(s.decisions).map(([d, n]) => d + " " + n).join(", ");
    $("open").textContent = s.open_streams + " event streams, " + s.open_connections + " connections";
    $("audit").textContent = s.audit ? (s.audit.failing ? "FAILING, " : "writing, ") + s.audit.written + " entries written, " + s.audit.pending_bytes + " bytes pending" : "off";
    $("audit").className = s.audit && s.audit.failing ? "bad" : "";
    rows("refusals", s.refusals, (x) => [x.name, x.count]);
    rows("upstreams", s.upstreams, (x) => [x.name, x.p50_ms == null ? "-" : x.p50_ms + " / " + x.p99_ms]);
    rows("agents", s.agents, (x) => [x.name, x.count]);
    rows("tools", s.tools, (x) => [x.name, x.count]);
    $("state").textContent = "live, " + new Date().toLocaleTimeString(); $("state").className = "";
  } catch (e) { $("state").textContent = "unreachable"; $("state").className = "bad"; }
}
tick(); setInterval(tick, 1000);
</script></body></html>
"##;
