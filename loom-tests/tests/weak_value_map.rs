//! Loom models of the shard table protocol (SAFETY.md, section 7), through
//! `WeakValueMap` and `WeakSet`.
//! Under loom the map has two shards whose tables start with two slots, so
//! inserts grow tables, and the global callback runtime has no thread:
//! `flush` runs the removal callbacks on the calling thread.

#![cfg(weakrefs_loom)]

use std::collections::hash_map::DefaultHasher;
use std::hash::BuildHasherDefault;

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use weakrefs::{flush, Strong};

/// Loom needs every execution to take the same path: a fixed hasher, not
/// `RandomState`.
type WeakValueMap<K, V> = weakrefs::WeakValueMap<K, V, BuildHasherDefault<DefaultHasher>>;

/// M4: the death of the previous value under a key, and its removal
/// callback, racing the insert of a newer value under the same key: the
/// newer value always survives.
#[test]
fn insert_races_death_of_the_previous_value() {
    loom::model(|| {
        let map = Arc::new(WeakValueMap::default());
        let old = Strong::new(1u8);
        map.insert(0u8, &old);
        let dying = thread::spawn(move || {
            drop(old);
            flush(); // runs the removal callback here, racing the insert
        });
        let new = Strong::new(2u8);
        map.insert(0u8, &new);
        dying.join().unwrap();
        flush();
        assert_eq!(map.get(&0).as_deref(), Some(&2));
        assert_eq!(map.len(), 1);
    });
}

/// M1, M2: a lock-free `get` racing `remove` and the value's death never
/// sees freed memory and never returns a dead value.
#[test]
fn get_races_remove_and_death() {
    loom::model(|| {
        let map = Arc::new(WeakValueMap::default());
        let value = Strong::new(7u8);
        map.insert(0u8, &value);
        let reader = {
            let map = map.clone();
            thread::spawn(move || map.get(&0).map(|v| *v))
        };
        let removed = map.remove(&0);
        drop(value);
        drop(removed);
        let seen = reader.join().unwrap();
        assert!(seen.is_none() || seen == Some(7));
        flush();
        assert!(map.is_empty());
    });
}

/// C20: a value's death racing `remove` of its entry, beside an entry of
/// another value. The death runs its hook unclaimed and claims it only if
/// it finds the entry under the shard's lock; otherwise the removal took
/// the entry and detaches the hook. Either way the entry goes once, the
/// other stays, and every hook and entry is freed (loom's leak tracker).
/// (If the removal upgrades the value first, the death comes with the
/// drop of what it returned, on this thread, after it.)
#[test]
fn a_death_races_the_removal_of_its_entry() {
    loom::model(|| {
        let map = Arc::new(WeakValueMap::default());
        let value = Strong::new(7u8);
        let other = Strong::new(8u8);
        map.insert(0u8, &value);
        map.insert(1u8, &other);
        let dying = thread::spawn(move || drop(value));
        drop(map.remove(&0));
        dying.join().unwrap();
        flush();
        assert!(map.get(&0).is_none());
        assert_eq!(map.get(&1).as_deref(), Some(&8));
        assert_eq!(map.len(), 1);
    });
}

/// M3: a read racing the growth of its shard finds the item that was
/// there before.
#[test]
fn read_races_growth() {
    loom::model(|| {
        let map = Arc::new(WeakValueMap::default());
        let first = Strong::new(1u8);
        map.insert(1u8, &first);
        let reader = {
            let map = map.clone();
            thread::spawn(move || map.get(&1).map(|v| *v))
        };
        let others: Vec<_> = (2u8..4).map(Strong::new).collect();
        for value in &others {
            map.insert(**value, value);
        }
        assert_eq!(reader.join().unwrap(), Some(1));
        assert_eq!(map.len(), 3);
    });
}

