//! `WeakValueMap`: a concurrent map whose values are held weakly.

use std::any::Any;
use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::{poll_fn, Future};
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::panic::{self, AssertUnwindSafe};
use std::pin::pin;
use std::ptr;
use std::sync::Arc;

use crate::callbacks::{Executor, Hook, SafePoint};
use crate::marks;
use crate::panics::{drop_each_then_resume, FirstPanic};
use crate::raw::collection::{self, Collection, EntryHook, Watching};
use crate::raw::counters::Counters;
use crate::raw::plain_drop;
use crate::raw::single_flight::{self, Flight, Flights, Joined, Settle};
use crate::raw::table::{Relocatable, ShardWriter, ShardedTable, Sided, SlotMark, WritePin};
use crate::raw::tier::{Candidate, Tier};
use crate::strong::Strong;
use crate::sync::AtomicU64;
use crate::weak::{EntryWeak, Weak};

/// One entry, inline in its slot: a lookup reads its control byte, the key and the
/// value's pointer from the slot, then the value's control block. A
/// rebuild clones the key into the new table rather than copying its bytes,
/// which readers' `Eq` may be writing through `&K` (SAFETY.md, M3). Its
/// death callback is in the slot's side ([`EntryHook`]), out of the lines
/// lookups probe: 16 bytes an entry there for a word-sized key, not 24.
struct Item<K, V: ?Sized> {
    key: K,
    value: EntryWeak<V>,
}

impl<K, V: ?Sized> Item<K, V> {
    fn key(&self) -> &K {
        &self.key
    }
}

impl<K, V: ?Sized> Sided for Item<K, V> {
    type Side = EntryHook;
    /// A map with a keep-warm tier marks its slots.
    type Marks = ();

    /// The hook, then the value's `Weak`, for the references the hook
    /// says it stands for (C21), then the key, whose drop may be user
    /// code and panic.
    #[inline]
    unsafe fn drop_with_side(item: *mut Self, side: *mut EntryHook) {
        // SAFETY: owned, each field dropped once and none used after (the
        // caller's 1).
        unsafe {
            EntryHook::drop_with_weak(side, ptr::addr_of!((*item).value));
            ptr::drop_in_place(ptr::addr_of_mut!((*item).key));
        }
    }
}

// Each item registers its own callback, whose node the `Hook` in its
// slot's side keeps allocated until the item is dropped, after every
// thread that saw it has unpinned: the node's address is unique among live
// items and shared by an item and its relocated copy. (The key's address
// would not do: a zero-sized key is never allocated, so all share one
// address.) `relocate` clones the key through `&K`; `take_left_behind`
// moves out exactly that key.
// The side is a `Hook`, one pointer, never written through `&` and
// dropped as our own code (a detach and a count).
// SAFETY: only the `Weak`, a pointer never written through `&Item`, is
// copied bitwise (1); the key as said (2); the identity (3); the side (4).
unsafe impl<K: Clone + Send + 'static, V: ?Sized> Relocatable for Item<K, V> {
    /// The key's destructor may be user code; the rest (the `Weak`) is
    /// ours.
    #[inline(always)]
    fn drop_runs_user_code() -> bool {
        plain_drop::runs_user_code::<K>()
    }

    /// The key a relocation cloned from.
    type LeftBehind = K;

    fn identity(&self, side: &EntryHook) -> usize {
        side.0.identity()
    }

    fn filed(&self, side: &EntryHook) -> u32 {
        side.0.key()
    }

    fn prefetch_filed(&self, side: &EntryHook) {
        side.0.prefetch();
    }

    unsafe fn relocate(&self) -> Self {
        // First, since it may panic: then nothing is copied.
        let key = self.key.clone();
        // Read while readers may read it too.
        // SAFETY: a pointer never written through `&Item`; the caller drops
        // one of the two items whole and the other's key only (`relocate`'s
        // 1), so it is owned once.
        let value = unsafe { ptr::read(&self.value) };
        Item { key, value }
    }

    unsafe fn take_left_behind(this: *const Self) -> K {
        // SAFETY: `this` is initialised and nobody else reads it; the key is
        // moved out once (`take_left_behind`'s 1, 2), and the rest, owned by
        // the counterpart, is never dropped through `this`.
        unsafe { ptr::addr_of!((*this).key).read() }
    }
}

impl<K, V> Watching for Item<K, V>
where
    K: Clone + Send + Sync + 'static,
    V: ?Sized + Send + Sync + 'static,
{
    type Target = V;

    fn watched(&self) -> &Weak<V> {
        &self.value
    }

    type Payload = ();

    fn hook<'a>(&'a self, side: &'a EntryHook) -> &'a Hook {
        &side.0
    }
}

/// A single-flight load of one key (M6): it keeps the key until the item
/// is published, and hands its waiters the value.
type Load<K, V> = Flight<K, Strong<V>>;

/// Why an entry left a [`WeakValueMap`], as its removal listener
/// ([`WeakValueMapBuilder::on_remove`]) hears it. The cause is what removed
/// the entry: one whose value had died, but that an insert replaced (or a
/// remove or clear removed) before its death callback ran, reports that.
///
/// ```
/// use weakrefs::RemovalCause;
///
/// assert_ne!(RemovalCause::Died, RemovalCause::Removed);
/// assert_eq!(format!("{:?}", RemovalCause::Replaced), "Replaced");
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalCause {
    /// The value died (its last [`Strong`] was dropped) and its death
    /// callback, or [`purge`](WeakValueMap::purge), removed the entry.
    Died,
    /// [`remove`](WeakValueMap::remove), [`remove_if`](WeakValueMap::remove_if)
    /// or [`retain`](WeakValueMap::retain) removed it.
    Removed,
    /// An insert under the same key replaced it.
    Replaced,
    /// [`clear`](WeakValueMap::clear) removed it.
    Cleared,
}

/// What a write lets go of (values the keep-warm tier held, a replaced
/// entry's value), dropped after the unlock: each on its own, so that a
/// destructor that panics (user code: any may be the last handle) neither
/// skips the others nor, with a second panic during the first's
/// unwinding, aborts the process. The first panic is resumed once all are
/// dropped (reported instead if the thread is unwinding already).
#[must_use = "dropped after the unlock"]
struct Released<V: ?Sized>(ManuallyDrop<[Option<Strong<V>>; 4]>);

impl<V: ?Sized> Released<V> {
    fn none() -> Self {
        // `ManuallyDrop`: `drop` empties it, so that a write that lets go
        // of nothing pays for no drop glue.
        Released(ManuallyDrop::new([None, None, None, None]))
    }

    /// Adds `value`, if any. At most four: a write lets go of a replaced
    /// value and, in the tier, of its entry's value and an evicted one,
    /// and a load of the value it was given.
    fn add(&mut self, value: Option<Strong<V>>) {
        if let Some(value) = value {
            let free = self.0.iter_mut().find(|slot| slot.is_none());
            *free.expect("a write lets go of four values at most") = Some(value);
        }
    }

    #[inline(always)]
    fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    fn of(value: Option<Strong<V>>) -> Self {
        let mut released = Released::none();
        released.add(value);
        released
    }

    /// The drop of a `Released` that holds something.
    #[inline(never)]
    fn drop_each(&mut self) {
        let values = self.0.iter_mut().map(Option::take);
        drop_each_then_resume("a released value's destructor", values);
    }
}

impl<V: ?Sized> Drop for Released<V> {
    #[inline(always)]
    fn drop(&mut self) {
        // Most writes let go of nothing.
        if !self.is_empty() {
            self.drop_each();
        }
    }
}

/// What a removal tells the listener, taken under the shard's lock: `None`
/// if nobody listens, else the key's clone, or the panic of the key's
/// `Clone` making it, caught there so that the removal's other steps
/// (detaching, letting the tier go) still run, and resumed by
/// `MapCore::report` once the caller has unlocked.
type Notice<K> = Option<Result<K, Box<dyn Any + Send>>>;

/// A map's removal listener.
type Listener<K> = Arc<dyn Fn(&K, RemovalCause) + Send + Sync>;

/// Calls `listener` with the key a [`Notice`] made and `cause`, then
/// drops the key; if the listener panics, the key is dropped before the
/// panic is resumed, so that a key whose destructor panics too cannot
/// abort the process by panicking during that unwinding. If the key's
/// `Clone` panicked instead, resumes that panic.
fn tell<K>(listener: &Listener<K>, key: Result<K, Box<dyn Any + Send>>, cause: RemovalCause) {
    let key = key.unwrap_or_else(|payload| panic::resume_unwind(payload));
    let mut panics = FirstPanic::default();
    panics.run("a removal listener", || listener(&key, cause));
    panics.drop_step("a key's destructor", key);
    panics.resume();
}

/// What a [`WeakValueMap`] has counted since it was made
/// ([`WeakValueMap::stats`]). Each thread counts on a cache line of its
/// own, so counting costs a read no shared write; the figures are exact
/// once the counting threads are quiet.
///
/// ```
/// use weakrefs::{flush, Strong, WeakValueMap};
///
/// let map = WeakValueMap::new();
/// let page = map.get_or_insert_with("home", || "<h1>home</h1>");
/// assert!(map.get("home").is_some());
/// assert!(map.get("away").is_none());
/// drop(page);
/// flush();
/// let stats = map.stats();
/// assert_eq!((stats.loads, stats.hits, stats.misses, stats.died), (1, 1, 1, 1));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapStats {
    /// Calls of `get` and of the `get_or_insert_with` family that found a
    /// live value in the map. (A `get` still running when the stats are
    /// read may count here before it ends as a miss.)
    pub hits: u64,
    /// Calls of `get` that found none.
    pub misses: u64,
    /// `init` closures (or futures) run by the `get_or_insert_with`
    /// family, successful or not.
    pub loads: u64,
    /// Callers of the `get_or_insert_with` family that waited for another
    /// caller's load and received its value (not also counted as hits).
    pub joined: u64,
    /// Loads whose `init` returned `Err` or panicked.
    pub load_failures: u64,
    /// Entries removed because their value died: by its death callback,
    /// or by [`purge`](WeakValueMap::purge) before the callback could.
    pub died: u64,
}

/// Indices into a map's counters. `get` counts its calls (`GETS`) before
/// it looks and its misses after, and its hits are the difference: a count
/// that waited on the lookup's outcome would make the next lookup wait for
/// this one's value to arrive from memory (measured: 10% of a read at
/// 100 000 keys), where one made up front waits for nothing. The
/// `get_or_insert_with` family counts its hits as `HITS`. Deaths are
/// counted by the table's shards (`ShardedTable::deaths`).
const HITS: usize = 0;
const MISSES: usize = 1;
const LOADS: usize = 2;
const JOINED: usize = 3;
const LOAD_FAILURES: usize = 4;
const GETS: usize = 5;
const COUNTERS: usize = 6;

/// Runs a load's `init`, counting its failure: an error it returns, or a
/// panic out of it. Only `init`'s own: a panic later in the same call (a
/// listener, an evicted value's destructor) fails no load, and an `init`
/// that returns normally while its thread unwinds from an unrelated panic
/// (a load made by a destructor) has not failed either.
fn count_failure<T, E>(
    counters: &Counters<COUNTERS>,
    init: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    count_if_err(counters, failed_if_it_panics(counters, init))
}

