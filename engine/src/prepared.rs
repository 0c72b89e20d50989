//! Named prepared statements in transaction mode.
//!
//! A client's statement names mean nothing on a server connection it did not
//! prepare them on. So each Parse of a named statement is mapped to a
//! pool-wide statement (one per query text and parameter types) with its own
//! name; Bind, Describe and Close are rewritten to that name; a server
//! connection that lacks it gets a Close + Parse injected first, whose
//! answers are swallowed; a Parse of a statement the connection already has
//! is answered by the pooler. A queue of expected replies keeps answers in
//! the order the client asked, and follows the server's "skip until Sync"
//! after an error.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use bytes::BufMut;
use wire::frontend;
use wire::WireError;

use crate::metrics::{bump, PoolStats};

/// Statements each server connection keeps prepared (PgBouncer's default).
pub const DEFAULT_SERVER_CACHE: usize = 200;
/// Named statements one client may hold; past it the client is closed.
pub const MAX_CLIENT_STATEMENTS: usize = 10_000;
/// Distinct statements a pool keeps names for; past it unused ones are forgotten.
pub const MAX_POOL_STATEMENTS: usize = 50_000;
/// Parse / Bind / Describe / Close / Query frames up to this size are read
/// whole so they can be rewritten; larger ones stream through unchanged.
pub const MAX_REWRITE_FRAME: usize = 64 << 20;
/// Simple queries are inspected (DISCARD / DEALLOCATE / PREPARE) up to this size.
pub const MAX_INSPECT_QUERY: usize = 64 << 10;

/// A statement of the pool: its server-side name and its Parse frame.
#[derive(Debug)]
pub struct Stmt {
    pub name: Vec<u8>,
    pub parse: Vec<u8>,
    /// What executing it does to the session.
    pub effects: Effects,
}

/// What executing a SQL text does to the session, beyond its result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    pub resets: Resets,
    /// The setting a `SET` / `RESET name` changes (lower case), and to what.
    pub sets: Option<(String, SetValue)>,
}

impl Effects {
    pub fn of_sql(sql: &[u8]) -> Effects {
        // Nearly every statement is none of these: one keyword decides.
        let kw = first_keyword(sql).0;
        if !(kw == "SET" || kw == "RESET" || kw == "DISCARD" || kw == "DEALLOCATE") {
            return Effects::default();
        }
        Effects {
            resets: Resets::of_sql(sql),
            sets: set_target(sql),
        }
    }

    pub fn is_none(&self) -> bool {
        !self.resets.any() && self.sets.is_none()
    }
}

/// What a session reset drops: `DISCARD ALL` both, `DEALLOCATE ALL` the
/// prepared statements, `RESET ALL` the settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resets {
    pub statements: bool,
    pub settings: bool,
}

impl Resets {
    pub fn of_sql(sql: &[u8]) -> Resets {
        let (kw, rest) = first_keyword(sql);
        let (next, after) = first_keyword(rest);
        let all = next == "ALL";
        Resets {
            statements: (kw == "DISCARD" && all)
                || (kw == "DEALLOCATE"
                    && (all || (next == "PREPARE" && first_keyword(after).0 == "ALL"))),
            settings: (kw == "DISCARD" || kw == "RESET") && all,
        }
    }

    pub fn any(self) -> bool {
        self.statements || self.settings
    }
}

impl std::ops::BitOrAssign for Resets {
    fn bitor_assign(&mut self, other: Resets) {
        self.statements |= other.statements;
        self.settings |= other.settings;
    }
}

/// What a session `SET` sets a setting to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetValue {
    /// The value, as `set_config` takes it.
    Value(String),
    /// `SET name TO DEFAULT`.
    Default,
    /// Not understood (several statements, expressions): the connection's
    /// value is unknown.
    Unknown,
}

/// The setting a SQL `SET` or `RESET` changes for the session (not
/// `SET LOCAL`, not `RESET ALL`), and to what. The SQL-standard spellings
/// (`SET TIME ZONE`, `SET NAMES`, `SET SCHEMA`, `SET SESSION AUTHORIZATION`)
/// are named by their settings. `SET SESSION CHARACTERISTICS` is reported as
/// an unknown `default_transaction_isolation` (the relay then treats the
/// other transaction defaults as unknown too).
pub fn set_target(sql: &[u8]) -> Option<(String, SetValue)> {
    let (kw, rest) = first_keyword(sql);
    let reset = kw == "RESET";
    if kw != "SET" && !reset {
        return None;
    }
    let (mut name, mut after) = first_keyword(rest);
    if name == "SESSION" {
        let (next, more) = first_keyword(after);
        if next == "AUTHORIZATION" {
            return named("session_authorization", reset, more);
        }
        if next == "CHARACTERISTICS" {
            return Some(("default_transaction_isolation".into(), SetValue::Unknown));
        }
        (name, after) = (next, more);
    }
    if name == "LOCAL" || name == "TRANSACTION" || name == "ALL" || name.is_empty() {
        return None;
    }
    if name == "TIME" && first_keyword(after).0 == "ZONE" {
        let value = first_keyword(after).1;
        if !reset
            && first_keyword(value).0 == "LOCAL"
            && trim_sql(first_keyword(value).1).is_empty()
        {
            return Some(("timezone".into(), SetValue::Default));
        }
        return named("timezone", reset, value);
    }
    if !reset && (name == "NAMES" || name == "SCHEMA") {
        let setting = if name == "NAMES" {
            "client_encoding"
        } else {
            "search_path"
        };
        return named(setting, false, after);
    }
    if reset {
        return named(&name.to_lowercase(), true, after);
    }
    let after = trim_sql(after);
    let value = if let Some(v) = after.strip_prefix(b"=") {
        Some(v)
    } else {
        let (to, v) = first_keyword(after);
        (to == "TO").then_some(v)
    };
    let name = name.to_lowercase();
    match value {
        Some(v) => named(&name, false, v),
        None => Some((name, SetValue::Unknown)),
    }
}

