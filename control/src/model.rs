//! Tenants and users as operators write them: the JSON of the HTTP API
//! (shaped like Supavisor's), the records of the store, the commands of the
//! state machine. One set of types for all three, so OpenAPI describes what
//! the handlers really take.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A database user of a tenant.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub db_user: String,
    /// Write-only: never serialized into a response. On update, an absent
    /// password keeps the stored one.
    #[serde(default, skip_serializing)]
    pub db_password: Option<String>,
    /// Server connections of this user's pool; default: the tenant's `default_pool_size`.
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// "transaction" or "session" (recorded; the port decides the mode).
    #[serde(default = "default_mode")]
    pub mode_type: String,
    /// Default: the tenant's `default_max_clients`.
    #[serde(default)]
    pub max_clients: Option<usize>,
    /// Milliseconds; default: the tenant's `default_pool_checkout_timeout`.
    #[serde(default)]
    pub pool_checkout_timeout: Option<u64>,
    /// The user `auth_query` runs as.
    #[serde(default)]
    pub is_manager: bool,
}

impl std::fmt::Debug for UserSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSpec")
            .field("db_user", &self.db_user)
            .field(
                "db_password",
                &self.db_password.as_ref().map(|_| "<redacted>"),
            )
            .field("pool_size", &self.pool_size)
            .field("mode_type", &self.mode_type)
            .field("max_clients", &self.max_clients)
            .field("pool_checkout_timeout", &self.pool_checkout_timeout)
            .field("is_manager", &self.is_manager)
            .finish()
    }
}

pub fn default_mode() -> String {
    "transaction".into()
}
pub fn default_pool_size() -> usize {
    15
}
pub fn default_max_clients() -> usize {
    1000
}
pub fn default_checkout_timeout() -> u64 {
    60_000
}
pub fn default_auth_type() -> String {
    "scram-sha-256".into()
}
pub fn default_true() -> bool {
    true
}
pub const DEFAULT_AUTH_QUERY: &str =
    "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1";

/// A tenant: where its database is and who may use it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub db_host: String,
    pub db_port: u16,
    pub db_database: String,
    /// true: only the users listed may log in. false: any database user,
    /// verified through `auth_query` run as the manager user.
    #[serde(default = "default_true")]
    pub require_user: bool,
    /// Default: `SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1`.
    #[serde(default)]
    pub auth_query: Option<String>,
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
    /// Refuse clients that did not negotiate TLS (`28000`).
    #[serde(default)]
    pub enforce_ssl: bool,
    /// TLS clients whose SNI host name is this reach the tenant without
    /// naming it in the user name.
    #[serde(default)]
    pub sni_hostname: Option<String>,
    /// TLS to the database.
    #[serde(default)]
    pub upstream_ssl: bool,
    /// "peer" (verify the database's certificate and host name against
    /// `upstream_tls_ca`, else the system's CA bundle) or "none".
    #[serde(default)]
    pub upstream_verify: Option<String>,
    /// PEM of the CA that signed the database's certificate.
    #[serde(default)]
    pub upstream_tls_ca: Option<String>,
    /// Client addresses allowed in, as CIDRs (`10.0.0.0/8`, `::1/128`);
    /// empty: any address.
    #[serde(default)]
    pub allow_list: Vec<String>,
    /// Milliseconds a client may stay connected with no transaction open
    /// (57P05); 0 = no limit.
    #[serde(default)]
    pub client_idle_timeout: u32,
    /// Milliseconds a client may stay idle inside a transaction (25P03,
    /// rolled back); 0 = no limit.
    #[serde(default)]
    pub idle_transaction_timeout: u32,
    /// Milliseconds a query may run before the pooler cancels it (57014);
    /// 0 = no limit.
    #[serde(default)]
    pub query_timeout: u32,
    /// Read replicas of `db_database` (same users and passwords).
    ///
    /// These four fields are left out of what is written (log entries,
    /// records, answers) while they hold their defaults, so that a tenant
    /// without replicas reads the same to a node that predates them (a
    /// rolling upgrade).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaSpec>,
    /// "off": only clients that ask (`options=-c target_session_attrs=read-only`)
    /// use the replicas; "reads": also transaction-mode transactions that
    /// start with a plain SELECT.
    #[serde(default, skip_serializing_if = "LoadBalance::is_off")]
    pub load_balance: LoadBalance,
    /// Milliseconds of replay lag past which a replica is banned; 0 = not checked.
    #[serde(
        default = "default_max_replica_lag_ms",
        skip_serializing_if = "is_default_max_replica_lag_ms"
    )]
    pub max_replica_lag_ms: u64,
    /// Milliseconds a failing replica gets no clients.
    #[serde(
        default = "default_replica_ban_ms",
        skip_serializing_if = "is_default_replica_ban_ms"
    )]
    pub replica_ban_ms: u64,
    #[serde(default)]
    pub users: Vec<UserSpec>,
}

