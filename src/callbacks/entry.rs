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
//! **Layout.** Every node starts with the type-erased header `Entry`
//! (`repr(C)`, three words: the count and state, the link in its object's
//! list, the vtable). Two kinds of node follow it:
//!
//! * a *listed* node (`finalize` registrations and posted jobs) adds the
//!   links that only such nodes use, the registry's and the queue's, then
//!   the closure: `Node<Listed, (), Plain<F>>`;
//! * a *hook* (a collection's removal callback, which is never in the
//!   registry and never queued: it runs on the dying thread, C14) has a
//!   payload and the closure right after the header:
//!   `Node<Entry, ManuallyDrop<P>, Hooked<F, P>>`, five words for a closure
//!   of two and no payload. A hook's closure receives the hook itself,
//!   whose address names the collection entry it removes, so it need not
//!   hold a handle to the object. The payload is what the entry keeps
//!   where it never moves (a `WeakKeyMap`'s value): readers borrow it
//!   through the entry's `Hook`, and the entry drops it, once, when it is
//!   dropped itself (the node may outlive it in its object's list).
//!
//! Lists and handles hold thin `NonNull<Entry>` pointers that keep the
//! provenance of the whole node (they all come from the one allocation,
//! `leak`'s, from `block_cache`);
//! the links past the header and the closure are reached only from such a
//! pointer, never from a `&Entry` (C13). One allocation per registration,
//! and the node starts with its owners (handle, object list and, for
//! `finalize`, the registry) counted, so registering costs no
//! reference-count RMW.

use std::alloc::Layout;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ptr::{self, NonNull};

use crate::block_cache;
use crate::reclaim::Pinned;
use crate::sync::{
    acquire_fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU8, LeakCheck, Ordering, UnsafeCell,
};

const ALIVE: u8 = 0;
const DETACHED: u8 = 1;
const CLAIMED: u8 = 2;

/// A node with the registry's and the queue's links (`Listed`).
const LISTED: u8 = 0;
/// A collection's removal callback: the header alone, run on the dying
/// thread (C14).
const HOOK: u8 = 1;

/// References above this abort, as for the handles (I5). A node's owners
/// are the lists, the queue, the `Finalizer` handles and, for a hook, the
/// collection entry's `Hook` and the clones `Hook::keep` makes for posted
/// removals: more than two billion of them exist only if handles are
/// leaked with `mem::forget`.
const MAX_REFS: u32 = i32::MAX as u32;

/// What a node does with its closure, per node type.
struct EntryVTable {
    /// Moves the closure out and calls it, lending it the caller's pin, if
    /// any.
    call: unsafe fn(NonNull<Entry>, Option<&Pinned>),
    /// Moves the closure out and drops it.
    discard: unsafe fn(NonNull<Entry>),
    /// Drops the closure if still present, then frees the node.
    free: unsafe fn(NonNull<Entry>),
}

/// The type-erased header every node starts with.
#[repr(C)]
pub(crate) struct Entry {
    refs: AtomicU32,
    state: AtomicU8,
    /// Run by `shutdown()` if still alive (Python's `finalize.atexit`).
    /// Meaningful for listed nodes only.
    atexit: AtomicBool,
    /// `LISTED` or `HOOK`, set at construction, never changed.
    kind: u8,
    /// Link in the object's callback list, then in its death batch.
    pub(crate) object_next: AtomicPtr<Entry>,
    vtable: &'static EntryVTable,
    leak_check: LeakCheck,
}

/// The header of a listed node: `Entry`, then the links that only
/// `finalize` registrations and posted jobs use.
#[repr(C)]
struct Listed {
    entry: Entry,
    /// Link in the runtime's registry of all entries (for `shutdown`).
    registry_next: AtomicPtr<Entry>,
    /// Link between death batches in the runtime's queue (batch heads only).
    queue_next: AtomicPtr<Entry>,
}

/// A closure a node can run, given the node.
trait Callback: Send + 'static {
    /// Runs the closure. `entry` is the node, kept allocated by the
    /// caller's reference for the duration of the call; `pinned`, the
    /// caller's pin, if it holds one (the dying thread does, for hooks).
    fn run(self, entry: NonNull<Entry>, pinned: Option<&Pinned>);
}

/// The closure of a listed node: called with nothing.
struct Plain<F>(F);

