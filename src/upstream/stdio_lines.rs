//! The queue that carries one request's messages (or a session's GET stream) from a stdio
//! process's reader thread to the bridge thread relaying them: the sending side never blocks,
//! and a queue whose reader falls [`SINK_LIMIT`] bytes behind is dropped (its reader sees the
//! stream end), so a slow agent never holds up another.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// The most a request's (or a GET stream's) queue may hold unread; past it the queue is dropped
/// and its reader sees the stream end.
pub const SINK_LIMIT: usize = 64 * 1024 * 1024;
/// One message for a request's (or a session's) reader.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// A notification or a request of the child's, ids mapped back.
    Message(String),
    /// The answer to the request, its id mapped back, and whether it is a JSON-RPC error (so
    /// the reader need not parse it again).
    Answer(String, bool),
    /// The process failed: the JSON-RPC error for the request.
    Failed(String),
}

impl Line {
    pub fn text(&self) -> &str {
        match self {
            Line::Message(l) | Line::Answer(l, _) | Line::Failed(l) => l,
        }
    }
}

/// Nothing came within the time asked.
#[derive(Debug, PartialEq, Eq)]
pub struct Quiet;

/// The reading end of a request's messages.
pub struct Lines {
    rx: mpsc::Receiver<Line>,
    queued: Arc<AtomicUsize>,
}

impl Lines {
    /// The next message, `Ok(None)` when the stream ended (after the answer, or dropped);
    /// `Err` when `within` passed first.
    pub fn next(&self, within: Option<Duration>) -> Result<Option<Line>, Quiet> {
        let line = match within {
            None => self.rx.recv().ok(),
            Some(d) => match self.rx.recv_timeout(d) {
                Ok(l) => Some(l),
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(Quiet),
                Err(mpsc::RecvTimeoutError::Disconnected) => None,
            },
        };
        if let Some(l) = &line {
            self.queued.fetch_sub(l.text().len(), Ordering::Relaxed);
        }
        Ok(line)
    }
}

/// The hub's end of a [`Lines`]: never blocks.
pub(super) struct Sink {
    tx: mpsc::Sender<Line>,
    queued: Arc<AtomicUsize>,
}

impl Sink {
    pub(super) fn pair() -> (Sink, Lines) {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (
            Sink {
                tx,
                queued: queued.clone(),
            },
            Lines { rx, queued },
        )
    }

    /// False when the reader is gone or too far behind: the sink should go.
    pub(super) fn send(&self, line: Line) -> bool {
        let n = line.text().len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > SINK_LIMIT {
            return false;
        }
        self.tx.send(line).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_too_far_behind_loses_its_queue_and_sees_it_end() {
        let (sink, lines) = Sink::pair();
        let half = "x".repeat(SINK_LIMIT / 2);
        assert!(sink.send(Line::Message(half.clone())));
        assert!(
            !sink.send(Line::Message(half.clone() + "over")),
            "past the limit"
        );
        drop(sink);
        assert_eq!(lines.next(None), Ok(Some(Line::Message(half))));
        assert_eq!(lines.next(None), Ok(None), "the stream ends");
    }

    #[test]
    fn reading_makes_room_again() {
        let (sink, lines) = Sink::pair();
        let half = "x".repeat(SINK_LIMIT / 2 + 1);
        assert!(sink.send(Line::Message(half.clone())));
        assert!(lines.next(Some(Duration::from_secs(1))).is_ok());
        assert!(sink.send(Line::Answer(half, false)));
        assert_eq!(
            lines
                .next(Some(Duration::ZERO))
                .map(|l| l.map(|l| l.text().len())),
            Ok(Some(SINK_LIMIT / 2 + 1))
        );
        assert_eq!(lines.next(Some(Duration::from_millis(1))), Err(Quiet));
    }
}
