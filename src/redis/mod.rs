//! A Redis client for state shared by a fleet of replicas (the fleet-wide rate limits).
//!
//! Small on purpose: the limiter needs a handful of commands (`EVALSHA` of two scripts, `PING`,
//! `AUTH`, `SELECT`, `SCRIPT LOAD`), pipelined over one connection per worker, on the worker's
//! own io_uring runtime. The Redis crates in the ecosystem bring a tokio (or async-std) runtime
//! or block the calling thread; neither fits a monoio worker, so this speaks RESP ([`resp`])
//! over scopegate's own connection code (`http::conn::Conn`, TCP or rustls TLS) and name
//! resolution (`upstream::resolve`, refreshed off the workers).
//!
//! [`Client`] is what the process shares: where Redis is, how to log in, the scripts to load,
//! whether every worker's link is up. [`Link`] is one worker's connection ([`link`]).

mod client;
pub mod link;
pub mod resp;
mod url;

pub use client::{Client, Script};
pub use link::{Done, Failure, Link};
pub use resp::Value;
pub use url::RedisUrl;
