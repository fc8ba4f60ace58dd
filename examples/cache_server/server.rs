//! The server half of the demo: an HTTP/1.1 server (hyper on tokio) that
//! serves large generated objects by name from a shared cache, plus the
//! load generator's client. `main.rs` drives both; `tests/cache_server.rs`
//! uses this module directly.
//!
//! What lives where:
//!
//! * rendered objects (a 256 KiB grayscale image each, a few milliseconds
//!   of CPU to build) in a `WeakValueMap<String, Rendered>`: a response
//!   holds a `Strong` to its object until hyper has sent the body, so an
//!   object lives exactly as long as some request is using it, and
//!   concurrent requests for one name build it once (async single flight:
//!   waiting requests hold no worker thread);
//! * per-connection sessions in a `WeakKeyMap<Connection, Session>`, keyed
//!   by the connection object its task holds: counters, and the last two
//!   objects the client fetched (its working set, held strongly, so a
//!   client coming back to them finds them in the weak cache). The entry
//!   goes when the connection closes, and with it the session's hold on
//!   its objects;
//! * build-event subscribers (the progress display) in a `WeakSet`.
//!
//! The cache is one of three kinds ([`CacheKind`]): a strong
//! `Mutex<HashMap<String, Strong<Rendered>>>`, which keeps everything it
//! ever built; a pure `WeakValueMap`, which keeps what is in use; and a
//! `WeakValueMap` with a keep-warm tier (`keep_recent(n)`), which also keeps
//! `n` of the objects recently loaded or found, those wanted most often, so
//! that a popular object survives the moments when no request or session
//! holds it.

#![allow(dead_code)] // shared with the integration test, which uses a part

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Zipf};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use weakrefs::{MapStats, Strong, WeakKeyMap, WeakSet, WeakValueMap};

/// Side of a rendered image, in pixels.
pub const SIDE: usize = 512;
/// The `P5` (binary PGM) header of every rendered image.
const HEADER: &str = "P5\n512 512\n255\n";
/// Bytes of one rendered object.
pub const OBJECT_BYTES: usize = HEADER.len() + SIDE * SIDE;

/// Counters shared by the server and whoever reports on it.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Bytes of rendered objects alive now (in the cache or in flight).
    pub live_bytes: AtomicUsize,
    /// The most `live_bytes` ever reached.
    pub peak_bytes: AtomicUsize,
    /// Objects rendered.
    pub builds: AtomicU64,
    /// Object requests served.
    pub object_requests: AtomicU64,
    /// Builds thrown away because a racing request built the same object
    /// first (the strong cache's check-build-insert has no single flight).
    pub wasted_builds: AtomicU64,
}

/// A rendered object: big, and expensive to build.
pub struct Rendered {
    pub name: String,
    pub body: Vec<u8>,
    metrics: Arc<Metrics>,
}

impl Rendered {
    /// Renders `name`: a deterministic plasma-like image, a few
    /// milliseconds of CPU.
    fn render(name: &str, metrics: &Arc<Metrics>) -> Self {
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut body = Vec::with_capacity(OBJECT_BYTES);
        body.extend_from_slice(HEADER.as_bytes());
        for y in 0..SIDE as u64 {
            for x in 0..SIDE as u64 {
                let mut v = seed ^ (x << 32 | y);
                for _ in 0..6 {
                    v ^= v << 13;
                    v ^= v >> 7;
                    v ^= v << 17;
                }
                let wave = ((x * (seed & 7) + y * ((seed >> 3) & 7)) & 0xff) as u8;
                body.push(wave / 2 + (v as u8) / 2);
            }
        }
        let live = metrics.live_bytes.fetch_add(body.len(), Ordering::SeqCst) + body.len();
        metrics.peak_bytes.fetch_max(live, Ordering::SeqCst);
        metrics.builds.fetch_add(1, Ordering::SeqCst);
        Rendered {
            name: name.to_owned(),
            body,
            metrics: metrics.clone(),
        }
    }
}

impl Drop for Rendered {
    fn drop(&mut self) {
        self.metrics
            .live_bytes
            .fetch_sub(self.body.len(), Ordering::SeqCst);
    }
}

/// A response body that keeps its object alive until hyper drops it.
struct Held(Strong<Rendered>);

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.0.body
    }
}

/// Which cache the server uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheKind {
    /// `Mutex<HashMap<String, Strong<_>>>`: objects live forever.
    Strong,
    /// `WeakValueMap`: objects live while requests or sessions use them.
    Weak,
    /// `WeakValueMap` with `keep_recent(recent)`: objects live while in use,
    /// and the `recent` most recently loaded or found live on regardless.
    KeepWarm { recent: usize },
}