/// [`count_failure`] for an async `init`: a panic out of the closure that
/// makes its future, or out of one of the future's polls, counts; the
/// future dropped between polls (a cancelled leader) does not.
async fn count_failure_async<T, E, Fut>(
    counters: &Counters<COUNTERS>,
    init: impl FnOnce() -> Fut,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut init = pin!(failed_if_it_panics(counters, init));
    let made = poll_fn(|cx| failed_if_it_panics(counters, || init.as_mut().poll(cx))).await;
    count_if_err(counters, made)
}

/// Runs `step` of a load's `init`, counting a failed load if it panics.
fn failed_if_it_panics<R>(counters: &Counters<COUNTERS>, step: impl FnOnce() -> R) -> R {
    let unwinding = FailedIfDropped(counters);
    let done = step();
    std::mem::forget(unwinding);
    done
}

/// Counts a failed load if `made` is an error.
fn count_if_err<T, E>(counters: &Counters<COUNTERS>, made: Result<T, E>) -> Result<T, E> {
    if made.is_err() {
        counters.bump(LOAD_FAILURES);
    }
    made
}

/// Counts a failed load when dropped: forgotten once `init` (or one poll
/// of it) returns, so dropped only by a panic unwinding out of it.
struct FailedIfDropped<'a>(&'a Counters<COUNTERS>);

impl Drop for FailedIfDropped<'_> {
    fn drop(&mut self) {
        self.0.bump(LOAD_FAILURES);
    }
}

/// The shared core; death callbacks reach their shard of its table, and
/// on their slower way the core itself, by uncounted addresses, so they
/// never keep a map alive, and do nothing once it is gone (M4, M14).
struct MapCore<K, V: ?Sized, S> {
    hasher: S,
    table: ShardedTable<Item<K, V>>,
    /// Loads in flight, per shard; locked after the shard's writer.
    loads: Flights<K, Strong<V>>,
    /// Told of every entry that leaves the map, outside any shard lock.
    listener: Option<Listener<K>>,
    /// What `stats` reports, but for deaths, which the table's shards
    /// count under their locks (a death's removal reaches its shard only).
    counters: Counters<COUNTERS>,
    /// The keep-warm tier (`keep_recent`), if any (M13).
    tier: Option<Tier<V>>,
}

impl<K, V, S> Collection<Item<K, V>> for MapCore<K, V, S>
where
    K: Clone + Send + Sync + 'static,
    V: ?Sized + Send + Sync + 'static,
    S: Send + Sync + 'static,
{
    fn table(&self) -> &ShardedTable<Item<K, V>> {
        &self.table
    }

    fn died(&self, item: &Item<K, V>) -> Option<Box<dyn FnOnce() + Send>> {
        let listener = self.listener.clone()?;
        // Under the lock, on the finalizer thread: `Clone` may run there.
        // Its panic, caught, is resumed by the job, whose runner reports it.
        let key = self.notice(item)?;
        Some(Box::new(move || tell(&listener, key, RemovalCause::Died)))
    }
}

impl<K: Clone, V: ?Sized, S> MapCore<K, V, S> {
    /// Lets the tier forget an entry (whose slot's side is `hook`) leaving
    /// the map under the caller's shard lock; what it held is for the
    /// caller to drop after the unlock.
    fn forget(&self, hook: &EntryHook) -> Option<Strong<V>> {
        self.tier.as_ref()?.forget(hook.0.identity())
    }

    /// What to report an entry's removal with, if anyone listens: the key,
    /// cloned under the lock, reported after it ([`Notice`]). Never
    /// panics.
    fn notice(&self, item: &Item<K, V>) -> Notice<K> {
        self.listener.as_ref()?;
        Some(panic::catch_unwind(AssertUnwindSafe(|| item.key().clone())))
    }

    /// Tells the listener that `notice`'s entry left, for `cause`, or
    /// resumes the panic of the `Clone` that failed to make its key.
    /// Outside any shard lock.
    fn report(&self, notice: Notice<K>, cause: RemovalCause) {
        if let (Some(listener), Some(key)) = (&self.listener, notice) {
            tell(listener, key, cause);
        }
    }
}

/// A concurrent map whose values are held weakly, like Python's
/// `weakref.WeakValueDictionary`: an entry disappears on its own once the
/// last [`Strong`] to its value is dropped.
///
/// Reads ([`get`](Self::get), [`contains_key`](Self::contains_key),
/// iteration) take no lock and never block. Writes lock one shard at a
/// time and never block readers. Keys' `Eq` (and `Borrow`, with the
/// borrowed form's `Eq`, in [`remove`](Self::remove)) and `Clone` run
/// while a shard is locked and must not use the same map, nor call
/// [`flush`](crate::flush) or [`shutdown`](crate::shutdown): a value of
/// that shard dying meanwhile has its entry's removal wait for the lock on
/// the finalizer thread, and those calls wait for that thread. `Hash` runs
/// before locking.
///
/// Keys are stored inline, where lookups probe. When a shard's table grows
/// or sheds its removed entries, its keys are *cloned* into the new table
/// (never copied bitwise, since a reader's `Eq` may be writing through
/// `&K` at that moment), and the originals are dropped on the finalizer
/// thread once no reader can see them: hence `K: Clone`, and keys are
/// cloned, and dropped, some unspecified number of times. A `Clone` that
/// panics makes the insert that grew the table panic and leaves the map as
/// it was (the next insert that grows that shard tries again).
/// A removed entry's key is dropped on the finalizer thread once no reader
/// can still see it, unless its drop only frees memory (`String`,
/// `Box<str>`, `Arc<str>`, `Vec<u8>`, `PathBuf` and the like, or a type
/// without a destructor): then it is freed wherever the epoch frees it,
/// as the table's other memory is, which keeps the finalizer thread out of
/// churn of string-keyed maps. (A thread hands what it removed to the
/// epoch 32 entries at a time, or when it exits: one that goes idle right
/// after a removal keeps up to 31 such entries, keys and all, until it
/// next writes or exits, and [`flush`](crate::flush) cannot reach them.)
/// Keys still in the map when it goes are dropped by
/// whoever drops its last handle, never by a dying value's thread. A
/// value's death removes its entry on the dying thread when the shard's
/// lock is free, else on the finalizer thread. After
/// [`shutdown`](crate::shutdown) there is no finalizer thread: a removed
/// key is dropped wherever that is noticed, which may be inside another map
/// operation (so a key's destructor must not use a map after shutdown), the
/// map may be dropped by a dying value's thread, and a dead entry whose
/// shard was busy stays, invisible to lookups, until the next
/// [`flush`](crate::flush), which removes it, waiting for the lock (or
/// [`purge`](Self::purge)). [`retain`](Self::retain)'s predicate runs
/// unlocked, once per entry, but keeps the thread pinned while it runs
/// (which holds back the freeing of memory that any thread retires
/// meanwhile: keep it short). The removal of a dead entry runs as a
/// death callback (see [`finalize`](crate::finalize)), so [`len`](Self::len)
/// is exact after [`flush`](crate::flush), and it removes only the entry
/// that named the dead value: a newer value inserted under the same key
/// survives it.
///
/// Values may be unsized (`WeakValueMap<K, str>`, `<K, [u8]>`,
/// `<K, dyn Trait>`), inserted as the [`Strong`] they live in; the
/// `get_or_insert_with` family, whose `init` returns the value itself,
/// needs a sized one.
///
/// Each entry registers its death callback on its value: one 24-byte
/// allocation (16 bytes on 32-bit targets). An entry that leaves any
/// other way detaches it at once; the detached node leaves the value's
/// callback list at the list's next compaction, or when the value dies. A
/// value's first six registrations (two on 32-bit targets) live inline in
/// its header, where nothing compacts: a value filed under that many
/// entries or fewer in its whole life keeps their detached nodes until it
/// dies. Past that, [`remove`](Self::remove),
/// [`remove_if`](Self::remove_if), [`retain`](Self::retain) and replacing
/// inserts count towards the compaction, so a value that outlives a peak
/// of entries naming it gets its memory back as they leave; entries that
/// leave through [`clear`](Self::clear) or the map's drop leave their
/// nodes (24 bytes each) until the value gets about as many new
/// registrations as its list kept, or dies.
/// [`shrink_to_fit`](Self::shrink_to_fit) gives back table memory only.
///
/// An empty map is not free: it has four shards per CPU (at least 4, at
/// most 256), each with a small table, about 8 KiB in all on two CPUs.
/// Prefer one map over many small ones (one per object, say).
///
/// # Examples
///
/// A cache of decoded images shared by worker threads; each image lives as
/// long as some request holds it:
///
/// ```
/// use weakrefs::{flush, Strong, WeakValueMap};
///
/// let cache: WeakValueMap<String, Vec<u8>> = WeakValueMap::new();
/// let image = cache.get_or_insert_with("logo.png".to_string(), || vec![0; 1024]);
/// let again = cache.get_or_insert_with("logo.png".to_string(), || unreachable!());
/// assert!(Strong::ptr_eq(&image, &again));
///
/// drop((image, again)); // the last holders are gone
/// flush();              // let the death callback remove the entry
/// assert!(cache.get("logo.png").is_none());
/// assert_eq!(cache.len(), 0);
/// ```
pub struct WeakValueMap<K, V: ?Sized, S = RandomState> {
    core: Strong<MapCore<K, V, S>>,
}

