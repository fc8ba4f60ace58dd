//! Death callbacks, the public face: `finalize`, `Finalizer`, `flush`,
//! `shutdown`, `stats`.

use std::fmt;

pub use crate::callbacks::Stats;
use crate::callbacks::{global, EntryRef};
use crate::strong::Strong;

/// Registers `callback` to run once after `obj`'s value has been dropped,
/// like Python's `weakref.finalize`.
///
/// The callback runs on the background thread `weakrefs-finalizer`, so the
/// thread that drops the last [`Strong`] pays only for handing it over.
/// Callbacks of one object run newest-registered first. The returned
/// [`Finalizer`] can cancel it ([`detach`](Finalizer::detach)) or run it
/// early ([`call`](Finalizer::call)); dropping the `Finalizer` does
/// **not** cancel it.
///
/// The callback must not own a `Strong` to `obj` itself: that handle would
/// keep the object alive forever (reference counting cannot free cycles).
/// Capture what the clean-up needs instead, or a [`Weak`](crate::Weak).
///
/// Deaths are handed over without waiting, with one exception that bounds
/// memory: a death that leaves more than 32 768 callbacks queued,
/// process-wide, makes its drop wait for the finalizer thread to run
/// those queued ahead of it down to half that many, for 100 ms at most,
/// giving up after 10 ms in which it finishes nothing (see [`Strong`] for
/// where it waits instead; [`Stats::backlog_waits`] counts these waits).
///
/// Registration is lock-free with one exception that bounds memory: a
/// registration that finds the object's list (or the process-wide registry)
/// four times overdue for compaction while another thread is compacting it
/// yields until that compaction is done. Callbacks registered concurrently
/// on one object count as registered in the order their pushes land.
///
/// The object dies when its last `Strong` goes away, by drop or by
/// [`Strong::try_unwrap`]; in the latter case the callbacks run although
/// the value itself lives on in the caller's hands.
///
/// Unlike JavaScript's `FinalizationRegistry` or Java's `Cleaner`, whose
/// callbacks run at some unspecified time after a garbage collection, if at
/// all, a callback here is deterministic: it is queued at the moment the
/// last `Strong` is dropped, and [`flush`] waits for it.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use weakrefs::{finalize, flush, Strong};
///
/// let closed = Arc::new(AtomicBool::new(false));
/// let session = Strong::new("session 42");
/// let flag = closed.clone();
/// let finalizer = finalize(&session, move || flag.store(true, Ordering::SeqCst));
/// assert!(finalizer.alive());
///
/// drop(session); // the value is dropped here; the callback is queued
/// flush();       // wait until the finalizer thread has run it
/// assert!(closed.load(Ordering::SeqCst));
/// assert!(!finalizer.alive());
/// ```
pub fn finalize<T: ?Sized, F>(obj: &Strong<T>, callback: F) -> Finalizer
where
    F: FnOnce() + Send + 'static,
{
    let list = Strong::callback_list(obj);
    Finalizer {
        entry: global().register(list, callback),
    }
}

/// A handle to a callback registered by [`finalize`]: query, cancel or run
/// it early. Cloning gives another handle to the same callback; dropping
/// handles never cancels it.
///
/// ```
/// use weakrefs::{finalize, Strong};
///
/// let obj = Strong::new("temp file");
/// let cleanup = finalize(&obj, || println!("removing the temp file"));
/// let handle = cleanup.clone();
/// drop(cleanup); // dropping a handle cancels nothing
/// assert!(handle.alive());
/// assert!(handle.detach()); // cancelling does
/// assert!(!handle.alive());
/// ```
#[derive(Clone)]
pub struct Finalizer {
    entry: EntryRef,
}

impl Finalizer {
    /// True until the callback has run, been claimed to run (its object has
    /// died, or `call`/`shutdown` took it), or been detached.
    ///
    /// ```
    /// let obj = weakrefs::Strong::new(());
    /// let f = weakrefs::finalize(&obj, || {});
    /// assert!(f.alive());
    /// f.detach();
    /// assert!(!f.alive());
    /// ```
    pub fn alive(&self) -> bool {
        self.entry.is_alive()
    }

