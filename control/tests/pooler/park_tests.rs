//! Parked clients (`engine::park`): a transaction-mode client idle for `client_park_after`
//! gives up its task; what it sends next, and every signal meant for it, bring it back.

use std::time::Duration;

use crate::cluster_tests::{blocking, ctl, text};
use crate::harness::*;
use crate::metrics_tests::scrape_until;

const PARKED: &str = "supavisor_shard_clients_parked";

fn parking(tenants: Vec<TenantCfg>) -> PoolerConfig {
    let mut cfg = PoolerConfig::tenants(tenants);
    cfg.proxy_toml = "client_park_after = 60".into();
    cfg
}

async fn parked_until(pooler: &Pooler, n: f64) -> f64 {
    scrape_until(pooler.api, |s| s.sum(PARKED, &[]) == n)
        .await
        .sum(PARKED, &[])
}

/// Idle transaction-mode clients park; their named statements survive; session-mode clients
/// never park.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_park_and_come_back() {
    let pooler = Pooler::start(&parking(vec![TenantCfg::new(
        "t1",
        vec![UserCfg::postgres(2)],
    )]));
    let session = connect(pooler.session).await;
    session.simple_query("SELECT 1").await.unwrap();
    let mut clients = Vec::new();
    for i in 0..10i32 {
        let c = connect_with(&client_config(
            pooler.transaction,
            "postgres.t1",
            PG_PASSWORD,
        ))
        .await
        .unwrap();
        let stmt = c.client.prepare("SELECT $1::int + 1").await.unwrap();
        let v: i32 = c.client.query_one(&stmt, &[&i]).await.unwrap().get(0);
        assert_eq!(v, i + 1);
        clients.push((c, stmt));
    }
    for round in 0..3 {
        assert_eq!(
            parked_until(&pooler, 10.0).await,
            10.0,
            "round {round}: all parked"
        );
        for (i, (c, stmt)) in clients.iter().enumerate() {
            let i = i as i32;
            let v: i32 = within("statement after parking", c.client.query_one(stmt, &[&i]))
                .await
                .unwrap()
                .get(0);
            assert_eq!(v, i + 1, "round {round}");
            within(
                "transaction after parking",
                c.client
                    .batch_execute("BEGIN; SELECT pg_sleep(0.01); SELECT 1; COMMIT"),
            )
            .await
            .unwrap();
        }
    }
    // The session client was idle all along and never parked.
    assert_eq!(parked_until(&pooler, 10.0).await, 10.0);
    session.simple_query("SELECT 1").await.unwrap();
    for (c, _) in clients {
        drop(c.client);
        within("connection ends", c.task).await.unwrap().unwrap();
    }
    assert_eq!(
        parked_until(&pooler, 0.0).await,
        0.0,
        "closed clients leave no record"
    );
}

/// Signals reach parked clients: the idle timeout (57P05), terminate (57P01), a client that
/// closes its socket, and SIGTERM's drain (57P01, and the pooler stops at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_clients_hear_signals() {
    let mut t1 = TenantCfg::new("t1", vec![UserCfg::postgres(2)]);
    t1.extra_toml = "client_idle_timeout = 1500".into();
    let t2 = TenantCfg::new("t2", vec![UserCfg::postgres(2)]);
    let mut pooler = Pooler::start(&parking(vec![t1, t2]));
    let conn = |user: &'static str| {
        let addr = pooler.transaction;
        async move {
            let c = connect_with(&client_config(addr, user, PG_PASSWORD))
                .await
                .unwrap();
            c.client.simple_query("SELECT 1").await.unwrap();
            c
        }
    };
    let timed = conn("postgres.t1").await;
    let terminated = conn("postgres.t2").await;
    let closing = conn("postgres.t2").await;
    assert_eq!(parked_until(&pooler, 3.0).await, 3.0);

    // The idle timeout: the server side closes the parked client with 57P05.
    let end = within_for(Duration::from_secs(10), "idle timeout", timed.task)
        .await
        .unwrap();
    let e = end.expect_err("closed by the idle timeout");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P05"), "{e:?}");

    // A parked client that goes away is cleaned up.
    drop(closing.client);
    within("closing", closing.task).await.unwrap().unwrap();
    assert_eq!(parked_until(&pooler, 1.0).await, 1.0);

    // terminate reaches the parked client.
    let api = pooler.api;
    let out = blocking(move || ctl(api, &["tenant", "terminate", "t2"]));
    assert!(out.status.success(), "{}", text(&out));
    // The connection ends on its own, with 57P01, before the client asks anything. (A query
    // sent first would race the error: tokio-postgres hands an error that arrives while a
    // query is pending to that query, and its connection then only sees the close.)
    let end = within("terminated task", terminated.task).await.unwrap();
    assert_eq!(
        end.as_ref().err().and_then(sqlstate).as_deref(),
        Some("57P01"),
        "{end:?}"
    );
    let q = within("terminated", terminated.client.simple_query("SELECT 1")).await;
    assert!(q.is_err(), "a terminated client still works");

    // SIGTERM: a parked client hears the drain and the pooler does not wait for it.
    let drained = conn("postgres.t2").await;
    assert_eq!(parked_until(&pooler, 1.0).await, 1.0);
    pooler.signal_term();
    let end = within("drained task", drained.task).await.unwrap();
    assert_eq!(
        end.as_ref().err().and_then(sqlstate).as_deref(),
        Some("57P01"),
        "{end:?}"
    );
    let status = pooler
        .exited_within(
            Duration::from_secs(4),
            "the pooler stops before its shutdown_timeout (5 s)",
        )
        .await;
    assert!(status.success(), "{status:?}");
}

/// A TLS client parks too: its TLS session waits with it and goes on when it sends again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_park_and_come_back() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;

    let dir = tempfile::tempdir().expect("temp dir");
    let pki = crate::tls_tests::pki(&["localhost", "127.0.0.1"]);
    let cert = crate::tls_tests::write(dir.path(), "pooler.crt", &pki.cert_pem);
    let key = crate::tls_tests::write(dir.path(), "pooler.key", &pki.key_pem);
    let mut cfg = parking(vec![TenantCfg::new("t1", vec![UserCfg::postgres(2)])]);
    cfg.extra_toml = format!("[tls]\ncert = {cert:?}\nkey = {key:?}\n");
    let pooler = Pooler::start(&cfg);
    let port = pooler.transaction.port();
    let mut child = pg_program("psql")
        .args([
            &format!("host=127.0.0.1 port={port} user=postgres.t1 dbname=postgres sslmode=require"),
            "-X",
            "-At",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run psql");
    let mut stdin = child.stdin.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    for round in 1..=3 {
        writeln!(
            stdin,
            "SELECT {round} + 100, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();"
        )
        .unwrap();
        stdin.flush().unwrap();
        let line = within("psql answers", rx.recv())
            .await
            .expect("psql output");
        // The pooler's connection to PostgreSQL is plaintext; the client's is TLS.
        assert_eq!(line, format!("{}|f", round + 100), "round {round}");
        assert_eq!(
            parked_until(&pooler, 1.0).await,
            1.0,
            "round {round}: the TLS client parked"
        );
    }
    drop(stdin);
    let status = blocking(move || child.wait()).expect("psql exits");
    assert!(status.success(), "psql: {status:?}");
    assert_eq!(parked_until(&pooler, 0.0).await, 0.0);
}
