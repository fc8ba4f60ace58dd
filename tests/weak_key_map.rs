//! `WeakKeyMap`: ports of CPython's `WeakKeyDictionary` cases that make
//! sense with identity keys, and the concurrent guarantees of API.md and
//! SAFETY.md section 8.

#[path = "support/settle.rs"]
mod settle;
#[path = "support/snapshot.rs"]
mod snapshot;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use weakrefs::{flush, Strong, Weak, WeakKeyMap};

/// Iterations shrink under Miri, which runs these tests too.
const SCALE: usize = if cfg!(miri) { 1 } else { 20 };

/// Counts its drops, and on which thread they happened.
struct Tracked {
    drops: Arc<AtomicUsize>,
    on_finalizer: Arc<AtomicUsize>,
}

impl Tracked {
    fn new(drops: &Arc<AtomicUsize>, on_finalizer: &Arc<AtomicUsize>) -> Self {
        Tracked {
            drops: drops.clone(),
            on_finalizer: on_finalizer.clone(),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
        if thread::current().name() == Some("weakrefs-finalizer") {
            self.on_finalizer.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// CPython `test_weak_keys`: entries follow their keys' lives, values are
/// found through the keys, and a dead key's value is dropped on the
/// finalizer thread.
#[test]
fn entries_follow_their_keys_lives() {
    let (drops, on_finalizer) = Default::default();
    let map = WeakKeyMap::new();
    let keys: Vec<_> = (0..10).map(Strong::new).collect();
    for key in &keys {
        assert!(!map.insert(key, Tracked::new(&drops, &on_finalizer)));
    }
    assert_eq!(map.len(), 10);
    assert!(keys.iter().all(|key| map.contains_key(key)));
    let mut keys = keys;
    let gone = keys.split_off(4);
    drop(gone);
    flush();
    assert_eq!(map.len(), 4);
    // Dropped once no reader can see them (epoch reclamation).
    weakrefs_settle(|| drops.load(Ordering::SeqCst) == 6);
    assert_eq!(
        on_finalizer.load(Ordering::SeqCst),
        6,
        "dropped on the finalizer thread"
    );
    assert!(keys.iter().all(|key| map.contains_key(key)));
    drop(keys);
    flush();
    assert!(map.is_empty());
    weakrefs_settle(|| drops.load(Ordering::SeqCst) == 10);
}

/// Identity, not equality: equal values are distinct keys.
#[test]
fn keys_are_compared_by_identity() {
    let map = WeakKeyMap::new();
    let (a, b) = (Strong::new("same"), Strong::new("same"));
    map.insert(&a, 1);
    assert_eq!(map.get(&b), None);
    map.insert(&b, 2);
    assert_eq!(map.get(&a.clone()), Some(1), "a clone is the same key");
    assert_eq!(map.get(&b), Some(2));
    assert_eq!(map.len(), 2);
}

/// CPython `test_weak_keyed_delitem` and `__setitem__` over an existing
/// key: `insert` and `remove` say whether they displaced a value, which is
/// dropped on the finalizer thread once no reader can see it.
#[test]
fn insert_and_remove_say_whether_they_displaced_a_value() {
    let (drops, on_finalizer) = Default::default();
    let map = WeakKeyMap::new();
    let key = Strong::new(0u8);
    assert!(!map.insert(&key, Tracked::new(&drops, &on_finalizer)));
    assert!(map.insert(&key, Tracked::new(&drops, &on_finalizer)));
    assert_eq!(map.len(), 1);
    assert!(map.remove(&key));
    assert!(!map.remove(&key));
    assert!(map.is_empty());
    assert!(!map.contains_key(&key));
    flush();
    weakrefs_settle(|| drops.load(Ordering::SeqCst) == 2);
    assert_eq!(on_finalizer.load(Ordering::SeqCst), 2);
}

/// A dead key's address may be reused by a new object, which must not
/// find the old entry.
#[test]
fn a_new_object_never_inherits_a_dead_keys_entry() {
    let map = WeakKeyMap::new();
    for round in 0..100 * SCALE {
        let key = Strong::new(round);
        map.insert(&key, round);
        drop(key);
        let fresh = Strong::new(round);
        assert_eq!(map.get(&fresh), None, "round {round}");
    }
    flush();
    assert!(map.is_empty());
}

/// CPython `test_weak_keyed_iters` and destroy-while-iterating: iteration
/// yields live keys only while keys die and the map changes.
#[test]
fn keys_dying_and_the_map_changing_during_iteration() {
    let map = WeakKeyMap::new();
    let mut keys: Vec<_> = (0..64).map(Strong::new).collect();
    for key in &keys {
        map.insert(key, **key * 2);
    }
    let mut seen = 0;
    for (key, value) in map.iter() {
        assert_eq!(value, *key * 2);
        seen += 1;
        if !keys.is_empty() {
            keys.pop();
            let newcomer = Strong::new(1000);
            map.insert(&newcomer, 2000);
        }
    }
    assert!(seen > 0);
    let live = keys.len();
    let yielded: Vec<_> = map.keys().collect();
    assert!(yielded.len() >= live);
    drop(yielded);
    flush();
    assert_eq!(map.len(), live);
    assert_eq!(map.iter().count(), live);
}

/// CPython `test_weak_keyed_cascading_deletes`: a dying key's value holds
/// the only `Strong` to another key, which goes with it.
#[test]
fn a_dying_key_whose_value_owns_another_key_takes_it_along() {
    let map: WeakKeyMap<u32, Option<Strong<u32>>> = WeakKeyMap::new();
    let mut chain = Vec::new();
    let mut next: Option<Strong<u32>> = None;
    for n in 0..10 {
        let key = Strong::new(n);
        map.insert(&key, next.take());
        chain.push(Strong::downgrade(&key));
        next = Some(key);
    }
    assert_eq!(map.len(), 10);
    drop(next); // the head; each value keeps the previous key alive
                // Each removed value is dropped once no reader can see it, and its drop
                // lets the next key die: the cascade moves with the epoch.
    weakrefs_settle(|| map.is_empty());
    assert!(chain.iter().all(|key| !key.is_alive()));
}

/// CPython `test_weak_keyed_dict_setdefault`, with single flight.
#[test]
fn get_or_insert_with_inserts_once() {
    let map = WeakKeyMap::new();
    let key = Strong::new("k");
    let calls = AtomicUsize::new(0);
    let make = || {
        calls.fetch_add(1, Ordering::SeqCst);
        7
    };
    assert_eq!(map.get_or_insert_with(&key, make), 7);
    assert_eq!(map.get_or_insert_with(&key, || unreachable!()), 7);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    map.insert(&key, 8);
    assert_eq!(map.get_or_insert_with(&key, || unreachable!()), 8);
}

/// Racing callers for one key run `init` once and all get the same value.
#[test]
fn single_flight_runs_init_once_for_racing_callers() {
    let map = Arc::new(WeakKeyMap::new());
    let key = Strong::new(());
    let calls = Arc::new(AtomicUsize::new(0));
    let threads = 4;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (map, key, calls, barrier) =
                (map.clone(), key.clone(), calls.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                map.get_or_insert_with(&key, || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Strong::new("loaded")
                })
            })
        })
        .collect();
    let values: Vec<Strong<&str>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(values.iter().all(|v| Strong::ptr_eq(v, &values[0])));
}

