//! The configuration a shard works from: an immutable snapshot shared by all
//! shards (`Arc`), built and validated by the control plane.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use wire::scram::ScramSecret;

/// Pooling mode. The port a client connects to decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolMode {
    Transaction,
    Session,
}

impl PoolMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        }
    }
}

/// How clients authenticate to the pooler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    ScramSha256,
    Md5,
}

/// Listener and process-wide settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub session_addr: SocketAddr,
    pub transaction_addr: SocketAddr,
    /// Number of shards (executors); never 0 here.
    pub shards: usize,
    /// How long SIGTERM waits for running transactions.
    pub shutdown_timeout: Duration,
    /// A client that has not finished startup and authentication by then is closed.
    pub client_startup_timeout: Duration,
    /// A transaction-mode client idle this long is parked: its task and I/O
    /// state are freed and its socket waits in the shard's epoll set
    /// (`crate::park`). Zero: never.
    pub client_park_after: Duration,
    /// Client TLS: SSLRequest is answered with a handshake when set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `listen()` backlog of each shard's listeners (the kernel caps it at
    /// `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// The node-to-node proxy listener (cluster with pool ownership), bound
    /// by every shard like the client listeners.
    pub proxy_addr: Option<SocketAddr>,
    /// The WebSocket listener (PostgreSQL protocol in binary frames), when set.
    pub websocket_addr: Option<SocketAddr>,
    /// Plain (ws://) WebSocket clients from these addresses may log in with
    /// a cleartext password; wss:// clients always may.
    pub websocket_cleartext: Vec<Cidr>,
    /// How long an idle shard polls its ring, timers and inbox before it
    /// sleeps (glommio's `spin_before_park`). Zero (the default): it sleeps
    /// at once. Spinning turns the wake-up of a sleeping shard (an
    /// inter-processor interrupt and a context switch, 20-40 us in a VM)
    /// into a poll, for a cross-shard handoff or a request that arrives
    /// shortly after the last one, at the price of a core busy for that
    /// long after every burst of work. Only pinned shards spin (shards <=
    /// cores).
    pub spin_before_park: Duration,
    /// TCP_DEFER_ACCEPT on the client listeners (PostgreSQL and WebSocket),
    /// for as long as `client_startup_timeout`: a connection is accepted
    /// when its first bytes arrive, in one wake-up of the shard.
    pub tcp_defer_accept: bool,
}

/// A secret fetched through a tenant's `auth_query` (`pg_authid.rolpassword`).
#[derive(Clone, PartialEq, Eq)]
pub enum FetchedSecret {
    Scram(ScramSecret),
    /// "md5" + hex(md5(password + user))
    Md5(String),
}

/// How a user's logins are checked and how the pooler logs in as that user.
#[derive(Clone)]
pub enum UserAuth {
    /// A configured password: clients are verified against the SCRAM secret
    /// derived from it once; the pooler logs into PostgreSQL with the password.
    Password {
        password: String,
        scram: ScramSecret,
    },
    /// A secret from `auth_query`: clients are verified against it; the
    /// pooler logs in with the ClientKey recovered from a client's SCRAM proof
    /// (or with the md5 secret), never knowing the password.
    Fetched(FetchedSecret),
}

