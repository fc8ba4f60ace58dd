//! The control block: one heap allocation holding the counts, the head of the
//! death-callback list, and the value.
//!
//! ```text
//!  Strong ─┐                       ┌──────────────── ControlBlock<T> ─────────────┐
//!  Strong ─┼──► NonNull ──────────►│ Header { strong, weak, callbacks } │ value  │
//!  Weak ───┘                       └──────────────────────────────────────────────┘
//! ```
//!
//! The value is last, so it may be unsized (`ControlBlock<dyn Trait>`,
//! `ControlBlock<str>`, `ControlBlock<[T]>`). Once the value is gone, its
//! place holds the allocation's layout, so freeing never asks a dead value
//! its size (SAFETY.md, section 9, U1–U4), and the header holds only what
//! every live object needs: two 32-bit counts and the callback list's
//! word, two words in all on 64-bit targets, as `Arc`'s header is (the
//! list's compaction state lives in an allocation of its own, made only
//! for an object with more than a few registrations: C17).
//!
//! The protocol (SAFETY.md, invariants I1–I6):
//!
//! * `strong` counts `Strong` handles. The value is alive while it is nonzero
//!   and is dropped by the thread whose decrement takes it to zero. Once zero
//!   while a `Weak` exists or can be made, it stays zero: `upgrade` only
//!   increments a nonzero count, and the one step from 0 to 1
//!   (`publish_first_strong`) happens where no `Weak` can see it (I1).
//! * `weak` counts `Weak` handles plus one shared by all `Strong` handles
//!   together (the "implicit weak"). The holder of the last weak reference
//!   frees the allocation: its decrement takes the count to zero, or its
//!   load finds the count at 1, its own reference alone (O5′).
//! * `weak == WEAK_LOCKED` only inside `Strong::get_mut`'s uniqueness check.
//!
//! Code outside this file never touches the counts directly: it calls the
//! named transitions below, each of which documents its ordering.

use std::alloc::Layout;
use std::mem::ManuallyDrop;
use std::ptr::{self, NonNull};

use crate::callbacks::ObjectCallbacks;
use crate::sync::{acquire_fence, spin_loop, AtomicU32, LeakCheck, Ordering};

/// Counts above this abort the process (I5): `i32::MAX`, the limit std's
/// `Arc` has on 32-bit targets, on every target. Two billion handles to
/// one object take 16 GiB of `Strong`s alone, so only handles leaked with
/// `mem::forget` reach it, and stopping there leaves two billion
/// increments of headroom for the threads that race past it before they
/// see the overflow. The counts are 32 bits so that the header is two
/// words, as small as `Arc`'s, with the callback list's word in it.
const MAX_REFCOUNT: u32 = i32::MAX as u32;

/// The value `weak` holds while `Strong::get_mut` checks uniqueness (I6).
const WEAK_LOCKED: u32 = u32::MAX;

/// The type-independent part of a control block. `Weak` handles reach the
/// counts through `&Header` only, never through a reference that covers the
/// value, which may already be dropped (I4).
#[repr(C)]
pub(crate) struct Header {
    strong: AtomicU32,
    weak: AtomicU32,
    /// This object's death-callback list (one word: C17), emptied at
    /// death.
    callbacks: ObjectCallbacks,
    leak_check: LeakCheck,
}

/// One allocation: header first (`repr(C)`), then the value, last so that
/// it may be unsized (`ControlBlock<str>`, `ControlBlock<[T]>`,
/// `ControlBlock<dyn Trait>`; SAFETY.md, section 9).
///
/// Public only so that [`unsize!`](crate::unsize) can name it in the
/// closure it passes to [`crate::__private::unsize`]: it has no public
/// constructor, field or method, so safe code holds a `&ControlBlock<T>`
/// only inside that closure.
#[doc(hidden)]
#[repr(C)]
pub struct ControlBlock<T: ?Sized> {
    header: Header,
    /// Dropped in place by the last `Strong` (I2); the allocation itself is
    /// freed later by the last weak reference (I3), which must not drop it
    /// again, hence `ManuallyDrop`.
    value: ManuallyDrop<T>,
}

impl<T: ?Sized> std::fmt::Debug for ControlBlock<T> {
    /// Names the type only: the value may be dead, and the counts are the
    /// handles' business.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlBlock").finish_non_exhaustive()
    }
}

