//! The PostgreSQL protocol over WebSocket (issue 14): the real `@neondatabase/serverless` driver
//! (`tests/drivers/node/neon_suite.js`) through both modes, over ws:// and wss://, and raw
//! WebSocket clients for the cleartext rule, framing corners and hostile input.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::websocket::frame::{
    encode_client_frame, parse_header, CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
};

use crate::basic::wait_output;
use crate::harness::*;

/// A whole driver suite run (each check bounds itself at 30 s).
const SUITE_DEADLINE: Duration = Duration::from_secs(240);
/// Clients the driver suite opens at once.
const SUITE_CLIENTS: u32 = 40;

fn ws_pooler(tenants: Vec<TenantCfg>, extra: &str) -> Pooler {
    ws_pooler_with(tenants, extra, "")
}

/// `proxy` lines go inside `[proxy]`, `extra` after the rest.
fn ws_pooler_with(tenants: Vec<TenantCfg>, extra: &str, proxy: &str) -> Pooler {
    let mut cfg = PoolerConfig::tenants(tenants);
    cfg.websocket = true;
    cfg.extra_toml = extra.to_string();
    cfg.proxy_toml = proxy.to_string();
    Pooler::start(&cfg)
}

fn ws_addr(p: &Pooler) -> SocketAddr {
    p.websocket.expect("the pooler has a WebSocket listener")
}

/// Runs `neon_suite.js` with `env`; panics with its output unless every check passed. Returns
/// its stdout.
fn neon_suite(env: &[(&str, String)]) -> String {
    node_script("neon_suite.js", env)
}

/// Runs a script of `tests/drivers/node`; panics with its output unless every check passed.
fn node_script(script: &str, env: &[(&str, String)]) -> String {
    let (ok, stdout, stderr) = run_node(script, env);
    assert!(
        ok && stdout.contains(" passed, 0 failed"),
        "{script} {env:?} failed:\n{stdout}\n--- stderr ---\n{stderr}"
    );
    println!("{script} {env:?}:\n{stdout}");
    stdout
}

/// Runs `neon_suite.js`: (exited 0, stdout, stderr).
fn run_neon_suite(env: &[(&str, String)]) -> (bool, String, String) {
    run_node("neon_suite.js", env)
}

/// Runs a script of `tests/drivers/node` with `env`: (exited 0, stdout, stderr).
fn run_node(script: &str, env: &[(&str, String)]) -> (bool, String, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("tests/drivers/node");
    assert!(
        dir.join("node_modules/@neondatabase/serverless").is_dir()
            && dir.join("node_modules/ws").is_dir(),
        "@neondatabase/serverless and ws are not installed: run (cd tests/drivers/node && npm ci)"
    );
    let mut cmd = Command::new("node");
    cmd.arg(dir.join(script))
        .current_dir(&dir)
        .env("SUITE_CLIENTS", SUITE_CLIENTS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "NODE_EXTRA_CA_CERTS",
        "WS_QUERY",
        "ONLY",
        "SECURE",
        "PIPELINE",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGPASSWORD",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start node: {e} (bash .ci/run installs it)"));
    let out = wait_output(child, SUITE_DEADLINE, script);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The driver's connection string: its host:port goes to the pooler as `address=`.
fn database_url(user: &str, port: u16) -> String {
    format!("postgres://{user}:{PG_PASSWORD}@localhost:{port}/postgres")
}

/// Transaction mode, picked by the transaction port in the connection string: every check with
/// 40 concurrent clients over a pool of 2 server connections (two shards, so clients are handed
/// from the accepting shard to the tenant's).
#[test]
fn neon_driver_transaction_mode() {
    let p = ws_pooler(vec![TenantCfg::new("t1", vec![UserCfg::postgres(2)])], "");
    let out = neon_suite(&[
        ("WS_HOST", ws_addr(&p).to_string()),
        (
            "DATABASE_URL",
            database_url("postgres.t1", p.transaction.port()),
        ),
        ("EXPECT_MODE", "transaction".into()),
        ("POOL_SIZE", "2".into()),
    ]);
    assert!(out.contains("ok   cancel_a_running_query"), "{out}");
}

