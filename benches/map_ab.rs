//! `WeakValueMap` against every peer, A/B interleaved: the ratios that
//! decide whether the map keeps up, robust to a noisy shared machine.
//!
//! Each round runs every contender once, back to back, in an order that
//! rotates from round to round; each worker thread times itself. A ratio
//! is this crate's throughput over a peer's in the same round, and the
//! report gives the median over the rounds (`WEAKREFS_AB_ROUNDS`, 7 by
//! default), so a burst of noise from a neighbour moves one round, not the
//! figure.
//!
//! Cases:
//!
//! * `read` at 1 000 and 100 000 live keys, uniform, on each thread count
//!   of `WEAKREFS_BENCH_THREADS` (1 and 2 by default): `get` plus upgrade,
//!   every read a hit. The peers hold `std::sync::Weak`: `DashMap`,
//!   `scc::HashIndex`, `scc::HashMap`, `papaya::HashMap`, and on one
//!   thread an unsynchronised `std::collections::HashMap` (the floor).
//! * `key_map_with` at 100 000 live keys, on each thread count:
//!   `WeakKeyMap::with` reading a `u64` out of the value, against
//!   `DashMap<usize, u64>` keyed by the object's address (the hand-rolled
//!   side table), and two controls for the pointer a `WeakKeyMap` lookup
//!   follows to its entry's node: the same map with each value boxed, and
//!   with each value a reference into one dense, shuffled array of
//!   16-byte records.
//! * `keep_recent` at 1 000 and 100 000 live keys, on each thread count:
//!   `get` plus upgrade on a map with a keep-warm tier against the same
//!   map without one (the tier's cost on reads), with a tier as large as
//!   the key set (every hit lands on a held, marked value: the cost the
//!   tier promises to keep within 5%) and one a tenth of it (most hits
//!   admit their value and evict another, under locks).
//! * `stats` at 1 000 and 100 000 live keys, on each thread count: `get`
//!   plus upgrade on a map that counts its statistics (the default)
//!   against the same map built with `record_stats(false)`.
//! * `churn`, one thread: insert a fresh value under one of 1 024 keys, then
//!   drop it. This crate removes each dead entry at its death; `DashMap`
//!   sweeps with `retain` every 1 024 inserts and, separately, every
//!   65 536. `churn_string`: the same with `String` keys (each insert
//!   clones one of 1 024 prepared strings), the common cache key, whose
//!   removed copies are freed by the epoch like `u64` keys.
//!   `churn_fresh`: the same with a `u64` key never used before on every
//!   insert (session ids, request ids), where the dead entries a sweep
//!   leaves accumulate instead of being overwritten by the next insert of
//!   their key: between sweeps every 65 536 inserts, `DashMap` grows to
//!   65 536 entries, each keeping its dead value's allocation.
//!
//! * `set_notify` and `set_subscribe`, one thread: `WeakSet` as an observer
//!   registry against `Mutex<Vec<std::sync::Weak<T>>>`, as `benches/sets.rs`
//!   measures it: a notification pass over 1 000 live members, each
//!   upgraded (the list snapshots under its lock), and 1 000 members
//!   subscribing to a new set (each registering a death callback) or list.
//!
//! `cargo bench --bench map_ab`; the median ratios print as a table, and as
//! tab-separated rows in `map_ab.tsv` when `WEAKREFS_BENCH_OUT` names a
//! directory, each with the peer's role (see `role`) and the round count,
//! for `cargo bench-report`'s interleaved section. `--quick` runs three
//! rounds instead of seven. `WEAKREFS_AB_CASES=read,churn` (a
//! comma-separated list of case names: `read`, `key_map_with`,
//! `keep_recent`, `stats`, `churn`, `churn_string`, `churn_fresh`,
//! `set_notify`, `set_subscribe`) runs only those cases.

use std::collections::HashMap;
use std::hint::black_box;
use std::io::Write;
use std::sync::{Arc, Weak as StdWeak};
use std::time::Instant;

use dashmap::DashMap;

