//! Three `supavisor` processes in one raft group on loopback: tenants written through one node
//! serve clients through the others, a killed leader is replaced, and a restarted node catches up.
//! Node 1 initializes a group of one; nodes 2 and 3 `join` it as voters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

pub(crate) const CLUSTER_SECRET: &str = "test-cluster-secret-0123456789";
/// Upper bound for the cluster to converge after a change (election, replication).
pub(crate) const CONVERGE: Duration = Duration::from_secs(15);

pub(crate) struct Member {
    pub(crate) id: u64,
    pub(crate) raft: SocketAddr,
    pub(crate) store: PathBuf,
    pub(crate) pooler: Option<Pooler>,
    /// Session, transaction and API addresses of its first start: a restart keeps them.
    addrs: Option<(SocketAddr, SocketAddr, SocketAddr)>,
}

pub(crate) struct Cluster {
    pub(crate) members: Vec<Member>,
    claim_timeout_ms: u64,
    _dir: tempfile::TempDir,
}

fn node_config(
    id: u64,
    raft: SocketAddr,
    join: Option<SocketAddr>,
    store: PathBuf,
    claim_timeout_ms: u64,
) -> PoolerConfig {
    let mut cfg = PoolerConfig::tenants(vec![]);
    cfg.shards = 1;
    cfg.websocket = true;
    cfg.store_dir = Some(store);
    cfg.extra_toml = format!(
        "[cluster]\nnode_id = {id}\naddr = \"{raft}\"\nsecret = \"{CLUSTER_SECRET}\"\n\
         heartbeat_ms = 200\nclaim_timeout_ms = {claim_timeout_ms}\n{}\n",
        join.map(|j| format!("join = \"{j}\"\n"))
            .unwrap_or_default()
    );
    cfg
}

impl Cluster {
    /// Starts node 1, then nodes 2 and 3 joining it (`claim_timeout_ms` 1000).
    pub(crate) fn start() -> Cluster {
        Cluster::start_with(1000)
    }

    /// [`Cluster::start`] with another `claim_timeout_ms`.
    pub(crate) fn start_with(claim_timeout_ms: u64) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("supavisor-cluster.")
            .tempdir()
            .expect("temp dir");
        let mut members: Vec<Member> = (1..=3)
            .map(|id| Member {
                id,
                raft: free_pair(),
                store: dir.path().join(format!("store{id}")),
                pooler: None,
                addrs: None,
            })
            .collect();
        let first = members[0].raft;
        for m in &mut members {
            let join = (m.id != 1).then_some(first);
            let p = Pooler::start(&node_config(
                m.id,
                m.raft,
                join,
                m.store.clone(),
                claim_timeout_ms,
            ));
            m.addrs = Some((p.session, p.transaction, p.api));
            m.pooler = Some(p);
        }
        Cluster {
            members,
            claim_timeout_ms,
            _dir: dir,
        }
    }

    pub(crate) fn pooler(&self, id: u64) -> &Pooler {
        self.members[(id - 1) as usize]
            .pooler
            .as_ref()
            .expect("node is running")
    }

    pub(crate) fn pooler_mut(&mut self, id: u64) -> &mut Pooler {
        self.members[(id - 1) as usize]
            .pooler
            .as_mut()
            .expect("node is running")
    }

    /// Restart a stopped node with its store, raft address and client and API ports.
    pub(crate) fn restart(&mut self, id: u64) {
        let m = &mut self.members[(id - 1) as usize];
        let join = (m.id != 1).then_some(SocketAddr::from(([127, 0, 0, 1], 1)));
        // `join` is ignored by a node that is a member already; a bogus one proves it.
        let cfg = node_config(m.id, m.raft, join, m.store.clone(), self.claim_timeout_ms);
        m.pooler = Some(match m.addrs {
            Some((session, transaction, api)) => Pooler::start_on(&cfg, session, transaction, api),
            None => Pooler::start(&cfg),
        });
    }
}

/// A free loopback address whose port plus one (the node's proxy link) is free too.
fn free_pair() -> SocketAddr {
    loop {
        let a = free_addr();
        let next = SocketAddr::from(([127, 0, 0, 1], a.port().wrapping_add(1)));
        if a.port() < u16::MAX
            && std::net::TcpListener::bind(next).is_ok()
            && claim_port(next.port())
        {
            return a;
        }
    }
}

