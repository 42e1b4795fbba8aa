"""Lists that stay true (issue 16, item 5): when a policy reload changes what an agent may see,
its open streams say so (notifications/*/list_changed), so the client lists again without
reconnecting; a reload that does not concern an agent tells it nothing; an agent removed from
the policy has its streams ended. On /mcp (the official Python SDK 1.x client's GET stream; a
2026-07-28 subscriptions/listen stream) and on /mcp/<upstream>."""

import asyncio
import json
import signal
import threading
import time

import httpx
import mcp.types as types
import pytest
from conftest import SDK2_PYTHON, Scopegate, Upstream, sha256_hex
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

KEY = "e2e-reload-agent-key-0123456789"
OTHER_KEY = "e2e-reload-other-key-0123456789"
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}}


def write_policy(path, upstreams, bot_allow, with_bot=True, other_allow='"files/*", "maths/*"',
                 bot_upstreams=None):
    text = "".join(f'[[upstream]]\nname = "{n}"\nurl = "{u}"\n\n' for n, u in upstreams.items())
    text += f'[[agent]]\nid = "other"\nkey_sha256 = "{sha256_hex(OTHER_KEY)}"\nallow = [{other_allow}]\n\n'
    if with_bot:
        text += f'[[agent]]\nid = "bot"\nkey_sha256 = "{sha256_hex(KEY)}"\nallow = [{bot_allow}]\n'
        if bot_upstreams is not None:
            text += f"upstreams = {json.dumps(bot_upstreams)}\n"
    path.write_text(text)


@pytest.fixture
def fleet(tmp_path):
    files, maths = Upstream(tmp_path, "files"), Upstream(tmp_path, "maths")
    ups = {"files": files.url, "maths": maths.url}
    policy = tmp_path / "policy.toml"
    write_policy(policy, ups, '"files/*", "maths/add"')
    gw = Scopegate({"SCOPEGATE_POLICY": str(policy),
                    "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e"})
    yield {"gw": gw, "policy": policy, "ups": ups}
    gw.stop()
    files.stop()
    maths.stop()


def reload(fx, bot_allow, **kw):
    write_policy(fx["policy"], fx["ups"], bot_allow, **kw)
    fx["gw"].proc.send_signal(signal.SIGHUP)


