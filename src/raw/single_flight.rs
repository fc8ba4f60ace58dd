//! Single-flight loads, shared by both maps (SAFETY.md, M6 and K3).
//!
//! A load is registered under a shard's writer lock by the first caller
//! that finds no live entry for its key; later callers for that key find
//! the load under the same lock and park on it. The leader runs `init`
//! outside every lock and settles the load under the writer lock, in the
//! same critical section that publishes the entry, so no caller can find
//! neither the load nor the entry.
//!
//! Loads serve blocking callers (`get_or_insert_with`, which park on the
//! load's condition variable) and async ones (`*_async`, whose futures
//! register their wakers with the load) alike: settling a load notifies
//! both. An async leader's future may be dropped before its `init`
//! finishes; its guard then settles the load as failed, and a waiter
//! takes over.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::Context;
use std::task::{Poll, Waker};

use crate::strong::Strong;
use std::pin::pin;

use crate::marks::{self, Loading};
use crate::panics::{catch_and_report, FirstPanic};
use crate::sync::{Condvar, Mutex, MutexGuard};

/// Runs `body` (`init`, or one poll of an async `init`) with `load`
/// marked as running on this thread.
fn running<Q, R, T>(load: &Flight<Q, R>, blocking: bool, body: impl FnOnce() -> T) -> T {
    let load = load as *const Flight<Q, R> as usize;
    marks::loading(Loading { load, blocking }, body)
}

/// True if a caller on this thread that waits for `load` (blocking the
/// thread if `blocking`) would wait for itself: this thread is running the
/// load's `init` right now, and either the caller would block the thread
/// under it, or the `init` itself blocks (an async wait inside a blocking
/// `init` cannot finish before the `init` returns). An async wait inside
/// an async `init` is left alone: a `select!` may finish by another branch.
fn waits_for_itself<Q, R>(load: &Flight<Q, R>, blocking: bool) -> bool {
    let address = load as *const Flight<Q, R> as usize;
    marks::any_loading(|running| running.load == address && (blocking || running.blocking))
}

/// The loads in flight of every shard of one map, each list locked after
/// its shard's writer. `Q` is what a load keeps of its key; `R` is what
/// its callers receive.
pub(crate) struct Flights<Q, R> {
    shards: Box<[Mutex<InFlight<Q, R>>]>,
}

/// The loads in flight of one shard.
type InFlight<Q, R> = Vec<Strong<Flight<Q, R>>>;

/// One load in flight.
pub(crate) struct Flight<Q, R> {
    hash: u64,
    /// The key; the leader takes it when it settles the load.
    key: Mutex<Option<Q>>,
    state: Mutex<Settled<R>>,
    settled: Condvar,
}

/// A load's outcome so far, and the async waiters to wake when it comes.
struct Settled<R> {
    state: State<R>,
    wakers: Wakers,
}

/// The wakers of a load's async waiters, each in a slot its waiter owns
/// until it is woken or dropped: a waiter that goes away (its future
/// dropped, a `timeout`) frees its slot in O(1), so a load that hangs
/// holds memory for its live waiters only, and no dropped task's waker.
#[derive(Default)]
struct Wakers {
    slots: Vec<Option<Waker>>,
    /// Indices of the empty slots, reused first.
    free: Vec<usize>,
}

impl Wakers {
    /// Stores `waker` in slot `slot` (if the waiter has one) or in a new
    /// slot; returns the slot, and the waker it replaced, to be dropped
    /// after the unlock (a waker's drop is the executor's code).
    fn register(&mut self, slot: Option<usize>, waker: &Waker) -> (usize, Option<Waker>) {
        match slot {
            Some(slot) => {
                let replaced = match &mut self.slots[slot] {
                    Some(held) if held.will_wake(waker) => None,
                    other => other.replace(waker.clone()),
                };
                (slot, replaced)
            }
            None => {
                // Cloned first: the clone is the executor's code and may
                // panic, which must not take a free slot with it (the
                // slots would then never all be free, nor their memory
                // given back, until the load settles).
                let waker = Some(waker.clone());
                match self.free.pop() {
                    Some(slot) => {
                        self.slots[slot] = waker;
                        (slot, None)
                    }
                    None => {
                        self.slots.push(waker);
                        (self.slots.len() - 1, None)
                    }
                }
            }
        }
    }

    /// Frees `slot`, whose waiter went away; returns its waker, to be
    /// dropped after the unlock (a waker's drop is the executor's code).
    /// Gives the memory back once every slot is free.
    fn unregister(&mut self, slot: usize) -> Option<Waker> {
        let waker = self.slots[slot].take();
        self.free.push(slot);
        if self.free.len() == self.slots.len() {
            *self = Wakers::default();
        }
        waker
    }

