//! Frame scanning: the 5-byte header (type byte + big-endian i32 length that
//! counts itself but not the type byte) walked over a byte stream.
//!
//! Nothing here copies a payload. [`split_frame`] cuts whole frames off a
//! `BytesMut` for the startup and authentication phases; [`Walker`] follows
//! frame boundaries across reads on the hot path, reporting each frame's type
//! (and its body when the caller asks for whole frames of that type) while the
//! bytes themselves stay where they are, to be forwarded as they came.

use bytes::BytesMut;

use crate::error::{Result, WireError};

/// Type byte plus length.
pub const HEADER_LEN: usize = 5;

/// PostgreSQL refuses messages above 1 GiB; so do we.
pub const MAX_FRAME_LEN: usize = 1 << 30;

/// During authentication no honest message is larger than this.
pub const MAX_AUTH_FRAME_LEN: usize = 16 * 1024;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// The length field: body length + 4.
    pub len: u32,
}

impl Header {
    /// Bytes of the whole frame, header included.
    pub fn frame_len(&self) -> usize {
        self.len as usize + 1
    }

    /// Bytes of the body.
    pub fn body_len(&self) -> usize {
        self.len as usize - 4
    }
}

/// Reads a header from the front of `buf`. `Ok(None)` if fewer than 5 bytes;
/// an error if the length is below 4 or above `max_len` (checked before
/// anything is allocated for the body).
pub fn parse_header(buf: &[u8], max_len: usize) -> Result<Option<Header>> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > max_len {
        return Err(WireError::BadLength {
            what: "frame",
            len: len as i64,
        });
    }
    Ok(Some(Header {
        tag: buf[0],
        len: len as u32,
    }))
}

/// Splits one whole frame off the front of `buf`: its header and its body.
/// `Ok(None)` while incomplete.
pub fn split_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<(Header, BytesMut)>> {
    let Some(header) = parse_header(buf, max_len)? else {
        return Ok(None);
    };
    if buf.len() < header.frame_len() {
        return Ok(None);
    }
    let mut frame = buf.split_to(header.frame_len());
    let body = frame.split_off(HEADER_LEN);
    Ok(Some((header, body)))
}

/// What the walker's callback asks for after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop after this frame; the bytes walked end at its end.
    Stop,
}

/// A frame seen by [`Walker::walk`].
#[derive(Debug)]
pub struct Seen<'a> {
    pub tag: u8,
    /// Offset of the frame's first byte in the slice given to `walk`.
    pub offset: usize,
    pub len: usize,
    /// The body, when the frame's type was asked for whole.
    pub body: Option<&'a [u8]>,
}

/// Follows frame boundaries over a stream. Frames whose type `whole` selects
/// are reported only once they are complete in the buffer (so they can be
/// decoded); the others are reported at their header and then skipped as
/// their bytes arrive, however large they are.
#[derive(Debug, Clone)]
pub struct Walker {
    /// Bytes of the current frame not yet walked.
    remaining: usize,
    max_len: usize,
    /// Length of a whole-wanted frame the last walk stopped at, incomplete.
    wanted: usize,
}

impl Default for Walker {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl Walker {
    pub fn new(max_len: usize) -> Self {
        Self {
            remaining: 0,
            max_len,
            wanted: 0,
        }
    }

    /// After a walk: the length of the incomplete frame it stopped at, when
    /// that frame was wanted whole (the caller must buffer at least this
    /// much); 0 otherwise.
    pub fn wanted(&self) -> usize {
        self.wanted
    }

