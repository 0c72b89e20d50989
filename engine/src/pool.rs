//! A pool of server connections for one (tenant, db user, mode) on one shard.
//! Idle connections are reused last-in first-out; waiters queue first-in
//! first-out. Everything is single-threaded: `Rc` and `Cell`, no locks.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::timer::Timer;

use crate::config::{FetchedSecret, PoolMode, ReplicaConfig, TenantConfig, UserAuth, UserConfig};
use crate::error::{EngineError, Refusal};
use crate::metrics::bump;
use crate::metrics::{PoolSnapshot, PoolStats};
use crate::oneshot;
use crate::prepared::Registry;
use crate::server::{Endpoint, ServerConn, ServerLogin, ServerMeta};

/// A checkout waiting for a connection.
struct Waiter {
    deadline: Instant,
    tx: oneshot::Sender<Option<Box<ServerConn>>>,
}

/// How long a login may take for a new server connection.
/// Pauses between attempts to reach a database that is down.
const RECONNECT_PAUSE_MIN: Duration = Duration::from_millis(50);
const RECONNECT_PAUSE_MAX: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A replica that does not answer this fast is banned (its clients go to
/// the other replicas or to the primary instead of waiting).
const REPLICA_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a reset (ROLLBACK / DISCARD ALL) may take before the connection is closed.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub tenant: String,
    pub user: String,
    pub mode: PoolMode,
    /// A read replica's pool: the replica's name (`host:port`); `None`: the
    /// tenant's primary database. Clients belong to the primary's pool and
    /// borrow server connections from replica pools of the same key.
    pub replica: Option<String>,
}

impl PoolKey {
    /// The pool of (tenant, user, mode) on the primary database.
    pub fn primary(tenant: &str, user: &str, mode: PoolMode) -> PoolKey {
        PoolKey {
            tenant: tenant.to_string(),
            user: user.to_string(),
            mode,
            replica: None,
        }
    }

    /// The same (tenant, user, mode) on a replica.
    pub fn on_replica(&self, replica: &str) -> PoolKey {
        PoolKey {
            replica: Some(replica.to_string()),
            ..self.clone()
        }
    }
}

pub struct Pool {
    /// Shared with the control block of each of its clients.
    pub key: Rc<PoolKey>,
    tenant: RefCell<Arc<TenantConfig>>,
    user: RefCell<Arc<UserConfig>>,
    /// The replica this pool connects to (`key.replica`), else the primary.
    replica: RefCell<Option<ReplicaConfig>>,
    /// PAUSE (admin console): no checkout until RESUME; connections given
    /// back close.
    paused: Cell<bool>,
    /// Every server connection of the pool, for the admin console.
    servers: RefCell<Vec<std::rc::Weak<ServerMeta>>>,
    /// Bumped when the database address changes: older connections retire.
    generation: Cell<u64>,
    /// Set when the pool is dropped from its shard: connections given back close.
    retired: Cell<bool>,
    /// Set when retired by fencing: what a client still asking for a
    /// connection is told (else "shutting down").
    fenced: Cell<bool>,
    pub stats: PoolStats,
    /// Named statements of the pool's clients, by query text (transaction mode).
    pub statements: RefCell<Registry>,
    // Boxed so that a checkout moves a pointer into the client's PooledConn.
    #[allow(clippy::vec_box)]
    idle: RefCell<Vec<Box<ServerConn>>>,
    /// Connections that exist or are being opened, idle or not.
    total: Cell<usize>,
    /// Waiters get a connection, or `None`: "a slot is free, try again"
    /// (or "your time is up", from the timeout keeper).
    waiters: RefCell<VecDeque<Waiter>>,
    /// The waiters' timeout keeper: which one is current, and when it
    /// wakes next (see [`Pool::keep_timeouts`]).
    keeper: Cell<(u64, Option<Instant>)>,
    clients: Cell<usize>,
    /// ParameterStatus frames of the first server connection, replayed at login.
    params: RefCell<Option<Bytes>>,
    /// For users verified through auth_query with SCRAM: the ClientKey from
    /// the latest client proof, with which the pool logs into PostgreSQL.
    client_key: Cell<Option<[u8; 32]>>,
}

