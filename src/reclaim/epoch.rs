//! The epoch collector behind [`super::Reclaimer`]: a pin that is a plain
//! store, paid for by the rare thread that advances the epoch (SAFETY.md,
//! section 11).
//!
//! Every thread that reads shared memory owns a [`Record`] in its
//! collector's list and, while pinned, stores there the global epoch it
//! saw. Memory that a writer unlinks is *deferred* into the writer's bag;
//! a full bag is *sealed* with the global epoch of the moment and pushed
//! on the collector's garbage stack. The epoch advances by one only when
//! every pinned record shows the current epoch, and a bag sealed at `b`
//! runs once the epoch reaches `b + 3` (E2).
//!
//! Classic epoch reclamation (crossbeam-epoch's) makes each pin a full
//! barrier, on x86-64 a locked instruction: a quarter of a read's time in
//! a map that fits in cache. Here the pin's barrier is only a compiler
//! fence, and the thread about to scan the records runs the other side of
//! the pair, a `membarrier` system call that makes every running thread of
//! the process pass a full barrier (the shard lock's asymmetric pair,
//! section 10). The price is one more epoch of delay (three instead of
//! two) and a system call for each advance made while some thread's pins
//! are light; a thread attempts an advance once every few bags it seals,
//! spaced by what its last call cost. Threads that retire memory pin with
//! a SeqCst fence, so their own advances need no system call. Where the process
//! may not use `membarrier` (Miri, loom, a refusing kernel or sandbox),
//! both sides are SeqCst fences.

use std::cell::{Cell, RefCell};
use std::mem::{self, MaybeUninit};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use crate::sync::{fence, AtomicBool, AtomicPtr, AtomicUsize, CachePadded, Ordering};

/// Epochs a sealed bag waits where pins may be light: it runs once the
/// global epoch is this far past the one it was sealed with (E2).
const EXPIRY_LIGHT: usize = 3;
/// Epochs a sealed bag waits where every pin is fenced (E2).
const EXPIRY_FENCED: usize = 2;

/// The low bit of a record's state: set while its thread is pinned; the
/// rest is the epoch it pinned at. The global epoch counts in steps of
/// two, so that it and a state compare without shifts.
const PINNED: usize = 1;
/// One epoch, in the global counter's units.
const STEP: usize = 2;

/// The most bags a thread seals between two of its attempts to advance
/// the epoch. An attempt costs a `membarrier`, which interrupts every
/// processor running a thread of the process: 0.2 microseconds on this
/// repository's 2-core virtual machine when no other thread of the process
/// runs, 10 when one does. A thread therefore spaces its attempts by what
/// its last barrier cost ([`NANOS_PER_SEAL`]), up to this many bags (2 048
/// functions), which bounds the garbage it holds back.
const MAX_SEALS_PER_ADVANCE: usize = 64;

/// Nanoseconds of barrier paid for by each bag sealed between attempts: an
/// attempt whose barrier took `d` waits `d / NANOS_PER_SEAL` bags. At 32
/// functions a bag this keeps the barrier below about 2 nanoseconds a
/// deferred function, while a thread alone advances every few bags, so
/// that removed slots come back into use soon.
const NANOS_PER_SEAL: u64 = 64;

/// Room a bag is made with: the reclaimer seals every `FLUSH_EVERY` (32).
const BAG_CAPACITY: usize = 32;

/// How the two sides of the pin's barrier pair are made (E1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Barriers {
    /// The pin's side is a compiler fence, the advancer's a `membarrier`.
    Asymmetric,
    /// Both sides are SeqCst fences.
    Fences,
}

impl Barriers {
    /// Asymmetric where the process has registered for `membarrier` (the
    /// shard lock asks once for both).
    fn of_process() -> Self {
        #[cfg(all(target_os = "linux", not(weakrefs_loom)))]
        if crate::raw::shard_lock::asymmetric_barriers() {
            return Barriers::Asymmetric;
        }
        Barriers::Fences
    }

    /// Epochs a sealed bag waits (E2).
    fn expiry(self) -> usize {
        match self {
            Barriers::Asymmetric => EXPIRY_LIGHT,
            Barriers::Fences => EXPIRY_FENCED,
        }
    }

    /// Makes every running thread of the process pass a full barrier;
    /// false if the system call failed (then the epoch must not advance).
    /// Only for a collector whose pins may be light.
    fn process_barrier(self) -> bool {
        match self {
            #[cfg(all(target_os = "linux", not(weakrefs_loom)))]
            Barriers::Asymmetric => crate::raw::shard_lock::process_barrier(),
            #[cfg(not(all(target_os = "linux", not(weakrefs_loom))))]
            Barriers::Asymmetric => false,
            Barriers::Fences => unreachable!("no pin is light in the fences mode"),
        }
    }
}

