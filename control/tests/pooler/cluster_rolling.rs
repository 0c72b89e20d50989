//! Rolling restart of a three-node cluster under load. pgbench runs through every node while each
//! node in turn gets SIGTERM, exits, starts again on its store and ports, and rejoins. The pool has
//! one owner at a time; when the owner stops it drains, hands its pool back through the raft log,
//! and the next client through a survivor claims it at once.
//!
//! Load: one pgbench loop per node, each pointed at its own node only — the deployment where every
//! application host talks to "its" pooler (a local one, or one per zone) and reconnects when that
//! pooler goes away. pgbench aborts a client whose connection ends and never reconnects it, so the
//! loop starts pgbench again when it exits, after a short back-off while its node is down (an
//! application's reconnect). A libpq multi-host string (`-h a,b,c -p x,y,z`) would move a loop's
//! new connections to the next node while its own is down instead of waiting for it; the clients
//! that fail are the same (pgbench never reconnects a client), and it would hide which node
//! carried which transaction, which this test counts.
//!
//! Each transaction is `BEGIN; UPDATE; INSERT; END;` with the loop's node id in the inserted row, so
//! the database itself says what committed through which node and when (`clock_timestamp()`).
//! pgbench's "client N ... aborted in command C" lines say where each failed client stood:
//! command 0 (`BEGIN`) means between transactions, 1 or 2 inside one, 3 (`END`) at its commit.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::basic::wait_output;
use crate::cluster_tests::*;
use crate::harness::*;

/// pgbench clients per node.
const CLIENTS: u32 = 3;
const POOL_SIZE: u32 = 4;
/// Seconds per pgbench run (`-T`): a loop whose clients all aborted starts again.
const RUN_SECS: u64 = 3;
/// Long enough that a pool handed over by a stopping owner is told apart from one released by the
/// leader for silence.
const CLAIM_TIMEOUT_MS: u64 = 5000;
/// A loop's pause after a run that could not connect (its node is down).
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// One pgbench run of a loop.
#[derive(Debug, Clone)]
struct Run {
    node: u64,
    ended: Instant,
    /// "number of transactions actually processed".
    processed: u64,
    aborts: Vec<Abort>,
    /// The run could not connect (no summary): pgbench's first error line.
    no_connect: Option<String>,
}

/// A pgbench client aborted: the script command it was in, and why.
#[derive(Debug, Clone)]
struct Abort {
    command: Option<u32>,
    line: String,
}

impl Abort {
    /// Where the client stood (see the module comment).
    fn place(&self) -> &'static str {
        match self.command {
            Some(0) => "between transactions",
            Some(1 | 2) => "mid-transaction",
            Some(3) => "at commit",
            _ => "unknown",
        }
    }

    /// Why, from the message.
    fn cause(&self) -> &'static str {
        let l = &self.line;
        if l.contains("the pooler is shutting down") {
            "57P01 drain"
        } else if l.contains("cluster:") {
            "08006 cluster refusal"
        } else if l.contains("closed the connection") || l.contains("backend died") {
            "connection lost"
        } else {
            "other"
        }
    }
}

fn parse_run(node: u64, out: &std::process::Output) -> Run {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let processed = stdout.lines().find_map(|l| {
        l.strip_prefix("number of transactions actually processed: ")?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    });
    let aborts = stderr
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("aborted in command ")?;
            let command = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok());
            Some(Abort {
                command,
                line: l.trim_start_matches("pgbench: error: ").to_string(),
            })
        })
        .collect();
    let no_connect = processed.is_none().then(|| {
        stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .to_string()
    });
    Run {
        node,
        ended: Instant::now(),
        processed: processed.unwrap_or(0),
        aborts,
        no_connect,
    }
}

/// Runs pgbench against one node until `stop`, again and again.
fn pgbench_loop(
    node: u64,
    port: u16,
    user: String,
    password: String,
    script: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    runs: Arc<Mutex<Vec<Run>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let child = pg_program("pgbench")
            .env("PGPASSWORD", &password)
            .arg("-n")
            .arg("-f")
            .arg(&script)
            .args(["-c", &CLIENTS.to_string(), "-j", "1"])
            .args(["-T", &RUN_SECS.to_string()])
            .args(["-D", &format!("node={node}")])
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", &user, "postgres"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn pgbench");
        let out = wait_output(
            child,
            Duration::from_secs(RUN_SECS + 30),
            "pgbench run of a rolling-restart loop",
        );
        let run = parse_run(node, &out);
        let down = run.no_connect.is_some();
        runs.lock().unwrap_or_else(|e| e.into_inner()).push(run);
        if down {
            // The application's reconnect back-off while its pooler is away.
            std::thread::sleep(RECONNECT_BACKOFF);
        }
    }
}

