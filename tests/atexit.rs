//! `shutdown()`: a test binary of its own, since shutdown is process-wide.
//! A port of CPython's `test_atexit`, plus what happens after shutdown.

use std::sync::{Arc, Mutex};
use std::thread;

use weakrefs::{finalize, flush, shutdown, stats, Strong};

#[test]
fn shutdown_runs_atexit_finalizers_newest_first_then_deaths_run_inline() {
    let log: Arc<Mutex<Vec<&'static str>>> = Arc::new(Mutex::new(Vec::new()));
    let push = |tag: &'static str| {
        let log = log.clone();
        move || log.lock().unwrap().push(tag)
    };
    let a = Strong::new("a");
    let b = Strong::new("b");
    let a1 = finalize(&a, push("a1"));
    let b1 = finalize(&b, push("b1"));
    let a2 = finalize(&a, push("a2"));
    let skipped = finalize(&b, push("skipped"));
    skipped.set_atexit(false);
    let detached = finalize(&a, push("detached"));
    assert!(detached.detach());
    // A death before shutdown goes through the queue, which shutdown drains.
    let c = Strong::new("c");
    finalize(&c, push("c"));
    drop(c);

    shutdown();
    assert_eq!(*log.lock().unwrap(), ["c", "a2", "b1", "a1"]);
    assert!(!a1.alive() && !a2.alive() && !b1.alive());
    assert!(skipped.alive(), "atexit unset: shutdown skips it");

    shutdown(); // idempotent
    assert_eq!(log.lock().unwrap().len(), 4);

    // Afterwards callbacks run inline, in the dropping thread, at the drop.
    let dropper = Arc::new(Mutex::new(None));
    let seen = dropper.clone();
    let late_log = log.clone();
    finalize(&b, move || {
        *seen.lock().unwrap() = Some(thread::current().id());
        late_log.lock().unwrap().push("late");
    });
    drop(a); // every callback of `a` already ran or was detached
    assert_eq!(log.lock().unwrap().len(), 4);
    drop(b);
    assert_eq!(
        *log.lock().unwrap(),
        ["c", "a2", "b1", "a1", "late", "skipped"]
    );
    assert_eq!(*dropper.lock().unwrap(), Some(thread::current().id()));
    assert!(!skipped.alive());

    // A death on another thread after shutdown runs there.
    let d = Strong::new("d");
    let ran_on = Arc::new(Mutex::new(None));
    let slot = ran_on.clone();
    finalize(&d, move || {
        *slot.lock().unwrap() = Some(thread::current().id())
    });
    let other = thread::spawn(move || {
        drop(d);
        thread::current().id()
    })
    .join()
    .unwrap();
    assert_eq!(*ran_on.lock().unwrap(), Some(other));

    flush(); // nothing queued; returns at once
    assert_eq!(stats().pending, 0);
}