/// Pins without a retirement after which a thread's pins turn light
/// (E1): a thread that only reads pays the fence once, a thread that
/// writes keeps fenced pins and spares the advances their `membarrier`.
const LIGHT_AFTER: u32 = 64;

/// A deferred function, stored inline when it fits in three words (a
/// drop's captures: a pointer or two and a count), boxed otherwise.
pub(crate) struct Deferred {
    call: unsafe fn(*mut u8),
    data: MaybeUninit<[usize; 3]>,
}

// SAFETY: `Guard::defer`'s caller promises the function may run on any
// thread (its precondition 1), which is all sending it needs.
unsafe impl Send for Deferred {}

impl Deferred {
    fn new<F: FnOnce()>(f: F) -> Self {
        let mut data = MaybeUninit::<[usize; 3]>::uninit();
        if mem::size_of::<F>() <= mem::size_of::<[usize; 3]>()
            && mem::align_of::<F>() <= mem::align_of::<[usize; 3]>()
        {
            /// Reads the function back out of `data` and calls it.
            unsafe fn call<F: FnOnce()>(raw: *mut u8) {
                // SAFETY: `raw` holds the `F` written below, read once
                // (`Deferred::run` consumes the `Deferred`).
                let f = unsafe { ptr::read(raw.cast::<F>()) };
                f();
            }
            // SAFETY: `F` fits in `data`'s size and alignment (checked).
            unsafe { ptr::write(data.as_mut_ptr().cast::<F>(), f) };
            Deferred {
                call: call::<F>,
                data,
            }
        } else {
            /// Reads the box back out of `data` and calls what it holds.
            unsafe fn call<F: FnOnce()>(raw: *mut u8) {
                // SAFETY: `raw` holds the `Box<F>` written below, read once.
                let f = unsafe { ptr::read(raw.cast::<Box<F>>()) };
                (*f)();
            }
            // SAFETY: a box is one word, aligned as `usize`.
            unsafe { ptr::write(data.as_mut_ptr().cast::<Box<F>>(), Box::new(f)) };
            Deferred {
                call: call::<F>,
                data,
            }
        }
    }

    /// Calls the function, once.
    fn run(mut self) {
        let call = self.call;
        // SAFETY: `data` holds the function `call` was made for, and `self`
        // is consumed, so it is read once.
        unsafe { call(self.data.as_mut_ptr().cast::<u8>()) }
    }
}

/// One thread's slot in a collector's list: its pin state.
struct Record {
    /// 0 while its thread is not pinned; the epoch it pinned at, with
    /// [`PINNED`] set, while it is.
    state: CachePadded<AtomicUsize>,
    /// Set while its thread's pins are light: a compiler fence, not a
    /// SeqCst fence, after the state store (E1).
    light: AtomicBool,
    /// Held by a live [`Local`]; a record is reused, never unlinked.
    taken: AtomicBool,
    /// The next record; written before this one is published, then fixed.
    next: *mut Record,
}

/// A sealed bag on the garbage stack.
struct SealedBag {
    /// The global epoch read after the bag's functions were deferred (E2).
    epoch: usize,
    items: Vec<Deferred>,
    next: *mut SealedBag,
}

impl SealedBag {
    /// Runs the bag's functions, frees it, and returns the next bag.
    ///
    /// # Safety
    ///
    /// `bag` came from `Box::into_raw` in [`Global::seal`] and is the
    /// caller's alone: taken off the stack, expired or left by a dropped
    /// collector.
    unsafe fn run(bag: *mut SealedBag, ran: &mut usize) -> *mut SealedBag {
        // SAFETY: the caller's.
        let bag = unsafe { Box::from_raw(bag) };
        for item in bag.items {
            item.run();
            *ran += 1;
        }
        bag.next
    }
}

/// A node of one of the collector's push-only stacks (the records, the
/// garbage), linked through its `next` field.
trait Linked {
    fn next(&mut self) -> &mut *mut Self;
}

impl Linked for Record {
    fn next(&mut self) -> &mut *mut Self {
        &mut self.next
    }
}

impl Linked for SealedBag {
    fn next(&mut self) -> &mut *mut Self {
        &mut self.next
    }
}

