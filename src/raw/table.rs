//! The shard machinery the collections share (SAFETY.md, section 7).
//!
//! A `ShardedTable<I>` holds items of type `I` (a collection's entry) in
//! shards picked by the top bits of a 64-bit hash. Each shard is an
//! open-addressing table probed a group of slots at a time: an array of
//! items, inline, and beside it one *control byte* per slot, packed a word
//! per group (eight slots on 64-bit targets), as SwissTable does. A lookup
//! loads its home group's word, picks out the bytes that match seven bits
//! of the hash with a few word operations, and reads only those slots'
//! items: non-matching probes never touch a key. What writers need of an
//! entry and lookups do not (a `WeakValueMap` entry's hook) is its slot's
//! *side*, kept in an array of its own ([`Sided`]), so that the lines
//! lookups probe hold only what they read.
//!
//! **A slot is written only when no reader can read it.** A slot goes
//! from *empty* to *full* (the item is written, then its control byte,
//! seven bits of the hash, is published with a Release store of the
//! group's word) to *tombstone*, which is *free* (a writer may fill it
//! again) once the removed item's deferred drop has run past every reader
//! that could see it and marked it so in the slot's `freed` bit; never
//! back to empty, so probe sequences never break. Readers
//! never race a write of the item they read, and an item's bytes stay
//! where they are until no reader can see them (M1, M2).
//!
//! * **Reads** pin the epoch, load the table with Acquire and walk the
//!   probe sequence group by group from the hash's home group to the first
//!   group with an empty slot, reading the items whose control bytes match.
//!   No lock, no wait (M1).
//! * **Writes** take the shard's mutex. A new item goes to the first group
//!   of its probe sequence with a free tombstone or an empty slot (a free
//!   tombstone if that group has one); a replacement goes to the first such group from the
//!   old item's own group on, and only then is the old slot turned into a
//!   tombstone, so a reader finds the old item or the new one, never
//!   neither; a removal leaves a tombstone (M2). Only the writer under the
//!   lock changes the control words of a published table, each with a
//!   plain load and a Release store (no read-modify-write), and the lock
//!   orders those stores, so a reader's Acquire load of a word
//!   synchronises with every fill it sees. A removed item is dropped by an
//!   epoch-deferred function once no reader can see it, in place, or, if
//!   its drop runs user code, moved out and dropped on the finalizer thread
//!   (M10), and its slot is then freed for reuse: the function marks the
//!   tombstone dropped in its `freed` bit, which only writers read. A
//!   count of such pending drops keeps the table's memory alive until they
//!   have run.
//! * **Rebuilds** happen when filling an empty slot would take the table
//!   past 7/8 full (tombstones count): a table sized for
//!   twice the live items receives *relocated* copies of them, each placed
//!   by its hash's filed bits (`FILED`: the low 32 but four), which the
//!   item's hook keeps (`Relocatable::filed`: every collection's entry
//!   has one, and a hook's removal needs those bits anyway), so the table
//!   keeps no hash of its own, and is published whole. A relocation clones what code may write through a
//!   shared reference (a user's key, whose `Eq` readers may be running) and
//!   copies only the item's own pointers, and its side, bitwise
//!   ([`Relocatable`]). Readers
//!   still on the old table read the old items, which are never written
//!   and never dropped whole (their pointers moved); what they still own
//!   alone (the cloned-from keys) is dropped with the old table, once no
//!   reader can see it (M3).

use std::cell::OnceCell;
use std::convert::Infallible;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::panic::{self, AssertUnwindSafe};
use std::ptr::{self, NonNull};

use crate::callbacks::{Executor, Removal, KEY_BITS};
use crate::panics::{catch_and_report, drop_each_and_report};
use crate::raw::collection::{HookAnchor, HookTarget, Hooks};
use crate::raw::shard_lock::{ShardGuard, ShardLock};
use crate::reclaim::{Pinned, Reclaimer};
#[cfg(weakrefs_loom)]
use crate::sync::Released;
use crate::sync::{
    acquire_fence, prefetch, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, CachePadded, Ordering,
    UnsafeCell,
};

/// Shards per table: about four per CPU, a power of two. Two under loom.
/// The CPUs are counted once a process: asking costs a system call and an
/// allocation, which a program that makes many small sets would otherwise
/// pay for each.
fn shard_count() -> usize {
    #[cfg(weakrefs_loom)]
    {
        2
    }
    #[cfg(not(weakrefs_loom))]
    {
        static SHARDS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *SHARDS.get_or_init(|| {
            let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
            (cpus * 4).next_power_of_two().clamp(4, 256)
        })
    }
}

/// Slots per group, one control byte each in one word: the bytes of a
/// `usize`. Two under loom, so that models rebuild small tables.
const GROUP: usize = if cfg!(weakrefs_loom) {
    2
} else {
    std::mem::size_of::<usize>()
};

/// Slots a shard's table has at least: one group under loom, so that
/// models rebuild tables; else eight.
const MIN_SLOTS: usize = if cfg!(weakrefs_loom) { GROUP } else { 8 };

/// Slots below which a rebuild does not shrink a table that has had them
/// (see `upsert`).
const CHURN_FLOOR: usize = if cfg!(weakrefs_loom) { 4 } else { 64 };

/// Slots up to which a table rebuilt while mostly dead doubles (see
/// `rebuilt_size`).
const CHURN_CEILING: usize = if cfg!(weakrefs_loom) { 4 } else { 256 };

/// Groups ahead of the one it relocates whose hooks a rebuild prefetches
/// (`Relocatable::prefetch_filed`): sixteen items on 64-bit targets.
const REBUILD_AHEAD: usize = 2;

/// Groups from which a lookup prefetches its home group's items (see
/// `Slots::prefetch_group`): 4096 slots, 64 KiB of 16-byte items a shard,
/// half a MiB over the eight shards of a 2-core machine.
const PREFETCH_GROUPS: usize = 4096 / GROUP;

/// The control byte of a slot never written since its table was built.
/// Top two bits set: only it has both.
const EMPTY: u8 = 0xFF;
/// The control byte of a slot whose item was removed. Its drop is pending
/// past every reader that may have seen it, or has run, which its bit in
/// `Table::freed` says (clear, set): only then may a writer fill the slot
/// again (M2).
const TOMBSTONE: u8 = 0x80;

// A group's slots have one bit each in a byte of `Table::freed`.
const _: () = assert!(GROUP <= 8);

/// What a shard's reference to its current table weighs in the table's
/// `refs`: more than the drops a shard can issue between folds, far
/// below overflow (M9).
const SHARD_REF: usize = usize::MAX / 4;

/// Drops a shard issues for its table before folding their count into the
/// table's `refs` (M9). Two under loom, so that models fold.
const FOLD_EVERY: usize = if cfg!(weakrefs_loom) { 2 } else { 1 << 16 };

/// `0x0101…01`: a one in each byte of a word.
const ONES: usize = usize::MAX / 0xFF;
/// The bits of a word that hold its group's control bytes (all of them but
/// under loom).
const GROUP_BITS: usize = if GROUP == std::mem::size_of::<usize>() {
    usize::MAX
} else {
    (1 << (8 * GROUP)) - 1
};
/// The top bit of each control byte of a group.
const TOPS: usize = (ONES << 7) & GROUP_BITS;

/// The bits of a hash a shard files an item by: its home group (all of
/// them, `Table::home`) and its control byte (seven, `control_of`), the
/// low 32 bits less the few a hook's header keeps for itself. A hook keeps
/// exactly these bits of its entry's hash (`Removal::new`), which is all
/// the probe for its entry needs; the shard is its site.
const FILED: u32 = KEY_BITS;

/// The bits of `hash` its item is filed by ([`FILED`]).
#[inline(always)]
fn filed(hash: u64) -> u32 {
    hash as u32 & FILED
}

/// The control byte of a full slot for `hash`: the seven lowest of its
/// filed bits. The home group is scaled from all of them and so depends
/// mostly on the top ones: the two are independent until a shard has
/// about 2^21 groups, some hundred million items over a 2-core machine's
/// eight shards (and then the control byte filters with fewer bits, and keys
/// decide all the same). Top bit clear, which no other control byte has.
/// It filters candidates; keys decide.
#[inline(always)]
fn control_of(hash: u64) -> u8 {
    (filed(hash) >> FILED.trailing_zeros()) as u8 & 0x7F
}

/// True for the control byte of a full slot.
#[inline(always)]
fn is_full(control: u8) -> bool {
    control & 0x80 == 0
}

/// Word operations on a group's control bytes. Each returns the top bit of
/// every byte it selects; `slot_in_group` turns the lowest into an index.
mod bytes {
    use super::{ONES, TOPS};

    /// Full slots.
    #[inline(always)]
    pub(super) fn full(word: usize) -> usize {
        !word & TOPS
    }

    /// Full slots whose control byte is `control`. A byte that differs from
    /// `control` in its low bit alone may be selected too, when a match sits
    /// below it (the borrow of the subtraction): it is full, and its key
    /// decides, as for any candidate.
    #[inline(always)]
    pub(super) fn matching(word: usize, control: u8) -> usize {
        let diff = word ^ (ONES * usize::from(control));
        diff.wrapping_sub(ONES) & !diff & full(word)
    }

    /// `EMPTY` slots: the top two bits set.
    #[inline(always)]
    pub(super) fn empty(word: usize) -> usize {
        word & (word << 1) & TOPS
    }

    /// `TOMBSTONE` slots: the top bit set, the next one clear.
    #[inline(always)]
    pub(super) fn tombstones(word: usize) -> usize {
        word & !(word << 1) & TOPS
    }

    /// The slot in its group of the lowest byte `bits` selects.
    #[inline(always)]
    pub(super) fn slot_in_group(bits: usize) -> usize {
        debug_assert!(bits != 0);
        bits.trailing_zeros() as usize / 8
    }

    /// The control byte of slot `index` of a group, from its word.
    #[inline(always)]
    pub(super) fn byte(word: usize, index: usize) -> u8 {
        (word >> (8 * index)) as u8
    }
}

/// Items a table may carry into a rebuilt table while readers still read
/// the old copies.
///
/// A rebuild never copies bytes that code may write through a shared
/// reference: an item's own pointers (a `Weak`, a `Hook`) move
/// bitwise, and a user's key, which may hold an atomic or a `Mutex` that
/// its `Eq` writes through `&K`, is cloned, since `Clone` takes `&K` as
/// the readers' `Eq` does (M3).
///
/// # Safety
///
/// Implementors promise:
///
/// 1. [`relocate`](Relocatable::relocate) copies bitwise only fields that
///    no code writes through a shared reference (no `UnsafeCell` in their
///    own bytes), and makes every other field afresh from `&self`.
/// 2. [`take_left_behind`](Relocatable::take_left_behind) moves out exactly
///    the fields `relocate` made afresh, so that after a relocation each
///    resource is owned once: the moved ones by the new copy, the others
///    by the old copy's left-behind.
/// 3. [`identity`](Relocatable::identity) is unique among the live items
///    of a table, is the same for an item and its relocated copy, and is
///    not reused while a thread that saw the item is pinned (it is the
///    address of something the item or its side owns, freed with them).
/// 4. No code writes through a shared reference to a
///    [`Side`](Sided::Side) (no `UnsafeCell` in its own bytes): a
///    rebuild moves it bitwise, with readers of the old table still able
///    to read it, and dropping it runs no user code.
pub(crate) unsafe trait Relocatable: Sided + Sized {
    /// True if dropping an item may run user code (a key's destructor;
    /// [`plain_drop`](super::plain_drop) tells the standard types that only
    /// free memory apart). Such an item is not dropped where epoch garbage
    /// happens to be collected (inside any lookup, or under another shard's
    /// lock): it is handed to the finalizer thread (M10). A constant once
    /// inlined.
    fn drop_runs_user_code() -> bool;

    /// What a relocated item leaves behind in the old table: the fields
    /// its relocation made afresh (a cloned key), dropped once no reader
    /// of the old table remains.
    type LeftBehind: Send + 'static;

    /// Names this item (whose slot keeps `side`) across rebuilds.
    fn identity(&self, side: &Self::Side) -> usize;

    /// The filed bits ([`FILED`]) of the hash this item (whose slot keeps
    /// `side`) was filed under: what places it in a table of any size. Its
    /// hook keeps them (`Hook::key`); a wrong answer would lose the item
    /// from its probe sequence (never memory safety: the item stays owned
    /// by its slot and is dropped with the table).
    fn filed(&self, side: &Self::Side) -> u32;

    /// Asks the processor to fetch what [`filed`](Relocatable::filed)
    /// will read (the hook's node): a rebuild asks a few groups ahead, so
    /// that reading the filed bits of each item, one node of its own
    /// apiece, does not wait on memory each time. A hint: nothing by
    /// default.
    #[inline(always)]
    fn prefetch_filed(&self, side: &Self::Side) {
        let _ = side;
    }

    /// The copy of this item a rebuild puts in the new table. May run user
    /// code (`Clone`) and so panic; nothing is copied then.
    ///
    /// # Safety
    ///
    /// 1. Afterwards the caller drops exactly one of the two whole (the
    ///    copy, once published; else the original), and takes the other's
    ///    [`LeftBehind`](Relocatable::LeftBehind) once instead.
    unsafe fn relocate(&self) -> Self;

    /// Moves out of `this` what its relocation made afresh.
    ///
    /// # Safety
    ///
    /// 1. `this` points at an initialised item that `relocate` copied (or
    ///    that is such a copy), whose counterpart is or will be dropped
    ///    whole; this is called once, and `this` is not used again.
    /// 2. No other thread reads `*this` any more.
    unsafe fn take_left_behind(this: *const Self) -> Self::LeftBehind;
}

/// What a table keeps beside each item of type `Self` rather than in it:
/// data that writers need and lookups never read (a `WeakValueMap` entry's
/// hook), so that the lines a lookup probes hold more items. A trait of its
/// own, apart from [`Relocatable`], so that a collection can name its
/// table in a struct without the bounds relocation needs (a key's
/// `Clone`).
pub(crate) trait Sided {
    /// `()` for items that keep everything inline. Moved bitwise by a
    /// rebuild (`Relocatable`'s 4), and dropped with its item.
    type Side: Send + Sync + 'static;

    /// What a table of these items needs to keep a mark beside each
    /// (`MarkedSlot`): `()` for items whose tables may (a `WeakValueMap`'s,
    /// which may have a keep-warm tier), `Infallible` for the rest. Their
    /// tables' marked variant then cannot be built, and the compiler drops
    /// every look at which variant a table has from their lookups and
    /// scans.
    type Marks: MarkToken;

