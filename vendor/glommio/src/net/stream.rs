// Unless explicitly stated otherwise all files in this repository are licensed
// under the MIT/Apache-2.0 License, at your convenience
//
// This product includes software developed at Datadog (https://www.datadoghq.com/). Copyright 2020 Datadog, Inc.
//
use crate::{
    reactor::Reactor,
    sys::{self, buf_ring::ProvidedBuf, Source, SourceType},
};
use futures_lite::ready;
use nix::sys::socket::MsgFlags;
use std::{
    cell::Cell,
    io,
    net::Shutdown,
    os::unix::io::{AsRawFd, FromRawFd, RawFd},
    rc::{Rc, Weak},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

type Result<T> = crate::Result<T, ()>;

/// Root trait for socket stream receive buffer
pub trait RxBuf {
    fn read(&mut self, buf: &mut [u8]) -> usize;
    fn peek(&self, buf: &mut [u8]) -> usize;
    fn is_empty(&self) -> bool;
    fn as_bytes(&self) -> &[u8];
    fn consume(&mut self, amt: usize);
    fn buffer_size(&self) -> usize;
    fn handle_result(&mut self, result: usize);
    fn unfilled(&mut self) -> &mut [u8];
}

#[derive(Debug, Default)]
pub struct NonBuffered;

impl RxBuf for NonBuffered {
    fn read(&mut self, _buf: &mut [u8]) -> usize {
        0
    }

    fn peek(&self, _buf: &mut [u8]) -> usize {
        0
    }

    fn is_empty(&self) -> bool {
        true
    }

    fn as_bytes(&self) -> &[u8] {
        &[]
    }

    fn consume(&mut self, _amt: usize) {}

    fn buffer_size(&self) -> usize {
        0
    }

    fn handle_result(&mut self, _result: usize) {}

    fn unfilled(&mut self) -> &mut [u8] {
        &mut []
    }
}

/// Trait for receive buffer implementations
pub trait Buffered: RxBuf {}

/// Non-shared fixed sized receive buffer allocated
/// when buffered stream is created
#[derive(Debug)]
pub struct Preallocated {
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    cap: usize,
}

impl Preallocated {
    const DEFAULT_BUFFER_SIZE: usize = 8192;

    /// Creates a fixed sized receive buffer
    pub fn new(size: usize) -> Self {
        Self {
            buf: vec![0; size],
            tail: 0,
            head: 0,
            cap: size,
        }
    }
}

impl Default for Preallocated {
    fn default() -> Self {
        Self::new(Self::DEFAULT_BUFFER_SIZE)
    }
}

impl Preallocated {
    fn len(&self) -> usize {
        self.tail - self.head
    }
}

impl Buffered for Preallocated {}

impl RxBuf for Preallocated {
    fn read(&mut self, buf: &mut [u8]) -> usize {
        let sz = std::cmp::min(self.len(), buf.len());
        if sz > 0 {
            buf[..sz].copy_from_slice(&self.buf[self.head..self.head + sz]);
            self.head += sz;
        }
        sz
    }

    fn peek(&self, buf: &mut [u8]) -> usize {
        let sz = std::cmp::min(self.len(), buf.len());
        if sz > 0 {
            buf[..sz].copy_from_slice(&self.buf[self.head..self.head + sz]);
        }
        sz
    }

    fn is_empty(&self) -> bool {
        self.head >= self.tail
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.head..self.tail]
    }

    fn consume(&mut self, amt: usize) {
        self.head += std::cmp::min(self.len(), amt);
    }

    fn buffer_size(&self) -> usize {
        self.cap
    }

    fn handle_result(&mut self, result: usize) {
        self.tail += result;
    }

    fn unfilled(&mut self) -> &mut [u8] {
        if self.len() == 0 {
            self.head = 0;
            self.tail = 0;
        }
        &mut self.buf[self.tail..]
    }
}

#[derive(Debug)]
struct Timeout {
    id: u64,
    timeout: Cell<Option<Duration>>,
    timer: Cell<Option<Instant>>,
}

