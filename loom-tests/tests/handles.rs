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

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use loom_tests::Payload;
use weakrefs::Strong;

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
                assert_eq!(revived.drops(), 0);
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
/// The worker's `Weak` lives until it returns, so `get_mut` can only
/// succeed after the worker is done: it always reads the original value.
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
            // `get_mut` promised exclusivity; loom checks it.
            payload.write(8);
        }
        let seen = worker.join().unwrap();
        assert_eq!(seen, Some(7));
        drop(mine);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}

/// Model 5 (O4′): another `Strong` reads the value and is dropped, with no
/// `Weak` ever created, while `get_mut` writes. Fails if `is_unique`'s
/// strong load is Relaxed.
#[test]
fn get_mut_races_read_and_drop_of_another_strong() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut mine = Strong::new(Payload::new(&drops));
        let theirs = mine.clone();
        let worker = thread::spawn(move || {
            let value = theirs.read();
            drop(theirs);
            value
        });
        if let Some(payload) = Strong::get_mut(&mut mine) {
            // `get_mut` promised exclusivity; loom checks it.
            payload.write(8);
        }
        assert_eq!(worker.join().unwrap(), 7);
    });
}

/// Model 6 (O2′): `try_unwrap` racing another `Strong` that reads, drops,
/// and then tries to upgrade. Fails without the fence after
/// `try_unwrap`'s CAS.
#[test]
fn try_unwrap_races_read_and_drop_of_another_strong() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let mine = Strong::new(Payload::new(&drops));
        let theirs = mine.clone();
        let weak = Strong::downgrade(&mine);
        let worker = thread::spawn(move || {
            let value = theirs.read();
            drop(theirs);
            (value, weak.upgrade().map(|s| s.read()))
        });
        match Strong::try_unwrap(mine) {
            Ok(payload) => drop(payload),
            Err(still_shared) => drop(still_shared),
        }
        let (value, after) = worker.join().unwrap();
        assert_eq!(value, 7);
        assert!(after.is_none() || after == Some(7));
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}

/// Model 7 (O3): a write through `get_mut`, then a `Weak` sent to another
/// thread that upgrades (Relaxed CAS) and reads. The write is ordered by
/// the thread spawn that carries the `Weak`, not by the upgrade.
#[test]
fn upgrade_sees_writes_made_through_get_mut() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut mine = Strong::new(Payload::new(&drops));
        let payload = Strong::get_mut(&mut mine).expect("sole handle");
        // `get_mut` promised exclusivity; loom checks it.
        payload.write(9);
        let weak = Strong::downgrade(&mine);
        let reader = thread::spawn(move || weak.upgrade().map(|s| s.read()));
        drop(mine);
        let seen = reader.join().unwrap();
        assert!(seen.is_none() || seen == Some(9));
    });
}