    /// Drops an item and its side in place, as a slot's drop does: the
    /// side first (our own code, which does not panic), then the item
    /// (whose drop may be user code, and may panic: the side is gone by
    /// then either way). A collection entry overrides it to read its
    /// hook first: its `Weak` may stand for its object's implicit weak
    /// too (C21).
    ///
    /// # Safety
    ///
    /// 1. Both point at initialised values the caller owns, dropped once
    ///    here and not used after.
    #[inline]
    unsafe fn drop_with_side(item: *mut Self, side: *mut Self::Side)
    where
        Self: Sized,
    {
        // SAFETY: the caller's 1.
        unsafe {
            ptr::drop_in_place(side);
            ptr::drop_in_place(item);
        }
    }
}

/// The token a marked table is built with ([`Sided::Marks`]): one for
/// `()`, none for `Infallible`.
pub(crate) trait MarkToken: Copy + Send + Sync + 'static {
    /// The token, if there is one.
    const TOKEN: Option<Self>;
}

impl MarkToken for () {
    const TOKEN: Option<()> = Some(());
}

impl MarkToken for Infallible {
    const TOKEN: Option<Infallible> = None;
}

/// One slot: once its control byte says full, an item (or its side).
type Slot<I> = UnsafeCell<MaybeUninit<I>>;

/// An item with the mark its collection keeps beside it: a 64-bit word
/// readers load and stamp (a keep-warm tier's position, M13) and writers
/// store under the shard's lock, zero when the slot is filled, carried over
/// by a rebuild, never read by the table. Beside the item, in its slot,
/// because a hit reads both: for an item of two words (a `WeakValueMap`
/// entry of a word-sized key) a slot is 24 bytes, so the slots of a group
/// sit at every multiple of 8 within a line: one slot in eight has its
/// mark on the line after its item's, and one in eight straddles two lines
/// with its item. The side, which a hit does not read (unless the hand has
/// passed the mark's position since the last hit), stays in an array of
/// its own, as in a plain table, so that the slots a lookup probes are a
/// word smaller. An earlier layout kept the side in the slot
/// too, aligned to 32 bytes; against it, reads at 100 000 keys with a
/// full tier went from 0.86–1.03x (median 0.89x) of the same reads
/// without a tier to 0.87–0.99x (0.92x) on one thread, and from
/// 0.83–0.95x (0.90x) to 0.89–1.03x (0.975x) on two (`map_ab`,
/// `keep_recent` case, six interleaved runs of each build, 2-core machine).
#[repr(C)]
struct MarkedSlot<I> {
    item: Slot<I>,
    mark: AtomicU64,
}

/// A table's slots: the items in one array (each with its mark, for a
/// collection that keeps marks) and their sides in another (lookups read
/// only the first, so a probed line holds more items; an array of `()`
/// sides allocates nothing).
struct Slots<I: Sided> {
    items: Items<I>,
    sides: Box<[Slot<I::Side>]>,
}

/// The items of a table: plain, or each with its mark (never, for items
/// whose `Marks` is uninhabited).
enum Items<I: Sided> {
    Plain(Box<[Slot<I>]>),
    Marked(Box<[MarkedSlot<I>]>, I::Marks),
}

impl<I: Sided> Slots<I> {
    /// `count` empty slots, with marks (zero) if `marked`, which only
    /// items that may keep marks ask for (`Sided::Marks`).
    fn new(count: usize, marked: bool) -> Self {
        fn empty<T>() -> Slot<T> {
            UnsafeCell::new(MaybeUninit::uninit())
        }
        let items = match I::Marks::TOKEN {
            Some(token) if marked => Items::Marked(
                (0..count)
                    .map(|_| MarkedSlot {
                        item: empty(),
                        mark: AtomicU64::new(0),
                    })
                    .collect(),
                token,
            ),
            _ => {
                debug_assert!(!marked, "marks asked of items that keep none");
                Items::Plain((0..count).map(|_| empty()).collect())
            }
        };
        Slots {
            items,
            sides: (0..count).map(|_| empty()).collect(),
        }
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.sides.len()
    }

    /// Slot `index` (panics past the end).
    #[inline(always)]
    fn slot(&self, index: usize) -> &Slot<I> {
        match &self.items {
            Items::Plain(items) => &items[index],
            Items::Marked(slots, _) => &slots[index].item,
        }
    }

    /// The side of slot `index` (panics past the end).
    #[inline(always)]
    fn side(&self, index: usize) -> &Slot<I::Side> {
        &self.sides[index]
    }

    /// Asks the CPU to start loading the lines that hold the items of the
    /// group starting at slot `first`, so that a lookup's loads of the
    /// group's control word and of its candidate items overlap: the item a
    /// hit reads is almost always in its home group. In a table larger
    /// than the caches both miss, and one after the other they would cost
    /// a lookup two memory latencies before it even reaches the value.
    #[inline(always)]
    fn prefetch_group(&self, first: usize) {
        /// The lines of the group's first 128 bytes (all of it for items
        /// of 16 bytes): its first and last byte's and the one between,
        /// three at most when they straddle a line (`bytes` is a constant:
        /// the branches fold). No further: a writer fills a group's slots
        /// from its first vacant one, so the first hold most of its items,
        /// and each line more that misses takes a fill buffer and memory
        /// bandwidth from the loads a lookup cannot do without. On the
        /// 32-byte slots of an earlier layout of a map with a keep-warm
        /// tier, 100 000 keys, one thread, reads were 7% faster with the
        /// first 128 bytes than with all 256 (medians of eight interleaved
        /// runs), and faster than with the first 64 or 192; on today's
        /// 24-byte slots, the first 128 bytes and all 192 measured alike
        /// (three interleaved runs each).
        #[inline(always)]
        fn lines<T>(slots: &[T], first: usize) {
            const { assert!(std::mem::size_of::<T>() > 0, "slots take room") };
            let bytes = (GROUP * std::mem::size_of::<T>()).min(128);
            // `wrapping_add`: a hint's address need not be in bounds.
            let start = slots.as_ptr().wrapping_add(first).cast::<u8>();
            prefetch(start);
            if bytes > 64 {
                prefetch(start.wrapping_add(64));
            }
            prefetch(start.wrapping_add(bytes - 1));
        }
        match &self.items {
            Items::Plain(items) => lines(items, first),
            Items::Marked(slots, _) => lines(slots, first),
        }
    }

    /// The slots keep a mark each (`MarkedSlot`): a table rebuilt from
    /// these keeps them too.
    fn marked(&self) -> bool {
        matches!(self.items, Items::Marked(..))
    }

    /// The mark of slot `index`, if the slots keep marks.
    #[inline(always)]
    fn mark(&self, index: usize) -> Option<&AtomicU64> {
        match &self.items {
            Items::Plain(_) => None,
            Items::Marked(slots, _) => slots.get(index).map(|slot| &slot.mark),
        }
    }

    /// Slot `index` and its mark, if the slots keep marks, with one look
    /// at which kind they are and no bounds check: for lookups, which run
    /// millions of times a second and whose instructions, at a size where
    /// their misses dominate, set how many of them the processor overlaps.
    /// A hit on a map with a keep-warm tier reads both; a caller that
    /// wants the slot alone drops the mark, which the compiler then never
    /// computes.
    ///
    /// # Safety
    ///
    /// `index` is below [`Self::len`].
    #[inline(always)]
    unsafe fn slot_and_mark_unchecked(&self, index: usize) -> (&Slot<I>, Option<&AtomicU64>) {
        debug_assert!(index < self.len());
        // SAFETY: in bounds, by the caller's promise: the items are as
        // many as the sides (`new`).
        unsafe {
            match &self.items {
                Items::Plain(items) => (items.get_unchecked(index), None),
                Items::Marked(slots, _) => {
                    let slot = slots.get_unchecked(index);
                    (&slot.item, Some(&slot.mark))
                }
            }
        }
    }
}

/// One shard's slots; replaced whole by a rebuild.
struct Table<I: Sided> {
    /// One word per group of `GROUP` slots: byte `i` (bits `8i..8i + 8`)
    /// of word `g` is the control byte of slot `g * GROUP + i`.
    control: Box<[AtomicUsize]>,
    slots: Slots<I>,
    /// One byte per group, a bit per slot (bit `i` of byte `g` for slot
    /// `g * GROUP + i`): set only for a tombstone whose item's deferred
    /// drop has run (`free_slot`), so that a writer may fill it again
    /// (M2); clear for every other slot of a current table (a retired
    /// table's slot that a rebuild left out stays full and gets its bit
    /// too), and, rarely, for such a tombstone too, whose set a refill's
    /// clear lost. The one field of a slot that its deferred drop writes,
    /// with an RMW, as drops of the group's other slots may race it;
    /// writers read it, and clear a bit as they fill its slot, under the
    /// mutex, with a load and a store. Lookups never read it.
    freed: Box<[AtomicU8]>,
    /// How many slots may be non-empty before filling an empty one
    /// rebuilds the table ([`usable`] of its slots), kept so that a write
    /// need not work it out.
    usable: usize,
    /// The shard's reference while the table is current, worth
    /// `SHARD_REF`, less one per deferred drop of a removed item that has
    /// run, plus the drops the shard has folded in; once the shard's
    /// reference is released, the drops still pending (M9). On its own
    /// cache line: deferred drops change it, readers only read the rest.
    refs: CachePadded<AtomicUsize>,
}

impl<I: Sided> Table<I> {
    /// A table of at least `count` empty slots (whole groups), owned by its
    /// shard, with a mark per slot if `marked`.
    fn with_slots(count: usize, marked: bool) -> Box<Self> {
        let groups = count.div_ceil(GROUP).max(1);
        let count = groups * GROUP;
        Box::new(Table {
            control: (0..groups).map(|_| AtomicUsize::new(usize::MAX)).collect(),
            slots: Slots::new(count, marked),
            freed: (0..groups).map(|_| AtomicU8::new(0)).collect(),
            usable: usable(count),
            refs: CachePadded::new(AtomicUsize::new(SHARD_REF)),
        })
    }

    fn groups(&self) -> usize {
        self.control.len()
    }

    /// The group `hash`'s probe sequence starts at: its filed bits scaled
    /// to the table (any number of groups, not only a power of two); the
    /// shard used the high bits.
    #[inline(always)]
    fn home(&self, hash: u64) -> usize {
        ((u128::from(filed(hash)) * self.groups() as u128) >> 32) as usize
    }

    /// The group after `group`, wrapping around.
    #[inline(always)]
    fn next(&self, group: usize) -> usize {
        if group + 1 == self.groups() {
            0
        } else {
            group + 1
        }
    }

    /// The control word of `group`, loaded with `order`.
    #[inline(always)]
    fn word(&self, group: usize, order: Ordering) -> usize {
        self.control[group].load(order)
    }

    /// The control byte of slot `index`. Relaxed: for a writer under the
    /// mutex (who alone changes control bytes, M2), or a check.
    fn control_byte(&self, index: usize) -> u8 {
        bytes::byte(self.word(index / GROUP, Ordering::Relaxed), index % GROUP)
    }

    /// Changes slot `index`'s control byte from `old`, which it must be, to
    /// `new`, storing the group's word with `order` and its other bytes as
    /// they are. Called only by the shard's writer, under its mutex (or on
    /// a table not yet published), the one thread that changes control
    /// bytes (M2): nothing changes the word between the load and the
    /// store, so no read-modify-write is needed.
    #[inline]
    fn set_control(&self, index: usize, old: u8, new: u8, order: Ordering) {
        let word = &self.control[index / GROUP];
        // Relaxed: the last store to the word is ours or an earlier
        // writer's, ordered before us by the mutex.
        let before = word.load(Ordering::Relaxed);
        debug_assert_eq!(bytes::byte(before, index % GROUP), old, "slot {index}");
        let flip = usize::from(old ^ new) << (8 * (index % GROUP));
        word.store(before ^ flip, order);
    }

    /// [`Self::set_control`] of two slots of one group, `(index, old,
    /// new)` each, in one store of the word: a reader sees both changes or
    /// neither.
    fn set_controls(&self, first: (usize, u8, u8), second: (usize, u8, u8), order: Ordering) {
        debug_assert_eq!(first.0 / GROUP, second.0 / GROUP, "one group");
        debug_assert_ne!(first.0, second.0);
        let word = &self.control[first.0 / GROUP];
        // Relaxed: as in `set_control`.
        let before = word.load(Ordering::Relaxed);
        let mut flip = 0;
        for (index, old, new) in [first, second] {
            debug_assert_eq!(bytes::byte(before, index % GROUP), old, "slot {index}");
            flip |= usize::from(old ^ new) << (8 * (index % GROUP));
        }
        word.store(before ^ flip, order);
    }

    /// Calls `f` with the index of every full slot, its group's word
    /// loaded with `order`.
    fn each_full(&self, order: Ordering, mut f: impl FnMut(usize)) {
        for group in 0..self.groups() {
            let word = self.word(group, order);
            let mut full = bytes::full(word);
            while full != 0 {
                let slot = bytes::slot_in_group(full);
                f(group * GROUP + slot);
                full &= full - 1;
            }
        }
    }

