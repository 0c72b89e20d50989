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
    fn health(&self) -> Health;
}
