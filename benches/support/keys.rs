//! The key streams the map benchmarks share.

/// A pseudo-random stream of keys below `keys`, computed in registers as
/// it goes: a table of precomputed keys would be streamed from memory
/// inside the timed loop and compete with the map for the caches.
/// Uniform, or skewed: about 80% of keys among the first 1% of the keys.
pub struct KeyStream {
    state: u64,
    keys: u64,
    hot: u64,
    skewed: bool,
}

impl KeyStream {
    /// The stream for thread `thread` of a run: each thread its own.
    pub fn new(keys: u64, skewed: bool, thread: usize) -> Self {
        KeyStream {
            // Any odd, thread-distinct seed; xorshift never leaves zero.
            state: (0x9E37_79B9_7F4A_7C15u64 ^ ((thread as u64 + 1) << 32)) | 1,
            keys,
            hot: (keys / 100).max(1),
            skewed,
        }
    }

    /// The next key.
    #[inline(always)]
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        // Multiply-shift maps 64 random bits onto 0..n without a division.
        let below = |n: u64| ((u128::from(x) * u128::from(n)) >> 64) as u64;
        // The low byte, uniform on its own, picks hot or not: 205/256 is
        // about 80%.
        if self.skewed && (x as u8) < 205 {
            below(self.hot)
        } else {
            below(self.keys)
        }
    }
}