/// A block's allocation `Layout` in one word (U2): `size | align / 2`.
/// The size of a block is a multiple of its alignment (`pad_to_align`), and
/// that alignment is at least the header's (a `usize`'s, so at least 2), so
/// `align / 2` sits in bits the size leaves clear: its lowest set bit.
///
/// Written where the value was, once it is gone (dropped, moved out, or
/// never written), and read only by [`ControlBlock::deallocate`]: a block
/// needs its layout only after its value is dead, and freeing a block
/// whose unsized value is dropped must not ask the value its size (I4,
/// U2). Every block leaves the value at least a word of room for it
/// ([`block_layout`]).
#[derive(Clone, Copy)]
struct BlockLayout(usize);

impl BlockLayout {
    fn new(layout: Layout) -> Self {
        debug_assert!(layout.align() >= 2 && layout.size() % layout.align() == 0);
        BlockLayout(layout.size() | (layout.align() >> 1))
    }

    fn get(self) -> Layout {
        let half_align = self.0 & self.0.wrapping_neg();
        let (size, align) = (self.0 ^ half_align, half_align << 1);
        // SAFETY: `new` was given a valid `Layout` with `align >= 2` and
        // `size` a multiple of `align`; the bits decode back to it exactly.
        unsafe { Layout::from_size_align_unchecked(size, align) }
    }
}

impl Header {
    /// A header with `strong` strong handles and one weak reference (the
    /// implicit weak, or `new_cyclic`'s `Weak`).
    fn new(strong: u32) -> Self {
        Header {
            strong: AtomicU32::new(strong),
            weak: AtomicU32::new(1),
            callbacks: ObjectCallbacks::new(),
            leak_check: LeakCheck::new(()),
        }
    }
}

impl<T> ControlBlock<T> {
    /// Allocates a block holding `value` with one strong handle and the
    /// implicit weak handle.
    #[inline]
    pub(crate) fn allocate(value: T) -> NonNull<Self> {
        let block = allocate_raw(Layout::new::<T>(), 1).cast::<Self>();
        // SAFETY: the block is fresh and unshared, and `allocate_raw` left
        // room for a `T` at the value's offset (U1).
        unsafe { Self::value_ptr(block).write(value) };
        block
    }

    /// Allocates a block whose value is uninitialised, with no strong
    /// handle and one weak reference (`new_cyclic`'s `Weak`). Its value's
    /// place holds the layout until the value is written, so that the block
    /// can be freed if it never is (U2).
    pub(crate) fn allocate_uninit() -> NonNull<Self> {
        let block = allocate_raw(Layout::new::<T>(), 0).cast::<Self>();
        // SAFETY: fresh and unshared; no value is there to lose.
        unsafe { Self::value_gone(block) };
        block
    }

    /// Records, in the value's place, that the value has been moved out
    /// (`try_unwrap`, `into_inner`, `make_mut`) or was never written: the
    /// block can now be freed (U2).
    ///
    /// # Safety
    ///
    /// 1. The caller owns the value's place: it took the strong count to
    ///    zero for good (or the block is unshared), and the value is not
    ///    there any more (moved out, or never written).
    /// 2. It does so before it releases the implicit weak (or the block's
    ///    one weak reference).
    pub(crate) unsafe fn value_gone(this: NonNull<Self>) {
        // `T` is sized, so the block was allocated for
        // `Layout::new::<T>()` (through any view of it: a `dyn` or array
        // view has that same layout, U1): `write_layout`'s 1. Its 2 and 3
        // are the caller's 1 and 2.
        // SAFETY: as just said.
        unsafe { write_layout(this, Layout::new::<T>()) };
    }

    /// The block whose value `value` points at: the inverse of
    /// [`value_ptr`](Self::value_ptr), for a sized value, which needs no
    /// look at the value (so it serves `Weak::from_raw` too).
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
}

impl<T> ControlBlock<[T]> {
    /// Allocates a block for `len` elements, none of them initialised yet,
    /// with one strong handle and the implicit weak.
    pub(crate) fn allocate_slice(len: usize) -> NonNull<Self> {
        let Ok(value_layout) = Layout::array::<T>(len) else {
            capacity_overflow()
        };
        let memory = allocate_raw(value_layout, 1);
        // The cast keeps `len` as the metadata: a `[T]`-tailed struct's
        // metadata is the tail's length (SAFETY.md, U1).
        let block = ptr::slice_from_raw_parts_mut(memory.as_ptr().cast::<T>(), len) as *mut Self;
        // SAFETY: `memory` is not null, and the cast keeps its address.
        unsafe { NonNull::new_unchecked(block) }
    }

