//! Hostile and broken input on both ports while a normal client keeps working.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::startup_packet;
use crate::harness::*;

const CONNECTIONS: u64 = 10_000;
const CONCURRENCY: u64 = 32;

/// One hostile payload; the kinds cover random bytes, every way of cutting or lying about a
/// startup packet, and garbage after a valid start.
fn payload(rng: &mut Rng) -> Vec<u8> {
    let valid = startup_packet(&[("user", "postgres.t1"), ("database", "postgres")]);
    match rng.below(14) {
        // Random bytes.
        0 | 1 => {
            let n = 1 + rng.below(512) as usize;
            rng.bytes(n)
        }
        // A valid startup packet cut short.
        2 => {
            let cut = rng.below(valid.len() as u64) as usize;
            valid[..cut].to_vec()
        }
        // A valid startup packet, then garbage where the password message should be.
        3 => {
            let mut p = valid;
            let n = rng.below(256) as usize;
            p.extend(rng.bytes(n));
            p
        }
        // Absurd lengths.
        4 => {
            let len: u32 = [
                0x7fff_ffff,
                0xffff_ffff,
                0x8000_0000,
                1 << 30,
                1 << 20,
                10_001,
            ][rng.below(6) as usize];
            let mut p = len.to_be_bytes().to_vec();
            p.extend_from_slice(&196608u32.to_be_bytes());
            let n = rng.below(64) as usize;
            p.extend(rng.bytes(n));
            p
        }
        // Lengths under 8.
        5 => {
            let mut p = (rng.below(8) as u32).to_be_bytes().to_vec();
            let n = rng.below(16) as usize;
            p.extend(rng.bytes(n));
            p
        }
        // SSLRequest or GSSENCRequest, then garbage.
        6 => {
            let code: u32 = if rng.below(2) == 0 {
                80877103
            } else {
                80877104
            };
            let mut p = 8u32.to_be_bytes().to_vec();
            p.extend_from_slice(&code.to_be_bytes());
            let n = rng.below(128) as usize;
            p.extend(rng.bytes(n));
            p
        }
        // CancelRequest with a random key (must cancel nothing), sometimes with a bad length.
        7 => {
            let len: u32 = if rng.below(4) == 0 { 12 } else { 16 };
            let mut p = len.to_be_bytes().to_vec();
            p.extend_from_slice(&80877102u32.to_be_bytes());
            p.extend(rng.bytes(8));
            p
        }
        // Unknown protocol versions, including 3.2 with _pq_ options.
        8 => {
            let version: u32 =
                [0x0002_0000, 0x0004_0000, 196610, rng.next_u64() as u32][rng.below(4) as usize];
            let mut p = valid;
            p[4..8].copy_from_slice(&version.to_be_bytes());
            p
        }
        // Parameters without terminators / without a user.
        9 => {
            let mut body = 196608u32.to_be_bytes().to_vec();
            body.extend_from_slice(b"user\0postgres.t1");
            if rng.below(2) == 0 {
                body = 196608u32.to_be_bytes().to_vec();
                body.extend_from_slice(b"database\0postgres\0\0");
            }
            let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
            p.extend(body);
            p
        }
        // A valid start, then a SASLInitialResponse with a lying length.
        10 => {
            let mut p = valid;
            p.push(b'p');
            let len: u32 = [0x7fff_ffff, 3, 0, 0xffff_fff0][rng.below(4) as usize];
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(b"SCRAM-SHA-256\0");
            let n = rng.below(64) as usize;
            p.extend(rng.bytes(n));
            p
        }
        // A valid start, then a well-formed but bogus SCRAM client-first message.
        11 => {
            let mut p = valid;
            let first = b"n,,n=,r=AAAAAAAAAAAAAAAAAAAAAAAA";
            let mut body = b"SCRAM-SHA-256\0".to_vec();
            body.extend_from_slice(&(first.len() as u32).to_be_bytes());
            body.extend_from_slice(first);
            p.push(b'p');
            p.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            p.extend(body);
            p.push(b'p');
            p.extend_from_slice(&12u32.to_be_bytes());
            p.extend(rng.bytes(8));
            p
        }
        // Replication connection, unknown tenant, long user name.
        12 => match rng.below(3) {
            0 => startup_packet(&[("user", "postgres.t1"), ("replication", "true")]),
            1 => startup_packet(&[("user", "postgres.no_such_garbage_tenant")]),
            _ => startup_packet(&[("user", &"x".repeat(2000)), ("options", "reference=t1")]),
        },
        // Regular messages with no startup at all.
        _ => {
            let mut p = vec![b'Q'];
            p.extend_from_slice(&13u32.to_be_bytes());
            p.extend_from_slice(b"SELECT 1;\0");
            p
        }
    }
}

