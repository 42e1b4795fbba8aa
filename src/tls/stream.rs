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
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The certificate chain the peer presented (an agent's, under mutual TLS).
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.tls.peer_certificates()
    }

    async fn handshake(&mut self) -> io::Result<()> {
        while self.tls.is_handshaking() {
            self.flush().await?;
            if self.tls.is_handshaking() && self.tls.wants_read() {
                if let Fed::End = self.feed().await? {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    ));
                }
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
        let n = self.tls.read_tls(&mut &self.rx[self.rx_at..])?;
        self.rx_at += n;
        match self.tls.process_new_packets() {
            Ok(state) => {
                self.plaintext = state.plaintext_bytes_to_read();
                if state.peer_has_closed() {
                    self.closed = true;
                }
                Ok(Fed::Some)
            }
            Err(e) => {
                // Tell the peer why (rustls queued an alert), then fail.
                let _ = self.flush().await;
                Err(invalid(e))
            }
        }
    }

    /// Reads decrypted bytes, appending them to `buf`; `Ok(0)` is the end of the stream (a
    /// close_notify, or the socket closed: HTTP's own framing says whether a message was
    /// whole).
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
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
                self.plaintext -= got.min(self.plaintext);
                if got > 0 {
                    return Ok(got);
                }
            }
            if self.closed && self.rx_at == self.rx.len() {
                return Ok(0);
            }
            // Anything rustls wants to say first (a key update, session tickets).
            self.flush().await?;
            if let Fed::End = self.feed().await? {
                return Ok(0);
            }
        }
    }

    /// Encrypts and sends all of `data`.
    pub async fn write_all<B: IoBuf>(&mut self, data: B) -> (io::Result<usize>, B) {
        // SAFETY: `read_ptr` and `bytes_init` describe the initialised bytes of `data`, which
        // is owned here and not touched until the slice is no longer used.
        let bytes = unsafe { std::slice::from_raw_parts(data.read_ptr(), data.bytes_init()) };
        let mut at = 0;
        while at < bytes.len() {
            match self.tls.writer().write(&bytes[at..]) {
                Ok(0) => {}
                Ok(n) => at += n,
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

    /// Says goodbye (close_notify) before the socket's write side is shut.
    pub async fn close_notify(&mut self) -> io::Result<()> {
        self.tls.send_close_notify();
        self.flush().await
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
