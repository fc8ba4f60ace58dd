//! What a run left behind, read into the model: criterion's estimates,
//! the tab-separated files the memory, latency and interleaved A/B
//! benchmarks write (benches/support/out.rs), and the cache_server demo's
//! `--tsv` file.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::model::{ChurnRun, Measurement, Run};

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

/// The file name the demo's figures are saved under, in the run's output
/// directory beside the benchmarks' files.
pub const DEMO_TSV: &str = "cache_server.tsv";

/// The file the interleaved A/B run (`map_ab`) writes its ratios to.
pub const AB_TSV: &str = "map_ab.tsv";

/// Reads what the benchmarks and the demo left in `criterion_home` and
/// `out`.
pub fn load(criterion_home: &Path, out: &Path) -> Result<Run, String> {
    let mut run = Run {
        measurements: criterion_dir(criterion_home)?,
        map_memory: table(out, "map_memory.tsv")?,
        demo: table(out, DEMO_TSV)?,
        ab: table(out, AB_TSV)?,
        ..Run::default()
    };
    // The samples taken while objects came and went, per map; the one
    // taken once all had died is matched to its map afterwards.
    let mut finals = Vec::new();
    for row in table::<ChurnRow>(out, "churn_memory.tsv")? {
        let sample = (row.ops, row.entries, row.heap_bytes);
        match row.last {
            1 => finals.push((row.map, sample)),
            0 => match run.churn_memory.iter_mut().find(|c| c.map == row.map) {
                Some(churn) => churn.samples.push(sample),
                None => run.churn_memory.push(ChurnRun {
                    map: row.map,
                    samples: vec![sample],
                    ..ChurnRun::default()
                }),
            },
            other => return Err(format!("churn_memory.tsv: final is {other}, not 0 or 1")),
        }
    }
    for churn in &mut run.churn_memory {
        let mine: Vec<_> = finals.iter().filter(|(map, _)| *map == churn.map).collect();
        match mine[..] {
            [(_, last)] => churn.last = *last,
            _ => {
                return Err(format!(
                    "churn_memory.tsv: {} has {} final samples, not one",
                    churn.map,
                    mine.len()
                ))
            }
        }
    }
    for row in table::<LatencyRow>(out, "callback_latency.tsv")? {
        match run.latency.iter_mut().find(|(n, _)| *n == row.design) {
            Some((_, samples)) => samples.push(row.micros),
            None => run.latency.push((row.design, vec![row.micros])),
        }
    }
    for (_, samples) in &mut run.latency {
        samples.sort_by(f64::total_cmp);
    }
    Ok(run)
}

/// A row of `churn_memory.tsv`: one sample of one map's run.
#[derive(Debug, Deserialize)]
struct ChurnRow {
    map: String,
    #[serde(deserialize_with = "crate::model::finite")]
    ops: f64,
    #[serde(deserialize_with = "crate::model::finite")]
    entries: f64,
    #[serde(deserialize_with = "crate::model::finite")]
    heap_bytes: f64,
    /// 1 for the sample taken once every object had died, else 0.
    #[serde(rename = "final")]
    last: u8,
}

/// A row of `callback_latency.tsv`: one sample of one design.
#[derive(Debug, Deserialize)]
struct LatencyRow {
    design: String,
    #[serde(deserialize_with = "crate::model::finite")]
    micros: f64,
}

