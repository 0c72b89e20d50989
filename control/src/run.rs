//! Running a node: open the store, start the cluster node on it (a group of
//! one without `[cluster]`), write the config file's tenants through the
//! log, start the shards and the control runtime (HTTP API, metrics, raft),
//! then act on signals: SIGTERM / SIGINT drain and stop, SIGHUP reloads the
//! config file, SIGUSR2 hands over to a new process on the same ports
//! (graceful restart).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
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
    /// The WebSocket listener, when there is one.
    pub websocket: Option<SocketAddr>,
}

/// Exit status of a process that handed over (SIGUSR2) and then saw its
/// last client leave. The systemd units list it in `RestartPreventExitStatus`
/// and `SuccessExitStatus`, so that `Restart=always` does not start it again.
pub const HANDED_OVER_EXIT: u8 = 75;

/// How a node stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGTERM / SIGINT: drained and stopped.
    Shutdown,
    /// SIGUSR2: listeners closed, every client served until it left.
    HandedOver,
}

/// How the node was started, beyond the config file's contents.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The file SIGHUP re-reads; `None`: SIGHUP only logs.
    pub config_path: Option<PathBuf>,
    /// Replaces `[store] path` (`supavisor --store`): the two processes of a
    /// graceful restart each need their own sled directory.
    pub store_override: Option<PathBuf>,
}

/// How often a node that handed over counts the connections it still serves.
const HANDOVER_POLL: Duration = Duration::from_millis(100);

