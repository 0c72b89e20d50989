//! [`ClusterNode`]: starts raft, the node-to-node listener and the liveness loop, and offers the
//! calls the control plane makes.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ClusterConfig;
use crate::error::ClusterError;
use crate::liveness::{Liveness, NoAck};
use crate::log_store::LogStore;
use crate::network::{call, NetworkFactory, Reply, Rpc};
use crate::rpc::Client;
use crate::state_machine::{SmView, StateMachine};
use crate::types::{AppMachine, Node, NodeId, Raft, Request, Response};

/// Answers the application's questions from other nodes (see [`ClusterNode::query`]).
pub trait QueryHandler: Send + Sync {
    /// The answer to `body`, or why there is none.
    fn answer(&self, body: String) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;
}

/// One node as seen in [`ClusterStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Its node-to-node address.
    pub addr: String,
    /// Whether it votes.
    pub voter: bool,
    /// Milliseconds since the leader last heard from it (`None` when no leader answered).
    pub last_seen_ms: Option<u64>,
    /// Seen within the claim timeout.
    pub healthy: bool,
}

/// A snapshot of the cluster as this node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    pub leader: Option<NodeId>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub last_applied: u64,
    pub last_log: u64,
    pub lease_valid: bool,
    pub nodes: BTreeMap<NodeId, NodeStatus>,
}

struct Inner {
    id: NodeId,
    cfg: ClusterConfig,
    addr: String,
    raft: Raft,
    client: Arc<Client>,
    view: SmView,
    applied: watch::Receiver<u64>,
    liveness: Liveness,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Election gate (see [`ClusterNode::gate_elections`]).
    gate: Mutex<Gate>,
    /// The application's answers to other nodes' queries.
    queries: OnceLock<Arc<dyn QueryHandler>>,
}

/// Whether this node may start elections, and since when it reaches a quorum again.
#[derive(Debug, Default)]
struct Gate {
    /// Elections are off because no quorum of voters was reachable.
    closed: bool,
    /// While closed: since when a quorum is reachable again.
    reachable_since: Option<Instant>,
}

/// A running cluster node; cheap to clone.
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

