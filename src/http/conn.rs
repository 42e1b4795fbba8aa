//! A connection (TCP, or TLS over TCP) with its read buffer, over monoio's owned-buffer I/O.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpStream, UnixStream};

use crate::tls::stream::TlsStream;

/// Bytes asked of the kernel per read. Large enough for a typical MCP message in one read,
/// small enough that 10,000 idle connections stay cheap (buffers are released when idle).
pub const READ_CHUNK: usize = 16 * 1024;

/// The byte stream under a connection.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
    /// A stdio upstream's bridge (one end of a socket pair).
    Unix(UnixStream),
}

impl From<UnixStream> for Stream {
    fn from(unix: UnixStream) -> Stream {
        Stream::Unix(unix)
    }
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Stream {
        Stream::Tcp(tcp)
    }
}

impl From<TlsStream> for Stream {
    fn from(tls: TlsStream) -> Stream {
        Stream::Tls(Box::new(tls))
    }
}

impl Stream {
    /// The socket under the stream.
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.tcp().as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Waits until a read has something to return (bytes, or the end).
    pub async fn readable(&self, relaxed: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable(relaxed).await,
            Stream::Tls(s) => s.readable(relaxed).await,
            Stream::Unix(s) => s.readable(relaxed).await,
        }
    }
}

/// How much of a write the peer must take per [`Conn::write_limit_ms`].
pub const WRITE_PIECE: u64 = 64 * 1024;

pub struct Conn {
    pub stream: Stream,
    /// Bytes read and not yet consumed.
    pub buf: BytesMut,
    /// Bytes written so far (the audit log's bytes out).
    pub written: u64,
    /// How much room a read asks for (smaller for long-lived event streams).
    pub read_chunk: usize,
    /// The longest one [`write_all`](Self::write_all) may take, in ms (0: no limit): an agent
    /// that stops reading is cut off (`SCOPEGATE_SEND_TIMEOUT_MS`).
    pub write_limit_ms: u32,
    /// A read or write on it was given up midway (timed out): what it holds and what the peer
    /// got are unknown, so it is only closed, never pooled or kept alive.
    pub broken: bool,
}

#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    TimedOut,
}

impl Conn {
    pub fn new(stream: impl Into<Stream>) -> Conn {
        Conn {
            stream: stream.into(),
            buf: BytesMut::new(),
            written: 0,
            read_chunk: READ_CHUNK,
            write_limit_ms: 0,
            broken: false,
        }
    }

    /// Reads once, appending to `buf`. `Ok(0)` is end of stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < self.read_chunk / 4 {
            self.buf.reserve(self.read_chunk);
        }
        let len = self.buf.len();
        let (res, slice) = match &mut self.stream {
            Stream::Tcp(tcp) => {
                tcp.read(std::mem::take(&mut self.buf).slice_mut(len..))
                    .await
            }
            // Boxed, like the write below: TLS's state machine is several times a plain read's,
            // and every future that reads a connection would otherwise carry it, plain or not.
            Stream::Tls(tls) => return Box::pin(tls.read_into(&mut self.buf)).await,
            Stream::Unix(unix) => {
                unix.read(std::mem::take(&mut self.buf).slice_mut(len..))
                    .await
            }
        };
        self.buf = slice.into_inner();
        res
    }

    /// [`fill`](Self::fill) for a stream that is readable ([`Stream::readable`]): one read,
    /// which returns at once. `None`: a TLS record is not complete yet (wait for readiness
    /// again). A loop that waits for readiness under a bound, gives up and waits again (an
    /// event stream looking up now and then) reads only this way: giving up a readiness wait
    /// loses nothing, while a read given up mid-way loses what it was reading.
    pub async fn fill_ready(&mut self) -> io::Result<Option<usize>> {
        match &mut self.stream {
            Stream::Tls(tls) => Box::pin(tls.read_ready(&mut self.buf)).await,
            Stream::Tcp(_) | Stream::Unix(_) => self.fill().await.map(Some),
        }
    }

    /// [`fill`](Self::fill) before `deadline`; `None` waits indefinitely. A read that times out
    /// is cancelled and what it was reading is gone (on a plain socket, with the bytes buffered
    /// and not yet consumed): after a timeout the connection is only closed or drained unread.
    /// Loops that go on after a timeout wait for readiness and [`fill_ready`](Self::fill_ready). Reads no clock: a
    /// timer is taken only if the read has to wait.
    pub async fn fill_until(
        &mut self,
        deadline: Option<std::time::Instant>,
    ) -> Result<usize, ReadError> {
        match crate::timer::bounded(deadline.into(), self.fill()).await {
            Ok(r) => r.map_err(ReadError::Io),
            Err(_) => {
                self.broken = true;
                Err(ReadError::TimedOut)
            }
        }
    }

    /// [`fill`](Self::fill) with a deadline; `None` waits indefinitely.
    pub async fn fill_within(&mut self, limit: Option<Duration>) -> Result<usize, ReadError> {
        let deadline = limit.and_then(|d| std::time::Instant::now().checked_add(d));
        self.fill_until(deadline).await
    }

    /// Writes all of `data` (owned, handed to the kernel without copying) and returns it. A
    /// write that outlasts [`write_limit_ms`](Self::write_limit_ms) for each [`WRITE_PIECE`] it
    /// holds (looked at once a second: up to a second or two past it) fails with `TimedOut` and
    /// an empty `B`: how much of it went out is unknown, so the connection is then closed, as
    /// after any failed write.
    pub async fn write_all<B: monoio::buf::IoBuf + Default>(
        &mut self,
        data: B,
    ) -> (io::Result<()>, B) {
        // Each 64 KiB of the write gets the whole limit: an agent that reads slowly but reads is
        // not cut off, one that stops is.
        let pieces = (data.bytes_init() as u64).div_ceil(WRITE_PIECE).max(1);
        let limit = u64::from(self.write_limit_ms).saturating_mul(pieces);
        let write = async {
            match &mut self.stream {
                Stream::Tcp(tcp) => tcp.write_all(data).await,
                Stream::Tls(tls) => Box::pin(tls.write_all(data)).await,
                Stream::Unix(unix) => unix.write_all(data).await,
            }
        };
        let (res, data) = if limit == 0 {
            write.await
        } else {
            // Bounded by the thread's tick: no clock read or timer per write.
            let limit = Duration::from_millis(limit);
            match crate::timer::bounded(crate::timer::Until::ticks_for(limit), write).await {
                Ok(written) => written,
                Err(_) => {
                    self.broken = true;
                    let why = format!(
                        "the peer took less than 64 KiB per {} ms",
                        self.write_limit_ms
                    );
                    (
                        Err(io::Error::new(io::ErrorKind::TimedOut, why)),
                        B::default(),
                    )
                }
            }
        };
        if let Ok(n) = &res {
            self.written += *n as u64;
        }
        (res.map(|_| ()), data)
    }

    /// Whether the peer has closed its side, looked at without consuming anything: `Some(true)`
    /// closed (or reset), `Some(false)` it sent more (a pipelined request), `None` nothing to
    /// read yet.
    pub fn peer_closed(&mut self) -> Option<bool> {
        if let Stream::Tls(tls) = &mut self.stream {
            // The bytes are records: read and decrypt what is there (a close_notify is data
            // on the socket, not an end of stream).
            return tls.poll_peer();
        }
        let mut byte = 0u8;
        // SAFETY: a one-byte peek into a local buffer on this connection's open socket.
        let n = unsafe {
            libc::recv(
                self.stream.fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => Some(true),
            n if n > 0 => Some(false),
            _ => match io::Error::last_os_error().kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
                _ => Some(true),
            },
        }
    }

    /// Hands over the read buffer when nothing is pending in it (for the worker's pool), so an
    /// idle connection holds no buffer memory.
    pub fn take_idle_buffer(&mut self) -> Option<BytesMut> {
        if let Stream::Tls(tls) = &mut self.stream {
            tls.release_idle();
        }
        (self.buf.is_empty() && self.buf.capacity() > 0).then(|| std::mem::take(&mut self.buf))
    }
}

