//! Loom models of `Strong::make_mut` and `Strong::into_inner` (SAFETY.md,
//! I1, I2, O2′, O12): the paths that take the strong count to 0 and either
//! put it back (`make_mut` in place), move the value to a new block
//! (`make_mut` with `Weak`s about) or move it out (`into_inner`), racing
//! the other handles of the object. Each payload writes to a loom cell, so
//! an access that is not ordered after the others fails the model; loom's
//! leak tracker fails it if a block or value is never freed.

#![cfg(weakrefs_loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use loom_tests::Payload;
use weakrefs::{Strong, Weak};

/// `make_mut` on one `Strong` while another thread downgrades its own
/// `Strong`, drops it, clones the `Weak`, drops the original and upgrades
/// the clone: the upgrade sees the old value or none, never the write.
#[test]
fn make_mut_races_a_downgrade_clone_and_upgrade() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut mine = Strong::new(Payload::new(&drops));
        let theirs = mine.clone();
        let other = thread::spawn(move || {
            let weak = Strong::downgrade(&theirs);
            drop(theirs);
            let clone = weak.clone();
            drop(weak);
            clone.upgrade().map(|s| s.read())
        });
        Strong::make_mut(&mut mine).write(9);
        let seen = other.join().unwrap();
        assert!(seen.is_none() || seen == Some(7) || seen == Some(9));
        assert_eq!(mine.read(), 9);
    });
}

/// `make_mut` racing a `Weak`'s upgrade, read and drop in another thread.
#[test]
fn make_mut_races_a_weak_upgrade() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut mine = Strong::new(Payload::new(&drops));
        let weak: Weak<Payload> = Strong::downgrade(&mine);
        let other = thread::spawn(move || {
            let seen = weak.upgrade().map(|s| s.read());
            drop(weak);
            seen
        });
        Strong::make_mut(&mut mine).write(9);
        let seen = other.join().unwrap();
        assert!(seen.is_none() || seen == Some(7));
        assert_eq!(mine.read(), 9);
        drop(mine);
        let dropped = drops.load(Ordering::SeqCst);
        assert!(dropped == 1 || dropped == 2, "{dropped} drops");
    });
}

/// `into_inner` on two threads while a third upgrades: at most one caller
/// gets the value (as with `Arc`, neither does if the upgrade held the
/// last `Strong`), and the value is dropped once.
#[test]
fn into_inner_on_two_threads_races_an_upgrade() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let mine = Strong::new(Payload::new(&drops));
        let theirs = mine.clone();
        let weak = Strong::downgrade(&mine);
        let other = thread::spawn(move || {
            Strong::into_inner(theirs).map(|mut p| {
                p.write(1);
                1u8
            })
        });
        let upgrader = thread::spawn(move || weak.upgrade().map(|s| s.read()));
        let got = Strong::into_inner(mine).map(|mut p| {
            p.write(2);
            2u8
        });
        let they_got = other.join().unwrap();
        let seen = upgrader.join().unwrap();
        assert!(
            !(got.is_some() && they_got.is_some()),
            "the value went twice"
        );
        if got.is_none() && they_got.is_none() {
            assert_eq!(seen, Some(7), "only the upgrade can have held the last one");
        }
        assert!(seen.is_none() || seen == Some(7));
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}
