//! `GET /metrics` and `GET /metrics/{tenant}`: the numbers move with real traffic, the tenant
//! filter, and the token check.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use control::metrics::{sum, try_parse_text, Sample};

use crate::harness::*;

/// Labels of the transaction-mode pool of `postgres` in `tenant`.
fn tx(tenant: &str) -> [(&'static str, &str); 3] {
    [
        ("tenant", tenant),
        ("user", "postgres"),
        ("mode", "transaction"),
    ]
}

const T1: [(&str, &str); 3] = [
    ("tenant", "t1"),
    ("user", "postgres"),
    ("mode", "transaction"),
];

/// An HS256 token with `role: metrics`, signed with `secret`.
fn token(secret: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "role": "metrics", "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// GET `path` on the API; (status, body). Connection errors are retried for a few seconds (the
/// API may come up just after the ready line).
async fn get(api: SocketAddr, path: &str, bearer: Option<String>) -> (u16, String) {
    let url = format!("http://{api}{path}");
    within(
        &format!("GET {url}"),
        tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            loop {
                let mut req = ureq::get(&url).timeout(Duration::from_secs(10));
                if let Some(t) = &bearer {
                    req = req.set("Authorization", &format!("Bearer {t}"));
                }
                match req.call() {
                    Ok(r) => return (r.status(), r.into_string().unwrap()),
                    Err(ureq::Error::Status(code, r)) => {
                        return (code, r.into_string().unwrap_or_default())
                    }
                    Err(_) if start.elapsed() < Duration::from_secs(5) => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("GET {url}: {e}"),
                }
            }
        }),
    )
    .await
    .unwrap()
}

