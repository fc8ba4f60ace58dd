//! Death callbacks on objects reached through the Arc-parity API (issue
//! #16): `finalize` on a `Strong<dyn Trait>`, `WeakMethod` over an unsized
//! receiver, and `make_mut`'s move, which ends the object its `Weak`s name.
//! The global finalizer thread is left parked at exit, so Miri runs this
//! file in run 2 (`.ci/miri`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use weakrefs::{finalize, flush, unsize, Strong, WeakMethod};

trait Listener: Send + Sync {
    fn id(&self) -> usize;
}

struct Printer(usize);

impl Listener for Printer {
    fn id(&self) -> usize {
        self.0
    }
}

fn counting_callback(runs: &Arc<AtomicUsize>) -> impl FnOnce() + Send + 'static {
    let runs = runs.clone();
    move || {
        runs.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn finalize_runs_when_a_dyn_object_dies() {
    let runs = Arc::new(AtomicUsize::new(0));
    let listener: Strong<dyn Listener> = unsize!(Strong::new(Printer(1)));
    let finalizer = finalize(&listener, counting_callback(&runs));
    let text: Strong<str> = Strong::from("template");
    finalize(&text, counting_callback(&runs));
    drop(listener);
    drop(text);
    flush();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert!(!finalizer.alive());
}

#[test]
fn weak_method_binds_an_unsized_receiver() {
    let listener: Strong<dyn Listener> = unsize!(Strong::new(Printer(4)));
    let id = WeakMethod::new(&listener, |l: &(dyn Listener + 'static), ()| l.id());
    assert_eq!(id.call(()), Some(4));
    drop(listener);
    assert_eq!(id.call(()), None);
}

#[test]
fn make_mut_moving_away_from_weaks_runs_the_old_objects_callbacks() {
    let runs = Arc::new(AtomicUsize::new(0));
    let mut value = Strong::new(vec![1]);
    let finalizer = finalize(&value, counting_callback(&runs));
    let weak = Strong::downgrade(&value);
    Strong::make_mut(&mut value).push(2);
    flush();
    // The object the Weak named is dead: its callback ran, although the
    // value lives on in a new object, which has no callbacks.
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(!finalizer.alive());
    assert!(weak.upgrade().is_none());
    drop(value);
    flush();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn make_mut_in_place_keeps_the_objects_callbacks() {
    let runs = Arc::new(AtomicUsize::new(0));
    let mut value = Strong::new(vec![1]);
    let finalizer = finalize(&value, counting_callback(&runs));
    Strong::make_mut(&mut value).push(2);
    flush();
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert!(finalizer.alive());
    drop(value);
    flush();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
