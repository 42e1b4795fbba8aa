"""The security review's classes against an official-SDK upstream (FastMCP, Python `mcp` 1.x),
whose own log says what ran. Each test first shows the attack works on the upstream directly
(the SDK normalises URIs, replays streams), then that it does not through scopegate, on
/mcp/<upstream> and on the aggregate /mcp."""

import json

import httpx
import pytest

from conftest import Scopegate, Upstream, sha256_hex

KEY = "security-e2e-key-0123456789"
SECRET = "security-e2e-secret-security-e2e-secret"

SPELLINGS = [
    "FILE:///etc/secret",
    "File:///etc/./secret",
    "file:///srv/../etc/secret",
    "file://localhost/etc/secret",
    "file:/etc/secret",
    "file:////etc/secret",
    "file:///%65tc/secret",
    "file:///etc\\secret",
    " file:///etc/secret",
    "file:///etc//../secret",
    "file://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/etc/secret",
    "file://local\u00adhost/etc/secret",
    "file://LocalHost/etc/secret",
    "file:///etc/./x/../secret",
    "file:///etc/secret#x",
    "file:///etc/secret?x",
]


class Agent:
    """A raw MCP client over httpx: every byte it sends is the test's choice."""

    def __init__(self, url: str, key: str | None = None, version: str = "2025-11-25"):
        self.url = url
        self.http = httpx.Client(timeout=20)
        self.headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.version = version
        self.ids = iter(range(1, 10_000))

    def post(self, message) -> httpx.Response:
        return self.http.post(self.url, content=json.dumps(message), headers=self.headers)

    def initialize(self) -> None:
        r = self.post(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {"protocolVersion": self.version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
            }
        )
        assert r.status_code == 200, r.text
        if "mcp-session-id" in r.headers:
            self.headers["Mcp-Session-Id"] = r.headers["mcp-session-id"]
        self.headers["MCP-Protocol-Version"] = self.version
        r = self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert r.status_code == 202, r.text

    def rpc(self, method: str, params: dict | None = None) -> dict:
        """The JSON-RPC answer to one request (from a JSON body or an event stream)."""
        message = {"jsonrpc": "2.0", "id": next(self.ids), "method": method}
        if params is not None:
            message["params"] = params
        r = self.post(message)
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            for event in events(r.text):
                data = event.get("data")
                if data and '"id"' in data:
                    answer = json.loads(data)
                    if answer.get("id") == message["id"]:
                        return answer
            raise AssertionError(f"no answer in {r.text!r}")
        return r.json()


def events(text: str) -> list[dict]:
    """The events of an event-stream body: {"id": .., "data": ..}."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event = {}
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                event["data"] = event["data"] + "\n" + value if "data" in event else value
            elif field == "id":
                event["id"] = value
        if event:
            out.append(event)
    return out


def ran(upstream: Upstream, kind: str) -> list[dict]:
    return [e for e in upstream.executions() if e["kind"] == kind]


POLICY = """
[[upstream]]
name = "files"

{extra_upstream}

[[agent]]
id = "agent"
key_sha256 = "{key}"
allow = ["files/add"{extra_allow}]
deny = ["files/prompt:admin_*", "files/resource:file:///etc/*"]

