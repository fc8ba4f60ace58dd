//! Loom models of the handle protocol on unsized values (SAFETY.md, U1–U4
//! with I1–I3): a `Strong<dyn Trait>` made by `unsize!`, whose value is
//! over-aligned (so its offset comes from the vtable) and whose block the
//! last weak reference frees with the layout kept where the value was. As in
//! `handles.rs`, the destructor writes a loom `UnsafeCell` that live
//! handles read, loom's `Track` in every block fails a model that leaks
//! one, and a drop counter fails one that drops twice or never.

#![cfg(weakrefs_loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use loom_tests::Payload;
use weakrefs::{Strong, Weak};

trait Reader: Send + Sync {
    fn read(&self) -> u64;
}

impl Reader for Payload {
    fn read(&self) -> u64 {
        Payload::read(self)
    }
}

fn dyn_payload(drops: &Arc<AtomicUsize>) -> Strong<dyn Reader> {
    weakrefs::unsize!(Strong::new(Payload::new(drops)))
}

/// Model U-1: `upgrade` of a `Weak<dyn Reader>` racing the last
/// `Strong<dyn Reader>` drop. The upgrade fails or sees the value intact;
/// the value is dropped once, through the vtable, after every read.
#[test]
fn unsized_upgrade_races_last_strong_drop() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let strong = dyn_payload(&drops);
        let weak: Weak<dyn Reader> = Strong::downgrade(&strong);
        let upgrader = thread::spawn(move || {
            let seen = weak.upgrade().map(|revived| revived.read());
            assert!(seen.is_none() || seen == Some(7));
            // A failed upgrade stays failed.
            if seen.is_none() {
                assert!(weak.upgrade().is_none());
            }
        });
        assert_eq!(strong.read(), 7);
        drop(strong);
        upgrader.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}

/// Model U-2: the last `Weak<dyn Reader>` drop racing the last
/// `Strong<dyn Reader>` drop. Whichever comes last frees the block, with
/// the layout word left where the value was; loom's leak
/// check fails the model if neither does, and a double free is a loom error.
#[test]
fn unsized_last_weak_drop_races_last_strong_drop() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let strong = dyn_payload(&drops);
        let weak = Strong::downgrade(&strong);
        let worker = thread::spawn(move || {
            let seen = weak.upgrade().map(|revived| revived.read());
            drop(weak);
            seen
        });
        drop(strong);
        let seen = worker.join().unwrap();
        assert!(seen.is_none() || seen == Some(7));
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}

/// Model U-3: a `Weak` that escapes `new_cyclic`'s closure to another
/// thread upgrades racing the end of construction. It fails, or it sees
/// the value the closure wrote (the Acquire upgrade, O3, pairing with the
/// Release that publishes the first strong handle, O11).
#[test]
fn new_cyclic_weak_upgrades_racing_construction() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut upgrader = None;
        let strong = Strong::new_cyclic(|me: &Weak<Payload>| {
            let weak = me.clone();
            upgrader = Some(thread::spawn(move || weak.upgrade().map(|s| s.read())));
            let mut payload = Payload::new(&drops);
            // Nothing else can reach the value before it is published;
            // loom checks the upgrader's read against this.
            payload.write(9);
            payload
        });
        let seen = upgrader.unwrap().join().unwrap();
        assert!(seen.is_none() || seen == Some(9));
        assert_eq!(strong.read(), 9);
        drop(strong);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}
