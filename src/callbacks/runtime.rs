//! The runtime that delivers death callbacks: a lock-free queue of death
//! batches, the plain `drain` function that runs them, the background
//! thread that loops over it, and `flush`/`shutdown`.
//!
//! * **Queue.** When an object dies, the dying thread claims every alive
//!   entry of its callback list (C1) and pushes the chain, newest first, as
//!   one *batch* onto a Treiber stack. Consumers take the whole stack with
//!   one compare-exchange to null and run the batches oldest first. Producers never dereference
//!   a queued node and consumers never pop one at a time, so there is no
//!   ABA and no reclamation problem (C7).
//! * **Worker.** One thread, `weakrefs-finalizer`, started by the first
//!   batch, loops: drain, spin briefly for more, then announce that it is
//!   going to sleep, re-check, and park. A producer unparks it after a push
//!   only if it has announced sleep (a fence on each side orders the flag
//!   against the queue), and a crossbeam `Parker` keeps the token, so no
//!   wake-up is lost (C8).
//! * **Shutdown.** `shutdown` stops the worker, closes the queue by
//!   swapping in a marker, runs what the swap took, then runs the
//!   still-registered entries whose `atexit` is set, newest first. The swap
//!   takes every batch pushed before it, and a producer whose push finds
//!   the marker runs its callbacks inline instead. One location, ordered by
//!   its RMWs, decides each batch's fate (C9), so no callback is lost
//!   without adding a flag or a fence to the producers' path.

use std::panic::{self, AssertUnwindSafe};
use std::ptr;

use super::entry::{Entry, EntryRef, Hook};
use super::list::{EntryList, ObjectLink, RegistryLink};
use crate::marks::{self, Mark};
#[cfg(any(test, not(weakrefs_loom)))]
use crate::sync::spin_briefly_until;
use crate::sync::{
    fence, thread_local, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, CachePadded, Condvar,
    Mutex, Ordering, Parker, Unparker,
};

/// The queue head after `shutdown`: producers that find it run their
/// callbacks inline (C9). Never a real entry's address.
fn closed() -> *mut Entry {
    ptr::dangling_mut()
}

/// An object's callback list, embedded in its control block's header.
pub(crate) type ObjectCallbacks = EntryList<ObjectLink>;

thread_local! {
    /// After `shutdown`, the chains this thread must still run inline:
    /// `Some` while an inline delivery loop runs on this thread, which
    /// takes the chains that arise inside it (a callback dropping the last
    /// handle of another object) in order, instead of running them nested
    /// on the stack (C15).
    // loom's `thread_local!` takes no `const` initialiser.
    #[allow(clippy::missing_const_for_thread_local)]
    static INLINE: std::cell::RefCell<Option<std::collections::VecDeque<(*mut Entry, u64)>>> =
        std::cell::RefCell::new(None);
}

/// Process-wide counters, as `weakrefs::stats()` reports them. Producers
/// write `queued`, consumers `run` and `panicked`, both `pending`: each
/// group on its own cache line, so the dying thread and the worker do not
/// bounce one line between them.
#[derive(Debug, Default)]
struct Counters {
    finished_from_queue: CachePadded<AtomicU64>,
    run: AtomicU64,
    panicked: AtomicU64,
}

/// A snapshot of the counters: `(queued, run, panicked, pending)`.
pub(crate) type CounterSnapshot = (u64, u64, u64, u64);

/// Who runs a runtime's worker loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerMode {
    /// The runtime spawns `weakrefs-finalizer` at the first batch (global).
    Spawn,
    /// A test or model runs `worker_loop` on a thread of its own.
    #[cfg(test)]
    External,
    /// Nobody: `flush` drains on the calling thread.
    #[cfg(any(test, weakrefs_loom))]
    Inline,
}

/// The queue's head and the count of queued, unfinished callbacks, on one
/// cache line: producers and the consumer touch both together, so keeping
/// them apart would move two lines between cores per death instead of one.
#[derive(Debug)]
struct QueueHead {
    head: AtomicPtr<Entry>,
    /// Queued and not yet finished. `queued` is derived: `pending` plus
    /// `finished_from_queue`, which saves the dying thread an RMW.
    pending: AtomicU64,
}

