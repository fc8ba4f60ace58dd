//! The control block: one heap allocation holding the counts, the head of the
//! death-callback list, and the value.
//!
//! ```text
//!  Strong ─┐                       ┌──────────────── ControlBlock<T> ─────────────┐
//!  Strong ─┼──► NonNull ──────────►│ Header { strong, weak, callbacks } │ value  │
//!  Weak ───┘                       └──────────────────────────────────────────────┘
//! ```
//!
//! The protocol (SAFETY.md, invariants I1–I6):
//!
//! * `strong` counts `Strong` handles. The value is alive while it is nonzero
//!   and is dropped by the thread whose decrement takes it to zero. Once zero
//!   it stays zero: `upgrade` only increments a nonzero count.
//! * `weak` counts `Weak` handles plus one shared by all `Strong` handles
//!   together (the "implicit weak"). The thread whose decrement takes it to
//!   zero frees the allocation.
//! * `weak == WEAK_LOCKED` only inside `Strong::get_mut`'s uniqueness check.
//!
//! Code outside this file never touches the counts directly: it calls the
//! named transitions below, each of which documents its ordering.

use std::alloc::Layout;
use std::mem::ManuallyDrop;
use std::ptr::{self, NonNull};

use crate::callbacks::ObjectCallbacks;
use crate::sync::{acquire_fence, spin_loop, AtomicUsize, LeakCheck, Ordering};

/// Counts above this abort the process (I5). Half the address space: no
/// program can hold this many handles without leaking them with
/// `mem::forget`, and stopping there leaves `isize::MAX` of headroom for
/// the increments other threads make before they see the overflow.
const MAX_REFCOUNT: usize = isize::MAX as usize;

/// The value `weak` holds while `Strong::get_mut` checks uniqueness (I6).
const WEAK_LOCKED: usize = usize::MAX;

/// The type-independent part of a control block. `Weak` handles reach the
/// counts through `&Header` only, never through a reference that covers the
/// value, which may already be dropped (I4).
#[repr(C)]
pub(crate) struct Header {
    strong: AtomicUsize,
    weak: AtomicUsize,
    /// This object's death-callback list (two words), emptied at death.
    callbacks: ObjectCallbacks,
}

/// One allocation: header first (`repr(C)`), then the value.
#[repr(C)]
pub(crate) struct ControlBlock<T> {
    header: Header,
    /// Dropped in place by the last `Strong` (I2); the allocation itself is
    /// freed later by the last weak reference (I3), which must not drop it
    /// again, hence `ManuallyDrop`.
    value: ManuallyDrop<T>,
    leak_check: LeakCheck,
}

impl<T> ControlBlock<T> {
    /// Allocates a block holding `value` with one strong handle and the
    /// implicit weak handle.
    pub(crate) fn allocate(value: T) -> NonNull<Self> {
        let block = Box::new(ControlBlock {
            header: Header {
                strong: AtomicUsize::new(1),
                weak: AtomicUsize::new(1),
                callbacks: ObjectCallbacks::new(),
            },
            value: ManuallyDrop::new(value),
            leak_check: LeakCheck::new(()),
        });
        // `Box::leak` never returns null; the pointer keeps the Box's
        // provenance over the whole allocation.
        NonNull::from(Box::leak(block))
    }

    /// The header of the block at `this`.
    ///
    /// # Safety
    ///
    /// 1. `this` came from [`ControlBlock::allocate`] and the allocation is
    ///    still live, i.e. the caller owns a strong or weak reference to it.
    #[inline(always)]
    pub(crate) unsafe fn header<'a>(this: NonNull<Self>) -> &'a Header {
        // SAFETY: precondition 1 keeps the allocation live for as long as
        // the caller's reference, which bounds 'a. `&raw const` projects to
        // the header field alone, so no reference covers the value (I4).
        unsafe { &*ptr::addr_of!((*this.as_ptr()).header) }
    }

    /// A pointer to the value; dereferencing it is the caller's business.
    #[inline(always)]
    pub(crate) fn value_ptr(this: NonNull<Self>) -> *mut T {
        // `addr_of_mut!` projects without creating a reference, and
        // `ManuallyDrop<T>` is `repr(transparent)` over `T`.
        // SAFETY: the projection stays inside the allocation `this` points
        // at; `addr_of_mut!` on a raw place reads nothing.
        unsafe { ptr::addr_of_mut!((*this.as_ptr()).value).cast::<T>() }
    }

    /// The block whose value `value` points at: the inverse of
    /// [`value_ptr`](Self::value_ptr).
    ///
    /// # Safety
    ///
    /// 1. `value` came from `value_ptr` of a block that is still allocated.
    #[inline(always)]
    pub(crate) unsafe fn from_value_ptr(value: *const T) -> NonNull<Self> {
        let offset = std::mem::offset_of!(ControlBlock<T>, value);
        // SAFETY: by 1, `value` is `offset` bytes into a live allocation
        // and carries its provenance (`value_ptr` projects from the block
        // pointer); stepping back stays inside it and is not null.
        unsafe { NonNull::new_unchecked(value.byte_sub(offset).cast_mut().cast::<Self>()) }
    }

