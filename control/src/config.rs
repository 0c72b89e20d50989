//! The TOML configuration file, validated into the engine's snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use engine::config::{
    ClientAuth, Config, PoolMode, ProxyConfig, TenantConfig, UserAuth, UserConfig,
};
use std::sync::Mutex;
use wire::scram::ScramSecret;

use crate::model::{self, TenantSpec};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// `[proxy]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyFile {
    pub session_addr: SocketAddr,
    pub transaction_addr: SocketAddr,
    /// 0 = one shard per core.
    pub shards: usize,
    /// Milliseconds SIGTERM waits for running transactions.
    pub shutdown_timeout: u64,
    /// Milliseconds a client may take to finish startup and authentication.
    pub client_startup_timeout: u64,
    /// Milliseconds a transaction-mode client stays idle before it is
    /// parked (its task and I/O state freed until it sends again); 0: never.
    pub client_park_after: u64,
    /// `listen()` backlog per shard and port; the kernel caps it at
    /// `net.core.somaxconn`.
    pub listen_backlog: u32,
    /// The WebSocket listener; `""` turns it off.
    pub websocket_addr: String,
    /// Plain ws:// clients from these addresses (CIDRs) may log in with a
    /// cleartext password; wss:// clients always may.
    pub websocket_cleartext_allow: Vec<String>,
    /// Microseconds an idle shard polls before it sleeps; 0 (default): it
    /// sleeps at once. See `engine::ProxyConfig::spin_before_park`.
    pub spin_before_park_us: u64,
    /// TCP_DEFER_ACCEPT on the client listeners (default on): the kernel
    /// hands a connection over when its first bytes arrive, or after
    /// `client_startup_timeout`. See `engine::ProxyConfig::tcp_defer_accept`.
    pub tcp_defer_accept: bool,
}

impl Default for ProxyFile {
    fn default() -> Self {
        ProxyFile {
            session_addr: "0.0.0.0:5432".parse().expect("literal address"),
            transaction_addr: "0.0.0.0:6543".parse().expect("literal address"),
            shards: 0,
            shutdown_timeout: 10_000,
            client_startup_timeout: 10_000,
            client_park_after: 1_000,
            listen_backlog: 4096,
            websocket_addr: "0.0.0.0:4001".into(),
            websocket_cleartext_allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
            spin_before_park_us: 0,
            tcp_defer_accept: true,
        }
    }
}

/// `[[tenants]]`: a tenant seeded into the store at start: the API's tenant
/// JSON (`TenantSpec`, same fields, defaults and checks) plus its id.
#[derive(Debug, Clone, Default)]
pub struct TenantFile {
    pub external_id: String,
    pub spec: TenantSpec,
}

impl<'de> Deserialize<'de> for TenantFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let external_id = match table.remove("external_id") {
            Some(toml::Value::String(id)) => id,
            Some(_) => return Err(D::Error::custom("external_id must be a string")),
            None => return Err(D::Error::missing_field("external_id")),
        };
        let spec = TenantSpec::deserialize(toml::Value::Table(table))
            .map_err(|e| D::Error::custom(format!("tenant {external_id:?}: {e}")))?;
        Ok(TenantFile { external_id, spec })
    }
}

impl TenantFile {
    pub fn to_spec(&self) -> (String, TenantSpec) {
        (self.external_id.clone(), self.spec.clone())
    }
}

/// `[api]`: the HTTP API and metrics.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiFile {
    /// Where the HTTP API and /metrics listen.
    pub addr: SocketAddr,
    /// HS256 secret of API tokens; `API_JWT_SECRET` overrides it.
    pub jwt_secret: Option<String>,
    /// HS256 secret of metrics tokens; `METRICS_JWT_SECRET` overrides it.
    pub metrics_jwt_secret: Option<String>,
}

impl Default for ApiFile {
    fn default() -> Self {
        ApiFile {
            addr: "0.0.0.0:4000".parse().expect("literal address"),
            jwt_secret: None,
            metrics_jwt_secret: None,
        }
    }
}

impl std::fmt::Debug for ApiFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiFile")
            .field("addr", &self.addr)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "metrics_jwt_secret",
                &self.metrics_jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// `[store]`: where tenants are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreFile {
    pub path: std::path::PathBuf,
}

impl Default for StoreFile {
    fn default() -> Self {
        StoreFile {
            path: "./data".into(),
        }
    }
}

/// `[tls]`: client TLS. With both set, SSLRequest gets a handshake.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

