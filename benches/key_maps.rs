//! `WeakKeyMap` as a side table against the usual hand-rolled one,
//! `DashMap<usize, V>` keyed by the object's address, whose entries the
//! object's owner must remove by hand when the object goes. In one run:
//!
//! * `side_table/lookup/{1,2}_thread`: 100k live keys, uniform lookups
//!   that read a `u64` out of the value (`WeakKeyMap::with`, against
//!   `DashMap::get`; `WeakKeyMap::get` is `with` plus a clone), and the
//!   same `DashMap` with each value boxed (`dashmap_boxed_value`): the
//!   control for the one pointer a `WeakKeyMap` lookup follows that an
//!   inline value spares `DashMap`;
//! * `side_table/churn_1024`: 1024 objects each get an entry and then go
//!   away; the baseline removes each entry by hand as its object is
//!   dropped, this crate relies on the death callbacks and `flush`.
//!
//! `cargo bench --bench key_maps` (`WEAKREFS_BENCH_THREADS=1,2,4` for
//! other thread counts).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dashmap::DashMap;
use weakrefs::{Strong, WeakKeyMap};

#[path = "support/keys.rs"]
mod keys;
#[path = "support/threads.rs"]
mod threads;
use keys::KeyStream;
use threads::{on_threads, thread_counts};

const KEYS: usize = 100_000;
const CHURN: usize = 1024;

fn address<T>(key: &Arc<T>) -> usize {
    Arc::as_ptr(key) as usize
}

fn lookups(c: &mut Criterion) {
    let ours: Vec<Strong<u64>> = (0..KEYS as u64).map(Strong::new).collect();
    let theirs: Vec<Arc<u64>> = (0..KEYS as u64).map(Arc::new).collect();
    let map = WeakKeyMap::with_capacity(KEYS);
    for key in &ours {
        map.insert(key, **key);
    }
    let dash: DashMap<usize, u64> = DashMap::with_capacity(KEYS);
    for key in &theirs {
        dash.insert(address(key), **key);
    }
    // The control: the same side table with each value in an allocation
    // of its own, as `WeakKeyMap` keeps it (in the entry's node, where it
    // never moves while a reader borrows it). A lookup then follows one
    // pointer more, into memory that outgrows the caches at 100k keys.
    let boxed: DashMap<usize, Box<u64>> = DashMap::with_capacity(KEYS);
    for key in &theirs {
        boxed.insert(address(key), Box::new(**key));
    }
    for threads in thread_counts() {
        let mut group = c.benchmark_group(format!("side_table/lookup/{threads}_thread"));
        group.throughput(Throughput::Elements(threads as u64));
        let run = |look: &(dyn Fn(usize) -> u64 + Sync), iters: u64| {
            on_threads(threads, |t| {
                let mut stream = KeyStream::new(KEYS as u64, false, t);
                for _ in 0..iters {
                    let key = stream.next() as usize;
                    assert_eq!(look(black_box(key)), key as u64);
                }
            })
        };
        group.bench_function("weakrefs", |b| {
            b.iter_custom(|iters| run(&|i| map.with(&ours[i], |v| *v).unwrap(), iters))
        });
        group.bench_function("dashmap", |b| {
            b.iter_custom(|iters| run(&|i| *dash.get(&address(&theirs[i])).unwrap(), iters))
        });
        group.bench_function("dashmap_boxed_value", |b| {
            b.iter_custom(|iters| run(&|i| **boxed.get(&address(&theirs[i])).unwrap(), iters))
        });
        group.finish();
    }
}

/// An object whose side-table entry its owner removes by hand on drop: the
/// clean-up a `DashMap` side table needs.
struct Owned<'a> {
    object: Arc<u64>,
    table: &'a DashMap<usize, u64>,
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        self.table.remove(&address(&self.object));
    }
}

fn churn(c: &mut Criterion) {
    let mut group = c.benchmark_group("side_table/churn_1024");
    group.throughput(Throughput::Elements(CHURN as u64));
    let map: WeakKeyMap<u64, u64> = WeakKeyMap::new();
    group.bench_function("weakrefs", |b| {
        b.iter(|| {
            for i in 0..CHURN as u64 {
                let object = Strong::new(i);
                map.insert(&object, i);
            }
            weakrefs::flush();
        })
    });
    assert!(map.is_empty(), "dead keys' entries left after flush");
    let dash: DashMap<usize, u64> = DashMap::new();
    group.bench_function("dashmap", |b| {
        b.iter(|| {
            for i in 0..CHURN as u64 {
                let owned = Owned {
                    object: Arc::new(i),
                    table: &dash,
                };
                dash.insert(address(&owned.object), i);
            }
        })
    });
    assert!(dash.is_empty());
    group.finish();
}

criterion_group!(benches, lookups, churn);
criterion_main!(benches);
