//! Pool ownership across a cluster: the proxy link between nodes.
//!
//! A client whose pool (`tenant/db_user/mode`) another node owns is proxied
//! there: this node connects to the owner's proxy address, the owner sends a
//! random 16-byte nonce, this node answers with a fixed header (kind, pool
//! mode, hop count, client IP, and for a cancel its key) followed by
//! HMAC-SHA256(cluster secret, nonce || header). The owner checks it in
//! constant time and closes the connection without a byte more when it is
//! wrong. After a "connect" header the client's StartupMessage and whatever
//! it sent behind it follow, and both sides splice bytes until either closes:
//! the owner handles the connection like a client that arrived there (TLS
//! was terminated by the first node, the client IP for `allow_list` comes
//! from the header), except that it never proxies it again.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::debug;
use wire::startup::StartupMessage;

use crate::accept::{linger_close, refuse};
use crate::config::{ClientTimeouts, PoolMode};
use crate::error::{EngineError, Refusal};
use crate::pool::PoolKey;
use crate::shard::{ClientCtl, ClientDesc, Shard, Signal};
use crate::stream::Stream;

type HmacSha256 = Hmac<Sha256>;

const NONCE_LEN: usize = 16;
/// kind, mode, hops, client IP (16, v4 mapped), cancel pid (4), cancel secret (4).
const HEADER_LEN: usize = 3 + 16 + 4 + 4;
const MAC_LEN: usize = 32;
/// How long either side of a proxy link waits for the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a proxying node waits for the owner to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const KIND_CONNECT: u8 = 1;
const KIND_CANCEL: u8 = 2;
/// How long a forwarded cancel request waits for the peer to report it
/// processed (the peer's own wait for its database is 5 s).
const CANCEL_WAIT: Duration = Duration::from_secs(6);
/// A client that may log in with a cleartext password (a WebSocket client
/// over TLS or from an address this node trusts).
const KIND_CONNECT_CLEARTEXT: u8 = 3;

/// What a proxy link carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub mode: PoolMode,
    pub hops: u8,
    pub client_ip: IpAddr,
    pub pid: i32,
    pub secret: [u8; 4],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = self.kind;
        h[1] = match self.mode {
            PoolMode::Transaction => 0,
            PoolMode::Session => 1,
        };
        h[2] = self.hops;
        let ip = match self.client_ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        h[3..19].copy_from_slice(&ip.octets());
        h[19..23].copy_from_slice(&self.pid.to_be_bytes());
        h[23..27].copy_from_slice(&self.secret);
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> Option<Header> {
        let mode = match h[1] {
            0 => PoolMode::Transaction,
            1 => PoolMode::Session,
            _ => return None,
        };
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&h[3..19]);
        let ip = Ipv6Addr::from(ip);
        let client_ip = match ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(ip),
        };
        let mut secret = [0u8; 4];
        secret.copy_from_slice(&h[23..27]);
        Some(Header {
            kind: h[0],
            mode,
            hops: h[2],
            client_ip,
            pid: i32::from_be_bytes([h[19], h[20], h[21], h[22]]),
            secret,
        })
    }
}

fn mac(secret: &[u8], nonce: &[u8], header: &[u8]) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    m.update(nonce);
    m.update(header);
    m
}

/// Connects to `addr`, from `source` when that applies: this node's own
/// proxy listener IP when it is a specific address of the same family and
/// scope as `addr` (peers see node-to-node traffic come from the address the
/// node listens on). glommio cannot bind before connecting, so that connect
/// runs on the shard's blocking thread.
async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(src) = source.filter(|s| {
        !s.is_unspecified()
            && s.is_ipv4() == addr.is_ipv4()
            && s.is_loopback() == addr.ip().is_loopback()
    }) else {
        return Ok(TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).await?);
    };
    let fd = glommio::executor()
        .spawn_blocking(move || -> io::Result<std::os::fd::OwnedFd> {
            use socket2::{Domain, Protocol, Socket, Type};
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            sock.bind(&SocketAddr::new(src, 0).into())?;
            sock.connect_timeout(&addr.into(), CONNECT_TIMEOUT)?;
            Ok(sock.into())
        })
        .await?;
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: a connected TCP socket we own; glommio's own connected sockets
    // are blocking fds too (it waits through io_uring).
    Ok(unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) })
}