impl Timeout {
    fn new(id: u64) -> Self {
        Self {
            id,
            timeout: Cell::new(None),
            timer: Cell::new(None),
        }
    }

    fn get(&self) -> Option<Duration> {
        self.timeout.get()
    }

    fn set(&self, dur: Option<Duration>) -> Result<()> {
        if let Some(dur) = dur.as_ref() {
            if dur.as_nanos() == 0 {
                return Err(io::Error::from_raw_os_error(libc::EINVAL).into());
            }
        }
        self.timeout.set(dur);
        Ok(())
    }

    fn maybe_set_timer(&self, reactor: &Reactor, waker: &Waker) {
        if let Some(timeout) = self.timeout.get() {
            if self.timer.get().is_none() {
                let deadline = Instant::now() + timeout;
                reactor.insert_timer(self.id, deadline, waker.clone());
                self.timer.set(Some(deadline));
            }
        }
    }

    fn cancel_timer(&self, reactor: &Reactor) {
        if self.timer.take().is_some() {
            reactor.remove_timer(self.id);
        }
    }

    fn check(&self, reactor: &Reactor) -> io::Result<()> {
        if let Some(deadline) = self.timer.get() {
            if !reactor.timer_exists(&(deadline, self.id)) {
                reactor.remove_timer(self.id);
                self.timer.take();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "Operation timed out",
                ));
            }
        }
        Ok(())
    }
}

/// Send buffers kept per thread for the next send, so that a send costs no
/// allocation.
const SEND_BUFS_KEPT: usize = 64;
/// A send buffer larger than this is freed after use, not kept.
const SEND_BUF_KEPT_CAP: usize = 64 * 1024;
/// At most this much of one `poll_write` is taken at a time.
const MAX_SEND: usize = 256 * 1024;

thread_local! {
    static SEND_BUFS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_send_buf(len: usize) -> Vec<u8> {
    let mut buf = SEND_BUFS.with(|b| b.borrow_mut().pop()).unwrap_or_default();
    buf.clear();
    buf.reserve(len);
    buf
}

/// How many send buffers this thread keeps for reuse.
#[cfg(test)]
pub(crate) fn send_bufs_kept() -> usize {
    SEND_BUFS.with(|b| b.borrow().len())
}

pub(crate) fn give_send_buf(buf: Vec<u8>) {
    if buf.capacity() > 0 && buf.capacity() <= SEND_BUF_KEPT_CAP {
        SEND_BUFS.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < SEND_BUFS_KEPT {
                b.push(buf);
            }
        });
    }
}

/// A socket stream. Where the kernel has rings of provided buffers (5.19),
/// its I/O goes through the executor's ring (patched glommio, see
/// PATCHES.md):
/// - a read submits a receive into a provided buffer when it has nothing
///   buffered, so a socket waiting for bytes holds no buffer and no `recv`
///   is made that would find nothing; the bytes are copied out of the
///   provided buffer, which goes back to the ring once consumed;
/// - a write copies its bytes into a send submitted with the next
///   `io_uring_enter` and returns at once; the next write (or flush, or
///   close) waits until that send has completed, and reports its error.
///   One send is in flight at a time, so bytes go out in order.
///
/// Otherwise reads try `recv` first and wait on a poll, and writes `send`
/// directly (glommio 0.9's own way).
#[derive(Debug)]
pub(crate) struct NonBufferedStream<S: AsRawFd> {
    reactor: Weak<Reactor>,
    stream: S,
    source_tx: Option<Source>,
    source_rx: Option<Source>,
    /// Received bytes the reader has not taken yet.
    rx_held: Option<ProvidedBuf>,
    /// The peer closed its side: reads return 0 from now on, as `recv` does.
    rx_eof: bool,
    /// The receive in flight has been asked to cancel (`poll_quiesce`).
    rx_cancelling: bool,
    /// Reads arm a multishot receive (see `TcpStream::set_multishot_recv`).
    multishot: bool,
    write_timeout: Timeout,
    read_timeout: Timeout,
}

