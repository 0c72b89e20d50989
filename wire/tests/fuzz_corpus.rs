//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) and every input the
//! fuzzers ever found (`fuzz/regressions/<target>/`) through the same checks
//! the fuzz targets run (`wire::fuzzcheck`), on stable, in `cargo test`.
//! The `rewrite` target's rewriter half is replayed by
//! `engine/tests/fuzz_corpus.rs`.
//!
//! `cargo test -p wire --test fuzz_corpus -- --ignored write_seed_corpus`
//! regenerates the seeds.

use std::path::{Path, PathBuf};

use bytes::{BufMut, BytesMut};
use wire::fuzzcheck::{self, make_frame};
use wire::{frontend, startup};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every file of `fuzz/{corpus,regressions}/<target>/`.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let path = e.expect("readable directory").path();
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if path.is_file() && !hidden {
                let data = std::fs::read(&path).expect("readable file");
                out.push((path, data));
            }
        }
    }
    out.sort();
    out
}

fn replay(target: &str, check: fn(&[u8]), min: usize) {
    let inputs = inputs(target);
    assert!(
        inputs.len() >= min,
        "{target}: expected at least {min} corpus files, found {}",
        inputs.len()
    );
    for (path, data) in inputs {
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{target}: {} fails its check", path.display());
    }
}

#[test]
fn replay_startup() {
    replay("startup", fuzzcheck::startup, 5);
}

#[test]
fn replay_frames() {
    replay("frames", fuzzcheck::frames, 5);
}

#[test]
fn replay_scram() {
    replay("scram", fuzzcheck::scram, 5);
}

#[test]
fn replay_rewrite_names() {
    replay("rewrite", fuzzcheck::rewrite_names, 5);
}

#[test]
fn replay_websocket() {
    replay("websocket", fuzzcheck::websocket, 5);
}

fn seeds_websocket() -> Vec<(&'static str, Vec<u8>)> {
    use wire::websocket::frame::{
        encode_client_frame, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_TEXT,
    };
    let mask = [0x11, 0x22, 0x33, 0x44];
    let frame = |fin, op, payload: &[u8]| {
        let mut v = Vec::new();
        encode_client_frame(fin, op, payload, mask, &mut v);
        v
    };
    let with = |chunk: u8, max: u8, stream: Vec<u8>| [vec![chunk, max], stream].concat();
    let startup = {
        let mut b = BytesMut::new();
        startup::encode_startup(&[("user", "postgres.t1")], &mut b);
        b.to_vec()
    };
    let fragmented = [
        frame(false, OP_BINARY, &startup[..5]),
        frame(true, OP_PING, b"ping"),
        frame(false, OP_CONTINUATION, &startup[5..9]),
        frame(true, OP_CONTINUATION, &startup[9..]),
    ]
    .concat();
    let upgrade = b"GET /v2?address=db:6543&mode=session HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        .to_vec();
    vec![
        ("one_frame", with(3, 30, frame(true, OP_BINARY, &startup))),
        ("fragmented_with_ping", with(1, 30, fragmented)),
        (
            "large_frame",
            with(200, 30, frame(true, OP_BINARY, &[7u8; 70_000])),
        ),
        (
            "close",
            with(
                2,
                30,
                [
                    frame(true, OP_BINARY, b"ab"),
                    frame(true, OP_CLOSE, &[3, 232, b'x']),
                ]
                .concat(),
            ),
        ),
        ("text", with(0, 30, frame(true, OP_TEXT, b"SELECT 1"))),
        ("too_big", with(9, 4, frame(true, OP_BINARY, &[1u8; 100]))),
        ("unmasked", with(4, 30, vec![0x82, 0x02, b'h', b'i'])),
        ("upgrade_request", with(5, 30, upgrade)),
    ]
}

// ---------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------

fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    startup::encode_startup(params, &mut b);
    b.to_vec()
}