/// Where a proxy link goes and how it is opened.
#[derive(Debug, Clone, Copy)]
pub struct LinkTarget<'a> {
    /// The other node.
    pub node: u64,
    /// The other node's proxy address.
    pub addr: SocketAddr,
    /// The address to connect from, when it applies (see [`connect`]).
    pub source: Option<IpAddr>,
    /// The cluster secret that authenticates the link.
    pub secret: &'a [u8],
}

/// Opens an authenticated link to `to` and sends `header`.
async fn open(to: LinkTarget<'_>, header: &Header) -> io::Result<TcpStream> {
    let (addr, secret) = (to.addr, to.secret);
    let mut tcp = connect(addr, to.source).await?;
    let _ = tcp.set_nodelay(true);
    let header = header.encode();
    glommio::timer::timeout(HANDSHAKE_TIMEOUT, async {
        let mut nonce = [0u8; NONCE_LEN];
        tcp.read_exact(&mut nonce).await?;
        let tag = mac(secret, &nonce, &header).finalize().into_bytes();
        let mut out = Vec::with_capacity(HEADER_LEN + MAC_LEN);
        out.extend_from_slice(&header);
        out.extend_from_slice(&tag);
        tcp.write_all(&out).await?;
        Ok(())
    })
    .await?;
    Ok(tcp)
}

/// Proxies a client to the owner of its pool: replays its StartupMessage and
/// leftover bytes, then splices until either side closes. Gives the client
/// stream back when the owner cannot be reached (nothing was sent yet).
///
/// The proxied client is registered with this shard like one of its own
/// clients (under its pool key), so that a drain (SIGTERM) waits for it and
/// ends it between transactions with 57P01, as the owner would, and a
/// terminated tenant ends it at once.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    shard: &Rc<Shard>,
    key: &PoolKey,
    client: Stream,
    msg: &StartupMessage,
    leftover: &[u8],
    peer: Option<SocketAddr>,
    to: LinkTarget<'_>,
) -> Result<(), (Stream, io::Error)> {
    let header = Header {
        kind: if client.cleartext_password_ok() {
            KIND_CONNECT_CLEARTEXT
        } else {
            KIND_CONNECT
        },
        mode: key.mode,
        hops: 1,
        client_ip: peer
            .map(|p| p.ip())
            .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        pid: 0,
        secret: [0; 4],
    };
    let mut up = match open(to, &header).await {
        Ok(t) => t,
        Err(e) => return Err((client, e)),
    };
    let mut first = BytesMut::new();
    let params: Vec<(&str, &str)> = msg
        .params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    wire::startup::encode_startup(&params, &mut first);
    first.extend_from_slice(leftover);
    if let Err(e) = up.write_all(&first).await {
        return Err((client, e));
    }
    let mut client = client;
    let _ = client.set_nodelay(true);
    let registered = Registered::new(shard, key, peer, to.node);
    let mut talk = Conversation::default();
    talk.client_sent(leftover);
    match splice(&mut client, &mut up, &registered.ctl, &mut talk).await {
        Ok(Ended::Closed) => {}
        Ok(Ended::Drained) => {
            let _ = up.close().await;
            refuse(&mut client, &EngineError::Refused(Refusal::ShuttingDown)).await;
            return Ok(());
        }
        Ok(Ended::Killed) => {
            let _ = up.close().await;
            refuse(&mut client, &EngineError::Refused(Refusal::Terminated)).await;
            return Ok(());
        }
        Err(e) => debug!(error = %e, "proxy link ended"),
    }
    // The owner closed (its last message, e.g. a 57P01, may be on its way
    // to the client) or the client did: no reset either way.
    drop(registered);
    linger_close(&mut client).await;
    Ok(())
}

