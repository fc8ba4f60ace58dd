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
