#!/usr/bin/env bash
# The job scopegate does, in one run: two agents with keys made by `scopegate hash-key`, a policy,
# an official MCP SDK server (Python FastMCP) behind scopegate, and the official Python SDK client
# as the agents: a filtered tools/list, an allowed call, a refused tool, an argument outside its
# constraint, a rate-limited call, then the audit lines that recorded them and
# `scopegate audit verify`.
#
# SCOPEGATE_BIN=path/to/scopegate uses that binary instead of building a release one.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${SCOPEGATE_BIN:-}
unset SCOPEGATE_BIN   # scopegate refuses SCOPEGATE_* variables it does not know
if [[ -z "$BIN" ]]; then
  echo "==> building (release)"
  cargo build --release -q -p scopegate
  BIN=target/release/scopegate
fi
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
PY=.venv/bin/python

WORK=$(mktemp -d)
cleanup() { kill "${SERVER_PID:-}" "${SG_PID:-}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# An MCP server nobody configured for scopegate: the official Python SDK's FastMCP, with a few
# tools (add, stepwise, ask_model, delete_everything).
PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$PY tests/e2e/fastmcp_upstream.py "$PORT" "$WORK/executions.jsonl" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 200); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
echo "==> MCP server (Python SDK FastMCP) on 127.0.0.1:$PORT"

# Two agents, each with a key made by scopegate (only its SHA-256 goes in the policy).
ANALYST_KEY=$("$BIN" hash-key | sed -n 's/^key: *//p')
ANALYST_SHA=$("$BIN" hash-key "$ANALYST_KEY")
INTERN_KEY=$("$BIN" hash-key | sed -n 's/^key: *//p')
INTERN_SHA=$("$BIN" hash-key "$INTERN_KEY")
cat > "$WORK/policy.toml" <<POLICY
[[upstream]]
name = "maths"
url = "http://127.0.0.1:$PORT/mcp"

[[agent]]
id = "analyst"
key_sha256 = "$ANALYST_SHA"
allow = ["maths/*"]
deny = ["maths/delete_*"]
rate = { per_minute = 60, burst = 4 }

[[agent.tool]]
match = "maths/add"
[agent.tool.args]
a = { min = 0, max = 100 }

[[agent]]
id = "intern"
key_sha256 = "$INTERN_SHA"
allow = ["maths/add"]
POLICY
echo "==> the policy:"
sed 's/^/    /' "$WORK/policy.toml"
"$BIN" validate "$WORK/policy.toml" | sed 's/^/    /'

SCOPEGATE_POLICY="$WORK/policy.toml" SCOPEGATE_LISTEN=127.0.0.1:0 \
SCOPEGATE_SESSION_SECRET="demo-secret-demo-secret-demo-secret!" \
SCOPEGATE_AUDIT_DIR="$WORK/audit" SCOPEGATE_AUDIT_FLUSH_MS=20 \
  "$BIN" 2> "$WORK/scopegate.log" &
SG_PID=$!
for _ in $(seq 200); do grep -q "listening on" "$WORK/scopegate.log" 2>/dev/null && break; sleep 0.05; done
SG_ADDR=$(sed -n 's/.* listening on \([^ ]*\).*/\1/p' "$WORK/scopegate.log" | head -1)
if [[ -z "$SG_ADDR" ]]; then cat "$WORK/scopegate.log"; exit 1; fi
echo "==> scopegate on $SG_ADDR"
echo
$PY scripts/demo_client.py "http://$SG_ADDR/mcp" "$ANALYST_KEY" "$INTERN_KEY"

echo
echo "==> what the server executed (its own log): only the allowed calls, and no agent key"
$PY scripts/demo_audit.py --executions "$WORK/executions.jsonl"

echo
echo "==> SIGTERM: scopegate drains, flushes the audit log and exits"
kill -TERM "$SG_PID"
wait "$SG_PID" && echo "    exit status $?"
SG_PID=

echo
echo "==> the audit log: one line per message (agent, tool, arguments, decision, reason, latency)"
$PY scripts/demo_audit.py "$WORK"/audit/*.jsonl
echo
echo "==> scopegate audit verify (the hash chain: an edited or deleted line is detected)"
"$BIN" audit verify "$WORK/audit" | sed 's/^/    /'
