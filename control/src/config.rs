//! The TOML configuration file, validated into the engine's snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use engine::config::{ClientAuth, Config, PoolMode, ProxyConfig, TenantConfig, UserConfig};

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
}

impl Default for ProxyFile {
    fn default() -> Self {
        ProxyFile {
            session_addr: "0.0.0.0:5432".parse().expect("literal address"),
            transaction_addr: "0.0.0.0:6543".parse().expect("literal address"),
            shards: 0,
            shutdown_timeout: 10_000,
            client_startup_timeout: 10_000,
        }
    }
}

/// `[[tenants.users]]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFile {
    pub db_user: String,
    pub db_password: String,
    pub pool_size: Option<usize>,
    #[serde(default = "default_mode")]
    pub mode_type: String,
    pub max_clients: Option<usize>,
    /// Milliseconds.
    pub pool_checkout_timeout: Option<u64>,
}

impl std::fmt::Debug for UserFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserFile")
            .field("db_user", &self.db_user)
            .field("db_password", &"<redacted>")
            .field("pool_size", &self.pool_size)
            .field("mode_type", &self.mode_type)
            .finish_non_exhaustive()
    }
}

fn default_mode() -> String {
    "transaction".into()
}

/// `[[tenants]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantFile {
    pub external_id: String,
    pub db_host: String,
    pub db_port: u16,
    pub db_database: String,
    #[serde(default = "default_pool_size")]
    pub default_pool_size: usize,
    #[serde(default = "default_max_clients")]
    pub default_max_clients: usize,
    /// Milliseconds.
    #[serde(default = "default_checkout_timeout")]
    pub default_pool_checkout_timeout: u64,
    /// How clients authenticate to the pooler: "scram-sha-256" or "md5".
    #[serde(default = "default_auth_type")]
    pub auth_type: String,
    #[serde(default)]
    pub users: Vec<UserFile>,
}

fn default_pool_size() -> usize {
    15
}
fn default_max_clients() -> usize {
    1000
}
fn default_checkout_timeout() -> u64 {
    60_000
}
fn default_auth_type() -> String {
    "scram-sha-256".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub proxy: ProxyFile,
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

    /// Checks the file and builds the engine's snapshot (SCRAM secrets are
    /// computed here, once per user).
    pub fn build(&self) -> Result<Config, ConfigError> {
        let p = &self.proxy;
        let shards = if p.shards == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            p.shards
        };
        if shards > 256 {
            return Err(ConfigError::Invalid(
                "proxy.shards must be at most 256".into(),
            ));
        }
        let proxy = ProxyConfig {
            session_addr: p.session_addr,
            transaction_addr: p.transaction_addr,
            shards,
            shutdown_timeout: Duration::from_millis(p.shutdown_timeout),
            client_startup_timeout: Duration::from_millis(p.client_startup_timeout.max(1)),
        };
        let mut tenants = HashMap::new();
        for t in &self.tenants {
            if t.external_id.is_empty() || t.external_id.contains(char::is_whitespace) {
                return Err(ConfigError::Invalid(format!(
                    "tenant external_id {:?} must be non-empty and without spaces",
                    t.external_id
                )));
            }
            if tenants.contains_key(&t.external_id) {
                return Err(ConfigError::Invalid(format!(
                    "tenant {:?} is defined twice",
                    t.external_id
                )));
            }
            let client_auth = parse_auth(&t.auth_type)?;
            let mut users = HashMap::new();
            for u in &t.users {
                if u.db_user.is_empty() {
                    return Err(ConfigError::Invalid(format!(
                        "tenant {:?}: db_user must not be empty",
                        t.external_id
                    )));
                }
                let pool_size = u.pool_size.unwrap_or(t.default_pool_size);
                if pool_size == 0 {
                    return Err(ConfigError::Invalid(format!(
                        "tenant {:?} user {:?}: pool_size must be at least 1",
                        t.external_id, u.db_user
                    )));
                }
                let salt: [u8; 16] = rand::random();
                let user = UserConfig {
                    db_user: u.db_user.clone(),
                    db_password: u.db_password.clone(),
                    pool_size,
                    max_clients: u.max_clients.unwrap_or(t.default_max_clients),
                    checkout_timeout: Duration::from_millis(
                        u.pool_checkout_timeout
                            .unwrap_or(t.default_pool_checkout_timeout),
                    ),
                    default_mode: parse_mode(&u.mode_type)?,
                    scram: wire::scram::ScramSecret::from_password(
                        &u.db_password,
                        &salt,
                        SCRAM_ITERATIONS,
                    ),
                };
                if users.insert(u.db_user.clone(), Arc::new(user)).is_some() {
                    return Err(ConfigError::Invalid(format!(
                        "tenant {:?}: user {:?} is defined twice",
                        t.external_id, u.db_user
                    )));
                }
            }
            tenants.insert(
                t.external_id.clone(),
                Arc::new(TenantConfig {
                    external_id: t.external_id.clone(),
                    db_host: t.db_host.clone(),
                    db_port: t.db_port,
                    db_database: t.db_database.clone(),
                    client_auth,
                    users,
                }),
            );
        }
        Ok(Config { proxy, tenants })
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
