//! Loom models of the death-callback state machine through the public API
//! (SAFETY.md, C1, C6). Under loom the global runtime has no worker thread:
//! `flush` drains the queue on the calling thread.

#![cfg(weakrefs_loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use weakrefs::{finalize, flush, Strong};

fn counting(runs: &Arc<AtomicUsize>) -> impl FnOnce() + Send + 'static {
    let runs = runs.clone();
    move || {
        runs.fetch_add(1, Ordering::SeqCst);
    }
}

/// `detach` racing the object's death: exactly one of "detached" and "ran
/// at death" happens.
#[test]
fn detach_races_death() {
    loom::model(|| {
        let runs = Arc::new(AtomicUsize::new(0));
        let obj = Strong::new(1u8);
        let finalizer = finalize(&obj, counting(&runs));
        let racer = {
            let finalizer = finalizer.clone();
            thread::spawn(move || finalizer.detach())
        };
        drop(obj);
        let detached = racer.join().unwrap();
        flush();
        assert_eq!(runs.load(Ordering::SeqCst) + usize::from(detached), 1);
        assert!(!finalizer.alive());
    });
}

/// `call` racing the object's death: the callback runs exactly once,
/// on whichever side wins.
#[test]
fn call_races_death() {
    loom::model(|| {
        let runs = Arc::new(AtomicUsize::new(0));
        let obj = Strong::new(1u8);
        let finalizer = finalize(&obj, counting(&runs));
        let racer = {
            let finalizer = finalizer.clone();
            thread::spawn(move || finalizer.call())
        };
        drop(obj);
        racer.join().unwrap();
        flush();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

/// Registration on one thread racing the last drop of another strong
/// handle (registration holds its own `Strong`, so the death waits for
/// it): every registered callback runs exactly once, after both.
#[test]
fn registration_races_last_drop_elsewhere() {
    loom::model(|| {
        let runs = Arc::new(AtomicUsize::new(0));
        let obj = Strong::new(1u8);
        let theirs = obj.clone();
        let registrar = {
            let runs = runs.clone();
            thread::spawn(move || {
                let finalizer = finalize(&theirs, counting(&runs));
                drop(theirs);
                finalizer
            })
        };
        let mine = finalize(&obj, counting(&runs));
        drop(obj);
        let theirs = registrar.join().unwrap();
        flush();
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert!(!mine.alive() && !theirs.alive());
    });
}
