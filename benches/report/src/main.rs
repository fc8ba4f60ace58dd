//! `cargo bench-report [--quick] [--threads 1,2,4,8,16] [--no-run]`
//!
//! Runs every benchmark comparison of `weakrefs` (criterion, plus the
//! interleaved A/B, memory and latency benches) and the cache_server demo
//! (`--tsv`), then writes `BENCHMARKS.md` at the repository root and its
//! SVG charts under `benches/charts/`.
//!
//! * `--quick`: short criterion measurements and runs (a few minutes on
//!   2 cores) instead of the full ones (about 16 minutes, build included);
//!   the demo runs 3 seconds instead of 6, the A/B run three rounds
//!   instead of seven.
//! * `--threads LIST`: the thread counts of the multi-threaded benchmarks
//!   (default `1,2`); more than two counts add thread-scaling charts.
//! * `--no-run`: regenerate the report from the last run's results
//!   (`target/bench-report/`), measuring nothing.

mod charts;
mod compare;
mod context;
mod model;
mod prose;
mod render;
mod results;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::{env, fs};

const USAGE: &str = "usage: cargo bench-report [--quick] [--threads 1,2,4,8,16] [--no-run]";

/// What the command line asked for.
#[derive(Debug, PartialEq)]
struct Options {
    quick: bool,
    /// The thread counts as given (`1,2,4`), each checked.
    threads: Option<String>,
    run: bool,
}

/// The options, `Ok(None)` for `--help`, or what is wrong.
fn options(args: impl IntoIterator<Item = OsString>) -> Result<Option<Options>, String> {
    use lexopt::prelude::*;

    let mut options = Options {
        quick: false,
        threads: None,
        run: true,
    };
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("quick") => options.quick = true,
            Long("no-run") => options.run = false,
            Long("threads") => {
                let list = parser
                    .value()
                    .map_err(|_| "--threads needs a list, e.g. 1,2,4")?
                    .string()
                    .map_err(|e| format!("--threads: {e}"))?;
                for count in list.split(',') {
                    match count.trim().parse::<usize>() {
                        Ok(n) if n > 0 => {}
                        _ => return Err(format!("--threads: {count:?} is not a thread count")),
                    }
                }
                options.threads = Some(list);
            }
            Short('h') | Long("help") => return Ok(None),
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    Ok(Some(options))
}

/// The benchmarks, in the order they run: criterion ones take criterion's
/// flags, the others `--quick`.
const CRITERION_BENCHES: &[&str] = &["handles", "maps", "key_maps", "sets", "finalizers"];
const PLAIN_BENCHES: &[&str] = &["map_ab", "map_memory", "churn_memory", "callback_latency"];

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

/// The cache_server demo's whole run (all three caches), in seconds:
/// full, then `--quick`.
const DEMO_SECONDS: [&str; 2] = ["6", "3"];

