//! `WeakKeyMap`: a concurrent map whose keys are held weakly, by identity.
//!
//! Its values are owned by the map, borrowed lock-free by readers, and
//! handed back by value by `insert` and `remove`: reads of a value are
//! counted, and a writer that takes a value back waits until no reader
//! borrows it (SAFETY.md, section 8).

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::mem::ManuallyDrop;

use crate::callbacks::global;
use crate::finalizer::Finalizer;
use crate::panics::catch_and_report;
use crate::raw::boxed::Boxed;
use crate::raw::collection::{self, Collection, Watching};
use crate::raw::single_flight::{self, Flight, Flights, Joined, Settle};
use crate::raw::table::{Relocatable, ShardedTable};
use crate::reclaim::Pinned;
use crate::strong::Strong;
use crate::sync::{
    abort, acquire_fence, thread_local, AtomicUsize, Ordering, Parker, Unparker, UnsafeCell,
};
use crate::weak::Weak;

/// Set once a writer has unlinked the item and is taking its value: no
/// reader enters from then on (K1, K2).
const CLOSED: usize = 1;
/// Set once the value has been moved out: the cell's drop skips it (K2).
const TAKEN: usize = 2;
/// Set with `CLOSED` by a removal that hands nothing back: whoever sees
/// the count reach zero gives the value to the finalizer thread (K5).
const DISPOSE: usize = 4;
/// One counted read.
const ONE: usize = 8;

thread_local! {
    /// The cells this thread is reading now (K4): a writer never waits for
    /// a read of its own thread.
    // loom's `thread_local!` takes no `const` initialiser.
    #[allow(clippy::missing_const_for_thread_local)]
    static READING: RefCell<Vec<usize>> = RefCell::new(Vec::new());
}

/// A value and what guards it: the count of its readers, and the writer
/// waiting to take it (SAFETY.md, section 8).
struct ValueCell<V> {
    /// The death callback that removes this item (M4); detached when the
    /// item is removed any other way (M5).
    finalizer: Finalizer,
    /// `readers * ONE | DISPOSE | TAKEN | CLOSED`.
    state: AtomicUsize,
    /// The writer to wake when the last reader leaves a closed cell.
    /// Written once, before `CLOSED` is set; read only after it is seen.
    waiter: UnsafeCell<Option<Unparker>>,
    value: UnsafeCell<ManuallyDrop<V>>,
}

// SAFETY: readers of many threads borrow the value (`V: Sync`); it is
// moved out or dropped on any thread (`V: Send`); the rest is ours and
// thread-safe (K1, K2).
unsafe impl<V: Send + Sync> Send for ValueCell<V> {}
// SAFETY: as above.
unsafe impl<V: Send + Sync> Sync for ValueCell<V> {}

impl<V> ValueCell<V> {
    fn new(value: V, finalizer: Finalizer) -> Self {
        ValueCell {
            finalizer,
            state: AtomicUsize::new(0),
            waiter: UnsafeCell::new(None),
            value: UnsafeCell::new(ManuallyDrop::new(value)),
        }
    }

    fn address(&self) -> usize {
        self as *const Self as usize
    }
}

impl<V: Send + Sync + 'static> ValueCell<V> {
    /// Starts a counted read, unless a writer has closed the cell (K1).
    /// The caller is pinned, and stays pinned until the read ends: it
    /// borrows the cell from an item, which only a pinned thread (or one
    /// holding the shard's lock, which it takes while pinned) can reach.
    fn enter(&self) -> Option<Reading<'_, V>> {
        // Relaxed: the value was published with the item (M1); what keeps
        // a taking writer out is the order of RMWs on this one word (K1).
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            if state & CLOSED != 0 {
                // Acquire (K3): pairs with the closing `fetch_or`, so the
                // caller's next lookup sees the replacement published
                // before it.
                acquire_fence!(self.state);
                return None;
            }
            // A count that reaches the top bits would take more nested
            // reads than any stack holds; abort as `Arc` does rather than
            // wrap.
            let next = state.checked_add(ONE).unwrap_or_else(|| abort());
            match self.state.compare_exchange_weak(
                state,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => state = now,
            }
        }
        let address = self.address();
        // `try_with`: during thread-local teardown the read goes untracked,
        // and `reading_here` answers true for every cell, so no writer on
        // this thread waits for it (K4).
        let _ = READING.try_with(|reading| reading.borrow_mut().push(address));
        Some(Reading {
            cell: self,
            dispose: Self::dispose_now,
        })
    }
}

