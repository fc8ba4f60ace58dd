//! What the collections do alike on top of the shard table: remove an
//! entry when the object it watches dies, and iterate, retain, clear and
//! purge shard by shard (SAFETY.md, section 7: M4, M5, M8, M14).

use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;

use crate::callbacks::{EntryRef, Executor, Hook, HookSite, Parked};
use crate::control::ControlBlock;
use crate::panics::{drop_each_and_report, drop_each_then_resume, FirstPanic};
use crate::raw::table::{
    HookWrite, Relocatable, Shard, ShardWriter, ShardedTable, Sided, WritePin,
};
use crate::reclaim::Pinned;
use crate::strong::Strong;
use crate::sync::yield_now;
#[cfg(weakrefs_loom)]
use crate::sync::{Released, ReleasedFlag};
use crate::weak::{EntryWeak, Weak};

/// An entry that watches one object weakly and goes when it dies.
pub(crate) trait Watching: Relocatable + Send + Sync + 'static {
    /// The type of the watched object.
    type Target: ?Sized + Send + Sync + 'static;

    /// The watched object.
    fn watched(&self) -> &Weak<Self::Target>;

    /// What the entry keeps in its hook's node (`()` if nothing).
    type Payload: Send + Sync + 'static;

    /// The death callback that removes this entry, whose address names
    /// the entry (M4); detached when the entry goes any other way (M5).
    /// In the entry itself or in its slot's `side`.
    fn hook<'a>(&'a self, side: &'a Self::Side) -> &'a Hook<Self::Payload>;
}

/// A collection's shared core: what its removal callbacks reach, when they
/// need more than their shard, through an uncounted [`CoreRef`], so that
/// they never keep it alive (M4, M14).
pub(crate) trait Collection<I: Sided>: Sized + Send + Sync + 'static {
    /// The core's table, made with the core's [`Hooks`].
    fn table(&self) -> &ShardedTable<I>;

    /// Called under the shard's lock for an entry its value's death just
    /// removed; what it returns runs after the unlock, on the finalizer
    /// thread (or where the death is handled after `shutdown`). It may run
    /// the collection's own user code (a key's `Clone`), never the dying
    /// thread's. A collection whose hooks do not hear of deaths
    /// (`hooks(_, false)`) must return `None` here: most of its deaths are
    /// removed on the dying thread (`death_at_shard`), which never calls
    /// this.
    fn died(&self, _item: &I) -> Option<Box<dyn FnOnce() + Send>> {
        None
    }
}

/// The one weak reference a collection's core holds to its own block
/// (type-erased), which lets its hooks name the core by address
/// ([`CoreRef`]) without a count of their own (M14). The core's table
/// keeps it and releases it through the epoch, with its shards, once it
/// has closed every shard and detached every hook still attached
/// (`ShardedTable::drop`): a dying thread that found a hook alive, having
/// pinned before the table detached it, and is still pinned since, finds
/// the block allocated.
pub(crate) struct HookAnchor(
    // Held for its drop alone.
    #[allow(dead_code)] Box<dyn Send + Sync>,
);

/// A hook's name for its collection's core: the address of the core's
/// block, without a count (M14).
struct CoreRef<C> {
    block: NonNull<ControlBlock<C>>,
    #[cfg(weakrefs_loom)]
    released: Released,
}

// SAFETY: an address, read only through `upgrade`, which hands out a
// `Strong<C>` (`C: Send + Sync`) on whichever thread runs the hook.
unsafe impl<C: Send + Sync + 'static> Send for CoreRef<C> {}
// SAFETY: as for `Send`; `upgrade` takes `&self` and only reads the block.
unsafe impl<C: Send + Sync + 'static> Sync for CoreRef<C> {}

