//! Frontend (client → server) messages, and the framing helpers shared by
//! every encoder in this crate.
//!
//! Decoders take the message *body* (the bytes after the tag and the 4-byte
//! length) and return borrowed views; encoders append whole frames.

use bytes::{BufMut, BytesMut};

use crate::error::{Result, WireError};

pub const QUERY_TAG: u8 = b'Q';
pub const PARSE_TAG: u8 = b'P';
pub const BIND_TAG: u8 = b'B';
pub const DESCRIBE_TAG: u8 = b'D';
pub const CLOSE_TAG: u8 = b'C';
pub const EXECUTE_TAG: u8 = b'E';
pub const SYNC_TAG: u8 = b'S';
pub const FLUSH_TAG: u8 = b'H';
pub const TERMINATE_TAG: u8 = b'X';
pub const COPY_DATA_TAG: u8 = b'd';
pub const COPY_DONE_TAG: u8 = b'c';
pub const COPY_FAIL_TAG: u8 = b'f';
pub const FUNCTION_CALL_TAG: u8 = b'F';
/// PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse.
pub const PASSWORD_TAG: u8 = b'p';

// ---------------------------------------------------------------------------
// Framing helpers
// ---------------------------------------------------------------------------

/// Appends a length-prefixed body: reserves the 4 length bytes, lets `f` write
/// the body, then fills in the length (which counts itself) with an
/// overflow-checked conversion. On any error nothing is left appended.
pub fn write_body<F>(buf: &mut BytesMut, f: F) -> Result<()>
where
    F: FnOnce(&mut BytesMut) -> Result<()>,
{
    let base = buf.len();
    buf.put_i32(0);
    if let Err(e) = f(buf) {
        buf.truncate(base);
        return Err(e);
    }
    let len = buf.len() - base;
    let Ok(len32) = i32::try_from(len) else {
        buf.truncate(base);
        return Err(WireError::TooLarge {
            what: "message",
            len: len as u64,
            max: i32::MAX as u64,
        });
    };
    buf[base..base + 4].copy_from_slice(&len32.to_be_bytes());
    Ok(())
}

/// Appends a whole frame: `tag`, then [`write_body`]. On error nothing is
/// left appended.
pub fn write_message<F>(tag: u8, buf: &mut BytesMut, f: F) -> Result<()>
where
    F: FnOnce(&mut BytesMut) -> Result<()>,
{
    let base = buf.len();
    buf.put_u8(tag);
    let r = write_body(buf, f);
    if r.is_err() {
        buf.truncate(base);
    }
    r
}

/// Frames whose body cannot fail to encode and is far below 2 GiB in
/// practice (pooler-controlled strings). If it ever were too large, nothing
/// is appended rather than a corrupt frame.
pub(crate) fn put_message<F>(tag: u8, buf: &mut BytesMut, f: F)
where
    F: FnOnce(&mut BytesMut),
{
    let _ = write_message(tag, buf, |buf| {
        f(buf);
        Ok(())
    });
}

/// Appends `s` and a NUL terminator; rejects an embedded NUL, which would
/// corrupt the framing.
pub fn write_cstr(buf: &mut BytesMut, s: &[u8]) -> Result<()> {
    if memchr::memchr(0, s).is_some() {
        return Err(WireError::Protocol(
            "string contains an embedded NUL byte".into(),
        ));
    }
    buf.put_slice(s);
    buf.put_u8(0);
    Ok(())
}

/// For the infallible encoders whose strings are pooler-controlled: appends
/// `s` up to its first NUL (if any) and a terminator, so the frame stays
/// well-formed whatever `s` holds.
pub(crate) fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    let end = memchr::memchr(0, s).unwrap_or(s.len());
    buf.put_slice(&s[..end]);
    buf.put_u8(0);
}

