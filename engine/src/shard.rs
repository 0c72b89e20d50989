//! Shards: one glommio executor per core, each with SO_REUSEPORT listeners on
//! both ports, the pools of the tenants that hash to it, and an inbox through
//! which other shards (and the control thread) hand it connections, cancel
//! requests and commands.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use glommio::net::{TcpListener, TcpStream, UnixStream};

use crate::stream::Stream;
use glommio::{LocalExecutorBuilder, Placement};
use tracing::{debug, info, warn};
use wire::startup::StartupMessage;

use crate::config::{
    ClientTimeouts, Config, PoolMode, ReplicaConfig, TenantConfig, UserAuth, UserConfig,
};
use crate::metrics::{
    ClientInfo, PoolSnapshot, ServerInfo, ShardCounters, ShardInspection, ShardSnapshot,
};
use crate::pool::{Pool, PoolKey};
use crate::replica::ReplicaSet;
use crate::server::CancelTarget;
use crate::settings::Settings;

/// Capacity of a shard's inbox; a full inbox refuses new handoffs.
const INBOX_CAPACITY: usize = 16 * 1024;
/// Size of the per-shard scratch buffer idle clients read through.
const SCRATCH_LEN: usize = 16 * 1024;
/// A process id the pooler issues is a positive i32: bits 0..18 count the
/// shard's clients (262143 at once), bits 18..26 carry the shard index (256
/// shards), bits 26..31 the cluster node id (1..=31; 0 outside a cluster,
/// and for nodes with a larger id, whose cancels are not forwarded).
const PID_SHARD_SHIFT: u32 = 18;
const PID_NODE_SHIFT: u32 = 26;
const PID_SHARD_MASK: u32 = (1 << (PID_NODE_SHIFT - PID_SHARD_SHIFT)) - 1;
/// The largest node id that fits in a process id.
pub const PID_MAX_NODE: u64 = 31;

/// A connection accepted on one shard for a tenant owned by another.
pub struct Handoff {
    pub fd: OwnedFd,
    /// The client's TLS session, when the handshake ran on the accepting shard.
    pub tls: Option<Box<crate::tls::TlsSession>>,
    pub startup: StartupMessage,
    /// Who the client is (from its user name, options or TLS SNI).
    pub ident: crate::accept::Identity,
    pub leftover: Vec<u8>,
    pub mode: PoolMode,
    pub peer: Option<SocketAddr>,
    /// The framing state of a WebSocket client.
    pub ws: Option<Box<crate::websocket::WsState>>,
    /// The client may log in with a cleartext password.
    pub cleartext: bool,
}

pub enum ShardMsg {
    Handoff(Box<Handoff>),
    Cancel {
        process_id: i32,
        secret: Vec<u8>,
        /// The requester's socket, closed once the request is processed.
        done: Option<OwnedFd>,
    },
    /// A new configuration snapshot: pools resize, removed tenants and users
    /// lose their clients (57P01) and pools.
    Config(Arc<Config>),
    /// Drop a tenant's clients (57P01) and pools; its configuration stays.
    Terminate {
        tenant: String,
    },
    /// Report counters and pools.
    Snapshot(crossbeam_channel::Sender<ShardSnapshot>),
    /// Answered with the shard id once every message sent before it is applied.
    Barrier(crossbeam_channel::Sender<usize>),
    /// Graceful restart (SIGUSR2): stop accepting, take what is already in
    /// the listeners' backlog, close the listeners; keep serving every
    /// connection (idle ones included) until it ends.
    Handover,
    /// Answered with the number of connections this shard still serves
    /// (logged in or not).
    Connections(crossbeam_channel::Sender<usize>),
    Shutdown,
    /// The answer to a claim this shard asked the control plane for.
    Claimed {
        token: u64,
        owner: Option<u64>,
    },
    /// Report the clients and server connections (admin console).
    Inspect(crossbeam_channel::Sender<ShardInspection>),
    /// PAUSE a tenant (admin console): its checkouts wait, its server
    /// connections close once their transactions end. Answered with the
    /// number still in use when the wait ended (0: fully paused).
    Pause {
        tenant: String,
        reply: crossbeam_channel::Sender<usize>,
    },
    /// RESUME a paused tenant; answered with whether it was paused here.
    Resume {
        tenant: String,
        reply: crossbeam_channel::Sender<bool>,
    },
    /// The answer to a console command this shard asked the control plane for.
    Console {
        token: u64,
        reply: Box<crate::console::Reply>,
    },
}

/// The sending end of a shard's inbox, usable from any thread.
#[derive(Clone)]
pub struct ShardHandle {
    tx: crossbeam_channel::Sender<ShardMsg>,
    wake: Arc<StdUnixStream>,
}

impl ShardHandle {
    /// Queues a message and wakes the shard. A full inbox gives the message back.
    pub fn send(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.tx.try_send(msg).map_err(|e| e.into_inner())?;
        // One byte wakes the shard; if the socket is full a wake-up is pending anyway.
        let _ = (&*self.wake).write(&[1]);
        Ok(())
    }
}

/// What the shard asks of a client task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    None,
    /// Finish the current transaction, then leave (57P01).
    Drain,
    /// Leave now (57P01), even mid-transaction: the tenant was removed or terminated.
    Kill,
    /// Leave now (08006), even mid-transaction: this node no longer serves
    /// the pool (its cluster lease lapsed, or the pool's claim moved to
    /// another node), so its server connections must close before another
    /// node opens its own.
    Fenced,
    /// `client_idle_timeout` passed with no transaction open (57P05).
    IdleTimeout,
    /// `idle_transaction_timeout` passed inside a transaction (25P03).
    IdleInTransactionTimeout,
}

/// What a client is doing, for its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No transaction open.
    Idle,
    /// Inside a transaction, the server waiting for the client.
    InTransaction,
    /// A request sent (or waiting for a server connection).
    Busy,
}

/// What the admin console shows of a client.
pub struct ClientDesc {
    pub peer: Option<SocketAddr>,
    /// Unix seconds.
    pub connected: u64,
    /// Its startup settings (for `application_name`), shared with the session.
    pub settings: Rc<Settings>,
    /// Where its transactions go.
    pub reads: crate::replica::Reads,
    /// Proxied to the node that owns its pool.
    pub proxied_to: Option<u64>,
}

