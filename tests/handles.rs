//! API.md's handle semantics: `Strong`, `Weak`, `ReferenceError`.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use weakrefs::{ReferenceError, Strong, Weak};

/// Counts its drops and remembers the thread that dropped it.
struct Probe {
    drops: Arc<AtomicUsize>,
    dropped_on: Arc<Mutex<Option<thread::ThreadId>>>,
}

impl Probe {
    fn new() -> (Self, Arc<AtomicUsize>, Arc<Mutex<Option<thread::ThreadId>>>) {
        let drops = Arc::new(AtomicUsize::new(0));
        let dropped_on = Arc::new(Mutex::new(None));
        let probe = Probe {
            drops: drops.clone(),
            dropped_on: dropped_on.clone(),
        };
        (probe, drops, dropped_on)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
        *self.dropped_on.lock().unwrap() = Some(thread::current().id());
    }
}

fn hash_of<T: Hash>(value: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

#[test]
fn counts_follow_clones_and_downgrades() {
    let a = Strong::new(10);
    assert_eq!((Strong::strong_count(&a), Strong::weak_count(&a)), (1, 0));
    let b = a.clone();
    let w1 = Strong::downgrade(&a);
    let w2 = w1.clone();
    assert_eq!((Strong::strong_count(&a), Strong::weak_count(&a)), (2, 2));
    assert_eq!((w1.strong_count(), w1.weak_count()), (2, 2));
    drop(b);
    drop(w2);
    assert_eq!((Strong::strong_count(&a), Strong::weak_count(&a)), (1, 1));
    drop(a);
    assert_eq!((w1.strong_count(), w1.weak_count()), (0, 0));
}

#[test]
fn value_is_dropped_once_at_the_last_strong_drop_in_that_thread() {
    let (probe, drops, dropped_on) = Probe::new();
    let strong = Strong::new(probe);
    let weak = Strong::downgrade(&strong);
    let other = strong.clone();
    drop(strong);
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    let dropper = thread::spawn(move || {
        drop(other);
        thread::current().id()
    })
    .join()
    .unwrap();
    // Dropped at that moment, before any Weak goes away, in that thread.
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    assert_eq!(*dropped_on.lock().unwrap(), Some(dropper));
    assert!(weak.upgrade().is_none());
    drop(weak);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

#[test]
fn upgrade_succeeds_while_alive_and_never_after() {
    let strong = Strong::new(String::from("doc"));
    let weak = Strong::downgrade(&strong);
    let upgraded = weak.upgrade().expect("alive");
    assert!(Strong::ptr_eq(&strong, &upgraded));
    assert!(weak.is_alive());
    drop(strong);
    assert!(weak.is_alive(), "the upgraded handle keeps it alive");
    drop(upgraded);
    assert!(!weak.is_alive());
    for _ in 0..3 {
        assert!(weak.upgrade().is_none());
    }
}

#[test]
fn try_upgrade_reports_python_message() {
    let strong = Strong::new(1u8);
    let weak = Strong::downgrade(&strong);
    assert_eq!(*weak.try_upgrade().unwrap(), 1);
    drop(strong);
    let err = weak.try_upgrade().unwrap_err();
    assert_eq!(err, ReferenceError);
    assert_eq!(err.to_string(), "weakly-referenced object no longer exists");
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(err);
    assert!(boxed.source().is_none());
}

#[test]
fn weak_new_never_upgrades() {
    let weak: Weak<Vec<u8>> = Weak::new();
    let default: Weak<Vec<u8>> = Weak::default();
    assert!(weak.upgrade().is_none());
    assert!(weak.try_upgrade().is_err());
    assert!(!weak.is_alive());
    assert_eq!((weak.strong_count(), weak.weak_count()), (0, 0));
    assert!(weak.ptr_eq(&default));
    assert_eq!(weak, weak.clone());
    assert_eq!(format!("{weak:?}"), "(Weak: dead)");
}

#[test]
fn weak_identity_hash_and_eq_survive_death() {
    let a = Strong::new(5);
    let b = Strong::new(5); // equal value, different object
    let wa = Strong::downgrade(&a);
    let wb = Strong::downgrade(&b);
    assert_ne!(wa, wb, "Weak equality is identity, not value");
    assert_eq!(wa, wa.clone());
    let hash_alive = hash_of(&wa);
    let mut set = HashSet::new();
    set.insert(wa.clone());
    set.insert(wb.clone());
    assert_eq!(format!("{wa:?}"), "(Weak: alive)");

    drop(a);
    assert_eq!(format!("{wa:?}"), "(Weak: dead)");
    assert_eq!(hash_of(&wa), hash_alive, "hash changed at death");
    assert!(set.contains(&wa), "dead Weak no longer found in a set");
    assert!(set.contains(&wb));
    assert_eq!(wa, wa.clone());
    assert!(wa.ptr_eq(&set.get(&wa).unwrap().clone()));
}

#[test]
fn strong_compares_and_hashes_by_value() {
    let a = Strong::new(String::from("k"));
    let b = Strong::new(String::from("k"));
    let c = Strong::new(String::from("z"));
    assert_eq!(a, b);
    assert!(a < c);
    assert_eq!(hash_of(&a), hash_of(&String::from("k")));
    let set: HashSet<Strong<String>> = [a.clone(), c.clone()].into_iter().collect();
    assert!(set.contains(&String::from("k")), "Borrow<T> lookup");
    let ordered: BTreeSet<Strong<String>> = [c.clone(), b.clone()].into_iter().collect();
    assert_eq!(ordered.iter().next().unwrap().as_str(), "k");
    assert!(!Strong::ptr_eq(&a, &b));
}

#[test]
fn formatting_and_conversions() {
    let s: Strong<i32> = Strong::from(42);
    assert_eq!(format!("{s}"), "42");
    assert_eq!(format!("{s:?}"), "42");
    assert_eq!(format!("{s:p}"), format!("{:p}", Strong::as_ptr(&s)));
    let as_ref: &i32 = s.as_ref();
    assert_eq!(*as_ref, 42);
    let d: Strong<Vec<u8>> = Strong::default();
    assert!(d.is_empty());
    // as_ptr names the value and is stable across clones.
    assert_eq!(Strong::as_ptr(&s), Strong::as_ptr(&s.clone()));
    assert_eq!(Strong::as_ptr(&s), &*s as *const i32);
}

#[test]
fn try_unwrap_only_for_the_last_strong() {
    let (probe, drops, _) = Probe::new();
    let a = Strong::new(probe);
    let weak = Strong::downgrade(&a);
    let b = a.clone();
    let a = Strong::try_unwrap(a).err().expect("b shares it");
    drop(b);
    let value = Strong::try_unwrap(a).ok().expect("last strong");
    assert!(
        weak.upgrade().is_none(),
        "the object is gone once unwrapped"
    );
    assert_eq!(
        drops.load(Ordering::SeqCst),
        0,
        "value moved out, not dropped"
    );
    drop(value);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

#[test]
fn get_mut_needs_the_only_handle_of_either_kind() {
    let mut a = Strong::new(vec![1]);
    Strong::get_mut(&mut a).unwrap().push(2);
    let b = a.clone();
    assert!(Strong::get_mut(&mut a).is_none());
    drop(b);
    let weak = Strong::downgrade(&a);
    assert!(Strong::get_mut(&mut a).is_none());
    drop(weak);
    Strong::get_mut(&mut a).unwrap().push(3);
    assert_eq!(*a, [1, 2, 3]);
    // The count is unlocked again: downgrade still works.
    let weak = Strong::downgrade(&a);
    assert_eq!(*weak.upgrade().unwrap(), [1, 2, 3]);
}

#[test]
fn a_panicking_destructor_still_frees_the_block() {
    struct Bomb(Arc<AtomicUsize>);
    impl Drop for Bomb {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("boom");
        }
    }
    let drops = Arc::new(AtomicUsize::new(0));
    let strong = Strong::new(Bomb(drops.clone()));
    let weak = Strong::downgrade(&strong);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(strong)));
    assert!(result.is_err());
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    assert!(weak.upgrade().is_none());
    // Miri reports the block as leaked if the implicit weak was not
    // released during the unwind.
    drop(weak);
}

