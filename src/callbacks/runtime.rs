//! The runtime that delivers death callbacks: registration, a death's
//! delivery, the plain `drain` function that runs what is queued, `flush`,
//! `shutdown` and the statistics. The queue it delivers into is
//! [`queue`](super::queue), the thread that drains it
//! [`worker`](super::worker).
//!
//! * **Death.** The dying thread claims every alive listed entry of the
//!   object's list (C1), runs the collections' hooks it finds alive there
//!   and then, each claimed by its own removal (C14, C20), and pushes the
//!   rest as one batch; a posted job is a batch of one.
//! * **Drain.** A consumer (the worker, a `flush` without one, `shutdown`)
//!   takes every batch at once and runs them oldest death first (C7),
//!   marked as draining so that a `flush` inside a callback never nests a
//!   second loop on the stack (C15).
//! * **Flush.** Waits until nothing queued is unfinished, with a
//!   fence-ordered handshake that lets the consumer skip the wake-up when
//!   nobody waits (C11).
//! * **Shutdown.** `shutdown` stops the worker, closes the queue (which
//!   takes what it held), runs that, then runs the still-registered
//!   entries whose `atexit` is set, newest first. A producer whose push
//!   finds the queue closed runs its callbacks inline, in order and never
//!   nested (C9, C15).

use std::panic::{self, AssertUnwindSafe};
use std::ptr;

#[cfg(not(weakrefs_loom))]
use super::backlog::{self, Backlog};
use super::entry::{Entry, EntryRef};
use super::list::{EntryList, ObjectCallbacks, RegistryLink};
use super::queue::{BatchQueue, Taken};
use super::worker::{Worker, WorkerMode};
use crate::marks::{self, Mark};
use crate::reclaim::Reclaimer;
#[cfg(any(test, not(weakrefs_loom)))]
use crate::sync::Parker;
use crate::sync::{
    fence, thread_local, AtomicBool, AtomicU64, AtomicUsize, CachePadded, Condvar, Mutex,
    MutexGuard, Ordering,
};

/// The chains an inline delivery loop on this thread has still to run
/// (`Runtime::run_inline`).
type Later = std::collections::VecDeque<(*mut Entry, u64)>;

#[cfg(not(weakrefs_loom))]
thread_local! {
    /// After `shutdown`, the list of the inline delivery loop running on
    /// this thread, null while none runs: the loop owns it, on its stack,
    /// and takes the chains that arise inside it (a callback dropping the
    /// last handle of another object) in order, instead of running them
    /// nested on the stack (C15). A plain cell, so the thread-local has no
    /// destructor: nothing tears it down at thread exit, and chains that
    /// other thread-locals' destructors set off do not nest either.
    static INLINE: std::cell::Cell<*mut Later> = const { std::cell::Cell::new(ptr::null_mut()) };
}

#[cfg(weakrefs_loom)]
thread_local! {
    /// As above (loom's `thread_local!` takes no `const` initialiser).
    static INLINE: std::cell::Cell<*mut Later> = std::cell::Cell::new(ptr::null_mut());
}

/// Process-wide counters, as `weakrefs::stats()` reports them. Producers
/// write `pending` (in the queue), consumers `run` and `panicked`, both
/// `pending`: each group on its own cache line, so the dying thread and
/// the worker do not bounce one line between them.
#[derive(Debug, Default)]
struct Counters {
    /// Queued callbacks that have finished. `queued` is derived: `pending`
    /// plus this, which saves the dying thread an RMW.
    finished_from_queue: CachePadded<AtomicU64>,
    run: AtomicU64,
    panicked: AtomicU64,
    /// Waits at a safe point for the worker to catch up (C18).
    backlog_waits: AtomicU64,
}

/// Counters of the death-callback runtime since start, as
/// [`stats`](crate::stats) returns them. Each is read separately, so under
/// concurrent activity they are a close but not an atomic snapshot.
/// Besides user callbacks, the collections' own work handed to the
/// finalizer thread counts here: a removal whose shard was busy, a removed
/// key's destructor, a removed `WeakKeyMap` value's destructor.
///
/// ```
/// use weakrefs::{finalize, flush, stats, Strong};
///
/// let obj = Strong::new(0);
/// finalize(&obj, || {});
/// drop(obj);
/// flush();
/// let now = stats();
/// assert!(now.run >= 1);
/// assert_eq!(now.pending, 0); // nothing of ours is left after flush
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Callbacks handed to the finalizer thread so far, the collections'
    /// own work included (it counts in `run` and `pending` too).
    pub queued: u64,
    /// Callbacks that have finished, wherever they ran (the finalizer
    /// thread, [`Finalizer::call`](crate::Finalizer::call), `shutdown`,
    /// inline after it), panicked ones included.
    pub run: u64,
    /// Callbacks that panicked (caught and reported on stderr).
    pub panicked: u64,
    /// Callbacks queued but not yet finished.
    pub pending: u64,
    /// Times a thread that had queued work faster than the finalizer
    /// thread runs it waited for that thread to catch up, at the end of a
    /// collection's write, of a single-flight load it ran, of a death or
    /// of `Finalizer::call`. A thread whose push leaves more than 32 768
    /// callbacks pending waits for the work queued ahead of it, down to
    /// half that many, for 100 ms at most, and gives up after 10 ms in
    /// which the finalizer thread finishes nothing (it might be waiting
    /// for a lock the waiting thread holds). The bound keeps a flood of
    /// deaths from growing the queue, and the memory it holds, without
    /// end. Reads never wait: deaths a read sets off (values a keep-warm
    /// tier lets go of in a `get`, last handles in a dropped iterator)
    /// wait at the thread's next write or death, and a thread that only
    /// reads is not held back. A count that keeps rising says the
    /// finalizer thread is the bottleneck (slow callbacks or destructors
    /// of removed `WeakKeyMap` values).
    pub backlog_waits: u64,
}

/// A dead object's callbacks, taken from its list: a chain through
/// `object_next` whose references this owns, for [`Runtime::on_death`]. It
/// holds no reference to the object's block, which an entry that takes the
/// implicit weak may free while `on_death` still runs (C21).
pub(crate) struct Dead(*mut Entry);

impl Dead {
    /// Takes `list`'s callbacks, leaving it empty.
    ///
    /// # Safety
    ///
    /// 1. `list`'s object is dead, so no thread holds a `Strong` to it: no
    ///    push, compaction or walk runs on it, now or later (C6).
    pub(crate) unsafe fn take(list: &ObjectCallbacks) -> Dead {
        // SAFETY: the caller's 1 is `take_all`'s.
        Dead(unsafe { list.take_all() })
    }
}