    /// Calls `f` with the item of every full slot, its group's word loaded
    /// with `order` (Acquire for a reader). The slots' layout is matched
    /// once, not once an item: a scan is the hot loop of every iteration.
    ///
    /// # Safety
    ///
    /// 1. No item is dropped while `'t` lasts: the caller is pinned for
    ///    `'t`, or holds the shard's mutex for it ([`Self::item`]'s 2).
    /// 2. `order` is Acquire, or the caller holds the shard's mutex
    ///    ([`Self::item`]'s 1).
    #[inline]
    unsafe fn each_full_item<'t>(&'t self, order: Ordering, f: impl FnMut(&'t I)) {
        /// The scan over one layout: `cells` holds a slot's item cell for
        /// each slot, `GROUP` of them for each control word.
        #[inline(always)]
        fn scan<'t, I: 't, C: 't>(
            control: &'t [AtomicUsize],
            cells: &'t [C],
            cell: impl Fn(&'t C) -> &'t Slot<I>,
            order: Ordering,
            mut f: impl FnMut(&'t I),
        ) {
            for (word, group) in control.iter().zip(cells.chunks_exact(GROUP)) {
                let mut full = bytes::full(word.load(order));
                while full != 0 {
                    // Below `GROUP`, which the mask lets the compiler see.
                    let slot = bytes::slot_in_group(full) & (GROUP - 1);
                    full &= full - 1;
                    let item = cell(&group[slot]).with(|item| item);
                    // As in `Table::item`: written before its control byte
                    // was published (seen through `order`, the caller's 2).
                    // SAFETY: and not written or dropped since, nor while
                    // `'t` lasts (the caller's 1).
                    f(unsafe { (*item).assume_init_ref() });
                }
            }
        }
        debug_assert_eq!(self.slots.len(), self.control.len() * GROUP, "whole groups");
        match &self.slots.items {
            Items::Plain(items) => scan(&self.control, items, |cell| cell, order, f),
            Items::Marked(slots, _) => scan(&self.control, slots, |slot| &slot.item, order, f),
        }
    }

    /// The bit of slot `index` in its group's `freed` byte, and the byte.
    #[inline(always)]
    fn freed_bit(&self, index: usize) -> (&AtomicU8, u8) {
        (&self.freed[index / GROUP], 1 << (index % GROUP))
    }

    /// The mark of slot `index`, if the table keeps marks.
    #[inline(always)]
    fn mark(&self, index: usize) -> Option<&AtomicU64> {
        self.slots.mark(index)
    }

    /// The item of slot `index`.
    ///
    /// # Safety
    ///
    /// 1. The caller saw the slot full: loaded the word of its group in
    ///    this table with Acquire (or holds the shard's mutex), and its
    ///    byte was a full one. (So `index` names a slot of this table:
    ///    every group's slots exist, `with_slots`.)
    /// 2. The item is not dropped while the reference lives: the caller is
    ///    pinned, or holds the shard's mutex and keeps the reference no
    ///    longer than its writer, or the reference is one a writer lends
    ///    ([`ShardWriter::lend`]): it lives no longer than the writer's
    ///    `WritePin`, which the writer's drop pins before it defers the
    ///    item's drop (M9).
    #[inline(always)]
    unsafe fn item(&self, index: usize) -> &I {
        // SAFETY: the caller's 1 and 2.
        unsafe { self.item_and_mark(index) }.0
    }

    /// The item of slot `index` and the slot's mark, if the table keeps
    /// marks.
    ///
    /// # Safety
    ///
    /// As for [`Self::item`].
    #[inline(always)]
    unsafe fn item_and_mark(&self, index: usize) -> (&I, Option<&AtomicU64>) {
        // SAFETY: in bounds, by `item`'s 1.
        let (slot, mark) = unsafe { self.slots.slot_and_mark_unchecked(index) };
        let item = slot.with(|item| item);
        // A slot is written again only after its item's deferred drop (M2).
        // SAFETY: by 1 the item was written before its control byte was
        // published and nothing writes it now; by 2 it is not dropped (nor
        // its slot refilled) while borrowed.
        (unsafe { (*item).assume_init_ref() }, mark)
    }

    /// The side of slot `index`'s item.
    ///
    /// # Safety
    ///
    /// As for [`Self::item`].
    #[inline(always)]
    unsafe fn side(&self, index: usize) -> &I::Side {
        let side = self.slots.side(index).with(|side| side);
        // SAFETY: written with the item, before its control byte was
        // published, and dropped or moved with it: as in `item`.
        unsafe { (*side).assume_init_ref() }
    }

    /// Writes `item` and its `side` into slot `index`.
    ///
    /// # Safety
    ///
    /// 1. No thread reads the slot: it is empty or a free tombstone, under the shard's
    ///    mutex (its control byte is published afterwards), or in a table
    ///    not yet published.
    /// 2. Whatever the slot held before was dropped or moved out.
    unsafe fn write(&self, index: usize, (item, side): (I, I::Side)) {
        let (item_cell, side_cell) = (self.slots.slot(index), self.slots.side(index));
        // SAFETY: by 1 nobody else touches the slot; by 2 nothing is
        // overwritten that still owns anything.
        item_cell.with_mut(|cell| unsafe { (*cell).write(item) });
        // SAFETY: as above.
        side_cell.with_mut(|cell| unsafe { (*cell).write(side) });
    }

    /// Drops slot `index`'s item and its side in place
    /// ([`Sided::drop_with_side`]: the side first, our own code, which does
    /// not panic, then the item, whose drop may be user code, and may
    /// panic: the side is gone by then either way).
    ///
    /// # Safety
    ///
    /// 1. The slot holds an item and side that the table owns, and nobody
    ///    reads them any more (exclusive access, or an unlinked item past
    ///    every reader that could see it).
    /// 2. It is dropped once; the slot is not read again until written.
    unsafe fn drop_whole(&self, index: usize) {
        let (item_cell, side_cell) = (self.slots.slot(index), self.slots.side(index));
        item_cell.with_mut(|item| {
            side_cell.with_mut(|side| {
                // SAFETY: initialised and owned (1), dropped once (2).
                unsafe { I::drop_with_side((*item).as_mut_ptr(), (*side).as_mut_ptr()) }
            })
        });
    }

    /// Moves slot `index`'s item and side out.
    ///
    /// # Safety
    ///
    /// As for [`Self::drop_whole`], for a move instead of a drop.
    unsafe fn take_whole(&self, index: usize) -> (I, I::Side) {
        let (item_cell, side_cell) = (self.slots.slot(index), self.slots.side(index));
        // SAFETY: initialised and owned, moved out once (`drop_whole`'s 1,
        // 2); the slot is freed as `MaybeUninit`, which drops nothing.
        let item = item_cell.with(|item| unsafe { ptr::read((*item).as_ptr()) });
        // SAFETY: as above.
        let side = side_cell.with(|side| unsafe { ptr::read((*side).as_ptr()) });
        (item, side)
    }
}

/// Releases `weight` of `table`'s references (M9): one for a deferred
/// drop that has run, or the shard's reference less the drops it issued
/// and did not fold in. Frees the table with the last.
///
/// # Safety
///
/// 1. The caller owns what it releases, and does not use the table after.
/// 2. No full slot's item is still owned by the table once the last
///    release runs: the items were moved to a newer table, dropped (or
///    moved out) by deferred functions, or dropped by
///    `ShardedTable::drop`.
unsafe fn release<I: Sided>(table: *const Table<I>, weight: usize) {
    // SAFETY: by 1 the table is alive while we hold the weight we release.
    let refs = unsafe { &(*table).refs };
    // Release: orders our use of the table (a deferred drop of one of its
    // items) before the free below, on whichever thread frees it.
    if refs.fetch_sub(weight, Ordering::Release) == weight {
        // Acquire: pairs with the Release subtractions of the other holders.
        acquire_fence!(refs);
        // SAFETY: the last reference; allocated by `Box` in `with_slots`.
        // By 2, freeing the slots (`MaybeUninit`) drops no item.
        drop(unsafe { Box::from_raw(table.cast_mut()) });
    }
}

/// Writer-side bookkeeping of one shard, under its mutex.
struct ShardState {
    /// Slots of the current table that are not empty (full or tombstones):
    /// a dropped tombstone is filled again without counting anew.
    used: usize,
    /// Deferred drops of the current table's removed items issued since
    /// the last fold into its `refs` (M9).
    issued: usize,
    /// The table's owner has let go of it: its table is gone (null) and
    /// no writer may start (M14; set by `ShardedTable::drop` alone).
    closed: bool,
}

/// One shard: its current table, its writers' mutex, its item count.
/// `repr(C)`: its hooks name it by the site that heads its target.
#[repr(C)]
pub(crate) struct Shard<I: Sided> {
    /// The collection's (a clone in each shard, so that a hook needs only
    /// its shard's address), first: its `HookSite` heads it, and is the
    /// shard's address as its hooks hold it (M14).
    target: HookTarget<I>,
    /// Null once closed (`ShardState::closed`); until then never null, and
    /// owns the shard's reference to the table (M9).
    table: AtomicPtr<Table<I>>,
    writer: ShardLock<ShardState>,
    /// Items in the table. Written under the mutex, read without it.
    len: AtomicUsize,
    /// Entries a death removed from this shard. Written under the mutex
    /// (a load and a store), read without it.
    deaths: AtomicU64,
    /// Twice the moves made in this shard's tables, plus one while one is
    /// under way: a sequence lock's count, for snapshots (M8). A move is a
    /// replacement written to a later group than its old item's, which
    /// readers see change in two stores. Written under the mutex only.
    moves: AtomicU64,
    /// This shard's place among its table's: a hook knows its shard by
    /// address and its entry's hash by the filed bits alone, not the top
    /// ones that pick the shard, so a removal that must find the shard
    /// again through the collection (`slow_death`) takes its index.
    index: usize,
}

/// Items of one collection, sharded; see the module docs.
pub(crate) struct ShardedTable<I: Sided> {
    /// Each on its own cache line: a write to one shard's mutex and count
    /// must not invalidate the table pointer readers of its neighbours load.
    /// Allocated by `Box`, freed through the epoch once the table is
    /// dropped (`Drop`): a dying thread's hook may still be locking one of
    /// them (M14). A raw pointer, not a `Box`: hooks reach the shards
    /// without a borrow of this table, while it is being dropped too.
    shards: NonNull<[CachePadded<Shard<I>>]>,
    /// `64 - log2(shards)`: the hash's top bits pick the shard.
    shard_shift: u32,
    /// The core's weak reference to its own block, released with the
    /// shards (M14); `None` once `Drop` has taken it.
    anchor: Option<HookAnchor>,
    /// Under loom, set when the shards and the anchor are released: every
    /// hook checks it (`Removal`'s run, `CoreRef::upgrade`), so that a
    /// model fails if one reaches them after, or racing, their release
    /// (M14).
    #[cfg(weakrefs_loom)]
    released: Released,
    _items: PhantomData<I>,
}

// The table owns its items and their sides (`Send`, to drop them anywhere)
// and hands out references to them to any thread (`Sync`; a side is both
// by `Sided`'s bound). The rest is atomics, mutexes, epoch pointers, the
// shards' allocation (owned, reached through `&self` only as shared
// references) and each shard's `HookTarget` (read only, its own `Send`).
// SAFETY: as just said.
unsafe impl<I: Sided + Send + Sync> Send for ShardedTable<I> {}
// SAFETY: as for `Send`.
unsafe impl<I: Sided + Send + Sync> Sync for ShardedTable<I> {}

/// How many of a table's `slots` may be non-empty (full or tombstones)
/// before filling one more empty slot rebuilds it: 7/8, as
/// SwissTable's and hashbrown's tables, which probe groups of 8 or 16
/// slots as this one does. The empty slots left end probe sequences soon
/// (a group of eight has none with probability about 0.34 at 7/8), and a
/// table that grows to twice its items between rebuilds relocates each
/// item about 2.3 times over its growth rather than 3 times at 3/4.
fn usable(slots: usize) -> usize {
    // At least one slot left empty, for the smallest tables (two slots
    // under loom).
    slots - slots.div_ceil(8)
}

/// Slots for a table that holds `items` at most half full: room to spare
/// before the next rebuild, at 7/8 (`usable`).
fn slots_for(items: usize) -> usize {
    items.saturating_mul(2).max(MIN_SLOTS)
}

/// Slots for the table that replaces one of `slots` slots, `used` of them
/// not empty and `items` of those full, to hold `live` items.
///
/// Twice the live items, but under churn (insert, then the value dies)
/// few items are live while removed ones fill slots that become free only
/// once no reader can see them (M2), so a table sized for the live items
/// alone would be rebuilt every few inserts. A table rebuilt while mostly
/// dead therefore doubles instead, up to `CHURN_CEILING`, which gives the
/// epoch time to free slots for reuse before the next rebuild; and one
/// that has reached `CHURN_FLOOR` never shrinks below it.
fn rebuilt_size(slots: usize, used: usize, items: usize, live: usize) -> usize {
    let dead = used - items;
    let churning = dead * 2 > used;
    let floor = if churning {
        slots.saturating_mul(2).min(CHURN_CEILING.max(slots))
    } else {
        slots.min(CHURN_FLOOR)
    };
    slots_for(live).max(floor)
}

impl<I: Relocatable + Send + Sync + 'static> ShardedTable<I> {
    /// A table with room for about `capacity` items before any shard
    /// rebuilds, with a mark beside each item if `marked` (see
    /// [`Candidates::next_marked`]).
    pub(crate) fn with_capacity(capacity: usize, marked: bool, hooks: Hooks<I>) -> Self {
        let shards = shard_count();
        debug_assert!(shards >= 2 && shards.is_power_of_two());
        // Hashes spread items over the shards unevenly, by about the square
        // root of each one's share: four times that in headroom keeps
        // `capacity` items from rebuilding the fuller shards. (None under
        // loom, whose models size tables to make them rebuild.)
        let per_shard = capacity.div_ceil(shards);
        let per_shard = if cfg!(weakrefs_loom) {
            per_shard
        } else {
            per_shard + 4 * per_shard.isqrt() + 8
        };
        // Full at 7/8, plus one slot: no rebuild before `per_shard` items.
        let slots = (per_shard.saturating_mul(8) / 7 + 2).max(MIN_SLOTS);
        // A capacity whose tables could not be addressed panics, as
        // `HashMap::with_capacity`'s does, rather than asking the allocator
        // for a size it must refuse, which aborts the process.
        let slot_bytes = std::mem::size_of::<Slot<I>>()
            + std::mem::size_of::<Slot<I::Side>>()
            + if marked {
                std::mem::size_of::<AtomicU64>()
            } else {
                0
            }
            // The control byte, and the `freed` bit rounded up to a byte.
            + 2;
        if slots
            .checked_mul(slot_bytes)
            .and_then(|bytes| bytes.checked_mul(shards))
            .is_none_or(|bytes| bytes > isize::MAX as usize)
        {
            panic!("capacity overflow: tables for {capacity} entries exceed the address space");
        }
        let array: Box<[CachePadded<Shard<I>>]> = (0..shards)
            .map(|index| {
                CachePadded::new(Shard {
                    target: hooks.target.clone(),
                    table: AtomicPtr::new(Box::into_raw(Table::with_slots(slots, marked))),
                    writer: ShardLock::new(ShardState {
                        used: 0,
                        issued: 0,
                        closed: false,
                    }),
                    len: AtomicUsize::new(0),
                    deaths: AtomicU64::new(0),
                    moves: AtomicU64::new(0),
                    index,
                })
            })
            .collect();
        ShardedTable {
            // SAFETY: `Box::into_raw` is never null.
            shards: unsafe { NonNull::new_unchecked(Box::into_raw(array)) },
            shard_shift: 64 - shards.trailing_zeros(),
            anchor: Some(hooks.anchor),
            #[cfg(weakrefs_loom)]
            released: hooks.released,
            _items: PhantomData,
        }
    }

    /// Pins the current thread for reads (M1). Every table reclaims
    /// through the process-wide collector, the one a dying thread pins
    /// before it runs a death's hooks, which lend that pin to their
    /// writers (M14).
    #[inline]
    pub(crate) fn pin(&self) -> Pinned {
        Reclaimer::pin_global()
    }

