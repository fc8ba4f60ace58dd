//! BENCHMARKS.md: one section per comparison, each a table of medians with
//! the ratio against the best alternative, a chart, and what explains the
//! numbers; a summary first, and every loss listed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use crate::charts::{self, BarGroup, Line, Panel};
use crate::results::{is_floor, is_ours, Measurement};

/// A criterion comparison the report presents.
pub struct Section {
    /// Anchor and chart file stem.
    pub id: &'static str,
    pub title: &'static str,
    /// The `cargo bench --bench` target that measures it.
    pub bench: &'static str,
    /// Criterion ids of its cases start with one of these.
    pub prefixes: &'static [&'static str],
    /// What one element of throughput is.
    pub unit: &'static str,
    /// What is measured, against what.
    pub what: &'static str,
    /// What the numbers come from: the costs each side pays.
    pub why: &'static str,
}

/// The criterion comparisons, in report order.
pub const SECTIONS: &[Section] = &[
    Section {
        id: "handles",
        title: "Handles: `Strong`/`Weak` against `std::sync::{Arc, Weak}`",
        bench: "handles",
        prefixes: &["upgrade/", "clone_drop/", "downgrade/"],
        unit: "million operations per second",
        what: "`Weak::upgrade` (and dropping the result), `Strong::clone` plus drop, and \
               `Strong::downgrade` (plus drop), on one object; on one thread, and on several threads \
               sharing the object (every thread's operations counted).",
        why: "Both sides do the same atomic operations on the same counts: an upgrade is one \
              compare-and-swap loop on the strong count, a clone one increment, a drop one \
              decrement. What differs is what is around them, so the two should be within noise \
              of each other. On two threads every operation moves the object's count line \
              between the cores, for both implementations alike.",
    },
    Section {
        id: "map_reads",
        title: "WeakValueMap read hits",
        bench: "maps",
        prefixes: &["read_hit/"],
        unit: "million lookups per second (each upgraded to a strong handle)",
        what: "100 000 live keys, every read a hit that upgrades the value, uniform keys or \
               skewed ones (80% of reads on 1% of the keys), on each thread count of the run. \
               Against \
               `DashMap<u64, std::sync::Weak<u64>>`, `RwLock<HashMap<..>>`, \
               `RwLock<weak_table::WeakValueHashMap<..>>`, `papaya::HashMap<..>`, \
               `scc::HashIndex<..>` and `scc::HashMap<..>`, and an unsynchronised \
               `std::collections::HashMap<..>` read in place (`std_hashmap_unsync`, the floor: \
               no lock, no pin).",
        why: "A read pins the epoch (one atomic swap), hashes the key, probes a table of \
              32-byte slots (tag, key, the value's `Weak`, the entry's callback handle) kept at \
              most 3/4 full, compares the key inline, and upgrades the value (a \
              compare-and-swap on its count). Keys live in the slot: a table rebuild clones \
              them into the new table rather than copying bytes a reader's `Eq` may be \
              writing (SAFETY.md, M3). `DashMap` takes a read lock instead of the pin (two \
              atomic operations) and probes 16-byte buckets; `scc::HashIndex` pins too and \
              probes buckets of 16-byte entries behind a metadata word. At 100 000 keys every \
              map's reads are bound by memory: the slot's line and the value's control block, \
              which in this crate also holds the callback list and so is larger than \
              `Arc`'s.",
    },
    Section {
        id: "map_read_sizes",
        title: "WeakValueMap read hits by map size",
        bench: "maps",
        prefixes: &["read_hit_by_size/"],
        unit: "million lookups per second, 1 thread",
        what: "Uniform read hits on one thread, as above, at 1 000 to 1 000 000 live keys, \
               against `DashMap<u64, std::sync::Weak<u64>>` and `scc::HashIndex<..>`: from maps \
               that fit in the core's caches to maps that do not fit in any.",
        why: "This separates the two costs of a read. Where both maps fit in cache, the work per \
              read decides: this crate's lock-free read (an epoch pin, a probe, an upgrade) \
              against `DashMap`'s locked one (a read lock and unlock, a probe, an upgrade), about \
              the same number of atomic operations. As the map grows, its footprint decides: \
              per entry this crate keeps a 32-byte slot at up to 3/4 load (key inline) and a \
              control block per value, against `DashMap`'s 16-byte inline bucket and `Arc`'s \
              smaller block, so this crate's working set outgrows the caches first. Once neither \
              fits, both pay memory latency per lookup and draw closer again.",
    },
    Section {
        id: "map_churn",
        title: "WeakValueMap churn: insert, then the value dies",
        bench: "maps",
        prefixes: &["churn"],
        unit: "million inserts per second (batches of 1024 values that die)",
        what: "1024 fresh values are inserted under 1024 keys and dropped. This crate removes \
               each dead entry by its death callback and calls `flush()` after each batch; \
               `DashMap` sweeps with `retain` after each batch, and weak-table runs \
               `remove_expired` after each batch.",
        why: "Each insert here allocates a callback node and links it onto the value; each death runs that callback on the dying thread, which \
              takes the shard's lock, unlinks the entry and retires it to the epoch collector. \
              The baselines allocate nothing per insert once their tables have grown and do no \
              work at death: dead entries stay, payload allocation and all, until the next sweep, \
              which here comes after every 1024 inserts and visits only 1024 entries. Exact, \
              automatic removal is what the extra work buys; the churn memory section below \
              shows what the sweeps leave when they are further apart.",
    },
    Section {
        id: "single_flight",
        title: "Single-flight `get_or_insert_with` on one hot key",
        bench: "maps",
        prefixes: &["single_flight_hot_key/"],
        unit: "million calls per second, all threads",
        what: "Every thread calls `get_or_insert_with` for one key whose value stays alive, \
               against two ways to write it with `DashMap<u64, std::sync::Weak<u64>>`: \
               `entry().or_default()` on every call (`dashmap_entry`), and a `get` first with \
               `entry` only on a miss (`dashmap_get_then_entry`); both upgrade, and would \
               rebuild a dead value under the shard's write lock.",
        why: "A hit is a lock-free read in this crate: threads share the value's count line and \
              nothing else. `dashmap_entry` takes the shard's write lock on every call, hit or \
              not, so threads queue on it; `dashmap_get_then_entry` takes the read lock on a \
              hit, a compare-and-swap loop on a lock word both threads write.",
    },
    Section {
        id: "finalizer_throughput",
        title: "Death callbacks: throughput",
        bench: "finalizers",
        prefixes: &["callback_throughput"],
        unit: "million callbacks per second (register, drop, run)",
        what: "Register a callback on a fresh object, drop the object, and run every callback, \
               in batches of 1000 until flushed. Against a `Drop` that sends the callback over \
               `std::sync::mpsc` to one draining thread (`mpsc_thread`), and a `Drop` that hands \
               it to `crossbeam_epoch::Guard::defer` (`epoch_defer`).",
        why: "Registration allocates a callback node and pushes it onto the object's list \
              and onto the process-wide registry that `shutdown` and the at-exit pass walk (a \
              compare-and-swap and a counter update each; the registry is compacted now and \
              then). A death moves the object's list to the finalizer's lock-free queue with one \
              push and wakes the finalizer thread only when it sleeps; the callback then runs on \
              that thread, newest first, isolated from the dropping thread's panics and locks. \
              The `mpsc` design keeps no per-object list and no registry: a `Drop` sends one \
              boxed callback over the channel, and the receiver runs it. `epoch_defer` does less \
              still: no \
              thread hand-off, no wake-up, no registry; callbacks run in batches on whichever \
              thread next collects garbage, on memory still in that core's cache, in no fixed \
              order, and a callback may run inside any later `pin`, under whatever locks that \
              thread holds. That is why it is faster, and why this crate does not run user \
              callbacks that way.",
    },
    Section {
        id: "key_maps",
        title: "WeakKeyMap as a side table",
        bench: "key_maps",
        prefixes: &["side_table/"],
        unit: "million operations per second",
        what: "Lookups on 100 000 live keys that read a `u64` out of the value \
               (`WeakKeyMap::with`; `get` is the same read plus a clone), and churn: 1024 objects each \
               get an entry and go away. Against `DashMap<usize, V>` keyed by the object's \
               address, whose entries the object's owner removes by hand as it drops.",
        why: "A lookup pins the epoch, probes a slot and then reads the value in its box: a \
              value never moves while readers borrow it in place (a `Mutex` inside is the \
              common case), so a table rebuild moves the box's pointer, not the value, and \
              at 100 000 keys the box is a second cache miss after the slot. Nothing else: \
              the read writes nothing shared (`insert` and `remove` return whether they \
              displaced a value, and a displaced value is dropped once no reader can see \
              it). `DashMap` keeps the value inline in its bucket and never touches the key \
              object. Churn pays for a callback node and a value box per entry, where the \
              baseline's removal is code its user must remember to write.",
    },
    Section {
        id: "sets",
        title: "WeakSet as an observer registry",
        bench: "sets",
        prefixes: &["observers/"],
        unit: "million listeners per second",
        what: "1000 listeners subscribe; one notification pass over 1000 live listeners \
               (upgrading each); 1000 listeners subscribe and go away. Against \
               `Mutex<Vec<std::sync::Weak<T>>>` cleaned with `retain`.",
        why: "Each member registers a death callback (an allocation and a compare-and-swap \
              onto the object's list) where the baseline pushes a `Weak` onto a `Vec`; that is \
              the cost of subscribe and churn, and the subscribe figure also includes dropping \
              the set, which detaches 1000 callbacks. A notification pass is a lock-free walk \
              of the set's shard tables: 24-byte slots, some empty, in several tables, against \
              8-byte `Weak`s packed in one `Vec`, so the walk reads more memory per member.",
    },
];

