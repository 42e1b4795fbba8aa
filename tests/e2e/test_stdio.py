"""stdio upstreams: real stdio MCP servers started by scopegate, one process per agent session,
with the official SDK clients as agents. Ground truth comes from the servers themselves (the
filesystem they write, the environment they report) and from /proc (which processes exist)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mcp.types as types
from conftest import AGENT_KEY, OTHER_KEY, Scopegate, Upstream, sha256_hex
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODULES = HERE / "node" / "node_modules" / "@modelcontextprotocol"
FILESYSTEM = ["node", str(MODULES / "server-filesystem" / "dist" / "index.js")]
EVERYTHING = ["node", str(MODULES / "server-everything" / "dist" / "index.js"), "stdio"]
GIT = [str(ROOT / ".venv-git" / "bin" / "mcp-server-git")]


def run(coro, timeout=90):
    return asyncio.run(asyncio.wait_for(coro, timeout=timeout))


def toml_list(words):
    return "[" + ", ".join(json.dumps(str(w)) for w in words) + "]"


def gateway(tmp_path, upstreams: str, agents: str, env: dict | None = None) -> Scopegate:
    policy = tmp_path / "policy.toml"
    policy.write_text(upstreams + "\n" + agents)
    return Scopegate(
        {
            "SCOPEGATE_POLICY": str(policy),
            "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e",
            "SCOPEGATE_AUDIT_DIR": str(tmp_path / "audit"),
            "SCOPEGATE_AUDIT_FLUSH_MS": "20",
            "SCOPEGATE_LOG": "info",
            **(env or {}),
        }
    )


def stdio_upstream(name: str, command: list, extra: str = "") -> str:
    """An `[[upstream]]` table for a stdio server, with any further fields in `extra`."""
    return f"""
[[upstream]]
name = "{name}"
command = {toml_list(command)}
{extra}
"""


def agent(id_: str, key: str, allow: list[str], extra: str = "") -> str:
    return f"""
[[agent]]
id = "{id_}"
key_sha256 = "{sha256_hex(key)}"
allow = {toml_list(allow)}
{extra}
"""


def pids_with(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (a test's own temp path), zombies aside."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state not in ("Z", "X") and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def wait_until(check, limit=10.0):
    end = time.time() + limit
    while time.time() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()


def audit_entries(tmp_path: Path) -> list[dict]:
    entries = []
    for f in sorted((tmp_path / "audit").glob("*.jsonl")):
        entries += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return entries


async def in_session(url, key, scenario, terminate=True, **session_args):
    headers = {"Authorization": f"Bearer {key}"}
    async with streamablehttp_client(url, headers=headers, terminate_on_close=terminate) as (r, w, sid):
        async with ClientSession(r, w, **session_args) as session:
            await session.initialize()
            return await scenario(session, sid())


async def refused(coro) -> str:
    try:
        await coro
    except McpError as e:
        return str(e)
    return "ran"


def test_filesystem_server_confines_an_agent_to_one_directory(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("hello from a")
    (tmp_path / "secret.txt").write_text("the secret")
    upstreams = stdio_upstream("fs", FILESYSTEM + [data])
    prefix = f"{data}/"
    rules = f"""
