//! Running a node: open the store, start the cluster node on it (a group of
//! one without `[cluster]`), write the config file's tenants through the
//! log, start the shards and the control runtime (HTTP API, metrics, raft),
//! drain on a signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{info, warn};

use crate::config::{ClusterFile, ConfigFile, SecretCache};
use crate::model::{Command, TenantSpec};
use crate::node::Node;
use crate::plane::PlaneError;
use crate::store::Store;

/// Where a started node listens.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub session: SocketAddr,
    pub transaction: SocketAddr,
    pub api: SocketAddr,
}

/// The vault key from `VAULT_ENC_KEY`; a fixed development key (with a
/// warning) when unset.
fn vault_key() -> String {
    match std::env::var("VAULT_ENC_KEY") {
        Ok(k) if !k.is_empty() => k,
        _ => {
            warn!("VAULT_ENC_KEY is not set: passwords in the store are encrypted with a development key");
            "supavisor-development-vault-key".to_string()
        }
    }
}

fn secret(env: &str, file: &Option<String>) -> Option<String> {
    std::env::var(env)
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| file.clone())
}

/// How long start-up waits for the config file's tenants to go through the
/// log before announcing ready without them (they are then written in the
/// background as soon as a leader exists).
const SEED_WAIT: Duration = Duration::from_secs(10);

/// Writes the config file's tenants through the log (idempotent upserts).
async fn write_seeds(
    store: &Store,
    cluster: &cluster::ClusterNode,
    seeds: &[(String, TenantSpec)],
) -> Result<(), SeedError> {
    for (id, spec) in seeds {
        let cmd = Command::PutTenant {
            id: id.clone(),
            spec: spec.clone(),
        };
        crate::node::write_command(store, cluster, &cmd)
            .await
            .map_err(|e| SeedError {
                retry: matches!(e, PlaneError::Unavailable(_)),
                text: format!("tenant {id:?} of the config file: {e}"),
            })?;
    }
    Ok(())
}

struct SeedError {
    /// No leader yet, or the write did not complete: try again later.
    retry: bool,
    text: String,
}

/// Runs the node until SIGTERM or SIGINT, then drains. `on_ready` is called
/// once every shard and the API listen.
pub fn run(file: ConfigFile, on_ready: impl FnOnce(&Ready)) -> Result<(), String> {
    let proxy = file
        .proxy
        .build(file.tls.as_ref())
        .map_err(|e| e.to_string())?;
    let cluster_cfg = match &file.cluster {
        Some(c) => c
            .build(secret("CLUSTER_SECRET", &None))
            .map_err(|e| e.to_string())?,
        None => ClusterFile::standalone(),
    };
    let store = Arc::new(Store::open(&file.store.path, &vault_key()).map_err(|e| e.to_string())?);

    // The control runtime: the raft node, the HTTP API, the config watcher.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("control")
        .enable_all()
        .build()
        .map_err(|e| format!("control runtime: {e}"))?;
    let app: Arc<dyn cluster::AppMachine> = store.clone();
    let cluster = rt
        .block_on(cluster::ClusterNode::start(cluster_cfg, store.db(), app))
        .map_err(|e| format!("cluster: {e}"))?;
    info!(node_id = cluster.id(), raft = %cluster.addr(), "cluster node started");

    // Seeds: through the log, waiting a bounded time for a leader.
    let seeds = file.seeds();
    if !seeds.is_empty() {
        let seeded = rt.block_on(async {
            tokio::time::timeout(SEED_WAIT, write_seeds(&store, &cluster, &seeds)).await
        });
        match seeded {
            Ok(Ok(())) => {}
            Ok(Err(e)) if !e.retry => return Err(e.text),
            other => {
                let why = match other {
                    Ok(Err(e)) => e.text,
                    _ => "timed out".to_string(),
                };
                warn!(error = %why, "config file tenants not written yet (no cluster leader): retrying in the background");
                let (store, cluster) = (store.clone(), cluster.clone());
                rt.spawn(async move {
                    loop {
                        match write_seeds(&store, &cluster, &seeds).await {
                            Ok(()) => {
                                info!("config file tenants written");
                                return;
                            }
                            Err(e) if e.retry => {
                                tokio::time::sleep(Duration::from_millis(500)).await
                            }
                            Err(e) => {
                                warn!(error = %e.text, "config file tenants refused");
                                return;
                            }
                        }
                    }
                });
            }
        }
    }

    let secrets = SecretCache::default();
    let config = Node::engine_config(&proxy, &store, &secrets).map_err(|e| e.to_string())?;
    let tenants = config.tenants.len();
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(|e| e.to_string())?;
    let running = engine::start(Arc::new(config)).map_err(|e| e.to_string())?;
    let node = Arc::new(Node::new(
        store,
        cluster.clone(),
        rt.handle().clone(),
        proxy.clone(),
        secrets,
        running.handles().clone(),
    ));
    node.start_watcher();

    // The HTTP API on the control runtime.
    let auth = crate::api::ApiAuth {
        jwt_secret: secret("API_JWT_SECRET", &file.api.jwt_secret),
        metrics_jwt_secret: secret("METRICS_JWT_SECRET", &file.api.metrics_jwt_secret),
    };
    if auth.jwt_secret.is_none() {
        warn!("API_JWT_SECRET is not set: the API refuses every authenticated request");
    }
    let api_addr = file.api.addr;
    let plane: Arc<dyn crate::plane::ControlPlane> = node.clone();
    let listener = match rt.block_on(tokio::net::TcpListener::bind(api_addr)) {
        Ok(l) => l,
        Err(e) => {
            running.shutdown();
            let _ = running.join();
            return Err(format!("cannot listen on {api_addr} (api): {e}"));
        }
    };
    let api = listener.local_addr().unwrap_or(api_addr);
    rt.spawn(async move {
        if let Err(e) = crate::api::serve(listener, plane, auth).await {
            warn!(error = %e, "API server stopped");
        }
    });

    let ready = Ready {
        session: proxy.session_addr,
        transaction: proxy.transaction_addr,
        api,
    };
    info!(
        shards = proxy.shards,
        session = %ready.session,
        transaction = %ready.transaction,
        api = %ready.api,
        tenants,
        "supavisor ready"
    );
    on_ready(&ready);
    let handles = running.handles().clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!(
                    signal = sig,
                    "shutting down: no new clients, draining transactions"
                );
                for h in handles.iter() {
                    let _ = h.send(engine::shard::ShardMsg::Shutdown);
                }
            }
        })
        .map_err(|e| e.to_string())?;
    let result = running.join();
    rt.block_on(cluster.shutdown());
    drop(node);
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}
