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
//! thread has its own), and they hold nothing that needs dropping: the
//! thread-local has no destructor to run at thread exit, so marks keep
//! working inside other thread-locals' destructors, which may drop the
//! last handle to an object, run its hooks, or load a key.

use std::cell::Cell;
use std::ptr;

use crate::sync::thread_local;

/// One piece of work that nests without naming anything: a count of each
/// is all a thread keeps.
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
    /// This thread holds a map's shard lock while it runs user code that
    /// is allowed to do more than compare (`WeakValueMap::remove_if`'s
    /// predicate): a `flush` or `shutdown` there would wait for a removal
    /// that waits for that lock, so they panic instead. Put on only by
    /// [`locked`], which names the shard: a thread is inside it while it
    /// has a `Held` frame, and keeps no count of it.
    Locked,
    /// This thread is inside a read (a `get` dropping a value the
    /// keep-warm tier let go of), which never waits: a death there keeps
    /// its backlog debt for the thread's next safe point (SAFETY.md, C18).
    Reading,
    /// This thread is the finalizer thread, for as long as its loop runs:
    /// it never waits for its own backlog (C18).
    #[cfg_attr(weakrefs_loom, allow(dead_code))]
    Finalizer,
}

/// This thread is running the `init` of the single-flight load at
/// address `load` (a blocking `init`, or one poll of an async one);
/// `blocking` if its leader blocks the thread (SAFETY.md, M6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loading {
    pub(crate) load: usize,
    pub(crate) blocking: bool,
}

/// A `Loading` mark, on the stack of the [`loading`] call that put it on
/// the thread, linked to the one it nests in.
struct Frame {
    loading: Loading,
    /// The next outer frame, null for none.
    outer: *const Frame,
}

/// One thread's marks: plain cells, no destructor.
struct Marks {
    callbacks: Cell<usize>,
    draining: Cell<usize>,
    reading: Cell<usize>,
    finalizer: Cell<usize>,
    /// The innermost `Held` frame (`locked`), null for none.
    holding: Cell<*const Held>,
    /// The innermost `Loading` frame, null for none.
    loads: Cell<*const Frame>,
}

impl Marks {
    /// The count of a mark put on by [`enter`] (`Locked` is not: its
    /// frames say whether the thread is inside it).
    fn count(&self, mark: Mark) -> &Cell<usize> {
        match mark {
            Mark::Callback => &self.callbacks,
            Mark::Draining => &self.draining,
            Mark::Reading => &self.reading,
            Mark::Finalizer => &self.finalizer,
            Mark::Locked => unreachable!("`Locked` is put on by `locked` alone"),
        }
    }
}

#[cfg(not(weakrefs_loom))]
thread_local! {
    /// This thread's marks. A constant initialiser and nothing to drop: a
    /// thread-local with no destructor, which nothing tears down.
    static MARKS: Marks = const {
        Marks {
            callbacks: Cell::new(0),
            draining: Cell::new(0),
            reading: Cell::new(0),
            finalizer: Cell::new(0),
            holding: Cell::new(ptr::null()),
            loads: Cell::new(ptr::null()),
        }
    };
}

#[cfg(weakrefs_loom)]
thread_local! {
    /// This thread's marks (loom's `thread_local!` takes no `const`
    /// initialiser).
    static MARKS: Marks = Marks {
        callbacks: Cell::new(0),
        draining: Cell::new(0),
        reading: Cell::new(0),
        finalizer: Cell::new(0),
        holding: Cell::new(ptr::null()),
        loads: Cell::new(ptr::null()),
    };
}

/// Puts `mark` on this thread until the returned guard drops.
#[inline]
pub(crate) fn enter(mark: Mark) -> Entered {
    MARKS.with(|marks| {
        let count = marks.count(mark);
        count.set(count.get() + 1);
    });
    Entered(mark)
}

/// True if this thread is inside `mark`.
#[inline]
pub(crate) fn is_inside(mark: Mark) -> bool {
    MARKS.with(|marks| match mark {
        Mark::Locked => !marks.holding.get().is_null(),
        _ => marks.count(mark).get() > 0,
    })
}

/// Takes its mark off this thread when dropped.
#[derive(Debug)]
#[must_use = "the mark is taken off when the guard drops"]
pub(crate) struct Entered(Mark);

impl Drop for Entered {
    #[inline]
    fn drop(&mut self) {
        MARKS.with(|marks| {
            let count = marks.count(self.0);
            count.set(count.get() - 1);
        });
    }
}

