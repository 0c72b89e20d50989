//! The hot path: bytes spliced between a client and its server connection as
//! they came. Only frame headers are walked, plus the body of ReadyForQuery,
//! to know when the server connection is free again.
//!
//! One future drives all four directions (read client, write server, read
//! server, write client), so neither side can stall the other and no read is
//! ever cancelled half-way.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_lite::AsyncRead;
use glommio::net::TcpStream;
use wire::frame::{Flow, Walker};
use wire::frontend::{FUNCTION_CALL_TAG, QUERY_TAG, SYNC_TAG, TERMINATE_TAG};
use wire::WireError;

use crate::buf::IoBuf;
use crate::metrics::{bump, PoolStats};
use crate::server::ServerConn;
use crate::shard::{ClientCtl, Signal};

/// Stop reading a side while this much of it waits to be written.
const READ_CAP: usize = 256 * 1024;

/// Why [`Relay::poll_step`] returned.
#[derive(Debug)]
pub enum Event {
    /// Client bytes wait and no server connection is held (transaction mode).
    NeedServer,
    /// The transaction is over: the server connection is free.
    Released,
    /// The client closed or sent Terminate; everything before it was forwarded.
    ClientGone,
    ClientError(io::Error),
    ClientProtocol(WireError),
    ServerGone(Option<io::Error>),
    ServerProtocol(WireError),
    /// Shutdown asked and the client is between transactions.
    Shutdown,
    /// The client's tenant was removed or terminated: leave now.
    Killed,
}

/// What the client asked of the server connection it holds.
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    /// Query / Sync / FunctionCall sent whose ReadyForQuery has not come.
    pub pending: u32,
    /// Extended-protocol messages sent since the last Sync (or Flush round trips).
    pub ext_open: bool,
    /// When the oldest unanswered request was sent.
    pub started: Option<Instant>,
}

pub struct ClientSide {
    pub stream: TcpStream,
    pub buf: IoBuf,
    /// Head bytes of `buf` walked and ready to forward.
    pub walked: usize,
    pub walker: Walker,
    pub terminated: bool,
}

impl ClientSide {
    pub fn new(stream: TcpStream, leftover: &[u8]) -> Self {
        let mut buf = IoBuf::new();
        if !leftover.is_empty() {
            buf.extend_from_slice(leftover);
        }
        ClientSide {
            stream,
            buf,
            walked: 0,
            walker: Walker::default(),
            terminated: false,
        }
    }

    /// Reads into the client's own buffer, or through the shard's scratch
    /// buffer while it has none (an idle client holds no buffer).
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &RefCell<Vec<u8>>,
    ) -> Poll<io::Result<usize>> {
        if self.buf.is_allocated() {
            return self.buf.poll_read_from(cx, &mut self.stream);
        }
        let mut scratch = scratch.borrow_mut();
        let n = futures_lite::ready!(Pin::new(&mut self.stream).poll_read(cx, &mut scratch[..]))?;
        if n > 0 {
            self.buf.extend_from_slice(&scratch[..n]);
        }
        Poll::Ready(Ok(n))
    }

    /// Walks newly read bytes, counting what the server will answer.
    fn walk(&mut self, tracker: &mut Tracker) -> Result<(), WireError> {
        let mut terminate_at = None;
        let start = self.walked;
        let n = self.walker.walk(
            &self.buf.bytes()[start..],
            |_| false,
            |seen| {
                match seen.tag {
                    QUERY_TAG | FUNCTION_CALL_TAG => tracker.expect(),
                    SYNC_TAG => {
                        tracker.expect();
                        tracker.ext_open = false;
                    }
                    TERMINATE_TAG => {
                        terminate_at = Some(seen.offset);
                        return Flow::Stop;
                    }
                    b'P' | b'B' | b'D' | b'C' | b'E' | b'H' => tracker.ext_open = true,
                    // CopyData / CopyDone / CopyFail travel inside a Query or
                    // Sync that is already counted.
                    _ => {}
                }
                Flow::Continue
            },
        )?;
        match terminate_at {
            Some(off) => {
                self.walked = start + off;
                self.buf.truncate(self.walked);
                self.terminated = true;
            }
            None => self.walked = start + n,
        }
        Ok(())
    }
}

impl Tracker {
    fn expect(&mut self) {
        if self.pending == 0 {
            self.started = Some(Instant::now());
        }
        self.pending += 1;
    }

