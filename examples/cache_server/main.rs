//! The main demo: a multithreaded HTTP server (hyper on tokio) whose worker
//! threads share a weak cache of large generated objects, driven by a
//! built-in load generator over loopback.
//!
//! ```sh
//! cargo run --release --example cache_server                  # about 10 s, then a summary
//! cargo run --release --example cache_server -- --serve       # keep serving, for curl
//! cargo run --release --example cache_server -- --help
//! ```
//!
//! The run has two halves with the same load: first the server caches
//! objects in a `WeakValueMap` (objects live while some request or some
//! connected client's session uses them; one build per object however many
//! requests race for it), then in a strong `Mutex<HashMap>` (objects live
//! forever). The summary compares what each kept resident at its peak and
//! after the clients left.

mod server;

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use server::{App, BuildSubscriber, CacheKind, LoadConfig, LoadReport};
use tokio::net::TcpListener;
use tokio::sync::watch;
use weakrefs::Strong;

const USAGE: &str = "\
usage: cache_server [--duration SECONDS] [--clients N] [--threads N] [--requests N] [--objects N]
       cache_server --serve [--port PORT] [--threads N]

  --duration SECONDS  length of the whole run, both halves (default 10)
  --clients N         concurrent keep-alive clients (default 32)
  --threads N         tokio worker threads for the server and clients (default: CPUs)
  --requests N        stop each half after N requests (default 1000000)
  --objects N         distinct object names, Zipf-skewed popularity (default 200)
  --serve             serve until interrupted, printing the URL, no load
  --port PORT         port for --serve (default 8080; 0 picks a free one)";

#[derive(Debug)]
struct Config {
    duration: Duration,
    clients: usize,
    threads: usize,
    requests: u64,
    objects: usize,
    serve: bool,
    port: u16,
}

fn parse(args: impl Iterator<Item = String>) -> Result<Option<Config>, String> {
    let mut config = Config {
        duration: Duration::from_secs(10),
        clients: 32,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        requests: 1_000_000,
        objects: 200,
        serve: false,
        port: 8080,
    };
    let mut args = args.peekable();
    while let Some(flag) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        fn number<T>(flag: &str, text: String, min: T) -> Result<T, String>
        where
            T: std::str::FromStr + PartialOrd + std::fmt::Display,
        {
            match text.parse::<T>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(format!(
                    "{flag} wants a number of at least {min}, not {text:?}"
                )),
            }
        }
        match flag.as_str() {
            "--duration" => {
                let seconds: f64 = number("--duration", value("--duration")?, 0.1)?;
                if !seconds.is_finite() || seconds > 86_400.0 {
                    return Err(format!(
                        "--duration wants 0.1 to 86400 seconds, not {seconds}"
                    ));
                }
                config.duration = Duration::from_secs_f64(seconds);
            }
            "--clients" => config.clients = number("--clients", value("--clients")?, 1)?,
            "--threads" => config.threads = number("--threads", value("--threads")?, 1)?,
            "--requests" => config.requests = number("--requests", value("--requests")?, 1)?,
            "--objects" => config.objects = number("--objects", value("--objects")?, 1)?,
            "--port" => config.port = number("--port", value("--port")?, 0)?,
            "--serve" => config.serve = true,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(config))
}

