//! A single-core "something changed" signal.
//!
//! Owned by one shard; never crosses threads. Waiters take a ticket and are
//! woken by the next `notify_all` after it.
//!
//! Waiting costs O(1) per waiter: a waiting future owns one slot in a slab
//! (its waker, replaced in place when the task moves), so thousands of idle
//! waiters (push subscriptions at the end of a log) cost nothing until they
//! are woken, and a re-poll never scans the others.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    waiters: RefCell<Slots>,
}

/// Wakers by slot; free slots are reused.
#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
    live: usize,
}

impl Slots {
    fn insert(&mut self, w: Waker) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.wakers[i] = Some(w);
                i
            }
            None => {
                self.wakers.push(Some(w));
                self.wakers.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) {
        if self.wakers[i].take().is_some() {
            self.live -= 1;
            self.free.push(i);
        }
    }
}

impl Notify {
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        let mut wakers = {
            let mut s = self.waiters.borrow_mut();
            s.free.clear();
            s.live = 0;
            std::mem::take(&mut s.wakers)
        };
        for w in wakers.drain(..).flatten() {
            w.wake();
        }
        // The slab keeps its capacity: waiting again after a wake-up (a
        // stream at the end of its log, once per append) allocates nothing.
        let mut s = self.waiters.borrow_mut();
        if s.wakers.is_empty() {
            s.wakers = wakers;
        }
    }

    /// A future that completes at the next `notify_all` after this call.
    pub fn changed(&self) -> Changed<'_> {
        Changed {
            notify: self,
            seen: self.generation.get(),
            slot: None,
        }
    }

    /// Futures waiting now.
    pub fn waiters(&self) -> usize {
        self.waiters.borrow().live
    }
}

pub struct Changed<'a> {
    notify: &'a Notify,
    seen: u64,
    /// Its slot, valid while no `notify_all` happened since it was taken
    /// (`notify_all` empties the slab and bumps the generation).
    slot: Option<usize>,
}

impl Future for Changed<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.seen {
            self.slot = None;
            return Poll::Ready(());
        }
        let notify = self.notify;
        let mut slots = notify.waiters.borrow_mut();
        match self.slot {
            Some(i) => match &mut slots.wakers[i] {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            },
            None => {
                let i = slots.insert(cx.waker().clone());
                drop(slots);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Changed<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            if self.notify.generation.get() == self.seen {
                self.notify.waiters.borrow_mut().remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(f: &mut Pin<Box<Changed<'_>>>, w: &Waker) -> Poll<()> {
        f.as_mut().poll(&mut Context::from_waker(w))
    }

    #[test]
    fn waiters_cost_one_slot_and_leave_none_behind() {
        let n = Notify::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut futs: Vec<_> = (0..1000).map(|_| Box::pin(n.changed())).collect();
        for f in &mut futs {
            assert!(poll(f, &waker).is_pending());
            // Re-polls reuse the slot.
            assert!(poll(f, &waker).is_pending());
        }
        assert_eq!(n.waiters(), 1000);
        // A dropped waiter gives its slot back.
        futs.truncate(500);
        assert_eq!(n.waiters(), 500);
        n.notify_all();
        assert_eq!(count.0.load(Ordering::SeqCst), 500);
        assert_eq!(n.waiters(), 0);
        for f in &mut futs {
            assert!(poll(f, &waker).is_ready());
        }
        // A waiter taken after the notify waits for the next one.
        let mut late = Box::pin(n.changed());
        assert!(poll(&mut late, &waker).is_pending());
        drop(futs);
        assert_eq!(n.waiters(), 1);
        n.notify_all();
        assert!(poll(&mut late, &waker).is_ready());
    }
}
