//! The `arc-swap` feature: `ArcSwapAny` slots of `Strong<T>` and `Weak<T>`
//! load, swap and drop every object exactly once, from several threads
//! (Miri runs this file too).

#![cfg(feature = "arc-swap")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use arc_swap::ArcSwapAny;
use weakrefs::{Strong, Weak};

const ROUNDS: usize = if cfg!(miri) { 20 } else { 2000 };

struct Counted(Arc<AtomicUsize>, usize);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_strong_slot_swapped_and_loaded_from_threads_drops_each_object_once() {
    let drops = Arc::new(AtomicUsize::new(0));
    let slot: ArcSwapAny<Strong<Counted>> = ArcSwapAny::new(Strong::new(Counted(drops.clone(), 0)));
    thread::scope(|scope| {
        scope.spawn(|| {
            for round in 1..=ROUNDS {
                let old = slot.swap(Strong::new(Counted(drops.clone(), round)));
                assert!(old.1 < round);
            }
        });
        scope.spawn(|| {
            let mut last = 0;
            for _ in 0..ROUNDS {
                let current = slot.load();
                assert!(current.1 >= last, "versions only move forward");
                last = current.1;
                let kept: Strong<Counted> = slot.load_full();
                assert!(kept.1 >= last);
            }
        });
    });
    assert_eq!(slot.load().1, ROUNDS);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        ROUNDS,
        "every replaced object dropped once"
    );
    drop(slot);
    assert_eq!(drops.load(Ordering::SeqCst), ROUNDS + 1);
}

#[test]
fn a_weak_slot_follows_its_objects_lives() {
    let slot: ArcSwapAny<Weak<String>> = ArcSwapAny::new(Weak::new());
    assert!(slot.load().upgrade().is_none());
    let config = Strong::new(String::from("v1"));
    slot.store(Strong::downgrade(&config));
    assert_eq!(
        slot.load().upgrade().as_deref().map(String::as_str),
        Some("v1")
    );
    assert_eq!(Strong::weak_count(&config), 1);
    drop(config);
    assert!(
        slot.load().upgrade().is_none(),
        "a dead object does not come back"
    );
    let previous = slot.swap(Weak::new());
    assert!(previous.upgrade().is_none());
    let fresh = Strong::new(String::from("v2"));
    slot.store(Strong::downgrade(&fresh));
    let loaded = slot.load_full();
    assert!(loaded.ptr_eq(&Strong::downgrade(&fresh)));
}

/// A `Strong` slot and a `Weak` slot naming one object share its address
/// but not its counts: a writer of one must never settle a reader's debt
/// on the other with the wrong count (the counts stayed wrong, and the heap
/// was corrupted, before `Weak` got its own debt tag).
#[test]
fn strong_and_weak_slots_on_one_object_keep_their_counts_apart() {
    let object = Strong::new(7u64);
    let strong_slot: ArcSwapAny<Strong<u64>> = ArcSwapAny::new(object.clone());
    let weak_slot: ArcSwapAny<Weak<u64>> = ArcSwapAny::new(Strong::downgrade(&object));
    // A reader of the weak slot holds a debt on the object's address while
    // the strong slot's writer swaps it out, and the other way round.
    let weak_guard = weak_slot.load();
    drop(strong_slot.swap(Strong::new(8)));
    drop(weak_guard);
    let strong_guard = strong_slot.load();
    drop(weak_slot.swap(Weak::new()));
    drop(strong_guard);
    assert_eq!(Strong::strong_count(&object), 1, "only `object` holds it");
    assert_eq!(Strong::weak_count(&object), 0);
    assert_eq!(*strong_slot.load_full(), 8);
}

/// `Weak::new()` in a slot, for a one-byte-aligned type: no address, no
/// count, and a later object swaps in.
#[test]
fn an_empty_weak_slot_of_a_byte_type_works() {
    let slot: ArcSwapAny<Weak<u8>> = ArcSwapAny::new(Weak::new());
    assert!(slot.load().upgrade().is_none());
    let byte = Strong::new(1u8);
    let old = slot.swap(Strong::downgrade(&byte));
    assert!(old.upgrade().is_none());
    assert_eq!(slot.load().upgrade().as_deref(), Some(&1));
}