[[agent.tool]]
match = "files/add"
[agent.tool.args]
a = {{ max = 10000000000000000 }}
"""


@pytest.fixture
def files(tmp_path):
    u = Upstream(tmp_path, "files", script="secure_upstream.py")
    yield u
    u.stop()


def gateway(tmp_path, upstreams: dict[str, Upstream]) -> Scopegate:
    extra = "\n".join(f'[[upstream]]\nname = "{n}"' for n in upstreams if n != "files")
    policy = tmp_path / "policy.toml"
    extra_allow = "".join(f', "{n}/add"' for n in upstreams if n != "files")
    policy.write_text(POLICY.format(key=sha256_hex(KEY), extra_upstream=extra, extra_allow=extra_allow))
    return Scopegate(
        {
            "SCOPEGATE_POLICY": str(policy),
            "SCOPEGATE_UPSTREAMS": ",".join(f"{n}={u.url}" for n, u in upstreams.items()),
            "SCOPEGATE_SESSION_SECRET": SECRET,
        }
    )


@pytest.fixture
def single(files, tmp_path):
    g = gateway(tmp_path, {"files": files})
    yield g
    g.stop()


@pytest.fixture
def calc(tmp_path):
    u = Upstream(tmp_path, "calc")
    yield u
    u.stop()


@pytest.fixture
def aggregate(files, calc, tmp_path):
    g = gateway(tmp_path, {"files": files, "calc": calc})
    yield g
    g.stop()


def test_the_sdk_reads_the_secret_under_every_spelling_directly(files):
    """Ground truth: the upstream normalises these spellings and reads /etc/secret."""
    direct = Agent(files.url)
    direct.initialize()
    for uri in SPELLINGS:
        answer = direct.rpc("resources/read", {"uri": uri})
        # This SDK does not decode %65 to "e" (another server may): refused by scopegate all
        # the same, as the canonical form decodes unreserved characters.
        assert ("SECRET" in json.dumps(answer)) == ("%65" not in uri), (uri, answer)


def test_no_spelling_of_a_denied_resource_is_read_through_scopegate(files, single):
    agent = Agent(f"{single.base}/mcp/files", KEY)
    agent.initialize()
    for uri in SPELLINGS:
        answer = agent.rpc("resources/read", {"uri": uri})
        assert answer["error"]["code"] == -32004, (uri, answer)
    assert ran(files, "read") == []
    # What is allowed is read.
    answer = agent.rpc("resources/read", {"uri": "file:///srv/notes"})
    assert "contents of /srv/notes" in json.dumps(answer), answer
    assert ran(files, "read") == [{"kind": "read", "uri": "file:///srv/notes"}]


def test_no_spelling_of_a_denied_resource_is_read_through_the_aggregate(files, aggregate):
    agent = Agent(f"{aggregate.base}/mcp", KEY)
    agent.initialize()
    for uri in SPELLINGS:
        answer = agent.rpc("resources/read", {"uri": f"scopegate://files/{uri}"})
        assert answer["error"]["code"] == -32004, (uri, answer)
    assert ran(files, "read") == []
    answer = agent.rpc("resources/read", {"uri": "scopegate://files/file:///srv/notes"})
    assert "contents of /srv/notes" in json.dumps(answer), answer


@pytest.mark.parametrize("endpoint", ["single", "aggregate"])
def test_completion_of_a_denied_prompt_or_template_never_reaches_the_upstream(files, request, endpoint):
    g = request.getfixturevalue(endpoint)
    agent = Agent(f"{g.base}/mcp/files" if endpoint == "single" else f"{g.base}/mcp", KEY)
    agent.initialize()
    prefix = "" if endpoint == "single" else "files__"
    scope = "" if endpoint == "single" else "scopegate://files/"
    denied = [
        {"type": "ref/prompt", "name": f"{prefix}admin_reset"},
        {"type": "ref/resource", "uri": f"{scope}FILE:///etc/{{name}}"},
    ]
    for ref in denied:
        answer = agent.rpc("completion/complete", {"ref": ref, "argument": {"name": "target", "value": ""}})
        assert answer["error"]["code"] == -32004, (ref, answer)
    assert ran(files, "complete") == []
    answer = agent.rpc(
        "completion/complete",
        {"ref": {"type": "ref/prompt", "name": f"{prefix}summarize"}, "argument": {"name": "text", "value": ""}},
    )
    assert answer["result"]["completion"]["values"] == ["a", "b"], answer
    assert ran(files, "complete") == [{"kind": "complete", "ref": "prompt:summarize"}]


def list_then_resume(agent: Agent) -> tuple[str, str]:
    """tools/list answered on an event stream, then a GET resuming after its first event:
    (the list as first answered, the replay)."""
    r = agent.post({"jsonrpc": "2.0", "id": 77, "method": "tools/list"})
    assert r.headers["content-type"].startswith("text/event-stream"), r.headers
    first = events(r.text)
    assert first and "id" in first[0], r.text
    resume = dict(agent.headers, Accept="text/event-stream")
    resume["Last-Event-ID"] = first[0]["id"]
    with agent.http.stream("GET", agent.url, headers=resume) as replay:
        assert replay.status_code == 200, replay.read()
        got = ""
        for piece in replay.iter_text():
            got += piece
            if '"id":77' in got.replace(" ", ""):
                break
    return r.text, got


def test_a_resumed_stream_replays_the_hidden_tool_directly(files):
    """Ground truth: resuming the stream makes the upstream replay its whole list."""
    direct = Agent(files.url)
    direct.initialize()
    first, replay = list_then_resume(direct)
    assert "delete_everything" in first
    assert "delete_everything" in replay


def test_a_resumed_stream_never_replays_a_hidden_tool_through_scopegate(files, single):
    agent = Agent(f"{single.base}/mcp/files", KEY)
    agent.initialize()
    first, replay = list_then_resume(agent)
    assert '"add"' in first and "delete_everything" not in first, first
    assert '"add"' in replay, replay
    assert "delete_everything" not in replay, replay


class NodeUpstream:
    """The official TypeScript SDK's McpServer (tests/e2e/node/upstream.mjs)."""

    def __init__(self, tmp_path):
        import subprocess
        from pathlib import Path

        from conftest import free_port, wait_for_port

        self.port = free_port()
        self.log = tmp_path / "ts-executions.jsonl"
        self.log.touch()
        node_dir = Path(__file__).parent / "node"
        self.proc = subprocess.Popen(
            ["node", "upstream.mjs", str(self.port), str(self.log)],
            cwd=node_dir,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "ts-upstream.stderr", "w"),
        )
        wait_for_port(self.port)
        self.url = f"http://127.0.0.1:{self.port}/mcp"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_a_batch_never_lists_a_hidden_tool(tmp_path):
    ts = NodeUpstream(tmp_path)
    policy = tmp_path / "ts-policy.toml"
    policy.write_text(
        f"""
[[upstream]]
name = "ts"
[[agent]]
id = "agent"
key_sha256 = "{sha256_hex(KEY)}"
allow = ["ts/add"]
"""
    )
    g = Scopegate({"SCOPEGATE_POLICY": str(policy), "SCOPEGATE_UPSTREAMS": f"ts={ts.url}"})
    try:
        batch = [
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
            {"jsonrpc": "2.0", "id": 3, "method": "ping"},
        ]
        # Ground truth: the SDK answers the batch with its whole list.
        direct = Agent(ts.url, version="2025-03-26")
        direct.initialize()
        assert "delete_everything" in direct.post(batch).text
        # Through scopegate, on a 2025-03-26 session.
        agent = Agent(f"{g.base}/mcp/ts", KEY, version="2025-03-26")
        agent.initialize()
        r = agent.post(batch)
        assert r.status_code == 200, r.text
        answers = {a["id"]: a for a in r.json()}
        assert [t["name"] for t in answers[2]["result"]["tools"]] == ["add"], r.text
        assert answers[3]["result"] == {}
    finally:
        g.stop()
        ts.stop()