    /// The removal a death callback for an entry filed under `hash`
    /// carries out: at the site that heads its shard, named by address,
    /// without a count (M14). The address comes from a reference to the
    /// whole shard, so `death_at_shard` may read all of it.
    pub(crate) fn removal_for_hook(&self, hash: u64) -> Removal {
        // The target heads the shard, as `repr(C)` promises: checked where
        // it is relied on.
        const { assert!(std::mem::offset_of!(Shard<I>, target) == 0) };
        let shard = NonNull::from(&*self.shards()[self.shard_index(hash)]);
        // The site heads the shard's target, which heads the shard
        // (`repr(C)` both), and its function, `death_at_shard::<I>`
        // (`hooks`), expects a `Shard<I>`; the pointer comes from a
        // reference to the whole shard. The shards are freed only through
        // the epoch, after the table's drop has detached every hook still
        // attached (M14).
        // SAFETY: `Removal::new`'s 1 and 2, as just said.
        unsafe {
            Removal::new(
                shard.cast(),
                hash as u32,
                #[cfg(weakrefs_loom)]
                self.released.clone(),
            )
        }
    }

    /// The table a pinned reader of shard `index` uses.
    #[inline]
    fn table_for_read<'g>(&self, index: usize, pinned: &'g Pinned) -> &'g Table<I> {
        Self::shard_table(&self.shards()[index], pinned)
    }

    /// [`Self::table_for_read`], for a shard already found.
    #[inline(always)]
    fn shard_table<'g>(shard: &Shard<I>, _pinned: &'g Pinned) -> &'g Table<I> {
        // Acquire (M1, M3): pairs with the Release store or swap that
        // published the table (construction, `rebuild`), so its slots, and
        // the items a rebuild copied into them, are initialised.
        let table = shard.table.load(Ordering::Acquire);
        // SAFETY: a table is released by its shard only through an
        // epoch-deferred function queued after it was replaced, and we are
        // pinned for 'g (I7, M3); a shard's table is never null.
        unsafe { &*table }
    }

    /// The items whose control bytes match `hash`'s, in probe order, as seen now.
    /// Lock-free (M1). Other items may share the byte: callers compare keys.
    #[inline(always)]
    pub(crate) fn candidates<'g>(&self, hash: u64, pinned: &'g Pinned) -> Candidates<'g, I> {
        let index = self.shard_index(hash);
        debug_assert!(index < self.shards().len());
        // `with_capacity` builds a power-of-two count of shards, at least
        // two, and sets `shard_shift` to 64 less its log.
        // SAFETY: so `hash >> shard_shift` is below the shard count.
        let shard = unsafe { self.shards().get_unchecked(index) };
        Candidates::new(Self::shard_table(shard, pinned), hash)
    }

    /// Calls `f` on every item of shard `index`, as seen now. Returns false
    /// if a move (a replacement written to a later group) overlapped the
    /// scan, which may then have shown its key twice or not at all: the
    /// caller discards what `f` made of it and scans again (M8). With a
    /// move under way as it starts, the scan is spoiled already, and is
    /// skipped (`f` never called) unless this is the caller's `last` try.
    pub(crate) fn scan_shard(&self, index: usize, last: bool, f: impl FnMut(&I)) -> bool {
        let shard = &self.shards()[index];
        // Acquire (M8): pairs with the Release store that ended the last
        // move, so a scan from an even count sees every earlier move whole.
        let before = shard.moves.load(Ordering::Acquire);
        if before % 2 == 1 && !last {
            return false;
        }
        let pinned = self.pin();
        let table = self.table_for_read(index, &pinned);
        // Acquire (M1): pairs with the Release stores of the control words
        // that published the items (M2), and orders a move's odd count,
        // which precedes them, before the load below (M8).
        // SAFETY: pinned while `f` runs, and a removed item is dropped only
        // by an epoch-deferred function (I7).
        unsafe { table.each_full_item(Ordering::Acquire, f) };
        drop(pinned);
        // Relaxed (M8): after the Acquire loads above, which order the odd
        // count of any move whose store the scan read before this load.
        let after = shard.moves.load(Ordering::Relaxed);
        before == after && before % 2 == 0
    }

    /// Removes from shard `index` the items `keep` rejects, deciding
    /// without the lock: `keep` runs while the thread is pinned but holds no
    /// lock, then the rejected items still present are removed under the
    /// lock, each passed to `on_remove` after the unlock, under the same pin
    /// (M8, M9). Items are named by the filed bits their hook keeps
    /// (`Relocatable::filed`) and identity, which a rebuild in between does not change; one replaced
    /// or removed meanwhile is left alone. Returns how many it removed.
    pub(crate) fn retain_shard(
        &self,
        index: usize,
        mut keep: impl FnMut(&I) -> bool,
        mut on_remove: impl FnMut(&I, &I::Side),
    ) -> usize {
        // Held until the removals are done, so no identity is reused, and
        // lent to the writer, so what it removes stays readable after the
        // unlock (M9).
        let pinned = self.pin();
        let pin = WritePin::held(&pinned);
        let table = self.table_for_read(index, &pinned);
        let mut doomed = Vec::new();
        // Acquire (M1): as in `scan_shard`.
        table.each_full(Ordering::Acquire, |slot| {
            // SAFETY: as in `scan_shard`.
            let item = unsafe { table.item(slot) };
            if !keep(item) {
                // SAFETY: as for the item.
                let side = unsafe { table.side(slot) };
                doomed.push((u64::from(item.filed(side)), item.identity(side)));
            }
        });
        if doomed.is_empty() {
            return 0;
        }
        let mut writer = self.write_shard(index, &pin);
        // Room for every removal first: nothing allocates (nor so panics)
        // between an unlink and its record.
        let mut removed = Vec::with_capacity(doomed.len());
        for (hash, identity) in doomed {
            removed.extend(writer.remove(hash, |item, side| item.identity(side) == identity));
        }
        // Unlocked first: `on_remove` reads what the writer lent, which
        // outlives it for as long as `pin` lives.
        drop(writer);
        removed
            .iter()
            .for_each(|&(item, side)| on_remove(item, side));
        removed.len()
    }

    /// Removes from shard `index`, under its lock, every item `keep`
    /// rejects, and passes each removed item to `on_remove`, under the
    /// lock (it may clone a key, the one user code allowed under a shard
    /// lock, and nothing more). Counts them as deaths if `deaths` (the
    /// dead entries `purge` removes before their callbacks can). Returns
    /// how many it removed.
    pub(crate) fn retain_locked(
        &self,
        index: usize,
        keep: impl FnMut(&I) -> bool,
        mut on_remove: impl FnMut(&I, &I::Side),
        deaths: bool,
    ) -> usize {
        let pin = WritePin::lazy();
        let mut writer = self.write_shard(index, &pin);
        let removed = writer.retain_all(keep);
        if deaths {
            let shard = writer.shard();
            removed.iter().for_each(|_| shard.count_death());
        }
        removed
            .iter()
            .for_each(|&(item, side)| on_remove(item, side));
        removed.len()
    }

    /// Locks `hash`'s shard for writing (M2), lending the writer `pin`:
    /// what it removes or replaces stays readable while `pin` lives (M9).
    pub(crate) fn write<'g>(&'g self, hash: u64, pin: &'g WritePin<'_>) -> ShardWriter<'g, I> {
        self.write_shard(self.shard_index(hash), pin)
    }

    /// Locks `hash`'s shard for writing if nobody holds its lock, this
    /// thread included: never blocks. `pin` as for [`Self::write`].
    pub(crate) fn try_write<'g>(
        &'g self,
        hash: u64,
        pin: &'g WritePin<'_>,
    ) -> Option<ShardWriter<'g, I>> {
        self.try_write_shard(self.shard_index(hash), pin)
    }

    /// Locks shard `index` for writing if nobody holds its lock, this
    /// thread included: never blocks. `pin` as for [`Self::write`].
    pub(crate) fn try_write_shard<'g>(
        &'g self,
        index: usize,
        pin: &'g WritePin<'_>,
    ) -> Option<ShardWriter<'g, I>> {
        let shard = &self.shards()[index];
        let state = shard.writer.try_lock()?;
        Some(ShardWriter::new(shard, state, pin))
    }

    /// Locks shard `index` for writing. `pin` as for [`Self::write`].
    pub(crate) fn write_shard<'g>(
        &'g self,
        index: usize,
        pin: &'g WritePin<'_>,
    ) -> ShardWriter<'g, I> {
        let shard = &self.shards()[index];
        // Not under loom: one more step a write, in every model, for a
        // check of user code's misuse.
        #[cfg(not(weakrefs_loom))]
        let state = match shard.writer.try_lock() {
            Some(state) => state,
            None => {
                refuse_own_lock(shard);
                shard.writer.lock()
            }
        };
        #[cfg(weakrefs_loom)]
        let state = shard.writer.lock();
        ShardWriter::new(shard, state, pin)
    }
}

/// Panics if this thread holds `shard`'s lock while it runs code that may
/// do more than compare (`WeakValueMap::remove_if`'s predicate): a write
/// there to the same shard would wait for itself for ever. Asked only
/// once the lock was found taken.
#[cfg(not(weakrefs_loom))]
#[cold]
#[inline(never)]
#[track_caller]
fn refuse_own_lock<I: Sided>(shard: &Shard<I>) {
    if crate::marks::holds_locked(std::ptr::from_ref(shard) as usize) {
        panic!(
            "weakrefs: a write to a WeakValueMap inside its own remove_if predicate, \
             to the shard whose lock that predicate runs under: it would wait for itself"
        );
    }
}

impl<I: Sided> ShardedTable<I> {
    /// The shards.
    #[inline(always)]
    fn shards(&self) -> &[CachePadded<Shard<I>>] {
        // SAFETY: allocated at construction and freed only after our drop
        // (`Drop`); nothing takes `&mut` to them.
        unsafe { self.shards.as_ref() }
    }

    /// Total items (live or dead-but-not-yet-removed) across shards.
    pub(crate) fn len(&self) -> usize {
        self.shards()
            .iter()
            // Relaxed: a count; exact once writers are quiet.
            .map(|shard| shard.len.load(Ordering::Relaxed))
            .sum()
    }

    /// Items the shards' current tables hold before one of them grows
    /// (removed items waiting for their slots count against it).
    pub(crate) fn capacity(&self) -> usize
    where
        I: Relocatable + Send + Sync + 'static,
    {
        let pinned = self.pin();
        (0..self.shards().len())
            .map(|index| self.table_for_read(index, &pinned).usable)
            .sum()
    }

    /// Entries deaths have removed ([`Shard::count_death`]).
    pub(crate) fn deaths(&self) -> u64 {
        self.shards()
            .iter()
            // Relaxed: a count; exact once writers are quiet.
            .map(|shard| shard.deaths.load(Ordering::Relaxed))
            .sum()
    }

    /// Number of shards (for iteration).
    pub(crate) fn shard_len(&self) -> usize {
        self.shards().len()
    }

    /// Items in shard `index` (live or dead-but-not-yet-removed), as a
    /// hint: writers may change it at any moment.
    pub(crate) fn shard_items(&self, index: usize) -> usize {
        // Relaxed: a count, for sizing a snapshot's buffer.
        self.shards()[index].len.load(Ordering::Relaxed)
    }

    /// The shard `hash` belongs to: its top bits.
    pub(crate) fn shard_index(&self, hash: u64) -> usize {
        // At least two shards (`shard_count`), so the shift is below 64.
        (hash >> self.shard_shift) as usize
    }
}

impl<I: Sided> Drop for ShardedTable<I> {
    fn drop(&mut self) {
        // `&mut self`: no reader or writer is using our tables any more,
        // since both borrow the `ShardedTable`, but for a dying thread's
        // hook, which reaches its shard without a borrow (M14): each shard
        // is closed under its mutex, so such a hook either removed its
        // entry before we lock, or finds the shard closed and does nothing.
        // Retired tables and pending drops are owned by their deferred
        // functions. A destructor that panics does not stop the others:
        // the first panic is resumed once every item is dropped and every
        // table released.
        let mut first_panic = None;
        for shard in self.shards() {
            let (table, issued) = {
                let mut state = shard.writer.lock();
                state.closed = true;
                // Relaxed: the mutex orders it before any later writer,
                // which finds the shard closed and reads nothing else.
                (
                    shard.table.swap(ptr::null_mut(), Ordering::Relaxed),
                    state.issued,
                )
            };
            // Ours alone now: no writer starts on a closed shard; the
            // current table owns its full slots' items and sides
            // (tombstones' belong to deferred drops).
            // SAFETY: as just said; we drop each once before giving up the
            // shard's reference, less the drops it issued (M9).
            unsafe {
                // Relaxed: the mutex ordered every writer's changes before
                // us. (Deferred drops of this table's tombstones may still
                // be freeing theirs, writing only their `freed` bits.)
                (*table).each_full(Ordering::Relaxed, |index| {
                    let drop_item = || (*table).drop_whole(index);
                    if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(drop_item)) {
                        first_panic.get_or_insert(payload);
                    }
                });
                release(table, SHARD_REF - issued);
            }
        }
        let shards = SendShards(self.shards);
        let anchor = self.anchor.take();
        #[cfg(weakrefs_loom)]
        let released = self.released.clone();
        let free = move || {
            #[cfg(weakrefs_loom)]
            released.set();
            let SendShards(shards) = shards;
            // SAFETY: allocated by `Box` at construction, freed once, here:
            // every shard is closed and its table released.
            drop(unsafe { Box::from_raw(shards.as_ptr()) });
            drop(anchor);
        };
        // Unlinked: every hook whose entry was in the table is detached,
        // above, or was by whoever removed it before our drop began, so no
        // hook can reach a shard, nor the core's block, any more but one
        // that a dying thread found alive after it pinned: its load read
        // the status before that detach, which happens before this fence
        // and the seal of the retirement below, so the retirement waits
        // for that thread to unpin (M14, C20, E2). SeqCst: the fence that
        // argument names, here as well as in the collector's seal.
        // Freeing runs no user code (mutexes, atomics, addresses), nor does
        // dropping the anchor, a `Weak` to a core whose value is being
        // dropped now: it touches the block's counts and, if it is the
        // last, frees the block, never the value.
        // One retirement for both: a second, for the anchor alone, made a
        // loom model (`a_set_dropped_racing_a_member_death_never_reads_its_freed_core`)
        // report itself nondeterministic, for a reason in the epoch's
        // loom build not yet understood.
        crate::sync::fence(Ordering::SeqCst);
        // SAFETY: `Pinned::defer`'s 1 and 2, as just said.
        unsafe { Reclaimer::retire_globally(free) };
        if let Some(payload) = first_panic {
            panic::resume_unwind(payload);
        }
    }
}

/// The shards' allocation, handed to the epoch by `ShardedTable::drop`.
struct SendShards<I: Sided>(NonNull<[CachePadded<Shard<I>>]>);