/// Everything one run measured.
#[derive(Default)]
pub struct Run {
    pub measurements: Vec<Measurement>,
    /// Per map, what it holds per live entry (`map_memory`).
    pub map_memory: Vec<MapMemory>,
    /// Per map, its churn run (`churn_memory`).
    pub churn_memory: Vec<ChurnRun>,
    /// Per design: latency samples in microseconds (`callback_latency`).
    pub latency: Vec<(String, Vec<f64>)>,
}

/// What one map holds per live entry.
#[derive(Clone, Debug, PartialEq)]
pub struct MapMemory {
    pub map: String,
    pub bytes: f64,
    pub allocations: f64,
}

/// (operations, entries, heap bytes) at one point of a churn run.
pub type ChurnSample = (f64, f64, f64);

/// One map's churn run.
#[derive(Default)]
pub struct ChurnRun {
    pub map: String,
    /// Taken while objects came and went.
    pub samples: Vec<ChurnSample>,
    /// Taken after every object died and `flush()` returned.
    pub last: ChurnSample,
}

/// Where and how the run was made.
pub struct Context {
    pub command: String,
    pub date: String,
    pub commit: String,
    pub machine: String,
    pub mode: String,
}

/// A rate for people: millions per second, three significant digits.
pub fn rate(per_second: f64) -> String {
    let m = per_second / 1e6;
    if m >= 100.0 {
        format!("{m:.0} M/s")
    } else if m >= 10.0 {
        format!("{m:.1} M/s")
    } else {
        format!("{m:.2} M/s")
    }
}

