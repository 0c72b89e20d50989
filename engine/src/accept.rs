//! The first moments of a connection, on whichever shard accepted it: answer
//! SSLRequest / GSSENCRequest, route a CancelRequest, read the
//! StartupMessage, find the tenant and hand the connection to its shard.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::debug;
use wire::startup::{decode_startup, StartupMessage, StartupPacket};
use wire::WireError;

use crate::config::PoolMode;
use crate::error::{EngineError, Refusal};
use crate::shard::{Handoff, Shard, ShardMsg};
use crate::stream::{Stream, TlsStream};

/// Who the client says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub db_user: String,
    pub tenant: String,
}

/// `user.tenant` (split at the last '.'), else `options=reference=tenant`.
pub fn identify(msg: &StartupMessage) -> Result<Identity, Refusal> {
    let user = msg.user().unwrap_or_default();
    if let Some((db_user, tenant)) = user.rsplit_once('.') {
        if !db_user.is_empty() && !tenant.is_empty() {
            return Ok(Identity {
                db_user: db_user.to_string(),
                tenant: tenant.to_string(),
            });
        }
    }
    if let Some(tenant) = msg.option_value("reference") {
        if !tenant.is_empty() {
            return Ok(Identity {
                db_user: user.to_string(),
                tenant,
            });
        }
    }
    Err(Refusal::NoTenant)
}

enum First {
    Startup(StartupMessage, Vec<u8>),
    Cancel,
    Closed,
}

/// Reads up to the StartupMessage: answers SSLRequest (with a TLS handshake
/// when TLS is configured, after which `stream` is the TLS stream) and
/// GSSENCRequest, routes a CancelRequest.
async fn read_first(
    shard: &Shard,
    stream: &mut Option<Stream>,
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> Result<First, EngineError> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        let Some(s) = stream.as_mut() else {
            return Ok(First::Closed);
        };
        match decode_startup(&mut buf).map_err(EngineError::ClientProtocol)? {
            Some(StartupPacket::SslRequest) if tls.is_some() && !s.is_tls() => {
                if !buf.is_empty() {
                    // Bytes sent behind SSLRequest before the handshake
                    // would be taken as if they came encrypted (CVE-2021-23222).
                    return Err(EngineError::ClientProtocol(WireError::Protocol(
                        "data after SSLRequest before the TLS handshake".into(),
                    )));
                }
                let Some(Stream::Plain(mut tcp)) = stream.take() else {
                    return Ok(First::Closed);
                };
                tcp.write_all(b"S").await.map_err(EngineError::ClientIo)?;
                let cfg = tls.cloned().ok_or(EngineError::Refused(Refusal::Busy))?;
                let conn = rustls::ServerConnection::new(cfg)
                    .map_err(|e| EngineError::ClientIo(std::io::Error::other(e)))?;
                let mut t = TlsStream::new(tcp, conn);
                t.handshake().await.map_err(EngineError::ClientIo)?;
                *stream = Some(Stream::Tls(Box::new(t)));
            }
            Some(StartupPacket::SslRequest) | Some(StartupPacket::GssEncRequest) => {
                // No (more) encryption: the client may go on as it is.
                s.write_all(b"N").await.map_err(EngineError::ClientIo)?;
            }
            Some(StartupPacket::Cancel(req)) => {
                shard.route_cancel(req.process_id, req.secret.to_vec());
                return Ok(First::Cancel);
            }
            Some(StartupPacket::Startup(msg)) => return Ok(First::Startup(msg, buf.to_vec())),
            None => {
                let mut chunk = [0u8; 1024];
                let n = s.read(&mut chunk).await.map_err(EngineError::ClientIo)?;
                if n == 0 {
                    return Ok(First::Closed);
                }
                buf.put_slice(&chunk[..n]);
            }
        }
    }
}

