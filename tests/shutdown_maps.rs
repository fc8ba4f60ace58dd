//! `shutdown()` and the collections: a test binary of its own, since
//! shutdown is process-wide (and Miri runs it with the map tests, which
//! leave the finalizer thread parked).

#[path = "support/one_shard.rs"]
mod one_shard;

use std::hash::{Hash, Hasher};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::Duration;

use one_shard::OneShard;
use weakrefs::{shutdown, Strong, WeakSet, WeakValueMap};

/// The collections' removal callbacks are not `atexit` finalizers:
/// `shutdown` leaves the entries of live objects alone, and a death after
/// it removes its entry inline, in the dropping thread, at the drop.
#[test]
fn shutdown_leaves_live_entries_and_later_deaths_remove_theirs_inline() {
    let (a, b) = (Strong::new("a"), Strong::new("b"));
    let map = WeakValueMap::new();
    map.insert("a", &a);
    map.insert("b", &b);
    let set = WeakSet::new();
    set.insert(&a);
    set.insert(&b);

    shutdown();
    assert_eq!(map.len(), 2, "shutdown ran a map's removal callbacks");
    assert_eq!(set.len(), 2, "shutdown ran a set's removal callbacks");
    assert_eq!(map.get("a").as_deref(), Some(&"a"));

    drop(a);
    assert_eq!(map.len(), 1, "the entry went with its value, inline");
    assert_eq!(set.len(), 1, "the member went with its object, inline");
    assert!(set.contains(&b));

    // A death under the dying thread's own shard lock (inside `Eq` during a
    // write): with no finalizer thread to hand the removal to, it must not
    // wait for that lock. Its removal is parked, and the next `flush`
    // makes it, once the lock is free: `len` is exact after it. A second
    // such death is made by `purge`, or by a death of the other test's
    // (deaths try parked removals): gone either way.
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        let map: WeakValueMap<DroppingKey, u32, OneShard> = WeakValueMap::with_hasher(OneShard);
        let victim = Strong::new(1);
        map.insert(DroppingKey(1), &victim);
        *VICTIM.lock().unwrap() = Some(victim);
        let survivor = Strong::new(2);
        map.insert(DroppingKey(2), &survivor); // the victim dies in `Eq`
        let before_flush = map.len();
        weakrefs::flush();
        let after_flush = map.len();
        let second = Strong::new(3);
        map.insert(DroppingKey(3), &second);
        *VICTIM.lock().unwrap() = Some(second);
        let third = Strong::new(4);
        map.insert(DroppingKey(4), &third); // the second dies in `Eq`
        let purged = map.purge();
        let _ = done.send((before_flush, after_flush, purged, map.len()));
        drop((survivor, third));
    });
    let (before_flush, after_flush, purged, len) = finished
        .recv_timeout(Duration::from_secs(120))
        .expect("deadlock: a death under its own shard lock after shutdown");
    assert_eq!(
        (before_flush, after_flush),
        (2, 1),
        "flush made the parked removal"
    );
    assert!(purged <= 1, "purged {purged}");
    assert_eq!(len, 2, "the second dead entry is gone");
}

/// After `shutdown`, values die on one thread while another keeps writing
/// the same map, so that deaths often find their shard's lock taken:
/// their removals are parked, and `flush` makes them all (a hostile-use
/// hunt once found thousands of dead entries left after it).
#[test]
fn after_shutdown_flush_removes_what_deaths_found_busy() {
    shutdown();
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        let map = std::sync::Arc::new(WeakValueMap::new());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (map, stop) = (map.clone(), stop.clone());
            thread::spawn(move || {
                let kept = Strong::new(0u64);
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    map.insert(1_000_000 + i % 64, &kept);
                    i += 1;
                }
                for key in 0..64 {
                    map.remove(&(1_000_000 + key));
                }
            })
        };
        let deaths: u64 = if cfg!(miri) { 200 } else { 100_000 };
        for key in 0..deaths {
            let value = Strong::new(key);
            map.insert(key, &value);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        writer.join().unwrap();
        weakrefs::flush();
        let _ = done.send(map.len());
    });
    let len = finished
        .recv_timeout(Duration::from_secs(300))
        .expect("deadlock: flush making parked removals");
    assert_eq!(len, 0, "dead entries left after flush");
}

static VICTIM: Mutex<Option<Strong<u32>>> = Mutex::new(None);

/// A key whose `Eq` drops the last handle to the victim.
#[derive(Clone)]
struct DroppingKey(u32);

impl PartialEq for DroppingKey {
    fn eq(&self, other: &Self) -> bool {
        drop(VICTIM.lock().unwrap().take());
        self.0 == other.0
    }
}
impl Eq for DroppingKey {}
impl Hash for DroppingKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}
