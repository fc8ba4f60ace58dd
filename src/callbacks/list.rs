//! `EntryList`: a lock-free stack of callback entries with one compactor at
//! a time. It serves as the runtime's registry of all entries and, once an
//! object has had more than a few registrations, as that object's callback
//! list; before that, the object's list is *inline*, a stack in one word
//! of its control block's header with no compaction state
//! ([`ObjectCallbacks`], SAFETY.md, C17).
//!
//! * **Push** (any number of threads at once): link the new node to the
//!   head read, CAS the head. A pusher never dereferences a node already in
//!   the list, so a recycled address at the head (ABA) is harmless: a
//!   successful CAS means the new node now points at the real head (C4).
//!   The head word's low bits, which a node's alignment leaves clear, count
//!   the pushes modulo [`BATCH`]; one push in `BATCH` adds them all to the
//!   compaction state, so most pushes make one read-modify-write, not two.
//! * **Compact** (one thread, holding the `compacting` flag, while pushes go
//!   on): walk from a snapshot of the head and unlink settled entries by
//!   rewriting the previous node's link. Only the compactor writes links of
//!   published nodes and only it frees unlinked ones, so nobody can be
//!   reading what it frees (C5). The head node itself is left for a later
//!   pass, so compaction never races a pusher's CAS.
//! * **Take all** (an object's list at its death, or a list being dropped):
//!   load the head and store null, with no read-modify-write. Death
//!   excludes both pushes and compaction, since both run while their
//!   thread holds a `Strong` to the object (C6); a drop has `&mut`.
//!
//! A compaction runs once the work since the last one (pushes, plus
//! entries the consumer reports settled, plus two for each hook a
//! collection's removal detaches from an object's list while no
//! compaction is due, `note_detached`) exceeds both a small constant and
//! the number of entries the last one kept, up to `DUE_CAP`, so it costs
//! O(1) amortised per push or detach (past `DUE_CAP` kept, as on 32-bit
//! targets with a large list, a compaction comes every `DUE_CAP` of work
//! and walks the whole list). (While nothing is kept, the constant is
//! offset by up to itself, by the list's address, so that objects
//! registered in lockstep do not all compact on the same push.) A
//! compactor can be descheduled mid-walk while others keep pushing, so a
//! pusher that finds the list four times overdue yields until it can
//! compact itself (backpressure). The list
//! therefore never holds more than what the last compaction kept plus
//! four times the larger of that and the constant (twice the constant
//! while nothing is kept), plus the pushes not yet counted (fewer than
//! [`BATCH`], and a batch more per pusher between its counting CAS and
//! its count), plus one node per pushing thread: registering and
//! detaching on one object forever, from any number of threads, leaves
//! its memory flat.

use std::marker::PhantomData;
use std::ptr;

use super::entry::{Entry, EntryRef, Hook, Removal};
use crate::sync::{yield_now, AtomicPtr, AtomicUsize, LeakCheck, Ordering};

/// Pushes between compactions, at least. Shrinks under loom so the models
/// reach the compaction path. Small: a list that holds few live entries
/// (an object in a few sets or maps that come and go) walks a few nodes a
/// compaction, and frees its dead nodes while the thread's block cache can
/// still take them, not in bursts that spill to the allocator.
#[cfg(not(weakrefs_loom))]
const COMPACT_MIN: usize = 4;
#[cfg(weakrefs_loom)]
const COMPACT_MIN: usize = 1;

/// Pushes counted into the compaction state at a time (C5): the head
/// word's low bits, clear in every node's address, count the pushes in
/// between. Eight where nodes are 8-byte aligned (64-bit targets), four
/// where they are 4-byte aligned (32-bit ones). Two under loom, so that
/// models reach a counted batch with two pushes.
#[cfg(not(weakrefs_loom))]
pub(crate) const BATCH: usize = if std::mem::align_of::<Entry>() >= 8 {
    8
} else {
    4
};
#[cfg(weakrefs_loom)]
pub(crate) const BATCH: usize = 2;

/// The head word's bits that hold the push count.
const COUNT_MASK: usize = BATCH - 1;

const _: () = assert!(
    BATCH.is_power_of_two() && std::mem::align_of::<Entry>() >= BATCH,
    "a node's address leaves the push count's bits clear"
);

/// The node a head word points at, its push count masked off.
#[inline(always)]
fn node_of(head: *mut Entry) -> *mut Entry {
    head.map_addr(|addr| addr & !COUNT_MASK)
}

/// The push count a head word carries.
#[inline(always)]
fn count_of(head: *mut Entry) -> usize {
    head.addr() & COUNT_MASK
}

/// Which of an entry's links a list threads through.
pub(crate) trait Link {
    /// The link of the node at `entry`.
    ///
    /// # Safety
    ///
    /// 1. `entry` points at a live node of a kind that has this link, with
    ///    the provenance of the whole node (a link or an `EntryRef`'s
    ///    pointer), and the reference lives no longer than the node.
    unsafe fn next<'a>(entry: *mut Entry) -> &'a AtomicPtr<Entry>;
}