    /// Every waiter's waker, leaving none.
    fn take_all(&mut self) -> impl Iterator<Item = Waker> {
        std::mem::take(self).slots.into_iter().flatten()
    }
}

enum State<R> {
    Running,
    /// Shared, so that waiters clone the outcome (user `Clone`, for
    /// `WeakKeyMap`) after unlocking the state.
    Done(Strong<R>),
    Failed,
}

/// What [`Flights::join_or_lead`] decided.
pub(crate) enum Joined<Q, R> {
    /// Another caller leads a load of the key: wait for it.
    Wait(Strong<Flight<Q, R>>),
    /// No load was in flight: ours is registered; run `init` and settle it.
    Lead(Strong<Flight<Q, R>>),
}

impl<Q: Send + Sync + 'static, R: Send + Sync + 'static> Flights<Q, R> {
    /// No loads, for a map of `shards` shards.
    pub(crate) fn new(shards: usize) -> Self {
        Flights {
            shards: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    fn shard(&self, shard: usize) -> MutexGuard<'_, InFlight<Q, R>> {
        self.shards[shard].lock()
    }

    /// Under shard `shard`'s writer lock, after the caller found no live
    /// entry: joins the load in flight whose key is `same` as `key`, or
    /// registers a new one led by this caller, moving `key` into it.
    /// `blocking` says whether the caller would block its thread (rather
    /// than await) to wait or lead.
    ///
    /// # Panics
    ///
    /// If the caller would wait for itself (`waits_for_itself`: an `init`
    /// running on this thread asked for its own key), with a message
    /// naming `method`.
    pub(crate) fn join_or_lead(
        &self,
        shard: usize,
        hash: u64,
        key: &mut Option<Q>,
        same: impl Fn(&Q, &Q) -> bool,
        method: &str,
        blocking: bool,
    ) -> Joined<Q, R> {
        let wanted = key.as_ref().expect("a caller keeps its key until it leads");
        let mut loads = self.shard(shard);
        let in_flight = loads.iter().find(|load| {
            load.hash == hash
                && load
                    .key
                    .lock()
                    .as_ref()
                    .is_some_and(|theirs| same(theirs, wanted))
        });
        if let Some(load) = in_flight {
            assert!(
                !waits_for_itself(load, blocking),
                "{method}: the init closure for a key requested the same key (it would wait for itself)"
            );
            return Joined::Wait(load.clone());
        }
        let load = Strong::new(Flight {
            hash,
            key: Mutex::new(key.take()),
            state: Mutex::new(Settled {
                state: State::Running,
                wakers: Wakers::default(),
            }),
            settled: Condvar::new(),
        });
        loads.push(load.clone());
        Joined::Lead(load)
    }

    /// Under shard `shard`'s writer lock: withdraws `load`, so later
    /// callers find the entry (or nothing) instead. Returns its key.
    pub(crate) fn withdraw(&self, shard: usize, load: &Strong<Flight<Q, R>>) -> Option<Q> {
        self.shard(shard)
            .retain(|other| !Strong::ptr_eq(other, load));
        load.key.lock().take()
    }
}

impl<Q, R: Clone> Flight<Q, R> {
    /// The hash of the load's key.
    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }

    /// Parks until the leader settles the load: its outcome, or `None` if
    /// it failed (the caller then retries, perhaps as the leader).
    pub(crate) fn wait(&self) -> Option<R> {
        let mut settled = self.state.lock();
        let outcome = loop {
            match &settled.state {
                State::Running => {
                    settled = self.settled.wait(settled);
                }
                State::Done(outcome) => break outcome.clone(),
                State::Failed => return None,
            }
        };
        drop(settled);
        Some(R::clone(&outcome))
    }

    /// [`wait`](Self::wait) without blocking the thread: the future
    /// registers its task's waker with the load, which settling wakes. A
    /// future dropped before that takes its waker back out (F4).
    pub(crate) fn wait_async(&self) -> Waiting<'_, Q, R> {
        Waiting {
            load: self,
            slot: None,
        }
    }
}

/// An async waiter of a load: [`Flight::wait_async`]'s future.
pub(crate) struct Waiting<'l, Q, R> {
    load: &'l Flight<Q, R>,
    /// Its slot in the load's wakers, once it has registered.
    slot: Option<usize>,
}

impl<Q, R: Clone> Future for Waiting<'_, Q, R> {
    type Output = Option<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut settled = self.load.state.lock();
        let outcome = match &settled.state {
            State::Running => {
                let (slot, replaced) = settled.wakers.register(self.slot, cx.waker());
                drop(settled);
                drop(replaced);
                self.slot = Some(slot);
                return Poll::Pending;
            }
            State::Done(outcome) => outcome.clone(),
            State::Failed => {
                drop(settled);
                self.slot = None;
                return Poll::Ready(None);
            }
        };
        drop(settled);
        // Settling took every waker: the slot is gone with them.
        self.slot = None;
        Poll::Ready(Some(R::clone(&outcome)))
    }
}

