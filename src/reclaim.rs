//! Epoch-based reclamation: the one module that talks to crossbeam-epoch.
//!
//! A lock-free reader may hold a pointer to memory that a writer has just
//! unlinked. The writer must not free that memory until every such reader is
//! done; it *retires* the memory instead, and crossbeam-epoch frees it once
//! every thread that was pinned at retirement time has unpinned (SAFETY.md,
//! I7).
//!
//! Two things are added on top of crossbeam-epoch:
//!
//! * **An injectable collector.** [`Reclaimer::global`] uses crossbeam's
//!   process-wide default collector and its cached per-thread handle (the
//!   fast path). [`Reclaimer::with_collector`] uses a collector of the
//!   caller's own, so a loom model or a test gets a fresh, isolated one
//!   whose garbage it can account for exactly.
//! * **Bounded garbage.** crossbeam-epoch frees retired memory only when a
//!   thread happens to collect, which it does every 128 pins; a thread that
//!   retires faster than that piles garbage up without bound (crossbeam
//!   issue 566). Every [`FLUSH_EVERY`] retirements on a thread, [`Pinned::defer`]
//!   flushes that thread's bag and runs a collection step, so garbage in
//!   flight stays proportional to the number of threads, not to the number
//!   of retirements.

use std::cell::Cell;

#[cfg(test)]
use crossbeam_epoch::Shared;
use crossbeam_epoch::{Collector, Guard};

use crate::sync::thread_local;

/// Retirements per thread between two forced flushes. Under loom a model
/// retires a handful of objects, so the threshold shrinks to exercise the
/// flush path.
#[cfg(not(weakrefs_loom))]
pub(crate) const FLUSH_EVERY: usize = 32;
#[cfg(weakrefs_loom)]
pub(crate) const FLUSH_EVERY: usize = 2;

thread_local! {
    /// Retirements made by this thread since its last forced flush.
    // loom's `thread_local!` takes no `const` initialiser.
    #[allow(clippy::missing_const_for_thread_local)]
    static RETIRED_SINCE_FLUSH: Cell<usize> = Cell::new(0);
}

/// Hands the calling thread's retired memory to the global collector's
/// queue, if it retired any since its last flush. A thread about to go idle
/// calls it, so that what it retired last (up to [`FLUSH_EVERY`] - 1 items:
/// keys, dead values' blocks) is not held until it next retires.
#[cfg(not(weakrefs_loom))]
pub(crate) fn hand_over_garbage() {
    let retired = RETIRED_SINCE_FLUSH
        .try_with(|count| count.replace(0))
        .unwrap_or(0);
    if retired > 0 {
        Reclaimer::global().pin().flush();
    }
}

#[cfg(not(weakrefs_loom))]
thread_local! {
    /// Deferred functions this thread has run: a collection step runs them
    /// on the thread that collects, so [`push_garbage_through`] sees by it
    /// whether its steps still free anything. A constant initialiser and
    /// nothing to drop, so it costs a deferred function one increment.
    static RAN_HERE: Cell<u64> = const { Cell::new(0) };
}

/// Counts one deferred function run on this thread (a no-op during
/// thread-local teardown, where nothing reads the count again).
#[cfg(not(weakrefs_loom))]
#[inline(always)]
fn note_ran_here() {
    let _ = RAN_HERE.try_with(|ran| ran.set(ran.get() + 1));
}

/// Collection steps one [`push_garbage_through`] takes at most while they
/// run functions of ours, and again after them: each runs up to eight
/// bags, of `FLUSH_EVERY` functions or more, so at least four million
/// deferred drops (the burst of an object filed under a million keys
/// dying, four times over) go in one call, while other threads' endless
/// retirements cannot keep it from returning.
#[cfg(not(weakrefs_loom))]
const MAX_STEPS: usize = 1 << 14;

