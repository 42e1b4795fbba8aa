"""What operators read (issue 17): accounting where every label names something."""

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx
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
