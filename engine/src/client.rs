//! A client session on its tenant's shard: authentication, login, then the
//! relay loop that takes and gives back server connections.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use crate::stream::Stream;
use bytes::{BufMut, BytesMut};
use futures_lite::future::poll_fn;
use futures_lite::AsyncWriteExt;
use tracing::{debug, info, warn};
use wire::backend::{encode_negotiate_protocol_version, encode_ready_for_query, BackendKeyData};
use wire::startup::StartupMessage;

use crate::accept::{for_log, refuse, Identity};
use crate::authquery;
use crate::config::{PoolMode, TenantConfig, UserAuth, UserConfig};
use crate::error::{EngineError, Refusal};
use crate::metrics::bump;
use crate::pool::{ClientSlot, Pool, PoolKey, PooledConn, RESET_TIMEOUT};
use crate::relay::{sync_params, ClientSide, Event, Relay, Shape, Tracker};
use crate::replica::Reads;
use crate::settings::Settings;
use crate::shard::{ClientCtl, ClientDesc, ConnGuard, Shard};

struct Session {
    pool: Rc<Pool>,
    _slot: ClientSlot,
    pid: i32,
    ctl: Rc<ClientCtl>,
    /// Where its transactions go.
    reads: Reads,
}

/// A finished login: the session, the settings of the startup message and
/// the bytes the client sent after its last authentication message.
struct LoggedIn {
    session: Session,
    params: Rc<Settings>,
    leftover: Vec<u8>,
}

/// A client to serve on this shard: its socket, startup message and who it is.
pub struct Admitted {
    pub stream: Stream,
    pub msg: StartupMessage,
    pub ident: Identity,
    pub leftover: Vec<u8>,
    pub mode: PoolMode,
    pub peer: Option<SocketAddr>,
    /// The client may log in with a cleartext password (a WebSocket client
    /// over TLS or from a trusted address, here or at the node that proxied it).
    pub cleartext: bool,
}

/// Starts a client's session in a task of its own. The task holds only the
/// session's state: what routed the connection here (TLS handshake, startup,
/// proxying, handoff) has finished and been freed, and the login runs in a
/// boxed future freed before the session starts. An idle client costs its
/// session's state and little else.
pub fn spawn(shard: &Rc<Shard>, client: Box<Admitted>) {
    let guard = ConnGuard::new(shard);
    shard.spawn(session(guard, client));
}

async fn session(guard: ConnGuard, client: Box<Admitted>) {
    let shard = guard.shard().clone();
    let mode = client.mode;
    let Some((client, session)) = Box::pin(start(&shard, client)).await else {
        return;
    };
    if mode == PoolMode::Transaction && client.stream.parkable() {
        session.ctl.allow_park();
    }
    run(shard, guard, client, session, mode, Instant::now()).await;
}

/// A parked client's session (`crate::park`): what its task held, without
/// the task. Its control block and pid stay in the shard's registry.
pub(crate) struct Parked {
    guard: ConnGuard,
    client: Box<ClientSide>,
    pool: Rc<Pool>,
    slot: ClientSlot,
    reads: Reads,
    joined: Instant,
}

impl Parked {
    /// The session back from its parked parts.
    fn unpark(
        self,
        pid: i32,
        ctl: Rc<ClientCtl>,
    ) -> (ConnGuard, Box<ClientSide>, Session, Instant) {
        let Parked {
            guard,
            client,
            pool,
            slot,
            reads,
            joined,
        } = self;
        let session = Session {
            pool,
            _slot: slot,
            pid,
            ctl,
            reads,
        };
        (guard, client, session, joined)
    }
}

/// Serves a logged-in client until it leaves or parks.
async fn run(
    shard: Rc<Shard>,
    mut guard: ConnGuard,
    mut client: Box<ClientSide>,
    mut session: Session,
    mode: PoolMode,
    joined: Instant,
) {
    let pid = session.pid;
    let pool = session.pool.clone();
    loop {
        let Some((c, s)) = serve(&shard, client, session, mode).await else {
            break;
        };
        let ctl = s.ctl.clone();
        let fd = c.stream.as_raw_fd();
        let parked = Box::new(Parked {
            guard,
            client: c,
            pool: s.pool,
            slot: s._slot,
            reads: s.reads,
            joined,
        });
        match shard.park_client(&ctl, pid, fd, parked) {
            Ok(()) => return,
            // The kernel refused the socket: serve on.
            Err(p) => (guard, client, session, _) = p.unpark(pid, ctl),
        }
    }
    pool.stats
        .client_connection_duration
        .observe(joined.elapsed());
    shard.unregister_client(pid);
    drop(guard);
}

