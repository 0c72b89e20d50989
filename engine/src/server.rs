//! A connection to PostgreSQL: connect, log in as the tenant's user, and the
//! small amount of state the relay keeps about it between checkouts.

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::stream::Stream;
use crate::tls::TlsSession;
use wire::backend::{
    self, Authentication, BackendKeyData, ErrorFields, AUTHENTICATION_TAG, BACKEND_KEY_DATA_TAG,
    ERROR_RESPONSE_TAG, PARAMETER_STATUS_TAG, READY_FOR_QUERY_TAG,
};
use wire::frame::{split_frame, Walker, MAX_AUTH_FRAME_LEN};
use wire::{frontend, md5, scram, startup};

use crate::buf::IoBuf;
use crate::config::TenantConfig;
use crate::error::EngineError;

/// Where a server connection goes: the tenant's database or one of its
/// read replicas (whose connections are opened read-only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Opened with `default_transaction_read_only=on`: a write that reaches
    /// it fails with 25006 instead of being applied.
    pub read_only: bool,
}

impl Endpoint {
    /// The tenant's primary database.
    pub fn primary(tenant: &TenantConfig) -> Endpoint {
        Endpoint {
            host: tenant.db_host.clone(),
            port: tenant.db_port,
            read_only: false,
        }
    }
}

/// What the admin console shows of a server connection, shared with its
/// pool (which holds it weakly) while the connection lives.
#[derive(Debug)]
pub struct ServerMeta {
    pub addr: SocketAddr,
    /// The backend's process id (BackendKeyData), 0 when none was sent.
    pub backend_pid: i32,
    pub connected: std::time::SystemTime,
}

/// What a client needs to cancel the query running on this connection.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub key: BackendKeyData,
}

/// How the pooler proves itself to PostgreSQL.
#[derive(Clone, Copy)]
pub enum ServerLogin<'a> {
    Password(&'a str),
    /// SCRAM pass-through: the ClientKey recovered from a client's proof.
    ScramKey {
        client_key: [u8; 32],
        server_key: [u8; 32],
    },
    /// md5 with the stored secret ("md5" + hex) instead of the password.
    Md5Secret(&'a str),
}

impl CancelTarget {
    /// Sends a CancelRequest with the server's own key on a new connection.
    pub async fn send(self: std::rc::Rc<Self>) {
        let mut out = BytesMut::new();
        startup::encode_cancel_request(self.key.process_id, &self.key.secret, &mut out);
        match TcpStream::connect(self.addr).await {
            Ok(mut s) => {
                let _ = s.write_all(&out).await;
                // The server closes once it has read the request.
                let mut b = [0u8; 16];
                let _ = glommio::timer::timeout(Duration::from_secs(5), async {
                    let _ = s.read(&mut b).await;
                    Ok(())
                })
                .await;
            }
            Err(e) => tracing::warn!(error = %e, "could not send a cancel request to the database"),
        }
    }
}

/// SSLRequest, then the TLS handshake with the database (`upstream_ssl`).
async fn upstream_tls(
    mut tcp: TcpStream,
    cfg: std::sync::Arc<rustls::ClientConfig>,
    host: &str,
    addr: SocketAddr,
) -> Result<Stream, EngineError> {
    let failed = |why: String| EngineError::ServerTls {
        addr: addr.to_string(),
        why,
    };
    let mut out = BytesMut::new();
    startup::encode_ssl_request(&mut out);
    tcp.write_all(&out).await.map_err(EngineError::ServerIo)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(EngineError::ServerIo)?;
    if answer[0] != b'S' {
        return Err(failed(
            "the database does not accept TLS (upstream_ssl is set)".into(),
        ));
    }
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| failed(format!("db_host {host:?} is not a TLS server name: {e}")))?;
    let conn = TlsSession::client(cfg, name).map_err(|e| failed(format!("TLS setup: {e}")))?;
    Stream::tls_handshake(tcp, conn)
        .await
        .map_err(|e| failed(format!("TLS handshake with the database: {e}")))
}