/// A proxied client registered with its shard while it lives.
struct Registered {
    shard: Rc<Shard>,
    pid: i32,
    ctl: Rc<ClientCtl>,
}

impl Registered {
    fn new(shard: &Rc<Shard>, key: &PoolKey, peer: Option<SocketAddr>, owner: u64) -> Registered {
        let mut desc = ClientDesc::new(peer, Rc::default());
        desc.proxied_to = Some(owner);
        // No timeouts here: the owner applies the tenant's.
        let (pid, ctl) =
            shard.register_client(Rc::new(key.clone()), ClientTimeouts::default(), desc);
        Registered {
            shard: shard.clone(),
            pid,
            ctl,
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shard.unregister_client(self.pid);
    }
}

/// Sends a cancel request for `pid` to the node at `to`.
pub async fn forward_cancel(to: LinkTarget<'_>, pid: i32, key: [u8; 4]) {
    let header = Header {
        kind: KIND_CANCEL,
        mode: PoolMode::Transaction,
        hops: 1,
        client_ip: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        pid,
        secret: key,
    };
    match open(to, &header).await {
        Ok(mut tcp) => {
            // The peer closes once its database has processed the request.
            let _ = glommio::timer::timeout(CANCEL_WAIT, async {
                let mut b = [0u8; 16];
                while tcp.read(&mut b).await? > 0 {}
                Ok(())
            })
            .await;
        }
        Err(e) => debug!(addr = %to.addr, error = %e, "cannot forward a cancel request"),
    }
}

/// Serves one connection to the proxy listener: authenticate, then a cancel
/// or a client. A peer without the secret gets the nonce and nothing else.
pub async fn accept_peer(shard: Rc<Shard>, mut tcp: TcpStream) {
    let Some(cluster) = shard.config().cluster.clone() else {
        return;
    };
    let _ = tcp.set_nodelay(true);
    // A proxied client may still go to the shard that owns its tenant.
    crate::accept::may_change_shards(&shard, &mut tcp);
    let nonce: [u8; NONCE_LEN] = rand::random();
    let got = glommio::timer::timeout(HANDSHAKE_TIMEOUT, async {
        tcp.write_all(&nonce).await?;
        let mut buf = [0u8; HEADER_LEN + MAC_LEN];
        tcp.read_exact(&mut buf).await?;
        Ok(buf)
    })
    .await;
    let Ok(buf) = got else {
        return;
    };
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&buf[..HEADER_LEN]);
    // verify_slice compares in constant time.
    if mac(&cluster.secret, &nonce, &header)
        .verify_slice(&buf[HEADER_LEN..])
        .is_err()
    {
        crate::metrics::bump(&shard.refused, 1);
        debug!(peer = ?tcp.peer_addr().ok(), "proxy link with a wrong secret");
        return;
    }
    let Some(h) = Header::decode(&header) else {
        return;
    };
    match h.kind {
        KIND_CANCEL => {
            let done = crate::accept::dup_fd(tcp.as_raw_fd());
            shard.route_cancel(h.pid, h.secret.to_vec(), done)
        }
        KIND_CONNECT | KIND_CONNECT_CLEARTEXT => {
            let peer = SocketAddr::new(h.client_ip, 0);
            let cleartext = h.kind == KIND_CONNECT_CLEARTEXT;
            let stream = Stream::Plain(tcp);
            crate::accept::serve(shard, stream, h.mode, Some(peer), h.hops, cleartext).await
        }
        _ => {}
    }
}

