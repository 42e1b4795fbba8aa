"""Policy mode with the official Python SDK on both sides: what an agent sees and may do."""

import asyncio

import httpx
from conftest import AGENT_KEY, OTHER_KEY
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_agent_sees_and_calls_only_its_tools(policy_gateway, upstream):
    outcome = {}

    async def scenario():
        headers = {"Authorization": f"Bearer {AGENT_KEY}"}
        async with streamablehttp_client(f"{policy_gateway.base}/mcp", headers=headers) as (read, write, get_sid):
            async with ClientSession(read, write) as session:
                await session.initialize()
                outcome["sid"] = get_sid()
                tools = await session.list_tools()
                outcome["tools"] = sorted(t.name for t in tools.tools)

                ok = await session.call_tool("add", {"a": 2, "b": 3})
                outcome["add"] = ok.content[0].text

                # Refused by a deny rule: a JSON-RPC error, and the session carries on.
                try:
                    await session.call_tool("delete_everything", {})
                    outcome["delete"] = "ran"
                except Exception as e:  # McpError
                    outcome["delete"] = str(e)

                # Refused by an argument constraint.
                try:
                    await session.call_tool("add", {"a": 1000, "b": 1})
                    outcome["big"] = "ran"
                except Exception as e:
                    outcome["big"] = str(e)

                again = await session.call_tool("add", {"a": 1, "b": 1})
                outcome["again"] = again.content[0].text

    run(scenario())
    assert outcome["tools"] == ["add", "ask_model", "stepwise"], "delete_everything must be hidden"
    assert outcome["add"] == "5"
    assert "denied by rule" in outcome["delete"] and "files/delete_*" in outcome["delete"], outcome["delete"]
    assert '"a"' in outcome["big"] and "maximum" in outcome["big"], outcome["big"]
    assert outcome["again"] == "2"

    executed = upstream.executions()
    assert [e["tool"] for e in executed] == ["add", "add"], "a refused call reached the upstream"
    for e in executed:
        assert e["headers"].get("x-upstream-key") == "upstream-credential"
        assert "authorization" not in e["headers"]
        assert AGENT_KEY not in str(e["headers"])

    # The agent's session id is scopegate's token, not the upstream's.
    assert outcome["sid"].startswith("sg1.")


