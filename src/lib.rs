#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub,
    clippy::undocumented_unsafe_blocks
)]

mod block_cache;
mod callbacks;
mod control;
pub mod docs;
mod error;
mod finalizer;
mod identity;
mod marks;
mod panics;
#[cfg(feature = "rayon")]
mod par_iter;
mod raw;
mod reclaim;
#[cfg(feature = "arc-swap")]
mod ref_cnt;
/// The integration tests' fail-safe wait for deferred drops, shared with
/// the unit tests rather than copied (`pub` there, for the test crates).
#[cfg(all(test, not(weakrefs_loom)))]
#[path = "../tests/support/settle.rs"]
#[allow(unreachable_pub)]
mod settle;
mod strong;
mod sync;
mod unsize;
mod weak;
mod weak_key_map;
mod weak_method;
mod weak_set;
mod weak_value_map;

/// What [`unsize!`] expands to; not public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::control::ControlBlock;
    pub use crate::unsize::{unsize, Unsizable};
}

pub use error::ReferenceError;
pub use finalizer::{finalize, flush, shutdown, stats, Finalizer, Stats};
pub use identity::{IdentityHasher, IdentityState};
#[cfg(feature = "rayon")]
#[cfg_attr(docsrs, doc(cfg(feature = "rayon")))]
pub use par_iter::ParIter;
pub use strong::Strong;
pub use weak::Weak;
pub use weak_key_map::WeakKeyMap;
pub use weak_method::WeakMethod;
pub use weak_set::WeakSet;
pub use weak_value_map::{MapStats, RemovalCause, WeakValueMap, WeakValueMapBuilder};
