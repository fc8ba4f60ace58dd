//! The thread harness the benchmarks share.

use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

/// Runs `work(thread_index)` on `threads` threads released together; the
/// time from the first thread's start to the last thread's finish.
///
/// Each worker reads the clock itself, right after the barrier and right
/// after its work: a clock read by the spawning thread would start late
/// whenever that thread is not rescheduled until the workers are well
/// under way (two workers on two cores), and undercount.
pub fn on_threads(threads: usize, work: impl Fn(usize) + Sync) -> Duration {
    let start = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (start, work) = (&start, &work);
                scope.spawn(move || {
                    start.wait();
                    let began = Instant::now();
                    work(t);
                    (began, Instant::now())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("benchmark thread panicked"))
            .collect()
    });
    let first = spans
        .iter()
        .map(|s| s.0)
        .min()
        .expect("at least one thread");
    let last = spans
        .iter()
        .map(|s| s.1)
        .max()
        .expect("at least one thread");
    last - first
}

/// The thread counts a benchmark compares at: 1 and 2 (the CI machine's
/// cores), or the comma-separated list in `WEAKREFS_BENCH_THREADS` (for a
/// thread-scaling run on a larger machine, e.g. `1,2,4,8,16`).
pub fn thread_counts() -> Vec<usize> {
    match std::env::var("WEAKREFS_BENCH_THREADS") {
        Ok(list) => {
            list.split(',')
                .map(|count| {
                    count.trim().parse().unwrap_or_else(|_| {
                        panic!("WEAKREFS_BENCH_THREADS: {count:?} is not a count")
                    })
                })
                .collect()
        }
        Err(_) => vec![1, 2],
    }
}
