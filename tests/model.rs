//! Each collection against a model: long runs of random operations, every
//! result compared with what a `HashMap` of the live entries says it must
//! be. A small key space makes the tables reuse slots, grow, shrink and
//! rebuild over and over, with entries dying between the writes, as a
//! cache's do; the keys and values count their instances, so that any one
//! dropped twice, or never, shows at the end. Each collection runs on one
//! thread, and on several at once, each on keys of its own in the same
//! shards, so that every thread's entries move under the others' rebuilds
//! and land in slots the others' dead entries left.
//!
//! Each thread's operations come from a fixed seed, and a `WeakValueMap`'s
//! keys hash with a fixed hasher, so a failure of a one-thread run there
//! names the step that reproduces it; `WeakKeyMap` and `WeakSet` file
//! objects by address, which each run allocates anew.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use weakrefs::{flush, RemovalCause, Strong, Weak, WeakKeyMap, WeakSet, WeakValueMap};

#[path = "support/settle.rs"]
mod settle;

/// Operations a run makes (fewer under Miri, which runs them a thousand
/// times slower).
const STEPS: usize = if cfg!(miri) { 200 } else { 20_000 };

/// Distinct keys a run uses: few, so that every key comes back often, and
/// enough that a shard's table has groups past the first to probe (fewer
/// under Miri, so that its short runs come back to keys too).
const KEYS: u64 = if cfg!(miri) { 24 } else { 200 };

/// Threads of the runs that share a map (fewer under Miri, which runs
/// one at a time).
const THREADS: u64 = if cfg!(miri) { 2 } else { 4 };

/// Steps between full checks (length, iteration, nothing dead left).
const CHECK_EVERY: usize = 97;

/// Waits until no instance `live` counts is left, then checks that none
/// was dropped twice: removed entries' keys and values are dropped once no
/// reader can see them, which the epoch decides as every thread of the
/// binary pins and unpins (`settle::until`).
fn settle_to_zero(live: &AtomicI64, what: &str) {
    settle::until(|| live.load(Ordering::SeqCst) <= 0, flush);
    let live = live.load(Ordering::SeqCst);
    assert_eq!(
        live, 0,
        "{what} leaked (above zero) or dropped twice (below)"
    );
}

/// A xorshift generator: the same operations on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A number that counts its live instances in `live`: made, cloned and
/// dropped, so that a count other than zero once everything is dropped
/// means one was leaked (above) or dropped twice (below).
struct Counted {
    n: u64,
    live: Arc<AtomicI64>,
}

impl Counted {
    fn new(n: u64, live: &Arc<AtomicI64>) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Counted {
            n,
            live: live.clone(),
        }
    }
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        Counted::new(self.n, &self.live)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PartialEq for Counted {
    fn eq(&self, other: &Self) -> bool {
        self.n == other.n
    }
}

impl Eq for Counted {}

impl Hash for Counted {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.n.hash(state);
    }
}

/// The address of the object a handle names.
fn address<T>(handle: &Strong<T>) -> usize {
    Strong::as_ptr(handle) as usize
}

/// The object a handle names, for comparing a result with the model's:
/// `None` for no value.
fn named<T>(handle: Option<&Strong<T>>) -> Option<usize> {
    handle.map(address)
}

/// How a `WeakValueMap` under test is built, and run.
#[derive(Clone, Copy)]
struct Build {
    /// With an `on_remove` listener, which also moves deaths' removals to
    /// the finalizer thread: dead entries linger until it runs.
    listen: bool,
    /// The keep-warm tier's bound: values the map keeps alive for a while
    /// after their last other handle goes.
    tier: usize,
    /// Threads running the model at once, each on keys of its own (the
    /// keys `t`, `t + threads`, `t + 2 * threads`, … of thread `t`), all
    /// in the same shards: each one's entries move under the others'
    /// rebuilds, and its slots are reused after theirs die.
    threads: u64,
}

/// The map under test.
type Map = WeakValueMap<Counted, Counted, BuildHasherDefault<DefaultHasher>>;

/// What the threads of one run share: the map, the live instances of
/// its keys and values, and what its listener heard of each thread's
/// keys.
struct Shared {
    map: Map,
    keys: Arc<AtomicI64>,
    values: Arc<AtomicI64>,
    heard: Arc<Vec<AtomicU64>>,
}

