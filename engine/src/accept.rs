//! The first moments of a connection, on whichever shard accepted it: answer
//! SSLRequest / GSSENCRequest, route a CancelRequest, read the
//! StartupMessage, find the tenant and hand the connection to its shard.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::debug;
use wire::startup::{decode_startup, StartupMessage, StartupPacket};
use wire::WireError;

use crate::client::Admitted;
use crate::config::PoolMode;
use crate::error::{EngineError, Refusal};
use crate::pool::PoolKey;
use crate::shard::{Handoff, Shard, ShardMsg};
use crate::stream::Stream;
use crate::tls::TlsSession;

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

/// A second descriptor of an open socket, which keeps the connection open
/// after the first one closes.
pub(crate) fn dup_fd(fd: std::os::fd::RawFd) -> Option<OwnedFd> {
    // SAFETY: dup of a descriptor the caller holds open; the new one is
    // owned by the OwnedFd.
    let dup = unsafe { libc::dup(fd) };
    (dup >= 0).then(|| unsafe { OwnedFd::from_raw_fd(dup) })
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
            // Inside a WebSocket there is no TLS to start: wss is TLS already.
            Some(StartupPacket::SslRequest) if tls.is_some() && matches!(s, Stream::Plain(_)) => {
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
                let conn = TlsSession::server(cfg)
                    .map_err(|e| EngineError::ClientIo(std::io::Error::other(e)))?;
                let tls = Stream::tls_handshake(tcp, conn)
                    .await
                    .map_err(EngineError::ClientIo)?;
                *stream = Some(tls);
            }
            Some(StartupPacket::SslRequest) | Some(StartupPacket::GssEncRequest) => {
                // No (more) encryption: the client may go on as it is.
                s.write_all(b"N").await.map_err(EngineError::ClientIo)?;
            }
            Some(StartupPacket::Cancel(req)) => {
                // The requester's socket stays open until the database has
                // processed the request, as a server's does: a client that
                // waits for the close (libpq does) cannot have its next
                // query hit by its own late cancel.
                let done = match s {
                    Stream::Ws(_) => None,
                    other => dup_fd(other.as_raw_fd()),
                };
                shard.route_cancel(req.process_id, req.secret.to_vec(), done);
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
        linger_close(stream).await;
    })
}