def wait_for(check, what, limit=15.0):
    end = time.time() + limit
    while time.time() < end:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sdk_client_lists_again_on_the_same_session_after_a_reload(fleet):
    gw = fleet["gw"]
    out = {}

    async def scenario():
        changed = asyncio.Event()

        async def on_message(message):
            if isinstance(message, types.ServerNotification) and isinstance(
                    message.root, types.ToolListChangedNotification):
                changed.set()

        headers = {"Authorization": f"Bearer {KEY}"}
        async with streamablehttp_client(f"{gw.base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write, message_handler=on_message) as session:
                await session.initialize()
                out["before"] = sorted(t.name for t in (await session.list_tools()).tools)
                await asyncio.sleep(0.5)  # the SDK's GET stream is open
                reload(fleet, '"files/*", "maths/*"')
                await asyncio.wait_for(changed.wait(), 15)
                out["after"] = sorted(t.name for t in (await session.list_tools()).tools)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert "maths__add" in out["before"] and "maths__stepwise" not in out["before"]
    assert "maths__stepwise" in out["after"], out


def test_a_listen_stream_is_told_only_what_concerns_its_agent(tmp_path):
    alpha = Upstream(tmp_path, "alpha", script="sdk2_upstream.py", python=SDK2_PYTHON, args=("alpha",))
    beta = Upstream(tmp_path, "beta", script="sdk2_upstream.py", python=SDK2_PYTHON, args=("beta",))
    ups = {"files": alpha.url, "maths": beta.url}
    policy = tmp_path / "policy.toml"
    write_policy(policy, ups, '"files/*"')
    gw = Scopegate({"SCOPEGATE_POLICY": str(policy),
                    "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e"})
    fx = {"gw": gw, "policy": policy, "ups": ups}
    try:
        streams = {}

        def listen(key, name):
            lines = streams.setdefault(name, [])
            body = {"jsonrpc": "2.0", "id": f"sub-{name}", "method": "subscriptions/listen",
                    "params": {"_meta": META, "notifications": {"toolsListChanged": True}}}
            headers = {"Authorization": f"Bearer {key}", "MCP-Protocol-Version": "2026-07-28",
                       "Accept": "application/json, text/event-stream",
                       "Mcp-Method": "subscriptions/listen"}
            try:
                with httpx.stream("POST", f"{gw.base}/mcp", json=body, headers=headers,
                                  timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data:"):
                            lines.append(json.loads(line[5:]))
            except httpx.HTTPError:
                pass
            lines.append("end")

        for key, name in ((KEY, "bot"), (OTHER_KEY, "other")):
            threading.Thread(target=listen, args=(key, name), daemon=True).start()
        acked = lambda name: any(isinstance(m, dict) and "acknowledged" in m.get("method", "")
                                 for m in streams.get(name, []))
        wait_for(lambda: acked("bot") and acked("other"), "both acknowledgements")
        changed = lambda name: [m for m in streams[name]
                                if isinstance(m, dict) and m.get("method") == "notifications/tools/list_changed"]
        # Only bot's rules change: bot is told (with its subscription id), other is not.
        reload(fx, '"files/*", "maths/echo"')
        wait_for(lambda: changed("bot"), "bot's list_changed")
        assert changed("bot")[0]["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "sub-bot"
        time.sleep(2.5)  # other's stream has looked at the reloaded policy at least twice
        assert changed("other") == []
        # bot loses the maths upstream: its stream is told, and from then on relays nothing
        # of maths (other's stream, on the same upstream, still gets maths' own list_changed).
        reload(fx, '"files/*", "maths/echo"', bot_upstreams=["files"])
        wait_for(lambda: len(changed("bot")) == 2, "bot's second list_changed")
        time.sleep(1.5)
        touch = {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                 "params": {"name": "maths__touch", "arguments": {}, "_meta": META}}
        r = httpx.post(f"{gw.base}/mcp", json=touch, timeout=10, headers={
            "Authorization": f"Bearer {OTHER_KEY}", "MCP-Protocol-Version": "2026-07-28",
            "Accept": "application/json, text/event-stream", "Mcp-Method": "tools/call",
            "Mcp-Name": "maths__touch"})
        assert r.status_code == 200, r.text
        wait_for(lambda: len(changed("other")) == 1, "maths' list_changed on other's stream")
        time.sleep(1.0)
        assert len(changed("bot")) == 2, streams["bot"]
        # bot removed from the policy: its stream ends; other's goes on.
        reload(fx, "", with_bot=False)
        wait_for(lambda: streams["bot"][-1] == "end", "bot's stream to end")
        assert streams["other"][-1] != "end"
    finally:
        gw.stop()
        alpha.stop()
        beta.stop()


def test_one_upstream_stream_is_told_too(fleet):
    """/mcp/<upstream>: the SDK client's GET stream through the plain forwarding path."""
    gw = fleet["gw"]
    out = {}

    async def scenario():
        changed = asyncio.Event()

        async def on_message(message):
            if isinstance(message, types.ServerNotification) and isinstance(
                    message.root, types.ToolListChangedNotification):
                changed.set()

        headers = {"Authorization": f"Bearer {KEY}"}
        async with streamablehttp_client(f"{gw.base}/mcp/maths", headers=headers) as (read, write, _):
            async with ClientSession(read, write, message_handler=on_message) as session:
                await session.initialize()
                out["before"] = sorted(t.name for t in (await session.list_tools()).tools)
                await asyncio.sleep(0.5)
                reload(fleet, '"files/*", "maths/add", "maths/stepwise"')
                await asyncio.wait_for(changed.wait(), 15)
                out["after"] = sorted(t.name for t in (await session.list_tools()).tools)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert out["before"] == ["add"]
    assert out["after"] == ["add", "stepwise"]


def test_a_reload_is_told_over_server_everything_too(tmp_path):
    """The aggregate over npm server-everything (streamable HTTP, which nobody here wrote) and
    a FastMCP upstream: widening the agent's rules on everything reaches the SDK client's open
    session as list_changed, and its next list has the new tools."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    from conftest import free_port, wait_for_port

    everything = (Path(__file__).parent / "node" / "node_modules" / "@modelcontextprotocol"
                  / "server-everything" / "dist" / "index.js")
    port = free_port()
    server = subprocess.Popen([shutil.which("node") or "node", str(everything), "streamableHttp"],
                              env={**os.environ, "PORT": str(port)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    files = Upstream(tmp_path, "files")
    gw = None
    try:
        wait_for_port(port)
        ups = {"files": files.url, "everything": f"http://127.0.0.1:{port}/mcp"}
        policy = tmp_path / "policy.toml"
        write_policy(policy, ups, '"files/add", "everything/echo"', other_allow='"files/*"')
        gw = Scopegate({"SCOPEGATE_POLICY": str(policy),
                        "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e"})
        fx = {"gw": gw, "policy": policy, "ups": ups}
        out = {}

        async def scenario():
            changed = asyncio.Event()

            async def on_message(message):
                if isinstance(message, types.ServerNotification) and isinstance(
                        message.root, types.ToolListChangedNotification):
                    changed.set()

            headers = {"Authorization": f"Bearer {KEY}"}
            async with streamablehttp_client(f"{gw.base}/mcp", headers=headers) as (read, write, _):
                async with ClientSession(read, write, message_handler=on_message) as session:
                    await session.initialize()
                    out["before"] = sorted(t.name for t in (await session.list_tools()).tools)
                    await asyncio.sleep(0.5)
                    reload(fx, '"files/add", "everything/*"', other_allow='"files/*"')
                    await asyncio.wait_for(changed.wait(), 15)
                    out["after"] = sorted(t.name for t in (await session.list_tools()).tools)

        asyncio.run(asyncio.wait_for(scenario(), 60))
        assert out["before"] == ["everything__echo", "files__add"], out
        assert len(out["after"]) > 3 and "everything__echo" in out["after"], out
    finally:
        if gw:
            gw.stop()
        files.stop()
        server.terminate()
        server.wait(timeout=10)

