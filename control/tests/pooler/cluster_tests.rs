//! Three `supavisor` processes in one raft group on loopback: tenants written through one node
//! serve clients through the others, a killed leader is replaced, and a restarted node catches up.
//! Node 1 initializes a group of one; nodes 2 and 3 `join` it as voters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

const CLUSTER_SECRET: &str = "test-cluster-secret-0123456789";
/// Upper bound for the cluster to converge after a change (election, replication).
const CONVERGE: Duration = Duration::from_secs(15);

struct Member {
    id: u64,
    raft: SocketAddr,
    store: PathBuf,
    pooler: Option<Pooler>,
}

struct Cluster {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

fn node_config(
    id: u64,
    raft: SocketAddr,
    join: Option<SocketAddr>,
    store: PathBuf,
) -> PoolerConfig {
    let mut cfg = PoolerConfig::tenants(vec![]);
    cfg.shards = 1;
    cfg.store_dir = Some(store);
    cfg.extra_toml = format!(
        "[cluster]\nnode_id = {id}\naddr = \"{raft}\"\nsecret = \"{CLUSTER_SECRET}\"\n\
         heartbeat_ms = 200\nclaim_timeout_ms = 1000\n{}\n",
        join.map(|j| format!("join = \"{j}\"\n"))
            .unwrap_or_default()
    );
    cfg
}

impl Cluster {
    /// Starts node 1, then nodes 2 and 3 joining it.
    fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("supavisor-cluster.")
            .tempdir()
            .expect("temp dir");
        let mut members: Vec<Member> = (1..=3)
            .map(|id| Member {
                id,
                raft: free_addr(),
                store: dir.path().join(format!("store{id}")),
                pooler: None,
            })
            .collect();
        let first = members[0].raft;
        for m in &mut members {
            let join = (m.id != 1).then_some(first);
            m.pooler = Some(Pooler::start(&node_config(
                m.id,
                m.raft,
                join,
                m.store.clone(),
            )));
        }
        Cluster { members, _dir: dir }
    }

    fn pooler(&self, id: u64) -> &Pooler {
        self.members[(id - 1) as usize]
            .pooler
            .as_ref()
            .expect("node is running")
    }

    /// Restart a stopped node with its store and raft address.
    fn restart(&mut self, id: u64) {
        let m = &mut self.members[(id - 1) as usize];
        let join = (m.id != 1).then_some(SocketAddr::from(([127, 0, 0, 1], 1)));
        // `join` is ignored by a node that is a member already; a bogus one proves it.
        m.pooler = Some(Pooler::start(&node_config(
            m.id,
            m.raft,
            join,
            m.store.clone(),
        )));
    }
}

