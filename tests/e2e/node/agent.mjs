// The official TypeScript MCP SDK as an agent: connect through scopegate, list, call, and
// report what happened as one JSON object on stdout.
//
// usage: node agent.mjs URL KEY [PREFIX]   (PREFIX: tool names on an aggregate endpoint, e.g. files__)
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, key, prefix = ""] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${key}` } },
});
const client = new Client({ name: "scopegate-e2e-ts", version: "1.0.0" });
const report = {};
await client.connect(transport);
report.server = client.getServerVersion()?.name;
report.sessionId = transport.sessionId;
report.tools = (await client.listTools()).tools.map((t) => t.name).sort();
const sum = await client.callTool({ name: `${prefix}add`, arguments: { a: 20, b: 22 } });
report.add = sum.content[0].text;
try {
  await client.callTool({ name: `${prefix}delete_everything`, arguments: {} });
  report.denied = "ran";
} catch (e) {
  report.denied = String(e.message ?? e);
}
const progress = [];
const stepped = await client.callTool(
  // The marker exists already (this script), so the tool does not wait for it.
  { name: `${prefix}stepwise`, arguments: { steps: 2, marker: process.argv[1] } },
  undefined,
  { onprogress: (p) => progress.push(p.progress), timeout: 30000 },
);
report.stepwise = stepped.content[0].text;
report.progress = progress;
await transport.terminateSession();
await client.close();
console.log(JSON.stringify(report));