/// A read replica of a tenant's database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSpec {
    pub host: String,
    pub port: u16,
    /// Its share of the reads relative to the other replicas (0: none).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Server connections per user pool on it; default: the user's `pool_size`.
    #[serde(default)]
    pub pool_size: Option<usize>,
}

/// Which transactions go to the replicas on their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LoadBalance {
    /// Only clients that ask for replicas.
    #[default]
    Off,
    /// Also plain reads in transaction mode.
    Reads,
}

impl LoadBalance {
    pub fn is_off(&self) -> bool {
        *self == LoadBalance::Off
    }
}

fn is_default_max_replica_lag_ms(ms: &u64) -> bool {
    *ms == default_max_replica_lag_ms()
}

fn is_default_replica_ban_ms(ms: &u64) -> bool {
    *ms == default_replica_ban_ms()
}

pub fn default_weight() -> u32 {
    1
}
pub fn default_max_replica_lag_ms() -> u64 {
    10_000
}
pub fn default_replica_ban_ms() -> u64 {
    5_000
}

impl std::str::FromStr for ReplicaSpec {
    type Err = String;

    /// `host:port[:weight]`, `[v6]:port[:weight]`.
    fn from_str(s: &str) -> Result<ReplicaSpec, String> {
        let bad = || format!("{s:?}: expected host:port or host:port:weight");
        let (host, rest) = match s.strip_prefix('[') {
            Some(v6) => {
                let (host, rest) = v6.split_once(']').ok_or_else(bad)?;
                (host, rest.strip_prefix(':').ok_or_else(bad)?)
            }
            None => s.split_once(':').ok_or_else(bad)?,
        };
        let (port, weight) = match rest.split_once(':') {
            Some((p, w)) => (p, Some(w)),
            None => (rest, None),
        };
        Ok(ReplicaSpec {
            host: host.to_string(),
            port: port.parse().map_err(|_| bad())?,
            weight: match weight {
                Some(w) => w.parse().map_err(|_| bad())?,
                None => default_weight(),
            },
            pool_size: None,
        })
    }
}

/// A tenant with its id, as listed and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TenantView {
    pub external_id: String,
    #[serde(flatten)]
    pub spec: TenantSpec,
}

/// `{"tenant": {...}}`: the body of `PUT /api/tenants/{external_id}` and of responses.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantEnvelope<T> {
    pub tenant: T,
}

/// One invalid field of a request, for a 422 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// Dotted path, e.g. `users[0].pool_size`.
    pub field: String,
    pub message: String,
}

/// A change to the tenant store: applied in order by the state machine (and,
/// with the cluster, carried by the raft log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Upsert. Users listed without a password keep their stored one.
    PutTenant {
        id: String,
        spec: TenantSpec,
    },
    DeleteTenant {
        id: String,
    },
    /// Upsert one user of an existing tenant.
    PutUser {
        tenant: String,
        user: UserSpec,
    },
    DeleteUser {
        tenant: String,
        db_user: String,
    },
}

/// The tenant id that reaches the admin console; no tenant may have it.
pub const CONSOLE_TENANT: &str = engine::console::TENANT;

