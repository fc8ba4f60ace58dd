//! Each collection against a model: long runs of random operations on one
//! thread, every result compared with what a `HashMap` of the live entries
//! says it must be. A small key space makes the tables reuse slots, grow,
//! shrink and rebuild over and over, with entries dying between the
//! writes, as a cache's do; the keys and values count their instances, so
//! that any one dropped twice, or never, shows at the end. Each run's
//! operations come from a fixed seed, and a `WeakValueMap`'s keys hash with
//! a fixed hasher, so a failure there names the step that reproduces it;
//! `WeakKeyMap` and `WeakSet` file objects by address, which each run
//! allocates anew.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use weakrefs::{flush, RemovalCause, Strong, Weak, WeakKeyMap, WeakSet, WeakValueMap};

/// Operations a run makes (fewer under Miri, which runs them a thousand
/// times slower).
const STEPS: usize = if cfg!(miri) { 300 } else { 20_000 };

/// Distinct keys a run uses: few, so that every key comes back often, and
/// enough that a shard's table has groups past the first to probe (fewer
/// under Miri, so that its short runs come back to keys too).
const KEYS: u64 = if cfg!(miri) { 24 } else { 200 };

/// Steps between full checks (length, iteration, nothing dead left).
const CHECK_EVERY: usize = 97;

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

/// How a `WeakValueMap` under test is built.
#[derive(Clone, Copy)]
struct Build {
    /// With an `on_remove` listener, which also moves deaths' removals to
    /// the finalizer thread: dead entries linger until it runs.
    listen: bool,
    /// The keep-warm tier's bound: values the map keeps alive for a while
    /// after their last other handle goes.
    tier: usize,
}

/// `WeakValueMap`'s live entries are exactly the model's, after any of
/// its operations, with values that die at once, die later, or outlive
/// their entries; with a listener, every entry that leaves is heard once.
///
/// The model keeps the `Weak` of each key's latest value: what the map
/// must hold for the key is that value if it is alive, which a keep-warm
/// tier may keep it for a while after the run lets go of it.
fn weak_value_map_against_the_model(seed: u64, build: Build) {
    let keys = Arc::new(AtomicI64::new(0));
    let values = Arc::new(AtomicI64::new(0));
    let heard = Arc::new(AtomicU64::new(0));
    let mut builder = WeakValueMap::builder()
        .keep_recent(build.tier)
        .hasher(BuildHasherDefault::<DefaultHasher>::default());
    if build.listen {
        let heard = heard.clone();
        builder = builder.on_remove(move |_: &Counted, _: RemovalCause| {
            heard.fetch_add(1, Ordering::SeqCst);
        });
    }
    let map: WeakValueMap<Counted, Counted, _> = builder.build();
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
        Strong::new(Counted::new(*made, &values))
    };
    let live = |entries: &HashMap<u64, Weak<Counted>>, k: u64| entries.get(&k)?.upgrade();
    for step in 0..STEPS {
        let k = rng.below(KEYS);
        let key = Counted::new(k, &keys);
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
                    Counted::new(made, &values)
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
                map.retain(|key, value| keep(key.n, value.n));
                // Dead entries go too.
                let before = entries.len();
                entries.retain(|&key, entry| entry.upgrade().is_some_and(|v| keep(key, v.n)));
                left += (before - entries.len()) as u64;
                held.retain(|key, _| entries.contains_key(key));
            }
            10 if rng.below(20) == 0 => {
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
            // Every death's removal has run: nothing dead is left.
            assert_eq!(map.purge(), 0, "{context}: a dead entry was left");
            let before = entries.len();
            entries.retain(|_, entry| entry.upgrade().is_some());
            left += (before - entries.len()) as u64;
            assert_eq!(map.len(), entries.len(), "{context}");
            let mut seen: Vec<(u64, usize)> = map
                .iter()
                .map(|(key, value)| (key.n, address(&value)))
                .collect();
            seen.sort_unstable();
            let mut expected: Vec<(u64, usize)> = entries
                .iter()
                .filter_map(|(&key, entry)| Some((key, address(&entry.upgrade()?))))
                .collect();
            expected.sort_unstable();
            assert_eq!(seen, expected, "{context}");
            if build.listen {
                assert_eq!(heard.load(Ordering::SeqCst), left, "{context}");
            }
        }
    }
    drop((held, former, map));
    flush();
    assert_eq!(
        keys.load(Ordering::SeqCst),
        0,
        "keys leaked or dropped twice"
    );
    assert_eq!(
        values.load(Ordering::SeqCst),
        0,
        "values leaked or dropped twice"
    );
}