/// The callback runtime. `global()` is the one `finalize` uses; tests and
/// loom models build their own with `Runtime::inline` or
/// `Runtime::external`, which never spawn a thread: they drive `drain` (or
/// `worker_loop`) themselves.
#[derive(Debug)]
pub(crate) struct Runtime {
    /// Death batches, and the count of queued, unfinished callbacks.
    queue: CachePadded<BatchQueue>,
    /// Every entry, newest first, for `shutdown`'s atexit pass.
    registry: CachePadded<EntryList<RegistryLink>>,
    counters: Counters,
    /// The thread that drains the queue, if any.
    worker: Worker,
    shut_down: AtomicBool,
    /// `flush` waits here for `pending` to reach zero.
    idle: Mutex<()>,
    became_idle: Condvar,
    /// Set, under its mutex, when the first `shutdown` has finished.
    shutdown_done: Mutex<bool>,
    shutdown_finished: Condvar,
    /// `flush` calls waiting on `became_idle`; the consumer skips the
    /// mutex and the wake-up system call when there are none (C11).
    flush_waiters: AtomicUsize,
    /// The bound past which producers wait for the worker (C18); none for
    /// runtimes without one.
    #[cfg(not(weakrefs_loom))]
    backlog: Option<Backlog>,
    /// Removals a death could not make after `shutdown`, its shard being
    /// busy, with no finalizer thread left to wait for the lock: tried
    /// again by later such deaths, and made, waiting for the lock, by the
    /// next `flush` (C19).
    parked: Mutex<ParkedRemovals>,
    /// Notified when a run of parked removals ends (C19).
    parked_done: Condvar,
    /// How many removals are parked (a hint, kept under `parked`'s mutex):
    /// a death with none to try skips the mutex.
    parked_hint: AtomicUsize,
}

/// The parked removals, and how many threads are running some they took
/// out of the list (C19).
#[derive(Debug, Default)]
struct ParkedRemovals {
    list: Vec<Parked>,
    running: usize,
}

#[cfg(all(feature = "rayon", not(weakrefs_loom)))]
std::thread_local! {
    /// This thread is running rayon work from inside a `flush`'s wait
    /// (`Runtime::wait_for_idle`): a `flush` in that work waits without
    /// running more.
    static HELPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A removal parked after `shutdown` (`Runtime::park`): given whether it
/// may wait for its shard's lock, it removes its entry and returns true,
/// or, not allowed to wait and finding the lock taken, returns false and
/// changes nothing.
pub(crate) struct Parked(Box<dyn FnMut(bool) -> bool + Send>);

impl Parked {
    pub(crate) fn new(removal: impl FnMut(bool) -> bool + Send + 'static) -> Self {
        Parked(Box::new(removal))
    }
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Parked")
    }
}

impl Runtime {
    /// A runtime without a worker: `flush` drains on the calling thread.
    #[cfg(any(test, weakrefs_loom))]
    pub(super) fn inline() -> Self {
        Self::build(WorkerMode::Inline)
    }

    /// A runtime whose worker loop the caller runs, on a thread of its own,
    /// with the parker from [`Runtime::take_parker`].
    #[cfg(test)]
    pub(super) fn external() -> Self {
        Self::build(WorkerMode::External)
    }

    /// The worker's parker, for a runtime built by [`Runtime::external`].
    #[cfg(test)]
    pub(super) fn take_parker(&self) -> Parker {
        self.worker.take_parker()
    }

    pub(super) fn build(worker_mode: WorkerMode) -> Self {
        Runtime {
            queue: CachePadded::new(BatchQueue::new()),
            registry: CachePadded::new(EntryList::new()),
            counters: Counters::default(),
            worker: Worker::new(worker_mode),
            shut_down: AtomicBool::new(false),
            idle: Mutex::new(()),
            became_idle: Condvar::new(),
            flush_waiters: AtomicUsize::new(0),
            shutdown_done: Mutex::new(false),
            shutdown_finished: Condvar::new(),
            #[cfg(not(weakrefs_loom))]
            backlog: None,
            parked: Mutex::new(ParkedRemovals::default()),
            parked_done: Condvar::new(),
            parked_hint: AtomicUsize::new(0),
        }
    }

    /// This runtime with producers held to `backlog` (C18).
    #[cfg(not(weakrefs_loom))]
    pub(super) fn with_backlog(mut self, backlog: Backlog) -> Self {
        self.backlog = Some(backlog);
        self
    }

    /// Registers `callback` on the object whose list is `list`.
    pub(crate) fn register<F>(&self, list: &ObjectCallbacks, callback: F) -> EntryRef
    where
        F: FnOnce() + Send + 'static,
    {
        let [handle, in_list, in_registry] = EntryRef::new_with_owners(callback, true);
        list.push(in_list);
        self.registry.push(in_registry);
        handle
    }

    /// Runs `job` on the finalizer thread (inline once shutdown has closed
    /// the queue), counted in `pending` so that `flush` waits for it, and
    /// in the statistics as a callback. For work that must not run where it
    /// arises: a key's destructor, the last handle to a collection. The
    /// collections reach it through [`Executor`](super::Executor).
    pub(super) fn post<F>(&self, job: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let [in_queue] = EntryRef::new_with_owners(job, false);
        let claimed = in_queue.claim();
        debug_assert!(claimed, "a new entry is alive");
        // The queue's reference, given back by `run_chain`.
        self.dispatch(in_queue.into_link(), 1);
    }

    /// True if batches are queued that no consumer has taken yet: a hint
    /// (the queue may change at once), for work that batches itself.
    pub(super) fn has_queued_work(&self) -> bool {
        self.queue.has_queued_work()
    }

    /// True once `shutdown` has closed the queue: from then on posted work
    /// runs inline, where it arises. A caller with work that may block
    /// checks this first; a post racing the closing still runs inline (C9).
    pub(super) fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Keeps `removal` for later (C19): a death's removal after `shutdown`
    /// whose shard was busy.
    pub(super) fn park(&self, removal: Parked) {
        let mut parked = self.parked.lock();
        parked.list.push(removal);
        // Relaxed: a hint, written under the mutex.
        self.parked_hint.store(parked.list.len(), Ordering::Relaxed);
    }

    /// Runs the parked removals (C19), waiting for their shards' locks if
    /// `wait`, else only those whose locks are free, keeping the rest.
    /// Taken out of the list first, and run outside its mutex: a removal
    /// reports to its listener and may drop the last handle to its
    /// collection, and either may park more. Each runs as a callback does
    /// (`Mark::Callback`, so a `flush` in its listener only tries, and its
    /// panic caught and reported, the removal then counted done).
    ///
    /// Waiting, it goes on until none is left, those parked meanwhile (by
    /// deaths their listeners caused) included, and none is being run by
    /// another thread, which may give back some it could not make.
    pub(super) fn run_parked(&self, wait: bool) {
        if !wait && self.parked_hint.load(Ordering::Relaxed) == 0 {
            // Relaxed: a hint; a removal parked meanwhile is tried by the
            // next death or made by the next `flush`, which locks.
            return;
        }
        let mut parked = self.parked.lock();
        loop {
            let mut taken = std::mem::take(&mut parked.list);
            // Relaxed: a hint, written under the mutex.
            self.parked_hint.store(0, Ordering::Relaxed);
            if taken.is_empty() {
                if !wait || parked.running == 0 {
                    return;
                }
                parked = self.parked_done.wait(parked);
                continue;
            }
            parked.running += 1;
            drop(parked);
            taken.retain_mut(|removal| {
                let _callback = marks::enter(Mark::Callback);
                let mut done = true;
                crate::panics::catch_and_report("a parked removal", || done = (removal.0)(wait));
                !done
            });
            parked = self.parked.lock();
            parked.running -= 1;
            parked.list.append(&mut taken);
            // Relaxed: a hint, written under the mutex.
            self.parked_hint.store(parked.list.len(), Ordering::Relaxed);
            self.parked_done.notify_all();
            if !wait {
                return;
            }
        }
    }

