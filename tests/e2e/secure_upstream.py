"""An official-SDK (Python `mcp` 1.x FastMCP) upstream for the security tests: resources the
SDK normalises before use, prompts with completions, and an event store so streams can be
resumed with Last-Event-ID (and replayed).

usage: python secure_upstream.py PORT LOGFILE
Every resource read, prompt, completion and tool execution is appended to LOGFILE as one JSON
line: the ground truth of what ran.
"""

import json
import sys
from itertools import count

from mcp.server.fastmcp import FastMCP
from mcp.server.streamable_http import EventMessage, EventStore
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import Completion, PromptReference, ResourceTemplateReference

port = int(sys.argv[1])
log_path = sys.argv[2]


def record(kind: str, **what) -> None:
    with open(log_path, "a") as f:
        f.write(json.dumps({"kind": kind, **what}) + "\n")


class MemoryEventStore(EventStore):
    """Keeps every event of every stream, replays a stream's events after a given id."""

    def __init__(self):
        self.events: list[tuple[str, str, object]] = []
        self.ids = count(1)

    async def store_event(self, stream_id, message):
        event_id = f"{stream_id}-{next(self.ids)}"
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback):
        found = [i for i, e in enumerate(self.events) if e[0] == last_event_id]
        if not found:
            return None
        stream_id = self.events[found[0]][1]
        for event_id, sid, message in self.events[found[0] + 1 :]:
            if sid == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


mcp = FastMCP(
    "secure-upstream",
    host="127.0.0.1",
    port=port,
    event_store=MemoryEventStore(),
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)


@mcp.resource("file:///etc/{name}")
def etc_file(name: str) -> str:
    """A file under /etc: what the policy denies."""
    record("read", uri=f"file:///etc/{name}")
    return f"SECRET contents of /etc/{name}"


@mcp.resource("file:///srv/{name}")
def srv_file(name: str) -> str:
    """A file under /srv: what the policy allows."""
    record("read", uri=f"file:///srv/{name}")
    return f"contents of /srv/{name}"


@mcp.prompt()
def summarize(text: str) -> str:
    """An allowed prompt."""
    record("prompt", name="summarize")
    return f"Summarize: {text}"


@mcp.prompt()
def admin_reset(target: str) -> str:
    """A denied prompt."""
    record("prompt", name="admin_reset")
    return f"Reset {target}"


@mcp.completion()
async def complete(ref, argument, context):
    if isinstance(ref, PromptReference):
        record("complete", ref=f"prompt:{ref.name}")
    elif isinstance(ref, ResourceTemplateReference):
        record("complete", ref=f"resource:{ref.uri}")
    return Completion(values=["a", "b"])


@mcp.tool()
def add(a: int, b: int) -> int:
    """Adds two numbers."""
    record("tool", name="add", a=a, b=b)
    return a + b


@mcp.tool()
def delete_everything() -> str:
    """A tool no agent may see or call."""
    record("tool", name="delete_everything")
    return "deleted"


if __name__ == "__main__":
    mcp.run(transport="streamable-http")
