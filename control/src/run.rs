//! Running a node: start the shards, announce readiness, drain on a signal.

use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::info;

use engine::Config;

/// Runs the pooler until SIGTERM or SIGINT, then drains. `on_ready` is
/// called once every shard listens.
pub fn run(config: Config, on_ready: impl FnOnce(&Config)) -> Result<(), String> {
    let config = Arc::new(config);
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(|e| e.to_string())?;
    let running = engine::start(config.clone()).map_err(|e| e.to_string())?;
    info!(
        shards = config.proxy.shards,
        session = %config.proxy.session_addr,
        transaction = %config.proxy.transaction_addr,
        tenants = config.tenants.len(),
        "supavisor ready"
    );
    on_ready(&config);
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
    running.join()
}