    /// [`Self::on_death`] of a list that belongs to no object, which the
    /// caller keeps (tests).
    #[cfg(test)]
    pub(crate) fn on_death_of(&self, list: &ObjectCallbacks) {
        // SAFETY: the test's list, which nothing else pushes to or walks.
        let dead = unsafe { Dead::take(list) };
        self.on_death(dead, false);
    }

    /// An object has died (its value is gone), and `dead` holds its
    /// callbacks: claim the alive listed ones and deliver them, newest
    /// first, after running the alive hooks here (C14, C20).
    ///
    /// `implicit_weak`: the caller holds the object's implicit weak
    /// reference and offers it to the first entry whose removal a hook
    /// folds here (C21). Returns true if an entry took it: its drop
    /// releases it, and the caller must not. Nothing here refers to the
    /// object's block, which that drop may free while this runs.
    pub(crate) fn on_death(&self, dead: Dead, implicit_weak: bool) -> bool {
        // Still the caller's to release.
        let mut kept = implicit_weak;
        let mut node = dead.0;
        let (mut head, mut tail, mut count) =
            (ptr::null_mut::<Entry>(), ptr::null_mut::<Entry>(), 0);
        let mut settled = 0;
        // Collection callbacks found alive, chained through `object_next`
        // and run below on this thread (C14, C20).
        let mut here = ptr::null_mut::<Entry>();
        // Pinned from before the load that finds a hook alive until every
        // hook found alive has run: a hook names its collection by an
        // uncounted address, which the epoch keeps valid only for a thread
        // pinned since before it found the hook alive (M14). Each hook is
        // lent it. (`None` inside: under loom, during the collector's
        // teardown.)
        let mut pinned = None;
        while !node.is_null() {
            let current = node;
            // SAFETY: the chain's references are ours (`take_all`).
            let entry = unsafe { &*current };
            // Relaxed: the chain is ours alone now (C6).
            node = entry.object_next.load(Ordering::Relaxed);
            let hook = entry.on_dying_thread();
            // An unpinned look first: a hook it finds settled stays so (C1)
            // and is only given back, which needs no pin; one it finds
            // alive is looked at again below, pinned, and runs only if
            // that look finds it alive too. A death whose hooks were all
            // detached (its entries replaced or removed before it) then
            // pins not at all, where its pin's fence was a locked
            // instruction.
            if hook && pinned.is_none() && entry.is_alive() {
                pinned = Some(Reclaimer::pin_global_unless_torn_down());
            }
            // A hook is not claimed here, but run if alive: its run claims
            // it, with a plain store, if it finds its entry under the
            // shard's lock, and leaves it to whoever removed the entry
            // otherwise (C20). A claim's CAS was a locked instruction on
            // every death of a collection's entry.
            if hook && entry.is_alive() {
                // Relaxed: ours alone.
                entry.object_next.store(here, Ordering::Relaxed);
                here = current;
                continue;
            }
            if !hook && entry.claim() {
                // Relaxed: still ours alone; published by the queue push.
                entry.object_next.store(ptr::null_mut(), Ordering::Relaxed);
                if tail.is_null() {
                    head = current;
                } else {
                    // SAFETY: `tail` is a claimed node of our chain.
                    unsafe { &*tail }
                        .object_next
                        .store(current, Ordering::Relaxed);
                }
                tail = current;
                count += 1;
            } else {
                // Detached or called already: give back the list's reference.
                // SAFETY: the reference is ours, given back once.
                drop(unsafe { EntryRef::from_link(current) });
                // A hook is in no registry (`register_hook`): its node goes
                // with its last reference, and counting it would only bring
                // the registry's next compaction forward, at the price of a
                // read-modify-write on the registry's shared state word
                // (and now and then a compaction of a registry that did not
                // change) for every dying value whose entries were
                // replaced or removed before it died.
                settled += usize::from(!hook);
            }
        }
        if settled > 0 {
            // They are settled in the registry too: count them towards its
            // next compaction, so a wave of detaches shrinks it (C5).
            self.registry.note_settled(settled);
        }
        // The collections' removals first: a user callback on the finalizer
        // thread then finds the dead entries gone (as when all ran there,
        // newest first, and the map's were registered after the user's).
        while !here.is_null() {
            // SAFETY: the list's reference to a hook we found alive
            // (`take_all`), given back when `entry` drops.
            let entry = unsafe { EntryRef::from_link(here) };
            // Relaxed: ours alone.
            here = entry.object_next.load(Ordering::Relaxed);
            // C14: short, non-blocking, no user code; a panic (none is
            // expected) is reported, never unwound into the dropping code.
            // Lent our pin: the hook's removal hands what it unlinks to the
            // epoch under it, without pinning again.
            // SAFETY: the object's death, which found the hook alive and
            // runs it once (1), pinned since before the load that found it
            // alive (2).
            crate::panics::catch_and_report("a collection's removal callback", || unsafe {
                entry.run_claimed(pinned.as_ref().and_then(Option::as_ref))
            });
            // A run that removed its entry here folded the list's reference
            // into the entry's, which releases both (C13): one locked
            // decrement a death no longer pays. The first such entry takes
            // the object's implicit weak too, which it releases with its
            // own `Weak` (C21): another. We are still pinned, so those
            // releases (deferred past our pin) come after this.
            drop(entry.forget_if_folded(&mut kept));
        }
        drop(pinned);
        if count > 0 {
            self.dispatch(head, count);
        }
        // A safe point (C18): the hooks' writers are gone, the pin too.
        self.settle_backlog();
        implicit_weak && !kept
    }

    /// Hands a chain of `count` claimed entries to the worker, or runs it
    /// inline after `shutdown`.
    fn dispatch(&self, batch: *mut Entry, count: u64) {
        // SAFETY: `batch` heads a chain of `count` claimed listed entries
        // we own (`on_death`, `post`; hooks are never dispatched, C14).
        if let Some(pending) = unsafe { self.queue.push(batch, count) } {
            self.worker.wake(|| self.wake_flushers());
            #[cfg(not(weakrefs_loom))]
            backlog::note_push(self.address(), self.backlog, pending);
            #[cfg(weakrefs_loom)]
            let _ = pending;
        } else {
            // Shutdown has closed the queue (C9): run the chain here, in
            // the dying thread, and take back our `pending`.
            // SAFETY: a chain of claimed entries whose references we own,
            // counted in `pending` by the refused push.
            unsafe { self.run_inline(batch, count) };
        }
    }

