#!/usr/bin/env bash
# Where scopegate's CPU goes on the forwarding path: the "everything on" setup of
# scripts/bench.sh (policy, argument constraints, rate limits, injected credential, sealed
# session, audit log), one worker on core 0, the mock upstream and the load generator on core 1,
# profiled with perf while the generator runs. Prints the split by thread and by object
# (kernel, scopegate, libc, vdso), the top symbols, and io_uring operations per forwarded call
# (kernel tracepoints); the recording stays in target/profile/.
#
# usage: scripts/profile.sh [--seconds S] [--top N]
# Needs perf (linux-perf); builds the release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_=8
TOP=40
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) SECONDS_="$2"; shift 2 ;;
    --top) TOP="$2"; shift 2 ;;
    *) echo "profile.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v perf >/dev/null || { echo "profile.sh: perf is not installed (apt-get install linux-perf)" >&2; exit 2; }

cargo build --release -q -p scopegate -p scopegate-loadtest
BIN=target/release
OUT=target/profile
mkdir -p "$OUT"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

UP=$(free_port)
GW=$(free_port)
write_bench_policy "$WORK/policy.toml" "$BIN/scopegate"

taskset -c 1 "$BIN/sg-mock" --listen "127.0.0.1:$UP" > /dev/null 2>&1 &
PIDS+=($!)
wait_port "$UP"
env SCOPEGATE_THREADS=1 SCOPEGATE_LISTEN="127.0.0.1:$GW" SCOPEGATE_LOG=warn \
  SCOPEGATE_UPSTREAMS="bench=http://127.0.0.1:$UP/mcp" SCOPEGATE_POLICY="$WORK/policy.toml" \
  SCOPEGATE_SESSION_SECRET=bench-secret-bench-secret-bench-secret SCOPEGATE_AUDIT_DIR="$WORK/audit" \
  taskset -c 0 "$BIN/scopegate" 2> "$WORK/scopegate.log" &
SG=$!
PIDS+=($SG)
wait_port "$GW"
taskset -c 1 "$BIN/sg-load" --url "http://127.0.0.1:$GW/mcp" --keys "$KEY" \
  --args "$ARGS" --connections 32 \
  --duration $((SECONDS_ + 4)) --warmup 1 --json > "$WORK/load.json" &
LOADER=$!
sleep 2
perf record -F 1999 -g -p "$SG" -o "$OUT/perf.data" -- sleep "$SECONDS_" 2> /dev/null
# io_uring operations per request, from the kernel's tracepoints, over 1.5 s of the same load
# (the requests counted by scopegate's own /metrics meanwhile).
calls() { curl -s "http://127.0.0.1:$GW/metrics" | awk '/^scopegate_requests_total\{method="tools\/call"/ {n += $NF} END {print n + 0}'; }
c0=$(calls)
perf stat -x, -e io_uring:io_uring_submit_req,io_uring:io_uring_poll_arm,io_uring:io_uring_task_add,syscalls:sys_enter_io_uring_enter \
  -p "$SG" -o "$WORK/ops.csv" -- sleep 1.5 2> /dev/null || true
c1=$(calls)
wait "$LOADER"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"load: {r['rate']:.0f} req/s, {r['requests']} requests\")" "$WORK/load.json"
echo "## by thread"
perf report -i "$OUT/perf.data" --no-children --stdio --sort comm 2>/dev/null | grep -E '^ +[0-9]'
echo "## by object"
perf report -i "$OUT/perf.data" --no-children --stdio --sort dso 2>/dev/null | grep -E '^ +[0-9]'
echo "## top symbols"
perf report -i "$OUT/perf.data" --no-children --stdio --sort symbol 2>/dev/null | grep -E '^ +[0-9]' \
  | head -n "$TOP" | sed -E 's/ +- +- *$//' || true
echo "## io_uring per forwarded tools/call ($((c1 - c0)) calls counted)"
awk -F, -v n=$((c1 - c0)) '/io_uring|syscalls/ && n > 0 && $1 ~ /^[0-9]+$/ {printf "  %-40s %.2f\n", $3, $1 / n}' "$WORK/ops.csv"
echo "(recording: $OUT/perf.data; perf report -i $OUT/perf.data -G for call graphs)"
