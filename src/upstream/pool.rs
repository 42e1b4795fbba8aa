//! Each worker's keep-alive pool of upstream connections. Per worker (`RefCell`, never shared
//! across threads): a connection is taken for one exchange and given back only when the answer
//! was read to its end and the upstream did not ask to close. Connections are kept by the peer
//! they are connected to ([`PoolKey`]), not by an upstream's place in a list: a connection can
//! only ever be reused for the server it was opened to.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::http::conn::Conn;

/// How long a pooled connection may sit idle before it is dropped rather than reused. Kept
/// below common server keep-alive timeouts so we rarely reuse a connection the server is about
/// to close (uvicorn: 5 s; nginx: 75 s).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Idle connections kept per upstream per worker; beyond that, returned connections are closed.
pub const POOL_MAX_IDLE: usize = 256;

/// The peer of a pooled connection: two upstreams with the same key may share connections
/// (HTTP/1.1 names the server in each request's `Host`), no others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKey {
    Tcp(SocketAddr),
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One worker's idle upstream connections, per peer (a handful: one per upstream address).
#[derive(Default)]
pub struct Pool {
    idle: RefCell<Vec<(PoolKey, Vec<Idle>)>>,
}

impl Pool {
    pub fn new() -> Pool {
        Pool::default()
    }

    /// The most recently returned live connection to `key`, if any.
    pub fn take(&self, key: PoolKey) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        let list = &mut idle.iter_mut().find(|(k, _)| *k == key)?.1;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(conn.conn);
            }
            // Too old: the oldest are at the front, so everything left is older still.
            list.clear();
        }
        None
    }

    pub fn put(&self, key: PoolKey, mut conn: Conn) {
        let mut idle = self.idle.borrow_mut();
        let at = match idle.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                idle.push((key, Vec::new()));
                idle.len() - 1
            }
        };
        let list = &mut idle[at].1;
        if list.len() < POOL_MAX_IDLE {
            conn.buf.clear();
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}
