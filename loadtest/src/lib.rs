//! Shared by the integration tests and the load scripts: a fast mock MCP upstream.
pub mod mock;
