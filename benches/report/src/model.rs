//! What one run measured and where it was made: the types that results.rs
//! fills, render.rs writes out and charts.rs colours. Everything here is
//! data; nothing here reads files or draws.

use serde::{Deserialize, Deserializer, Serialize};

/// Whether a row measures this crate: criterion ids name it `weakrefs*`,
/// the memory runs name its collections (`WeakValueMap`, ...).
pub fn is_ours(name: &str) -> bool {
    name.starts_with("weakrefs") || name.starts_with("Weak")
}

/// Whether a row is a reference floor rather than an alternative a user
/// would pick: an unsynchronised map read in place (`*_unsync`). It is
/// shown, but never taken as the best alternative.
pub fn is_floor(name: &str) -> bool {
    name.ends_with("_unsync")
}

/// One criterion benchmark: a case (its id less the last part) measured
/// for one implementation (the last part).
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// `read_hit/uniform/1_thread`, `observers/churn_1000`, ...
    pub case: String,
    /// `weakrefs`, `dashmap`, `dashmap_entry`, ...
    pub implementation: String,
    /// Elements per second at the median time.
    pub per_second: f64,
    /// The same at the bounds of criterion's 95% confidence interval of
    /// the median: (slowest, fastest).
    pub interval: (f64, f64),
}

impl Measurement {
    /// Whether the row measures this crate.
    pub fn is_ours(&self) -> bool {
        is_ours(&self.implementation)
    }
}

/// Everything one run measured.
#[derive(Default)]
pub struct Run {
    pub measurements: Vec<Measurement>,
    /// Per map, what it holds per live entry (`map_memory`).
    pub map_memory: Vec<MapMemory>,
    /// Per map, its churn run (`churn_memory`).
    pub churn_memory: Vec<ChurnRun>,
    /// Per design: latency samples in microseconds, sorted
    /// (`callback_latency`).
    pub latency: Vec<(String, Vec<f64>)>,
    /// The cache_server demo's three caches, in the order it ran them.
    pub demo: Vec<DemoCache>,
    /// The interleaved A/B ratios (`map_ab`), a row per case and peer.
    pub ab: Vec<AbRow>,
}

/// One ratio of the interleaved A/B run: a row of `map_ab.tsv`. Every
/// contender of a case ran once a round, back to back; `ratio` is the
/// median over the rounds of this crate's rate over the peer's in the
/// same round, which is not `ours / theirs` (the medians of each side's
/// rates).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct AbRow {
    /// `read/100000_keys/1_thread`, `churn/1_thread`, ...
    pub case: String,
    pub peer: String,
    pub role: Role,
    /// Operations per second: this crate's median over the rounds.
    #[serde(deserialize_with = "finite")]
    pub ours: f64,
    /// The same for the peer.
    #[serde(deserialize_with = "finite")]
    pub theirs: f64,
    #[serde(deserialize_with = "finite")]
    pub ratio: f64,
    pub rounds: u32,
}

/// What a peer of the interleaved run is to the ratio against it
/// (benches/map_ab.rs, `role`), as `map_ab.tsv` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// What a user would pick instead.
    Alternative,
    /// An unsynchronised map read in place: shown, never judged against.
    Floor,
    /// A peer with one cost added, to show where a gap comes from.
    Control,
    /// This crate's same map without the option the case measures.
    Without,
}

impl Role {
    /// The word the report prints for it.
    pub fn word(self) -> &'static str {
        match self {
            Role::Alternative => "alternative",
            Role::Floor => "floor",
            Role::Control => "control",
            Role::Without => "without",
        }
    }
}

impl AbRow {
    /// Whether the case is judged on this row's ratio (or on another of
    /// its kind): an alternative, or this crate without the option.
    pub fn judged(&self) -> bool {
        matches!(self.role, Role::Alternative | Role::Without)
    }
}

/// What one map holds per live entry: a row of `map_memory.tsv`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct MapMemory {
    pub map: String,
    #[serde(rename = "bytes_per_entry", deserialize_with = "finite")]
    pub bytes: f64,
    #[serde(rename = "allocations_per_entry", deserialize_with = "finite")]
    pub allocations: f64,
}

/// (operations, entries, heap bytes) at one point of a churn run.
pub type ChurnSample = (f64, f64, f64);

/// One map's churn run.
#[derive(Debug, Default, PartialEq)]
pub struct ChurnRun {
    pub map: String,
    /// Taken while objects came and went.
    pub samples: Vec<ChurnSample>,
    /// Taken after every object died and `flush()` returned.
    pub last: ChurnSample,
}

/// One cache of the cache_server demo (examples/cache_server), as its
/// `--tsv` file gives it: a row per cache.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct DemoCache {
    /// `strong`, `weak` or `keep-warm`: the demo's `--cache` words.
    pub kind: String,
    /// The demo's name for it, its summary's column heading:
    /// `strong HashMap`, `WeakValueMap`, `keep_recent(50)`.
    pub cache: String,
    pub requests: u64,
    #[serde(deserialize_with = "finite")]
    pub requests_per_second: f64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub objects_built: u64,
    /// The most bytes of objects alive at once during the run.
    pub peak_object_bytes: u64,
    /// Bytes of objects still alive once the clients had left.
    pub object_bytes_clients_gone: u64,
}

/// Bytes in MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Where and how the run was made; saved beside the results
/// (`context.json`) so that `--no-run` redraws the same header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Context {
    pub command: String,
    pub date: String,
    pub commit: String,
    pub machine: String,
    pub mode: String,
}

/// A number that is finite: results hold no NaN or infinity.
pub(crate) fn finite<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    let value = f64::deserialize(deserializer)?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(serde::de::Error::custom(format!(
            "{value} is not a finite number"
        )))
    }
}

/// A measurement with a tight interval (±1%), for the tests of the
/// modules that compare and render measurements.
#[cfg(test)]
pub fn test_measurement(case: &str, implementation: &str, per_second: f64) -> Measurement {
    Measurement {
        case: case.into(),
        implementation: implementation.into(),
        per_second,
        interval: (per_second * 0.99, per_second * 1.01),
    }
}