/// Set once anything has been retired in this process: a hint, outside
/// the crate's protocols (and a `static`, which loom's atomics cannot be).
#[cfg(not(weakrefs_loom))]
static RETIRED_ANYWHERE: crate::sync::AtomicBool = crate::sync::AtomicBool::new(false);

/// Hands the calling thread's retired memory over and tries to advance the
/// global epoch far enough to run it: what this thread removed is then
/// dropped (or, for user destructors, queued for the finalizer thread)
/// before this returns, unless another thread is pinned meanwhile. Never
/// blocks: collection steps, each of which advances the epoch only if
/// every pinned thread has caught up. Returns how many deferred functions
/// the steps ran (none under loom, where this does nothing).
pub(crate) fn push_garbage_through() -> u64 {
    #[cfg(weakrefs_loom)]
    {
        0
    }
    #[cfg(not(weakrefs_loom))]
    {
        // Relaxed: a hint. A process whose collections never retired
        // anything has nothing to push through, and does not pin at all
        // (a program that uses only handles and callbacks never touches the
        // epoch collector).
        if !RETIRED_ANYWHERE.load(crate::sync::Ordering::Relaxed) {
            return 0;
        }
        hand_over_garbage();
        // An epoch ends only once every thread pinned in it has unpinned;
        // a bag sealed in epoch `e` is freed from epoch `e + 2` on, so
        // three steps free what is queued when no other thread is pinned,
        // up to a step's share (eight bags). A burst of removals queues
        // thousands of bags: step on while steps run something here, and
        // stop after three in a row that ran nothing (the queue is empty,
        // or another thread's pin holds the epoch back). Between idle
        // steps, yield: a thread descheduled while pinned (on a busy
        // machine, often the finalizer thread) then gets to unpin.
        let ran = || RAN_HERE.try_with(Cell::get).unwrap_or(0);
        let start = ran();
        let mut idle = 0;
        for _ in 0..MAX_STEPS {
            let before = ran();
            Reclaimer::global().pin().flush();
            idle = if ran() == before { idle + 1 } else { 0 };
            if idle == 3 {
                break;
            }
            if idle > 0 {
                std::thread::yield_now();
            }
        }
        // Each bag a step runs leaves its queue node to a deferred destroy
        // of crossbeam's own, which `RAN_HERE` does not count, and those
        // destroys go round the queue in bags of their own, eight to a
        // step. A bag of ours holds `FLUSH_EVERY` functions, so about one
        // step for every 2048 functions run clears those nodes, a few more
        // the bags that held their destroys: give them one for every 512.
        let run = ran() - start;
        let tail = usize::try_from(run / 512).unwrap_or(MAX_STEPS);
        for _ in 0..tail.min(MAX_STEPS) {
            Reclaimer::global().pin().flush();
        }
        run
    }
}

/// [`push_garbage_through`] for a thread that goes idle (the finalizer
/// thread): only if this thread retired anything since its last flush,
/// which it then hands over and pushes through. A thread that retired
/// nothing does not pin.
#[cfg(any(test, not(weakrefs_loom)))]
pub(crate) fn push_own_garbage_through() {
    #[cfg(not(weakrefs_loom))]
    {
        let retired = RETIRED_SINCE_FLUSH
            .try_with(std::cell::Cell::get)
            .unwrap_or(0);
        if retired > 0 {
            push_garbage_through();
        }
    }
}

/// Under loom, the process-wide collector of the current model execution,
/// and the one value its deferred functions reach that they do not own:
/// the callback runtime, to which they post the destructors of removed
/// entries. Both live in one lazy static, the collector first, so that it
/// is dropped first and its last deferred functions still find the
/// runtime: loom drops separate lazy statics in an order that changes
/// between executions, which would make a model nondeterministic or let a
/// deferred function post to a runtime already gone.
#[cfg(weakrefs_loom)]
mod loom_global {
    use std::any::Any;
    use std::cell::Cell;
    use std::sync::OnceLock;

    use crossbeam_epoch::Collector;

