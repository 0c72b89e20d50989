//! In-process clusters on 127.0.0.1 with temporary sled directories.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::network::{call, Reply, Rpc};
use cluster::rpc::Client;
use cluster::{ClusterConfig, ClusterNode, MemKv, NodeId, Request, Response};

const SECRET: &str = "test-cluster-secret";

fn cfg(id: NodeId) -> ClusterConfig {
    let mut c = ClusterConfig::new(id, "127.0.0.1:0", SECRET);
    c.heartbeat_ms = 100;
    c.claim_timeout_ms = 1200;
    c.raft_heartbeat_ms = 50;
    c.election_timeout_min_ms = 300;
    c.election_timeout_max_ms = 600;
    c.write_timeout_ms = 8000;
    c
}

/// Open a sled dir, retrying while a previous incarnation's handles are still being dropped.
async fn open_db(dir: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopen sled: {e}"),
        }
    }
}

/// Poll `check` until it returns true or `secs` pass.
async fn eventually<F, Fut>(what: &str, secs: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Member {
    node: ClusterNode,
    app: Arc<MemKv>,
    dir: tempfile::TempDir,
}

async fn start(c: ClusterConfig, dir: tempfile::TempDir, app: Arc<MemKv>) -> Member {
    let db = open_db(dir.path()).await;
    let node = ClusterNode::start(c, db, app.clone())
        .await
        .expect("start node");
    Member { node, app, dir }
}

/// Node 1 initializes, nodes 2 and 3 join as voters.
async fn three_nodes(tweak: impl Fn(&mut ClusterConfig)) -> Vec<Member> {
    let mut c1 = cfg(1);
    tweak(&mut c1);
    let m1 = start(c1, tempfile::tempdir().expect("tempdir"), Arc::default()).await;
    let mut members = vec![m1];
    for id in 2..=3 {
        let mut c = cfg(id);
        c.join = Some(members[0].node.addr().to_string());
        tweak(&mut c);
        members.push(start(c, tempfile::tempdir().expect("tempdir"), Arc::default()).await);
    }
    for m in &members {
        m.node
            .raft()
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |x| x.membership_config.membership().voter_ids().count() == 3,
                "3 voters",
            )
            .await
            .expect("membership");
    }
    members
}

async fn leader_of(members: &[Member]) -> NodeId {
    let mut leader = None;
    eventually("a leader", 10, || {
        let l = members[0].node.raft().metrics().borrow().current_leader;
        leader = l;
        async move { l.is_some() }
    })
    .await;
    leader.expect("leader")
}

/// The highest applied index among `members`: the leader's, when it is among them, covers every
/// write acknowledged so far.
fn max_applied(members: &[Member]) -> u64 {
    members
        .iter()
        .map(|m| *m.node.subscribe().borrow())
        .max()
        .unwrap_or(0)
}