impl<V> ValueCell<V> {
    /// Ends a counted read; the last reader of a closed cell wakes the
    /// writer waiting to take the value (K2), or disposes of it with
    /// `dispose` (K5).
    ///
    /// # Safety
    ///
    /// The caller entered the cell, and `dispose` is its `dispose_now`.
    unsafe fn leave(&self, dispose: unsafe fn(&Self)) {
        let address = self.address();
        let _ = READING.try_with(|reading| {
            let mut reading = reading.borrow_mut();
            if let Some(index) = reading.iter().rposition(|&cell| cell == address) {
                reading.swap_remove(index);
            }
        });
        // Release (K2): this read's borrows happen before the writer's
        // Acquire observation of a zero count, hence before the move.
        let before = self.state.fetch_sub(ONE, Ordering::Release);
        if before & CLOSED != 0 && before / ONE == 1 {
            // Acquire: pairs with the closing `fetch_or` (Release), so the
            // waiter written before it is visible (K2), and with the other
            // readers' Release decrements, so their borrows happen before
            // a disposal (K5).
            acquire_fence!(self.state);
            if before & DISPOSE != 0 {
                // The last reader of a cell closed for disposal: no borrow
                // remains or can start, and we are still pinned, so the
                // item's deferred drop runs after us (K5).
                // SAFETY: as just said; `dispose` is `dispose_now` (ours).
                unsafe { dispose(self) };
                return;
            }
            self.waiter.with(|waiter| {
                // SAFETY: written once before `CLOSED` was set and never
                // again; the cell stays allocated while we are pinned (K2).
                if let Some(waiter) = unsafe { &*waiter } {
                    waiter.unpark();
                }
            });
        }
    }
}

impl<V: Send + Sync + 'static> ValueCell<V> {
    /// Closes the cell for disposal (K5). The value goes to the finalizer
    /// thread now if no reader borrows it, else when the last reader
    /// leaves: not when the epoch next moves, which may be long after. A
    /// value without drop glue is left to the deferred drop, which frees
    /// the memory anyway (posting it would cost a job per removal).
    ///
    /// # Safety
    ///
    /// The caller unlinked the cell's item, once, and hands nothing back;
    /// it holds no shard lock (the drop may run inline, after `shutdown`)
    /// and has been pinned since before the unlink, so the item's deferred
    /// drop cannot run before this returns.
    unsafe fn dispose(&self) {
        if !std::mem::needs_drop::<V>() {
            return;
        }
        // AcqRel: Release lets a reader that sees the close restart (K3);
        // Acquire pairs with the Release decrements of reads that already
        // ended, so their borrows happen before the disposal.
        let before = self.state.fetch_or(CLOSED | DISPOSE, Ordering::AcqRel);
        if before / ONE == 0 {
            // SAFETY: no borrow remains or can start (`CLOSED`); the
            // item's deferred drop runs after we return (our caller's pin).
            unsafe { self.dispose_now() };
        }
    }

    /// Moves the value out and posts its drop to the finalizer thread.
    ///
    /// # Safety
    ///
    /// The cell is closed for disposal, no reader borrows the value, and
    /// the item's deferred drop runs after this returns; called once (by
    /// the disposing writer, or by the last reader: only one of them sees
    /// a zero count).
    unsafe fn dispose_now(&self) {
        let value = self.value.with_mut(|value| {
            // SAFETY: as the caller promises; `TAKEN`, stored next, makes
            // the cell's drop skip it.
            unsafe { ManuallyDrop::take(&mut *value) }
        });
        // Relaxed: the cell's drop runs after us (the caller's promise).
        self.state.fetch_or(TAKEN, Ordering::Relaxed);
        global().post(move || {
            catch_and_report("a removed value's destructor", || drop(value));
        });
    }
}

impl<V> ValueCell<V> {
    /// True if a writer has closed the cell (it is being removed).
    fn is_closed(&self) -> bool {
        // Relaxed: a hint for `keys`, which skips such entries; the
        // counted reads decide (K1).
        self.state.load(Ordering::Relaxed) & CLOSED != 0
    }

    /// Closes the cell, waits until no reader borrows the value, and moves
    /// it out (K2).
    ///
    /// # Safety
    ///
    /// 1. The caller unlinked the cell's item under the shard's lock and
    ///    calls this once.
    /// 2. The caller was pinned before the unlink and stays pinned until
    ///    this returns, so the item's deferred drop runs after it.
    /// 3. The calling thread is not reading this cell (K4).
    unsafe fn take(&self) -> V {
        let parker = Parker::new();
        self.waiter.with_mut(|waiter| {
            // SAFETY: nobody reads `waiter` before `CLOSED` is set, and
            // only the one writer that unlinked the item writes it (1).
            unsafe { *waiter = Some(parker.unparker().clone()) }
        });
        // AcqRel (K2): Release publishes `waiter` (and, for K3, whatever
        // this writer published before); Acquire pairs with the Release
        // decrements of reads that already ended.
        let mut state = self.state.fetch_or(CLOSED, Ordering::AcqRel);
        while state / ONE != 0 {
            // Woken by the last reader (or spuriously: check again). By 3
            // none of the reads is ours, so each ends.
            parker.park();
            // Acquire (K2): pairs with the readers' Release decrements.
            state = self.state.load(Ordering::Acquire);
        }
        let value = self.value.with_mut(|value| {
            // SAFETY: no reader borrows the value and none can start
            // (`CLOSED`); it is moved out once (1) and the drop skips it
            // (`TAKEN`, stored before the deferred drop can run: 2).
            unsafe { ManuallyDrop::take(&mut *value) }
        });
        // Relaxed: the cell's drop runs after this thread unpins (2). An
        // RMW, not a store: it keeps the closing `fetch_or`'s release
        // sequence going, so a reader that reads this value still
        // synchronises with the close (K3).
        self.state.fetch_or(TAKEN, Ordering::Relaxed);
        value
    }
}