impl<K, V> WeakValueMap<K, V, RandomState>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: ?Sized + Send + Sync + 'static,
{
    /// An empty map.
    ///
    /// ```
    /// let map: weakrefs::WeakValueMap<u32, String> = weakrefs::WeakValueMap::new();
    /// assert!(map.is_empty());
    /// ```
    pub fn new() -> Self {
        Self::with_capacity_and_hasher(0, RandomState::new())
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
    /// let map: weakrefs::WeakValueMap<u32, String> = weakrefs::WeakValueMap::with_capacity(10_000);
    /// assert_eq!(map.len(), 0);
    /// ```
    pub fn with_capacity(capacity: usize) -> Self {
        Self::with_capacity_and_hasher(capacity, RandomState::new())
    }

    /// A builder for a map with a capacity, a hasher or a removal
    /// listener.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use weakrefs::{flush, RemovalCause, Strong, WeakValueMap};
    ///
    /// let log = Arc::new(Mutex::new(Vec::new()));
    /// let heard = log.clone();
    /// let map = WeakValueMap::builder()
    ///     .capacity(1024)
    ///     .on_remove(move |key: &u32, cause| heard.lock().unwrap().push((*key, cause)))
    ///     .build();
    /// let (a, b) = (Strong::new("a"), Strong::new("b"));
    /// map.insert(1, &a);
    /// map.insert(1, &b); // replaces a
    /// drop(b);
    /// flush(); // the death is heard on the finalizer thread
    /// assert_eq!(
    ///     *log.lock().unwrap(),
    ///     [(1, RemovalCause::Replaced), (1, RemovalCause::Died)]
    /// );
    /// ```
    pub fn builder() -> WeakValueMapBuilder<K, V, RandomState> {
        WeakValueMapBuilder {
            capacity: 0,
            keep_recent: 0,
            record_stats: true,
            hasher: RandomState::new(),
            listener: None,
            _values: PhantomData,
        }
    }
}

/// Builds a [`WeakValueMap`] (see [`WeakValueMap::builder`]).
pub struct WeakValueMapBuilder<K, V: ?Sized, S = RandomState> {
    capacity: usize,
    keep_recent: usize,
    record_stats: bool,
    hasher: S,
    listener: Option<Listener<K>>,
    _values: PhantomData<fn() -> V>,
}

impl<K, V, S> WeakValueMapBuilder<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: ?Sized + Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    /// Room for about `n` entries before any shard grows (0 by default).
    ///
    /// # Panics
    ///
    /// [`build`](Self::build) panics if the tables for `n` entries would
    /// not fit in the address space, as
    /// [`WeakValueMap::with_capacity`] does.
    ///
    /// ```
    /// let map = weakrefs::WeakValueMap::<u64, u64>::builder().capacity(500).build();
    /// assert!(map.capacity() >= 500);
    /// ```
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n;
        self
    }

    /// Keeps up to `n` values alive even when no caller holds them, chosen
    /// among those recently inserted, loaded or found, the ones wanted most
    /// often first: the map holds a [`Strong`] to each (0, the default,
    /// holds none). A popular object then survives the moments between
    /// requests instead of being rebuilt, and memory stays bounded by the
    /// `n` plus what callers hold.
    ///
    /// Recency is approximated (CLOCK): a hit on a value the tier holds
    /// costs no lock and no read-modify-write once it is marked, and, until
    /// the CLOCK hand next passes it, reads nothing beyond the entry's slot
    /// and one word all readers share; admitting a value takes the tier's
    /// lock and its shard's (a found value tries only if both are free:
    /// a read never waits). While the tier has
    /// room, every inserted, loaded or found value enters. Once it is
    /// full, each inserted or loaded value, and one time in 1024 a found
    /// value it does not hold, is weighed against the value the CLOCK hand
    /// would evict, as TinyLFU weighs them: a sketch of 4-bit counters (8
    /// to 16 bytes a position, 2 KiB at least) remembers about how often each key's hash
    /// was wanted lately, and the newcomer takes the place only if it was
    /// wanted more often, or as often when both were wanted at most once. The sketch counts those attempts to enter and, for values
    /// held, each pass of the hand that finds them hit since its last pass;
    /// it halves every count after `20 * n` counts, so what was popular
    /// long ago fades. So one-off loads from a long tail of cold keys do
    /// not push out hot values that nobody happens to hold at that moment,
    /// while a value wanted again and again soon gets in. The bound is
    /// exact: the tier never holds more than `n`, and once `n` values have
    /// entered it holds `n`. It counts entries: a value filed under two
    /// keys takes two of its places. Evicting a value only drops the map's hold: a
    /// value some caller holds stays in the map and is still found. An
    /// entry that leaves the map (removed, replaced, cleared) leaves the
    /// tier too; a value in the tier cannot die. The evicted value is
    /// dropped by the thread whose access evicted it, outside every lock.
    ///
    /// The tier's `n` positions are allocated when the map is built, about
    /// 42 bytes each with the sketch (405 MiB for ten million), not as
    /// values enter: size `n` to what the map should keep, not as a way to
    /// say "unbounded". It is capped at `u32::MAX - 1`; a tier the
    /// allocator cannot give aborts the process, as a `Vec` of that
    /// capacity would.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::builder().keep_recent(2).build();
    /// for page in ["a", "b", "c"] {
    ///     map.get_or_insert_with(page, || page.to_uppercase());
    /// }
    /// // Nobody holds the pages, yet the two most recent are still there.
    /// assert!(map.get("a").is_none());
    /// assert_eq!(map.get("b").as_deref().map(String::as_str), Some("B"));
    /// assert_eq!(map.get("c").as_deref().map(String::as_str), Some("C"));
    ///
    /// // A page wanted between one-off loads stays; the one-offs pass.
    /// let map = WeakValueMap::builder().keep_recent(1).build();
    /// map.get_or_insert_with("home", || "HOME".to_string());
    /// for page in ["x", "y", "z"] {
    ///     assert!(map.get("home").is_some());
    ///     map.get_or_insert_with(page, || page.to_uppercase());
    /// }
    /// assert!(map.get("home").is_some());
    /// assert!(map.get("z").is_none());
    /// ```
    pub fn keep_recent(mut self, n: usize) -> Self {
        self.keep_recent = n;
        self
    }

    /// Whether the map counts what [`WeakValueMap::stats`] reports (on by
    /// default). Counting costs a lookup a few instructions: a
    /// thread-local load and an increment of a counter on a cache line of
    /// the thread's own, no read-modify-write and no line shared with
    /// other threads (for the first four threads per CPU, at most 64, to
    /// count in the map; later ones share a line and add atomically).
    /// Off, `stats` reports zeros.
    ///
    /// ```
    /// use weakrefs::{MapStats, Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::builder().record_stats(false).build();
    /// let value = Strong::new(1);
    /// map.insert("one", &value);
    /// assert!(map.get("one").is_some());
    /// assert_eq!(map.stats(), MapStats::default());
    /// ```
    pub fn record_stats(mut self, on: bool) -> Self {
        self.record_stats = on;
        self
    }

    /// Hashes keys with `hasher` (std's `RandomState` by default).
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// let map = weakrefs::WeakValueMap::<u64, u64>::builder()
    ///     .hasher(RandomState::new())
    ///     .build();
    /// assert!(map.is_empty());
    /// ```
    pub fn hasher<S2>(self, hasher: S2) -> WeakValueMapBuilder<K, V, S2>
    where
        S2: BuildHasher + Send + Sync + 'static,
    {
        WeakValueMapBuilder {
            capacity: self.capacity,
            keep_recent: self.keep_recent,
            record_stats: self.record_stats,
            hasher,
            listener: self.listener,
            _values: PhantomData,
        }
    }

    /// Calls `f` once for every entry that leaves the map, with its key
    /// and why ([`RemovalCause`]), never under a shard lock. Entries that
    /// [`Died`](RemovalCause::Died) are heard on the finalizer thread (or,
    /// after [`shutdown`](crate::shutdown), wherever the death is noticed),
    /// and with a listener their removal runs there too rather than on the
    /// dying thread; the others in the thread that removed them, before
    /// that call returns. Entries still in the map when it is dropped are
    /// not reported. `f` gets a clone of the key (made under the lock, but
    /// for [`retain`](WeakValueMap::retain)'s, made after it) and may use
    /// the map. A panic in `f` reaches the caller of the method that
    /// removed the entry, after the removal (on the finalizer thread it is
    /// caught and reported, as a callback's is); so does a panic in the
    /// key's `Clone` making that copy, in place of that one call of `f`.
    /// A method that removes many entries ([`clear`](WeakValueMap::clear),
    /// [`retain`](WeakValueMap::retain)) still removes and reports every
    /// other one, then passes on the first panic; later ones are reported
    /// on stderr. [`purge`](WeakValueMap::purge) removes dead entries as
    /// their deaths would have, so it hears them as deaths are heard, on
    /// the finalizer thread, where a panic is caught and reported.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let removed = Arc::new(AtomicUsize::new(0));
    /// let count = removed.clone();
    /// let map = WeakValueMap::builder()
    ///     .on_remove(move |_: &&str, _| {
    ///         count.fetch_add(1, Ordering::SeqCst);
    ///     })
    ///     .build();
    /// let v = Strong::new(1);
    /// map.insert("one", &v);
    /// map.remove("one");
    /// assert_eq!(removed.load(Ordering::SeqCst), 1);
    /// ```
    pub fn on_remove<F>(mut self, f: F) -> Self
    where
        F: Fn(&K, RemovalCause) + Send + Sync + 'static,
    {
        self.listener = Some(Arc::new(f));
        self
    }

    /// The map.
    ///
    /// ```
    /// let map: weakrefs::WeakValueMap<String, Vec<u8>> =
    ///     weakrefs::WeakValueMap::builder().build();
    /// assert!(map.is_empty());
    /// ```
    pub fn build(self) -> WeakValueMap<K, V, S> {
        WeakValueMap::build(
            self.capacity,
            self.hasher,
            self.listener,
            self.keep_recent,
            self.record_stats,
        )
    }
}

impl<K, V: ?Sized, S> fmt::Debug for WeakValueMapBuilder<K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakValueMapBuilder")
            .field("capacity", &self.capacity)
            .field("keep_recent", &self.keep_recent)
            .field("record_stats", &self.record_stats)
            .field("on_remove", &self.listener.is_some())
            .finish_non_exhaustive()
    }
}

