//! `WeakValueMap` against what users would pick instead, in one run:
//!
//! * `dashmap`: `DashMap<K, std::sync::Weak<V>>`, get + upgrade;
//! * `rwlock_hashmap`: `RwLock<HashMap<K, std::sync::Weak<V>>>`;
//! * `rwlock_weak_table`: `RwLock<weak_table::WeakValueHashMap<K, Weak<V>>>`;
//! * `papaya`: `papaya::HashMap<K, std::sync::Weak<V>>`;
//! * `scc_hash_index`, `scc_hash_map`: `scc::HashIndex` and `scc::HashMap`
//!   of the same;
//! * `std_hashmap_unsync`: a `std::collections::HashMap<K, Weak<V>>` read in
//!   place with no lock at all (the floor; read-only here, so sound).
//!
//! Groups: `read_hit/{uniform,skewed}/{1,2}_thread` (100k live keys, every
//! read hits); `read_hit_by_size/{1000..1000000}_keys` (this crate,
//! `dashmap` and `scc_hash_index`, 1 thread, uniform);
//! `read_cost/{keep_recent_all,keep_recent_tenth,stats}/{1000,100000}_keys/{1,2}_thread`
//! (what a keep-warm tier and statistics cost reads: the map with the
//! option, `weakrefs`, against the same map without, `without`);
//! `single_flight_hot_key/*`; and
//! `churn/{u64,string,fresh_u64}_keys` (insert a fresh value, then it
//! dies), where the baselines clean up with a periodic `retain` and this
//! crate with its death callbacks.
//! `cargo bench --bench maps`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, RwLock, Weak as StdWeak};
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use dashmap::DashMap;

#[path = "support/keys.rs"]
mod keys;
#[path = "support/threads.rs"]
mod threads;
use keys::KeyStream;
use threads::{on_threads, thread_counts};

const KEYS: u64 = 100_000;

/// A reader of one map kind: `get` returns whether the key held a live
/// value (after upgrading it, as a user would).
trait ReadMap: Sync {
    fn hit(&self, key: u64) -> bool;
}

struct Ours {
    map: weakrefs::WeakValueMap<u64, u64>,
    _values: Vec<weakrefs::Strong<u64>>,
}
impl ReadMap for Ours {
    fn hit(&self, key: u64) -> bool {
        self.map.get(&key).is_some()
    }
}

struct Dash {
    map: DashMap<u64, StdWeak<u64>>,
    _values: Vec<Arc<u64>>,
}
impl ReadMap for Dash {
    fn hit(&self, key: u64) -> bool {
        self.map.get(&key).and_then(|w| w.upgrade()).is_some()
    }
}

struct Locked {
    map: RwLock<HashMap<u64, StdWeak<u64>>>,
    _values: Vec<Arc<u64>>,
}
impl ReadMap for Locked {
    fn hit(&self, key: u64) -> bool {
        let map = self.map.read().unwrap();
        map.get(&key).and_then(StdWeak::upgrade).is_some()
    }
}

struct WeakTable {
    map: RwLock<weak_table::WeakValueHashMap<u64, StdWeak<u64>>>,
    _values: Vec<Arc<u64>>,
}
impl ReadMap for WeakTable {
    fn hit(&self, key: u64) -> bool {
        self.map.read().unwrap().get(&key).is_some()
    }
}

struct Papaya {
    map: papaya::HashMap<u64, StdWeak<u64>>,
    _values: Vec<Arc<u64>>,
}
impl ReadMap for Papaya {
    fn hit(&self, key: u64) -> bool {
        self.map
            .pin()
            .get(&key)
            .and_then(StdWeak::upgrade)
            .is_some()
    }
}

struct SccIndex {
    map: scc::HashIndex<u64, StdWeak<u64>>,
    _values: Vec<Arc<u64>>,
}
impl ReadMap for SccIndex {
    fn hit(&self, key: u64) -> bool {
        self.map
            .peek_with(&key, |_, weak| weak.upgrade())
            .flatten()
            .is_some()
    }
}

struct SccMap {
    map: scc::HashMap<u64, StdWeak<u64>>,
    _values: Vec<Arc<u64>>,
}
impl ReadMap for SccMap {
    fn hit(&self, key: u64) -> bool {
        self.map
            .read_sync(&key, |_, weak| weak.upgrade())
            .flatten()
            .is_some()
    }
}

/// The floor: no lock, no pin (read-only, so sharing it is sound).
struct Unsync {
    map: HashMap<u64, StdWeak<u64>>,
    _values: Vec<Arc<u64>>,
}
impl ReadMap for Unsync {
    fn hit(&self, key: u64) -> bool {
        self.map.get(&key).and_then(StdWeak::upgrade).is_some()
    }
}

