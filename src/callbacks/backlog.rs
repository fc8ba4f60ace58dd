//! Backpressure on the callback queue: a thread that queues work faster
//! than the finalizer thread runs it waits, at its next safe point, for
//! the finalizer to catch up (SAFETY.md, C18).
//!
//! One finalizer thread runs what every other thread queues. Threads that
//! kill keys of a `WeakKeyMap` whose values have destructors, or objects
//! with slow death callbacks, can queue work faster than that thread runs
//! it; without a bound the queue, and the entries and values it keeps,
//! grow without end (a hostile-use hunt measured 1.6 GB in five seconds,
//! two threads on two cores). So:
//!
//! * **Owing.** A push that leaves more than [`Backlog::high`] callbacks
//!   pending records, on the pushing thread, that it owes the runtime a
//!   wait ([`note_push`]): one thread-local store, and nothing at all
//!   below the bound.
//! * **Settling.** At a safe point (the exit of a collection's write, of a
//!   death's delivery, of `Finalizer::call`), a thread that owes waits for
//!   the work queued ahead of it, down to half the bound
//!   ([`Runtime::settle_backlog`]). A safe point holds none of the crate's
//!   locks. Inside a callback, a single-flight load, a `remove_if`
//!   predicate, a read or an unwinding panic the thread may not wait, and
//!   keeps the debt for the safe point that ends that scope ([`MayWait`]);
//!   on the finalizer thread the debt is dropped.
//! * **Never for good, never long.** The waiting thread may hold a lock of
//!   its own that a queued callback needs, so it stops waiting once the
//!   finalizer has finished nothing for [`Backlog::patience`] slices of a
//!   millisecond, and does not wait again until the finalizer has
//!   finished something since (it may be what stalls it); and it waits
//!   [`Backlog::longest`] slices at most in any case. Backpressure bounds
//!   the queue while the finalizer makes progress; it never turns a stall
//!   into a deadlock.
//!
//! Under loom nothing here runs: a time-out is not something a model can
//! explore, and the bound is a liveness property, not a memory-safety one.

use std::cell::Cell;
use std::time::Duration;

use crate::marks::{self, Mark};
use crate::sync::thread_local;

/// How much may be pending before producers wait, and how long a wait
/// lasts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Backlog {
    /// A push that leaves more than this pending makes its thread owe a
    /// wait, for the work queued ahead of it down to half of this.
    pub(super) high: u64,
    /// Slices of [`SLICE`] in which the finalizer finishes nothing, after
    /// which a wait gives up.
    pub(super) patience: u32,
    /// Slices one wait lasts at most, progress or not.
    pub(super) longest: u32,
}

impl Backlog {
    /// The process-wide runtime's: about 5-10 MB of queued entries and
    /// values at most while the finalizer keeps up (measured at roughly
    /// 280 bytes per pending `WeakKeyMap` removal with a small value);
    /// 10 ms without progress before a waiting thread gives up, and 100 ms
    /// at most in any case.
    pub(super) const GLOBAL: Backlog = Backlog {
        high: 1 << 15,
        patience: 10,
        longest: 100,
    };

    /// What a wait waits for: the work ahead of it down to this many.
    pub(super) fn low(self) -> u64 {
        self.high / 2
    }
}

/// One slice of a wait: the waiting thread looks at the queue again after
/// each.
pub(super) const SLICE: Duration = Duration::from_millis(1);

thread_local! {
    /// The runtime (its address, compared, never read through) this thread
    /// has pushed past its bound since its last safe point; zero for none.
    static OWED: Cell<usize> = const { Cell::new(0) };
    /// The runtime and the count of its finished batches when this thread
    /// last gave up waiting for it: it does not wait for that runtime
    /// again until the count has moved.
    static GAVE_UP: Cell<(usize, u64)> = const { Cell::new((0, 0)) };
}

/// After a push that left `pending` callbacks queued and unfinished on
/// `runtime`: owe it a wait if that is past the bound.
#[inline]
pub(super) fn note_push(runtime: usize, backlog: Option<Backlog>, pending: u64) {
    if let Some(backlog) = backlog {
        if pending > backlog.high {
            OWED.with(|owed| owed.set(runtime));
        }
    }
}

/// True if this thread owes some runtime a wait: the fast path of a safe
/// point, one thread-local load.
#[inline(always)]
pub(super) fn owes() -> bool {
    OWED.with(Cell::get) != 0
}

/// True if this thread owes `runtime` a wait; whatever it owed is taken
/// off the thread either way (a debt to another runtime, which only tests
/// make, is not carried on).
pub(super) fn take_debt(runtime: usize) -> bool {
    OWED.with(|owed| owed.replace(0) == runtime)
}

