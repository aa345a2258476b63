//! Memory goes back to the system when load drops.
//!
//! glibc's malloc keeps freed memory in its arenas: after 10,000 connections close, the
//! process would keep their RSS. A background thread watches the number of open downstream
//! connections ([`ConnGuard`]) and, once it has fallen to under half of its peak since the last
//! trim (by at least [`MIN_DROP`]), calls `malloc_trim(0)`, which returns the free pages of
//! every arena (also those in the middle of a heap, via `MADV_DONTNEED`). The check is one
//! atomic load per second; the trim runs off the async workers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Connections that must have closed since the peak before a trim is worth it.
pub const MIN_DROP: usize = 256;

/// How often the trimmer looks.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Counts one open downstream connection while alive.
#[derive(Debug)]
pub struct ConnGuard(());

impl ConnGuard {
    pub fn new() -> ConnGuard {
        OPEN.fetch_add(1, Ordering::Relaxed);
        ConnGuard(())
    }
}

impl Default for ConnGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Downstream connections open now (L4 and HTTP).
pub fn open_connections() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// Should memory be trimmed, given the peak since the last trim and the count now?
pub fn worth_trimming(peak: usize, now: usize) -> bool {
    peak.saturating_sub(now) >= MIN_DROP && now < peak / 2
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim takes the arena locks itself and has no preconditions.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Start the trimmer thread (once per process).
pub fn spawn_trimmer() {
    let spawned = std::thread::Builder::new()
        .name("meshgate-memtrim".into())
        .spawn(|| {
            let mut peak = 0usize;
            loop {
                std::thread::sleep(INTERVAL);
                let now = open_connections();
                peak = peak.max(now);
                if worth_trimming(peak, now) {
                    trim();
                    tracing::debug!(peak, now, "connections closed: memory trimmed");
                    peak = now;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no memory trimmer thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_a_real_drop() {
        assert!(worth_trimming(10_000, 0));
        assert!(worth_trimming(10_000, 4_000));
        assert!(!worth_trimming(10_000, 6_000));
        assert!(!worth_trimming(300, 100));
        assert!(!worth_trimming(0, 0));
    }
}
