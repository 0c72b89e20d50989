//! The client's stream of WebSocket frames turned back into the bytes it
//! carries, in place: [`Deframer::feed`] takes a buffer just read from the
//! socket, moves the unmasked payload of its data frames to the front and
//! keeps the few bytes of state a frame split across reads needs. Control
//! frames are taken out and remembered (a ping to answer, the peer's close).
//! A data frame's payload is never buffered, so its size costs no memory;
//! it is bounded all the same (`max_frame`), like a PostgreSQL frame.

use super::frame::{
    decode_close, parse_header, unmask, unmask_into, FrameError, FrameHeader, CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OP_BINARY, OP_CLOSE,
    OP_CONTINUATION, OP_PING, OP_TEXT,
};

/// The payload of a control frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ControlPayload {
    len: u8,
    bytes: [u8; MAX_CONTROL_PAYLOAD],
}

impl ControlPayload {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::fmt::Debug for ControlPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlPayload({:?})", self.as_bytes())
    }
}

/// What the frame being read carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Current {
    /// Between frames (reading a header).
    Header,
    /// Payload of a binary or continuation frame: protocol bytes.
    Data,
    /// Payload of a control frame, collected in `ctl`.
    Control(u8),
}

/// Server-side deframer of one connection.
#[derive(Debug, Clone)]
pub struct Deframer {
    /// Largest data frame payload accepted.
    max_frame: u64,
    /// A header split across reads.
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: u8,
    current: Current,
    /// Payload bytes of the current frame still to come.
    left: u64,
    mask: [u8; 4],
    /// Payload bytes of the current frame seen so far, modulo 4.
    offset: u8,
    /// A binary message was begun without FIN: continuations may follow.
    in_message: bool,
    ctl: ControlPayload,
    /// The last ping not answered yet.
    ping: Option<ControlPayload>,
    /// The peer's close frame arrived (with its status code, if any).
    closed: Option<Option<u16>>,
    failed: Option<FrameError>,
}

impl Deframer {
    pub fn new(max_frame: u64) -> Self {
        Deframer {
            max_frame,
            hdr: [0; MAX_HEADER_LEN],
            hdr_len: 0,
            current: Current::Header,
            left: 0,
            mask: [0; 4],
            offset: 0,
            in_message: false,
            ctl: ControlPayload {
                len: 0,
                bytes: [0; MAX_CONTROL_PAYLOAD],
            },
            ping: None,
            closed: None,
            failed: None,
        }
    }