/// A checked-out connection. Dropping it (instead of [`Pool::checkin`])
/// frees its slot: the connection is closed.
pub struct PooledConn {
    /// Boxed: a client holds an `Option<PooledConn>` in its task for its
    /// whole life, idle or not, so it should cost a pointer, not a connection.
    conn: Option<Box<ServerConn>>,
    pool: Rc<Pool>,
}

impl Deref for PooledConn {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .expect("PooledConn holds a connection until consumed")
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("PooledConn holds a connection until consumed")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.pool.release_slot();
        }
    }
}

impl PooledConn {
    pub fn pool(&self) -> &Rc<Pool> {
        &self.pool
    }

    /// [`Pool::checkin`] to the pool it came from (a client's server
    /// connection may come from a replica's pool).
    pub fn give_back(self) {
        let pool = self.pool.clone();
        pool.checkin(self);
    }
}

/// Counts a client of the pool for `max_clients`; dropping it uncounts.
pub struct ClientSlot {
    pool: Rc<Pool>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.pool.clients.set(self.pool.clients.get() - 1);
    }
}

impl Pool {
    pub fn new(key: PoolKey, tenant: Arc<TenantConfig>, user: Arc<UserConfig>) -> Rc<Pool> {
        Self::with_replica(key, tenant, user, None)
    }

    /// A pool on `replica` (`key.replica` names it), or on the primary.
    pub fn with_replica(
        key: PoolKey,
        tenant: Arc<TenantConfig>,
        user: Arc<UserConfig>,
        replica: Option<ReplicaConfig>,
    ) -> Rc<Pool> {
        Rc::new(Pool {
            key: Rc::new(key),
            tenant: RefCell::new(tenant),
            user: RefCell::new(user),
            replica: RefCell::new(replica),
            paused: Cell::new(false),
            servers: RefCell::new(Vec::new()),
            generation: Cell::new(0),
            retired: Cell::new(false),
            fenced: Cell::new(false),
            stats: PoolStats::default(),
            statements: RefCell::new(Registry::default()),
            idle: RefCell::new(Vec::new()),
            total: Cell::new(0),
            waiters: RefCell::new(VecDeque::new()),
            keeper: Cell::new((0, None)),
            clients: Cell::new(0),
            params: RefCell::new(None),
            client_key: Cell::new(None),
        })
    }

    pub fn tenant(&self) -> Arc<TenantConfig> {
        self.tenant.borrow().clone()
    }

    pub fn user(&self) -> Arc<UserConfig> {
        self.user.borrow().clone()
    }

    pub fn size(&self) -> usize {
        let size = match self.replica.borrow().as_ref().and_then(|r| r.pool_size) {
            Some(n) => n,
            None => self.user.borrow().pool_size,
        };
        size.max(1)
    }

    /// Where the pool's connections go.
    pub fn endpoint(&self) -> Endpoint {
        match self.replica.borrow().as_ref() {
            Some(r) => Endpoint {
                host: r.host.clone(),
                port: r.port,
                read_only: true,
            },
            None => Endpoint::primary(&self.tenant.borrow()),
        }
    }

    pub fn is_replica(&self) -> bool {
        self.key.replica.is_some()
    }

    /// PAUSE: checkouts wait (within their timeout) until [`Pool::resume`];
    /// idle connections close now, the others when given back.
    pub fn pause(&self) {
        self.paused.set(true);
        self.close_idle();
    }