/// Pushes the chain `first ..= last` on the lock-free stack headed by
/// `stack`, publishing what the caller wrote to its nodes before: a
/// Release compare-exchange, for the Acquire load or swap that takes it.
///
/// # Safety
///
/// The chain is the caller's alone, linked through `next` from `first` to
/// `last`, and each node stays allocated once pushed for as long as the
/// stack can reach it.
unsafe fn push_chain<T: Linked>(stack: &AtomicPtr<T>, first: *mut T, last: *mut T) {
    // Relaxed: the compare-exchange below publishes.
    let mut head = stack.load(Ordering::Relaxed);
    loop {
        // SAFETY: the chain is still ours (precondition): unpublished.
        *unsafe { (*last).next() } = head;
        // Release: publishes the chain's fields (see above). Relaxed on
        // failure: the value read only seeds the next attempt.
        match stack.compare_exchange_weak(head, first, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return,
            Err(now) => head = now,
        }
    }
}

/// A collector: the global epoch, the records and the garbage.
pub(crate) struct Global {
    /// The epoch, in steps of [`STEP`].
    epoch: CachePadded<AtomicUsize>,
    /// A push-only list of records, freed with the collector.
    records: AtomicPtr<Record>,
    /// Sealed bags, a lock-free stack: pushed one at a time, taken whole.
    garbage: AtomicPtr<SealedBag>,
    barriers: Barriers,
}

// SAFETY: the raw pointers inside are the collector's own list nodes and
// bags, reached only through its atomics; the bags' functions may run on
// any thread (`Deferred: Send`).
unsafe impl Send for Global {}
// SAFETY: as for `Send`: every shared field is an atomic.
unsafe impl Sync for Global {}

impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Global")
            // Relaxed: a snapshot for display.
            .field("epoch", &(self.epoch.load(Ordering::Relaxed) / STEP))
            .field("barriers", &self.barriers)
            .finish_non_exhaustive()
    }
}

impl Global {
    fn new(barriers: Barriers) -> Self {
        Global {
            epoch: CachePadded::new(AtomicUsize::new(0)),
            records: AtomicPtr::new(ptr::null_mut()),
            garbage: AtomicPtr::new(ptr::null_mut()),
            barriers,
        }
    }

    /// The records in the list as its head reads now.
    fn records(&self) -> impl Iterator<Item = &Record> {
        // Acquire: pairs with the Release push of each record, so its
        // fields and `next` are read as written.
        let mut cursor = self.records.load(Ordering::Acquire);
        std::iter::from_fn(move || {
            let record = NonNull::new(cursor)?;
            // SAFETY: records live as long as the collector (E5), which
            // `&self` borrows.
            let record = unsafe { record.as_ref() };
            cursor = record.next;
            Some(record)
        })
    }

