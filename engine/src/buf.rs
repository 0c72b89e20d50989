//! A byte queue for socket I/O: reads land in its free tail, writes drain its
//! head, and an empty queue can give its memory back (idle clients hold none).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};

/// Default capacity when a buffer is first needed.
pub const DEFAULT_CAP: usize = 16 * 1024;

/// Released buffers of `DEFAULT_CAP` kept per thread (each shard is one
/// thread): a client that goes idle between transactions gives its buffers
/// back and takes them again without a malloc and a 16 KiB memset each time.
const SPARE_BUFFERS: usize = 256;

thread_local! {
    static SPARES: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_spare() -> Option<Vec<u8>> {
    SPARES.with(|s| s.borrow_mut().pop())
}

fn give_spare(buf: Vec<u8>) {
    if buf.len() != DEFAULT_CAP {
        return;
    }
    // try_with: a buffer dropped while its thread's locals are torn down is
    // simply freed.
    let _ = SPARES.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if s.len() < SPARE_BUFFERS {
                s.push(buf);
            }
        }
    });
}

/// Spare buffers this thread holds (tests).
#[cfg(test)]
fn spare_count() -> usize {
    SPARES.with(|s| s.borrow().len())
}

#[derive(Debug, Default)]
pub struct IoBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

/// A connection that closes gives its buffers to the next one: with a new
/// connection per transaction (`pgbench -C`) every login otherwise paid a
/// malloc and a 16 KiB memset per buffer once the spares ran out. What the
/// buffer held is never read again: a taken spare counts as empty.
impl Drop for IoBuf {
    fn drop(&mut self) {
        if !self.data.is_empty() {
            give_spare(std::mem::take(&mut self.data));
        }
    }
}

impl IoBuf {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(cap: usize) -> Self {
        let spare = if cap == DEFAULT_CAP {
            take_spare()
        } else {
            None
        };
        let data = spare.unwrap_or_else(|| vec![0; cap]);
        Self {
            data,
            start: 0,
            end: 0,
        }
    }

    /// Bytes waiting in the queue.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.end]
    }

    /// Drops `n` bytes from the head.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Drops everything after the first `n` queued bytes.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.end = self.start + n;
        }
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Removes `len` queued bytes starting `at` bytes after the head.
    pub fn remove(&mut self, at: usize, len: usize) {
        debug_assert!(at + len <= self.len());
        let from = self.start + at;
        self.data.copy_within(from + len..self.end, from);
        self.end -= len;
        if self.start == self.end {
            self.clear();
        }
    }

    /// Inserts bytes `at` bytes after the head.
    pub fn insert(&mut self, at: usize, src: &[u8]) {
        debug_assert!(at <= self.len());
        self.reserve(src.len());
        let pos = self.start + at;
        self.data.copy_within(pos..self.end, pos + src.len());
        self.data[pos..pos + src.len()].copy_from_slice(src);
        self.end += src.len();
    }

    /// Frees the memory when nothing is queued.
    pub fn release_if_empty(&mut self) {
        if self.is_empty() && !self.data.is_empty() {
            give_spare(std::mem::take(&mut self.data));
            self.start = 0;
            self.end = 0;
        }
    }

    pub fn is_allocated(&self) -> bool {
        !self.data.is_empty()
    }

    /// Appends bytes, growing as needed.
    pub fn extend_from_slice(&mut self, src: &[u8]) {
        self.reserve(src.len());
        self.data[self.end..self.end + src.len()].copy_from_slice(src);
        self.end += src.len();
    }

    /// Makes room for at least `n` more bytes at the tail.
    pub fn reserve(&mut self, n: usize) {
        if self.data.len() - self.end >= n {
            return;
        }
        // Move what is queued to the front first.
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.data.len() - self.end < n {
            let want = (self.end + n).max(DEFAULT_CAP).next_power_of_two();
            if self.data.is_empty() && want == DEFAULT_CAP {
                if let Some(spare) = take_spare() {
                    self.data = spare;
                    return;
                }
            }
            self.data.resize(want, 0);
        }
    }

    /// Free space at the tail (after compaction if that helps), at least
    /// `min` bytes; [`IoBuf::filled`] then counts what was written there.
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        self.reserve(min);
        let end = self.end;
        &mut self.data[end..]
    }

    /// Adds `n` bytes written into [`IoBuf::spare`] to the queue.
    pub fn filled(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.data.len());
        self.end += n;
    }

    /// One read from `src` into the tail. Ready(Ok(0)) means end of stream.
    pub fn poll_read_from<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
    ) -> Poll<io::Result<usize>> {
        let spare = self.spare(4096);
        let n = futures_lite::ready!(Pin::new(src).poll_read(cx, spare))?;
        self.end += n;
        Poll::Ready(Ok(n))
    }

    /// One write of up to `limit` head bytes to `dst`; consumes what was written.
    pub fn poll_write_to<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
        limit: usize,
    ) -> Poll<io::Result<usize>> {
        let n = limit.min(self.len());
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        let written = futures_lite::ready!(
            Pin::new(dst).poll_write(cx, &self.data[self.start..self.start + n])
        )?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.consume(written);
        Poll::Ready(Ok(written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_compacts_and_releases() {
        let mut b = IoBuf::new();
        assert!(!b.is_allocated());
        b.extend_from_slice(b"hello world");
        b.consume(6);
        assert_eq!(b.bytes(), b"world");
        b.reserve(DEFAULT_CAP);
        assert_eq!(b.bytes(), b"world");
        b.truncate(3);
        assert_eq!(b.bytes(), b"wor");
        b.consume(3);
        assert!(b.is_empty());
        b.extend_from_slice(b"abcdef");
        b.consume(1);
        b.remove(1, 2);
        assert_eq!(b.bytes(), b"bef");
        b.insert(1, b"XY");
        assert_eq!(b.bytes(), b"bXYef");
        b.insert(5, b"!");
        assert_eq!(b.bytes(), b"bXYef!");
        b.clear();
        b.release_if_empty();
        assert!(!b.is_allocated());
    }

    #[test]
    fn dropped_buffers_become_spares() {
        let mut b = IoBuf::new();
        b.extend_from_slice(b"queued bytes of a closed connection");
        let held = spare_count();
        drop(b);
        assert_eq!(spare_count(), held + 1);
        let mut c = IoBuf::new();
        c.extend_from_slice(b"next");
        assert_eq!(spare_count(), held, "the next buffer takes the spare");
        assert_eq!(c.bytes(), b"next");
        // Buffers of another size are freed, not kept.
        let mut big = IoBuf::new();
        big.reserve(4 * DEFAULT_CAP);
        drop(big);
        assert_eq!(spare_count(), held);
        drop(c);
        assert_eq!(spare_count(), held + 1);
    }
}
