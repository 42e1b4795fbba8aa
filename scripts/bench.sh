#!/usr/bin/env bash
# Side-by-side proxy cost on this machine, in one run: the mock MCP upstream direct (the limit),
# scopegate in front of it (insecure-open; policy: key authentication + a tools/call checked
# against three argument constraints; + rate limits on every kind of bucket; + the audit log),
# and nginx as a plain reverse proxy in front of it. One worker each.
#
# For each target: throughput under wrk (closed loop) and the CPU time the proxy process spent
# per request (utime+stime from /proc/PID/stat, divided by the requests wrk completed).
#
# Targets are measured in interleaved rounds (all targets, then all again, ...) and the median
# of the rounds is reported, since single runs on a shared 2-core VM vary by 10-20%.
#
# usage: scripts/bench.sh [--duration SECONDS] [--connections N] [--rounds N] [--out FILE]
#                         [--only NAME,NAME...]   (targets: direct, scopegate-open, scopegate-policy,
#                                                  scopegate-limits, scopegate-full, nginx)
# Needs wrk and nginx (installed from Debian's packages when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=10
CONNECTIONS=32
ROUNDS=3
OUT=""
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --connections) CONNECTIONS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --only) ONLY=",$2,"; shift 2 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

need() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }
if ! need wrk || ! need nginx; then
  echo "bench.sh: installing wrk and nginx from Debian's packages" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release -q -p scopegate -p scopegate-loadtest
BIN=target/release

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  [[ -f "$WORK/nginx.pid" ]] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on port $1" >&2; return 1; }
# utime+stime of a set of pids, in clock ticks.
cpu_ticks() { local t=0; for p in "$@"; do read -r -a f < "/proc/$p/stat"; t=$((t + f[13] + f[14])); done; echo "$t"; }
TICK=$(getconf CLK_TCK)

# Core 0: the proxy under test. Core 1: upstream and load generator.
UP_PORT=$(free_port)
# Session-less upstream, so every target gets the identical request (no session token to juggle).
taskset -c 1 "$BIN/sg-mock" --listen "127.0.0.1:$UP_PORT" --no-sessions > "$WORK/mock.log" 2>&1 &
PIDS+=($!)
wait_port "$UP_PORT"

# scopegate with a policy: the agent's key is authenticated and the call is checked against
# three argument constraints on every request.
KEY="bench-agent-key-0123456789"
KEY_SHA=$("$BIN/scopegate" hash-key "$KEY")
SG_PORT=$(free_port)

# policy RATES_ON -> the policy file (with or without rate limits on every kind of bucket; the
# limits are far above the load, so they are checked on every call and never refuse).
policy() {
  local rate=""
  [[ "$1" == 1 ]] && rate='rate = { per_second = 10000000, burst = 10000000 }'
  cat <<TOML
[[tenant]]
id = "bench"
$rate

[[upstream]]
name = "bench"
tenant = "bench"
$rate
[upstream.headers]
X-Upstream-Key = "injected"

[[agent]]
id = "bench-agent"
tenant = "bench"
key_sha256 = "$KEY_SHA"
allow = ["bench/echo"]
$rate

[[agent.tool]]
match = "bench/echo"
$rate
[agent.tool.args]
repo = { one_of = ["acme/web", "acme/api"] }
title = { max_len = 200 }
labels = { max_len = 5 }
TOML
}
policy 1 > "$WORK/policy.toml"
policy 0 > "$WORK/policy-nolimits.toml"

# start_scopegate NAME PORT POLICY|- [VAR=VALUE...]  -> starts it pinned to core 0; prints its pid
start_scopegate() {
  local name=$1 port=$2 file=$3
  shift 3
  local mode=(SCOPEGATE_POLICY="$file" SCOPEGATE_SESSION_SECRET=bench-secret-bench-secret-bench-secret "$@")
  [[ "$file" == - ]] && mode=(SCOPEGATE_INSECURE_OPEN=1)
  env "${mode[@]}" SCOPEGATE_THREADS=1 SCOPEGATE_LISTEN="127.0.0.1:$port" \
    SCOPEGATE_UPSTREAMS="bench=http://127.0.0.1:$UP_PORT/mcp" SCOPEGATE_LOG=warn ${BENCH_SCOPEGATE_ENV:-} \
    taskset -c 0 "$BIN/scopegate" > /dev/null 2> "$WORK/$name.log" &
  echo $!
}
SGP_PORT=$(free_port)
SGP_PID=$(start_scopegate scopegate-limits "$SGP_PORT" "$WORK/policy.toml")
PIDS+=($SGP_PID)
wait_port "$SGP_PORT"
# Everything on: policy, rate limits and the audit log (default flush interval, no fsync).
SGF_PORT=$(free_port)
SGF_PID=$(start_scopegate scopegate-full "$SGF_PORT" "$WORK/policy.toml" SCOPEGATE_AUDIT_DIR="$WORK/audit")
PIDS+=($SGF_PID)
wait_port "$SGF_PORT"
SG_PID=$(start_scopegate scopegate-open "$SG_PORT" -)
PIDS+=($SG_PID)
wait_port "$SG_PORT"
SGN_PORT=$(free_port)
SGN_PID=$(start_scopegate scopegate-policy "$SGN_PORT" "$WORK/policy-nolimits.toml")
PIDS+=($SGN_PID)
wait_port "$SGN_PORT"

