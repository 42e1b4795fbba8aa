"""The README's promises that are code (issue 17, items 1 and 2): its Python snippets run as
written with the SDK each names (2.x, what `pip install mcp` gives today, and 1.x) against a
gateway with a policy, and `scripts/demo.sh` shows the job and a refusal."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, SCOPEGATE, SDK2_PYTHON, Scopegate, Upstream, sha256_hex

KEY = "e2e-readme-key-0123456789"


def snippets() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    found = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        m = re.match(r"# README snippet: python sdk (\S+)\n", block)
        if m:
            found[m.group(1)] = block
    return found


def test_the_readme_python_snippets_run_with_their_sdks(tmp_path):
    found = snippets()
    assert set(found) == {"2.x", "1.x"}, found.keys()
    files = Upstream(tmp_path, "files")
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[[upstream]]
name = "files"
url = "{files.url}"

[[agent]]
id = "reader"
key_sha256 = "{sha256_hex(KEY)}"
allow = ["files/add"]
""")
    gw = Scopegate({"SCOPEGATE_POLICY": str(policy),
                    "SCOPEGATE_SESSION_SECRET": "e2e-secret-e2e-secret-e2e-secret-e2e"})
    try:
        for version, python in (("2.x", SDK2_PYTHON), ("1.x", sys.executable)):
            code = found[version].replace("http://127.0.0.1:8080", gw.base).replace("sg_...", KEY)
            out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, (version, out.stderr[-2000:])
            assert out.stdout.strip() == "['add']", (version, out.stdout)
    finally:
        gw.stop()
        files.stop()


def test_the_demo_shows_the_job():
    out = subprocess.run([str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "SCOPEGATE_BIN": SCOPEGATE})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    for seen in ["analyst: tools/list shows add, ask_model, stepwise",
                 "analyst: add({'a': 2, 'b': 3}) -> 5",
                 'REFUSED: tool maths/delete_everything is denied by rule "maths/delete_*"',
                 'REFUSED: argument "a" of maths/add is 1000, above the maximum 100',
                 'REFUSED: rate limited by agent "analyst"',
                 "intern: tools/list shows add\n",
                 "an agent key reached the server: False",
                 "every chain intact"]:
        assert seen in text, (seen, text[-4000:])
    assert "an agent key reached the server: True" not in text
