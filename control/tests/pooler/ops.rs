//! Operations: the systemd files, SIGHUP reload of the config file, graceful restart (SIGUSR2
//! handover to a second process on the same ports).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// `key=value` lines of a unit file (comments and section headers left out).
fn unit_keys(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Both units carry the limits and hardening the pooler needs; `systemd-analyze verify`
/// accepts them (when it is installed); every key of the sysctl file exists in this kernel;
/// the example config file is valid.
#[test]
fn systemd_files_are_complete_and_valid() {
    let dir = systemd_dir();
    for unit in ["supavisor.service", "supavisor@.service"] {
        let text = std::fs::read_to_string(dir.join(unit)).expect("read unit");
        let keys = unit_keys(&text);
        let get = |k: &str| -> Vec<&str> {
            keys.iter()
                .filter(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        for (k, v) in [
            ("LimitNOFILE", "1048576"),
            ("LimitMEMLOCK", "infinity"),
            ("Restart", "always"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("ReadWritePaths", "/var/lib/supavisor"),
            ("CapabilityBoundingSet", ""),
            ("ExecReload", "/bin/kill -HUP $MAINPID"),
            ("EnvironmentFile", "-/etc/supavisor/env"),
            ("User", "supavisor"),
            ("RestartPreventExitStatus", "75"),
            ("SuccessExitStatus", "75"),
        ] {
            assert_eq!(get(k), vec![v], "{unit}: {k}");
        }
        let exec = get("ExecStart");
        assert_eq!(exec.len(), 1, "{unit}: one ExecStart");
        assert!(
            exec[0].contains("--config /etc/supavisor/supavisor.toml")
                && exec[0].contains("--store /var/lib/supavisor/"),
            "{unit}: {exec:?}"
        );

        if std::process::Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            // verify wants ExecStart's binary to exist: point it at the one just built.
            let tmp = tempfile::tempdir().expect("temp dir");
            let copy = tmp.path().join(unit);
            std::fs::write(
                &copy,
                text.replace("/usr/local/bin/supavisor", env!("CARGO_BIN_EXE_supavisor")),
            )
            .expect("write unit copy");
            let target = if unit.contains('@') {
                // A template is verified through an instance.
                let inst = tmp.path().join("supavisor@blue.service");
                std::fs::rename(&copy, &inst).expect("rename");
                inst
            } else {
                copy
            };
            let out = std::process::Command::new("systemd-analyze")
                .arg("verify")
                .arg(&target)
                .output()
                .expect("run systemd-analyze");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "systemd-analyze verify {unit}: {stderr}"
            );
            let own: Vec<&str> = stderr.lines().filter(|l| l.contains("supavisor")).collect();
            assert!(
                own.is_empty(),
                "systemd-analyze verify {unit} warns: {own:?}"
            );
        } else {
            eprintln!("systemd-analyze is not installed: unit checked by its keys only");
        }
    }

    let sysctl = std::fs::read_to_string(dir.join("99-supavisor.conf")).expect("read sysctl");
    let mut seen = Vec::new();
    for line in sysctl.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').expect("key = value");
        let (k, v) = (k.trim(), v.trim());
        assert!(!v.is_empty(), "{k} has a value");
        let proc = Path::new("/proc/sys").join(k.replace('.', "/"));
        assert!(
            proc.exists(),
            "sysctl key {k} does not exist ({})",
            proc.display()
        );
        seen.push(k.to_string());
    }
    for k in [
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.ipv4.ip_local_port_range",
        "fs.file-max",
        "fs.nr_open",
        "net.core.rmem_default",
        "net.core.wmem_default",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "net.ipv4.tcp_mem",
    ] {
        assert!(seen.iter().any(|s| s == k), "sysctl file sets {k}");
    }

    let example = std::fs::read_to_string(dir.join("supavisor.toml")).expect("read example");
    control::config::ConfigFile::parse(&example)
        .and_then(|f| f.build())
        .expect("the example config is valid");

    let install = dir.join("install.sh");
    let out = std::process::Command::new("bash")
        .arg("-n")
        .arg(&install)
        .output()
        .expect("bash -n");
    assert!(
        out.status.success(),
        "install.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// SIGHUP: a tenant added to the file takes logins, a changed live setting
/// (`client_startup_timeout`) applies, a setting that needs a restart is logged and left as it
/// is; then files that do not parse or do not validate change nothing and the process lives on.
#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let t1 = TenantCfg::new("t1", vec![UserCfg::postgres(2)]);
    let t2 = TenantCfg::new("t2", vec![UserCfg::postgres(2)]);
    let mut pooler = Pooler::start(&PoolerConfig::tenants(vec![t1.clone()]));
    for (_, addr) in pooler.ports() {
        connect(addr).await;
        expect_code(try_connect(addr, "postgres.t2", PG_PASSWORD).await, "28000");
    }

    let mut reloaded = PoolerConfig::tenants(vec![t1.clone(), t2.clone()]);
    reloaded.client_startup_timeout = Some(300);
    // Need a restart (logged, ignored): the shard count, and a [cluster] section that was not
    // there at start.
    reloaded.shards = 1;
    reloaded.extra_toml =
        "[cluster]\nnode_id = 1\naddr = \"127.0.0.1:1\"\nsecret = \"0123456789\"\n".into();
    pooler.write_config(&reloaded);
    pooler.signal(libc::SIGHUP);
    let addr = pooler.transaction;
    eventually(
        "t2 takes logins after SIGHUP",
        Duration::from_secs(20),
        || async move { try_connect(addr, "postgres.t2", PG_PASSWORD).await.is_ok() },
    )
    .await;
    for (port, addr) in pooler.ports() {
        let c = try_connect(addr, "postgres.t2", PG_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("{port}: t2 after reload: {e:?}"));
        let row = within("query t2", c.query_one("SELECT 7", &[]))
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 7);
    }
    let log = pooler.stderr();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(
        log.contains("need a restart") && log.contains("proxy.shards") && log.contains("[cluster]"),
        "{log}"
    );

    // The new client_startup_timeout (300 ms, default 10 s) closes a client that sent part of
    // its startup packet's length (one that sends nothing waits in the kernel, TCP_DEFER_ACCEPT,
    // for as long as the startup timeout the listeners were bound with).
    let mut silent = tokio::net::TcpStream::connect(pooler.transaction)
        .await
        .expect("connect");
    silent.write_all(&[0, 0]).await.expect("write");
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent client is closed by the reloaded startup timeout: {closed:?}"
    );

    // Not TOML, then valid TOML with an invalid tenant (and a new one that must not appear).
    let bad_tenant = {
        let mut t = TenantCfg::new("t3", vec![UserCfg::postgres(2)]);
        t.users[0].mode_type = "statement";
        t
    };
    let invalid = PoolerConfig::tenants(vec![t1.clone(), t2.clone(), bad_tenant]);
    let before = count(&pooler.stderr(), "reload failed");
    for (i, text) in [
        "[proxy\nthis is not toml".to_string(),
        invalid.to_toml(
            pooler.session,
            pooler.transaction,
            pooler.api,
            &pooler.store_dir,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::write(&pooler.config_path, text).expect("write broken config");
        pooler.signal(libc::SIGHUP);
        let p = &pooler;
        eventually(
            "the failed reload is logged",
            Duration::from_secs(20),
            || async move { count(&p.stderr(), "reload failed") > before + i },
        )
        .await;
        assert!(
            pooler.is_alive(),
            "the pooler survives a broken config file"
        );
        for (port, addr) in pooler.ports() {
            for tenant in ["t1", "t2"] {
                let c = try_connect(addr, &format!("postgres.{tenant}"), PG_PASSWORD)
                    .await
                    .unwrap_or_else(|e| panic!("{port}: {tenant} after a broken reload: {e:?}"));
                within("query", c.simple_query("SELECT 1")).await.unwrap();
            }
            expect_code(try_connect(addr, "postgres.t3", PG_PASSWORD).await, "28000");
        }
    }
}

/// Graceful restart: pooler B starts on pooler A's ports (SO_REUSEPORT), A gets SIGUSR2. A's
/// idle clients (and one inside a transaction) keep being served by A, every new connection
/// goes to B (it alone knows tenant `only_b`), A's API port is B's, and A exits (status 75) on
/// its own once its last client has left.
#[tokio::test]
async fn sigusr2_hands_over_to_a_new_process_without_losing_clients() {
    // Session clients hold a server connection each: 6 idle + 1 in a transaction.
    let t1 = TenantCfg::new("t1", vec![UserCfg::postgres(10)]);
    let mut a = Pooler::start(&PoolerConfig::tenants(vec![t1.clone()]));
    const IDLE: usize = 12;
    let mut old = Vec::new();
    for i in 0..IDLE {
        let addr = if i % 2 == 0 { a.session } else { a.transaction };
        let conn = connect_with(&client_config(addr, "postgres.t1", PG_PASSWORD))
            .await
            .unwrap_or_else(|e| panic!("client {i} to A: {e:?}"));
        let row = within(
            "query on A",
            conn.client.query_one("SELECT $1::int4", &[&(i as i32)]),
        )
        .await
        .unwrap();
        assert_eq!(row.get::<_, i32>(0), i as i32);
        old.push(conn);
    }
    // One client in the middle of a transaction on each port.
    let mut in_tx = Vec::new();
    for addr in [a.session, a.transaction] {
        let conn = connect_with(&client_config(addr, "postgres.t1", PG_PASSWORD))
            .await
            .expect("transaction client");
        within(
            "begin",
            conn.client
                .batch_execute("BEGIN; CREATE TEMP TABLE IF NOT EXISTS h (x int)"),
        )
        .await
        .unwrap();
        in_tx.push(conn);
    }

    let only_b = TenantCfg::new("only_b", vec![UserCfg::postgres(2)]);
    let b = Pooler::start_on(
        &PoolerConfig::tenants(vec![t1.clone(), only_b]),
        a.session,
        a.transaction,
        a.api,
    );
    assert_eq!((b.session, b.transaction), (a.session, a.transaction));

    a.signal(libc::SIGUSR2);
    {
        let a = &a;
        eventually(
            "A closes its listeners",
            Duration::from_secs(20),
            || async move {
                let log = a.stderr();
                count(&log, "handover: listeners closed") >= 2
                    && log.contains("handover: API listener closed")
            },
        )
        .await;
    }
    assert!(a.is_alive(), "A keeps running while it has clients");

    // Every new connection is B's: A would refuse only_b with 28000.
    for i in 0..20 {
        let addr = if i % 2 == 0 { b.session } else { b.transaction };
        let c = try_connect(addr, "postgres.only_b", PG_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("new connection {i} after the handover: {e:?}"));
        within("query on B", c.simple_query("SELECT 1"))
            .await
            .unwrap();
    }
    // The API port is B's alone now.
    {
        let api = a.api;
        let health = tokio::task::spawn_blocking(move || {
            ureq::get(&format!("http://{api}/api/health"))
                .call()
                .map(|r| r.status())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap();
        assert!(
            matches!(health, Ok(200)),
            "health on the API port: {health:?}"
        );
    }

    // A's clients are all still served, by A.
    for (i, conn) in old.iter().enumerate() {
        let row = within(
            "query on A after the handover",
            conn.client.query_one("SELECT $1::int4 + 1", &[&(i as i32)]),
        )
        .await
        .unwrap_or_else(|e| panic!("old client {i}: {e:?}"));
        assert_eq!(row.get::<_, i32>(0), i as i32 + 1);
    }
    for conn in &in_tx {
        within(
            "finish the transaction",
            conn.client
                .batch_execute("INSERT INTO h VALUES (1); COMMIT"),
        )
        .await
        .unwrap();
    }
    assert!(a.is_alive(), "A still has clients");

    // The last clients leave: A exits on its own.
    for conn in old.into_iter().chain(in_tx) {
        drop(conn.client);
        let _ = within("connection task ends", conn.task).await;
    }
    {
        let a = &mut a;
        let status = a
            .exited_within(Duration::from_secs(20), "A after its last client left")
            .await;
        assert_eq!(status.code(), Some(75), "A's exit status");
    }
    // B serves on both ports.
    for (_, addr) in b.ports() {
        let c = connect(addr).await;
        within("query on B", c.simple_query("SELECT 1"))
            .await
            .unwrap();
    }
}

/// An idle pooler sleeps: after a client has come and gone (its pool keeps an idle server
/// connection), a shard wakes a few times a second, not for 50 ms probes, and the control
/// threads of a node without `[cluster]` do not tick at a cluster's pace (before: 22 and
/// about 33 wake-ups a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooler_sleeps() {
    let cfg = PoolerConfig::tenants(vec![TenantCfg::new("t1", vec![UserCfg::postgres(2)])]);
    let pooler = Pooler::start(&cfg);
    {
        let c = connect(pooler.transaction).await;
        let v: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
        assert_eq!(v, 7);
    }
    crate::metrics_tests::scrape_until(pooler.api, |s| {
        s.sum("supavisor_shard_clients", &[]) == 0.0
    })
    .await;
    let window = Duration::from_secs(4);
    let before = pooler.thread_runs();
    tokio::time::sleep(window).await;
    let after = pooler.thread_runs();
    let per_second = |name: &str| -> f64 {
        let runs: u64 = after
            .iter()
            .filter(|(_, (comm, _))| comm.starts_with(name))
            .map(|(tid, (_, n))| n - before.get(tid).map_or(0, |b| b.1))
            .sum();
        runs as f64 / window.as_secs_f64()
    };
    let (shard, control) = (per_second("shard-"), per_second("control"));
    assert!(shard > 0.0, "the shard thread was not found: {after:?}");
    assert!(shard <= 8.0, "an idle shard woke {shard:.1} times a second");
    assert!(
        control <= 12.0,
        "idle control threads woke {control:.1} times a second"
    );
}

/// `proxy.spin_before_park_us`: with 2 pinned shards that poll before they sleep, clients
/// of two tenants (one per shard, so that connections accepted on the other shard are handed
/// off) log in and query, the handoffs are counted, and SIGTERM still stops a polling shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinning_shards_serve_hand_off_and_stop() {
    let mut cfg = PoolerConfig::tenants(vec![
        TenantCfg::new("t1", vec![UserCfg::postgres(2)]),
        TenantCfg::new("t2", vec![UserCfg::postgres(2)]),
    ]);
    cfg.shards = 2;
    cfg.proxy_toml = "spin_before_park_us = 200".into();
    let mut pooler = Pooler::start(&cfg);
    let mut clients = Vec::new();
    for i in 0..16i32 {
        let user = if i % 2 == 0 {
            "postgres.t1"
        } else {
            "postgres.t2"
        };
        let c = within(
            "login to a spinning shard",
            connect_with(&client_config(pooler.transaction, user, PG_PASSWORD)),
        )
        .await
        .unwrap();
        let v: i32 = c
            .client
            .query_one("SELECT $1::int * 2", &[&i])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, i * 2);
        clients.push(c);
    }
    let m = crate::metrics_tests::scrape_until(pooler.api, |s| {
        s.sum("supavisor_shard_clients", &[]) == 16.0
    })
    .await;
    // 16 connections spread by SO_REUSEPORT over 2 shards, each tenant served by one:
    // some were accepted by the shard that does not serve their tenant.
    assert!(
        m.sum("supavisor_shard_handoffs_in", &[]) > 0.0,
        "{}",
        m.lines("handoffs")
    );
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        assert!(
            !pooler.stderr().contains("spin_before_park_us is ignored"),
            "2 shards on 2+ cores are pinned and spin:\n{}",
            pooler.stderr()
        );
    }
    drop(clients);
    let st = pooler
        .terminate(Duration::from_secs(15))
        .expect("a spinning pooler exits on SIGTERM");
    assert!(st.success(), "exit status {st:?}:\n{}", pooler.stderr());
}
