//! `IdentityState`: the default hasher of the collections that file objects
//! by address (`WeakSet`, `WeakKeyMap`).
//!
//! A key here is a block address the allocator chose, hashed once per
//! operation, so the hash is a large share of a lookup: SipHash-1-3 spends
//! about 140 instructions on one word. This hasher spends a few: a folded
//! multiply (the full 128-bit product of two words, its halves XORed
//! together) per word written, and one more in `finish`. A folded multiply
//! makes every output bit depend on every input bit; the second one spreads
//! the first's weaker low bits, so the shard (top bits), home group (bits
//! 4 to 31) and control byte (bits 4 to 10) the table takes from one hash
//! are each well mixed on their own (`tests::every_bit_range_is_spread`).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};

/// A [`BuildHasher`] for object addresses: the default hasher of
/// [`WeakSet`](crate::WeakSet) and [`WeakKeyMap`](crate::WeakKeyMap).
///
/// Those collections hash nothing but the address of an object's block
/// (where its counts and value live), once per operation, and
/// std's [`RandomState`] (SipHash-1-3) would be most of what a lookup
/// costs. SipHash is there to stop an attacker who picks the keys' bytes
/// from steering them all into one bucket; here nobody picks the keys but
/// the allocator, so all that is needed is that collisions are not
/// predictable and that the bits a table uses are well spread. Each
/// instance draws its own random seed (from [`RandomState`], once, when it
/// is made), so two collections place the same object differently, and
/// hashes a word with two folded multiplies (the full 128-bit product of
/// two words, its halves XORed together), mixing every input bit into
/// every output bit.
///
/// Any byte string can be hashed too ([`Hasher::write`] is correct for
/// every input), but for keys that outsiders choose, such as strings from
/// a network, prefer [`RandomState`]. Any other hasher can be passed to
/// the collections' `with_hasher`.
///
/// # Examples
///
/// ```
/// use std::hash::BuildHasher;
/// use weakrefs::{IdentityState, Strong, WeakSet};
///
/// let state = IdentityState::new();
/// let object = Strong::new("listener");
/// let address = Strong::as_ptr(&object) as usize;
/// // One instance hashes alike every time; another one, seeded anew, not.
/// assert_eq!(state.hash_one(address), state.clone().hash_one(address));
/// assert_ne!(state.hash_one(address), IdentityState::new().hash_one(address));
///
/// // The collections' default:
/// let set: WeakSet<&str, IdentityState> = WeakSet::new();
/// set.insert(&object);
/// assert!(set.contains(&object));
/// ```
#[derive(Clone)]
pub struct IdentityState {
    seed: Seed,
}

/// The three random words of an instance: where a hash starts, what each
/// written word is multiplied by, and what `finish` multiplies by.
#[derive(Clone, Copy)]
struct Seed {
    start: u64,
    word: u64,
    finish: u64,
}

impl IdentityState {
    /// A new instance with a random seed of its own.
    ///
    /// ```
    /// use std::hash::BuildHasher;
    /// let (a, b) = (weakrefs::IdentityState::new(), weakrefs::IdentityState::new());
    /// assert_ne!(a.hash_one(0x1000usize), b.hash_one(0x1000usize));
    /// ```
    pub fn new() -> Self {
        // std seeds each `RandomState` anew (per thread, then one step per
        // instance), so three hashes of one of them are three words nobody
        // outside can predict: the cost of one SipHash, three times, per
        // collection rather than per operation.
        let random = RandomState::new();
        let draw = |salt: u64| random.hash_one(salt);
        IdentityState {
            seed: Seed {
                start: draw(0),
                // Multipliers with high and low bits set: a multiplier with
                // a long run of zeros at either end would leave a range of
                // the product depending on few input bits.
                word: draw(1) | (1 << 63) | 1,
                finish: draw(2) | (1 << 63) | 1,
            },
        }
    }
}

impl Default for IdentityState {
    /// As [`IdentityState::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for IdentityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The seed stays private, as `RandomState`'s keys do.
        f.debug_struct("IdentityState").finish_non_exhaustive()
    }
}