impl std::fmt::Display for CacheKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheKind::Strong => f.write_str("strong HashMap"),
            CacheKind::Weak => f.write_str("WeakValueMap"),
            CacheKind::KeepWarm { recent } => write!(f, "keep_recent({recent})"),
        }
    }
}

enum Cache {
    Weak(WeakValueMap<String, Rendered>),
    Strong(Mutex<HashMap<String, Strong<Rendered>>>),
}

/// One accepted connection; its task holds the only `Strong`.
#[derive(Debug)]
pub struct Connection {
    pub id: u64,
    pub peer: SocketAddr,
}

/// Objects a session keeps at hand, most recent last. Few: a session's
/// working set is what its own client fetched last, not a cache for
/// everyone (that is the keep-warm tier's job).
pub const SESSION_OBJECTS: usize = 2;

/// What the server keeps per connection, in a `WeakKeyMap`.
#[derive(Default)]
pub struct Session {
    pub requests: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// The session's working set: the last objects it fetched.
    recent: Mutex<VecDeque<Strong<Rendered>>>,
}

impl Session {
    fn remember(&self, object: Strong<Rendered>) {
        let mut recent = self.recent.lock().unwrap();
        if !recent.iter().any(|held| Strong::ptr_eq(held, &object)) {
            recent.push_back(object);
        }
        if recent.len() > SESSION_OBJECTS {
            recent.pop_front();
        }
    }
}

/// Someone who wants to hear about builds, held weakly by the server.
#[derive(Debug, Default)]
pub struct BuildSubscriber {
    pub builds: AtomicU64,
}

/// The server's shared state.
pub struct App {
    kind: CacheKind,
    cache: Cache,
    pub connections: WeakKeyMap<Connection, Session>,
    pub subscribers: WeakSet<BuildSubscriber>,
    pub metrics: Arc<Metrics>,
    next_connection: AtomicU64,
}

impl App {
    pub fn new(kind: CacheKind) -> Arc<Self> {
        Arc::new(App {
            kind,
            cache: match kind {
                CacheKind::Strong => Cache::Strong(Mutex::new(HashMap::new())),
                CacheKind::Weak => Cache::Weak(WeakValueMap::new()),
                CacheKind::KeepWarm { recent } => {
                    Cache::Weak(WeakValueMap::builder().keep_recent(recent).build())
                }
            },
            connections: WeakKeyMap::new(),
            subscribers: WeakSet::new(),
            metrics: Arc::default(),
            next_connection: AtomicU64::new(0),
        })
    }

    pub fn kind(&self) -> CacheKind {
        self.kind
    }

    /// Objects the cache names now.
    pub fn cached_objects(&self) -> usize {
        match &self.cache {
            Cache::Weak(map) => map.len(),
            Cache::Strong(map) => map.lock().unwrap().len(),
        }
    }

