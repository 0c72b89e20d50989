//! Parked clients. A transaction-mode client over plain TCP or TLS that stays idle
//! for `proxy.client_park_after` gives up its task and its I/O requests: its
//! session waits in its control block ([`ClientCtl::parked`]) and its socket
//! in the shard's epoll set, registered one-shot with the client's pid. What
//! the client sends next (or its end) makes the epoll set readable; a signal
//! (drain, kill, fence, idle timeout) wakes the client's waker, which is a
//! [`waker`] for its pid. Either way the pid reaches [`resume_loop`], which
//! spawns the session's task again: a parked client costs its control block,
//! its session state and the kernel's epoll entry, no task and no I/O source.
//!
//! A busy client never parks (the sweep parks only clients idle for a whole
//! sweep period), so the epoll calls (`epoll_ctl` at a park, one
//! `epoll_wait` per batch of wake-ups) stay off the hot path.
//!
//! [`ClientCtl::parked`]: crate::shard::ClientCtl

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Poll, RawWaker, RawWakerVTable, Waker};

use futures_lite::future::poll_fn;

use crate::shard::Shard;

/// Events taken per `epoll_wait`.
const BATCH: usize = 256;

/// A shard's epoll set of parked clients' sockets.
pub struct Parking {
    epoll: OwnedFd,
}

impl Parking {
    pub fn new() -> io::Result<Parking> {
        // SAFETY: plain system call; the fd is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        Ok(Parking {
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` for the parked client `pid`, once: the entry fires at
    /// the first byte (or the end of the connection) and then stays
    /// disabled until the next park re-arms it. A closed socket leaves the
    /// set by itself.
    pub fn watch(&self, fd: RawFd, pid: i32) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: u64::from(pid as u32),
        };
        let mut ctl = |op| {
            // SAFETY: valid fds and a valid event pointer.
            if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        match ctl(libc::EPOLL_CTL_MOD) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => ctl(libc::EPOLL_CTL_ADD),
            other => other,
        }
    }

    /// The pids whose sockets became readable, without waiting.
    fn ready(&self, out: &mut Vec<i32>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        loop {
            // SAFETY: the buffer holds BATCH events.
            let n = unsafe {
                libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0)
            };
            if n <= 0 {
                return;
            }
            out.extend(events[..n as usize].iter().map(|e| e.u64 as u32 as i32));
            if (n as usize) < BATCH {
                return;
            }
        }
    }
}

thread_local! {
    /// Parked clients whose waker was woken (a signal), to resume.
    static WOKEN: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
    /// The resumer's waker.
    static RESUMER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// The waker of the parked client `pid`: waking it resumes the client. The
/// pid is the waker's data, so it allocates nothing. It must be woken on
/// the shard's thread, which holds for a client's waker: only its
/// control block (not `Send`) keeps it.
pub(crate) fn waker(pid: i32) -> Waker {
    // SAFETY: the vtable's functions uphold RawWaker's contract for a
    // data pointer that is a plain integer (nothing to free or share).
    unsafe { Waker::from_raw(RawWaker::new(pid as u32 as usize as *const (), &VTABLE)) }
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone_raw, wake_raw, wake_raw, drop_raw);

fn clone_raw(data: *const ()) -> RawWaker {
    RawWaker::new(data, &VTABLE)
}

fn wake_raw(data: *const ()) {
    let pid = data as usize as u32 as i32;
    WOKEN.with(|w| w.borrow_mut().push(pid));
    RESUMER.with(|r| {
        if let Some(w) = r.borrow_mut().take() {
            w.wake();
        }
    });
}

fn drop_raw(_: *const ()) {}

/// Resumes parked clients as their sockets or signals wake them; runs for
/// the shard's life.
pub(crate) async fn resume_loop(shard: Rc<Shard>) {
    let Some(parking) = shard.parking.as_ref() else {
        return;
    };
    let epoll = parking.epoll.as_raw_fd();
    let mut pids = Vec::new();
    loop {
        let readable = futures_lite::future::or(
            async { glommio::net::wait_readable(epoll).await.is_ok() },
            async {
                poll_fn(|cx| {
                    if WOKEN.with(|w| !w.borrow().is_empty()) {
                        return Poll::Ready(false);
                    }
                    RESUMER.with(|r| *r.borrow_mut() = Some(cx.waker().clone()));
                    Poll::Pending
                })
                .await
            },
        )
        .await;
        if readable {
            parking.ready(&mut pids);
        }
        WOKEN.with(|w| pids.append(&mut w.borrow_mut()));
        for pid in pids.drain(..) {
            shard.resume_parked(pid);
        }
    }
}