/// Spawns the task of a parked client again.
pub(crate) fn resume(shard: &Rc<Shard>, ctl: Rc<ClientCtl>, pid: i32, parked: Parked) {
    let (guard, client, session, joined) = parked.unpark(pid, ctl);
    shard.spawn(run(
        shard.clone(),
        guard,
        client,
        session,
        PoolMode::Transaction,
        joined,
    ));
}

/// Authentication and login under the startup timeout; a refused client
/// gets its error here.
async fn start(shard: &Shard, client: Box<Admitted>) -> Option<(Box<ClientSide>, Session)> {
    let Admitted {
        mut stream,
        msg,
        ident,
        leftover,
        mode,
        peer,
        cleartext,
    } = *client;
    // TCP_NODELAY: inherited from the listener (see `shard::bind_listener`).
    let timeout = shard.config().proxy.client_startup_timeout;
    // Boxed: the login's future (several KiB of state) is written once,
    // into the heap, instead of copied into the timeout and again into this
    // future's state (memcpy was 7% of a login's user time).
    let login = glommio::timer::timeout(
        timeout,
        Box::pin(async {
            let how = Arrival {
                mode,
                peer,
                cleartext,
            };
            Ok(login(shard, &mut stream, &msg, ident, leftover, how).await)
        }),
    )
    .await;
    match login {
        Ok(Ok(l)) => {
            // Boxed: the session's future then holds a pointer, not a copy
            // (async fns keep their arguments and their locals apart).
            let client = Box::new(ClientSide::new(stream, &l.leftover, l.params));
            Some((client, l.session))
        }
        Ok(Err(e)) => {
            match &e {
                EngineError::ClientIo(_) => debug!(?peer, "client left during login"),
                EngineError::ClientProtocol(_) => {
                    debug!(?peer, user = for_log(msg.user().unwrap_or("")), error = %e, "login refused")
                }
                _ => {
                    info!(?peer, user = for_log(msg.user().unwrap_or("")), error = %e, "login refused")
                }
            }
            if !matches!(e, EngineError::ClientIo(_)) {
                refuse(&mut stream, &e).await;
            }
            None
        }
        Err(_) => {
            refuse(
                &mut stream,
                &EngineError::Timeout("client startup and authentication"),
            )
            .await;
            None
        }
    }
}

/// How a client reached this shard.
struct Arrival {
    mode: PoolMode,
    peer: Option<SocketAddr>,
    cleartext: bool,
}

