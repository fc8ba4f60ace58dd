//! One registered death callback: a reference-counted node that holds the
//! closure inline, and the state machine that runs it at most once.
//!
//! ```text
//!            detach()          call() / death / shutdown() / a hook's removal
//!  DETACHED <──────── ALIVE ─────────────────────────────────────────────> CLAIMED
//!                                                                             │
//!                                  a hook's removal of its entry, folding     │
//!                                                                             v
//!                                                                          FOLDED
//! ```
//!
//! Every path out of `ALIVE` but one is a compare-exchange, so exactly one
//! of `detach`, `call`, the object's death and `shutdown` wins (SAFETY.md,
//! C1). The winner, and only the winner, moves the closure out of its
//! cell: `detach` drops it, the others run it. The exception is a hook,
//! which its death runs without a claim of its own: the run claims it with
//! a plain store, under its entry's shard lock, when it finds the entry
//! there (C20), and a hook's closure, plain data, stays in its cell for
//! the node's life, read in place by the run and dropped by the free. A
//! hook whose run removed its entry on the dying thread is then `FOLDED`
//! by that thread: the object list's reference, which the thread forgets,
//! is released by the entry's `Hook` as it drops, with its own, in one step
//! (C13).
//!
//! **Layout.** Every node starts with the type-erased header `Entry`
//! (`repr(C)`, 8 bytes and a word: the 32-bit count; the 32-bit status,
//! which packs the state, the kind and, for a hook, the key its entry is
//! filed under; the link in its object's list). Three kinds of node follow
//! it:
//!
//! * a *listed* node (`finalize` registrations and posted jobs):
//!   `Node<Listed, (), Plain<F>>`, whose head adds the node's vtable and
//!   the links that only such nodes use, the registry's and the queue's,
//!   before the closure;
//! * a *hook* (a collection's removal callback, which is never in the
//!   registry and never queued: it runs on the dying thread, C14):
//!   `Node<Entry, (), AtSite>`, 8 bytes and two words (24 bytes on 64-bit
//!   targets, 16 on 32-bit ones). Its closure is the same for
//!   every collection, a [`Removal`]: the address of the [`HookSite`] (the
//!   entry's shard) that removes the entry; the key (the bits of its hash
//!   the shard files it by, [`KEY_BITS`]) rides in the header's status
//!   word. So its kind implies its vtable, and it stores none.
//!   The removal receives the hook itself, whose address names the
//!   collection entry it removes, so it need not hold a handle to the
//!   object;
//! * a hook with a *payload*, what the entry keeps where it never moves (a
//!   `WeakKeyMap`'s key `Weak` and value):
//!   `Node<Vtabled, ManuallyDrop<P>, AtSite>`, the header, the vtable
//!   (the node's layout depends on `P`), the removal, then the payload.
//!   Readers borrow the payload through the entry's `Hook`, and the entry
//!   drops it, once, when it is dropped itself (the node may outlive it in
//!   its object's list).
//!
//! Lists and handles hold thin `NonNull<Entry>` pointers that keep the
//! provenance of the whole node (they all come from the one allocation,
//! `leak`'s, from `block_cache`); the vtable, the links past the header
//! and the closure are reached only from such a pointer, never from a
//! `&Entry` (C13). One allocation per registration,
//! and the node starts with its owners (handle, object list and, for
//! `finalize`, the registry) counted, so registering costs no
//! reference-count RMW.

use std::alloc::Layout;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ptr::{self, NonNull};

use crate::block_cache;
use crate::reclaim::Pinned;
use crate::sync::{acquire_fence, AtomicPtr, AtomicU32, LeakCheck, Ordering, UnsafeCell};

// The status word of a node's header (`Entry::status`): the state in bits
// 0-1, the kind in bits 2-3, and in the bits above them a listed node's
// `atexit` flag or a hook's key.

/// The state's bits.
const STATE: u32 = 0b11;
const ALIVE: u32 = 0;
const DETACHED: u32 = 1;
const CLAIMED: u32 = 2;
/// A claimed hook whose run removed its entry on the dying thread, which
/// then handed the entry's `Hook` the object list's reference instead of
/// releasing it (C13): the `Hook` releases both as it drops.
const FOLDED: u32 = 3;

/// The kind's bits, set at construction, never changed.
const KIND: u32 = 0b11 << 2;
/// A node with the registry's and the queue's links (`Listed`).
const LISTED: u32 = 0;
/// A collection's removal callback with nothing to keep: the header and a
/// [`Removal`], run on the dying thread (C14). Its vtable is
/// `BARE_HOOK`, implied by the kind, not stored.
const HOOK: u32 = 1 << 2;
/// A collection's removal callback that keeps a payload: a `Vtabled`
/// head, a [`Removal`], the payload; run as a `HOOK` is.
const PAYLOAD_HOOK: u32 = 2 << 2;

/// A listed node's `atexit` flag (Python's `finalize.atexit`).
const ATEXIT: u32 = 1 << 4;

/// In a `FOLDED` hook, whose key bits the fold cleared (its entry has left
/// its table for good: no writer looks it up by them any more), the same
/// bit says that the entry also holds its object's implicit weak
/// reference, handed to it by the death, and releases it with its own
/// (C21). A lock-free scan that read the key of an entry just removed
/// (`retain`'s) may read cleared bits: it looks the entry up under the
/// lock by identity too, and finds nothing, as for any entry removed
/// meanwhile.
const WEAK_HANDED: u32 = 1 << 4;

/// The bits of a hook's key its status word keeps: all but the state's and
/// the kind's. A collection files its entries by these bits of their
/// hashes alone (home group and control byte), so that the key a hook
/// keeps is all its removal needs to probe for its entry.
pub(crate) const KEY_BITS: u32 = !(STATE | KIND);

/// References above this abort, as for the handles (I5). A node's owners
/// are the lists, the queue, the `Finalizer` handles and, for a hook, the
/// collection entry's `Hook` and the clones a hook's removal makes for
/// posted removals: more than two billion of them exist only if handles are
/// leaked with `mem::forget`.
const MAX_REFS: u32 = i32::MAX as u32;

