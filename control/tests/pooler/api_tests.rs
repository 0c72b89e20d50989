//! The HTTP API of the real `supavisor` against the real PostgreSQL: every route and its
//! errors, the live effect of each change on clients and pools, and Swagger UI rendered by
//! headless Chromium.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// An HS256 token like Supavisor's (`{"role": "anon"}`, no `exp`).
fn token(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode a JWT")
}

fn api_token() -> String {
    token(API_JWT_SECRET, json!({"role": "anon"}))
}

fn metrics_token() -> String {
    token(METRICS_JWT_SECRET, json!({"role": "anon"}))
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
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {}: not JSON ({e}): {}", self.status, self.text()))
    }
    /// Fields of a 422 answer.
    fn fields(&self) -> Vec<String> {
        assert_eq!(self.status, 422, "{}", self.text());
        self.json()["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors array: {}", self.text()))
            .iter()
            .map(|e| {
                assert!(
                    e["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "error without a message: {e}"
                );
                e["field"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    }
}

/// A raw HTTP/1.1 client of the pooler's API; remembers every body it received so a test can
/// check that no password ever came back.
struct Api {
    addr: SocketAddr,
    token: String,
    seen: Vec<String>,
}

impl Api {
    fn new(addr: SocketAddr) -> Api {
        Api {
            addr,
            token: api_token(),
            seen: Vec::new(),
        }
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Resp {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: supavisor\r\nConnection: close\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        let what = format!("{method} {path}");
        let mut s = within(&what, TcpStream::connect(self.addr))
            .await
            .unwrap_or_else(|e| panic!("{what}: connect to the API at {}: {e}", self.addr));
        within(&what, s.write_all(req.as_bytes())).await.unwrap();
        let mut buf = Vec::new();
        within(&what, s.read_to_end(&mut buf))
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the response: {e}"));
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| {
                panic!(
                    "{what}: no HTTP header in {:?}",
                    String::from_utf8_lossy(&buf)
                )
            });
        let head = String::from_utf8_lossy(&buf[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("{what}: bad status line in {head:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let resp = Resp {
            status,
            headers,
            body: buf[split + 4..].to_vec(),
        };
        self.seen.push(resp.text());
        resp
    }

    async fn get(&mut self, path: &str) -> Resp {
        let t = self.token.clone();
        self.request("GET", path, Some(&t), None).await
    }
    async fn put(&mut self, path: &str, body: &str) -> Resp {
        let t = self.token.clone();
        self.request("PUT", path, Some(&t), Some(body)).await
    }
    async fn delete(&mut self, path: &str) -> Resp {
        let t = self.token.clone();
        self.request("DELETE", path, Some(&t), None).await
    }

    /// PUT a tenant, expecting `status`.
    async fn put_tenant(&mut self, id: &str, spec: Value, status: u16) -> Value {
        let r = self
            .put(
                &format!("/api/tenants/{id}"),
                &json!({ "tenant": spec }).to_string(),
            )
            .await;
        assert_eq!(r.status, status, "PUT tenant {id}: {}", r.text());
        r.json()
    }

    /// No response so far contained any of `secrets`.
    #[track_caller]
    fn assert_never_returned(&self, secrets: &[&str]) {
        for body in &self.seen {
            for s in secrets {
                assert!(!body.contains(s), "a response contains a password: {body}");
            }
        }
    }
}

/// A tenant pointing at the shared PostgreSQL.
fn tenant_spec(default_pool_size: usize, users: Value) -> Value {
    let pg = pg();
    json!({
        "db_host": pg.host,
        "db_port": pg.port,
        "db_database": "postgres",
        "default_pool_size": default_pool_size,
        "users": users,
    })
}

fn postgres_user(pool_size: usize) -> Value {
    json!({"db_user": "postgres", "db_password": PG_PASSWORD, "pool_size": pool_size,
           "pool_checkout_timeout": 15000})
}

/// A dedicated login role in the shared PostgreSQL, so a test can count its own backends.
fn create_role(prefix: &str, password: &str) -> String {
    let role = unique(prefix);
    pg().psql(&format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        .unwrap_or_else(|e| panic!("create role {role}: {e}"));
    role
}

/// The pooler's server connections (application_name 'Supavisor') logged in as `role`:
/// (all, active).
async fn backends_of(d: &tokio_postgres::Client, role: &str) -> (i64, i64) {
    let row = within(
        "count backends",
        d.query_one(
            "SELECT count(*), count(*) FILTER (WHERE state = 'active') FROM pg_stat_activity \
             WHERE usename = $1 AND application_name = 'Supavisor'",
            &[&role],
        ),
    )
    .await
    .unwrap();
    (row.get(0), row.get(1))
}

/// The connection of `c` ends (within 10 s) with SQLSTATE `code`, seen either by a query or
/// by the connection task (a FATAL that arrives while idle).
async fn expect_closed_with(c: Conn, code: &str, what: &str) {
    let query = within_for(
        Duration::from_secs(10),
        what,
        c.client.simple_query("SELECT 1"),
    )
    .await;
    let mut codes = vec![];
    if let Err(e) = &query {
        codes.push(sqlstate(e));
    }
    let task = within_for(Duration::from_secs(10), what, c.task)
        .await
        .expect("connection task");
    if let Err(e) = &task {
        codes.push(sqlstate(e));
    }
    assert!(
        query.is_err(),
        "{what}: the client still works after the change"
    );
    assert!(
        codes.iter().flatten().any(|c| c == code),
        "{what}: expected SQLSTATE {code}, got {codes:?} (query: {query:?}; connection: {task:?})"
    );
}

async fn select_one(
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> Result<Conn, tokio_postgres::Error> {
    let c = connect_with(&client_config(addr, user, password)).await?;
    within("SELECT 1", c.client.simple_query("SELECT 1")).await?;
    Ok(c)
}

/// Every route, its status codes and error bodies; no password ever in a response.
#[tokio::test]
async fn api_routes_and_errors() {
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![]));
    let mut api = Api::new(pooler.api);
    let id = unique("api_routes").replace('_', "-");

    // Open routes.
    let r = api.request("GET", "/api/health", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let h = r.json();
    assert_eq!(h["status"], "ok", "{h}");
    assert!(h["shards"].as_u64().is_some_and(|n| n >= 1), "{h}");

    // Auth: no header, garbage, wrong secret, the metrics secret, expired; then valid.
    let now = jsonwebtoken::get_current_timestamp();
    let wrong = token("wrong-secret", json!({"role": "anon"}));
    let expired = token(API_JWT_SECRET, json!({"role": "anon", "exp": now - 600}));
    let m = metrics_token();
    for t in [
        None,
        Some("not-a-jwt"),
        Some(&wrong[..]),
        Some(&m[..]),
        Some(&expired[..]),
    ] {
        let r = api.request("GET", "/api/tenants", t, None).await;
        assert_eq!(r.status, 401, "token {t:?}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert!(r.json()["error"].is_string(), "{}", r.text());
    }
    let r = api
        .request(
            "PUT",
            &format!("/api/tenants/{id}"),
            None,
            Some(&json!({"tenant": tenant_spec(2, json!([]))}).to_string()),
        )
        .await;
    assert_eq!(r.status, 401);
    let with_exp = token(API_JWT_SECRET, json!({"role": "anon", "exp": now + 600}));
    let r = api
        .request("GET", "/api/tenants", Some(&with_exp), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.json();
    assert!(listed["data"].is_array(), "{listed}");
    assert!(
        !listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["external_id"] == id.as_str()),
        "{listed}"
    );

    // Create (201), update (200), read, list.
    let v = api
        .put_tenant(&id, tenant_spec(3, json!([postgres_user(2)])), 201)
        .await;
    assert_eq!(v["data"]["external_id"], id.as_str());
    assert_eq!(v["data"]["default_pool_size"], 3);
    assert_eq!(v["data"]["users"][0]["db_user"], "postgres");
    assert_eq!(v["data"]["users"][0]["pool_size"], 2);
    assert!(v["data"]["users"][0].get("db_password").is_none(), "{v}");
    // Update without the password keeps it.
    let v = api
        .put_tenant(
            &id,
            tenant_spec(4, json!([{"db_user": "postgres", "pool_size": 2}])),
            200,
        )
        .await;
    assert_eq!(v["data"]["default_pool_size"], 4);
    let r = api.get(&format!("/api/tenants/{id}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"]["db_port"], pg().port);
    let r = api.get("/api/tenants").await;
    assert_eq!(r.status, 200);
    assert!(
        r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["external_id"] == id.as_str()),
        "{}",
        r.text()
    );
    select_one(pooler.transaction, &format!("postgres.{id}"), PG_PASSWORD)
        .await
        .expect("login after an update without a password");

    // 422, per field.
    let r = api
        .put(
            "/api/tenants/bad.id",
            &json!({"tenant": tenant_spec(2, json!([]))}).to_string(),
        )
        .await;
    assert_eq!(r.fields(), vec!["external_id"]);
    let bad = json!({"tenant": {"db_host": "", "db_port": 0, "db_database": "postgres",
        "default_pool_size": 0, "auth_type": "plain",
        "users": [{"db_user": "u", "db_password": "pw-never-returned", "pool_size": 0, "mode_type": "statement"}]}});
    let r = api
        .put(&format!("/api/tenants/{id}"), &bad.to_string())
        .await;
    let f = r.fields();
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
    let r = api
        .put(
            &format!("/api/tenants/{id}"),
            &json!({"tenant": tenant_spec(2, json!([{"db_user": "nopw"}]))}).to_string(),
        )
        .await;
    assert_eq!(r.fields(), vec!["users[0].db_password"]);
    for (body, needle) in [
        ("{\"tenant\": ", "EOF"),
        (
            r#"{"tenant": {"db_host": "h", "db_port": 1, "db_database": "d", "bogus": 1}}"#,
            "bogus",
        ),
        (
            r#"{"tenant": {"db_host": "h", "db_port": "x", "db_database": "d"}}"#,
            "invalid type",
        ),
        (
            r#"{"tenant": {"db_host": "h", "db_port": 1}}"#,
            "db_database",
        ),
    ] {
        let r = api.put(&format!("/api/tenants/{id}"), body).await;
        assert_eq!(r.fields(), vec!["body"], "{body}");
        let msg = r.json()["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    // The tenant is unchanged by the refused PUTs.
    assert_eq!(
        api.get(&format!("/api/tenants/{id}")).await.json()["data"]["default_pool_size"],
        4
    );

    // Users.
    let user_body = json!({"user": {"db_user": "other_user", "db_password": "other-pw-secret", "pool_size": 1}}).to_string();
    let r = api
        .put(&format!("/api/tenants/{id}/users/other_user"), &user_body)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let users: Vec<Value> = r.json()["data"]["users"].as_array().unwrap().clone();
    assert!(
        users.iter().any(|u| u["db_user"] == "other_user"),
        "{users:?}"
    );
    let r = api
        .put(&format!("/api/tenants/{id}/users/someone_else"), &user_body)
        .await;
    assert_eq!(r.fields(), vec!["user.db_user"]);
    let r = api
        .put(
            &format!("/api/tenants/{id}/users/other_user"),
            r#"{"user": {"db_user": "other_user", "pool_size": 0}}"#,
        )
        .await;
    assert!(
        r.fields().iter().any(|f| f.ends_with("pool_size")),
        "{}",
        r.text()
    );
    let r = api
        .put("/api/tenants/no-such-tenant/users/other_user", &user_body)
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = api
        .delete(&format!("/api/tenants/{id}/users/other_user"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.json()["data"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["db_user"] == "other_user"));
    let r = api
        .delete(&format!("/api/tenants/{id}/users/other_user"))
        .await;
    assert_eq!(r.status, 404, "{}", r.text());

    // Pools: the login above made one.
    let r = api.get("/api/pools").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let pools = r.json()["data"].as_array().cloned().unwrap_or_default();
    assert!(
        pools
            .iter()
            .any(|p| p["tenant"] == id.as_str() && p["db_user"] == "postgres"),
        "{pools:?}"
    );

    // Metrics: the metrics secret only.
    let r = api.request("GET", "/metrics", Some(&m), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    let r = api
        .request("GET", &format!("/metrics/{id}"), Some(&m), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains(&id),
        "tenant metrics do not name the tenant: {}",
        r.text()
    );
    let r = api
        .request("GET", "/metrics/no-such-tenant", Some(&m), None)
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    for t in [None, Some(&api.token.clone()[..])] {
        let r = api.request("GET", "/metrics", t, None).await;
        assert_eq!(r.status, 401, "{t:?}");
    }

    // 404s and 405s.
    for path in [
        "/api/tenants/no-such-tenant",
        "/api/tenants/no-such-tenant/terminate",
    ] {
        let r = api.get(path).await;
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert!(r.json()["error"].is_string());
    }
    let r = api.delete("/api/tenants/no-such-tenant").await;
    assert_eq!(r.status, 404);
    let r = api.get("/api/nothing-here").await;
    assert_eq!(r.status, 404);
    let r = api
        .request("POST", "/api/tenants", Some(&api.token.clone()), Some("{}"))
        .await;
    assert_eq!(r.status, 405);
    let r = api
        .request(
            "PATCH",
            &format!("/api/tenants/{id}"),
            Some(&api.token.clone()),
            Some("{}"),
        )
        .await;
    assert_eq!(r.status, 405);

    // 413.
    let big = format!(
        "{{\"tenant\": {{\"db_host\": \"{}\"}}}}",
        "h".repeat(1 << 20)
    );
    let r = api.put(&format!("/api/tenants/{id}"), &big).await;
    assert_eq!(r.status, 413);

    // OpenAPI and Swagger UI (open).
    let r = api.request("GET", "/api/openapi", None, None).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    for p in [
        "/api/tenants",
        "/api/tenants/{external_id}",
        "/api/tenants/{external_id}/users/{db_user}",
        "/api/health",
        "/metrics",
    ] {
        assert!(
            doc["paths"][p].is_object(),
            "{p} missing from the OpenAPI document"
        );
    }
    for p in ["/swaggerui", "/swaggerui/"] {
        let r = api.request("GET", p, None, None).await;
        assert_eq!(r.status, 200, "{p}");
        assert!(
            r.header("content-type")
                .unwrap_or_default()
                .starts_with("text/html"),
            "{p}"
        );
        assert!(r.text().contains("swagger-ui"), "{p}");
    }
    let r = api
        .request("GET", "/swaggerui/swagger-ui.css", None, None)
        .await;
    assert_eq!(r.status, 200);

    // Delete: 204, then 404.
    let r = api.delete(&format!("/api/tenants/{id}")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = api.get(&format!("/api/tenants/{id}")).await;
    assert_eq!(r.status, 404);

    api.assert_never_returned(&[PG_PASSWORD, "pw-never-returned", "other-pw-secret"]);
}

/// A tenant PUT over the API is served at once; DELETE drops its clients (57P01) and refuses
/// new logins.
#[tokio::test]
async fn put_takes_effect_and_delete_drops_clients() {
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![]));
    let mut api = Api::new(pooler.api);
    let id = unique("api_live");
    let user = format!("postgres.{id}");

    let refused = try_connect(pooler.transaction, &user, PG_PASSWORD).await;
    expect_code(refused, "28000");

    api.put_tenant(&id, tenant_spec(2, json!([postgres_user(2)])), 201)
        .await;
    let mut clients = Vec::new();
    for (port, addr) in pooler.ports() {
        let c = select_one(addr, &user, PG_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("{port} login right after PUT: {e:?}"));
        clients.push(c);
    }

    let r = api.delete(&format!("/api/tenants/{id}")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    // At once: the 204 means the shards no longer know the tenant.
    for (port, addr) in pooler.ports() {
        match try_connect(addr, &user, PG_PASSWORD).await {
            Ok(_) => panic!("{port}: a login to a deleted tenant succeeded"),
            Err(e) => assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{port}: {e:?}"),
        }
    }
    for c in clients {
        expect_closed_with(c, "57P01", "client of a deleted tenant").await;
    }
    api.assert_never_returned(&[PG_PASSWORD]);
}

/// terminate drops the tenant's clients (57P01) and its pools, and the tenant keeps serving.
#[tokio::test]
async fn terminate_drops_clients_but_keeps_tenant() {
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![]));
    let mut api = Api::new(pooler.api);
    let role = create_role("api_term", "term-pw");
    let id = unique("api_term");
    let user = format!("{role}.{id}");
    api.put_tenant(
        &id,
        tenant_spec(2, json!([{"db_user": role, "db_password": "term-pw"}])),
        201,
    )
    .await;
    let a = select_one(pooler.transaction, &user, "term-pw")
        .await
        .unwrap();
    let b = select_one(pooler.session, &user, "term-pw").await.unwrap();
    let d = direct().await;
    assert!(backends_of(&d, &role).await.0 >= 1);

    let r = api.get(&format!("/api/tenants/{id}/terminate")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    expect_closed_with(a, "57P01", "transaction client of a terminated tenant").await;
    expect_closed_with(b, "57P01", "session client of a terminated tenant").await;
    // Its pools are closed: no server connection of the role is left.
    eventually(
        "the terminated tenant's server connections close",
        Duration::from_secs(10),
        || {
            let (d, role) = (&d, &role);
            async move { backends_of(d, role).await.0 == 0 }
        },
    )
    .await;
    // The tenant stays.
    assert_eq!(api.get(&format!("/api/tenants/{id}")).await.status, 200);
    for (port, addr) in pooler.ports() {
        select_one(addr, &user, "term-pw")
            .await
            .unwrap_or_else(|e| panic!("{port}: login after terminate: {e:?}"));
    }
}

/// Run `n` concurrent `pg_sleep(secs)` through the transaction port; returns the most server
/// connections of `role` seen active at once while they ran.
async fn peak_active(
    addr: SocketAddr,
    user: &str,
    password: &str,
    role: &str,
    n: usize,
    secs: f64,
) -> i64 {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(select_one(addr, user, password).await.expect("login"));
    }
    let sql = format!("SELECT pg_sleep({secs})");
    let tasks: Vec<_> = conns.iter().map(|c| c.client.simple_query(&sql)).collect();
    let all = futures_util::future::join_all(tasks);
    tokio::pin!(all);
    let d = direct().await;
    let mut peak = 0;
    let start = Instant::now();
    let results = loop {
        tokio::select! {
            r = &mut all => break r,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                peak = peak.max(backends_of(&d, role).await.1);
                assert!(start.elapsed() < OP_DEADLINE, "concurrent sleeps did not finish");
            }
        }
    };
    for r in results {
        r.expect("pg_sleep through the pooler");
    }
    peak
}

/// PUT with a changed default_pool_size (tenant) or pool_size (user) resizes the live pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_is_resized_live() {
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![]));
    let mut api = Api::new(pooler.api);
    let role = create_role("api_resize", "resize-pw");
    let id = unique("api_resize");
    let user = format!("{role}.{id}");
    let d = direct().await;
    let pool_sizes = |pools: Value, id: &str| -> Vec<u64> {
        pools["data"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|p| p["tenant"] == id)
            .filter_map(|p| p["pool_size"].as_u64())
            .collect()
    };

    // The user takes the tenant's default_pool_size = 2.
    let spec = |default: usize| {
        tenant_spec(
            default,
            json!([{"db_user": role, "db_password": "resize-pw"}]),
        )
    };
    api.put_tenant(&id, spec(2), 201).await;
    let peak = peak_active(pooler.transaction, &user, "resize-pw", &role, 4, 1.0).await;
    assert!(
        (1..=2).contains(&peak),
        "pool of 2 had {peak} active server connections"
    );
    assert!(backends_of(&d, &role).await.0 <= 2);
    let r = api.get("/api/pools").await;
    assert_eq!(pool_sizes(r.json(), &id), vec![2], "{}", r.text());

    // default_pool_size 4: four at once.
    api.put_tenant(&id, spec(4), 200).await;
    let r = api.get("/api/pools").await;
    let sizes = pool_sizes(r.json(), &id);
    assert!(
        sizes.iter().all(|s| *s == 4),
        "pools after the resize: {}",
        r.text()
    );
    let peak = peak_active(pooler.transaction, &user, "resize-pw", &role, 4, 1.5).await;
    assert_eq!(peak, 4, "pool resized to 4 ran {peak} at once");

    // The user's own pool_size 1 overrides the default; idle extra connections close.
    let r = api
        .put(
            &format!("/api/tenants/{id}/users/{role}"),
            &json!({"user": {"db_user": role, "pool_size": 1}}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually(
        "the pool shrinks to 1 server connection",
        Duration::from_secs(15),
        || {
            let (d, role) = (&d, &role);
            async move { backends_of(d, role).await.0 <= 1 }
        },
    )
    .await;
    let peak = peak_active(pooler.transaction, &user, "resize-pw", &role, 3, 0.7).await;
    assert_eq!(peak, 1, "pool resized to 1 ran {peak} at once");
    let r = api.get("/api/pools").await;
    assert_eq!(pool_sizes(r.json(), &id), vec![1], "{}", r.text());
    api.assert_never_returned(&["resize-pw"]);
}

/// A changed password: the next login needs the new one.
#[tokio::test]
async fn password_change_applies_to_next_login() {
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![]));
    let mut api = Api::new(pooler.api);
    let role = create_role("api_pw", "first-pw");
    let id = unique("api_pw");
    let user = format!("{role}.{id}");
    api.put_tenant(
        &id,
        tenant_spec(2, json!([{"db_user": role, "db_password": "first-pw"}])),
        201,
    )
    .await;
    let before = select_one(pooler.transaction, &user, "first-pw")
        .await
        .expect("login with the first password");
    drop(before);

    pg().psql(&format!("ALTER ROLE {role} PASSWORD 'second-pw'"))
        .unwrap();
    let r = api
        .put(
            &format!("/api/tenants/{id}/users/{role}"),
            &json!({"user": {"db_user": role, "db_password": "second-pw"}}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    for (port, addr) in pooler.ports() {
        expect_code(try_connect(addr, &user, "first-pw").await, "28P01");
        let c = select_one(addr, &user, "second-pw")
            .await
            .unwrap_or_else(|e| panic!("{port}: login with the new password: {e:?}"));
        drop(c);
    }
    // A fresh server connection (after terminate) logs in to PostgreSQL with the new password.
    assert_eq!(
        api.get(&format!("/api/tenants/{id}/terminate"))
            .await
            .status,
        204
    );
    let c = select_one(pooler.transaction, &user, "second-pw")
        .await
        .expect("login after terminate with the new password");
    drop(c);
    api.assert_never_returned(&["first-pw", "second-pw"]);
}

/// Swagger UI, rendered by headless Chromium from the assets inside the binary, lists the
/// tenant routes.
#[tokio::test]
async fn swagger_ui_renders_in_chromium() {
    let chromium = Path::new("/usr/bin/chromium");
    assert!(
        chromium.exists(),
        "/usr/bin/chromium is missing: install Debian's `chromium` package (CI's .ci/run does)"
    );
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![]));
    let url = format!("http://{}/swaggerui/", pooler.api);
    let dir = tempfile::Builder::new()
        .prefix("chromium-swagger.")
        .tempdir()
        .expect("temp dir");
    let profile = dir.path().join("profile");
    let out_path = dir.path().join("dom.html");
    let err_path = dir.path().join("stderr.log");
    let dom = tokio::task::spawn_blocking(move || {
        let out = std::fs::File::create(&out_path).expect("dom file");
        let err = std::fs::File::create(&err_path).expect("stderr file");
        let mut child = Command::new("/usr/bin/chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--virtual-time-budget=10000", "--dump-dom"])
            .arg(&url)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn chromium");
        let start = Instant::now();
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break Some(st);
            }
            if start.elapsed() > Duration::from_secs(90) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let dom = std::fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        (status, dom, stderr)
    })
    .await
    .expect("chromium runner");
    let (status, dom, stderr) = dom;
    // Swagger UI breaks paths with zero-width spaces for wrapping.
    let text = dom.replace('\u{200b}', "").replace("&ZeroWidthSpace;", "");
    assert!(
        text.contains("/api/tenants/{external_id}"),
        "Swagger UI did not list the tenant routes (chromium exit: {status:?})\n--- DOM ---\n{dom}\n--- chromium stderr ---\n{stderr}"
    );
    assert!(text.contains("Supavisor-rs"), "title missing from the DOM");
}
