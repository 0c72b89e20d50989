//! A node's control plane: the tenant store, the configuration snapshots it
//! publishes to the shards, and the answers the HTTP API gives.
//!
//! Every write goes through the cluster's raft log (`ClusterNode::write_app`,
//! forwarded to the leader by the cluster crate), sealed so that passwords
//! are ciphertext in the log. The call waits until this node has applied
//! the entry (read-your-writes) and has published the new engine
//! configuration to its shards. Entries applied for other nodes' writes are
//! published by a watcher of the applied index ([`Node::start_watcher`]).
//! Reads are local.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use cluster::{ClusterError, ClusterNode, Request, Response};
use tokio::runtime::Handle;

use engine::config::{ClusterHooks, ProxyConfig};
use engine::metrics::ShardSnapshot;
use engine::shard::{ShardHandle, ShardMsg};
use tracing::warn;

use crate::config::{build_tenant, SecretCache};
use crate::model::{Command, TenantSpec, TenantView, UserSpec};
use crate::plane::{
    ClusterNodeView, ClusterPools, ClusterView, ControlPlane, Health, PlaneError, PoolView,
};
use crate::store::Store;

/// How long a scrape waits for the shards.
const GATHER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a write waits for this node to apply an entry the leader committed.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Node {
    pub(crate) store: Arc<Store>,
    pub(crate) cluster: ClusterNode,
    pub(crate) rt: Handle,
    /// Live settings change on reload (SIGHUP); listener settings stay.
    proxy: Mutex<ProxyConfig>,
    secrets: SecretCache,
    pub(crate) shards: Arc<Vec<ShardHandle>>,
    /// Snapshots are built and published one at a time, so shards see
    /// them in the store's order.
    writes: Mutex<()>,
    /// What the shards last got: the cluster's applied log index (tenant
    /// writes and pool claims alike), the store's applied index, and how many
    /// claims this process confirmed (`None`: nothing yet).
    published: Mutex<Option<(u64, u64, usize)>>,
    /// The cluster's applied log index the shards last got (`u64::MAX`:
    /// none yet): their claims and tenants are at least that recent.
    published_index: AtomicU64,
    started: Instant,
    /// What the shards call for pool ownership (set by `start_watcher`).
    hooks: OnceLock<Arc<dyn ClusterHooks>>,
    /// Pools this process has claimed (or found claimed by this node) through
    /// the log. A claim of this node's that it has not confirmed since it
    /// started is left out of the shards' view, so the first client of such a
    /// pool claims it again: after a restart the applied state can still name
    /// this node as an owner whose claim has since been released and taken by
    /// another node (a crash, or an exit before the release was applied here).
    confirmed: Mutex<std::collections::HashSet<String>>,
    /// The admin console's hooks, in every snapshot.
    console: OnceLock<Arc<dyn engine::config::ConsoleHooks>>,
    /// Re-reads the config file (SIGHUP, console RELOAD).
    reloader: OnceLock<Reloader>,
}

/// Re-reads the config file into a node; the error says why nothing changed.
pub type Reloader = Box<dyn Fn(&Node) -> Result<(), String> + Send + Sync>;

/// A node's proxy (node-to-node data plane) address: its raft address with
/// the port plus one.
pub fn proxy_addr_of(raft: &str) -> Option<SocketAddr> {
    let a = raft.to_socket_addrs().ok()?.next()?;
    Some(SocketAddr::new(a.ip(), a.port().checked_add(1)?))
}

/// Pool claims for the shards: through the log, answered once this node
/// applied and published the claim.
struct Hooks {
    node: Weak<Node>,
    cluster: ClusterNode,
    rt: Handle,
}

impl ClusterHooks for Hooks {
    fn claim(&self, key: String, shard: usize, token: u64) {
        let (node, cluster) = (self.node.clone(), self.cluster.clone());
        self.rt.spawn(async move {
            let owner = claim_published(&node, &cluster, key).await;
            if let Some(n) = node.upgrade() {
                if let Some(h) = n.shards.get(shard) {
                    let _ = h.send(ShardMsg::Claimed { token, owner });
                }
            }
        });
    }