    struct LoomEpoch {
        // Fields drop in order: the collector, with its pending deferred
        // functions, before what they may post to.
        collector: Collector,
        /// Made at first use (`outlives_collector`); type-erased, so that
        /// this module names nothing above it.
        outliving: OnceLock<Box<dyn Any + Send + Sync>>,
        /// Last: clears `TORN_DOWN` once the rest has dropped.
        _torn_down: TornDown,
    }

    std::thread_local! {
        /// Set while this execution's `EPOCH` is being dropped: the model's
        /// threads are all done, and the lazy static can no longer be
        /// reached. (Loom runs a model's threads on one thread of the
        /// process, so one flag serves them all.)
        static TORN_DOWN: Cell<bool> = const { Cell::new(false) };
    }

    /// Sets `TORN_DOWN` as `EPOCH`'s drop begins (`Drop for LoomEpoch`,
    /// before its fields) and clears it as that drop ends (this field's
    /// own drop, the last), so that it holds only during the teardown.
    struct TornDown;

    impl Drop for TornDown {
        fn drop(&mut self) {
            TORN_DOWN.with(|torn_down| torn_down.set(false));
        }
    }

    impl Drop for LoomEpoch {
        fn drop(&mut self) {
            TORN_DOWN.with(|torn_down| torn_down.set(true));
        }
    }

    /// True once the execution's collector is being torn down: then no
    /// thread is left to read what a retirement would wait for, and the
    /// collector can no longer be pinned.
    pub(super) fn torn_down() -> bool {
        TORN_DOWN.with(Cell::get)
    }

    crate::sync::lazy_static! {
        static ref EPOCH: LoomEpoch = LoomEpoch {
            collector: Collector::new(),
            outliving: OnceLock::new(),
            _torn_down: TornDown,
        };
    }

    /// The collector that `Reclaimer::global` pins under loom.
    pub(super) fn collector() -> &'static Collector {
        &EPOCH.collector
    }

    /// The value that outlives the collector in this execution, made by
    /// `init` at first use. Only one type ever asks (the callback runtime).
    /// As loom's own lazy statics do, two model threads that both find it
    /// missing may both make one, and the one that stores second drops its
    /// own: `init` may yield to loom's scheduler, so it runs outside the
    /// `OnceLock`, whose store moves the value in and touches nothing of
    /// loom's. Loom cannot see the `OnceLock` order the value's making
    /// before its uses on other model threads, so the caller publishes it
    /// through a loom lazy static of its own (`callbacks::global` does).
    pub(crate) fn outlives_collector<T: Any + Send + Sync>(init: fn() -> T) -> &'static T {
        let outliving = &EPOCH.outliving;
        if outliving.get().is_none() {
            let made: Box<dyn Any + Send + Sync> = Box::new(init());
            // A thread that stored first wins; ours drops here.
            drop(outliving.set(made));
        }
        outliving
            .get()
            .and_then(|value| value.downcast_ref())
            .expect("one type outlives the collector")
    }
}

#[cfg(weakrefs_loom)]
pub(crate) use loom_global::outlives_collector;

/// Where retired memory goes: crossbeam's global collector or one of the
/// caller's own.
#[derive(Debug, Default)]
pub(crate) struct Reclaimer {
    /// `None`: crossbeam-epoch's default collector, pinned through its
    /// cached thread-local handle.
    own: Option<Collector>,
}

impl Reclaimer {
    /// The process-wide reclaimer that the public collections use.
    pub(crate) const fn global() -> Self {
        Reclaimer { own: None }
    }

    /// A reclaimer over the caller's own collector (tests, loom models).
    #[cfg(test)]
    pub(crate) fn with_collector(collector: Collector) -> Self {
        Reclaimer {
            own: Some(collector),
        }
    }