/// Follows the frame boundaries of one direction of a proxied connection
/// as its bytes pass, without holding any of them: the type of each frame,
/// and the status byte of a ReadyForQuery. Lengths are not checked (the
/// owner does that); a garbled stream only makes the drain wait longer.
#[derive(Debug, Default)]
struct Frames {
    head: [u8; 5],
    /// Header bytes collected so far.
    have: usize,
    /// Body bytes of the current frame still to come.
    left: usize,
    tag: u8,
    /// The next body byte is a ReadyForQuery status.
    status_next: bool,
}

impl Frames {
    /// Walks `data`; calls `f(tag, status)` once per frame: at its header,
    /// or for a ReadyForQuery ('Z') at its status byte.
    fn feed(&mut self, mut data: &[u8], mut f: impl FnMut(u8, u8)) {
        while let Some(&first) = data.first() {
            if self.left > 0 {
                if self.status_next {
                    self.status_next = false;
                    f(self.tag, first);
                }
                let n = self.left.min(data.len());
                self.left -= n;
                data = &data[n..];
                continue;
            }
            let n = (self.head.len() - self.have).min(data.len());
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == self.head.len() {
                self.have = 0;
                self.tag = self.head[0];
                let len =
                    u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
                self.left = (len as usize).saturating_sub(4);
                if self.tag == b'Z' && self.left > 0 {
                    self.status_next = true;
                } else {
                    f(self.tag, 0);
                }
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }
}

/// Where a proxied client stands, from the frames passing both ways: it is
/// between transactions when every Query, Sync and FunctionCall it sent has
/// had its ReadyForQuery, the last one said idle (`I`), and both directions
/// are at a frame boundary.
#[derive(Debug, Default)]
struct Conversation {
    up: Frames,
    down: Frames,
    /// Query, Sync and FunctionCall frames the client sent.
    asked: u64,
    /// ReadyForQuery frames after the one that ended the startup.
    answered: u64,
    /// The startup's ReadyForQuery arrived.
    ready: bool,
    status: u8,
}

impl Conversation {
    fn client_sent(&mut self, data: &[u8]) {
        let asked = &mut self.asked;
        self.up.feed(data, |tag, _| {
            if matches!(tag, b'Q' | b'S' | b'F') {
                *asked += 1;
            }
        });
    }

    fn owner_sent(&mut self, data: &[u8]) {
        let (ready, answered, status) = (&mut self.ready, &mut self.answered, &mut self.status);
        self.down.feed(data, |tag, st| {
            if tag == b'Z' {
                if *ready {
                    *answered += 1;
                }
                *ready = true;
                *status = st;
            }
        });
    }

    fn between_transactions(&self) -> bool {
        self.ready
            && self.status == b'I'
            && self.answered >= self.asked
            && self.up.at_boundary()
            && self.down.at_boundary()
    }
}

/// One direction of a splice: a buffer and how much of it is still to write.
struct Half {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    flush: bool,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: vec![0u8; 16 * 1024].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            flush: false,
        }
    }

    /// Everything read was written and flushed.
    fn empty(&self) -> bool {
        self.start == self.end && !self.flush
    }

