//! A TLS session over buffers of our own (rustls' unbuffered API), for
//! client and server connections alike. No I/O here: `crate::stream` moves
//! the bytes.
//!
//! rustls' buffered `Connection` keeps a deframer buffer of at least 4 KiB
//! after every read, with no way to give it back short of the end of the
//! stream. Here the encrypted input, the decrypted plaintext and the
//! encrypted output live in three vectors of ours, freed as soon as they
//! hold nothing (reads go to a per-thread scratch buffer unless a record is
//! incomplete): an idle TLS client keeps only rustls' keys and state.
//!
//! The unbuffered server connection does not say which name the client
//! asked for (SNI), so the configuration's certificate resolver is wrapped
//! (`capture_sni`): rustls calls it during `process_tls_records` on this
//! thread, and it leaves the name in a thread-local slot that the session
//! takes right after the call.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::{ClientConfig, ServerConfig};

/// Room made for each socket read of encrypted bytes: a whole record and
/// its header fit.
pub const READ_CHUNK: usize = 16 * 1024 + 512;

thread_local! {
    /// The SNI name the last ClientHello resolved on this thread carried.
    static SNI: RefCell<Option<Box<str>>> = const { RefCell::new(None) };
}

/// A certificate resolver that notes the client's SNI name for the session
/// being processed on this thread, then asks the one it wraps.
#[derive(Debug)]
struct SniCapture(Arc<dyn ResolvesServerCert>);

impl ResolvesServerCert for SniCapture {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        SNI.with(|s| *s.borrow_mut() = hello.server_name().map(Box::from));
        self.0.resolve(hello)
    }

    fn only_raw_public_keys(&self) -> bool {
        self.0.only_raw_public_keys()
    }
}

/// Makes the sessions of `cfg` know their client's SNI name
/// (`TlsSession::sni`). Call once on a configuration before it is used.
pub fn capture_sni(cfg: &mut ServerConfig) {
    cfg.cert_resolver = Arc::new(SniCapture(cfg.cert_resolver.clone()));
}

enum Conn {
    Server(UnbufferedServerConnection),
    Client(UnbufferedClientConnection),
}

/// A TLS error from rustls or from the peer's records.
#[derive(Debug)]
pub struct TlsError(String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS: {}", self.0)
    }
}

impl std::error::Error for TlsError {}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError(e.to_string())
    }
}

impl From<TlsError> for std::io::Error {
    fn from(e: TlsError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// Where one turn of rustls' state machine left the session.
enum Step {
    /// Call again.
    Again,
    /// Nothing to do until more encrypted bytes arrive.
    Idle,
    /// Application data was encrypted (or there was none to encrypt).
    Wrote,
    /// Both sides have closed.
    Closed,
}

/// What to do when rustls lets us write application data.
enum Want<'a> {
    Nothing,
    Encrypt(&'a [u8]),
    CloseNotify,
}

pub struct TlsSession {
    conn: Conn,
    /// Encrypted bytes of a record not yet whole: `inc[..inc_len]`. Reads
    /// go to the thread's scratch buffer while there is none
    /// (`with_scratch`, `received_in`).
    inc: Vec<u8>,
    inc_len: usize,
    /// Plaintext received and not yet read: `plain[plain_pos..]`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Encrypted bytes to send: `out[sent..out_len]`.
    out: Vec<u8>,
    out_len: usize,
    sent: usize,
    /// The peer sent close_notify.
    peer_closed: bool,
    sni: Option<Box<str>>,
    /// Plaintext taken by the last `poll_write` that returned Pending while
    /// its records were still being sent: the retried write reports it
    /// (`crate::stream`).
    pub(crate) owed: usize,
    /// The peer closed the socket (`crate::stream`).
    pub(crate) eof: bool,
    /// rustls reported an error: the session is not run again (rustls'
    /// handshake deframer may still point into input that was dropped).
    failed: bool,
}

/// Encrypted input a session holds at most while a record or handshake
/// message is incomplete.
const MAX_PARTIAL: usize = 96 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Lends the thread's read buffer (`READ_CHUNK` bytes) for a socket read of
/// a session that holds no partial record; give what it brought to
/// `TlsSession::received_in` inside `f`.
pub fn with_scratch<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < READ_CHUNK {
            s.resize(READ_CHUNK, 0);
        }
        f(&mut s[..])
    })
}

