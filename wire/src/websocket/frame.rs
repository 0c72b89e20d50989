//! WebSocket frame headers (RFC 6455 §5.2), the masking key, and the close
//! and control frames a server sends. Server frames are never masked;
//! client frames always are.

/// Opcodes.
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Control frames carry at most this many payload bytes.
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// 2 bytes, 8 of extended length, 4 of masking key.
pub const MAX_HEADER_LEN: usize = 14;
/// An unmasked server header: 2 bytes and up to 8 of extended length.
pub const MAX_SERVER_HEADER_LEN: usize = 10;

/// Close codes (RFC 6455 §7.4.1).
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Data of a type the endpoint cannot accept (here: text frames).
pub const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
pub const CLOSE_TOO_BIG: u16 = 1009;

/// A violation of the framing by the peer: the connection is closed with
/// this close code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("WebSocket close {code}: {reason}")]
pub struct FrameError {
    pub code: u16,
    pub reason: &'static str,
}

impl FrameError {
    pub const fn protocol(reason: &'static str) -> FrameError {
        FrameError {
            code: CLOSE_PROTOCOL_ERROR,
            reason,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
    /// Bytes of the header itself.
    pub header_len: usize,
}

impl FrameHeader {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Reads a frame header from the front of `buf`: `Ok(None)` while it is
/// incomplete. Checks what the header alone shows: reserved bits (no
/// extension is ever negotiated), known opcodes, control frames unfragmented
/// and at most 125 bytes, the 64-bit length's top bit clear.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::protocol(
            "reserved bits set (no extension was negotiated)",
        ));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(FrameError::protocol("unknown opcode"));
    }
    let masked = b1 & 0x80 != 0;
    let short = b1 & 0x7F;
    if opcode & 0x8 != 0 {
        // Control frames: told from the first two bytes.
        if !fin {
            return Err(FrameError::protocol("fragmented control frame"));
        }
        if short as usize > MAX_CONTROL_PAYLOAD {
            return Err(FrameError::protocol(
                "control frame with more than 125 bytes",
            ));
        }
    }
    let ext = match short {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header_len = 2 + ext + if masked { 4 } else { 0 };
    if buf.len() < header_len {
        return Ok(None);
    }
    let len = match ext {
        0 => u64::from(short),
        2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        _ => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(FrameError::protocol("payload length with its top bit set"));
            }
            len
        }
    };
    let mask = masked.then(|| {
        let at = 2 + ext;
        [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
    });
    let h = FrameHeader {
        fin,
        opcode,
        mask,
        len,
        header_len,
    };
    Ok(Some(h))
}

/// Writes the header of an unmasked (server) frame into `out`; returns its
/// length.
pub fn encode_header(
    fin: bool,
    opcode: u8,
    len: u64,
    out: &mut [u8; MAX_SERVER_HEADER_LEN],
) -> usize {
    out[0] = if fin { 0x80 } else { 0 } | (opcode & 0x0F);
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u64::from(u16::MAX) {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&len.to_be_bytes());
        10
    }
}

/// Appends a whole unmasked frame.
pub fn encode_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    let mut h = [0u8; MAX_SERVER_HEADER_LEN];
    let n = encode_header(true, opcode, payload.len() as u64, &mut h);
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and as much of `reason` as fits in a
/// control frame (cut at a character boundary).
pub fn encode_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    encode_frame(OP_CLOSE, &payload[..2 + cut], out);
}

/// The status code of a close frame's payload: `Ok(None)` for an empty
/// payload (no status), an error for a one-byte payload, a code no endpoint
/// may send, or a reason that is not UTF-8.
pub fn decode_close(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::protocol("close frame with a one-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(FrameError::protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(FrameError {
                    code: 1007,
                    reason: "close reason is not UTF-8",
                });
            }
            Ok(Some(code))
        }
    }
}

/// The 4-byte masking key rotated so that its first byte applies at payload
/// offset `offset`, repeated to 8 bytes.
fn mask_word(mask: [u8; 4], offset: usize) -> u64 {
    let r = offset % 4;
    let mut m = [0u8; 8];
    for (i, b) in m.iter_mut().enumerate() {
        *b = mask[(i + r) % 4];
    }
    u64::from_ne_bytes(m)
}

/// XORs `data` with the masking key, `data[0]` being payload byte `offset`.
pub fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let n = data.len();
    unmask_into(data, 0, 0, n, mask, offset);
}

/// Unmasks `len` bytes at `buf[from..]` and moves them to `buf[to..]`
/// (`to <= from`) in one pass: the move that takes frame headers out of a
/// read buffer costs nothing beyond the unmasking itself.
pub fn unmask_into(
    buf: &mut [u8],
    from: usize,
    to: usize,
    len: usize,
    mask: [u8; 4],
    offset: usize,
) {
    debug_assert!(to <= from && from + len <= buf.len());
    let word = mask_word(mask, offset);
    let mut i = 0;
    // Eight bytes at a time: each chunk is read before it is written, and a
    // write never reaches bytes not yet read (to <= from).
    while i + 8 <= len {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[from + i..from + i + 8]);
        let v = u64::from_ne_bytes(w) ^ word;
        buf[to + i..to + i + 8].copy_from_slice(&v.to_ne_bytes());
        i += 8;
    }
    while i < len {
        buf[to + i] = buf[from + i] ^ mask[(offset + i) % 4];
        i += 1;
    }
}