fn ctl(api: SocketAddr, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_supavisorctl"))
        .arg("--api")
        .arg(format!("http://{api}"))
        .arg("--jwt-secret")
        .arg(API_JWT_SECRET)
        .args(args)
        .env_remove("SUPAVISOR_API")
        .env_remove("SUPAVISOR_TOKEN")
        .env_remove("API_JWT_SECRET")
        .output()
        .expect("run supavisorctl")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `cluster status --json` of a node, if it answers.
fn status(api: SocketAddr) -> Option<Value> {
    let o = ctl(api, &["--json", "cluster", "status"]);
    if !o.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v.get("data").cloned()
}

fn tenant_add(api: SocketAddr, id: &str) -> Output {
    let pg = pg();
    let port = pg.port.to_string();
    ctl(
        api,
        &[
            "tenant",
            "add",
            id,
            "--db-host",
            &pg.host,
            "--db-port",
            &port,
            "--db-database",
            "postgres",
            "--user",
            &pg.superuser,
            "--password",
            &pg.password,
            "--pool-size",
            "2",
            "--mode",
            "transaction",
        ],
    )
}

/// Whether a client can log in to tenant `id` through `addr` and run a query.
async fn usable(addr: SocketAddr, id: &str) -> bool {
    let pg = pg();
    let user = format!("{}.{id}", pg.superuser);
    match try_connect(addr, &user, &pg.password).await {
        Ok(c) => matches!(
            c.query_one("SELECT 40 + 2", &[])
                .await
                .map(|r| r.get::<_, i32>(0)),
            Ok(42)
        ),
        Err(_) => false,
    }
}

/// Polls until tenant `id` serves clients through `addr`; returns how long that took.
async fn until_usable(addr: SocketAddr, id: &str, what: &str) -> Duration {
    let start = Instant::now();
    eventually(what, CONVERGE, || usable(addr, id)).await;
    start.elapsed()
}

/// Runs a blocking call (a CLI process, a pooler start) on this worker thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// (a) A tenant added through node 1 serves a real client through node 3's transaction port;
/// `supavisorctl cluster status` on node 2 shows three voters and a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_added_on_one_node_serves_through_another() {
    let cluster = blocking(Cluster::start);
    let (api1, api2) = (cluster.pooler(1).api, cluster.pooler(2).api);
    let tx3 = cluster.pooler(3).transaction;

    let id = unique("cl_a");
    let added = {
        let id = id.clone();
        blocking(move || tenant_add(api1, &id))
    };
    assert!(
        added.status.success(),
        "tenant add on node 1: {}",
        text(&added)
    );
    let took = until_usable(tx3, &id, "tenant added on node 1 usable through node 3").await;
    eprintln!("cluster: write on node 1 visible (usable) on node 3 after {took:?}");

    // The password went through the raft log sealed: no node's sled files hold it in clear.
    let secret = pg().password.as_bytes().to_vec();
    for m in &cluster.members {
        let mut files = vec![m.store.clone()];
        let mut scanned = 0;
        while let Some(p) = files.pop() {
            if p.is_dir() {
                files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else {
                let bytes = std::fs::read(&p).unwrap_or_default();
                scanned += bytes.len();
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                    "plaintext password in {}",
                    p.display()
                );
            }
        }
        assert!(scanned > 0, "node {} wrote its store", m.id);
    }

    // The leader reports each node's health once its liveness loop has heard from it.
    let asked = Instant::now();
    let mut out = blocking(move || ctl(api2, &["cluster", "status"]));
    while String::from_utf8_lossy(&out.stdout)
        .matches("healthy")
        .count()
        < 3
    {
        assert!(asked.elapsed() < CONVERGE, "cluster status: {}", text(&out));
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = blocking(move || ctl(api2, &["cluster", "status"]));
    }
    eprintln!(
        "cluster: status on node 2 shows every node healthy after {:?}",
        asked.elapsed()
    );
    assert!(out.status.success(), "cluster status: {}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| -> String {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("voters"), "1,2,3", "{s}");
    assert_eq!(field("node"), "2", "{s}");
    let leader: u64 = field("leader")
        .parse()
        .unwrap_or_else(|_| panic!("a leader: {s}"));
    assert!((1..=3).contains(&leader), "{s}");
    assert!(s.contains("ADDR") && s.contains("leader"), "{s}");
    // The JSON answer carries each node's raft address.
    let json = blocking(move || status(api2)).expect("status json");
    let nodes = json["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 3, "{json}");
    for (m, n) in cluster.members.iter().zip(&nodes) {
        assert_eq!(
            n["addr"].as_str(),
            Some(m.raft.to_string().as_str()),
            "{json}"
        );
    }
}

/// (b) kill -9 of the leader: a new leader is elected, a write through a survivor succeeds and
/// is visible on the other survivor. (c) The killed node, restarted with its store and address,
/// catches up: the tenant added while it was down serves clients through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_then_restarted_catches_up() {
    let mut cluster = blocking(Cluster::start);
    let api1 = cluster.pooler(1).api;
    let first = {
        let s = blocking(move || status(api1)).expect("status");
        s["leader"].as_u64().expect("a leader")
    };

    let killed_at = Instant::now();
    let mut dead = cluster.members[(first - 1) as usize]
        .pooler
        .take()
        .expect("leader running");
    dead.kill9();
    drop(dead);
    let survivors: Vec<u64> = (1..=3).filter(|&i| i != first).collect();
    let (a, b) = (survivors[0], survivors[1]);
    let (api_a, tx_b) = (cluster.pooler(a).api, cluster.pooler(b).transaction);

    // A new leader among the survivors.
    let mut new_leader = None;
    while killed_at.elapsed() < CONVERGE {
        if let Some(s) = blocking(move || status(api_a)) {
            if let Some(l) = s["leader"].as_u64().filter(|l| *l != first) {
                new_leader = Some(l);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elected = killed_at.elapsed();
    let new_leader = new_leader.unwrap_or_else(|| panic!("no new leader within {CONVERGE:?}"));
    assert!(survivors.contains(&new_leader));
    eprintln!("cluster: node {new_leader} leads {elected:?} after kill -9 of leader {first}");

    // A write through survivor `a` (retried while the cluster settles).
    let id = unique("cl_b");
    let write_start = Instant::now();
    loop {
        let out = {
            let id = id.clone();
            blocking(move || tenant_add(api_a, &id))
        };
        if out.status.success() {
            break;
        }
        assert!(
            write_start.elapsed() < CONVERGE,
            "tenant add through node {a}: {}",
            text(&out)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = until_usable(tx_b, &id, "tenant added on a survivor usable on the other").await;
    eprintln!(
        "cluster: write after failover took {:?}; visible (usable) on node {b} after {took:?}",
        write_start.elapsed() - took
    );

    // (c) Restart the killed node on its store and raft address.
    let restart_at = Instant::now();
    blocking(|| cluster.restart(first));
    let tx_first = cluster.pooler(first).transaction;
    let took = until_usable(
        tx_first,
        &id,
        "tenant added while down usable on the restarted node",
    )
    .await;
    eprintln!(
        "cluster: restarted node {first} caught up {:?} after its restart began ({took:?} after it was ready)",
        restart_at.elapsed()
    );
    let api_first = cluster.pooler(first).api;
    let s = blocking(move || status(api_first)).expect("status of the restarted node");
    assert_eq!(s["voters"], serde_json::json!([1, 2, 3]), "{s}");
}