impl<V> Drop for ValueCell<V> {
    fn drop(&mut self) {
        // Removal paths detach eagerly; this covers the map being dropped.
        self.finalizer.detach();
        // Relaxed: the drop runs after every reader and the taking writer
        // have unpinned, or with exclusive access (K2, K5).
        if self.state.load(Ordering::Relaxed) & TAKEN == 0 {
            self.value.with_mut(|value| {
                // SAFETY: not moved out (`TAKEN` unset), dropped once: here.
                unsafe { ManuallyDrop::drop(&mut *value) }
            });
        }
    }
}

/// A counted read of a value; ends when dropped (K1).
struct Reading<'a, V> {
    cell: &'a ValueCell<V>,
    /// The cell's `dispose_now`, for a last reader of a cell closed for
    /// disposal (K5); here so the cell's type needs no bounds.
    dispose: unsafe fn(&ValueCell<V>),
}

impl<V> Reading<'_, V> {
    fn value(&self) -> &V {
        self.cell.value.with(|value| {
            // SAFETY: inside a counted read, under a pin: no writer moves
            // the value out until the read ends (K2), and the item's
            // deferred drop runs after the pin (K5).
            unsafe { &**value }
        })
    }
}

impl<V> Drop for Reading<'_, V> {
    fn drop(&mut self) {
        // SAFETY: `dispose` is the cell's own `dispose_now`.
        unsafe { self.cell.leave(self.dispose) };
    }
}

/// True if this thread is reading `cell` now (K4).
/// During thread-local teardown (a writer called from another
/// thread-local's destructor) the list is gone and reads went untracked:
/// then this answers true, so such a writer never waits (for what may be
/// its own read) and hands nothing back.
fn reading_here<V>(cell: &ValueCell<V>) -> bool {
    let address = cell.address();
    READING
        .try_with(|reading| reading.borrow().contains(&address))
        .unwrap_or(true)
}

/// One entry: immutable once published (SAFETY.md, sections 7 and 8).
struct Item<K, V> {
    key: Weak<K>,
    cell: Boxed<ValueCell<V>>,
}

// Each item registers its own callback, whose node the cell's `Finalizer`
// keeps allocated until the item is dropped, after every thread that saw
// it has unpinned: unique among live items (a replacement under the same
// key is another item) and unchanged by bitwise moves.
// SAFETY: both fields are pointers (`Weak`, `Boxed`), so nothing writes
// an item's own bytes through `&Item` (the cell's atomics and cells live
// behind the box), and a relocation moves it whole (1, 2); its identity is
// as just said (3).
unsafe impl<K, V> Relocatable for Item<K, V> {
    /// The value's destructor is user code; the rest is ours (a `Weak`
    /// never drops its object's value).
    const DROP_RUNS_USER_CODE: bool = std::mem::needs_drop::<V>();

    /// Nothing: an item moves whole; its value stays in its box.
    type LeftBehind = ();

    fn identity(&self) -> usize {
        self.cell.finalizer.identity()
    }

    unsafe fn relocate(&self) -> Self {
        // SAFETY: two pointers, which nothing writes through `&Item` (1);
        // the caller drops one of the two copies whole (`relocate`'s 1),
        // so each is owned once.
        unsafe { std::ptr::read(self) }
    }

    unsafe fn take_left_behind(_: *const Self) {}
}

impl<K, V> Watching for Item<K, V>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    type Target = K;

    fn watched(&self) -> &Weak<K> {
        &self.key
    }

    fn finalizer(&self) -> &Finalizer {
        &self.cell.finalizer
    }

    const HAS_UNLINKED: bool = true;

    fn unlinked(&self) {
        // SAFETY: `Watching::unlinked`'s contract: unlinked once by a
        // removal that hands nothing back, called outside the lock by a
        // thread pinned since before the unlink.
        unsafe { self.cell.dispose() };
    }
}

/// The shared core; death callbacks hold a `Weak` to it (M4).
struct MapCore<K, V, S> {
    hasher: S,
    table: ShardedTable<Item<K, V>>,
    /// Loads in flight, per shard; locked after the shard's writer (K6).
    loads: Flights<Weak<K>, V>,
}

impl<K, V, S> Collection<Item<K, V>> for MapCore<K, V, S>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: Send + Sync + 'static,
{
    fn table(&self) -> &ShardedTable<Item<K, V>> {
        &self.table
    }
}

