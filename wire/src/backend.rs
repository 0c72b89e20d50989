//! Backend (server → client) messages.
//!
//! Decoders take the message *body* (the bytes after the tag and the 4-byte
//! length); encoders append whole frames.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Result, WireError};
use crate::frontend::{put_cstr, put_message, Reader};

pub const AUTHENTICATION_TAG: u8 = b'R';
pub const PARAMETER_STATUS_TAG: u8 = b'S';
pub const BACKEND_KEY_DATA_TAG: u8 = b'K';
pub const READY_FOR_QUERY_TAG: u8 = b'Z';
pub const ERROR_RESPONSE_TAG: u8 = b'E';
pub const NOTICE_RESPONSE_TAG: u8 = b'N';
pub const NOTIFICATION_RESPONSE_TAG: u8 = b'A';
pub const NEGOTIATE_PROTOCOL_VERSION_TAG: u8 = b'v';
pub const COPY_IN_RESPONSE_TAG: u8 = b'G';
pub const COPY_OUT_RESPONSE_TAG: u8 = b'H';
pub const COPY_BOTH_RESPONSE_TAG: u8 = b'W';
pub const COPY_DATA_TAG: u8 = b'd';
pub const COPY_DONE_TAG: u8 = b'c';
pub const PARSE_COMPLETE_TAG: u8 = b'1';
pub const BIND_COMPLETE_TAG: u8 = b'2';
pub const CLOSE_COMPLETE_TAG: u8 = b'3';
pub const NO_DATA_TAG: u8 = b'n';
pub const PARAMETER_DESCRIPTION_TAG: u8 = b't';
pub const ROW_DESCRIPTION_TAG: u8 = b'T';
pub const DATA_ROW_TAG: u8 = b'D';
pub const COMMAND_COMPLETE_TAG: u8 = b'C';
pub const EMPTY_QUERY_TAG: u8 = b'I';
pub const PORTAL_SUSPENDED_TAG: u8 = b's';
pub const FUNCTION_CALL_RESPONSE_TAG: u8 = b'V';

/// Longest cancel key accepted (protocol 3.2 allows keys longer than 4 bytes,
/// up to 256).
pub const MAX_CANCEL_KEY_LEN: usize = 256;

const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT: i32 = 3;
const AUTH_MD5: i32 = 5;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

/// An Authentication (`R`) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    /// Any other method (Kerberos, GSS, SSPI, ...), by its code.
    Unsupported(i32),
}

impl Authentication {
    pub fn decode(body: &[u8]) -> Result<Self> {
        let mut r = Reader::new(body, "Authentication");
        let code = r.i32()?;
        let auth = match code {
            AUTH_OK => Authentication::Ok,
            AUTH_CLEARTEXT => Authentication::CleartextPassword,
            AUTH_MD5 => Authentication::Md5Password { salt: r.array()? },
            AUTH_SASL => {
                let mut mechanisms = Vec::new();
                loop {
                    let m = r.str()?;
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m.to_owned());
                }
                Authentication::Sasl { mechanisms }
            }
            AUTH_SASL_CONTINUE => Authentication::SaslContinue(Bytes::copy_from_slice(r.rest())),
            AUTH_SASL_FINAL => Authentication::SaslFinal(Bytes::copy_from_slice(r.rest())),
            other => {
                r.rest();
                Authentication::Unsupported(other)
            }
        };
        r.finish()?;
        Ok(auth)
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        put_message(AUTHENTICATION_TAG, buf, |buf| match self {
            Authentication::Ok => buf.put_i32(AUTH_OK),
            Authentication::CleartextPassword => buf.put_i32(AUTH_CLEARTEXT),
            Authentication::Md5Password { salt } => {
                buf.put_i32(AUTH_MD5);
                buf.put_slice(salt);
            }
            Authentication::Sasl { mechanisms } => {
                buf.put_i32(AUTH_SASL);
                for m in mechanisms {
                    put_cstr(buf, m.as_bytes());
                }
                buf.put_u8(0);
            }
            Authentication::SaslContinue(data) => {
                buf.put_i32(AUTH_SASL_CONTINUE);
                buf.put_slice(data);
            }
            Authentication::SaslFinal(data) => {
                buf.put_i32(AUTH_SASL_FINAL);
                buf.put_slice(data);
            }
            Authentication::Unsupported(code) => buf.put_i32(*code),
        });
    }
}

/// ParameterStatus body: (name, value).
pub fn decode_parameter_status(body: &[u8]) -> Result<(&str, &str)> {
    let mut r = Reader::new(body, "ParameterStatus");
    let name = r.str()?;
    let value = r.str()?;
    r.finish()?;
    Ok((name, value))
}

