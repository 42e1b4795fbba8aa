"""What operators read (issue 17): accounting where every label names something."""

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import SDK2_PYTHON, Scopegate, Upstream, sha256_hex
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).parent
KEY = "e2e-operator-key-0123456789"


def test_every_metric_label_names_something_and_a_version_probe_is_no_error(tmp_path):
    files, maths = Upstream(tmp_path, "files"), Upstream(tmp_path, "maths")
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[[upstream]]
name = "files"
url = "{files.url}"

[[upstream]]
name = "maths"
url = "{maths.url}"

[[agent]]
id = "bot"
key_sha256 = "{sha256_hex(KEY)}"
allow = ["files/*", "maths/*"]
""")
    gw = Scopegate({"SCOPEGATE_POLICY": str(policy),
                    "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e",
                    "SCOPEGATE_AUDIT_DIR": str(tmp_path / "audit"), "SCOPEGATE_AUDIT_FLUSH_MS": "20"})
    try:
        async def session(url):
            headers = {"Authorization": f"Bearer {KEY}"}
            async with streamablehttp_client(url, headers=headers) as (read, write, _):
                async with ClientSession(read, write) as s:
                    await s.initialize()
                    await s.list_tools()
                    await asyncio.sleep(0.3)  # the SDK opens its GET stream
                    return (await s.call_tool("files__add" if url.endswith("/mcp") else "add",
                                              {"a": 1, "b": 2})).content[0].text

        assert asyncio.run(session(f"{gw.base}/mcp")) == "3"
        assert asyncio.run(session(f"{gw.base}/mcp/files")) == "3"
        # The Python SDK 2.x probes server/discover first, on both endpoints.
        for url, tool in ((f"{gw.base}/mcp", "maths__add"), (f"{gw.base}/mcp/maths", "add")):
            out = subprocess.run([SDK2_PYTHON, str(HERE / "sdk2_agent.py"), url, KEY, tool,
                                  '{"a": 2, "b": 2}'], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr[-2000:]
            assert json.loads(out.stdout)["result"] == "4"
        httpx.get(f"{gw.base}/mcp", timeout=5)  # refused before routing: no key
        time.sleep(0.3)
        samples = [s for f in text_string_to_metric_families(httpx.get(f"{gw.base}/metrics").text)
                   for s in f.samples if s.name == "scopegate_requests_total"]
        labels = {(s.labels["method"], s.labels["upstream"]) for s in samples}
        assert all(m and u for m, u in labels), labels
        methods = {m for m, _ in labels}
        upstreams = {u for _, u in labels}
        assert {"GET", "DELETE", "server/discover", "initialize"} <= methods, methods
        assert {"files", "maths", "(aggregate)", "(none)"} <= upstreams, upstreams
        invalid = [s for s in samples if s.labels["decision"] == "invalid"]
        assert invalid == [], invalid
        entries = [json.loads(line) for f in (tmp_path / "audit").glob("*.jsonl")
                   for line in f.read_text().splitlines()]
        probes = [e for e in entries if e.get("method") == "server/discover"]
        assert len(probes) == 2 and {e["decision"] for e in probes} == {"allowed"}, probes
    finally:
        gw.stop()
        files.stop()
        maths.stop()


def test_a_legacy_sse_server_is_refused_at_start_or_named_in_the_log(tmp_path):
    """Issue 17, item 8, against FastMCP (Python SDK 1.x) serving the legacy HTTP+SSE
    transport: a URL at its /sse endpoint is refused at start saying what to do; one at
    another path is told in the log the first time the server refuses a POST."""
    import os
    import sys

    from conftest import SCOPEGATE, free_port, wait_for_port

    def legacy(path):
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(HERE / "fastmcp_upstream.py"), str(port),
                                 str(tmp_path / f"legacy{port}.jsonl")],
                                env={**os.environ, "E2E_LEGACY_SSE_PATH": path},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port)
        return proc, port

    proc, port = legacy("/sse")
    try:
        # The server really is a legacy one: its /sse is a GET stream announcing an endpoint.
        with httpx.stream("GET", f"http://127.0.0.1:{port}/sse", timeout=10) as r:
            first = next(r.iter_lines())
        assert first == "event: endpoint", first
        out = subprocess.run([SCOPEGATE], env={
            "PATH": os.environ["PATH"], "SCOPEGATE_LISTEN": "127.0.0.1:0",
            "SCOPEGATE_INSECURE_OPEN": "1",
            "SCOPEGATE_UPSTREAMS": f"old=http://127.0.0.1:{port}/sse"},
            capture_output=True, text=True, timeout=20)
        assert out.returncode == 2, out.stderr
        assert "legacy HTTP+SSE" in out.stderr and "stdio upstream" in out.stderr, out.stderr
        assert "SCOPEGATE_UPSTREAMS" in out.stderr, out.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    proc, port = legacy("/events")
    gw = Scopegate({"SCOPEGATE_INSECURE_OPEN": "1",
                    "SCOPEGATE_UPSTREAMS": f"old=http://127.0.0.1:{port}/events"})
    try:
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}}
        for _ in range(3):
            r = httpx.post(f"{gw.base}/mcp", json=init, timeout=10,
                           headers={"Accept": "application/json, text/event-stream"})
            assert r.status_code == 405  # the server's own answer, relayed
        time.sleep(0.3)
        said = [line for line in gw.log().splitlines() if "legacy HTTP+SSE" in line]
        assert len(said) == 1, gw.log()
        assert "refused POST (405" in said[0] and "Streamable HTTP endpoint" in said[0]
    finally:
        gw.stop()
        proc.terminate()
        proc.wait(timeout=10)


def test_an_answer_the_running_call_waits_for_gets_in_during_drain(tmp_path):
    """Issue 17, item 7: SIGTERM while a call waits on the agent's answer to a sampling request
    (FastMCP asking the official Python SDK client's model): the answer's POST is taken, the call
    finishes, then scopegate exits 0; a new request in the meantime is 503."""
    import signal

    import mcp.types as types

    files = Upstream(tmp_path, "files")
    gw = Scopegate({"SCOPEGATE_INSECURE_OPEN": "1", "SCOPEGATE_UPSTREAMS": f"files={files.url}",
                    "SCOPEGATE_DRAIN_MS": "15000"})
    out = {}
    try:
        async def sample(context, params):
            gw.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # the drain has begun: idle connections are closed
            r = await asyncio.to_thread(
                httpx.post, f"{gw.base}/mcp", timeout=5,
                json={"jsonrpc": "2.0", "id": 99, "method": "tools/list"},
                headers={"Accept": "application/json, text/event-stream"})
            out["new request"] = r.status_code
            return types.CreateMessageResult(
                role="assistant", content=types.TextContent(type="text", text="42"),
                model="agent-side")

        async def scenario():
            async with streamablehttp_client(f"{gw.base}/mcp") as (read, write, _):
                async with ClientSession(read, write, sampling_callback=sample) as s:
                    await s.initialize()
                    # Listed first: the SDK checks a result against the tool's output schema,
                    # and would list the tools (a new request, refused while draining) to
                    # learn it.
                    await s.list_tools()
                    r = await s.call_tool("ask_model", {"question": "meaning?"})
                    out["result"] = r.content[0].text

        asyncio.run(asyncio.wait_for(scenario(), 30))
        assert out.get("result") == "the model said: 42", (out, gw.log())
        assert out["new request"] == 503, out
        assert gw.proc.wait(timeout=20) == 0
        assert "drained" in gw.log(), gw.log()
    finally:
        gw.stop()
        files.stop()


def test_access_log_and_refusals_in_the_log(tmp_path):
    """Issue 17, item 4: with SCOPEGATE_ACCESS_LOG=1 and SCOPEGATE_LOG_FORMAT=json, one JSON line
    per request (agent, method, tool, decision, status, microseconds); without it, refusals only,
    with their reason, and a flood of them is cut to a budget that says what it dropped."""
    files = Upstream(tmp_path, "files")
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[[upstream]]
name = "files"
url = "{files.url}"

[[agent]]
id = "bot"
key_sha256 = "{sha256_hex(KEY)}"
allow = ["files/add"]
""")
    base = {"SCOPEGATE_POLICY": str(policy), "SCOPEGATE_THREADS": "1",
            "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e"}
    headers = {"Authorization": f"Bearer {KEY}", "Accept": "application/json, text/event-stream"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "t", "version": "1"}}}

    def call(http, sid, n, tool):
        body = {"jsonrpc": "2.0", "id": n, "method": "tools/call",
                "params": {"name": tool, "arguments": {"a": 1, "b": 2}}}
        return http.post(f"{gw.base}/mcp", json=body, headers={**headers, "Mcp-Session-Id": sid})

    gw = Scopegate({**base, "SCOPEGATE_ACCESS_LOG": "1", "SCOPEGATE_LOG_FORMAT": "json"})
    try:
        with httpx.Client(timeout=10) as http:
            sid = http.post(f"{gw.base}/mcp", json=init, headers=headers).headers["mcp-session-id"]
            assert "3" in call(http, sid, 2, "add").text
            assert call(http, sid, 3, "delete_everything").json()["error"]["code"] == -32004
        time.sleep(0.3)
        lines = [json.loads(line) for line in gw.log().splitlines()]
        access = [e for e in lines if e["message"] == "access"]
        calls = [e for e in access if e.get("method") == "tools/call"]
        assert [(e["tool"], e["decision"], e["status"]) for e in calls] == [
            ("add", "allowed", 200), ("delete_everything", "denied", 200)], calls
        assert all(e["agent"] == "bot" and e["upstream"] == "files" and e["us"] > 0 for e in calls)
        assert "delete_everything" in calls[1]["reason"] or calls[1]["reason"], calls[1]
        assert any(e.get("method") == "initialize" for e in access)
    finally:
        gw.stop()

    gw = Scopegate(base)
    try:
        with httpx.Client(timeout=10) as http:
            sid = http.post(f"{gw.base}/mcp", json=init, headers=headers).headers["mcp-session-id"]
            call(http, sid, 2, "add")
            started = time.monotonic()
            for n in range(200):
                call(http, sid, 10 + n, "delete_everything")
            time.sleep(2.5)
            call(http, sid, 999, "delete_everything")
            elapsed = time.monotonic() - started
        time.sleep(0.3)
        refused = [line for line in gw.log().splitlines() if " INFO refused " in line]
        assert not [line for line in gw.log().splitlines() if " INFO access " in line]
        # A burst of 20, then 10 a second (one connection: one worker's budget), however long
        # the flood took on a busy machine.
        assert 20 <= len(refused) <= 20 + 10 * elapsed + 2, (len(refused), elapsed)
        assert len(refused) < 201, "the budget dropped nothing"
        assert "agent=bot" in refused[0] and "tool=delete_everything" in refused[0], refused[0]
        assert "decision=denied" in refused[0] and "reason=" in refused[0], refused[0]
        # The first line written after some were dropped says how many (on a slow machine that
        # may be a line during the flood, not the last one).
        told = [line for line in refused if "dropped_before=" in line]
        assert told, refused[-3:]
        assert all(int(line.split("dropped_before=")[1].split()[0]) > 0 for line in told), told
    finally:
        gw.stop()
        files.stop()