    /// Takes a free record, or adds one to the list.
    fn take_record(&self) -> NonNull<Record> {
        for record in self.records() {
            // Acquire: pairs with the Release of the last owner's giving
            // it back, after its last unpin.
            if !record.taken.load(Ordering::Relaxed)
                && record
                    .taken
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return NonNull::from(record);
            }
        }
        let record = Box::into_raw(Box::new(Record {
            state: CachePadded::new(AtomicUsize::new(0)),
            light: AtomicBool::new(false),
            taken: AtomicBool::new(true),
            next: ptr::null_mut(),
        }));
        // Its Release publishes the record's fields to the scans and
        // takers that load it (Acquire).
        // SAFETY: not yet published: ours alone, linked to nothing.
        unsafe { push_chain(&self.records, record, record) };
        // SAFETY: from `Box::into_raw`, never null.
        unsafe { NonNull::new_unchecked(record) }
    }

    /// Whether any record's pins are light, so that an advance needs the
    /// process-wide barrier (E1).
    fn any_light(&self) -> bool {
        // Acquire: pairs with the Release of a switch back to fenced pins
        // (or a give-back), so the state scan that follows reads the
        // record's pin made before it, or a later value (E1).
        self.records()
            .any(|record| record.light.load(Ordering::Acquire))
    }

    /// Seals `items` with the epoch of the moment and pushes them on the
    /// garbage stack (E2).
    fn seal(&self, items: Vec<Deferred>) {
        // SeqCst fence: orders every unlink before it (the functions'
        // memory was unlinked before they were deferred) before the heavy
        // barrier of any advance that reads an epoch later than the one
        // read below (E2).
        fence(Ordering::SeqCst);
        // Relaxed: ordered by the fence above.
        let epoch = self.epoch.load(Ordering::Relaxed);
        let bag = Box::into_raw(Box::new(SealedBag {
            epoch,
            items,
            next: ptr::null_mut(),
        }));
        // SAFETY: `bag` is ours until the push publishes it.
        unsafe { self.push_bags(bag, bag) };
    }

    /// Pushes the chain `first ..= last` on the garbage stack.
    ///
    /// # Safety
    ///
    /// The chain is the caller's, linked through `next` from `first` to
    /// `last`.
    unsafe fn push_bags(&self, first: *mut SealedBag, last: *mut SealedBag) {
        // Its Release publishes the bags and their functions' captures to
        // the collection that takes them (Acquire).
        // SAFETY: the chain is the caller's (precondition).
        unsafe { push_chain(&self.garbage, first, last) };
    }

    /// Advances the epoch by one if every pinned record shows the current
    /// one (E3). Returns what the heavy barrier cost, in nanoseconds (0 for
    /// a fence, and under loom, whose models must not depend on time).
    fn try_advance(&self) -> u64 {
        // Acquire: pairs with the Release of the advance that wrote it, so
        // the scan below reads every record no older than that advance's
        // scan did (E3).
        let epoch = self.epoch.load(Ordering::Acquire);
        // SeqCst: the advance's side of the pair with fenced pins, and
        // with the switch of a record to light pins (E1).
        fence(Ordering::SeqCst);
        let mut cost = 0;
        if self.barriers == Barriers::Asymmetric && self.any_light() {
            let start = std::time::Instant::now();
            let made = self.barriers.process_barrier();
            cost = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if !made {
                return cost;
            }
        }
        for record in self.records() {
            // Acquire: pairs with the Release of the record's last pin or
            // unpin, so whatever its thread read before that happens
            // before the functions this advance lets run (E4).
            let state = record.state.load(Ordering::Acquire);
            if state & PINNED != 0 && state & !PINNED != epoch {
                return cost;
            }
        }
        // Release: pairs with the Acquire loads of the epoch by later
        // advances and collections (E3, E4). A failure means a racing
        // advance moved it, from the same scan's verdict or a later one.
        let _ = self.epoch.compare_exchange(
            epoch,
            epoch.wrapping_add(STEP),
            Ordering::Release,
            Ordering::Relaxed,
        );
        cost
    }

    /// Runs every sealed bag that has expired (E2); returns how many
    /// functions ran.
    fn collect(&self) -> usize {
        // Relaxed: a hint; the swap below decides, and orders.
        if self.garbage.load(Ordering::Relaxed).is_null() {
            return 0;
        }
        // Acquire: pairs with the Release push of each bag.
        let mut list = self.garbage.swap(ptr::null_mut(), Ordering::Acquire);
        if list.is_null() {
            return 0;
        }
        // Acquire: pairs with the Release of the advance that wrote it
        // (E4). Read after the bags were taken, so no bag is newer.
        let now = self.epoch.load(Ordering::Acquire);
        // The taken chain splits in two: bags still waiting, pushed back
        // as one chain (first, last), and expired ones, run after.
        let mut kept: (*mut SealedBag, *mut SealedBag) = (ptr::null_mut(), ptr::null_mut());
        let mut due: *mut SealedBag = ptr::null_mut();
        while !list.is_null() {
            // SAFETY: the taken chain is ours alone.
            let bag = unsafe { &mut *list };
            list = bag.next;
            if now.wrapping_sub(bag.epoch) >= self.barriers.expiry() * STEP {
                bag.next = due;
                due = bag;
            } else {
                bag.next = kept.0;
                if kept.1.is_null() {
                    kept.1 = bag;
                }
                kept.0 = bag;
            }
        }
        if !kept.0.is_null() {
            // SAFETY: the kept chain is ours, linked from `kept.0` to
            // `kept.1`.
            unsafe { self.push_bags(kept.0, kept.1) };
        }
        // Run them only now, with the stack whole again: a function may
        // defer, seal and collect itself.
        let mut ran = 0;
        while !due.is_null() {
            // SAFETY: the due chain is ours alone, and expired (E2).
            due = unsafe { SealedBag::run(due, &mut ran) };
        }
        ran
    }
}

impl Drop for Global {
    fn drop(&mut self) {
        // Every `Local` holds the collector, so none is left: no thread is
        // pinned, and every bag may run.
        // Acquire: as in `collect`.
        let mut list = self.garbage.swap(ptr::null_mut(), Ordering::Acquire);
        let mut ran = 0;
        while !list.is_null() {
            // SAFETY: the stack's bags are ours alone now.
            list = unsafe { SealedBag::run(list, &mut ran) };
        }
        // Acquire: as in `take_record`.
        let mut cursor = self.records.swap(ptr::null_mut(), Ordering::Acquire);
        while !cursor.is_null() {
            // SAFETY: as above: the records are ours alone now.
            let record = unsafe { Box::from_raw(cursor) };
            cursor = record.next;
        }
    }
}