impl TlsSession {
    pub fn server(cfg: Arc<ServerConfig>) -> Result<Self, TlsError> {
        Ok(Self::new(Conn::Server(UnbufferedServerConnection::new(
            cfg,
        )?)))
    }

    /// A client session; its ClientHello is ready to send at once.
    pub fn client(
        cfg: Arc<ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> Result<Self, TlsError> {
        let mut s = Self::new(Conn::Client(UnbufferedClientConnection::new(cfg, name)?));
        s.run(Want::Nothing)?;
        Ok(s)
    }

    fn new(conn: Conn) -> Self {
        TlsSession {
            conn,
            inc: Vec::new(),
            inc_len: 0,
            plain: Vec::new(),
            plain_pos: 0,
            out: Vec::new(),
            out_len: 0,
            sent: 0,
            peer_closed: false,
            sni: None,
            owed: 0,
            eof: false,
            failed: false,
        }
    }

    pub fn is_handshaking(&self) -> bool {
        match &self.conn {
            Conn::Server(c) => c.is_handshaking(),
            Conn::Client(c) => c.is_handshaking(),
        }
    }

    /// The SNI name the client sent (a server session whose configuration
    /// went through `capture_sni`).
    pub fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// A partial record waits for the rest of its bytes: the next read
    /// goes to `read_space`, else to the thread's scratch buffer.
    pub fn has_partial_input(&self) -> bool {
        self.inc_len > 0
    }

    /// Room after the partial record for the next socket read; report what
    /// it brought with `received`.
    pub fn read_space(&mut self) -> &mut [u8] {
        if self.inc.len() < self.inc_len + READ_CHUNK {
            self.inc.resize(self.inc_len + READ_CHUNK, 0);
        }
        &mut self.inc[self.inc_len..]
    }

    /// `n` bytes were read into `read_space`: processes them.
    pub fn received(&mut self, n: usize) -> Result<(), TlsError> {
        self.inc_len += n;
        self.run(Want::Nothing)?;
        if self.inc_len > MAX_PARTIAL {
            return Err(TlsError("record or handshake message too long".into()));
        }
        Ok(())
    }

    /// Processes bytes read into the scratch buffer (`with_scratch`) while
    /// no partial record was held; what is left of an incomplete record is
    /// kept.
    pub fn received_in(&mut self, data: &mut [u8]) -> Result<(), TlsError> {
        debug_assert_eq!(self.inc_len, 0);
        let (used, r) = self.run_on(data, Want::Nothing);
        if used < data.len() && r.is_ok() {
            self.inc.clear();
            self.inc.extend_from_slice(&data[used..]);
            self.inc_len = self.inc.len();
        }
        r
    }

    /// Encrypted bytes that arrived some other way (a socket's read-ahead
    /// before a handoff, tests).
    pub fn feed(&mut self, data: &[u8]) -> Result<(), TlsError> {
        if data.is_empty() {
            return Ok(());
        }
        self.inc.truncate(self.inc_len);
        self.inc.extend_from_slice(data);
        let n = self.inc.len() - self.inc_len;
        self.received(n)
    }

    /// Plaintext waiting to be read.
    pub fn plaintext(&self) -> &[u8] {
        &self.plain[self.plain_pos..]
    }

    /// Copies waiting plaintext into `buf`; the buffer is given back once
    /// all of it has been read.
    pub fn read_plain(&mut self, buf: &mut [u8]) -> usize {
        let n = self.plaintext().len().min(buf.len());
        buf[..n].copy_from_slice(&self.plain[self.plain_pos..self.plain_pos + n]);
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        n
    }

    /// The peer sent close_notify and all its plaintext has been read.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed && self.plaintext().is_empty()
    }