/// A parsed scrape, with its text for failure messages.
pub(crate) struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    pub(crate) fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum(&self.samples, name, labels)
    }

    /// The lines of the scrape that mention `name`, for failure messages.
    pub(crate) fn lines(&self, name: &str) -> String {
        self.text
            .lines()
            .filter(|l| l.contains(name))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn scrape(api: SocketAddr, path: &str) -> Scrape {
    let (status, text) = get(api, path, Some(token(METRICS_JWT_SECRET))).await;
    assert_eq!(status, 200, "GET {path}: {text}");
    match try_parse_text(&text) {
        Ok(samples) => Scrape { text, samples },
        Err(e) => panic!("GET {path}: unparseable scrape: {e}\n{text}"),
    }
}

/// Scrape `/metrics` until `done` holds (or 5 s pass); returns the last scrape. Counters are
/// bumped around the bytes the client sees, so a scrape right after may be a hair behind.
pub(crate) async fn scrape_until(api: SocketAddr, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let start = Instant::now();
    loop {
        let s = scrape(api, "/metrics").await;
        if done(&s) || start.elapsed() > Duration::from_secs(5) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Queries, bytes, joins, the query histogram and the pool gauges follow real traffic through
/// the transaction port.
#[tokio::test]
async fn metrics_follow_real_traffic() {
    const N: usize = 25;
    const CLIENTS: usize = 3;
    let pooler = Pooler::start(&PoolerConfig::single(2));
    let api = pooler.api;

    let s0 = scrape(api, "/metrics").await;
    let joins0 = s0.sum("supavisor_client_joins_ok", &T1);

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(connect(pooler.transaction).await);
    }
    let s1 = scrape_until(api, |s| {
        s.sum("supavisor_client_joins_ok", &T1) >= joins0 + CLIENTS as f64
            && s.sum("supavisor_connections_active", &T1) >= CLIENTS as f64
    })
    .await;
    assert_eq!(
        s1.sum("supavisor_client_joins_ok", &T1) - joins0,
        CLIENTS as f64,
        "joins_ok after {CLIENTS} logins:\n{}",
        s1.lines("supavisor_client_joins_ok")
    );
    assert_eq!(
        s1.sum("supavisor_connections_active", &T1),
        CLIENTS as f64,
        "connections_active with {CLIENTS} clients connected:\n{}",
        s1.lines("supavisor_connections_active")
    );
    assert_eq!(
        s1.sum("supavisor_pool_clients", &T1),
        CLIENTS as f64,
        "{}",
        s1.lines("supavisor_pool_clients")
    );

    let q1 = s1.sum("supavisor_client_queries_count", &T1);
    let h1 = s1.sum("supavisor_client_query_duration_count", &T1);
    for i in 0..N {
        let rows = within(
            "simple query",
            clients[i % CLIENTS].simple_query("SELECT 1"),
        )
        .await
        .unwrap();
        assert_eq!(rows.len(), 3, "row description, one row, command complete");
    }
    let s2 = scrape_until(api, |s| {
        s.sum("supavisor_client_queries_count", &T1) >= q1 + N as f64
            && s.sum("supavisor_client_query_duration_count", &T1) >= h1 + N as f64
    })
    .await;
    assert_eq!(
        s2.sum("supavisor_client_queries_count", &T1) - q1,
        N as f64,
        "queries_count after {N} simple queries (before: {q1}):\n{}",
        s2.lines("supavisor_client_queries_count")
    );
    assert_eq!(
        s2.sum("supavisor_client_query_duration_count", &T1) - h1,
        N as f64,
        "query_duration _count after {N} simple queries (before: {h1}):\n{}",
        s2.lines("supavisor_client_query_duration_count")
    );
    // Histogram consistency: the +Inf bucket is the count, buckets never decrease.
    let inf = s2.sum(
        "supavisor_client_query_duration_bucket",
        &[T1.as_slice(), &[("le", "+Inf")]].concat(),
    );
    assert_eq!(
        inf,
        s2.sum("supavisor_client_query_duration_count", &T1),
        "{}",
        s2.lines("supavisor_client_query_duration")
    );
    assert!(s2.sum("supavisor_client_query_duration_sum", &T1) > 0.0);
    assert!(
        s2.sum("supavisor_pool_checkout_duration_count", &T1) >= 1.0,
        "{}",
        s2.lines("supavisor_pool_checkout_duration_count")
    );

    // Bytes. Each Query message of "SELECT 1" is 'Q' + length + "SELECT 1\0" = 14 bytes, and the
    // clients sent nothing else in between; each answer holds at least a 6-byte ReadyForQuery.
    let delta = |name: &str| s2.sum(name, &T1) - s1.sum(name, &T1);
    let query_bytes = (N * 14) as f64;
    let min_answer = (N * 6) as f64;
    assert_eq!(
        delta("supavisor_client_network_recv"),
        query_bytes,
        "client_network_recv grew by {} for {N} 14-byte Query messages:\n{}",
        delta("supavisor_client_network_recv"),
        s2.lines("supavisor_client_network_recv")
    );
    assert!(
        delta("supavisor_db_network_send") >= query_bytes,
        "db_network_send grew by {}:\n{}",
        delta("supavisor_db_network_send"),
        s2.lines("supavisor_db_network_send")
    );
    assert!(
        delta("supavisor_client_network_send") >= min_answer,
        "client_network_send grew by {}:\n{}",
        delta("supavisor_client_network_send"),
        s2.lines("supavisor_client_network_send")
    );
    assert!(
        delta("supavisor_db_network_recv") >= min_answer,
        "db_network_recv grew by {}:\n{}",
        delta("supavisor_db_network_recv"),
        s2.lines("supavisor_db_network_recv")
    );

    // Pool gauges: the configured size, and never more connections than that.
    let size = s2.sum("supavisor_pool_size", &T1);
    let idle = s2.sum("supavisor_pool_connections_idle", &T1);
    let out = s2.sum("supavisor_pool_connections_checked_out", &T1);
    let open = s2.sum("supavisor_pool_connections_open", &T1);
    let gauges = s2.lines("supavisor_pool_");
    assert_eq!(size, 2.0, "pool size of t1 is 2:\n{gauges}");
    assert!(
        idle + out <= size,
        "idle {idle} + checked_out {out} > size {size}:\n{gauges}"
    );
    assert!(open >= 1.0 && open <= size, "open {open}:\n{gauges}");
    assert_eq!(s2.sum("supavisor_pool_waiting", &T1), 0.0, "{gauges}");
    assert_eq!(
        s2.sum("supavisor_connections_active", &T1),
        CLIENTS as f64,
        "{}",
        s2.lines("supavisor_connections_active")
    );
    assert!(s2.sum("supavisor_tenants_active", &[]) >= 1.0);
    // Engine health: one series per shard.
    for name in [
        "supavisor_shard_handoffs_in",
        "supavisor_shard_handoffs_out",
        "supavisor_shard_clients",
        "supavisor_shard_tasks_spawned",
        "supavisor_shard_stalls",
        "supavisor_shard_refused",
    ] {
        for shard in ["0", "1"] {
            assert_eq!(
                s2.samples
                    .iter()
                    .filter(|x| x.name == name && x.has_labels(&[("shard", shard)]))
                    .count(),
                1,
                "{name}{{shard={shard}}}:\n{}",
                s2.lines(name)
            );
        }
    }
    assert_eq!(
        s2.sum("supavisor_shard_clients", &[]),
        CLIENTS as f64,
        "{}",
        s2.lines("supavisor_shard_clients")
    );

    // The clients leave: active goes to 0, their lifetimes land in the histogram.
    let life1 = s2.sum("supavisor_client_connection_duration_count", &T1);
    drop(clients);
    let s3 = scrape_until(api, |s| {
        s.sum("supavisor_connections_active", &T1) == 0.0
            && s.sum("supavisor_client_connection_duration_count", &T1) >= life1 + CLIENTS as f64
    })
    .await;
    assert_eq!(
        s3.sum("supavisor_connections_active", &T1),
        0.0,
        "{}",
        s3.lines("supavisor_connections_active")
    );
    assert_eq!(
        s3.sum("supavisor_client_connection_duration_count", &T1) - life1,
        CLIENTS as f64,
        "{}",
        s3.lines("supavisor_client_connection_duration_count")
    );
    assert!(s3.sum("supavisor_pool_connections_checked_out", &T1) == 0.0);
}

/// A wrong password counts as a failed join of that pool, not as a successful one.
#[tokio::test]
async fn wrong_password_counts_a_failed_join() {
    let pooler = Pooler::start(&PoolerConfig::single(2));
    let api = pooler.api;
    let s0 = scrape(api, "/metrics").await;
    let fail0 = s0.sum("supavisor_client_joins_fail", &T1);
    let ok0 = s0.sum("supavisor_client_joins_ok", &T1);
    expect_code(
        try_connect(pooler.transaction, "postgres.t1", "wrong").await,
        "28P01",
    );
    let s1 = scrape_until(api, |s| s.sum("supavisor_client_joins_fail", &T1) > fail0).await;
    assert_eq!(
        s1.sum("supavisor_client_joins_fail", &T1) - fail0,
        1.0,
        "joins_fail after one wrong password:\n{}",
        s1.lines("supavisor_client_joins_")
    );
    assert_eq!(
        s1.sum("supavisor_client_joins_ok", &T1),
        ok0,
        "joins_ok after one wrong password:\n{}",
        s1.lines("supavisor_client_joins_")
    );
    assert_eq!(s1.sum("supavisor_connections_active", &T1), 0.0);
}

/// `/metrics/{tenant}` has only that tenant's series; unknown tenants are 404; no or a badly
/// signed token is 401.
#[tokio::test]
async fn tenant_scrape_and_auth() {
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![
        TenantCfg::new("t1", vec![UserCfg::postgres(2)]),
        TenantCfg::new("t2", vec![UserCfg::postgres(2)]),
    ]));
    let api = pooler.api;
    let c1 = connect(pooler.transaction).await;
    let c2 = try_connect(pooler.transaction, "postgres.t2", PG_PASSWORD)
        .await
        .expect("connect as postgres.t2");
    within("t1 query", c1.simple_query("SELECT 1"))
        .await
        .unwrap();
    within("t2 query", c2.simple_query("SELECT 2"))
        .await
        .unwrap();

    let all = scrape_until(api, |s| {
        s.sum("supavisor_client_queries_count", &tx("t1")) >= 1.0
            && s.sum("supavisor_client_queries_count", &tx("t2")) >= 1.0
    })
    .await;
    assert_eq!(
        all.sum("supavisor_tenants_active", &[]),
        2.0,
        "{}",
        all.lines("supavisor_tenants_active")
    );
    assert!(all.samples.iter().any(|x| x.labels.contains_key("shard")));

    let t1 = scrape(api, "/metrics/t1").await;
    assert!(
        t1.samples
            .iter()
            .any(|x| x.name == "supavisor_client_queries_count"),
        "{}",
        t1.text
    );
    for x in &t1.samples {
        assert_eq!(
            x.labels.get("tenant").map(String::as_str),
            Some("t1"),
            "a series of another tenant (or none) in /metrics/t1: {x:?}\n{}",
            t1.text
        );
    }
    assert_eq!(
        t1.sum("supavisor_client_queries_count", &tx("t1")),
        all.sum("supavisor_client_queries_count", &tx("t1")),
    );
    let t2 = scrape(api, "/metrics/t2").await;
    assert!(!t2.samples.is_empty(), "{}", t2.text);
    assert!(
        t2.samples.iter().all(|x| x.labels["tenant"] == "t2"),
        "{}",
        t2.text
    );

    let (status, body) = get(api, "/metrics/nope", Some(token(METRICS_JWT_SECRET))).await;
    assert_eq!(status, 404, "{body}");
    for path in ["/metrics", "/metrics/t1"] {
        let (status, body) = get(api, path, None).await;
        assert_eq!(status, 401, "{path} without a token: {body}");
        let (status, body) = get(api, path, Some(token("some-other-secret-0123456789"))).await;
        assert_eq!(status, 401, "{path} with a badly signed token: {body}");
        let (status, body) = get(api, path, Some(token(API_JWT_SECRET))).await;
        assert_eq!(
            status, 401,
            "{path} with an API (not metrics) token: {body}"
        );
    }
}
