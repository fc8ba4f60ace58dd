//! `weakrefs::{Strong, Weak}` against `std::sync::{Arc, Weak}`, same run,
//! same object shape: `Weak::upgrade` (+ drop of the result),
//! `Strong::clone` + drop, and `Strong::downgrade` (+ drop of the result),
//! on one thread and on two threads sharing one object. Then, on one
//! thread, `upgrade` and `clone` + drop of unsized handles:
//! `Strong<str>` against `Arc<str>`, `Strong<dyn Trait>` against
//! `Arc<dyn Trait>` (groups `*_str`, `*_dyn`).
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

/// The trait of the `dyn` rows.
trait Tagged: Send + Sync {
    fn tag(&self) -> u64;
}

impl Tagged for u64 {
    fn tag(&self) -> u64 {
        *self
    }
}

/// One group, `weakrefs` then `std`, one operation per iteration.
fn pair(c: &mut Criterion, name: &str, mut ours: impl FnMut(), mut theirs: impl FnMut()) {
    let mut group = c.benchmark_group(format!("{name}/1_thread"));
    group.throughput(Throughput::Elements(1));
    group.bench_function("weakrefs", |b| b.iter(&mut ours));
    group.bench_function("std", |b| b.iter(&mut theirs));
    group.finish();
}

fn unsized_handles(c: &mut Criterion) {
    let text = "<h1>{title}</h1><p>{body}</p>";
    let ours: weakrefs::Strong<str> = weakrefs::Strong::from(text);
    let our_weak = weakrefs::Strong::downgrade(&ours);
    let theirs: std::sync::Arc<str> = std::sync::Arc::from(text);
    let their_weak = std::sync::Arc::downgrade(&theirs);
    pair(
        c,
        "upgrade_str",
        || drop(black_box(black_box(&our_weak).upgrade())),
        || drop(black_box(black_box(&their_weak).upgrade())),
    );
    pair(
        c,
        "clone_drop_str",
        || drop(black_box(black_box(&ours).clone())),
        || drop(black_box(black_box(&theirs).clone())),
    );

    let ours: weakrefs::Strong<dyn Tagged> = weakrefs::unsize!(weakrefs::Strong::new(7u64));
    let our_weak = weakrefs::Strong::downgrade(&ours);
    let theirs: std::sync::Arc<dyn Tagged> = std::sync::Arc::new(7u64);
    let their_weak = std::sync::Arc::downgrade(&theirs);
    pair(
        c,
        "upgrade_dyn",
        || {
            black_box(black_box(&our_weak).upgrade().map(|s| s.tag()));
        },
        || {
            black_box(black_box(&their_weak).upgrade().map(|s| s.tag()));
        },
    );
    pair(
        c,
        "clone_drop_dyn",
        || drop(black_box(black_box(&ours).clone())),
        || drop(black_box(black_box(&theirs).clone())),
    );
}

criterion_group!(benches, handles, unsized_handles);
criterion_main!(benches);
