#!/usr/bin/env bash
# The stdio benchmark: the official Python SDK client to server-everything over stdio directly
# vs through scopegate, sg-load through scopegate (per-session and shared processes), process
# start, and memory for 100 agent sessions. Writes bench/stdio.md.
#
# usage: scripts/bench-stdio.sh [--calls N] [--rounds N] [--sessions N]
# Needs what scripts/test.sh installs (.venv, tests/e2e/node/node_modules). About 4 minutes on
# 2 cores; 100 Node processes need about 5 GiB of memory for a moment.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p scopegate -p scopegate-loadtest
.venv/bin/python scripts/bench_stdio.py "$@"