#[path = "support/keys.rs"]
mod keys;
#[path = "support/observers.rs"]
mod observers;
#[path = "support/out.rs"]
mod out;
#[path = "support/threads.rs"]
mod threads;
use keys::KeyStream;
use threads::{on_threads, thread_counts};

/// A map kind under test: `hit` returns whether the key held a live value
/// (after upgrading it, as a user would).
trait ReadMap: Sync {
    fn hit(&self, key: u64) -> bool;
}

struct Ours(weakrefs::WeakValueMap<u64, u64>);
impl ReadMap for Ours {
    fn hit(&self, key: u64) -> bool {
        self.0.get(&key).is_some()
    }
}

struct Dash(DashMap<u64, StdWeak<u64>>);
impl ReadMap for Dash {
    fn hit(&self, key: u64) -> bool {
        self.0.get(&key).and_then(|w| w.upgrade()).is_some()
    }
}

struct SccIndex(scc::HashIndex<u64, StdWeak<u64>>);
impl ReadMap for SccIndex {
    fn hit(&self, key: u64) -> bool {
        self.0
            .peek_with(&key, |_, w| w.upgrade())
            .flatten()
            .is_some()
    }
}

struct SccMap(scc::HashMap<u64, StdWeak<u64>>);
impl ReadMap for SccMap {
    fn hit(&self, key: u64) -> bool {
        self.0
            .read_sync(&key, |_, w| w.upgrade())
            .flatten()
            .is_some()
    }
}

struct Papaya(papaya::HashMap<u64, StdWeak<u64>>);
impl ReadMap for Papaya {
    fn hit(&self, key: u64) -> bool {
        self.0.pin().get(&key).and_then(StdWeak::upgrade).is_some()
    }
}

/// Unsynchronised: only ever read from one thread here (`Sync` because a
/// `HashMap` is, read-only).
struct Floor(HashMap<u64, StdWeak<u64>>);
impl ReadMap for Floor {
    fn hit(&self, key: u64) -> bool {
        self.0.get(&key).and_then(StdWeak::upgrade).is_some()
    }
}

