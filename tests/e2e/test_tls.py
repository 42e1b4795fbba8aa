"""TLS both ways with real peers: official-SDK servers behind uvicorn's TLS (a private CA, mutual
TLS, broken certificates), and the official Python and TypeScript SDK clients through
scopegate's HTTPS listener. Certificates are made per test run (certs.py)."""

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from certs import make_all
from conftest import AGENT_KEY, SCOPEGATE, Scopegate, Upstream, sha256_hex
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

SECRET = "tls-secret-tls-secret-tls-secret-tls"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("certs"))


def tls_upstream(tmp_path, certs, name, cert="server", client_ca=None):
    env = {"E2E_TLS_CERT": str(certs / f"{cert}.pem"), "E2E_TLS_KEY": str(certs / f"{cert}.key")}
    if client_ca:
        env["E2E_TLS_CLIENT_CA"] = str(certs / f"{client_ca}.pem")
    return Upstream(tmp_path, name=name, tls=env)


def policy_for(tmp_path, upstreams: dict[str, str]) -> Path:
    """A policy with one agent allowed everything on each `name = "<toml fields>"` upstream."""
    text = ""
    for name, fields in upstreams.items():
        text += f'[[upstream]]\nname = "{name}"\n{fields}\n\n'
    allow = ", ".join(f'"{n}/*"' for n in upstreams)
    text += f'[[agent]]\nid = "agent"\nkey_sha256 = "{sha256_hex(AGENT_KEY)}"\nallow = [{allow}]\n'
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    return policy


def gateway(tmp_path, policy, **extra):
    env = {"SCOPEGATE_POLICY": str(policy), "SCOPEGATE_SESSION_SECRET": SECRET,
           "SCOPEGATE_AUDIT_DIR": str(tmp_path / "audit"), "SCOPEGATE_AUDIT_FLUSH_MS": "10"}
    env.update(extra)
    return Scopegate(env)


async def add_through(url: str, **client_args) -> str:
    headers = {"Authorization": f"Bearer {AGENT_KEY}"}
    async with streamablehttp_client(url, headers=headers, **client_args) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            assert "add" in [t.name for t in tools.tools]
            result = await session.call_tool("add", {"a": 20, "b": 22})
            return result.content[0].text


