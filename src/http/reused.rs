//! Heap blocks for per-request futures, kept per worker thread.
//!
//! The HTTP/1 fast path boxes each request's future so that an idle keep-alive connection's
//! task stays small (see [`super::fast1::serve`]). A `Box` per request cost a `malloc` and a
//! `free`, and with many requests in flight at once most of them missed glibc's per-thread
//! cache (7 blocks per size) and went through its bins: about 270 instructions per request.
//! [`ReusedBox`] takes its block from a per-thread list of blocks of the same layout instead,
//! and gives it back when the future is dropped, so a busy worker allocates nothing per request.
//!
//! Blocks move between threads with their futures (tokio may move a task to another worker):
//! a block is an ordinary allocation of the global allocator, so whichever thread drops the
//! future keeps the block or frees it. A thread's list is freed when the thread exits.

#![allow(unsafe_code)]

use std::alloc::Layout;
use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Blocks kept per thread and layout: enough for the requests one worker has in flight at
/// once under load (64 KiB of 1 KiB futures); a burst beyond it allocates as `Box` would.
const KEEP_MAX: usize = 64;

/// Free blocks of one layout.
struct Blocks {
    layout: Layout,
    free: Vec<NonNull<u8>>,
}

/// A thread's free blocks, by layout (a handful of future types use it: a linear search).
struct Lists(Vec<Blocks>);

impl Drop for Lists {
    fn drop(&mut self) {
        for b in &mut self.0 {
            for p in b.free.drain(..) {
                // SAFETY: every block in `b.free` was allocated with `b.layout` by `ReusedBox::new`
                // and is owned by this list alone (no future lives in it any more).
                unsafe { std::alloc::dealloc(p.as_ptr(), b.layout) };
            }
        }
    }
}

thread_local! {
    static LISTS: RefCell<Lists> = const { RefCell::new(Lists(Vec::new())) };
}

/// A free block of `layout` from this thread's list, if there is one.
fn take(layout: Layout) -> Option<NonNull<u8>> {
    LISTS
        .try_with(|l| {
            let mut l = l.borrow_mut();
            l.0.iter_mut()
                .find(|b| b.layout == layout)
                .and_then(|b| b.free.pop())
        })
        .ok()
        .flatten()
}

/// Keep `p` (a block of `layout`, no longer in use) for a later [`take`], or free it.
fn give(layout: Layout, p: NonNull<u8>) {
    let kept = LISTS
        .try_with(|l| {
            let mut l = l.borrow_mut();
            let i = match l.0.iter().position(|b| b.layout == layout) {
                Some(i) => i,
                None => {
                    l.0.push(Blocks {
                        layout,
                        free: Vec::new(),
                    });
                    l.0.len() - 1
                }
            };
            let free = &mut l.0[i].free;
            if free.len() < KEEP_MAX {
                free.push(p);
                true
            } else {
                false
            }
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: `p` was allocated with `layout` and nothing refers to it any more.
        unsafe { std::alloc::dealloc(p.as_ptr(), layout) };
    }
}

/// A future on the heap, in a block reused per thread: `Box::pin(f)` without a `malloc` and
/// `free` per future once the thread has blocks of its layout.
pub(crate) struct ReusedBox<F> {
    ptr: NonNull<F>,
    /// Owns an `F` (drop check); `Box<F>` rather than `F` so that `ReusedBox` is `Unpin`
    /// whatever `F` is: the future never moves while it lives in its block.
    _owns: PhantomData<Box<F>>,
}

// SAFETY: `ReusedBox<F>` owns its `F` exclusively, like `Box<F>`; sending it sends the `F`.
unsafe impl<F: Send> Send for ReusedBox<F> {}
// SAFETY: a shared `&ReusedBox<F>` gives no access to the `F` at all.
unsafe impl<F> Sync for ReusedBox<F> {}

impl<F> ReusedBox<F> {
    /// The future `make` returns, in a block. Made by a closure rather than passed by value:
    /// inlined, the future is written straight into its block. A future passed by value is
    /// built on the stack and copied whole, as large as its largest state (1,000 bytes for
    /// the fast path's request), though a future not yet polled holds only its captures.
    #[inline(always)]
    pub(crate) fn new(make: impl FnOnce() -> F) -> ReusedBox<F> {
        let layout = Layout::new::<F>();
        if layout.size() == 0 {
            // Nothing to allocate; a dangling, aligned pointer is valid for a zero-sized value.
            let ptr = NonNull::<F>::dangling();
            // SAFETY: writing a zero-sized value through an aligned non-null pointer.
            unsafe { ptr.as_ptr().write(make()) };
            return ReusedBox {
                ptr,
                _owns: PhantomData,
            };
        }
        let block = take(layout).unwrap_or_else(|| {
            // SAFETY: `layout` has a non-zero size.
            let p = unsafe { std::alloc::alloc(layout) };
            NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
        });
        let ptr = block.cast::<F>();
        // SAFETY: `block` is an unused allocation of `F`'s size and alignment.
        unsafe { ptr.as_ptr().write(make()) };
        ReusedBox {
            ptr,
            _owns: PhantomData,
        }
    }
}

impl<F: Future> Future for ReusedBox<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the `F` lives in its block, which stays put until `drop` (which drops the `F`
        // in place first), so it is never moved once polled; `&mut self` gives exclusive access.
        let f = unsafe { Pin::new_unchecked(&mut *self.ptr.as_ptr()) };
        f.poll(cx)
    }
}

