//! The finalizer thread, `weakrefs-finalizer`: who runs the queue.
//!
//! One thread, started by the first batch, loops: drain, spin briefly for
//! more, then announce that it is going to sleep, re-check, and park. A
//! producer unparks it after a push only if it has announced sleep (a fence
//! on each side orders the flag against the queue), and a crossbeam
//! `Parker` keeps the token, so no wake-up is lost (C8). `shutdown` stops
//! it; if it cannot be spawned, or ever unwinds, it is marked failed and
//! `flush` drains on the calling thread instead (C11).
//!
//! The loop is a plain function over the runtime's `drain`, so tests and
//! models run it on a thread of their own (`WorkerMode::External`).

use std::thread::JoinHandle;

#[cfg(any(test, not(weakrefs_loom)))]
use super::queue::BatchQueue;
#[cfg(any(test, not(weakrefs_loom)))]
use crate::sync::spin_briefly_until;
use crate::sync::{fence, AtomicBool, Mutex, Ordering, Parker, Unparker};

/// Who runs a runtime's worker loop.
#[derive(Debug, Clone, Copy)]
pub(super) enum WorkerMode {
    /// The runtime starts a thread at the first batch with this function,
    /// which runs the loop over it (the global runtime), or returns `None`
    /// if it cannot.
    #[cfg(not(weakrefs_loom))]
    Spawn(fn(Parker) -> Option<JoinHandle<()>>),
    /// A test or model runs the loop on a thread of its own.
    #[cfg(test)]
    External,
    /// Nobody: `flush` drains on the calling thread.
    #[cfg(any(test, weakrefs_loom))]
    Inline,
}

/// The worker's state, as producers, `flush` and `shutdown` see it.
#[derive(Debug)]
pub(super) struct Worker {
    mode: WorkerMode,
    /// Set once the first batch has started the worker (or found it
    /// stopped); only `Spawn` mode starts one.
    #[cfg(not(weakrefs_loom))]
    started: AtomicBool,
    /// The worker thread could not be spawned, or died: `flush` drains
    /// inline.
    failed: AtomicBool,
    /// The worker is about to park or parked: producers must unpark it.
    sleeping: AtomicBool,
    stop_requested: AtomicBool,
    /// The worker's parker, until the worker takes it (never, under loom
    /// outside tests: no worker is started there).
    #[cfg_attr(all(weakrefs_loom, not(test)), allow(dead_code))]
    parker: Mutex<Option<Parker>>,
    unparker: Unparker,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    pub(super) fn new(mode: WorkerMode) -> Self {
        let parker = Parker::new();
        let unparker = parker.unparker().clone();
        Worker {
            mode,
            #[cfg(not(weakrefs_loom))]
            started: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            parker: Mutex::new(Some(parker)),
            unparker,
            thread: Mutex::new(None),
        }
    }

    /// The worker's parker, for a runtime in `External` mode.
    #[cfg(test)]
    pub(super) fn take_parker(&self) -> Parker {
        self.parker.lock().take().expect("the parker is taken once")
    }

    /// After a push: starts the worker if it is not started yet, and
    /// unparks it if it is going to sleep (C8). `on_start_failure` runs if
    /// the worker could not be started.
    #[inline]
    pub(super) fn wake(&self, on_start_failure: impl FnOnce()) {
        // Outside tests `Spawn` is the only mode.
        #[cfg(not(weakrefs_loom))]
        #[allow(irrefutable_let_patterns)]
        if let WorkerMode::Spawn(spawn) = self.mode {
            // Acquire: pairs with the Release in `start`; a stale `false`
            // only costs a trip through the mutex.
            if !self.started.load(Ordering::Acquire) {
                self.start(spawn, on_start_failure);
            }
        }
        #[cfg(weakrefs_loom)]
        let _ = on_start_failure;
        // SeqCst fence (C8): pairs with the worker's fence between raising
        // `sleeping` and re-checking the queue. Either the worker sees our
        // batch and does not park, or we see it about to park and unpark
        // it. An awake worker costs us no RMW on the parker's line.
        fence(Ordering::SeqCst);
        // Relaxed: ordered by the fence.
        if self.sleeping.load(Ordering::Relaxed) {
            self.unparker.unpark();
        }
    }

    #[cfg(not(weakrefs_loom))]
    #[cold]
    #[inline(never)]
    fn start(&self, spawn: fn(Parker) -> Option<JoinHandle<()>>, on_start_failure: impl FnOnce()) {
        let mut thread = self.thread.lock();
        // Relaxed: the mutex orders starts.
        if self.started.load(Ordering::Relaxed) {
            return;
        }
        // Acquire: pairs with `stop`'s Release. `stop` sets the flag before
        // it takes this mutex, so a start that comes after that sees it and
        // does not spawn a thread nobody would join; the producer's batch is
        // taken by shutdown's closing swap or runs inline (C9).
        if self.stop_requested.load(Ordering::Acquire) {
            // Release: as below.
            self.started.store(true, Ordering::Release);
            return;
        }
        // Nothing below may panic before the outcome is recorded: a start
        // that dies half-way would leave later deaths queued with no worker
        // and no `failed` for `flush` to see.
        let parker = self.parker.lock().take();
        let spawned = parker.and_then(spawn);
        if spawned.is_none() {
            self.mark_failed();
            on_start_failure();
        }
        *thread = spawned;
        // Release: pairs with `wake`'s Acquire.
        self.started.store(true, Ordering::Release);
    }