    /// Runs a chain of `count` claimed entries on this thread, after
    /// `shutdown`, never nested (C15): if this thread is running such a
    /// chain already (this one arose inside it), it is appended to that
    /// loop's list and runs when the loop gets to it, oldest first, before
    /// the outermost inline delivery returns.
    ///
    /// # Safety
    ///
    /// 1. `batch` heads a chain of `count` entries this thread claimed,
    ///    each owning one reference, not run yet, counted in `pending`.
    unsafe fn run_inline(&self, batch: *mut Entry, count: u64) {
        let running = INLINE.with(std::cell::Cell::get);
        if !running.is_null() {
            // The list of a loop further up this thread's stack, which
            // holds no reference to it while it runs a chain (this call is
            // inside one), and clears the cell before the list goes.
            // SAFETY: as just said; only this thread reaches it.
            unsafe { (*running).push_back((batch, count)) };
            return;
        }
        /// Clears the cell when the loop ends, unwinding included, before
        /// its list goes.
        struct Ends;
        impl Drop for Ends {
            fn drop(&mut self) {
                INLINE.with(|inline| inline.set(ptr::null_mut()));
            }
        }
        let mut later = Later::new();
        // Reached through this pointer alone from here on, by this loop and
        // by the calls nested in its chains.
        let later_ptr: *mut Later = &mut later;
        INLINE.with(|inline| inline.set(later_ptr));
        let _ends = Ends;
        let mut next = Some((batch, count));
        while let Some((batch, count)) = next {
            // SAFETY: by 1 for the first; the others were handed over by
            // calls whose own 1 held, and each is taken off the list once.
            unsafe { self.run_chain(batch) };
            self.finish_pending(count);
            // Our list, on our stack; no chain runs meanwhile.
            // SAFETY: as just said.
            next = unsafe { (*later_ptr).pop_front() };
        }
    }

    /// This runtime's address: what the backlog's thread-locals name it by.
    #[cfg(not(weakrefs_loom))]
    fn address(&self) -> usize {
        ptr::from_ref(self).addr()
    }

    /// A safe point (C18): if this thread has pushed past the backlog's
    /// bound since its last one, waits for the worker to run the work
    /// queued ahead of it down to half the bound, unless it finishes
    /// nothing for the backlog's patience, and for the backlog's longest
    /// wait at most; inside a scope that must not wait, keeps the debt for
    /// the scope's end. The caller holds none of the crate's locks.
    #[inline]
    pub(crate) fn settle_backlog(&self) {
        #[cfg(not(weakrefs_loom))]
        if backlog::owes() {
            self.wait_for_backlog();
        }
    }

    #[cfg(not(weakrefs_loom))]
    #[cold]
    #[inline(never)]
    fn wait_for_backlog(&self) {
        let may_wait = backlog::may_wait();
        if may_wait == backlog::MayWait::Later {
            // The debt is kept for the safe point that ends what this
            // thread is in.
            return;
        }
        // Taken off the thread now: settled below, or, on the finalizer
        // thread (`Never`, nobody to wait for but itself), dropped.
        let runtime = self.address();
        if !backlog::take_debt(runtime) || may_wait == backlog::MayWait::Never {
            return;
        }
        let Some(bound) = self.backlog else { return };
        if self.worker.is_absent() || self.is_closed() {
            return;
        }
        let pending = self.queue.pending();
        if pending <= bound.low() {
            return;
        }
        let finished = || {
            // Relaxed: only how far it has moved matters; nothing is read
            // through it.
            self.counters.finished_from_queue.load(Ordering::Relaxed)
        };
        let start = finished();
        if backlog::still_stalled(runtime, start) {
            return;
        }
        // The work queued ahead of us, down to half the bound: ours to wait
        // for, and no more (others may keep the queue full meanwhile).
        let target = start + (pending - bound.low());
        // Relaxed: statistics.
        self.counters.backlog_waits.fetch_add(1, Ordering::Relaxed);
        let (mut seen, mut still) = (start, 0);
        let mut idle = self.idle.lock();
        for _ in 0..bound.longest {
            // Woken early only when the queue empties under a `flush`;
            // otherwise the slice runs out and we look again.
            idle = self.became_idle.wait_timeout(idle, backlog::SLICE);
            let now = finished();
            if now >= target || self.queue.pending() <= bound.low() {
                return;
            }
            if now != seen {
                (seen, still) = (now, 0);
                continue;
            }
            still += 1;
            if still >= bound.patience {
                backlog::gave_up(runtime, seen);
                return;
            }
        }
    }

    /// Records `count` queued callbacks as finished and wakes a waiting
    /// `flush` if that leaves nothing pending.
    fn finish_pending(&self, count: u64) {
        if self.queue.finish(count) && self.flush_is_waiting() {
            let _idle = self.idle.lock();
            self.became_idle.notify_all();
        }
    }

    /// Runs everything queued so far, oldest death first. Returns how many
    /// callbacks ran. Any thread may call it; each batch runs once (C7).
    pub(super) fn drain(&self) -> u64 {
        match self.queue.take() {
            Some(taken) => self.run_taken(taken),
            None => 0,
        }
    }

    /// Runs the batches taken from the queue, oldest death first.
    fn run_taken(&self, taken: Taken) -> u64 {
        // While this runs, a `flush` inside a callback returns at once
        // (C15); undone on the way out, as the outermost loop left it.
        let _draining = marks::enter(Mark::Draining);
        let mut ran = 0;
        // The last batch's count, held back until what the batches retired
        // has been pushed through (below).
        let mut unfinished = None;
        for batch in taken {
            // SAFETY: a queued chain of claimed entries, ours after the take.
            let count = unsafe { self.run_chain(batch) };
            ran += count;
            // Relaxed: statistics; incremented before `pending` drops, so
            // their sum never undercounts what was queued.
            self.counters
                .finished_from_queue
                .fetch_add(count, Ordering::Relaxed);
            if let Some(previous) = unfinished.replace(count) {
                self.finish_pending(previous);
            }
        }
        if let Some(last) = unfinished {
            // The queue's last work for now: push what its callbacks and
            // jobs retired on this thread (a map's removed entries, whose
            // destructors come back as jobs) through the epoch while that
            // work still counts as pending, so that a `flush` waiting for it
            // also waits for those drops, instead of returning just before
            // this thread, going idle, hands them over.
            #[cfg(not(weakrefs_loom))]
            if !self.queue.has_queued_work() {
                crate::panics::catch_and_report("an epoch collection step", || {
                    crate::reclaim::push_own_garbage_through();
                });
            }
            self.finish_pending(last);
        }
        if ran > 0 {
            // The entries just run are settled: count them towards the
            // registry's next compaction, so that it shrinks after a wave of
            // deaths even if nobody registers again (C5).
            self.registry
                .note_settled(usize::try_from(ran).unwrap_or(usize::MAX));
        }
        ran
    }