    /// [`value_gone`](ControlBlock::value_gone) for a slice block none of
    /// whose elements is there any more (dropped, or never written).
    ///
    /// # Safety
    ///
    /// As for `value_gone`.
    pub(crate) unsafe fn elements_gone(this: NonNull<Self>) {
        let len = Self::value_ptr(this).len();
        // The layout the block was allocated with, so it fits.
        let value_layout = Layout::array::<T>(len).unwrap_or_else(|_| capacity_overflow());
        // SAFETY: the caller's promises are `write_layout`'s.
        unsafe { write_layout(this, value_layout) };
    }
}

impl ControlBlock<[u8]> {
    /// The same block seen as holding `str`; its bytes must be UTF-8.
    pub(crate) fn into_str(this: NonNull<Self>) -> NonNull<ControlBlock<str>> {
        // `[u8]` and `str` share their metadata (the length in bytes), so
        // the cast keeps address, provenance and length.
        // SAFETY: a cast of a non-null pointer is not null.
        unsafe { NonNull::new_unchecked(this.as_ptr() as *mut ControlBlock<str>) }
    }
}

impl<T: ?Sized> ControlBlock<T> {
    /// Moves the value out of `boxed` into a new block with one strong
    /// handle, as `Arc::from(Box<T>)` does: the value's bytes are copied,
    /// the box's memory is freed, and the value is not dropped.
    pub(crate) fn from_box(boxed: Box<T>) -> NonNull<Self> {
        let value_layout = Layout::for_value::<T>(&boxed);
        let value = Box::into_raw(boxed);
        let block = with_metadata_of(allocate_raw(value_layout, 1), value as *mut Self);
        // `value` is readable for `value_layout.size()` bytes (the
        // box owned them) and the block's value field is writable for as
        // many (it was allocated for `value_layout`); they are different
        // allocations, so they do not overlap.
        // SAFETY: as just said.
        unsafe {
            ptr::copy_nonoverlapping(
                value.cast::<u8>(),
                Self::value_ptr(block).cast::<u8>(),
                value_layout.size(),
            )
        };
        if value_layout.size() != 0 {
            // The box's memory, freed without dropping what was moved out
            // of it. A zero-sized box never allocated.
            // SAFETY: `Box<T>` allocated `value` from the global allocator
            // with `Layout::for_value` of its value, which we read above.
            unsafe { std::alloc::dealloc(value.cast::<u8>(), value_layout) };
        }
        block
    }

    /// The header of the block at `this`.
    ///
    /// # Safety
    ///
    /// 1. `this` came from one of this type's allocation functions and the
    ///    allocation is still live, i.e. the caller owns a strong or weak
    ///    reference to it.
    #[inline(always)]
    pub(crate) unsafe fn header<'a>(this: NonNull<Self>) -> &'a Header {
        // Precondition 1 keeps the allocation live for as long as
        // the caller's reference, which bounds 'a. `&raw const` projects to
        // the header field alone (offset 0: it reads no metadata), so no
        // reference covers the value (I4).
        // SAFETY: as just said.
        unsafe { &*ptr::addr_of!((*this.as_ptr()).header) }
    }

    /// A pointer to the value; dereferencing it is the caller's business.
    #[inline(always)]
    pub(crate) fn value_ptr(this: NonNull<Self>) -> *mut T {
        // `addr_of_mut!` projects without creating a reference; for an
        // unsized value the offset comes from the pointer's metadata (a
        // `dyn` value's alignment from its vtable), never from the value.
        // `ManuallyDrop<T>` is `repr(transparent)` over `T`, so the cast
        // keeps address and metadata.
        // SAFETY: the projection stays inside the allocation `this` points
        // at; `addr_of_mut!` on a raw place reads nothing.
        unsafe { ptr::addr_of_mut!((*this.as_ptr()).value) as *mut T }
    }

