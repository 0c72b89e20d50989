//! Queries, transactions, COPY, big values and session hygiene through both ports.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{pin_mut, SinkExt, TryStreamExt};
use md5::{Digest, Md5};
use tokio_postgres::SimpleQueryMessage;

use crate::harness::*;

/// Values of the data rows of a simple-query response, row by row.
fn simple_rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Simple and extended protocol through both ports, values checked; a prepared statement reused
/// many times (in transaction mode it crosses server connections).
#[tokio::test]
async fn simple_and_extended_queries_both_ports() {
    let pooler = Pooler::start(&PoolerConfig::single(3));
    for (port, addr) in pooler.ports() {
        let c = connect(addr).await;
        let msgs = within(
            "simple query",
            c.simple_query("SELECT 1 AS a, 'x' AS b; SELECT 2"),
        )
        .await
        .unwrap();
        assert_eq!(
            simple_rows(&msgs),
            vec![
                vec![Some("1".into()), Some("x".into())],
                vec![Some("2".into())]
            ],
            "{port}"
        );
        let row = within(
            "extended query",
            c.query_one(
                "SELECT $1::int4 + $2::int4, $3::text || '!'",
                &[&2i32, &40i32, &"hi"],
            ),
        )
        .await
        .unwrap();
        assert_eq!(row.get::<_, i32>(0), 42, "{port}");
        assert_eq!(row.get::<_, String>(1), "hi!", "{port}");

        let stmt = within("prepare", c.prepare("SELECT $1::int8 * 2"))
            .await
            .unwrap();
        for i in 0..50i64 {
            let row = within("execute prepared", c.query_one(&stmt, &[&i]))
                .await
                .unwrap();
            assert_eq!(row.get::<_, i64>(0), i * 2, "{port}");
        }
        // Unnamed statement, one round trip.
        let rows = within(
            "query_typed",
            c.query_typed(
                "SELECT g FROM generate_series(1, $1) g",
                &[(&5i32, tokio_postgres::types::Type::INT4)],
            ),
        )
        .await
        .unwrap();
        let got: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5], "{port}");
    }
}

/// 100 statements in one transaction on the transaction port: one backend transaction throughout,
/// invisible to others until COMMIT, then all visible.
#[tokio::test]
async fn long_transaction_is_atomic() {
    let pooler = Pooler::start(&PoolerConfig::single(3));
    let table = unique("long_tx");
    let d = direct().await;
    d.batch_execute(&format!("CREATE TABLE {table} (i int)"))
        .await
        .unwrap();
    let c = connect(pooler.transaction).await;
    within(
        "BEGIN",
        c.batch_execute("BEGIN; SET LOCAL application_name = 'long_tx'"),
    )
    .await
    .unwrap();
    let xid: i64 = within("txid", c.query_one("SELECT txid_current()", &[]))
        .await
        .unwrap()
        .get(0);
    let insert = c
        .prepare(&format!("INSERT INTO {table} VALUES ($1)"))
        .await
        .unwrap();
    for i in 0..100i32 {
        if i % 2 == 0 {
            within("insert", c.execute(&insert, &[&i])).await.unwrap();
        } else {
            within(
                "insert",
                c.simple_query(&format!("INSERT INTO {table} VALUES ({i})")),
            )
            .await
            .unwrap();
        }
        if i == 50 {
            let n: i64 = d
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 0, "uncommitted rows visible to another session");
        }
    }
    let row = within(
        "end state",
        c.query_one(
            &format!(
                "SELECT txid_current(), current_setting('application_name'), \
                 (SELECT count(*) FROM {table})"
            ),
            &[],
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        xid,
        "statements ran in different transactions"
    );
    assert_eq!(row.get::<_, String>(1), "long_tx");
    assert_eq!(row.get::<_, i64>(2), 100);
    within("COMMIT", c.batch_execute("COMMIT")).await.unwrap();
    let row = d
        .query_one(&format!("SELECT count(*), sum(i)::int8 FROM {table}"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 100);
    assert_eq!(row.get::<_, i64>(1), 99 * 100 / 2);
    let app: String = within(
        "after commit",
        c.query_one("SELECT current_setting('application_name')", &[]),
    )
    .await
    .unwrap()
    .get(0);
    assert_ne!(app, "long_tx", "SET LOCAL outlived its transaction");
}

/// An error inside a transaction, ROLLBACK, and the connection works again; same for an error
/// in the extended protocol outside a transaction.
#[tokio::test]
async fn error_in_transaction_then_rollback_both_ports() {
    let pooler = Pooler::start(&PoolerConfig::single(2));
    for (port, addr) in pooler.ports() {
        let c = connect(addr).await;
        within("BEGIN", c.batch_execute("BEGIN")).await.unwrap();
        expect_code(
            within("div by zero", c.simple_query("SELECT 1/0")).await,
            "22012",
        );
        // The block is aborted until ROLLBACK.
        expect_code(
            within("in failed tx", c.simple_query("SELECT 1")).await,
            "25P02",
        );
        within("ROLLBACK", c.batch_execute("ROLLBACK"))
            .await
            .unwrap();
        let v: i32 = within("after rollback", c.query_one("SELECT 7", &[]))
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 7, "{port}");
        expect_code(
            within("extended error", c.query("SELECT 1/$1::int", &[&0i32])).await,
            "22012",
        );
        let v: i32 = within(
            "after extended error",
            c.query_one("SELECT $1::int", &[&8i32]),
        )
        .await
        .unwrap()
        .get(0);
        assert_eq!(v, 8, "{port}");
        let status = within("status", c.simple_query("SHOW transaction_isolation"))
            .await
            .unwrap();
        assert_eq!(simple_rows(&status).len(), 1, "{port}");
    }
}

