//! [`WsStream`]: a client's WebSocket connection seen as a byte stream.
//!
//! Reads deframe in place: the socket is read into the caller's buffer and
//! the unmasked payload of the data frames is moved to its front in the same
//! pass (`wire::websocket::Deframer`), so a frame costs no copy beyond its
//! unmasking. Pings are answered, the client's close frame is answered and
//! reads then end; a framing violation is answered with a close frame that
//! says why, and the read fails.
//!
//! Each write becomes one binary frame. A write of up to `COALESCE` bytes
//! is copied behind its 2–4-byte header so that the frame leaves in one
//! `send` (a second syscall costs far more than copying a few KiB); a larger
//! one goes out as the header, then the caller's bytes themselves. As with
//! the TLS stream, a write is Ready only once its bytes are handed to the
//! socket (a Pending write that took bytes reports them on its retry).

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use futures_lite::{ready, AsyncRead, AsyncWrite};
use wire::websocket::frame::{
    encode_close, encode_frame, encode_header, CLOSE_NORMAL, MAX_SERVER_HEADER_LEN, OP_BINARY,
    OP_PONG,
};
use wire::websocket::{Deframer, FrameError};

use crate::buf::{IoBuf, DEFAULT_CAP};
use crate::stream::Stream;

/// Writes up to this size are copied behind their frame header (one send);
/// the frame then fits a spare I/O buffer.
const COALESCE: usize = DEFAULT_CAP - MAX_SERVER_HEADER_LEN;
/// Bytes read and dropped after a framing violation, so that closing the
/// socket does not reset it (and destroy the close frame) over unread input.
const DRAIN_ON_ERROR: usize = 64 * 1024;

/// What the connection holds besides its socket. It travels with the socket
/// when the connection is handed to another shard.
#[derive(Debug)]
pub struct WsState {
    deframer: Deframer,
    /// Frames (control frames, data frame headers, coalesced payloads) not
    /// yet handed to the socket.
    out: IoBuf,
    /// Payload bytes of the data frame being sent that are still to come
    /// from the caller's buffer.
    frame_left: usize,
    /// Bytes of a Pending write already taken into `out`.
    owed: usize,
    close_sent: bool,
    error: Option<FrameError>,
    /// The client may log in with a cleartext password (TLS, or an address
    /// the configuration trusts).
    pub cleartext_ok: bool,
    /// The host of the `address=host:port` the client named, lower case,
    /// routed like a TLS SNI host.
    pub host: Option<String>,
}

impl WsState {
    pub fn new(cleartext_ok: bool, host: Option<String>) -> Self {
        WsState {
            deframer: Deframer::new(wire::frame::MAX_FRAME_LEN as u64),
            out: IoBuf::new(),
            frame_left: 0,
            owed: 0,
            close_sent: false,
            error: None,
            cleartext_ok,
            host,
        }
    }
}

/// Counts the open WebSocket connections of a shard.
#[derive(Debug)]
pub struct OpenGuard(Rc<Cell<u64>>);