pub struct ServerConn {
    pub stream: Stream,
    /// Bytes read from the server and not yet forwarded; `walked` of them are
    /// whole frames or frame parts whose header was seen.
    pub buf: IoBuf,
    pub walked: usize,
    pub walker: Walker,
    /// Shared (a refcount, no copy) with the client holding the connection.
    pub cancel: Option<std::rc::Rc<CancelTarget>>,
    /// ParameterStatus frames received at login, as they came.
    pub login_params: BytesMut,
    /// Last ReadyForQuery status.
    pub status: u8,
    /// The pool generation (database address) it was opened for.
    pub generation: u64,
    /// Named statements prepared on this connection (transaction mode).
    pub prepared: crate::prepared::ServerStmts,
    /// Session settings as they are now (ParameterStatus, and what the
    /// pooler set), and as they were after login.
    pub params: ServerParams,
    pub defaults: std::collections::BTreeMap<String, String>,
    /// For the admin console.
    pub meta: std::rc::Rc<ServerMeta>,
}

/// A server connection's session settings, and which client settings they
/// were last made to match. Every change forgets that match, so that the
/// next checkout compares again; a checkout by a client with the same
/// settings as the last one (the usual case: clients of one application)
/// then costs one comparison instead of a lookup per setting.
#[derive(Debug, Default)]
pub struct ServerParams {
    map: std::collections::BTreeMap<String, String>,
    synced: Option<std::rc::Rc<crate::settings::Settings>>,
}

impl ServerParams {
    pub fn new(map: std::collections::BTreeMap<String, String>) -> Self {
        Self { map, synced: None }
    }

    pub fn insert(&mut self, name: String, value: String) {
        self.synced = None;
        self.map.insert(name, value);
    }

    pub fn remove(&mut self, name: &str) {
        self.synced = None;
        self.map.remove(name);
    }

    /// Back to `defaults` (after DISCARD ALL or RESET ALL).
    pub fn reset_to(&mut self, defaults: &std::collections::BTreeMap<String, String>) {
        self.synced = None;
        self.map.clone_from(defaults);
    }

    /// Nothing changed since the settings were made to match `client`'s.
    pub fn synced_with(&self, client: &std::rc::Rc<crate::settings::Settings>) -> bool {
        self.synced
            .as_ref()
            .is_some_and(|s| std::rc::Rc::ptr_eq(s, client) || **s == **client)
    }

    /// The settings now match `client`'s.
    pub fn mark_synced(&mut self, client: &std::rc::Rc<crate::settings::Settings>) {
        self.synced = Some(client.clone());
    }
}

impl std::ops::Deref for ServerParams {
    type Target = std::collections::BTreeMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("fd", &self.stream.as_raw_fd())
            .field("status", &(self.status as char))
            .finish_non_exhaustive()
    }
}

