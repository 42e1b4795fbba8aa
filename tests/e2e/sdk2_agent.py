"""The official Python SDK 2.x as an agent (run with .venv-git's Python, where the 2.x SDK is
installed): connect in its default mode (it probes `server/discover` first and falls back to
initialize on older servers), list, call; report as one JSON object on stdout.

usage: python sdk2_agent.py URL KEY TOOL ARGUMENTS_JSON"""

import asyncio
import json
import sys

import httpx2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, key: str, tool: str, arguments: dict) -> None:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            report = {"version": client.protocol_version}
            report["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
            result = await client.call_tool(tool, arguments)
            report["result"] = result.content[0].text
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))
