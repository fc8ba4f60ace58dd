//! The shard's writer lock: a futex lock released by a plain store
//! (SAFETY.md, section 10).
//!
//! A futex mutex such as std's releases with an atomic swap, to learn in
//! the same instruction whether a thread sleeps on it; on x86-64 that is a
//! locked instruction. Insert-then-die churn takes a shard's lock twice an
//! entry, and the two swaps took 11% of its time. `RawLock` releases
//! with a Release store and then reads a separate count of sleepers; a
//! thread about to sleep increments that count and runs a *heavy* barrier
//! (`membarrier`, which makes every running thread of the process pass a
//! full barrier), so the releasing side needs only a compiler fence. The
//! cost moves to contention: each sleep's barrier interrupts every
//! processor running a thread of the process, the holder's included, so a
//! waiter spins and then yields a while before it sleeps.
//!
//! Where the process may not use `membarrier` (refused by the kernel or a
//! seccomp filter, Miri, or `WEAKREFS_NO_MEMBARRIER` set in the
//! environment), both sides are SeqCst fences, the textbook pair. Under
//! loom, and off Linux, [`ShardLock`] is the crate's [`Mutex`]; the
//! protocol itself is model-checked here, in the fences mode.
//!
//! [`Mutex`]: crate::sync::Mutex

#[cfg(all(target_os = "linux", not(weakrefs_loom)))]
pub(crate) use linux::{asymmetric_barriers, process_barrier, ShardGuard, ShardLock};

/// The crate's mutex, where there is no futex to build on, and under loom,
/// where the table's models keep the state space they were written for.
#[cfg(any(not(target_os = "linux"), weakrefs_loom))]
pub(crate) type ShardLock<T> = crate::sync::Mutex<T>;
/// [`ShardLock`]'s guard.
#[cfg(any(not(target_os = "linux"), weakrefs_loom))]
pub(crate) type ShardGuard<'a, T> = crate::sync::MutexGuard<'a, T>;

#[cfg(any(all(target_os = "linux", not(weakrefs_loom)), all(weakrefs_loom, test)))]
mod protocol {
    use crate::sync::{compiler_fence, fence, spin_loop, AtomicU32, Ordering};

    /// Spins on a held lock before sleeping, as std's futex mutex does: a
    /// shard's critical sections are short but for rebuilds. None under
    /// loom, where a spin is a yield, after which loom runs the holder
    /// until it blocks: the models would never reach the sleep.
    const SPINS: u32 = if cfg!(weakrefs_loom) { 0 } else { 100 };
    /// Yields after the spins, before sleeping; none under loom. Without
    /// them, eight threads writing to 16 keys ran at 0.4-0.9x std's mutex
    /// (each sleep's `membarrier` interrupts the holder), with them at
    /// 1.03x: seven runs each on this repository's shared 2-core machine.
    const YIELDS: u32 = if cfg!(weakrefs_loom) { 0 } else { 8 };

    /// How the two sides of the barrier pair are made (L2, L3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    // Under loom only the fences mode is made.
    #[cfg_attr(weakrefs_loom, allow(dead_code))]
    pub(crate) enum Mode {
        /// The unlocker's side is a compiler fence, the sleeper's a
        /// `membarrier` system call.
        Asymmetric,
        /// Both sides are SeqCst fences.
        Fences,
        /// Tests only: the heavy side always fails, as a `membarrier`
        /// that errs would, so waiters never sleep (L3).
        #[cfg(test)]
        HeavyFails,
    }

    /// The lock word, the sleepers' count and the barrier mode: the
    /// protocol of SAFETY.md, section 10, without the guarded value.
    #[derive(Debug)]
    pub(crate) struct RawLock {
        /// 0 free, 1 held (L1).
        state: AtomicU32,
        /// Threads that may be asleep on `state`: each counted from just
        /// before its heavy barrier until it wakes or takes the lock. An
        /// unlock that reads it nonzero wakes one (L2).
        sleepers: AtomicU32,
        /// Read once, at construction (L3).
        mode: Mode,
        /// Where waiters sleep on `state`: the kernel's futex (no bytes),
        /// or under loom its model.
        futex: super::sleep::Futex,
    }