/// The columns of a DataRow body (None = NULL).
fn decode_data_row(body: &[u8]) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
    let bad = || EngineError::ServerProtocol(wire::WireError::Protocol("malformed DataRow".into()));
    let n = body.get(..2).ok_or_else(bad)?;
    let n = i16::from_be_bytes([n[0], n[1]]);
    let mut pos = 2;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        let len = body.get(pos..pos + 4).ok_or_else(bad)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        pos += 4;
        if len < 0 {
            cols.push(None);
            continue;
        }
        let v = body.get(pos..pos + len as usize).ok_or_else(bad)?;
        cols.push(Some(v.to_vec()));
        pos += len as usize;
    }
    Ok(cols)
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, EngineError> {
    // Literal addresses never block; host names use the system resolver.
    (host, port)
        .to_socket_addrs()
        .map_err(|source| EngineError::Connect {
            addr: format!("{host}:{port}"),
            source,
        })?
        .next()
        .ok_or_else(|| EngineError::Connect {
            addr: format!("{host}:{port}"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })
}

/// Reads one whole frame of at most `max` bytes (the pooler's own exchanges:
/// login, resets, auth_query).
async fn read_frame(
    stream: &mut Stream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(u8, BytesMut), EngineError> {
    loop {
        if let Some((h, body)) = split_frame(buf, max).map_err(EngineError::ServerProtocol)? {
            return Ok((h.tag, body));
        }
        let mut chunk = [0u8; 4096];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(EngineError::ServerIo)?;
        if n == 0 {
            return Err(EngineError::ServerIo(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        buf.put_slice(&chunk[..n]);
    }
}

impl ServerConn {
    /// Opens a connection and logs in as `user`.
    pub async fn connect(
        tenant: &TenantConfig,
        endpoint: &Endpoint,
        db_user: &str,
        login: ServerLogin<'_>,
        timeout: Duration,
    ) -> Result<ServerConn, EngineError> {
        let addr = resolve(&endpoint.host, endpoint.port)?;
        let fut = Self::connect_inner(addr, tenant, endpoint, db_user, login);
        match glommio::timer::timeout(timeout, async { Ok(fut.await) }).await {
            Ok(r) => r,
            Err(_) => Err(EngineError::Timeout("connecting to the database")),
        }
    }

    async fn connect_inner(
        addr: SocketAddr,
        tenant: &TenantConfig,
        endpoint: &Endpoint,
        db_user: &str,
        login: ServerLogin<'_>,
    ) -> Result<ServerConn, EngineError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| EngineError::Connect {
                addr: addr.to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let _ = tcp.set_nodelay(true);
        let mut stream = match &tenant.upstream_tls {
            None => Stream::Plain(tcp),
            Some(cfg) => upstream_tls(tcp, cfg.clone(), &endpoint.host, addr).await?,
        };
        let mut out = BytesMut::new();
        let mut startup_params = vec![
            ("user", db_user),
            ("database", tenant.db_database.as_str()),
            ("application_name", "Supavisor"),
        ];
        if endpoint.read_only {
            startup_params.push(("default_transaction_read_only", "on"));
        }
        startup::encode_startup(&startup_params, &mut out);
        stream
            .write_all(&out)
            .await
            .map_err(EngineError::ServerIo)?;

        let mut inbuf = BytesMut::new();
        let mut scram_client: Option<scram::ScramClient> = None;
        let mut login_params = BytesMut::new();
        let mut params = std::collections::BTreeMap::new();
        params.insert("application_name".to_string(), "Supavisor".to_string());
        let mut cancel = None;
        loop {
            let (tag, body) = read_frame(&mut stream, &mut inbuf, MAX_AUTH_FRAME_LEN).await?;
            match tag {
                AUTHENTICATION_TAG => {
                    let auth =
                        Authentication::decode(&body).map_err(EngineError::ServerProtocol)?;
                    let mut out = BytesMut::new();
                    match auth {
                        Authentication::Ok => continue,
                        Authentication::CleartextPassword => match login {
                            ServerLogin::Password(p) => {
                                frontend::encode_password(p.as_bytes(), &mut out)
                            }
                            _ => return Err(EngineError::UnsupportedServerAuth(
                                "cleartext password, but the pooler has no password for this user"
                                    .into(),
                            )),
                        },
                        Authentication::Md5Password { salt } => {
                            let secret = match login {
                                ServerLogin::Password(p) => md5::md5_secret(db_user, p),
                                ServerLogin::Md5Secret(s) => s.to_string(),
                                ServerLogin::ScramKey { .. } => {
                                    return Err(EngineError::UnsupportedServerAuth(
                                        "md5, but the user's secret is SCRAM".into(),
                                    ))
                                }
                            };
                            let resp = md5::md5_response(&secret, salt);
                            frontend::encode_password(resp.as_bytes(), &mut out)
                        }
                        Authentication::Sasl { mechanisms } => {
                            if !mechanisms.iter().any(|m| m == scram::SCRAM_SHA_256) {
                                return Err(EngineError::UnsupportedServerAuth(
                                    mechanisms.join(","),
                                ));
                            }
                            let client = match login {
                                ServerLogin::Password(p) => scram::ScramClient::new(p),
                                ServerLogin::ScramKey {
                                    client_key,
                                    server_key,
                                } => scram::ScramClient::from_client_key(
                                    client_key,
                                    Some(server_key),
                                ),
                                ServerLogin::Md5Secret(_) => {
                                    return Err(EngineError::UnsupportedServerAuth(
                                        "SCRAM, but the user's secret is md5".into(),
                                    ))
                                }
                            };
                            frontend::encode_sasl_initial_response(
                                scram::SCRAM_SHA_256,
                                &client.client_first(),
                                &mut out,
                            );
                            scram_client = Some(client);
                        }
                        Authentication::SaslContinue(data) => {
                            let client = scram_client.as_mut().ok_or_else(|| {
                                EngineError::UnsupportedServerAuth(
                                    "SASL continue before start".into(),
                                )
                            })?;
                            let reply = client
                                .handle_server_first(&data)
                                .map_err(EngineError::ServerProtocol)?;
                            frontend::encode_sasl_response(&reply, &mut out);
                        }
                        Authentication::SaslFinal(data) => {
                            let client = scram_client.as_ref().ok_or_else(|| {
                                EngineError::UnsupportedServerAuth("SASL final before start".into())
                            })?;
                            client
                                .verify_server_final(&data)
                                .map_err(EngineError::ServerProtocol)?;
                            continue;
                        }
                        other => {
                            return Err(EngineError::UnsupportedServerAuth(format!("{other:?}")))
                        }
                    }
                    stream
                        .write_all(&out)
                        .await
                        .map_err(EngineError::ServerIo)?;
                }
                PARAMETER_STATUS_TAG => {
                    // Keep the frame as it came, for replay to clients.
                    let (k, v) = backend::decode_parameter_status(&body)
                        .map_err(EngineError::ServerProtocol)?;
                    params.insert(k.to_string(), v.to_string());
                    login_params.put_u8(tag);
                    login_params.put_i32(body.len() as i32 + 4);
                    login_params.put_slice(&body);
                }
                BACKEND_KEY_DATA_TAG => {
                    let key = BackendKeyData::decode(&body).map_err(EngineError::ServerProtocol)?;
                    cancel = Some(std::rc::Rc::new(CancelTarget { addr, key }));
                }
                ERROR_RESPONSE_TAG => {
                    let fields = ErrorFields::decode(&body).map_err(EngineError::ServerProtocol)?;
                    return Err(EngineError::Database(fields));
                }
                READY_FOR_QUERY_TAG => {
                    let status = backend::decode_ready_for_query(&body)
                        .map_err(EngineError::ServerProtocol)?;
                    let meta = std::rc::Rc::new(ServerMeta {
                        addr,
                        backend_pid: cancel.as_ref().map_or(0, |c| c.key.process_id),
                        connected: std::time::SystemTime::now(),
                    });
                    return Ok(ServerConn {
                        meta,
                        stream,
                        buf: IoBuf::with_capacity(crate::buf::DEFAULT_CAP),
                        walked: 0,
                        walker: Walker::default(),
                        cancel,
                        login_params,
                        status,
                        generation: 0,
                        prepared: crate::prepared::ServerStmts::default(),
                        defaults: params.clone(),
                        params: ServerParams::new(params),
                    });
                }
                // NoticeResponse, NegotiateProtocolVersion: nothing to do.
                _ => {}
            }
        }
    }

    /// True when the connection sits idle with nothing unsent or unread.
    pub fn is_clean(&self) -> bool {
        self.status == b'I' && self.buf.is_empty() && self.walker.at_boundary()
    }

    /// Before reuse: drains whatever the server sent while the connection was
    /// idle in the pool (notices, notifications, or a FATAL error before it
    /// closed). False if the connection is dead or unusable.
    pub fn check_idle(&mut self) -> bool {
        loop {
            // Straight into the buffer's tail: no scratch to zero per checkout.
            match self.stream.try_read_now(self.buf.spare(2048)) {
                Ok(None) => return true,
                Ok(Some(0)) | Err(_) => return false,
                Ok(Some(n)) => self.buf.filled(n),
            }
            // Only asynchronous messages may arrive while idle: notices,
            // notifications, parameter changes. Anything else, or an error,
            // means the connection is not fit for a new client.
            let mut ok = true;
            let bytes = self.buf.bytes();
            let walked = self.walker.walk(
                bytes,
                |_, _| true,
                |seen| {
                    if !matches!(seen.tag, b'N' | b'A' | b'S') {
                        ok = false;
                    }
                    wire::frame::Flow::Continue
                },
            );
            match walked {
                Ok(n) => self.buf.consume(n),
                Err(_) => return false,
            }
            if !ok {
                return false;
            }
        }
    }

    /// Runs simple queries one after another (all sent at once) and waits for
    /// their ReadyForQuery; used to reset a connection. Returns the final status.
    pub async fn run_simple(
        &mut self,
        sqls: &[&str],
        timeout: Duration,
    ) -> Result<u8, EngineError> {
        let fut = async {
            let mut out = BytesMut::new();
            for sql in sqls {
                frontend::encode_query(sql, &mut out);
            }
            self.stream
                .write_all(&out)
                .await
                .map_err(EngineError::ServerIo)?;
            let mut pending = sqls.len();
            let mut inbuf = BytesMut::new();
            // Carry over anything unread.
            inbuf.put_slice(self.buf.bytes());
            self.buf.clear();
            let mut error = None;
            while pending > 0 {
                let (tag, body) =
                    read_frame(&mut self.stream, &mut inbuf, wire::frame::MAX_FRAME_LEN).await?;
                match tag {
                    PARAMETER_STATUS_TAG => {
                        if let Ok((k, v)) = backend::decode_parameter_status(&body) {
                            self.params.insert(k.to_string(), v.to_string());
                        }
                    }
                    READY_FOR_QUERY_TAG => {
                        pending -= 1;
                        self.status = backend::decode_ready_for_query(&body)
                            .map_err(EngineError::ServerProtocol)?;
                    }
                    ERROR_RESPONSE_TAG => {
                        error = ErrorFields::decode(&body).ok();
                    }
                    _ => {}
                }
            }
            if !inbuf.is_empty() {
                return Err(EngineError::ServerProtocol(wire::WireError::Protocol(
                    "unexpected bytes after reset".into(),
                )));
            }
            if sqls.iter().any(|s| s.eq_ignore_ascii_case("DISCARD ALL")) {
                self.prepared.clear();
                self.params.reset_to(&self.defaults);
            }
            match error {
                Some(fields) => Err(EngineError::Database(fields)),
                None => Ok(self.status),
            }
        };
        match glommio::timer::timeout(timeout, async { Ok(fut.await) }).await {
            Ok(r) => r,
            Err(_) => Err(EngineError::Timeout("resetting a server connection")),
        }
    }

    /// Runs one parameterized query (extended protocol, text format) and
    /// returns its first row; used for `auth_query`.
    pub async fn query_row(
        &mut self,
        sql: &str,
        params: &[&str],
        timeout: Duration,
    ) -> Result<Option<Vec<Option<Vec<u8>>>>, EngineError> {
        let fut = async {
            let mut out = BytesMut::new();
            frontend::encode_parse(b"", sql.as_bytes(), &[], &mut out);
            let values: Vec<Option<&[u8]>> = params.iter().map(|p| Some(p.as_bytes())).collect();
            frontend::encode_bind(b"", b"", &[], &values, &[], &mut out)
                .map_err(EngineError::ServerProtocol)?;
            frontend::encode_execute(b"", 0, &mut out);
            frontend::encode_sync(&mut out);
            self.stream
                .write_all(&out)
                .await
                .map_err(EngineError::ServerIo)?;
            let mut inbuf = BytesMut::new();
            inbuf.put_slice(self.buf.bytes());
            self.buf.clear();
            let mut row = None;
            let mut error = None;
            loop {
                let (tag, body) =
                    read_frame(&mut self.stream, &mut inbuf, wire::frame::MAX_FRAME_LEN).await?;
                match tag {
                    b'D' if row.is_none() => row = Some(decode_data_row(&body)?),
                    ERROR_RESPONSE_TAG => error = ErrorFields::decode(&body).ok(),
                    READY_FOR_QUERY_TAG => {
                        self.status = backend::decode_ready_for_query(&body)
                            .map_err(EngineError::ServerProtocol)?;
                        break;
                    }
                    _ => {}
                }
            }
            match error {
                Some(fields) => Err(EngineError::Database(fields)),
                None => Ok(row),
            }
        };
        match glommio::timer::timeout(timeout, async { Ok(fut.await) }).await {
            Ok(r) => r,
            Err(_) => Err(EngineError::Timeout("running auth_query")),
        }
    }

    /// Sends Terminate and closes.
    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        frontend::encode_terminate(&mut out);
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::ServerParams;
    use crate::settings::Settings;
    use std::rc::Rc;

    #[test]
    fn params_forget_their_match_when_changed() {
        let client: Rc<Settings> = Rc::new([("DateStyle", "ISO")].into_iter().collect());
        let twin: Rc<Settings> = Rc::new([("DateStyle", "ISO")].into_iter().collect());
        let other: Rc<Settings> = Rc::new([("DateStyle", "German")].into_iter().collect());
        let mut params = ServerParams::new(Default::default());
        assert!(!params.synced_with(&client), "nothing matched yet");
        params.mark_synced(&client);
        assert!(params.synced_with(&client));
        assert!(params.synced_with(&twin), "equal settings match too");
        assert!(!params.synced_with(&other));
        params.insert("TimeZone".into(), "UTC".into());
        assert!(!params.synced_with(&client), "insert forgets");
        params.mark_synced(&client);
        params.remove("TimeZone");
        assert!(!params.synced_with(&client), "remove forgets");
        params.mark_synced(&client);
        params.reset_to(&Default::default());
        assert!(!params.synced_with(&client), "reset forgets");
    }
}
