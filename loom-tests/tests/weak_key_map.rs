//! Loom models of `WeakKeyMap`'s counted reads (SAFETY.md, section 8).
//! Under loom the global callback runtime has no thread: `flush` runs the
//! removal callbacks and posted drops on the calling thread. Values carry
//! loom's leak tracker, so a model fails if one is never dropped, and
//! loom's `UnsafeCell` checks that no borrow of a value races its move.

#![cfg(weakrefs_loom)]

use std::hash::BuildHasherDefault;

use loom::alloc::Track;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use weakrefs::{flush, Strong};

/// Key addresses differ between executions, and loom needs every execution
/// to take the same path: all keys hash alike.
#[derive(Default)]
struct ConstantHasher;

impl std::hash::Hasher for ConstantHasher {
    fn finish(&self) -> u64 {
        0x5eed
    }
    fn write(&mut self, _: &[u8]) {}
}

type WeakKeyMap<K, V> = weakrefs::WeakKeyMap<K, V, BuildHasherDefault<ConstantHasher>>;

/// A value that counts its drops (and is leak-tracked).
struct Counted {
    value: Track<u8>,
    drops: Arc<AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// K1, K2: `remove` racing a counted read hands the value back only after
/// the read has ended (loom's cell tracking fails the model otherwise), and
/// neither waits forever.
#[test]
fn remove_waits_for_a_counted_read() {
    loom::model(|| {
        let map = Arc::new(WeakKeyMap::default());
        let key = Strong::new(0u8);
        map.insert(&key, Track::new(7u8));
        let reader = {
            let (map, key) = (map.clone(), key.clone());
            thread::spawn(move || map.with(&key, |value| *value.get_ref()))
        };
        let removed = map.remove(&key).map(Track::into_inner);
        let seen = reader.join().unwrap();
        assert_eq!(removed, Some(7));
        assert!(seen.is_none() || seen == Some(7));
        assert!(map.is_empty());
    });
}

/// K3: a read racing the replacement of the value under its key finds the
/// old value or the new one, never neither; the old one comes back to the
/// replacing writer.
#[test]
fn a_read_racing_a_replacement_finds_old_or_new() {
    loom::model(|| {
        let map = Arc::new(WeakKeyMap::default());
        let key = Strong::new(0u8);
        map.insert(&key, Track::new(1u8));
        let reader = {
            let (map, key) = (map.clone(), key.clone());
            thread::spawn(move || map.with(&key, |value| *value.get_ref()))
        };
        let old = map.insert(&key, Track::new(2u8)).map(Track::into_inner);
        let seen = reader.join().unwrap();
        assert_eq!(old, Some(1));
        assert!(seen == Some(1) || seen == Some(2), "{seen:?}");
        assert_eq!(map.with(&key, |value| *value.get_ref()), Some(2));
    });
}

/// K5: `clear` racing a counted read of the value it removes: the value is
/// dropped exactly once (by `clear`, or by the reader leaving last), never
/// while borrowed (loom's cell tracking), and before `flush` returns.
#[test]
fn clear_racing_a_counted_read_disposes_of_the_value_once() {
    loom::model(|| {
        let map = Arc::new(WeakKeyMap::default());
        let key = Strong::new(0u8);
        let drops = Arc::new(AtomicUsize::new(0));
        map.insert(
            &key,
            Counted {
                value: Track::new(9u8),
                drops: drops.clone(),
            },
        );
        let reader = {
            let (map, key) = (map.clone(), key.clone());
            thread::spawn(move || map.with(&key, |counted| *counted.value.get_ref()))
        };
        map.clear();
        let seen = reader.join().unwrap();
        assert!(seen.is_none() || seen == Some(9));
        assert!(map.is_empty());
        flush();
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "disposed of by the next flush"
        );
    });
}

/// K5 with a death: a key dying while `retain` looks at its entry. A reader
/// that borrows the value holds the key alive (`retain` upgrades it first),
/// so the death's disposal follows the read; the value goes exactly once.
#[test]
fn a_key_death_racing_retain_disposes_of_the_value_once() {
    loom::model(|| {
        let map = Arc::new(WeakKeyMap::default());
        let key = Strong::new(0u8);
        map.insert(&key, Track::new(9u8));
        let reader = {
            let map = map.clone();
            thread::spawn(move || map.retain(|_, value| *value.get_ref() == 9))
        };
        drop(key);
        flush();
        reader.join().unwrap();
        flush();
        assert!(map.is_empty());
    });
}

/// K2 against K5: `remove` and `clear` race for one entry; the value is
/// handed back or disposed of, exactly once.
#[test]
fn remove_races_clear_and_the_value_goes_once() {
    loom::model(|| {
        let map = Arc::new(WeakKeyMap::default());
        let key = Strong::new(0u8);
        map.insert(&key, Track::new(3u8));
        let clearer = {
            let map = map.clone();
            thread::spawn(move || map.clear())
        };
        let removed = map.remove(&key).map(Track::into_inner);
        clearer.join().unwrap();
        assert!(removed.is_none() || removed == Some(3));
        assert!(map.is_empty());
        flush();
    });
}

/// K6: racing `get_or_insert_with` callers run `init` once and get the
/// same value.
#[test]
fn single_flight_racing_callers_share_one_value() {
    loom::model(|| {
        let map = Arc::new(WeakKeyMap::default());
        let key = Strong::new(0u8);
        let other = {
            let (map, key) = (map.clone(), key.clone());
            thread::spawn(move || map.get_or_insert_with(&key, || Strong::new(1u8)))
        };
        let ours = map.get_or_insert_with(&key, || Strong::new(2u8));
        let theirs = other.join().unwrap();
        assert!(Strong::ptr_eq(&ours, &theirs));
    });
}

/// M4 and K5 for keys: a key's death racing an insert and a remove of
/// that key by its two last holders. Whatever the order, the entry goes
/// (by the remove or by the death), and each value exactly once.
#[test]
fn a_key_death_races_insert_and_remove_of_that_key() {
    loom::model(|| {
        let map = Arc::new(WeakKeyMap::default());
        let key = Strong::new(0u8);
        let drops = Arc::new(AtomicUsize::new(0));
        let counted = |value| Counted {
            value: Track::new(value),
            drops: drops.clone(),
        };
        map.insert(&key, counted(1));
        let remover = {
            let (map, key) = (map.clone(), key.clone());
            thread::spawn(move || {
                let removed = map.remove(&key).map(|c| *c.value.get_ref());
                drop(key); // perhaps the last holder: the death runs here
                flush();
                removed
            })
        };
        drop(map.insert(&key, counted(2)));
        drop(key);
        flush();
        let removed = remover.join().unwrap();
        assert!(matches!(removed, Some(1) | Some(2)), "{removed:?}");
        flush();
        assert!(map.is_empty());
        assert_eq!(drops.load(Ordering::SeqCst), 2, "each value dropped once");
    });
}