/// The rows of the tab-separated file `name` in `out`.
fn table<T: DeserializeOwned>(out: &Path, name: &str) -> Result<Vec<T>, String> {
    let path = out.join(name);
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    tsv(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The rows of a tab-separated text with a header line, each read by
/// column name. Fields are taken as they are: names hold commas and
/// quotes, never tabs. Blank lines are skipped.
pub fn tsv<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .quoting(false)
        .from_reader(text.as_bytes());
    let header = reader.headers().map_err(|e| e.to_string())?.clone();
    if header.iter().all(str::is_empty) {
        return Err("no header line".into());
    }
    reader
        .deserialize()
        .map(|row| row.map_err(|e| describe(&e, text, &header)))
        .collect()
}

/// A csv error in `text` as the line it is on and what is wrong there,
/// with the column's name where the error has one.
fn describe(error: &csv::Error, text: &str, header: &csv::StringRecord) -> String {
    // csv counts lines without the blank ones, and places a record after
    // blank lines at their start: count from the record's first byte.
    let line = error.position().map_or(String::new(), |p| {
        let at = text.get(p.byte() as usize..).unwrap_or_default();
        let start = text.len() - at.trim_start_matches(['\n', '\r']).len();
        format!("line {}: ", text[..start].matches('\n').count() + 1)
    });
    match error.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("{line}{len} fields, the header has {expected_len}"),
        csv::ErrorKind::Deserialize { err, .. } => {
            let column = err
                .field()
                .and_then(|i| header.get(i as usize))
                .map_or(String::new(), |name| format!("column {name:?}: "));
            format!("{line}{column}{}", err.kind())
        }
        _ => format!("{line}{error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{is_floor, is_ours, AbRow, DemoCache, MapMemory, Role};

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
        assert!(is_floor("std_hashmap_unsync") && !is_floor("dashmap"));
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
    fn tsv_rows_by_column_name() {
        let rows: Vec<MapMemory> = tsv("allocations_per_entry\tmap\tbytes_per_entry\n\
             1.00\tDashMap<u64, Weak>\t22.5\n\
             \n\
             0\t\"quoted\", with commas\t8\n")
        .unwrap();
        assert_eq!(
            rows,
            [
                MapMemory {
                    map: "DashMap<u64, Weak>".into(),
                    bytes: 22.5,
                    allocations: 1.0
                },
                MapMemory {
                    map: "\"quoted\", with commas".into(),
                    bytes: 8.0,
                    allocations: 0.0
                }
            ]
        );
    }

    #[test]
    fn tsv_errors_name_the_line_and_column() {
        let err =
            tsv::<MapMemory>("map\tbytes_per_entry\tallocations_per_entry\nA\t1\n").unwrap_err();
        assert_eq!(err, "line 2: 2 fields, the header has 3");
        let err = tsv::<LatencyRow>("design\tmicros\nw\t1\n\nw\t2\t3\n").unwrap_err();
        assert_eq!(err, "line 4: 3 fields, the header has 2");
        let err = tsv::<LatencyRow>("design\tmicros\nw\tslow\n").unwrap_err();
        assert!(err.starts_with("line 2: column \"micros\": "), "{err}");
        for not_finite in ["NaN", "inf", "-inf"] {
            let err = tsv::<LatencyRow>(&format!("design\tmicros\nw\t{not_finite}\n")).unwrap_err();
            assert!(
                err.contains("is not a finite number"),
                "{not_finite}: {err}"
            );
        }
        let err = tsv::<LatencyRow>("design\tnanos\nw\t1\n").unwrap_err();
        assert!(err.contains("missing field `micros`"), "{err}");
        assert_eq!(tsv::<LatencyRow>("").unwrap_err(), "no header line");
        assert!(tsv::<LatencyRow>("design\tmicros\n").unwrap().is_empty());
    }

    #[test]
    fn demo_rows_read_as_the_demo_writes_them() {
        let rows: Vec<DemoCache> = tsv(
            "kind\tcache\trequests\trequests_per_second\tlatency_p50_us\tlatency_p99_us\t\
             objects_built\tpeak_object_bytes\tobject_bytes_clients_gone\n\
             keep-warm\tkeep_recent(50)\t900\t4500.5\t130\t2100\t60\t1048576\t524288\n",
        )
        .unwrap();
        assert_eq!(
            rows,
            [DemoCache {
                kind: "keep-warm".into(),
                cache: "keep_recent(50)".into(),
                requests: 900,
                requests_per_second: 4500.5,
                latency_p50_us: 130,
                latency_p99_us: 2100,
                objects_built: 60,
                peak_object_bytes: 1 << 20,
                object_bytes_clients_gone: 1 << 19,
            }]
        );
        let negative = "kind\tcache\trequests\trequests_per_second\tlatency_p50_us\t\
            latency_p99_us\tobjects_built\tpeak_object_bytes\tobject_bytes_clients_gone\n\
            weak\tWeakValueMap\t-1\t1\t1\t1\t1\t1\t1\n";
        let err = tsv::<DemoCache>(negative).unwrap_err();
        assert!(err.starts_with("line 2: column \"requests\": "), "{err}");
    }

    #[test]
    fn load_reads_what_the_benches_and_the_demo_write() {
        let dir = std::env::temp_dir().join(format!("weakrefs-load-{}", std::process::id()));
        let bench = dir.join("criterion/churn/weakrefs/new");
        fs::create_dir_all(&bench).unwrap();
        fs::write(
            bench.join("benchmark.json"),
            r#"{"full_id":"churn/weakrefs","throughput":{"Elements":1024}}"#,
        )
        .unwrap();
        fs::write(
            bench.join("estimates.json"),
            r#"{"median":{"point_estimate":1024000.0,
                "confidence_interval":{"lower_bound":1e6,"upper_bound":1.1e6}}}"#,
        )
        .unwrap();
        let out = dir.join("out");
        fs::create_dir_all(&out).unwrap();
        fs::write(
            out.join("map_memory.tsv"),
            "map\tbytes_per_entry\tallocations_per_entry\nA, B\t22.5\t1.00\n",
        )
        .unwrap();
        fs::write(
            out.join("churn_memory.tsv"),
            "map\tops\tentries\theap_bytes\tfinal\n\
             M\t0\t0\t10\t0\nM\t1000\t900\t5000\t0\nM\t1000\t0\t64\t1\n",
        )
        .unwrap();
        fs::write(
            out.join("callback_latency.tsv"),
            "design\tmicros\nw\t9.0\nw\t3.0\nm\t4.0\n",
        )
        .unwrap();
        fs::write(
            out.join(DEMO_TSV),
            "kind\tcache\trequests\trequests_per_second\tlatency_p50_us\tlatency_p99_us\t\
             objects_built\tpeak_object_bytes\tobject_bytes_clients_gone\n\
             strong\tstrong HashMap\t10\t5\t1\t2\t3\t4\t4\n\
             weak\tWeakValueMap\t10\t5\t1\t2\t3\t4\t0\n",
        )
        .unwrap();
        fs::write(
            out.join(AB_TSV),
            "case\tpeer\trole\tours\ttheirs\tratio\trounds\n\
             churn/1_thread\tdashmap_retain_1024\talternative\t7e6\t1.4e7\t0.52\t7\n",
        )
        .unwrap();
        let run = load(&dir.join("criterion"), &out).unwrap();
        assert_eq!(run.measurements.len(), 1);
        assert_eq!(
            run.ab,
            [AbRow {
                case: "churn/1_thread".into(),
                peer: "dashmap_retain_1024".into(),
                role: Role::Alternative,
                ours: 7e6,
                theirs: 1.4e7,
                ratio: 0.52,
                rounds: 7
            }]
        );
        assert!(run.ab[0].judged());
        // A role the report does not know is an error that names it, not a
        // row silently left unjudged.
        let err = tsv::<AbRow>(
            "case\tpeer\trole\tours\ttheirs\tratio\trounds\n\
             churn/1_thread\tdashmap\talternate\t1\t1\t1\t7\n",
        )
        .unwrap_err();
        assert!(
            err.starts_with("line 2: ") && err.contains("`alternate`"),
            "{err}"
        );
        assert!((run.measurements[0].per_second - 1e6).abs() < 1e-3);
        assert_eq!(
            run.map_memory,
            [MapMemory {
                map: "A, B".into(),
                bytes: 22.5,
                allocations: 1.0
            }]
        );
        assert_eq!(run.churn_memory.len(), 1);
        assert_eq!(
            run.churn_memory[0].samples,
            [(0.0, 0.0, 10.0), (1000.0, 900.0, 5000.0)]
        );
        assert_eq!(run.churn_memory[0].last, (1000.0, 0.0, 64.0));
        assert_eq!(
            run.latency,
            [
                ("w".to_string(), vec![3.0, 9.0]),
                ("m".to_string(), vec![4.0])
            ]
        );
        assert_eq!(
            run.demo.iter().map(|c| c.kind.as_str()).collect::<Vec<_>>(),
            ["strong", "weak"]
        );
        fs::write(
            out.join("churn_memory.tsv"),
            "map\tops\tentries\theap_bytes\tfinal\nM\t0\t0\t10\t0\n",
        )
        .unwrap();
        let err = load(&dir.join("criterion"), &out).err().unwrap();
        assert_eq!(err, "churn_memory.tsv: M has 0 final samples, not one");
        fs::write(
            out.join("churn_memory.tsv"),
            "map\tops\tentries\theap_bytes\tfinal\nM\t0\t0\t10\t2\n",
        )
        .unwrap();
        let err = load(&dir.join("criterion"), &out).err().unwrap();
        assert_eq!(err, "churn_memory.tsv: final is 2, not 0 or 1");
        fs::write(out.join("churn_memory.tsv"), "map\tops\n").unwrap();
        fs::write(
            out.join("callback_latency.tsv"),
            "design\tmicros\nw\tslow\n",
        )
        .unwrap();
        let err = load(&dir.join("criterion"), &out).err().unwrap();
        assert!(
            err.contains("callback_latency.tsv: line 2: column \"micros\""),
            "{err}"
        );
        fs::remove_file(out.join(DEMO_TSV)).unwrap();
        let err = load(&dir.join("criterion"), &out).err().unwrap();
        assert!(err.contains(DEMO_TSV), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