impl<C: Send + Sync + 'static> CoreRef<C> {
    /// The core `target` names: `target` is from `hooks::<C, _>`.
    fn from_target<I>(target: &HookTarget<I>) -> Self {
        CoreRef {
            block: target.core.cast(),
            #[cfg(weakrefs_loom)]
            released: target.released.clone(),
        }
    }

    /// The core, if it is still alive.
    ///
    /// # Safety
    ///
    /// 1. The calling thread found the hook whose shard's target `self`
    ///    comes from alive after it pinned (`Reclaimer::pin_global`), and is
    ///    pinned still (C20, M14). (Under loom, during the collector's teardown, it is
    ///    not pinned: no other thread is left, and every table dropped by
    ///    then has detached its hooks before its anchor went.)
    #[inline]
    unsafe fn upgrade(&self) -> Option<Strong<C>> {
        #[cfg(weakrefs_loom)]
        self.released.check("its core's freed block");
        // By 1 the core's anchor, which keeps the block allocated, was not
        // retired (with the table's shards) before the pin, or not yet at
        // all (M14). `ManuallyDrop`:
        // this `Weak` borrows the anchor's count and gives nothing back.
        ManuallyDrop::new(Weak::from_block(self.block)).upgrade()
    }
}

/// An entry's death callback, kept in its slot's side (a `WeakValueMap`
/// entry's, a `WeakSet` member's), which removes the entry (M4); detached
/// when the entry is removed any other way (M5), and when it is dropped
/// (which covers the collection being dropped: a hook whose death's
/// removal found its entry is claimed, and detaching it is a no-op; one
/// whose removal found nothing, was posted or parked, is settled here,
/// C20). Its node is the
/// entry's one allocation, and its address the entry's identity. The
/// table keeps it beside the item, where writers (and a map's keep-warm
/// tier) find it and lookups never look.
pub(crate) struct EntryHook(pub(crate) Hook);

impl Drop for EntryHook {
    fn drop(&mut self) {
        self.0.detach();
    }
}

impl EntryHook {
    /// Drops an entry's hook, then the entry's `Weak` for the references
    /// the hook says it stands for (C21): its own, and its object's
    /// implicit weak if the object's death handed it over: how
    /// `WeakValueMap`'s and `WeakSet`'s entries drop (the map's before its
    /// key). `WeakKeyMap`'s hook holds its key, and its item drops both
    /// in its own `Drop`.
    ///
    /// # Safety
    ///
    /// Both are initialised and owned by the caller, each dropped or moved
    /// out here once and not used after.
    #[inline]
    pub(crate) unsafe fn drop_with_weak<T: ?Sized>(
        hook: *mut EntryHook,
        weak: *const EntryWeak<T>,
    ) {
        // Read before the hook goes, and its node with it.
        // SAFETY: initialised (the caller's promise).
        let refs = unsafe { (*hook).0.watched_refs() };
        // SAFETY: owned, dropped or moved out once, not used after (the
        // caller's promise).
        unsafe {
            std::ptr::drop_in_place(hook);
            std::ptr::read(weak).release(refs);
        }
    }
}

/// Registers on `object` the hook that removes from `core`'s table the
/// entry filed under `hash` that holds this very hook, and only that one:
/// a newer entry under the same key has a hook of its own and survives
/// (M4). The hook's address names the entry: it is reserved while the
/// entry holds the hook, and the hook runs with a borrowed handle to
/// itself, so the callback needs no handle to `object`. It names the
/// entry's shard by an uncounted address (M14), and does nothing once the
/// collection has closed it. The hook keeps `payload` in place for the
/// entry (see `Hook::payload`).
///
/// The callback runs on the thread that drops the object's last `Strong`
/// (C14, M10), which must not block or run user code there:
///
/// * it takes the shard's lock only if it is free (the dying thread may
///   hold it already, when a drop happens inside user `Eq` under a write),
///   else posts the removal, which may wait for the lock, to the finalizer
///   thread, with a second handle to the hook that keeps its address
///   reserved until then; after `shutdown` there is none, and the dead
///   entry stays, out of sight of lookups, until `purge`, `retain` or
///   `clear`;
/// * it never lets go of the last handle to the collection there: that
///   would drop every key (user code) on the dying thread. (After
///   `shutdown`, posted work runs inline, so then it does.)
#[inline]
pub(crate) fn remove_on_death<C, I>(
    core: &Strong<C>,
    hash: u64,
    object: &Strong<I::Target>,
    payload: I::Payload,
) -> Hook<I::Payload>
where
    C: Collection<I>,
    I: Watching,
{
    let removal = core.table().removal_for_hook(hash);
    Strong::callback_list(object).register_hook(payload, removal)
}