    impl RawLock {
        /// A free lock whose barrier pair is `mode`'s (L3).
        pub(crate) fn with_mode(mode: Mode) -> Self {
            RawLock {
                state: AtomicU32::new(0),
                sleepers: AtomicU32::new(0),
                mode,
                futex: super::sleep::Futex::new(),
            }
        }

        /// Takes the lock if it is free; never waits.
        #[inline]
        pub(crate) fn try_lock(&self) -> bool {
            // Acquire (L1): pairs with the Release store of the last
            // unlock, so its holder's writes happen before ours.
            self.state
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        }

        /// Takes the lock, waiting as long as it takes.
        #[inline]
        pub(crate) fn lock(&self) {
            if !self.try_lock() {
                self.lock_contended();
            }
        }

        #[cold]
        fn lock_contended(&self) {
            while !self.spin() {
                // Counted only while it may sleep: an unlock that reads the
                // count nonzero makes a system call to wake a sleeper.
                // Relaxed: the barrier pair orders it against unlocks (L2).
                self.sleepers.fetch_add(1, Ordering::Relaxed);
                // The heavy side, after the increment and before the read
                // of `state` that decides to sleep (L2). Where it fails, the
                // light side cannot be trusted alone: yield instead of
                // sleeping (L3).
                let held = if heavy(self.mode) {
                    let held = self.try_lock();
                    if !held {
                        // Sleeps unless `state` no longer reads 1.
                        self.futex.wait(&self.state, 1);
                    }
                    held
                } else {
                    crate::sync::yield_now();
                    false
                };
                // Relaxed: a stale count costs an unlock one spurious
                // wake-up at most (L2).
                self.sleepers.fetch_sub(1, Ordering::Relaxed);
                if held {
                    return;
                }
            }
        }

        /// Tries for the lock a while before the caller sleeps: `SPINS`
        /// spins, then `YIELDS` yields, which let a holder descheduled on
        /// this processor finish. Each sleep costs a heavy barrier, which
        /// interrupts every processor running this process's threads.
        fn spin(&self) -> bool {
            for round in 0..SPINS + YIELDS {
                // Relaxed: a hint; the compare-exchange decides.
                if self.state.load(Ordering::Relaxed) == 0 && self.try_lock() {
                    return true;
                }
                if round < SPINS {
                    spin_loop();
                } else {
                    crate::sync::yield_now();
                }
            }
            false
        }

        /// Releases the lock.
        ///
        /// # Safety
        ///
        /// The calling thread holds the lock, taken by [`Self::lock`] or
        /// [`Self::try_lock`] and not released since.
        #[inline]
        pub(crate) unsafe fn unlock(&self) {
            // Release (L1): pairs with the next holder's Acquire
            // compare-exchange.
            self.state.store(0, Ordering::Release);
            // The light side (L2): keeps the load below after the store.
            light(self.mode);
            // Relaxed: ordered by the barrier pair (L2).
            if self.sleepers.load(Ordering::Relaxed) != 0 {
                self.futex.wake_one(&self.state);
            }
        }
    }

    /// The unlocker's side of the pair (L2).
    #[inline(always)]
    fn light(mode: Mode) {
        match mode {
            // Only the compiler could move the load before the store; the
            // processor's reordering is what the heavy side undoes.
            Mode::Asymmetric => compiler_fence(Ordering::SeqCst),
            Mode::Fences => fence(Ordering::SeqCst),
            #[cfg(test)]
            Mode::HeavyFails => compiler_fence(Ordering::SeqCst),
        }
    }

    /// The sleeper's side of the pair (L2); false if it could not be made.
    fn heavy(mode: Mode) -> bool {
        match mode {
            Mode::Asymmetric => super::sleep::membarrier(),
            Mode::Fences => {
                fence(Ordering::SeqCst);
                true
            }
            #[cfg(test)]
            Mode::HeavyFails => false,
        }
    }
}