async fn shutdown_all(members: Vec<Member>) {
    for m in &members {
        m.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_on_follower_reaches_all_and_racing_claims_agree() {
    let members = three_nodes(|_| {}).await;
    let leader = leader_of(&members).await;
    let follower = members
        .iter()
        .find(|m| m.node.id() != leader)
        .expect("follower");
    let r = follower
        .node
        .write_indexed(Request::App(b"put a 1".to_vec()))
        .await
        .expect("write");
    assert_eq!(r.1, Response::App(Ok(Vec::new())));
    follower
        .node
        .subscribe()
        .wait_for(|i| *i >= r.0)
        .await
        .expect("applied locally");
    assert_eq!(follower.app.get("a").as_deref(), Some("1"));
    let refused = follower
        .node
        .write_app(b"del missing".to_vec())
        .await
        .expect("write");
    assert!(refused.is_err());
    let index = max_applied(&members);
    for m in &members {
        let mut rx = m.node.subscribe();
        rx.wait_for(|i| *i >= index).await.expect("applied");
        assert_eq!(m.app.get("a").as_deref(), Some("1"));
    }

    // All three claim the same key at the same instant.
    let claims = members.iter().map(|m| {
        let n = m.node.clone();
        tokio::spawn(async move { n.claim("t/u/transaction").await })
    });
    let mut owners = Vec::new();
    for c in claims {
        owners.push(c.await.expect("join").expect("claim"));
    }
    assert!(owners.iter().all(|o| *o == owners[0]), "{owners:?}");
    let index = max_applied(&members);
    for m in &members {
        m.node
            .subscribe()
            .wait_for(|i| *i >= index)
            .await
            .expect("applied");
        assert_eq!(m.node.owner("t/u/transaction"), Some(owners[0]));
    }
    let status = follower.node.status().await;
    assert_eq!(status.voters, vec![1, 2, 3]);
    assert_eq!(status.leader, Some(leader));
    assert_eq!(
        follower.node.node_addr(leader).as_deref(),
        Some(members[leader as usize - 1].node.addr())
    );

    // Application queries between any two members (node 3 answers none).
    let limit = Duration::from_secs(2);
    for m in &members[..2] {
        m.node.set_query_handler(Arc::new(Echo(m.node.id())));
    }
    for asker in &members {
        for target in [1, 2] {
            let answer = asker.node.query(target, "hi".into(), limit).await;
            assert_eq!(answer.expect("answer"), format!("node {target}: hi"));
        }
        let none = asker.node.query(3, "hi".into(), limit).await;
        assert!(
            matches!(&none, Err(cluster::ClusterError::Remote(e)) if e.contains("no queries")),
            "{none:?}"
        );
        assert!(asker.node.query(9, "hi".into(), limit).await.is_err());
    }
    let refused = members[0].node.query(2, "fail".into(), limit).await;
    assert!(matches!(refused, Err(cluster::ClusterError::Remote(e)) if e == "refused"));
    shutdown_all(members).await;
}

/// Answers `hi` with its node id, refuses `fail`.
struct Echo(NodeId);

impl cluster::QueryHandler for Echo {
    fn answer(
        &self,
        body: String,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<String, String>> + Send>> {
        let id = self.0;
        Box::pin(async move {
            match body.as_str() {
                "fail" => Err("refused".to_string()),
                b => Ok(format!("node {id}: {b}")),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_owner_loses_its_claims_after_the_timeout() {
    let mut members = three_nodes(|_| {}).await;
    let leader = leader_of(&members).await;
    let pos = members
        .iter()
        .position(|m| m.node.id() != leader)
        .expect("follower");
    let owner = members.remove(pos);
    assert_eq!(
        owner.node.claim("t/u/session").await.expect("claim"),
        owner.node.id()
    );
    let o = owner.node.clone();
    eventually("owner lease", 5, || {
        let v = o.lease_valid();
        async move { v }
    })
    .await;
    owner.node.shutdown().await;
    let stopped = Instant::now();
    let other = &members[0];
    eventually("claims released", 10, || {
        let gone = other.node.owner("t/u/session").is_none();
        async move { gone }
    })
    .await;
    // Never before the claim timeout (the leader waits that long after last hearing from it).
    assert!(stopped.elapsed() >= Duration::from_millis(cfg(0).claim_timeout_ms / 2));
    assert_eq!(
        other.node.claim("t/u/session").await.expect("claim"),
        other.node.id()
    );
    let status = other.node.status().await;
    let dead = &status.nodes[&owner.node.id()];
    assert!(!dead.healthy, "{status:?}");
    // The stopped owner fences itself: no heartbeat acks any more.
    eventually("owner lease expires", 5, || {
        let v = owner.node.lease_valid();
        async move { !v }
    })
    .await;
    shutdown_all(members).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_continue_after_the_leader_stops() {
    let mut members = three_nodes(|_| {}).await;
    let leader = leader_of(&members).await;
    members[0]
        .node
        .write_app(b"put before 1".to_vec())
        .await
        .expect("write")
        .expect("applied");
    let pos = members
        .iter()
        .position(|m| m.node.id() == leader)
        .expect("leader");
    let old = members.remove(pos);
    old.node.shutdown().await;
    for m in &members {
        m.node
            .raft()
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |x| x.current_leader.is_some() && x.current_leader != Some(leader),
                "new leader",
            )
            .await
            .expect("new leader");
    }
    let r = members[1]
        .node
        .write_app(b"put after 2".to_vec())
        .await
        .expect("write");
    assert_eq!(r, Ok(Vec::new()));
    let index = max_applied(&members);
    for m in &members {
        m.node
            .subscribe()
            .wait_for(|i| *i >= index)
            .await
            .expect("applied");
        assert_eq!(m.app.get("after").as_deref(), Some("2"));
        assert_eq!(m.app.get("before").as_deref(), Some("1"));
    }
    shutdown_all(members).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_catches_up_through_a_snapshot() {
    let mut members = three_nodes(|c| {
        c.snapshot_logs = 10;
        c.keep_logs = 0;
    })
    .await;
    let leader = leader_of(&members).await;
    let pos = members
        .iter()
        .position(|m| m.node.id() != leader)
        .expect("follower");
    let down = members.remove(pos);
    let id = down.node.id();
    let addr = down.node.addr().to_string();
    down.node.shutdown().await;
    let Member { node, app, dir } = down;
    drop(node);
    for i in 0..40 {
        let cmd = format!("put k{i} {i}").into_bytes();
        members[0]
            .node
            .write_app(cmd)
            .await
            .expect("write")
            .expect("applied");
    }
    members[0]
        .node
        .claim("t/u/transaction")
        .await
        .expect("claim");
    // The log behind the snapshot is gone on the leader.
    let leader_node = &members
        .iter()
        .find(|m| m.node.id() == leader)
        .expect("leader")
        .node;
    leader_node
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(|x| x.purged.is_some_and(|p| p.index >= 20), "purged log")
        .await
        .expect("purge");

    // Same address: the membership records it.
    let mut c = cfg(id);
    c.listen = addr;
    c.snapshot_logs = 10;
    c.keep_logs = 0;
    c.join = Some(members[0].node.addr().to_string());
    let back = start(c, dir, app).await;
    let target = *leader_node.subscribe().borrow();
    back.node
        .subscribe()
        .wait_for(|i| *i >= target)
        .await
        .expect("caught up");
    assert_eq!(back.app.get("k39").as_deref(), Some("39"));
    assert_eq!(back.app.all().len(), 40);
    assert_eq!(
        back.node.owner("t/u/transaction"),
        Some(members[0].node.id())
    );
    let m = back.node.raft().metrics().borrow().clone();
    assert!(m.snapshot.is_some(), "installed a snapshot: {m:?}");
    members.push(back);
    shutdown_all(members).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_and_nothing_applied() {
    let m = start(
        cfg(1),
        tempfile::tempdir().expect("tempdir"),
        Arc::default(),
    )
    .await;
    m.node.claim("warmup").await.expect("claim");
    let before = *m.node.subscribe().borrow();
    let intruder = Client::new(b"not-the-secret", None);
    let rpc = Rpc::Write(Request::Claim {
        key: "t/u/session".into(),
        node: 66,
    });
    let r = call(&intruder, m.node.addr(), &rpc, Duration::from_secs(2)).await;
    assert!(r.is_err(), "{r:?}");
    let honest = Client::new(SECRET.as_bytes(), None);
    let r = call(
        &honest,
        m.node.addr(),
        &Rpc::Write(Request::ReleaseNode { node: 66 }),
        Duration::from_secs(2),
    )
    .await;
    assert!(matches!(r, Ok(Reply::Written { .. })), "{r:?}");
    assert_eq!(m.node.owner("t/u/session"), None);
    assert_eq!(*m.node.subscribe().borrow(), before + 1);

    // A node with the wrong secret cannot join.
    let mut c = cfg(2);
    c.secret = "not-the-secret".into();
    c.join = Some(m.node.addr().to_string());
    c.write_timeout_ms = 1000;
    let db = sled::Config::new().temporary(true).open().expect("sled");
    let joined = ClusterNode::start(c, db, Arc::new(MemKv::default())).await;
    assert!(joined.is_err());
    let status = m.node.status().await;
    assert_eq!(status.voters, vec![1]);
    assert!(status.learners.is_empty());
    m.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_of_one_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = Arc::new(MemKv::default());
    let m = start(cfg(7), dir, app.clone()).await;
    assert_eq!(m.node.claim("t/u/session").await.expect("claim"), 7);
    m.node
        .write_app(b"put a 1".to_vec())
        .await
        .expect("write")
        .expect("applied");
    let index = *m.node.subscribe().borrow();
    let vote = m.node.raft().metrics().borrow().vote;
    m.node.shutdown().await;
    let Member { node, dir, .. } = m;
    drop(node);

    let m = start(cfg(7), dir, app).await;
    assert_eq!(m.node.owner("t/u/session"), Some(7));
    assert!(*m.node.subscribe().borrow() >= index);
    assert!(m.node.raft().metrics().borrow().vote.leader_id().term >= vote.leader_id().term);
    m.node
        .write_app(b"put b 2".to_vec())
        .await
        .expect("write")
        .expect("applied");
    assert_eq!(m.app.get("b").as_deref(), Some("2"));
    let o = m.node.clone();
    eventually("lease of a single node", 5, || {
        let v = o.lease_valid();
        async move { v }
    })
    .await;
    m.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_peers_form_a_group_and_a_node_can_leave() {
    // Reserve three ports, then start every node with the full peer list.
    let addrs: Vec<String> = (0..3)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        })
        .collect();
    let peers: Vec<(NodeId, String)> = (1..=3).zip(addrs.iter().cloned()).collect();
    let mut members = Vec::new();
    for (id, addr) in &peers {
        let mut c = cfg(*id);
        c.listen = addr.clone();
        c.peers = peers.clone();
        members.push(start(c, tempfile::tempdir().expect("tempdir"), Arc::default()).await);
    }
    for m in &members {
        m.node
            .raft()
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |x| {
                    x.current_leader.is_some()
                        && x.membership_config.membership().voter_ids().count() == 3
                },
                "group of three",
            )
            .await
            .expect("group");
    }
    assert_eq!(
        members[2].node.claim("t/u/session").await.expect("claim"),
        3
    );
    members[0].node.leave(3).await.expect("leave");
    for m in &members[..2] {
        m.node
            .raft()
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |x| x.membership_config.membership().nodes().count() == 2,
                "node 3 gone",
            )
            .await
            .expect("left");
        let index = max_applied(&members);
        m.node
            .subscribe()
            .wait_for(|i| *i >= index)
            .await
            .expect("applied");
        assert_eq!(m.node.owner("t/u/session"), None);
    }
    assert_eq!(members[1].node.status().await.voters, vec![1, 2]);
    assert_eq!(members[1].node.node_addr(3), None);
    shutdown_all(members).await;
}
