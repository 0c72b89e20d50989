//! The opening handshake (RFC 6455 §4.2): an HTTP/1.1 `GET` with
//! `Upgrade: websocket`, answered `101 Switching Protocols` with the
//! `Sec-WebSocket-Accept` of the client's key, or refused with a plain HTTP
//! error whose body says why.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The request head may not be larger (request line and headers).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Nor have more header lines.
const MAX_HEADERS: usize = 64;
/// RFC 6455's GUID appended to the key before hashing.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A refused upgrade: the HTTP status and the reason for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("HTTP {status}: {reason}")]
pub struct Refused {
    pub status: u16,
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> Refused {
    Refused {
        status: 400,
        reason,
    }
}

/// What a valid upgrade request says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade<'a> {
    /// The request target: path and query, as sent.
    pub target: &'a str,
    /// `Sec-WebSocket-Key`.
    pub key: &'a str,
    pub host: Option<&'a str>,
}

impl Upgrade<'_> {
    /// A query parameter of the target, percent-decoded (`+` is a space);
    /// the first occurrence wins.
    pub fn query(&self, name: &str) -> Option<String> {
        let (_, query) = self.target.split_once('?')?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k)? == name)
                .then(|| percent_decode(v))
                .flatten()
        })
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Where the request head ends (the index just past its empty line), if it
/// has ended.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4)
}

/// True when `value` (a comma-separated header list) holds `token`, without
/// regard to case.
fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Parses and checks a request head (up to and including its empty line).
pub fn parse_request(head: &[u8]) -> Result<Upgrade<'_>, Refused> {
    let text = std::str::from_utf8(head).map_err(|_| bad("the request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err(bad("malformed request line")),
    };
    if method != "GET" {
        return Err(Refused {
            status: 405,
            reason: "a WebSocket upgrade is a GET request",
        });
    }
    if version != "HTTP/1.1" {
        return Err(bad("a WebSocket upgrade needs HTTP/1.1"));
    }
    if !target.starts_with('/') {
        return Err(bad("the request target must be a path"));
    }
    let (mut upgrade, mut connection, mut version, mut key, mut host) =
        (false, false, None, None, None);
    let mut count = 0;
    for line in lines {
        if line.is_empty() {
            continue;
        }
        count += 1;
        if count > MAX_HEADERS {
            return Err(Refused {
                status: 431,
                reason: "too many header fields",
            });
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("a header line without ':'"));
        };
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return Err(bad("malformed header name"));
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Err(bad("more than one Sec-WebSocket-Key"));
            }
            key = Some(value);
        } else if name.eq_ignore_ascii_case("host") {
            host = Some(value);
        }
    }
    if !upgrade || !connection {
        return Err(bad(
            "expected a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)",
        ));
    }
    if version != Some("13") {
        return Err(Refused {
            status: 426,
            reason: "only WebSocket version 13 is supported",
        });
    }
    let key = key.ok_or(bad("missing Sec-WebSocket-Key"))?;
    match B64.decode(key) {
        Ok(k) if k.len() == 16 => {}
        _ => return Err(bad("Sec-WebSocket-Key must be 16 bytes in base64")),
    }
    Ok(Upgrade { target, key, host })
}

/// `Sec-WebSocket-Accept` for a key.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(ACCEPT_GUID.as_bytes());
    B64.encode(h.finalize())
}

/// The `101 Switching Protocols` answer. No subprotocol and no extension
/// (compression) is taken up: frames carry the PostgreSQL protocol as is.
pub fn encode_switching(key: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

/// An HTTP error answer whose body is the reason; the connection closes.
pub fn encode_refusal(r: &Refused, out: &mut Vec<u8>) {
    let text = match r.status {
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    let body = format!("{}\n", r.reason);
    out.extend_from_slice(format!("HTTP/1.1 {} {text}\r\n", r.status).as_bytes());
    if r.status == 426 {
        out.extend_from_slice(b"Sec-WebSocket-Version: 13\r\n");
    }
    out.extend_from_slice(
        format!(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(extra: &str) -> String {
        format!(
            "GET /v2?address=db.example.com:6543&mode=session HTTP/1.1\r\nHost: pooler:4001\r\n\
             Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
    }

    #[test]
    fn the_rfc_example_key() {
        // RFC 6455 §1.3.
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let mut out = Vec::new();
        encode_switching(KEY, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn a_driver_request_parses() {
        let r = request("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n");
        let end = head_end(r.as_bytes()).unwrap();
        assert_eq!(end, r.len());
        let u = parse_request(&r.as_bytes()[..end]).unwrap();
        assert_eq!(u.key, KEY);
        assert_eq!(u.path(), "/v2");
        assert_eq!(u.host, Some("pooler:4001"));
        assert_eq!(u.query("address").as_deref(), Some("db.example.com:6543"));
        assert_eq!(u.query("mode").as_deref(), Some("session"));
        assert_eq!(u.query("nothing"), None);
        let enc = Upgrade {
            target: "/?address=a%2Eb%3A5432&x",
            key: KEY,
            host: None,
        };
        assert_eq!(enc.query("address").as_deref(), Some("a.b:5432"));
        assert_eq!(enc.query("x").as_deref(), Some(""));
    }

    #[test]
    fn bad_requests_say_why() {
        let no_upgrade = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            parse_request(no_upgrade.as_bytes()).unwrap_err().status,
            400
        );
        let post = request("").replacen("GET", "POST", 1);
        assert_eq!(parse_request(post.as_bytes()).unwrap_err().status, 405);
        let v8 = request("").replace("Version: 13", "Version: 8");
        let e = parse_request(v8.as_bytes()).unwrap_err();
        assert_eq!(e.status, 426);
        let mut out = Vec::new();
        encode_refusal(&e, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(text.ends_with("only WebSocket version 13 is supported\n"));
        let short_key = request("").replace(KEY, "c2hvcnQ=");
        assert!(parse_request(short_key.as_bytes())
            .unwrap_err()
            .reason
            .contains("16 bytes"));
        let no_key = request("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "");
        assert!(parse_request(no_key.as_bytes())
            .unwrap_err()
            .reason
            .contains("missing"));
        let two_keys = request(&format!("Sec-WebSocket-Key: {KEY}\r\n"));
        assert!(parse_request(two_keys.as_bytes()).is_err());
        assert!(parse_request(b"GET / HTTP/1.1 extra\r\n\r\n").is_err());
        assert!(parse_request(b"\xff\xfe\r\n\r\n").is_err());
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            parse_request(request(&many).as_bytes()).unwrap_err().status,
            431
        );
    }
}
