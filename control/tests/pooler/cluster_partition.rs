//! A network partition with three real `supavisor` processes: the owner of a pool (once a
//! follower, once the raft leader) is cut off from the two other nodes, then the partition heals.
//! At no moment may two nodes serve the pool: PostgreSQL never sees more backends of the pool's
//! role than `pool_size`, and no sampled moment shows two nodes that both own the pool in their
//! applied state and hold a valid lease. Afterwards the cluster converges: one agreed owner, the
//! formerly cut-off node catches up, and clients through every node work.
//!
//! **How the partition is made.** Node N listens (raft port P, proxy link P + 1) on its own
//! loopback address 127.0.0.(10+N) and binds its outbound node-to-node connections (raft and
//! proxy links) to that address. It advertises a forwarder of this test (127.0.0.(20+N):Q, Q + 1
//! → P, P + 1), so every connection another node opens to it passes the forwarder, which sees the
//! connecting node in the source address. Cutting the pair (A, B) blackholes their connections
//! in both directions, like a real partition: bytes already accepted are held (not dropped, so
//! TCP's retransmission after a heal is what happens here too), new connections are accepted but
//! get nothing through. Healing lets everything held through. Clients and the API are reached
//! directly, so the test sees both sides.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cluster_tests::{agreed_owner, blocking, tenant_with_role, CLUSTER_SECRET, CONVERGE};
use crate::harness::*;

const HEARTBEAT_MS: u64 = 200;
const CLAIM_TIMEOUT_MS: u64 = 1000;
/// The pool size `tenant_with_role` gives its tenants.
const POOL_SIZE: i64 = 2;

/// The loopback address node `id` listens on and connects from.
fn node_ip(id: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 10 + id as u8)
}

/// The loopback address of node `id`'s forwarder. The forwarders stay off 127.0.0.1 (and connect
/// from 127.0.0.20), so that their ports never collide with the ports other tests running at the
/// same time pick there.
fn forwarder_ip(id: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 20 + id as u8)
}

const FORWARDER_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 20);

/// The node a connection comes from, by its source address (0: not a node).
fn node_of(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4)
            if v4.octets()[..3] == [127, 0, 0] && (11..=19).contains(&v4.octets()[3]) =>
        {
            u64::from(v4.octets()[3] - 10)
        }
        _ => 0,
    }
}

type Cuts = HashSet<(u64, u64)>;

fn pair(a: u64, b: u64) -> (u64, u64) {
    (a.min(b), a.max(b))
}

/// The partition state every forwarder follows.
#[derive(Clone)]
struct Net {
    cuts: Arc<watch::Sender<Cuts>>,
}

impl Net {
    fn new() -> Net {
        Net {
            cuts: Arc::new(watch::Sender::new(HashSet::new())),
        }
    }

    /// Cut `node` off from every other node.
    fn isolate(&self, node: u64) {
        self.cuts.send_modify(|c| {
            for other in (1..=3).filter(|&o| o != node) {
                c.insert(pair(node, other));
            }
        });
    }

    fn heal(&self) {
        self.cuts.send_modify(|c| c.clear());
    }
}

/// Waits while the pair is cut.
async fn wait_open(cuts: &mut watch::Receiver<Cuts>, p: (u64, u64)) {
    loop {
        if !cuts.borrow_and_update().contains(&p) {
            return;
        }
        if cuts.changed().await.is_err() {
            return;
        }
    }
}

/// One node's forwarder: `addr` → its raft port, `addr + 1` → its proxy link port.
struct Forwarder {
    addr: SocketAddr,
    _tasks: JoinSet<()>,
}

impl Forwarder {
    async fn start(net: &Net, node: u64, target: SocketAddr) -> Forwarder {
        let ip = forwarder_ip(node);
        loop {
            let a = TcpListener::bind((ip, 0)).await.expect("bind");
            let port = a.local_addr().expect("local addr").port();
            if port == u16::MAX {
                continue;
            }
            let Ok(b) = TcpListener::bind((ip, port + 1)).await else {
                continue;
            };
            let link = SocketAddr::new(target.ip(), target.port() + 1);
            let mut tasks = JoinSet::new();
            tasks.spawn(accept_loop(a, net.clone(), node, target));
            tasks.spawn(accept_loop(b, net.clone(), node, link));
            return Forwarder {
                addr: SocketAddr::from((ip, port)),
                _tasks: tasks,
            };
        }
    }
}

