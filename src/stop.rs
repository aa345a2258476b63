//! The graceful stop of a listener's connections, cheap to check on the data path.
//!
//! tokio-util's `CancellationToken::is_cancelled` takes the token's mutex, and polling its wait
//! future checks that and then polls a `Notified`, which locks the `Notify` shared by every
//! connection of the listener to compare wakers. An HTTP connection is polled two or three times
//! per request and asked "stopping?" once or twice more: with the token alone that was several
//! lock round trips per request on one lock shared by every connection and worker thread.
//!
//! [`Graceful`] keeps a flag beside the token. [`Graceful::cancel`] sets the flag first, then
//! cancels the token (which wakes the waiting connections), so a connection woken by the stop
//! sees the flag. A connection registers its waker once (the first poll of the wait future) and
//! afterwards only loads the flag; see [`Stoppable`], the wrapper of every HTTP and L4
//! connection's future. The listener's hard stop (a drain deadline: drop the connections where
//! they stand) travels in the same allocation.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_util::sync::{
    CancellationToken, WaitForCancellationFuture, WaitForCancellationFutureOwned,
};

/// A graceful stop signal: a lock-free flag and the token that wakes those waiting on it;
/// and the hard stop that follows it.
#[derive(Clone, Debug)]
pub struct Graceful(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    stopping: AtomicBool,
    token: CancellationToken,
    hard: CancellationToken,
}

impl Graceful {
    /// A graceful stop, followed by `hard` when that is cancelled.
    pub fn new(hard: CancellationToken) -> Graceful {
        Graceful(Arc::new(Inner {
            stopping: AtomicBool::new(false),
            token: CancellationToken::new(),
            hard,
        }))
    }

    /// Signal the stop: the flag, then the waiters.
    pub fn cancel(&self) {
        self.0.stopping.store(true, Ordering::Release);
        self.0.token.cancel();
    }

    /// Has the stop been signalled? One atomic load.
    pub fn is_cancelled(&self) -> bool {
        self.0.stopping.load(Ordering::Acquire)
    }

    /// Wait for the stop.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.0.token.cancelled()
    }

    /// The token behind the flag (for futures that own their wait).
    pub fn token(&self) -> &CancellationToken {
        &self.0.token
    }

    /// The hard stop.
    pub fn hard(&self) -> &CancellationToken {
        &self.0.hard
    }
}

pin_project_lite::pin_project! {
    /// One downstream connection's future and its listener's two stop signals. When the
    /// graceful one fires, the connection is polled (an HTTP connection checks the signal only
    /// then: an idle one closes, one with a request in flight finishes it; an L4 connection has
    /// nothing to finish and goes on) and the hard one is armed; when that fires, the
    /// connection is dropped where it stands.
    ///
    /// Why here and not a wait inside the connection's own future: that future is what an idle
    /// connection's task holds, and one cancellation wait is 72 bytes; the graceful and the
    /// hard stop share this one slot in turn.
    ///
    /// The wait is polled once, on the first poll, to register the task's waker (a task's waker
    /// stays valid for the life of the task, so it needs no renewal); after that only the
    /// lock-free flag is read until the stop is signalled. Polling the wait every time took the
    /// token's mutex and the lock of the `Notify` shared by every connection of the listener,
    /// on every poll.
    pub struct Stoppable<F> {
        #[pin]
        fut: F,
        // `None` until the first poll (the niche of the token inside: no larger than the wait).
        #[pin]
        stop: Option<WaitForCancellationFutureOwned>,
        signal: Graceful,
    }
}

impl<F> Stoppable<F> {
    /// `fut`, stopped by `signal` (graceful: polled once more; hard: dropped).
    pub fn new(fut: F, signal: Graceful) -> Self {
        Stoppable {
            fut,
            stop: None,
            signal,
        }
    }
}

impl<F: Future<Output = ()>> Future for Stoppable<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.stop.is_none() {
            this.stop
                .set(Some(this.signal.token().clone().cancelled_owned()));
        } else if !this.signal.is_cancelled() {
            return this.fut.poll(cx);
        }
        while let Some(stop) = this.stop.as_mut().as_pin_mut() {
            if stop.poll(cx).is_pending() {
                break;
            }
            if this.signal.hard().is_cancelled() {
                return Poll::Ready(());
            }
            // Graceful stop: arm the hard one (registered by the next turn of this loop),
            // then poll the connection below so it sees the graceful signal.
            this.stop
                .set(Some(this.signal.hard().clone().cancelled_owned()));
        }
        this.fut.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flag_is_set_before_waiters_wake() {
        let g = Graceful::new(CancellationToken::new());
        assert!(!g.is_cancelled());
        let seen = {
            let g = g.clone();
            tokio::spawn(async move {
                g.cancelled().await;
                g.is_cancelled()
            })
        };
        tokio::task::yield_now().await;
        g.cancel();
        assert!(seen.await.unwrap(), "a woken waiter sees the flag");
        assert!(g.is_cancelled() && g.token().is_cancelled());
    }

    /// An L4 connection under [`Stoppable`]: the graceful stop leaves it running (polled once
    /// more), the hard stop drops it; and it is polled normally before either.
    #[tokio::test]
    async fn stoppable_runs_through_graceful_and_is_dropped_at_hard() {
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let hard = CancellationToken::new();
        let g = Graceful::new(hard.clone());
        let dropped = Arc::new(AtomicBool::new(false));
        let guard = Dropped(Arc::clone(&dropped));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(4);
        let (seen_tx, mut seen) = tokio::sync::mpsc::channel::<u32>(4);
        let conn = tokio::spawn(Stoppable::new(
            async move {
                let _guard = guard;
                while let Some(n) = rx.recv().await {
                    let _ = seen_tx.send(n).await;
                }
                std::future::pending::<()>().await
            },
            g.clone(),
        ));
        tx.send(1).await.unwrap();
        assert_eq!(seen.recv().await, Some(1), "polled before any stop");
        g.cancel();
        tx.send(2).await.unwrap();
        assert_eq!(
            seen.recv().await,
            Some(2),
            "still served after the graceful stop"
        );
        assert!(!conn.is_finished() && !dropped.load(Ordering::SeqCst));
        hard.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(2), conn)
            .await
            .expect("dropped at the hard stop")
            .unwrap();
        assert!(dropped.load(Ordering::SeqCst));
    }
}