def test_another_agents_session_is_refused(policy_gateway, upstream):
    sids = []

    async def scenario():
        headers = {"Authorization": f"Bearer {AGENT_KEY}"}
        async with streamablehttp_client(
            f"{policy_gateway.base}/mcp", headers=headers, terminate_on_close=False
        ) as (read, write, get_sid):
            async with ClientSession(read, write) as session:
                await session.initialize()
                sids.append(get_sid())

    run(scenario())
    r = httpx.post(
        f"{policy_gateway.base}/mcp",
        headers={
            "Authorization": f"Bearer {OTHER_KEY}",
            "Mcp-Session-Id": sids[0],
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2025-06-18",
        },
        json={"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "add", "arguments": {"a": 1, "b": 1}}},
    )
    assert r.status_code == 404, r.text
    assert upstream.executions() == []


def test_unauthenticated_sdk_client_gets_401(policy_gateway):
    async def scenario():
        async with streamablehttp_client(f"{policy_gateway.base}/mcp") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()

    try:
        run(scenario())
        raised = None
    except BaseException as e:  # the SDK surfaces the 401 as an HTTP error inside a task group
        raised = e
    assert raised is not None
    assert "401" in repr(raised) or "Unauthorized" in repr(raised), repr(raised)


def test_es256_jwt_from_pyjwt_authenticates_an_sdk_client(upstream, tmp_path):
    import json
    import time

    import jwt as pyjwt
    from conftest import Scopegate
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": "k1", "alg": "ES256"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    policy = tmp_path / "policy.toml"
    policy.write_text('[[agent]]\nid = "jwt-agent"\nallow = ["files/add"]\n')
    g = Scopegate(
        {
            "SCOPEGATE_POLICY": str(policy),
            "SCOPEGATE_UPSTREAMS": f"files={upstream.url}",
            "SCOPEGATE_JWT_KEYS": str(jwks),
            "SCOPEGATE_JWT_ISSUER": "https://auth.example",
            "SCOPEGATE_JWT_AUDIENCE": "https://gw.example/mcp",
        }
    )
    try:
        token = pyjwt.encode(
            {"iss": "https://auth.example", "aud": "https://gw.example/mcp", "sub": "jwt-agent", "exp": int(time.time()) + 300},
            private,
            algorithm="ES256",
            headers={"kid": "k1"},
        )
        names = []

        async def scenario():
            headers = {"Authorization": f"Bearer {token}"}
            async with streamablehttp_client(f"{g.base}/mcp", headers=headers) as (read, write, _):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    names.extend(t.name for t in (await session.list_tools()).tools)
                    result = await session.call_tool("add", {"a": 20, "b": 22})
                    names.append(result.content[0].text)

        run(scenario())
        assert names == ["add", "42"]
        assert [e["tool"] for e in upstream.executions()] == ["add"]
        assert token not in str(upstream.executions()), "the agent's JWT reached the upstream"
    finally:
        g.stop()


def test_rate_limit_refuses_the_burst_excess_and_the_session_survives(upstream, tmp_path):
    import time

    from conftest import Scopegate, sha256_hex

    policy = tmp_path / "policy.toml"
    policy.write_text(
        f"""
[[agent]]
id = "agent"
key_sha256 = "{sha256_hex(AGENT_KEY)}"
allow = ["files/add"]
rate = {{ per_second = 2, burst = 4 }}
"""
    )
    g = Scopegate({"SCOPEGATE_POLICY": str(policy), "SCOPEGATE_UPSTREAMS": f"files={upstream.url}"})
    outcome = {"ok": 0, "refused": [], "after": None}
    try:

        async def scenario():
            headers = {"Authorization": f"Bearer {AGENT_KEY}"}
            async with streamablehttp_client(f"{g.base}/mcp", headers=headers) as (read, write, _):
                async with ClientSession(read, write) as session:
                    # initialize and tools/list take two of the burst of 4 (the SDK lists
                    # tools itself before its first call_tool, to validate results).
                    await session.initialize()
                    await session.list_tools()
                    for i in range(5):
                        try:
                            await session.call_tool("add", {"a": i, "b": 0})
                            outcome["ok"] += 1
                        except Exception as e:  # McpError carrying the JSON-RPC error
                            outcome["refused"].append(e)
                    wait_ms = outcome["refused"][-1].error.data["retry_after_ms"]
                    await asyncio.sleep(wait_ms / 1000 + 0.05)
                    result = await session.call_tool("add", {"a": 40, "b": 2})
                    outcome["after"] = result.content[0].text

        run(scenario())
    finally:
        g.stop()
    assert outcome["ok"] == 2, "initialize and tools/list used 2 of the burst of 4"
    assert len(outcome["refused"]) == 3
    err = outcome["refused"][0].error
    assert err.code == -32007
    assert "rate limited by agent" in err.message and "retry after" in err.message
    assert err.data["retry_after_ms"] > 0
    assert outcome["after"] == "42", "the same session works after the advertised wait"
    assert len(upstream.executions()) == 3


def test_metrics_parse_as_prometheus_text(policy_gateway):
    from prometheus_client.parser import text_string_to_metric_families

    async def scenario():
        headers = {"Authorization": f"Bearer {AGENT_KEY}"}
        async with streamablehttp_client(f"{policy_gateway.base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                await session.list_tools()
                await session.call_tool("add", {"a": 1, "b": 2})

    run(scenario())
    text = httpx.get(f"{policy_gateway.base}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["scopegate_requests"]
    calls = [
        s.value
        for s in requests.samples
        if s.labels.get("method") == "tools/call" and s.labels.get("decision") == "allowed"
    ]
    assert calls == [1.0]
    assert families["scopegate_request_duration_seconds"].type == "histogram"
    assert "scopegate_open_connections" in families


def test_typescript_sdk_client_through_scopegate(policy_gateway, upstream):
    """The official npm SDK client (Client + StreamableHTTPClientTransport) as the agent."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    node_dir = Path(__file__).parent / "node"
    assert (node_dir / "node_modules" / "@modelcontextprotocol" / "sdk").exists(), "run scripts/test.sh"
    out = subprocess.run(
        [shutil.which("node") or "node", str(node_dir / "agent.mjs"), f"{policy_gateway.base}/mcp", AGENT_KEY],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=node_dir,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["server"] == "e2e-upstream"
    assert report["sessionId"].startswith("sg1.")
    assert report["tools"] == ["add", "ask_model", "stepwise"]
    assert report["add"] == "42"
    assert "denied by rule" in report["denied"], report["denied"]
    assert report["progress"] == [1, 2], "progress relayed to the TypeScript client"
    assert report["stepwise"].startswith("done 2 steps")
    executed = [e["tool"] for e in upstream.executions()]
    assert executed == ["add", "stepwise"], "the refused call never reached the upstream"
