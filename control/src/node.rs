//! A node's control plane: the tenant store, the configuration snapshots it
//! publishes to the shards, and the answers the HTTP API gives.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::config::ProxyConfig;
use engine::metrics::ShardSnapshot;
use engine::shard::{ShardHandle, ShardMsg};
use tracing::warn;

use crate::config::{build_tenant, SecretCache};
use crate::model::{Command, TenantSpec, TenantView, UserSpec};
use crate::plane::{ControlPlane, Health, PlaneError, PoolView};
use crate::store::Store;

/// How long a scrape waits for the shards.
const GATHER_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Node {
    store: Store,
    /// Live settings change on reload (SIGHUP); listener settings stay.
    proxy: Mutex<ProxyConfig>,
    secrets: SecretCache,
    shards: Arc<Vec<ShardHandle>>,
    /// Writes are applied and published one at a time, so shards see
    /// snapshots in the store's order.
    writes: Mutex<()>,
    started: Instant,
}

fn view(id: &str, spec: TenantSpec) -> TenantView {
    TenantView {
        external_id: id.to_string(),
        spec,
    }
}

impl Node {
    pub fn new(
        store: Store,
        proxy: ProxyConfig,
        secrets: SecretCache,
        shards: Arc<Vec<ShardHandle>>,
    ) -> Node {
        Node {
            store,
            proxy: Mutex::new(proxy),
            secrets,
            shards,
            writes: Mutex::new(()),
            started: Instant::now(),
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

    fn broadcast(&self, make: impl Fn() -> ShardMsg) -> Result<(), PlaneError> {
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
        let config = Arc::new(Self::engine_config(&proxy, &self.store, &self.secrets)?);
        self.broadcast(|| ShardMsg::Config(config.clone()))?;
        self.barrier()
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

    fn apply(&self, cmd: &Command) -> Result<Option<TenantSpec>, PlaneError> {
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let (_, tenant) = self.store.apply(cmd)?;
        self.publish()?;
        Ok(tenant)
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
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        for (id, spec) in seeds {
            self.store
                .apply(&Command::PutTenant {
                    id: id.clone(),
                    spec: spec.clone(),
                })
                .map_err(|e| format!("tenant {id:?}: {e}"))?;
        }
        *self.proxy() = proxy;
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
            (&a.tenant, &a.db_user, &a.mode).cmp(&(&b.tenant, &b.db_user, &b.mode))
        });
        Ok(pools)
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
