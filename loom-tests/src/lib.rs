//! Loom models of the lock-free protocols in `weakrefs`.
//!
//! The models live in `tests/`, one file per protocol, and compile only with
//! `--cfg weakrefs_loom --cfg crossbeam_loom` (see `.ci/loom`). In an
//! ordinary build this crate is empty.
