//! How often each key was wanted lately, roughly: the frequency sketch
//! behind the keep-warm tier's admission filter (`raw/tier.rs`), as
//! TinyLFU keeps one.
//!
//! A count-min sketch of 4-bit counters, sixteen to a word. A hash names
//! one counter in each of four rows (a row is a quarter of every word, so
//! two rows never share a counter), and its estimate is the least of the
//! four: a collision can only make a key look more popular than it is,
//! and it takes one in every row to do so. An increment raises only the
//! counters that hold that least value (a conservative update), which
//! keeps collisions from inflating the others. Counters stop at 15: the
//! sketch tells "hot" from "seen once or twice", not 15 from 200.
//!
//! Every `period` increments (twenty per value the tier holds) all
//! counters are halved: a count is a recent popularity, and a key hot an hour ago
//! and never wanted since fades to nothing within a few periods.
//!
//! Plain integers, no atomics: the tier's mutex guards the sketch, and
//! only the tier's slow paths (admission, the hand) reach it. What it
//! decides depends on the keys' hashes and the order of accesses alone,
//! never on addresses or per-thread draws, so a loom model that fixes its
//! hasher replays the same decisions for the same schedule.

use crate::identity::folded_multiply;

/// Sixteen 4-bit counters: the low bit of each.
const LOW_BITS: u64 = 0x1111_1111_1111_1111;

/// Increments between two halvings, per value the tier holds. Longer
/// than TinyLFU's ten: the sketch hears of hits on held values only once
/// a pass of the tier's hand, so it needs a longer memory to tell a hot
/// value from a warm one; a value hot long ago still fades within a few
/// periods (four halvings take 15 to 0).
const PERIOD_PER_VALUE: usize = 20;

/// The fewest words a sketch takes (2 KiB, 1 024 counters a row): a tier
/// of a few values still tells a thousand keys apart. A key whose counter in every row is also
/// a held value's passes for as popular as the coldest of those, and may
/// evict one: with 64 words, a tier of ten holding eight hot values
/// rebuilt a hot one in 20 of 20 000 runs of 1 600 one-off loads each;
/// with 256 words, whose rows have four times the counters (a collision
/// in all four rows 256 times rarer), in none of 40 000.
const FEWEST_WORDS: usize = 256;

/// The most words a sketch takes (128 MiB): tiers of more than 2^24
/// values share counters more.
const MOST_WORDS: usize = 1 << 24;

/// The counters of recent accesses; see the module docs.
pub(crate) struct FrequencySketch {
    /// Sixteen 4-bit counters a word; a power of two of words.
    words: Box<[u64]>,
    /// Increments since the counters were last halved.
    additions: usize,
    /// Increments between two halvings.
    period: usize,
}

impl FrequencySketch {
    /// A sketch for a tier of `capacity` values: a word (sixteen counters,
    /// four a row) per value, rounded up to a power of two,
    /// [`FEWEST_WORDS`] at least, halved every `20 * capacity` increments.
    pub(crate) fn new(capacity: usize) -> Self {
        let words = capacity.clamp(FEWEST_WORDS, MOST_WORDS).next_power_of_two();
        FrequencySketch {
            words: vec![0; words].into_boxed_slice(),
            additions: 0,
            period: capacity.max(1).saturating_mul(PERIOD_PER_VALUE),
        }
    }

    /// A sketch like `new(capacity)`'s, halved every `period` increments.
    #[cfg(all(test, not(weakrefs_loom)))]
    pub(crate) fn with_period(capacity: usize, period: usize) -> Self {
        FrequencySketch {
            period,
            ..FrequencySketch::new(capacity)
        }
    }

    /// The four counters of `hash`, each as (word, shift of its low bit).
    #[inline]
    fn counters(&self, hash: u64) -> [(usize, u32); 4] {
        // Remixed: the map's hasher is the user's, and may be weak (an
        // identity hash of integers would put neighbours side by side).
        let first = mix(hash, 0x9E37_79B9_7F4A_7C15);
        let second = mix(first, 0xC4CE_B9FE_1A85_EC53);
        let mask = self.words.len() - 1;
        // Word indexes from bits 0..24 and 32..56 of each mix (a mask is
        // below 2^24); the counter within each row's quarter from the top
        // byte of the first.
        let words = [
            first as usize & mask,
            (first >> 32) as usize & mask,
            second as usize & mask,
            (second >> 32) as usize & mask,
        ];
        let mut counters = [(0, 0); 4];
        for (row, (counter, word)) in counters.iter_mut().zip(words).enumerate() {
            let within = (first >> (56 + 2 * row)) as u32 & 3;
            *counter = (word, (row as u32 * 4 + within) * 4);
        }
        counters
    }

