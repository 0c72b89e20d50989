//! Hot-path benches (criterion): `cargo bench -p supavisor-benches [-- --quick]`.
//!
//! - `frame_scan`: `wire::frame::Walker` over buffers of pgbench-sized frames (GB/s).
//! - `scram`: server-side SCRAM-SHA-256 verification with a cached secret.
//! - `relay_batch`: the relay's per-batch work without sockets (`engine::buf::IoBuf` + `Walker`):
//!   one pgbench `-S -M extended` transaction in, its answer out.
//! - `relay_e2e`: one pgbench-sized extended transaction round trip through the engine itself
//!   (`engine::start`, a real client session and relay on a glommio shard) to an in-process fake
//!   PostgreSQL, against the same round trip straight to the fake server; the difference is
//!   what the pooler adds per transaction (two loopback hops included).
//! - `shard_handoff`: a message to another shard and its answer (`ShardHandle::send` of a
//!   `ShardMsg::Barrier`: crossbeam channel + socketpair wake-up + the shard's inbox loop), to
//!   a sleeping shard and to one that spins 200 us before it sleeps (`spin_before_park_us`).
//! - `pool`: `Pool::checkout` + `Pool::checkin` of an idle connection on a glommio executor.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use engine::buf::IoBuf;
use engine::config::UserAuth;
use engine::pool::{Pool, PoolKey};
use engine::shard::ShardMsg;
use engine::{ClientAuth, Config, PoolMode, ProxyConfig, TenantConfig, UserConfig};
use wire::backend::Authentication;
use wire::frame::{split_frame, Flow, Walker, MAX_AUTH_FRAME_LEN};
use wire::scram::{ScramClient, ScramSecret, ScramServer, SCRAM_SHA_256};

const PASSWORD: &str = "postgres";

// ---------------------------------------------------------------- pgbench-shaped frames

fn frame(tag: u8, body: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

/// One pgbench `-S -M extended` transaction as the client sends it:
/// Parse (unnamed), Bind (one text parameter), Describe portal, Execute, Sync.
fn client_txn() -> Vec<u8> {
    let mut out = Vec::new();
    let mut parse = Vec::new();
    parse.extend_from_slice(b"\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0");
    parse.extend_from_slice(&0i16.to_be_bytes());
    frame(b'P', &parse, &mut out);
    let mut bind = Vec::new();
    bind.extend_from_slice(b"\0\0");
    bind.extend_from_slice(&0i16.to_be_bytes()); // parameter formats
    bind.extend_from_slice(&1i16.to_be_bytes()); // parameters
    bind.extend_from_slice(&6i32.to_be_bytes());
    bind.extend_from_slice(b"123456");
    bind.extend_from_slice(&0i16.to_be_bytes()); // result formats
    frame(b'B', &bind, &mut out);
    frame(b'D', b"P\0", &mut out);
    let mut exec = b"\0".to_vec();
    exec.extend_from_slice(&0i32.to_be_bytes());
    frame(b'E', &exec, &mut out);
    frame(b'S', b"", &mut out);
    out
}

/// The server's answer: ParseComplete, BindComplete, RowDescription, DataRow,
/// CommandComplete, ReadyForQuery.
fn server_answer() -> Vec<u8> {
    let mut out = Vec::new();
    frame(b'1', b"", &mut out);
    frame(b'2', b"", &mut out);
    let mut rd = Vec::new();
    rd.extend_from_slice(&1i16.to_be_bytes());
    rd.extend_from_slice(b"abalance\0");
    rd.extend_from_slice(&0i32.to_be_bytes());
    rd.extend_from_slice(&0i16.to_be_bytes());
    rd.extend_from_slice(&23i32.to_be_bytes());
    rd.extend_from_slice(&4i16.to_be_bytes());
    rd.extend_from_slice(&(-1i32).to_be_bytes());
    rd.extend_from_slice(&0i16.to_be_bytes());
    frame(b'T', &rd, &mut out);
    let mut dr = Vec::new();
    dr.extend_from_slice(&1i16.to_be_bytes());
    dr.extend_from_slice(&1i32.to_be_bytes());
    dr.extend_from_slice(b"0");
    frame(b'D', &dr, &mut out);
    frame(b'C', b"SELECT 1\0", &mut out);
    frame(b'Z', b"I", &mut out);
    out
}

fn repeat_to(unit: &[u8], size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size + unit.len());
    while v.len() < size {
        v.extend_from_slice(unit);
    }
    v
}

