"""A fleet of replicas behind haproxy round-robin (no stickiness), limits held in a real Redis.

Three scopegate processes share a session secret, a policy and a Redis (`SCOPEGATE_REDIS_URL`);
haproxy spreads every request over them. The official Python SDK client keeps one session
across replicas; a burst limit and a per-second limit hold fleet-wide (sg-load for the rate);
Redis killed mid-run falls back as configured (`local`: each replica its share; `closed`:
limited calls refused, unlimited ones untouched) and recovers when Redis returns; a replica
killed mid-run costs nothing but its lease.
"""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

from conftest import SCOPEGATE, Scopegate, Upstream, free_port, sha256_hex, wait_for_port

SG_LOAD = str(Path(SCOPEGATE).parent / "sg-load")
KEY = "fleet-agent-key-0123456789"
FREE_KEY = "fleet-free-key-0123456789"
SECRET = "fleet-secret-fleet-secret-fleet-secret-42"


class Redis:
    """A redis-server on a free port, no persistence: a restart starts empty."""

    def __init__(self, tmp_path: Path, extra: list[str] | None = None, tls: bool = False):
        self.port = free_port()
        self.dir = tmp_path
        self.proc = None
        ports = ["--port", "0", "--tls-port", str(self.port)] if tls else ["--port", str(self.port)]
        self.args = ports + (extra or [])
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir), *self.args],
            stdout=open(self.dir / "redis.log", "a"), stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def commands(self) -> dict[str, int]:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "info", "commandstats"],
                             capture_output=True, text=True, check=True).stdout
        return {m.group(1): int(m.group(2)) for m in re.finditer(r"cmdstat_(\S+?):calls=(\d+)", out)}


class Haproxy:
    """haproxy round-robin over `backends` (host:port), health-checked on /healthz."""

    def __init__(self, tmp_path: Path, backends: list[str]):
        self.port = free_port()
        servers = "\n".join(
            f"  server r{i} {b} check inter 200ms fall 1 rise 2" for i, b in enumerate(backends)
        )
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(f"""
global
  maxconn 2000
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  retries 3
  option redispatch
frontend fleet
  bind 127.0.0.1:{self.port}
  default_backend replicas
backend replicas
  balance roundrobin
  option httpchk GET /healthz
{servers}
""")
        self.proc = subprocess.Popen([shutil.which("haproxy") or "haproxy", "-db", "-f", str(cfg)],
                                     stdout=open(tmp_path / "haproxy.log", "w"), stderr=subprocess.STDOUT)
        wait_for_port(self.port)
        self.url = f"http://127.0.0.1:{self.port}/mcp/files"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def redis_cli(r: "Redis", *args: str, tls_dir: Path | None = None, password: str | None = None) -> str:
    cmd = ["redis-cli", "-p", str(r.port)]
    if tls_dir:
        cmd += ["--tls", "--cacert", str(tls_dir / "ca.pem")]
    if password:
        cmd += ["-a", password, "--no-auth-warning"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, check=True).stdout


def policy_text(upstream_url: str, agent_rate: str = "", tool_rate: str = "") -> str:
    agent_rate = f"rate = {agent_rate}" if agent_rate else ""
    tool = f'[[agent.tool]]\nmatch = "files/add"\nrate = {tool_rate}\n' if tool_rate else ""
    return f"""
[[upstream]]
name = "files"
url = "{upstream_url}"

[[agent]]
id = "bot"
key_sha256 = "{sha256_hex(KEY)}"
allow = ["files/*"]
{agent_rate}
{tool}
[[agent]]
id = "free"
key_sha256 = "{sha256_hex(FREE_KEY)}"
allow = ["files/*"]
"""