/// The system calls (Linux), or under loom a model of the futex.
#[cfg(any(all(target_os = "linux", not(weakrefs_loom)), all(weakrefs_loom, test)))]
mod sleep {
    use crate::sync::AtomicU32;

    /// `linux/membarrier.h`: not every `libc` release names them.
    #[cfg(not(weakrefs_loom))]
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    #[cfg(not(weakrefs_loom))]
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

    /// `membarrier(command, 0, 0)`; false if it failed, and always under
    /// Miri, which has no such call.
    #[cfg(not(weakrefs_loom))]
    fn membarrier_command(command: libc::c_int) -> bool {
        if cfg!(miri) {
            return false;
        }
        // SAFETY: a system call with integer arguments only; it reads and
        // writes no memory of ours.
        let result = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                command,
                0 as libc::c_uint,
                0 as libc::c_int,
            )
        };
        result == 0
    }

    /// Registers the process for private expedited `membarrier`s; false
    /// where the kernel or a sandbox refuses, under Miri, and where
    /// `WEAKREFS_NO_MEMBARRIER` is set: a seccomp policy that kills a
    /// process for a call it does not list, rather than failing the call,
    /// would otherwise kill it here.
    #[cfg(not(weakrefs_loom))]
    pub(super) fn register_membarrier() -> bool {
        std::env::var_os("WEAKREFS_NO_MEMBARRIER").is_none()
            && membarrier_command(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)
    }

    /// Makes every running thread of the process pass a full memory
    /// barrier before it returns; false if the call failed. Only after a
    /// successful [`register_membarrier`].
    #[cfg(not(weakrefs_loom))]
    pub(super) fn membarrier() -> bool {
        membarrier_command(MEMBARRIER_CMD_PRIVATE_EXPEDITED)
    }

    /// Under loom the asymmetric mode is never chosen.
    #[cfg(weakrefs_loom)]
    pub(super) fn membarrier() -> bool {
        unreachable!("loom models run the fences mode")
    }

    /// The kernel's futex, which needs no state of ours: the word is the
    /// address it queues sleepers by.
    #[cfg(not(weakrefs_loom))]
    #[derive(Debug)]
    pub(super) struct Futex;

    #[cfg(not(weakrefs_loom))]
    impl Futex {
        pub(super) fn new() -> Self {
            Futex
        }

        /// Sleeps while `word` reads `expected`, until woken or
        /// interrupted (the caller loops).
        pub(super) fn wait(&self, word: &AtomicU32, expected: u32) {
            // A null timeout waits without one; errors (the word changed,
            // a signal) return, and the caller loops.
            // SAFETY: `word` is a live, aligned 32-bit atomic for the call;
            // the kernel reads it atomically and writes nothing.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    word.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    expected,
                    std::ptr::null::<libc::timespec>(),
                );
            }
        }

        /// Wakes one thread sleeping in [`Self::wait`] on `word`, if any.
        #[cold]
        pub(super) fn wake_one(&self, word: &AtomicU32) {
            // SAFETY: as in `wait`; a wake reads no memory at `word`.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    word.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    1 as libc::c_int,
                );
            }
        }
    }

    /// A futex for loom: the check of the word and the sleep are one step
    /// under `parked`, as the kernel's are under its hash bucket's lock,
    /// and a wake takes that lock too, so none falls between them.
    #[cfg(weakrefs_loom)]
    pub(super) struct Futex {
        parked: crate::sync::Mutex<()>,
        wakes: crate::sync::Condvar,
    }

    #[cfg(weakrefs_loom)]
    impl std::fmt::Debug for Futex {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Futex")
        }
    }

    #[cfg(weakrefs_loom)]
    impl Futex {
        pub(super) fn new() -> Self {
            Futex {
                parked: crate::sync::Mutex::new(()),
                wakes: crate::sync::Condvar::new(),
            }
        }

        pub(super) fn wait(&self, word: &AtomicU32, expected: u32) {
            let parked = self.parked.lock();
            // Relaxed: the kernel's read; the caller's barrier orders it.
            if word.load(crate::sync::Ordering::Relaxed) == expected {
                drop(self.wakes.wait(parked));
            }
        }

        pub(super) fn wake_one(&self, _word: &AtomicU32) {
            let _parked = self.parked.lock();
            self.wakes.notify_one();
        }
    }
}