/// What a node does with its closure, per node type. (A hook's closure
/// stays in place for the node's life, C20: `call` reads it, `discard`
/// leaves it, `free` drops it.)
struct EntryVTable {
    /// Moves the closure out (unless it stays) and calls it, lending it the
    /// caller's pin, if any.
    call: unsafe fn(NonNull<Entry>, Option<&Pinned>),
    /// Moves the closure out and drops it (a hook's: nothing).
    discard: unsafe fn(NonNull<Entry>),
    /// Drops the closure if still present, then frees the node.
    free: unsafe fn(NonNull<Entry>),
}

/// The vtable of every `HOOK` node.
const BARE_HOOK: &EntryVTable = &Node::<Entry, (), AtSite>::VTABLE;

/// The type-erased header every node starts with.
#[repr(C)]
pub(crate) struct Entry {
    refs: AtomicU32,
    /// The state (`ALIVE`, `DETACHED`, `CLAIMED`, C1, or a hook's
    /// `FOLDED`, C13), the kind
    /// (`LISTED`, `HOOK` or `PAYLOAD_HOOK`, never changed) and, above
    /// them, a listed node's `ATEXIT` flag (run by `shutdown()` if still
    /// alive, C3) or a hook's key (`KEY_BITS`, never changed), in one
    /// 32-bit word, so that a hook is 8 bytes and two words.
    status: AtomicU32,
    /// Under loom, the kind again, read plainly: loom makes each atomic
    /// access a point where it may switch threads, and the kind, read on
    /// every run, detach and free, never changes, so reading it from
    /// `status` only multiplied the interleavings (past the branch limit
    /// of a model of slot reuse).
    #[cfg(weakrefs_loom)]
    loom_kind: u32,
    /// Link in the object's callback list, then in its death batch.
    pub(crate) object_next: AtomicPtr<Entry>,
    leak_check: LeakCheck,
}

/// The head of a node whose kind does not imply its vtable: `Entry`, then
/// the vtable (`call`, `discard`, `free` for this node type).
#[repr(C)]
struct Vtabled {
    entry: Entry,
    vtable: &'static EntryVTable,
}

/// The head of a listed node: `Entry` and the vtable, then the links that
/// only `finalize` registrations and posted jobs use.
#[repr(C)]
struct Listed {
    head: Vtabled,
    /// Link in the runtime's registry of all entries (for `shutdown`).
    registry_next: AtomicPtr<Entry>,
    /// Link between death batches in the runtime's queue (batch heads only).
    queue_next: AtomicPtr<Entry>,
}

/// A closure a node can run, given the node.
trait Callback: Send + 'static {
    /// Whether the closure stays in its cell for the node's whole life:
    /// run in place, never discarded, dropped by `free` alone. A hook's
    /// does (C20): its death runs it without winning a claim, so a detach
    /// may race the run, and neither may move it. Any other closure is
    /// present while the state is `ALIVE`, and the state machine's winner
    /// moves it out (C1).
    const STAYS: bool;

    /// Runs the closure in `cell`, moving it out unless it [`STAYS`].
    /// `entry` is the node, kept allocated by the caller's reference for
    /// the duration of the call; `pinned`, the caller's pin, if it holds
    /// one (the dying thread does, for hooks).
    ///
    /// # Safety
    ///
    /// 1. `cell` is `entry`'s, and holds the closure.
    /// 2. Unless the closure [`STAYS`], the caller won the claim of
    ///    `entry` (C1) and runs it once for that win. A hook's is run by
    ///    its object's death, on a thread pinned since before it found
    ///    the hook alive, and still (C20, M14; but for loom's teardown,
    ///    as `EntryRef::run_claimed` says), or by a test's claim.
    ///
    /// [`STAYS`]: Callback::STAYS
    unsafe fn run(
        cell: &UnsafeCell<ManuallyDrop<Self>>,
        entry: NonNull<Entry>,
        pinned: Option<&Pinned>,
    ) where
        Self: Sized;
}

/// The closure of a listed node: called with nothing.
struct Plain<F>(F);

impl<F: FnOnce() + Send + 'static> Callback for Plain<F> {
    const STAYS: bool = false;

    unsafe fn run(cell: &UnsafeCell<ManuallyDrop<Self>>, _: NonNull<Entry>, _: Option<&Pinned>) {
        // SAFETY: present (1), and ours alone to move out, once (2).
        let Plain(f) = cell.with_mut(|cell| unsafe { ManuallyDrop::take(&mut *cell) });
        f()
    }
}

/// Where a hook's removal is carried out: the first field of what the
/// hook names (a collection's shard, `repr(C)`), so that the site's
/// address is that structure's, and `run` reaches the rest from it.
#[derive(Clone, Copy)]
pub(crate) struct HookSite {
    run: HookRun,
}

/// What a [`HookSite`] does for a death: removes the entry filed under
/// the key whose hook is the given one.
///
/// # Safety
///
/// 1. The site pointer is a `Removal`'s, made (`Removal::new`) for a site
///    whose function is this one, with the provenance of the whole
///    structure the site is the first field of, and the calling thread
///    found the hook (the `EntryRef`, borrowed for the call) alive after
///    it pinned, and is pinned still (C14, C20, M14): what the site names
///    was alive then and is freed only through the epoch, after the
///    hook's detach. (Under
///    loom, during the collector's teardown, it is not pinned: no other
///    thread is left, and every table dropped by then has detached its
///    hooks.)
pub(crate) type HookRun = unsafe fn(NonNull<HookSite>, u64, &EntryRef, Option<&Pinned>);

impl HookSite {
    /// A site whose deaths `run` handles. Only a [`Removal`] made with
    /// [`Removal::new`] ever calls it.
    pub(crate) const fn new(run: HookRun) -> HookSite {
        HookSite { run }
    }
}

/// What a hook carries out at its object's death, the same for every
/// collection: the site that removes its entry, and the key the entry is
/// filed under. A hook keeps the key's [`KEY_BITS`] in its header's
/// status word and the rest as its closure, an [`AtSite`], one word.
pub(crate) struct Removal {
    at: AtSite,
    key: u32,
}

/// A hook's closure: the site that removes its entry.
struct AtSite {
    /// The site, by address, with no count on anything (M14); its
    /// provenance is that of the whole structure it heads.
    site: NonNull<HookSite>,
    /// Under loom, the flag the site's deferred release sets, checked
    /// before the site is reached (M14).
    #[cfg(weakrefs_loom)]
    released: crate::sync::Released,
}