    /// The block whose live value `value` points at: the inverse of
    /// [`value_ptr`](Self::value_ptr) for any `T`.
    ///
    /// # Safety
    ///
    /// 1. `value` came from `value_ptr` of a block whose value is alive
    ///    (the caller owns a strong count): its alignment is read through a
    ///    reference to it.
    pub(crate) unsafe fn from_live_value_ptr(value: *const T) -> NonNull<Self> {
        // SAFETY: by 1 the value is alive and no `&mut` to it exists while
        // the caller's strong count does (`get_mut` borrows that handle).
        let value_align = std::mem::align_of_val::<T>(unsafe { &*value });
        let offset = value_offset(value_align);
        // SAFETY: by 1, `value` is `offset` bytes (the repr(C) offset for
        // this alignment, U1) into a live block and carries its provenance;
        // stepping back stays inside it. The cast keeps the metadata.
        unsafe { NonNull::new_unchecked(value.byte_sub(offset).cast_mut() as *mut Self) }
    }

    /// Drops the value in place, then writes the block's layout where it
    /// was (U2), even if the value's `Drop` panics. Called once, by the
    /// thread that took the strong count to zero (I2), before it releases
    /// the implicit weak.
    ///
    /// # Safety
    ///
    /// 1. The caller's decrement took `strong` from 1 to 0, and it has
    ///    executed the Acquire that makes every other handle's use of the
    ///    value happen-before this call.
    /// 2. It is called at most once per block.
    /// 3. The caller releases the implicit weak only after this returns
    ///    (or unwinds).
    pub(crate) unsafe fn drop_value(this: NonNull<Self>) {
        /// Writes the layout once the value's drop has returned or
        /// unwound: the value's bytes are its own until then.
        struct Bury<T: ?Sized>(NonNull<ControlBlock<T>>, Layout);
        impl<T: ?Sized> Drop for Bury<T> {
            fn drop(&mut self) {
                // The layout is `for_value` of the value (1); the
                // value is dropped (or its drop unwound: it is gone either
                // way), by `drop_value`'s 1 and 2 the place is ours alone,
                // and by its 3 the implicit weak goes after we return.
                // SAFETY: as just said.
                unsafe { write_layout(self.0, self.1) };
            }
        }
        let value = Self::value_ptr(this);
        // The size is asked of the value while it is alive (U2).
        // SAFETY: by 1 and 2 the value is alive, initialised, and no other
        // thread can reach it any more (`upgrade` never revives a zero
        // count), so a shared borrow for `for_value` is sound.
        let _bury = Bury(this, Layout::for_value::<T>(unsafe { &*value }));
        // SAFETY: as above; the value was initialised by the allocation
        // and is dropped here once.
        unsafe { ptr::drop_in_place(value) }
    }

    /// Frees the allocation without touching the value.
    ///
    /// # Safety
    ///
    /// 1. The caller held the last weak reference: its decrement took
    ///    `weak` from 1 to 0 and it has executed the Acquire fence, or its
    ///    Acquire load found `weak` at 1 (O5, O5′); either orders every
    ///    other handle's accesses before this.
    /// 2. The value has already been dropped or moved out, or was never
    ///    written (`new_cyclic`'s closure panicked), and its place holds the
    ///    layout (`drop_value`, `value_gone`, `write_layout`) (I3, U2).
    pub(crate) unsafe fn deallocate(this: NonNull<Self>) {
        // The header is reached through a field projection and the layout
        // is read as a word where the value was, so no reference or `Box`
        // ever covers the dead value, and its (possibly unsized) size is
        // never asked of it (I4, U2). The callback list has drop glue too,
        // but the object's death emptied it (C6), so there is nothing to
        // release; the counts have none.
        // SAFETY: by 1 we are the block's only owner, and it is allocated.
        let header = unsafe { ptr::addr_of_mut!((*this.as_ptr()).header) };
        // SAFETY: as above; the leak tracker is dropped once, here.
        unsafe {
            debug_assert!((*header).callbacks.is_empty());
            ptr::drop_in_place(ptr::addr_of_mut!((*header).leak_check));
        }
        // By 2 the layout word was written at the value's offset
        // (a multiple of a word: U1), and the Acquire of 1 orders that
        // write (made before the implicit weak's Release decrement, O5, or
        // before the epoch ran the drop of the entry it was handed to, C21)
        // before this read.
        // SAFETY: as just said.
        let layout = unsafe { Self::value_ptr(this).cast::<BlockLayout>().read() }.get();
        // A wrong word would file the block under another size in the
        // thread's cache, to be handed out for a larger one (C16).
        debug_assert!(
            layout.size() >= std::mem::size_of::<Header>() + std::mem::size_of::<BlockLayout>()
                && layout.align() >= std::mem::align_of::<Header>(),
            "a block's layout word holds {layout:?}"
        );
        // The block was allocated by `block_cache::allocate` in
        // `allocate_raw` with `block_layout` of its value's layout, and the
        // word holds `block_layout` of the same layout (`write_layout`'s 1:
        // every view of a block computes it alike, U1), decoded exactly
        // (`BlockLayout`); by 1 and 2 nothing will touch the block again,
        // so it may go to this thread's cache of free blocks (C16).
        // SAFETY: as just said.
        unsafe { crate::block_cache::release(this.cast::<u8>(), layout) };
    }
}