/// A concurrent map whose keys are held weakly and compared by identity,
/// like JavaScript's `WeakMap` and .NET's `ConditionalWeakTable` (Python's
/// `weakref.WeakKeyDictionary` compares keys by value): data attached to
/// objects owned elsewhere, which goes when they go.
///
/// A key is an object, named by a [`Strong`] to it: two objects with equal
/// values are two keys, and an object's address being reused after its
/// death never makes a new object find the old entry (the map's `Weak`
/// keeps the old address reserved until its entry is gone). When a key
/// dies its entry is removed by a death callback, so [`len`](Self::len) is
/// exact after [`flush`](crate::flush), and its value is dropped on the
/// finalizer thread.
///
/// Reads ([`get`](Self::get), [`with`](Self::with),
/// [`contains_key`](Self::contains_key), iteration) take no lock and never
/// block. [`insert`](Self::insert) and [`remove`](Self::remove) hand the
/// value they displace back to their caller, so they wait until no
/// reader borrows it any more: for the reads that started before, which
/// end when their closures return. A thread that removes or replaces a
/// value it is reading itself (a `with` closure removing its own key) does
/// not wait for itself: the call returns `None` and the value is dropped
/// once the read ends. But reads, `insert`/`remove` and single-flight
/// loads wait like locks: two threads that each, inside `with`, remove the
/// key the other is reading wait for each other forever, as does a `with`
/// closure waiting on a load whose `init` removes the key being read.
/// Likewise [`flush`](crate::flush) and [`shutdown`](crate::shutdown)
/// wait for the finalizer thread, which may be waiting for a read: don't
/// call them inside `with`, `retain`, a value's `Clone` or an `init`.
/// Closures passed to `with`, `retain` and the values' `Clone` keep their
/// thread pinned while they run (which holds back the freeing of memory
/// that any thread retires meanwhile): keep them short.
///
/// Removed values are dropped on the finalizer thread, as soon as no
/// reader borrows them (so by the next [`flush`](crate::flush)), except
/// those handed back by `insert` and `remove` and those still in the map
/// when it is dropped, which go with it. After
/// [`shutdown`](crate::shutdown) there is no finalizer thread: a removed
/// value is dropped wherever epoch garbage is collected, which may be
/// inside another map operation (so its destructor must not use a map
/// then), and a dead key whose shard was busy keeps its entry, invisible
/// to lookups but counted by `len`, until [`purge`](Self::purge),
/// [`retain`](Self::retain) or [`clear`](Self::clear).
///
/// # Reference cycles
///
/// Reference counting cannot see through the map: a value that holds a
/// [`Strong`] to its own key keeps the key alive forever, and the entry
/// never goes (JavaScript's `WeakMap` avoids this with ephemerons; no
/// reference-counted map can). When a value needs its key, give it a
/// [`Weak`](crate::Weak):
///
/// ```
/// use weakrefs::{flush, Strong, Weak, WeakKeyMap};
///
/// struct Connection;
/// struct Session {
///     owner: Weak<Connection>, // not Strong: that would keep it alive
/// }
///
/// let sessions: WeakKeyMap<Connection, Strong<Session>> = WeakKeyMap::new();
/// let conn = Strong::new(Connection);
/// sessions.insert(&conn, Strong::new(Session { owner: Strong::downgrade(&conn) }));
/// assert!(sessions.with(&conn, |s| s.owner.upgrade().is_some()).unwrap());
///
/// drop(conn);
/// flush();
/// assert!(sessions.is_empty());
/// ```
///
/// # Examples
///
/// Per-connection state that disappears with the connection:
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use weakrefs::{flush, Strong, WeakKeyMap};
///
/// struct Connection { peer: String }
///
/// let bytes_sent: WeakKeyMap<Connection, AtomicU64> = WeakKeyMap::new();
/// let conn = Strong::new(Connection { peer: "10.0.0.7".into() });
/// bytes_sent.insert(&conn, AtomicU64::new(0));
/// bytes_sent.with(&conn, |n| n.fetch_add(512, Ordering::Relaxed));
/// assert_eq!(bytes_sent.with(&conn, |n| n.load(Ordering::Relaxed)), Some(512));
///
/// drop(conn); // the connection closes
/// flush();
/// assert!(bytes_sent.is_empty());
/// ```
pub struct WeakKeyMap<K, V, S = RandomState> {
    core: Strong<MapCore<K, V, S>>,
}

impl<K, V> WeakKeyMap<K, V, RandomState>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// An empty map.
    ///
    /// ```
    /// let map: weakrefs::WeakKeyMap<String, u32> = weakrefs::WeakKeyMap::new();
    /// assert!(map.is_empty());
    /// ```
    pub fn new() -> Self {
        Self::with_capacity_and_hasher(0, RandomState::new())
    }

    /// An empty map with room for about `capacity` entries before any
    /// shard grows.
    ///
    /// ```
    /// let map: weakrefs::WeakKeyMap<String, u32> = weakrefs::WeakKeyMap::with_capacity(1_000);
    /// assert_eq!(map.len(), 0);
    /// ```
    pub fn with_capacity(capacity: usize) -> Self {
        Self::with_capacity_and_hasher(capacity, RandomState::new())
    }
}