/// `setting` set to the value written in `value` (or reset).
fn named(setting: &str, reset: bool, value: &[u8]) -> Option<(String, SetValue)> {
    let value = trim_sql(value);
    if reset {
        let v = if value.is_empty() {
            SetValue::Default
        } else {
            SetValue::Unknown
        };
        return Some((setting.to_string(), v));
    }
    let Ok(text) = std::str::from_utf8(value) else {
        return Some((setting.to_string(), SetValue::Unknown));
    };
    if text.eq_ignore_ascii_case("DEFAULT") {
        return Some((setting.to_string(), SetValue::Default));
    }
    // One quoted literal: its content; otherwise plain tokens (numbers,
    // names, lists) as written. Anything with ';' may be more statements.
    let parsed = if text.len() >= 2 && text.starts_with('\'') && text.ends_with('\'') {
        let inner = &text[1..text.len() - 1];
        (!inner.replace("''", "").contains('\'')).then(|| inner.replace("''", "'"))
    } else if !text.contains(['\'', ';', '(', '$']) && !text.is_empty() {
        Some(text.to_string())
    } else {
        None
    };
    Some((
        setting.to_string(),
        parsed.map_or(SetValue::Unknown, SetValue::Value),
    ))
}

/// The pool's statements, by query text and parameter types.
#[derive(Debug)]
pub struct Registry {
    by_text: HashMap<Vec<u8>, Rc<Stmt>>,
    next: Cell<u64>,
    /// Unique in the process: a server connection knows whose names it holds.
    id: u64,
}