/// Session mode, picked by the session port in the connection string.
#[test]
fn neon_driver_session_mode() {
    let mut user = UserCfg::postgres(50);
    user.mode_type = "session";
    let p = ws_pooler(vec![TenantCfg::new("t2", vec![user])], "");
    neon_suite(&[
        ("WS_HOST", ws_addr(&p).to_string()),
        (
            "DATABASE_URL",
            database_url("postgres.t2", p.session.port()),
        ),
        ("EXPECT_MODE", "session".into()),
    ]);
}

/// `mode=` in the URL wins over the address port; without pipelining the driver answers the
/// pooler's cleartext request as usual.
#[test]
fn neon_driver_mode_parameter_and_unpipelined_login() {
    let p = ws_pooler(vec![TenantCfg::new("t1", vec![UserCfg::postgres(4)])], "");
    for (query, mode, pipeline) in [
        ("mode=session", "session", "password"),
        ("mode=transaction", "transaction", "false"),
    ] {
        neon_suite(&[
            ("WS_HOST", ws_addr(&p).to_string()),
            // The session port in the address, overridden by the parameter (and the other way).
            ("DATABASE_URL", database_url("postgres.t1", if mode == "session" { p.transaction.port() } else { p.session.port() })),
            ("WS_QUERY", query.into()),
            ("EXPECT_MODE", mode.into()),
            ("PIPELINE", pipeline.into()),
            ("ONLY", "client_queries_parameters_and_errors,mode_is_the_expected_one,wrong_password_is_refused".into()),
        ]);
    }
}

/// wss:// with the `[tls]` certificate: the driver verifies it (NODE_EXTRA_CA_CERTS) and logs in
/// with its pipelined cleartext password although no plain address is trusted.
#[test]
fn neon_driver_over_wss() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = crate::tls_tests::pki(&["localhost", "127.0.0.1"]);
    let cert = crate::tls_tests::write(dir.path(), "server.crt", &pki.cert_pem);
    let key = crate::tls_tests::write(dir.path(), "server.key", &pki.key_pem);
    let ca = crate::tls_tests::write(dir.path(), "ca.crt", &pki.ca_pem);
    let p = ws_pooler_with(
        vec![TenantCfg::new("t1", vec![UserCfg::postgres(2)])],
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
        "websocket_cleartext_allow = []",
    );
    neon_suite(&[
        ("WS_HOST", format!("localhost:{}", ws_addr(&p).port())),
        ("DATABASE_URL", database_url("postgres.t1", p.transaction.port())),
        ("EXPECT_MODE", "transaction".into()),
        ("POOL_SIZE", "2".into()),
        ("SECURE", "1".into()),
        ("NODE_EXTRA_CA_CERTS", ca.display().to_string()),
        ("ONLY", "client_queries_parameters_and_errors,transactions_commit_and_roll_back,many_clients_at_once,wrong_password_is_refused".into()),
    ]);
}

/// Plain ws:// from an address that is not trusted: the pooler asks for SCRAM, which the driver
/// does when it does not pipeline its login; a pipelined cleartext password is refused.
#[test]
fn neon_driver_scram_over_untrusted_plain_ws() {
    let p = ws_pooler_with(
        vec![TenantCfg::new("t1", vec![UserCfg::postgres(2)])],
        "",
        "websocket_cleartext_allow = [\"10.255.255.0/24\"]",
    );
    let env = |pipeline: &str| {
        vec![
            ("WS_HOST", ws_addr(&p).to_string()),
            (
                "DATABASE_URL",
                database_url("postgres.t1", p.transaction.port()),
            ),
            ("PIPELINE", pipeline.to_string()),
            (
                "ONLY",
                "client_queries_parameters_and_errors,wrong_password_is_refused".to_string(),
            ),
        ]
    };
    neon_suite(&env("false"));
    let (ok, stdout, stderr) = run_neon_suite(&env("password"));
    assert!(
        !ok,
        "a pipelined cleartext password must not log in over untrusted ws://\n{stdout}"
    );
    assert!(
        stdout.contains("FAIL client_queries_parameters_and_errors") && stdout.contains("08P01"),
        "{stdout}\n--- stderr ---\n{stderr}"
    );
}