impl<K, V, S> WeakKeyMap<K, V, S>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    /// An empty map that hashes key addresses with `hasher`.
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// let map: weakrefs::WeakKeyMap<u8, u8> = weakrefs::WeakKeyMap::with_hasher(RandomState::new());
    /// assert!(map.is_empty());
    /// ```
    pub fn with_hasher(hasher: S) -> Self {
        Self::with_capacity_and_hasher(0, hasher)
    }

    /// An empty map with room for about `capacity` entries, hashing key
    /// addresses with `hasher`.
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// let map: weakrefs::WeakKeyMap<u8, u8> =
    ///     weakrefs::WeakKeyMap::with_capacity_and_hasher(64, RandomState::new());
    /// assert!(map.is_empty());
    /// ```
    pub fn with_capacity_and_hasher(capacity: usize, hasher: S) -> Self {
        let table = ShardedTable::with_capacity(capacity);
        let loads = Flights::new(table.shard_len());
        WeakKeyMap {
            core: Strong::new(MapCore {
                hasher,
                table,
                loads,
            }),
        }
    }

    fn hash(&self, key: &Strong<K>) -> u64 {
        self.core.hasher.hash_one(Strong::identity(key))
    }

    /// Makes the item for `value` under `key`, registering the death
    /// callback that will remove exactly this item (M4).
    fn new_item(&self, hash: u64, key: &Strong<K>, value: V) -> Item<K, V> {
        Item {
            key: Strong::downgrade(key),
            cell: Boxed::new(ValueCell::new(
                value,
                collection::remove_on_death(&self.core, hash, key),
            )),
        }
    }

    /// Hands back the value of the item the caller unlinked (K2), unless
    /// this thread is reading it (K4): then the value is dropped once the
    /// read ends, and the result is `None`.
    ///
    /// # Safety
    ///
    /// `take`'s 1 and 2: the caller unlinked `cell`'s item once, and was
    /// pinned before and until now by `_pinned`.
    unsafe fn take_back(cell: &ValueCell<V>, _pinned: &Pinned) -> Option<V> {
        if reading_here(cell) {
            // SAFETY: unlinked by our caller, pinned since before; no lock
            // is held. Our own read is counted, so its end disposes of the
            // value (or, untracked during thread-local teardown, this does).
            unsafe { cell.dispose() };
            return None;
        }
        // SAFETY: 1 and 2 from our caller; 3 checked just above.
        Some(unsafe { cell.take() })
    }

    /// Inserts `value` under `key`'s object, held weakly. Returns the value
    /// the key had, if any; that waits until no reader borrows it.
    ///
    /// Called on a thread that is itself reading the key's value (inside
    /// [`with`](Self::with)'s closure, [`retain`](Self::retain)'s
    /// predicate, or the value's `Clone` during [`get`](Self::get) or
    /// iteration), it replaces the value but returns `None`: the old value
    /// is borrowed there, and is dropped once that read ends. The same
    /// holds for a call from a thread-local's destructor during thread
    /// exit, when reads can no longer be told apart.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let key = Strong::new("request 1");
    /// assert_eq!(map.insert(&key, 10), None);
    /// assert_eq!(map.insert(&key, 20), Some(10));
    /// assert_eq!(map.get(&key), Some(20));
    /// ```
    pub fn insert(&self, key: &Strong<K>, value: V) -> Option<V> {
        let hash = self.hash(key);
        let item = self.new_item(hash, key, value);
        // Before the unlink, until the value is taken (K2).
        let pinned = self.core.table.pin();
        let mut writer = self.core.table.write(hash);
        let replaced: *const ValueCell<V> = {
            let replaced = writer.upsert(hash, item, |old, _| old.key.names(key))?;
            // Detached once the replacement is published (M5).
            replaced.cell.finalizer.detach();
            &*replaced.cell
        };
        drop(writer);
        // SAFETY: the cell's item is unlinked (by `upsert`) and its drop
        // deferred past our pin, taken before the unlink, so the pointer is
        // valid; `take_back`'s conditions hold for the same reasons.
        unsafe { Self::take_back(&*replaced, &pinned) }
    }

    /// Looks `key` up lock-free and runs `f` on its value inside a counted
    /// read, looking again if a writer closed the cell it found (K3).
    fn read<R>(&self, key: &Strong<K>, f: impl FnOnce(&V) -> R) -> Option<R> {
        let hash = self.hash(key);
        let mut f = Some(f);
        loop {
            let pinned = self.core.table.pin();
            let item = self
                .core
                .table
                .candidates(hash, &pinned)
                .find(|item| item.key.names(key))?;
            let Some(reading) = item.cell.enter() else {
                continue;
            };
            let f = f.take().expect("called once, then we return");
            let result = f(reading.value());
            drop(reading);
            return Some(result);
        }
    }

    /// A clone of the value under `key`'s object. Lock-free.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let (a, b) = (Strong::new(1), Strong::new(1));
    /// map.insert(&a, "meta");
    /// assert_eq!(map.get(&a), Some("meta"));
    /// assert_eq!(map.get(&b), None); // an equal value, another object
    /// ```
    pub fn get(&self, key: &Strong<K>) -> Option<V>
    where
        V: Clone,
    {
        self.read(key, V::clone)
    }

    /// Applies `f` to the value under `key`'s object, without cloning it.
    /// Lock-free; while `f` runs, a writer that would take this value back
    /// waits.
    ///
    /// ```
    /// use std::sync::Mutex;
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let user = Strong::new("ada");
    /// map.insert(&user, Mutex::new(Vec::new()));
    /// map.with(&user, |log| log.lock().unwrap().push("logged in"));
    /// assert_eq!(map.with(&user, |log| log.lock().unwrap().len()), Some(1));
    /// ```
    pub fn with<R>(&self, key: &Strong<K>, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.read(key, f)
    }

    /// True if `key`'s object has an entry. Lock-free, and takes no
    /// reference.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let key = Strong::new(());
    /// map.insert(&key, 1);
    /// assert!(map.contains_key(&key));
    /// map.remove(&key);
    /// assert!(!map.contains_key(&key));
    /// ```
    pub fn contains_key(&self, key: &Strong<K>) -> bool {
        let hash = self.hash(key);
        let pinned = self.core.table.pin();
        // The item alone answers: no need to reach the value's cell (a
        // cache miss at scale). An entry being removed right now may or may
        // not be seen, as with any read racing a write.
        let found = self
            .core
            .table
            .candidates(hash, &pinned)
            .any(|item| item.key.names(key));
        found
    }

    /// Removes the entry of `key`'s object and returns its value; that
    /// waits until no reader borrows it. Called on a thread that is itself
    /// reading the value (as for [`insert`](Self::insert)), it removes the
    /// entry but returns `None`: the value is borrowed there, and is
    /// dropped once that read ends.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let key = Strong::new("job");
    /// map.insert(&key, vec![1, 2, 3]);
    /// assert_eq!(map.remove(&key), Some(vec![1, 2, 3]));
    /// assert_eq!(map.remove(&key), None);
    /// ```
    pub fn remove(&self, key: &Strong<K>) -> Option<V> {
        let hash = self.hash(key);
        // Before the unlink, until the value is taken (K2).
        let pinned = self.core.table.pin();
        let mut writer = self.core.table.write(hash);
        let removed: *const ValueCell<V> = {
            let removed = writer.remove(hash, |item| item.key.names(key))?;
            // Detached once the removal is published (M5).
            removed.cell.finalizer.detach();
            &*removed.cell
        };
        drop(writer);
        // SAFETY: as in `insert`: unlinked by us, under our earlier pin.
        unsafe { Self::take_back(&*removed, &pinned) }
    }

    /// The value under `key`'s object (a clone), or the one `init` builds,
    /// inserted. Single flight: callers racing on one key run `init` once
    /// and all receive clones of one value. If `init` (or the value's
    /// `Clone`) panics, the panic reaches its own caller only, and the
    /// waiting callers retry.
    ///
    /// `init` must not request the same key from this map (that would wait
    /// for itself): such a call panics with a message saying so. From async
    /// code, prefer the `_async` variant: this call blocks its thread while
    /// it waits, and if an async caller leads the load on that same thread
    /// (a current-thread runtime, or every worker blocked so), it waits
    /// forever.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let parsed: WeakKeyMap<String, Strong<Vec<String>>> = WeakKeyMap::new();
    /// let doc = Strong::new("a b c".to_string());
    /// let words = parsed.get_or_insert_with(&doc, || {
    ///     Strong::new(doc.split(' ').map(String::from).collect())
    /// });
    /// let again = parsed.get_or_insert_with(&doc, || unreachable!());
    /// assert!(Strong::ptr_eq(&words, &again));
    /// ```
    pub fn get_or_insert_with<F: FnOnce() -> V>(&self, key: &Strong<K>, init: F) -> V
    where
        V: Clone,
    {
        let mut init = Some(init);
        let value = loop {
            match self.find_or_join(key, true) {
                Ok(value) => break value,
                Err(Joined::Wait(load)) => {
                    if let Some(value) = load.wait() {
                        drop(load);
                        break value;
                    }
                    // The leader failed: try again (perhaps as the leader).
                }
                Err(Joined::Lead(load)) => {
                    let init = init.take().expect("a caller leads once, then returns");
                    let made = single_flight::lead(
                        load,
                        || Ok::<_, std::convert::Infallible>(Self::with_copies(init())),
                        |load, made| self.finish_load(key, load, made),
                    );
                    match made {
                        Ok(value) => break value,
                        Err(never) => match never {},
                    }
                }
            }
        };
        // An unused `init` goes before the value is handed back: if its
        // destructor panics, the value, a local here, is dropped with it.
        drop(init);
        value
    }

    /// [`get_or_insert_with`](Self::get_or_insert_with) for async code:
    /// callers wait for a load in flight without blocking their thread,
    /// and `init`'s future runs in the leading caller's task. Works on any
    /// executor. Cancellation-safe: if the leading caller's future is
    /// dropped before its load completes, one of the waiting callers takes
    /// the load over. An `init` that requests its own key panics with a
    /// message if that request would block, but one that awaits its own key
    /// waits for itself forever.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let thumbnails: WeakKeyMap<String, Strong<Vec<u8>>> = WeakKeyMap::new();
    /// let photo = Strong::new("photo.jpg".to_string());
    /// let small = thumbnails
    ///     .get_or_insert_with_async(&photo, || async { Strong::new(vec![0u8; 64]) })
    ///     .await;
    /// let again = thumbnails
    ///     .get_or_insert_with_async(&photo, || async { unreachable!() })
    ///     .await;
    /// assert!(Strong::ptr_eq(&small, &again));
    /// # });
    /// ```
    pub async fn get_or_insert_with_async<F, Fut>(&self, key: &Strong<K>, init: F) -> V
    where
        V: Clone,
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let mut init = Some(init);
        let value = loop {
            match self.find_or_join(key, false) {
                Ok(value) => break value,
                Err(Joined::Wait(load)) => {
                    if let Some(value) = load.wait_async().await {
                        drop(load);
                        break value;
                    }
                    // The leader failed or was dropped: try again.
                }
                Err(Joined::Lead(load)) => {
                    let init = init.take().expect("a caller leads once, then returns");
                    let made = single_flight::lead_async(
                        load,
                        async {
                            Ok::<_, std::convert::Infallible>(Self::with_copies(init().await))
                        },
                        |load, made| self.finish_load(key, load, made),
                    )
                    .await;
                    match made {
                        Ok(value) => break value,
                        Err(never) => match never {},
                    }
                }
            }
        };
        // As in `get_or_insert_with`: leftovers first.
        drop(init);
        value
    }

    /// A new value with its two clones, for the waiters and the leader,
    /// made before anything is locked or published: a panicking `Clone`
    /// fails the load like a panicking `init` (K6).
    fn with_copies(value: V) -> (V, V, V)
    where
        V: Clone,
    {
        let shared = value.clone();
        let ours = value.clone();
        (value, shared, ours)
    }

    /// A clone of the value under `key` (lock-free, then under the shard's
    /// lock), or else a load to wait for, or a new load for us to lead
    /// (K6). `blocking` says whether the caller blocks its thread to wait.
    #[allow(clippy::type_complexity)]
    fn find_or_join(&self, key: &Strong<K>, blocking: bool) -> Result<V, Joined<Weak<K>, V>>
    where
        V: Clone,
    {
        loop {
            if let Some(value) = self.get(key) {
                return Ok(value);
            }
            let hash = self.hash(key);
            let pinned = self.core.table.pin();
            let writer = self.core.table.write(hash);
            let found: Option<*const ValueCell<V>> = writer
                .candidates(hash)
                .find(|item| item.key.names(key))
                .map(|item| &*item.cell as *const ValueCell<V>);
            if let Some(cell) = found {
                // Inserted since our lock-free look: clone it after the
                // unlock (`Clone` is user code), inside a counted read
                // entered under the lock.
                // SAFETY: found in the current table under the lock, so not
                // unlinked yet: its drop is deferred past our pin.
                let cell = unsafe { &*cell };
                let reading = cell.enter();
                drop(writer);
                match reading {
                    Some(reading) => {
                        // Out of the read before returning: its end may
                        // drop a value (user code), and a panic there must
                        // not strand the clone in a return under way.
                        let value = reading.value().clone();
                        drop(reading);
                        return Ok(value);
                    }
                    // Unreachable in practice (a cell is closed only after
                    // its unlink); look again.
                    None => continue,
                }
            }
            let mut wanted = Some(Strong::downgrade(key));
            let joined = self.core.loads.join_or_lead(
                self.core.table.shard_index(hash),
                hash,
                &mut wanted,
                |theirs: &Weak<K>, ours: &Weak<K>| theirs.ptr_eq(ours),
                "WeakKeyMap::get_or_insert_with",
                blocking,
            );
            drop(writer);
            drop(pinned);
            return Err(joined);
        }
    }

    /// Ends a load under the shard's writer lock (K6, M6): withdraws it and,
    /// on success, publishes the value, unless an entry was inserted under
    /// the key meanwhile, which then wins for everyone. Settles the load on
    /// every exit, unwinding included. Returns the outcome.
    fn finish_load(
        &self,
        key: &Strong<K>,
        load: &Strong<Flight<Weak<K>, V>>,
        made: Option<(V, V, V)>,
    ) -> Option<V>
    where
        V: Clone,
    {
        let mut settle = Settle::new(load);
        let hash = load.hash();
        // Keeps a found cell allocated after the unlock.
        let _pinned = self.core.table.pin();
        let mut writer = self.core.table.write(hash);
        let withdrawn = self
            .core
            .loads
            .withdraw(self.core.table.shard_index(hash), load);
        let (value, shared, ours) = made?;
        let existing: Option<*const ValueCell<V>> = writer
            .candidates(hash)
            .find(|item| item.key.names(key))
            .map(|item| &*item.cell as *const ValueCell<V>);
        let reading = match existing {
            None => {
                let item = self.new_item(hash, key, value);
                // Never replaces: no entry under the key (checked above).
                writer.upsert(hash, item, |_, _| false);
                drop(writer);
                settle.outcome = Some(shared);
                drop(settle);
                drop(withdrawn);
                return Some(ours);
            }
            Some(cell) => {
                // SAFETY: found in the current table under the lock, so its
                // drop is deferred past our pin.
                let cell = unsafe { &*cell };
                cell.enter()
            }
        };
        drop(writer);
        drop(withdrawn);
        // After the unlock: user code.
        drop((value, shared, ours));
        let adopted = reading.map(|reading| {
            // As in `find_or_join`: the read ends before the clone is
            // handed back, so a panic as it ends drops the clone.
            let value = reading.value().clone();
            drop(reading);
            value
        });
        settle.outcome.clone_from(&adopted);
        adopted
    }

    /// Number of entries not yet removed: exact after
    /// [`flush`](crate::flush); entries whose keys died since may still
    /// be counted until their removal callbacks run.
    ///
    /// ```
    /// use weakrefs::{flush, Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let key = Strong::new(());
    /// map.insert(&key, "v");
    /// assert_eq!(map.len(), 1);
    /// drop(key);
    /// flush();
    /// assert_eq!(map.len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.core.table.len()
    }

    /// True if [`len`](Self::len) is zero.
    ///
    /// ```
    /// let map: weakrefs::WeakKeyMap<u8, u8> = weakrefs::WeakKeyMap::new();
    /// assert!(map.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live entries: each key's `Strong` with a clone of its value. Weakly
    /// consistent: never yields a dead key or panics while other threads
    /// change the map; it may or may not see those changes.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let (a, b) = (Strong::new('a'), Strong::new('b'));
    /// map.insert(&a, 1);
    /// map.insert(&b, 2);
    /// drop(b);
    /// let live: Vec<_> = map.iter().map(|(k, v)| (*k, v)).collect();
    /// assert_eq!(live, [('a', 1)]);
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (Strong<K>, V)> + '_
    where
        V: Clone,
    {
        collection::snapshots(&self.core.table, |item| {
            let key = item.key.upgrade()?;
            let reading = item.cell.enter()?;
            let value = reading.value().clone();
            drop(reading);
            Some((key, value))
        })
    }

    /// The live keys.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let key = Strong::new("only");
    /// map.insert(&key, ());
    /// assert_eq!(map.keys().map(|k| *k).collect::<Vec<_>>(), ["only"]);
    /// ```
    pub fn keys(&self) -> impl Iterator<Item = Strong<K>> + '_ {
        collection::snapshots(&self.core.table, |item| {
            if item.cell.is_closed() {
                return None;
            }
            item.key.upgrade()
        })
    }

    /// Keeps only the live entries for which `f` returns true; removes the
    /// rest (and any dead ones). `f` runs at most once per live entry,
    /// without any lock held (not for an entry that a concurrent `insert`
    /// or `remove` is taking back); an entry replaced or removed meanwhile
    /// is left alone.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let keys: Vec<_> = (0..6).map(Strong::new).collect();
    /// for key in &keys {
    ///     map.insert(key, **key * 10);
    /// }
    /// map.retain(|key, value| key % 2 == 0 && *value < 40);
    /// assert_eq!(map.len(), 2);
    /// ```
    pub fn retain<F: FnMut(&K, &V) -> bool>(&self, mut f: F) {
        collection::retain_live(&self.core.table, |item, key| {
            match item.cell.enter() {
                Some(reading) => f(key, reading.value()),
                // Being taken back by a writer: not ours to judge (K5).
                None => true,
            }
        });
    }

    /// Removes every entry.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let key = Strong::new(1);
    /// map.insert(&key, "x");
    /// map.clear();
    /// assert!(map.is_empty());
    /// ```
    pub fn clear(&self) {
        collection::clear(&self.core.table);
    }

    /// Removes the entries whose keys are dead now, without waiting for
    /// their death callbacks; returns how many.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let key = Strong::new(1);
    /// map.insert(&key, "x");
    /// drop(key);
    /// assert!(map.purge() <= 1); // 0 if the callback got there first
    /// assert!(map.is_empty());
    /// ```
    pub fn purge(&self) -> usize {
        collection::purge(&self.core.table)
    }
}

