//! The keep-warm tier of a `WeakValueMap` (`keep_recent(n)`): the map's
//! own `Strong` to at most `n` of its values, recently inserted, loaded or
//! found ones that are wanted often, so that a popular object survives the
//! moments when no request holds it (SAFETY.md, M13).
//!
//! Recency is approximated by CLOCK over a ring of `n` positions. Each
//! position is one byte readers may touch without a lock: seven bits that
//! name its current holder (the position's *generation*, which moves on,
//! 1 to 127 and round again, each time the position is given to another
//! entry; zero until it is first given out) and a `referenced` bit. An entry's table slot
//! keeps a *mark* beside its item (`MarkedSlot`): its position, plus one,
//! above the generation it was given (zero for none), and above both a
//! *stamp*: how many times the hand had passed that position when a hit
//! last found the entry there. A hit loads the mark and the hand's place
//! (`sweep`, one word all readers share): if the stamp is current, the
//! hand has not passed the position since, and passing is the only way
//! an entry still in the map loses its position, so the hit is done
//! ([`Tier::touch`]): no lock, no read-modify-write, and no line read but
//! the item's slot (which holds the mark: one line, or two for the one
//! slot in four of 24 bytes that straddles a line) and the hand's, which
//! stays in every reader's cache while the hand does not move. Only once
//! a pass has come does a hit check that the position's generation is the mark's and its
//! holder the hit's entry, set `referenced` if it is clear and stamp the
//! mark again; the hand publishes its place only once a pass is over, so
//! a hit that stamps with a pass's count has seen what the pass did (hits
//! during an admission's pass may pass for held on older stamps and be
//! lost, as a bit set just before the hand clears it is; SAFETY.md, M13,
//! also says what a 25-bit stamp's wrap costs). The price is that a stale mark (its entry evicted) passes the generation
//! check if its position has since been given away a multiple of 127
//! times: while the position's bit is set, that hit then neither admits
//! nor marks its entry, as a lost hint would.
//!
//! Everything else (admitting an entry, evicting one, forgetting one that
//! left the map) runs under the tier's mutex, which alone writes
//! positions' holders and generations and holds the values, and the
//! caller holds the entry's shard lock: so the tier holds the value of an
//! entry only while the entry is in the map (removals forget it under that
//! lock, and an admission finds it there under that lock), and an
//! identity, a hook's address, cannot be reused while the tier names it.
//!
//! Admission takes a free position if there is one, else the first whose
//! `referenced` bit the hand finds clear, clearing the bits it passes
//! (so at most two turns, unless hits keep setting bits behind the hand
//! as it goes). In a full tier that *victim* is only a proposal: a
//! frequency filter, as in TinyLFU, lets the candidate take its place
//! only if a sketch of recent accesses (`raw/sketch.rs`, 4-bit counters
//! keyed by the entry's hash, halved every twenty counts a position)
//! counts the candidate more often than the victim, or as often if both
//! were wanted at most once lately ([`admits_over`]). Otherwise the
//! candidate is turned away and the victim stays, its bit cleared; the
//! next candidate faces the next position. So a one-off load from the long
//! tail no longer pushes a hot value out just because nobody held it at
//! that moment, while a value wanted again and again soon outcounts the
//! coldest one held. The sketch counts every access that reaches the
//! mutex (loads, inserts, and the found hits that try to enter), and, for
//! hits on values held, one for each pass of the hand that finds the
//! `referenced` bit set: the hot path itself counts nothing. The sketch
//! lives under the mutex, in plain integers, and keys on hashes alone, so
//! its choices replay under loom. The ring has exactly `n` positions, each
//! holding at most one value: the bound is exact, and once `n` entries
//! have entered (a free position takes anyone), the tier stays full. Evicting only drops the tier's
//! `Strong`: a value some caller holds stays in the map. The values the
//! tier lets go are handed back to the caller, to be dropped after every
//! lock is released (one may be the last handle to its object, whose
//! death then removes its entry).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::sketch::FrequencySketch;
use crate::strong::Strong;
use crate::sync::{
    acquire_fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, CachePadded, Mutex, MutexGuard,
    Ordering,
};

/// The low bit of a position's byte: used since the hand last passed. Set
/// by hits and cleared by the hand with RMWs, so that neither ever writes
/// back a holder's bits the mutex has replaced meanwhile.
const REFERENCED: u8 = 1;

/// The generation a position takes when it is given to a new holder:
/// after `previous`, 1 to 127 and round again (never 0, the byte of a
/// position never given out). Counted per position, not derived from the holder, so that the
/// next holder of a position always differs from the last (and so that
/// nothing depends on where the allocator put a hook: loom replays need
/// the same choices from the same schedule).
#[inline]
fn next_generation(previous: u8) -> u8 {
    previous % 127 + 1
}

/// Bits of a mark below the position: the generation.
const MARK_SHIFT: u32 = 7;

/// Bits of a mark below the stamp: the generation and the position plus
/// one (below `u32::MAX`, so 32 bits).
const STAMP_SHIFT: u32 = MARK_SHIFT + 32;

/// The stamp's bits, once shifted down: 25 of them.
const STAMP_MASK: u64 = u64::MAX >> STAMP_SHIFT;

/// The mark of the entry held at position `at` in generation `generation`,
/// unstamped.
#[inline]
fn mark_of(at: u32, generation: u8) -> u64 {
    (u64::from(at) + 1) << MARK_SHIFT | u64::from(generation)
}

/// The position a mark names (`usize::MAX`, past every ring, for none).
#[inline]
fn position_of(mark: u64) -> usize {
    // The 32 bits above the generation: the position plus one.
    ((mark >> MARK_SHIFT) as u32 as usize).wrapping_sub(1)
}

/// The most turns the hand counts before it counts from 1 again
/// ([`next_turn`]): a pass count (`stamp_at`, the turns plus at most one)
/// then fits a stamp's 25 bits and is never 0, the stamp of a mark never
/// stamped.
const LAST_TURN: u64 = STAMP_MASK - 1;