impl<F: FnOnce() + Send + 'static> Callback for Plain<F> {
    fn run(self, _: NonNull<Entry>, _: Option<&Pinned>) {
        (self.0)()
    }
}

/// The closure of a hook with payload `P`: called with the hook it was
/// registered as, and the dying thread's pin.
struct Hooked<F, P>(F, PhantomData<fn(P)>);

impl<F, P> Callback for Hooked<F, P>
where
    F: FnOnce(&Hook<P>, Option<&Pinned>) + Send + 'static,
    P: 'static,
{
    fn run(self, entry: NonNull<Entry>, pinned: Option<&Pinned>) {
        // Borrowed, not owned: the caller's reference keeps the node
        // allocated during the call, and `ManuallyDrop` leaves its count.
        let hook = ManuallyDrop::new(Hook {
            entry: EntryRef(entry),
            payload: PhantomData,
        });
        (self.0)(&hook, pinned)
    }
}

/// A node: a header (`Entry` or `Listed`, both starting with `Entry`), a
/// payload (`()` for listed nodes), then the closure. The closure is
/// present exactly while the state is `ALIVE`, and between a claim and its
/// one `run_claimed`.
#[repr(C)]
struct Node<H, P, C> {
    head: H,
    payload: P,
    callback: UnsafeCell<ManuallyDrop<C>>,
}

/// The first two fields of a `Node<H, P, _>`, at the same offsets (both
/// `repr(C)`, whose field offsets depend only on the fields before): how
/// a `Hook<P>`, which does not know its closure's type, finds its payload.
#[repr(C)]
struct Prefix<H, P> {
    head: H,
    payload: P,
}

impl<H: 'static, P: 'static, C: Callback> Node<H, P, C> {
    const VTABLE: EntryVTable = EntryVTable {
        call: Self::call,
        discard: Self::discard,
        free: Self::free,
    };

    /// Moves `self` into a block of its own (from `block_cache`) and returns
    /// `OWNERS` references to it, which the node's count (set by the
    /// caller) already counts.
    fn leak<const OWNERS: usize>(self) -> [EntryRef; OWNERS] {
        // The one pointer every owner derives from: it carries the
        // provenance of the whole node (C13). `H` starts with `Entry`
        // (`repr(C)` both), so the cast points at the header.
        let layout = Layout::new::<Self>();
        let node = block_cache::allocate(layout).cast::<Self>();
        // SAFETY: a fresh block of `Self`'s layout, ours alone (C16).
        unsafe { node.as_ptr().write(self) };
        let entry = node.cast::<Entry>();
        [(); OWNERS].map(|()| EntryRef(entry))
    }

    /// # Safety
    ///
    /// 1. `entry` points at a `Node<H, P, C>` (its vtable is this one)
    ///    with the provenance of the whole node.
    /// 2. The caller won the state CAS and has not taken the closure yet.
    unsafe fn take(entry: NonNull<Entry>) -> C {
        let node = entry.cast::<Self>().as_ptr();
        // SAFETY: by 1 the cast is valid (`repr(C)`, header first) and in
        // bounds; by 2 the closure is present and we are its only user
        // (C1), so moving it out once is sound.
        unsafe {
            (*node)
                .callback
                .with_mut(|cell| ManuallyDrop::take(&mut *cell))
        }
    }

    unsafe fn call(entry: NonNull<Entry>, pinned: Option<&Pinned>) {
        // SAFETY: the vtable contract is `take`'s (callers: `run_claimed`).
        let callback = unsafe { Self::take(entry) };
        callback.run(entry, pinned);
    }

    unsafe fn discard(entry: NonNull<Entry>) {
        // SAFETY: as for `call` (caller: `detach`).
        drop(unsafe { Self::take(entry) });
    }

    unsafe fn free(entry: NonNull<Entry>) {
        let node = entry.cast::<Self>().as_ptr();
        // The closure is still present iff the state is ALIVE: a claimant
        // always runs it before letting go of its reference. Relaxed
        // suffices for the load, as we are alone. A hook's payload is
        // `ManuallyDrop`: its entry dropped it.
        // SAFETY: the last reference is gone, after its fence or Acquire
        // load (C13): we own the node, which `leak` wrote whole into a
        // block of this layout.
        unsafe {
            let header = node.cast::<Entry>();
            if (*header).state.load(Ordering::Relaxed) == ALIVE {
                (*node)
                    .callback
                    .with_mut(|cell| ManuallyDrop::drop(&mut *cell));
            }
            ptr::drop_in_place(node);
            block_cache::release(NonNull::new_unchecked(node).cast(), Layout::new::<Self>());
        }
    }
}