    fn lease_valid(&self) -> bool {
        match self.node.upgrade() {
            Some(n) => n.lease_valid(),
            None => false,
        }
    }
}

async fn claim_published(node: &Weak<Node>, cluster: &ClusterNode, key: String) -> Option<u64> {
    let req = Request::Claim {
        key: key.clone(),
        node: cluster.id(),
    };
    let (index, owner) = match cluster.write_indexed(req).await {
        Ok((index, Response::Owner(owner))) => (index, owner),
        Ok((_, other)) => {
            warn!(%key, ?other, "unexpected claim response");
            return None;
        }
        Err(e) => {
            warn!(%key, error = %e, "pool claim failed");
            return None;
        }
    };
    let mut applied = cluster.subscribe();
    tokio::time::timeout(APPLY_TIMEOUT, applied.wait_for(|i| *i >= index))
        .await
        .ok()?
        .ok()?;
    let node = node.upgrade()?;
    if owner == cluster.id() {
        node.confirmed().insert(key);
    }
    // The shards must have the claim before a pool starts on it (they drop
    // pools their claims do not name): a claim not published fails.
    match tokio::task::spawn_blocking(move || node.publish_current()).await {
        Ok(Err(e)) => {
            warn!(error = %e, "publishing a claim");
            None
        }
        Err(e) => {
            warn!(error = %e, "publishing task failed");
            None
        }
        Ok(Ok(())) => Some(owner),
    }
}

fn view(id: &str, spec: TenantSpec) -> TenantView {
    TenantView {
        external_id: id.to_string(),
        spec,
    }
}

impl Node {
    /// `rt`: the control runtime the cluster runs on. The [`ControlPlane`]
    /// calls block on it, so they must run off its worker threads (the API
    /// calls them through `spawn_blocking`).
    pub fn new(
        store: Arc<Store>,
        cluster: ClusterNode,
        rt: Handle,
        proxy: ProxyConfig,
        secrets: SecretCache,
        shards: Arc<Vec<ShardHandle>>,
    ) -> Node {
        Node {
            store,
            cluster,
            rt,
            proxy: Mutex::new(proxy),
            secrets,
            shards,
            writes: Mutex::new(()),
            published: Mutex::new(None),
            published_index: AtomicU64::new(u64::MAX),
            started: Instant::now(),
            hooks: OnceLock::new(),
            confirmed: Mutex::new(std::collections::HashSet::new()),
            console: OnceLock::new(),
            reloader: OnceLock::new(),
        }
    }

    /// The admin console's hooks, published to the shards with every snapshot.
    pub fn set_console(&self, hooks: Arc<dyn engine::config::ConsoleHooks>) {
        let _ = self.console.set(hooks);
    }

    /// What re-reads the config file (SIGHUP, the console's RELOAD).
    pub fn set_reloader(&self, reloader: Reloader) {
        let _ = self.reloader.set(reloader);
    }

    /// Re-reads the config file; `Err` when it was not (no file, invalid).
    pub fn reload_file(&self) -> Result<(), String> {
        match self.reloader.get() {
            Some(r) => r(self),
            None => Err("this node cannot reload (no config file)".into()),
        }
    }

    /// The engine's snapshot of everything in the store. A tenant that cannot
    /// be built (it should not happen: the store validates) is left out, loudly.
    pub fn engine_config(
        proxy: &ProxyConfig,
        store: &Store,
        secrets: &SecretCache,
    ) -> Result<engine::Config, PlaneError> {
        let mut tenants = std::collections::HashMap::new();
        for (id, spec) in store.tenants()? {
            match build_tenant(&id, &spec, secrets) {
                Ok(t) => {
                    tenants.insert(id, Arc::new(t));
                }
                Err(e) => warn!(tenant = %id, error = %e, "tenant left out of the configuration"),
            }
        }
        Ok(engine::Config::new(proxy.clone(), tenants))
    }

