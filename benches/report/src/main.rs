//! `cargo bench-report [--quick] [--threads 1,2,4,8,16] [--no-run]`
//!
//! Runs every benchmark comparison of `weakrefs` (criterion, plus the
//! memory and latency benches), then writes `BENCHMARKS.md` at the
//! repository root and its SVG charts under `benches/charts/`.
//!
//! * `--quick`: short criterion measurements and runs (a few minutes on
//!   2 cores) instead of the full ones (about 5 minutes, plus the build).
//! * `--threads LIST`: the thread counts of the multi-threaded benchmarks
//!   (default `1,2`); more than two counts add thread-scaling charts.
//! * `--no-run`: regenerate the report from the last run's results
//!   (`target/bench-report/`), measuring nothing.

mod charts;
mod render;
mod results;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::{env, fs};

use render::{ChurnRun, Context, MapMemory, Run};

const USAGE: &str = "usage: cargo bench-report [--quick] [--threads 1,2,4,8,16] [--no-run]";

/// What the command line asked for.
struct Options {
    quick: bool,
    threads: Option<String>,
    run: bool,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        quick: false,
        threads: None,
        run: true,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--no-run" => options.run = false,
            "--threads" => {
                let list = args.next().ok_or("--threads needs a list, e.g. 1,2,4")?;
                for count in list.split(',') {
                    match count.trim().parse::<usize>() {
                        Ok(n) if n > 0 => {}
                        _ => return Err(format!("--threads: {count:?} is not a thread count")),
                    }
                }
                options.threads = Some(list.clone());
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(options)
}

/// The benchmarks, in the order they run: criterion ones take criterion's
/// flags, the others `--quick`.
const CRITERION_BENCHES: &[&str] = &["handles", "maps", "key_maps", "sets", "finalizers"];
const PLAIN_BENCHES: &[&str] = &["map_memory", "churn_memory", "callback_latency"];

fn criterion_flags(quick: bool) -> &'static [&'static str] {
    if quick {
        &[
            "--warm-up-time",
            "0.5",
            "--measurement-time",
            "1",
            "--sample-size",
            "10",
            "--noplot",
        ]
    } else {
        &["--warm-up-time", "1", "--measurement-time", "3", "--noplot"]
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let options = match options(&args) {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("bench-report: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match generate(&options, &args) {
        Ok(path) => {
            println!("wrote {}", path.display());
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("bench-report: {message}");
            ExitCode::FAILURE
        }
    }
}

fn generate(options: &Options, args: &[String]) -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .map_err(|e| format!("finding the repository root: {e}"))?;
    let work = root.join("target/bench-report");
    let criterion_home = work.join("criterion");
    let out = work.join("out");
    if options.run {
        // A failed run must not leave a report to redraw under the last
        // run's date and commit.
        let saved = work.join("context.json");
        if saved.exists() {
            fs::remove_file(&saved).map_err(|e| format!("clearing {}: {e}", saved.display()))?;
        }
        for dir in [&criterion_home, &out] {
            if dir.exists() {
                fs::remove_dir_all(dir).map_err(|e| format!("clearing {}: {e}", dir.display()))?;
            }
        }
        fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
        cargo(
            &root,
            &["bench", "-p", "weakrefs", "--benches", "--no-run"],
            options,
            &work,
        )?;
        for bench in CRITERION_BENCHES {
            let mut cmd = vec!["bench", "-p", "weakrefs", "--bench", bench, "--"];
            cmd.extend_from_slice(criterion_flags(options.quick));
            cargo(&root, &cmd, options, &work)?;
        }
        for bench in PLAIN_BENCHES {
            let mut cmd = vec!["bench", "-p", "weakrefs", "--bench", bench, "--"];
            if options.quick {
                cmd.push("--quick");
            }
            cargo(&root, &cmd, options, &work)?;
        }
        let context = context(&root, options, args);
        fs::write(work.join("context.json"), context_json(&context))
            .map_err(|e| format!("saving the run's context: {e}"))?;
    }
    let context = read_context(&work.join("context.json"))?;
    let run = load(&criterion_home, &out)?;
    let charts = root.join("benches/charts");
    fs::create_dir_all(&charts).map_err(|e| format!("creating {}: {e}", charts.display()))?;
    let markdown = render::report(&run, &context, &charts, "benches/charts")?;
    let path = root.join("BENCHMARKS.md");
    fs::write(&path, markdown).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// Runs one cargo command in the repository, with the benchmarks' output
/// directories set; fails if it fails.
fn cargo(root: &Path, args: &[&str], options: &Options, work: &Path) -> Result<(), String> {
    eprintln!("bench-report: cargo {}", args.join(" "));
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .args(args)
        .current_dir(root)
        .env("CRITERION_HOME", work.join("criterion"))
        .env("WEAKREFS_BENCH_OUT", work.join("out"));
    match &options.threads {
        Some(list) => command.env("WEAKREFS_BENCH_THREADS", list),
        None => command.env_remove("WEAKREFS_BENCH_THREADS"),
    };
    let status = command
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed ({status})", args.join(" ")))
    }
}

/// Reads what the benchmarks left in `criterion_home` and `out`.
fn load(criterion_home: &Path, out: &Path) -> Result<Run, String> {
    let mut run = Run {
        measurements: results::criterion_dir(criterion_home)?,
        ..Run::default()
    };
    let table = |name: &str| {
        let path = out.join(name);
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        results::tsv(&text).map_err(|e| format!("{}: {e}", path.display()))
    };
    for row in table("map_memory.tsv")? {
        run.map_memory.push(MapMemory {
            map: results::field(&row, "map")?.to_string(),
            bytes: results::number(&row, "bytes_per_entry")?,
            allocations: results::number(&row, "allocations_per_entry")?,
        });
    }
    // The samples taken while objects came and went, per map; the one
    // taken once all had died is matched to its map afterwards.
    let mut finals = Vec::new();
    for row in table("churn_memory.tsv")? {
        let sample = (
            results::number(&row, "ops")?,
            results::number(&row, "entries")?,
            results::number(&row, "heap_bytes")?,
        );
        let name = results::field(&row, "map")?;
        match results::field(&row, "final")? {
            "1" => finals.push((name.to_string(), sample)),
            "0" => match run.churn_memory.iter_mut().find(|c| c.map == name) {
                Some(churn) => churn.samples.push(sample),
                None => run.churn_memory.push(ChurnRun {
                    map: name.to_string(),
                    samples: vec![sample],
                    ..ChurnRun::default()
                }),
            },
            other => return Err(format!("churn_memory.tsv: final is {other:?}, not 0 or 1")),
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
    for row in table("callback_latency.tsv")? {
        let micros = results::number(&row, "micros")?;
        let name = results::field(&row, "design")?;
        match run.latency.iter_mut().find(|(n, _)| n == name) {
            Some((_, samples)) => samples.push(micros),
            None => run.latency.push((name.to_string(), vec![micros])),
        }
    }
    for (_, samples) in &mut run.latency {
        samples.sort_by(f64::total_cmp);
    }
    Ok(run)
}

/// The machine, commit and date of this run.
fn context(root: &Path, options: &Options, args: &[String]) -> Context {
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let kib: f64 = info
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!(", {:.0} GiB memory", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_default();
    let caches = cache_sizes();
    let virtual_machine = fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .any(|l| l.starts_with("flags") && l.contains(" hypervisor"))
    });
    let os = output("uname", &["-sr"]).unwrap_or_else(|| "unknown OS".into());
    let rustc = output("rustc", &["--version"]).unwrap_or_else(|| "unknown rustc".into());
    let mut commit =
        output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // The report's own outputs do not count: a rerun rewrites them.
    let status = [
        "status",
        "--porcelain",
        "--",
        ".",
        ":!BENCHMARKS.md",
        ":!benches/charts",
    ];
    if output("git", &status).is_some_and(|s| !s.is_empty()) {
        commit.push_str(" plus uncommitted changes");
    }
    let threads = options.threads.as_deref().unwrap_or("1,2");
    let mode = if options.quick {
        "quick: criterion warm-up 0.5 s, measurement 1 s, 10 samples per benchmark; shorter memory and latency runs"
    } else {
        "full: criterion warm-up 1 s, measurement 3 s, 100 samples per benchmark"
    };
    Context {
        command: std::iter::once("cargo bench-report")
            .chain(args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        date: today(),
        commit,
        machine: format!(
            "{cpu}, {cpus} CPUs available{}{caches}{memory}; {os}; {rustc}",
            if virtual_machine {
                " (a virtual machine)"
            } else {
                ""
            }
        ),
        mode: format!("{mode}; thread counts {threads}"),
    }
}

/// CPU 0's data and unified caches, from sysfs: `, caches L1d 48K, L2
/// 1024K, L3 32768K`, or nothing where sysfs does not say.
fn cache_sizes() -> String {
    let mut caches = Vec::new();
    for index in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{index}");
        let read = |name: &str| fs::read_to_string(format!("{dir}/{name}")).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size"))
        else {
            continue;
        };
        let name = match kind.trim() {
            "Data" => format!("L{}d", level.trim()),
            "Unified" => format!("L{}", level.trim()),
            _ => continue,
        };
        caches.push(format!("{name} {}", size.trim()));
    }
    if caches.is_empty() {
        String::new()
    } else {
        format!(", caches {}", caches.join(", "))
    }
}

/// Today's UTC date, `YYYY-MM-DD`, from the system clock.
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn context_json(context: &Context) -> String {
    serde_json::json!({
        "command": context.command,
        "date": context.date,
        "commit": context.commit,
        "machine": context.machine,
        "mode": context.mode,
    })
    .to_string()
}

fn read_context(path: &Path) -> Result<Context, String> {
    let text = fs::read_to_string(path)
        .map_err(|e| format!("{}: {e} (run without --no-run first)", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let field = |name: &str| {
        value[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{}: no {name}", path.display()))
    };
    Ok(Context {
        command: field("command")?,
        date: field("date")?,
        commit: field("commit")?,
        machine: field("machine")?,
        mode: field("mode")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_from_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_414), (2025, 11, 22));
    }

    #[test]
    fn bad_arguments_say_what_is_wrong() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(options(&args(&["--quick", "--threads", "1,2,4"])).is_ok());
        assert_eq!(
            options(&args(&["--threads", "1,x"])).err().unwrap(),
            "--threads: \"x\" is not a thread count"
        );
        assert!(options(&args(&["--threads"]))
            .err()
            .unwrap()
            .contains("needs a list"));
        assert!(options(&args(&["--fast"]))
            .err()
            .unwrap()
            .contains("--fast"));
    }

    #[test]
    fn load_reads_what_the_benches_write() {
        let dir = env::temp_dir().join(format!("weakrefs-load-{}", std::process::id()));
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
        let run = load(&dir.join("criterion"), &out).unwrap();
        assert_eq!(run.measurements.len(), 1);
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
        fs::write(
            out.join("churn_memory.tsv"),
            "map\tops\tentries\theap_bytes\tfinal\nM\t0\t0\t10\t0\n",
        )
        .unwrap();
        let err = load(&dir.join("criterion"), &out).err().unwrap();
        assert_eq!(err, "churn_memory.tsv: M has 0 final samples, not one");
        fs::write(out.join("churn_memory.tsv"), "map\tops\n").unwrap();
        fs::write(
            out.join("callback_latency.tsv"),
            "design\tmicros\nw\tslow\n",
        )
        .unwrap();
        let err = load(&dir.join("criterion"), &out).err().unwrap();
        assert!(
            err.contains("callback_latency.tsv") || err.contains("\"slow\""),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn context_round_trips() {
        let context = Context {
            command: "cargo bench-report".into(),
            date: "2026-11-22".into(),
            commit: "abc".into(),
            machine: "m \"quoted\"".into(),
            mode: "quick".into(),
        };
        let path = env::temp_dir().join(format!("weakrefs-context-{}.json", std::process::id()));
        fs::write(&path, context_json(&context)).unwrap();
        let back = read_context(&path).unwrap();
        assert_eq!(back.machine, context.machine);
        assert_eq!(back.command, context.command);
    }
}