    /// Runs a chain of claimed entries (through `object_next`), giving back
    /// their references. Returns how many ran.
    ///
    /// # Safety
    ///
    /// 1. `node` heads a chain of entries this thread claimed (or took from
    ///    the queue), each owning one reference, not run yet.
    unsafe fn run_chain(&self, mut node: *mut Entry) -> u64 {
        let mut count = 0;
        while !node.is_null() {
            // SAFETY: by 1 the chain's references are ours.
            let entry = unsafe { EntryRef::from_link(node) };
            // Relaxed: ours alone.
            node = entry.object_next.load(Ordering::Relaxed);
            // SAFETY: by 1 the entry was claimed for running, and this is
            // the one run for that claim.
            self.run_callback(|| unsafe { entry.run_claimed(None) });
            count += 1;
        }
        count
    }

    /// Runs one callback, catching and reporting a panic. The mark covers
    /// the report too, which drops the panic's payload: the payload is the
    /// callback's own, and a `flush` in its `Drop` would otherwise wait
    /// for the queue this very callback keeps busy, on the finalizer
    /// thread for good.
    pub(crate) fn run_callback(&self, callback: impl FnOnce()) {
        let _callback = marks::enter(Mark::Callback);
        let outcome = panic::catch_unwind(AssertUnwindSafe(callback));
        // Relaxed: statistics.
        self.counters.run.fetch_add(1, Ordering::Relaxed);
        if let Err(payload) = outcome {
            // Relaxed: statistics.
            self.counters.panicked.fetch_add(1, Ordering::Relaxed);
            crate::panics::report("a death callback", payload);
        }
    }

    /// The worker is gone (it died): from now on `flush` drains on the
    /// calling thread. Wakes any `flush` already waiting, so it notices.
    #[cfg(any(test, not(weakrefs_loom)))]
    fn mark_worker_failed(&self) {
        self.worker.mark_failed();
        self.wake_flushers();
    }

    /// Wakes every waiting `flush`, so it re-checks whether a worker is
    /// left (`mark_failed` notifies under `idle`, C11).
    fn wake_flushers(&self) {
        let _idle = self.idle.lock();
        self.became_idle.notify_all();
    }

    /// Blocks until nothing is queued and no queued callback is running.
    /// Inside a callback, or on a runtime without a worker, it runs the
    /// queue on this thread instead of waiting (waiting would deadlock on
    /// the callback that is calling it).
    pub(super) fn flush(&self) {
        if self.is_closed() {
            // Waiting for the parked removals' locks, unless inside code
            // that may hold one: a callback (run inline now, maybe where a
            // map dropped a value under its lock) or a predicate under one.
            self.run_parked(!marks::is_inside(Mark::Callback) && !marks::is_inside(Mark::Locked));
        }
        let in_callback = marks::is_inside(Mark::Callback);
        if in_callback && marks::is_inside(Mark::Draining) {
            // The drain loop running this callback runs what is queued
            // next: draining here would nest one loop per flushing callback
            // on this stack (C15).
            return;
        }
        if in_callback || self.worker.is_absent() {
            // Until empty: a callback's own `flush` leaves what it queued to
            // this loop.
            while self.drain() > 0 {}
            return;
        }
        let mut idle = self.idle.lock();
        // Relaxed: ordered against the consumer by the fence below (C11).
        self.flush_waiters.fetch_add(1, Ordering::Relaxed);
        // SeqCst fence (C11): pairs with the fence in `flush_is_waiting`:
        // either the consumer that takes `pending` to zero sees us waiting,
        // or our load below sees zero.
        fence(Ordering::SeqCst);
        let mut worker_gone = false;
        while !self.queue.is_idle() {
            // A worker that fails notifies under `idle`, so one that dies
            // while we wait wakes us here.
            if self.worker.is_absent() {
                worker_gone = true;
                break;
            }
            idle = self.wait_for_idle(idle);
        }
        // Relaxed: only the count matters; we hold the mutex.
        self.flush_waiters.fetch_sub(1, Ordering::Relaxed);
        drop(idle);
        if worker_gone {
            self.drain();
        }
    }

    /// Waits for `became_idle` once, as `flush` does, `idle` locked again
    /// on return. On a rayon worker thread (the `rayon` feature; never one
    /// of the finalizer's own pool here, whose threads carry callback marks
    /// wherever they could flush, and return before waiting), it runs the
    /// pool's pending work instead, and
    /// waits at most a millisecond at a time when there is none: a callback
    /// run on another thread than the finalizer's (by `Finalizer::call`'s
    /// `flush`, or by `shutdown`) does its parallel work on that pool, and
    /// workers that all slept here would never run it. Only the outermost
    /// `flush` on a thread's stack runs pool work: each job it runs may
    /// flush in turn, and one that ran more nested without bound (a stack
    /// overflow; a hostile-use hunt found one). The callbacks the
    /// finalizer thread runs do their parallel work on its own pool
    /// (`global::rayon_pool_of_its_own`), never waiting for these workers.
    fn wait_for_idle<'a>(&'a self, idle: MutexGuard<'a, ()>) -> MutexGuard<'a, ()> {
        #[cfg(all(feature = "rayon", not(weakrefs_loom)))]
        if rayon::current_thread_index().is_some() && !HELPING.with(std::cell::Cell::get) {
            drop(idle);
            HELPING.with(|helping| helping.set(true));
            /// Clears `HELPING` as the job returns or unwinds.
            struct Helped;
            impl Drop for Helped {
                fn drop(&mut self) {
                    HELPING.with(|helping| helping.set(false));
                }
            }
            let helped = Helped;
            let ran = rayon::yield_now() == Some(rayon::Yield::Executed);
            drop(helped);
            let idle = self.idle.lock();
            if ran || self.queue.is_idle() {
                return idle;
            }
            return self
                .became_idle
                .wait_timeout(idle, std::time::Duration::from_millis(1));
        }
        self.became_idle.wait(idle)
    }

    /// [`flush`](Self::flush), then epoch collection until the work it
    /// queues is done too: entries removed just now, by this thread or by
    /// queued callbacks, are dropped once no reader can see them (epoch
    /// reclamation), their destructors on the finalizer thread, where they
    /// may remove further entries (a value that held the last handle to
    /// another key). Pushes that along until a round queues nothing new
    /// and its collection steps run nothing;
    /// bounded, so that other threads' endless activity cannot keep this
    /// from returning. (The finalizer thread pushes its own garbage through
    /// whenever it goes idle, so a cascade completes without any `flush`;
    /// this only helps it along.)
    pub(crate) fn flush_with_garbage(&self) {
        /// Rounds of epoch collection at most.
        const FLUSH_ROUNDS: usize = 16;
        self.flush();
        for _ in 0..FLUSH_ROUNDS {
            let queued = self.stats().queued;
            let ran = crate::reclaim::push_garbage_through();
            self.flush();
            if ran == 0 && self.stats().queued == queued {
                break;
            }
        }
    }

    /// Called by the consumer that took `pending` to zero: is a `flush`
    /// waiting to be woken?
    fn flush_is_waiting(&self) -> bool {
        // SeqCst fence (C11): pairs with the fence in `flush`.
        fence(Ordering::SeqCst);
        // Relaxed: ordered by the fence.
        self.flush_waiters.load(Ordering::Relaxed) != 0
    }