/// The callback runtime. `Runtime::global()` is the one `finalize` uses;
/// tests and loom models build their own with `Runtime::new`, which never
/// spawns a thread: they drive `drain` (or `worker_loop`) themselves.
#[derive(Debug)]
pub(crate) struct Runtime {
    /// Death batches, newest first; each is a chain through `object_next`,
    /// and batches link through their head's `queue_next`.
    queue: CachePadded<QueueHead>,
    /// Every entry, newest first, for `shutdown`'s atexit pass.
    registry: CachePadded<EntryList<RegistryLink>>,
    counters: Counters,
    shut_down: AtomicBool,
    stop_requested: AtomicBool,
    /// Who runs the worker loop.
    worker_mode: WorkerMode,
    worker_started: AtomicBool,
    /// The worker thread could not be spawned: `flush` drains inline.
    worker_failed: AtomicBool,
    /// The worker is about to park or parked: producers must unpark it.
    worker_sleeping: AtomicBool,
    /// The worker's parker, until the worker takes it.
    parker: Mutex<Option<Parker>>,
    unparker: Unparker,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// `flush` waits here for `pending` to reach zero.
    idle: Mutex<()>,
    became_idle: Condvar,
    /// Set, under its mutex, when the first `shutdown` has finished.
    shutdown_done: Mutex<bool>,
    shutdown_finished: Condvar,
    /// `flush` calls waiting on `became_idle`; the consumer skips the
    /// mutex and the wake-up system call when there are none (C11).
    flush_waiters: AtomicUsize,
}

impl Runtime {
    /// A runtime without a worker: `flush` drains on the calling thread.
    #[cfg(any(test, weakrefs_loom))]
    pub(crate) fn inline() -> Self {
        Self::build(WorkerMode::Inline)
    }

    /// A runtime whose worker loop the caller runs, on a thread of its own,
    /// with the parker from [`Runtime::take_parker`].
    #[cfg(test)]
    pub(crate) fn external() -> Self {
        Self::build(WorkerMode::External)
    }

    /// The worker's parker, for a runtime built by [`Runtime::external`].
    #[cfg(test)]
    pub(crate) fn take_parker(&self) -> Parker {
        self.parker.lock().take().expect("the parker is taken once")
    }