impl OpenGuard {
    pub fn new(gauge: &Rc<Cell<u64>>) -> Self {
        gauge.set(gauge.get() + 1);
        OpenGuard(gauge.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

pub struct WsStream {
    inner: Stream,
    state: WsState,
    _open: OpenGuard,
}

impl WsStream {
    pub fn new(inner: Stream, state: WsState, open: &Rc<Cell<u64>>) -> Self {
        WsStream {
            inner,
            state,
            _open: OpenGuard::new(open),
        }
    }

    pub fn inner(&self) -> &Stream {
        &self.inner
    }

    pub fn state(&self) -> &WsState {
        &self.state
    }

    pub fn inner_mut(&mut self) -> &mut Stream {
        &mut self.inner
    }

    /// Before the socket changes shards: the protocol bytes of the frames
    /// its socket has received and not handed to a reader yet (a TLS
    /// session keeps them inside itself instead). Control frames among
    /// them are answered from the new shard.
    pub fn take_buffered_data(&mut self) -> io::Result<Vec<u8>> {
        match &mut self.inner {
            Stream::Plain(tcp) => {
                let mut raw = tcp.take_buffered();
                let n = self
                    .state
                    .deframer
                    .feed(&mut raw)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                raw.truncate(n);
                Ok(raw)
            }
            tls @ Stream::Tls(..) => tls.absorb_tls_buffered().map(|()| Vec::new()),
            Stream::Ws(_) => Ok(Vec::new()),
        }
    }

    /// The socket and the state, to move to another shard. Call it after a
    /// flush: nothing may wait to be sent.
    pub fn into_parts(self) -> (Stream, WsState) {
        (self.inner, self.state)
    }

    /// Hands `out` to the socket; Ready once it is empty.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.state.out.is_empty() {
            let n = self.state.out.len();
            ready!(self.state.out.poll_write_to(cx, &mut self.inner, n))?;
        }
        self.state.out.release_if_empty();
        Poll::Ready(Ok(()))
    }

    /// Queues the answers the client is owed: a pong for its last ping, a
    /// close for its close. Only between two outgoing data frames.
    fn queue_control(&mut self) {
        if self.state.frame_left > 0 || self.state.close_sent {
            return;
        }
        let mut frames = Vec::new();
        if let Some(ping) = self.state.deframer.take_ping() {
            encode_frame(OP_PONG, ping.as_bytes(), &mut frames);
        }
        if let Some(code) = self.state.deframer.peer_closed() {
            encode_close(code.unwrap_or(CLOSE_NORMAL), "", &mut frames);
            self.state.close_sent = true;
        }
        if !frames.is_empty() {
            self.state.out.extend_from_slice(&frames);
        }
    }

    /// Queues our close frame (once), if no data frame is half sent.
    fn queue_close(&mut self, code: u16, reason: &str) {
        if self.state.frame_left > 0 || self.state.close_sent {
            return;
        }
        let mut frame = Vec::new();
        encode_close(code, reason, &mut frame);
        self.state.out.extend_from_slice(&frame);
        self.state.close_sent = true;
    }

    /// After a framing violation: the close frame goes out, our side of the
    /// socket is shut, what the client has already sent is dropped, and
    /// the read fails.
    fn poll_failed(&mut self, cx: &mut Context<'_>, e: FrameError) -> Poll<io::Result<usize>> {
        if ready!(self.poll_out(cx)).is_ok() {
            let _ = Pin::new(&mut self.inner).poll_close(cx);
            let mut sink = [0u8; 4096];
            let mut drained = 0;
            while drained < DRAIN_ON_ERROR {
                match Pin::new(&mut self.inner).poll_read(cx, &mut sink) {
                    Poll::Ready(Ok(n)) if n > 0 => drained += n,
                    _ => break,
                }
            }
        }
        Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)))
    }

    fn poll_read_frames(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(e) = self.state.error {
                return self.poll_failed(cx, e);
            }
            if self.state.deframer.peer_closed().is_some() {
                // Our answer to its close goes out before the end of stream.
                ready!(self.poll_out(cx))?;
                return Poll::Ready(Ok(0));
            }
            // Pongs leave when the socket takes them; reading does not wait.
            let _ = self.poll_out(cx);
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            let n = ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            match self.state.deframer.feed(&mut buf[..n]) {
                Ok(k) => {
                    self.queue_control();
                    if k > 0 {
                        let _ = self.poll_out(cx);
                        return Poll::Ready(Ok(k));
                    }
                    // Only headers or control frames: read on.
                }
                Err(e) => {
                    self.queue_close(e.code, e.reason);
                    self.state.error = Some(e);
                }
            }
        }
    }

    fn poll_write_frame(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.poll_out(cx))?;
            if self.state.owed > 0 {
                return Poll::Ready(Ok(std::mem::take(&mut self.state.owed)));
            }
            if self.state.frame_left > 0 {
                let k = self.state.frame_left.min(buf.len());
                if k == 0 {
                    return Poll::Ready(Ok(0));
                }
                let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[..k]))?;
                self.state.frame_left -= n;
                return Poll::Ready(Ok(n));
            }
            self.queue_control();
            if !self.state.out.is_empty() {
                continue;
            }
            if self.state.close_sent {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the WebSocket is closed",
                )));
            }
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            let mut header = [0u8; MAX_SERVER_HEADER_LEN];
            let h = encode_header(true, OP_BINARY, buf.len() as u64, &mut header);
            self.state.out.extend_from_slice(&header[..h]);
            if buf.len() > COALESCE {
                // The header first, then the payload from the caller's buffer.
                self.state.frame_left = buf.len();
                continue;
            }
            self.state.out.extend_from_slice(buf);
            return match self.poll_out(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.state.owed = buf.len();
                    Poll::Pending
                }
            };
        }
    }

    /// Sends what is pending; Ready once the socket has it all.
    pub async fn flush(&mut self) -> io::Result<()> {
        futures_lite::future::poll_fn(|cx| self.poll_out(cx)).await?;
        futures_lite::AsyncWriteExt::flush(&mut self.inner).await
    }

    /// Ends our side: a close frame (normal closure) after what is
    /// pending, then the socket is shut for writing.
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        futures_lite::future::poll_fn(|cx| self.poll_out(cx)).await?;
        self.queue_close(CLOSE_NORMAL, "");
        futures_lite::future::poll_fn(|cx| self.poll_out(cx)).await?;
        self.inner.shutdown_write().await
    }
}

impl AsyncRead for WsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_read_frames(cx, buf)
    }
}

impl AsyncWrite for WsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_frame(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_out(cx))?;
        this.queue_close(CLOSE_NORMAL, "");
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}