    /// Drops the value in place. Called once, by the thread that took the
    /// strong count to zero (I2).
    ///
    /// # Safety
    ///
    /// 1. The caller's decrement took `strong` from 1 to 0 (or its
    ///    `try_unwrap` CAS did), and it has executed the Acquire that makes
    ///    every other handle's use of the value happen-before this call.
    /// 2. It is called at most once per block.
    pub(crate) unsafe fn drop_value(this: NonNull<Self>) {
        // SAFETY: by 1 and 2 no other thread can reach the value any more
        // (`upgrade` never revives a zero count), and the value was
        // initialised by `allocate` and not yet dropped.
        unsafe { ptr::drop_in_place(Self::value_ptr(this)) }
    }

    /// Frees the allocation without touching the value.
    ///
    /// # Safety
    ///
    /// 1. The caller's decrement took `weak` from 1 to 0 and it has executed
    ///    the Acquire that orders every other handle's accesses before this.
    /// 2. The value has already been dropped or moved out (I3).
    pub(crate) unsafe fn deallocate(this: NonNull<Self>) {
        let block = this.as_ptr();
        // The leak tracker is dropped in place through a field projection, so
        // no reference or `Box` ever covers the dead value (I4). The header's
        // callback list has drop glue too, but the object's death emptied it
        // (C6), so there is nothing to release; the counts have none.
        // SAFETY: by 1 we are the block's only owner; see above.
        unsafe {
            debug_assert!((*block).header.callbacks.is_empty());
            ptr::drop_in_place(ptr::addr_of_mut!((*block).leak_check));
        }
        // SAFETY: `allocate` got this memory from the global allocator with
        // this very layout (through `Box::new`), and by 1 and 2 nothing will
        // touch it again.
        unsafe { std::alloc::dealloc(block.cast(), Layout::new::<Self>()) };
    }
}

impl Header {
    /// Current strong count (a snapshot; it may change at once).
    #[inline]
    pub(crate) fn strong(&self) -> usize {
        // Relaxed (O8): a statistic; no memory access depends on it.
        self.strong.load(Ordering::Relaxed)
    }

    /// Number of `Weak` handles: the weak count less the implicit weak held
    /// by the `Strong` handles, or 0 once no `Strong` remains.
    #[inline]
    pub(crate) fn weak_handles(&self) -> usize {
        // Relaxed (O8): a statistic; no memory access depends on it.
        let weak = self.weak.load(Ordering::Relaxed);
        // Relaxed (O8): as above.
        let strong = self.strong.load(Ordering::Relaxed);
        if strong == 0 || weak == WEAK_LOCKED {
            // No strong handle: the implicit weak may or may not have been
            // released yet; report no weak handles rather than guess. Locked:
            // `get_mut` only locks when it sees no `Weak` handle at all.
            0
        } else {
            weak - 1
        }
    }

    /// A new `Strong` from an existing one.
    #[inline]
    pub(crate) fn increment_strong(&self) {
        // Relaxed (O1): the caller already holds a strong handle, which keeps the
        // value alive across this increment; the handle it creates will be
        // passed to other threads only through their own synchronisation
        // (std's `Arc::clone` argues the same).
        let old = self.strong.fetch_add(1, Ordering::Relaxed);
        if old > MAX_REFCOUNT {
            crate::sync::abort();
        }
    }

    /// Releases one strong handle. Returns true when it was the last, in
    /// which case the caller must drop the value and then release the
    /// implicit weak.
    #[inline]
    pub(crate) fn decrement_strong(&self) -> bool {
        // Release: every use of the value through this handle happens-before
        // the decrement, so the thread that sees zero (Acquire below) sees
        // them finished before it drops the value (O2).
        if self.strong.fetch_sub(1, Ordering::Release) != 1 {
            return false;
        }
        // Acquire: pairs with the Release decrements of every other strong
        // handle (O2), so their uses of the value happen-before the drop.
        acquire_fence!(self.strong);
        true
    }