#[cfg(all(target_os = "linux", not(weakrefs_loom)))]
mod linux {
    use std::marker::PhantomData;
    use std::ops::{Deref, DerefMut};
    use std::sync::OnceLock;

    use super::protocol::{Mode, RawLock};
    use crate::sync::UnsafeCell;

    /// The barrier mode of every lock made from now on: asymmetric once
    /// the process has registered for `membarrier` (L3). Asked once.
    fn mode() -> Mode {
        static MODE: OnceLock<Mode> = OnceLock::new();
        *MODE.get_or_init(|| {
            if super::sleep::register_membarrier() {
                Mode::Asymmetric
            } else {
                Mode::Fences
            }
        })
    }

    /// Whether the process has registered for `membarrier`: the epoch
    /// collector's pins use the same asymmetric pair (SAFETY.md, E1).
    pub(crate) fn asymmetric_barriers() -> bool {
        mode() == Mode::Asymmetric
    }

    /// Makes every running thread of the process pass a full barrier;
    /// false if the call failed. Only where [`asymmetric_barriers`].
    pub(crate) fn process_barrier() -> bool {
        super::sleep::membarrier()
    }

    /// A mutex over `T` on [`RawLock`]; no poisoning, as the crate's
    /// `Mutex` ignores it (a shard's writer leaves its state consistent
    /// before any point that can panic).
    #[derive(Debug)]
    pub(crate) struct ShardLock<T> {
        raw: RawLock,
        value: UnsafeCell<T>,
    }

    // SAFETY: the lock hands out `&mut T` to one thread at a time (L1),
    // so sharing it sends the value between threads: `T: Send` suffices,
    // as for std's `Mutex`.
    unsafe impl<T: Send> Sync for ShardLock<T> {}

    impl<T> ShardLock<T> {
        /// A free lock over `value`.
        pub(crate) fn new(value: T) -> Self {
            ShardLock {
                raw: RawLock::with_mode(mode()),
                value: UnsafeCell::new(value),
            }
        }

        /// Locks, waiting as long as it takes.
        #[inline]
        pub(crate) fn lock(&self) -> ShardGuard<'_, T> {
            self.raw.lock();
            ShardGuard {
                lock: self,
                _not_send: PhantomData,
            }
        }

        /// Locks if nobody holds the lock, this thread included; never
        /// waits.
        #[inline]
        pub(crate) fn try_lock(&self) -> Option<ShardGuard<'_, T>> {
            // `then`, not `then_some`: a guard made for a failed try would
            // unlock the holder's lock as it drops.
            self.raw.try_lock().then(|| ShardGuard {
                lock: self,
                _not_send: PhantomData,
            })
        }
    }

    /// The lock, held until dropped. Not `Send`: the thread that locked
    /// unlocks, as with std's guards.
    pub(crate) struct ShardGuard<'a, T> {
        lock: &'a ShardLock<T>,
        _not_send: PhantomData<*const ()>,
    }

    impl<T> Deref for ShardGuard<'_, T> {
        type Target = T;

        #[inline]
        fn deref(&self) -> &T {
            // SAFETY: the guard holds the lock: nobody else reaches the
            // value until it is dropped (L1).
            self.lock.value.with(|value| unsafe { &*value })
        }
    }

    impl<T> DerefMut for ShardGuard<'_, T> {
        #[inline]
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: as in `deref`, and the guard is borrowed mutably.
            self.lock.value.with_mut(|value| unsafe { &mut *value })
        }
    }

    impl<T> Drop for ShardGuard<'_, T> {
        #[inline]
        fn drop(&mut self) {
            // SAFETY: the guard was made by a successful lock, and only its
            // drop unlocks.
            unsafe { self.lock.raw.unlock() }
        }
    }

    #[cfg(test)]
    pub(crate) fn mode_for_test() -> Mode {
        mode()
    }

    #[cfg(test)]
    impl<T> ShardLock<T> {
        /// A free lock over `value` with `mode`'s barrier pair, whatever
        /// the process registered.
        pub(crate) fn with_mode_for_test(value: T, mode: Mode) -> Self {
            ShardLock {
                raw: RawLock::with_mode(mode),
                value: UnsafeCell::new(value),
            }
        }
    }
}

