//! `WeakSet`: a concurrent set whose members are held weakly, by identity.

use std::convert::Infallible;
use std::fmt;
use std::hash::BuildHasher;

use crate::callbacks::{Hook, SafePoint};
use crate::identity::IdentityState;
use crate::raw::collection::{self, Collection, EntryHook, Watching};
use crate::raw::table::{Relocatable, ShardedTable, Sided, WritePin};
use crate::strong::Strong;
use crate::weak::{EntryWeak, Weak};

/// One member: immutable once published (SAFETY.md, section 7). Its
/// `Weak` alone, what lookups and iterations read: the hook sits in the
/// slot's side, beside the item, so a scan of the set reads one pointer a
/// member (two for an unsized member's fat one), not two.
struct Member<T: ?Sized> {
    object: EntryWeak<T>,
}

impl<T: ?Sized> Sided for Member<T> {
    type Side = EntryHook;
    type Marks = Infallible;

    /// The hook, then the member's `Weak`, for the references the hook
    /// says it stands for (C21).
    #[inline]
    unsafe fn drop_with_side(member: *mut Self, side: *mut EntryHook) {
        // SAFETY: owned, each dropped once and not used after (the
        // caller's 1).
        unsafe { EntryHook::drop_with_weak(side, std::ptr::addr_of!((*member).object)) }
    }
}

// The object's block address is unique among the members of a set (one
// member per object), survives bitwise moves, and is kept reserved by the
// member's `Weak` until the member is dropped, after every thread that saw
// it has unpinned.
// The side is a `Hook`, one pointer, never written through `&` and dropped
// as our own code (a detach and a count).
// SAFETY: a member is a pointer, so nothing writes its bytes through
// `&Member`, and a relocation moves it whole (1, 2); its identity is as
// just said (3); the side as just said (4).
unsafe impl<T: ?Sized> Relocatable for Member<T> {
    /// A `Weak`: no user code (a `Weak` never drops its object's value).
    #[inline(always)]
    fn drop_runs_user_code() -> bool {
        false
    }

    /// Nothing: a member moves whole.
    type LeftBehind = ();

    fn identity(&self, _: &EntryHook) -> usize {
        self.object.identity()
    }

    fn filed(&self, side: &EntryHook) -> u32 {
        side.0.key()
    }

    fn prefetch_filed(&self, side: &EntryHook) {
        side.0.prefetch();
    }

    unsafe fn relocate(&self) -> Self {
        // SAFETY: a pointer, which nothing writes through `&Member`
        // (1); the caller drops one of the two copies whole (`relocate`'s
        // 1), so each is owned once.
        unsafe { std::ptr::read(self) }
    }

    unsafe fn take_left_behind(_: *const Self) {}
}

impl<T: ?Sized + Send + Sync + 'static> Watching for Member<T> {
    type Target = T;

    fn watched(&self) -> &Weak<T> {
        &self.object
    }

    type Payload = ();

    fn hook<'a>(&'a self, side: &'a EntryHook) -> &'a Hook {
        &side.0
    }
}

/// The shared core; removal callbacks reach their shard of its table, and
/// on their slower way the core itself, by uncounted addresses (M4, M14).
struct SetCore<T: ?Sized, S> {
    hasher: S,
    table: ShardedTable<Member<T>>,
}

impl<T: ?Sized + Send + Sync + 'static, S: Send + Sync + 'static> Collection<Member<T>>
    for SetCore<T, S>
{
    fn table(&self) -> &ShardedTable<Member<T>> {
        &self.table
    }
}