/// The offset of the value in a `repr(C)` block, for a value of alignment
/// `value_align`: the header's size rounded up to it (U1).
fn value_offset(value_align: usize) -> usize {
    let header = std::mem::size_of::<Header>();
    (header + value_align - 1) & !(value_align - 1)
}

/// The allocation of a block whose value has layout `value_layout`:
/// `Header` extended by the value and padded to its alignment, which is
/// `repr(C)`'s layout of `ControlBlock<T>` (U1), except that the value's
/// place is at least a word long, so that the layout fits there once the
/// value is gone (U2). A function of the value's layout alone, so that the
/// block's allocation and its free agree through any view of it (a `dyn`
/// one, a downcast, a `str` seen as bytes).
#[inline]
fn block_layout(value_layout: Layout) -> Layout {
    let room = std::mem::size_of::<BlockLayout>();
    let Ok(place) = Layout::from_size_align(value_layout.size().max(room), value_layout.align())
    else {
        capacity_overflow()
    };
    let Ok((layout, offset)) = Layout::new::<Header>().extend(place) else {
        capacity_overflow()
    };
    debug_assert_eq!(offset, value_offset(value_layout.align()));
    layout.pad_to_align()
}

/// Writes, where the value of `this` was, the block's layout for a value
/// of `value_layout` (U2).
///
/// # Safety
///
/// 1. `value_layout` is the layout of the value the block was allocated
///    for (`Layout::for_value` of it, or the layout it was allocated with).
/// 2. The value's place is the caller's alone, and the value is gone
///    (dropped, moved out, or never written).
/// 3. The caller releases the implicit weak (or the block's one weak
///    reference) only after this call.
#[inline]
unsafe fn write_layout<T: ?Sized>(this: NonNull<ControlBlock<T>>, value_layout: Layout) {
    let layout = BlockLayout::new(block_layout(value_layout));
    // The value's offset is a multiple of a word (a word-aligned
    // header's size rounded up to the value's alignment, U1) and the place
    // is at least a word long (`block_layout`, by 1); nothing else reads or
    // writes it (2).
    // SAFETY: as just said.
    unsafe {
        ControlBlock::value_ptr(this)
            .cast::<BlockLayout>()
            .write(layout)
    };
}

/// Allocates a block for a value of `value_layout` and writes its header
/// (`strong` strong handles, one weak reference); the value is left
/// uninitialised. Returns the block's address, with provenance over all of
/// it. The layout is [`block_layout`]'s; a small block may be one another
/// handle's last weak reference freed on this thread (C16). Inlined, so
/// that for a sized value the layout is a constant.
#[inline]
fn allocate_raw(value_layout: Layout, strong: u32) -> NonNull<u8> {
    let layout = block_layout(value_layout);
    let memory = crate::block_cache::allocate(layout);
    // SAFETY: the block is ours alone (fresh, or out of this thread's
    // cache, C16), and large and aligned enough for a `Header` at offset 0.
    unsafe { memory.cast::<Header>().write(Header::new(strong)) };
    memory
}