[[agent.tool]]
match = "fs/*"
[agent.tool.args]
path = {{ prefix = "{prefix}" }}
paths = {{ items = {{ prefix = "{prefix}" }} }}
"""
    allow = ["fs/read_text_file", "fs/read_multiple_files", "fs/write_file", "fs/list_allowed_directories"]
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, allow, rules))
    out = {}

    async def scenario(s: ClientSession, sid):
        out["sid"] = sid
        out["tools"] = sorted(t.name for t in (await s.list_tools()).tools)
        out["pids"] = pids_with(str(data))
        r = await s.call_tool("read_text_file", {"path": f"{data}/a.txt"})
        out["read"] = r.content[0].text
        out["outside"] = await refused(s.call_tool("read_text_file", {"path": str(tmp_path / "secret.txt")}))
        out["dotdot"] = await refused(s.call_tool("read_text_file", {"path": f"{data}/../secret.txt"}))
        out["multiple"] = await refused(
            s.call_tool("read_multiple_files", {"paths": [f"{data}/a.txt", str(tmp_path / "secret.txt")]})
        )
        r = await s.call_tool("read_multiple_files", {"paths": [f"{data}/a.txt"]})
        out["multiple_ok"] = r.content[0].text
        out["write_outside"] = await refused(
            s.call_tool("write_file", {"path": str(tmp_path / "planted.txt"), "content": "x"})
        )
        await s.call_tool("write_file", {"path": f"{data}/written.txt", "content": "inside"})
        out["hidden"] = await refused(s.call_tool("move_file", {"source": "a", "destination": "b"}))

    try:
        run(in_session(f"{g.base}/mcp/fs", AGENT_KEY, scenario))
        assert out["tools"] == sorted(a.split("/")[1] for a in allow), out["tools"]
        assert out["read"] == "hello from a"
        assert "must start with" in out["outside"], out["outside"]
        assert '".."' in out["dotdot"], out["dotdot"]
        assert "item 1" in out["multiple"], out["multiple"]
        assert "hello from a" in out["multiple_ok"]
        assert "must start with" in out["write_outside"]
        assert "not allowed" in out["hidden"], out["hidden"]
        # The server's own filesystem: the refused write never happened, the allowed one did.
        assert not (tmp_path / "planted.txt").exists()
        assert (data / "written.txt").read_text() == "inside"
        # One process for the session, gone after the client's DELETE.
        assert len(out["pids"]) == 1, out["pids"]
        assert wait_until(lambda: not pids_with(str(data))), pids_with(str(data))
        assert out["sid"].startswith("sg1.")
    finally:
        g.stop()


def test_everything_server_progress_sampling_elicitation_and_a_scrubbed_environment(tmp_path):
    marker = str(tmp_path)
    upstreams = stdio_upstream("everything", EVERYTHING, f"""