/// A thread's participation in one collector: its record, its pins and
/// the bag it fills. Shared by the thread's [`Handle`] and its guards,
/// freed when the last of them goes.
struct Local {
    global: Arc<Global>,
    record: NonNull<Record>,
    /// Live guards on this thread; nested pins keep the outermost's epoch.
    pins: Cell<usize>,
    /// Whether the [`Handle`] that made this is still alive.
    handle_alive: Cell<bool>,
    /// Functions deferred since the last seal.
    bag: RefCell<Vec<Deferred>>,
    /// Bags sealed since this thread last attempted an advance.
    seals: Cell<usize>,
    /// Bags to seal before the next attempt: what the last barrier cost.
    seals_per_advance: Cell<usize>,
    /// The epoch this thread last collected at: until it moves, nothing
    /// new has expired.
    collected_at: Cell<usize>,
    /// Pins since this thread last deferred anything.
    quiet_pins: Cell<u32>,
}

impl Local {
    #[inline]
    fn record(&self) -> &Record {
        // SAFETY: the record lives as long as the collector, which `global`
        // keeps (E5).
        unsafe { self.record.as_ref() }
    }

    /// Seals the bag, if anything is in it; attempts an advance when
    /// `force` says so or once enough bags were sealed since the last
    /// attempt; and collects, when forced or once the epoch has moved
    /// since this thread last did. Returns how many functions ran.
    fn flush(&self, force: bool) -> usize {
        let items = {
            let mut bag = self.bag.borrow_mut();
            (!bag.is_empty()).then(|| mem::replace(&mut *bag, Vec::with_capacity(BAG_CAPACITY)))
        };
        if let Some(items) = items {
            self.global.seal(items);
        }
        let seals = self.seals.get() + 1;
        if force || seals >= self.seals_per_advance.get() {
            self.seals.set(0);
            let cost = self.global.try_advance();
            let spacing = usize::try_from(cost / NANOS_PER_SEAL).unwrap_or(usize::MAX);
            self.seals_per_advance
                .set(spacing.clamp(1, MAX_SEALS_PER_ADVANCE));
        } else {
            self.seals.set(seals);
        }
        // Relaxed: a hint; `collect` reads the epoch again, Acquire.
        let now = self.global.epoch.load(Ordering::Relaxed);
        if force || now != self.collected_at.get() {
            self.collected_at.set(now);
            self.global.collect()
        } else {
            0
        }
    }

    /// Frees a `Local` whose handle and guards are all gone: its bag goes
    /// to the garbage stack, its record back to the list.
    ///
    /// # Safety
    ///
    /// `local` came from `Box::into_raw`, and nothing refers to it after.
    unsafe fn finalize(local: NonNull<Local>) {
        // SAFETY: the caller's.
        let local = unsafe { Box::from_raw(local.as_ptr()) };
        let items = mem::take(&mut *local.bag.borrow_mut());
        if !items.is_empty() {
            local.global.seal(items);
        }
        // Release, after the last unpin: an advance that reads this reads
        // that unpin too (E1, case iii), and the next owner starts with
        // fenced pins.
        local.record().light.store(false, Ordering::Release);
        // Release: pairs with the Acquire of the next taker, after this
        // thread's last unpin.
        local.record().taken.store(false, Ordering::Release);
    }
}

/// A collector that tests and loom models make their own, and the
/// process-wide one behind [`pin`].
#[derive(Clone, Debug)]
pub(crate) struct Collector {
    global: Arc<Global>,
}

impl Default for Collector {
    fn default() -> Self {
        Collector::new()
    }
}

impl Collector {
    /// A collector with the process's barrier pair.
    pub(crate) fn new() -> Self {
        Collector {
            global: Arc::new(Global::new(Barriers::of_process())),
        }
    }

    /// A collector with `barriers`, whatever the process registered.
    #[cfg(all(test, not(weakrefs_loom)))]
    pub(crate) fn with_barriers(barriers: Barriers) -> Self {
        Collector {
            global: Arc::new(Global::new(barriers)),
        }
    }

    /// The barrier pair its pins use.
    #[cfg(all(test, not(weakrefs_loom)))]
    pub(crate) fn barriers(&self) -> Barriers {
        self.global.barriers
    }

    /// Registers the calling thread.
    pub(crate) fn register(&self) -> Handle {
        let record = self.global.take_record();
        let local = Box::new(Local {
            global: self.global.clone(),
            record,
            pins: Cell::new(0),
            handle_alive: Cell::new(true),
            bag: RefCell::new(Vec::with_capacity(BAG_CAPACITY)),
            seals: Cell::new(0),
            seals_per_advance: Cell::new(1),
            collected_at: Cell::new(usize::MAX),
            quiet_pins: Cell::new(0),
        });
        Handle {
            // SAFETY: from a box, never null.
            local: unsafe { NonNull::new_unchecked(Box::into_raw(local)) },
        }
    }
}