/// A pointer to the block at `memory`, with its provenance, and `like`'s
/// metadata (U3).
///
/// Stable Rust cannot yet build a wide pointer from an address and
/// metadata for a generic `T: ?Sized` (`ptr::from_raw_parts` is unstable),
/// so this overwrites the address half of a copy of `like`, as std's `Arc`
/// did before that API existed. That half is the first word of a wide
/// pointer: the assertion checks it, so a layout that ever differed would
/// panic here instead of building a wrong pointer.
pub(crate) fn with_metadata_of<T: ?Sized>(
    memory: NonNull<u8>,
    like: *mut ControlBlock<T>,
) -> NonNull<ControlBlock<T>> {
    let mut block = like;
    let address_word = ptr::addr_of_mut!(block).cast::<*mut u8>();
    // SAFETY: reads the first word of a local pointer, initialised, and
    // as long as a thin pointer (any pointer is at least that long).
    let first_word = unsafe { address_word.read() };
    assert!(
        first_word == like.cast::<u8>(),
        "a wide pointer's first word is its address",
    );
    // SAFETY: as above; the write replaces exactly the address (checked
    // above) with one that carries the new block's provenance, and leaves
    // the metadata.
    unsafe { address_word.write(memory.as_ptr()) };
    // Checked in every build: fails for any layout whose first word is
    // not the address, even one the check above let through.
    assert!(block.cast::<u8>() == memory.as_ptr());
    // SAFETY: its address is `memory`'s, which is not null.
    unsafe { NonNull::new_unchecked(block) }
}

/// A size that overflows `isize`: the same panic as `Vec`'s.
#[cold]
fn capacity_overflow() -> ! {
    panic!("capacity overflow")
}