    /// Runs `f` once no thread pinned now can still read what it frees:
    /// pins the process-wide reclaimer and defers `f` under that pin. Under
    /// loom, once the execution's collector is being torn down (work
    /// posted to the callback runtime runs then, after every model thread
    /// is done), it runs `f` at once: no reader is left.
    ///
    /// # Safety
    ///
    /// As [`Pinned::defer`]'s.
    pub(crate) unsafe fn retire_globally(f: impl FnOnce()) {
        match Reclaimer::pin_global_unless_torn_down() {
            // SAFETY: the caller's.
            Some(pinned) => unsafe { pinned.defer(f) },
            None => f(),
        }
    }

    /// [`Self::pin`] on the process-wide reclaimer; under loom, nothing once
    /// the execution's collector is being torn down (no thread is left to
    /// race, and the collector can no longer be reached).
    pub(crate) fn pin_global_unless_torn_down() -> Option<Pinned> {
        #[cfg(weakrefs_loom)]
        if loom_global::torn_down() {
            return None;
        }
        Some(Reclaimer::global().pin())
    }

    /// Pins the current thread: memory retired by anyone after this call is
    /// not freed before the returned guard is dropped.
    #[inline]
    pub(crate) fn pin(&self) -> Pinned {
        let guard = match &self.own {
            #[cfg(not(weakrefs_loom))]
            None => crossbeam_epoch::pin(),
            // Under loom, the crate's own collector, which the models' lazy
            // statics drop in a fixed order (`loom_global`).
            #[cfg(weakrefs_loom)]
            None => loom_global::collector().register().pin(),
            // Registering per pin is slow, but this path serves tests and
            // models only. The guard keeps its participant alive after the
            // handle is dropped.
            Some(collector) => collector.register().pin(),
        };
        Pinned { guard }
    }
}

/// A pinned thread: reads under it may follow pointers that writers retire.
#[derive(Debug)]
pub(crate) struct Pinned {
    guard: Guard,
}

impl Pinned {
    /// The crossbeam guard, for `Atomic::load` and friends (tests).
    #[cfg(test)]
    #[inline]
    pub(crate) fn guard(&self) -> &Guard {
        &self.guard
    }

