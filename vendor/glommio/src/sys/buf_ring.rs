// Unless explicitly stated otherwise all files in this repository are licensed
// under the MIT/Apache-2.0 License, at your convenience
//
//! A ring of provided buffers (`IORING_REGISTER_PBUF_RING`, Linux 5.19).
//!
//! Socket receives are submitted with `IOSQE_BUFFER_SELECT`: the kernel picks
//! a buffer from this ring only when bytes arrive, so a socket waiting for
//! data holds no buffer at all. A completed receive hands its buffer to the
//! reader as a [`ProvidedBuf`], which goes back to the ring when dropped.

use std::{
    alloc::{alloc_zeroed, dealloc, Layout},
    cell::Cell,
    fmt, io,
    os::unix::io::RawFd,
    rc::Rc,
    sync::atomic::{AtomicU16, Ordering},
};

const IORING_REGISTER_PBUF_RING: libc::c_uint = 22;
const IORING_UNREGISTER_PBUF_RING: libc::c_uint = 23;

/// `struct io_uring_buf`: one entry of the ring.
#[repr(C)]
struct RingEntry {
    addr: u64,
    len: u32,
    bid: u16,
    /// In entry 0 this is the ring's tail, written by us, read by the kernel.
    resv: u16,
}

/// `struct io_uring_buf_reg`.
#[repr(C)]
struct BufReg {
    ring_addr: u64,
    ring_entries: u32,
    bgid: u16,
    flags: u16,
    resv: [u64; 3],
}

pub(crate) struct BufRing {
    ring_fd: RawFd,
    bgid: u16,
    entries: u16,
    buf_size: usize,
    /// The ring: `entries` × [`RingEntry`], page aligned.
    ring: *mut RingEntry,
    ring_layout: Layout,
    /// The buffers: `entries` × `buf_size` bytes.
    bufs: *mut u8,
    bufs_layout: Layout,
    /// Our copy of the tail; the kernel's is published with a release store.
    tail: Cell<u16>,
    /// Buffers in the ring (not handed out), for tests and statistics.
    available: Cell<usize>,
    registered: Cell<bool>,
}

impl fmt::Debug for BufRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufRing")
            .field("bgid", &self.bgid)
            .field("entries", &self.entries)
            .field("buf_size", &self.buf_size)
            .field("available", &self.available.get())
            .finish()
    }
}

impl BufRing {
    /// Allocates `entries` buffers of `buf_size` bytes and registers them
    /// with the ring `ring_fd` as buffer group `bgid`. `entries` is a power
    /// of two, at most 32768.
    pub(crate) fn register(
        ring_fd: RawFd,
        bgid: u16,
        entries: u16,
        buf_size: usize,
    ) -> io::Result<Rc<BufRing>> {
        assert!(entries.is_power_of_two() && entries <= 32768);
        let ring_layout = Layout::from_size_align(
            std::mem::size_of::<RingEntry>() * entries as usize,
            4096,
        )
        .expect("ring layout");
        let bufs_layout =
            Layout::from_size_align(buf_size * entries as usize, 4096).expect("buffers layout");
        // SAFETY: both layouts have a non-zero size.
        let ring = unsafe { alloc_zeroed(ring_layout) } as *mut RingEntry;
        let bufs = unsafe { std::alloc::alloc(bufs_layout) };
        if ring.is_null() || bufs.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let br = BufRing {
            ring_fd,
            bgid,
            entries,
            buf_size,
            ring,
            ring_layout,
            bufs,
            bufs_layout,
            tail: Cell::new(0),
            available: Cell::new(0),
            registered: Cell::new(false),
        };
        let reg = BufReg {
            ring_addr: ring as u64,
            ring_entries: entries as u32,
            bgid,
            flags: 0,
            resv: [0; 3],
        };
        // SAFETY: registering memory we own and keep until unregistered.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                ring_fd,
                IORING_REGISTER_PBUF_RING,
                &reg as *const BufReg,
                1,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        br.registered.set(true);
        for bid in 0..entries {
            br.push(bid);
        }
        br.publish();
        Ok(Rc::new(br))
    }

