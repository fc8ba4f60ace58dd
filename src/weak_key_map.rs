//! `WeakKeyMap`: a concurrent map whose keys are held weakly, by identity.
//!
//! Its keys' `Weak`s and its values live out of line, in each entry's
//! death hook (the entry's one allocation), so that values never move
//! while readers borrow them in place and a table slot is one word: a
//! lookup is a pin, a probe and a read of the entry's node, and `with`
//! runs its closure on the value under that pin. A removed value is
//! dropped, like any removed item, once no reader can see it (SAFETY.md,
//! section 8).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;

use crate::callbacks::{Hook, SafePoint};
use crate::identity::IdentityState;
use crate::panics::FirstPanic;
use crate::raw::collection::{self, Collection, Watching};
use crate::raw::single_flight::{self, Flight, Flights, Joined, Settle};
use crate::raw::table::{Relocatable, ShardedTable, Sided, WritePin};
use crate::strong::Strong;
use crate::weak::{EntryWeak, Weak};

/// One entry: immutable once published (SAFETY.md, sections 7 and 8).
/// Its key and value live in the hook's node, the entry's one allocation:
/// a rebuild moves the item (one pointer) and never the value, which
/// readers may be borrowing (K1), and a lookup's probe reads one word a
/// slot, so the slots of a large map stay in the caches while the nodes
/// do not: a hit misses once, on its node, where its key and value sit
/// side by side.
struct Item<K: ?Sized, V> {
    /// The death callback that removes this item (M4), holding the key
    /// and the value; detached when the item is removed any other way
    /// (M5).
    hook: Hook<Held<K, V>>,
}

/// What an entry's hook keeps: the key's `Weak` (which keeps the key's
/// address reserved while the entry exists), then the value.
struct Held<K: ?Sized, V> {
    key: EntryWeak<K>,
    value: V,
}

impl<K: ?Sized, V> Item<K, V> {
    fn key(&self) -> &EntryWeak<K> {
        &self.hook.payload().key
    }

    fn value(&self) -> &V {
        &self.hook.payload().value
    }
}

impl<K: ?Sized, V> Drop for Item<K, V> {
    fn drop(&mut self) {
        // Removal paths detach eagerly; this covers the map being dropped.
        // A hook whose death's removal found this entry is claimed, and
        // this is a no-op; any other is settled here (C20).
        self.hook.detach();
        // An item is dropped whole once (M3: a relocated original
        // never is), after every reader that could borrow its key or
        // value has unpinned (K1), or with the map (`&mut`), or
        // unpublished; no other handle to the hook reads the payload (the
        // posted removal only names it). The key's `Weak` goes first, for
        // the references the hook says it stands for (C21), before the
        // value's destructor runs, which may panic.
        let held = self.hook.payload_ptr();
        let refs = self.hook.watched_refs();
        // SAFETY: as just said: each field moved out or dropped in place
        // once, through the whole node's pointer.
        unsafe {
            std::ptr::read(std::ptr::addr_of!((*held).key)).release(refs);
            std::ptr::drop_in_place(std::ptr::addr_of_mut!((*held).value));
        }
    }
}

/// Nothing beside an item: it is one pointer, inline (lookups read the
/// hook, whose node holds the key and the value).
impl<K: ?Sized, V> Sided for Item<K, V> {
    type Side = ();
    type Marks = Infallible;
}

// Each item registers its own callback, whose node the item's `Hook`
// keeps allocated until the item is dropped, after every thread that saw
// it has unpinned: unique among live items (a replacement under the same
// key is another item) and unchanged by bitwise moves.
// The key and the value live in that node.
// SAFETY: the item is one pointer (`Hook`), never written through
// `&Item`, and a relocation moves it whole (1, 2); its identity is as
// just said (3).
unsafe impl<K: ?Sized, V> Relocatable for Item<K, V> {
    /// The value's destructor may be user code; the rest is ours (a
    /// `Weak` never drops its object's value). Values whose drop only
    /// frees memory take this way too, unlike `WeakValueMap`'s keys: a
    /// value may be large (a decoded buffer), and what a thread hands the
    /// epoch stays in its own bag until it retires more or exits, which
    /// an idle thread never does, and `flush` cannot reach; the finalizer
    /// thread pushes its garbage through whenever it goes idle.
    #[inline(always)]
    fn drop_runs_user_code() -> bool {
        std::mem::needs_drop::<V>()
    }

    /// Nothing: an item moves whole; its key and value stay in its hook.
    type LeftBehind = ();