    /// Hands `ptr` to the collector, which drops and frees it once no thread
    /// pinned now can still read it: [`Self::defer`] with a drop, so the
    /// tests of this wrapper exercise the path the collections use.
    ///
    /// # Safety
    ///
    /// 1. `ptr` points at a live heap object allocated by crossbeam's `Owned`
    ///    (or `Box`), and has been unlinked: no thread that pins after this
    ///    call can reach it.
    /// 2. It is retired once.
    #[cfg(test)]
    pub(crate) unsafe fn retire<T: Send + 'static>(&self, ptr: Shared<'_, T>) {
        let raw = ptr.as_raw().cast_mut();
        // SAFETY: by 2 the object is freed once, by the function; by 1 it is
        // an `Owned` allocation that only threads pinned now can still reach
        // (`defer`'s 2), and it stays valid until the function runs (1).
        unsafe { self.defer(move || drop(crossbeam_epoch::Owned::from_raw(raw))) };
    }

    /// Runs `f` once no thread pinned now can still read what it frees.
    ///
    /// # Safety
    ///
    /// 1. `f` may run on any thread, at any later time, or at process exit
    ///    never: whatever it touches must stay valid until it runs and be
    ///    safe to touch from any thread.
    /// 2. What `f` frees has been unlinked: no thread that pins after this
    ///    call can reach it.
    pub(crate) unsafe fn defer(&self, f: impl FnOnce()) {
        // The count captures nothing: the function keeps its size, and
        // crossbeam stores it inline as before (three words at most).
        let counted = move || {
            f();
            #[cfg(not(weakrefs_loom))]
            note_ran_here();
        };
        // SAFETY: precondition 1 is crossbeam's own for `defer_unchecked`
        // (the closure's validity wherever and whenever it runs); 2 makes
        // waiting for the threads pinned now enough (I7).
        unsafe { self.guard.defer_unchecked(counted) };
        self.count_retirement();
    }

    /// Counts one retirement on this thread, flushing every
    /// [`FLUSH_EVERY`].
    fn count_retirement(&self) {
        #[cfg(not(weakrefs_loom))]
        {
            // Relaxed: a hint for `push_garbage_through`; stored once.
            use crate::sync::Ordering::Relaxed;
            if !RETIRED_ANYWHERE.load(Relaxed) {
                RETIRED_ANYWHERE.store(true, Relaxed);
            }
        }
        // `try_with`: during thread-local teardown, flush every time rather
        // than panic. The count is per thread, shared by all collectors: the
        // bound it keeps is per thread, which is what issue 566 is about.
        let due = RETIRED_SINCE_FLUSH
            .try_with(|count| {
                let next = count.get() + 1;
                count.set(if next >= FLUSH_EVERY { 0 } else { next });
                next >= FLUSH_EVERY
            })
            .unwrap_or(true);
        if due {
            self.flush();
        }
    }

    /// Moves this thread's retired memory to the global queue and runs a
    /// collection step, freeing whatever no pinned thread can still read.
    /// Never a function deferred while this thread has been pinned (under
    /// this guard or an outer one): its bag is sealed with the global epoch
    /// of the moment, freed only two epochs later, and the global epoch
    /// moves at most one past this thread's while it stays pinned, which
    /// writers' loans rely on (SAFETY.md, M9).
    pub(crate) fn flush(&self) {
        self.guard.flush();
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;
    use crossbeam_epoch::{Atomic, Owned};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts drops, so a test can see what was freed.
    struct Tracked(Arc<AtomicUsize>);
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn retired_memory_is_freed_once_no_reader_is_pinned() {
        let reclaimer = Reclaimer::with_collector(Collector::new());
        let drops = Arc::new(AtomicUsize::new(0));
        let slot = Atomic::new(Tracked(drops.clone()));
        let count = if cfg!(miri) { 20 } else { 1000 };
        for _ in 0..count {
            let pinned = reclaimer.pin();
            let old = slot.swap(
                Owned::new(Tracked(drops.clone())),
                Ordering::AcqRel,
                pinned.guard(),
            );
            // SAFETY: `old` was unlinked by the swap and is retired once.
            unsafe { pinned.retire(old) };
        }
        for _ in 0..16 {
            reclaimer.pin().flush();
        }
        assert_eq!(drops.load(Ordering::Relaxed), count);
        // SAFETY: the slot is ours alone now; take back its last value.
        drop(unsafe { slot.into_owned() });
        assert_eq!(drops.load(Ordering::Relaxed), count + 1);
    }

    #[test]
    fn a_pinned_reader_keeps_retired_memory_alive() {
        let reclaimer = Reclaimer::with_collector(Collector::new());
        let drops = Arc::new(AtomicUsize::new(0));
        let slot = Atomic::new(Tracked(drops.clone()));
        let reader = reclaimer.pin();
        let seen = slot.load(Ordering::Acquire, reader.guard());
        {
            let writer = reclaimer.pin();
            let old = slot.swap(
                Owned::new(Tracked(drops.clone())),
                Ordering::AcqRel,
                writer.guard(),
            );
            // SAFETY: unlinked by the swap, retired once.
            unsafe { writer.retire(old) };
        }
        for _ in 0..16 {
            reclaimer.pin().flush();
        }
        // The reader is still pinned: what it loaded must not be freed.
        assert_eq!(drops.load(Ordering::Relaxed), 0);
        // SAFETY: `reader` is pinned, so `seen` is still allocated.
        assert!(Arc::ptr_eq(&unsafe { seen.deref() }.0, &drops));
        drop(reader);
        for _ in 0..16 {
            reclaimer.pin().flush();
        }
        assert_eq!(drops.load(Ordering::Relaxed), 1);
        // SAFETY: the slot is ours alone now.
        drop(unsafe { slot.into_owned() });
    }

    #[test]
    fn garbage_stays_bounded_when_a_thread_only_retires() {
        // The global collector, as the collections use it: one thread
        // retiring without pause must not pile up garbage (crossbeam #566).
        let reclaimer = Reclaimer::global();
        let drops = Arc::new(AtomicUsize::new(0));
        let slot = Atomic::new(Tracked(drops.clone()));
        let count = if cfg!(miri) { 600 } else { 200_000 };
        let mut worst_backlog = 0;
        for retired in 1..=count {
            let pinned = reclaimer.pin();
            let old = slot.swap(
                Owned::new(Tracked(drops.clone())),
                Ordering::AcqRel,
                pinned.guard(),
            );
            // SAFETY: unlinked by the swap, retired once.
            unsafe { pinned.retire(old) };
            drop(pinned);
            worst_backlog = worst_backlog.max(retired - drops.load(Ordering::Relaxed));
        }
        // Other tests share the global collector, and one of their threads
        // descheduled while pinned holds every collection back: on the
        // 2-core machine under load, backlogs of 20 000 to 29 000 were
        // seen. What this test is for is growth without bound (a backlog
        // that follows `count`); a quarter of it tells the two apart.
        let bound = if cfg!(miri) { 400 } else { count / 4 };
        assert!(worst_backlog <= bound, "backlog reached {worst_backlog}");
        let pinned = reclaimer.pin();
        let last = slot.swap(Shared::null(), Ordering::AcqRel, pinned.guard());
        // SAFETY: unlinked by the swap (no other thread knows the slot),
        // retired once.
        unsafe { pinned.retire(last) };
    }
}