    fn build(worker_mode: WorkerMode) -> Self {
        let parker = Parker::new();
        let unparker = parker.unparker().clone();
        Runtime {
            queue: CachePadded::new(QueueHead {
                head: AtomicPtr::new(ptr::null_mut()),
                pending: AtomicU64::new(0),
            }),
            registry: CachePadded::new(EntryList::new()),
            counters: Counters::default(),
            shut_down: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            worker_mode,
            worker_started: AtomicBool::new(false),
            worker_failed: AtomicBool::new(false),
            worker_sleeping: AtomicBool::new(false),
            parker: Mutex::new(Some(parker)),
            unparker,
            worker: Mutex::new(None),
            idle: Mutex::new(()),
            became_idle: Condvar::new(),
            flush_waiters: AtomicUsize::new(0),
            shutdown_done: Mutex::new(false),
            shutdown_finished: Condvar::new(),
        }
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

    /// Registers a collection's removal callback on `list` as a hook: kept
    /// out of the registry (`shutdown` never runs it, and registering costs
    /// no push on the process-wide registry), and run by the object's death
    /// at once, on the dying thread, not queued (C14), with the hook itself
    /// as its argument. The hook keeps `payload` in place until the entry
    /// drops it (`Hook::drop_payload`). It must be short, never block, and run none of its
    /// own user code (its writer's pin may collect other epoch garbage, as
    /// any lookup's does). Work it posts (and any posted job) is counted
    /// towards the registry's next compaction when it runs (a trigger,
    /// C5): at worst an early scan of the registry.
    pub(crate) fn register_hook<P, F>(
        &self,
        list: &ObjectCallbacks,
        payload: P,
        callback: F,
    ) -> Hook<P>
    where
        P: Send + Sync + 'static,
        F: FnOnce(&Hook<P>) + Send + 'static,
    {
        let (hook, in_list) = EntryRef::new_hook(payload, callback);
        list.push(in_list);
        hook
    }

    /// Runs `job` on the finalizer thread (inline once shutdown has closed
    /// the queue), counted in `pending` so that `flush` waits for it, and
    /// in the statistics as a callback. For work that must not run where it
    /// arises: a key's destructor, the last handle to a collection.
    pub(crate) fn post<F>(&self, job: F)
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
    pub(crate) fn has_queued_work(&self) -> bool {
        // Relaxed: a hint; nothing is read through the pointer.
        let head = self.queue.head.load(Ordering::Relaxed);
        !head.is_null() && head != closed()
    }

    /// True once `shutdown` has closed the queue: from then on posted work
    /// runs inline, where it arises. A caller with work that may block
    /// checks this first; a post racing the closing still runs inline (C9).
    pub(crate) fn is_closed(&self) -> bool {
        // Acquire: pairs with the store that closed the queue.
        self.queue.head.load(Ordering::Acquire) == closed()
    }

    /// The object owning `list` has died (its value is gone): claim its
    /// alive callbacks and deliver them, newest first.
    pub(crate) fn on_death(&self, list: &ObjectCallbacks) {
        // SAFETY: the object is dead, so no `finalize` can run on it: no
        // push or compaction races with this (C6).
        let mut node = unsafe { list.take_all() };
        let (mut head, mut tail, mut count) =
            (ptr::null_mut::<Entry>(), ptr::null_mut::<Entry>(), 0);
        let mut settled = 0;
        // Claimed collection callbacks, chained through `object_next` and
        // run below on this thread (C14).
        let mut here = ptr::null_mut::<Entry>();
        while !node.is_null() {
            let current = node;
            // SAFETY: the chain's references are ours (`take_all`).
            let entry = unsafe { &*current };
            // Relaxed: the chain is ours alone now (C6).
            node = entry.object_next.load(Ordering::Relaxed);
            if entry.claim() {
                if entry.on_dying_thread() {
                    // Relaxed: ours alone.
                    entry.object_next.store(here, Ordering::Relaxed);
                    here = current;
                    continue;
                }
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
                settled += 1;
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
            // SAFETY: the list's reference to a node we claimed (`take_all`),
            // given back when `entry` drops.
            let entry = unsafe { EntryRef::from_link(here) };
            // Relaxed: ours alone.
            here = entry.object_next.load(Ordering::Relaxed);
            // C14: short, non-blocking, no user code; a panic (none is
            // expected) is reported, never unwound into the dropping code.
            // SAFETY: claimed just now by us, and run once for that claim.
            crate::panics::catch_and_report("a collection's removal callback", || unsafe {
                entry.run_claimed()
            });
        }
        if count > 0 {
            self.dispatch(head, count);
        }
    }

    /// Hands a chain of `count` claimed entries to the worker, or runs it
    /// inline after `shutdown`.
    fn dispatch(&self, batch: *mut Entry, count: u64) {
        // Relaxed: sequenced before the push, whose Release the consumer
        // acquires before it subtracts, so `pending` never underflows (C11).
        self.queue.pending.fetch_add(count, Ordering::Relaxed);
        // SAFETY: `batch` is a claimed listed node we own (hooks run on
        // the dying thread and are never queued, C14).
        let link = unsafe { Entry::queue_next(batch) };
        // Relaxed: the value only seeds the CAS.
        let mut head = self.queue.head.load(Ordering::Relaxed);
        loop {
            if head == closed() {
                // Shutdown has closed the queue (C9): run the chain here,
                // in the dying thread, and take back our `pending`.
                // SAFETY: a chain of claimed entries whose references we own.
                unsafe { self.run_inline(batch, count) };
                return;
            }
            // Relaxed: published by the CAS.
            link.store(head, Ordering::Relaxed);
            // Release (C7): publishes the batch to the consumer's swap.
            // Relaxed on failure: we only learn the new head (which may be
            // the closed marker) and retry.
            match self.queue.head.compare_exchange_weak(
                head,
                batch,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => head = actual,
            }
        }
        self.wake_worker();
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
        let queued = INLINE
            .try_with(|inline| match inline.borrow_mut().as_mut() {
                Some(later) => {
                    later.push_back((batch, count));
                    true
                }
                None => false,
            })
            // During thread-local teardown: no loop to hand it to.
            .unwrap_or(false);
        if queued {
            return;
        }
        let looping = INLINE
            .try_with(|inline| *inline.borrow_mut() = Some(Default::default()))
            .is_ok();
        let mut next = Some((batch, count));
        while let Some((batch, count)) = next {
            // SAFETY: by 1 for the first; the others were handed over by
            // calls whose own 1 held, and each is taken off the list once.
            unsafe { self.run_chain(batch) };
            self.finish_pending(count);
            next = if looping {
                INLINE.with(|inline| {
                    let mut inline = inline.borrow_mut();
                    let later = inline.as_mut().expect("set above, until the loop ends");
                    match later.pop_front() {
                        Some((batch, count)) => Some((batch, count)),
                        None => {
                            *inline = None;
                            None
                        }
                    }
                })
            } else {
                None
            };
        }
    }

    /// Records `count` queued callbacks as finished and wakes a waiting
    /// `flush` if that leaves nothing pending.
    fn finish_pending(&self, count: u64) {
        // AcqRel (C11): Release so a `flush` that sees the drop to zero
        // also sees the callbacks' effects; Acquire pairs with the
        // producers' increments.
        if self.queue.pending.fetch_sub(count, Ordering::AcqRel) == count && self.flush_is_waiting()
        {
            let _idle = self.idle.lock();
            self.became_idle.notify_all();
        }
    }

    fn wake_worker(&self) {
        // Acquire: pairs with the Release in `start_worker`; a stale `false`
        // only costs a trip through the mutex.
        if self.worker_mode == WorkerMode::Spawn && !self.worker_started.load(Ordering::Acquire) {
            self.start_worker();
        }
        // SeqCst fence (C8): pairs with the worker's fence between raising
        // `worker_sleeping` and re-checking the queue. Either the worker
        // sees our batch and does not park, or we see it about to park and
        // unpark it. An awake worker costs us no RMW on the parker's line.
        fence(Ordering::SeqCst);
        // Relaxed: ordered by the fence.
        if self.worker_sleeping.load(Ordering::Relaxed) {
            self.unparker.unpark();
        }
    }

    #[cold]
    #[inline(never)]
    fn start_worker(&self) {
        let mut worker = self.worker.lock();
        // Relaxed: the mutex orders starts.
        if self.worker_started.load(Ordering::Relaxed) {
            return;
        }
        // Acquire: pairs with `stop_worker`'s Release. `stop_worker` sets
        // the flag before it takes this mutex, so a start that comes after
        // that sees it and does not spawn a thread nobody would join; the
        // producer's batch is taken by shutdown's closing swap or runs
        // inline (C9).
        if self.stop_requested.load(Ordering::Acquire) {
            // Release: as below.
            self.worker_started.store(true, Ordering::Release);
            return;
        }
        // Nothing below may panic before the outcome is recorded: a start
        // that dies half-way would leave later deaths queued with no worker
        // and no `worker_failed` for `flush` to see.
        let parker = self.parker.lock().take();
        let spawned = parker.and_then(spawn_worker);
        if spawned.is_none() {
            self.mark_worker_failed();
        }
        *worker = spawned;
        // Release: pairs with `wake_worker`'s Acquire.
        self.worker_started.store(true, Ordering::Release);
    }

    /// Runs everything queued so far, oldest death first. Returns how many
    /// callbacks ran. Any thread may call it; each batch runs once (C7).
    pub(crate) fn drain(&self) -> u64 {
        // Acquire (C7): pairs with the producers' Release push.
        let mut head = self.queue.head.load(Ordering::Acquire);
        let newest_first = loop {
            if head.is_null() || head == closed() {
                return 0;
            }
            // Acquire (C7): as above. Never swap blindly: after shutdown the
            // head is the closed marker, which must stay (C9).
            match self.queue.head.compare_exchange_weak(
                head,
                ptr::null_mut(),
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(taken) => break taken,
                Err(actual) => head = actual,
            }
        };
        // SAFETY: everything below runs what the CAS took; see `run_taken`.
        unsafe { self.run_taken(newest_first) }
    }

    /// Runs the batches taken from the queue, oldest death first.
    ///
    /// # Safety
    ///
    /// 1. `*newest_first` heads a stack of batches this thread took from the
    ///    queue (C7), or is null.
    unsafe fn run_taken(&self, mut newest_first: *mut Entry) -> u64 {
        // While this runs, a `flush` inside a callback returns at once
        // (C15); undone on the way out, as the outermost loop left it.
        let _draining = marks::enter(Mark::Draining);
        // Reverse the batches to run the oldest death first.
        let mut oldest_first = ptr::null_mut::<Entry>();
        while !newest_first.is_null() {
            // SAFETY: the batches are ours after the swap, and their heads
            // are listed nodes (`dispatch`).
            let link = unsafe { Entry::queue_next(newest_first) };
            // Relaxed: ours alone.
            let next = link.load(Ordering::Relaxed);
            link.store(oldest_first, Ordering::Relaxed);
            oldest_first = newest_first;
            newest_first = next;
        }
        let mut ran = 0;
        while !oldest_first.is_null() {
            let batch = oldest_first;
            // SAFETY: as above. Relaxed: ours alone.
            oldest_first = unsafe { Entry::queue_next(batch) }.load(Ordering::Relaxed);
            // SAFETY: a queued chain of claimed entries, ours after the swap.
            let count = unsafe { self.run_chain(batch) };
            ran += count;
            // Relaxed: statistics; incremented before `pending` drops, so
            // their sum never undercounts what was queued.
            self.counters
                .finished_from_queue
                .fetch_add(count, Ordering::Relaxed);
            self.finish_pending(count);
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
            self.run_callback(|| unsafe { entry.run_claimed() });
            count += 1;
        }
        count
    }

    /// Runs one callback, catching and reporting a panic.
    pub(crate) fn run_callback(&self, callback: impl FnOnce()) {
        let outcome = {
            let _callback = marks::enter(Mark::Callback);
            panic::catch_unwind(AssertUnwindSafe(callback))
        };
        // Relaxed: statistics.
        self.counters.run.fetch_add(1, Ordering::Relaxed);
        if let Err(payload) = outcome {
            // Relaxed: statistics.
            self.counters.panicked.fetch_add(1, Ordering::Relaxed);
            crate::panics::report("a death callback", payload);
        }
    }

    /// The worker is gone (its thread could not be spawned, or it died):
    /// from now on `flush` drains on the calling thread. Wakes any `flush`
    /// already waiting, so it notices.
    fn mark_worker_failed(&self) {
        // Release: pairs with the Acquire load in `flush`.
        self.worker_failed.store(true, Ordering::Release);
        let _idle = self.idle.lock();
        self.became_idle.notify_all();
    }

    /// Blocks until nothing is queued and no queued callback is running.
    /// Inside a callback, or on a runtime without a worker, it runs the
    /// queue on this thread instead of waiting (waiting would deadlock on
    /// the callback that is calling it).
    pub(crate) fn flush(&self) {
        let in_callback = marks::is_inside(Mark::Callback);
        if in_callback && marks::is_inside(Mark::Draining) {
            // The drain loop running this callback runs what is queued
            // next: draining here would nest one loop per flushing callback
            // on this stack (C15).
            return;
        }
        if in_callback || self.has_no_worker() {
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
        // Acquire (C11): pairs with the AcqRel decrement that reached zero,
        // so the callbacks' effects are visible.
        while self.queue.pending.load(Ordering::Acquire) != 0 {
            // `mark_worker_failed` notifies under `idle`, so a worker that
            // dies while we wait wakes us here.
            if self.has_no_worker() {
                worker_gone = true;
                break;
            }
            idle = self.became_idle.wait(idle);
        }
        // Relaxed: only the count matters; we hold the mutex.
        self.flush_waiters.fetch_sub(1, Ordering::Relaxed);
        drop(idle);
        if worker_gone {
            self.drain();
        }
    }

    /// No worker thread will drain the queue: this runtime has none, or it
    /// could not be spawned, or it died.
    fn has_no_worker(&self) -> bool {
        // Acquire: pairs with `mark_worker_failed`'s Release.
        self.worker_mode_is_inline() || self.worker_failed.load(Ordering::Acquire)
    }

    /// Called by the consumer that took `pending` to zero: is a `flush`
    /// waiting to be woken?
    fn flush_is_waiting(&self) -> bool {
        // SeqCst fence (C11): pairs with the fence in `flush`.
        fence(Ordering::SeqCst);
        // Relaxed: ordered by the fence.
        self.flush_waiters.load(Ordering::Relaxed) != 0
    }

    fn worker_mode_is_inline(&self) -> bool {
        #[cfg(any(test, weakrefs_loom))]
        if self.worker_mode == WorkerMode::Inline {
            return true;
        }
        false
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
        self.stop_worker();
        // Close the queue (C9): the swap takes every batch pushed before it,
        // and every push after it finds the marker and runs inline.
        // AcqRel: Acquire pairs with the producers' Release pushes; Release
        // orders our earlier work before producers that see the marker.
        let taken = self.queue.head.swap(closed(), Ordering::AcqRel);
        // SAFETY: the swap took these batches; nobody else can reach them.
        unsafe { self.run_taken(taken) };
        // Newest first: the registry is a stack, and compaction keeps the
        // relative order of what it keeps.
        for entry in self.registry.alive_entries() {
            if entry.atexit() && entry.claim() {
                // SAFETY: we won the claim just now; this is its one run.
                self.run_callback(|| unsafe { entry.run_claimed() });
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

    fn stop_worker(&self) {
        // Release: pairs with the worker's Acquire load.
        self.stop_requested.store(true, Ordering::Release);
        self.unparker.unpark();
        let handle = self.worker.lock().take();
        if let Some(handle) = handle {
            if handle.thread().id() != std::thread::current().id() {
                // A worker that died has already marked itself failed.
                let _ = handle.join();
            }
        }
    }

    /// The worker's loop: drain, then park until a producer unparks.
    #[cfg(any(test, not(weakrefs_loom)))]
    pub(crate) fn worker_loop(&self, parker: Parker) {
        /// If the worker ever unwinds (nothing in it should panic: callbacks
        /// and their payloads are caught), `flush` must stop waiting for it.
        struct DiesLoudly<'a>(&'a Runtime);
        impl Drop for DiesLoudly<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.mark_worker_failed();
                }
            }
        }
        let _guard = DiesLoudly(self);
        loop {
            self.drain();
            // Acquire: pairs with `stop_worker`'s Release.
            if self.stop_requested.load(Ordering::Acquire) {
                self.drain();
                return;
            }
            // Relaxed: a hint; the drain's swap does the synchronising, and
            // a miss costs one park, which the producer's unpark ends (C8).
            let more_work = || {
                let head = self.queue.head.load(Ordering::Relaxed);
                !head.is_null() && head != closed()
            };
            if spin_briefly_until(more_work) {
                continue;
            }
            // Idle: what the callbacks retired (a map's removed entries)
            // must not wait for the next death to be freed. Collecting it
            // may queue more work (a removed value's destructor), which the
            // check below then finds.
            // It runs other code's deferred functions too: a panic there
            // must not end the worker.
            crate::panics::catch_and_report("an epoch collection step", || {
                crate::reclaim::push_own_garbage_through();
            });
            // Relaxed: ordered by the fence (C8).
            self.worker_sleeping.store(true, Ordering::Relaxed);
            // SeqCst fence (C8): pairs with the producers' fence in
            // `wake_worker`.
            fence(Ordering::SeqCst);
            if !more_work() {
                parker.park();
            }
            // Relaxed: a producer that still sees `true` unparks needlessly,
            // leaving a token that costs one extra loop.
            self.worker_sleeping.store(false, Ordering::Relaxed);
        }
    }

    /// `(queued, run, panicked, pending)`.
    pub(crate) fn counters(&self) -> CounterSnapshot {
        // Relaxed: a statistics snapshot; the four loads need not agree.
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let pending = load(&self.queue.pending);
        (
            load(&self.counters.finished_from_queue) + pending,
            load(&self.counters.run),
            load(&self.counters.panicked),
            pending,
        )
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Batches still queued in a runtime that is going away (tests,
        // models): run them rather than lose them.
        self.drain();
    }
}

#[cfg(not(weakrefs_loom))]
mod global {
    use super::Runtime;
    use std::io::Write;
    use std::sync::OnceLock;

    static GLOBAL: OnceLock<Runtime> = OnceLock::new();

    /// The process-wide runtime that `finalize` uses.
    pub(crate) fn global() -> &'static Runtime {
        GLOBAL.get_or_init(|| Runtime::build(super::WorkerMode::Spawn))
    }

    /// Starts the worker thread over the global runtime.
    pub(super) fn spawn_worker(parker: crate::sync::Parker) -> Option<std::thread::JoinHandle<()>> {
        let spawned = std::thread::Builder::new()
            .name("weakrefs-finalizer".into())
            .spawn(move || global().worker_loop(parker));
        match spawned {
            Ok(handle) => Some(handle),
            Err(error) => {
                // No thread: callbacks still run, at the next `flush` (which
                // drains inline) or at `shutdown`, never lost. Write errors
                // are ignored: `eprintln!` would panic on a closed stderr.
                let _ = writeln!(
                    std::io::stderr(),
                    "weakrefs: cannot start the finalizer thread ({error}); callbacks will run when the queue is drained"
                );
                None
            }
        }
    }
}

#[cfg(weakrefs_loom)]
mod global {
    use super::Runtime;

    /// Every process-wide object of the crate under loom, in one lazy
    /// static: loom drops its lazy statics in an order that changes between
    /// executions, and two of them touching loom atomics in their
    /// destructors would make a model nondeterministic. The epoch collector
    /// is dropped after the runtime.
    pub(crate) struct LoomGlobals {
        // Dropped first: its pending deferred functions may post work to
        // the runtime, which must still be there (fields drop in order).
        collector: crossbeam_epoch::Collector,
        runtime: Runtime,
    }

    loom::lazy_static! {
        static ref GLOBAL: LoomGlobals = LoomGlobals {
            collector: crossbeam_epoch::Collector::new(),
            runtime: Runtime::inline(),
        };
    }

    /// Under loom the global runtime spawns no thread: `flush` drains it on
    /// the calling thread, so models stay finite.
    pub(crate) fn global() -> &'static Runtime {
        &GLOBAL.runtime
    }

    /// The epoch collector that `Reclaimer::global` uses under loom.
    pub(crate) fn loom_collector() -> &'static crossbeam_epoch::Collector {
        &GLOBAL.collector
    }

