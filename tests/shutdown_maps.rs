//! `shutdown()` and the collections: a test binary of its own, since
//! shutdown is process-wide (and Miri runs it with the map tests, which
//! need crossbeam-epoch's relaxations).

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
}
