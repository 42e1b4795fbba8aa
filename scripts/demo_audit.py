"""Prints audit log lines readably: a summary per entry in time order, and the first refused
entry in full. usage: python demo_audit.py FILE...
With --executions FILE: what the demo's server executed (its own log), and whether any agent
key reached it."""

import json
import sys

if sys.argv[1] == "--executions":
    for line in open(sys.argv[2]):
        e = json.loads(line)
        key = "authorization" in e.get("headers", {})
        print(f"    {e['tool']}({e['args']})  an agent key reached the server: {key}")
    sys.exit(0)

entries = [json.loads(line) for path in sys.argv[1:] for line in open(path) if line.strip()]
entries.sort(key=lambda e: e["ts"])
for e in entries:
    print(f"    {e['ts'][11:23]} {e.get('agent', '-'):8} {e.get('method') or e.get('http', ''):26}"
          f" {e.get('name', ''):18} {e['decision']:13} {e.get('status')} {e.get('reason', '')}")
refused = [e for e in entries if e["decision"] != "allowed"]
if refused:
    print("\n    one refused entry in full:")
    print("\n".join("    " + line for line in json.dumps(refused[0], indent=2).splitlines()))