/// Counts the hook that a removal (`remove`, `remove_if`, a replacing
/// insert, `retain`) has just detached from `object`'s callback list towards that
/// list's next compaction (`ObjectCallbacks::note_detached`, C5): else an
/// object that lives on keeps the detached nodes of the entries it had at
/// a past peak. Called after the shard's lock is released, with `object`
/// held: a compaction this starts then happens-before its death (C6).
#[inline]
pub(crate) fn note_detached<T: ?Sized>(object: &Strong<T>) {
    Strong::callback_list(object).note_detached();
}

/// What a death does at a shard of a table of `I` (its [`HookSite`], at
/// the head of the shard's [`HookTarget`]): removes the entry whose hook
/// is `hook`, filed under `key` (the filed bits of its hash, all a hook
/// keeps: probing needs no more, but the shard is this one, not the one
/// `key`'s top bits, all clear, would pick), on the dying thread, as
/// [`remove_on_death`] describes.
///
/// # Safety
///
/// As `callbacks::entry::HookRun`: `site` is a `Removal`'s, made by the
/// table for the shard it heads, and the calling thread found `hook` alive
/// after it pinned, and is pinned still (C14, C20, M14).
unsafe fn death_at_shard<I: Watching>(
    site: NonNull<HookSite>,
    key: u64,
    hook: &EntryRef,
    death: Option<&Pinned>,
) {
    // The site heads the shard's target, which heads the shard (`repr(C)`
    // both), and the pointer carries the whole shard's provenance
    // (`ShardedTable::removal_for_hook`); the shard is one of a table of
    // `I` (this function is the site its target was made with, `hooks::<_,
    // I>`), and the epoch keeps it allocated while we stay pinned (M14).
    // SAFETY: as just said.
    let shard = unsafe { site.cast::<Shard<I>>().as_ref() };
    debug_assert!(
        key <= u64::from(u32::MAX),
        "a hook's key, its filed bits alone"
    );
    let target = shard.target();
    if !target.hears_deaths {
        let pin = death_pin::<I>(death);
        // Here, with no count on the core: the shard's lock is what keeps
        // the table's owner from dropping it meanwhile, and a closed shard
        // has nothing left to remove (M14). The writer is borrowed, and
        // dropped (unlocked) in place at the end of the statement: moving
        // it into a closure or a function copies it whole, on every death.
        let done = match &mut shard.try_write(&pin) {
            HookWrite::Open(writer) => {
                let removed = remove_holding(writer, key, hook.address()).is_some();
                // Only when the writer defers under the dying thread's pin
                // (`death_pin` lends it unless the drop runs user code,
                // which goes through the finalizer thread, M10): the
                // entry's drop then follows that thread's unpin, and so
                // its `forget_if_folded`. `hook` is the list's reference,
                // which `on_death` lent us and passes to that after this
                // run, still pinned as it was when it found the hook alive.
                if removed && pin.is_held() {
                    // SAFETY: as just said (1); we unlinked the entry whose
                    // `Hook` is this node's, and the writer defers its drop
                    // under that pin as it drops, below (2).
                    unsafe { hook.fold() };
                }
                true
            }
            HookWrite::Closed => true,
            HookWrite::Busy => false,
        };
        drop(pin);
        if done {
            return;
        }
    }
    // SAFETY: `target` is the collection's (`hooks`), whose block its
    // anchor keeps allocated for as long as we stay pinned (M14); `hook`
    // is borrowed for the call.
    unsafe { (target.slow)(target, shard.index(), key, hook, death) }
}

