// The official TypeScript MCP SDK as an agent: list the tools it is shown, with their
// descriptions, as one JSON object on stdout ({"name": "description", ...}).
//
// usage: node list_tools.mjs URL KEY
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, key] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${key}` } },
});
const client = new Client({ name: "scopegate-e2e-ts-list", version: "1.0.0" });
await client.connect(transport);
const tools = {};
for (const t of (await client.listTools()).tools) tools[t.name] = t.description ?? null;
await transport.terminateSession();
await client.close();
console.log(JSON.stringify(tools));