/// A panicking `init` fails its own caller only; the next caller loads.
#[test]
fn a_panicking_init_fails_alone() {
    let map = WeakKeyMap::new();
    let key = Strong::new(1);
    let failed = catch_unwind(AssertUnwindSafe(|| {
        map.get_or_insert_with(&key, || -> u32 { panic!("load failed") })
    }));
    assert!(failed.is_err());
    assert!(map.is_empty());
    assert_eq!(map.get_or_insert_with(&key, || 5), 5);
}

/// A value whose every copy panics as it drops, counting its drops.
struct Bomb(Arc<AtomicUsize>);

impl Clone for Bomb {
    fn clone(&self) -> Self {
        Bomb(self.0.clone())
    }
}

impl Drop for Bomb {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
        panic!("a value's destructor (expected by this test)");
    }
}

/// A value whose every copy panics as it drops: the load makes copies for
/// the map, its waiters and its caller, and letting go of the load drops
/// one while the caller's is a local. That panic reaches the caller with
/// its own copy dropped first, on its own: it used to be dropped during
/// the unwinding, where its second panic aborted the process. The entry
/// is published either way.
#[test]
fn a_value_whose_every_copy_panics_as_it_drops_never_aborts_a_load() {
    use std::future::Future as _;
    let drops = Arc::new(AtomicUsize::new(0));
    let map: WeakKeyMap<u32, Bomb> = WeakKeyMap::new();
    let (blocking, polled) = (Strong::new(1), Strong::new(2));
    let loaded = catch_unwind(AssertUnwindSafe(|| {
        std::mem::forget(map.get_or_insert_with(&blocking, || Bomb(drops.clone())));
    }));
    assert!(loaded.is_err(), "the panic reaches the caller");
    let loaded = catch_unwind(AssertUnwindSafe(|| {
        let mut load =
            std::pin::pin!(map.get_or_insert_with_async(&polled, || async { Bomb(drops.clone()) }));
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(value) = load.as_mut().poll(&mut context) {
            std::mem::forget(value);
        }
    }));
    assert!(loaded.is_err(), "the panic reaches the async caller");
    // Per load, the waiters' copy and the caller's, each dropped once.
    assert_eq!(drops.load(Ordering::SeqCst), 4);
    assert!(map.contains_key(&blocking) && map.contains_key(&polled));
    // The map's own copies go with their keys (their panics reported).
    drop((blocking, polled));
    flush();
    assert_eq!(map.len(), 0);
}

