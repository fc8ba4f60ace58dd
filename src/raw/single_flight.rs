//! Single-flight loads, shared by both maps (SAFETY.md, M6 and K6).
//!
//! A load is registered under a shard's writer lock by the first caller
//! that finds no live entry for its key; later callers for that key find
//! the load under the same lock and park on it. The leader runs `init`
//! outside every lock and settles the load under the writer lock, in the
//! same critical section that publishes the entry, so no caller can find
//! neither the load nor the entry.

use std::sync::PoisonError;

use crate::strong::Strong;
use crate::sync::{current_thread_id, Condvar, Mutex, MutexGuard, ThreadId};

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
    leader: ThreadId,
    state: Mutex<State<R>>,
    settled: Condvar,
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
        self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Under shard `shard`'s writer lock, after the caller found no live
    /// entry: joins the load in flight whose key is `same` as `key`, or
    /// registers a new one led by this thread, moving `key` into it.
    ///
    /// # Panics
    ///
    /// If the load found is led by this very thread (its `init` asked for
    /// its own key, and would wait for itself), with a message naming
    /// `method`.
    pub(crate) fn join_or_lead(
        &self,
        shard: usize,
        hash: u64,
        key: &mut Option<Q>,
        same: impl Fn(&Q, &Q) -> bool,
        method: &str,
    ) -> Joined<Q, R> {
        let wanted = key.as_ref().expect("a caller keeps its key until it leads");
        let mut loads = self.shard(shard);
        let in_flight = loads.iter().find(|load| {
            load.hash == hash
                && load
                    .key
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                    .is_some_and(|theirs| same(theirs, wanted))
        });
        if let Some(load) = in_flight {
            assert!(
                load.leader != current_thread_id(),
                "{method}: the init closure for a key requested the same key (it would wait for itself)"
            );
            return Joined::Wait(load.clone());
        }
        let load = Strong::new(Flight {
            hash,
            key: Mutex::new(key.take()),
            leader: current_thread_id(),
            state: Mutex::new(State::Running),
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
        load.key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
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
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let outcome = loop {
            match &*state {
                State::Running => {
                    state = self
                        .settled
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                State::Done(outcome) => break outcome.clone(),
                State::Failed => return None,
            }
        };
        drop(state);
        Some(R::clone(&outcome))
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
        let settled = match self.outcome.take() {
            Some(outcome) => State::Done(Strong::new(outcome)),
            None => State::Failed,
        };
        let mut state = self
            .load
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *state = settled;
        self.load.settled.notify_all();
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
    /// Settles the load as failed unless disarmed: covers `Err` and panics
    /// in `init` alike.
    struct FailOnDrop<'f, Q, R, T, F: Fn(&Strong<Flight<Q, R>>, Option<T>) -> Option<R>> {
        finish: &'f F,
        load: Option<Strong<Flight<Q, R>>>,
        made: std::marker::PhantomData<fn(T)>,
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

    let mut guard = FailOnDrop {
        finish: &finish,
        load: Some(load),
        made: std::marker::PhantomData,
    };
    let made = init()?;
    let load = guard.load.take().expect("armed until here");
    Ok(finish(&load, Some(made)).expect("a successful load settles with an outcome"))
}
