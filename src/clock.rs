//! Monotonic process clock in plain integers, so timestamps fit in atomics.
//!
//! `Instant` cannot be stored in an atomic; the data path keeps times as nanoseconds or
//! milliseconds since the process start instead.

use std::sync::OnceLock;
use std::time::Instant;

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds since the process clock started.
#[inline]
pub fn now_ns() -> u64 {
    origin().elapsed().as_nanos() as u64
}

/// Milliseconds since the process clock started.
#[inline]
pub fn now_ms() -> u64 {
    origin().elapsed().as_millis() as u64
}

/// Milliseconds of the kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`), for
/// timestamps that only need to be good to a scheduler tick (idle pooled connections).
///
/// glibc reads it from the vDSO without the cycle counter that `Instant::now` reads, so it
/// costs a few nanoseconds instead of tens in a virtual machine. (Through glibc, not rustix:
/// rustix's own vDSO lookup faults under valgrind.) Its epoch is not the process clock's:
/// compare its values only with each other.
#[inline]
pub fn coarse_ms() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    // Cannot fail for this clock on Linux ≥ 2.6.32.
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(0, |t| {
        t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000
    })
}

/// The `Instant` at `ns` of the process clock (see [`now_ns`]): a deadline computed from a
/// timestamp already taken, without reading the clock again.
#[inline]
pub fn instant_at_ns(ns: u64) -> Instant {
    origin() + std::time::Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clock_advances_and_process_instants_match() {
        let a = coarse_ms();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let b = coarse_ms();
        // One scheduler tick (at most 10 ms) of resolution on either side.
        assert!(
            (20..1000).contains(&(b - a)),
            "coarse clock moved {} ms",
            b - a
        );
        let ns = now_ns();
        let at = instant_at_ns(ns);
        let now = Instant::now();
        assert!(at <= now && now - at < std::time::Duration::from_secs(1));
    }
}