/// `[cluster]`: this node's place in a raft group. Without the section the
/// node is a group of one (node 1) whose raft listener is on a loopback
/// ephemeral port with a random secret: the same code path, reachable by
/// no one.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// Unique in the group and stable across restarts.
    pub node_id: u64,
    /// host:port the raft (node-to-node) listener binds.
    pub addr: String,
    /// host:port other nodes reach this one at (default: the bound
    /// address). Recorded in the membership: keep it stable.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Static initial voters, `[[id, "host:port"], ...]`: the lowest id
    /// initializes the group once, the others wait to be contacted.
    #[serde(default)]
    pub peers: Vec<(u64, String)>,
    /// Address of a member to join through (when not a member yet).
    #[serde(default)]
    pub join: Option<String>,
    /// With `join`: become a voter (else stay a learner).
    #[serde(default = "model::default_true")]
    pub join_as_voter: bool,
    /// Shared secret of node-to-node messages (at least 8 bytes);
    /// `CLUSTER_SECRET` overrides it.
    #[serde(default)]
    pub secret: Option<String>,
    /// How often a node heartbeats the leader (milliseconds).
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// How long a silent node keeps its pool claims (milliseconds).
    #[serde(default = "default_claim_timeout_ms")]
    pub claim_timeout_ms: u64,
}

fn default_heartbeat_ms() -> u64 {
    500
}
fn default_claim_timeout_ms() -> u64 {
    3000
}

impl std::fmt::Debug for ClusterFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterFile")
            .field("node_id", &self.node_id)
            .field("addr", &self.addr)
            .field("advertise", &self.advertise)
            .field("peers", &self.peers)
            .field("join", &self.join)
            .field("join_as_voter", &self.join_as_voter)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("claim_timeout_ms", &self.claim_timeout_ms)
            .finish()
    }
}

impl ClusterFile {
    /// The cluster crate's settings; `env_secret` (from `CLUSTER_SECRET`)
    /// overrides the file's secret.
    pub fn build(&self, env_secret: Option<String>) -> Result<cluster::ClusterConfig, ConfigError> {
        let secret = env_secret
            .filter(|s| !s.is_empty())
            .or_else(|| self.secret.clone())
            .ok_or_else(|| {
                ConfigError::Invalid(
                    "[cluster] needs a secret (cluster.secret or CLUSTER_SECRET)".into(),
                )
            })?;
        let mut c = cluster::ClusterConfig::new(self.node_id, self.addr.clone(), secret);
        c.advertise = self.advertise.clone();
        c.peers = self.peers.clone();
        c.join = self.join.clone();
        c.join_as_voter = self.join_as_voter;
        c.heartbeat_ms = self.heartbeat_ms;
        c.claim_timeout_ms = self.claim_timeout_ms;
        c.validate()
            .map_err(|e| ConfigError::Invalid(format!("[cluster]: {e}")))
    }

    /// The group of one a node without `[cluster]` runs. Nobody can join it
    /// and it never holds an election after its first (a restarted leader of
    /// one is leader again at once), so its timers tick slowly: the raft
    /// heartbeat, election gate and liveness tick wake the control threads
    /// about 3 times a second instead of about 30 (an idle pooler's CPU).
    pub fn standalone() -> cluster::ClusterConfig {
        let secret: [u8; 16] = rand::random();
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let mut c = cluster::ClusterConfig::new(1, "127.0.0.1:0", secret);
        c.raft_heartbeat_ms = 1000;
        c.election_timeout_min_ms = 3000;
        c.election_timeout_max_ms = 6000;
        c.heartbeat_ms = 1000;
        c.claim_timeout_ms = 3000;
        c
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub proxy: ProxyFile,
    #[serde(default)]
    pub tls: Option<TlsFile>,
    #[serde(default)]
    pub api: ApiFile,
    #[serde(default)]
    pub store: StoreFile,
    #[serde(default)]
    pub cluster: Option<ClusterFile>,
    #[serde(default)]
    pub tenants: Vec<TenantFile>,
}

/// Iterations of the SCRAM secrets the pooler derives from configured passwords.
const SCRAM_ITERATIONS: u32 = 4096;

pub fn parse_mode(s: &str) -> Result<PoolMode, ConfigError> {
    match s {
        "transaction" => Ok(PoolMode::Transaction),
        "session" => Ok(PoolMode::Session),
        other => Err(ConfigError::Invalid(format!(
            "mode_type must be \"transaction\" or \"session\", not {other:?}"
        ))),
    }
}

pub fn parse_auth(s: &str) -> Result<ClientAuth, ConfigError> {
    match s {
        "scram-sha-256" => Ok(ClientAuth::ScramSha256),
        "md5" => Ok(ClientAuth::Md5),
        other => Err(ConfigError::Invalid(format!(
            "auth_type must be \"scram-sha-256\" or \"md5\", not {other:?}"
        ))),
    }
}

/// SCRAM secrets derived from configured passwords, kept across config
/// rebuilds so that PBKDF2 runs once per (tenant, user, password).
#[derive(Default)]
pub struct SecretCache {
    map: Mutex<HashMap<(String, String), (String, ScramSecret)>>,
}

impl SecretCache {
    fn get(&self, tenant: &str, user: &str, password: &str) -> ScramSecret {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tenant.to_string(), user.to_string());
        if let Some((p, secret)) = map.get(&key) {
            if p == password {
                return secret.clone();
            }
        }
        let salt: [u8; 16] = rand::random();
        let secret = ScramSecret::from_password(password, &salt, SCRAM_ITERATIONS);
        map.insert(key, (password.to_string(), secret.clone()));
        secret
    }
}

