//! Closed-loop load through a pooler, over plain TCP or over WebSocket, with one client
//! implementation for both: each of `--clients` connections logs in, then runs `--query` (simple
//! protocol) and waits for ReadyForQuery, again and again. Over TCP it logs in with SCRAM; over
//! WebSocket it sends startup, cleartext password and its first query in one frame, as
//! `@neondatabase/serverless` does, and every query is one masked binary frame.
//!
//! After `--warmup-secs` it counts transactions for `--seconds` and, given `--pid`, the pooler's
//! CPU time (user + system, from /proc) over the same window. The last line is JSON:
//! `{"transport", "clients", "seconds", "transactions", "all_transactions" (warm-up included),
//! "tps", "pooler_cpu_s", "cpu_us_per_tx"}`.
//! One thread (a current-thread runtime), so the client takes at most one core.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::{Parser, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::websocket::frame::{encode_client_frame, parse_header, OP_BINARY};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    Tcp,
    Ws,
}

#[derive(Parser, Debug)]
#[command(name = "wsbench", about = "Closed-loop load over TCP or WebSocket")]
struct Args {
    #[arg(long, value_enum)]
    transport: Transport,
    /// The pooler's transaction port (tcp) or WebSocket listener (ws).
    #[arg(long)]
    addr: SocketAddr,
    /// ws: the `address=host:port` sent in the upgrade URL (its port picks the mode).
    #[arg(long, default_value = "localhost:6543")]
    address: String,
    #[arg(long, default_value = "postgres.bench")]
    user: String,
    #[arg(long, default_value = "postgres")]
    password: String,
    #[arg(long, default_value_t = 10)]
    clients: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    #[arg(long, default_value = "SELECT 1")]
    query: String,
    /// The pooler's process id, for its CPU time.
    #[arg(long)]
    pid: Option<u32>,
}

type Res<T> = Result<T, String>;