/// An object's callback list (`Entry::object_next`).
#[derive(Debug)]
pub(crate) struct ObjectLink;

impl Link for ObjectLink {
    unsafe fn next<'a>(entry: *mut Entry) -> &'a AtomicPtr<Entry> {
        // SAFETY: every node starts with the header, live by 1.
        unsafe { &(*entry).object_next }
    }
}

/// The runtime's registry (`Entry::registry_next`).
#[derive(Debug)]
pub(crate) struct RegistryLink;

impl Link for RegistryLink {
    unsafe fn next<'a>(entry: *mut Entry) -> &'a AtomicPtr<Entry> {
        // SAFETY: only listed nodes enter the registry; 1 is the rest of
        // `registry_next`'s promise.
        unsafe { Entry::registry_next(entry) }
    }
}

/// An object's callback list: one word in its control block's header
/// (SAFETY.md, C12, C17).
///
/// * **Inline** while the object has had at most [`INLINE_MAX`] pushes:
///   the word is the head of the stack, its low bits counting the pushes
///   so far (null and zero while none). An inline list keeps no
///   compaction state and never compacts: it holds at most `INLINE_MAX`
///   nodes, settled or not, until the death takes them. Most objects stay
///   inline for life (a value in one map or two), so a control block's
///   header is two counts and this word, as small as `Arc`'s.
/// * **Anchored**, for good, from the push that would take it past
///   `INLINE_MAX` (or the first walk a test makes): the word is the
///   address of an [`Anchor`], an `EntryList` of its own allocation that
///   holds the stack and its compaction state, tagged [`ANCHORED`]. One
///   CAS moves the inline stack into the anchor, so every push is in
///   exactly one of the two; every later operation is the anchor's own.
///   The anchor lives until the death takes the list (`take_all`), which
///   no push, compaction or walk can race (C6).
pub(crate) struct ObjectCallbacks {
    word: AtomicPtr<Entry>,
}

/// Where an anchored list lives: the list, and under loom a tracker, so
/// that a model which leaks an anchor fails.
struct Anchor {
    list: EntryList<ObjectLink>,
    _leak_check: LeakCheck,
}

/// The word's tag bits: those a node's alignment, and an anchor's, leave
/// clear (three on 64-bit targets, two on 32-bit ones).
const TAG_MASK: usize = std::mem::align_of::<Entry>() - 1;

/// The tag of an anchored list's word.
const ANCHORED: usize = TAG_MASK;

/// Pushes an inline list takes before the next anchors it: six on 64-bit
/// targets, two on 32-bit ones; one under loom, so that a model anchors
/// on its second push.
pub(super) const INLINE_MAX: usize = if cfg!(weakrefs_loom) { 1 } else { TAG_MASK - 1 };

const _: () = assert!(
    TAG_MASK >= 3
        && std::mem::align_of::<Anchor>() > TAG_MASK
        && std::mem::align_of::<Entry>() > TAG_MASK,
    "nodes and anchors leave the tag's bits clear, and the tag has room \
     for a count and ANCHORED"
);

