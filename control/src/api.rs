//! The HTTP API of a node: tenants and users, pools, health, Prometheus
//! metrics, the OpenAPI document and Swagger UI. hyper 1 (HTTP/1.1) on the
//! control runtime (tokio); every route translates to one
//! [`ControlPlane`] call, run on the blocking pool because the plane may wait
//! on the store or the shards.
//!
//! Auth: HS256 bearer tokens (Supavisor's are like `{"role": "anon"}`),
//! `exp` checked when present. `/api/*` uses `jwt_secret`, `/metrics*`
//! `metrics_jwt_secret`; `/api/health`, `/api/openapi` and `/swaggerui*` are
//! open.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, warn};
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{OpenApi, ToSchema};

use crate::model::{valid_id, FieldError, TenantEnvelope, TenantSpec, TenantView, UserSpec};
use crate::model::{LoadBalance, ReplicaSpec};
use crate::plane::{
    ClusterNodeView, ClusterPools, ClusterView, ControlPlane, Health, NodeAnswered, PlaneError,
    PoolView,
};

/// Largest request body accepted (413 above).
pub const MAX_BODY: usize = 1 << 20;
/// An oversized body up to this size is drained before the 413 is sent.
const DRAIN_LIMIT: usize = 8 << 20;
/// Time allowed for a whole request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Where the OpenAPI document is served; Swagger UI loads it from here.
pub const OPENAPI_PATH: &str = "/api/openapi";
const JSON: &str = "application/json";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// The secrets bearer tokens are checked against. `None` (or an empty
/// string): the routes they guard answer 401 to everyone.
#[derive(Clone, Default)]
pub struct ApiAuth {
    pub jwt_secret: Option<String>,
    pub metrics_jwt_secret: Option<String>,
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("ApiAuth")
            .field("jwt_secret", &redact(&self.jwt_secret))
            .field("metrics_jwt_secret", &redact(&self.metrics_jwt_secret))
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Bodies (request and response), shared by the handlers and the OpenAPI document.

/// `{"data": TenantView}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TenantData {
    pub data: TenantView,
}

/// `{"data": [TenantView]}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TenantList {
    pub data: Vec<TenantView>,
}

/// `{"data": [PoolView]}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PoolList {
    pub data: Vec<PoolView>,
}

/// `{"user": UserSpec}`: the body of `PUT /api/tenants/{external_id}/users/{db_user}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserEnvelope {
    pub user: UserSpec,
}

/// `{"data": ClusterView}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterData {
    pub data: ClusterView,
}

/// The body of `POST /api/cluster/join`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub node_id: u64,
    /// The new node's raft (node-to-node) address, host:port.
    pub addr: String,
    /// Promote to voter after catching up (default: stay a learner).
    #[serde(default)]
    pub voter: bool,
}

/// The body of `POST /api/cluster/leave`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {
    pub node_id: u64,
}

/// `{"error": "..."}`: 401, 404, 405, 413, 500, 503.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// `{"errors": [{"field", "message"}]}`: 422. A body that is not valid JSON
/// of the right shape is reported as field `body`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FieldErrors {
    pub errors: Vec<FieldError>,
}

// ---------------------------------------------------------------------------
// Replies.

/// A response before it becomes a hyper one.
#[derive(Debug)]
pub struct Reply {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Reply {
    fn new(status: StatusCode, content_type: Option<HeaderValue>, body: Bytes) -> Reply {
        Reply {
            status,
            content_type,
            headers: Vec::new(),
            body,
        }
    }

    fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply::new(
                status,
                Some(HeaderValue::from_static(JSON)),
                Bytes::from(body),
            ),
            Err(e) => {
                warn!(error = %e, "serializing a response");
                Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }

    fn error(status: StatusCode, message: impl Into<String>) -> Reply {
        // ErrorBody always serializes.
        let body = serde_json::to_vec(&ErrorBody {
            error: message.into(),
        })
        .unwrap_or_default();
        Reply::new(
            status,
            Some(HeaderValue::from_static(JSON)),
            Bytes::from(body),
        )
    }

    fn invalid(errors: Vec<FieldError>) -> Reply {
        Reply::json(StatusCode::UNPROCESSABLE_ENTITY, &FieldErrors { errors })
    }

    fn no_content() -> Reply {
        Reply::new(StatusCode::NO_CONTENT, None, Bytes::new())
    }

    fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Reply {
        self.headers.push((name, value));
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(self.body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        if let Some(ct) = self.content_type {
            h.insert(header::CONTENT_TYPE, ct);
        }
        for (name, value) in self.headers {
            h.insert(name, value);
        }
        resp
    }
}

fn plane_error(e: PlaneError) -> Reply {
    match e {
        PlaneError::NotFound(msg) => Reply::error(StatusCode::NOT_FOUND, msg),
        PlaneError::Invalid(errors) => Reply::invalid(errors),
        PlaneError::Unavailable(msg) => Reply::error(StatusCode::SERVICE_UNAVAILABLE, msg),
        PlaneError::Internal(msg) => {
            warn!(error = %msg, "control plane error");
            Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal error: {msg}"),
            )
        }
    }
}

/// Run a plane call on the blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, Reply>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, PlaneError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(plane_error(e)),
        Err(e) => {
            warn!(error = %e, "control plane call panicked");
            Err(Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
            ))
        }
    }
}

/// Parse a JSON body; serde's message (never the body itself) on failure.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| {
        Reply::invalid(vec![FieldError {
            field: "body".into(),
            message: e.to_string(),
        }])
    })
}

fn reply_of<T: Serialize>(status: StatusCode, r: Result<T, Reply>) -> Reply {
    match r {
        Ok(v) => Reply::json(status, &v),
        Err(reply) => reply,
    }
}

// ---------------------------------------------------------------------------
// Handlers: one per route, over the plane, path parameters and body bytes.

/// Liveness and a summary of the node.
#[utoipa::path(get, path = "/api/health", tag = "node",
    responses((status = 200, description = "The node answers", body = Health)))]
pub async fn health(plane: Arc<dyn ControlPlane>) -> Reply {
    reply_of(StatusCode::OK, blocking(move || Ok(plane.health())).await)
}