enum Outcome {
    Closed,
    TimedOut,
    ConnectFailed,
}

async fn throw(addr: SocketAddr, data: Vec<u8>, half_close: bool) -> Outcome {
    let mut s = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        _ => return Outcome::ConnectFailed,
    };
    // The pooler may close early: write errors are expected.
    let _ = tokio::time::timeout(Duration::from_secs(2), s.write_all(&data)).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let limit = if half_close {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(200)
    };
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Outcome::Closed,
            Ok(Ok(_)) => continue,
            Err(_) => return Outcome::TimedOut,
        }
    }
}

/// 10,000 hostile connections on both ports while normal clients keep running `SELECT 1`: the
/// normal clients never fail and the pooler survives and accepts new clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_input_does_not_disturb_clients() {
    let mut pooler = Pooler::start(&PoolerConfig::single(3));
    let stop = Arc::new(AtomicBool::new(false));

    let mut normal = Vec::new();
    for (port, addr) in pooler.ports() {
        let stop = stop.clone();
        let c = connect(addr).await;
        normal.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let one = async {
                    if n.is_multiple_of(2) {
                        c.simple_query("SELECT 1").await.map(|m| {
                            m.iter()
                                .filter_map(|m| match m {
                                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
                                    _ => None,
                                })
                                .collect::<Vec<_>>()
                                == ["1"]
                        })
                    } else {
                        c.query_one("SELECT $1::int8", &[&(n as i64)])
                            .await
                            .map(|r| r.get::<_, i64>(0) == n as i64)
                    }
                };
                match tokio::time::timeout(Duration::from_secs(10), one).await {
                    Ok(Ok(true)) => n += 1,
                    Ok(Ok(false)) => return Err(format!("{port}: wrong result at {n}")),
                    Ok(Err(e)) => return Err(format!("{port}: query {n} failed: {e:?}")),
                    Err(_) => return Err(format!("{port}: query {n} timed out")),
                }
            }
            Ok(n)
        }));
    }

    let closed = Arc::new(AtomicU64::new(0));
    let timed_out = Arc::new(AtomicU64::new(0));
    let connect_failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..CONCURRENCY {
        let addrs = [pooler.session, pooler.transaction];
        let (closed, timed_out, connect_failed) =
            (closed.clone(), timed_out.clone(), connect_failed.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(0xC0FFEE + w);
            let mut i = w;
            while i < CONNECTIONS {
                let data = payload(&mut rng);
                // Most connections half-close after writing (the pooler sees EOF); some stay
                // open and are dropped after a short wait.
                let half_close = rng.below(20) != 0;
                let counter = match throw(addrs[(i % 2) as usize], data, half_close).await {
                    Outcome::Closed => &closed,
                    Outcome::TimedOut => &timed_out,
                    Outcome::ConnectFailed => &connect_failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                i += CONCURRENCY;
            }
        }));
    }
    for w in workers {
        within_for(Duration::from_secs(150), "garbage worker", w)
            .await
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut total_queries = 0;
    for h in normal {
        let n = within("normal client", h)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("normal client disturbed by garbage: {e}"));
        assert!(n > 0, "the normal client made no progress");
        total_queries += n;
    }
    eprintln!(
        "garbage: {CONNECTIONS} connections in {:?}: {} closed by the pooler, {} still open at \
         the deadline, {} connect failures; {total_queries} normal queries meanwhile",
        started.elapsed(),
        closed.load(Ordering::Relaxed),
        timed_out.load(Ordering::Relaxed),
        connect_failed.load(Ordering::Relaxed)
    );
    assert_eq!(
        connect_failed.load(Ordering::Relaxed),
        0,
        "the pooler refused connections"
    );
    assert!(pooler.is_alive(), "the pooler died");
    for (port, addr) in pooler.ports() {
        let c = connect(addr).await;
        let v: i32 = within("new client after garbage", c.query_one("SELECT 11", &[]))
            .await
            .unwrap_or_else(|e| panic!("{port}: {e:?}"))
            .get(0);
        assert_eq!(v, 11);
    }
}
