//! Read replicas against a real streaming replica of the test PostgreSQL (`pg_basebackup -R`):
//! reads spread by weight, writes stay on the primary (or fail with 25006 where a client asked
//! for a replica), a killed replica is banned at once and serves again when it is back, a
//! lagging replica is banned until it catches up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use control::metrics::{try_parse_text, value};
use control::pgtemp::TempPostgres;
use tokio_postgres::SimpleQueryMessage;

use crate::harness::*;

static REPLICA: OnceLock<TempPostgres> = OnceLock::new();

extern "C" fn stop_replica() {
    if let Some(r) = REPLICA.get() {
        r.stop_immediate();
    }
}

/// A streaming replica of [`pg`] shared by the tests of this binary that do not disturb it.
pub fn replica() -> &'static TempPostgres {
    REPLICA.get_or_init(|| {
        let r = TempPostgres::start_replica_of(pg()).expect("start a replica of the test server");
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe {
            libc::atexit(stop_replica);
        }
        r
    })
}

fn addr_of(pg: &TempPostgres) -> SocketAddr {
    format!("{}:{}", pg.host, pg.port).parse().unwrap()
}

/// A direct connection to `server` as the superuser.
pub async fn direct_to(server: &TempPostgres) -> tokio_postgres::Client {
    try_connect(addr_of(server), &server.superuser, &server.password)
        .await
        .expect("direct connection")
}

/// Waits until `replica` has replayed everything the primary has written so far.
pub async fn caught_up(replica: &TempPostgres) {
    let lsn: String = direct()
        .await
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let r = direct_to(replica).await;
    let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
    eventually("the replica caught up", Duration::from_secs(20), || {
        let (r, sql) = (&r, sql.clone());
        async move { r.query_one(&sql, &[]).await.is_ok_and(|row| row.get(0)) }
    })
    .await;
}

/// Where a statement runs: `true/on` the replica, `false/on` a read-only connection to the
/// primary (listed as a replica), `false/off` the primary's own pool.
pub const WHERE: &str =
    "SELECT pg_is_in_recovery()::text || '/' || current_setting('transaction_read_only')";

/// The first column of the first row of a simple query.
pub async fn simple_one(
    c: &tokio_postgres::Client,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    let msgs = within(sql, c.simple_query(sql)).await?;
    Ok(msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default())
}

/// `replicas = [...]` for a tenant's TOML: (server, weight).
pub fn replicas_toml(list: &[(&TempPostgres, u32)]) -> String {
    let items: Vec<String> = list
        .iter()
        .map(|(s, w)| {
            format!(
                "{{ host = \"{}\", port = {}, weight = {w} }}",
                s.host, s.port
            )
        })
        .collect();
    format!("replicas = [{}]\n", items.join(", "))
}

/// A client that asks for replicas (`options=-c target_session_attrs=read-only`).
async fn replica_client(addr: SocketAddr, user: &str) -> tokio_postgres::Client {
    let mut cfg = client_config(addr, user, PG_PASSWORD);
    cfg.options("-c target_session_attrs=read-only");
    connect_with(&cfg)
        .await
        .expect("connect asking for replicas")
        .client
}

/// GET `path` on the API with a bearer token; (status, body).
pub async fn http_get(api: SocketAddr, path: &str, token: String) -> (u16, String) {
    let url = format!("http://{api}{path}");
    within(
        &format!("GET {url}"),
        tokio::task::spawn_blocking(move || {
            let req = ureq::get(&url)
                .timeout(Duration::from_secs(10))
                .set("Authorization", &format!("Bearer {token}"));
            match req.call() {
                Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
                Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
                Err(e) => panic!("GET {url}: {e}"),
            }
        }),
    )
    .await
    .unwrap()
}

/// An HS256 token signed with `secret`.
pub fn token(secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"role": "test"}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// `supavisor_replica_healthy` of `replica` for `tenant`, from `/metrics`.
async fn healthy(api: SocketAddr, tenant: &str, replica: &str) -> Option<f64> {
    let (status, text) = http_get(api, "/metrics", token(METRICS_JWT_SECRET)).await;
    assert_eq!(status, 200, "{text}");
    let s = try_parse_text(&text).unwrap();
    value(
        &s,
        "supavisor_replica_healthy",
        &[("tenant", tenant), ("replica", replica)],
    )
}