impl Shared {
    fn new(build: Build) -> Self {
        let heard: Arc<Vec<AtomicU64>> =
            Arc::new((0..build.threads).map(|_| AtomicU64::new(0)).collect());
        let mut builder = WeakValueMap::builder()
            .keep_recent(build.tier)
            .hasher(BuildHasherDefault::<DefaultHasher>::default());
        if build.listen {
            let heard = heard.clone();
            let threads = build.threads;
            builder = builder.on_remove(move |key: &Counted, _: RemovalCause| {
                heard[(key.n % threads) as usize].fetch_add(1, Ordering::SeqCst);
            });
        }
        Shared {
            map: builder.build(),
            keys: Arc::new(AtomicI64::new(0)),
            values: Arc::new(AtomicI64::new(0)),
            heard,
        }
    }
}

/// Runs `build` from `seed`: the model on each of its threads, then,
/// once the map is dropped, no key or value left or dropped twice.
fn weak_value_map_against_the_model(seed: u64, build: Build) {
    let shared = Shared::new(build);
    let ends: Vec<(u64, HashMap<u64, Weak<Counted>>)> = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..build.threads)
            .map(|thread| {
                let shared = &shared;
                scope.spawn(move || weak_value_map_thread(shared, seed + thread, build, thread))
            })
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    });
    if build.listen {
        // Every entry that left was heard, once: checked here, where no
        // thread holds a value of another's any more (see
        // `weak_value_map_thread`).
        flush();
        for (thread, (mut left, mut entries)) in ends.into_iter().enumerate() {
            let before = entries.len();
            entries.retain(|_, entry| entry.upgrade().is_some());
            left += (before - entries.len()) as u64;
            let heard = shared.heard[thread].load(Ordering::SeqCst);
            assert_eq!(
                heard, left,
                "seed {seed:#x}, thread {thread}: entries heard leaving"
            );
        }
    }
    let Shared {
        map, keys, values, ..
    } = shared;
    drop(map);
    settle_to_zero(&keys, "keys");
    settle_to_zero(&values, "values");
}

