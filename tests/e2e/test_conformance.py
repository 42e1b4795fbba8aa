"""The MCP conformance suite (npm @modelcontextprotocol/conformance, server scenarios) through
scopegate's HTTPS listener, in policy mode, in front of @modelcontextprotocol/server-everything:
every scenario comes out as it does against the server directly."""

import os
import re
import shutil
import subprocess
from pathlib import Path

from certs import make_all
from conftest import AGENT_KEY, Scopegate, free_port, sha256_hex, wait_for_port

NODE_DIR = Path(__file__).parent / "node"
CONFORMANCE = NODE_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
EVERYTHING = NODE_DIR / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"


def run_suite(url: str, env: dict | None = None) -> dict[str, bool]:
    out = subprocess.run(
        [shutil.which("node") or "node", str(CONFORMANCE), "server", "--url", url],
        capture_output=True, text=True, timeout=300, cwd=NODE_DIR, env={**os.environ, **(env or {})},
    )
    results = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^([✓✗]) (\S+): (\d+) passed, (\d+) failed", line)
        if m:
            results[m.group(2)] = m.group(1) == "✓"
    assert results, out.stdout + out.stderr
    return results


def test_conformance_through_the_https_listener(tmp_path):
    assert CONFORMANCE.exists() and EVERYTHING.exists(), "run scripts/test.sh (npm ci in tests/e2e/node)"
    port = free_port()
    server = subprocess.Popen(
        [shutil.which("node") or "node", str(EVERYTHING), "streamableHttp"],
        env={**os.environ, "PORT": str(port)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        direct = run_suite(f"http://127.0.0.1:{port}/mcp")
        certs = make_all(tmp_path / "certs")
        policy = tmp_path / "policy.toml"
        policy.write_text(
            f'[[upstream]]\nname = "ev"\nurl = "http://127.0.0.1:{port}/mcp"\n\n'
            f'[[agent]]\nid = "conformance"\nkey_sha256 = "{sha256_hex(AGENT_KEY)}"\nallow = ["ev/*"]\n'
        )
        g = Scopegate({
            "SCOPEGATE_POLICY": str(policy),
            "SCOPEGATE_PATH_KEYS": "1",
            "SCOPEGATE_SESSION_SECRET": "conformance-secret-conformance-secret",
            "SCOPEGATE_TLS_CERT": str(certs / "server.pem"),
            "SCOPEGATE_TLS_KEY": str(certs / "server.key"),
        })
        try:
            port_gw = g.addr.rsplit(":", 1)[1]
            # The suite cannot set headers: the key travels in the path (SCOPEGATE_PATH_KEYS).
            through = run_suite(f"https://localhost:{port_gw}/key/{AGENT_KEY}/mcp/ev",
                                {"NODE_EXTRA_CA_CERTS": str(certs / "ca.pem")})
        finally:
            g.stop()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert sum(direct.values()) >= 10, direct
    assert through == direct, {k: (direct.get(k), through.get(k)) for k in direct if direct.get(k) != through.get(k)}