def test_trace_context_is_kept_end_to_end_with_a_span_for_the_hop(tmp_path):
    """Issue 17, item 5: an agent's W3C traceparent reaches the upstream (FastMCP's own log) in the
    same trace with scopegate's span id, whose parent is the agent's; the audit entry and the
    access line name trace and span; on /mcp/<upstream> and on /mcp; an invalid one is not
    passed on."""
    files, maths = Upstream(tmp_path, "files"), Upstream(tmp_path, "maths")
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[[upstream]]
name = "files"
url = "{files.url}"

[[upstream]]
name = "maths"
url = "{maths.url}"

[[agent]]
id = "bot"
key_sha256 = "{sha256_hex(KEY)}"
allow = ["files/*", "maths/*"]
""")
    gw = Scopegate({"SCOPEGATE_POLICY": str(policy), "SCOPEGATE_ACCESS_LOG": "1",
                    "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e",
                    "SCOPEGATE_AUDIT_DIR": str(tmp_path / "audit"), "SCOPEGATE_AUDIT_FLUSH_MS": "20"})
    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"Authorization": f"Bearer {KEY}", "Accept": "application/json, text/event-stream"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "t", "version": "1"}}}
    try:
        with httpx.Client(timeout=10) as http:
            for path, tool, upstream in (("/mcp/files", "add", files), ("/mcp", "maths__add", maths)):
                sid = http.post(f"{gw.base}{path}", json=init, headers=headers).headers["mcp-session-id"]
                call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                        "params": {"name": tool, "arguments": {"a": 1, "b": 2}}}
                r = http.post(f"{gw.base}{path}", json=call, headers={
                    **headers, "Mcp-Session-Id": sid, "traceparent": f"00-{trace}-{parent}-01",
                    "tracestate": "vendor=x"})
                assert "3" in r.text
                sent = upstream.executions()[-1]["headers"]
                version, tid, span, flags = sent["traceparent"].split("-")
                assert (version, tid, flags) == ("00", trace, "01"), sent
                assert span != parent and len(span) == 16, sent
                assert sent["tracestate"] == "vendor=x"
                time.sleep(0.3)
                entries = [json.loads(line) for f in (tmp_path / "audit").glob("*.jsonl")
                           for line in f.read_text().splitlines()]
                mine = [e for e in entries if e.get("span_id") == span]
                assert len(mine) == 1, entries
                assert (mine[0]["trace_id"], mine[0]["parent_span_id"]) == (trace, parent)
                assert mine[0]["method"] == "tools/call"
                assert any(f"trace_id={trace}" in line and f"span_id={span}" in line
                           for line in gw.log().splitlines() if " access " in line), gw.log()
            # An invalid traceparent is not passed on, nor the trace state that went with it.
            sid = http.post(f"{gw.base}/mcp/files", json=init, headers=headers).headers["mcp-session-id"]
            call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                    "params": {"name": "add", "arguments": {"a": 2, "b": 2}}}
            http.post(f"{gw.base}/mcp/files", json=call, headers={
                **headers, "Mcp-Session-Id": sid, "traceparent": "00-not-a-trace-01",
                "tracestate": "vendor=x"})
            sent = files.executions()[-1]["headers"]
            assert "traceparent" not in sent and "tracestate" not in sent, sent
    finally:
        gw.stop()
        files.stop()
        maths.stop()


def test_the_live_view_in_a_real_browser(tmp_path):
    """Issue 17, item 9: /admin in Debian's headless chromium shows live numbers after traffic
    (calls, refusals by reason, rate-limit hits, per-upstream latency, top agents and tools);
    its data and (SCOPEGATE_METRICS_AUTH=admin) /metrics want the admin token. The screenshot
    is kept in target/e2e-artifacts/live-view.png."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "scripts/test.sh installs Debian's chromium"
    files = Upstream(tmp_path, "files")
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[[upstream]]
name = "files"
url = "{files.url}"