/// Sends a FATAL error to a client and closes (best effort). The close
/// lingers: our side is shut for writing and the client's last bytes are read
/// and dropped, so that closing with unread input does not reset the
/// connection and destroy the error before the client reads it.
pub fn refuse<'a>(
    stream: &'a mut Stream,
    err: &'a EngineError,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>> {
    // Boxed: a cold path that must not grow every client task's state.
    Box::pin(async move {
        let mut out = BytesMut::new();
        err.encode("FATAL", &mut out);
        if stream.write_all(&out).await.is_err() {
            return;
        }
        let _ = stream.shutdown_write().await;
        let _ = glommio::timer::timeout(LINGER, async {
            let mut sink = [0u8; 512];
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
            Ok(())
        })
        .await;
    })
}

/// How long a refused client may take to read its error and close.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// A client-supplied string, shortened for a log line.
pub fn for_log(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

pub async fn handle(shard: Rc<Shard>, tcp: TcpStream, mode: PoolMode) {
    let peer = tcp.peer_addr().ok();
    serve(shard, Stream::Plain(tcp), mode, peer, 0).await
}

/// A connection from its first byte: a client (`hops` 0), or one proxied
/// here by the node it connected to (`hops` 1: TLS was terminated there,
/// `peer` is the client's address, and it is never proxied again).
pub async fn serve(
    shard: Rc<Shard>,
    stream: Stream,
    mode: PoolMode,
    peer: Option<SocketAddr>,
    hops: u8,
) {
    let config = shard.config();
    let timeout = config.proxy.client_startup_timeout;
    let tls = if hops == 0 {
        config.proxy.tls.as_ref()
    } else {
        None
    };
    let mut stream = Some(stream);
    let first = glommio::timer::timeout(timeout, async {
        Ok(Box::pin(read_first(&shard, &mut stream, tls)).await)
    })
    .await;
    let Some(mut stream) = stream else {
        return;
    };
    let (msg, leftover) = match first {
        Ok(Ok(First::Startup(msg, leftover))) => (msg, leftover),
        Ok(Ok(First::Cancel | First::Closed)) => return,
        Ok(Err(e)) => {
            crate::metrics::bump(&shard.refused, 1);
            debug!(?peer, error = %e, "bad startup");
            if matches!(e, EngineError::ClientProtocol(_)) {
                refuse(&mut stream, &e).await;
            }
            return;
        }
        Err(_) => {
            debug!(?peer, "startup timed out");
            return;
        }
    };
    if let Some(r) = msg.get("replication") {
        if !matches!(r, "false" | "off" | "0" | "no") {
            refuse(&mut stream, &EngineError::Refused(Refusal::Replication)).await;
            return;
        }
    }
    // `user.tenant` or `options=reference=` first; over TLS, else the SNI host.
    let ident = match identify(&msg) {
        Ok(i) => Ok(i),
        Err(r) => match stream.sni().and_then(|host| config.tenant_by_sni(host)) {
            Some(tenant) => Ok(Identity {
                db_user: msg.user().unwrap_or_default().to_string(),
                tenant: tenant.to_string(),
            }),
            None => Err(r),
        },
    };
    let ident = match ident {
        Ok(i) => i,
        Err(r) => {
            crate::metrics::bump(&shard.refused, 1);
            refuse(&mut stream, &EngineError::Refused(r)).await;
            return;
        }
    };
    let Some(tenant) = config.tenant(&ident.tenant) else {
        crate::metrics::bump(&shard.refused, 1);
        refuse(
            &mut stream,
            &EngineError::Refused(Refusal::UnknownTenant(ident.tenant)),
        )
        .await;
        return;
    };
    if !tenant.allows(peer.map(|p| p.ip())) {
        crate::metrics::bump(&shard.refused, 1);
        let addr = peer.map(|p| p.ip().to_string()).unwrap_or_default();
        refuse(
            &mut stream,
            &EngineError::Refused(Refusal::AddressNotAllowed(addr)),
        )
        .await;
        return;
    }
    if tenant.enforce_ssl && !stream.is_tls() && hops == 0 {
        crate::metrics::bump(&shard.refused, 1);
        refuse(&mut stream, &EngineError::Refused(Refusal::SslRequired)).await;
        return;
    }
    if let Some(cluster) = config.cluster.clone() {
        let key = crate::config::pool_key(&ident.tenant, &ident.db_user, mode);
        let owner = match cluster.owners.get(&key) {
            Some(o) => Some(*o),
            None => glommio::timer::timeout(timeout, async { Ok(shard.claim(key.clone()).await) })
                .await
                .ok()
                .flatten(),
        };
        let refusal = match owner {
            None => Some("cannot claim the pool (no cluster leader?), try again".to_string()),
            Some(o) if o == cluster.self_node => (!cluster.hooks.lease_valid())
                .then(|| "this node lost its lease, connect to another node".to_string()),
            Some(o) if hops > 0 => Some(format!("the pool is owned by node {o}, try again")),
            Some(o) => match cluster.proxies.get(&o) {
                None => Some(format!("no proxy address of node {o}")),
                Some(addr) => {
                    // A tenant found by SNI only: the owner sees no SNI, so
                    // it is named in the user.
                    let msg = if identify(&msg).is_err() {
                        let mut m = msg.clone();
                        m.params.retain(|(k, _)| k != "user");
                        m.params
                            .push(("user".into(), format!("{}.{}", ident.db_user, ident.tenant)));
                        m
                    } else {
                        msg
                    };
                    // Cut (the client closed) if the claim moves away from `o`.
                    let link = shard.register_link(key, o);
                    let forwarded = crate::cluster::forward(
                        stream,
                        &msg,
                        &leftover,
                        mode,
                        peer,
                        crate::cluster::LinkTarget {
                            addr: *addr,
                            source: config.proxy.proxy_addr.map(|a| a.ip()),
                            secret: &cluster.secret,
                        },
                    );
                    let sent = futures_lite::future::or(async { Some(forwarded.await) }, async {
                        link.ctl.cut().await;
                        None
                    })
                    .await;
                    drop(link);
                    let Some(sent) = sent else {
                        debug!(node = o, "the pool moved: proxied client closed");
                        return;
                    };
                    if let Err((mut stream, e)) = sent {
                        debug!(node = o, error = %e, "pool owner unreachable");
                        let why = format!("the pool owner (node {o}) is unreachable, try again");
                        refuse(&mut stream, &EngineError::Refused(Refusal::Cluster(why))).await;
                    }
                    return;
                }
            },
        };
        if let Some(why) = refusal {
            crate::metrics::bump(&shard.refused, 1);
            refuse(&mut stream, &EngineError::Refused(Refusal::Cluster(why))).await;
            return;
        }
    }
    let owner = shard.owner_of(&ident.tenant);
    if owner == shard.id {
        Box::pin(crate::client::run(
            shard, stream, msg, ident, leftover, mode, peer,
        ))
        .await;
        return;
    }
    // Hand the socket to its owner: a duplicate of the fd travels (with the
    // TLS session, which goes on from the same state), this shard's stream
    // is dropped.
    let (tcp, tls) = match stream {
        Stream::Plain(tcp) => (tcp, None),
        Stream::Tls(mut t) => {
            if t.flush().await.is_err() {
                return;
            }
            let (tcp, conn) = t.into_parts();
            (tcp, Some(Box::new(conn)))
        }
    };
    // SAFETY: dup of a valid open socket; the new fd is owned by OwnedFd.
    let dup = unsafe { libc::dup(tcp.as_raw_fd()) };
    if dup < 0 {
        let mut stream = Stream::Plain(tcp);
        refuse(&mut stream, &EngineError::Refused(Refusal::Busy)).await;
        return;
    }
    let fd = unsafe { OwnedFd::from_raw_fd(dup) };
    let handoff = Handoff {
        fd,
        tls,
        startup: msg,
        ident,
        leftover,
        mode,
        peer,
    };
    match shard.peers[owner].send(ShardMsg::Handoff(Box::new(handoff))) {
        Ok(()) => {
            crate::metrics::bump(&shard.handoffs_out, 1);
            drop(tcp)
        }
        Err(msg) => {
            // The owner's inbox is full: the message comes back with the
            // TLS session, so the client still gets its error.
            let mut stream = match msg {
                ShardMsg::Handoff(h) => match h.tls {
                    Some(conn) => Stream::Tls(Box::new(TlsStream::new(tcp, *conn))),
                    None => Stream::Plain(tcp),
                },
                _ => Stream::Plain(tcp),
            };
            refuse(&mut stream, &EngineError::Refused(Refusal::Busy)).await;
        }
    }
}