/// The same values on the other ways out of a load. A waiter whose handle
/// is the load's last drops the waiters' copy, and used to resume that
/// panic at once, while its unused `init` (holding a copy too) was still a
/// local: dropped during the unwinding, it aborted the process. A load
/// whose `init` inserted the key itself adopts that value and drops its
/// own three copies, which it did as one tuple: a second panic, an abort.
#[test]
fn every_way_out_of_a_load_lets_go_of_panicking_copies_one_by_one() {
    use std::future::Future as _;
    use std::mem::ManuallyDrop;
    use std::sync::mpsc;
    use std::task::{Context, Poll, Waker};

    let drops = Arc::new(AtomicUsize::new(0));
    // Never dropped by this thread: a failed assertion would drop them
    // while unwinding, and their panics would abort the test binary.
    let bomb = ManuallyDrop::new(Bomb(drops.clone()));
    let map: ManuallyDrop<Arc<WeakKeyMap<u32, Bomb>>> = ManuallyDrop::new(Arc::default());
    let key = Strong::new(1);
    let (leading, led) = mpsc::channel();
    let (go, wait) = mpsc::channel::<()>();
    let leader = {
        let (map, key, bomb) = (Arc::clone(&map), key.clone(), Bomb::clone(&bomb));
        thread::spawn(move || {
            let value = map.get_or_insert_with(&key, || {
                leading.send(()).unwrap();
                wait.recv().unwrap();
                bomb
            });
            std::mem::forget(value);
        })
    };
    led.recv().unwrap();
    // An async waiter, polled by hand: pending means it joined the load.
    let unused = Bomb::clone(&bomb);
    let mut waiter = Box::pin(map.get_or_insert_with_async(&key, move || async move { unused }));
    let mut context = Context::from_waker(Waker::noop());
    assert!(waiter.as_mut().poll(&mut context).is_pending(), "joined");
    go.send(()).unwrap();
    // The leader's handle is not the last: the waiter holds one.
    leader.join().expect("the leader gets its value");
    let waited = catch_unwind(AssertUnwindSafe(|| {
        if let Poll::Ready(value) = waiter.as_mut().poll(&mut context) {
            std::mem::forget(value);
        }
    }));
    let dropped = drops.load(Ordering::SeqCst);
    assert!(
        waited.is_err(),
        "the waiters' copy's panic reaches the waiter"
    );
    // The waiters' copy, the waiter's unused `init`'s and its own value.
    assert_eq!(dropped, 3);

    let adopting: ManuallyDrop<WeakKeyMap<u32, Bomb>> = ManuallyDrop::default();
    let adopted = Strong::new(2);
    let before = drops.load(Ordering::SeqCst);
    let loaded = catch_unwind(AssertUnwindSafe(|| {
        std::mem::forget(adopting.get_or_insert_with(&adopted, || {
            assert!(
                !adopting.insert(&adopted, Bomb::clone(&bomb)),
                "a new entry"
            );
            Bomb::clone(&bomb)
        }));
    }));
    let dropped = drops.load(Ordering::SeqCst) - before;
    assert!(
        loaded.is_err(),
        "the unused copies' panic reaches the caller"
    );
    // The three unused copies, the caller's clone of the adopted value and
    // the waiters' one, which the load's last handle held.
    assert_eq!(dropped, 5);
}

/// An `init` asking for its own key panics instead of waiting for itself.
#[test]
fn a_recursive_load_of_the_same_key_panics_instead_of_deadlocking() {
    let map = WeakKeyMap::new();
    let key = Strong::new(());
    let result = catch_unwind(AssertUnwindSafe(|| {
        map.get_or_insert_with(&key, || map.get_or_insert_with(&key, || 1))
    }));
    assert!(result.is_err());
    assert_eq!(map.get_or_insert_with(&key, || 2), 2);
}

