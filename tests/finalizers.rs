//! Death callbacks: `finalize`, `Finalizer`, `flush`, `stats`, `WeakMethod`.
//! Ports of CPython's `test_finalize` and `test_order`, plus the
//! concurrency cases. `shutdown` is process-wide, so it has its own test
//! binary (`tests/atexit.rs`).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use weakrefs::{finalize, flush, stats, Strong, WeakMethod};

#[path = "support/chains.rs"]
mod chains;

/// Runs `body` on a thread and fails the test if it has not finished in
/// `limit`: turns a deadlock into a failure instead of a hung run.
fn finishes_within(limit: Duration, body: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    let worker = thread::spawn(move || {
        body();
        let _ = done.send(());
    });
    match finished.recv_timeout(limit) {
        Ok(()) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: surface its panic.
            worker.join().unwrap();
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("deadlock: not finished in {limit:?}"),
    }
}

/// A generous limit: only a deadlock comes near it.
const DEADLOCK: Duration = Duration::from_secs(120);

#[test]
fn callback_runs_once_after_the_value_is_dropped() {
    struct Value(Arc<AtomicBool>);
    impl Drop for Value {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let value_dropped = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicUsize::new(0));
    let saw_value_dropped = Arc::new(AtomicBool::new(false));
    let obj = Strong::new(Value(value_dropped.clone()));
    let (r, v, s) = (
        runs.clone(),
        value_dropped.clone(),
        saw_value_dropped.clone(),
    );
    let f = finalize(&obj, move || {
        s.store(v.load(Ordering::SeqCst), Ordering::SeqCst);
        r.fetch_add(1, Ordering::SeqCst);
    });
    assert!(f.alive());
    flush();
    assert_eq!(runs.load(Ordering::SeqCst), 0, "ran while the object lived");
    drop(obj);
    assert!(!f.alive(), "claimed at death");
    flush();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        saw_value_dropped.load(Ordering::SeqCst),
        "ran before the value was dropped"
    );
    assert!(!f.detach());
    assert!(!f.call());
    flush();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn callbacks_run_on_the_finalizer_thread() {
    let name = Arc::new(Mutex::new(None));
    let obj = Strong::new(());
    let slot = name.clone();
    finalize(&obj, move || {
        *slot.lock().unwrap() = thread::current().name().map(str::to_owned);
    });
    drop(obj);
    flush();
    assert_eq!(name.lock().unwrap().as_deref(), Some("weakrefs-finalizer"));
}

/// CPython `test_finalize`: detach returns the callback's liveness, call
/// runs it once, and neither runs it again at death.
#[test]
fn finalize_detach_and_call() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let obj = Strong::new(());
    let push = |tag: &'static str| {
        let log = log.clone();
        move || log.lock().unwrap().push(tag)
    };
    let detached = finalize(&obj, push("detached"));
    let called = finalize(&obj, push("called"));
    assert!(detached.detach());
    assert!(!detached.alive());
    assert!(!detached.detach(), "second detach");
    assert!(!detached.call(), "call after detach");
    assert!(called.call());
    assert_eq!(*log.lock().unwrap(), ["called"]);
    assert!(!called.call(), "second call");
    assert!(!called.detach(), "detach after call");
    drop(obj);
    flush();
    assert_eq!(*log.lock().unwrap(), ["called"], "nothing more at death");
}

/// CPython `test_order`: five finalizers on one object, one detached, one
/// called by hand, two whose handles were dropped; at death the rest run
/// newest first.
#[test]
fn death_runs_the_rest_newest_first() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let obj = Strong::new(());
    let register = |n: u32| {
        let log = log.clone();
        finalize(&obj, move || log.lock().unwrap().push(n))
    };
    let f1 = register(1);
    let f2 = register(2);
    let f3 = register(3);
    let f4 = register(4);
    let f5 = register(5);
    assert!(f2.detach());
    assert!(f4.call());
    drop(f1); // dropping a handle does not cancel
    drop(f5);
    assert_eq!(*log.lock().unwrap(), [4]);
    drop(obj);
    flush();
    assert_eq!(*log.lock().unwrap(), [4, 5, 3, 1]);
    assert!(!f3.alive());
}