cwd = "{marker}"
env = {{ E2E_LISTED = "${{E2E_LISTED_SOURCE}}" }}
""")
    g = gateway(
        tmp_path,
        upstreams,
        agent("agent", AGENT_KEY, ["everything/*"]),
        {"E2E_LISTED_SOURCE": "listed-value", "E2E_NOT_LISTED": "must-not-leak"},
    )
    out = {"progress": []}

    async def sampling(context, params: types.CreateMessageRequestParams):
        out["sampling_asked"] = params.messages[0].content.text
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="sampled by the agent"),
            model="e2e-model",
        )

    async def elicitation(context, params):
        out["elicitation_asked"] = params.message
        return types.ElicitResult(action="accept", content={"name": "Ada Lovelace", "check": True})

    async def progress(value, total, message):
        out["progress"].append(value)

    out["logs"] = []

    async def logged(params):
        out["logs"].append(params.data)

    async def scenario(s: ClientSession, sid):
        tools = {t.name for t in (await s.list_tools()).tools}
        out["tools"] = tools
        r = await s.call_tool(
            "trigger-long-running-operation", {"duration": 1, "steps": 3}, progress_callback=progress
        )
        out["long"] = r.content[0].text
        r = await s.call_tool("trigger-sampling-request", {"prompt": "write a haiku"})
        out["sampled"] = json.dumps([c.model_dump() for c in r.content])
        r = await s.call_tool("trigger-elicitation-request", {})
        out["elicited"] = json.dumps([c.model_dump() for c in r.content])
        r = await s.call_tool("get-env", {})
        out["env"] = json.loads(r.content[0].text)
        # Log messages that belong to no request come on the session's GET stream.
        await s.call_tool("toggle-simulated-logging", {})
        for _ in range(100):
            if out["logs"]:
                break
            await asyncio.sleep(0.1)

    try:
        run(in_session(f"{g.base}/mcp/everything", AGENT_KEY, scenario,
                       sampling_callback=sampling, elicitation_callback=elicitation,
                       logging_callback=logged))
        assert {"trigger-sampling-request", "trigger-elicitation-request"} <= out["tools"]
        assert out["progress"] == [1, 2, 3], out["progress"]
        assert "completed" in out["long"].lower(), out["long"]
        assert "write a haiku" in out["sampling_asked"]
        assert "sampled by the agent" in out["sampled"], out["sampled"]
        assert out["elicitation_asked"]
        assert "Ada Lovelace" in out["elicited"], out["elicited"]
        # Only PATH, HOME, LANG and what the upstream lists; nothing of scopegate's own.
        names = set(out["env"])
        assert "E2E_LISTED" in names and out["env"]["E2E_LISTED"] == "listed-value"
        assert not any(n.startswith("SCOPEGATE_") for n in names), names
        assert "E2E_NOT_LISTED" not in names and "E2E_LISTED_SOURCE" not in names, names
        assert names <= {"PATH", "HOME", "LANG", "E2E_LISTED"}, names
        assert out["logs"], "no log message reached the agent's GET stream"
    finally:
        g.stop()


def test_typescript_sdk_agent_on_a_stdio_upstream(tmp_path):
    upstreams = stdio_upstream("everything", EVERYTHING + [tmp_path])
    g = gateway(
        tmp_path,
        upstreams,
        agent("agent", AGENT_KEY, ["everything/echo", "everything/trigger-long-running-operation"]),
    )
    try:
        done = subprocess.run(
            ["node", str(HERE / "node" / "stdio_agent.mjs"), f"{g.base}/mcp/everything", AGENT_KEY],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["tools"] == ["echo", "trigger-long-running-operation"]
        assert "from typescript" in report["echo"]
        assert report["progress"] == [1, 2], report
        assert "not allowed" in report["env"], report["env"]
        assert wait_until(lambda: not pids_with(str(tmp_path))), "the process outlived its session"
    finally:
        g.stop()


def sdk2_agent(url: str, key: str, tool: str, arguments: dict) -> dict:
    """The Python SDK 2.x agent (tests/e2e/sdk2_agent.py, in .venv-git): its report."""
    done = subprocess.run(
        [str(ROOT / ".venv-git" / "bin" / "python"), str(HERE / "sdk2_agent.py"),
         url, key, tool, json.dumps(arguments)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_python_sdk_2_agent_probes_then_initializes_and_leaves_no_probe_process(tmp_path):
    upstreams = stdio_upstream("py", python_server(tmp_path))
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, ["py/echo"]))
    try:
        report = sdk2_agent(f"{g.base}/mcp/py", AGENT_KEY, "echo", {"text": "from sdk 2"})
        # The server speaks an earlier revision: the client's server/discover probe is refused
        # by it, and the client falls back to initialize.
        assert report["version"] != "2026-07-28", report
        assert report["tools"] == ["echo"]
        assert report["result"] == "from sdk 2"
        # The process started for the sessionless probe ended when the server refused it, and
        # the session's ended with the client's DELETE.
        assert wait_until(lambda: not pids_with(str(tmp_path))), pids_with(str(tmp_path))
    finally:
        g.stop()


def test_sessionless_2026_07_28_requests_get_one_process_per_agent(tmp_path):
    # mcp-server-git is built on the Python SDK 2.x: it speaks 2026-07-28, so the SDK 2.x
    # client's server/discover probe succeeds and every request after it carries no session.
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "-C", str(repo), "init", "-q"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=e2e", "-c", "user.email=e@x",
                    "commit", "-q", "--allow-empty", "-m", "sessionless"], check=True)
    upstreams = stdio_upstream("git", GIT + ["--repository", repo])
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, ["git/git_log"]) + agent("other", OTHER_KEY, ["git/git_log"]))

    def run_agent(key):
        return sdk2_agent(f"{g.base}/mcp/git", key, "git_log", {"repo_path": str(repo)})

    try:
        first = run_agent(AGENT_KEY)
        assert first["version"] == "2026-07-28", first
        assert first["tools"] == ["git_log"]
        assert "sessionless" in first["result"]
        assert len(pids_with(str(repo))) == 1
        # The same agent again: the same process; another agent: its own.
        run_agent(AGENT_KEY)
        assert len(pids_with(str(repo))) == 1
        run_agent(OTHER_KEY)
        assert len(pids_with(str(repo))) == 2
    finally:
        g.stop()
    assert wait_until(lambda: not pids_with(str(repo)))


def test_git_server_in_python_on_a_repository_made_here(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=e2e", "-c", "user.email=e2e@example.com"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (repo / "README").write_text("first\n")
    subprocess.run(git + ["add", "README"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "the first commit"], check=True)
    (repo / "README").write_text("changed\n")
    upstreams = stdio_upstream("git", GIT + ["--repository", repo])
    rules = f"""
