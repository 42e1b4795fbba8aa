"""The aggregate endpoint with the official Python SDK on both sides: two FastMCP upstreams (and a
third of another tenant) behind one /mcp, an SDK ClientSession in front."""

import asyncio
import os
import tempfile

import mcp.types as types
import pytest
from conftest import Scopegate, Upstream, sha256_hex
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

ACME_KEY = "e2e-acme-key-0123456789"
GLOBEX_KEY = "e2e-globex-key-0123456789"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=90))


@pytest.fixture
def fleet(tmp_path):
    files = Upstream(tmp_path, "files")
    maths = Upstream(tmp_path, "maths")
    secret = Upstream(tmp_path, "secret")
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f"""
[[tenant]]
id = "acme"
[[tenant]]
id = "globex"

[[upstream]]
name = "files"
url = "{files.url}"
tenant = "acme"
[upstream.headers]
X-Upstream-Key = "files-credential"

[[upstream]]
name = "maths"
url = "{maths.url}"
tenant = "acme"
[upstream.headers]
X-Upstream-Key = "maths-credential"

[[upstream]]
name = "secret"
url = "{secret.url}"
tenant = "globex"
[upstream.headers]
X-Upstream-Key = "globex-credential"

[[agent]]
id = "acme-bot"
tenant = "acme"
key_sha256 = "{sha256_hex(ACME_KEY)}"
allow = ["files/*", "maths/add", "maths/stepwise", "maths/ask_model"]
deny = ["files/delete_*"]

[[agent]]
id = "globex-bot"
tenant = "globex"
key_sha256 = "{sha256_hex(GLOBEX_KEY)}"
allow = ["secret/*"]
"""
    )
    gw = Scopegate(
        {
            "SCOPEGATE_POLICY": str(policy),
            "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e",
            "SCOPEGATE_UPSTREAM_TIMEOUT_MS": "5000",
        }
    )
    yield {"files": files, "maths": maths, "secret": secret, "gw": gw}
    gw.stop()
    for u in (files, maths, secret):
        u.stop()


async def sample(context, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    question = params.messages[0].content.text
    return types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text=f"42 (you asked {question!r})"),
        model="agent-side-model",
    )


