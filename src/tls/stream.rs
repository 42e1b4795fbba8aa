//! A TLS session over a monoio TCP stream, on rustls's buffered connection API.
//!
//! Why not monoio-rustls: the connection code above needs three things it does not give: to wait
//! for readiness without reading (a relay watches the agent's socket while it waits for the
//! upstream, and an idle connection waits holding no buffer), to know whether decrypted bytes
//! are already waiting (then the socket is not the thing to wait on), and to read straight into
//! the connection's own buffer. This file is that adapter, and only that.
//!
//! The copies: ciphertext is read from the socket into `rx`, handed to rustls (which decrypts
//! in its own buffer), and the plaintext is copied into the caller's buffer; on the way out,
//! plaintext is copied into rustls, encrypted, and the records copied into `tx` for the socket.

use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::BytesMut;
use monoio::buf::IoBuf;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

/// Ciphertext asked of the kernel per read: one full TLS record and its overhead.
const CIPHER_CHUNK: usize = 16 * 1024 + 512;

/// The longest a close_notify may take to send.
const CLOSE_NOTIFY_TIME: std::time::Duration = std::time::Duration::from_millis(500);

pub struct TlsStream {
    tcp: TcpStream,
    tls: Connection,
    /// Ciphertext read from the socket; `rx[rx_at..]` is not yet handed to rustls.
    rx: Vec<u8>,
    rx_at: usize,
    /// Records to send.
    tx: Vec<u8>,
    /// Decrypted bytes waiting in rustls.
    plaintext: usize,
    /// The peer sent close_notify, or closed the socket.
    closed: bool,
    /// The peer sent close_notify.
    clean_close: bool,
}

/// What one read of ciphertext came to.
enum Fed {
    Some,
    End,
}

impl TlsStream {
    /// The client side: handshakes with `name` (SNI and certificate verification).
    pub async fn connect(
        tcp: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<TlsStream> {
        let tls = ClientConnection::new(config, name).map_err(invalid)?;
        let mut s = TlsStream::new(tcp, tls.into());
        s.handshake().await?;
        Ok(s)
    }

    /// The server side: handshakes with an agent.
    pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let tls = ServerConnection::new(config).map_err(invalid)?;
        let mut s = TlsStream::new(tcp, tls.into());
        s.handshake().await?;
        Ok(s)
    }

