//! The prepared-statement rewriter under arbitrary client traffic, shared by
//! the `rewrite` fuzz target and the corpus replay test
//! (`engine/tests/fuzz_corpus.rs`). Not part of the crate's API.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

use wire::frame::{parse_header, MAX_FRAME_LEN};
use wire::frontend;

use crate::metrics::PoolStats;
use crate::prepared::{
    needs_inspection, on_server_frame, take_synthetics, ClientStmts, Expect, Registry, Rewriter,
    ServerStmts, SetValue, Verdict,
};

/// What a (successful) PostgreSQL server connection holds, built only from
/// the bytes the pooler sent it.
#[derive(Default)]
struct Model {
    /// Named statements and their query text.
    stmts: HashMap<Vec<u8>, Vec<u8>>,
    unnamed: Vec<u8>,
}

/// What the first statement of a SQL text does to prepared statements, as
/// PostgreSQL sees it (unquoted names fold to lower case). Only plain texts
/// (no comments) are modelled; anything else is assumed to leave them.
enum SqlEffect {
    None,
    DropAll,
    Drop(Vec<u8>),
}

fn sql_effect(sql: &[u8]) -> SqlEffect {
    let Ok(text) = std::str::from_utf8(sql) else {
        return SqlEffect::None;
    };
    let text = text.trim_end_matches([';', ' ', '\t', '\n', '\r', '\0']);
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    let up = |i: usize| words.get(i).map(|w| w.to_ascii_uppercase());
    match (up(0).as_deref(), up(1).as_deref(), up(2).as_deref()) {
        (Some("DISCARD"), Some("ALL"), None) => SqlEffect::DropAll,
        (Some("DEALLOCATE"), Some("ALL"), None) => SqlEffect::DropAll,
        (Some("DEALLOCATE"), Some("PREPARE"), Some("ALL")) if words.len() == 3 => {
            SqlEffect::DropAll
        }
        (Some("DEALLOCATE"), Some(_), _) => {
            let name = if up(1).as_deref() == Some("PREPARE") {
                words.get(2)
            } else {
                words.get(1)
            };
            let Some(name) = name.filter(|_| words.len() <= 3) else {
                return SqlEffect::None;
            };
            match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
                Some(quoted) if !quoted.contains('"') => {
                    SqlEffect::Drop(quoted.as_bytes().to_vec())
                }
                Some(_) => SqlEffect::None,
                None if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
                    SqlEffect::Drop(name.to_ascii_lowercase().into_bytes())
                }
                None => SqlEffect::None,
            }
        }
        _ => SqlEffect::None,
    }
}

fn is_swallowed(e: &Expect) -> bool {
    matches!(
        e,
        Expect::Close { swallow: true } | Expect::Parse { swallow: true, .. }
    )
}

/// Splits bytes that hold whole frames into (tag, frame).
fn frames_of(mut bytes: &[u8]) -> Vec<(u8, &[u8])> {
    let mut v = Vec::new();
    while !bytes.is_empty() {
        let h = parse_header(bytes, MAX_FRAME_LEN)
            .expect("the rewriter writes valid headers")
            .expect("the rewriter writes whole frames");
        assert!(
            h.frame_len() <= bytes.len(),
            "the rewriter writes whole frames"
        );
        let (f, rest) = bytes.split_at(h.frame_len());
        v.push((h.tag, f));
        bytes = rest;
    }
    v
}

