#!/usr/bin/env bash
# The fleet-wide limits benchmark: one replica with its limits in Redis vs local limits, same
# run, interleaved rounds; Redis commands per 1,000 calls. Writes bench/fleet.md.
#
# usage: scripts/bench-fleet.sh [--rounds N] [--seconds S]
# Needs redis-server and redis-cli (scripts/test.sh installs them). About 2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p scopegate -p scopegate-loadtest
python3 scripts/bench_fleet.py "$@"
