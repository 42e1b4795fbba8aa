//! Each worker's keep-alive pool of upstream connections. Per worker (`RefCell`, never shared
//! across threads): a connection is taken for one exchange and given back only when the answer
//! was read to its end and the upstream did not ask to close.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use crate::http::conn::Conn;

/// How long a pooled connection may sit idle before it is dropped rather than reused. Kept
/// below common server keep-alive timeouts so we rarely reuse a connection the server is about
/// to close (uvicorn: 5 s; nginx: 75 s).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Idle connections kept per upstream per worker; beyond that, returned connections are closed.
pub const POOL_MAX_IDLE: usize = 256;

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One worker's idle upstream connections, indexed like `Config::upstreams`.
pub struct Pool {
    idle: RefCell<Vec<Vec<Idle>>>,
}

impl Pool {
    pub fn new(upstreams: usize) -> Pool {
        Pool {
            idle: RefCell::new((0..upstreams).map(|_| Vec::new()).collect()),
        }
    }

    /// The most recently returned live connection to upstream `index`, if any.
    pub fn take(&self, index: usize) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(index)?;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(conn.conn);
            }
            // Too old: the oldest are at the front, so everything left is older still.
            list.clear();
        }
        None
    }

    pub fn put(&self, index: usize, mut conn: Conn) {
        let mut idle = self.idle.borrow_mut();
        if let Some(list) = idle.get_mut(index)
            && list.len() < POOL_MAX_IDLE
        {
            conn.buf.clear();
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}