    pub(crate) fn bgid(&self) -> u16 {
        self.bgid
    }

    pub(crate) fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Buffers the kernel can pick from now.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.available.get()
    }

    fn push(&self, bid: u16) {
        let tail = self.tail.get();
        let mask = self.entries - 1;
        // SAFETY: the index is masked into the ring; the entry is not one the
        // kernel may read until the tail is published past it.
        unsafe {
            let e = self.ring.add((tail & mask) as usize);
            (*e).addr = self.bufs.add(bid as usize * self.buf_size) as u64;
            (*e).len = self.buf_size as u32;
            (*e).bid = bid;
        }
        self.tail.set(tail.wrapping_add(1));
        self.available.set(self.available.get() + 1);
    }

    fn publish(&self) {
        // SAFETY: the tail field lives in entry 0 of our ring memory.
        let tail = unsafe { &*(std::ptr::addr_of!((*self.ring).resv) as *const AtomicU16) };
        tail.store(self.tail.get(), Ordering::Release);
    }

    /// The kernel filled buffer `bid` with `len` bytes.
    pub(crate) fn take(self: &Rc<Self>, bid: u16, len: usize) -> ProvidedBuf {
        debug_assert!(bid < self.entries && len <= self.buf_size);
        self.available.set(self.available.get() - 1);
        ProvidedBuf {
            ring: self.clone(),
            bid,
            pos: 0,
            len: len.min(self.buf_size) as u32,
        }
    }

    fn give_back(&self, bid: u16) {
        self.push(bid);
        self.publish();
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered.get() {
            let reg = BufReg {
                ring_addr: 0,
                ring_entries: 0,
                bgid: self.bgid,
                flags: 0,
                resv: [0; 3],
            };
            // SAFETY: unregistering our own group; if the ring is gone already
            // this fails harmlessly.
            unsafe {
                libc::syscall(
                    libc::SYS_io_uring_register,
                    self.ring_fd,
                    IORING_UNREGISTER_PBUF_RING,
                    &reg as *const BufReg,
                    1,
                );
            }
        }
        // SAFETY: allocated in `register` with these layouts.
        unsafe {
            dealloc(self.ring as *mut u8, self.ring_layout);
            dealloc(self.bufs, self.bufs_layout);
        }
    }
}

/// Bytes a receive put in a buffer of the ring; the buffer goes back to the
/// ring when this is dropped.
pub(crate) struct ProvidedBuf {
    ring: Rc<BufRing>,
    bid: u16,
    pos: u32,
    len: u32,
}

impl fmt::Debug for ProvidedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvidedBuf")
            .field("bid", &self.bid)
            .field("pos", &self.pos)
            .field("len", &self.len)
            .finish()
    }
}

impl ProvidedBuf {
    /// The bytes not consumed yet.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the kernel wrote `len` bytes into buffer `bid`, which is ours
        // until we give it back (on drop).
        unsafe {
            let start = self.ring.bufs.add(self.bid as usize * self.ring.buf_size);
            std::slice::from_raw_parts(start.add(self.pos as usize), (self.len - self.pos) as usize)
        }
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.pos = (self.pos as usize + n).min(self.len as usize) as u32;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.len
    }
}

impl Drop for ProvidedBuf {
    fn drop(&mut self) {
        self.ring.give_back(self.bid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_go_back_to_the_ring() {
        let ring = crate::iou::IoUring::new(8).unwrap();
        let br = BufRing::register(ring.raw_fd(), 7, 4, 64).unwrap();
        assert_eq!(br.available(), 4);
        let mut a = br.take(2, 10);
        assert_eq!(br.available(), 3);
        assert_eq!(a.bytes().len(), 10);
        a.consume(4);
        assert_eq!(a.bytes().len(), 6);
        a.consume(100);
        assert!(a.is_empty());
        drop(a);
        assert_eq!(br.available(), 4);
        // The tail the kernel reads moved past the returned buffer.
        let tail = unsafe { (*br.ring).resv };
        assert_eq!(tail, 5);
    }
}
