//! `supavisorctl` against a running pooler: tenants added through the CLI serve clients at once,
//! survive `kill -9`, and errors read as plain words with a non-zero exit.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::harness::*;

/// Runs `supavisorctl --api http://API --jwt-secret SECRET ARGS...`.
fn ctl_with_secret(api: SocketAddr, secret: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_supavisorctl"))
        .arg("--api")
        .arg(format!("http://{api}"))
        .arg("--jwt-secret")
        .arg(secret)
        .args(args)
        .env_remove("SUPAVISOR_API")
        .env_remove("SUPAVISOR_TOKEN")
        .env_remove("API_JWT_SECRET")
        .output()
        .expect("run supavisorctl")
}

fn ctl(api: SocketAddr, args: &[&str]) -> Output {
    ctl_with_secret(api, API_JWT_SECRET, args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the CLI and asserts success; returns stdout.
#[track_caller]
fn ctl_ok(api: SocketAddr, args: &[&str]) -> String {
    let o = ctl(api, args);
    assert!(
        o.status.success(),
        "supavisorctl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// `tenant add ID` for the shared PostgreSQL's superuser.
fn add_tenant(api: SocketAddr, id: &str, pool_size: u32) -> String {
    let pg = pg();
    let port = pg.port.to_string();
    let size = pool_size.to_string();
    ctl_ok(
        api,
        &[
            "tenant",
            "add",
            id,
            "--db-host",
            &pg.host,
            "--db-port",
            &port,
            "--db-database",
            "postgres",
            "--user",
            &pg.superuser,
            "--password",
            &pg.password,
            "--pool-size",
            &size,
            "--mode",
            "transaction",
        ],
    )
}

/// `psql -tAc SQL` through the pooler at `addr` as `USER.TENANT`.
fn psql(addr: SocketAddr, user: &str, sql: &str) -> Output {
    pg_program("psql")
        .args(["-X", "-tA", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["-U", user, "-d", "postgres", "-c", sql])
        .output()
        .expect("run psql")
}

/// Waits (bounded) until the API answers `GET /api/health`.
fn wait_for_api(api: SocketAddr) {
    let start = Instant::now();
    loop {
        let o = ctl(api, &["health"]);
        if o.status.success() {
            return;
        }
        if start.elapsed() > Duration::from_secs(10) {
            panic!(
                "the API at {api} did not answer health within 10s: {}",
                stderr(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_no_password(text: &str) {
    assert!(
        !text.contains(PG_PASSWORD),
        "a password appeared in CLI output:\n{text}"
    );
}

/// Tenant lifecycle through the CLI, with psql logins checking that each change is served.
#[test]
fn cli_manages_tenants_end_to_end() {
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![]));
    let api = pooler.api;
    wait_for_api(api);
    let user = format!("{}.acme", pg().superuser);

    let added = add_tenant(api, "acme", 2);
    assert_no_password(&added);
    assert!(added.contains("acme"), "{added}");

    // Served at once.
    let o = psql(pooler.transaction, &user, "SELECT 40 + 2");
    assert!(
        o.status.success(),
        "psql through the new tenant failed: {}",
        stderr(&o)
    );
    assert_eq!(stdout(&o).trim(), "42");

    let list = ctl_ok(api, &["tenant", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("acme ") && l.contains("/postgres")),
        "{list}"
    );
    assert_no_password(&list);

    let shown = ctl_ok(api, &["tenant", "show", "acme", "--json"]);
    assert_no_password(&shown);
    assert!(!shown.contains("db_password"), "{shown}");
    let body: serde_json::Value = serde_json::from_str(&shown).expect("--json prints JSON");
    let t = body.get("data").unwrap_or(&body);
    assert_eq!(t["external_id"], "acme", "{shown}");
    assert_eq!(t["default_pool_size"], 2, "{shown}");
    assert_eq!(t["users"][0]["pool_size"], 2, "{shown}");

    let updated = ctl_ok(api, &["tenant", "update", "acme", "--pool-size", "3"]);
    assert_no_password(&updated);
    let shown = ctl_ok(api, &["--json", "tenant", "show", "acme"]);
    let body: serde_json::Value = serde_json::from_str(&shown).expect("--json prints JSON");
    let t = body.get("data").unwrap_or(&body);
    assert_eq!(t["default_pool_size"], 3, "{shown}");
    assert_eq!(t["users"][0]["pool_size"], 3, "{shown}");
    // The password was kept: logins still work.
    let o = psql(pooler.transaction, &user, "SELECT 1");
    assert!(
        o.status.success(),
        "psql after update failed: {}",
        stderr(&o)
    );

    let pools = ctl_ok(api, &["pool", "list"]);
    assert!(
        pools.lines().next().unwrap_or("").starts_with("TENANT"),
        "{pools}"
    );
    assert!(
        pools
            .lines()
            .any(|l| l.starts_with("acme ") && l.contains(&pg().superuser)),
        "{pools}"
    );

    // Errors in plain words, non-zero exits.
    let o = ctl(api, &["tenant", "show", "nosuch"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
    let o = ctl_with_secret(api, "not-the-secret", &["tenant", "list"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("unauthorized"), "{}", stderr(&o));
    let o = ctl(
        api,
        &[
            "tenant",
            "add",
            "bad",
            "--db-host",
            "h",
            "--db-port",
            "1",
            "--db-database",
            "d",
            "--user",
            "u",
            "--password",
            "p",
            "--pool-size",
            "0",
            "--mode",
            "session",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("invalid input") && stderr(&o).contains("pool_size"),
        "{}",
        stderr(&o)
    );
    let o = ctl(api, &["tenant", "add", "x"]);
    assert_eq!(o.status.code(), Some(2), "usage error: {}", stderr(&o));

    let removed = ctl_ok(api, &["tenant", "rm", "acme"]);
    assert!(removed.contains("acme"), "{removed}");
    let o = psql(pooler.transaction, &user, "SELECT 1");
    assert!(!o.status.success(), "login to a deleted tenant succeeded");
    assert!(
        stderr(&o).contains("not found"),
        "psql error after rm: {}",
        stderr(&o)
    );
    let list = ctl_ok(api, &["tenant", "list"]);
    assert!(!list.lines().any(|l| l.starts_with("acme ")), "{list}");
}

fn raw_dir_contains(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            raw_dir_contains(&p, needle)
        } else {
            std::fs::read(&p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        }
    })
}

/// A tenant added through the CLI is still served after the pooler is killed with SIGKILL and a
/// new one starts on the same store; the store holds no plaintext password.
#[test]
fn cli_tenants_survive_kill_9() {
    let store = tempfile::Builder::new()
        .prefix("supavisor-store.")
        .tempdir()
        .expect("temp dir");
    let store_dir = store.path().join("store");
    let cfg = PoolerConfig {
        store_dir: Some(store_dir.clone()),
        ..PoolerConfig::tenants(vec![])
    };
    let user = format!("{}.durable", pg().superuser);

    let mut first = Pooler::start(&cfg);
    assert_eq!(first.store_dir, store_dir);
    wait_for_api(first.api);
    add_tenant(first.api, "durable", 2);
    let o = psql(first.transaction, &user, "SELECT 'before'");
    assert!(o.status.success(), "psql before kill: {}", stderr(&o));
    first.kill9();
    drop(first);

    assert!(
        !raw_dir_contains(&store_dir, PG_PASSWORD.as_bytes()),
        "plaintext password in the sled store"
    );

    let second = Pooler::start(&cfg);
    let o = psql(second.transaction, &user, "SELECT 'after'");
    assert!(
        o.status.success(),
        "psql after restart on the same store: {}",
        stderr(&o)
    );
    assert_eq!(stdout(&o).trim(), "after");
    wait_for_api(second.api);
    let list = ctl_ok(second.api, &["tenant", "list"]);
    assert!(list.lines().any(|l| l.starts_with("durable ")), "{list}");
}