/// Whether this thread may wait at this safe point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MayWait {
    /// It is at a safe point of its own.
    Now,
    /// It is inside something that must not wait (a callback run by
    /// `Finalizer::call`, a single-flight load, a `remove_if` predicate, a
    /// read, an unwinding panic): the debt stays for the safe point that
    /// ends it (the load's, the write's, the next one).
    Later,
    /// It is the finalizer thread, or drains the queue itself: it is what
    /// the others wait for, and never waits for its own backlog.
    Never,
}

/// Whether this thread may wait here ([`MayWait`]).
pub(super) fn may_wait() -> MayWait {
    if marks::is_inside(Mark::Finalizer) || marks::is_inside(Mark::Draining) {
        MayWait::Never
    } else if marks::is_inside(Mark::Callback)
        || marks::is_inside(Mark::Locked)
        || marks::is_inside(Mark::Reading)
        || marks::any_loading(|_| true)
        || std::thread::panicking()
    {
        MayWait::Later
    } else {
        MayWait::Now
    }
}

/// True if this thread gave up waiting for `runtime` when it had finished
/// `finished` batches, and it has finished none since: it may be stalled
/// on something this thread holds.
pub(super) fn still_stalled(runtime: usize, finished: u64) -> bool {
    GAVE_UP.with(Cell::get) == (runtime, finished)
}