NG_PORT=$(free_port)
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
worker_cpu_affinity 01;
daemon on;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/body; proxy_temp_path $WORK/proxy;
  fastcgi_temp_path $WORK/fcgi; uwsgi_temp_path $WORK/uwsgi; scgi_temp_path $WORK/scgi;
  upstream mock { server 127.0.0.1:$UP_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NG_PORT;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
taskset -c 0 "$NGINX" -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log"
wait_port "$NG_PORT"
NG_PIDS=$(pgrep -f "nginx: .*$WORK/nginx.conf|nginx: worker process" | tr '\n' ' ')
NG_MASTER=$(cat "$WORK/nginx.pid")
NG_PIDS="$NG_MASTER $(pgrep -P "$NG_MASTER" | tr '\n' ' ')"

BODY='{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"repo":"acme/web","title":"bench","labels":["a"]}}}'
cat > "$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["Authorization"] = "Bearer $KEY"
wrk.headers["Host"] = "127.0.0.1"
LUA

# run NAME PORT PIDS...  -> prints "NAME rps requests cpu_us_per_req"
run() {
  local name=$1 port=$2; shift 2
  [[ -n "$ONLY" && "$ONLY" != *",$name,"* ]] && return 0
  # The request must be forwarded and answered by the upstream (a refusal would be cheaper and
  # prove nothing).
  local probe
  probe=$(curl -s -X POST -H "Content-Type: application/json" -H "Accept: application/json, text/event-stream" \
    -H "Authorization: Bearer $KEY" --data "$BODY" "http://127.0.0.1:$port/mcp")
  if [[ "$probe" != *'"result"'* ]]; then
    echo "bench.sh: $name did not forward the request: $probe" >&2
    exit 1
  fi
  # Warm-up (keep-alive pools, caches), not measured.
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s -s "$WORK/post.lua" "http://127.0.0.1:$port/mcp" >/dev/null
  local before=0 after=0
  [[ $# -gt 0 ]] && before=$(cpu_ticks "$@")
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$WORK/post.lua" "http://127.0.0.1:$port/mcp" > "$WORK/$name.wrk"
  [[ $# -gt 0 ]] && after=$(cpu_ticks "$@")
  local requests rps errors
  requests=$(awk '/requests in/ {print $1}' "$WORK/$name.wrk")
  rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/$name.wrk")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' "$WORK/$name.wrk" | tr '\n' ' ')
  local cpu_us="-"
  if [[ $# -gt 0 ]]; then
    cpu_us=$(python3 -c "print(f'{($after-$before)/$TICK*1e6/$requests:.2f}')")
  fi
  printf '%-22s %12s %12s %14s  %s\n' "$name" "$rps" "$requests" "$cpu_us" "$errors"
  echo "$name $rps $cpu_us" >> "$WORK/rounds.txt"
}

{
  echo "# scopegate bench: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# machine: $(nproc) cores, $(awk '/model name/ {sub(/.*: /,""); print; exit}' /proc/cpuinfo), kernel $(uname -r)"
  echo "# wrk -t1 -c$CONNECTIONS -d${DURATION}s, POST tools/call of ${#BODY} bytes; proxy on core 0, upstream+wrk on core 1; $ROUNDS interleaved rounds"
  for round in $(seq 1 "$ROUNDS"); do
    echo "## round $round"
    printf '%-22s %12s %12s %14s\n' target req/s requests cpu_us/req
    run direct "$UP_PORT"
    run scopegate-open "$SG_PORT" "$SG_PID"
    run scopegate-policy "$SGN_PORT" "$SGN_PID"
    run scopegate-limits "$SGP_PORT" "$SGP_PID"
    run scopegate-full "$SGF_PORT" "$SGF_PID"
    run nginx "$NG_PORT" $NG_PIDS
  done
  echo "## median of $ROUNDS rounds"
  python3 - "$WORK/rounds.txt" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, rps, cpu = line.split()
    rows.setdefault(name, []).append((float(rps), None if cpu == "-" else float(cpu)))
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
base = rows.get("nginx")
nginx_rps = med(r for r, _ in base) if base else None
nginx_cpu = med(c for _, c in base) if base else None
fmt = lambda x, w, p=2: f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}}"
print(f"{'target':22} {'req/s':>10} {'cpu_us/req':>11} {'x nginx req/s':>14} {'x nginx cpu':>12}")
for name, vals in rows.items():
    rps = med(r for r, _ in vals)
    cpu = med(c for _, c in vals)
    r_rps = rps / nginx_rps if nginx_rps else None
    r_cpu = cpu / nginx_cpu if cpu is not None and nginx_cpu else None
    print(f"{name:22} {rps:10.0f} {fmt(cpu, 11)} {fmt(r_rps, 14)} {fmt(r_cpu, 12)}")
# The audit log's cost: full (audit on) against limits (the same with audit off), paired by
# round (the two run back to back), so slow phases of the machine hit both.
on, off = rows.get("scopegate-full"), rows.get("scopegate-limits")
if on and off:
    pairs = list(zip(on, off))
    rps = med(a[0] / b[0] for a, b in pairs)
    cpu = med(b[1] / a[1] for a, b in pairs if a[1] and b[1])
    print(f"audit on/off, median of per-round ratios: throughput {rps:.3f}, "
          f"requests per CPU-second {cpu:.3f}")
PY
} | tee "$WORK/result.txt"

if [[ -n "$OUT" ]]; then cp "$WORK/result.txt" "$OUT"; fi
if grep -q "Non-2xx\|Socket errors" "$WORK/result.txt"; then
  echo "bench.sh: some requests failed (see above)" >&2
fi
