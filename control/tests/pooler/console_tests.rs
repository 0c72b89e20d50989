//! The admin console (`admin.supavisor`, an API token as its password) against a real pooler,
//! PostgreSQL and a streaming replica: who gets in, what each SHOW says, PAUSE / RESUME /
//! RELOAD, errors for what it does not take, and psql's view of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_postgres::SimpleQueryMessage;

use crate::harness::*;
use crate::replica_tests::{caught_up, direct_to, replica, replicas_toml, simple_one, token};

/// A console session through `addr` with a valid API token.
pub async fn console(addr: SocketAddr) -> tokio_postgres::Client {
    let mut cfg = client_config(addr, "admin.supavisor", &token(API_JWT_SECRET));
    cfg.dbname("supavisor");
    connect_with(&cfg).await.expect("console login").client
}

/// The rows of a console command, by column name (NULL as "").
pub async fn show(c: &tokio_postgres::Client, sql: &str) -> Vec<BTreeMap<String, String>> {
    let msgs = within(sql, c.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| {
                        (
                            col.name().to_string(),
                            r.get(i).unwrap_or_default().to_string(),
                        )
                    })
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The column names of a console command's answer.
async fn columns(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let msgs = within(sql, c.simple_query(sql)).await.unwrap();
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::RowDescription(cols) => {
                Some(cols.iter().map(|c| c.name().to_string()).collect())
            }
            _ => None,
        })
        .unwrap_or_default()
}