impl ObjectCallbacks {
    /// An empty inline list.
    pub(crate) fn new() -> Self {
        ObjectCallbacks {
            word: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Adds `entry` at the head (newest first); an anchored list then
    /// compacts if due.
    pub(crate) fn push(&self, entry: EntryRef) {
        let node = entry.into_link();
        // SAFETY: `node` is ours until a CAS publishes it, and the list's
        // reference keeps it alive after; every node has an object link.
        let link = unsafe { ObjectLink::next(node) };
        // Acquire (C17): pairs with the anchoring CAS's Release, so a
        // pusher that finds the list anchored sees the anchor's fields.
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let pushes = word.addr() & TAG_MASK;
            if pushes >= INLINE_MAX {
                // Anchored, or full: this push goes to the anchor.
                // SAFETY: `node` came from `into_link` just now and goes
                // to the anchor's list alone.
                unsafe { self.anchor(word).list.push_link(node) };
                return;
            }
            // Relaxed: published by the Release CAS below.
            link.store(untagged(word), Ordering::Relaxed);
            // Release (C4, C17): publishes the node's fields to whoever
            // loads the word with Acquire (the dying thread, an anchoring
            // push, which hands them on to the anchor's readers).
            // Acquire on failure: the word may now be anchored.
            match self.word.compare_exchange_weak(
                word,
                node.map_addr(|addr| addr | (pushes + 1)),
                Ordering::Release,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => word = actual,
            }
        }
    }

    /// The anchor, which this call installs if `word`, the last value the
    /// caller loaded (with Acquire), is inline: a new anchor takes the
    /// inline stack and counts its pushes as work, and one CAS of the word
    /// publishes it (C17). The word of an inline list only ever grows a
    /// node and a push at a time until it is anchored, and no death races
    /// a push (C6), so a CAS that finds the word unchanged moves exactly
    /// the stack that is there: no node is lost or moved twice.
    fn anchor(&self, mut word: *mut Entry) -> &Anchor {
        // Made at most once a call, kept across failed CASes.
        let mut fresh: *mut Anchor = ptr::null_mut();
        loop {
            if word.addr() & TAG_MASK == ANCHORED {
                if !fresh.is_null() {
                    // SAFETY: made below by `Box::into_raw` and never
                    // published: ours alone.
                    let unused = unsafe { Box::from_raw(fresh) };
                    // Relaxed: never shared. Its stack is not its own.
                    unused.list.head.store(ptr::null_mut(), Ordering::Relaxed);
                }
                // An anchored word points at an anchor that lives until the
                // death takes the list, which cannot race the caller (C6,
                // C17); the caller's Acquire load of the word (or the
                // failed CAS's, below) saw its fields.
                // SAFETY: as just said.
                return unsafe { &*untagged(word).cast::<Anchor>() };
            }
            if fresh.is_null() {
                fresh = Box::into_raw(Box::new(Anchor {
                    list: EntryList::new(),
                    _leak_check: LeakCheck::new(()),
                }));
            }
            // SAFETY: ours alone until the CAS below publishes it.
            let list = unsafe { &(*fresh).list };
            // Relaxed: published by the Release CAS below.
            list.head.store(untagged(word), Ordering::Relaxed);
            list.state
                .store((word.addr() & TAG_MASK) << WORK_SHIFT, Ordering::Relaxed);
            // Release (C17): publishes the anchor's fields, and hands on
            // the inline pushes' nodes, whose Release CASes this one reads
            // (a release sequence), to whoever loads the word with Acquire.
            // Acquire on failure: to read the anchor another push put there.
            match self.word.compare_exchange(
                word,
                fresh.cast::<Entry>().map_addr(|addr| addr | ANCHORED),
                Ordering::Release,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // SAFETY: published just now; it lives as the list does.
                    let anchor = unsafe { &*fresh };
                    anchor.list.compact_if_due();
                    return anchor;
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Registers a collection's removal callback on this object's list as
    /// a hook: kept out of the registry (`shutdown` never runs it, and
    /// registering costs no push on the process-wide registry), and run by
    /// the object's death at once, on the dying thread, not queued (C14):
    /// `removal`'s site then removes its entry, given the hook itself. The
    /// hook keeps `payload` in place until the entry drops it
    /// (`Hook::drop_payload`). The site's removal must be short, never
    /// block, and run none of its own user code (its writer's pin may
    /// collect other epoch garbage, as any lookup's does). Work it posts
    /// (and any posted job) is counted towards the registry's next
    /// compaction when it runs (a trigger, C5): at worst an early scan of
    /// the registry.
    #[inline]
    pub(crate) fn register_hook<P>(&self, payload: P, removal: Removal) -> Hook<P>
    where
        P: Send + Sync + 'static,
    {
        let (hook, in_list) = EntryRef::new_hook(payload, removal);
        self.push(in_list);
        hook
    }

    /// Counts a hook just detached from this object's list (its entry left
    /// a collection other than by the object's death) towards the next
    /// compaction, if the last one kept more than a few entries: else a
    /// long-lived object keeps the detached nodes of a past peak of entries
    /// until as many new registrations arrive or it dies (C5). A list that
    /// kept few costs one Relaxed load. The caller holds a `Strong` to the
    /// object, so a compaction this starts happens-before its death (C6).
    ///
    /// Each detach counts twice: a compaction then falls due once half of
    /// what the last one kept has gone, so as the entries of a past peak
    /// all leave, each compaction finds at least half of what it walks
    /// gone, and they run until the list is down to a few nodes (counted
    /// once, the last half of the entries could leave with none due).
    ///
    /// Counted only while no compaction is due, so detaches never take the
    /// work far past `due`: the pushers' backpressure (four times `due`)
    /// stays theirs to reach. A trigger lost to a compactor already walking
    /// (this `try_lock` fails, and that walk subtracts only the work it
    /// saw) waits for the next push or detach.
    ///
    /// An inline list never compacts, and holds few nodes: nothing to count.
    #[inline]
    pub(crate) fn note_detached(&self) {
        // Acquire (C17): as in `push`, to read an anchor's state.
        let word = self.word.load(Ordering::Acquire);
        if word.addr() & TAG_MASK == ANCHORED {
            // SAFETY: as in `anchor`: the caller holds a `Strong` (C6).
            let anchor = unsafe { &*untagged(word).cast::<Anchor>() };
            anchor.list.note_detached();
        }
    }

    /// True when no entry is linked and no anchor made (a snapshot): an
    /// anchored list counts as not empty, for its death must free the
    /// anchor (its stack is empty only if a test's walk anchored an empty
    /// list, since a compaction never unlinks the head).
    pub(crate) fn is_empty(&self) -> bool {
        // Acquire (C4, C17): pairs with the pushes' and the anchoring's
        // Release CASes.
        self.word.load(Ordering::Acquire).is_null()
    }

    /// Removes and returns every node, newest first, as a chain through
    /// the object links whose references the caller now owns, and frees
    /// the anchor, if any. The list is inline and empty afterwards.
    ///
    /// # Safety
    ///
    /// 1. No push, compaction or walk runs concurrently (the object's
    ///    death: C6).
    pub(crate) unsafe fn take_all(&self) -> *mut Entry {
        // Acquire (C4, C17): pairs with the pushes' and the anchoring's
        // Release CASes. By 1 nothing writes the word meanwhile: a load
        // and a store take it, with no read-modify-write (C6).
        let word = self.word.load(Ordering::Acquire);
        // Relaxed: by 1, as `EntryList::take_all`'s store of its head.
        self.word.store(ptr::null_mut(), Ordering::Relaxed);
        if word.addr() & TAG_MASK != ANCHORED {
            return untagged(word);
        }
        // SAFETY: the anchor was made by `Box::into_raw` (`anchor`) and is
        // freed only here, once: the word no longer names it.
        let anchor = unsafe { Box::from_raw(untagged(word).cast::<Anchor>()) };
        // SAFETY: by 1.
        unsafe { anchor.list.take_all() }
    }

    /// The entries still alive, newest first (tests): the anchor's, which
    /// this anchors if the list is inline, so that nothing is freed while
    /// the walk goes on.
    #[cfg(all(test, not(weakrefs_loom)))]
    pub(crate) fn alive_entries(&self) -> Vec<EntryRef> {
        // Acquire (C17): as in `push`.
        self.anchor(self.word.load(Ordering::Acquire))
            .list
            .alive_entries()
    }
}

impl Drop for ObjectCallbacks {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no push, compaction or walk can run.
        let mut node = unsafe { self.take_all() };
        while !node.is_null() {
            // SAFETY: every node taken owns one reference, now ours.
            let entry = unsafe { EntryRef::from_link(node) };
            // Relaxed: ours alone.
            node = entry.object_next.load(Ordering::Relaxed);
            drop(entry);
        }
    }
}

impl std::fmt::Debug for ObjectCallbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectCallbacks").finish_non_exhaustive()
    }
}

/// The address an inline list's head or an anchored list's anchor is at:
/// the word, its tag masked off.
#[inline(always)]
fn untagged(word: *mut Entry) -> *mut Entry {
    word.map_addr(|addr| addr & !TAG_MASK)
}

impl EntryList<ObjectLink> {
    /// [`ObjectCallbacks::note_detached`] for an anchored list: counts
    /// the detach if the last compaction kept more than a few entries.
    #[inline]
    fn note_detached(&self) {
        // Relaxed: a hint, as `note_settled`'s trigger is (C5′).
        let state = self.state.load(Ordering::Relaxed);
        if kept_of(state) > COMPACT_MIN && work_of(state) <= self.due(state) {
            self.note_settled(2);
        }
    }
}

/// A lock-free stack of entries, newest first; see the module docs. Two
/// words: an object's list keeps one in its anchor ([`ObjectCallbacks`]),
/// and the runtime's registry is one.
pub(crate) struct EntryList<L: Link> {
    head: AtomicPtr<Entry>,
    /// The compaction state, packed: bit 0 is the `compacting` flag, the
    /// next `WORK_BITS` bits count pushes plus settled entries reported
    /// since the last compaction, the high half holds how many entries
    /// that compaction kept.
    state: AtomicUsize,
    _link: PhantomData<L>,
}

const COMPACTING: usize = 1;
const WORK_SHIFT: u32 = 1;
const WORK_BITS: u32 = usize::BITS / 2 - 1;
const WORK_MASK: usize = (1 << WORK_BITS) - 1;
const KEPT_SHIFT: u32 = usize::BITS / 2;
const KEPT_MAX: usize = usize::MAX >> KEPT_SHIFT;
/// Compactions fall due at most this far apart, so that the work count,
/// which backpressure holds below five times this, never overflows its
/// field.
const DUE_CAP: usize = WORK_MASK / 8;

fn work_of(state: usize) -> usize {
    (state >> WORK_SHIFT) & WORK_MASK
}

fn kept_of(state: usize) -> usize {
    state >> KEPT_SHIFT
}

/// Holds the `compacting` flag; releases it on drop.
struct CompactionGuard<'a>(&'a AtomicUsize);

