//! Named prepared statements and session parameters with real drivers (issue 4).
//!
//! The suites under `tests/drivers/` (psycopg 3, asyncpg, node-postgres, pgJDBC) open many
//! connections at once over a pool of 2 server connections, so that a statement prepared on
//! one server connection is used on another. Each suite runs three ways:
//! - `direct`: straight against PostgreSQL, which proves the suite itself right;
//! - `session`: through the session port (tenant `t2`, a pool big enough for one server
//!   connection per client), where the pooler rewrites nothing;
//! - `transaction`: through the transaction port (tenant `t1`, pool_size 2), the real proof.
//!
//! tokio-postgres and `pgbench -M prepared` run from here. `.ci/run` installs the drivers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::Barrier;
use tokio_postgres::types::Type;

use crate::basic::wait_output;
use crate::harness::*;

/// Concurrent connections each suite opens (over pool_size 2 on the transaction port).
const SUITE_CLIENTS: u32 = 30;
/// A whole suite run; each suite bounds its checks at 25 s itself.
const SUITE_DEADLINE: Duration = Duration::from_secs(240);
/// pgJDBC from Debian's `libpostgresql-jdbc-java`.
const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Direct,
    Session,
    Transaction,
}

/// Tenant `t1` (pool_size 2) serves the transaction port; `t2` (pool_size 40, one server
/// connection per suite client) the session port.
fn start_pooler() -> Pooler {
    Pooler::start(&PoolerConfig::tenants(vec![
        TenantCfg::new("t1", vec![UserCfg::postgres(2)]),
        TenantCfg::new("t2", vec![UserCfg::postgres(40)]),
    ]))
}

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("tests/drivers")
}

/// Run one driver suite (`cmd`) against `target` with the libpq-style environment; panics with
/// the suite's output unless it exits 0.
fn run_suite(name: &str, mut cmd: Command, target: Target) {
    let pg = pg();
    let pooler = (target != Target::Direct).then(start_pooler);
    let (host, port, user) = match (target, &pooler) {
        (Target::Direct, _) => (pg.host.clone(), pg.port, pg.superuser.clone()),
        (Target::Session, Some(p)) => (
            p.session.ip().to_string(),
            p.session.port(),
            "postgres.t2".to_string(),
        ),
        (Target::Transaction, Some(p)) => (
            p.transaction.ip().to_string(),
            p.transaction.port(),
            "postgres.t1".to_string(),
        ),
        _ => unreachable!(),
    };
    for var in ["PGOPTIONS", "PGAPPNAME", "PGSERVICE", "PGTZ", "PGDATESTYLE"] {
        cmd.env_remove(var);
    }
    cmd.env("PGHOST", &host)
        .env("PGPORT", port.to_string())
        .env("PGUSER", &user)
        .env("PGPASSWORD", PG_PASSWORD)
        .env("PGDATABASE", "postgres")
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("SUITE_CLIENTS", SUITE_CLIENTS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!(
            "{name}: cannot start {cmd:?}: {e} (bash .ci/run installs the driver suites' tools)"
        ),
    };
    let out = wait_output(child, SUITE_DEADLINE, name);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} against {target:?} ({host}:{port} as {user}) failed ({}):\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    println!("{name} against {target:?}:\n{stdout}");
}

fn python(script: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(drivers_dir().join("python").join(script));
    c
}

fn node() -> Command {
    let dir = drivers_dir().join("node");
    assert!(
        dir.join("node_modules/pg").is_dir(),
        "node-postgres is not installed: run (cd tests/drivers/node && npm ci)"
    );
    let mut c = Command::new("node");
    c.arg(dir.join("suite.js")).current_dir(dir);
    c
}

