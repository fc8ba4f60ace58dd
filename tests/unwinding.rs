//! No handle leaks on an unwind path: a method that hands a value back
//! while user code (a key's or a closure's destructor) still has to run
//! drops those leftovers first, so a panic there drops the value too
//! instead of stranding it in a return under way (whose count would then
//! stay one too high forever: the value would never die, nor its entry
//! leave the map).

#[path = "support/settle.rs"]
mod settle;

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};

use weakrefs::{flush, Strong, WeakKeyMap, WeakValueMap};

/// A key (or a capture) whose destructor panics when armed; equal and
/// hashed by `id` alone.
#[derive(Clone, Debug)]
struct DropBomb {
    id: u32,
    armed: bool,
}

impl PartialEq for DropBomb {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for DropBomb {}
impl Hash for DropBomb {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}
impl Drop for DropBomb {
    fn drop(&mut self) {
        if self.armed {
            panic!("destructor failure (expected by this test)");
        }
    }
}

fn bomb(id: u32) -> DropBomb {
    DropBomb { id, armed: true }
}

fn dud(id: u32) -> DropBomb {
    DropBomb { id, armed: false }
}

/// Runs a future to completion on a current-thread runtime.
fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(future)
}

#[test]
fn a_panicking_key_destructor_in_get_or_insert_with_leaks_no_handle() {
    let map: WeakValueMap<DropBomb, u32> = WeakValueMap::new();
    let value = Strong::new(1);
    map.insert(dud(1), &value);
    let found = catch_unwind(AssertUnwindSafe(|| map.get_or_insert_with(bomb(1), || 2)));
    assert!(found.is_err(), "the key's panic reaches the caller");
    assert_eq!(Strong::strong_count(&value), 1);
    drop(value);
    flush();
    assert!(map.is_empty(), "the value died and its entry left");
}

#[test]
fn a_panicking_unused_init_in_get_or_insert_with_leaks_no_handle() {
    let map: WeakValueMap<DropBomb, u32> = WeakValueMap::new();
    let value = Strong::new(1);
    map.insert(dud(1), &value);
    let capture = bomb(9);
    let found = catch_unwind(AssertUnwindSafe(|| {
        map.get_or_insert_with(dud(1), move || {
            let _ = &capture;
            2
        })
    }));
    assert!(found.is_err(), "the capture's panic reaches the caller");
    assert_eq!(Strong::strong_count(&value), 1);
    let tried = catch_unwind(AssertUnwindSafe(|| {
        let capture = bomb(10);
        map.try_get_or_insert_with(dud(1), move || {
            let _ = &capture;
            Ok::<_, ()>(2)
        })
    }));
    assert!(tried.is_err());
    assert_eq!(Strong::strong_count(&value), 1);
}

#[test]
fn a_panicking_key_destructor_in_the_async_variant_leaks_no_handle() {
    let map: WeakValueMap<DropBomb, u32> = WeakValueMap::new();
    let value = Strong::new(1);
    map.insert(dud(1), &value);
    let found = catch_unwind(AssertUnwindSafe(|| {
        block_on(map.get_or_insert_with_async(bomb(1), || async { 2 }))
    }));
    assert!(found.is_err());
    assert_eq!(Strong::strong_count(&value), 1);
    let capture = bomb(9);
    let found = catch_unwind(AssertUnwindSafe(|| {
        block_on(
            map.try_get_or_insert_with_async(dud(1), move || async move {
                let _ = &capture;
                Ok::<_, ()>(2)
            }),
        )
    }));
    assert!(found.is_err());
    assert_eq!(Strong::strong_count(&value), 1);
}

#[test]
fn a_panicking_unused_init_in_weak_key_map_leaks_no_clone() {
    let map: WeakKeyMap<u32, Strong<u32>> = WeakKeyMap::new();
    let key = Strong::new(0);
    let value = Strong::new(1);
    map.insert(&key, value.clone());
    let capture = bomb(9);
    let found = catch_unwind(AssertUnwindSafe(|| {
        map.get_or_insert_with(&key, move || {
            let _ = &capture;
            Strong::new(2)
        })
    }));
    assert!(found.is_err());
    // Ours and the map's: the clone made for the caller went with the panic.
    assert_eq!(Strong::strong_count(&value), 2);
    let capture = bomb(10);
    let found = catch_unwind(AssertUnwindSafe(|| {
        block_on(map.get_or_insert_with_async(&key, move || async move {
            let _ = &capture;
            Strong::new(2)
        }))
    }));
    assert!(found.is_err());
    assert_eq!(Strong::strong_count(&value), 2);
    drop(key);
    // The entry goes with its key at once; its value is dropped once no
    // reader can see it (other tests here may be mid-lookup).
    settle::until(|| Strong::strong_count(&value) == 1, flush);
    assert_eq!(
        Strong::strong_count(&value),
        1,
        "the entry went with its key"
    );
}

/// A failed load settles before its error is handed back: settling drops
/// the load's key, and if that destructor panics, the error (here a
/// handle) goes with the panic instead of leaking.
#[test]
fn a_panicking_key_destructor_after_a_failed_load_leaks_no_error() {
    let map: WeakValueMap<DropBomb, u32> = WeakValueMap::new();
    let held = Strong::new(0u8);
    let failed = catch_unwind(AssertUnwindSafe(|| {
        let error = held.clone();
        map.try_get_or_insert_with(bomb(1), move || Err::<u32, _>(error))
    }));
    assert!(failed.is_err(), "the key's panic reaches the caller");
    assert_eq!(Strong::strong_count(&held), 1);
    let failed = catch_unwind(AssertUnwindSafe(|| {
        let error = held.clone();
        block_on(
            map.try_get_or_insert_with_async(bomb(2), move || async move { Err::<u32, _>(error) }),
        )
    }));
    assert!(failed.is_err());
    assert_eq!(Strong::strong_count(&held), 1);
    assert!(map.is_empty());
}
