//! A socket of the pooler, plain or TLS (rustls), for clients and servers
//! alike.
//!
//! TLS is done by hand over glommio's socket: encrypted bytes are read with
//! one `recv` into a stack buffer and fed to rustls, plaintext comes out of
//! rustls' buffer; writes are encrypted into one pending buffer that is
//! flushed with `send`. A plain socket goes straight through, so the
//! non-TLS hot path costs one `match` per read or write.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{ready, AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use crate::websocket::{WsState, WsStream};

/// Encrypted bytes read from the socket per `recv`. Reads happen only when
/// rustls holds no plaintext, and a chunk this size decrypts to at most
/// rustls' received-plaintext limit (16 KiB), so `read_tls` never finds that
/// buffer full.
const TLS_READ_CHUNK: usize = 16 * 1024;

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
    /// A WebSocket client: the protocol in binary frames over a plain or
    /// TLS stream (`crate::websocket`).
    Ws(Box<WsStream>),
}

pub struct TlsStream {
    tcp: TcpStream,
    conn: rustls::Connection,
    /// Encrypted bytes not yet sent, from `sent` on.
    pending: Vec<u8>,
    sent: usize,
    /// Plaintext taken by the last `poll_write` that returned Pending while
    /// its records were still being sent: the retried write reports it.
    owed: usize,
    /// The peer sent close_notify or closed the socket.
    eof: bool,
}

impl TlsStream {
    pub fn new(tcp: TcpStream, conn: impl Into<rustls::Connection>) -> Self {
        TlsStream {
            tcp,
            conn: conn.into(),
            pending: Vec::new(),
            sent: 0,
            owed: 0,
            eof: false,
        }
    }

    /// The socket and the TLS session, to move to another shard. Call it
    /// with nothing pending (after a flush); the session goes on from the
    /// same state on the other side.
    pub fn into_parts(self) -> (TcpStream, rustls::Connection) {
        (self.tcp, self.conn)
    }

    /// Feeds the encrypted bytes the socket has received and not handed
    /// over yet to rustls, before the session moves to another shard.
    pub fn absorb_buffered(&mut self) -> io::Result<()> {
        let held = self.tcp.take_buffered();
        self.feed(&held)
    }

    /// Sends whatever rustls holds.
    pub async fn flush(&mut self) -> io::Result<()> {
        futures_lite::future::poll_fn(|cx| {
            ready!(self.poll_flush_tls(cx))?;
            Pin::new(&mut self.tcp).poll_flush(cx)
        })
        .await
    }

    /// Sends what rustls has encrypted; Ready once nothing is pending.
    fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.sent == self.pending.len() {
                self.pending.clear();
                self.sent = 0;
                if !self.conn.wants_write() {
                    return Poll::Ready(Ok(()));
                }
                self.conn.write_tls(&mut self.pending)?;
                continue;
            }
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
    }

    /// Feeds encrypted bytes to rustls; an error is a TLS alert (sent best
    /// effort) and `InvalidData`.
    fn feed(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.conn.read_tls(&mut data)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS: rustls took no more bytes",
                ));
            }
            if let Err(e) = self.conn.process_new_packets() {
                // The alert rustls queued goes out if the socket takes it now.
                let mut alert = Vec::new();
                let _ = self.conn.write_tls(&mut alert);
                // SAFETY: send from a live buffer on our own socket, non-blocking.
                unsafe {
                    libc::send(
                        self.tcp.as_raw_fd(),
                        alert.as_ptr().cast(),
                        alert.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
        Ok(())
    }

    /// Reads encrypted bytes from the socket into rustls. Ready(Ok(false))
    /// at end of stream.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut chunk = [0u8; TLS_READ_CHUNK];
        let n = ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut chunk))?;
        if n == 0 {
            return Poll::Ready(Ok(false));
        }
        self.feed(&chunk[..n])?;
        Poll::Ready(Ok(true))
    }

    /// Runs the handshake to its end.
    pub async fn handshake(&mut self) -> io::Result<()> {
        while self.conn.is_handshaking() {
            futures_lite::future::poll_fn(|cx| self.poll_flush_tls(cx)).await?;
            if self.conn.is_handshaking() && self.conn.wants_read() {
                let more = futures_lite::future::poll_fn(|cx| self.poll_read_tls(cx)).await?;
                if !more {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed during the TLS handshake",
                    ));
                }
            }
        }
        futures_lite::future::poll_fn(|cx| self.poll_flush_tls(cx)).await
    }

    fn poll_read_plain(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: an end of stream all the same.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(0)),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if self.eof {
                return Poll::Ready(Ok(0));
            }
            // Whatever rustls wants to say (tickets, key updates) goes out
            // when the socket takes it; reading does not wait for it.
            if self.conn.wants_write() {
                if let Poll::Ready(Err(e)) = self.poll_flush_tls(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if !ready!(self.poll_read_tls(cx))? {
                self.eof = true;
            }
        }
    }

    /// A write is Ready only once its records are sent, so that a caller
    /// with nothing more to write never leaves bytes inside rustls. While
    /// they are being sent it is Pending, and the caller's retry (with the
    /// same bytes, as AsyncWrite callers do) reports what was taken.
    fn poll_write_plain(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_flush_tls(cx))?;
        if self.owed > 0 {
            return Poll::Ready(Ok(std::mem::take(&mut self.owed)));
        }
        let n = self.conn.writer().write(buf)?;
        match self.poll_flush_tls(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.owed = n;
                Poll::Pending
            }
        }
    }

    /// Reads what has arrived, without waiting: `Ok(None)` when nothing has.
    fn try_read_now(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Some(0)),
                Err(e) => return Err(e),
            }
            let mut chunk = [0u8; TLS_READ_CHUNK];
            match self.tcp.try_read_now(&mut chunk).map_err(io::Error::from)? {
                None => return Ok(None),
                Some(0) => return Ok(Some(0)),
                Some(n) => self.feed(&chunk[..n])?,
            }
        }
    }
}