/// Committed transactions per loop (node 1..=3), and the database's clock (epoch ms), at once.
#[derive(Debug, Clone, Copy)]
struct Snap {
    at_ms: f64,
    per_node: [i64; 3],
}

impl Snap {
    fn others(&self, node: u64) -> i64 {
        (1..=3u64)
            .filter(|&n| n != node)
            .map(|n| self.per_node[(n - 1) as usize])
            .sum()
    }

    fn total(&self) -> i64 {
        self.per_node.iter().sum()
    }
}

async fn snap(db: &Client, log: &str) -> Snap {
    let rows = db
        .query(
            &format!(
                "SELECT extract(epoch FROM clock_timestamp())::float8 * 1000, node, count(*) \
                 FROM (SELECT 0 AS node UNION ALL SELECT node FROM {log}) x GROUP BY node"
            ),
            &[],
        )
        .await
        .expect("count committed transactions");
    let mut s = Snap {
        at_ms: 0.0,
        per_node: [0; 3],
    };
    for r in rows {
        s.at_ms = r.get(0);
        let node: i32 = r.get(1);
        let n: i64 = r.get(2);
        if (1..=3).contains(&node) {
            s.per_node[(node - 1) as usize] = n;
        }
    }
    s
}

/// The longest pause between two commits (any node) from `a` to `b` (epoch ms), in ms.
async fn longest_gap(db: &Client, log: &str, a: f64, b: f64) -> f64 {
    db.query_one(
        &format!(
            "SELECT coalesce(max(d), $2 - $1)::float8 FROM (SELECT at - lag(at, 1, $1) OVER (ORDER BY at) AS d \
             FROM (SELECT at FROM {log} WHERE at BETWEEN $1 AND $2 UNION ALL SELECT $2) x) y"
        ),
        &[&a, &b],
    )
    .await
    .expect("longest gap")
    .get(0)
}

/// Backends of `role` in PostgreSQL: every one is a pooler's server connection (pgbench logs in
/// through the poolers only; its `application_name` reaches them, so `backends` would miss them).
async fn role_backends(db: &Client, role: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
        &[&role],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}

/// What one node's restart looked like.
#[derive(Debug)]
struct Restart {
    node: u64,
    was_owner: bool,
    was_leader: bool,
    term_at: Instant,
    /// SIGTERM to exit (the drain).
    drained: Duration,
    /// SIGTERM until the survivors agree on a new owner (owner restarts only).
    handed_over: Option<Duration>,
    /// Exit until it rejoined (cluster status: voter, leader known, lease valid, all healthy).
    down: Duration,
    /// Rejoin until its own loop committed through it again.
    back: Duration,
    /// Commits through the other nodes: during the drain, while it was down, and in the whole
    /// restart (SIGTERM until its loop committed through it again).
    others_during_drain: i64,
    others_while_down: i64,
    others_during_restart: i64,
    longest_gap_ms: f64,
}

/// Node `id` is back: it sees three voters and a leader, holds a valid lease, and the leader
/// hears from every node.
fn rejoined(api: std::net::SocketAddr) -> bool {
    let Some(s) = status(api) else { return false };
    let healthy = s["nodes"]
        .as_array()
        .map(|n| n.len() == 3 && n.iter().all(|x| x["healthy"] == true))
        .unwrap_or(false);
    s["voters"] == serde_json::json!([1, 2, 3])
        && s["leader"].as_u64().is_some()
        && s["lease_valid"] == true
        && healthy
}

fn write_script(dir: &Path, acc: &str, log: &str) -> std::path::PathBuf {
    let path = dir.join("rolling.sql");
    std::fs::write(
        &path,
        format!(
            "BEGIN;\n\
             UPDATE {acc} SET n = n + 1 WHERE id = :node * 100 + :client_id;\n\
             INSERT INTO {log} (node) VALUES (:node);\n\
             END;\n"
        ),
    )
    .expect("write pgbench script");
    path
}