/// M6: two callers race on one key; `init` runs once and both get the
/// same value.
#[test]
fn single_flight_leader_races_waiter() {
    loom::model(|| {
        let map = Arc::new(WeakValueMap::default());
        let inits = Arc::new(AtomicUsize::new(0));
        let other = {
            let (map, inits) = (map.clone(), inits.clone());
            thread::spawn(move || {
                map.get_or_insert_with(0u8, || {
                    inits.fetch_add(1, Ordering::SeqCst);
                    5u8
                })
            })
        };
        let mine = map.get_or_insert_with(0u8, || {
            inits.fetch_add(1, Ordering::SeqCst);
            5u8
        });
        let theirs = other.join().unwrap();
        assert!(Strong::ptr_eq(&mine, &theirs));
        assert_eq!(inits.load(Ordering::SeqCst), 1);
    });
}

/// M6: a leader whose `init` fails settles its load as failed; a caller
/// that was waiting on it retries and loads the value itself.
#[test]
fn a_failing_leader_lets_the_waiter_lead() {
    loom::model(|| {
        let map: Arc<WeakValueMap<u8, u8>> = Arc::new(WeakValueMap::default());
        let failing = {
            let map = map.clone();
            thread::spawn(move || map.try_get_or_insert_with(0, || Err(())).is_err())
        };
        let value = map.get_or_insert_with(0, || 9);
        let failed = failing.join().unwrap();
        assert_eq!(*value, 9);
        // The failing call either failed, or came late and found the value.
        let _ = failed;
        assert_eq!(map.get(&0).as_deref(), Some(&9));
    });
}

/// M2: a read racing the replacement of a live value under its key finds
/// the old value or the new one, never neither.
#[test]
fn a_read_racing_a_replacement_finds_old_or_new() {
    loom::model(|| {
        let seen = race_a_replacement(|map| map.get(&0).map(|v| *v));
        assert!(seen == Some(1) || seen == Some(2), "saw {seen:?}");
    });
}

/// Key 0's value 1 replaced by value 2 while another thread runs `read`,
/// whose result it returns. Room for the replacement without a rebuild:
/// it fills a free slot of the old item's group.
fn race_a_replacement<R: Send + 'static>(
    read: impl FnOnce(&WeakValueMap<u8, u8>) -> R + Send + 'static,
) -> R {
    let map = Arc::new(WeakValueMap::with_capacity_and_hasher(
        4,
        Default::default(),
    ));
    let (old, new) = (Strong::new(1u8), Strong::new(2u8));
    map.insert(0u8, &old);
    let reader = {
        let map = map.clone();
        thread::spawn(move || read(&map))
    };
    map.insert(0u8, &new);
    let seen = reader.join().unwrap();
    drop((old, new));
    seen
}

/// M8: an iteration racing the replacement of a key's value in the same
/// group sees the key once, with the old value or the new one: both
/// control bytes change in one store of the group's word. (They changed in
/// two, and an iteration between them yielded the key twice.)
#[test]
fn an_iteration_racing_a_replacement_in_the_group_yields_the_key_once() {
    loom::model(|| {
        let seen = race_a_replacement(|map| {
            map.iter()
                .map(|(key, value)| (key, *value))
                .collect::<Vec<_>>()
        });
        assert!(seen == [(0, 1)] || seen == [(0, 2)], "saw {seen:?}");
    });
}

/// A key whose hash is its id, so that small ids share a shard, and whose
/// copy in the map is tracked: loom fails the model if one is never
/// dropped.
struct TrackedKey {
    id: u8,
    _track: loom::alloc::Track<()>,
}

impl TrackedKey {
    fn new(id: u8) -> Self {
        TrackedKey {
            id,
            _track: loom::alloc::Track::new(()),
        }
    }
}

/// A rebuild clones the keys it carries over (M3): each clone is tracked
/// too, so a key left behind in a replaced table and never dropped fails
/// the model.
impl Clone for TrackedKey {
    fn clone(&self) -> Self {
        TrackedKey::new(self.id)
    }
}

impl PartialEq for TrackedKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for TrackedKey {}
impl std::hash::Hash for TrackedKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from(self.id));
    }
}