    /// Moves bytes from `r` to `w` until one of them is pending; Ready(()) at
    /// end of input (all written and flushed). `seen` gets each read.
    fn pump<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        mut seen: impl FnMut(&[u8]),
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            while self.start < self.end {
                match Pin::new(&mut *w).poll_write(cx, &self.buf[self.start..self.end]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.start += n;
                        self.flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.flush {
                match Pin::new(&mut *w).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.flush = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            self.start = 0;
            self.end = 0;
            match Pin::new(&mut *r).poll_read(cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => {
                    self.end = n;
                    seen(&self.buf[..n]);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// How a splice ended without an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Either side closed.
    Closed,
    /// The shard drains and the client is between transactions.
    Drained,
    /// The client's tenant was terminated or removed.
    Killed,
}

/// Copies bytes both ways until either side ends (one future, two buffers),
/// or until the shard's signal ends it: a kill at once, a drain once the
/// client is between transactions (no byte of it is read after that).
fn splice<'a>(
    a: &'a mut Stream,
    b: &'a mut TcpStream,
    ctl: &'a ClientCtl,
    talk: &'a mut Conversation,
) -> impl Future<Output = io::Result<Ended>> + 'a {
    let mut ab = Half::new();
    let mut ba = Half::new();
    std::future::poll_fn(move |cx| {
        let drained = |talk: &Conversation, ab: &Half, ba: &Half| {
            talk.between_transactions() && ab.empty() && ba.empty()
        };
        let draining = match ctl.signal(cx.waker()) {
            Signal::Kill => return Poll::Ready(Ok(Ended::Killed)),
            Signal::Drain => true,
            _ => false,
        };
        if draining && drained(talk, &ab, &ba) {
            return Poll::Ready(Ok(Ended::Drained));
        }
        if let Poll::Ready(r) = ab.pump(cx, a, b, |d| talk.client_sent(d)) {
            return Poll::Ready(r.map(|()| Ended::Closed));
        }
        if let Poll::Ready(r) = ba.pump(cx, b, a, |d| talk.owner_sent(d)) {
            return Poll::Ready(r.map(|()| Ended::Closed));
        }
        // Both directions wait: the client may just have become idle.
        if draining && drained(talk, &ab, &ba) {
            return Poll::Ready(Ok(Ended::Drained));
        }
        Poll::Pending
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Feeds `data` one byte at a time, as the worst split of reads.
    fn bytewise(data: &[u8], mut f: impl FnMut(&[u8])) {
        for b in data.chunks(1) {
            f(b);
        }
    }

    #[test]
    fn conversation_follows_transactions_across_reads() {
        let mut t = Conversation::default();
        assert!(!t.between_transactions(), "before the startup ended");
        // Authentication and the startup's ReadyForQuery.
        t.client_sent(&frame(b'p', b"SCRAM..."));
        t.owner_sent(&[frame(b'R', &[0, 0, 0, 0]), frame(b'Z', b"I")].concat());
        assert!(t.between_transactions());
        // BEGIN sent: a request in flight.
        bytewise(&frame(b'Q', b"BEGIN\0"), |d| t.client_sent(d));
        assert!(!t.between_transactions());
        t.owner_sent(&[frame(b'C', b"BEGIN\0"), frame(b'Z', b"T")].concat());
        assert!(!t.between_transactions(), "inside a transaction");
        // Extended protocol, pipelined: two Syncs, answered one by one.
        let mut ext = frame(b'P', b"\0SELECT 1\0\0\0");
        ext.extend(frame(b'B', &[0; 6]));
        ext.extend(frame(b'E', &[0; 5]));
        ext.extend(frame(b'S', b""));
        ext.extend(frame(b'Q', b"COMMIT\0"));
        t.client_sent(&ext);
        t.owner_sent(&frame(b'Z', b"T"));
        assert!(!t.between_transactions());
        // The COMMIT's answer arrives split inside the header.
        let end = [frame(b'C', b"COMMIT\0"), frame(b'Z', b"I")].concat();
        let (x, y) = end.split_at(end.len() - 3);
        t.owner_sent(x);
        assert!(!t.between_transactions(), "mid-frame");
        t.owner_sent(y);
        assert!(t.between_transactions());
        // Half a frame from the client is not a boundary.
        let q = frame(b'Q', b"SELECT 1\0");
        t.client_sent(&q[..3]);
        assert!(!t.between_transactions());
        t.client_sent(&q[3..]);
        t.owner_sent(&[frame(b'T', &[0, 0]), frame(b'Z', b"I")].concat());
        assert!(t.between_transactions());
        // A failed transaction ('E') is not idle either.
        t.client_sent(&frame(b'Q', b"x\0"));
        t.owner_sent(&[frame(b'E', b"S\0"), frame(b'Z', b"E")].concat());
        assert!(!t.between_transactions());
    }
}
