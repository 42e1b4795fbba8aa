"""An official-SDK (Python `mcp` 2.x MCPServer) upstream that speaks 2026-07-28, for end-to-end
tests (run with .venv-git's Python).

usage: python sdk2_upstream.py PORT LOGFILE [NAME]
Every tool execution is appended to LOGFILE as one JSON line with the request's headers, so
tests can prove what the upstream executed and which routing headers it was sent. Lists carry
a public caching hint of 60 s (SEP-2549)."""

import json
import sys

from mcp.server.caching import CacheHint
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import ElicitRequest, ElicitRequestFormParams, InputRequiredResult

port = int(sys.argv[1])
log_path = sys.argv[2]
name = sys.argv[3] if len(sys.argv) > 3 else "sdk2-upstream"

public = CacheHint(ttl_ms=60_000, scope="public")


class CountingServer(MCPServer):
    """Logs every tools/list it answers, so tests can count what reached the upstream."""

    async def list_tools(self):
        with open(log_path, "a") as f:
            f.write(json.dumps({"tool": "<tools/list>"}) + "\n")
        return await super().list_tools()


mcp = CountingServer(
    name,
    instructions=f"{name} answers in 2026-07-28.",
    cache_hints={"tools/list": public, "resources/list": public, "prompts/list": public},
)


def record(tool: str, ctx: Context, **args) -> None:
    entry = {"tool": tool, "args": args, "version": ctx.protocol_version}
    if ctx.headers is not None:
        entry["headers"] = {k.lower(): v for k, v in ctx.headers.items()}
    with open(log_path, "a") as f:
        f.write(json.dumps(entry) + "\n")


@mcp.tool()
def echo(text: str, ctx: Context) -> str:
    """Echoes the text back."""
    record("echo", ctx, text=text)
    return f"{name}: {text}"


@mcp.tool()
def confirm(action: str, ctx: Context) -> str | InputRequiredResult:
    """Asks the user to confirm `action` (a 2026-07-28 multi-round-trip result) before doing it."""
    answers = ctx.input_responses
    if not answers:
        record("confirm", ctx, action=action, round=1)
        ask = ElicitRequest(
            params=ElicitRequestFormParams(
                message=f"Really {action}?",
                requested_schema={"type": "object", "properties": {"ok": {"type": "boolean"}}},
            )
        )
        return InputRequiredResult(input_requests={"confirm": ask}, request_state=f"{name}:{action}")
    record("confirm", ctx, action=action, round=2, state=ctx.request_state)
    reply = answers["confirm"]
    content = getattr(reply, "content", None) or {}
    return f"{name} {action}: ok={content.get('ok')} state={ctx.request_state}"


@mcp.tool()
async def touch(ctx: Context) -> str:
    """Announces that the tool list and the note resource changed."""
    record("touch", ctx)
    await ctx.notify_tools_changed()
    await ctx.notify_resource_updated("memo://note")
    return "touched"


@mcp.resource("memo://note")
def note() -> str:
    """A note."""
    return f"the note of {name}"


mcp.run(
    "streamable-http",
    host="127.0.0.1",
    port=port,
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)
