#!/usr/bin/env bash
# Installs every test peer and runs every test: formatting, lints, Rust unit and integration
# tests (the real binary against the mock upstream), and end-to-end tests with the official
# Python MCP SDK as agent and as upstream.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Debian packages the tests use (openssl CLI, the CA store, tinyproxy for the TLS tests, git for mcp-server-git, redis-server and haproxy for the fleet tests, chromium for the live view's test)"
missing=()
command -v git >/dev/null 2>&1 || missing+=(git)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
command -v tinyproxy >/dev/null 2>&1 || missing+=(tinyproxy-bin)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if ((${#missing[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

step "Python test peers (official MCP SDK) into .venv"
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
if [[ ! -x .venv-git/bin/python ]]; then
  python3 -m venv .venv-git
fi
.venv-git/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements-git.txt

step "npm test peers (official TypeScript MCP SDK) into tests/e2e/node/node_modules"
(cd tests/e2e/node && npm ci --no-audit --no-fund --silent)

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -q -- -D warnings

step "build"
cargo build --workspace -q

step "Rust unit and integration tests"
cargo test --workspace -q 2>&1 | tee target/cargo-test.log
# Fail loudly if any test binary reported a failure that the pipeline might hide.
if grep -q "test result: FAILED" target/cargo-test.log; then
  exit 1
fi

step "end-to-end tests with the official Python and TypeScript MCP SDKs"
SCOPEGATE_BIN="$PWD/target/debug/scopegate" .venv/bin/python -m pytest -q

step "benches compile"
cargo bench --workspace --no-run -q

echo
echo "all tests passed"