/// A thread's registration with a collector. Not `Send`: its record and
/// bag are the thread's.
#[derive(Debug)]
pub(crate) struct Handle {
    local: NonNull<Local>,
}

impl Handle {
    /// Pins the thread (E1): a pointer loaded under the guard, and every
    /// guard nested in it, from a structure that still linked it stays
    /// valid until the outermost guard is dropped (E2).
    #[inline]
    pub(crate) fn pin(&self) -> Guard {
        // SAFETY: the handle keeps its `Local` alive.
        let local = unsafe { self.local.as_ref() };
        let pins = local.pins.get();
        local.pins.set(pins + 1);
        if pins == 0 {
            if local.is_light() {
                local.light_pin();
            } else {
                local.fenced_pin();
            }
        }
        Guard { local: self.local }
    }
}

impl Local {
    /// Whether this thread's pins are light. Relaxed: only this thread
    /// writes its record's flag.
    #[inline(always)]
    fn is_light(&self) -> bool {
        self.record().light.load(Ordering::Relaxed)
    }

    /// A light pin: the state store, then only a compiler fence. Only the
    /// compiler could move the loads before the store; the processor's
    /// reordering is what the advance's `membarrier` undoes (E1).
    #[inline(always)]
    fn light_pin(&self) {
        self.show_pinned();
        crate::sync::compiler_fence(Ordering::SeqCst);
    }

    /// Stores the epoch, pinned, into the record.
    #[inline(always)]
    fn show_pinned(&self) {
        // Relaxed: any epoch up to the current one is safe to show; an
        // older one only delays advances (E1, E3).
        let epoch = self.global.epoch.load(Ordering::Relaxed);
        // Release: so that an advance that reads this state also sees
        // everything the thread did before it, its last unpinned reads
        // included (E4).
        self.record().state.store(epoch | PINNED, Ordering::Release);
    }

    /// An outermost pin with a SeqCst fence, or, after [`LIGHT_AFTER`]
    /// such pins without a retirement, the switch to light pins (E1).
    #[inline(never)]
    fn fenced_pin(&self) {
        let quiet = self.quiet_pins.get().saturating_add(1);
        self.quiet_pins.set(quiet);
        if quiet >= LIGHT_AFTER && self.global.barriers == Barriers::Asymmetric {
            // Relaxed, then a SeqCst fence: an advance whose own fence
            // comes first may miss the flag, and then this thread's loads
            // from here on see everything before that fence (E1).
            self.record().light.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            self.light_pin();
        } else {
            self.show_pinned();
            // SeqCst: the pin's side of the pair with the advance's fence.
            fence(Ordering::SeqCst);
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle keeps its `Local` alive until here.
        let local = unsafe { self.local.as_ref() };
        local.handle_alive.set(false);
        if local.pins.get() == 0 {
            // SAFETY: no guard is left, and the handle is going.
            unsafe { Local::finalize(self.local) };
        }
    }
}

/// A pinned thread. Not `Send`: it unpins the thread that pinned.
#[derive(Debug)]
pub(crate) struct Guard {
    local: NonNull<Local>,
}

impl Guard {
    #[inline]
    fn local(&self) -> &Local {
        // SAFETY: a guard keeps its `Local` alive (`pins` above zero).
        unsafe { self.local.as_ref() }
    }

    /// Runs `f` once no thread pinned now can still read what it frees,
    /// from this thread's bag, once it is sealed.
    ///
    /// # Safety
    ///
    /// 1. `f` may run on any thread, at any later time, or never (a bag
    ///    still queued when the process exits): whatever it touches must
    ///    stay valid until it runs and be safe to touch from any thread.
    /// 2. What `f` frees has been unlinked, by a store that happens before
    ///    this call (E2).
    /// 3. `f` does not unwind: a panic in a collection would leak the
    ///    functions due after it.
    #[inline]
    pub(crate) unsafe fn defer(&self, f: impl FnOnce()) {
        let local = self.local();
        local.bag.borrow_mut().push(Deferred::new(f));
        local.quiet_pins.set(0);
        if local.is_light() {
            // A thread that retires pins with fences again, so that the
            // advances it needs cost no `membarrier`. Release: an advance
            // that reads this reads the current pin's state too (E1).
            local.record().light.store(false, Ordering::Release);
        }
    }

