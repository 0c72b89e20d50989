//! TLS: clients to the pooler (psql sslmode=require / verify-full, SNI
//! routing, enforce_ssl, across the shard handoff) and the pooler to
//! PostgreSQL (upstream_ssl with verify peer / none, against a server
//! started with ssl=on).

use std::path::{Path, PathBuf};
use std::process::Output;

use control::pgtemp::{PgOptions, TempPostgres};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::harness::*;

/// A test CA and a certificate it signed for `names`.
pub(crate) struct Pki {
    pub(crate) ca_pem: String,
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

pub(crate) fn pki(names: &[&str]) -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "supavisor test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("leaf key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("leaf params");
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].to_string());
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("leaf certificate");
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write PEM");
    p
}

/// psql with a libpq connection string; PGPASSWORD is the test password.
fn psql(conninfo: &str, sql: &str) -> Output {
    pg_program("psql")
        .args([conninfo, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "psql succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn client_tls_require_verify_full_sni_and_enforce_ssl() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(&["localhost", "*.db.test", "custom.example.test", "127.0.0.1"]);
    let cert = write(dir.path(), "pooler.crt", &pki.cert_pem);
    let key = write(dir.path(), "pooler.key", &pki.key_pem);
    let ca = write(dir.path(), "ca.crt", &pki.ca_pem);
    let role = unique("tls_t2");
    pg().psql(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{PG_PASSWORD}'"
    ))
    .expect("create role");

    let mut t1 = TenantCfg::new("t1", vec![UserCfg::postgres(3)]);
    t1.extra_toml = "enforce_ssl = true".into();
    let mut t2 = TenantCfg::new(
        "t2",
        vec![UserCfg {
            db_user: role.clone(),
            ..UserCfg::postgres(2)
        }],
    );
    t2.extra_toml = "sni_hostname = \"Custom.Example.Test\"".into();
    let mut cfg = PoolerConfig::tenants(vec![t1, t2]);
    cfg.extra_toml = format!("[tls]\ncert = {:?}\nkey = {:?}\n", cert, key);
    let pooler = Pooler::start(&cfg);

    for (name, addr) in pooler.ports() {
        let port = addr.port();
        // enforce_ssl: plaintext refused with 28000 and a clear message.
        let err = failed(&psql(
            &format!("host=127.0.0.1 port={port} user=postgres.t1 dbname=postgres sslmode=disable"),
            "SELECT 1",
        ));
        assert!(err.contains("SSL connection is required"), "{name}: {err}");

        // sslmode=require, many times: connections land on both shards, so
        // the TLS session also crosses the handoff.
        for i in 0..12 {
            let got = ok(&psql(
                &format!(
                    "host=127.0.0.1 port={port} user=postgres.t1 dbname=postgres sslmode=require"
                ),
                &format!("SELECT {i} + 1, current_user"),
            ));
            assert_eq!(got, format!("{}|postgres", i + 1), "{name}");
        }

        // Large messages cross many TLS records both ways (a 100 KB query text, a 1 MB result).
        let big = "x".repeat(100_000);
        let got = ok(&psql(
            &format!("host=127.0.0.1 port={port} user=postgres.t1 dbname=postgres sslmode=require"),
            &format!("SELECT length('{big}'), length(repeat('y', 1000000))"),
        ));
        assert_eq!(got, "100000|1000000", "{name}");

        // verify-full against the test CA, by host name.
        let got = ok(&psql(
            &format!(
                "host=localhost hostaddr=127.0.0.1 port={port} user=postgres.t1 dbname=postgres \
                 sslmode=verify-full sslrootcert={}",
                ca.display()
            ),
            "SELECT 'verified'",
        ));
        assert_eq!(got, "verified", "{name}");

        // SNI: no tenant in the user name; the first label of the host names it.
        let got = ok(&psql(
            &format!(
                "host=t1.db.test hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres \
                 sslmode=verify-full sslrootcert={}",
                ca.display()
            ),
            "SELECT current_user",
        ));
        assert_eq!(got, "postgres", "{name}");

        // SNI: a tenant's sni_hostname (matched without case) wins.
        let got = ok(&psql(
            &format!(
                "host=custom.example.test hostaddr=127.0.0.1 port={port} user={role} \
                 dbname=postgres sslmode=verify-full sslrootcert={}",
                ca.display()
            ),
            "SELECT current_user",
        ));
        assert_eq!(got, role, "{name}");
        // ...and it is t2 indeed: t2 has no user postgres.
        let err = failed(&psql(
            &format!(
                "host=custom.example.test hostaddr=127.0.0.1 port={port} user=postgres \
                 dbname=postgres sslmode=verify-full sslrootcert={}",
                ca.display()
            ),
            "SELECT 1",
        ));
        assert!(err.contains("tenant \"t2\""), "{name}: {err}");

        // A tenant without enforce_ssl still takes plaintext clients.
        let got = ok(&psql(
            &format!("host=127.0.0.1 port={port} user={role}.t2 dbname=postgres sslmode=disable"),
            "SELECT 2",
        ));
        assert_eq!(got, "2", "{name}");
    }
}

#[test]
fn client_tls_refuses_data_smuggled_behind_sslrequest() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(&["localhost"]);
    let cert = write(dir.path(), "pooler.crt", &pki.cert_pem);
    let key = write(dir.path(), "pooler.key", &pki.key_pem);
    let mut cfg = PoolerConfig::single(2);
    cfg.extra_toml = format!("[tls]\ncert = {:?}\nkey = {:?}\n", cert, key);
    let pooler = Pooler::start(&cfg);
    let mut s = std::net::TcpStream::connect(pooler.transaction).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // SSLRequest followed at once by a plaintext startup message (CVE-2021-23222).
    let mut b = bytes::BytesMut::new();
    wire::startup::encode_ssl_request(&mut b);
    wire::startup::encode_startup(&[("user", "postgres.t1"), ("database", "postgres")], &mut b);
    s.write_all(&b).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    // No 'S' and no handshake: an ErrorResponse (08P01), then the close.
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    assert!(
        String::from_utf8_lossy(&reply).contains("08P01"),
        "{reply:?}"
    );
    // A normal client is unaffected.
    let got = ok(&psql(
        &format!(
            "host=127.0.0.1 port={} user=postgres.t1 dbname=postgres sslmode=require",
            pooler.transaction.port()
        ),
        "SELECT 7",
    ));
    assert_eq!(got, "7");
}

