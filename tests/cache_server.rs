//! The main demo's server (`examples/cache_server`), started on an
//! ephemeral loopback port and driven with real HTTP requests: responses
//! are right, and the cached objects (and per-connection sessions) are
//! released once the clients are gone, without any purge: all of them by
//! the pure weak cache, all but its tier by the keep-warm one. And the
//! whole demo, three caches in a row, writes its summary with `--tsv`.

#[path = "support/settle.rs"]
mod settle;

// The demo's main.rs: its flags and its run, and the server module these
// tests drive.
#[path = "../examples/cache_server/main.rs"]
#[allow(dead_code)] // main() and --serve belong to the example alone
mod demo;

use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use demo::server::{self, App, CacheKind, Client, LoadConfig, LoadReport, OBJECT_BYTES};
use hyper::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Starts a server with `kind` of cache; returns it, its address, the
/// switch that stops it, and its task.
async fn start(
    kind: CacheKind,
) -> (
    Arc<App>,
    std::net::SocketAddr,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let app = App::new(kind);
    let (addr, stop, task) = serve(&app).await;
    (app, addr, stop, task)
}

/// Serves `app` on a new ephemeral port: its address, the switch that
/// stops it, and its task.
async fn serve(
    app: &Arc<App>,
) -> (
    std::net::SocketAddr,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(server::serve(app.clone(), listener, stopped));
    (addr, stop, task)
}

/// 400 requests from 8 clients over 20 objects, bounded by the count (the
/// duration is only a backstop).
async fn load(addr: std::net::SocketAddr) -> LoadReport {
    server::run_load(
        LoadConfig {
            addr,
            clients: 8,
            duration: Duration::from_secs(600),
            max_requests: 400,
            objects: 20,
            exponent: 1.0,
        },
        Arc::new(AtomicU64::new(0)),
    )
    .await
}

/// The demo checks, as it runs, that its weak caches hold nothing (or
/// only the tier) once its clients have left, after one `flush`: true
/// when it has the process to itself, as when it is run, but not beside
/// tests whose threads hold epoch pins that delay those releases. So the
/// other tests share this lock (read) and the demo's takes it alone
/// (write).
static DEMO_ALONE: RwLock<()> = RwLock::new(());

/// Keeps the demo's test from running beside the caller.
fn beside_other_tests() -> RwLockReadGuard<'static, ()> {
    DEMO_ALONE.read().unwrap_or_else(PoisonError::into_inner)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn serves_objects_and_releases_them_when_clients_leave() {
    let _shared = beside_other_tests();
    runtime().block_on(async {
        let (app, addr, stop, server) = start(CacheKind::Weak).await;
        let mut a = Client::connect(addr).await.unwrap();
        let mut b = Client::connect(addr).await.unwrap();

        let (status, first) = a.get("/objects/alpha").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(first.len(), OBJECT_BYTES);
        assert!(first.starts_with(b"P5\n512 512\n255\n"));
        // The same name renders the same object, from another connection.
        let (_, again) = b.get("/objects/alpha").await.unwrap();
        assert_eq!(first, again);
        let (_, other) = a.get("/objects/beta").await.unwrap();
        assert_ne!(first, other);

        // While the clients are connected, their sessions (WeakKeyMap
        // entries) hold what they fetched, so the cache serves it.
        let builds = app.metrics.builds.load(Ordering::SeqCst);
        let (_, cached) = b.get("/objects/beta").await.unwrap();
        assert_eq!(cached, other);
        assert_eq!(
            app.metrics.builds.load(Ordering::SeqCst),
            builds,
            "beta was cached"
        );
        assert_eq!(app.connections.len(), 2);

        let (status, stats) = a.get("/stats").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let stats = String::from_utf8(stats.to_vec()).unwrap();
        assert!(stats.contains("cache: Weak"), "{stats}");
        assert!(stats.contains("open_connections: 2"), "{stats}");

        let (status, _) = a.get("/objects/Bad%20Name").await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = a.get("/nowhere").await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND);

        // The clients leave: their connections close, the server's
        // connection tasks end, and with them every hold on an object.
        drop((a, b));
        stop.send(true).unwrap();
        server.await.unwrap();
        weakrefs::flush();
        settle_until_released(&app);
        assert_eq!(app.cached_objects(), 0, "the cache emptied itself");
        assert_eq!(
            app.connections.len(),
            0,
            "the sessions went with their connections"
        );
        assert!(app.metrics.peak_bytes.load(Ordering::SeqCst) >= 2 * OBJECT_BYTES);
    });
}