impl ProxyFile {
    pub fn build(&self, tls: Option<&TlsFile>) -> Result<ProxyConfig, ConfigError> {
        let tls = match tls {
            Some(t) => Some(
                crate::tls::server_config(&t.cert, &t.key)
                    .map_err(|e| ConfigError::Invalid(format!("[tls]: {e}")))?,
            ),
            None => None,
        };
        let shards = if self.shards == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.shards
        };
        if self.listen_backlog == 0 || self.listen_backlog > i32::MAX as u32 {
            return Err(ConfigError::Invalid(
                "proxy.listen_backlog must be between 1 and 2147483647".into(),
            ));
        }
        if shards > 256 {
            return Err(ConfigError::Invalid(
                "proxy.shards must be at most 256".into(),
            ));
        }
        if self.spin_before_park_us > 10_000 {
            return Err(ConfigError::Invalid(
                "proxy.spin_before_park_us must be at most 10000 (10 ms)".into(),
            ));
        }
        let websocket_addr = match self.websocket_addr.trim() {
            "" => None,
            a => Some(a.parse::<SocketAddr>().map_err(|e| {
                ConfigError::Invalid(format!(
                    "proxy.websocket_addr {a:?}: {e} (an address such as 0.0.0.0:4001, or \"\" for none)"
                ))
            })?),
        };
        let websocket_cleartext = self
            .websocket_cleartext_allow
            .iter()
            .map(|c| {
                c.parse::<engine::config::Cidr>().map_err(|e| {
                    ConfigError::Invalid(format!("proxy.websocket_cleartext_allow: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProxyConfig {
            session_addr: self.session_addr,
            transaction_addr: self.transaction_addr,
            shards,
            shutdown_timeout: Duration::from_millis(self.shutdown_timeout),
            client_startup_timeout: Duration::from_millis(self.client_startup_timeout.max(1)),
            client_park_after: Duration::from_millis(self.client_park_after),
            tls,
            listen_backlog: self.listen_backlog,
            proxy_addr: None,
            websocket_addr,
            websocket_cleartext,
            spin_before_park: Duration::from_micros(self.spin_before_park_us),
            tcp_defer_accept: self.tcp_defer_accept,
        })
    }
}

/// Two listeners of one node on the same port: with SO_REUSEPORT (which every
/// listener sets, for graceful restarts) both binds succeed and the kernel
/// splits connections between them, so the clash is refused here instead.
/// Port 0 (any free port) never clashes.
pub fn check_listeners(listeners: &[(&str, SocketAddr)]) -> Result<(), ConfigError> {
    for (i, (a_name, a)) in listeners.iter().enumerate() {
        for (b_name, b) in &listeners[i + 1..] {
            let overlap = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
            if a.port() != 0 && a.port() == b.port() && overlap {
                return Err(ConfigError::Invalid(format!(
                    "{a_name} ({a}) and {b_name} ({b}) listen on the same port"
                )));
            }
        }
    }
    Ok(())
}

/// One tenant of the engine's snapshot.
pub fn build_tenant(
    id: &str,
    t: &TenantSpec,
    secrets: &SecretCache,
) -> Result<TenantConfig, ConfigError> {
    let errors = t.validate();
    if !model::valid_id(id) {
        return Err(ConfigError::Invalid(format!(
            "tenant id {id:?} must be 1 to 128 letters, digits, '_' or '-'"
        )));
    }
    if let Some(e) = errors.first() {
        return Err(ConfigError::Invalid(format!(
            "tenant {id:?}: {} {}",
            e.field, e.message
        )));
    }
    let client_auth = parse_auth(&t.auth_type)?;
    let mut users = HashMap::new();
    for u in &t.users {
        let Some(password) = u.db_password.as_deref() else {
            return Err(ConfigError::Invalid(format!(
                "tenant {id:?} user {:?}: db_password is required",
                u.db_user
            )));
        };
        let user = UserConfig {
            db_user: u.db_user.clone(),
            auth: UserAuth::Password {
                password: password.to_string(),
                scram: secrets.get(id, &u.db_user, password),
            },
            pool_size: u.pool_size.unwrap_or(t.default_pool_size),
            max_clients: u.max_clients.unwrap_or(t.default_max_clients),
            checkout_timeout: Duration::from_millis(
                u.pool_checkout_timeout
                    .unwrap_or(t.default_pool_checkout_timeout),
            ),
            default_mode: parse_mode(&u.mode_type)?,
        };
        users.insert(u.db_user.clone(), Arc::new(user));
    }
    Ok(TenantConfig {
        external_id: id.to_string(),
        db_host: t.db_host.clone(),
        db_port: t.db_port,
        db_database: t.db_database.clone(),
        client_auth,
        users,
        require_user: t.require_user,
        auth_query: t
            .auth_query
            .clone()
            .unwrap_or_else(|| model::DEFAULT_AUTH_QUERY.to_string()),
        manager: t
            .users
            .iter()
            .find(|u| u.is_manager)
            .map(|u| u.db_user.clone()),
        default_pool_size: t.default_pool_size,
        default_max_clients: t.default_max_clients,
        default_checkout_timeout: Duration::from_millis(t.default_pool_checkout_timeout),
        enforce_ssl: t.enforce_ssl,
        sni_hostname: t.sni_hostname.as_ref().map(|h| h.to_ascii_lowercase()),
        upstream_tls: match t.upstream_ssl {
            false => None,
            true => Some(
                crate::tls::upstream_config(
                    t.upstream_verify.as_deref().unwrap_or("peer"),
                    t.upstream_tls_ca.as_deref(),
                )
                .map_err(|e| ConfigError::Invalid(format!("tenant {id:?}: {e}")))?,
            ),
        },
        allow_list: t.allow_list.iter().filter_map(|c| c.parse().ok()).collect(),
        timeouts: engine::config::ClientTimeouts {
            client_idle_ms: t.client_idle_timeout,
            idle_transaction_ms: t.idle_transaction_timeout,
            query_ms: t.query_timeout,
        },
        replication: engine::config::Replication {
            replicas: t
                .replicas
                .iter()
                .map(|r| engine::config::ReplicaConfig {
                    host: r.host.clone(),
                    port: r.port,
                    weight: r.weight,
                    pool_size: r.pool_size,
                })
                .collect(),
            load_balance_reads: t.load_balance == model::LoadBalance::Reads,
            max_lag: Duration::from_millis(t.max_replica_lag_ms),
            ban: Duration::from_millis(t.replica_ban_ms),
        },
    })
}

/// The engine's snapshot from proxy settings and tenants.
pub fn build_config(
    proxy: &ProxyConfig,
    tenants: &[(String, TenantSpec)],
    secrets: &SecretCache,
) -> Result<Config, ConfigError> {
    let mut map = HashMap::new();
    for (id, spec) in tenants {
        if map.contains_key(id) {
            return Err(ConfigError::Invalid(format!(
                "tenant {id:?} is defined twice"
            )));
        }
        map.insert(id.clone(), Arc::new(build_tenant(id, spec, secrets)?));
    }
    Ok(Config::new(proxy.clone(), map))
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// The tenants of the file, as seeds for the store.
    pub fn seeds(&self) -> Vec<(String, TenantSpec)> {
        self.tenants.iter().map(TenantFile::to_spec).collect()
    }

    /// Checks the file and builds the engine's snapshot from it alone.
    pub fn build(&self) -> Result<Config, ConfigError> {
        build_config(
            &self.proxy.build(self.tls.as_ref())?,
            &self.seeds(),
            &SecretCache::default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[proxy]
session_addr = "0.0.0.0:5432"
transaction_addr = "0.0.0.0:6543"
shards = 0
[[tenants]]
external_id = "dev_tenant"
db_host = "127.0.0.1"
db_port = 5432
db_database = "postgres"
default_pool_size = 15
default_max_clients = 1000
[[tenants.users]]
db_user = "postgres"
db_password = "postgres"
pool_size = 20
mode_type = "transaction"
max_clients = 1000
pool_checkout_timeout = 60000
"#;

    #[test]
    fn listeners_on_one_port_are_refused() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let err = check_listeners(&[
            ("proxy.session_addr", a("127.0.0.1:5432")),
            ("api.addr", a("0.0.0.0:5432")),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("same port"), "{err}");
        assert!(check_listeners(&[("a", a("127.0.0.1:5432")), ("b", a("127.0.0.2:5432"))]).is_ok());
        assert!(check_listeners(&[("a", a("127.0.0.1:0")), ("b", a("127.0.0.1:0"))]).is_ok());
        assert!(check_listeners(&[("a", a("0.0.0.0:5432")), ("b", a("0.0.0.0:6543"))]).is_ok());
    }

    #[test]
    fn issue_example_parses() {
        let cfg = ConfigFile::parse(EXAMPLE).unwrap().build().unwrap();
        let t = cfg.tenant("dev_tenant").unwrap();
        let u = &t.users["postgres"];
        assert_eq!(u.pool_size, 20);
        assert_eq!(u.checkout_timeout, Duration::from_secs(60));
        assert!(cfg.proxy.shards >= 1);
        assert!(!format!("{u:?}").contains("postgres\", db_password: \"postgres"));
    }

    #[test]
    fn cluster_section_maps_to_the_cluster_config() {
        let text = r#"
[cluster]
node_id = 2
addr = "127.0.0.1:7001"
peers = [[1, "127.0.0.1:7000"], [2, "127.0.0.1:7001"], [3, "127.0.0.1:7002"]]
secret = "file-secret-123"
heartbeat_ms = 200
"#;
        let file = ConfigFile::parse(text).unwrap();
        let c = file.cluster.as_ref().unwrap();
        let cfg = c.build(None).unwrap();
        assert_eq!(cfg.node_id, 2);
        assert_eq!(cfg.peers.len(), 3);
        assert_eq!(cfg.peers[2], (3, "127.0.0.1:7002".to_string()));
        assert_eq!(cfg.secret, "file-secret-123");
        assert_eq!(cfg.heartbeat_ms, 200);
        assert_eq!(cfg.claim_timeout_ms, 3000);
        let cfg = c.build(Some("env-secret-456".into())).unwrap();
        assert_eq!(cfg.secret, "env-secret-456");
        assert!(!format!("{c:?}").contains("file-secret"));
        let no_secret = text.replace("secret = \"file-secret-123\"\n", "");
        let err = ConfigFile::parse(&no_secret)
            .unwrap()
            .cluster
            .unwrap()
            .build(None)
            .unwrap_err();
        assert!(err.to_string().contains("CLUSTER_SECRET"), "{err}");
        let both = format!("{text}join = \"127.0.0.1:7000\"\n");
        assert!(ConfigFile::parse(&both)
            .unwrap()
            .cluster
            .unwrap()
            .build(None)
            .is_err());
        assert!(ConfigFile::parse("[cluster]\nnode_id = 1\naddr = \"x:1\"\nbogus = 1\n").is_err());
        let solo = ClusterFile::standalone().validate().unwrap();
        assert_eq!((solo.node_id, solo.listen.as_str()), (1, "127.0.0.1:0"));
        assert!(solo.raft_heartbeat_ms >= 1000 && solo.heartbeat_ms >= 1000);
    }

    #[test]
    fn tcp_defer_accept_is_on_unless_turned_off() {
        let on = ConfigFile::parse("").unwrap().proxy.build(None).unwrap();
        assert!(on.tcp_defer_accept);
        let off = ConfigFile::parse("[proxy]\ntcp_defer_accept = false\n")
            .unwrap()
            .proxy
            .build(None)
            .unwrap();
        assert!(!off.tcp_defer_accept);
    }

    #[test]
    fn spin_before_park_is_bounded() {
        let ok = ConfigFile::parse("[proxy]\nspin_before_park_us = 200\n").unwrap();
        let proxy = ok.proxy.build(None).unwrap();
        assert_eq!(proxy.spin_before_park, Duration::from_micros(200));
        let off = ConfigFile::parse("").unwrap().proxy.build(None).unwrap();
        assert!(off.spin_before_park.is_zero());
        let err = ConfigFile::parse("[proxy]\nspin_before_park_us = 20000\n")
            .unwrap()
            .proxy
            .build(None)
            .unwrap_err();
        assert!(err.to_string().contains("spin_before_park_us"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = ConfigFile::parse("[proxy]\nsesion_addr = \"0.0.0.0:1\"\n").unwrap_err();
        assert!(err.to_string().contains("sesion_addr"), "{err}");
    }

    #[test]
    fn bad_mode_is_rejected() {
        let text = EXAMPLE.replace("mode_type = \"transaction\"", "mode_type = \"statement\"");
        let err = ConfigFile::parse(&text).unwrap().build().unwrap_err();
        assert!(err.to_string().contains("mode_type"), "{err}");
    }
}