impl Drop for CompactionGuard<'_> {
    fn drop(&mut self) {
        // Release (C5): pairs with the next holder's Acquire, so its walk
        // sees the links this holder rewrote. The pushers' RMWs on the same
        // word in between continue the release sequence.
        self.0.fetch_and(!COMPACTING, Ordering::Release);
    }
}

impl<L: Link> EntryList<L> {
    pub(crate) fn new() -> Self {
        EntryList {
            head: AtomicPtr::new(ptr::null_mut()),
            state: AtomicUsize::new(0),
            _link: PhantomData,
        }
    }

    /// Adds `entry` at the head (newest first), then compacts if due.
    pub(crate) fn push(&self, entry: EntryRef) {
        // SAFETY: a link just made from an owned reference, of `L`'s kind
        // (the caller pushes only such nodes).
        unsafe { self.push_link(entry.into_link()) }
    }

    /// [`Self::push`] of a reference already turned into a link.
    ///
    /// # Safety
    ///
    /// 1. `node` came from [`EntryRef::into_link`], is a node of `L`'s
    ///    kind, and its reference goes to this list alone.
    unsafe fn push_link(&self, node: *mut Entry) {
        // SAFETY: `node` is ours until the CAS publishes it, and the list's
        // reference keeps it alive after; it is of `L`'s kind (1).
        let link = unsafe { L::next(node) };
        // Relaxed: the value only seeds the CAS.
        let mut head = self.head.load(Ordering::Relaxed);
        let count = loop {
            // Relaxed: published by the Release CAS below.
            link.store(node_of(head), Ordering::Relaxed);
            let count = (count_of(head) + 1) & COUNT_MASK;
            // Release (C4): publishes the node's fields (callback, links) to
            // whoever loads the head with Acquire: the compactor, the
            // dying thread, `shutdown`. Relaxed on failure: just retry.
            match self.head.compare_exchange_weak(
                head,
                node.map_addr(|addr| addr | count),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => break count,
                Err(actual) => head = actual,
            }
        };
        if count == self.batch_phase() {
            self.note_pushes();
        } else {
            self.hold_back_if_overdue();
        }
    }

