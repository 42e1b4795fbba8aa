"""The fleet-wide limits benchmark (run by scripts/bench-fleet.sh): one replica with its limits
in Redis vs the same replica with local limits, side by side in one run, interleaved rounds.

Core 0: scopegate (one worker). Core 1: the mock upstream (sg-mock), redis-server and the load
generator (sg-load, 32 connections, closed loop). Every call falls in four limits (agent x
tool, agent, tenant, upstream), as in scripts/bench.sh. Two scenarios:
- limits that do not bind: what leasing costs a call (throughput ratio, CPU per call, Redis
  commands per 1,000 calls);
- an agent limit that binds (5,000/s under a load that asks for more): the admitted rate with
  Redis vs locally, and what the refusals cost Redis.
Redis commands are counted twice, per 1,000 calls scopegate counted over the same interval:
as the replica sent them (its scopegate_redis_commands_total: script calls, heartbeats, PINGs:
the round trips) and as Redis executed them (INFO commandstats, which also counts the commands
each script runs inside Redis: TIME, GET, SET). Writes
bench/fleet.md."""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release"
KEY = "bench-agent-key-0123456789"
ARGS = '{"repo":"acme/web","title":"bench","labels":["a"]}'
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench-fleet: nothing listening on {port}")


def policy(agent_rate: str) -> str:
    sha = subprocess.run([BIN / "scopegate", "hash-key", KEY], capture_output=True, text=True,
                         check=True).stdout.strip()
    big = "{ per_second = 10000000, burst = 10000000 }"
    return f"""
[[tenant]]
id = "bench"
rate = {big}

[[upstream]]
name = "bench"
tenant = "bench"
url = "http://127.0.0.1:{UP_PORT}/mcp"
rate = {big}

[[agent]]
id = "bench-agent"
tenant = "bench"
key_sha256 = "{sha}"
allow = ["bench/echo"]
rate = {agent_rate}

[[agent.tool]]
match = "bench/echo"
rate = {big}
"""


class Gateway:
    def __init__(self, name: str, policy_file: Path, redis_url: str | None, tmp: Path):
        self.name = name
        self.port = free_port()
        env = {"PATH": os.environ["PATH"], "SCOPEGATE_LISTEN": f"127.0.0.1:{self.port}",
               "SCOPEGATE_THREADS": "1", "SCOPEGATE_POLICY": str(policy_file),
               "SCOPEGATE_SESSION_SECRET": "bench-secret-bench-secret-bench-secret", "SCOPEGATE_LOG": "warn"}
        if redis_url:
            env["SCOPEGATE_REDIS_URL"] = redis_url
            env["SCOPEGATE_REDIS_PREFIX"] = f"{name}:"
        self.proc = subprocess.Popen(["taskset", "-c", "0", BIN / "scopegate"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "w"))
        wait_port(self.port)

    def counter(self, prefix: str) -> int:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics").read().decode()
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith(prefix))

    def requests(self) -> int:
        return self.counter("scopegate_requests_total{")

    def sent(self) -> int:
        """Commands this replica sent to Redis (0 without Redis)."""
        return self.counter("scopegate_redis_commands_total ")

    def cpu_ticks(self) -> int:
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])


def redis_commands(port: int) -> int:
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "commandstats"], capture_output=True,
                         text=True, check=True).stdout
    return sum(int(n) for n in re.findall(r"calls=(\d+)", out))