    pub fn resume(&self) {
        if !self.paused.replace(false) {
            return;
        }
        for waiter in self.waiters.borrow_mut().drain(..) {
            let _ = waiter.tx.send(None);
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.get()
    }

    /// Server connections checked out (or being opened).
    pub fn busy_count(&self) -> usize {
        self.total.get().saturating_sub(self.idle.borrow().len())
    }

    /// Keeps a weak reference to a new connection's description (for
    /// [`Pool::servers`]); those of closed connections are dropped now and
    /// then, so the list stays about as long as the pool.
    fn remember(&self, meta: &Rc<ServerMeta>) {
        let mut servers = self.servers.borrow_mut();
        if servers.len() >= 2 * self.size() + 8 {
            servers.retain(|w| w.strong_count() > 0);
        }
        servers.push(Rc::downgrade(meta));
    }

    /// The pool's server connections and whether each is idle.
    pub fn servers(&self) -> Vec<(Rc<ServerMeta>, bool)> {
        let mut servers = self.servers.borrow_mut();
        servers.retain(|w| w.strong_count() > 0);
        let idle = self.idle.borrow();
        servers
            .iter()
            .filter_map(std::rc::Weak::upgrade)
            .map(|m| {
                let is_idle = idle.iter().any(|c| Rc::ptr_eq(&c.meta, &m));
                (m, is_idle)
            })
            .collect()
    }

    pub fn waiting_count(&self) -> usize {
        self.waiters
            .borrow()
            .iter()
            .filter(|w| !w.tx.is_closed())
            .count()
    }

    /// New settings for a running pool: resized at once (idle connections
    /// above the size close, waiters may open new ones), reconnected when the
    /// database address changed.
    pub fn update(&self, tenant: Arc<TenantConfig>, user: Arc<UserConfig>) {
        let replica = self.replica.borrow().clone();
        self.update_on(tenant, user, replica);
    }

    /// [`Pool::update`] with the replica's new settings (a replica pool).
    pub fn update_on(
        &self,
        tenant: Arc<TenantConfig>,
        user: Arc<UserConfig>,
        replica: Option<ReplicaConfig>,
    ) {
        let before = self.endpoint();
        let database = self.tenant.borrow().db_database != tenant.db_database;
        *self.tenant.borrow_mut() = tenant;
        *self.user.borrow_mut() = user;
        *self.replica.borrow_mut() = replica;
        let moved = database || self.endpoint() != before;
        if moved {
            self.generation.set(self.generation.get() + 1);
            *self.params.borrow_mut() = None;
            self.close_idle();
        }
        while self.total.get() > self.size() && !self.idle.borrow().is_empty() {
            if let Some(conn) = self.idle.borrow_mut().pop() {
                self.total.set(self.total.get() - 1);
                glommio::spawn_local(conn.terminate()).detach();
            }
        }
        // Room to grow: let waiters try to open connections.
        let mut free = self.size().saturating_sub(self.total.get());
        while free > 0 {
            let Some(waiter) = self.waiters.borrow_mut().pop_front() else {
                break;
            };
            if waiter.tx.send(None).is_ok() {
                free -= 1;
            }
        }
    }

    /// Records the ClientKey of a client that just proved it knows the password.
    pub fn set_client_key(&self, key: Option<[u8; 32]>) {
        if key.is_some() {
            self.client_key.set(key);
        }
    }

    /// A replica's pool logs in as its primary pool does: the same user
    /// settings (a secret auth_query fetched again) and the ClientKey its
    /// clients lent (SCRAM pass-through).
    pub fn follow(&self, primary: &Pool) {
        self.set_client_key(primary.client_key.get());
        let user = primary.user();
        if !Arc::ptr_eq(&self.user.borrow(), &user) {
            self.update_user(user);
        }
    }

    /// New settings for a user that came through auth_query (a changed secret).
    pub fn update_user(&self, user: Arc<UserConfig>) {
        *self.user.borrow_mut() = user;
    }

    /// The pool leaves its shard: idle connections close now, the others
    /// when given back.
    pub fn retire(&self) {
        self.retired.set(true);
        self.close_idle();
        for waiter in self.waiters.borrow_mut().drain(..) {
            let _ = waiter.tx.send(None);
        }
    }

    /// [`Pool::retire`] because this node may no longer serve the pool
    /// (cluster fencing): clients still waiting are told so (08006).
    pub fn retire_fenced(&self) {
        self.fenced.set(true);
        self.retire();
    }

    pub fn is_retired(&self) -> bool {
        self.retired.get()
    }

    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }

