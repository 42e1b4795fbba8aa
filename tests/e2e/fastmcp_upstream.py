"""An official-SDK (Python `mcp` 1.x FastMCP) upstream for end-to-end tests.

usage: python fastmcp_upstream.py PORT LOGFILE
Every tool execution is appended to LOGFILE as one JSON line, so tests can prove what the
upstream actually executed (and what it never saw).
"""

import asyncio
import json
import os
import sys

from mcp.server.fastmcp import Context, FastMCP
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import SamplingMessage, TextContent

port = int(sys.argv[1])
log_path = sys.argv[2]

mcp = FastMCP(
    "e2e-upstream",
    host="127.0.0.1",
    port=port,
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)


def record(tool: str, ctx: Context | None = None, **args) -> None:
    entry = {"tool": tool, "args": args}
    if ctx is not None:
        request = ctx.request_context.request
        if request is not None:
            entry["headers"] = {k.lower(): v for k, v in request.headers.items()}
    with open(log_path, "a") as f:
        f.write(json.dumps(entry) + "\n")


@mcp.tool()
def add(a: int, b: int, ctx: Context) -> int:
    """Adds two numbers."""
    record("add", ctx, a=a, b=b)
    return a + b


@mcp.tool()
async def stepwise(steps: int, marker: str, ctx: Context) -> str:
    """Reports progress once per step. After the first report it waits for the client to create
    `marker`, which the client does only when that first report reaches it: the call can finish
    only if progress is relayed while the tool is still running."""
    record("stepwise", ctx, steps=steps, marker=marker)
    saw_marker = False
    for i in range(steps):
        await ctx.report_progress(i + 1, steps, f"step {i + 1}")
        if i == 0:
            for _ in range(200):
                if os.path.exists(marker):
                    saw_marker = True
                    break
                await asyncio.sleep(0.05)
    return f"done {steps} steps; marker seen while running: {saw_marker}"


@mcp.tool()
async def ask_model(question: str, ctx: Context) -> str:
    """Asks the client's model (sampling/createMessage, a server-to-client request) and returns
    what it answered."""
    record("ask_model", ctx, question=question)
    result = await ctx.session.create_message(
        messages=[SamplingMessage(role="user", content=TextContent(type="text", text=question))],
        max_tokens=50,
    )
    return f"the model said: {result.content.text}"


@mcp.tool()
def delete_everything(ctx: Context) -> str:
    """A tool no agent should be allowed to call."""
    record("delete_everything", ctx)
    return "deleted"


if __name__ == "__main__":
    cert = os.environ.get("E2E_TLS_CERT")
    if cert:
        # HTTPS (uvicorn's ssl options); with E2E_TLS_CLIENT_CA, clients must present a
        # certificate from that CA (mutual TLS).
        import ssl

        import uvicorn

        client_ca = os.environ.get("E2E_TLS_CLIENT_CA")
        uvicorn.run(
            mcp.streamable_http_app(),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            ssl_certfile=cert,
            ssl_keyfile=os.environ["E2E_TLS_KEY"],
            ssl_ca_certs=client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE,
        )
    elif os.environ.get("E2E_LEGACY_SSE_PATH"):
        # The legacy HTTP+SSE transport (2024-11-05): a GET stream at this path, POSTs to the
        # endpoint it announces.
        mcp.settings.sse_path = os.environ["E2E_LEGACY_SSE_PATH"]
        mcp.run(transport="sse")
    else:
        mcp.run(transport="streamable-http")
