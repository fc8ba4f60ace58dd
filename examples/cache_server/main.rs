//! The main demo: a multithreaded HTTP server (hyper on tokio) whose worker
//! threads share a cache of large generated objects, driven by a built-in
//! load generator over loopback.
//!
//! ```sh
//! cargo run --release --example cache_server                  # about 12 s, then a summary
//! cargo run --release --example cache_server -- --serve       # keep serving, for curl
//! cargo run --release --example cache_server -- --help
//! cargo run --release --example cache_server -- --tsv summary.tsv
//! ```
//!
//! The run has three thirds with the same Zipf load, one per cache:
//!
//! 1. a strong `Mutex<HashMap>`: every object ever built lives forever;
//! 2. a pure `WeakValueMap`: an object lives while some request or some
//!    connected client's session uses it, and is built once however many
//!    requests race for it; but a popular object that nobody holds for a
//!    moment is gone, and rebuilt on its next request;
//! 3. a `WeakValueMap` with `keep_recent(N)`: the same, and the map also
//!    holds N of the objects recently loaded or found, those wanted most
//!    often (one-off loads from the tail do not push them out), so the
//!    popular ones survive those moments.
//!
//! N defaults to a quarter of the objects (50 of the default 200): under
//! Zipf's law (exponent 1) the most popular quarter draws about three
//! quarters of the requests (77% for 50 of 200), so a tier of that size
//! keeps the hot set warm for a quarter of the strong cache's memory. The
//! long tail, the other quarter of the requests spread over three quarters
//! of the objects, lives only while in use in both weak caches: no tier
//! well below the object count keeps it, so the keep-warm cache still
//! builds tail objects that the strong cache built once (`--zipf` makes
//! the tail thinner or fatter, `--keep-recent` the tier larger or smaller).
//!
//! The summary compares what each cache served, built, and kept resident
//! at its peak and after the clients left (`--tsv PATH` also writes those
//! figures to a file, a tab-separated row per cache, which `cargo
//! bench-report` charts); the demo fails if a weak cache keeps more than
//! it may then: nothing for the pure one, at most N objects for the
//! keep-warm one (the sessions, which hold objects while their clients
//! are connected, are gone by then).

pub(crate) mod server;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use server::{zipf_share, App, BuildSubscriber, CacheKind, LoadConfig, LoadReport, OBJECT_BYTES};
use tokio::net::TcpListener;
use tokio::sync::watch;
use weakrefs::Strong;

const USAGE: &str = "\
usage: cache_server [--duration SECONDS] [--clients N] [--threads N] [--requests N]
                    [--objects N] [--zipf EXPONENT] [--keep-recent N] [--tsv PATH]
       cache_server --serve [--port PORT] [--threads N] [--cache KIND] [--keep-recent N]

  --duration SECONDS  length of the whole run, all three caches (default 12)
  --clients N         concurrent keep-alive clients (default 32)
  --threads N         tokio worker threads for the server and clients (default: CPUs)
  --requests N        stop each cache's run after N requests (default 1000000)
  --objects N         distinct object names, Zipf-skewed popularity (default 200)
  --zipf EXPONENT     Zipf's exponent, 0 (uniform) to 10 (default 1, the classic skew)
  --keep-recent N     the keep-warm tier's size (default: a quarter of the objects,
                      the hot set that draws about three quarters of the requests)
  --tsv PATH          also write the summary's figures to PATH: a header line, then
                      a tab-separated row per cache
  --serve             serve until interrupted, printing the URL, no load
  --port PORT         port for --serve (default 8080; 0 picks a free one)
  --cache KIND        the cache --serve uses: strong, weak or keep-warm (default)";

#[derive(Debug)]
pub(crate) struct Config {
    duration: Duration,
    clients: usize,
    threads: usize,
    requests: u64,
    objects: usize,
    zipf: f64,
    /// `None`: a quarter of `objects`.
    keep_recent: Option<usize>,
    /// `--tsv`: where to write the summary's figures too.
    tsv: Option<PathBuf>,
    serve: bool,
    port: u16,
    cache: ServeCache,
}