#[test]
fn upstream_tls_peer_and_none() {
    let other = pki(&["localhost"]);
    let pki = pki(&["127.0.0.1", "localhost"]);
    let db = TempPostgres::start_with(PgOptions {
        ssl: Some((pki.cert_pem.clone(), pki.key_pem.clone())),
        password: PG_PASSWORD.to_string(),
        ..PgOptions::default()
    })
    .expect("PostgreSQL with ssl=on");
    let toml_str = |pem: &str| format!("\"\"\"\n{pem}\"\"\"");
    let tenant = |id: &str, extra: String| {
        let mut t = TenantCfg::new(id, vec![UserCfg::postgres(2)]);
        t.db = Some((db.host.clone(), db.port));
        t.extra_toml = extra;
        t
    };
    let cfg = PoolerConfig::tenants(vec![
        tenant(
            "peer",
            format!(
                "upstream_ssl = true\nupstream_verify = \"peer\"\nupstream_tls_ca = {}",
                toml_str(&pki.ca_pem)
            ),
        ),
        tenant(
            "none",
            "upstream_ssl = true\nupstream_verify = \"none\"".into(),
        ),
        tenant(
            "wrongca",
            format!(
                "upstream_ssl = true\nupstream_verify = \"peer\"\nupstream_tls_ca = {}",
                toml_str(&other.ca_pem)
            ),
        ),
        tenant("plain", String::new()),
    ]);
    let pooler = Pooler::start(&cfg);
    let ssl_of = |tenant: &str, addr: std::net::SocketAddr| {
        psql(
            &format!(
                "host=127.0.0.1 port={} user=postgres.{tenant} dbname=postgres sslmode=disable",
                addr.port()
            ),
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
    };
    for (name, addr) in pooler.ports() {
        assert_eq!(ok(&ssl_of("peer", addr)), "t", "{name}");
        assert_eq!(ok(&ssl_of("none", addr)), "t", "{name}");
        assert_eq!(ok(&ssl_of("plain", addr)), "f", "{name}");
        // Many TLS records from the database.
        let got = ok(&psql(
            &format!(
                "host=127.0.0.1 port={} user=postgres.peer dbname=postgres sslmode=disable",
                addr.port()
            ),
            "SELECT sum(length(r)) FROM (SELECT repeat('z', 1000) AS r FROM generate_series(1, 2000)) s",
        ));
        assert_eq!(got, "2000000", "{name}");
        // A certificate the configured CA did not sign: the pooler does not connect.
        let err = failed(&ssl_of("wrongca", addr));
        assert!(
            err.contains("TLS handshake with the database"),
            "{name}: {err}"
        );
    }
}
