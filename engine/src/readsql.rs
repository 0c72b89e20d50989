//! Which transactions a replica may serve under `load_balance = "reads"`:
//! the client's first batch holds nothing but plain reads. No SQL parser,
//! a small conservative lexer: anything it cannot be sure of goes to the
//! primary. A misjudged read still cannot write on a replica (its
//! connections are opened read-only, PostgreSQL answers 25006).
//!
//! A plain read is a SQL text whose every statement starts with `SELECT`,
//! has no locking clause (`FOR UPDATE`, `FOR NO KEY UPDATE`, `FOR SHARE`,
//! `FOR KEY SHARE`), no `INTO` (`SELECT INTO` creates a table) and calls no
//! function known to write or to depend on the session's other work
//! (sequences, advisory locks, large objects, `set_config`, `pg_notify`,
//! transaction ids, server administration, `dblink`).

use wire::frame::{parse_header, MAX_FRAME_LEN};
use wire::frontend::{self, QUERY_TAG};

/// Functions a read on a replica must not call: exact names.
const WRITING_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "currval",
    "lastval",
    "set_config",
    "pg_notify",
    "txid_current",
    "pg_current_xact_id",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_switch_wal",
    "pg_promote",
    "pg_create_restore_point",
    "pg_drop_replication_slot",
    "pg_import_system_collations",
    "pg_logical_emit_message",
    "pg_export_snapshot",
    "lowrite",
];

/// Functions a read on a replica must not call: name prefixes.
const WRITING_PREFIXES: &[&str] = &[
    "pg_advisory_",
    "pg_try_advisory_",
    "lo_",
    "pg_create_",
    "pg_replication_origin_",
    "pg_stat_reset",
    "pg_wal_replay_",
    "pg_backup_",
    "pg_start_backup",
    "pg_stop_backup",
    "dblink",
];

