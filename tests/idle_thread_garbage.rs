//! One test in a process of its own, with a counting allocator: values a
//! thread removed from a `WeakKeyMap` are freed by `flush` even if that
//! thread then goes idle. What a thread hands the epoch waits in its own
//! bag until it hands over more or exits, where `flush` cannot reach it;
//! a removed value, which may be a large buffer, must not wait there.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use weakrefs::{flush, Strong, WeakKeyMap};

/// Bytes allocated and not yet freed, process-wide.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: forwards every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
#[cfg_attr(
    miri,
    ignore = "20 MiB of buffers and a hundred flushes: slow under Miri, and no unsafe code of the crate's own"
)]
fn values_a_thread_removed_are_freed_by_flush_while_it_idles() {
    const VALUES: usize = 20;
    const SIZE: usize = 1 << 20;
    let map: &'static WeakKeyMap<u64, Vec<u8>> = Box::leak(Box::new(WeakKeyMap::new()));
    flush();
    let before = LIVE.load(Ordering::Relaxed);
    let (removed, done) = mpsc::channel();
    let (finish, idle) = mpsc::channel::<()>();
    let worker = thread::spawn(move || {
        for i in 0..VALUES as u64 {
            let key = Strong::new(i);
            map.insert(&key, vec![1; SIZE]);
        }
        removed.send(()).unwrap();
        // Idle, alive, until the test ends: its bag is never handed over
        // by more retirements or by its exit.
        let _ = idle.recv();
    });
    done.recv_timeout(Duration::from_secs(60))
        .expect("the worker finished its removals");
    assert!(map.is_empty(), "every key died");
    let mut live = LIVE.load(Ordering::Relaxed) - before;
    for _ in 0..100 {
        if live < SIZE as isize {
            break;
        }
        flush();
        live = LIVE.load(Ordering::Relaxed) - before;
    }
    assert!(
        live < SIZE as isize,
        "{live} bytes still allocated after the removed values' flushes: an idle thread keeps them"
    );
    drop(finish);
    worker.join().unwrap();
}
