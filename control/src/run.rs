//! Running a node: open the store, seed it from the config file, start the
//! shards and the control thread (HTTP API, metrics), drain on a signal.

use std::net::SocketAddr;
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{info, warn};

use crate::config::{ConfigFile, SecretCache};
use crate::model::Command;
use crate::node::Node;
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

/// Runs the node until SIGTERM or SIGINT, then drains. `on_ready` is called
/// once every shard and the API listen.
pub fn run(file: ConfigFile, on_ready: impl FnOnce(&Ready)) -> Result<(), String> {
    let proxy = file
        .proxy
        .build(file.tls.as_ref())
        .map_err(|e| e.to_string())?;
    let store = Store::open(&file.store.path, &vault_key()).map_err(|e| e.to_string())?;
    for (id, spec) in file.seeds() {
        store
            .apply(&Command::PutTenant {
                id: id.clone(),
                spec,
            })
            .map_err(|e| format!("tenant {id:?} of the config file: {e}"))?;
    }
    let secrets = SecretCache::default();
    let config = Node::engine_config(&proxy, &store, &secrets).map_err(|e| e.to_string())?;
    let tenants = config.tenants.len();
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(|e| e.to_string())?;
    let running = engine::start(Arc::new(config)).map_err(|e| e.to_string())?;
    let node = Arc::new(Node::new(
        store,
        proxy.clone(),
        secrets,
        running.handles().clone(),
    ));

    // The control thread: a small tokio runtime for the HTTP API.
    let auth = crate::api::ApiAuth {
        jwt_secret: secret("API_JWT_SECRET", &file.api.jwt_secret),
        metrics_jwt_secret: secret("METRICS_JWT_SECRET", &file.api.metrics_jwt_secret),
    };
    if auth.jwt_secret.is_none() {
        warn!("API_JWT_SECRET is not set: the API refuses every authenticated request");
    }
    let api_addr = file.api.addr;
    let (api_tx, api_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
    let plane: Arc<dyn crate::plane::ControlPlane> = node.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = api_tx.send(Err(format!("control runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(api_addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = api_tx.send(Err(format!("cannot listen on {api_addr} (api): {e}")));
                        return;
                    }
                };
                let local = listener.local_addr().unwrap_or(api_addr);
                let _ = api_tx.send(Ok(local));
                if let Err(e) = crate::api::serve(listener, plane, auth).await {
                    warn!(error = %e, "API server stopped");
                }
            });
        })
        .map_err(|e| e.to_string())?;
    let api = match api_rx.recv() {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            running.shutdown();
            let _ = running.join();
            return Err(e);
        }
        Err(_) => return Err("the control thread died".into()),
    };

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
    drop(node);
    result
}