/// What a collection's death callbacks need of it beyond their shard
/// (M14): whether it hears of deaths, and the way to a counted handle to
/// its core, for the removals that cannot be done on the dying thread at
/// once. Made with the collection ([`hooks`]), kept in each of its
/// shards, never changed. It heads the shard (`repr(C)`, as the shard),
/// and the site its hooks name heads it.
#[repr(C)]
pub(crate) struct HookTarget<I> {
    /// `death_at_shard::<I>`: what a death does at the shard, first.
    site: HookSite,
    /// The core's block (a `ControlBlock<C>`), type-erased.
    core: NonNull<()>,
    /// `slow_death::<C, I>`: what a death's removal does with a counted
    /// handle to the core.
    slow: unsafe fn(&HookTarget<I>, usize, u64, &EntryRef, Option<&Pinned>),
    /// The collection hears of each entry a death removes (a removal
    /// listener): such removals then run on the finalizer thread, where
    /// the listener may run, instead of on the dying thread.
    hears_deaths: bool,
    /// Under loom, the table's flag ([`Released`]).
    #[cfg(weakrefs_loom)]
    released: Released,
    /// For the items of a table of `I` only: `slow` was made for them.
    _items: PhantomData<fn() -> I>,
}

impl<I> Clone for HookTarget<I> {
    fn clone(&self) -> Self {
        HookTarget {
            site: self.site,
            core: self.core,
            slow: self.slow,
            hears_deaths: self.hears_deaths,
            #[cfg(weakrefs_loom)]
            released: self.released.clone(),
            _items: PhantomData,
        }
    }
}

// SAFETY: an address and two functions, read only; the address is used only
// by `slow_death`, which hands out a `Strong<C>` (`C: Send + Sync`) on
// whichever thread runs the hook.
unsafe impl<I> Send for HookTarget<I> {}
// SAFETY: as for `Send`.
unsafe impl<I> Sync for HookTarget<I> {}

/// What the hooks of the collection being built in `Strong::new_cyclic`
/// reach its core by (M14), for its table to keep: `core` is that call's
/// `Weak`, whose block the anchor keeps allocated. `hears_deaths`: the
/// collection hears of each entry a death removes (its
/// [`Collection::died`] may return something), so its deaths take the
/// slower way, where `died` is called.
pub(crate) fn hooks<C, I>(core: &Weak<C>, hears_deaths: bool) -> Hooks<I>
where
    C: Collection<I>,
    I: Watching,
{
    // The site heads the target, as `repr(C)` promises: checked where
    // the site is made.
    const { assert!(std::mem::offset_of!(HookTarget<I>, site) == 0) };
    #[cfg(weakrefs_loom)]
    let released = ReleasedFlag::new();
    Hooks {
        target: HookTarget {
            site: HookSite::new(death_at_shard::<I>),
            core: core
                .block()
                .expect("`new_cyclic`'s `Weak` names the block")
                .cast(),
            slow: slow_death::<C, I>,
            hears_deaths,
            #[cfg(weakrefs_loom)]
            released: released.clone(),
            _items: PhantomData,
        },
        anchor: HookAnchor(Box::new(core.clone())),
        #[cfg(weakrefs_loom)]
        released,
    }
}

/// A collection's hooks' way to its core, which its table keeps: the
/// target each shard holds, and the anchor released with the shards.
pub(crate) struct Hooks<I> {
    pub(crate) target: HookTarget<I>,
    pub(crate) anchor: HookAnchor,
    /// Under loom, the flag the release sets ([`Released`]).
    #[cfg(weakrefs_loom)]
    pub(crate) released: Released,
}