/// Rolling restart: SIGTERM, exit, start again, rejoin — node 1, then 2, then 3 — while pgbench
/// runs through all three. Transactions go on through the other nodes during every restart; only
/// clients connected through the restarting node (for the pool's owner: all clients, since every
/// node proxies to it) fail, each between two transactions with 57P01 from the drain; the
/// stopping owner hands the pool over well before `claim_timeout_ms`; the cluster ends with three
/// voters, one agreed owner, and at most `pool_size` backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_under_pgbench() {
    let test_start = Instant::now();
    let mut cluster = blocking(|| Cluster::start_with(CLAIM_TIMEOUT_MS));
    let apis: Vec<std::net::SocketAddr> = (1..=3).map(|i| cluster.pooler(i).api).collect();
    let id = unique("cl_roll");
    let (role, password) = tenant_with_role_sized(apis[0], &id, POOL_SIZE).await;
    let user = format!("{role}.{id}");
    let key = format!("{id}/{role}/transaction");
    let (acc, log) = (format!("{id}_acc"), format!("{id}_log"));
    let db = direct().await;
    db.batch_execute(&format!(
        "CREATE TABLE {acc} (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
         INSERT INTO {acc} (id) SELECT node * 100 + c FROM generate_series(1, 3) node, generate_series(0, {}) c;
         CREATE TABLE {log} (node int NOT NULL, at float8 NOT NULL DEFAULT extract(epoch FROM clock_timestamp()) * 1000);
         GRANT SELECT, UPDATE ON {acc} TO {role};
         GRANT INSERT ON {log} TO {role};",
        CLIENTS - 1
    ))
    .await
    .expect("tables");
    for i in 1..=3 {
        until_serves(
            cluster.pooler(i).transaction,
            &user,
            &password,
            "every node",
        )
        .await;
    }
    agreed_owner(&apis, &key, None).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let script = write_script(dir.path(), &acc, &log);
    let stop = Arc::new(AtomicBool::new(false));
    let runs: Arc<Mutex<Vec<Run>>> = Arc::default();
    let loops: Vec<_> = (1..=3u64)
        .map(|node| {
            let port = cluster.pooler(node).transaction.port();
            let (u, p, s) = (user.clone(), password.clone(), script.clone());
            let (stop, runs) = (stop.clone(), runs.clone());
            std::thread::spawn(move || pgbench_loop(node, port, u, p, s, stop, runs))
        })
        .collect();
    // Every loop commits through its node before the first restart.
    let (dbr, logr) = (&db, log.as_str());
    eventually("every loop commits", CONVERGE, move || async move {
        snap(dbr, logr).await.per_node.iter().all(|&n| n > 0)
    })
    .await;
    let mut most_backends = role_backends(&db, &role).await;

    let mut restarts: Vec<Restart> = Vec::new();
    for node in 1..=3u64 {
        let api = apis[(node - 1) as usize];
        let others: Vec<std::net::SocketAddr> = (1..=3u64)
            .filter(|&n| n != node)
            .map(|n| apis[(n - 1) as usize])
            .collect();
        let owner = agreed_owner(&apis, &key, None).await;
        let leader = blocking(move || status(api)).and_then(|s| s["leader"].as_u64());
        let was_owner = owner == node;
        let before = snap(&db, &log).await;
        let term_at = Instant::now();
        cluster.pooler(node).signal_term();
        // Wait for the exit, and for an owner's pool to have a new owner.
        let mut drained = None;
        let mut exit_snap = None;
        let mut handed_over = None;
        loop {
            if drained.is_none() && cluster.pooler_mut(node).exit_status().is_some() {
                drained = Some(term_at.elapsed());
                exit_snap = Some(snap(&db, &log).await);
            }
            if was_owner && handed_over.is_none() {
                let (o, k) = (others.clone(), key.clone());
                let owners: Vec<Option<u64>> = blocking(move || {
                    o.iter()
                        .map(|&a| claims(a).and_then(|c| c.get(&k)?.as_u64()))
                        .collect()
                });
                if owners[0].is_some_and(|o| o != node) && owners[0] == owners[1] {
                    handed_over = Some(term_at.elapsed());
                }
            }
            if drained.is_some() && (!was_owner || handed_over.is_some()) {
                break;
            }
            assert!(
                term_at.elapsed() < CONVERGE,
                "node {node}: exited {drained:?}, pool handed over {handed_over:?}"
            );
            most_backends = most_backends.max(role_backends(&db, &role).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (drained, exit_snap) = (drained.unwrap(), exit_snap.unwrap());
        let exited_at = Instant::now();
        drop(cluster.members[(node - 1) as usize].pooler.take());
        blocking(|| cluster.restart(node));
        eventually("restarted node rejoined", CONVERGE, move || async move {
            blocking(move || rejoined(api))
        })
        .await;
        let down = exited_at.elapsed();
        let back = snap(&db, &log).await;
        // Its loop commits through it again before the next node goes.
        let k = (node - 1) as usize;
        let rejoined_at = Instant::now();
        eventually(
            "the restarted node serves its loop again",
            CONVERGE,
            move || async move { snap(dbr, logr).await.per_node[k] > back.per_node[k] },
        )
        .await;
        let served = snap(&db, &log).await;
        most_backends = most_backends.max(role_backends(&db, &role).await);
        let r = Restart {
            node,
            was_owner,
            was_leader: leader == Some(node),
            term_at,
            drained,
            handed_over,
            down,
            back: rejoined_at.elapsed(),
            others_during_drain: exit_snap.others(node) - before.others(node),
            others_while_down: back.others(node) - exit_snap.others(node),
            others_during_restart: served.others(node) - before.others(node),
            longest_gap_ms: longest_gap(&db, &log, before.at_ms, served.at_ms).await,
        };
        eprintln!("rolling: {r:?}");
        restarts.push(r);
    }

    stop.store(true, Ordering::SeqCst);
    for l in loops {
        blocking(|| l.join()).expect("pgbench loop");
    }
    let runs = runs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let end = snap(&db, &log).await;

    // The cluster is healthy: every node sees three voters and the same leader, one owner.
    let mut leaders = Vec::new();
    for &api in &apis {
        let s = blocking(move || status(api)).expect("status");
        assert_eq!(s["voters"], serde_json::json!([1, 2, 3]), "{s}");
        leaders.push(s["leader"].as_u64());
    }
    assert!(
        leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0]),
        "{leaders:?}"
    );
    let owner = agreed_owner(&apis, &key, None).await;
    let left = role_backends(&db, &role).await;
    most_backends = most_backends.max(left);
    assert!(
        left <= i64::from(POOL_SIZE),
        "{left} backends, pool_size {POOL_SIZE}"
    );

    // Per restart: the runs that ended from its SIGTERM to the next one's.
    let window = |i: usize| -> Vec<&Run> {
        let from = restarts[i].term_at;
        let to = restarts.get(i + 1).map(|r| r.term_at);
        runs.iter()
            .filter(|r| r.ended >= from && to.is_none_or(|t| r.ended < t))
            .collect()
    };
    let calm: Vec<&Run> = runs
        .iter()
        .filter(|r| r.ended < restarts[0].term_at)
        .collect();
    assert!(
        calm.iter()
            .all(|r| r.aborts.is_empty() && r.no_connect.is_none()),
        "failures before any restart: {calm:?}"
    );
    let processed: u64 = runs.iter().map(|r| r.processed).sum();
    let mut at_commit = 0;
    for (i, r) in restarts.iter().enumerate() {
        let w = window(i);
        let committed: u64 = w.iter().map(|r| r.processed).sum();
        let aborts: Vec<(u64, &Abort)> = w
            .iter()
            .flat_map(|run| run.aborts.iter().map(move |a| (run.node, a)))
            .collect();
        let no_connect: Vec<&&Run> = w.iter().filter(|r| r.no_connect.is_some()).collect();
        let mut classes = std::collections::BTreeMap::new();
        for (n, a) in &aborts {
            *classes
                .entry(format!("loop {n}: {} ({})", a.place(), a.cause()))
                .or_insert(0) += 1;
        }
        let lines: std::collections::BTreeSet<&str> = aborts
            .iter()
            .map(|(_, a)| a.line.split_once(": ").map_or(a.line.as_str(), |(_, m)| m))
            .collect();
        eprintln!(
            "rolling: restart of node {} ({}{}): drain {:?}, pool handed over after {:?}, down {:?}, \
             serving its clients again {:?} after rejoining; commits through the other nodes: {} \
             during the drain, {} while it was down, {} in the whole restart; longest pause between \
             two commits {:.0} ms; pgbench runs ending in this window: {} transactions committed, \
             {} clients aborted {classes:?} {lines:?}, {} runs could not connect{}",
            r.node,
            if r.was_owner { "pool owner" } else { "not the owner" },
            if r.was_leader { ", raft leader" } else { "" },
            r.drained,
            r.handed_over,
            r.down,
            r.back,
            r.others_during_drain,
            r.others_while_down,
            r.others_during_restart,
            r.longest_gap_ms,
            committed,
            aborts.len(),
            no_connect.len(),
            no_connect
                .first()
                .and_then(|r| r.no_connect.as_deref())
                .map(|l| format!(" (e.g. {l:?})"))
                .unwrap_or_default(),
        );
        // Transactions went on through the other nodes while this one restarted, and never
        // stopped for as long as a failover by silence (claim_timeout_ms) would have taken.
        assert!(
            r.others_during_restart > 0,
            "no commits through the other nodes while node {} restarted: {r:?}",
            r.node
        );
        assert!(
            r.longest_gap_ms < CLAIM_TIMEOUT_MS as f64,
            "commits paused {:.0} ms during the restart of node {}",
            r.longest_gap_ms,
            r.node
        );
        // Only clients whose connection ended on the restarting node failed: its own loop's, and
        // when it owned the pool every loop's (their connections were proxied to it). Each such
        // client once at most.
        let exposed = if r.was_owner { 3 } else { 1 };
        assert!(
            aborts.len() <= (CLIENTS * exposed) as usize,
            "restart of node {}: {} aborted clients, bound {}: {aborts:?}",
            r.node,
            aborts.len(),
            CLIENTS * exposed
        );
        for (n, a) in &aborts {
            assert!(
                *n == r.node || r.was_owner,
                "restart of node {}: a client of node {n} failed: {a:?}",
                r.node
            );
            // The drain let every transaction finish: clients fail only at their next BEGIN, with
            // the drain's 57P01 (or, when libpq read that error before pgbench looked, as a lost
            // connection).
            assert_eq!(
                a.place(),
                "between transactions",
                "restart of node {}: {a:?}",
                r.node
            );
            assert!(
                matches!(a.cause(), "57P01 drain" | "connection lost"),
                "restart of node {}: {a:?}",
                r.node
            );
        }
        at_commit += aborts.iter().filter(|(_, a)| a.command == Some(3)).count() as i64;
        for run in &no_connect {
            // Through another node only when the restarting node owned the pool: a login that
            // was being proxied to the owner when it left is closed (the link ends before the
            // login did; see README "Rolling restart"). One per other loop at most.
            if run.node != r.node {
                assert!(
                    r.was_owner
                        && run
                            .no_connect
                            .as_deref()
                            .unwrap_or("")
                            .contains("closed the connection unexpectedly"),
                    "restart of node {}: a run through node {} could not connect: {run:?}",
                    r.node,
                    run.node
                );
                let through = no_connect.iter().filter(|x| x.node == run.node).count();
                assert!(
                    through <= 1,
                    "restart of node {}: {through} runs through node {} could not connect",
                    r.node,
                    run.node
                );
            }
            // While its node was away; never refused by a routing decision.
            assert!(
                !run.no_connect.as_deref().unwrap_or("").contains("cluster:"),
                "restart of node {}: {run:?}",
                r.node
            );
        }
        // The stopping owner handed its pool over itself, not the leader after claim_timeout_ms.
        if let Some(h) = r.handed_over {
            assert!(
                h < Duration::from_millis(CLAIM_TIMEOUT_MS / 2),
                "pool handed over after {h:?} (claim_timeout_ms {CLAIM_TIMEOUT_MS})"
            );
        }
    }
    assert!(
        restarts.iter().any(|r| r.was_owner),
        "the pool's owner was restarted"
    );
    // Every transaction pgbench counted as committed is in the database. Rows it did not count
    // come from clients that stopped at their commit (none here) or from transactions still
    // running when a `-T` run ended.
    let rows = end.total();
    assert!(
        processed as i64 <= rows,
        "pgbench committed {processed}, the database has only {rows} rows"
    );
    eprintln!(
        "rolling: {rows} rows committed, pgbench counted {processed}, {at_commit} clients failed at commit"
    );
    eprintln!(
        "rolling: done in {:?}: {rows} transactions committed ({:?} per loop), {} pgbench runs, \
         {} clients aborted in all, owner at the end node {owner}, backends at most {most_backends} \
         (pool_size {POOL_SIZE}), {left} at the end",
        test_start.elapsed(),
        end.per_node,
        runs.len(),
        runs.iter().map(|r| r.aborts.len()).sum::<usize>(),
    );
}