pub fn encode_parameter_status(name: &str, value: &str, buf: &mut BytesMut) {
    put_message(PARAMETER_STATUS_TAG, buf, |buf| {
        put_cstr(buf, name.as_bytes());
        put_cstr(buf, value.as_bytes());
    });
}

/// BackendKeyData: process id and cancel key (4 bytes in 3.0, up to 256 in 3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendKeyData {
    pub process_id: i32,
    pub secret: Bytes,
}

impl BackendKeyData {
    pub fn decode(body: &[u8]) -> Result<Self> {
        let mut r = Reader::new(body, "BackendKeyData");
        let process_id = r.i32()?;
        let secret = r.rest();
        if secret.len() < 4 || secret.len() > MAX_CANCEL_KEY_LEN {
            return Err(WireError::BadLength {
                what: "BackendKeyData secret key",
                len: secret.len() as i64,
            });
        }
        Ok(BackendKeyData {
            process_id,
            secret: Bytes::copy_from_slice(secret),
        })
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        put_message(BACKEND_KEY_DATA_TAG, buf, |buf| {
            buf.put_i32(self.process_id);
            buf.put_slice(&self.secret);
        });
    }
}

/// ReadyForQuery body: the transaction status `b'I'`, `b'T'` or `b'E'`.
pub fn decode_ready_for_query(body: &[u8]) -> Result<u8> {
    match body {
        [s @ (b'I' | b'T' | b'E')] => Ok(*s),
        [s] => Err(WireError::Protocol(format!(
            "invalid ReadyForQuery status {s:#04x}"
        ))),
        _ => Err(WireError::BadLength {
            what: "ReadyForQuery",
            len: body.len() as i64,
        }),
    }
}

pub fn encode_ready_for_query(status: u8, buf: &mut BytesMut) {
    put_message(READY_FOR_QUERY_TAG, buf, |buf| buf.put_u8(status));
}

/// The type OID of `text`: every column the pooler describes itself is text.
pub const TEXT_OID: u32 = 25;

/// RowDescription for columns of type `text`, text format (what a virtual
/// database such as the admin console answers with). Names are cut at an
/// embedded NUL.
pub fn encode_row_description(columns: &[&str], buf: &mut BytesMut) {
    put_message(ROW_DESCRIPTION_TAG, buf, |buf| {
        buf.put_i16(i16::try_from(columns.len()).unwrap_or(i16::MAX));
        for name in columns.iter().take(i16::MAX as usize) {
            put_cstr(buf, name.as_bytes());
            buf.put_u32(0); // table OID
            buf.put_i16(0); // column number
            buf.put_u32(TEXT_OID);
            buf.put_i16(-1); // variable length
            buf.put_i32(-1); // no type modifier
            buf.put_i16(0); // text format
        }
    });
}

/// RowDescription body: the column names (the pooler's own use: tests, and
/// checking what it sent).
pub fn decode_row_description(body: &[u8]) -> Result<Vec<String>> {
    let mut r = Reader::new(body, "RowDescription");
    let n = r.i16()?;
    // Each column takes at least 19 bytes: bound the count before allocating.
    if n < 0 || n as usize > r.remaining() / 19 {
        return Err(WireError::BadLength {
            what: "RowDescription column count",
            len: i64::from(n),
        });
    }
    let mut names = Vec::with_capacity(n as usize);
    for _ in 0..n {
        names.push(String::from_utf8_lossy(r.cstr()?).into_owned());
        r.bytes(18)?;
    }
    r.finish()?;
    Ok(names)
}

/// DataRow: each value in text format, `None` as NULL.
pub fn encode_data_row(values: &[Option<&str>], buf: &mut BytesMut) {
    put_message(DATA_ROW_TAG, buf, |buf| {
        buf.put_i16(i16::try_from(values.len()).unwrap_or(i16::MAX));
        for v in values.iter().take(i16::MAX as usize) {
            match v {
                Some(v) => {
                    buf.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                    buf.put_slice(&v.as_bytes()[..v.len().min(i32::MAX as usize)]);
                }
                None => buf.put_i32(-1),
            }
        }
    });
}

/// DataRow body: the values (`None` = NULL), lossy UTF-8.
pub fn decode_data_row(body: &[u8]) -> Result<Vec<Option<String>>> {
    let mut r = Reader::new(body, "DataRow");
    let n = r.i16()?;
    // Each value takes at least its 4-byte length.
    if n < 0 || n as usize > r.remaining() / 4 {
        return Err(WireError::BadLength {
            what: "DataRow column count",
            len: i64::from(n),
        });
    }
    let mut values = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = r.i32()?;
        if len < 0 {
            values.push(None);
            continue;
        }
        let v = r.bytes(len as usize)?;
        values.push(Some(String::from_utf8_lossy(v).into_owned()));
    }
    r.finish()?;
    Ok(values)
}

