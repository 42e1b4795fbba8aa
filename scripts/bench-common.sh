# What scripts/bench.sh and scripts/profile.sh share: ports, the agent's key and arguments,
# and the "everything on" policy (three argument constraints, rate limits far above the load on
# agent, tool, tenant and upstream, an injected credential). Sourced, not run.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on port $1" >&2; return 1; }

KEY="bench-agent-key-0123456789"
ARGS='{"repo":"acme/web","title":"bench","labels":["a"]}'

# write_bench_policy FILE SCOPEGATE_BINARY: the policy of the "everything on" rows.
write_bench_policy() {
  local key_sha
  key_sha=$("$2" hash-key "$KEY")
  cat > "$1" <<TOML
[[tenant]]
id = "bench"
rate = { per_second = 10000000, burst = 10000000 }

[[upstream]]
name = "bench"
tenant = "bench"
rate = { per_second = 10000000, burst = 10000000 }
[upstream.headers]
X-Upstream-Key = "injected"

[[agent]]
id = "bench-agent"
tenant = "bench"
key_sha256 = "$key_sha"
allow = ["bench/echo"]
rate = { per_second = 10000000, burst = 10000000 }

[[agent.tool]]
match = "bench/echo"
rate = { per_second = 10000000, burst = 10000000 }
[agent.tool.args]
repo = { one_of = ["acme/web", "acme/api"] }
title = { max_len = 200 }
labels = { max_len = 5 }
TOML
}