/// K1: a value removed while a reader borrows it stays valid until that
/// reader is done: `remove` does not wait, the reader finishes with the
/// value it found, and the value is dropped only afterwards.
#[test]
fn a_value_removed_under_a_reader_outlives_the_read() {
    let (drops, on_finalizer) = Default::default();
    let map = Arc::new(WeakKeyMap::new());
    let key = Strong::new(());
    map.insert(&key, (Tracked::new(&drops, &on_finalizer), vec![1u8; 64]));
    let reading = Arc::new(Barrier::new(2));
    let reader = {
        let (map, key, reading, drops) = (map.clone(), key.clone(), reading.clone(), drops.clone());
        thread::spawn(move || {
            map.with(&key, |value| {
                reading.wait();
                // Until the writer has unlinked the entry.
                while map.contains_key(&key) {
                    thread::yield_now();
                }
                assert_eq!(value.1.len(), 64);
                assert_eq!(drops.load(Ordering::SeqCst), 0, "dropped under a reader");
            })
        })
    };
    reading.wait();
    assert!(map.remove(&key));
    reader.join().unwrap();
    weakrefs_settle(|| drops.load(Ordering::SeqCst) == 1);
}

/// A `with` closure that removes (or replaces) its own key: nothing waits,
/// and the displaced values are dropped once the reads have ended.
#[test]
fn removing_the_key_being_read_does_not_wait_for_itself() {
    let (drops, on_finalizer) = Default::default();
    let map = WeakKeyMap::new();
    let key = Strong::new(());
    map.insert(&key, Tracked::new(&drops, &on_finalizer));
    let removed = map.with(&key, |_| map.remove(&key)).expect("present");
    assert!(removed);
    assert!(!map.contains_key(&key));
    map.insert(&key, Tracked::new(&drops, &on_finalizer));
    let replaced = map.with(&key, |_| {
        map.insert(&key, Tracked::new(&drops, &on_finalizer))
    });
    assert_eq!(replaced, Some(true));
    assert_eq!(map.len(), 1);
    flush();
    weakrefs_settle(|| drops.load(Ordering::SeqCst) == 2);
    drop(map);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        3,
        "the last one goes with the map"
    );
}

/// Runs epoch collections until `done` holds: values removed without being
/// taken back are dropped once no reader can still see them, which the
/// crate's epoch collector decides as threads retire and flush.
fn weakrefs_settle(done: impl Fn() -> bool) {
    let scratch = WeakKeyMap::new();
    let key = Strong::new(());
    let settled = settle::until(done, || {
        // Each write pins, and retires an item: the epoch moves on.
        scratch.insert(&key, 0u8);
        scratch.remove(&key);
        flush();
    });
    assert!(settled, "the removed values were never dropped");
}

/// `retain`, `clear`, `purge`: the predicate sees key and value; removed
/// values are dropped.
#[test]
fn retain_clear_and_purge() {
    let map = WeakKeyMap::new();
    let keys: Vec<_> = (0..10).map(Strong::new).collect();
    for key in &keys {
        map.insert(key, **key * 10);
    }
    map.retain(|key, value| key % 2 == 0 && *value >= 20);
    let mut kept: Vec<_> = map.iter().map(|(k, v)| (*k, v)).collect();
    kept.sort_unstable();
    assert_eq!(kept, [(2, 20), (4, 40), (6, 60), (8, 80)]);
    let mut keys = keys;
    keys.truncate(3); // 0, 1, 2 live on
    assert!(map.purge() <= 3);
    flush();
    assert_eq!(map.len(), 1);
    map.clear();
    assert!(map.is_empty());
    assert_eq!(map.get(&keys[2]), None);
}

/// Inserting and removing under one live key many times leaves nothing
/// behind: no callbacks on the key, no entries.
#[test]
fn insert_remove_churn_leaves_nothing_behind() {
    let map = WeakKeyMap::new();
    let key = Strong::new(());
    for round in 0..500 * SCALE {
        map.insert(&key, round);
        if round % 3 == 0 {
            assert!(map.remove(&key));
            assert_eq!(map.get(&key), None);
        }
    }
    map.remove(&key);
    flush();
    assert!(map.is_empty());
    // Removed items (each with a `Weak` to the key) are freed once the
    // epoch lets them go.
    weakrefs_settle(|| Strong::weak_count(&key) == 0);
}