/// The turn after `turns`, which is 1 to [`LAST_TURN`]: counted from 1
/// again after the last, so that no pass count is ever 0 (a stamp that
/// would read as none) and `sweep` stays below 2^57 (`stamp_is_current`).
/// The pass counts of the turn after the wrap are then no greater than
/// those of the turn before, so every stamp current before it is stale;
/// stamps given in the first turns of the count read as current again
/// when it comes round to them (SAFETY.md, M13: a lost hint).
#[inline]
fn next_turn(turns: u64) -> u64 {
    if turns >= LAST_TURN {
        1
    } else {
        turns + 1
    }
}

/// The stamp a hit gives a mark naming position `at` once it has found
/// the position held by that mark's entry and `referenced` set: the
/// number of times the hand has passed `at` (`sweep` packs the hand's
/// completed turns above its place in the current one), counted from 1
/// again every [`LAST_TURN`] turns: 1 to `STAMP_MASK`, never 0 (the stamp
/// of a mark never stamped).
#[inline]
fn stamp_at(sweep: u64, at: usize) -> u64 {
    let turns = sweep >> 32;
    let hand = sweep as u32 as usize;
    // Positions before the hand have been passed once more this turn.
    turns + u64::from(at < hand)
}

/// Whether `mark`'s stamp is the current pass count of the position it
/// names in `sweep`, `stamp_at(sweep, position_of(mark))` (0, for a mark
/// with no position or no stamp, never is): with one subtraction and one
/// comparison, since every hit on a held value asks it. Above the
/// generation, a mark holds its stamp `s` over the position plus one,
/// `s << 32 | (at + 1)`, and the stamp is current while `sweep` lies in
/// the 2^32 values just below that one. A mark that names no position
/// is 0 (a stamp is only ever added to a mark with a position): the
/// proof needs `at + 1 >= 1`. With `sweep = t << 32 | hand`, and the
/// difference `d = (s << 32 | (at + 1)) - sweep`:
///
/// * `s == t`: `d = at + 1 - hand`, in 1 to 2^32 exactly when `hand <= at`,
///   when `at` has been passed `t` times;
/// * `s == t + 1`: `d = 2^32 + at + 1 - hand`, in 1 to 2^32 exactly when
///   `hand > at` (`hand` being below the ring's length, at most 2^32 - 2),
///   when `at` has been passed `t + 1` times;
/// * any other `s`: `d` is above 2^33 - 2^32, or negative (wrapping far
///   above 2^32 in a `u64`: `sweep` is below 2^57, `t` being at most
///   [`LAST_TURN`]).
///
/// A mark of 0, or one never stamped, has `s = 0`, below every `t`.
#[inline]
fn stamp_is_current(mark: u64, sweep: u64) -> bool {
    (mark >> MARK_SHIFT).wrapping_sub(sweep).wrapping_sub(1) < 1 << 32
}

/// Hashes an identity (a hook node's address) for `Ring::position_of`:
/// one multiply, its two halves folded. Identities are addresses the
/// allocator chose, not keys a client picks, so a keyed hash buys
/// nothing against collisions on purpose, and SipHash cost an admission
/// about 140 of its 900-odd instructions (callgrind: a lookup and an
/// update or two of the map each).
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        let folded = u128::from(self.0 ^ n) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (folded >> 64) as u64 ^ folded as u64;
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// What the mutex guards.
struct Ring<V: ?Sized> {
    /// The value each position holds.
    values: Box<[Option<Strong<V>>]>,
    /// The position of each entry held, by identity.
    position_of: HashMap<usize, u32, BuildHasherDefault<IdentityHasher>>,
    /// The hash of each position's holder, for the sketch.
    hashes: Box<[u64]>,
    /// Positions never used, or freed by `forget`.
    free: Vec<u32>,
    /// Where the next search for a victim starts.
    hand: usize,
    /// Turns the hand has completed, from 1 to [`LAST_TURN`] and round
    /// again ([`next_turn`]), so that no stamp is 0, which marks never
    /// stamped carry.
    turns: u64,
    /// How often each hash was wanted lately: the admission filter's
    /// memory.
    sketch: FrequencySketch,
}

impl<V: ?Sized> Drop for Ring<V> {
    /// Drops the values held one at a time (user destructors: any may be
    /// the last handle): a panic in one neither skips the others nor,
    /// with a second during its unwinding, aborts the process. The first
    /// is resumed once all are dropped (reported if the map's drop is
    /// unwinding already).
    fn drop(&mut self) {
        let values = self.values.iter_mut().map(Option::take);
        crate::panics::drop_each_then_resume("a value's destructor", values);
    }
}

/// An entry offered to the tier: its identity, its key's hash, its slot's
/// mark and its value.
pub(crate) struct Candidate<'m, V: ?Sized> {
    pub(crate) identity: usize,
    pub(crate) hash: u64,
    pub(crate) mark: &'m AtomicU64,
    pub(crate) value: Strong<V>,
}

/// The keep-warm tier; see the module docs.
pub(crate) struct Tier<V: ?Sized> {
    /// A byte per position, as readers see it: its generation above
    /// [`REFERENCED`], the generation written under the mutex only (0
    /// until the position is first given out). A freed position keeps its
    /// generation, the one the next holder's follows; its holder is 0.
    positions: Box<[AtomicU8]>,
    /// The identity of the entry each position holds, 0 when free:
    /// written under the mutex, read by hits only when they find the
    /// position's `referenced` bit clear (once a turn of the hand).
    holders: Box<[AtomicUsize]>,
    /// No position is free: an admission now evicts. Written under the
    /// mutex, read by hits as a hint.
    full: AtomicBool,
    /// Where the hand is, as hits see it: its completed turns above its
    /// place in the current one (`stamp_at`). Published under the mutex
    /// once an admission's pass is over (`publish_sweep`), read by every
    /// hit: on a line of its own, which stays in every reader's cache
    /// while the hand does not move.
    sweep: CachePadded<AtomicU64>,
    ring: Mutex<Ring<V>>,
}

