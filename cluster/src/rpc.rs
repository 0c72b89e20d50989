//! The authenticated node-to-node framing, on plain TCP.
//!
//! On accept the server sends a fresh random 16-byte nonce. Every frame after that is
//! `u32 length (big-endian) | 32-byte tag | body`, where the tag is HMAC-SHA256 with the cluster
//! secret over `nonce | sequence number (u64 BE) | direction byte | body`. The sequence number
//! counts requests on the connection, so a frame cannot be replayed, reordered or moved to another
//! connection, and the client checks the replies the same way. A frame with a bad tag closes the
//! connection before its body is looked at.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::error::ClusterError;

/// The largest frame accepted (snapshot chunks are far smaller).
pub const MAX_FRAME: usize = 64 << 20;
const TAG_LEN: usize = 32;
const NONCE_LEN: usize = 16;
const REQUEST: u8 = b'q';
const REPLY: u8 = b'r';

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], nonce: &[u8; NONCE_LEN], seq: u64, dir: u8, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    m.update(nonce);
    m.update(&seq.to_be_bytes());
    m.update(&[dir]);
    m.update(body);
    m
}

/// One authenticated connection (either side).
pub struct Session {
    stream: TcpStream,
    nonce: [u8; NONCE_LEN],
    seq: u64,
}

impl Session {
    /// Server side: send a fresh nonce.
    pub async fn accept(mut stream: TcpStream) -> Result<Self, ClusterError> {
        stream.set_nodelay(true)?;
        let nonce: [u8; NONCE_LEN] = rand::random();
        stream.write_all(&nonce).await?;
        Ok(Self {
            stream,
            nonce,
            seq: 0,
        })
    }

    /// Client side: connect (from `source` when it applies, see [`source_for`]) and read the
    /// server's nonce.
    pub async fn connect(addr: &str, source: Option<IpAddr>) -> Result<Self, ClusterError> {
        let mut stream = connect_from(addr, source).await?;
        stream.set_nodelay(true)?;
        let mut nonce = [0u8; NONCE_LEN];
        stream.read_exact(&mut nonce).await?;
        Ok(Self {
            stream,
            nonce,
            seq: 0,
        })
    }

    async fn write_frame(
        &mut self,
        secret: &[u8],
        dir: u8,
        body: &[u8],
    ) -> Result<(), ClusterError> {
        let len = TAG_LEN + body.len();
        if len > MAX_FRAME {
            return Err(ClusterError::FrameTooLarge(len));
        }
        let tag = mac(secret, &self.nonce, self.seq, dir, body)
            .finalize()
            .into_bytes();
        let mut frame = Vec::with_capacity(4 + len);
        frame.extend_from_slice(&(len as u32).to_be_bytes());
        frame.extend_from_slice(&tag);
        frame.extend_from_slice(body);
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// Read one frame; `Ok(None)` on a clean end of stream before a frame started.
    async fn read_frame(
        &mut self,
        secret: &[u8],
        dir: u8,
    ) -> Result<Option<Vec<u8>>, ClusterError> {
        let mut len = [0u8; 4];
        match self.stream.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if !(TAG_LEN..=MAX_FRAME).contains(&len) {
            return Err(ClusterError::FrameTooLarge(len));
        }
        let mut tag = [0u8; TAG_LEN];
        self.stream.read_exact(&mut tag).await?;
        // Grow with the data actually received rather than trusting the announced length.
        let mut body = Vec::new();
        (&mut self.stream)
            .take((len - TAG_LEN) as u64)
            .read_to_end(&mut body)
            .await?;
        if body.len() != len - TAG_LEN {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        mac(secret, &self.nonce, self.seq, dir, &body)
            .verify_slice(&tag)
            .map_err(|_| ClusterError::Unauthorized)?;
        Ok(Some(body))
    }

    /// Server side: the next request, `None` when the client is done.
    pub async fn read_request(&mut self, secret: &[u8]) -> Result<Option<Vec<u8>>, ClusterError> {
        self.read_frame(secret, REQUEST).await
    }

    /// Server side: answer the request just read.
    pub async fn write_reply(&mut self, secret: &[u8], body: &[u8]) -> Result<(), ClusterError> {
        self.write_frame(secret, REPLY, body).await?;
        self.seq += 1;
        Ok(())
    }

    /// Client side: send a request and read its reply.
    pub async fn call(&mut self, secret: &[u8], body: &[u8]) -> Result<Vec<u8>, ClusterError> {
        self.write_frame(secret, REQUEST, body).await?;
        let reply = self
            .read_frame(secret, REPLY)
            .await?
            // The server closes without a reply when it refuses our tag.
            .ok_or(ClusterError::Unauthorized)?;
        self.seq += 1;
        Ok(reply)
    }
}

/// The source address an outbound node-to-node connection to `dest` binds: this node's own
/// listen IP when it is a specific address of the same family and the same scope (loopback or
/// not) as `dest`, so that peers (and firewalls) see node-to-node traffic come from the address
/// the node listens on; `None` (the kernel chooses) otherwise, e.g. for a `0.0.0.0` listener.
pub fn source_for(own: Option<IpAddr>, dest: IpAddr) -> Option<IpAddr> {
    let own = own?;
    (!own.is_unspecified()
        && own.is_ipv4() == dest.is_ipv4()
        && own.is_loopback() == dest.is_loopback())
    .then_some(own)
}

/// Connect to `addr` (host:port), from `source` (see [`source_for`]) when it applies.
async fn connect_from(addr: &str, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let mut last = None;
    for dest in tokio::net::lookup_host(addr).await? {
        let attempt = match source_for(source, dest.ip()) {
            Some(src) => {
                let socket = if dest.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                socket.bind(SocketAddr::new(src, 0))?;
                socket.connect(dest).await
            }
            None => TcpStream::connect(dest).await,
        };
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{addr}: no address"),
        )
    }))
}