    /// A ReadyForQuery arrived: one request answered.
    fn answered(&mut self, stats: &PoolStats) {
        bump(&stats.queries, 1);
        if let Some(t) = self.started {
            let now = Instant::now();
            stats.query_duration.observe(now - t);
            self.started = Some(now);
        }
        self.pending = self.pending.saturating_sub(1);
        if self.pending == 0 {
            self.started = None;
        }
    }
}

/// Walks newly read server bytes; ReadyForQuery updates status and count.
fn walk_server(
    server: &mut ServerConn,
    tracker: &mut Tracker,
    stats: &PoolStats,
) -> Result<(), WireError> {
    let start = server.walked;
    let mut status = server.status;
    let n = server.walker.walk(
        &server.buf.bytes()[start..],
        |tag| tag == b'Z',
        |seen| {
            if let Some(body) = seen.body {
                if let Some(&s) = body.first() {
                    status = s;
                }
                tracker.answered(stats);
            }
            Flow::Continue
        },
    )?;
    server.status = status;
    server.walked = start + n;
    Ok(())
}

pub struct Relay<'a> {
    pub client: &'a mut ClientSide,
    pub tracker: &'a mut Tracker,
    pub scratch: &'a RefCell<Vec<u8>>,
    /// Release the server at transaction end (transaction mode).
    pub release: bool,
    pub ctl: &'a ClientCtl,
    pub stats: &'a PoolStats,
}

impl Relay<'_> {
    /// True when the server connection holds nothing of this client's.
    pub fn server_free(client: &ClientSide, tracker: &Tracker, server: &ServerConn) -> bool {
        tracker.pending == 0
            && !tracker.ext_open
            && server.status == b'I'
            && client.walked == 0
            && client.walker.at_boundary()
            && server.buf.is_empty()
            && server.walker.at_boundary()
    }

    /// Moves bytes until something needs the caller's attention.
    pub fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        mut server: Option<&mut ServerConn>,
    ) -> Poll<Event> {
        loop {
            let mut progress = false;
            let draining = match self.ctl.signal(cx.waker()) {
                Signal::Kill => return Poll::Ready(Event::Killed),
                Signal::Drain => true,
                Signal::None => false,
            };
            if self.client.terminated && self.client.walked == 0 {
                return Poll::Ready(Event::ClientGone);
            }

            if let Some(s) = server.as_deref_mut() {
                // client -> server
                if self.client.walked > 0 {
                    match self
                        .client
                        .buf
                        .poll_write_to(cx, &mut s.stream, self.client.walked)
                    {
                        Poll::Ready(Ok(n)) => {
                            self.client.walked -= n;
                            bump(&self.stats.db_send, n as u64);
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerGone(Some(e))),
                        Poll::Pending => {}
                    }
                }
                // server -> client
                if s.walked > 0 {
                    match s.buf.poll_write_to(cx, &mut self.client.stream, s.walked) {
                        Poll::Ready(Ok(n)) => {
                            s.walked -= n;
                            bump(&self.stats.client_send, n as u64);
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientError(e)),
                        Poll::Pending => {}
                    }
                }
                if Self::server_free(self.client, self.tracker, s) {
                    if draining {
                        return Poll::Ready(Event::Shutdown);
                    }
                    if self.release {
                        return Poll::Ready(Event::Released);
                    }
                }
            } else {
                if self.client.walked > 0 {
                    return Poll::Ready(Event::NeedServer);
                }
                if draining {
                    return Poll::Ready(Event::Shutdown);
                }
            }

            // read client
            if !self.client.terminated && self.client.buf.len() < READ_CAP {
                match self.client.poll_read(cx, self.scratch) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Event::ClientGone),
                    Poll::Ready(Ok(n)) => {
                        bump(&self.stats.client_recv, n as u64);
                        if let Err(e) = self.client.walk(self.tracker) {
                            return Poll::Ready(Event::ClientProtocol(e));
                        }
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientError(e)),
                    Poll::Pending => {}
                }
            }

            // read server
            if let Some(s) = server.as_deref_mut() {
                if s.buf.len() < READ_CAP {
                    match s.buf.poll_read_from(cx, &mut s.stream) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Event::ServerGone(None)),
                        Poll::Ready(Ok(n)) => {
                            bump(&self.stats.db_recv, n as u64);
                            if let Err(e) = walk_server(s, self.tracker, self.stats) {
                                return Poll::Ready(Event::ServerProtocol(e));
                            }
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerGone(Some(e))),
                        Poll::Pending => {}
                    }
                }
            }

            if !progress {
                return Poll::Pending;
            }
        }
    }
}
