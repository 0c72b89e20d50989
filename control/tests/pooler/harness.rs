//! Shared test harness: one real PostgreSQL per test binary, one `supavisor` process per test.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use control::pgtemp::{PgOptions, TempPostgres};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

/// Password of the `postgres` superuser of the shared server, and of the pooler's users that map
/// to it.
pub const PG_PASSWORD: &str = "pooler-test-secret";
/// How long the pooler may take to print its ready line.
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// Upper bound for any single client operation through the pooler: a hang fails, never blocks.
pub const OP_DEADLINE: Duration = Duration::from_secs(30);

static PG: OnceLock<TempPostgres> = OnceLock::new();

extern "C" fn stop_shared_pg() {
    if let Some(pg) = PG.get() {
        pg.stop_immediate();
    }
}

/// The PostgreSQL shared by all tests of this binary, started on first use and stopped by an
/// `atexit` hook (statics are never dropped).
pub fn pg() -> &'static TempPostgres {
    PG.get_or_init(|| {
        let pg = TempPostgres::start_with(PgOptions {
            max_connections: 300,
            extra_conf: vec![],
            password: PG_PASSWORD.to_string(),
            ssl: None,
        })
        .expect("start the test PostgreSQL");
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe {
            libc::atexit(stop_shared_pg);
        }
        pg
    })
}

/// A name unique within this run, usable as an SQL identifier.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Await `fut` at most `OP_DEADLINE`, panicking with `what` on expiry.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(OP_DEADLINE, what, fut).await
}

pub async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Sends the client's cancel request to `addr` the way libpq's PQcancel does: the request,
/// then a wait until the pooler closes the connection, which it does once the database has
/// processed the request. tokio-postgres' `cancel_query` returns as soon as the request is
/// written, so a query sent right after it could still be hit by the cancel (PostgreSQL 15
/// signals the backend twice, pid then process group; a cancel process preempted between the
/// two lets the second SIGINT land on the next query of the same backend).
pub async fn cancel_and_wait(
    token: &tokio_postgres::CancelToken,
    addr: SocketAddr,
) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect for cancel: {e}"))?;
    token
        .cancel_query_raw(&mut s, NoTls)
        .await
        .map_err(|e| format!("send cancel: {e}"))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .await
        .map_err(|e| format!("waiting for the pooler to close the cancel connection: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "the pooler answered a cancel request with {rest:?}"
        ));
    }
    Ok(())
}

/// Poll `cond` every 50 ms until it holds, panicking after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > limit {
            panic!("condition not reached within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SQLSTATE of an error, if the error carries a server (or pooler) ErrorResponse.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// Assert that `r` failed with SQLSTATE `code`; returns the error message.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(r: Result<T, tokio_postgres::Error>, code: &str) -> String {
    match r {
        Ok(v) => panic!("expected error {code}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(
                sqlstate(&e).as_deref(),
                Some(code),
                "expected SQLSTATE {code}, got error: {e:?}"
            );
            e.as_db_error().unwrap().message().to_string()
        }
    }
}

/// A client and its connection task (whose result holds errors that arrived while idle).
pub struct Conn {
    pub client: Client,
    pub task: JoinHandle<Result<(), tokio_postgres::Error>>,
}

pub fn client_config(addr: SocketAddr, user: &str, password: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(addr.ip().to_string())
        .port(addr.port())
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(10));
    c
}

pub async fn connect_with(cfg: &tokio_postgres::Config) -> Result<Conn, tokio_postgres::Error> {
    let (client, connection) = within("connect", cfg.connect(NoTls)).await?;
    let task = tokio::spawn(connection);
    Ok(Conn { client, task })
}

