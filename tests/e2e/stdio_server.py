"""A stdio MCP server on the official Python SDK (FastMCP) for the failure cases of
tests/e2e/test_stdio.py: it can crash, break the protocol, and report its environment and pid."""

import os

from mcp.server.fastmcp import FastMCP

mcp = FastMCP("stdio-test-server")


@mcp.tool()
def echo(text: str) -> str:
    return text


@mcp.tool()
def pid() -> int:
    return os.getpid()


@mcp.tool()
def env_names() -> list[str]:
    return sorted(os.environ)


@mcp.tool()
def tcp_sockets() -> list[str]:
    """The descriptors this process holds that are TCP sockets (inherited ones would be
    scopegate's: agents' connections, listeners)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in open(table).read().splitlines()[1:]:
                inodes.add(line.split()[9])
        except OSError:
            pass
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            found.append(f"{fd} -> {target}")
    return found


@mcp.tool()
def noisy() -> str:
    """200 lines to stderr at once: scopegate logs at most 20 a second of them."""
    import sys

    for i in range(200):
        print(f"noise {i}", file=sys.stderr)
    sys.stderr.flush()
    return "ok"


@mcp.tool()
def crash() -> str:
    os._exit(3)


@mcp.tool()
def garbage() -> str:
    os.write(1, b"this is not JSON-RPC\n")
    return "unreachable"


if __name__ == "__main__":
    mcp.run("stdio")
