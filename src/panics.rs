//! Catching and reporting panics in user code that runs where nobody can
//! receive them: death callbacks on the finalizer thread, and destructors
//! of removed keys and values run by epoch-deferred functions.

use std::any::Any;
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};

/// Runs `f`, catching a panic and reporting it on stderr as `what`.
/// Returns whether it panicked.
pub(crate) fn catch_and_report(what: &str, f: impl FnOnce()) -> bool {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => false,
        Err(payload) => {
            report(what, payload);
            true
        }
    }
}

/// Drops each of `items` on its own, catching and reporting a panic from
/// any as `what`: one destructor's panic neither skips the others nor,
/// with a second during the first's unwinding (as dropping a `Vec` whole
/// would give), aborts the process.
pub(crate) fn drop_each_and_report<T>(what: &str, items: impl IntoIterator<Item = T>) {
    for item in items {
        catch_and_report(what, || drop(item));
    }
}

/// Reports a caught panic on stderr and drops its payload, whose own
/// `Drop` (user code too) may not unwind from here either.
pub(crate) fn report(what: &str, payload: Box<dyn Any + Send>) {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)");
    // `writeln!` rather than `eprintln!`, which panics when stderr is a
    // closed pipe: nothing here may unwind.
    let _ = writeln!(std::io::stderr(), "weakrefs: {what} panicked: {message}");
    if let Err(nested) = panic::catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(nested);
    }
}
