//! One registered death callback and the state machine that runs it at most
//! once.
//!
//! ```text
//!            detach()                call() / death / shutdown()
//!  DETACHED <──────── ALIVE ───────────────────────────────────> CLAIMED
//! ```
//!
//! Every path out of `ALIVE` is a compare-exchange, so exactly one of
//! `detach`, `call`, the object's death and `shutdown` wins (SAFETY.md, C1).
//! The winner, and only the winner, takes the callback out of its cell:
//! `detach` drops it, the others run it.

use crate::sync::{Arc, AtomicBool, AtomicPtr, AtomicU8, Ordering, UnsafeCell};
use std::ptr;

/// A boxed death callback.
pub(crate) type Callback = Box<dyn FnOnce() + Send + 'static>;

const ALIVE: u8 = 0;
const DETACHED: u8 = 1;
const CLAIMED: u8 = 2;

/// A registered callback. Shared (`Arc`) by the `Finalizer` handles, the
/// object's callback list and the runtime's registry; each list owns one
/// reference through its raw `*_next` link.
pub(crate) struct Entry {
    state: AtomicU8,
    /// Run by `shutdown()` if still alive (Python's `finalize.atexit`).
    atexit: AtomicBool,
    /// `Some` until the winner of the state machine takes it (C1).
    callback: UnsafeCell<Option<Callback>>,
    /// Link in the object's callback list, then in its death batch.
    pub(crate) object_next: AtomicPtr<Entry>,
    /// Link in the runtime's registry of all entries (for `shutdown`).
    pub(crate) registry_next: AtomicPtr<Entry>,
    /// Link between death batches in the runtime's queue (batch heads only).
    pub(crate) queue_next: AtomicPtr<Entry>,
}

// SAFETY: the callback is `Send`; it is moved out by exactly one thread, the
// winner of the state CAS (C1), so sharing `&Entry` never gives two threads
// access to it. Every other field is atomic.
unsafe impl Send for Entry {}
// SAFETY: as for `Send`: the only non-atomic field is reached by the state
// machine's single winner.
unsafe impl Sync for Entry {}

impl Entry {
    pub(crate) fn new(callback: Callback) -> Arc<Entry> {
        Arc::new(Entry {
            state: AtomicU8::new(ALIVE),
            atexit: AtomicBool::new(true),
            callback: UnsafeCell::new(Some(callback)),
            object_next: AtomicPtr::new(ptr::null_mut()),
            registry_next: AtomicPtr::new(ptr::null_mut()),
            queue_next: AtomicPtr::new(ptr::null_mut()),
        })
    }

    /// Neither run, claimed to run, nor detached.
    pub(crate) fn is_alive(&self) -> bool {
        // Acquire (C2): pairs with the AcqRel claim, so a thread that sees
        // the entry settled also sees what the claimant did before it.
        self.state.load(Ordering::Acquire) == ALIVE
    }

    pub(crate) fn atexit(&self) -> bool {
        // Relaxed (C3): a preference flag; `shutdown` reads it once.
        self.atexit.load(Ordering::Relaxed)
    }

    pub(crate) fn set_atexit(&self, run_at_exit: bool) {
        // Relaxed (C3): as above.
        self.atexit.store(run_at_exit, Ordering::Relaxed);
    }

    fn settle(&self, to: u8) -> bool {
        // AcqRel (C1): the modification order of `state` makes exactly one
        // CAS from ALIVE succeed. Acquire orders the winner's take of the
        // callback after the entry's construction even when the winner
        // reached the entry through a `Finalizer` handed over by the user;
        // Release pairs with `is_alive`'s Acquire (C2).
        self.state
            .compare_exchange(ALIVE, to, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Wins the right to run the callback. The caller must then call
    /// [`Entry::take_claimed`] exactly once, or the callback is dropped
    /// unrun with the entry.
    pub(crate) fn claim(&self) -> bool {
        self.settle(CLAIMED)
    }

    /// Cancels the callback if it is alive, dropping it in this thread.
    pub(crate) fn detach(&self) -> bool {
        if !self.settle(DETACHED) {
            return false;
        }
        // SAFETY: we won the state CAS (C1); no other thread touches the
        // cell after that.
        drop(unsafe { self.take_claimed() });
        true
    }

    /// Moves the callback out of the cell.
    ///
    /// # Safety
    ///
    /// 1. The caller won the state CAS ([`Entry::claim`] or `detach`)
    ///    and calls this at most once for that win.
    pub(crate) unsafe fn take_claimed(&self) -> Option<Callback> {
        // SAFETY: by 1 the caller is the only thread that ever reaches the
        // cell after construction (C1), and the AcqRel CAS ordered the
        // construction before this access.
        self.callback.with_mut(|cell| unsafe { (*cell).take() })
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("alive", &self.is_alive())
            .field("atexit", &self.atexit())
            .finish_non_exhaustive()
    }
}

/// Turns an `Arc<Entry>` into the raw reference a list link owns.
pub(crate) fn into_link(entry: Arc<Entry>) -> *mut Entry {
    Arc::into_raw(entry).cast_mut()
}

/// Takes back the reference a list link owned.
///
/// # Safety
///
/// 1. `link` came from [`into_link`] and is given back once.
pub(crate) unsafe fn from_link(link: *mut Entry) -> Arc<Entry> {
    // SAFETY: by 1 this reverses exactly one `Arc::into_raw`.
    unsafe { Arc::from_raw(link.cast_const()) }
}
