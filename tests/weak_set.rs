//! `WeakSet`: ports of CPython's `WeakSet` cases that make sense with
//! identity membership, and the concurrent guarantees of API.md.

#[path = "support/settle.rs"]
mod settle;
#[path = "support/snapshot.rs"]
mod snapshot;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use weakrefs::{flush, Strong, WeakSet};

#[path = "support/dying.rs"]
mod dying;

/// CPython `test_len`, `test_contains`: membership and length follow the
/// members' lives.
#[test]
fn len_and_contains_follow_the_members_lives() {
    let set = WeakSet::new();
    let members: Vec<_> = (0..10).map(Strong::new).collect();
    for member in &members {
        assert!(set.insert(member));
    }
    assert_eq!(set.len(), 10);
    assert!(members.iter().all(|member| set.contains(member)));
    let mut members = members;
    let gone = members.split_off(5);
    drop(gone);
    flush();
    assert_eq!(set.len(), 5);
    assert!(members.iter().all(|member| set.contains(member)));
    drop(members);
    flush();
    assert!(set.is_empty());
}

/// Identity, not equality: equal values are distinct members.
#[test]
fn members_are_compared_by_identity() {
    let set = WeakSet::new();
    let (a, b) = (Strong::new("same"), Strong::new("same"));
    assert!(set.insert(&a));
    assert!(!set.contains(&b));
    assert!(set.insert(&b));
    assert!(!set.insert(&a.clone()), "a clone is the same object");
    assert_eq!(set.len(), 2);
}

/// CPython `test_add`, `test_remove`, `test_discard`.
#[test]
fn insert_remove_and_their_answers() {
    let set = WeakSet::new();
    let x = Strong::new(1);
    assert!(set.insert(&x));
    assert!(!set.insert(&x));
    assert!(set.remove(&x));
    assert!(!set.remove(&x));
    assert!(!set.contains(&x));
    assert!(set.is_empty());
    assert!(set.insert(&x));
    assert!(set.contains(&x));
}

/// A dead member's address may be reused by a new object, which must not
/// find itself a member: the set's `Weak` keeps the address reserved until
/// the entry is gone.
#[test]
fn a_new_object_never_inherits_a_dead_members_entry() {
    let set = WeakSet::new();
    for round in 0..if cfg!(miri) { 20 } else { 2_000 } {
        let old = Strong::new(round);
        set.insert(&old);
        drop(old);
        let new = Strong::new(round);
        assert!(
            !set.contains(&new),
            "round {round}: a new object found an old entry"
        );
        assert!(set.insert(&new));
        assert!(set.remove(&new));
    }
    flush();
    assert!(set.is_empty());
}

/// CPython `test_weak_destroy_while_iterating` and
/// `test_weak_destroy_and_mutate_while_iterating`: iteration never yields a
/// dead member and never panics while members die and the set changes.
#[test]
fn members_dying_and_the_set_changing_during_iteration() {
    let set = WeakSet::new();
    let mut members: Vec<_> = (0..100).map(Strong::new).collect();
    let mut seen = 0;
    for (step, member) in set_iter_after_fill(&set, &members).enumerate() {
        assert!(Strong::strong_count(&member) >= 1);
        seen += 1;
        if step % 3 == 0 && !members.is_empty() {
            members.pop(); // a member dies mid-iteration
        }
        if step % 5 == 0 {
            set.insert(&Strong::new(-1)); // dies at once, too
        }
    }
    assert!(seen <= 100);
    flush();
    assert_eq!(set.len(), members.len());
}

fn set_iter_after_fill<'a>(
    set: &'a WeakSet<i32>,
    members: &[Strong<i32>],
) -> impl Iterator<Item = Strong<i32>> + 'a {
    for member in members {
        set.insert(member);
    }
    set.iter()
}

#[test]
fn retain_clear_and_purge() {
    let set = WeakSet::new();
    let members: Vec<_> = (0..12).map(Strong::new).collect();
    for member in &members {
        set.insert(member);
    }
    let mut calls = 0;
    set.retain(|n| {
        calls += 1;
        n % 2 == 0
    });
    assert_eq!(calls, 12, "the predicate runs once per live member");
    assert_eq!(set.len(), 6);
    assert!(set.contains(&members[4]) && !set.contains(&members[5]));
    let dying = Strong::new(99);
    set.insert(&dying);
    drop(dying);
    assert!(set.purge() <= 1);
    assert_eq!(set.len(), 6);
    set.clear();
    assert!(set.is_empty());
    // Cleared members' callbacks were detached: nothing is left to run.
    drop(members);
    flush();
    assert!(set.is_empty());
}