class Fleet:
    def __init__(self, tmp_path: Path, upstream: Upstream, redis: Redis, replicas: int = 3,
                 fallback: str = "local", redis_env: dict[str, str] | None = None, wait: bool = True,
                 **rates):
        policy = tmp_path / "policy.toml"
        policy.write_text(policy_text(upstream.url, **rates))
        self.replicas = []
        for i in range(replicas):
            audit = tmp_path / f"audit-{i}"
            audit.mkdir(exist_ok=True)
            self.replicas.append(Scopegate({
                "SCOPEGATE_POLICY": str(policy),
                "SCOPEGATE_SESSION_SECRET": SECRET,
                "SCOPEGATE_REDIS_URL": redis.url(),
                "SCOPEGATE_REDIS_FALLBACK": fallback,
                # A shared 2-core test machine: give Redis room to answer before counting it gone.
                "SCOPEGATE_REDIS_TIMEOUT_MS": "500",
                "SCOPEGATE_AUDIT_DIR": str(audit),
                "SCOPEGATE_AUDIT_FLUSH_MS": "20",
                # Two workers on one replica: two links to Redis in one process.
                "SCOPEGATE_THREADS": "2" if i == 0 else "1",
                **(redis_env or {}),
            }))
        self.haproxy = Haproxy(tmp_path, [r.addr for r in self.replicas]) if replicas > 1 else None
        # Every replica counted in Redis before the test measures anything.
        if wait:
                wait_until(lambda: all(metric(r, "scopegate_redis_replicas") == replicas for r in self.replicas),
                       "replicas to see each other")

    def stop(self) -> None:
        if self.haproxy:
            self.haproxy.stop()
        for r in self.replicas:
            if r.proc.poll() is None:
                r.stop()


def metric(gw: Scopegate, name: str, match: str = "") -> float:
    import urllib.request

    try:
        text = urllib.request.urlopen(f"{gw.base}/metrics", timeout=5).read().decode()
    except OSError:
        return -1
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and match in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(check, what: str, limit: float = 15.0) -> None:
    end = time.time() + limit
    while time.time() < end:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def call_many(url: str, n: int, key: str = KEY) -> tuple[int, int, list[str]]:
    """n calls of `add` on one SDK session: (admitted, rate limited, other errors)."""
    ok = limited = 0
    other: list[str] = []
    async with streamablehttp_client(url, headers={"Authorization": f"Bearer {key}"}) as (r, w, _):
        async with ClientSession(r, w) as s:
            await s.initialize()
            for i in range(n):
                try:
                    res = await s.call_tool("add", {"a": i, "b": 1})
                    assert not res.isError, res
                    assert res.structuredContent == {"result": i + 1}, res
                    ok += 1
                except Exception as e:  # the SDK raises the JSON-RPC error of a refused call
                    if "rate limited" in str(e):
                        limited += 1
                    else:
                        other.append(str(e))
    return ok, limited, other


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path)
    yield r
    if r.proc.poll() is None:
        r.kill()


def test_burst_holds_fleet_wide_and_the_session_moves_between_replicas(tmp_path, upstream, redis):
    fleet = Fleet(tmp_path, upstream, redis, tool_rate="{ per_hour = 1, burst = 20 }")
    try:
        ok, limited, other = asyncio.run(call_many(fleet.haproxy.url, 60))
        assert other == []
        # 20 (±1) of 60 fleet-wide, where each replica alone would admit 20.
        assert 19 <= ok <= 21, (ok, limited)
        assert ok + limited == 60
        # Every replica served part of the one session.
        per_replica = [metric(r, "scopegate_requests_total", 'method="tools/call"') for r in fleet.replicas]
        assert all(n >= 10 for n in per_replica), per_replica
        assert sum(per_replica) == 60
        # A refused call never reached the upstream.
        assert len([e for e in upstream.executions() if e.get("tool") == "add"]) == ok
        # The limit's state is in Redis, under the limit's key.
        keys = subprocess.run(["redis-cli", "-p", str(redis.port), "--scan"], capture_output=True,
                              text=True).stdout.split()
        assert "scopegate:rl:tool/bot/files/add" in keys, keys
    finally:
        fleet.stop()


