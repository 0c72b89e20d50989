//! A single-threaded one-shot channel (no atomics: sender and receiver live
//! on the same shard). A send to a dropped receiver gives the value back.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

struct Inner<T> {
    value: Option<T>,
    waker: Option<Waker>,
    receiver_alive: bool,
    sender_alive: bool,
}

pub struct Sender<T>(Rc<RefCell<Inner<T>>>);
pub struct Receiver<T>(Rc<RefCell<Inner<T>>>);

pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let inner = Rc::new(RefCell::new(Inner {
        value: None,
        waker: None,
        receiver_alive: true,
        sender_alive: true,
    }));
    (Sender(inner.clone()), Receiver(inner))
}

impl<T> Sender<T> {
    /// Delivers the value, or returns it when the receiver is gone.
    pub fn send(self, value: T) -> Result<(), T> {
        let mut inner = self.0.borrow_mut();
        if !inner.receiver_alive {
            return Err(value);
        }
        inner.value = Some(value);
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        !self.0.borrow().receiver_alive
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut inner = self.0.borrow_mut();
        inner.sender_alive = false;
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.0.borrow_mut().receiver_alive = false;
    }
}

impl<T> Receiver<T> {
    /// Takes a value that was sent but not yet received (used when the
    /// receiver gives up, so that a delivered value is not lost).
    pub fn try_take(&self) -> Option<T> {
        self.0.borrow_mut().value.take()
    }
}

/// Resolves to `None` when the sender was dropped without sending.
impl<T> Future for Receiver<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut inner = self.0.borrow_mut();
        if let Some(v) = inner.value.take() {
            return Poll::Ready(Some(v));
        }
        if !inner.sender_alive {
            return Poll::Ready(None);
        }
        inner.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