/// A death's removal that takes a counted handle to the collection's core:
/// where the collection hears of deaths (a removal listener), or the
/// shard was busy, or after `shutdown`. The entry is `hook`'s, filed under
/// `key` (its hash's filed bits) in the shard of index `shard`.
///
/// # Safety
///
/// 1. The calling thread runs the hook `hook` (borrowed for the call),
///    which it found alive after it pinned, and is pinned still (C20,
///    M14); `target`
///    is from [`hooks::<C, I>`].
unsafe fn slow_death<C, I>(
    target: &HookTarget<I>,
    shard: usize,
    key: u64,
    hook: &EntryRef,
    death: Option<&Pinned>,
) where
    C: Collection<I>,
    I: Watching,
{
    let collection = CoreRef::<C>::from_target(target);
    // SAFETY: the caller's 1 (M14).
    let Some(core) = (unsafe { collection.upgrade() }) else {
        return;
    };
    let executor = Executor::global();
    // Here, if nothing must hear of it; after `shutdown` there is nowhere
    // else, so here in any case, but never waiting for the lock.
    let here = !target.hears_deaths || executor.is_closed();
    let removed_here = here && {
        let pin = death_pin::<I>(death);
        let removal = core
            .table()
            .try_write_shard(shard, &pin)
            .as_mut()
            .map(|writer| {
                remove_holding(writer, key, hook.address()).and_then(|item| core.died(item))
            });
        drop(pin);
        match removal {
            Some(notice) => {
                // Posted: after `shutdown` it runs here all the same, with
                // its panic caught and counted as any callback's.
                notice.into_iter().for_each(|notice| executor.post(notice));
                true
            }
            None => false,
        }
    };
    if !removed_here && !executor.is_closed() {
        // A second handle to the hook keeps its address, the entry's
        // identity, reserved until the posted removal has run.
        let hook = hook.clone();
        executor.post(move || {
            // Inline if shutdown closed the queue meanwhile: then this
            // runs where the death happened, and must not wait; parked if
            // the lock is taken (C19).
            let executor = Executor::global();
            if !remove_at(&core, shard, key, &hook, !executor.is_closed()) {
                executor.park(parked_removal(Strong::downgrade(&core), shard, key, hook));
            }
        });
        return;
    }
    if !removed_here {
        // After `shutdown`, the shard busy: parked (C19), holding the
        // core only weakly, so that a collection dropped meanwhile goes.
        executor.park(parked_removal(
            Strong::downgrade(&core),
            shard,
            key,
            hook.clone(),
        ));
    }
    if executor.is_closed() {
        // Deaths after `shutdown` try the parked removals again, so that
        // shards busy for a moment leave none waiting for long.
        executor.try_parked();
    }
    // The collection may have been dropped meanwhile: if ours is the
    // last handle, its drop goes to the finalizer thread.
    if let Some(last) = Strong::drop_unless_last(core) {
        executor.post(move || drop(last));
    }
}

/// Removes the entry of `hook` (filed under `key`) from shard `shard` of
/// `core`'s table, waiting for the shard's lock if `wait`, and reports the
/// removal to `core`'s listener, if any. False if not allowed to wait and
/// the lock is taken: then nothing changed.
fn remove_at<C, I>(core: &Strong<C>, shard: usize, key: u64, hook: &EntryRef, wait: bool) -> bool
where
    C: Collection<I>,
    I: Watching,
{
    // Pinned only once the lock is ours (`write` may wait for it).
    let pin = WritePin::lazy();
    let writer = if wait {
        Some(core.table().write_shard(shard, &pin))
    } else {
        core.table().try_write_shard(shard, &pin)
    };
    let Some(notice) = writer.map(|mut writer| {
        remove_holding(&mut writer, key, hook.address()).and_then(|item| core.died(item))
    }) else {
        return false;
    };
    drop(pin);
    if let Some(notice) = notice {
        notice();
    }
    true
}

/// A death's removal after `shutdown` whose shard was busy, parked (C19):
/// it holds the collection's core weakly (if the collection is gone, there
/// is nothing left to remove) and a second handle to the hook, which keeps
/// the hook's address, the entry's identity, reserved until it has run.
fn parked_removal<C, I>(core: Weak<C>, shard: usize, key: u64, hook: EntryRef) -> Parked
where
    C: Collection<I>,
    I: Watching,
{
    Parked::new(move |wait| match core.upgrade() {
        Some(core) => {
            let removed = remove_at(&core, shard, key, &hook, wait);
            // Maybe the last handle to the collection: its drop runs here,
            // as any work posted after `shutdown` does.
            drop(core);
            removed
        }
        None => true,
    })
}

/// The pin a death's writer on the dying thread uses: the dying thread's
/// own, `death`, lent, since the writer hands the removed entry to the
/// epoch under it (a removal is what nearly always happens, and
/// `try_write` never waits, so the pin is needed, and `on_death` holds one
/// already: tables reclaim through the process-wide collector, which it
/// pins). A lazy one if the entry's drop runs user code: that writer posts
/// it to the finalizer thread and, as the removal borrows nothing past the
/// unlock, needs no pin; or if there is none to lend (under loom once its
/// collector is torn down: the writer then pins if it must).
fn death_pin<'p, I: Watching>(death: Option<&'p Pinned>) -> WritePin<'p> {
    match death {
        Some(pinned) if !I::drop_runs_user_code() => WritePin::held(pinned),
        _ => WritePin::lazy(),
    }
}

