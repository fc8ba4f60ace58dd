//! Thread-local marks: what this thread is inside of right now.
//!
//! Some calls must behave differently when the thread making them is
//! already inside a certain piece of work, or they would wait for
//! themselves: a `flush` inside a death callback, a second `shutdown`
//! inside one, a single-flight load of a key whose `init` this very thread
//! is running. Each such piece of work puts a [`Mark`] on this thread for
//! as long as it runs ([`enter`], undone when the returned guard drops,
//! panics included), and the calls that care ask whether a mark is there
//! ([`is_inside`], [`any`]).
//!
//! Marks nest: a callback may run inside a drain inside another callback.
//! They are per thread (loom's thread-locals under loom, so every model
//! thread has its own), and a thread whose thread-locals are being torn
//! down has no marks: entering one then does nothing, and no mark is found.

use std::cell::{Cell, RefCell};

use crate::sync::thread_local;

/// One piece of work this thread is inside of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    /// A death callback (or a posted job) is running on this thread
    /// (`Runtime::run_callback`). They nest: a callback that calls
    /// `Finalizer::call`.
    Callback,
    /// This thread is running batches it took from the callback queue
    /// (`Runtime::run_taken`): a `flush` inside one of their callbacks
    /// returns at once, for the loop it is part of runs what is queued
    /// next, so chains of callbacks that flush never nest on the stack
    /// (SAFETY.md, C15).
    Draining,
    /// This thread is running the `init` of the single-flight load at
    /// address `load` (a blocking `init`, or one poll of an async one);
    /// `blocking` if its leader blocks the thread (SAFETY.md, M6).
    Loading { load: usize, blocking: bool },
}

/// One thread's marks. `Callback` and `Draining` only nest and are never
/// told apart by anything but their kind, so each is a count: entering
/// one, which every death callback does, costs what a counter did. Loads
/// carry an address and are searched, so they are kept in a list.
struct Marks {
    callbacks: Cell<usize>,
    draining: Cell<usize>,
    /// `Loading` marks, innermost last.
    loads: RefCell<Vec<Mark>>,
}

impl Marks {
    fn count(&self, mark: Mark) -> Option<&Cell<usize>> {
        match mark {
            Mark::Callback => Some(&self.callbacks),
            Mark::Draining => Some(&self.draining),
            Mark::Loading { .. } => None,
        }
    }
}

thread_local! {
    /// This thread's marks.
    // loom's `thread_local!` takes no `const` initialiser.
    #[allow(clippy::missing_const_for_thread_local)]
    static MARKS: Marks = Marks {
        callbacks: Cell::new(0),
        draining: Cell::new(0),
        loads: RefCell::new(Vec::new()),
    };
}

/// Puts `mark` on this thread until the returned guard drops.
#[inline]
pub(crate) fn enter(mark: Mark) -> Entered {
    // During thread-local teardown: no marks, so nothing to undo either.
    let _ = MARKS.try_with(|marks| match marks.count(mark) {
        Some(count) => count.set(count.get() + 1),
        None => marks.loads.borrow_mut().push(mark),
    });
    Entered(mark)
}

/// True if this thread is inside `mark`.
#[inline]
pub(crate) fn is_inside(mark: Mark) -> bool {
    MARKS
        .try_with(|marks| match marks.count(mark) {
            Some(count) => count.get() > 0,
            None => marks.loads.borrow().contains(&mark),
        })
        .unwrap_or(false)
}

/// True if this thread is inside a mark that `matches`.
pub(crate) fn any(matches: impl Fn(Mark) -> bool) -> bool {
    MARKS
        .try_with(|marks| {
            (marks.callbacks.get() > 0 && matches(Mark::Callback))
                || (marks.draining.get() > 0 && matches(Mark::Draining))
                || marks.loads.borrow().iter().any(|&mark| matches(mark))
        })
        .unwrap_or(false)
}

/// Takes its mark off this thread when dropped.
#[derive(Debug)]
#[must_use = "the mark is taken off when the guard drops"]
pub(crate) struct Entered(Mark);

impl Drop for Entered {
    #[inline]
    fn drop(&mut self) {
        let _ = MARKS.try_with(|marks| match marks.count(self.0) {
            Some(count) => count.set(count.get() - 1),
            None => {
                let mut loads = marks.loads.borrow_mut();
                // The innermost equal mark: guards drop in the reverse
                // order of their `enter`, so this is the last one.
                if let Some(index) = loads.iter().rposition(|&mark| mark == self.0) {
                    loads.remove(index);
                }
            }
        });
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;

    #[test]
    fn marks_nest_and_are_undone_in_order() {
        assert!(!is_inside(Mark::Callback));
        {
            let _callback = enter(Mark::Callback);
            assert!(is_inside(Mark::Callback));
            assert!(!is_inside(Mark::Draining));
            {
                let _draining = enter(Mark::Draining);
                let _inner = enter(Mark::Callback);
                assert!(is_inside(Mark::Draining));
            }
            assert!(!is_inside(Mark::Draining));
            assert!(
                is_inside(Mark::Callback),
                "the outer callback is still running"
            );
        }
        assert!(!is_inside(Mark::Callback));
    }

    #[test]
    fn a_mark_is_undone_by_a_panic_and_is_per_thread() {
        let outcome = std::panic::catch_unwind(|| {
            let _loading = enter(Mark::Loading {
                load: 8,
                blocking: true,
            });
            std::thread::spawn(|| assert!(!any(|mark| matches!(mark, Mark::Loading { .. }))))
                .join()
                .unwrap();
            panic!("unwinds through the guard (expected by this test)");
        });
        assert!(outcome.is_err());
        assert!(!any(|mark| matches!(mark, Mark::Loading { .. })));
    }
}