fn seeds_startup() -> Vec<(&'static str, Vec<u8>)> {
    let raw = |v: Vec<u8>| [vec![0u8], v].concat();
    let psql = startup_packet(&[
        ("user", "postgres"),
        ("database", "postgres"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
    ]);
    let jdbc = startup_packet(&[
        ("user", "app.tenant1"),
        ("database", "app"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("TimeZone", "Europe/Paris"),
        ("extra_float_digits", "2"),
        ("options", "-c search_path=app,public --reference=tenant1"),
    ]);
    let mut ssl = BytesMut::new();
    startup::encode_ssl_request(&mut ssl);
    let mut gss = BytesMut::new();
    startup::encode_gssenc_request(&mut gss);
    let mut cancel = BytesMut::new();
    startup::encode_cancel_request(4242, &[1, 2, 3, 4], &mut cancel);
    let mut cancel32 = BytesMut::new();
    startup::encode_cancel_request(-7, &[9; 32], &mut cancel32);
    let mut v32 = BytesMut::new();
    v32.put_i32(0);
    v32.put_u32(startup::PROTOCOL_V3 | 2);
    v32.put_slice(b"user\0u\0_pq_.command_trigger\0on\0\0");
    let len = v32.len() as i32;
    v32[..4].copy_from_slice(&len.to_be_bytes());
    vec![
        ("psql", raw(psql.clone())),
        ("pgjdbc", raw(jdbc)),
        ("ssl_then_psql", raw([ssl.to_vec(), psql.clone()].concat())),
        ("gssenc", raw(gss.to_vec())),
        ("cancel", raw(cancel.to_vec())),
        ("cancel_3_2_key", raw(cancel32.to_vec())),
        ("protocol_3_2", raw(v32.to_vec())),
        ("framed_params", [&[1u8][..], &psql[4..]].concat()),
        ("coded_cancel", [&[2u8, 2][..], &cancel[8..]].concat()),
        (
            "coded_v3_body",
            [&[2u8, 3][..], b"user\0alice\0options\0-c\\ x=y\0\0"].concat(),
        ),
    ]
}

fn query(sql: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::encode_query(sql, &mut b);
    b.to_vec()
}

fn parse(name: &[u8], sql: &[u8], types: &[u32]) -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::encode_parse(name, sql, types, &mut b);
    b.to_vec()
}

fn bind(name: &[u8], params: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::encode_bind(b"", name, &[0], params, &[1], &mut b).expect("bind");
    b.to_vec()
}

fn describe(kind: u8, name: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::encode_describe(kind, name, &mut b);
    b.to_vec()
}

fn close(kind: u8, name: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::encode_close(kind, name, &mut b);
    b.to_vec()
}

fn execute() -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::encode_execute(b"", 0, &mut b);
    b.to_vec()
}

fn sync() -> Vec<u8> {
    make_frame(b'S', b"")
}

/// pgbench -M simple: one transaction of the TPC-B-like script.
fn pgbench_simple() -> Vec<u8> {
    [
        "BEGIN;",
        "UPDATE pgbench_accounts SET abalance = abalance + -4120 WHERE aid = 51234;",
        "SELECT abalance FROM pgbench_accounts WHERE aid = 51234;",
        "UPDATE pgbench_tellers SET tbalance = tbalance + -4120 WHERE tid = 7;",
        "UPDATE pgbench_branches SET bbalance = bbalance + -4120 WHERE bid = 1;",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 51234, -4120, CURRENT_TIMESTAMP);",
        "END;",
    ]
    .iter()
    .flat_map(|q| query(q))
    .collect()
}

/// pgbench -M prepared: Parse once, then Bind/Describe/Execute/Sync.
fn pgbench_prepared() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(parse(
        b"P0_1",
        b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
        &[],
    ));
    v.extend(bind(b"P0_1", &[Some(b"51234")]));
    v.extend(describe(b'P', b""));
    v.extend(execute());
    v.extend(sync());
    v.extend(bind(b"P0_1", &[Some(b"77")]));
    v.extend(describe(b'P', b""));
    v.extend(execute());
    v.extend(sync());
    v
}