impl BuildHasher for IdentityState {
    type Hasher = IdentityHasher;

    #[inline]
    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher {
            state: self.seed.start,
            seed: self.seed,
        }
    }
}

/// The [`Hasher`] an [`IdentityState`] builds. Fast for the one word an
/// address is ([`write_usize`](Hasher::write_usize)), correct for any
/// bytes.
///
/// ```
/// use std::hash::{BuildHasher, Hasher};
///
/// let state = weakrefs::IdentityState::new();
/// let hash_of = |bytes: &[u8]| {
///     let mut hasher = state.build_hasher();
///     hasher.write(bytes);
///     hasher.finish()
/// };
/// assert_eq!(hash_of(b"any bytes"), hash_of(b"any bytes"));
/// assert_ne!(hash_of(b"\0"), hash_of(b"\0\0")); // lengths count
/// ```
#[derive(Clone)]
pub struct IdentityHasher {
    state: u64,
    seed: Seed,
}

/// The full product of `a` and `b`, its high half XORed onto its low half:
/// each bit of the result depends on every bit of both (though the lowest
/// bits on fewer ways than the middle ones, which `finish`'s second round
/// makes up for).
#[inline(always)]
pub(crate) fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl IdentityHasher {
    /// Absorbs one word.
    #[inline(always)]
    fn absorb(&mut self, word: u64) {
        self.state = folded_multiply(self.state ^ word, self.seed.word);
    }
}

impl fmt::Debug for IdentityHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityHasher").finish_non_exhaustive()
    }
}

impl Hasher for IdentityHasher {
    #[inline]
    fn finish(&self) -> u64 {
        // Rotated so that a state of zero (an input equal to the start
        // word) does not stay zero.
        folded_multiply(
            self.state ^ self.seed.start.rotate_left(32),
            self.seed.finish,
        )
    }