fn millions(per_second: f64) -> String {
    rate(per_second).trim_end_matches(" M/s").to_string()
}

/// How this crate stands in one case: its best row over the best
/// alternative.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Ahead,
    OnPar,
    Behind,
    /// Outside the band, but the two medians' confidence intervals overlap.
    Unclear,
}

/// Ratios within this band of 1 are called on a par.
pub const NOISE: f64 = 0.05;

/// The verdict on a ratio, as printed (two decimals, so that the figure and
/// the word agree), given whether the two medians' intervals overlap.
pub fn verdict(ratio: f64, intervals_overlap: bool) -> Verdict {
    let shown = (ratio * 100.0).round() / 100.0;
    if shown > 1.0 - NOISE && shown < 1.0 + NOISE {
        Verdict::OnPar
    } else if intervals_overlap {
        Verdict::Unclear
    } else if shown >= 1.0 + NOISE {
        Verdict::Ahead
    } else {
        Verdict::Behind
    }
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Ahead => "ahead",
            Verdict::OnPar => "on a par",
            Verdict::Behind => "**behind**",
            Verdict::Unclear => "unclear",
        }
    }
}

/// GitHub's anchor for a heading: lower case, letters, digits, `-` and
/// `_` kept, spaces made `-`, the rest dropped.
pub fn slug(heading: &str) -> String {
    heading
        .chars()
        .flat_map(|c| match c {
            ' ' | '-' => vec!['-'],
            '_' => vec!['_'],
            c if c.is_alphanumeric() => c.to_lowercase().collect(),
            _ => vec![],
        })
        .collect()
}

/// One case of a section, its rows in the order measured.
pub struct Case<'a> {
    pub name: &'a str,
    pub rows: Vec<&'a Measurement>,
}

impl Case<'_> {
    fn best(&self, ours: bool) -> Option<&Measurement> {
        self.rows
            .iter()
            .copied()
            .filter(|m| m.is_ours() == ours && !is_floor(&m.implementation))
            .max_by(|a, b| a.per_second.total_cmp(&b.per_second))
    }

    /// This crate's best row over the best alternative's, and the latter.
    pub fn ratio(&self) -> Option<(f64, &Measurement)> {
        let (ours, theirs) = (self.best(true)?, self.best(false)?);
        Some((ours.per_second / theirs.per_second, theirs))
    }

    /// The ratio's verdict.
    pub fn verdict(&self) -> Option<Verdict> {
        let (ours, theirs) = (self.best(true)?, self.best(false)?);
        let overlap = ours.interval.1 >= theirs.interval.0 && theirs.interval.1 >= ours.interval.0;
        Some(verdict(ours.per_second / theirs.per_second, overlap))
    }
}

/// The cases of `section`, in the order the benchmark ids sort.
pub fn cases<'a>(section: &Section, measurements: &'a [Measurement]) -> Vec<Case<'a>> {
    let mut cases: Vec<Case<'a>> = Vec::new();
    for m in measurements {
        if !section.prefixes.iter().any(|p| m.case.starts_with(p)) {
            continue;
        }
        match cases.iter_mut().find(|c| c.name == m.case) {
            Some(case) => case.rows.push(m),
            None => cases.push(Case {
                name: &m.case,
                rows: vec![m],
            }),
        }
    }
    // Counts in numeric order, not as text ("16" after "2").
    cases.sort_by_key(|c| split_count(c.name).map(|(stem, n, _)| (stem.to_string(), n)));
    cases
}

/// `read_hit/uniform/16_thread` → (`read_hit/uniform`, 16, `thread`), and
/// as much for any last part that counts something (`1000_keys`).
fn split_count(case: &str) -> Option<(&str, usize, &str)> {
    let (stem, last) = case.rsplit_once('/')?;
    let (count, unit) = last.split_once('_')?;
    Some((stem, count.parse().ok()?, unit))
}

/// Implementations of a section's cases: this crate's first.
fn implementations<'a>(cases: &[Case<'a>]) -> Vec<&'a str> {
    let mut names: Vec<&str> = Vec::new();
    for case in cases {
        for row in &case.rows {
            if !names.contains(&row.implementation.as_str()) {
                names.push(&row.implementation);
            }
        }
    }
    names.sort_by_key(|name| !is_ours(name));
    names
}