/// Hashes a key to the `u64` it writes: small ids land in one shard.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0 << 8 | u64::from(*byte);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// M2, M3: a removal racing a rebuild of its shard (inserts past 3/4 of
/// the two starting slots): the removed item is dropped once, after both,
/// and every item the rebuild moved is dropped once, with the map.
#[test]
fn a_removal_racing_a_rebuild_drops_every_key_once() {
    loom::model(|| {
        let map: Arc<weakrefs::WeakValueMap<TrackedKey, u8, BuildHasherDefault<IdHasher>>> =
            Arc::new(weakrefs::WeakValueMap::default());
        // One insert past 3/4 of the two starting slots rebuilds (with
        // a second, the model exceeds loom's branch limit now that the
        // rebuild clones keys).
        let values: Vec<_> = (0u8..2).map(Strong::new).collect();
        map.insert(TrackedKey::new(0), &values[0]);
        let remover = {
            let map = map.clone();
            thread::spawn(move || map.remove(&TrackedKey::new(0)).map(|v| *v))
        };
        map.insert(TrackedKey::new(1), &values[1]);
        assert_eq!(remover.join().unwrap(), Some(0));
        assert_eq!(map.len(), 1);
        assert!(map.get(&TrackedKey::new(0)).is_none());
        assert_eq!(map.get(&TrackedKey::new(1)).as_deref(), Some(&1));
    });
}

/// A key whose `Eq` writes through `&self`, as a hit counter does, and
/// whose `Clone` reads what it writes.
struct CountingKey {
    id: u8,
    hits: AtomicUsize,
    _track: loom::alloc::Track<()>,
}

impl CountingKey {
    fn new(id: u8) -> Self {
        CountingKey {
            id,
            hits: AtomicUsize::new(0),
            _track: loom::alloc::Track::new(()),
        }
    }
}

impl Clone for CountingKey {
    fn clone(&self) -> Self {
        let copy = CountingKey::new(self.id);
        copy.hits
            .store(self.hits.load(Ordering::Relaxed), Ordering::Relaxed);
        copy
    }
}

impl PartialEq for CountingKey {
    fn eq(&self, other: &Self) -> bool {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.id == other.id
    }
}
impl Eq for CountingKey {}
impl std::hash::Hash for CountingKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from(self.id));
    }
}

/// M3: a read racing a rebuild by cloning. The reader's `Eq` writes
/// through `&K` while the rebuild clones that key through `&K`: nothing
/// copies the key's bytes, the reader finds its value, and the key left
/// behind in the replaced table is dropped once (loom's leak tracker).
#[test]
fn a_read_racing_a_rebuild_by_cloning_finds_its_key() {
    loom::model(|| {
        let map: Arc<weakrefs::WeakValueMap<CountingKey, u8, BuildHasherDefault<IdHasher>>> =
            Arc::new(weakrefs::WeakValueMap::default());
        let values: Vec<_> = (0u8..2).map(Strong::new).collect();
        map.insert(CountingKey::new(0), &values[0]);
        let reader = {
            let map = map.clone();
            thread::spawn(move || map.get(&CountingKey::new(0)).map(|v| *v))
        };
        // Past 3/4 of the two starting slots: the shard rebuilds.
        map.insert(CountingKey::new(1), &values[1]);
        assert_eq!(reader.join().unwrap(), Some(0));
        assert_eq!(map.len(), 2);
    });
}

