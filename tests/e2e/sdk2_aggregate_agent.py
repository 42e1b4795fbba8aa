"""The official Python SDK 2.x as an agent on the aggregate endpoint (run with .venv-git's
Python): negotiate, list, call, answer a multi-round-trip (input_required) call, follow a
subscriptions/listen stream, read a resource; report as one JSON object on stdout.

usage: python sdk2_aggregate_agent.py URL KEY UPSTREAM [LISTEN]
UPSTREAM is the exposed prefix of a 2026-07-28 upstream running tests/e2e/sdk2_upstream.py;
with LISTEN=listen the report also holds the events a `touch` call caused."""

import asyncio
import json
import sys

import httpx2
import mcp_types as types
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client


async def elicit(_context, params):
    return types.ElicitResult(action="accept", content={"ok": True})


async def main(url: str, key: str, up: str, mode: str) -> None:
    report: dict = {}
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http), elicitation_callback=elicit) as client:
            report["version"] = client.protocol_version
            report["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
            report["resources"] = sorted(r.uri for r in (await client.list_resources()).resources)
            report["echo"] = (await client.call_tool(f"{up}__echo", {"text": "hello"})).content[0].text
            report["confirm"] = (await client.call_tool(f"{up}__confirm", {"action": "deploy"})).content[0].text
            note = f"scopegate://{up}/memo://note"
            report["read"] = (await client.read_resource(note)).contents[0].text
            if mode == "listen":
                events = []
                async with client.listen(tools_list_changed=True, resource_subscriptions=[note]) as sub:
                    report["honored"] = sub.honored.model_dump(by_alias=True, exclude_none=True)
                    await client.call_tool(f"{up}__touch", {})
                    async for event in sub:
                        events.append(type(event).__name__ + ":" + getattr(event, "uri", ""))
                        if len(events) == 2:
                            break
                report["events"] = sorted(events)
    print(json.dumps(report))


if __name__ == "__main__":
    args = sys.argv[1:] + [""]
    asyncio.run(asyncio.wait_for(main(args[0], args[1], args[2], args[3]), timeout=60))