/// A found value that the tier does not hold tries to enter it, once the
/// tier is full, one time in this many: reads of values the tier does not
/// hold seldom take its locks, while a value found often tries soon
/// enough, and then the frequency filter decides ([`admits_over`]). Each
/// try costs more than the read (two locks, the sketch, a pass of the
/// hand, which also makes the held values' stamps stale), and on two
/// threads it moves those lines from core to core. Measured with
/// `map_ab`'s `keep_recent` case (reads with a tier a tenth of the keys
/// against reads without a tier, uniform keys, 2-core machine):
///
/// | one try in | tries wait for the locks | 1 000 keys, 1 / 2 threads | 100 000 keys, 1 / 2 threads |
/// |---|---|---|---|
/// | 8 | yes | 0.64-0.71x / 0.33-0.35x | 0.58-0.69x / 0.34-0.35x |
/// | 64 | no ([`Tier::try_admit`]) | 0.85-0.86x / 0.61x | 0.71-0.76x / 0.64-0.66x |
/// | 1024 | no | 0.91x / 0.78-0.81x | 0.76-0.79x / 0.80-0.82x |
///
/// (the first row from an earlier build; the other two from three runs
/// at 64 and two at 1024, alternated, on one day). The demo's keep-warm
/// cache built 21% of its requests' objects at each of these rates (20.6
/// and 20.9 per 100 requests at 64 and 1024, one run each), since loads
/// and inserts, which try every time, bring the hot set in. A found value
/// the tier does not hold is alive, held by someone; one wanted again and
/// again still tries within about a thousand hits, and faces the filter.
/// Rarer tries count found values less often in the sketch, and the hand,
/// whose passes come with the tries, counts hits on held values less
/// often too, so the filter weighs the two as before.
const FOUND_ADMITS_ONE_IN: u32 = 1024;

