//! `supavisorctl`: manage tenants, users and pools of a node through its
//! HTTP API with a bearer token.
//!
//! The binary only parses flags and calls [`run`]. Each subcommand maps to
//! an [`ApiRequest`] built by a pure function (tested below); responses are
//! read as `serde_json::Value`, leniently, and printed as aligned tables, or
//! as JSON with `--json`.

use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

use crate::model::{FieldError, ReplicaSpec};

/// Lifetime of a token minted from `--jwt-secret`.
pub const TOKEN_TTL_SECS: u64 = 300;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(
    name = "supavisorctl",
    version,
    about = "Manage a Supavisor-rs node through its HTTP API"
)]
pub struct Cli {
    /// Base URL of the node's HTTP API.
    #[arg(
        long,
        global = true,
        env = "SUPAVISOR_API",
        default_value = "http://127.0.0.1:4000"
    )]
    pub api: String,
    /// Bearer token for the API.
    #[arg(long, global = true, env = "SUPAVISOR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The API's JWT secret: mints a short-lived token (used when --token is absent).
    #[arg(long, global = true, env = "API_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Print the API's JSON answer instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

// Parsed once per process: the size of the largest command does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Tenants: where a database is and who may use it.
    Tenant {
        #[command(subcommand)]
        cmd: TenantCmd,
    },
    /// Database users of a tenant.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Pools of the node.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// The raft group: status, adding and removing nodes.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// The node's health.
    Health,
    /// Print an API token minted with --jwt-secret: the admin console's
    /// password (`psql "user=admin.supavisor dbname=supavisor ..."`).
    Token {
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Leader, voters, learners, applied index and each node's health.
    Status,
    /// Add a running node (as a learner; --voter to promote it).
    Join {
        node_id: u64,
        /// Its raft address, host:port.
        addr: String,
        #[arg(long)]
        voter: bool,
    },
    /// Remove a node from the group.
    Leave { node_id: u64 },
}