/// A shard whose lock this thread holds while it runs code that may do
/// more than compare, on the stack of the [`locked`] call that put it on
/// the thread, linked to the one it nests in.
struct Held {
    /// The shard's address.
    shard: usize,
    /// The next outer frame, null for none.
    outer: *const Held,
}

/// Runs `body` with [`Mark::Locked`] on this thread, naming the shard
/// whose lock it holds (its address, `shard`), taken off as `body` returns
/// or unwinds: a write to that shard from `body` would wait for itself
/// ([`holds_locked`]).
pub(crate) fn locked<R>(shard: usize, body: impl FnOnce() -> R) -> R {
    /// Puts the frame's outer one back as innermost when dropped.
    struct Pop(*const Held);
    impl Drop for Pop {
        fn drop(&mut self) {
            MARKS.with(|marks| marks.holding.set(self.0));
        }
    }
    let outer = MARKS.with(|marks| marks.holding.get());
    let frame = Held { shard, outer };
    MARKS.with(|marks| marks.holding.set(&frame));
    let _pop = Pop(outer);
    body()
}

/// True if this thread holds the lock of the shard at address `shard`
/// while it runs code that may do more than compare ([`locked`]), in any
/// of the frames that nest.
#[cold]
#[cfg_attr(weakrefs_loom, allow(dead_code))]
pub(crate) fn holds_locked(shard: usize) -> bool {
    let mut frame = MARKS.with(|marks| marks.holding.get());
    while !frame.is_null() {
        // A frame on the list lives on the stack of a `locked` call of
        // this thread that has not returned (as for `any_loading`).
        // SAFETY: as just said.
        let Held { shard: held, outer } = unsafe { &*frame };
        if *held == shard {
            return true;
        }
        frame = *outer;
    }
    false
}

/// Runs `body` with `loading` on this thread, taken off as `body` returns
/// or unwinds.
pub(crate) fn loading<R>(loading: Loading, body: impl FnOnce() -> R) -> R {
    /// Puts the frame's outer one back as innermost when dropped.
    struct Pop(*const Frame);
    impl Drop for Pop {
        fn drop(&mut self) {
            MARKS.with(|marks| marks.loads.set(self.0));
        }
    }
    let outer = MARKS.with(|marks| marks.loads.get());
    let frame = Frame { loading, outer };
    MARKS.with(|marks| marks.loads.set(&frame));
    let _pop = Pop(outer);
    body()
}

/// True if this thread is running a load that `matches`.
pub(crate) fn any_loading(matches: impl Fn(Loading) -> bool) -> bool {
    let mut frame = MARKS.with(|marks| marks.loads.get());
    while !frame.is_null() {
        // A frame on the list lives on the stack of a `loading` call of
        // this thread that has not returned: it takes its frame off the
        // list before it returns or unwinds, innermost first, and only this
        // thread reads the list.
        // SAFETY: as just said.
        let Frame { loading, outer } = unsafe { &*frame };
        if matches(*loading) {
            return true;
        }
        frame = *outer;
    }
    false
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
    fn a_locked_mark_names_its_shards_while_it_runs_and_nests() {
        assert!(!holds_locked(0x100));
        locked(0x100, || {
            assert!(holds_locked(0x100) && !holds_locked(0x200));
            assert!(is_inside(Mark::Locked));
            locked(0x200, || {
                assert!(holds_locked(0x200) && holds_locked(0x100));
            });
            assert!(holds_locked(0x100) && !holds_locked(0x200));
        });
        assert!(!holds_locked(0x100) && !is_inside(Mark::Locked));
    }

    #[test]
    fn loads_nest_and_are_found_while_they_run() {
        let outer = Loading {
            load: 1,
            blocking: true,
        };
        let inner = Loading {
            load: 2,
            blocking: false,
        };
        loading(outer, || {
            loading(inner, || {
                assert!(any_loading(|load| load == outer) && any_loading(|load| load == inner));
            });
            assert!(any_loading(|load| load == outer) && !any_loading(|load| load == inner));
        });
        assert!(!any_loading(|_| true));
    }

    #[test]
    fn a_mark_is_undone_by_a_panic_and_is_per_thread() {
        let outcome = std::panic::catch_unwind(|| {
            let _callback = enter(Mark::Callback);
            let loading_now = Loading {
                load: 8,
                blocking: true,
            };
            loading(loading_now, || {
                assert!(any_loading(|load| load == loading_now));
                std::thread::spawn(|| {
                    assert!(!any_loading(|_| true) && !is_inside(Mark::Callback))
                })
                .join()
                .unwrap();
                panic!("unwinds through the guards (expected by this test)");
            })
        });
        assert!(outcome.is_err());
        assert!(!any_loading(|_| true) && !is_inside(Mark::Callback));
    }
}