impl Removal {
    /// The removal a hook carries out at `site` for the entry filed under
    /// `key`, of which the hook keeps [`KEY_BITS`] alone: the site's
    /// function receives those bits, the others clear.
    ///
    /// # Safety
    ///
    /// 1. `site` is the first field of a `repr(C)` structure of the type
    ///    its `run` expects, and was derived from a reference to that
    ///    whole structure.
    /// 2. The structure stays allocated until every hook made with this
    ///    removal has been detached, or claimed by its removal under the
    ///    shard's lock (C20), and then for as long as a thread that found
    ///    one alive while pinned stays pinned (M14): what `HookRun`
    ///    promises its callee.
    pub(crate) unsafe fn new(
        site: NonNull<HookSite>,
        key: u32,
        #[cfg(weakrefs_loom)] released: crate::sync::Released,
    ) -> Removal {
        Removal {
            at: AtSite {
                site,
                #[cfg(weakrefs_loom)]
                released,
            },
            key: key & KEY_BITS,
        }
    }
}

// An address. The site is reached only by the thread that runs
// the hook, under `HookRun`'s contract (which `Removal::new`'s caller
// promised), and is shared as `&` (atomics and a mutex, M14): what crosses
// threads is the site's structure, a collection's shard, which
// `death_at_shard`'s bound (`I: Watching`, so `Send + Sync`) and
// `ShardedTable`'s `Sync` cover.
// SAFETY: as just said.
unsafe impl Send for AtSite {}

impl Callback for AtSite {
    /// Plain data (an address; under loom, a flag's handle too), read in
    /// place by a run that may race a detach (C20): neither writes it.
    const STAYS: bool = true;

    unsafe fn run(
        cell: &UnsafeCell<ManuallyDrop<Self>>,
        entry: NonNull<Entry>,
        pinned: Option<&Pinned>,
    ) {
        let site = cell.with(|at| {
            // SAFETY: present for the node's life (1, `STAYS`), and written
            // only by the free, after every reference, ours included.
            let at = unsafe { &**at };
            #[cfg(weakrefs_loom)]
            at.released.check("its table's freed shards");
            at.site
        });
        // Borrowed, not owned: the caller's reference keeps the node
        // allocated during the call, and `ManuallyDrop` leaves its count.
        let hook = ManuallyDrop::new(EntryRef(entry));
        let key = u64::from(hook.key());
        // SAFETY: the caller's 2 is `HookRun`'s: this thread found the hook
        // alive while pinned (or a test claimed it), and `site` is the one
        // it was made with, from the whole structure's pointer.
        unsafe { (site.as_ref().run)(site, key, &hook, pinned) }
    }
}

/// A node: a head (`Entry`, or `Vtabled` or `Listed`, which start with
/// it), the closure, then a payload (`()` but for a `PAYLOAD_HOOK`). A
/// listed node's closure is present exactly while the state is `ALIVE`,
/// and between a claim and its one `run_claimed`; a hook's, for the
/// node's whole life (C20).
///
/// The payload comes last so that, in a `PAYLOAD_HOOK` on a 64-bit
/// target, it starts 32 bytes in, a multiple of 16: in a node the
/// allocator aligns to 16 bytes (every block it hands out on the usual
/// targets), a `WeakKeyMap` entry's key `Weak` and a value of up to a
/// word, the 16 bytes every lookup reads, then always share one cache
/// line. After the closure (24 bytes in), they would straddle two lines
/// in every node that starts 32 bytes into a line.
#[repr(C)]
struct Node<H, P, C> {
    head: H,
    callback: UnsafeCell<ManuallyDrop<C>>,
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
    ///    with the provenance of the whole node, and the caller's
    ///    reference keeps it allocated.
    unsafe fn call(entry: NonNull<Entry>, pinned: Option<&Pinned>) {
        let node = entry.cast::<Self>().as_ptr();
        // By 1 the cast is valid (`repr(C)`, header first) and in bounds,
        // for as long as the call; the rest is `run`'s contract (callers:
        // `run_claimed`, whose caller promises it).
        // SAFETY: as just said.
        unsafe { C::run(&(*node).callback, entry, pinned) }
    }

    /// # Safety
    ///
    /// As for [`Self::call`], and the caller won the state CAS, to
    /// `DETACHED` (C1).
    unsafe fn discard(entry: NonNull<Entry>) {
        if C::STAYS {
            // A hook's: left for the free (C20).
            return;
        }
        let node = entry.cast::<Self>().as_ptr();
        // By 1 the cast is valid; the closure is present and ours alone
        // to move out, once (C1).
        // SAFETY: as just said.
        drop(unsafe {
            (*node)
                .callback
                .with_mut(|cell| ManuallyDrop::take(&mut *cell))
        });
    }