/// A token of SQL text, as far as the check needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    /// A name or keyword, compared without case.
    Word(&'a [u8]),
    /// A quoted name: never a keyword, but maybe a function's name.
    Quoted(&'a [u8]),
    /// A literal, a parameter, a number or an operator: nothing to check.
    Other,
    OpenParen,
    Semicolon,
}

/// Splits SQL text into tokens; `None` when the text is not understood
/// (an unterminated literal or comment, a backslash in a plain string
/// whose meaning depends on `standard_conforming_strings`).
fn tokens(sql: &[u8]) -> Option<Vec<Token<'_>>> {
    let mut out = Vec::new();
    let mut i = 0;
    let n = sql.len();
    while i < n {
        let c = sql[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => i += 1,
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                while i < n && sql[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                // Block comments nest in PostgreSQL.
                let mut depth = 0usize;
                loop {
                    if i + 1 >= n {
                        return None;
                    }
                    if sql[i] == b'/' && sql[i + 1] == b'*' {
                        depth += 1;
                        i += 2;
                    } else if sql[i] == b'*' && sql[i + 1] == b'/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                i = skip_string(sql, i, false)?;
                out.push(Token::Other);
            }
            b'"' => {
                let start = i + 1;
                i += 1;
                loop {
                    match sql.get(i) {
                        None => return None,
                        Some(b'"') if sql.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => break,
                        Some(_) => i += 1,
                    }
                }
                out.push(Token::Quoted(&sql[start..i]));
                i += 1;
            }
            b'$' => {
                // $1 (a parameter) or a dollar-quoted string $tag$...$tag$.
                let mut j = i + 1;
                if sql.get(j).is_some_and(u8::is_ascii_digit) {
                    while sql.get(j).is_some_and(u8::is_ascii_digit) {
                        j += 1;
                    }
                    i = j;
                    out.push(Token::Other);
                    continue;
                }
                while sql.get(j).is_some_and(|&b| is_ident_char(b) && b != b'$') {
                    j += 1;
                }
                if sql.get(j) != Some(&b'$') {
                    return None;
                }
                let tag = &sql[i..=j];
                let body = j + 1;
                let end = memchr::memmem::find(&sql[body..], tag)?;
                i = body + end + tag.len();
                out.push(Token::Other);
            }
            b'(' => {
                out.push(Token::OpenParen);
                i += 1;
            }
            b';' => {
                out.push(Token::Semicolon);
                i += 1;
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < n && is_ident_char(sql[i]) {
                    i += 1;
                }
                let word = &sql[start..i];
                // E'...' strings take backslash escapes.
                if (word == b"E" || word == b"e") && sql.get(i) == Some(&b'\'') {
                    i = skip_string(sql, i, true)?;
                    out.push(Token::Other);
                } else {
                    out.push(Token::Word(word));
                }
            }
            _ => {
                out.push(Token::Other);
                i += 1;
            }
        }
    }
    Some(out)
}

/// The end of the quoted string that starts at `sql[at]`, or `None`.
fn skip_string(sql: &[u8], at: usize, escapes: bool) -> Option<usize> {
    let mut i = at + 1;
    loop {
        match sql.get(i)? {
            b'\'' if sql.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(i + 1),
            b'\\' if escapes => i += 2,
            // Read as an escape or not depending on a setting: unsure.
            b'\\' => return None,
            _ => i += 1,
        }
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

fn is(word: &[u8], keyword: &str) -> bool {
    word.eq_ignore_ascii_case(keyword.as_bytes())
}

fn writes(name: &[u8]) -> bool {
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    WRITING_FUNCTIONS.contains(&name.as_str())
        || WRITING_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Whether `sql` is one or more plain reads (see the module docs).
pub fn is_plain_read(sql: &[u8]) -> bool {
    let Some(tokens) = tokens(sql) else {
        return false;
    };
    let mut statements = 0;
    for stmt in tokens.split(|t| *t == Token::Semicolon) {
        let Some(first) = stmt.first() else {
            continue;
        };
        if !matches!(first, Token::Word(w) if is(w, "SELECT")) {
            return false;
        }
        statements += 1;
        for (k, t) in stmt.iter().enumerate() {
            let w = match t {
                Token::Word(w) => w,
                Token::Quoted(q) => {
                    if stmt.get(k + 1) == Some(&Token::OpenParen) && writes(q) {
                        return false;
                    }
                    continue;
                }
                _ => continue,
            };
            if is(w, "INTO") {
                return false;
            }
            if is(w, "FOR") {
                if let Some(Token::Word(next)) = stmt.get(k + 1) {
                    if ["UPDATE", "SHARE", "NO", "KEY"]
                        .iter()
                        .any(|kw| is(next, kw))
                    {
                        return false;
                    }
                }
            }
            if stmt.get(k + 1) == Some(&Token::OpenParen) && writes(w) {
                return false;
            }
        }
    }
    statements > 0
}

/// Whether the client's batch (the whole frames at the front of `bytes`,
/// with nothing after them) is a transaction a replica may serve: it starts
/// with a simple Query or a Parse of a plain read, every Query and Parse in
/// it is one, and every Bind uses a statement parsed in the same batch.
/// Frames not seen whole, COPY, function calls: the primary.
pub fn batch_is_read(mut bytes: &[u8]) -> bool {
    let mut parsed: Vec<&[u8]> = Vec::new();
    let mut first = true;
    while !bytes.is_empty() {
        let Ok(Some(h)) = parse_header(bytes, MAX_FRAME_LEN) else {
            return false;
        };
        let Some(frame) = bytes.get(..h.frame_len()) else {
            return false;
        };
        let body = &frame[5..];
        let ok = match h.tag {
            QUERY_TAG => frontend::decode_query(body).is_ok_and(is_plain_read),
            b'P' => match frontend::decode_parse(body) {
                Ok(p) if is_plain_read(p.query) => {
                    parsed.push(p.name);
                    true
                }
                _ => false,
            },
            _ if first => false,
            b'B' => frontend::bind_names(body).is_ok_and(|(_, stmt)| parsed.contains(&stmt)),
            // Describe, Execute, Close, Sync, Flush.
            b'D' | b'E' | b'C' | b'S' | b'H' => true,
            _ => false,
        };
        if !ok {
            return false;
        }
        first = false;
        bytes = &bytes[h.frame_len()..];
    }
    !first
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn plain_selects_are_reads() {
        for sql in [
            "SELECT 1",
            "select * from t where a = $1",
            "  /* hi /* nested */ */ SELECT a FROM t; ",
            "-- comment\nSELECT 'FOR UPDATE', \"into\" FROM t",
            "SELECT 1; SELECT 2;",
            "SELECT $tag$ nextval('s') ; DELETE $tag$, $$x$$",
            "SELECT E'it\\'s' || 'a''b'",
            "SELECT substring('abc' FROM 1 FOR 2)",
            "SELECT count(*) FROM pg_stat_activity",
            "SELECT now(), pg_is_in_recovery(), pg_sleep(0)",
            "SELECT a$b FROM t",
            "SELECT lower('x')",
        ] {
            assert!(is_plain_read(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn writes_and_the_unsure_are_not() {
        for sql in [
            "",
            ";",
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "BEGIN; SELECT 1",
            "SELECT 1; DELETE FROM t",
            "SELECT * FROM t FOR UPDATE",
            "select * from t for no key update",
            "SELECT * FROM t FOR SHARE",
            "SELECT * FROM t FOR KEY SHARE OF t",
            "SELECT * INTO newtable FROM t",
            "SELECT nextval('s')",
            "SELECT pg_catalog.nextval ('s')",
            "SELECT \"nextval\"('s')",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_try_advisory_xact_lock(1)",
            "SELECT lo_create(0)",
            "SELECT set_config('a.b', 'c', false)",
            "SELECT pg_notify('c', 'x')",
            "SELECT txid_current()",
            "SELECT pg_terminate_backend(1)",
            "SELECT dblink_exec('x', 'DELETE FROM t')",
            "SELECT 'unterminated",
            "SELECT $q$ unterminated",
            "SELECT /* unterminated",
            // Whether the backslash escapes depends on a setting.
            "SELECT 'a\\'; DELETE FROM t; --'",
            "VALUES (1)",
            "SHOW search_path",
            "SET search_path = x",
            "PREPARE p AS SELECT 1",
        ] {
            assert!(!is_plain_read(sql.as_bytes()), "{sql}");
        }
    }

    fn batch(build: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut b = BytesMut::new();
        build(&mut b);
        b.to_vec()
    }

    #[test]
    fn batches() {
        let q = |sql: &'static str| batch(move |b| frontend::encode_query(sql, b));
        assert!(batch_is_read(&q("SELECT 1")));
        assert!(!batch_is_read(&q("DELETE FROM t")));
        assert!(!batch_is_read(&[]));
        // A pipeline of simple queries: all must be reads.
        let mut two = q("SELECT 1");
        two.extend(q("UPDATE t SET a = 1"));
        assert!(!batch_is_read(&two));
        // Extended protocol, the way drivers send it.
        let ext = |sql: &'static str, stmt: &'static [u8], bind: &'static [u8]| {
            batch(move |b| {
                frontend::encode_parse(stmt, sql.as_bytes(), &[], b);
                frontend::encode_bind(b"", bind, &[], &[], &[], b).unwrap();
                frontend::encode_describe(b'P', b"", b);
                frontend::encode_execute(b"", 0, b);
                frontend::encode_sync(b);
            })
        };
        assert!(batch_is_read(&ext("SELECT $1::int", b"", b"")));
        assert!(batch_is_read(&ext("SELECT 1", b"s1", b"s1")));
        assert!(!batch_is_read(&ext("INSERT INTO t VALUES (1)", b"", b"")));
        // A Bind of a statement parsed in an earlier transaction: unknown text.
        assert!(!batch_is_read(&ext("SELECT 1", b"s1", b"s2")));
        // The first message must be a Query or a Parse.
        let bind_first = batch(|b| {
            frontend::encode_bind(b"", b"s1", &[], &[], &[], b).unwrap();
            frontend::encode_sync(b);
        });
        assert!(!batch_is_read(&bind_first));
        // A frame not seen whole.
        let whole = q("SELECT 1");
        assert!(!batch_is_read(&whole[..whole.len() - 1]));
        let mut trailing = q("SELECT 1");
        trailing.extend_from_slice(&q("SELECT 2")[..3]);
        assert!(!batch_is_read(&trailing));
        // Garbage lengths.
        assert!(!batch_is_read(&[b'Q', 0, 0, 0, 1, 0]));
        assert!(!batch_is_read(&[b'Q', 0xff, 0xff, 0xff, 0xff]));
    }
}
