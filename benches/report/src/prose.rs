//! The report's words: what each comparison measures and what explains
//! its numbers, and the fixed paragraphs of the other sections. Every
//! figure is written in by render.rs or handed to a function here;
//! nothing here states a result of its own.

use crate::model::{mib, DemoCache};

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
        why: "A read pins the epoch (on Linux, for a thread that only reads, a plain store: \
              SAFETY.md, section 11), hashes the key, loads the word of \
              one-byte tags of its home group of eight slots, compares the key of each slot \
              whose tag matches seven bits of its hash (16-byte items: key and the value's \
              `Weak`, in a table kept at most 7/8 full; the entry's callback handle sits in \
              an array beside, which lookups never read), and \
              upgrades the value (a compare-and-swap on its count). Keys live in the slot: a \
              table rebuild clones \
              them into the new table rather than copying bytes a reader's `Eq` may be \
              writing (SAFETY.md, M3). `DashMap` takes a read lock instead of the pin (two \
              atomic operations) and probes 16-byte buckets; `scc::HashIndex` pins with an \
              atomic swap and \
              probes buckets of 16-byte entries behind a metadata word. At 100 000 keys every \
              map's reads are bound by memory: the tag word's line, the item's and the value's \
              control block. This crate's header is as small as `Arc`'s, 16 bytes: two \
              32-bit counts and the callback list's word, whose compaction state is \
              allocated apart only once an object has more than six registrations \
              (SAFETY.md, C17). For a `u64` value that is a 24-byte block in a 32-byte \
              allocator chunk, as `Arc<u64>`'s. With the 32-byte header it had before, \
              a 40-byte block in a 48-byte chunk, reads at 100 000 keys were about 10% \
              slower: in a standalone loop on this machine (1 thread, 100 000 keys, five \
              interleaved runs) 56.1 ns a read against 52.9 with the smaller header, \
              and `DashMap` reads 0.84x as fast over `Arc<[u64; 3]>` values (a 48-byte \
              chunk) as over `Arc<u64>`.",
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
        why: "This separates the two costs of a read. Where the maps fit in cache, the work per \
              read decides, and most of it is locked instructions. Until 2026-12-07 this \
              crate's read paid three, as `scc::HashIndex`'s does (its pin is an atomic \
              swap): a sampling profile (`perf`, cpu-clock) at 1 000 keys put a quarter of the \
              read on crossbeam-epoch's pin, a compare-and-swap, a fifth on the upgrade's and a \
              quarter on the drop of the returned handle. The crate's own epoch collector now \
              lets a thread that only reads pin with a plain store (the thread that advances the \
              epoch pays a `membarrier` instead: SAFETY.md, section 11), so a read pays two, the \
              upgrade and the drop; `DashMap` pays four (a read lock and unlock in place of the \
              pin). As the map outgrows the caches, memory \
              decides: a hit touches the tag word's line, the item's (which large tables \
              prefetch alongside the tag word's) and the value's control block, so at \
              1 000 000 keys this crate leads.",
    },
    Section {
        id: "map_read_costs",
        title: "WeakValueMap reads with a keep-warm tier or statistics",
        bench: "maps",
        prefixes: &["read_cost/"],
        unit: "million lookups per second (each upgraded to a strong handle), all threads",
        what: "What a map's options cost its reads: uniform read hits at 1 000 and 100 000 \
               live keys, the `weakrefs` row on a map with the option, the `without` row on \
               the same map without it, in the same run. `keep recent all`: a keep-warm tier \
               (`keep_recent`) as large as the key set, so every hit lands on a value the tier \
               holds; `keep recent tenth`: a tier a tenth of the key set, so most hits land on \
               values it does not hold; `stats`: statistics counted (the default) against a map \
               built with `record_stats(false)`. A ratio within 5% of 1 is the cost the map \
               promises for the tier on held values and for statistics.",
        why: "A hit on a value the tier holds reads the mark beside its item (on the item's \
              line, unless the 24-byte slot straddles two) and one word all readers share; \
              until the tier's CLOCK hand next passes the value's position it writes nothing. \
              The slots a lookup probes are a word larger than without a tier, so a map \
              larger than the caches misses them more often. A hit on a value the tier does \
              not hold tries to enter it one time in 1024: it takes its shard's lock and the \
              tier's, each only if free, counts the value in the frequency sketch and moves \
              the hand, and the next hit on each held value the hand passed takes the \
              slower way (a fence and one or two read-modify-writes); on two threads those \
              tries move the tier's lines between the cores. Statistics are counted in \
              per-thread stripes of counters: a plain load and store per lookup, on a line \
              the thread owns.",
    },
    Section {
        id: "map_churn",
        title: "WeakValueMap churn: insert, then the value dies",
        bench: "maps",
        prefixes: &["churn"],
        unit: "million inserts per second (batches of 1024 values that die)",
        what: "Batches of 1024 fresh values are inserted and dropped: under 1024 keys, \
               with `u64` keys and with `String` keys (each insert clones one of 1024 prepared \
               strings, on every side), and under `u64` keys never used before (session or \
               request ids). This crate removes each dead entry by its death callback and calls \
               `flush()` after each batch; `DashMap` sweeps with `retain` after each batch \
               (`dashmap_retain`) and, separately, after every 64 batches, 65 536 inserts \
               (`dashmap_retain_64k`); weak-table runs `remove_expired` after each batch.",
        why: "Each insert here allocates a callback node and links it onto the value; each death runs that callback on the dying thread, which \
              takes the shard's lock, unlinks the entry and retires it to the epoch collector. \
              The baselines allocate nothing per insert once their tables have grown and do no \
              work at death: dead entries stay, payload allocation and all, until the next sweep, \
              which visits every entry the map holds. Under reused keys an insert overwrites \
              its key's dead entry, so a map swept every 65 536 inserts never holds more than \
              1024 and pays almost nothing for the spacing; under fresh keys it grows to 65 536 \
              entries between sweeps, each keeping its dead value's allocation, and falls \
              behind this crate, whose map stays as small as its live set. Much of \
              the time goes to locked instructions, on both sides: a sampling profile of a \
              one-thread `u64` churn (`perf`, cpu-clock, 2026-12-07) puts 39% of this crate's \
              samples and 67% of `DashMap`'s just after one. This crate pays eight per insert \
              and death: the value's weak count, the node's link onto the value, the shard's \
              lock; at the death the value's strong count, the epoch pin (a thread that retires \
              memory pins with a SeqCst fence), the shard's lock; \
              then, in the deferred drop, the table's reference count and the bit that frees \
              the slot for reuse. Four more were paid until 2026-12-07: the callback's claim \
              and the release of the value's implicit weak reference (the removal now claims \
              the callback with a plain store under the shard's lock, and hands the implicit \
              weak to the entry, whose drop releases both with a load), and the two unlocks \
              (on Linux the shard's lock is released with a plain store, and a thread about \
              to sleep on it pays with a `membarrier` call instead: SAFETY.md, section 10). \
              `DashMap` with `retain` pays six, and runs 470 instructions an insert and death \
              to this crate's 1348 (callgrind, 131 072 inserts under 1 024 keys, 2026-12-07; \
              counted exactly from callgrind's per-instruction counts, 8.2 locked instructions \
              to `DashMap`'s 6.0 with the sweep every 1024 or every 65 536 inserts). An \
              uncontended one costs about 4.5 ns here: three more per insert took 10-12% off \
              this crate's best churn rate (a scratch loop, best of six runs each, \
              2026-12-07), so the two of the deferred drop are worth about 7%, and the \
              instructions the rest. \
              Exact, \
              automatic removal is what the extra work buys; the churn memory section below \
              shows what the sweeps leave when they are further apart. A removed `String` key \
              is freed by the epoch collector, like a `u64` one: only keys whose destructor may \
              run user code go to the finalizer thread.",
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
               address, whose entries the object's owner removes by hand as it drops, and, \
               for lookups, the same `DashMap` with each value boxed (`dashmap_boxed_value`), \
               the control for where this crate keeps a value.",
        why: "A lookup pins the epoch, probes a group's tags and the matching slot, one \
              word: the address of the entry's node, its one allocation, which holds the key's \
              `Weak` and the value. A value never moves while readers borrow it in place (a \
              `Mutex` inside is the common case), so a rebuild moves the address, not the \
              node. At 100 000 keys the nodes, 48 bytes each (64 with the allocator's \
              header), do not stay in the caches: a hit misses on its node, where \
              `DashMap`'s value sits inline in its bucket array. Callgrind's cache \
              simulation of a standalone loop of such lookups, with a 1 MiB last level (the \
              Intel machine's L2 is 1.25 MiB), counts 3.9 first-level and 2.5 last-level \
              misses a lookup against `DashMap`'s 2.9 and 1.2: the tag word and the slot, \
              which the lookup loads together (it prefetches the home group's slots as it \
              loads the tag word), then the node, where `DashMap` loads its control bytes, \
              then the bucket (and both, the loop's own array of keys). On one thread that has cost from nothing to more than half of \
              `DashMap`'s rate, as the heap's layout and the machine change from run to run \
              (the interleaved section has this run's ratio; across sessions it has read \
              0.37x to 1.05x on one thread, and ahead on two). \
              The boxed `DashMap` follows the same one pointer more, and measures at or \
              below this crate's lookup in most runs (its column in the table): the pointer \
              is most of the cost, not the rest of the read. Packing the values where they \
              would still never move would win back only part of it: in `map_ab`, the same \
              pointer into one dense array of 16-byte records (`dashmap_dense_records`) \
              measured closer to the boxed value than to the inline one in all five runs of \
              the session that added it. Only a value inline in its slot spares the \
              pointer, and a slot's contents move when its table is rebuilt, which a value \
              borrowed in place must not. How many instructions a lookup runs counts \
              too, at a size where its misses dominate: the processor overlaps the misses of \
              as many lookups as its reorder window holds, and the fewer instructions each \
              takes, the more of them. Lookups made while the thread was already pinned (a \
              pin of its own then costs a counter, about 18 instructions fewer than the \
              outermost pin's) measured 0.91x `DashMap` against 0.82x for the same lookups \
              each pinning on its own, as medians of eight alternated runs of a standalone \
              loop (100 000 keys, one thread, 2026-12-07). Cutting a lookup from 146 \
              instructions to 130 that day (callgrind; a pin with no temporary, no bounds or \
              variant checks on the slots a probe reads) took the same loop from 0.85x to \
              0.99x (medians of eight alternated runs of each build, the new one ahead in \
              every pair); it runs 125 now. Nothing \
              else: the read writes nothing shared (`insert` and `remove` return whether \
              they displaced a value, and a displaced value is dropped once no reader can \
              see it). Churn pays for a callback node per entry, where the \
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
        why: "Each member registers a death callback (a node from the thread's cache of \
              freed blocks and one compare-and-swap onto the object's list, which counts the push too) \
              and takes its shard's lock, where the baseline pushes a `Weak` onto a `Vec` under \
              one lock; that is the cost of subscribe and churn, and the subscribe figure also \
              includes dropping the set, which detaches 1000 callbacks (each object's list \
              frees them a few registrations later). A notification pass is a lock-free walk \
              of the set's shard tables: 8-byte items (the member's `Weak`; its callback \
              handle sits in an array beside, which the walk never reads) behind tag \
              bytes, some slots empty, in several tables, against 8-byte `Weak`s packed \
              in one `Vec`, so the walk reads more memory per member.",
    },
];

