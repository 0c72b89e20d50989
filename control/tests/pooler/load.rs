//! Many clients on few server connections; pgbench.

use std::sync::OnceLock;
use std::time::Duration;

use crate::basic::wait_output;
use crate::harness::*;

/// 200 concurrent clients over the transaction port with pool_size 3: every transaction sees its
/// own state only, failed transactions leave nothing behind and their errors reach nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_transaction_consistency() {
    const CLIENTS: i32 = 200;
    const ROUNDS: i32 = 5;
    let pooler = Pooler::start(&PoolerConfig::single(3));
    let table = unique("cons");
    let d = direct().await;
    d.batch_execute(&format!("CREATE TABLE {table} (client int, n int)"))
        .await
        .unwrap();

    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        let addr = pooler.transaction;
        let table = table.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(addr).await;
            let faulty = id % 10 == 0;
            let mut committed: Vec<i32> = Vec::new();
            for round in 0..ROUNDS {
                if faulty && round % 2 == 1 {
                    // A failing transaction: its insert must vanish, its error stays ours.
                    c.batch_execute("BEGIN").await.unwrap();
                    c.execute(
                        &format!("INSERT INTO {table} VALUES ($1, $2)"),
                        &[&id, &(1000 + round)],
                    )
                    .await
                    .unwrap();
                    let e = c.simple_query("SELECT 1/0").await.unwrap_err();
                    assert_eq!(sqlstate(&e).as_deref(), Some("22012"), "client {id}: {e:?}");
                    c.batch_execute("ROLLBACK").await.unwrap();
                    continue;
                }
                let tx = c.transaction().await.unwrap();
                tx.batch_execute(&format!("SET LOCAL application_name = 'c{id}'"))
                    .await
                    .unwrap();
                let xid: i64 = tx
                    .query_one("SELECT txid_current()", &[])
                    .await
                    .unwrap()
                    .get(0);
                tx.execute(
                    &format!("INSERT INTO {table} VALUES ($1, $2)"),
                    &[&id, &round],
                )
                .await
                .unwrap();
                let rows = tx
                    .query(
                        &format!(
                            "SELECT n, current_setting('application_name'), txid_current() \
                             FROM {table} WHERE client = $1 ORDER BY n"
                        ),
                        &[&id],
                    )
                    .await
                    .unwrap();
                let mut expect = committed.clone();
                expect.push(round);
                let seen: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
                assert_eq!(seen, expect, "client {id} round {round}: wrong own rows");
                for r in &rows {
                    assert_eq!(
                        r.get::<_, String>(1),
                        format!("c{id}"),
                        "client {id}: another client's session state"
                    );
                    assert_eq!(r.get::<_, i64>(2), xid, "client {id}: transaction switched");
                }
                tx.commit().await.unwrap();
                committed.push(round);
            }
            committed.len() as i64
        }));
    }
    let mut expected_rows = 0i64;
    for (i, t) in tasks.into_iter().enumerate() {
        expected_rows += within_for(Duration::from_secs(120), "client task", t)
            .await
            .unwrap_or_else(|e| panic!("client {i} failed: {e}"));
    }
    let row = d
        .query_one(
            &format!("SELECT count(*), count(*) FILTER (WHERE n >= 1000), count(DISTINCT client) FROM {table}"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), expected_rows);
    assert_eq!(row.get::<_, i64>(1), 0, "rolled-back inserts are visible");
    assert_eq!(row.get::<_, i64>(2), CLIENTS as i64);
    // Pool size 3: the pooler never opened more than 3 server connections for this pool.
    let n: i64 = d
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1",
            &[&format!("%{table}%")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        n <= 3,
        "{n} backends ran queries on {table} with pool size 3"
    );
}

/// `pgbench -i` once, directly against PostgreSQL.
pub fn pgbench_tables() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let pg = pg();
        let child = pg_program("pgbench")
            .args(["-i", "-s", "1", "-q"])
            .args([
                "-h",
                &pg.host,
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "postgres",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn pgbench -i");
        let out = wait_output(child, Duration::from_secs(60), "pgbench -i");
        assert!(
            out.status.success(),
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// pgbench (TPC-B-like, simple and extended protocol) through each port: no failed transactions,
/// all transactions processed.
#[test]
fn pgbench_through_both_ports() {
    pgbench_tables();
    // t1 (pool 8) is used through the session port, one server connection per pgbench client;
    // t2 (pool 3) through the transaction port, 8 clients multiplexed on 3 connections.
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![
        TenantCfg::new("t1", vec![UserCfg::postgres(8)]),
        TenantCfg::new("t2", vec![UserCfg::postgres(3)]),
    ]));
    const CLIENTS: u32 = 8;
    const PER_CLIENT: u32 = 100;
    for (port, addr, user) in [
        ("session", pooler.session, "postgres.t1"),
        ("transaction", pooler.transaction, "postgres.t2"),
    ] {
        for mode in ["simple", "extended"] {
            let child = pg_program("pgbench")
                .args(["-M", mode, "-c", &CLIENTS.to_string(), "-j", "2"])
                .args(["-t", &PER_CLIENT.to_string()])
                .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
                .args(["-U", user, "postgres"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn pgbench");
            let out = wait_output(child, Duration::from_secs(60), "pgbench");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "pgbench -M {mode} via {port} port failed ({}):\n{stdout}\n{stderr}",
                out.status
            );
            let total = CLIENTS * PER_CLIENT;
            assert!(
                stdout.contains(&format!(
                    "number of transactions actually processed: {total}/{total}"
                )),
                "pgbench -M {mode} via {port}: not all transactions processed:\n{stdout}"
            );
            assert!(
                stdout.contains("number of failed transactions: 0 "),
                "pgbench -M {mode} via {port}: failed transactions:\n{stdout}"
            );
        }
    }
}
