//! The authenticated node-to-node framing, on plain TCP.
//!
//! On accept the server sends a fresh random 16-byte nonce. Every frame after that is
//! `u32 length (big-endian) | 32-byte tag | body`, where the tag is HMAC-SHA256 with the cluster
//! secret over `nonce | sequence number (u64 BE) | direction byte | body`. The sequence number
//! counts requests on the connection, so a frame cannot be replayed, reordered or moved to another
//! connection, and the client checks the replies the same way. A frame with a bad tag closes the
//! connection before its body is looked at.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

    /// Client side: connect and read the server's nonce.
    pub async fn connect(addr: &str) -> Result<Self, ClusterError> {
        let mut stream = TcpStream::connect(addr).await?;
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

/// A client with a small pool of idle connections per peer address.
pub struct Client {
    secret: Vec<u8>,
    idle: Mutex<HashMap<String, Vec<Session>>>,
}

impl Client {
    /// A client signing with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            secret: secret.to_vec(),
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
            let mut s = Session::connect(addr).await?;
            let reply = s.call(&self.secret, body).await?;
            self.put_idle(addr, s);
            Ok(reply)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClusterError::Timeout)?
    }
}
