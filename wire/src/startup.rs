//! The client's first packets: StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest. They carry no type byte: an i32 length (counting itself),
//! then an i32 code.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::backend::MAX_CANCEL_KEY_LEN;
use crate::error::{Result, WireError};
use crate::frontend::{put_cstr, write_body, Reader};

/// A startup packet claiming more than this is hostile: rejected from its
/// 4 length bytes alone, before waiting for (or allocating) the body.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Protocol 3.0.
pub const PROTOCOL_V3: u32 = 196608;
pub const SSL_REQUEST_CODE: u32 = 80877103;
pub const GSSENC_REQUEST_CODE: u32 = 80877104;
pub const CANCEL_REQUEST_CODE: u32 = 80877102;

/// One startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelRequest),
    Startup(StartupMessage),
}

/// A CancelRequest: process id and cancel key (4 bytes in protocol 3.0, up to
/// 256 in 3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    pub process_id: i32,
    pub secret: Bytes,
}

/// A StartupMessage: protocol version and parameters in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    /// The value of a parameter. When a name repeats, the last one wins, as
    /// in PostgreSQL.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn user(&self) -> Option<&str> {
        self.get("user")
    }

    /// `database` as sent; the caller defaults it to the user.
    pub fn database(&self) -> Option<&str> {
        self.get("database")
    }

    /// Protocol options (names starting with `_pq_.`), for
    /// NegotiateProtocolVersion.
    pub fn protocol_options(&self) -> Vec<&str> {
        self.params
            .iter()
            .filter(|(n, _)| n.starts_with("_pq_."))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// The `options` parameter split into tokens as PostgreSQL does
    /// (`pg_split_opts`): whitespace separates, a backslash escapes the next
    /// character. Empty if absent.
    pub fn option_tokens(&self) -> Vec<String> {
        self.get("options").map(split_options).unwrap_or_default()
    }

    /// Finds a `key=value` setting in `options`, given as `key=value`,
    /// `-c key=value`, `-ckey=value` or `--key=value`. Dashes and
    /// underscores in the key are treated alike (PostgreSQL turns
    /// `--foo-bar=x` into `foo_bar`). The last occurrence wins.
    pub fn option_value(&self, key: &str) -> Option<String> {
        let want = normalize_key(key);
        let tokens = self.option_tokens();
        let mut found = None;
        let mut i = 0;
        while i < tokens.len() {
            let tok = tokens[i].as_str();
            let setting = if tok == "-c" {
                i += 1;
                tokens.get(i).map(String::as_str)
            } else if let Some(s) = tok.strip_prefix("--") {
                Some(s)
            } else if let Some(s) = tok.strip_prefix("-c") {
                Some(s)
            } else if tok.starts_with('-') {
                None
            } else {
                Some(tok)
            };
            if let Some((k, v)) = setting.and_then(|s| s.split_once('=')) {
                if normalize_key(k) == want {
                    found = Some(v.to_owned());
                }
            }
            i += 1;
        }
        found
    }
}

fn normalize_key(k: &str) -> String {
    k.replace('-', "_")
}

/// Splits a libpq `options` string like PostgreSQL's `pg_split_opts`.
pub fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut tok = String::new();
        let mut escaped = false;
        while let Some(&c) = chars.peek() {
            if c.is_ascii_whitespace() && !escaped {
                break;
            }
            chars.next();
            if !escaped && c == '\\' {
                escaped = true;
            } else {
                escaped = false;
                tok.push(c);
            }
        }
        out.push(tok);
    }
    out
}

