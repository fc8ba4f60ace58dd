//! The seam between the collections' machinery and the callback runtime:
//! a handle that runs work on the finalizer thread.
//!
//! `raw/` posts work that must not run where it arises (a removed key's
//! destructor, a removal that would wait for a busy shard, the last handle
//! to a collection) and asks whether that is still possible; it needs
//! nothing else of the runtime. Collection entries register their removal
//! callbacks on an object's list directly (`ObjectCallbacks::register_hook`),
//! which touches no runtime state.

use super::global::global;
use super::runtime::Runtime;

/// Runs work on the finalizer thread: a copyable handle to the process's
/// callback runtime. Deferred functions capture it when they are made, not
/// when they run: they may run while the process (or a loom model) tears
/// its statics down.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Executor {
    runtime: &'static Runtime,
}

impl Executor {
    /// The process's finalizer thread.
    #[inline]
    pub(crate) fn global() -> Self {
        Executor { runtime: global() }
    }

    /// Runs `job` on the finalizer thread, or inline, where it arises,
    /// once `shutdown` has closed the queue. `flush` waits for it, and it
    /// counts in the statistics as a callback.
    #[inline]
    pub(crate) fn post<F>(self, job: F)
    where
        F: FnOnce() + Send + 'static,
    {
        self.runtime.post(job)
    }

    /// True if work is queued that the finalizer thread has not taken yet:
    /// a hint (the queue may change at once), for work that batches itself.
    #[inline]
    pub(crate) fn has_queued_work(self) -> bool {
        self.runtime.has_queued_work()
    }

    /// Keeps `removal`, a death's removal after `shutdown` whose shard was
    /// busy, for later deaths to try again and the next `flush` to make
    /// (SAFETY.md, C19).
    pub(crate) fn park(self, removal: super::runtime::Parked) {
        self.runtime.park(removal);
    }

    /// Tries the parked removals again, never waiting for a lock.
    pub(crate) fn try_parked(self) {
        self.runtime.run_parked(false);
    }

    /// True once `shutdown` has closed the queue: from then on posted work
    /// runs inline, where it arises. A caller with work that may block
    /// checks this first; a post racing the closing still runs inline (C9).
    #[inline]
    pub(crate) fn is_closed(self) -> bool {
        self.runtime.is_closed()
    }
}

/// A safe point at the end of a scope (SAFETY.md, C18): declared first in
/// a collection's public write, it is dropped last, after the writer and
/// its pin, and then settles this thread's backlog debt
/// (`Runtime::settle_backlog`).
#[derive(Debug)]
pub(crate) struct SafePoint;

impl Drop for SafePoint {
    #[inline]
    fn drop(&mut self) {
        // The thread-local first: the runtime only for a thread that owes.
        #[cfg(not(weakrefs_loom))]
        if super::backlog::owes() {
            global().settle_backlog();
        }
    }
}