/// Records that this thread gave up waiting for `runtime` when it had
/// finished `finished` batches.
pub(super) fn gave_up(runtime: usize, finished: u64) {
    GAVE_UP.with(|gave_up| gave_up.set((runtime, finished)));
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread;
    use std::time::Duration;

    use super::super::runtime::Runtime;
    use super::Backlog;
    use crate::marks::{self, Mark};

    /// A runtime whose producers owe a wait past `high` pending, which
    /// gives up after `patience` slices without progress (never, for
    /// `u32::MAX`) and lasts as long as it must; its worker loop runs on a
    /// thread of its own.
    fn with_worker(high: u64, patience: u32) -> (Arc<Runtime>, thread::JoinHandle<()>) {
        let backlog = Backlog {
            high,
            patience,
            longest: u32::MAX,
        };
        let runtime = Arc::new(Runtime::external().with_backlog(backlog));
        let parker = runtime.take_parker();
        let worker = {
            let runtime = runtime.clone();
            thread::spawn(move || runtime.worker_loop(parker))
        };
        (runtime, worker)
    }

    /// Runs what is queued, shuts `runtime` down and joins its worker.
    fn stop(runtime: &Runtime, worker: thread::JoinHandle<()>) {
        runtime.flush();
        runtime.shutdown();
        worker.join().unwrap();
    }

    /// Runs `body` on a thread of its own and returns what it returns;
    /// fails the test instead of hanging it if it never does.
    fn within_a_minute<R: Send + 'static>(body: impl FnOnce() -> R + Send + 'static) -> R {
        let (done, finished) = mpsc::channel();
        let _runner = thread::spawn(move || done.send(body()).unwrap());
        match finished.recv_timeout(Duration::from_secs(60)) {
            Ok(returned) => returned,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the producer still waits after a minute")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the producer panicked"),
        }
    }

    /// A producer that posts jobs far slower to run than to post, settling
    /// after each, never sees more than the bound pending: each push past
    /// it is followed by a wait down to half of it. Without the wait the
    /// producer runs thousands ahead.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "2 560 jobs of 20 000 spins and millisecond waits: minutes under Miri, and no unsafe code here"
    )]
    fn a_producer_past_the_bound_waits_for_the_worker() {
        const HIGH: u64 = 64;
        let (runtime, worker) = with_worker(HIGH, u32::MAX);
        let runs = Arc::new(AtomicUsize::new(0));
        let most = {
            let (runtime, runs) = (runtime.clone(), runs.clone());
            within_a_minute(move || {
                let mut most = 0;
                for _ in 0..HIGH * 40 {
                    let runs = runs.clone();
                    runtime.post(move || {
                        // Slow next to a post: about 20 µs of work.
                        let mut spin = 0u64;
                        for i in 0..20_000u64 {
                            spin = std::hint::black_box(spin.wrapping_add(i));
                        }
                        runs.fetch_add(1, Ordering::Relaxed);
                    });
                    runtime.settle_backlog();
                    most = most.max(runtime.stats().pending);
                }
                most
            })
        };
        assert!(most <= HIGH, "{most} pending after a settle, bound {HIGH}");
        runtime.flush();
        assert_eq!(runs.load(Ordering::Relaxed) as u64, HIGH * 40);
        stop(&runtime, worker);
    }

    /// A worker stalled on something the producer holds (here: a channel
    /// the producer sends on only after its posts) holds a settling
    /// producer up for the patience once, not for good, and not again
    /// while it has finished nothing since; nothing is lost.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "millisecond waits on a stalled thread: no unsafe code here for Miri to check"
    )]
    fn a_stalled_worker_holds_a_producer_up_once_not_for_good() {
        const HIGH: u64 = 8;
        let (runtime, worker) = with_worker(HIGH, 2);
        let (release, stalled) = mpsc::channel::<()>();
        runtime.post(move || stalled.recv().unwrap());
        let runs = Arc::new(AtomicUsize::new(0));
        {
            let (runtime, runs) = (runtime.clone(), runs.clone());
            within_a_minute(move || {
                for _ in 0..HIGH * 100 {
                    let runs = runs.clone();
                    runtime.post(move || {
                        runs.fetch_add(1, Ordering::Relaxed);
                    });
                    runtime.settle_backlog();
                }
                assert_eq!(runs.load(Ordering::Relaxed), 0, "the worker is stalled");
                release.send(()).unwrap();
            });
        }
        assert_eq!(runtime.stats().backlog_waits, 1, "one wait, given up");
        runtime.flush();
        assert_eq!(runs.load(Ordering::Relaxed) as u64, HIGH * 100);
        assert_eq!(runtime.stats().pending, 0);
        stop(&runtime, worker);
    }

    /// A thread that pushes past the bound waits for the work queued ahead
    /// of it, not for the queue to fall to half the bound: work that keeps
    /// the queue full and never reaches a safe point (here, jobs that each
    /// queue their successor before they finish, so the queue never holds
    /// fewer than twice the bound) does not hold it up for as long as that
    /// lasts. Waiting for the queue to fall, it would never return (the
    /// watchdog fails the test).
    #[test]
    #[cfg_attr(
        miri,
        ignore = "thousands of jobs and millisecond waits: no unsafe code here for Miri to check"
    )]
    fn a_wait_is_for_the_work_ahead_not_for_the_queue_to_fall() {
        const HIGH: u64 = 64;
        let (runtime, worker) = with_worker(HIGH, u32::MAX);
        let flooding = Arc::new(AtomicBool::new(true));
        for _ in 0..2 * HIGH {
            queue_successor(&runtime, &flooding);
        }
        let waits = {
            let runtime = runtime.clone();
            within_a_minute(move || {
                runtime.post(|| {});
                runtime.settle_backlog();
                runtime.stats().backlog_waits
            })
        };
        flooding.store(false, Ordering::Relaxed);
        assert_eq!(waits, 1, "the push past the bound waited");
        stop(&runtime, worker);
    }

    /// Queues a job that, while `flooding`, queues its successor.
    fn queue_successor(runtime: &Arc<Runtime>, flooding: &Arc<AtomicBool>) {
        let (next, flooding) = (runtime.clone(), flooding.clone());
        runtime.post(move || {
            if flooding.load(Ordering::Relaxed) {
                queue_successor(&next, &flooding);
            }
        });
    }

    /// A push past the bound inside a callback (or a load, or a read)
    /// waits at the thread's next safe point outside it, not there, and
    /// not never.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "millisecond waits on a stalled thread: no unsafe code here for Miri to check"
    )]
    fn a_debt_made_where_waiting_is_not_allowed_is_settled_outside() {
        const HIGH: u64 = 8;
        let (runtime, worker) = with_worker(HIGH, 2);
        let (release, stalled) = mpsc::channel::<()>();
        runtime.post(move || stalled.recv().unwrap());
        {
            let runtime = runtime.clone();
            within_a_minute(move || {
                {
                    let _inside = marks::enter(Mark::Callback);
                    for _ in 0..HIGH * 2 {
                        runtime.post(|| {});
                    }
                    runtime.settle_backlog();
                    assert_eq!(runtime.stats().backlog_waits, 0, "no wait inside");
                    assert!(super::owes(), "the debt is kept");
                }
                runtime.settle_backlog();
                assert_eq!(runtime.stats().backlog_waits, 1, "the wait outside");
                assert!(!super::owes());
                // A read keeps its debt too.
                crate::callbacks::reading(|| {
                    runtime.post(|| {});
                    runtime.settle_backlog();
                    assert!(super::owes(), "the debt is kept in a read");
                });
                runtime.settle_backlog();
                assert!(!super::owes(), "and settled after it");
                release.send(()).unwrap();
            });
        }
        stop(&runtime, worker);
    }
}
