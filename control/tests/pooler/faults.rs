//! Cancels, limits, timeouts and failures of either side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::harness::*;

/// Number of backends whose current query text contains `pattern` and whose state is LIKE
/// `state` (the calling backend excluded).
async fn backends(d: &Client, pattern: &str, state: &str) -> i64 {
    d.query_one(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND query LIKE $1 AND state LIKE $2",
        &[&format!("%{pattern}%"), &state],
    )
    .await
    .unwrap()
    .get(0)
}

/// `SELECT pg_sleep(30)` cancelled through the pooler returns 57014 quickly, repeatedly (cancel
/// connections spread over both shards), on both ports; the client keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_running_query() {
    let pooler = Pooler::start(&PoolerConfig::single(3));
    let d = direct().await;
    for (port, addr, rounds) in [
        ("transaction", pooler.transaction, 8),
        ("session", pooler.session, 4),
    ] {
        let c = Arc::new(connect(addr).await);
        let token = c.cancel_token();
        for round in 0..rounds {
            let tag = unique("cancel_me");
            let c2 = c.clone();
            let sql = format!("SELECT pg_sleep(30) /* {tag} */");
            let running = tokio::spawn(async move { c2.simple_query(&sql).await });
            // Cancel only once the query runs in a backend (an earlier cancel may rightly be lost).
            let (dref, tagref, run_ref) = (&d, &tag, &running);
            eventually(
                &format!("{port} round {round}: pg_sleep running"),
                Duration::from_secs(10),
                || async move {
                    run_ref.is_finished() || backends(dref, tagref, "active").await == 1
                },
            )
            .await;
            if running.is_finished() {
                panic!(
                    "{port} round {round}: the query ended before it was cancelled: {:?}",
                    running.await
                );
            }
            let start = Instant::now();
            within("send cancel", cancel_and_wait(&token, addr))
                .await
                .unwrap_or_else(|e| panic!("{port} round {round}: {e}"));
            let r = within_for(Duration::from_secs(5), "cancelled query returns", running)
                .await
                .unwrap();
            expect_code(r, "57014");
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{port} round {round}: cancel took {:?}",
                start.elapsed()
            );
            let v: i32 = within("after cancel", c.query_one("SELECT $1::int", &[&round]))
                .await
                .unwrap()
                .get(0);
            assert_eq!(v, round, "{port}");
        }
    }
}

/// max_clients = 2: the third concurrent client gets 53300; a slot frees when a client leaves.
#[tokio::test]
async fn max_clients_enforced() {
    let mut user = UserCfg::postgres(2);
    user.max_clients = 2;
    let mut tenant = TenantCfg::new("t1", vec![user]);
    tenant.default_max_clients = 2;
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![tenant]));
    let addr = pooler.transaction;
    let a = connect(addr).await;
    let b = connect(addr).await;
    for c in [&a, &b] {
        let v: i32 = within("held client", c.query_one("SELECT 1", &[]))
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 1);
    }
    expect_code(try_connect(addr, "postgres.t1", PG_PASSWORD).await, "53300");
    // The refused client did not take a slot, and the held ones still work.
    let v: i32 = within("held client", a.query_one("SELECT 2", &[]))
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 2);
    drop(b);
    eventually(
        "a slot frees after a client leaves",
        Duration::from_secs(10),
        || async move {
            match try_connect(addr, "postgres.t1", PG_PASSWORD).await {
                Ok(c) => c.query_one("SELECT 1", &[]).await.is_ok(),
                Err(e) => {
                    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e:?}");
                    false
                }
            }
        },
    )
    .await;
}