pub async fn try_connect(
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> Result<Client, tokio_postgres::Error> {
    connect_with(&client_config(addr, user, password))
        .await
        .map(|c| c.client)
}

/// Connect as `postgres.t1` with the right password; panics on failure.
pub async fn connect(addr: SocketAddr) -> Client {
    match try_connect(addr, "postgres.t1", PG_PASSWORD).await {
        Ok(c) => c,
        Err(e) => panic!("connect to pooler at {addr} as postgres.t1: {e:?}"),
    }
}

/// A direct connection to the shared PostgreSQL (not through the pooler).
pub async fn direct() -> Client {
    let pg = pg();
    let addr: SocketAddr = format!("{}:{}", pg.host, pg.port).parse().unwrap();
    try_connect(addr, &pg.superuser, &pg.password)
        .await
        .expect("direct connection to PostgreSQL")
}

/// One `[[tenants.users]]` entry.
#[derive(Clone, Debug)]
pub struct UserCfg {
    pub db_user: String,
    pub db_password: String,
    pub pool_size: u32,
    pub mode_type: &'static str,
    pub max_clients: u32,
    pub pool_checkout_timeout: u64,
}

impl UserCfg {
    pub fn postgres(pool_size: u32) -> UserCfg {
        UserCfg {
            db_user: "postgres".into(),
            db_password: PG_PASSWORD.into(),
            pool_size,
            mode_type: "transaction",
            max_clients: 1000,
            // Bounded, so that a leaked server connection fails a test instead of hanging it.
            pool_checkout_timeout: 15_000,
        }
    }
}

/// One `[[tenants]]` entry, pointing at the shared PostgreSQL.
#[derive(Clone, Debug)]
pub struct TenantCfg {
    pub external_id: String,
    pub auth_type: &'static str,
    pub default_pool_size: u32,
    pub default_max_clients: u32,
    pub users: Vec<UserCfg>,
    /// Extra tenant TOML lines (before its users).
    pub extra_toml: String,
    /// Another database than the shared one: (host, port).
    pub db: Option<(String, u16)>,
}

impl TenantCfg {
    pub fn new(external_id: &str, users: Vec<UserCfg>) -> TenantCfg {
        TenantCfg {
            external_id: external_id.into(),
            auth_type: "scram-sha-256",
            default_pool_size: 15,
            default_max_clients: 1000,
            users,
            extra_toml: String::new(),
            db: None,
        }
    }
}

/// Secrets every test pooler runs with (env API_JWT_SECRET, METRICS_JWT_SECRET, VAULT_ENC_KEY).
pub const API_JWT_SECRET: &str = "test-api-jwt-secret-0123456789abcdef";
pub const METRICS_JWT_SECRET: &str = "test-metrics-jwt-secret-0123456789ab";
pub const VAULT_ENC_KEY: &str = "test-vault-key-0123456789abcdef01";

#[derive(Clone, Debug)]
pub struct PoolerConfig {
    pub shards: u32,
    pub shutdown_timeout: u64,
    pub tenants: Vec<TenantCfg>,
    /// The sled store directory; `None` = a fresh one inside the test's temp dir.
    /// Give the same path to two poolers (one after the other) to test persistence.
    pub store_dir: Option<PathBuf>,
    /// Extra TOML appended verbatim.
    pub extra_toml: String,
    /// `proxy.client_startup_timeout` (ms); `None` = the pooler's default.
    pub client_startup_timeout: Option<u64>,
    /// Start the WebSocket listener (on a free port, `Pooler::websocket`);
    /// off otherwise.
    pub websocket: bool,
    /// Extra TOML lines inside `[proxy]`.
    pub proxy_toml: String,
}

impl PoolerConfig {
    /// Tenant `t1` with the single user `postgres` of the given pool size.
    pub fn single(pool_size: u32) -> PoolerConfig {
        PoolerConfig::tenants(vec![TenantCfg::new(
            "t1",
            vec![UserCfg::postgres(pool_size)],
        )])
    }

    pub fn tenants(tenants: Vec<TenantCfg>) -> PoolerConfig {
        PoolerConfig {
            shards: 2,
            shutdown_timeout: 5000,
            tenants,
            store_dir: None,
            extra_toml: String::new(),
            client_startup_timeout: None,
            websocket: false,
            proxy_toml: String::new(),
        }
    }

    /// The config file a pooler with these addresses and store runs from.
    pub fn to_toml(
        &self,
        session: SocketAddr,
        transaction: SocketAddr,
        api: SocketAddr,
        store: &std::path::Path,
    ) -> String {
        self.to_toml_ws(session, transaction, api, None, store)
    }

    /// The same with a WebSocket listener (`None`: off).
    pub fn to_toml_ws(
        &self,
        session: SocketAddr,
        transaction: SocketAddr,
        api: SocketAddr,
        websocket: Option<SocketAddr>,
        store: &std::path::Path,
    ) -> String {
        let pg = pg();
        let mut s = String::new();
        let websocket = websocket.map(|w| w.to_string()).unwrap_or_default();
        writeln!(
            s,
            "[proxy]\nsession_addr = \"{session}\"\ntransaction_addr = \"{transaction}\"\n\
             websocket_addr = \"{websocket}\"\n{}\n\
             shards = {}\nshutdown_timeout = {}\n{}\n[api]\naddr = \"{api}\"\n\n[store]\npath = {:?}\n",
            self.proxy_toml,
            self.shards,
            self.shutdown_timeout,
            self.client_startup_timeout
                .map(|ms| format!("client_startup_timeout = {ms}\n"))
                .unwrap_or_default(),
            store.display().to_string()
        )
        .unwrap();
        s.push_str(&self.extra_toml);
        s.push('\n');
        for t in &self.tenants {
            let (host, port) = t.db.clone().unwrap_or((pg.host.clone(), pg.port));
            writeln!(
                s,
                "[[tenants]]\nexternal_id = {:?}\ndb_host = {:?}\ndb_port = {}\n\
                 db_database = \"postgres\"\ndefault_pool_size = {}\ndefault_max_clients = {}\n\
                 auth_type = {:?}\n{}\n",
                t.external_id,
                host,
                port,
                t.default_pool_size,
                t.default_max_clients,
                t.auth_type,
                t.extra_toml
            )
            .unwrap();
            for u in &t.users {
                writeln!(
                    s,
                    "[[tenants.users]]\ndb_user = {:?}\ndb_password = {:?}\npool_size = {}\n\
                     mode_type = {:?}\nmax_clients = {}\npool_checkout_timeout = {}\n",
                    u.db_user,
                    u.db_password,
                    u.pool_size,
                    u.mode_type,
                    u.max_clients,
                    u.pool_checkout_timeout
                )
                .unwrap();
            }
        }
        s
    }
}

/// A `supavisor` process run for one test. SIGTERM (then SIGKILL) by its own pid on drop; its
/// stderr is printed when the test is failing.
pub struct Pooler {
    child: Child,
    pub session: SocketAddr,
    pub transaction: SocketAddr,
    /// HTTP API and metrics.
    pub api: SocketAddr,
    /// The WebSocket listener (`PoolerConfig::websocket`).
    pub websocket: Option<SocketAddr>,
    /// The sled store directory in use.
    pub store_dir: PathBuf,
    /// The config file it was started with (rewrite it, then SIGHUP, to reload).
    pub config_path: PathBuf,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// A loopback address with a port free now and never handed out before in this test process:
/// the kernel can give the same ephemeral port to two binds in a row, and the pooler's
/// listeners (SO_REUSEPORT) would then share it (a session port that was also the API port).
pub fn free_addr() -> SocketAddr {
    loop {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port");
        if claim_port(addr.port()) {
            return addr;
        }
    }
}

/// Marks `port` as handed out; false if it was already.
pub fn claim_port(port: u16) -> bool {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    given.get_or_insert_with(HashSet::new).insert(port)
}

impl Pooler {
    /// Starts a pooler on free ports. A port found free can be taken by another test before
    /// the pooler binds it: a start that fails with "Address already in use" is retried on
    /// other ports.
    pub fn start(cfg: &PoolerConfig) -> Pooler {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Pooler::try_start_on(cfg, free_addr(), free_addr(), free_addr()) {
                Ok(p) => return p,
                Err(e) if attempt < 5 && e.contains("Address already in use") => {
                    eprintln!("pooler start: a port was taken meanwhile, retrying");
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Starts a pooler on given addresses (a second pooler on the ports of a first one, for a
    /// graceful restart: the listeners use SO_REUSEPORT). Its store is its own unless
    /// `cfg.store_dir` says otherwise.
    pub fn start_on(
        cfg: &PoolerConfig,
        session: SocketAddr,
        transaction: SocketAddr,
        api: SocketAddr,
    ) -> Pooler {
        Pooler::try_start_on(cfg, session, transaction, api).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_on(
        cfg: &PoolerConfig,
        session: SocketAddr,
        transaction: SocketAddr,
        api: SocketAddr,
    ) -> Result<Pooler, String> {
        pg();
        let dir = tempfile::Builder::new()
            .prefix("supavisor-test.")
            .tempdir()
            .expect("temp dir");
        let store_dir = cfg
            .store_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("store"));
        let config_path = dir.path().join("supavisor.toml");
        let websocket = cfg.websocket.then(free_addr);
        std::fs::write(
            &config_path,
            cfg.to_toml_ws(session, transaction, api, websocket, &store_dir),
        )
        .expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_supavisor"))
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("API_JWT_SECRET", API_JWT_SECRET)
            .env("METRICS_JWT_SECRET", METRICS_JWT_SECRET)
            .env("VAULT_ENC_KEY", VAULT_ENC_KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn supavisor");

        // Read stdout on a thread: the ready line goes to the channel, the rest is drained so
        // the pooler never blocks on (or dies of) a full or closed pipe.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<Result<String, String>>();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) if !sent && l.starts_with("supavisor ready") => {
                        let _ = tx.send(Ok(l));
                        sent = true;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(format!("reading stdout: {e}")));
                        return;
                    }
                }
            }
            if !sent {
                let _ = tx.send(Err("stdout closed before the ready line".into()));
            }
        });

        let mut pooler = Pooler {
            child,
            session,
            transaction,
            api,
            websocket,
            store_dir,
            config_path,
            stderr_path,
            _dir: dir,
        };
        let line = match rx.recv_timeout(READY_DEADLINE) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(pooler.failure(&format!("pooler did not become ready: {e}"))),
            Err(_) => {
                return Err(pooler.failure(&format!(
                    "pooler printed no ready line within {READY_DEADLINE:?}"
                )))
            }
        };
        let addr_of = |key: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|a| a.parse().ok())
        };
        match (addr_of("session="), addr_of("transaction=")) {
            (Some(s), Some(t)) => {
                pooler.session = s;
                pooler.transaction = t;
            }
            _ => return Err(pooler.failure(&format!("unparseable ready line: {line:?}"))),
        }
        Ok(pooler)
    }

    /// Why a start failed, with the pooler's stderr; the process is gone after it.
    fn failure(&mut self, why: &str) -> String {
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        format!(
            "{why} (exit status: {status:?})\n--- supavisor stderr ---\n{}",
            self.stderr()
        )
    }

    /// Both client-facing addresses, labelled.
    pub fn ports(&self) -> [(&'static str, SocketAddr); 2] {
        [("session", self.session), ("transaction", self.transaction)]
    }

    /// Resident memory of the pooler process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Descriptors the pooler process has open (`/proc/<pid>/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Times each of the pooler's threads has been scheduled in so far
    /// (`/proc/<pid>/task/<tid>/schedstat`, third field), by thread id, with
    /// the thread's name.
    pub fn thread_runs(&self) -> std::collections::HashMap<String, (String, u64)> {
        let mut out = std::collections::HashMap::new();
        let dir = format!("/proc/{}/task", self.child.id());
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let tid = e.file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(format!("{dir}/{tid}/comm")).unwrap_or_default();
            let runs = std::fs::read_to_string(format!("{dir}/{tid}/schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()));
            if let Some(runs) = runs {
                out.insert(tid, (comm.trim().to_string(), runs));
            }
        }
        out
    }

    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Rewrites the config file with `cfg` on this pooler's addresses and store (then send
    /// SIGHUP to reload it).
    pub fn write_config(&self, cfg: &PoolerConfig) {
        std::fs::write(
            &self.config_path,
            cfg.to_toml_ws(
                self.session,
                self.transaction,
                self.api,
                self.websocket,
                &self.store_dir,
            ),
        )
        .expect("write config");
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Send SIGTERM without waiting.
    pub fn signal_term(&self) {
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }

    /// SIGKILL, no drain: for crash-persistence tests.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status, if the process has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Send SIGTERM and wait (bounded) for exit; returns the exit status.
    /// Waits (without signalling) until the pooler exits; panics after `limit`.
    pub async fn exited_within(&mut self, limit: Duration, what: &str) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.exit_status() {
                return st;
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not exited within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(st);
        }
        self.signal_term();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Pooler {
    fn drop(&mut self) {
        if self.terminate(Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- supavisor stderr ({}) ---\n{}\n--- end supavisor stderr ---",
                self.stderr_path.display(),
                self.stderr()
            );
        }
    }
}

/// A small deterministic PRNG (xorshift64*), enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Run a PostgreSQL client program of the test server's version (`psql`, `pgbench`).
pub fn pg_program(name: &str) -> Command {
    let mut c = Command::new(
        TempPostgres::bindir()
            .expect("PostgreSQL bindir")
            .join(name),
    );
    c.env("PGPASSWORD", PG_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .env_remove("PGHOST")
        .env_remove("PGPORT");
    c
}