/// Hostile and unusual clients built with the `ws` package (`tests/drivers/node/ws_hostile.js`):
/// a text frame, a fragmented message with a ping inside, close-code echo, garbage and a wrong
/// password inside good frames, an old protocol version and an unknown mode.
#[test]
fn ws_package_hostile_clients() {
    let p = ws_pooler(vec![TenantCfg::new("t1", vec![UserCfg::postgres(2)])], "");
    let out = node_script(
        "ws_hostile.js",
        &[
            ("WS_HOST", ws_addr(&p).to_string()),
            ("PGUSER", "postgres.t1".into()),
            ("PGPASSWORD", PG_PASSWORD.into()),
        ],
    );
    assert!(out.contains("6 passed, 0 failed"), "{out}");
}

/// Rewrites `[proxy] websocket_cleartext_allow` and reloads (SIGHUP); returns once a raw client
/// sees the new rule. `[]`: no plain ws:// address is trusted.
fn set_cleartext_allow(p: &Pooler, list: &str) {
    let path = &p.config_path;
    let text = std::fs::read_to_string(path).expect("read config");
    let text = text.replacen(
        "[proxy]\n",
        &format!("[proxy]\nwebsocket_cleartext_allow = {list}\n"),
        1,
    );
    std::fs::write(path, text).expect("write config");
    p.signal(libc::SIGHUP);
}

// ----- raw WebSocket clients ------------------------------------------------------------------

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const MASK: [u8; 4] = [0x5A, 0xC3, 0x0F, 0x96];

fn upgrade_request(target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
}

/// A frame from the pooler.
#[derive(Debug)]
struct Frame {
    fin: bool,
    op: u8,
    payload: Vec<u8>,
}

impl Frame {
    fn close_code(&self) -> u16 {
        assert_eq!(self.op, OP_CLOSE, "{self:?}");
        u16::from_be_bytes([self.payload[0], self.payload[1]])
    }

    fn close_reason(&self) -> String {
        String::from_utf8_lossy(&self.payload[2..]).to_string()
    }
}

struct RawWs {
    s: TcpStream,
    rbuf: Vec<u8>,
    /// Protocol bytes from binary frames, not yet taken as messages.
    pg: BytesMut,
}

impl RawWs {
    async fn connect(addr: SocketAddr, target: &str) -> RawWs {
        let mut s = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        s.set_nodelay(true).unwrap();
        s.write_all(upgrade_request(target).as_bytes())
            .await
            .unwrap();
        let mut ws = RawWs {
            s,
            rbuf: Vec::new(),
            pg: BytesMut::new(),
        };
        let head = ws.read_http_head().await;
        assert!(
            head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{head}"
        );
        ws
    }