#[cfg(all(test, target_os = "linux", not(weakrefs_loom)))]
mod tests {
    use super::protocol::Mode;
    use super::ShardLock;
    use std::sync::Barrier;

    /// Threads add to a plain counter under the lock, in each barrier
    /// mode, the one whose heavy side fails included (its waiters yield
    /// instead of sleeping, L3). A lost update would show in the total.
    #[test]
    fn contended_increments_are_exact() {
        let (threads, rounds) = if cfg!(miri) { (3, 30) } else { (4, 20_000) };
        for mode in [
            Mode::Fences,
            Mode::HeavyFails,
            super::linux::mode_for_test(),
        ] {
            let lock = ShardLock::with_mode_for_test(0u64, mode);
            let start = Barrier::new(threads);
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    scope.spawn(|| {
                        start.wait();
                        for i in 0..rounds {
                            let mut held = lock.lock();
                            *held += 1;
                            if i % 64 == 0 {
                                // Hold it across a yield, so waiters reach
                                // the sleeping path.
                                std::thread::yield_now();
                            }
                        }
                    });
                }
            });
            assert_eq!(*lock.lock(), (threads * rounds) as u64, "{mode:?}");
        }
    }

    /// Whether thread `tid` of this process is in a `futex` system call
    /// now, as `/proc` says (a thread on a processor reads `running`: not
    /// in one); `None` where `/proc` cannot be read.
    #[cfg(not(miri))]
    fn in_futex(tid: libc::c_long) -> Option<bool> {
        let path = format!("/proc/self/task/{tid}/syscall");
        let line = std::fs::read_to_string(path).ok()?;
        let number = line.split_whitespace().next()?.parse::<libc::c_long>();
        Some(number.is_ok_and(|number| number == libc::SYS_futex))
    }

    /// A waiter that went to sleep is woken by the unlock, in each mode
    /// whose waiters sleep: the holder unlocks only once `/proc` shows the
    /// waiter inside `futex`. A lost wake-up would leave the waiter
    /// asleep, which the watchdog reports; a waiter never seen asleep
    /// fails the test too, rather than passing it untested.
    #[cfg(not(miri))] // `/proc` and a watchdog thread: not under Miri.
    #[test]
    fn a_sleeping_waiter_is_woken_by_the_unlock() {
        use std::sync::{mpsc, Arc};
        use std::time::{Duration, Instant};
        // SAFETY: `gettid` takes no argument and cannot fail.
        let tid = || unsafe { libc::syscall(libc::SYS_gettid) };
        if in_futex(tid()).is_none() {
            eprintln!("skipped: /proc/self/task/*/syscall cannot be read here");
            return;
        }
        let mut modes = vec![Mode::Fences];
        if super::linux::mode_for_test() == Mode::Asymmetric {
            modes.push(Mode::Asymmetric);
        }
        for mode in modes {
            for _ in 0..20 {
                let lock = Arc::new(ShardLock::with_mode_for_test((), mode));
                let held = lock.lock();
                let (tid_tx, tid_rx) = mpsc::channel();
                let (done_tx, done_rx) = mpsc::channel();
                // Not scoped, and not joined before the watchdog: a waiter
                // left asleep must not hang the test.
                let waiter = {
                    let lock = Arc::clone(&lock);
                    std::thread::spawn(move || {
                        tid_tx.send(tid()).unwrap();
                        drop(lock.lock());
                        done_tx.send(()).unwrap();
                    })
                };
                let waiter_tid = tid_rx.recv().unwrap();
                let deadline = Instant::now() + Duration::from_secs(60);
                while in_futex(waiter_tid) != Some(true) {
                    assert!(
                        Instant::now() < deadline,
                        "{mode:?}: the waiter never went to sleep"
                    );
                    std::thread::yield_now();
                }
                drop(held);
                done_rx
                    .recv_timeout(Duration::from_secs(60))
                    .unwrap_or_else(|_| panic!("{mode:?}: the waiter was left asleep"));
                waiter.join().unwrap();
            }
        }
    }

    /// A failed try leaves the lock held: a second failed try fails too.
    #[test]
    fn try_lock_fails_while_held_and_succeeds_after() {
        let lock = ShardLock::new(7);
        let held = lock.lock();
        assert!(lock.try_lock().is_none());
        assert!(lock.try_lock().is_none());
        drop(held);
        assert_eq!(lock.try_lock().map(|held| *held), Some(7));
    }

    /// Off Miri, on a kernel and sandbox that allow `membarrier` (this
    /// repository's CI machines do), the fast mode is the one chosen.
    #[test]
    fn the_mode_is_asymmetric_where_membarrier_is_allowed() {
        let mode = super::linux::mode_for_test();
        if cfg!(miri) {
            assert_eq!(mode, Mode::Fences);
        } else if super::sleep::register_membarrier() {
            assert_eq!(mode, Mode::Asymmetric);
        }
    }
}