def load(gw: Gateway, seconds: float) -> dict:
    out = subprocess.run(["taskset", "-c", "1", BIN / "sg-load", "--url", f"http://127.0.0.1:{gw.port}/mcp/bench",
                          "--keys", KEY, "--args", ARGS, "--tool", "echo", "--connections", "32",
                          "--duration", str(seconds), "--warmup", "1", "--mix", "call=100", "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def measure(gw: Gateway, seconds: float, redis_port: int) -> dict:
    r0, c0, s0, t0 = gw.requests(), redis_commands(redis_port), gw.sent(), gw.cpu_ticks()
    report = load(gw, seconds)
    r1, c1, s1, t1 = gw.requests(), redis_commands(redis_port), gw.sent(), gw.cpu_ticks()
    calls = report["outcomes"].get("call", {})
    admitted = calls.get("ok", 0) + calls.get("ok_sse", 0)
    if admitted == 0 or report["errors"]:
        sys.exit(f"bench-fleet: {gw.name} did not forward calls: {report}")
    return {
        "rate": report["rate"],
        "admitted_rate": admitted / report["seconds"],
        "limited": calls.get("rate_limited", 0),
        "p99": report["latency_us"]["p99"],
        "cpu_us": (t1 - t0) / TICK * 1e6 / max(1, r1 - r0),
        "redis_per_1000": (c1 - c0) * 1000 / max(1, r1 - r0),
        "sent_per_1000": (s1 - s0) * 1000 / max(1, r1 - r0),
    }


def main() -> None:
    global UP_PORT
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5)
    opts = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    procs = []
    try:
        UP_PORT = free_port()
        procs.append(subprocess.Popen(["taskset", "-c", "1", BIN / "sg-mock", "--listen", f"127.0.0.1:{UP_PORT}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        redis_port = free_port()
        procs.append(subprocess.Popen(["taskset", "-c", "1", "redis-server", "--port", str(redis_port), "--bind",
                                       "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(UP_PORT)
        wait_port(redis_port)
        free = tmp / "free.toml"
        free.write_text(policy("{ per_second = 10000000, burst = 10000000 }"))
        binding = tmp / "binding.toml"
        binding.write_text(policy("{ per_second = 5000, burst = 100 }"))
        url = f"redis://127.0.0.1:{redis_port}/0"
        gws = {
            "local": Gateway("local", free, None, tmp),
            "redis": Gateway("redis", free, url, tmp),
            "local-binding": Gateway("local-binding", binding, None, tmp),
            "redis-binding": Gateway("redis-binding", binding, url, tmp),
        }
        procs += [g.proc for g in gws.values()]
        time.sleep(1.5)  # heartbeats: every replica counted before measuring
        results = {name: [] for name in gws}
        for i in range(opts.rounds):
            pairs = [("local", "redis"), ("local-binding", "redis-binding")]
            for a, b in pairs:
                for name in ((a, b) if i % 2 == 0 else (b, a)):
                    results[name].append(measure(gws[name], opts.seconds, redis_port))
                    print(f"round {i + 1} {name}: {results[name][-1]}", file=sys.stderr)
        write(results, opts)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


def write(results: dict, opts) -> None:
    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in results[name])

    ratio = med("redis", "rate") / med("local", "rate")
    cpu = med("redis", "cpu_us") / med("local", "cpu_us")
    lines = [
        "# Fleet-wide limits: one replica, limits in Redis vs local",
        "",
        f"`scripts/bench-fleet.sh --rounds {opts.rounds} --seconds {opts.seconds:g}` on this project's 2-core VM:",
        "scopegate (one worker) on core 0; sg-mock, redis-server and sg-load (32 connections, closed loop) on",
        "core 1. Every call falls in four limits (agent x tool, agent, tenant, upstream). Medians of",
        f"{opts.rounds} interleaved rounds of {opts.seconds:g} s. Redis commands per 1,000 calls scopegate",
        "counted over the same interval: *sent* is what the replica sent (script calls, heartbeats, PINGs: the",
        "round trips); *executed* is Redis's own count (INFO commandstats, which adds the TIME, GET and SET",
        "each script runs inside Redis, and the other replicas' heartbeats).",
        "",
        "## Limits that do not bind: what leasing costs",
        "",
        "| limits | calls/s | p99 µs | CPU µs/call | commands sent per 1,000 calls | executed |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("local", "redis"):
        lines.append(f"| {name} | {med(name, 'rate'):,.0f} | {med(name, 'p99'):,.0f} | "
                     f"{med(name, 'cpu_us'):.1f} | {med(name, 'sent_per_1000'):.2f} | "
                     f"{med(name, 'redis_per_1000'):.2f} |")
    lines += [
        "",
        f"- Throughput with Redis-backed limits: **{ratio:.3f}x** local (goal: at least 0.95).",
        f"- CPU per call: {cpu:.3f}x local.",
        "",
        "## An agent limit that binds (5,000/s, burst 100) under a load asking for more",
        "",
        "| limits | calls/s (admitted + refused) | admitted/s | commands sent per 1,000 calls | executed |",
        "|---|---|---|---|---|",
    ]
    for name in ("local-binding", "redis-binding"):
        lines.append(f"| {name.split('-')[0]} | {med(name, 'rate'):,.0f} | {med(name, 'admitted_rate'):,.0f} | "
                     f"{med(name, 'sent_per_1000'):.2f} | {med(name, 'redis_per_1000'):.2f} |")
    lines += [
        "",
        "- Admitted/s should be 5,000 in both rows: the limit holds through leases as it does locally.",
        f"- Binding limit, with Redis: {med('redis-binding', 'rate') / med('local-binding', 'rate'):.3f}x the "
        "calls/s of local limits.",
        "- Refused calls do not ask Redis until a lease's worth could have accrued since it said the bucket",
        "  was empty (at most 100 ms), so Redis traffic follows the limit's rate, not the refused load.",
        "",
    ]
    out = ROOT / "bench" / "fleet.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