/// `DriverSuite.java` compiled once per test binary into a temp dir.
fn java() -> Command {
    static CLASSES: OnceLock<PathBuf> = OnceLock::new();
    let classes = CLASSES.get_or_init(|| {
        assert!(
            Path::new(PGJDBC_JAR).exists(),
            "{PGJDBC_JAR} missing: apt-get install libpostgresql-jdbc-java"
        );
        let dir = std::env::temp_dir().join(format!("supavisor-jdbc-suite-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("classes dir");
        let child = Command::new("javac")
            .args(["-Xlint:-deprecation", "-cp", PGJDBC_JAR, "-d"])
            .arg(&dir)
            .arg(drivers_dir().join("java/DriverSuite.java"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn javac");
        let out = wait_output(child, Duration::from_secs(120), "javac");
        assert!(
            out.status.success(),
            "javac DriverSuite.java failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    });
    let mut c = Command::new("java");
    c.arg("-cp")
        .arg(format!("{}:{PGJDBC_JAR}", classes.display()))
        .arg("DriverSuite");
    c
}

// ----- psycopg 3 (prepare_threshold=0) ------------------------------------------------------

#[test]
fn psycopg_direct() {
    run_suite(
        "psycopg_suite.py",
        python("psycopg_suite.py"),
        Target::Direct,
    );
}

#[test]
fn psycopg_session() {
    run_suite(
        "psycopg_suite.py",
        python("psycopg_suite.py"),
        Target::Session,
    );
}

#[test]
fn psycopg_transaction() {
    run_suite(
        "psycopg_suite.py",
        python("psycopg_suite.py"),
        Target::Transaction,
    );
}

// ----- asyncpg (statement cache, executemany) -----------------------------------------------

#[test]
fn asyncpg_direct() {
    run_suite(
        "asyncpg_suite.py",
        python("asyncpg_suite.py"),
        Target::Direct,
    );
}

#[test]
fn asyncpg_session() {
    run_suite(
        "asyncpg_suite.py",
        python("asyncpg_suite.py"),
        Target::Session,
    );
}

#[test]
fn asyncpg_transaction() {
    run_suite(
        "asyncpg_suite.py",
        python("asyncpg_suite.py"),
        Target::Transaction,
    );
}

// ----- node-postgres named queries ----------------------------------------------------------

#[test]
fn node_postgres_direct() {
    run_suite("node suite.js", node(), Target::Direct);
}

#[test]
fn node_postgres_session() {
    run_suite("node suite.js", node(), Target::Session);
}

#[test]
fn node_postgres_transaction() {
    run_suite("node suite.js", node(), Target::Transaction);
}

// ----- pgJDBC (prepareThreshold=1) ----------------------------------------------------------

#[test]
fn pgjdbc_direct() {
    run_suite("DriverSuite.java", java(), Target::Direct);
}

#[test]
fn pgjdbc_session() {
    run_suite("DriverSuite.java", java(), Target::Session);
}

#[test]
fn pgjdbc_transaction() {
    run_suite("DriverSuite.java", java(), Target::Transaction);
}

// ----- pgbench -M prepared ------------------------------------------------------------------

/// `pgbench -M prepared` (TPC-B-like, every statement a named prepared statement) with 8 clients
/// through the transaction port (pool_size 2), after the same through the session port: no
/// failed transaction, and transactions did run.
///
/// One thread per client (`-j 8`): pgbench prepares a client's statements with a blocking
/// `PQprepare` (Parse + Sync) on that client's first command. With several clients per thread,
/// the thread blocks there waiting for a server connection while its other clients hold both
/// server connections inside their transactions: a deadlock in pgbench itself, with any pooler
/// that needs a server connection to answer a Parse (`-c 8 -j 2` hangs until the checkout
/// timeout).
#[test]
fn pgbench_prepared() {
    crate::load::pgbench_tables();
    let pooler = start_pooler();
    for (port, addr, user) in [
        ("session", pooler.session, "postgres.t2"),
        ("transaction", pooler.transaction, "postgres.t1"),
    ] {
        let child = pg_program("pgbench")
            .args(["-M", "prepared", "-c", "8", "-j", "8", "-T", "5", "-n"])
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-U", user, "postgres"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pgbench");
        let out = wait_output(child, Duration::from_secs(60), "pgbench -M prepared");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "pgbench -M prepared via {port} port failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        assert!(
            stdout.contains("number of failed transactions: 0 "),
            "pgbench -M prepared via {port}: failed transactions:\n{stdout}\n{stderr}"
        );
        let processed: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.split('/').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("pgbench via {port}: no transaction count:\n{stdout}"));
        assert!(
            processed > 100,
            "pgbench -M prepared via {port}: only {processed} transactions:\n{stdout}"
        );
    }
}

// ----- tokio-postgres -----------------------------------------------------------------------

const TOKIO_CLIENTS: usize = 32;

async fn tokio_clients(addr: std::net::SocketAddr, user: &str) -> Vec<Conn> {
    let cfg = client_config(addr, user, PG_PASSWORD);
    let mut out = Vec::new();
    for _ in 0..TOKIO_CLIENTS {
        match connect_with(&cfg).await {
            Ok(c) => out.push(c),
            Err(e) => panic!("connect to {addr} as {user}: {e:?}"),
        }
    }
    out
}

/// Both pooler ports, session first (which rewrites nothing, so a failure there is the test's).
fn tokio_targets(pooler: &Pooler) -> [(&'static str, std::net::SocketAddr, &'static str); 2] {
    [
        ("session", pooler.session, "postgres.t2"),
        ("transaction", pooler.transaction, "postgres.t1"),
    ]
}

/// Many clients `prepare()` their statements (one text shared by all, one of their own) and run
/// them many times, interleaved; some statements are run as a pipeline of concurrent queries on
/// one client; dropped statements (Close) are prepared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepare_many_clients() {
    let pooler = start_pooler();
    for (port, addr, user) in tokio_targets(&pooler) {
        let conns = tokio_clients(addr, user).await;
        let tasks: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, conn)| {
                tokio::spawn(async move {
                    let c = &conn.client;
                    let i = i as i32;
                    let shared = c.prepare("SELECT $1::int4 * 2").await.unwrap();
                    let own = c
                        .prepare(&format!("SELECT $1::int4 + {i}, 'c{i}'::text"))
                        .await
                        .unwrap();
                    for r in 0..30i32 {
                        let v: i32 = c.query_one(&shared, &[&r]).await.unwrap().get(0);
                        assert_eq!(v, r * 2, "{port} client {i}");
                        let row = c.query_one(&own, &[&r]).await.unwrap();
                        assert_eq!(
                            (row.get::<_, i32>(0), row.get::<_, String>(1)),
                            (r + i, format!("c{i}")),
                            "{port} client {i} round {r}"
                        );
                        tokio::task::yield_now().await;
                    }
                    // A pipeline: many Bind/Execute/Sync in flight on one connection.
                    let args: Vec<i32> = (0..20).collect();
                    let rows = join_all(args.iter().map(|a| {
                        let own = &own;
                        async move { c.query_one(own, &[a]).await }
                    }))
                    .await;
                    for (a, row) in args.iter().zip(rows) {
                        assert_eq!(row.unwrap().get::<_, i32>(0), a + i, "{port} pipelined");
                    }
                    // Drop (Close) and prepare the same text again, repeatedly.
                    for r in 0..10i32 {
                        let st = c
                            .prepare(&format!("SELECT $1::int4 - {i}, {r}"))
                            .await
                            .unwrap();
                        let row = c.query_one(&st, &[&r]).await.unwrap();
                        assert_eq!(
                            (row.get::<_, i32>(0), row.get::<_, i32>(1)),
                            (r - i, r),
                            "{port} client {i} cycle {r}"
                        );
                        drop(st);
                    }
                    // An execution error, then the statements still work.
                    let div = c.prepare("SELECT 10 / $1::int4").await.unwrap();
                    let e = c.query_one(&div, &[&0i32]).await.unwrap_err();
                    assert_eq!(sqlstate(&e).as_deref(), Some("22012"), "{port}: {e:?}");
                    let v: i32 = c.query_one(&div, &[&5i32]).await.unwrap().get(0);
                    assert_eq!(v, 2);
                    let v: i32 = c.query_one(&shared, &[&21i32]).await.unwrap().get(0);
                    assert_eq!(v, 42);
                })
            })
            .collect();
        within("tokio-postgres clients", async {
            for t in tasks {
                t.await.unwrap_or_else(|e| panic!("{port} port: {e}"));
            }
        })
        .await;
    }
}

/// A statement prepared before every other client ran its own (and before an unrelated
/// transaction of its client) still runs, with its own result, inside and outside explicit
/// transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_statement_used_after_other_clients() {
    let pooler = start_pooler();
    let table = unique("tpg_after");
    direct()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (client int, n int)"))
        .await
        .unwrap();
    for (port, addr, user) in tokio_targets(&pooler) {
        let conns = tokio_clients(addr, user).await;
        let b1 = Arc::new(Barrier::new(TOKIO_CLIENTS));
        let b2 = Arc::new(Barrier::new(TOKIO_CLIENTS));
        let tasks: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut conn)| {
                let (b1, b2, table) = (b1.clone(), b2.clone(), table.clone());
                tokio::spawn(async move {
                    let i = i as i32;
                    let cid = if port == "session" { i } else { 1000 + i };
                    let early = conn
                        .client
                        .prepare(&format!("SELECT $1::int4 * 3 + {i}"))
                        .await
                        .unwrap();
                    let count = conn
                        .client
                        .prepare(&format!("SELECT count(*) FROM {table} WHERE client = $1"))
                        .await
                        .unwrap();
                    b1.wait().await;
                    // Everyone else prepares and runs statements of their own meanwhile.
                    for k in 0..5i32 {
                        let st = conn
                            .client
                            .prepare(&format!("SELECT $1::int4 + {k} * 100 + {i}"))
                            .await
                            .unwrap();
                        let v: i32 = conn.client.query_one(&st, &[&k]).await.unwrap().get(0);
                        assert_eq!(v, k + k * 100 + i);
                    }
                    let tx = conn.client.transaction().await.unwrap();
                    tx.execute(
                        &format!("INSERT INTO {table} (client, n) VALUES ($1, 1)"),
                        &[&cid],
                    )
                    .await
                    .unwrap();
                    let n: i64 = tx.query_one(&count, &[&cid]).await.unwrap().get(0);
                    assert_eq!(n, 1, "{port} client {i}: own row inside the transaction");
                    let v: i32 = tx.query_one(&early, &[&7i32]).await.unwrap().get(0);
                    assert_eq!(v, 21 + i, "{port} client {i} inside a transaction");
                    tx.commit().await.unwrap();
                    b2.wait().await;
                    for r in 0..10i32 {
                        let v: i32 = conn.client.query_one(&early, &[&r]).await.unwrap().get(0);
                        assert_eq!(v, r * 3 + i, "{port} client {i} round {r}");
                        let n: i64 = conn.client.query_one(&count, &[&cid]).await.unwrap().get(0);
                        assert_eq!(n, 1, "{port} client {i}");
                    }
                })
            })
            .collect();
        within("tokio-postgres clients", async {
            for t in tasks {
                t.await.unwrap_or_else(|e| panic!("{port} port: {e}"));
            }
        })
        .await;
    }
}