    /// Backpressure for a push that counts nothing (C5): if another thread
    /// holds the compaction flag and the work, with this push's batch, is
    /// more than four times overdue, waits to compact. Without it, a
    /// stalled compactor would hold back only the pushes that count a
    /// batch, and each pushing thread could add a batch before one of its
    /// pushes counted.
    #[inline]
    fn hold_back_if_overdue(&self) {
        // Relaxed: a hint; the compaction itself takes the flag.
        let state = self.state.load(Ordering::Relaxed);
        if state & COMPACTING != 0 && work_of(state) + BATCH > 4 * self.due(state) {
            let guard = self.lock();
            self.compact(&guard);
        }
    }

    /// Records the `BATCH` pushes that ours completes, and compacts when the
    /// work since the last compaction exceeds both `COMPACT_MIN` and what
    /// that compaction kept. A pusher that finds the list four times
    /// overdue while another thread holds the compaction flag yields until
    /// it can compact itself: a compactor descheduled mid-walk would
    /// otherwise let concurrent pushers grow the list without bound (C5).
    fn note_pushes(&self) {
        // Release (C5′): orders our push before this count, so a compactor
        // whose Acquire load of the state sees the count loads the head
        // (after, and with Acquire) at our CAS or later. The head's CASes
        // are one chain of RMWs, ours reading the batch's earlier ones, so
        // that head reaches every node of the batch (coherence), and the
        // Acquire load, in each earlier push's release sequence, sees their
        // fields: the compactor never subtracts work it did not walk.
        let state =
            self.state.fetch_add(BATCH << WORK_SHIFT, Ordering::Release) + (BATCH << WORK_SHIFT);
        let (work, due) = (work_of(state), self.due(state));
        if work <= due {
            return;
        }
        if let Some(guard) = self.try_lock() {
            self.compact(&guard);
        } else if work > 4 * due {
            let guard = self.lock();
            self.compact(&guard);
        }
    }

    /// Compacts if the work counted so far makes a compaction due and no
    /// one else is compacting: a new anchor's first step, for the inline
    /// pushes it took over (C17).
    fn compact_if_due(&self) {
        // Relaxed: a trigger, as in `note_settled`.
        let state = self.state.load(Ordering::Relaxed);
        if work_of(state) > self.due(state) {
            if let Some(guard) = self.try_lock() {
                self.compact(&guard);
            }
        }
    }

