#!/usr/bin/env bash
# Builds scopegate, starts the bundled mock MCP server and scopegate in front of it, makes calls
# with the official Python MCP SDK client and with curl, and prints what happened.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building (release)"
cargo build --release -q -p scopegate -p scopegate-loadtest
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt

WORK=$(mktemp -d)
cleanup() { kill "${MOCK_PID:-}" "${SG_PID:-}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

target/release/sg-mock --listen 127.0.0.1:0 > "$WORK/mock.out" &
MOCK_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/mock.out" 2>/dev/null && break; sleep 0.05; done
MOCK_ADDR=$(awk '/listening on/ {print $NF}' "$WORK/mock.out")
echo "==> mock MCP server on $MOCK_ADDR"

SCOPEGATE_INSECURE_OPEN=1 SCOPEGATE_LISTEN=127.0.0.1:0 SCOPEGATE_UPSTREAMS="demo=http://$MOCK_ADDR/mcp" \
  target/release/scopegate 2> "$WORK/scopegate.log" &
SG_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/scopegate.log" 2>/dev/null && break; sleep 0.05; done
SG_ADDR=$(sed -n 's/.* listening on \([^ ]*\).*/\1/p' "$WORK/scopegate.log" | head -1)
echo "==> scopegate on $SG_ADDR (insecure-open demo mode)"
sed 's/^/    scopegate: /' "$WORK/scopegate.log"

echo
.venv/bin/python scripts/demo_client.py "http://$SG_ADDR/mcp"

echo
echo "==> a malformed body is answered by scopegate itself and never forwarded:"
curl -s -H 'Content-Type: application/json' "http://$SG_ADDR/mcp" -d '{"jsonrpc": "2.0", broken'
echo
echo "==> a foreign Origin is refused (DNS-rebinding defence):"
curl -s -H 'Origin: https://evil.example' -H 'Content-Type: application/json' "http://$SG_ADDR/mcp" -d '{}'
echo
echo
echo "==> SIGTERM: scopegate drains and exits"
kill -TERM "$SG_PID"
wait "$SG_PID" && echo "    exit status $?"
SG_PID=
tail -2 "$WORK/scopegate.log" | sed 's/^/    scopegate: /'
