//! Shared by the integration tests and the load scripts: a fast mock MCP upstream, and the
//! load generator.
pub mod load;
pub mod mock;