pub fn valid_id(id: &str) -> bool {
    id != CONSOLE_TENANT
        && !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl UserSpec {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let mut err = |f: &str, m: &str| {
            errors.push(FieldError {
                field: format!("{path}.{f}"),
                message: m.to_string(),
            })
        };
        if self.db_user.is_empty() || self.db_user.len() > 63 {
            err("db_user", "must be 1 to 63 characters");
        }
        if self.db_user.contains('\0') {
            err("db_user", "must not contain NUL");
        }
        if let Some(p) = &self.db_password {
            if p.is_empty() || p.contains('\0') {
                err("db_password", "must be non-empty, without NUL");
            }
        }
        if matches!(self.pool_size, Some(0)) {
            err("pool_size", "must be at least 1");
        }
        if matches!(self.pool_size, Some(n) if n > 10_000) {
            err("pool_size", "must be at most 10000");
        }
        if matches!(self.max_clients, Some(0)) {
            err("max_clients", "must be at least 1");
        }
        if self.mode_type != "transaction" && self.mode_type != "session" {
            err("mode_type", "must be \"transaction\" or \"session\"");
        }
    }
}

impl TenantSpec {
    /// Per-field problems; empty when valid. `new_users_need_password`: a
    /// user not yet stored must come with a password.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut err = |f: &str, m: &str| {
            errors.push(FieldError {
                field: f.to_string(),
                message: m.to_string(),
            })
        };
        if self.db_host.is_empty() {
            err("db_host", "must not be empty");
        }
        if self.db_port == 0 {
            err("db_port", "must be 1 to 65535");
        }
        if self.db_database.is_empty() || self.db_database.contains('\0') {
            err("db_database", "must not be empty");
        }
        if self.default_pool_size == 0 {
            err("default_pool_size", "must be at least 1");
        }
        if self.default_max_clients == 0 {
            err("default_max_clients", "must be at least 1");
        }
        if self.auth_type != "scram-sha-256" && self.auth_type != "md5" {
            err("auth_type", "must be \"scram-sha-256\" or \"md5\"");
        }
        if let Some(v) = &self.upstream_verify {
            if v != "none" && v != "peer" {
                err("upstream_verify", "must be \"none\" or \"peer\"");
            }
        }
        if let Some(ca) = &self.upstream_tls_ca {
            if crate::tls::parse_certs(ca).map_or(true, |c| c.is_empty()) {
                err(
                    "upstream_tls_ca",
                    "must be PEM with at least one certificate",
                );
            }
        }
        if let Some(host) = &self.sni_hostname {
            if host.is_empty() || host.len() > 253 || host.contains(char::is_whitespace) {
                err("sni_hostname", "must be a host name");
            }
        }
        if self
            .allow_list
            .iter()
            .any(|c| c.parse::<engine::config::Cidr>().is_err())
        {
            err(
                "allow_list",
                "each entry must be an address or CIDR such as 10.0.0.0/8 or ::1/128",
            );
        }
        for (i, r) in self.replicas.iter().enumerate() {
            let field = |f: &str| format!("replicas[{i}].{f}");
            if r.host.is_empty() || r.host.contains(char::is_whitespace) {
                err(&field("host"), "must be a host name or address");
            }
            if r.port == 0 {
                err(&field("port"), "must be 1 to 65535");
            }
            if r.weight > 1000 {
                err(&field("weight"), "must be 0 to 1000");
            }
            if matches!(r.pool_size, Some(n) if n == 0 || n > 10_000) {
                err(&field("pool_size"), "must be 1 to 10000");
            }
            if self.replicas[..i]
                .iter()
                .any(|o| o.host == r.host && o.port == r.port)
            {
                err(&field("host"), "this host and port is listed twice");
            }
        }
        if self.replica_ban_ms > 3_600_000 {
            err("replica_ban_ms", "must be at most 3600000 (an hour)");
        }
        if !self.require_user && !self.users.iter().any(|u| u.is_manager) {
            err(
                "users",
                "require_user = false needs a manager user (is_manager = true) to run auth_query",
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            u.validate(&format!("users[{i}]"), &mut errors);
            if !seen.insert(u.db_user.as_str()) {
                errors.push(FieldError {
                    field: format!("users[{i}].db_user"),
                    message: "is listed twice".into(),
                });
            }
        }
        errors
    }

    /// The password each user would have after this spec is stored over
    /// `old`: passwords not given are kept. Returns the field errors of users
    /// that have no password at all.
    pub fn merge_passwords(&mut self, old: Option<&TenantSpec>) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (i, u) in self.users.iter_mut().enumerate() {
            if u.db_password.is_none() {
                u.db_password = old
                    .and_then(|o| o.users.iter().find(|o| o.db_user == u.db_user))
                    .and_then(|o| o.db_password.clone());
            }
            if u.db_password.is_none() {
                errors.push(FieldError {
                    field: format!("users[{i}].db_password"),
                    message: "is required for a new user".into(),
                });
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supavisor_shaped_json_round_trips_without_passwords() {
        let body = r#"{"tenant": {"db_host": "localhost", "db_port": 5432, "db_database": "postgres",
            "users": [{"db_user": "postgres", "db_password": "secret", "pool_size": 3, "mode_type": "session"}]}}"#;
        let env: TenantEnvelope<TenantSpec> = serde_json::from_str(body).unwrap();
        assert!(env.tenant.validate().is_empty());
        assert_eq!(env.tenant.users[0].db_password.as_deref(), Some("secret"));
        let out = serde_json::to_string(&TenantEnvelope {
            tenant: TenantView {
                external_id: "t".into(),
                spec: env.tenant,
            },
        })
        .unwrap();
        assert!(!out.contains("secret"), "{out}");
        assert!(out.contains("\"external_id\":\"t\""));
        // Replica settings at their defaults are not written (older nodes deny
        // unknown fields); set, they round-trip.
        assert!(
            !out.contains("replica") && !out.contains("load_balance"),
            "{out}"
        );
        let with: TenantSpec = serde_json::from_str(
            r#"{"db_host": "h", "db_port": 1, "db_database": "d", "load_balance": "reads",
                "replicas": [{"host": "r", "port": 2}], "replica_ban_ms": 100}"#,
        )
        .unwrap();
        assert_eq!(with.replicas[0].weight, 1);
        assert_eq!(with.max_replica_lag_ms, 10_000);
        let back: TenantSpec =
            serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(back, with);
        assert!(serde_json::from_str::<TenantSpec>(
            r#"{"db_host": "h", "db_port": 1, "db_database": "d", "load_balance": "writes"}"#
        )
        .is_err());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_reported() {
        let bad: Result<TenantEnvelope<TenantSpec>, _> = serde_json::from_str(
            r#"{"tenant": {"db_host": "h", "db_port": 1, "db_database": "d", "bogus": 1}}"#,
        );
        assert!(bad.is_err());
        let spec: TenantSpec = serde_json::from_str(
            r#"{"db_host": "", "db_port": 0, "db_database": "d", "default_pool_size": 0,
                "users": [{"db_user": "u", "pool_size": 0, "mode_type": "statement"}]}"#,
        )
        .unwrap();
        let fields: Vec<String> = spec.validate().into_iter().map(|e| e.field).collect();
        for f in [
            "db_host",
            "db_port",
            "default_pool_size",
            "users[0].pool_size",
            "users[0].mode_type",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn bad_replicas_are_reported_per_field() {
        let spec: TenantSpec = serde_json::from_str(
            r#"{"db_host": "h", "db_port": 1, "db_database": "d", "replica_ban_ms": 4000000,
                "replicas": [{"host": "", "port": 0, "weight": 5000, "pool_size": 0},
                             {"host": "r", "port": 2}, {"host": "r", "port": 2}]}"#,
        )
        .unwrap();
        let fields: Vec<String> = spec.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "replicas[0].host",
                "replicas[0].port",
                "replicas[0].weight",
                "replicas[0].pool_size",
                "replicas[2].host",
                "replica_ban_ms"
            ]
        );
        assert!(
            serde_json::from_str::<ReplicaSpec>(r#"{"host": "r", "port": 2, "x": 1}"#).is_err()
        );
        assert!(!valid_id(CONSOLE_TENANT), "the console's name is reserved");
    }

    #[test]
    fn passwords_are_kept_on_update() {
        let old: TenantSpec = serde_json::from_str(
            r#"{"db_host": "h", "db_port": 1, "db_database": "d", "users": [{"db_user": "u", "db_password": "p"}]}"#,
        )
        .unwrap();
        let mut new: TenantSpec = serde_json::from_str(
            r#"{"db_host": "h", "db_port": 1, "db_database": "d", "users": [{"db_user": "u", "pool_size": 9}, {"db_user": "v"}]}"#,
        )
        .unwrap();
        let errors = new.merge_passwords(Some(&old));
        assert_eq!(new.users[0].db_password.as_deref(), Some("p"));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "users[1].db_password");
    }
}