    /// Cancels the callback, dropping it unrun in this thread. Returns true
    /// if it was alive, false if it had already run, been claimed or been
    /// detached. The node that held it (a few dozen bytes) stays in the
    /// object's callback list until the list is next compacted, after
    /// about as many new registrations on the object as the list kept at
    /// its last compaction, or until the object dies: an object that lives
    /// on after N registrations were detached keeps about that many nodes.
    ///
    /// ```
    /// let obj = weakrefs::Strong::new(());
    /// let f = weakrefs::finalize(&obj, || unreachable!("detached"));
    /// assert!(f.detach());
    /// assert!(!f.detach());
    /// drop(obj);
    /// weakrefs::flush();
    /// ```
    pub fn detach(&self) -> bool {
        self.entry.detach()
    }

    /// Runs the callback now, in this thread, if it is alive; it will not
    /// run again at death. Returns true if it ran. A panic in the callback
    /// is caught, counted in [`stats`] and reported on stderr, as on the
    /// finalizer thread.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    ///
    /// let runs = Arc::new(AtomicUsize::new(0));
    /// let obj = weakrefs::Strong::new(());
    /// let counter = runs.clone();
    /// let f = weakrefs::finalize(&obj, move || {
    ///     counter.fetch_add(1, Ordering::SeqCst);
    /// });
    /// assert!(f.call());
    /// assert!(!f.call());
    /// drop(obj);
    /// weakrefs::flush();
    /// assert_eq!(runs.load(Ordering::SeqCst), 1);
    /// ```
    pub fn call(&self) -> bool {
        if !self.entry.claim() {
            return false;
        }
        // SAFETY: we won the claim just now; this is its one run.
        global().run_callback(|| unsafe { self.entry.run_claimed(None) });
        // A safe point (SAFETY.md, C18): deaths inside the callback kept
        // their debt for here.
        global().settle_backlog();
        true
    }

    /// Whether [`shutdown`] runs this callback if it is still alive then.
    /// True unless changed, as in Python.
    ///
    /// ```
    /// let obj = weakrefs::Strong::new(());
    /// let f = weakrefs::finalize(&obj, || {});
    /// assert!(f.atexit());
    /// f.set_atexit(false);
    /// assert!(!f.atexit());
    /// ```
    pub fn atexit(&self) -> bool {
        self.entry.atexit()
    }

    /// Sets whether [`shutdown`] runs this callback if it is still alive.
    /// A callback that `shutdown` skips still runs, inline, when its object
    /// dies.
    ///
    /// ```
    /// let obj = weakrefs::Strong::new(());
    /// let f = weakrefs::finalize(&obj, || {});
    /// f.set_atexit(false);
    /// assert!(!f.atexit());
    /// ```
    pub fn set_atexit(&self, run_at_exit: bool) {
        self.entry.set_atexit(run_at_exit)
    }
}

impl fmt::Debug for Finalizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Finalizer")
            .field("alive", &self.alive())
            .field("atexit", &self.atexit())
            .finish()
    }
}