    pub(super) fn spawn_worker(_: crate::sync::Parker) -> Option<std::thread::JoinHandle<()>> {
        None
    }
}

pub(crate) use global::global;
#[cfg(weakrefs_loom)]
pub(crate) use global::loom_collector;
use global::spawn_worker;

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
        runtime.on_death(&list);
        assert!(log.lock().unwrap().is_empty(), "ran before the drain");
        assert_eq!(runtime.counters(), (2, 0, 0, 2));
        assert_eq!(runtime.drain(), 2);
        assert_eq!(*log.lock().unwrap(), [3, 1]);
        assert_eq!(runtime.counters(), (2, 2, 0, 0));
    }

    #[test]
    fn batches_run_oldest_death_first() {
        let runtime = Runtime::inline();
        let log = StdArc::new(std::sync::Mutex::new(Vec::new()));
        for tag in 0..5 {
            let list = ObjectCallbacks::new();
            runtime.register(&list, logger(&log, tag));
            runtime.on_death(&list);
        }
        runtime.flush();
        assert_eq!(*log.lock().unwrap(), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn an_external_worker_runs_everything_before_flush_returns() {
        let runtime = StdArc::new(Runtime::external());
        let parker = runtime.take_parker();
        let worker = {
            let runtime = runtime.clone();
            std::thread::spawn(move || runtime.worker_loop(parker))
        };
        let runs = StdArc::new(AtomicUsize::new(0));
        let rounds = if cfg!(miri) { 20 } else { 2_000 };
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..rounds {
                        let list = ObjectCallbacks::new();
                        let runs = runs.clone();
                        runtime.register(
                            &list,
                            Box::new(move || {
                                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }),
                        );
                        runtime.on_death(&list);
                    }
                });
            }
        });
        runtime.flush();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2 * rounds);
        assert_eq!(runtime.counters().3, 0);
        runtime.shutdown();
        worker.join().unwrap();
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
        runtime.on_death(&second_list);
        assert_eq!(*log.lock().unwrap(), [3, 2, 1, 4]);
        runtime.on_death(&first_list);
        assert_eq!(log.lock().unwrap().len(), 4, "shutdown's runs never repeat");
        assert_eq!(runtime.counters().0, 0, "nothing was queued");
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
        // a list holds at most five times it, plus one push per thread
        // between its CAS and its count.
        let kept = 64 + threads + 1;
        let bound = 5 * kept + threads;
        assert!(
            longest <= bound,
            "object list reached {longest} nodes (bound {bound})"
        );
        assert!(runtime.registry.node_count() <= bound, "registry grew");
        assert!(live.iter().all(|entry| entry.is_alive()));
        runtime.on_death(&list);
        assert_eq!(runtime.drain(), 64);
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
            runtime.on_death(&list);
        }
        assert_eq!(runtime.drain(), count as u64);
        assert!(
            runtime.registry.node_count() <= 2 * 16,
            "registry kept {} settled entries",
            runtime.registry.node_count()
        );
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
        runtime.on_death(&list);
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
        runtime.on_death(&list);
        assert_eq!(runtime.drain(), 1);
        assert_eq!(runtime.counters().2, 1, "the callback's panic is counted");
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
        runtime.on_death(&list);
        assert_eq!(runtime.drain(), 2);
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 7);
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
        runtime.on_death(&list);
        assert_eq!(runtime.drain(), 1);
    }
}