/// M2: a removed item's slot is filled again only once its deferred drop
/// has run, after every reader that may have seen it unpinned. A reader
/// racing the removal and the churn that follows (inserts and removals in
/// the same shard, with the same control byte, which push the epoch on and reuse
/// freed slots) sees the old value or nothing, never another key's value,
/// and every key is dropped once.
#[test]
fn slot_reuse_races_a_reader_that_saw_the_old_entry() {
    loom::model(|| {
        let map: Arc<weakrefs::WeakValueMap<TrackedKey, u8, BuildHasherDefault<IdHasher>>> =
            Arc::new(weakrefs::WeakValueMap::with_capacity_and_hasher(
                4,
                Default::default(),
            ));
        let values: Vec<_> = (0u8..2).map(Strong::new).collect();
        map.insert(TrackedKey::new(0), &values[0]);
        let reader = {
            let map = map.clone();
            thread::spawn(move || map.get(&TrackedKey::new(0)).map(|v| *v))
        };
        map.remove(&TrackedKey::new(0));
        // Key 2's control byte is key 0's (bits 4 to 10 of the hash, zero
        // for both), and so is its home group: a refill of the freed slot is
        // an item with the very byte the reader may have seen. The epoch's
        // deferred frees of those slots (each a Release RMW setting the
        // slot's bit in its group's `freed` byte) may run in the reader's
        // pin, racing the fills, which may reuse a slot only after an
        // Acquire load of that byte (a Relaxed RMW there fails this model).
        for _ in 0..2 {
            map.insert(TrackedKey::new(2), &values[1]);
            map.remove(&TrackedKey::new(2));
        }
        let seen = reader.join().unwrap();
        assert!(seen.is_none() || seen == Some(0), "saw {seen:?}");
        assert!(map.is_empty());
    });
}

/// Hashes everything to 0. A set hashes its members' addresses, which vary
/// between executions; loom needs every execution to take the same path.
#[derive(Default)]
struct ConstantHasher;

impl std::hash::Hasher for ConstantHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, _: &[u8]) {}
}

/// `WeakSet`, M2 and M4 with identity keys: two threads insert one object
/// at once; exactly one insert adds it, and the set holds it once.
#[test]
fn set_inserts_of_one_object_race_and_add_it_once() {
    loom::model(|| {
        let set: Arc<weakrefs::WeakSet<u8, BuildHasherDefault<ConstantHasher>>> =
            Arc::new(weakrefs::WeakSet::default());
        let object = Strong::new(1u8);
        let other = {
            let (set, object) = (set.clone(), object.clone());
            thread::spawn(move || set.insert(&object))
        };
        let mine = set.insert(&object);
        let theirs = other.join().unwrap();
        assert!(mine ^ theirs, "added twice or never: {mine} {theirs}");
        assert_eq!(set.len(), 1);
        assert!(set.contains(&object));
    });
}

/// `WeakSet`, M14: the set dropped on one thread while a member dies on
/// another. The member's hook names its shard by an uncounted address, and
/// on the slower way the set's core by another; the set's drop closes the
/// shards under their locks and releases them, with the core's anchor,
/// through the epoch. The dying thread is pinned from before the load of
/// the hook's state that lets it run the hook to after its run, and runs
/// the hook only if that load finds it alive, so the release never runs
/// before the hook is done with
/// them (C20; the table's loom probe fails the model if it does,
/// or if the two race). A second set's inserts and removals push the epoch
/// on meanwhile, so that the release can run during the race. (It fails
/// without `on_death`'s pin, and with the release run at once instead of
/// deferred.)
#[test]
fn a_set_dropped_racing_a_member_death_never_reads_its_freed_core() {
    loom::model(|| {
        let set: weakrefs::WeakSet<u8, BuildHasherDefault<ConstantHasher>> =
            weakrefs::WeakSet::default();
        let member = Strong::new(1u8);
        set.insert(&member);
        let dying = thread::spawn(move || drop(member));
        drop(set);
        let churn: weakrefs::WeakSet<u8, BuildHasherDefault<ConstantHasher>> =
            weakrefs::WeakSet::default();
        let other = Strong::new(2u8);
        for _ in 0..2 {
            churn.insert(&other);
            churn.remove(&other);
        }
        dying.join().unwrap();
    });
}