[[agent.tool]]
match = "git/*"
[agent.tool.args]
repo_path = {{ one_of = ["{repo}"] }}
"""
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, ["git/git_log", "git/git_status", "git/git_diff_unstaged"], rules))
    out = {}

    async def scenario(s: ClientSession, sid):
        out["tools"] = sorted(t.name for t in (await s.list_tools()).tools)
        r = await s.call_tool("git_log", {"repo_path": str(repo)})
        out["log"] = r.content[0].text
        r = await s.call_tool("git_diff_unstaged", {"repo_path": str(repo)})
        out["diff"] = r.content[0].text
        out["commit"] = await refused(s.call_tool("git_commit", {"repo_path": str(repo), "message": "x"}))
        out["elsewhere"] = await refused(s.call_tool("git_status", {"repo_path": str(tmp_path)}))

    try:
        run(in_session(f"{g.base}/mcp/git", AGENT_KEY, scenario))
        assert out["tools"] == ["git_diff_unstaged", "git_log", "git_status"], out["tools"]
        assert "the first commit" in out["log"]
        assert "+changed" in out["diff"]
        assert "not allowed" in out["commit"]
        assert "must be one of" in out["elsewhere"] or "one_of" in out["elsewhere"], out["elsewhere"]
        log = subprocess.run(git + ["log", "--oneline"], capture_output=True, text=True).stdout
        assert len(log.splitlines()) == 1, "a refused commit reached the repository"
    finally:
        g.stop()


def python_server(tmp_path) -> list[str]:
    # The temp path as an extra argument marks the test's processes in /proc.
    return [sys.executable, str(HERE / "stdio_server.py"), str(tmp_path)]


def test_a_child_that_crashes_or_breaks_the_protocol_ends_its_session_with_a_clear_error(tmp_path):
    upstreams = stdio_upstream("py", python_server(tmp_path))
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, ["py/*"]))
    out = {}

    async def crash(s: ClientSession, sid):
        out["pid"] = (await s.call_tool("pid", {})).content[0].text
        # None of scopegate's descriptors (agents' connections, the listener) reached the child.
        out["sockets"] = (await s.call_tool("tcp_sockets", {})).structuredContent
        await s.call_tool("noisy", {})
        out["crash"] = await refused(s.call_tool("crash", {}))
        out["after"] = await refused(s.call_tool("echo", {"text": "x"}))

    async def garbage(s: ClientSession, sid):
        out["pid2"] = (await s.call_tool("pid", {})).content[0].text
        out["garbage"] = await refused(s.call_tool("garbage", {}))

    try:
        run(in_session(f"{g.base}/mcp/py", AGENT_KEY, crash, terminate=False))
        assert out["sockets"] == {"result": []}, out["sockets"]
        assert "exit code 3" in out["crash"], out["crash"]
        # The session ended with its process: the SDK is told (404) and must initialize again.
        assert "ran" != out["after"]
        run(in_session(f"{g.base}/mcp/py", AGENT_KEY, garbage))
        assert out["pid2"] != out["pid"], "a new session gets a new process"
        assert "not JSON-RPC" in out["garbage"], out["garbage"]
        assert wait_until(lambda: not pids_with(str(tmp_path)))
        assert wait_until(lambda: sum(e.get("decision") == "upstream_error" for e in audit_entries(tmp_path)) >= 2)
        failed = [e for e in audit_entries(tmp_path) if e.get("decision") == "upstream_error"]
        assert any("exit code 3" in e.get("reason", "") for e in failed), failed
        assert any("not JSON-RPC" in e.get("reason", "") for e in failed), failed
        # Its stderr is scopegate's log, never the agent's, and rate-limited there.
        assert "[py]" in g.log()
        noise = [line for line in g.log().splitlines() if "[py] noise " in line]
        assert 0 < len(noise) <= 20, len(noise)
        assert "stderr lines not logged: over 20/s" in g.log()
    finally:
        g.stop()


def initialize(base: str, key: str, path: str = "/mcp/py") -> httpx.Response:
    return httpx.post(
        f"{base}{path}",
        headers={"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"},
        json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "e2e", "version": "1"}}},
        timeout=30,
    )


def test_max_processes_is_a_clear_refusal_and_idle_sessions_end(tmp_path):
    upstreams = stdio_upstream("py", python_server(tmp_path), """
