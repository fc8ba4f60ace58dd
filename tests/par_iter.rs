//! The `rayon` feature: `par_iter()` on the three collections yields the
//! live entries, as sequential iteration does, and stays weakly consistent
//! while other threads change the collection.

#![cfg(feature = "rayon")]

use std::collections::HashSet;
use std::sync::Barrier;
use std::thread;

use rayon::prelude::*;
use weakrefs::{flush, Strong, WeakKeyMap, WeakSet, WeakValueMap};

#[test]
fn par_iter_yields_the_live_entries_of_each_collection() {
    let objects: Vec<_> = (0..1000u64).map(Strong::new).collect();
    let values = WeakValueMap::new();
    let keys = WeakKeyMap::new();
    let set = WeakSet::new();
    for object in &objects {
        values.insert(**object, object);
        keys.insert(object, **object + 1);
        set.insert(object);
    }
    let mut objects = objects;
    objects.truncate(600); // 600..1000 die
    flush();

    let seen: HashSet<u64> = values
        .par_iter()
        .map(|(key, value)| {
            assert_eq!(key, *value);
            key
        })
        .collect();
    assert_eq!(seen, (0..600).collect());
    let seen: HashSet<u64> = keys
        .par_iter()
        .map(|(key, value)| {
            assert_eq!(value, *key + 1);
            *key
        })
        .collect();
    assert_eq!(seen, (0..600).collect());
    let seen: HashSet<u64> = set.par_iter().map(|member| *member).collect();
    assert_eq!(seen, (0..600).collect());
    assert_eq!(set.par_iter().count(), set.iter().count());
}

#[test]
fn par_iter_while_other_threads_insert_and_drop() {
    let values = WeakValueMap::new();
    let set = WeakSet::new();
    let stable: Vec<_> = (0..200u64).map(Strong::new).collect();
    for object in &stable {
        values.insert(**object, object);
        set.insert(object);
    }
    let start = Barrier::new(2);
    thread::scope(|scope| {
        scope.spawn(|| {
            start.wait();
            for round in 0..2000u64 {
                let churn = Strong::new(1000 + round);
                values.insert(1000 + round % 50, &churn);
                set.insert(&churn);
            }
        });
        start.wait();
        for _ in 0..20 {
            // Every yielded entry is live and consistent; the stable ones
            // are always there.
            let seen: Vec<u64> = values
                .par_iter()
                .map(|(key, value)| {
                    assert!(key == *value || (key >= 1000 && *value >= 1000));
                    key
                })
                .collect();
            assert!(seen.iter().filter(|&&key| key < 200).count() == 200);
            let members = set.par_iter().filter(|member| **member < 200).count();
            assert_eq!(members, 200);
        }
    });
}