impl Default for Registry {
    fn default() -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Registry {
            by_text: HashMap::new(),
            next: Cell::new(0),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl Registry {
    /// Which registry this is (see [`ServerStmts::adopt`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn intern(&mut self, query: &[u8], types: &[u32]) -> Rc<Stmt> {
        let mut key = Vec::with_capacity(query.len() + 1 + types.len() * 4);
        key.extend_from_slice(query);
        key.push(0);
        for t in types {
            key.extend_from_slice(&t.to_be_bytes());
        }
        if let Some(s) = self.by_text.get(&key) {
            return s.clone();
        }
        if self.by_text.len() >= MAX_POOL_STATEMENTS {
            // Forget statements no client maps any more.
            self.by_text.retain(|_, s| Rc::strong_count(s) > 1);
        }
        let n = self.next.get();
        self.next.set(n + 1);
        let name = format!("sv_{n}").into_bytes();
        let mut parse = bytes::BytesMut::new();
        frontend::encode_parse(&name, query, types, &mut parse);
        let stmt = Rc::new(Stmt {
            name,
            parse: parse.to_vec(),
            effects: Effects::of_sql(query),
        });
        self.by_text.insert(key, stmt.clone());
        stmt
    }

    pub fn len(&self) -> usize {
        self.by_text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_text.is_empty()
    }
}

/// A client's statement names.
#[derive(Debug, Default)]
pub struct ClientStmts {
    map: HashMap<Vec<u8>, Rc<Stmt>>,
    /// What the unnamed statement does when executed, when it does anything.
    unnamed: Option<Box<Effects>>,
}

impl ClientStmts {
    /// The pool statement a client's statement name stands for.
    pub fn get(&self, name: &[u8]) -> Option<&Rc<Stmt>> {
        self.map.get(name)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What one server connection has prepared: a bounded LRU of pool names.
#[derive(Debug)]
pub struct ServerStmts {
    lru: HashMap<Vec<u8>, u64>,
    tick: u64,
    cap: usize,
    /// The registry whose names `lru` holds (0: none yet).
    registry: u64,
}

impl Default for ServerStmts {
    fn default() -> Self {
        ServerStmts::new(DEFAULT_SERVER_CACHE)
    }
}

impl ServerStmts {
    pub fn new(cap: usize) -> Self {
        ServerStmts {
            lru: HashMap::new(),
            tick: 0,
            cap: cap.max(1),
            registry: 0,
        }
    }

    /// Before a client of `registry` uses the connection: the names it
    /// holds are that registry's, or forgotten (a replica connection serves
    /// the clients of one primary pool; should that pool have been started
    /// again, its `sv_N` mean other statements). Forgotten names are
    /// prepared again with Close first, so the server is never confused.
    pub fn adopt(&mut self, registry: u64) {
        if self.registry != registry {
            self.lru.clear();
            self.registry = registry;
        }
    }

    fn touch(&mut self, name: &[u8]) -> bool {
        self.tick += 1;
        match self.lru.get_mut(name) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records a statement; returns the least recently used one to close
    /// when the cache is full.
    fn insert(&mut self, name: &[u8]) -> Option<Vec<u8>> {
        self.tick += 1;
        let victim = if self.lru.len() >= self.cap && !self.lru.contains_key(name) {
            let v = self
                .lru
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone());
            if let Some(v) = &v {
                self.lru.remove(v);
            }
            v
        } else {
            None
        };
        self.lru.insert(name.to_vec(), self.tick);
        victim
    }

    fn remove(&mut self, name: &[u8]) {
        self.lru.remove(name);
    }

    pub fn clear(&mut self) {
        self.lru.clear();
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }
}

/// A reply the server (or the pooler) owes the client, in order.
#[derive(Debug)]
pub enum Expect {
    /// ParseComplete; `swallow` for an injected Parse; `stmt` is forgotten
    /// by the server connection if the Parse fails or is skipped.
    Parse {
        swallow: bool,
        stmt: Option<Rc<Stmt>>,
    },
    Bind,
    Describe,
    Execute,
    Close {
        swallow: bool,
    },
    Sync,
    Query,
    FunctionCall,
    /// A reply the pooler makes itself (ParseComplete, CloseComplete), sent
    /// when every earlier reply has gone.
    Synthetic(u8),
    /// A query the pooler sent itself (session settings): every reply up to
    /// and including its ReadyForQuery is swallowed.
    Injected,
    /// Not a reply: the client ended a COPY (CopyDone / CopyFail) before the
    /// server said it started one; Syncs before it are ignored by the server.
    CopyEnd,
}

/// The server started COPY IN (CopyInResponse): Syncs the client sent after
/// the COPY's Execute and before its CopyDone / CopyFail are ignored by the
/// server, so no ReadyForQuery comes for them. Returns how many were dropped
/// and whether the client already ended the COPY.
pub fn copy_in_started(expect: &mut VecDeque<Expect>) -> (u32, bool) {
    let mut dropped = 0;
    let mut i = 1;
    while i < expect.len() {
        match expect[i] {
            Expect::Sync => {
                expect.remove(i);
                dropped += 1;
            }
            Expect::CopyEnd => {
                expect.remove(i);
                return (dropped, true);
            }
            _ => i += 1,
        }
    }
    (dropped, false)
}

/// What to do with a server frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Swallow,
}

/// Follows one server frame through the queue.
pub fn on_server_frame(
    expect: &mut VecDeque<Expect>,
    server: &mut ServerStmts,
    tag: u8,
) -> Verdict {
    if matches!(expect.front(), Some(Expect::Injected)) {
        if tag == b'Z' {
            expect.pop_front();
        }
        return Verdict::Swallow;
    }
    match tag {
        b'1' => {
            if let Some(Expect::Parse { swallow, .. }) = expect.front() {
                let swallow = *swallow;
                expect.pop_front();
                if swallow {
                    return Verdict::Swallow;
                }
            }
        }
        b'2' => {
            if matches!(expect.front(), Some(Expect::Bind)) {
                expect.pop_front();
            }
        }
        b'3' => {
            if let Some(Expect::Close { swallow }) = expect.front() {
                let swallow = *swallow;
                expect.pop_front();
                if swallow {
                    return Verdict::Swallow;
                }
            }
        }
        b'T' | b'n' => {
            if matches!(expect.front(), Some(Expect::Describe)) {
                expect.pop_front();
            }
        }
        b'C' | b's' | b'I' => {
            if matches!(expect.front(), Some(Expect::Execute)) {
                expect.pop_front();
            }
        }
        b'E' if !matches!(
            expect.front(),
            Some(Expect::Query | Expect::FunctionCall | Expect::Sync) | None
        ) =>
        {
            // An extended-protocol message failed: the server skips
            // everything up to the next Sync.
            while let Some(e) = expect.front() {
                if matches!(e, Expect::Sync | Expect::Query | Expect::FunctionCall) {
                    break;
                }
                if let Some(Expect::Parse {
                    stmt: Some(stmt), ..
                }) = expect.pop_front()
                {
                    server.remove(&stmt.name);
                }
            }
        }
        b'Z' => {
            while let Some(e) = expect.pop_front() {
                if matches!(e, Expect::Sync | Expect::Query | Expect::FunctionCall) {
                    break;
                }
            }
        }
        _ => {}
    }
    Verdict::Forward
}

/// Replies the pooler owes now (at the head of the queue).
pub fn take_synthetics(expect: &mut VecDeque<Expect>, out: &mut Vec<u8>) {
    while let Some(Expect::Synthetic(tag)) = expect.front() {
        out.push(*tag);
        out.extend_from_slice(&4i32.to_be_bytes());
        expect.pop_front();
    }
}

/// Why a client's message cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("too many prepared statements on one connection (limit {0}); close some")]
    TooManyStatements(usize),
}

/// Rewrites client frames for the server connection at hand.
pub struct Rewriter<'a> {
    /// Set when the client resets its session (DISCARD ALL, RESET ALL,
    /// DEALLOCATE ALL): once that has run, the connection's statements or
    /// settings are forgotten.
    pub reset: &'a mut Resets,
    /// Settings the client SET that PostgreSQL may not report back: whoever
    /// gets the connection next has them RESET unless it asked for them.
    pub dirty: &'a mut Vec<(String, SetValue)>,
    pub client: &'a mut ClientStmts,
    pub registry: &'a RefCell<Registry>,
    pub server: &'a mut ServerStmts,
    pub expect: &'a mut VecDeque<Expect>,
    pub stats: &'a PoolStats,
}