async fn login(
    shard: &Shard,
    stream: &mut Stream,
    msg: &StartupMessage,
    ident: Identity,
    leftover: Vec<u8>,
    how: Arrival,
) -> Result<LoggedIn, EngineError> {
    let Arrival {
        mode,
        peer,
        cleartext,
    } = how;
    let tenant: Arc<TenantConfig> = shard
        .config()
        .tenant(&ident.tenant)
        .cloned()
        .ok_or_else(|| EngineError::Refused(Refusal::UnknownTenant(ident.tenant.clone())))?;
    let unknown = || {
        EngineError::Refused(Refusal::UnknownUser {
            user: ident.db_user.clone(),
            tenant: ident.tenant.clone(),
        })
    };
    // Repeated wrong passwords from one address for one user: wait first.
    let ip = peer.map(|p| p.ip());
    if let Some(wait) = ip.and_then(|ip| shard.login_backoff(ip, &ident.tenant, &ident.db_user)) {
        return Err(EngineError::Refused(Refusal::LoginBackoff {
            user: ident.db_user.clone(),
            secs: wait.as_secs().max(1),
        }));
    }
    let user: Arc<UserConfig> = match tenant.users.get(&ident.db_user) {
        Some(u) => u.clone(),
        None if !tenant.require_user => authquery::lookup(shard, &tenant, &ident.db_user)
            .await?
            .ok_or_else(unknown)?,
        None => return Err(unknown()),
    };
    if shard.is_draining() {
        return Err(EngineError::Refused(Refusal::ShuttingDown));
    }

    // A newer 3.x minor or `_pq_.` options: say what we speak, go on at 3.0.
    let pq_options = msg.protocol_options();
    if msg.minor > 0 || !pq_options.is_empty() {
        let mut out = BytesMut::new();
        encode_negotiate_protocol_version(0, &pq_options, &mut out);
        stream
            .write_all(&out)
            .await
            .map_err(EngineError::ClientIo)?;
    }

    let mut inbuf = BytesMut::from(&leftover[..]);
    let startup_user = msg.user().unwrap_or_default();
    // AuthenticationOk and what ends the exchange, sent with the session's
    // parameters in one write (or alone first when the pool must connect
    // before it knows them, and before an error).
    // Sized for SASLFinal, AuthenticationOk, a dozen ParameterStatus,
    // BackendKeyData and ReadyForQuery: grown once or never.
    let mut done = BytesMut::with_capacity(1024);
    let client_key = match crate::auth::authenticate(
        stream,
        &mut inbuf,
        &tenant,
        &user,
        startup_user,
        cleartext,
        &mut done,
    )
    .await
    {
        Ok(k) => {
            if let Some(ip) = ip {
                shard.login_ok(ip, &ident.tenant, &ident.db_user);
            }
            k
        }
        Err(e) => {
            if !matches!(e, EngineError::ClientIo(_)) {
                shard.join_failed(PoolKey::primary(&tenant.external_id, &user.db_user, mode));
            }
            if let (Some(ip), EngineError::Refused(Refusal::WrongPassword(_))) = (ip, &e) {
                shard.login_failed(ip, &ident.tenant, &ident.db_user);
            }
            if matches!(user.auth, UserAuth::Fetched(_)) {
                authquery::invalidate(shard, &tenant.external_id, &user.db_user);
            }
            return Err(e);
        }
    };

    let pool = shard.pool(&tenant, &user, mode);
    if matches!(user.auth, UserAuth::Fetched(_)) {
        pool.set_client_key(client_key);
    }
    let slot = match pool.join() {
        Ok(s) => s,
        Err(e) => {
            bump(&pool.stats.joins_fail, 1);
            send_done(stream, &mut done).await?;
            return Err(e);
        }
    };
    if !pool.knows_login_params() {
        // The client is in; it waits for the first server connection.
        send_done(stream, &mut done).await?;
    }
    let params = match pool.login_params().await {
        Ok(p) => p,
        Err(e) => {
            send_done(stream, &mut done).await?;
            bump(&pool.stats.joins_fail, 1);
            warn!(tenant = %tenant.external_id, user = %user.db_user, error = %e, "pool cannot reach its database");
            return Err(e);
        }
    };
    let target = msg
        .option_value("target_session_attrs")
        .or_else(|| msg.get("target_session_attrs").map(str::to_string));
    let reads = Reads::of(&tenant, target.as_deref(), mode == PoolMode::Transaction);
    let settings = Rc::new(startup_settings(msg));
    let mut desc = ClientDesc::new(peer, settings.clone());
    desc.reads = reads;
    let (pid, ctl) = shard.register_client(pool.key.clone(), tenant.timeouts, desc);
    let mut out = done;
    out.reserve(params.len() + 32);
    out.put_slice(&params);
    BackendKeyData {
        process_id: pid,
        secret: bytes::Bytes::copy_from_slice(&ctl.secret),
    }
    .encode(&mut out);
    encode_ready_for_query(b'I', &mut out);
    if let Err(e) = stream.write_all(&out).await {
        shard.unregister_client(pid);
        return Err(EngineError::ClientIo(e));
    }
    bump(&pool.stats.joins_ok, 1);
    Ok(LoggedIn {
        session: Session {
            pool,
            _slot: slot,
            pid,
            ctl,
            reads,
        },
        params: settings,
        leftover: inbuf.to_vec(),
    })
}