/// Appends a masked frame as a client sends it (for tests, benchmarks and
/// client tools; the pooler itself never masks).
pub fn encode_client_frame(
    fin: bool,
    opcode: u8,
    payload: &[u8],
    mask: [u8; 4],
    out: &mut Vec<u8>,
) {
    let mut h = [0u8; MAX_SERVER_HEADER_LEN];
    let n = encode_header(fin, opcode, payload.len() as u64, &mut h);
    h[1] |= 0x80;
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_client_frame(fin, opcode, payload, mask, &mut v);
        v
    }

    #[test]
    fn header_round_trips_at_each_length_form() {
        for len in [0u64, 1, 125, 126, 65535, 65536, 1 << 33] {
            let mut h = [0u8; MAX_SERVER_HEADER_LEN];
            let n = encode_header(true, OP_BINARY, len, &mut h);
            let got = parse_header(&h[..n]).unwrap().unwrap();
            assert_eq!(
                (got.fin, got.opcode, got.len, got.header_len, got.mask),
                (true, OP_BINARY, len, n, None)
            );
            // Every shorter prefix is incomplete.
            for k in 0..n {
                assert_eq!(
                    parse_header(&h[..k]).unwrap(),
                    None,
                    "len {len}, prefix {k}"
                );
            }
        }
        let f = client_frame(false, OP_CONTINUATION, &[1, 2, 3], [9, 8, 7, 6]);
        let h = parse_header(&f).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.len, h.header_len, h.mask),
            (false, 0, 3, 6, Some([9, 8, 7, 6]))
        );
    }

    #[test]
    fn header_rules() {
        assert_eq!(
            parse_header(&[0x82 | 0x40, 0x80]).unwrap_err().code,
            CLOSE_PROTOCOL_ERROR
        );
        assert_eq!(
            parse_header(&[0x83, 0x80]).unwrap_err().reason,
            "unknown opcode"
        );
        assert_eq!(
            parse_header(&[0x09, 0x80]).unwrap_err().reason,
            "fragmented control frame"
        );
        assert_eq!(
            parse_header(&[0x89, 0x80 | 126, 0, 126])
                .unwrap_err()
                .reason,
            "control frame with more than 125 bytes"
        );
        let mut big = vec![0x82, 0x80 | 127];
        big.extend_from_slice(&(1u64 << 63).to_be_bytes());
        big.extend_from_slice(&[0; 4]);
        assert!(parse_header(&big).is_err());
    }

    #[test]
    fn unmask_matches_bytewise_at_any_offset_and_shift() {
        let mask = [0xA1, 0x02, 0x7F, 0xFE];
        let data: Vec<u8> = (0..61u8).collect();
        for offset in 0..5 {
            for shift in [0usize, 1, 6, 13] {
                let mut buf = vec![0xEEu8; shift];
                buf.extend_from_slice(&data);
                unmask_into(&mut buf, shift, 0, data.len(), mask, offset);
                let want: Vec<u8> = data
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask[(offset + i) % 4])
                    .collect();
                assert_eq!(
                    &buf[..data.len()],
                    &want[..],
                    "offset {offset} shift {shift}"
                );
            }
        }
        let mut d = data.clone();
        unmask(&mut d, mask, 3);
        unmask(&mut d, mask, 3);
        assert_eq!(d, data, "unmasking twice gives the data back");
    }

    #[test]
    fn close_frames() {
        let mut out = Vec::new();
        encode_close(CLOSE_TOO_BIG, "frame too big", &mut out);
        assert_eq!(&out[..4], &[0x88, 15, 0x03, 0xF1]);
        assert_eq!(&out[4..], b"frame too big");
        let long = "é".repeat(100);
        out.clear();
        encode_close(CLOSE_NORMAL, &long, &mut out);
        let h = parse_header(&out).unwrap().unwrap();
        assert!(h.len <= MAX_CONTROL_PAYLOAD as u64);
        assert!(
            std::str::from_utf8(&out[4..]).is_ok(),
            "cut at a character boundary"
        );
        assert_eq!(decode_close(&[]).unwrap(), None);
        assert_eq!(decode_close(&[3, 232, b'o', b'k']).unwrap(), Some(1000));
        assert!(decode_close(&[3]).is_err());
        assert!(decode_close(&[3, 237]).is_err(), "1005 is never sent");
        assert_eq!(decode_close(&[3, 232, 0xFF]).unwrap_err().code, 1007);
    }
}
