//! Loom models of the lock-free protocols in `weakrefs`.
//!
//! The models live in `tests/`, one file per protocol, and compile only with
//! `--cfg weakrefs_loom --cfg crossbeam_loom` (see `.ci/loom`). In an
//! ordinary build this crate is empty.
//!
//! What the models share lives here: `Payload`, a value whose reads and
//! writes loom checks.

#[cfg(weakrefs_loom)]
mod payload {
    use loom::cell::UnsafeCell;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use loom::sync::Arc;

    /// A value the models share between handles: its reads, writes and
    /// drop go through a loom cell, so an access the handles fail to order
    /// fails the model, and it counts its drops. Over-aligned, so that in a
    /// control block it sits past the header's end at an offset only its
    /// alignment gives.
    #[repr(align(64))]
    pub struct Payload {
        data: UnsafeCell<u64>,
        drops: Arc<AtomicUsize>,
    }

    // SAFETY: the cell is touched only through loom's `with`/`with_mut`,
    // which report any access not ordered by the handles' synchronisation:
    // sharing it is what the models test.
    unsafe impl Sync for Payload {}

    impl Payload {
        /// A payload holding 7, counting its drop in `drops`.
        pub fn new(drops: &Arc<AtomicUsize>) -> Self {
            Payload {
                data: UnsafeCell::new(7),
                drops: drops.clone(),
            }
        }

        /// A read of the value, as any user of a live handle makes.
        pub fn read(&self) -> u64 {
            // SAFETY: shared reads only; loom checks them against the
            // writes in `write` and `drop`.
            self.data.with(|p| unsafe { *p })
        }

        /// Drops of payloads counted so far by this payload's counter.
        pub fn drops(&self) -> usize {
            self.drops.load(Ordering::SeqCst)
        }

        /// A write, through the unique access `get_mut`, `make_mut` or
        /// `into_inner` give.
        pub fn write(&mut self, value: u64) {
            // SAFETY: `&mut self` is unique, if the handles are right; loom
            // reports a concurrent read otherwise.
            self.data.with_mut(|p| unsafe { *p = value })
        }
    }

    impl Clone for Payload {
        fn clone(&self) -> Self {
            Payload {
                data: UnsafeCell::new(self.read()),
                drops: self.drops.clone(),
            }
        }
    }

    impl Drop for Payload {
        fn drop(&mut self) {
            // SAFETY: `drop` has the value to itself, if the handles are
            // right; loom reports a concurrent read otherwise.
            self.data.with_mut(|p| unsafe { *p = 0 });
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[cfg(weakrefs_loom)]
pub use payload::Payload;