impl Header {
    /// Current strong count (a snapshot; it may change at once).
    #[inline]
    pub(crate) fn strong(&self) -> usize {
        // Relaxed (O8): a statistic; no memory access depends on it.
        self.strong.load(Ordering::Relaxed) as usize
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
            (weak - 1) as usize
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

    /// `Weak::upgrade`: a new strong handle unless the count is zero
    /// (which, seen by a `Weak`, stays zero: I1).
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
            // Acquire on success (O3): pairs with the Release store that
            // ends `new_cyclic` (O11), whose `Weak` exists before the value
            // is written, so the upgraded handle sees the value. (Before
            // `new_cyclic`, every write to the value happened-before the
            // `downgrade` of any `Weak`, and Relaxed sufficed; std's `Arc`
            // uses Acquire for the same reason.) Relaxed on failure: we
            // learn the new count and retry.
            match self.strong.compare_exchange_weak(
                current,
                current + 1,
                Ordering::Acquire,
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

    /// The end of `new_cyclic` (strong count 0 to 1, the value written)
    /// and of `make_mut`'s unique path (after `try_take_last_strong`): the
    /// object is alive, with the caller's handle as its only `Strong`.
    pub(crate) fn publish_first_strong(&self) {
        // Release (O11): pairs with the Acquire CAS of `upgrade` (O3), so
        // a `Weak` of `new_cyclic` that upgrades sees the value's writes.
        // On `make_mut`'s path (O12) no `Weak` exists; the Release is kept
        // there for parity with std's `Arc::make_mut`.
        self.strong.store(1, Ordering::Release);
    }

    /// `make_mut`, after `try_take_last_strong` took the count to 0: true
    /// if `Weak` handles exist. None can be created now (no `Strong` is
    /// left to downgrade; `Weak::clone` needs a `Weak`), and those that
    /// exist can no longer upgrade.
    pub(crate) fn has_weak_handles_when_dead(&self) -> bool {
        // Relaxed (O12, as std's `Arc::make_mut`): a stale value can only
        // count `Weak`s already dropped. Every existing `Weak` descends from
        // a `downgrade` that happens-before the caller's Acquire in
        // `try_take_last_strong` (it was made from the caller's handle or
        // from one dropped with a Release decrement), and a clone's
        // increment precedes its source's decrement in the count's
        // modification order. A stale "yes" merely moves the value.
        self.weak.load(Ordering::Relaxed) != 1
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

    /// The weak count as stored (tests).
    #[cfg(all(test, not(weakrefs_loom)))]
    pub(crate) fn stored_weak_count(&self) -> u32 {
        // Relaxed: a test's look, after its synchronisation.
        self.weak.load(Ordering::Relaxed)
    }

    /// Releases one weak reference (a `Weak` or the implicit one). Returns
    /// true when it was the last: the caller must free the allocation.
    #[inline]
    pub(crate) fn decrement_weak(&self) -> bool {
        self.release_weak(1)
    }

    /// Releases `refs` weak references, all the caller's: one, or two for
    /// a collection entry its object's death handed the implicit weak
    /// (C21). Returns true when they were the last.
    #[inline]
    fn release_weak(&self, refs: u32) -> bool {
        // Under loom: this reference's last use, which the free must follow.
        self.leak_check.let_go();
        // Release: this handle's reads of the counts happen-before the free
        // (O5).
        if self.weak.fetch_sub(refs, Ordering::Release) != refs {
            return false;
        }
        // Acquire: pairs with every other weak reference's Release
        // decrement, and through the implicit weak with the value's drop
        // (O5), before the allocation is freed.
        acquire_fence!(self.weak);
        true
    }

    /// [`Self::decrement_weak`] for a reference that is most likely the
    /// last: the implicit weak of a dying value (no `Weak` was made, or
    /// none is left), or a collection entry's `Weak`, dropped once its
    /// value died. The last one frees without a read-modify-write (O5′): a
    /// weak reference is made only from a `Strong` (which holds the
    /// implicit weak, so the count would be 2) or from another `Weak`
    /// (arc-swap's slots increment through a debt-protected pointer, but
    /// pay every debt before they let their own reference go: I3), so
    /// once ours is the only one, none can appear. Not for `Weak`s in
    /// general: where other threads use the count, the load first costs a
    /// second transfer of its line (two threads downgrading one object and
    /// dropping the `Weak`s ran 52-64 ns an operation without it and 59-103
    /// with it, on the 2-core machine).
    ///
    /// `refs` are the caller's references: one, or two for a collection
    /// entry its object's death handed the implicit weak (C21), whose last
    /// release the same rule lets free without an RMW: with both ours,
    /// no `Strong` is left to make another.
    #[inline]
    pub(crate) fn decrement_weak_expecting_last(&self, refs: u32) -> bool {
        // Acquire: pairs with every other weak reference's Release
        // decrement, as `decrement_weak`'s fence does.
        if self.weak.load(Ordering::Acquire) == refs {
            // Under loom: this reference's last use, before the free.
            self.leak_check.let_go();
            return true;
        }
        self.release_weak(refs)
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

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_two_counts_a_word_and_at_least_a_word_for_its_value() {
        let word = std::mem::size_of::<usize>();
        // Two 32-bit counts and the callback list's word: 16 bytes on
        // 64-bit targets, as `Arc`'s header; the layout is kept where the
        // value was, once it is gone (U2).
        assert_eq!(std::mem::size_of::<Header>(), 8 + word);
        // The value's place starts at the header's end, rounded up to the
        // value's alignment (a `u64` is 8-aligned on some 32-bit targets,
        // 4-aligned on others).
        let after = |align: usize| (8 + word).next_multiple_of(align);
        let u64_align = std::mem::align_of::<u64>();
        assert_eq!(
            block_layout(Layout::new::<u64>()).size(),
            (after(u64_align) + 8).next_multiple_of(u64_align.max(word))
        );
        assert_eq!(block_layout(Layout::new::<u8>()).size(), 8 + 2 * word);
        assert_eq!(block_layout(Layout::new::<()>()).size(), 8 + 2 * word);
        let over_aligned = Layout::from_size_align(1, 128).unwrap();
        let block = block_layout(over_aligned);
        assert_eq!((block.size(), block.align()), (256, 128));
        assert_eq!(value_offset(128), 128);
    }

    /// C16: the block of a handle whose last reference is gone goes to
    /// this thread's cache, and the next block of its size comes from it.
    /// (Under Miri blocks bypass the cache, so that it sees every free.)
    #[test]
    #[cfg(not(miri))]
    fn a_dead_handles_block_is_the_next_new_handles_block() {
        use crate::block_cache::{cache, class_of};
        // Aligned to 8 on every target (a `u64` is 4-aligned on some
        // 32-bit ones), as the cache's classes are.
        #[repr(align(8))]
        struct Word(u64);
        let class = class_of(block_layout(Layout::new::<Word>())).expect("a cached size");
        let first = crate::Strong::new(Word(1));
        let weak = crate::Strong::downgrade(&first);
        drop(first);
        let before = cache::cached(class);
        drop(weak);
        assert_eq!(cache::cached(class), before + 1, "the block was not kept");
        let second = crate::Strong::new(Word(2));
        assert_eq!(cache::cached(class), before, "the block was not reused");
        assert_eq!(second.0, 2);
    }

    #[test]
    fn a_layout_word_decodes_to_the_layout_it_encodes() {
        for (size, align) in [(40, 8), (48, 16), (256, 128), (4096, 4096), (8, 2)] {
            let layout = Layout::from_size_align(size, align).unwrap();
            assert_eq!(BlockLayout::new(layout).get(), layout);
        }
    }
}
