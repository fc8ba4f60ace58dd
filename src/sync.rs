//! The one place that names atomics, fences and model-checker types.
//!
//! Every other module imports its synchronisation primitives from here, so a
//! build with `--cfg weakrefs_loom` swaps the whole crate onto loom's model
//! checker and a build with `--cfg weakrefs_tsan` swaps fences for loads that
//! ThreadSanitizer understands. Nothing else in the crate may spell
//! `std::sync::atomic` or `loom`.

#[cfg(not(weakrefs_loom))]
use std::sync as lock;
#[cfg(not(weakrefs_loom))]
pub(crate) use std::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

#[cfg(weakrefs_loom)]
use loom::sync as lock;
#[cfg(weakrefs_loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

pub(crate) use lock::MutexGuard;

/// Loom has no compiler fence; its users, the light sides of the shard
/// lock's and the epoch collector's asymmetric pairs, are never chosen
/// under loom.
pub(crate) use std::sync::atomic::compiler_fence;

/// A mutex whose lock ignores poisoning, as tokio's `loom/std/mutex.rs`
/// does. Every critical section in the crate either runs no user code or
/// leaves its data consistent before any point that can panic (a shard's
/// writer parks what it has not published, a load is settled by a drop
/// guard), so a panic elsewhere must not make the lock unusable.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(lock::Mutex<T>);

impl<T> Mutex<T> {
    /// A mutex holding `value`; `const` in ordinary builds, so that a
    /// `static` can hold one.
    #[cfg(not(weakrefs_loom))]
    pub(crate) const fn new(value: T) -> Self {
        Mutex(lock::Mutex::new(value))
    }

    /// A mutex holding `value` (loom's are made per model execution).
    #[cfg(weakrefs_loom)]
    pub(crate) fn new(value: T) -> Self {
        Mutex(lock::Mutex::new(value))
    }

    /// Locks, waiting as long as it takes.
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Locks if nobody holds the lock, this thread included; never waits.
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        match self.0.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// A condition variable for [`Mutex`], ignoring poisoning as it does.
#[derive(Debug, Default)]
pub(crate) struct Condvar(lock::Condvar);

impl Condvar {
    pub(crate) fn new() -> Self {
        Condvar(lock::Condvar::new())
    }

    /// Unlocks `guard`, waits for a notification (or a spurious wake-up),
    /// and locks again.
    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0
            .wait(guard)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`Self::wait`], for at most `timeout`.
    #[cfg(not(weakrefs_loom))]
    pub(crate) fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: std::time::Duration,
    ) -> MutexGuard<'a, T> {
        match self.0.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }

    /// Wakes one waiter (the shard lock's loom model of a futex).
    #[cfg(all(weakrefs_loom, test))]
    pub(crate) fn notify_one(&self) {
        self.0.notify_one();
    }
}

/// Parking for the finalizer thread: crossbeam-utils switches it to loom's
/// primitives under `--cfg crossbeam_loom`.
pub(crate) use crossbeam_utils::sync::{Parker, Unparker};

/// Pads a value to its own cache line (crossbeam-utils).
pub(crate) use crossbeam_utils::CachePadded;

/// A cell whose contents are reached only through closures, so that loom
/// can check every access (tokio's `UnsafeCell` shape). In ordinary builds
/// it is `core::cell::UnsafeCell` and the closures inline away.
#[cfg(not(weakrefs_loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(weakrefs_loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        UnsafeCell(std::cell::UnsafeCell::new(value))
    }

    /// Calls `f` with a pointer through which it may write; the caller
    /// guarantees exclusivity.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }

    /// Calls `f` with a pointer through which it may read; the caller
    /// guarantees that no write races it.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(weakrefs_loom)]
pub(crate) use loom::cell::UnsafeCell;

/// Issues an Acquire fence that synchronises with the Release operations
/// that preceded the value `$atomic` holds now.
///
/// ThreadSanitizer does not model fences, so under `--cfg weakrefs_tsan` the
/// fence becomes an Acquire load of the same atomic: a stronger-or-equal
/// ordering for that one location, which is all the callers rely on (std's
/// `Arc` does the same with its `acquire!` macro).
macro_rules! acquire_fence {
    ($atomic:expr) => {{
        #[cfg(not(weakrefs_tsan))]
        {
            let _ = &$atomic;
            $crate::sync::fence($crate::sync::Ordering::Acquire);
        }
        #[cfg(weakrefs_tsan)]
        {
            let _ = $atomic.load($crate::sync::Ordering::Acquire);
        }
    }};
}
pub(crate) use acquire_fence;

/// Hint for a short busy wait (`Strong::get_mut`'s few-instruction
/// weak-count lock, and the shard lock's spins before it sleeps).
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(not(weakrefs_loom))]
    std::hint::spin_loop();
    // Under loom a spin must yield, or the model would explore an endless
    // schedule in which the lock holder never runs.
    #[cfg(weakrefs_loom)]
    loom::thread::yield_now();
}

/// Asks the processor to start loading the cache line that holds `at`,
/// for a load that will need it soon: a lookup that knows its next
/// addresses before it can use them overlaps their misses. A hint only: it
/// reads nothing and never faults, whatever the address, so `at` may be
/// dangling or out of bounds. A no-op but on x86-64, and under Miri and
/// loom.
#[inline(always)]
pub(crate) fn prefetch<T>(at: *const T) {
    #[cfg(all(target_arch = "x86_64", not(miri), not(weakrefs_loom)))]
    // `unused_unsafe`: a safe function on toolchains newer than the MSRV.
    #[allow(unused_unsafe)]
    // SAFETY: `_mm_prefetch` reads nothing and never faults (the hint is
    // dropped for an address that would fault); SSE, which it needs, is
    // part of x86-64's baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast::<i8>())
    };
    #[cfg(not(all(target_arch = "x86_64", not(miri), not(weakrefs_loom))))]
    let _ = at;
}

