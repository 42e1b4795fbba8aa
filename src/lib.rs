//! scopegate: a thread-per-core MCP gateway.
//!
//! The binary (`src/main.rs`) reads the configuration, binds one listener per worker and runs
//! [`worker::run`] on each core. The request path is [`pipeline`]; HTTP framing is [`http`];
//! MCP knowledge is [`mcp`].

pub mod aggregate;
pub mod alloc;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod fmt;
pub mod forward;
pub mod http;
pub mod jwt;
pub mod log;
pub mod mcp;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod ratelimit;
pub mod token;
pub mod upstream;
pub mod worker;
