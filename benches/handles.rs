//! `weakrefs::{Strong, Weak}` against `std::sync::{Arc, Weak}`, same run,
//! same object shape: `Weak::upgrade` (+ drop of the result),
//! `Strong::clone` + drop, and `Strong::downgrade` (+ drop of the result),
//! on one thread and on two threads sharing one object.
//!
//! `cargo bench --bench handles`. Throughput is operations per second; the
//! two-thread figures count the operations of both threads.

use std::hint::black_box;
use std::time::Duration;

#[path = "support/threads.rs"]
mod threads;
use threads::{on_threads, thread_counts};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};

/// The operations being compared, for either implementation.
trait Handles: Send + Sync + Sized + 'static {
    type Weak: Send + Sync;
    fn new(value: u64) -> Self;
    fn downgrade(&self) -> Self::Weak;
    fn upgrade(weak: &Self::Weak) -> Option<Self>;
    fn duplicate(&self) -> Self;
}

impl Handles for weakrefs::Strong<u64> {
    type Weak = weakrefs::Weak<u64>;
    fn new(value: u64) -> Self {
        weakrefs::Strong::new(value)
    }
    fn downgrade(&self) -> Self::Weak {
        weakrefs::Strong::downgrade(self)
    }
    fn upgrade(weak: &Self::Weak) -> Option<Self> {
        weak.upgrade()
    }
    fn duplicate(&self) -> Self {
        self.clone()
    }
}

impl Handles for std::sync::Arc<u64> {
    type Weak = std::sync::Weak<u64>;
    fn new(value: u64) -> Self {
        std::sync::Arc::new(value)
    }
    fn downgrade(&self) -> Self::Weak {
        std::sync::Arc::downgrade(self)
    }
    fn upgrade(weak: &Self::Weak) -> Option<Self> {
        weak.upgrade()
    }
    fn duplicate(&self) -> Self {
        self.clone()
    }
}

#[derive(Clone, Copy)]
enum Op {
    Upgrade,
    CloneDrop,
    Downgrade,
}

fn run_op<H: Handles>(op: Op, strong: &H, weak: &H::Weak) {
    match op {
        Op::Upgrade => drop(black_box(H::upgrade(black_box(weak)))),
        Op::CloneDrop => drop(black_box(black_box(strong).duplicate())),
        Op::Downgrade => drop(black_box(black_box(strong).downgrade())),
    }
}

/// `iters` operations on each of `threads` threads, all on one object;
/// the time from the common start to the last thread's finish.
fn timed_on_threads<H: Handles>(op: Op, threads: usize, iters: u64) -> Duration {
    let strong = H::new(7);
    let weak = strong.downgrade();
    on_threads(threads, |_| {
        for _ in 0..iters {
            run_op(op, &strong, &weak);
        }
    })
}

fn compare(group: &mut BenchmarkGroup<'_, WallTime>, op: Op, threads: usize) {
    group.throughput(Throughput::Elements(threads as u64));
    if threads == 1 {
        group.bench_function("weakrefs", |b| {
            let strong = weakrefs::Strong::new(7u64);
            let weak = weakrefs::Strong::downgrade(&strong);
            b.iter(|| run_op(op, &strong, &weak))
        });
        group.bench_function("std", |b| {
            let strong = std::sync::Arc::new(7u64);
            let weak = std::sync::Arc::downgrade(&strong);
            b.iter(|| run_op(op, &strong, &weak))
        });
    } else {
        group.bench_function("weakrefs", |b| {
            b.iter_custom(|iters| timed_on_threads::<weakrefs::Strong<u64>>(op, threads, iters))
        });
        group.bench_function("std", |b| {
            b.iter_custom(|iters| timed_on_threads::<std::sync::Arc<u64>>(op, threads, iters))
        });
    }
}

fn handles(c: &mut Criterion) {
    for (name, op) in [
        ("upgrade", Op::Upgrade),
        ("clone_drop", Op::CloneDrop),
        ("downgrade", Op::Downgrade),
    ] {
        for threads in thread_counts() {
            let mut group = c.benchmark_group(format!("{name}/{threads}_thread"));
            compare(&mut group, op, threads);
            group.finish();
        }
    }
}

criterion_group!(benches, handles);
criterion_main!(benches);