impl Entry {
    fn new<H: 'static, P: 'static, C: Callback>(refs: u32, atexit: bool, kind: u8) -> Entry {
        Entry {
            refs: AtomicU32::new(refs),
            state: AtomicU8::new(ALIVE),
            atexit: AtomicBool::new(atexit),
            kind,
            object_next: AtomicPtr::new(ptr::null_mut()),
            vtable: &Node::<H, P, C>::VTABLE,
            leak_check: LeakCheck::new(()),
        }
    }

    /// The listed header of the node at `entry`.
    ///
    /// # Safety
    ///
    /// 1. `entry` points at a live listed node (not a hook) and carries the
    ///    provenance of the whole node (a list link, a queue link or an
    ///    `EntryRef`'s pointer).
    unsafe fn listed<'a>(entry: *mut Entry) -> &'a Listed {
        // By 1 the node is alive while the caller's reference or
        // link is, and, checked here in every build since a hook is
        // smaller, starts with a `Listed` (`repr(C)`); the `&Listed`
        // covers header and links only, never the closure.
        // SAFETY: as just said.
        unsafe {
            assert_eq!((*entry).kind, LISTED, "a hook has no registry link");
            &*entry.cast::<Listed>()
        }
    }

    /// The registry link of the listed node at `entry`.
    ///
    /// # Safety
    ///
    /// As for [`Entry::queue_next`].
    pub(crate) unsafe fn registry_next<'a>(entry: *mut Entry) -> &'a AtomicPtr<Entry> {
        // SAFETY: the caller's promise is `listed`'s.
        unsafe { &Self::listed(entry).registry_next }
    }