// SAFETY: owned, and only freed through it (on whichever thread runs the
// epoch's deferred functions); a shard holds atomics, a mutex and an
// address read only, all of which may be dropped anywhere.
unsafe impl<I: Sided> Send for SendShards<I> {}

/// The items of one probe sequence whose control bytes match, group by
/// group.
pub(crate) struct Candidates<'g, I: Sided> {
    table: &'g Table<I>,
    control: u8,
    /// The group loaded last.
    group: usize,
    /// Its matching bytes not yet returned (`bytes::matching`).
    matching: usize,
    /// Its control word, for whether it has an `EMPTY` slot, where no
    /// probe sequence through it goes further: asked only once its
    /// candidates are spent, which a hit seldom reaches.
    word: usize,
    /// Groups not loaded yet before every group has been loaded once.
    left: usize,
}

impl<'g, I: Sided> Candidates<'g, I> {
    #[inline]
    fn new(table: &'g Table<I>, hash: u64) -> Self {
        let mut candidates = Candidates {
            table,
            control: control_of(hash),
            group: table.home(hash),
            matching: 0,
            word: 0,
            left: table.groups() - 1,
        };
        // Only where the table outgrows the caches: in a small one the
        // hint costs more than the misses it would hide.
        if table.groups() >= PREFETCH_GROUPS {
            table.slots.prefetch_group(candidates.group * GROUP);
        }
        candidates.load();
        candidates
    }

    /// Loads the control word of `self.group`.
    #[inline(always)]
    fn load(&mut self) {
        // Acquire (M1, M2): pairs with the Release store of the value we
        // read, which the shard's mutex ordered after every earlier store
        // of the word, those that published the items of the full bytes we
        // see among them.
        debug_assert!(self.group < self.table.groups());
        // SAFETY: `group` comes from `home` or `next`, below the group
        // count: unchecked, as the slots are (`Table::item`).
        let control = unsafe { self.table.control.get_unchecked(self.group) };
        self.word = control.load(Ordering::Acquire);
        self.matching = bytes::matching(self.word, self.control);
    }

    /// The slot of the next candidate.
    #[inline(always)]
    fn next_index(&mut self) -> Option<usize> {
        loop {
            if self.matching != 0 {
                let index = self.group * GROUP + bytes::slot_in_group(self.matching);
                self.matching &= self.matching - 1;
                return Some(index);
            }
            if bytes::empty(self.word) != 0 || self.left == 0 {
                return None;
            }
            self.left -= 1;
            self.group = self.table.next(self.group);
            self.load();
        }
    }

    /// The next candidate and its slot's [`SlotMark`]. Always inlined: it
    /// is the body of every lookup's loop.
    #[inline(always)]
    pub(crate) fn next_marked(&mut self) -> Option<(&'g I, SlotMark<'g, I>)> {
        let index = self.next_index()?;
        // SAFETY: seen full (1); the caller is pinned for 'g or holds the
        // mutex for 'g (a `ShardWriter` borrow) (2).
        let (item, mark) = unsafe { self.table.item_and_mark(index) };
        let mark = SlotMark {
            table: self.table,
            index,
            mark,
        };
        Some((item, mark))
    }
}

/// Where a candidate's mark is, if its table keeps marks (see
/// `MarkedSlot`): a word readers load and stamp and writers store under
/// the shard's lock, carried over by rebuilds; and its item's side. The
/// mark is found with the item, in one look at the slots; the side only
/// when asked for.
pub(crate) struct SlotMark<'g, I: Sided> {
    /// The candidate's table, whose slot `index` the reader saw full while
    /// pinned for 'g (or under the shard's mutex for 'g).
    table: &'g Table<I>,
    index: usize,
    /// The slot's mark, if the table keeps marks: found with the item.
    mark: Option<&'g AtomicU64>,
}

impl<'g, I: Sided> SlotMark<'g, I> {
    /// The mark, if the table keeps marks.
    #[inline]
    pub(crate) fn get(&self) -> Option<&'g AtomicU64> {
        self.mark
    }

    /// The candidate's side.
    #[inline]
    pub(crate) fn side(&self) -> &'g I::Side {
        // SAFETY: made by `next_marked` for a slot seen full, under a pin
        // or the mutex held for 'g (`item`'s 1, 2).
        unsafe { self.table.side(self.index) }
    }
}

impl<'g, I: Sided> Iterator for Candidates<'g, I> {
    type Item = &'g I;

    #[inline]
    fn next(&mut self) -> Option<&'g I> {
        let index = self.next_index()?;
        // SAFETY: as in `next_marked`.
        Some(unsafe { self.table.item(index) })
    }
}

/// A list whose first element is held inline: a write usually lets go of
/// one item at most, and must not allocate to record it.
struct Few<T> {
    first: Option<T>,
    rest: Vec<T>,
}

impl<T> Few<T> {
    const fn new() -> Self {
        Few {
            first: None,
            rest: Vec::new(),
        }
    }

    /// Makes room for one more element: the next `push` cannot allocate
    /// (nor so panic).
    fn reserve_one(&mut self) {
        if self.first.is_some() {
            self.rest.reserve(1);
        }
    }

    fn push(&mut self, value: T) {
        match self.first {
            None => self.first = Some(value),
            Some(_) => self.rest.push(value),
        }
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn into_iter(self) -> impl Iterator<Item = T> {
        self.first.into_iter().chain(self.rest)
    }
}

/// What a write unlinked, released after the shard's mutex is released.
struct Garbage<I: Relocatable> {
    /// Removed items: (their table, their slot). Each holds the drop its
    /// removal issued, a reference to the table (M9).
    items: Few<(*const Table<I>, usize)>,
    /// An item, with its side, that a panic kept from being published;
    /// dropped after the unlock.
    unpublished: Option<(I, I::Side)>,
    /// What only a rebuild leaves, boxed by the first rebuild of the
    /// write: rebuilds are rare, and every other write then makes, checks
    /// and drops a writer five words smaller.
    rebuilt: Option<Box<Rebuilt<I>>>,
}

/// What a writer's rebuilds let go of (see [`Garbage`]).
struct Rebuilt<I: Relocatable> {
    /// Replaced tables, each with the shard's reference to it, the slot of
    /// the item its rebuild left out (whose drop is one of the garbage's
    /// `items`) and the drops issued for its items that the shard's
    /// release leaves out (M9); room for the next one is reserved before
    /// the rebuild's first change.
    tables: Vec<(*const Table<I>, Option<usize>, usize)>,
    /// What the copies of a rebuild that a panic abandoned made afresh;
    /// dropped after the unlock.
    abandoned: Vec<I::LeftBehind>,
}

impl<I: Relocatable> Garbage<I> {
    /// Nothing but removed items (if any): no rebuild, nothing a panic
    /// left behind.
    #[inline]
    fn only_items(&self) -> bool {
        self.rebuilt.is_none() && self.unpublished.is_none()
    }

    /// Where rebuilds record what they let go of; allocated at the first.
    fn rebuilt(&mut self) -> &mut Rebuilt<I> {
        self.rebuilt.get_or_insert_with(|| {
            Box::new(Rebuilt {
                tables: Vec::new(),
                abandoned: Vec::new(),
            })
        })
    }
}

impl<I: Relocatable> Default for Garbage<I> {
    fn default() -> Self {
        Garbage {
            items: Few::new(),
            unpublished: None,
            rebuilt: None,
        }
    }
}

/// The pin a [`ShardWriter`] borrows, as papaya's operations borrow a
/// guard: what the writer removes or replaces is lent as `&'g` references
/// that stay readable after the writer is dropped (unlocked), for as long
/// as this lives (M9).
///
/// Either the caller's own pin, or one taken only when a writer first hands
/// something to the epoch, as it is dropped, after the unlock: most writes
/// (an insert into a free slot) hand nothing over and never pin, as they
/// did before writers borrowed pins. A writer that must pin does so where
/// it pinned before, after the unlock, so no collection step (which runs
/// whatever deferred functions are due) ever runs under the shard's lock.
#[derive(Debug)]
pub(crate) struct WritePin<'p> {
    /// The caller's pin, if it lent one.
    held: Option<&'p Pinned>,
    /// Otherwise ours, once taken.
    taken: OnceCell<Pinned>,
}

impl<'p> WritePin<'p> {
    /// Lends a writer the caller's pin: one pin where the caller reads and
    /// writes, none nested.
    #[inline]
    pub(crate) fn held(pinned: &'p Pinned) -> Self {
        WritePin {
            held: Some(pinned),
            taken: OnceCell::new(),
        }
    }

    /// A pin taken when a writer first needs one (see the type's docs).
    #[inline]
    pub(crate) fn lazy() -> Self {
        WritePin {
            held: None,
            taken: OnceCell::new(),
        }
    }

    /// True if the writer hands what it unlinks to the epoch under the
    /// caller's pin ([`Self::held`]), so that it runs only after the
    /// caller unpins.
    #[inline]
    pub(crate) fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// The pin, taken now with `pin` if there is none yet. It lasts until
    /// `self` is dropped.
    #[inline]
    fn pinned(&self, pin: impl FnOnce() -> Pinned) -> &Pinned {
        if let Some(pinned) = self.held {
            return pinned;
        }
        // `set` and `get` rather than `get_or_init`, whose out-of-line
        // initialisation costs the death path a call.
        if self.taken.get().is_none() {
            // Cannot fail: empty, and `pin` cannot reenter us.
            let _ = self.taken.set(pin());
        }
        self.taken.get().expect("set just above")
    }
}

/// A locked shard. Changes go live as they are made; what they unlinked is
/// handed to the epoch when the writer is dropped, after the mutex is
/// released, under the pin the writer borrows for `'g` (M9).
///
/// One lifetime, `'g`, for the shard, the lock and the pin: what the
/// writer lends (`remove`, `upsert`, `retain_all`) is readable for as long
/// as the pin lives, which the borrow of a [`WritePin`] bounds, and no
/// longer than the shard, which the writer borrows too (a writer made from
/// a `ShardedTable` borrows the table for `'g` as well; a death's hook's
/// borrows only the shard, which the epoch keeps, M14). The lock is
/// released earlier, when the writer is dropped; a second lifetime for it
/// would bound nothing a caller can observe, since the writer itself ends
/// the lock.
pub(crate) struct ShardWriter<'g, I: Relocatable + Send + Sync + 'static> {
    shard: &'g Shard<I>,
    state: Option<ShardGuard<'g, ShardState>>,
    garbage: Garbage<I>,
    pin: &'g WritePin<'g>,
    /// Something removed was lent for `'g` (`lend`): the pin must be
    /// taken before the removals are handed on, wherever they are
    /// deferred.
    lent: bool,
}

impl<I: Relocatable + Send + Sync + 'static> Shard<I> {
    /// What the shard's hooks need of their collection beyond the shard.
    #[inline]
    pub(crate) fn target(&self) -> &HookTarget<I> {
        &self.target
    }

    /// This shard's place among its table's.
    #[inline]
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// Counts an entry a death removed. The caller holds the shard's lock
    /// (a writer of it): the count's only writers do.
    pub(crate) fn count_death(&self) {
        // Relaxed load and store: written under the mutex alone; readers
        // only sum.
        let deaths = &self.deaths;
        deaths.store(deaths.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Locks the shard for a death's removal if nobody holds its lock,
    /// this thread included: never blocks. A closed shard (its table's
    /// owner is gone or going, M14) gives no writer.
    #[inline]
    pub(crate) fn try_write<'g>(&'g self, pin: &'g WritePin<'_>) -> HookWrite<'g, I> {
        match self.writer.try_lock() {
            None => HookWrite::Busy,
            Some(state) if state.closed => HookWrite::Closed,
            Some(state) => HookWrite::Open(ShardWriter::new(self, state, pin)),
        }
    }
}

/// What [`Shard::try_write`] found.
pub(crate) enum HookWrite<'g, I: Relocatable + Send + Sync + 'static> {
    /// The shard's writer, locked.
    Open(ShardWriter<'g, I>),
    /// Another writer holds the lock.
    Busy,
    /// The table's owner has let go of it: there is nothing to remove.
    Closed,
}

impl<'g, I: Relocatable + Send + Sync + 'static> ShardWriter<'g, I> {
    fn new(shard: &'g Shard<I>, state: ShardGuard<'g, ShardState>, pin: &'g WritePin<'_>) -> Self {
        ShardWriter {
            shard,
            state: Some(state),
            garbage: Garbage::default(),
            pin,
            lent: false,
        }
    }