/// pool_size 1, checkout timeout 500 ms: while A holds the only connection in a transaction, B
/// gets a timeout error in bounded time; after A commits, clients work again.
#[tokio::test]
async fn checkout_timeout() {
    let mut user = UserCfg::postgres(1);
    user.pool_checkout_timeout = 500;
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![TenantCfg::new(
        "t1",
        vec![user],
    )]));
    let addr = pooler.transaction;
    let a = connect(addr).await;
    within("A warms the pool", a.simple_query("SELECT 1"))
        .await
        .unwrap();
    let b = connect(addr).await;
    within("B before A's transaction", b.simple_query("SELECT 1"))
        .await
        .unwrap();
    within("A BEGIN", a.batch_execute("BEGIN; SELECT 1"))
        .await
        .unwrap();

    let start = Instant::now();
    let r = within_for(
        Duration::from_secs(10),
        "B's query must fail, not hang",
        b.simple_query("SELECT 2"),
    )
    .await;
    let elapsed = start.elapsed();
    let Err(e) = r else {
        panic!("B's query must fail while the pool is exhausted");
    };
    let msg = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {e:?}"))
        .message()
        .to_lowercase();
    assert!(
        msg.contains("timeout") || msg.contains("timed out"),
        "message: {msg}"
    );
    assert!(
        elapsed < Duration::from_secs(2) && elapsed >= Duration::from_millis(400),
        "checkout timeout of 500 ms took {elapsed:?}"
    );

    // Waiters that queue at different times each get their own 500 ms:
    // the second is not timed out with the first, nor left waiting.
    let admin = crate::console_tests::console(pooler.session).await;
    let waiting_clients = |n: &'static str| {
        let admin = &admin;
        eventually(
            "the checkout is queued",
            Duration::from_secs(5),
            move || async move {
                crate::console_tests::show(admin, "SHOW POOLS")
                    .await
                    .iter()
                    .any(|p| p["database"] == "t1" && p["cl_waiting"] == n)
            },
        )
    };
    let c = connect(addr).await;
    let d = connect(addr).await;
    let first = tokio::spawn(async move {
        let start = Instant::now();
        let r = c.simple_query("SELECT 5").await;
        (r.is_err(), start.elapsed(), c)
    });
    waiting_clients("1").await;
    // The second waiter queues 250 ms after the first (the offset under test).
    tokio::time::sleep(Duration::from_millis(250)).await;
    let start = Instant::now();
    let second = within_for(
        Duration::from_secs(10),
        "D must fail, not hang",
        d.simple_query("SELECT 6"),
    )
    .await;
    let second_took = start.elapsed();
    let (first_failed, first_took, _c) = within("C's query", first).await.unwrap();
    assert!(first_failed && second.is_err(), "both waiters time out");
    for (who, took) in [("first", first_took), ("second", second_took)] {
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(2),
            "{who} waiter of a 500 ms checkout timeout took {took:?}"
        );
    }
    // A waiter served before its deadline gets the connection.
    let e = connect(addr).await;
    let waiting = tokio::spawn(async move {
        let v: i32 = e.query_one("SELECT 7", &[]).await.unwrap().get(0);
        v
    });
    waiting_clients("1").await;
    within("A COMMIT", a.batch_execute("COMMIT")).await.unwrap();
    assert_eq!(within("E's query", waiting).await.unwrap(), 7);

    let c = connect(addr).await;
    let v: i32 = within("C after A committed", c.query_one("SELECT 3", &[]))
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 3);
    let v: i32 = within("A after commit", a.query_one("SELECT 4", &[]))
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 4);
}

/// A session client's backend is terminated: the client gets 08006 (or the server's 57P01
/// relayed) and new clients get a fresh connection. On the transaction port an idle pooled
/// backend that dies is replaced before the next client uses it.
#[tokio::test]
async fn server_backend_killed() {
    let pooler = Pooler::start(&PoolerConfig::single(1));
    let d = direct().await;

    let a = connect_with(&client_config(pooler.session, "postgres.t1", PG_PASSWORD))
        .await
        .unwrap();
    // The simple protocol: an extended query would leave tokio-postgres' Close of its
    // statement in flight, and the server's FATAL would answer that Close, not the query.
    let pid = simple_pid(&a.client).await;
    terminate(&d, pid).await;
    let r = within("A after kill", a.client.simple_query("SELECT 1")).await;
    let Err(query_err) = r else {
        panic!("A's query on a killed backend must fail");
    };
    let mut codes = vec![sqlstate(&query_err)];
    let task_end = within("A's connection ends", a.task).await.unwrap();
    if let Err(e) = &task_end {
        codes.push(sqlstate(e));
    }
    assert!(
        codes.iter().flatten().any(|c| c == "08006" || c == "57P01"),
        "expected 08006 or 57P01, got {codes:?} (query: {query_err:?}; connection: {task_end:?})"
    );
    drop(a.client);
    let b = connect(pooler.session).await;
    let pid_b: i32 = within("B pid", b.query_one("SELECT pg_backend_pid()", &[]))
        .await
        .unwrap()
        .get(0);
    assert_ne!(pid_b, pid);
    drop(b);

    // Transaction port: kill the pool's idle backend, then a new client must be served.
    let t = connect(pooler.transaction).await;
    let pid: i32 = within("T pid", t.query_one("SELECT pg_backend_pid()", &[]))
        .await
        .unwrap()
        .get(0);
    drop(t);
    terminate(&d, pid).await;
    let n = connect(pooler.transaction).await;
    let row = within(
        "new client after idle backend died",
        n.query_one("SELECT pg_backend_pid(), 5", &[]),
    )
    .await
    .unwrap_or_else(|e| panic!("new client failed after the pooled backend died: {e:?}"));
    assert_ne!(row.get::<_, i32>(0), pid);
    assert_eq!(row.get::<_, i32>(1), 5);
}

/// The backend pid of a connection, read with a simple query.
async fn simple_pid(c: &Client) -> i32 {
    let msgs = within("pid", c.simple_query("SELECT pg_backend_pid()"))
        .await
        .unwrap();
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .expect("a pid row")
}