    async fn read_http_head(&mut self) -> String {
        loop {
            if let Some(end) = wire::websocket::handshake::head_end(&self.rbuf) {
                let head: Vec<u8> = self.rbuf.drain(..end).collect();
                return String::from_utf8_lossy(&head).to_string();
            }
            assert!(
                self.fill().await > 0,
                "closed before the HTTP answer: {:?}",
                self.rbuf
            );
        }
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16384];
        let n = within("read", self.s.read(&mut chunk)).await.unwrap_or(0);
        self.rbuf.extend_from_slice(&chunk[..n]);
        n
    }

    async fn send(&mut self, fin: bool, op: u8, payload: &[u8]) {
        let mut out = Vec::new();
        encode_client_frame(fin, op, payload, MASK, &mut out);
        self.s.write_all(&out).await.unwrap();
    }

    /// The next frame, or `None` at end of stream.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(h) = parse_header(&self.rbuf).expect("a valid server frame") {
                assert!(h.mask.is_none(), "server frames are not masked");
                let end = h.header_len + h.len as usize;
                if self.rbuf.len() >= end {
                    let payload = self.rbuf[h.header_len..end].to_vec();
                    self.rbuf.drain(..end);
                    return Some(Frame {
                        fin: h.fin,
                        op: h.opcode,
                        payload,
                    });
                }
            }
            if self.fill().await == 0 {
                assert!(self.rbuf.is_empty(), "stream ended inside a frame");
                return None;
            }
        }
    }

    /// The next PostgreSQL message (tag, body) from binary frames; control frames are returned
    /// as an error.
    async fn message(&mut self) -> Result<(u8, Vec<u8>), Frame> {
        loop {
            if self.pg.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.pg[1], self.pg[2], self.pg[3], self.pg[4]]) as usize;
                if self.pg.len() > len {
                    let m = self.pg.split_to(len + 1);
                    return Ok((m[0], m[5..].to_vec()));
                }
            }
            match self.frame().await {
                Some(f) if f.op == OP_BINARY || f.op == OP_CONTINUATION => {
                    self.pg.extend_from_slice(&f.payload)
                }
                Some(f) => return Err(f),
                None => panic!("end of stream while waiting for a message"),
            }
        }
    }

    /// Messages up to ReadyForQuery.
    async fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        loop {
            let m = self
                .message()
                .await
                .unwrap_or_else(|f| panic!("control frame {f:?}"));
            let done = m.0 == b'Z';
            got.push(m);
            if done {
                return got;
            }
        }
    }

    /// The close frame that ends the stream, and then the end of stream itself.
    async fn expect_close(&mut self) -> Frame {
        let f = loop {
            match self.frame().await {
                Some(f) if f.op == OP_CLOSE => break f,
                Some(f) if f.op == OP_BINARY => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert!(
            self.frame().await.is_none(),
            "nothing after the close frame"
        );
        f
    }
}

fn startup(user: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    wire::startup::encode_startup(&[("user", user), ("database", "postgres")], &mut b);
    b.to_vec()
}

fn password(pw: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    wire::frontend::encode_password(pw.as_bytes(), &mut b);
    b.to_vec()
}

fn query(sql: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    wire::frontend::encode_query(sql, &mut b);
    b.to_vec()
}

/// The authentication request code of an `R` message.
fn auth_code(m: &(u8, Vec<u8>)) -> i32 {
    assert_eq!(
        m.0, b'R',
        "expected an authentication request, got {:?}",
        m.0 as char
    );
    i32::from_be_bytes([m.1[0], m.1[1], m.1[2], m.1[3]])
}

/// SQLSTATE of an ErrorResponse body.
fn sqlstate(body: &[u8]) -> String {
    wire::backend::ErrorFields::decode(body)
        .expect("ErrorResponse")
        .code()
        .unwrap_or_default()
        .to_string()
}

/// The first DataRow's first column of a simple query's answer.
fn first_value(msgs: &[(u8, Vec<u8>)]) -> String {
    let (_, row) = msgs.iter().find(|m| m.0 == b'D').expect("a DataRow");
    let len = i32::from_be_bytes([row[2], row[3], row[4], row[5]]) as usize;
    String::from_utf8_lossy(&row[6..6 + len]).to_string()
}

/// Loopback clients over plain ws:// get a cleartext password request (the default trust);
/// with no address trusted they get SCRAM, which a pipelined cleartext password cannot answer.
#[tokio::test]
async fn cleartext_only_over_tls_or_from_trusted_addresses() {
    let p = ws_pooler(vec![TenantCfg::new("t1", vec![UserCfg::postgres(2)])], "");
    let addr = ws_addr(&p);
    // The driver's pipelined flight in one frame: startup, password, first query.
    let mut ws = RawWs::connect(addr, "/v2?address=db:1").await;
    let flight = [
        startup("postgres.t1"),
        password(PG_PASSWORD),
        query("SELECT 'pipelined'"),
    ]
    .concat();
    ws.send(true, OP_BINARY, &flight).await;
    let login = ws.until_ready().await;
    assert_eq!(auth_code(&login[0]), 3, "AuthenticationCleartextPassword");
    assert_eq!(auth_code(&login[1]), 0, "AuthenticationOk");
    assert!(login.iter().any(|m| m.0 == b'K'), "BackendKeyData");
    let answer = ws.until_ready().await;
    assert_eq!(first_value(&answer), "pipelined");

    set_cleartext_allow(&p, "[]");
    // The reload is applied when a new client sees SCRAM.
    let start = Instant::now();
    let mut ws = loop {
        let mut ws = RawWs::connect(addr, "/v2").await;
        ws.send(true, OP_BINARY, &startup("postgres.t1")).await;
        let m = ws.message().await.expect("a message");
        if auth_code(&m) == 10 {
            assert!(String::from_utf8_lossy(&m.1).contains("SCRAM-SHA-256"));
            break ws;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the reload never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A cleartext password where a SASL response is due: refused as a protocol violation.
    ws.send(true, OP_BINARY, &password(PG_PASSWORD)).await;
    let (tag, body) = ws.message().await.expect("an error");
    assert_eq!(tag, b'E');
    assert_eq!(sqlstate(&body), "08P01");
    assert_eq!(ws.expect_close().await.close_code(), CLOSE_NORMAL);
}

/// In a cluster, a WebSocket client whose pool another node owns is proxied there with its
/// permission to log in with a cleartext password: the driver's pipelined login works through
/// every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cleartext_login_proxied_to_the_pool_owner() {
    use crate::cluster_tests::{agreed_owner, tenant_with_role, until_serves, Cluster};
    let cluster = Cluster::start();
    let apis: Vec<SocketAddr> = (1..=3).map(|i| cluster.pooler(i).api).collect();
    let id = unique("wsc");
    let (role, pw) = tenant_with_role(apis[0], &id).await;
    let user = format!("{role}.{id}");
    // A first client through node 1 makes node 1 the pool's owner.
    until_serves(cluster.pooler(1).transaction, &user, &pw, "node 1").await;
    let owner = agreed_owner(&apis, &format!("{id}/{role}/transaction"), None).await;
    assert_eq!(owner, 1);
    for node in [2, 3] {
        let addr = ws_addr(cluster.pooler(node));
        let start = Instant::now();
        let answer = loop {
            let mut ws = RawWs::connect(addr, "/v2?address=db:1").await;
            let sql = format!("SELECT 'through node {node}'");
            ws.send(
                true,
                OP_BINARY,
                &[startup(&user), password(&pw), query(&sql)].concat(),
            )
            .await;
            let mut login = Vec::new();
            loop {
                let m = ws
                    .message()
                    .await
                    .unwrap_or_else(|f| panic!("control frame {f:?}"));
                let end = m.0 == b'Z' || m.0 == b'E';
                login.push(m);
                if end {
                    break;
                }
            }
            if login.iter().any(|m| m.0 == b'E') {
                // The tenant has not reached this node yet.
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "node {node}: {login:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            assert_eq!(
                auth_code(&login[0]),
                3,
                "node {node}: cleartext asked by the owner"
            );
            break ws.until_ready().await;
        };
        assert_eq!(first_value(&answer), format!("through node {node}"));
    }
    assert_eq!(
        agreed_owner(&apis, &format!("{id}/{role}/transaction"), None).await,
        1
    );
}

/// Without a tenant in the user name, the host the driver names in `address=` routes like a TLS
/// SNI host (its first label, without regard to case).
#[tokio::test]
async fn tenant_from_the_address_host() {
    let p = ws_pooler(vec![TenantCfg::new("t1", vec![UserCfg::postgres(2)])], "");
    let addr = ws_addr(&p);
    let mut ws = RawWs::connect(addr, "/v2?address=T1.db.example.com:6543").await;
    let flight = [
        startup("postgres"),
        password(PG_PASSWORD),
        query("SELECT 'routed'"),
    ]
    .concat();
    ws.send(true, OP_BINARY, &flight).await;
    ws.until_ready().await;
    assert_eq!(first_value(&ws.until_ready().await), "routed");
    let mut ws = RawWs::connect(addr, "/v2?address=nosuch.db.example.com:6543").await;
    ws.send(true, OP_BINARY, &startup("postgres")).await;
    let (tag, body) = ws.message().await.expect("an ErrorResponse");
    assert_eq!((tag, sqlstate(&body)), (b'E', "28000".to_string()));
}

/// A message split over a fragmented WebSocket message with control frames in between, a
/// query split over many tiny frames, answers that come back as binary frames, ping/pong, and
/// the close handshake; then the server connection serves the next client.
#[tokio::test]
async fn fragments_pings_and_the_close_handshake() {
    let p = ws_pooler(vec![TenantCfg::new("t1", vec![UserCfg::postgres(1)])], "");
    let addr = ws_addr(&p);
    let mut ws = RawWs::connect(addr, "/?address=x:1&mode=transaction").await;
    let s = startup("postgres.t1");
    let (a, rest) = s.split_at(3);
    let (b, c) = rest.split_at(rest.len() / 2);
    ws.send(false, OP_BINARY, a).await;
    ws.send(true, OP_PING, b"mid-message").await;
    ws.send(false, OP_CONTINUATION, b).await;
    ws.send(true, OP_PONG, b"unasked").await;
    ws.send(true, OP_CONTINUATION, c).await;
    let pong = ws.message().await.expect_err("the pong comes first");
    assert_eq!(
        (pong.op, pong.fin, &pong.payload[..]),
        (OP_PONG, true, &b"mid-message"[..])
    );
    assert_eq!(auth_code(&ws.message().await.unwrap()), 3);
    ws.send(true, OP_BINARY, &password(PG_PASSWORD)).await;
    ws.until_ready().await;
    let q = query("SELECT string_agg(i::text, ',') FROM generate_series(1, 3) i");
    for chunk in q.chunks(2) {
        ws.send(true, OP_BINARY, chunk).await;
    }
    let answer = ws.until_ready().await;
    assert_eq!(first_value(&answer), "1,2,3");
    // An idle client still answers pings.
    ws.send(true, OP_PING, b"").await;
    let pong = ws.frame().await.expect("pong");
    assert_eq!((pong.op, pong.payload.len()), (OP_PONG, 0));
    // The close handshake: our close is answered with the same code, then the stream ends.
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    ws.send(true, OP_CLOSE, &close).await;
    assert_eq!(ws.expect_close().await.close_code(), CLOSE_NORMAL);
    // pool_size 1: the server connection came back.
    let mut next = RawWs::connect(addr, "/").await;
    next.send(
        true,
        OP_BINARY,
        &[
            startup("postgres.t1"),
            password(PG_PASSWORD),
            query("SELECT 2"),
        ]
        .concat(),
    )
    .await;
    next.until_ready().await;
    assert_eq!(first_value(&next.until_ready().await), "2");
}

/// Framing violations get a close frame whose code and reason say what was wrong, then the end
/// of the stream; the pooler goes on serving others.
#[tokio::test]
async fn framing_violations_are_closed_with_a_reason() {
    let p = ws_pooler(vec![TenantCfg::new("t1", vec![UserCfg::postgres(2)])], "");
    let addr = ws_addr(&p);
    let unmasked = [0x82u8, 0x05, 1, 2, 3, 4, 5].to_vec();
    let mut oversized = vec![0x82u8, 0x80 | 127];
    oversized.extend_from_slice(&(1u64 << 40).to_be_bytes());
    oversized.extend_from_slice(&MASK);
    oversized.extend_from_slice(&[0u8; 1000]);
    let mut text = Vec::new();
    encode_client_frame(true, OP_TEXT, b"SELECT 1", MASK, &mut text);
    let mut orphan = Vec::new();
    encode_client_frame(true, OP_CONTINUATION, b"x", MASK, &mut orphan);
    let mut reserved = Vec::new();
    encode_client_frame(true, OP_BINARY, b"x", MASK, &mut reserved);
    reserved[0] |= 0x40;
    let cases: [(&str, Vec<u8>, u16, &str); 5] = [
        ("unmasked", unmasked, CLOSE_PROTOCOL_ERROR, "must be masked"),
        (
            "oversized",
            oversized,
            CLOSE_TOO_BIG,
            "larger than the pooler accepts",
        ),
        (
            "text",
            text,
            CLOSE_UNSUPPORTED_DATA,
            "text frames are not accepted",
        ),
        (
            "continuation",
            orphan,
            CLOSE_PROTOCOL_ERROR,
            "continuation frame",
        ),
        (
            "reserved bits",
            reserved,
            CLOSE_PROTOCOL_ERROR,
            "reserved bits",
        ),
    ];
    for (what, bytes, code, reason) in cases {
        for logged_in in [false, true] {
            let mut ws = RawWs::connect(addr, "/").await;
            if logged_in {
                ws.send(
                    true,
                    OP_BINARY,
                    &[startup("postgres.t1"), password(PG_PASSWORD)].concat(),
                )
                .await;
                ws.until_ready().await;
            }
            ws.s.write_all(&bytes).await.unwrap();
            let close = ws.expect_close().await;
            assert_eq!(close.close_code(), code, "{what} (logged in: {logged_in})");
            assert!(
                close.close_reason().contains(reason),
                "{what}: {:?}",
                close.close_reason()
            );
        }
    }
    // A PostgreSQL frame inside a good WebSocket frame is checked like one over TCP.
    let mut ws = RawWs::connect(addr, "/").await;
    let mut huge_startup = (1u32 << 30).to_be_bytes().to_vec();
    huge_startup.extend_from_slice(&196608u32.to_be_bytes());
    ws.send(true, OP_BINARY, &huge_startup).await;
    let (tag, body) = ws.message().await.expect("an ErrorResponse");
    assert_eq!((tag, sqlstate(&body)), (b'E', "08P01".to_string()));
    assert_eq!(ws.expect_close().await.close_code(), CLOSE_NORMAL);
    // Garbage after login: 08P01 too.
    let mut ws = RawWs::connect(addr, "/").await;
    ws.send(
        true,
        OP_BINARY,
        &[startup("postgres.t1"), password(PG_PASSWORD)].concat(),
    )
    .await;
    ws.until_ready().await;
    ws.send(true, OP_BINARY, &[b'Q', 0xFF, 0xFF, 0xFF, 0xFF, 0])
        .await;
    let (tag, body) = ws.message().await.expect("an ErrorResponse");
    assert_eq!((tag, sqlstate(&body)), (b'E', "08P01".to_string()));
    // Everyone else is served.
    let c = try_connect(p.transaction, "postgres.t1", PG_PASSWORD)
        .await
        .expect("TCP client");
    assert_eq!(
        c.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0),
        5
    );
    let mut ws = RawWs::connect(addr, "/").await;
    ws.send(
        true,
        OP_BINARY,
        &[
            startup("postgres.t1"),
            password(PG_PASSWORD),
            query("SELECT 6"),
        ]
        .concat(),
    )
    .await;
    ws.until_ready().await;
    assert_eq!(first_value(&ws.until_ready().await), "6");
}

/// Upgrades without the right headers get an HTTP error that says why; a client that sends its
/// upgrade slowly (or nothing) is closed by the startup timeout while others are served.
#[tokio::test]
async fn bad_and_slow_upgrades() {
    let mut cfg = PoolerConfig::single(2);
    cfg.websocket = true;
    cfg.client_startup_timeout = Some(1000);
    let p = Pooler::start(&cfg);
    let addr = ws_addr(&p);
    let ok = upgrade_request("/");
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            "400 Bad Request",
            "expected a WebSocket upgrade",
        ),
        (
            ok.replace("Version: 13", "Version: 8"),
            "426 Upgrade Required",
            "version 13",
        ),
        (
            ok.replacen("GET", "POST", 1),
            "405 Method Not Allowed",
            "GET",
        ),
        (ok.replace(KEY, "c2hvcnQ="), "400 Bad Request", "16 bytes"),
        (
            ok.replace("/ HTTP", "/?mode=statement HTTP"),
            "400 Bad Request",
            "mode must be",
        ),
        (
            format!("{ok}\u{82}\u{80}"),
            "400 Bad Request",
            "before the upgrade was answered",
        ),
        (
            format!("GET /{} HTTP/1.1\r\n", "a".repeat(9000)),
            "431",
            "larger than 8 KiB",
        ),
        (
            "\u{16}\u{3}\u{1} not a request\r\n\r\n".into(),
            "400 Bad Request",
            "malformed",
        ),
    ];
    for (req, status, reason) in cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        within("read the refusal", s.read_to_end(&mut answer))
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{req:?} -> {answer}"
        );
        assert!(answer.contains(reason), "{req:?} -> {answer}");
    }

    // Slowloris: a header byte every 100 ms, and a client that sends nothing.
    let started = Instant::now();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let slow_task = tokio::spawn(async move {
        for b in upgrade_request("/").bytes().cycle() {
            if slow.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        started.elapsed()
    });
    // Meanwhile a real client logs in and queries.
    let mut ws = RawWs::connect(addr, "/").await;
    ws.send(
        true,
        OP_BINARY,
        &[
            startup("postgres.t1"),
            password(PG_PASSWORD),
            query("SELECT 7"),
        ]
        .concat(),
    )
    .await;
    ws.until_ready().await;
    assert_eq!(first_value(&ws.until_ready().await), "7");
    let mut sink = [0u8; 64];
    let n = within("the silent client is closed", silent.read(&mut sink))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let closed_after = within("the slow client is closed", slow_task)
        .await
        .unwrap();
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(5),
        "slow upgrade closed after {closed_after:?} (startup timeout 1 s)"
    );
}