pub(crate) fn ctl(api: SocketAddr, args: &[&str]) -> Output {
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

pub(crate) fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `cluster status --json` of a node, if it answers.
pub(crate) fn status(api: SocketAddr) -> Option<Value> {
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
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
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

/// Polls until `user` can log in through `addr` and run a query (`what` names the node).
pub(crate) async fn until_serves(addr: SocketAddr, user: &str, password: &str, what: &str) {
    let (u, p) = (user.to_string(), password.to_string());
    eventually(
        &format!("tenant usable through {what}"),
        CONVERGE,
        move || {
            let (u, p) = (u.clone(), p.clone());
            async move {
                match try_connect(addr, &u, &p).await {
                    Ok(c) => c.query_one("SELECT 1", &[]).await.is_ok(),
                    Err(_) => false,
                }
            }
        },
    )
    .await;
}

/// A login role of its own (so that PostgreSQL's backends of this test are countable) and a
/// tenant `id` that pools it (transaction mode, pool size 2), added through `api`.
pub(crate) async fn tenant_with_role(api: SocketAddr, id: &str) -> (String, String) {
    tenant_with_role_sized(api, id, 2).await
}

/// [`tenant_with_role`] with pool size `pool_size`.
pub(crate) async fn tenant_with_role_sized(
    api: SocketAddr,
    id: &str,
    pool_size: u32,
) -> (String, String) {
    let role = id.to_string();
    let password = "owner-test-pw".to_string();
    direct()
        .await
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        .await
        .expect("create role");
    let pg = pg();
    let port = pg.port.to_string();
    let (id, r, pw) = (id.to_string(), role.clone(), password.clone());
    let size = pool_size.to_string();
    let out = blocking(move || {
        ctl(
            api,
            &[
                "tenant",
                "add",
                &id,
                "--db-host",
                &pg.host,
                "--db-port",
                &port,
                "--db-database",
                "postgres",
                "--user",
                &r,
                "--password",
                &pw,
                "--pool-size",
                &size,
                "--mode",
                "transaction",
            ],
        )
    });
    assert!(out.status.success(), "tenant add: {}", text(&out));
    (role, password)
}

/// Backends the pooler holds in PostgreSQL for `role`.
pub(crate) async fn backends(role: &str) -> i64 {
    direct()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE usename = $1 AND application_name = 'Supavisor'",
            &[&role],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// The claims as node `api` applied them.
pub(crate) fn claims(api: SocketAddr) -> Option<serde_json::Map<String, Value>> {
    status(api)?.get("claims")?.as_object().cloned()
}

/// Waits until every node in `apis` reports the same single owner of `key`.
pub(crate) async fn agreed_owner(apis: &[SocketAddr], key: &str, not: Option<u64>) -> u64 {
    let start = Instant::now();
    loop {
        let owners: Vec<Option<u64>> = apis
            .iter()
            .map(|&api| blocking(move || claims(api)).and_then(|c| c.get(key)?.as_u64()))
            .collect();
        if let Some(Some(o)) = owners.first() {
            if owners.iter().all(|x| *x == Some(*o)) && Some(*o) != not {
                return *o;
            }
        }
        assert!(
            start.elapsed() < CONVERGE,
            "no agreed owner of {key}: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Clients of one tenant through all three nodes at once share one pool in the whole cluster
/// (PostgreSQL never sees more than pool_size backends), every node names the same owner, a
/// cancel sent through a non-owner reaches the owner's pool, and the proxy port serves nothing
/// to a peer without the cluster secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_pool_per_key_in_the_cluster() {
    let cluster = blocking(Cluster::start);
    let apis: Vec<SocketAddr> = (1..=3).map(|i| cluster.pooler(i).api).collect();
    let id = unique("cl_own");
    let (role, password) = tenant_with_role(apis[0], &id).await;
    let user = format!("{role}.{id}");
    for i in 1..=3 {
        until_serves(
            cluster.pooler(i).transaction,
            &user,
            &password,
            "every node",
        )
        .await;
    }
    let key = format!("{id}/{role}/transaction");
    let owner = agreed_owner(&apis, &key, None).await;

    // 3 x 5 clients, each running queries that hold a server connection for a while.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 1..=3u64 {
        for _ in 0..5 {
            let tx = cluster.pooler(i).transaction;
            let (u, p) = (user.clone(), password.clone());
            tasks.push(tokio::spawn(async move {
                let c = try_connect(tx, &u, &p).await.expect("connect");
                for _ in 0..4 {
                    let r = c.query_one("SELECT pg_sleep(0.05)::text, 7", &[]).await;
                    assert_eq!(r.expect("query").get::<_, i32>(1), 7);
                }
            }));
        }
    }
    let mut most = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        most = most.max(backends(&role).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.expect("client task");
    }
    most = most.max(backends(&role).await);
    eprintln!(
        "cluster: 15 clients through 3 nodes done in {:?}; at most {most} backends (pool_size 2), owner node {owner}",
        started.elapsed()
    );
    assert!((1..=2).contains(&most), "backends of one pool: {most}");
    for &api in &apis {
        let c = blocking(move || claims(api)).expect("claims");
        let ours: Vec<_> = c.iter().filter(|(k, _)| k.starts_with(&id)).collect();
        assert_eq!(ours.len(), 1, "{c:?}");
        assert_eq!(ours[0].1.as_u64(), Some(owner), "{c:?}");
    }

    // Proxied path latency (one round trip) vs the owner's own port.
    let mut rtt = Vec::new();
    for node in [owner, (owner % 3) + 1] {
        let c = try_connect(cluster.pooler(node).transaction, &user, &password)
            .await
            .expect("connect");
        c.query_one("SELECT 1", &[]).await.expect("warm up");
        let t = Instant::now();
        for _ in 0..200 {
            c.query_one("SELECT 1", &[]).await.expect("select");
        }
        rtt.push(t.elapsed() / 200);
    }
    eprintln!(
        "cluster: SELECT 1 round trip {:?} on the owner, {:?} proxied through a non-owner",
        rtt[0], rtt[1]
    );

    // A cancel through a non-owner node reaches the owner's pool.
    let other = (owner % 3) + 1;
    let c = try_connect(cluster.pooler(other).transaction, &user, &password)
        .await
        .expect("connect through a non-owner");
    let token = c.cancel_token();
    let sleeping = tokio::spawn(async move { c.query_one("SELECT pg_sleep(30)", &[]).await });
    let r2 = role.clone();
    eventually("pg_sleep running", CONVERGE, move || {
        let r = r2.clone();
        async move {
            direct()
                .await
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 \
                     AND query = 'SELECT pg_sleep(30)' AND state = 'active'",
                    &[&r],
                )
                .await
                .map(|row| row.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        }
    })
    .await;
    let cancelled_at = Instant::now();
    cancel_and_wait(&token, cluster.pooler(other).transaction)
        .await
        .expect("send cancel");
    let r = within("cancelled query", sleeping).await.expect("task");
    expect_code(r, "57014");
    eprintln!(
        "cluster: cancel through node {other} ended pg_sleep on owner {owner} after {:?}",
        cancelled_at.elapsed()
    );

    // Cluster-wide views through a non-owner: the pool is on its owner, the proxied client is
    // a client of both nodes.
    let held = try_connect(cluster.pooler(other).transaction, &user, &password)
        .await
        .expect("connect through a non-owner");
    held.simple_query("SELECT 1").await.expect("query");
    let console = crate::console_tests::console(cluster.pooler(other).session).await;
    let pools = crate::console_tests::show(&console, "SHOW POOLS").await;
    let ours: Vec<_> = pools.iter().filter(|p| p["database"] == id).collect();
    assert!(!ours.is_empty(), "{pools:?}");
    assert!(
        ours.iter().all(|p| p["node"] == owner.to_string()),
        "the pool is on its owner only: {ours:?}"
    );
    let clients = crate::console_tests::show(&console, "SHOW CLIENTS").await;
    let proxied = format!("proxied to node {owner}");
    assert!(
        clients.iter().any(|c| c["database"] == id
            && c["node"] == other.to_string()
            && c["state"] == proxied),
        "{clients:?}"
    );
    assert!(
        clients
            .iter()
            .any(|c| c["database"] == id && c["node"] == owner.to_string()),
        "{clients:?}"
    );
    let versions = crate::console_tests::show(&console, "SHOW VERSION").await;
    let nodes: Vec<&str> = versions.iter().map(|v| v["node"].as_str()).collect();
    assert_eq!(nodes, ["1", "2", "3"]);
    use crate::replica_tests::{http_get, token as jwt};
    let (status, body) = http_get(
        cluster.pooler(other).api,
        "/api/pools?scope=cluster",
        jwt(API_JWT_SECRET),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["nodes"],
        serde_json::json!([
            {"node_id": 1, "ok": true, "error": null},
            {"node_id": 2, "ok": true, "error": null},
            {"node_id": 3, "ok": true, "error": null}
        ])
    );
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["tenant"] == id.as_str() && p["node"] == owner),
        "{v}"
    );
    let (status, text) = http_get(
        cluster.pooler(other).api,
        "/metrics?scope=cluster",
        jwt(METRICS_JWT_SECRET),
    )
    .await;
    assert_eq!(status, 200);
    let samples = control::metrics::try_parse_text(&text).unwrap();
    for n in ["1", "2", "3"] {
        assert_eq!(
            control::metrics::value(&samples, "supavisor_cluster_node_up", &[("node", n)]),
            Some(1.0),
            "{text}"
        );
    }
    let owner_label = owner.to_string();
    assert_eq!(
        control::metrics::value(
            &samples,
            "supavisor_pool_size",
            &[("node", owner_label.as_str()), ("tenant", id.as_str())]
        ),
        Some(2.0),
        "{text}"
    );
    drop(held);

    // Without the cluster secret the proxy port gives a nonce and nothing else.
    use std::io::{Read, Write};
    let proxy = SocketAddr::from(([127, 0, 0, 1], cluster.members[0].raft.port() + 1));
    let outcome = blocking(move || {
        let mut s = std::net::TcpStream::connect(proxy).expect("proxy port");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut nonce = [0u8; 16];
        s.read_exact(&mut nonce).expect("nonce");
        // A "connect" header with a MAC that is not keyed with the secret, then a startup.
        let mut hello = vec![1u8, 0, 1];
        hello.resize(27 + 32, 0);
        let _ = s.write_all(&hello);
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        (r.is_ok() || rest.is_empty(), rest)
    });
    assert!(outcome.0, "closed");
    assert!(
        outcome.1.is_empty(),
        "served without the secret: {:?}",
        outcome.1
    );
}

/// kill -9 of a pool's owner: once the leader released its claims (claim_timeout_ms), a client
/// reconnecting through a survivor works, and the pool has a new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_killed_pool_moves() {
    let mut cluster = blocking(Cluster::start);
    let apis: Vec<SocketAddr> = (1..=3).map(|i| cluster.pooler(i).api).collect();
    let id = unique("cl_fail");
    let (role, password) = tenant_with_role(apis[0], &id).await;
    let user = format!("{role}.{id}");
    let key = format!("{id}/{role}/transaction");
    // Claimed through node 2.
    let tx2 = cluster.pooler(2).transaction;
    until_serves(tx2, &user, &password, "node 2").await;
    let owner = agreed_owner(&apis, &key, None).await;
    let killed_at = Instant::now();
    let mut dead = cluster.members[(owner - 1) as usize]
        .pooler
        .take()
        .expect("owner running");
    dead.kill9();
    drop(dead);
    let survivor = (owner % 3) + 1;
    let tx = cluster.pooler(survivor).transaction;
    let (u, p) = (user.clone(), password.clone());
    eventually(
        "a client through a survivor after the owner died",
        CONVERGE,
        move || {
            let (u, p) = (u.clone(), p.clone());
            async move {
                match try_connect(tx, &u, &p).await {
                    Ok(c) => c.query_one("SELECT 1", &[]).await.is_ok(),
                    Err(_) => false,
                }
            }
        },
    )
    .await;
    let took = killed_at.elapsed();
    let alive: Vec<SocketAddr> = (1..=3)
        .filter(|&i| i != owner)
        .map(|i| cluster.pooler(i).api)
        .collect();
    let new_owner = agreed_owner(&alive, &key, Some(owner)).await;
    eprintln!(
        "cluster: owner {owner} killed; a client through node {survivor} works after {took:?} (new owner {new_owner})"
    );
    assert_ne!(new_owner, owner);

    // The cluster-wide views mark the dead node and show the others.
    let (status, body) = crate::replica_tests::http_get(
        cluster.pooler(survivor).api,
        "/api/pools?scope=cluster",
        crate::replica_tests::token(API_JWT_SECRET),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{v}");
    for n in nodes {
        let dead = n["node_id"] == owner;
        assert_eq!(n["ok"], !dead, "{v}");
        assert_eq!(n["error"].is_string(), dead, "{v}");
    }
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["tenant"] == id.as_str() && p["node"] == new_owner),
        "{v}"
    );
    let port = cluster.pooler(survivor).transaction.port();
    let out = blocking(|| {
        pg_program("psql")
            .arg(format!(
                "host=127.0.0.1 port={port} user=admin.supavisor dbname=supavisor"
            ))
            .args(["-c", "SHOW VERSION"])
            .env("PGPASSWORD", crate::replica_tests::token(API_JWT_SECRET))
            .output()
            .expect("psql")
    });
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("WARNING:  node {owner} did not answer")),
        "{stderr}"
    );
    assert!(stdout.contains("(2 rows)"), "{stdout}");
}