/// A concurrent set whose members are held weakly and compared by
/// identity, like JavaScript's `WeakSet` (Python's `weakref.WeakSet`
/// compares members by value): a member disappears on its own once the
/// last [`Strong`] to it is dropped.
///
/// Membership is by object: two objects with equal values are two members,
/// and an object's address being reused after its death never makes a new
/// object a member (the set's `Weak` keeps the old address reserved until
/// its entry is gone). Reads ([`contains`](Self::contains), iteration)
/// take no lock and never block; writes lock one shard at a time. The
/// removal of a dead member runs as a death callback, so
/// [`len`](Self::len) is exact after [`flush`](crate::flush). After
/// [`shutdown`](crate::shutdown) there is no finalizer thread to hand a
/// removal to: a member that dies while another thread holds its shard's
/// lock keeps its entry, invisible to iteration and
/// [`contains`](Self::contains) but counted by `len`, until the next
/// `flush`, which removes it, waiting for the lock (or
/// [`purge`](Self::purge), [`retain`](Self::retain) or
/// [`clear`](Self::clear)), as in the maps.
///
/// Members may be unsized: a `WeakSet<dyn Listener>` holds listeners of
/// mixed types, each as the `Strong<dyn Listener>` it lives in (see
/// [`unsize!`](crate::unsize)).
///
/// Each membership registers a death callback on its member (one small
/// allocation), detached at once when the member leaves any other way.
/// [`remove`](Self::remove) and [`retain`](Self::retain) count towards
/// the next compaction of the member's callback list, which frees
/// detached nodes; a member that leaves through [`clear`](Self::clear) or
/// the set's drop leaves its node (a few dozen bytes) until the object gets
/// about as many new registrations as its list kept, or dies, and an
/// object's first six registrations (two on 32-bit targets) stay until it
/// dies, as in
/// [`WeakValueMap`](crate::WeakValueMap).
///
/// An empty set is not free: it has four shards per CPU (at least 4, at
/// most 256), each with a small table, about 6 KiB in all on two CPUs. An
/// observer registry with one set per subject pays that per subject.
///
/// # Examples
///
/// An observer registry that never keeps an observer alive:
///
/// ```
/// use weakrefs::{flush, Strong, WeakSet};
///
/// let listeners: WeakSet<String> = WeakSet::new();
/// let a = Strong::new("listener a".to_string());
/// let b = Strong::new("listener b".to_string());
/// listeners.insert(&a);
/// listeners.insert(&b);
/// assert_eq!(listeners.len(), 2);
///
/// drop(b); // b unsubscribes by going away
/// flush();
/// let names: Vec<_> = listeners.iter().map(|l| l.to_string()).collect();
/// assert_eq!(names, ["listener a"]);
/// ```
pub struct WeakSet<T: ?Sized, S = IdentityState> {
    core: Strong<SetCore<T, S>>,
}

impl<T: ?Sized + Send + Sync + 'static> WeakSet<T, IdentityState> {
    /// An empty set.
    ///
    /// ```
    /// let set: weakrefs::WeakSet<u32> = weakrefs::WeakSet::new();
    /// assert!(set.is_empty());
    /// ```
    pub fn new() -> Self {
        Self::with_capacity_and_hasher(0, IdentityState::new())
    }

    /// An empty set with room for about `capacity` members before any
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
    /// let set: weakrefs::WeakSet<u32> = weakrefs::WeakSet::with_capacity(1_000);
    /// assert!(set.is_empty());
    /// ```
    pub fn with_capacity(capacity: usize) -> Self {
        Self::with_capacity_and_hasher(capacity, IdentityState::new())
    }
}