/// Removes, under `writer`, the entry filed under `hash` whose hook is
/// `hook`, and counts the death; its drop follows once no reader can see
/// it and the writer is dropped (M2). Returns the removed item, for the
/// collection to make of it what it will (`Collection::died`) under the
/// lock.
fn remove_holding<'w, I: Watching>(
    writer: &'w mut ShardWriter<'_, I>,
    hash: u64,
    hook: usize,
) -> Option<&'w I> {
    let shard = writer.shard();
    // Used under the lock only: borrowed from the writer, not lent.
    let (item, side) =
        writer.remove_locked(hash, |item, side| item.hook(side).identity() == hook)?;
    // Found in the table, under the lock: the hook is ours to claim, with
    // a store (C20). Its death ran it unclaimed, and nothing else settles
    // a hook before its entry leaves the table, which we are doing.
    item.hook(side).claim_by_removal();
    shard.count_death();
    Some(item)
}

/// Iterates `table` shard by shard, snapshotting one shard at a time
/// through `project` (M8): a long iteration never holds a pin for long.
pub(crate) fn snapshots<'a, I, T: 'a>(
    table: &'a ShardedTable<I>,
    project: impl FnMut(&I) -> Option<T> + 'a,
) -> impl Iterator<Item = T> + 'a
where
    I: Watching,
{
    Snapshots {
        table,
        project,
        next_shard: 0,
        batch: Vec::new(),
    }
}

/// The iterator of [`snapshots`]: one buffer for every shard's snapshot,
/// so an iteration allocates once (or a few times, if a later shard holds
/// more), not once per shard and again as each snapshot grows.
struct Snapshots<'a, I: Sided, T, P> {
    table: &'a ShardedTable<I>,
    project: P,
    /// The shard to snapshot once `batch` is empty.
    next_shard: usize,
    /// The current shard's snapshot, yielded from the back by `pop` (no
    /// order is promised, and reversing it would cost a pass).
    batch: Vec<T>,
}

impl<I, T, P> Iterator for Snapshots<'_, I, T, P>
where
    I: Watching,
    P: FnMut(&I) -> Option<T>,
{
    type Item = T;

    #[inline]
    fn next(&mut self) -> Option<T> {
        loop {
            if let Some(item) = self.batch.pop() {
                return Some(item);
            }
            if self.next_shard == self.table.shard_len() {
                return None;
            }
            let shard = self.next_shard;
            self.next_shard += 1;
            fill_snapshot(self.table, shard, &mut self.project, &mut self.batch);
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let upper = (self.next_shard == self.table.shard_len()).then_some(self.batch.len());
        (self.batch.len(), upper)
    }
}

/// Drops what was snapshotted but never yielded each on its own: a value
/// may be a last handle whose destructor panics, and an iteration dropped
/// while a panic unwinds (the caller's loop body's, or a key's `Clone`
/// in `next`) would abort on a second panic from dropping a `Vec` whole.
/// Then such panics are reported; otherwise the first is resumed once
/// every entry is dropped.
impl<I: Sided, T, P> Drop for Snapshots<'_, I, T, P> {
    fn drop(&mut self) {
        // The end of a read: deaths here never wait for the backlog (C18).
        let batch = &mut self.batch;
        crate::callbacks::reading(|| {
            drop_each_then_resume("an unyielded entry's destructor", batch.drain(..));
        });
    }
}

/// What `project` makes of shard `shard`'s items, under one short pin.
#[cfg(feature = "rayon")]
pub(crate) fn shard_snapshot<I, T>(
    table: &ShardedTable<I>,
    shard: usize,
    mut project: impl FnMut(&I) -> Option<T>,
) -> Vec<T>
where
    I: Watching,
{
    // If `project` panics, what it made is dropped each on its own.
    let mut batch = DropEach::new("an unyielded entry's destructor");
    fill_snapshot(table, shard, &mut project, &mut batch.items);
    std::mem::take(&mut batch.items)
}