/// What a receive through the ring brought.
enum Received {
    Bytes(ProvidedBuf),
    Eof,
    /// No provided buffer was free when the bytes came: read them with `recv`.
    NoBuffer,
}

impl<S: AsRawFd> NonBufferedStream<S> {
    fn init(&mut self) {
        let reactor = self.reactor.upgrade().unwrap();
        if !reactor.has_buf_ring() {
            let stream_fd = self.stream.as_raw_fd();
            self.source_rx = Some(reactor.poll_read_ready(stream_fd));
        }
    }

    pub(crate) fn try_peek(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        super::yolo_peek(self.stream.as_raw_fd(), buf)
    }

    pub(crate) async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        let source = self.reactor.upgrade().unwrap().recv(
            self.stream.as_raw_fd(),
            buf.len(),
            MsgFlags::MSG_PEEK,
        );

        let sz = source.collect_rw().await?;
        match source.extract_source_type() {
            SourceType::SockRecv(mut src) => {
                buf[0..sz].copy_from_slice(&src.take().unwrap().as_bytes()[0..sz]);
            }
            _ => unreachable!(),
        }
        Ok(sz)
    }

    /// Copies held bytes into `buf`; `None` when nothing is held.
    fn take_held(&mut self, buf: &mut [u8]) -> Option<usize> {
        let held = self.rx_held.as_mut()?;
        let bytes = held.bytes();
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        held.consume(n);
        if held.is_empty() {
            self.rx_held = None;
        }
        Some(n)
    }

    /// What the armed receive brought: its next buffer (a multishot
    /// receive may have several), else its outcome once it has ended;
    /// `None` while nothing has arrived, or when a multishot receive ended
    /// with nothing more to say (cancelled, or stopped after its last
    /// buffer): the next read arms another.
    fn take_received(&mut self) -> Option<io::Result<Received>> {
        if self.rx_eof {
            return Some(Ok(Received::Eof));
        }
        let source = self.source_rx.as_ref()?;
        if let SourceType::SockRecvMulti(multi) = &mut *source.source_type_mut() {
            if let Some(b) = multi.bufs.pop_front() {
                return Some(Ok(Received::Bytes(b)));
            }
        }
        let result = source.result()?;
        let source = self.source_rx.take()?;
        let slot = match source.extract_source_type() {
            SourceType::SockRecvSelect(slot) => slot,
            SourceType::SockRecvMulti(multi) => {
                return match result {
                    Ok(0) => {
                        self.rx_eof = true;
                        Some(Ok(Received::Eof))
                    }
                    Ok(_) => None,
                    // `-ECANCELED` (reported as a timeout) after a cancel
                    // of ours: too many buffers unread, or `quiesce`.
                    Err(e) if multi.cancelling && e.kind() == io::ErrorKind::TimedOut => None,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        Some(Ok(Received::NoBuffer))
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        // A kernel without multishot receives (before 6.0).
                        if let Some(r) = self.reactor.upgrade() {
                            r.no_multishot_recv();
                        }
                        None
                    }
                    Err(e) => Some(Err(e)),
                };
            }
            _ => None,
        };
        Some(match (result, slot) {
            (Ok(0), _) => {
                self.rx_eof = true;
                Ok(Received::Eof)
            }
            (Ok(_), Some(buf)) => Ok(Received::Bytes(buf)),
            (Ok(_), None) => Err(io::Error::new(
                io::ErrorKind::Other,
                "receive completed without a provided buffer",
            )),
            (Err(e), _) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Received::NoBuffer),
            (Err(e), _) => Err(e),
        })
    }

    /// Reads what has arrived into `buf` without waiting: `Ok(None)` when
    /// nothing has (a receive is then in flight, so the next check costs no
    /// system call), `Ok(Some(0))` at end of stream.
    pub(crate) fn try_read_now(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let reactor = self.reactor.upgrade().unwrap();
        if !reactor.has_buf_ring() {
            return super::yolo_recv(self.stream.as_raw_fd(), buf).transpose();
        }
        loop {
            if let Some(n) = self.take_held(buf) {
                return Ok(Some(n));
            }
            match self.take_received() {
                Some(Ok(Received::Bytes(b))) => self.rx_held = Some(b),
                Some(Ok(Received::Eof)) => return Ok(Some(0)),
                Some(Ok(Received::NoBuffer)) => {
                    if let Some(r) = super::yolo_recv(self.stream.as_raw_fd(), buf) {
                        return r.map(Some);
                    }
                }
                Some(Err(e)) => return Err(e),
                None if self.source_rx.is_some() => return Ok(None),
                None => {
                    // Nothing armed: one `recv` now, then a receive through
                    // the ring for the checks to come.
                    if let Some(r) = super::yolo_recv(self.stream.as_raw_fd(), buf) {
                        return r.map(Some);
                    }
                    self.arm_read();
                    return Ok(None);
                }
            }
        }
    }

    /// Moves the bytes received and not read yet into `out`: for a stream
    /// whose socket is about to be handed to another owner (another
    /// executor, another process). A receive in flight is cancelled; call it
    /// when none is (after a read completed).
    pub(crate) fn take_buffered(&mut self, out: &mut Vec<u8>) {
        loop {
            if let Some(held) = self.rx_held.take() {
                out.extend_from_slice(held.bytes());
            }
            match self.take_received() {
                Some(Ok(Received::Bytes(b))) => self.rx_held = Some(b),
                _ => break,
            }
        }
        self.source_rx = None;
    }

    /// Submits a receive (with the next `io_uring_enter`) if none is in
    /// flight and nothing is held: what arrives later is waiting when the
    /// stream is read, with no system call.
    pub(crate) fn arm_read(&mut self) {
        if self.rx_held.is_some() || self.source_rx.is_some() {
            return;
        }
        let reactor = self.reactor.upgrade().unwrap();
        if reactor.has_buf_ring() {
            self.source_rx = Some(reactor.recv_armed(self.stream.as_raw_fd(), self.multishot));
        }
    }

    /// Ready once the stream has no request in the kernel: the send in
    /// flight has completed (its error is returned) and the receive in
    /// flight has been cancelled; what that receive brought before the
    /// cancellation is held for the next read ([`Self::has_held`]). The
    /// socket may then be watched by other means (an epoll set) and the
    /// stream kept or dropped without losing a byte. A later read arms a
    /// new receive.
    pub(crate) fn poll_quiesce(&mut self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        let reactor = self.reactor.upgrade().unwrap();
        if !reactor.has_buf_ring() {
            // glommio 0.9's way: poll sources consume no bytes.
            self.source_rx = None;
            self.source_tx = None;
            return Poll::Ready(Ok(()));
        }
        poll_err!(ready!(self.poll_sent(cx, &reactor)));
        self.source_tx = None;
        loop {
            let Some(source) = self.source_rx.as_ref() else {
                self.rx_cancelling = false;
                return Poll::Ready(Ok(()));
            };
            if source.result().is_none() {
                if source.is_queued() {
                    // Not submitted yet: the kernel never saw it.
                    self.source_rx = None;
                    continue;
                }
                if !self.rx_cancelling {
                    if let SourceType::SockRecvMulti(multi) = &mut *source.source_type_mut() {
                        multi.cancelling = true;
                    }
                    self.rx_cancelling = source.cancel_in_flight();
                }
                source.add_waiter_single(cx.waker());
                return Poll::Pending;
            }
            let multi = match &*source.source_type() {
                SourceType::SockRecvMulti(multi) => Some(!multi.bufs.is_empty()),
                _ => None,
            };
            if let Some(has_bufs) = multi {
                self.rx_cancelling = false;
                if has_bufs {
                    // Out of the kernel: it keeps its buffers (and its
                    // outcome) for the next read.
                    return Poll::Ready(Ok(()));
                }
                return match self.take_received() {
                    Some(Err(e)) => Poll::Ready(Err(e)),
                    _ => Poll::Ready(Ok(())),
                };
            }
            let cancelled = std::mem::take(&mut self.rx_cancelling);
            match self.take_received() {
                Some(Ok(Received::Bytes(b))) => self.rx_held = Some(b),
                // Bytes left in the socket (no buffer was free) or the end
                // of stream: the next read finds them.
                Some(Ok(Received::Eof)) | Some(Ok(Received::NoBuffer)) | None => {}
                // `-ECANCELED`, which `sys::uring` reports as a timeout.
                Some(Err(e)) if cancelled && e.kind() == io::ErrorKind::TimedOut => {}
                Some(Err(e)) => return Poll::Ready(Err(e)),
            }
            self.source_rx = None;
            return Poll::Ready(Ok(()));
        }
    }

    /// Bytes were received and not read yet (or the end of the stream).
    pub(crate) fn has_held(&self) -> bool {
        if self.rx_held.is_some() || self.rx_eof {
            return true;
        }
        let Some(source) = self.source_rx.as_ref() else {
            return false;
        };
        let multi = match &*source.source_type() {
            SourceType::SockRecvMulti(multi) if !multi.bufs.is_empty() => return true,
            SourceType::SockRecvMulti(_) => true,
            _ => false,
        };
        match source.result() {
            Some(Ok(0)) => true,
            Some(Ok(_)) => !multi,
            _ => false,
        }
    }

    pub(crate) fn poll_read(
        &mut self,
        cx: &Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let reactor = self.reactor.upgrade().unwrap();
        if !reactor.has_buf_ring() {
            return self.poll_read_polled(cx, buf, &reactor);
        }
        loop {
            if let Some(n) = self.take_held(buf) {
                self.read_timeout.cancel_timer(&reactor);
                return Poll::Ready(Ok(n));
            }
            match self.take_received() {
                Some(Ok(Received::Bytes(b))) => self.rx_held = Some(b),
                Some(Ok(Received::Eof)) => {
                    self.read_timeout.cancel_timer(&reactor);
                    return Poll::Ready(Ok(0));
                }
                Some(Ok(Received::NoBuffer)) => {
                    if let Some(r) = super::yolo_recv(self.stream.as_raw_fd(), buf) {
                        self.read_timeout.cancel_timer(&reactor);
                        return Poll::Ready(r);
                    }
                }
                Some(Err(e)) => {
                    self.read_timeout.cancel_timer(&reactor);
                    return Poll::Ready(Err(e));
                }
                None => break,
            }
        }
        poll_err!(self.read_timeout.check(&reactor));
        if self.source_rx.is_none() {
            self.source_rx = Some(reactor.recv_armed(self.stream.as_raw_fd(), self.multishot));
        }
        let source = self.source_rx.as_ref().unwrap();
        source.add_waiter_single(cx.waker());
        self.read_timeout.maybe_set_timer(&reactor, cx.waker());
        Poll::Pending
    }

    /// glommio 0.9's read: `recv` first, else wait on a poll.
    fn poll_read_polled(
        &mut self,
        cx: &Context<'_>,
        buf: &mut [u8],
        reactor: &Reactor,
    ) -> Poll<io::Result<usize>> {
        let no_pending_poll = self
            .source_rx
            .as_ref()
            .map(|src| src.result().is_some())
            .unwrap_or(true);

        if no_pending_poll {
            if let Some(result) = super::yolo_recv(self.stream.as_raw_fd(), buf) {
                self.source_rx.take();
                self.read_timeout.cancel_timer(reactor);
                let result = poll_err!(result);
                // Start an early poll if the buffer is not fully filled. So when
                // the next time `poll_read` is called, it will be known immediately
                // whether the underlying stream is ready for reading.
                if result > 0 && result < buf.len() {
                    self.source_rx = Some(reactor.poll_read_ready(self.stream.as_raw_fd()));
                }
                return Poll::Ready(Ok(result));
            }
        }

        poll_err!(self.read_timeout.check(reactor));

        if no_pending_poll {
            self.source_rx = Some(reactor.poll_read_ready(self.stream.as_raw_fd()));
        }

        let source = self.source_rx.as_ref().unwrap();
        source.add_waiter_single(cx.waker());
        self.read_timeout.maybe_set_timer(reactor, cx.waker());
        Poll::Pending
    }

    /// Ready once no send is in flight; the error of the last one, if it
    /// failed.
    fn poll_sent(&mut self, cx: &Context<'_>, reactor: &Reactor) -> Poll<io::Result<()>> {
        let Some(source) = self.source_tx.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        let Some(result) = source.result() else {
            poll_err!(self.write_timeout.check(reactor));
            source.add_waiter_single(cx.waker());
            self.write_timeout.maybe_set_timer(reactor, cx.waker());
            return Poll::Pending;
        };
        self.write_timeout.cancel_timer(reactor);
        let source = self.source_tx.take().unwrap();
        // The completion gave the buffer back and turned a short send into
        // an error (`sys::uring`).
        drop(source);
        Poll::Ready(result.map(|_| ()))
    }

    pub(crate) fn poll_write(&mut self, cx: &Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let reactor = self.reactor.upgrade().unwrap();
        if !reactor.has_buf_ring() {
            return self.poll_write_direct(cx, buf, &reactor);
        }
        poll_err!(ready!(self.poll_sent(cx, &reactor)));
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_SEND);
        let mut owned = take_send_buf(n);
        owned.extend_from_slice(&buf[..n]);
        self.source_tx = Some(reactor.send_all(self.stream.as_raw_fd(), owned));
        Poll::Ready(Ok(n))
    }

    /// glommio 0.9's write: `send` first, else wait on a poll.
    fn poll_write_direct(
        &mut self,
        cx: &Context<'_>,
        buf: &[u8],
        reactor: &Reactor,
    ) -> Poll<io::Result<usize>> {
        // On the write path, we always start with calling `yolo_send`, because
        // it is very likely to success. It could be a waste if it already timed
        // out since the last `poll_write`, but it would not cost much more to
        // give it one last chance in this case.
        if let Some(result) = super::yolo_send(self.stream.as_raw_fd(), buf) {
            self.write_timeout.cancel_timer(reactor);
            self.source_tx.take();
            return Poll::Ready(result);
        }

        poll_err!(self.write_timeout.check(reactor));

        let no_pending_poll = self
            .source_tx
            .as_ref()
            .map(|src| src.result().is_some())
            .unwrap_or(true);

        if no_pending_poll {
            self.source_tx = Some(reactor.poll_write_ready(self.stream.as_raw_fd()));
        }

        let source = self.source_tx.as_ref().unwrap();
        source.add_waiter_single(cx.waker());
        self.write_timeout.maybe_set_timer(reactor, cx.waker());
        Poll::Pending
    }

    /// Ready once what was written has been sent.
    pub(crate) fn poll_flush(&mut self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        let reactor = self.reactor.upgrade().unwrap();
        if !reactor.has_buf_ring() {
            return Poll::Ready(Ok(()));
        }
        self.poll_sent(cx, &reactor)
    }

    pub(crate) fn poll_close(&mut self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        poll_err!(ready!(self.poll_flush(cx)));
        self.source_tx.take();
        Poll::Ready(sys::shutdown(self.stream.as_raw_fd(), Shutdown::Write))
    }

    /// io_uring has support for shutdown now, but it is not in any released
    /// kernel. Even with my "let's use latest" policy it would be crazy to
    /// mandate a kernel that doesn't even exist. So in preparation for that
    /// we'll sync-emulate this but already on an async wrapper.
    ///
    /// A send still in flight goes out first.
    pub(crate) fn poll_shutdown(
        &self,
        cx: &mut Context<'_>,
        how: Shutdown,
    ) -> Poll<io::Result<()>> {
        if let Some(source) = &self.source_tx {
            if how != Shutdown::Read && source.result().is_none() {
                source.add_waiter_single(cx.waker());
                return Poll::Pending;
            }
        }
        Poll::Ready(sys::shutdown(self.stream.as_raw_fd(), how))
    }
}

