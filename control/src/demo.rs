//! `supavisor demo`: a throwaway PostgreSQL with the pooler in front of it.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};

use crate::config::{ApiFile, ConfigFile, ProxyFile, StoreFile, TenantFile};
use crate::model::TenantSpec;
use crate::model::UserSpec;
use crate::pgtemp::TempPostgres;

/// `N` loopback addresses with free ports, all different: every listener
/// is held until all are picked, so the kernel cannot hand a port out twice
/// (the pooler refuses two listeners on one port).
fn free_addrs<const N: usize>() -> Result<[SocketAddr; N], String> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut addrs = [SocketAddr::from(([127, 0, 0, 1], 0)); N];
    for (addr, l) in addrs.iter_mut().zip(&listeners) {
        *addr = l.local_addr().map_err(|e| e.to_string())?;
    }
    Ok(addrs)
}

pub fn run() -> Result<(), String> {
    eprintln!("starting a throwaway PostgreSQL (initdb into a temporary directory)...");
    let pg = TempPostgres::start().map_err(|e| format!("cannot start PostgreSQL: {e}"))?;
    let [session, transaction, websocket, api] = free_addrs::<4>()?;
    let file = ConfigFile {
        proxy: ProxyFile {
            session_addr: session,
            transaction_addr: transaction,
            websocket_addr: websocket.to_string(),
            ..ProxyFile::default()
        },
        tenants: vec![TenantFile {
            external_id: "demo".into(),
            spec: TenantSpec {
                db_host: pg.host.clone(),
                db_port: pg.port,
                db_database: "postgres".into(),
                default_pool_size: 5,
                default_max_clients: 1000,
                default_pool_checkout_timeout: 60_000,
                auth_type: "scram-sha-256".into(),
                require_user: true,
                auth_query: None,
                users: vec![UserSpec {
                    db_user: pg.superuser.clone(),
                    db_password: Some(pg.password.clone()),
                    pool_size: Some(5),
                    mode_type: "transaction".into(),
                    max_clients: Some(1000),
                    pool_checkout_timeout: Some(60_000),
                    is_manager: true,
                }],
                ..TenantSpec::default()
            },
        }],
        ..ConfigFile::default()
    };
    let store = tempfile::Builder::new()
        .prefix("supavisor-demo-store.")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let jwt_secret = format!("{:032x}", rand::random::<u128>());
    let file = ConfigFile {
        api: ApiFile {
            addr: api,
            jwt_secret: Some(jwt_secret.clone()),
            metrics_jwt_secret: Some(jwt_secret.clone()),
        },
        store: StoreFile {
            path: store.path().to_path_buf(),
        },
        ..file
    };
    let password = pg.password.clone();
    let user = pg.superuser.clone();
    let result = crate::run::run(file, |r| {
        let api = r.api;
        println!("supavisor ready session={session} transaction={transaction} api={api} websocket={websocket}");
        println!();
        println!(
            "PostgreSQL (direct):  psql 'postgres://{user}:{password}@{}:{}/postgres'",
            pg.host, pg.port
        );
        println!(
            "transaction mode:     psql 'postgres://{user}.demo:{password}@{transaction}/postgres'"
        );
        println!(
            "session mode:         psql 'postgres://{user}.demo:{password}@{session}/postgres'"
        );
        println!(
            "WebSocket (serverless drivers): ws://{websocket}/v2?address=demo:{}  (user {user}.demo; see README)",
            transaction.port()
        );
        println!();
        println!("API:                  supavisorctl --api http://{api} --jwt-secret {jwt_secret} tenant list");
        println!();
        println!("Ctrl-C stops the pooler and deletes the database.");
        let _ = std::io::stdout().flush();
    });
    drop(pg);
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_ports_are_all_different() {
        for _ in 0..50 {
            let addrs = super::free_addrs::<4>().unwrap();
            let mut ports: Vec<u16> = addrs.iter().map(|a| a.port()).collect();
            ports.sort_unstable();
            ports.dedup();
            assert_eq!(ports.len(), 4, "{addrs:?}");
        }
    }
}
