//! Catching and reporting panics in user code that runs where nobody can
//! receive them (death callbacks on the finalizer thread, destructors of
//! removed keys and values run by epoch-deferred functions), and keeping
//! the first of several where each step must run (`FirstPanic`).

use std::any::Any;
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};

/// Runs `f`, catching a panic and reporting it on stderr as `what`.
/// Returns whether it panicked.
pub(crate) fn catch_and_report(what: &str, f: impl FnOnce()) -> bool {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => false,
        // No loom model panics on purpose: a panic here is the model's
        // failure (a causality violation, a broken assertion in a probe),
        // which, reported and swallowed as a user's would be, would let the
        // model pass.
        Err(payload) if cfg!(weakrefs_loom) => panic::resume_unwind(payload),
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

/// Drops each of `items` on its own (`what`, for a report), then resumes
/// the first panic among their destructors, if any: one destructor's
/// panic neither skips the others nor, with a second during its
/// unwinding, aborts the process (`FirstPanic`).
pub(crate) fn drop_each_then_resume<T>(what: &'static str, items: impl IntoIterator<Item = T>) {
    let mut panics = FirstPanic::default();
    for item in items {
        panics.run(what, || drop(item));
    }
    panics.resume();
}

/// The first panic of several steps that must all run, each caught as it
/// happens, resumed once they have: one step's panic neither skips the
/// rest nor, with a second during its unwinding, aborts the process. Later
/// panics are reported on stderr (only one can be resumed), as is the
/// first if this is dropped without `resume` (a panic elsewhere unwinds
/// past it).
#[derive(Default)]
pub(crate) struct FirstPanic(Option<(&'static str, Box<dyn Any + Send>)>);

impl FirstPanic {
    /// Runs `step` (`what`, for a report), keeping its panic if it is the
    /// first.
    pub(crate) fn run(&mut self, what: &'static str, step: impl FnOnce()) {
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(step)) {
            self.keep(what, payload);
        }
    }

    /// Keeps `payload`, a panic of `what`, if it is the first; else
    /// reports it.
    fn keep(&mut self, what: &'static str, payload: Box<dyn Any + Send>) {
        match self.0 {
            None => self.0 = Some((what, payload)),
            Some(_) => report(what, payload),
        }
    }

    /// True if no step has panicked.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Drops `item` as a step (`what`, for a report). A type without drop
    /// glue runs no code as it drops: nothing to catch, and nothing paid.
    #[inline]
    pub(crate) fn drop_step<T>(&mut self, what: &'static str, item: T) {
        if std::mem::needs_drop::<T>() {
            self.run(what, || drop(item));
        }
    }

    /// Hands `kept`, a call's result, back to its caller once the steps
    /// that let go of the call's leftovers have run: if none panicked.
    /// Else `kept` is dropped too (`what`, for a report), on its own, and
    /// the first panic resumed: a result left as a local of the unwinding
    /// frame would be dropped during that unwinding, and a second panic
    /// from its destructor would abort the process. On a thread unwinding
    /// already, where resuming would abort too, the panic is reported and
    /// `kept` handed back.
    #[inline]
    pub(crate) fn hand_back<R>(self, what: &'static str, kept: R) -> R {
        if self.is_empty() {
            // Empty: its drop would do nothing, but is not free.
            std::mem::forget(self);
            return kept;
        }
        self.hand_back_after_panic(what, kept)
    }

    /// [`Self::hand_back`] once a step has panicked.
    #[cold]
    #[inline(never)]
    fn hand_back_after_panic<R>(mut self, what: &'static str, kept: R) -> R {
        if std::thread::panicking() {
            // Reports the panic as it drops.
            drop(self);
            return kept;
        }
        self.drop_step(what, kept);
        self.resume();
        unreachable!("a step panicked, and `resume` resumed it")
    }

    /// Resumes the first panic, if any; reports it instead if this thread
    /// is unwinding already (a destructor's step), where resuming would
    /// abort.
    pub(crate) fn resume(mut self) {
        if let Some((what, payload)) = self.0.take() {
            if std::thread::panicking() {
                report(what, payload);
            } else {
                panic::resume_unwind(payload);
            }
        }
    }
}

impl Drop for FirstPanic {
    #[inline]
    fn drop(&mut self) {
        if let Some((what, payload)) = self.0.take() {
            report(what, payload);
        }
    }
}

/// Reports a caught panic on stderr and drops its payload, whose own
/// `Drop` (user code too) may not unwind from here either.
#[cold]
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