fn main() -> ExitCode {
    let config = match parse(std::env::args().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("cache_server: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cache_server: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        if config.serve {
            serve_forever(&config).await
        } else {
            demo(&config).await
        }
    });
    drop(runtime);
    weakrefs::shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cache_server: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_forever(config: &Config) -> Result<(), String> {
    let listener = TcpListener::bind(("127.0.0.1", config.port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{}: {e}", config.port))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!(
        "serving on http://{addr}/  (weak cache, {} worker threads)",
        config.threads
    );
    println!("  curl -o object.pgm http://{addr}/objects/hello-world");
    println!("  curl http://{addr}/stats");
    println!("Ctrl-C to stop.");
    let (_stop, stopped) = watch::channel(false);
    server::serve(App::new(CacheKind::Weak), listener, stopped).await;
    Ok(())
}

/// What one half of the demo measured.
struct Half {
    load: LoadReport,
    builds: u64,
    joined: u64,
    wasted: u64,
    peak_bytes: usize,
    bytes_after: usize,
    cached_after: usize,
    connections_after: usize,
}

async fn demo(config: &Config) -> Result<(), String> {
    println!(
        "cache_server: {} clients, {} objects (Zipf-skewed), {} worker threads, {:.1} s per half",
        config.clients,
        config.objects,
        config.threads,
        config.duration.as_secs_f64() / 2.0
    );
    let mut halves = Vec::new();
    for kind in [CacheKind::Weak, CacheKind::Strong] {
        halves.push(run_half(config, kind).await?);
    }
    let stats = weakrefs::stats();
    println!();
    println!("{:<34} {:>16} {:>16}", "", "WeakValueMap", "strong HashMap");
    let row = |label: &str, f: &dyn Fn(&Half) -> String| {
        println!("{label:<34} {:>16} {:>16}", f(&halves[0]), f(&halves[1]));
    };
    row("requests", &|h| h.load.requests.to_string());
    row("requests/s", &|h| {
        format!(
            "{:.0}",
            h.load.requests as f64 / h.load.elapsed.as_secs_f64()
        )
    });
    row("latency p50", &|h| {
        format!("{:.2?}", h.load.percentile(50.0))
    });
    row("latency p99", &|h| {
        format!("{:.2?}", h.load.percentile(99.0))
    });
    row("objects built", &|h| h.builds.to_string());
    row("served from the cache", &|h| {
        (h.load.requests + h.wasted)
            .saturating_sub(h.builds + h.joined)
            .to_string()
    });
    row("waited for a build in flight", &|h| h.joined.to_string());
    row("duplicate builds thrown away", &|h| h.wasted.to_string());
    row("resident object MiB, peak", &|h| mib(h.peak_bytes));
    row("resident object MiB, clients gone", &|h| mib(h.bytes_after));
    row("cache entries, clients gone", &|h| {
        h.cached_after.to_string()
    });
    row("connection entries, clients gone", &|h| {
        h.connections_after.to_string()
    });
    row("errors", &|h| h.load.errors.to_string());
    println!();
    println!(
        "finalizer stats: {} callbacks queued, {} run, {} panicked, {} pending",
        stats.queued, stats.run, stats.panicked, stats.pending
    );
    println!(
        "The weak cache kept only what some request or session was using ({} MiB at peak) \
         and let all of it go when the clients left, without any purge call; the strong \
         cache built less but still holds {} MiB.",
        mib(halves[0].peak_bytes),
        mib(halves[1].bytes_after)
    );
    let weak = &halves[0];
    if weak.load.errors > 0 || halves[1].load.errors > 0 {
        return Err("some requests failed (see the errors row)".into());
    }
    if weak.bytes_after != 0 || weak.cached_after != 0 || weak.connections_after != 0 {
        return Err("the weak cache kept objects after the clients left".into());
    }
    Ok(())
}

fn mib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

async fn run_half(config: &Config, kind: CacheKind) -> Result<Half, String> {
    let app = App::new(kind);
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(server::serve(app.clone(), listener, stopped));

    // The progress display hears about builds through the server's WeakSet;
    // when it goes, it unsubscribes by itself.
    let subscriber = Strong::new(BuildSubscriber::default());
    app.subscribers.insert(&subscriber);
    let duration = config.duration / 2;
    let progress = ProgressBar::new(duration.as_millis() as u64);
    progress.set_style(
        ProgressStyle::with_template("{prefix:>14} [{bar:30}] {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    progress.set_prefix(match kind {
        CacheKind::Weak => "WeakValueMap",
        CacheKind::Strong => "strong HashMap",
    });
    let issued = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn(server::run_load(
        LoadConfig {
            addr,
            clients: config.clients,
            duration,
            max_requests: config.requests,
            objects: config.objects,
        },
        issued.clone(),
    ));
    let started = Instant::now();
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        progress.set_position(started.elapsed().as_millis() as u64);
        progress.set_message(format!(
            "{} requests, {} builds, {} MiB resident, {} connections",
            issued.load(Ordering::Relaxed).min(config.requests),
            subscriber.builds.load(Ordering::Relaxed),
            mib(app.metrics.live_bytes.load(Ordering::SeqCst)),
            app.connections.len(),
        ));
    }
    let load = load
        .await
        .map_err(|e| format!("the load generator failed: {e}"))?;
    progress.finish_and_clear();
    drop(subscriber);

    // The clients have closed their connections: stop accepting, wait for
    // the server's connection tasks, then let the death callbacks run.
    let _ = stop.send(true);
    server
        .await
        .map_err(|e| format!("the server failed: {e}"))?;
    weakrefs::flush();
    let metrics = &app.metrics;
    Ok(Half {
        builds: metrics.builds.load(Ordering::SeqCst),
        joined: metrics.joined_builds.load(Ordering::SeqCst),
        wasted: metrics.wasted_builds.load(Ordering::SeqCst),
        peak_bytes: metrics.peak_bytes.load(Ordering::SeqCst),
        bytes_after: metrics.live_bytes.load(Ordering::SeqCst),
        cached_after: app.cached_objects(),
        connections_after: app.connections.len(),
        load,
    })
}