    pub(crate) fn broadcast(&self, make: impl Fn() -> ShardMsg) -> Result<(), PlaneError> {
        for (i, h) in self.shards.iter().enumerate() {
            if h.send(make()).is_err() {
                return Err(PlaneError::Unavailable(format!(
                    "shard {i} is not taking messages"
                )));
            }
        }
        Ok(())
    }

    /// Sends the store's state to every shard and waits until each has it,
    /// so that an API answer means the change is live.
    fn publish(&self) -> Result<(), PlaneError> {
        let proxy = self.proxy().clone();
        let config = Self::engine_config(&proxy, &self.store, &self.secrets)?;
        let config = config
            .with_cluster(self.cluster_view())
            .with_console(self.console.get().cloned());
        let config = Arc::new(config);
        self.broadcast(|| ShardMsg::Config(config.clone()))?;
        self.barrier()
    }

    /// Pool owners and proxy addresses, when this node has a proxy listener
    /// and the cluster more than one member.
    fn cluster_view(&self) -> Option<Arc<engine::config::ClusterView>> {
        self.proxy().proxy_addr?;
        let hooks = self.hooks.get()?.clone();
        let members = self.cluster.members();
        if members.len() < 2 {
            return None;
        }
        let proxies = members
            .iter()
            .filter_map(|(id, addr)| Some((*id, proxy_addr_of(addr)?)))
            .collect();
        let me = self.cluster.id();
        let confirmed = self.confirmed();
        let owners = self
            .cluster
            .claims()
            .into_iter()
            .filter(|(key, node)| *node != me || confirmed.contains(key))
            .collect();
        drop(confirmed);
        Some(Arc::new(engine::config::ClusterView {
            self_node: me,
            owners,
            proxies,
            secret: Arc::from(self.cluster.secret()),
            hooks,
        }))
    }

