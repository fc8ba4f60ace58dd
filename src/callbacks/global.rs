//! The process-wide runtime that `finalize`, the handles and the
//! collections use, and its loom twin.
//!
//! In ordinary builds it is created at first use and starts the
//! `weakrefs-finalizer` thread at the first death with callbacks. Under
//! loom it spawns no thread (`flush` drains on the calling thread, so
//! models stay finite) and lives as long as one model execution, beside
//! the epoch collector it must outlive (`reclaim::outlives_collector`).

#[cfg(not(weakrefs_loom))]
use super::backlog::Backlog;
use super::runtime::Runtime;
#[cfg(not(weakrefs_loom))]
use super::worker::WorkerMode;

/// The process-wide runtime.
#[cfg(not(weakrefs_loom))]
#[inline]
pub(crate) fn global() -> &'static Runtime {
    static GLOBAL: std::sync::OnceLock<Runtime> = std::sync::OnceLock::new();
    GLOBAL.get_or_init(|| {
        Runtime::build(WorkerMode::Spawn(spawn_worker)).with_backlog(Backlog::GLOBAL)
    })
}

/// Starts the worker thread over the global runtime.
#[cfg(not(weakrefs_loom))]
fn spawn_worker(parker: crate::sync::Parker) -> Option<std::thread::JoinHandle<()>> {
    use std::io::Write;
    let spawned = std::thread::Builder::new()
        .name("weakrefs-finalizer".into())
        .spawn(move || {
            #[cfg(feature = "rayon")]
            let _pool = rayon_pool_of_its_own();
            global().worker_loop(parker)
        });
    match spawned {
        Ok(handle) => Some(handle),
        Err(error) => {
            // No thread: callbacks still run, at the next `flush` (which
            // drains inline) or at `shutdown`, never lost. Write errors
            // are ignored: `eprintln!` would panic on a closed stderr.
            let _ = writeln!(
                std::io::stderr(),
                "weakrefs: cannot start the finalizer thread ({error}); callbacks will run when the queue is drained"
            );
            None
        }
    }
}

/// With the `rayon` feature, makes the calling thread (the finalizer
/// thread, before its loop) worker 0 of a rayon pool of its own, for as
/// long as the returned handle lives, beside one more worker the pool
/// starts, `weakrefs-finalizer-pool`. A death callback's parallel work (a
/// `par_iter` over a collection, a `join`) then runs on this pool, and
/// never waits for a worker of the global pool: those may all be blocked
/// in `flush`, waiting for that very callback. What a callback hands to
/// `rayon::spawn` runs on the other worker, so a callback may wait for it.
/// All of it is the callback's work: the other worker carries the marks
/// of a callback run by the drain for its whole life (`Mark::Callback`,
/// `Mark::Draining`), as the finalizer thread carries them while it runs
/// one, so a `flush` there returns at once rather than wait for the
/// callback it is part of. A panic in spawned work is reported, as a
/// callback's is. `None` if rayon refuses (it never does for a thread of
/// ours, which is in no pool): the callbacks then use the global pool.
#[cfg(all(feature = "rayon", not(weakrefs_loom)))]
fn rayon_pool_of_its_own() -> Option<rayon::ThreadPool> {
    use crate::marks::{self, Mark};
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .use_current_thread()
        .thread_name(|_| "weakrefs-finalizer-pool".into())
        // Not on the finalizer thread (rayon runs no handler for the
        // thread that builds the pool): on the worker it starts, for its
        // life, which the marks, holding nothing, outlast harmlessly.
        .start_handler(|_| {
            std::mem::forget(marks::enter(Mark::Callback));
            std::mem::forget(marks::enter(Mark::Draining));
        })
        .panic_handler(|payload| {
            crate::panics::report("a rayon job spawned by a death callback", payload);
        })
        .build()
        .ok()
}

/// The process-wide runtime of the current loom execution: one without a
/// worker thread. The epoch collector's deferred functions post to it, so
/// it is kept in the collector's own lazy static and dropped after the
/// collector (loom drops separate lazy statics in an order that changes
/// between executions).
#[cfg(weakrefs_loom)]
pub(crate) fn global() -> &'static Runtime {
    crate::sync::lazy_static! {
        /// Publishes the runtime to every model thread: loom orders a lazy
        /// static's initialisation before each of its reads, as
        /// `std::sync::OnceLock` would, but does not see the `OnceLock`
        /// in which the collector's static keeps the runtime. It holds
        /// only a reference, so when it is dropped does not matter.
        static ref RUNTIME: &'static Runtime = crate::reclaim::outlives_collector(Runtime::inline);
    }
    &RUNTIME
}