#[cfg(all(test, weakrefs_loom))]
mod loom_models {
    use super::protocol::{Mode, RawLock};
    use crate::sync::{AtomicUsize, Ordering};
    use loom::sync::Arc;

    /// Two threads increment a count with a load and a store under the
    /// lock: both increments land (L1).
    #[test]
    fn two_lockers_never_overlap() {
        loom::model(|| {
            let lock = Arc::new((RawLock::with_mode(Mode::Fences), AtomicUsize::new(0)));
            let other = lock.clone();
            let t = loom::thread::spawn(move || {
                other.0.lock();
                let n = other.1.load(Ordering::Relaxed);
                other.1.store(n + 1, Ordering::Relaxed);
                // SAFETY: locked just above.
                unsafe { other.0.unlock() };
            });
            lock.0.lock();
            let n = lock.1.load(Ordering::Relaxed);
            lock.1.store(n + 1, Ordering::Relaxed);
            // SAFETY: locked just above.
            unsafe { lock.0.unlock() };
            t.join().unwrap();
            assert_eq!(lock.1.load(Ordering::Relaxed), 2);
        });
    }

    /// A thread that finds the lock held goes to sleep (no spins under
    /// loom): the holder's unlock must wake it, or loom reports the
    /// deadlock (L2).
    #[test]
    fn a_waiter_is_never_left_asleep() {
        loom::model(|| {
            let lock = Arc::new(RawLock::with_mode(Mode::Fences));
            lock.lock();
            let other = lock.clone();
            let t = loom::thread::spawn(move || {
                other.lock();
                // SAFETY: locked just above.
                unsafe { other.unlock() };
            });
            // SAFETY: locked at the start.
            unsafe { lock.unlock() };
            t.join().unwrap();
            assert!(lock.try_lock());
        });
    }

    /// Two waiters race for a held lock: each unlock wakes one sleeper,
    /// and a woken waiter that loses the race sleeps again, so both end
    /// up holding it (L2, several waiters).
    #[test]
    fn two_waiters_are_both_woken() {
        loom::model(|| {
            let lock = Arc::new(RawLock::with_mode(Mode::Fences));
            lock.lock();
            let waiters: Vec<_> = (0..2)
                .map(|_| {
                    let lock = lock.clone();
                    loom::thread::spawn(move || {
                        lock.lock();
                        // SAFETY: locked just above.
                        unsafe { lock.unlock() };
                    })
                })
                .collect();
            // SAFETY: locked at the start.
            unsafe { lock.unlock() };
            for waiter in waiters {
                waiter.join().unwrap();
            }
            assert!(lock.try_lock());
        });
    }
}