impl<K, V, S> WeakValueMap<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: ?Sized + Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    /// An empty map that hashes keys with `hasher`.
    ///
    /// The map picks a key's shard by the top bits of its hash and files
    /// it within the shard by bits 4 to 31, so a hasher should spread its
    /// output over both, as std's and the common fast hashers do: keys
    /// whose hashes differ only in other bits share a probe sequence.
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// let map: weakrefs::WeakValueMap<u32, u32> =
    ///     weakrefs::WeakValueMap::with_hasher(RandomState::new());
    /// assert!(map.is_empty());
    /// ```
    pub fn with_hasher(hasher: S) -> Self {
        Self::with_capacity_and_hasher(0, hasher)
    }

    /// An empty map with room for about `capacity` entries, hashing keys
    /// with `hasher`.
    ///
    /// # Panics
    ///
    /// As `with_capacity`: if the tables for `capacity` entries
    /// would not fit in the address space.
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// let map: weakrefs::WeakValueMap<u32, u32> =
    ///     weakrefs::WeakValueMap::with_capacity_and_hasher(64, RandomState::new());
    /// assert!(map.is_empty());
    /// ```
    pub fn with_capacity_and_hasher(capacity: usize, hasher: S) -> Self {
        Self::build(capacity, hasher, None, 0, true)
    }

    fn build(
        capacity: usize,
        hasher: S,
        listener: Option<Listener<K>>,
        keep_recent: usize,
        record_stats: bool,
    ) -> Self {
        WeakValueMap {
            core: Strong::new_cyclic(|core| {
                let hears_deaths = listener.is_some();
                let hooks = collection::hooks::<_, Item<K, V>>(core, hears_deaths);
                // A mark per slot for the keep-warm tier's positions (M13).
                let table = ShardedTable::with_capacity(capacity, keep_recent > 0, hooks);
                MapCore {
                    hasher,
                    loads: Flights::new(table.shard_len()),
                    table,
                    listener,
                    counters: if record_stats {
                        Counters::new()
                    } else {
                        Counters::disabled()
                    },
                    tier: (keep_recent > 0).then(|| Tier::new(keep_recent)),
                }
            }),
        }
    }

    #[inline(always)]
    fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        crate::raw::hash_one(&self.core.hasher, key)
    }

    /// Makes the item for `value` under `key`, registering the death
    /// callback that will remove exactly this item (M4).
    fn new_item(&self, hash: u64, key: K, value: &Strong<V>) -> (Item<K, V>, EntryHook) {
        let item = Item {
            key,
            value: EntryWeak::new(Strong::downgrade(value)),
        };
        let hook = collection::remove_on_death(&self.core, hash, value, ());
        (item, EntryHook(hook))
    }

    /// Inserts `value` under `key`, holding it weakly. Returns the value
    /// the key held before, if it was still alive.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let a = Strong::new("a");
    /// let b = Strong::new("b");
    /// assert!(map.insert(1, &a).is_none());
    /// assert_eq!(map.insert(1, &b).as_deref(), Some(&"a"));
    /// assert_eq!(map.get(&1).as_deref(), Some(&"b"));
    /// ```
    pub fn insert(&self, key: K, value: &Strong<V>) -> Option<Strong<V>> {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        let hash = self.hash(&key);
        let item = self.new_item(hash, key, value);
        let pin = WritePin::lazy();
        // The writer is dropped (unlocked) at the end of its block, in
        // place: `drop(writer)` would move it first, a `memcpy` call of
        // its whole size on every insert.
        let (previous, notice, released) = {
            let mut writer = self.core.table.write(hash, &pin);
            self.publish_locked(&mut writer, hash, item, value)
        };
        drop(pin);
        if let Some(previous) = &previous {
            collection::note_detached(previous);
        }
        // Dropped (by the caller) after the shard is unlocked: it may be the
        // last handle.
        self.settle(notice, RemovalCause::Replaced, released, previous)
    }

    /// The end of a write, after the unlock: reports `notice` for `cause`,
    /// lets go of `released`, and returns `value`. Each step runs even if
    /// one panics (the listener, a key's `Clone` resumed, a destructor);
    /// `value` is then let go of too, each value dropped on its own, and
    /// the first panic resumed: a second panic during its unwinding would
    /// abort the process.
    fn settle(
        &self,
        notice: Notice<K>,
        cause: RemovalCause,
        released: Released<V>,
        value: Option<Strong<V>>,
    ) -> Option<Strong<V>> {
        // Most writes have nobody to tell and nothing to let go of.
        if notice.is_none() && released.is_empty() {
            return value;
        }
        self.settle_each((notice, cause), released, value)
    }

    /// [`Self::settle`]'s steps, each caught.
    #[inline(never)]
    fn settle_each(
        &self,
        (notice, cause): (Notice<K>, RemovalCause),
        released: Released<V>,
        value: Option<Strong<V>>,
    ) -> Option<Strong<V>> {
        let mut panics = FirstPanic::default();
        panics.run("a removal listener", || self.core.report(notice, cause));
        panics.drop_step("a released value's destructor", released);
        if panics.is_empty() {
            return value;
        }
        panics.drop_step("a value's destructor", value);
        panics.resume();
        None
    }

    /// Publishes `item`, whose value is `value`, under a writer the
    /// caller holds, replacing any item under the same key (whose callback
    /// it detaches, M5), and lets the keep-warm tier hold the new value.
    /// Returns the replaced value if alive, the replaced key to report
    /// once the caller has unlocked (if anyone listens), and what the tier
    /// let go of, to drop after the unlock.
    fn publish_locked(
        &self,
        writer: &mut ShardWriter<'_, Item<K, V>>,
        hash: u64,
        item: (Item<K, V>, EntryHook),
        value: &Strong<V>,
    ) -> (Option<Strong<V>>, Notice<K>, Released<V>) {
        let identity = item.0.identity(&item.1);
        let replaced = writer.upsert(hash, item, |old, new| old.key() == new.key());
        let mut released = Released::none();
        let (previous, notice) = match replaced {
            None => (None, None),
            Some((replaced, hook)) => {
                // Detached only once the replacement is published: a
                // panicking `Eq` in `upsert` leaves every entry and its
                // callback as they were (M5). Nothing from here on
                // panics: the key's `Clone` is caught (`notice`).
                hook.0.detach();
                released.add(self.core.forget(hook));
                (replaced.value.upgrade(), self.core.notice(replaced))
            }
        };
        released.add(self.keep_locked(writer, hash, identity, value));
        (previous, notice, released)
    }

    /// Lets the keep-warm tier hold `value`, the value of the entry named
    /// `identity` under `hash`, which the caller's writer has just seen or
    /// published (M13). Returns what the tier let go of, to drop after the
    /// unlock.
    fn keep_locked(
        &self,
        writer: &ShardWriter<'_, Item<K, V>>,
        hash: u64,
        identity: usize,
        value: &Strong<V>,
    ) -> Option<Strong<V>> {
        let tier = self.core.tier.as_ref()?;
        let mark = Self::entry_mark(writer, hash, identity)?;
        tier.admit(identity, hash, mark, value.clone())
    }

    /// A hit on `item` (whose slot's mark is `mark`) for the keep-warm
    /// tier, by a reader pinned since it found the item: marks it used,
    /// or else admits it under its shard's lock, if it is still there.
    /// Returns what the tier let go of, to drop once unpinned.
    #[inline]
    fn keep(
        &self,
        hash: u64,
        item: &Item<K, V>,
        mark: SlotMark<'_, Item<K, V>>,
        value: &Strong<V>,
    ) -> Option<Strong<V>> {
        let tier = self.core.tier.as_ref()?;
        let identity = || item.identity(mark.side());
        // A map with a tier has marks.
        if tier.touch(identity, mark.get()?) || !tier.admits_found() {
            return None;
        }
        self.keep_slow(hash, identity(), value)
    }

    /// The found value's try to enter the tier: under its shard's lock
    /// and the tier's, each only if free (a read never waits for a hint;
    /// see `Tier::try_admit`).
    #[cold]
    #[inline(never)]
    fn keep_slow(&self, hash: u64, identity: usize, value: &Strong<V>) -> Option<Strong<V>> {
        // Never taken: this writer unlinks nothing (what the tier lets go
        // of are handles, dropped by our caller), so it hands nothing to
        // the epoch, and our caller's pin need not be threaded through the
        // lookup path to get here.
        let pin = WritePin::lazy();
        let writer = self.core.table.try_write(hash, &pin)?;
        let tier = self.core.tier.as_ref()?;
        let evicted = Self::entry_mark(&writer, hash, identity).and_then(|mark| {
            tier.try_admit(Candidate {
                identity,
                hash,
                mark,
                value: value.clone(),
            })
        });
        drop(writer);
        drop(pin);
        evicted
    }

    /// The mark of the entry named `identity` under `hash`, if the
    /// caller's writer finds it in a map with a tier (which keeps marks).
    fn entry_mark<'w>(
        writer: &'w ShardWriter<'_, Item<K, V>>,
        hash: u64,
        identity: usize,
    ) -> Option<&'w AtomicU64> {
        let mut candidates = writer.candidates(hash);
        while let Some((item, mark)) = candidates.next_marked() {
            if item.identity(mark.side()) == identity {
                return mark.get();
            }
        }
        None
    }

    /// The live value under `key`, found lock-free; with a keep-warm tier,
    /// marked used there (or admitted).
    #[inline]
    fn lookup<Q>(&self, hash: u64, key: &Q) -> Option<Strong<V>>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let pinned = self.core.table.pin();
        let mut candidates = self.core.table.candidates(hash, &pinned);
        let (item, mark) = loop {
            let (item, mark) = candidates.next_marked()?;
            if item.key().borrow() == key {
                break (item, mark);
            }
        };
        let value = item.value.upgrade()?;
        // Admitting locks under the pin, which keeps `item`'s identity from
        // being reused meanwhile.
        let released = self.keep(hash, item, mark, &value);
        drop(pinned);
        if let Some(released) = released {
            // Perhaps a death, which must not wait here (C18).
            crate::callbacks::reading(|| drop(released));
        }
        Some(value)
    }

    /// Inserts `value` under `key` unless the key holds a live value, which
    /// is then returned as the error and left in place. A dead entry under
    /// the key is replaced.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let (first, second) = (Strong::new("first"), Strong::new("second"));
    /// assert!(map.try_insert(1, &first).is_ok());
    /// let held = map.try_insert(1, &second).unwrap_err();
    /// assert!(Strong::ptr_eq(&held, &first));
    /// drop((held, first));
    /// assert!(map.try_insert(1, &second).is_ok()); // the dead entry goes
    /// assert_eq!(map.get(&1).as_deref(), Some(&"second"));
    /// ```
    pub fn try_insert(&self, key: K, value: &Strong<V>) -> Result<(), Strong<V>> {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        let hash = self.hash(&key);
        let pin = WritePin::lazy();
        let mut writer = self.core.table.write(hash, &pin);
        let live = writer
            .candidates(hash)
            .find(|item| item.key() == &key)
            .and_then(|item| item.value.upgrade());
        if let Some(live) = live {
            drop(writer);
            drop(pin);
            // The key first: if its destructor panics, `live` is a local
            // and goes with the unwinding.
            drop(key);
            return Err(live);
        }
        let item = self.new_item(hash, key, value);
        // Replaces a dead entry at most: nothing upgrades a dead value.
        let (replaced, notice, mut released) = self.publish_locked(&mut writer, hash, item, value);
        drop(writer);
        drop(pin);
        // Nothing live was found above, but a key whose `Eq` answers
        // differently from one call to the next (user code) may still have
        // matched a live entry here: it left the map, replaced, and its
        // value is handed back and reported like any other.
        released.add(replaced);
        self.settle(notice, RemovalCause::Replaced, released, None);
        Ok(())
    }

    /// Removes `key`'s entry if its value is alive and `f` says so, and
    /// returns the value. Atomic with respect to other writers of the key:
    /// `f` runs under the shard's lock, so an entry inserted after the
    /// caller looked is judged by `f` itself, never removed unseen. `f`
    /// must not use this map (like `Eq`, it runs under the lock; see the
    /// [type's docs](WeakValueMap)); a [`flush`](crate::flush) or
    /// [`shutdown`](crate::shutdown) there panics, as it would wait for
    /// that lock, and so does a write to this map that finds the lock `f`
    /// holds taken (one of a key in the same shard, such as `key` itself).
    /// Reads work there as anywhere.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let stale = Strong::new(("v1", 1));
    /// map.insert("config", &stale);
    /// // Invalidate only the version we saw.
    /// assert!(map.remove_if("config", |_, v| v.1 == 2).is_none());
    /// assert!(map.remove_if("config", |_, v| v.1 == 1).is_some());
    /// assert!(map.get("config").is_none());
    /// ```
    pub fn remove_if<Q>(&self, key: &Q, f: impl FnOnce(&K, &Strong<V>) -> bool) -> Option<Strong<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        let hash = self.hash(key);
        // Declared before the writer, so that if `f` panics the unwinding
        // unlocks first and drops the value after: it may be the last
        // handle, whose destructor may use this map.
        let live: Strong<V>;
        let pin = WritePin::lazy();
        let mut writer = self.core.table.write(hash, &pin);
        let mut candidates = writer.candidates(hash);
        let (found, mark) = loop {
            let (item, mark) = candidates.next_marked()?;
            if item.key().borrow() == key {
                break (item, mark);
            }
        };
        let identity = found.identity(mark.side());
        live = found.value.upgrade()?;
        let remove = marks::locked(writer.shard_address(), || f(found.key(), &live));
        if !remove {
            drop(writer);
            drop(pin);
            // After the unlock: it may be the last handle.
            drop(live);
            return None;
        }
        let removed = writer.remove(hash, |item, side| item.identity(side) == identity);
        let (notice, released) = match removed {
            Some((removed, hook)) => {
                // Detached after the removal is published (M5); the tier
                // lets go, and then the key is cloned, caught (`notice`).
                hook.0.detach();
                let released = Released::of(self.core.forget(hook));
                (self.core.notice(removed), released)
            }
            None => (None, Released::none()),
        };
        drop(writer);
        drop(pin);
        collection::note_detached(&live);
        self.settle(notice, RemovalCause::Removed, released, Some(live))
    }

    /// The key and value of `key`'s entry, if its value is alive: the key
    /// is a clone of the one stored. Lock-free.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let v = Strong::new(7);
    /// map.insert(String::from("seven"), &v);
    /// let (key, value) = map.get_key_value("seven").unwrap();
    /// assert_eq!((key.as_str(), *value), ("seven", 7));
    /// ```
    pub fn get_key_value<Q>(&self, key: &Q) -> Option<(K, Strong<V>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.with_item(key, |item| {
            let value = item.value.upgrade()?;
            Some((item.key().clone(), value))
        })
    }

    /// The value under `key`, if it is still alive. Lock-free.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let doc = Strong::new(String::from("parsed"));
    /// map.insert("doc", &doc);
    /// assert_eq!(map.get("doc").as_deref().map(String::as_str), Some("parsed"));
    /// drop(doc);
    /// assert!(map.get("doc").is_none()); // dead at once, removed at flush
    /// ```
    #[inline]
    pub fn get<Q>(&self, key: &Q) -> Option<Strong<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.core.counters.bump(GETS);
        let found = self.lookup(self.hash(key), key);
        if found.is_none() {
            self.core.counters.bump(MISSES);
        }
        found
    }

    /// Looks `key` up lock-free and applies `f` to its item, while pinned.
    fn with_item<Q, R>(&self, key: &Q, f: impl FnOnce(&Item<K, V>) -> Option<R>) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.with_hashed_item(self.hash(key), key, f)
    }

    /// [`Self::with_item`] for a key whose hash is known.
    fn with_hashed_item<Q, R>(
        &self,
        hash: u64,
        key: &Q,
        f: impl FnOnce(&Item<K, V>) -> Option<R>,
    ) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let pinned = self.core.table.pin();
        self.core
            .table
            .candidates(hash, &pinned)
            .find(|item| item.key().borrow() == key)
            .and_then(f)
    }

    /// True if `key` holds a live value. Lock-free, and takes no reference.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let v = Strong::new(1);
    /// map.insert('k', &v);
    /// assert!(map.contains_key(&'k'));
    /// drop(v);
    /// assert!(!map.contains_key(&'k'));
    /// ```
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.with_item(key, |item| item.value.is_alive().then_some(()))
            .is_some()
    }

    /// Removes `key`'s entry, returning its value if it was still alive.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let v = Strong::new(5);
    /// map.insert("five", &v);
    /// assert_eq!(map.remove("five").as_deref(), Some(&5));
    /// assert!(map.remove("five").is_none());
    /// ```
    pub fn remove<Q>(&self, key: &Q) -> Option<Strong<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        let hash = self.hash(key);
        let pin = WritePin::lazy();
        let mut writer = self.core.table.write(hash, &pin);
        let (removed, hook) = writer.remove(hash, |item, _| item.key().borrow() == key)?;
        // As in `publish_locked`: detached after the removal is published;
        // nothing from here on panics.
        hook.0.detach();
        let released = Released::of(self.core.forget(hook));
        let (value, notice) = (removed.value.upgrade(), self.core.notice(removed));
        drop(writer);
        drop(pin);
        if let Some(value) = &value {
            collection::note_detached(value);
        }
        // Dropped by the caller, after the unlock: it may be the last handle.
        self.settle(notice, RemovalCause::Removed, released, value)
    }

    /// The value under `key`, or the one `init` builds, inserted. Single
    /// flight: callers racing on one key run `init` once and all receive
    /// the same value. If `init` panics, the panic reaches its own caller
    /// only, and the waiting callers retry.
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
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let templates: WeakValueMap<&str, String> = WeakValueMap::new();
    /// let page = templates.get_or_insert_with("page", || "<h1>{{t}}</h1>".into());
    /// let same = templates.get_or_insert_with("page", || unreachable!());
    /// assert!(Strong::ptr_eq(&page, &same));
    /// ```
    pub fn get_or_insert_with<F: FnOnce() -> V>(&self, key: K, init: F) -> Strong<V>
    where
        V: Sized,
    {
        match self.try_get_or_insert_with(key, || Ok::<V, std::convert::Infallible>(init())) {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// [`get_or_insert_with`](Self::get_or_insert_with) for a fallible
    /// `init`: an `Err` inserts nothing, reaches this caller only, and lets
    /// waiting callers retry.
    ///
    /// ```
    /// use weakrefs::WeakValueMap;
    ///
    /// let map: WeakValueMap<u32, String> = WeakValueMap::new();
    /// let failed = map.try_get_or_insert_with(7, || Err("not found"));
    /// assert_eq!(failed.unwrap_err(), "not found");
    /// assert!(map.is_empty());
    /// let loaded = map.try_get_or_insert_with(7, || Ok::<_, &str>("seven".to_string()));
    /// assert_eq!(loaded.unwrap().as_str(), "seven");
    /// ```
    pub fn try_get_or_insert_with<E, F>(&self, key: K, init: F) -> Result<Strong<V>, E>
    where
        V: Sized,
        F: FnOnce() -> Result<V, E>,
    {
        let hash = self.hash(&key);
        let mut key = Some(key);
        let mut init = Some(init);
        // What the call lets go of before it hands its outcome back.
        let mut panics = FirstPanic::default();
        let outcome = loop {
            match self.find_or_join(hash, &mut key, true) {
                Ok(value) => {
                    self.core.counters.bump(HITS);
                    break Ok(value);
                }
                Err(Joined::Wait(load)) => {
                    if let Some(value) = load.wait() {
                        self.core.counters.bump(JOINED);
                        // Its last handle drops the waiters' copy of the
                        // value (the leader took the key out).
                        panics.drop_step("a joined load's destructor", load);
                        break Ok(value);
                    }
                    // The leader failed: try again (perhaps as the leader).
                }
                Err(Joined::Lead(load)) => {
                    // A safe point (SAFETY.md, C18) once the load is over;
                    // a hit is none, which keeps hits free of it.
                    let _safe_point = SafePoint;
                    let init = init.take().expect("a caller leads once, then returns");
                    self.core.counters.bump(LOADS);
                    break single_flight::lead(
                        load,
                        || count_failure(&self.core.counters, init).map(Strong::new),
                        |load, value| self.finish_load(load, value),
                    );
                }
            }
        };
        // The caller's leftovers (a key a live value made unneeded, an
        // unused `init`) go before the value is handed back, each on its
        // own (`FirstPanic::hand_back`).
        panics.drop_step("an unneeded key's destructor", key);
        panics.drop_step("an unused init's destructor", init);
        panics.hand_back("a load's outcome's destructor", outcome)
    }

    /// [`get_or_insert_with`](Self::get_or_insert_with) for async code:
    /// callers wait for a load in flight without blocking their thread,
    /// and `init`'s future runs in the leading caller's task. Works on any
    /// executor.
    ///
    /// Cancellation-safe: if the leading caller's future is dropped before
    /// its load completes, one of the waiting callers takes the load over
    /// (runs its own `init`); a waiter's future may be dropped at any time.
    /// A panic in `init` reaches the leading caller only. An `init` that
    /// requests its own key panics with a message if that request would
    /// block (a blocking `get_or_insert_with`), but one that awaits its own
    /// key waits for itself forever: a `select!` over it might finish by
    /// another branch, so it is not refused.
    ///
    /// Dropping a future is cancellation; forgetting one (`std::mem::forget`
    /// of a future already polled) is not. A forgotten leader leaves its
    /// load unfinished, and later callers for that key wait for it forever,
    /// as they would for a forgotten lock guard; a forgotten waiter keeps
    /// the load's outcome, a `Strong` to the value, alive for good.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let pages: WeakValueMap<String, String> = WeakValueMap::new();
    /// let page = pages
    ///     .get_or_insert_with_async("home".to_string(), || async { "<h1>home</h1>".to_string() })
    ///     .await;
    /// let again = pages
    ///     .get_or_insert_with_async("home".to_string(), || async { unreachable!() })
    ///     .await;
    /// assert!(Strong::ptr_eq(&page, &again));
    /// # });
    /// ```
    pub async fn get_or_insert_with_async<F, Fut>(&self, key: K, init: F) -> Strong<V>
    where
        V: Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let loaded = self
            .try_get_or_insert_with_async(key, || async {
                Ok::<V, std::convert::Infallible>(init().await)
            })
            .await;
        match loaded {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// [`try_get_or_insert_with`](Self::try_get_or_insert_with) for async
    /// code, as [`get_or_insert_with_async`](Self::get_or_insert_with_async):
    /// an `Err` inserts nothing, reaches this caller only, and lets waiting
    /// callers retry.
    ///
    /// ```
    /// use weakrefs::WeakValueMap;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let map: WeakValueMap<u32, String> = WeakValueMap::new();
    /// let failed = map.try_get_or_insert_with_async(1, || async { Err("offline") }).await;
    /// assert_eq!(failed.unwrap_err(), "offline");
    /// assert!(map.is_empty());
    /// # });
    /// ```
    pub async fn try_get_or_insert_with_async<E, F, Fut>(
        &self,
        key: K,
        init: F,
    ) -> Result<Strong<V>, E>
    where
        V: Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let hash = self.hash(&key);
        let mut key = Some(key);
        let mut init = Some(init);
        // As in `try_get_or_insert_with`.
        let mut panics = FirstPanic::default();
        let outcome = loop {
            match self.find_or_join(hash, &mut key, false) {
                Ok(value) => {
                    self.core.counters.bump(HITS);
                    break Ok(value);
                }
                Err(Joined::Wait(load)) => {
                    if let Some(value) = load.wait_async().await {
                        self.core.counters.bump(JOINED);
                        // Its last handle drops the waiters' copy of the
                        // value (the leader took the key out).
                        panics.drop_step("a joined load's destructor", load);
                        break Ok(value);
                    }
                    // The leader failed or was dropped: try again.
                }
                Err(Joined::Lead(load)) => {
                    let init = init.take().expect("a caller leads once, then returns");
                    self.core.counters.bump(LOADS);
                    break single_flight::lead_async(
                        load,
                        async {
                            count_failure_async(&self.core.counters, init)
                                .await
                                .map(Strong::new)
                        },
                        |load, value| self.finish_load(load, value),
                    )
                    .await;
                }
            }
        };
        // As in `try_get_or_insert_with`: leftovers first.
        panics.drop_step("an unneeded key's destructor", key);
        panics.drop_step("an unused init's destructor", init);
        panics.hand_back("a load's outcome's destructor", outcome)
    }

    /// A live value under `key` (lock-free, then under the shard's lock),
    /// or else a load to wait for, or a new load for us to lead (M6).
    /// `blocking` says whether the caller blocks its thread to wait.
    #[allow(clippy::type_complexity)]
    fn find_or_join(
        &self,
        hash: u64,
        key: &mut Option<K>,
        blocking: bool,
    ) -> Result<Strong<V>, Joined<K, Strong<V>>> {
        let wanted = key
            .as_ref()
            .expect("the key is taken only by a leader that returns");
        if let Some(value) = self.lookup(hash, wanted) {
            return Ok(value);
        }
        let pin = WritePin::lazy();
        let writer = self.core.table.write(hash, &pin);
        let mut candidates = writer.candidates(hash);
        let live = loop {
            let Some((item, mark)) = candidates.next_marked() else {
                break None;
            };
            if item.key() == wanted {
                break Some((item.identity(mark.side()), item.value.upgrade()));
            }
        };
        let live = live.and_then(|(identity, value)| Some((identity, value?)));
        if let Some((identity, value)) = live {
            let released = self.keep_locked(&writer, hash, identity, &value);
            drop(writer);
            drop(pin);
            drop(released);
            return Ok(value);
        }
        Err(self.core.loads.join_or_lead(
            self.core.table.shard_index(hash),
            hash,
            key,
            |theirs, ours| theirs == ours,
            "WeakValueMap::get_or_insert_with",
            blocking,
        ))
    }

    /// Ends a load under the shard's writer lock: withdraws it and, on
    /// success, publishes `value` under the load's key, unless a live value
    /// was inserted there meanwhile, which then wins for everyone (M6).
    /// Wakes the waiters on every exit, unwinding included, so none is
    /// stranded. Returns the value the load settled on.
    fn finish_load(
        &self,
        load: &Strong<Load<K, V>>,
        value: Option<Strong<V>>,
    ) -> Option<Strong<V>> {
        let mut settle = Settle::new(load);
        let hash = load.hash();
        // Declared before the writer so that, on unwinding, they are
        // dropped after the unlock.
        let mut key: Option<K>;
        let mut outcome = None;
        let mut replaced = None;
        let mut notice = None;
        let mut released = Released::none();
        // Withdraw the load under the shard's writer lock, so that no caller
        // can find neither the load nor the item (M6).
        let pin = WritePin::lazy();
        let mut writer = self.core.table.write(hash, &pin);
        key = self
            .core
            .loads
            .withdraw(self.core.table.shard_index(hash), load);
        if let (Some(value), Some(wanted)) = (&value, &key) {
            let existing = writer
                .candidates(hash)
                .find(|item| item.key() == wanted)
                .and_then(|item| item.value.upgrade());
            outcome = match existing {
                // Inserted meanwhile: adopt it, so every caller gets one value.
                Some(existing) => Some(existing),
                None => {
                    let key = key.take().expect("checked above");
                    let item = self.new_item(hash, key, value);
                    (replaced, notice, released) =
                        self.publish_locked(&mut writer, hash, item, value);
                    Some(value.clone())
                }
            };
        }
        drop(writer);
        drop(pin);
        // After the unlock: the key's and the values' destructors are user
        // code, and a value may be the last handle of its object.
        // Settle before the key's destructor: a panic there must not turn a
        // published value into a failed load.
        settle.outcome.clone_from(&outcome);
        // Each a step (`FirstPanic::hand_back`): this also runs while an
        // `init` that panicked unwinds (`FailOnDrop`), where a key's
        // destructor that panicked as a plain drop aborted the process.
        let mut panics = FirstPanic::default();
        panics.drop_step("a load's key's destructor", key);
        panics.drop_step("a settled load's destructor", settle);
        released.add(replaced);
        released.add(value);
        let outcome = self.settle(notice, RemovalCause::Replaced, released, outcome);
        panics.hand_back("a load's outcome's destructor", outcome)
    }

    /// Number of entries not yet removed: exact after
    /// [`flush`](crate::flush); entries whose values died since may still
    /// be counted until their removal callbacks run.
    ///
    /// ```
    /// use weakrefs::{flush, Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let v = Strong::new(());
    /// map.insert(1, &v);
    /// assert_eq!(map.len(), 1);
    /// drop(v);
    /// flush();
    /// assert_eq!(map.len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.core.table.len()
    }

    /// True if [`len`](Self::len) is zero.
    ///
    /// ```
    /// let map: weakrefs::WeakValueMap<u8, u8> = weakrefs::WeakValueMap::new();
    /// assert!(map.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live entries, with cloned keys. Weakly consistent: never yields a
    /// dead value or panics while other threads change the map; it may or
    /// may not see those changes. A key present throughout is yielded once,
    /// with its old value or its new one if another thread replaces it
    /// meanwhile. (The iteration scans a shard again, up to eight times,
    /// when such a replacement changed it in two steps as it passed, so
    /// keys' `Clone` may run more than once, and a discarded value's drop,
    /// if another thread let go of it meanwhile, runs inside `next`, which
    /// passes on its panic with no entry lost to the iteration. It
    /// never waits for a writer: against one descheduled between those
    /// two steps, or replacing keys of one shard faster than that, it
    /// keeps a scan that may show a key twice or not at all.)
    ///
    /// The iterator snapshots one shard at a time, and holds a `Strong` to
    /// each value of the current shard's snapshot until it yields it or is
    /// dropped ([`values`](Self::values) too; [`keys`](Self::keys) holds
    /// keys only): a value whose last other handle goes meanwhile dies only
    /// then, and its entry leaves the map then. Keep iterators
    /// short-lived; one forgotten with `std::mem::forget` keeps those
    /// values alive for good.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let (a, b) = (Strong::new('a'), Strong::new('b'));
    /// map.insert(1, &a);
    /// map.insert(2, &b);
    /// drop(b);
    /// let live: Vec<_> = map.iter().map(|(k, v)| (k, *v)).collect();
    /// assert_eq!(live, [(1, 'a')]);
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (K, Strong<V>)> + '_
    where
        K: Clone,
    {
        self.snapshots(|item| Some((item.key().clone(), item.value.upgrade()?)))
    }

    /// Keys of live entries (cloned).
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let v = Strong::new(0);
    /// map.insert("only", &v);
    /// assert_eq!(map.keys().collect::<Vec<_>>(), ["only"]);
    /// ```
    pub fn keys(&self) -> impl Iterator<Item = K> + '_
    where
        K: Clone,
    {
        self.snapshots(|item| item.value.is_alive().then(|| item.key().clone()))
    }

    /// Live values.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let v = Strong::new(3);
    /// map.insert("three", &v);
    /// assert_eq!(map.values().map(|v| *v).sum::<i32>(), 3);
    /// ```
    pub fn values(&self) -> impl Iterator<Item = Strong<V>> + '_ {
        self.snapshots(|item| item.value.upgrade())
    }

    /// Iterates shard by shard, snapshotting one shard at a time (M8).
    fn snapshots<'a, T: 'a>(
        &'a self,
        project: impl FnMut(&Item<K, V>) -> Option<T> + 'a,
    ) -> impl Iterator<Item = T> + 'a {
        collection::snapshots(&self.core.table, project)
    }

    /// Keeps only the live entries for which `f` returns true; removes the
    /// rest (and any dead ones). `f` runs once per live entry, without any
    /// lock held; an entry replaced or removed meanwhile is left alone.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let values: Vec<_> = (0..6).map(Strong::new).collect();
    /// for (i, v) in values.iter().enumerate() {
    ///     map.insert(i, v);
    /// }
    /// map.retain(|_, v| v % 2 == 0);
    /// assert_eq!(map.len(), 3);
    /// ```
    pub fn retain<F: FnMut(&K, &V) -> bool>(&self, mut f: F) {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        collection::retain_live(
            &self.core.table,
            |item, value| f(item.key(), value),
            // Unlocked, still pinned since before the unlink: the removed
            // entry is readable, its identity not reused, and no hit can
            // admit it again (M13).
            |item, hook| {
                let released = Released::of(self.core.forget(hook));
                let notice = self.core.notice(item);
                self.settle(notice, RemovalCause::Removed, released, None);
            },
        );
    }

    /// What the map has counted since it was made: hits, misses, loads,
    /// joined loads, failed loads and deaths ([`MapStats`]); all zeros for
    /// a map built with [`record_stats(false)`](WeakValueMapBuilder::record_stats).
    ///
    /// ```
    /// use weakrefs::WeakValueMap;
    ///
    /// let map: WeakValueMap<u32, u32> = WeakValueMap::new();
    /// assert!(map.get(&1).is_none());
    /// assert!(map.try_get_or_insert_with(1, || Err::<u32, _>("down")).is_err());
    /// let stats = map.stats();
    /// assert_eq!((stats.misses, stats.loads, stats.load_failures), (1, 1, 1));
    /// ```
    pub fn stats(&self) -> MapStats {
        let [hits, misses, loads, joined, load_failures, gets] = self.core.counters.sum();
        let died = if self.core.counters.enabled() {
            self.core.table.deaths()
        } else {
            0
        };
        MapStats {
            // A `get` still running counts as a hit until its miss is
            // counted; saturating, since the sum's Relaxed loads may see a
            // miss before the call it ended.
            hits: hits + gets.saturating_sub(misses),
            misses,
            loads,
            joined,
            load_failures,
            died,
        }
    }

    /// Entries the map holds before a shard's table grows. Removed entries
    /// occupy room until no reader can see them, and shards fill unevenly,
    /// so a table may grow before `len` reaches this.
    ///
    /// ```
    /// let map: weakrefs::WeakValueMap<u32, u32> = weakrefs::WeakValueMap::with_capacity(1000);
    /// assert!(map.capacity() >= 1000);
    /// ```
    pub fn capacity(&self) -> usize {
        self.core.table.capacity()
    }

    /// Rebuilds each shard's table at the size its live entries need, if it
    /// is larger: gives back the table memory of a past peak (not the
    /// detached callbacks that values which live on may keep; see the
    /// type's docs). The old tables, and the entries removed from them,
    /// are then pushed through the epoch as [`flush`](crate::flush) does,
    /// so their memory is back by the time this returns unless another
    /// thread is pinned meanwhile. Keys are cloned
    /// into the smaller tables (as in any rebuild); a panicking `Clone`
    /// leaves that shard as it was, the other shards are still rebuilt,
    /// and then the panic reaches the caller.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let values: Vec<_> = (0..10_000).map(Strong::new).collect();
    /// for v in &values {
    ///     map.insert(**v, v);
    /// }
    /// let peak = map.capacity();
    /// drop(values);
    /// weakrefs::flush();
    /// map.shrink_to_fit();
    /// assert!(map.capacity() < peak / 4);
    /// ```
    pub fn shrink_to_fit(&self) {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        collection::shrink(&self.core.table, 1);
    }

    /// Removes every entry, and gives back the memory of tables much larger
    /// than what is left.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let v = Strong::new(1);
    /// map.insert(1, &v);
    /// map.clear();
    /// assert!(map.is_empty());
    /// assert_eq!(*v, 1); // the value itself is untouched
    /// ```
    pub fn clear(&self) {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        collection::clear(
            &self.core.table,
            // Under the shard lock, where nothing panics (`notice`); the
            // tier's value is dropped after it.
            |item, hook| {
                let released = Released::of(self.core.forget(hook));
                Some((self.core.notice(item), released))
            },
            |(notice, released)| {
                self.settle(notice, RemovalCause::Cleared, released, None);
            },
        );
    }

    /// Removes the entries whose values are dead now, without waiting for
    /// their death callbacks; returns how many. Each counts in
    /// [`stats`](Self::stats)' `died`, and is heard as
    /// [`Died`](RemovalCause::Died) on the finalizer thread, as if its
    /// callback had removed it.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakValueMap};
    ///
    /// let map = WeakValueMap::new();
    /// let v = Strong::new(1);
    /// map.insert(1, &v);
    /// drop(v);
    /// let removed = map.purge(); // 1, or 0 if the callback got there first
    /// assert!(removed <= 1);
    /// assert!(map.is_empty());
    /// ```
    pub fn purge(&self) -> usize {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        collection::purge(
            &self.core.table,
            // The job a death's removal makes, under the lock: a listener's
            // copy of the key (its `Clone`'s panic, caught, goes with it).
            |item, _| self.core.died(item),
            |job| Executor::global().post(job),
        )
    }
}