/// `WeakValueMap`'s live entries are exactly the model's, after any of
/// its operations, with values that die at once, die later, or outlive
/// their entries; with a listener, every entry that leaves is heard once.
/// Thread `thread` of `build.threads` runs this on its own keys; what it
/// checks of the map's length and dead entries, which the other threads
/// change too, and its `clear`, it does only when it runs alone.
///
/// The model keeps the `Weak` of each key's latest value: what the map
/// must hold for the key is that value if it is alive, which a keep-warm
/// tier may keep it for a while after the run lets go of it, and so may
/// another thread's iteration (it upgrades every value it meets). So
/// what each comparison expects is worked out with the values held, and
/// what the listener heard is compared with what left, as the model has
/// it, only when no other thread can hold a value of this one's: along
/// the way when it runs alone, else once every thread is done. Returns
/// how many entries left the model, and its entries.
fn weak_value_map_thread(
    shared: &Shared,
    seed: u64,
    build: Build,
    thread: u64,
) -> (u64, HashMap<u64, Weak<Counted>>) {
    let Shared {
        map,
        keys,
        values,
        heard,
    } = shared;
    let heard = &heard[thread as usize];
    let alone = build.threads == 1;
    let mut rng = Rng(seed);
    // Each key's entry, by the model: its latest value, while no removal
    // took it out, alive or not.
    let mut entries: HashMap<u64, Weak<Counted>> = HashMap::new();
    // The handles the run holds to entries' values.
    let mut held: HashMap<u64, Strong<Counted>> = HashMap::new();
    // Values that outlive the entries they were in: the map must never
    // give them back.
    let mut former: Vec<Strong<Counted>> = Vec::new();
    // Entries that have left `entries`: every one is heard.
    let mut left = 0u64;
    let mut made = 0u64;
    let fresh = |made: &mut u64| {
        *made += 1;
        Strong::new(Counted::new(*made, values))
    };
    let live = |entries: &HashMap<u64, Weak<Counted>>, k: u64| entries.get(&k)?.upgrade();
    for step in 0..STEPS {
        let k = rng.below(KEYS) * build.threads + thread;
        let key = Counted::new(k, keys);
        let context = format!("seed {seed:#x}, step {step}, key {k}");
        // The handle the run held to the key's value, let go of or kept
        // as a former one, once the key's entry leaves or changes.
        let mut let_go = |held: &mut HashMap<u64, Strong<Counted>>, rng: &mut Rng| {
            if let Some(value) = held.remove(&k) {
                if rng.below(2) == 0 {
                    former.push(value);
                }
            }
        };
        match rng.below(14) {
            // Insert a value the run holds, or one that dies at once.
            0..=3 => {
                let value = fresh(&mut made);
                let expected = live(&entries, k);
                let old = map.insert(key, &value);
                assert_eq!(named(old.as_ref()), named(expected.as_ref()), "{context}");
                left += u64::from(entries.insert(k, Strong::downgrade(&value)).is_some());
                let_go(&mut held, &mut rng);
                if rng.below(4) != 0 {
                    held.insert(k, value);
                }
            }
            // The run lets go of the key's value.
            4 => {
                held.remove(&k);
            }
            5 => {
                let expected = live(&entries, k);
                let removed = map.remove(&key);
                assert_eq!(
                    named(removed.as_ref()),
                    named(expected.as_ref()),
                    "{context}"
                );
                left += u64::from(entries.remove(&k).is_some());
                let_go(&mut held, &mut rng);
            }
            6 => {
                let value = fresh(&mut made);
                let expected = live(&entries, k);
                match map.try_insert(key, &value) {
                    Ok(()) => {
                        assert!(expected.is_none(), "{context}: replaced a live value");
                        left += u64::from(entries.insert(k, Strong::downgrade(&value)).is_some());
                        let_go(&mut held, &mut rng);
                        held.insert(k, value);
                    }
                    Err(kept) => {
                        assert_eq!(named(Some(&kept)), named(expected.as_ref()), "{context}");
                    }
                }
            }
            7 => {
                let odd = |value: &Strong<Counted>| value.n % 2 == 1;
                let expected = live(&entries, k).filter(|value| odd(value));
                let removed = map.remove_if(&key, |_, value| odd(value));
                assert_eq!(
                    named(removed.as_ref()),
                    named(expected.as_ref()),
                    "{context}"
                );
                if expected.is_some() {
                    left += u64::from(entries.remove(&k).is_some());
                    let_go(&mut held, &mut rng);
                }
            }
            8 => {
                let expected = live(&entries, k);
                let mut ran = false;
                let got = map.get_or_insert_with(key, || {
                    ran = true;
                    made += 1;
                    Counted::new(made, values)
                });
                match expected {
                    Some(expected) => {
                        assert!(!ran, "{context}: loaded a live key");
                        assert!(Strong::ptr_eq(&got, &expected), "{context}");
                    }
                    None => {
                        assert!(ran, "{context}: found a value the key no longer has");
                        left += u64::from(entries.insert(k, Strong::downgrade(&got)).is_some());
                        let_go(&mut held, &mut rng);
                        held.insert(k, got);
                    }
                }
            }
            9 => {
                let keep = |key: u64, value: u64| (key + value) % 5 != 0;
                map.retain(|key, value| key.n % build.threads != thread || keep(key.n, value.n));
                // Dead entries go too.
                let before = entries.len();
                entries.retain(|&key, entry| entry.upgrade().is_some_and(|v| keep(key, v.n)));
                left += (before - entries.len()) as u64;
                held.retain(|key, _| entries.contains_key(key));
            }
            10 if alone && rng.below(20) == 0 => {
                map.clear();
                left += entries.len() as u64;
                entries.clear();
                held.clear();
            }
            10 => map.shrink_to_fit(),
            _ => {
                let got = map.get(&key);
                let expected = live(&entries, k);
                assert_eq!(named(got.as_ref()), named(expected.as_ref()), "{context}");
                assert_eq!(map.contains_key(&key), expected.is_some(), "{context}");
            }
        }
        if former.len() > 8 {
            former.swap_remove(rng.below(former.len() as u64) as usize);
        }
        if step % CHECK_EVERY == 0 {
            flush();
            if alone {
                // Every death's removal has run: nothing dead is left.
                assert_eq!(map.purge(), 0, "{context}: a dead entry was left");
            }
            // The live values, held while the map is read, so that none
            // dies between what the map shows and what the model expects.
            let before = entries.len();
            let mut live_values: Vec<(u64, Strong<Counted>)> = Vec::new();
            entries.retain(|&key, entry| match entry.upgrade() {
                Some(value) => {
                    live_values.push((key, value));
                    true
                }
                None => false,
            });
            left += (before - entries.len()) as u64;
            if alone {
                assert_eq!(map.len(), entries.len(), "{context}");
            }
            let mut seen: Vec<(u64, usize)> = map
                .iter()
                .filter(|(key, _)| key.n % build.threads == thread)
                .map(|(key, value)| (key.n, address(&value)))
                .collect();
            seen.sort_unstable();
            let mut expected: Vec<(u64, usize)> = live_values
                .iter()
                .map(|(key, value)| (*key, address(value)))
                .collect();
            expected.sort_unstable();
            assert_eq!(seen, expected, "{context}");
            if build.listen && alone {
                assert_eq!(heard.load(Ordering::SeqCst), left, "{context}");
            }
        }
    }
    (left, entries)
}

