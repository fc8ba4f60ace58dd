//! The `rayon` feature and `flush()`: rayon's workers may flush while a
//! queued death callback, on the finalizer thread, needs their pool. In a
//! test binary of its own: a regression wedges rayon's global pool, which
//! would stall every other rayon test beside it.

#![cfg(feature = "rayon")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use rayon::prelude::*;
use weakrefs::{finalize, flush, Strong, WeakSet};

/// Each item of a `par_iter` drops an object whose callback runs a
/// `par_iter` of its own, then flushes. The callback needs a worker of the
/// pool, and every worker used to block in `flush` waiting for it: now a
/// worker that flushes runs the pool's pending work while it waits.
#[test]
fn workers_that_flush_let_a_callback_use_their_pool() {
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
