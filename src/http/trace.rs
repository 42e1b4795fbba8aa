//! W3C trace context (`traceparent: 00-<trace id>-<parent span id>-<flags>`): scopegate is a
//! hop of the agent's trace. The upstream is sent the same trace with a span id of scopegate's
//! own, whose parent is the agent's span; the audit log and the access log name both, so an
//! operator can join an agent's trace to scopegate's decision.

use std::cell::Cell;

/// A `traceparent` as the agent sent it, and the hop scopegate makes of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// 32 lowercase hex digits.
    pub trace_id: [u8; 32],
    /// The agent's span (16 hex digits).
    pub parent_id: [u8; 16],
    /// scopegate's span for the hop (16 hex digits).
    pub span_id: [u8; 16],
    flags: [u8; 2],
}

impl Hop {
    /// The hop for an agent's `traceparent`; `None` when it is not a valid one (it is then not
    /// passed on, as the specification asks of an invalid header).
    pub fn of(traceparent: &[u8]) -> Option<Hop> {
        // Version 00 is exactly 55 characters; a later version at least that, read the same.
        let v = traceparent;
        let hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let zero = |s: &[u8]| s.iter().all(|&b| b == b'0');
        let well_formed = v.len() >= 55
            && (v.len() == 55 || (&v[..2] != b"00" && v[55] == b'-'))
            && hex(&v[..2])
            && &v[..2] != b"ff"
            && v[2] == b'-'
            && v[35] == b'-'
            && v[52] == b'-'
            && hex(&v[3..35])
            && hex(&v[36..52])
            && hex(&v[53..55])
            && !zero(&v[3..35])
            && !zero(&v[36..52]);
        if !well_formed {
            return None;
        }
        let mut hop = Hop {
            trace_id: [0; 32],
            parent_id: [0; 16],
            span_id: new_span_id(),
            flags: [v[53], v[54]],
        };
        hop.trace_id.copy_from_slice(&v[3..35]);
        hop.parent_id.copy_from_slice(&v[36..52]);
        Some(hop)
    }

    /// The `traceparent` the upstream is sent: the agent's trace, scopegate's span.
    pub fn header(&self) -> [u8; 55] {
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        out[3..35].copy_from_slice(&self.trace_id);
        out[36..52].copy_from_slice(&self.span_id);
        out[53..55].copy_from_slice(&self.flags);
        out
    }

    pub fn trace_id(&self) -> &str {
        std::str::from_utf8(&self.trace_id).unwrap_or_default()
    }

    pub fn span_id(&self) -> &str {
        std::str::from_utf8(&self.span_id).unwrap_or_default()
    }

    pub fn parent_id(&self) -> &str {
        std::str::from_utf8(&self.parent_id).unwrap_or_default()
    }
}

thread_local! {
    /// A per-thread xorshift state, seeded once from the system's randomness: span ids need to
    /// be unique, not secret.
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b) | 1
}

/// 16 lowercase hex digits, never all zeros.
fn new_span_id() -> [u8; 16] {
    let n = STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    });
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = b"0123456789abcdef"[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_keeps_the_trace_and_makes_its_own_span() {
        let agent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let hop = Hop::of(agent).unwrap();
        assert_eq!(hop.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hop.parent_id(), "00f067aa0ba902b7");
        assert_ne!(hop.span_id(), hop.parent_id());
        let sent = hop.header();
        let sent = std::str::from_utf8(&sent).unwrap();
        assert_eq!(
            sent,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", hop.span_id())
        );
        assert_ne!(
            Hop::of(agent).unwrap().span_id,
            hop.span_id,
            "a span per hop"
        );
        // A later version is read the same; version ff, bad hex, zero ids, wrong sizes are not.
        assert!(Hop::of(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more").is_some());
        for bad in [
            &b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..],
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(Hop::of(bad).is_none(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
