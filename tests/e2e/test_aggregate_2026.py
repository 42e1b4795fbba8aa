"""The aggregate endpoint in 2026-07-28 (issue 16, item 4): the official Python SDK 2.x agent
negotiates the sessionless revision on /mcp over two 2.x upstreams (server/discover merged,
each message routed on its own, input_required carried back, subscriptions/listen fanned in);
one upstream of an older revision (npm server-everything, which nobody here wrote) sends it to
initialize instead, without an `invalid` audit entry; older clients keep working; routing
headers that disagree with the body are refused with the revision's code."""

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import SDK2_PYTHON, Scopegate, Upstream, free_port, sha256_hex, wait_for_port
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

HERE = Path(__file__).parent
KEY = "e2e-2026-agent-key-0123456789"
LIMITED_KEY = "e2e-2026-limited-key-0123456789"
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}}


def sdk2_upstream(tmp_path, name):
    return Upstream(tmp_path, name, script="sdk2_upstream.py", python=SDK2_PYTHON, args=(name,))


def gateway(tmp_path, upstreams: dict[str, str]) -> Scopegate:
    blocks = "".join(f'[[upstream]]\nname = "{n}"\nurl = "{u}"\n\n' for n, u in upstreams.items())
    names = list(upstreams)
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""{blocks}
[[agent]]
id = "bot"
key_sha256 = "{sha256_hex(KEY)}"
allow = [{", ".join(f'"{n}/*"' for n in names)}]