    /// The queue link of the listed node at `entry`.
    ///
    /// # Safety
    ///
    /// 1. `entry` points at a live listed node (a `finalize` registration
    ///    or a posted job, never a hook) and carries the provenance of the
    ///    whole node: a list or queue link, or an `EntryRef`'s pointer. The
    ///    reference lives no longer than the node.
    pub(crate) unsafe fn queue_next<'a>(entry: *mut Entry) -> &'a AtomicPtr<Entry> {
        // SAFETY: the caller's promise is `listed`'s.
        unsafe { &Self::listed(entry).queue_next }
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
    /// A new alive listed entry holding `callback`, returned as its
    /// `OWNERS` owners: the `Finalizer` handle, the object's list and, for
    /// a `finalize` registration, the registry (or the queue alone, for a
    /// posted job). The count starts at `OWNERS`, before anyone else can
    /// see the node. `atexit` is its initial setting (meaningful only for
    /// an entry in the registry).
    pub(crate) fn new_with_owners<const OWNERS: usize, F>(
        callback: F,
        atexit: bool,
    ) -> [EntryRef; OWNERS]
    where
        F: FnOnce() + Send + 'static,
    {
        Node {
            head: Listed {
                entry: Entry::new::<Listed, (), Plain<F>>(OWNERS as u32, atexit, LISTED),
                registry_next: AtomicPtr::new(ptr::null_mut()),
                queue_next: AtomicPtr::new(ptr::null_mut()),
            },
            payload: (),
            callback: UnsafeCell::new(ManuallyDrop::new(Plain(callback))),
        }
        .leak()
    }

    /// A new alive hook holding `payload` and `callback`, returned as its
    /// two owners: the collection's entry and the object's list. Its
    /// object's death runs it on the dying thread (C14), passing it the
    /// hook.
    pub(crate) fn new_hook<P, F>(payload: P, callback: F) -> (Hook<P>, EntryRef)
    where
        P: Send + Sync + 'static,
        F: FnOnce(&Hook<P>, Option<&Pinned>) + Send + 'static,
    {
        let [hook, in_list] = Node {
            head: Entry::new::<Entry, ManuallyDrop<P>, Hooked<F, P>>(2, false, HOOK),
            payload: ManuallyDrop::new(payload),
            callback: UnsafeCell::new(ManuallyDrop::new(Hooked(callback, PhantomData))),
        }
        .leak();
        (
            Hook {
                entry: hook,
                payload: PhantomData,
            },
            in_list,
        )
    }

    /// Moves the closure out and calls it, lending a hook's closure
    /// `pinned` (the dying thread's pin, M14), so that it need not pin
    /// again; a listed entry's closure ignores it.
    ///
    /// # Safety
    ///
    /// 1. The caller won [`Entry::claim`] for this entry and calls this once
    ///    for that win.
    pub(crate) unsafe fn run_claimed(&self, pinned: Option<&Pinned>) {
        // SAFETY: the vtable was built for this node's closure type; 1 is
        // `take`'s precondition 2.
        unsafe { (self.vtable.call)(self.0, pinned) }
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
        self.refs.load(Ordering::Relaxed) as usize
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
        // Under loom: this reference's last use, which the free must follow.
        self.leak_check.let_go();
        // The last reference frees without a read-modify-write (C13): a
        // reference is made only from another that outlives the making
        // (`clone`; `clone_link` from a link the list still owns;
        // `Hook::keep` through the handle a hook's run borrows from the
        // dying thread's reference), so once ours is the only one, none
        // can appear. This is the drop of a map entry's hook after its
        // object's death released the list's reference. Acquire: pairs
        // with every other reference's Release decrement, as the fence
        // below.
        if self.refs.load(Ordering::Acquire) != 1 {
            // Release (C13): our uses of the node happen-before its free.
            if self.refs.fetch_sub(1, Ordering::Release) != 1 {
                return;
            }
            // Acquire (C13): pairs with every other reference's Release
            // decrement, so their uses happen-before the free.
            acquire_fence!(self.refs);
        }
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

    /// True for a hook, which its object's death runs on the dying thread.
    pub(crate) fn on_dying_thread(&self) -> bool {
        self.kind == HOOK
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
        // pairs with `is_alive`'s Acquire (C2), and with a losing CAS's
        // Acquire: a collection's drop whose detach finds a hook claimed
        // sees the claim, and the claimer's pin before it, happen before
        // it retires the core's anchor (M14).
        //
        // An entry that has left `ALIVE` never returns, so a load that sees
        // it settled answers without the CAS, whose failure is a locked
        // instruction too: the common case of an entry whose removal its
        // death's callback made, detached by the entry's drop. Acquire, as
        // the failing CAS's load (M14).
        if self.state.load(Ordering::Acquire) != ALIVE {
            return false;
        }
        self.state
            .compare_exchange(ALIVE, to, Ordering::AcqRel, Ordering::Acquire)
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

/// A collection's removal callback, as its entry holds it: the entry
/// detaches it when it leaves the collection any other way (M5), the
/// hook's address names the entry (M4), and its payload `P` is what the
/// entry keeps where it never moves.
pub(crate) struct Hook<P = ()> {
    entry: EntryRef,
    payload: PhantomData<P>,
}

// SAFETY: a `Hook` shares its payload between the threads holding its
// handles (`payload` gives `&P` to each), as `Arc<P>` does, so it needs
// `P: Send + Sync` both ways; the rest is an `EntryRef`'s (C1).
unsafe impl<P: Send + Sync> Send for Hook<P> {}
// SAFETY: as for `Send`.
unsafe impl<P: Send + Sync> Sync for Hook<P> {}

impl<P> Hook<P> {
    /// Names the hook: its node's address, unique among live hooks and
    /// reserved while this handle (or a clone from [`keep`](Self::keep))
    /// lives.
    pub(crate) fn identity(&self) -> usize {
        self.entry.address()
    }

    /// Cancels the callback if it has not run; true if it was alive.
    pub(crate) fn detach(&self) -> bool {
        self.entry.detach()
    }

    /// A second handle, which keeps the hook's address reserved (for work
    /// that finishes the removal later, elsewhere).
    pub(crate) fn keep(&self) -> Hook<P> {
        Hook {
            entry: self.entry.clone(),
            payload: PhantomData,
        }
    }

    /// A pointer to the payload, with the provenance of the whole node.
    fn payload_ptr(&self) -> *mut P {
        let prefix = self
            .entry
            .0
            .as_ptr()
            .cast::<Prefix<Entry, ManuallyDrop<P>>>();
        // A hook is a `Node<Entry, ManuallyDrop<P>, _>` (`new_hook`,
        // and `P` is ours by type), whose first two fields sit where
        // `Prefix`'s do; `addr_of_mut!` projects without reading, inside
        // the live node (our reference).
        // SAFETY: as just said.
        unsafe { ptr::addr_of_mut!((*prefix).payload).cast::<P>() }
    }

    /// The payload, until [`drop_payload`](Self::drop_payload).
    pub(crate) fn payload(&self) -> &P {
        // SAFETY: initialised by `new_hook`, and alive: whoever calls
        // `drop_payload` promises that no handle's `payload` is used from
        // then on. Only shared references are made until then.
        unsafe { &*self.payload_ptr() }
    }

    /// Drops the payload in place.
    ///
    /// # Safety
    ///
    /// 1. Called once per hook, over all its handles.
    /// 2. No reference from [`payload`](Self::payload) of any handle is
    ///    alive, and `payload` is never called again.
    pub(crate) unsafe fn drop_payload(&self) {
        // SAFETY: initialised, dropped once (1), and unborrowed (2); the
        // pointer carries the whole node's provenance (from `leak`),
        // and the free never drops it again (`ManuallyDrop`).
        unsafe { ptr::drop_in_place(self.payload_ptr()) }
    }
}

impl<P> std::fmt::Debug for Hook<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Hook").field(&self.entry).finish()
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;
    use std::mem::size_of;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};

    fn node_size<P, F>(_: &F) -> usize {
        size_of::<Node<Entry, ManuallyDrop<P>, Hooked<F, P>>>()
    }

    #[test]
    fn a_collection_hook_is_its_closure_plus_three_words() {
        let (core, hash) = (Arc::new(()), 7u64);
        let callback = move |_: &Hook, _: Option<&Pinned>| drop((core, hash));
        assert_eq!(size_of::<Entry>(), 3 * size_of::<usize>());
        assert_eq!(node_size::<(), _>(&callback), 5 * size_of::<usize>());
        assert_eq!(node_size::<u64, _>(&callback), 6 * size_of::<usize>());
    }

    #[test]
    fn a_hook_runs_with_itself_and_a_kept_handle_reserves_its_address() {
        let seen = Arc::new(AtomicUsize::new(0));
        let kept = Arc::new(Mutex::new(None));
        let (hook, in_list) = EntryRef::new_hook((), {
            let (seen, kept) = (seen.clone(), kept.clone());
            move |me: &Hook, _: Option<&Pinned>| {
                seen.store(me.identity(), std::sync::atomic::Ordering::SeqCst);
                *kept.lock().unwrap() = Some(me.keep());
            }
        });
        assert!(in_list.on_dying_thread());
        assert!(in_list.claim());
        // SAFETY: claimed just now; run once.
        unsafe { in_list.run_claimed(None) };
        let identity = hook.identity();
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), identity);
        drop((hook, in_list));
        let kept = kept.lock().unwrap().take().expect("the hook kept itself");
        assert_eq!(kept.identity(), identity);
        assert_eq!(kept.entry.ref_count(), 1);
    }

