//! MCP knowledge: the JSON-RPC envelope, scopegate's own JSON-RPC errors, and the Streamable
//! HTTP transport's rules (origin checks, which headers travel).

pub mod caps;
pub mod envelope;
pub mod jsonrpc;
pub mod lists;
pub mod modern;
pub mod origin;
pub mod session;
pub mod tape;
pub mod uri;
