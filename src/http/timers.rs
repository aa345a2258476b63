//! Response-head deadlines on timers kept per worker thread.
//!
//! A timer stays registered with tokio's timer wheel when it is given back, so reusing it for a
//! later deadline is one atomic update, where a new timer per response cost an insertion and a
//! removal under the wheel's lock. (Deadlines are one response timeout after the attempt, so a
//! reused timer's new deadline is later than its old one unless services' timeouts differ;
//! moving one earlier takes the lock again.) A pooled timer whose old deadline passes unused
//! wakes the task that polled it last once: a spurious wake-up, answered with `Pending`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::error::ProxyError;
use crate::clock;

/// Timers kept per thread: 128 KiB at most. Enough for the responses a busy worker awaits at
/// once (HTTP/2 clients keep many streams open: 64 connections of 10 streams each emptied a
/// 128-timer pool over and over, one malloc and free per response).
const POOL_MAX: usize = 1024;

thread_local! {
    static POOL: RefCell<Vec<Pin<Box<Sleep>>>> = const { RefCell::new(Vec::new()) };
}

/// A timer taken from the pool, given back when dropped.
struct Pooled(Option<Pin<Box<Sleep>>>);

impl Pooled {
    fn new(deadline: Instant) -> Pooled {
        let timer = match POOL.with(|p| p.borrow_mut().pop()) {
            Some(mut t) => {
                t.as_mut().reset(deadline);
                t
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Pooled(Some(timer))
    }

    fn get(&mut self) -> Pin<&mut Sleep> {
        self.0.as_mut().expect("taken until dropped").as_mut()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            // `try_with`: a timer dropped while its thread shuts down is freed.
            let _ = POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(t);
                }
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// `fut` bounded by a deadline on a pooled timer, taken only if `fut` is pending when
    /// first polled ([`within`]).
    pub(crate) struct Within<F> {
        #[pin]
        fut: F,
        deadline: Option<Instant>,
        timer: Option<Pooled>,
    }
}

impl<T, F: Future<Output = Result<T, ProxyError>>> Future for Within<F> {
    type Output = Result<T, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(v);
        }
        let Some(deadline) = *this.deadline else {
            return Poll::Pending;
        };
        let timer = this.timer.get_or_insert_with(|| Pooled::new(deadline));
        timer
            .get()
            .poll(cx)
            .map(|()| Err(ProxyError::ResponseTimeout))
    }
}

/// `fut` bounded by the service's response timeout, if it has one, counted from `since_ns`
/// (the process clock, [`clock::now_ns`]: the caller's timestamp of the attempt, so the
/// deadline costs no clock read of its own), on a pooled timer. A named future, not an
/// `async fn`: that would keep `fut` twice in its state.
pub(crate) fn within<T, F>(limit: Option<Duration>, since_ns: u64, fut: F) -> Within<F>
where
    F: Future<Output = Result<T, ProxyError>>,
{
    Within {
        fut,
        deadline: limit.map(|l| (clock::instant_at_ns(since_ns) + l).into()),
        timer: None,
    }
}

#[cfg(test)]
mod tests {
    /// A pooled timer fires at its new deadline whether that is earlier than its old one (the
    /// wheel entry is moved), later (its state is extended), or after it already fired.
    #[tokio::test]
    async fn pooled_timers_fire_at_their_new_deadline() {
        use super::{within, Pooled, ProxyError};
        use crate::clock;
        use std::time::Duration;
        use tokio::time::Instant;
        async fn times_out_after(ms: u64) -> Duration {
            let start = Instant::now();
            let pending = std::future::pending::<Result<(), ProxyError>>();
            let limit = Some(Duration::from_millis(ms));
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                within(limit, clock::now_ns(), pending),
            );
            let r = r.await.expect("the timer did not fire within 5 s");
            assert_eq!(r, Err(ProxyError::ResponseTimeout));
            start.elapsed()
        }
        // Leave a timer with a far deadline in the pool, then reuse it for a near one.
        drop(Pooled::new(Instant::now() + Duration::from_secs(3600)));
        let waited = times_out_after(50).await;
        assert!(waited >= Duration::from_millis(45), "{waited:?}");
        // Reused after firing, and for a later deadline.
        let waited = times_out_after(120).await;
        assert!(waited >= Duration::from_millis(115), "{waited:?}");
        // A future that finishes first wins; no limit, no timer.
        let ready = async { Ok::<_, ProxyError>(7) };
        assert_eq!(within(Some(Duration::from_secs(1)), 0, ready).await, Ok(7));
        let ready = async { Ok::<_, ProxyError>(8) };
        assert_eq!(within(None, 0, ready).await, Ok(8));
    }
}