    /// Drains, stops the worker, runs every alive `atexit` entry newest
    /// first; afterwards callbacks run inline. Idempotent.
    pub(crate) fn shutdown(&self) {
        // Relaxed: who runs shutdown is decided by the swap alone; producers
        // learn of shutdown from the queue's closed marker, not this flag.
        if self.shut_down.swap(true, Ordering::Relaxed) {
            self.wait_for_shutdown();
            return;
        }
        self.worker.stop();
        // Close the queue (C9) and run what the closing took.
        self.run_taken(self.queue.close());
        // Newest first: the registry is a stack, and compaction keeps the
        // relative order of what it keeps.
        for entry in self.registry.alive_entries() {
            if entry.atexit() && entry.claim() {
                // SAFETY: we won the claim just now; this is its one run.
                self.run_callback(|| unsafe { entry.run_claimed(None) });
            }
        }
        *self.shutdown_done.lock() = true;
        self.shutdown_finished.notify_all();
    }

    /// A second `shutdown` waits for the first to finish its atexit pass, so
    /// that returning from `shutdown` always means the pass is over. From
    /// inside a callback it returns at once: the first call may be the one
    /// running that callback.
    fn wait_for_shutdown(&self) {
        if marks::is_inside(Mark::Callback) {
            return;
        }
        let mut done = self.shutdown_done.lock();
        while !*done {
            done = self.shutdown_finished.wait(done);
        }
    }

    /// The worker's loop: drain, then park until a producer unparks.
    #[cfg(any(test, not(weakrefs_loom)))]
    pub(super) fn worker_loop(&self, parker: Parker) {
        // For the loop's whole life, its idle steps included: this thread
        // never waits for its own backlog (C18).
        let _finalizer = marks::enter(Mark::Finalizer);
        self.worker.run(
            parker,
            &self.queue,
            || {
                self.drain();
            },
            || self.mark_worker_failed(),
        );
    }

