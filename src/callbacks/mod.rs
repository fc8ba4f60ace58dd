//! Death-callback machinery: entries and their exactly-once state machine
//! (`entry`), the lock-free lists that hold them (`list`), the queue of
//! death batches (`queue`), the finalizer thread that drains it (`worker`),
//! the bound that holds producers back when it falls behind (`backlog`),
//! the runtime that delivers deaths, flushes and shuts down (`runtime`),
//! the process-wide runtime (`global`), and the one handle the
//! collections' machinery uses to run work on the finalizer thread
//! (`executor`). The public face is `crate::finalizer`.

#[cfg(not(weakrefs_loom))]
mod backlog;
mod entry;
mod executor;
mod global;
mod list;
mod queue;
mod runtime;
mod worker;

pub(crate) use entry::{EntryRef, Hook, HookSite, Removal, KEY_BITS};
pub(crate) use executor::{Executor, SafePoint};
pub(crate) use global::global;
pub(crate) use list::ObjectCallbacks;
pub use runtime::Stats;
pub(crate) use runtime::{Dead, Parked};

/// Runs `read`, a read's drop of handles it let go of (values the
/// keep-warm tier evicted), where a death must not wait for the backlog:
/// reads never block, so its debt waits for the thread's next safe point
/// (SAFETY.md, C18).
#[inline]
pub(crate) fn reading<R>(read: impl FnOnce() -> R) -> R {
    let _reading = crate::marks::enter(crate::marks::Mark::Reading);
    read()
}