/// The WebSocket counters and the shard handoff: twenty logins (on two shards, so some are
/// handed to the tenant's shard with their framing state).
#[tokio::test]
async fn metrics_count_websocket_clients_across_the_handoff() {
    let p = ws_pooler(vec![TenantCfg::new("t1", vec![UserCfg::postgres(2)])], "");
    let addr = ws_addr(&p);
    let mut open = Vec::new();
    for i in 0..20 {
        let mut ws = RawWs::connect(addr, "/").await;
        ws.send(
            true,
            OP_BINARY,
            &[
                startup("postgres.t1"),
                password(PG_PASSWORD),
                query(&format!("SELECT {i}")),
            ]
            .concat(),
        )
        .await;
        ws.until_ready().await;
        assert_eq!(first_value(&ws.until_ready().await), i.to_string());
        open.push(ws);
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    within("refusal", s.read_to_end(&mut answer)).await.unwrap();
    let m = crate::metrics_tests::scrape_until(p.api, |m| {
        m.sum("supavisor_websocket_upgrades", &[]) >= 20.0
            && m.sum("supavisor_websocket_rejected", &[]) >= 1.0
    })
    .await;
    assert_eq!(
        m.sum("supavisor_websocket_upgrades", &[]),
        20.0,
        "{}",
        m.lines("websocket")
    );
    assert_eq!(
        m.sum("supavisor_websocket_rejected", &[]),
        1.0,
        "{}",
        m.lines("websocket")
    );
    assert_eq!(
        m.sum("supavisor_websocket_clients", &[]),
        20.0,
        "{}",
        m.lines("websocket")
    );
    assert!(
        m.sum("supavisor_shard_handoffs_in", &[]) > 0.0,
        "{}",
        m.lines("handoffs")
    );
    // Every handed-off client still works.
    for (i, ws) in open.iter_mut().enumerate() {
        ws.send(true, OP_BINARY, &query(&format!("SELECT {}", i * 2)))
            .await;
        assert_eq!(first_value(&ws.until_ready().await), (i * 2).to_string());
    }
    drop(open);
    let m = crate::metrics_tests::scrape_until(p.api, |m| {
        m.sum("supavisor_websocket_clients", &[]) == 0.0
    })
    .await;
    assert_eq!(
        m.sum("supavisor_websocket_clients", &[]),
        0.0,
        "{}",
        m.lines("websocket")
    );
}