    /// The counters since this runtime started.
    pub(crate) fn stats(&self) -> Stats {
        // Relaxed: a statistics snapshot; the four loads need not agree.
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let pending = self.queue.pending();
        Stats {
            queued: load(&self.counters.finished_from_queue) + pending,
            run: load(&self.counters.run),
            panicked: load(&self.counters.panicked),
            pending,
            backlog_waits: load(&self.counters.backlog_waits),
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Batches still queued in a runtime that is going away (tests,
        // models): run them rather than lose them.
        self.drain();
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc as StdArc;

    fn logger(log: &StdArc<std::sync::Mutex<Vec<u32>>>, tag: u32) -> impl FnOnce() + Send {
        let log = log.clone();
        Box::new(move || log.lock().unwrap().push(tag))
    }

    #[test]
    fn drain_runs_a_death_newest_first_and_skips_settled_entries() {
        let runtime = Runtime::inline();
        let log = StdArc::new(std::sync::Mutex::new(Vec::new()));
        let list = ObjectCallbacks::new();
        let _first = runtime.register(&list, logger(&log, 1));
        let second = runtime.register(&list, logger(&log, 2));
        let _third = runtime.register(&list, logger(&log, 3));
        assert!(second.detach());
        runtime.on_death_of(&list);
        assert!(log.lock().unwrap().is_empty(), "ran before the drain");
        assert_eq!(
            runtime.stats(),
            Stats {
                queued: 2,
                run: 0,
                panicked: 0,
                pending: 2,
                backlog_waits: 0,
            }
        );
        assert_eq!(runtime.drain(), 2);
        assert_eq!(*log.lock().unwrap(), [3, 1]);
        assert_eq!(
            runtime.stats(),
            Stats {
                queued: 2,
                run: 2,
                panicked: 0,
                pending: 0,
                backlog_waits: 0,
            }
        );
    }

    #[test]
    fn batches_run_oldest_death_first() {
        let runtime = Runtime::inline();
        let log = StdArc::new(std::sync::Mutex::new(Vec::new()));
        for tag in 0..5 {
            let list = ObjectCallbacks::new();
            runtime.register(&list, logger(&log, tag));
            runtime.on_death_of(&list);
        }
        runtime.flush();
        assert_eq!(*log.lock().unwrap(), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn shutdown_runs_atexit_entries_newest_first_then_deaths_run_inline() {
        let runtime = Runtime::inline();
        let log = StdArc::new(std::sync::Mutex::new(Vec::new()));
        let first_list = ObjectCallbacks::new();
        let second_list = ObjectCallbacks::new();
        let a = runtime.register(&first_list, logger(&log, 1));
        let b = runtime.register(&second_list, logger(&log, 2));
        let c = runtime.register(&first_list, logger(&log, 3));
        let skipped = runtime.register(&second_list, logger(&log, 4));
        skipped.set_atexit(false);
        runtime.shutdown();
        assert_eq!(*log.lock().unwrap(), [3, 2, 1]);
        assert!(!a.is_alive() && !b.is_alive() && !c.is_alive());
        assert!(skipped.is_alive());
        runtime.shutdown(); // idempotent
        assert_eq!(log.lock().unwrap().len(), 3);
        // After shutdown a death runs its callbacks at once, inline.
        runtime.on_death_of(&second_list);
        assert_eq!(*log.lock().unwrap(), [3, 2, 1, 4]);
        runtime.on_death_of(&first_list);
        assert_eq!(log.lock().unwrap().len(), 4, "shutdown's runs never repeat");
        assert_eq!(runtime.stats().queued, 0, "nothing was queued");
    }

    #[test]
    fn churn_on_one_list_from_more_threads_than_cores_stays_bounded() {
        // Without backpressure, a compactor descheduled mid-walk let other
        // pushers grow a list to millions of nodes here.
        let runtime = Runtime::inline();
        let list = ObjectCallbacks::new();
        let live: Vec<_> = (0..64)
            .map(|_| runtime.register(&list, Box::new(|| {})))
            .collect();
        let (threads, rounds) = if cfg!(miri) { (2, 50) } else { (6, 20_000) };
        let longest = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    for round in 0..rounds {
                        assert!(runtime.register(&list, Box::new(|| {})).detach());
                        if round % 512 == 0 {
                            longest
                                .fetch_max(list.node_count(), std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let longest = longest.into_inner().max(list.node_count());
        // A compaction keeps at most the 64 live entries, one registered
        // but not yet detached per thread, and the head. Backpressure stops
        // every pusher once the work since then exceeds four times that, so
        // a list holds at most five times it, plus the pushes not yet
        // counted (under a batch, and a batch more per thread between its
        // counting CAS and its count), plus one push per thread.
        let kept = 64 + threads + 1;
        let bound = 5 * kept + super::super::list::BATCH * (threads + 1) + threads;
        assert!(
            longest <= bound,
            "object list reached {longest} nodes (bound {bound})"
        );
        assert!(runtime.registry.node_count() <= bound, "registry grew");
        assert!(live.iter().all(|entry| entry.is_alive()));
        runtime.on_death_of(&list);
        assert_eq!(runtime.drain(), 64);
    }

    #[test]
    fn lists_registered_in_lockstep_first_compact_on_different_pushes() {
        // Each object of a set made and dropped again and again sees one
        // registration and one detach a round. Were their compactions in
        // step, every object would free its dead nodes on the same round,
        // a burst that spills past the thread's block cache.
        let runtime = Runtime::inline();
        let lists: Vec<_> = (0..64).map(|_| Box::new(ObjectCallbacks::new())).collect();
        let mut first_compaction = vec![None; lists.len()];
        for round in 1..=16 {
            for (list, first) in lists.iter().zip(&mut first_compaction) {
                let before = list.node_count();
                assert!(runtime.register(list, Box::new(|| {})).detach());
                if list.node_count() <= before && first.is_none() {
                    *first = Some(round);
                }
            }
        }
        let mut rounds: Vec<_> = first_compaction
            .iter()
            .map(|round| round.expect("every list compacts within 16 pushes"))
            .collect();
        rounds.sort_unstable();
        rounds.dedup();
        // Five phases over 64 lists: fewer than three distinct rounds is
        // about as likely as 64 draws from five values landing on two.
        assert!(
            rounds.len() >= 3,
            "first compactions on rounds {rounds:?} only"
        );
    }

    #[test]
    fn the_registry_shrinks_after_deaths_without_new_registrations() {
        let runtime = Runtime::inline();
        let count = if cfg!(miri) { 100 } else { 10_000 };
        let lists: Vec<_> = (0..count)
            .map(|_| {
                let list = ObjectCallbacks::new();
                runtime.register(&list, Box::new(|| {}));
                list
            })
            .collect();
        assert!(runtime.registry.node_count() >= count);
        for list in lists {
            runtime.on_death_of(&list);
        }
        assert_eq!(runtime.drain(), count as u64);
        assert!(
            runtime.registry.node_count() <= 2 * 16,
            "registry kept {} settled entries",
            runtime.registry.node_count()
        );
    }

    #[test]
    fn a_death_counts_towards_the_registry_only_the_entries_it_holds() {
        use super::super::entry::tests::TestSite;
        let runtime = Runtime::inline();
        let site = TestSite::new();
        // Few, so that no compaction falls due and takes the work back.
        let lists: Vec<_> = (0..2).map(|_| ObjectCallbacks::new()).collect();
        let hooks: Vec<_> = (0..2)
            .map(|key| {
                let hook = lists[key as usize].register_hook((), site.removal(key));
                assert!(hook.detach());
                hook
            })
            .collect();
        // A registered callback, detached: a death that finds it settled
        // counts it, as the registry holds it too.
        let entry = runtime.register(&lists[0], Box::new(|| {}));
        assert!(entry.detach());
        let before = runtime.registry.work();
        for list in &lists {
            runtime.on_death_of(list);
        }
        assert_eq!(runtime.registry.work(), before + 1);
        drop(hooks);
    }

    #[test]
    fn an_alive_entry_freed_with_its_lists_drops_its_closure_once() {
        struct CountDrop(StdArc<AtomicUsize>);
        impl Drop for CountDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let drops = StdArc::new(AtomicUsize::new(0));
        let token = CountDrop(drops.clone());
        let runtime = Runtime::inline();
        let list = ObjectCallbacks::new();
        let handle = runtime.register(&list, move || drop(token));
        drop(list);
        drop(runtime);
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 0);
        drop(handle); // the last reference frees the still-alive entry
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_runtime_dropped_with_a_queued_batch_runs_it() {
        let ran = StdArc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        let runtime = Runtime::inline();
        let list = ObjectCallbacks::new();
        runtime.register(&list, move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        runtime.on_death_of(&list);
        drop(runtime);
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn panics_in_a_callback_or_in_a_detached_closures_drop_are_contained() {
        struct PanicOnDrop;
        impl Drop for PanicOnDrop {
            fn drop(&mut self) {
                panic!("drop failure (expected by this test)");
            }
        }
        let runtime = Runtime::inline();
        let list = ObjectCallbacks::new();
        runtime.register(&list, || panic!("callback failure (expected by this test)"));
        let bomb = PanicOnDrop;
        let detached = runtime.register(&list, move || drop(bomb));
        // `detach` drops the closure in this thread: its panic is the
        // caller's, and the entry stays consistent.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| detached.detach()));
        assert!(outcome.is_err());
        assert!(!detached.is_alive());
        runtime.on_death_of(&list);
        assert_eq!(runtime.drain(), 1);
        assert_eq!(
            runtime.stats().panicked,
            1,
            "the callback's panic is counted"
        );
    }

    #[test]
    fn over_aligned_and_zero_sized_closures() {
        #[repr(align(128))]
        struct Aligned([u8; 128]);
        let seen = StdArc::new(AtomicUsize::new(0));
        let runtime = Runtime::inline();
        let list = ObjectCallbacks::new();
        let aligned = Aligned([7; 128]);
        let counter = seen.clone();
        runtime.register(&list, move || {
            assert_eq!(&aligned as *const Aligned as usize % 128, 0);
            counter.fetch_add(
                usize::from(aligned.0[0]),
                std::sync::atomic::Ordering::SeqCst,
            );
        });
        fn zero_sized() {}
        runtime.register(&list, zero_sized);
        runtime.on_death_of(&list);
        assert_eq!(runtime.drain(), 2);
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 7);
    }

    /// C17: an object's list stays inline, with no anchor, for its first
    /// `INLINE_MAX` pushes, and keeps what they pushed (it never
    /// compacts); the next push anchors it, and from then on compactions
    /// free detached entries, the inline ones included; the death takes
    /// every entry and runs the live ones.
    #[test]
    fn an_object_list_anchors_past_its_inline_pushes_and_compacts_there() {
        let runtime = Runtime::inline();
        let list = ObjectCallbacks::new();
        let runs = StdArc::new(AtomicUsize::new(0));
        let counting = || {
            let runs = runs.clone();
            Box::new(move || {
                runs.fetch_add(1, Ordering::Relaxed);
            })
        };
        let first = runtime.register(&list, counting());
        let detached: Vec<_> = (1..super::super::list::INLINE_MAX)
            .map(|_| {
                let entry = runtime.register(&list, counting());
                assert!(entry.detach());
                entry
            })
            .collect();
        assert!(!list.is_anchored(), "anchored within its inline pushes");
        for entry in &detached {
            assert!(entry.ref_count() >= 2, "an inline list let go of a node");
        }
        let anchoring = runtime.register(&list, counting());
        assert!(list.is_anchored(), "not anchored past its inline pushes");
        for _ in 0..1000 {
            runtime.register(&list, counting()).detach();
        }
        assert!(list.node_count() <= 40, "the anchored list grew");
        for entry in &detached {
            assert_eq!(entry.ref_count(), 1, "a detached inline entry was kept");
        }
        assert!(first.is_alive() && anchoring.is_alive());
        runtime.on_death_of(&list);
        assert_eq!(runtime.drain(), 2);
        assert_eq!(runs.load(Ordering::Relaxed), 2);
        assert!(list.is_empty());
    }

    #[test]
    fn register_detach_churn_leaves_lists_bounded() {
        let runtime = Runtime::inline();
        let list = ObjectCallbacks::new();
        let keep = runtime.register(&list, Box::new(|| {}));
        let rounds = if cfg!(miri) { 300 } else { 100_000 };
        let mut longest = 0;
        for _ in 0..rounds {
            let entry = runtime.register(&list, Box::new(|| {}));
            assert!(entry.detach());
            longest = longest.max(list.node_count());
        }
        assert!(longest <= 40, "object list grew to {longest} nodes");
        assert!(runtime.registry.node_count() <= 40, "registry grew");
        assert!(keep.is_alive());
        // Both lists let go of a detached entry once they compact.
        let probe = runtime.register(&list, Box::new(|| {}));
        assert_eq!(probe.ref_count(), 3);
        probe.detach();
        for _ in 0..64 {
            runtime.register(&list, Box::new(|| {})).detach();
        }
        assert_eq!(probe.ref_count(), 1, "a list kept a detached entry");
        runtime.on_death_of(&list);
        assert_eq!(runtime.drain(), 1);
    }
}

/// Loom models of delivery, `flush` and `shutdown` (SAFETY.md, C5, C7, C9–C11);
/// the worker's parking is modelled beside it, in `worker`. Run by
/// `.ci/loom`.
#[cfg(all(test, weakrefs_loom))]
pub(super) mod loom_models {
    use super::*;
    use loom::sync::atomic::AtomicUsize;
    use loom::sync::Arc;
    use loom::thread;

    pub(in crate::callbacks) fn counting(runs: &Arc<AtomicUsize>) -> impl FnOnce() + Send {
        let runs = runs.clone();
        Box::new(move || {
            runs.fetch_add(1, Ordering::SeqCst);
        })
    }

    /// A runtime whose worker loop runs on a model thread of its own.
    pub(in crate::callbacks) fn with_worker() -> (Arc<Runtime>, thread::JoinHandle<()>) {
        let runtime = Arc::new(Runtime::external());
        let parker = runtime.take_parker();
        let worker = {
            let runtime = runtime.clone();
            thread::spawn(move || runtime.worker_loop(parker))
        };
        (runtime, worker)
    }

    pub(in crate::callbacks) fn die_with_one_callback(runtime: &Runtime, runs: &Arc<AtomicUsize>) {
        let list = ObjectCallbacks::new();
        runtime.register(&list, counting(runs));
        runtime.on_death_of(&list);
    }

    /// `flush` racing a death on another thread: when both are done and a
    /// final flush returns, the callback ran exactly once, and `pending` is
    /// back to zero.
    #[test]
    fn flush_races_new_work() {
        loom::model(|| {
            let (runtime, worker) = with_worker();
            let runs = Arc::new(AtomicUsize::new(0));
            let producer = {
                let runtime = runtime.clone();
                let runs = runs.clone();
                thread::spawn(move || die_with_one_callback(&runtime, &runs))
            };
            runtime.flush();
            producer.join().unwrap();
            runtime.flush();
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            assert_eq!(runtime.stats().pending, 0);
            runtime.shutdown();
            worker.join().unwrap();
        });
    }

    /// Two `shutdown` calls at once: whichever returns, the atexit pass is
    /// over and ran each callback once.
    #[test]
    fn concurrent_shutdowns_return_after_the_atexit_pass() {
        loom::model(|| {
            let runtime = Arc::new(Runtime::inline());
            let runs = Arc::new(AtomicUsize::new(0));
            let list = ObjectCallbacks::new();
            runtime.register(&list, counting(&runs));
            let other = {
                let runtime = runtime.clone();
                let runs = runs.clone();
                thread::spawn(move || {
                    runtime.shutdown();
                    runs.load(Ordering::SeqCst)
                })
            };
            runtime.shutdown();
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            assert_eq!(other.join().unwrap(), 1);
            runtime.on_death_of(&list);
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        });
    }

    /// Compaction unlinking and freeing detached nodes while another thread
    /// pushes and a third detaches. Under loom a compaction is due once the
    /// work passes what the last one kept (at least 1), and pushes count
    /// two at a time: the second push compacts, freeing the detached
    /// first entry and keeping one, so the fourth push, by whichever of
    /// the racing threads makes it, compacts again, racing the other push
    /// and the detach of the second entry.
    #[test]
    fn compaction_frees_while_others_push_and_detach() {
        loom::model(|| {
            let runtime = Arc::new(Runtime::inline());
            let runs = Arc::new(AtomicUsize::new(0));
            let list = Arc::new(ObjectCallbacks::new());
            let first = runtime.register(&list, counting(&runs));
            assert!(first.detach());
            let second = runtime.register(&list, counting(&runs));
            let pusher = {
                let (runtime, list, runs) = (runtime.clone(), list.clone(), runs.clone());
                thread::spawn(move || runtime.register(&list, counting(&runs)))
            };
            let detacher = thread::spawn(move || assert!(second.detach()));
            let third = runtime.register(&list, counting(&runs));
            detacher.join().unwrap();
            let fourth = pusher.join().unwrap();
            let list = Arc::try_unwrap(list).expect("threads joined");
            runtime.on_death_of(&list);
            runtime.flush();
            assert_eq!(runs.load(Ordering::SeqCst), 2);
            assert!(!third.is_alive() && !fourth.is_alive());
        });
    }

    /// `shutdown`'s registry walk racing a registration whose registry
    /// compaction frees a detached entry.
    #[test]
    fn shutdown_races_registration_and_compaction() {
        loom::model(|| {
            let runtime = Arc::new(Runtime::inline());
            let runs = Arc::new(AtomicUsize::new(0));
            let list = Arc::new(ObjectCallbacks::new());
            assert!(runtime.register(&list, counting(&runs)).detach());
            let registrar = {
                let (runtime, list, runs) = (runtime.clone(), list.clone(), runs.clone());
                thread::spawn(move || runtime.register(&list, counting(&runs)))
            };
            runtime.shutdown();
            let late = registrar.join().unwrap();
            let list = Arc::try_unwrap(list).expect("threads joined");
            runtime.on_death_of(&list);
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            assert!(!late.is_alive());
        });
    }

    /// A death racing `shutdown`: the callback runs exactly once, whether
    /// the worker, shutdown's closing swap, the atexit pass (if `atexit` is
    /// set), or the dying thread inline runs it (C9). No drain at the end:
    /// one of them must already have run it.
    fn death_races_shutdown(atexit: bool) {
        loom::model(move || {
            let runtime = Arc::new(Runtime::inline());
            let runs = Arc::new(AtomicUsize::new(0));
            let list = ObjectCallbacks::new();
            runtime.register(&list, counting(&runs)).set_atexit(atexit);
            let dying = {
                let runtime = runtime.clone();
                thread::spawn(move || runtime.on_death_of(&list))
            };
            runtime.shutdown();
            dying.join().unwrap();
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn death_races_shutdown_without_atexit() {
        death_races_shutdown(false);
    }

    #[test]
    fn death_races_shutdown_with_atexit() {
        death_races_shutdown(true);
    }
}