/// `prepare_typed`: one query text prepared with different parameter types by different clients
/// (int4, int8, numeric, text) is a different statement for each; results decode as the types
/// asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepare_typed() {
    let pooler = start_pooler();
    for (port, addr, user) in tokio_targets(&pooler) {
        let conns = tokio_clients(addr, user).await;
        let tasks: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, conn)| {
                tokio::spawn(async move {
                    let c = &conn.client;
                    const TEXT: &str = "SELECT $1, pg_typeof($1)::text";
                    for r in 0..15i64 {
                        match (i + r as usize) % 3 {
                            0 => {
                                let st = c.prepare_typed(TEXT, &[Type::INT4]).await.unwrap();
                                assert_eq!(st.params(), &[Type::INT4]);
                                let row = c.query_one(&st, &[&(r as i32)]).await.unwrap();
                                assert_eq!(row.get::<_, i32>(0), r as i32, "{port}");
                                assert_eq!(row.get::<_, String>(1), "integer", "{port}");
                            }
                            1 => {
                                let st = c.prepare_typed(TEXT, &[Type::INT8]).await.unwrap();
                                assert_eq!(st.params(), &[Type::INT8]);
                                let row = c.query_one(&st, &[&(r << 40)]).await.unwrap();
                                assert_eq!(row.get::<_, i64>(0), r << 40, "{port}");
                                assert_eq!(row.get::<_, String>(1), "bigint", "{port}");
                            }
                            _ => {
                                let st = c.prepare_typed(TEXT, &[Type::TEXT]).await.unwrap();
                                assert_eq!(st.params(), &[Type::TEXT]);
                                let s = format!("c{i}r{r}");
                                let row = c.query_one(&st, &[&s]).await.unwrap();
                                assert_eq!(row.get::<_, String>(0), s, "{port}");
                                assert_eq!(row.get::<_, String>(1), "text", "{port}");
                            }
                        }
                        tokio::task::yield_now().await;
                    }
                    // Untyped parameters inferred by the server, next to typed ones.
                    let st = c
                        .prepare_typed("SELECT $1 + $2::int8", &[Type::INT8])
                        .await
                        .unwrap();
                    assert_eq!(st.params(), &[Type::INT8, Type::INT8]);
                    let v: i64 = c
                        .query_one(&st, &[&(i as i64), &1i64])
                        .await
                        .unwrap()
                        .get(0);
                    assert_eq!(v, i as i64 + 1, "{port}");
                })
            })
            .collect();
        within("tokio-postgres clients", async {
            for t in tasks {
                t.await.unwrap_or_else(|e| panic!("{port} port: {e}"));
            }
        })
        .await;
    }
}
