//! `WeakSet` as an observer registry against the usual hand-rolled one,
//! `Mutex<Vec<std::sync::Weak<T>>>` cleaned with `retain`, in one run:
//!
//! * `observers/subscribe_1000`: 1000 listeners subscribe (and the set or
//!   list is dropped);
//! * `observers/notify_1000`: one pass over 1000 live listeners, upgrading
//!   each (what a notification does);
//! * `observers/churn_1000`: 1000 listeners subscribe and go away; the
//!   baseline runs `retain` after each batch to drop the dead ones, the set
//!   relies on its death callbacks and `flush`.
//!
//! `cargo bench --bench sets`.

use std::hint::black_box;
use std::sync::{Arc, Mutex, Weak as StdWeak};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const LISTENERS: usize = 1000;

fn observers(c: &mut Criterion) {
    let mut group = c.benchmark_group("observers");
    group.throughput(Throughput::Elements(LISTENERS as u64));

    let ours: Vec<_> = (0..LISTENERS).map(weakrefs::Strong::new).collect();
    let theirs: Vec<_> = (0..LISTENERS).map(Arc::new).collect();
    group.bench_function("subscribe_1000/weakrefs", |b| {
        b.iter(|| {
            let set = weakrefs::WeakSet::with_capacity(LISTENERS);
            for listener in &ours {
                set.insert(listener);
            }
            set
        })
    });
    group.bench_function("subscribe_1000/mutex_vec", |b| {
        b.iter(|| {
            let list: Mutex<Vec<StdWeak<usize>>> = Mutex::new(Vec::with_capacity(LISTENERS));
            for listener in &theirs {
                list.lock().unwrap().push(Arc::downgrade(listener));
            }
            list
        })
    });

    let set = weakrefs::WeakSet::with_capacity(LISTENERS);
    for listener in &ours {
        set.insert(listener);
    }
    let list: Mutex<Vec<StdWeak<usize>>> = Mutex::new(theirs.iter().map(Arc::downgrade).collect());
    group.bench_function("notify_1000/weakrefs", |b| {
        b.iter(|| {
            set.iter()
                .map(|listener| black_box(*listener))
                .sum::<usize>()
        })
    });
    group.bench_function("notify_1000/mutex_vec", |b| {
        b.iter(|| {
            // Snapshot under the lock, notify outside it, as observer lists do.
            let snapshot: Vec<Arc<usize>> = list
                .lock()
                .unwrap()
                .iter()
                .filter_map(StdWeak::upgrade)
                .collect();
            snapshot
                .iter()
                .map(|listener| black_box(**listener))
                .sum::<usize>()
        })
    });

    let churn_set: weakrefs::WeakSet<usize> = weakrefs::WeakSet::new();
    group.bench_function("churn_1000/weakrefs", |b| {
        b.iter(|| {
            for i in 0..LISTENERS {
                let listener = weakrefs::Strong::new(i);
                churn_set.insert(&listener);
            }
            weakrefs::flush();
        })
    });
    assert!(churn_set.is_empty(), "dead listeners left after flush");
    let churn_list: Mutex<Vec<StdWeak<usize>>> = Mutex::new(Vec::new());
    group.bench_function("churn_1000/mutex_vec", |b| {
        b.iter(|| {
            for i in 0..LISTENERS {
                let listener = Arc::new(i);
                churn_list.lock().unwrap().push(Arc::downgrade(&listener));
            }
            churn_list
                .lock()
                .unwrap()
                .retain(|weak| weak.strong_count() > 0);
        })
    });
    group.finish();
}

criterion_group!(benches, observers);
criterion_main!(benches);