    unsafe fn free(entry: NonNull<Entry>) {
        let node = entry.cast::<Self>().as_ptr();
        // The closure is still present if it stays (a hook's, C20), or
        // else iff the state is ALIVE: a claimant always runs it before
        // letting go of its reference. Relaxed suffices for the load, as
        // we are alone. A hook's payload is `ManuallyDrop`: its entry
        // dropped it.
        // SAFETY: the last reference is gone, after its fence or Acquire
        // load (C13): we own the node, which `leak` wrote whole into a
        // block of this layout.
        unsafe {
            let header = node.cast::<Entry>();
            if C::STAYS || (*header).status.load(Ordering::Relaxed) & STATE == ALIVE {
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
    /// An alive header counting `refs` owners, of kind `kind`, whose
    /// status keeps `above` (a listed node's `ATEXIT` flag or a hook's
    /// key, bits of `KEY_BITS` only) above the state and the kind.
    fn new(refs: u32, kind: u32, above: u32) -> Entry {
        debug_assert!(kind & !KIND == 0 && above & !KEY_BITS == 0);
        Entry {
            refs: AtomicU32::new(refs),
            status: AtomicU32::new(above | kind | ALIVE),
            #[cfg(weakrefs_loom)]
            loom_kind: kind,
            object_next: AtomicPtr::new(ptr::null_mut()),
            leak_check: LeakCheck::new(()),
        }
    }

    /// The node's kind. Relaxed: set at construction, which happens before
    /// any use of the node through the reference or link that reached it,
    /// and never changed (every store keeps the bits).
    #[inline]
    fn kind(&self) -> u32 {
        #[cfg(weakrefs_loom)]
        return self.loom_kind;
        #[cfg(not(weakrefs_loom))]
        return self.status.load(Ordering::Relaxed) & KIND;
    }

    /// A hook's key: the `KEY_BITS` of the hash its entry is filed under.
    /// Relaxed, as `kind`.
    #[inline]
    fn key(&self) -> u32 {
        debug_assert!(self.kind() != LISTED, "a listed node has no key");
        self.status.load(Ordering::Relaxed) & KEY_BITS
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
            assert_eq!((*entry).kind(), LISTED, "a hook has no registry link");
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

// The closure is `Send`, and only the state machine's winner ever reaches
// it (C1), but for a hook's, plain data that stays in place and is only
// read until the free (C20); every other field of the node is atomic or
// immutable.
// SAFETY: as just said.
unsafe impl Send for EntryRef {}
// SAFETY: as for `Send`: sharing `&EntryRef` lets threads race only on the
// atomic state, whose CAS admits one winner, and on reads of a hook's
// closure.
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
                head: Vtabled {
                    entry: Entry::new(OWNERS as u32, LISTED, if atexit { ATEXIT } else { 0 }),
                    vtable: &Node::<Listed, (), Plain<F>>::VTABLE,
                },
                registry_next: AtomicPtr::new(ptr::null_mut()),
                queue_next: AtomicPtr::new(ptr::null_mut()),
            },
            payload: (),
            callback: UnsafeCell::new(ManuallyDrop::new(Plain(callback))),
        }
        .leak()
    }

    /// A new alive hook that carries out `removal` at its object's
    /// death, holding `payload` in place, returned as its two owners: the
    /// collection's entry and the object's list. Its object's death runs
    /// it on the dying thread (C14), passing it the hook. Without a
    /// payload (`P` of size zero with nothing to drop) it is a `HOOK`,
    /// 8 bytes and two words; else a `PAYLOAD_HOOK`.
    pub(crate) fn new_hook<P>(payload: P, removal: Removal) -> (Hook<P>, EntryRef)
    where
        P: Send + Sync + 'static,
    {
        let Removal { at, key } = removal;
        let [hook, in_list] = if is_bare::<P>() {
            // Nothing to keep: `payload` is a value of no bytes whose drop
            // does nothing, and `Hook::payload` makes one of its own.
            drop(payload);
            Node {
                head: Entry::new(2, HOOK, key),
                payload: (),
                callback: UnsafeCell::new(ManuallyDrop::new(at)),
            }
            .leak()
        } else {
            Node {
                head: Vtabled {
                    entry: Entry::new(2, PAYLOAD_HOOK, key),
                    vtable: &Node::<Vtabled, ManuallyDrop<P>, AtSite>::VTABLE,
                },
                payload: ManuallyDrop::new(payload),
                callback: UnsafeCell::new(ManuallyDrop::new(at)),
            }
            .leak()
        };
        (
            Hook {
                entry: ManuallyDrop::new(hook),
                payload: PhantomData,
            },
            in_list,
        )
    }

    /// Calls the closure (moved out, unless it is a hook's, which stays,
    /// C20), lending a hook's removal `pinned` (the dying thread's pin,
    /// M14), so that it need not pin again; a listed entry's closure
    /// ignores it.
    ///
    /// # Safety
    ///
    /// 1. For a listed entry, the caller won [`Entry::claim`] for it and
    ///    calls this once for that win. For a hook
    ///    ([`Entry::on_dying_thread`]), the caller is its object's death,
    ///    which found it alive ([`Entry::is_alive`]) after it pinned and
    ///    calls this once (C20), or won [`Entry::claim`] for it (tests).
    /// 2. For a hook, the calling thread has been pinned since before that
    ///    load or claim and is pinned still (M14). (Under loom, during the
    ///    collector's teardown, `pinned` is `None` and nothing is pinned:
    ///    no other thread is left, and every table dropped by then has
    ///    detached its hooks.)
    pub(crate) unsafe fn run_claimed(&self, pinned: Option<&Pinned>) {
        // SAFETY: the vtable was built for this node's closure type, and
        // our reference keeps the node (`call`'s 1); 1 and 2 are
        // `Callback::run`'s 2.
        unsafe { (self.vtable().call)(self.0, pinned) }
    }

    /// The node's vtable: implied by a `HOOK`'s kind, stored in the head
    /// of every other node.
    #[inline]
    fn vtable(&self) -> &'static EntryVTable {
        if self.kind() == HOOK {
            return BARE_HOOK;
        }
        // Every other kind's head starts with a `Vtabled` (`repr(C)`), read
        // through the whole node's pointer, never a `&Entry` (C13), inside
        // the node our reference keeps allocated.
        // SAFETY: as just said; the vtable is immutable once written.
        unsafe { (*self.0.cast::<Vtabled>().as_ptr()).vtable }
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
        unsafe { (self.vtable().discard)(self.0) };
        true
    }

