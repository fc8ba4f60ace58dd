//! One registered death callback: a reference-counted node that holds the
//! closure inline, and the state machine that runs it at most once.
//!
//! ```text
//!            detach()                call() / death / shutdown()
//!  DETACHED <──────── ALIVE ───────────────────────────────────> CLAIMED
//! ```
//!
//! Every path out of `ALIVE` is a compare-exchange, so exactly one of
//! `detach`, `call`, the object's death and `shutdown` wins (SAFETY.md, C1).
//! The winner, and only the winner, moves the closure out of its cell:
//! `detach` drops it, the others run it.
//!
//! **Layout.** A node is an `EntryNode<F>`: the type-erased header `Entry`
//! first (`repr(C)`), then the closure. Lists and handles hold thin
//! `NonNull<Entry>` pointers that keep the provenance of the whole node
//! (they all come from the one `Box::leak`); the closure is reached
//! only through the header's vtable, from such a pointer, never from a
//! `&Entry` (C13). One allocation per registration, and the node starts
//! with its owners (handle, object list and, for `finalize`, the registry)
//! counted, so registering costs no reference-count RMW.

use std::mem::ManuallyDrop;
use std::ptr::{self, NonNull};

use crate::sync::{
    acquire_fence, AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, LeakCheck, Ordering, UnsafeCell,
};

const ALIVE: u8 = 0;
const DETACHED: u8 = 1;
const CLAIMED: u8 = 2;

/// References above this abort, as for the handles (I5).
const MAX_REFS: usize = isize::MAX as usize;

/// What a node does with its closure, per closure type.
struct EntryVTable {
    /// Moves the closure out and calls it.
    call: unsafe fn(NonNull<Entry>),
    /// Moves the closure out and drops it.
    discard: unsafe fn(NonNull<Entry>),
    /// Drops the closure if still present, then frees the node.
    free: unsafe fn(NonNull<Entry>),
}

/// The type-erased header of a registered callback.
#[repr(C)]
pub(crate) struct Entry {
    refs: AtomicUsize,
    state: AtomicU8,
    /// Run by `shutdown()` if still alive (Python's `finalize.atexit`).
    atexit: AtomicBool,
    /// Run by the dying thread itself rather than queued: a collection's
    /// removal callback (set at construction, never changed).
    on_dying_thread: bool,
    /// Link in the object's callback list, then in its death batch.
    pub(crate) object_next: AtomicPtr<Entry>,
    /// Link in the runtime's registry of all entries (for `shutdown`).
    pub(crate) registry_next: AtomicPtr<Entry>,
    /// Link between death batches in the runtime's queue (batch heads only).
    pub(crate) queue_next: AtomicPtr<Entry>,
    vtable: &'static EntryVTable,
    leak_check: LeakCheck,
}

/// A node: header, then the closure. The closure is present exactly while
/// the state is `ALIVE`, and between a claim and its one `run_claimed`.
#[repr(C)]
struct EntryNode<F> {
    entry: Entry,
    callback: UnsafeCell<ManuallyDrop<F>>,
}

impl<F: FnOnce() + Send + 'static> EntryNode<F> {
    const VTABLE: EntryVTable = EntryVTable {
        call: Self::call,
        discard: Self::discard,
        free: Self::free,
    };

    /// # Safety
    ///
    /// 1. `entry` points at an `EntryNode<F>` (its vtable is this one) with
    ///    the provenance of the whole node.
    /// 2. The caller won the state CAS and has not taken the closure yet.
    unsafe fn take(entry: NonNull<Entry>) -> F {
        let node = entry.cast::<EntryNode<F>>().as_ptr();
        // SAFETY: by 1 the cast is valid (`repr(C)`, header first) and in
        // bounds; by 2 the closure is present and we are its only user
        // (C1), so moving it out once is sound.
        unsafe {
            (*node)
                .callback
                .with_mut(|cell| ManuallyDrop::take(&mut *cell))
        }
    }

    unsafe fn call(entry: NonNull<Entry>) {
        // SAFETY: the vtable contract is `take`'s (callers: `run_claimed`).
        let callback = unsafe { Self::take(entry) };
        callback();
    }

    unsafe fn discard(entry: NonNull<Entry>) {
        // SAFETY: as for `call` (caller: `detach`).
        drop(unsafe { Self::take(entry) });
    }

    unsafe fn free(entry: NonNull<Entry>) {
        let node = entry.cast::<EntryNode<F>>().as_ptr();
        // The closure is still present iff the state is ALIVE: a claimant
        // always runs it before letting go of its reference. Relaxed suffices
        // for the load, as we are alone.
        // SAFETY: the last reference is gone and its fence ran (C13): we own
        // the node, which `Box::leak` made from this very `Box<EntryNode<F>>`.
        unsafe {
            if (*node).entry.state.load(Ordering::Relaxed) == ALIVE {
                (*node)
                    .callback
                    .with_mut(|cell| ManuallyDrop::drop(&mut *cell));
            }
            drop(Box::from_raw(node));
        }
    }
}

/// An owned reference to an entry (the crate's `Arc<Entry>`).
pub(crate) struct EntryRef(NonNull<Entry>);

// SAFETY: the closure is `Send`, and only the state machine's winner ever
// reaches it (C1); every other field of the node is atomic or immutable.
unsafe impl Send for EntryRef {}
// SAFETY: as for `Send`: sharing `&EntryRef` lets threads race only on the
// atomic state, whose CAS admits one winner.
unsafe impl Sync for EntryRef {}