    /// True when the bytes walked so far end exactly at a frame boundary.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Walks `buf` (bytes that follow what was walked before) and returns how
    /// many bytes were walked: those can be forwarded. The rest (a header, or
    /// an incomplete frame that `whole(tag, frame_len)` wants whole) waits for
    /// more bytes.
    pub fn walk<W, F>(&mut self, buf: &[u8], whole: W, mut f: F) -> Result<usize>
    where
        W: Fn(u8, usize) -> bool,
        F: FnMut(Seen<'_>) -> Flow,
    {
        self.wanted = 0;
        let mut pos = 0;
        loop {
            if self.remaining > 0 {
                let take = self.remaining.min(buf.len() - pos);
                pos += take;
                self.remaining -= take;
                if self.remaining > 0 {
                    return Ok(pos);
                }
            }
            let Some(header) = parse_header(&buf[pos..], self.max_len)? else {
                return Ok(pos);
            };
            let frame_len = header.frame_len();
            if whole(header.tag, frame_len) {
                if buf.len() - pos < frame_len {
                    self.wanted = frame_len;
                    return Ok(pos);
                }
                let flow = f(Seen {
                    tag: header.tag,
                    offset: pos,
                    len: frame_len,
                    body: Some(&buf[pos + HEADER_LEN..pos + frame_len]),
                });
                pos += frame_len;
                if flow == Flow::Stop {
                    return Ok(pos);
                }
            } else {
                let flow = f(Seen {
                    tag: header.tag,
                    offset: pos,
                    len: frame_len,
                    body: None,
                });
                self.remaining = frame_len;
                if flow == Flow::Stop {
                    let take = self.remaining.min(buf.len() - pos);
                    self.remaining -= take;
                    return Ok(pos + take);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn header_rejects_bad_lengths() {
        assert!(parse_header(&[b'Q', 0, 0, 0, 3], MAX_FRAME_LEN).is_err());
        assert!(parse_header(&[b'Q', 0xff, 0xff, 0xff, 0xff], MAX_FRAME_LEN).is_err());
        assert!(parse_header(&[b'Q', 0x7f, 0xff, 0xff, 0xff], MAX_FRAME_LEN).is_err());
        assert_eq!(parse_header(&[b'Q', 0, 0], MAX_FRAME_LEN).unwrap(), None);
        let h = parse_header(&[b'Q', 0, 0, 0, 4], MAX_FRAME_LEN)
            .unwrap()
            .unwrap();
        assert_eq!(h.frame_len(), 5);
        assert_eq!(h.body_len(), 0);
    }

    #[test]
    fn split_whole_frames() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(b'p', b"secret\0"));
        buf.extend_from_slice(&frame(b'S', b"")[..3]);
        let (h, body) = split_frame(&mut buf, MAX_AUTH_FRAME_LEN).unwrap().unwrap();
        assert_eq!(h.tag, b'p');
        assert_eq!(&body[..], b"secret\0");
        assert_eq!(split_frame(&mut buf, MAX_AUTH_FRAME_LEN).unwrap(), None);
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn walker_reports_whole_and_streams_large() {
        let mut stream = frame(b'Z', b"I");
        let big = vec![7u8; 1000];
        stream.extend_from_slice(&frame(b'D', &big));
        stream.extend_from_slice(&frame(b'Z', b"T"));
        // Feed it in awkward pieces.
        let mut w = Walker::default();
        let mut seen = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for chunk in stream.chunks(7) {
            pending.extend_from_slice(chunk);
            let n = w
                .walk(
                    &pending,
                    |t, _| t == b'Z',
                    |s| {
                        seen.push((s.tag, s.body.map(|b| b.to_vec())));
                        Flow::Continue
                    },
                )
                .unwrap();
            pending.drain(..n);
        }
        assert!(pending.is_empty());
        assert!(w.at_boundary());
        assert_eq!(
            seen,
            vec![
                (b'Z', Some(b"I".to_vec())),
                (b'D', None),
                (b'Z', Some(b"T".to_vec()))
            ]
        );
    }

    #[test]
    fn walker_reports_the_incomplete_whole_frame() {
        let f = frame(b'B', &[1u8; 100]);
        let mut w = Walker::default();
        let n = w
            .walk(&f[..50], |t, _| t == b'B', |_| Flow::Continue)
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(w.wanted(), 105);
        let n = w.walk(&f, |t, _| t == b'B', |_| Flow::Continue).unwrap();
        assert_eq!(n, 105);
        assert_eq!(w.wanted(), 0);
    }

    #[test]
    fn walker_stops_when_asked() {
        let mut stream = frame(b'Q', b"select 1\0");
        stream.extend_from_slice(&frame(b'X', b""));
        stream.extend_from_slice(b"garbage after terminate");
        let mut w = Walker::default();
        let mut tags = Vec::new();
        let n = w
            .walk(
                &stream,
                |_, _| false,
                |s| {
                    tags.push(s.tag);
                    if s.tag == b'X' {
                        Flow::Stop
                    } else {
                        Flow::Continue
                    }
                },
            )
            .unwrap();
        assert_eq!(tags, vec![b'Q', b'X']);
        assert_eq!(n, 14 + 5);
    }

    #[test]
    fn walker_rejects_garbage() {
        let mut w = Walker::default();
        assert!(w
            .walk(&[b'Q', 0, 0, 0, 1, 2, 3], |_, _| false, |_| Flow::Continue)
            .is_err());
    }
}