/// Scans of one shard a snapshot tries again while moves spoil them, at
/// most (M8): a reader never waits for a writer, so against one paused in
/// the middle of a move, or one moving keys of the shard as fast as it is
/// scanned, it keeps the last scan as it is. (The docs of the collections'
/// `iter` say "up to eight times".)
const MOVE_RETRIES: usize = 8;

/// Appends to `batch` what `project` makes of shard `shard`'s items, under
/// one short pin, with room reserved first for the items the shard counts
/// (an upgrade per item is what a snapshot costs, not the buffer's growth).
/// A scan that a move overlapped may show the moved key twice or not at
/// all: what it made is dropped and the shard scanned again (M8).
fn fill_snapshot<I, T>(
    table: &ShardedTable<I>,
    shard: usize,
    project: &mut impl FnMut(&I) -> Option<T>,
    batch: &mut Vec<T>,
) where
    I: Watching,
{
    let start = batch.len();
    // A discarded entry's destructor may panic (user code: a key, or a
    // value whose last handle it was): the panic waits until the shard's
    // snapshot is made, so that the caller, if it goes on iterating, loses
    // no entry of the shard.
    let mut panics = FirstPanic::default();
    for scan in 0..=MOVE_RETRIES {
        let last = scan == MOVE_RETRIES;
        batch.reserve(table.shard_items(shard));
        let whole = table.scan_shard(shard, last, |item| {
            if let Some(projected) = project(item) {
                batch.push(projected);
            }
        });
        if whole || last {
            break;
        }
        // Unpinned: the values may be last handles, whose drop removes
        // their entries. Each on its own, as user code (keys, values). A
        // read: their deaths never wait for the backlog (C18).
        crate::callbacks::reading(|| {
            for discarded in batch.drain(start..) {
                panics.drop_step("a discarded snapshot's entry", discarded);
            }
        });
        // A writer descheduled in the middle of a move spoils every scan
        // until it runs again: let it, if it waits for this processor.
        yield_now();
    }
    panics.resume();
}

/// Keeps the entries whose object is alive and for which `keep` returns
/// true; removes the others, detaching their callbacks. `keep` runs once
/// per live entry, without any lock (M8); a panic there ends the call
/// (what earlier shards removed stays removed). The objects upgraded to
/// call it are dropped after each shard's lock: they may be the last
/// handles. Every removed entry is detached and passed to `removed`, even
/// after one of those calls, or an object's destructor, panics: the first
/// such panic is resumed once every shard is done (M5: a removed entry's
/// callback must not outlive the collection attached).
pub(crate) fn retain_live<I: Watching>(
    table: &ShardedTable<I>,
    mut keep: impl FnMut(&I, &I::Target) -> bool,
    mut removed: impl FnMut(&I, &I::Side),
) {
    let mut panics = FirstPanic::default();
    for shard in 0..table.shard_len() {
        let mut held = DropEach::new("an object's destructor");
        table.retain_shard(
            shard,
            |item| match item.watched().upgrade() {
                Some(object) => {
                    // Held first: if `keep` panics, the unwinding drops it
                    // with the others, each on its own (`DropEach`).
                    held.items.push(object);
                    keep(item, held.items.last().expect("just pushed"))
                }
                None => false,
            },
            |item, side| {
                item.hook(side).detach();
                // Counted as `remove` counts it. The object, if alive, is
                // held in `held` too: this upgrade's drop is never its
                // last (C6: held while it counts).
                if let Some(object) = item.watched().upgrade() {
                    note_detached(&object);
                }
                panics.run("a removed entry's report", || removed(item, side));
            },
        );
        let objects = held.items.drain(..);
        panics.run("an object's destructor", || {
            drop_each_then_resume("an object's destructor", objects);
        });
    }
    panics.resume();
}

/// Drops each of its items on its own if it is dropped with any left
/// (while a panic unwinds past it), reporting their panics as `what`'s: a
/// second panic during the unwinding would abort the process.
struct DropEach<T> {
    what: &'static str,
    items: Vec<T>,
}

impl<T> DropEach<T> {
    fn new(what: &'static str) -> Self {
        DropEach {
            what,
            items: Vec::new(),
        }
    }
}