    /// The shard this writer holds locked.
    pub(crate) fn shard(&self) -> &'g Shard<I> {
        self.shard
    }

    /// The shard's table.
    ///
    /// # Safety
    ///
    /// The reference is valid while this writer lives: under the mutex the
    /// current table cannot be replaced by anyone else, and one our own
    /// `rebuild` replaces is released only at the writer's drop. The caller
    /// uses it no longer than that, unless this thread is pinned for `'g`
    /// (then a table replaced after the unlock is freed only once it
    /// unpins, I7), or it passes it only to [`Self::lend`], whose promises
    /// keep what it lends readable for `'g` (the drop the unlink issued,
    /// which keeps the table allocated until it runs, and the pin the
    /// writer takes before handing anything on, M9).
    /// The `'g` in the signature is for those cases, not a promise.
    unsafe fn current_table(&self) -> &'g Table<I> {
        // SAFETY: as the caller promises.
        unsafe { &*self.current_table_ptr() }
    }

    /// The shard's table as a raw pointer, with the provenance of the
    /// allocation: what `release` eventually frees must not be derived
    /// from a shared reference.
    fn current_table_ptr(&self) -> *mut Table<I> {
        // Relaxed: writers are ordered by the mutex.
        self.shard.table.load(Ordering::Relaxed)
    }

    /// The address of the shard this writer holds the lock of: what
    /// `marks::locked` names it by.
    pub(crate) fn shard_address(&self) -> usize {
        std::ptr::from_ref(self.shard) as usize
    }

    /// The shard's writer-side state, under the lock this writer holds.
    fn state(&mut self) -> &mut ShardState {
        self.state.as_mut().expect("locked until dropped")
    }

    fn used(&mut self) -> &mut usize {
        &mut self.state().used
    }

    /// The items whose control bytes match `hash`'s (dead ones included),
    /// under the lock.
    pub(crate) fn candidates(&self, hash: u64) -> Candidates<'_, I> {
        // SAFETY: the iterator borrows the writer: it is used while the
        // writer lives.
        Candidates::new(unsafe { self.current_table() }, hash)
    }

    /// [`Self::candidates`], readable for `'g`, after the unlock too, for
    /// a caller pinned for `'g` (`pinned`, which it may also have lent the
    /// writer through [`WritePin::held`]). The iterator is lazy: what it
    /// yields after the unlock is an ordinary pinned read (M1). What it
    /// yields under the lock is in the current table, none of it unlinked
    /// yet, so its drop, and its
    /// table's release, can only be deferred from now on, while this
    /// thread is pinned, and run once it unpins (M9, I7). `pinned` is the
    /// table's own kind of pin ([`ShardedTable::pin`]), as every pin of the
    /// crate's collections is.
    pub(crate) fn candidates_pinned(&self, hash: u64, _pinned: &'g Pinned) -> Candidates<'g, I> {
        // SAFETY: `pinned` pins this thread for 'g, with the table's own
        // collector (as above).
        Candidates::new(unsafe { self.current_table() }, hash)
    }

    /// Removes the first item of `hash`'s probe sequence that `matches`
    /// (given the item and its side). Returns it and its side, readable
    /// for as long as the writer's pin lives, after the unlock too (M9).
    pub(crate) fn remove(
        &mut self,
        hash: u64,
        matches: impl FnMut(&I, &I::Side) -> bool,
    ) -> Option<(&'g I, &'g I::Side)> {
        // SAFETY: used while this writer lives, and past it only through
        // `lend` (its 1 and 2).
        let table = unsafe { self.current_table() };
        let index = find(table, hash, matches).ok()?;
        self.unlink(index);
        // SAFETY: full until just now, unlinked by us (1), in the current
        // table (2).
        Some(unsafe { self.lend(table, index) })
    }

    /// [`Self::remove`], but what it returns is borrowed from the writer,
    /// readable only until the writer is dropped (while it holds the lock,
    /// nothing it removed is handed to the epoch yet): for a caller that
    /// is done with the item before the unlock, such as the death removal
    /// of an entry whose drop runs user code, whose writer then need not
    /// pin at all (it posts the drop to the finalizer thread, M10).
    pub(crate) fn remove_locked(
        &mut self,
        hash: u64,
        matches: impl FnMut(&I, &I::Side) -> bool,
    ) -> Option<(&I, &I::Side)> {
        // SAFETY: used while this writer lives.
        let table = unsafe { self.current_table() };
        let index = find(table, hash, matches).ok()?;
        self.unlink(index);
        // The writer queues the item's drop only as it is dropped, and the
        // references borrow it.
        // SAFETY: full until just now (`item`'s 1), not dropped while the
        // writer lives (`item`'s 2).
        Some(unsafe { (table.item(index), table.side(index)) })
    }

    /// Slot `index`'s item and side, which this writer has just unlinked
    /// (or left out of a rebuild), lent for the pin's lifetime `'g`.
    ///
    /// Why they outlive the writer (M9): the writer hands their drop to the
    /// epoch only as it is dropped, through `self.pin`, which it pins first
    /// if it is not pinned yet, and which stays pinned for `'g`; the
    /// collector runs a deferred function only after every thread pinned
    /// when it was deferred has unpinned, this one included, forced
    /// flushes too (a bag sealed while we are pinned runs only after we
    /// unpin: `Pinned::flush`, I7, E3). The function also owns
    /// the reference that keeps `table` allocated (`release`), even if a
    /// rebuild by this writer retired it. Until then, nothing writes the
    /// slot: a writer fills only empty slots and free tombstones, which
    /// only that drop frees (M2), a rebuild copies only
    /// full ones, and `ShardedTable::drop`, which drops the full slots of
    /// current tables, waits for the `'g` borrow of the table, or, for a
    /// death's hook's writer, which borrows only its shard, for its unlock,
    /// and takes the table then (M14).
    ///
    /// # Safety
    ///
    /// 1. The caller saw slot `index` of `table` full under this writer's
    ///    lock, and this writer has just unlinked its item (or pushed it to
    ///    `garbage.items` as a rebuild's `without`).
    /// 2. `table` is this writer's current table, or one its own rebuild
    ///    replaced.
    unsafe fn lend(&mut self, table: &'g Table<I>, index: usize) -> (&'g I, &'g I::Side) {
        self.lent = true;
        // SAFETY: seen full (`item`'s 1, our 1); not dropped, nor its slot
        // refilled, nor `table` freed, while the pin lasts (`item`'s 2: the
        // docs above, our 1 and 2).
        unsafe { (table.item(index), table.side(index)) }
    }

    /// Inserts `item` (an item and its side) under `hash`, replacing the
    /// first item of the probe sequence for which `same(old, &item)`.
    /// Returns the replaced item and its side, readable for as long as the
    /// writer's pin lives (M9).
    pub(crate) fn upsert(
        &mut self,
        hash: u64,
        item: (I, I::Side),
        mut same: impl FnMut(&I, &I) -> bool,
    ) -> Option<(&'g I, &'g I::Side)> {
        // SAFETY: used while this writer lives, and past it only through
        // `lend` (its 1 and 2).
        let table = unsafe { self.current_table() };
        // Parked in the garbage while `same` (user code: `Eq`), the
        // allocations and a rebuild's clones run: if one panics, nothing
        // has changed and the item is dropped after the unlock, like
        // everything a writer lets go of (its key's destructor is user code
        // too).
        debug_assert!(
            self.garbage.unpublished.is_none(),
            "a writer is not reused after a panic"
        );
        let (pending, _) = self.garbage.unpublished.insert(item);
        let old = find(table, hash, |old, _| same(old, pending)).ok();
        self.publish_parked(table, hash, old);
        // Unlinked from `table`, or left out of the rebuild that replaced
        // it: `publish_parked` did one or the other.
        // SAFETY: full until just now, and unlinked or left out by us
        // (1); `table` was current when we found it (2).
        old.map(|old| unsafe { self.lend(table, old) })
    }

    /// Publishes the parked item (`garbage.unpublished`) under `hash`, in
    /// place of slot `old` of the current `table` if given: in a vacant
    /// slot, or, if filling an empty one would take the table past 7/8
    /// full, in a rebuilt table with the new item in and the old one out,
    /// published together.
    fn publish_parked(&mut self, table: &Table<I>, hash: u64, old: Option<usize>) {
        // Room for what the removal records, before the first change (a
        // rebuild makes its own).
        if old.is_some() {
            self.garbage.items.reserve_one();
        }
        // A replacement goes in the old item's group or a later one, so
        // that a reader who sees the old slot's tombstone finds it further
        // on, and one who sees the old slot full finds that (M2).
        let start = old.map_or_else(|| table.home(hash), |old| old / GROUP);
        let (index, fresh) = vacancy(table, start);
        if fresh && *self.used() + 1 > table.usable {
            // Relaxed: written under the mutex we hold.
            let items = self.shard.len.load(Ordering::Relaxed);
            let live = items + 1 - usize::from(old.is_some());
            let slots = rebuilt_size(table.slots.len(), *self.used(), items, live);
            let new = Table::with_slots(slots, table.slots.marked());
            self.rebuild(new, Some(hash), old);
        } else {
            let item = self.garbage.unpublished.take().expect("parked");
            match old {
                Some(old) => self.replace(table, index, fresh, hash, item, old),
                None => self.fill(table, index, fresh, hash, item),
            }
        }
    }

    /// Inserts `item` under `hash` unless an item of the probe sequence
    /// `matches`: then nothing changes and `item` is handed back, for the
    /// caller to drop after the unlock. One search where a look under the
    /// lock followed by [`Self::upsert`] makes two.
    pub(crate) fn insert_unless(
        &mut self,
        hash: u64,
        item: (I, I::Side),
        mut matches: impl FnMut(&I) -> bool,
    ) -> Result<(), (I, I::Side)> {
        // SAFETY: used while this writer lives.
        let table = unsafe { self.current_table() };
        // Parked while `matches` (which may be user code) and a rebuild's
        // allocations and clones run, as in `upsert`: if one panics,
        // nothing has changed and the item is dropped after the unlock.
        debug_assert!(
            self.garbage.unpublished.is_none(),
            "a writer is not reused after a panic"
        );
        self.garbage.unpublished = Some(item);
        if find(table, hash, |item, _| matches(item)).is_ok() {
            return Err(self.garbage.unpublished.take().expect("parked above"));
        }
        self.publish_parked(table, hash, None);
        Ok(())
    }

    /// Writes `item` (with its side) into slot `index` of the current
    /// `table`, `EMPTY` if `fresh`, else a dropped tombstone, and publishes
    /// it under `hash`.
    fn fill(&mut self, table: &Table<I>, index: usize, fresh: bool, hash: u64, item: (I, I::Side)) {
        Self::write_item(table, index, fresh, item);
        // Release (M1, M2): publishes the item to readers' Acquire loads of
        // the control word.
        let vacant = if fresh { EMPTY } else { TOMBSTONE };
        table.set_control(index, vacant, control_of(hash), Ordering::Release);
        if fresh {
            *self.used() += 1;
        }
        self.add_len(1);
    }

    /// Writes `item` into slot `index`, `EMPTY` if `fresh`, else a dropped
    /// tombstone (whose `freed` bit it clears), with a fresh mark, all for
    /// the control byte to publish.
    fn write_item(table: &Table<I>, index: usize, fresh: bool, item: (I, I::Side)) {
        // A dropped tombstone's previous item was dropped by a deferred
        // function that no reader which saw it outlived, and whose writes
        // `vacancy`'s Acquire load of its `freed` bit ordered before ours
        // (M2).
        // SAFETY: empty or a dropped tombstone, under the mutex: no reader
        // reads such a slot (it checks the control byte first) and no
        // other writer runs (1); what it held was dropped or moved out (2).
        unsafe { table.write(index, item) };
        if !fresh {
            let (freed, bit) = table.freed_bit(index);
            // A load and a store, not an RMW (M2): a locked instruction on
            // every refill was one insert in churn paid for. A drop that
            // sets its slot's bit in this byte between the two is lost:
            // that tombstone stays pending, skipped until a rebuild, which
            // is safe and rare. Acquire: pairs with the drops' Release RMWs
            // of the bits we carry over, so a writer that later reads them
            // from our store fills those slots after their drops (the
            // mutex orders us before it). Relaxed, the store: read by
            // writers alone, under the mutex; the bit is set again only by
            // the drop of this slot's next item, issued after this (an
            // unlink under the mutex, then the epoch).
            let byte = freed.load(Ordering::Acquire);
            freed.store(byte & !bit, Ordering::Relaxed);
        }
        if let Some(mark) = table.mark(index) {
            // Relaxed: published with the control byte; a new item starts
            // unmarked (M13).
            mark.store(0, Ordering::Relaxed);
        }
    }

    /// Replaces the item of slot `old` of the current `table` by `item`,
    /// written to slot `index`, `EMPTY` if `fresh`, else a dropped
    /// tombstone, in `old`'s group or a later one (M2).
    ///
    /// In `old`'s group, both control bytes change in one Release store of
    /// the group's word: a reader's Acquire load sees the old item full
    /// (and reads it, its drop deferred as `unlink`'s is) or the new one
    /// published and the old slot a tombstone, never both and never
    /// neither (M2, M8). In a later group, a *move*: [`Self::fill`], then
    /// [`Self::unlink`], two stores of two words, bracketed by the shard's
    /// `moves` count for snapshots to check (M8).
    fn replace(
        &mut self,
        table: &Table<I>,
        index: usize,
        fresh: bool,
        hash: u64,
        item: (I, I::Side),
        old: usize,
    ) {
        if old / GROUP != index / GROUP {
            let shard = self.shard;
            let moves = &shard.moves;
            // Relaxed, the load: written under the mutex we hold. Relaxed,
            // the odd store: the Release stores of the control words below
            // carry it to a scan that reads either (M8).
            let count = moves.load(Ordering::Relaxed);
            moves.store(count + 1, Ordering::Relaxed);
            self.fill(table, index, fresh, hash, item);
            // The old item goes only once the new one is visible (M2).
            self.unlink(old);
            // Release (M8): pairs with a scan's first Acquire load of the
            // count, so a scan that starts from it sees the move whole.
            moves.store(count + 2, Ordering::Release);
            return;
        }
        Self::write_item(table, index, fresh, item);
        let full = self.retire_slot(table, old);
        let vacant = if fresh { EMPTY } else { TOMBSTONE };
        // Release (M1, M2): publishes the new item, and the old slot's
        // tombstone, together.
        table.set_controls(
            (index, vacant, control_of(hash)),
            (old, full, TOMBSTONE),
            Ordering::Release,
        );
        if fresh {
            *self.used() += 1;
        }
        // One item in and one out: the shard's count stays.
    }

    /// Adds `delta` to the shard's item count.
    fn add_len(&self, delta: isize) {
        let len = &self.shard.len;
        // Relaxed: the count is read as a statistic, exact when writers are
        // quiet; only writers (ordered by the mutex) store it.
        len.store(
            len.load(Ordering::Relaxed).wrapping_add_signed(delta),
            Ordering::Relaxed,
        );
    }

    /// Turns slot `index` of the current table into a tombstone and queues
    /// its item's drop for after the unlock (M2).
    fn unlink(&mut self, index: usize) {
        // SAFETY: used while this writer lives.
        let table = unsafe { self.current_table() };
        let full = self.retire_slot(table, index);
        // Release (M2): a reader that sees the tombstone goes on along the
        // probe sequence and must find what we published before it, notably
        // the item that replaces this one. (A reader that saw the item
        // before is protected by the epoch: the item's drop is deferred.)
        table.set_control(index, full, TOMBSTONE, Ordering::Release);
        self.add_len(-1);
    }

    /// What an unlink of full slot `index` of `table`, the current table,
    /// does before the store that makes it a tombstone: issues and records
    /// its item's drop for after the unlock. Returns the slot's control
    /// byte, for that store. The slot's `freed` bit is clear, as for every
    /// full slot: its drop is pending until `free_slot` sets it.
    fn retire_slot(&mut self, table: &Table<I>, index: usize) -> u8 {
        let table_ptr = self.current_table_ptr();
        self.garbage.items.reserve_one();
        self.issue_drop(table);
        debug_assert!({
            // Relaxed: a check; the bit of a full slot is ours to change.
            let (freed, bit) = table.freed_bit(index);
            freed.load(Ordering::Relaxed) & bit == 0
        });
        self.garbage.items.push((table_ptr, index));
        let full = table.control_byte(index);
        debug_assert!(is_full(full));
        full
    }

    /// Counts one more deferred drop of an item of `table`, the current
    /// table, whose deferred function will release one of its references
    /// (M9): no reference is taken now, but every `FOLD_EVERY` drops, in
    /// one addition.
    fn issue_drop(&mut self, table: &Table<I>) {
        let state = self.state();
        state.issued += 1;
        if state.issued == FOLD_EVERY {
            // Relaxed: references taken while we hold the shard's, as
            // `Arc::clone` does; `release` orders the free.
            table.refs.fetch_add(FOLD_EVERY, Ordering::Relaxed);
            state.issued = 0;
        }
    }

    /// Removes every item `keep` rejects, under the lock. Returns them and
    /// their sides, readable for as long as the writer's pin lives (M9).
    fn retain_all(&mut self, mut keep: impl FnMut(&I) -> bool) -> Vec<(&'g I, &'g I::Side)> {
        // SAFETY: used while this writer lives, and past it only through
        // `lend` (its 1 and 2).
        let table = unsafe { self.current_table() };
        let mut removed = Vec::new();
        for group in 0..table.groups() {
            // Relaxed: writers are ordered by the mutex. The bytes we change
            // below were loaded before.
            let mut full = bytes::full(table.word(group, Ordering::Relaxed));
            while full != 0 {
                let index = group * GROUP + bytes::slot_in_group(full);
                full &= full - 1;
                // SAFETY: full (1), under the mutex (2).
                if !keep(unsafe { table.item(index) }) {
                    removed.reserve(1);
                    self.unlink(index);
                    // SAFETY: full until just now, unlinked by us (1), in
                    // the current table (2).
                    removed.push(unsafe { self.lend(table, index) });
                }
            }
        }
        removed
    }

    /// Replaces the shard's table with `new` (empty, with room for the
    /// items), holding relocated copies of the items (M3), plus, if
    /// `incoming` names its hash, the item parked in the garbage, and minus
    /// the item in slot `without`, which is dropped once no reader of the
    /// old table can see it. The caller has reserved room for one item in
    /// the garbage if it passes `without`. If a relocation panics (a key's
    /// `Clone`), the copies made so far are taken apart, the old table
    /// stays as it was, and the panic goes on; the parked item is dropped
    /// after the unlock.
    #[cold]
    #[inline(never)]
    fn rebuild(&mut self, new: Box<Table<I>>, incoming: Option<u64>, without: Option<usize>) {
        // Room to record the old table, before the first change.
        self.garbage.rebuilt().tables.reserve(1);
        // SAFETY: used while this writer lives.
        let old = unsafe { self.current_table() };
        let old_ptr = self.current_table_ptr();
        let relocated = panic::catch_unwind(AssertUnwindSafe(|| {
            let mut items = 0;
            for group in 0..old.groups() {
                // The hooks of a group a few ahead, whose filed bits we
                // read then: one node each, wherever it was allocated.
                let ahead = group + REBUILD_AHEAD;
                if ahead < old.groups() {
                    // Relaxed: writers are ordered by the mutex.
                    let mut full = bytes::full(old.word(ahead, Ordering::Relaxed));
                    while full != 0 {
                        let index = ahead * GROUP + bytes::slot_in_group(full);
                        full &= full - 1;
                        // SAFETY: full (1), under the mutex (2).
                        unsafe { old.item(index).prefetch_filed(old.side(index)) };
                    }
                }
                // Relaxed: writers are ordered by the mutex.
                let word = old.word(group, Ordering::Relaxed);
                let mut full = bytes::full(word);
                while full != 0 {
                    let slot = bytes::slot_in_group(full);
                    let index = group * GROUP + slot;
                    full &= full - 1;
                    if Some(index) == without {
                        continue;
                    }
                    // The filed bits, from the item's hook (`Relocatable`),
                    // all that placing it needs.
                    // SAFETY: full (1), under the mutex (2).
                    let hash = unsafe { u64::from(old.item(index).filed(old.side(index))) };
                    // Found first: from `relocate` on, nothing but
                    // `relocate` itself may panic, since dropping the copy
                    // whole would drop pointers the original still owns.
                    let target = first_empty(&new, hash);
                    // The copy is published below, or taken apart if a later
                    // one panics; the original is then dropped only as a
                    // left-behind (`retire`), or whole if this rebuild is
                    // abandoned.
                    // SAFETY: full (1), under the mutex (2); `relocate`'s 1
                    // as just said.
                    let copy = unsafe { I::relocate(old.item(index)) };
                    // Read while readers of the old table may read it too:
                    // never written through a shared reference
                    // (`Relocatable`'s 4). Owned by the copy once it is
                    // published; never dropped through the original, whose
                    // slot is only ever taken apart by `take_left_behind`.
                    // SAFETY: full (1), under the mutex (2).
                    let side = unsafe { ptr::read(old.side(index)) };
                    // SAFETY: empty and unpublished: nobody else reads it
                    // (1); never written before (2).
                    unsafe { new.write(target, (copy, side)) };
                    // Relaxed, both: published by the table's Release store
                    // below.
                    new.set_control(target, EMPTY, control_of(hash), Ordering::Relaxed);
                    if let (Some(from), Some(to)) = (old.mark(index), new.mark(target)) {
                        // Relaxed, both: marks are stored under the shard
                        // lock, which we hold, but for hits' stamps, one of
                        // which racing this copy may be lost (a hint); the
                        // new table is published by the Release store
                        // below (M13).
                        to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                    items += 1;
                }
            }
            items
        }));
        let items = match relocated {
            Ok(items) => items,
            Err(payload) => {
                let mut copies = Vec::new();
                // Relaxed: the new table is ours alone.
                new.each_full(Ordering::Relaxed, |index| copies.push(index));
                let abandoned = &mut self.garbage.rebuilt().abandoned;
                abandoned.reserve_exact(copies.len());
                for index in copies {
                    // Dropped after the unlock.
                    let left = new.slots.slot(index).with(|item| {
                        // SAFETY: a copy never published, whose original the
                        // old table drops whole (1); unseen (2).
                        unsafe { I::take_left_behind((*item).as_ptr()) }
                    });
                    abandoned.push(left);
                }
                // Freeing the slots (`MaybeUninit`) drops nothing more: the
                // sides copied there are the originals' to drop.
                drop(new);
                panic::resume_unwind(payload);
            }
        };
        // Nothing below may panic or allocate: the relocated items must end
        // up published, and the old table retired, together.
        if let Some(hash) = incoming {
            let item = self
                .garbage
                .unpublished
                .take()
                .expect("parked by the caller");
            let target = first_empty(&new, hash);
            // SAFETY: empty and unpublished (1), never written (2).
            unsafe { new.write(target, item) };
            // Relaxed, both: published by the table's Release store below.
            new.set_control(target, EMPTY, control_of(hash), Ordering::Relaxed);
        }
        if let Some(index) = without {
            // As in `unlink`, but the slot stays full in the old table: its
            // readers may still find the item until the new table reaches
            // them. Issued while the old table is still current (M9).
            self.issue_drop(old);
            self.garbage.items.push((old_ptr, index));
        }
        // The shard's reference to the old table, released after the unlock
        // together with what its relocated items left behind, less the
        // drops issued for the old table's items, final now that it stops
        // being current: the new table starts counting afresh (M9).
        let issued = std::mem::take(&mut self.state().issued);
        self.garbage
            .rebuilt()
            .tables
            .push((old_ptr, without, issued));
        // Release (M3): publishes the new table, its slots and their items
        // to readers' Acquire loads of the table pointer.
        self.shard
            .table
            .store(Box::into_raw(new), Ordering::Release);
        let added = usize::from(incoming.is_some());
        *self.used() = items + added;
        self.add_len(added as isize - isize::from(without.is_some()));
    }

    /// Rebuilds the shard's table at the size its live items need, if it
    /// is at least `factor` times larger than that (and larger than the
    /// smallest table): gives back what a past peak, or removed items
    /// waiting for their slots, hold. Relocation clones keys (M3): a
    /// panicking `Clone` leaves the table as it was and goes on.
    pub(crate) fn shrink(&mut self, factor: usize) {
        // SAFETY: used while this writer lives.
        let table = unsafe { self.current_table() };
        // Relaxed: written under the mutex we hold.
        let live = self.shard.len.load(Ordering::Relaxed);
        let wanted = slots_for(live);
        if table.slots.len() <= wanted.saturating_mul(factor) || table.slots.len() <= MIN_SLOTS {
            return;
        }
        let new = Table::with_slots(wanted, table.slots.marked());
        self.rebuild(new, None, None);
    }
}

impl<I: Relocatable + Send + Sync + 'static> Drop for ShardWriter<'_, I> {
    fn drop(&mut self) {
        drop(self.state.take());
        // The common case of a removal apart: one item unlinked, whose drop
        // runs none of the user's code, and nothing else (a death's removal,
        // most replacements). The general path below moves the writer's
        // lists into a `Retired` and looks up the executor, which cost that
        // case about as much as handing the item to the epoch does.
        if !I::drop_runs_user_code()
            && self.garbage.only_items()
            && self.garbage.items.rest.is_empty()
        {
            if let Some((table, index)) = self.garbage.items.first.take() {
                let pinned = self.pin.pinned(Reclaimer::pin_global);
                // SAFETY: unlinked under the mutex just released, with the
                // drop the writer issued for it (as below).
                unsafe { defer_item_drop(pinned, table, index) };
            }
            return;
        }
        let garbage = &mut self.garbage;
        if garbage.items.is_empty() && garbage.only_items() {
            // Most writes (an insert into a free slot) let go of nothing.
            return;
        }
        let (tables, abandoned) = match garbage.rebuilt.take() {
            Some(rebuilt) => {
                let Rebuilt { tables, abandoned } = *rebuilt;
                (tables, abandoned)
            }
            None => (Vec::new(), Vec::new()),
        };
        // After the unlock: user code, dropped here only on a panic's way
        // out (a failed `Eq` or `Clone`), where a panic escaping a drop
        // would abort: each key on its own.
        if garbage.unpublished.is_some() || !abandoned.is_empty() {
            let what = "an unpublished entry's destructor";
            let unpublished = garbage.unpublished.take();
            catch_and_report(what, || drop(unpublished));
            drop_each_and_report(what, abandoned);
        }
        if garbage.items.is_empty() && tables.is_empty() {
            return;
        }
        // Looked up now, not when the functions run: they may run while the
        // process (or a loom model) tears its statics down.
        let executor = Executor::global();
        let retired = Retired {
            items: std::mem::replace(&mut garbage.items, Few::new()),
            tables,
        };
        // Not under loom: a model's collector runs everything it holds when
        // the model ends, and a posted job would run after that collector
        // is gone (the runtime is torn down after it).
        let user_code = cfg!(not(weakrefs_loom))
            && (I::drop_runs_user_code()
                || (!retired.tables.is_empty() && std::mem::needs_drop::<I::LeftBehind>()));
        // Pinned before anything is handed on, and until the `'g` borrow of
        // the pin ends: what `lend` lent stays readable until then, since
        // no function deferred from now on runs before this thread unpins
        // (M9). The caller's pin if it lent one (no pin nested in it), else
        // one taken now, after the unlock, where writers pinned before they
        // borrowed pins; not at all if nothing was lent and the drops are
        // deferred elsewhere.
        if user_code {
            if self.lent {
                self.pin.pinned(Reclaimer::pin_global);
            }
            // Deferred from the finalizer thread, which hands its retired
            // functions over whenever it goes idle: deferred here, they
            // would wait in this thread's bag until it retires more, which
            // an idle thread never does, and with them the user destructors
            // they hand on (M10). Deferring later than the unlink only
            // delays the free; deferring while this thread is pinned (the
            // `WritePin`, pinned just above if we lent anything) delays it
            // past our pin, as M9 requires.
            executor.post(move || {
                let pinned = Reclaimer::pin_global();
                // SAFETY: `Retired::defer`'s conditions held when the
                // writer made it, and nothing since has touched what it
                // names (its functions own their tables' references).
                unsafe { retired.defer(&pinned, executor) };
                drop(pinned);
                if !executor.has_queued_work() {
                    // The last of a burst: push what the burst retired
                    // through now, while this job still counts as pending,
                    // so that a `flush` waiting on it also waits for the
                    // destructors it hands on.
                    crate::reclaim::push_garbage_through();
                }
            });
        } else {
            let pinned = self.pin.pinned(Reclaimer::pin_global);
            // SAFETY: unlinked and replaced under the mutex just released,
            // each with the drop the writer issued for it, or the shard's
            // reference (M9).
            unsafe { retired.defer(pinned, executor) };
        }
    }
}

/// What a writer unlinked (items), each owning the drop the writer issued
/// for it, and replaced (tables), each with the shard's reference and the
/// drops issued for its items, to be handed to the epoch (M9).
struct Retired<I: Relocatable> {
    items: Few<(*const Table<I>, usize)>,
    tables: Vec<(*const Table<I>, Option<usize>, usize)>,
}

// SAFETY: the pointers name tables kept allocated by the references these
// entries own (M9), and what the deferred functions do with the items
// (drop them, or move them out) is sound on any thread for `I: Send`.
unsafe impl<I: Relocatable + Send> Send for Retired<I> {}

impl<I: Relocatable + Send + Sync + 'static> Retired<I> {
    /// Queues a deferred function per removed item (drop it, free its
    /// slot, release the table) and per replaced table (`retire`).
    ///
    /// # Safety
    ///
    /// 1. Each item was unlinked, and each table replaced, under its
    ///    shard's mutex, which is released: no reader that pins from now
    ///    on can reach them.
    /// 2. Each item owns one issued drop of its table, and each table its
    ///    shard's reference, less the drops issued for its items (M9);
    ///    each table's full slots but its `without` hold relocated
    ///    originals.
    unsafe fn defer(self, pinned: &Pinned, executor: Executor) {
        for (table, index) in self.items.into_iter() {
            if !I::drop_runs_user_code() {
                // SAFETY: unlinked (our 1), owning its issued drop (our 2).
                unsafe { defer_item_drop(pinned, table, index) };
                continue;
            }
            // The deferred function owns one issued drop of its table, which
            // keeps the slot allocated until it runs; it moves the item out
            // once (the slot is never read again), frees the slot for reuse,
            // releases the drop's reference
            // (M9), and leaves the item's drop to the finalizer thread: this
            // function runs wherever garbage is collected, which may be
            // inside a lookup or under a shard lock (M10). `I: Send` lets it
            // run anywhere.
            // SAFETY: unlinked, so no reader that pins from now on can reach
            // it (`defer`'s 2, our 1); the slot stays valid until it runs
            // (1, our 2).
            unsafe {
                pinned.defer(move || {
                    let item = (*table).take_whole(index);
                    free_slot(&*table, index);
                    release(table, 1);
                    executor.post(move || {
                        catch_and_report("a removed entry's destructor", || drop(item));
                    });
                });
            }
        }
        for (table, without, issued) in self.tables {
            // The function owns the shard's reference, less the drops
            // issued, and the table's full slots but `without` hold
            // relocated originals (our 2).
            // SAFETY: replaced, so no reader that pins from now on reaches it
            // (our 1); `retire`'s 1 and 2 as just said.
            unsafe { pinned.defer(move || retire(table, without, issued, executor)) };
        }
    }
}