// ---------------------------------------------------------------- frame scanning

fn bench_frame_scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_scan");
    for (name, unit, whole_z) in [
        ("client_extended_64k", client_txn(), false),
        ("server_extended_64k", server_answer(), true),
    ] {
        let buf = repeat_to(&unit, 64 * 1024);
        g.throughput(Throughput::Bytes(buf.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut w = Walker::default();
                let mut frames = 0u32;
                let n = w
                    .walk(
                        black_box(&buf),
                        |t, _| whole_z && t == b'Z',
                        |_| {
                            frames += 1;
                            Flow::Continue
                        },
                    )
                    .unwrap();
                black_box((n, frames))
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------- SCRAM

fn bench_scram(c: &mut Criterion) {
    let secret = ScramSecret::from_password(PASSWORD, b"0123456789abcdef", 4096);
    let (cnonce, snonce) = ("rOprNGfwEbeRWgbNEkqO", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
    // The client's messages, computed once: the server side is what is timed.
    let mut client = ScramClient::with_nonce(PASSWORD, cnonce);
    let client_first = client.client_first();
    let mut probe = ScramServer::with_nonce(secret.clone(), snonce);
    let server_first = probe.handle_client_first(&client_first).unwrap();
    let client_final = client.handle_server_first(&server_first).unwrap();
    probe.handle_client_final(&client_final).unwrap();

    c.bench_function("scram/server_verify_cached_secret", |b| {
        b.iter(|| {
            let mut server = ScramServer::with_nonce(secret.clone(), snonce);
            let sf = server
                .handle_client_first(black_box(&client_first))
                .unwrap();
            let (server_final, client_key) = server
                .handle_client_final(black_box(&client_final))
                .unwrap();
            black_box((sf, server_final, client_key))
        })
    });
    c.bench_function("scram/secret_from_password_pbkdf2_4096", |b| {
        b.iter(|| {
            black_box(ScramSecret::from_password(
                PASSWORD,
                b"0123456789abcdef",
                4096,
            ))
        })
    });
}

// ---------------------------------------------------------------- relay per-batch work

/// What the relay does per batch once the bytes are read: queue them, walk the
/// headers (client side: count Sync; server side: ReadyForQuery whole), hand
/// the walked bytes on, release the emptied buffer.
fn bench_relay_batch(c: &mut Criterion) {
    let req = client_txn();
    let ans = server_answer();
    let mut g = c.benchmark_group("relay_batch");
    g.throughput(Throughput::Bytes((req.len() + ans.len()) as u64));
    g.bench_function("iobuf_walk_one_extended_txn", |b| {
        let mut cbuf = IoBuf::new();
        let mut sbuf = IoBuf::with_capacity(engine::buf::DEFAULT_CAP);
        let mut cw = Walker::default();
        let mut sw = Walker::default();
        let mut sink = Vec::with_capacity(4096);
        b.iter(|| {
            // client -> server
            cbuf.extend_from_slice(black_box(&req));
            let mut pending = 0u32;
            let n = cw
                .walk(
                    cbuf.bytes(),
                    |_, _| false,
                    |s| {
                        if s.tag == b'S' {
                            pending += 1;
                        }
                        Flow::Continue
                    },
                )
                .unwrap();
            sink.clear();
            sink.extend_from_slice(&cbuf.bytes()[..n]);
            cbuf.consume(n);
            cbuf.release_if_empty();
            // server -> client
            sbuf.extend_from_slice(black_box(&ans));
            let mut status = 0u8;
            let n = sw
                .walk(
                    sbuf.bytes(),
                    |t, _| t == b'Z',
                    |s| {
                        if let Some(body) = s.body {
                            status = body[0];
                            pending -= 1;
                        }
                        Flow::Continue
                    },
                )
                .unwrap();
            sink.extend_from_slice(&sbuf.bytes()[..n]);
            sbuf.consume(n);
            black_box((sink.len(), status, pending))
        })
    });
    g.finish();
}

// ---------------------------------------------------------------- fake PostgreSQL

/// A minimal PostgreSQL on a loopback port: trusts every login and answers each
/// Sync (or Query) with the canned pgbench answer. One thread per connection.
fn fake_postgres() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || {
                let _ = serve_fake(stream);
            });
        }
    });
    addr
}

