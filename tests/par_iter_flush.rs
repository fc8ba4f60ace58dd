//! The `rayon` feature and `flush()`: rayon's workers may flush while a
//! queued death callback, on the finalizer thread, does parallel work of
//! its own. In a test binary of its own: a regression wedges rayon's
//! global pool, which would stall every other rayon test beside it. The
//! global pool has eight workers here (whichever test builds it first),
//! as on a larger machine: more workers to block, and to steal.

#![cfg(feature = "rayon")]

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use rayon::prelude::*;
use weakrefs::{finalize, flush, RemovalCause, Strong, WeakSet, WeakValueMap};

/// The global pool's workers, for every test of this binary.
fn eight_workers() {
    // Err if another test built it first, with the same size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(8)
        .build_global();
}

/// Runs `body` on a thread of its own and fails if it has not finished
/// within `limit`: a deadlock never lets it finish.
fn within(limit: Duration, what: &str, body: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        body();
        done.send(()).unwrap();
    });
    if finished.recv_timeout(limit).is_err() {
        panic!("{what}: not finished after {limit:?} (a deadlock)");
    }
}

/// Each item of a `par_iter` drops an object whose callback runs a
/// `par_iter` of its own, then flushes. The callback needs a rayon worker,
/// and every worker of the global pool may be blocked in `flush` waiting
/// for it: it runs on the finalizer thread's own pool.
#[test]
fn workers_that_flush_let_a_callback_use_their_pool() {
    eight_workers();
    const OBJECTS: u64 = 64;
    let (done, finished) = mpsc::channel();
    let ran = Arc::new(AtomicUsize::new(0));
    let counted = ran.clone();
    // Not joined first: a deadlock never lets it finish. A minute turns
    // that hang into a failure.
    thread::spawn(move || {
        let set = Arc::new(WeakSet::new());
        let members: Vec<_> = (0..OBJECTS).map(Strong::new).collect();
        for member in &members {
            set.insert(member);
        }
        let dying: Vec<_> = (0..OBJECTS).map(Strong::new).collect();
        for object in &dying {
            let (set, ran) = (set.clone(), counted.clone());
            finalize(object, move || {
                assert_eq!(set.par_iter().count(), OBJECTS as usize);
                ran.fetch_add(1, Ordering::SeqCst);
            });
        }
        let dying = Mutex::new(dying);
        set.par_iter().for_each(|_| {
            drop(dying.lock().unwrap().pop());
            flush();
        });
        flush();
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(Duration::from_secs(60))
        .expect("the flushes and the callbacks finish");
    assert_eq!(ran.load(Ordering::SeqCst), OBJECTS as usize);
}

/// A removal listener (on the finalizer thread) iterates the map in
/// parallel while every worker of the global pool inserts, drops and
/// flushes. When a flushing worker ran the pool's pending work, it could
/// steal a job that flushed on top of the part of the listener's
/// `par_iter` it was running: that flush waited for the listener, which
/// waited for the part buried beneath it (a hostile-use hunt found it
/// deadlocked within 21 to 120 rounds of these).
#[test]
fn a_listener_iterating_in_parallel_never_waits_for_flushing_workers() {
    eight_workers();
    const ROUNDS: u64 = 150;
    let heard = Arc::new(AtomicUsize::new(0));
    let counted = heard.clone();
    within(Duration::from_secs(120), "listener par_iter", move || {
        let map_cell: Arc<OnceLock<std::sync::Weak<WeakValueMap<u64, u64>>>> =
            Arc::new(OnceLock::new());
        let listener_map = map_cell.clone();
        let map = Arc::new(
            WeakValueMap::builder()
                .on_remove(move |_: &u64, cause| {
                    let map = listener_map.get().and_then(std::sync::Weak::upgrade);
                    if let Some(map) = map {
                        // The 200 held values at least, whatever else is
                        // live or being inserted meanwhile (the map goes
                        // before they do).
                        assert!(map.par_iter().count() >= 200);
                    }
                    if cause == RemovalCause::Died {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .build(),
        );
        map_cell.set(Arc::downgrade(&map)).unwrap();
        let held: Vec<_> = (0..200u64).map(Strong::new).collect();
        for value in &held {
            map.insert(1_000_000 + **value, value);
        }
        for round in 0..ROUNDS {
            (0..64u64).into_par_iter().for_each(|i| {
                let value = Strong::new(i);
                map.insert(round * 1000 + i, &value);
                drop(value);
                flush();
            });
        }
        flush();
        drop(map);
        drop(held);
    });
    // Every inserted value died, and its entry left with it.
    assert_eq!(heard.load(Ordering::SeqCst), 150 * 64);
}

thread_local! {
    /// `flush` calls on this thread's stack right now.
    static FLUSHING: Cell<usize> = const { Cell::new(0) };
}

/// Every item of a `par_iter` drops an object with a callback, then
/// flushes. A flushing worker that ran the pool's pending work nested the
/// next item's `flush` on its stack, and that one the next: hundreds deep
/// for a thousand items, a stack overflow and an abort for twenty
/// thousand. Only the outermost `flush` on a stack runs pool work now, so
/// at most one more nests in it.
#[test]
fn flushes_in_a_parallel_loop_nest_at_most_once_on_a_workers_stack() {
    eight_workers();
    const ITEMS: u64 = 4000;
    let deepest = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicUsize::new(0));
    let (seen, counted) = (deepest.clone(), ran.clone());
    within(Duration::from_secs(120), "flushes in for_each", move || {
        (0..ITEMS).into_par_iter().for_each(|i| {
            let object = Strong::new(i);
            let ran = counted.clone();
            finalize(&object, move || {
                ran.fetch_add(1, Ordering::SeqCst);
            });
            drop(object);
            let depth = FLUSHING.with(|flushing| {
                flushing.set(flushing.get() + 1);
                flushing.get()
            });
            seen.fetch_max(depth, Ordering::SeqCst);
            flush();
            FLUSHING.with(|flushing| flushing.set(flushing.get() - 1));
        });
    });
    let deepest = deepest.load(Ordering::SeqCst);
    assert!((1..=2).contains(&deepest), "flushes nested {deepest} deep");
    assert_eq!(ran.load(Ordering::SeqCst), ITEMS as usize);
}

/// A callback may hand work to `rayon::spawn` and wait for it: the work
/// runs on the finalizer's pool, beside the finalizer thread.
#[test]
fn a_callback_may_wait_for_work_it_spawned() {
    eight_workers();
    let (sent, received) = mpsc::channel();
    let object = Strong::new(());
    let sent = Mutex::new(sent);
    finalize(&object, move || {
        let (result, finished) = mpsc::channel();
        rayon::spawn(move || {
            let name = thread::current().name().map(str::to_owned);
            result.send(name).unwrap();
        });
        // Bounded, so that a regression fails the test instead of wedging
        // the finalizer thread for the rest of the binary.
        let name = finished.recv_timeout(Duration::from_secs(60)).ok();
        sent.lock().unwrap().send(name).unwrap();
    });
    within(
        Duration::from_secs(120),
        "a callback's spawned work",
        move || {
            drop(object);
            flush();
        },
    );
    let name = received.recv().unwrap().expect("the spawned work ran");
    assert!(
        name.as_deref()
            .is_some_and(|name| name.starts_with("weakrefs-finalizer")),
        "ran on {name:?}"
    );
}

/// A callback's parallel work may flush: on either thread of the
/// finalizer's pool that `flush` is part of the callback, and returns at
/// once rather than wait for it.
#[test]
fn a_callbacks_parallel_work_may_flush() {
    eight_workers();
    let visited = Arc::new(AtomicUsize::new(0));
    let counted = visited.clone();
    within(
        Duration::from_secs(120),
        "flushes in a callback's par_iter",
        move || {
            let set = Arc::new(WeakSet::new());
            let members: Vec<_> = (0..256u64).map(Strong::new).collect();
            for member in &members {
                set.insert(member);
            }
            let object = Strong::new(());
            let (set_in_callback, counted) = (set.clone(), counted.clone());
            finalize(&object, move || {
                set_in_callback.par_iter().for_each(|_| {
                    flush();
                    counted.fetch_add(1, Ordering::SeqCst);
                });
            });
            drop(object);
            flush();
            drop(members);
        },
    );
    assert_eq!(visited.load(Ordering::SeqCst), 256);
}