/// The cache `--serve` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServeCache {
    Strong,
    Weak,
    KeepWarm,
}

impl Config {
    /// The keep-warm tier's size.
    fn keep_recent(&self) -> usize {
        self.keep_recent.unwrap_or((self.objects / 4).max(1))
    }
}

/// The command line's config, `Ok(None)` for `--help`, or what is wrong.
pub(crate) fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Option<Config>, String> {
    use lexopt::prelude::*;

    let mut config = Config {
        duration: Duration::from_secs(12),
        clients: 32,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        requests: 1_000_000,
        objects: 200,
        zipf: 1.0,
        keep_recent: None,
        tsv: None,
        serve: false,
        port: 8080,
        cache: ServeCache::KeepWarm,
    };
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("duration") => {
                let seconds: f64 = number(&mut parser, "--duration", 0.1)?;
                if !seconds.is_finite() || seconds > 86_400.0 {
                    return Err(format!(
                        "--duration wants 0.1 to 86400 seconds, not {seconds}"
                    ));
                }
                config.duration = Duration::from_secs_f64(seconds);
            }
            Long("clients") => config.clients = number(&mut parser, "--clients", 1)?,
            Long("threads") => config.threads = number(&mut parser, "--threads", 1)?,
            Long("requests") => config.requests = number(&mut parser, "--requests", 1)?,
            Long("objects") => config.objects = number(&mut parser, "--objects", 1)?,
            Long("zipf") => {
                let exponent: f64 = number(&mut parser, "--zipf", 0.0)?;
                if exponent > 10.0 {
                    return Err(format!("--zipf wants 0 to 10, not {exponent}"));
                }
                config.zipf = exponent;
            }
            Long("keep-recent") => {
                config.keep_recent = Some(number(&mut parser, "--keep-recent", 1)?);
            }
            Long("tsv") => config.tsv = Some(parser.value().map_err(|e| e.to_string())?.into()),
            Long("port") => config.port = number(&mut parser, "--port", 0)?,
            Long("serve") => config.serve = true,
            Long("cache") => {
                let kind = parser.value().map_err(|e| e.to_string())?;
                config.cache = match kind.to_str() {
                    Some("strong") => ServeCache::Strong,
                    Some("weak") => ServeCache::Weak,
                    Some("keep-warm") => ServeCache::KeepWarm,
                    _ => {
                        return Err(format!(
                            "--cache wants strong, weak or keep-warm, not {kind:?}"
                        ))
                    }
                };
            }
            Short('h') | Long("help") => return Ok(None),
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    Ok(Some(config))
}

/// The value of `flag`, a number of at least `min`.
fn number<T>(parser: &mut lexopt::Parser, flag: &str, min: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let text = parser.value().map_err(|e| e.to_string())?;
    match text.to_str().and_then(|text| text.parse::<T>().ok()) {
        Some(n) if n >= min => Ok(n),
        _ => Err(format!(
            "{flag} wants a number of at least {min}, not {text:?}"
        )),
    }
}

