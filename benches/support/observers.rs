//! The observer-registry operations that `benches/sets.rs` and
//! `benches/map_ab.rs` both time, on a `WeakSet` and on the registry users
//! write by hand, a `Mutex<Vec<std::sync::Weak<T>>>`.

use std::hint::black_box;
use std::sync::{Arc, Mutex, Weak as StdWeak};

/// One notification pass over the set's members, each upgraded: the sum
/// of their values.
pub fn notify_set(set: &weakrefs::WeakSet<usize>) -> usize {
    set.iter().map(|member| black_box(*member)).sum()
}

/// The same over the list: a snapshot under the lock, the pass outside
/// it, as observer lists do.
pub fn notify_list(list: &Mutex<Vec<StdWeak<usize>>>) -> usize {
    let snapshot: Vec<Arc<usize>> = list
        .lock()
        .unwrap()
        .iter()
        .filter_map(StdWeak::upgrade)
        .collect();
    snapshot.iter().map(|member| black_box(**member)).sum()
}

/// `members` subscribing to a new set, each registering its death
/// callback.
pub fn subscribe_set(members: &[weakrefs::Strong<usize>]) -> weakrefs::WeakSet<usize> {
    let set = weakrefs::WeakSet::with_capacity(members.len());
    for member in members {
        set.insert(member);
    }
    set
}

/// `members` subscribing to a new list, one push under the lock each.
pub fn subscribe_list(members: &[Arc<usize>]) -> Mutex<Vec<StdWeak<usize>>> {
    let list = Mutex::new(Vec::with_capacity(members.len()));
    for member in members {
        list.lock().unwrap().push(Arc::downgrade(member));
    }
    list
}