#[test]
fn a_load_run_is_correct_and_leaves_nothing_behind() {
    let _shared = beside_other_tests();
    runtime().block_on(async {
        let (app, addr, stop, server) = start(CacheKind::Weak).await;
        let report = load(addr).await;
        assert_eq!(report.errors, 0);
        assert_eq!(report.requests, 400);
        assert_eq!(report.latency_us.len(), 400);
        assert_eq!(report.bytes, 400 * OBJECT_BYTES as u64);
        let builds = app.metrics.builds.load(Ordering::SeqCst);
        let joined = app.joined_builds();
        assert!(
            builds >= 1 && builds + joined <= 400,
            "{builds} builds, {joined} joined"
        );
        stop.send(true).unwrap();
        server.await.unwrap();
        weakrefs::flush();
        settle_until_released(&app);
        assert_eq!(app.cached_objects(), 0);
        assert_eq!(app.connections.len(), 0);
    });
}

#[test]
fn the_keep_warm_cache_keeps_its_tier_alone_and_serves_from_it() {
    let _shared = beside_other_tests();
    const RECENT: usize = 4;
    runtime().block_on(async {
        let (app, addr, stop, server) = start(CacheKind::KeepWarm { recent: RECENT }).await;
        let report = load(addr).await;
        assert_eq!(report.errors, 0);
        assert_eq!(report.requests, 400);
        assert_eq!(report.bytes, 400 * OBJECT_BYTES as u64);
        let stats = app.cache_stats().unwrap();
        assert_eq!(stats.loads, app.metrics.builds.load(Ordering::SeqCst));
        stop.send(true).unwrap();
        server.await.unwrap();

        // The clients and their sessions are gone: the tier alone holds
        // objects, exactly `RECENT` of them (more than that many were
        // loaded, and once full the tier stays full).
        settle_until(&app, RECENT);
        assert_eq!(app.connections.len(), 0);
        assert_eq!(
            app.metrics.live_bytes.load(Ordering::SeqCst),
            RECENT * OBJECT_BYTES
        );
        let kept = app.cached_names();
        assert_eq!(kept.len(), RECENT, "{kept:?}");

        // A new client is served the kept objects from the tier, without a
        // build, and the same bytes as a fresh render of the same name.
        let (addr, stop, server) = serve(&app).await;
        let mut client = Client::connect(addr).await.unwrap();
        let builds = app.metrics.builds.load(Ordering::SeqCst);
        let mut bodies = Vec::new();
        for name in &kept {
            let (status, body) = client.get(&format!("/objects/{name}")).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body.len(), OBJECT_BYTES);
            bodies.push(body);
        }
        assert_eq!(app.metrics.builds.load(Ordering::SeqCst), builds);
        let fresh = App::new(CacheKind::Strong);
        let (fresh_addr, fresh_stop, fresh_server) = serve(&fresh).await;
        let mut fresh_client = Client::connect(fresh_addr).await.unwrap();
        for (name, body) in kept.iter().zip(&bodies) {
            let (_, rendered) = fresh_client.get(&format!("/objects/{name}")).await.unwrap();
            assert_eq!(&rendered, body, "{name}");
        }
        drop((client, fresh_client));
        stop.send(true).unwrap();
        fresh_stop.send(true).unwrap();
        server.await.unwrap();
        fresh_server.await.unwrap();
        settle_until(&app, RECENT);
        assert_eq!(app.cached_names(), kept, "only tier hits, so no admissions");
    });
}

