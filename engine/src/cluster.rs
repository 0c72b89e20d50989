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

use crate::config::PoolMode;
use crate::shard::Shard;
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
pub async fn forward(
    client: Stream,
    msg: &StartupMessage,
    leftover: &[u8],
    mode: PoolMode,
    peer: Option<SocketAddr>,
    to: LinkTarget<'_>,
) -> Result<(), (Stream, io::Error)> {
    let header = Header {
        kind: KIND_CONNECT,
        mode,
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
    if let Err(e) = splice(&mut client, &mut up).await {
        debug!(error = %e, "proxy link ended");
    }
    let _ = client.shutdown_write().await;
    Ok(())
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
            let _ = tcp.close().await;
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
        KIND_CANCEL => shard.route_cancel(h.pid, h.secret.to_vec()),
        KIND_CONNECT => {
            let peer = SocketAddr::new(h.client_ip, 0);
            crate::accept::serve(shard, Stream::Plain(tcp), h.mode, Some(peer), h.hops).await
        }
        _ => {}
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

    /// Moves bytes from `r` to `w` until one of them is pending; Ready(()) at
    /// end of input (all written and flushed).
    fn pump<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
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
                Poll::Ready(Ok(n)) => self.end = n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Copies bytes both ways until either side ends (one future, two buffers).
pub fn splice<'a>(
    a: &'a mut Stream,
    b: &'a mut TcpStream,
) -> impl Future<Output = io::Result<()>> + 'a {
    let mut ab = Half::new();
    let mut ba = Half::new();
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(r) = ab.pump(cx, a, b) {
            return Poll::Ready(r);
        }
        if let Poll::Ready(r) = ba.pump(cx, b, a) {
            return Poll::Ready(r);
        }
        Poll::Pending
    })
}
