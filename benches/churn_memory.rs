//! Memory over a churn run: what each map holds, entries and heap bytes,
//! while objects keep arriving and dying.
//!
//! The workload is a server's: every operation creates an object (a
//! 64-byte payload) under a new key (a request or document id, never
//! reused), registers it in the map, and keeps it alive until 1000 newer
//! objects have arrived, so 1000 objects are alive at any time. Compared,
//! in one run:
//!
//! * `WeakValueMap<u64, Payload>`, `WeakKeyMap<Payload, u64>` and
//!   `WeakSet<Payload>`: dead entries go by their death callbacks;
//! * `DashMap<u64, std::sync::Weak<Payload>>` with a `retain` sweep every
//!   10 000 operations, the usual hand-rolled cleanup;
//! * `RwLock<weak_table::WeakValueHashMap<u64, Weak<Payload>>>`, which
//!   clears expired entries when it resizes.
//!
//! Every 1000 operations it records the map's entries and the heap bytes
//! in use since the map was created (a counting global allocator; this
//! includes the 1000 live objects, the same for every map). At the end
//! every object is dropped, then `weakrefs::flush()`, and what is left is
//! recorded once the epoch garbage retired so far has been freed. A dead `std::sync::Weak` keeps its allocation, payload
//! included, until its entry goes; that is part of what the baselines hold.
//!
//! `cargo bench --bench churn_memory` (`-- --quick` for a shorter run).
//! Prints a table, and writes every sample to
//! `$WEAKREFS_BENCH_OUT/churn_memory.tsv` when that variable is set.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, RwLock, Weak as StdWeak};

use dashmap::DashMap;

#[path = "support/counting.rs"]
mod counting;
#[path = "support/out.rs"]
mod out;
use counting::{live, settle_epoch_garbage, Counting};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The objects: big enough that keeping dead ones allocated shows.
type Payload = [u64; 8];

/// Objects alive at any time.
const WINDOW: usize = 1_000;
/// Operations between samples.
const SAMPLE_EVERY: usize = 1_000;
/// Operations between the DashMap baseline's `retain` sweeps.
const SWEEP_EVERY: usize = 10_000;

/// One sample: operations so far, entries, heap bytes.
type Sample = (usize, usize, isize);

/// A map under churn: registers objects of its kind (made from their
/// payload: `Strong` and `Arc` are both `From<T>`).
trait Churned {
    type Object: From<Payload>;
    fn register(&self, id: u64, object: &Self::Object);
    /// Periodic maintenance after operation `op` (a baseline's sweep).
    fn maintain(&self, _op: usize) {}
    fn entries(&self) -> usize;
}

struct ValueMap(weakrefs::WeakValueMap<u64, Payload>);
impl Churned for ValueMap {
    type Object = weakrefs::Strong<Payload>;
    fn register(&self, id: u64, object: &Self::Object) {
        self.0.insert(id, object);
    }
    fn entries(&self) -> usize {
        self.0.len()
    }
}

struct KeyMap(weakrefs::WeakKeyMap<Payload, u64>);
impl Churned for KeyMap {
    type Object = weakrefs::Strong<Payload>;
    fn register(&self, id: u64, object: &Self::Object) {
        self.0.insert(object, id);
    }
    fn entries(&self) -> usize {
        self.0.len()
    }
}

struct Set(weakrefs::WeakSet<Payload>);
impl Churned for Set {
    type Object = weakrefs::Strong<Payload>;
    fn register(&self, _id: u64, object: &Self::Object) {
        self.0.insert(object);
    }
    fn entries(&self) -> usize {
        self.0.len()
    }
}

struct DashRetain(DashMap<u64, StdWeak<Payload>>);
impl Churned for DashRetain {
    type Object = Arc<Payload>;
    fn register(&self, id: u64, object: &Self::Object) {
        self.0.insert(id, Arc::downgrade(object));
    }
    fn maintain(&self, op: usize) {
        if op % SWEEP_EVERY == 0 {
            self.0.retain(|_, weak| weak.strong_count() > 0);
        }
    }
    fn entries(&self) -> usize {
        self.0.len()
    }
}

