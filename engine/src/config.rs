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
    /// `listen()` backlog of each shard's listeners (the kernel caps it at
    /// `net.core.somaxconn`).
    pub listen_backlog: u32,
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
}

impl Config {
    pub fn tenant(&self, id: &str) -> Option<&Arc<TenantConfig>> {
        self.tenants.get(id)
    }
}