    /// Seals this thread's bag and runs what has expired, attempting an
    /// advance once enough bags were sealed since the last attempt.
    /// Returns how many functions ran.
    pub(crate) fn seal(&self) -> usize {
        self.local().flush(false)
    }

    /// Seals this thread's bag, attempts an advance and runs what has
    /// expired. Returns how many functions ran. Never runs a function
    /// deferred while this thread has been pinned (under this guard or an
    /// outer one): its bag is sealed at an epoch that the epoch cannot get
    /// two (three) past while this thread stays pinned (E3), which
    /// writers' loans rely on (SAFETY.md, M9).
    // Under loom only the models call it.
    #[cfg_attr(weakrefs_loom, allow(dead_code))]
    pub(crate) fn flush(&self) -> usize {
        self.local().flush(true)
    }
}

impl Drop for Guard {
    #[inline]
    fn drop(&mut self) {
        let local = self.local();
        let pins = local.pins.get() - 1;
        local.pins.set(pins);
        if pins == 0 {
            // Release: everything this thread read while pinned happens
            // before the functions of any advance that reads this (E4).
            local.record().state.store(0, Ordering::Release);
            if !local.handle_alive.get() {
                // SAFETY: the handle is gone and this was the last guard.
                unsafe { Local::finalize(self.local) };
            }
        }
    }
}

/// The process-wide collector and this thread's handle on it.
#[cfg(not(weakrefs_loom))]
mod process {
    use std::sync::OnceLock;

    use super::{Collector, Guard, Handle};

    /// The collector every public collection retires through.
    pub(crate) fn collector() -> &'static Collector {
        static COLLECTOR: OnceLock<Collector> = OnceLock::new();
        COLLECTOR.get_or_init(Collector::new)
    }

    std::thread_local! {
        static HANDLE: Handle = collector().register();
    }

    /// Pins the calling thread on the process-wide collector; during
    /// thread-local teardown, through a handle of its own for the pin.
    #[inline]
    pub(crate) fn pin() -> Guard {
        HANDLE
            .try_with(Handle::pin)
            .unwrap_or_else(|_| collector().register().pin())
    }
}

