//! After `shutdown()`, removals that found their shard busy are parked and
//! made later (SAFETY.md, C19); each runs as a callback does. A test binary
//! of its own: shutdown is process-wide, and the keys here share one
//! static. Each case found by a review of the parking, which failed it.

#[path = "support/one_shard.rs"]
mod one_shard;

use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::Duration;

use one_shard::OneShard;
use weakrefs::{flush, shutdown, RemovalCause, Strong, WeakValueMap};

/// The value the next key comparison drops.
static VICTIM: Mutex<Option<Strong<u32>>> = Mutex::new(None);
/// The value a listener drops.
static SECOND: Mutex<Option<Strong<u32>>> = Mutex::new(None);

/// A key whose `Eq` drops the last handle to the victim, under the shard's
/// lock: its death finds its own shard busy, and is parked.
#[derive(Clone)]
struct DroppingKey(u32);

impl PartialEq for DroppingKey {
    fn eq(&self, other: &Self) -> bool {
        let victim = VICTIM.lock().unwrap().take();
        drop(victim);
        self.0 == other.0
    }
}
impl Eq for DroppingKey {}
impl Hash for DroppingKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

type Map = WeakValueMap<DroppingKey, u32, OneShard>;

/// Inserts `value` under key 1 of `map`, then makes it die inside the `Eq`
/// of an insert under key 2, which holds the shard's lock: its removal is
/// parked.
fn die_under_the_lock(map: &Map, value: Strong<u32>, keep: &Strong<u32>) {
    map.insert(DroppingKey(1), &value);
    *VICTIM.lock().unwrap() = Some(value);
    map.insert(DroppingKey(2), keep);
}

fn panicking_listener_map() -> Map {
    WeakValueMap::builder()
        .hasher(OneShard)
        .on_remove(|_: &DroppingKey, cause| {
            if cause == RemovalCause::Died {
                panic!("a removal listener's failure (expected by this test)");
            }
        })
        .build()
}

#[test]
fn parked_removals_run_as_callbacks() {
    shutdown();
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        let keep = Strong::new(0);

        // A parked removal's listener panics: caught and reported inside
        // `flush`, as a callback's panic is, and the entry is gone.
        let noisy = panicking_listener_map();
        die_under_the_lock(&noisy, Strong::new(1), &keep);
        assert_eq!(noisy.len(), 2, "parked, not removed");
        let escaped = catch_unwind(AssertUnwindSafe(flush)).is_err();
        assert!(!escaped, "a listener's panic escaped flush");
        assert_eq!(noisy.len(), 1);

        // A removal parked behind one whose listener panics is not lost:
        // a later death tries both (the second death here), and the next
        // flush makes what is left.
        let quiet: Map = WeakValueMap::with_hasher(OneShard);
        die_under_the_lock(&noisy, Strong::new(3), &keep);
        die_under_the_lock(&quiet, Strong::new(4), &keep);
        flush();
        assert_eq!(
            (noisy.len(), quiet.len()),
            (1, 1),
            "a parked removal was lost"
        );

        // A parked removal's listener drops another value of a map whose
        // lock this thread holds (in `Eq`), and flushes: inside a callback,
        // that flush only tries, where waiting would be for itself.
        let flushing: Map = WeakValueMap::builder()
            .hasher(OneShard)
            .on_remove(|_: &DroppingKey, cause| {
                if cause == RemovalCause::Died {
                    drop(SECOND.lock().unwrap().take());
                    flush();
                }
            })
            .build();
        die_under_the_lock(&flushing, Strong::new(5), &keep);
        let busy: Map = WeakValueMap::with_hasher(OneShard);
        let other = Strong::new(6);
        busy.insert(DroppingKey(3), &other);
        *SECOND.lock().unwrap() = Some(other);
        // The death in this `Eq` is parked, and tries the parked removals:
        // `flushing`'s runs, and its listener kills `other`, in `busy`.
        die_under_the_lock(&busy, Strong::new(7), &keep);
        flush();
        assert_eq!((flushing.len(), busy.len()), (1, 1));
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(60))
        .expect("deadlock: a parked removal's listener flushed under its own lock");
}