/// Decodes one startup-phase packet from the front of `buf`, consuming it.
/// `Ok(None)` if more bytes are needed (nothing is consumed).
///
/// A length under 8 or over [`MAX_STARTUP_LEN`], and an unknown request code,
/// are rejected as soon as the first 4 (respectively 8) bytes are present.
/// A 3.x minor above 0 is accepted: the caller answers
/// NegotiateProtocolVersion.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(WireError::BadLength {
            what: "startup packet",
            len: len as i64,
        });
    }
    let len = len as usize;
    if len > MAX_STARTUP_LEN {
        return Err(WireError::TooLarge {
            what: "startup packet",
            len: len as u64,
            max: MAX_STARTUP_LEN as u64,
        });
    }
    if buf.len() < 8 {
        return Ok(None);
    }
    let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    // Decide on the code and the length before waiting for the body.
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if len != 8 => {
            return Err(WireError::BadLength {
                what: "SSL/GSSENC request",
                len: len as i64,
            })
        }
        CANCEL_REQUEST_CODE if !(12 + 4..=12 + MAX_CANCEL_KEY_LEN).contains(&len) => {
            return Err(WireError::BadLength {
                what: "cancel request",
                len: len as i64,
            })
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {}
        _ => {
            let (major, minor) = ((code >> 16) as u16, code as u16);
            if major != 3 {
                return Err(WireError::UnsupportedProtocol { major, minor });
            }
        }
    }
    if buf.len() < len {
        return Ok(None);
    }
    let packet = buf.split_to(len).freeze();
    let body = &packet[8..];
    Ok(Some(match code {
        SSL_REQUEST_CODE => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE => StartupPacket::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            let mut b = packet.slice(8..);
            let process_id = b.get_i32();
            StartupPacket::Cancel(CancelRequest {
                process_id,
                secret: b,
            })
        }
        _ => StartupPacket::Startup(decode_params((code >> 16) as u16, code as u16, body)?),
    }))
}

fn decode_params(major: u16, minor: u16, body: &[u8]) -> Result<StartupMessage> {
    let mut r = Reader::new(body, "startup packet");
    // Two NULs per parameter and one at the end: one allocation for the
    // list (capped: a packet of NULs must not reserve much).
    let mut params = Vec::with_capacity((memchr::memchr_iter(0, body).count() / 2).min(32));
    loop {
        let name = r.str()?;
        if name.is_empty() {
            break;
        }
        let value = r.str()?;
        params.push((name.to_owned(), value.to_owned()));
    }
    if !r.is_empty() {
        return Err(WireError::Protocol(
            "invalid startup packet layout: expected terminator as last byte".into(),
        ));
    }
    let msg = StartupMessage {
        major,
        minor,
        params,
    };
    if msg.user().is_none_or(str::is_empty) {
        return Err(WireError::MissingField("user"));
    }
    Ok(msg)
}

/// A protocol 3.0 StartupMessage with these parameters (strings are cut at
/// an embedded NUL).
pub fn encode_startup(params: &[(&str, &str)], buf: &mut BytesMut) {
    let _ = write_body(buf, |buf| {
        buf.put_u32(PROTOCOL_V3);
        for (name, value) in params {
            put_cstr(buf, name.as_bytes());
            put_cstr(buf, value.as_bytes());
        }
        buf.put_u8(0);
        Ok(())
    });
}

pub fn encode_ssl_request(buf: &mut BytesMut) {
    buf.put_i32(8);
    buf.put_u32(SSL_REQUEST_CODE);
}

pub fn encode_gssenc_request(buf: &mut BytesMut) {
    buf.put_i32(8);
    buf.put_u32(GSSENC_REQUEST_CODE);
}