    /// Any bytes: whole words, then the rest with its length in the top
    /// byte, so inputs that differ in length alone hash apart.
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let word: [u8; 8] = word.try_into().expect("chunks of eight");
            self.absorb(u64::from_le_bytes(word));
        }
        let rest = words.remainder();
        let mut tail = [0; 8];
        tail[..rest.len()].copy_from_slice(rest);
        // `rest.len()` < 8, and the byte it fills is never one of the rest's.
        tail[7] = rest.len() as u8 | 0x80;
        self.absorb(u64::from_le_bytes(tail));
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.absorb(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.absorb(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.absorb(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.absorb(i);
    }

    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.absorb(i as u64);
        self.absorb((i >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.absorb(i as u64);
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;
    use crate::strong::Strong;

    /// Addresses from real allocations, as the collections see them: the
    /// blocks of objects of one size, allocated one after another, most
    /// only a few words apart, their low bits always zero.
    fn addresses(count: usize) -> (Vec<Strong<u64>>, Vec<u64>) {
        let objects: Vec<_> = (0..count as u64).map(Strong::new).collect();
        let addresses = objects
            .iter()
            .map(|object| Strong::identity(object) as u64)
            .collect();
        (objects, addresses)
    }

    const COUNT: usize = 16_384;

    /// `bits` bits of each hash from bit `shift` up, counted by value, fall
    /// within five and a half standard deviations of an even spread (a
    /// miss once in about ten million runs by chance).
    fn assert_spread(hashes: &[u64], shift: u32, bits: u32, what: &str) {
        let buckets = 1usize << bits;
        let mut counts = vec![0usize; buckets];
        for hash in hashes {
            counts[((hash >> shift) as usize) & (buckets - 1)] += 1;
        }
        let expected = hashes.len() as f64 / buckets as f64;
        let slack = 5.5 * expected.sqrt();
        for (value, count) in counts.iter().enumerate() {
            assert!(
                (*count as f64 - expected).abs() <= slack,
                "{what} (bits {shift}..{}): value {value} came {count} times, \
                 expected {expected} ± {slack}",
                shift + bits
            );
        }
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "statistics over 16k hashes, no unsafe code: minutes under Miri"
    )]
    fn every_bit_range_is_spread() {
        let (_blocks, addresses) = addresses(COUNT);
        let state = IdentityState::new();
        let hashes: Vec<u64> = addresses
            .iter()
            .map(|a| state.hash_one(*a as usize))
            .collect();
        // What the table takes: the shard (top bits, up to 256 shards), the
        // control byte (bits 4 to 10), the home group (bits 4 to 31,
        // scaled: their top bits pick it), and the lowest bits, which a
        // table keyed by `hash % groups` would use.
        assert_spread(&hashes, 64 - 4, 4, "shard of 16");
        assert_spread(&hashes, 64 - 7, 7, "shard of 128");
        assert_spread(&hashes, 4, 7, "control byte");
        assert_spread(&hashes, 32 - 6, 6, "home group");
        assert_spread(&hashes, 0, 7, "lowest bits");
        // And every 7-bit window, and every single bit.
        for shift in (0..=57).step_by(3) {
            assert_spread(&hashes, shift, 7, "window");
        }
        for bit in 0..64 {
            assert_spread(&hashes, bit, 1, "bit");
        }
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "statistics over 16k hashes, no unsafe code: minutes under Miri"
    )]
    fn the_raw_addresses_would_fail_the_spread_check() {
        // The check above can fail: the addresses themselves, hashed by
        // nothing, leave their low bits zero.
        let (_blocks, addresses) = addresses(COUNT);
        let spread = std::panic::catch_unwind(|| assert_spread(&addresses, 0, 7, "raw"));
        assert!(spread.is_err(), "raw addresses passed the spread check");
    }

    #[test]
    fn two_instances_hash_apart_and_clones_alike() {
        let (_blocks, addresses) = addresses(64);
        let (a, b) = (IdentityState::new(), IdentityState::new());
        let a2 = a.clone();
        for address in addresses {
            let address = address as usize;
            assert_ne!(a.hash_one(address), b.hash_one(address));
            assert_eq!(a.hash_one(address), a2.hash_one(address));
        }
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "statistics over 16k hashes, no unsafe code: minutes under Miri"
    )]
    fn distinct_addresses_never_collide_in_practice() {
        let (_blocks, addresses) = addresses(COUNT);
        let state = IdentityState::new();
        let mut hashes: Vec<u64> = addresses
            .iter()
            .map(|a| state.hash_one(*a as usize))
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), COUNT, "two of {COUNT} addresses collided");
    }

    fn hash_bytes(state: &IdentityState, bytes: &[u8]) -> u64 {
        let mut hasher = state.build_hasher();
        hasher.write(bytes);
        hasher.finish()
    }

    #[test]
    fn bytes_hash_consistently_and_apart() {
        let state = IdentityState::new();
        let inputs: Vec<Vec<u8>> = (0..=24)
            .map(|len| vec![0; len])
            .chain((0..=24).map(|len| (0..len as u8).collect()))
            .chain([b"weakrefs".to_vec(), b"weakrefs\0".to_vec(), vec![0xFF; 9]])
            .collect();
        let mut hashes = Vec::new();
        for input in &inputs {
            let hash = hash_bytes(&state, input);
            assert_eq!(hash, hash_bytes(&state, &input.clone()), "{input:?}");
            assert_eq!(hash, hash_bytes(&state.clone(), input), "{input:?}");
            hashes.push(hash);
        }
        // Equal inputs (the empty one twice) hash alike; all others apart,
        // zero runs of different lengths included.
        let mut distinct: Vec<_> = inputs.iter().zip(&hashes).collect();
        distinct.sort();
        distinct.dedup_by(|a, b| a.0 == b.0);
        let mut unique: Vec<_> = distinct.iter().map(|(_, hash)| **hash).collect();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            distinct.len(),
            "two different inputs collided"
        );
        // `Hash` for a `usize` and for its bytes need not agree, but both
        // go through the same words: a string hashes as `Hash` says.
        assert_eq!(state.hash_one("ab"), state.hash_one(String::from("ab")));
        assert_ne!(state.hash_one("ab"), state.hash_one("ba"));
    }
}