impl ClientDesc {
    /// A client from `peer`, connected now.
    pub fn new(peer: Option<SocketAddr>, settings: Rc<Settings>) -> ClientDesc {
        ClientDesc {
            peer,
            connected: unix_now(),
            settings,
            reads: crate::replica::Reads::Primary,
            proxied_to: None,
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Per-client control block: cancel key, the server it holds, signals.
pub struct ClientCtl {
    pub key: Rc<PoolKey>,
    pub desc: ClientDesc,
    pub secret: [u8; 4],
    pub cancel: RefCell<Option<Rc<CancelTarget>>>,
    signal: Cell<Signal>,
    waker: RefCell<Option<Waker>>,
    timeouts: ClientTimeouts,
    phase: Cell<Phase>,
    /// When `phase` began.
    since: Cell<Instant>,
    /// The query timeout already sent a cancel in this phase.
    cancel_sent: Cell<bool>,
    /// Where the client stands on the way to being parked (`crate::park`).
    pub(crate) park: Cell<Park>,
    /// The client's session while it is parked.
    pub(crate) parked: Cell<Option<Box<crate::client::Parked>>>,
}

/// A client's way to being parked: the park sweep marks a client it finds
/// idle, asks a client it finds idle and marked (so it was idle for a whole
/// sweep period), and the client's task parks it at its next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Park {
    /// Not a client that parks (session mode, TLS, WebSocket, proxied).
    Never,
    Active,
    Marked,
    Asked,
    Parked,
}

impl ClientCtl {
    /// The pending signal; remembers the waker to be woken by the next one.
    pub fn signal(&self, waker: &Waker) -> Signal {
        let s = self.signal.get();
        if s != Signal::None {
            return s;
        }
        let mut slot = self.waker.borrow_mut();
        match slot.as_ref() {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
        Signal::None
    }

    /// The client is now doing this (cheap when nothing changed).
    pub fn set_phase(&self, phase: Phase) {
        if self.phase.get() != phase {
            self.phase.set(phase);
            self.cancel_sent.set(false);
            if matches!(self.park.get(), Park::Marked | Park::Asked) {
                self.park.set(Park::Active);
            }
            if !self.timeouts.is_off() {
                self.since.set(Instant::now());
            }
        }
    }

    /// Applies the client's timeouts at `now`.
    fn check_timeouts(&self, now: Instant) {
        let t = self.timeouts;
        if t.is_off() || self.signal.get() != Signal::None {
            return;
        }
        let age = now.saturating_duration_since(self.since.get());
        let over = |ms: u32| ms > 0 && age >= Duration::from_millis(u64::from(ms));
        match self.phase.get() {
            Phase::Idle if over(t.client_idle_ms) => self.raise(Signal::IdleTimeout),
            Phase::InTransaction if over(t.idle_transaction_ms) => {
                self.raise(Signal::IdleInTransactionTimeout)
            }
            Phase::Busy if over(t.query_ms) && !self.cancel_sent.get() => {
                self.cancel_sent.set(true);
                if let Some(target) = self.cancel.borrow().clone() {
                    glommio::spawn_local(target.send()).detach();
                }
            }
            _ => {}
        }
    }

    /// The park sweep asked this client to park: true once (the task then
    /// parks it if it is between transactions with nothing owed).
    pub(crate) fn park_asked(&self) -> bool {
        if self.park.get() == Park::Asked {
            self.park.set(Park::Active);
            return true;
        }
        false
    }

    /// A client that may park (transaction mode over plain TCP).
    pub(crate) fn allow_park(&self) {
        if self.park.get() == Park::Never {
            self.park.set(Park::Active);
        }
    }

    /// One turn of the park sweep.
    fn park_sweep(&self) {
        let next = match (self.park.get(), self.phase.get()) {
            (Park::Active, Phase::Idle) => Park::Marked,
            (Park::Marked, Phase::Idle) => Park::Asked,
            _ => return,
        };
        self.park.set(next);
        if next == Park::Asked {
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// A signal waits to be seen.
    pub(crate) fn has_signal(&self) -> bool {
        self.signal.get() != Signal::None
    }

    /// Remembers `waker` to be woken by the next signal (a parked client's).
    pub(crate) fn set_waker(&self, waker: Waker) {
        *self.waker.borrow_mut() = Some(waker);
    }

    fn raise(&self, signal: Signal) {
        if signal == Signal::Drain && self.signal.get() != Signal::None {
            return;
        }
        if self.signal.get() == signal {
            return;
        }
        self.signal.set(signal);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

pub struct Shard {
    pub id: usize,
    config: RefCell<Arc<Config>>,
    pub peers: Arc<Vec<ShardHandle>>,
    pools: RefCell<HashMap<PoolKey, Rc<Pool>>>,
    /// Secrets fetched through auth_query, per (tenant, db user).
    pub auth_cache: RefCell<HashMap<(String, String), crate::authquery::Cached>>,
    /// Failed logins per (tenant, user, mode): a refused login starts no pool.
    failed_joins: RefCell<HashMap<PoolKey, u64>>,
    pub handoffs_in: Cell<u64>,
    pub handoffs_out: Cell<u64>,
    pub tasks_spawned: Cell<u64>,
    pub refused: Cell<u64>,
    pub stalls: Cell<u64>,
    /// Wakes the fencing loop when this node becomes part of a cluster.
    fence_kick: glommio::sync::Semaphore,
    /// Clients parked now.
    parked: Cell<u64>,
    clients: RefCell<HashMap<i32, Rc<ClientCtl>>>,
    next_pid: Cell<u32>,
    /// Idle clients read through this buffer instead of holding their own.
    pub scratch: RefCell<Vec<u8>>,
    draining: Cell<bool>,
    /// Clients registered with a timeout: the sweep skips work when none.
    timed_clients: Cell<usize>,
    /// Failed logins per (client address, tenant, user), for the back-off.
    login_failures: RefCell<HashMap<(IpAddr, String, String), LoginFailures>>,
    /// Connection tasks alive on this shard, from accept (or handoff) to
    /// their end: logged-in clients plus those still in startup.
    connections: Cell<usize>,
    /// Claims asked of the control plane, by token.
    claims: RefCell<HashMap<u64, crate::oneshot::Sender<Option<u64>>>>,
    next_token: Cell<u64>,
    /// Clients proxied to other nodes, by a per-shard id.
    links: RefCell<HashMap<u64, Rc<LinkCtl>>>,
    pub websocket: crate::websocket::WsCounters,
    /// Replicas of the tenants served here, by tenant.
    replica_sets: RefCell<HashMap<String, Rc<ReplicaSet>>>,
    /// Tenants PAUSEd from the admin console.
    paused: RefCell<HashSet<String>>,
    /// Console commands asked of the control plane, by token.
    console_calls: RefCell<HashMap<u64, crate::oneshot::Sender<crate::console::Reply>>>,
    /// Parked clients' sockets (`crate::park`); `None` if the kernel refused one.
    pub(crate) parking: Option<crate::park::Parking>,
}

/// A client this node proxies to the owner of its pool: cut when this node's
/// applied claims stop naming that owner (released, or moved), because the
/// owner no longer serves the pool — a link into a partition would otherwise
/// hang until TCP gives up.
pub struct LinkCtl {
    claim: String,
    owner: u64,
    cut: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LinkCtl {
    /// Resolves once the link is cut.
    pub async fn cut(&self) {
        std::future::poll_fn(|cx| {
            if self.cut.get() {
                return std::task::Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }

    fn raise(&self) {
        self.cut.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Registration of a [`LinkCtl`] with its shard, undone on drop.
pub struct LinkGuard {
    shard: Rc<Shard>,
    id: u64,
    pub ctl: Rc<LinkCtl>,
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        self.shard.links.borrow_mut().remove(&self.id);
    }
}

/// Counts one connection task of a shard while it lives.
pub struct ConnGuard(Rc<Shard>);

impl ConnGuard {
    pub fn new(shard: &Rc<Shard>) -> ConnGuard {
        shard.connections.set(shard.connections.get() + 1);
        ConnGuard(shard.clone())
    }

    pub fn shard(&self) -> &Rc<Shard> {
        &self.0
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0
            .connections
            .set(self.0.connections.get().saturating_sub(1));
    }
}

/// Failed logins of one (address, tenant, user).
#[derive(Debug, Clone, Copy)]
struct LoginFailures {
    count: u32,
    last: Instant,
    /// No login is tried before then.
    blocked_until: Instant,
}

/// Failed logins allowed before the back-off starts.
const FREE_LOGIN_FAILURES: u32 = 5;
/// The back-off doubles from 1 s per further failure, up to this.
const MAX_LOGIN_BACKOFF: Duration = Duration::from_secs(60);
/// Failures older than this are forgotten.
const LOGIN_FAILURE_WINDOW: Duration = Duration::from_secs(600);
/// Entries kept per shard; past it, only blocked ones survive a cleanup.
const MAX_LOGIN_FAILURE_ENTRIES: usize = 100_000;
/// How often client timeouts are checked.
const TIMEOUT_SWEEP: Duration = Duration::from_millis(500);
/// How long a stopping shard waits for its idle server connections to close.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How long PAUSE waits for the tenant's running transactions.
const PAUSE_WAIT: Duration = Duration::from_secs(30);
/// How often a PAUSE looks whether they ended.
const PAUSE_POLL: Duration = Duration::from_millis(10);
/// How often a cluster node's shards check that they may still serve their
/// pools (the lease lapses at half `claim_timeout_ms`; the leader releases
/// the claims at the earliest at the full timeout).
const FENCE_CHECK: Duration = Duration::from_millis(50);

/// Stable FNV-1a hash of a tenant id: the same shard on every node and run.
pub fn tenant_hash(tenant: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in tenant.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl Shard {
    /// The current configuration snapshot.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Spawns a detached task on this shard, counted.
    pub fn spawn(&self, fut: impl std::future::Future<Output = ()> + 'static) {
        crate::metrics::bump(&self.tasks_spawned, 1);
        glommio::spawn_local(fut).detach();
    }

    /// Counts a failed login of a known tenant and user.
    pub fn join_failed(&self, key: PoolKey) {
        *self.failed_joins.borrow_mut().entry(key).or_default() += 1;
    }

    pub fn owner_of(&self, tenant: &str) -> usize {
        (tenant_hash(tenant) % self.peers.len() as u64) as usize
    }

    pub fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// The pool of (tenant, user, mode), created on first use.
    pub fn pool(
        &self,
        tenant: &Arc<TenantConfig>,
        user: &Arc<UserConfig>,
        mode: PoolMode,
    ) -> Rc<Pool> {
        let key = PoolKey::primary(&tenant.external_id, &user.db_user, mode);
        if let Some(pool) = self.pools.borrow().get(&key) {
            return pool.clone();
        }
        self.pools
            .borrow_mut()
            .entry(key.clone())
            .or_insert_with(|| {
                let pool = Pool::new(key, tenant.clone(), user.clone());
                if self.paused.borrow().contains(&tenant.external_id) {
                    pool.pause();
                }
                pool
            })
            .clone()
    }

    /// The replicas of `tenant` as this shard judges them; `None` when it
    /// has none.
    pub fn replica_set(&self, tenant: &TenantConfig) -> Option<Rc<ReplicaSet>> {
        if tenant.replication.replicas.is_empty() {
            return None;
        }
        let mut sets = self.replica_sets.borrow_mut();
        if let Some(set) = sets.get(&tenant.external_id) {
            if *set.settings() == tenant.replication {
                return Some(set.clone());
            }
        }
        let old = sets.remove(&tenant.external_id);
        let set = Rc::new(ReplicaSet::new(&tenant.replication, old.as_deref()));
        sets.insert(tenant.external_id.clone(), set.clone());
        Some(set)
    }

    /// The pool of `primary`'s (tenant, user, mode) on `replica`, created
    /// on first use.
    pub fn replica_pool(&self, primary: &Rc<Pool>, replica: &ReplicaConfig) -> Rc<Pool> {
        let key = primary.key.on_replica(&replica.name());
        self.pools
            .borrow_mut()
            .entry(key.clone())
            .or_insert_with(|| {
                let pool = Pool::with_replica(
                    key,
                    primary.tenant(),
                    primary.user(),
                    Some(replica.clone()),
                );
                if primary.is_paused() {
                    pool.pause();
                }
                pool
            })
            .clone()
    }

    /// Per tenant with replicas: its set and, for each replica that has a
    /// pool here, one of those pools (to run the health check on).
    #[allow(clippy::type_complexity)]
    pub fn replica_pools_to_check(&self) -> Vec<(String, Rc<ReplicaSet>, Vec<(usize, Rc<Pool>)>)> {
        let sets = self.replica_sets.borrow();
        if sets.is_empty() {
            return Vec::new();
        }
        let pools = self.pools.borrow();
        sets.iter()
            .map(|(tenant, set)| {
                let found = set
                    .members
                    .iter()
                    .enumerate()
                    .filter_map(|(i, m)| {
                        pools
                            .iter()
                            .find(|(k, p)| {
                                k.tenant == *tenant
                                    && k.replica.as_deref() == Some(m.name.as_str())
                                    && !p.is_retired()
                            })
                            .map(|(_, p)| (i, p.clone()))
                    })
                    .collect();
                (tenant.clone(), set.clone(), found)
            })
            .collect()
    }

    /// Runs a console command through the control plane.
    pub async fn console_call(
        &self,
        command: crate::console::Command,
        timeout: Duration,
    ) -> crate::console::Reply {
        let failure = |message: &str| crate::console::Failure {
            sqlstate: "58000".into(),
            message: message.into(),
        };
        let Some(hooks) = self.config().console.clone() else {
            return Err(failure("the admin console is not available on this node"));
        };
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        let (tx, rx) = crate::oneshot::channel();
        self.console_calls.borrow_mut().insert(token, tx);
        hooks.run(command, self.id, token);
        let answer = glommio::timer::timeout(timeout, async { Ok(rx.await) }).await;
        self.console_calls.borrow_mut().remove(&token);
        match answer {
            Ok(Some(reply)) => reply,
            Ok(None) => Err(failure("the control plane dropped the command")),
            Err(_) => Err(failure("the command timed out")),
        }
    }

    /// The clients and server connections of this shard.
    fn inspect(&self) -> ShardInspection {
        let clients = self
            .clients
            .borrow()
            .iter()
            .map(|(pid, ctl)| ClientInfo {
                tenant: ctl.key.tenant.clone(),
                user: ctl.key.user.clone(),
                mode: ctl.key.mode.as_str().to_string(),
                state: match (ctl.desc.proxied_to, ctl.phase.get()) {
                    (Some(node), _) => format!("proxied to node {node}"),
                    (None, Phase::Idle) => "idle".into(),
                    (None, Phase::InTransaction) => "idle in transaction".into(),
                    (None, Phase::Busy) if ctl.cancel.borrow().is_some() => "active".into(),
                    (None, Phase::Busy) => "waiting".into(),
                },
                addr: ctl.desc.peer,
                connect_time: ctl.desc.connected,
                pid: *pid,
                application_name: ctl
                    .desc
                    .settings
                    .get("application_name")
                    .unwrap_or_default()
                    .to_string(),
                reads: ctl.desc.reads.as_str().to_string(),
            })
            .collect();
        let mut servers = Vec::new();
        for (key, pool) in self.pools.borrow().iter() {
            for (meta, idle) in pool.servers() {
                servers.push(ServerInfo {
                    tenant: key.tenant.clone(),
                    user: key.user.clone(),
                    mode: key.mode.as_str().to_string(),
                    replica: key.replica.clone(),
                    state: if idle { "idle" } else { "active" }.into(),
                    addr: meta.addr,
                    backend_pid: meta.backend_pid,
                    connect_time: meta
                        .connected
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                });
            }
        }
        ShardInspection {
            shard: self.id,
            clients,
            servers,
        }
    }

    /// PAUSE: the tenant's pools (and those it gets later) hold new
    /// checkouts; waits (bounded) until no server connection of the tenant
    /// is in use, closing them as they come back. Returns how many are
    /// still in use.
    async fn pause_tenant(&self, tenant: &str) -> usize {
        self.paused.borrow_mut().insert(tenant.to_string());
        let pools = || -> Vec<Rc<Pool>> {
            self.pools
                .borrow()
                .iter()
                .filter(|(k, _)| k.tenant == tenant)
                .map(|(_, p)| p.clone())
                .collect()
        };
        for p in pools() {
            p.pause();
        }
        let deadline = Instant::now() + PAUSE_WAIT;
        loop {
            let busy: usize = pools().iter().map(|p| p.busy_count()).sum();
            if busy == 0 || Instant::now() >= deadline || !self.paused.borrow().contains(tenant) {
                return busy;
            }
            glommio::timer::sleep(PAUSE_POLL).await;
        }
    }

    /// RESUME: whether the tenant was paused here.
    fn resume_tenant(&self, tenant: &str) -> bool {
        let was = self.paused.borrow_mut().remove(tenant);
        for (k, p) in self.pools.borrow().iter() {
            if k.tenant == tenant {
                p.resume();
            }
        }
        was
    }

    /// Issues a cancel key and registers the client.
    /// How long a login from `ip` as this tenant's user must wait, if it must.
    pub fn login_backoff(&self, ip: IpAddr, tenant: &str, user: &str) -> Option<Duration> {
        let map = self.login_failures.borrow();
        // The common case, nobody failing: no key built for the lookup.
        if map.is_empty() {
            return None;
        }
        let f = map.get(&(ip, tenant.to_string(), user.to_string()))?;
        let now = Instant::now();
        (f.blocked_until > now).then(|| f.blocked_until - now)
    }

    /// A wrong password from `ip`: after a few, logins wait longer and longer.
    pub fn login_failed(&self, ip: IpAddr, tenant: &str, user: &str) {
        let now = Instant::now();
        let mut map = self.login_failures.borrow_mut();
        if map.len() >= MAX_LOGIN_FAILURE_ENTRIES {
            map.retain(|_, f| f.blocked_until > now);
            if map.len() >= MAX_LOGIN_FAILURE_ENTRIES {
                map.clear();
            }
        }
        let f = map
            .entry((ip, tenant.to_string(), user.to_string()))
            .or_insert(LoginFailures {
                count: 0,
                last: now,
                blocked_until: now,
            });
        if now.duration_since(f.last) > LOGIN_FAILURE_WINDOW {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        if f.count >= FREE_LOGIN_FAILURES {
            let doublings = (f.count - FREE_LOGIN_FAILURES).min(16);
            let wait = Duration::from_secs(1u64 << doublings).min(MAX_LOGIN_BACKOFF);
            f.blocked_until = now + wait;
        }
    }

    /// A successful login clears the address's record for that user.
    pub fn login_ok(&self, ip: IpAddr, tenant: &str, user: &str) {
        let mut map = self.login_failures.borrow_mut();
        if !map.is_empty() {
            map.remove(&(ip, tenant.to_string(), user.to_string()));
        }
    }

    /// Parks a client's session (`crate::park`): its socket `fd` goes into
    /// the epoll set, its session into its control block. Gives the session
    /// back if the kernel refuses the socket.
    pub(crate) fn park_client(
        &self,
        ctl: &ClientCtl,
        pid: i32,
        fd: std::os::fd::RawFd,
        parked: Box<crate::client::Parked>,
    ) -> Result<(), Box<crate::client::Parked>> {
        let Some(parking) = &self.parking else {
            return Err(parked);
        };
        if let Err(e) = parking.watch(fd, pid) {
            warn!(error = %e, "could not park a client");
            return Err(parked);
        }
        ctl.parked.set(Some(parked));
        ctl.park.set(Park::Parked);
        ctl.set_waker(crate::park::waker(pid));
        self.parked.set(self.parked.get() + 1);
        Ok(())
    }

    /// Spawns the task of the parked client `pid` again (its socket or a
    /// signal woke it); nothing if it is not parked.
    pub(crate) fn resume_parked(self: &Rc<Self>, pid: i32) {
        let Some(ctl) = self.clients.borrow().get(&pid).cloned() else {
            return;
        };
        let Some(parked) = ctl.parked.take() else {
            return;
        };
        ctl.park.set(Park::Active);
        ctl.waker.borrow_mut().take();
        self.parked.set(self.parked.get().saturating_sub(1));
        crate::client::resume(self, ctl, pid, *parked);
    }

    /// Marks idle clients, asks those idle for a whole period to park.
    fn sweep_parks(&self) {
        if self.parking.is_none() {
            return;
        }
        for ctl in self.clients.borrow().values() {
            ctl.park_sweep();
        }
    }

    /// Applies every client's timeouts.
    fn sweep_timeouts(&self) {
        if self.timed_clients.get() == 0 {
            return;
        }
        let now = Instant::now();
        for ctl in self.clients.borrow().values() {
            ctl.check_timeouts(now);
        }
    }

    pub fn register_client(
        &self,
        key: Rc<PoolKey>,
        timeouts: ClientTimeouts,
        desc: ClientDesc,
    ) -> (i32, Rc<ClientCtl>) {
        let mut clients = self.clients.borrow_mut();
        let pid = loop {
            let n = self.next_pid.get() % (1 << PID_SHARD_SHIFT);
            self.next_pid.set(n + 1);
            let node = self.pid_node() as u32;
            let pid = (node << PID_NODE_SHIFT
                | ((self.id as u32) & PID_SHARD_MASK) << PID_SHARD_SHIFT
                | n.max(1)) as i32;
            if !clients.contains_key(&pid) {
                break pid;
            }
        };
        let ctl = Rc::new(ClientCtl {
            key,
            desc,
            secret: rand::random(),
            cancel: RefCell::new(None),
            signal: Cell::new(if self.draining.get() {
                Signal::Drain
            } else {
                Signal::None
            }),
            waker: RefCell::new(None),
            timeouts,
            phase: Cell::new(Phase::Idle),
            since: Cell::new(Instant::now()),
            cancel_sent: Cell::new(false),
            park: Cell::new(Park::Never),
            parked: Cell::new(None),
        });
        if !timeouts.is_off() {
            self.timed_clients.set(self.timed_clients.get() + 1);
        }
        clients.insert(pid, ctl.clone());
        (pid, ctl)
    }

    pub fn unregister_client(&self, pid: i32) {
        if let Some(ctl) = self.clients.borrow_mut().remove(&pid) {
            if !ctl.timeouts.is_off() {
                self.timed_clients
                    .set(self.timed_clients.get().saturating_sub(1));
            }
        }
    }

    pub fn client_count(&self) -> usize {
        self.clients.borrow().len()
    }

    /// The shard that issued a process id.
    pub fn shard_of_pid(&self, pid: i32) -> Option<usize> {
        let shard = ((pid as u32 >> PID_SHARD_SHIFT) & PID_SHARD_MASK) as usize;
        (pid > 0 && shard < self.peers.len()).then_some(shard)
    }

    /// This node's id as process ids carry it (0: none).
    fn pid_node(&self) -> u64 {
        match &self.config.borrow().cluster {
            Some(c) if c.self_node <= PID_MAX_NODE => c.self_node,
            _ => 0,
        }
    }

    /// Asks the control plane to claim pool `key` for this node; the owner
    /// (this node or the one that holds it), `None` when the claim failed.
    pub async fn claim(&self, key: String) -> Option<u64> {
        let cluster = self.config().cluster.clone()?;
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        let (tx, rx) = crate::oneshot::channel();
        self.claims.borrow_mut().insert(token, tx);
        cluster.hooks.claim(key, self.id, token);
        let owner = rx.await;
        owner.flatten()
    }

    /// Cancels the query of the client with this key, if it holds a server.
    pub fn cancel(&self, pid: i32, secret: &[u8], done: Option<OwnedFd>) {
        let target = {
            let clients = self.clients.borrow();
            let Some(ctl) = clients.get(&pid) else {
                debug!(pid, "cancel for unknown client");
                return;
            };
            // Compare in constant time.
            if secret.len() != ctl.secret.len()
                || secret
                    .iter()
                    .zip(ctl.secret.iter())
                    .fold(0u8, |a, (x, y)| a | (x ^ y))
                    != 0
            {
                debug!(pid, "cancel with wrong secret");
                return;
            }
            let target = ctl.cancel.borrow().clone();
            target
        };
        let Some(target) = target else {
            return;
        };
        glommio::spawn_local(async move {
            target.send().await;
            drop(done);
        })
        .detach();
    }

    /// Routes a cancel request to the shard that issued the key.
    /// `done`, the requester's socket, is closed once the database has
    /// processed the request (or it could not be routed).
    pub fn route_cancel(&self, pid: i32, secret: Vec<u8>, done: Option<OwnedFd>) {
        let node = (pid as u32 >> PID_NODE_SHIFT) as u64;
        if pid > 0 && node != 0 && node != self.pid_node() {
            // Issued by another node of the cluster: forward it there.
            let config = self.config();
            let source = config.proxy.proxy_addr.map(|a| a.ip());
            let target = config
                .cluster
                .as_ref()
                .and_then(|c| Some((*c.proxies.get(&node)?, c.secret.clone())));
            match (target, <[u8; 4]>::try_from(secret.as_slice())) {
                (Some((addr, key)), Ok(s)) => {
                    glommio::spawn_local(async move {
                        let to = crate::cluster::LinkTarget {
                            node,
                            addr,
                            source,
                            secret: &key,
                        };
                        crate::cluster::forward_cancel(to, pid, s).await;
                        drop(done);
                    })
                    .detach();
                }
                _ => debug!(pid, node, "cancel request for an unknown node"),
            }
            return;
        }
        match self.shard_of_pid(pid) {
            Some(s) if s == self.id => self.cancel(pid, &secret, done),
            Some(s) => {
                let _ = self.peers[s].send(ShardMsg::Cancel {
                    process_id: pid,
                    secret,
                    done,
                });
            }
            None => debug!(pid, "cancel request with a key no shard issued"),
        }
    }

    fn begin_shutdown(&self) {
        self.draining.set(true);
        for ctl in self.clients.borrow().values() {
            ctl.raise(Signal::Drain);
        }
    }

    /// Fencing (cluster only): every pool this node may no longer serve —
    /// its lease lapsed, or the claim is not (or no longer) this node's — is
    /// dropped, its clients leave at once with 08006 and its server
    /// connections close, so that the node that takes the pool over never
    /// finds them still open. Runs on every configuration and every
    /// [`FENCE_CHECK`].
    fn fence(&self) {
        let Some(cluster) = self.config.borrow().cluster.clone() else {
            return;
        };
        if self.pools.borrow().is_empty() {
            return;
        }
        let lease = cluster.hooks.lease_valid();
        let gone: Vec<PoolKey> = self
            .pools
            .borrow()
            .keys()
            .filter(|k| {
                let claim = crate::config::pool_key(&k.tenant, &k.user, k.mode);
                !lease || cluster.owners.get(&claim) != Some(&cluster.self_node)
            })
            .cloned()
            .collect();
        for key in gone {
            warn!(
                shard = self.id,
                tenant = %key.tenant,
                user = %key.user,
                mode = key.mode.as_str(),
                lease,
                "cluster: fencing a pool this node may no longer serve"
            );
            self.drop_pool_with(&key, Signal::Fenced);
        }
    }

    /// Registers a client proxied to `owner` for pool `claim` (see [`LinkCtl`]).
    pub fn register_link(self: &Rc<Self>, claim: String, owner: u64) -> LinkGuard {
        let id = self.next_token.get();
        self.next_token.set(id + 1);
        let ctl = Rc::new(LinkCtl {
            claim,
            owner,
            cut: Cell::new(false),
            waker: RefCell::new(None),
        });
        self.links.borrow_mut().insert(id, ctl.clone());
        // The configuration may have changed while the client was starting up.
        self.cut_moved_links();
        LinkGuard {
            shard: self.clone(),
            id,
            ctl,
        }
    }

    /// Cuts the proxied clients whose owner the applied claims no longer name.
    fn cut_moved_links(&self) {
        let Some(cluster) = self.config.borrow().cluster.clone() else {
            return;
        };
        for link in self.links.borrow().values() {
            if !link.cut.get() && cluster.owners.get(&link.claim) != Some(&link.owner) {
                debug!(claim = %link.claim, owner = link.owner, "cluster: the pool moved, cutting a proxied client");
                link.raise();
            }
        }
    }

    /// Applies a new configuration snapshot.
    fn apply_config(&self, config: Arc<Config>) {
        let was_clustered = self.config.borrow().cluster.is_some();
        *self.config.borrow_mut() = config.clone();
        if config.cluster.is_some() && !was_clustered {
            // The fencing loop of a node that was alone sleeps long: a
            // node that has just formed a cluster checks every FENCE_CHECK.
            self.fence_kick.signal(1);
        }
        self.fence();
        self.cut_moved_links();
        let mut gone = Vec::new();
        for (key, pool) in self.pools.borrow().iter() {
            let Some(t) = config.tenant(&key.tenant) else {
                gone.push(key.clone());
                continue;
            };
            if let Some(name) = &key.replica {
                // A replica's pool follows its replica's settings; a
                // replica taken out of the configuration loses its pools
                // (its connections close as they come back; the clients,
                // who belong to the primary's pool, stay).
                let replica = t.replication.replicas.iter().find(|r| r.name() == *name);
                let user = t.users.get(&key.user).cloned().or_else(|| {
                    (!t.require_user && matches!(pool.user().auth, UserAuth::Fetched(_)))
                        .then(|| pool.user())
                });
                match (replica, user) {
                    (Some(r), Some(u)) => pool.update_on(t.clone(), u, Some(r.clone())),
                    _ => gone.push(key.clone()),
                }
                continue;
            }
            match t.users.get(&key.user) {
                Some(u) => pool.update(t.clone(), u.clone()),
                // A user that came through auth_query keeps its pool.
                None if !t.require_user && matches!(pool.user().auth, UserAuth::Fetched(_)) => {
                    pool.update(t.clone(), pool.user())
                }
                None => gone.push(key.clone()),
            }
        }
        self.auth_cache
            .borrow_mut()
            .retain(|(tenant, _), _| config.tenant(tenant).is_some());
        let tenants: Vec<String> = self.replica_sets.borrow().keys().cloned().collect();
        for id in tenants {
            match config.tenant(&id) {
                // Rebuilt (keeping what is known of each replica) when its
                // settings changed.
                Some(t) if !t.replication.replicas.is_empty() => {
                    self.replica_set(t);
                }
                _ => {
                    self.replica_sets.borrow_mut().remove(&id);
                }
            }
        }
        for key in gone {
            self.drop_pool(&key);
        }
    }

    /// Kills the pool's clients and retires it.
    fn drop_pool(&self, key: &PoolKey) {
        self.drop_pool_with(key, Signal::Kill)
    }

    /// Retires the pool and sends its clients `signal` (a kind of kill).
    fn drop_pool_with(&self, key: &PoolKey, signal: Signal) {
        let pool = self.pools.borrow_mut().remove(key);
        if let Some(pool) = pool {
            if signal == Signal::Fenced {
                pool.retire_fenced();
            } else {
                pool.retire();
            }
        }
        for ctl in self.clients.borrow().values() {
            if *ctl.key == *key {
                ctl.raise(signal);
            }
        }
    }

    fn terminate_tenant(&self, tenant: &str) {
        let keys: Vec<PoolKey> = self
            .pools
            .borrow()
            .keys()
            .filter(|k| k.tenant == tenant)
            .cloned()
            .collect();
        for key in keys {
            self.drop_pool(&key);
        }
        // Clients whose pool was already replaced still go.
        for ctl in self.clients.borrow().values() {
            if ctl.key.tenant == tenant {
                ctl.raise(Signal::Kill);
            }
        }
    }

    fn snapshot(&self) -> ShardSnapshot {
        let mut pools: Vec<PoolSnapshot> =
            self.pools.borrow().values().map(|p| p.snapshot()).collect();
        for (key, fails) in self.failed_joins.borrow().iter() {
            match pools.iter_mut().find(|p| {
                p.tenant == key.tenant && p.user == key.user && p.mode == key.mode.as_str()
            }) {
                Some(p) => p.joins_fail += fails,
                None => {
                    let db_name = self
                        .config()
                        .tenant(&key.tenant)
                        .map(|t| t.db_database.clone())
                        .unwrap_or_default();
                    pools.push(PoolSnapshot::empty(key, db_name, *fails));
                }
            }
        }
        let replicas = self
            .replica_sets
            .borrow()
            .iter()
            .flat_map(|(tenant, set)| set.snapshot(tenant))
            .collect();
        ShardSnapshot {
            shard: self.id,
            replicas,
            paused: self.paused.borrow().iter().cloned().collect(),
            counters: ShardCounters {
                handoffs_out: self.handoffs_out.get(),
                handoffs_in: self.handoffs_in.get(),
                clients: self.clients.borrow().len() as u64,
                tasks_spawned: self.tasks_spawned.get(),
                stalls: self.stalls.get(),
                parked: self.parked.get(),
                refused: self.refused.get(),
                websocket_open: self.websocket.open.get(),
                websocket_upgrades: self.websocket.upgrades.get(),
                websocket_rejected: self.websocket.rejected.get(),
            },
            pools,
        }
    }

    /// Closes every idle server connection (Terminate, then close) and waits,
    /// bounded, until they are closed: a node that hands its pools over after
    /// its shards stopped leaves no backend behind for the next owner to
    /// count against `pool_size`.
    async fn close_pools(&self) {
        let conns: Vec<Box<crate::server::ServerConn>> = self
            .pools
            .borrow()
            .values()
            .flat_map(|p| p.drain_idle())
            .collect();
        let _ = glommio::timer::timeout(CLOSE_WAIT, async {
            for conn in conns {
                conn.terminate().await;
            }
            Ok(())
        })
        .await;
    }
}

/// The running shards, seen from the thread that started them.
pub struct Running {
    handles: Arc<Vec<ShardHandle>>,
    joins: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl Running {
    pub fn handles(&self) -> &Arc<Vec<ShardHandle>> {
        &self.handles
    }

    /// Asks every shard to stop accepting and drain.
    pub fn shutdown(&self) {
        for h in self.handles.iter() {
            let _ = h.send(ShardMsg::Shutdown);
        }
    }

    /// Waits for every shard to finish; reports executors that failed.
    pub fn join(self) -> Result<(), String> {
        let mut errors = Vec::new();
        for (i, j) in self.joins.into_iter().enumerate() {
            if let Err(e) = j.join() {
                errors.push(format!("shard {i}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// Starts the shards and returns once each has bound its listeners (or one failed).
pub fn start(config: Arc<Config>) -> io::Result<Running> {
    let n = config.proxy.shards.max(1);
    let cpus = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    let mut handles = Vec::with_capacity(n);
    let mut inboxes = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = crossbeam_channel::bounded(INBOX_CAPACITY);
        let (wake_tx, wake_rx) = StdUnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        handles.push(ShardHandle {
            tx,
            wake: Arc::new(wake_tx),
        });
        inboxes.push((rx, wake_rx));
    }
    let handles = Arc::new(handles);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut joins = Vec::with_capacity(n);
    for (id, (rx, wake_rx)) in inboxes.into_iter().enumerate() {
        // SUPAVISOR_UNPINNED: an experiment knob for small benchmark machines,
        // where pgbench and PostgreSQL share the cores a pinned shard waits on.
        let placement = if n <= cpus && std::env::var_os("SUPAVISOR_UNPINNED").is_none() {
            Placement::Fixed(id)
        } else {
            Placement::Unbound
        };
        let config = config.clone();
        let peers = handles.clone();
        let ready = ready_tx.clone();
        let pinned = matches!(placement, Placement::Fixed(_));
        let mut builder = LocalExecutorBuilder::new(placement).name(&format!("shard-{id}"));
        if !config.proxy.spin_before_park.is_zero() {
            if pinned {
                builder = builder.spin_before_park(config.proxy.spin_before_park);
            } else if id == 0 {
                warn!(
                    "proxy.spin_before_park_us is ignored: shards are not pinned (more shards than cores, or SUPAVISOR_UNPINNED)"
                );
            }
        }
        let join = builder
            .spawn(move || async move {
                let wake_fd = wake_rx.into_raw_fd();
                shard_main(id, config, peers, rx, wake_fd, ready).await
            })
            .map_err(|e| io::Error::other(format!("starting shard {id}: {e}")))?;
        joins.push(join);
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(io::Error::other(e)),
            Err(_) => {
                // A shard died before reporting: its executor failed to start
                // (for example glommio's MemLockLimit); join tells why.
                let running = Running { handles, joins };
                let why = running.join().err().unwrap_or_default();
                return Err(io::Error::other(format!("a shard failed to start: {why}")));
            }
        }
    }
    Ok(Running { handles, joins })
}

/// How often the lag probe wakes, and how late it may wake before the
/// executor counts as stalled (a task that did not yield in time).
const LAG_PROBE: Duration = Duration::from_millis(50);
const STALL_LATENESS: Duration = Duration::from_millis(10);

/// How often a shard's periodic checks that have nothing to do wake: the
/// lag probe of a shard without clients, the fencing of a node without a
/// cluster. An idle shard wakes a few times a second, not 20.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Measures the executor's lag: a timer that wakes late means something
/// kept the executor busy. A shard without clients has nobody to stall and
/// is probed only every [`IDLE_CHECK`], uncounted.
async fn lag_probe(shard: Rc<Shard>) {
    loop {
        if shard.clients.borrow().is_empty() {
            glommio::timer::sleep(IDLE_CHECK).await;
            continue;
        }
        let start = Instant::now();
        glommio::timer::sleep(LAG_PROBE).await;
        if start.elapsed() > LAG_PROBE + STALL_LATENESS {
            crate::metrics::bump(&shard.stalls, 1);
        }
    }
}

async fn shard_main(
    id: usize,
    config: Arc<Config>,
    peers: Arc<Vec<ShardHandle>>,
    rx: crossbeam_channel::Receiver<ShardMsg>,
    wake_fd: i32,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let backlog = config.proxy.listen_backlog;
    // Client listeners defer their accepts as long as a client may take to
    // start up; the node-to-node proxy listener does not defer.
    let defer = config.proxy.tcp_defer_accept.then(|| {
        let ms = config.proxy.client_startup_timeout.as_millis();
        u32::try_from(ms.div_ceil(1000).max(1)).unwrap_or(u32::MAX)
    });
    let bind_with = |addr: SocketAddr, defer: Option<u32>| {
        bind_listener(addr, backlog, defer)
            .map_err(|e| format!("shard {id}: cannot listen on {addr}: {e}"))
    };
    let bind = |addr: SocketAddr| bind_with(addr, defer);
    let listeners =
        bind(config.proxy.session_addr).and_then(|s| Ok((s, bind(config.proxy.transaction_addr)?)));
    let (session, transaction) = match listeners {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let proxy_link = match config
        .proxy
        .proxy_addr
        .map(|a| bind_with(a, None))
        .transpose()
    {
        Ok(l) => l.map(Rc::new),
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let websocket = match config.proxy.websocket_addr.map(bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let shard = Rc::new(Shard {
        id,
        config: RefCell::new(config.clone()),
        fence_kick: glommio::sync::Semaphore::new(0),
        peers,
        pools: RefCell::new(HashMap::new()),
        failed_joins: RefCell::new(HashMap::new()),
        auth_cache: RefCell::new(HashMap::new()),
        handoffs_in: Cell::new(0),
        handoffs_out: Cell::new(0),
        tasks_spawned: Cell::new(0),
        refused: Cell::new(0),
        stalls: Cell::new(0),
        parked: Cell::new(0),
        clients: RefCell::new(HashMap::new()),
        next_pid: Cell::new(1),
        scratch: RefCell::new(vec![0; SCRATCH_LEN]),
        draining: Cell::new(false),
        timed_clients: Cell::new(0),
        login_failures: RefCell::new(HashMap::new()),
        connections: Cell::new(0),
        claims: RefCell::new(HashMap::new()),
        next_token: Cell::new(1),
        links: RefCell::new(HashMap::new()),
        websocket: Default::default(),
        replica_sets: RefCell::new(HashMap::new()),
        paused: RefCell::new(HashSet::new()),
        console_calls: RefCell::new(HashMap::new()),
        parking: crate::park::Parking::new()
            .map_err(|e| warn!(shard = id, error = %e, "no epoll set: idle clients will not park"))
            .ok(),
    });
    let mut accepting = Vec::with_capacity(3);
    let listeners = [
        Some((session, Listen::Pg(PoolMode::Session))),
        Some((transaction, Listen::Pg(PoolMode::Transaction))),
        websocket.map(|l| (l, Listen::WebSocket)),
    ];
    for (listener, kind) in listeners.into_iter().flatten() {
        let listener = Rc::new(listener);
        let task = glommio::spawn_local(accept_loop(shard.clone(), listener.clone(), kind));
        accepting.push((task, listener, kind));
    }
    let mut peer_link = proxy_link
        .as_ref()
        .map(|l| glommio::spawn_local(peer_accept_loop(shard.clone(), l.clone())));
    let probe = glommio::spawn_local(lag_probe(shard.clone()));
    let replica_health = glommio::spawn_local(crate::replica::health_loop(shard.clone()));
    let sweep = glommio::spawn_local({
        let shard = shard.clone();
        async move {
            loop {
                glommio::timer::sleep(TIMEOUT_SWEEP).await;
                shard.sweep_timeouts();
            }
        }
    });
    let parks = glommio::spawn_local({
        let shard = shard.clone();
        async move {
            loop {
                // Half the setting: a client parks after being idle between
                // half of `client_park_after` and all of it.
                let after = shard.config().proxy.client_park_after;
                let period = (after / 2).max(Duration::from_millis(10));
                glommio::timer::sleep(if after.is_zero() {
                    TIMEOUT_SWEEP
                } else {
                    period
                })
                .await;
                if !shard.config().proxy.client_park_after.is_zero() {
                    shard.sweep_parks();
                }
            }
        }
    });
    let resumer = shard
        .parking
        .as_ref()
        .map(|_| glommio::spawn_local(crate::park::resume_loop(shard.clone())));
    let fencing = glommio::spawn_local({
        let shard = shard.clone();
        async move {
            loop {
                // Without a cluster there is nothing to fence: the loop
                // sleeps until a cluster forms (or IDLE_CHECK passes).
                if shard.config.borrow().cluster.is_some() {
                    glommio::timer::sleep(FENCE_CHECK).await;
                } else {
                    futures_lite::future::or(glommio::timer::sleep(IDLE_CHECK), async {
                        let _ = shard.fence_kick.acquire(1).await;
                    })
                    .await;
                }
                shard.fence();
            }
        }
    });
    let _ = ready.send(Ok(()));
    drop(ready);
    info!(shard = id, "shard ready");

    // SAFETY: the fd came from a UnixStream we own and gave up.
    let mut wake = unsafe { UnixStream::from_raw_fd(wake_fd) };
    let mut sink = [0u8; 64];
    'inbox: loop {
        match wake.read(&mut sink).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        while let Ok(msg) = rx.try_recv() {
            match msg {
                ShardMsg::Handoff(h) => {
                    let h = *h;
                    // SAFETY: the fd is a connected TCP socket handed over by its owner.
                    let tcp = unsafe { TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
                    let stream = Stream::assemble(tcp, h.tls, h.ws, &shard.websocket.open);
                    crate::metrics::bump(&shard.handoffs_in, 1);
                    crate::client::spawn(
                        &shard,
                        Box::new(crate::client::Admitted {
                            stream,
                            msg: h.startup,
                            ident: h.ident,
                            leftover: h.leftover,
                            mode: h.mode,
                            peer: h.peer,
                            cleartext: h.cleartext,
                        }),
                    );
                }
                ShardMsg::Cancel {
                    process_id,
                    secret,
                    done,
                } => shard.cancel(process_id, &secret, done),
                ShardMsg::Config(config) => shard.apply_config(config),
                ShardMsg::Terminate { tenant } => shard.terminate_tenant(&tenant),
                ShardMsg::Snapshot(reply) => {
                    let _ = reply.try_send(shard.snapshot());
                }
                ShardMsg::Barrier(reply) => {
                    let _ = reply.try_send(shard.id);
                }
                ShardMsg::Connections(reply) => {
                    let _ = reply.try_send(shard.connections.get());
                }
                ShardMsg::Handover => {
                    let mut taken = 0;
                    for (task, listener, kind) in accepting.drain(..) {
                        task.cancel().await;
                        taken += take_backlog(&shard, &listener, kind);
                        // The accept task is gone: this was the last reference
                        // and the listener closes here.
                        drop(listener);
                    }
                    if let Some(task) = peer_link.take() {
                        task.cancel().await;
                    }
                    info!(
                        shard = id,
                        from_backlog = taken,
                        clients = shard.connections.get(),
                        "handover: listeners closed, serving the connected clients until they leave"
                    );
                }
                ShardMsg::Shutdown => break 'inbox,
                ShardMsg::Claimed { token, owner } => {
                    if let Some(tx) = shard.claims.borrow_mut().remove(&token) {
                        let _ = tx.send(owner);
                    }
                }
                ShardMsg::Inspect(reply) => {
                    let _ = reply.try_send(shard.inspect());
                }
                ShardMsg::Pause { tenant, reply } => {
                    let s = shard.clone();
                    shard.spawn(async move {
                        let busy = s.pause_tenant(&tenant).await;
                        let _ = reply.try_send(busy);
                    });
                }
                ShardMsg::Resume { tenant, reply } => {
                    let _ = reply.try_send(shard.resume_tenant(&tenant));
                }
                ShardMsg::Console { token, reply } => {
                    if let Some(tx) = shard.console_calls.borrow_mut().remove(&token) {
                        let _ = tx.send(*reply);
                    }
                }
            }
        }
    }

    // Shutdown: stop accepting, let transactions finish, then go.
    for (task, _, _) in accepting.drain(..) {
        task.cancel().await;
    }
    if let Some(task) = peer_link.take() {
        task.cancel().await;
    }
    drop(proxy_link);
    probe.cancel().await;
    replica_health.cancel().await;
    sweep.cancel().await;
    parks.cancel().await;
    fencing.cancel().await;
    // Parked clients hear the drain through the resumer, which runs on.
    shard.begin_shutdown();
    let deadline = Instant::now() + shard.config().proxy.shutdown_timeout;
    while shard.client_count() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if let Some(task) = resumer {
        task.cancel().await;
    }
    shard.close_pools().await;
    info!(shard = id, left = shard.client_count(), "shard stopped");
}

/// What a client listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listen {
    /// The PostgreSQL protocol, in this pool mode.
    Pg(PoolMode),
    /// WebSocket clients (each upgrade names its mode).
    WebSocket,
}

/// Starts the first moments of an accepted connection, counted.
fn spawn_handle(shard: &Rc<Shard>, stream: TcpStream, kind: Listen) {
    let guard = ConnGuard::new(shard);
    shard.spawn(async move {
        match kind {
            Listen::Pg(mode) => crate::accept::handle(guard.0.clone(), stream, mode).await,
            Listen::WebSocket => crate::websocket::upgrade::handle(guard.0.clone(), stream).await,
        }
        drop(guard);
    });
}

/// A listener like glommio's own `TcpListener::bind` (SO_REUSEPORT, so that
/// every shard, and a second process during a graceful restart, can bind the
/// same port) but with our `listen()` backlog; glommio's is fixed at 1024.
/// With `defer_accept` (seconds), TCP_DEFER_ACCEPT: see [`set_defer_accept`].
/// Returns the listener and its fd (still owned by the listener).
fn bind_listener(
    addr: SocketAddr,
    backlog: u32,
    defer_accept: Option<u32>,
) -> io::Result<(TcpListener, RawFd)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY from their listener (Linux): no
    // setsockopt per client.
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    if let Some(secs) = defer_accept {
        set_defer_accept(&sock, secs)?;
    }
    let fd = sock.into_raw_fd();
    // SAFETY: a bound, listening TCP socket whose ownership we hand over.
    Ok((unsafe { TcpListener::from_raw_fd(fd) }, fd))
}

/// TCP_DEFER_ACCEPT on a listener of a protocol whose client speaks first
/// (PostgreSQL's startup or SSLRequest, a WebSocket's HTTP upgrade): the
/// kernel completes the accept only when the client's first bytes are there,
/// so the accept and the first read are one wake-up of the shard instead of
/// two, and a connection that never sends (a TCP health check, a port scan)
/// never reaches the pooler. After `secs` (rounded up by the kernel to its
/// SYN-ACK retransmission steps) a silent connection is accepted anyway and
/// the pooler's own startup timeout closes it. PgBouncer sets it by default
/// on Linux too.
fn set_defer_accept(sock: &socket2::Socket, secs: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let secs = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a socket we own, with a c_int option value whose
    // size we pass.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            &secs as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Accepts, without waiting, every connection already queued in a listener's
/// backlog (the kernel would reset them when the listener closes) and starts
/// them. Returns how many were taken.
fn take_backlog(shard: &Rc<Shard>, listener: &(TcpListener, RawFd), kind: Listen) -> usize {
    let fd = listener.1;
    // SAFETY: fcntl on the listener's fd, which is open while `listener` lives.
    let nonblocking = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !nonblocking {
        warn!(
            shard = shard.id,
            "handover: cannot make the listener non-blocking"
        );
        return 0;
    }
    let mut taken = 0;
    loop {
        // SAFETY: accept on an open listener; the new fd is owned by the stream.
        let conn = unsafe { libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut()) };
        if conn < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => break,
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                _ => {
                    warn!(shard = shard.id, error = %e, "handover: accept failed");
                    break;
                }
            }
        }
        // SAFETY: a connected TCP socket we just accepted; glommio's own
        // accepted sockets are blocking fds too (it sends with MSG_DONTWAIT
        // and waits through io_uring).
        let stream = unsafe { TcpStream::from_raw_fd(conn) };
        spawn_handle(shard, stream, kind);
        taken += 1;
    }
    taken
}

/// Accepts proxy links from other nodes of the cluster.
async fn peer_accept_loop(shard: Rc<Shard>, listener: Rc<(TcpListener, RawFd)>) {
    loop {
        match listener.0.accept().await {
            Ok(stream) => {
                let guard = ConnGuard::new(&shard);
                shard.spawn(async move {
                    crate::cluster::accept_peer(guard.0.clone(), stream).await;
                    drop(guard);
                });
            }
            Err(e) => {
                warn!(shard = shard.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn accept_loop(shard: Rc<Shard>, listener: Rc<(TcpListener, RawFd)>, kind: Listen) {
    loop {
        match listener.0.accept().await {
            Ok(stream) => spawn_handle(&shard, stream, kind),
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!(shard = shard.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