/// A case's name for people: `read_hit/uniform/2_thread` → `uniform, 2
/// threads`, the section's prefix left out.
fn case_label(section: &Section, case: &str) -> String {
    // A section of one prefix names it in its title; one of several
    // (upgrade, clone_drop, ...) needs it in each label.
    let mut label = case;
    if let [prefix] = section.prefixes {
        label = case.strip_prefix(prefix).unwrap_or(case);
    }
    let label = label.trim_start_matches('/');
    let label = if label.is_empty() { case } else { label };
    label
        .split('/')
        .map(|part| match part.strip_suffix("_thread") {
            Some("1") => "1 thread".to_string(),
            Some(n) => format!("{n} threads"),
            None => part.replace('_', " "),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The whole report; charts are written into `charts_dir`, linked as
/// `charts_link/<name>.svg`.
pub fn report(
    run: &Run,
    context: &Context,
    charts_dir: &Path,
    charts_link: &str,
) -> Result<String, String> {
    let mut md = String::new();
    let mut losses = Vec::new();
    let mut body = String::new();
    let mut glance = String::new();

    for section in SECTIONS {
        let cases = cases(section, &run.measurements);
        if cases.is_empty() {
            continue;
        }
        let mut counts = [0; 4];
        for case in &cases {
            let (Some((ratio, theirs)), Some(verdict)) = (case.ratio(), case.verdict()) else {
                continue;
            };
            counts[verdict as usize] += 1;
            if verdict == Verdict::Behind {
                losses.push(format!(
                    "- [{}](#{}), {}: {:.2}x `{}`",
                    section.title,
                    slug(section.title),
                    case_label(section, case.name),
                    ratio,
                    theirs.implementation
                ));
            }
        }
        let [ahead, par, behind, unclear] = counts;
        let _ = writeln!(
            glance,
            "| [{}](#{}) | {ahead} | {par} | {behind} | {unclear} |",
            section.title,
            slug(section.title)
        );
        section_body(&mut body, section, &cases, charts_dir, charts_link)?;
    }

    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Where `weakrefs` stands against what users would pick instead. Generated by \
         `{}` on {} at commit `{}`; every figure below comes from that one run.\n",
        context.command, context.date, context.commit
    );
    let _ = writeln!(md, "- **Machine:** {}", context.machine);
    let _ = writeln!(md, "- **Mode:** {}", context.mode);
    let _ = writeln!(
        md,
        "- **Reading it:** criterion medians. A ratio is this crate's best row over the \
         best alternative's, so above 1 is faster. Ratios within {:.0}% of 1 are called on a \
         par; beyond that, a case is ahead or behind only if the 95% confidence intervals of \
         the two medians do not overlap, else unclear. Those intervals describe one run: this \
         machine is shared with other work, and separate runs have differed by more than them, \
         most on two threads. Read a single row as a measurement, and a pattern across rows \
         and sections as the finding.",
        NOISE * 100.0
    );
    let _ = writeln!(
        md,
        "- **To regenerate:** `cargo bench-report` (about 5 minutes on 2 cores, plus the build) or \
         `cargo bench-report --quick` (a few minutes); `--threads 1,2,4,8,16` adds a \
         thread-scaling run. Each section names the bench that measures it alone.\n"
    );
    let _ = writeln!(md, "## At a glance\n");
    let _ = writeln!(
        md,
        "Throughput cases, against the best alternative in each:\n"
    );
    let _ = writeln!(md, "| comparison | ahead | on a par | behind | unclear |");
    let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: |");
    md.push_str(&glance);
    md.push('\n');
    losses.extend(memory_losses(run));
    losses.extend(latency_losses(run));
    let _ = writeln!(md, "### Where this crate loses\n");
    if losses.is_empty() {
        let _ = writeln!(md, "Nowhere in this run.\n");
    } else {
        let _ = writeln!(
            md,
            "Each section says why, under \"What explains it\". Against the best alternative:\n"
        );
        for loss in &losses {
            let _ = writeln!(md, "{loss}");
        }
        md.push('\n');
    }
    md.push_str(&body);
    memory_sections(&mut md, run, charts_dir, charts_link)?;
    latency_section(&mut md, run, charts_dir, charts_link)?;
    Ok(md)
}

fn section_body(
    md: &mut String,
    section: &Section,
    cases: &[Case<'_>],
    charts_dir: &Path,
    charts_link: &str,
) -> Result<(), String> {
    let names = implementations(cases);
    let _ = writeln!(md, "## {}\n", section.title);
    let _ = writeln!(md, "{}\n", section.what);
    let _ = writeln!(
        md,
        "Measured by `cargo bench --bench {}`; figures in {}.\n",
        section.bench, section.unit
    );
    let chart = format!("{}.svg", section.id);
    let groups: Vec<BarGroup> = cases
        .iter()
        .map(|case| BarGroup {
            label: case_label(section, case.name),
            bars: names
                .iter()
                .filter_map(|n| case.rows.iter().find(|r| r.implementation == *n))
                .map(|r| (r.implementation.clone(), r.per_second))
                .collect(),
        })
        .collect();
    charts::bars(
        &charts_dir.join(&chart),
        section.title.replace('`', "").as_str(),
        "M/s",
        &groups,
    )?;
    let _ = writeln!(md, "![{}]({charts_link}/{chart})\n", section.id);

    let _ = write!(md, "| case |");
    for name in &names {
        let _ = write!(md, " `{name}` |");
    }
    let _ = writeln!(md, " ratio | verdict |");
    let _ = writeln!(md, "| --- |{} ---: | --- |", " ---: |".repeat(names.len()));
    for case in cases {
        let _ = write!(md, "| {} |", case_label(section, case.name));
        for name in &names {
            match case.rows.iter().find(|r| r.implementation == *name) {
                Some(row) => {
                    let _ = write!(md, " {} |", millions(row.per_second));
                }
                None => md.push_str(" – |"),
            }
        }
        match (case.ratio(), case.verdict()) {
            (Some((ratio, theirs)), Some(verdict)) => {
                let _ = writeln!(
                    md,
                    " {ratio:.2}x `{}` | {} |",
                    theirs.implementation,
                    verdict.word()
                );
            }
            _ => md.push_str(" – | – |\n"),
        }
    }
    md.push('\n');
    let _ = writeln!(md, "**What explains it.** {}\n", section.why);
    count_charts(md, section, cases, &names, charts_dir, charts_link)
}

/// A line chart of throughput against a count, for each case stem
/// measured at more than two counts of one unit: thread scaling (a run
/// with `--threads`), or map size (`1000_keys`, ..., on a log axis, where a
/// trend shows better than in bars).
fn count_charts(
    md: &mut String,
    section: &Section,
    cases: &[Case<'_>],
    names: &[&str],
    charts_dir: &Path,
    charts_link: &str,
) -> Result<(), String> {
    let mut stems: BTreeMap<(&str, &str), BTreeSet<usize>> = BTreeMap::new();
    for case in cases {
        if let Some((stem, count, unit)) = split_count(case.name) {
            stems.entry((stem, unit)).or_default().insert(count);
        }
    }
    for ((stem, unit), counts) in stems.iter().filter(|(_, counts)| counts.len() > 2) {
        let lines: Vec<Line> = names
            .iter()
            .map(|name| Line {
                name: name.to_string(),
                points: cases
                    .iter()
                    .filter_map(|case| {
                        let (s, count, u) = split_count(case.name)?;
                        let row = case.rows.iter().find(|r| r.implementation == *name)?;
                        (s == *stem && u == *unit).then_some((count as f64, row.per_second / 1e6))
                    })
                    .collect(),
            })
            .collect();
        let threads = *unit == "thread";
        let (chart, title, x_label) = if threads {
            (
                format!("{}_scaling_{}.svg", section.id, stem.replace('/', "_")),
                format!(
                    "{}: thread scaling",
                    stem.replace('/', ", ").replace('_', " ")
                ),
                "threads".to_string(),
            )
        } else {
            (
                format!("{}_by_{unit}.svg", section.id),
                format!("{}, by {unit}", section.title.replace('`', "")),
                format!("{unit} (log scale)"),
            )
        };
        let panel = Panel {
            x_label,
            y_label: "M/s".into(),
            lines,
        };
        charts::lines(&charts_dir.join(&chart), &title, &[panel], !threads)?;
        if threads {
            let _ = writeln!(
                md,
                "Thread scaling, {} ({} thread counts, this run's machine):\n",
                stem.replace('_', " "),
                counts.len()
            );
        }
        let _ = writeln!(md, "![{title}]({charts_link}/{chart})\n");
    }
    Ok(())
}

fn memory_sections(
    md: &mut String,
    run: &Run,
    charts_dir: &Path,
    charts_link: &str,
) -> Result<(), String> {
    if !run.map_memory.is_empty() {
        let _ = writeln!(md, "## Memory per entry\n");
        let _ = writeln!(
            md,
            "Heap bytes and allocations each map holds per live entry, 100 000 `u64` keys, \
             every map grown from empty except the `with_capacity` row, values not counted. \
             Counted by a global allocator wrapper after crossbeam-epoch has freed what growth \
             retired; the bytes are those asked for, and each allocation costs 8 to 16 bytes \
             more in glibc's headers and rounding. papaya reclaims through its own scheme, \
             which that settling does not drive, so its row may include garbage of its growth. \
             Measured by `cargo bench --bench map_memory`.\n"
        );
        let best = smallest_alternative(run);
        let _ = writeln!(
            md,
            "| map | bytes per entry | allocations per entry | bytes against the smallest alternative |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: |");
        for row in &run.map_memory {
            let _ = writeln!(
                md,
                "| `{}` | {:.1} | {:.2} | {:.1}x |",
                row.map,
                row.bytes,
                row.allocations,
                row.bytes / best
            );
        }
        let _ = writeln!(
            md,
            "\n**What explains it.** Each entry of this crate's map is a 32-byte slot (tag, \
             key, the value's `Weak`, the entry's callback handle) in a table kept at most 3/4 \
             full, plus one allocation: the death callback registered on its value (the node \
             that removes the entry when the value dies, 40 bytes). `DashMap`, `HashMap` and \
             `scc` keep the key and the `Weak` inline in their buckets, papaya allocates one \
             entry per key, and none registers anything: they find out about dead values only \
             when someone looks.\n"
        );
    }
    if !run.churn_memory.is_empty() {
        let _ = writeln!(md, "## Memory over a churn run\n");
        let _ = writeln!(
            md,
            "Objects (64-byte payloads) arrive under new keys and stay alive until 1000 newer \
             ones have arrived; the chart samples each map's entries and the heap bytes in use \
             since it was created, which include the 1000 live objects (this crate's blocks are \
             16 bytes larger than `Arc`'s). `DashMap` sweeps with `retain` every 10 000 \
             operations, sampled just before each sweep; weak-table clears expired entries \
             when it would otherwise grow. At the end every object is dropped, `flush()` is \
             called and crossbeam-epoch's garbage is collected; the baselines get no extra \
             sweep. Heap bytes, not the resident set: the resident set is one figure for the \
             whole process, and the allocator keeps pages it was given, so it cannot tell one \
             map's run from the next. Measured by `cargo bench --bench churn_memory`.\n"
        );
        let (mut entries, mut bytes) = (Vec::new(), Vec::new());
        for churn in &run.churn_memory {
            entries.push(Line {
                name: churn.map.clone(),
                points: churn.samples.iter().map(|s| (s.0, s.1)).collect(),
            });
            bytes.push(Line {
                name: churn.map.clone(),
                points: churn.samples.iter().map(|s| (s.0, s.2 / 1024.0)).collect(),
            });
        }
        charts::lines(
            &charts_dir.join("churn_memory.svg"),
            "Entries and heap in use while objects come and go",
            &[
                Panel {
                    x_label: "operations".into(),
                    y_label: "entries".into(),
                    lines: entries,
                },
                Panel {
                    x_label: "operations".into(),
                    y_label: "heap KiB".into(),
                    lines: bytes,
                },
            ],
            false,
        )?;
        let _ = writeln!(md, "![churn memory]({charts_link}/churn_memory.svg)\n");
        let _ = writeln!(
            md,
            "| map | peak entries | peak heap KiB | entries once every object died | heap KiB then |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: |");
        for ChurnRun {
            map: name,
            samples,
            last,
        } in &run.churn_memory
        {
            let peak_entries = samples.iter().map(|s| s.1).fold(0.0, f64::max);
            let peak_bytes = samples.iter().map(|s| s.2).fold(0.0, f64::max);
            let _ = writeln!(
                md,
                "| {name} | {peak_entries:.0} | {:.1} | {:.0} | {:.1} |",
                peak_bytes / 1024.0,
                last.1,
                last.2 / 1024.0
            );
        }
        let _ = writeln!(
            md,
            "\n**What explains it.** This crate's maps hold an entry exactly as long as its \
             object lives: the entry count stays at the number of live objects and goes to \
             zero when they die. A map of `std::sync::Weak` holds dead entries until something \
             sweeps them, and a dead `Weak` keeps its allocation, payload included, until \
             then; how much piles up depends on how often the user sweeps, and a \
             sweep costs a pass over the whole map. The heap that stays with this crate's maps \
             after everything died is their tables, kept for reuse.\n"
        );
    }
    Ok(())
}

/// The fewest bytes per entry among the alternatives.
fn smallest_alternative(run: &Run) -> f64 {
    run.map_memory
        .iter()
        .filter(|row| !is_ours(&row.map))
        .map(|row| row.bytes)
        .fold(f64::MAX, f64::min)
}

/// This crate's maps holding more than the band over the smallest
/// alternative, as loss lines.
fn memory_losses(run: &Run) -> Vec<String> {
    let best = smallest_alternative(run);
    run.map_memory
        .iter()
        .filter(|row| is_ours(&row.map) && row.bytes / best >= 1.0 + NOISE)
        .map(|row| {
            format!(
                "- [Memory per entry](#{}), `{}`: {:.1}x the bytes of the smallest alternative",
                slug("Memory per entry"),
                row.map,
                row.bytes / best
            )
        })
        .collect()
}

/// This crate's 99th-percentile callback latency, if beyond the band over
/// the best alternative's, as a loss line.
fn latency_losses(run: &Run) -> Vec<String> {
    let p99 = |samples: &[f64]| quantile(samples, 0.99);
    let ours = run.latency.iter().find(|(name, _)| is_ours(name));
    let best = run
        .latency
        .iter()
        .filter(|(name, _)| !is_ours(name))
        .min_by(|a, b| p99(&a.1).total_cmp(&p99(&b.1)));
    match (ours, best) {
        (Some((_, ours)), Some((name, theirs))) if p99(ours) >= p99(theirs) * (1.0 + NOISE) => {
            vec![format!(
                "- [Death callbacks: latency](#{}), 99th percentile: {:.1} µs against `{name}`'s {:.1} µs",
                slug("Death callbacks: latency"),
                p99(ours),
                p99(theirs)
            )]
        }
        _ => Vec::new(),
    }
}

/// The value at quantile `q` of sorted samples.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn latency_section(
    md: &mut String,
    run: &Run,
    charts_dir: &Path,
    charts_link: &str,
) -> Result<(), String> {
    if run.latency.is_empty() {
        return Ok(());
    }
    let _ = writeln!(md, "## Death callbacks: latency\n");
    let _ = writeln!(
        md,
        "The time from just before an object's last `Strong` is dropped to the start of its \
         callback on the finalizer thread, with that thread idle (parked) before each sample. \
         Against a `Drop` that sends the callback over `std::sync::mpsc` to a thread blocked \
         in `recv`. Measured by `cargo bench --bench callback_latency`.\n"
    );
    let lines: Vec<Line> = run
        .latency
        .iter()
        .map(|(name, samples)| Line {
            name: name.clone(),
            points: samples
                .iter()
                .enumerate()
                .map(|(i, &us)| (us.max(0.01), (i + 1) as f64 / samples.len() as f64))
                .collect(),
        })
        .collect();
    charts::lines(
        &charts_dir.join("callback_latency.svg"),
        "Drop-to-callback latency, idle finalizer (cumulative)",
        &[Panel {
            x_label: "microseconds (log scale)".into(),
            y_label: "share of callbacks started".into(),
            lines,
        }],
        true,
    )?;
    let _ = writeln!(
        md,
        "![callback latency]({charts_link}/callback_latency.svg)\n"
    );
    let _ = writeln!(
        md,
        "| design | samples | p50 µs | p90 µs | p99 µs | max µs |"
    );
    let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, samples) in &run.latency {
        let _ = writeln!(
            md,
            "| `{name}` | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            samples.len(),
            quantile(samples, 0.5),
            quantile(samples, 0.9),
            quantile(samples, 0.99),
            quantile(samples, 1.0)
        );
    }
    let _ = writeln!(
        md,
        "\n**What explains it.** Both designs wake a parked thread through a futex, so most \
         of a sample is the operating system's wake-up and scheduling, and the medians are \
         close. Where this crate's tail is longer, the cause has not been isolated; the \
         difference in mechanism is that its finalizer thread spins briefly and then parks \
         with `std::thread::park`, to be unparked by the dying thread, where the channel's \
         receiver sleeps in the channel's own wait.\n"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A measurement with a tight interval (±1%).
    fn m(case: &str, implementation: &str, per_second: f64) -> Measurement {
        Measurement {
            case: case.into(),
            implementation: implementation.into(),
            per_second,
            interval: (per_second * 0.99, per_second * 1.01),
        }
    }

    #[test]
    fn verdicts_band_noise_and_intervals() {
        assert_eq!(verdict(1.2, false), Verdict::Ahead);
        assert_eq!(verdict(1.03, false), Verdict::OnPar);
        assert_eq!(verdict(0.97, false), Verdict::OnPar);
        assert_eq!(verdict(0.5, false), Verdict::Behind);
        assert_eq!(verdict(0.5, true), Verdict::Unclear);
        assert_eq!(verdict(1.03, true), Verdict::OnPar);
        // The word follows the printed figure: 0.9504 prints 0.95.
        assert_eq!(verdict(0.9504, false), Verdict::Behind);
        assert_eq!(verdict(1.0496, false), Verdict::Ahead);
        assert_eq!(verdict(1.0449, false), Verdict::OnPar);
    }

    #[test]
    fn overlapping_intervals_make_a_case_unclear() {
        let mut wide = m("churn", "weakrefs", 5e6);
        wide.interval = (1e6, 9e6);
        let rows = [wide, m("churn", "dashmap", 8e6)];
        let section = SECTIONS.iter().find(|s| s.id == "map_churn").unwrap();
        assert_eq!(cases(section, &rows)[0].verdict(), Some(Verdict::Unclear));
    }

    #[test]
    fn slugs_match_github_anchors() {
        assert_eq!(
            slug("Handles: `Strong`/`Weak` against `std::sync::{Arc, Weak}`"),
            "handles-strongweak-against-stdsyncarc-weak"
        );
        assert_eq!(
            slug("Single-flight `get_or_insert_with` on one hot key"),
            "single-flight-get_or_insert_with-on-one-hot-key"
        );
    }

    #[test]
    fn a_floor_is_never_the_best_alternative() {
        let rows = [
            m("read_hit/uniform/1_thread", "weakrefs", 10e6),
            m("read_hit/uniform/1_thread", "dashmap", 8e6),
            m("read_hit/uniform/1_thread", "std_hashmap_unsync", 20e6),
        ];
        let case = Case {
            name: "read_hit/uniform/1_thread",
            rows: rows.iter().collect(),
        };
        let (ratio, theirs) = case.ratio().expect("both sides");
        assert_eq!(theirs.implementation, "dashmap");
        assert!((ratio - 1.25).abs() < 1e-9);
    }

    #[test]
    fn ratio_is_best_of_ours_over_best_alternative() {
        let rows = [
            m("side_table/lookup/1_thread", "weakrefs_with", 4e6),
            m("side_table/lookup/1_thread", "weakrefs_get", 5e6),
            m("side_table/lookup/1_thread", "dashmap", 20e6),
            m("side_table/lookup/1_thread", "other", 10e6),
        ];
        let section = SECTIONS.iter().find(|s| s.id == "key_maps").unwrap();
        let cases = cases(section, &rows);
        assert_eq!(cases.len(), 1);
        let (ratio, theirs) = cases[0].ratio().unwrap();
        assert!((ratio - 0.25).abs() < 1e-9);
        assert_eq!(theirs.implementation, "dashmap");
        assert_eq!(
            implementations(&cases),
            ["weakrefs_with", "weakrefs_get", "dashmap", "other"]
        );
    }

    #[test]
    fn thread_counts_sort_as_numbers_and_read_as_words() {
        let rows = [
            m("read_hit/uniform/16_thread", "weakrefs", 1.0),
            m("read_hit/uniform/2_thread", "weakrefs", 1.0),
            m("read_hit/uniform/1_thread", "weakrefs", 1.0),
        ];
        let section = SECTIONS.iter().find(|s| s.id == "map_reads").unwrap();
        let names: Vec<_> = cases(section, &rows)
            .iter()
            .map(|c| c.name.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "read_hit/uniform/1_thread",
                "read_hit/uniform/2_thread",
                "read_hit/uniform/16_thread"
            ]
        );
        assert_eq!(
            case_label(section, "read_hit/skewed/2_thread"),
            "skewed, 2 threads"
        );
        let sizes = SECTIONS.iter().find(|s| s.id == "map_read_sizes").unwrap();
        let rows = [
            m("read_hit_by_size/1000000_keys", "weakrefs", 1.0),
            m("read_hit_by_size/100000_keys", "weakrefs", 1.0),
        ];
        let names: Vec<_> = cases(sizes, &rows)
            .iter()
            .map(|c| c.name.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "read_hit_by_size/100000_keys",
                "read_hit_by_size/1000000_keys"
            ]
        );
        assert_eq!(case_label(sizes, "read_hit_by_size/1000_keys"), "1000 keys");
        let churn = SECTIONS.iter().find(|s| s.id == "map_churn").unwrap();
        assert_eq!(case_label(churn, "churn"), "churn");
        let handles = SECTIONS.iter().find(|s| s.id == "handles").unwrap();
        assert_eq!(
            case_label(handles, "clone_drop/1_thread"),
            "clone drop, 1 thread"
        );
    }

    #[test]
    fn report_lists_losses_and_draws_charts() {
        let dir = std::env::temp_dir().join(format!("weakrefs-render-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut measurements = Vec::new();
        for threads in [1, 2, 4] {
            let case = format!("read_hit/uniform/{threads}_thread");
            measurements.push(m(&case, "weakrefs", 10e6 * threads as f64));
            measurements.push(m(&case, "dashmap", 8e6 * threads as f64));
        }
        for keys in [1000, 10_000, 100_000] {
            let case = format!("read_hit_by_size/{keys}_keys");
            measurements.push(m(&case, "weakrefs", 1e9 / keys as f64));
            measurements.push(m(&case, "dashmap", 2e9 / keys as f64));
        }
        measurements.push(m("churn", "weakrefs", 2e6));
        measurements.push(m("churn", "dashmap_retain", 10e6));
        let run = Run {
            measurements,
            map_memory: vec![
                MapMemory {
                    map: "weakrefs::WeakValueMap".into(),
                    bytes: 120.0,
                    allocations: 2.0,
                },
                MapMemory {
                    map: "DashMap".into(),
                    bytes: 24.0,
                    allocations: 0.0,
                },
            ],
            churn_memory: vec![ChurnRun {
                map: "WeakValueMap".into(),
                samples: vec![(0.0, 0.0, 0.0), (1000.0, 1000.0, 4096.0)],
                last: (1000.0, 0.0, 1024.0),
            }],
            latency: vec![
                ("weakrefs".into(), vec![5.0, 6.0, 40.0]),
                ("mpsc_thread".into(), vec![4.0, 5.0, 10.0]),
            ],
        };
        let context = Context {
            command: "cargo bench-report --quick".into(),
            date: "2026-11-22".into(),
            commit: "abc1234".into(),
            machine: "test".into(),
            mode: "quick".into(),
        };
        let md = report(&run, &context, &dir, "charts").unwrap();
        assert!(
            md.contains("| uniform, 2 threads | 20.0 | 16.0 | 1.25x `dashmap` | ahead |"),
            "{md}"
        );
        assert!(md.contains("churn: 0.20x `dashmap_retain`"), "{md}");
        assert!(
            md.contains("| `weakrefs::WeakValueMap` | 120.0 | 2.00 | 5.0x |"),
            "{md}"
        );
        assert!(
            md.contains("](#memory-per-entry), `weakrefs::WeakValueMap`: 5.0x the bytes"),
            "{md}"
        );
        assert!(
            md.contains("](#death-callbacks-latency), 99th percentile: 40.0 µs against `mpsc_thread`'s 10.0 µs"),
            "{md}"
        );
        assert!(
            md.contains("[WeakValueMap churn: insert, then the value dies](#weakvaluemap-churn-insert-then-the-value-dies)"),
            "{md}"
        );
        assert!(
            md.contains("| `weakrefs` | 3 | 6.0 | 40.0 | 40.0 | 40.0 |"),
            "{md}"
        );
        for chart in [
            "map_read_sizes_by_keys.svg",
            "map_reads.svg",
            "map_churn.svg",
            "map_reads_scaling_read_hit_uniform.svg",
            "churn_memory.svg",
            "callback_latency.svg",
        ] {
            assert!(dir.join(chart).is_file(), "{chart} not drawn");
            assert!(
                md.contains(&format!("charts/{chart}")),
                "{chart} not linked"
            );
        }
    }
}