fn main() -> ExitCode {
    let args: Vec<OsString> = env::args_os().skip(1).collect();
    let options = match options(args.iter().cloned()) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("bench-report: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let command = std::iter::once("cargo bench-report".into())
        .chain(args.iter().map(|a| a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    match generate(&options, command) {
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

fn generate(options: &Options, command: String) -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .map_err(|e| format!("finding the repository root: {e}"))?;
    let work = root.join("target/bench-report");
    let criterion_home = work.join("criterion");
    let out = work.join("out");
    let saved = work.join("context.json");
    if options.run {
        // A failed run must not leave a report to redraw under the last
        // run's date and commit.
        if saved.exists() {
            fs::remove_file(&saved).map_err(|e| format!("clearing {}: {e}", saved.display()))?;
        }
        for dir in [&criterion_home, &out] {
            if dir.exists() {
                fs::remove_dir_all(dir).map_err(|e| format!("clearing {}: {e}", dir.display()))?;
            }
        }
        fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
        measure(&root, options, &work)?;
        let threads = options.threads.as_deref().unwrap_or("1,2");
        context::save(
            &context::gather(&root, command, options.quick, threads),
            &saved,
        )?;
    }
    let context = context::load(&saved)?;
    let run = results::load(&criterion_home, &out)?;
    let charts = root.join("benches/charts");
    fs::create_dir_all(&charts).map_err(|e| format!("creating {}: {e}", charts.display()))?;
    let markdown = render::report(&run, &context, &charts, "benches/charts")?;
    let path = root.join("BENCHMARKS.md");
    fs::write(&path, markdown).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// Builds the benchmarks and the demo, then runs the demo (first: it is
/// the shortest, and a failure there stops the run early) and every
/// benchmark, leaving their results under `work`.
fn measure(root: &Path, options: &Options, work: &Path) -> Result<(), String> {
    let cargo = |args: &[&OsStr]| cargo(root, args, options, work);
    fn os<'a>(args: &[&'a str]) -> Vec<&'a OsStr> {
        args.iter().map(|arg| OsStr::new(*arg)).collect()
    }
    cargo(&os(&["bench", "-p", "weakrefs", "--benches", "--no-run"]))?;
    // The bench profile (release, with debug info), so the demo shares
    // the benchmarks' build of every dependency.
    let demo = [
        "--profile",
        "bench",
        "-p",
        "weakrefs",
        "--example",
        "cache_server",
    ];
    cargo(&os(&[&["build"], &demo[..]].concat()))?;
    let seconds = DEMO_SECONDS[usize::from(options.quick)];
    let tsv = work.join("out").join(results::DEMO_TSV);
    let mut run = os(&[&["run"], &demo[..], &["--", "--duration", seconds, "--tsv"]].concat());
    run.push(tsv.as_os_str());
    cargo(&run)?;
    for bench in CRITERION_BENCHES {
        let mut args = vec!["bench", "-p", "weakrefs", "--bench", bench, "--"];
        args.extend_from_slice(criterion_flags(options.quick));
        cargo(&os(&args))?;
    }
    for bench in PLAIN_BENCHES {
        let mut args = vec!["bench", "-p", "weakrefs", "--bench", bench, "--"];
        if options.quick {
            args.push("--quick");
        }
        cargo(&os(&args))?;
    }
    Ok(())
}

/// Runs one cargo command in the repository, with the benchmarks' output
/// directories set; fails if it fails.
fn cargo(root: &Path, args: &[&OsStr], options: &Options, work: &Path) -> Result<(), String> {
    let shown = args
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("bench-report: cargo {shown}");
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
        Err(format!("`cargo {shown}` failed ({status})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(list: &[&str]) -> Result<Option<Options>, String> {
        options(list.iter().map(OsString::from))
    }

    #[test]
    fn flags_parse() {
        assert_eq!(
            parse(&["--quick", "--threads", "1,2,4"]).unwrap(),
            Some(Options {
                quick: true,
                threads: Some("1,2,4".into()),
                run: true
            })
        );
        assert_eq!(
            parse(&["--no-run", "--threads=8"]).unwrap(),
            Some(Options {
                quick: false,
                threads: Some("8".into()),
                run: false
            })
        );
        assert_eq!(parse(&["--help"]).unwrap(), None);
        assert_eq!(parse(&["-h"]).unwrap(), None);
    }

    #[test]
    fn bad_arguments_say_what_is_wrong() {
        assert_eq!(
            parse(&["--threads", "1,x"]).unwrap_err(),
            "--threads: \"x\" is not a thread count"
        );
        assert_eq!(
            parse(&["--threads", "0"]).unwrap_err(),
            "--threads: \"0\" is not a thread count"
        );
        assert!(parse(&["--threads"]).unwrap_err().contains("needs a list"));
        assert!(parse(&["--fast"]).unwrap_err().contains("--fast"));
        assert!(parse(&["--quick=yes"]).unwrap_err().contains("--quick"));
        assert!(parse(&["extra"]).unwrap_err().contains("extra"));
    }
}