/// COPY FROM STDIN and COPY TO STDOUT with tokio-postgres through both ports.
#[tokio::test]
async fn copy_in_and_out_both_ports() {
    let pooler = Pooler::start(&PoolerConfig::single(2));
    let d = direct().await;
    for (port, addr) in pooler.ports() {
        let table = unique("copy");
        d.batch_execute(&format!("CREATE TABLE {table} (i int, t text)"))
            .await
            .unwrap();
        let c = connect(addr).await;
        const N: i64 = 20_000;
        let sink = within(
            "COPY IN start",
            c.copy_in::<_, Bytes>(&format!("COPY {table} FROM STDIN")),
        )
        .await
        .unwrap();
        pin_mut!(sink);
        let mut chunk = String::new();
        for i in 1..=N {
            chunk.push_str(&format!("{i}\trow {i}\n"));
            if i % 1000 == 0 {
                within(
                    "COPY IN send",
                    sink.send(Bytes::from(std::mem::take(&mut chunk))),
                )
                .await
                .unwrap();
            }
        }
        let copied = within("COPY IN finish", sink.finish()).await.unwrap();
        assert_eq!(copied as i64, N, "{port}");

        let row = within(
            "count after copy",
            c.query_one(&format!("SELECT count(*), sum(i)::int8 FROM {table}"), &[]),
        )
        .await
        .unwrap();
        assert_eq!(row.get::<_, i64>(0), N, "{port}");
        assert_eq!(row.get::<_, i64>(1), N * (N + 1) / 2, "{port}");

        let stream = within(
            "COPY OUT start",
            c.copy_out(&format!(
                "COPY (SELECT i, t FROM {table} ORDER BY i) TO STDOUT"
            )),
        )
        .await
        .unwrap();
        let chunks: Vec<Bytes> = within("COPY OUT read", stream.try_collect()).await.unwrap();
        let text: Vec<u8> = chunks.concat();
        let text = String::from_utf8(text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() as i64, N, "{port}");
        assert_eq!(lines[0], "1\trow 1", "{port}");
        assert_eq!(lines[N as usize - 1], format!("{N}\trow {N}"), "{port}");

        // A failed COPY (bad data) leaves the connection usable.
        let sink = within(
            "COPY IN bad start",
            c.copy_in::<_, Bytes>(&format!("COPY {table} FROM STDIN")),
        )
        .await
        .unwrap();
        pin_mut!(sink);
        within(
            "COPY IN bad send",
            sink.send(Bytes::from_static(b"notanumber\tx\n")),
        )
        .await
        .unwrap();
        expect_code(within("COPY IN bad finish", sink.finish()).await, "22P02");
        let v: i64 = within(
            "after bad copy",
            c.query_one(&format!("SELECT count(*) FROM {table}"), &[]),
        )
        .await
        .unwrap()
        .get(0);
        assert_eq!(v, N, "{port}");
    }
}

