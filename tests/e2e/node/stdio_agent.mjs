// The official TypeScript MCP SDK as an agent of a stdio upstream behind scopegate: list,
// call with progress, end the session; report what happened as one JSON object on stdout.
//
// usage: node stdio_agent.mjs URL KEY
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, key] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${key}` } },
});
const client = new Client({ name: "scopegate-e2e-ts-stdio", version: "1.0.0" });
const report = {};
await client.connect(transport);
report.server = client.getServerVersion()?.name;
report.tools = (await client.listTools()).tools.map((t) => t.name).sort();
const echoed = await client.callTool({ name: "echo", arguments: { message: "from typescript" } });
report.echo = echoed.content[0].text;
const progress = [];
const long = await client.callTool(
  { name: "trigger-long-running-operation", arguments: { duration: 1, steps: 2 } },
  undefined,
  { onprogress: (p) => progress.push(p.progress), timeout: 30000 },
);
report.long = long.content[0].text;
report.progress = progress;
try {
  await client.callTool({ name: "get-env", arguments: {} });
  report.env = "ran";
} catch (e) {
  report.env = String(e.message ?? e);
}
await transport.terminateSession();
await client.close();
console.log(JSON.stringify(report));