    /// Records that the worker is gone: from now on `flush` drains on the
    /// calling thread. The caller wakes any `flush` already waiting.
    #[cfg(any(test, not(weakrefs_loom)))]
    pub(super) fn mark_failed(&self) {
        // Release: pairs with the Acquire load in `has_failed`.
        self.failed.store(true, Ordering::Release);
    }

    /// No worker thread will drain the queue: this runtime has none, or it
    /// could not be spawned, or it died.
    pub(super) fn is_absent(&self) -> bool {
        #[cfg(any(test, weakrefs_loom))]
        if matches!(self.mode, WorkerMode::Inline) {
            return true;
        }
        // Acquire: pairs with `mark_failed`'s Release.
        self.failed.load(Ordering::Acquire)
    }

    /// Asks the worker to stop after one more drain, and waits for its
    /// thread (unless called from it).
    pub(super) fn stop(&self) {
        // Release: pairs with the worker's Acquire load, and with `start`'s.
        self.stop_requested.store(true, Ordering::Release);
        self.unparker.unpark();
        let handle = self.thread.lock().take();
        if let Some(handle) = handle {
            if handle.thread().id() != std::thread::current().id() {
                // A worker that died has already marked itself failed.
                let _ = handle.join();
            }
        }
    }

    /// The worker's loop over `queue`: `drain`, then park until a producer
    /// unparks. `on_failure` runs if the loop ever unwinds.
    #[cfg(any(test, not(weakrefs_loom)))]
    pub(super) fn run(
        &self,
        parker: Parker,
        queue: &BatchQueue,
        drain: impl Fn(),
        on_failure: impl Fn(),
    ) {
        /// If the worker ever unwinds (nothing in it should panic: callbacks
        /// and their payloads are caught), `flush` must stop waiting for it.
        struct DiesLoudly<F: Fn()>(F);
        impl<F: Fn()> Drop for DiesLoudly<F> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    (self.0)();
                }
            }
        }
        let _guard = DiesLoudly(on_failure);
        loop {
            drain();
            // Acquire: pairs with `stop`'s Release.
            if self.stop_requested.load(Ordering::Acquire) {
                drain();
                return;
            }
            if spin_briefly_until(|| queue.has_queued_work()) {
                continue;
            }
            // Idle: what the callbacks retired (a map's removed entries)
            // must not wait for the next death to be freed. Collecting it
            // may queue more work (a removed value's destructor), which the
            // check below then finds.
            // It runs other code's deferred functions too: a panic there
            // must not end the worker.
            crate::panics::catch_and_report("an epoch collection step", || {
                crate::reclaim::push_own_garbage_through();
            });
            // Relaxed: ordered by the fence (C8).
            self.sleeping.store(true, Ordering::Relaxed);
            // SeqCst fence (C8): pairs with the producers' fence in `wake`.
            fence(Ordering::SeqCst);
            if !queue.has_queued_work() {
                parker.park();
            }
            // Relaxed: a producer that still sees `true` unparks needlessly,
            // leaving a token that costs one extra loop.
            self.sleeping.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::super::list::ObjectCallbacks;
    use super::super::runtime::Runtime;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc as StdArc;

    #[test]
    fn an_external_worker_runs_everything_before_flush_returns() {
        let runtime = StdArc::new(Runtime::external());
        let parker = runtime.take_parker();
        let worker = {
            let runtime = runtime.clone();
            std::thread::spawn(move || runtime.worker_loop(parker))
        };
        let runs = StdArc::new(AtomicUsize::new(0));
        let rounds = if cfg!(miri) { 20 } else { 2_000 };
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..rounds {
                        let list = ObjectCallbacks::new();
                        let runs = runs.clone();
                        runtime.register(
                            &list,
                            Box::new(move || {
                                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }),
                        );
                        runtime.on_death_of(&list);
                    }
                });
            }
        });
        runtime.flush();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2 * rounds);
        assert_eq!(runtime.stats().pending, 0);
        runtime.shutdown();
        worker.join().unwrap();
    }
}

/// Loom model of the worker's parking (SAFETY.md, C8): a push racing the
/// worker's drain-then-park. Run by `.ci/loom`.
#[cfg(all(test, weakrefs_loom))]
mod loom_models {
    use super::super::runtime::loom_models::{die_with_one_callback, with_worker};
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use loom::sync::Arc;

    /// A death racing the worker's drain-then-park: the unpark is never
    /// lost, so `flush` returns (loom reports a deadlock otherwise) with the
    /// callback run exactly once.
    #[test]
    fn push_races_drain_and_park() {
        loom::model(|| {
            let (runtime, worker) = with_worker();
            let runs = Arc::new(AtomicUsize::new(0));
            die_with_one_callback(&runtime, &runs);
            runtime.flush();
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            runtime.shutdown();
            worker.join().unwrap();
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        });
    }
}