    fn identity(&self, _: &()) -> usize {
        self.hook.identity()
    }

    fn filed(&self, _: &()) -> u32 {
        self.hook.key()
    }

    fn prefetch_filed(&self, _: &()) {
        self.hook.prefetch();
    }

    unsafe fn relocate(&self) -> Self {
        // SAFETY: one pointer, which nothing writes through `&Item` (1);
        // the caller drops one of the two copies whole (`relocate`'s 1),
        // so each is owned once.
        unsafe { std::ptr::read(self) }
    }

    unsafe fn take_left_behind(_: *const Self) {}
}

impl<K, V> Watching for Item<K, V>
where
    K: ?Sized + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    type Target = K;

    fn watched(&self) -> &Weak<K> {
        self.key()
    }

    type Payload = Held<K, V>;

    fn hook(&self, _: &()) -> &Hook<Held<K, V>> {
        &self.hook
    }
}

/// The shared core; death callbacks reach their shard of its table, and
/// on their slower way the core itself, by uncounted addresses (M4, M14).
struct MapCore<K: ?Sized, V, S> {
    hasher: S,
    table: ShardedTable<Item<K, V>>,
    /// Loads in flight, per shard; locked after the shard's writer (K3).
    loads: Flights<Weak<K>, V>,
}

impl<K, V, S> Collection<Item<K, V>> for MapCore<K, V, S>
where
    K: ?Sized + Send + Sync + 'static,
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
/// [`contains_key`](Self::contains_key), iteration) take no lock, never
/// block and write nothing shared: a lookup pins the thread and probes the
/// table, and `with` runs its closure on the value in place, under that
/// pin. Writes lock one shard at a time and never wait for readers:
/// [`insert`](Self::insert) and [`remove`](Self::remove) say whether they
/// displaced a value rather than hand it back, since a reader may still be
/// borrowing it. A displaced value is dropped once no reader can see it.
/// Closures passed to `with`, `retain` and the values' `Clone` keep their
/// thread pinned while they run (which holds back the freeing of memory
/// that any thread retires meanwhile): keep them short.
///
/// Removed values are dropped on the finalizer thread once no reader can
/// see them (so by the next [`flush`](crate::flush) that follows a
/// collection of the epoch garbage), except those still in the map when it
/// is dropped, which go with it. After
/// [`shutdown`](crate::shutdown) there is no finalizer thread: a removed
/// value is dropped wherever epoch garbage is collected, which may be
/// inside another map operation (so its destructor must not use a map
/// then), and a dead key whose shard was busy keeps its entry, invisible
/// to lookups but counted by `len`, until the next
/// [`flush`](crate::flush), which removes it, waiting for the lock (or
/// [`purge`](Self::purge), [`retain`](Self::retain) or
/// [`clear`](Self::clear)).
///
/// Each entry is one allocation, which also holds the entry's death
/// callback, with the value inline, so a lookup reaches the value in one
/// step. A removed (or replaced) entry's value is dropped on time, but
/// that allocation stays registered on the key object until the key's
/// callback list is next compacted (which `remove`, `retain` and
/// replacing inserts count towards; `clear` and the map's drop do not) or
/// the key dies, holding the bytes of the value and of the key's `Weak`
/// (a key object's first six registrations, two on 32-bit targets, are
/// never compacted: they stay until it dies). For a large `V` whose long-lived keys lose their
/// entries, store `Box<V>` to give the bytes back at once.
///
/// An empty map is not free: it has four shards per CPU (at least 4, at
/// most 256), each with a small table, about 5 KiB in all on two CPUs.
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
/// Keys may be unsized objects (`WeakKeyMap<dyn Trait, V>`,
/// `WeakKeyMap<str, V>`): a key is named by the [`Strong`] it lives in.
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
pub struct WeakKeyMap<K: ?Sized, V, S = IdentityState> {
    core: Strong<MapCore<K, V, S>>,
}

impl<K, V> WeakKeyMap<K, V, IdentityState>
where
    K: ?Sized + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// An empty map.
    ///
    /// ```
    /// let map: weakrefs::WeakKeyMap<String, u32> = weakrefs::WeakKeyMap::new();
    /// assert!(map.is_empty());
    /// ```
    pub fn new() -> Self {
        Self::with_capacity_and_hasher(0, IdentityState::new())
    }

    /// An empty map with room for about `capacity` entries before any
    /// shard grows.
    ///
    /// # Panics
    ///
    /// If the tables for `capacity` entries would not fit in the address
    /// space (more than `isize::MAX` bytes: "capacity overflow"), as
    /// `HashMap::with_capacity` does. A size that fits but that the
    /// allocator cannot give aborts the process, as for any collection.
    ///
    /// ```
    /// let map: weakrefs::WeakKeyMap<String, u32> = weakrefs::WeakKeyMap::with_capacity(1_000);
    /// assert_eq!(map.len(), 0);
    /// ```
    pub fn with_capacity(capacity: usize) -> Self {
        Self::with_capacity_and_hasher(capacity, IdentityState::new())
    }
}