/// `WeakSet`, M3, M4 and M10: a member's death racing the insert of another
/// member into its two-slot shard, which rebuilds it. The removal runs on
/// the dying thread if the shard's lock is free, else on `flush`: the dead
/// member goes, the new one stays, the length is exact. (With two inserts,
/// and so two rebuilds, the model exceeds loom's default branch limit, and
/// with a higher limit loom reports it nondeterministic; earlier, with the
/// removal always queued and also drained by the dying thread, it was
/// nondeterministic too. The cause is not yet understood.)
#[test]
fn set_member_death_races_an_insert_that_rebuilds() {
    loom::model(|| {
        let set: Arc<weakrefs::WeakSet<u8, BuildHasherDefault<ConstantHasher>>> =
            Arc::new(weakrefs::WeakSet::default());
        let dying = Strong::new(1u8);
        set.insert(&dying);
        let death = thread::spawn(move || drop(dying));
        // One more member already rebuilds the two-slot shard.
        let staying: Vec<_> = (2u8..3).map(Strong::new).collect();
        for member in &staying {
            assert!(set.insert(member));
        }
        death.join().unwrap();
        flush();
        assert_eq!(set.len(), 1);
        assert!(staying.iter().all(|member| set.contains(member)));
    });
}

/// M13: the keep-warm tier's admission and eviction (an insert of another
/// key into a tier of one) racing the death of the value it holds and a
/// `get` that re-marks that value, its mark stamped by an earlier hit (so
/// the `get` may take the stamp's short way): the tier never holds more
/// than one value, never holds a value whose entry left the map, and lets
/// go of what it evicts (loom's leak tracker fails the model otherwise).
#[test]
fn tier_admission_races_a_death_and_a_remarking_get() {
    loom::model(|| {
        let map = Arc::new(
            weakrefs::WeakValueMap::builder()
                .hasher(BuildHasherDefault::<DefaultHasher>::default())
                .keep_recent(1)
                .build(),
        );
        let first = Strong::new(1u8);
        map.insert(0u8, &first);
        // A hit before the race stamps the mark: the reader's may take the
        // stamp's short way, or find it stale once the admission's pass
        // has come.
        assert_eq!(map.get(&0).map(|v| *v), Some(1));
        let reader = {
            let map = map.clone();
            thread::spawn(move || map.get(&0).map(|v| *v))
        };
        let writer = {
            let map = map.clone();
            thread::spawn(move || {
                let second = Strong::new(2u8);
                map.insert(1u8, &second);
                Strong::downgrade(&second)
            })
        };
        let first_weak = Strong::downgrade(&first);
        drop(first);
        let seen = reader.join().unwrap();
        assert!(seen.is_none() || seen == Some(1));
        let second_weak = writer.join().unwrap();
        flush();
        let alive = usize::from(first_weak.is_alive()) + usize::from(second_weak.is_alive());
        assert_eq!(alive, 1, "the tier holds exactly one value");
        assert_eq!(map.len(), 1, "the dead value's entry is gone");
        map.clear();
        assert!(!first_weak.is_alive() && !second_weak.is_alive());
    });
}

/// M2 across groups. Keys 0 and 1 fill group 0 (GROUP = 2 under
/// loom, every small id's home group is 0), so the replacement of key 0
/// goes to group 1: a reader that sees key 0's tombstone in group 0's word
/// must see the replacement in group 1's, which only the tombstone's
/// Release flip (and the fill's before it) orders. (In
/// `a_read_racing_a_replacement_finds_old_or_new` the replacement shares
/// the old item's word, where coherence alone would do: a Relaxed
/// tombstone passes that model and fails this one.)
#[test]
fn a_replacement_in_a_later_group_is_found() {
    loom::model(|| {
        let map: Arc<weakrefs::WeakValueMap<u8, u8, BuildHasherDefault<IdHasher>>> = Arc::new(
            weakrefs::WeakValueMap::with_capacity_and_hasher(8, Default::default()),
        );
        let (old, other, new) = (Strong::new(1u8), Strong::new(9u8), Strong::new(2u8));
        map.insert(0u8, &old);
        map.insert(1u8, &other);
        let reader = {
            let map = map.clone();
            thread::spawn(move || map.get(&0).map(|v| *v))
        };
        map.insert(0u8, &new);
        let seen = reader.join().unwrap();
        assert!(seen == Some(1) || seen == Some(2), "saw {seen:?}");
        drop((old, other, new));
    });
}