[[agent]]
id = "limited"
key_sha256 = "{sha256_hex(LIMITED_KEY)}"
allow = ["{names[0]}/*", "{names[1]}/echo"]
""")
    return Scopegate({
        "SCOPEGATE_POLICY": str(policy),
        "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e",
        "SCOPEGATE_AUDIT_DIR": str(tmp_path / "audit"),
        "SCOPEGATE_AUDIT_FLUSH_MS": "20",
    })


def audit(tmp_path) -> list[dict]:
    entries = []
    for f in sorted((tmp_path / "audit").glob("*.jsonl")):
        entries += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return entries


def ran(upstream) -> list[dict]:
    """The tools an upstream executed (its log also counts the lists it answered)."""
    return [e for e in upstream.executions() if not e["tool"].startswith("<")]


def lists_answered(upstream) -> int:
    return sum(e["tool"] == "<tools/list>" for e in upstream.executions())


def agent(script: str, *args: str) -> dict:
    out = subprocess.run([SDK2_PYTHON, str(HERE / script), *args], capture_output=True, text=True,
                         timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture
def modern(tmp_path):
    alpha, beta = sdk2_upstream(tmp_path, "alpha"), sdk2_upstream(tmp_path, "beta")
    gw = gateway(tmp_path, {"alpha": alpha.url, "beta": beta.url})
    yield {"gw": gw, "alpha": alpha, "beta": beta, "tmp": tmp_path}
    gw.stop()
    alpha.stop()
    beta.stop()


def test_sdk2_agent_speaks_2026_07_28_on_the_aggregate(modern):
    gw, alpha, beta = modern["gw"], modern["alpha"], modern["beta"]
    report = agent("sdk2_aggregate_agent.py", f"{gw.base}/mcp", KEY, "alpha", "listen")
    assert report["version"] == "2026-07-28", report
    assert report["tools"] == ["alpha__confirm", "alpha__echo", "alpha__touch",
                               "beta__confirm", "beta__echo", "beta__touch"]
    assert report["resources"] == ["scopegate://alpha/memo://note", "scopegate://beta/memo://note"]
    assert report["echo"] == "alpha: hello"
    # input_required: the elicitation the upstream asked for went to the agent, and its answer
    # (with the upstream's requestState) came back to the same upstream.
    assert report["confirm"] == "alpha deploy: ok=True state=alpha:deploy"
    rounds = [e for e in ran(alpha) if e["tool"] == "confirm"]
    assert [e["args"]["round"] for e in rounds] == [1, 2]
    assert report["read"] == "the note of alpha"
    # subscriptions/listen fanned in: one acknowledgement, the URI in /mcp's names, and the
    # events of alpha's touch relayed with the URI scoped.
    assert report["honored"] == {"toolsListChanged": True,
                                 "resourceSubscriptions": ["scopegate://alpha/memo://note"]}
    assert report["events"] == ["ResourceUpdated:scopegate://alpha/memo://note", "ToolsListChanged:"]
    # Sessionless upstream requests in the upstream's own names, with routing headers that
    # match what it executes, and never the agent's credential.
    echo = next(e for e in ran(alpha) if e["tool"] == "echo")
    assert echo["version"] == "2026-07-28"
    headers = echo["headers"]
    assert (headers["mcp-method"], headers["mcp-name"]) == ("tools/call", "echo")
    assert "authorization" not in headers and "mcp-session-id" not in headers
    assert ran(beta) == []
    # A normal negotiation is not an error in the audit log.
    entries = audit(modern["tmp"])
    assert entries and not [e for e in entries if e.get("decision") == "invalid"], entries


def test_sdk2_agent_sees_only_its_tools_and_refusals_never_reach_the_upstream(modern):
    gw, beta = modern["gw"], modern["beta"]
    report = agent("sdk2_agent.py", f"{gw.base}/mcp", LIMITED_KEY, "beta__echo", '{"text": "x"}')
    assert report["version"] == "2026-07-28"
    assert report["tools"] == ["alpha__confirm", "alpha__echo", "alpha__touch", "beta__echo"]
    assert report["result"] == "beta: x"
    headers = {"Authorization": f"Bearer {LIMITED_KEY}", "MCP-Protocol-Version": "2026-07-28",
               "Accept": "application/json, text/event-stream", "Mcp-Method": "tools/call",
               "Mcp-Name": "beta__touch"}
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": "beta__touch", "arguments": {}, "_meta": META}}
    r = httpx.post(f"{gw.base}/mcp", json=body, headers=headers, timeout=10)
    assert r.json()["error"]["code"] == -32004, r.text
    assert [e["tool"] for e in ran(beta)] == ["echo"]


def test_routing_headers_that_disagree_with_the_body_are_refused(modern):
    gw, alpha = modern["gw"], modern["alpha"]
    url = f"{gw.base}/mcp"
    base = {"Authorization": f"Bearer {KEY}", "MCP-Protocol-Version": "2026-07-28",
            "Accept": "application/json, text/event-stream"}
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "alpha__echo", "arguments": {"text": "t"}, "_meta": META}}

    def post(extra: dict, body=call, raw_headers=None):
        headers = [*base.items(), *extra.items(), *(raw_headers or [])]
        return httpx.post(url, content=json.dumps(body), headers=headers, timeout=10)

    cases = {
        "name names another tool": {"Mcp-Method": "tools/call", "Mcp-Name": "beta__echo"},
        "method differs": {"Mcp-Method": "tools/list", "Mcp-Name": "alpha__echo"},
        "no Mcp-Method": {"Mcp-Name": "alpha__echo"},
        "no Mcp-Name": {"Mcp-Method": "tools/call"},
        "malformed sentinel": {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?***?="},
    }
    for why, extra in cases.items():
        r = post(extra)
        assert r.status_code == 400, (why, r.text)
        assert r.json()["error"]["code"] == -32020, (why, r.text)
    r = post({"Mcp-Method": "tools/call", "Mcp-Name": "alpha__echo"},
             raw_headers=[("Mcp-Param-Region", "eu"), ("mcp-param-region", "us")])
    assert (r.status_code, r.json()["error"]["code"]) == (400, -32020)
    assert ran(alpha) == [], "nothing refused reached the upstream"
    # The name sentinel-encoded is the same name; the upstream is sent its own name.
    r = post({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?YWxwaGFfX2VjaG8=?="})
    assert r.status_code == 200 and "alpha: t" in r.text, r.text
    assert ran(alpha)[0]["headers"]["mcp-name"] == "echo"
    # No session and no GET stream in 2026-07-28.
    r = httpx.get(url, headers=base, timeout=10)
    assert r.status_code == 405 and "subscriptions/listen" in r.text
    # A revision no upstream serves is the revision's error, naming the ones served.
    probe = {"jsonrpc": "2.0", "id": 2, "method": "server/discover",
             "params": {"_meta": {**META, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}}}
    r = httpx.post(url, json=probe, headers={**base, "MCP-Protocol-Version": "2099-01-01",
                                              "Mcp-Method": "server/discover"}, timeout=10)
    data = r.json()["error"]
    assert (r.status_code, data["code"]) == (400, -32022), r.text
    assert "2026-07-28" in data["data"]["supported"]


def test_sdk1_client_keeps_working_over_2026_upstreams(modern):
    gw = modern["gw"]

    async def scenario():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with streamablehttp_client(f"{gw.base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                tools = sorted(t.name for t in (await session.list_tools()).tools)
                result = await session.call_tool("beta__echo", {"text": "old"})
                return init.protocolVersion, tools, result.content[0].text

    version, tools, text = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert version != "2026-07-28"
    assert "alpha__echo" in tools and "beta__touch" in tools
    assert text == "beta: old"


@pytest.fixture
def mixed(tmp_path):
    everything = (HERE / "node" / "node_modules" / "@modelcontextprotocol" / "server-everything"
                  / "dist" / "index.js")
    port = free_port()
    server = subprocess.Popen([shutil.which("node") or "node", str(everything), "streamableHttp"],
                              env={**os.environ, "PORT": str(port)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    alpha = sdk2_upstream(tmp_path, "alpha")
    gw = None
    try:
        wait_for_port(port)
        gw = gateway(tmp_path, {"alpha": alpha.url, "everything": f"http://127.0.0.1:{port}/mcp"})
        yield {"gw": gw, "alpha": alpha, "tmp": tmp_path}
    finally:
        if gw:
            gw.stop()
        alpha.stop()
        server.terminate()
        server.wait(timeout=10)


def test_one_older_upstream_sends_the_sdk2_agent_to_initialize(mixed):
    gw, alpha = mixed["gw"], mixed["alpha"]
    report = agent("sdk2_agent.py", f"{gw.base}/mcp", KEY, "everything__echo", '{"message": "mixed"}')
    assert report["version"] != "2026-07-28", report
    assert "alpha__echo" in report["tools"] and "everything__echo" in report["tools"]
    assert "mixed" in report["result"]
    report = agent("sdk2_agent.py", f"{gw.base}/mcp", KEY, "alpha__echo", '{"text": "both"}')
    assert report["result"] == "alpha: both"
    assert [e["tool"] for e in ran(alpha)] == ["echo"]
    entries = audit(mixed["tmp"])
    assert entries and not [e for e in entries if e.get("decision") == "invalid"], entries


def metric(gw, name: str, labels: str) -> float:
    text = httpx.get(f"{gw.base}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{{labels}}} not in /metrics")


def test_public_lists_are_fetched_once_per_ttl_and_refetched_after_list_changed(modern):
    """Issue 16, item 5: upstream lists marked public (ttlMs 60 s) are cached per core and
    filtered per agent; a thousand agent lists cost at most one upstream list per core, and an
    upstream's list_changed, relayed on any core, ends the cached copies."""
    import threading

    gw, alpha, beta = modern["gw"], modern["alpha"], modern["beta"]
    url = f"{gw.base}/mcp"

    def headers(key, method):
        return {"Authorization": f"Bearer {key}", "MCP-Protocol-Version": "2026-07-28",
                "Accept": "application/json, text/event-stream", "Mcp-Method": method}

    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}}
    calls = 1000
    seen = {KEY: set(), LIMITED_KEY: set()}
    # One keep-alive connection: one core serves every list (the other serves the stream).
    http = httpx.Client(timeout=10)
    for n in range(calls):
        key = KEY if n % 2 else LIMITED_KEY
        r = http.post(url, json=body, headers=headers(key, "tools/list"))
        result = r.json()["result"]
        assert (result["cacheScope"], result["resultType"]) == ("private", "complete")
        assert 0 < result["ttlMs"] <= 60_000
        seen[key].add(tuple(sorted(t["name"] for t in result["tools"])))
    # Each agent saw its own filtered list every time.
    assert seen[KEY] == {("alpha__confirm", "alpha__echo", "alpha__touch",
                          "beta__confirm", "beta__echo", "beta__touch")}
    assert seen[LIMITED_KEY] == {("alpha__confirm", "alpha__echo", "alpha__touch", "beta__echo")}
    upstream_lists = lists_answered(alpha) + lists_answered(beta)
    print(f"\n{calls} agent tools/list over 2 upstreams -> {upstream_lists} upstream tools/list "
          f"({upstream_lists / 2 / calls * 1000:.1f} per upstream per 1,000 agent lists; 2 cores)")
    assert lists_answered(alpha) == 1 and lists_answered(beta) == 1
    assert metric(gw, "scopegate_aggregate_list_pages_total", 'result="hit"') >= 2 * calls - 4

    # alpha announces a change on a subscriptions/listen stream relayed by scopegate (on its own
    # connection, perhaps on the other core): the next list asks alpha again, and only alpha.
    before_alpha, before_beta = lists_answered(alpha), lists_answered(beta)
    changed = threading.Event()
    acked = threading.Event()

    def listen():
        listen_body = {"jsonrpc": "2.0", "id": "l1", "method": "subscriptions/listen",
                       "params": {"_meta": META, "notifications": {"toolsListChanged": True}}}
        with httpx.stream("POST", url, json=listen_body,
                          headers=headers(KEY, "subscriptions/listen"), timeout=30) as r:
            for line in r.iter_lines():
                if "subscriptions/acknowledged" in line:
                    acked.set()
                if "tools/list_changed" in line:
                    changed.set()
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert acked.wait(15)
    touch = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
             "params": {"name": "alpha__touch", "arguments": {}, "_meta": META}}
    h = {**headers(KEY, "tools/call"), "Mcp-Name": "alpha__touch"}
    assert httpx.post(url, json=touch, headers=h, timeout=10).status_code == 200
    assert changed.wait(15), "the list_changed reached the agent"
    for _ in range(4):
        http.post(url, json=body, headers=headers(KEY, "tools/list"))
    http.close()
    assert lists_answered(alpha) == before_alpha + 1, "asked again once, then cached"
    assert lists_answered(beta) == before_beta