/// The API listener: SO_REUSEPORT (like the shards' listeners) so that the
/// new process of a graceful restart can bind it while the old one still
/// has it; the old one closes its own at SIGUSR2.
fn bind_api(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// SIGHUP: re-reads the config file. Tenants are upserted (as at start) and
/// the live settings (`proxy.shutdown_timeout`, `proxy.client_startup_timeout`, `proxy.client_park_after`,
/// `[tls]` certificate and key) replace the running ones; settings that need a restart are logged and
/// keep their running values; a file that does not parse or validate changes
/// nothing.
fn reload(node: &Node, started: &ConfigFile, opts: &Options) -> Result<(), String> {
    let Some(path) = &opts.config_path else {
        warn!("reload: started without --config, nothing to reload");
        return Err("started without --config: nothing to reload".into());
    };
    let failed = |e: &dyn std::fmt::Display| {
        warn!(file = %path.display(), error = %e, "reload failed: the running configuration stays");
        Err(format!("{}: {e}", path.display()))
    };
    let mut file = match ConfigFile::load(path) {
        Ok(f) => f,
        Err(e) => return failed(&e),
    };
    if let Some(p) = &opts.store_override {
        file.store.path = p.clone();
    }
    let new = match file.proxy.build(file.tls.as_ref()) {
        Ok(p) => p,
        Err(e) => return failed(&e),
    };
    let mut live = node.proxy().clone();
    let mut restart = Vec::new();
    if new.session_addr != live.session_addr {
        restart.push("proxy.session_addr");
    }
    if new.transaction_addr != live.transaction_addr {
        restart.push("proxy.transaction_addr");
    }
    if new.shards != live.shards {
        restart.push("proxy.shards");
    }
    if new.listen_backlog != live.listen_backlog {
        restart.push("proxy.listen_backlog");
    }
    if new.websocket_addr != live.websocket_addr {
        restart.push("proxy.websocket_addr");
    }
    if new.spin_before_park != live.spin_before_park {
        restart.push("proxy.spin_before_park_us");
    }
    if new.tcp_defer_accept != live.tcp_defer_accept {
        restart.push("proxy.tcp_defer_accept");
    }
    if file.api.addr != started.api.addr {
        restart.push("api.addr");
    }
    if file.api.jwt_secret != started.api.jwt_secret {
        restart.push("api.jwt_secret");
    }
    if file.api.metrics_jwt_secret != started.api.metrics_jwt_secret {
        restart.push("api.metrics_jwt_secret");
    }
    if file.store.path != started.store.path {
        restart.push("store.path");
    }
    if file.cluster != started.cluster {
        restart.push("[cluster]");
    }
    live.shutdown_timeout = new.shutdown_timeout;
    live.client_startup_timeout = new.client_startup_timeout;
    live.client_park_after = new.client_park_after;
    live.websocket_cleartext = new.websocket_cleartext;
    // A renewed certificate (or TLS turned on or off) applies to new connections.
    live.tls = new.tls;
    let seeds = file.seeds();
    if let Err(e) = node.reload(live, &seeds) {
        return failed(&e);
    }
    info!(file = %path.display(), tenants = seeds.len(), "configuration reloaded");
    if !restart.is_empty() {
        warn!(
            settings = restart.join(", "),
            "changed settings need a restart; they keep their running values"
        );
    }
    Ok(())
}

/// After SIGUSR2: waits until the shards serve no connection (twice in a
/// row, so that a connection passing between two shards is not missed),
/// then stops them.
fn finish_handover(node: &Node) {
    let mut idle_rounds = 0;
    loop {
        match node.connections() {
            Ok(0) => idle_rounds += 1,
            Ok(_) => idle_rounds = 0,
            Err(e) => {
                warn!(error = %e, "handover: cannot count connections");
                idle_rounds = 0;
            }
        }
        if idle_rounds >= 2 {
            info!("handover: the last client left, stopping");
            node.shutdown();
            return;
        }
        std::thread::sleep(HANDOVER_POLL);
    }
}

/// How long a stopping node tries to hand its pool claims back through the
/// log; without a leader it gives up and the leader (once there is one)
/// releases them after `claim_timeout_ms` of silence.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Releases the pool claims this node holds (one `ReleaseNode` entry).
fn hand_pools_over(rt: &tokio::runtime::Runtime, cluster: &cluster::ClusterNode) {
    let started = std::time::Instant::now();
    let released = rt
        .block_on(async { tokio::time::timeout(RELEASE_WAIT, cluster.release_own_claims()).await });
    match released {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => info!(
            pools = n,
            took_ms = started.elapsed().as_millis() as u64,
            "handed the pools this node owned back to the cluster"
        ),
        Ok(Err(e)) => {
            warn!(error = %e, "cannot release this node's pool claims; the leader will after claim_timeout_ms")
        }
        Err(_) => warn!(
            "releasing this node's pool claims timed out; the leader will after claim_timeout_ms"
        ),
    }
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
    run_node(file, &Options::default(), on_ready).map(|_| ())
}

/// Runs the node until it stops: SIGTERM / SIGINT (drain), or SIGUSR2 and
/// then the last client leaving. SIGHUP reloads `opts.config_path`.
pub fn run_node(
    mut file: ConfigFile,
    opts: &Options,
    on_ready: impl FnOnce(&Ready),
) -> Result<Stopped, String> {
    if let Some(p) = &opts.store_override {
        file.store.path = p.clone();
    }
    let started = file.clone();
    let mut proxy = file
        .proxy
        .build(file.tls.as_ref())
        .map_err(|e| e.to_string())?;
    if let Some(c) = &file.cluster {
        // Proxy links between nodes: the raft port plus one.
        proxy.proxy_addr =
            Some(crate::node::proxy_addr_of(&c.addr).ok_or_else(|| {
                format!("[cluster] addr {:?}: no proxy address (port + 1)", c.addr)
            })?);
    }
    let mut listeners = vec![
        ("proxy.session_addr", proxy.session_addr),
        ("proxy.transaction_addr", proxy.transaction_addr),
        ("api.addr", file.api.addr),
    ];
    listeners.extend(proxy.websocket_addr.map(|a| ("proxy.websocket_addr", a)));
    listeners.extend(
        proxy
            .proxy_addr
            .map(|a| ("[cluster] proxy link (addr port + 1)", a)),
    );
    crate::config::check_listeners(&listeners).map_err(|e| e.to_string())?;
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
    let auth = crate::api::ApiAuth {
        jwt_secret: secret("API_JWT_SECRET", &file.api.jwt_secret),
        metrics_jwt_secret: secret("METRICS_JWT_SECRET", &file.api.metrics_jwt_secret),
    };
    // The admin console: API tokens are its passwords.
    let console = Arc::new(crate::console::Hooks::new(
        rt.handle().clone(),
        auth.jwt_secret.as_deref(),
    ));
    // Clustered: clients wait for the first snapshot that carries the pool
    // claims (published right after the shards start) instead of opening a
    // pool another node owns.
    let config = Node::engine_config(&proxy, &store, &secrets)
        .map_err(|e| e.to_string())?
        .awaiting_cluster(proxy.proxy_addr.is_some())
        .with_console(Some(console.clone()));
    let tenants = config.tenants.len();
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR2]).map_err(|e| e.to_string())?;
    let running = engine::start(Arc::new(config)).map_err(|e| e.to_string())?;
    let node = Arc::new(Node::new(
        store,
        cluster.clone(),
        rt.handle().clone(),
        proxy.clone(),
        secrets,
        running.handles().clone(),
    ));
    console.attach(&node);
    node.set_console(console);
    {
        let (started, opts) = (started.clone(), opts.clone());
        node.set_reloader(Box::new(move |node: &Node| reload(node, &started, &opts)));
    }
    cluster.set_query_handler(Arc::new(crate::report::PeerQueries(Arc::downgrade(&node))));
    node.start_watcher();

    // The HTTP API on the control runtime.
    if auth.jwt_secret.is_none() {
        warn!("API_JWT_SECRET is not set: the API refuses every authenticated request");
    }
    let api_addr = file.api.addr;
    let plane: Arc<dyn crate::plane::ControlPlane> = node.clone();
    let api_stop = Arc::new(tokio::sync::Notify::new());
    let api_stopped = api_stop.clone();
    let bound = bind_api(api_addr).and_then(|l| {
        let _in_runtime = rt.enter();
        tokio::net::TcpListener::from_std(l)
    });
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            running.shutdown();
            let _ = running.join();
            return Err(format!("cannot listen on {api_addr} (api): {e}"));
        }
    };
    let api = listener.local_addr().unwrap_or(api_addr);
    rt.spawn(async move {
        // The listener is dropped (closed) with the serve future when the
        // select ends (handover), before the log line.
        let served = tokio::select! {
            served = crate::api::serve(listener, plane, auth) => Some(served),
            _ = api_stopped.notified() => None,
        };
        match served {
            Some(Err(e)) => warn!(error = %e, "API server stopped"),
            Some(Ok(())) => {}
            None => info!("handover: API listener closed"),
        }
    });

    let ready = Ready {
        session: proxy.session_addr,
        transaction: proxy.transaction_addr,
        api,
        websocket: proxy.websocket_addr,
    };
    info!(
        shards = proxy.shards,
        session = %ready.session,
        transaction = %ready.transaction,
        api = %ready.api,
        websocket = ?ready.websocket,
        tenants,
        "supavisor ready"
    );
    on_ready(&ready);
    let handed_over = Arc::new(AtomicBool::new(false));
    let signal_node = node.clone();
    let signal_handover = handed_over.clone();
    let opts = opts.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let node = signal_node;
            for sig in signals.forever() {
                match sig {
                    SIGHUP => {
                        info!("SIGHUP: reloading the configuration");
                        let _ = reload(&node, &started, &opts);
                    }
                    SIGUSR2 => {
                        if signal_handover.swap(true, Ordering::SeqCst) {
                            continue;
                        }
                        info!("SIGUSR2: handing over, no new clients, serving the connected ones until they leave");
                        if let Err(e) = node.handover() {
                            warn!(error = %e, "handover: a shard did not confirm");
                        }
                        api_stop.notify_one();
                        let node = node.clone();
                        if let Err(e) = std::thread::Builder::new()
                            .name("handover".into())
                            .spawn(move || finish_handover(&node))
                        {
                            warn!(error = %e, "handover: cannot start the watcher; stop with SIGTERM");
                        }
                    }
                    _ => {
                        info!(
                            signal = sig,
                            "shutting down: no new clients, draining transactions"
                        );
                        node.shutdown();
                    }
                }
            }
        })
        .map_err(|e| e.to_string())?;
    let result = running.join();
    if !handed_over.load(Ordering::SeqCst) {
        // Graceful leave: the shards have stopped (their clients drained,
        // their server connections closed), so the pools this node owned
        // can have a new owner now rather than after `claim_timeout_ms`.
        // Not after a handover: the new process runs as the same node and
        // serves these pools.
        hand_pools_over(&rt, &cluster);
    }
    rt.block_on(cluster.shutdown());
    drop(node);
    rt.shutdown_timeout(Duration::from_secs(2));
    result.map(|()| {
        if handed_over.load(Ordering::SeqCst) {
            Stopped::HandedOver
        } else {
            Stopped::Shutdown
        }
    })
}