/// Blocks until the callback queue is empty and no queued callback is
/// running: the analogue of Python's `gc.collect()` in tests. It also
/// hands this thread's retired memory to the epoch collector and tries to
/// advance it, so that entries removed from the collections usually have
/// their keys and values dropped by the time it returns; not always: a
/// thread that stays pinned (inside a lookup or a `with` closure) holds
/// that back, a cascade (a removed value that held the last handle to
/// another key) may still be under way on the finalizer thread, and
/// memory that other threads retired (the finalizer thread's removals, a
/// thread that has just exited) may wait for the epoch to move on again.
/// A test that counts drops calls it until the count settles. A burst of
/// removals (an object filed under a million keys dying, a `retain` that
/// empties a large map) is pushed through whole, as long as each step of
/// collection still frees something.
///
/// It waits for a quiet moment: while other threads keep objects dying,
/// it returns once the finalizer thread catches up. It does not wait for
/// callbacks that run outside the queue ([`Finalizer::call`], `shutdown`,
/// inline after `shutdown`). Called from inside a callback it cannot wait
/// (it would wait for itself): on the finalizer thread it returns at once,
/// and the loop running the callback runs what is queued next, so chains
/// of callbacks that flush never pile up on the stack; elsewhere (inside
/// [`Finalizer::call`]) it runs what is queued on the calling thread until
/// the queue is empty.
///
/// After [`shutdown`] there is no finalizer thread: a collection entry
/// whose value died while another thread held its shard's lock was left
/// for later, and `flush` removes it now, waiting for that lock, and runs
/// its removal listener on the calling thread (only trying, inside a
/// callback). So `len()` is exact after `flush()` then too.
///
/// With the `rayon` feature, the finalizer thread belongs to a rayon pool
/// of its own, with one more thread: a callback's parallel work (a
/// `par_iter` over a collection) runs there, so it finishes even while
/// every worker of the global pool is blocked in `flush`, and what a
/// callback hands to `rayon::spawn` runs on that one other thread, so the
/// callback may wait for it (but not for spawned work that itself waits
/// for more spawned work, nor for spawned work that calls `shutdown`).
/// That work is part of the callback: a `flush` in it returns at once,
/// as in the callback itself, without running anything. On a worker of
/// another pool, `flush` runs that pool's pending work while it waits,
/// for the callbacks that run elsewhere than on the finalizer thread (by
/// [`Finalizer::call`]'s `flush`, or by [`shutdown`]) and do their
/// parallel work there; only the outermost `flush` on a thread's stack
/// does, so flushes in that work never pile up on the stack. Such a
/// callback still waits for ever if every worker of that pool is in a
/// nested `flush` (or blocked otherwise): one whose parallel work may meet
/// workers that all flush from inside work they run should not be run
/// that way.
///
/// Nor may it be called from a map's single-flight `init` (or its
/// `Drop`): it waits for the queued callbacks, and one that asks the map
/// for the key being loaded (a listener that reloads what died, say)
/// waits for that `init`, so neither ever finishes. Nor from code a map
/// runs while it holds a shard's lock (a key's `Eq` or `Clone`,
/// `WeakValueMap::remove_if`'s predicate, where it panics instead): a
/// death in that shard queues a removal that waits for the lock.
/// [`shutdown`] waits for the finalizer thread too, and the same holds
/// for it.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
///
/// let ran = Arc::new(AtomicBool::new(false));
/// let obj = weakrefs::Strong::new(());
/// let flag = ran.clone();
/// weakrefs::finalize(&obj, move || flag.store(true, Ordering::SeqCst));
/// drop(obj);
/// weakrefs::flush();
/// assert!(ran.load(Ordering::SeqCst));
/// ```
pub fn flush() {
    refuse_under_a_shard_lock("flush");
    global().flush_with_garbage();
}

/// Panics if this thread is running `WeakValueMap::remove_if`'s predicate,
/// under a shard's lock: `what` (`flush`, `shutdown`) would wait for the
/// finalizer thread, which may be waiting for that lock to remove an entry
/// of a value that died meanwhile.
#[track_caller]
fn refuse_under_a_shard_lock(what: &str) {
    if crate::marks::is_inside(crate::marks::Mark::Locked) {
        panic!(
            "weakrefs::{what} called inside WeakValueMap::remove_if's predicate, \
             which runs under a shard's lock: it would wait for itself"
        );
    }
}

/// Drains the callback queue, runs every still-registered callback whose
/// [`atexit`](Finalizer::atexit) is set (newest first), and stops the
/// finalizer thread. Idempotent: later calls return at once.
///
/// Afterwards callbacks run inline, in the thread that drops an object's
/// last `Strong`, so none is ever lost: one that `shutdown` skipped
/// (`atexit` unset) still runs when its object dies; one that `shutdown`
/// ran never runs again. (Inline callbacks do not nest: a callback that
/// drops the last handle of another object returns first, and that
/// object's callbacks run next, before the outermost drop returns; so a
/// chain of any length needs no more stack than one link.) Rust has no
/// interpreter exit to hook: call it at the end of `main` if `atexit`
/// callbacks matter.
///
/// A call made while another thread's `shutdown` is running waits for it
/// to finish, so returning always means the atexit pass is over; a call
/// from inside a callback returns at once. It waits for the finalizer
/// thread to stop, so it must not be called where [`flush`] must not
/// (see there): inside a map's single-flight `init`, or under a map's
/// shard lock.
///
/// ```
/// // In the last lines of `main`:
/// weakrefs::shutdown();
/// ```
pub fn shutdown() {
    refuse_under_a_shard_lock("shutdown");
    global().shutdown()
}

/// Process-wide counters of the death-callback runtime since start.
///
/// ```
/// let before = weakrefs::stats();
/// let obj = weakrefs::Strong::new(());
/// weakrefs::finalize(&obj, || {});
/// drop(obj);
/// weakrefs::flush();
/// let after = weakrefs::stats();
/// assert!(after.run > before.run);
/// ```
pub fn stats() -> Stats {
    global().stats()
}
