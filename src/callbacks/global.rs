//! The process-wide runtime that `finalize`, the handles and the
//! collections use, and its loom twin.
//!
//! In ordinary builds it is created at first use and starts the
//! `weakrefs-finalizer` thread at the first death with callbacks. Under
//! loom it spawns no thread (`flush` drains on the calling thread, so
//! models stay finite) and lives as long as one model execution, beside
//! the epoch collector it must outlive.

use super::runtime::Runtime;
#[cfg(not(weakrefs_loom))]
use super::worker::WorkerMode;

/// The process-wide runtime.
#[cfg(not(weakrefs_loom))]
#[inline]
pub(crate) fn global() -> &'static Runtime {
    static GLOBAL: std::sync::OnceLock<Runtime> = std::sync::OnceLock::new();
    GLOBAL.get_or_init(|| Runtime::build(WorkerMode::Spawn(spawn_worker)))
}

/// Starts the worker thread over the global runtime.
#[cfg(not(weakrefs_loom))]
fn spawn_worker(parker: crate::sync::Parker) -> Option<std::thread::JoinHandle<()>> {
    use std::io::Write;
    let spawned = std::thread::Builder::new()
        .name("weakrefs-finalizer".into())
        .spawn(move || global().worker_loop(parker));
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

/// Every process-wide object of the crate under loom, in one lazy static:
/// loom drops its lazy statics in an order that changes between
/// executions, and two of them touching loom atomics in their destructors
/// would make a model nondeterministic. The epoch collector is dropped
/// after the runtime.
#[cfg(weakrefs_loom)]
struct LoomGlobals {
    // Dropped first: its pending deferred functions may post work to
    // the runtime, which must still be there (fields drop in order).
    collector: crossbeam_epoch::Collector,
    runtime: Runtime,
}

#[cfg(weakrefs_loom)]
loom::lazy_static! {
    static ref GLOBAL: LoomGlobals = LoomGlobals {
        collector: crossbeam_epoch::Collector::new(),
        runtime: Runtime::inline(),
    };
}

/// Under loom the global runtime spawns no thread: `flush` drains it on
/// the calling thread, so models stay finite.
#[cfg(weakrefs_loom)]
pub(crate) fn global() -> &'static Runtime {
    &GLOBAL.runtime
}

/// The epoch collector that `Reclaimer::global` uses under loom.
#[cfg(weakrefs_loom)]
pub(crate) fn loom_collector() -> &'static crossbeam_epoch::Collector {
    &GLOBAL.collector
}
