//! A socket of the pooler, plain or TLS, for clients and servers alike.
//!
//! TLS is done by hand over glommio's socket with rustls' unbuffered API
//! (`crate::tls`): encrypted bytes are read straight into the session's
//! input buffer and decrypted there, writes are encrypted into its output
//! buffer and flushed with `send`. A plain socket goes straight through, so
//! the non-TLS hot path costs one `match` per read or write.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{ready, AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use crate::tls::{TlsError, TlsSession};
use crate::websocket::{WsState, WsStream};

pub enum Stream {
    Plain(TcpStream),
    /// The socket inline, the TLS session boxed: an idle TLS client holds
    /// the socket, rustls' state and nothing else (`crate::tls`).
    Tls(TcpStream, Box<TlsSession>),
    /// A WebSocket client: the protocol in binary frames over a plain or
    /// TLS stream (`crate::websocket`).
    Ws(Box<WsStream>),
}

/// A TLS stream's socket and session, borrowed together.
struct TlsIo<'a> {
    tcp: &'a mut TcpStream,
    tls: &'a mut TlsSession,
}

impl TlsIo<'_> {
    /// Sends what the session has encrypted; Ready once nothing is pending.
    fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let pending = self.tls.pending();
            if pending.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let n = ready!(Pin::new(&mut *self.tcp).poll_write(cx, pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tls.sent(n);
        }
    }

    /// Sends whatever the session has encrypted.
    async fn flush(&mut self) -> io::Result<()> {
        futures_lite::future::poll_fn(|cx| {
            ready!(self.poll_flush_tls(cx))?;
            Pin::new(&mut *self.tcp).poll_flush(cx)
        })
        .await
    }

    /// A TLS error: the alert the session queued goes out if the socket
    /// takes it now, and the caller gets `InvalidData`.
    fn fail(&mut self, e: TlsError) -> io::Error {
        let alert = self.tls.pending();
        if !alert.is_empty() {
            // SAFETY: send from a live buffer on our own socket, non-blocking.
            unsafe {
                libc::send(
                    self.tcp.as_raw_fd(),
                    alert.as_ptr().cast(),
                    alert.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
        e.into()
    }

    /// Reads encrypted bytes from the socket into the session: into the
    /// thread's scratch buffer unless a partial record is held.
    /// Ready(Ok(false)) at end of stream.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let TlsIo { tcp, tls } = self;
        let got = if tls.has_partial_input() {
            let n = ready!(Pin::new(&mut **tcp).poll_read(cx, tls.read_space()))?;
            if n == 0 {
                return Poll::Ready(Ok(false));
            }
            tls.received(n)
        } else {
            let read =
                crate::tls::with_scratch(|buf| match Pin::new(&mut **tcp).poll_read(cx, buf) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        Poll::Ready(Ok(Some(tls.received_in(&mut buf[..n]))))
                    }
                    Poll::Ready(Ok(_)) => Poll::Ready(Ok(None)),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                });
            match ready!(read)? {
                None => return Poll::Ready(Ok(false)),
                Some(got) => got,
            }
        };
        got.map_err(|e| self.fail(e))?;
        Poll::Ready(Ok(true))
    }

    /// Runs the handshake to its end.
    async fn handshake(&mut self) -> io::Result<()> {
        loop {
            futures_lite::future::poll_fn(|cx| self.poll_flush_tls(cx)).await?;
            if !self.tls.is_handshaking() {
                return Ok(());
            }
            let more = futures_lite::future::poll_fn(|cx| self.poll_read_tls(cx)).await?;
            if !more {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the TLS handshake",
                ));
            }
        }
    }

    fn poll_read_plain(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            if !self.tls.plaintext().is_empty() {
                return Poll::Ready(Ok(self.tls.read_plain(buf)));
            }
            // Closed without close_notify: an end of stream all the same.
            if self.tls.eof || self.tls.peer_closed() {
                return Poll::Ready(Ok(0));
            }
            // Whatever the session wants to say (key updates) goes out when
            // the socket takes it; reading does not wait for it.
            if !self.tls.pending().is_empty() {
                if let Poll::Ready(Err(e)) = self.poll_flush_tls(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if !ready!(self.poll_read_tls(cx))? {
                self.tls.eof = true;
            }
        }
    }

    /// A write is Ready only once its records are sent, so that a caller
    /// with nothing more to write never leaves bytes in the session. While
    /// they are being sent it is Pending, and the caller's retry (with the
    /// same bytes, as AsyncWrite callers do) reports what was taken.
    fn poll_write_plain(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_flush_tls(cx))?;
        if self.tls.owed > 0 {
            return Poll::Ready(Ok(std::mem::take(&mut self.tls.owed)));
        }
        if let Err(e) = self.tls.encrypt(buf) {
            return Poll::Ready(Err(self.fail(e)));
        }
        match self.poll_flush_tls(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.tls.owed = buf.len();
                Poll::Pending
            }
        }
    }

    /// Reads what has arrived, without waiting: `Ok(None)` when nothing has.
    fn try_read_now(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            if !self.tls.plaintext().is_empty() {
                return Ok(Some(self.tls.read_plain(buf)));
            }
            if self.tls.eof || self.tls.peer_closed() {
                return Ok(Some(0));
            }
            let TlsIo { tcp, tls } = self;
            let got = if tls.has_partial_input() {
                match tcp
                    .try_read_now(tls.read_space())
                    .map_err(io::Error::from)?
                {
                    None => return Ok(None),
                    Some(0) => None,
                    Some(n) => Some(tls.received(n)),
                }
            } else {
                let read = crate::tls::with_scratch(|scratch| {
                    Ok::<_, io::Error>(
                        match tcp.try_read_now(scratch).map_err(io::Error::from)? {
                            None => Err(()),
                            Some(0) => Ok(None),
                            Some(n) => Ok(Some(tls.received_in(&mut scratch[..n]))),
                        },
                    )
                })?;
                match read {
                    Err(()) => return Ok(None),
                    Ok(got) => got,
                }
            };
            match got {
                None => self.tls.eof = true,
                Some(r) => r.map_err(|e| self.fail(e))?,
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
        tls: Option<Box<TlsSession>>,
        ws: Option<Box<WsState>>,
        ws_open: &std::rc::Rc<std::cell::Cell<u64>>,
    ) -> Stream {
        let inner = match tls {
            Some(tls) => Stream::Tls(tcp, tls),
            None => Stream::Plain(tcp),
        };
        match ws {
            Some(state) => Stream::Ws(Box::new(WsStream::new(inner, *state, ws_open))),
            None => inner,
        }
    }

    /// Runs a TLS handshake over `tcp` with `tls` (a server session for a
    /// client, a client session towards a database).
    pub async fn tls_handshake(tcp: TcpStream, tls: TlsSession) -> io::Result<Stream> {
        let mut tcp = tcp;
        let mut tls = Box::new(tls);
        TlsIo {
            tcp: &mut tcp,
            tls: &mut tls,
        }
        .handshake()
        .await?;
        Ok(Stream::Tls(tcp, tls))
    }

    /// Sends what a TLS session holds and hands the encrypted bytes the
    /// socket has read ahead to the session: the TLS stream can move to
    /// another shard as its parts (`Stream::assemble`).
    pub async fn settle_tls(&mut self) -> io::Result<()> {
        if let Stream::Tls(tcp, tls) = self {
            TlsIo { tcp, tls }.flush().await?;
        }
        self.absorb_tls_buffered()
    }

    /// Hands the encrypted bytes the socket has read ahead to the TLS
    /// session, if this is a TLS stream.
    pub fn absorb_tls_buffered(&mut self) -> io::Result<()> {
        if let Stream::Tls(tcp, tls) = self {
            let held = tcp.take_buffered();
            if let Err(e) = tls.feed(&held) {
                return Err(TlsIo { tcp, tls }.fail(e));
            }
        }
        Ok(())
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(tcp, _) => tcp,
            Stream::Ws(w) => w.inner().tcp(),
        }
    }

    pub fn is_tls(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(..) => true,
            Stream::Ws(w) => w.inner().is_tls(),
        }
    }

    /// The SNI host name the client sent, on a TLS server connection; for
    /// a WebSocket client, the host of the `address` it named (else its
    /// TLS SNI).
    pub fn sni(&self) -> Option<&str> {
        match self {
            Stream::Tls(_, tls) => tls.sni(),
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

    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(tcp, _) => tcp,
            Stream::Ws(w) => w.inner_mut().tcp_mut(),
        }
    }

    /// Reads what has arrived without waiting (`Ok(None)`: nothing yet;
    /// `Ok(Some(0))`: closed). After the first call a receive stays armed
    /// in the ring, so later calls make no system call.
    pub fn try_read_now(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self {
            Stream::Plain(s) => s.try_read_now(buf).map_err(io::Error::from),
            Stream::Tls(tcp, tls) => TlsIo { tcp, tls }.try_read_now(buf),
            // Only server connections are probed this way.
            Stream::Ws(_) => Ok(None),
        }
    }

    /// A client that may be parked (`crate::park`): plain TCP or TLS.
    /// WebSocket clients keep their task.
    pub fn parkable(&self) -> bool {
        matches!(self, Stream::Plain(_) | Stream::Tls(..))
    }

    /// Waits until the socket has no request in the ring (what TLS holds
    /// sent, the last send completed, the armed receive cancelled): for a
    /// parked client, and before a socket changes shards (a receive stays
    /// armed after a read, and would take what arrives meanwhile).
    pub async fn quiesce(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.quiesce().await.map_err(io::Error::from),
            Stream::Tls(tcp, tls) => {
                TlsIo { tcp, tls }.flush().await?;
                tcp.quiesce().await.map_err(io::Error::from)
            }
            Stream::Ws(w) => {
                w.flush().await?;
                Box::pin(w.inner_mut().quiesce()).await
            }
        }
    }

    /// Something waits to be read without the socket (bytes received and
    /// not read, the end of stream, plaintext or a partial record the TLS
    /// session holds), or to be sent:
    /// the client is not parked then.
    pub fn has_buffered(&mut self) -> bool {
        match self {
            Stream::Plain(s) => s.has_buffered(),
            Stream::Tls(tcp, tls) => {
                tls.eof
                    || tcp.has_buffered()
                    || !tls.pending().is_empty()
                    || !tls.plaintext().is_empty()
                    || tls.peer_closed()
                    || tls.has_partial_input()
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
        if let Stream::Tls(tcp, tls) = self {
            // Nothing to close before the handshake is over.
            let _ = tls.close_notify();
            let mut io = TlsIo { tcp, tls };
            futures_lite::future::poll_fn(|cx| io.poll_flush_tls(cx)).await?;
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
            Stream::Tls(tcp, tls) => TlsIo { tcp, tls }.poll_read_plain(cx, buf),
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
            Stream::Tls(tcp, tls) => TlsIo { tcp, tls }.poll_write_plain(cx, buf),
            Stream::Ws(w) => Pin::new(&mut **w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(tcp, tls) => {
                ready!(TlsIo { tcp, tls }.poll_flush_tls(cx))?;
                Pin::new(tcp).poll_flush(cx)
            }
            Stream::Ws(w) => Pin::new(&mut **w).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(tcp, tls) => {
                ready!(TlsIo { tcp, tls }.poll_flush_tls(cx))?;
                Pin::new(tcp).poll_close(cx)
            }
            Stream::Ws(w) => Pin::new(&mut **w).poll_close(cx),
        }
    }
}