/// A `scc::HashIndex` of `keys` live values, grown from empty.
fn scc_index(keys: u64) -> SccIndex {
    let values: Vec<_> = (0..keys).map(Arc::new).collect();
    let map = scc::HashIndex::with_capacity(keys as usize);
    for v in &values {
        let _ = map.insert_sync(**v, Arc::downgrade(v));
    }
    SccIndex {
        map,
        _values: values,
    }
}

fn std_values() -> Vec<Arc<u64>> {
    (0..KEYS).map(Arc::new).collect()
}

fn build_all() -> Vec<(&'static str, Box<dyn ReadMap>)> {
    let ours = {
        let values: Vec<_> = (0..KEYS).map(weakrefs::Strong::new).collect();
        let map = weakrefs::WeakValueMap::with_capacity(KEYS as usize);
        for v in &values {
            map.insert(**v, v);
        }
        Ours {
            map,
            _values: values,
        }
    };
    let dash = {
        let values = std_values();
        let map = DashMap::with_capacity(KEYS as usize);
        for v in &values {
            map.insert(**v, Arc::downgrade(v));
        }
        Dash {
            map,
            _values: values,
        }
    };
    let locked = {
        let values = std_values();
        let map = values.iter().map(|v| (**v, Arc::downgrade(v))).collect();
        Locked {
            map: RwLock::new(map),
            _values: values,
        }
    };
    let weak_table = {
        let values = std_values();
        let mut map = weak_table::WeakValueHashMap::with_capacity(KEYS as usize);
        for v in &values {
            map.insert(**v, v.clone());
        }
        WeakTable {
            map: RwLock::new(map),
            _values: values,
        }
    };
    let papaya = {
        let values = std_values();
        let map = papaya::HashMap::with_capacity(KEYS as usize);
        {
            let pinned = map.pin();
            for v in &values {
                pinned.insert(**v, Arc::downgrade(v));
            }
        }
        Papaya {
            map,
            _values: values,
        }
    };
    let scc_map = {
        let values = std_values();
        let map = scc::HashMap::with_capacity(KEYS as usize);
        for v in &values {
            let _ = map.insert_sync(**v, Arc::downgrade(v));
        }
        SccMap {
            map,
            _values: values,
        }
    };
    let unsync = {
        let values = std_values();
        let map = values.iter().map(|v| (**v, Arc::downgrade(v))).collect();
        Unsync {
            map,
            _values: values,
        }
    };
    vec![
        ("weakrefs", Box::new(ours) as Box<dyn ReadMap>),
        ("dashmap", Box::new(dash)),
        ("rwlock_hashmap", Box::new(locked)),
        ("rwlock_weak_table", Box::new(weak_table)),
        ("papaya", Box::new(papaya)),
        ("scc_hash_index", Box::new(scc_index(KEYS))),
        ("scc_hash_map", Box::new(scc_map)),
        ("std_hashmap_unsync", Box::new(unsync)),
    ]
}

/// `iters` read hits on each of `threads` threads, keys below `keys`.
fn reads_on_threads(
    map: &dyn ReadMap,
    keys: u64,
    skewed: bool,
    threads: usize,
    iters: u64,
) -> Duration {
    on_threads(threads, |t| {
        let mut stream = KeyStream::new(keys, skewed, t);
        for _ in 0..iters {
            assert!(map.hit(black_box(stream.next())));
        }
    })
}

fn read_hits(c: &mut Criterion) {
    let maps = build_all();
    for (distribution, skewed) in [("uniform", false), ("skewed", true)] {
        for threads in thread_counts() {
            let mut group = c.benchmark_group(format!("read_hit/{distribution}/{threads}_thread"));
            group.throughput(Throughput::Elements(threads as u64));
            for (name, map) in &maps {
                group.bench_function(*name, |b| {
                    b.iter_custom(|iters| {
                        reads_on_threads(map.as_ref(), KEYS, skewed, threads, iters)
                    })
                });
            }
            group.finish();
        }
    }
}