    /// Waits until every shard has applied the messages sent before.
    fn barrier(&self) -> Result<(), PlaneError> {
        let (tx, rx) = crossbeam_channel::bounded(self.shards.len());
        self.broadcast(|| ShardMsg::Barrier(tx.clone()))?;
        drop(tx);
        let deadline = Instant::now() + GATHER_TIMEOUT;
        for answered in 0..self.shards.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if rx.recv_timeout(left).is_err() {
                return Err(PlaneError::Unavailable(format!(
                    "{answered} of {} shards confirmed the change",
                    self.shards.len()
                )));
            }
        }
        Ok(())
    }

    /// Publishes the store's current state and the claims (under the write
    /// lock, so that shards see snapshots in the log's order), unless the
    /// shards have the cluster's applied log index already (the writer and
    /// the watcher both ask for each write). Keyed on the raft index, not
    /// the store's: claims, releases and membership changes are log entries
    /// that do not touch the store and must reach the shards too.
    fn publish_current(&self) -> Result<(), PlaneError> {
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        // Keyed on the cluster's applied index too: a claim or a release
        // changes no tenant (the store's index stays) but must reach the
        // shards, or they route clients to an owner that left.
        let index = (
            self.cluster.applied_index(),
            self.store.applied_index(),
            self.confirmed().len(),
        );
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if *published == Some(index) {
            return Ok(());
        }
        self.publish()?;
        *published = Some(index);
        self.published_index.store(index.0, Ordering::Release);
        Ok(())
    }

    /// Whether this node's shards may serve the pools they own: the cluster
    /// lease, counting only acknowledgements whose log index the shards
    /// already have (see `cluster::liveness`, "Healing").
    pub fn lease_valid(&self) -> bool {
        let published = self.published_index.load(Ordering::Acquire);
        published != u64::MAX && self.cluster.lease_valid_at(published)
    }

    /// Replicates `cmd`, waits until this node applied it and published it.
    fn apply(&self, cmd: &Command) -> Result<Option<TenantSpec>, PlaneError> {
        let tenant = self
            .rt
            .block_on(write_command(&self.store, &self.cluster, cmd))?;
        self.publish_current()?;
        Ok(tenant)
    }

    fn confirmed(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.confirmed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The proxy settings in force.
    pub fn proxy(&self) -> std::sync::MutexGuard<'_, ProxyConfig> {
        self.proxy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a reloaded config file: its tenants are upserted into the
    /// store (seeds, as at start) and `proxy` replaces the live settings, then
    /// one snapshot goes to the shards. Everything is validated first: an
    /// invalid file changes nothing.
    pub fn reload(&self, proxy: ProxyConfig, seeds: &[(String, TenantSpec)]) -> Result<(), String> {
        crate::config::build_config(&proxy, seeds, &self.secrets).map_err(|e| e.to_string())?;
        // Through the log, as at start: every node gets the tenants.
        for (id, spec) in seeds {
            let cmd = Command::PutTenant {
                id: id.clone(),
                spec: spec.clone(),
            };
            self.rt
                .block_on(write_command(&self.store, &self.cluster, &cmd))
                .map_err(|e| format!("tenant {id:?}: {e}"))?;
        }
        *self.proxy() = proxy;
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        self.publish().map_err(|e| e.to_string())
    }

    /// Graceful restart: every shard closes its listeners and keeps serving
    /// the clients it has.
    pub fn handover(&self) -> Result<(), PlaneError> {
        self.broadcast(|| ShardMsg::Handover)?;
        self.barrier()
    }

    /// Connections the shards still serve (logged in or still in startup).
    pub fn connections(&self) -> Result<usize, PlaneError> {
        let (tx, rx) = crossbeam_channel::bounded(self.shards.len());
        self.broadcast(|| ShardMsg::Connections(tx.clone()))?;
        drop(tx);
        let deadline = Instant::now() + GATHER_TIMEOUT;
        let mut total = 0;
        for answered in 0..self.shards.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(n) => total += n,
                Err(_) => {
                    return Err(PlaneError::Unavailable(format!(
                        "{answered} of {} shards answered",
                        self.shards.len()
                    )))
                }
            }
        }
        Ok(total)
    }

    /// Asks every shard to stop (drain and exit).
    pub fn shutdown(&self) {
        let _ = self.broadcast(|| ShardMsg::Shutdown);
    }

    /// Publishes the store to the shards whenever this node applies log
    /// entries (other nodes' writes, catching up after a restart), and once
    /// at start. Stops when the node is dropped.
    pub fn start_watcher(self: &Arc<Self>) {
        let weak: Weak<Node> = Arc::downgrade(self);
        let _ = self.hooks.set(Arc::new(Hooks {
            node: weak.clone(),
            cluster: self.cluster.clone(),
            rt: self.rt.clone(),
        }));
        let mut applied = self.cluster.subscribe();
        self.rt.spawn(async move {
            let mut published = None;
            loop {
                let index = *applied.borrow_and_update();
                if published != Some(index) {
                    let Some(node) = weak.upgrade() else { return };
                    let done = tokio::task::spawn_blocking(move || node.publish_current()).await;
                    match done {
                        Ok(Ok(())) => published = Some(index),
                        Ok(Err(e)) => {
                            warn!(index, error = %e, "publishing applied changes to the shards");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                        Err(e) => warn!(error = %e, "publishing task failed"),
                    }
                }
                if applied.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// The cluster handle.
    pub fn cluster(&self) -> &ClusterNode {
        &self.cluster
    }

    /// Every shard's counters and pools.
    pub fn gather(&self) -> Result<Vec<ShardSnapshot>, PlaneError> {
        let (tx, rx) = crossbeam_channel::bounded(self.shards.len());
        self.broadcast(|| ShardMsg::Snapshot(tx.clone()))?;
        drop(tx);
        let deadline = Instant::now() + GATHER_TIMEOUT;
        let mut out = Vec::with_capacity(self.shards.len());
        while out.len() < self.shards.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(s) => out.push(s),
                Err(_) => {
                    return Err(PlaneError::Unavailable(format!(
                        "{} of {} shards answered",
                        out.len(),
                        self.shards.len()
                    )))
                }
            }
        }
        out.sort_by_key(|s| s.shard);
        Ok(out)
    }
}

impl ControlPlane for Node {
    fn put_tenant(&self, id: &str, spec: TenantSpec) -> Result<TenantView, PlaneError> {
        if !crate::model::valid_id(id) {
            return Err(PlaneError::Invalid(vec![crate::model::FieldError {
                field: "external_id".into(),
                message: "must be 1 to 128 letters, digits, '_' or '-'".into(),
            }]));
        }
        let stored = self.apply(&Command::PutTenant {
            id: id.to_string(),
            spec,
        })?;
        stored
            .map(|s| view(id, s))
            .ok_or_else(|| PlaneError::Internal("tenant missing after put".into()))
    }

    fn get_tenant(&self, id: &str) -> Result<TenantView, PlaneError> {
        match self.store.tenant(id)? {
            Some(spec) => Ok(view(id, spec)),
            None => Err(PlaneError::NotFound(format!("tenant {id:?}"))),
        }
    }

    fn list_tenants(&self) -> Result<Vec<TenantView>, PlaneError> {
        Ok(self
            .store
            .tenants()?
            .into_iter()
            .map(|(id, spec)| view(&id, spec))
            .collect())
    }

    fn delete_tenant(&self, id: &str) -> Result<(), PlaneError> {
        self.apply(&Command::DeleteTenant { id: id.to_string() })?;
        Ok(())
    }

    fn terminate_tenant(&self, id: &str) -> Result<(), PlaneError> {
        if self.store.tenant(id)?.is_none() {
            return Err(PlaneError::NotFound(format!("tenant {id:?}")));
        }
        self.broadcast(|| ShardMsg::Terminate {
            tenant: id.to_string(),
        })?;
        self.barrier()
    }

    fn put_user(&self, tenant: &str, user: UserSpec) -> Result<TenantView, PlaneError> {
        let stored = self.apply(&Command::PutUser {
            tenant: tenant.to_string(),
            user,
        })?;
        stored
            .map(|s| view(tenant, s))
            .ok_or_else(|| PlaneError::NotFound(format!("tenant {tenant:?}")))
    }

    fn delete_user(&self, tenant: &str, db_user: &str) -> Result<TenantView, PlaneError> {
        let stored = self.apply(&Command::DeleteUser {
            tenant: tenant.to_string(),
            db_user: db_user.to_string(),
        })?;
        stored
            .map(|s| view(tenant, s))
            .ok_or_else(|| PlaneError::NotFound(format!("tenant {tenant:?}")))
    }

    fn pools(&self) -> Result<Vec<PoolView>, PlaneError> {
        let mut pools = Vec::new();
        for shard in self.gather()? {
            for p in shard.pools {
                if p.pool_size == 0 {
                    continue; // only failed logins recorded, no pool
                }
                pools.push(PoolView {
                    node: self.cluster.id(),
                    replica: p.replica,
                    tenant: p.tenant,
                    db_user: p.user,
                    mode: p.mode.to_string(),
                    shard: shard.shard,
                    pool_size: p.pool_size,
                    server_connections: p.server_connections,
                    idle: p.idle,
                    checked_out: p.checked_out,
                    clients: p.clients,
                    waiting: p.waiting,
                });
            }
        }
        pools.sort_by(|a, b| {
            (&a.tenant, &a.db_user, &a.mode, &a.replica)
                .cmp(&(&b.tenant, &b.db_user, &b.mode, &b.replica))
        });
        Ok(pools)
    }

    fn cluster_pools(&self) -> Result<ClusterPools, PlaneError> {
        Ok(crate::report::cluster_pools(&self.cluster_reports(false)))
    }

    fn cluster_metrics(&self, tenant: Option<&str>) -> Result<String, PlaneError> {
        if let Some(id) = tenant {
            if self.store.tenant(id)?.is_none() {
                return Err(PlaneError::NotFound(format!("tenant {id:?}")));
            }
        }
        let reports = self.cluster_reports(false);
        Ok(crate::report::cluster_metrics(&reports, tenant))
    }

    fn metrics(&self, tenant: Option<&str>) -> Result<String, PlaneError> {
        if let Some(id) = tenant {
            if self.store.tenant(id)?.is_none() {
                return Err(PlaneError::NotFound(format!("tenant {id:?}")));
            }
        }
        let shards = self.gather()?;
        Ok(crate::metrics::encode(&shards, tenant))
    }

    fn cluster_status(&self) -> Result<ClusterView, PlaneError> {
        let st = self.rt.block_on(self.cluster.status());
        Ok(ClusterView {
            node_id: st.node_id,
            leader: st.leader,
            voters: st.voters,
            learners: st.learners,
            last_applied: st.last_applied,
            last_log: st.last_log,
            lease_valid: st.lease_valid && self.lease_valid(),
            claims: self.cluster.claims(),
            nodes: st
                .nodes
                .into_iter()
                .map(|(id, n)| ClusterNodeView {
                    node_id: id,
                    addr: n.addr,
                    voter: n.voter,
                    last_seen_ms: n.last_seen_ms,
                    healthy: n.healthy,
                })
                .collect(),
        })
    }

    fn cluster_join(&self, node_id: u64, addr: &str, voter: bool) -> Result<(), PlaneError> {
        let r = if voter {
            self.rt.block_on(self.cluster.add_voter(node_id, addr))
        } else {
            self.rt.block_on(self.cluster.add_learner(node_id, addr))
        };
        r.map_err(cluster_error)
    }

    fn cluster_leave(&self, node_id: u64) -> Result<(), PlaneError> {
        let known = self.cluster.node_addr(node_id).is_some();
        if !known {
            return Err(PlaneError::NotFound(format!("cluster node {node_id}")));
        }
        self.rt
            .block_on(self.cluster.leave(node_id))
            .map_err(cluster_error)
    }

    fn health(&self) -> Health {
        let answered = self.gather().map(|s| s.len()).unwrap_or(0);
        Health {
            status: if answered == self.shards.len() {
                "ok".into()
            } else {
                "degraded".into()
            },
            version: env!("CARGO_PKG_VERSION").to_string(),
            shards: self.shards.len(),
            tenants: self.store.tenants().map(|t| t.len()).unwrap_or(0),
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }
}

/// A cluster failure as the API reports it: 503 when retrying later can
/// help, 500 otherwise.
pub fn cluster_error(e: ClusterError) -> PlaneError {
    match e {
        ClusterError::NoLeader
        | ClusterError::Timeout
        | ClusterError::Io(_)
        | ClusterError::Remote(_)
        | ClusterError::Shutdown => PlaneError::Unavailable(format!("cluster: {e}")),
        other => PlaneError::Internal(format!("cluster: {other}")),
    }
}

/// Replicates `cmd` through the raft log (sealed), waits until this node
/// has applied it, and returns the tenant as the leader's apply left it
/// (passwords not included) or the refusal.
pub async fn write_command(
    store: &Store,
    cluster: &ClusterNode,
    cmd: &Command,
) -> Result<Option<TenantSpec>, PlaneError> {
    let sealed = store.seal_command(cmd)?;
    let (index, response) = cluster
        .write_indexed(Request::App(sealed))
        .await
        .map_err(cluster_error)?;
    let answer = match response {
        Response::App(a) => a,
        other => {
            return Err(PlaneError::Internal(format!(
                "unexpected cluster response {other:?}"
            )))
        }
    };
    let mut applied = cluster.subscribe();
    let reached = tokio::time::timeout(APPLY_TIMEOUT, applied.wait_for(|i| *i >= index)).await;
    match reached {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Err(PlaneError::Unavailable("cluster node stopped".into())),
        Err(_) => {
            return Err(PlaneError::Unavailable(format!(
                "log entry {index} committed but not applied on this node within {APPLY_TIMEOUT:?}"
            )))
        }
    }
    Ok(Store::decode_answer(answer)?)
}
