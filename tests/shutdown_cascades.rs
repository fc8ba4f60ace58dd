//! C15 after `shutdown()`, in a test binary of its own since shutdown is
//! process-wide: once callbacks run inline on the thread that drops an
//! object, cascades (a callback or a value that holds the only `Strong` to
//! the next object) run one link after another, never nested, so a chain
//! of any length fits on a 2 MiB stack, as a chain of `Arc`s does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::thread;

use weakrefs::{flush, shutdown, Strong, WeakKeyMap};

#[path = "support/chains.rs"]
mod chains;
use chains::{callback_chain, LINKS};

fn shut_down() {
    static SHUTDOWN: Once = Once::new();
    SHUTDOWN.call_once(shutdown);
}

/// Runs `body` on a thread with a 2 MiB stack, where a nested cascade of
/// this length would overflow.
fn on_small_stack<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(body)
        .expect("spawn")
        .join()
        .expect("the cascade finished")
}

#[test]
fn a_finalize_chain_after_shutdown_runs_inline_without_nesting() {
    shut_down();
    for flushing in [false, true] {
        let ran = Arc::new(AtomicUsize::new(0));
        let head = callback_chain(LINKS, flushing, &ran);
        let counted = ran.clone();
        // The whole chain runs inside this one drop, link after link.
        on_small_stack(move || drop(head));
        assert_eq!(
            counted.load(Ordering::SeqCst),
            LINKS,
            "flushing: {flushing}"
        );
    }
}

#[test]
fn a_weak_key_map_cascade_after_shutdown_does_not_nest() {
    shut_down();
    let map: Arc<WeakKeyMap<usize, Option<Strong<usize>>>> = Arc::new(WeakKeyMap::new());
    let mut next: Option<Strong<usize>> = None;
    for link in 0..LINKS {
        let key = Strong::new(link);
        // Each value holds the only `Strong` to the previous key.
        map.insert(&key, next.take());
        next = Some(key);
    }
    assert_eq!(map.len(), LINKS);
    let head = next.expect("at least one link");
    let cascade = map.clone();
    let left = on_small_stack(move || {
        drop(head);
        // Each removed value is dropped once no reader can see it, which
        // lets the next key die: the cascade moves with the epoch, which
        // each `flush` pushes on.
        for _ in 0..LINKS * 100 {
            if cascade.is_empty() {
                break;
            }
            flush();
        }
        cascade.len()
    });
    assert_eq!(left, 0, "the cascade stopped");
}

/// The same chain, dropped at thread exit by a thread-local's destructor
/// that runs after the crate's own thread-locals with destructors have
/// gone: the loop's list no longer lives in one of them (it did, and there
/// each link nested, overflowing the stack after about 1400 links).
#[test]
fn a_chain_a_thread_local_drops_at_thread_exit_does_not_nest() {
    use std::cell::RefCell;

    thread_local! {
        static HEAD: RefCell<Option<Strong<usize>>> = const { RefCell::new(None) };
    }
    shut_down();
    let ran = Arc::new(AtomicUsize::new(0));
    let head = callback_chain(LINKS, false, &ran);
    on_small_stack(move || {
        // Ours first; then one inline callback sets up the crate's
        // thread-locals, which thread exit tears down before ours.
        HEAD.with(|slot| *slot.borrow_mut() = Some(head));
        let object = Strong::new(0);
        weakrefs::finalize(&object, || {});
        drop(object);
    });
    assert_eq!(ran.load(Ordering::SeqCst), LINKS);
}