fn serve_fake(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut rest = vec![0u8; i32::from_be_bytes(len) as usize - 4];
    s.read_exact(&mut rest)?;
    let mut hello = Vec::new();
    frame(b'R', &0i32.to_be_bytes(), &mut hello);
    for (k, v) in [
        ("server_version", "15.0"),
        ("client_encoding", "UTF8"),
        ("server_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        frame(b'S', format!("{k}\0{v}\0").as_bytes(), &mut hello);
    }
    let mut key = 4242i32.to_be_bytes().to_vec();
    key.extend_from_slice(&7i32.to_be_bytes());
    frame(b'K', &key, &mut hello);
    frame(b'Z', b"I", &mut hello);
    s.write_all(&hello)?;
    let answer = server_answer();
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0usize;
    loop {
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            return Ok(());
        }
        have += n;
        let mut pos = 0;
        let mut out = Vec::new();
        while have - pos >= 5 {
            let flen = i32::from_be_bytes(buf[pos + 1..pos + 5].try_into().unwrap()) as usize + 1;
            if have - pos < flen {
                break;
            }
            match buf[pos] {
                b'S' | b'Q' => out.extend_from_slice(&answer),
                b'X' => return Ok(()),
                _ => {}
            }
            pos += flen;
        }
        buf.copy_within(pos..have, 0);
        have -= pos;
        if !out.is_empty() {
            s.write_all(&out)?;
        }
    }
}

/// Reads frames until ReadyForQuery; returns the bytes read.
fn read_until_ready(s: &mut TcpStream, buf: &mut [u8]) -> usize {
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..]).unwrap();
        assert!(n > 0, "connection closed");
        have += n;
        // ReadyForQuery is 6 bytes and always last.
        if have >= 6 && buf[have - 6] == b'Z' {
            return have;
        }
    }
}

// ---------------------------------------------------------------- the engine, in process

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn bench_user(pool_size: usize) -> Arc<UserConfig> {
    Arc::new(UserConfig {
        db_user: "postgres".into(),
        pool_size,
        max_clients: 1000,
        checkout_timeout: Duration::from_secs(10),
        default_mode: PoolMode::Transaction,
        auth: UserAuth::Password {
            password: PASSWORD.into(),
            scram: ScramSecret::generate(PASSWORD),
        },
    })
}

fn bench_tenant(db: SocketAddr, pool_size: usize) -> Arc<TenantConfig> {
    let user = bench_user(pool_size);
    Arc::new(TenantConfig {
        external_id: "bench".into(),
        db_host: db.ip().to_string(),
        db_port: db.port(),
        db_database: "postgres".into(),
        client_auth: ClientAuth::ScramSha256,
        users: HashMap::from([("postgres".to_string(), user)]),
        require_user: true,
        auth_query: String::new(),
        manager: None,
        default_pool_size: pool_size,
        default_max_clients: 1000,
        default_checkout_timeout: Duration::from_secs(10),
        enforce_ssl: false,
        sni_hostname: None,
        upstream_tls: None,
        allow_list: Vec::new(),
        timeouts: Default::default(),
        replication: Default::default(),
    })
}

fn engine_config(db: SocketAddr, shards: usize, spin_before_park: Duration) -> Arc<Config> {
    Arc::new(Config::new(
        ProxyConfig {
            session_addr: free_addr(),
            transaction_addr: free_addr(),
            shards,
            shutdown_timeout: Duration::from_secs(1),
            client_startup_timeout: Duration::from_secs(10),
            client_park_after: Duration::ZERO,
            tls: None,
            listen_backlog: 1024,
            proxy_addr: None,
            websocket_addr: None,
            websocket_cleartext: Vec::new(),
            spin_before_park,
            tcp_defer_accept: true,
        },
        HashMap::from([("bench".to_string(), bench_tenant(db, 4))]),
    ))
}