    /// The names the cache holds now, sorted.
    pub fn cached_names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.cache {
            Cache::Weak(map) => map.keys().collect(),
            Cache::Strong(map) => map.lock().unwrap().keys().cloned().collect(),
        };
        names.sort_unstable();
        names
    }

    /// The weak map's own counters (hits, loads, joined loads, deaths);
    /// `None` for the strong cache.
    pub fn cache_stats(&self) -> Option<MapStats> {
        match &self.cache {
            Cache::Weak(map) => Some(map.stats()),
            Cache::Strong(_) => None,
        }
    }

    /// Requests that missed the cache but waited for a build already in
    /// flight instead of building (what single flight saves).
    pub fn joined_builds(&self) -> u64 {
        self.cache_stats().map_or(0, |stats| stats.joined)
    }

    fn render(&self, name: &str) -> Rendered {
        let object = Rendered::render(name, &self.metrics);
        for subscriber in self.subscribers.iter() {
            subscriber.builds.fetch_add(1, Ordering::Relaxed);
        }
        object
    }

    /// The object named `name`: from the cache, or built once for all
    /// concurrent requesters. A request that finds a build in flight awaits
    /// it without holding a worker thread (async single flight); the build
    /// itself runs on tokio's blocking pool, since it takes milliseconds.
    /// If the leading request goes away mid-build, a waiting one takes over.
    /// With a keep-warm tier, the load and every hit count as recent use.
    async fn object(self: &Arc<Self>, name: &str) -> Strong<Rendered> {
        match &self.cache {
            Cache::Weak(map) => {
                // The hit path takes no allocation for the key.
                if let Some(object) = map.get(name) {
                    return object;
                }
                map.get_or_insert_with_async(name.to_owned(), || async {
                    let (app, name) = (self.clone(), name.to_owned());
                    tokio::task::spawn_blocking(move || app.render(&name))
                        .await
                        .expect("rendering panicked")
                })
                .await
            }
            Cache::Strong(map) => {
                if let Some(object) = map.lock().unwrap().get(name) {
                    return object.clone();
                }
                let (app, owned) = (self.clone(), name.to_owned());
                let built = tokio::task::spawn_blocking(move || Strong::new(app.render(&owned)))
                    .await
                    .expect("rendering panicked");
                // The usual check-build-insert: a racing request may have
                // built it too; the first one in wins.
                let mut map = map.lock().unwrap();
                let kept = map
                    .entry(name.to_owned())
                    .or_insert_with(|| built.clone())
                    .clone();
                if !Strong::ptr_eq(&kept, &built) {
                    self.metrics.wasted_builds.fetch_add(1, Ordering::Relaxed);
                }
                kept
            }
        }
    }

    async fn handle(
        self: &Arc<Self>,
        request: Request<Incoming>,
        connection: &Strong<Connection>,
    ) -> Response<Full<Bytes>> {
        self.connections.with(connection, |session| {
            session.requests.fetch_add(1, Ordering::Relaxed)
        });
        if request.method() != Method::GET {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is served\n".into(),
            );
        }
        let path = request.uri().path();
        match path {
            "/" => text(
                StatusCode::OK,
                "GET /objects/<name> for a rendered 512x512 image (PGM), GET /stats for counters\n"
                    .into(),
            ),
            "/stats" => text(StatusCode::OK, self.stats_text()),
            _ => match path.strip_prefix("/objects/") {
                Some(name) if valid_name(name) => {
                    let object = self.object(name).await;
                    self.metrics.object_requests.fetch_add(1, Ordering::Relaxed);
                    let length = object.body.len() as u64;
                    self.connections.with(connection, |session| {
                        session.bytes_sent.fetch_add(length, Ordering::Relaxed);
                        session.remember(object.clone());
                    });
                    Response::builder()
                        .header("content-type", "image/x-portable-graymap")
                        .body(Full::new(Bytes::from_owner(Held(object))))
                        .expect("a valid response")
                }
                Some(_) => text(
                    StatusCode::BAD_REQUEST,
                    "an object name is 1 to 64 of a-z, 0-9 and '-'\n".into(),
                ),
                None => text(StatusCode::NOT_FOUND, format!("no such path: {path}\n")),
            },
        }
    }

    /// The counters, as plain text (`GET /stats`).
    pub fn stats_text(&self) -> String {
        let m = &self.metrics;
        let mut out = String::new();
        let _ = writeln!(out, "cache: {:?}", self.kind);
        let _ = writeln!(out, "cached_objects: {}", self.cached_objects());
        let load = |counter: &AtomicU64| counter.load(Ordering::SeqCst);
        let counters = [
            (
                "live_object_bytes",
                m.live_bytes.load(Ordering::SeqCst) as u64,
            ),
            (
                "peak_object_bytes",
                m.peak_bytes.load(Ordering::SeqCst) as u64,
            ),
            ("builds", load(&m.builds)),
            ("object_requests", load(&m.object_requests)),
            ("joined_builds", self.joined_builds()),
            ("wasted_builds", load(&m.wasted_builds)),
        ];
        for (name, value) in counters {
            let _ = writeln!(out, "{name}: {value}");
        }
        let _ = writeln!(out, "open_connections: {}", self.connections.len());
        let held: usize = self
            .connections
            .keys()
            .filter_map(|connection| {
                self.connections
                    .with(&connection, |session| session.recent.lock().unwrap().len())
            })
            .sum();
        let _ = writeln!(out, "objects_held_by_sessions: {held}");
        let _ = writeln!(out, "build_subscribers: {}", self.subscribers.len());
        if let Some(stats) = self.cache_stats() {
            let _ = writeln!(
                out,
                "map_stats: hits {} misses {} loads {} joined {} load_failures {} died {}",
                stats.hits,
                stats.misses,
                stats.loads,
                stats.joined,
                stats.load_failures,
                stats.died
            );
        }
        out
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// Accepts connections on `listener` until `stop` turns true, then waits
/// for the open connections to finish (clients close them).
pub async fn serve(app: Arc<App>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors, say: try again.
                Err(_) => continue,
            },
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let id = app.next_connection.fetch_add(1, Ordering::Relaxed);
        let connection = Strong::new(Connection { id, peer });
        app.connections.insert(&connection, Session::default());
        let app = app.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (app, connection) = (app.clone(), connection.clone());
                async move { Ok::<_, Infallible>(app.handle(request, &connection).await) }
            });
            // A client that goes away mid-request is its own business.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            // The service, and with it the last `Strong<Connection>`, is
            // dropped here: the session goes with it, and lets go of its
            // objects.
        });
    }
    while connections.join_next().await.is_some() {}
}

