//! Checks shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`) and the
//! corpus replay test (`wire/tests/fuzz_corpus.rs`): each takes arbitrary
//! bytes, runs a decoder on them and panics if an invariant breaks. Not
//! part of the crate's API.
//!
//! Input layouts (a leading byte or two steer the check, the rest is data)
//! are documented on each function; `fuzz/corpus/<target>/` holds seeds in
//! those layouts.

use base64::Engine as _;
use bytes::{BufMut, BytesMut};

use crate::frame::{self, Flow, Walker, HEADER_LEN};
use crate::frontend;
use crate::scram::{self, ScramClient, ScramSecret, ScramServer};
use crate::startup::{self, StartupPacket};
use crate::WireError;

// ---------------------------------------------------------------------------
// startup
// ---------------------------------------------------------------------------

/// `decode_startup` over bytes. Byte 0 picks how the rest is framed:
/// `0`: as is; `1`: behind a correct length (so the code and body are
/// reached); `2`: behind a correct length and one of the known codes
/// (byte 1 picks SSL, GSSENC, cancel, 3.0 or 3.2).
///
/// Invariants: `Ok(None)` consumes nothing; `Ok(Some)` consumes exactly the
/// packet's length field and the packet re-encodes to the same bytes; every
/// shorter prefix of an accepted packet gives `Ok(None)`; a StartupMessage
/// has a non-empty `user`; the options helpers never panic.
pub fn startup(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let input: Vec<u8> = match mode % 3 {
        0 => rest.to_vec(),
        1 => {
            let mut v = Vec::with_capacity(rest.len() + 4);
            v.extend_from_slice(&((rest.len() + 4) as i32).to_be_bytes());
            v.extend_from_slice(rest);
            v
        }
        _ => {
            let Some((&pick, body)) = rest.split_first() else {
                return;
            };
            let code = [
                startup::SSL_REQUEST_CODE,
                startup::GSSENC_REQUEST_CODE,
                startup::CANCEL_REQUEST_CODE,
                startup::PROTOCOL_V3,
                startup::PROTOCOL_V3 | 2,
            ][pick as usize % 5];
            let mut v = Vec::with_capacity(body.len() + 8);
            v.extend_from_slice(&((body.len() + 8) as i32).to_be_bytes());
            v.extend_from_slice(&code.to_be_bytes());
            v.extend_from_slice(body);
            v
        }
    };

    let mut buf = BytesMut::from(&input[..]);
    // Several packets may follow one another (SSLRequest, then StartupMessage).
    for _ in 0..4 {
        let before = buf.clone();
        match startup::decode_startup(&mut buf) {
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) must consume nothing");
                return;
            }
            Err(_) => return,
            Ok(Some(packet)) => {
                let consumed = before.len() - buf.len();
                let declared =
                    i32::from_be_bytes([before[0], before[1], before[2], before[3]]) as usize;
                assert_eq!(consumed, declared, "consumed exactly the packet");
                let raw = &before[..consumed];
                check_startup_packet(&packet, raw);
                let cuts = (0..consumed.min(16)).chain([consumed / 2, consumed - 1]);
                for cut in cuts {
                    let mut part = BytesMut::from(&raw[..cut]);
                    assert!(
                        matches!(startup::decode_startup(&mut part), Ok(None)),
                        "prefix {cut} of an accepted packet must ask for more"
                    );
                    assert_eq!(part.len(), cut);
                }
            }
        }
    }
}

fn check_startup_packet(packet: &StartupPacket, raw: &[u8]) {
    let mut re = BytesMut::new();
    match packet {
        StartupPacket::SslRequest => startup::encode_ssl_request(&mut re),
        StartupPacket::GssEncRequest => startup::encode_gssenc_request(&mut re),
        StartupPacket::Cancel(c) => {
            assert!((4..=crate::backend::MAX_CANCEL_KEY_LEN).contains(&c.secret.len()));
            startup::encode_cancel_request(c.process_id, &c.secret, &mut re);
        }
        StartupPacket::Startup(m) => {
            assert_eq!(m.major, 3);
            assert!(m.user().is_some_and(|u| !u.is_empty()));
            for (n, v) in &m.params {
                assert!(!n.is_empty() && !n.contains('\0') && !v.contains('\0'));
            }
            let params: Vec<(&str, &str)> = m
                .params
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            startup::encode_startup(&params, &mut re);
            // The encoder speaks 3.0; put the minor version back.
            re[6..8].copy_from_slice(&m.minor.to_be_bytes());
            let _ = m.database();
            let _ = m.protocol_options();
            let _ = m.option_tokens();
            for key in ["search_path", "reference", "application_name"] {
                let _ = m.option_value(key);
            }
        }
    }
    assert_eq!(&re[..], raw, "re-encoding gives the same bytes");
}