/// CommandComplete with its command tag (`SHOW`, `SELECT 3`, `PAUSE`).
pub fn encode_command_complete(tag: &str, buf: &mut BytesMut) {
    put_message(COMMAND_COMPLETE_TAG, buf, |buf| {
        put_cstr(buf, tag.as_bytes())
    });
}

/// CommandComplete body: the command tag.
pub fn decode_command_complete(body: &[u8]) -> Result<&str> {
    let mut r = Reader::new(body, "CommandComplete");
    let tag = r.cstr()?;
    r.finish()?;
    std::str::from_utf8(tag).map_err(|_| WireError::Protocol("command tag is not UTF-8".into()))
}

/// EmptyQueryResponse: the answer to a query string with no statement.
pub fn encode_empty_query(buf: &mut BytesMut) {
    put_message(EMPTY_QUERY_TAG, buf, |_| {});
}

/// ErrorResponse / NoticeResponse fields, as (field code, value). Values are
/// decoded as lossy UTF-8, so bad bytes never make decoding fail.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    pub fields: Vec<(u8, String)>,
}

impl ErrorFields {
    pub fn decode(body: &[u8]) -> Result<Self> {
        let mut r = Reader::new(body, "ErrorResponse");
        let mut fields = Vec::new();
        loop {
            let code = r.u8()?;
            if code == 0 {
                break;
            }
            let value = r.cstr()?;
            fields.push((code, String::from_utf8_lossy(value).into_owned()));
        }
        r.finish()?;
        Ok(ErrorFields { fields })
    }

    /// The first field with this code.
    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }

    /// The non-localized severity (`V`), else the localized one (`S`).
    pub fn severity(&self) -> Option<&str> {
        self.get(b'V').or_else(|| self.get(b'S'))
    }

    /// The SQLSTATE (`C`).
    pub fn code(&self) -> Option<&str> {
        self.get(b'C')
    }

    /// The primary message (`M`).
    pub fn message(&self) -> Option<&str> {
        self.get(b'M')
    }

    /// Appends a frame with this tag (ERROR_RESPONSE_TAG or
    /// NOTICE_RESPONSE_TAG). Fields with code 0 are skipped (it would end
    /// the list); values are cut at an embedded NUL.
    pub fn encode(&self, tag: u8, buf: &mut BytesMut) {
        put_message(tag, buf, |buf| {
            for (code, value) in &self.fields {
                if *code == 0 {
                    continue;
                }
                buf.put_u8(*code);
                put_cstr(buf, value.as_bytes());
            }
            buf.put_u8(0);
        });
    }
}

fn encode_error_like(tag: u8, severity: &str, sqlstate: &str, message: &str, buf: &mut BytesMut) {
    put_message(tag, buf, |buf| {
        for (code, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', sqlstate),
            (b'M', message),
        ] {
            buf.put_u8(code);
            put_cstr(buf, value.as_bytes());
        }
        buf.put_u8(0);
    });
}

/// A whole ErrorResponse frame with `S` and `V` = severity, `C` = sqlstate,
/// `M` = message.
pub fn encode_error(severity: &str, sqlstate: &str, message: &str, buf: &mut BytesMut) {
    encode_error_like(ERROR_RESPONSE_TAG, severity, sqlstate, message, buf);
}

/// A whole NoticeResponse frame, fields as in [`encode_error`].
pub fn encode_notice(severity: &str, sqlstate: &str, message: &str, buf: &mut BytesMut) {
    encode_error_like(NOTICE_RESPONSE_TAG, severity, sqlstate, message, buf);
}

/// NegotiateProtocolVersion: the newest minor version supported (for the
/// requested major) and the protocol options (`_pq_.*`) not recognized.
pub fn encode_negotiate_protocol_version(
    newest_minor: i32,
    unrecognized: &[&str],
    buf: &mut BytesMut,
) {
    put_message(NEGOTIATE_PROTOCOL_VERSION_TAG, buf, |buf| {
        buf.put_i32(newest_minor);
        buf.put_i32(i32::try_from(unrecognized.len()).unwrap_or(i32::MAX));
        for o in unrecognized {
            put_cstr(buf, o.as_bytes());
        }
    });
}