def test_one_endpoint_many_servers(fleet):
    gw = fleet["gw"]
    out = {}

    async def progress_run(session, tool):
        marker = os.path.join(tempfile.mkdtemp(), "seen")
        seen = []

        async def on_progress(progress, total, message):
            seen.append(progress)
            if not os.path.exists(marker):
                open(marker, "w").close()

        r = await session.call_tool(tool, {"steps": 2, "marker": marker}, progress_callback=on_progress)
        return r.content[0].text, seen

    async def scenario():
        headers = {"Authorization": f"Bearer {ACME_KEY}"}
        async with streamablehttp_client(f"{gw.base}/mcp", headers=headers) as (read, write, get_sid):
            async with ClientSession(read, write, sampling_callback=sample) as session:
                init = await session.initialize()
                out["server"] = init.serverInfo.name
                out["sid"] = get_sid()
                out["tools"] = sorted(t.name for t in (await session.list_tools()).tools)

                out["files_add"] = (await session.call_tool("files__add", {"a": 2, "b": 3})).content[0].text
                out["maths_add"] = (await session.call_tool("maths__add", {"a": 10, "b": 1})).content[0].text
                out["files_progress"] = await progress_run(session, "files__stepwise")
                out["maths_progress"] = await progress_run(session, "maths__stepwise")
                out["sampled"] = (await session.call_tool("maths__ask_model", {"question": "meaning?"})).content[0].text

                for name in ("files__delete_everything", "secret__add", "maths__delete_everything"):
                    try:
                        await session.call_tool(name, {})
                        out[name] = "ran"
                    except Exception as e:
                        out[name] = str(e)

                # One upstream dies mid-session: its tools go, the other keeps serving.
                fleet["files"].stop()
                out["tools_after"] = sorted(t.name for t in (await session.list_tools()).tools)
                try:
                    r = await session.call_tool("files__add", {"a": 1, "b": 1})
                    out["dead_call"] = f"returned {r}"
                except Exception as e:
                    out["dead_call"] = str(e)
                out["maths_after"] = (await session.call_tool("maths__add", {"a": 5, "b": 5})).content[0].text

    run(scenario())
    assert out["server"] == "scopegate"
    assert out["sid"].startswith("sg2.")
    assert out["tools"] == [
        "files__add",
        "files__ask_model",
        "files__stepwise",
        "maths__add",
        "maths__ask_model",
        "maths__stepwise",
    ], out["tools"]
    assert out["files_add"] == "5" and out["maths_add"] == "11"
    for which in ("files_progress", "maths_progress"):
        text, seen = out[which]
        assert "marker seen while running: True" in text, (which, text)
        assert seen == [1.0, 2.0], (which, seen)
    assert out["sampled"] == "the model said: 42 (you asked 'meaning?')", out["sampled"]
    assert "denied by rule" in out["files__delete_everything"], out["files__delete_everything"]
    assert "unknown tool" in out["secret__add"], out["secret__add"]
    assert "not allowed" in out["maths__delete_everything"], out["maths__delete_everything"]
    assert out["tools_after"] == ["maths__add", "maths__ask_model", "maths__stepwise"], out["tools_after"]
    assert "files" in out["dead_call"] and "ran" not in out["dead_call"], out["dead_call"]
    assert out["maths_after"] == "10"

    # Each upstream executed exactly its own calls, with its own credential only.
    files_ran = [e["tool"] for e in fleet["files"].executions()]
    maths_ran = [e["tool"] for e in fleet["maths"].executions()]
    assert files_ran == ["add", "stepwise"], files_ran
    assert maths_ran == ["add", "stepwise", "ask_model", "add"], maths_ran
    for name, cred in (("files", "files-credential"), ("maths", "maths-credential")):
        for e in fleet[name].executions():
            assert e["headers"].get("x-upstream-key") == cred
            assert "authorization" not in e["headers"]
    assert fleet["secret"].executions() == []
    assert 'upstream "files" left out' in gw.log()