/// pg_terminate_backend(pid) and wait until the backend is gone.
async fn terminate(d: &Client, pid: i32) {
    let ok: bool = d
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(ok, "pg_terminate_backend({pid})");
    eventually(
        "terminated backend exits",
        Duration::from_secs(10),
        || async move {
            let n: i64 = d
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .await
                .unwrap()
                .get(0);
            n == 0
        },
    )
    .await;
}

/// A client vanishes (socket closed, no Terminate) in the middle of a transaction: its insert
/// is rolled back, no backend stays idle in transaction, and the pool (size 1) keeps serving.
#[tokio::test]
async fn client_killed_mid_transaction() {
    let pooler = Pooler::start(&PoolerConfig::single(1));
    let d = direct().await;
    for (port, addr) in pooler.ports() {
        let table = unique("killed");
        d.batch_execute(&format!("CREATE TABLE {table} (i int)"))
            .await
            .unwrap();
        let a = connect_with(&client_config(addr, "postgres.t1", PG_PASSWORD))
            .await
            .unwrap();
        within(
            "A BEGIN; INSERT",
            a.client
                .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)")),
        )
        .await
        .unwrap();
        let dref = &d;
        let tref = &table;
        eventually(
            &format!("{port}: A's backend is idle in transaction"),
            Duration::from_secs(5),
            || async move { backends(dref, tref, "idle in transaction%").await == 1 },
        )
        .await;
        // Abrupt: the connection task (owning the socket) is dropped, no Terminate is sent.
        a.task.abort();
        let _ = a.task.await;
        drop(a.client);

        eventually(
            &format!("{port}: no backend left idle in transaction"),
            Duration::from_secs(10),
            || async move { backends(dref, tref, "idle in transaction%").await == 0 },
        )
        .await;
        let n: i64 = d
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{port}: the vanished client's insert is visible");

        let b = connect(addr).await;
        within(
            "B uses the pool of size 1",
            b.batch_execute(&format!("INSERT INTO {table} VALUES (2)")),
        )
        .await
        .unwrap_or_else(|e| panic!("{port}: pool unusable after a client vanished: {e:?}"));
        let n: i64 = within(
            "B counts",
            b.query_one(&format!("SELECT count(*) FROM {table}"), &[]),
        )
        .await
        .unwrap()
        .get(0);
        assert_eq!(n, 1, "{port}");
    }
}

/// SIGTERM: an open transaction may still commit during the drain, idle clients are told
/// (57P01 when the reason is sent), new clients are refused, and the process exits in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits() {
    let mut cfg = PoolerConfig::single(2);
    cfg.shutdown_timeout = 3000;
    let mut pooler = Pooler::start(&cfg);
    let table = unique("drain");
    let d = direct().await;
    d.batch_execute(&format!("CREATE TABLE {table} (i int)"))
        .await
        .unwrap();
    let idle = connect_with(&client_config(
        pooler.transaction,
        "postgres.t1",
        PG_PASSWORD,
    ))
    .await
    .unwrap();
    within("idle client works", idle.client.simple_query("SELECT 1"))
        .await
        .unwrap();
    let busy = connect(pooler.transaction).await;
    within(
        "busy client opens a transaction",
        busy.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)")),
    )
    .await
    .unwrap();

    let start = Instant::now();
    pooler.signal_term();
    // The idle client (between transactions) is closed: proof that the drain has begun.
    let idle_end = within_for(
        Duration::from_secs(5),
        "idle client is closed after SIGTERM",
        idle.task,
    )
    .await
    .unwrap();
    if let Err(e) = &idle_end {
        if let Some(code) = sqlstate(e) {
            assert_eq!(code, "57P01", "idle client closed with {e:?}");
        }
    }
    // While draining, a new client is not admitted (refused, or left waiting: not served).
    let late = tokio::time::timeout(
        Duration::from_millis(500),
        try_connect(pooler.transaction, "postgres.t1", PG_PASSWORD),
    )
    .await;
    match &late {
        Ok(Ok(_)) => panic!("a new client got in during the drain"),
        Ok(Err(e)) => eprintln!("client during the drain: refused: {e}"),
        Err(_) => eprintln!("client during the drain: no answer within 500 ms"),
    }
    within(
        "an open transaction commits during the drain",
        busy.batch_execute(&format!("INSERT INTO {table} VALUES (2); COMMIT")),
    )
    .await
    .unwrap_or_else(|e| panic!("COMMIT during the drain failed: {e:?}"));
    let n: i64 = d
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the drained transaction did not commit");

    let pooler_ref = &mut pooler;
    let deadline = Duration::from_secs(3 + 5);
    loop {
        if let Some(status) = pooler_ref.exit_status() {
            assert!(status.success(), "supavisor exited with {status}");
            break;
        }
        assert!(
            start.elapsed() < deadline,
            "supavisor still running {deadline:?} after SIGTERM (shutdown_timeout 3 s)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