/// A keep-alive HTTP/1.1 client on one connection.
pub struct Client {
    sender: SendRequest<Empty<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Client { sender })
    }

    /// `GET path`: the status and the whole body.
    pub async fn get(&mut self, path: &str) -> Result<(StatusCode, Bytes), hyper::Error> {
        self.sender.ready().await?;
        let request = Request::get(path)
            .header("host", "127.0.0.1")
            .body(Empty::new())
            .expect("a valid request");
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// What a load run asks for.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub addr: SocketAddr,
    pub clients: usize,
    pub duration: Duration,
    /// The run also stops after this many requests in all.
    pub max_requests: u64,
    /// Distinct object names, `object-0` to `object-{objects - 1}`,
    /// requested by Zipf's law: `object-i` with weight
    /// `1 / (i + 1)^exponent`.
    pub objects: usize,
    /// Zipf's exponent: 1 is the classic skew, larger is steeper.
    pub exponent: f64,
}

/// What a load run saw.
#[derive(Debug)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Per-request latency in microseconds, 3 significant digits.
    pub latency_us: Histogram<u64>,
}

impl Default for LoadReport {
    fn default() -> Self {
        LoadReport {
            requests: 0,
            errors: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            // 1 µs to an hour; longer ones (none) would count as an hour.
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
        }
    }
}

impl LoadReport {
    /// The `p`th percentile latency (0 to 100).
    pub fn percentile(&self, p: f64) -> Duration {
        Duration::from_micros(self.latency_us.value_at_percentile(p))
    }
}

/// The share of requests that Zipf's law with `exponent` over `objects`
/// names sends to the `top` most popular: `H(top) / H(objects)`, with the
/// generalized harmonic numbers `H(n) = sum of 1 / k^exponent, k = 1..=n`.
pub fn zipf_share(top: usize, objects: usize, exponent: f64) -> f64 {
    let harmonic = |n: usize| (1..=n).map(|k| (k as f64).powf(-exponent)).sum::<f64>();
    harmonic(top.min(objects)) / harmonic(objects)
}

/// Drives `config.clients` concurrent keep-alive clients until the
/// duration or the request count runs out; `issued` counts requests as
/// they complete (for progress displays).
///
/// Client `c` draws its names from a generator seeded with `c`, so every
/// run (and every cache kind) sees the same request sequences.
pub async fn run_load(config: LoadConfig, issued: Arc<AtomicU64>) -> LoadReport {
    let popularity = Zipf::new(config.objects as f64, config.exponent)
        .expect("at least one object and a finite exponent of at least 0");
    let started = Instant::now();
    let deadline = started + config.duration;
    let mut clients = JoinSet::new();
    for client in 0..config.clients {
        let (issued, config) = (issued.clone(), config.clone());
        clients.spawn(async move {
            let mut report = LoadReport::default();
            let Ok(mut connection) = Client::connect(config.addr).await else {
                report.errors += 1;
                return report;
            };
            let mut rng = SmallRng::seed_from_u64(client as u64);
            while Instant::now() < deadline
                && issued.fetch_add(1, Ordering::Relaxed) < config.max_requests
            {
                // Zipf draws 1 to `objects`; the most popular is object-0.
                let rank = popularity.sample(&mut rng) as usize;
                let path = format!("/objects/object-{}", rank - 1);
                let began = Instant::now();
                match connection.get(&path).await {
                    Ok((StatusCode::OK, body)) if body.len() == OBJECT_BYTES => {
                        report.requests += 1;
                        report.bytes += body.len() as u64;
                        let micros = began.elapsed().as_micros().max(1);
                        report
                            .latency_us
                            .saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
                    }
                    _ => report.errors += 1,
                }
            }
            report
        });
    }
    let mut all = LoadReport::default();
    while let Some(report) = clients.join_next().await {
        let report = report.expect("a load client panicked");
        all.requests += report.requests;
        all.errors += report.errors;
        all.bytes += report.bytes;
        all.latency_us
            .add(&report.latency_us)
            .expect("histograms of the same bounds merge");
    }
    all.elapsed = started.elapsed();
    all
}
