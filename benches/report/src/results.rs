//! What a run left behind: criterion's estimates, and the tab-separated
//! files the memory and latency benchmarks write (benches/support/out.rs).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

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

/// Reads one benchmark's `new/benchmark.json` and `new/estimates.json`.
pub fn measurement(benchmark_json: &str, estimates_json: &str) -> Result<Measurement, String> {
    let benchmark: serde_json::Value =
        serde_json::from_str(benchmark_json).map_err(|e| format!("benchmark.json: {e}"))?;
    let estimates: serde_json::Value =
        serde_json::from_str(estimates_json).map_err(|e| format!("estimates.json: {e}"))?;
    let full_id = benchmark["full_id"]
        .as_str()
        .ok_or("benchmark.json has no full_id")?;
    let (case, implementation) = full_id
        .rsplit_once('/')
        .ok_or_else(|| format!("benchmark id {full_id:?} has no group"))?;
    let elements = benchmark["throughput"]["Elements"]
        .as_f64()
        .filter(|n| n.is_finite() && *n > 0.0)
        .ok_or_else(|| format!("{full_id}: no positive element throughput"))?;
    let median = &estimates["median"];
    let time = |value: &serde_json::Value, what: &str| {
        value
            .as_f64()
            .filter(|ns| ns.is_finite() && *ns > 0.0)
            .ok_or_else(|| format!("{full_id}: no positive {what}"))
    };
    let median_ns = time(&median["point_estimate"], "median")?;
    let interval = &median["confidence_interval"];
    let slow_ns = time(&interval["upper_bound"], "median interval")?;
    let fast_ns = time(&interval["lower_bound"], "median interval")?;
    let rate = |ns: f64| elements / (ns * 1e-9);
    Ok(Measurement {
        case: case.to_string(),
        implementation: implementation.to_string(),
        per_second: rate(median_ns),
        interval: (rate(slow_ns), rate(fast_ns)),
    })
}

/// Every benchmark under a criterion home directory, in id order.
pub fn criterion_dir(home: &Path) -> Result<Vec<Measurement>, String> {
    let mut found = BTreeMap::new();
    let mut pending = vec![home.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
            if !path.is_dir() {
                continue;
            }
            let new = path.join("new");
            if new.join("benchmark.json").is_file() {
                let read = |name: &str| {
                    fs::read_to_string(new.join(name))
                        .map_err(|e| format!("{}: {e}", new.join(name).display()))
                };
                let m = measurement(&read("benchmark.json")?, &read("estimates.json")?)
                    .map_err(|e| format!("{}: {e}", new.display()))?;
                found.insert((m.case.clone(), m.implementation.clone()), m);
            } else {
                pending.push(path);
            }
        }
    }
    Ok(found.into_values().collect())
}

/// The rows of a tab-separated file with a header line, as maps from
/// column name to field.
pub fn tsv(text: &str) -> Result<Vec<BTreeMap<String, String>>, String> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().ok_or("empty file")?.split('\t').collect();
    lines
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| {
            let fields: Vec<&str> = line.split('\t').collect();
            if fields.len() != header.len() {
                return Err(format!(
                    "line {}: {} fields, the header has {}",
                    i + 2,
                    fields.len(),
                    header.len()
                ));
            }
            Ok(header
                .iter()
                .zip(fields)
                .map(|(h, f)| (h.to_string(), f.to_string()))
                .collect())
        })
        .collect()
}

/// A field of a TSV row.
pub fn field<'a>(row: &'a BTreeMap<String, String>, column: &str) -> Result<&'a str, String> {
    row.get(column)
        .map(String::as_str)
        .ok_or_else(|| format!("no column {column:?}"))
}

/// A numeric field of a TSV row.
pub fn number(row: &BTreeMap<String, String>, column: &str) -> Result<f64, String> {
    let field = field(row, column)?;
    field
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .ok_or_else(|| format!("column {column:?}: {field:?} is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEDIAN_50NS: &str = r#"{"median":{"point_estimate":50.0,
        "confidence_interval":{"lower_bound":20.0,"upper_bound":100.0}}}"#;

    #[test]
    fn throughput_is_elements_over_median() {
        let m = measurement(
            r#"{"full_id":"read_hit/uniform/2_thread/dashmap","throughput":{"Elements":2}}"#,
            MEDIAN_50NS,
        )
        .unwrap();
        assert_eq!(m.case, "read_hit/uniform/2_thread");
        assert_eq!(m.implementation, "dashmap");
        assert!((m.per_second - 4e7).abs() < 1.0, "{}", m.per_second);
        assert!((m.interval.0 - 2e7).abs() < 1.0 && (m.interval.1 - 1e8).abs() < 1.0);
        assert!(!m.is_ours());
        assert!(is_ours("weakrefs_get") && is_ours("WeakSet") && !is_ours("dashmap"));
    }

    #[test]
    fn malformed_estimates_say_what_is_missing() {
        let err = measurement(
            r#"{"full_id":"churn/weakrefs","throughput":{"Elements":1024}}"#,
            r#"{"mean":{}}"#,
        )
        .unwrap_err();
        assert_eq!(err, "churn/weakrefs: no positive median");
        let err = measurement(r#"{"full_id":"solo"}"#, "{}").unwrap_err();
        assert!(err.contains("no group"), "{err}");
        let err = measurement(
            r#"{"full_id":"churn/weakrefs","throughput":{"Elements":0}}"#,
            MEDIAN_50NS,
        )
        .unwrap_err();
        assert!(err.contains("no positive element throughput"), "{err}");
    }

    #[test]
    fn tsv_rows_and_numbers() {
        let rows = tsv("map\tbytes\nDashMap<u64, Weak>\t22.5\n").unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["map"], "DashMap<u64, Weak>");
        assert_eq!(number(&rows[0], "bytes").unwrap(), 22.5);
        assert!(number(&rows[0], "map").is_err());
        assert_eq!(field(&rows[0], "size").unwrap_err(), "no column \"size\"");
        assert!(tsv("a\tb\n1\n").unwrap_err().contains("1 fields"));
        assert!(tsv("a\tb\n1\t2\n\n3\n").unwrap_err().starts_with("line 4:"));
        let rows = tsv("a\nNaN\ninf\n").unwrap();
        assert!(number(&rows[0], "a").is_err() && number(&rows[1], "a").is_err());
    }
}