max_processes = 1
idle_timeout_s = 2
""")
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, ["py/*"]))
    try:
        first = initialize(g.base, AGENT_KEY)
        assert "result" in first.json(), first.text
        assert len(pids_with(str(tmp_path))) == 1
        metrics = httpx.get(f"{g.base}/metrics").text
        assert 'scopegate_stdio_processes{upstream="py"} 1\n' in metrics, metrics
        assert 'scopegate_stdio_sessions{upstream="py"} 1\n' in metrics
        second = initialize(g.base, AGENT_KEY)
        assert second.status_code == 503, second.text
        assert "max_processes" in second.json()["error"]["message"]
        # Idle past idle_timeout_s: the process ends, and the slot is free again.
        assert wait_until(lambda: not pids_with(str(tmp_path)), 15)
        third = initialize(g.base, AGENT_KEY)
        assert "result" in third.json(), third.text
    finally:
        g.stop()
    assert wait_until(lambda: not pids_with(str(tmp_path))), "scopegate's SIGTERM left a child"


def test_a_get_stream_opens_at_once_on_a_quiet_server(tmp_path):
    upstreams = stdio_upstream("py", python_server(tmp_path))
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, ["py/*"]),
                {"SCOPEGATE_UPSTREAM_TIMEOUT_MS": "2000"})
    try:
        sid = initialize(g.base, AGENT_KEY).headers["mcp-session-id"]
        headers = {"Authorization": f"Bearer {AGENT_KEY}", "Mcp-Session-Id": sid,
                   "Accept": "text/event-stream"}
        # The server says nothing; the stream still opens (and outlives the upstream timeout).
        with httpx.stream("GET", f"{g.base}/mcp/py", headers=headers, timeout=10) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            time.sleep(3)
        r = httpx.post(f"{g.base}/mcp/py", headers={**headers, "Accept": "application/json, text/event-stream"},
                       json={"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                             "params": {"name": "echo", "arguments": {"text": "after"}}}, timeout=10)
        assert r.json()["result"]["content"][0]["text"] == "after", r.text
    finally:
        g.stop()


def test_shared_process_serves_many_sessions_with_their_own_answers(tmp_path):
    upstreams = stdio_upstream("py", python_server(tmp_path), """
share = true
""")
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, ["py/*"]) + agent("other", OTHER_KEY, ["py/echo"]))
    results = {}
    running = []

    async def one(key, word):
        async def scenario(s: ClientSession, sid):
            texts = []
            for i in range(5):
                texts.append((await s.call_tool("echo", {"text": f"{word}-{i}"})).content[0].text)
                running.append(len(pids_with(str(tmp_path))))
            return texts
        results[word] = await in_session(f"{g.base}/mcp/py", key, scenario)

    async def all_at_once():
        await asyncio.gather(*(one(AGENT_KEY if i % 2 else OTHER_KEY, f"w{i}") for i in range(6)))

    try:
        run(all_at_once())
        for word, texts in results.items():
            assert texts == [f"{word}-{i}" for i in range(5)], (word, texts)
        assert set(running) == {1}, "one process for every session"
    finally:
        g.stop()
    assert wait_until(lambda: not pids_with(str(tmp_path)))


def test_aggregate_endpoint_mixes_stdio_and_http_upstreams(tmp_path):
    http = Upstream(tmp_path)
    upstreams = f"""
[[upstream]]
name = "files"
url = "{http.url}"