#[derive(Subcommand, Debug)]
pub enum TenantCmd {
    /// Create or replace a tenant with one user.
    Add(TenantAddArgs),
    /// List tenants.
    List,
    /// Show one tenant.
    Show { id: String },
    /// Change fields of a tenant; users keep their passwords.
    Update(TenantUpdateArgs),
    /// Delete a tenant.
    Rm { id: String },
    /// Disconnect a tenant's clients and close its pools (its config stays).
    Terminate { id: String },
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add or update a user of a tenant.
    Add(UserAddArgs),
    /// Remove a user from a tenant.
    Rm { tenant: String, user: String },
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// List pools, per shard (and replica).
    List {
        /// Every node's pools (each row names its node).
        #[arg(long)]
        cluster: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Transaction,
    Session,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Transaction => "transaction",
            Mode::Session => "session",
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthType {
    #[value(name = "scram-sha-256")]
    ScramSha256,
    #[value(name = "md5")]
    Md5,
}

impl AuthType {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::ScramSha256 => "scram-sha-256",
            AuthType::Md5 => "md5",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct TenantAddArgs {
    /// Tenant id (A-Z, a-z, 0-9, '_', '-'); clients log in as USER.ID.
    pub id: String,
    #[arg(long)]
    pub db_host: String,
    #[arg(long)]
    pub db_port: u16,
    #[arg(long)]
    pub db_database: String,
    /// The database user.
    #[arg(long)]
    pub user: String,
    /// The database user's password (stored encrypted, never shown).
    #[arg(long)]
    pub password: String,
    /// Server connections of the user's pool, and the tenant's default.
    #[arg(long)]
    pub pool_size: usize,
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Client connections the user may hold.
    #[arg(long)]
    pub max_clients: Option<usize>,
    /// How clients authenticate to the pooler.
    #[arg(long, value_enum, default_value = "scram-sha-256")]
    pub auth_type: AuthType,
    /// true: only listed users may log in; false: any user, checked with auth_query.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub require_user: bool,
    /// Query that fetches a user's secret (run as the manager user).
    #[arg(long)]
    pub auth_query: Option<String>,
    /// This user runs auth_query.
    #[arg(long)]
    pub manager: bool,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub replication: ReplicaArgs,
}

/// Read replicas of a tenant (`tenant add` and `tenant update`).
#[derive(Args, Debug, Clone, Default)]
pub struct ReplicaArgs {
    /// A read replica, HOST:PORT[:WEIGHT] (weight 1 by default); repeat for
    /// more. With `tenant update` the list replaces the tenant's replicas.
    #[arg(long = "replica", value_name = "HOST:PORT[:WEIGHT]", value_parser = parse_replica)]
    pub replicas: Vec<ReplicaSpec>,
    /// `tenant update`: remove every replica.
    #[arg(long, conflicts_with = "replicas")]
    pub no_replicas: bool,
    /// "reads": transaction-mode transactions that start with a plain
    /// SELECT go to a replica; "off": only clients that ask for replicas.
    #[arg(long, value_enum)]
    pub load_balance: Option<LoadBalanceArg>,
    /// Replay lag (ms) past which a replica is banned; 0: not checked.
    #[arg(long)]
    pub max_replica_lag_ms: Option<u64>,
    /// How long (ms) a failing replica gets no clients.
    #[arg(long)]
    pub replica_ban_ms: Option<u64>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadBalanceArg {
    Off,
    Reads,
}

fn parse_replica(s: &str) -> Result<ReplicaSpec, String> {
    s.parse()
}

impl ReplicaArgs {
    fn is_empty(&self) -> bool {
        self.replicas.is_empty()
            && !self.no_replicas
            && self.load_balance.is_none()
            && self.max_replica_lag_ms.is_none()
            && self.replica_ban_ms.is_none()
    }

    /// Sets the given fields on a tenant's JSON.
    fn apply(&self, t: &mut Map<String, Value>) {
        if !self.replicas.is_empty() || self.no_replicas {
            t.insert("replicas".into(), json!(self.replicas));
        }
        if let Some(lb) = self.load_balance {
            let v = match lb {
                LoadBalanceArg::Off => "off",
                LoadBalanceArg::Reads => "reads",
            };
            t.insert("load_balance".into(), json!(v));
        }
        if let Some(ms) = self.max_replica_lag_ms {
            t.insert("max_replica_lag_ms".into(), json!(ms));
        }
        if let Some(ms) = self.replica_ban_ms {
            t.insert("replica_ban_ms".into(), json!(ms));
        }
    }
}

/// TLS and access settings of a tenant (`tenant add` and `tenant update`).
#[derive(Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// Refuse clients that did not negotiate TLS.
    #[arg(long)]
    pub enforce_ssl: Option<bool>,
    /// TLS clients whose SNI host name is this reach the tenant.
    #[arg(long)]
    pub sni_hostname: Option<String>,
    /// TLS to the database.
    #[arg(long)]
    pub upstream_ssl: Option<bool>,
    /// "peer" (verify the database's certificate) or "none".
    #[arg(long)]
    pub upstream_verify: Option<String>,
    /// PEM file of the CA that signed the database's certificate.
    #[arg(long, value_name = "FILE", value_parser = read_pem_file)]
    pub upstream_tls_ca: Option<String>,
    /// Client addresses allowed in (CIDRs, comma-separated); "" allows any.
    #[arg(long)]
    pub allow_list: Option<String>,
}

impl SecurityArgs {
    fn is_empty(&self) -> bool {
        self.enforce_ssl.is_none()
            && self.sni_hostname.is_none()
            && self.upstream_ssl.is_none()
            && self.upstream_verify.is_none()
            && self.upstream_tls_ca.is_none()
            && self.allow_list.is_none()
    }

    /// Sets the given fields on a tenant's JSON.
    fn apply(&self, t: &mut Map<String, Value>) {
        if let Some(v) = self.enforce_ssl {
            t.insert("enforce_ssl".into(), json!(v));
        }
        if let Some(v) = &self.sni_hostname {
            t.insert("sni_hostname".into(), json!(v));
        }
        if let Some(v) = self.upstream_ssl {
            t.insert("upstream_ssl".into(), json!(v));
        }
        if let Some(v) = &self.upstream_verify {
            t.insert("upstream_verify".into(), json!(v));
        }
        if let Some(pem) = &self.upstream_tls_ca {
            t.insert("upstream_tls_ca".into(), json!(pem));
        }
        if let Some(list) = &self.allow_list {
            let cidrs: Vec<&str> = list
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            t.insert("allow_list".into(), json!(cidrs));
        }
    }
}

/// The text of a PEM file named on the command line.
fn read_pem_file(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
}

#[derive(Args, Debug, Clone, Default)]
pub struct TenantUpdateArgs {
    pub id: String,
    #[arg(long)]
    pub db_host: Option<String>,
    #[arg(long)]
    pub db_port: Option<u16>,
    #[arg(long)]
    pub db_database: Option<String>,
    /// The tenant's default pool size; users whose pool size equalled the old default follow it.
    #[arg(long)]
    pub pool_size: Option<usize>,
    /// The tenant's default max clients; users whose limit equalled the old default follow it.
    #[arg(long)]
    pub max_clients: Option<usize>,
    /// The tenant's default checkout timeout, in milliseconds.
    #[arg(long)]
    pub checkout_timeout_ms: Option<u64>,
    #[arg(long, value_enum)]
    pub auth_type: Option<AuthType>,
    #[arg(long)]
    pub require_user: Option<bool>,
    #[arg(long)]
    pub auth_query: Option<String>,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub replication: ReplicaArgs,
}

impl TenantUpdateArgs {
    fn is_empty(&self) -> bool {
        self.db_host.is_none()
            && self.db_port.is_none()
            && self.db_database.is_none()
            && self.pool_size.is_none()
            && self.max_clients.is_none()
            && self.checkout_timeout_ms.is_none()
            && self.auth_type.is_none()
            && self.require_user.is_none()
            && self.auth_query.is_none()
            && self.security.is_empty()
            && self.replication.is_empty()
    }
}

#[derive(Args, Debug, Clone)]
pub struct UserAddArgs {
    pub tenant: String,
    #[arg(long)]
    pub user: String,
    /// Required for a new user; an existing user keeps its password when absent.
    #[arg(long)]
    pub password: Option<String>,
    /// Default: the tenant's default pool size.
    #[arg(long)]
    pub pool_size: Option<usize>,
    #[arg(long, value_enum, default_value = "transaction")]
    pub mode: Mode,
    #[arg(long)]
    pub max_clients: Option<usize>,
    #[arg(long)]
    pub manager: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Exit code 2.
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the API at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    #[error("unauthorized: check --token / API_JWT_SECRET{}", api_said(.0))]
    Unauthorized(Option<String>),
    /// The whole sentence, e.g. `tenant "x" not found`.
    #[error("{0}")]
    NotFound(String),
    #[error("invalid input: {}", join_field_errors(.0))]
    Invalid(Vec<FieldError>),
    #[error("the API answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("unexpected answer from the API ({status}): {why}")]
    BadResponse { status: u16, why: String },
    #[error("minting a token from the JWT secret: {0}")]
    Token(#[from] jsonwebtoken::errors::Error),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

fn api_said(m: &Option<String>) -> String {
    match m {
        Some(m) if !m.is_empty() => format!(" (the API said: {m})"),
        _ => String::new(),
    }
}

fn join_field_errors(errors: &[FieldError]) -> String {
    if errors.is_empty() {
        return "the API gave no details".into();
    }
    errors
        .iter()
        .map(|e| format!("{} {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl CtlError {
    /// 2 for usage errors, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// One HTTP call to the API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub method: &'static str,
    /// Path and query, e.g. `/api/tenants/acme`.
    pub path: String,
    pub body: Option<Value>,
    /// What a 404 means, e.g. `tenant "acme"`.
    pub target: String,
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn tenant_path(id: &str) -> String {
    format!("/api/tenants/{}", path_segment(id))
}

fn tenant_target(id: &str) -> String {
    format!("tenant {id:?}")
}

/// `PUT /api/tenants/ID` for `tenant add`.
pub fn tenant_add_request(a: &TenantAddArgs) -> ApiRequest {
    let mut user = Map::new();
    user.insert("db_user".into(), json!(a.user));
    user.insert("db_password".into(), json!(a.password));
    user.insert("pool_size".into(), json!(a.pool_size));
    user.insert("mode_type".into(), json!(a.mode.as_str()));
    if let Some(n) = a.max_clients {
        user.insert("max_clients".into(), json!(n));
    }
    user.insert("is_manager".into(), json!(a.manager));
    let mut tenant = Map::new();
    tenant.insert("db_host".into(), json!(a.db_host));
    tenant.insert("db_port".into(), json!(a.db_port));
    tenant.insert("db_database".into(), json!(a.db_database));
    tenant.insert("require_user".into(), json!(a.require_user));
    if let Some(q) = &a.auth_query {
        tenant.insert("auth_query".into(), json!(q));
    }
    tenant.insert("default_pool_size".into(), json!(a.pool_size));
    tenant.insert("auth_type".into(), json!(a.auth_type.as_str()));
    a.security.apply(&mut tenant);
    a.replication.apply(&mut tenant);
    tenant.insert("users".into(), Value::Array(vec![Value::Object(user)]));
    ApiRequest {
        method: "PUT",
        path: tenant_path(&a.id),
        body: Some(json!({ "tenant": tenant })),
        target: tenant_target(&a.id),
    }
}

/// The fields of a tenant the API accepts back (`TenantSpec`, which denies
/// unknown fields); passwords are never in a view, so users keep theirs.
const TENANT_FIELDS: &[&str] = &[
    "db_host",
    "db_port",
    "db_database",
    "require_user",
    "auth_query",
    "default_pool_size",
    "default_max_clients",
    "default_pool_checkout_timeout",
    "auth_type",
    "enforce_ssl",
    "sni_hostname",
    "upstream_ssl",
    "upstream_verify",
    "upstream_tls_ca",
    "allow_list",
    "client_idle_timeout",
    "idle_transaction_timeout",
    "query_timeout",
    "replicas",
    "load_balance",
    "max_replica_lag_ms",
    "replica_ban_ms",
];
const USER_FIELDS: &[&str] = &[
    "db_user",
    "pool_size",
    "mode_type",
    "max_clients",
    "pool_checkout_timeout",
    "is_manager",
];

fn pick(from: &Map<String, Value>, fields: &[&str]) -> Map<String, Value> {
    fields
        .iter()
        .filter_map(|f| from.get(*f).map(|v| (f.to_string(), v.clone())))
        .collect()
}

/// The body of the PUT that `tenant update` sends: `current` is the tenant
/// as the API showed it (the `data` of `GET /api/tenants/ID`), with the
/// given fields changed.
pub fn tenant_update_body(current: &Value, a: &TenantUpdateArgs) -> Result<Value, CtlError> {
    let bad = |why: &str| CtlError::BadResponse {
        status: 200,
        why: format!("tenant {:?}: {why}", a.id),
    };
    let cur = current.as_object().ok_or_else(|| bad("not an object"))?;
    let mut t = pick(cur, TENANT_FIELDS);
    let mut users = Vec::new();
    if let Some(list) = cur.get("users") {
        for u in list.as_array().ok_or_else(|| bad("users is not a list"))? {
            let u = u
                .as_object()
                .ok_or_else(|| bad("a user is not an object"))?;
            users.push(pick(u, USER_FIELDS));
        }
    }
    let mut set = |k: &str, v: Value| {
        t.insert(k.into(), v);
    };
    if let Some(h) = &a.db_host {
        set("db_host", json!(h));
    }
    if let Some(p) = a.db_port {
        set("db_port", json!(p));
    }
    if let Some(d) = &a.db_database {
        set("db_database", json!(d));
    }
    if let Some(ms) = a.checkout_timeout_ms {
        set("default_pool_checkout_timeout", json!(ms));
    }
    if let Some(at) = a.auth_type {
        set("auth_type", json!(at.as_str()));
    }
    if let Some(r) = a.require_user {
        set("require_user", json!(r));
    }
    if let Some(q) = &a.auth_query {
        set("auth_query", json!(q));
    }
    a.security.apply(&mut t);
    a.replication.apply(&mut t);
    // A user whose own value equals the tenant's old default follows the new default.
    for (tenant_key, user_key, new) in [
        ("default_pool_size", "pool_size", a.pool_size),
        ("default_max_clients", "max_clients", a.max_clients),
    ] {
        let Some(n) = new else { continue };
        let old = t.get(tenant_key).cloned();
        for u in &mut users {
            if old.is_some() && u.get(user_key) == old.as_ref() {
                u.insert(user_key.into(), json!(n));
            }
        }
        t.insert(tenant_key.into(), json!(n));
    }
    t.insert(
        "users".into(),
        Value::Array(users.into_iter().map(Value::Object).collect()),
    );
    Ok(json!({ "tenant": t }))
}

/// `PUT /api/tenants/T/users/U` for `user add`.
pub fn user_add_request(a: &UserAddArgs) -> ApiRequest {
    let mut user = Map::new();
    user.insert("db_user".into(), json!(a.user));
    if let Some(p) = &a.password {
        user.insert("db_password".into(), json!(p));
    }
    if let Some(n) = a.pool_size {
        user.insert("pool_size".into(), json!(n));
    }
    user.insert("mode_type".into(), json!(a.mode.as_str()));
    if let Some(n) = a.max_clients {
        user.insert("max_clients".into(), json!(n));
    }
    user.insert("is_manager".into(), json!(a.manager));
    ApiRequest {
        method: "PUT",
        path: format!("{}/users/{}", tenant_path(&a.tenant), path_segment(&a.user)),
        body: Some(json!({ "user": user })),
        target: tenant_target(&a.tenant),
    }
}

fn get(path: String, target: String) -> ApiRequest {
    ApiRequest {
        method: "GET",
        path,
        body: None,
        target,
    }
}

/// The request of every subcommand but `tenant update` (a GET then a PUT).
pub fn request_for(cmd: &Cmd) -> Option<ApiRequest> {
    Some(match cmd {
        Cmd::Tenant { cmd } => match cmd {
            TenantCmd::Add(a) => tenant_add_request(a),
            TenantCmd::List => get("/api/tenants".into(), "tenants".into()),
            TenantCmd::Show { id } => get(tenant_path(id), tenant_target(id)),
            TenantCmd::Update(_) => return None,
            TenantCmd::Rm { id } => ApiRequest {
                method: "DELETE",
                path: tenant_path(id),
                body: None,
                target: tenant_target(id),
            },
            TenantCmd::Terminate { id } => {
                get(format!("{}/terminate", tenant_path(id)), tenant_target(id))
            }
        },
        Cmd::User { cmd } => match cmd {
            UserCmd::Add(a) => user_add_request(a),
            UserCmd::Rm { tenant, user } => ApiRequest {
                method: "DELETE",
                path: format!("{}/users/{}", tenant_path(tenant), path_segment(user)),
                body: None,
                target: format!("user {user:?} of tenant {tenant:?}"),
            },
        },
        Cmd::Pool {
            cmd: PoolCmd::List { cluster },
        } => {
            let path = if *cluster {
                "/api/pools?scope=cluster"
            } else {
                "/api/pools"
            };
            get(path.into(), "pools".into())
        }
        Cmd::Cluster { cmd } => match cmd {
            ClusterCmd::Status => get("/api/cluster".into(), "cluster".into()),
            ClusterCmd::Join {
                node_id,
                addr,
                voter,
            } => ApiRequest {
                method: "POST",
                path: "/api/cluster/join".into(),
                body: Some(json!({ "node_id": node_id, "addr": addr, "voter": voter })),
                target: format!("cluster node {node_id}"),
            },
            ClusterCmd::Leave { node_id } => ApiRequest {
                method: "POST",
                path: "/api/cluster/leave".into(),
                body: Some(json!({ "node_id": node_id })),
                target: format!("cluster node {node_id}"),
            },
        },
        Cmd::Health => get("/api/health".into(), "health".into()),
        Cmd::Token { .. } => return None,
    })
}

/// A token for the API: HS256, `{"role": "api", "iat": now, "exp": now + 300}`.
pub fn mint_token(secret: &str, now_secs: u64) -> Result<String, CtlError> {
    mint_token_for(secret, now_secs, TOKEN_TTL_SECS)
}

/// [`mint_token`] valid for `ttl_secs`.
pub fn mint_token_for(secret: &str, now_secs: u64, ttl_secs: u64) -> Result<String, CtlError> {
    let claims = json!({
        "role": "api",
        "iat": now_secs,
        "exp": now_secs.saturating_add(ttl_secs),
    });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// The Authorization header value: `--token`, else a token minted from
/// `--jwt-secret`, else none.
pub fn bearer(cli: &Cli) -> Result<Option<String>, CtlError> {
    if let Some(t) = cli.token.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Some(format!("Bearer {t}")));
    }
    if let Some(s) = cli.jwt_secret.as_deref().filter(|s| !s.is_empty()) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        return Ok(Some(format!("Bearer {}", mint_token(s, now)?)));
    }
    Ok(None)
}

/// An HTTP client bound to one API base URL and credentials.
pub struct ApiClient {
    agent: ureq::Agent,
    base: String,
    auth: Option<String>,
}

impl ApiClient {
    pub fn new(base: &str, auth: Option<String>) -> ApiClient {
        ApiClient {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .build(),
            base: base.trim_end_matches('/').to_string(),
            auth,
        }
    }

    /// Sends `req`; returns the whole JSON body of a 2xx answer (`Null` when empty).
    pub fn send(&self, req: &ApiRequest) -> Result<Value, CtlError> {
        let url = format!("{}{}", self.base, req.path);
        let mut r = self.agent.request(req.method, &url);
        if let Some(a) = &self.auth {
            r = r.set("Authorization", a);
        }
        r = r.set("Accept", "application/json");
        let result = match &req.body {
            Some(b) => r.send_json(b),
            None => r.call(),
        };
        match result {
            Ok(resp) => {
                let status = resp.status();
                let text = resp.into_string().map_err(|e| CtlError::BadResponse {
                    status,
                    why: format!("reading the body: {e}"),
                })?;
                parse_body(status, &text)
            }
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                Err(error_for(status, &text, &req.target))
            }
            Err(ureq::Error::Transport(t)) => Err(CtlError::Unreachable {
                url: self.base.clone(),
                source: Box::new(t),
            }),
        }
    }
}

fn parse_body(status: u16, text: &str) -> Result<Value, CtlError> {
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text).map_err(|e| CtlError::BadResponse {
        status,
        why: format!("not JSON: {e}"),
    })
}

/// The `data` of a success body (the whole body when it has none).
pub fn data_of(body: &Value) -> &Value {
    body.get("data").unwrap_or(body)
}

/// Maps an error answer to plain words.
pub fn error_for(status: u16, text: &str, target: &str) -> CtlError {
    let body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let message = body
        .get("error")
        .map(|e| match e {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .filter(|m| !m.is_empty());
    match status {
        401 | 403 => CtlError::Unauthorized(message),
        404 => CtlError::NotFound(match message {
            // The API names what is missing: `tenant "x"`, or a whole sentence.
            Some(m) => match m.strip_prefix("not found: ") {
                Some(subject) => format!("{subject} not found"),
                None if m.contains("not found") => m,
                None => format!("{m} not found"),
            },
            None => format!("{target} not found"),
        }),
        422 => CtlError::Invalid(
            body.get("errors")
                .and_then(Value::as_array)
                .map(|errs| {
                    errs.iter()
                        .map(|e| FieldError {
                            field: text_of(e.get("field")),
                            message: text_of(e.get("message")),
                        })
                        .collect()
                })
                .unwrap_or_else(|| {
                    message
                        .into_iter()
                        .map(|m| FieldError {
                            field: "request".into(),
                            message: m,
                        })
                        .collect()
                }),
        ),
        _ => CtlError::Api {
            status,
            message: message.unwrap_or_else(|| {
                let t = text.trim();
                if t.is_empty() {
                    "(no details)".into()
                } else {
                    t.chars().take(300).collect()
                }
            }),
        },
    }
}

/// A JSON value as table text: strings bare, null/absent as `-`.
fn text_of(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.into(),
        Some(other) => other.to_string(),
    }
}

/// Rows aligned under their headers, columns two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{:<w$}  ", c, w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn user_names(t: &Value) -> String {
    let names: Vec<String> = items(t.get("users").unwrap_or(&Value::Null))
        .iter()
        .map(|u| text_of(u.get("db_user")))
        .collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

fn database_of(t: &Value) -> String {
    format!(
        "{}:{}/{}",
        text_of(t.get("db_host")),
        text_of(t.get("db_port")),
        text_of(t.get("db_database"))
    )
}

pub fn render_tenant_list(data: &Value) -> String {
    let rows: Vec<Vec<String>> = items(data)
        .iter()
        .map(|t| {
            vec![
                text_of(t.get("external_id")),
                database_of(t),
                user_names(t),
                text_of(t.get("default_pool_size")),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no tenants\n".into();
    }
    table(&["ID", "DATABASE", "USERS", "POOL SIZE"], &rows)
}

pub fn render_tenant(t: &Value) -> String {
    let mut out = String::new();
    let auth_query = match t.get("auth_query") {
        None | Some(Value::Null) => "(default)".to_string(),
        v => text_of(v),
    };
    let fields = [
        ("tenant", text_of(t.get("external_id"))),
        ("database", database_of(t)),
        ("auth type", text_of(t.get("auth_type"))),
        ("require user", text_of(t.get("require_user"))),
        ("auth query", auth_query),
        ("default pool size", text_of(t.get("default_pool_size"))),
        ("default max clients", text_of(t.get("default_max_clients"))),
        (
            "checkout timeout ms",
            text_of(t.get("default_pool_checkout_timeout")),
        ),
        ("enforce ssl", text_of(t.get("enforce_ssl"))),
        ("sni hostname", text_of(t.get("sni_hostname"))),
        ("upstream ssl", text_of(t.get("upstream_ssl"))),
        ("upstream verify", text_of(t.get("upstream_verify"))),
        ("allow list", text_of(t.get("allow_list"))),
        ("replicas", replicas_of(t)),
        ("load balance", text_of(t.get("load_balance"))),
        ("max replica lag ms", text_of(t.get("max_replica_lag_ms"))),
        ("replica ban ms", text_of(t.get("replica_ban_ms"))),
    ];
    for (k, v) in fields {
        let _ = writeln!(out, "{k:<20} {v}");
    }
    let rows: Vec<Vec<String>> = items(t.get("users").unwrap_or(&Value::Null))
        .iter()
        .map(|u| {
            vec![
                text_of(u.get("db_user")),
                text_of(u.get("mode_type")),
                text_of(u.get("pool_size")),
                text_of(u.get("max_clients")),
                text_of(u.get("is_manager")),
            ]
        })
        .collect();
    out.push('\n');
    if rows.is_empty() {
        out.push_str("no users\n");
    } else {
        out.push_str(&table(
            &["USER", "MODE", "POOL SIZE", "MAX CLIENTS", "MANAGER"],
            &rows,
        ));
    }
    out
}

/// `host:port*weight, ...` of a tenant's replicas, `-` when none.
fn replicas_of(t: &Value) -> String {
    let list: Vec<String> = items(t.get("replicas").unwrap_or(&Value::Null))
        .iter()
        .map(|r| {
            format!(
                "{}:{}*{}",
                text_of(r.get("host")),
                text_of(r.get("port")),
                text_of(r.get("weight"))
            )
        })
        .collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(", ")
    }
}

pub fn render_pools(data: &Value) -> String {
    let rows: Vec<Vec<String>> = items(data)
        .iter()
        .map(|p| {
            [
                "tenant",
                "db_user",
                "mode",
                "shard",
                "pool_size",
                "server_connections",
                "idle",
                "checked_out",
                "clients",
                "waiting",
            ]
            .iter()
            .map(|k| text_of(p.get(*k)))
            .chain([
                match p.get("replica") {
                    Some(Value::String(r)) => r.clone(),
                    _ => "primary".into(),
                },
                text_of(p.get("node")),
            ])
            .collect()
        })
        .collect();
    if rows.is_empty() {
        return "no pools\n".into();
    }
    table(
        &[
            "TENANT", "USER", "MODE", "SHARD", "SIZE", "OPEN", "IDLE", "BUSY", "CLIENTS",
            "WAITING", "TARGET", "NODE",
        ],
        &rows,
    )
}

pub fn render_health(data: &Value) -> String {
    let mut out = String::new();
    match data.as_object() {
        Some(m) => {
            for (k, v) in m {
                let _ = writeln!(out, "{k:<12} {}", text_of(Some(v)));
            }
        }
        None => {
            let _ = writeln!(out, "{}", text_of(Some(data)));
        }
    }
    out
}

/// `GET /api/cluster` as a summary and one row per node.
pub fn render_cluster(data: &Value) -> String {
    let ids = |k: &str| {
        let v: Vec<String> = items(data.get(k).unwrap_or(&Value::Null))
            .iter()
            .map(|v| text_of(Some(v)))
            .collect();
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    let leader = match data.get("leader") {
        None | Some(Value::Null) => "none".to_string(),
        v => text_of(v),
    };
    let mut out = String::new();
    let _ = writeln!(out, "{:<14} {}", "node", text_of(data.get("node_id")));
    let _ = writeln!(out, "{:<14} {leader}", "leader");
    let _ = writeln!(out, "{:<14} {}", "voters", ids("voters"));
    let _ = writeln!(out, "{:<14} {}", "learners", ids("learners"));
    let _ = writeln!(
        out,
        "{:<14} {}",
        "last applied",
        text_of(data.get("last_applied"))
    );
    let _ = writeln!(out, "{:<14} {}", "last log", text_of(data.get("last_log")));
    out.push('\n');
    let leader_id = data.get("leader").and_then(Value::as_u64);
    let rows: Vec<Vec<String>> = items(data.get("nodes").unwrap_or(&Value::Null))
        .iter()
        .map(|n| {
            let id = n.get("node_id").and_then(Value::as_u64);
            let role = if id.is_some() && id == leader_id {
                "leader"
            } else if n.get("voter").and_then(Value::as_bool) == Some(true) {
                "voter"
            } else {
                "learner"
            };
            let seen = match n.get("last_seen_ms") {
                None | Some(Value::Null) => "-".to_string(),
                v => format!("{}ms", text_of(v)),
            };
            let health = match (n.get("last_seen_ms"), n.get("healthy")) {
                (None | Some(Value::Null), _) => "unknown",
                (_, Some(Value::Bool(true))) => "healthy",
                _ => "silent",
            };
            vec![
                text_of(n.get("node_id")),
                text_of(n.get("addr")),
                role.to_string(),
                seen,
                health.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["ID", "ADDR", "ROLE", "LAST SEEN", "HEALTH"],
        &rows,
    ));
    out
}

/// Runs one command, printing its result to `out`.
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<(), CtlError> {
    if let Cmd::Token { ttl_secs } = &cli.command {
        let Some(secret) = cli.jwt_secret.as_deref().filter(|s| !s.is_empty()) else {
            return Err(CtlError::Usage(
                "token: give --jwt-secret (API_JWT_SECRET) to mint with".into(),
            ));
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let token = mint_token_for(secret, now, *ttl_secs)?;
        return writeln!(out, "{token}").map_err(CtlError::from);
    }
    if let Cmd::Tenant {
        cmd: TenantCmd::Update(a),
    } = &cli.command
    {
        if a.is_empty() {
            return Err(CtlError::Usage(
                "nothing to update: give at least one of --db-host, --db-port, --db-database, \
                 --pool-size, --max-clients, --checkout-timeout-ms, --auth-type, \
                 --require-user, --auth-query"
                    .into(),
            ));
        }
    }
    let auth = bearer(cli)?;
    if auth.is_none() && !matches!(cli.command, Cmd::Health) {
        return Err(CtlError::Usage(
            "no credentials: give --token (SUPAVISOR_TOKEN) or --jwt-secret (API_JWT_SECRET)"
                .into(),
        ));
    }
    let client = ApiClient::new(&cli.api, auth);
    let body = match request_for(&cli.command) {
        Some(req) => client.send(&req)?,
        None => {
            let Cmd::Tenant {
                cmd: TenantCmd::Update(a),
            } = &cli.command
            else {
                return Err(CtlError::Usage("unsupported command".into()));
            };
            let shown = client.send(&get(tenant_path(&a.id), tenant_target(&a.id)))?;
            client.send(&ApiRequest {
                method: "PUT",
                path: tenant_path(&a.id),
                body: Some(tenant_update_body(data_of(&shown), a)?),
                target: tenant_target(&a.id),
            })?
        }
    };
    if cli.json {
        if !body.is_null() {
            let text = serde_json::to_string_pretty(&body).map_err(|e| CtlError::BadResponse {
                status: 200,
                why: e.to_string(),
            })?;
            writeln!(out, "{text}")?;
        }
        return Ok(());
    }
    let data = data_of(&body);
    let text = match &cli.command {
        Cmd::Tenant { cmd } => match cmd {
            TenantCmd::List => render_tenant_list(data),
            TenantCmd::Add(_) | TenantCmd::Update(_) | TenantCmd::Show { .. } => {
                render_tenant(data)
            }
            TenantCmd::Rm { id } => format!("tenant {id:?} deleted\n"),
            TenantCmd::Terminate { id } => {
                format!("tenant {id:?}: clients disconnected, pools closed\n")
            }
        },
        Cmd::User { cmd } => match cmd {
            UserCmd::Add(a) => format!(
                "user {:?} of tenant {:?} saved\n\n{}",
                a.user,
                a.tenant,
                render_tenant(data)
            ),
            UserCmd::Rm { tenant, user } => {
                format!("user {user:?} removed from tenant {tenant:?}\n")
            }
        },
        Cmd::Pool { .. } => render_pools(data),
        Cmd::Cluster { cmd } => match cmd {
            ClusterCmd::Status => render_cluster(data),
            ClusterCmd::Join { node_id, .. } => {
                format!("node {node_id} added\n\n{}", render_cluster(data))
            }
            ClusterCmd::Leave { node_id } => {
                format!("node {node_id} removed\n\n{}", render_cluster(data))
            }
        },
        Cmd::Health => render_health(data),
        Cmd::Token { .. } => String::new(),
    };
    out.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let mut full = vec!["supavisorctl"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).expect("parse")
    }

    #[test]
    fn tenant_add_maps_to_a_supavisor_shaped_put() {
        let cli = parse(&[
            "--api",
            "http://h:1",
            "tenant",
            "add",
            "acme",
            "--db-host",
            "127.0.0.1",
            "--db-port",
            "5433",
            "--db-database",
            "postgres",
            "--user",
            "postgres",
            "--password",
            "pw",
            "--pool-size",
            "2",
            "--mode",
            "transaction",
        ]);
        let req = request_for(&cli.command).unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/api/tenants/acme");
        assert_eq!(
            req.body.unwrap(),
            json!({"tenant": {
                "db_host": "127.0.0.1", "db_port": 5433, "db_database": "postgres",
                "require_user": true, "default_pool_size": 2, "auth_type": "scram-sha-256",
                "users": [{"db_user": "postgres", "db_password": "pw", "pool_size": 2,
                           "mode_type": "transaction", "is_manager": false}]
            }})
        );
        // The body deserializes into the model the API uses.
        let spec: crate::model::TenantEnvelope<crate::model::TenantSpec> = serde_json::from_value(
            tenant_add_request(match &cli.command {
                Cmd::Tenant {
                    cmd: TenantCmd::Add(a),
                } => a,
                _ => unreachable!(),
            })
            .body
            .unwrap(),
        )
        .unwrap();
        assert!(spec.tenant.validate().is_empty());

        let cli = parse(&[
            "tenant",
            "add",
            "t2",
            "--db-host",
            "db",
            "--db-port",
            "5432",
            "--db-database",
            "app",
            "--user",
            "mgr",
            "--password",
            "pw",
            "--pool-size",
            "5",
            "--mode",
            "session",
            "--max-clients",
            "50",
            "--auth-type",
            "md5",
            "--require-user",
            "false",
            "--auth-query",
            "SELECT 1",
            "--manager",
            "--json",
        ]);
        assert!(cli.json);
        let body = request_for(&cli.command).unwrap().body.unwrap();
        let t = &body["tenant"];
        assert_eq!(t["require_user"], json!(false));
        assert_eq!(t["auth_query"], json!("SELECT 1"));
        assert_eq!(t["auth_type"], json!("md5"));
        assert_eq!(t["users"][0]["mode_type"], json!("session"));
        assert_eq!(t["users"][0]["max_clients"], json!(50));
        assert_eq!(t["users"][0]["is_manager"], json!(true));
        assert!(t.get("replicas").is_none());

        // Replicas: host:port[:weight], repeated; [v6] hosts.
        let mut args = vec![
            "tenant",
            "add",
            "t3",
            "--db-host",
            "db",
            "--db-port",
            "5432",
            "--db-database",
            "app",
            "--user",
            "u",
            "--password",
            "pw",
            "--pool-size",
            "5",
            "--mode",
            "transaction",
        ];
        args.extend([
            "--replica",
            "replica-1:5433:3",
            "--replica",
            "[fd00::2]:5432",
            "--load-balance",
            "reads",
            "--max-replica-lag-ms",
            "2000",
        ]);
        let body = request_for(&parse(&args).command).unwrap().body.unwrap();
        let t = &body["tenant"];
        assert_eq!(
            t["replicas"],
            json!([{"host": "replica-1", "port": 5433, "weight": 3, "pool_size": null},
                   {"host": "fd00::2", "port": 5432, "weight": 1, "pool_size": null}])
        );
        assert_eq!(t["load_balance"], json!("reads"));
        assert_eq!(t["max_replica_lag_ms"], json!(2000));
        let spec: crate::model::TenantEnvelope<crate::model::TenantSpec> =
            serde_json::from_value(body).unwrap();
        assert!(spec.tenant.validate().is_empty());
        assert_eq!(spec.tenant.replicas[0].weight, 3);
        assert_eq!(spec.tenant.load_balance, crate::model::LoadBalance::Reads);
        for bad in ["r1", "r1:x", "r1:5432:w", "[::1:5432", ":"] {
            let mut full = vec!["supavisorctl"];
            full.extend_from_slice(&args[..17]);
            full.extend(["--replica", bad]);
            assert!(Cli::try_parse_from(full).is_err(), "{bad}");
        }
    }

    #[test]
    fn other_commands_map_to_their_endpoints() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["tenant", "list"], "GET", "/api/tenants"),
            (&["tenant", "show", "acme"], "GET", "/api/tenants/acme"),
            (&["tenant", "rm", "acme"], "DELETE", "/api/tenants/acme"),
            (
                &["tenant", "terminate", "acme"],
                "GET",
                "/api/tenants/acme/terminate",
            ),
            (
                &["user", "rm", "acme", "app user"],
                "DELETE",
                "/api/tenants/acme/users/app%20user",
            ),
            (&["pool", "list"], "GET", "/api/pools"),
            (&["health"], "GET", "/api/health"),
            (&["cluster", "status"], "GET", "/api/cluster"),
        ];
        for (args, method, path) in cases {
            let req = request_for(&parse(args).command).unwrap();
            assert_eq!(
                (req.method, req.path.as_str()),
                (*method, *path),
                "{args:?}"
            );
            assert!(req.body.is_none());
        }
        let req = request_for(
            &parse(&[
                "user",
                "add",
                "acme",
                "--user",
                "app",
                "--password",
                "pw",
                "--pool-size",
                "4",
            ])
            .command,
        )
        .unwrap();
        assert_eq!(
            (req.method, req.path.as_str()),
            ("PUT", "/api/tenants/acme/users/app")
        );
        assert_eq!(
            req.body.unwrap(),
            json!({"user": {"db_user": "app", "db_password": "pw", "pool_size": 4,
                            "mode_type": "transaction", "is_manager": false}})
        );
        // Without a password the user keeps the stored one.
        let req = request_for(
            &parse(&["user", "add", "acme", "--user", "app", "--mode", "session"]).command,
        )
        .unwrap();
        assert_eq!(
            req.body.unwrap(),
            json!({"user": {"db_user": "app", "mode_type": "session", "is_manager": false}})
        );
    }

    #[test]
    fn usage_errors_are_refused_by_the_parser() {
        for args in [
            &["tenant", "add", "acme", "--db-host", "h"][..],
            &["tenant", "add", "acme", "--db-host", "h", "--db-port", "x"][..],
            &["tenant", "show"][..],
            &["user", "add", "acme", "--user", "u", "--mode", "statement"][..],
            &["frobnicate"][..],
        ] {
            let mut full = vec!["supavisorctl"];
            full.extend_from_slice(args);
            let err = Cli::try_parse_from(full).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let cli = parse(&["tenant", "update", "acme"]);
        let err = run(&cli, &mut Vec::new()).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
    }

    #[test]
    fn update_keeps_fields_drops_view_extras_and_moves_following_users() {
        let shown = json!({
            "external_id": "acme", "db_host": "h", "db_port": 5432, "db_database": "d",
            "require_user": true, "auth_query": null, "default_pool_size": 2,
            "default_max_clients": 1000, "default_pool_checkout_timeout": 60000,
            "auth_type": "scram-sha-256", "inserted_at": "2024-01-01",
            "enforce_ssl": true, "sni_hostname": "db.acme.test", "upstream_ssl": false,
            "upstream_verify": null, "upstream_tls_ca": null, "allow_list": ["10.0.0.0/8"],
            "users": [
                {"db_user": "a", "pool_size": 2, "mode_type": "transaction", "max_clients": null,
                 "pool_checkout_timeout": null, "is_manager": false, "extra": 1},
                {"db_user": "b", "pool_size": 7, "mode_type": "session", "max_clients": 1000,
                 "pool_checkout_timeout": null, "is_manager": true}
            ]
        });
        let args = TenantUpdateArgs {
            id: "acme".into(),
            pool_size: Some(3),
            max_clients: Some(10),
            db_port: Some(6000),
            security: SecurityArgs {
                upstream_ssl: Some(true),
                upstream_verify: Some("none".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let body = tenant_update_body(&shown, &args).unwrap();
        let t = &body["tenant"];
        assert!(t.get("replicas").is_none(), "not named: not sent (kept)");
        let with_replicas = TenantUpdateArgs {
            id: "acme".into(),
            replication: ReplicaArgs {
                replicas: vec!["r:1:2".parse().unwrap()],
                ..Default::default()
            },
            ..Default::default()
        };
        let b = tenant_update_body(&shown, &with_replicas).unwrap();
        assert_eq!(b["tenant"]["replicas"][0]["weight"], json!(2));
        let none = TenantUpdateArgs {
            id: "acme".into(),
            replication: ReplicaArgs {
                no_replicas: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let b = tenant_update_body(&shown, &none).unwrap();
        assert_eq!(b["tenant"]["replicas"], json!([]));
        // TLS and access settings not named are kept; the named ones change.
        assert_eq!(t["enforce_ssl"], json!(true));
        assert_eq!(t["sni_hostname"], json!("db.acme.test"));
        assert_eq!(t["allow_list"], json!(["10.0.0.0/8"]));
        assert_eq!(t["upstream_ssl"], json!(true));
        assert_eq!(t["upstream_verify"], json!("none"));
        assert!(t.get("external_id").is_none() && t.get("inserted_at").is_none());
        assert_eq!(t["default_pool_size"], json!(3));
        assert_eq!(t["default_max_clients"], json!(10));
        assert_eq!(t["db_port"], json!(6000));
        assert_eq!(t["db_host"], json!("h"));
        assert_eq!(t["users"][0]["pool_size"], json!(3), "followed the default");
        assert_eq!(t["users"][1]["pool_size"], json!(7), "own value kept");
        assert_eq!(t["users"][0]["max_clients"], json!(null));
        assert_eq!(t["users"][1]["max_clients"], json!(10));
        assert!(t["users"][0].get("extra").is_none());
        assert!(t["users"][0].get("db_password").is_none());
        // What is sent is a valid TenantSpec for the API.
        let env: crate::model::TenantEnvelope<crate::model::TenantSpec> =
            serde_json::from_value(body).unwrap();
        assert_eq!(env.tenant.users[0].db_password, None);
        assert!(tenant_update_body(&json!([1]), &args).is_err());
    }

    #[test]
    fn minted_tokens_decode_with_the_same_secret_only() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = mint_token("s3cret", now).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.set_required_spec_claims(&["exp"]);
        let got = jsonwebtoken::decode::<Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"s3cret"),
            &v,
        )
        .unwrap();
        assert_eq!(got.claims["role"], json!("api"));
        assert_eq!(got.claims["iat"], json!(now));
        assert_eq!(got.claims["exp"], json!(now + TOKEN_TTL_SECS));
        assert!(jsonwebtoken::decode::<Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"other"),
            &v,
        )
        .is_err());
        // --token wins over --jwt-secret; neither means no header.
        let cli = parse(&["--token", "abc", "--jwt-secret", "s", "health"]);
        assert_eq!(bearer(&cli).unwrap().as_deref(), Some("Bearer abc"));
        let cli = parse(&["--jwt-secret", "s3cret", "health"]);
        assert!(bearer(&cli).unwrap().unwrap().starts_with("Bearer ey"));
        // `token` prints one, valid for --ttl-secs, without asking the API.
        let cli = parse(&["--jwt-secret", "s3cret", "token", "--ttl-secs", "60"]);
        let mut out = Vec::new();
        run(&cli, &mut out).unwrap();
        let printed = String::from_utf8(out).unwrap();
        let got = jsonwebtoken::decode::<Value>(
            printed.trim_end(),
            &jsonwebtoken::DecodingKey::from_secret(b"s3cret"),
            &v,
        )
        .unwrap();
        let exp = got.claims["exp"].as_u64().unwrap();
        assert!((now + 59..=now + 120).contains(&exp), "{exp} vs {now}");
        let err = run(&parse(&["token"]), &mut Vec::new()).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn error_answers_read_as_plain_words() {
        let e = error_for(
            404,
            r#"{"error": "not found: tenant \"x\""}"#,
            "tenant \"y\"",
        );
        assert_eq!(e.to_string(), "tenant \"x\" not found");
        let e = error_for(404, "", "tenant \"y\"");
        assert_eq!(e.to_string(), "tenant \"y\" not found");
        let e = error_for(404, r#"{"error": "user \"u\" of tenant \"t\""}"#, "x");
        assert_eq!(e.to_string(), "user \"u\" of tenant \"t\" not found");
        let e = error_for(
            422,
            r#"{"errors": [{"field": "users[0].pool_size", "message": "must be at least 1"}]}"#,
            "t",
        );
        assert_eq!(
            e.to_string(),
            "invalid input: users[0].pool_size must be at least 1"
        );
        let e = error_for(401, r#"{"error": "bad token"}"#, "t");
        assert!(e
            .to_string()
            .starts_with("unauthorized: check --token / API_JWT_SECRET"));
        let e = error_for(503, r#"{"error": "no leader"}"#, "t");
        assert_eq!(e.to_string(), "the API answered 503: no leader");
        assert_eq!(e.exit_code(), 1);
        let e = error_for(500, "<html>oops</html>", "t");
        assert!(e.to_string().contains("oops"));
    }

    #[test]
    fn unreachable_api_is_reported_with_its_url() {
        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let api = format!("http://127.0.0.1:{port}");
        let cli = parse(&["--api", &api, "--token", "t", "tenant", "list"]);
        let err = run(&cli, &mut Vec::new()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot reach the API at {api}:")),
            "{err}"
        );
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn tables_are_aligned() {
        let data = json!([
            {"external_id": "acme", "db_host": "127.0.0.1", "db_port": 5432, "db_database": "postgres",
             "default_pool_size": 2, "users": [{"db_user": "postgres"}, {"db_user": "app"}]},
            {"external_id": "b", "db_host": "h", "db_port": 1, "db_database": "d",
             "default_pool_size": 15, "users": []}
        ]);
        let text = render_tenant_list(&data);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ID    DATABASE                 USERS         POOL SIZE"
        );
        assert_eq!(lines[1], "acme  127.0.0.1:5432/postgres  postgres,app  2");
        assert_eq!(lines[2], "b     h:1/d                    -             15");
        let pools = render_pools(&json!([{"node": 1, "tenant": "acme", "db_user": "postgres",
            "mode": "transaction", "replica": null, "shard": 1, "pool_size": 2,
            "server_connections": 1, "idle": 1, "checked_out": 0, "clients": 0, "waiting": 0}]));
        assert!(
            pools.starts_with("TENANT  USER      MODE         SHARD  SIZE"),
            "{pools}"
        );
        assert!(
            pools.contains("acme    postgres  transaction  1      2"),
            "{pools}"
        );
        assert!(
            pools.lines().nth(1).unwrap().ends_with("primary  1"),
            "{pools}"
        );
        let replica = render_pools(&json!([{"node": 2, "tenant": "acme", "db_user": "postgres",
            "mode": "session", "replica": "10.0.0.2:5432", "shard": 0}]));
        assert!(
            replica
                .lines()
                .nth(1)
                .unwrap()
                .ends_with("10.0.0.2:5432  2"),
            "{replica}"
        );
        assert_eq!(render_pools(&json!([])), "no pools\n");
    }

    #[test]
    fn cluster_commands_and_status_table() {
        let req =
            request_for(&parse(&["cluster", "join", "4", "10.0.0.4:7100", "--voter"]).command)
                .unwrap();
        assert_eq!(
            (req.method, req.path.as_str()),
            ("POST", "/api/cluster/join")
        );
        assert_eq!(
            req.body,
            Some(json!({"node_id": 4, "addr": "10.0.0.4:7100", "voter": true}))
        );
        let req = request_for(&parse(&["cluster", "leave", "4"]).command).unwrap();
        assert_eq!(
            (req.method, req.path.as_str()),
            ("POST", "/api/cluster/leave")
        );
        assert_eq!(req.body, Some(json!({"node_id": 4})));
        let text = render_cluster(&json!({
            "node_id": 2, "leader": 1, "voters": [1, 2], "learners": [3],
            "last_applied": 12, "last_log": 12, "lease_valid": true,
            "nodes": [
                {"node_id": 1, "addr": "10.0.0.1:7100", "voter": true, "last_seen_ms": 5, "healthy": true},
                {"node_id": 2, "addr": "10.0.0.2:7100", "voter": true, "last_seen_ms": 4000, "healthy": false},
                {"node_id": 3, "addr": "10.0.0.3:7100", "voter": false, "last_seen_ms": null, "healthy": false}
            ]
        }));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "leader         1");
        assert_eq!(lines[2], "voters         1,2");
        assert_eq!(lines[3], "learners       3");
        assert_eq!(lines[4], "last applied   12");
        assert_eq!(lines[7], "ID  ADDR           ROLE     LAST SEEN  HEALTH");
        assert_eq!(lines[8], "1   10.0.0.1:7100  leader   5ms        healthy");
        assert_eq!(lines[9], "2   10.0.0.2:7100  voter    4000ms     silent");
        assert_eq!(lines[10], "3   10.0.0.3:7100  learner  -          unknown");
        assert!(render_cluster(&json!({"leader": null})).contains("leader         none"));
    }
}