/// Logs into the pooler as `postgres.bench` with SCRAM; returns at ReadyForQuery.
fn login(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut out = BytesMut::new();
    wire::startup::encode_startup(
        &[("user", "postgres.bench"), ("database", "postgres")],
        &mut out,
    );
    s.write_all(&out).unwrap();
    let mut inbuf = BytesMut::new();
    let mut scram = ScramClient::new(PASSWORD);
    let mut chunk = [0u8; 4096];
    loop {
        let Some((h, body)) = split_frame(&mut inbuf, MAX_AUTH_FRAME_LEN).unwrap() else {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "pooler closed the login");
            inbuf.extend_from_slice(&chunk[..n]);
            continue;
        };
        let mut out = BytesMut::new();
        match h.tag {
            b'R' => match Authentication::decode(&body).unwrap() {
                Authentication::Sasl { .. } => wire::frontend::encode_sasl_initial_response(
                    SCRAM_SHA_256,
                    &scram.client_first(),
                    &mut out,
                ),
                Authentication::SaslContinue(d) => wire::frontend::encode_sasl_response(
                    &scram.handle_server_first(&d).unwrap(),
                    &mut out,
                ),
                Authentication::SaslFinal(d) => scram.verify_server_final(&d).unwrap(),
                Authentication::Ok => {}
                other => panic!("unexpected {other:?}"),
            },
            b'E' => panic!("login refused: {:?}", String::from_utf8_lossy(&body)),
            b'Z' => return s,
            _ => {}
        }
        if !out.is_empty() {
            s.write_all(&out).unwrap();
        }
    }
}

fn round_trip(s: &mut TcpStream, req: &[u8], buf: &mut [u8]) -> usize {
    s.write_all(req).unwrap();
    read_until_ready(s, buf)
}

fn bench_relay_e2e(c: &mut Criterion) {
    let db = fake_postgres();
    let req = client_txn();
    let mut buf = vec![0u8; 64 * 1024];
    let mut g = c.benchmark_group("relay_e2e");
    g.sample_size(30).measurement_time(Duration::from_secs(3));

    let mut direct = TcpStream::connect(db).unwrap();
    direct.set_nodelay(true).unwrap();
    let mut startup = BytesMut::new();
    wire::startup::encode_startup(
        &[("user", "postgres"), ("database", "postgres")],
        &mut startup,
    );
    direct.write_all(&startup).unwrap();
    read_until_ready(&mut direct, &mut buf);
    g.bench_function("direct_to_fake_pg_extended_txn", |b| {
        b.iter(|| round_trip(&mut direct, &req, &mut buf))
    });
    drop(direct);

    let config = engine_config(db, 1, Duration::ZERO);
    let addr = config.proxy.transaction_addr;
    let running = engine::start(config).expect("engine starts");
    let mut client = login(addr);
    g.bench_function("through_engine_extended_txn", |b| {
        b.iter(|| round_trip(&mut client, &req, &mut buf))
    });
    // Ten transactions pipelined in one write: the batching path.
    let ten = req.repeat(10);
    g.throughput(Throughput::Elements(10));
    g.bench_function("through_engine_10_pipelined_txns", |b| {
        b.iter(|| {
            client.write_all(&ten).unwrap();
            let mut seen = 0;
            while seen < 10 {
                let n = client.read(&mut buf).unwrap();
                assert!(n > 0);
                seen += buf[..n].windows(6).filter(|w| w == b"Z\0\0\0\x05I").count();
            }
        })
    });
    g.finish();
    drop(client);
    running.shutdown();
    let _ = running.join();
}

fn bench_shard_handoff(c: &mut Criterion) {
    let db = fake_postgres();
    // A sleeping shard (the default), then one that polls for 200 us before it
    // sleeps (`proxy.spin_before_park_us`); spinning needs pinned shards, so
    // on a machine with fewer than 2 cores both measure the sleeping shard.
    for (name, spin) in [
        ("shard_handoff/barrier_round_trip", Duration::ZERO),
        (
            "shard_handoff/barrier_round_trip_spin_200us",
            Duration::from_micros(200),
        ),
    ] {
        let running = engine::start(engine_config(db, 2, spin)).expect("engine starts");
        let handles = running.handles().clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        c.bench_function(name, |b| {
            b.iter(|| {
                if handles[1].send(ShardMsg::Barrier(tx.clone())).is_err() {
                    panic!("inbox full");
                }
                black_box(rx.recv().unwrap())
            })
        });
        running.shutdown();
        let _ = running.join();
    }
}