/// A bounds-checked cursor over a message body. Every read checks the
/// remaining length first; nothing panics on hostile bytes.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// A NUL-terminated string, without the NUL.
    pub(crate) fn cstr(&mut self) -> Result<&'a [u8]> {
        let Some(end) = memchr::memchr(0, self.buf) else {
            return Err(WireError::Truncated(self.what));
        };
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A NUL-terminated UTF-8 string.
    pub(crate) fn str(&mut self) -> Result<&'a str> {
        let what = self.what;
        std::str::from_utf8(self.cstr()?).map_err(|_| WireError::Utf8(what))
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn i16(&mut self) -> Result<i16> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub(crate) fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Errors if bytes are left over (PostgreSQL's `pq_getmsgend`).
    pub(crate) fn finish(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Protocol(format!(
                "invalid {} message format: {} trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
}

// ---------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------

/// Simple Query. `sql` is cut at an embedded NUL (PostgreSQL would reject it).
pub fn encode_query(sql: &str, buf: &mut BytesMut) {
    put_message(QUERY_TAG, buf, |buf| put_cstr(buf, sql.as_bytes()));
}

pub fn encode_sync(buf: &mut BytesMut) {
    put_message(SYNC_TAG, buf, |_| {});
}

pub fn encode_terminate(buf: &mut BytesMut) {
    put_message(TERMINATE_TAG, buf, |_| {});
}

pub fn encode_flush(buf: &mut BytesMut) {
    put_message(FLUSH_TAG, buf, |_| {});
}

/// PasswordMessage (cleartext or md5 response): `p` + NUL-terminated password.
pub fn encode_password(password: &[u8], buf: &mut BytesMut) {
    put_message(PASSWORD_TAG, buf, |buf| put_cstr(buf, password));
}

/// SASLInitialResponse: mechanism name, then the i32 length of `data` and
/// `data` (length -1, no data, when `data` is empty).
pub fn encode_sasl_initial_response(mechanism: &str, data: &[u8], buf: &mut BytesMut) {
    let _ = write_message(PASSWORD_TAG, buf, |buf| {
        put_cstr(buf, mechanism.as_bytes());
        if data.is_empty() {
            buf.put_i32(-1);
        } else {
            let len = i32::try_from(data.len()).map_err(|_| WireError::TooLarge {
                what: "SASL data",
                len: data.len() as u64,
                max: i32::MAX as u64,
            })?;
            buf.put_i32(len);
            buf.put_slice(data);
        }
        Ok(())
    });
}

/// SASLResponse: `p` + the raw SASL data.
pub fn encode_sasl_response(data: &[u8], buf: &mut BytesMut) {
    put_message(PASSWORD_TAG, buf, |buf| buf.put_slice(data));
}

/// Parse. Names and query are cut at an embedded NUL.
pub fn encode_parse(name: &[u8], query: &[u8], param_types: &[u32], buf: &mut BytesMut) {
    let _ = write_message(PARSE_TAG, buf, |buf| {
        put_cstr(buf, name);
        put_cstr(buf, query);
        let n = i16::try_from(param_types.len()).map_err(|_| WireError::TooLarge {
            what: "Parse parameter count",
            len: param_types.len() as u64,
            max: i16::MAX as u64,
        })?;
        buf.put_i16(n);
        for &t in param_types {
            buf.put_u32(t);
        }
        Ok(())
    });
}

/// Bind. `params` entries of `None` are SQL NULL. Fails (appending nothing)
/// if a count exceeds i16 or a value exceeds i32.
pub fn encode_bind(
    portal: &[u8],
    statement: &[u8],
    param_formats: &[i16],
    params: &[Option<&[u8]>],
    result_formats: &[i16],
    buf: &mut BytesMut,
) -> Result<()> {
    fn count(n: usize) -> Result<i16> {
        i16::try_from(n).map_err(|_| WireError::TooLarge {
            what: "Bind count",
            len: n as u64,
            max: i16::MAX as u64,
        })
    }
    write_message(BIND_TAG, buf, |buf| {
        write_cstr(buf, portal)?;
        write_cstr(buf, statement)?;
        buf.put_i16(count(param_formats.len())?);
        for &f in param_formats {
            buf.put_i16(f);
        }
        buf.put_i16(count(params.len())?);
        for p in params {
            match p {
                None => buf.put_i32(-1),
                Some(v) => {
                    let len = i32::try_from(v.len()).map_err(|_| WireError::TooLarge {
                        what: "Bind parameter",
                        len: v.len() as u64,
                        max: i32::MAX as u64,
                    })?;
                    buf.put_i32(len);
                    buf.put_slice(v);
                }
            }
        }
        buf.put_i16(count(result_formats.len())?);
        for &f in result_formats {
            buf.put_i16(f);
        }
        Ok(())
    })
}

/// Describe: `kind` is `b'S'` (statement) or `b'P'` (portal).
pub fn encode_describe(kind: u8, name: &[u8], buf: &mut BytesMut) {
    put_message(DESCRIBE_TAG, buf, |buf| {
        buf.put_u8(kind);
        put_cstr(buf, name);
    });
}

/// Close: `kind` is `b'S'` (statement) or `b'P'` (portal).
pub fn encode_close(kind: u8, name: &[u8], buf: &mut BytesMut) {
    put_message(CLOSE_TAG, buf, |buf| {
        buf.put_u8(kind);
        put_cstr(buf, name);
    });
}

/// Execute: portal name and maximum row count (0 = no limit).
pub fn encode_execute(portal: &[u8], max_rows: i32, buf: &mut BytesMut) {
    put_message(EXECUTE_TAG, buf, |buf| {
        put_cstr(buf, portal);
        buf.put_i32(max_rows);
    });
}

// ---------------------------------------------------------------------------
// Decoders (bodies, after tag and length)
// ---------------------------------------------------------------------------

/// Simple Query body: the SQL text without its NUL.
pub fn decode_query(body: &[u8]) -> Result<&[u8]> {
    let mut r = Reader::new(body, "Query");
    let q = r.cstr()?;
    r.finish()?;
    Ok(q)
}

/// PasswordMessage body: the password (or md5 response) without its NUL.
pub fn decode_password(body: &[u8]) -> Result<&[u8]> {
    let mut r = Reader::new(body, "PasswordMessage");
    let p = r.cstr()?;
    r.finish()?;
    Ok(p)
}

/// SASLInitialResponse body: (mechanism, data). A data length of -1 gives
/// empty data.
pub fn decode_sasl_initial_response(body: &[u8]) -> Result<(&str, &[u8])> {
    let mut r = Reader::new(body, "SASLInitialResponse");
    let mech = r.str()?;
    let len = r.i32()?;
    let data = match len {
        -1 => &[][..],
        n if n < 0 => {
            return Err(WireError::BadLength {
                what: "SASLInitialResponse data",
                len: n as i64,
            })
        }
        n => r.bytes(n as usize)?,
    };
    r.finish()?;
    Ok((mech, data))
}

/// A borrowed view of a Parse body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseView<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    pub param_types: Vec<u32>,
}

pub fn decode_parse(body: &[u8]) -> Result<ParseView<'_>> {
    let mut r = Reader::new(body, "Parse");
    let name = r.cstr()?;
    let query = r.cstr()?;
    let n = r.i16()?;
    if n < 0 {
        return Err(WireError::BadLength {
            what: "Parse parameter count",
            len: n as i64,
        });
    }
    let n = n as usize;
    // Check before allocating: the count must match the bytes present.
    if r.remaining() != n * 4 {
        return Err(WireError::Truncated("Parse parameter types"));
    }
    let mut param_types = Vec::with_capacity(n);
    for _ in 0..n {
        param_types.push(r.u32()?);
    }
    r.finish()?;
    Ok(ParseView {
        name,
        query,
        param_types,
    })
}

/// Bind body: (portal, statement). The rest of the body is not examined.
pub fn bind_names(body: &[u8]) -> Result<(&[u8], &[u8])> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    Ok((portal, statement))
}