fn main() -> ExitCode {
    let config = match parse(std::env::args_os().skip(1)) {
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
    let kind = match config.cache {
        ServeCache::Strong => CacheKind::Strong,
        ServeCache::Weak => CacheKind::Weak,
        ServeCache::KeepWarm => CacheKind::KeepWarm {
            recent: config.keep_recent(),
        },
    };
    let listener = TcpListener::bind(("127.0.0.1", config.port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{}: {e}", config.port))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!(
        "serving on http://{addr}/  ({kind} cache, {} worker threads)",
        config.threads
    );
    println!("  curl -o object.pgm http://{addr}/objects/hello-world");
    println!("  curl http://{addr}/stats");
    println!("Ctrl-C to stop.");
    let (_stop, stopped) = watch::channel(false);
    server::serve(App::new(kind), listener, stopped).await;
    Ok(())
}

/// What one cache's run measured.
struct Run {
    kind: CacheKind,
    load: LoadReport,
    builds: u64,
    joined: u64,
    wasted: u64,
    peak_bytes: usize,
    bytes_after: usize,
    cached_after: usize,
    connections_after: usize,
}

impl Run {
    fn requests_per_second(&self) -> f64 {
        self.load.requests as f64 / self.load.elapsed.as_secs_f64()
    }
}

pub(crate) async fn demo(config: &Config) -> Result<(), String> {
    let recent = config.keep_recent();
    let kinds = [
        CacheKind::Strong,
        CacheKind::Weak,
        CacheKind::KeepWarm { recent },
    ];
    println!(
        "cache_server: {} clients, {} objects (Zipf, exponent {}), {} worker threads, \
         {:.1} s per cache",
        config.clients,
        config.objects,
        config.zipf,
        config.threads,
        config.duration.as_secs_f64() / kinds.len() as f64
    );
    println!(
        "keep_recent({recent}): the {recent} most popular of {} objects draw {:.0}% of the \
         requests; the tier is sized to keep that hot set warm",
        config.objects,
        100.0 * zipf_share(recent, config.objects, config.zipf)
    );
    let mut runs = Vec::new();
    for kind in kinds {
        runs.push(run_one(config, kind, kinds.len() as u32).await?);
    }
    let stats = weakrefs::stats();

    println!();
    print!("{:<34}", "");
    for run in &runs {
        print!(" {:>16}", run.kind.to_string());
    }
    println!();
    let row = |label: &str, f: &dyn Fn(&Run) -> String| {
        print!("{label:<34}");
        for run in &runs {
            print!(" {:>16}", f(run));
        }
        println!();
    };
    row("requests", &|r| r.load.requests.to_string());
    row("requests/s", &|r| format!("{:.0}", r.requests_per_second()));
    row("latency p50", &|r| {
        format!("{:.2?}", r.load.percentile(50.0))
    });
    row("latency p99", &|r| {
        format!("{:.2?}", r.load.percentile(99.0))
    });
    row("objects built", &|r| r.builds.to_string());
    row("objects built per 100 requests", &|r| {
        format!(
            "{:.1}",
            100.0 * r.builds as f64 / r.load.requests.max(1) as f64
        )
    });
    row("served from the cache", &|r| {
        (r.load.requests + r.wasted)
            .saturating_sub(r.builds + r.joined)
            .to_string()
    });
    row("waited for a build in flight", &|r| r.joined.to_string());
    row("duplicate builds thrown away", &|r| r.wasted.to_string());
    row("resident object MiB, peak", &|r| mib(r.peak_bytes));
    row("resident object MiB, clients gone", &|r| mib(r.bytes_after));
    row("cache entries, clients gone", &|r| {
        r.cached_after.to_string()
    });
    row("connection entries, clients gone", &|r| {
        r.connections_after.to_string()
    });
    row("errors", &|r| r.load.errors.to_string());
    println!();
    println!(
        "finalizer stats: {} callbacks queued, {} run, {} panicked, {} pending",
        stats.queued, stats.run, stats.panicked, stats.pending
    );
    let [strong, weak, warm] = &runs[..] else {
        unreachable!("three runs")
    };
    println!(
        "keep_recent({recent}) against the strong cache: {:.2}x its requests/s at {:.2}x its \
         peak object memory, and {} of its {} MiB once the clients left.",
        warm.requests_per_second() / strong.requests_per_second(),
        warm.peak_bytes as f64 / strong.peak_bytes.max(1) as f64,
        mib(warm.bytes_after),
        mib(strong.bytes_after),
    );
    println!(
        "Columns: {strong} builds each object once and holds every one forever; {weak} \
         holds only what requests and sessions use, so an object nobody holds for a \
         moment is rebuilt on its next request, and once the clients leave it holds \
         nothing; {warm} also holds {recent} of the objects recently loaded or found, \
         those wanted most often, so the hot set stays warm between uses while the tail \
         (whose one-off loads do not push the hot set out) lives only while in use, \
         and once the clients leave it holds those {recent} alone, without any purge call.",
        strong = strong.kind,
        weak = weak.kind,
        warm = warm.kind,
    );
    if let Some(path) = &config.tsv {
        std::fs::write(path, summary_tsv(&runs))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }

    if runs.iter().any(|r| r.load.errors > 0) {
        return Err("some requests failed (see the errors row)".into());
    }
    if runs.iter().any(|r| r.connections_after != 0) {
        return Err("sessions outlived their connections".into());
    }
    if weak.bytes_after != 0 || weak.cached_after != 0 {
        return Err("the weak cache kept objects after the clients left".into());
    }
    if warm.bytes_after > recent * OBJECT_BYTES || warm.cached_after > recent {
        return Err(format!(
            "keep_recent({recent}) kept {} entries ({} MiB) after the clients left, \
             more than its tier",
            warm.cached_after,
            mib(warm.bytes_after)
        ));
    }
    Ok(())
}

/// The columns of `--tsv`'s file: the cache's `--cache` word and its
/// name as the summary heads its column, then the summary's figures in
/// whole units (latencies in microseconds, memory in bytes).
pub(crate) const TSV_COLUMNS: [&str; 9] = [
    "kind",
    "cache",
    "requests",
    "requests_per_second",
    "latency_p50_us",
    "latency_p99_us",
    "objects_built",
    "peak_object_bytes",
    "object_bytes_clients_gone",
];

/// The summary as `--tsv` writes it: a header line, then a row per cache.
fn summary_tsv(runs: &[Run]) -> String {
    let mut tsv = TSV_COLUMNS.join("\t");
    tsv.push('\n');
    for run in runs {
        let kind = match run.kind {
            CacheKind::Strong => "strong",
            CacheKind::Weak => "weak",
            CacheKind::KeepWarm { .. } => "keep-warm",
        };
        let _ = writeln!(
            tsv,
            "{kind}\t{}\t{}\t{:.1}\t{}\t{}\t{}\t{}\t{}",
            run.kind,
            run.load.requests,
            run.requests_per_second(),
            run.load.percentile(50.0).as_micros(),
            run.load.percentile(99.0).as_micros(),
            run.builds,
            run.peak_bytes,
            run.bytes_after,
        );
    }
    tsv
}

fn mib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// Serves the load with a `kind` cache for `1 / share` of the duration.
async fn run_one(config: &Config, kind: CacheKind, share: u32) -> Result<Run, String> {
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
    let duration = config.duration / share;
    let progress = ProgressBar::new(duration.as_millis() as u64);
    progress.set_style(
        ProgressStyle::with_template("{prefix:>16} [{bar:30}] {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    progress.set_prefix(kind.to_string());
    let issued = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn(server::run_load(
        LoadConfig {
            addr,
            clients: config.clients,
            duration,
            max_requests: config.requests,
            objects: config.objects,
            exponent: config.zipf,
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
    // A session's objects go with its entry, whose value is dropped once
    // no reader can see it, and a build whose requesters all went away
    // finishes on the blocking pool before its object goes: both may still
    // be under way. Wait until the cache is down to what it may keep, with
    // a fail-safe bound; `demo`'s checks report whatever did not go.
    let settled = |app: &App| {
        let (bytes, cached) = (
            app.metrics.live_bytes.load(Ordering::SeqCst),
            app.cached_objects(),
        );
        match kind {
            CacheKind::Strong => true,
            CacheKind::Weak => bytes == 0 && cached == 0,
            CacheKind::KeepWarm { recent } => cached <= recent && bytes <= recent * OBJECT_BYTES,
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !settled(&app) && Instant::now() < deadline {
        tokio::task::yield_now().await;
        weakrefs::flush();
    }
    let metrics = &app.metrics;
    Ok(Run {
        kind,
        builds: metrics.builds.load(Ordering::SeqCst),
        joined: app.joined_builds(),
        wasted: metrics.wasted_builds.load(Ordering::SeqCst),
        peak_bytes: metrics.peak_bytes.load(Ordering::SeqCst),
        bytes_after: metrics.live_bytes.load(Ordering::SeqCst),
        cached_after: app.cached_objects(),
        connections_after: app.connections.len(),
        load,
    })
}