/// Closes a client connection gently: shut for writing, then read and drop
/// what the client still sends until it closes (at most [`LINGER`]), so
/// that the last bytes it was sent are not destroyed by a reset.
pub fn linger_close(
    stream: &mut Stream,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
    Box::pin(async move {
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

pub async fn handle(shard: Rc<Shard>, mut tcp: TcpStream, mode: PoolMode) {
    let peer = tcp.peer_addr().ok();
    may_change_shards(&shard, &mut tcp);
    serve(shard, Stream::Plain(tcp), mode, peer, 0, false).await
}

/// A socket read here before it may go to the shard that owns its tenant:
/// one receive per read until then, so that no receive stays armed that
/// the hand-over would first have to cancel (`serve_local` and the proxy
/// path of `route` turn the multishot receive back on for a client that
/// stays).
pub(crate) fn may_change_shards(shard: &Shard, tcp: &mut TcpStream) {
    if shard.peers.len() > 1 {
        tcp.set_multishot_recv(false);
    }
}

/// A connection from its first byte: a client (`hops` 0), or one proxied
/// here by the node it connected to (`hops` 1: TLS was terminated there,
/// `peer` is the client's address, and it is never proxied again).
/// `cleartext`: that node let the client log in with a cleartext password
/// (a WebSocket client over TLS or from a trusted address).
pub async fn serve(
    shard: Rc<Shard>,
    stream: Stream,
    mode: PoolMode,
    peer: Option<SocketAddr>,
    hops: u8,
    cleartext: bool,
) {
    // The first moments (TLS, startup, routing, proxying, handoff) run in
    // a boxed future; an admitted client's session then gets a task of its
    // own and this one ends: what an idle client keeps is its session's state.
    let admitted = Box::pin(admit(&shard, stream, mode, peer, hops, cleartext)).await;
    if let Some(client) = admitted {
        crate::client::spawn(&shard, client);
    }
}

/// Reads the first message and routes the connection: refused, proxied to
/// the pool's owner node, handed to the tenant's shard, or admitted here.
async fn admit(
    shard: &Rc<Shard>,
    stream: Stream,
    mode: PoolMode,
    peer: Option<SocketAddr>,
    hops: u8,
    cleartext: bool,
) -> Option<Box<Admitted>> {
    let cleartext = cleartext || stream.cleartext_password_ok();
    let config = shard.config();
    let timeout = config.proxy.client_startup_timeout;
    let tls = if hops == 0 {
        config.proxy.tls.as_ref()
    } else {
        None
    };
    let mut stream = Some(stream);
    let first = glommio::timer::timeout(timeout, async {
        Ok(Box::pin(read_first(shard, &mut stream, tls)).await)
    })
    .await;
    let mut stream = stream?;
    let (msg, leftover) = match first {
        Ok(Ok(First::Startup(msg, leftover))) => (msg, leftover),
        Ok(Ok(First::Cancel | First::Closed)) => return None,
        Ok(Err(e)) => {
            crate::metrics::bump(&shard.refused, 1);
            debug!(?peer, error = %e, "bad startup");
            if matches!(e, EngineError::ClientProtocol(_)) {
                refuse(&mut stream, &e).await;
            }
            return None;
        }
        Err(_) => {
            debug!(?peer, "startup timed out");
            return None;
        }
    };
    if let Some(r) = msg.get("replication") {
        if !matches!(r, "false" | "off" | "0" | "no") {
            refuse(&mut stream, &EngineError::Refused(Refusal::Replication)).await;
            return None;
        }
    }
    let mut config = config;
    if config.cluster_pending {
        // The node has just started: its cluster view (who owns which pool)
        // follows in the next snapshot, within milliseconds.
        let waited = glommio::timer::timeout(timeout, async {
            while shard.config().cluster_pending {
                glommio::timer::sleep(OWNER_POLL).await;
            }
            Ok(())
        })
        .await;
        if waited.is_err() {
            let why = "the node is starting, try again".to_string();
            refuse(&mut stream, &EngineError::Refused(Refusal::Cluster(why))).await;
            return None;
        }
        config = shard.config();
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
            return None;
        }
    };
    if ident.tenant == crate::console::TENANT && hops == 0 {
        if let Some(hooks) = config.console.clone() {
            crate::console::serve(shard, hooks, stream, msg, leftover, peer).await;
            return None;
        }
    }
    let Some(tenant) = config.tenant(&ident.tenant) else {
        crate::metrics::bump(&shard.refused, 1);
        refuse(
            &mut stream,
            &EngineError::Refused(Refusal::UnknownTenant(ident.tenant)),
        )
        .await;
        return None;
    };
    if !tenant.allows(peer.map(|p| p.ip())) {
        crate::metrics::bump(&shard.refused, 1);
        let addr = peer.map(|p| p.ip().to_string()).unwrap_or_default();
        refuse(
            &mut stream,
            &EngineError::Refused(Refusal::AddressNotAllowed(addr)),
        )
        .await;
        return None;
    }
    if tenant.enforce_ssl && !stream.is_tls() && hops == 0 {
        crate::metrics::bump(&shard.refused, 1);
        refuse(&mut stream, &EngineError::Refused(Refusal::SslRequired)).await;
        return None;
    }
    if config.cluster.is_some() {
        let key = PoolKey::primary(&ident.tenant, &ident.db_user, mode);
        // Unreachable owners are retried as long as a client may wait for a
        // server connection (and never past the startup timeout).
        let checkout = tenant
            .users
            .get(&ident.db_user)
            .map(|u| u.checkout_timeout)
            .unwrap_or(tenant.default_checkout_timeout);
        let retry_until = Instant::now() + checkout.min(timeout);
        // A tenant found by SNI only: the owner sees no SNI, so it is named
        // in the user.
        let to_owner = if identify(&msg).is_err() {
            let mut m = msg.clone();
            m.params.retain(|(k, _)| k != "user");
            m.params
                .push(("user".into(), format!("{}.{}", ident.db_user, ident.tenant)));
            Cow::Owned(m)
        } else {
            Cow::Borrowed(&msg)
        };
        let routed = Box::pin(route(
            shard,
            stream,
            &key,
            &to_owner,
            &leftover,
            peer,
            hops,
            timeout,
            retry_until,
        ))
        .await;
        drop(to_owner);
        match routed {
            Routed::Local(s) => stream = s,
            Routed::Done => return None,
        }
    }
    let client = Admitted {
        stream,
        msg,
        ident,
        leftover,
        mode,
        peer,
        cleartext,
    };
    serve_local(shard, client).await
}

/// How often a client waiting for its pool's owner to change looks at the
/// cluster view, and how often it dials an owner that did not answer.
const OWNER_POLL: Duration = Duration::from_millis(25);
const OWNER_REDIAL: Duration = Duration::from_millis(250);
/// How soon a claim that failed (no leader) is asked again.
const CLAIM_RETRY: Duration = Duration::from_millis(100);

enum Routed {
    /// This node owns the pool: serve the client here.
    Local(Stream),
    /// Proxied to the owner (and back), or refused.
    Done,
}

/// Finds the owner of the client's pool and proxies the client there, or
/// gives it back to be served here. A pool nobody owns is claimed (bounded
/// by `startup`). An owner that cannot be reached — it is draining (its
/// proxy listener closed), stopped, or dead — is not the end: its pools are
/// about to be released (by itself after its drain, or by the leader after
/// `claim_timeout_ms`), so the client waits, watching the claims each new
/// configuration snapshot brings, and dials whoever owns the pool then (or
/// claims it), until `retry_until`.
#[allow(clippy::too_many_arguments)]
async fn route(
    shard: &Rc<Shard>,
    stream: Stream,
    key: &PoolKey,
    msg: &StartupMessage,
    leftover: &[u8],
    peer: Option<SocketAddr>,
    hops: u8,
    startup: Duration,
    retry_until: Instant,
) -> Routed {
    let mut stream = stream;
    let claim_until = Instant::now() + startup;
    let pool = crate::config::pool_key(&key.tenant, &key.user, key.mode);
    // The owner that did not answer, and when it was dialled.
    let mut failed: Option<(u64, Instant)> = None;
    let why = loop {
        let Some(cluster) = shard.config().cluster.clone() else {
            // No cluster any more (the group shrank to this node).
            return Routed::Local(stream);
        };
        let retry = Instant::now() < retry_until;
        let owner = match cluster.owners.get(&pool) {
            Some(o) => Some(*o),
            None => {
                let left = claim_until.saturating_duration_since(Instant::now());
                glommio::timer::timeout(left, async { Ok(shard.claim(pool.clone()).await) })
                    .await
                    .ok()
                    .flatten()
            }
        };
        match owner {
            None if retry => {
                // No leader at the moment (an election): try again.
                glommio::timer::sleep(CLAIM_RETRY).await;
                continue;
            }
            None => break "cannot claim the pool (no cluster leader?), try again".to_string(),
            Some(o) if o == cluster.self_node => {
                if cluster.hooks.lease_valid() {
                    return Routed::Local(stream);
                }
                break "this node lost its lease, connect to another node".to_string();
            }
            Some(o) if hops > 0 => break format!("the pool is owned by node {o}, try again"),
            Some(o) => {
                let Some(addr) = cluster.proxies.get(&o).copied() else {
                    break format!("no proxy address of node {o}");
                };
                if let Some((f, at)) = failed {
                    if f == o && at.elapsed() < OWNER_REDIAL && retry {
                        // Still the owner that did not answer: wait for the
                        // claim to move (or for the next dial).
                        glommio::timer::sleep(OWNER_POLL).await;
                        continue;
                    }
                }
                let dialled = Instant::now();
                // Relayed from this shard: it stays here.
                stream.tcp_mut().set_multishot_recv(true);
                // Cut (the client closed) if the claim moves away from `o`.
                let link = shard.register_link(pool.clone(), o);
                let source = shard.config().proxy.proxy_addr.map(|a| a.ip());
                let forwarded = crate::cluster::forward(
                    shard,
                    key,
                    stream,
                    msg,
                    leftover,
                    peer,
                    crate::cluster::LinkTarget {
                        node: o,
                        addr,
                        source,
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
                    return Routed::Done;
                };
                match sent {
                    Ok(()) => return Routed::Done,
                    Err((s, e)) => {
                        stream = s;
                        debug!(node = o, error = %e, "pool owner unreachable");
                        if Instant::now() >= retry_until {
                            break format!("the pool owner (node {o}) is unreachable, try again");
                        }
                        failed = Some((o, dialled));
                    }
                }
            }
        }
    };
    crate::metrics::bump(&shard.refused, 1);
    refuse(&mut stream, &EngineError::Refused(Refusal::Cluster(why))).await;
    Routed::Done
}

/// Serves a client on this node: on this shard if it owns the tenant, else
/// handed to the shard that does.
async fn serve_local(shard: &Rc<Shard>, client: Admitted) -> Option<Box<Admitted>> {
    let owner = shard.owner_of(&client.ident.tenant);
    if owner == shard.id {
        let mut client = client;
        client.stream.tcp_mut().set_multishot_recv(true);
        return Some(Box::new(client));
    }
    let Admitted {
        stream,
        msg,
        ident,
        leftover,
        mode,
        peer,
        cleartext,
    } = client;
    // Hand the socket to its owner: a duplicate of the fd travels (with the
    // TLS session and the WebSocket state, which go on from where they
    // are), this shard's stream is dropped. Bytes the socket already
    // brought in (a receive may bring more than the startup message)
    // travel with it: as leftover (deframed, for a WebSocket), or inside
    // the TLS session.
    let mut leftover = leftover;
    let mut stream = stream;
    if stream.quiesce().await.is_err() {
        return None;
    }
    let (stream, ws) = match stream {
        // `quiesce` above flushed what the WebSocket held.
        Stream::Ws(mut w) => {
            match w.take_buffered_data() {
                Ok(data) => leftover.extend_from_slice(&data),
                Err(_) => return None,
            }
            let (inner, state) = w.into_parts();
            (inner, Some(Box::new(state)))
        }
        other => (other, None),
    };
    let (tcp, tls) = match stream {
        Stream::Plain(mut tcp) => {
            leftover.extend_from_slice(&tcp.take_buffered());
            (tcp, None)
        }
        mut tls @ Stream::Tls(..) => {
            if tls.settle_tls().await.is_err() {
                return None;
            }
            let Stream::Tls(tcp, session) = tls else {
                return None;
            };
            (tcp, Some(session))
        }
        // A WebSocket inside a WebSocket is never built.
        Stream::Ws(_) => return None,
    };
    // What this shard wrote (`N` to an SSLRequest, TLS records) leaves
    // before the owner writes anything: sends go out from the ring, after
    // the write returned.
    let mut tcp = tcp;
    if tcp.flush().await.is_err() {
        return None;
    }
    let Some(fd) = dup_fd(tcp.as_raw_fd()) else {
        let mut stream = Stream::assemble(tcp, tls, ws, &shard.websocket.open);
        refuse(&mut stream, &EngineError::Refused(Refusal::Busy)).await;
        return None;
    };
    let handoff = Handoff {
        fd,
        tls,
        startup: msg,
        ident,
        leftover,
        mode,
        peer,
        ws,
        cleartext,
    };
    match shard.peers[owner].send(ShardMsg::Handoff(Box::new(handoff))) {
        Ok(()) => {
            crate::metrics::bump(&shard.handoffs_out, 1);
            drop(tcp)
        }
        Err(msg) => {
            // The owner's inbox is full: the message comes back with the
            // TLS session and WebSocket state, so the client still gets its error.
            let mut stream = match msg {
                ShardMsg::Handoff(h) => {
                    let h = *h;
                    Stream::assemble(tcp, h.tls, h.ws, &shard.websocket.open)
                }
                _ => Stream::Plain(tcp),
            };
            refuse(&mut stream, &EngineError::Refused(Refusal::Busy)).await;
        }
    }
    None
}
