//! The hot path: bytes spliced between a client and its server connection.
//! Frame headers are walked to know when the server connection is free again;
//! in transaction mode the frames that carry statement names (Parse, Bind,
//! Describe, Close) and small simple queries are decoded and rewritten (see
//! `prepared`), everything else is copied as it came.
//!
//! One future drives all four directions (read client, write server, read
//! server, write client), so neither side can stall the other and no read is
//! ever cancelled half-way.

use glommio::timer::recent_now;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::stream::Stream;
use futures_lite::AsyncRead;
use wire::frame::{parse_header, Flow, Walker, MAX_FRAME_LEN};
use wire::frontend::{self, FUNCTION_CALL_TAG, QUERY_TAG, SYNC_TAG, TERMINATE_TAG};
use wire::WireError;

use crate::buf::IoBuf;
use crate::error::Refusal;
use crate::metrics::{bump, PoolStats};
use crate::prepared::SetValue;
use crate::prepared::{
    copy_in_started, needs_inspection, on_server_frame, set_target, take_synthetics, ClientStmts,
    Expect, Registry, Resets, RewriteError, Rewriter, Verdict, MAX_INSPECT_QUERY,
    MAX_REWRITE_FRAME,
};
use crate::server::ServerConn;
use crate::settings::Settings;
use crate::shard::{ClientCtl, Phase, Signal};

/// Server frames up to this size are reported whole by the walker.
const SMALL_FRAME: usize = 8 * 1024;

/// Stop reading a side while this much of it waits to be written.
const READ_CAP: usize = 256 * 1024;

/// Why [`Relay::poll_step`] returned.
#[derive(Debug)]
pub enum Event {
    /// Client bytes wait and no server connection is held (transaction mode).
    NeedServer,
    /// The transaction is over: the server connection is free.
    Released,
    /// The client closed or sent Terminate; everything before it was forwarded.
    ClientGone,
    ClientError(io::Error),
    ClientProtocol(WireError),
    /// The client's message cannot be served (e.g. too many prepared statements).
    ClientRefused(RewriteError),
    ServerGone(Option<io::Error>),
    ServerProtocol(WireError),
    /// Shutdown asked and the client is between transactions.
    Shutdown,
    /// The client's tenant was removed or terminated, or this node may no
    /// longer serve its pool: leave now, telling the client why.
    Killed(Refusal),
    /// A client timeout passed (idle, or idle in a transaction).
    TimedOut(Refusal),
    /// The park sweep asked, and the client is between transactions with
    /// nothing buffered and nothing owed: it may be parked (`crate::park`).
    Park,
}

/// What the client asked of the server connection it holds.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Query / Sync / FunctionCall sent whose ReadyForQuery has not come.
    pub pending: u32,
    /// Extended-protocol messages sent since the last Sync (or Flush round trips).
    pub ext_open: bool,
    /// When the oldest unanswered request was sent.
    pub started: Option<Instant>,
    /// Replies owed, in order.
    pub expect: VecDeque<Expect>,
    /// The server is in COPY IN and the client has not ended it: Sync and
    /// Flush are ignored by the server meanwhile.
    pub copy_in: bool,
    /// The client reset its session (DISCARD ALL, RESET ALL, DEALLOCATE ALL):
    /// at the next ReadyForQuery the connection's statements and settings
    /// are forgotten.
    pub reset: Resets,
    /// Session mode: a reset has run, the client's startup settings are to
    /// be put back on the connection it holds.
    pub resync: bool,
    /// Session mode: the client sent `RESET ALL` (or `DISCARD ALL`); the
    /// server's command tag confirms that it ran.
    pub reset_asked: bool,
    /// Settings the client reset (`RESET name`, `SET name TO DEFAULT`) that
    /// it gave at startup: at the next ReadyForQuery after the server said
    /// `SET` / `RESET`, they are its startup values again, as on PostgreSQL.
    pub restore: Vec<String>,
    pub restore_ready: bool,
}