/// Every contender at `keys` live keys, grown from empty; the values they
/// name live in the returned vectors.
#[allow(clippy::type_complexity)]
fn contenders(
    keys: u64,
    with_floor: bool,
) -> (
    Vec<(&'static str, Box<dyn ReadMap>)>,
    Vec<weakrefs::Strong<u64>>,
    Vec<Arc<u64>>,
) {
    let strong: Vec<_> = (0..keys).map(weakrefs::Strong::new).collect();
    let arcs: Vec<_> = (0..keys).map(Arc::new).collect();
    let weak = |i: usize| Arc::downgrade(&arcs[i]);
    let ours = weakrefs::WeakValueMap::new();
    for v in &strong {
        ours.insert(**v, v);
    }
    let dash = DashMap::new();
    let index = scc::HashIndex::new();
    let scc_map = scc::HashMap::new();
    let papaya = papaya::HashMap::new();
    let mut floor = HashMap::new();
    for i in 0..keys as usize {
        dash.insert(i as u64, weak(i));
        let _ = index.insert_sync(i as u64, weak(i));
        let _ = scc_map.insert_sync(i as u64, weak(i));
        papaya.pin().insert(i as u64, weak(i));
        floor.insert(i as u64, weak(i));
    }
    let mut maps: Vec<(&'static str, Box<dyn ReadMap>)> = vec![
        ("weakrefs", Box::new(Ours(ours))),
        ("dashmap", Box::new(Dash(dash))),
        ("scc_hash_index", Box::new(SccIndex(index))),
        ("scc_hash_map", Box::new(SccMap(scc_map))),
        ("papaya", Box::new(Papaya(papaya))),
    ];
    if with_floor {
        maps.push(("std_hashmap_unsync", Box::new(Floor(floor))));
    }
    (maps, strong, arcs)
}

/// Reads per worker and run: long enough to dwarf thread start-up, short
/// enough for seven rounds of every contender.
const READS: u64 = 1 << 21;

/// Operations per second of `READS` hits on each of `threads` threads.
fn read_rate(map: &dyn ReadMap, keys: u64, threads: usize) -> f64 {
    let span = on_threads(threads, |t| {
        let mut stream = KeyStream::new(keys, false, t);
        for _ in 0..READS {
            assert!(map.hit(black_box(stream.next())));
        }
    });
    (READS * threads as u64) as f64 / span.as_secs_f64()
}

/// Runs every contender once per round, rotating the order; returns each
/// contender's rate per round.
fn interleaved(names: usize, rounds: usize, mut run: impl FnMut(usize) -> f64) -> Vec<Vec<f64>> {
    let mut rates = vec![Vec::with_capacity(rounds); names];
    for round in 0..rounds {
        for offset in 0..names {
            let which = (round + offset) % names;
            // Start from a quiet process: the work an earlier case left
            // the finalizer thread (dropping its maps' entries) would
            // otherwise compete with the first runs of this one.
            weakrefs::flush();
            rates[which].push(run(which));
        }
    }
    rates
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// One printed row: a case, a peer, the median of this crate's rates, the
/// peer's, and the median of the per-round ratios.
struct Row {
    case: String,
    peer: &'static str,
    ours: f64,
    theirs: f64,
    ratio: f64,
}

/// What a peer is to the ratio against it, as the report reads it: an
/// `alternative` a user would pick instead (a case is judged against the
/// fastest of them), the unsynchronised `floor` (shown, never an
/// alternative), a `control` (a peer with one cost added, to show where a
/// gap comes from), or this crate's same map `without` the option the case
/// measures (the option's cost).
fn role(peer: &str) -> &'static str {
    match peer {
        "std_hashmap_unsync" => "floor",
        "dashmap_boxed_value" | "dashmap_dense_records" => "control",
        "weakrefs_plain" | "weakrefs_no_stats" => "without",
        _ => "alternative",
    }
}

/// The rows for one case: contender 0 is this crate.
fn rows(case: &str, names: &[&'static str], rates: &[Vec<f64>]) -> Vec<Row> {
    (1..names.len())
        .map(|peer| Row {
            case: case.to_string(),
            peer: names[peer],
            ours: median(rates[0].clone()),
            theirs: median(rates[peer].clone()),
            ratio: median(
                rates[0]
                    .iter()
                    .zip(&rates[peer])
                    .map(|(ours, theirs)| ours / theirs)
                    .collect(),
            ),
        })
        .collect()
}

/// `WeakValueMap` reads with a keep-warm tier of `kept` values against the
/// same reads without one.
fn keep_recent_case(rounds: usize, keys: u64, kept: usize, threads: usize) -> Vec<Row> {
    let case = format!("keep_recent_{kept}/{keys}_keys/{threads}_thread");
    let tiered = weakrefs::WeakValueMap::builder().keep_recent(kept).build();
    let plain = weakrefs::WeakValueMap::new();
    let maps = [("weakrefs_keep_recent", tiered), ("weakrefs_plain", plain)];
    variant_case(&case, maps, rounds, keys, threads)
}

/// `WeakValueMap` reads with its statistics counted against the same reads
/// without.
fn stats_case(rounds: usize, keys: u64, threads: usize) -> Vec<Row> {
    let case = format!("stats/{keys}_keys/{threads}_thread");
    let silent = weakrefs::WeakValueMap::builder()
        .record_stats(false)
        .build();
    let counting = weakrefs::WeakValueMap::new();
    let maps = [("weakrefs_stats", counting), ("weakrefs_no_stats", silent)];
    variant_case(&case, maps, rounds, keys, threads)
}

/// Reads on one configuration of `WeakValueMap` (the first) against
/// another, both holding the same `keys` values.
fn variant_case(
    case: &str,
    maps: [(&'static str, weakrefs::WeakValueMap<u64, u64>); 2],
    rounds: usize,
    keys: u64,
    threads: usize,
) -> Vec<Row> {
    let values: Vec<_> = (0..keys).map(weakrefs::Strong::new).collect();
    for (_, map) in &maps {
        for v in &values {
            map.insert(**v, v);
        }
    }
    let names = maps.each_ref().map(|(name, _)| *name);
    let maps = maps.map(|(_, map)| Ours(map));
    let rates = interleaved(names.len(), rounds, |which| {
        read_rate(&maps[which], keys, threads)
    });
    drop(values);
    rows(case, &names, &rates)
}

/// Churn: `OPS` inserts of a fresh value that dies at once, the `i`th
/// under `key(i)`.
const CHURN_OPS: u64 = 1 << 17;

fn churn_ours<K>(map: &weakrefs::WeakValueMap<K, u64>, key: impl Fn(u64) -> K) -> f64
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    let began = Instant::now();
    for i in 0..CHURN_OPS {
        let value = weakrefs::Strong::new(i);
        map.insert(key(i), &value);
    }
    weakrefs::flush();
    let rate = CHURN_OPS as f64 / began.elapsed().as_secs_f64();
    assert_eq!(map.len(), 0, "dead entries left after flush");
    rate
}

fn churn_dash<K>(map: &DashMap<K, StdWeak<u64>>, sweep_every: u64, key: impl Fn(u64) -> K) -> f64
where
    K: std::hash::Hash + Eq + Clone,
{
    let began = Instant::now();
    for i in 0..CHURN_OPS {
        let value = Arc::new(i);
        map.insert(key(i), Arc::downgrade(&value));
        if (i + 1) % sweep_every == 0 {
            map.retain(|_, weak| weak.strong_count() > 0);
        }
    }
    map.retain(|_, weak| weak.strong_count() > 0);
    CHURN_OPS as f64 / began.elapsed().as_secs_f64()
}

/// One churn case: this crate against `DashMap` swept every 1 024 and
/// every 65 536 inserts, each with a map of its own. Insert `n` of a map
/// (counted across its runs) goes under `key(n)`: runs continue the count,
/// so keys that `key` never repeats stay new to every map.
fn churn_case<K>(case: &str, rounds: usize, key: impl Fn(u64) -> K) -> Vec<Row>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    let ours = weakrefs::WeakValueMap::new();
    let dash = [DashMap::new(), DashMap::new()];
    let mut next = 0;
    let names = ["weakrefs", "dashmap_retain_1024", "dashmap_retain_65536"];
    let rates = interleaved(names.len(), rounds, |which| {
        let base = next;
        next += CHURN_OPS;
        let key = |i| key(base + i);
        match which {
            0 => churn_ours(&ours, key),
            1 => churn_dash(&dash[0], 1024, key),
            _ => churn_dash(&dash[1], 65_536, key),
        }
    });
    rows(case, &names, &rates)
}

/// `WeakKeyMap::with` against a `DashMap` side table keyed by address.
fn key_map_case(rounds: usize, threads: usize) -> Vec<Row> {
    const KEYS: usize = 100_000;
    let ours_keys: Vec<weakrefs::Strong<u64>> =
        (0..KEYS as u64).map(weakrefs::Strong::new).collect();
    let their_keys: Vec<Arc<u64>> = (0..KEYS as u64).map(Arc::new).collect();
    let ours = weakrefs::WeakKeyMap::new();
    for key in &ours_keys {
        ours.insert(key, **key);
    }
    let dash: DashMap<usize, u64> = DashMap::new();
    for key in &their_keys {
        dash.insert(Arc::as_ptr(key) as usize, **key);
    }
    // The controls: values boxed, one pointer more a lookup, as
    // `WeakKeyMap` keeps them (see `benches/key_maps.rs`); and the same
    // pointer into one dense array of 16-byte records in shuffled order,
    // as an arena of values that never move would pack them: whether
    // the pointer costs, or the scattered memory it leads to.
    let boxed: DashMap<usize, Box<u64>> = DashMap::new();
    for key in &their_keys {
        boxed.insert(Arc::as_ptr(key) as usize, Box::new(**key));
    }
    let mut records: Vec<[u64; 2]> = (0..KEYS as u64).map(|key| [key, key]).collect();
    let mut shuffle = KeyStream::new(KEYS as u64, false, 1000);
    for i in (1..KEYS).rev() {
        // Not uniform (a draw below `KEYS`, folded), which a layout need not be.
        records.swap(i, shuffle.next() as usize % (i + 1));
    }
    let dense: DashMap<usize, &[u64; 2]> = DashMap::new();
    for record in &records {
        dense.insert(
            Arc::as_ptr(&their_keys[record[0] as usize]) as usize,
            record,
        );
    }
    let run = |look: &(dyn Fn(usize) -> u64 + Sync)| {
        let span = on_threads(threads, |t| {
            let mut stream = KeyStream::new(KEYS as u64, false, t);
            for _ in 0..READS {
                let key = stream.next() as usize;
                assert_eq!(look(black_box(key)), key as u64);
            }
        });
        (READS * threads as u64) as f64 / span.as_secs_f64()
    };
    let names = [
        "weakrefs",
        "dashmap_by_address",
        "dashmap_boxed_value",
        "dashmap_dense_records",
    ];
    let rates = interleaved(names.len(), rounds, |which| match which {
        0 => run(&|i| ours.with(&ours_keys[i], |v| *v).expect("present")),
        1 => run(&|i| {
            *dash
                .get(&(Arc::as_ptr(&their_keys[i]) as usize))
                .expect("present")
        }),
        2 => run(&|i| {
            **boxed
                .get(&(Arc::as_ptr(&their_keys[i]) as usize))
                .expect("present")
        }),
        _ => run(&|i| {
            dense
                .get(&(Arc::as_ptr(&their_keys[i]) as usize))
                .expect("present")[1]
        }),
    });
    rows(
        &format!("key_map_with/{KEYS}_keys/{threads}_thread"),
        &names,
        &rates,
    )
}

/// Members of the `WeakSet` cases, as in `benches/sets.rs`.
const MEMBERS: usize = 1000;

/// The members of the `WeakSet` cases: this crate's and the list's.
fn set_members() -> (Vec<weakrefs::Strong<usize>>, Vec<Arc<usize>>) {
    (
        (0..MEMBERS).map(weakrefs::Strong::new).collect(),
        (0..MEMBERS).map(Arc::new).collect(),
    )
}

/// Members per second of `passes` runs of `pass` over `MEMBERS` members.
fn members_rate(passes: usize, mut pass: impl FnMut()) -> f64 {
    let began = Instant::now();
    for _ in 0..passes {
        pass();
    }
    (passes * MEMBERS) as f64 / began.elapsed().as_secs_f64()
}

/// `WeakSet` notify against `Mutex<Vec<Weak>>`, one thread: a pass over
/// `MEMBERS` live members, each upgraded (the list snapshots under its
/// lock, then notifies outside it, as observer lists do).
fn set_notify_case(rounds: usize) -> Vec<Row> {
    let (ours, theirs) = set_members();
    let set = observers::subscribe_set(&ours);
    let list = observers::subscribe_list(&theirs);
    let names = ["weakrefs", "mutex_vec"];
    let rates = interleaved(names.len(), rounds, |which| {
        members_rate(2048, || {
            let sum = if which == 0 {
                observers::notify_set(&set)
            } else {
                observers::notify_list(&list)
            };
            assert_eq!(sum, MEMBERS * (MEMBERS - 1) / 2);
        })
    });
    rows(
        &format!("set_notify/{MEMBERS}_members/1_thread"),
        &names,
        &rates,
    )
}

/// `WeakSet` subscribe against `Mutex<Vec<Weak>>`, one thread: `MEMBERS`
/// members subscribing to a new set (each registering a death callback)
/// or list (each pushed under the lock), which is then dropped.
fn set_subscribe_case(rounds: usize) -> Vec<Row> {
    let (ours, theirs) = set_members();
    let names = ["weakrefs", "mutex_vec"];
    let rates = interleaved(names.len(), rounds, |which| {
        members_rate(128, || {
            if which == 0 {
                let set = observers::subscribe_set(&ours);
                assert_eq!(black_box(set).len(), MEMBERS);
            } else {
                let list = observers::subscribe_list(&theirs);
                assert_eq!(black_box(list).into_inner().unwrap().len(), MEMBERS);
            }
        })
    });
    rows(
        &format!("set_subscribe/{MEMBERS}_members/1_thread"),
        &names,
        &rates,
    )
}

fn main() {
    // `cargo bench` passes `--bench`; a test run (`cargo test --benches`)
    // does not, and gets one quick round. `--quick` (from `cargo
    // bench-report --quick`) asks for three.
    let benching = std::env::args().any(|arg| arg == "--bench");
    let quick = std::env::args().any(|arg| arg == "--quick");
    let rounds = match std::env::var("WEAKREFS_AB_ROUNDS") {
        Ok(count) => count
            .parse()
            .unwrap_or_else(|_| panic!("WEAKREFS_AB_ROUNDS: {count:?} is not a count")),
        Err(_) if benching && !quick => 7,
        Err(_) if benching => 3,
        Err(_) => 1,
    };
    let cases = std::env::var("WEAKREFS_AB_CASES").ok();
    let wanted = |case: &str| {
        (cases.as_deref()).is_none_or(|list| list.split(',').any(|name| name.trim() == case))
    };
    // The thread counts to run `case` at: none if it was not asked for.
    let threads_for = |case: &str| {
        if wanted(case) {
            thread_counts()
        } else {
            Vec::new()
        }
    };
    let mut table = Vec::new();
    for keys in [1_000u64, 100_000] {
        for threads in threads_for("read") {
            let (maps, _strong, _arcs) = contenders(keys, threads == 1);
            let names: Vec<_> = maps.iter().map(|(name, _)| *name).collect();
            let rates = interleaved(maps.len(), rounds, |which| {
                read_rate(maps[which].1.as_ref(), keys, threads)
            });
            table.extend(rows(
                &format!("read/{keys}_keys/{threads}_thread"),
                &names,
                &rates,
            ));
        }
    }
    for threads in threads_for("key_map_with") {
        table.extend(key_map_case(rounds, threads));
    }
    for keys in [1_000u64, 100_000] {
        for threads in threads_for("keep_recent") {
            for kept in [keys as usize, keys as usize / 10] {
                table.extend(keep_recent_case(rounds, keys, kept, threads));
            }
        }
    }
    for keys in [1_000u64, 100_000] {
        for threads in threads_for("stats") {
            table.extend(stats_case(rounds, keys, threads));
        }
    }
    if wanted("churn") {
        table.extend(churn_case("churn/1_thread", rounds, |n| n % 1024));
    }
    if wanted("churn_fresh") {
        table.extend(churn_case("churn_fresh/1_thread", rounds, |n| n));
    }
    if wanted("churn_string") {
        let keys: Vec<String> = (0..1024).map(|i| format!("/objects/{i:04}")).collect();
        table.extend(churn_case("churn_string/1_thread", rounds, |n| {
            keys[(n % 1024) as usize].clone()
        }));
    }
    if wanted("set_notify") {
        table.extend(set_notify_case(rounds));
    }
    if wanted("set_subscribe") {
        table.extend(set_subscribe_case(rounds));
    }

    println!(
        "{:<36} {:<22} {:>12} {:>12} {:>8}",
        "case", "peer", "ours M/s", "peer M/s", "ratio"
    );
    for row in &table {
        println!(
            "{:<36} {:<22} {:>12.2} {:>12.2} {:>8.2}",
            row.case,
            row.peer,
            row.ours / 1e6,
            row.theirs / 1e6,
            row.ratio
        );
    }
    if let Some(mut out) = out::tsv(
        "map_ab.tsv",
        "case\tpeer\trole\tours\ttheirs\tratio\trounds",
    ) {
        for row in &table {
            writeln!(
                out,
                "{}\t{}\t{}\t{}\t{}\t{}\t{rounds}",
                row.case,
                row.peer,
                role(row.peer),
                row.ours,
                row.theirs,
                row.ratio
            )
            .expect("write map_ab.tsv");
        }
    }
}