#[cfg(not(weakrefs_loom))]
pub(crate) use process::pin;

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicPtr;
    use std::sync::atomic::AtomicUsize as StdAtomicUsize;
    use std::sync::mpsc;

    impl Handle {
        /// Whether this thread's pins are light now.
        fn is_light(&self) -> bool {
            // SAFETY: the handle keeps its `Local` alive.
            unsafe { self.local.as_ref() }.is_light()
        }
    }

    /// Counts a drop.
    struct Dropped(Arc<StdAtomicUsize>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The modes this process can run: fenced pins always, light ones
    /// where `membarrier` is allowed.
    fn collectors() -> Vec<Collector> {
        let mut collectors = vec![Collector::with_barriers(Barriers::Fences)];
        if Collector::new().barriers() == Barriers::Asymmetric {
            collectors.push(Collector::with_barriers(Barriers::Asymmetric));
        }
        collectors
    }

    #[test]
    fn pins_turn_light_only_after_quiet_pins_and_back_on_a_retirement() {
        for collector in collectors() {
            let handle = collector.register();
            let light_allowed = collector.barriers() == Barriers::Asymmetric;
            for _ in 0..LIGHT_AFTER - 1 {
                drop(handle.pin());
            }
            assert!(!handle.is_light());
            drop(handle.pin());
            assert_eq!(handle.is_light(), light_allowed);
            let guard = handle.pin();
            // SAFETY: frees nothing.
            unsafe { guard.defer(|| {}) };
            assert!(!handle.is_light());
            drop(guard);
        }
    }

    #[test]
    fn a_light_reader_on_another_thread_keeps_retired_memory_alive() {
        for collector in collectors() {
            let drops = Arc::new(StdAtomicUsize::new(0));
            let (pinned_tx, pinned_rx) = mpsc::channel();
            let (done_tx, done_rx) = mpsc::channel::<()>();
            let reader = {
                let collector = collector.clone();
                std::thread::spawn(move || {
                    let handle = collector.register();
                    for _ in 0..=LIGHT_AFTER {
                        drop(handle.pin());
                    }
                    let light = handle.is_light();
                    let guard = handle.pin();
                    pinned_tx.send(light).unwrap();
                    done_rx.recv().unwrap();
                    drop(guard);
                })
            };
            let light = pinned_rx.recv().unwrap();
            assert_eq!(light, collector.barriers() == Barriers::Asymmetric);
            let writer = collector.register();
            {
                let guard = writer.pin();
                let dropped = Dropped(drops.clone());
                // SAFETY: the value is reachable by nobody.
                unsafe { guard.defer(move || drop(dropped)) };
            }
            for _ in 0..16 {
                writer.pin().flush();
            }
            // The reader pinned before the retirement and still is.
            assert_eq!(drops.load(Ordering::Relaxed), 0);
            done_tx.send(()).unwrap();
            reader.join().unwrap();
            for _ in 0..4 {
                writer.pin().flush();
            }
            assert_eq!(drops.load(Ordering::Relaxed), 1);
        }
    }

    #[test]
    fn a_bag_waits_two_advances_with_fenced_pins_and_three_with_light_ones() {
        for collector in collectors() {
            let drops = Arc::new(StdAtomicUsize::new(0));
            let handle = collector.register();
            {
                let guard = handle.pin();
                let dropped = Dropped(drops.clone());
                // SAFETY: the value is reachable by nobody.
                unsafe { guard.defer(move || drop(dropped)) };
            }
            // Each forced flush advances once (no other thread is pinned);
            // the first seals the bag at the epoch it found.
            let advances = collector.barriers().expiry();
            for flush in 1..=advances {
                handle.pin().flush();
                let expected = usize::from(flush == advances);
                assert_eq!(drops.load(Ordering::Relaxed), expected);
            }
        }
    }

    /// A node that a deferred function marks dead instead of freeing (the
    /// test frees them all at the end), so that a reader that could still
    /// reach a retired node after its function ran sees the mark.
    struct Node {
        dead: crate::sync::AtomicBool,
    }

    struct SendNode(*mut Node);
    // SAFETY: the node is atomics only.
    unsafe impl Send for SendNode {}

    #[test]
    fn light_readers_never_reach_a_node_whose_function_ran() {
        let rounds = if cfg!(miri) { 100 } else { 20_000 };
        for collector in collectors() {
            let first = Box::into_raw(Box::new(Node {
                dead: crate::sync::AtomicBool::new(false),
            }));
            let slot = Arc::new(AtomicPtr::new(first));
            let retired = Arc::new(std::sync::Mutex::new(vec![SendNode(first)]));
            let done = Arc::new(crate::sync::AtomicBool::new(false));
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let collector = collector.clone();
                    let slot = slot.clone();
                    let done = done.clone();
                    std::thread::spawn(move || {
                        let handle = collector.register();
                        let mut light = false;
                        let mut round = 0;
                        // Relaxed: only ends the loop.
                        while round < rounds || !done.load(Ordering::Relaxed) {
                            round += 1;
                            let guard = handle.pin();
                            light |= handle.is_light();
                            // Acquire: pairs with the writer's swap.
                            let node = slot.load(Ordering::Acquire);
                            // SAFETY: loaded under the pin; nodes are
                            // freed only at the end of the test.
                            let dead = unsafe { &*node }.dead.load(Ordering::Acquire);
                            assert!(!dead, "a pinned reader reached a node whose function ran");
                            drop(guard);
                        }
                        light
                    })
                })
                .collect();
            let writer = collector.register();
            for _ in 0..rounds / 4 {
                let new = Box::into_raw(Box::new(Node {
                    dead: crate::sync::AtomicBool::new(false),
                }));
                retired.lock().unwrap().push(SendNode(new));
                let guard = writer.pin();
                let old = SendNode(slot.swap(new, Ordering::AcqRel));
                // SAFETY: unlinked by the swap, which happens before; the
                // node lives until the end of the test.
                unsafe {
                    guard.defer(move || {
                        let old = old;
                        (*old.0).dead.store(true, Ordering::Release);
                    })
                };
                drop(guard);
                writer.pin().flush();
            }
            done.store(true, Ordering::Relaxed);
            let light: Vec<bool> = readers.into_iter().map(|r| r.join().unwrap()).collect();
            if collector.barriers() == Barriers::Asymmetric {
                assert!(light.iter().all(|&l| l), "the readers' pins turned light");
            }
            drop(writer);
            drop(collector);
            for node in retired.lock().unwrap().drain(..) {
                // SAFETY: every thread is done; each node is freed once.
                drop(unsafe { Box::from_raw(node.0) });
            }
        }
    }

    #[test]
    fn a_record_is_reused_after_its_thread_lets_go() {
        let collector = Collector::with_barriers(Barriers::Fences);
        let first = collector.register();
        // SAFETY: the handle keeps its `Local` alive.
        let record = unsafe { first.local.as_ref() }.record;
        drop(first);
        let second = collector.register();
        // SAFETY: as above.
        assert_eq!(unsafe { second.local.as_ref() }.record, record);
    }
}
