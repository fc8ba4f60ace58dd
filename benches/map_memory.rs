//! Bytes per live entry: `WeakValueMap<u64, u64>` against
//! `DashMap<u64, std::sync::Weak<u64>>`, `RwLock<HashMap<..>>` and
//! `papaya::HashMap<..>`, counted by a global allocator wrapper (heap bytes
//! live after inserting 100k entries, less the values themselves, once
//! the epoch garbage of growth has been collected). Two rows for this crate:
//! a map grown from empty, and one sized up front with `with_capacity`.
//!
//! `cargo bench --bench map_memory`. Prints a table; no timing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, RwLock};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: defers to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above, for `dealloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const ENTRIES: u64 = 100_000;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Heap bytes the map itself holds per entry: measured after the values
/// exist, so their own allocations are not counted.
fn per_entry(build: impl FnOnce() -> Box<dyn std::any::Any>) -> f64 {
    let before = live();
    let map = build();
    settle_epoch_garbage();
    let bytes = live() - before;
    drop(map);
    settle_epoch_garbage();
    bytes as f64 / ENTRIES as f64
}

/// Lets crossbeam-epoch free what growth retired (old tables): with no
/// other thread pinned, a few pin-and-flush rounds advance the epoch and
/// collect everything retired so far.
fn settle_epoch_garbage() {
    for _ in 0..16 {
        crossbeam_epoch::pin().flush();
    }
}

fn main() {
    let strong: Vec<_> = (0..ENTRIES).map(weakrefs::Strong::new).collect();
    let arcs: Vec<_> = (0..ENTRIES).map(Arc::new).collect();
    let rows = [
        (
            "weakrefs::WeakValueMap (grown)",
            per_entry(|| {
                let map = weakrefs::WeakValueMap::new();
                for v in &strong {
                    map.insert(**v, v);
                }
                Box::new(map)
            }),
        ),
        (
            "weakrefs::WeakValueMap (with_capacity)",
            per_entry(|| {
                let map = weakrefs::WeakValueMap::with_capacity(ENTRIES as usize);
                for v in &strong {
                    map.insert(**v, v);
                }
                Box::new(map)
            }),
        ),
        (
            "DashMap<u64, Weak<u64>>",
            per_entry(|| {
                let map = dashmap::DashMap::new();
                for v in &arcs {
                    map.insert(**v, Arc::downgrade(v));
                }
                Box::new(map)
            }),
        ),
        (
            "RwLock<HashMap<u64, Weak<u64>>>",
            per_entry(|| {
                let map: HashMap<u64, std::sync::Weak<u64>> =
                    arcs.iter().map(|v| (**v, Arc::downgrade(v))).collect();
                Box::new(RwLock::new(map))
            }),
        ),
        (
            "papaya::HashMap<u64, Weak<u64>>",
            per_entry(|| {
                let map = papaya::HashMap::new();
                {
                    let pinned = map.pin();
                    for v in &arcs {
                        pinned.insert(**v, Arc::downgrade(v));
                    }
                }
                Box::new(map)
            }),
        ),
    ];
    println!("heap bytes per live entry, {ENTRIES} entries (u64 keys)");
    for (name, bytes) in rows {
        println!("{name:<40} {bytes:>7.1}");
    }
    // The callback registrations the weakrefs map keeps are counted above
    // (one entry node per value); the values' control blocks are not.
}
