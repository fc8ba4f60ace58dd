//! One test in a process of its own, so that no other test's pin holds the
//! epoch back: an object filed under many keys dies, and one `flush`
//! drops (nearly) every entry its death removed, not only the few
//! collection steps' worth that used to go per call.

use std::sync::atomic::{AtomicUsize, Ordering};

use weakrefs::{flush, Strong, WeakValueMap};

static DROPPED: AtomicUsize = AtomicUsize::new(0);

/// A key with a destructor, so that its drop is counted (and, as user
/// code, handed to the finalizer thread).
#[derive(Hash, PartialEq, Eq, Clone)]
struct Key(u64);

impl Drop for Key {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn one_flush_drops_every_entry_a_mass_death_removed() {
    const KEYS: u64 = if cfg!(miri) { 2_000 } else { 100_000 };
    // Sized up front: no rebuild, so no cloned keys to count.
    let map = WeakValueMap::with_capacity(KEYS as usize);
    let value = Strong::new(0u64);
    for key in 0..KEYS {
        map.insert(Key(key), &value);
    }
    let before = DROPPED.load(Ordering::Relaxed);
    drop(value);
    assert!(map.is_empty(), "the death left entries in the map");
    flush();
    // Nearly all: a bag of removed entries sealed while a thread that got
    // descheduled was pinned (on a busy machine, the finalizer thread) may
    // wait for the next flush. Before `flush` stepped the collector for as
    // long as steps freed something, one flush dropped about 14% of them
    // (three steps' worth and what the finalizer thread pushed).
    let dropped = DROPPED.load(Ordering::Relaxed) - before;
    assert!(
        dropped >= KEYS as usize * 9 / 10,
        "one flush after the death dropped {dropped} of the {KEYS} removed keys"
    );
    // And the rest, once the epoch moves on.
    for _ in 0..100 {
        if DROPPED.load(Ordering::Relaxed) - before == KEYS as usize {
            break;
        }
        flush();
    }
    assert_eq!(DROPPED.load(Ordering::Relaxed) - before, KEYS as usize);
}