impl<K, V, S> Default for WeakKeyMap<K, V, S>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Default + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::with_capacity_and_hasher(0, S::default())
    }
}

impl<K, V, S> fmt::Debug for WeakKeyMap<K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakKeyMap")
            .field("len", &self.core.table.len())
            .finish_non_exhaustive()
    }
}

/// `map.par_iter()` (with `use rayon::prelude::*`): the live entries, each
/// key's `Strong` with a clone of its value, in parallel, shard by shard;
/// weakly consistent, as [`WeakKeyMap::iter`].
///
/// ```
/// use rayon::prelude::*;
/// use weakrefs::{Strong, WeakKeyMap};
///
/// let map = WeakKeyMap::new();
/// let keys: Vec<_> = (0..100u64).map(Strong::new).collect();
/// for key in &keys {
///     map.insert(key, **key * 2);
/// }
/// let sum: u64 = map.par_iter().map(|(_, doubled)| doubled).sum();
/// assert_eq!(sum, 2 * 4950);
/// ```
#[cfg(feature = "rayon")]
impl<'a, K, V, S> rayon::iter::IntoParallelIterator for &'a WeakKeyMap<K, V, S>
where
    K: Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    type Item = (Strong<K>, V);
    type Iter = crate::ParIter<'a, (Strong<K>, V)>;

    fn into_par_iter(self) -> Self::Iter {
        let table = &self.core.table;
        crate::ParIter::new(table.shard_len(), move |shard| {
            collection::shard_snapshot(table, shard, |item: &Item<K, V>| {
                let key = item.key.upgrade()?;
                let reading = item.cell.enter()?;
                let value = reading.value().clone();
                drop(reading);
                Some((key, value))
            })
        })
    }
}