impl<V: ?Sized> Tier<V> {
    /// A tier of `capacity` positions (at least one, at most
    /// `u32::MAX - 1`).
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, u32::MAX as usize - 1);
        Tier {
            positions: (0..capacity).map(|_| AtomicU8::new(0)).collect(),
            holders: (0..capacity).map(|_| AtomicUsize::new(0)).collect(),
            full: AtomicBool::new(false),
            sweep: CachePadded::new(AtomicU64::new(1 << 32)),
            ring: Mutex::new(Ring {
                values: (0..capacity).map(|_| None).collect(),
                position_of: HashMap::default(),
                hashes: vec![0; capacity].into_boxed_slice(),
                free: (0..capacity as u32).rev().collect(),
                hand: 0,
                turns: 1,
                sketch: FrequencySketch::new(capacity),
            }),
        }
    }

    /// Positions, the most values the tier holds.
    pub(crate) fn capacity(&self) -> usize {
        self.positions.len()
    }

    /// Values the tier holds now.
    pub(crate) fn len(&self) -> usize {
        let ring = self.ring.lock();
        ring.position_of.len()
    }

    /// Marks the entry named by `identity()`, whose slot's mark is `mark`,
    /// used if the tier holds it. False if it does not (then the caller
    /// admits it, under the shard's lock).
    ///
    /// Once a hit has found its entry held and `referenced` set, it stamps
    /// the mark with the number of times the hand has passed the position
    /// (`stamp_at`): until the hand passes it again, which is the only way
    /// an entry still in the map loses its position, a hit whose mark
    /// carries the current stamp is done, having read nothing but its
    /// mark, in the slot of the item it has just found (on the item's line
    /// unless the slot straddles two), and the hand's place, on a line
    /// every reader shares. Only after a pass does a hit reach the
    /// position's byte, a line of its own in a large tier.
    #[inline]
    pub(crate) fn touch(&self, identity: impl FnOnce() -> usize, mark: &AtomicU64) -> bool {
        // Relaxed, all: hints (see `touch_passed`). A stamp read against a
        // hand that has moved on only sends the hit the slower way.
        let seen = mark.load(Ordering::Relaxed);
        let sweep = self.sweep.load(Ordering::Relaxed);
        if stamp_is_current(seen, sweep) {
            return true;
        }
        self.touch_passed(identity, mark, seen, sweep)
    }

    /// `touch` for a mark (`seen`) not stamped since the hand last passed
    /// its position, as of `sweep`.
    #[inline]
    fn touch_passed(
        &self,
        identity: impl FnOnce() -> usize,
        mark: &AtomicU64,
        seen: u64,
        sweep: u64,
    ) -> bool {
        if seen == 0 {
            // Never given a position (or filled since): not held, and
            // nothing to check. Most hits on a tier smaller than the
            // values read come here.
            return false;
        }
        // What `stamp_is_current`'s proof asks: a mark with a stamp names
        // a position.
        debug_assert!(
            (seen >> MARK_SHIFT) as u32 != 0,
            "a mark without a position is 0"
        );
        let at = position_of(seen);
        let stamp = stamp_at(sweep, at);
        // Acquire: pairs with `publish_sweep`'s Release. If the `sweep`
        // that `stamp` comes from was published by a pass, what that pass
        // did (the bit it cleared, the generation and holder an eviction
        // stored) is seen below, so the stamp is never given to an entry
        // the pass evicted.
        acquire_fence!(self.sweep);
        // Relaxed, all: hints. A stale mark fails the generation check (or
        // the identity check below) and the caller takes the slow path,
        // which decides under the mutexes; a `referenced` bit set on a
        // position the mutex has just given to another entry gives that
        // entry one more turn of the hand.
        let Some(position) = self.positions.get(at) else {
            return false;
        };
        let byte = position.load(Ordering::Relaxed);
        // The mark's generation, where the position keeps it.
        if byte & !REFERENCED != (seen << 1) as u8 {
            return false;
        }
        // The whole identity, once a pass: a stale mark whose generation
        // came round again (127 more holders since) can neither keep the
        // position's real holder referenced nor be stamped; it passes for
        // held only while the bit is set, until the hand next clears it.
        let holds = self.holders[at].load(Ordering::Relaxed) == identity();
        if byte & REFERENCED == 0 {
            if !holds {
                return false;
            }
            position.fetch_or(REFERENCED, Ordering::Relaxed);
        }
        // A compare-exchange against the very mark read, which changes only
        // its stamp: it never writes back a mark that `admit` (under the
        // locks) or a rebuild's copy has replaced meanwhile; lost, it only
        // leaves the next hit the slower way.
        debug_assert!(stamp != 0, "a pass count is never 0 (`next_turn`)");
        if holds {
            let stamped = seen & !(STAMP_MASK << STAMP_SHIFT) | stamp << STAMP_SHIFT;
            let _ = mark.compare_exchange(seen, stamped, Ordering::Relaxed, Ordering::Relaxed);
        }
        true
    }

    /// True if a found value the tier does not hold should try to enter
    /// now: always while a position is free, else one time in
    /// `FOUND_ADMITS_ONE_IN` (a per-thread pseudo-random draw), to face the
    /// frequency filter under the mutex.
    #[inline]
    pub(crate) fn admits_found(&self) -> bool {
        // Relaxed: a hint; the admission itself decides under the mutex.
        !self.full.load(Ordering::Relaxed) || one_in(FOUND_ADMITS_ONE_IN)
    }

    /// Counts an access to the entry named `identity` under `hash`, whose
    /// slot's mark is `mark` and whose value is `value`, and admits it: to
    /// a free position if there is one; in a full tier, in place of the
    /// CLOCK victim if the sketch counts `hash` wanted more often lately
    /// than the victim's hash, or as often when neither was wanted more
    /// than once ([`admits_over`]), else not at all (the victim stays).
    /// Marks the entry used if the tier holds it already. The caller holds the
    /// entry's shard lock and has just seen the entry there. Returns what
    /// the tier let go of (the victim, or `value` itself when the tier
    /// held it already or turned it away), for the caller to drop once it
    /// holds no lock.
    pub(crate) fn admit(
        &self,
        identity: usize,
        hash: u64,
        mark: &AtomicU64,
        value: Strong<V>,
    ) -> Option<Strong<V>> {
        let candidate = Candidate {
            identity,
            hash,
            mark,
            value,
        };
        self.admit_under(self.ring.lock(), candidate)
    }

    /// [`Self::admit`] for a found value ([`Self::admits_found`]), which
    /// never waits: if another thread holds the tier's mutex, the value
    /// does not try this time, and is handed back. A hit is a read, and
    /// the hint it would give is worth less than a reader's wait on a lock
    /// every thread's admissions share (reads on two threads with a tier a
    /// tenth of the keys ran at a third of the speed of reads without one
    /// when hits waited here).
    pub(crate) fn try_admit(&self, candidate: Candidate<'_, V>) -> Option<Strong<V>> {
        match self.ring.try_lock() {
            Some(ring) => self.admit_under(ring, candidate),
            None => Some(candidate.value),
        }
    }

    /// [`Self::admit`] under the tier's mutex, which `ring` holds.
    fn admit_under(
        &self,
        mut ring: MutexGuard<'_, Ring<V>>,
        candidate: Candidate<'_, V>,
    ) -> Option<Strong<V>> {
        let hash = candidate.hash;
        ring.sketch.increment(hash);
        if let Some(&at) = ring.position_of.get(&candidate.identity) {
            // Held already: a racing hit admitted it first, or the caller
            // read its mark in a table a rebuild had just replaced.
            debug_assert!(ring.values[at as usize]
                .as_ref()
                .is_some_and(|held| Strong::ptr_eq(held, &candidate.value)));
            // Relaxed: the generation is written under the mutex alone.
            let generation = self.positions[at as usize].load(Ordering::Relaxed) >> 1;
            // Relaxed, both: hints for readers, as in `touch`.
            candidate
                .mark
                .store(mark_of(at, generation), Ordering::Relaxed);
            self.positions[at as usize].fetch_or(REFERENCED, Ordering::Relaxed);
            drop(ring);
            return Some(candidate.value);
        }
        match ring.free.pop() {
            Some(at) => {
                if ring.free.is_empty() {
                    // Relaxed: a hint for `admits_found`.
                    self.full.store(true, Ordering::Relaxed);
                }
                self.give(&mut ring, at, candidate);
                None
            }
            None => {
                let at = self.victim(&mut ring);
                let victim_hash = ring.hashes[at as usize];
                let wanted = ring.sketch.estimate(hash);
                if !admits_over(wanted, ring.sketch.estimate(victim_hash)) {
                    // Turned away: the victim stays, its bit now clear,
                    // and the next candidate faces the next position.
                    self.publish_sweep(&ring);
                    return Some(candidate.value);
                }
                self.evict_for(&mut ring, at, candidate)
            }
        }
    }

    /// The end of an admission whose pass chose position `at`: evicts its
    /// holder, gives the position to `candidate`, then publishes the
    /// hand's place. Returns the evicted value.
    fn evict_for(
        &self,
        ring: &mut Ring<V>,
        at: u32,
        candidate: Candidate<'_, V>,
    ) -> Option<Strong<V>> {
        let evicted = ring.values[at as usize].take();
        // Where a test puts a racing hit.
        #[cfg(all(test, not(weakrefs_loom)))]
        tests::mid_eviction();
        // Relaxed: written under the mutex alone, which we hold.
        let holder = self.holders[at as usize].load(Ordering::Relaxed);
        ring.position_of.remove(&holder);
        self.give(ring, at, candidate);
        // The hand moved: published after the bits it cleared and the
        // eviction.
        self.publish_sweep(ring);
        evicted
    }

    /// Gives the free (or just emptied) position `at` to `candidate`.
    fn give(&self, ring: &mut Ring<V>, at: u32, candidate: Candidate<'_, V>) {
        let Candidate {
            identity,
            hash,
            mark,
            value,
        } = candidate;
        // Relaxed: readers only compare it (see `touch`); the values are
        // reached under the mutex alone. Unreferenced: the hand gives a new
        // value one turn.
        let position = &self.positions[at as usize];
        let generation = next_generation(position.load(Ordering::Relaxed) >> 1);
        position.store(generation << 1, Ordering::Relaxed);
        // Relaxed: a hint for readers (see `touch`), like the byte.
        self.holders[at as usize].store(identity, Ordering::Relaxed);
        ring.values[at as usize] = Some(value);
        ring.hashes[at as usize] = hash;
        ring.position_of.insert(identity, at);
        // Relaxed: as in `touch`.
        mark.store(mark_of(at, generation), Ordering::Relaxed);
    }

    /// Tells hits where the hand is now (`sweep`), once an admission's
    /// pass is over: the bits it cleared and, if it evicted, the position's
    /// new generation and holder are stored. Release: pairs with the
    /// Acquire fence a hit takes before it looks at a position, so that a
    /// hit that reads this count (and would stamp a mark with it) sees
    /// what the pass did, and cannot stamp an entry it evicted as current;
    /// one that reads an older count stamps with that, which this store
    /// has made stale.
    fn publish_sweep(&self, ring: &Ring<V>) {
        self.sweep
            .store(ring.turns << 32 | ring.hand as u64, Ordering::Release);
    }

    /// The first position past the hand whose `referenced` bit is clear,
    /// clearing the bits it passes and counting an access to each of their
    /// holders in the sketch: within two turns, unless hits keep setting
    /// bits behind it. The ring is full.
    fn victim(&self, ring: &mut Ring<V>) -> u32 {
        loop {
            let at = ring.hand;
            ring.hand = (at + 1) % self.positions.len();
            if ring.hand == 0 {
                ring.turns = next_turn(ring.turns);
            }
            let position = &self.positions[at];
            // Relaxed: a hint set by readers; see `touch`. An RMW, as
            // theirs: the holder bits stay.
            if position.load(Ordering::Relaxed) & REFERENCED != 0 {
                position.fetch_and(!REFERENCED, Ordering::Relaxed);
                // Hits on a held value reach the sketch only here, one a
                // pass of the hand at most: `touch`, the hot path, sets
                // the bit and nothing else. Enough to keep a hot value's
                // count up through the halvings while it is held.
                ring.sketch.increment(ring.hashes[at]);
            } else {
                return at as u32;
            }
        }
    }

    /// Drops the tier's hold on the entry named `identity`, which is
    /// leaving the map under the caller's shard lock. Returns the value,
    /// for the caller to drop once it holds no lock.
    pub(crate) fn forget(&self, identity: usize) -> Option<Strong<V>> {
        let mut ring = self.ring.lock();
        let at = ring.position_of.remove(&identity)?;
        // Relaxed: as in `admit`. The position keeps its generation (the
        // next holder's follows it); a stale mark naming it fails the
        // holder check once the bit is clear.
        self.holders[at as usize].store(0, Ordering::Relaxed);
        ring.free.push(at);
        // Relaxed: a hint for `admits_found`.
        self.full.store(false, Ordering::Relaxed);
        ring.values[at as usize].take()
    }
}

