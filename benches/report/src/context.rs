//! Where, when and how a run was made: the machine, the commit, the date
//! and the mode, for the report's header; saved beside the results
//! (`context.json`) so that `--no-run` redraws the header of the run it
//! draws.

use std::fs;
use std::path::Path;
use std::process::Command;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use crate::model::Context;

/// The run's context: `command` as typed, `quick` and `threads` as the
/// mode line describes them.
pub fn gather(root: &Path, command: String, quick: bool, threads: &str) -> Context {
    let mode = if quick {
        "quick: criterion warm-up 0.5 s, measurement 1 s, 10 samples per benchmark; shorter memory and latency runs"
    } else {
        "full: criterion warm-up 1 s, measurement 3 s, 100 samples per benchmark"
    };
    Context {
        command,
        date: date(Timestamp::now()),
        commit: commit(root),
        machine: machine(root),
        mode: format!("{mode}; thread counts {threads}"),
    }
}

/// A UTC date, `YYYY-MM-DD`.
fn date(now: Timestamp) -> String {
    now.to_zoned(TimeZone::UTC).date().to_string()
}

/// The short hash of `HEAD`, and whether the tree differs from it.
fn commit(root: &Path) -> String {
    let mut commit =
        output(root, "git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // The report's own outputs do not count: a rerun rewrites them.
    let status = [
        "status",
        "--porcelain",
        "--",
        ".",
        ":!BENCHMARKS.md",
        ":!benches/charts",
    ];
    if output(root, "git", &status).is_some_and(|s| !s.is_empty()) {
        commit.push_str(" plus uncommitted changes");
    }
    commit
}

/// `AMD EPYC, 2 CPUs available (a virtual machine), caches L1d 32K, L2
/// 1024K, L3 32768K, 24 GiB memory; Linux 6.1.0; rustc 1.95.0 (...)`.
fn machine(root: &Path) -> String {
    let system = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    )
    .ok();
    let cpu = system
        .as_ref()
        .and_then(|s| s.cpus().first())
        .map(|cpu| cpu.brand().trim().to_string())
        .filter(|brand| !brand.is_empty())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = system
        .as_ref()
        .map(System::total_memory)
        .filter(|&bytes| bytes > 0)
        .map(|bytes| format!(", {:.0} GiB memory", bytes as f64 / (1u64 << 30) as f64))
        .unwrap_or_default();
    let os = System::kernel_long_version().unwrap_or_else(|_| "unknown OS".into());
    let rustc = output(root, "rustc", &["--version"]).unwrap_or_else(|| "unknown rustc".into());
    format!(
        "{cpu}, {cpus} CPUs available{}{}{memory}; {os}; {rustc}",
        if virtual_machine() {
            " (a virtual machine)"
        } else {
            ""
        },
        cache_sizes(),
    )
}

/// A command's trimmed standard output, if it ran and succeeded.
fn output(root: &Path, program: &str, args: &[&str]) -> Option<String> {
    Command::new(program)
        .args(args)
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Whether the CPU says it runs under a hypervisor: the `hypervisor` flag
/// Linux lists in `/proc/cpuinfo` (sysinfo does not report it).
fn virtual_machine() -> bool {
    fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"))
    })
}

/// CPU 0's data and unified caches, from sysfs (sysinfo does not report
/// caches): `, caches L1d 48K, L2 1024K, L3 32768K`, or nothing where sysfs
/// does not say.
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

/// Saves `context` as JSON at `path`.
pub fn save(context: &Context, path: &Path) -> Result<(), String> {
    let json = serde_json::to_string(context).map_err(|e| e.to_string())?;
    fs::write(path, json).map_err(|e| format!("saving the run's context: {e}"))
}

/// The context saved at `path` by the run whose results lie beside it.
pub fn load(path: &Path) -> Result<Context, String> {
    let text = fs::read_to_string(path)
        .map_err(|e| format!("{}: {e} (run without --no-run first)", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_days() {
        let at = |text: &str| date(text.parse().unwrap());
        assert_eq!(at("1970-01-01T00:00:00Z"), "1970-01-01");
        assert_eq!(at("2000-02-29T23:59:59Z"), "2000-02-29");
        // Late on the 22nd west of Greenwich is the 23rd in UTC.
        assert_eq!(at("2025-11-22T20:30:00-05:00"), "2025-11-23");
    }

    #[test]
    fn machine_names_this_machine() {
        let machine = machine(Path::new("."));
        assert!(machine.contains(" CPUs available"), "{machine}");
        assert!(!machine.contains("unknown CPU"), "{machine}");
        if cfg!(target_os = "linux") {
            assert!(machine.contains("; Linux "), "{machine}");
            assert!(machine.contains(" GiB memory; "), "{machine}");
        }
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
        let path =
            std::env::temp_dir().join(format!("weakrefs-context-{}.json", std::process::id()));
        save(&context, &path).unwrap();
        assert_eq!(load(&path).unwrap(), context);
        fs::write(&path, r#"{"command":"c"}"#).unwrap();
        assert!(load(&path).unwrap_err().contains("missing field"));
        fs::remove_file(&path).unwrap();
    }
}