/// pgJDBC-like: unnamed statements, then a server-prepared S_1, a SET, DEALLOCATE.
fn jdbc_like() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(parse(b"", b"SET extra_float_digits = 3", &[]));
    v.extend(bind(b"", &[]));
    v.extend(execute());
    v.extend(sync());
    v.extend(parse(b"S_1", b"select * from t where id = $1", &[23]));
    v.extend(bind(b"S_1", &[Some(&42i32.to_be_bytes())]));
    v.extend(describe(b'S', b"S_1"));
    v.extend(execute());
    v.extend(sync());
    v.extend(parse(b"S_2", b"select 2", &[]));
    v.extend(parse(b"S_3", b"select 3", &[]));
    v.extend(bind(b"S_1", &[None]));
    v.extend(execute());
    v.extend(close(b'S', b"S_2"));
    v.extend(sync());
    v.extend(query("DEALLOCATE S_3"));
    v.extend(query("DISCARD ALL"));
    v.extend(bind(b"S_1", &[None]));
    v.extend(sync());
    v.extend(make_frame(b'X', b""));
    v
}

fn seeds_frames() -> Vec<(&'static str, Vec<u8>)> {
    // Server side: what PostgreSQL sends back to pgbench.
    let mut server = Vec::new();
    server.extend(make_frame(b'1', b""));
    server.extend(make_frame(b'2', b""));
    server.extend(make_frame(
        b'T',
        b"\0\x01abalance\0\0\0\x40\x01\0\x03\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
    ));
    server.extend(make_frame(b'D', b"\0\x01\0\0\0\x05-4120"));
    server.extend(make_frame(b'C', b"SELECT 1\0"));
    server.extend(make_frame(b'Z', b"I"));
    let big = make_frame(b'd', &[b'x'; 3000]);
    vec![
        // cfg: bit0 rewrite types whole, bit1 all whole, bit2 stop at X,
        // bit3 auth cap, bits 4-7 chunk bound.
        (
            "pgbench_simple_stream",
            [&[0x70u8, 3][..], &pgbench_simple()].concat(),
        ),
        (
            "pgbench_simple_whole",
            [&[0x31u8, 9][..], &pgbench_simple()].concat(),
        ),
        (
            "pgbench_prepared",
            [&[0x51u8, 17][..], &pgbench_prepared()].concat(),
        ),
        ("jdbc_stop_at_x", [&[0x25u8, 5][..], &jdbc_like()].concat()),
        (
            "server_replies_all_whole",
            [&[0x12u8, 1][..], &server].concat(),
        ),
        (
            "copy_data_large",
            [&[0xa0u8, 77][..], &big, &sync()].concat(),
        ),
        (
            "auth_cap",
            [&[0x4au8, 2][..], &make_frame(b'p', b"secret\0")].concat(),
        ),
    ]
}

fn seeds_scram() -> Vec<(&'static str, Vec<u8>)> {
    use wire::fuzzcheck::{CLIENT_NONCE, SERVER_NONCE};
    let two = |mode: u8, a: &str, b: &str| {
        let mut v = vec![mode];
        v.extend_from_slice(a.as_bytes());
        v.push(0xff);
        v.extend_from_slice(b.as_bytes());
        v
    };
    // A real exchange against the fuzz secret, computed with the crate.
    let (sf, cf, fin) = fuzzcheck_exchange();
    vec![
        (
            "server_ok",
            two(0, &format!("n,,n=,r={CLIENT_NONCE}"), &cf),
        ),
        (
            "server_bad_proof",
            two(
                0,
                &format!("n,,n=,r={CLIENT_NONCE}"),
                &format!("c=biws,r={CLIENT_NONCE}{SERVER_NONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="),
            ),
        ),
        (
            "server_y_flag_ext",
            two(0, "y,,n=user,r=rOprNGfwEbeRWgbNEkqO,x=ext", "c=eSws,r=x,p=AA=="),
        ),
        ("client_ok", two(1, &sf, &fin)),
        ("client_error", two(1, &sf, "e=invalid-proof")),
        (
            "client_rfc_like",
            two(
                1,
                &format!("r={CLIENT_NONCE}%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"),
                "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
            ),
        ),
        (
            "secret_pg15",
            [&[2u8][..], b"SCRAM-SHA-256$4096:MPRdkC8Eyj4KM8VADybmVw==$OdoGKB/es77gtoJVUw6eTW8GSut6ZJgamtKbjTE2aG0=:Zz4QJ9A26uepDW40Um7UyXGX098xVYfypU+KyMhBkQ0="].concat(),
        ),
    ]
}

