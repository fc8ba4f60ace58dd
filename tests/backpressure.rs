//! Backpressure on the finalizer thread (SAFETY.md, C18): threads that
//! queue work faster than it runs it wait for it at their next safe point,
//! and a wait never becomes a deadlock. Its own test binary, so that
//! stalling the process's finalizer thread holds up no other test.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use weakrefs::{finalize, flush, stats, Strong, WeakKeyMap};

/// One test at a time: they share the process's finalizer thread, and the
/// first stalls it.
static SERIAL: Mutex<()> = Mutex::new(());

/// Past the process-wide bound (32 768 pending) with room to spare: each
/// key's death queues one job, the drop of its value.
const DEATHS: usize = 40_000;

/// A value whose destructor runs user code (so removed values are dropped
/// on the finalizer thread) and is counted.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `body` on a thread of its own and fails the test instead of
/// hanging it if it never returns.
fn within_a_minute(body: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    let _runner = thread::spawn(move || {
        body();
        done.send(()).unwrap();
    });
    match finished.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("still running after a minute: a wait for the finalizer never ended")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the producing thread panicked"),
    }
}

/// A thread that holds a lock a queued callback needs, and meanwhile kills
/// keys far past the bound, waits for the finalizer exactly once (it
/// finishes nothing, stalled on that lock, so the wait gives up and no
/// other begins until it moves) and is never deadlocked; once the lock
/// goes, every value is dropped and nothing is left pending.
#[test]
#[cfg_attr(
    miri,
    ignore = "40 000 deaths and millisecond waits: minutes under Miri, and no unsafe code of its own"
)]
fn a_producer_holding_a_lock_the_finalizer_needs_is_held_up_not_deadlocked() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    flush();
    let lock = Arc::new(Mutex::new(()));
    let drops = Arc::new(AtomicUsize::new(0));
    let waits_before = stats().backlog_waits;
    {
        let (lock, drops) = (lock.clone(), drops.clone());
        within_a_minute(move || {
            let held = lock.lock().unwrap();
            // The finalizer thread's next callback waits for `lock`.
            let blocker = Strong::new(());
            let needs_the_lock = lock.clone();
            finalize(&blocker, move || drop(needs_the_lock.lock().unwrap()));
            drop(blocker);
            let map: WeakKeyMap<usize, Counted> = WeakKeyMap::new();
            for i in 0..DEATHS {
                let key = Strong::new(i);
                map.insert(&key, Counted(drops.clone()));
                drop(key);
            }
            drop(held);
        });
    }
    flush();
    assert_eq!(
        drops.load(Ordering::Relaxed),
        DEATHS,
        "a value was not dropped"
    );
    let after = stats();
    assert_eq!(after.pending, 0);
    assert_eq!(
        after.backlog_waits - waits_before,
        1,
        "{DEATHS} queued drops past the bound: one wait, given up"
    );
}

/// Two threads flooding one map with deaths, while the finalizer keeps
/// going, finish, and every removed value is dropped: the waits end.
#[test]
#[cfg_attr(
    miri,
    ignore = "80 000 deaths and millisecond waits: minutes under Miri, and no unsafe code of its own"
)]
fn threads_flooding_the_finalizer_finish_and_lose_nothing() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let drops = Arc::new(AtomicUsize::new(0));
    let map: Arc<WeakKeyMap<usize, Counted>> = Arc::new(WeakKeyMap::new());
    {
        let (map, drops) = (map.clone(), drops.clone());
        within_a_minute(move || {
            let threads: Vec<_> = (0..2)
                .map(|t| {
                    let (map, drops) = (map.clone(), drops.clone());
                    thread::spawn(move || {
                        for i in 0..DEATHS {
                            let key = Strong::new(t * DEATHS + i);
                            map.insert(&key, Counted(drops.clone()));
                        }
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
        });
    }
    flush();
    assert_eq!(drops.load(Ordering::Relaxed), 2 * DEATHS);
    assert!(map.is_empty());
    assert_eq!(stats().pending, 0);
}