    /// Records `count` units of work that free nodes at the next compaction
    /// (entries the registry's consumer settled, or hooks detached from an
    /// object's list), and compacts if that makes a compaction due and no
    /// one else is compacting. Never waits.
    pub(crate) fn note_settled(&self, count: usize) {
        // Relaxed (C5′): a trigger. A CAS loop rather than an add: `count`
        // can be large, and the work count saturates below its field's top.
        let update = |state: usize| {
            let work = work_of(state).saturating_add(count).min(4 * DUE_CAP);
            Some((state & !(WORK_MASK << WORK_SHIFT)) | (work << WORK_SHIFT))
        };
        let Ok(before) = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, update)
        else {
            return;
        };
        let after = update(before).unwrap_or(before);
        if work_of(after) > self.due(after) {
            if let Some(guard) = self.try_lock() {
                self.compact(&guard);
            }
        }
    }

    /// The work at which a compaction falls due: what the last one kept,
    /// and at least `COMPACT_MIN`; while nothing is kept (before the list's
    /// first compaction, or after one that found it empty), `COMPACT_MIN`
    /// plus the list's phase.
    fn due(&self, state: usize) -> usize {
        match kept_of(state) {
            0 => COMPACT_MIN + self.phase(),
            kept => COMPACT_MIN.max(kept.min(DUE_CAP)),
        }
    }

    /// The push count at which a push completes a batch of this list
    /// (`note_pushes`): 0 to `BATCH - 1`, from its address, so that lists
    /// pushed in lockstep count, and compact, on different pushes. Zero
    /// under loom, whose models count on the second push.
    fn batch_phase(&self) -> usize {
        if cfg!(weakrefs_loom) {
            return 0;
        }
        let mixed = ((self as *const Self).addr() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (mixed >> 40) as usize & COUNT_MASK
    }

    /// How many pushes later than `COMPACT_MIN` this list first compacts:
    /// 0 to `COMPACT_MIN`, from its address. Objects that see the same
    /// registrations (the members of a set made and dropped again and
    /// again) would otherwise compact on the same pushes, all of them,
    /// every `COMPACT_MIN + 1` pushes, and free their dead nodes in bursts
    /// that spill past the thread's block cache to the allocator. Offset,
    /// about as many compact on each push, and what they free is taken
    /// back by the next registrations. Zero under loom, whose models
    /// count on the first compaction's push.
    fn phase(&self) -> usize {
        if cfg!(weakrefs_loom) {
            return 0;
        }
        // The upper half of a multiplicative hash of the address (Fibonacci
        // hashing): neighbouring control blocks get unrelated phases.
        let mixed = ((self as *const Self).addr() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (mixed >> 32) as usize % (COMPACT_MIN + 1)
    }

    fn try_lock(&self) -> Option<CompactionGuard<'_>> {
        // Acquire (C5): pairs with the previous holder's Release, so we see
        // the links it rewrote. Setting an already-set bit changes nothing.
        let before = self.state.fetch_or(COMPACTING, Ordering::Acquire);
        (before & COMPACTING == 0).then(|| CompactionGuard(&self.state))
    }

    /// Takes the flag, yielding the processor while another thread holds
    /// it (it may be descheduled in the middle of a walk).
    fn lock(&self) -> CompactionGuard<'_> {
        loop {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            yield_now();
        }
    }

    /// Unlinks every settled entry below the head (C5).
    fn compact(&self, _held: &CompactionGuard<'_>) {
        // Acquire (C5′): pairs with the pushers' Release count, so every
        // push counted in `seen` is visible to the head load below. Work
        // reported from now on counts towards the next compaction; only
        // what was seen here is subtracted.
        let seen = work_of(self.state.load(Ordering::Acquire));
        // Acquire (C4): pairs with the pushes' Release CAS (a release
        // sequence of RMWs), so every node below is fully visible.
        let head = node_of(self.head.load(Ordering::Acquire));
        let mut kept = 0;
        if !head.is_null() {
            kept = self.unlink_settled_below(head);
        }
        // Relaxed (C5′): heuristics. The flag bit (ours) is left as it is.
        let _ = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |state| {
                let work = work_of(state).saturating_sub(seen);
                Some(
                    (kept.min(KEPT_MAX) << KEPT_SHIFT)
                        | (work << WORK_SHIFT)
                        | (state & COMPACTING),
                )
            });
    }

    /// The walk of `compact`: unlinks settled entries below `head`, returns
    /// how many entries it kept (the head included).
    fn unlink_settled_below(&self, head: *mut Entry) -> usize {
        let mut kept = 1;
        let mut previous = head;
        loop {
            // SAFETY: `previous` is in the list, and only the compactor,
            // which is us, unlinks and frees nodes (C5).
            let previous_link = unsafe { L::next(previous) };
            // Relaxed: links of published nodes are written only by
            // compactors, ordered by the flag's Acquire/Release.
            let current = previous_link.load(Ordering::Relaxed);
            if current.is_null() {
                break;
            }
            // SAFETY: as for `previous`.
            let current_entry = unsafe { &*current };
            if current_entry.is_alive() {
                kept += 1;
                previous = current;
            } else {
                // Relaxed: see above.
                // SAFETY: as for `previous`.
                let after = unsafe { L::next(current) }.load(Ordering::Relaxed);
                previous_link.store(after, Ordering::Relaxed);
                // SAFETY: unlinked just now, so the list's reference is ours
                // to give back, once (C5).
                drop(unsafe { EntryRef::from_link(current) });
            }
        }
        kept
    }

    /// Removes and returns every node, newest first, as a chain through
    /// `L`'s link whose references the caller now owns.
    ///
    /// # Safety
    ///
    /// 1. No push or compaction runs concurrently (an object's list at its
    ///    death: C6).
    pub(crate) unsafe fn take_all(&self) -> *mut Entry {
        // Acquire (C4): pairs with the pushes' Release CAS. By 1 nothing
        // writes the head meanwhile, so a load and a store take the chain:
        // no read-modify-write, which a death would pay for every object
        // with callbacks (C6). By 1 too, no other thread touches the chain
        // afterwards.
        let head = self.head.load(Ordering::Acquire);
        // Relaxed: by 1, nobody reads or writes the head now; whoever looks
        // next at an object's list (the block's free, a debug assertion)
        // is ordered after us by the weak count (O5, O5′), and a dropped
        // list is ours alone (`&mut`).
        self.head.store(ptr::null_mut(), Ordering::Relaxed);
        node_of(head)
    }

    /// The entries still alive, newest first, taken under the compaction
    /// flag so nothing is freed while we walk.
    pub(crate) fn alive_entries(&self) -> Vec<EntryRef> {
        let _held = self.lock();
        let mut alive = Vec::new();
        // Acquire (C4): as in `compact`.
        let mut node = node_of(self.head.load(Ordering::Acquire));
        while !node.is_null() {
            // SAFETY: we hold the compaction flag, so nodes in the list stay
            // allocated (C5).
            let entry = unsafe { &*node };
            if entry.is_alive() {
                // SAFETY: the list holds a reference to `node`, so cloning
                // one more is sound; the clone is ours.
                alive.push(unsafe { clone_link(node) });
            }
            // Relaxed: see `compact`.
            // SAFETY: as above.
            node = unsafe { L::next(node) }.load(Ordering::Relaxed);
        }
        alive
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
impl<L: Link> EntryList<L> {
    /// The work counted towards the next compaction (tests only).
    pub(crate) fn work(&self) -> usize {
        // Relaxed: read by the thread that made the work, or after it.
        work_of(self.state.load(Ordering::Relaxed))
    }

    /// Nodes in the list, settled or not (tests only; not thread-safe
    /// against compaction).
    pub(crate) fn node_count(&self) -> usize {
        let _held = self.lock();
        let mut count = 0;
        let mut node = node_of(self.head.load(Ordering::Acquire));
        while !node.is_null() {
            count += 1;
            // SAFETY: nodes stay allocated while we hold the flag (C5).
            node = unsafe { L::next(node) }.load(Ordering::Relaxed);
        }
        count
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
impl ObjectCallbacks {
    /// Nodes in the list, settled or not (tests only): the anchor's, which
    /// this anchors if the list is inline.
    pub(crate) fn node_count(&self) -> usize {
        // Acquire (C17): as in `push`.
        self.anchor(self.word.load(Ordering::Acquire))
            .list
            .node_count()
    }

    /// True if the list is anchored (tests only).
    pub(crate) fn is_anchored(&self) -> bool {
        // Relaxed: a snapshot, read by the thread that pushed.
        self.word.load(Ordering::Relaxed).addr() & TAG_MASK == ANCHORED
    }
}

/// A new reference to the entry behind a link, leaving the link's own.
///
/// # Safety
///
/// 1. `link` is a live link (its reference not yet given back).
unsafe fn clone_link(link: *mut Entry) -> EntryRef {
    // SAFETY: by 1 the link owns a reference; `ManuallyDrop` leaves it.
    let borrowed = std::mem::ManuallyDrop::new(unsafe { EntryRef::from_link(link) });
    EntryRef::clone(&borrowed)
}

impl<L: Link> Drop for EntryList<L> {
    fn drop(&mut self) {
        // `&mut self`: no push, compaction or walk can run.
        // SAFETY: exclusive access, as just said (precondition 1).
        let mut node = unsafe { self.take_all() };
        while !node.is_null() {
            // SAFETY: every node in the list owns one reference.
            let entry = unsafe { EntryRef::from_link(node) };
            // Relaxed: exclusive access.
            // SAFETY: `entry` keeps the node alive until the end of the loop.
            node = unsafe { L::next(node) }.load(Ordering::Relaxed);
            drop(entry);
        }
    }
}

impl<L: Link> std::fmt::Debug for EntryList<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryList").finish_non_exhaustive()
    }
}

/// Loom model (SAFETY.md, C5′): a compaction that counts a concurrent push
/// in the work it subtracts also walks that push's node, so the bound
/// "nodes <= kept + work" holds after every compaction. Fails when the
/// push's count is Relaxed and the compactor's load of it is not Acquire.
#[cfg(all(test, weakrefs_loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;

    #[test]
    fn compaction_never_forgets_a_push_it_counted() {
        loom::model(|| {
            let list = Arc::new(EntryList::<ObjectLink>::new());
            let [first, in_list, _first_registry] = EntryRef::new_with_owners::<3, _>(|| {}, true);
            list.push(in_list);
            let pusher = {
                let list = list.clone();
                loom::thread::spawn(move || {
                    let [second, in_list, _registry] =
                        EntryRef::new_with_owners::<3, _>(|| {}, true);
                    list.push(in_list);
                    second
                })
            };
            if let Some(guard) = list.try_lock() {
                list.compact(&guard);
            }
            let second = pusher.join().unwrap();
            // Relaxed: the threads are joined.
            let state = list.state.load(Ordering::Relaxed);
            assert!(
                kept_of(state) + work_of(state) >= 2,
                "a compaction subtracted a push whose node it never walked"
            );
            drop((first, second));
        });
    }

    /// The object's death, once the model's threads are joined: takes
    /// every node (freeing the anchor) and gives back the list's
    /// references. Returns how many nodes it took, and how many alive.
    fn the_death(list: &ObjectCallbacks) -> (usize, usize) {
        // SAFETY: the caller joined every other thread: nothing races it.
        let mut node = unsafe { list.take_all() };
        let (mut taken, mut alive) = (0, 0);
        while !node.is_null() {
            // SAFETY: the chain's references are ours.
            let entry = unsafe { EntryRef::from_link(node) };
            // Relaxed: ours alone.
            node = entry.object_next.load(Ordering::Relaxed);
            taken += 1;
            alive += usize::from(entry.is_alive());
        }
        (taken, alive)
    }

    /// C17: two pushes race onto an inline list that holds one node (loom
    /// anchors on the second push), so both try to anchor it, while the
    /// first node's entry detaches (so that the anchor's compaction, due
    /// at once under loom, may free it): one anchor wins, the other is
    /// freed unused, and the death (`take_all`) finds every node still
    /// linked, the two alive ones among them, and frees the anchor.
    /// Loom's tracker in each node and in the anchor fails a model that
    /// leaks one, and its cells a free that races a use.
    #[test]
    fn anchoring_races_a_push_and_the_death_takes_both() {
        loom::model(|| {
            let list = Arc::new(ObjectCallbacks::new());
            let [first, in_list] = EntryRef::new_with_owners::<2, _>(|| {}, false);
            list.push(in_list);
            let pusher = {
                let list = list.clone();
                loom::thread::spawn(move || {
                    let [second, in_list] = EntryRef::new_with_owners::<2, _>(|| {}, false);
                    list.push(in_list);
                    second
                })
            };
            assert!(first.detach());
            let [third, in_list] = EntryRef::new_with_owners::<2, _>(|| {}, false);
            list.push(in_list);
            let second = pusher.join().unwrap();
            let (taken, alive) = the_death(&list);
            assert_eq!(alive, 2, "a push was lost to the anchoring");
            assert!(taken <= 3, "the death took a node that was never pushed");
            assert!(list.is_empty());
            drop((first, second, third));
        });
    }

    /// C17: three pushes onto an empty list: one lands inline, and the two
    /// others race to anchor it (loom anchors on the second push); the
    /// death takes all three, alive. Fails when the anchoring CAS, or a
    /// push's first load of the word, is Relaxed.
    #[test]
    fn three_pushes_onto_an_empty_list_all_reach_the_death() {
        loom::model(|| {
            let list = Arc::new(ObjectCallbacks::new());
            let spawn = |list: Arc<ObjectCallbacks>| {
                loom::thread::spawn(move || {
                    let [mine, in_list] = EntryRef::new_with_owners::<2, _>(|| {}, false);
                    list.push(in_list);
                    mine
                })
            };
            let (a, b) = (spawn(list.clone()), spawn(list.clone()));
            let [mine, in_list] = EntryRef::new_with_owners::<2, _>(|| {}, false);
            list.push(in_list);
            let (a, b) = (a.join().unwrap(), b.join().unwrap());
            let (taken, alive) = the_death(&list);
            assert_eq!((taken, alive), (3, 3), "a push was lost to the anchoring");
            assert!(list.is_empty());
            drop((mine, a, b));
        });
    }

    /// C17 with C5: on an anchored list, a push (which may compact) races
    /// a detach and its `note_detached` on another thread and one on this
    /// thread; the death takes the two live nodes, and loom checks every
    /// free against every use.
    #[test]
    fn an_anchored_push_races_detaches_and_compaction() {
        loom::model(|| {
            let list = Arc::new(ObjectCallbacks::new());
            let [first, in_list] = EntryRef::new_with_owners::<2, _>(|| {}, false);
            list.push(in_list);
            let [second, in_list] = EntryRef::new_with_owners::<2, _>(|| {}, false);
            // Anchors the list (loom's `INLINE_MAX` is one).
            list.push(in_list);
            let [third, in_list] = EntryRef::new_with_owners::<2, _>(|| {}, false);
            list.push(in_list);
            let pusher = {
                let list = list.clone();
                loom::thread::spawn(move || {
                    let [fourth, in_list] = EntryRef::new_with_owners::<2, _>(|| {}, false);
                    list.push(in_list);
                    fourth
                })
            };
            let detacher = {
                let list = list.clone();
                loom::thread::spawn(move || {
                    assert!(second.detach());
                    list.note_detached();
                    second
                })
            };
            assert!(first.detach());
            list.note_detached();
            let (fourth, second) = (pusher.join().unwrap(), detacher.join().unwrap());
            let (taken, alive) = the_death(&list);
            assert_eq!(alive, 2, "a live entry was lost");
            assert!(taken <= 4, "the death took a node that was never pushed");
            drop((first, second, third, fourth));
        });
    }
}