impl Conn {
    /// Whether the end of stream just read was a real end: always on TCP; on TLS only after
    /// the peer's close_notify (a bare close can be forged, truncating a body that ends at the
    /// close).
    pub fn ended_cleanly(&self) -> bool {
        match &self.stream {
            Stream::Tcp(_) | Stream::Unix(_) => true,
            Stream::Tls(tls) => tls.closed_cleanly(),
        }
    }

    /// Before the connection is dropped: on TLS, the close_notify that tells the peer the
    /// stream ended here (bounded); nothing on TCP.
    pub async fn finish(&mut self) {
        if let Stream::Tls(tls) = &mut self.stream {
            // Boxed: the goodbye's future is large, and every connection's task that awaits
            // `finish` would otherwise carry room for it, plain or not.
            let _ = Box::pin(tls.close_notify()).await;
        }
    }

    /// Stops writing: says goodbye first on TLS (close_notify), then shuts the socket's write
    /// side, so the peer reads everything sent before it sees the end.
    pub async fn close_write(&mut self) {
        if let Stream::Tls(tls) = &mut self.stream {
            let _ = Box::pin(tls.close_notify()).await;
        }
        // SAFETY: the fd is this connection's open socket.
        unsafe {
            libc::shutdown(self.stream.fd(), libc::SHUT_WR);
        }
    }
}

/// What ended a wait for an upstream's next bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The upstream has something to read (or closed).
    Readable,
    /// The agent closed its connection meanwhile.
    AgentGone,
    TimedOut,
}

/// Waits until `up` can be read, watching `agent` meanwhile, so an agent that leaves a quiet
/// stream is noticed at once and not at the next write. Only readiness is awaited (the read
/// itself follows), so giving up the wait loses no data. `watch` goes false once the agent has
/// sent something (a pipelined request): its socket then stays readable and cannot say more.
pub async fn wait_readable_watching(
    up: &Conn,
    agent: &mut Conn,
    watch: &mut bool,
    until: crate::timer::Until,
) -> Waited {
    let wait = async {
        loop {
            if !*watch {
                let _ = up.stream.readable(false).await;
                return Waited::Readable;
            }
            monoio::select! {
                _ = up.stream.readable(false) => return Waited::Readable,
                _ = agent.stream.readable(false) => match agent.peer_closed() {
                    Some(true) => return Waited::AgentGone,
                    Some(false) => *watch = false,
                    None => {}
                },
            }
        }
    };
    crate::timer::bounded(until, wait)
        .await
        .unwrap_or(Waited::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_given_up_marks_the_connection_broken() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let (client, accepted) =
                monoio::join!(monoio::net::TcpStream::connect(addr), listener.accept());
            let (_peer, _) = accepted.unwrap();
            let mut conn = Conn::new(client.unwrap());
            assert!(!conn.broken);
            let soon = std::time::Instant::now() + Duration::from_millis(20);
            assert!(matches!(
                conn.fill_until(Some(soon)).await,
                Err(ReadError::TimedOut)
            ));
            assert!(
                conn.broken,
                "a cancelled read leaves the connection unusable"
            );
        });
    }
}