    /// Gives up one strong handle unless it is the last: true if it was
    /// given up, false (count untouched) if the caller holds the last one.
    #[inline]
    pub(crate) fn decrement_strong_unless_last(&self) -> bool {
        // Relaxed: only seeds the CAS.
        let mut current = self.strong.load(Ordering::Relaxed);
        loop {
            if current == 1 {
                return false;
            }
            // Release (O2): as in `decrement_strong`, for a decrement that
            // is not the last; Relaxed on failure, which only reloads.
            match self.strong.compare_exchange_weak(
                current,
                current - 1,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// `Weak::upgrade`: a new strong handle unless the count is zero, in
    /// which case it stays zero forever (I1).
    #[inline]
    pub(crate) fn try_increment_strong(&self) -> bool {
        // Relaxed: only the count matters for the first attempt; a stale
        // value just fails the CAS.
        let mut current = self.strong.load(Ordering::Relaxed);
        loop {
            if current == 0 {
                return false;
            }
            if current > MAX_REFCOUNT {
                crate::sync::abort();
            }
            // Relaxed on success (O3): nothing is acquired by an upgrade.
            // Every non-atomic write to the value (construction, `get_mut`)
            // happens-before the `downgrade` that created any `Weak` alive
            // at or after it (`get_mut` ends before its handle can be
            // downgraded, cloned or sent), and this `Weak` reached us
            // through synchronisation that happens-after that `downgrade`.
            // Relaxed on failure: we learn the new count and retry.
            match self.strong.compare_exchange_weak(
                current,
                current + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// `Strong::try_unwrap`: takes the count from exactly 1 to 0, leaving
    /// the caller the sole owner of the value.
    #[inline]
    pub(crate) fn try_take_last_strong(&self) -> bool {
        // Relaxed (O2′): the fence that follows gives the Acquire side.
        if self
            .strong
            .compare_exchange(1, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // Acquire: pairs with the Release decrements of the handles dropped
        // before ours (O2′), so their uses of the value happen-before the
        // caller moves it out.
        acquire_fence!(self.strong);
        true
    }

    /// `Strong::downgrade`: a new weak handle. Waits out `get_mut`'s
    /// uniqueness check, which holds the weak count at `WEAK_LOCKED` for a
    /// few instructions (I6).
    #[inline]
    pub(crate) fn increment_weak_from_strong(&self) {
        // Relaxed: only the count matters for the first attempt.
        let mut current = self.weak.load(Ordering::Relaxed);
        loop {
            if current == WEAK_LOCKED {
                spin_loop();
                // Relaxed: re-read until the lock is gone.
                current = self.weak.load(Ordering::Relaxed);
                continue;
            }
            if current > MAX_REFCOUNT {
                crate::sync::abort();
            }
            // Acquire on success (O7): pairs with the Release store that
            // unlocks the weak count in `is_unique` (O4), so a downgrade that waited
            // for the lock happens-after the whole uniqueness check.
            match self.weak.compare_exchange_weak(
                current,
                current + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// `Weak::clone`: a new weak handle from an existing one.
    #[inline]
    pub(crate) fn increment_weak(&self) {
        // Relaxed (O6): the caller's weak handle keeps the allocation alive.
        // `get_mut` cannot be holding the lock: it locks only a count of
        // exactly 1, and while a `Strong` exists the caller's `Weak` makes
        // it at least 2; with no `Strong`, nobody can call `get_mut`.
        let old = self.weak.fetch_add(1, Ordering::Relaxed);
        if old > MAX_REFCOUNT {
            crate::sync::abort();
        }
    }

    /// Releases one weak reference (a `Weak` or the implicit one). Returns
    /// true when it was the last: the caller must free the allocation.
    #[inline]
    pub(crate) fn decrement_weak(&self) -> bool {
        // Release: this handle's reads of the counts happen-before the free
        // (O5).
        if self.weak.fetch_sub(1, Ordering::Release) != 1 {
            return false;
        }
        // Acquire: pairs with every other weak reference's Release
        // decrement, and through the implicit weak with the value's drop
        // (O5), before the allocation is freed.
        acquire_fence!(self.weak);
        true
    }

    /// `Strong::get_mut`'s check: true when the caller's strong handle is
    /// the only handle of either kind.
    pub(crate) fn is_unique(&self) -> bool {
        // Lock the weak count so that no `downgrade` can slip in between the
        // two loads below (I6): a second strong handle could otherwise be
        // downgraded and dropped after we read `weak` and before we read
        // `strong`, leaving a `Weak` that could upgrade while we hand out
        // `&mut T`.
        // Acquire (O4, required): pairs with the Release decrement of the
        // last `Weak` (O5). A `Weak` may have upgraded, used the value and
        // dropped both handles; without this Acquire the strong load below
        // could read a stale 1 written before that upgrade and we would
        // hand out `&mut T` racing its reads (loom model 4 fails). Relaxed
        // on failure: we learn nothing we act on.
        if self
            .weak
            .compare_exchange(1, WEAK_LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // Acquire (O4′): pairs with the Release decrements of other strong
        // handles (O2), so their uses of the value happen-before our `&mut T`.
        let unique = self.strong.load(Ordering::Acquire) == 1;
        // Release: pairs with the Acquire CAS in
        // `increment_weak_from_strong` (O4).
        self.weak.store(1, Ordering::Release);
        unique
    }

    /// The object's callback list. Pushes to it need a live object (the
    /// caller's strong handle), and only the dying thread empties it (C6).
    pub(crate) fn callback_list(&self) -> &ObjectCallbacks {
        &self.callbacks
    }
}