/// Read hits on one thread as the map grows from cache-resident to
/// memory-bound: this crate against `DashMap`, uniform keys, at 1 000 to
/// 1 000 000 live keys. Where both fit in cache the per-read work decides;
/// beyond, each map's footprint does.
fn read_hits_by_size(c: &mut Criterion) {
    for keys in [1_000u64, 10_000, 100_000, 1_000_000] {
        let ours_values: Vec<_> = (0..keys).map(weakrefs::Strong::new).collect();
        let ours = weakrefs::WeakValueMap::with_capacity(keys as usize);
        for v in &ours_values {
            ours.insert(**v, v);
        }
        let dash_values: Vec<_> = (0..keys).map(Arc::new).collect();
        let dash = DashMap::with_capacity(keys as usize);
        for v in &dash_values {
            dash.insert(**v, Arc::downgrade(v));
        }
        let maps: [(&str, Box<dyn ReadMap>); 3] = [
            (
                "weakrefs",
                Box::new(Ours {
                    map: ours,
                    _values: ours_values,
                }),
            ),
            (
                "dashmap",
                Box::new(Dash {
                    map: dash,
                    _values: dash_values,
                }),
            ),
            ("scc_hash_index", Box::new(scc_index(keys))),
        ];
        let mut group = c.benchmark_group(format!("read_hit_by_size/{keys}_keys"));
        group.throughput(Throughput::Elements(1));
        for (name, map) in &maps {
            group.bench_function(*name, |b| {
                b.iter_custom(|iters| reads_on_threads(map.as_ref(), keys, false, 1, iters))
            });
        }
        group.finish();
    }
}

/// What the map's options cost its reads: uniform read hits on a map with
/// a keep-warm tier as large as the key set (every hit lands on a held,
/// marked value) and a tenth of it (most hits land on values the tier
/// does not hold, of which one in 64 tries to enter), against the same
/// map without a tier; and on a map that counts its statistics (the
/// default) against one built with `record_stats(false)`. Each case's
/// `weakrefs` row is the map with the option, its `without` row the map
/// without it, measured in the same run.
fn read_costs(c: &mut Criterion) {
    fn filled(
        map: weakrefs::WeakValueMap<u64, u64>,
        values: &[weakrefs::Strong<u64>],
    ) -> Box<dyn ReadMap> {
        for v in values {
            map.insert(**v, v);
        }
        Box::new(Ours {
            map,
            _values: values.to_vec(),
        })
    }
    for keys in [1_000u64, 100_000] {
        let values: Vec<_> = (0..keys).map(weakrefs::Strong::new).collect();
        let tier = |kept: u64| {
            weakrefs::WeakValueMap::builder()
                .keep_recent(kept as usize)
                .build()
        };
        let cases: [(&str, [Box<dyn ReadMap>; 2]); 3] = [
            (
                "keep_recent_all",
                [
                    filled(tier(keys), &values),
                    filled(weakrefs::WeakValueMap::new(), &values),
                ],
            ),
            (
                "keep_recent_tenth",
                [
                    filled(tier(keys / 10), &values),
                    filled(weakrefs::WeakValueMap::new(), &values),
                ],
            ),
            (
                "stats",
                [
                    filled(weakrefs::WeakValueMap::new(), &values),
                    filled(
                        weakrefs::WeakValueMap::builder()
                            .record_stats(false)
                            .build(),
                        &values,
                    ),
                ],
            ),
        ];
        for (option, maps) in &cases {
            // Warm: a tier's marks are stamped and its positions given out,
            // as in a map that has been read for a while.
            for map in maps {
                for key in 0..keys {
                    assert!(map.hit(key));
                }
            }
            for threads in thread_counts() {
                let mut group =
                    c.benchmark_group(format!("read_cost/{option}/{keys}_keys/{threads}_thread"));
                group.throughput(Throughput::Elements(threads as u64));
                for (name, map) in ["weakrefs", "without"].iter().zip(maps) {
                    group.bench_function(*name, |b| {
                        b.iter_custom(|iters| {
                            reads_on_threads(map.as_ref(), keys, false, threads, iters)
                        })
                    });
                }
                group.finish();
            }
        }
    }
}

/// Insert a fresh value, then drop it, in batches of 1024: under one of
/// 1024 keys, the `n`th value under key `n % 1024`, with `u64` keys and
/// with `String` keys (each insert clones one of 1024 prepared strings, on
/// every side), the common cache key; and under a `u64` key never used
/// before (session or request ids), where what a sweep has not removed
/// yet accumulates. The baselines run `retain` after every batch
/// (`dashmap_retain`, `rwlock_weak_table`) and, separately, after every
/// 64 batches (`dashmap_retain_64k`: 65 536 inserts).
fn churn(c: &mut Criterion) {
    churn_with(c, "churn/u64_keys", |n| n % BATCH);
    let names: Vec<String> = (0..BATCH).map(|i| format!("/objects/{i:04}")).collect();
    churn_with(c, "churn/string_keys", |n| {
        names[(n % BATCH) as usize].clone()
    });
    churn_with(c, "churn/fresh_u64_keys", |n| n);
}