impl<T> Drop for DropEach<T> {
    fn drop(&mut self) {
        drop_each_and_report(self.what, self.items.drain(..));
    }
}

/// A table this many times larger than its live items need is rebuilt
/// smaller by `clear` and `purge`.
const OVERSIZED: usize = 4;

/// Removes every entry, detaching their callbacks, and shrinks tables
/// left far larger than needed. `noted` sees each removed entry under its
/// shard's lock (it may clone a key, nothing more), and `after` gets what
/// it returned once the shard is unlocked.
pub(crate) fn clear<I: Watching, T>(
    table: &ShardedTable<I>,
    noted: impl FnMut(&I, &I::Side) -> Option<T>,
    after: impl FnMut(T),
) {
    remove_where(table, |_| true, noted, after, false);
}

/// Removes the entries whose objects are dead now, without waiting for
/// their callbacks, counting each as a death (the callback, which would
/// have, finds nothing), and shrinks tables left far larger than needed.
/// Returns how many it removed. `noted` and `after` as for [`clear`].
pub(crate) fn purge<I: Watching, T>(
    table: &ShardedTable<I>,
    noted: impl FnMut(&I, &I::Side) -> Option<T>,
    after: impl FnMut(T),
) -> usize {
    remove_where(table, |item| !item.watched().is_alive(), noted, after, true)
}

/// Removes, shard by shard under each shard's lock, the entries `doomed`
/// picks, detaching their callbacks there and then, and shrinks tables
/// left far larger than needed; returns how many it removed. `noted` and
/// `after` as for [`clear`]. The detach happens under the lock, not in the
/// entry's deferred drop: the object may be dying (its count at zero, its
/// callbacks not yet run, which is what `purge` looks for), and a hook
/// still attached when the collection drops could be found alive, and run,
/// after the table's shards and the core's anchor are released (M5, M14).
/// So a
/// panic in `noted` (which should not panic) or `after` (a listener, a
/// destructor) skips nothing: each is caught, every entry is detached and
/// every notice passed on, every shard is done, and then the first panic
/// is resumed.
fn remove_where<I: Watching, T>(
    table: &ShardedTable<I>,
    mut doomed: impl FnMut(&I) -> bool,
    mut noted: impl FnMut(&I, &I::Side) -> Option<T>,
    mut after: impl FnMut(T),
    deaths: bool,
) -> usize {
    let mut panics = FirstPanic::default();
    let removed = (0..table.shard_len())
        .map(|shard| {
            let mut notices = DropEach::new("a removed entry's notice's destructor");
            let removed = table.retain_locked(
                shard,
                |item| !doomed(item),
                |item, side| {
                    item.hook(side).detach();
                    panics.run("a removed entry's notice", || {
                        notices.items.extend(noted(item, side));
                    });
                },
                deaths,
            );
            for notice in notices.items.drain(..) {
                panics.run("a removed entry's report", || after(notice));
            }
            // A key's `Clone` in the rebuild may panic: the table is
            // then left as it was, and the other shards are still done.
            panics.run("a table's shrink", || shrink_shard(table, shard, OVERSIZED));
            removed
        })
        .sum();
    panics.resume();
    removed
}

/// Rebuilds every shard's table that is more than `factor` times larger
/// than its live items need. A rebuild whose user code (a key's `Clone`)
/// panics leaves its shard as it was; the others are still rebuilt, and
/// then the first panic is resumed.
pub(crate) fn shrink<I: Watching>(table: &ShardedTable<I>, factor: usize) {
    let mut panics = FirstPanic::default();
    for shard in 0..table.shard_len() {
        panics.run("a table's shrink", || shrink_shard(table, shard, factor));
    }
    // The replaced tables, and the removed entries that keep them (M9),
    // are freed by the epoch: push them through now, so that the memory
    // comes back by the time this returns unless another thread is pinned.
    crate::reclaim::push_garbage_through();
    panics.resume();
}

fn shrink_shard<I: Watching>(table: &ShardedTable<I>, shard: usize, factor: usize) {
    table.write_shard(shard, &WritePin::lazy()).shrink(factor);
}