/// How to read the ratios and verdicts, in the report's header: `noise`
/// is the band around 1 called on a par.
pub fn reading_it(noise: f64) -> String {
    format!(
        "the interleaved section first: ratios from the same rounds, robust to the \
         machine's speed changing, read as that section says. The other sections give \
         criterion medians. A ratio is this crate's best row over the \
         best alternative's, so above 1 is faster. Ratios within {:.0}% of 1 are called on a \
         par; beyond that, a case is ahead or behind only if the 95% confidence intervals of \
         the two medians do not overlap, else unclear. Those intervals describe one run: this \
         machine is shared with other work, and separate runs have differed by more than them, \
         most on two threads. Read a single row as a measurement, and a pattern across rows \
         and sections as the finding.",
        noise * 100.0
    )
}

/// The interleaved A/B section's heading.
pub const AB_TITLE: &str = "The collections A/B, interleaved";

/// What the interleaved A/B section measures, and how to read it against
/// the criterion sections.
pub fn ab_what(rounds: u32, noise: f64) -> String {
    format!(
        "`WeakValueMap` reads at 1 000 and 100 000 live keys (uniform, every read a hit \
         that upgrades), `WeakKeyMap::with` at 100 000, the read cost of a keep-warm tier and \
         of statistics, and churn (insert a value under a key, then drop it) under 1 024 \
         reused `u64` keys, fresh `u64` keys and 1 024 reused `String` keys, and a \
         `WeakSet` of 1 000 members notified and subscribed to. Every \
         contender of a case runs once a round, back to back, in an order that rotates from \
         round to round, each worker timing itself; a ratio is this crate's rate over the \
         peer's in the same round, and the table gives the median over {rounds} rounds (the \
         rates beside it are each side's median). A change in the machine's speed moves the \
         contenders of a round together, so these ratios hold where the sections below, \
         measured one benchmark after another, can move by more than their confidence \
         intervals: where the two disagree on a case, this one is the measurement. A peer is \
         an *alternative* (what a user would pick instead), the *floor* (an unsynchronised \
         map read in place: shown, never judged against), a *control* (a peer with one cost \
         added, to show where a gap comes from) or, for an option's cost, this crate's same \
         map *without* the option. A case is judged on its lowest ratio against an \
         alternative or the map without the option, on a par within {:.0}% of 1. What \
         explains each figure is in the section below that measures the same case. \
         Measured by `cargo bench --bench map_ab`; rates in million operations per second.",
        noise * 100.0
    )
}