impl EntryRef {
    /// A new alive entry holding `callback`, returned as its `OWNERS`
    /// owners: the `Finalizer` handle, the object's list and, for a
    /// `finalize` registration, the registry. The count starts at
    /// `OWNERS`, before anyone else can see the node. `atexit` is its
    /// initial setting (meaningful only for an entry in the registry);
    /// `on_dying_thread` makes a death run it at once, on the dying
    /// thread, instead of queueing it.
    pub(crate) fn new_with_owners<const OWNERS: usize, F>(
        callback: F,
        atexit: bool,
        on_dying_thread: bool,
    ) -> [EntryRef; OWNERS]
    where
        F: FnOnce() + Send + 'static,
    {
        let node = Box::new(EntryNode {
            entry: Entry {
                refs: AtomicUsize::new(OWNERS),
                state: AtomicU8::new(ALIVE),
                atexit: AtomicBool::new(atexit),
                on_dying_thread,
                object_next: AtomicPtr::new(ptr::null_mut()),
                registry_next: AtomicPtr::new(ptr::null_mut()),
                queue_next: AtomicPtr::new(ptr::null_mut()),
                vtable: &EntryNode::<F>::VTABLE,
                leak_check: LeakCheck::new(()),
            },
            callback: UnsafeCell::new(ManuallyDrop::new(callback)),
        });
        // The one pointer every owner derives from: it carries the
        // provenance of the whole node (C13).
        let entry = NonNull::from(Box::leak(node)).cast::<Entry>();
        [(); OWNERS].map(|()| EntryRef(entry))
    }

    /// Moves the closure out and calls it.
    ///
    /// # Safety
    ///
    /// 1. The caller won [`Entry::claim`] for this entry and calls this once
    ///    for that win.
    pub(crate) unsafe fn run_claimed(&self) {
        // SAFETY: the vtable was built for this node's closure type; 1 is
        // `take`'s precondition 2.
        unsafe { (self.vtable.call)(self.0) }
    }

    /// The node's address: unique among live entries, since the node stays
    /// allocated while this reference lives.
    pub(crate) fn address(&self) -> usize {
        self.0.as_ptr() as usize
    }

    /// Cancels the callback if it is alive, dropping it in this thread.
    pub(crate) fn detach(&self) -> bool {
        if !self.settle(DETACHED) {
            return false;
        }
        // SAFETY: we won the state CAS just now (C1).
        unsafe { (self.vtable.discard)(self.0) };
        true
    }

    /// References to this entry, ours included (tests only).
    #[cfg(all(test, not(weakrefs_loom)))]
    pub(crate) fn ref_count(&self) -> usize {
        self.refs.load(Ordering::Relaxed)
    }

    /// Turns this reference into the raw link a list owns.
    pub(crate) fn into_link(self) -> *mut Entry {
        ManuallyDrop::new(self).0.as_ptr()
    }

    /// Takes back the reference a list link owned.
    ///
    /// # Safety
    ///
    /// 1. `link` came from [`EntryRef::into_link`] and is given back once.
    pub(crate) unsafe fn from_link(link: *mut Entry) -> EntryRef {
        // SAFETY: by 1 `link` is a non-null node pointer with full
        // provenance, owning one reference.
        EntryRef(unsafe { NonNull::new_unchecked(link) })
    }
}

impl std::ops::Deref for EntryRef {
    type Target = Entry;

    fn deref(&self) -> &Entry {
        // SAFETY: our reference keeps the node allocated. The `&Entry`
        // covers the header only; the closure is never reached through it.
        unsafe { self.0.as_ref() }
    }
}

impl Clone for EntryRef {
    fn clone(&self) -> Self {
        // Relaxed (C13): we hold a reference, so the node stays alive; the
        // new one reaches other threads only through their own
        // synchronisation (as `Arc::clone`).
        if self.refs.fetch_add(1, Ordering::Relaxed) > MAX_REFS {
            crate::sync::abort();
        }
        EntryRef(self.0)
    }
}

impl Drop for EntryRef {
    fn drop(&mut self) {
        // Release (C13): our uses of the node happen-before its free.
        if self.refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Acquire (C13): pairs with every other reference's Release
        // decrement, so their uses happen-before the free.
        acquire_fence!(self.refs);
        // SAFETY: ours was the last reference; the vtable matches the node.
        unsafe { (self.vtable.free)(self.0) }
    }
}

impl Entry {
    /// Neither run, claimed to run, nor detached.
    pub(crate) fn is_alive(&self) -> bool {
        // Acquire (C2): pairs with the AcqRel claim, so a thread that sees
        // the entry settled also sees what the claimant did before it.
        self.state.load(Ordering::Acquire) == ALIVE
    }

    /// True for a callback its object's death runs on the dying thread.
    pub(crate) fn on_dying_thread(&self) -> bool {
        self.on_dying_thread
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
        // closure after the node's construction even when the winner
        // reached it through a `Finalizer` handed over by the user; Release
        // pairs with `is_alive`'s Acquire (C2).
        self.state
            .compare_exchange(ALIVE, to, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Wins the right to run the callback. The winner must then call
    /// [`EntryRef::run_claimed`] exactly once, before it lets go of its
    /// reference.
    pub(crate) fn claim(&self) -> bool {
        self.settle(CLAIMED)
    }
}

impl std::fmt::Debug for EntryRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("alive", &self.is_alive())
            .field("atexit", &self.atexit())
            .finish_non_exhaustive()
    }
}