fn main() -> Res<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Res<()> {
    let args = Arc::new(args);
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut conns = Vec::new();
    for _ in 0..args.clients {
        conns.push(Conn::open(&args).await?);
    }
    let mut tasks = Vec::new();
    for mut c in conns {
        let (count, stop, query) = (count.clone(), stop.clone(), args.query.clone());
        tasks.push(tokio::spawn(async move {
            let mut q = BytesMut::new();
            wire::frontend::encode_query(&query, &mut q);
            let q = c.frame(&q);
            while !stop.load(Ordering::Relaxed) {
                c.request(&q).await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup_secs)).await;
    let (n0, cpu0, t0) = (
        count.load(Ordering::Relaxed),
        cpu_secs(args.pid),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    let (n1, cpu1, elapsed) = (
        count.load(Ordering::Relaxed),
        cpu_secs(args.pid),
        t0.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let tx = n1 - n0;
    let secs = elapsed.as_secs_f64();
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => format!("{:.3}", b - a),
        _ => "null".into(),
    };
    let per_tx = match (cpu0, cpu1) {
        (Some(a), Some(b)) if tx > 0 => format!("{:.2}", (b - a) * 1e6 / tx as f64),
        _ => "null".into(),
    };
    let all = count.load(Ordering::Relaxed);
    println!(
        "{{\"transport\": \"{}\", \"clients\": {}, \"seconds\": {secs:.3}, \"transactions\": {tx}, \"all_transactions\": {all}, \"tps\": {:.1}, \"pooler_cpu_s\": {cpu}, \"cpu_us_per_tx\": {per_tx}}}",
        match args.transport {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        },
        args.clients,
        tx as f64 / secs,
    );
    Ok(())
}

/// User + system CPU seconds of a process.
fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks / hz.max(1) as f64)
}

struct Conn {
    s: TcpStream,
    ws: bool,
    /// Raw bytes read, not yet consumed.
    raw: Vec<u8>,
    /// Protocol bytes (deframed on ws).
    pg: Vec<u8>,
}

impl Conn {
    async fn open(args: &Args) -> Res<Conn> {
        let s = TcpStream::connect(args.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut c = Conn {
            s,
            ws: args.transport == Transport::Ws,
            raw: Vec::new(),
            pg: Vec::new(),
        };
        let mut startup = BytesMut::new();
        wire::startup::encode_startup(
            &[("user", &args.user), ("database", "postgres")],
            &mut startup,
        );
        if c.ws {
            let req = format!(
                "GET /v2?address={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                args.address, args.addr
            );
            c.s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let head = loop {
                if let Some(end) = wire::websocket::handshake::head_end(&c.raw) {
                    break c.raw.drain(..end).collect::<Vec<u8>>();
                }
                c.fill().await?;
            };
            if !head.starts_with(b"HTTP/1.1 101") {
                return Err(format!(
                    "upgrade refused: {}",
                    String::from_utf8_lossy(&head)
                ));
            }
            // The driver's pipelined login: startup, cleartext password, then it waits.
            let mut flight = startup.to_vec();
            let mut pw = BytesMut::new();
            wire::frontend::encode_password(args.password.as_bytes(), &mut pw);
            flight.extend_from_slice(&pw);
            let f = c.frame(&flight);
            c.s.write_all(&f).await.map_err(|e| e.to_string())?;
            loop {
                let (tag, body) = c.message().await?;
                match tag {
                    b'Z' => return Ok(c),
                    b'E' => {
                        return Err(format!("login failed: {}", String::from_utf8_lossy(&body)))
                    }
                    _ => {}
                }
            }
        }
        c.s.write_all(&startup).await.map_err(|e| e.to_string())?;
        let mut scram = wire::scram::ScramClient::new(&args.password);
        loop {
            let (tag, body) = c.message().await?;
            let mut out = BytesMut::new();
            match (
                tag,
                body.get(..4)
                    .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            ) {
                (b'R', Some(10)) => wire::frontend::encode_sasl_initial_response(
                    "SCRAM-SHA-256",
                    &scram.client_first(),
                    &mut out,
                ),
                (b'R', Some(11)) => {
                    let fin = scram
                        .handle_server_first(&body[4..])
                        .map_err(|e| e.to_string())?;
                    wire::frontend::encode_sasl_response(&fin, &mut out)
                }
                (b'R', Some(3)) => {
                    wire::frontend::encode_password(args.password.as_bytes(), &mut out)
                }
                (b'E', _) => {
                    return Err(format!("login failed: {}", String::from_utf8_lossy(&body)))
                }
                (b'Z', _) => return Ok(c),
                _ => {}
            }
            if !out.is_empty() {
                c.s.write_all(&out).await.map_err(|e| e.to_string())?;
            }
        }
    }

    /// The bytes to send for one protocol message: as they are, or in a masked binary frame.
    fn frame(&self, msg: &[u8]) -> Vec<u8> {
        if !self.ws {
            return msg.to_vec();
        }
        let mut out = Vec::with_capacity(msg.len() + 14);
        encode_client_frame(true, OP_BINARY, msg, [0x12, 0x34, 0x56, 0x78], &mut out);
        out
    }

    async fn request(&mut self, q: &[u8]) -> Res<()> {
        self.s.write_all(q).await.map_err(|e| e.to_string())?;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'Z' => return Ok(()),
                b'E' => return Err(format!("query failed: {}", String::from_utf8_lossy(&body))),
                _ => {}
            }
        }
    }

    async fn fill(&mut self) -> Res<()> {
        let mut chunk = [0u8; 16384];
        let n = self.s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the pooler closed the connection".into());
        }
        self.raw.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The next protocol message.
    async fn message(&mut self) -> Res<(u8, Vec<u8>)> {
        loop {
            if self.pg.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.pg[1], self.pg[2], self.pg[3], self.pg[4]]) as usize;
                if self.pg.len() > len {
                    let body = self.pg[5..len + 1].to_vec();
                    let tag = self.pg[0];
                    self.pg.drain(..len + 1);
                    return Ok((tag, body));
                }
            }
            if !self.ws {
                if self.raw.is_empty() {
                    self.fill().await?;
                }
                self.pg.append(&mut self.raw);
                continue;
            }
            match parse_header(&self.raw).map_err(|e| e.to_string())? {
                Some(h) if self.raw.len() >= h.header_len + h.len as usize => {
                    let end = h.header_len + h.len as usize;
                    if h.opcode == OP_BINARY || h.opcode == 0 {
                        self.pg.extend_from_slice(&self.raw[h.header_len..end]);
                    }
                    self.raw.drain(..end);
                }
                _ => self.fill().await?,
            }
        }
    }
}