impl<Q, R> Drop for Waiting<'_, Q, R> {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let mut settled = self.load.state.lock();
        // Once settled, the wakers were taken (and woken): nothing of ours
        // is left to free.
        let waker = match settled.state {
            State::Running => settled.wakers.unregister(slot),
            _ => None,
        };
        drop(settled);
        drop(waker);
    }
}

/// Settles a load when dropped: `Done` with the outcome set, else `Failed`
/// (also when a panic unwinds through the settling), and wakes every
/// waiter, so none is stranded.
pub(crate) struct Settle<'l, Q, R> {
    load: &'l Flight<Q, R>,
    /// The outcome to publish; `None` fails the load.
    pub(crate) outcome: Option<R>,
}

impl<'l, Q, R> Settle<'l, Q, R> {
    /// Settles `load` as failed unless an outcome is set before the drop.
    pub(crate) fn new(load: &'l Flight<Q, R>) -> Self {
        Settle {
            load,
            outcome: None,
        }
    }
}

impl<Q, R> Drop for Settle<'_, Q, R> {
    fn drop(&mut self) {
        let outcome = match self.outcome.take() {
            Some(outcome) => State::Done(Strong::new(outcome)),
            None => State::Failed,
        };
        let mut settled = self.load.state.lock();
        settled.state = outcome;
        let wakers: Vec<Waker> = settled.wakers.take_all().collect();
        drop(settled);
        self.load.settled.notify_all();
        // After the unlock: a waker may run its task right here. One that
        // panics must not keep the others asleep.
        for waker in wakers {
            catch_and_report("a waiting task's waker", || waker.wake());
        }
    }
}

/// Settles the load as failed unless disarmed: covers an `Err` or a panic
/// in `init` alike, and, for an async leader, its future being dropped.
struct FailOnDrop<'f, Q, R, T, F: Fn(&Strong<Flight<Q, R>>, Option<T>) -> Option<R>> {
    finish: &'f F,
    load: Option<Strong<Flight<Q, R>>>,
    made: std::marker::PhantomData<fn(T)>,
}

impl<'f, Q, R, T, F: Fn(&Strong<Flight<Q, R>>, Option<T>) -> Option<R>> FailOnDrop<'f, Q, R, T, F> {
    /// Armed for `load`, which `finish` settles.
    fn arm(load: Strong<Flight<Q, R>>, finish: &'f F) -> Self {
        FailOnDrop {
            finish,
            load: Some(load),
            made: std::marker::PhantomData,
        }
    }

    /// The load, while armed.
    fn load(&self) -> &Flight<Q, R> {
        self.load.as_ref().expect("armed until `finish`")
    }

    /// Disarms the guard and settles the load with what `init` made.
    fn finish(mut self, made: T) -> R {
        let load = self.load.take().expect("armed until here");
        // Publishing runs user code (a listener, the destructor of a value
        // the tier lets go of, a copy the load does not need), and so does
        // our handle's drop if it is the load's last (the load's key and
        // its copy of the outcome): each a step on its own, the outcome
        // dropped too if one panicked, the first panic resumed once our
        // handle is gone (`FirstPanic::hand_back`), never during an
        // unwinding that would drop it.
        let mut panics = FirstPanic::default();
        let mut outcome = None;
        panics.run("a load's publication", || {
            outcome = (self.finish)(&load, Some(made));
        });
        panics.drop_step("a finished load's destructor", load);
        match outcome {
            Some(outcome) => panics.hand_back("a loaded value's destructor", outcome),
            None => {
                panics.resume();
                unreachable!("a successful load settles with an outcome")
            }
        }
    }
}

impl<Q, R, T, F: Fn(&Strong<Flight<Q, R>>, Option<T>) -> Option<R>> FailOnDrop<'_, Q, R, T, F> {
    /// Settles the load as failed before `error`, what `init` returned, is
    /// handed back: settling drops the load's key (user code), and a panic
    /// there drops `error` too, on its own, rather than during the
    /// unwinding (`FirstPanic::hand_back`).
    fn fail<E>(self, error: E) -> E {
        let mut panics = FirstPanic::default();
        panics.drop_step("a failed load's destructor", self);
        panics.hand_back("a load's error's destructor", error)
    }
}

impl<Q, R, T, F: Fn(&Strong<Flight<Q, R>>, Option<T>) -> Option<R>> Drop
    for FailOnDrop<'_, Q, R, T, F>
{
    fn drop(&mut self) {
        if let Some(load) = self.load.take() {
            let _ = (self.finish)(&load, None);
        }
    }
}

