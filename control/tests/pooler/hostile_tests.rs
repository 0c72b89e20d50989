//! Hostile and failing surroundings: allow lists, repeated wrong passwords,
//! client timeouts, thousands of connections that never finish startup, a
//! database that restarts. Each also checks that a client of another tenant
//! keeps getting answers meanwhile.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::pgtemp::{PgOptions, TempPostgres};
use tokio_postgres::NoTls;

use crate::harness::*;

/// Connects from a given local address (127.0.0.x) as `user`.
async fn connect_from(
    local: &str,
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> Result<Conn, tokio_postgres::Error> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    let local: IpAddr = local.parse().expect("local address");
    socket
        .bind(SocketAddr::new(local, 0))
        .expect("bind the local address");
    let stream = within("tcp connect", socket.connect(addr))
        .await
        .expect("tcp connect");
    let cfg = client_config(addr, user, password);
    let (client, connection) = within("login", cfg.connect_raw(stream, NoTls)).await?;
    Ok(Conn {
        client,
        task: tokio::spawn(connection),
    })
}

/// A client of another tenant that runs a query every 50 ms until `stop`;
/// returns how many it ran and the slowest answer.
fn bystander(
    addr: SocketAddr,
    user: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Duration)> {
    tokio::spawn(async move {
        let c = try_connect(addr, user, PG_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("bystander {user} cannot connect: {e:?}"));
        let (mut n, mut slowest) = (0u64, Duration::ZERO);
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let v: i64 = within(
                "bystander query",
                c.query_one("SELECT $1::int8", &[&(n as i64)]),
            )
            .await
            .unwrap_or_else(|e| panic!("bystander query {n} failed: {e:?}"))
            .get(0);
            assert_eq!(v, n as i64);
            slowest = slowest.max(t.elapsed());
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (n, slowest)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_and_wrong_password_backoff() {
    let mut t1 = TenantCfg::new("t1", vec![UserCfg::postgres(2)]);
    t1.extra_toml = "allow_list = [\"127.0.0.2/32\", \"10.0.0.0/8\"]".into();
    let t2 = TenantCfg::new("t2", vec![UserCfg::postgres(2)]);
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![t1, t2]));
    let stop = Arc::new(AtomicBool::new(false));
    let watch = bystander(pooler.transaction, "postgres.t2", stop.clone());

    // allow_list: 127.0.0.1 is outside it, 127.0.0.2 inside.
    let r = connect_from("127.0.0.1", pooler.transaction, "postgres.t1", PG_PASSWORD).await;
    let msg = expect_code(r.map(|_| ()), "28000");
    assert!(msg.contains("address not allowed"), "{msg}");
    let c = connect_from("127.0.0.2", pooler.transaction, "postgres.t1", PG_PASSWORD)
        .await
        .expect("an allowed address logs in");
    let v: i32 = c.client.query_one("SELECT 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5);

    // Five wrong passwords from 127.0.0.3: then even the right one must wait.
    for i in 0..5 {
        let r = connect_from("127.0.0.3", pooler.session, "postgres.t2", "wrong").await;
        let msg = expect_code(r.map(|_| ()), "28P01");
        assert!(
            msg.contains("password authentication failed"),
            "attempt {i}: {msg}"
        );
    }
    let r = connect_from("127.0.0.3", pooler.session, "postgres.t2", PG_PASSWORD).await;
    let msg = expect_code(r.map(|_| ()), "28P01");
    assert!(msg.contains("too many failed logins"), "{msg}");
    // Another address is not held back.
    connect_from("127.0.0.4", pooler.session, "postgres.t2", PG_PASSWORD)
        .await
        .expect("another address logs in");
    // After the back-off (1 s for the fifth failure) the right password works again.
    let started = Instant::now();
    eventually("the back-off ends", Duration::from_secs(10), || async {
        connect_from("127.0.0.3", pooler.session, "postgres.t2", PG_PASSWORD)
            .await
            .is_ok()
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));

    stop.store(true, Ordering::Relaxed);
    let (n, slowest) = watch.await.expect("bystander");
    assert!(n > 0);
    eprintln!("bystander: {n} queries, slowest {slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_timeouts() {
    let mut t1 = TenantCfg::new("t1", vec![UserCfg::postgres(5)]);
    t1.extra_toml =
        "client_idle_timeout = 1500\nidle_transaction_timeout = 1500\nquery_timeout = 1000".into();
    let t2 = TenantCfg::new("t2", vec![UserCfg::postgres(2)]);
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![t1, t2]));
    let table = unique("timeouts");
    let d = direct().await;
    d.batch_execute(&format!("CREATE TABLE {table} (v int)"))
        .await
        .unwrap();

    for (port, addr) in pooler.ports() {
        // Idle with no transaction: closed with 57P05.
        let idle = connect_with(&client_config(addr, "postgres.t1", PG_PASSWORD))
            .await
            .unwrap();
        idle.client.simple_query("SELECT 1").await.unwrap();
        // Idle inside a transaction: closed with 25P03, the transaction rolled back.
        let in_txn = connect_with(&client_config(addr, "postgres.t1", PG_PASSWORD))
            .await
            .unwrap();
        in_txn
            .client
            .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
            .await
            .unwrap();
        // A long query: cancelled (57014), the client stays.
        let slow = connect_with(&client_config(addr, "postgres.t1", PG_PASSWORD))
            .await
            .unwrap();
        // A busy client: never idle long enough, from now to the end.
        let busy = connect_with(&client_config(addr, "postgres.t1", PG_PASSWORD))
            .await
            .unwrap();
        let busy_stop = Arc::new(AtomicBool::new(false));
        let busy_task = {
            let stop = busy_stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    busy.client
                        .simple_query("SELECT 1")
                        .await
                        .expect("busy client");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                busy
            })
        };

        let t = Instant::now();
        let r = within(
            "slow query",
            slow.client.simple_query("SELECT pg_sleep(30)"),
        )
        .await;
        expect_code(r, "57014");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{port}: cancelled late"
        );

        for (what, conn, code) in [
            ("idle", idle, "57P05"),
            ("idle in transaction", in_txn, "25P03"),
        ] {
            let ended = within_for(Duration::from_secs(10), what, conn.task)
                .await
                .expect("connection task");
            let e = ended.expect_err("the pooler closed it with an error");
            assert_eq!(sqlstate(&e).as_deref(), Some(code), "{port} {what}: {e:?}");
        }
        let n: i64 = d
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{port}: the idle transaction was rolled back");
        // The long query's client is still usable.
        slow.client
            .simple_query("SELECT 1")
            .await
            .expect("after cancel");
        busy_stop.store(true, Ordering::Relaxed);
        let busy = busy_task.await.expect("busy client task");
        busy.client
            .simple_query("SELECT 1")
            .await
            .expect("busy client");
    }
    // Another tenant without timeouts is left alone.
    let other = try_connect(pooler.transaction, "postgres.t2", PG_PASSWORD)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    other
        .simple_query("SELECT 1")
        .await
        .expect("no timeout for t2");
}