#[test]
fn a_weak_value_map_agrees_with_a_model_of_its_live_entries() {
    let build = Build {
        listen: false,
        tier: 0,
    };
    weak_value_map_against_the_model(0x9E37_79B9_7F4A_7C15, build);
}

#[test]
fn a_weak_value_map_that_hears_removals_agrees_with_the_model_and_hears_each_once() {
    let build = Build {
        listen: true,
        tier: 0,
    };
    weak_value_map_against_the_model(0xD1B5_4A32_D192_ED03, build);
}

#[test]
fn a_weak_value_map_with_a_keep_warm_tier_agrees_with_the_model() {
    let build = Build {
        listen: true,
        tier: 16,
    };
    weak_value_map_against_the_model(0x94D0_49BB_1331_11EB, build);
}

/// `WeakKeyMap`'s entries are exactly the model's, keys dying and coming
/// back as new objects; its values are each dropped once.
#[test]
fn a_weak_key_map_agrees_with_a_model_of_its_live_keys() {
    let seed = 0x2545_F491_4F6C_DD1D;
    let values = Arc::new(AtomicI64::new(0));
    let map: WeakKeyMap<u64, Counted> = WeakKeyMap::new();
    let mut rng = Rng(seed);
    // The key objects, one a slot; a slot's object dies and is replaced.
    let mut objects: Vec<Strong<u64>> = (0..KEYS).map(Strong::new).collect();
    // The value each slot's current object maps to.
    let mut model: HashMap<u64, u64> = HashMap::new();
    let mut made = 0u64;
    for step in 0..STEPS {
        let k = rng.below(KEYS);
        let key = &objects[k as usize];
        let context = format!("seed {seed:#x}, step {step}, key {k}");
        match rng.below(10) {
            0..=2 => {
                made += 1;
                let replaced = map.insert(key, Counted::new(made, &values));
                assert_eq!(replaced, model.insert(k, made).is_some(), "{context}");
            }
            // The key dies; a new object takes its slot.
            3 => {
                objects[k as usize] = Strong::new(k);
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
                map.retain(|key, value| keep(*key, value.n));
                model.retain(|&key, &mut value| keep(key, value));
            }
            7 if rng.below(20) == 0 => {
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
            assert_eq!(map.purge(), 0, "{context}: a dead entry was left");
            assert_eq!(map.len(), model.len(), "{context}");
            let mut seen: Vec<(u64, u64)> =
                map.iter().map(|(key, value)| (*key, value.n)).collect();
            seen.sort_unstable();
            let mut expected: Vec<(u64, u64)> = model.iter().map(|(&k, &v)| (k, v)).collect();
            expected.sort_unstable();
            assert_eq!(seen, expected, "{context}");
        }
    }
    drop((model, objects, map));
    flush();
    assert_eq!(
        values.load(Ordering::SeqCst),
        0,
        "values leaked or dropped twice"
    );
}

/// `WeakSet`'s members are exactly the model's, members dying and new
/// objects joining.
#[test]
fn a_weak_set_agrees_with_a_model_of_its_live_members() {
    let seed = 0x5851_F42D_4C95_7F2D;
    let set: WeakSet<u64> = WeakSet::new();
    let mut rng = Rng(seed);
    let mut objects: Vec<Strong<u64>> = (0..KEYS).map(Strong::new).collect();
    let mut model: HashSet<u64> = HashSet::new();
    for step in 0..STEPS {
        let k = rng.below(KEYS);
        let object = &objects[k as usize];
        let context = format!("seed {seed:#x}, step {step}, object {k}");
        match rng.below(8) {
            0..=2 => assert_eq!(set.insert(object), model.insert(k), "{context}"),
            3 => {
                objects[k as usize] = Strong::new(k);
                model.remove(&k);
            }
            4 => assert_eq!(set.remove(object), model.remove(&k), "{context}"),
            // Every other sweep keeps everything, so that the members it
            // would drop come back between the sweeps that drop them.
            5 => {
                let keep = |n: u64| n % 3 != 0 || step % 2 == 0;
                set.retain(|&n| keep(n));
                model.retain(|&n| keep(n));
            }
            6 if rng.below(20) == 0 => {
                set.clear();
                model.clear();
            }
            _ => assert_eq!(set.contains(object), model.contains(&k), "{context}"),
        }
        if step % CHECK_EVERY == 0 {
            flush();
            assert_eq!(set.purge(), 0, "{context}: a dead member was left");
            assert_eq!(set.len(), model.len(), "{context}");
            let mut seen: Vec<usize> = set.iter().map(|member| address(&member)).collect();
            seen.sort_unstable();
            let mut expected: Vec<usize> = model
                .iter()
                .map(|&k| address(&objects[k as usize]))
                .collect();
            expected.sort_unstable();
            assert_eq!(seen, expected, "{context}");
        }
    }
}