    #[test]
    fn a_detached_hook_drops_its_closure_unrun() {
        let runs = Arc::new(AtomicUsize::new(0));
        let token = Arc::new(());
        let (hook, in_list) = EntryRef::new_hook((), {
            let (runs, token) = (runs.clone(), token.clone());
            move |_: &Hook, _: Option<&Pinned>| {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(token);
            }
        });
        assert!(hook.detach());
        assert!(!hook.detach());
        assert_eq!(Arc::strong_count(&token), 1, "detach dropped the closure");
        assert!(!in_list.claim());
        drop((hook, in_list));
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn a_payload_stays_put_until_its_entry_drops_it_once() {
        let token = Arc::new(());
        let (hook, in_list) =
            EntryRef::new_hook(token.clone(), |_: &Hook<Arc<()>>, _: Option<&Pinned>| {});
        let kept = hook.keep();
        assert!(std::ptr::eq(hook.payload(), kept.payload()));
        assert_eq!(Arc::strong_count(&token), 2);
        assert!(hook.detach());
        // SAFETY: once, and no payload reference is used after.
        unsafe { hook.drop_payload() };
        assert_eq!(Arc::strong_count(&token), 1, "dropped once, in place");
        drop((hook, kept, in_list));
        assert_eq!(Arc::strong_count(&token), 1, "the free drops it no more");
    }
}

/// Nodes through the per-thread block cache (C16): reuse across sizes,
/// alignments, threads, re-entrant frees and thread exit.
#[cfg(all(test, not(weakrefs_loom)))]
mod block_cache_tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicUsize, Ordering as O};
    use std::sync::Arc;

    fn job() -> EntryRef {
        let [job] = EntryRef::new_with_owners::<1, _>(|| {}, false);
        job
    }

    /// Holds nodes in a thread-local, so that they are freed by its
    /// destructor, before or after the cache's; once the cache is gone it
    /// also makes and frees a node of its own.
    struct Holder(Vec<EntryRef>);

    static FREED_AFTER_THE_CACHE: AtomicUsize = AtomicUsize::new(0);

    impl Drop for Holder {
        fn drop(&mut self) {
            if !block_cache::cache::alive() {
                FREED_AFTER_THE_CACHE.fetch_add(1, O::SeqCst);
                drop(job());
            }
            self.0.clear();
        }
    }

    std::thread_local! {
        static HOLDER: RefCell<Holder> = const { RefCell::new(Holder(Vec::new())) };
    }

    #[test]
    fn nodes_freed_by_thread_local_destructors_in_any_order_go_back() {
        // The holder's destructor registered before the cache's, after it,
        // and with the cache first touched while destructors run. A cache
        // reached without `try_with` once torn down aborts the process.
        let runs: [fn(); 3] = [
            || {
                HOLDER.with(|_| {});
                drop(job());
                HOLDER.with(|holder| holder.borrow_mut().0.push(job()));
            },
            || {
                drop(job());
                HOLDER.with(|holder| holder.borrow_mut().0.push(job()));
            },
            || HOLDER.with(|holder| holder.borrow_mut().0.extend((0..3).map(|_| job()))),
        ];
        for run in runs {
            std::thread::spawn(run)
                .join()
                .expect("no panic at thread exit");
        }
        // Which destructor runs first is the platform's choice; every
        // order above must simply not fail.
        assert!(FREED_AFTER_THE_CACHE.load(O::SeqCst) <= 3);
    }

    /// Frees the node it holds, then makes and frees another, while its own
    /// node's closure is being dropped.
    struct Reentrant(Option<EntryRef>, Arc<AtomicUsize>);

    impl Drop for Reentrant {
        fn drop(&mut self) {
            drop(self.0.take());
            drop(job());
            self.1.fetch_add(1, O::SeqCst);
        }
    }

    #[test]
    fn a_closure_drop_may_free_and_make_nodes() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let mut last = None;
        for _ in 0..150 {
            let held = Reentrant(last.take(), dropped.clone());
            let [node] = EntryRef::new_with_owners::<1, _>(move || drop(held), false);
            last = Some(node);
        }
        drop(last);
        assert_eq!(dropped.load(O::SeqCst), 150, "every closure dropped once");
    }

    #[test]
    fn hooks_of_every_payload_size_and_alignment_reuse_blocks_soundly() {
        #[repr(align(16))]
        struct Align16(#[allow(dead_code)] u64);
        #[repr(align(32))]
        struct Align32(#[allow(dead_code)] u8);
        fn rounds<P: Send + Sync + 'static>(make: impl Fn() -> P) {
            let mut held = Vec::new();
            for round in 0..3 {
                for _ in 0..70 {
                    let (hook, in_list) =
                        EntryRef::new_hook(make(), |_: &Hook<P>, _: Option<&Pinned>| {});
                    let address = hook.payload() as *const P as usize;
                    assert_eq!(address % std::mem::align_of::<P>(), 0, "aligned");
                    held.push((hook, in_list));
                }
                if round % 2 == 0 {
                    for (hook, _) in held.drain(..) {
                        // SAFETY: once per hook, no payload reference alive.
                        unsafe { hook.drop_payload() };
                    }
                }
            }
            for (hook, _) in held {
                // SAFETY: as above.
                unsafe { hook.drop_payload() };
            }
        }
        rounds(|| ());
        rounds(|| 1u8);
        rounds(|| 1u32);
        rounds(|| [0u8; 0]);
        rounds(|| Align16(1));
        rounds(|| Align32(1));
        rounds(|| [1u64; 2]);
        rounds(|| [1u64; 4]);
        rounds(|| Arc::new(5u8));
        rounds(|| String::from("payload"));
    }

    #[test]
    fn nodes_freed_on_another_thread_serve_that_threads_next_nodes() {
        let made: Vec<_> = (0..200).map(|_| job()).collect();
        std::thread::spawn(move || {
            drop(made);
            let again: Vec<_> = (0..100).map(|_| job()).collect();
            let twice = again.clone();
            drop((again, twice));
        })
        .join()
        .expect("no panic");
    }
}
