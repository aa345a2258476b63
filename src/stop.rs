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
//! afterwards only loads the flag; see `http::Connection`. The listener's hard stop (a drain
//! deadline: drop the connections where they stand) travels in the same allocation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

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
}