/// Relays a client's transactions until it leaves (`None`) or may be parked
/// (its side and session back, with no request of its socket in the ring).
async fn serve(
    shard: &Shard,
    mut client: Box<ClientSide>,
    session: Session,
    mode: PoolMode,
) -> Option<(Box<ClientSide>, Session)> {
    let Session {
        pool,
        _slot: slot,
        pid,
        ctl,
        reads,
    } = session;
    let checkout_timeout = pool.user().checkout_timeout;
    let mut tracker = Tracker::default();
    let mut server: Option<PooledConn> = None;

    if mode == PoolMode::Session {
        let read = reads == Reads::Replicas;
        match checkout_busy(shard, &pool, &ctl, checkout_timeout, read).await {
            Ok(mut c) => {
                *ctl.cancel.borrow_mut() = c.cancel.clone();
                sync_params(&mut client, &mut c, &mut tracker);
                server = Some(c);
            }
            Err(e) => {
                refuse(&mut client.stream, &e).await;
                return None;
            }
        }
    }

    // Only the relay and the checkout are awaited here; how a session ends
    // is handled in `finish`, boxed, so that its futures take no room in
    // the task of every idle client.
    let end = loop {
        let event = poll_fn(|cx| {
            let mut relay = Relay {
                client: &mut client,
                tracker: &mut tracker,
                scratch: &shard.scratch,
                release: mode == PoolMode::Transaction,
                shape: Shape {
                    rewrite: mode == PoolMode::Transaction,
                    registry: &pool.statements,
                },
                ctl: &ctl,
                stats: &pool.stats,
            };
            relay.poll_step(cx, server.as_deref_mut())
        })
        .await;
        match event {
            Event::NeedServer => {
                let read = match reads {
                    Reads::Primary => false,
                    Reads::Replicas => true,
                    Reads::Classify => crate::readsql::batch_is_read(client.buf.bytes()),
                };
                match checkout_busy(shard, &pool, &ctl, checkout_timeout, read).await {
                    Ok(mut c) => {
                        *ctl.cancel.borrow_mut() = c.cancel.clone();
                        sync_params(&mut client, &mut c, &mut tracker);
                        server = Some(c);
                    }
                    Err(e) => break End::CheckoutFailed(e),
                }
            }
            Event::Released => {
                if let Some(c) = server.take() {
                    ctl.cancel.borrow_mut().take();
                    c.give_back();
                }
                client.release_buffers();
            }
            Event::Park => {
                client.release_buffers();
                if let Err(e) = client.stream.quiesce().await {
                    break End::Event(Event::ClientError(e));
                }
                // What came (or was raised) meanwhile is served first.
                if !client.stream.has_buffered() && !ctl.has_signal() {
                    let session = Session {
                        pool,
                        _slot: slot,
                        pid,
                        ctl,
                        reads,
                    };
                    return Some((client, session));
                }
            }
            other => break End::Event(other),
        }
    };
    Box::pin(finish(&pool, &ctl, client, server, tracker, mode, end)).await;
    drop(slot);
    None
}

/// Why a session's relay loop ended.
enum End {
    /// No server connection for the client's message: say why and close.
    CheckoutFailed(EngineError),
    Event(Event),
}