async fn accept_loop(listener: TcpListener, net: Net, node: u64, target: SocketAddr) {
    // Dropping the set (when this task is aborted) aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, peer)) = accepted {
                    let p = pair(node_of(peer.ip()), node);
                    conns.spawn(relay(stream, net.cuts.subscribe(), p, target));
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn relay(
    down: TcpStream,
    mut cuts: watch::Receiver<Cuts>,
    p: (u64, u64),
    target: SocketAddr,
) {
    wait_open(&mut cuts, p).await;
    let connected = async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((FORWARDER_SOURCE, 0)))?;
        socket.connect(target).await
    };
    let Ok(up) = connected.await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let _ = down.set_nodelay(true);
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    tokio::join!(pump(dr, uw, cuts.clone(), p), pump(ur, dw, cuts, p));
}

async fn pump(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    mut cuts: watch::Receiver<Cuts>,
    p: (u64, u64),
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        wait_open(&mut cuts, p).await;
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // The end of the stream is held back by the partition too.
    wait_open(&mut cuts, p).await;
    let _ = w.shutdown().await;
}

struct PNode {
    pooler: Pooler,
}

struct PCluster {
    nodes: Vec<PNode>,
    net: Net,
    _forwarders: Vec<Forwarder>,
    _dir: tempfile::TempDir,
}

/// A free port P on `ip` with P + 1 free too.
fn raft_pair(ip: Ipv4Addr) -> SocketAddr {
    loop {
        let l = std::net::TcpListener::bind((ip, 0)).expect("bind a node address");
        let a = l.local_addr().expect("local addr");
        if a.port() < u16::MAX && std::net::TcpListener::bind((ip, a.port() + 1)).is_ok() {
            return a;
        }
    }
}

impl PCluster {
    async fn start() -> PCluster {
        let net = Net::new();
        let dir = tempfile::Builder::new()
            .prefix("supavisor-partition.")
            .tempdir()
            .expect("temp dir");
        let mut forwarders = Vec::new();
        let mut rafts = Vec::new();
        for id in 1..=3 {
            let raft = raft_pair(node_ip(id));
            forwarders.push(Forwarder::start(&net, id, raft).await);
            rafts.push(raft);
        }
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            let i = (id - 1) as usize;
            let mut cfg = PoolerConfig::tenants(vec![]);
            cfg.shards = 1;
            cfg.store_dir = Some(dir.path().join(format!("store{id}")));
            let join = if id == 1 {
                String::new()
            } else {
                format!("join = \"{}\"\n", forwarders[0].addr)
            };
            cfg.extra_toml = format!(
                "[cluster]\nnode_id = {id}\naddr = \"{}\"\nadvertise = \"{}\"\nsecret = \"{CLUSTER_SECRET}\"\n\
                 heartbeat_ms = {HEARTBEAT_MS}\nclaim_timeout_ms = {CLAIM_TIMEOUT_MS}\n{join}",
                rafts[i], forwarders[i].addr
            );
            let pooler = blocking(|| Pooler::start(&cfg));
            nodes.push(PNode { pooler });
        }
        PCluster {
            nodes,
            net,
            _forwarders: forwarders,
            _dir: dir,
        }
    }

    fn tx(&self, id: u64) -> SocketAddr {
        self.nodes[(id - 1) as usize].pooler.transaction
    }

    fn api(&self, id: u64) -> SocketAddr {
        self.nodes[(id - 1) as usize].pooler.api
    }

    fn apis(&self) -> Vec<SocketAddr> {
        (1..=3).map(|i| self.api(i)).collect()
    }
}