/// The floor under the handoff: the same round trip between two plain threads
/// on cores 0 and 1 that block in `read` on an eventfd each (no executor, no
/// channel). On a VM whose idle vCPUs halt (guest_halt_poll_ns = 0) this is
/// two wake-ups of a sleeping thread, which is most of what the shard handoff
/// costs; nothing in the pooler can go below it without spinning.
fn bench_thread_wake(c: &mut Criterion) {
    fn pin(core: usize) {
        // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(core, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    fn post(fd: i32) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to an eventfd we own.
        let n = unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
        assert_eq!(n, 8, "eventfd write");
    }
    fn wait(fd: i32) {
        let mut v = [0u8; 8];
        // SAFETY: an 8-byte read from an eventfd we own (blocking).
        let n = unsafe { libc::read(fd, v.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8, "eventfd read");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: eventfd(2) with no flags; closed at the end.
    let (ping, pong) = unsafe { (libc::eventfd(0, 0), libc::eventfd(0, 0)) };
    assert!(ping >= 0 && pong >= 0, "eventfd");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peer_stop = stop.clone();
    let peer = std::thread::spawn(move || {
        if cores > 1 {
            pin(1);
        }
        // Answers every ping; the last one comes after `stop` is set.
        loop {
            wait(ping);
            post(pong);
            if peer_stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
        }
    });
    if cores > 1 {
        pin(0);
    }
    c.bench_function("shard_handoff/floor_eventfd_thread_round_trip", |b| {
        b.iter(|| {
            post(ping);
            wait(pong);
        })
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    post(ping);
    wait(pong);
    let _ = peer.join();
    // Let the benchmark thread run anywhere again, and close the eventfds.
    // SAFETY: a cpu_set_t with every core's bit, for the calling thread; the
    // eventfds are ours and no longer used.
    unsafe {
        let mut all: libc::cpu_set_t = std::mem::zeroed();
        for core in 0..cores {
            libc::CPU_SET(core, &mut all);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &all);
        libc::close(ping);
        libc::close(pong);
    }
}

// ---------------------------------------------------------------- pool

fn bench_pool(c: &mut Criterion) {
    let db = fake_postgres();
    let (iters_tx, iters_rx) = crossbeam_channel::bounded::<u64>(1);
    let (took_tx, took_rx) = crossbeam_channel::bounded::<Duration>(1);
    let exec = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("bench-pool")
        .spawn(move || async move {
            let tenant = bench_tenant(db, 4);
            let user = tenant.users["postgres"].clone();
            let key = PoolKey::primary("bench", "postgres", PoolMode::Transaction);
            let pool: Rc<Pool> = Pool::new(key, tenant, user);
            // The first checkout opens the connection; later ones reuse it.
            let conn = pool
                .checkout(Duration::from_secs(10))
                .await
                .expect("connect");
            pool.checkin(conn);
            // Nothing else runs on this executor: blocking on the channel is fine here.
            while let Ok(n) = iters_rx.recv() {
                let t = Instant::now();
                for _ in 0..n {
                    let conn = pool.checkout(Duration::from_secs(10)).await.unwrap();
                    pool.checkin(black_box(conn));
                }
                took_tx.send(t.elapsed()).unwrap();
            }
        })
        .expect("executor");
    c.bench_function("pool/checkout_checkin_idle", |b| {
        b.iter_custom(|n| {
            iters_tx.send(n).unwrap();
            took_rx.recv().unwrap()
        })
    });
    drop(iters_tx);
    let _ = exec.join();
}

criterion_group!(
    benches,
    bench_frame_scan,
    bench_scram,
    bench_relay_batch,
    bench_relay_e2e,
    bench_shard_handoff,
    bench_thread_wake,
    bench_pool
);
criterion_main!(benches);