impl<K, V, S> WeakKeyMap<K, V, S>
where
    K: ?Sized + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    /// An empty map that hashes key addresses with `hasher`.
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// let map: weakrefs::WeakKeyMap<u8, u8, RandomState> = weakrefs::WeakKeyMap::with_hasher(RandomState::new());
    /// assert!(map.is_empty());
    /// ```
    pub fn with_hasher(hasher: S) -> Self {
        Self::with_capacity_and_hasher(0, hasher)
    }

    /// An empty map with room for about `capacity` entries, hashing key
    /// addresses with `hasher`.
    ///
    /// # Panics
    ///
    /// As `with_capacity`: if the tables for `capacity` entries
    /// would not fit in the address space.
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// let map: weakrefs::WeakKeyMap<u8, u8, RandomState> =
    ///     weakrefs::WeakKeyMap::with_capacity_and_hasher(64, RandomState::new());
    /// assert!(map.is_empty());
    /// ```
    pub fn with_capacity_and_hasher(capacity: usize, hasher: S) -> Self {
        WeakKeyMap {
            core: Strong::new_cyclic(|core| {
                let hooks = collection::hooks::<_, Item<K, V>>(core, false);
                let table = ShardedTable::with_capacity(capacity, false, hooks);
                MapCore {
                    hasher,
                    loads: Flights::new(table.shard_len()),
                    table,
                }
            }),
        }
    }

    #[inline(always)]
    fn hash(&self, key: &Strong<K>) -> u64 {
        crate::raw::hash_one(&self.core.hasher, &Strong::identity(key))
    }

    /// Makes the item for `value` under `key`, registering the death
    /// callback that will remove exactly this item (M4).
    fn new_item(&self, hash: u64, key: &Strong<K>, value: V) -> Item<K, V> {
        let held = Held {
            key: EntryWeak::new(Strong::downgrade(key)),
            value,
        };
        Item {
            hook: collection::remove_on_death(&self.core, hash, key, held),
        }
    }

    /// Inserts `value` under `key`'s object, held weakly. Returns true if
    /// it replaced a value, which is dropped once no reader can see it
    /// (on the finalizer thread).
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let key = Strong::new("request 1");
    /// assert!(!map.insert(&key, 10));
    /// assert!(map.insert(&key, 20)); // replaced 10
    /// assert_eq!(map.get(&key), Some(20));
    /// ```
    pub fn insert(&self, key: &Strong<K>, value: V) -> bool {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        let hash = self.hash(key);
        let item = self.new_item(hash, key, value);
        let pin = WritePin::lazy();
        let mut writer = self.core.table.write(hash, &pin);
        let Some((replaced, ())) = writer.upsert(hash, (item, ()), |old, _| old.key().names(key))
        else {
            return false;
        };
        // Detached once the replacement is published (M5).
        replaced.hook.detach();
        drop(writer);
        drop(pin);
        collection::note_detached(key);
        true
    }

    /// Looks `key` up lock-free and runs `f` on its value in place, under
    /// the lookup's pin (K1).
    #[inline]
    fn read<R>(&self, key: &Strong<K>, f: impl FnOnce(&V) -> R) -> Option<R> {
        let hash = self.hash(key);
        let pinned = self.core.table.pin();
        let item = self
            .core
            .table
            .candidates(hash, &pinned)
            .find(|item| item.key().names(key))?;
        let result = f(item.value());
        drop(pinned);
        Some(result)
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

    /// Applies `f` to the value under `key`'s object, in place, without
    /// cloning it. Lock-free; writers never wait for it: a value replaced
    /// or removed while `f` runs stays valid until `f` returns, and is
    /// dropped afterwards. `f` keeps the thread pinned: keep it short.
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
    #[inline]
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
        // The key is compared in the entry's node, beside the value: the
        // same read as `with`'s, but for the value. An entry being removed
        // right now may or may not be seen, as with any read racing a
        // write.
        let found = self
            .core
            .table
            .candidates(hash, &pinned)
            .any(|item| item.key().names(key));
        found
    }

    /// Removes the entry of `key`'s object. Returns true if there was one;
    /// its value is dropped once no reader can see it (on the finalizer
    /// thread).
    ///
    /// ```
    /// use weakrefs::{Strong, WeakKeyMap};
    ///
    /// let map = WeakKeyMap::new();
    /// let key = Strong::new("job");
    /// map.insert(&key, vec![1, 2, 3]);
    /// assert!(map.remove(&key));
    /// assert!(!map.remove(&key));
    /// assert_eq!(map.get(&key), None);
    /// ```
    pub fn remove(&self, key: &Strong<K>) -> bool {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        let hash = self.hash(key);
        let pin = WritePin::lazy();
        let mut writer = self.core.table.write(hash, &pin);
        let Some((removed, ())) = writer.remove(hash, |item, ()| item.key().names(key)) else {
            return false;
        };
        // Detached once the removal is published (M5).
        removed.hook.detach();
        drop(writer);
        drop(pin);
        collection::note_detached(key);
        true
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
    /// forever. Loads must not wait for each other either: an `init` that
    /// asks for a key whose `init`, on another thread, asks for this one
    /// waits forever, as two locks taken in opposite orders do, and an
    /// `init` must not call [`flush`](crate::flush) or
    /// [`shutdown`](crate::shutdown) (see `flush`). A
    /// destructor that panics as the call lets go of what it no longer
    /// needs (an unused `init`, a copy of the value, the load's key) has
    /// its panic reach the caller once everything is let go of, the value
    /// dropped too; on a thread that is unwinding already, it is reported
    /// on stderr instead and the value returned.
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
        // What the call lets go of before it hands its value back.
        let mut panics = FirstPanic::default();
        let value = loop {
            match self.find_or_join(key, true) {
                Ok(value) => break value,
                Err(Joined::Wait(load)) => {
                    if let Some(value) = load.wait() {
                        // Its last handle drops the waiters' copy.
                        panics.drop_step("a joined load's destructor", load);
                        break value;
                    }
                    // The leader failed: try again (perhaps as the leader).
                }
                Err(Joined::Lead(load)) => {
                    // A safe point (SAFETY.md, C18) once the load is over;
                    // a hit is none, which keeps hits free of it.
                    let _safe_point = SafePoint;
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
        // An unused `init` goes before the value is handed back (see
        // `FirstPanic::hand_back`).
        panics.drop_step("an unused init's destructor", init);
        panics.hand_back("a loaded value's destructor", value)
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
    /// Dropping a future is cancellation; forgetting one (`std::mem::forget`
    /// of a future already polled) is not. A forgotten leader leaves its
    /// load unfinished, and later callers for that key wait for it forever,
    /// as they would for a forgotten lock guard; a forgotten waiter keeps
    /// the load's outcome, a copy of the value, alive for good.
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
        // As in `get_or_insert_with`.
        let mut panics = FirstPanic::default();
        let value = loop {
            match self.find_or_join(key, false) {
                Ok(value) => break value,
                Err(Joined::Wait(load)) => {
                    if let Some(value) = load.wait_async().await {
                        // Its last handle drops the waiters' copy.
                        panics.drop_step("a joined load's destructor", load);
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
        panics.drop_step("an unused init's destructor", init);
        panics.hand_back("a loaded value's destructor", value)
    }

    /// A new value with its two clones, for the waiters and the leader,
    /// made before anything is locked or published: a panicking `Clone`
    /// fails the load like a panicking `init` (K3).
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
    /// (K3). `blocking` says whether the caller blocks its thread to wait.
    #[allow(clippy::type_complexity)]
    fn find_or_join(&self, key: &Strong<K>, blocking: bool) -> Result<V, Joined<Weak<K>, V>>
    where
        V: Clone,
    {
        if let Some(value) = self.get(key) {
            return Ok(value);
        }
        let hash = self.hash(key);
        // Taken before the lock and held past it: a value found under
        // the lock is cloned after the unlock (`Clone` is user code),
        // and its drop is deferred past this pin (K1).
        let pinned = self.core.table.pin();
        let pin = WritePin::held(&pinned);
        let writer = self.core.table.write(hash, &pin);
        let found = writer
            .candidates_pinned(hash, &pinned)
            .find(|item| item.key().names(key))
            .map(Item::value);
        if let Some(found) = found {
            drop(writer);
            // Found under the lock and readable while `pinned` lives: its
            // drop is deferred past our pin, which we hold until the clone
            // is made.
            let value = found.clone();
            drop(pin);
            drop(pinned);
            return Ok(value);
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
        drop(pin);
        drop(pinned);
        Err(joined)
    }

    /// Ends a load under the shard's writer lock (K3, M6): withdraws it and,
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
        // Keeps a found value alive after the unlock.
        let pinned = self.core.table.pin();
        let pin = WritePin::held(&pinned);
        let mut writer = self.core.table.write(hash, &pin);
        let withdrawn = self
            .core
            .loads
            .withdraw(self.core.table.shard_index(hash), load);
        let (value, shared, ours) = made?;
        let existing = writer
            .candidates_pinned(hash, &pinned)
            .find(|item| item.key().names(key))
            .map(Item::value);
        let Some(existing) = existing else {
            let item = self.new_item(hash, key, value);
            // Never replaces: no entry under the key (checked above).
            writer.upsert(hash, (item, ()), |_, _| false);
            drop(writer);
            drop(pin);
            settle.outcome = Some(shared);
            drop(settle);
            drop(withdrawn);
            return Some(ours);
        };
        drop(writer);
        drop(withdrawn);
        // Found under the lock and readable while `pinned` lives: its drop
        // is deferred past our pin (K1).
        let adopted = existing.clone();
        drop(pin);
        drop(pinned);
        settle.outcome = Some(adopted.clone());
        // User code, outside the pin and before the outcome is handed back,
        // each on its own (`FirstPanic::hand_back`): our unused copies, then
        // the waiters' wakers.
        let mut panics = FirstPanic::default();
        panics.drop_step("an unused value's destructor", value);
        panics.drop_step("an unused value's destructor", shared);
        panics.drop_step("an unused value's destructor", ours);
        panics.drop_step("a settled load's destructor", settle);
        Some(panics.hand_back("an adopted value's destructor", adopted))
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
    /// change the map; it may or may not see those changes. A key present
    /// throughout is yielded once, with its old value or its new one if
    /// another thread replaces it meanwhile. (The iteration scans a shard
    /// again, up to eight times, when such a replacement changed it in two
    /// steps as it passed, so values' `Clone` may run more than once, and
    /// a discarded copy's drop runs inside `next`, which passes on its
    /// panic with no entry lost to the iteration. It never waits for a
    /// writer: against one descheduled between those two steps, or
    /// replacing keys of one shard faster than that, it keeps a scan that
    /// may show a key twice or not at all.)
    ///
    /// The iterator snapshots one shard at a time, and holds a `Strong` to
    /// each key (and a clone of each value) of the current shard's
    /// snapshot until it yields it or is dropped ([`keys`](Self::keys)
    /// too): a key object whose last other handle goes meanwhile dies only
    /// then, and its entry leaves the map then. Keep iterators
    /// short-lived; one forgotten with `std::mem::forget` keeps those keys
    /// alive for good.
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
            let key = item.key().upgrade()?;
            Some((key, item.value().clone()))
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
        collection::snapshots(&self.core.table, |item| item.key().upgrade())
    }

    /// Keeps only the live entries for which `f` returns true; removes the
    /// rest (and any dead ones). `f` runs at most once per live entry,
    /// without any lock held; an entry replaced or removed meanwhile is
    /// left alone.
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
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        collection::retain_live(
            &self.core.table,
            |item, key| f(key, item.value()),
            |_, _| {},
        );
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
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        collection::clear(&self.core.table, |_, _| None::<()>, |()| {});
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
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        collection::purge(&self.core.table, |_, _| None::<()>, |()| {})
    }
}

impl<K, V, S> Default for WeakKeyMap<K, V, S>
where
    K: ?Sized + Send + Sync + 'static,
    V: Send + Sync + 'static,
    S: BuildHasher + Default + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::with_capacity_and_hasher(0, S::default())
    }
}

impl<K: ?Sized, V, S> fmt::Debug for WeakKeyMap<K, V, S> {
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
#[cfg_attr(docsrs, doc(cfg(feature = "rayon")))]
impl<'a, K, V, S> rayon::iter::IntoParallelIterator for &'a WeakKeyMap<K, V, S>
where
    K: ?Sized + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    type Item = (Strong<K>, V);
    type Iter = crate::ParIter<'a, (Strong<K>, V)>;

    fn into_par_iter(self) -> Self::Iter {
        let table = &self.core.table;
        crate::ParIter::new(table.shard_len(), move |shard| {
            collection::shard_snapshot(table, shard, |item: &Item<K, V>| {
                let key = item.key().upgrade()?;
                Some((key, item.value().clone()))
            })
        })
    }
}