/// NegotiateProtocolVersion body: (newest minor, unrecognized options).
pub fn decode_negotiate_protocol_version(body: &[u8]) -> Result<(i32, Vec<&str>)> {
    let mut r = Reader::new(body, "NegotiateProtocolVersion");
    let minor = r.i32()?;
    let n = r.i32()?;
    // Each option takes at least one byte: bound the count before allocating.
    if n < 0 || n as usize > r.remaining() {
        return Err(WireError::BadLength {
            what: "NegotiateProtocolVersion option count",
            len: n as i64,
        });
    }
    let mut opts = Vec::with_capacity(n as usize);
    for _ in 0..n {
        opts.push(r.str()?);
    }
    r.finish()?;
    Ok((minor, opts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(buf: &[u8]) -> (u8, &[u8]) {
        assert!(buf.len() >= 5);
        let len = i32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, buf.len(), "length field covers the whole frame");
        (buf[0], &buf[5..])
    }

    #[test]
    fn result_set_round_trip() {
        let mut buf = BytesMut::new();
        encode_row_description(&["database", "cl_active", ""], &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, ROW_DESCRIPTION_TAG);
        assert_eq!(
            decode_row_description(body).unwrap(),
            ["database", "cl_active", ""]
        );
        // Each column: name, table OID, column, type OID (text), size, modifier, format.
        assert_eq!(&body[2..11], b"database\0");
        assert_eq!(&body[15..21], &[0, 0, 0, 0, 0, 25]);

        let row = [Some("t1"), None, Some(""), Some("ünï")];
        let mut buf = BytesMut::new();
        encode_data_row(&row, &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, DATA_ROW_TAG);
        let back = decode_data_row(body).unwrap();
        assert_eq!(
            back,
            row.iter().map(|v| v.map(String::from)).collect::<Vec<_>>()
        );

        let mut buf = BytesMut::new();
        encode_command_complete("SHOW", &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, COMMAND_COMPLETE_TAG);
        assert_eq!(decode_command_complete(body).unwrap(), "SHOW");

        let mut buf = BytesMut::new();
        encode_empty_query(&mut buf);
        assert_eq!(frame(&buf), (EMPTY_QUERY_TAG, &[][..]));
    }

    #[test]
    fn result_set_decoders_refuse_bad_lengths() {
        // A column count far beyond the body, a negative one, a value past the end.
        assert!(decode_row_description(&[0x7f, 0xff, b'a', 0]).is_err());
        assert!(decode_row_description(&[0xff, 0xff]).is_err());
        assert!(decode_data_row(&[0x7f, 0xff, 0, 0, 0, 1]).is_err());
        assert!(decode_data_row(&[0, 1, 0, 0, 0, 9, b'x']).is_err());
        assert!(decode_data_row(&[0, 1, 0xff, 0xff, 0xff, 0xff, b'x']).is_err());
        assert!(decode_command_complete(b"SHOW").is_err());
    }

    #[test]
    fn authentication_round_trip() {
        let all = [
            Authentication::Ok,
            Authentication::CleartextPassword,
            Authentication::Md5Password { salt: [1, 2, 3, 4] },
            Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()],
            },
            Authentication::Sasl { mechanisms: vec![] },
            Authentication::SaslContinue(Bytes::from_static(b"r=abc,s=c2FsdA==,i=4096")),
            Authentication::SaslFinal(Bytes::from_static(b"v=xyz")),
            Authentication::Unsupported(7),
        ];
        for a in all {
            let mut buf = BytesMut::new();
            a.encode(&mut buf);
            let (tag, body) = frame(&buf);
            assert_eq!(tag, AUTHENTICATION_TAG);
            assert_eq!(Authentication::decode(body).unwrap(), a);
        }
    }

    #[test]
    fn authentication_wire_bytes() {
        let mut buf = BytesMut::new();
        Authentication::Ok.encode(&mut buf);
        assert_eq!(&buf[..], b"R\0\0\0\x08\0\0\0\0");
        let mut buf = BytesMut::new();
        Authentication::Sasl {
            mechanisms: vec!["SCRAM-SHA-256".into()],
        }
        .encode(&mut buf);
        assert_eq!(&buf[..], b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0");
    }

    #[test]
    fn authentication_hostile() {
        assert!(Authentication::decode(b"").is_err());
        assert!(Authentication::decode(b"\0\0\0").is_err());
        assert!(Authentication::decode(b"\0\0\0\0x").is_err());
        assert!(Authentication::decode(b"\0\0\0\x05\x01\x02").is_err());
        assert!(Authentication::decode(b"\0\0\0\x05\x01\x02\x03\x04\x05").is_err());
        assert!(Authentication::decode(b"\0\0\0\x0aSCRAM-SHA-256\0").is_err());
        assert!(Authentication::decode(b"\0\0\0\x0a\xff\0\0").is_err());
    }

    #[test]
    fn parameter_status_round_trip() {
        let mut buf = BytesMut::new();
        encode_parameter_status("server_version", "15.4", &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, PARAMETER_STATUS_TAG);
        assert_eq!(
            decode_parameter_status(body).unwrap(),
            ("server_version", "15.4")
        );
        assert!(decode_parameter_status(b"a\0b").is_err());
        assert!(decode_parameter_status(b"a\0b\0c").is_err());
        assert!(decode_parameter_status(b"\xff\0b\0").is_err());
    }

    #[test]
    fn backend_key_data_round_trip() {
        for secret in [vec![1u8, 2, 3, 4], vec![9u8; 32], vec![7u8; 256]] {
            let k = BackendKeyData {
                process_id: -5,
                secret: Bytes::from(secret),
            };
            let mut buf = BytesMut::new();
            k.encode(&mut buf);
            let (tag, body) = frame(&buf);
            assert_eq!(tag, BACKEND_KEY_DATA_TAG);
            assert_eq!(BackendKeyData::decode(body).unwrap(), k);
        }
        assert!(BackendKeyData::decode(b"\0\0\0\x01abc").is_err());
        assert!(BackendKeyData::decode(&[0u8; 4 + 257]).is_err());
        assert!(BackendKeyData::decode(b"\0\0").is_err());
    }

    #[test]
    fn ready_for_query_round_trip() {
        for s in [b'I', b'T', b'E'] {
            let mut buf = BytesMut::new();
            encode_ready_for_query(s, &mut buf);
            let (tag, body) = frame(&buf);
            assert_eq!(tag, READY_FOR_QUERY_TAG);
            assert_eq!(decode_ready_for_query(body).unwrap(), s);
        }
        assert!(decode_ready_for_query(b"X").is_err());
        assert!(decode_ready_for_query(b"").is_err());
        assert!(decode_ready_for_query(b"II").is_err());
    }

    #[test]
    fn error_round_trip() {
        let mut buf = BytesMut::new();
        encode_error("FATAL", "28P01", "password authentication failed", &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, ERROR_RESPONSE_TAG);
        let f = ErrorFields::decode(body).unwrap();
        assert_eq!(f.severity(), Some("FATAL"));
        assert_eq!(f.get(b'S'), Some("FATAL"));
        assert_eq!(f.code(), Some("28P01"));
        assert_eq!(f.message(), Some("password authentication failed"));

        let mut again = BytesMut::new();
        f.encode(ERROR_RESPONSE_TAG, &mut again);
        assert_eq!(again, buf);

        let mut buf = BytesMut::new();
        encode_notice("WARNING", "01000", "careful", &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, NOTICE_RESPONSE_TAG);
        let f = ErrorFields::decode(body).unwrap();
        assert_eq!(f.code(), Some("01000"));
    }

    #[test]
    fn error_fields_lossy_and_hostile() {
        // Localized severity only, bad UTF-8 in the message.
        let f = ErrorFields::decode(b"SFEHLER\0M\xff\xfe\0\0").unwrap();
        assert_eq!(f.severity(), Some("FEHLER"));
        assert_eq!(f.message(), Some("\u{fffd}\u{fffd}"));
        assert_eq!(f.code(), None);
        assert!(ErrorFields::decode(b"").is_err());
        assert!(ErrorFields::decode(b"Sx\0").is_err());
        assert!(ErrorFields::decode(b"Sx").is_err());
        assert!(ErrorFields::decode(b"Sx\0\0junk").is_err());
        assert_eq!(ErrorFields::decode(b"\0").unwrap(), ErrorFields::default());
    }

    #[test]
    fn negotiate_protocol_version_round_trip() {
        let mut buf = BytesMut::new();
        encode_negotiate_protocol_version(0, &["_pq_.foo", "_pq_.bar"], &mut buf);
        let (tag, body) = frame(&buf);
        assert_eq!(tag, NEGOTIATE_PROTOCOL_VERSION_TAG);
        assert_eq!(
            decode_negotiate_protocol_version(body).unwrap(),
            (0, vec!["_pq_.foo", "_pq_.bar"])
        );
        assert!(decode_negotiate_protocol_version(b"\0\0\0\0\x7f\xff\xff\xff").is_err());
        assert!(decode_negotiate_protocol_version(b"\0\0\0\0\xff\xff\xff\xff").is_err());
    }
}