/// Ends a session: the server connection is cleaned and given back (or
/// closed), and the client hears why it is closed when that is not its own doing.
async fn finish(
    pool: &Rc<Pool>,
    ctl: &ClientCtl,
    mut client: Box<ClientSide>,
    mut server: Option<PooledConn>,
    tracker: Tracker,
    mode: PoolMode,
    end: End,
) {
    let event = match end {
        End::CheckoutFailed(e) => {
            refuse(&mut client.stream, &e).await;
            return;
        }
        End::Event(event) => event,
    };
    debug!(tenant = %pool.key.tenant, ?event, "session ends");
    match event {
        Event::NeedServer | Event::Released | Event::Park => {}
        Event::ClientGone | Event::ClientError(_) => {
            ctl.cancel.borrow_mut().take();
            if let Some(c) = server.take() {
                Box::pin(give_back(c, &tracker, mode)).await;
            }
        }
        Event::ClientRefused(e) => {
            ctl.cancel.borrow_mut().take();
            info!(tenant = %pool.key.tenant, error = %e, "client refused");
            // What was sent so far may be half a batch: the connection goes.
            drop(server.take());
            refuse(
                &mut client.stream,
                &EngineError::TooManyStatements(e.to_string()),
            )
            .await;
        }
        Event::ClientProtocol(e) => {
            ctl.cancel.borrow_mut().take();
            debug!(error = %e, "client protocol violation");
            refuse(&mut client.stream, &EngineError::ClientProtocol(e)).await;
            if let Some(c) = server.take() {
                Box::pin(give_back(c, &tracker, mode)).await;
            }
        }
        Event::ServerGone(e) => {
            ctl.cancel.borrow_mut().take();
            let err = EngineError::ServerIo(
                e.unwrap_or_else(|| std::io::ErrorKind::UnexpectedEof.into()),
            );
            info!(tenant = %pool.key.tenant, error = %err, "server connection lost");
            // Whatever the server said before it went (a FATAL error) goes to the client first.
            if let Some(s) = server.as_mut() {
                let n = s.walked;
                if n > 0 {
                    let _ = client.stream.write_all(&s.buf.bytes()[..n]).await;
                }
            }
            drop(server.take());
            refuse(&mut client.stream, &err).await;
        }
        Event::ServerProtocol(e) => {
            ctl.cancel.borrow_mut().take();
            warn!(tenant = %pool.key.tenant, error = %e, "server protocol violation");
            drop(server.take());
            refuse(&mut client.stream, &EngineError::ServerProtocol(e)).await;
        }
        Event::TimedOut(why) => {
            ctl.cancel.borrow_mut().take();
            debug!(tenant = %pool.key.tenant, reason = %why, "client timed out");
            // An open transaction is rolled back, the connection reused.
            if let Some(c) = server.take() {
                Box::pin(give_back(c, &tracker, mode)).await;
            }
            refuse(&mut client.stream, &EngineError::Refused(why)).await;
        }
        Event::Killed(why) => {
            ctl.cancel.borrow_mut().take();
            // Mid-transaction or not, the connection goes with the pool; a
            // running query is cancelled too, or its backend would run it
            // to the end (and stay in PostgreSQL) for nobody.
            if let Some(c) = server.take() {
                if tracker.pending > 0 {
                    if let Some(target) = c.cancel.clone() {
                        glommio::spawn_local(target.send()).detach();
                    }
                }
                drop(c);
            }
            refuse(&mut client.stream, &EngineError::Refused(why)).await;
        }
        Event::Shutdown => {
            ctl.cancel.borrow_mut().take();
            if let Some(c) = server.take() {
                Box::pin(give_back(c, &tracker, mode)).await;
            }
            refuse(
                &mut client.stream,
                &EngineError::Refused(Refusal::ShuttingDown),
            )
            .await;
        }
    }
}

/// The startup option that sends a client's transactions to the replicas.
const TARGET: &str = "target_session_attrs";

/// The settings a client's startup message asks for: its GUC parameters and
/// the `-c name=value` / `--name=value` of `options`.
fn startup_settings(msg: &StartupMessage) -> Settings {
    let mut out = Settings::new();
    for (k, v) in &msg.params {
        if matches!(
            k.as_str(),
            "user" | "database" | "options" | "replication" | TARGET
        ) || k.starts_with("_pq_.")
        {
            continue;
        }
        out.insert(k, v);
    }
    let tokens = msg.option_tokens();
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        let setting = if t == "-c" {
            i += 1;
            tokens.get(i).map(String::as_str)
        } else if let Some(s) = t.strip_prefix("-c") {
            Some(s)
        } else {
            t.strip_prefix("--")
        };
        if let Some((k, v)) = setting.and_then(|s| s.split_once('=')) {
            // `reference` names the tenant and `target_session_attrs`
            // picks replicas: they are not settings.
            if k != "reference" && k.replace('-', "_") != TARGET {
                out.insert(&k.replace('-', "_"), v);
            }
        }
        i += 1;
    }
    out
}