/// (server-first, client-final, server-final) of a successful exchange
/// between the fuzz secret's server and the fuzz client.
fn fuzzcheck_exchange() -> (String, String, String) {
    use wire::fuzzcheck::{CLIENT_NONCE, SERVER_NONCE};
    use wire::scram::{salted_password, ScramClient, ScramSecret, ScramServer};
    let salted = salted_password("pencil", b"fuzz-salt-16byte", 2);
    let secret = ScramSecret::from_salted_password(&salted, b"fuzz-salt-16byte", 2);
    let mut c = ScramClient::with_nonce("unused", CLIENT_NONCE);
    c.set_salted_password(salted);
    let mut s = ScramServer::with_nonce(secret, SERVER_NONCE);
    let sf = s.handle_client_first(&c.client_first()).expect("first");
    let cf = c.handle_server_first(&sf).expect("client final");
    let (fin, _) = s.handle_client_final(&cf).expect("server final");
    c.verify_server_final(&fin).expect("verified");
    let s = |v: Vec<u8>| String::from_utf8(v).expect("utf8");
    (s(sf), s(cf), s(fin))
}

fn seeds_rewrite() -> Vec<(&'static str, Vec<u8>)> {
    // Byte 0 is both the name check's pick (P, B, D, C by % 4) and the
    // rewriter's server cache size; the rest a message body or a stream.
    let body = |f: Vec<u8>| f[5..].to_vec();
    let with = |b: u8, v: Vec<u8>| [vec![b], v].concat();
    vec![
        (
            "name_parse",
            with(0, body(parse(b"S_1", b"select $1", &[23, 25]))),
        ),
        (
            "name_bind",
            with(1, body(bind(b"S_1", &[Some(b"42"), None]))),
        ),
        ("name_describe", with(2, body(describe(b'S', b"S_1")))),
        ("name_close", with(3, body(close(b'P', b"")))),
        ("stream_pgbench_prepared", with(4, pgbench_prepared())),
        ("stream_jdbc", with(1, jdbc_like())),
        ("stream_pgbench_simple", with(2, pgbench_simple())),
        (
            "stream_evictions",
            with(
                0,
                [
                    parse(b"a", b"select 1", &[]),
                    parse(b"b", b"select 2", &[]),
                    bind(b"a", &[]),
                    execute(),
                    make_frame(b'S', b"\x01"),
                    bind(b"b", &[]),
                    describe(b'S', b"a"),
                    execute(),
                    sync(),
                ]
                .concat(),
            ),
        ),
    ]
}

/// Writes the seeds under `fuzz/corpus/`. Run by hand (see the module doc).
#[test]
#[ignore]
fn write_seed_corpus() {
    for (target, seeds) in [
        ("startup", seeds_startup()),
        ("frames", seeds_frames()),
        ("scram", seeds_scram()),
        ("rewrite", seeds_rewrite()),
        ("websocket", seeds_websocket()),
    ] {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (name, data) in seeds {
            std::fs::write(dir.join(format!("seed_{name}")), data).expect("write");
        }
    }
}

/// The seeds pass their checks (and so are worth fuzzing from).
#[test]
fn seeds_pass() {
    for (_, s) in seeds_startup() {
        fuzzcheck::startup(&s);
    }
    for (_, s) in seeds_frames() {
        fuzzcheck::frames(&s);
    }
    for (_, s) in seeds_scram() {
        fuzzcheck::scram(&s);
    }
    for (_, s) in seeds_rewrite() {
        fuzzcheck::rewrite_names(&s);
    }
    for (_, s) in seeds_websocket() {
        fuzzcheck::websocket(&s);
    }
}
