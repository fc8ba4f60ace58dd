//! Death-callback throughput: register a callback on a fresh object, drop
//! the object, and run every callback until flushed, side by side with the
//! designs a user would otherwise write:
//!
//! * `mpsc_thread`: `Arc`-like ownership plus a `Drop` that sends the boxed
//!   callback over `std::sync::mpsc` to one draining thread; "flushed"
//!   means a marker sent after the batch has come back.
//! * `epoch_defer`: a `Drop` that hands the callback to
//!   `crossbeam_epoch::Guard::defer`; "flushed" means pinning and flushing
//!   until every callback has run.
//!
//! `cargo bench --bench finalizers`. Throughput is callbacks per second.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BATCH: u64 = 1_000;

/// Callbacks run, counted by every design alike. A static, so callbacks
/// capture nothing: a shared `Arc` cloned per callback on the dropping
/// thread and dropped on the running one would move its count's cache line
/// between threads for the designs that hand callbacks over, and not for
/// the one that runs them in place.
static RAN: AtomicU64 = AtomicU64::new(0);

fn count_run() {
    // Relaxed: a tally. `epoch_defer` polls it only to know when all of a
    // batch has run; nothing else is published through it.
    RAN.fetch_add(1, Ordering::Relaxed);
}

type Callback = Box<dyn FnOnce() + Send + Sync>;

/// What the draining thread receives: a callback, or a flush marker.
enum Message {
    Run(Callback),
    Flush(mpsc::SyncSender<()>),
}

/// An object whose `Drop` ships its callbacks to a channel.
struct ChannelObject {
    value: u64,
    callbacks: Vec<Callback>,
    sender: mpsc::Sender<Message>,
}

impl Drop for ChannelObject {
    fn drop(&mut self) {
        for callback in self.callbacks.drain(..).rev() {
            let _ = self.sender.send(Message::Run(callback));
        }
    }
}

/// An object whose `Drop` defers its callbacks to crossbeam-epoch.
struct EpochObject {
    value: u64,
    callbacks: Vec<Callback>,
}

impl Drop for EpochObject {
    fn drop(&mut self) {
        let guard = crossbeam_epoch::pin();
        for callback in self.callbacks.drain(..).rev() {
            guard.defer(callback);
        }
    }
}

fn throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("callback_throughput");
    group.throughput(Throughput::Elements(BATCH));

    group.bench_function("weakrefs", |b| {
        b.iter(|| {
            for i in 0..BATCH {
                let obj = weakrefs::Strong::new(i);
                weakrefs::finalize(&obj, count_run);
                drop(black_box(obj));
            }
            weakrefs::flush();
        })
    });

    let (sender, receiver) = mpsc::channel::<Message>();
    let drainer = thread::spawn(move || {
        for message in receiver {
            match message {
                Message::Run(callback) => callback(),
                Message::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    });
    group.bench_function("mpsc_thread", |b| {
        b.iter(|| {
            for i in 0..BATCH {
                let obj = Arc::new(ChannelObject {
                    value: i,
                    callbacks: vec![Box::new(count_run)],
                    sender: sender.clone(),
                });
                black_box(obj.value);
                drop(black_box(obj));
            }
            let (done, flushed) = mpsc::sync_channel(0);
            sender.send(Message::Flush(done)).unwrap();
            flushed.recv().unwrap();
        })
    });
    drop(sender);
    drainer.join().unwrap();

    group.bench_function("epoch_defer", |b| {
        b.iter(|| {
            let target = RAN.load(Ordering::Relaxed) + BATCH;
            for i in 0..BATCH {
                let obj = Arc::new(EpochObject {
                    value: i,
                    callbacks: vec![Box::new(count_run)],
                });
                black_box(obj.value);
                drop(black_box(obj));
            }
            while RAN.load(Ordering::Relaxed) < target {
                crossbeam_epoch::pin().flush();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, throughput);
criterion_main!(benches);