impl<K, V, S> Default for WeakValueMap<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: ?Sized + Send + Sync + 'static,
    S: BuildHasher + Default + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::with_capacity_and_hasher(0, S::default())
    }
}

impl<K, V: ?Sized, S> fmt::Debug for WeakValueMap<K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_struct("WeakValueMap");
        map.field("len", &self.core.table.len());
        if let Some(tier) = &self.core.tier {
            map.field("kept", &tier.len())
                .field("keep_recent", &tier.capacity());
        }
        map.finish_non_exhaustive()
    }
}

/// `map.par_iter()` (with `use rayon::prelude::*`): the live entries, with
/// cloned keys, in parallel, shard by shard; weakly consistent, as
/// [`WeakValueMap::iter`].
///
/// ```
/// use rayon::prelude::*;
/// use weakrefs::{Strong, WeakValueMap};
///
/// let map = WeakValueMap::new();
/// let values: Vec<_> = (0..100u64).map(Strong::new).collect();
/// for v in &values {
///     map.insert(**v, v);
/// }
/// let sum: u64 = map.par_iter().map(|(key, value)| key + *value).sum();
/// assert_eq!(sum, 2 * 4950);
/// ```
#[cfg(feature = "rayon")]
#[cfg_attr(docsrs, doc(cfg(feature = "rayon")))]
impl<'a, K, V, S> rayon::iter::IntoParallelIterator for &'a WeakValueMap<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: ?Sized + Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    type Item = (K, Strong<V>);
    type Iter = crate::ParIter<'a, (K, Strong<V>)>;

    fn into_par_iter(self) -> Self::Iter {
        let table = &self.core.table;
        crate::ParIter::new(table.shard_len(), move |shard| {
            collection::shard_snapshot(table, shard, |item: &Item<K, V>| {
                Some((item.key().clone(), item.value.upgrade()?))
            })
        })
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;
    use crate::callbacks::EntryRef;
    use crate::settle;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    /// One way to take `value` in and out of a map under a key.
    type Path<'a> = (&'a str, &'a dyn Fn(&WeakValueMap<u32, u32>, u32));

    /// Nodes in `value`'s callback list: registered hooks, detached ones
    /// not yet compacted away included.
    fn hooks_on(value: &Strong<u32>) -> usize {
        Strong::callback_list(value).node_count()
    }

    /// A replacement whose old item's group is full goes to a later group,
    /// in two stores: a move, which the shard's `moves` count brackets for
    /// iterations to see (M8). One whose group has room is a single store,
    /// and no move.
    #[test]
    fn a_replacement_into_a_later_group_counts_as_a_move() {
        let map: WeakValueMap<u64, u64, std::hash::BuildHasherDefault<Itself>> =
            WeakValueMap::with_hasher(Default::default());
        // A group is a word's bytes: eight keys fill key 0's home group (or
        // more than one, where a word has fewer).
        let values: Vec<_> = (0..10).map(Strong::new).collect();
        for key in 0..8 {
            map.insert(key, &values[key as usize]);
        }
        let shard = map.core.table.shard_index(map.hash(&0u64));
        assert_eq!(map.core.table.shard_index(map.hash(&7u64)), shard);
        assert_eq!(map.core.table.moves_for_test(shard), 0);
        map.insert(0, &values[8]);
        assert_eq!(map.core.table.moves_for_test(shard), 2);
        // Key 0 now lives in the later group, which has room: in place.
        map.insert(0, &values[9]);
        assert_eq!(map.core.table.moves_for_test(shard), 2);
        let mut seen: Vec<_> = map.iter().map(|(key, value)| (key, *value)).collect();
        seen.sort_unstable();
        let expected: Vec<_> = (0..8)
            .map(|key| (key, if key == 0 { 9 } else { key }))
            .collect();
        assert_eq!(seen, expected);
    }

    /// An iteration never waits for a writer (M8): with every shard's
    /// `moves` count left odd, as by a writer stopped in the middle of a
    /// move, each shard's scan is spoiled, and after its last retry the
    /// iteration keeps what it saw. Nothing moved, so every key is there,
    /// once.
    #[test]
    fn an_iteration_never_waits_for_a_writer_stopped_in_a_move() {
        let map = Arc::new(WeakValueMap::new());
        let values: Vec<_> = (0..100u32).map(Strong::new).collect();
        for (key, value) in values.iter().enumerate() {
            map.insert(key as u32, value);
        }
        map.core.table.stall_moves_for_test();
        let (done, finished) = std::sync::mpsc::channel();
        let iterating = {
            let map = Arc::clone(&map);
            std::thread::spawn(move || {
                let mut keys: Vec<_> = map.keys().collect();
                keys.sort_unstable();
                let _ = done.send(());
                keys
            })
        };
        finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("an iteration waited on a stalled move");
        let keys = iterating.join().unwrap();
        assert_eq!(keys, (0..100).collect::<Vec<_>>());
    }

    /// Every way an entry leaves the map but by its value's death detaches
    /// its hook, which lives in the entry's slot side: a value inserted and
    /// taken out again thousands of times keeps a bounded callback list.
    /// (A path that forgot the hook would leave one node per round.)
    #[test]
    #[cfg_attr(
        miri,
        ignore = "thousands of rounds; the paths run under Miri in tests/"
    )]
    fn every_removal_path_detaches_the_entrys_hook() {
        const ROUNDS: u32 = 2_000;
        let value = Strong::new(7u32);
        let other = Strong::new(8u32);
        let paths: [Path<'_>; 7] = [
            ("remove", &|map, key| {
                map.insert(key, &value);
                assert!(map.remove(&key).is_some());
            }),
            ("replacing insert", &|map, key| {
                map.insert(key, &value);
                map.insert(key, &other);
            }),
            ("remove_if", &|map, key| {
                map.insert(key, &value);
                assert!(map.remove_if(&key, |_, _| true).is_some());
            }),
            ("retain", &|map, key| {
                map.insert(key, &value);
                map.retain(|_, _| false);
            }),
            ("clear", &|map, key| {
                map.insert(key, &value);
                map.clear();
            }),
            ("dropped map", &|_, key| {
                let map = WeakValueMap::new();
                map.insert(key, &value);
            }),
            ("with a tier", &|_, key| {
                let map = WeakValueMap::builder().keep_recent(2).build();
                map.insert(key, &value);
                assert!(map.get(&key).is_some());
                assert!(map.remove(&key).is_some());
            }),
        ];
        for (name, path) in paths {
            let map = WeakValueMap::new();
            for round in 0..ROUNDS {
                path(&map, round % 5);
            }
            map.clear();
            let left = hooks_on(&value);
            assert!(left < 200, "{name}: {left} hooks left on the value");
        }
    }

    /// A value that lives on after a peak of entries naming it: as they
    /// leave, their detached hooks count towards compactions of its
    /// callback list, which shrinks back to a few nodes. (It kept a node
    /// for each until as many new registrations came or the value died.)
    #[test]
    fn a_value_keeps_no_detached_hooks_of_a_past_peak() {
        // Fewer under Miri, where each insert takes milliseconds.
        const PEAK: u32 = if cfg!(miri) { 100 } else { 1_000 };
        let value = Strong::new(7u32);
        let other = Strong::new(8u32);
        let paths: [Path<'_>; 4] = [
            ("remove", &|map, key| assert!(map.remove(&key).is_some())),
            ("remove_if", &|map, key| {
                assert!(map.remove_if(&key, |_, _| true).is_some());
            }),
            ("replacing insert", &|map, key| {
                assert!(map.insert(key, &other).is_some());
            }),
            ("retain", &|map, key| map.retain(|&kept, _| kept != key)),
        ];
        for (name, leave) in paths {
            let map = WeakValueMap::new();
            for key in 0..PEAK {
                map.insert(key, &value);
            }
            assert!(hooks_on(&value) >= PEAK as usize);
            for key in 0..PEAK {
                leave(&map, key);
            }
            let left = hooks_on(&value);
            assert!(left < 20, "{name}: {left} hooks left on the value");
            map.clear();
        }
    }

    /// The callbacks still registered on `value`, as new handles to their
    /// nodes.
    fn live_hooks_on<T: ?Sized>(value: &Strong<T>) -> Vec<EntryRef> {
        Strong::callback_list(value).alive_entries()
    }

    /// Drives the deferred drops of removed entries (epoch collection, and
    /// the finalizer thread for keys with destructors) until `hook`'s node
    /// has no owner but the caller: its entry's side has been dropped, and
    /// its dead value's list has let go of it. For as long as that takes:
    /// other tests' threads pin the epoch now and then, which delays the
    /// drops but cannot stop them (tests that waited a fixed number of
    /// rounds failed under load). `settle`'s deadline is a fail-safe
    /// against a hung run, not a timing claim.
    fn wait_until_the_side_is_dropped(exit: &str, hook: &EntryRef) {
        let dropped = settle::until(|| hook.ref_count() == 1, crate::flush);
        assert!(
            dropped,
            "{exit}: the entry's side was never dropped ({} owners of its hook)",
            hook.ref_count()
        );
    }

    /// C21: a value whose death removes its entries on the dying thread
    /// (their shards free) hands its implicit weak to the first of them,
    /// whose drop releases it with its own `Weak`. Held by a third `Weak`
    /// (ours), the count comes down to exactly 1 once the entries are
    /// dropped: a handed weak released twice, or never, would leave 0 or
    /// 2 (Miri, run 4, sees the block freed once, after our `Weak`), and
    /// exactly one of the entries takes it. Each
    /// collection's entry drop in turn, then all three, each many times
    /// over (twice under Miri): the hook's status word keeps its key, from
    /// a random hash, until the fold, and a key bit read as the
    /// hand-over's once released the implicit weak a second time.
    #[test]
    fn a_dying_value_hands_its_implicit_weak_to_one_entry_it_removes() {
        let cases = [
            (true, false, false),
            (false, true, false),
            (false, false, true),
            (true, true, true),
        ];
        let rounds = if cfg!(miri) { 2 } else { 32 };
        for (in_map, in_set, as_key) in cases.into_iter().cycle().take(4 * rounds) {
            let map = WeakValueMap::new();
            let set = crate::WeakSet::new();
            let keyed = crate::WeakKeyMap::new();
            let value = Strong::new(5u32);
            let ours = Strong::downgrade(&value);
            if in_map {
                map.insert(1u32, &value);
            }
            if in_set {
                set.insert(&value);
            }
            if as_key {
                keyed.insert(&value, 7u64);
            }
            let entries = u32::from(in_map) + u32::from(in_set) + u32::from(as_key);
            // The implicit weak, ours, and one an entry.
            assert_eq!(ours.stored_weak_count(), 2 + entries);
            let hooks = live_hooks_on(&value);
            drop(value);
            // Removed on this thread, each shard free: every entry folds,
            // and one takes the implicit weak.
            let took = hooks
                .iter()
                .filter(|hook| hook.took_implicit_weak())
                .count();
            assert_eq!(took, 1, "{entries} entries folded");
            drop(hooks);
            assert!(map.is_empty() && set.is_empty() && keyed.is_empty());
            let released = settle::until(|| ours.stored_weak_count() == 1, crate::flush);
            assert!(
                released,
                "{entries} entries left the weak count at {}",
                ours.stored_weak_count()
            );
        }
    }

    /// C21: a value that dies while `retain_shard`'s lock-free scan looks
    /// at its entry (the last `Strong` dropped inside `keep`): the death
    /// removes and folds the entry, clearing its hook's key, which the scan
    /// then reads; the removal under the lock finds nothing, and the other
    /// entry stays. (A debug assertion on reading a folded hook's key
    /// failed here.)
    #[test]
    fn a_death_inside_retains_scan_leaves_the_rest() {
        let map = WeakValueMap::new();
        let staying = Strong::new(2u32);
        let mut dying = Some(Strong::new(1u32));
        map.insert(1u32, dying.as_ref().expect("alive"));
        map.insert(2u32, &staying);
        let table = &map.core.table;
        let mut removed = 0;
        for shard in 0..table.shard_len() {
            removed += table.retain_shard(
                shard,
                |item| {
                    if item.key == 1 {
                        drop(dying.take());
                        false
                    } else {
                        true
                    }
                },
                |_, _| {},
            );
        }
        assert!(dying.is_none(), "the scan met the dying entry");
        assert_eq!(removed, 0, "its death removed it first");
        assert_eq!(map.len(), 1);
        assert_eq!(map.get(&2).as_deref(), Some(&2));
    }

    /// One way an entry (under `key`, holding `value`) leaves its map;
    /// each ends with `value` dropped.
    type Exit<K> = (&'static str, fn(&WeakValueMap<K, u32>, &K, Strong<u32>));

    /// Along every exit, a removed entry's side is dropped once its
    /// deferred drop runs: a handle to the entry's hook, taken while the
    /// entry is in the map, ends up its node's only owner.
    fn every_exit_drops_the_side<K>(key: fn(u32) -> K)
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        let exits: [Exit<K>; 5] = [
            ("remove", |map, key, value| {
                assert!(map.remove(key).is_some());
                drop(value);
            }),
            ("replacing insert", |map, key, value| {
                let newer = Strong::new(2);
                assert!(map.insert(key.clone(), &newer).is_some());
                drop(value);
            }),
            ("death", |_, _, value| drop(value)),
            ("retain", |map, _, value| {
                map.retain(|_, _| false);
                drop(value);
            }),
            ("clear", |map, _, value| {
                map.clear();
                drop(value);
            }),
        ];
        for (exit, leave) in exits {
            let map = WeakValueMap::new();
            let value = Strong::new(1);
            map.insert(key(1), &value);
            let hook = {
                let mut hooks = live_hooks_on(&value);
                assert_eq!(hooks.len(), 1, "{exit}: one entry watches the value");
                hooks.pop().expect("counted")
            };
            // The side's, the list's and ours.
            assert_eq!(hook.ref_count(), 3, "{exit}");
            leave(&map, &key(1), value);
            assert!(map.is_empty(), "{exit}");
            wait_until_the_side_is_dropped(exit, &hook);
        }
    }

    /// Keys without destructors: a removed entry is dropped in place, by
    /// the function its writer deferred (`Table::drop_whole`).
    #[test]
    fn a_removed_entry_drops_its_side() {
        assert!(!<Item<u32, u32> as Relocatable>::drop_runs_user_code());
        every_exit_drops_the_side(|id| id);
    }

    /// Keys whose destructor only frees memory (`plain_drop`): dropped in
    /// place, as keys without one.
    #[test]
    fn a_removed_entry_whose_key_only_frees_memory_drops_its_side() {
        assert!(!<Item<String, u32> as Relocatable>::drop_runs_user_code());
        every_exit_drops_the_side(|id| id.to_string());
    }

    /// A key with a destructor of its own.
    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    struct Named(u32);

    impl Drop for Named {
        fn drop(&mut self) {}
    }

    /// Keys with destructors (user code): a removed entry is moved out
    /// whole (`Table::take_whole`) and dropped on the finalizer thread,
    /// its side with it.
    #[test]
    fn a_removed_entry_whose_key_runs_user_code_drops_its_side() {
        assert!(<Item<Named, u32> as Relocatable>::drop_runs_user_code());
        every_exit_drops_the_side(Named);
    }

    /// A key whose `Eq` or `Clone` panics if the key says so. Every key
    /// hashes alike, so all share one probe sequence: a write compares its
    /// key with each entry's, and the shard rebuilds within a few inserts.
    #[derive(Debug)]
    struct Touchy {
        id: u32,
        eq_panics: bool,
        clone_panics: bool,
    }

    impl Touchy {
        fn new(id: u32) -> Self {
            Touchy {
                id,
                eq_panics: false,
                clone_panics: false,
            }
        }
    }

    impl Hash for Touchy {
        fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
    }

    impl PartialEq for Touchy {
        fn eq(&self, other: &Self) -> bool {
            if self.eq_panics || other.eq_panics {
                panic!("Eq failure (expected by this test)");
            }
            self.id == other.id
        }
    }

    impl Eq for Touchy {}

    impl Clone for Touchy {
        fn clone(&self) -> Self {
            if self.clone_panics {
                panic!("Clone failure (expected by this test)");
            }
            Touchy::new(self.id)
        }
    }

    /// An insert whose `Eq` panics has registered its entry's hook and
    /// parked the entry, unpublished: dropping it after the unlock drops
    /// its side, which detaches the hook. At once, with no deferred drop
    /// to wait for.
    #[test]
    fn an_insert_that_panics_in_eq_detaches_the_hook_it_registered() {
        let map = WeakValueMap::new();
        let held = Strong::new(1);
        map.insert(Touchy::new(1), &held);
        let value = Strong::new(2);
        let key = Touchy {
            eq_panics: true,
            ..Touchy::new(2)
        };
        assert!(catch_unwind(AssertUnwindSafe(|| map.insert(key, &value))).is_err());
        assert_eq!(map.len(), 1);
        assert!(
            live_hooks_on(&value).is_empty(),
            "the parked entry's side was never dropped: its hook still watches the value"
        );
        assert_eq!(
            live_hooks_on(&held).len(),
            1,
            "the entry in place keeps its hook"
        );
    }

    /// As above, for an insert whose rebuild panics in a key's `Clone`.
    #[test]
    fn an_insert_whose_rebuild_panics_in_clone_detaches_the_hook_it_registered() {
        let map = WeakValueMap::new();
        let values: Vec<_> = (0..64).map(Strong::new).collect();
        let failed = values
            .iter()
            .find(|value| {
                let key = Touchy {
                    clone_panics: true,
                    ..Touchy::new(***value)
                };
                catch_unwind(AssertUnwindSafe(|| map.insert(key, value))).is_err()
            })
            .expect("the shard never rebuilt");
        assert_eq!(map.len(), **failed as usize);
        assert!(
            live_hooks_on(failed).is_empty(),
            "the parked entry's side was never dropped: its hook still watches the value"
        );
    }
}