/// A client with a small pool of idle connections per peer address.
pub struct Client {
    secret: Vec<u8>,
    /// The IP outbound connections bind to, when it applies (see [`source_for`]).
    source: Option<IpAddr>,
    idle: Mutex<HashMap<String, Vec<Session>>>,
}

impl Client {
    /// A client signing with `secret`, connecting from `source` where it applies.
    pub fn new(secret: &[u8], source: Option<IpAddr>) -> Self {
        Self {
            secret: secret.to_vec(),
            source,
            idle: Mutex::new(HashMap::new()),
        }
    }

    fn take_idle(&self, addr: &str) -> Option<Session> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.get_mut(addr).and_then(Vec::pop)
    }

    fn put_idle(&self, addr: &str, s: Session) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let v = idle.entry(addr.to_string()).or_default();
        if v.len() < 8 {
            v.push(s);
        }
    }

    /// Send `body` to `addr` and return the reply body, within `timeout`.
    pub async fn call(
        &self,
        addr: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, ClusterError> {
        let fut = async {
            // An idle connection may have been closed by the peer meanwhile: one fresh retry.
            if let Some(mut s) = self.take_idle(addr) {
                if let Ok(reply) = s.call(&self.secret, body).await {
                    self.put_idle(addr, s);
                    return Ok(reply);
                }
            }
            let mut s = Session::connect(addr, self.source).await?;
            let reply = s.call(&self.secret, body).await?;
            self.put_idle(addr, s);
            Ok(reply)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClusterError::Timeout)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_connections_bind_only_a_specific_matching_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let own = Some(ip("10.0.0.1"));
        assert_eq!(source_for(own, ip("10.0.0.2")), own);
        assert_eq!(source_for(Some(ip("0.0.0.0")), ip("10.0.0.2")), None);
        assert_eq!(source_for(None, ip("10.0.0.2")), None);
        // Another family, or loopback to a routed address and back: the kernel chooses.
        assert_eq!(source_for(own, ip("fd00::2")), None);
        assert_eq!(source_for(Some(ip("127.0.0.11")), ip("10.0.0.2")), None);
        assert_eq!(source_for(own, ip("127.0.0.1")), None);
        assert_eq!(
            source_for(Some(ip("127.0.0.11")), ip("127.0.0.1")),
            Some(ip("127.0.0.11"))
        );
    }

    #[tokio::test]
    async fn a_session_connects_from_the_source_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accept = tokio::spawn(async move {
            let (s, peer) = listener.accept().await.unwrap();
            let _session = Session::accept(s).await.unwrap();
            peer
        });
        let _client = Session::connect(&addr, Some("127.0.0.3".parse().unwrap()))
            .await
            .unwrap();
        let peer = accept.await.unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.3");
    }
}
