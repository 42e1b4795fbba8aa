// The official TypeScript MCP SDK as an upstream (McpServer over Streamable HTTP, one session
// per client, JSON answers), for end-to-end tests. It accepts 2025-03-26 batches, as the SDK
// does. Every tool execution is appended to LOGFILE as one JSON line.
//
// usage: node upstream.mjs PORT LOGFILE
import { appendFileSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { createServer } from "node:http";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { z } from "zod";

const [port, logFile] = process.argv.slice(2);
const record = (entry) => appendFileSync(logFile, JSON.stringify(entry) + "\n");

function newServer() {
  const server = new McpServer({ name: "ts-upstream", version: "1.0.0" });
  server.registerTool(
    "add",
    { description: "Adds two numbers", inputSchema: { a: z.number(), b: z.number() } },
    async ({ a, b }) => {
      record({ tool: "add", a, b });
      return { content: [{ type: "text", text: String(a + b) }] };
    },
  );
  server.registerTool("delete_everything", { description: "No agent may see this" }, async () => {
    record({ tool: "delete_everything" });
    return { content: [{ type: "text", text: "deleted" }] };
  });
  return server;
}

const sessions = new Map();

createServer(async (req, res) => {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const text = Buffer.concat(chunks).toString();
  const body = text ? JSON.parse(text) : undefined;
  const sid = req.headers["mcp-session-id"];
  let transport = sid ? sessions.get(sid) : undefined;
  if (!transport) {
    transport = new StreamableHTTPServerTransport({
      sessionIdGenerator: () => randomUUID(),
      enableJsonResponse: true,
      onsessioninitialized: (id) => sessions.set(id, transport),
    });
    await newServer().connect(transport);
  }
  await transport.handleRequest(req, res, body);
}).listen(Number(port), "127.0.0.1");
