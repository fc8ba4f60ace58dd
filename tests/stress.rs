//! Many threads hammering one object: exact accounting of drops.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use weakrefs::Strong;

struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Threads clone, downgrade, upgrade and drop handles to shared objects;
/// every object is dropped exactly once, when its last strong handle goes,
/// and never while a thread still holds an upgraded handle.
#[test]
fn concurrent_clone_downgrade_upgrade_drop() {
    let threads = 4;
    let objects = if cfg!(miri) { 3 } else { 200 };
    let ops = if cfg!(miri) { 50 } else { 2_000 };
    for _ in 0..objects {
        let drops = Arc::new(AtomicUsize::new(0));
        let root = Strong::new(Counted(drops.clone()));
        let start = Arc::new(Barrier::new(threads));
        let workers: Vec<_> = (0..threads)
            .map(|id| {
                let mine = root.clone();
                let weak = Strong::downgrade(&root);
                let start = start.clone();
                let drops = drops.clone();
                thread::spawn(move || {
                    start.wait();
                    let mut held = vec![mine];
                    for op in 0..ops {
                        match (op + id) % 4 {
                            0 => held.push(held[0].clone()),
                            1 => drop(Strong::downgrade(&held[0]).clone()),
                            2 => {
                                if let Some(s) = weak.upgrade() {
                                    assert_eq!(drops.load(Ordering::SeqCst), 0);
                                    held.push(s);
                                }
                            }
                            _ => {
                                if held.len() > 1 {
                                    held.pop();
                                }
                            }
                        }
                    }
                    drop(held);
                    weak
                })
            })
            .collect();
        drop(root);
        let weaks: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        assert!(weaks.iter().all(|w| w.upgrade().is_none()));
    }
}

/// The last `Weak` and the last `Strong` dropped on different threads at
/// once: the value is dropped once and the block freed once (Miri and TSan
/// check the free).
#[test]
fn last_weak_and_last_strong_drop_together() {
    let rounds = if cfg!(miri) { 20 } else { 5_000 };
    for _ in 0..rounds {
        let drops = Arc::new(AtomicUsize::new(0));
        let strong = Strong::new(Counted(drops.clone()));
        let weak = Strong::downgrade(&strong);
        let barrier = Arc::new(Barrier::new(2));
        let other = barrier.clone();
        let t = thread::spawn(move || {
            other.wait();
            drop(weak);
        });
        barrier.wait();
        drop(strong);
        t.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }
}