/// Loom models of the queue, the worker's parking and `flush` (SAFETY.md,
/// C7–C9, C11). Run by `.ci/loom`.
#[cfg(all(test, weakrefs_loom))]
mod loom_models {
    use super::*;
    use loom::sync::atomic::AtomicUsize;
    use loom::sync::Arc;
    use loom::thread;

    fn counting(runs: &Arc<AtomicUsize>) -> impl FnOnce() + Send {
        let runs = runs.clone();
        Box::new(move || {
            runs.fetch_add(1, Ordering::SeqCst);
        })
    }

    /// A runtime whose worker loop runs on a model thread of its own.
    fn with_worker() -> (Arc<Runtime>, thread::JoinHandle<()>) {
        let runtime = Arc::new(Runtime::external());
        let parker = runtime.take_parker();
        let worker = {
            let runtime = runtime.clone();
            thread::spawn(move || runtime.worker_loop(parker))
        };
        (runtime, worker)
    }

    fn die_with_one_callback(runtime: &Runtime, runs: &Arc<AtomicUsize>) {
        let list = ObjectCallbacks::new();
        runtime.register(&list, counting(runs));
        runtime.on_death(&list);
    }

    /// A death racing the worker's drain-then-park: the unpark is never
    /// lost, so `flush` returns (loom reports a deadlock otherwise) with the
    /// callback run exactly once.
    #[test]
    fn push_races_drain_and_park() {
        loom::model(|| {
            let (runtime, worker) = with_worker();
            let runs = Arc::new(AtomicUsize::new(0));
            die_with_one_callback(&runtime, &runs);
            runtime.flush();
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            runtime.shutdown();
            worker.join().unwrap();
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        });
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
            assert_eq!(runtime.counters().3, 0);
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
            runtime.on_death(&list);
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        });
    }

    /// Compaction unlinking and freeing detached nodes while another thread
    /// pushes and a third detaches (the compaction threshold is 1 under
    /// loom, so every push compacts).
    #[test]
    fn compaction_frees_while_others_push_and_detach() {
        loom::model(|| {
            let runtime = Arc::new(Runtime::inline());
            let runs = Arc::new(AtomicUsize::new(0));
            let list = Arc::new(ObjectCallbacks::new());
            let first = runtime.register(&list, counting(&runs));
            let second = runtime.register(&list, counting(&runs));
            let pusher = {
                let (runtime, list, runs) = (runtime.clone(), list.clone(), runs.clone());
                thread::spawn(move || runtime.register(&list, counting(&runs)))
            };
            let detacher = thread::spawn(move || assert!(first.detach()));
            let third = runtime.register(&list, counting(&runs));
            assert!(second.detach());
            detacher.join().unwrap();
            let fourth = pusher.join().unwrap();
            let list = Arc::try_unwrap(list).expect("threads joined");
            runtime.on_death(&list);
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
            runtime.on_death(&list);
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
                thread::spawn(move || runtime.on_death(&list))
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