def sg_load(url: str, seconds: int, connections: int = 12, kill_after: tuple[float, object] | None = None) -> dict:
    args = [SG_LOAD, "--url", url, "--keys", KEY, "--connections", str(connections), "--duration", str(seconds),
            "--warmup", "1", "--mix", "call=100", "--tool", "add", "--args", '{"a":1,"b":2}', "--json"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after:
        delay, victim = kill_after
        threading.Timer(delay, lambda: victim.proc.send_signal(signal.SIGKILL)).start()
    out, err = proc.communicate(timeout=seconds + 60)
    assert proc.returncode == 0, err
    return json.loads(out)


def admitted(calls: dict) -> int:
    """Calls answered by the upstream (as JSON or as an event stream)."""
    return calls.get("ok", 0) + calls.get("ok_sse", 0)


def test_a_rate_limit_holds_within_5_percent_under_load_over_three_replicas(tmp_path, upstream, redis):
    fleet = Fleet(tmp_path, upstream, redis, agent_rate="{ per_second = 100, burst = 20 }")
    try:
        report = sg_load(fleet.haproxy.url, 10)
        calls = report["outcomes"]["call"]
        expected = 100 * report["seconds"]
        # Far more was asked than the limit: the refusals prove the limit was the bound.
        assert calls.get("rate_limited", 0) > admitted(calls), report
        assert abs(admitted(calls) - expected) <= 0.05 * expected, (report, expected)
        # Each replica leased part of it, from the one bucket.
        leased = [metric(r, "scopegate_ratelimit_leased_tokens_total") for r in fleet.replicas]
        assert all(n > 100 for n in leased), leased
        assert all(metric(r, "scopegate_ratelimit_fallback_total") == 0 for r in fleet.replicas)
    finally:
        fleet.stop()


def test_a_killed_replica_costs_only_its_lease(tmp_path, upstream, redis):
    fleet = Fleet(tmp_path, upstream, redis, agent_rate="{ per_second = 100, burst = 20 }")
    victim = fleet.replicas[2]
    try:
        report = sg_load(fleet.haproxy.url, 8, kill_after=(4.0, victim))
        assert victim.proc.wait(timeout=10) == -signal.SIGKILL
        calls = report["outcomes"]["call"]
        expected = 100 * report["seconds"]
        # The survivors go on spending the same bucket: the fleet's total still holds, and no
        # more than the lease the dead replica held was lost.
        assert abs(admitted(calls) - expected) <= 0.05 * expected, (report, expected)
        # The dead replica drops out of the count, so the survivors' leases and fallback share
        # are sized for two.
        wait_until(lambda: all(metric(r, "scopegate_redis_replicas") == 2 for r in fleet.replicas[:2]),
                   "the replica count to drop to 2")
    finally:
        fleet.stop()


def test_redis_killed_local_fallback_then_recovery(tmp_path, upstream, redis):
    fleet = Fleet(tmp_path, upstream, redis, tool_rate="{ per_hour = 1, burst = 30 }")
    try:
        ok, _, other = asyncio.run(call_many(fleet.haproxy.url, 9))
        assert (ok, other) == (9, [])
        redis.kill()
        wait_until(lambda: all(metric(r, "scopegate_redis_up") == 0 for r in fleet.replicas), "redis_up 0")
        # Each replica enforces its share: a third of the burst each, 30 in all.
        ok, limited, other = asyncio.run(call_many(fleet.haproxy.url, 60))
        assert other == []
        assert 28 <= ok <= 33, (ok, limited)
        assert all(metric(r, "scopegate_ratelimit_fallback_total") > 0 for r in fleet.replicas)
        # Logged once per replica, with what happens meanwhile.
        for r in fleet.replicas:
            down = [line for line in r.lines if "unreachable" in line]
            assert len(down) == 1, down
            assert "SCOPEGATE_REDIS_FALLBACK=local" in down[0]
        redis.start()
        wait_until(lambda: all(metric(r, "scopegate_redis_up") == 1 for r in fleet.replicas), "redis_up 1")
        # Fleet-wide again: the restarted Redis starts with a full bucket of 30.
        ok, limited, other = asyncio.run(call_many(fleet.haproxy.url, 45))
        assert other == []
        assert 29 <= ok <= 31, (ok, limited)
        for r in fleet.replicas:
            assert sum("reachable: rate limits are fleet-wide" in line for line in r.lines) == 2, r.log()
    finally:
        fleet.stop()


def test_redis_killed_closed_fallback_refuses_limited_calls_only(tmp_path, upstream, redis):
    fleet = Fleet(tmp_path, upstream, redis, replicas=1, fallback="closed",
                  agent_rate="{ per_second = 50, burst = 50 }")
    gw = fleet.replicas[0]
    url = f"{gw.base}/mcp/files"
    try:
        assert asyncio.run(call_many(url, 5))[:2] == (5, 0)
        redis.kill()
        wait_until(lambda: metric(gw, "scopegate_redis_up") == 0, "redis_up 0")

        async def refused_with_reason():
            async with streamablehttp_client(url, headers={"Authorization": f"Bearer {FREE_KEY}"}) as (r, w, _):
                async with ClientSession(r, w) as free:
                    await free.initialize()
                    # No limit covers this agent: its calls never wait on the dead Redis.
                    for i in range(20):
                        res = await free.call_tool("add", {"a": i, "b": 1})
                        assert res.structuredContent == {"result": i + 1}
            import httpx

            answers = []
            async with httpx.AsyncClient() as http:
                for i in range(6):
                    r = await http.post(url, headers={"Authorization": f"Bearer {KEY}",
                                                      "Accept": "application/json, text/event-stream"},
                                        json={"jsonrpc": "2.0", "id": i, "method": "tools/call",
                                              "params": {"name": "add", "arguments": {"a": 1, "b": 2}}})
                    answers.append(r.json())
            return answers

        answers = asyncio.run(refused_with_reason())
        # Tokens Redis granted before it died (the lease: one token at this rate, at most a
        # couple) are spent first; then every limited call is refused.
        refused = [a for a in answers if a.get("error", {}).get("code") == -32007]
        assert len(refused) >= 4 and answers[-1] in refused, answers
        answer = answers[-1]
        message = answer["error"]["message"]
        assert answer["error"]["code"] == -32007, answer
        assert "Redis is unreachable" in message and "SCOPEGATE_REDIS_FALLBACK=closed" in message, message
        redis.start()
        wait_until(lambda: metric(gw, "scopegate_redis_up") == 1, "redis_up 1")
        assert asyncio.run(call_many(url, 5))[:2] == (5, 0)
    finally:
        fleet.stop()


def test_flushed_scripts_are_loaded_again(tmp_path, upstream, redis):
    fleet = Fleet(tmp_path, upstream, redis, replicas=1, agent_rate="{ per_second = 1000, burst = 1000 }")
    gw = fleet.replicas[0]
    url = f"{gw.base}/mcp/files"
    try:
        assert asyncio.run(call_many(url, 3))[:2] == (3, 0)
        subprocess.run(["redis-cli", "-p", str(redis.port), "script", "flush"], check=True, capture_output=True)
        # The next script call meets NOSCRIPT: the link reconnects (loading the scripts again)
        # while the calls go on under the local share.
        assert asyncio.run(call_many(url, 10))[:2] == (10, 0)
        wait_until(lambda: 'unreachable (it answered "NOSCRIPT' in gw.log(), "the NOSCRIPT reconnect")
        wait_until(lambda: metric(gw, "scopegate_redis_up") == 1, "redis_up 1")
        before = redis.commands().get("evalsha", 0)
        assert asyncio.run(call_many(url, 3))[:2] == (3, 0)
        wait_until(lambda: redis.commands().get("evalsha", 0) > before, "script calls to succeed again")
    finally:
        fleet.stop()


def test_rediss_with_a_password_and_a_database(tmp_path, upstream):
    import certs

    tls_dir = certs.make_all(tmp_path / "certs")
    redis = Redis(tmp_path, tls=True, extra=[
        "--tls-cert-file", str(tls_dir / "server.pem"), "--tls-key-file", str(tls_dir / "server.key"),
        "--tls-ca-cert-file", str(tls_dir / "ca.pem"), "--tls-auth-clients", "no",
        "--requirepass", "s3cret:pass"])
    url = f"rediss://:s3cret%3Apass@localhost:{redis.port}/2"
    fleet = Fleet(tmp_path, upstream, redis, replicas=1, tool_rate="{ per_hour = 1, burst = 5 }",
                  redis_env={"SCOPEGATE_REDIS_URL": url, "SCOPEGATE_REDIS_CA_FILE": str(tls_dir / "ca.pem")})
    gw = fleet.replicas[0]
    try:
        ok, limited, other = asyncio.run(call_many(f"{gw.base}/mcp/files", 8))
        assert (ok, limited, other) == (5, 3, [])
        keys = redis_cli(redis, "-n", "2", "--scan", tls_dir=tls_dir, password="s3cret:pass").split()
        assert "scopegate:rl:tool/bot/files/add" in keys, keys
        assert "s3cret" not in gw.log()
    finally:
        fleet.stop()
        redis.kill()


def test_a_wrong_password_or_an_untrusted_server_is_logged_and_limits_fall_back(tmp_path, upstream):
    import certs

    tls_dir = certs.make_all(tmp_path / "certs")
    redis = Redis(tmp_path, tls=True, extra=[
        "--tls-cert-file", str(tls_dir / "rogue.pem"), "--tls-key-file", str(tls_dir / "rogue.key"),
        "--tls-auth-clients", "no"])
    plain = Redis(tmp_path, extra=["--requirepass", "right"])
    try:
        for url, says in [
            (f"rediss://localhost:{redis.port}", "TLS handshake"),
            (f"redis://:Wr0ngPa55@127.0.0.1:{plain.port}", "AUTH: WRONGPASS"),
        ]:
            env = {"SCOPEGATE_REDIS_URL": url}
            if url.startswith("rediss"):
                env["SCOPEGATE_REDIS_CA_FILE"] = str(tls_dir / "ca.pem")
            fleet = Fleet(tmp_path, upstream, redis, replicas=1, tool_rate="{ per_hour = 1, burst = 6 }",
                          redis_env=env, wait=False)
            gw = fleet.replicas[0]
            try:
                wait_until(lambda: "unreachable" in gw.log(), "the failure to be logged")
                down = [line for line in gw.lines if "unreachable" in line]
                assert len(down) == 1 and says in down[0], down
                assert "Wr0ngPa55" not in gw.log()
                # One replica counted: its share is the whole limit.
                ok, limited, other = asyncio.run(call_many(f"{gw.base}/mcp/files", 8))
                assert (ok, limited, other) == (6, 2, [])
                assert metric(gw, "scopegate_redis_up") == 0
            finally:
                fleet.stop()
    finally:
        redis.kill()
        plain.kill()


def test_a_hung_redis_does_not_hang_calls(tmp_path, upstream, redis):
    """Redis stopped (SIGSTOP): connections stay open but nothing answers. Calls go on under the
    local share after at most the timeout; when Redis resumes, limits are fleet-wide again."""
    fleet = Fleet(tmp_path, upstream, redis, replicas=1, agent_rate="{ per_second = 1000, burst = 1000 }")
    gw = fleet.replicas[0]
    url = f"{gw.base}/mcp/files"
    try:
        assert asyncio.run(call_many(url, 3))[:2] == (3, 0)
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            assert asyncio.run(call_many(url, 20))[:2] == (20, 0)
            wait_until(lambda: "unreachable (no reply in time)" in gw.log(), "the hang to be noticed")
            assert metric(gw, "scopegate_ratelimit_fallback_total") > 0
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: metric(gw, "scopegate_redis_up") == 1, "redis_up 1")
        assert asyncio.run(call_many(url, 3))[:2] == (3, 0)
    finally:
        fleet.stop()