/// What the memory-per-entry table measures.
pub const MEMORY_PER_ENTRY: &str = "\
    Heap bytes and allocations each map holds per live entry, 100 000 `u64` keys, every map \
    grown from empty except the `with_capacity` row, values not counted. Counted by a global \
    allocator wrapper after the epoch collector has freed what growth retired; the bytes are those \
    asked for, and each allocation costs 8 to 16 bytes more in glibc's headers and rounding. \
    papaya reclaims through its own scheme, which that settling does not drive, so its row may \
    include garbage of its growth. Measured by `cargo bench --bench map_memory`.";

/// What explains the memory-per-entry table.
pub const MEMORY_PER_ENTRY_WHY: &str = "\
    Each entry of this crate's map is a 16-byte item (key and the value's `Weak`) with its \
    8-byte callback handle and a one-byte tag beside it (and a bit that says when a removed \
    entry's slot may be reused), in a table kept at most 7/8 full (and, grown from empty, at \
    least half full after each rebuild), plus one allocation: the death callback registered \
    on its value (the node that removes the entry when the value dies, 24 bytes: its count, a \
    status word that also keeps the bits of the entry's hash the table files it by, which its \
    removal probes by and a rebuild places it by, the link in the value's list, and the \
    address of the entry's shard). `DashMap`, `HashMap` and `scc` keep the key and the `Weak` inline in their \
    buckets, papaya allocates one entry per key, and none registers anything: they find out \
    about dead values only when someone looks.";

