#![doc = include_str!("../README.md")]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub,
    clippy::undocumented_unsafe_blocks
)]

mod control;
mod error;
mod reclaim;
mod strong;
mod sync;
mod weak;

pub use error::ReferenceError;
pub use strong::Strong;
pub use weak::Weak;