impl ClusterNode {
    /// Bind the listener and start raft on `db` (trees `raft_*`). With no `peers` and no `join`
    /// the node initializes a group of one (once; a restart finds it initialized); with `join` it
    /// asks that address to add it, unless it is a member already.
    pub async fn start(
        cfg: ClusterConfig,
        db: sled::Db,
        app: Arc<dyn AppMachine>,
    ) -> Result<ClusterNode, ClusterError> {
        let cfg = cfg.validate()?;
        let listener = TcpListener::bind(&cfg.listen).await?;
        let addr = match &cfg.advertise {
            Some(a) => a.clone(),
            None => listener.local_addr()?.to_string(),
        };
        let (applied_tx, applied) = watch::channel(0);
        let log_store = LogStore::open(&db)?;
        let sm = StateMachine::open(&db, app, applied_tx)?;
        let view = sm.view();
        // Outbound node-to-node connections come from the listen IP (when it is a specific one).
        let source = listener.local_addr()?.ip();
        let client = Arc::new(Client::new(cfg.secret.as_bytes(), Some(source)));
        let network = NetworkFactory {
            client: client.clone(),
        };
        let raft = Raft::new(
            cfg.node_id,
            Arc::new(cfg.raft_config()?),
            network,
            log_store,
            sm,
        )
        .await?;
        let node = ClusterNode {
            inner: Arc::new(Inner {
                id: cfg.node_id,
                cfg,
                addr,
                raft,
                client,
                view,
                applied,
                liveness: Liveness::default(),
                tasks: Mutex::new(Vec::new()),
                gate: Mutex::new(Gate::default()),
                queries: OnceLock::new(),
            }),
        };
        let serve = tokio::spawn(crate::server::serve(node.clone(), listener));
        let beat = tokio::spawn(heartbeat_loop(node.clone()));
        let gate = tokio::spawn(gate_loop(node.clone()));
        node.lock_tasks().extend([serve, beat, gate]);
        node.bootstrap().await?;
        Ok(node)
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn bootstrap(&self) -> Result<(), ClusterError> {
        let i = &self.inner;
        if i.raft.is_initialized().await? {
            return Ok(());
        }
        if let Some(join) = i.cfg.join.clone() {
            let rpc = Rpc::AddNode {
                id: i.id,
                addr: i.addr.clone(),
                voter: i.cfg.join_as_voter,
            };
            self.leader_call(&rpc, Some(join)).await?;
            return Ok(());
        }
        let mut members: BTreeMap<NodeId, Node> = i
            .cfg
            .peers
            .iter()
            .map(|(id, addr)| (*id, Node { addr: addr.clone() }))
            .collect();
        members.insert(
            i.id,
            Node {
                addr: i.addr.clone(),
            },
        );
        if members.keys().next() == Some(&i.id) {
            i.raft.initialize(members).await?;
        }
        Ok(())
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The address other nodes reach this one at.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// The members (voters and learners) and their node-to-node addresses.
    pub fn members(&self) -> BTreeMap<NodeId, String> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect()
    }

    /// The shared cluster secret.
    pub fn secret(&self) -> &[u8] {
        self.inner.cfg.secret.as_bytes()
    }

    /// The raft handle (metrics, `wait()`), for tests and diagnostics.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Replicate `req` through the leader (forwarded if this node is a follower) and return its
    /// applied response. Retries across leader changes for `write_timeout_ms`; every request
    /// kind is safe to repeat (applications must make `App` commands idempotent as commands).
    pub async fn write(&self, req: Request) -> Result<Response, ClusterError> {
        self.write_indexed(req).await.map(|(_, r)| r)
    }

    /// [`ClusterNode::write`], also returning the entry's log index: once [`ClusterNode::subscribe`]
    /// reaches it, this node's local state includes the write.
    pub async fn write_indexed(&self, req: Request) -> Result<(u64, Response), ClusterError> {
        match self.leader_call(&Rpc::Write(req), None).await? {
            Reply::Written { index, response } => Ok((index, response)),
            other => Err(unexpected(other)),
        }
    }

    /// Replicate an application command; the inner result is the application's answer.
    pub async fn write_app(&self, cmd: Vec<u8>) -> Result<Result<Vec<u8>, String>, ClusterError> {
        match self.write(Request::App(cmd)).await? {
            Response::App(r) => Ok(r),
            other => Err(ClusterError::Remote(format!(
                "unexpected response {other:?}"
            ))),
        }
    }

    /// Claim `key` for this node; returns the owner (this node, or whoever already holds it).
    pub async fn claim(&self, key: &str) -> Result<NodeId, ClusterError> {
        let req = Request::Claim {
            key: key.to_string(),
            node: self.inner.id,
        };
        match self.write(req).await? {
            Response::Owner(n) => Ok(n),
            other => Err(ClusterError::Remote(format!(
                "unexpected response {other:?}"
            ))),
        }
    }

    /// Release `key` if this node owns it.
    pub async fn release(&self, key: &str) -> Result<(), ClusterError> {
        let req = Request::Release {
            key: key.to_string(),
            node: self.inner.id,
        };
        self.write(req).await.map(|_| ())
    }

    /// Graceful leave: hand back every pool claim this node holds, in one `ReleaseNode` entry,
    /// so that other nodes can claim them at once instead of waiting for the leader to notice
    /// this node's silence (`claim_timeout_ms`). Returns how many claims were released (0
    /// without writing anything when this node's applied state shows none of its own), once
    /// this node has applied the release.
    pub async fn release_own_claims(&self) -> Result<usize, ClusterError> {
        let id = self.inner.id;
        if !self.claims().values().any(|n| *n == id) {
            return Ok(0);
        }
        let (index, response) = self
            .write_indexed(Request::ReleaseNode { node: id })
            .await?;
        let Response::Released(n) = response else {
            return Err(ClusterError::Remote(format!(
                "unexpected response {response:?}"
            )));
        };
        // Applied here too before returning, so that this node's store does not name it as an
        // owner when it starts again.
        let mut applied = self.subscribe();
        applied
            .wait_for(|i| *i >= index)
            .await
            .map_err(|_| ClusterError::Shutdown)?;
        Ok(n)
    }

    /// The owner of `key` in this node's applied state.
    pub fn owner(&self, key: &str) -> Option<NodeId> {
        self.inner.view.owner(key)
    }

    /// Every claim in this node's applied state.
    pub fn claims(&self) -> BTreeMap<String, NodeId> {
        self.inner.view.claims()
    }

    /// The log index this node has applied up to (every entry kind).
    pub fn applied_index(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    /// The applied log index, updated after every apply (and snapshot install).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.applied.clone()
    }

    /// Whether this node may keep serving the pools it owns (see [`crate::liveness`]).
    pub fn lease_valid(&self) -> bool {
        self.lease_valid_at(*self.inner.applied.borrow())
    }

    /// [`ClusterNode::lease_valid`] for a node whose pools see the claims as of log index
    /// `applied` (e.g. what it last published to its data plane): acknowledgements from a leader
    /// that had applied more count only from there on.
    pub fn lease_valid_at(&self, applied: u64) -> bool {
        self.inner.liveness.lease_valid(
            Duration::from_millis(self.inner.cfg.claim_timeout_ms),
            applied,
        )
    }

    /// Sets what answers other nodes' [`ClusterNode::query`] calls (once).
    pub fn set_query_handler(&self, handler: Arc<dyn QueryHandler>) {
        let _ = self.inner.queries.set(handler);
    }

    /// Asks member `id` an application question (authenticated like every node-to-node
    /// message) and returns its answer, within `timeout`. Member `id` may be this node.
    pub async fn query(
        &self,
        id: NodeId,
        body: String,
        timeout: Duration,
    ) -> Result<String, ClusterError> {
        if id == self.inner.id {
            return tokio::time::timeout(timeout, self.answer_query(body))
                .await
                .map_err(|_| ClusterError::Timeout)?
                .map_err(ClusterError::Remote);
        }
        let addr = self
            .node_addr(id)
            .ok_or_else(|| ClusterError::Remote(format!("node {id} is not a member")))?;
        match call(&self.inner.client, &addr, &Rpc::Query(body), timeout).await? {
            Reply::Query(answer) => Ok(answer),
            Reply::Error(e) => Err(ClusterError::Remote(e)),
            other => Err(unexpected(other)),
        }
    }

    /// This node's answer to a [`ClusterNode::query`].
    pub(crate) async fn answer_query(&self, body: String) -> Result<String, String> {
        match self.inner.queries.get() {
            Some(h) => h.clone().answer(body).await,
            None => Err("this node answers no queries".into()),
        }
    }

    /// The node-to-node address of member `id`.
    pub fn node_addr(&self, id: NodeId) -> Option<String> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// Add `id` as a learner (through the leader); it catches up before this returns.
    pub async fn add_learner(&self, id: NodeId, addr: &str) -> Result<(), ClusterError> {
        let rpc = Rpc::AddNode {
            id,
            addr: addr.to_string(),
            voter: false,
        };
        self.leader_call(&rpc, None).await.map(|_| ())
    }

    /// Add `id` as a learner, then promote it to voter.
    pub async fn add_voter(&self, id: NodeId, addr: &str) -> Result<(), ClusterError> {
        let rpc = Rpc::AddNode {
            id,
            addr: addr.to_string(),
            voter: true,
        };
        self.leader_call(&rpc, None).await.map(|_| ())
    }

    /// Release every claim of `id` and remove it from the membership.
    pub async fn leave(&self, id: NodeId) -> Result<(), ClusterError> {
        self.leader_call(&Rpc::Leave { id }, None).await.map(|_| ())
    }

    /// Membership, progress and (from the leader) liveness of every node.
    pub async fn status(&self) -> ClusterStatus {
        let i = &self.inner;
        let m = i.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        // Bounded by a heartbeat: a node cut off from the leader still answers at once.
        let patience = Duration::from_millis(i.cfg.heartbeat_ms.max(100));
        let seen: BTreeMap<NodeId, u64> =
            match tokio::time::timeout(patience, self.leader_call_once(&Rpc::LastSeen)).await {
                Ok(Ok(Reply::LastSeen(s))) => s,
                _ => BTreeMap::new(),
            };
        let nodes = membership
            .nodes()
            .map(|(id, n)| {
                let last = seen.get(id).copied();
                let status = NodeStatus {
                    addr: n.addr.clone(),
                    voter: voters.contains(id),
                    last_seen_ms: last,
                    healthy: last.is_some_and(|ms| ms < i.cfg.claim_timeout_ms),
                };
                (*id, status)
            })
            .collect();
        ClusterStatus {
            node_id: i.id,
            leader: m.current_leader,
            learners: membership.learner_ids().collect(),
            voters: voters.into_iter().collect(),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log: m.last_log_index.unwrap_or(0),
            lease_valid: self.lease_valid(),
            nodes,
        }
    }

    /// Stop raft, the listener, open peer connections and the liveness loop.
    pub async fn shutdown(&self) {
        let tasks: Vec<_> = self.lock_tasks().drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    fn leader_hint(&self) -> Option<(NodeId, String)> {
        let m = self.inner.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&leader)?
            .addr
            .clone();
        Some((leader, addr))
    }

    /// One attempt at a leader-only call: locally if leading, else at the known leader.
    async fn leader_call_once(&self, rpc: &Rpc) -> Result<Reply, ClusterError> {
        match self.leader_hint() {
            Some((id, _)) if id == self.inner.id => Ok(self.handle_leader(rpc).await),
            Some((_, addr)) => call(&self.inner.client, &addr, rpc, self.rpc_timeout()).await,
            None => Err(ClusterError::NoLeader),
        }
    }

    fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.cfg.write_timeout_ms.clamp(200, 2000))
    }

    /// A leader-only call, retried across leader changes until `write_timeout_ms`.
    async fn leader_call(
        &self,
        rpc: &Rpc,
        mut target: Option<String>,
    ) -> Result<Reply, ClusterError> {
        let i = &self.inner;
        let deadline = Instant::now() + Duration::from_millis(i.cfg.write_timeout_ms);
        let mut last_err = ClusterError::NoLeader;
        // A node that is joining knows no leader yet: it keeps asking the address it was given.
        let fallback = target.clone();
        loop {
            let addr = target.take().or_else(|| {
                self.leader_hint()
                    .is_none()
                    .then(|| fallback.clone())
                    .flatten()
            });
            let result = match addr {
                Some(addr) => call(&i.client, &addr, rpc, self.rpc_timeout()).await,
                None => self.leader_call_once(rpc).await,
            };
            match result {
                Ok(Reply::NotLeader(hint)) => {
                    target = hint.filter(|(id, _)| *id != i.id).map(|(_, a)| a);
                }
                Ok(Reply::Busy(e)) => last_err = ClusterError::Remote(e),
                Ok(Reply::Error(e)) => return Err(ClusterError::Remote(e)),
                Ok(r) => return Ok(r),
                Err(e) if e.is_retryable() => last_err = e,
                Err(e) => return Err(e),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(last_err);
            }
            if target.is_none() {
                // Wait for raft to report a (new) leader, or a short backoff.
                let wait = left.min(Duration::from_millis(i.cfg.raft_heartbeat_ms.max(20)));
                let _ = i
                    .raft
                    .wait(Some(wait))
                    .metrics(
                        |m| m.current_leader.is_some() && m.state != ServerState::Candidate,
                        "leader",
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(20).min(left)).await;
            }
        }
    }

    /// Serve a leader-only call on this node.
    pub(crate) async fn handle_leader(&self, rpc: &Rpc) -> Reply {
        let i = &self.inner;
        match rpc {
            Rpc::Write(req) => match i.raft.client_write(req.clone()).await {
                Ok(r) => Reply::Written {
                    index: r.log_id.index,
                    response: r.data,
                },
                Err(e) => write_error(e),
            },
            Rpc::Heartbeat { node } => match i.liveness.heard_from(*node) {
                Ok(age) => Reply::Alive {
                    quorum_age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                    applied: *i.applied.borrow(),
                },
                Err(NoAck::Releasing) => {
                    Reply::Busy(format!("the claims of node {node} are being released"))
                }
                Err(NoAck::NotLeader) => {
                    Reply::NotLeader(self.leader_hint().filter(|(id, _)| *id != i.id))
                }
            },
            Rpc::AddNode { id, addr, voter } => {
                let node = Node { addr: addr.clone() };
                if let Err(e) = i.raft.add_learner(*id, node, true).await {
                    return write_error(e);
                }
                if *voter {
                    let change = ChangeMembers::AddVoterIds(BTreeSet::from([*id]));
                    if let Err(e) = i.raft.change_membership(change, false).await {
                        return write_error(e);
                    }
                }
                Reply::Ack
            }
            Rpc::Leave { id } => {
                if let Err(e) = i
                    .raft
                    .client_write(Request::ReleaseNode { node: *id })
                    .await
                {
                    return write_error(e);
                }
                let m = i.raft.metrics().borrow().membership_config.clone();
                let ids = BTreeSet::from([*id]);
                let change = if m.membership().voter_ids().any(|v| v == *id) {
                    ChangeMembers::RemoveVoters(ids)
                } else {
                    ChangeMembers::RemoveNodes(ids)
                };
                match i.raft.change_membership(change, false).await {
                    Ok(_) => Reply::Ack,
                    Err(e) => write_error(e),
                }
            }
            Rpc::LastSeen => {
                let nodes: Vec<NodeId> = {
                    let m = i.raft.metrics().borrow().membership_config.clone();
                    m.membership().nodes().map(|(id, _)| *id).collect()
                };
                match i.liveness.since_seen(nodes) {
                    Some(seen) => Reply::LastSeen(
                        seen.into_iter()
                            .map(|(n, d)| (n, u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
                            .collect(),
                    ),
                    None => Reply::NotLeader(self.leader_hint().filter(|(id, _)| *id != i.id)),
                }
            }
            Rpc::Ping => Reply::Ack,
            Rpc::Append(_) | Rpc::Vote(_) | Rpc::Snapshot(_) | Rpc::Query(_) => {
                Reply::Error("not a leader call".into())
            }
        }
    }

    /// One heartbeat tick: confirm or report liveness, and (as leader) release silent owners.
    async fn tick(&self) {
        let i = &self.inner;
        let m = i.raft.metrics().borrow().clone();
        let leading = m.current_leader == Some(i.id) && m.state == ServerState::Leader;
        i.liveness.set_leading(leading.then_some(m.current_term));
        let sent = Instant::now();
        let timeout = Duration::from_millis(i.cfg.heartbeat_ms);
        if leading {
            // A leader cut off from its quorum cannot confirm it: bounded, so that the loop goes
            // on (and the lease lapses) instead of waiting for the partition to heal.
            if let Ok(Ok(_)) = tokio::time::timeout(timeout, i.raft.ensure_linearizable()).await {
                i.liveness.quorum_confirmed(sent);
                let _ = i.liveness.heard_from(i.id);
            }
            self.release_silent_owners();
            return;
        }
        let Some((_, addr)) = self.leader_hint() else {
            return;
        };
        match call(&i.client, &addr, &Rpc::Heartbeat { node: i.id }, timeout).await {
            Ok(Reply::Alive {
                quorum_age_ms,
                applied,
            }) => {
                i.liveness
                    .acked(sent, Duration::from_millis(quorum_age_ms), applied);
            }
            Ok(other) => tracing::debug!(reply = ?other, "heartbeat not acknowledged"),
            Err(e) => tracing::debug!(error = %e, "heartbeat to leader failed"),
        }
    }

    /// Pre-vote by hand (openraft 0.9 has none): a voter that cannot reach a quorum of voters
    /// (itself included) does not start elections. Cut off, it would otherwise raise its term
    /// with every election timeout, and on its return force the working leader to step down: a
    /// needless election during which every owner's lease can lapse. Elections come back once
    /// a quorum has been reachable for `election_timeout_max_ms`, by when the leader's
    /// heartbeats have reached this node and reset its election timer. Checked every
    /// [`gate_every`] (a quarter of the shortest election timeout), so that a cut-off node closes
    /// the gate before its election timer can fire.
    async fn gate_elections(&self) {
        let i = &self.inner;
        let (voters, total) = {
            let m = i.raft.metrics().borrow().membership_config.clone();
            let ids: BTreeSet<NodeId> = m.membership().voter_ids().collect();
            if !ids.contains(&i.id) {
                return;
            }
            let others: Vec<String> = ids
                .iter()
                .filter(|id| **id != i.id)
                .filter_map(|id| m.membership().get_node(id).map(|n| n.addr.clone()))
                .collect();
            (others, ids.len())
        };
        let timeout = gate_every(&i.cfg);
        let mut pings = tokio::task::JoinSet::new();
        for addr in voters {
            let client = i.client.clone();
            pings.spawn(async move { call(&client, &addr, &Rpc::Ping, timeout).await.is_ok() });
        }
        let mut reached = 1;
        while let Some(r) = pings.join_next().await {
            if matches!(r, Ok(true)) {
                reached += 1;
            }
        }
        let quorum = reached * 2 > total;
        let window = Duration::from_millis(i.cfg.election_timeout_max_ms);
        let change = {
            let mut g = i.gate.lock().unwrap_or_else(|p| p.into_inner());
            match (g.closed, quorum) {
                (false, true) => None,
                (false, false) => {
                    g.closed = true;
                    g.reachable_since = None;
                    Some(false)
                }
                (true, false) => {
                    g.reachable_since = None;
                    None
                }
                (true, true) => {
                    let since = *g.reachable_since.get_or_insert_with(Instant::now);
                    (since.elapsed() >= window).then(|| {
                        g.closed = false;
                        g.reachable_since = None;
                        true
                    })
                }
            }
        };
        if let Some(on) = change {
            tracing::info!(
                reached,
                voters = total,
                "{}",
                if on {
                    "a quorum of voters is reachable again: elections on"
                } else {
                    "no quorum of voters reachable: elections off"
                }
            );
            i.raft.runtime_config().elect(on);
        }
    }

    /// Leader: releases the claims of every owner silent for `claim_timeout_ms`, each in a task
    /// of its own (a leader that lost its quorum cannot commit, and its loop must go on).
    fn release_silent_owners(&self) {
        let i = &self.inner;
        let owners: BTreeSet<NodeId> = i
            .view
            .claims()
            .into_values()
            .filter(|n| *n != i.id)
            .collect();
        let timeout = Duration::from_millis(i.cfg.claim_timeout_ms);
        for (node, silent) in i.liveness.take_silent(owners, timeout) {
            tracing::info!(
                node,
                silent_ms = silent.as_millis() as u64,
                "releasing claims of silent node"
            );
            let this = self.clone();
            tokio::spawn(async move {
                let i = &this.inner;
                let limit = Duration::from_millis(i.cfg.write_timeout_ms);
                let write = i.raft.client_write(Request::ReleaseNode { node });
                match tokio::time::timeout(limit, write).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(node, error = %e, "release of silent node failed"),
                    Err(_) => tracing::warn!(node, "release of silent node timed out"),
                }
                i.liveness.released(node);
            });
        }
    }
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> Reply {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            Reply::NotLeader(f.leader_id.zip(f.leader_node.map(|n| n.addr)))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            e @ ChangeMembershipError::InProgress(_),
        )) => Reply::Busy(e.to_string()),
        e => Reply::Error(e.to_string()),
    }
}

fn unexpected(reply: Reply) -> ClusterError {
    ClusterError::Remote(format!("unexpected reply {reply:?}"))
}

/// How often (and how patiently) [`ClusterNode::gate_elections`] pings the voters.
fn gate_every(cfg: &ClusterConfig) -> Duration {
    Duration::from_millis((cfg.election_timeout_min_ms / 4).max(10))
}

async fn gate_loop(node: ClusterNode) {
    let mut every = tokio::time::interval(gate_every(&node.inner.cfg));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        node.gate_elections().await;
    }
}

async fn heartbeat_loop(node: ClusterNode) {
    let mut every = tokio::time::interval(Duration::from_millis(node.inner.cfg.heartbeat_ms));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        node.tick().await;
    }
}