/// Values a churn batch inserts, each dying at once.
const BATCH: u64 = 1024;

/// One churn group: the `n`th insert into each map (counted across
/// batches) goes under `key(n)`.
fn churn_with<K>(c: &mut Criterion, group: &str, key: impl Fn(u64) -> K)
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    let mut group: BenchmarkGroup<'_, WallTime> = c.benchmark_group(group);
    group.throughput(Throughput::Elements(BATCH));
    let ours: weakrefs::WeakValueMap<K, u64> = weakrefs::WeakValueMap::new();
    let mut next = 0;
    group.bench_function("weakrefs", |b| {
        b.iter(|| {
            for n in next..next + BATCH {
                let value = weakrefs::Strong::new(n);
                ours.insert(key(n), &value);
            }
            next += BATCH;
            weakrefs::flush();
        })
    });
    assert_eq!(ours.len(), 0, "dead entries left after flush");
    for (name, sweep_every) in [
        ("dashmap_retain", BATCH),
        ("dashmap_retain_64k", 64 * BATCH),
    ] {
        let dash: DashMap<K, StdWeak<u64>> = DashMap::new();
        let mut next = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                for n in next..next + BATCH {
                    let value = Arc::new(n);
                    dash.insert(key(n), Arc::downgrade(&value));
                }
                next += BATCH;
                if next % sweep_every == 0 {
                    dash.retain(|_, weak| weak.strong_count() > 0);
                }
            })
        });
    }
    let table: RwLock<weak_table::WeakValueHashMap<K, StdWeak<u64>>> = RwLock::default();
    let mut next = 0;
    group.bench_function("rwlock_weak_table", |b| {
        b.iter(|| {
            for n in next..next + BATCH {
                let value = Arc::new(n);
                table.write().unwrap().insert(key(n), value);
            }
            next += BATCH;
            table.write().unwrap().remove_expired();
        })
    });
    group.finish();
}

/// Every thread asking for one hot key through a get-or-insert API, where
/// the value stays alive: `get_or_insert_with` against two ways to write it
/// on `DashMap<u64, std::sync::Weak<u64>>`: `entry` on every call
/// (`dashmap_entry`), and a read first with `entry` only on a miss
/// (`dashmap_get_then_entry`), each upgrading the value and rebuilding it
/// if dead. At each thread count of two or more.
fn single_flight(c: &mut Criterion) {
    let ours: weakrefs::WeakValueMap<u64, u64> = weakrefs::WeakValueMap::new();
    let held = ours.get_or_insert_with(7, || 7);
    let dash: DashMap<u64, StdWeak<u64>> = DashMap::new();
    let dash_held = dash_entry(&dash, 7);
    for threads in thread_counts().into_iter().filter(|&threads| threads >= 2) {
        let mut group = c.benchmark_group(format!("single_flight_hot_key/{threads}_thread"));
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function("weakrefs", |b| {
            b.iter_custom(|iters| {
                on_each_thread(threads, iters, || {
                    black_box(ours.get_or_insert_with(black_box(7), || 7));
                })
            })
        });
        group.bench_function("dashmap_entry", |b| {
            b.iter_custom(|iters| {
                on_each_thread(threads, iters, || {
                    black_box(dash_entry(&dash, black_box(7)));
                })
            })
        });
        group.bench_function("dashmap_get_then_entry", |b| {
            b.iter_custom(|iters| {
                on_each_thread(threads, iters, || {
                    let key = black_box(7);
                    let value = dash.get(&key).and_then(|weak| weak.upgrade());
                    black_box(value.unwrap_or_else(|| dash_entry(&dash, key)));
                })
            })
        });
        group.finish();
    }
    drop((held, dash_held));
}

/// `key`'s live value in `dash`, built under the shard's write lock if
/// absent or dead: DashMap's single flight.
fn dash_entry(dash: &DashMap<u64, StdWeak<u64>>, key: u64) -> Arc<u64> {
    let mut slot = dash.entry(key).or_default();
    if let Some(value) = slot.upgrade() {
        return value;
    }
    let value = Arc::new(key);
    *slot = Arc::downgrade(&value);
    value
}

/// Runs `op` `iters` times on each of `threads` threads.
fn on_each_thread(threads: usize, iters: u64, op: impl Fn() + Sync) -> Duration {
    on_threads(threads, |_| {
        for _ in 0..iters {
            op();
        }
    })
}

criterion_group!(
    benches,
    read_hits,
    read_hits_by_size,
    read_costs,
    churn,
    single_flight
);
criterion_main!(benches);