/// A word of SQL text, compared without regard to case (no allocation: this
/// runs on every simple query in transaction mode).
#[derive(Debug, Clone, Copy)]
struct Word<'a>(&'a [u8]);

impl PartialEq<&str> for Word<'_> {
    fn eq(&self, other: &&str) -> bool {
        self.0.eq_ignore_ascii_case(other.as_bytes())
    }
}

impl Word<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn to_lowercase(self) -> String {
        String::from_utf8_lossy(self.0).to_ascii_lowercase()
    }
}

/// The first keyword of a SQL text, skipping blanks and comments, and the rest.
fn first_keyword(sql: &[u8]) -> (Word<'_>, &[u8]) {
    let mut i = 0;
    loop {
        while i < sql.len() && sql[i].is_ascii_whitespace() {
            i += 1;
        }
        if sql[i..].starts_with(b"--") {
            while i < sql.len() && sql[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if sql[i..].starts_with(b"/*") {
            match memchr::memmem::find(&sql[i + 2..], b"*/") {
                Some(p) => i += p + 4,
                None => i = sql.len(),
            }
            continue;
        }
        break;
    }
    let start = i;
    while i < sql.len() && (sql[i].is_ascii_alphanumeric() || sql[i] == b'_') {
        i += 1;
    }
    (Word(&sql[start..i]), &sql[i..])
}

/// Whether a SQL text is one the pooler must look at in transaction mode
/// (statements, session settings); the others go on untouched.
pub fn needs_inspection(sql: &[u8]) -> bool {
    let (kw, _) = first_keyword(sql);
    [
        "PREPARE",
        "EXECUTE",
        "RESET",
        "SET",
        "DISCARD",
        "DEALLOCATE",
    ]
    .iter()
    .any(|k| kw == *k)
}

fn trim_sql(s: &[u8]) -> &[u8] {
    let mut s = s;
    while let Some((last, rest)) = s.split_last() {
        if last.is_ascii_whitespace() || *last == b';' || *last == 0 {
            s = rest;
        } else {
            break;
        }
    }
    while let Some((first, rest)) = s.split_first() {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// The refusal sent in place of SQL-level PREPARE / EXECUTE.
const REFUSE_SQL_PREPARE: &str = "DO $supavisor$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', \
     MESSAGE = 'SQL PREPARE / EXECUTE are not supported in transaction mode: use the session port', \
     HINT = 'use protocol-level prepared statements (every driver does), or the session port (5432)'; \
     END $supavisor$";

impl Rewriter<'_> {
    /// Makes sure the server connection has `stmt` before a message that
    /// uses it; the injected Parse's reply is swallowed.
    fn ensure_prepared(&mut self, stmt: &Rc<Stmt>, out: &mut Vec<u8>) {
        if self.server.touch(&stmt.name) {
            bump(&self.stats.prepared_hits, 1);
            return;
        }
        self.prepare_on_server(stmt, true, out);
    }

    /// Sends Close + Parse of `stmt` (evicting the least recently used
    /// statement when the connection's cache is full). Close first: closing
    /// an absent statement is no error, and it keeps us right even if our
    /// record of the connection is stale.
    fn prepare_on_server(&mut self, stmt: &Rc<Stmt>, swallow: bool, out: &mut Vec<u8>) {
        bump(&self.stats.prepared_misses, 1);
        let victim = self.server.insert(&stmt.name);
        if victim.is_some() {
            bump(&self.stats.prepared_evictions, 1);
        }
        for name in victim
            .iter()
            .map(Vec::as_slice)
            .chain([stmt.name.as_slice()])
        {
            let mut b = bytes::BytesMut::new();
            frontend::encode_close(b'S', name, &mut b);
            out.extend_from_slice(&b);
            self.expect.push_back(Expect::Close { swallow: true });
        }
        out.extend_from_slice(&stmt.parse);
        self.expect.push_back(Expect::Parse {
            swallow,
            stmt: Some(stmt.clone()),
        });
    }

    fn lookup(&self, name: &[u8]) -> Option<Rc<Stmt>> {
        if name.is_empty() {
            return None;
        }
        self.client.map.get(name).cloned()
    }

    /// A whole Parse / Bind / Describe / Close / Query frame: appends what
    /// goes to the server to `out` and records the replies owed.
    pub fn frame(&mut self, tag: u8, frame: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let body = &frame[wire::frame::HEADER_LEN..];
        match tag {
            b'P' => {
                let p = frontend::decode_parse(body)?;
                // What the statement does to the session happens when it is
                // executed (Bind), not when it is parsed.
                let replaced = self.inspect_sql(p.query, false, out);
                let query = replaced.as_deref().map(str::as_bytes).unwrap_or(p.query);
                if p.name.is_empty() {
                    let effects = Effects::of_sql(query);
                    self.client.unnamed = (!effects.is_none()).then(|| Box::new(effects));
                    match &replaced {
                        Some(_) => {
                            let mut b = bytes::BytesMut::new();
                            frontend::encode_parse(b"", query, &p.param_types, &mut b);
                            out.extend_from_slice(&b);
                        }
                        None => out.extend_from_slice(frame),
                    }
                    self.expect.push_back(Expect::Parse {
                        swallow: false,
                        stmt: None,
                    });
                    return Ok(());
                }
                if !self.client.map.contains_key(p.name)
                    && self.client.map.len() >= MAX_CLIENT_STATEMENTS
                {
                    return Err(RewriteError::TooManyStatements(MAX_CLIENT_STATEMENTS));
                }
                let stmt = self.registry.borrow_mut().intern(query, &p.param_types);
                self.client.map.insert(p.name.to_vec(), stmt.clone());
                if self.server.touch(&stmt.name) {
                    bump(&self.stats.prepared_hits, 1);
                    self.expect.push_back(Expect::Synthetic(b'1'));
                } else {
                    self.prepare_on_server(&stmt, false, out);
                }
            }
            b'B' => {
                let (portal, name) = frontend::bind_names(body)?;
                if name.is_empty() {
                    if let Some(effects) = self.client.unnamed.take() {
                        self.apply(&effects);
                        self.client.unnamed = Some(effects);
                    }
                }
                match self.lookup(name) {
                    Some(stmt) => {
                        self.apply(&stmt.effects);
                        self.ensure_prepared(&stmt, out);
                        // Same frame with the statement name replaced.
                        let tail = &body[portal.len() + 1 + name.len() + 1..];
                        write_frame(out, b'B', |b| {
                            b.put_slice(portal);
                            b.put_u8(0);
                            b.put_slice(&stmt.name);
                            b.put_u8(0);
                            b.put_slice(tail);
                        })?;
                    }
                    None => out.extend_from_slice(frame),
                }
                self.expect.push_back(Expect::Bind);
            }
            b'D' => {
                let (kind, name) = frontend::describe_target(body)?;
                match (kind, self.lookup(name)) {
                    (b'S', Some(stmt)) => {
                        self.ensure_prepared(&stmt, out);
                        let mut b = bytes::BytesMut::new();
                        frontend::encode_describe(b'S', &stmt.name, &mut b);
                        out.extend_from_slice(&b);
                    }
                    _ => out.extend_from_slice(frame),
                }
                self.expect.push_back(Expect::Describe);
            }
            b'C' => {
                let (kind, name) = frontend::close_target(body)?;
                if kind == b'S' && !name.is_empty() {
                    // Only the client's name goes; the statement stays for
                    // others. A name the client does not have is no statement
                    // of its on any server connection (every named Parse is
                    // renamed), so PostgreSQL would answer CloseComplete too;
                    // passed on, it could close a pool statement (`sv_N`)
                    // that the connection is still believed to hold.
                    self.client.map.remove(name);
                    self.expect.push_back(Expect::Synthetic(b'3'));
                } else {
                    out.extend_from_slice(frame);
                    self.expect.push_back(Expect::Close { swallow: false });
                }
            }
            b'Q' => {
                self.query(frame, body, out)?;
                self.expect.push_back(Expect::Query);
            }
            _ => out.extend_from_slice(frame),
        }
        Ok(())
    }

    /// A statement that is being executed changes the session.
    fn apply(&mut self, effects: &Effects) {
        if let Some(set) = &effects.sets {
            // SET LOCAL ends with the transaction; a session SET (or RESET)
            // follows the client (or leaves the connection's value unknown).
            self.dirty.push(set.clone());
        }
        if effects.resets.statements {
            // The client's names go; the server's statements go too
            // (forgotten now and again once it has run: re-preparing
            // closes first, so forgetting early is always safe).
            self.client.map.clear();
            self.server.clear();
        }
        *self.reset |= effects.resets;
    }

    /// What a SQL text does to prepared statements and session state (when
    /// `executed`: a simple query); for texts that must change, the SQL to
    /// send instead.
    fn inspect_sql(&mut self, sql: &[u8], executed: bool, out: &mut Vec<u8>) -> Option<String> {
        let (kw, rest) = first_keyword(sql);
        if kw == "PREPARE" || kw == "EXECUTE" {
            return Some(REFUSE_SQL_PREPARE.to_string());
        }
        if executed {
            self.apply(&Effects::of_sql(sql));
        }
        if kw != "DEALLOCATE" {
            return None;
        }
        let (next, after) = first_keyword(rest);
        let target = if next == "PREPARE" {
            trim_sql(after)
        } else {
            trim_sql(rest)
        };
        if next == "ALL" || (next == "PREPARE" && first_keyword(after).0 == "ALL") {
            // Handled by `apply`.
        } else if !target.is_empty() {
            // A quoted name as it is, an unquoted one folded to lower case
            // (as PostgreSQL reads SQL identifiers).
            let name = match target
                .strip_prefix(b"\"")
                .and_then(|t| t.strip_suffix(b"\""))
            {
                Some(quoted) => quoted.to_vec(),
                None => target.to_ascii_lowercase(),
            };
            if let Some(stmt) = self.client.map.remove(&name) {
                // Same command tag, from the server.
                self.ensure_prepared(&stmt, out);
                self.server.remove(&stmt.name);
                return Some(format!(
                    "DEALLOCATE \"{}\"",
                    String::from_utf8_lossy(&stmt.name)
                ));
            }
            // Not one of the client's: whatever the server holds under that
            // name belongs to the pool, so PostgreSQL's answer is given here.
            let shown: String = String::from_utf8_lossy(&name)
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(63)
                .collect();
            return Some(format!(
                "DO $supavisor$ BEGIN RAISE EXCEPTION USING ERRCODE = '26000', \
                 MESSAGE = 'prepared statement \"{shown}\" does not exist'; END $supavisor$"
            ));
        }
        None
    }

    fn query(&mut self, frame: &[u8], body: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        match self.inspect_sql(body, true, out) {
            Some(sql) => {
                let mut b = bytes::BytesMut::new();
                frontend::encode_query(&sql, &mut b);
                out.extend_from_slice(&b);
            }
            None => out.extend_from_slice(frame),
        }
        Ok(())
    }
}

/// Appends one frame built by `f`, with its length filled in.
fn write_frame(out: &mut Vec<u8>, tag: u8, f: impl FnOnce(&mut Vec<u8>)) -> Result<(), WireError> {
    let start = out.len();
    out.push(tag);
    out.extend_from_slice(&[0; 4]);
    f(out);
    let len = i32::try_from(out.len() - start - 1).map_err(|_| WireError::TooLarge {
        what: "rewritten frame",
        len: (out.len() - start) as u64,
        max: i32::MAX as u64,
    })?;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_resets() {
        assert_eq!(
            Resets::of_sql(b"DEALLOCATE PREPARE ALL"),
            Resets {
                statements: true,
                settings: false
            }
        );
        assert_eq!(
            Resets::of_sql(b"discard all"),
            Resets {
                statements: true,
                settings: true
            }
        );
        assert_eq!(
            Resets::of_sql(b"RESET ALL"),
            Resets {
                statements: false,
                settings: true
            }
        );
        for sql in [
            "DISCARD ALL",
            " discard all;",
            "/* c */ RESET\nALL",
            "-- x\nReset All",
        ] {
            assert!(Resets::of_sql(sql.as_bytes()).settings, "{sql}");
        }
        for sql in [
            "DISCARD PLANS",
            "RESET search_path",
            "SELECT 'DISCARD ALL'",
            "DISCARD",
            "",
        ] {
            assert!(!Resets::of_sql(sql.as_bytes()).any(), "{sql}");
        }
    }

    fn msg(f: impl FnOnce(&mut bytes::BytesMut)) -> Vec<u8> {
        let mut b = bytes::BytesMut::new();
        f(&mut b);
        b.to_vec()
    }

    struct World {
        client: ClientStmts,
        registry: RefCell<Registry>,
        server: ServerStmts,
        expect: VecDeque<Expect>,
        stats: PoolStats,
        reset: Resets,
        dirty: Vec<(String, SetValue)>,
    }

    impl World {
        fn new(cap: usize) -> Self {
            World {
                client: ClientStmts::default(),
                registry: RefCell::new(Registry::default()),
                server: ServerStmts::new(cap),
                expect: VecDeque::new(),
                stats: PoolStats::default(),
                reset: Resets::default(),
                dirty: Vec::new(),
            }
        }

        fn send(&mut self, frame: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut rw = Rewriter {
                reset: &mut self.reset,
                dirty: &mut self.dirty,
                client: &mut self.client,
                registry: &self.registry,
                server: &mut self.server,
                expect: &mut self.expect,
                stats: &self.stats,
            };
            rw.frame(frame[0], frame, &mut out).unwrap();
            out
        }
    }

    fn tags(bytes: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            v.push(bytes[i]);
            let len = i32::from_be_bytes([bytes[i + 1], bytes[i + 2], bytes[i + 3], bytes[i + 4]]);
            i += len as usize + 1;
        }
        v
    }

    #[test]
    fn parse_is_renamed_and_reused() {
        let mut w = World::new(200);
        let parse = msg(|b| frontend::encode_parse(b"s1", b"select $1", &[23], b));
        let out = w.send(&parse);
        assert_eq!(tags(&out), b"CP");
        let p = frontend::decode_parse(&out[out.len() - (parse.len() + 2)..][5..]).unwrap();
        assert_eq!(p.name, b"sv_0");
        // The server answers CloseComplete (swallowed) then ParseComplete (forwarded).
        assert_eq!(
            on_server_frame(&mut w.expect, &mut w.server, b'3'),
            Verdict::Swallow
        );
        assert_eq!(
            on_server_frame(&mut w.expect, &mut w.server, b'1'),
            Verdict::Forward
        );
        assert!(w.expect.is_empty());
        // Same query prepared again (by the same or another client): answered by us.
        let again = msg(|b| frontend::encode_parse(b"other", b"select $1", &[23], b));
        assert!(w.send(&again).is_empty());
        let mut synth = Vec::new();
        take_synthetics(&mut w.expect, &mut synth);
        assert_eq!(synth, vec![b'1', 0, 0, 0, 4]);
        // Bind is rewritten.
        let bind = msg(|b| frontend::encode_bind(b"", b"s1", &[], &[Some(b"7")], &[], b).unwrap());
        let out = w.send(&bind);
        assert_eq!(tags(&out), b"B");
        let (_, name) = frontend::bind_names(&out[5..]).unwrap();
        assert_eq!(name, b"sv_0");
    }

    #[test]
    fn bind_on_a_fresh_connection_injects_parse() {
        let mut w = World::new(200);
        w.send(&msg(|b| frontend::encode_parse(b"s1", b"select 1", &[], b)));
        w.expect.clear();
        // Another server connection: it has nothing prepared.
        w.server = ServerStmts::new(200);
        let bind = msg(|b| frontend::encode_bind(b"", b"s1", &[], &[], &[], b).unwrap());
        let out = w.send(&bind);
        assert_eq!(tags(&out), b"CPB");
        assert_eq!(
            on_server_frame(&mut w.expect, &mut w.server, b'3'),
            Verdict::Swallow
        );
        assert_eq!(
            on_server_frame(&mut w.expect, &mut w.server, b'1'),
            Verdict::Swallow
        );
        assert_eq!(
            on_server_frame(&mut w.expect, &mut w.server, b'2'),
            Verdict::Forward
        );
        assert!(w.expect.is_empty());
    }

    #[test]
    fn failed_injected_parse_is_forgotten_until_sync() {
        let mut w = World::new(200);
        w.send(&msg(|b| {
            frontend::encode_parse(b"s1", b"select * from gone", &[], b)
        }));
        w.expect.clear();
        w.server = ServerStmts::new(200);
        w.send(&msg(|b| {
            frontend::encode_bind(b"", b"s1", &[], &[], &[], b).unwrap()
        }));
        w.send(&msg(|b| frontend::encode_execute(b"", 0, b)));
        w.send(&msg(frontend::encode_sync));
        assert_eq!(
            on_server_frame(&mut w.expect, &mut w.server, b'3'),
            Verdict::Swallow
        );
        // The injected Parse fails: its error goes to the client.
        assert_eq!(
            on_server_frame(&mut w.expect, &mut w.server, b'E'),
            Verdict::Forward
        );
        assert!(w.server.is_empty(), "statement must not count as prepared");
        assert_eq!(
            on_server_frame(&mut w.expect, &mut w.server, b'Z'),
            Verdict::Forward
        );
        assert!(w.expect.is_empty());
    }

    #[test]
    fn close_drops_only_the_client_name() {
        let mut w = World::new(200);
        w.send(&msg(|b| frontend::encode_parse(b"s1", b"select 1", &[], b)));
        w.expect.clear();
        let out = w.send(&msg(|b| frontend::encode_close(b'S', b"s1", b)));
        assert!(out.is_empty());
        assert!(matches!(w.expect.front(), Some(Expect::Synthetic(b'3'))));
        assert!(w.client.is_empty());
        assert_eq!(w.server.len(), 1);
    }

    #[test]
    fn close_of_a_foreign_name_stays_in_the_pooler() {
        let mut w = World::new(200);
        w.send(&msg(|b| frontend::encode_parse(b"a", b"select 1", &[], b)));
        w.expect.clear();
        // Another client's (or a guessed) pool name: not sent to the server.
        let out = w.send(&msg(|b| frontend::encode_close(b'S', b"sv_0", b)));
        assert!(out.is_empty());
        assert!(matches!(w.expect.front(), Some(Expect::Synthetic(b'3'))));
        assert_eq!(w.server.len(), 1);
        // The unnamed statement and portals still go to the server.
        w.expect.clear();
        let out = w.send(&msg(|b| frontend::encode_close(b'S', b"", b)));
        assert_eq!(tags(&out), b"C");
        let out = w.send(&msg(|b| frontend::encode_close(b'P', b"p1", b)));
        assert_eq!(tags(&out), b"C");
    }

    #[test]
    fn lru_evicts_with_close() {
        let mut w = World::new(2);
        for q in [&b"select 1"[..], b"select 2", b"select 3"] {
            w.send(&msg(|b| frontend::encode_parse(b"", b"x", &[], b)));
            let out = w.send(&msg(|b| frontend::encode_parse(q, q, &[], b)));
            let _ = out;
        }
        assert_eq!(w.server.len(), 2);
        assert_eq!(w.stats.prepared_evictions.get(), 1);
    }

    #[test]
    fn session_sets_are_understood() {
        let v = |s: &str| set_target(s.as_bytes());
        assert_eq!(
            v("SET extra_float_digits = 3"),
            Some(("extra_float_digits".into(), SetValue::Value("3".into())))
        );
        assert_eq!(
            v("set search_path to a, public;"),
            Some(("search_path".into(), SetValue::Value("a, public".into())))
        );
        assert_eq!(
            v("SET SESSION TimeZone TO 'Europe/Paris'"),
            Some(("timezone".into(), SetValue::Value("Europe/Paris".into())))
        );
        assert_eq!(
            v("SET application_name = 'it''s'"),
            Some(("application_name".into(), SetValue::Value("it's".into())))
        );
        assert_eq!(
            v("SET datestyle TO DEFAULT"),
            Some(("datestyle".into(), SetValue::Default))
        );
        assert_eq!(
            v("SET a = 1; SELECT 2"),
            Some(("a".into(), SetValue::Unknown))
        );
        assert_eq!(v("SET LOCAL a = 1"), None);
        assert_eq!(v("SELECT 1"), None);
        assert_eq!(v("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"), None);
        assert_eq!(v("RESET ALL"), None);
        let val = |s: &str| SetValue::Value(s.into());
        assert_eq!(
            v("RESET search_path;"),
            Some(("search_path".into(), SetValue::Default))
        );
        assert_eq!(
            v("reset TimeZone"),
            Some(("timezone".into(), SetValue::Default))
        );
        assert_eq!(
            v("SET TIME ZONE 'UTC'"),
            Some(("timezone".into(), val("UTC")))
        );
        assert_eq!(
            v("SET TIME ZONE LOCAL"),
            Some(("timezone".into(), SetValue::Default))
        );
        assert_eq!(
            v("RESET TIME ZONE"),
            Some(("timezone".into(), SetValue::Default))
        );
        assert_eq!(
            v("SET NAMES 'UTF8'"),
            Some(("client_encoding".into(), val("UTF8")))
        );
        assert_eq!(
            v("SET SCHEMA 'app'"),
            Some(("search_path".into(), val("app")))
        );
        assert_eq!(
            v("SET SESSION AUTHORIZATION bob"),
            Some(("session_authorization".into(), val("bob")))
        );
        assert_eq!(
            v("RESET SESSION AUTHORIZATION"),
            Some(("session_authorization".into(), SetValue::Default))
        );
        assert_eq!(
            v("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            Some(("default_transaction_isolation".into(), SetValue::Unknown))
        );
    }

    #[test]
    fn sql_level_statements() {
        let mut w = World::new(200);
        let out = w.send(&msg(|b| {
            frontend::encode_query("  prepare x as select 1", b)
        }));
        assert!(String::from_utf8_lossy(&out).contains("session port"));
        w.send(&msg(|b| frontend::encode_parse(b"s1", b"select 1", &[], b)));
        let out = w.send(&msg(|b| frontend::encode_query("DEALLOCATE S1", b)));
        assert!(String::from_utf8_lossy(&out).contains("DEALLOCATE \"sv_0\""));
        // A name the client does not hold (here the pool's own) never reaches the server.
        let out = w.send(&msg(|b| frontend::encode_query("DEALLOCATE sv_0", b)));
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.contains("26000") && !out.contains("DEALLOCATE"),
            "{out}"
        );
        assert!(w.client.is_empty());
        w.send(&msg(|b| frontend::encode_parse(b"s2", b"select 2", &[], b)));
        w.send(&msg(|b| frontend::encode_query("/* c */ discard all;", b)));
        assert!(w.client.is_empty());
        assert!(w.server.is_empty());
        assert!(w.reset.statements && w.reset.settings);
        // Through the extended protocol too.
        let out = w.send(&msg(|b| {
            frontend::encode_parse(b"", b"PREPARE y AS SELECT 1", &[], b)
        }));
        assert!(String::from_utf8_lossy(&out).contains("session port"));
    }
}