/// Backend pids of the client connections on `server` (the pooler's connections carry the
/// application_name of the client that used them last).
async fn pooler_backends(server: &tokio_postgres::Client) -> Vec<String> {
    server
        .query(
            "SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every console command on a single node: non-admins get 28000; SHOW POOLS / CLIENTS /
/// SERVERS / STATS / TENANTS / REPLICAS / VERSION describe the tenant's primary and replica
/// pools, its client (address, application_name) and its server connections (their backend
/// pids are PostgreSQL's); unknown commands and the extended protocol get errors and the
/// session goes on; PAUSE holds a transaction until RESUME and closes idle connections;
/// RELOAD re-reads the file; psql shows it all as a table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_and_controls_the_pools() {
    let r = replica();
    caught_up(r).await;
    let id = unique("console");
    let mut t = TenantCfg::new(&id, vec![UserCfg::postgres(2)]);
    t.extra_toml = format!("load_balance = \"reads\"\n{}", replicas_toml(&[(r, 1)]));
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![t]));

    // Who gets in.
    for password in [
        "not-a-token".to_string(),
        token("another-secret-0123456789abcdef0123"),
    ] {
        let mut cfg = client_config(pooler.transaction, "admin.supavisor", &password);
        cfg.dbname("supavisor");
        let msg = expect_code(connect_with(&cfg).await.map(|_| ()), "28000");
        assert!(msg.contains("API token"), "{msg}");
    }

    // A client of the tenant, with a read (on the replica) and a write (on the primary).
    let mut cfg = client_config(pooler.transaction, &format!("postgres.{id}"), PG_PASSWORD);
    cfg.application_name("console-test");
    let app = connect_with(&cfg).await.unwrap().client;
    assert_eq!(
        simple_one(&app, "SELECT pg_is_in_recovery()::text")
            .await
            .unwrap(),
        "true"
    );
    assert_eq!(
        simple_one(&app, "SELECT txid_current() > 0").await.unwrap(),
        "t"
    );

    let admin = console(pooler.session).await;
    assert_eq!(
        columns(&admin, "SHOW POOLS").await,
        [
            "node",
            "database",
            "user",
            "pool_mode",
            "replica",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "pool_size",
            "shard",
            "paused"
        ]
    );
    let pools = show(&admin, "SHOW POOLS").await;
    let rname = format!("{}:{}", r.host, r.port);
    let mine: Vec<_> = pools.iter().filter(|p| p["database"] == id).collect();
    assert_eq!(mine.len(), 2, "{pools:?}");
    let primary = mine.iter().find(|p| p["replica"] == "primary").unwrap();
    assert_eq!(
        (
            primary["node"].as_str(),
            primary["cl_active"].as_str(),
            primary["pool_size"].as_str(),
            primary["pool_mode"].as_str(),
            primary["paused"].as_str()
        ),
        ("1", "1", "2", "transaction", "false")
    );
    let on_replica = mine.iter().find(|p| p["replica"] == rname).unwrap();
    // Idle, or running the replica's health check.
    let n = |k: &str| on_replica[k].parse::<u32>().unwrap();
    assert_eq!(n("sv_idle") + n("sv_active"), 1, "{on_replica:?}");

    let clients = show(&admin, "SHOW CLIENTS").await;
    let c = clients
        .iter()
        .find(|c| c["database"] == id)
        .unwrap_or_else(|| panic!("{clients:?}"));
    assert_eq!(c["application_name"], "console-test");
    assert_eq!(c["addr"], "127.0.0.1");
    assert_eq!(c["state"], "idle");
    assert_eq!(c["user"], "postgres");
    assert!(c["connect_time"].ends_with(" UTC"), "{c:?}");

    let servers = show(&admin, "SHOW SERVERS").await;
    let mine: Vec<_> = servers.iter().filter(|s| s["database"] == id).collect();
    assert_eq!(mine.len(), 2, "one on each side: {servers:?}");
    let on_primary = pooler_backends(&direct().await).await;
    let on_replica = pooler_backends(&direct_to(r).await).await;
    for s in &mine {
        let pids = if s["replica"] == "primary" {
            &on_primary
        } else {
            &on_replica
        };
        assert!(pids.contains(&s["remote_pid"]), "{s:?} not in {pids:?}");
        if s["replica"] == "primary" {
            assert_eq!(s["state"], "idle");
        }
    }

    let stats = show(&admin, "SHOW STATS").await;
    let st = stats.iter().find(|s| s["database"] == id).unwrap();
    assert!(
        st["total_query_count"].parse::<u64>().unwrap() >= 2,
        "{st:?}"
    );
    assert!(st["total_received"].parse::<u64>().unwrap() > 0);

    let tenants = show(&admin, "SHOW TENANTS").await;
    let tn = tenants.iter().find(|t| t["name"] == id).unwrap();
    assert_eq!(tn["replicas"], format!("{rname}*1"));
    assert_eq!(tn["load_balance"], "reads");
    let replicas = show(&admin, "SHOW REPLICAS").await;
    let rp = replicas.iter().find(|x| x["database"] == id).unwrap();
    assert_eq!(
        (rp["replica"].as_str(), rp["state"].as_str()),
        (rname.as_str(), "ok")
    );
    let version = show(&admin, "SHOW VERSION").await;
    assert_eq!(version.len(), 1);
    assert!(
        version[0]["version"].starts_with("Supavisor-rs "),
        "{version:?}"
    );

    // What it does not take.
    for bad in ["SHOW NOPE", "SELECT 1", "PAUSE", "DROP TABLE x"] {
        expect_code(admin.simple_query(bad).await, "42601");
    }
    expect_code(admin.query("SHOW POOLS", &[]).await, "0A000");
    expect_code(admin.simple_query("PAUSE no_such_tenant").await, "3D000");
    assert_eq!(
        show(&admin, "SHOW VERSION").await.len(),
        1,
        "the session goes on"
    );

    // PAUSE: the tenant's idle server connections close, a new transaction waits for RESUME.
    within("PAUSE", admin.simple_query(&format!("PAUSE {id}")))
        .await
        .unwrap();
    let (a, id2) = (&admin, id.clone());
    eventually(
        "the idle connections closed",
        Duration::from_secs(5),
        move || {
            let id = id2.clone();
            async move {
                show(a, "SHOW SERVERS")
                    .await
                    .iter()
                    .all(|s| s["database"] != id)
            }
        },
    )
    .await;
    // Not a plain read: the primary's pool.
    let waiting = tokio::spawn(async move {
        let v = simple_one(&app, "SELECT 'resumed', txid_current()").await;
        (app, v)
    });
    let id2 = id.clone();
    eventually("the client waits", Duration::from_secs(5), move || {
        let id = id2.clone();
        async move {
            show(a, "SHOW POOLS").await.iter().any(|p| {
                p["database"] == id
                    && p["replica"] == "primary"
                    && p["cl_waiting"] == "1"
                    && p["paused"] == "true"
            })
        }
    })
    .await;
    assert!(!waiting.is_finished(), "a paused tenant ran a transaction");
    within("RESUME", admin.simple_query(&format!("RESUME {id}")))
        .await
        .unwrap();
    let (_app, resumed) = within("the held transaction", waiting).await.unwrap();
    assert_eq!(resumed.unwrap(), "resumed");

    within("RELOAD", admin.simple_query("RELOAD"))
        .await
        .unwrap();

    // psql's view (the README shows one).
    let out = tokio::task::block_in_place(|| {
        pg_program("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=admin.supavisor dbname=supavisor",
                pooler.transaction.port()
            ))
            .args(["-c", "SHOW POOLS", "-c", "SHOW REPLICAS"])
            .env("PGPASSWORD", token(API_JWT_SECRET))
            .output()
            .unwrap()
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines()
            .next()
            .is_some_and(|l| l.split('|').map(str::trim).eq([
                "node",
                "database",
                "user",
                "pool_mode",
                "replica",
                "cl_active",
                "cl_waiting",
                "sv_active",
                "sv_idle",
                "pool_size",
                "shard",
                "paused"
            ])),
        "{text}"
    );
    assert!(text.contains(&id), "{text}");
    eprintln!("{text}");
}
