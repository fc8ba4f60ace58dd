//! What a run left behind: criterion's estimates, and the tab-separated
//! files the memory and latency benchmarks write (benches/support/out.rs).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// One criterion benchmark: a case (its id less the last part) measured
/// for one implementation (the last part).
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// `read_hit/uniform/1_thread`, `observers/churn_1000`, ...
    pub case: String,
    /// `weakrefs`, `dashmap`, `weakrefs_get`, ...
    pub implementation: String,
    /// Elements per second at the median time.
    pub per_second: f64,
}

impl Measurement {
    /// Whether the row measures this crate (names start with `weakrefs`).
    pub fn is_ours(&self) -> bool {
        self.implementation.starts_with("weakrefs")
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
        .ok_or_else(|| format!("{full_id}: no element throughput"))?;
    let median_ns = estimates["median"]["point_estimate"]
        .as_f64()
        .ok_or_else(|| format!("{full_id}: no median"))?;
    if median_ns <= 0.0 {
        return Err(format!("{full_id}: median of {median_ns} ns"));
    }
    Ok(Measurement {
        case: case.to_string(),
        implementation: implementation.to_string(),
        per_second: elements / (median_ns * 1e-9),
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
            if path.file_name().is_some_and(|n| n == "report") {
                continue;
            }
            if new.join("benchmark.json").is_file() {
                let read = |name: &str| {
                    fs::read_to_string(new.join(name))
                        .map_err(|e| format!("{}: {e}", new.join(name).display()))
                };
                let m = measurement(&read("benchmark.json")?, &read("estimates.json")?)?;
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
        .filter(|line| !line.is_empty())
        .enumerate()
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
        .map_err(|_| format!("column {column:?}: {field:?} is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_is_elements_over_median() {
        let m = measurement(
            r#"{"full_id":"read_hit/uniform/2_thread/dashmap","throughput":{"Elements":2}}"#,
            r#"{"median":{"point_estimate":50.0}}"#,
        )
        .unwrap();
        assert_eq!(m.case, "read_hit/uniform/2_thread");
        assert_eq!(m.implementation, "dashmap");
        assert!((m.per_second - 4e7).abs() < 1.0, "{}", m.per_second);
        assert!(!m.is_ours());
    }

    #[test]
    fn malformed_estimates_say_what_is_missing() {
        let err = measurement(
            r#"{"full_id":"churn/weakrefs","throughput":{"Elements":1024}}"#,
            r#"{"mean":{}}"#,
        )
        .unwrap_err();
        assert_eq!(err, "churn/weakrefs: no median");
        let err = measurement(r#"{"full_id":"solo"}"#, "{}").unwrap_err();
        assert!(err.contains("no group"), "{err}");
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
    }
}