    /// Encrypted bytes waiting to be sent.
    pub fn pending(&self) -> &[u8] {
        &self.out[self.sent..self.out_len]
    }

    /// `n` bytes of `pending` went out; the buffer is given back once all
    /// of it has.
    pub fn sent(&mut self, n: usize) {
        self.sent += n;
        if self.sent >= self.out_len {
            self.out = Vec::new();
            self.sent = 0;
            self.out_len = 0;
        }
    }

    /// The session holds no buffer (nothing received, unread or unsent).
    pub fn holds_nothing(&self) -> bool {
        self.inc.capacity() + self.plain.capacity() + self.out.capacity() == 0
    }

    /// Encrypts `data` into the pending output. The handshake must be over.
    pub fn encrypt(&mut self, data: &[u8]) -> Result<(), TlsError> {
        if data.is_empty() {
            return Ok(());
        }
        self.run(Want::Encrypt(data))
    }

    /// Queues close_notify in the pending output.
    pub fn close_notify(&mut self) -> Result<(), TlsError> {
        self.run(Want::CloseNotify)
    }

    /// Runs rustls over the partial input held: handshake messages are
    /// answered (into the pending output), application data lands in
    /// `plaintext`; then does what `want` asks.
    fn run(&mut self, want: Want<'_>) -> Result<(), TlsError> {
        let mut inc = std::mem::take(&mut self.inc);
        let len = self.inc_len;
        let (used, r) = self.run_on(&mut inc[..len], want);
        if used >= len {
            inc = Vec::new();
            self.inc_len = 0;
        } else {
            inc.copy_within(used..len, 0);
            self.inc_len = len - used;
        }
        self.inc = inc;
        r
    }

    /// Runs rustls over `input`; returns how many of its bytes were
    /// consumed.
    fn run_on(&mut self, input: &mut [u8], mut want: Want<'_>) -> (usize, Result<(), TlsError>) {
        if self.failed {
            return (0, Err(TlsError("the session failed earlier".into())));
        }
        let mut start = 0;
        loop {
            let capture = self.sni.is_none() && self.is_handshaking();
            if capture {
                SNI.with(|s| s.borrow_mut().take());
            }
            let (discard, step) = self.turn(&mut input[start..], &mut want);
            start += discard;
            if capture {
                if let Some(name) = SNI.with(|s| s.borrow_mut().take()) {
                    self.sni = Some(name);
                }
            }
            let r = match step {
                Ok(Step::Again) => continue,
                Ok(Step::Idle) | Ok(Step::Closed) => match want {
                    Want::Nothing => Ok(()),
                    _ if self.is_handshaking() => {
                        Err(TlsError("write before the handshake is over".into()))
                    }
                    _ => Err(TlsError("the session is closed".into())),
                },
                Ok(Step::Wrote) => Ok(()),
                Err(e) => {
                    self.harvest_alert(&mut input[start..]);
                    self.failed = true;
                    Err(e)
                }
            };
            return (start, r);
        }
    }

    /// One turn of rustls' state machine over `input`: the bytes to
    /// discard from its front and where it left the session. A panic in
    /// rustls (a bug meeting hostile input) is a TLS error of this session,
    /// not the end of the shard.
    fn turn(&mut self, input: &mut [u8], want: &mut Want<'_>) -> (usize, Result<Step, TlsError>) {
        if self.failed {
            return (0, Err(TlsError("the session failed earlier".into())));
        }
        let Self {
            conn,
            plain,
            out,
            out_len,
            peer_closed,
            ..
        } = self;
        let mut sink = Sink {
            plain,
            out,
            out_len,
            peer_closed,
        };
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match conn {
            Conn::Server(c) => sink.step(c.process_tls_records(input), want),
            Conn::Client(c) => sink.step(c.process_tls_records(input), want),
        }));
        turn.unwrap_or_else(|_| {
            self.failed = true;
            (0, Err(TlsError("rustls failed on this input".into())))
        })
    }

    /// After an error, the alert rustls queued goes to the pending output
    /// (best effort: the caller sends it if the socket takes it). Only
    /// queued records are taken: rustls is not made to read `input` (what
    /// is left of the input that failed) again, which would fail again.
    fn harvest_alert(&mut self, input: &mut [u8]) {
        let mut start = 0;
        for _ in 0..4 {
            let queued = match &self.conn {
                Conn::Server(c) => c.wants_write(),
                Conn::Client(c) => c.wants_write(),
            };
            if !queued {
                return;
            }
            let (discard, step) = self.turn(&mut input[start..], &mut Want::Nothing);
            start += discard;
            if !matches!(step, Ok(Step::Again)) {
                return;
            }
        }
    }
}