impl<S: AsRawFd> Drop for NonBufferedStream<S> {
    fn drop(&mut self) {
        // The socket closes right after this. A send the kernel has not seen
        // yet goes out now, as far as the socket takes it without waiting
        // (dropping the source keeps it from ever being submitted). A send
        // in flight is cancelled, like a receive in flight.
        if let Some(source) = self.source_tx.take() {
            if source.is_queued() {
                if let SourceType::SockSendOwned(buf, _) = &*source.source_type() {
                    let _ = sys::send_syscall(
                        self.stream.as_raw_fd(),
                        buf.as_ptr(),
                        buf.len(),
                        (MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL).bits(),
                    );
                }
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct GlommioStream<S: AsRawFd, B> {
    stream: NonBufferedStream<S>,
    rx_buf: B,
    rx_done: Cell<bool>,
}

impl<S> From<socket2::Socket> for GlommioStream<S, NonBuffered>
where
    S: AsRawFd + From<socket2::Socket> + Unpin,
{
    fn from(socket: socket2::Socket) -> Self {
        let reactor = crate::executor().reactor();
        let mut stream = NonBufferedStream {
            reactor: Rc::downgrade(&reactor),
            stream: socket.into(),
            source_tx: None,
            source_rx: None,
            rx_held: None,
            rx_eof: false,
            rx_cancelling: false,
            multishot: true,
            write_timeout: Timeout::new(reactor.register_timer()),
            read_timeout: Timeout::new(reactor.register_timer()),
        };
        stream.init();
        GlommioStream {
            stream,
            rx_buf: NonBuffered,
            rx_done: Cell::new(false),
        }
    }
}

impl<S: AsRawFd> AsRawFd for GlommioStream<S, NonBuffered> {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.stream.as_raw_fd()
    }
}

impl<S> FromRawFd for GlommioStream<S, NonBuffered>
where
    S: AsRawFd + FromRawFd + From<socket2::Socket> + Unpin,
{
    unsafe fn from_raw_fd(fd: RawFd) -> Self {
        let socket = socket2::Socket::from_raw_fd(fd);
        GlommioStream::from(socket)
    }
}

impl<S: AsRawFd> GlommioStream<S, NonBuffered> {
    pub(crate) fn buffered_with<B: Buffered>(self, rx_buf: B) -> GlommioStream<S, B> {
        GlommioStream {
            stream: self.stream,
            rx_buf,
            rx_done: self.rx_done,
        }
    }
}

impl<S: AsRawFd, B: RxBuf> GlommioStream<S, B> {
    /// Receives data on the socket from the remote address to which it is
    /// connected, without removing that data from the queue.
    ///
    /// On success, returns the number of bytes peeked.
    /// Successive calls return the same data. This is accomplished by passing
    /// `MSG_PEEK` as a flag to the underlying `recv` system call.
    pub(crate) async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut pos = self.rx_buf.peek(buf);
        if pos < buf.len() && !self.rx_done.get() {
            if let Some(result) = self.stream.try_peek(&mut buf[pos..]) {
                match result {
                    Err(e) => return Err(e),
                    Ok(len) => {
                        pos += len;
                        if len == 0 {
                            self.rx_done.set(true);
                        }
                    }
                }
            }
        }
        if pos > 0 || self.rx_done.get() {
            return Ok(pos);
        }
        self.stream.peek(buf).await
    }

    pub(crate) fn poll_read(
        &mut self,
        cx: &Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.rx_buf.is_empty() {
            if buf.len() >= self.rx_buf.buffer_size() {
                return self.stream.poll_read(cx, buf);
            }
            if !self.rx_done.get() {
                poll_err!(ready!(self.poll_replenish_buffer(cx)));
            }
        }
        Poll::Ready(Ok(self.rx_buf.read(buf)))
    }

    fn poll_replenish_buffer(&mut self, cx: &Context<'_>) -> Poll<io::Result<usize>> {
        let result = poll_err!(ready!(self.stream.poll_read(cx, self.rx_buf.unfilled())));
        self.rx_buf.handle_result(result);
        if result == 0 {
            self.rx_done.set(true);
        }
        Poll::Ready(Ok(result))
    }

    pub(crate) fn poll_write(&mut self, cx: &Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.stream.poll_write(cx, buf)
    }

    pub(crate) fn poll_flush(&mut self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_flush(cx)
    }

    /// See [`NonBufferedStream::try_read_now`]; bytes buffered by a buffered
    /// stream come first.
    pub(crate) fn try_read_now(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if !self.rx_buf.is_empty() {
            return Ok(Some(self.rx_buf.read(buf)));
        }
        self.stream.try_read_now(buf)
    }

    /// See [`NonBufferedStream::take_buffered`]; bytes buffered by a buffered
    /// stream come first.
    pub(crate) fn take_buffered(&mut self, out: &mut Vec<u8>) {
        while !self.rx_buf.is_empty() {
            let bytes = self.rx_buf.as_bytes();
            let n = bytes.len();
            out.extend_from_slice(bytes);
            self.rx_buf.consume(n);
        }
        self.stream.take_buffered(out);
    }

    /// See [`NonBufferedStream::poll_quiesce`].
    pub(crate) fn poll_quiesce(&mut self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_quiesce(cx)
    }

    /// (send, receive) requests this stream holds.
    #[cfg(test)]
    pub(crate) fn sources_held(&self) -> (bool, bool) {
        (
            self.stream.source_tx.is_some(),
            self.stream.source_rx.is_some(),
        )
    }

    /// The armed receive: its identity, the buffers it holds unread, and
    /// whether it has ended.
    #[cfg(test)]
    pub(crate) fn rx_state(&self) -> Option<(*const (), usize, bool)> {
        let source = self.stream.source_rx.as_ref()?;
        let held = match &*source.source_type() {
            SourceType::SockRecvMulti(multi) => multi.bufs.len(),
            _ => 0,
        };
        let id = &*source.inner as *const _ as *const ();
        Some((id, held, source.result().is_some()))
    }

    /// Bytes (or the end of stream) wait to be read without a system call.
    pub(crate) fn has_buffered(&self) -> bool {
        !self.rx_buf.is_empty() || self.rx_done.get() || self.stream.has_held()
    }

    pub(crate) fn set_multishot_recv(&mut self, on: bool) {
        self.stream.multishot = on;
    }

    /// See [`NonBufferedStream::arm_read`].
    pub(crate) fn arm_read(&mut self) {
        if self.rx_buf.is_empty() {
            self.stream.arm_read();
        }
    }

    pub(crate) fn poll_close(&mut self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_close(cx)
    }

    pub(crate) fn poll_shutdown(
        &self,
        cx: &mut Context<'_>,
        how: Shutdown,
    ) -> Poll<io::Result<()>> {
        self.stream.poll_shutdown(cx, how)
    }

    pub(crate) fn set_write_timeout(&self, dur: Option<Duration>) -> Result<()> {
        self.stream.write_timeout.set(dur)
    }

    pub(crate) fn set_read_timeout(&self, dur: Option<Duration>) -> Result<()> {
        self.stream.read_timeout.set(dur)
    }

    pub(crate) fn write_timeout(&self) -> Option<Duration> {
        self.stream.write_timeout.get()
    }

    pub(crate) fn read_timeout(&self) -> Option<Duration> {
        self.stream.read_timeout.get()
    }

    pub(crate) fn stream(&self) -> &S {
        &self.stream.stream
    }
}

impl<S: AsRawFd, B: Buffered> GlommioStream<S, B> {
    pub(crate) fn poll_fill_buf(&mut self, cx: &Context<'_>) -> Poll<io::Result<&[u8]>> {
        if self.rx_buf.is_empty() {
            poll_err!(ready!(self.poll_replenish_buffer(cx)));
        }
        Poll::Ready(Ok(self.rx_buf.as_bytes()))
    }

    pub(crate) fn consume(&mut self, amt: usize) {
        self.rx_buf.consume(amt);
    }
}
