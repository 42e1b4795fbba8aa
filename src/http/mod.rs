//! HTTP/1.1 framing on both sides of the gateway. No MCP knowledge lives here.
//!
//! Why not monoio-http's codec: its h1 encoder holds streaming-body chunks smaller than its
//! 8 KiB buffer until the buffer fills or the body ends, and it treats a response without length
//! or chunking as bodiless. Both break Server-Sent Events pass-through, where every event must
//! reach the agent the moment the upstream writes it. Framing is small and specified (RFC 9112),
//! so we parse heads with `httparse` and frame bodies here.

pub mod body;
pub mod conn;
pub mod framing;
pub mod head;
pub mod response;
pub mod sse;
pub mod trace;