    /// Deframes `buf` in place and returns `n`: the protocol bytes it
    /// carried are now `buf[..n]`, unmasked. Everything in `buf` is
    /// consumed (state carries over to the next call). After the peer's
    /// close frame, further bytes are ignored. An error is final: every
    /// later call returns it again.
    pub fn feed(&mut self, buf: &mut [u8]) -> Result<usize, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let r = self.feed_inner(buf);
        if let Err(e) = r {
            self.failed = Some(e);
        }
        r
    }

    /// The payload of the last ping received and not yet answered.
    pub fn take_ping(&mut self) -> Option<ControlPayload> {
        self.ping.take()
    }

    /// `Some(code)` once the peer's close frame has arrived.
    pub fn peer_closed(&self) -> Option<Option<u16>> {
        self.closed
    }

    /// True between frames: no frame begun and not finished.
    pub fn at_boundary(&self) -> bool {
        self.current == Current::Header && self.hdr_len == 0
    }

    fn feed_inner(&mut self, buf: &mut [u8]) -> Result<usize, FrameError> {
        let n = buf.len();
        let mut i = 0;
        let mut w = 0;
        while i < n && self.closed.is_none() {
            match self.current {
                Current::Header => {
                    let Some((h, used)) = self.header(&buf[i..])? else {
                        // Every byte left went into the partial header.
                        break;
                    };
                    i += used;
                    self.begin(h)?;
                }
                Current::Data => {
                    let take = self.left.min((n - i) as u64) as usize;
                    unmask_into(buf, i, w, take, self.mask, self.offset as usize);
                    w += take;
                    i += take;
                    self.advance(take)?;
                }
                Current::Control(_) => {
                    let take = self.left.min((n - i) as u64) as usize;
                    let at = self.ctl.len as usize;
                    self.ctl.bytes[at..at + take].copy_from_slice(&buf[i..i + take]);
                    unmask(
                        &mut self.ctl.bytes[at..at + take],
                        self.mask,
                        self.offset as usize,
                    );
                    self.ctl.len += take as u8;
                    i += take;
                    self.advance(take)?;
                }
            }
        }
        Ok(w)
    }

    /// Reads a header from `input` (after the part kept from earlier reads):
    /// the header and how many bytes of `input` it used, or `None` when
    /// `input` ended first (then all of it is kept).
    fn header(&mut self, input: &[u8]) -> Result<Option<(FrameHeader, usize)>, FrameError> {
        if self.hdr_len == 0 {
            if let Some(h) = parse_header(input)? {
                return Ok(Some((h, h.header_len)));
            }
            let k = input.len().min(MAX_HEADER_LEN);
            self.hdr[..k].copy_from_slice(&input[..k]);
            self.hdr_len = k as u8;
            return Ok(None);
        }
        let had = self.hdr_len as usize;
        let k = input.len().min(MAX_HEADER_LEN - had);
        self.hdr[had..had + k].copy_from_slice(&input[..k]);
        match parse_header(&self.hdr[..had + k])? {
            Some(h) => {
                self.hdr_len = 0;
                Ok(Some((h, h.header_len - had)))
            }
            None => {
                self.hdr_len = (had + k) as u8;
                Ok(None)
            }
        }
    }

    fn begin(&mut self, h: FrameHeader) -> Result<(), FrameError> {
        let Some(mask) = h.mask else {
            return Err(FrameError::protocol("client frames must be masked"));
        };
        self.current = match h.opcode {
            OP_TEXT => return Err(FrameError {
                code: CLOSE_UNSUPPORTED_DATA,
                reason:
                    "text frames are not accepted: send the PostgreSQL protocol in binary frames",
            }),
            OP_BINARY if self.in_message => {
                return Err(FrameError::protocol(
                    "a new message began before the fragmented one ended",
                ))
            }
            OP_CONTINUATION if !self.in_message => {
                return Err(FrameError::protocol(
                    "continuation frame without a message to continue",
                ))
            }
            OP_BINARY | OP_CONTINUATION => {
                if h.len > self.max_frame {
                    return Err(FrameError {
                        code: CLOSE_TOO_BIG,
                        reason: "frame larger than the pooler accepts (1 GiB)",
                    });
                }
                self.in_message = !h.fin;
                Current::Data
            }
            op => {
                self.ctl.len = 0;
                Current::Control(op)
            }
        };
        self.mask = mask;
        self.offset = 0;
        self.left = h.len;
        if h.len == 0 {
            self.end()?;
        }
        Ok(())
    }

    /// `take` payload bytes of the current frame were consumed.
    fn advance(&mut self, take: usize) -> Result<(), FrameError> {
        self.left -= take as u64;
        self.offset = ((self.offset as usize + take) % 4) as u8;
        if self.left == 0 {
            self.end()?;
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), FrameError> {
        match std::mem::replace(&mut self.current, Current::Header) {
            Current::Control(OP_PING) => self.ping = Some(self.ctl),
            Current::Control(OP_CLOSE) => {
                self.closed = Some(decode_close(self.ctl.as_bytes())?);
            }
            // Pongs answer nothing we asked; data needs no ending.
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::{encode_client_frame, CLOSE_PROTOCOL_ERROR, OP_PONG};
    use super::*;

    const MAX: u64 = 1 << 30;

    fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_client_frame(fin, op, payload, [0x37, 0xFA, 0x21, 0x3D], &mut v);
        v
    }

    /// Feeds `input` in pieces of the given sizes (cycled); returns the data.
    fn feed_in(d: &mut Deframer, input: &[u8], sizes: &[usize]) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut k = 0;
        while at < input.len() {
            let n = sizes[k % sizes.len()].max(1).min(input.len() - at);
            k += 1;
            let mut piece = input[at..at + n].to_vec();
            let got = d.feed(&mut piece)?;
            out.extend_from_slice(&piece[..got]);
            at += n;
        }
        Ok(out)
    }

    #[test]
    fn one_frame_in_one_read() {
        let mut d = Deframer::new(MAX);
        let mut buf = frame(true, OP_BINARY, b"Q\0\0\0\rSELECT 1\0");
        let n = d.feed(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"Q\0\0\0\rSELECT 1\0");
        assert!(d.at_boundary());
    }

    #[test]
    fn fragments_pings_and_any_split_give_the_same_bytes() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let mut input = frame(false, OP_BINARY, b"hello ");
        input.extend(frame(true, OP_PING, b"are you there"));
        input.extend(frame(false, OP_CONTINUATION, b"wor"));
        input.extend(frame(true, OP_PONG, b""));
        input.extend(frame(true, OP_CONTINUATION, b"ld"));
        input.extend(frame(true, OP_BINARY, b""));
        input.extend(frame(true, OP_BINARY, &big));
        input.extend(frame(true, OP_BINARY, &big[..300]));
        let mut want = b"hello world".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(&big[..300]);
        for sizes in [
            &[usize::MAX][..],
            &[1],
            &[2, 3],
            &[7, 1, 13],
            &[4096],
            &[5, 65536],
        ] {
            let mut d = Deframer::new(MAX);
            let got = feed_in(&mut d, &input, sizes).unwrap();
            assert!(got == want, "split {sizes:?}");
            assert_eq!(
                d.take_ping().unwrap().as_bytes(),
                b"are you there",
                "split {sizes:?}"
            );
            assert_eq!(d.take_ping(), None);
            assert!(d.at_boundary());
            assert_eq!(d.peer_closed(), None);
        }
    }

    #[test]
    fn random_frames_split_randomly() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let mut input = Vec::new();
            let mut want = Vec::new();
            for _ in 0..rnd(8) {
                let len = [0, 1, 5, 125, 126, 300, 65536][rnd(7) as usize];
                let payload: Vec<u8> = (0..len).map(|_| rnd(256) as u8).collect();
                let mask = [
                    rnd(256) as u8,
                    rnd(256) as u8,
                    rnd(256) as u8,
                    rnd(256) as u8,
                ];
                encode_client_frame(true, OP_BINARY, &payload, mask, &mut input);
                want.extend_from_slice(&payload);
                if rnd(3) == 0 {
                    encode_client_frame(true, OP_PING, b"p", mask, &mut input);
                }
            }
            let sizes: Vec<usize> = (0..5).map(|_| 1 + rnd(200) as usize).collect();
            let mut d = Deframer::new(MAX);
            assert_eq!(feed_in(&mut d, &input, &sizes).unwrap(), want);
        }
    }

    #[test]
    fn close_frame_ends_the_stream() {
        let mut input = frame(true, OP_BINARY, b"ab");
        input.extend(frame(true, OP_CLOSE, &[0x03, 0xE8, b'b', b'y', b'e']));
        input.extend(frame(true, OP_BINARY, b"ignored"));
        let mut d = Deframer::new(MAX);
        assert_eq!(feed_in(&mut d, &input, &[3]).unwrap(), b"ab");
        assert_eq!(d.peer_closed(), Some(Some(1000)));
        let mut d = Deframer::new(MAX);
        let mut c = frame(true, OP_CLOSE, b"");
        assert_eq!(d.feed(&mut c).unwrap(), 0);
        assert_eq!(d.peer_closed(), Some(None));
    }

    #[test]
    fn violations_close_with_a_code_and_stay_failed() {
        let cases: Vec<(Vec<u8>, u16, &str)> = vec![
            (
                vec![0x82, 0x03, b'a', b'b', b'c'],
                CLOSE_PROTOCOL_ERROR,
                "masked",
            ),
            (
                frame(true, OP_TEXT, b"SELECT 1"),
                CLOSE_UNSUPPORTED_DATA,
                "text frames",
            ),
            (
                frame(true, OP_CONTINUATION, b"x"),
                CLOSE_PROTOCOL_ERROR,
                "continuation",
            ),
            (
                [frame(false, OP_BINARY, b"x"), frame(true, OP_BINARY, b"y")].concat(),
                CLOSE_PROTOCOL_ERROR,
                "new message",
            ),
            (
                frame(true, OP_CLOSE, &[0x03]),
                CLOSE_PROTOCOL_ERROR,
                "one-byte",
            ),
        ];
        for (input, code, words) in cases {
            let mut d = Deframer::new(MAX);
            let e = feed_in(&mut d, &input, &[usize::MAX]).unwrap_err();
            assert_eq!(e.code, code, "{words}");
            assert!(e.reason.contains(words), "{e} should mention {words}");
            assert_eq!(
                d.feed(&mut [0x82, 0x80, 0, 0, 0, 0]).unwrap_err(),
                e,
                "stays failed"
            );
        }
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let mut d = Deframer::new(1000);
        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&(1u64 << 40).to_be_bytes());
        h.extend_from_slice(&[1, 2, 3, 4]);
        let e = d.feed(&mut h).unwrap_err();
        assert_eq!(e.code, CLOSE_TOO_BIG);
        let mut d = Deframer::new(1000);
        let mut ok = frame(true, OP_BINARY, &[7; 1000]);
        assert_eq!(d.feed(&mut ok).unwrap(), 1000);
    }
}