impl<F> Drop for ReusedBox<F> {
    fn drop(&mut self) {
        let layout = Layout::new::<F>();
        // SAFETY: the `F` was written in `new` and has not been dropped; it is dropped once here.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        if layout.size() != 0 {
            give(layout, self.ptr.cast());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts its drops.
    struct Tracked(Arc<AtomicUsize>, [u64; 40]);

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn tracked_future(
        drops: &Arc<AtomicUsize>,
        v: u64,
    ) -> impl Future<Output = u64> + Send + 'static {
        let t = Tracked(Arc::clone(drops), [v; 40]);
        async move {
            tokio::task::yield_now().await;
            t.1[39]
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_block_is_reused_and_each_future_dropped_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let a = ReusedBox::new(|| tracked_future(&drops, 7));
        let first = a.ptr.as_ptr() as usize;
        assert_eq!(a.await, 7);
        assert_eq!(drops.load(Ordering::Relaxed), 1);
        // The same layout on the same thread: the same block.
        let b = ReusedBox::new(|| tracked_future(&drops, 8));
        assert_eq!(b.ptr.as_ptr() as usize, first);
        // Two at once: the second needs a block of its own.
        let c = ReusedBox::new(|| tracked_future(&drops, 9));
        assert_ne!(c.ptr.as_ptr() as usize, first);
        assert_eq!(b.await + c.await, 17);
        assert_eq!(drops.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_future_dropped_before_it_finishes_is_dropped_in_place() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut f = ReusedBox::new(|| tracked_future(&drops, 1));
        // Polled once (pending at its yield), then abandoned.
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        drop(f);
        assert_eq!(drops.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn kept_blocks_are_bounded_and_zero_sized_futures_need_none() {
        let drops = Arc::new(AtomicUsize::new(0));
        let many: Vec<_> = (0..KEEP_MAX + 10)
            .map(|i| ReusedBox::new(|| tracked_future(&drops, i as u64)))
            .collect();
        drop(many);
        assert_eq!(drops.load(Ordering::Relaxed), KEEP_MAX + 10);
        let layout = Layout::for_value(&tracked_future(&drops, 0));
        let kept = LISTS.with(|l| {
            l.borrow()
                .0
                .iter()
                .find(|b| b.layout == layout)
                .map_or(0, |b| b.free.len())
        });
        assert_eq!(kept, KEEP_MAX);
        assert_eq!(std::mem::size_of::<std::future::Pending<()>>(), 0);
        let mut z = ReusedBox::new(std::future::pending::<()>);
        let waker = futures_noop_waker();
        assert!(Pin::new(&mut z)
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        drop(z);
    }

    /// A moved-to-another-thread future is dropped there and its block kept there.
    #[test]
    fn a_block_dropped_on_another_thread_stays_there() {
        let drops = Arc::new(AtomicUsize::new(0));
        let f = ReusedBox::new(|| tracked_future(&drops, 3));
        let layout = Layout::for_value(&tracked_future(&drops, 0));
        let kept_there = std::thread::spawn(move || {
            drop(f);
            LISTS.with(|l| {
                l.borrow()
                    .0
                    .iter()
                    .find(|b| b.layout == layout)
                    .map_or(0, |b| b.free.len())
            })
        })
        .join()
        .unwrap();
        assert_eq!(kept_there, 1);
        assert_eq!(drops.load(Ordering::Relaxed), 2);
    }

    fn futures_noop_waker() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }
}