#[test]
fn the_strong_cache_keeps_what_it_built() {
    let _shared = beside_other_tests();
    runtime().block_on(async {
        let (app, addr, stop, server) = start(CacheKind::Strong).await;
        let mut client = Client::connect(addr).await.unwrap();
        for name in ["one", "two", "one"] {
            let (status, _) = client.get(&format!("/objects/{name}")).await.unwrap();
            assert_eq!(status, StatusCode::OK);
        }
        drop(client);
        stop.send(true).unwrap();
        server.await.unwrap();
        weakrefs::flush();
        assert_eq!(app.cached_objects(), 2);
        assert_eq!(
            app.metrics.live_bytes.load(Ordering::SeqCst),
            2 * OBJECT_BYTES,
            "the strong cache holds on to everything it built"
        );
    });
}

#[test]
fn the_demo_writes_its_summary_with_tsv() {
    const RECENT: usize = 4;
    let _alone = DEMO_ALONE.write().unwrap_or_else(PoisonError::into_inner);
    let path = std::env::temp_dir().join(format!("cache_server-{}.tsv", std::process::id()));
    let parse = |args: &[&str]| demo::parse(args.iter().map(OsString::from));
    assert!(parse(&["--tsv"]).unwrap_err().contains("--tsv"));
    let mut args: Vec<OsString> = [
        "--duration",
        "1.5",
        "--clients",
        "4",
        "--requests",
        "200",
        "--objects",
        "20",
        "--keep-recent",
        "4",
        "--tsv",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push(path.clone().into());
    let config = demo::parse(args).unwrap().expect("not --help");
    // The demo's own checks pass: nothing left in the weak cache, the
    // tier alone in the keep-warm one.
    runtime().block_on(demo::demo(&config)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();

    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(demo::TSV_COLUMNS.join("\t").as_str()));
    let rows: Vec<Vec<&str>> = lines.map(|line| line.split('\t').collect()).collect();
    let names: Vec<_> = rows.iter().map(|row| (row[0], row[1])).collect();
    assert_eq!(
        names,
        [
            ("strong", "strong HashMap"),
            ("weak", "WeakValueMap"),
            ("keep-warm", "keep_recent(4)")
        ],
        "{text}"
    );
    let figure = |row: &[&str], column: &str| -> f64 {
        assert_eq!(row.len(), demo::TSV_COLUMNS.len(), "{text}");
        let i = demo::TSV_COLUMNS.iter().position(|c| *c == column).unwrap();
        row[i]
            .parse()
            .unwrap_or_else(|e| panic!("{column}: {e}\n{text}"))
    };
    for row in &rows {
        let requests = figure(row, "requests");
        assert!((1.0..=200.0).contains(&requests), "{text}");
        assert!(figure(row, "requests_per_second") > 0.0, "{text}");
        assert!(figure(row, "latency_p50_us") <= figure(row, "latency_p99_us"));
        assert!(figure(row, "objects_built") >= 1.0, "{text}");
        assert!(
            figure(row, "peak_object_bytes") >= OBJECT_BYTES as f64,
            "{text}"
        );
    }
    let gone = |row: &[&str]| figure(row, "object_bytes_clients_gone");
    assert!(
        gone(&rows[0]) >= OBJECT_BYTES as f64,
        "the strong cache keeps all: {text}"
    );
    assert_eq!(gone(&rows[1]), 0.0, "{text}");
    assert!(gone(&rows[2]) <= (RECENT * OBJECT_BYTES) as f64, "{text}");
}

/// Flushes until every object is released and its entry gone.
fn settle_until_released(app: &App) {
    settle_until(app, 0);
}

/// Flushes until at most `objects` objects are alive and named by the
/// cache: the sessions that held the others are removed with their
/// connections at once, but dropped once no reader can see them, which
/// waits for other threads (other tests here) to leave their lookups, and
/// an entry goes when its value's death callback runs, queued once the
/// value is dropped; each `flush` pushes both on.
fn settle_until(app: &App, objects: usize) {
    let settled = || {
        app.metrics.live_bytes.load(Ordering::SeqCst) <= objects * OBJECT_BYTES
            && app.cached_objects() <= objects
    };
    assert!(
        settle::until(settled, weakrefs::flush),
        "{} bytes of objects and {} entries never released",
        app.metrics.live_bytes.load(Ordering::SeqCst),
        app.cached_objects()
    );
}