/// What the churn memory run does and samples.
pub const CHURN_MEMORY: &str = "\
    Objects (64-byte payloads) arrive under new keys and stay alive until 1000 newer ones have \
    arrived; the chart samples each map's entries and the heap bytes in use since it was \
    created, which include the 1000 live objects (this crate's blocks are the size of \
    `Arc`'s: a 16-byte header). `DashMap` sweeps with `retain` every 10 000 operations, sampled just before each \
    sweep; weak-table clears expired entries when it would otherwise grow. At the end every \
    object is dropped, `flush()` is called and the epoch collector's garbage is collected; the \
    baselines get no extra sweep. Heap bytes, not the resident set: the resident set is one \
    figure for the whole process, and the allocator keeps pages it was given, so it cannot \
    tell one map's run from the next. Measured by `cargo bench --bench churn_memory`.";

/// What explains the churn memory run.
pub const CHURN_MEMORY_WHY: &str = "\
    This crate's maps hold an entry exactly as long as its object lives: the entry count stays \
    at the number of live objects and goes to zero when they die. A map of `std::sync::Weak` \
    holds dead entries until something sweeps them, and a dead `Weak` keeps its allocation, \
    payload included, until then; how much piles up depends on how often the user sweeps, and \
    a sweep costs a pass over the whole map. The heap that stays with this crate's maps after \
    everything died is their tables, kept for reuse.";

