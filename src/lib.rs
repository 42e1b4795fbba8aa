//! scopegate: a thread-per-core MCP gateway.
//!
//! The binary (`src/main.rs`) reads the configuration, binds one listener per worker and runs
//! [`runtime::run`] on each core; each connection is served by [`serve`], whose module shows
//! the request path as its stages.
//!
//! The layers, top to bottom. A module imports only from layers below its own, and no two
//! files import each other, directly or through others; `tests/layers.rs` reads this table
//! and every `crate::`, `super::` and child-module path under `src/` to keep it so.
//!
//! ```text
//! runtime                         threads, io_uring, accept loop, drain
//! serve                           the request path's stages (ingress, route, gate, admin, record)
//! aggregate, forward              /mcp over several upstreams; one upstream's exchange and relay
//! core                            what a core's tasks share (config, pool, limiter, sessions)
//! auth, jwt, cli                  who is calling; the command-line tools
//! policy                          the policy file, every decision (one method table), its limits
//! config                          SCOPEGATE_* variables
//! ratelimit, metrics              the limiter (local, or fleet-wide through redis); counters
//! redis                           a small Redis client (RESP, one pipelined link per worker)
//! upstream                        upstreams and how they are reached
//! reply                           what scopegate answers itself (one reply type)
//! audit                           the audit log
//! integrity                       tool definitions: digests, the pin file, the poison scan
//! mcp, http                       MCP and HTTP knowledge, no policy
//! tls                             rustls streams, PEM files, CA stores, handshake failures
//! glob, log, token, alloc, timer  small helpers
//! fmt                             writing numbers, and which characters a reader cannot see
//! ```

pub mod aggregate;
pub mod alloc;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod core;
pub mod fmt;
pub mod forward;
pub mod glob;
pub mod http;
pub mod integrity;
pub mod jwt;
pub mod log;
pub mod mcp;
pub mod metrics;
pub mod policy;
pub mod ratelimit;
pub mod redis;
pub mod reply;
pub mod runtime;
pub mod serve;
pub mod timer;
pub mod tls;
pub mod token;
pub mod upstream;