/// `GET /api/cluster` over plain HTTP (faster than the CLI for sampling); `None` when the node
/// does not answer within 5 s.
async fn api_cluster(api: SocketAddr) -> Option<Value> {
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"role": "anon"}),
        &jsonwebtoken::EncodingKey::from_secret(API_JWT_SECRET.as_bytes()),
    )
    .ok()?;
    let fut = async {
        let mut s = TcpStream::connect(api).await.ok()?;
        let req = format!(
            "GET /api/cluster HTTP/1.1\r\nHost: supavisor\r\nConnection: close\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let v: Value = serde_json::from_slice(&buf[split + 4..]).ok()?;
        v.get("data").cloned()
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// What one node says about the pool `key`.
#[derive(Debug, Clone)]
struct View {
    owner: Option<u64>,
    lease: bool,
    leader: Option<u64>,
    last_applied: u64,
}

async fn view(api: SocketAddr, key: &str) -> Option<View> {
    let d = api_cluster(api).await?;
    Some(View {
        owner: d["claims"].get(key).and_then(Value::as_u64),
        lease: d["lease_valid"].as_bool().unwrap_or(false),
        leader: d["leader"].as_u64(),
        last_applied: d["last_applied"].as_u64().unwrap_or(0),
    })
}

/// Connects within `limit`; the error as "SQLSTATE message".
async fn connect_within(
    addr: SocketAddr,
    user: &str,
    password: &str,
    limit: Duration,
) -> Result<Conn, String> {
    match tokio::time::timeout(limit, connect_with(&client_config(addr, user, password))).await {
        Err(_) => Err(format!("no answer within {limit:?}")),
        Ok(Err(e)) => Err(format!(
            "{} {}",
            sqlstate(&e).unwrap_or_default(),
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string())
        )),
        Ok(Ok(c)) => Ok(c),
    }
}

/// A client through `addr` logs in and runs a query, each step within 2 s.
async fn works(addr: SocketAddr, user: String, password: String) -> bool {
    let limit = Duration::from_secs(2);
    let Ok(c) = connect_within(addr, &user, &password, limit).await else {
        return false;
    };
    matches!(
        tokio::time::timeout(limit, c.client.query_one("SELECT 40 + 2", &[])).await,
        Ok(Ok(r)) if r.get::<_, i32>(0) == 42
    )
}

/// Starts an attempt every 100 ms (each may hang while its node still proxies to the cut-off
/// owner) until one succeeds; returns when that was, measured from `since`.
async fn first_success(addr: SocketAddr, user: &str, password: &str, since: Instant) -> Duration {
    let first: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let mut attempts = JoinSet::new();
    loop {
        if let Some(t) = *first.lock().unwrap() {
            return t - since;
        }
        assert!(
            since.elapsed() < CONVERGE,
            "no client through {addr} succeeded within {CONVERGE:?}"
        );
        let (f, u, p) = (first.clone(), user.to_string(), password.to_string());
        attempts.spawn(async move {
            if works(addr, u, p).await {
                f.lock().unwrap().get_or_insert_with(Instant::now);
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples, until stopped, PostgreSQL's backends of `role` (every ~10 ms) and every node's
/// view of the pool (rounds of three concurrent API calls).
struct Samplers {
    stop: Arc<AtomicBool>,
    most_backends: Arc<AtomicI64>,
    rounds: Arc<AtomicU64>,
    two_serving: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Samplers {
    async fn start(role: &str, apis: Vec<SocketAddr>, key: &str) -> Samplers {
        let stop = Arc::new(AtomicBool::new(false));
        let most_backends = Arc::new(AtomicI64::new(0));
        let rounds = Arc::new(AtomicU64::new(0));
        let two_serving = Arc::new(Mutex::new(Vec::new()));
        let pg_client = direct().await;
        let b = {
            let (stop, most, role) = (stop.clone(), most_backends.clone(), role.to_string());
            tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    let n: i64 = pg_client
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity \
                             WHERE usename = $1 AND application_name = 'Supavisor'",
                            &[&role],
                        )
                        .await
                        .expect("pg_stat_activity")
                        .get(0);
                    most.fetch_max(n, Ordering::AcqRel);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let v = {
            let (stop, rounds, two, key) = (
                stop.clone(),
                rounds.clone(),
                two_serving.clone(),
                key.to_string(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    let started = Instant::now();
                    let views =
                        futures_util::future::join_all(apis.iter().map(|&api| view(api, &key)))
                            .await;
                    let serving: Vec<u64> = views
                        .iter()
                        .zip(1u64..)
                        .filter(|(v, id)| {
                            v.as_ref().is_some_and(|v| v.lease && v.owner == Some(*id))
                        })
                        .map(|(_, id)| id)
                        .collect();
                    rounds.fetch_add(1, Ordering::AcqRel);
                    if serving.len() > 1 {
                        two.lock().unwrap().push(format!(
                            "nodes {serving:?} both serve (round of {:?}): {views:?}",
                            started.elapsed()
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        Samplers {
            stop,
            most_backends,
            rounds,
            two_serving,
            tasks: vec![b, v],
        }
    }

    async fn finish(self) -> (i64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            t.await.expect("sampler");
        }
        let two = self.two_serving.lock().unwrap().clone();
        (
            self.most_backends.load(Ordering::Acquire),
            self.rounds.load(Ordering::Acquire),
            two,
        )
    }
}

/// Clients through the given nodes running short queries in a loop until stopped, reconnecting
/// after any error; counts the queries that worked and the errors by kind.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    errors: Arc<Mutex<BTreeMap<String, u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addrs: &[SocketAddr], user: &str, password: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(BTreeMap::new()));
        let mut tasks = Vec::new();
        for &addr in addrs {
            for _ in 0..2 {
                let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
                let (u, p) = (user.to_string(), password.to_string());
                tasks.push(tokio::spawn(async move {
                    let limit = Duration::from_secs(3);
                    let note = |e: String| {
                        let kind: String = e.chars().take(60).collect();
                        *errors.lock().unwrap().entry(kind).or_insert(0) += 1;
                    };
                    while !stop.load(Ordering::Acquire) {
                        let c = match connect_within(addr, &u, &p, limit).await {
                            Ok(c) => c,
                            Err(e) => {
                                note(format!("connect: {e}"));
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        while !stop.load(Ordering::Acquire) {
                            let q = c.client.query_one("SELECT pg_sleep(0.02)::text", &[]);
                            match tokio::time::timeout(limit, q).await {
                                Ok(Ok(_)) => {
                                    ok.fetch_add(1, Ordering::AcqRel);
                                }
                                Ok(Err(e)) => {
                                    note(format!(
                                        "query: {} {e}",
                                        sqlstate(&e).unwrap_or_default()
                                    ));
                                    break;
                                }
                                Err(_) => {
                                    note("query: no answer within 3 s".into());
                                    break;
                                }
                            }
                        }
                    }
                }));
            }
        }
        Load {
            stop,
            ok,
            errors,
            tasks,
        }
    }

    async fn finish(self) -> (u64, BTreeMap<String, u64>) {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            t.await.expect("load task");
        }
        let errors = self.errors.lock().unwrap().clone();
        (self.ok.load(Ordering::Acquire), errors)
    }
}

/// The numbers one partition measured.
struct Measured {
    fenced: Duration,
    backends_closed: Duration,
    majority_serves: Duration,
    converged: Duration,
}

/// Cuts the owner of a fresh pool off (the raft leader when `leader_owns`, else a follower),
/// checks both sides, heals, checks convergence.
async fn partition_owner(c: &PCluster, leader_owns: bool) -> Measured {
    let label = if leader_owns { "leader" } else { "follower" };
    let apis = c.apis();
    let asked = Instant::now();
    let leader = loop {
        if let Some(l) = view(apis[0], "").await.and_then(|v| v.leader) {
            break l;
        }
        assert!(asked.elapsed() < CONVERGE, "no leader within {CONVERGE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let owner = if leader_owns {
        leader
    } else {
        (1..=3).find(|&n| n != leader).expect("a follower")
    };
    let majority: Vec<u64> = (1..=3).filter(|&n| n != owner).collect();

    let id = unique(if leader_owns { "pt_lead" } else { "pt_foll" });
    let (role, password) = tenant_with_role(apis[0], &id).await;
    let user = format!("{role}.{id}");
    let key = format!("{id}/{role}/transaction");
    // The first client through `owner` makes it claim the pool.
    {
        let (tx, u, p) = (c.tx(owner), user.clone(), password.clone());
        eventually(
            "the tenant serves through the owner-to-be",
            CONVERGE,
            move || works(tx, u.clone(), p.clone()),
        )
        .await;
    }
    assert_eq!(agreed_owner(&apis, &key, None).await, owner, "{label}");

    // A client of a majority node proxied to the owner, idle; then both of the owner's server
    // connections taken: one idle in a transaction, one running a long query.
    let limit = Duration::from_secs(5);
    let proxied = connect_within(c.tx(majority[0]), &user, &password, limit)
        .await
        .expect("proxied client");
    proxied
        .client
        .simple_query("SELECT 1")
        .await
        .expect("proxied query");
    let in_tx = connect_within(c.tx(owner), &user, &password, limit)
        .await
        .expect("client in a transaction");
    in_tx
        .client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    let sleeper = connect_within(c.tx(owner), &user, &password, limit)
        .await
        .expect("client of a long query");
    let sleeping = tokio::spawn(async move {
        let r = sleeper.client.query_one("SELECT pg_sleep(60)", &[]).await;
        (r, Instant::now())
    });
    {
        let role = role.clone();
        eventually(
            "both server connections of the owner busy",
            CONVERGE,
            move || {
                let role = role.clone();
                async move {
                    let active: i64 = direct()
                        .await
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 \
                         AND query = 'SELECT pg_sleep(60)' AND state = 'active'",
                            &[&role],
                        )
                        .await
                        .map(|r| r.get(0))
                        .unwrap_or(0);
                    active == 1 && crate::cluster_tests::backends(&role).await == POOL_SIZE
                }
            },
        )
        .await;
    }
    let samplers = Samplers::start(&role, apis.clone(), &key).await;

    // ---- Partition.
    let cut_at = Instant::now();
    c.net.isolate(owner);
    eprintln!("partition ({label} owns): node {owner} cut off from {majority:?}");
    // The idle client of a majority node proxied to the cut-off owner asks a query now: the link
    // is cut, so only its node can end it (once it sees the pool move).
    let proxied_q = tokio::spawn(async move {
        let r = proxied.client.simple_query("SELECT 2").await;
        (r.map(|_| ()), Instant::now())
    });

    // The cut-off owner fences itself: its running query ends with the fencing error, the
    // client idle in its transaction is closed, and PostgreSQL loses both backends.
    let (r, at) = within("the fenced owner ends the long query", sleeping)
        .await
        .expect("sleeper task");
    let fenced = at - cut_at;
    let msg = expect_code(r, "08006");
    assert!(msg.contains("no longer serves the pool"), "{msg}");
    let r = in_tx.client.simple_query("SELECT 1").await;
    assert!(
        r.is_err(),
        "the fenced owner's client in a transaction goes on: {r:?}"
    );
    let gone = within("the fenced owner's connection ends", in_tx.task)
        .await
        .expect("connection task");
    if let Err(e) = &gone {
        if let Some(code) = sqlstate(e) {
            assert_eq!(code, "08006", "{e}");
        }
    }
    {
        let role = role.clone();
        eventually("the fenced owner's backends close", CONVERGE, move || {
            let role = role.clone();
            async move { crate::cluster_tests::backends(&role).await == 0 }
        })
        .await;
    }
    let backends_closed = cut_at.elapsed();
    // A new client of the cut-off owner is refused with 08006 while it is fenced.
    match connect_within(c.tx(owner), &user, &password, limit).await {
        Ok(_) => panic!("the cut-off owner took a new client"),
        Err(e) => assert!(
            e.starts_with("08006") && e.contains("lost its lease"),
            "{e}"
        ),
    }

    // The majority takes the pool over, through either of its nodes.
    let majority_serves = first_success(c.tx(majority[0]), &user, &password, cut_at).await;
    let also = first_success(c.tx(majority[1]), &user, &password, cut_at).await;
    let new_owner = {
        let views =
            futures_util::future::join_all(majority.iter().map(|&m| view(c.api(m), &key))).await;
        let owners: Vec<Option<u64>> = views
            .iter()
            .map(|v| v.as_ref().and_then(|v| v.owner))
            .collect();
        assert!(
            owners[0].is_some() && owners[0] == owners[1] && owners[0] != Some(owner),
            "majority owners of {key}: {owners:?}"
        );
        owners[0].unwrap_or_default()
    };
    // The cut-off node still has the old claim in its applied state, but no lease.
    let v = view(c.api(owner), &key)
        .await
        .expect("the cut-off node answers its API");
    assert!(
        !v.lease,
        "cut-off node {owner} reports a valid lease: {v:?}"
    );

    // Load through the majority while the partition lasts, and across the heal.
    let load = Load::start(&[c.tx(majority[0]), c.tx(majority[1])], &user, &password);
    {
        let ok = load.ok.clone();
        eventually("queries through the majority", CONVERGE, move || {
            let ok = ok.clone();
            async move { ok.load(Ordering::Acquire) >= 20 }
        })
        .await;
    }

    // That query ends (its node closes the link once the claim moved) while the partition lasts.
    let (proxied_r, proxied_at) = within("the proxied client's query ends", proxied_q)
        .await
        .expect("proxied task");
    assert!(proxied_r.is_err(), "a query through a cut link answered");
    let proxied_closed = proxied_at - cut_at;

    // ---- Heal.
    let healed_at = Instant::now();
    c.net.heal();
    loop {
        let views = futures_util::future::join_all(apis.iter().map(|&api| view(api, &key))).await;
        let leader_applied = views
            .iter()
            .flatten()
            .find(|v| v.leader.is_some())
            .map(|v| v.last_applied);
        let agreed = views.iter().all(|v| {
            v.as_ref().is_some_and(|v| {
                v.lease && v.owner.is_some() && v.owner == views[0].as_ref().and_then(|x| x.owner)
            })
        });
        let caught_up = views[(owner - 1) as usize]
            .as_ref()
            .zip(leader_applied)
            .is_some_and(|(v, a)| v.last_applied + 2 >= a);
        if agreed && caught_up && works(c.tx(owner), user.clone(), password.clone()).await {
            break;
        }
        assert!(
            healed_at.elapsed() < CONVERGE,
            "no convergence within {CONVERGE:?} after the heal: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converged = healed_at.elapsed();
    let final_owner = agreed_owner(&apis, &key, None).await;
    let (queries, errors) = load.finish().await;
    let (most, rounds, two) = samplers.finish().await;

    // Clients through every node work; the pool is still at most pool_size backends.
    for n in 1..=3 {
        assert!(
            works(c.tx(n), user.clone(), password.clone()).await,
            "a client through node {n} after convergence"
        );
    }
    eprintln!(
        "partition ({label} owns, node {owner}): fenced after {fenced:?} (backends closed by {backends_closed:?}); \
         majority serves after {majority_serves:?} (node {}) and {also:?} (node {}), new owner {new_owner}; \
         converged {converged:?} after the heal (owner {final_owner}); \
         {queries} queries through the majority, errors {errors:?}; \
         at most {most} backends (pool_size {POOL_SIZE}) in {rounds} ownership samples; \
         the query of a client proxied to the cut-off owner ended after {proxied_closed:?} ({:?})",
        majority[0],
        majority[1],
        proxied_r.as_ref().map_err(|e| format!("{} {e}", sqlstate(e).unwrap_or_default())),
    );
    assert!(two.is_empty(), "two owners serving at once: {two:#?}");
    assert!(
        (1..=POOL_SIZE).contains(&most),
        "PostgreSQL saw {most} backends of a pool of {POOL_SIZE}"
    );
    assert!(queries >= 20, "{queries} queries through the majority");
    Measured {
        fenced,
        backends_closed,
        majority_serves,
        converged,
    }
}

/// The owner of a pool cut off from the two other nodes, first as a follower, then as the raft
/// leader: never two owners, both sides behave, and the cluster converges after the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_partition_owner_cut_off_then_healed() {
    let c = PCluster::start().await;
    let started = Instant::now();
    let follower = partition_owner(&c, false).await;
    let leader = partition_owner(&c, true).await;
    eprintln!(
        "partition summary (heartbeat_ms {HEARTBEAT_MS}, claim_timeout_ms {CLAIM_TIMEOUT_MS}): \
         follower owner: fenced {:?}, backends closed {:?}, majority serves {:?}, converged {:?}; \
         leader owner: fenced {:?}, backends closed {:?}, majority serves {:?}, converged {:?}; \
         both scenarios in {:?}",
        follower.fenced,
        follower.backends_closed,
        follower.majority_serves,
        follower.converged,
        leader.fenced,
        leader.backends_closed,
        leader.majority_serves,
        leader.converged,
        started.elapsed()
    );
    // Fencing comes before the majority can take over (the lease lapses at half the timeout,
    // the release comes at the full timeout at the earliest).
    for m in [&follower, &leader] {
        assert!(m.backends_closed < m.majority_serves, "fenced too late");
    }
}