/// Whether anything accepts TCP connections at `addr` (a draining node closes its listeners).
fn listening(addr: std::net::SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// The SQLSTATEs a client saw from its next query and from its connection's end.
async fn codes_after(conn: Conn) -> Vec<String> {
    let mut codes = Vec::new();
    if let Err(e) = within(
        "query after the drain",
        conn.client.simple_query("SELECT 1"),
    )
    .await
    {
        codes.extend(sqlstate(&e));
    }
    if let Err(e) = within("connection end", conn.task).await.expect("task") {
        codes.extend(sqlstate(&e));
    }
    codes
}

/// A transaction open through a non-owner when the pool's owner drains commits (the owner's drain
/// waits for the proxied client), then that client gets 57P01; a new client through the same node
/// works at once, on the pool's new owner. Then a non-owner drains with a transaction open through
/// it: the transaction commits, then 57P01 (the non-owner follows the proxied conversation and
/// ends it only between transactions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_nodes_let_proxied_transactions_finish() {
    let cluster = blocking(|| Cluster::start_with(CLAIM_TIMEOUT_MS));
    let apis: Vec<std::net::SocketAddr> = (1..=3).map(|i| cluster.pooler(i).api).collect();
    let id = unique("cl_drain");
    let (role, password) = tenant_with_role(apis[0], &id).await;
    let user = format!("{role}.{id}");
    let key = format!("{id}/{role}/transaction");
    let table = format!("{id}_t");
    direct()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (n int); GRANT INSERT, SELECT ON {table} TO {role}"
        ))
        .await
        .expect("table");
    for i in 1..=3 {
        until_serves(
            cluster.pooler(i).transaction,
            &user,
            &password,
            "every node",
        )
        .await;
    }
    let owner = agreed_owner(&apis, &key, None).await;
    let via = owner % 3 + 1;
    let third = via % 3 + 1;
    let tx_via = cluster.pooler(via).transaction;

    // 1. The owner drains while a client of `via` is inside a transaction.
    let a = connect_with(&client_config(tx_via, &user, &password))
        .await
        .expect("connect through a non-owner");
    within(
        "BEGIN through a non-owner",
        a.client
            .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)")),
    )
    .await
    .expect("begin");
    let term_at = Instant::now();
    cluster.pooler(owner).signal_term();
    let owner_tx = cluster.pooler(owner).transaction;
    eventually(
        "the owner closed its listeners",
        CONVERGE,
        move || async move { !blocking(move || listening(owner_tx)) },
    )
    .await;
    within(
        "COMMIT while the owner drains",
        a.client
            .batch_execute(&format!("INSERT INTO {table} VALUES (2); COMMIT")),
    )
    .await
    .expect("the proxied transaction commits while its owner drains");
    let codes = codes_after(a).await;
    assert!(codes.iter().any(|c| c == "57P01"), "{codes:?}");
    let (u, p) = (user.clone(), password.clone());
    let c = within(
        "a new client through the non-owner",
        try_connect(tx_via, &u, &p),
    )
    .await
    .expect("a new client through the non-owner connects");
    within("its query", c.query_one("SELECT 1", &[]))
        .await
        .expect("and runs a query");
    let moved = term_at.elapsed();
    let survivors = [apis[(via - 1) as usize], apis[(third - 1) as usize]];
    let new_owner = agreed_owner(&survivors, &key, Some(owner)).await;
    eprintln!(
        "drain: the owner (node {owner}) drained; a new client through node {via} ran a query {moved:?} \
         after its SIGTERM, on the new owner node {new_owner}"
    );
    assert!(
        moved < Duration::from_millis(CLAIM_TIMEOUT_MS / 2),
        "{moved:?}"
    );
    drop(c);

    // 2. A non-owner drains while a client through it is inside a transaction.
    let x = if new_owner == via { third } else { via };
    let tx_x = cluster.pooler(x).transaction;
    let b = connect_with(&client_config(tx_x, &user, &password))
        .await
        .expect("connect through the remaining non-owner");
    within(
        "BEGIN through it",
        b.client
            .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (3)")),
    )
    .await
    .expect("begin");
    cluster.pooler(x).signal_term();
    eventually(
        "the non-owner closed its listeners",
        CONVERGE,
        move || async move { !blocking(move || listening(tx_x)) },
    )
    .await;
    within(
        "COMMIT while the non-owner drains",
        b.client
            .batch_execute(&format!("INSERT INTO {table} VALUES (4); COMMIT")),
    )
    .await
    .expect("the transaction through a draining non-owner commits");
    let codes = codes_after(b).await;
    assert!(codes.iter().any(|c| c == "57P01"), "{codes:?}");
    let rows: Vec<i32> = direct()
        .await
        .query(&format!("SELECT n FROM {table} ORDER BY n"), &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![1, 2, 3, 4]);
}