/// Inserting and removing one long-lived member forever leaves nothing
/// behind: each removal detaches its callback, which is then freed.
#[test]
fn insert_remove_churn_leaves_nothing_behind() {
    let set = WeakSet::new();
    let member = Strong::new(0u64);
    for _ in 0..if cfg!(miri) { 200 } else { 100_000 } {
        assert!(set.insert(&member));
        assert!(set.remove(&member));
    }
    // The set's `Weak`s go with their entries, freed once every pinned
    // thread has moved on; other tests' threads may hold the epoch back
    // for a while.
    settle::until(
        || Strong::weak_count(&member) < 100,
        || {
            let nudge = WeakSet::new();
            let object = Strong::new(0u64);
            nudge.insert(&object);
            nudge.remove(&object);
        },
    );
    let weak = Strong::weak_count(&member);
    assert!(weak < 1_000, "{weak} weak handles left behind");
}

/// Dropping the set before its members, then the members, is sound: the
/// removal callbacks find the set gone and do nothing.
#[test]
fn dropping_the_set_before_its_members_is_sound() {
    let members: Vec<_> = (0..50).map(Strong::new).collect();
    {
        let set = WeakSet::new();
        for member in &members {
            set.insert(member);
        }
    }
    drop(members);
    flush();
}

/// Cascading deletes (CPython's `test_len_cycles` spirit): a member whose
/// value owns the only handle to another member; dropping the first kills
/// the second from inside a callback chain.
#[test]
fn a_dying_member_that_owns_another_takes_it_along() {
    let set: WeakSet<Option<Strong<u8>>> = WeakSet::new();
    let inner = Strong::new(None);
    let outer = Strong::new(Some(Strong::new(7u8)));
    set.insert(&inner);
    set.insert(&outer);
    let owned_by_outer: WeakSet<u8> = WeakSet::new();
    owned_by_outer.insert(outer.as_ref().as_ref().unwrap());
    drop(outer);
    flush();
    assert_eq!(set.len(), 1);
    assert!(
        owned_by_outer.is_empty(),
        "the owned member died with its owner"
    );
    assert!(set.contains(&inner));
}

/// Threads insert, remove and drop members concurrently (CPython's
/// threaded consistency tests): every object is dropped exactly once, no
/// entry outlives its member, and after `flush` the length is exact.
#[test]
fn mixed_stress_with_exact_accounting() {
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let threads = 4;
    let rounds = if cfg!(miri) { 30 } else { 5_000 };
    let set: WeakSet<Counted> = WeakSet::new();
    let drops = Arc::new(AtomicUsize::new(0));
    let start = Barrier::new(threads);
    let survivors: Vec<Vec<Strong<Counted>>> = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (set, drops, start) = (&set, drops.clone(), &start);
                scope.spawn(move || {
                    start.wait();
                    let mut kept = Vec::new();
                    for round in 0..rounds {
                        let object = Strong::new(Counted(drops.clone()));
                        assert!(set.insert(&object));
                        assert!(set.contains(&object));
                        match (round + t) % 4 {
                            0 => kept.push(object),
                            1 => assert!(set.remove(&object)),
                            _ => drop(object),
                        }
                        if kept.len() > 16 {
                            kept.swap_remove(round % 16);
                        }
                        for member in set.iter().take(4) {
                            assert!(Strong::strong_count(&member) >= 1);
                        }
                    }
                    kept
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    flush();
    let survivors: Vec<_> = survivors.into_iter().flatten().collect();
    assert_eq!(
        set.len(),
        survivors.len(),
        "an entry outlived its member or a live one went missing"
    );
    let live: HashSet<_> = set.iter().map(|m| Strong::as_ptr(&m) as usize).collect();
    let expected: HashSet<_> = survivors
        .iter()
        .map(|m| Strong::as_ptr(m) as usize)
        .collect();
    assert_eq!(live, expected);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        threads * rounds - survivors.len()
    );
}

#[test]
fn the_set_is_send_sync_default_and_debug() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<WeakSet<String>>();
    let set: WeakSet<String> = WeakSet::default();
    assert_eq!(format!("{set:?}"), "WeakSet { len: 0, .. }");
}

/// An observer registry of mixed listener types: `WeakSet<dyn Trait>`.
trait Listener: Send + Sync {
    fn notify(&self) -> usize;
}

struct Counting(Arc<AtomicUsize>);

