//! The key sequences the map benchmarks share.

/// Length of every key sequence (a power of two, so a reader wraps with a
/// mask).
pub const SEQUENCE: usize = 1 << 20;

/// A fixed pseudo-random sequence of keys below `keys`: uniform, or skewed
/// (about 80% of reads on 1% of the keys).
pub fn key_sequence(keys: u64, skewed: bool) -> Vec<u64> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..SEQUENCE)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if skewed && state % 10 < 8 {
                (state >> 8) % (keys / 100)
            } else {
                (state >> 8) % keys
            }
        })
        .collect()
}
