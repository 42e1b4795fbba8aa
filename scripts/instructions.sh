#!/usr/bin/env bash
# Instructions per forwarded tools/call, counted by callgrind (deterministic on a noisy VM,
# unlike wall-clock figures): scopegate with everything on (policy, constraints, limits, audit
# log), and optionally a baseline build, each run twice (5 s and 20 s of calls at a fixed rate)
# so the per-call slope excludes start-up. Uses the epoll driver (valgrind and io_uring do not
# mix).
#
# usage: scripts/instructions.sh [--baseline BIN|REV] [--rate R]
# Needs valgrind (installed from Debian's packages when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
BASELINE=""; RATE=200
while [[ $# -gt 0 ]]; do
  case "$1" in
    --baseline) BASELINE=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    *) echo "instructions.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if ! command -v valgrind >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
cargo build --release -q -p scopegate -p scopegate-loadtest
BIN=target/release
if [[ -n "$BASELINE" && ! -x "$BASELINE" ]]; then
  git worktree remove --force target/baseline-src 2>/dev/null || rm -rf target/baseline-src
  git worktree prune
  git worktree add --detach -f target/baseline-src "$BASELINE" >/dev/null 2>&1
  (cd target/baseline-src && CARGO_TARGET_DIR="$PWD/../baseline-target" cargo build --release -q -p scopegate)
  BASELINE=target/baseline-target/release/scopegate
fi
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 600); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
UP=$(free_port); "$BIN/sg-mock" --listen "127.0.0.1:$UP" >/dev/null 2>&1 & wait_port "$UP"
KEY=bench-agent-key-0123456789
cat > "$W/policy.toml" <<TOML
[[upstream]]
name = "bench"
[upstream.headers]
X-Upstream-Key = "injected"
[[agent]]
id = "bench-agent"
key_sha256 = "$("$BIN/scopegate" hash-key "$KEY")"
allow = ["bench/echo"]
rate = { per_second = 10000000, burst = 10000000 }
[[agent.tool]]
match = "bench/echo"
[agent.tool.args]
repo = { one_of = ["acme/web", "acme/api"] }
title = { max_len = 200 }
labels = { max_len = 5 }
TOML
ARGS='{"repo":"acme/web","title":"bench","labels":["a"]}'
# count BINARY SECONDS -> total instructions of a run with SECONDS of calls
count() {
  local port; port=$(free_port)
  env SCOPEGATE_THREADS=1 SCOPEGATE_IO_DRIVER=epoll SCOPEGATE_LISTEN="127.0.0.1:$port" SCOPEGATE_LOG=warn \
    SCOPEGATE_UPSTREAMS="bench=http://127.0.0.1:$UP/mcp" SCOPEGATE_POLICY="$W/policy.toml" \
    SCOPEGATE_SESSION_SECRET=bench-secret-bench-secret-bench-secret SCOPEGATE_AUDIT_DIR="$W/audit-$port" \
    valgrind --tool=callgrind --callgrind-out-file="$W/cg-$port" "$1" >/dev/null 2>&1 &
  local pid=$!
  wait_port "$port"
  "$BIN/sg-load" --url "http://127.0.0.1:$port/mcp" --keys "$KEY" --args "$ARGS" --connections 4 \
    --rate "$RATE" --duration "$2" --warmup 1 --json > /dev/null
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  callgrind_annotate "$W/cg-$port" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}'
}
per_call() { # per_call BINARY -> instructions per call
  local short long
  short=$(count "$1" 5); long=$(count "$1" 20)
  echo $(( (long - short) / (RATE * 15) ))
}
now=$(per_call "$BIN/scopegate")
echo "this build: $now instructions per forwarded call (everything on, epoll)"
if [[ -n "$BASELINE" ]]; then
  base=$(per_call "$(realpath "$BASELINE")")
  echo "baseline:   $base instructions per forwarded call"
  python3 -c "import sys; print(f'ratio: {int(sys.argv[1]) / int(sys.argv[2]):.3f}x')" "$now" "$base"
fi
