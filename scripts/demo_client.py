"""The demo's agents: the official Python MCP SDK client, pointed at scopegate with each agent's
key. usage: python demo_client.py URL ANALYST_KEY INTERN_KEY"""

import asyncio
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError


async def as_agent(url: str, name: str, key: str, calls) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with streamablehttp_client(url, headers=headers) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = sorted(t.name for t in (await session.list_tools()).tools)
            print(f"{name}: tools/list shows {', '.join(tools)}")
            for tool, args in calls:
                try:
                    result = await session.call_tool(tool, args)
                    print(f"{name}: {tool}({args}) -> {result.content[0].text}")
                except McpError as e:
                    print(f"{name}: {tool}({args}) -> REFUSED: {e.error.message}")


async def main(url: str, analyst: str, intern: str) -> None:
    await as_agent(url, "analyst", analyst, [
        ("add", {"a": 2, "b": 3}),                  # allowed
        ("delete_everything", {}),                  # refused: denied by the policy
        ("add", {"a": 1000, "b": 1}),               # refused: argument outside its constraint
        ("add", {"a": 1, "b": 1}),                  # the last of its burst of 4
        ("add", {"a": 1, "b": 2}),                  # refused: rate limited
    ])
    await as_agent(url, "intern", intern, [
        ("add", {"a": 40, "b": 2}),                 # allowed
        ("ask_model", {"question": "x"}),           # refused: not in its allow list
    ])


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
