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

use std::sync::{Arc, Mutex, Weak as StdWeak};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "support/observers.rs"]
mod observers;

const LISTENERS: usize = 1000;

fn observers(c: &mut Criterion) {
    let mut group = c.benchmark_group("observers");
    group.throughput(Throughput::Elements(LISTENERS as u64));

    let ours: Vec<_> = (0..LISTENERS).map(weakrefs::Strong::new).collect();
    let theirs: Vec<_> = (0..LISTENERS).map(Arc::new).collect();
    group.bench_function("subscribe_1000/weakrefs", |b| {
        b.iter(|| observers::subscribe_set(&ours))
    });
    group.bench_function("subscribe_1000/mutex_vec", |b| {
        b.iter(|| observers::subscribe_list(&theirs))
    });

    let set = observers::subscribe_set(&ours);
    let list = observers::subscribe_list(&theirs);
    group.bench_function("notify_1000/weakrefs", |b| {
        b.iter(|| observers::notify_set(&set))
    });
    group.bench_function("notify_1000/mutex_vec", |b| {
        b.iter(|| observers::notify_list(&list))
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
