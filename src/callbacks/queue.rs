//! The queue of death batches, and the count of queued callbacks not yet
//! finished.
//!
//! * **Push.** When an object dies, the dying thread claims every alive
//!   entry of its callback list (C1) and pushes the chain, newest first, as
//!   one *batch* onto a Treiber stack ([`BatchQueue::push`]); a posted job
//!   is a batch of one. Producers never dereference a queued node.
//! * **Take.** Consumers take the whole stack with one compare-exchange to
//!   null ([`BatchQueue::take`]) and run the batches oldest first
//!   ([`Taken`]). Nobody pops one node at a time, so there is no ABA and no
//!   reclamation problem (C7).
//! * **Close.** `shutdown` swaps in a marker ([`BatchQueue::close`]), which
//!   takes every batch pushed before it; a push that finds the marker is
//!   refused, and its producer runs the chain inline instead. One location,
//!   ordered by its RMWs, decides each batch's fate (C9), so no callback is
//!   lost without adding a flag or a fence to the producers' path.
//! * **Pending.** The queue counts what was pushed and not yet finished
//!   (`pending`), on the head's cache line; `flush` waits for it to reach
//!   zero (C11).

use std::ptr;

use super::entry::Entry;
use crate::sync::{AtomicPtr, AtomicU64, Ordering};

/// The queue head after `shutdown`: producers that find it run their
/// callbacks inline (C9). Never a real entry's address.
fn closed() -> *mut Entry {
    ptr::dangling_mut()
}

/// The queue's head and the count of queued, unfinished callbacks, on one
/// cache line (the runtime pads it): producers and the consumer touch both
/// together, so keeping them apart would move two lines between cores per
/// death instead of one.
#[derive(Debug)]
pub(super) struct BatchQueue {
    /// Death batches, newest first; each is a chain through `object_next`,
    /// and batches link through their head's `queue_next`. Null when
    /// empty, `closed()` after `shutdown`.
    head: AtomicPtr<Entry>,
    /// Queued and not yet finished.
    pending: AtomicU64,
}

impl BatchQueue {
    pub(super) fn new() -> Self {
        BatchQueue {
            head: AtomicPtr::new(ptr::null_mut()),
            pending: AtomicU64::new(0),
        }
    }

    /// Counts the `count` callbacks of the chain at `batch` as pending and
    /// pushes the chain as one batch. Returns how many were pending just
    /// after the count (a snapshot, for backpressure, C18), or `None` if
    /// `shutdown` has closed the queue: the chain is not queued, and the
    /// caller runs it and then [`finish`](Self::finish)es its `count` (C9).
    ///
    /// # Safety
    ///
    /// 1. `batch` heads a chain of `count` claimed listed entries that the
    ///    caller owns (hooks run on the dying thread and are never queued,
    ///    C14).
    #[must_use = "a refused batch must be run by the caller"]
    pub(super) unsafe fn push(&self, batch: *mut Entry, count: u64) -> Option<u64> {
        // Relaxed: sequenced before the push, whose Release the consumer
        // acquires before it subtracts, so `pending` never underflows (C11).
        let pending = self.pending.fetch_add(count, Ordering::Relaxed) + count;
        // SAFETY: `batch` is a claimed listed node we own (1).
        let link = unsafe { Entry::queue_next(batch) };
        // Relaxed: the value only seeds the CAS.
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            if head == closed() {
                // Shutdown has closed the queue (C9): the caller runs the
                // chain, in the dying thread, and takes back our `pending`.
                return None;
            }
            // Relaxed: published by the CAS.
            link.store(head, Ordering::Relaxed);
            // Release (C7): publishes the batch to the consumer's swap.
            // Relaxed on failure: we only learn the new head (which may be
            // the closed marker) and retry.
            match self
                .head
                .compare_exchange_weak(head, batch, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return Some(pending),
                Err(actual) => head = actual,
            }
        }
    }

    /// Takes every batch queued so far, or `None` if there is none (or the
    /// queue is closed). Any thread may call it; each batch is taken once
    /// (C7).
    pub(super) fn take(&self) -> Option<Taken> {
        // Acquire (C7): pairs with the producers' Release push.
        let mut head = self.head.load(Ordering::Acquire);
        let newest_first = loop {
            if head.is_null() || head == closed() {
                return None;
            }
            // Acquire (C7): as above. Never swap blindly: after shutdown the
            // head is the closed marker, which must stay (C9).
            match self.head.compare_exchange_weak(
                head,
                ptr::null_mut(),
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(taken) => break taken,
                Err(actual) => head = actual,
            }
        };
        // SAFETY: the CAS took these batches; nobody else can reach them.
        Some(unsafe { Taken::new(newest_first) })
    }

    /// Closes the queue for good (C9) and takes what it held: every push
    /// from now on is refused. Called once, by the first `shutdown`.
    pub(super) fn close(&self) -> Taken {
        // The swap takes every batch pushed before it, and every push after
        // it finds the marker and runs inline.
        // AcqRel: Acquire pairs with the producers' Release pushes; Release
        // orders our earlier work before producers that see the marker.
        let taken = self.head.swap(closed(), Ordering::AcqRel);
        debug_assert!(taken != closed(), "the queue is closed once");
        // SAFETY: the swap took these batches; nobody else can reach them.
        unsafe { Taken::new(taken) }
    }

    /// True if batches are queued that no consumer has taken yet: a hint
    /// (the queue may change at once), for work that batches itself and
    /// for the worker's check before it parks.
    pub(super) fn has_queued_work(&self) -> bool {
        // Relaxed: a hint; nothing is read through the pointer, a taker's
        // swap does the synchronising, and a worker that misses a push
        // parks once, which the producer's unpark ends (C8).
        let head = self.head.load(Ordering::Relaxed);
        !head.is_null() && head != closed()
    }

    /// True once `shutdown` has closed the queue.
    pub(super) fn is_closed(&self) -> bool {
        // Acquire: pairs with the swap that closed the queue.
        self.head.load(Ordering::Acquire) == closed()
    }

    /// Records `count` queued callbacks as finished. True if that left
    /// nothing pending.
    pub(super) fn finish(&self, count: u64) -> bool {
        // AcqRel (C11): Release so a `flush` that sees the drop to zero
        // also sees the callbacks' effects; Acquire pairs with the
        // producers' increments.
        self.pending.fetch_sub(count, Ordering::AcqRel) == count
    }

    /// True if nothing queued is unfinished; a caller that sees it sees
    /// the finished callbacks' effects.
    pub(super) fn is_idle(&self) -> bool {
        // Acquire (C11): pairs with the AcqRel decrement that reached zero,
        // so the callbacks' effects are visible.
        self.pending.load(Ordering::Acquire) == 0
    }

    /// Queued and not yet finished, for the statistics.
    pub(super) fn pending(&self) -> u64 {
        // Relaxed: statistics.
        self.pending.load(Ordering::Relaxed)
    }
}