#[test]
fn a_weak_value_map_agrees_with_a_model_of_its_live_entries() {
    let build = Build {
        listen: false,
        tier: 0,
        threads: 1,
    };
    weak_value_map_against_the_model(0x9E37_79B9_7F4A_7C15, build);
}

#[test]
fn a_weak_value_map_that_hears_removals_agrees_with_the_model_and_hears_each_once() {
    let build = Build {
        listen: true,
        tier: 0,
        threads: 1,
    };
    weak_value_map_against_the_model(0xD1B5_4A32_D192_ED03, build);
}

#[test]
fn a_weak_value_map_with_a_keep_warm_tier_agrees_with_the_model() {
    let build = Build {
        listen: true,
        tier: 16,
        threads: 1,
    };
    weak_value_map_against_the_model(0x94D0_49BB_1331_11EB, build);
}

#[test]
fn threads_on_keys_of_their_own_each_agree_with_their_model_of_one_map() {
    let build = Build {
        listen: true,
        tier: 0,
        threads: THREADS,
    };
    weak_value_map_against_the_model(0xBF58_476D_1CE4_E5B9, build);
}

#[test]
fn threads_sharing_a_keep_warm_tier_each_agree_with_their_model_of_one_map() {
    let build = Build {
        listen: true,
        tier: 16,
        threads: THREADS,
    };
    weak_value_map_against_the_model(0x94D0_49BB_1331_11EB, build);
}

/// Runs `run(thread)` on each of `threads` threads at once.
fn on_threads(threads: u64, run: impl Fn(u64) + Sync) {
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let run = &run;
            scope.spawn(move || run(thread));
        }
    });
}

/// `WeakKeyMap`'s entries are exactly the model's, keys dying and coming
/// back as new objects; its values are each dropped once. Each of
/// `threads` threads runs the model on key objects of its own (object
/// `k` of thread `t` holds `k * threads + t`), in one map; what it checks
/// of the map's length and dead entries, and its `clear`, it does only
/// when it runs alone.
fn weak_key_map_against_the_model(seed: u64, threads: u64) {
    let values = Arc::new(AtomicI64::new(0));
    let map: WeakKeyMap<u64, Counted> = WeakKeyMap::new();
    let alone = threads == 1;
    let mine = |thread: u64| move |key: u64| key % threads == thread;
    on_threads(threads, |thread| {
        let mine = mine(thread);
        let mut rng = Rng(seed + thread);
        // The key objects, one a slot; a slot's object dies and is
        // replaced.
        let object = |k: u64| Strong::new(k * threads + thread);
        let mut objects: Vec<Strong<u64>> = (0..KEYS).map(object).collect();
        // The value each slot's current object maps to.
        let mut model: HashMap<u64, u64> = HashMap::new();
        let mut made = 0u64;
        for step in 0..STEPS {
            let k = rng.below(KEYS);
            let key = &objects[k as usize];
            let context = format!("seed {seed:#x}, thread {thread}, step {step}, key {k}");
            match rng.below(10) {
                0..=2 => {
                    made += 1;
                    let replaced = map.insert(key, Counted::new(made, &values));
                    assert_eq!(replaced, model.insert(k, made).is_some(), "{context}");
                }
                // The key dies; a new object takes its slot.
                3 => {
                    objects[k as usize] = object(k);
                    model.remove(&k);
                }
                4 => assert_eq!(map.remove(key), model.remove(&k).is_some(), "{context}"),
                5 => {
                    let got = map.get_or_insert_with(key, || {
                        made += 1;
                        Counted::new(made, &values)
                    });
                    let expected = *model.entry(k).or_insert(made);
                    assert_eq!(got.n, expected, "{context}");
                }
                6 => {
                    let keep = |key: u64, value: u64| (key + value) % 5 != 0;
                    map.retain(|&key, value| !mine(key) || keep(key / threads, value.n));
                    model.retain(|&key, &mut value| keep(key, value));
                }
                7 if alone && rng.below(20) == 0 => {
                    map.clear();
                    model.clear();
                }
                _ => {
                    let got = map.with(key, |value| value.n);
                    assert_eq!(got, model.get(&k).copied(), "{context}");
                    assert_eq!(map.contains_key(key), model.contains_key(&k), "{context}");
                }
            }
            if step % CHECK_EVERY == 0 {
                flush();
                if alone {
                    assert_eq!(map.purge(), 0, "{context}: a dead entry was left");
                    assert_eq!(map.len(), model.len(), "{context}");
                }
                // Only this thread's current objects: one it let go of
                // may live on for a while in another thread's snapshot
                // (an iteration upgrades every key it meets), and keep
                // its entry as long as it lives.
                let current = |key: &Strong<u64>| {
                    mine(**key) && Strong::ptr_eq(key, &objects[(**key / threads) as usize])
                };
                let mut seen: Vec<(u64, u64)> = map
                    .iter()
                    .filter(|(key, _)| current(key))
                    .map(|(key, value)| (*key / threads, value.n))
                    .collect();
                seen.sort_unstable();
                let mut expected: Vec<(u64, u64)> = model.iter().map(|(&k, &v)| (k, v)).collect();
                expected.sort_unstable();
                assert_eq!(seen, expected, "{context}");
            }
        }
    });
    drop(map);
    settle_to_zero(&values, "values");
}