impl Listener for Counting {
    fn notify(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

#[repr(align(64))]
struct Wide([u64; 9]);

impl Listener for Wide {
    fn notify(&self) -> usize {
        self.0.len()
    }
}

#[test]
fn a_set_of_trait_objects_holds_mixed_types_by_identity() {
    let set: WeakSet<dyn Listener> = WeakSet::new();
    let heard = Arc::new(AtomicUsize::new(0));
    let counting: Strong<dyn Listener> = weakrefs::unsize!(Strong::new(Counting(heard.clone())));
    let wide: Strong<dyn Listener> = weakrefs::unsize!(Strong::new(Wide([0; 9])));
    let again = counting.clone();
    assert!(set.insert(&counting));
    assert!(!set.insert(&again), "one object, one member");
    assert!(set.insert(&wide));
    let mut answers: Vec<usize> = set.iter().map(|l| l.notify()).collect();
    answers.sort();
    assert_eq!(answers, [1, 9]);
    drop((counting, again));
    flush();
    assert_eq!(set.len(), 1);
    assert!(set.contains(&wide));
    assert!(set.remove(&wide));
    assert!(set.is_empty());
}

#[test]
fn a_set_of_strs_and_slices() {
    let names: WeakSet<str> = WeakSet::new();
    let a: Strong<str> = Strong::from("alpha");
    let b: Strong<str> = Strong::from(String::from("alpha"));
    assert!(names.insert(&a));
    assert!(names.insert(&b), "equal text, another object");
    assert_eq!(names.len(), 2);
    drop(a);
    flush();
    assert_eq!(names.iter().map(|s| s.len()).sum::<usize>(), 5);
    let bytes: WeakSet<[u8]> = WeakSet::new();
    let blob: Strong<[u8]> = Strong::from(vec![1u8, 2, 3]);
    bytes.insert(&blob);
    assert_eq!(&*bytes.iter().next().unwrap(), &[1, 2, 3]);
}

/// A set grown from empty rebuilds its shards many times: every object is
/// filed once however often it is offered (each insert looks for it and
/// files it in one walk of the probe sequence, across rebuilds), and
/// iteration, which reuses one buffer for every shard, yields each member
/// exactly once.
#[test]
fn a_growing_set_files_each_object_once_and_yields_it_once() {
    let count = if cfg!(miri) { 200 } else { 5_000 };
    let set = WeakSet::new();
    let members: Vec<_> = (0..count).map(Strong::new).collect();
    for (i, member) in members.iter().enumerate() {
        assert!(set.insert(member), "member {i} was filed before");
        // Offer an earlier one again, while the shards keep growing.
        assert!(!set.insert(&members[i / 2]), "member {} filed twice", i / 2);
    }
    assert_eq!(set.len(), count);
    for member in &members {
        assert!(!set.insert(member));
    }
    assert_eq!(set.len(), count);
    let yielded: Vec<usize> = set.iter().map(|m| Strong::as_ptr(&m) as usize).collect();
    let distinct: HashSet<usize> = yielded.iter().copied().collect();
    assert_eq!(
        yielded.len(),
        count,
        "iteration yielded a member twice or missed one"
    );
    assert_eq!(distinct.len(), count);
    assert!(members
        .iter()
        .all(|m| distinct.contains(&(Strong::as_ptr(m) as usize))));
}

/// M14: `purge` on a thread that then goes idle removes a dying member
/// (count at zero, callbacks not yet run), and must detach its hook at
/// once: the entry's deferred drop, which would detach it too, waits in
/// that thread's epoch bag while the set is dropped elsewhere and the
/// epoch moves on. A hook still attached would then be claimed by the
/// dying thread and read the set's freed core: Miri (run 3 of
/// `.ci/miri`) reported that use-after-free before `purge` detached.
#[test]
fn a_purged_dying_member_never_reaches_its_dropped_set() {
    use std::sync::mpsc;
    let set: Arc<WeakSet<dying::SlowToDie>> = Arc::new(WeakSet::new());
    let (member, finish_dying) = dying::slow_to_die();
    let member = Strong::new(member);
    set.insert(&member);
    let dying = dying::start_dying(member);
    let (purged, purge_count) = mpsc::channel::<usize>();
    let (wake_purger, purger_idles) = mpsc::channel::<()>();
    let purger = {
        let set = set.clone();
        thread::spawn(move || {
            purged.send(set.purge()).unwrap();
            drop(set);
            // Idle, its epoch bag unflushed.
            let _ = purger_idles.recv();
        })
    };
    assert_eq!(purge_count.recv().unwrap(), 1);
    while Arc::strong_count(&set) > 1 {
        thread::yield_now();
    }
    drop(set);
    let churn: WeakSet<u8> = WeakSet::new();
    let other = Strong::new(2u8);
    for _ in 0..if cfg!(miri) { 100 } else { 300 } {
        churn.insert(&other);
        churn.remove(&other);
    }
    finish_dying.send(()).unwrap();
    dying.join().unwrap();
    wake_purger.send(()).unwrap();
    purger.join().unwrap();
}

/// An iterator holds a `Strong` to each member of the shard it has
/// snapshotted until it yields it or is dropped (the docs of `iter`): a
/// member whose last other handle goes meanwhile stays, with its callback
/// unrun, and dies once the iterator lets go.
#[test]
fn an_iterator_holds_its_snapshot_until_dropped() {
    let count = if cfg!(miri) { 64 } else { 1000 };
    let set = WeakSet::new();
    let ran = Arc::new(AtomicUsize::new(0));
    let members: Vec<_> = (0..count).map(Strong::new).collect();
    for member in &members {
        set.insert(member);
        let ran = ran.clone();
        // Dropping the `Finalizer` leaves the callback registered.
        drop(weakrefs::finalize(member, move || {
            ran.fetch_add(1, Ordering::SeqCst);
        }));
    }
    snapshot::held_until_dropped(set.iter(), members, count, || set.len(), Some(&ran));
}
