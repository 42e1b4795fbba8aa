"""Fixtures: a FastMCP upstream process and a scopegate process in front of it."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCOPEGATE = os.environ.get("SCOPEGATE_BIN", str(ROOT / "target" / "debug" / "scopegate"))
# The Python SDK 2.x (tests/e2e/requirements-git.txt) lives in its own virtualenv.
SDK2_PYTHON = str(ROOT / ".venv-git" / "bin" / "python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, limit: float = 20.0) -> None:
    end = time.time() + limit
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class Upstream:
    def __init__(self, tmp_path: Path, name: str = "upstream", script: str = "fastmcp_upstream.py",
                 tls: dict[str, str] | None = None, python: str = sys.executable, args: tuple = ()):
        """`tls`: E2E_TLS_CERT, E2E_TLS_KEY (and E2E_TLS_CLIENT_CA) to serve HTTPS. `python`:
        the interpreter (SDK2_PYTHON for the 2.x SDK's servers); `args`: after PORT and LOGFILE."""
        self.port = free_port()
        self.log = tmp_path / f"{name}-executions.jsonl"
        self.log.touch()
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).parent / script), str(self.port), str(self.log), *args],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"{name}.stderr", "w"),
            env={**os.environ, **(tls or {})},
        )
        wait_for_port(self.port)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/mcp"

    def executions(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Scopegate:
    def __init__(self, env: dict[str, str]):
        full_env = {"PATH": os.environ.get("PATH", ""), "SCOPEGATE_LISTEN": "127.0.0.1:0", "SCOPEGATE_THREADS": "2"}
        full_env.update(env)
        self.proc = subprocess.Popen(
            [SCOPEGATE], env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        found = threading.Event()
        self.addr = None

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"listening on ([^\s\"]+)", line)
                if m and not found.is_set():
                    self.addr = m.group(1)
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(20):
            self.proc.kill()
            raise RuntimeError("scopegate did not start:\n" + "".join(self.lines))
        scheme = "https" if "SCOPEGATE_TLS_CERT" in env else "http"
        self.base = f"{scheme}://{self.addr}"

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


@pytest.fixture
def upstream(tmp_path):
    u = Upstream(tmp_path)
    yield u
    u.stop()


@pytest.fixture
def open_gateway(upstream):
    g = Scopegate({"SCOPEGATE_INSECURE_OPEN": "1", "SCOPEGATE_UPSTREAMS": f"files={upstream.url}"})
    yield g
    g.stop()


AGENT_KEY = "e2e-agent-key-0123456789"
OTHER_KEY = "e2e-other-key-0123456789"


def sha256_hex(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def policy_gateway(upstream, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f"""
[[tenant]]
id = "acme"

[[upstream]]
name = "files"
tenant = "acme"
[upstream.headers]
X-Upstream-Key = "${{E2E_UPSTREAM_TOKEN}}"

[[agent]]
id = "agent"
tenant = "acme"
key_sha256 = "{sha256_hex(AGENT_KEY)}"
allow = ["files/*"]
deny = ["files/delete_*"]

[[agent.tool]]
match = "files/add"
[agent.tool.args]
a = {{ min = 0, max = 100 }}

[[agent]]
id = "other"
tenant = "acme"
key_sha256 = "{sha256_hex(OTHER_KEY)}"
allow = ["files/add"]
"""
    )
    g = Scopegate(
        {
            "SCOPEGATE_POLICY": str(policy),
            "SCOPEGATE_UPSTREAMS": f"files={upstream.url}",
            "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e",
            "E2E_UPSTREAM_TOKEN": "upstream-credential",
        }
    )
    yield g
    g.stop()
