//! Client authentication and tenant lookup.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// A protocol 3.0 StartupMessage.
pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

/// Send a startup packet and return the authentication request code the pooler answers with
/// (`R` message: 5 = md5, 10 = SASL).
async fn auth_request_code(addr: SocketAddr, user: &str) -> i32 {
    let mut s = within("connect", TcpStream::connect(addr)).await.unwrap();
    s.write_all(&startup_packet(&[("user", user), ("database", "postgres")]))
        .await
        .unwrap();
    let mut head = [0u8; 5];
    within("auth request", s.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(
        head[0], b'R',
        "expected an authentication request, got {head:?}"
    );
    let mut code = [0u8; 4];
    within("auth code", s.read_exact(&mut code)).await.unwrap();
    i32::from_be_bytes(code)
}

/// Wrong password -> 28P01 without opening a backend; unknown tenant / user -> 28000 naming it.
#[tokio::test]
async fn authentication_errors() {
    let role = unique("auth_role");
    pg().psql(&format!("CREATE ROLE {role} LOGIN PASSWORD 'role-pw'"))
        .unwrap();
    let mut role_user = UserCfg::postgres(2);
    role_user.db_user = role.clone();
    role_user.db_password = "role-pw".into();
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![TenantCfg::new(
        "t1",
        vec![UserCfg::postgres(2), role_user],
    )]));
    let d = direct().await;
    let (dref, role_ref) = (&d, &role);
    let backends_of_role = move || async move {
        let n: i64 = dref
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                &[role_ref],
            )
            .await
            .unwrap()
            .get(0);
        n
    };
    let role_t1 = format!("{role}.t1");

    for (port, addr) in pooler.ports() {
        expect_code(try_connect(addr, &role_t1, "wrong-pw").await, "28P01");
        expect_code(try_connect(addr, "postgres.t1", "wrong-pw").await, "28P01");
        expect_code(try_connect(addr, "postgres.t1", "").await, "28P01");
        assert_eq!(
            backends_of_role().await,
            0,
            "{port}: a failed login opened a backend"
        );

        let tenant = unique("nosuchtenant");
        let msg = expect_code(
            try_connect(addr, &format!("postgres.{tenant}"), PG_PASSWORD).await,
            "28000",
        );
        assert!(
            msg.contains(&tenant),
            "{port}: message should name {tenant}: {msg}"
        );

        let nobody = unique("nobody");
        let msg = expect_code(
            try_connect(addr, &format!("{nobody}.t1"), PG_PASSWORD).await,
            "28000",
        );
        assert!(
            msg.contains(&nobody),
            "{port}: message should name {nobody}: {msg}"
        );
    }

    // The same users with the right passwords get in, as themselves.
    for (port, addr) in pooler.ports() {
        let c = try_connect(addr, &role_t1, "role-pw")
            .await
            .unwrap_or_else(|e| panic!("{port}: {role_t1} with the right password: {e:?}"));
        let who: String = within(
            "current_user",
            c.query_one("SELECT current_user::text", &[]),
        )
        .await
        .unwrap()
        .get(0);
        assert_eq!(who, role, "{port}");
    }
    assert!(backends_of_role().await >= 1);
}

/// A tenant with auth_type = "md5": the pooler asks for md5, the right password works, a wrong
/// one gets 28P01. The default tenant asks for SCRAM.
#[tokio::test]
async fn md5_tenant() {
    let mut tenant = TenantCfg::new("tmd5", vec![UserCfg::postgres(2)]);
    tenant.auth_type = "md5";
    let pooler = Pooler::start(&PoolerConfig::tenants(vec![
        tenant,
        TenantCfg::new("t1", vec![UserCfg::postgres(2)]),
    ]));
    for (port, addr) in pooler.ports() {
        assert_eq!(
            auth_request_code(addr, "postgres.tmd5").await,
            5,
            "{port}: md5 tenant"
        );
        assert_eq!(
            auth_request_code(addr, "postgres.t1").await,
            10,
            "{port}: scram tenant"
        );
        // The tenant chosen through options (startup user = db user).
        let mut cfg = client_config(addr, "postgres", PG_PASSWORD);
        cfg.options("reference=tmd5");
        let c = connect_with(&cfg)
            .await
            .unwrap_or_else(|e| panic!("{port}: md5 login via options=reference: {e:?}"));
        let v: i32 = within("md5 reference query", c.client.query_one("SELECT 10", &[]))
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 10, "{port}");
        // The tenant in the user name: the client hashes the startup user name
        // (`postgres.tmd5`), so the pooler must too.
        let c = try_connect(addr, "postgres.tmd5", PG_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("{port}: md5 login: {e:?}"));
        let v: i32 = within("md5 client query", c.query_one("SELECT $1::int", &[&9i32]))
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 9, "{port}");
        expect_code(try_connect(addr, "postgres.tmd5", "not-it").await, "28P01");
    }
}