/// The buffers one turn of the state machine writes to.
struct Sink<'a> {
    plain: &'a mut Vec<u8>,
    out: &'a mut Vec<u8>,
    out_len: &'a mut usize,
    peer_closed: &'a mut bool,
}

impl Sink<'_> {
    /// Room for at least `n` more output bytes.
    fn out_room(&mut self, n: usize) -> &mut [u8] {
        if self.out.len() < *self.out_len + n {
            self.out.resize(*self.out_len + n, 0);
        }
        &mut self.out[*self.out_len..]
    }

    fn step<Data>(
        &mut self,
        status: UnbufferedStatus<'_, '_, Data>,
        want: &mut Want<'_>,
    ) -> (usize, Result<Step, TlsError>) {
        let UnbufferedStatus { mut discard, state } = status;
        let step = match state {
            Err(e) => Err(TlsError::from(e)),
            Ok(ConnectionState::ReadTraffic(mut r)) => loop {
                match r.next_record() {
                    None => break Ok(Step::Again),
                    Some(Ok(rec)) => {
                        discard += rec.discard;
                        self.plain.extend_from_slice(rec.payload);
                    }
                    Some(Err(e)) => break Err(e.into()),
                }
            },
            Ok(ConnectionState::EncodeTlsData(mut e)) => {
                let mut room = 1024;
                loop {
                    match e.encode(self.out_room(room)) {
                        Ok(n) => {
                            *self.out_len += n;
                            break Ok(Step::Again);
                        }
                        Err(EncodeError::InsufficientSize(InsufficientSizeError {
                            required_size,
                        })) => room = required_size,
                        Err(e) => break Err(TlsError(e.to_string())),
                    }
                }
            }
            // The records are in `out`, sent in order before anything
            // encrypted later.
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                Ok(Step::Again)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::Idle),
            Ok(ConnectionState::PeerClosed) => {
                *self.peer_closed = true;
                Ok(Step::Again)
            }
            Ok(ConnectionState::Closed) => Ok(Step::Closed),
            Ok(ConnectionState::WriteTraffic(mut w)) => {
                match std::mem::replace(want, Want::Nothing) {
                    Want::Nothing => Ok(Step::Idle),
                    Want::Encrypt(data) => {
                        // Each record adds a header, a tag and (TLS 1.3) a type byte.
                        let mut room = data.len() + (data.len() / 16384 + 1) * 64;
                        loop {
                            match w.encrypt(data, self.out_room(room)) {
                                Ok(n) => {
                                    *self.out_len += n;
                                    break Ok(Step::Wrote);
                                }
                                Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                    required_size,
                                })) => room = required_size,
                                Err(e) => break Err(TlsError(e.to_string())),
                            }
                        }
                    }
                    Want::CloseNotify => match w.queue_close_notify(self.out_room(64)) {
                        Ok(n) => {
                            *self.out_len += n;
                            Ok(Step::Wrote)
                        }
                        Err(e) => Err(TlsError(e.to_string())),
                    },
                }
            }
            // Early data is never enabled in our configurations.
            Ok(ConnectionState::ReadEarlyData(_)) => {
                Err(TlsError("early data is not accepted".into()))
            }
            Ok(other) => Err(TlsError(format!("unexpected TLS state {other:?}"))),
        };
        (discard, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        configs_for(rustls::DEFAULT_VERSIONS)
    }

    /// A server and a client that trusts its certificate, the client
    /// limited to `versions`.
    fn configs_for(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec!["db.example.com".into()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
        let prov = Arc::new(rustls::crypto::ring::default_provider());
        let mut scfg = ServerConfig::builder_with_provider(prov.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        capture_sni(&mut scfg);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let ccfg = ClientConfig::builder_with_provider(prov)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(scfg), Arc::new(ccfg))
    }

    /// Moves what `from` has to send into `to`, `chunk` bytes at a time.
    fn pump(from: &mut TlsSession, to: &mut TlsSession, chunk: usize) -> bool {
        let data = from.pending().to_vec();
        from.sent(data.len());
        for piece in data.chunks(chunk) {
            to.feed(piece).unwrap();
        }
        !data.is_empty()
    }

    fn pair(chunk: usize) -> (TlsSession, TlsSession) {
        let (scfg, ccfg) = configs();
        let mut s = TlsSession::server(scfg).unwrap();
        let name = rustls::pki_types::ServerName::try_from("db.example.com").unwrap();
        let mut c = TlsSession::client(ccfg, name).unwrap();
        while pump(&mut c, &mut s, chunk) | pump(&mut s, &mut c, chunk) {}
        assert!(!s.is_handshaking() && !c.is_handshaking());
        (s, c)
    }

    #[test]
    fn handshake_data_both_ways_and_sni() {
        for chunk in [1, 7, 100, 1 << 20] {
            let (mut s, mut c) = pair(chunk);
            assert_eq!(s.sni(), Some("db.example.com"));
            let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
            c.encrypt(&big).unwrap();
            c.encrypt(b"tail").unwrap();
            pump(&mut c, &mut s, chunk);
            let mut got = Vec::new();
            let mut buf = [0u8; 333];
            loop {
                let n = s.read_plain(&mut buf);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got.len(), big.len() + 4);
            assert_eq!(&got[..big.len()], &big[..]);
            s.encrypt(b"reply").unwrap();
            pump(&mut s, &mut c, chunk);
            assert_eq!(c.plaintext(), b"reply");
        }
    }

    #[test]
    fn a_drained_session_holds_no_buffer() {
        let (mut s, mut c) = pair(1 << 20);
        assert!(s.holds_nothing() && c.holds_nothing());
        c.encrypt(b"select 1").unwrap();
        pump(&mut c, &mut s, 5);
        let mut buf = [0u8; 64];
        assert_eq!(s.read_plain(&mut buf), 8);
        assert!(s.holds_nothing() && c.holds_nothing());
        // A partial record is kept until the rest comes, through the
        // scratch buffer as a socket read brings it.
        c.encrypt(b"select 2").unwrap();
        let rec = c.pending().to_vec();
        c.sent(rec.len());
        with_scratch(|buf| {
            buf[..3].copy_from_slice(&rec[..3]);
            s.received_in(&mut buf[..3]).unwrap();
        });
        assert!(s.has_partial_input());
        let room = s.read_space();
        room[..rec.len() - 3].copy_from_slice(&rec[3..]);
        s.received(rec.len() - 3).unwrap();
        assert!(!s.has_partial_input());
        assert_eq!(s.plaintext(), b"select 2");
        assert_eq!(s.read_plain(&mut buf), 8);
        assert!(s.holds_nothing());
    }

    #[test]
    fn records_read_through_the_scratch_buffer() {
        let (mut s, mut c) = pair(1 << 20);
        let big: Vec<u8> = (0..50_000u32).map(|i| (i * 7) as u8).collect();
        c.encrypt(&big).unwrap();
        let wire = c.pending().to_vec();
        c.sent(wire.len());
        // The socket hands over 1,000 bytes at a time.
        for piece in wire.chunks(1000) {
            if s.has_partial_input() {
                let room = s.read_space();
                room[..piece.len()].copy_from_slice(piece);
                s.received(piece.len()).unwrap();
            } else {
                with_scratch(|buf| {
                    buf[..piece.len()].copy_from_slice(piece);
                    s.received_in(&mut buf[..piece.len()]).unwrap();
                });
            }
        }
        assert_eq!(s.plaintext(), &big[..]);
    }

    #[test]
    fn close_notify_and_garbage() {
        let (mut s, mut c) = pair(1 << 20);
        c.close_notify().unwrap();
        pump(&mut c, &mut s, 1 << 20);
        assert!(s.peer_closed());
        let (mut s, _) = pair(1 << 20);
        let err = s.feed(&[23, 3, 3, 0, 5, 1, 2, 3, 4, 5]).unwrap_err();
        assert!(err.to_string().contains("TLS"), "{err}");
        // The alert for the peer waits to be sent.
        assert!(!s.pending().is_empty());
        // A failed session refuses everything after, without running rustls.
        assert!(s.close_notify().is_err());
        assert!(s.feed(b"more").is_err());
        assert!(s.encrypt(b"data").is_err());
    }

    /// Garbage after a real ClientHello's first bytes, in pieces of every
    /// size: an error each time, never a panic inside rustls.
    #[test]
    fn garbage_never_reaches_a_rustls_panic() {
        let (scfg, ccfg) = configs();
        let name = rustls::pki_types::ServerName::try_from("db.example.com").unwrap();
        let hello = TlsSession::client(ccfg, name).unwrap().pending().to_vec();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let mut s = TlsSession::server(scfg.clone()).unwrap();
            let keep = (next() as usize) % hello.len();
            let mut data = hello[..keep].to_vec();
            let extra = (next() as usize) % 40_000;
            data.extend((0..extra).map(|_| next() as u8));
            if round % 3 == 0 {
                // Well-formed record headers around random bodies.
                data.extend_from_slice(&[22, 3, 3, 0x10, 0x00]);
                data.extend((0..0x1000).map(|_| next() as u8));
            }
            let piece = 1 + (next() as usize) % 3000;
            for chunk in data.chunks(piece) {
                match s.feed(chunk) {
                    Ok(()) => {}
                    Err(e) => {
                        assert!(
                            !e.to_string().contains("rustls failed"),
                            "round {round}: {e}"
                        );
                        break;
                    }
                }
            }
            let _ = s.close_notify();
        }
    }

    #[test]
    fn tls12_sessions_work_too() {
        let (scfg, ccfg) = configs_for(&[&rustls::version::TLS12]);
        let mut s = TlsSession::server(scfg).unwrap();
        let name = rustls::pki_types::ServerName::try_from("db.example.com").unwrap();
        let mut c = TlsSession::client(ccfg, name).unwrap();
        while pump(&mut c, &mut s, 50) | pump(&mut s, &mut c, 50) {}
        assert!(!s.is_handshaking());
        assert_eq!(s.sni(), Some("db.example.com"));
        c.encrypt(b"over TLS 1.2").unwrap();
        pump(&mut c, &mut s, 3);
        assert_eq!(s.plaintext(), b"over TLS 1.2");
    }

    #[test]
    fn an_endless_handshake_message_is_refused() {
        let (scfg, _) = configs();
        let mut s = TlsSession::server(scfg).unwrap();
        // A ClientHello that says it is 16 MiB long, sent in full records.
        let mut first = vec![22, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
        first.resize(5 + 0x4000, 0);
        let mut more = vec![22, 3, 1, 0x40, 0x00];
        more.resize(5 + 0x4000, 0);
        let mut result = s.feed(&first);
        let mut records = 1;
        while result.is_ok() && records < 100 {
            result = s.feed(&more);
            records += 1;
        }
        assert!(result.is_err(), "still buffering after {records} records");
        assert!(records < 10, "refused only after {records} records");
    }

    #[test]
    fn encrypt_during_handshake_is_an_error() {
        let (scfg, _) = configs();
        let mut s = TlsSession::server(scfg).unwrap();
        assert!(s.encrypt(b"x").is_err());
    }
}
