"""The demo's agent: the official Python MCP SDK client, pointed at scopegate."""

import asyncio
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client


async def main(url: str) -> None:
    print(f"agent -> {url}")
    async with streamablehttp_client(url) as (read, write, get_session_id):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            print(f"  initialize: server {init.serverInfo.name!r}, protocol {init.protocolVersion}, session {get_session_id()}")
            tools = await session.list_tools()
            print(f"  tools/list: {', '.join(t.name for t in tools.tools)}")
            result = await session.call_tool("echo", {"repo": "acme/web", "title": "hello through scopegate"})
            print(f"  tools/call echo: {result.content[0].text}")

            async def on_progress(value, total, message):
                print(f"    progress {value:g}/{total:g} (relayed while the tool runs)")

            result = await session.call_tool(
                "slow_events", {"count": 3, "delay_ms": 300}, progress_callback=on_progress
            )
            print(f"  tools/call slow_events: {result.content[0].text}")
    print("  session closed (DELETE sent)")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
