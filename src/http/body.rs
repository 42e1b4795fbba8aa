//! Reading a message body piece by piece, de-framed (Content-Length, chunked, or until close),
//! with a deadline on every read. One reader for every place scopegate reads an upstream's
//! body to look at it (filtered lists, event streams, the aggregate endpoint's answers).

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::conn::{Conn, ReadError, Waited, wait_readable_watching};
use super::framing::{ChunkedDecoder, Framing};
use crate::timer::Until;

/// Why a body could not be read to its end.
#[derive(Debug)]
pub enum BodyError {
    /// The peer closed before the body's end.
    Closed,
    TimedOut,
    Io(std::io::Error),
    /// The chunked framing is broken.
    BadChunk(String),
    /// The peer at the other end of the relay (the agent) went away.
    PeerGone,
}

impl BodyError {
    /// In words, for a log line or an audit reason.
    pub fn message(&self) -> String {
        match self {
            BodyError::Closed => "closed the connection mid-body".into(),
            BodyError::TimedOut => "timed out mid-body".into(),
            BodyError::Io(e) => format!("failed mid-body: {e}"),
            BodyError::BadChunk(why) => format!("sent a bad chunked body: {why}"),
            BodyError::PeerGone => "the agent went away".into(),
        }
    }
}

/// The de-framing state of one body.
#[derive(Debug)]
pub struct BodyReader {
    framing: Framing,
    chunked: ChunkedDecoder,
    /// Bytes still to come of a Content-Length body.
    left: u64,
    done: bool,
}

impl BodyReader {
    pub fn new(framing: Framing) -> BodyReader {
        BodyReader {
            framing,
            chunked: ChunkedDecoder::default(),
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            done: matches!(framing, Framing::Empty),
        }
    }

    /// Whether the body was read to its end.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Whether `conn` can carry another exchange: the body ended where its framing said and
    /// nothing follows it.
    pub fn left_clean(&self, conn: &Conn) -> bool {
        self.done && self.framing != Framing::UntilClose && conn.buf.is_empty()
    }

    /// The next piece of the body, `None` at its end. `deadline` bounds each wait for the peer
    /// (`None`: wait as long as it takes).
    pub async fn next(
        &mut self,
        conn: &mut Conn,
        deadline: Option<Instant>,
    ) -> Result<Option<Bytes>, BodyError> {
        loop {
            if let Some(piece) = self.take(conn)? {
                return Ok(Some(piece));
            }
            if self.done {
                return Ok(None);
            }
            let limit = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match conn.fill_within(limit).await {
                Ok(0) if self.framing == Framing::UntilClose && conn.ended_cleanly() => {
                    self.done = true;
                    return Ok(None);
                }
                Ok(0) => return Err(BodyError::Closed),
                Ok(_) => {}
                Err(ReadError::TimedOut) => return Err(BodyError::TimedOut),
                Err(ReadError::Io(e)) => return Err(BodyError::Io(e)),
            }
        }
    }

    /// [`next`](Self::next), watching `agent` while waiting (see
    /// [`super::conn::wait_readable_watching`]): [`BodyError::PeerGone`] when it leaves.
    pub async fn next_watching(
        &mut self,
        conn: &mut Conn,
        agent: &mut Conn,
        watch: &mut bool,
        until: Until,
    ) -> Result<Option<Bytes>, BodyError> {
        // One bound for the whole call: framing bytes that bring no piece (a chunk's size line,
        // trailers) do not restart it.
        let until = until.fixed();
        loop {
            if let Some(piece) = self.take(conn)? {
                return Ok(Some(piece));
            }
            if self.done {
                return Ok(None);
            }
            match wait_readable_watching(conn, agent, watch, until).await {
                Waited::Readable => {}
                Waited::AgentGone => return Err(BodyError::PeerGone),
                Waited::TimedOut => return Err(BodyError::TimedOut),
            }
            // Readable: one read, which returns at once and is never given up (a TLS record not
            // complete yet waits for readiness again, under the same bound).
            match conn.fill_ready().await {
                Ok(Some(0)) if self.framing == Framing::UntilClose && conn.ended_cleanly() => {
                    self.done = true;
                    return Ok(None);
                }
                Ok(Some(0)) => return Err(BodyError::Closed),
                Ok(_) => {}
                Err(e) => return Err(BodyError::Io(e)),
            }
        }
    }

    /// What is already buffered in `conn`, de-framed (`None`: nothing yet).
    pub fn take(&mut self, conn: &mut Conn) -> Result<Option<Bytes>, BodyError> {
        if self.done || conn.buf.is_empty() {
            return Ok(None);
        }
        match self.framing {
            Framing::Empty => {
                self.done = true;
                Ok(None)
            }
            Framing::Length(_) => {
                let n = (conn.buf.len() as u64).min(self.left) as usize;
                self.left -= n as u64;
                if self.left == 0 {
                    self.done = true;
                }
                Ok((n > 0).then(|| conn.buf.split_to(n).freeze()))
            }
            Framing::Chunked => {
                let mut out = BytesMut::new();
                let used = self
                    .chunked
                    .feed(&conn.buf, Some(&mut out))
                    .map_err(|e| BodyError::BadChunk(format!("{e:?}")))?;
                let _ = conn.buf.split_to(used);
                if self.chunked.is_done() {
                    self.done = true;
                }
                Ok((!out.is_empty()).then(|| out.freeze()))
            }
            Framing::UntilClose => Ok(Some(conn.buf.split().freeze())),
        }
    }

    /// The whole rest of the body, refused past `limit` bytes.
    pub async fn read_all(
        &mut self,
        conn: &mut Conn,
        deadline: Instant,
        limit: usize,
    ) -> Result<BytesMut, ReadAllError> {
        let mut body = BytesMut::new();
        while let Some(piece) = self.next(conn, Some(deadline)).await? {
            if body.len() + piece.len() > limit {
                return Err(ReadAllError::TooLarge(limit));
            }
            body.extend_from_slice(&piece);
        }
        Ok(body)
    }
}

/// Why [`BodyReader::read_all`] failed.
#[derive(Debug)]
pub enum ReadAllError {
    Body(BodyError),
    TooLarge(usize),
}

impl From<BodyError> for ReadAllError {
    fn from(e: BodyError) -> Self {
        ReadAllError::Body(e)
    }
}

impl ReadAllError {
    pub fn message(&self) -> String {
        match self {
            ReadAllError::Body(e) => e.message(),
            ReadAllError::TooLarge(limit) => {
                format!("answered with more than {limit} bytes (SCOPEGATE_MAX_UPSTREAM_MESSAGE)")
            }
        }
    }
}
