//! Loom models of the death-callback state machine through the public API
//! (SAFETY.md, C1, C6). Under loom the global runtime has no worker thread:
//! `flush` drains the queue on the calling thread.

#![cfg(weakrefs_loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use weakrefs::{finalize, flush, Finalizer, Strong};

fn counting(runs: &Arc<AtomicUsize>) -> impl FnOnce() + Send + 'static {
    let runs = runs.clone();
    move || {
        runs.fetch_add(1, Ordering::SeqCst);
    }
}

/// Races `op` on a `Finalizer` against its object's death; returns how
/// many times the callback ran and what `op` returned.
fn race_with_death(op: fn(&Finalizer) -> bool) -> (usize, bool) {
    let runs = Arc::new(AtomicUsize::new(0));
    let obj = Strong::new(1u8);
    let finalizer = finalize(&obj, counting(&runs));
    let racer = {
        let finalizer = finalizer.clone();
        thread::spawn(move || op(&finalizer))
    };
    drop(obj);
    let won = racer.join().unwrap();
    flush();
    assert!(!finalizer.alive());
    (runs.load(Ordering::SeqCst), won)
}

/// `detach` racing the object's death: exactly one of "detached" and "ran
/// at death" happens.
#[test]
fn detach_races_death() {
    loom::model(|| {
        let (runs, detached) = race_with_death(Finalizer::detach);
        assert_eq!(runs + usize::from(detached), 1);
    });
}

/// `call` racing the object's death: the callback runs exactly once,
/// on whichever side wins.
#[test]
fn call_races_death() {
    loom::model(|| {
        let (runs, _) = race_with_death(Finalizer::call);
        assert_eq!(runs, 1);
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
