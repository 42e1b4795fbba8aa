//! Each worker's keep-alive pool of upstream connections. Per worker (`RefCell`, never shared
//! across threads): a connection is taken for one exchange and given back only when the answer
//! was read to its end and the upstream did not ask to close. Connections are kept per upstream,
//! by its name and the URL it is reached at ([`PoolKey`]), never by a place in a list: a
//! connection only ever carries requests of the upstream it was opened for (two upstreams
//! behind one address do not share connections, so a server that routes a whole connection by
//! its first request never sees one upstream's credential on another's).

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::egress::Egress;
use crate::http::conn::Conn;

/// How long a pooled connection may sit idle before it is dropped rather than reused. Kept
/// below common server keep-alive timeouts so we rarely reuse a connection the server is about
/// to close (uvicorn: 5 s; nginx: 75 s).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Idle connections kept per upstream per worker; beyond that, returned connections are closed.
pub const POOL_MAX_IDLE: usize = 256;

/// What a pooled connection was opened to: a fingerprint of the upstream's URL and TLS
/// settings (its addresses may change; a connection stays with the URL it was opened for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolKey(pub u64);

/// Whose connections: an upstream's name and its peer.
#[derive(Debug, Clone, Copy)]
pub struct PoolId<'a> {
    pub name: &'a str,
    pub peer: PoolKey,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One upstream's idle connections: its name, its peer, the connections (oldest first).
type IdleList = (Box<str>, PoolKey, Vec<Idle>);

/// One worker's idle upstream connections, per upstream (a handful of lists), and how new
/// ones are made (through the egress proxy, when there is one).
#[derive(Default)]
pub struct Pool {
    idle: RefCell<Vec<IdleList>>,
    egress: Option<Arc<Egress>>,
}

impl Pool {
    pub fn new(egress: Option<Arc<Egress>>) -> Pool {
        Pool {
            idle: RefCell::new(Vec::new()),
            egress,
        }
    }

    /// The egress proxy new connections go through, if any.
    pub fn egress(&self) -> Option<&Egress> {
        self.egress.as_deref()
    }

    /// The most recently returned live connection of `id`, if any.
    pub fn take(&self, id: PoolId<'_>) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        let (_, _, list) = idle
            .iter_mut()
            .find(|(name, peer, _)| *peer == id.peer && **name == *id.name)?;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(conn.conn);
            }
            // Too old: the oldest are at the front, so everything left is older still.
            list.clear();
        }
        None
    }

    /// Keeps `conn` for the next request to the same peer (a broken one is closed instead).
    pub fn put(&self, id: PoolId<'_>, mut conn: Conn) {
        if conn.broken {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let found = idle
            .iter()
            .position(|(name, peer, _)| *peer == id.peer && **name == *id.name);
        let at = found.unwrap_or_else(|| {
            idle.push((id.name.into(), id.peer, Vec::new()));
            idle.len() - 1
        });
        let list = &mut idle[at].2;
        if list.len() < POOL_MAX_IDLE {
            conn.buf.clear();
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}