def test_a_number_just_above_its_bound_never_executes(files, single):
    """Python reads integers exactly, so a bound compared as a double (10^16 + 1 == 10^16)
    would let the call run."""
    direct = Agent(files.url)
    direct.initialize()
    answer = direct.rpc("tools/call", {"name": "add", "arguments": {"a": 10000000000000001, "b": 0}})
    assert "10000000000000001" in json.dumps(answer), answer
    executed_directly = len(ran(files, "tool"))
    agent = Agent(f"{single.base}/mcp/files", KEY)
    agent.initialize()
    for a in [10000000000000001, 18446744073709551615]:
        answer = agent.rpc("tools/call", {"name": "add", "arguments": {"a": a, "b": 0}})
        assert answer["error"]["code"] == -32004, answer
    # A decimal past 2^53 has no exact reading here: refused, not compared.
    answer = agent.rpc("tools/call", {"name": "add", "arguments": {"a": 1e16, "b": 0}})
    assert answer["error"]["code"] == -32004, answer
    assert len(ran(files, "tool")) == executed_directly
    answer = agent.rpc("tools/call", {"name": "add", "arguments": {"a": 10000000000000000, "b": 0}})
    assert "10000000000000000" in json.dumps(answer), answer
    assert ran(files, "tool")[-1] == {"kind": "tool", "name": "add", "a": 10000000000000000, "b": 0}