/// Loom model (SAFETY.md, I7): a reader pinned before a writer unlinks and
/// retires a node may still read it; the node's destructor, which writes the
/// memory, is ordered after that read. Run by `.ci/loom`.
#[cfg(all(test, weakrefs_loom))]
mod loom_models {
    use super::*;
    use crossbeam_epoch::{Atomic, Owned};
    use loom::cell::UnsafeCell;
    use loom::sync::atomic::Ordering;
    use loom::sync::Arc;
    use loom::thread;

    struct Node(UnsafeCell<u64>);

    impl Node {
        fn read(&self) -> u64 {
            // SAFETY: shared read; loom checks it against the write in drop.
            self.0.with(|p| unsafe { *p })
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            // SAFETY: exclusive if reclamation is right; loom checks it.
            self.0.with_mut(|p| unsafe { *p = 0 });
        }
    }

    #[test]
    fn retired_node_outlives_pinned_reader() {
        loom::model(|| {
            let reclaimer = Arc::new(Reclaimer::with_collector(Collector::new()));
            let slot = Arc::new(Atomic::new(Node(UnsafeCell::new(1))));
            let reader = {
                let reclaimer = reclaimer.clone();
                let slot = slot.clone();
                thread::spawn(move || {
                    let pinned = reclaimer.pin();
                    let node = slot.load(Ordering::Acquire, pinned.guard());
                    // SAFETY: loaded under `pinned`; never null here.
                    unsafe { node.deref() }.read()
                })
            };
            for value in [2, 3] {
                let pinned = reclaimer.pin();
                let new = Owned::new(Node(UnsafeCell::new(value)));
                let old = slot.swap(new, Ordering::AcqRel, pinned.guard());
                // SAFETY: unlinked by the swap, retired once.
                unsafe { pinned.retire(old) };
            }
            let seen = reader.join().unwrap();
            assert!((1..=3).contains(&seen));
            let pinned = reclaimer.pin();
            let last = slot.swap(
                crossbeam_epoch::Shared::null(),
                Ordering::AcqRel,
                pinned.guard(),
            );
            // SAFETY: unlinked by the swap, retired once.
            unsafe { pinned.retire(last) };
        });
    }
}