/// What the latency run measures.
pub const LATENCY: &str = "\
    The time from just before an object's last `Strong` is dropped to the start of its \
    callback on the finalizer thread, with that thread idle (parked) before each sample. \
    Against a `Drop` that sends the callback over `std::sync::mpsc` to a thread blocked in \
    `recv`. Measured by `cargo bench --bench callback_latency`.";

/// What explains the latency figures.
pub const LATENCY_WHY: &str = "\
    Both designs wake a parked thread through a futex, so most of a sample is the operating \
    system's wake-up and scheduling, and the medians are close. Where this crate's tail is \
    longer, the cause has not been isolated; the difference in mechanism is that its finalizer \
    thread spins briefly and then parks with `std::thread::park`, to be unparked by the dying \
    thread, where the channel's receiver sleeps in the channel's own wait.";

/// How to regenerate the report, in its header.
pub const TO_REGENERATE: &str = "\
    `cargo bench-report` (about 16 minutes on 2 cores, build included) or `cargo bench-report \
    --quick` (about 12 minutes, build included); `--threads 1,2,4,8,16` adds a thread-scaling run. Each section \
    names the bench that measures it alone.";

/// What the cache_server demo runs and what its section's figures are.
pub const DEMO: &str = "\
    The main demo, `examples/cache_server`: an HTTP server (hyper on tokio) whose worker \
    threads share a cache of generated objects (256 KiB each, a few milliseconds of CPU to \
    build), under the same Zipf-skewed load from keep-alive clients over loopback, once per \
    cache: a strong `Mutex<HashMap>`, which keeps every object it builds; a pure \
    `WeakValueMap`, which keeps an object while a request or a connected client's session \
    holds it; and a `WeakValueMap` with `keep_recent(N)`, which also keeps N of the objects \
    recently loaded or found, those wanted most often. The figures are the demo's own summary \
    (`--tsv`): requests per second over each cache's share of the run, and the bytes of \
    objects alive at the peak and once every client had disconnected. Measured by `cargo run --release --example \
    cache_server -- --duration 6` (3 seconds under `--quick`; `cargo bench-report` builds it \
    in the bench profile), the demo's defaults otherwise (`--help` lists them).";

/// What the demo's run shows, from its figures: the keep-warm and the pure
/// weak cache, each against the strong one.
pub fn demo_findings(strong: &DemoCache, weak: &DemoCache, warm: &DemoCache) -> String {
    let rate = |cache: &DemoCache| cache.requests_per_second / strong.requests_per_second;
    let peak = |cache: &DemoCache| cache.peak_object_bytes as f64 / strong.peak_object_bytes as f64;
    format!(
        "In this run, `{warm_name}` served {:.2}x the strong cache's requests per second at \
         {:.2}x its peak object memory, and held {:.1} MiB once the clients had left, against \
         the strong cache's {:.1} MiB. The pure `WeakValueMap` served {:.2}x the strong \
         cache's requests per second at {:.2}x its peak object memory, built {} objects to \
         its {}, and held {:.1} MiB once the clients had left.",
        rate(warm),
        peak(warm),
        mib(warm.object_bytes_clients_gone),
        mib(strong.object_bytes_clients_gone),
        rate(weak),
        peak(weak),
        weak.objects_built,
        strong.objects_built,
        mib(weak.object_bytes_clients_gone),
        warm_name = demo_name(warm),
    )
}

/// A demo cache's name in the report: the keep-warm one is a
/// `WeakValueMap` too, which the demo's short name leaves out.
pub fn demo_name(cache: &DemoCache) -> String {
    if cache.kind == "keep-warm" {
        format!("WeakValueMap + {}", cache.cache)
    } else {
        cache.cache.clone()
    }
}
