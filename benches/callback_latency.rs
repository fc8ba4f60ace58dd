//! Drop-to-callback latency while idle: the time from just before the last
//! `Strong` is dropped to the moment the callback starts on the finalizer
//! thread, with the thread parked in between samples. Compared with the
//! `mpsc` design (a `Drop` that sends the callback to one draining thread
//! blocked in `recv`). Prints p50, p90, p99 and max in microseconds, and
//! writes every sample to `$WEAKREFS_BENCH_OUT/callback_latency.tsv` when
//! that variable is set (benches/support/out.rs).
//!
//! `cargo bench --bench callback_latency` (add `-- --quick` for fewer
//! samples). Criterion does not do percentiles, so this bench is plain.

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[path = "support/out.rs"]
mod out;

type Callback = Box<dyn FnOnce() + Send + Sync>;

fn percentiles(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{name:<12} samples {:>5}  p50 {:>7.1} us  p90 {:>7.1} us  p99 {:>7.1} us  max {:>8.1} us",
        samples.len(),
        micros(at(0.50)),
        micros(at(0.90)),
        micros(at(0.99)),
        micros(at(1.0)),
    );
}

/// The gap between samples, long enough for the consumer to park.
const IDLE: Duration = Duration::from_millis(2);

fn weakrefs_latency(samples: usize) -> Vec<Duration> {
    let observed = Arc::new(Mutex::new(Vec::with_capacity(samples)));
    for _ in 0..samples {
        thread::sleep(IDLE);
        let obj = weakrefs::Strong::new([0u8; 64]);
        let observed = observed.clone();
        let started = Arc::new(Mutex::new(None::<Instant>));
        let start_slot = started.clone();
        weakrefs::finalize(&obj, move || {
            let began = start_slot.lock().unwrap().expect("start recorded");
            observed.lock().unwrap().push(began.elapsed());
        });
        *started.lock().unwrap() = Some(Instant::now());
        drop(obj);
        weakrefs::flush();
    }
    Arc::try_unwrap(observed).unwrap().into_inner().unwrap()
}

fn mpsc_latency(samples: usize) -> Vec<Duration> {
    struct Object {
        callback: Option<Callback>,
        sender: mpsc::Sender<Callback>,
    }
    impl Drop for Object {
        fn drop(&mut self) {
            if let Some(callback) = self.callback.take() {
                let _ = self.sender.send(callback);
            }
        }
    }
    let (sender, receiver) = mpsc::channel::<Callback>();
    let drainer = thread::spawn(move || {
        for callback in receiver {
            callback();
        }
    });
    let observed = Arc::new(Mutex::new(Vec::with_capacity(samples)));
    for _ in 0..samples {
        thread::sleep(IDLE);
        let (done, finished) = mpsc::sync_channel(1);
        let observed = observed.clone();
        let started = Arc::new(Mutex::new(None::<Instant>));
        let start_slot = started.clone();
        let obj = Arc::new(Object {
            callback: Some(Box::new(move || {
                let began = start_slot.lock().unwrap().expect("start recorded");
                observed.lock().unwrap().push(began.elapsed());
                let _ = done.send(());
            })),
            sender: sender.clone(),
        });
        *started.lock().unwrap() = Some(Instant::now());
        drop(obj);
        finished.recv().unwrap();
    }
    drop(sender);
    drainer.join().unwrap();
    Arc::try_unwrap(observed).unwrap().into_inner().unwrap()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // of ours either: run a handful of samples then.
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let samples = if quick { 300 } else { 2_000 };
    println!("drop-to-callback latency, idle consumer, {samples} samples each");
    let mut tsv = out::tsv("callback_latency.tsv", "design\tmicros");
    for (name, run) in [
        ("weakrefs", weakrefs_latency as fn(usize) -> Vec<Duration>),
        ("mpsc_thread", mpsc_latency),
    ] {
        let mut observed = run(samples);
        percentiles(name, &mut observed);
        if let Some(tsv) = &mut tsv {
            for sample in &observed {
                let micros = sample.as_secs_f64() * 1e6;
                writeln!(tsv, "{name}\t{micros:.3}").expect("write callback_latency.tsv");
            }
        }
    }
}
