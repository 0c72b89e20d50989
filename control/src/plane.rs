//! What the HTTP API (and through it `supavisorctl`) can ask of a node. The
//! node implements it; the API only translates HTTP to these calls.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{FieldError, TenantSpec, TenantView, UserSpec};

#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("not found: {0}")]
    NotFound(String),
    /// 422 with per-field messages.
    #[error("invalid input")]
    Invalid(Vec<FieldError>),
    /// 503: the store cannot take writes right now (e.g. no cluster leader).
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// One pool on one shard.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PoolView {
    /// The node it runs on.
    #[serde(default)]
    pub node: u64,
    /// A read replica's pool (`host:port`); null: the primary's.
    #[serde(default)]
    pub replica: Option<String>,
    pub tenant: String,
    pub db_user: String,
    /// "transaction" | "session"
    pub mode: String,
    pub shard: usize,
    pub pool_size: usize,
    /// Server connections open (idle + checked out + opening).
    pub server_connections: usize,
    pub idle: usize,
    pub checked_out: usize,
    pub clients: usize,
    /// Clients waiting for a server connection.
    pub waiting: usize,
}

/// Whether a node answered a cluster-wide view.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeAnswered {
    pub node_id: u64,
    pub ok: bool,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// Every node's pools (`/api/pools?scope=cluster`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterPools {
    pub data: Vec<PoolView>,
    /// Each member and whether it answered (its pools are missing if not).
    pub nodes: Vec<NodeAnswered>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// "ok" when every shard answers.
    pub status: String,
    pub version: String,
    pub shards: usize,
    pub tenants: usize,
    /// Seconds since the node started.
    pub uptime_secs: u64,
}

/// One member of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterNodeView {
    pub node_id: u64,
    /// Its node-to-node (raft) address.
    pub addr: String,
    pub voter: bool,
    /// Milliseconds since the leader last heard from it (null when no leader answered).
    pub last_seen_ms: Option<u64>,
    /// Heard from within the claim timeout.
    pub healthy: bool,
}

/// The cluster as the answering node sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterView {
    /// The node that answered.
    pub node_id: u64,
    pub leader: Option<u64>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Last log index applied on the answering node.
    pub last_applied: u64,
    pub last_log: u64,
    /// Whether the answering node's ownership lease is valid.
    pub lease_valid: bool,
    pub nodes: Vec<ClusterNodeView>,
    /// Pool key (`tenant/db_user/mode`) -> owning node, as applied here.
    pub claims: std::collections::BTreeMap<String, u64>,
}

pub trait ControlPlane: Send + Sync + 'static {
    /// Upsert; returns the tenant as stored (without passwords). Validation
    /// errors are `Invalid`.
    fn put_tenant(&self, id: &str, spec: TenantSpec) -> Result<TenantView, PlaneError>;
    fn get_tenant(&self, id: &str) -> Result<TenantView, PlaneError>;
    fn list_tenants(&self) -> Result<Vec<TenantView>, PlaneError>;
    fn delete_tenant(&self, id: &str) -> Result<(), PlaneError>;
    /// Drops the tenant's clients (57P01) and closes its pools; config stays.
    fn terminate_tenant(&self, id: &str) -> Result<(), PlaneError>;
    fn put_user(&self, tenant: &str, user: UserSpec) -> Result<TenantView, PlaneError>;
    fn delete_user(&self, tenant: &str, db_user: &str) -> Result<TenantView, PlaneError>;
    fn pools(&self) -> Result<Vec<PoolView>, PlaneError>;
    /// Prometheus text exposition; `tenant` restricts it to one tenant
    /// (`NotFound` when that tenant does not exist).
    fn metrics(&self, tenant: Option<&str>) -> Result<String, PlaneError>;
    /// Every node's pools, each row naming its node; nodes that did not
    /// answer are marked. A single node answers for itself.
    fn cluster_pools(&self) -> Result<ClusterPools, PlaneError> {
        let data = self.pools()?;
        Ok(ClusterPools {
            nodes: vec![NodeAnswered {
                node_id: data.first().map_or(1, |p| p.node),
                ok: true,
                error: None,
            }],
            data,
        })
    }
    /// Every node's metrics, each series naming its node
    /// (`supavisor_cluster_node_up` says which answered).
    fn cluster_metrics(&self, tenant: Option<&str>) -> Result<String, PlaneError> {
        self.metrics(tenant)
    }
    fn health(&self) -> Health;
    /// Membership and progress of the cluster.
    fn cluster_status(&self) -> Result<ClusterView, PlaneError> {
        Err(PlaneError::Unavailable("no cluster on this node".into()))
    }
    /// Add a node (started with `[cluster]` settings that do not initialize
    /// a group of its own) as a learner, or a voter.
    fn cluster_join(&self, node_id: u64, addr: &str, voter: bool) -> Result<(), PlaneError> {
        let _ = (node_id, addr, voter);
        Err(PlaneError::Unavailable("no cluster on this node".into()))
    }
    /// Remove a node from the cluster (its pool claims are released).
    fn cluster_leave(&self, node_id: u64) -> Result<(), PlaneError> {
        let _ = node_id;
        Err(PlaneError::Unavailable("no cluster on this node".into()))
    }
}