/// psql's `\copy` in both directions through both ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copy_both_ports() {
    let pooler = Pooler::start(&PoolerConfig::single(2));
    let d = direct().await;
    for (port, addr) in pooler.ports() {
        let table = unique("pcopy");
        d.batch_execute(&format!("CREATE TABLE {table} (i int, t text)"))
            .await
            .unwrap();
        let input: String = (1..=5000).map(|i| format!("{i}\tv{i}\n")).collect();
        let out = run_psql(
            addr,
            &format!("\\copy {table} from stdin"),
            input.as_bytes(),
        );
        assert!(out.contains("COPY 5000"), "{port}: psql said {out:?}");
        let out = run_psql(addr, &format!("\\copy {table} to stdout"), b"");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5000, "{port}");
        assert!(lines.contains(&"4321\tv4321"), "{port}");
        let n: i64 = d
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 5000, "{port}");
    }
}

/// Run `psql -X -At -c CMD` through the pooler as `postgres.t1`, feeding `stdin`; returns stdout,
/// panicking with stderr on failure.
pub fn run_psql(addr: std::net::SocketAddr, cmd: &str, stdin: &[u8]) -> String {
    use std::io::Write;
    let mut child = pg_program("psql")
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-U", "postgres.t1", "-d", "postgres", "-c", cmd])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn psql");
    let mut w = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&data);
    });
    let out = wait_output(child, Duration::from_secs(30), "psql");
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "psql -c {cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `wait_with_output`, but killing the child (by its pid) after `limit`.
pub fn wait_output(
    child: std::process::Child,
    limit: Duration,
    what: &str,
) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for child"),
        Err(_) => {
            // SAFETY: our own child, by pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            panic!("{what} did not finish within {limit:?}");
        }
    }
}

/// psql through both ports returns the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_select_both_ports() {
    let pooler = Pooler::start(&PoolerConfig::single(2));
    for (port, addr) in pooler.ports() {
        let out = run_psql(addr, "select 1", b"");
        assert_eq!(out.trim(), "1", "{port}");
        let out = run_psql(addr, "select current_user, 6 * 7", b"");
        assert_eq!(out.trim(), "postgres|42", "{port}");
    }
}

/// A 200k-row result arrives complete, through both protocols and both ports.
#[tokio::test]
async fn large_result_set() {
    let pooler = Pooler::start(&PoolerConfig::single(2));
    const N: i64 = 200_000;
    for (port, addr) in pooler.ports() {
        let c = connect(addr).await;
        let rows = within(
            "200k rows extended",
            c.query("SELECT g::int8 FROM generate_series(1, $1::int8) g", &[&N]),
        )
        .await
        .unwrap();
        assert_eq!(rows.len() as i64, N, "{port}");
        let sum: i64 = rows.iter().map(|r| r.get::<_, i64>(0)).sum();
        assert_eq!(sum, N * (N + 1) / 2, "{port}");

        let msgs = within(
            "200k rows simple",
            c.simple_query(&format!(
                "SELECT g, repeat('x', 20) FROM generate_series(1, {N}) g"
            )),
        )
        .await
        .unwrap();
        let rows = simple_rows(&msgs);
        assert_eq!(rows.len() as i64, N, "{port}");
        let sum: i64 = rows
            .iter()
            .map(|r| r[0].as_deref().unwrap().parse::<i64>().unwrap())
            .sum();
        assert_eq!(sum, N * (N + 1) / 2, "{port}");
        assert!(rows
            .iter()
            .all(|r| r[1].as_deref() == Some("xxxxxxxxxxxxxxxxxxxx")));
    }
}