#[test]
fn handles_are_send_and_sync_like_arc() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Strong<String>>();
    send_sync::<Weak<String>>();
    send_sync::<Strong<std::sync::Mutex<u8>>>();
    send_sync::<ReferenceError>();
    fn unwind_safe<T: std::panic::UnwindSafe + std::panic::RefUnwindSafe>() {}
    unwind_safe::<Strong<u8>>();
    unwind_safe::<Weak<u8>>();
    // The negative cases (Rc, Cell) are compile_fail doctests on `Strong`.
}

#[test]
fn upgrade_racing_the_last_drop_never_revives() {
    let rounds = if cfg!(miri) { 20 } else { 2_000 };
    for _ in 0..rounds {
        let (probe, drops, _) = Probe::new();
        let strong = Strong::new(probe);
        let weak = Strong::downgrade(&strong);
        let upgrader = thread::spawn(move || {
            let mut seen_dead = false;
            loop {
                match weak.upgrade() {
                    Some(again) => {
                        // A successful upgrade always finds the value intact.
                        assert!(!seen_dead, "upgrade revived a dead object");
                        assert_eq!(again.drops.load(Ordering::SeqCst), 0);
                    }
                    None => {
                        seen_dead = true;
                        break;
                    }
                }
            }
            seen_dead
        });
        drop(strong);
        assert!(upgrader.join().unwrap());
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }
}