impl<T, S> WeakSet<T, S>
where
    T: ?Sized + Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    /// An empty set that hashes member addresses with `hasher`.
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// let set: weakrefs::WeakSet<u8, RandomState> = weakrefs::WeakSet::with_hasher(RandomState::new());
    /// assert!(set.is_empty());
    /// ```
    pub fn with_hasher(hasher: S) -> Self {
        Self::with_capacity_and_hasher(0, hasher)
    }

    /// An empty set with room for about `capacity` members, hashing member
    /// addresses with `hasher`.
    ///
    /// # Panics
    ///
    /// As `with_capacity`: if the tables for `capacity` entries
    /// would not fit in the address space.
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// let set: weakrefs::WeakSet<u8, RandomState> =
    ///     weakrefs::WeakSet::with_capacity_and_hasher(64, RandomState::new());
    /// assert!(set.is_empty());
    /// ```
    pub fn with_capacity_and_hasher(capacity: usize, hasher: S) -> Self {
        WeakSet {
            core: Strong::new_cyclic(|core| {
                let hooks = collection::hooks::<_, Member<T>>(core, false);
                SetCore {
                    hasher,
                    table: ShardedTable::with_capacity(capacity, false, hooks),
                }
            }),
        }
    }

    #[inline(always)]
    fn hash(&self, object: &Strong<T>) -> u64 {
        crate::raw::hash_one(&self.core.hasher, &Strong::identity(object))
    }

    /// Adds `object`, held weakly. Returns true if it was not a member.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakSet};
    ///
    /// let set = WeakSet::new();
    /// let obj = Strong::new(1);
    /// assert!(set.insert(&obj));
    /// assert!(!set.insert(&obj)); // already a member
    /// assert!(set.insert(&Strong::new(1))); // an equal value, another object
    /// ```
    pub fn insert(&self, object: &Strong<T>) -> bool {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        let hash = self.hash(object);
        // No lock-free check first: the check under the lock below is the
        // one that counts, and a new member (the common case) would pay for
        // a pin for nothing.
        let member = Member {
            object: EntryWeak::new(Strong::downgrade(object)),
        };
        let hook = EntryHook(collection::remove_on_death(&self.core, hash, object, ()));
        let pin = WritePin::lazy();
        let mut writer = self.core.table.write(hash, &pin);
        match writer.insert_unless(hash, (member, hook), |member| member.object.names(object)) {
            Ok(()) => true,
            Err(member) => {
                // Already a member. Ours is dropped (its callback detached)
                // after the unlock.
                drop(writer);
                drop(pin);
                drop(member);
                false
            }
        }
    }

    /// Removes `object`. Returns true if it was a member.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakSet};
    ///
    /// let set = WeakSet::new();
    /// let obj = Strong::new("x");
    /// set.insert(&obj);
    /// assert!(set.remove(&obj));
    /// assert!(!set.remove(&obj));
    /// ```
    pub fn remove(&self, object: &Strong<T>) -> bool {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        let hash = self.hash(object);
        let pin = WritePin::lazy();
        let mut writer = self.core.table.write(hash, &pin);
        match writer.remove(hash, |member, _| member.object.names(object)) {
            Some((_, hook)) => {
                // Detached once the removal is published (M5).
                hook.0.detach();
                drop(writer);
                drop(pin);
                collection::note_detached(object);
                true
            }
            None => false,
        }
    }

    /// True if `object` is a member. Lock-free.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakSet};
    ///
    /// let set = WeakSet::new();
    /// let (a, b) = (Strong::new(0), Strong::new(0));
    /// set.insert(&a);
    /// assert!(set.contains(&a));
    /// assert!(!set.contains(&b)); // equal value, other object
    /// ```
    pub fn contains(&self, object: &Strong<T>) -> bool {
        let hash = self.hash(object);
        let pinned = self.core.table.pin();
        // The caller's `Strong` keeps the object alive: a member naming it
        // is a live member.
        let found = self
            .core
            .table
            .candidates(hash, &pinned)
            .any(|member| member.object.names(object));
        found
    }

    /// Members not yet removed: exact after [`flush`](crate::flush);
    /// members that died since may still be counted until their removal
    /// callbacks run.
    ///
    /// ```
    /// use weakrefs::{flush, Strong, WeakSet};
    ///
    /// let set = WeakSet::new();
    /// let obj = Strong::new(());
    /// set.insert(&obj);
    /// assert_eq!(set.len(), 1);
    /// drop(obj);
    /// flush();
    /// assert_eq!(set.len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.core.table.len()
    }

    /// True if [`len`](Self::len) is zero.
    ///
    /// ```
    /// let set: weakrefs::WeakSet<()> = weakrefs::WeakSet::new();
    /// assert!(set.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live members. Weakly consistent: never yields a dead member or
    /// panics while other threads change the set; it may or may not see
    /// those changes.
    ///
    /// The iterator snapshots one shard at a time, and holds a `Strong` to
    /// each member of the current shard's snapshot until it yields it or
    /// is dropped: a member whose last other handle goes meanwhile dies
    /// only then (its callbacks run, and it leaves the set, once the
    /// iterator lets go). Keep iterators short-lived; one forgotten with
    /// `std::mem::forget` keeps those members alive for good.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakSet};
    ///
    /// let set = WeakSet::new();
    /// let (a, b) = (Strong::new(1), Strong::new(2));
    /// set.insert(&a);
    /// set.insert(&b);
    /// drop(b);
    /// let live: Vec<i32> = set.iter().map(|m| *m).collect();
    /// assert_eq!(live, [1]);
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = Strong<T>> + '_ {
        collection::snapshots(&self.core.table, |member| member.object.upgrade())
    }

    /// Keeps only the live members for which `f` returns true; removes the
    /// rest (and any dead ones). `f` runs once per live member, without any
    /// lock held, but keeps the thread pinned while it runs (keep it short).
    ///
    /// ```
    /// use weakrefs::{Strong, WeakSet};
    ///
    /// let set = WeakSet::new();
    /// let objects: Vec<_> = (0..6).map(Strong::new).collect();
    /// for obj in &objects {
    ///     set.insert(obj);
    /// }
    /// set.retain(|n| n % 3 == 0);
    /// assert_eq!(set.len(), 2);
    /// ```
    pub fn retain<F: FnMut(&T) -> bool>(&self, mut f: F) {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        collection::retain_live(&self.core.table, |_, object| f(object), |_, _| {});
    }

    /// Removes every member.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakSet};
    ///
    /// let set = WeakSet::new();
    /// let obj = Strong::new(1);
    /// set.insert(&obj);
    /// set.clear();
    /// assert!(set.is_empty());
    /// ```
    pub fn clear(&self) {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        collection::clear(&self.core.table, |_, _| None::<()>, |()| {});
    }

    /// Removes the members that are dead now, without waiting for their
    /// death callbacks; returns how many.
    ///
    /// ```
    /// use weakrefs::{Strong, WeakSet};
    ///
    /// let set = WeakSet::new();
    /// let obj = Strong::new(1);
    /// set.insert(&obj);
    /// drop(obj);
    /// assert!(set.purge() <= 1); // 0 if the callback got there first
    /// assert!(set.is_empty());
    /// ```
    pub fn purge(&self) -> usize {
        // A safe point (SAFETY.md, C18): dropped last.
        let _safe_point = SafePoint;
        collection::purge(&self.core.table, |_, _| None::<()>, |()| {})
    }
}

