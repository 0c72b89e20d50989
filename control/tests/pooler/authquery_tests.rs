//! auth_query (`require_user = false`): database users that are not configured
//! log in with the secret from `pg_authid`, fetched as the manager user; the
//! pooler logs into PostgreSQL with the ClientKey recovered from the client's
//! SCRAM proof (or with the md5 secret), never storing the password.

use std::time::Duration;

use crate::harness::*;

fn auth_query_tenant(id: &str, auth_type: &str) -> String {
    let pg = pg();
    format!(
        "[[tenants]]\nexternal_id = {id:?}\ndb_host = {host:?}\ndb_port = {port}\n\
         db_database = \"postgres\"\nrequire_user = false\nauth_type = {auth_type:?}\n\
         default_pool_size = 2\n\n[[tenants.users]]\ndb_user = \"postgres\"\n\
         db_password = {pw:?}\nis_manager = true\npool_size = 2\n",
        host = pg.host,
        port = pg.port,
        pw = PG_PASSWORD,
    )
}

/// PostgreSQL itself must accept md5 for md5-stored roles: this server was
/// initialised with scram-sha-256 only, so members of the group `aq_md5_users`
/// get an md5 line in pg_hba.conf.
fn allow_md5_roles() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let hba = pg().data_dir.join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        let line = "host all +aq_md5_users 127.0.0.1/32 md5\n";
        std::fs::write(&hba, format!("{line}{old}")).expect("write pg_hba.conf");
        pg().psql("CREATE ROLE aq_md5_users NOLOGIN")
            .expect("group");
        pg().psql("SELECT pg_reload_conf()").expect("reload");
    });
}

fn pooler_with(tenants: &str) -> Pooler {
    let mut cfg = PoolerConfig::tenants(vec![]);
    cfg.extra_toml = tenants.to_string();
    Pooler::start(&cfg)
}

/// A SCRAM role that is in no config logs in through both ports; the
/// backend runs as that role; a wrong password is 28P01.
#[tokio::test]
async fn scram_user_through_auth_query() {
    let role = unique("aq_scram");
    pg().psql(&format!("CREATE ROLE {role} LOGIN PASSWORD 'first-pw'"))
        .unwrap();
    let pooler = pooler_with(&auth_query_tenant("taq", "scram-sha-256"));
    for (mode, addr) in pooler.ports() {
        let c = try_connect(addr, &format!("{role}.taq"), "first-pw")
            .await
            .unwrap_or_else(|e| panic!("{mode}: auth_query login failed: {e}"));
        let who: String = within(
            "current_user",
            c.query_one("SELECT current_user::text", &[]),
        )
        .await
        .unwrap()
        .get(0);
        assert_eq!(who, role, "{mode}: backend must run as the client's role");
        expect_code(
            try_connect(addr, &format!("{role}.taq"), "wrong-pw").await,
            "28P01",
        );
    }
    // A role that does not exist is named in a 28000.
    let msg = expect_code(
        try_connect(pooler.transaction, "no_such_role_xyz.taq", "pw").await,
        "28000",
    );
    assert!(msg.contains("no_such_role_xyz"), "{msg}");
}

/// After ALTER ROLE ... PASSWORD, the new password works without a restart
/// (a failed login re-queries, at most once a second) and the old one stops.
#[tokio::test]
async fn changed_password_applies_without_restart() {
    let role = unique("aq_change");
    pg().psql(&format!("CREATE ROLE {role} LOGIN PASSWORD 'old-pw'"))
        .unwrap();
    let pooler = pooler_with(&auth_query_tenant("tchg", "scram-sha-256"));
    let user = format!("{role}.tchg");
    try_connect(pooler.transaction, &user, "old-pw")
        .await
        .expect("old password before the change");
    pg().psql(&format!("ALTER ROLE {role} PASSWORD 'new-pw'"))
        .unwrap();
    let (addr, u) = (pooler.transaction, user.clone());
    eventually(
        "the new password is accepted",
        Duration::from_secs(10),
        move || {
            let u = u.clone();
            async move { try_connect(addr, &u, "new-pw").await.is_ok() }
        },
    )
    .await;
    expect_code(
        try_connect(pooler.transaction, &user, "old-pw").await,
        "28P01",
    );
}

/// An md5 role works with an md5 tenant when the client names the tenant
/// through `options` (md5 salts with the user name the client sends, which
/// must then be the database user itself).
#[tokio::test]
async fn md5_user_through_auth_query() {
    allow_md5_roles();
    let role = unique("aq_md5");
    pg().psql(&format!(
        "SET password_encryption = 'md5'; CREATE ROLE {role} LOGIN PASSWORD 'md5-pw' IN ROLE aq_md5_users"
    ))
    .unwrap();
    let pooler = pooler_with(&auth_query_tenant("tmd5q", "md5"));
    let mut cfg = client_config(pooler.transaction, &role, "md5-pw");
    cfg.options("reference=tmd5q");
    let c = connect_with(&cfg).await.expect("md5 auth_query login");
    let who: String = within(
        "current_user",
        c.client.query_one("SELECT current_user::text", &[]),
    )
    .await
    .unwrap()
    .get(0);
    assert_eq!(who, role);
    let mut bad = client_config(pooler.transaction, &role, "nope");
    bad.options("reference=tmd5q");
    expect_code(connect_with(&bad).await.map(|c| c.client), "28P01");
}