/// A client session through the [`Rewriter`]. Byte 0: the server
/// connection's statement cache size (1 + byte % 4, so evictions happen);
/// the rest: the client's frames (the check stops at the first incomplete
/// or invalid one). A Sync has the server answer everything owed, with
/// success; a Sync with a body (not valid protocol, a harness marker) then
/// moves the session to a fresh server connection.
///
/// Invariants, per frame: the output is whole frames; each Parse / Bind /
/// Describe / Close / Query owes the client exactly one reply, queued last,
/// everything injected before it is swallowed, and output frames match the
/// queued replies one to one; a Bind or Describe of a client statement goes
/// out with its pool name, which the server has been sent a Parse for and
/// not closed or deallocated since; other Binds and Describes go out
/// unchanged. On each Sync: every queued reply is consumed in order and
/// swallowed exactly when it was injected.
pub fn rewriter(data: &[u8]) {
    let Some((&cap, mut stream)) = data.split_first() else {
        return;
    };
    let cap = 1 + usize::from(cap % 4);
    let registry = RefCell::new(Registry::default());
    let stats = PoolStats::default();
    let mut client = ClientStmts::default();
    let mut server = ServerStmts::new(cap);
    let mut expect: VecDeque<Expect> = VecDeque::new();
    let mut model = Model::default();
    let mut dirty: Vec<(String, SetValue)> = Vec::new();

    while let Ok(Some(h)) = parse_header(stream, MAX_FRAME_LEN) {
        if stream.len() < h.frame_len() {
            return;
        }
        let (frame, rest) = stream.split_at(h.frame_len());
        stream = rest;
        let body = &frame[wire::frame::HEADER_LEN..];
        let tag = h.tag;
        match tag {
            frontend::SYNC_TAG => {
                expect.push_back(Expect::Sync);
                answer_all(&mut expect, &mut server);
                if !body.is_empty() {
                    server = ServerStmts::new(cap);
                    model = Model::default();
                }
                continue;
            }
            frontend::EXECUTE_TAG => {
                expect.push_back(Expect::Execute);
                continue;
            }
            frontend::QUERY_TAG if !needs_inspection(body) => {
                expect.push_back(Expect::Query);
                apply(&mut model, tag, frame);
                continue;
            }
            b'P' | b'B' | b'D' | b'C' | b'Q' => {}
            _ => continue,
        }

        // The pool name a Bind / Describe of a client statement must use.
        let mapped = match tag {
            b'B' => frontend::bind_names(body).ok().map(|(_, n)| n),
            b'D' => frontend::describe_target(body)
                .ok()
                .filter(|(k, _)| *k == b'S')
                .map(|(_, n)| n),
            _ => None,
        }
        .filter(|n| !n.is_empty())
        .and_then(|n| client.get(n))
        .map(|s| s.name.clone());

        let queued = expect.len();
        let mut reset = crate::prepared::Resets::default();
        let mut out = Vec::new();
        let mut rw = Rewriter {
            reset: &mut reset,
            dirty: &mut dirty,
            client: &mut client,
            registry: &registry,
            server: &mut server,
            expect: &mut expect,
            stats: &stats,
        };
        if rw.frame(tag, frame, &mut out).is_err() {
            // The client is closed.
            return;
        }
        dirty.clear();

        let new: Vec<&Expect> = expect.iter().skip(queued).collect();
        let (last, injected) = new.split_last().expect("one reply owed per message");
        assert!(!is_swallowed(last), "the client's own reply comes last");
        assert!(injected.iter().all(|e| is_swallowed(e)), "{new:?}");
        let sent: Vec<&&Expect> = new
            .iter()
            .filter(|e| !matches!(e, Expect::Synthetic(_)))
            .collect();
        let out_frames = frames_of(&out);
        assert_eq!(out_frames.len(), sent.len(), "one frame per reply owed");
        for ((t, _), e) in out_frames.iter().zip(&sent) {
            let want = match e {
                Expect::Parse { .. } => b'P',
                Expect::Bind => b'B',
                Expect::Describe => b'D',
                Expect::Close { .. } => b'C',
                Expect::Query => b'Q',
                other => panic!("unexpected reply owed: {other:?}"),
            };
            assert_eq!(*t, want, "{new:?}");
        }

        for (i, (t, f)) in out_frames.iter().enumerate() {
            let is_last = i + 1 == out_frames.len();
            let b = &f[wire::frame::HEADER_LEN..];
            if is_last && matches!(*t, b'B' | b'D') {
                let name = if *t == b'B' {
                    frontend::bind_names(b).expect("Bind out decodes").1
                } else {
                    frontend::describe_target(b)
                        .expect("Describe out decodes")
                        .1
                };
                match &mapped {
                    Some(pool_name) => {
                        assert_eq!(name, &pool_name[..], "client name replaced");
                        assert!(
                            model.stmts.contains_key(name),
                            "statement {:?} used but not prepared on the server",
                            String::from_utf8_lossy(name)
                        );
                    }
                    None => assert_eq!(*f, frame, "unknown names go out as they came"),
                }
            }
            apply(&mut model, *t, f);
        }
    }
}

/// What a frame sent to the server does to its statements (once executed,
/// all assumed successful). A malformed frame (a client's, passed on) is
/// refused by the server and changes nothing.
fn apply(model: &mut Model, tag: u8, frame: &[u8]) {
    let body = &frame[wire::frame::HEADER_LEN..];
    match tag {
        b'P' => {
            let Ok(p) = frontend::decode_parse(body) else {
                return;
            };
            if p.name.is_empty() {
                model.unnamed = p.query.to_vec();
            } else {
                model.stmts.insert(p.name.to_vec(), p.query.to_vec());
            }
        }
        b'C' => {
            let Ok((kind, name)) = frontend::close_target(body) else {
                return;
            };
            if kind == b'S' {
                model.stmts.remove(name);
            }
        }
        b'B' => {
            let Ok((_, name)) = frontend::bind_names(body) else {
                return;
            };
            let query = if name.is_empty() {
                Some(model.unnamed.clone())
            } else {
                model.stmts.get(name).cloned()
            };
            if let Some(q) = query {
                run_sql(model, &q);
            }
        }
        b'Q' => {
            if let Ok(sql) = frontend::decode_query(body) {
                run_sql(model, sql);
            }
        }
        _ => {}
    }
}