def test_another_tenant_sees_only_its_own(fleet):
    gw = fleet["gw"]
    out = {}

    async def scenario():
        headers = {"Authorization": f"Bearer {GLOBEX_KEY}"}
        async with streamablehttp_client(f"{gw.base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                out["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
                out["own"] = (await session.call_tool("add", {"a": 1, "b": 2})).content[0].text
                res = await session.call_tool("files__add", {"a": 1, "b": 2})
                out["cross"] = res.isError, res.content[0].text

    run(scenario())
    # The agent may use one upstream: /mcp is that upstream, under its own names (adding
    # upstreams the agent cannot use changes nothing it sees).
    assert out["tools"] and not any("__" in t for t in out["tools"]), out["tools"]
    assert "add" in out["tools"]
    assert out["own"] == "3"
    # Another upstream's prefixed name is only a name this upstream does not have.
    assert out["cross"][0] is True and "files__add" in out["cross"][1], out["cross"]
    assert fleet["files"].executions() == [] and fleet["maths"].executions() == []
    for e in fleet["secret"].executions():
        assert e["headers"].get("x-upstream-key") == "globex-credential"


def test_typescript_sdk_client_through_the_aggregate_endpoint(fleet):
    """The official TypeScript SDK client (npm @modelcontextprotocol/sdk) for one round."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    node_dir = Path(__file__).parent / "node"
    assert (node_dir / "node_modules" / "@modelcontextprotocol" / "sdk").exists(), "run scripts/test.sh"
    out = subprocess.run(
        [shutil.which("node") or "node", str(node_dir / "agent.mjs"), f"{fleet['gw'].base}/mcp", ACME_KEY, "maths__"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=node_dir,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["server"] == "scopegate"
    assert report["sessionId"].startswith("sg2.")
    assert report["tools"] == [
        "files__add",
        "files__ask_model",
        "files__stepwise",
        "maths__add",
        "maths__ask_model",
        "maths__stepwise",
    ]
    assert report["add"] == "42"
    assert "not allowed" in report["denied"], report["denied"]
    assert report["progress"] == [1, 2], "progress relayed to the TypeScript client"
    assert report["stepwise"].startswith("done 2 steps")
    assert [e["tool"] for e in fleet["maths"].executions()] == ["add", "stepwise"]
    assert fleet["files"].executions() == []


@pytest.fixture
def with_everything(tmp_path):
    """A gateway over npm server-everything (streamable HTTP, a server nobody here wrote) and a
    FastMCP upstream, for an agent allowed both."""
    import shutil
    import subprocess
    from pathlib import Path

    from conftest import free_port, wait_for_port

    everything = (Path(__file__).parent / "node" / "node_modules" / "@modelcontextprotocol" / "server-everything"
                  / "dist" / "index.js")
    port = free_port()

    def start():
        return subprocess.Popen([shutil.which("node") or "node", str(everything), "streamableHttp"],
                                env={**os.environ, "PORT": str(port)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    server = start()
    files = Upstream(tmp_path, "files")
    gw = None
    try:
        wait_for_port(port)
        policy = tmp_path / "policy.toml"
        policy.write_text(f"""
[[upstream]]
name = "files"
url = "{files.url}"

[[upstream]]
name = "everything"
url = "http://127.0.0.1:{port}/mcp"

[[agent]]
id = "acme-bot"
key_sha256 = "{sha256_hex(ACME_KEY)}"
allow = ["files/*", "everything/*"]
""")
        gw = Scopegate({"SCOPEGATE_POLICY": str(policy),
                        "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e"})

        def restart_everything():
            """server-everything stopped and started again on its port: its sessions are gone."""
            nonlocal server
            server.terminate()
            server.wait(timeout=10)
            server = start()
            wait_for_port(port)

        gw.restart_everything = restart_everything
        yield gw
    finally:
        if gw:
            gw.stop()
        files.stop()
        server.terminate()
        server.wait(timeout=10)


def test_resource_links_from_a_server_nobody_here_wrote_are_followed_on_mcp(with_everything):
    """server-everything (npm, streamable HTTP) beside a FastMCP upstream: the resource links and
    embedded resources its tools return are named as /mcp names resources, and reading a link
    reaches the server that gave it (issue 16, item 2)."""
    gw = with_everything
    out = {}

    async def scenario():
        headers = {"Authorization": f"Bearer {ACME_KEY}"}
        async with streamablehttp_client(f"{gw.base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as s:
                await s.initialize()
                links = await s.call_tool("everything__get-resource-links", {"count": 2})
                out["links"] = [c.uri for c in links.content if c.type == "resource_link"]
                out["read"] = [await s.read_resource(u) for u in out["links"]]
                ref = await s.call_tool("everything__get-resource-reference", {"resourceId": 2})
                out["embedded"] = [c.resource.uri for c in ref.content if c.type == "resource"]
                out["read_embedded"] = await s.read_resource(out["embedded"][0])

    run(scenario())
    assert len(out["links"]) == 2, out
    assert all(str(u).startswith("scopegate://everything/demo://") for u in out["links"]), out["links"]
    for uri, result in zip(out["links"], out["read"]):
        assert [str(c.uri) for c in result.contents] == [str(uri)], result
    assert str(out["embedded"][0]).startswith("scopegate://everything/demo://"), out["embedded"]
    assert [str(c.uri) for c in out["read_embedded"].contents] == [str(out["embedded"][0])]


def test_an_upstream_that_restarted_is_joined_again_without_the_agent_noticing(fleet):
    """FastMCP upstream restarted mid-session: its sessions are gone (404). The agent's aggregate
    session re-initializes it on the next call and goes on (issue 16, item 6)."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import wait_for_port

    gw, files = fleet["gw"], fleet["files"]
    out = {}

    async def scenario():
        headers = {"Authorization": f"Bearer {ACME_KEY}"}
        async with streamablehttp_client(f"{gw.base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as s:
                await s.initialize()
                out["before"] = (await s.call_tool("files__add", {"a": 1, "b": 2})).content[0].text
                files.proc.terminate()
                files.proc.wait(timeout=10)
                files.proc = subprocess.Popen(
                    [sys.executable, str(Path(__file__).parent / "fastmcp_upstream.py"), str(files.port),
                     str(files.log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_for_port(files.port)
                out["after"] = (await s.call_tool("files__add", {"a": 2, "b": 2})).content[0].text
                out["tools"] = [t.name for t in (await s.list_tools()).tools]
                out["maths"] = (await s.call_tool("maths__add", {"a": 3, "b": 3})).content[0].text

    run(scenario())
    assert (out["before"], out["after"], out["maths"]) == ("3", "4", "6"), out
    assert "files__add" in out["tools"]
    assert "joined upstream \"files\" for an existing session" in gw.log(), gw.log()


def test_tasks_created_on_mcp_are_followed_to_their_upstream(with_everything):
    """server-everything's task tool (simulate-research-query) called as a task on /mcp with the
    official Python SDK 1.x tasks API: the task id is /mcp's own, and tasks/get, tasks/list and
    tasks/result reach the upstream that created the task (issue 16, item 1)."""
    import warnings

    gw = with_everything
    out = {}

    async def scenario():
        headers = {"Authorization": f"Bearer {ACME_KEY}"}
        async with streamablehttp_client(f"{gw.base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as s:
                init = await s.initialize()
                out["caps"] = init.capabilities
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    x = s.experimental
                    created = await x.call_tool_as_task("everything__simulate-research-query",
                                                        {"topic": "gateways"})
                    task_id = created.task.taskId
                    out["id"] = task_id
                    out["first"] = (await x.get_task(task_id)).status
                    out["listed"] = [t.taskId for t in (await x.list_tasks()).tasks]
                    for _ in range(100):
                        state = await x.get_task(task_id)
                        if state.status in ("completed", "failed", "cancelled"):
                            break
                        await asyncio.sleep(0.2)
                    out["last"] = state.status
                    out["result"] = await x.get_task_result(task_id, types.CallToolResult)
                    try:  # the id with its agent tag changed: no agent was given it
                        await x.get_task(task_id[:-12] + "AAAAAAAA" + task_id[-4:])
                        out["foreign"] = "answered"
                    except Exception as e:
                        out["foreign"] = str(e)

    run(scenario())
    assert out["caps"].tasks is not None, out["caps"]
    assert out["id"].startswith("sgt:everything:"), out["id"]
    assert out["first"] in ("working", "completed"), out
    assert out["id"] in out["listed"], out["listed"]
    assert out["last"] == "completed", out
    text = " ".join(c.text for c in out["result"].content if c.type == "text")
    assert "gateways" in text, out["result"]
    assert out["foreign"] != "answered" and "unknown task" in out["foreign"], out["foreign"]


def test_server_everything_restarted_mid_session_is_joined_again(with_everything):
    """Issue 16, item 6, with a server nobody here wrote: server-everything restarts under an
    open aggregate session; the next call re-initializes it inside that session."""
    gw = with_everything
    out = {}

    async def scenario():
        headers = {"Authorization": f"Bearer {ACME_KEY}"}
        async with streamablehttp_client(f"{gw.base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as s:
                await s.initialize()
                out["before"] = (await s.call_tool("everything__echo", {"message": "one"})).content[0].text
                gw.restart_everything()
                out["after"] = (await s.call_tool("everything__echo", {"message": "two"})).content[0].text
                out["files"] = (await s.call_tool("files__add", {"a": 1, "b": 1})).content[0].text

    run(scenario())
    assert "one" in out["before"] and "two" in out["after"], out
    assert out["files"] == "2"
    assert "joined upstream \"everything\" for an existing session" in gw.log(), gw.log()