    /// Whether this hook's entry took its object's implicit weak (C21;
    /// tests only).
    #[cfg(all(test, not(weakrefs_loom)))]
    pub(crate) fn took_implicit_weak(&self) -> bool {
        // Relaxed: the test's look, after the death on its thread.
        let status = self.status.load(Ordering::Relaxed);
        status & STATE == FOLDED && status & WEAK_HANDED != 0
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

impl EntryRef {
    /// Lets go of the object list's reference to a hook whose run folded
    /// it into its entry's `Hook` (C13), which releases it: no count
    /// changes here. Gives back the reference of any other entry.
    ///
    /// If `implicit_weak` is set (the dying object's implicit weak
    /// reference is still the caller's) and the hook folded, hands that
    /// reference to the entry too and clears the flag: the entry's drop
    /// releases it with its own `Weak`, in one step (C21).
    pub(crate) fn forget_if_folded(self, implicit_weak: &mut bool) -> Option<EntryRef> {
        // Relaxed: `fold` ran on this thread, or not at all.
        let status = self.status.load(Ordering::Relaxed);
        if status & STATE != FOLDED {
            return Some(self);
        }
        if std::mem::take(implicit_weak) {
            // Relaxed: read by the entry's drop, which the epoch runs after
            // the caller unpins, as for the fold (C13, C21), which cleared
            // the key bits.
            self.status.store(status | WEAK_HANDED, Ordering::Relaxed);
        }
        // Under loom: this reference's last use, which the free must
        // follow (the caller is still pinned, so the entry's drop, whose
        // epoch-deferred function frees the node, follows this).
        self.leak_check.let_go();
        std::mem::forget(self);
        None
    }

    /// Hands the object list's reference, which the calling (dying)
    /// thread holds and will forget (`forget_if_folded`), to the entry
    /// whose removal this claimed hook has just made (C13).
    ///
    /// # Safety
    ///
    /// 1. The caller is this hook's death, running it, holding the object
    ///    list's reference, and passes that reference to
    ///    `forget_if_folded` after the run, still pinned as it was when it
    ///    found the hook alive (C20, M14).
    /// 2. The run has just claimed the hook and unlinked, under its
    ///    shard's lock, the entry whose `Hook` is this node's
    ///    ([`Entry::claim_by_removal`]), and handed its drop to the epoch
    ///    under the caller's pin: that drop, after the caller unpins,
    ///    releases both references.
    pub(crate) unsafe fn fold(&self) {
        // Relaxed, the load: the claim was ours, and nothing else writes
        // a claimed hook's status (a hook has no `ATEXIT`).
        let status = self.status.load(Ordering::Relaxed);
        debug_assert_eq!(status & STATE, CLAIMED);
        debug_assert_ne!(status & KIND, LISTED);
        // Release, as the claim's store (C20), which this follows under
        // the same lock. The entry's drop reads it after the epoch ordered
        // it after us (precondition 2). The key bits go: no writer looks a
        // removed entry up by them any more (a lock-free scan that read
        // them finds nothing under the lock, as for any removed entry), and
        // clear they leave `WEAK_HANDED` unset until `forget_if_folded`
        // sets it (C21).
        self.status.store(status & KIND | FOLDED, Ordering::Release);
    }

    /// Releases `weight` references, all ours: one, or two for a `Hook`
    /// whose hook folded the object list's reference into it.
    fn release(&self, weight: u32) {
        // Under loom: this reference's last use, which the free must follow.
        self.leak_check.let_go();
        // The last reference frees without a read-modify-write (C13): a
        // reference is made only from another that outlives the making
        // (`clone`; `clone_link` from a link the list still owns; `clone`
        // of the handle a hook's removal borrows from the dying thread's
        // reference, `Removal::run`), so once ours is the only one, none
        // can appear. This is the drop of a map entry's hook after its
        // object's death released the list's reference, or folded it into
        // the entry's (`weight` 2). Acquire: pairs with every other
        // reference's Release decrement, as the fence below.
        if self.refs.load(Ordering::Acquire) != weight {
            // Release (C13): our uses of the node happen-before its free.
            if self.refs.fetch_sub(weight, Ordering::Release) != weight {
                return;
            }
            // Acquire (C13): pairs with every other reference's Release
            // decrement, so their uses happen-before the free.
            acquire_fence!(self.refs);
        }
        // SAFETY: ours was the last reference; the vtable matches the node.
        unsafe { (self.vtable().free)(self.0) }
    }
}

impl Drop for EntryRef {
    fn drop(&mut self) {
        self.release(1);
    }
}

impl Entry {
    /// Neither run, claimed to run, nor detached. (A hook that its death
    /// ran without finding its entry stays alive, until whoever removed
    /// the entry detaches it: it is on no list by then, C20.)
    pub(crate) fn is_alive(&self) -> bool {
        // Acquire (C2): pairs with the AcqRel claim, so a thread that sees
        // the entry settled also sees what the claimant did before it.
        self.status.load(Ordering::Acquire) & STATE == ALIVE
    }

    /// True for a hook, which its object's death runs on the dying thread.
    pub(crate) fn on_dying_thread(&self) -> bool {
        self.kind() != LISTED
    }

    /// A listed node's `atexit` flag.
    pub(crate) fn atexit(&self) -> bool {
        // Relaxed (C3): a preference flag; `shutdown` reads it once.
        let status = self.status.load(Ordering::Relaxed);
        status & KIND == LISTED && status & ATEXIT != 0
    }

    /// Sets a listed node's `atexit` flag; a hook has none (its bits
    /// there are its key), and is left as it is.
    pub(crate) fn set_atexit(&self, run_at_exit: bool) {
        debug_assert_eq!(self.kind(), LISTED, "a hook is never run at exit");
        if self.kind() != LISTED {
            return;
        }
        // Relaxed (C3): as above. An RMW on the status word, which keeps
        // the state a concurrent `settle` may be setting; a `settle`
        // whose CAS it makes fail tries again (C1).
        if run_at_exit {
            self.status.fetch_or(ATEXIT, Ordering::Relaxed);
        } else {
            self.status.fetch_and(!ATEXIT, Ordering::Relaxed);
        }
    }

    fn settle(&self, to: u32) -> bool {
        // AcqRel (C1): the modification order of `state` makes exactly one
        // CAS from ALIVE succeed. Acquire orders the winner's take of the
        // closure after the node's construction even when the winner
        // reached it through a `Finalizer` handed over by the user; Release
        // pairs with `is_alive`'s Acquire (C2), and with a losing CAS's
        // Acquire.
        //
        // An entry that has left `ALIVE` never returns, so a load that sees
        // it settled answers without the CAS, whose failure is a locked
        // instruction too: the common case of an entry whose removal its
        // death's callback made, detached by the entry's drop. Acquire, as
        // the failing CAS's load.
        //
        // The CAS keeps the bits above the state. Only a listed node's
        // `set_atexit` changes them meanwhile, and a CAS that fails for it
        // alone, still finding `ALIVE`, tries again: each retry follows a
        // flag change, and a hook's bits change only once it is settled
        // (its fold and hand-over, C21), when no CAS succeeds any more.
        let mut status = self.status.load(Ordering::Acquire);
        loop {
            if status & STATE != ALIVE {
                return false;
            }
            match self.status.compare_exchange(
                status,
                status & !STATE | to,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => status = now,
            }
        }
    }

    /// Wins the right to run the callback. The winner must then call
    /// [`EntryRef::run_claimed`] exactly once, before it lets go of its
    /// reference. A death does not claim its hooks this way (C20).
    pub(crate) fn claim(&self) -> bool {
        self.settle(CLAIMED)
    }

    /// Claims a hook whose death's removal has found its entry in the
    /// table and is unlinking it, under the shard's lock (C20): a plain
    /// store, not a CAS, as nothing else writes the status meanwhile. Every
    /// detach of a hook follows its entry's leaving the table, which takes
    /// that lock, and the entry's own drop follows this unlink.
    pub(crate) fn claim_by_removal(&self) {
        // Relaxed: the kind and key bits do not change before the fold,
        // which follows this, and the state is `ALIVE` until this store
        // (C20).
        let status = self.status.load(Ordering::Relaxed);
        debug_assert_eq!(status & STATE, ALIVE, "a hook in its table is alive");
        debug_assert_ne!(self.kind(), LISTED);
        // Release (C20): pairs with the Acquire load of the entry's drop's
        // `settle`, which the epoch orders after us anyway, as for the CAS
        // of any other claim (C1, C2).
        self.status
            .store(status & !STATE | CLAIMED, Ordering::Release);
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
    /// Released by our `Drop`, with the object list's reference too if
    /// the hook's run folded that in (C13).
    entry: ManuallyDrop<EntryRef>,
    payload: PhantomData<P>,
}

impl<P> Drop for Hook<P> {
    fn drop(&mut self) {
        // Relaxed: a `fold` happened before this drop, which the entry's
        // unlinking writer handed to the epoch after it, under the dying
        // thread's pin; a hook not folded by then never will be, as its
        // entry is gone.
        let folded = self.entry.status.load(Ordering::Relaxed) & STATE == FOLDED;
        // `ManuallyDrop`: this releases our reference, and the field
        // drops nothing after.
        self.entry.release(if folded { 2 } else { 1 });
    }
}

// SAFETY: a `Hook` shares its payload between the threads holding its
// handles (`payload` gives `&P` to each), as `Arc<P>` does, so it needs
// `P: Send + Sync` both ways; the rest is an `EntryRef`'s (C1).
unsafe impl<P: Send + Sync> Send for Hook<P> {}
// SAFETY: as for `Send`.
unsafe impl<P: Send + Sync> Sync for Hook<P> {}

impl<P> Hook<P> {
    /// The key its entry is filed under: the [`KEY_BITS`] of its hash.
    #[inline]
    pub(crate) fn key(&self) -> u32 {
        self.entry.key()
    }

    /// Asks the processor to fetch the node's header, where [`key`](Self::key)
    /// reads (a hint).
    #[inline(always)]
    pub(crate) fn prefetch(&self) {
        crate::sync::prefetch(self.entry.0.as_ptr());
    }

    /// The entry's reference, with no `Drop` of ours (tests).
    #[cfg(all(test, not(weakrefs_loom)))]
    pub(crate) fn into_entry(self) -> EntryRef {
        let this = ManuallyDrop::new(self);
        // SAFETY: read once, from a hook whose drop will never run.
        unsafe { ptr::read(&*this.entry) }
    }

    /// Names the hook: its node's address, unique among live hooks and
    /// reserved while this handle (or a clone of its `EntryRef`, as a
    /// posted removal keeps, `slow_death`) lives.
    pub(crate) fn identity(&self) -> usize {
        self.entry.address()
    }

    /// Settles the hook as detached if it is still alive; true if it
    /// was. A death that found it alive just before may still run it: its
    /// entry has left the table by then (every detacher unlinks first), so
    /// that run finds nothing and writes nothing (C20).
    pub(crate) fn detach(&self) -> bool {
        self.entry.detach()
    }

    /// How many weak references to its object the entry's `Weak` stands
    /// for: its own, and the object's implicit weak if the death that
    /// removed the entry handed it over (2, C21). Read by the entry's
    /// drop, before this hook is dropped.
    #[inline]
    pub(crate) fn watched_refs(&self) -> u32 {
        // Relaxed: the hand-over happened before the entry's drop, which
        // the epoch ran after the dying thread unpinned (C21); any other
        // hook's state is not `FOLDED` with the bit.
        let status = self.entry.status.load(Ordering::Relaxed);
        if status & STATE == FOLDED && status & WEAK_HANDED != 0 {
            2
        } else {
            1
        }
    }

    /// Claims the hook as its death's removal unlinks its entry, under the
    /// shard's lock ([`Entry::claim_by_removal`], C20).
    pub(crate) fn claim_by_removal(&self) {
        self.entry.claim_by_removal();
    }

    /// A pointer to the payload, with the provenance of the whole node:
    /// what the entry drops, in parts, as it drops (a `WeakKeyMap`
    /// entry's key `Weak`, for what the hook says it stands for, C21, then
    /// its value), once no handle's [`payload`](Self::payload) is used any
    /// more. The node's free never drops it (`ManuallyDrop`).
    pub(crate) fn payload_ptr(&self) -> *mut P {
        if is_bare::<P>() {
            // A `HOOK` keeps no payload: any aligned address holds a value
            // of no bytes, and dropping it does nothing.
            return NonNull::dangling().as_ptr();
        }
        debug_assert_eq!(self.entry.kind(), PAYLOAD_HOOK);
        let node = self
            .entry
            .0
            .as_ptr()
            .cast::<Node<Vtabled, ManuallyDrop<P>, AtSite>>();
        // A hook with a payload is a `PAYLOAD_HOOK`, a `Node<Vtabled,
        // ManuallyDrop<P>, AtSite>` (`new_hook`; `P` is ours by type);
        // `addr_of_mut!` projects without reading, inside the live node
        // (our reference).
        // SAFETY: as just said.
        unsafe { ptr::addr_of_mut!((*node).payload).cast::<P>() }
    }

    /// The payload, until its entry drops it.
    pub(crate) fn payload(&self) -> &P {
        // Initialised by `new_hook`, and alive: whoever drops it (the
        // entry, through `payload_ptr`) does so once no handle's `payload`
        // is used any more. Only shared references are made until then.
        // SAFETY: as just said.
        unsafe { &*self.payload_ptr() }
    }

    /// Drops the payload in place.
    ///
    /// # Safety
    ///
    /// 1. Called once per hook, over all its handles, and the payload is
    ///    not dropped in parts instead ([`payload_ptr`](Self::payload_ptr)).
    /// 2. No reference from [`payload`](Self::payload) of any handle is
    ///    alive, and `payload` is never called again.
    #[cfg(all(test, not(weakrefs_loom)))]
    pub(crate) unsafe fn drop_payload(&self) {
        // SAFETY: initialised, dropped once (1), and unborrowed (2); the
        // pointer carries the whole node's provenance (from `leak`),
        // and the free never drops it again (`ManuallyDrop`).
        unsafe { ptr::drop_in_place(self.payload_ptr()) }
    }
}

/// Whether a hook keeping a `P` keeps nothing: a `HOOK`, without vtable or
/// payload.
const fn is_bare<P>() -> bool {
    std::mem::size_of::<P>() == 0 && !std::mem::needs_drop::<P>()
}

impl<P> std::fmt::Debug for Hook<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Hook").field(&self.entry).finish()
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
pub(super) mod tests {
    use super::*;
    use std::mem::size_of;
    use std::sync::{Arc, Mutex};

    /// A site that records each run: the key and the hook's address, and
    /// a second handle to the hook, as a posted removal keeps one.
    #[repr(C)]
    pub(crate) struct TestSite {
        site: HookSite,
        runs: Mutex<Vec<(u64, usize, bool)>>,
        kept: Mutex<Vec<EntryRef>>,
    }

    impl TestSite {
        pub(crate) fn new() -> Box<TestSite> {
            Box::new(TestSite {
                site: HookSite::new(TestSite::record),
                runs: Mutex::new(Vec::new()),
                kept: Mutex::new(Vec::new()),
            })
        }

        /// # Safety
        ///
        /// As `HookRun`.
        unsafe fn record(site: NonNull<HookSite>, key: u64, hook: &EntryRef, p: Option<&Pinned>) {
            // SAFETY: every removal in these tests is `removal`'s, from a
            // `TestSite` the test keeps alive past the run.
            let site = unsafe { site.cast::<TestSite>().as_ref() };
            site.runs
                .lock()
                .unwrap()
                .push((key, hook.address(), p.is_some()));
            site.kept.lock().unwrap().push(hook.clone());
        }

        /// A removal at this site for `key`.
        pub(crate) fn removal(&self, key: u32) -> Removal {
            // SAFETY: the site heads this `TestSite` (`repr(C)`), the
            // pointer comes from a reference to all of it, and every test
            // keeps it until its hooks are settled and dropped.
            unsafe { Removal::new(NonNull::from(self).cast(), key) }
        }

        fn runs(&self) -> Vec<(u64, usize, bool)> {
            self.runs.lock().unwrap().clone()
        }
    }

    #[test]
    fn a_hook_is_three_words_and_a_payload_adds_its_vtable_and_itself() {
        let word = size_of::<usize>();
        assert_eq!(size_of::<Entry>(), 4 + 4 + word);
        assert_eq!(
            size_of::<Node<Entry, (), AtSite>>(),
            size_of::<Entry>() + word
        );
        assert_eq!(
            size_of::<Node<Vtabled, ManuallyDrop<usize>, AtSite>>(),
            size_of::<Entry>() + 3 * word
        );
        // A `WeakKeyMap<u64, u64>` entry's: the key's `Weak` and the value.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(
            size_of::<Node<Vtabled, ManuallyDrop<[u64; 2]>, AtSite>>(),
            48
        );
        // ...whose 16 bytes, read by every lookup, start at a multiple of
        // 16, so they share a cache line in a node aligned to 16 bytes.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(
            std::mem::offset_of!(Node<Vtabled, ManuallyDrop<[u64; 2]>, AtSite>, payload) % 16,
            0
        );
        assert!(is_bare::<()>() && is_bare::<[u64; 0]>());
        assert!(!is_bare::<u8>() && !is_bare::<Vec<u8>>());
        let site = TestSite::new();
        let (hook, in_list) = EntryRef::new_hook((), site.removal(1));
        assert_eq!(in_list.kind(), HOOK);
        let (with_payload, listed) = EntryRef::new_hook(7u64, site.removal(2));
        assert_eq!(listed.kind(), PAYLOAD_HOOK);
        assert_eq!(*with_payload.payload(), 7);
        assert!(hook.detach() && with_payload.detach());
    }

    #[test]
    fn a_detached_hook_never_runs() {
        let site = TestSite::new();
        let (hook, in_list) = EntryRef::new_hook((), site.removal(3));
        assert!(hook.detach());
        assert!(!hook.detach());
        assert!(!in_list.claim());
        drop((hook, in_list));
        assert!(site.runs().is_empty());
    }

    /// C13's fold: the object list's reference handed to the entry's
    /// `Hook`, which releases both. Run 1 of `.ci/miri` (leak check) fails
    /// if the `Hook` releases one, and a count left at 1 shows it here.
    #[test]
    fn a_folded_hook_is_freed_by_its_entry_alone() {
        let token = Arc::new(());
        let site = TestSite::new();
        for payload in [false, true] {
            let (hook, in_list) = if payload {
                let (hook, in_list) = EntryRef::new_hook(token.clone(), site.removal(5));
                // SAFETY: once; the payload is not used after.
                unsafe { hook.drop_payload() };
                (hook.into_entry(), in_list)
            } else {
                let (hook, in_list) = EntryRef::new_hook((), site.removal(5));
                (hook.into_entry(), in_list)
            };
            let hook = Hook::<()> {
                entry: ManuallyDrop::new(hook),
                payload: PhantomData,
            };
            // As a death's removal claims it, finding its entry (C20).
            in_list.claim_by_removal();
            assert!(!hook.detach(), "a claimed hook stays settled");
            // The run itself is left out: its closure is an address, with
            // nothing to drop.
            // SAFETY: no other thread; the list's reference is forgotten
            // below, and the entry's `Hook` releases both (1, 2).
            unsafe { in_list.fold() };
            assert!(!hook.detach(), "a folded hook stays settled");
            assert!(!in_list.is_alive());
            assert_eq!(in_list.ref_count(), 2);
            let kept = EntryRef::clone(&hook.entry);
            assert_eq!(hook.watched_refs(), 1, "no hand-over yet (C21)");
            let mut implicit_weak = true;
            assert!(in_list.forget_if_folded(&mut implicit_weak).is_none());
            assert!(!implicit_weak, "the folded hook's entry took it (C21)");
            assert_eq!(hook.watched_refs(), 2);
            drop(hook);
            assert_eq!(kept.ref_count(), 1, "the hook released both of its");
            drop(kept);
        }
        assert_eq!(Arc::strong_count(&token), 1);
        assert!(site.runs().is_empty());
    }

    #[test]
    fn a_payload_stays_put_until_its_entry_drops_it_once() {
        let token = Arc::new(());
        let site = TestSite::new();
        let (hook, in_list) = EntryRef::new_hook(token.clone(), site.removal(9));
        let kept = Hook::<Arc<()>> {
            entry: hook.entry.clone(),
            payload: PhantomData,
        };
        assert!(std::ptr::eq(hook.payload(), kept.payload()));
        assert_eq!(Arc::strong_count(&token), 2);
        assert!(hook.detach());
        // SAFETY: once, and no payload reference is used after.
        unsafe { hook.drop_payload() };
        assert_eq!(Arc::strong_count(&token), 1, "dropped once, in place");
        drop((hook, kept, in_list));
        assert_eq!(Arc::strong_count(&token), 1, "the free drops it no more");
    }
    /// Tests that pin the process-wide epoch: Miri runs them without its
    /// leak check (run 3 of `.ci/miri`, which selects them by this
    /// module's name).
    mod pinned {
        use super::*;

        #[test]
        fn a_hook_runs_its_removal_with_its_key_itself_and_the_pin() {
            let site = TestSite::new();
            for payload in [None, Some(5u64)] {
                // Low bits set, which the status word keeps for the state
                // and the kind: the removal receives the key without them.
                let key = (0xFFFF_FFF0 - (u32::from(payload.is_some()) << 4)) | 0xF;
                let (hook, in_list) = match payload {
                    None => {
                        let (hook, in_list) = EntryRef::new_hook((), site.removal(key));
                        (hook.into_entry(), in_list)
                    }
                    Some(value) => {
                        let (hook, in_list) = EntryRef::new_hook(value, site.removal(key));
                        assert_eq!(*hook.payload(), value);
                        (hook.into_entry(), in_list)
                    }
                };
                assert!(in_list.on_dying_thread());
                let pinned = crate::reclaim::Reclaimer::pin_global();
                assert!(in_list.claim());
                // SAFETY: claimed just now, while pinned; run once.
                unsafe { in_list.run_claimed(Some(&pinned)) };
                drop(pinned);
                let filed = u64::from(key & KEY_BITS);
                assert_eq!(filed, u64::from(key) & !0xF);
                assert_eq!(site.runs().last(), Some(&(filed, hook.address(), true)));
                assert!(!hook.detach(), "run, so settled");
                let identity = hook.address();
                drop((hook, in_list));
                // The removal's second handle kept the address reserved.
                let kept = site.kept.lock().unwrap().pop().expect("kept");
                assert_eq!(kept.address(), identity);
                assert_eq!(kept.ref_count(), 1);
            }
            assert_eq!(site.runs().len(), 2);
        }
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
            let site = super::tests::TestSite::new();
            let mut held = Vec::new();
            for round in 0..3 {
                for _ in 0..70 {
                    let (hook, in_list) = EntryRef::new_hook(make(), site.removal(0));
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

/// C1 and C3 on the one status word: a claim and a detach race a listed
/// node's `atexit` changes, whose RMWs make the state's CAS fail while the
/// state is still `ALIVE`. Exactly one of the two settles the node, the
/// flag keeps its last setting, and a hook's key survives its claim.
#[cfg(all(test, weakrefs_loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;

    #[test]
    fn a_claim_and_a_detach_racing_atexit_changes_settle_once_and_keep_the_flag() {
        loom::model(|| {
            let [handle, listed] = EntryRef::new_with_owners::<2, _>(|| {}, true);
            let handle = Arc::new(handle);
            let flagger = {
                let handle = handle.clone();
                loom::thread::spawn(move || {
                    handle.set_atexit(false);
                    handle.set_atexit(true);
                })
            };
            let claimer = loom::thread::spawn(move || {
                let won = listed.claim();
                if won {
                    // SAFETY: claimed just now; a listed node's closure
                    // takes no pin.
                    unsafe { listed.run_claimed(None) };
                }
                won
            });
            let detached = handle.detach();
            let claimed = claimer.join().unwrap();
            flagger.join().unwrap();
            assert!(claimed != detached, "exactly one settles the node");
            assert!(!handle.is_alive());
            assert!(handle.atexit(), "the flag keeps its last setting");
        });
    }

    /// A site that records the key its run receives.
    #[repr(C)]
    struct KeySite {
        site: HookSite,
        seen: crate::sync::AtomicU64,
    }

    /// # Safety
    ///
    /// As `HookRun`: `site` heads a `KeySite` the model keeps alive.
    unsafe fn record_key(site: NonNull<HookSite>, key: u64, _: &EntryRef, _: Option<&Pinned>) {
        // SAFETY: as just said.
        let site = unsafe { site.cast::<KeySite>().as_ref() };
        // Relaxed: read once the running thread is joined.
        site.seen.store(key, Ordering::Relaxed);
    }

    #[test]
    fn a_hook_keeps_its_key_through_a_claim_racing_a_detach() {
        loom::model(|| {
            let site = Box::new(KeySite {
                site: HookSite::new(record_key),
                seen: crate::sync::AtomicU64::new(u64::MAX),
            });
            let key = 0xABCD_EF5A;
            // SAFETY: the site heads a `KeySite` (`repr(C)`), the pointer
            // comes from a reference to all of it, and the model keeps it
            // until the hooks are dropped below.
            let removal = unsafe {
                Removal::new(
                    NonNull::from(&*site).cast(),
                    key,
                    crate::sync::ReleasedFlag::new(),
                )
            };
            let (hook, in_list) = EntryRef::new_hook((), removal);
            let claimer = loom::thread::spawn(move || {
                let won = in_list.claim();
                if won {
                    // SAFETY: claimed just now; the site's run takes no pin.
                    unsafe { in_list.run_claimed(None) };
                }
                (won, in_list.key())
            });
            let detached = hook.detach();
            let (claimed, seen) = claimer.join().unwrap();
            assert!(claimed != detached, "exactly one settles the hook");
            assert_eq!(seen, key & KEY_BITS);
            assert_eq!(hook.entry.key(), key & KEY_BITS);
            // Relaxed: the claimer is joined.
            let received = site.seen.load(Ordering::Relaxed);
            if claimed {
                assert_eq!(received, u64::from(key & KEY_BITS), "the run got the key");
            } else {
                assert_eq!(received, u64::MAX, "a detached hook never runs");
            }
            drop(hook);
            drop(site);
        });
    }
}
