//! Statistics counters that a read path can bump without sharing a cache
//! line with other threads, summed on demand.
//!
//! Each thread takes a *slot* number, the lowest free one, from a
//! process-wide pool the first time it counts, and gives it back when it
//! exits. A set of counters has one cache-line *stripe* per slot below
//! `owned` and one shared overflow stripe. The thread holding slot `k`
//! is the only writer of stripe `k` of every set, so it counts with a
//! plain load and store, no read-modify-write and no line shared with
//! other writers (for the threads with an owned stripe: the first four
//! per CPU, at most 64); threads whose slot is `owned` or more (or that count
//! while their thread-locals are being torn down) share the overflow
//! stripe with `fetch_add`. Counts are therefore exact: a reader summing
//! the stripes sees every increment that happened-before its loads.
//!
//! A slot changes hands only through the pool's mutex, so the last store
//! of a thread that gave slot `k` back happens-before the first load of
//! the next thread that takes it.

use crate::sync::{AtomicU64, Ordering};

/// Most stripes a set owns: threads beyond this share the overflow.
const MAX_OWNED: usize = 64;

/// One thread's counters, on a cache line of their own.
#[repr(align(64))]
struct Stripe<const N: usize>([AtomicU64; N]);

impl<const N: usize> Stripe<N> {
    fn new() -> Self {
        Stripe(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    /// Adds one to counter `which` of a stripe the calling thread owns.
    #[inline(always)]
    fn add_owned(&self, which: usize) {
        let counter = &self.0[which];
        // Relaxed load and store: this thread is the stripe's only writer
        // (it holds the slot), and readers only sum (exact for whatever
        // happened-before their loads).
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// `N` counters, striped per thread (see the module docs), or none at all
/// ([`Counters::disabled`]).
pub(crate) struct Counters<const N: usize> {
    /// The stripe of each slot below its length.
    owned: Box<[Stripe<N>]>,
    /// Shared by every thread without an owned stripe; `None` when the
    /// counters are disabled (then `owned` is empty too).
    overflow: Option<Box<Stripe<N>>>,
}

impl<const N: usize> Counters<N> {
    /// Zeroed counters with a stripe for each of the first few threads
    /// (four per CPU, at most 64).
    pub(crate) fn new() -> Self {
        let owned = if cfg!(weakrefs_loom) {
            0
        } else {
            let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
            (cpus * 4).min(MAX_OWNED)
        };
        Counters {
            owned: (0..owned).map(|_| Stripe::new()).collect(),
            overflow: Some(Box::new(Stripe::new())),
        }
    }

    /// Counters that count nothing and sum to zeros, at the cost of a
    /// thread-local load, a bounds check and a branch a bump.
    pub(crate) fn disabled() -> Self {
        Counters {
            owned: Box::new([]),
            overflow: None,
        }
    }

    /// False for [`Self::disabled`] counters.
    pub(crate) fn enabled(&self) -> bool {
        self.overflow.is_some()
    }

    /// Adds one to counter `which` (`< N`).
    #[inline]
    pub(crate) fn bump(&self, which: usize) {
        // One bounds check decides: a thread without a slot yet (`NONE`)
        // or with one past the owned stripes goes the slow way.
        if let Some(stripe) = self.owned.get(slot::peek()) {
            stripe.add_owned(which);
        } else if let Some(overflow) = &self.overflow {
            self.bump_slow(overflow, which);
        }
    }

    /// [`Self::bump`] for a thread that has no slot yet (it takes one) or
    /// whose slot owns no stripe here.
    #[cold]
    #[inline(never)]
    fn bump_slow(&self, overflow: &Stripe<N>, which: usize) {
        match self.owned.get(slot::current()) {
            Some(stripe) => stripe.add_owned(which),
            // Relaxed: a count; shared by every thread without a stripe.
            None => {
                overflow.0[which].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The counters' totals now.
    pub(crate) fn sum(&self) -> [u64; N] {
        let mut totals = [0; N];
        for stripe in self.owned.iter().chain(self.overflow.as_deref()) {
            for (total, counter) in totals.iter_mut().zip(&stripe.0) {
                // Relaxed: a statistic, exact once the counting threads
                // are quiet (joined, or otherwise synchronised with us).
                *total += counter.load(Ordering::Relaxed);
            }
        }
        totals
    }
}

/// The process-wide pool of thread slots.
#[cfg(not(weakrefs_loom))]
mod slot {
    use std::cell::Cell;

    use crate::sync::Mutex;

    /// No slot yet (or none to be had: the thread is exiting).
    const NONE: usize = usize::MAX;

    /// Slots free for the taking (given back by exited threads), and the
    /// next never-used one.
    struct Pool {
        free: Vec<usize>,
        next: usize,
    }

    static POOL: Mutex<Pool> = Mutex::new(Pool {
        free: Vec::new(),
        next: 0,
    });

    std::thread_local! {
        /// This thread's slot: read on every count, so a plain cell with
        /// a constant initialiser and no destructor.
        static SLOT: Cell<usize> = const { Cell::new(NONE) };
        /// Gives the slot back when the thread exits.
        static HELD: Held = const { Held(Cell::new(NONE)) };
    }

    struct Held(Cell<usize>);

    impl Drop for Held {
        fn drop(&mut self) {
            let slot = self.0.get();
            if slot == NONE {
                return;
            }
            // Counting from here on goes to the overflow stripe.
            let _ = SLOT.try_with(|current| current.set(NONE));
            let mut pool = POOL.lock();
            pool.free.push(slot);
        }
    }

    /// This thread's slot, or `NONE` if it has taken none yet: one load.
    #[inline(always)]
    pub(super) fn peek() -> usize {
        // A constant initialiser and no destructor: never torn down.
        SLOT.try_with(Cell::get).unwrap_or(NONE)
    }

    /// This thread's slot, taken from the pool on first use; `NONE` while
    /// the thread's locals are being torn down.
    #[inline]
    pub(super) fn current() -> usize {
        let slot = SLOT.try_with(Cell::get).unwrap_or(NONE);
        if slot != NONE {
            return slot;
        }
        take()
    }

    #[cold]
    fn take() -> usize {
        // Registered first: if the thread is exiting, we take no slot.
        let Ok(()) = HELD.try_with(|_| ()) else {
            return NONE;
        };
        let slot = {
            let mut pool = POOL.lock();
            // The lowest free slot, so that the stripes in use stay few.
            match pool.free.iter().enumerate().min_by_key(|(_, slot)| **slot) {
                Some((index, _)) => pool.free.swap_remove(index),
                None => {
                    pool.next += 1;
                    pool.next - 1
                }
            }
        };
        let _ = HELD.try_with(|held| held.0.set(slot));
        let _ = SLOT.try_with(|current| current.set(slot));
        slot
    }
}

/// Under loom every thread counts in the overflow stripe.
#[cfg(weakrefs_loom)]
mod slot {
    pub(super) fn peek() -> usize {
        usize::MAX
    }

    pub(super) fn current() -> usize {
        usize::MAX
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_from_many_threads_are_exact() {
        let counters = Arc::new(Counters::<2>::new());
        let per_thread = if cfg!(miri) { 100 } else { 10_000 };
        // More threads than stripes, so the overflow is used too.
        let threads: Vec<_> = (0..counters.owned.len() + 4)
            .map(|t| {
                let counters = counters.clone();
                std::thread::spawn(move || {
                    for _ in 0..per_thread {
                        counters.bump(t % 2);
                    }
                })
            })
            .collect();
        let spawned = threads.len() as u64;
        for thread in threads {
            thread.join().unwrap();
        }
        let [even, odd] = counters.sum();
        assert_eq!(even + odd, spawned * per_thread);
        assert_eq!(even, spawned.div_ceil(2) * per_thread);
    }

    #[test]
    fn threads_that_come_and_go_count_exactly() {
        // Each thread takes a slot, maybe one an exited thread gave back.
        let counters = Counters::<1>::new();
        for _ in 0..3 * (counters.owned.len() + 1) {
            std::thread::scope(|scope| {
                scope.spawn(|| counters.bump(0));
            });
        }
        assert_eq!(counters.sum(), [3 * (counters.owned.len() as u64 + 1)]);
    }

    #[test]
    fn disabled_counters_count_nothing() {
        let counters = Counters::<2>::disabled();
        counters.bump(0);
        std::thread::scope(|scope| {
            scope.spawn(|| counters.bump(1));
        });
        assert_eq!(counters.sum(), [0, 0]);
    }
}