/// Gives the processor to another thread (a waiter whose lock holder may
/// be descheduled). Under loom, a model yield point.
#[inline]
pub(crate) fn yield_now() {
    #[cfg(not(weakrefs_loom))]
    std::thread::yield_now();
    #[cfg(weakrefs_loom)]
    loom::thread::yield_now();
}

/// Spins briefly (exponential backoff, then a few yields: crossbeam's
/// `Backoff::snooze`, some microseconds in all) until `ready` holds.
/// Returns whether it did. A consumer calls it before parking, so a steady
/// stream of work does not pay a park and a wake-up system call per item.
/// Under loom it only checks once: a model must not spin.
#[cfg(any(test, not(weakrefs_loom)))]
pub(crate) fn spin_briefly_until(ready: impl Fn() -> bool) -> bool {
    #[cfg(not(weakrefs_loom))]
    {
        let backoff = crossbeam_utils::Backoff::new();
        while !backoff.is_completed() {
            if ready() {
                return true;
            }
            backoff.snooze();
        }
    }
    ready()
}

/// Ends the process: the response to a reference count that would overflow,
/// as in std's `Arc`. Unwinding is not an option, since the count is already
/// corrupt for every other thread holding a handle.
#[cold]
#[inline(never)]
pub(crate) fn abort() -> ! {
    std::process::abort()
}

/// Leak and use-after-free detector for a counted allocation (a control
/// block, a callback node), which the model checker should see freed once,
/// after every reference's last use.
///
/// Under loom it holds loom's `Track`, so a model that leaks the allocation
/// fails, and a cell that each reference reads as it lets go
/// ([`Self::let_go`]) and the free writes (the drop), so loom checks that
/// every reference's last use happens-before the free: a counting protocol
/// whose free is not ordered after some holder's release (a Relaxed load
/// where an Acquire is needed, O5′, C13) fails the model. Elsewhere it is
/// a zero-sized marker that costs nothing.
#[cfg(weakrefs_loom)]
#[derive(Debug)]
pub(crate) struct LeakCheck {
    _track: loom::alloc::Track<()>,
    last_use: loom::cell::UnsafeCell<()>,
}

#[cfg(weakrefs_loom)]
impl LeakCheck {
    pub(crate) fn new(_: ()) -> Self {
        LeakCheck {
            _track: loom::alloc::Track::new(()),
            last_use: loom::cell::UnsafeCell::new(()),
        }
    }

    /// A reference to the allocation is let go: its last use.
    pub(crate) fn let_go(&self) {
        self.last_use.with(|_| ());
    }
}

// The cell is a probe, not state: a panic can leave nothing in it broken,
// so handles stay unwind-safe under loom as they are outside it.
#[cfg(weakrefs_loom)]
impl std::panic::UnwindSafe for LeakCheck {}
#[cfg(weakrefs_loom)]
impl std::panic::RefUnwindSafe for LeakCheck {}

#[cfg(weakrefs_loom)]
impl Drop for LeakCheck {
    /// The free: loom checks it against every `let_go`.
    fn drop(&mut self) {
        self.last_use.with_mut(|_| ());
    }
}

/// Zero-sized stand-in for loom's detector in ordinary builds.
#[cfg(not(weakrefs_loom))]
#[derive(Debug)]
pub(crate) struct LeakCheck(());

#[cfg(not(weakrefs_loom))]
impl LeakCheck {
    #[inline(always)]
    pub(crate) fn new(_: ()) -> Self {
        LeakCheck(())
    }

    /// Nothing outside loom.
    #[inline(always)]
    pub(crate) fn let_go(&self) {}
}

/// Thread-local storage that loom can see.
#[cfg(not(weakrefs_loom))]
pub(crate) use std::thread_local;

/// Thread-local storage that loom can see.
#[cfg(weakrefs_loom)]
pub(crate) use loom::thread_local;

/// Lazily initialised statics that loom re-creates for every model
/// execution (the process-wide collector and runtime under loom).
#[cfg(weakrefs_loom)]
pub(crate) use loom::lazy_static;

/// Under loom, a flag that a collection table's deferred release of its
/// shards and anchor sets, and every hook reads first (`Removal`'s run, and
/// `CoreRef::upgrade` on the slower way): a model then fails on a read
/// that the release precedes (an assertion) or races (loom's check of the
/// cell's accesses), either of which would read freed memory (M14).
/// Shared through a `std` `Arc`, whose count loom need not explore.
#[cfg(weakrefs_loom)]
pub(crate) type Released = std::sync::Arc<ReleasedFlag>;

#[cfg(weakrefs_loom)]
pub(crate) struct ReleasedFlag(UnsafeCell<bool>);

// SAFETY: loom checks every access to the cell for races (`Released`).
#[cfg(weakrefs_loom)]
unsafe impl Sync for ReleasedFlag {}

#[cfg(weakrefs_loom)]
impl ReleasedFlag {
    /// A flag not set yet.
    pub(crate) fn new() -> Released {
        Released::new(ReleasedFlag(UnsafeCell::new(false)))
    }

    /// Sets the flag: what it guards is about to be freed.
    pub(crate) fn set(&self) {
        // SAFETY: loom checks this write against every `check`'s read.
        self.0.with_mut(|released| unsafe { *released = true });
    }

    /// Fails the model if what the flag guards has been freed, or may be
    /// freed racing this read. `what` names it.
    pub(crate) fn check(&self, what: &str) {
        self.0.with(|released| {
            // SAFETY: loom checks this read against the `set`'s write.
            let released = unsafe { *released };
            assert!(!released, "a hook reached {what}");
        });
    }
}