/// A database user of a tenant, with its pool settings and login secrets.
pub struct UserConfig {
    pub db_user: String,
    pub pool_size: usize,
    pub max_clients: usize,
    pub checkout_timeout: Duration,
    pub default_mode: PoolMode,
    pub auth: UserAuth,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("db_user", &self.db_user)
            .field("auth", &"<redacted>")
            .field("pool_size", &self.pool_size)
            .field("max_clients", &self.max_clients)
            .field("checkout_timeout", &self.checkout_timeout)
            .field("default_mode", &self.default_mode)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct TenantConfig {
    pub external_id: String,
    pub db_host: String,
    pub db_port: u16,
    pub db_database: String,
    pub client_auth: ClientAuth,
    pub users: HashMap<String, Arc<UserConfig>>,
    /// false: any database user may log in, verified through `auth_query`.
    pub require_user: bool,
    /// Run as `manager` with the user name as `$1`; returns (rolname, rolpassword).
    pub auth_query: String,
    /// The user `auth_query` runs as (a key of `users`).
    pub manager: Option<String>,
    /// Pool settings of users that come through `auth_query`.
    pub default_pool_size: usize,
    pub default_max_clients: usize,
    pub default_checkout_timeout: Duration,
    /// Refuse clients that did not negotiate TLS.
    pub enforce_ssl: bool,
    /// Clients whose TLS SNI host is this (lower case) reach this tenant.
    pub sni_hostname: Option<String>,
    /// TLS to the database, when set.
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
    /// Client addresses allowed in; empty: any.
    pub allow_list: Vec<Cidr>,
    pub timeouts: ClientTimeouts,
    /// Read replicas and how clients reach them.
    pub replication: Replication,
}

/// A read replica of a tenant's database (same database name, users and
/// passwords as the primary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    pub host: String,
    pub port: u16,
    /// Its share of the reads, relative to the other replicas' weights (0:
    /// none).
    pub weight: u32,
    /// Server connections of each user's pool on this replica; `None`: the
    /// user's `pool_size`.
    pub pool_size: Option<usize>,
}

impl ReplicaConfig {
    /// `host:port` (`[v6]:port`): how the replica is named in pools,
    /// metrics and the admin console.
    pub fn name(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A tenant's replicas and the routing to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replication {
    pub replicas: Vec<ReplicaConfig>,
    /// Transaction mode: a transaction whose first batch is plain reads
    /// goes to a replica (`load_balance = "reads"`).
    pub load_balance_reads: bool,
    /// A replica whose replay lags further behind is banned; zero: lag
    /// is not checked.
    pub max_lag: Duration,
    /// How long a failing replica gets no clients.
    pub ban: Duration,
}

/// Limits on what a client may hold, in milliseconds; 0 = none. Checked
/// about once a second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// A client with no transaction open is closed after this long (57P05).
    pub client_idle_ms: u32,
    /// A client idle inside a transaction is closed after this long and its
    /// transaction rolled back (25P03).
    pub idle_transaction_ms: u32,
    /// A query running longer is cancelled (57014).
    pub query_ms: u32,
}

impl ClientTimeouts {
    pub fn is_off(&self) -> bool {
        self.client_idle_ms == 0 && self.idle_transaction_ms == 0 && self.query_ms == 0
    }
}

impl TenantConfig {
    /// May a client from `addr` use this tenant?
    pub fn allows(&self, addr: Option<std::net::IpAddr>) -> bool {
        if self.allow_list.is_empty() {
            return true;
        }
        match addr {
            Some(ip) => self.allow_list.iter().any(|c| c.contains(ip)),
            None => false,
        }
    }
}

/// An address block: `10.0.0.0/8`, `::1/128`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr.trim().parse().map_err(|e| format!("{s}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s}: bad prefix length"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl TenantConfig {
    /// Settings for a user found through `auth_query`.
    pub fn fetched_user(&self, db_user: &str, secret: FetchedSecret) -> UserConfig {
        UserConfig {
            db_user: db_user.to_string(),
            pool_size: self.default_pool_size,
            max_clients: self.default_max_clients,
            checkout_timeout: self.default_checkout_timeout,
            default_mode: PoolMode::Transaction,
            auth: UserAuth::Fetched(secret),
        }
    }
}

/// Everything the data plane needs, shared read-only by the shards.
#[derive(Debug)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub tenants: HashMap<String, Arc<TenantConfig>>,
    /// SNI host name (lower case) -> tenant id.
    sni: HashMap<String, String>,
    /// Pool ownership across the cluster (more than one node), else `None`.
    pub cluster: Option<Arc<ClusterView>>,
    /// A clustered node's first snapshot, published before its claims are:
    /// clients wait for the next snapshot instead of opening a pool that
    /// another node may own.
    pub cluster_pending: bool,
    /// The admin console (`user.supavisor`), when the control plane offers it.
    pub console: Option<Arc<dyn ConsoleHooks>>,
}