/// Hands the drop of the item a writer unlinked from slot `index` of
/// `table` to the epoch: once no reader can see it, it is dropped in place,
/// its slot freed for reuse and its issued drop's reference to the table
/// released (M2, M9).
///
/// # Safety
///
/// 1. The item's drop runs none of the user's code
///    (`!I::drop_runs_user_code()`).
/// 2. It was unlinked under the shard's mutex, which is released: no reader
///    that pins from now on can reach it.
/// 3. The caller owns the drop issued for this item, one reference to
///    `table` (M9), which it hands to the deferred function.
#[inline]
unsafe fn defer_item_drop<I: Relocatable + Send + Sync + 'static>(
    pinned: &Pinned,
    table: *const Table<I>,
    index: usize,
) {
    debug_assert!(!I::drop_runs_user_code());
    // `I: Send` lets the function run anywhere; the table is kept
    // allocated by the reference it owns (3).
    struct Slot<I: Relocatable>(*const Table<I>, usize);
    // SAFETY: as just said.
    unsafe impl<I: Relocatable + Send> Send for Slot<I> {}
    let slot = Slot(table, index);
    let drop_item = move || {
        let slot = slot;
        // SAFETY: by 2 and 3, ours to drop once, when no reader can see it.
        unsafe { drop_in_place_and_free(slot.0, slot.1) }
    };
    // SAFETY: unreachable by any reader that pins from now on (2); the slot
    // stays valid until the function runs (3).
    unsafe { pinned.defer(drop_item) };
}