[[upstream]]
name = "py"
command = {toml_list(python_server(tmp_path))}
"""
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, ["files/add", "py/echo"]))
    out = {}

    async def scenario(s: ClientSession, sid):
        out["tools"] = sorted(t.name for t in (await s.list_tools()).tools)
        out["add"] = (await s.call_tool("files__add", {"a": 2, "b": 3})).content[0].text
        out["echo"] = (await s.call_tool("py__echo", {"text": "through /mcp"})).content[0].text

    try:
        run(in_session(f"{g.base}/mcp", AGENT_KEY, scenario))
        assert out["tools"] == ["files__add", "py__echo"], out["tools"]
        assert out["add"] == "5"
        assert out["echo"] == "through /mcp"
        assert wait_until(lambda: not pids_with(str(tmp_path) + " ") and not [
            p for p in pids_with(str(tmp_path)) if p != http.proc.pid
        ])
    finally:
        g.stop()
        http.stop()


def test_aggregate_asks_a_tools_only_server_for_tools_only(tmp_path):
    """server-filesystem advertises tools only: with fail-closed on, prompts and resources lists
    on /mcp still answer (FastMCP's), and nothing is counted or logged as a failure."""
    http = Upstream(tmp_path)
    (tmp_path / "srv").mkdir()
    upstreams = f"""
[[upstream]]
name = "files"
url = "{http.url}"
""" + stdio_upstream("fs", FILESYSTEM + [str(tmp_path / "srv")])
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, ["files/*", "fs/*"]),
                env={"SCOPEGATE_AGGREGATE_FAIL_CLOSED": "1"})
    out = {}

    async def scenario(s: ClientSession, sid):
        out["tools"] = sorted(t.name for t in (await s.list_tools()).tools)
        out["prompts"] = [p.name for p in (await s.list_prompts()).prompts]
        out["resources"] = [str(r.uri) for r in (await s.list_resources()).resources]
        out["templates"] = (await s.list_resource_templates()).resourceTemplates

    try:
        run(in_session(f"{g.base}/mcp", AGENT_KEY, scenario))
        assert "files__add" in out["tools"] and "fs__read_text_file" in out["tools"], out["tools"]
        assert all(not p.startswith("fs__") for p in out["prompts"])
        assert "left out" not in g.log(), g.log()
        metrics = httpx.get(f"{g.base}/metrics").text
        assert 'scopegate_aggregate_upstream_failures_total{upstream="fs"} 0' in metrics, metrics
    finally:
        g.stop()
        http.stop()


def test_policy_reload_removing_an_agent_ends_its_processes(tmp_path):
    upstreams = stdio_upstream("py", python_server(tmp_path))
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, ["py/*"]) + agent("other", OTHER_KEY, ["py/*"]))
    try:
        assert "result" in initialize(g.base, AGENT_KEY).json()
        assert "result" in initialize(g.base, OTHER_KEY).json()
        assert len(pids_with(str(tmp_path))) == 2
        (tmp_path / "policy.toml").write_text(upstreams + agent("agent", AGENT_KEY, ["py/*"]))
        g.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: len(pids_with(str(tmp_path))) == 1), pids_with(str(tmp_path))
    finally:
        g.stop()


def test_no_child_outlives_a_sigkilled_scopegate(tmp_path):
    upstreams = f"""
[[upstream]]
name = "py"
command = {toml_list(python_server(tmp_path))}

[[upstream]]
name = "everything"
command = {toml_list(["npx", "--no-install", "mcp-server-everything", "stdio", tmp_path])}
cwd = "{HERE / 'node'}"
startup_timeout_s = 60
"""
    g = gateway(tmp_path, upstreams, agent("agent", AGENT_KEY, ["py/*", "everything/*"]),
                {"PATH": f"{HERE / 'node' / 'node_modules' / '.bin'}:{os.environ['PATH']}"})
    try:
        assert "result" in initialize(g.base, AGENT_KEY).json()
        assert "result" in initialize(g.base, AGENT_KEY, "/mcp/everything").json()
        # npx and the server it starts: a group of processes per session.
        assert len(pids_with(str(tmp_path))) >= 3, pids_with(str(tmp_path))
        g.proc.send_signal(signal.SIGKILL)
        g.proc.wait(timeout=10)
        assert wait_until(lambda: not pids_with(str(tmp_path)), 15), pids_with(str(tmp_path))
    finally:
        g.stop()


def test_a_missing_executable_stops_start_naming_it(tmp_path):
    from conftest import SCOPEGATE

    policy = tmp_path / "policy.toml"
    policy.write_text(
        """
[[upstream]]
name = "fs"
command = ["no-such-mcp-server-here", "/srv"]
"""
        + agent("agent", AGENT_KEY, ["fs/*"])
    )
    done = subprocess.run(
        [SCOPEGATE],
        env={"PATH": os.environ["PATH"], "SCOPEGATE_POLICY": str(policy), "SCOPEGATE_LISTEN": "127.0.0.1:0"},
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert '"no-such-mcp-server-here" is not an executable file on PATH' in done.stderr
    assert "policy.toml:4: upstream.command" in done.stderr  # the line of `command`