[[agent]]
id = "bot"
key_sha256 = "{sha256_hex(KEY)}"
allow = ["files/add"]
rate = {{ per_minute = 60, burst = 5 }}
""")
    admin = "admin-token-0123456789abcdef"
    gw = Scopegate({"SCOPEGATE_POLICY": str(policy), "SCOPEGATE_ADMIN_TOKEN": admin,
                    "SCOPEGATE_METRICS_AUTH": "admin",
                    "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e",
                    "SCOPEGATE_AUDIT_DIR": str(tmp_path / "audit")})
    try:
        assert httpx.get(f"{gw.base}/admin/stats.json").status_code == 401
        assert httpx.get(f"{gw.base}/admin/stats.json",
                         headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        assert httpx.get(f"{gw.base}/metrics").status_code == 401
        bearer = {"Authorization": f"Bearer {admin}"}
        assert "scopegate_requests_total" in httpx.get(f"{gw.base}/metrics", headers=bearer).text
        headers = {"Authorization": f"Bearer {KEY}", "Accept": "application/json, text/event-stream"}
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}}
        with httpx.Client(timeout=10) as http:
            sid = http.post(f"{gw.base}/mcp", json=init, headers=headers).headers["mcp-session-id"]
            for n, tool in enumerate(["add", "add", "delete_everything", "add", "add", "add", "add"]):
                http.post(f"{gw.base}/mcp", headers={**headers, "Mcp-Session-Id": sid}, json={
                    "jsonrpc": "2.0", "id": 10 + n, "method": "tools/call",
                    "params": {"name": tool, "arguments": {"a": 1, "b": 2}}})
        stats = httpx.get(f"{gw.base}/admin/stats.json", headers=bearer).json()
        assert stats["calls"] == 7, stats
        assert stats["decisions"]["rate_limited"] >= 1 and stats["decisions"]["denied"] == 1, stats
        assert stats["agents"][0]["name"] == "bot", stats
        assert stats["tools"] == [{"name": "files/add", "count": 4}], stats  # calls that ran
        assert stats["upstreams"][0]["p50_ms"] is not None, stats

        url = f"{gw.base}/admin#token={admin}"
        common = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                  "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}",
                  "--virtual-time-budget=3000"]
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                             timeout=120).stdout
        assert '">live, ' in dom, dom[-3000:]
        assert "7 tools/call so far" in dom, dom[-3000:]
        assert "files/add" in dom and ">bot<" in dom, dom[-3000:]
        assert 'deny' in dom or 'allow (no match)' in dom, dom[-3000:]
        shots = Path(__file__).resolve().parents[2] / "target" / "e2e-artifacts"
        shots.mkdir(parents=True, exist_ok=True)
        shot = shots / "live-view.png"
        shot.unlink(missing_ok=True)
        subprocess.run([*common, "--window-size=1200,900", f"--screenshot={shot}", url],
                       capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 10_000, shot
    finally:
        gw.stop()
        files.stop()


@pytest.mark.parametrize("mode", ["policy", "open"])
def test_open_event_streams_end_at_a_drain_instead_of_holding_it(tmp_path, mode):
    """GET streams (one upstream, and the aggregate's merged one) stay open while idle; at
    SIGTERM they end properly within a second or so and the process exits, long before
    SCOPEGATE_DRAIN_MS: a stream no request waits on must not keep the listener open. (With a
    policy, the one-upstream stream is relayed event by event; without, byte by byte.)"""
    import signal
    import threading

    files, other = Upstream(tmp_path, "files"), Upstream(tmp_path, "other")
    env = {"SCOPEGATE_UPSTREAMS": f"files={files.url},other={other.url}", "SCOPEGATE_DRAIN_MS": "60000"}
    key = "drain-agent-key-0123456789"
    if mode == "policy":
        policy = tmp_path / "policy.toml"
        policy.write_text(f'[[agent]]\nid = "a"\nkey_sha256 = "{sha256_hex(key)}"\nallow = ["*/*"]\n')
        env["SCOPEGATE_POLICY"] = str(policy)
    else:
        env["SCOPEGATE_INSECURE_OPEN"] = "1"
    gw = Scopegate(env)
    ended: dict[str, str] = {}
    opened = threading.Barrier(3)
    try:
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}}
        accept = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {key}"}

        def stream(path: str):
            url = f"{gw.base}{path}"
            sid = httpx.post(url, json=init, headers=accept, timeout=10).headers["mcp-session-id"]
            h = {**accept, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-06-18"}
            httpx.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=h, timeout=10)
            try:
                with httpx.stream("GET", url, headers={**h, "Accept": "text/event-stream"}, timeout=30) as r:
                    assert r.status_code == 200, r.status_code
                    opened.wait(timeout=10)
                    for _ in r.iter_bytes():
                        pass
                ended[path] = "ended"
            except Exception as e:  # a reset instead of a proper end
                ended[path] = f"failed: {e!r}"

        threads = [threading.Thread(target=stream, args=(p,)) for p in ("/mcp/files", "/mcp")]
        for t in threads:
            t.start()
        opened.wait(timeout=10)
        time.sleep(0.5)
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=30) == 0
        took = time.monotonic() - started
        for t in threads:
            t.join(timeout=10)
        assert ended == {"/mcp/files": "ended", "/mcp": "ended"}, ended
        assert took < 20, f"the drain waited {took:.1f} s for open streams (SCOPEGATE_DRAIN_MS is 60 s)"
        assert "drained" in gw.log(), gw.log()
    finally:
        gw.stop()
        files.stop()
        other.stop()