    fn new(tcp: TcpStream, tls: Connection) -> TlsStream {
        TlsStream {
            tcp,
            tls,
            rx: Vec::new(),
            rx_at: 0,
            tx: Vec::new(),
            plaintext: 0,
            closed: false,
            clean_close: false,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    async fn handshake(&mut self) -> io::Result<()> {
        while self.tls.is_handshaking() {
            self.flush().await?;
            if !self.tls.is_handshaking() {
                break;
            }
            if !self.tls.wants_read() {
                return Err(io::Error::other("the TLS handshake stalled"));
            }
            if let Fed::End = self.feed().await? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
        }
        self.flush().await
    }

    /// Sends every record rustls has ready.
    async fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.tx)?;
        }
        if self.tx.is_empty() {
            return Ok(());
        }
        let tx = std::mem::take(&mut self.tx);
        let (res, mut tx) = self.tcp.write_all(tx).await;
        tx.clear();
        self.tx = tx;
        res.map(|_| ())
    }

    /// Reads ciphertext (from what is left in `rx`, else from the socket) and decrypts it.
    async fn feed(&mut self) -> io::Result<Fed> {
        if self.rx_at == self.rx.len() {
            self.rx.clear();
            self.rx_at = 0;
            self.rx.reserve(CIPHER_CHUNK);
            let rx = std::mem::take(&mut self.rx);
            let (res, rx) = self.tcp.read(rx).await;
            self.rx = rx;
            if res? == 0 {
                self.closed = true;
                return Ok(Fed::End);
            }
        }
        if let Err(e) = self.decrypt() {
            // Tell the peer why (rustls queued an alert), then fail.
            let _ = self.flush().await;
            return Err(e);
        }
        Ok(Fed::Some)
    }

    /// Hands the ciphertext in `rx` to rustls until it yields plaintext, wants more, or the
    /// peer closes (what follows a close_notify is ignored, RFC 8446 section 6.1).
    fn decrypt(&mut self) -> io::Result<()> {
        while self.rx_at < self.rx.len() && self.plaintext == 0 && !self.closed {
            let n = self.tls.read_tls(&mut &self.rx[self.rx_at..])?;
            if n == 0 {
                // rustls takes nothing more (it has seen the peer's close_notify).
                self.rx_at = self.rx.len();
            }
            self.rx_at += n;
            let state = self.tls.process_new_packets().map_err(invalid)?;
            self.plaintext = state.plaintext_bytes_to_read();
            if state.peer_has_closed() {
                self.closed = true;
                self.clean_close = true;
            }
        }
        if self.closed {
            self.rx_at = self.rx.len();
        }
        Ok(())
    }

    /// Reads decrypted bytes, appending them to `buf`; `Ok(0)` is the end of the stream (a
    /// close_notify, or the socket closed: see [`closed_cleanly`](Self::closed_cleanly)).
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            if let Some(n) = self.read_ready(buf).await? {
                return Ok(n);
            }
        }
    }

    /// One step of [`read_into`](Self::read_into) once the socket is readable: the plaintext
    /// already decrypted, else one socket read and what it decrypts to. `None`: those bytes did
    /// not finish a record (wait for readiness again). It waits for the peer no more than that
    /// one read, so a caller that bounds only its readiness waits never cancels a read (a
    /// cancelled read's ciphertext is lost, and the stream with it).
    pub async fn read_ready(&mut self, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        if self.plaintext == 0 && !self.closed {
            // Anything rustls wants to say first (a key update, session tickets).
            self.flush().await?;
            if let Fed::End = self.feed().await? {
                return Ok(Some(0));
            }
        }
        if self.plaintext > 0 {
            let len = buf.len();
            buf.resize(len + self.plaintext, 0);
            let got = match self.tls.reader().read(&mut buf[len..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    buf.truncate(len);
                    return Err(e);
                }
            };
            buf.truncate(len + got);
            // Nothing came although rustls said so: trust the reader, not the count.
            self.plaintext = if got == 0 {
                0
            } else {
                self.plaintext.saturating_sub(got)
            };
            if got > 0 {
                return Ok(Some(got));
            }
        }
        Ok(self.closed.then_some(0))
    }

    /// Whether the stream ended with the peer's close_notify (not only a closed socket, which
    /// anyone on the path can forge): a body that ends at the close is whole only then.
    pub fn closed_cleanly(&self) -> bool {
        self.clean_close
    }

    /// Without waiting: reads and decrypts what the socket has. `Some(true)` the peer closed
    /// (close_notify, or the socket) with nothing left to read, `Some(false)` decrypted bytes
    /// wait, `None` nothing yet.
    pub fn poll_peer(&mut self) -> Option<bool> {
        use std::os::fd::AsRawFd;
        if self.plaintext == 0 && !self.closed {
            if self.rx_at == self.rx.len() {
                self.rx.clear();
                self.rx_at = 0;
            }
            self.rx.reserve(CIPHER_CHUNK);
            let len = self.rx.len();
            // SAFETY: a non-blocking read into the spare capacity of `rx`, on this stream's
            // open socket, with no other read of it in flight (the caller only awaited
            // readiness); `set_len` covers exactly the bytes the kernel wrote.
            let n = unsafe {
                libc::recv(
                    self.tcp.as_raw_fd(),
                    self.rx.as_mut_ptr().add(len).cast(),
                    self.rx.capacity() - len,
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => self.closed = true,
                n if n > 0 => unsafe { self.rx.set_len(len + n as usize) },
                _ => match io::Error::last_os_error().kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {}
                    _ => self.closed = true,
                },
            }
            if self.decrypt().is_err() {
                self.closed = true;
            }
        }
        if self.plaintext > 0 {
            Some(false)
        } else if self.closed {
            Some(true)
        } else {
            None
        }
    }

    /// Encrypts and sends all of `data`.
    pub async fn write_all<B: IoBuf>(&mut self, data: B) -> (io::Result<usize>, B) {
        // SAFETY: `read_ptr` and `bytes_init` describe the initialised bytes of `data`, which
        // is owned here and not touched until the slice is no longer used.
        let bytes = unsafe { std::slice::from_raw_parts(data.read_ptr(), data.bytes_init()) };
        let mut at = 0;
        let mut stuck = 0;
        while at < bytes.len() {
            match self.tls.writer().write(&bytes[at..]) {
                Ok(0) if stuck > 0 => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "TLS send buffer stuck");
                    return (Err(e), data);
                }
                Ok(0) => stuck += 1,
                Ok(n) => {
                    at += n;
                    stuck = 0;
                }
                Err(e) => return (Err(e), data),
            }
            // Records are sent as rustls's send buffer fills, and at the end.
            if let Err(e) = self.flush().await {
                return (Err(e), data);
            }
        }
        let len = bytes.len();
        (Ok(len), data)
    }

    /// Whether bytes are already here to read, so waiting on the socket would be wrong.
    pub fn has_pending(&self) -> bool {
        self.plaintext > 0 || self.rx_at < self.rx.len() || self.closed
    }

    /// Waits until [`read_into`](Self::read_into) has something to return (or the end).
    pub async fn readable(&self, relaxed: bool) -> io::Result<()> {
        if self.has_pending() {
            return Ok(());
        }
        self.tcp.readable(relaxed).await
    }

    /// Says goodbye (close_notify) before the socket's write side is shut; bounded, so a
    /// peer that reads nothing cannot hold the connection.
    pub async fn close_notify(&mut self) -> io::Result<()> {
        self.tls.send_close_notify();
        match crate::timer::timeout(CLOSE_NOTIFY_TIME, self.flush()).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// Lets go of the ciphertext buffers while the connection is idle.
    pub fn release_idle(&mut self) {
        if self.rx_at == self.rx.len() {
            self.rx = Vec::new();
            self.rx_at = 0;
        }
        if self.tx.is_empty() {
            self.tx = Vec::new();
        }
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}
