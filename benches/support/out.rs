//! Machine-readable output for the benchmarks that criterion does not
//! run (memory, latency distributions): when `WEAKREFS_BENCH_OUT` names a
//! directory, they also write a tab-separated file there (names hold commas), which the report
//! (`cargo bench-report`, benches/report) turns into tables and charts.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

/// A tab-separated file `name` in `$WEAKREFS_BENCH_OUT` with `header` written, or
/// `None` when the variable is unset.
pub fn tsv(name: &str, header: &str) -> Option<BufWriter<File>> {
    let dir = PathBuf::from(std::env::var_os("WEAKREFS_BENCH_OUT")?);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("WEAKREFS_BENCH_OUT: cannot create {}: {e}", dir.display()));
    let path = dir.join(name);
    let file =
        File::create(&path).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    let mut out = BufWriter::new(file);
    writeln!(out, "{header}").expect("write header");
    Some(out)
}