impl Tracker {
    /// Nothing asked, owed or to be restored: a fresh tracker would do.
    pub fn is_quiet(&self) -> bool {
        self.pending == 0
            && !self.ext_open
            && self.started.is_none()
            && self.expect.is_empty()
            && !self.copy_in
            && !self.reset.statements
            && !self.reset.settings
            && !self.resync
            && !self.reset_asked
            && self.restore.is_empty()
            && !self.restore_ready
    }

    /// A ReadyForQuery arrived: one request answered.
    fn answered(&mut self, stats: &PoolStats) {
        bump(&stats.queries, 1);
        if let Some(t) = self.started {
            // The wake-up that brought the reply: no clock read per query.
            let now = recent_now();
            stats.query_duration.observe(now - t);
            self.started = Some(now);
        }
        self.pending = self.pending.saturating_sub(1);
        if self.pending == 0 {
            self.started = None;
        }
    }
}

pub struct ClientSide {
    pub stream: Stream,
    /// Bytes read from the client, not yet looked at.
    pub buf: IoBuf,
    /// Bytes for the server, rewritten where needed.
    pub out: IoBuf,
    pub walker: Walker,
    pub terminated: bool,
    /// The client's prepared statement names (transaction mode).
    pub stmts: ClientStmts,
    /// Session settings the client asked for (startup, SET); applied to
    /// each server connection it gets.
    /// Shared with `startup_params` until the client changes a setting.
    pub params: Rc<Settings>,
    /// The settings of its startup message, restored by RESET ALL / DISCARD ALL.
    pub startup_params: Rc<Settings>,
}

impl ClientSide {
    /// `params`: the startup settings (shared with the client's control
    /// block, for the admin console).
    pub fn new(stream: Stream, leftover: &[u8], params: Rc<Settings>) -> Self {
        let mut buf = IoBuf::new();
        if !leftover.is_empty() {
            buf.extend_from_slice(leftover);
        }
        ClientSide {
            stream,
            buf,
            out: IoBuf::new(),
            walker: Walker::default(),
            terminated: false,
            stmts: ClientStmts::default(),
            startup_params: params.clone(),
            params,
        }
    }

    /// Gives the buffers' memory back while idle.
    pub fn release_buffers(&mut self) {
        self.buf.release_if_empty();
        self.out.release_if_empty();
    }

    /// Reads into the client's own buffer, or through the shard's scratch
    /// buffer while it has none (an idle client holds no buffer).
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &RefCell<Vec<u8>>,
    ) -> Poll<io::Result<usize>> {
        if self.buf.is_allocated() {
            return self.buf.poll_read_from(cx, &mut self.stream);
        }
        let mut scratch = scratch.borrow_mut();
        let n = futures_lite::ready!(Pin::new(&mut self.stream).poll_read(cx, &mut scratch[..]))?;
        if n > 0 {
            self.buf.extend_from_slice(&scratch[..n]);
        }
        Poll::Ready(Ok(n))
    }

    /// True when the read buffer may take more: below the cap, or short of
    /// a frame that is needed whole.
    fn wants_more(&self, rewrite: bool) -> bool {
        if self.buf.len() < READ_CAP || self.walker.wanted() > self.buf.len() {
            return true;
        }
        matches!(parse_header(self.buf.bytes(), MAX_FRAME_LEN), Ok(Some(h))
            if self.walker.at_boundary() && wants_whole(rewrite, h.tag, h.frame_len())
                && h.frame_len() > self.buf.len())
    }
}

/// Frames decoded whole before they go on: the ones that carry statement
/// names (transaction mode), and small SQL texts (simple queries and Parse,
/// looked at for session resets and settings).
fn wants_whole(rewrite: bool, tag: u8, len: usize) -> bool {
    match tag {
        // Session mode only looks at the SQL text's first keywords.
        b'P' => {
            len <= if rewrite {
                MAX_REWRITE_FRAME
            } else {
                MAX_INSPECT_QUERY
            }
        }
        b'B' | b'D' | b'C' => rewrite && len <= MAX_REWRITE_FRAME,
        QUERY_TAG => len <= MAX_INSPECT_QUERY,
        _ => false,
    }
}

