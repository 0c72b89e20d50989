//! Idle-connection generator: opens N connections to a pooler (or PostgreSQL), each completing
//! startup and authentication (SCRAM) up to ReadyForQuery, spread over several 127.0.0.x source
//! addresses; holds them idle; every few seconds runs `SELECT 1` on a random sample to prove they
//! live. Reports the time to open them all, the failures and, given `--pid`, the pooler's RSS
//! growth per idle client.
//!
//! One process holds N sockets: with a per-process `ulimit -n` of 20,000, N up to ~19,500 fits
//! in one generator; for more, run several generators at once (each with its own `--connections`)
//! and add up their counts against the pooler's RSS.
//!
//! The last line of output is machine-readable: `idle-clients result key=value ...`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rand::seq::index::sample;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Parser, Debug)]
#[command(
    name = "idle-clients",
    about = "Open N idle authenticated connections and measure the pooler's RSS per idle client"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: Ipv4Addr,
    #[arg(long)]
    port: u16,
    /// `user.tenant` for supavisor, the plain user for PgBouncer or PostgreSQL.
    #[arg(long, default_value = "postgres.bench")]
    user: String,
    #[arg(long, default_value = "postgres")]
    password: String,
    #[arg(long, default_value = "postgres")]
    dbname: String,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Source addresses 127.0.0.1 ..= 127.0.0.<sources>.
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// How long to hold the connections idle once all are open.
    #[arg(long, default_value_t = 30)]
    hold_secs: u64,
    #[arg(long, default_value_t = 5)]
    sample_every_secs: u64,
    /// Connections that run `SELECT 1` at each sample.
    #[arg(long, default_value_t = 50)]
    sample: usize,
    /// The pooler's process id: its VmRSS is read before and after.
    #[arg(long)]
    pid: Option<u32>,
    /// Give up on one connection after this long.
    #[arg(long, default_value_t = 30)]
    connect_timeout_secs: u64,
    /// TLS (sslmode=require); the pooler's certificate is not checked (a throwaway one).
    #[arg(long)]
    tls: bool,
}

/// TLS without checking the pooler's certificate (a throwaway one): the pooler's own
/// `upstream_verify = "none"` configuration.
fn tls_connector() -> MakeRustlsConnect {
    let config = control::tls::upstream_config("none", None).expect("TLS client configuration");
    MakeRustlsConnect::new((*config).clone())
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Kernel TCP socket memory in pages (`TCP: ... mem N` of /proc/net/sockstat).
fn tcp_mem_pages() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = s.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            return it.next()?.parse().ok();
        }
    }
    None
}

/// Kernel slab memory in KiB (`Slab:` of /proc/meminfo): socket, inode and file structures.
fn slab_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find(|l| l.starts_with("Slab:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Raise the soft fd limit to the hard one.
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
            return rl.rlim_cur;
        }
    }
    0
}