/// TCP_DEFER_ACCEPT (`proxy.tcp_defer_accept`, on by default): a connection that has sent
/// nothing stays in the kernel and costs the pooler no descriptor and no wake-up; its first
/// bytes bring it in. With the setting off the same connections are accepted at once.
#[tokio::test]
async fn silent_connections_wait_in_the_kernel() {
    for defer in [true, false] {
        let mut cfg = PoolerConfig::single(1);
        cfg.shards = 1;
        cfg.proxy_toml = format!("tcp_defer_accept = {defer}");
        let pooler = Pooler::start(&cfg);
        // The pool's one server connection and this client's socket are open from here on.
        let warm = connect(pooler.transaction).await;
        within("warm-up", warm.simple_query("SELECT 1"))
            .await
            .unwrap();
        let base = pooler.open_fds();
        const SILENT: usize = 10;
        let mut silent = Vec::new();
        for _ in 0..SILENT {
            silent.push(
                tokio::net::TcpStream::connect(pooler.transaction)
                    .await
                    .expect("connect"),
            );
        }
        // A client that connects after them is accepted and served: with one shard and
        // one listener the kernel's accept queue is first in, first out, so any silent
        // connection the kernel had handed over was accepted before this one.
        let later = connect(pooler.transaction).await;
        within("query", later.simple_query("SELECT 1"))
            .await
            .unwrap();
        let with_later = pooler.open_fds();
        if defer {
            assert_eq!(
                with_later,
                base + 1,
                "only the client that sent something holds a descriptor"
            );
        } else {
            assert_eq!(
                with_later,
                base + 1 + SILENT,
                "without TCP_DEFER_ACCEPT every connection is accepted at once"
            );
        }
        // First bytes (part of a startup packet's length) bring the silent ones in.
        for s in &mut silent {
            use tokio::io::AsyncWriteExt;
            s.write_all(&[0, 0]).await.expect("write");
        }
        eventually(
            "the silent connections are accepted once they send",
            Duration::from_secs(10),
            || {
                let p = &pooler;
                async move { p.open_fds() == base + 1 + SILENT }
            },
        )
        .await;
        drop(warm);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_startups_do_not_starve_others() {
    const N: usize = 15_000;
    let mut cfg = PoolerConfig::tenants(vec![TenantCfg::new("t2", vec![UserCfg::postgres(2)])]);
    // Unfinished startups are closed after 4 s.
    cfg.client_startup_timeout = Some(4000);
    let pooler = Pooler::start(&cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let watch = bystander(pooler.transaction, "postgres.t2", stop.clone());
    let rss_before = pooler.rss_kib();

    let mut socks = Vec::with_capacity(N);
    let opened = Instant::now();
    for i in 0..N {
        let addr = if i % 2 == 0 {
            pooler.transaction
        } else {
            pooler.session
        };
        // Three bytes of a startup packet's length, and no more: the kernel
        // hands the connection to the pooler (TCP_DEFER_ACCEPT waits for data).
        match tokio::net::TcpStream::connect(addr).await {
            Ok(mut s) => {
                use tokio::io::AsyncWriteExt;
                s.write_all(&[0, 0, 0])
                    .await
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                socks.push(s)
            }
            Err(e) => panic!("connection {i} failed: {e}"),
        }
    }
    let open_time = opened.elapsed();
    // Let the pooler accept them all (its RSS grows as it does).
    let mut rss_peak = pooler.rss_kib();
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(1500) {
        rss_peak = rss_peak.max(pooler.rss_kib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let per_conn = (rss_peak.saturating_sub(rss_before) * 1024) / N as u64;
    eprintln!(
        "{N} unfinished startups opened in {open_time:?}; pooler RSS {rss_before} KiB -> {rss_peak} KiB \
         ({per_conn} bytes per connection)"
    );
    assert!(
        per_conn < 16 * 1024,
        "{per_conn} bytes per unfinished connection"
    );

    // The startup timeout closes them all: each socket reads EOF.
    let closed_by = Instant::now() + Duration::from_secs(30);
    let mut closed = 0usize;
    for s in socks.iter_mut().step_by(50) {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 64];
        let left = closed_by.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) => closed += 1, // an error message, then the close
            Err(_) => break,
        }
    }
    assert_eq!(
        closed,
        N.div_ceil(50),
        "every unfinished startup is closed by the timeout"
    );
    drop(socks);
    stop.store(true, Ordering::Relaxed);
    let (n, slowest) = watch.await.expect("bystander");
    eprintln!("bystander: {n} queries meanwhile, slowest {slowest:?}");
    assert!(
        n > 20,
        "the other tenant's client kept getting answers ({n})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart_is_waited_out() {
    let db = TempPostgres::start_with(PgOptions {
        password: PG_PASSWORD.to_string(),
        ..PgOptions::default()
    })
    .expect("a PostgreSQL to restart");
    let mut restarting = TenantCfg::new("r", vec![UserCfg::postgres(3)]);
    restarting.db = Some((db.host.clone(), db.port));
    let other = TenantCfg::new("t2", vec![UserCfg::postgres(2)]);
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![restarting, other]));
    let stop = Arc::new(AtomicBool::new(false));
    let watch = bystander(pooler.transaction, "postgres.t2", stop.clone());

    let clients: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let c = try_connect(pooler.transaction, "postgres.r", PG_PASSWORD)
                .await
                .unwrap();
            c.simple_query("SELECT 1").await.unwrap();
            v.push(c);
        }
        v
    };

    // pg_ctl restart: the pool's idle connections die with the server.
    let db = Arc::new(db);
    let restart = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || db.restart())
    };
    within_for(Duration::from_secs(90), "pg_ctl restart", restart)
        .await
        .unwrap()
        .expect("restart");
    // Every client, idle during the restart, keeps working: no reconnect.
    for (i, c) in clients.iter().enumerate() {
        let v: i32 = within(
            "query after restart",
            c.query_one("SELECT $1::int4", &[&(i as i32)]),
        )
        .await
        .unwrap_or_else(|e| panic!("client {i} after restart: {e:?}"))
        .get(0);
        assert_eq!(v, i as i32);
    }

    // Down for a while (a failover-like stop / start): new transactions wait, then succeed.
    {
        let db = db.clone();
        tokio::task::spawn_blocking(move || db.stop_for_now())
            .await
            .unwrap()
            .expect("stop");
    }
    let mut waiting = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        waiting.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c.query_one("SELECT $1::int4 + 100", &[&(i as i32)]).await;
            (i, r.map(|row| row.get::<_, i32>(0)), t.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    {
        let db = db.clone();
        tokio::task::spawn_blocking(move || db.start_again())
            .await
            .unwrap()
            .expect("start again");
    }
    for w in waiting {
        let (i, r, waited) = within_for(Duration::from_secs(60), "waiting query", w)
            .await
            .unwrap();
        assert_eq!(
            r.unwrap_or_else(|e| panic!("client {i}: {e:?}")),
            i as i32 + 100
        );
        assert!(
            waited >= Duration::from_millis(1000),
            "client {i} did wait ({waited:?})"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (n, slowest) = watch.await.expect("bystander");
    eprintln!("bystander during the restarts: {n} queries, slowest {slowest:?}");
    assert!(n > 10);
}