/// A CancelRequest. `secret` is 4 bytes in protocol 3.0 (a longer key is
/// sent as is).
pub fn encode_cancel_request(process_id: i32, secret: &[u8], buf: &mut BytesMut) {
    let _ = write_body(buf, |buf| {
        buf.put_u32(CANCEL_REQUEST_CODE);
        buf.put_i32(process_id);
        buf.put_slice(secret);
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(code: u32, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_i32((8 + body.len()) as i32);
        b.put_u32(code);
        b.put_slice(body);
        b
    }

    #[test]
    fn startup_round_trip() {
        let params = [
            ("user", "postgres"),
            ("database", "app"),
            ("options", "-c search_path=x --reference=acme"),
            ("application_name", "psql"),
        ];
        let mut buf = BytesMut::new();
        encode_startup(&params, &mut buf);
        buf.put_slice(b"next");
        let p = decode_startup(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..], b"next", "exactly one packet consumed");
        let StartupPacket::Startup(m) = p else {
            panic!("not a startup message: {p:?}")
        };
        assert_eq!((m.major, m.minor), (3, 0));
        let got: Vec<(&str, &str)> = m
            .params
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(got, params);
        assert_eq!(m.user(), Some("postgres"));
        assert_eq!(m.database(), Some("app"));
        assert_eq!(m.get("application_name"), Some("psql"));
        assert_eq!(m.get("nope"), None);
        assert!(m.protocol_options().is_empty());
        assert_eq!(m.option_value("reference").as_deref(), Some("acme"));
        assert_eq!(m.option_value("search_path").as_deref(), Some("x"));
        assert_eq!(m.option_value("other"), None);
    }

    #[test]
    fn ssl_gss_cancel_round_trip() {
        let mut buf = BytesMut::new();
        encode_ssl_request(&mut buf);
        encode_gssenc_request(&mut buf);
        encode_cancel_request(42, &[1, 2, 3, 4], &mut buf);
        encode_cancel_request(-1, &[5; 32], &mut buf);
        assert_eq!(&buf[..8], b"\0\0\0\x08\x04\xd2\x16\x2f");
        assert_eq!(
            decode_startup(&mut buf).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        assert_eq!(
            decode_startup(&mut buf).unwrap(),
            Some(StartupPacket::GssEncRequest)
        );
        assert_eq!(
            decode_startup(&mut buf).unwrap(),
            Some(StartupPacket::Cancel(CancelRequest {
                process_id: 42,
                secret: Bytes::from_static(&[1, 2, 3, 4])
            }))
        );
        assert_eq!(
            decode_startup(&mut buf).unwrap(),
            Some(StartupPacket::Cancel(CancelRequest {
                process_id: -1,
                secret: Bytes::from(vec![5; 32])
            }))
        );
        assert!(buf.is_empty());
        assert_eq!(decode_startup(&mut buf).unwrap(), None);
    }

    #[test]
    fn protocol_3_2_is_accepted() {
        let mut buf = startup_bytes(196610, b"user\0u\0_pq_.command_trigger\0on\0_pq_.x\0y\0\0");
        let Some(StartupPacket::Startup(m)) = decode_startup(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!((m.major, m.minor), (3, 2));
        assert_eq!(m.protocol_options(), vec!["_pq_.command_trigger", "_pq_.x"]);
        assert_eq!(m.database(), None);
    }

    #[test]
    fn hostile_lengths_rejected_from_header_alone() {
        // Claims 1 GiB with only 8 bytes present: error now, no waiting.
        let mut buf = BytesMut::new();
        buf.put_i32(1 << 30);
        buf.put_u32(PROTOCOL_V3);
        assert!(matches!(
            decode_startup(&mut buf),
            Err(WireError::TooLarge { .. })
        ));
        // Even with only the 4 length bytes.
        let mut buf = BytesMut::from(&(1i32 << 30).to_be_bytes()[..]);
        assert!(matches!(
            decode_startup(&mut buf),
            Err(WireError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&((MAX_STARTUP_LEN + 1) as i32).to_be_bytes()[..]);
        assert!(decode_startup(&mut buf).is_err());
        for len in [-1i32, 0, 4, 7, i32::MIN] {
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            assert!(
                matches!(decode_startup(&mut buf), Err(WireError::BadLength { .. })),
                "{len}"
            );
        }
        // SSLRequest with a body, cancel with a short or huge key.
        let mut buf = startup_bytes(SSL_REQUEST_CODE, b"x");
        assert!(decode_startup(&mut buf).is_err());
        let mut buf = startup_bytes(CANCEL_REQUEST_CODE, b"\0\0\0\x01ab");
        assert!(decode_startup(&mut buf).is_err());
        let mut buf = BytesMut::new();
        buf.put_i32(12 + 257);
        buf.put_u32(CANCEL_REQUEST_CODE);
        assert!(decode_startup(&mut buf).is_err());
    }

    #[test]
    fn truncated_packets_need_more() {
        let mut full = BytesMut::new();
        encode_startup(&[("user", "alice")], &mut full);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(decode_startup(&mut part).unwrap(), None, "cut at {cut}");
            assert_eq!(part.len(), cut, "nothing consumed");
        }
        let mut full = BytesMut::new();
        encode_cancel_request(1, &[1, 2, 3, 4], &mut full);
        let mut part = BytesMut::from(&full[..12]);
        assert_eq!(decode_startup(&mut part).unwrap(), None);
    }

    #[test]
    fn bad_codes_and_layouts() {
        // Unknown code / protocol 2.0 / 4.0: rejected from the 8 header bytes.
        for code in [0x0002_0000u32, 0x0004_0000, 1234 << 16 | 9999, 0] {
            let mut buf = BytesMut::new();
            buf.put_i32(100);
            buf.put_u32(code);
            assert!(
                matches!(
                    decode_startup(&mut buf),
                    Err(WireError::UnsupportedProtocol { .. })
                ),
                "{code}"
            );
        }
        // Missing final terminator.
        let mut buf = startup_bytes(PROTOCOL_V3, b"user\0u\0");
        assert!(decode_startup(&mut buf).is_err());
        // Value without NUL.
        let mut buf = startup_bytes(PROTOCOL_V3, b"user\0u");
        assert!(decode_startup(&mut buf).is_err());
        // Name without value.
        let mut buf = startup_bytes(PROTOCOL_V3, b"user\0");
        assert!(decode_startup(&mut buf).is_err());
        // Bytes after the terminator.
        let mut buf = startup_bytes(PROTOCOL_V3, b"user\0u\0\0x");
        assert!(decode_startup(&mut buf).is_err());
        // No parameters at all (length 8).
        let mut buf = startup_bytes(PROTOCOL_V3, b"");
        assert!(decode_startup(&mut buf).is_err());
        // No user, empty user.
        let mut buf = startup_bytes(PROTOCOL_V3, b"database\0d\0\0");
        assert!(matches!(
            decode_startup(&mut buf),
            Err(WireError::MissingField("user"))
        ));
        let mut buf = startup_bytes(PROTOCOL_V3, b"user\0\0\0");
        assert!(matches!(
            decode_startup(&mut buf),
            Err(WireError::MissingField("user"))
        ));
        // Non-UTF-8.
        let mut buf = startup_bytes(PROTOCOL_V3, b"user\0\xff\0\0");
        assert!(matches!(decode_startup(&mut buf), Err(WireError::Utf8(_))));
    }

    #[test]
    fn last_duplicate_wins() {
        let mut buf = startup_bytes(PROTOCOL_V3, b"user\0a\0user\0b\0\0");
        let Some(StartupPacket::Startup(m)) = decode_startup(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(m.user(), Some("b"));
    }

    #[test]
    fn options_parsing() {
        assert_eq!(
            split_options("  -c search_path=a\\ b   --x=y\\\\z\t-c\\ "),
            vec!["-c", "search_path=a b", "--x=y\\z", "-c "]
        );
        assert_eq!(split_options("a\\"), vec!["a"]);
        assert!(split_options("   ").is_empty());

        let m = |opts: &str| StartupMessage {
            major: 3,
            minor: 0,
            params: vec![("user".into(), "u".into()), ("options".into(), opts.into())],
        };
        for opts in [
            "reference=acme",
            "-c reference=acme",
            "-creference=acme",
            "--reference=acme",
            "-c statement_timeout=5 --reference=acme -c work_mem=64MB",
            "--reference=old -c reference=acme",
        ] {
            assert_eq!(
                m(opts).option_value("reference").as_deref(),
                Some("acme"),
                "{opts}"
            );
        }
        assert_eq!(
            m("--search-path=a\\ b")
                .option_value("search_path")
                .as_deref(),
            Some("a b")
        );
        assert_eq!(m("-c").option_value("reference"), None);
        assert_eq!(m("-X reference").option_value("reference"), None);
        assert_eq!(m("").option_tokens(), Vec::<String>::new());
    }
}
