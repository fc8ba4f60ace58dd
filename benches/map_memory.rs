//! Bytes and allocations per live entry: `WeakValueMap<u64, u64>` against
//! `DashMap<u64, std::sync::Weak<u64>>`, `RwLock<HashMap<..>>`,
//! `scc::HashIndex<..>`, `scc::HashMap<..>` and `papaya::HashMap<..>`, counted by a global allocator wrapper (heap bytes
//! live after inserting 100k entries, less the values themselves, once
//! the epoch garbage of growth has been collected). Two rows for this crate:
//! a map grown from empty, and one sized up front with `with_capacity`.
//!
//! `cargo bench --bench map_memory`. Prints a table; no timing.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, RwLock};

#[path = "support/counting.rs"]
mod counting;
#[path = "support/out.rs"]
mod out;
use counting::{live, live_allocations, settle_epoch_garbage, Counting};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const ENTRIES: u64 = 100_000;

/// Heap bytes and allocations the map itself holds per entry: measured
/// after the values exist, so their own allocations are not counted.
fn per_entry(build: impl FnOnce() -> Box<dyn std::any::Any>) -> (f64, f64) {
    let (bytes_before, allocations_before) = (live(), live_allocations());
    let map = build();
    settle_epoch_garbage();
    let bytes = live() - bytes_before;
    let allocations = live_allocations() - allocations_before;
    drop(map);
    settle_epoch_garbage();
    (
        bytes as f64 / ENTRIES as f64,
        allocations as f64 / ENTRIES as f64,
    )
}

fn main() {
    // Values of their own for each of this crate's maps: a value that was
    // in the first map keeps that map's dropped entry's node on its list
    // (an object's first few registrations are never compacted), which the
    // second map's registrations would otherwise find, or not, depending on
    // the order of the rows.
    let strong: Vec<_> = (0..ENTRIES).map(weakrefs::Strong::new).collect();
    let more_strong: Vec<_> = (0..ENTRIES).map(weakrefs::Strong::new).collect();
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
                for v in &more_strong {
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
                // Grown from empty, like the others (`collect` would size
                // it up front).
                let mut map = HashMap::new();
                for v in &arcs {
                    map.insert(**v, Arc::downgrade(v));
                }
                Box::new(RwLock::new(map))
            }),
        ),
        (
            "scc::HashIndex<u64, Weak<u64>>",
            per_entry(|| {
                let map = scc::HashIndex::new();
                for v in &arcs {
                    let _ = map.insert_sync(**v, Arc::downgrade(v));
                }
                Box::new(map)
            }),
        ),
        (
            "scc::HashMap<u64, Weak<u64>>",
            per_entry(|| {
                let map = scc::HashMap::new();
                for v in &arcs {
                    let _ = map.insert_sync(**v, Arc::downgrade(v));
                }
                Box::new(map)
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
    println!("heap bytes and allocations per live entry, {ENTRIES} entries (u64 keys)");
    let mut tsv = out::tsv(
        "map_memory.tsv",
        "map\tbytes_per_entry\tallocations_per_entry",
    );
    for (name, (bytes, allocations)) in rows {
        println!("{name:<40} {bytes:>7.1} B {allocations:>6.2}");
        if let Some(tsv) = &mut tsv {
            writeln!(tsv, "{name}\t{bytes:.1}\t{allocations:.2}").expect("write map_memory.tsv");
        }
    }
    // The callback registrations the weakrefs map keeps are counted above
    // (one entry node per value); the values' control blocks are not.
    // papaya reclaims with its own scheme (seize), which the settling above
    // does not drive: garbage its growth left may still be counted.
}