struct WeakTable(RwLock<weak_table::WeakValueHashMap<u64, StdWeak<Payload>>>);
impl Churned for WeakTable {
    type Object = Arc<Payload>;
    fn register(&self, id: u64, object: &Self::Object) {
        self.0.write().unwrap().insert(id, object.clone());
    }
    fn entries(&self) -> usize {
        // `len` counts expired entries not yet cleared, as memory does.
        self.0.read().unwrap().len()
    }
}

/// Runs `ops` operations on the map `build` makes; the samples, the last
/// one taken after every object died and `flush()` returned.
fn churn<M: Churned>(build: impl FnOnce() -> M, ops: usize) -> Vec<Sample> {
    // Start from a quiet heap: the previous run's callbacks done and its
    // epoch garbage freed, so `before` does not count what goes later.
    weakrefs::flush();
    settle_epoch_garbage();
    let before = live();
    let map = build();
    let mut alive = VecDeque::with_capacity(WINDOW + 1);
    let mut samples = vec![(0, 0, live() - before)];
    for op in 1..=ops {
        let object = M::Object::from([op as u64; 8]);
        map.register(op as u64, &object);
        alive.push_back(object);
        if alive.len() > WINDOW {
            alive.pop_front();
        }
        // Sampled before the sweep, so the baseline's peak shows.
        if op % SAMPLE_EVERY == 0 {
            samples.push((op, map.entries(), live() - before));
        }
        map.maintain(op);
    }
    drop(alive);
    weakrefs::flush();
    settle_epoch_garbage();
    samples.push((ops, map.entries(), live() - before));
    drop(map);
    weakrefs::flush();
    samples
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; anything else (`cargo test
    // --benches`) gets the short run too.
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let ops = if quick { 50_000 } else { 200_000 };
    let runs: Vec<(&str, Vec<Sample>)> = vec![
        (
            "WeakValueMap",
            churn(|| ValueMap(weakrefs::WeakValueMap::new()), ops),
        ),
        (
            "WeakKeyMap",
            churn(|| KeyMap(weakrefs::WeakKeyMap::new()), ops),
        ),
        ("WeakSet", churn(|| Set(weakrefs::WeakSet::new()), ops)),
        (
            "DashMap + retain",
            churn(|| DashRetain(DashMap::new()), ops),
        ),
        (
            "RwLock<weak_table>",
            churn(|| WeakTable(RwLock::default()), ops),
        ),
    ];
    println!(
        "churn: {ops} objects, {WINDOW} alive at a time, sample every {SAMPLE_EVERY} operations"
    );
    println!(
        "{:<20} {:>13} {:>15} {:>18} {:>18}",
        "map", "peak entries", "peak heap KiB", "entries at end", "heap KiB at end"
    );
    // `final` marks the sample taken after every object died and `flush()`.
    let mut tsv = out::tsv("churn_memory.tsv", "map\tops\tentries\theap_bytes\tfinal");
    for (name, samples) in &runs {
        let peak_entries = samples.iter().map(|s| s.1).max().unwrap_or(0);
        let peak_bytes = samples.iter().map(|s| s.2).max().unwrap_or(0);
        let (_, end_entries, end_bytes) = *samples.last().expect("samples");
        println!(
            "{name:<20} {peak_entries:>13} {:>15.1} {end_entries:>18} {:>18.1}",
            peak_bytes as f64 / 1024.0,
            end_bytes as f64 / 1024.0
        );
        if let Some(tsv) = &mut tsv {
            for (i, (op, entries, bytes)) in samples.iter().enumerate() {
                let last = u8::from(i + 1 == samples.len());
                writeln!(tsv, "{name}\t{op}\t{entries}\t{bytes}\t{last}")
                    .expect("write churn_memory.tsv");
            }
        }
    }
}
