//! Fixed-seed hashing and the per-thread random generator used by the balancers.
//!
//! Everything that must agree between meshgate nodes (Maglev permutations, client-IP hashes)
//! uses [`fnv1a64`] and [`mix64`], which have no per-process keys. Randomness that must *differ*
//! between threads and nodes (P2C candidates) comes from [`rand_u64`].

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

/// FNV-1a over `bytes`, 64-bit. Fixed constants, so the same on every node and every release.
/// Weak on its own (poor avalanche in the high bits), so callers pass it through [`mix64`].
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The splitmix64 finalizer: a bijection on u64 where every input bit flips about half of the
/// output bits.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

thread_local! {
    /// wyrand state, one per thread so picks on different threads never share a cache line.
    /// Seeded lazily from the clock, the thread id and std's per-process random keys, so threads
    /// and nodes draw different sequences.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::clock::now_ns());
    std::hash::Hash::hash(&std::thread::current().id(), &mut h);
    h.finish()
}

/// Next value of this thread's wyrand generator: not cryptographic, a few instructions, no
/// allocation.
#[inline]
pub fn rand_u64() -> u64 {
    RNG.with(|state| {
        let mut local = LocalRng(state.get());
        let r = local.next_u64();
        state.set(local.0);
        r
    })
}

/// wyrand on a local variable, for loops that draw many numbers per pick: seeded once from
/// [`rand_u64`], it saves the thread-local access per draw.
#[derive(Debug, Clone, Copy)]
pub struct LocalRng(pub u64);

impl LocalRng {
    pub fn from_thread() -> Self {
        LocalRng(rand_u64())
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }
}

/// Map a uniform u64 onto `0..n` without a division (Lemire's multiply-shift).
#[inline]
pub fn below(r: u64, n: usize) -> usize {
    ((u128::from(r) * n as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let i = below(rand_u64(), 7);
            seen[i] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(below(u64::MAX, 7), 6);
        assert_eq!(below(0, 7), 0);
    }

    #[test]
    fn threads_draw_different_sequences() {
        let here: Vec<u64> = (0..4).map(|_| rand_u64()).collect();
        let there = std::thread::spawn(|| (0..4).map(|_| rand_u64()).collect::<Vec<_>>())
            .join()
            .unwrap();
        assert_ne!(here, there);
    }
}