    pub fn total_count(&self) -> usize {
        self.total.get()
    }

    pub fn client_count(&self) -> usize {
        self.clients.get()
    }

    /// Admits one more client, or refuses with `53300`.
    pub fn join(self: &Rc<Self>) -> Result<ClientSlot, EngineError> {
        if self.clients.get() >= self.user.borrow().max_clients {
            return Err(EngineError::Refused(Refusal::TooManyClients {
                tenant: self.key.tenant.clone(),
                user: self.key.user.clone(),
            }));
        }
        self.clients.set(self.clients.get() + 1);
        Ok(ClientSlot { pool: self.clone() })
    }

    /// Whether [`Pool::login_params`] answers without a server connection.
    pub fn knows_login_params(&self) -> bool {
        self.params.borrow().is_some()
    }

    /// The ParameterStatus frames a new client receives; opens the pool's
    /// first connection to learn them if needed.
    pub async fn login_params(self: &Rc<Self>) -> Result<Bytes, EngineError> {
        if let Some(p) = self.params.borrow().clone() {
            return Ok(p);
        }
        let wait = self.user().checkout_timeout;
        let conn = self.checkout(wait).await?;
        let params = self.params.borrow().clone().unwrap_or_default();
        self.checkin(conn);
        Ok(params)
    }

