//! Loom models of `WeakKeyMap`'s values in place (SAFETY.md, section 8):
//! readers borrow a value under their pin, writers never wait, and a
//! removed value is dropped once no reader can see it. Under loom the
//! global callback runtime has no thread: `flush` runs the removal
//! callbacks and posted drops on the calling thread. Values carry loom's
//! leak tracker, so a model fails if one is never dropped (the epoch
//! garbage left at the end of an execution is collected then).

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

/// K1: `remove` racing a read of the value: the reader finds the value or
/// nothing, and a value it found is not dropped while it borrows it
/// (`remove` does not wait for it).
#[test]
fn a_removal_racing_with_never_drops_a_borrowed_value() {
    loom::model(|| {
        let map = Arc::new(WeakKeyMap::default());
        let key = Strong::new(0u8);
        let drops = Arc::new(AtomicUsize::new(0));
        map.insert(
            &key,
            Counted {
                value: Track::new(7u8),
                drops: drops.clone(),
            },
        );
        let reader = {
            let (map, key, drops) = (map.clone(), key.clone(), drops.clone());
            thread::spawn(move || {
                map.with(&key, |counted| {
                    let seen = *counted.value.get_ref();
                    assert_eq!(drops.load(Ordering::SeqCst), 0, "dropped while borrowed");
                    seen
                })
            })
        };
        assert!(map.remove(&key));
        let seen = reader.join().unwrap();
        assert!(seen.is_none() || seen == Some(7));
        assert!(map.is_empty());
        flush();
    });
}

/// K1, M2: a read racing the replacement of the value under its key finds
/// the old value or the new one, never neither.
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
        assert!(map.insert(&key, Track::new(2u8)));
        let seen = reader.join().unwrap();
        assert!(seen == Some(1) || seen == Some(2), "{seen:?}");
        assert_eq!(map.with(&key, |value| *value.get_ref()), Some(2));
    });
}

/// K2: `clear` racing a read of the value it removes: the value is never
/// dropped while borrowed, and at most once (loom's leak tracker checks it
/// is dropped at all).
#[test]
fn clear_racing_a_read_drops_the_value_once() {
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
            let (map, key, drops) = (map.clone(), key.clone(), drops.clone());
            thread::spawn(move || {
                map.with(&key, |counted| {
                    assert_eq!(drops.load(Ordering::SeqCst), 0, "dropped while borrowed");
                    *counted.value.get_ref()
                })
            })
        };
        map.clear();
        let seen = reader.join().unwrap();
        assert!(seen.is_none() || seen == Some(9));
        assert!(map.is_empty());
        flush();
        assert!(drops.load(Ordering::SeqCst) <= 1);
    });
}

/// K2 with a death: a key dying while `retain` looks at its entry. The
/// predicate runs on a live key (`retain` upgrades it first), and the
/// entry goes.
#[test]
fn a_key_death_racing_retain_removes_the_entry() {
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

/// `remove` and `clear` race for one entry: exactly one of them removes
/// it, or `clear` does.
#[test]
fn remove_races_clear_and_the_entry_goes_once() {
    loom::model(|| {
        let map = Arc::new(WeakKeyMap::default());
        let key = Strong::new(0u8);
        map.insert(&key, Track::new(3u8));
        let clearer = {
            let map = map.clone();
            thread::spawn(move || map.clear())
        };
        let _removed = map.remove(&key);
        clearer.join().unwrap();
        assert!(map.is_empty());
        assert!(!map.remove(&key));
        flush();
    });
}

/// K3: racing `get_or_insert_with` callers run `init` once and get the
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

/// M4 for keys: a key's death racing an insert and a remove of that key
/// by its two last holders. Whatever the order, the entry goes (by the
/// remove or by the death), and no value is dropped twice or leaked.
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
                let removed = map.remove(&key);
                drop(key); // perhaps the last holder: the death runs here
                flush();
                removed
            })
        };
        map.insert(&key, counted(2));
        drop(key);
        flush();
        let _removed = remover.join().unwrap();
        flush();
        assert!(map.is_empty());
        assert!(drops.load(Ordering::SeqCst) <= 2);
    });
}
