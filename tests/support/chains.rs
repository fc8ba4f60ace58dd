//! Long chains of objects for the tests of C15 (delivery never nests on
//! the stack), shared by `tests/finalizers.rs` and
//! `tests/shutdown_cascades.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use weakrefs::{finalize, flush, Strong};

/// Links in a long chain: enough to overflow a 2 MiB stack if delivery
/// nested, fewer under Miri and ThreadSanitizer.
pub const LINKS: usize = if cfg!(miri) {
    50
} else if cfg!(weakrefs_tsan) {
    20_000
} else {
    200_000
};

/// Builds a chain of `links` objects in which each object's callback drops
/// the only `Strong` to the next one, then calls `flush` if `flushing`;
/// every callback counts itself in `ran`. Returns the head.
pub fn callback_chain(links: usize, flushing: bool, ran: &Arc<AtomicUsize>) -> Strong<usize> {
    let mut next: Option<Strong<usize>> = None;
    for link in (0..links).rev() {
        let object = Strong::new(link);
        let ran = ran.clone();
        let mut held = next.take();
        finalize(&object, move || {
            drop(held.take());
            if flushing {
                flush();
            }
            ran.fetch_add(1, Ordering::SeqCst);
        });
        next = Some(object);
    }
    next.expect("at least one link")
}
