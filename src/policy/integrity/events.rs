//! What a new definition changed, told: a log line (within the budget for what peers
//! cause), a counter, and an audit record waiting for the next request's record stage.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::audit::entry::{IntegrityEvent, integrity_fragment};
use crate::integrity::scan::{self, Finding};
use crate::integrity::{self, Digest, Kind, digest_text};

/// What a new definition changed.
pub(super) enum Event {
    Changed {
        pinned: Digest,
        seen: Digest,
        action: &'static str,
    },
    Unpinned {
        seen: Digest,
        action: &'static str,
    },
    Findings {
        seen: Digest,
        findings: Vec<Finding>,
        action: &'static str,
    },
}

impl Event {
    fn labels(&self) -> (&'static str, &'static str) {
        match self {
            Event::Changed { action, .. } => ("changed", action),
            Event::Unpinned { action, .. } => ("unpinned", action),
            Event::Findings { action, .. } => ("findings", action),
        }
    }
}

/// The first 12 hex digits of a digest, for messages.
pub(super) fn short(d: &Digest) -> String {
    digest_text(d)[..19].to_owned()
}

/// Audit fragments waiting for the next request's record stage to write them (events come
/// from list answers, which any core relays; a request's end has the worker's audit sink).
static PENDING: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
static ANY_PENDING: AtomicBool = AtomicBool::new(false);
/// Bounded: a hostile upstream changing definitions without end cannot grow memory.
const MAX_PENDING: usize = 10_000;

/// The audit fragments of integrity events since the last call (one atomic load when none):
/// each is `,"event":..,"action":..,"upstream":..,"kind":..,"name":..` and digests or findings.
pub fn take_events() -> Vec<Vec<u8>> {
    if !ANY_PENDING.load(Ordering::Acquire) {
        return Vec::new();
    }
    let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
    ANY_PENDING.store(false, Ordering::Release);
    std::mem::take(&mut *pending)
}

/// Logs, counts and queues for the audit log what a new definition of `up`'s item changed.
pub(super) fn tell(up: &str, kind: Kind, name: &str, e: Event) {
    let (event, action) = e.labels();
    integrity::count(up, event, action);
    let (pinned, seen, findings) = match &e {
        Event::Changed { pinned, seen, .. } => (Some(digest_text(pinned)), seen, &[][..]),
        Event::Unpinned { seen, .. } => (None, seen, &[][..]),
        Event::Findings { seen, findings, .. } => (None, seen, &findings[..]),
    };
    let mut fragment = Vec::with_capacity(256);
    integrity_fragment(
        &IntegrityEvent {
            event,
            action,
            upstream: up,
            kind: kind.as_str(),
            name,
            pinned: pinned.as_deref(),
            seen: &digest_text(seen),
            findings,
        },
        &mut fragment,
    );
    // Told within the log's budget (an upstream flipping definitions cannot flood it),
    // its name written so that nothing hides in it or forges a line.
    if let Some(dropped) = crate::log::budget() {
        let what = format!("{} {up}/{}", kind.as_str(), scan::visible(name, 128));
        let line = match &e {
            Event::Changed { pinned, seen, .. } => format!(
                "{what} changed since it was pinned ({} is now {})",
                short(pinned),
                short(seen)
            ),
            Event::Unpinned { .. } => format!("{what} is not pinned"),
            Event::Findings { findings, .. } => {
                let checks: Vec<&str> = findings.iter().map(|f| f.check).collect();
                format!("{what}: the poison scan found {}", checks.join(", "))
            }
        };
        let dropped = match dropped {
            0 => String::new(),
            n => format!(" ({n} lines dropped before this one)"),
        };
        if action == "allowed" {
            crate::info!("tool integrity: {line}: {action}{dropped}");
        } else {
            crate::warn!("tool integrity: {line}: {action}{dropped}");
        }
    }
    let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
    if pending.len() < MAX_PENDING {
        pending.push(fragment);
        ANY_PENDING.store(true, Ordering::Release);
    } else {
        integrity::count(up, event, "not_audited");
    }
}
