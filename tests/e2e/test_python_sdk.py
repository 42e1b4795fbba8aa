"""The official Python MCP SDK as agent and as upstream, with scopegate between them."""

import asyncio

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_initialize_list_call_progress_and_delete(open_gateway, upstream, tmp_path):
    marker = tmp_path / "first-progress-arrived"
    progress: list[tuple[float, float | None, str | None]] = []
    session_ids: list[str] = []

    async def on_progress(value, total, message):
        progress.append((value, total, message))
        marker.touch()

    async def scenario():
        async with streamablehttp_client(f"{open_gateway.base}/mcp") as (read, write, get_session_id):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                assert init.serverInfo.name == "e2e-upstream"
                session_ids.append(get_session_id())

                tools = await session.list_tools()
                names = sorted(t.name for t in tools.tools)
                assert names == ["add", "ask_model", "delete_everything", "stepwise"]

                result = await session.call_tool("add", {"a": 2, "b": 40})
                assert not result.isError
                assert result.content[0].text == "42"

                result = await session.call_tool(
                    "stepwise", {"steps": 3, "marker": str(marker)}, progress_callback=on_progress
                )
                assert not result.isError, result
                # The tool waited for the client to see its first progress report: it could only
                # observe the marker if the report was relayed while it was still running.
                assert result.content[0].text == "done 3 steps; marker seen while running: True"

                # The same session and scopegate's keep-alive serve further calls.
                result = await session.call_tool("add", {"a": 1, "b": 1})
                assert result.content[0].text == "2"
        # Leaving the client context sends DELETE for the session.

    run(scenario())
    assert [p[0] for p in progress] == [1, 2, 3]
    assert progress[0][2] == "step 1"

    executed = [e["tool"] for e in upstream.executions()]
    assert executed == ["add", "stepwise", "add"]

    # The DELETE reached the upstream: the session is gone there, and the upstream's 404 comes
    # back through scopegate unchanged.
    sid = session_ids[0]
    assert sid
    r = httpx.post(
        f"{open_gateway.base}/mcp",
        headers={
            "Mcp-Session-Id": sid,
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
            "MCP-Protocol-Version": "2025-06-18",
        },
        json={"jsonrpc": "2.0", "id": 9, "method": "tools/list"},
    )
    assert r.status_code == 404, r.text


def test_agent_credentials_are_not_forwarded(open_gateway, upstream):
    async def scenario():
        headers = {"Authorization": "Bearer agent-key-must-stay-here"}
        async with streamablehttp_client(f"{open_gateway.base}/mcp/files", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                await session.call_tool("add", {"a": 1, "b": 2})

    run(scenario())
    (entry,) = upstream.executions()
    assert "authorization" not in entry["headers"]
    assert entry["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert entry["headers"]["host"] == f"127.0.0.1:{upstream.port}"


def test_sigterm_while_sdk_session_is_open_exits_cleanly(open_gateway):
    async def scenario():
        async with streamablehttp_client(f"{open_gateway.base}/mcp", terminate_on_close=False) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                await session.list_tools()

    run(scenario())
    assert open_gateway.stop() == 0
    assert "drained" in open_gateway.log() or "drain deadline" in open_gateway.log()


def test_dead_upstream_gives_the_sdk_a_jsonrpc_error(tmp_path):
    from conftest import Scopegate, free_port

    dead = free_port()
    g = Scopegate({"SCOPEGATE_INSECURE_OPEN": "1", "SCOPEGATE_UPSTREAMS": f"x=http://127.0.0.1:{dead}/mcp"})
    try:
        r = httpx.post(
            f"{g.base}/mcp",
            headers={"Accept": "application/json, text/event-stream"},
            json={"jsonrpc": "2.0", "id": "init-1", "method": "initialize", "params": {}},
        )
        assert r.status_code == 502
        body = r.json()
        assert body["id"] == "init-1"
        assert "refused" in body["error"]["message"]
    finally:
        g.stop()
