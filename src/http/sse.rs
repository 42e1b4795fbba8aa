//! Server-Sent Events (`text/event-stream`): one splitter for every stream scopegate reads
//! event by event (policy filtering on `/mcp/<upstream>`, rewriting on the aggregate `/mcp`).
//!
//! The splitter is incremental: each byte is looked at once, whatever the size of the event
//! being assembled, and an event larger than its limit is an error rather than a buffer that
//! grows until the process runs out of memory. Lines may end in CRLF, LF or CR (the SSE
//! grammar); an event ends at an empty line.

/// Splits a stream into events as bytes arrive.
pub struct SseSplitter {
    buf: Vec<u8>,
    /// Start of the first event not yet handed out.
    start: usize,
    /// How far the scan has got.
    scanned: usize,
    /// The scan is at the start of a line.
    line_start: bool,
    /// The last byte scanned was a CR ending a line: an LF right after it belongs to it.
    after_cr: bool,
    /// The event boundary was a CR whose LF had not arrived: skip that LF.
    skip_lf: bool,
    limit: usize,
}

/// An event (or the stream's unfinished tail) grew past the splitter's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge(pub usize);

impl SseSplitter {
    /// A splitter holding at most `limit` bytes of one event.
    pub fn new(limit: usize) -> SseSplitter {
        SseSplitter {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            line_start: true,
            after_cr: false,
            skip_lf: false,
            limit,
        }
    }

    /// Adds bytes (a read's worth: the limit is checked as events are taken).
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 {
            // Events before `start` were handed out: drop them (what is left is one partial
            // event, so this moves little).
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Lets the buffer go when every event in it was handed out (a stream waiting for its next
    /// event holds none); the next push allocates again.
    pub fn release_if_empty(&mut self) {
        if self.start == self.buf.len() && !self.skip_lf {
            self.buf = Vec::new();
            self.start = 0;
            self.scanned = 0;
        }
    }

    /// Bytes held that do not yet form a complete event.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete event: its bytes, including the empty line that ended it. `Err` when
    /// no event is complete and what is held of the next one is over the limit.
    pub fn next_event(&mut self) -> Result<Option<&[u8]>, TooLarge> {
        if self.skip_lf && self.start < self.buf.len() {
            self.skip_lf = false;
            if self.buf[self.start] == b'\n' {
                self.start += 1;
                self.scanned = self.scanned.max(self.start);
            }
        }
        let mut i = self.scanned.max(self.start);
        while i < self.buf.len() {
            let b = self.buf[i];
            i += 1;
            if self.after_cr && b == b'\n' {
                self.after_cr = false;
                continue;
            }
            self.after_cr = false;
            if b != b'\n' && b != b'\r' {
                self.line_start = false;
                continue;
            }
            if !self.line_start {
                self.line_start = true;
                self.after_cr = b == b'\r';
                continue;
            }
            // An empty line: the event ends here (with the LF of a CRLF when it is here).
            let mut end = i;
            if b == b'\r' {
                if self.buf.get(i) == Some(&b'\n') {
                    end = i + 1;
                } else if i == self.buf.len() {
                    self.skip_lf = true;
                }
            }
            let from = self.start;
            self.start = end;
            self.scanned = end;
            self.line_start = true;
            self.after_cr = false;
            return Ok(Some(&self.buf[from..end]));
        }
        self.scanned = i;
        if self.pending() > self.limit {
            return Err(TooLarge(self.limit));
        }
        Ok(None)
    }

    /// What is held of an unfinished event (for a stream that ended without its empty line).
    pub fn rest(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// The fields of one event.
pub struct EventParts<'e> {
    /// Its data lines joined by newlines (None when it has none).
    pub data: Option<Vec<u8>>,
    /// `id:` field value, if any.
    pub id: Option<&'e [u8]>,
    /// Its other lines (`event:`, `retry:`, comments), as they were.
    pub other: Vec<&'e [u8]>,
}

/// Reads an event's fields.
pub fn event_parts(event: &[u8]) -> EventParts<'_> {
    let mut parts = EventParts {
        data: None,
        id: None,
        other: Vec::new(),
    };
    for line in lines(event) {
        if let Some(rest) = line.strip_prefix(b"data") {
            let value = match rest.first() {
                None => Some(&rest[..0]),
                Some(b':') => Some(rest[1..].strip_prefix(b" ").unwrap_or(&rest[1..])),
                Some(_) => None,
            };
            if let Some(value) = value {
                match &mut parts.data {
                    Some(d) => {
                        d.push(b'\n');
                        d.extend_from_slice(value);
                    }
                    None => parts.data = Some(value.to_vec()),
                }
                continue;
            }
        }
        if line == b"id" {
            parts.id = Some(b"");
        } else if let Some(rest) = line.strip_prefix(b"id:") {
            parts.id = Some(rest.strip_prefix(b" ").unwrap_or(rest));
        } else if !line.is_empty() {
            parts.other.push(line);
        }
    }
    parts
}

/// The lines of an event, without their line ends (CRLF, LF or CR).
fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = event;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .unwrap_or(rest.len());
        let line = &rest[..end];
        let mut next = end;
        if rest.get(next) == Some(&b'\r') {
            next += 1;
            if rest.get(next) == Some(&b'\n') {
                next += 1;
            }
        } else if rest.get(next) == Some(&b'\n') {
            next += 1;
        }
        rest = &rest[next..];
        Some(line)
    })
}