/// A 10 MB text parameter round-trips intact (length and md5 compared).
#[tokio::test]
async fn ten_megabyte_parameter() {
    let pooler = Pooler::start(&PoolerConfig::single(2));
    let mut rng = Rng::new(7);
    let big: String = (0..10 * 1024 * 1024)
        .map(|_| (b'a' + rng.below(26) as u8) as char)
        .collect();
    let local_md5: String = Md5::digest(big.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for (port, addr) in pooler.ports() {
        let c = connect(addr).await;
        let row = within(
            "10 MB parameter",
            c.query_one("SELECT length($1::text), md5($1::text), $1::text", &[&big]),
        )
        .await
        .unwrap();
        assert_eq!(row.get::<_, i32>(0) as usize, big.len(), "{port}");
        assert_eq!(row.get::<_, String>(1), local_md5, "{port}");
        let echoed: String = row.get(2);
        assert!(echoed == big, "{port}: echoed value differs");
        // And the connection still serves small queries afterwards.
        let v: i32 = within("after big", c.query_one("SELECT 1", &[]))
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 1);
    }
}

/// Session mode resets a server connection (DISCARD ALL) before the next client gets it.
#[tokio::test]
async fn session_port_discards_state_between_clients() {
    let pooler = Pooler::start(&PoolerConfig::single(1));
    let a = connect(pooler.session).await;
    within(
        "client A leaves state behind",
        a.batch_execute(
            "SET application_name = 'leak'; CREATE TEMP TABLE leak_tmp (i int); \
             PREPARE leak_stmt AS SELECT 1; SET search_path = leak_schema",
        ),
    )
    .await
    .unwrap();
    let row = within(
        "A's view",
        a.query_one(
            "SELECT pg_backend_pid(), current_setting('application_name'), \
             (SELECT count(*) FROM pg_prepared_statements WHERE name = 'leak_stmt')",
            &[],
        ),
    )
    .await
    .unwrap();
    let pid_a: i32 = row.get(0);
    assert_eq!(row.get::<_, String>(1), "leak");
    assert_eq!(row.get::<_, i64>(2), 1);
    drop(a);

    // Pool size 1: B waits for A's server connection to come back, then gets it reset.
    let b = connect(pooler.session).await;
    let row = within(
        "B's view",
        b.query_one(
            "SELECT pg_backend_pid(), current_setting('application_name'), \
             (SELECT count(*) FROM pg_prepared_statements WHERE name = 'leak_stmt'), \
             to_regclass('leak_tmp') IS NULL, current_setting('search_path')",
            &[],
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        row.get::<_, i32>(0),
        pid_a,
        "pool_size 1: B should reuse A's server connection"
    );
    assert_ne!(row.get::<_, String>(1), "leak", "application_name leaked");
    assert_eq!(row.get::<_, i64>(2), 0, "prepared statement leaked");
    assert!(row.get::<_, bool>(3), "temp table leaked");
    assert_ne!(row.get::<_, String>(4), "leak_schema", "search_path leaked");
    expect_code(
        within("EXECUTE leaked", b.simple_query("EXECUTE leak_stmt")).await,
        "26000",
    );
}

/// `user=postgres` with `options=reference=t1` selects the tenant, on both ports.
#[tokio::test]
async fn options_reference_selects_tenant() {
    let pooler = Pooler::start(&PoolerConfig::single(2));
    for (port, addr) in pooler.ports() {
        let mut cfg = client_config(addr, "postgres", PG_PASSWORD);
        cfg.options("reference=t1");
        let conn = connect_with(&cfg)
            .await
            .unwrap_or_else(|e| panic!("{port}: options=reference=t1 login failed: {e:?}"));
        let row = within(
            "query",
            conn.client
                .query_one("SELECT current_user::text, $1::int", &[&5i32]),
        )
        .await
        .unwrap();
        assert_eq!(row.get::<_, String>(0), "postgres", "{port}");
        assert_eq!(row.get::<_, i32>(1), 5, "{port}");

        let mut cfg = client_config(addr, "postgres", PG_PASSWORD);
        cfg.options("reference=no_such_tenant_ref");
        let e = connect_with(&cfg)
            .await
            .err()
            .expect("an unknown reference must be refused");
        let db = e.as_db_error().unwrap_or_else(|| panic!("{port}: {e:?}"));
        assert!(
            db.message().contains("no_such_tenant_ref"),
            "{port}: message should name the tenant: {}",
            db.message()
        );
    }
}