/// Drops the unlinked item of slot `index` in place, frees the slot and
/// releases the reference of its issued drop to `table` (M9): what a removed item's
/// deferred function does, once no reader can see the item, when its drop
/// runs none of the user's code.
///
/// # Safety
///
/// 1. The item was unlinked and no reader can see it any more; it is
///    dropped once, here.
/// 2. The caller owns the item's issued drop, one reference to `table`,
///    which this releases.
unsafe fn drop_in_place_and_free<I: Relocatable>(table: *const Table<I>, index: usize) {
    // Our own types only; a panic (none is expected) must neither skip the
    // release nor unwind into the collecting thread.
    catch_and_report("a removed entry's destructor", || {
        // SAFETY: by 1 and 2 (the reference keeps the table allocated).
        unsafe { (*table).drop_whole(index) };
    });
    // SAFETY: as above.
    unsafe {
        free_slot(&*table, index);
        release(table, 1);
    }
}

/// Marks slot `index` of `table`, whose removed item has just been
/// dropped or moved out, a dropped tombstone, which a writer may fill
/// again (M2). Writes only the slot's `freed` bit: the control word is
/// the writers' alone.
fn free_slot<I: Sided>(table: &Table<I>, index: usize) {
    debug_assert!(
        {
            // Relaxed: a check. No writer changes this byte before our store.
            let removed = table.control_byte(index);
            removed == TOMBSTONE || is_full(removed)
        },
        "slot {index}"
    );
    // Release (M2): pairs with the Acquire load in `vacancy`, so the writer
    // that fills the slot again writes after our drop's last access. In a
    // retired table (a tombstone, or the full slot of the item a rebuild
    // left out, dropped whole) nothing is filled again; the RMW is then
    // harmless.
    let (freed, bit) = table.freed_bit(index);
    freed.fetch_or(bit, Ordering::Release);
}

/// Drops what the relocated items of a replaced table left behind (their
/// cloned-from keys), then releases the shard's reference to it.
///
/// # Safety
///
/// 1. The caller owns the shard's reference to `table`, which a rebuild
///    replaced, less the `issued` drops of its items (M9), and no reader
///    can reach it any more.
/// 2. Every full slot but `without` holds an item the rebuild relocated.
unsafe fn retire<I: Relocatable>(
    table: *const Table<I>,
    without: Option<usize>,
    issued: usize,
    executor: Executor,
) {
    if std::mem::needs_drop::<I::LeftBehind>() {
        let mut left = Vec::new();
        // SAFETY: alive while we hold the reference (1).
        let old = unsafe { &*table };
        // Relaxed: written before the table was retired, which the epoch
        // orders before this function; nothing changes a retired table's
        // control words (deferred drops write only `freed` bits).
        old.each_full(Ordering::Relaxed, |index| {
            if Some(index) != without {
                left.push(old.slots.slot(index).with(|item| {
                    // SAFETY: a relocated original (2) whose copy the new
                    // table owns whole; unreachable now (1); taken once.
                    unsafe { I::take_left_behind((*item).as_ptr()) }
                }));
            }
        });
        if I::drop_runs_user_code() {
            // User destructors: on the finalizer thread, as for removed
            // items (M10).
            executor.post(move || drop_each_and_report("a relocated entry's destructor", left));
        } else {
            drop_each_and_report("a relocated entry's destructor", left);
        }
    }
    // SAFETY: ours is the shard's reference less the drops issued (1); the
    // full slots own nothing now (taken above, or `without`'s own drop).
    unsafe { release(table, SHARD_REF - issued) }
}

/// The slot of the first item in `hash`'s probe sequence that `matches`
/// (given the item and its side), or the first empty slot if none does
/// (`None` if the table has no empty slot, which a rebuild prevents).
/// Under the shard mutex.
fn find<I: Sided>(
    table: &Table<I>,
    hash: u64,
    mut matches: impl FnMut(&I, &I::Side) -> bool,
) -> Result<usize, Option<usize>> {
    let control = control_of(hash);
    let mut group = table.home(hash);
    for _ in 0..table.groups() {
        // Relaxed: writers are ordered by the mutex.
        let word = table.word(group, Ordering::Relaxed);
        let mut candidates = bytes::matching(word, control);
        while candidates != 0 {
            let index = group * GROUP + bytes::slot_in_group(candidates);
            candidates &= candidates - 1;
            // SAFETY: full (1), under the mutex (2).
            if matches(unsafe { table.item(index) }, unsafe { table.side(index) }) {
                return Ok(index);
            }
        }
        let empty = bytes::empty(word);
        if empty != 0 {
            return Err(Some(group * GROUP + bytes::slot_in_group(empty)));
        }
        group = table.next(group);
    }
    Err(None)
}

/// The first empty slot of `hash`'s probe sequence. Under the shard mutex,
/// in a table that has one.
fn first_empty<I: Sided>(table: &Table<I>, hash: u64) -> usize {
    match find(table, hash, |_, _| false) {
        Err(Some(index)) => index,
        _ => unreachable!("a table is rebuilt before its last empty slot fills"),
    }
}

/// A slot a writer may fill, in group `start` or the first later group
/// that has one: a dropped tombstone (`false`) if that group has one, else
/// an `EMPTY` one (`true`), which ends every probe sequence through its
/// group. Under the shard mutex, in a table that has an empty slot.
fn vacancy<I: Sided>(table: &Table<I>, start: usize) -> (usize, bool) {
    let mut group = start;
    for _ in 0..table.groups() {
        // Relaxed: only writers change control bytes, and the mutex we hold
        // orders every earlier writer's stores before this load.
        let word = table.word(group, Ordering::Relaxed);
        let tombstones = bytes::tombstones(word);
        if tombstones != 0 {
            // Acquire (M2): pairs with `free_slot`'s Release RMW of the bit
            // we take (through the RMWs of the byte after it, a release
            // sequence, or through the earlier writer whose Acquire load
            // carried the bit into its store), so our fill writes after the
            // deferred drop of the slot's item.
            let freed = table.freed[group].load(Ordering::Acquire);
            let mut tombstones = tombstones;
            while tombstones != 0 {
                let slot = bytes::slot_in_group(tombstones);
                if freed & 1 << slot != 0 {
                    return (group * GROUP + slot, false);
                }
                tombstones &= tombstones - 1;
            }
        }
        let empty = bytes::empty(word);
        if empty != 0 {
            return (group * GROUP + bytes::slot_in_group(empty), true);
        }
        group = table.next(group);
    }
    unreachable!("a table is rebuilt before its last empty slot fills")
}

/// What tests of the collections see of M8's bookkeeping.
#[cfg(all(test, not(weakrefs_loom)))]
impl<I: Sided> ShardedTable<I> {
    /// Shard `index`'s `moves` count.
    pub(crate) fn moves_for_test(&self, index: usize) -> u64 {
        self.shards()[index].moves.load(Ordering::Relaxed)
    }

    /// Leaves every shard's `moves` count odd, as a writer stopped in the
    /// middle of a move would.
    pub(crate) fn stall_moves_for_test(&self) {
        for shard in self.shards() {
            shard.moves.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;

    /// A group's word from its control bytes, slot 0 first.
    fn word_of(controls: &[u8]) -> usize {
        assert_eq!(controls.len(), GROUP);
        controls.iter().enumerate().fold(0, |word, (index, &byte)| {
            word | usize::from(byte) << (8 * index)
        })
    }

    /// The slots `bits` selects.
    fn slots(mut bits: usize) -> Vec<usize> {
        let mut slots = Vec::new();
        while bits != 0 {
            slots.push(bytes::slot_in_group(bits));
            bits &= bits - 1;
        }
        slots
    }

    /// A group with each kind of control byte, the rest empty.
    fn mixed() -> Vec<u8> {
        let mut controls = vec![EMPTY; GROUP];
        controls[..4].copy_from_slice(&[0x15, TOMBSTONE, TOMBSTONE, 0x00]);
        controls
    }

    #[test]
    fn control_bytes_sort_the_slots_of_a_group() {
        let word = word_of(&mixed());
        assert_eq!(slots(bytes::full(word)), [0, 3]);
        assert_eq!(slots(bytes::empty(word)), (4..GROUP).collect::<Vec<_>>());
        assert_eq!(slots(bytes::tombstones(word)), [1, 2]);
        for (index, &byte) in mixed().iter().enumerate() {
            assert_eq!(bytes::byte(word, index), byte);
        }
    }

    #[test]
    fn matching_picks_full_slots_of_the_byte_and_never_others() {
        let word = word_of(&mixed());
        assert_eq!(slots(bytes::matching(word, 0x15)), [0]);
        assert_eq!(slots(bytes::matching(word, 0x00)), [3]);
        assert!(slots(bytes::matching(word, 0x7F)).is_empty());
        // Every byte value against every control: the selected slots
        // include each true match and only full slots.
        for control in 0..=0x7F_u8 {
            for byte in 0..=0xFF_u8 {
                let mut controls = vec![EMPTY; GROUP];
                controls[1] = byte;
                controls[0] = control; // a match below, for the borrow
                let picked = slots(bytes::matching(word_of(&controls), control));
                assert!(picked.contains(&0));
                assert_eq!(picked.contains(&1), is_full(byte) && (byte ^ control) <= 1);
            }
        }
    }

    /// Plain words as items, for tests of the control bytes alone.
    impl Sided for u64 {
        type Side = ();
        type Marks = Infallible;
    }

    #[test]
    fn a_marked_slot_is_its_item_and_its_mark_with_no_padding() {
        // A `WeakValueMap` item of a word-sized key is two words: with its
        // mark, 24 bytes, the side kept apart (lookups probe these slots,
        // so each byte here is paid on every probed line).
        type TwoWords = [usize; 2];
        let word = std::mem::size_of::<usize>();
        assert_eq!(std::mem::size_of::<MarkedSlot<TwoWords>>(), 2 * word + 8);
        assert_eq!(std::mem::align_of::<MarkedSlot<TwoWords>>(), 8.max(word));
        // The sides of a marked table are one per slot, apart.
        impl Sided for TwoWords {
            type Side = usize;
            type Marks = ();
        }
        let table = Table::<TwoWords>::with_slots(GROUP, true);
        match &table.slots.items {
            Items::Marked(slots, _) => assert_eq!(slots.len(), table.slots.sides.len()),
            Items::Plain(_) => panic!("asked for marks"),
        }
        assert!(table.mark(GROUP - 1).is_some());
    }

    #[test]
    fn a_flip_changes_one_byte_and_leaves_its_neighbours() {
        let table = Table::<u64>::with_slots(GROUP, false);
        table.set_control(1, EMPTY, 0x2A, Ordering::Relaxed);
        table.set_control(0, EMPTY, 0x11, Ordering::Relaxed);
        table.set_control(1, 0x2A, TOMBSTONE, Ordering::Relaxed);
        assert_eq!(table.control_byte(0), 0x11);
        assert_eq!(table.control_byte(1), TOMBSTONE);
        table.set_control(1, TOMBSTONE, 0x33, Ordering::Relaxed);
        assert_eq!(table.control_byte(1), 0x33);
        assert_eq!(table.control_byte(GROUP - 1), EMPTY);
    }

    #[test]
    fn a_writer_reuses_only_tombstones_whose_drop_has_run() {
        let table = Table::<u64>::with_slots(GROUP, false);
        for index in 0..3 {
            table.set_control(index, EMPTY, 0x11, Ordering::Relaxed);
            table.set_control(index, 0x11, TOMBSTONE, Ordering::Relaxed);
        }
        // Pending drops everywhere: the first empty slot, past them.
        assert_eq!(vacancy(&table, 0), (3, true));
        // A dropped tombstone comes before any empty slot of its group.
        free_slot(&table, 2);
        assert_eq!(vacancy(&table, 0), (2, false));
        free_slot(&table, 1);
        assert_eq!(vacancy(&table, 0), (1, false));
    }

    #[test]
    fn a_table_rebuilt_while_mostly_dead_doubles_up_to_the_ceiling() {
        // 8 slots, 7 used, 1 item: churn. Doubles, then stops at the ceiling.
        assert_eq!(rebuilt_size(8, 7, 1, 2), 16);
        assert_eq!(rebuilt_size(128, 97, 3, 4), 256);
        assert_eq!(rebuilt_size(256, 193, 3, 4), 256);
        // A table already past the ceiling keeps its size.
        assert_eq!(rebuilt_size(1024, 769, 10, 11), 1024);
    }

    #[test]
    fn a_table_of_live_items_grows_with_them_and_shrinks_to_the_floor() {
        // Mostly live: twice the live items.
        assert_eq!(rebuilt_size(8, 7, 6, 7), 14);
        assert_eq!(rebuilt_size(1000, 751, 700, 701), 1402);
        // Items died, but not under churn: no smaller than the floor once
        // there, and no larger than needed below it.
        assert_eq!(
            rebuilt_size(1000, 751, 400, 20),
            CHURN_FLOOR.max(slots_for(20))
        );
        assert_eq!(
            rebuilt_size(16, 13, 7, 1),
            MIN_SLOTS.max(16.min(CHURN_FLOOR))
        );
    }
}
