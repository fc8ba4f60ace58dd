//! Death-callback machinery: entries and their exactly-once state machine
//! (`entry`), the lock-free lists that hold them (`list`), the queue of
//! death batches (`queue`), the finalizer thread that drains it (`worker`),
//! the runtime that delivers deaths, flushes and shuts down (`runtime`),
//! and the process-wide runtime (`global`). The public face is
//! `crate::finalizer`.

mod entry;
mod global;
mod list;
mod queue;
mod runtime;
mod worker;

pub(crate) use entry::{EntryRef, Hook};
pub(crate) use global::global;
pub(crate) use list::ObjectCallbacks;
pub(crate) use runtime::Runtime;
pub use runtime::Stats;