#[test]
fn try_unwrap_is_a_death_too() {
    let ran = Arc::new(AtomicBool::new(false));
    let obj = Strong::new(String::from("v"));
    let flag = ran.clone();
    finalize(&obj, move || flag.store(true, Ordering::SeqCst));
    let value = Strong::try_unwrap(obj).unwrap();
    flush();
    assert!(ran.load(Ordering::SeqCst));
    assert_eq!(value, "v");
}

#[test]
fn a_panicking_destructor_does_not_lose_callbacks() {
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("destructor failure");
        }
    }
    let ran = Arc::new(AtomicBool::new(false));
    let obj = Strong::new(Bomb);
    let flag = ran.clone();
    finalize(&obj, move || flag.store(true, Ordering::SeqCst));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(obj)));
    assert!(outcome.is_err());
    flush();
    assert!(ran.load(Ordering::SeqCst));
}

/// A callback that panics with a payload whose `Drop` flushes: the payload
/// is dropped on the thread that ran the callback, still inside it, so that
/// `flush` returns at once instead of waiting for the queue the callback
/// keeps busy (the finalizer thread hung for good, and every later
/// callback with it).
#[test]
fn a_panic_payload_that_flushes_as_it_drops_does_not_hang_the_finalizer() {
    struct FlushOnDrop(Arc<AtomicBool>);
    impl Drop for FlushOnDrop {
        fn drop(&mut self) {
            flush();
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let payload_dropped = dropped.clone();
    finishes_within(DEADLOCK, move || {
        let obj = Strong::new(1u32);
        finalize(&obj, move || {
            std::panic::panic_any(FlushOnDrop(payload_dropped));
        });
        drop(obj);
        flush();
    });
    assert!(
        dropped.load(Ordering::SeqCst),
        "the payload was not dropped"
    );
    let ran = Arc::new(AtomicBool::new(false));
    let later = Strong::new(2u32);
    let flag = ran.clone();
    finalize(&later, move || flag.store(true, Ordering::SeqCst));
    drop(later);
    finishes_within(DEADLOCK, flush);
    assert!(ran.load(Ordering::SeqCst), "a later callback did not run");
}

#[test]
fn a_panicking_callback_is_counted_and_the_thread_goes_on() {
    let before = stats();
    let obj = Strong::new(());
    finalize(&obj, || panic!("callback failure (expected by this test)"));
    let after_ran = Arc::new(AtomicBool::new(false));
    let flag = after_ran.clone();
    let later = Strong::new(());
    finalize(&later, move || flag.store(true, Ordering::SeqCst));
    drop(obj);
    flush();
    drop(later);
    flush();
    let after = stats();
    assert!(after.panicked > before.panicked);
    assert!(after.run >= before.run + 2);
    assert!(
        after_ran.load(Ordering::SeqCst),
        "the thread stopped after a panic"
    );
}

#[test]
fn stats_count_queued_and_run() {
    let before = stats();
    let objects: Vec<_> = (0..10).map(Strong::new).collect();
    for obj in &objects {
        finalize(obj, || {});
    }
    drop(objects);
    flush();
    let after = stats();
    assert!(after.queued >= before.queued + 10);
    assert!(after.run >= before.run + 10);
    assert!(after.run <= after.queued + after.run, "sanity");
}

/// Many objects dying on two threads at once: every callback runs exactly
/// once.
#[test]
fn many_objects_die_on_two_threads_every_callback_once() {
    let objects = if cfg!(miri) { 200 } else { 100_000 };
    let runs: Arc<Vec<AtomicU8>> = Arc::new((0..objects).map(|_| AtomicU8::new(0)).collect());
    let start = Arc::new(Barrier::new(2));
    let workers: Vec<_> = (0..2)
        .map(|half| {
            let runs = runs.clone();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                for i in (half..objects).step_by(2) {
                    let obj = Strong::new(i);
                    let runs = runs.clone();
                    finalize(&obj, move || {
                        runs[i].fetch_add(1, Ordering::Relaxed);
                    });
                    drop(obj);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    flush();
    let wrong: Vec<_> = runs
        .iter()
        .enumerate()
        .filter(|(_, n)| n.load(Ordering::Relaxed) != 1)
        .map(|(i, n)| (i, n.load(Ordering::Relaxed)))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "callbacks not run exactly once: {wrong:?}"
    );
}

/// Detach and call racing the object's death on another thread: exactly
/// one of "detached", "called", "ran at death" happens.
#[test]
fn detach_and_call_race_death() {
    let rounds = if cfg!(miri) { 20 } else { 2_000 };
    for round in 0..rounds {
        let runs = Arc::new(AtomicUsize::new(0));
        let obj = Strong::new(());
        let counter = runs.clone();
        let f = finalize(&obj, move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let racer = {
            let f = f.clone();
            thread::spawn(move || if round % 2 == 0 { f.detach() } else { f.call() })
        };
        drop(obj);
        let racer_won = racer.join().unwrap();
        flush();
        let ran = runs.load(Ordering::SeqCst);
        if round % 2 == 0 {
            assert_eq!(ran + usize::from(racer_won), 1, "detach race: ran {ran}");
        } else {
            assert_eq!(ran, 1, "call race: ran {ran}");
        }
    }
}

/// A callback may drop handles, register finalizers, and call `flush`
/// without deadlock.
#[test]
fn callbacks_may_reenter() {
    finishes_within(DEADLOCK, || {
        let log = Arc::new(Mutex::new(Vec::new()));
        let inner = Strong::new("inner");
        let inner_log = log.clone();
        finalize(&inner, move || inner_log.lock().unwrap().push("inner died"));
        let outer = Strong::new("outer");
        let outer_log = log.clone();
        let holder = Mutex::new(Some(inner));
        finalize(&outer, move || {
            // Drop the last handle of another object from a callback...
            drop(holder.lock().unwrap().take());
            // ...register a finalizer on a new object and kill it...
            let third = Strong::new("third");
            let third_log = outer_log.clone();
            finalize(&third, move || third_log.lock().unwrap().push("third died"));
            drop(third);
            // ...and flush from inside a callback.
            flush();
            outer_log.lock().unwrap().push("outer done");
        });
        drop(outer);
        flush();
        let mut log = log.lock().unwrap().clone();
        log.sort();
        assert_eq!(log, ["inner died", "outer done", "third died"]);
    });
}

/// C15: a chain in which every callback drops the next object and then
/// calls `flush` runs on the finalizer thread without nesting one drain
/// per link on its stack (it overflowed at about 12 000 links).
#[test]
fn a_chain_of_flushing_callbacks_does_not_nest() {
    let links = chains::LINKS;
    let ran = Arc::new(AtomicUsize::new(0));
    let head = chains::callback_chain(links, true, &ran);
    drop(head);
    flush();
    assert_eq!(ran.load(Ordering::SeqCst), links);
}

#[test]
fn flush_from_many_threads_while_work_arrives() {
    finishes_within(DEADLOCK, || {
        let rounds = if cfg!(miri) { 10 } else { 500 };
        let runs = Arc::new(AtomicUsize::new(0));
        thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..rounds {
                        let obj = Strong::new(());
                        let runs = runs.clone();
                        finalize(&obj, move || {
                            runs.fetch_add(1, Ordering::SeqCst);
                        });
                        drop(obj);
                        flush();
                    }
                });
            }
        });
        flush();
        assert_eq!(runs.load(Ordering::SeqCst), 2 * rounds);
    });
}

#[test]
fn weak_method_calls_while_the_receiver_lives() {
    struct Counter(AtomicUsize);
    let counter = Strong::new(Counter(AtomicUsize::new(0)));
    let bump = WeakMethod::new(&counter, |c: &Counter, by: usize| {
        c.0.fetch_add(by, Ordering::SeqCst) + by
    });
    let again = bump.clone();
    assert!(bump.is_alive());
    assert_eq!(bump.call(2), Some(2));
    assert_eq!(again.call(3), Some(5));
    assert_eq!(
        Strong::strong_count(&counter),
        1,
        "WeakMethod holds no strong handle"
    );
    drop(counter);
    assert!(!bump.is_alive());
    assert_eq!(bump.call(1), None);
    assert!(format!("{bump:?}").contains("dead"));
}

#[test]
fn finalizer_is_send_sync_and_debug() {
    fn send_sync<T: Send + Sync + Clone>() {}
    send_sync::<weakrefs::Finalizer>();
    let obj = Strong::new(());
    let f = finalize(&obj, || {});
    assert_eq!(format!("{f:?}"), "Finalizer { alive: true, atexit: true }");
    f.detach();
}
