//! Loom models of the handle protocol (SAFETY.md, I1–I6, O2–O5).
//!
//! The value in every model is a [`Payload`] whose destructor *writes* a
//! loom `UnsafeCell` that live handles *read*. Loom reports any read that is
//! not ordered before the destructor's write, so a missing Release/Acquire
//! pair on the strong count, or an upgrade that revives a dead object, fails
//! the model. Loom's leak tracker (a `Track` in every control block under
//! loom) fails a model that never frees a block; the drop counter fails one
//! that drops a value twice or never.

#![cfg(weakrefs_loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use weakrefs::Strong;

struct Payload {
    data: UnsafeCell<u64>,
    drops: Arc<AtomicUsize>,
}

impl Payload {
    fn new(drops: &Arc<AtomicUsize>) -> Self {
        Payload {
            data: UnsafeCell::new(7),
            drops: drops.clone(),
        }
    }

    /// A read of the value, as any user of a live handle makes.
    fn read(&self) -> u64 {
        // SAFETY: shared reads only; loom checks them against the write in
        // `drop` and in `get_mut` users.
        self.data.with(|p| unsafe { *p })
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        // SAFETY: `drop` has the value to itself, if the handles are right;
        // loom reports a concurrent read otherwise.
        self.data.with_mut(|p| unsafe { *p = 0 });
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// Model 1: `upgrade` racing the last `Strong` drop. An upgrade either fails
/// or yields a handle whose value is intact; the value is dropped exactly
/// once, after every read.
#[test]
fn upgrade_races_last_strong_drop() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let strong = Strong::new(Payload::new(&drops));
        let weak = Strong::downgrade(&strong);
        let upgrader = thread::spawn(move || {
            if let Some(revived) = weak.upgrade() {
                assert_eq!(revived.read(), 7);
                assert_eq!(revived.drops.load(Ordering::SeqCst), 0);
            }
            // A failed upgrade stays failed.
            weak.upgrade().map(|s| s.read())
        });
        assert_eq!(strong.read(), 7);
        drop(strong);
        let second = upgrader.join().unwrap();
        if let Some(value) = second {
            assert_eq!(value, 7);
        }
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}

/// Model 2: clones, downgrades and drops on two threads at once; the value
/// is dropped once and the block freed once (loom's leak check).
#[test]
fn concurrent_clone_downgrade_drop_free_once() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let strong = Strong::new(Payload::new(&drops));
        let theirs = strong.clone();
        let worker = thread::spawn(move || {
            let weak = Strong::downgrade(&theirs);
            let extra = theirs.clone();
            drop(theirs);
            assert_eq!(extra.read(), 7);
            drop(extra);
            weak.upgrade().map(|s| s.read())
        });
        let weak = Strong::downgrade(&strong);
        assert_eq!(strong.read(), 7);
        drop(strong);
        let seen = worker.join().unwrap();
        assert!(seen.is_none() || seen == Some(7));
        assert!(weak.upgrade().is_none());
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}

/// Model 3: the last `Weak` drop racing the last `Strong` drop. Whichever
/// comes last frees the block; neither touches it afterwards.
#[test]
fn last_weak_drop_races_last_strong_drop() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let strong = Strong::new(Payload::new(&drops));
        let weak = Strong::downgrade(&strong);
        let worker = thread::spawn(move || {
            let alive = weak.is_alive();
            drop(weak);
            alive
        });
        drop(strong);
        worker.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}

/// Model 4: `get_mut` racing a `downgrade` + drop of a second strong handle
/// and an upgrade through the new `Weak` (the case the weak-count lock,
/// I6, exists for). A `&mut` never coexists with another handle's read.
#[test]
fn get_mut_races_downgrade_of_another_strong() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut mine = Strong::new(Payload::new(&drops));
        let theirs = mine.clone();
        let worker = thread::spawn(move || {
            let weak = Strong::downgrade(&theirs);
            drop(theirs);
            weak.upgrade().map(|s| s.read())
        });
        if let Some(payload) = Strong::get_mut(&mut mine) {
            // SAFETY: `get_mut` promised exclusivity; loom checks it.
            payload.data.with_mut(|p| unsafe { *p = 8 });
        }
        let seen = worker.join().unwrap();
        assert!(matches!(seen, Some(7) | Some(8)));
        drop(mine);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}