/// Sends what authentication left to send, if anything.
async fn send_done(stream: &mut Stream, done: &mut BytesMut) -> Result<(), EngineError> {
    if !done.is_empty() {
        stream
            .write_all(done)
            .await
            .map_err(EngineError::ClientIo)?;
        done.clear();
    }
    Ok(())
}

/// A checkout for a client with a request waiting (waiting is not
/// idleness), timed: a read from a replica when `read`, else from the
/// primary. The connection forgets statement names of another registry.
async fn checkout_busy(
    shard: &Shard,
    pool: &Rc<Pool>,
    ctl: &crate::shard::ClientCtl,
    wait: std::time::Duration,
    read: bool,
) -> Result<PooledConn, EngineError> {
    ctl.set_phase(crate::shard::Phase::Busy);
    if !read {
        // The common case, an idle connection: no boxed future per
        // transaction, no wait to time.
        if let Some(c) = pool.checkout_now() {
            pool.stats
                .checkout_duration
                .observe(std::time::Duration::ZERO);
            return Ok(adopted(pool, c));
        }
    }
    Box::pin(checkout_wait(shard, pool, wait, read)).await
}

/// The connection forgets statement names of another registry.
fn adopted(pool: &Pool, mut c: PooledConn) -> PooledConn {
    c.prepared.adopt(pool.statements.borrow().id());
    c
}

/// [`checkout_busy`] when no idle connection is at hand (or for a read),
/// boxed so that its future takes no room in the task of an idle client.
async fn checkout_wait(
    shard: &Shard,
    pool: &Rc<Pool>,
    wait: std::time::Duration,
    read: bool,
) -> Result<PooledConn, EngineError> {
    // Stamped with the time of the wake-ups (no clock read): a checkout
    // that finds an idle connection takes 0, one that waits is stamped at
    // the wake-up that handed it a connection.
    let start = glommio::timer::recent_now();
    let r = if read {
        crate::replica::checkout_read(shard, pool, wait).await
    } else {
        pool.checkout(wait).await
    };
    pool.stats
        .checkout_duration
        .observe(glommio::timer::recent_now().saturating_duration_since(start));
    r.map(|c| adopted(pool, c))
}

/// Returns a connection whose client left: clean it when that is safe, close
/// it otherwise. Never leaves a transaction open on a pooled connection.
async fn give_back(mut conn: PooledConn, tracker: &Tracker, mode: PoolMode) {
    let quiet = tracker.pending == 0
        && !tracker.ext_open
        && tracker.expect.is_empty()
        && conn.walked == 0
        && conn.buf.is_empty()
        && conn.walker.at_boundary();
    if !quiet {
        // A query is running or half-sent: closing is the only safe reset.
        // Cancel it too, or the backend would run it to the end for nobody.
        if tracker.pending > 0 {
            if let Some(target) = conn.cancel.clone() {
                glommio::spawn_local(target.send()).detach();
            }
        }
        drop(conn);
        return;
    }
    let mut reset: Vec<&str> = Vec::new();
    if conn.status != b'I' {
        reset.push("ROLLBACK");
    }
    if mode == PoolMode::Session {
        reset.push("DISCARD ALL");
    }
    if !reset.is_empty() {
        match conn.run_simple(&reset, RESET_TIMEOUT).await {
            Ok(b'I') => {}
            Ok(_) | Err(_) => {
                drop(conn);
                return;
            }
        }
    }
    conn.give_back();
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// What every idle client keeps stays small (a quarter of a million of them per node):
    /// these bounds are today's sizes, so that growth is a decision, not an accident.
    #[test]
    fn idle_client_parts_stay_small() {
        let sizes = [
            ("Stream", std::mem::size_of::<Stream>(), 160),
            ("ClientSide", std::mem::size_of::<ClientSide>(), 344),
            (
                "TlsSession",
                std::mem::size_of::<crate::tls::TlsSession>(),
                1232,
            ),
            ("ClientCtl", std::mem::size_of::<ClientCtl>(), 168),
            ("Session", std::mem::size_of::<Session>(), 32),
            ("Parked", std::mem::size_of::<Parked>(), 64),
        ];
        for (name, size, bound) in sizes {
            assert!(size <= bound, "{name} is {size} bytes, more than {bound}");
        }
    }
}
