//! The WebSocket listener's first moments: TLS when the client starts one
//! (wss), the HTTP/1.1 upgrade, then the connection goes on as a normal
//! client (`accept::serve`) over a [`WsStream`]. The whole upgrade must end
//! within `client_startup_timeout` (a slow or silent client is closed).

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::debug;
use wire::websocket::handshake::{
    encode_refusal, encode_switching, head_end, parse_request, Refused, Upgrade, MAX_REQUEST_HEAD,
};

use super::{WsState, WsStream};
use crate::accept::linger_close;
use crate::config::{PoolMode, ProxyConfig};
use crate::metrics::bump;
use crate::shard::Shard;
use crate::stream::Stream;
use crate::tls::TlsSession;

/// First byte of a TLS handshake record: a wss client.
const TLS_HANDSHAKE: u8 = 0x16;

/// Serves a connection accepted on the WebSocket listener.
pub async fn handle(shard: Rc<Shard>, mut tcp: TcpStream) {
    let peer = tcp.peer_addr().ok();
    crate::accept::may_change_shards(&shard, &mut tcp);
    let timeout = shard.config().proxy.client_startup_timeout;
    let opened = glommio::timer::timeout(timeout, async {
        Ok(Box::pin(open(&shard, tcp, peer)).await)
    })
    .await;
    match opened {
        Ok(Some((stream, mode))) => crate::accept::serve(shard, stream, mode, peer, 0, false).await,
        Ok(None) => {}
        Err(_) => {
            bump(&shard.websocket.rejected, 1);
            debug!(?peer, "WebSocket upgrade timed out");
        }
    }
}

/// TLS (when the client starts it and TLS is configured), then the upgrade.
async fn open(
    shard: &Shard,
    tcp: TcpStream,
    peer: Option<SocketAddr>,
) -> Option<(Stream, PoolMode)> {
    let config = shard.config();
    let mut stream = match &config.proxy.tls {
        Some(tls) => {
            let mut first = [0u8; 1];
            if !matches!(tcp.peek(&mut first).await, Ok(1)) {
                return None;
            }
            if first[0] == TLS_HANDSHAKE {
                let conn = TlsSession::server(tls.clone()).ok()?;
                match Stream::tls_handshake(tcp, conn).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        bump(&shard.websocket.rejected, 1);
                        debug!(?peer, error = %e, "WebSocket TLS handshake failed");
                        return None;
                    }
                }
            } else {
                Stream::Plain(tcp)
            }
        }
        None => Stream::Plain(tcp),
    };
    let head = match read_head(&mut stream).await {
        Ok(Some(h)) => h,
        Ok(None) => return None,
        Err(r) => return refuse(shard, stream, peer, r).await,
    };
    let req = match parse_request(&head) {
        Ok(r) => r,
        Err(r) => return refuse(shard, stream, peer, r).await,
    };
    let mode = match mode_of(&req, config.proxy.session_addr.port()) {
        Ok(m) => m,
        Err(r) => return refuse(shard, stream, peer, r).await,
    };
    let cleartext_ok =
        stream.is_tls() || peer.is_some_and(|p| cleartext_allowed(&config.proxy, p.ip()));
    let host = req.query("address").as_deref().and_then(host_of);
    let mut out = Vec::with_capacity(160);
    encode_switching(req.key, &mut out);
    stream.write_all(&out).await.ok()?;
    bump(&shard.websocket.upgrades, 1);
    let ws = WsStream::new(
        stream,
        WsState::new(cleartext_ok, host),
        &shard.websocket.open,
    );
    Some((Stream::Ws(Box::new(ws)), mode))
}

/// Reads the request head; `Ok(None)` when the client closed first.
async fn read_head(stream: &mut Stream) -> Result<Option<Vec<u8>>, Refused> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&head) {
            if end != head.len() {
                return Err(Refused {
                    status: 400,
                    reason: "data sent before the upgrade was answered",
                });
            }
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Err(Refused {
                status: 431,
                reason: "request head larger than 8 KiB",
            });
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Answers a bad upgrade with an HTTP error that says why, then closes.
async fn refuse(
    shard: &Shard,
    mut stream: Stream,
    peer: Option<SocketAddr>,
    r: Refused,
) -> Option<(Stream, PoolMode)> {
    bump(&shard.websocket.rejected, 1);
    debug!(
        ?peer,
        status = r.status,
        reason = r.reason,
        "WebSocket upgrade refused"
    );
    let mut out = Vec::new();
    encode_refusal(&r, &mut out);
    if stream.write_all(&out).await.is_ok() {
        linger_close(&mut stream).await;
    }
    None
}

/// The pool mode a WebSocket client asked for: `mode=session|transaction`
/// in the query; else the port in `address=host:port`, read as the TCP
/// ports are (the session port means session mode); else transaction mode.
pub fn mode_of(req: &Upgrade<'_>, session_port: u16) -> Result<PoolMode, Refused> {
    if let Some(m) = req.query("mode") {
        return match m.as_str() {
            "transaction" => Ok(PoolMode::Transaction),
            "session" => Ok(PoolMode::Session),
            _ => Err(Refused {
                status: 400,
                reason: "mode must be transaction or session",
            }),
        };
    }
    let port = req
        .query("address")
        .and_then(|a| a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()));
    Ok(if port == Some(session_port) {
        PoolMode::Session
    } else {
        PoolMode::Transaction
    })
}

/// The host of `host:port` (`[v6]:port` too), lower case; nothing when empty.
pub fn host_of(address: &str) -> Option<String> {
    let host = match address.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => address,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// A plain (ws, not wss) client from this address may log in with a
/// cleartext password.
fn cleartext_allowed(proxy: &ProxyConfig, ip: IpAddr) -> bool {
    proxy.websocket_cleartext.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(target: &str) -> Upgrade<'_> {
        Upgrade {
            target,
            key: "dGhlIHNhbXBsZSBub25jZQ==",
            host: None,
        }
    }

    #[test]
    fn mode_from_query_then_address_port() {
        let (s, t) = (5432, 6543);
        let cases = [
            (format!("/v2?address=db:{s}"), Ok(PoolMode::Session)),
            (format!("/v2?address=db:{t}"), Ok(PoolMode::Transaction)),
            ("/v2?address=db:443".to_string(), Ok(PoolMode::Transaction)),
            ("/v2".to_string(), Ok(PoolMode::Transaction)),
            (
                format!("/v2?mode=transaction&address=db:{s}"),
                Ok(PoolMode::Transaction),
            ),
            ("/?mode=session".to_string(), Ok(PoolMode::Session)),
        ];
        for (target, want) in cases {
            assert_eq!(mode_of(&upgrade(&target), s), want, "{target}");
        }
        assert_eq!(
            mode_of(&upgrade("/?mode=pipeline"), s).unwrap_err().status,
            400
        );
    }

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(
            host_of("Acme.DB.example.com:5432").as_deref(),
            Some("acme.db.example.com")
        );
        assert_eq!(host_of("acme").as_deref(), Some("acme"));
        assert_eq!(host_of("[::1]:6543").as_deref(), Some("::1"));
        assert_eq!(host_of(":5432"), None);
    }
}