/// Reads one backend message (type and body).
async fn read_message(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    within("message head", s.read_exact(&mut head))
        .await
        .unwrap();
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    within("message body", s.read_exact(&mut body))
        .await
        .unwrap();
    (head[0], body)
}

/// The end of a SCRAM login to a pool that knows its parameters, which the pooler now sends
/// in one write (it sent the exchange's end and the session's start in two): SASLFinal,
/// AuthenticationOk, the parameters, BackendKeyData, ReadyForQuery, in that order and whole.
/// (Whether they came in one TCP segment is not asserted: a slower reader sees two sends as
/// one read too.)
#[tokio::test]
async fn scram_login_end_is_whole_and_in_order() {
    let pooler = Pooler::start(&PoolerConfig::single(2));
    // A first login lets the pool learn the server's parameters.
    {
        let c = connect(pooler.transaction).await;
        let v: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(v, 1);
    }
    let mut s = within("connect", TcpStream::connect(pooler.transaction))
        .await
        .unwrap();
    s.write_all(&startup_packet(&[
        ("user", "postgres.t1"),
        ("database", "postgres"),
    ]))
    .await
    .unwrap();
    let (tag, body) = read_message(&mut s).await;
    assert_eq!((tag, &body[..4]), (b'R', &10i32.to_be_bytes()[..]));
    let mut scram = wire::scram::ScramClient::new(PG_PASSWORD);
    let mut b = bytes::BytesMut::new();
    wire::frontend::encode_sasl_initial_response("SCRAM-SHA-256", &scram.client_first(), &mut b);
    s.write_all(&b).await.unwrap();
    let (tag, body) = read_message(&mut s).await;
    assert_eq!((tag, &body[..4]), (b'R', &11i32.to_be_bytes()[..]));
    let last = scram.handle_server_first(&body[4..]).unwrap();
    b.clear();
    wire::frontend::encode_sasl_response(&last, &mut b);
    s.write_all(&b).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    // Read until ReadyForQuery (the last 6 bytes are 'Z', length 5, status).
    while n < 6 || buf[n - 6] != b'Z' {
        let m = within("the login's end", s.read(&mut buf[n..]))
            .await
            .unwrap();
        assert!(m > 0, "closed after {:?}", &buf[..n]);
        n += m;
    }
    let got = &buf[..n];
    // Walk the messages of that one read.
    let mut tags = Vec::new();
    let mut at = 0;
    while at + 5 <= got.len() {
        let len = u32::from_be_bytes([got[at + 1], got[at + 2], got[at + 3], got[at + 4]]) as usize;
        tags.push(got[at]);
        at += 1 + len;
    }
    assert_eq!(at, got.len(), "a partial message in {got:?}");
    assert_eq!(&got[..1], b"R");
    assert_eq!(
        &got[5..9],
        &12i32.to_be_bytes(),
        "SASLFinal first: {tags:?}"
    );
    assert!(tags.contains(&b'S') && tags.contains(&b'K'), "{tags:?}");
    assert_eq!(tags.last(), Some(&b'Z'), "{tags:?}");
    let k = tags.iter().position(|t| *t == b'K').unwrap();
    assert!(
        tags[2..k].iter().all(|t| *t == b'S'),
        "parameters between Ok and K: {tags:?}"
    );
    assert_eq!(tags.iter().filter(|t| **t == b'R').count(), 2, "{tags:?}");
}