/// Runs `init` as the leader of `load`, then `finish(load, Some(made))`,
/// which settles the load and returns the outcome everyone receives. If
/// `init` fails or panics, `finish(load, None)` settles the load as
/// failed (the waiters retry) and the error or panic reaches this caller
/// only.
pub(crate) fn lead<Q, R, T, E>(
    load: Strong<Flight<Q, R>>,
    init: impl FnOnce() -> Result<T, E>,
    finish: impl Fn(&Strong<Flight<Q, R>>, Option<T>) -> Option<R>,
) -> Result<R, E> {
    let guard = FailOnDrop::arm(load, &finish);
    let made = running(guard.load(), true, init);
    match made {
        Ok(made) => Ok(guard.finish(made)),
        Err(error) => Err(guard.fail(error)),
    }
}

/// [`lead`] for an async `init`. If this future is dropped before `init`
/// completes, the load is settled as failed and a waiter takes it over.
pub(crate) async fn lead_async<Q, R, T, E>(
    load: Strong<Flight<Q, R>>,
    init: impl Future<Output = Result<T, E>>,
    finish: impl Fn(&Strong<Flight<Q, R>>, Option<T>) -> Option<R>,
) -> Result<R, E> {
    let guard = FailOnDrop::arm(load, &finish);
    let mut init = pin!(init);
    let made = poll_fn(|cx| running(guard.load(), false, || init.as_mut().poll(cx))).await;
    match made {
        Ok(made) => Ok(guard.finish(made)),
        Err(error) => Err(guard.fail(error)),
    }
}

/// Loom model (SAFETY.md, M6, F4): an async waiter that registers with a
/// load and is then dropped, racing the leader settling it. Whichever
/// comes first, the waiter's waker is released exactly once (by the drop
/// that frees its slot, or by the settling that takes and wakes it), and
/// nothing is left registered. Run by `.ci/loom`.
#[cfg(all(test, weakrefs_loom))]
mod loom_models {
    use super::*;
    use loom::thread;
    use std::sync::Arc;
    use std::task::{Context, Wake};

    struct Noticed;

    impl Wake for Noticed {
        fn wake(self: Arc<Self>) {}
    }

    #[test]
    fn a_dropped_waiter_races_the_settling() {
        loom::model(|| {
            let flights: Flights<u8, u8> = Flights::new(1);
            let Joined::Lead(load) =
                flights.join_or_lead(0, 7, &mut Some(7), |a, b| a == b, "model", false)
            else {
                unreachable!("no load was in flight");
            };
            let wake = Arc::new(Noticed);
            let waiter = {
                let (load, wake) = (load.clone(), wake.clone());
                thread::spawn(move || {
                    let waker = Waker::from(wake);
                    let mut waiting = load.wait_async();
                    let poll = Pin::new(&mut waiting).poll(&mut Context::from_waker(&waker));
                    // Pending (registered) or ready (settled first); either
                    // way the future goes now, as a cancelled one does.
                    drop(waiting);
                    poll.is_ready()
                })
            };
            {
                let mut settle = Settle::new(&*load);
                settle.outcome = Some(5);
            }
            let _ready = waiter.join().unwrap();
            // Only ours is left: the waiter's handle went with its thread,
            // and the load holds no copy.
            assert_eq!(Arc::strong_count(&wake), 1);
            let settled = load.state.lock();
            assert!(settled.wakers.slots.is_empty());
        });
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::task::{RawWaker, RawWakerVTable};

    /// A waker whose `clone` panics; waking or dropping it does nothing.
    fn waker_whose_clone_panics() -> Waker {
        unsafe fn clone(_: *const ()) -> RawWaker {
            panic!("a waker's clone (expected by this test)")
        }
        unsafe fn ignore(_: *const ()) {}
        const VTABLE: RawWakerVTable = RawWakerVTable::new(clone, ignore, ignore, ignore);
        // SAFETY: no function of the vtable reads the data pointer, and
        // none has a contract to break: any data pointer will do.
        unsafe { Waker::from_raw(RawWaker::new(std::ptr::null(), &VTABLE)) }
    }

    /// A waiter whose waker panics as it is cloned takes no free slot
    /// with it: once every waiter has gone, the slots' memory is given
    /// back.
    #[test]
    fn a_waker_whose_clone_panics_takes_no_slot() {
        let mut wakers = Wakers::default();
        let (first, _) = wakers.register(None, Waker::noop());
        let (second, _) = wakers.register(None, Waker::noop());
        drop(wakers.unregister(second));
        let panicking = waker_whose_clone_panics();
        let registered = catch_unwind(AssertUnwindSafe(|| wakers.register(None, &panicking)));
        assert!(registered.is_err());
        drop(wakers.unregister(first));
        assert!(
            wakers.slots.is_empty() && wakers.free.is_empty(),
            "memory given back"
        );
    }
}