/// Batches a consumer took from the queue, yielded oldest death first.
/// Each yielded batch heads a chain of claimed entries that the consumer
/// now owns and must run, each once.
#[derive(Debug)]
pub(super) struct Taken {
    oldest_first: *mut Entry,
}

impl Taken {
    /// Reverses the taken stack, which holds the newest batch first.
    ///
    /// # Safety
    ///
    /// 1. `newest_first` is null or heads a stack of batches, linked
    ///    through their heads' `queue_next`, that the caller took from the
    ///    queue (C7) and hands over to the result.
    unsafe fn new(mut newest_first: *mut Entry) -> Self {
        let mut oldest_first = ptr::null_mut::<Entry>();
        while !newest_first.is_null() {
            // SAFETY: the batches are ours after the take (1), and their
            // heads are listed nodes (`push`'s 1).
            let link = unsafe { Entry::queue_next(newest_first) };
            // Relaxed: ours alone.
            let next = link.load(Ordering::Relaxed);
            link.store(oldest_first, Ordering::Relaxed);
            oldest_first = newest_first;
            newest_first = next;
        }
        Taken { oldest_first }
    }
}

impl Iterator for Taken {
    type Item = *mut Entry;

    /// The next batch. Its link is read before it is handed out, so the
    /// caller may run (and free) it at once.
    fn next(&mut self) -> Option<*mut Entry> {
        let batch = self.oldest_first;
        if batch.is_null() {
            return None;
        }
        // SAFETY: a batch head we own and have not handed out yet (`new`'s
        // 1), a listed node: alive until its chain is run. Relaxed: ours
        // alone.
        self.oldest_first = unsafe { Entry::queue_next(batch) }.load(Ordering::Relaxed);
        Some(batch)
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::super::entry::EntryRef;
    use super::*;

    /// A claimed job of one entry, as `Runtime::post` makes it, tagged by
    /// its address.
    fn job() -> *mut Entry {
        let [in_queue] = EntryRef::new_with_owners(|| {}, false);
        assert!(in_queue.claim());
        in_queue.into_link()
    }

    /// Runs a batch of one that the test took, giving back the queue's
    /// reference.
    fn run(batch: *mut Entry) {
        // SAFETY: a batch of one, claimed by `job` and ours after the take;
        // this is its one run.
        unsafe { EntryRef::from_link(batch).run_claimed(None) };
    }

    #[test]
    fn batches_come_out_oldest_first_and_count_as_pending() {
        let queue = BatchQueue::new();
        assert!(queue.take().is_none());
        assert!(!queue.has_queued_work());
        let jobs = [job(), job(), job()];
        for &batch in &jobs {
            // SAFETY: a claimed listed entry we own.
            assert!(unsafe { queue.push(batch, 1) }.is_some());
        }
        assert!(queue.has_queued_work());
        assert_eq!(queue.pending(), 3);
        let taken: Vec<_> = queue.take().expect("three batches").collect();
        assert_eq!(taken, jobs);
        assert!(queue.take().is_none(), "taken once");
        assert!(!queue.finish(2));
        assert!(!queue.is_idle());
        assert!(queue.finish(1));
        assert!(queue.is_idle());
        taken.into_iter().for_each(run);
    }

    #[test]
    fn closing_takes_what_was_queued_and_refuses_later_pushes() {
        let queue = BatchQueue::new();
        let early = job();
        // SAFETY: a claimed listed entry we own.
        assert!(unsafe { queue.push(early, 1) }.is_some());
        let taken: Vec<_> = queue.close().collect();
        assert_eq!(taken, [early]);
        assert!(queue.is_closed());
        assert!(!queue.has_queued_work());
        assert!(queue.take().is_none(), "the marker stays");
        let late = job();
        // SAFETY: as above.
        let refused = unsafe { queue.push(late, 1) }.is_none();
        assert!(refused, "refused after closing");
        assert_eq!(
            queue.pending(),
            2,
            "a refused push still counts until finished"
        );
        assert!(!queue.finish(1));
        assert!(queue.finish(1));
        run(early);
        run(late);
    }
}