/// All tenants (without passwords).
#[utoipa::path(get, path = "/api/tenants", tag = "tenants",
    responses(
        (status = 200, description = "The tenants", body = TenantList),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_tenants(plane: Arc<dyn ControlPlane>) -> Reply {
    let r = blocking(move || plane.list_tenants()).await;
    reply_of(StatusCode::OK, r.map(|data| TenantList { data }))
}

/// Create or replace a tenant. Users listed without `db_password` keep their
/// stored one; new users need one. Takes effect at once: new logins use the
/// new settings, pools are resized.
#[utoipa::path(put, path = "/api/tenants/{external_id}", tag = "tenants",
    params(("external_id" = String, Path, description = "Tenant id: 1 to 128 of [A-Za-z0-9_-]")),
    request_body(content = TenantEnvelope<TenantSpec>, description = "`{\"tenant\": {...}}`"),
    responses(
        (status = 201, description = "Created", body = TenantData),
        (status = 200, description = "Updated", body = TenantData),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "Invalid fields", body = FieldErrors),
        (status = 503, description = "The store cannot take writes now", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn put_tenant(plane: Arc<dyn ControlPlane>, id: String, body: Bytes) -> Reply {
    let env: TenantEnvelope<TenantSpec> = match parse_body(&body) {
        Ok(env) => env,
        Err(reply) => return reply,
    };
    let spec = env.tenant;
    let mut errors = Vec::new();
    if !valid_id(&id) {
        errors.push(FieldError {
            field: "external_id".into(),
            message: "must be 1 to 128 characters of A-Z, a-z, 0-9, _ and -".into(),
        });
    }
    errors.extend(spec.validate());
    if !errors.is_empty() {
        return Reply::invalid(errors);
    }
    // The trait's upsert does not say whether it created: look first. A
    // concurrent PUT of the same id may make the status 200 where 201 was
    // due; the stored result is the same.
    let r = blocking(move || {
        let existed = match plane.get_tenant(&id) {
            Ok(_) => true,
            Err(PlaneError::NotFound(_)) => false,
            Err(e) => return Err(e),
        };
        plane.put_tenant(&id, spec).map(|data| (existed, data))
    })
    .await;
    match r {
        Ok((existed, data)) => {
            let status = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Reply::json(status, &TenantData { data })
        }
        Err(reply) => reply,
    }
}

/// One tenant.
#[utoipa::path(get, path = "/api/tenants/{external_id}", tag = "tenants",
    params(("external_id" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "The tenant", body = TenantData),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get_tenant(plane: Arc<dyn ControlPlane>, id: String) -> Reply {
    let r = blocking(move || plane.get_tenant(&id)).await;
    reply_of(StatusCode::OK, r.map(|data| TenantData { data }))
}

/// Delete a tenant: its clients get 57P01, its pools close, new logins fail.
#[utoipa::path(delete, path = "/api/tenants/{external_id}", tag = "tenants",
    params(("external_id" = String, Path, description = "Tenant id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 503, description = "The store cannot take writes now", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete_tenant(plane: Arc<dyn ControlPlane>, id: String) -> Reply {
    match blocking(move || plane.delete_tenant(&id)).await {
        Ok(()) => Reply::no_content(),
        Err(reply) => reply,
    }
}

/// Drop a tenant's clients (57P01) and close its pools; the tenant stays and
/// accepts new logins.
#[utoipa::path(get, path = "/api/tenants/{external_id}/terminate", tag = "tenants",
    params(("external_id" = String, Path, description = "Tenant id")),
    responses(
        (status = 204, description = "Clients and pools dropped"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn terminate_tenant(plane: Arc<dyn ControlPlane>, id: String) -> Reply {
    match blocking(move || plane.terminate_tenant(&id)).await {
        Ok(()) => Reply::no_content(),
        Err(reply) => reply,
    }
}

/// Create or replace one user of a tenant. `db_user` in the body must equal
/// the path's; an absent `db_password` keeps the stored one.
#[utoipa::path(put, path = "/api/tenants/{external_id}/users/{db_user}", tag = "tenants",
    params(
        ("external_id" = String, Path, description = "Tenant id"),
        ("db_user" = String, Path, description = "Database user (percent-encoded)"),
    ),
    request_body(content = UserEnvelope, description = "`{\"user\": {...}}`"),
    responses(
        (status = 200, description = "The tenant after the change", body = TenantData),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "Invalid fields", body = FieldErrors),
        (status = 503, description = "The store cannot take writes now", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn put_user(
    plane: Arc<dyn ControlPlane>,
    id: String,
    db_user: String,
    body: Bytes,
) -> Reply {
    let env: UserEnvelope = match parse_body(&body) {
        Ok(env) => env,
        Err(reply) => return reply,
    };
    if env.user.db_user != db_user {
        return Reply::invalid(vec![FieldError {
            field: "user.db_user".into(),
            message: "must equal the db_user of the path".into(),
        }]);
    }
    let user = env.user;
    let r = blocking(move || plane.put_user(&id, user)).await;
    reply_of(StatusCode::OK, r.map(|data| TenantData { data }))
}

/// Remove one user of a tenant; its clients are dropped.
#[utoipa::path(delete, path = "/api/tenants/{external_id}/users/{db_user}", tag = "tenants",
    params(
        ("external_id" = String, Path, description = "Tenant id"),
        ("db_user" = String, Path, description = "Database user (percent-encoded)"),
    ),
    responses(
        (status = 200, description = "The tenant after the change", body = TenantData),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such tenant or user", body = ErrorBody),
        (status = 503, description = "The store cannot take writes now", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete_user(plane: Arc<dyn ControlPlane>, id: String, db_user: String) -> Reply {
    let r = blocking(move || plane.delete_user(&id, &db_user)).await;
    reply_of(StatusCode::OK, r.map(|data| TenantData { data }))
}

/// The pools of this node, one per (tenant, user, mode, replica, shard);
/// with `scope=cluster`, every node's (each row names its node) and which
/// nodes answered.
#[utoipa::path(get, path = "/api/pools", tag = "node",
    params(("scope" = Option<String>, Query, description = "`cluster`: every node's pools")),
    responses(
        (status = 200, description = "The pools (with scope=cluster: `ClusterPools`)", body = PoolList),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_pools(plane: Arc<dyn ControlPlane>, scope: Scope) -> Reply {
    match scope {
        Scope::Node => {
            let r = blocking(move || plane.pools()).await;
            reply_of(StatusCode::OK, r.map(|data| PoolList { data }))
        }
        Scope::Cluster => {
            let r = blocking(move || plane.cluster_pools()).await;
            reply_of(StatusCode::OK, r)
        }
    }
}

/// The cluster as this node sees it: leader, voters, learners, progress and
/// each node's health (as the leader last heard from it).
#[utoipa::path(get, path = "/api/cluster", tag = "cluster",
    responses(
        (status = 200, description = "The cluster", body = ClusterData),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn cluster_status(plane: Arc<dyn ControlPlane>) -> Reply {
    let r = blocking(move || plane.cluster_status()).await;
    reply_of(StatusCode::OK, r.map(|data| ClusterData { data }))
}

/// Add a node as a learner (it catches up first), or a voter. The node must
/// be running, with `[cluster]` settings that do not make it initialize a
/// group of its own (e.g. `peers` naming a lower id).
#[utoipa::path(post, path = "/api/cluster/join", tag = "cluster",
    request_body(content = JoinRequest, description = "`{\"node_id\", \"addr\", \"voter\"}`"),
    responses(
        (status = 200, description = "The cluster after the change", body = ClusterData),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 422, description = "Invalid body", body = FieldErrors),
        (status = 503, description = "No leader, or the change did not complete", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn cluster_join(plane: Arc<dyn ControlPlane>, body: Bytes) -> Reply {
    let req: JoinRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if req.addr.is_empty() || req.node_id == 0 {
        return Reply::invalid(vec![FieldError {
            field: if req.node_id == 0 { "node_id" } else { "addr" }.into(),
            message: "must be set (node_id above 0, addr host:port)".into(),
        }]);
    }
    let r = blocking(move || {
        plane.cluster_join(req.node_id, &req.addr, req.voter)?;
        plane.cluster_status()
    })
    .await;
    reply_of(StatusCode::OK, r.map(|data| ClusterData { data }))
}

/// Remove a node from the cluster; its pool claims are released.
#[utoipa::path(post, path = "/api/cluster/leave", tag = "cluster",
    request_body(content = LeaveRequest, description = "`{\"node_id\"}`"),
    responses(
        (status = 200, description = "The cluster after the change", body = ClusterData),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such member", body = ErrorBody),
        (status = 422, description = "Invalid body", body = FieldErrors),
        (status = 503, description = "No leader, or the change did not complete", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn cluster_leave(plane: Arc<dyn ControlPlane>, body: Bytes) -> Reply {
    let req: LeaveRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let r = blocking(move || {
        plane.cluster_leave(req.node_id)?;
        plane.cluster_status()
    })
    .await;
    reply_of(StatusCode::OK, r.map(|data| ClusterData { data }))
}

fn metrics_reply(r: Result<String, Reply>) -> Reply {
    match r {
        Ok(text) => Reply::new(
            StatusCode::OK,
            Some(HeaderValue::from_static(PROMETHEUS_TEXT)),
            Bytes::from(text),
        ),
        Err(reply) => reply,
    }
}

/// Prometheus metrics of the node (token signed with the metrics secret);
/// with `scope=cluster`, every node's, each series labelled with its `node`
/// (scrape one node that way, or every node without it, not both).
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    params(("scope" = Option<String>, Query, description = "`cluster`: every node's series")),
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    ),
    security(("metrics_bearer" = [])))]
pub async fn metrics(plane: Arc<dyn ControlPlane>, scope: Scope) -> Reply {
    metrics_reply(
        blocking(move || match scope {
            Scope::Node => plane.metrics(None),
            Scope::Cluster => plane.cluster_metrics(None),
        })
        .await,
    )
}

/// Prometheus metrics of one tenant (`scope=cluster`: on every node).
#[utoipa::path(get, path = "/metrics/{external_id}", tag = "metrics",
    params(
        ("external_id" = String, Path, description = "Tenant id"),
        ("scope" = Option<String>, Query, description = "`cluster`: every node's series"),
    ),
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ),
    security(("metrics_bearer" = [])))]
pub async fn tenant_metrics(plane: Arc<dyn ControlPlane>, id: String, scope: Scope) -> Reply {
    metrics_reply(
        blocking(move || match scope {
            Scope::Node => plane.metrics(Some(&id)),
            Scope::Cluster => plane.cluster_metrics(Some(&id)),
        })
        .await,
    )
}

// ---------------------------------------------------------------------------
// OpenAPI and Swagger UI.

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |what: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(format!("HS256 JWT signed with {what}")))
                    .build(),
            )
        };
        components.add_security_scheme("bearer", bearer("API_JWT_SECRET"));
        components.add_security_scheme("metrics_bearer", bearer("METRICS_JWT_SECRET"));
        // `db_password` is never serialized, so the derive leaves it out; it
        // is an input all the same.
        if let Some(RefOr::T(Schema::Object(user))) = components.schemas.get_mut("UserSpec") {
            user.properties.insert(
                "db_password".into(),
                ObjectBuilder::new()
                    .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
                    .write_only(Some(true))
                    .description(Some(
                        "Write-only: never returned. On update, an absent password keeps the stored one.",
                    ))
                    .into(),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Supavisor-rs",
        description = "Tenants, users, pools and metrics of a Supavisor-rs node."
    ),
    paths(
        health,
        list_tenants,
        put_tenant,
        get_tenant,
        delete_tenant,
        terminate_tenant,
        put_user,
        delete_user,
        list_pools,
        metrics,
        tenant_metrics,
        cluster_status,
        cluster_join,
        cluster_leave
    ),
    components(schemas(
        TenantSpec,
        UserSpec,
        TenantView,
        TenantData,
        TenantList,
        UserEnvelope,
        PoolView,
        PoolList,
        ClusterPools,
        NodeAnswered,
        ReplicaSpec,
        LoadBalance,
        Health,
        ErrorBody,
        FieldErrors,
        FieldError,
        ClusterView,
        ClusterNodeView,
        ClusterData,
        JoinRequest,
        LeaveRequest
    )),
    modifiers(&SecurityAddon),
    tags(
        (name = "tenants", description = "Tenants and their database users"),
        (name = "node", description = "This node: health and pools"),
        (name = "metrics", description = "Prometheus"),
        (name = "cluster", description = "The raft group this node belongs to")
    )
)]
struct ApiDoc;

/// The OpenAPI document, generated from the types the handlers use.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

fn openapi_reply() -> Reply {
    static DOC: OnceLock<Result<Bytes, String>> = OnceLock::new();
    let doc = DOC.get_or_init(|| {
        openapi()
            .to_json()
            .map(Bytes::from)
            .map_err(|e| e.to_string())
    });
    match doc {
        Ok(bytes) => Reply::new(
            StatusCode::OK,
            Some(HeaderValue::from_static(JSON)),
            bytes.clone(),
        ),
        Err(e) => {
            warn!(error = %e, "serializing the OpenAPI document");
            Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

/// A Swagger UI file from the assets inside the binary. `/swaggerui` (no
/// trailing slash) serves the page too, so its relative asset links are
/// anchored with a `<base>`.
fn swagger_reply(tail: &str) -> Reply {
    static CONFIG: OnceLock<Arc<utoipa_swagger_ui::Config<'static>>> = OnceLock::new();
    let config = CONFIG
        .get_or_init(|| Arc::new(utoipa_swagger_ui::Config::from(OPENAPI_PATH)))
        .clone();
    match utoipa_swagger_ui::serve(tail, config) {
        Ok(Some(file)) => {
            let content_type = HeaderValue::from_str(&file.content_type)
                .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
            let body = if tail.is_empty() || tail == "index.html" {
                let html = String::from_utf8_lossy(&file.bytes).replacen(
                    "<head>",
                    "<head>\n    <base href=\"/swaggerui/\" />",
                    1,
                );
                Bytes::from(html)
            } else {
                Bytes::from(file.bytes.into_owned())
            };
            Reply::new(StatusCode::OK, Some(content_type), body)
        }
        Ok(None) => Reply::error(
            StatusCode::NOT_FOUND,
            format!("no Swagger UI file {tail:?}"),
        ),
        Err(e) => {
            warn!(error = %e, "serving Swagger UI");
            Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

// ---------------------------------------------------------------------------
// Routing and auth.

/// `?scope=`: this node (default) or the whole cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Node,
    Cluster,
}

impl Scope {
    /// From a request's query string; `None` for an unknown scope.
    fn of_query(query: Option<&str>) -> Option<Scope> {
        let mut scope = Scope::Node;
        for pair in query.unwrap_or_default().split('&') {
            match pair.split_once('=') {
                Some(("scope", "cluster")) => scope = Scope::Cluster,
                Some(("scope", "node")) => scope = Scope::Node,
                Some(("scope", _)) => return None,
                _ => {}
            }
        }
        Some(scope)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Health,
    OpenApi,
    Swagger(String),
    ListTenants,
    PutTenant(String),
    GetTenant(String),
    DeleteTenant(String),
    Terminate(String),
    PutUser(String, String),
    DeleteUser(String, String),
    Pools(Scope),
    Metrics(Option<String>, Scope),
    Cluster,
    ClusterJoin,
    ClusterLeave,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    Open,
    Api,
    Metrics,
}

impl Route {
    fn guard(&self) -> Guard {
        match self {
            Route::Health | Route::OpenApi | Route::Swagger(_) => Guard::Open,
            Route::Metrics(..) => Guard::Metrics,
            _ => Guard::Api,
        }
    }

    fn has_body(&self) -> bool {
        matches!(
            self,
            Route::PutTenant(_) | Route::PutUser(..) | Route::ClusterJoin | Route::ClusterLeave
        )
    }
}

/// `%XX` decoding of one path segment; `None` when malformed or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The route of a request, or the 404 / 405 reply (400 for an unknown scope).
fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Route, Reply> {
    let scope = Scope::of_query(query).ok_or_else(|| {
        Reply::error(
            StatusCode::BAD_REQUEST,
            "scope must be \"node\" or \"cluster\"",
        )
    })?;
    let raw: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut segs = Vec::with_capacity(raw.len());
    for s in &raw {
        match percent_decode(s) {
            Some(s) => segs.push(s),
            None => {
                return Err(Reply::error(
                    StatusCode::NOT_FOUND,
                    "malformed percent-encoding in the path",
                ))
            }
        }
    }
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let m = method.as_str();
    let (allowed, found): (&[&str], Option<Route>) = match segs.as_slice() {
        ["api", "health"] => (&["GET"], (m == "GET").then_some(Route::Health)),
        ["api", "openapi"] => (&["GET"], (m == "GET").then_some(Route::OpenApi)),
        ["swaggerui", rest @ ..] => (
            &["GET"],
            (m == "GET").then(|| Route::Swagger(rest.join("/"))),
        ),
        ["api", "tenants"] => (&["GET"], (m == "GET").then_some(Route::ListTenants)),
        ["api", "tenants", id] => {
            let id = id.to_string();
            (
                &["GET", "PUT", "DELETE"],
                match m {
                    "GET" => Some(Route::GetTenant(id)),
                    "PUT" => Some(Route::PutTenant(id)),
                    "DELETE" => Some(Route::DeleteTenant(id)),
                    _ => None,
                },
            )
        }
        ["api", "tenants", id, "terminate"] => (
            &["GET"],
            (m == "GET").then(|| Route::Terminate(id.to_string())),
        ),
        ["api", "tenants", id, "users", user] => {
            let (id, user) = (id.to_string(), user.to_string());
            (
                &["PUT", "DELETE"],
                match m {
                    "PUT" => Some(Route::PutUser(id, user)),
                    "DELETE" => Some(Route::DeleteUser(id, user)),
                    _ => None,
                },
            )
        }
        ["api", "pools"] => (&["GET"], (m == "GET").then_some(Route::Pools(scope))),
        ["api", "cluster"] => (&["GET"], (m == "GET").then_some(Route::Cluster)),
        ["api", "cluster", "join"] => (&["POST"], (m == "POST").then_some(Route::ClusterJoin)),
        ["api", "cluster", "leave"] => (&["POST"], (m == "POST").then_some(Route::ClusterLeave)),
        ["metrics"] => (
            &["GET"],
            (m == "GET").then_some(Route::Metrics(None, scope)),
        ),
        ["metrics", id] => (
            &["GET"],
            (m == "GET").then(|| Route::Metrics(Some(id.to_string()), scope)),
        ),
        _ => {
            return Err(Reply::error(
                StatusCode::NOT_FOUND,
                format!("no route {m} {path}"),
            ))
        }
    };
    match found {
        Some(r) => Ok(r),
        None => {
            let allow = HeaderValue::from_str(&allowed.join(", "))
                .unwrap_or_else(|_| HeaderValue::from_static("GET"));
            Err(Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{m} is not allowed here"),
            )
            .with_header(header::ALLOW, allow))
        }
    }
}

/// Checks API tokens outside HTTP (the admin console takes one as its
/// password): HS256 with the API secret, `exp` checked when present.
pub struct TokenCheck {
    key: DecodingKey,
    validation: Validation,
}

impl TokenCheck {
    /// `None` for an empty secret.
    pub fn new(secret: &str) -> Option<TokenCheck> {
        (!secret.is_empty()).then(|| TokenCheck {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation: token_validation(),
        })
    }

    /// `Ok` for a valid token; why not otherwise (never the token itself).
    pub fn verify(&self, token: &str) -> Result<(), String> {
        verify_token(token, &self.key, &self.validation)
    }
}

fn token_validation() -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    // Supavisor's tokens carry no registered claims; exp is checked when present.
    validation.required_spec_claims.clear();
    validation.validate_exp = true;
    validation.validate_aud = false;
    validation
}

fn verify_token(token: &str, key: &DecodingKey, validation: &Validation) -> Result<(), String> {
    match jsonwebtoken::decode::<serde_json::Value>(token, key, validation) {
        Ok(data) => match data.claims.get("exp") {
            Some(exp) if !exp.is_number() => Err("invalid token: exp must be a number".into()),
            _ => Ok(()),
        },
        Err(e) => Err(format!("invalid token: {e}")),
    }
}

struct Keys {
    api: Option<DecodingKey>,
    metrics: Option<DecodingKey>,
    validation: Validation,
}

impl Keys {
    fn new(auth: &ApiAuth) -> Keys {
        let key = |s: &Option<String>| {
            s.as_deref()
                .filter(|s| !s.is_empty())
                .map(|s| DecodingKey::from_secret(s.as_bytes()))
        };
        Keys {
            api: key(&auth.jwt_secret),
            metrics: key(&auth.metrics_jwt_secret),
            validation: token_validation(),
        }
    }

    /// `Ok` when the request may go on; the 401 otherwise. Never logs the token.
    fn check(&self, guard: Guard, authorization: Option<&HeaderValue>) -> Result<(), Reply> {
        let (key, var) = match guard {
            Guard::Open => return Ok(()),
            Guard::Api => (self.api.as_ref(), "API_JWT_SECRET"),
            Guard::Metrics => (self.metrics.as_ref(), "METRICS_JWT_SECRET"),
        };
        let Some(key) = key else {
            return Err(Reply::error(
                StatusCode::UNAUTHORIZED,
                format!("{var} is not set on this node"),
            ));
        };
        let unauthorized = |msg: String| {
            Reply::error(StatusCode::UNAUTHORIZED, msg)
                .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
        };
        let Some(value) = authorization else {
            return Err(unauthorized(
                "missing Authorization: Bearer <token> header".into(),
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(unauthorized(
                "the Authorization header must be \"Bearer <token>\"".into(),
            ));
        };
        verify_token(token, key, &self.validation).map_err(unauthorized)
    }
}

struct State {
    plane: Arc<dyn ControlPlane>,
    keys: Keys,
}

/// Read a body of at most [`MAX_BODY`] bytes. An oversized body (up to
/// [`DRAIN_LIMIT`]) is read and discarded before the 413, so that the client,
/// still sending, is not reset before it reads the answer.
async fn read_body(mut body: Incoming) -> Result<Bytes, Reply> {
    let too_large = || {
        Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {MAX_BODY} bytes"),
        )
    };
    if body.size_hint().lower() > DRAIN_LIMIT as u64 {
        return Err(too_large());
    }
    let read = async {
        let mut buf = Vec::new();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Reply::error(StatusCode::BAD_REQUEST, format!("reading the body: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                total = total.saturating_add(data.len());
                if total <= MAX_BODY {
                    buf.extend_from_slice(&data);
                } else if total > DRAIN_LIMIT {
                    break;
                }
            }
        }
        if total > MAX_BODY {
            Err(too_large())
        } else {
            Ok(Bytes::from(buf))
        }
    };
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(r) => r,
        Err(_) => Err(Reply::error(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive in time",
        )),
    }
}

async fn dispatch(plane: Arc<dyn ControlPlane>, route: Route, body: Bytes) -> Reply {
    match route {
        Route::Health => health(plane).await,
        Route::OpenApi => openapi_reply(),
        Route::Swagger(tail) => swagger_reply(&tail),
        Route::ListTenants => list_tenants(plane).await,
        Route::PutTenant(id) => put_tenant(plane, id, body).await,
        Route::GetTenant(id) => get_tenant(plane, id).await,
        Route::DeleteTenant(id) => delete_tenant(plane, id).await,
        Route::Terminate(id) => terminate_tenant(plane, id).await,
        Route::PutUser(id, user) => put_user(plane, id, user, body).await,
        Route::DeleteUser(id, user) => delete_user(plane, id, user).await,
        Route::Pools(scope) => list_pools(plane, scope).await,
        Route::Metrics(None, scope) => metrics(plane, scope).await,
        Route::Metrics(Some(id), scope) => tenant_metrics(plane, id, scope).await,
        Route::Cluster => cluster_status(plane).await,
        Route::ClusterJoin => cluster_join(plane, body).await,
        Route::ClusterLeave => cluster_leave(plane, body).await,
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Reply {
    let route = match route(req.method(), req.uri().path(), req.uri().query()) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if let Err(reply) = state
        .keys
        .check(route.guard(), req.headers().get(header::AUTHORIZATION))
    {
        return reply;
    }
    let body = if route.has_body() {
        match read_body(req.into_body()).await {
            Ok(b) => b,
            Err(reply) => return reply,
        }
    } else {
        Bytes::new()
    };
    dispatch(state.plane.clone(), route, body).await
}

/// Serves until the future is dropped (which also drops every open
/// connection). One task per connection.
pub async fn serve(
    listener: TcpListener,
    plane: Arc<dyn ControlPlane>,
    auth: ApiAuth,
) -> std::io::Result<()> {
    let state = Arc::new(State {
        plane,
        keys: Keys::new(&auth),
    });
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let state = state.clone();
                    conns.spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let state = state.clone();
                            async move {
                                let (method, path) = (req.method().clone(), req.uri().path().to_string());
                                let reply = handle(state, req).await;
                                debug!(%method, %path, status = reply.status.as_u16(), "api request");
                                Ok::<_, Infallible>(reply.into_response())
                            }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(30))
                            .serve_connection(TokioIo::new(stream), service);
                        if let Err(e) = conn.await {
                            debug!(%peer, error = %e, "api connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of fds and the like: back off instead of spinning.
                    warn!(error = %e, "api accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{json, Value};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SECRET: &str = "unit-api-secret";
    const METRICS_SECRET: &str = "unit-metrics-secret";

    /// An in-memory `ControlPlane`.
    #[derive(Default)]
    struct FakePlane {
        tenants: Mutex<HashMap<String, TenantSpec>>,
        terminated: Mutex<Vec<String>>,
        unavailable: bool,
    }

    fn view(id: &str, spec: &TenantSpec) -> TenantView {
        TenantView {
            external_id: id.to_string(),
            spec: spec.clone(),
        }
    }

    impl FakePlane {
        fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TenantSpec>> {
            self.tenants.lock().unwrap_or_else(|e| e.into_inner())
        }
        fn not_found(id: &str) -> PlaneError {
            PlaneError::NotFound(format!("tenant {id:?}"))
        }
    }

    impl ControlPlane for FakePlane {
        fn put_tenant(&self, id: &str, mut spec: TenantSpec) -> Result<TenantView, PlaneError> {
            if self.unavailable {
                return Err(PlaneError::Unavailable("no leader".into()));
            }
            let mut t = self.lock();
            let mut errors = spec.validate();
            errors.extend(spec.merge_passwords(t.get(id)));
            if !errors.is_empty() {
                return Err(PlaneError::Invalid(errors));
            }
            t.insert(id.to_string(), spec.clone());
            Ok(view(id, &spec))
        }
        fn get_tenant(&self, id: &str) -> Result<TenantView, PlaneError> {
            if id == "boom" {
                return Err(PlaneError::Internal("store broke".into()));
            }
            self.lock()
                .get(id)
                .map(|s| view(id, s))
                .ok_or_else(|| Self::not_found(id))
        }
        fn list_tenants(&self) -> Result<Vec<TenantView>, PlaneError> {
            let mut v: Vec<_> = self.lock().iter().map(|(k, s)| view(k, s)).collect();
            v.sort_by(|a, b| a.external_id.cmp(&b.external_id));
            Ok(v)
        }
        fn delete_tenant(&self, id: &str) -> Result<(), PlaneError> {
            self.lock()
                .remove(id)
                .map(|_| ())
                .ok_or_else(|| Self::not_found(id))
        }
        fn terminate_tenant(&self, id: &str) -> Result<(), PlaneError> {
            self.get_tenant(id)?;
            self.terminated
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id.to_string());
            Ok(())
        }
        fn put_user(&self, tenant: &str, mut user: UserSpec) -> Result<TenantView, PlaneError> {
            let mut t = self.lock();
            let spec = t.get_mut(tenant).ok_or_else(|| Self::not_found(tenant))?;
            let old = spec.users.iter().position(|u| u.db_user == user.db_user);
            if user.db_password.is_none() {
                user.db_password = old.and_then(|i| spec.users[i].db_password.clone());
            }
            if user.db_password.is_none() {
                return Err(PlaneError::Invalid(vec![FieldError {
                    field: "db_password".into(),
                    message: "is required for a new user".into(),
                }]));
            }
            match old {
                Some(i) => spec.users[i] = user,
                None => spec.users.push(user),
            }
            Ok(view(tenant, spec))
        }
        fn delete_user(&self, tenant: &str, db_user: &str) -> Result<TenantView, PlaneError> {
            let mut t = self.lock();
            let spec = t.get_mut(tenant).ok_or_else(|| Self::not_found(tenant))?;
            let i = spec
                .users
                .iter()
                .position(|u| u.db_user == db_user)
                .ok_or_else(|| PlaneError::NotFound(format!("user {db_user:?}")))?;
            spec.users.remove(i);
            Ok(view(tenant, spec))
        }
        fn pools(&self) -> Result<Vec<PoolView>, PlaneError> {
            Ok(vec![PoolView {
                node: 1,
                replica: None,
                tenant: "t".into(),
                db_user: "u".into(),
                mode: "transaction".into(),
                shard: 0,
                pool_size: 3,
                server_connections: 1,
                idle: 1,
                checked_out: 0,
                clients: 2,
                waiting: 0,
            }])
        }
        fn metrics(&self, tenant: Option<&str>) -> Result<String, PlaneError> {
            match tenant {
                None => Ok("# TYPE up gauge\nup 1\n".into()),
                Some(id) => {
                    self.get_tenant(id)?;
                    Ok(format!("clients{{tenant=\"{id}\"}} 0\n"))
                }
            }
        }
        fn health(&self) -> Health {
            Health {
                status: "ok".into(),
                version: "test".into(),
                shards: 2,
                tenants: self.lock().len(),
                uptime_secs: 1,
            }
        }
    }

    struct Server {
        addr: std::net::SocketAddr,
        plane: Arc<FakePlane>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn start_with(plane: FakePlane, auth: ApiAuth) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plane = Arc::new(plane);
        let task = tokio::spawn(serve(listener, plane.clone(), auth));
        Server { addr, plane, task }
    }

    async fn start() -> Server {
        start_with(
            FakePlane::default(),
            ApiAuth {
                jwt_secret: Some(SECRET.into()),
                metrics_jwt_secret: Some(METRICS_SECRET.into()),
            },
        )
        .await
    }

    fn token(secret: &str, claims: Value) -> String {
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn api_token() -> String {
        token(SECRET, json!({"role": "anon"}))
    }

    #[derive(Debug)]
    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
        }
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }

    /// One raw HTTP/1.1 request with `Connection: close`; reads to EOF.
    async fn raw(addr: std::net::SocketAddr, request: Vec<u8>) -> Resp {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&request).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
            .await
            .expect("response within 20 s")
            .ok();
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&buf)));
        let head = String::from_utf8_lossy(&buf[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Resp {
            status,
            headers,
            body: buf[split + 4..].to_vec(),
        }
    }

    async fn req(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Resp {
        let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
        if let Some(t) = token {
            r.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let body = body.unwrap_or("");
        if !body.is_empty() || method == "PUT" {
            r.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        r.push_str("\r\n");
        r.push_str(body);
        raw(addr, r.into_bytes()).await
    }

    fn tenant_body(password: &str) -> String {
        json!({"tenant": {"db_host": "localhost", "db_port": 5432, "db_database": "postgres",
            "default_pool_size": 4,
            "users": [{"db_user": "postgres", "db_password": password, "pool_size": 3}]}})
        .to_string()
    }

    fn fields(resp: &Resp) -> Vec<String> {
        resp.json()["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors array: {}", resp.text()))
            .iter()
            .map(|e| e["field"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    #[tokio::test]
    async fn tenant_lifecycle() {
        let s = start().await;
        let t = api_token();
        let t = Some(t.as_str());

        let r = req(s.addr, "GET", "/api/health", None, None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(JSON));
        assert_eq!(r.json()["status"], "ok");

        let r = req(s.addr, "GET", "/api/tenants", t, None).await;
        assert_eq!((r.status, r.json()), (200, json!({"data": []})));

        let r = req(
            s.addr,
            "PUT",
            "/api/tenants/acme",
            t,
            Some(&tenant_body("pw-one")),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
        assert!(!r.text().contains("pw-one"), "{}", r.text());
        let v = r.json();
        assert_eq!(v["data"]["external_id"], "acme");
        assert_eq!(v["data"]["default_pool_size"], 4);
        assert_eq!(v["data"]["users"][0]["pool_size"], 3);
        assert!(v["data"]["users"][0].get("db_password").is_none());

        let r = req(
            s.addr,
            "PUT",
            "/api/tenants/acme",
            t,
            Some(&tenant_body("pw-two")),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.text().contains("pw-two"));
        let stored = s.plane.lock()["acme"].users[0].db_password.clone();
        assert_eq!(stored.as_deref(), Some("pw-two"));

        let r = req(s.addr, "GET", "/api/tenants/acme", t, None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["data"]["db_host"], "localhost");
        assert!(!r.text().contains("pw-two"));

        let r = req(s.addr, "GET", "/api/tenants", t, None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["data"][0]["external_id"], "acme");

        let r = req(s.addr, "GET", "/api/tenants/acme/terminate", t, None).await;
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
        assert_eq!(
            *s.plane.terminated.lock().unwrap(),
            vec!["acme".to_string()]
        );
        let r = req(s.addr, "GET", "/api/tenants/nope/terminate", t, None).await;
        assert_eq!(r.status, 404);

        let r = req(s.addr, "GET", "/api/pools", t, None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["data"][0]["pool_size"], 3);
        assert_eq!(r.json()["data"][0]["node"], 1);
        assert!(r.json().get("nodes").is_none());
        // The cluster-wide view: every node's rows and who answered.
        let r = req(s.addr, "GET", "/api/pools?scope=cluster", t, None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["data"][0]["pool_size"], 3);
        assert_eq!(
            r.json()["nodes"],
            json!([{"node_id": 1, "ok": true, "error": null}])
        );
        let r = req(s.addr, "GET", "/api/pools?scope=everything", t, None).await;
        assert_eq!(r.status, 400);

        let r = req(s.addr, "DELETE", "/api/tenants/acme", t, None).await;
        assert_eq!(r.status, 204);
        let r = req(s.addr, "DELETE", "/api/tenants/acme", t, None).await;
        assert_eq!(r.status, 404);
        assert!(r.json()["error"].as_str().unwrap().contains("acme"));
        let r = req(s.addr, "GET", "/api/tenants/acme", t, None).await;
        assert_eq!(r.status, 404);
    }

    #[tokio::test]
    async fn users_are_put_and_deleted() {
        let s = start().await;
        let t = api_token();
        let t = Some(t.as_str());
        let r = req(
            s.addr,
            "PUT",
            "/api/tenants/acme",
            t,
            Some(&tenant_body("pw")),
        )
        .await;
        assert_eq!(r.status, 201);

        let body =
            json!({"user": {"db_user": "app user", "db_password": "user-secret", "pool_size": 7}})
                .to_string();
        let r = req(
            s.addr,
            "PUT",
            "/api/tenants/acme/users/app%20user",
            t,
            Some(&body),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.text().contains("user-secret"));
        let users = r.json()["data"]["users"].clone();
        assert_eq!(users[1]["db_user"], "app user");
        assert_eq!(users[1]["pool_size"], 7);

        // Path and body disagree.
        let r = req(
            s.addr,
            "PUT",
            "/api/tenants/acme/users/other",
            t,
            Some(&body),
        )
        .await;
        assert_eq!(r.status, 422);
        assert_eq!(fields(&r), vec!["user.db_user"]);
        // Unknown tenant.
        let r = req(
            s.addr,
            "PUT",
            "/api/tenants/none/users/app%20user",
            t,
            Some(&body),
        )
        .await;
        assert_eq!(r.status, 404);
        // New user without a password: the plane's 422.
        let r = req(
            s.addr,
            "PUT",
            "/api/tenants/acme/users/x",
            t,
            Some(r#"{"user": {"db_user": "x"}}"#),
        )
        .await;
        assert_eq!(r.status, 422);
        assert_eq!(fields(&r), vec!["db_password"]);

        let r = req(
            s.addr,
            "DELETE",
            "/api/tenants/acme/users/app%20user",
            t,
            None,
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["data"]["users"].as_array().unwrap().len(), 1);
        let r = req(
            s.addr,
            "DELETE",
            "/api/tenants/acme/users/app%20user",
            t,
            None,
        )
        .await;
        assert_eq!(r.status, 404);
    }

    #[tokio::test]
    async fn invalid_input_is_422_per_field() {
        let s = start().await;
        let t = api_token();
        let t = Some(t.as_str());

        let r = req(
            s.addr,
            "PUT",
            "/api/tenants/bad.id",
            t,
            Some(&tenant_body("pw")),
        )
        .await;
        assert_eq!(r.status, 422);
        assert_eq!(fields(&r), vec!["external_id"]);

        let body = json!({"tenant": {"db_host": "", "db_port": 0, "db_database": "d",
            "default_pool_size": 0, "auth_type": "plain",
            "users": [{"db_user": "u", "db_password": "p", "pool_size": 0, "mode_type": "statement"}]}})
        .to_string();
        let r = req(s.addr, "PUT", "/api/tenants/ok", t, Some(&body)).await;
        assert_eq!(r.status, 422);
        let f = fields(&r);
        for want in [
            "db_host",
            "db_port",
            "default_pool_size",
            "auth_type",
            "users[0].pool_size",
            "users[0].mode_type",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
        for e in r.json()["errors"].as_array().unwrap() {
            assert!(!e["message"].as_str().unwrap().is_empty());
        }

        // Passwords missing for a new user come from the plane.
        let body = r#"{"tenant": {"db_host": "h", "db_port": 1, "db_database": "d", "users": [{"db_user": "u"}]}}"#;
        let r = req(s.addr, "PUT", "/api/tenants/ok", t, Some(body)).await;
        assert_eq!(r.status, 422);
        assert_eq!(fields(&r), vec!["users[0].db_password"]);

        for (body, needle) in [
            ("{not json", "key must be a string"),
            (
                r#"{"tenant": {"db_host": "h", "db_port": 1, "db_database": "d", "bogus": 1}}"#,
                "unknown field `bogus`",
            ),
            (
                r#"{"tenant": {"db_host": "h", "db_port": "x", "db_database": "d"}}"#,
                "invalid type",
            ),
            (
                r#"{"tenant": {"db_host": "h", "db_port": 70000, "db_database": "d"}}"#,
                "70000",
            ),
            (
                r#"{"tenant": {"db_host": "h", "db_port": 1}}"#,
                "missing field `db_database`",
            ),
            (r#"{"nottenant": {}}"#, "unknown field"),
            ("", "EOF"),
        ] {
            let r = req(s.addr, "PUT", "/api/tenants/ok", t, Some(body)).await;
            assert_eq!(r.status, 422, "{body}: {}", r.text());
            let v = r.json();
            assert_eq!(v["errors"][0]["field"], "body", "{body}");
            let msg = v["errors"][0]["message"].as_str().unwrap();
            assert!(msg.contains(needle), "{body}: {msg}");
        }
        // Nothing got stored.
        assert!(s.plane.lock().is_empty());
    }

    #[tokio::test]
    async fn auth_is_enforced() {
        let s = start().await;
        let paths = [
            "/api/tenants",
            "/api/tenants/x",
            "/api/pools",
            "/api/tenants/x/terminate",
        ];
        let wrong = token("not-the-secret", json!({"role": "anon"}));
        let now = jsonwebtoken::get_current_timestamp();
        let expired = token(SECRET, json!({"role": "anon", "exp": now - 3600}));
        let bad_exp = token(SECRET, json!({"role": "anon", "exp": "never"}));
        let metrics_token = token(METRICS_SECRET, json!({"role": "anon"}));
        for p in paths {
            for t in [
                None,
                Some("garbage"),
                Some(wrong.as_str()),
                Some(expired.as_str()),
                Some(bad_exp.as_str()),
                Some(metrics_token.as_str()),
            ] {
                let r = req(s.addr, "GET", p, t, None).await;
                assert_eq!(r.status, 401, "{p} {t:?}: {}", r.text());
                assert_eq!(r.header("www-authenticate"), Some("Bearer"));
                assert!(r.json()["error"].is_string());
            }
        }
        let r = req(s.addr, "GET", "/api/tenants", Some(&expired), None).await;
        assert!(r.text().contains("Expired"), "{}", r.text());
        // Not Bearer.
        let r = raw(
            s.addr,
            b"GET /api/tenants HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Basic dTpw\r\n\r\n".to_vec(),
        )
        .await;
        assert_eq!(r.status, 401);
        // Valid: without exp, with a future exp, scheme in lower case.
        let future = token(SECRET, json!({"role": "anon", "exp": now + 3600}));
        for t in [api_token(), future] {
            let r = req(s.addr, "GET", "/api/tenants", Some(&t), None).await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let r = raw(
            s.addr,
            format!("GET /api/pools HTTP/1.1\r\nHost: t\r\nConnection: close\r\nauthorization: bearer {}\r\n\r\n", api_token()).into_bytes(),
        )
        .await;
        assert_eq!(r.status, 200);
        // PUT without a token is refused before its body is parsed.
        let r = req(
            s.addr,
            "PUT",
            "/api/tenants/x",
            None,
            Some(&tenant_body("pw")),
        )
        .await;
        assert_eq!(r.status, 401);
        assert!(s.plane.lock().is_empty());

        // Metrics take the metrics secret only.
        for t in [None, Some(api_token())] {
            let r = req(s.addr, "GET", "/metrics", t.as_deref(), None).await;
            assert_eq!(r.status, 401);
        }
        let r = req(s.addr, "GET", "/metrics", Some(&metrics_token), None).await;
        assert_eq!(r.status, 200);
        // Open routes.
        for p in ["/api/health", "/api/openapi", "/swaggerui/"] {
            let r = req(s.addr, "GET", p, None, None).await;
            assert_eq!(r.status, 200, "{p}");
        }
    }

    #[tokio::test]
    async fn unset_secrets_refuse_everything() {
        let s = start_with(FakePlane::default(), ApiAuth::default()).await;
        let t = api_token();
        let r = req(s.addr, "GET", "/api/tenants", Some(&t), None).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"], "API_JWT_SECRET is not set on this node");
        let r = req(s.addr, "GET", "/metrics", Some(&t), None).await;
        assert_eq!(r.status, 401);
        assert_eq!(
            r.json()["error"],
            "METRICS_JWT_SECRET is not set on this node"
        );
        let r = req(s.addr, "GET", "/api/health", None, None).await;
        assert_eq!(r.status, 200);
        // An empty secret counts as unset.
        let s = start_with(
            FakePlane::default(),
            ApiAuth {
                jwt_secret: Some(String::new()),
                metrics_jwt_secret: None,
            },
        )
        .await;
        let empty = token("", json!({"role": "anon"}));
        let r = req(s.addr, "GET", "/api/tenants", Some(&empty), None).await;
        assert_eq!(r.status, 401);
    }

    #[tokio::test]
    async fn metrics_routes() {
        let s = start().await;
        let mt = token(METRICS_SECRET, json!({"role": "anon"}));
        let r = req(s.addr, "GET", "/metrics", Some(&mt), None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(PROMETHEUS_TEXT));
        assert!(r.text().contains("up 1"));
        let r = req(s.addr, "GET", "/metrics/acme", Some(&mt), None).await;
        assert_eq!(r.status, 404);
        s.plane.lock().insert(
            "acme".into(),
            serde_json::from_str(r#"{"db_host": "h", "db_port": 1, "db_database": "d"}"#).unwrap(),
        );
        let r = req(s.addr, "GET", "/metrics/acme", Some(&mt), None).await;
        assert_eq!(r.status, 200);
        assert!(r.text().contains("tenant=\"acme\""));
    }

    #[tokio::test]
    async fn routing_and_server_errors() {
        let s = start().await;
        let t = api_token();
        let t = Some(t.as_str());
        let r = req(s.addr, "GET", "/nope", t, None).await;
        assert_eq!(r.status, 404);
        assert!(r.json()["error"].is_string());
        let r = req(s.addr, "GET", "/api/tenants/a/b/c/d/e", t, None).await;
        assert_eq!(r.status, 404);
        let r = req(s.addr, "POST", "/api/tenants", t, Some("{}")).await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET"));
        let r = req(s.addr, "PATCH", "/api/tenants/x", t, Some("{}")).await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, PUT, DELETE"));
        let r = req(s.addr, "DELETE", "/api/health", None, None).await;
        assert_eq!(r.status, 405);
        let r = req(s.addr, "GET", "/api/tenants/x/users/u", t, None).await;
        assert_eq!(r.status, 405);
        let r = req(s.addr, "GET", "/api/tenants/bad%zz", t, None).await;
        assert_eq!(r.status, 404);
        // Query strings and a trailing slash are ignored.
        let r = req(s.addr, "GET", "/api/tenants/?x=1", t, None).await;
        assert_eq!(r.status, 200);
        // Cluster routes: guarded, POST bodies checked, the plane's answer (no cluster: 503).
        let r = req(s.addr, "GET", "/api/cluster", None, None).await;
        assert_eq!(r.status, 401);
        let r = req(s.addr, "GET", "/api/cluster", t, None).await;
        assert_eq!(r.status, 503);
        let r = req(s.addr, "GET", "/api/cluster/join", t, None).await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("POST"));
        let r = req(
            s.addr,
            "POST",
            "/api/cluster/join",
            t,
            Some("{\"node_id\": 2}"),
        )
        .await;
        assert_eq!(r.status, 422);
        let body = "{\"node_id\": 0, \"addr\": \"h:1\"}";
        let r = req(s.addr, "POST", "/api/cluster/join", t, Some(body)).await;
        assert_eq!(r.status, 422);
        let body = "{\"node_id\": 2, \"addr\": \"h:1\", \"voter\": true}";
        let r = req(s.addr, "POST", "/api/cluster/join", t, Some(body)).await;
        assert_eq!(r.status, 503);
        let r = req(s.addr, "POST", "/api/cluster/leave", t, Some("{\"id\": 2}")).await;
        assert_eq!(r.status, 422);

        // Internal (500) and Unavailable (503).
        let r = req(s.addr, "GET", "/api/tenants/boom", t, None).await;
        assert_eq!(r.status, 500);
        assert!(r.json()["error"].as_str().unwrap().contains("store broke"));
        let down = start_with(
            FakePlane {
                unavailable: true,
                ..Default::default()
            },
            ApiAuth {
                jwt_secret: Some(SECRET.into()),
                metrics_jwt_secret: None,
            },
        )
        .await;
        let r = req(
            down.addr,
            "PUT",
            "/api/tenants/x",
            t,
            Some(&tenant_body("pw")),
        )
        .await;
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"], "no leader");

        // Over 1 MiB: declared, and chunked without a length.
        let big = format!(
            "{{\"tenant\": {{\"db_host\": \"{}\", \"db_port\": 1, \"db_database\": \"d\"}}}}",
            "h".repeat(MAX_BODY)
        );
        let r = req(s.addr, "PUT", "/api/tenants/x", t, Some(&big)).await;
        assert_eq!(r.status, 413);
        let mut chunked = format!(
            "PUT /api/tenants/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\n\r\n",
            api_token()
        )
        .into_bytes();
        for _ in 0..20 {
            chunked.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
            chunked.extend(std::iter::repeat_n(b' ', 64 * 1024));
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let r = raw(s.addr, chunked).await;
        assert_eq!(r.status, 413);
        assert!(s.plane.lock().is_empty());
    }

    #[tokio::test]
    async fn openapi_and_swagger_ui() {
        let doc = openapi();
        let paths: Vec<&String> = doc.paths.paths.keys().collect();
        for p in [
            "/api/health",
            "/api/tenants",
            "/api/tenants/{external_id}",
            "/api/tenants/{external_id}/terminate",
            "/api/tenants/{external_id}/users/{db_user}",
            "/api/pools",
            "/metrics",
            "/metrics/{external_id}",
            "/api/cluster",
            "/api/cluster/join",
            "/api/cluster/leave",
        ] {
            assert!(paths.iter().any(|x| *x == p), "{p} missing from {paths:?}");
        }

        let s = start().await;
        let r = req(s.addr, "GET", "/api/openapi", None, None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(JSON));
        let v = r.json();
        assert!(v["openapi"].as_str().unwrap().starts_with("3."));
        let put = &v["paths"]["/api/tenants/{external_id}"]["put"];
        assert!(put["responses"]["201"].is_object(), "{put}");
        assert!(put["responses"]["422"].is_object(), "{put}");
        assert!(put["requestBody"].is_object(), "{put}");
        let schemas = &v["components"]["schemas"];
        assert!(schemas["TenantSpec"]["properties"]["default_pool_size"].is_object());
        let pw = &schemas["UserSpec"]["properties"]["db_password"];
        assert_eq!(pw["writeOnly"], true, "{pw}");
        assert!(v["components"]["securitySchemes"]["bearer"].is_object());

        for p in ["/swaggerui", "/swaggerui/", "/swaggerui/index.html"] {
            let r = req(s.addr, "GET", p, None, None).await;
            assert_eq!(r.status, 200, "{p}");
            assert!(r.header("content-type").unwrap().starts_with("text/html"));
            let html = r.text();
            assert!(html.contains("<base href=\"/swaggerui/\""), "{html}");
            assert!(html.contains("swagger-ui-bundle.js"));
        }
        let r = req(s.addr, "GET", "/swaggerui/swagger-ui.css", None, None).await;
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap().starts_with("text/css"));
        assert!(r.body.len() > 1000);
        let r = req(
            s.addr,
            "GET",
            "/swaggerui/swagger-initializer.js",
            None,
            None,
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r.text().contains(OPENAPI_PATH), "{}", r.text());
        assert!(!r.text().contains("http"), "no external URL: {}", r.text());
        let r = req(s.addr, "GET", "/swaggerui/nope.js", None, None).await;
        assert_eq!(r.status, 404);
    }

    #[tokio::test]
    async fn keep_alive_serves_several_requests() {
        let s = start().await;
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let one = b"GET /api/health HTTP/1.1\r\nHost: t\r\n\r\n";
        c.write_all(one).await.unwrap();
        c.write_all(one).await.unwrap();
        c.write_all(b"GET /api/health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%FF"), None);
    }

    #[test]
    fn auth_debug_redacts() {
        let a = ApiAuth {
            jwt_secret: Some("s3cr3t".into()),
            metrics_jwt_secret: None,
        };
        assert!(!format!("{a:?}").contains("s3cr3t"));
    }
}