/// M8's sequence lock, modelled where the map's iteration meets the
/// table: a scan of a shard racing a move, the replacement of a key's
/// value in a later group than its old item's (whose group has no free
/// slot), made in two stores. The scan may straddle them, and see both
/// items or neither; `scan_shard` must then say so. (How many scans an
/// iteration makes before it keeps a spoiled one is policy, not protocol:
/// a writer paused in the middle of a move spoils every scan until it goes
/// on, and a reader that does not wait for it keeps the last.)
#[cfg(all(test, weakrefs_loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    type Map = WeakValueMap<u64, u8, std::hash::BuildHasherDefault<Itself>>;

    /// Keys `keys`, with values 1 and 3, filling their home group (two
    /// slots under loom) of a two-group table; the first key's value
    /// replaced by 2 while another thread scans the shard. Returns whether
    /// the scan was whole, and the entries it saw, sorted.
    fn race_a_move(keys: [u64; 2]) -> (bool, Vec<(u64, u8)>) {
        // A capacity of 4 gives each shard two groups of two slots.
        let map: Arc<Map> = Arc::new(WeakValueMap::with_capacity_and_hasher(
            4,
            Default::default(),
        ));
        let (old, other, new) = (Strong::new(1u8), Strong::new(3u8), Strong::new(2u8));
        map.insert(keys[0], &old);
        map.insert(keys[1], &other);
        let shard = map.core.table.shard_index(map.hash(&keys[0]));
        assert_eq!(map.core.table.shard_index(map.hash(&keys[1])), shard);
        let reader = {
            let map = Arc::clone(&map);
            thread::spawn(move || {
                let mut seen = Vec::new();
                let whole = map.core.table.scan_shard(shard, false, |item| {
                    // Every value is alive until the model's end.
                    seen.push((*item.key(), *item.value.upgrade().expect("alive")));
                });
                seen.sort_unstable();
                (whole, seen)
            })
        };
        map.insert(keys[0], &new);
        let scanned = reader.join().unwrap();
        drop((old, other, new));
        scanned
    }

    /// Both keys' home is group 0 of two: the move goes to group 1, which
    /// the scan reads after the old slot, so a straddling scan sees both.
    #[test]
    fn a_scan_that_saw_a_moved_key_twice_is_not_whole() {
        loom::model(|| {
            let (whole, seen) = race_a_move([0, 1]);
            if whole {
                assert!(
                    seen == [(0, 1), (1, 3)] || seen == [(0, 2), (1, 3)],
                    "saw {seen:?}"
                );
            }
        });
    }

    /// The home group is the last (the hash's low half at least 2^31): the
    /// search for a vacancy wraps to group 0, which the scan reads before
    /// the old slot, so a straddling scan sees neither (or both, if it
    /// reads group 0 after the fill and the old slot before the tombstone).
    #[test]
    fn a_scan_that_missed_a_key_moved_past_the_end_is_not_whole() {
        loom::model(|| {
            let (a, b) = (1 << 31, (1 << 31) + 1);
            let (whole, seen) = race_a_move([a, b]);
            if whole {
                assert!(
                    seen == [(a, 1), (b, 3)] || seen == [(a, 2), (b, 3)],
                    "saw {seen:?}"
                );
            }
        });
    }
}

/// Hashes a `u64` to itself, so that tests and models choose the shard
/// and home group of their keys: small keys share both.
#[cfg(test)]
#[derive(Default)]
struct Itself(u64);

#[cfg(test)]
impl std::hash::Hasher for Itself {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}