// ---------------------------------------------------------------------------
// frames
// ---------------------------------------------------------------------------

/// One frame as the walker reported it, at its offset in the whole stream.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reported {
    tag: u8,
    offset: usize,
    len: usize,
    body: Option<Vec<u8>>,
}

#[derive(Debug, PartialEq, Eq)]
struct WalkOutcome {
    frames: Vec<Reported>,
    walked: usize,
    failed: bool,
    stopped: bool,
}

/// Small deterministic generator for chunk sizes.
struct Split(u32);

impl Split {
    fn next(&mut self, max: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        1 + self.0 as usize % max
    }
}

/// The [`Walker`] over a stream fed whole and fed in chunks. Byte 0
/// configures: bit 0 asks for Parse/Bind/Describe/Close/Query whole, bit 1
/// every frame whole, bit 2 stops at Terminate (`X`), bit 3 caps frames at
/// [`frame::MAX_AUTH_FRAME_LEN`]; bits 4-7 bound the chunk size
/// (1..=2^(n/2+1)). Byte 1 seeds the chunk sizes; the rest is the stream.
///
/// Invariants: walked ≤ buffer; reported frames tile the stream from 0 and
/// lie inside the buffer given; a body is reported only whole and only for
/// wanted frames; `wanted()` names the frame left waiting; the same frames,
/// total and outcome whole or chunked; for "every frame whole",
/// [`frame::split_frame`] cuts the same frames.
pub fn frames(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let cfg = data[0];
    let seed = data[1];
    let stream = &data[2..];
    let max_len = if cfg & 8 != 0 {
        frame::MAX_AUTH_FRAME_LEN
    } else {
        frame::MAX_FRAME_LEN
    };
    let whole = move |tag: u8, _len: usize| {
        cfg & 2 != 0 || (cfg & 1 != 0 && matches!(tag, b'P' | b'B' | b'D' | b'C' | b'Q'))
    };
    let max_chunk = 1usize << ((cfg >> 4) / 2 + 1);

    let one = walk_chunks(stream, &whole, cfg & 4 != 0, max_len, &mut |_| stream.len());
    let mut split = Split(0x9e37_79b9 ^ u32::from(seed).wrapping_mul(0x0101_0101) | 1);
    let chunked = walk_chunks(stream, &whole, cfg & 4 != 0, max_len, &mut |_| {
        split.next(max_chunk)
    });
    assert_eq!(one, chunked, "whole and chunked walks differ");

    // Frames tile the stream from its start.
    let mut end = 0;
    for f in &one.frames {
        assert_eq!(f.offset, end, "frames must follow one another");
        assert!(f.len >= HEADER_LEN && f.len - 1 <= max_len);
        assert_eq!(f.tag, stream[f.offset]);
        if let Some(body) = &f.body {
            assert!(whole(f.tag, f.len), "body only for wanted frames");
            assert_eq!(body.len(), f.len - HEADER_LEN);
            assert_eq!(&body[..], &stream[f.offset + HEADER_LEN..f.offset + f.len]);
        } else {
            assert!(!whole(f.tag, f.len));
        }
        end = f.offset + f.len;
    }
    if !one.stopped {
        assert!(one.walked <= stream.len());
    }
    if !one.failed && !one.stopped {
        // Everything up to the last frame's end was walked (or the stream ran out).
        assert_eq!(one.walked, end.min(stream.len()));
    }

    if cfg & 2 != 0 && cfg & 4 == 0 {
        let mut buf = BytesMut::from(stream);
        let mut got = Vec::new();
        let mut offset = 0;
        let failed = loop {
            match frame::split_frame(&mut buf, max_len) {
                Ok(Some((h, body))) => {
                    assert_eq!(body.len(), h.body_len());
                    got.push(Reported {
                        tag: h.tag,
                        offset,
                        len: h.frame_len(),
                        body: Some(body.to_vec()),
                    });
                    offset += h.frame_len();
                }
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        assert_eq!(got, one.frames, "split_frame and the walker disagree");
        assert_eq!(failed, one.failed);
        if !failed {
            assert_eq!(offset, one.walked);
        }
    }
}

fn walk_chunks(
    stream: &[u8],
    whole: &dyn Fn(u8, usize) -> bool,
    stop_at_x: bool,
    max_len: usize,
    next_chunk: &mut dyn FnMut(usize) -> usize,
) -> WalkOutcome {
    let mut w = Walker::new(max_len);
    let mut pending: Vec<u8> = Vec::new();
    let mut base = 0; // stream offset of pending[0]
    let mut fed = 0;
    let mut out = WalkOutcome {
        frames: Vec::new(),
        walked: 0,
        failed: false,
        stopped: false,
    };
    while fed < stream.len() {
        let n = next_chunk(fed).min(stream.len() - fed);
        pending.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        let mut stop = false;
        let mut seen_here = Vec::new();
        let buf_len = pending.len();
        let r = w.walk(&pending, whole, |s| {
            assert!(s.offset + HEADER_LEN <= buf_len, "header inside the buffer");
            if let Some(b) = s.body {
                assert_eq!(b.len() + HEADER_LEN, s.len);
                assert!(s.offset + s.len <= buf_len, "whole frame inside the buffer");
            }
            seen_here.push(Reported {
                tag: s.tag,
                offset: base + s.offset,
                len: s.len,
                body: s.body.map(<[u8]>::to_vec),
            });
            if stop_at_x && s.tag == b'X' {
                stop = true;
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        out.frames.extend(seen_here);
        match r {
            Ok(n) => {
                assert!(n <= pending.len(), "walked more than given");
                if let Some(last) = out.frames.last() {
                    if !stop {
                        assert!(base + n >= last.offset + HEADER_LEN.min(last.len));
                    }
                }
                if w.wanted() > 0 {
                    // A wanted frame is incomplete right at the walked end.
                    assert!(pending.len() - n < w.wanted());
                    let h = frame::parse_header(&pending[n..], max_len);
                    assert!(matches!(h, Ok(Some(h)) if h.frame_len() == w.wanted()));
                }
                if stop {
                    // Stopped at a frame: walked to its end, or as far as
                    // its bytes go. Record the frame's nominal end so that
                    // whole and chunked walks compare.
                    let last = out.frames.last().expect("stopped at a frame");
                    let end = last.offset + last.len;
                    assert_eq!(base + n, end.min(base + pending.len()));
                    out.walked = end;
                    out.stopped = true;
                    return out;
                }
                pending.drain(..n);
                base += n;
                out.walked = base;
            }
            Err(_) => {
                // How far an erroring walk got is not reported: compare
                // the frames seen and the failure only.
                out.walked = 0;
                out.failed = true;
                return out;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// scram
// ---------------------------------------------------------------------------

/// The fixed secret the server side checks against.
const SCRAM_PASSWORD: &str = "pencil";
const SCRAM_SALT: &[u8] = b"fuzz-salt-16byte";
const SCRAM_ITERATIONS: u32 = 2;
/// The client nonce of the client side; the server nonce of the server side.
pub const CLIENT_NONCE: &str = "CLI";
pub const SERVER_NONCE: &str = "SRV";

/// Splits the SCRAM input into its two messages at the first 0xff (never
/// valid in UTF-8, so never part of a meaningful message).
fn two_messages(data: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(0xff, data) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// SCRAM parsing. Byte 0: `0` server side (client-first, 0xff,
/// client-final), `1` client side (server-first, 0xff, server-final),
/// `2` a `pg_authid` secret.
///
/// Invariants, server: an accepted client-first gets a server-first
/// carrying our salt, iterations and the client nonce extended by ours; an
/// accepted client-final yields the true ClientKey (only a right proof
/// passes); after a failure nothing more is accepted; a real client with
/// the same nonce (when valid) completes the exchange. Client: the
/// password and ClientKey credentials answer identically; an accepted
/// server-first's nonce extends ours; a server-first identical to what our
/// server sends completes an exchange with it; a server-final is accepted
/// only with the true signature. Secret: accepted ⇒ encode/parse round trip.
pub fn scram(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let salted = scram::salted_password(SCRAM_PASSWORD, SCRAM_SALT, SCRAM_ITERATIONS);
    let secret = ScramSecret::from_salted_password(&salted, SCRAM_SALT, SCRAM_ITERATIONS);
    let client_key = scram::client_key_of(&salted);
    match mode % 3 {
        0 => scram_server(rest, &secret, client_key),
        1 => scram_client(rest, &secret, &salted, client_key),
        _ => {
            if let Ok(s) = std::str::from_utf8(rest) {
                if let Ok(parsed) = ScramSecret::parse(s) {
                    assert!(parsed.iterations > 0 && !parsed.salt.is_empty());
                    let again = ScramSecret::parse(&parsed.encode());
                    assert!(matches!(again, Ok(a) if a == parsed), "secret round trip");
                }
            }
        }
    }
}

fn scram_server(rest: &[u8], secret: &ScramSecret, client_key: [u8; 32]) {
    let (first, fin) = two_messages(rest);
    let mut s = ScramServer::with_nonce(secret.clone(), SERVER_NONCE);
    match s.handle_client_first(first) {
        Err(_) => {
            assert!(s.handle_client_first(first).is_err(), "failed is final");
            assert!(s.handle_client_final(fin).is_err(), "failed is final");
        }
        Ok(sf) => {
            let text = std::str::from_utf8(first).expect("accepted ⇒ UTF-8");
            assert!(text.starts_with("n,,") || text.starts_with("y,,"));
            let (salt, iterations) =
                ScramClient::salt_and_iterations(&sf).expect("our server-first parses");
            assert_eq!((&salt[..], iterations), (SCRAM_SALT, SCRAM_ITERATIONS));
            let sf = std::str::from_utf8(&sf).expect("server-first is UTF-8");
            let nonce = sf
                .strip_prefix("r=")
                .and_then(|r| r.split(',').next())
                .expect("server-first starts with the nonce");
            assert!(nonce.ends_with(SERVER_NONCE));
            let client_nonce = &nonce[..nonce.len() - SERVER_NONCE.len()];
            assert!(text.contains(&format!(",r={client_nonce}")));
            match s.handle_client_final(fin) {
                Ok((server_final, key)) => {
                    assert_eq!(key, client_key, "only the true ClientKey passes");
                    assert!(server_final.starts_with(b"v="));
                }
                Err(WireError::AuthFailed) => {}
                Err(e) => assert!(matches!(e, WireError::Scram(_)), "{e:?}"),
            }
            assert!(s.handle_client_final(fin).is_err(), "one final only");
        }
    }

    // A real client whose nonce is the fuzzed text logs in when that nonce is valid.
    if let Ok(nonce) = std::str::from_utf8(first) {
        let mut c =
            ScramClient::from_client_key_with_nonce(client_key, Some(secret.server_key), nonce);
        let mut s = ScramServer::with_nonce(secret.clone(), SERVER_NONCE);
        if scram::valid_nonce(nonce) {
            let sf = s
                .handle_client_first(&c.client_first())
                .expect("a valid nonce is accepted");
            let cf = c.handle_server_first(&sf).expect("our server-first");
            let (fin, key) = s.handle_client_final(&cf).expect("our client-final");
            assert_eq!(key, client_key);
            c.verify_server_final(&fin).expect("our server-final");
        }
    }
}

fn scram_client(rest: &[u8], secret: &ScramSecret, salted: &[u8; 32], client_key: [u8; 32]) {
    let (first, fin) = two_messages(rest);
    let mut by_key =
        ScramClient::from_client_key_with_nonce(client_key, Some(secret.server_key), CLIENT_NONCE);
    // The password is never derived (that would take the fuzzed iteration
    // count): the cached salted password stands in for it.
    let mut by_password = ScramClient::with_nonce("unused", CLIENT_NONCE);
    by_password.set_salted_password(*salted);
    let a = by_key.handle_server_first(first);
    let b = by_password.handle_server_first(first);
    assert_eq!(a.as_ref().ok(), b.as_ref().ok(), "credentials answer alike");
    assert!(
        ScramClient::salt_and_iterations(first).is_ok() || a.is_err(),
        "accepted server-first parses"
    );
    let Ok(cf) = a else {
        assert!(b.is_err());
        assert!(by_key.verify_server_final(fin).is_err(), "out of order");
        return;
    };
    let server_first = std::str::from_utf8(first).expect("accepted ⇒ UTF-8");
    let nonce = &server_first[2..server_first.find(',').unwrap_or(server_first.len())];
    assert!(nonce.starts_with(CLIENT_NONCE) && nonce.len() > CLIENT_NONCE.len());
    let cf_text = std::str::from_utf8(&cf).expect("client-final is UTF-8");
    let (without_proof, proof) = cf_text.rsplit_once(",p=").expect("proof last");
    assert_eq!(without_proof, format!("c=biws,r={nonce}"));
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(proof)
            .map(|p| p.len())
            .ok(),
        Some(32)
    );

    // The signature a server holding the secret would send.
    let auth_message = format!("n=,r={CLIENT_NONCE},{server_first},{without_proof}");
    let expected = scram::hmac(&secret.server_key, auth_message.as_bytes());
    match by_key.verify_server_final(fin) {
        Ok(()) => {
            let v = std::str::from_utf8(fin)
                .ok()
                .and_then(|t| t.split(',').next())
                .and_then(|f| f.strip_prefix("v="))
                .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok());
            assert_eq!(v.as_deref(), Some(&expected[..]), "only the true signature");
        }
        Err(WireError::AuthFailed) => assert!(fin.starts_with(b"e=invalid-proof")),
        Err(_) => {}
    }
    assert_eq!(
        by_password.verify_server_final(fin).is_ok(),
        by_key.verify_server_final(fin).is_ok()
    );

    // If this is exactly what our server would say, the exchange completes.
    let mut server = ScramServer::with_nonce(secret.clone(), &nonce[CLIENT_NONCE.len()..]);
    let c = ScramClient::from_client_key_with_nonce(client_key, None, CLIENT_NONCE);
    if server
        .handle_client_first(&c.client_first())
        .ok()
        .as_deref()
        == Some(first)
    {
        let (server_final, key) = server
            .handle_client_final(&cf)
            .expect("our server accepts the client's answer");
        assert_eq!(key, client_key);
        by_key
            .verify_server_final(&server_final)
            .expect("our client accepts our server's signature");
    }
}

// ---------------------------------------------------------------------------
// rewrite (message names)
// ---------------------------------------------------------------------------

/// Decodes the body of a Parse / Bind / Describe / Close (byte 0 picks
/// which), re-encodes it and decodes again.
///
/// Invariants: Parse, Describe and Close re-encode to the very same body
/// (their layout is canonical); a Bind whose statement name is replaced, as
/// the prepared-statement rewriter does, decodes to the new name with the
/// portal and the rest of the body unchanged; an encoded Bind with the
/// decoded names decodes to them.
pub fn rewrite_names(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    match pick % 4 {
        0 => {
            if let Ok(p) = frontend::decode_parse(body) {
                let mut out = BytesMut::new();
                frontend::encode_parse(p.name, p.query, &p.param_types, &mut out);
                let (tag, re) = frame_body(&out);
                assert_eq!(tag, frontend::PARSE_TAG);
                assert_eq!(re, body, "Parse re-encodes to the same body");
                assert_eq!(frontend::decode_parse(re).ok(), Some(p));
            }
        }
        1 => {
            if let Ok((portal, stmt)) = frontend::bind_names(body) {
                assert!(!portal.contains(&0) && !stmt.contains(&0));
                let tail = &body[portal.len() + stmt.len() + 2..];
                for new_name in [&b"sv_0"[..], b"", stmt, b"a_much_longer_statement_name_42"] {
                    let mut re = Vec::new();
                    re.extend_from_slice(portal);
                    re.push(0);
                    re.extend_from_slice(new_name);
                    re.push(0);
                    re.extend_from_slice(tail);
                    let got = frontend::bind_names(&re).expect("rewritten Bind decodes");
                    assert_eq!(got, (portal, new_name));
                    assert_eq!(&re[portal.len() + new_name.len() + 2..], tail);
                }
                let mut out = BytesMut::new();
                frontend::encode_bind(portal, stmt, &[], &[], &[], &mut out)
                    .expect("names without NUL encode");
                let (tag, re) = frame_body(&out);
                assert_eq!(tag, frontend::BIND_TAG);
                assert_eq!(frontend::bind_names(re).ok(), Some((portal, stmt)));
            }
        }
        n => {
            let (decode, encode, tag): (TargetDecoder, TargetEncoder, u8) = if n == 2 {
                (
                    frontend::describe_target,
                    frontend::encode_describe,
                    frontend::DESCRIBE_TAG,
                )
            } else {
                (
                    frontend::close_target,
                    frontend::encode_close,
                    frontend::CLOSE_TAG,
                )
            };
            if let Ok((kind, name)) = decode(body) {
                assert!(kind == b'S' || kind == b'P');
                let mut out = BytesMut::new();
                encode(kind, name, &mut out);
                let (t, re) = frame_body(&out);
                assert_eq!(t, tag);
                assert_eq!(re, body, "re-encodes to the same body");
                assert_eq!(decode(re).ok(), Some((kind, name)));
            }
        }
    }
}

type TargetDecoder = fn(&[u8]) -> crate::Result<(u8, &[u8])>;
type TargetEncoder = fn(u8, &[u8], &mut BytesMut);

/// (tag, body) of one encoded frame, checking its length field.
fn frame_body(frame: &[u8]) -> (u8, &[u8]) {
    let h = frame::parse_header(frame, frame::MAX_FRAME_LEN)
        .expect("encoders write valid headers")
        .expect("a whole header");
    assert_eq!(h.frame_len(), frame.len(), "length field covers the frame");
    (h.tag, &frame[HEADER_LEN..])
}

/// A frame from a tag and a body, for seeds and tests.
pub fn make_frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + HEADER_LEN);
    v.put_u8(tag);
    v.put_i32((body.len() + 4) as i32);
    v.extend_from_slice(body);
    v
}

// ---------------------------------------------------------------------------
// websocket
// ---------------------------------------------------------------------------

/// The WebSocket [`Deframer`](crate::websocket::Deframer) over a client's
/// byte stream fed whole and fed in chunks, and the upgrade request parser.
/// Byte 0 bounds the chunk size (1..=byte0+1), byte 1 the largest data
/// frame accepted (2^(byte1 % 32)); the rest is the stream (also parsed as
/// an upgrade request head).
///
/// Invariants: nothing panics; each call gives out no more bytes than it
/// was fed; whole and chunked give the same bytes, the same last ping, the
/// same close and the same error (an error is final); a parsed upgrade has a
/// key of 16 bytes and a path target.
pub fn websocket(data: &[u8]) {
    use crate::websocket::handshake::parse_request;
    use crate::websocket::Deframer;
    let [chunk, max, stream @ ..] = data else {
        return;
    };
    let chunk = *chunk as usize + 1;
    let max = 1u64 << (max % 32);
    let run = |size: usize| {
        let mut d = Deframer::new(max);
        let mut out = Vec::new();
        let mut err = None;
        let mut pings = Vec::new();
        for piece in stream.chunks(size) {
            let mut buf = piece.to_vec();
            match d.feed(&mut buf) {
                Ok(n) => {
                    assert!(n <= piece.len(), "more out than in");
                    out.extend_from_slice(&buf[..n]);
                }
                Err(e) => {
                    assert_eq!(d.feed(&mut [0u8; 3]), Err(e), "an error is final");
                    err = Some(e);
                    break;
                }
            }
            if let Some(p) = d.take_ping() {
                pings.push(p.as_bytes().to_vec());
            }
        }
        (out, err, pings.pop(), d.peer_closed())
    };
    let whole = run(stream.len().max(1));
    let chunked = run(chunk);
    assert_eq!(whole.1, chunked.1, "same error");
    if whole.1.is_none() {
        assert_eq!(whole.0, chunked.0, "same bytes");
        assert_eq!(whole.3, chunked.3, "same close");
        if chunked.2.is_some() {
            // Chunked feeding sees every ping; whole feeding keeps the last.
            assert_eq!(whole.2, chunked.2, "same last ping");
        }
    } else {
        assert!(chunked.0.starts_with(&whole.0) || whole.0.starts_with(&chunked.0));
    }
    if let Ok(u) = parse_request(stream) {
        assert!(u.target.starts_with('/'));
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(u.key)
                .map(|k| k.len()),
            Ok(16)
        );
        let _ = u.query("address");
        let _ = u.path();
    }
}