    /// Takes a connection: an idle one, a new one while below `pool_size`, or
    /// the next one given back, waiting at most `wait`. While the database is
    /// unreachable (restarting, failing over) new connections are retried
    /// with a growing pause, up to the same deadline, so that clients wait
    /// for the database instead of failing.
    pub async fn checkout(self: &Rc<Self>, wait: Duration) -> Result<PooledConn, EngineError> {
        // Set when the first idle connection is missed: the common case reads no clock.
        let mut deadline = None;
        let mut pause = RECONNECT_PAUSE_MIN;
        loop {
            if let Some(c) = self.checkout_now() {
                return Ok(c);
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + wait);
            if self.retired.get() {
                return Err(EngineError::Refused(if self.fenced.get() {
                    Refusal::Cluster(crate::error::FENCED.to_string())
                } else {
                    Refusal::ShuttingDown
                }));
            }
            if self.paused.get() {
                // PAUSE: wait for RESUME (woken with "try again").
                let now = Instant::now();
                if now >= deadline {
                    return Err(EngineError::CheckoutTimeout(wait));
                }
                // A connection handed over meanwhile goes back to the pool.
                if let Some(Some(conn)) = self.wait_turn(deadline).await {
                    self.checkin(PooledConn {
                        conn: Some(conn),
                        pool: self.clone(),
                    });
                }
                continue;
            }
            if self.total.get() < self.size() {
                self.total.set(self.total.get() + 1);
                let (tenant, user) = (self.tenant(), self.user());
                let generation = self.generation.get();
                let login = match &user.auth {
                    UserAuth::Password { password, .. } => ServerLogin::Password(password),
                    UserAuth::Fetched(FetchedSecret::Md5(secret)) => ServerLogin::Md5Secret(secret),
                    UserAuth::Fetched(FetchedSecret::Scram(secret)) => {
                        match self.client_key.get() {
                            Some(client_key) => ServerLogin::ScramKey {
                                client_key,
                                server_key: secret.server_key,
                            },
                            None => {
                                self.release_slot();
                                return Err(EngineError::UnsupportedServerAuth(
                                    "no client has logged in yet to lend its SCRAM key".into(),
                                ));
                            }
                        }
                    }
                };
                let (endpoint, timeout) = match self.is_replica() {
                    true => (self.endpoint(), REPLICA_CONNECT_TIMEOUT),
                    false => (self.endpoint(), CONNECT_TIMEOUT),
                };
                match Box::pin(ServerConn::connect(
                    &tenant,
                    &endpoint,
                    &user.db_user,
                    login,
                    timeout,
                ))
                .await
                {
                    Ok(conn) => {
                        let mut conn = Box::new(conn);
                        conn.generation = generation;
                        self.remember(&conn.meta);
                        if self.params.borrow().is_none() {
                            *self.params.borrow_mut() = Some(conn.login_params.clone().freeze());
                        }
                        return Ok(PooledConn {
                            conn: Some(conn),
                            pool: self.clone(),
                        });
                    }
                    Err(e) => {
                        self.release_slot();
                        let now = Instant::now();
                        // A replica is not waited for: it is banned and
                        // its clients go elsewhere (see `replica`).
                        if !e.database_unavailable()
                            || now + pause >= deadline
                            || self.retired.get()
                            || self.is_replica()
                        {
                            return Err(e);
                        }
                        bump(&self.stats.reconnect_waits, 1);
                        tracing::debug!(tenant = %self.key.tenant, error = %e, ?pause, "database unavailable, retrying");
                        Timer::new(pause).await;
                        pause = (pause * 2).min(RECONNECT_PAUSE_MAX);
                        continue;
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(EngineError::CheckoutTimeout(wait));
            }
            if let Some(Some(conn)) = self.wait_turn(deadline).await {
                return Ok(PooledConn {
                    conn: Some(conn),
                    pool: self.clone(),
                });
            }
            // Woken with "slot free" or timed out: loop re-checks both.
        }
    }

    /// Queues a checkout until a connection or a free slot comes its way,
    /// or `deadline` passes (then it gets `None` from the timeout keeper).
    ///
    /// No timer per waiter: under load nearly every checkout waits, and a
    /// timer armed and cancelled per transaction cost more than the rest of
    /// the checkout. One keeper task per pool sleeps until the earliest
    /// deadline instead.
    fn wait_turn(self: &Rc<Self>, deadline: Instant) -> oneshot::Receiver<Option<Box<ServerConn>>> {
        let (tx, rx) = oneshot::channel();
        self.waiters.borrow_mut().push_back(Waiter { deadline, tx });
        let (generation, wakes) = self.keeper.get();
        if wakes.is_none_or(|at| at > deadline) {
            // No keeper, or one that wakes too late: a new one takes over
            // (the old one finds it is no longer current when it wakes).
            let generation = generation.wrapping_add(1);
            self.keeper.set((generation, Some(deadline)));
            glommio::spawn_local(Self::keep_timeouts(
                Rc::downgrade(self),
                generation,
                deadline,
            ))
            .detach();
        }
        rx
    }

    /// The timeout keeper: sleeps until the earliest waiter's deadline,
    /// sends `None` to the waiters whose time is up (by dropping their
    /// sender), and stops when no waiter is left.
    async fn keep_timeouts(pool: std::rc::Weak<Self>, generation: u64, mut at: Instant) {
        loop {
            Timer::new(at.saturating_duration_since(Instant::now())).await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            if pool.keeper.get().0 != generation {
                return;
            }
            let now = Instant::now();
            let (expired, next) = {
                let mut waiters = pool.waiters.borrow_mut();
                let (expired, kept): (VecDeque<Waiter>, VecDeque<Waiter>) = waiters
                    .drain(..)
                    .partition(|w| w.tx.is_closed() || w.deadline <= now);
                *waiters = kept;
                (expired, waiters.iter().map(|w| w.deadline).min())
            };
            // Dropped outside the borrow: each wakes its checkout.
            drop(expired);
            match next {
                Some(next) => {
                    pool.keeper.set((generation, Some(next)));
                    at = next;
                }
                None => {
                    pool.keeper.set((generation, None));
                    return;
                }
            }
        }
    }

    /// An idle connection at once, if there is one: what [`Pool::checkout`]
    /// first tries, without a future to poll.
    pub fn checkout_now(self: &Rc<Self>) -> Option<PooledConn> {
        self.take_idle().map(|conn| PooledConn {
            conn: Some(conn),
            pool: self.clone(),
        })
    }

    fn take_idle(&self) -> Option<Box<ServerConn>> {
        loop {
            let mut conn = self.idle.borrow_mut().pop()?;
            if conn.check_idle() {
                return Some(conn);
            }
            // Dead while idle: drop it, its slot frees.
            drop(conn);
            self.total.set(self.total.get() - 1);
        }
    }

    /// Gives a clean connection back: to the first live waiter, else to the
    /// idle stack.
    pub fn checkin(&self, mut pooled: PooledConn) {
        let Some(mut conn) = pooled.conn.take() else {
            return;
        };
        conn.buf.release_if_empty();
        conn.stream.arm_read();
        if !conn.is_clean()
            || self.retired.get()
            || self.paused.get()
            || conn.generation != self.generation.get()
            || self.total.get() > self.size()
        {
            drop(conn);
            self.release_slot();
            return;
        }
        loop {
            let Some(waiter) = self.waiters.borrow_mut().pop_front() else {
                break;
            };
            match waiter.tx.send(Some(conn)) {
                Ok(()) => return,
                Err(back) => conn = back.expect("sent Some"),
            }
        }
        self.idle.borrow_mut().push(conn);
    }

    /// A connection went away: its slot is free for a waiter to open a new one.
    fn release_slot(&self) {
        self.total.set(self.total.get() - 1);
        loop {
            let Some(waiter) = self.waiters.borrow_mut().pop_front() else {
                return;
            };
            if waiter.tx.send(None).is_ok() {
                return;
            }
        }
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let st = &self.stats;
        let idle = self.idle.borrow().len();
        PoolSnapshot {
            tenant: self.key.tenant.clone(),
            user: self.key.user.clone(),
            mode: self.key.mode.as_str(),
            replica: self.key.replica.clone(),
            paused: self.paused.get(),
            db_name: self.tenant.borrow().db_database.clone(),
            pool_size: self.size(),
            server_connections: self.total.get(),
            idle,
            checked_out: self.total.get().saturating_sub(idle),
            clients: self.clients.get(),
            waiting: self.waiting_count(),
            joins_ok: st.joins_ok.get(),
            joins_fail: st.joins_fail.get(),
            client_recv: st.client_recv.get(),
            client_send: st.client_send.get(),
            db_recv: st.db_recv.get(),
            db_send: st.db_send.get(),
            queries: st.queries.get(),
            prepared_hits: st.prepared_hits.get(),
            prepared_misses: st.prepared_misses.get(),
            prepared_evictions: st.prepared_evictions.get(),
            reconnect_waits: st.reconnect_waits.get(),
            query_duration: st.query_duration.snapshot(),
            checkout_duration: st.checkout_duration.snapshot(),
            client_connection_duration: st.client_connection_duration.snapshot(),
        }
    }

    /// Closes every idle connection (shutdown, tenant removed).
    pub fn close_idle(&self) {
        for conn in self.drain_idle() {
            glommio::spawn_local(conn.terminate()).detach();
        }
    }

    /// Takes the idle server connections out of the pool (for the caller to close).
    pub fn drain_idle(&self) -> Vec<Box<ServerConn>> {
        let conns: Vec<Box<ServerConn>> = self.idle.borrow_mut().drain(..).collect();
        self.total.set(self.total.get() - conns.len());
        conns
    }
}