fn kind_and_name<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a [u8])> {
    let mut r = Reader::new(body, what);
    let kind = r.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(WireError::Protocol(format!(
            "invalid {what} target type {:?}",
            kind as char
        )));
    }
    let name = r.cstr()?;
    r.finish()?;
    Ok((kind, name))
}

/// Describe body: (`b'S'` | `b'P'`, name).
pub fn describe_target(body: &[u8]) -> Result<(u8, &[u8])> {
    kind_and_name(body, "Describe")
}

/// Close body: (`b'S'` | `b'P'`, name).
pub fn close_target(body: &[u8]) -> Result<(u8, &[u8])> {
    kind_and_name(body, "Close")
}

/// Execute body: (portal, max rows).
pub fn decode_execute(body: &[u8]) -> Result<(&[u8], i32)> {
    let mut r = Reader::new(body, "Execute");
    let portal = r.cstr()?;
    let max_rows = r.i32()?;
    r.finish()?;
    Ok((portal, max_rows))
}

/// Execute body: the portal name.
pub fn execute_portal(body: &[u8]) -> Result<&[u8]> {
    decode_execute(body).map(|(p, _)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits one frame into (tag, body), checking the length field.
    fn frame(buf: &[u8]) -> (u8, &[u8]) {
        assert!(buf.len() >= 5);
        let len = i32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, buf.len(), "length field covers the whole frame");
        (buf[0], &buf[5..])
    }

    #[test]
    fn write_body_fills_length_and_rolls_back() {
        let mut buf = BytesMut::from(&b"xx"[..]);
        write_message(b'Q', &mut buf, |b| write_cstr(b, b"hi")).unwrap();
        assert_eq!(&buf[..], b"xxQ\0\0\0\x07hi\0");
        let err = write_message(b'Q', &mut buf, |b| write_cstr(b, b"a\0b"));
        assert!(err.is_err());
        assert_eq!(&buf[..], b"xxQ\0\0\0\x07hi\0", "nothing appended on error");
    }

    #[test]
    fn query_round_trip() {
        let mut buf = BytesMut::new();
        encode_query("SELECT 1", &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, QUERY_TAG);
        assert_eq!(decode_query(body).unwrap(), b"SELECT 1");
        assert!(decode_query(b"SELECT 1").is_err());
        assert!(decode_query(b"a\0b").is_err());
    }

    #[test]
    fn nul_in_query_is_cut() {
        let mut buf = BytesMut::new();
        encode_query("SELECT 1\0; DROP", &mut buf);
        let (_, body) = frame(&buf);
        assert_eq!(decode_query(body).unwrap(), b"SELECT 1");
    }

    #[test]
    fn empty_messages() {
        for (f, tag) in [
            (encode_sync as fn(&mut BytesMut), SYNC_TAG),
            (encode_terminate, TERMINATE_TAG),
            (encode_flush, FLUSH_TAG),
        ] {
            let mut buf = BytesMut::new();
            f(&mut buf);
            assert_eq!(&buf[..], &[tag, 0, 0, 0, 4]);
        }
    }

    #[test]
    fn password_round_trip() {
        let mut buf = BytesMut::new();
        encode_password(b"md5abcdef", &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, PASSWORD_TAG);
        assert_eq!(decode_password(body).unwrap(), b"md5abcdef");
        assert!(decode_password(b"no terminator").is_err());
        assert!(decode_password(b"a\0trailing").is_err());
        assert!(decode_password(b"").is_err());
    }

    #[test]
    fn sasl_initial_response_round_trip() {
        let mut buf = BytesMut::new();
        encode_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc", &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, PASSWORD_TAG);
        assert_eq!(
            decode_sasl_initial_response(body).unwrap(),
            ("SCRAM-SHA-256", &b"n,,n=,r=abc"[..])
        );

        let mut buf = BytesMut::new();
        encode_sasl_initial_response("SCRAM-SHA-256", b"", &mut buf);
        let (_, body) = frame(&buf);
        assert_eq!(&body[body.len() - 4..], &(-1i32).to_be_bytes());
        assert_eq!(
            decode_sasl_initial_response(body).unwrap(),
            ("SCRAM-SHA-256", &b""[..])
        );

        // Hostile lengths.
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&i32::MAX.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert!(matches!(
            decode_sasl_initial_response(&body),
            Err(WireError::Truncated(_))
        ));
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&(-2i32).to_be_bytes());
        assert!(matches!(
            decode_sasl_initial_response(&body),
            Err(WireError::BadLength { .. })
        ));
        assert!(decode_sasl_initial_response(b"SCRAM").is_err());
        assert!(decode_sasl_initial_response(b"SCRAM\0\0\0").is_err());
    }

    #[test]
    fn sasl_response() {
        let mut buf = BytesMut::new();
        encode_sasl_response(b"c=biws,r=x,p=y", &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, PASSWORD_TAG);
        assert_eq!(body, b"c=biws,r=x,p=y");
    }

    #[test]
    fn parse_round_trip() {
        for (name, query, types) in [
            (&b""[..], &b"SELECT 1"[..], vec![]),
            (&b"s1"[..], &b"SELECT $1, $2"[..], vec![23u32, 0xFFFF_FFFF]),
        ] {
            let mut buf = BytesMut::new();
            encode_parse(name, query, &types, &mut buf);
            let (tag, body) = frame(&buf);
            assert_eq!(tag, PARSE_TAG);
            assert_eq!(
                decode_parse(body).unwrap(),
                ParseView {
                    name,
                    query,
                    param_types: types
                }
            );
        }
    }

    #[test]
    fn parse_hostile() {
        // Claims 32767 parameter types, has none: no allocation, an error.
        assert!(decode_parse(b"s\0q\0\x7f\xff").is_err());
        assert!(decode_parse(b"s\0q\0\xff\xff").is_err());
        assert!(decode_parse(b"s\0q\0\0\x01\0\0").is_err());
        assert!(decode_parse(b"s\0q\0\0").is_err());
        assert!(decode_parse(b"s\0q").is_err());
        assert!(decode_parse(b"s\0q\0\0\0extra").is_err());
    }

    #[test]
    fn bind_round_trip() {
        let mut buf = BytesMut::new();
        encode_bind(
            b"portal",
            b"stmt",
            &[1],
            &[Some(b"\0\0\0\x2a"), None],
            &[0],
            &mut buf,
        )
        .unwrap();
        let (tag, body) = frame(&buf);
        assert_eq!(tag, BIND_TAG);
        assert_eq!(bind_names(body).unwrap(), (&b"portal"[..], &b"stmt"[..]));
        assert!(bind_names(b"portal\0stmt").is_err());
        assert!(encode_bind(b"a\0", b"", &[], &[], &[], &mut buf).is_err());
    }

    #[test]
    fn describe_close_round_trip() {
        for kind in [b'S', b'P'] {
            let mut buf = BytesMut::new();
            encode_describe(kind, b"n1", &mut buf);
            let (tag, body) = frame(&buf);
            assert_eq!(tag, DESCRIBE_TAG);
            assert_eq!(describe_target(body).unwrap(), (kind, &b"n1"[..]));

            let mut buf = BytesMut::new();
            encode_close(kind, b"", &mut buf);
            let (tag, body) = frame(&buf);
            assert_eq!(tag, CLOSE_TAG);
            assert_eq!(close_target(body).unwrap(), (kind, &b""[..]));
        }
        assert!(describe_target(b"Xname\0").is_err());
        assert!(describe_target(b"").is_err());
        assert!(close_target(b"Sname").is_err());
    }

    #[test]
    fn execute_round_trip() {
        let mut buf = BytesMut::new();
        encode_execute(b"p1", 100, &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, EXECUTE_TAG);
        assert_eq!(decode_execute(body).unwrap(), (&b"p1"[..], 100));
        assert_eq!(execute_portal(body).unwrap(), b"p1");
        assert!(execute_portal(b"p1\0\0\0").is_err());
    }
}
