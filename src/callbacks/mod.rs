//! Death-callback machinery: entries and their exactly-once state machine
//! (`entry`), the lock-free lists that hold them (`list`), and the runtime
//! that queues, runs and flushes them (`runtime`). The public face is
//! `crate::finalizer`.

mod entry;
mod list;
mod runtime;

pub(crate) use entry::{EntryRef, Hook};
#[cfg(weakrefs_loom)]
pub(crate) use runtime::loom_collector;
pub(crate) use runtime::{global, ObjectCallbacks, Runtime};