async fn open_one(
    cfg: &Config,
    source: Ipv4Addr,
    dest: SocketAddr,
    tls: Option<&MakeRustlsConnect>,
) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = socket.connect(dest).await?;
    stream.set_nodelay(true)?;
    let client = match tls {
        None => {
            let (client, conn) = cfg.connect_raw(stream, NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        Some(make) => {
            let connector =
                <MakeRustlsConnect as MakeTlsConnect<tokio::net::TcpStream>>::make_tls_connect(
                    &mut make.clone(),
                    "localhost",
                )?;
            let (client, conn) = cfg.connect_raw(stream, connector).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
    };
    Ok(client)
}

fn main() {
    let args = Args::parse();
    let limit = raise_nofile();
    if (args.connections as u64) + 64 > limit {
        eprintln!(
            "warning: {} connections need more than the fd limit {limit}; run several idle-clients processes",
            args.connections
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let dest = SocketAddr::new(IpAddr::V4(args.host), args.port);
    let mut cfg = Config::new();
    cfg.user(&args.user)
        .password(&args.password)
        .dbname(&args.dbname)
        .application_name("idle-clients");
    if args.tls {
        cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    let cfg = Arc::new(cfg);
    let tls = args.tls.then(tls_connector);

    let rss_before = args.pid.and_then(rss_kib);
    let mem_before = tcp_mem_pages();
    let slab_before = slab_kib();
    println!(
        "opening {} connections to {dest} as {} from {} source addresses (concurrency {})",
        args.connections, args.user, args.sources, args.concurrency
    );

    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let timeout = Duration::from_secs(args.connect_timeout_secs);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let source = Ipv4Addr::new(127, 0, 0, (i % args.sources.max(1) as usize) as u8 + 1);
        let sem = sem.clone();
        let cfg = cfg.clone();
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            match tokio::time::timeout(timeout, open_one(&cfg, source, dest, tls.as_ref())).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("timed out".to_string()),
            }
        }));
    }
    let mut clients: Vec<Client> = Vec::with_capacity(args.connections);
    let mut failures = 0usize;
    let mut first_errors: Vec<String> = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(c)) => clients.push(c),
            Ok(Err(e)) => {
                failures += 1;
                if first_errors.len() < 5 {
                    first_errors.push(e);
                }
            }
            Err(e) => {
                failures += 1;
                if first_errors.len() < 5 {
                    first_errors.push(e.to_string());
                }
            }
        }
    }
    let open_secs = t0.elapsed().as_secs_f64();
    println!(
        "opened {} of {} in {open_secs:.2} s ({:.0}/s), {failures} failed",
        clients.len(),
        args.connections,
        clients.len() as f64 / open_secs.max(1e-9)
    );
    for e in &first_errors {
        println!("  error: {e}");
    }

    // Let the pooler settle (startup buffers freed, allocator quiet) before the first RSS reading.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_open = args.pid.and_then(rss_kib);
    let mem_open = tcp_mem_pages();
    let slab_open = slab_kib();
    if let (Some(b), Some(a)) = (rss_before, rss_open) {
        println!("pooler RSS: {b} KiB before, {a} KiB with all open");
    }

    let hold_until = Instant::now() + Duration::from_secs(args.hold_secs);
    let mut samples = 0usize;
    let mut sample_failures = 0usize;
    while Instant::now() < hold_until && !clients.is_empty() {
        let left = hold_until.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_secs(args.sample_every_secs.max(1)))).await;
        let k = args.sample.min(clients.len());
        let picks = sample(&mut rand::thread_rng(), clients.len(), k).into_vec();
        let futs = picks.iter().map(|&i| clients[i].simple_query("SELECT 1"));
        let results = futures_util::future::join_all(futs).await;
        let bad = results.iter().filter(|r| r.is_err()).count();
        samples += k;
        sample_failures += bad;
        println!(
            "t+{:.0}s: SELECT 1 on {k} random connections: {} ok, {bad} failed",
            t0.elapsed().as_secs_f64(),
            k - bad
        );
    }

    let rss_after = args.pid.and_then(rss_kib);
    let mem_after = tcp_mem_pages();
    let ok = clients.len();
    let mut fields = vec![
        format!("connections={}", args.connections),
        format!("ok={ok}"),
        format!("failed={failures}"),
        format!("open_secs={open_secs:.3}"),
        format!("samples={samples}"),
        format!("sample_failures={sample_failures}"),
    ];
    if let (Some(b), Some(a), Some(o)) = (rss_before, rss_after, rss_open) {
        let per = if ok > 0 {
            (a as f64 - b as f64) * 1024.0 / ok as f64
        } else {
            0.0
        };
        println!(
            "pooler RSS: {b} KiB before, {o} KiB all open, {a} KiB after holding; growth per idle client {per:.0} bytes"
        );
        fields.push(format!("rss_before_kib={b}"));
        fields.push(format!("rss_open_kib={o}"));
        fields.push(format!("rss_after_kib={a}"));
        fields.push(format!("rss_per_client_bytes={per:.0}"));
    }
    if let (Some(b), Some(o), Some(a)) = (mem_before, mem_open, mem_after) {
        println!("kernel TCP memory (sockstat mem, pages): {b} before, {o} all open, {a} after");
        fields.push(format!("tcp_mem_pages_before={b}"));
        fields.push(format!("tcp_mem_pages_open={o}"));
        fields.push(format!("tcp_mem_pages_after={a}"));
    }
    if let (Some(b), Some(o)) = (slab_before, slab_open) {
        println!("kernel slab: {b} KiB before, {o} KiB all open");
        fields.push(format!("slab_before_kib={b}"));
        fields.push(format!("slab_open_kib={o}"));
    }
    println!("idle-clients result {}", fields.join(" "));
    drop(clients);
    // Give the connection tasks a moment to send Terminate.
    tokio::time::sleep(Duration::from_millis(300)).await;
}