    /// How often `hash` was seen lately, 0 to 15 (never less than it was).
    pub(crate) fn estimate(&self, hash: u64) -> u8 {
        self.least(&self.counters(hash))
    }

    /// The least of `counters`' values: a key's estimate.
    #[inline]
    fn least(&self, counters: &[(usize, u32); 4]) -> u8 {
        counters
            .iter()
            .map(|&(word, shift)| (self.words[word] >> shift) as u8 & 15)
            .min()
            .unwrap_or(0)
    }

    /// Counts one access to `hash`; halves every counter once `period`
    /// increments have added up.
    pub(crate) fn increment(&mut self, hash: u64) {
        let counters = self.counters(hash);
        let least = self.least(&counters);
        if least == 15 {
            return;
        }
        for (word, shift) in counters {
            // Only the counters at the least: the others are overstated by
            // collisions already.
            if (self.words[word] >> shift) & 15 == u64::from(least) {
                self.words[word] += 1 << shift;
            }
        }
        self.additions += 1;
        if self.additions >= self.period {
            self.halve();
        }
    }

    /// Halves every counter (rounding down): the sketch's aging.
    fn halve(&mut self) {
        for word in self.words.iter_mut() {
            // Each counter's low bit drops out; nothing crosses into the
            // counter below, whose top bit the mask clears.
            *word = (*word >> 1) & (LOW_BITS * 7);
        }
        self.additions /= 2;
    }
}

/// Two rounds of the identity hasher's mixing step: every output bit
/// depends on every input bit.
#[inline]
fn mix(hash: u64, seed: u64) -> u64 {
    folded_multiply(
        folded_multiply(hash ^ seed, 0xFF51_AFD7_ED55_8CCD),
        seed | 1,
    )
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;

    #[test]
    fn counts_saturate_at_fifteen() {
        let mut sketch = FrequencySketch::new(1 << 10);
        for expected in 1..=20u8 {
            sketch.increment(42);
            assert_eq!(sketch.estimate(42), expected.min(15));
        }
        assert_eq!(sketch.estimate(43), 0, "another key");
    }

    #[test]
    fn halving_ages_every_counter() {
        // Room for a thousand keys, halved every 80 increments.
        let mut sketch = FrequencySketch::with_period(1 << 10, 80);
        for _ in 0..12 {
            sketch.increment(1);
        }
        for _ in 0..5 {
            sketch.increment(2);
        }
        assert_eq!((sketch.estimate(1), sketch.estimate(2)), (12, 5));
        sketch.halve();
        assert_eq!((sketch.estimate(1), sketch.estimate(2)), (6, 2));
        // Three periods of other keys, each seen once, age 1 away.
        for key in 100..100 + 3 * 80 {
            sketch.increment(key);
        }
        assert_eq!(sketch.estimate(1), 0, "faded");
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "tens of thousands of increments for a statistical property; the other tests cover every path"
    )]
    fn many_keys_rarely_overstate_a_key_much() {
        // A sketch for 1 000 values, 1 000 keys seen once each (less than a
        // period, so nothing is halved): collisions must seldom reach
        // every row of a key.
        let mut sketch = FrequencySketch::new(1_000);
        for key in 0..1_000u64 {
            sketch.increment(key);
        }
        let overstated = (0..1_000u64).filter(|&k| sketch.estimate(k) > 1).count();
        assert!(
            overstated < 10,
            "{overstated} of 1 000 keys look seen twice"
        );
        let unseen = (1_000..11_000u64)
            .filter(|&k| sketch.estimate(k) > 0)
            .count();
        assert!(unseen < 100, "{unseen} of 10 000 unseen keys look seen");
    }
}