/// An entry whose value panics as it drops still lets go of its key's
/// `Weak`, which the entry keeps beside the value: removed, replaced or
/// dropped with the map, it leaves the key's block no extra reference.
#[test]
fn a_value_that_panics_as_it_drops_still_lets_go_of_its_key() {
    let drops = Arc::new(AtomicUsize::new(0));
    let key = Strong::new(7u32);
    let map = WeakKeyMap::new();
    map.insert(&key, Bomb(drops.clone()));
    assert_eq!(Strong::weak_count(&key), 1, "the entry's `Weak`");
    assert!(map.insert(&key, Bomb(drops.clone())), "replaced");
    assert!(map.remove(&key));
    flush();
    weakrefs_settle(|| drops.load(Ordering::SeqCst) == 2);
    weakrefs_settle(|| Strong::weak_count(&key) == 0);
    map.insert(&key, Bomb(drops.clone()));
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(map)));
    assert!(dropped.is_err(), "the value's panic reaches the map's drop");
    assert_eq!(drops.load(Ordering::SeqCst), 3);
    assert_eq!(Strong::weak_count(&key), 0);
}

/// Dropping the map while its keys live on, then the keys, is sound; the
/// values go with the map.
#[test]
fn dropping_the_map_before_its_keys_is_sound() {
    let (drops, on_finalizer) = Default::default();
    let map = WeakKeyMap::new();
    let keys: Vec<_> = (0..8).map(Strong::new).collect();
    for key in &keys {
        map.insert(key, Tracked::new(&drops, &on_finalizer));
    }
    drop(map);
    assert_eq!(drops.load(Ordering::SeqCst), 8);
    drop(keys);
    flush();
    assert_eq!(drops.load(Ordering::SeqCst), 8);
}