/// The reply a client message is owed, for a message that goes on as it is.
fn owed_reply(tag: u8) -> Option<Expect> {
    match tag {
        b'P' => Some(Expect::Parse {
            swallow: false,
            stmt: None,
        }),
        b'B' => Some(Expect::Bind),
        b'D' => Some(Expect::Describe),
        b'C' => Some(Expect::Close { swallow: false }),
        b'E' => Some(Expect::Execute),
        SYNC_TAG => Some(Expect::Sync),
        QUERY_TAG => Some(Expect::Query),
        FUNCTION_CALL_TAG => Some(Expect::FunctionCall),
        _ => None,
    }
}

/// What the client side does with its frames.
pub struct Shape<'a> {
    /// Rewrite statement names (transaction mode).
    pub rewrite: bool,
    pub registry: &'a RefCell<Registry>,
}

/// Moves the client's complete frames into `out` for `server`, rewriting
/// named-statement frames and counting the replies owed.
fn process_client(
    client: &mut ClientSide,
    server: &mut ServerConn,
    tracker: &mut Tracker,
    shape: &Shape<'_>,
    stats: &PoolStats,
) -> Result<(), RewriteError> {
    let ClientSide {
        buf,
        out,
        walker,
        terminated,
        stmts,
        ..
    } = client;
    let Tracker {
        pending,
        ext_open,
        started,
        expect,
        copy_in,
        reset,
        reset_asked,
        restore,
        ..
    } = tracker;
    let rewrite = shape.rewrite;
    let bytes = buf.bytes();
    let mut copied = 0usize;
    let mut terminate_at = None;
    let mut failure = None;
    let mut scratch: Vec<u8> = Vec::new();
    let mut dirty: Vec<(String, SetValue)> = Vec::new();
    let whole = |tag: u8, len: usize| wants_whole(rewrite, tag, len);
    let n = walker.walk(bytes, whole, |seen| {
        let tag = seen.tag;
        if tag == TERMINATE_TAG {
            out.extend_from_slice(&bytes[copied..seen.offset]);
            copied = seen.offset;
            terminate_at = Some(seen.offset);
            return Flow::Stop;
        }
        match tag {
            // Ignored by the server during COPY IN: no reply owed.
            SYNC_TAG | b'H' if *copy_in => return Flow::Continue,
            b'c' | b'f' => {
                if *copy_in {
                    *copy_in = false;
                } else {
                    expect.push_back(Expect::CopyEnd);
                }
                return Flow::Continue;
            }
            QUERY_TAG | FUNCTION_CALL_TAG | SYNC_TAG => {
                if *pending == 0 {
                    *started = Some(recent_now());
                }
                *pending += 1;
                if tag == SYNC_TAG {
                    *ext_open = false;
                }
            }
            b'P' | b'B' | b'D' | b'C' | b'E' | b'H' => *ext_open = true,
            _ => {}
        }
        match seen.body {
            // A simple query with nothing for the pooler to do goes on as it
            // came, within the plain copy below.
            Some(body) if tag == QUERY_TAG && !needs_inspection(body) => {
                expect.push_back(Expect::Query);
            }
            // Session mode: the frame goes on as it is. A `RESET ALL` is
            // noted; once the server's command tag says a reset ran, the
            // client's startup settings come back (see walk_server).
            Some(body) if !rewrite => {
                let sql = match tag {
                    b'P' => frontend::decode_parse(body).map(|p| p.query).ok(),
                    _ => Some(body),
                };
                if let Some(sql) = sql.filter(|sql| needs_inspection(sql)) {
                    if Resets::of_sql(sql).settings {
                        *reset_asked = true;
                    } else if let Some(set) = set_target(sql) {
                        dirty.push(set);
                    }
                }
                if let Some(e) = owed_reply(tag) {
                    expect.push_back(e);
                }
            }
            Some(_) => {
                out.extend_from_slice(&bytes[copied..seen.offset]);
                scratch.clear();
                let mut rw = Rewriter {
                    reset,
                    dirty: &mut dirty,
                    client: stmts,
                    registry: shape.registry,
                    server: &mut server.prepared,
                    expect,
                    stats,
                };
                if let Err(e) = rw.frame(
                    tag,
                    &bytes[seen.offset..seen.offset + seen.len],
                    &mut scratch,
                ) {
                    failure = Some(e);
                    return Flow::Stop;
                }
                out.extend_from_slice(&scratch);
                copied = seen.offset + seen.len;
            }
            None => {
                // Streamed as it is; its reply is still owed in order.
                if let Some(e) = owed_reply(tag) {
                    expect.push_back(e);
                }
            }
        }
        Flow::Continue
    })?;
    for (name, value) in dirty {
        // The client's own SET: its value follows it to other connections
        // (for settings PostgreSQL reports, ParameterStatus confirms it).
        let key = FOLLOWED
            .iter()
            .find(|f| f.eq_ignore_ascii_case(&name))
            .map(|f| f.to_string())
            .unwrap_or(name);
        match value {
            SetValue::Value(v) => {
                Rc::make_mut(&mut client.params).insert(&key, &v);
                server.params.insert(key, v);
            }
            SetValue::Default => {
                // Back to the startup value when the client gave one (put
                // back on the connection at the next ReadyForQuery), else to
                // the connection's default.
                match client.startup_params.get(&key) {
                    Some(v) => {
                        Rc::make_mut(&mut client.params).insert(&key, v);
                        restore.push(key.clone());
                    }
                    None => {
                        if client.params.contains_key(&key) {
                            Rc::make_mut(&mut client.params).remove(&key);
                        }
                    }
                }
                match server.defaults.get(&key) {
                    Some(d) => server.params.insert(key, d.clone()),
                    None => server.params.insert(key, DIRTY.to_string()),
                };
            }
            SetValue::Unknown => {
                if key == "default_transaction_isolation" {
                    // SET SESSION CHARACTERISTICS AS TRANSACTION ...
                    for k in [
                        "default_transaction_read_only",
                        "default_transaction_deferrable",
                    ] {
                        server.params.insert(k.to_string(), DIRTY.to_string());
                    }
                }
                server.params.insert(key, DIRTY.to_string());
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    match terminate_at {
        Some(_) => {
            *terminated = true;
            buf.clear();
        }
        None => {
            out.extend_from_slice(&bytes[copied..n]);
            buf.consume(n);
        }
    }
    Ok(())
}

/// Sends replies the pooler owes at the head of the queue, when the server
/// stream is at a frame boundary.
fn emit_synthetics(server: &mut ServerConn, expect: &mut VecDeque<Expect>) {
    if !matches!(expect.front(), Some(Expect::Synthetic(_))) || !server.walker.at_boundary() {
        return;
    }
    let mut bytes = Vec::new();
    take_synthetics(expect, &mut bytes);
    server.buf.insert(server.walked, &bytes);
    server.walked += bytes.len();
}

/// Settings PostgreSQL reports (ParameterStatus) that a client may change
/// with SET: seen changes follow the client to its next server connection.
const FOLLOWED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "search_path",
    "standard_conforming_strings",
];

/// The value of a setting the pooler cannot know (a client SET it).
const DIRTY: &str = "\u{0}unknown";

fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

fn valid_setting_name(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 63
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// Before the client's first message on a server connection: makes the
/// connection's settings the client's (SET what differs, RESET what another
/// client changed), as one query whose replies are swallowed.
pub fn sync_params(client: &mut ClientSide, server: &mut ServerConn, tracker: &mut Tracker) {
    if server.params.synced_with(&client.params) {
        return;
    }
    let mut calls = Vec::new();
    for (k, v) in client.params.iter() {
        if server.params.get(k).map(String::as_str) != Some(v) && valid_setting_name(k) {
            calls.push(format!(
                "pg_catalog.set_config({}, {}, false)",
                quote_literal(k),
                quote_literal(v)
            ));
        }
    }
    let mut resets = Vec::new();
    for (k, v) in server.params.iter() {
        if !client.params.contains_key(k)
            && server.defaults.get(k) != Some(v)
            && valid_setting_name(k)
        {
            resets.push(k.clone());
        }
    }
    if calls.is_empty() && resets.is_empty() {
        server.params.mark_synced(&client.params);
        return;
    }
    let mut sql = String::new();
    if !calls.is_empty() {
        sql.push_str("SELECT ");
        sql.push_str(&calls.join(", "));
        sql.push(';');
    }
    for k in &resets {
        sql.push_str(&format!("RESET {k};"));
    }
    for (k, v) in client.params.iter() {
        if valid_setting_name(k) {
            server.params.insert(k.to_string(), v.to_string());
        }
    }
    for k in resets {
        match server.defaults.get(&k) {
            Some(d) => server.params.insert(k, d.clone()),
            None => server.params.remove(&k),
        };
    }
    server.params.mark_synced(&client.params);
    let mut b = bytes::BytesMut::new();
    wire::frontend::encode_query(&sql, &mut b);
    client.out.extend_from_slice(&b);
    tracker.expect.push_back(Expect::Injected);
}

enum Edit {
    Insert(Vec<u8>),
    Remove(usize),
}

/// Walks newly read server bytes: ReadyForQuery updates status and count,
/// replies are matched against what the client is owed (and, in transaction
/// mode, the pooler's own replies are put in and injected ones taken out).
fn walk_server(
    server: &mut ServerConn,
    tracker: &mut Tracker,
    client_params: &mut Rc<Settings>,
    startup_params: &Rc<Settings>,
    stats: &PoolStats,
    rewrite: bool,
) -> Result<(), WireError> {
    let start = server.walked;
    let ServerConn {
        buf,
        walker,
        prepared,
        status,
        params,
        defaults,
        ..
    } = server;
    let mut edits: Vec<(usize, Edit)> = Vec::new();
    let n = walker.walk(
        &buf.bytes()[start..],
        // Small frames are reported whole, so that any of them can be taken
        // out (replies to what the pooler sent itself); big ones stream.
        |tag, len| matches!(tag, b'Z' | b'1' | b'3' | b'S') || len <= SMALL_FRAME,
        |seen| {
            let injected = matches!(tracker.expect.front(), Some(Expect::Injected));
            if seen.tag == b'G' {
                let (dropped, ended) = copy_in_started(&mut tracker.expect);
                tracker.pending = tracker.pending.saturating_sub(dropped);
                tracker.copy_in = !ended;
            }
            if rewrite {
                let mut synth = Vec::new();
                take_synthetics(&mut tracker.expect, &mut synth);
                if !synth.is_empty() {
                    edits.push((seen.offset, Edit::Insert(synth)));
                }
            }
            if on_server_frame(&mut tracker.expect, prepared, seen.tag) == Verdict::Swallow {
                if seen.body.is_some() {
                    edits.push((seen.offset, Edit::Remove(seen.len)));
                } else {
                    tracing::warn!(tag = %(seen.tag as char), "a large reply to the pooler's own query reached the client");
                }
            }
            if let Some(body) = seen.body {
                match seen.tag {
                    b'Z' => {
                        if let Some(&s) = body.first() {
                            *status = s;
                        }
                        if !injected {
                            tracker.answered(stats);
                        }
                        let reset = if injected {
                            Resets::default()
                        } else {
                            std::mem::take(&mut tracker.reset)
                        };
                        if reset.statements {
                            // The client's DISCARD ALL / DEALLOCATE ALL has run.
                            prepared.clear();
                        }
                        if reset.settings {
                            // The client's DISCARD ALL / RESET ALL has run.
                            params.reset_to(defaults);
                            // As on PostgreSQL itself: back to what the client
                            // asked for at startup (applied at its next checkout,
                            // or at once in session mode).
                            *client_params = startup_params.clone();
                            tracker.resync = !rewrite;
                        }
                        if tracker.restore_ready && !injected {
                            tracker.restore_ready = false;
                            for k in tracker.restore.drain(..) {
                                if let Some(v) = startup_params.get(&k) {
                                    Rc::make_mut(client_params).insert(&k, v);
                                }
                            }
                            tracker.resync = !rewrite;
                        }
                    }
                    // A SET / RESET ran: reset settings come back. Session
                    // mode: a reset ran (by its command tag, so also when a
                    // prepared `DISCARD ALL` is executed again).
                    b'C' if !injected => {
                        if body == b"SET\0" || body == b"RESET\0" {
                            tracker.restore_ready = !tracker.restore.is_empty();
                        }
                        if !rewrite {
                            if body == b"DISCARD ALL\0" {
                                tracker.reset |= Resets { statements: true, settings: true };
                            } else if body == b"RESET\0" && tracker.reset_asked {
                                tracker.reset.settings = true;
                                tracker.reset_asked = false;
                            }
                        }
                    }
                    b'S' => {
                        if let Ok((k, v)) = wire::backend::decode_parameter_status(body) {
                            params.insert(k.to_string(), v.to_string());
                            if !injected
                                && FOLLOWED.contains(&k)
                                && client_params.get(k) != Some(v)
                            {
                                Rc::make_mut(client_params).insert(k, v);
                            }
                        }
                    }
                    _ => {}
                }
            }
            Flow::Continue
        },
    )?;
    let mut walked = start + n;
    for (off, edit) in edits.iter().rev() {
        match edit {
            Edit::Insert(b) => {
                buf.insert(start + off, b);
                walked += b.len();
            }
            Edit::Remove(len) => {
                buf.remove(start + off, *len);
                walked -= len;
            }
        }
    }
    server.walked = walked;
    if rewrite {
        emit_synthetics(server, &mut tracker.expect);
    }
    Ok(())
}

pub struct Relay<'a> {
    pub client: &'a mut ClientSide,
    pub tracker: &'a mut Tracker,
    pub scratch: &'a RefCell<Vec<u8>>,
    /// Release the server at transaction end (transaction mode).
    pub release: bool,
    pub shape: Shape<'a>,
    pub ctl: &'a ClientCtl,
    pub stats: &'a PoolStats,
}

impl Relay<'_> {
    /// True when the server connection holds nothing of this client's.
    pub fn server_free(client: &ClientSide, tracker: &Tracker, server: &ServerConn) -> bool {
        tracker.pending == 0
            && !tracker.ext_open
            && tracker.expect.is_empty()
            && server.status == b'I'
            && client.out.is_empty()
            && client.walker.at_boundary()
            && server.buf.is_empty()
            && server.walker.at_boundary()
    }

    /// What the client is doing now, for its timeouts.
    fn phase(&self, server: Option<&ServerConn>) -> Phase {
        match server {
            _ if self.tracker.pending > 0 => Phase::Busy,
            Some(s) if s.status != b'I' || self.tracker.ext_open => Phase::InTransaction,
            _ => Phase::Idle,
        }
    }

    /// Moves bytes until something needs the caller's attention.
    pub fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        mut server: Option<&mut ServerConn>,
    ) -> Poll<Event> {
        loop {
            let mut progress = false;
            let draining = match self.ctl.signal(cx.waker()) {
                Signal::Kill => return Poll::Ready(Event::Killed(Refusal::Terminated)),
                Signal::Fenced => {
                    return Poll::Ready(Event::Killed(Refusal::Cluster(
                        crate::error::FENCED.to_string(),
                    )))
                }
                Signal::IdleTimeout => return Poll::Ready(Event::TimedOut(Refusal::IdleTimeout)),
                Signal::IdleInTransactionTimeout => {
                    return Poll::Ready(Event::TimedOut(Refusal::IdleInTransactionTimeout))
                }
                Signal::Drain => true,
                Signal::None => false,
            };
            if self.client.terminated && self.client.out.is_empty() {
                return Poll::Ready(Event::ClientGone);
            }

            if let Some(s) = server.as_deref_mut() {
                if !self.client.buf.is_empty() && !self.client.terminated {
                    let before = self.client.buf.len();
                    if let Err(e) =
                        process_client(self.client, s, self.tracker, &self.shape, self.stats)
                    {
                        return Poll::Ready(match e {
                            RewriteError::Wire(w) => Event::ClientProtocol(w),
                            other => Event::ClientRefused(other),
                        });
                    }
                    if self.shape.rewrite {
                        emit_synthetics(s, &mut self.tracker.expect);
                    }
                    if self.client.buf.len() != before || self.client.terminated {
                        progress = true;
                    }
                }
                // client -> server
                if !self.client.out.is_empty() {
                    let len = self.client.out.len();
                    match self.client.out.poll_write_to(cx, &mut s.stream, len) {
                        Poll::Ready(Ok(n)) => {
                            bump(&self.stats.db_send, n as u64);
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerGone(Some(e))),
                        Poll::Pending => {}
                    }
                }
                // server -> client
                if s.walked > 0 {
                    match s.buf.poll_write_to(cx, &mut self.client.stream, s.walked) {
                        Poll::Ready(Ok(n)) => {
                            s.walked -= n;
                            bump(&self.stats.client_send, n as u64);
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientError(e)),
                        Poll::Pending => {}
                    }
                }
                if Self::server_free(self.client, self.tracker, s) {
                    if draining {
                        return Poll::Ready(Event::Shutdown);
                    }
                    if self.release {
                        return Poll::Ready(Event::Released);
                    }
                }
            } else {
                match parse_header(self.client.buf.bytes(), MAX_FRAME_LEN) {
                    Err(e) => return Poll::Ready(Event::ClientProtocol(e)),
                    Ok(Some(h)) if h.tag == TERMINATE_TAG => {
                        self.client.terminated = true;
                        self.client.buf.clear();
                        return Poll::Ready(Event::ClientGone);
                    }
                    // A frame that must be whole waits until it is, so the
                    // server is not held while a large message arrives.
                    Ok(Some(h))
                        if !wants_whole(self.shape.rewrite, h.tag, h.frame_len())
                            || h.frame_len() <= self.client.buf.len() =>
                    {
                        return Poll::Ready(Event::NeedServer)
                    }
                    Ok(_) => {}
                }
                if draining {
                    return Poll::Ready(Event::Shutdown);
                }
                if self.client.buf.is_empty()
                    && self.client.out.is_empty()
                    && !self.client.terminated
                    && self.tracker.is_quiet()
                    && self.ctl.park_asked()
                {
                    return Poll::Ready(Event::Park);
                }
            }

            // read client
            if !self.client.terminated && self.client.wants_more(self.shape.rewrite) {
                match self.client.poll_read(cx, self.scratch) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Event::ClientGone),
                    Poll::Ready(Ok(n)) => {
                        bump(&self.stats.client_recv, n as u64);
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientError(e)),
                    Poll::Pending => {}
                }
            }

            // read server
            if let Some(s) = server.as_deref_mut() {
                if s.buf.len() < READ_CAP {
                    match s.buf.poll_read_from(cx, &mut s.stream) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Event::ServerGone(None)),
                        Poll::Ready(Ok(n)) => {
                            bump(&self.stats.db_recv, n as u64);
                            if let Err(e) = walk_server(
                                s,
                                self.tracker,
                                &mut self.client.params,
                                &self.client.startup_params,
                                self.stats,
                                self.shape.rewrite,
                            ) {
                                return Poll::Ready(Event::ServerProtocol(e));
                            }
                            if self.tracker.resync {
                                self.tracker.resync = false;
                                sync_params(self.client, s, self.tracker);
                            }
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerGone(Some(e))),
                        Poll::Pending => {}
                    }
                }
            }

            if !progress {
                self.ctl.set_phase(self.phase(server.as_deref()));
                return Poll::Pending;
            }
        }
    }
}