#[test]
fn a_weak_key_map_agrees_with_a_model_of_its_live_keys() {
    weak_key_map_against_the_model(0x2545_F491_4F6C_DD1D, 1);
}

#[test]
fn threads_with_keys_of_their_own_each_agree_with_their_model_of_one_weak_key_map() {
    weak_key_map_against_the_model(0x9FB2_1C65_1E98_DF25, THREADS);
}

/// `WeakSet`'s members are exactly the model's, members dying and new
/// objects joining. Each of `threads` threads runs the model on objects
/// of its own, in one set, as for `WeakKeyMap`.
fn weak_set_against_the_model(seed: u64, threads: u64) {
    let set: WeakSet<u64> = WeakSet::new();
    let alone = threads == 1;
    on_threads(threads, |thread| {
        let mine = |n: u64| n % threads == thread;
        let mut rng = Rng(seed + thread);
        let object = |k: u64| Strong::new(k * threads + thread);
        let mut objects: Vec<Strong<u64>> = (0..KEYS).map(object).collect();
        let mut model: HashSet<u64> = HashSet::new();
        for step in 0..STEPS {
            let k = rng.below(KEYS);
            let member = &objects[k as usize];
            let context = format!("seed {seed:#x}, thread {thread}, step {step}, object {k}");
            match rng.below(8) {
                0..=2 => assert_eq!(set.insert(member), model.insert(k), "{context}"),
                3 => {
                    objects[k as usize] = object(k);
                    model.remove(&k);
                }
                4 => assert_eq!(set.remove(member), model.remove(&k), "{context}"),
                // Every other sweep keeps everything, so that the members
                // it would drop come back between the sweeps that drop
                // them.
                5 => {
                    let keep = |k: u64| k % 3 != 0 || step % 2 == 0;
                    set.retain(|&n| !mine(n) || keep(n / threads));
                    model.retain(|&k| keep(k));
                }
                6 if alone && rng.below(20) == 0 => {
                    set.clear();
                    model.clear();
                }
                _ => assert_eq!(set.contains(member), model.contains(&k), "{context}"),
            }
            if step % CHECK_EVERY == 0 {
                flush();
                if alone {
                    assert_eq!(set.purge(), 0, "{context}: a dead member was left");
                    assert_eq!(set.len(), model.len(), "{context}");
                }
                // Only this thread's current objects, as for `WeakKeyMap`.
                let current = |member: &Strong<u64>| {
                    mine(**member)
                        && Strong::ptr_eq(member, &objects[(**member / threads) as usize])
                };
                let mut seen: Vec<usize> = set
                    .iter()
                    .filter(|member| current(member))
                    .map(|member| address(&member))
                    .collect();
                seen.sort_unstable();
                let mut expected: Vec<usize> = model
                    .iter()
                    .map(|&k| address(&objects[k as usize]))
                    .collect();
                expected.sort_unstable();
                assert_eq!(seen, expected, "{context}");
            }
        }
    });
}

#[test]
fn a_weak_set_agrees_with_a_model_of_its_live_members() {
    weak_set_against_the_model(0x5851_F42D_4C95_7F2D, 1);
}

#[test]
fn threads_with_objects_of_their_own_each_agree_with_their_model_of_one_weak_set() {
    weak_set_against_the_model(0xC2B2_AE3D_27D4_EB4F, THREADS);
}