/// (a) Weights 3 and 1 (the replica, and the primary listed as a read-only replica) split plain
/// reads exactly 3:1, for simple queries and for Parse/Bind/Execute batches; writes, locking
/// reads and transactions stay on the primary; named statements prepared on a replica run on
/// the primary; a client that asks for replicas sends every transaction there, and its writes
/// fail with 25006 instead of being applied, in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spread_by_weight_and_writes_stay_on_the_primary() {
    let (r, p) = (replica(), pg());
    let id = unique("rep_lb");
    let table = format!("{id}_t");
    direct()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (v int)"))
        .await
        .unwrap();
    caught_up(r).await;
    let mut t = TenantCfg::new(&id, vec![UserCfg::postgres(3)]);
    t.extra_toml = format!(
        "load_balance = \"reads\"\n{}",
        replicas_toml(&[(r, 3), (p, 1)])
    );
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![t]));
    let user = format!("postgres.{id}");
    let c = try_connect(pooler.transaction, &user, PG_PASSWORD)
        .await
        .unwrap();

    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..40 {
        *seen
            .entry(simple_one(&c, WHERE).await.unwrap())
            .or_default() += 1;
    }
    assert_eq!(
        seen,
        BTreeMap::from([("false/on".to_string(), 10), ("true/on".to_string(), 30)]),
        "simple queries"
    );
    // Parse, Bind, Describe, Execute, Sync in one batch (an unnamed statement).
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..8 {
        let row = within("query_typed", c.query_typed(WHERE, &[]))
            .await
            .unwrap();
        *seen.entry(row[0].get::<_, String>(0)).or_default() += 1;
    }
    assert_eq!(
        seen,
        BTreeMap::from([("false/on".to_string(), 2), ("true/on".to_string(), 6)]),
        "extended protocol"
    );
    // A named statement: prepared where its Parse went, bound (its batch starts with Bind)
    // on the primary, where the pooler prepares it again.
    let stmt = within("prepare", c.prepare(&format!("{WHERE}, $1::int + 1")))
        .await
        .unwrap();
    for _ in 0..3 {
        let row = within("query", c.query_one(&stmt, &[&41])).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "false/off");
        assert_eq!(row.get::<_, i32>(1), 42);
    }

    // Everything that is not a plain read: the primary.
    let on_primary = [
        format!("INSERT INTO {table} VALUES (1) RETURNING ({WHERE})"),
        format!("{WHERE} FROM {table} FOR UPDATE"),
        format!("BEGIN; {WHERE}; COMMIT"),
        format!("WITH x AS (SELECT 1) {WHERE}"),
        format!("SELECT txid_current()::text, ({WHERE})"),
    ];
    for sql in &on_primary {
        let msgs = within(sql, c.simple_query(sql)).await.unwrap();
        let last = msgs
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(r.len() - 1).map(str::to_string),
                _ => None,
            })
            .next_back();
        assert_eq!(last.as_deref(), Some("false/off"), "{sql}");
    }
    let tx = within("begin", c.simple_query("BEGIN")).await;
    assert!(tx.is_ok());
    assert_eq!(
        simple_one(&c, WHERE).await.unwrap(),
        "false/off",
        "inside BEGIN"
    );
    within("commit", c.simple_query("COMMIT")).await.unwrap();

    // A client that asks for replicas, on both ports.
    for (mode, addr) in pooler.ports() {
        let rc = replica_client(addr, &user).await;
        for _ in 0..4 {
            let w = simple_one(&rc, WHERE).await.unwrap();
            assert!(w == "true/on" || w == "false/on", "{mode}: {w}");
        }
        // A write that names no existing relation: an INSERT could meet a table the replica
        // has not made visible yet (42P01 before the read-only check).
        let write = simple_one(&rc, &format!("CREATE TABLE {table}_{mode} (v int)")).await;
        expect_code(write, "25006");
        // The session goes on after the error (session mode: on the same connection).
        assert!(
            simple_one(&rc, WHERE).await.unwrap().ends_with("/on"),
            "{mode}"
        );
    }
    // Only the write that went to the primary was applied.
    let created: bool = direct()
        .await
        .query_one(
            &format!(
                "SELECT to_regclass('{table}_session') IS NOT NULL \
                 OR to_regclass('{table}_transaction') IS NOT NULL"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!created, "a write sent to replicas was applied");
    let rows: i64 = direct()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);

    // The replica's pools and counters.
    let (status, text) = http_get(pooler.api, "/metrics", token(METRICS_JWT_SECRET)).await;
    assert_eq!(status, 200);
    let s = try_parse_text(&text).unwrap();
    let rname = format!("{}:{}", r.host, r.port);
    let on_replica = value(
        &s,
        "supavisor_replica_transactions",
        &[("tenant", &id), ("replica", &rname)],
    )
    .unwrap();
    assert!(on_replica >= 36.0, "{on_replica}\n{text}");
    assert_eq!(
        value(
            &s,
            "supavisor_replica_healthy",
            &[("tenant", &id), ("replica", &rname)]
        ),
        Some(1.0)
    );
    let open = value(
        &s,
        "supavisor_replica_connections_open",
        &[
            ("tenant", &id),
            ("replica", &rname),
            ("mode", "transaction"),
        ],
    )
    .unwrap();
    assert!((1.0..=3.0).contains(&open), "{open}");
    let (status, pools) = http_get(pooler.api, "/api/pools", token(API_JWT_SECRET)).await;
    assert_eq!(status, 200);
    let pools: serde_json::Value = serde_json::from_str(&pools).unwrap();
    assert!(
        pools["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["tenant"] == id.as_str() && p["replica"] == rname.as_str()),
        "{pools}"
    );
    direct()
        .await
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// Runs plain reads in a loop on `clients` clients until `stop`; counts where they ran and the
/// errors (a client whose query failed reconnects).
struct Load {
    on_replica: Arc<AtomicU64>,
    on_primary: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, user: &str, clients: usize) -> Load {
        let load = Load {
            on_replica: Arc::default(),
            on_primary: Arc::default(),
            errors: Arc::default(),
            stop: Arc::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (rep, pri, errors, stop) = (
                load.on_replica.clone(),
                load.on_primary.clone(),
                load.errors.clone(),
                load.stop.clone(),
            );
            let user = user.to_string();
            tasks.push(tokio::spawn(async move {
                let mut client = None;
                while !stop.load(Ordering::Relaxed) {
                    let c = match &client {
                        Some(c) => c,
                        None => match try_connect(addr, &user, PG_PASSWORD).await {
                            Ok(c) => client.insert(c),
                            Err(e) => {
                                errors.lock().unwrap().push(format!("connect: {e:?}"));
                                continue;
                            }
                        },
                    };
                    match simple_one(c, "SELECT pg_is_in_recovery()::text").await {
                        Ok(v) if v == "true" => rep.fetch_add(1, Ordering::Relaxed),
                        Ok(_) => pri.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(format!("{e:?}"));
                            client = None;
                            0
                        }
                    };
                }
            }));
        }
        Load { tasks, ..load }
    }

    async fn until_replica_serves(&self, what: &str) {
        let before = self.on_replica.load(Ordering::Relaxed);
        let on_replica = self.on_replica.clone();
        eventually(what, Duration::from_secs(20), move || {
            let n = on_replica.load(Ordering::Relaxed);
            async move { n > before + 5 }
        })
        .await;
    }

    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            within("load task", t).await.unwrap();
        }
        let e = self.errors.lock().unwrap().clone();
        e
    }
}