/// What the control plane does for the admin console (see `crate::console`).
pub trait ConsoleHooks: Send + Sync {
    /// Whether `password` (an API token) admits a client to the console.
    fn admit(&self, password: &str) -> bool;
    /// Runs a console command; the answer comes back to shard `shard` as
    /// `ShardMsg::Console { token, answer }`.
    fn run(&self, command: crate::console::Command, shard: usize, token: u64);
}

/// What the control plane does for the shards in a cluster.
pub trait ClusterHooks: Send + Sync {
    /// Claim pool `key` for this node; the answer comes back to shard `shard`
    /// as `ShardMsg::Claimed { token, owner }` (`None`: the claim failed).
    fn claim(&self, key: String, shard: usize, token: u64);
    /// Whether this node may serve the pools it owns (its liveness lease).
    fn lease_valid(&self) -> bool;
}

/// The cluster as the shards see it, rebuilt with every applied log entry.
pub struct ClusterView {
    /// This node's id.
    pub self_node: u64,
    /// Pool key (`tenant/db_user/mode`) -> owning node.
    pub owners: HashMap<String, u64>,
    /// Node id -> its node-to-node proxy address.
    pub proxies: HashMap<u64, SocketAddr>,
    /// The cluster secret that authenticates proxy links.
    pub secret: Arc<[u8]>,
    pub hooks: Arc<dyn ClusterHooks>,
}

impl fmt::Debug for dyn ConsoleHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConsoleHooks")
    }
}

impl fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterView")
            .field("self_node", &self.self_node)
            .field("owners", &self.owners)
            .field("proxies", &self.proxies)
            .finish_non_exhaustive()
    }
}

/// The cluster-wide key of a pool.
pub fn pool_key(tenant: &str, db_user: &str, mode: PoolMode) -> String {
    format!("{tenant}/{db_user}/{}", mode.as_str())
}

impl Config {
    pub fn new(proxy: ProxyConfig, tenants: HashMap<String, Arc<TenantConfig>>) -> Config {
        let sni = tenants
            .values()
            .filter_map(|t| {
                let host = t.sni_hostname.as_ref()?;
                Some((host.to_ascii_lowercase(), t.external_id.clone()))
            })
            .collect();
        Config {
            proxy,
            tenants,
            sni,
            cluster: None,
            cluster_pending: false,
            console: None,
        }
    }

    /// This configuration with the admin console's hooks.
    pub fn with_console(mut self, console: Option<Arc<dyn ConsoleHooks>>) -> Config {
        self.console = console;
        self
    }

    /// This configuration marked as waiting for its cluster view (see
    /// [`Config::cluster_pending`]); any later snapshot clears it.
    pub fn awaiting_cluster(mut self, pending: bool) -> Config {
        self.cluster_pending = pending;
        self
    }

    /// This configuration with a cluster view.
    pub fn with_cluster(mut self, cluster: Option<Arc<ClusterView>>) -> Config {
        self.cluster = cluster;
        self
    }

    pub fn tenant(&self, id: &str) -> Option<&Arc<TenantConfig>> {
        self.tenants.get(id)
    }

    /// The tenant a TLS client reaches by its SNI host name: the tenant
    /// whose `sni_hostname` it is, else the tenant named by its first label
    /// (`t1.db.example.com` -> `t1`).
    pub fn tenant_by_sni(&self, host: &str) -> Option<&str> {
        let host = host.to_ascii_lowercase();
        if let Some(id) = self.sni.get(&host) {
            return Some(id);
        }
        let label = host.split('.').next()?;
        self.tenants.get_key_value(label).map(|(id, _)| id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Cidr;

    #[test]
    fn cidrs() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }
}