fn run_sql(model: &mut Model, sql: &[u8]) {
    match sql_effect(sql) {
        SqlEffect::None => {}
        SqlEffect::DropAll => model.stmts.clear(),
        SqlEffect::Drop(name) => {
            model.stmts.remove(&name);
        }
    }
}

/// The server answers everything owed, successfully, in order.
fn answer_all(expect: &mut VecDeque<Expect>, server: &mut ServerStmts) {
    let mut synth = Vec::new();
    loop {
        take_synthetics(expect, &mut synth);
        let Some(front) = expect.front() else {
            break;
        };
        let swallow = is_swallowed(front);
        let replies: &[u8] = match front {
            Expect::Parse { .. } => b"1",
            Expect::Bind => b"2",
            Expect::Describe => b"n",
            Expect::Execute => b"C",
            Expect::Close { .. } => b"3",
            Expect::Sync => b"Z",
            Expect::Query => b"CZ",
            other => panic!("not generated here: {other:?}"),
        };
        let before = expect.len();
        for &t in replies {
            let v = on_server_frame(expect, server, t);
            let want = if swallow {
                Verdict::Swallow
            } else {
                Verdict::Forward
            };
            assert_eq!(v, want, "reply {:?}", t as char);
        }
        assert_eq!(expect.len() + 1, before, "each reply consumes its entry");
    }
}

/// The TLS session of a client connection (`crate::tls`) under arbitrary
/// bytes from the socket, for the `tls` fuzz target and its corpus replay.
///
/// Input: `data[0]` sets the size of the pieces the bytes arrive in
/// (1 + 64 x `data[0]`), `data[1] % 3` the mode, the rest is the traffic:
/// - 0: raw bytes to a fresh server session (a hostile ClientHello);
/// - 1: a real handshake with a client session first, then raw bytes (forged
///   records in an established session);
/// - 2: a real handshake, then the client encrypts the traffic as
///   application data: the server must read exactly those bytes back.
///
/// Invariants: no panic, and no panic caught inside rustls (which the
/// session would turn into the error "rustls failed on this input"); after
/// an error the session refuses everything; in mode 2 plaintext in equals
/// plaintext out.
pub fn tls(data: &[u8]) {
    use std::sync::{Arc, OnceLock};

    use crate::tls::TlsSession;

    static CONFIGS: OnceLock<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)> =
        OnceLock::new();
    let (scfg, ccfg) = CONFIGS.get_or_init(|| {
        let cert = rustls::pki_types::CertificateDer::from(&include_bytes!("fuzzcert.der")[..]);
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(include_bytes!("fuzzkey.der").to_vec().into());
        let prov = Arc::new(rustls::crypto::ring::default_provider());
        let mut scfg = rustls::ServerConfig::builder_with_provider(prov.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone().into_owned()], key)
            .expect("the fuzz certificate");
        crate::tls::capture_sni(&mut scfg);
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(cert.into_owned())
            .expect("the fuzz certificate as a root");
        let ccfg = rustls::ClientConfig::builder_with_provider(prov)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(scfg), Arc::new(ccfg))
    });
    let [size, mode, traffic @ ..] = data else {
        return;
    };
    let piece = 1 + *size as usize * 64;
    let mode = mode % 3;
    let mut server = TlsSession::server(scfg.clone()).expect("server session");
    let mut client = None;
    if mode > 0 {
        let name = rustls::pki_types::ServerName::try_from("fuzz.example").expect("name");
        let mut c = TlsSession::client(ccfg.clone(), name).expect("client session");
        loop {
            let to_server = c.pending().to_vec();
            c.sent(to_server.len());
            server
                .feed(&to_server)
                .expect("a real handshake (client side)");
            let to_client = server.pending().to_vec();
            server.sent(to_client.len());
            c.feed(&to_client).expect("a real handshake (server side)");
            if to_server.is_empty() && to_client.is_empty() {
                break;
            }
        }
        assert!(!server.is_handshaking() && !c.is_handshaking());
        assert_eq!(server.sni(), Some("fuzz.example"));
        client = Some(c);
    }
    let wire = match (&mut client, mode) {
        (Some(c), 2) => {
            for chunk in traffic.chunks(piece) {
                c.encrypt(chunk).expect("encrypt");
            }
            c.pending().to_vec()
        }
        _ => traffic.to_vec(),
    };
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    for chunk in wire.chunks(piece) {
        if let Err(e) = server.feed(chunk) {
            assert!(mode != 2, "mode 2 traffic refused: {e}");
            assert!(!e.to_string().contains("rustls failed"), "{e}");
            assert!(server.feed(b"more").is_err());
            assert!(server.close_notify().is_err());
            return;
        }
        loop {
            let n = server.read_plain(&mut buf);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }
    if mode == 2 {
        assert_eq!(got, traffic, "plaintext out differs from plaintext in");
        assert!(server.holds_nothing());
    }
    if !server.is_handshaking() {
        server
            .encrypt(b"reply")
            .expect("encrypt after the handshake");
    }
}