/// Mixed stress: threads insert, replace, remove, read and drop keys over
/// a shared pool; every value is dropped exactly once, and no entry
/// outlives its key.
#[test]
fn mixed_stress_with_exact_accounting() {
    let (drops, on_finalizer) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let made = Arc::new(AtomicUsize::new(0));
    let map = Arc::new(WeakKeyMap::new());
    let pool: Arc<Mutex<Vec<Strong<usize>>>> =
        Arc::new(Mutex::new((0..16).map(Strong::new).collect()));
    let threads = 4;
    let rounds = 200 * SCALE;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (map, pool, barrier) = (map.clone(), pool.clone(), barrier.clone());
            let (drops, on_finalizer, made) = (drops.clone(), on_finalizer.clone(), made.clone());
            thread::spawn(move || {
                barrier.wait();
                for round in 0..rounds {
                    let slot = (t * 7 + round * 13) % 16;
                    let key = pool.lock().unwrap()[slot].clone();
                    let value = || {
                        made.fetch_add(1, Ordering::SeqCst);
                        Tracked::new(&drops, &on_finalizer)
                    };
                    match round % 6 {
                        0 | 1 => drop(map.insert(&key, value())),
                        2 => drop(map.remove(&key)),
                        3 => {
                            map.with(&key, |tracked| {
                                assert!(
                                    tracked.drops.load(Ordering::SeqCst)
                                        <= made.load(Ordering::SeqCst)
                                )
                            });
                        }
                        4 => {
                            for (live, _) in map.keys().map(|k| (k, ())) {
                                assert!(Strong::strong_count(&live) >= 1);
                            }
                        }
                        _ => {
                            // Replace the pool's key: the old one dies once
                            // the other threads let go of it.
                            pool.lock().unwrap()[slot] = Strong::new(round);
                        }
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    let pool = Arc::try_unwrap(pool).ok().unwrap().into_inner().unwrap();
    flush();
    assert!(map.len() <= pool.len(), "an entry outlived its key");
    let weak_pool: Vec<Weak<usize>> = pool.iter().map(Strong::downgrade).collect();
    drop(pool);
    flush();
    assert!(map.is_empty(), "{} entries outlived their keys", map.len());
    assert!(weak_pool.iter().all(|key| !key.is_alive()));
    weakrefs_settle(|| drops.load(Ordering::SeqCst) == made.load(Ordering::SeqCst));
}

#[test]
fn the_map_is_send_sync_default_and_debug() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<WeakKeyMap<String, Vec<u8>>>();
    let map: WeakKeyMap<u8, u8> = WeakKeyMap::default();
    assert_eq!(format!("{map:?}"), "WeakKeyMap { len: 0, .. }");
}

/// A map used from a thread-local's destructor during thread exit: a read
/// that removes its own key neither waits nor fails.
#[test]
fn removing_the_key_being_read_from_a_thread_local_destructor_does_not_hang() {
    struct Teardown {
        map: Arc<WeakKeyMap<u8, u8>>,
        key: Strong<u8>,
        result: std::sync::mpsc::Sender<Option<bool>>,
    }
    impl Drop for Teardown {
        fn drop(&mut self) {
            let (map, key) = (&self.map, &self.key);
            let outcome = map.with(key, |_| map.remove(key));
            let _ = self.result.send(outcome);
        }
    }
    thread_local! {
        static TEARDOWN: std::cell::RefCell<Option<Teardown>> = const { std::cell::RefCell::new(None) };
    }
    let map = Arc::new(WeakKeyMap::new());
    let key = Strong::new(0u8);
    map.insert(&key, 1u8);
    let (send, receive) = std::sync::mpsc::channel();
    {
        let (map, key) = (map.clone(), key.clone());
        thread::spawn(move || {
            TEARDOWN.with(|slot| {
                *slot.borrow_mut() = Some(Teardown {
                    map: map.clone(),
                    key: key.clone(),
                    result: send,
                })
            });
            assert_eq!(map.get(&key), Some(1));
        })
        .join()
        .unwrap();
    }
    let outcome = receive.recv().expect("the destructor ran");
    assert_eq!(outcome, Some(true));
    assert!(!map.contains_key(&key));
}

/// C15, M10: a 200 000-link cascade (each value holds the only `Strong` to
/// the previous key) started on a 2 MiB thread: each link dies on the
/// finalizer thread, one after another, never nested on a stack.
#[test]
fn a_long_cascade_never_nests() {
    let links = if cfg!(miri) {
        30
    } else if cfg!(weakrefs_tsan) {
        20_000
    } else {
        200_000
    };
    let map: Arc<WeakKeyMap<usize, Option<Strong<usize>>>> = Arc::new(WeakKeyMap::new());
    let mut next: Option<Strong<usize>> = None;
    for link in 0..links {
        let key = Strong::new(link);
        map.insert(&key, next.take());
        next = Some(key);
    }
    let head = next.expect("at least one link");
    thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || drop(head))
        .expect("spawn")
        .join()
        .expect("the head's drop");
    for _ in 0..links * 100 {
        if map.is_empty() {
            break;
        }
        flush();
    }
    assert!(map.is_empty(), "{} links left", map.len());
}

/// Keys of unsized types: trait objects and `str`, by identity.
trait Shape: Send + Sync {
    fn sides(&self) -> u32;
}

struct Square;

impl Shape for Square {
    fn sides(&self) -> u32 {
        4
    }
}

#[test]
fn keys_may_be_trait_objects_and_strs() {
    let areas: WeakKeyMap<dyn Shape, u32> = WeakKeyMap::new();
    let square: Strong<dyn Shape> = weakrefs::unsize!(Strong::new(Square));
    let other: Strong<dyn Shape> = weakrefs::unsize!(Strong::new(Square));
    assert!(!areas.insert(&square, 16));
    assert_eq!(areas.get(&square), Some(16));
    assert_eq!(areas.get(&other), None, "another object");
    assert_eq!(areas.with(&square, |a| a * square.sides()), Some(64));
    drop(square);
    weakrefs::flush();
    assert!(areas.is_empty());

    let notes: WeakKeyMap<str, &str> = WeakKeyMap::new();
    let name: Strong<str> = Strong::from("request 7");
    notes.insert(&name, "slow");
    assert_eq!(notes.get(&name), Some("slow"));
    assert_eq!(notes.iter().map(|(k, _)| k.len()).sum::<usize>(), 9);
}

/// An iterator holds a `Strong` to each key of the shard it has
/// snapshotted until it yields it or is dropped (the docs of `iter`): a
/// key object whose last other handle goes meanwhile keeps its entry, and
/// the entry leaves once the iterator lets go.
#[test]
fn an_iterator_holds_its_snapshot_until_dropped() {
    let count = if cfg!(miri) { 64 } else { 1000 };
    let map = WeakKeyMap::new();
    let keys: Vec<_> = (0..count).map(Strong::new).collect();
    for key in &keys {
        map.insert(key, **key);
    }
    snapshot::held_until_dropped(map.iter(), keys, count, || map.len(), None);
}
