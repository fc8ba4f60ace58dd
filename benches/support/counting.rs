//! A global allocator that counts the heap bytes in use, for the memory
//! benchmarks (`map_memory`, `churn_memory`). Install it with
//! `#[global_allocator] static ALLOCATOR: Counting = Counting;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

/// The system allocator, counting.
pub struct Counting;

// Tallies only: Relaxed throughout, pairing with nothing. Each is one
// location whose read-modify-writes are totally ordered, and the benches
// read them where no other thread allocates (after joins and `flush`), so
// a read sees every change made before it.
static LIVE: AtomicIsize = AtomicIsize::new(0);
static LIVE_ALLOCATIONS: AtomicIsize = AtomicIsize::new(0);

// SAFETY: defers to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        LIVE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        LIVE_ALLOCATIONS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: as above, for `dealloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Heap bytes allocated and not yet freed, by every thread: the sizes
/// asked for, without what the allocator adds to each allocation (8 to 16
/// bytes of header and rounding, with glibc).
pub fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Allocations made and not yet freed, by every thread.
#[allow(dead_code)] // not every bench that includes this module reads it
pub fn live_allocations() -> isize {
    LIVE_ALLOCATIONS.load(Ordering::Relaxed)
}

/// Lets the crate's epoch collector free what has been retired (old
/// tables, removed items): `weakrefs::flush` pushes this thread's garbage
/// through, advancing the epoch while no other thread is pinned.
pub fn settle_epoch_garbage() {
    for _ in 0..4 {
        weakrefs::flush();
    }
}