/// Writes one event: the other lines, the id (when given), the data (one `data:` line per line
/// of it), and the empty line.
pub fn write_event(other: &[&[u8]], id: Option<&[u8]>, data: Option<&[u8]>, out: &mut Vec<u8>) {
    for line in other {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id);
        out.push(b'\n');
    }
    if let Some(data) = data {
        for line in data.split(|&b| b == b'\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: &mut SseSplitter) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(e) = s.next_event().unwrap() {
            out.push(e.to_vec());
        }
        out
    }

    #[test]
    fn a_drained_splitter_lets_its_buffer_go_and_a_partial_event_is_kept() {
        let mut s = SseSplitter::new(1 << 20);
        s.push(b"data: one\n\ndata: tw");
        assert_eq!(all(&mut s), vec![b"data: one\n\n".to_vec()]);
        s.release_if_empty();
        s.push(b"o\n\n");
        assert_eq!(all(&mut s), vec![b"data: two\n\n".to_vec()]);
        s.release_if_empty();
        assert_eq!(s.buf.capacity(), 0);
        // An event ended by a CR whose LF has not come yet: the LF is still skipped.
        s.push(b"data: three\r\r");
        assert_eq!(all(&mut s), vec![b"data: three\r\r".to_vec()]);
        s.release_if_empty();
        s.push(b"\ndata: four\n\n");
        assert_eq!(all(&mut s), vec![b"data: four\n\n".to_vec()]);
    }

    #[test]
    fn events_split_across_pieces_and_line_endings() {
        let mut s = SseSplitter::new(1 << 20);
        s.push(b"id: 7\nevent: message\ndata: {\"a\":");
        assert!(s.next_event().unwrap().is_none());
        s.push(b"1}\n\n: comment\r\n\r\ndata: x\ndata: y\n\n");
        let events = all(&mut s);
        assert_eq!(
            events,
            vec![
                b"id: 7\nevent: message\ndata: {\"a\":1}\n\n".to_vec(),
                b": comment\r\n\r\n".to_vec(),
                b"data: x\ndata: y\n\n".to_vec(),
            ]
        );
        let p = event_parts(&events[0]);
        assert_eq!(p.data.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(p.id, Some(&b"7"[..]));
        assert_eq!(p.other, vec![&b"event: message"[..]]);
        let p = event_parts(&events[1]);
        assert!(p.data.is_none());
        assert_eq!(p.other, vec![&b": comment"[..]]);
        let p = event_parts(&events[2]);
        assert_eq!(p.data.as_deref(), Some(&b"x\ny"[..]));
        let mut out = Vec::new();
        write_event(&[], None, p.data.as_deref(), &mut out);
        assert_eq!(out, b"data: x\ndata: y\n\n");
    }

    #[test]
    fn cr_only_and_split_crlf() {
        let mut s = SseSplitter::new(1 << 20);
        s.push(b"data: a\r\r");
        assert_eq!(all(&mut s), vec![b"data: a\r\r".to_vec()]);
        // A CRLF blank line split after its CR: the LF is not a second event.
        s.push(b"\ndata: b\r\n\r");
        assert_eq!(all(&mut s), vec![b"data: b\r\n\r".to_vec()]);
        s.push(b"\ndata: c\n\n");
        assert_eq!(all(&mut s), vec![b"data: c\n\n".to_vec()]);
    }

    #[test]
    fn an_event_over_the_limit_is_an_error_not_a_growing_buffer() {
        let mut s = SseSplitter::new(1024);
        s.push(b"data: ");
        let mut refused = false;
        for _ in 0..100 {
            s.push(&[b'x'; 100]);
            match s.next_event() {
                Ok(e) => assert!(e.is_none()),
                Err(TooLarge(1024)) => {
                    refused = true;
                    break;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(refused);
        // Complete events within the limit pass even when many arrive at once.
        let mut s = SseSplitter::new(64);
        let mut many = Vec::new();
        for i in 0..50 {
            many.extend_from_slice(format!("data: {i}\n\n").as_bytes());
        }
        let mut n = 0;
        for chunk in many.chunks(40) {
            s.push(chunk);
            while s.next_event().unwrap().is_some() {
                n += 1;
            }
        }
        assert_eq!(n, 50);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn field_names_are_exact() {
        let p = event_parts(b"data\ndatax: no\nid\n:data: comment\n\n");
        assert_eq!(p.data.as_deref(), Some(&b""[..]));
        assert_eq!(p.id, Some(&b""[..]));
        assert_eq!(p.other, vec![&b"datax: no"[..], &b":data: comment"[..]]);
    }
}
