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
//!   by the connection object its task holds: counters, and the last few
//!   objects the client fetched (its working set, held strongly, which is
//!   what keeps popular objects in the weak cache). The entry goes when the
//!   connection closes, and with it the session's hold on its objects;
//! * build-event subscribers (the progress display) in a `WeakSet`.
//!
//! For comparison the same server can run with a strong cache,
//! `Mutex<HashMap<String, Strong<Rendered>>>`, which keeps everything it
//! ever built.

#![allow(dead_code)] // shared with the integration test, which uses a part

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use weakrefs::{Strong, WeakKeyMap, WeakSet, WeakValueMap};

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
    /// Requests that missed the cache but waited for a build already in
    /// flight instead of building (what single flight saves).
    pub joined_builds: AtomicU64,
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
    /// `WeakValueMap`: objects live while requests use them.
    Weak,
    /// `Mutex<HashMap<String, Strong<_>>>`: objects live forever.
    Strong,
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

/// Objects a session keeps at hand, most recent last.
pub const SESSION_OBJECTS: usize = 8;

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
                CacheKind::Weak => Cache::Weak(WeakValueMap::new()),
                CacheKind::Strong => Cache::Strong(Mutex::new(HashMap::new())),
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
    async fn object(self: &Arc<Self>, name: &str) -> Strong<Rendered> {
        match &self.cache {
            Cache::Weak(map) => {
                if let Some(object) = map.get(name) {
                    return object;
                }
                let built = AtomicBool::new(false);
                let object = map
                    .get_or_insert_with_async(name.to_owned(), || async {
                        built.store(true, Ordering::Relaxed);
                        let (app, name) = (self.clone(), name.to_owned());
                        tokio::task::spawn_blocking(move || app.render(&name))
                            .await
                            .expect("rendering panicked")
                    })
                    .await;
                if !built.load(Ordering::Relaxed) {
                    self.metrics.joined_builds.fetch_add(1, Ordering::Relaxed);
                }
                object
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
            ("joined_builds", load(&m.joined_builds)),
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
    /// Distinct object names, requested with a Zipf-like skew: name `i`
    /// with weight `1 / (i + 1)`.
    pub objects: usize,
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Per-request latency, sorted, in microseconds.
    pub latencies_us: Vec<u32>,
}

impl LoadReport {
    /// The `p`th percentile latency (0 to 100).
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies_us.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * (self.latencies_us.len() - 1) as f64).round() as usize;
        Duration::from_micros(u64::from(self.latencies_us[rank]))
    }
}

/// Drives `config.clients` concurrent keep-alive clients until the
/// duration or the request count runs out; `issued` counts requests as
/// they complete (for progress displays).
pub async fn run_load(config: LoadConfig, issued: Arc<AtomicU64>) -> LoadReport {
    let weights: Vec<f64> = (0..config.objects).map(|i| 1.0 / (i + 1) as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = 0.0;
    let cdf: Arc<Vec<f64>> = Arc::new(
        weights
            .iter()
            .map(|w| {
                cumulative += w / total;
                cumulative
            })
            .collect(),
    );
    let started = Instant::now();
    let deadline = started + config.duration;
    let mut clients = JoinSet::new();
    for client in 0..config.clients {
        let (cdf, issued, config) = (cdf.clone(), issued.clone(), config.clone());
        clients.spawn(async move {
            let mut report = LoadReport::default();
            let Ok(mut connection) = Client::connect(config.addr).await else {
                report.errors += 1;
                return report;
            };
            let mut state =
                0x9E37_79B9_7F4A_7C15u64 ^ (client as u64).wrapping_mul(0xA24B_AED4_963E_E407);
            while Instant::now() < deadline
                && issued.fetch_add(1, Ordering::Relaxed) < config.max_requests
            {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                let index = cdf.partition_point(|&c| c < u).min(cdf.len() - 1);
                let path = format!("/objects/object-{index}");
                let began = Instant::now();
                match connection.get(&path).await {
                    Ok((StatusCode::OK, body)) if body.len() == OBJECT_BYTES => {
                        report.requests += 1;
                        report.bytes += body.len() as u64;
                        let micros = began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                        report.latencies_us.push(micros);
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
        all.latencies_us.extend(report.latencies_us);
    }
    all.elapsed = started.elapsed();
    all.latencies_us.sort_unstable();
    all
}