impl<T, S> Default for WeakSet<T, S>
where
    T: ?Sized + Send + Sync + 'static,
    S: BuildHasher + Default + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::with_capacity_and_hasher(0, S::default())
    }
}

impl<T: ?Sized, S> fmt::Debug for WeakSet<T, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakSet")
            .field("len", &self.core.table.len())
            .finish_non_exhaustive()
    }
}

/// `set.par_iter()` (with `use rayon::prelude::*`): the live members, in
/// parallel, shard by shard; weakly consistent, as [`WeakSet::iter`].
///
/// ```
/// use rayon::prelude::*;
/// use weakrefs::{Strong, WeakSet};
///
/// let set = WeakSet::new();
/// let (a, b) = (Strong::new(2), Strong::new(3));
/// set.insert(&a);
/// set.insert(&b);
/// drop(b);
/// assert_eq!(set.par_iter().map(|m| *m).collect::<Vec<_>>(), [2]);
/// ```
#[cfg(feature = "rayon")]
#[cfg_attr(docsrs, doc(cfg(feature = "rayon")))]
impl<'a, T, S> rayon::iter::IntoParallelIterator for &'a WeakSet<T, S>
where
    T: ?Sized + Send + Sync + 'static,
    S: BuildHasher + Send + Sync + 'static,
{
    type Item = Strong<T>;
    type Iter = crate::ParIter<'a, Strong<T>>;

    fn into_par_iter(self) -> Self::Iter {
        let table = &self.core.table;
        crate::ParIter::new(table.shard_len(), move |shard| {
            collection::shard_snapshot(table, shard, |member: &Member<T>| member.object.upgrade())
        })
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;

    type Path<'a> = (&'a str, &'a dyn Fn(&WeakSet<u32>));

    /// Every way a member leaves the set but by its object's death detaches
    /// its hook, which lives in the slot's side: an object added and taken
    /// out again thousands of times keeps a bounded callback list. (A path
    /// that forgot the hook would leave one node per round.)
    #[test]
    #[cfg_attr(
        miri,
        ignore = "thousands of rounds; the paths run under Miri in tests/"
    )]
    fn every_removal_path_detaches_the_members_hook() {
        const ROUNDS: u32 = 2_000;
        let object = Strong::new(7u32);
        let paths: [Path<'_>; 6] = [
            ("remove", &|set| {
                assert!(set.insert(&object));
                assert!(set.remove(&object));
            }),
            ("insert of a member", &|set| {
                set.insert(&object);
                assert!(!set.insert(&object));
                assert!(set.remove(&object));
            }),
            ("retain", &|set| {
                set.insert(&object);
                set.retain(|_| false);
            }),
            ("clear", &|set| {
                set.insert(&object);
                set.clear();
            }),
            ("purge of a live member", &|set| {
                set.insert(&object);
                set.purge();
                assert!(set.remove(&object));
            }),
            ("dropped set", &|_| {
                let set = WeakSet::new();
                set.insert(&object);
            }),
        ];
        for (name, path) in paths {
            let set = WeakSet::new();
            for _ in 0..ROUNDS {
                path(&set);
            }
            set.clear();
            let left = Strong::callback_list(&object).node_count();
            assert!(left < 200, "{name}: {left} hooks left on the object");
        }
    }

    /// Tests that pin the process-wide epoch: Miri runs them without its
    /// leak check (`.ci/miri`'s third run, which takes `pinned::`), since
    /// they leave the finalizer thread parked.
    mod pinned {
        use super::*;

        /// An object that lives on after leaving many sets (of `WeakSet`s, the
        /// remove path; of `WeakKeyMap`s, as a key): each removal counts its
        /// detached hook towards a compaction of the object's callback list,
        /// which shrinks back to a few nodes instead of keeping one per set
        /// left until as many new registrations come or the object dies.
        #[test]
        fn an_object_keeps_no_detached_hooks_of_the_sets_it_left() {
            // Fewer under Miri, where each collection takes milliseconds.
            const SETS: usize = if cfg!(miri) { 100 } else { 1_000 };
            let object = Strong::new(7u32);
            let sets: Vec<WeakSet<u32>> = (0..SETS).map(|_| WeakSet::new()).collect();
            for set in &sets {
                set.insert(&object);
            }
            assert!(Strong::callback_list(&object).node_count() >= SETS);
            for set in &sets {
                assert!(set.remove(&object));
            }
            let left = Strong::callback_list(&object).node_count();
            assert!(left < 20, "{left} hooks left after leaving {SETS} sets");
            let maps: Vec<crate::WeakKeyMap<u32, u8>> =
                (0..SETS).map(|_| crate::WeakKeyMap::new()).collect();
            for map in &maps {
                map.insert(&object, 1);
            }
            for map in &maps[..SETS / 2] {
                assert!(map.remove(&object));
            }
            for map in &maps[SETS / 2..] {
                // A replacement detaches the replaced entry's hook.
                assert!(map.insert(&object, 2));
            }
            // Replacements pile nothing up either (each pushes a new hook,
            // which counts as work, and detaches the old one).
            let listed = Strong::callback_list(&object).node_count();
            assert!(
                listed < SETS * 3 / 2,
                "{listed} hooks listed after the replacements"
            );
            for map in &maps[SETS / 2..] {
                assert!(map.remove(&object));
            }
            let left = Strong::callback_list(&object).node_count();
            assert!(left < 20, "{left} hooks left after leaving {SETS} maps");
        }
    }

    #[test]
    fn a_member_is_its_weak_alone() {
        // Iterations and `contains` read the items of the set's tables, so
        // every byte of a member is paid on every line a scan reads: the
        // hook lives in the side. One word for a sized object, two (address
        // and metadata) for an unsized one.
        let word = std::mem::size_of::<usize>();
        assert_eq!(std::mem::size_of::<Member<u64>>(), word);
        assert_eq!(std::mem::size_of::<Member<str>>(), 2 * word);
        assert_eq!(std::mem::size_of::<EntryHook>(), word);
    }
}
