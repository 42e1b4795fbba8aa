//! The audit log: an entry for every message scopegate handles, refusals included.
//!
//! Each worker encodes entries into a reusable buffer and pushes them into its own lock-free
//! ring ([`ring`]); its writer thread ([`writer`]) drains the ring every flush interval (or when
//! it is half full), chains each line to the previous one with SHA-256, and writes the batch with
//! one `write`. A full ring makes the request path wait (backpressure): entries are never
//! dropped. [`verify`] checks the chains.

pub mod chain;
pub mod entry;
pub mod ring;
pub mod verify;
pub mod writer;

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use entry::Entry;
use writer::Channel;

/// A worker's end of its audit channel.
pub struct AuditSink {
    pub worker: usize,
    pub channel: Arc<Channel>,
    pub fail_closed: bool,
    pub max_args: usize,
    /// Reused encoding buffer (taken while in use, so a task waiting on a full ring never holds
    /// a borrow across an await).
    scratch: RefCell<Vec<u8>>,
}

impl AuditSink {
    pub fn new(
        worker: usize,
        channel: Arc<Channel>,
        fail_closed: bool,
        max_args: usize,
    ) -> AuditSink {
        AuditSink {
            worker,
            channel,
            fail_closed,
            max_args,
            scratch: RefCell::new(Vec::with_capacity(1024)),
        }
    }

    /// Whether new calls must be refused (`SCOPEGATE_AUDIT_FAIL_CLOSED=1` and the sink failing).
    pub fn refusing(&self) -> bool {
        self.fail_closed && self.channel.failing.load(Ordering::Acquire)
    }

    /// Records one entry; waits while the ring is full (never drops).
    pub async fn record(&self, entry: &Entry<'_>) {
        let mut buf = std::mem::take(&mut *self.scratch.borrow_mut());
        buf.clear();
        entry::encode(entry, &mut buf);
        self.push(buf).await;
    }

    /// Records an event that is not a message (`"audit":"<kind>"`, then `fragment`: the
    /// event's fields, each starting with a comma), chained like every entry.
    pub async fn record_event(&self, kind: &str, fragment: &[u8]) {
        let mut buf = std::mem::take(&mut *self.scratch.borrow_mut());
        buf.clear();
        entry::encode_event(
            std::time::SystemTime::now(),
            self.worker,
            kind,
            fragment,
            &mut buf,
        );
        self.push(buf).await;
    }

    async fn push(&self, mut buf: Vec<u8>) {
        let ring = &self.channel.ring;
        if buf.len() > ring.max_record() {
            // Arguments (capped by SCOPEGATE_AUDIT_MAX_ARGS, which the configuration keeps well
            // below the ring size) and integrity findings (at most 16, each capped) make an
            // entry long; past the ring's record size it is cut.
            buf.truncate(ring.max_record());
        }
        while !ring.try_push(&buf) {
            self.channel.wake();
            crate::timer::sleep(Duration::from_millis(1)).await;
        }
        if ring.used() * 2 >= ring.capacity() {
            self.channel.wake();
        }
        *self.scratch.borrow_mut() = buf;
    }
}
