//! The main demo's server (`examples/cache_server`), started on an
//! ephemeral loopback port and driven with real HTTP requests: responses
//! are right, and the cached objects (and per-connection sessions) are
//! released once the clients are gone, without any purge.

#[path = "../examples/cache_server/server.rs"]
mod server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use server::{App, CacheKind, Client, LoadConfig, OBJECT_BYTES};
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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(server::serve(app.clone(), listener, stopped));
    (app, addr, stop, task)
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
    runtime().block_on(async {
        let (app, addr, stop, server) = start(CacheKind::Weak).await;
        let issued = Arc::new(AtomicU64::new(0));
        let report = server::run_load(
            LoadConfig {
                addr,
                clients: 8,
                // Bounded by the count; the duration is only a backstop.
                duration: Duration::from_secs(600),
                max_requests: 400,
                objects: 20,
            },
            issued,
        )
        .await;
        assert_eq!(report.errors, 0);
        assert_eq!(report.requests, 400);
        assert_eq!(report.latencies_us.len(), 400);
        assert_eq!(report.bytes, 400 * OBJECT_BYTES as u64);
        let builds = app.metrics.builds.load(Ordering::SeqCst);
        let joined = app.metrics.joined_builds.load(Ordering::SeqCst);
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
fn the_strong_cache_keeps_what_it_built() {
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

/// Flushes until every object is released: the sessions that held the
/// last objects are removed with their connections at once, but dropped
/// once no reader can see them, which waits for other threads (other tests
/// here) to leave their lookups; each `flush` pushes that on.
fn settle_until_released(app: &App) {
    for _ in 0..100_000 {
        if app.metrics.live_bytes.load(Ordering::SeqCst) == 0 {
            return;
        }
        weakrefs::flush();
    }
    assert_eq!(
        app.metrics.live_bytes.load(Ordering::SeqCst),
        0,
        "objects never released"
    );
}