impl Stream {
    /// A stream from its parts (after a handoff between shards): the
    /// socket, the TLS session and the WebSocket state it had. `ws_open`
    /// counts this shard's WebSocket connections.
    pub fn assemble(
        tcp: TcpStream,
        tls: Option<Box<rustls::Connection>>,
        ws: Option<Box<WsState>>,
        ws_open: &std::rc::Rc<std::cell::Cell<u64>>,
    ) -> Stream {
        let inner = match tls {
            Some(conn) => Stream::Tls(Box::new(TlsStream::new(tcp, *conn))),
            None => Stream::Plain(tcp),
        };
        match ws {
            Some(state) => Stream::Ws(Box::new(WsStream::new(inner, *state, ws_open))),
            None => inner,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.tcp,
            Stream::Ws(w) => w.inner().tcp(),
        }
    }

    pub fn is_tls(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(_) => true,
            Stream::Ws(w) => w.inner().is_tls(),
        }
    }

    /// The SNI host name the client sent, on a TLS server connection; for
    /// a WebSocket client, the host of the `address` it named (else its
    /// TLS SNI).
    pub fn sni(&self) -> Option<&str> {
        match self {
            Stream::Tls(t) => match &t.conn {
                rustls::Connection::Server(s) => s.server_name(),
                rustls::Connection::Client(_) => None,
            },
            Stream::Plain(_) => None,
            Stream::Ws(w) => w.state().host.as_deref().or_else(|| w.inner().sni()),
        }
    }

    /// The client may authenticate with a cleartext password: a WebSocket
    /// client over TLS or from a trusted address (see `crate::websocket`).
    pub fn cleartext_password_ok(&self) -> bool {
        matches!(self, Stream::Ws(w) if w.state().cleartext_ok)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp().set_nodelay(on).map_err(io::Error::from)
    }

    fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &mut t.tcp,
            Stream::Ws(w) => w.inner_mut().tcp_mut(),
        }
    }

    /// Reads what has arrived without waiting (`Ok(None)`: nothing yet;
    /// `Ok(Some(0))`: closed). After the first call a receive stays armed
    /// in the ring, so later calls make no system call.
    pub fn try_read_now(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self {
            Stream::Plain(s) => s.try_read_now(buf).map_err(io::Error::from),
            Stream::Tls(t) => t.try_read_now(buf),
            // Only server connections are probed this way.
            Stream::Ws(_) => Ok(None),
        }
    }

    /// A client that may be parked (`crate::park`): plain TCP or TLS.
    /// WebSocket clients keep their task.
    pub fn parkable(&self) -> bool {
        matches!(self, Stream::Plain(_) | Stream::Tls(_))
    }

    /// Waits until the socket has no request in the ring (what TLS holds
    /// sent, the last send completed, the armed receive cancelled), for a
    /// parked client.
    pub async fn quiesce(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.quiesce().await.map_err(io::Error::from),
            Stream::Tls(t) => {
                t.flush().await?;
                t.tcp.quiesce().await.map_err(io::Error::from)
            }
            Stream::Ws(_) => Ok(()),
        }
    }

    /// Something waits to be read without the socket (bytes received and
    /// not read, the end of stream, plaintext rustls holds), or to be sent:
    /// the client is not parked then.
    pub fn has_buffered(&mut self) -> bool {
        match self {
            Stream::Plain(s) => s.has_buffered(),
            Stream::Tls(t) => {
                t.eof
                    || t.tcp.has_buffered()
                    || t.sent != t.pending.len()
                    || t.conn.wants_write()
                    || t.conn.process_new_packets().map_or(true, |s| {
                        s.plaintext_bytes_to_read() > 0 || s.peer_has_closed()
                    })
            }
            Stream::Ws(_) => true,
        }
    }

    /// Keeps a receive armed while nobody reads (a pooled idle server
    /// connection), so that what the peer sends meanwhile (a notice, a
    /// FATAL error, the end of the connection) is known without a system
    /// call when the connection is next checked.
    pub fn arm_read(&mut self) {
        self.tcp_mut().arm_read();
    }

    /// Ends our side of the conversation (close_notify first on TLS).
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        if let Stream::Ws(w) = self {
            // A close frame, then the inner stream's own shutdown (boxed:
            // the call recurses into this function).
            return Box::pin(w.shutdown_write()).await;
        }
        if let Stream::Tls(t) = self {
            t.conn.send_close_notify();
            futures_lite::future::poll_fn(|cx| t.poll_flush_tls(cx)).await?;
        }
        self.tcp()
            .shutdown(std::net::Shutdown::Write)
            .await
            .map_err(io::Error::from)
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(t) => t.poll_read_plain(cx, buf),
            Stream::Ws(w) => Pin::new(&mut **w).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(t) => t.poll_write_plain(cx, buf),
            Stream::Ws(w) => Pin::new(&mut **w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(t) => {
                ready!(t.poll_flush_tls(cx))?;
                Pin::new(&mut t.tcp).poll_flush(cx)
            }
            Stream::Ws(w) => Pin::new(&mut **w).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(t) => {
                ready!(t.poll_flush_tls(cx))?;
                Pin::new(&mut t.tcp).poll_close(cx)
            }
            Stream::Ws(w) => Pin::new(&mut **w).poll_close(cx),
        }
    }
}
