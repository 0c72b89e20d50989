//! Integration tests of the `supavisor` binary against a real PostgreSQL, with real clients
//! (tokio-postgres, psql, pgbench). Each test starts its own pooler process on its own ports; all
//! share one PostgreSQL started by the harness.

mod api_tests;
mod auth;
mod authquery_tests;
mod basic;
mod cli_tests;
mod cluster_partition;
mod cluster_rolling;
mod cluster_tests;
mod console_tests;
mod drivers;
mod faults;
mod garbage;
mod harness;
mod hostile_tests;
mod load;
mod metrics_tests;
mod ops;
mod park_tests;
mod replica_tests;
mod tls_tests;
mod websocket;

use harness::*;

/// The harness itself: the throwaway PostgreSQL accepts SCRAM logins and has the settings asked for.
#[tokio::test]
async fn temp_postgres_starts() {
    let pg = pg();
    let c = direct().await;
    let row = c
        .query_one("SELECT current_setting('max_connections'), current_setting('password_encryption'), current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "300");
    assert_eq!(row.get::<_, String>(1), "scram-sha-256");
    assert_eq!(row.get::<_, String>(2), "postgres");
    assert!(pg.url().contains(&format!(":{}/", pg.port)));
    assert_eq!(pg.psql("select 40 + 2").unwrap().trim(), "42");
    assert!(pg.psql("select nonsense_column").is_err());
    let addr = format!("{}:{}", pg.host, pg.port).parse().unwrap();
    expect_code(try_connect(addr, "postgres", "wrong").await, "28P01");
}