/// (b) A replica killed under load (`pg_ctl stop -m immediate`) is banned within a second; the
/// clients' reads go on on the primary, the only errors are the queries that were running on
/// the replica when it died (at most one per client); it serves again once it is back and the
/// ban is over. (c) A replica whose replay is paused is banned for its lag, with the reason in
/// `SHOW REPLICAS`, and serves again once replay resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_or_lagging_replica_is_banned_and_comes_back() {
    let own = TempPostgres::start_replica_of(pg()).expect("start a replica");
    let id = unique("rep_ban");
    let mut t = TenantCfg::new(&id, vec![UserCfg::postgres(4)]);
    t.extra_toml = format!(
        "load_balance = \"reads\"\nreplica_ban_ms = 1000\nmax_replica_lag_ms = 1000\n{}",
        replicas_toml(&[(&own, 1)])
    );
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![t]));
    let user = format!("postgres.{id}");
    let rname = format!("{}:{}", own.host, own.port);
    const CLIENTS: usize = 4;

    let load = Load::start(pooler.transaction, &user, CLIENTS);
    load.until_replica_serves("reads on the replica").await;
    assert_eq!(healthy(pooler.api, &id, &rname).await, Some(1.0));

    // Killed.
    let killed = Instant::now();
    tokio::task::block_in_place(|| own.kill_for_now()).expect("kill the replica");
    let api = pooler.api;
    let (tenant, name) = (id.clone(), rname.clone());
    eventually("the replica banned", Duration::from_secs(5), move || {
        let (tenant, name) = (tenant.clone(), name.clone());
        async move { healthy(api, &tenant, &name).await == Some(0.0) }
    })
    .await;
    let banned_after = killed.elapsed();
    assert!(
        banned_after < Duration::from_secs(1),
        "banned {banned_after:?} after the kill"
    );
    // Reads go on, on the primary.
    let primary_before = load.on_primary.load(Ordering::Relaxed);
    let on_primary = load.on_primary.clone();
    eventually(
        "reads served by the primary",
        Duration::from_secs(5),
        move || {
            let n = on_primary.load(Ordering::Relaxed);
            async move { n > primary_before + 20 }
        },
    )
    .await;

    // Back.
    let restarted = Instant::now();
    tokio::task::block_in_place(|| own.start_again()).expect("restart the replica");
    load.until_replica_serves("reads on the replica again")
        .await;
    let back_after = restarted.elapsed();
    assert_eq!(healthy(pooler.api, &id, &rname).await, Some(1.0));
    let errors = load.stop().await;
    assert!(
        errors.len() <= CLIENTS,
        "{} errors for {CLIENTS} clients: {errors:#?}",
        errors.len()
    );
    for e in &errors {
        let l = e.to_lowercase();
        assert!(
            ["57p01", "57p02", "08006", "closed"]
                .iter()
                .any(|k| l.contains(k)),
            "not an in-flight failure: {e}"
        );
    }
    eprintln!(
        "replica killed: banned after {banned_after:?}; restarted: serving again after \
         {back_after:?}; {} in-flight errors",
        errors.len()
    );

    // Lagging: replay paused while the primary writes (after a commit it has replayed, whose
    // time its lag is measured from).
    direct()
        .await
        .batch_execute(&format!("CREATE TABLE {id}_lag (); DROP TABLE {id}_lag"))
        .await
        .unwrap();
    caught_up(&own).await;
    let c = try_connect(pooler.transaction, &user, PG_PASSWORD)
        .await
        .unwrap();
    assert_eq!(
        simple_one(&c, "SELECT pg_is_in_recovery()::text")
            .await
            .unwrap(),
        "true"
    );
    direct_to(&own)
        .await
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let paused = Instant::now();
    let (tenant, name) = (id.clone(), rname.clone());
    eventually(
        "the lagging replica banned",
        Duration::from_secs(10),
        move || {
            let (tenant, name) = (tenant.clone(), name.clone());
            async move {
                // Something to replay, so that the replica is behind.
                let _ = direct()
                    .await
                    .batch_execute("SELECT pg_logical_emit_message(false, 'lag', 'x')")
                    .await;
                healthy(api, &tenant, &name).await == Some(0.0)
            }
        },
    )
    .await;
    let lag_ban = paused.elapsed();
    assert_eq!(
        simple_one(&c, "SELECT pg_is_in_recovery()::text")
            .await
            .unwrap(),
        "false",
        "reads go to the primary while the replica lags"
    );
    let console = crate::console_tests::console(pooler.transaction).await;
    let rows = crate::console_tests::show(&console, "SHOW REPLICAS").await;
    let row = rows
        .iter()
        .find(|r| r["database"] == id)
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(row["state"], "banned");
    assert!(row["last_error"].contains("replication lag"), "{row:?}");
    direct_to(&own)
        .await
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    let (tenant, name) = (id.clone(), rname.clone());
    eventually(
        "the replica serves again",
        Duration::from_secs(10),
        move || {
            let (tenant, name) = (tenant.clone(), name.clone());
            async move { healthy(api, &tenant, &name).await == Some(1.0) }
        },
    )
    .await;
    eventually("a read on the replica", Duration::from_secs(5), || async {
        simple_one(&c, "SELECT pg_is_in_recovery()::text")
            .await
            .is_ok_and(|v| v == "true")
    })
    .await;
    eprintln!("replay paused: banned for lag after {lag_ban:?}");
}