/// The admission filter: whether a candidate the sketch counts `wanted`
/// accesses lately takes the place of a victim it counts `victim`. More
/// wins: a one-off read of the long tail (counted once) never pushes out a
/// hot value that nobody happens to hold between two requests. A tie wins
/// only among the coldest (counted at most once): the newest of the
/// one-offs stays, as in a plain recency tier, while two popular values
/// never trade places for nothing, each swap a rebuild.
#[inline]
fn admits_over(wanted: u8, victim: u8) -> bool {
    wanted > victim || (wanted == victim && victim <= 1)
}

/// True one time in `n`, by a per-thread xorshift generator.
#[inline]
fn one_in(n: u32) -> bool {
    #[cfg(not(weakrefs_loom))]
    {
        use std::cell::Cell;
        std::thread_local! {
            static STATE: Cell<u32> = const { Cell::new(0) };
        }
        STATE
            .try_with(|state| {
                let mut x = state.get();
                if x == 0 {
                    // Seeded from where this thread keeps it: differs
                    // between threads.
                    x = (std::ptr::from_ref(state).addr() as u32) | 1;
                }
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                state.set(x);
                x % n == 0
            })
            .unwrap_or(false)
    }
    // Under loom, deterministic: every found value is admitted.
    #[cfg(weakrefs_loom)]
    {
        let _ = n;
        true
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;

    /// The identity of entry `i`: even, as hook addresses are.
    fn id(i: usize) -> usize {
        i * 8
    }

    /// The hash of entry `i`'s key.
    fn hash(i: usize) -> u64 {
        i as u64
    }

    /// A tier of `capacity` whose sketch forgets every access at once
    /// (halved after each increment): every count is 0, every candidate
    /// ties with the coldest, and the filter never turns one away. For the
    /// tests of positions and marks.
    fn unfiltered(capacity: usize) -> Tier<u32> {
        let tier = Tier::new(capacity);
        tier.ring.lock().sketch = FrequencySketch::with_period(capacity, 1);
        tier
    }

    /// A hit on entry `i` as the map makes it: touch, else admit.
    fn admit(tier: &Tier<u32>, i: usize, marks: &[AtomicU64], value: &Strong<u32>) {
        if !tier.touch(|| id(i), &marks[i]) {
            drop(tier.admit(id(i), hash(i), &marks[i], value.clone()));
        }
    }

    #[test]
    fn the_bound_is_exact_and_the_tier_fills() {
        let tier = unfiltered(3);
        let marks: Vec<_> = (0..10).map(|_| AtomicU64::new(0)).collect();
        let values: Vec<_> = (0..10).map(Strong::new).collect();
        for (identity, value) in values.iter().enumerate().skip(1) {
            admit(&tier, identity, &marks, value);
            assert_eq!(tier.len(), identity.min(3));
        }
        let held: usize = values.iter().map(|v| Strong::strong_count(v) - 1).sum();
        assert_eq!(held, 3);
    }

    #[test]
    fn a_referenced_value_survives_a_turn_of_the_hand() {
        let tier = unfiltered(2);
        let marks: Vec<_> = (0..5).map(|_| AtomicU64::new(0)).collect();
        let values: Vec<_> = (0..5).map(Strong::new).collect();
        admit(&tier, 1, &marks, &values[1]);
        admit(&tier, 2, &marks, &values[2]);
        // A hit on 1 marks it; admitting 3 evicts 2, not 1.
        admit(&tier, 1, &marks, &values[1]);
        admit(&tier, 3, &marks, &values[3]);
        assert_eq!(Strong::strong_count(&values[1]), 2);
        assert_eq!(Strong::strong_count(&values[2]), 1);
        assert_eq!(Strong::strong_count(&values[3]), 2);
    }

    #[test]
    fn generations_run_one_to_127_and_round_again() {
        let mut generation = 0;
        let mut seen = Vec::new();
        for _ in 0..254 {
            generation = next_generation(generation);
            seen.push(generation);
        }
        let expected: Vec<u8> = (1..=127).chain(1..=127).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_stale_mark_is_refused_when_its_position_holds_another_entry() {
        let tier = unfiltered(1);
        let marks: Vec<_> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let values: Vec<_> = (0..3).map(Strong::new).collect();
        admit(&tier, 1, &marks, &values[1]);
        // 2 evicts 1 from the only position; 1's mark still names it.
        drop(tier.admit(id(2), hash(2), &marks[2], values[2].clone()));
        assert_eq!(marks[1].load(Ordering::Relaxed), mark_of(0, 1));
        assert_eq!(marks[2].load(Ordering::Relaxed), mark_of(0, 2));
        assert!(!tier.touch(|| id(1), &marks[1]), "evicted");
        assert!(tier.touch(|| id(2), &marks[2]));
        assert_eq!(Strong::strong_count(&values[1]), 1);
    }

    #[test]
    fn a_stamped_mark_is_refused_once_its_entry_is_evicted() {
        let tier = unfiltered(1);
        let marks: Vec<_> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let values: Vec<_> = (0..3).map(Strong::new).collect();
        admit(&tier, 1, &marks, &values[1]);
        // Found held: the mark takes the current stamp, and a hit with it
        // reads nothing more.
        assert!(tier.touch(|| id(1), &marks[1]));
        assert_ne!(
            marks[1].load(Ordering::Relaxed) >> STAMP_SHIFT,
            0,
            "stamped"
        );
        assert!(tier.touch(|| unreachable!("a current stamp is enough"), &marks[1]));
        // 2 evicts 1: the hand passed 1's position, so the stamp is stale.
        drop(tier.admit(id(2), hash(2), &marks[2], values[2].clone()));
        assert_eq!(Strong::strong_count(&values[1]), 1, "evicted");
        assert!(!tier.touch(|| id(1), &marks[1]), "stale");
        assert!(tier.touch(|| id(2), &marks[2]));
    }

    /// An unfiltered tier of three holding entries 1, 2 and 3 (at
    /// positions 0, 1 and 2), and marks and values for entries
    /// `0..entries`.
    fn holding_one_two_three(entries: u32) -> (Tier<u32>, Vec<AtomicU64>, Vec<Strong<u32>>) {
        let tier = unfiltered(3);
        let marks: Vec<_> = (0..entries).map(|_| AtomicU64::new(0)).collect();
        let values: Vec<_> = (0..entries).map(Strong::new).collect();
        for (i, value) in values.iter().enumerate().take(4).skip(1) {
            admit(&tier, i, &marks, value);
        }
        (tier, marks, values)
    }

    #[test]
    fn a_value_hit_between_every_two_passes_is_never_evicted() {
        // Each round, a hit on 1 and then a one-off admission, which
        // passes 1's position when the hand comes to it: the hit after a
        // pass must set `referenced` again, although its mark was stamped
        // before (a stamp counts passes, so it is stale then).
        let (tier, marks, values) = holding_one_two_three(40);
        for one_off in 4..40 {
            admit(&tier, 1, &marks, &values[1]);
            drop(tier.admit(
                id(one_off),
                hash(one_off),
                &marks[one_off],
                values[one_off].clone(),
            ));
            assert_eq!(
                Strong::strong_count(&values[1]),
                2,
                "1 held after {one_off}"
            );
        }
    }

    std::thread_local! {
        /// What `evict_for` runs once it has taken the victim's value and
        /// before it gives the position away (a test's racing hit).
        static MID_EVICTION: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
            const { std::cell::RefCell::new(None) };
    }

    /// Runs the hit a test put in the middle of an eviction, once.
    pub(super) fn mid_eviction() {
        if let Some(hit) = MID_EVICTION.with(|hook| hook.borrow_mut().take()) {
            hit();
        }
    }

    #[test]
    fn a_hit_racing_an_eviction_does_not_stamp_the_evicted_entry_current() {
        let tier = std::sync::Arc::new(unfiltered(2));
        let marks: std::sync::Arc<Vec<_>> =
            std::sync::Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
        let values: Vec<_> = (0..4).map(Strong::new).collect();
        admit(&tier, 1, &marks, &values[1]);
        admit(&tier, 2, &marks, &values[2]);
        // Hits on 1 while 3's admission evicts it: one after the hand has
        // passed position 0 and chosen it, one in the middle of the
        // eviction. Neither may stamp 1's mark with a count the eviction
        // is part of.
        let mut ring = tier.ring.lock();
        let at = tier.victim(&mut ring);
        assert_eq!(at, 0);
        assert!(tier.touch(|| id(1), &marks[1]));
        let (racing_tier, racing_marks) = (tier.clone(), marks.clone());
        MID_EVICTION.with(|hook| {
            *hook.borrow_mut() = Some(Box::new(move || {
                // Its answer may be either: the value is being let go.
                let _ = racing_tier.touch(|| id(1), &racing_marks[1]);
            }));
        });
        let candidate = Candidate {
            identity: id(3),
            hash: hash(3),
            mark: &marks[3],
            value: values[3].clone(),
        };
        let evicted = tier.evict_for(&mut ring, at, candidate);
        assert!(
            MID_EVICTION.with(|hook| hook.borrow().is_none()),
            "the hit ran"
        );
        drop(ring);
        drop(evicted);
        assert_eq!(Strong::strong_count(&values[1]), 1, "evicted");
        assert!(!tier.touch(|| id(1), &marks[1]), "its stamp is stale");
    }

    /// A tier of one (filtered) holding entry `held`, admitted `times`
    /// times, and marks and values for entries `0..entries`.
    fn one_held_wanted(
        held: usize,
        times: usize,
        entries: u32,
    ) -> (Tier<u32>, Vec<AtomicU64>, Vec<Strong<u32>>) {
        let tier = Tier::new(1);
        let marks: Vec<_> = (0..entries).map(|_| AtomicU64::new(0)).collect();
        let values: Vec<_> = (0..entries).map(Strong::new).collect();
        for _ in 0..times {
            drop(tier.admit(id(held), hash(held), &marks[held], values[held].clone()));
        }
        (tier, marks, values)
    }

    #[test]
    fn a_hit_after_a_turned_away_admission_marks_its_entry_again() {
        // A tier of one holding 1, wanted often and stamped; 2, wanted
        // once, is turned away, its admission's pass clearing 1's bit. The
        // next hit on 1 must set it again (the pass made its stamp stale),
        // or the next candidate would find 1 unreferenced.
        let (tier, marks, values) = one_held_wanted(1, 4, 3);
        assert!(tier.touch(|| id(1), &marks[1]));
        let referenced = || tier.positions[0].load(Ordering::Relaxed) & REFERENCED != 0;
        assert!(referenced());
        drop(tier.admit(id(2), hash(2), &marks[2], values[2].clone()));
        assert_eq!(Strong::strong_count(&values[2]), 1, "turned away");
        assert!(!referenced(), "the pass cleared 1's bit");
        assert!(tier.touch(|| id(1), &marks[1]));
        assert!(referenced(), "the hit after the pass set it again");
    }

    #[test]
    fn a_hit_after_the_hand_passed_its_position_marks_it_again_in_the_same_turn() {
        // Positions 0, 1, 2 hold 1, 2, 3; 1 is hit, then an admission
        // passes position 0 (clearing its bit) and evicts 2 at position 1;
        // 1 is hit again, in the same turn of the hand but after its pass:
        // that hit must set the bit again, or the admissions that follow
        // (the hand passing 2, then 0 again) evict 1.
        let (tier, marks, values) = holding_one_two_three(7);
        admit(&tier, 1, &marks, &values[1]);
        drop(tier.admit(id(4), hash(4), &marks[4], values[4].clone()));
        assert_eq!(
            Strong::strong_count(&values[2]),
            1,
            "2 evicted at position 1"
        );
        admit(&tier, 1, &marks, &values[1]);
        drop(tier.admit(id(5), hash(5), &marks[5], values[5].clone()));
        assert_eq!(
            Strong::strong_count(&values[3]),
            1,
            "3 evicted at position 2"
        );
        drop(tier.admit(id(6), hash(6), &marks[6], values[6].clone()));
        assert_eq!(Strong::strong_count(&values[1]), 2, "1 kept");
        assert_eq!(
            Strong::strong_count(&values[4]),
            1,
            "4 evicted in its place"
        );
    }

    #[test]
    fn turns_count_from_1_again_so_that_no_stamp_is_0() {
        assert_eq!(next_turn(1), 2);
        assert_eq!(next_turn(LAST_TURN - 1), LAST_TURN);
        assert_eq!(next_turn(LAST_TURN), 1);
        // In the last turn, positions the hand has passed take the largest
        // stamp a mark holds, and the rest the turn's count.
        let last = LAST_TURN << 32 | 3;
        assert_eq!(stamp_at(last, 2), STAMP_MASK);
        assert_eq!(stamp_at(last, 3), LAST_TURN);
        // The turn after: every count is below the ones before, and none 0.
        assert_eq!(stamp_at(1 << 32 | 3, 2), 2);
        assert_eq!(stamp_at(1 << 32, 0), 1);
    }

    #[test]
    fn a_current_stamp_is_told_by_one_comparison() {
        // Rings of several lengths, up to the longest a tier has; turns,
        // hands and positions near either end of their ranges; stamps
        // around each position's pass count: `stamp_is_current` answers as
        // the comparison with `stamp_at` it stands for.
        let stamped = |at: usize, stamp: u64| mark_of(at as u32, 5) | stamp << STAMP_SHIFT;
        for len in [1, 2, 3, 7, u32::MAX as usize - 1] {
            let mut places: Vec<usize> = [0, 1, 2, len / 2, len.saturating_sub(2), len - 1]
                .into_iter()
                .filter(|&at| at < len)
                .collect();
            places.dedup();
            for turns in [1, 2, 3, LAST_TURN - 1, LAST_TURN] {
                for &hand in &places {
                    let sweep = turns << 32 | hand as u64;
                    assert!(!stamp_is_current(0, sweep), "no position");
                    for &at in &places {
                        let now = stamp_at(sweep, at);
                        assert!(!stamp_is_current(mark_of(at as u32, 5), sweep));
                        for stamp in [1, 2, 3, now - 1, now, now + 1, LAST_TURN, STAMP_MASK] {
                            let stamp = stamp.min(STAMP_MASK);
                            assert_eq!(
                                stamp_is_current(stamped(at, stamp), sweep),
                                stamp == now,
                                "ring {len}, turn {turns}, hand {hand}, at {at}, stamp {stamp}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn stamps_count_the_passes_of_each_position() {
        // Two turns done, the hand at 3 of the third: positions before it
        // have been passed once more.
        let sweep = 2 << 32 | 3;
        assert_eq!(stamp_at(sweep, 0), 3);
        assert_eq!(stamp_at(sweep, 2), 3);
        assert_eq!(stamp_at(sweep, 3), 2);
        assert_eq!(stamp_at(sweep, usize::MAX), 2, "no position");
        let mark = mark_of(41, 9);
        assert_eq!(position_of(mark), 41);
        assert_eq!(position_of(mark | STAMP_MASK << STAMP_SHIFT), 41);
        assert_eq!(position_of(0), usize::MAX);
        assert_eq!(
            position_of(mark_of(u32::MAX - 2, 127)),
            u32::MAX as usize - 2
        );
    }

    #[test]
    fn a_stale_mark_whose_generation_came_round_neither_passes_nor_keeps_the_holder() {
        let tier = unfiltered(1);
        let marks: Vec<_> = (0..130).map(|_| AtomicU64::new(0)).collect();
        let values: Vec<_> = (0..130).map(Strong::new).collect();
        admit(&tier, 1, &marks, &values[1]);
        // 127 more holders of the one position: the last, 128, has the
        // generation 1 had, and 1's stale mark names it.
        for i in 2..=128 {
            drop(tier.admit(id(i), hash(i), &marks[i], values[i].clone()));
        }
        assert_eq!(
            marks[1].load(Ordering::Relaxed),
            marks[128].load(Ordering::Relaxed)
        );
        // 1's hits are refused (the caller then admits 1), and they do not
        // mark 128 used: the next admission evicts it.
        for _ in 0..3 {
            assert!(!tier.touch(|| id(1), &marks[1]));
        }
        drop(tier.admit(id(129), hash(129), &marks[129], values[129].clone()));
        assert_eq!(Strong::strong_count(&values[128]), 1, "evicted");
        assert_eq!(Strong::strong_count(&values[129]), 2, "held");
    }

    #[test]
    fn a_stale_mark_is_corrected_and_forget_frees_the_position() {
        let tier = unfiltered(2);
        let marks: Vec<_> = (0..4).map(|_| AtomicU64::new(0)).collect();
        let values: Vec<_> = (0..4).map(Strong::new).collect();
        admit(&tier, 1, &marks, &values[1]);
        // A rebuild lost the slot's mark: the hit re-finds the position.
        marks[1].store(0, Ordering::Relaxed);
        admit(&tier, 1, &marks, &values[1]);
        assert_eq!(tier.len(), 1);
        assert_eq!(Strong::strong_count(&values[1]), 2);
        let freed = tier.forget(id(1)).expect("held");
        assert!(Strong::ptr_eq(&freed, &values[1]));
        assert!(tier.forget(id(1)).is_none());
        admit(&tier, 2, &marks, &values[2]);
        admit(&tier, 3, &marks, &values[3]);
        assert_eq!(tier.len(), 2);
        assert!(tier.touch(|| id(2), &marks[2]) && tier.touch(|| id(3), &marks[3]));
        assert!(!tier.touch(|| id(1), &marks[1]), "forgotten");
    }

    #[test]
    fn ties_admit_only_among_the_coldest() {
        assert!(admits_over(1, 0) && admits_over(9, 8));
        assert!(
            admits_over(0, 0) && admits_over(1, 1),
            "one-offs: the newest"
        );
        assert!(
            !admits_over(2, 2) && !admits_over(15, 15),
            "no swap for nothing"
        );
        assert!(!admits_over(1, 2) && !admits_over(0, 1));
    }

    /// Hot keys 0..8, each wanted once every `period` requests, and a
    /// stream of one-off keys (each wanted once) between them, as the map
    /// meets them: a key the tier holds is touched, any other loaded (a
    /// new value and identity) and admitted. Returns how many hot keys
    /// the tier holds at the end.
    fn hot_keys_held_after_one_offs(tier: &Tier<u32>, period: usize) -> usize {
        const HOT: usize = 8;
        const ONE_OFFS: usize = 2_000;
        let marks: Vec<_> = (0..HOT + ONE_OFFS).map(|_| AtomicU64::new(0)).collect();
        let values: Vec<_> = (0..HOT + ONE_OFFS).map(|i| Strong::new(i as u32)).collect();
        let held = |i: usize| Strong::strong_count(&values[i]) == 2;
        for one_off in HOT..HOT + ONE_OFFS {
            if one_off % period == 0 {
                for (hot, value) in values.iter().enumerate().take(HOT) {
                    admit(tier, hot, &marks, value);
                }
            }
            drop(tier.admit(
                id(one_off),
                hash(one_off),
                &marks[one_off],
                values[one_off].clone(),
            ));
        }
        assert_eq!(tier.len(), tier.capacity(), "the tier stays full");
        (0..HOT).filter(|&hot| held(hot)).count()
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "20 000 admissions for a property of the filter: minutes under Miri; the other tests cover its paths"
    )]
    fn a_full_tier_keeps_its_hot_keys_against_a_stream_of_one_off_keys() {
        // Room for the eight hot keys and four more. Hits on the hot keys
        // come once every 16 one-offs, so the hand passes each position
        // between two hits: CLOCK alone (the filter off) lets one-offs
        // push hot keys out, the filter keeps every one.
        assert_eq!(hot_keys_held_after_one_offs(&Tier::new(12), 16), 8);
        assert!(
            hot_keys_held_after_one_offs(&unfiltered(12), 16) < 8,
            "without the filter the test shows nothing"
        );
    }

    #[test]
    fn a_key_wanted_often_enough_is_admitted() {
        // A full tier of four keys each wanted three times.
        let tier = Tier::new(4);
        let marks: Vec<_> = (0..5).map(|_| AtomicU64::new(0)).collect();
        let values: Vec<_> = (0..5).map(Strong::new).collect();
        for _ in 0..3 {
            for i in 0..4 {
                drop(tier.admit(id(i), hash(i), &marks[i], values[i].clone()));
            }
        }
        // Key 4, loaded again and again while nobody holds it: turned
        // away until it has been wanted more often than a victim.
        let mut attempts = 0;
        while Strong::strong_count(&values[4]) == 1 {
            drop(tier.admit(id(4), hash(4), &marks[4], values[4].clone()));
            attempts += 1;
            assert!(attempts <= 8, "wanted four times, it should be in");
        }
        assert!(
            attempts >= 4,
            "admitted after {attempts}, before it was wanted more"
        );
        assert_eq!(tier.len(), 4, "in place of one of them");
    }

    #[test]
    fn aging_lets_a_formerly_hot_key_be_replaced() {
        // A tier of one, its value wanted 30 times (its count stops at 15)
        // and then never again; the sketch halves every 20 increments.
        let (tier, marks, values) = one_held_wanted(0, 30, 2);
        // Key 1 wanted again and again: a count can never pass 15 and a
        // tie at 15 is no reason to swap, so without the halving key 1
        // would never enter. Its first five tries (20 increments in all,
        // 15 of them key 0's) come before any halving: turned away.
        let mut attempts = 0;
        while Strong::strong_count(&values[1]) == 1 {
            drop(tier.admit(id(1), hash(1), &marks[1], values[1].clone()));
            attempts += 1;
            assert!(attempts <= 40, "the old count should have faded");
        }
        assert!(
            attempts > 5,
            "admitted after {attempts}, before any halving"
        );
        assert_eq!(Strong::strong_count(&values[0]), 1, "replaced");
    }
}