def post(url: str, body: dict, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {AGENT_KEY}", "Accept": "application/json, text/event-stream"}
    return httpx.post(url, json=body, headers=headers, timeout=20, **kw)


def audit_entries(tmp_path) -> list[dict]:
    time.sleep(0.3)
    out = []
    for f in sorted((tmp_path / "audit").glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def test_https_upstreams_private_ca_by_ip_and_by_name(tmp_path, certs):
    up = tls_upstream(tmp_path, certs, "up")
    try:
        # By IP (the certificate names 127.0.0.1) and by a name that resolves to ::1 first
        # while the server listens on 127.0.0.1 only: every address is tried.
        policy = policy_for(tmp_path, {
            "byip": f'url = "https://127.0.0.1:{up.port}/mcp"\nca_file = "{certs}/ca.pem"',
            "byname": f'url = "https://localhost:{up.port}/mcp"\nca_file = "{certs}/ca.pem"',
        })
        g = gateway(tmp_path, policy)
        try:
            assert run(add_through(f"{g.base}/mcp/byip")) == "42"
            assert run(add_through(f"{g.base}/mcp/byname")) == "42"
        finally:
            g.stop()
        assert [e["tool"] for e in up.executions()] == ["add", "add"]
        # The upstream saw TLS with SNI for the name and the URL's authority as Host.
        hosts = sorted(e["headers"]["host"] for e in up.executions())
        assert hosts == sorted([f"127.0.0.1:{up.port}", f"localhost:{up.port}"])
    finally:
        up.stop()


def test_tls_server_name_verifies_another_name(tmp_path, certs):
    up = tls_upstream(tmp_path, certs, "up", cert="otherhost")
    try:
        policy = policy_for(tmp_path, {
            "named": f'url = "https://127.0.0.1:{up.port}/mcp"\nca_file = "{certs}/ca.pem"\n'
                     'tls_server_name = "other.example"',
        })
        g = gateway(tmp_path, policy)
        try:
            assert run(add_through(f"{g.base}/mcp/named")) == "42"
        finally:
            g.stop()
    finally:
        up.stop()


def test_mutual_tls_upstream(tmp_path, certs):
    up = tls_upstream(tmp_path, certs, "up", client_ca="client-ca")
    try:
        ca = f'ca_file = "{certs}/ca.pem"'
        policy = policy_for(tmp_path, {
            "mtls": f'url = "https://127.0.0.1:{up.port}/mcp"\n{ca}\n'
                    f'client_cert_file = "{certs}/client.pem"\nclient_key_file = "{certs}/client.key"',
            "nocert": f'url = "https://127.0.0.1:{up.port}/mcp"\n{ca}',
        })
        g = gateway(tmp_path, policy)
        try:
            assert run(add_through(f"{g.base}/mcp/mtls")) == "42"
            r = post(f"{g.base}/mcp/nocert", {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            assert r.status_code == 502, r.text
            msg = r.json()["error"]["message"]
            # uvicorn (Python's ssl) closes without an alert when no certificate came.
            assert msg == 'upstream "nocert" TLS handshake failed: closed by the peer (client certificate required?)', msg
        finally:
            g.stop()
    finally:
        up.stop()


def test_bad_certificates_are_refused_with_the_reason(tmp_path, certs):
    ups = {
        "expired": tls_upstream(tmp_path, certs, "expired", cert="expired"),
        "otherhost": tls_upstream(tmp_path, certs, "otherhost", cert="otherhost"),
        "rogue": tls_upstream(tmp_path, certs, "rogue", cert="rogue"),
        "good": tls_upstream(tmp_path, certs, "good"),
    }
    try:
        # No ca_file on "system": a good certificate, but our private CA is not in the
        # machine's store.
        policy = policy_for(tmp_path, {
            **{n: f'url = "https://127.0.0.1:{u.port}/mcp"\nca_file = "{certs}/ca.pem"'
               for n, u in ups.items() if n != "good"},
            "system": f'url = "https://127.0.0.1:{ups["good"].port}/mcp"',
        })
        g = gateway(tmp_path, policy)
        try:
            expect = {
                "expired": "certificate expired",
                "otherhost": "certificate not valid for this host",
                "rogue": "certificate from an unknown CA",
                "system": "certificate from an unknown CA",
            }
            for name, reason in expect.items():
                r = post(f"{g.base}/mcp/{name}", {"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
                assert r.status_code == 502, (name, r.text)
                body = r.json()
                assert body["id"] == 7
                msg = body["error"]["message"]
                assert f'upstream "{name}"' in msg and reason in msg, msg
            metrics = httpx.get(f"{g.base}/metrics", timeout=10).text
            for name, reason in expect.items():
                line = f'scopegate_upstream_tls_failures_total{{upstream="{name}",reason="{reason}"}}'
                assert line in metrics, (line, metrics)
            entries = [e for e in audit_entries(tmp_path) if e.get("method") == "tools/list"]
            reasons = {e.get("upstream"): e.get("reason", "") for e in entries}
            for name, reason in expect.items():
                assert reason in reasons.get(name, ""), (name, reasons)
        finally:
            g.stop()
        for u in ups.values():
            assert u.executions() == []
    finally:
        for u in ups.values():
            u.stop()


def test_unreadable_pem_stops_start_and_fails_validate(tmp_path, certs):
    policy = policy_for(tmp_path, {
        "up": 'url = "https://127.0.0.1:1/mcp"\nca_file = "missing-ca.pem"',
    })
    env = {"PATH": os.environ.get("PATH", ""), "SCOPEGATE_POLICY": str(policy), "SCOPEGATE_LISTEN": "127.0.0.1:0"}
    out = subprocess.run([SCOPEGATE], env=env, capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out.stderr
    assert "upstream.ca_file" in out.stderr and str(tmp_path / "missing-ca.pem") in out.stderr, out.stderr
    out = subprocess.run([SCOPEGATE, "validate", str(policy)], env=env, capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    assert "upstream.ca_file" in out.stdout + out.stderr
    # The listener's files too.
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    listener = dict(env, SCOPEGATE_TLS_CERT=str(tmp_path / "junk.pem"), SCOPEGATE_TLS_KEY=str(certs / "server.key"))
    policy.write_text(policy_for(tmp_path, {"up": 'url = "http://127.0.0.1:1/mcp"'}).read_text())
    out = subprocess.run([SCOPEGATE], env=listener, capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out.stderr
    assert "SCOPEGATE_TLS_CERT" in out.stderr and "junk.pem" in out.stderr, out.stderr


@pytest.fixture
def https_gateway(tmp_path, certs, upstream):
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(certs / "server.pem", cert)
    shutil.copy(certs / "server.key", key)
    policy = policy_for(tmp_path, {"files": f'url = "{upstream.url}"'})
    g = gateway(tmp_path, policy, SCOPEGATE_TLS_CERT=str(cert), SCOPEGATE_TLS_KEY=str(key))
    yield g
    g.stop()


def test_python_and_typescript_sdks_through_the_https_listener(https_gateway, certs, upstream, monkeypatch):
    assert https_gateway.base.startswith("https://")
    # Python: the CA through SSL_CERT_FILE, as a user would.
    monkeypatch.setenv("SSL_CERT_FILE", str(certs / "ca.pem"))
    assert run(add_through(f"{https_gateway.base}/mcp/files")) == "42"
    # Plain HTTP to the TLS port is refused (no answer in the clear).
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"http://{https_gateway.addr}/mcp/files", json={}, timeout=5)
    # The resource metadata names the https URL.
    ca = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    meta = httpx.get(f"{https_gateway.base}/.well-known/oauth-protected-resource", verify=ca)
    assert meta.json()["resource"].startswith("https://")
    # TypeScript: the CA through NODE_EXTRA_CA_CERTS.
    node_dir = Path(__file__).parent / "node"
    out = subprocess.run(
        [shutil.which("node") or "node", str(node_dir / "agent.mjs"), f"{https_gateway.base}/mcp/files", AGENT_KEY],
        capture_output=True, text=True, timeout=60, cwd=node_dir,
        env={**os.environ, "NODE_EXTRA_CA_CERTS": str(certs / "ca.pem")},
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["add"] == "42" and report["progress"] == [1, 2]


def peer_cert(addr: str, ca: Path) -> bytes:
    host, port = addr.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection((host, int(port)), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        return s.getpeercert(binary_form=True)


def test_sighup_reloads_the_certificate_without_dropping_connections(https_gateway, certs, tmp_path):
    import http.client

    host, port = https_gateway.addr.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    kept = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    kept.request("GET", "/healthz")
    assert kept.getresponse().read() is not None
    first = peer_cert(https_gateway.addr, certs / "ca.pem")
    # Renewal: new files in place, then SIGHUP.
    shutil.copy(certs / "server-renewed.pem", tmp_path / "live.pem")
    shutil.copy(certs / "server-renewed.key", tmp_path / "live.key")
    https_gateway.proc.send_signal(signal.SIGHUP)
    renewed = (certs / "server-renewed.pem").read_bytes()
    deadline = time.time() + 10
    while peer_cert(https_gateway.addr, certs / "ca.pem") == first and time.time() < deadline:
        time.sleep(0.1)
    now = peer_cert(https_gateway.addr, certs / "ca.pem")
    assert now != first
    assert ssl.DER_cert_to_PEM_cert(now).strip() == renewed.decode().strip()
    # The connection opened before the reload carries on.
    kept.request("GET", "/healthz")
    assert kept.getresponse().status == 200
    kept.close()
    assert "TLS certificate and key reloaded" in https_gateway.log()
    # A reload that cannot read the files keeps the certificate in use, and says why.
    (tmp_path / "live.pem").write_text("not a certificate\n")
    https_gateway.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 10
    while "TLS reload failed" not in https_gateway.log() and time.time() < deadline:
        time.sleep(0.1)
    assert "TLS reload failed, the old certificate stays" in https_gateway.log()
    assert "live.pem" in https_gateway.log()
    assert peer_cert(https_gateway.addr, certs / "ca.pem") == now


def test_listener_mutual_tls_requires_a_client_certificate(tmp_path, certs, upstream):
    policy = policy_for(tmp_path, {"files": f'url = "{upstream.url}"'})
    g = gateway(tmp_path, policy, SCOPEGATE_TLS_CERT=str(certs / "server.pem"),
                SCOPEGATE_TLS_KEY=str(certs / "server.key"), SCOPEGATE_TLS_CLIENT_CA=str(certs / "client-ca.pem"))
    try:
        body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        ca = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with pytest.raises(httpx.HTTPError):
            post(f"{g.base}/mcp/files", body, verify=ca)
        rogue = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        rogue.load_cert_chain(certs / "rogue-client.pem", certs / "rogue-client.key")
        with pytest.raises(httpx.HTTPError):
            post(f"{g.base}/mcp/files", body, verify=rogue)
        good = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        good.load_cert_chain(certs / "client.pem", certs / "client.key")
        r = post(f"{g.base}/mcp/files", {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
            verify=good)
        assert r.status_code == 200, r.text
        # The certificate is a second factor: without the bearer key, still refused.
        r = httpx.post(f"{g.base}/mcp/files", json=body, verify=good, timeout=10)
        assert r.status_code == 401
        metrics = httpx.get(f"{g.base}/metrics", verify=good, timeout=10).text
        assert "scopegate_listener_tls_failures_total{reason=" in metrics
    finally:
        g.stop()


class Tinyproxy:
    """A real HTTP CONNECT proxy (Debian's tinyproxy) on a free port, logging every request."""

    def __init__(self, tmp_path: Path, extra: str = ""):
        from conftest import free_port, wait_for_port

        self.port = free_port()
        self.log = tmp_path / f"tinyproxy-{self.port}.log"
        conf = tmp_path / f"tinyproxy-{self.port}.conf"
        conf.write_text(
            f'Port {self.port}\nListen 127.0.0.1\nTimeout 60\nLogFile "{self.log}"\n'
            f"LogLevel Connect\nMaxClients 50\n{extra}"
        )
        binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        self.proc = subprocess.Popen([binary, "-d", "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def requests(self) -> list[str]:
        return [line.split("): ", 1)[1] for line in self.log.read_text().splitlines() if "Request (file" in line]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_upstreams_through_an_egress_proxy(tmp_path, certs):
    up = tls_upstream(tmp_path, certs, "up")
    proxy = Tinyproxy(tmp_path)
    # Allows CONNECT to port 443 only: our upstream's port is refused.
    strict = Tinyproxy(tmp_path, "ConnectPort 443\n")
    try:
        policy = policy_for(tmp_path, {
            "far": f'url = "https://127.0.0.1:{up.port}/mcp"\nca_file = "{certs}/ca.pem"',
        })
        # Loopback is reached directly by default: "none" sends it through the proxy too.
        g = gateway(tmp_path, policy, SCOPEGATE_EGRESS_PROXY=f"http://127.0.0.1:{proxy.port}",
                    SCOPEGATE_EGRESS_NO_PROXY="none")
        try:
            assert run(add_through(f"{g.base}/mcp/far")) == "42"
        finally:
            g.stop()
        tunnels = proxy.requests()
        assert tunnels and all(r.startswith(f"CONNECT 127.0.0.1:{up.port} ") for r in tunnels), tunnels
        # Without "none", loopback upstreams bypass the proxy.
        g = gateway(tmp_path, policy, SCOPEGATE_EGRESS_PROXY=f"http://127.0.0.1:{strict.port}")
        try:
            assert run(add_through(f"{g.base}/mcp/far")) == "42"
        finally:
            g.stop()
        assert strict.requests() == []
        # A proxy that refuses the tunnel: a clear 502.
        g = gateway(tmp_path, policy, SCOPEGATE_EGRESS_PROXY=f"http://127.0.0.1:{strict.port}",
                    SCOPEGATE_EGRESS_NO_PROXY="none")
        try:
            r = post(f"{g.base}/mcp/far", {"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
            assert r.status_code == 502, r.text
            assert r.json()["error"]["message"] == (
                'upstream "far" is unreachable: the egress proxy refused the tunnel (403)'), r.text
        finally:
            g.stop()
    finally:
        strict.stop()
        proxy.stop()
        up.stop()


def test_listener_speaks_tls_1_2_and_1_3_with_alpn_http11(https_gateway, certs):
    host, port = https_gateway.addr.rsplit(":", 1)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        ctx.minimum_version = ctx.maximum_version = version
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                assert s.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
                assert s.selected_alpn_protocol() == "http/1.1"
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 200")
