//! `Weak<T>`: the non-owning handle.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::ptr::NonNull;

use crate::control::{ControlBlock, Header};
use crate::error::ReferenceError;
use crate::strong::Strong;

/// A non-owning handle that names an object without keeping it alive, like
/// Python's `weakref.ref` or [`std::sync::Weak`].
///
/// [`upgrade`](Weak::upgrade) returns a [`Strong`] while the object lives
/// and `None` forever after. Equality and hashing are by identity and never
/// change when the object dies, so a `Weak` is a stable key in a
/// `HashSet` or `HashMap` (Python instead compares referents and refuses to
/// hash a dead reference).
///
/// `T` may be unsized, as for [`Strong`]: [`Strong::downgrade`] of a
/// `Strong<dyn Trait>` gives a `Weak<dyn Trait>`, and
/// [`unsize!`](crate::unsize) turns a `Weak<T>` into one. [`Weak::new`]
/// and the raw-pointer methods are for sized values.
///
/// # Examples
///
/// ```
/// use weakrefs::{Strong, Weak};
///
/// let template = Strong::new("compiled template");
/// let weak: Weak<&str> = Strong::downgrade(&template);
/// assert_eq!(*weak.upgrade().unwrap(), "compiled template");
///
/// drop(template);
/// assert!(!weak.is_alive());
/// assert!(weak.upgrade().is_none());
/// ```
pub struct Weak<T: ?Sized> {
    /// `None` for [`Weak::new`] (and `unsize!` of a dead `Weak`), which
    /// names no object. No `PhantomData<T>`: a `Weak` never drops a `T`.
    /// (Its `Drop` impl still names `T`, so drop check treats it as if it
    /// might: SAFETY.md, section 9.)
    block: Option<NonNull<ControlBlock<T>>>,
}

// SAFETY: a `Weak<T>` can become a `Strong<T>` in the thread that holds it,
// so it needs what `Strong<T>` needs, as `std::sync::Weak` does.
unsafe impl<T: ?Sized + Send + Sync> Send for Weak<T> {}
// SAFETY: `&Weak<T>` can be upgraded to a `Strong<T>` in the borrowing
// thread; same bounds as `Send`.
unsafe impl<T: ?Sized + Send + Sync> Sync for Weak<T> {}

impl<T> Weak<T> {
    /// A `Weak` that names no object and never upgrades.
    ///
    /// ```
    /// let w = weakrefs::Weak::<u32>::new();
    /// assert!(w.upgrade().is_none());
    /// assert_eq!(w.strong_count(), 0);
    /// ```
    pub const fn new() -> Self {
        Weak { block: None }
    }

    /// A pointer to where the value is, as `std::sync::Weak::as_ptr`: valid
    /// to dereference only while some [`Strong`] keeps the object alive.
    /// For [`Weak::new`], a dangling (but non-null, aligned) pointer that
    /// no object has.
    ///
    /// Unlike `std::sync::Weak`, this and the raw-pointer conversions are
    /// for sized values only: a `Weak` that names no object has no pointer
    /// metadata to give an unsized value (it keeps none, and
    /// [`unsize!`](crate::unsize) of a dead `Weak` names no object).
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let obj = Strong::new(5);
    /// let weak = Strong::downgrade(&obj);
    /// assert_eq!(weak.as_ptr(), Strong::as_ptr(&obj));
    /// ```
    pub fn as_ptr(&self) -> *const T {
        match self.block {
            Some(block) => ControlBlock::value_ptr(block),
            None => NonNull::dangling().as_ptr(),
        }
    }

    /// Consumes the handle without releasing it and returns
    /// [`as_ptr`](Self::as_ptr); [`Weak::from_raw`] turns it back.
    ///
    /// ```
    /// use weakrefs::{Strong, Weak};
    ///
    /// let obj = Strong::new('w');
    /// let raw = Strong::downgrade(&obj).into_raw();
    /// // SAFETY: from `into_raw`, turned back once.
    /// let weak = unsafe { Weak::from_raw(raw) };
    /// assert_eq!(weak.upgrade().as_deref(), Some(&'w'));
    /// ```
    pub fn into_raw(self) -> *const T {
        let value = self.as_ptr();
        std::mem::forget(self);
        value
    }

    /// Rebuilds a handle from [`Weak::into_raw`]'s pointer.
    ///
    /// # Safety
    ///
    /// `value` came from `Weak::<T>::into_raw` (the same `T`), and each
    /// such pointer is turned back once.
    ///
    /// ```
    /// use weakrefs::Weak;
    ///
    /// let raw = Weak::<u8>::new().into_raw();
    /// // SAFETY: from `into_raw`, turned back once.
    /// assert!(unsafe { Weak::from_raw(raw) }.upgrade().is_none());
    /// ```
    pub unsafe fn from_raw(value: *const T) -> Self {
        if value == NonNull::<T>::dangling().as_ptr().cast_const() {
            return Weak::new();
        }
        // SAFETY: from `into_raw` of a handle naming a block, whose weak
        // count it still owns, so the block is allocated.
        Weak::from_block(unsafe { ControlBlock::from_value_ptr(value) })
    }
}

impl<T: ?Sized> Weak<T> {
    /// True for a handle from [`Weak::new`], which names no object.
    #[cfg(feature = "arc-swap")]
    pub(crate) fn is_unset(&self) -> bool {
        self.block.is_none()
    }

    /// A `Weak` that names no object, for any `T` ([`Weak::new`] is for
    /// sized values).
    pub(crate) fn unset() -> Self {
        Weak { block: None }
    }

    /// Wraps a block whose weak count already includes this handle.
    pub(crate) fn from_block(block: NonNull<ControlBlock<T>>) -> Self {
        Weak { block: Some(block) }
    }

    /// The block this handle names, if any.
    pub(crate) fn block(&self) -> Option<NonNull<ControlBlock<T>>> {
        self.block
    }

    #[inline(always)]
    fn header(&self) -> Option<&Header> {
        self.block.map(|block| {
            // SAFETY: this handle's weak count keeps the allocation (not the
            // value) live for as long as `&self` (I3); only the header is
            // borrowed (I4).
            unsafe { ControlBlock::header(block) }
        })
    }

    /// A [`Strong`] handle if the object is still alive.
    ///
    /// Never revives a dead object: once the last `Strong` is gone, every
    /// upgrade fails, even one racing with that last drop.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let session = Strong::new(42);
    /// let weak = Strong::downgrade(&session);
    /// if let Some(s) = weak.upgrade() {
    ///     assert_eq!(*s, 42);
    /// }
    /// ```
    #[inline]
    pub fn upgrade(&self) -> Option<Strong<T>> {
        let block = self.block?;
        if self.header()?.try_increment_strong() {
            Some(Strong::from_block(block))
        } else {
            None
        }
    }

    /// [`upgrade`](Weak::upgrade) with an error that says what went wrong,
    /// the analogue of using a dead Python `weakref.proxy`.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let obj = Strong::new(1);
    /// let weak = Strong::downgrade(&obj);
    /// drop(obj);
    /// let err = weak.try_upgrade().unwrap_err();
    /// assert_eq!(err.to_string(), "weakly-referenced object no longer exists");
    /// ```
    pub fn try_upgrade(&self) -> Result<Strong<T>, ReferenceError> {
        self.upgrade().ok_or(ReferenceError)
    }

    /// True while at least one [`Strong`] exists. Another thread may drop
    /// it a moment later: to use the object, [`upgrade`](Weak::upgrade).
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let obj = Strong::new(());
    /// let weak = Strong::downgrade(&obj);
    /// assert!(weak.is_alive());
    /// drop(obj);
    /// assert!(!weak.is_alive());
    /// ```
    pub fn is_alive(&self) -> bool {
        self.strong_count() != 0
    }

    /// Number of [`Strong`] handles to the object; 0 once it is dead or for
    /// [`Weak::new`].
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let obj = Strong::new(());
    /// let weak = Strong::downgrade(&obj);
    /// assert_eq!(weak.strong_count(), 1);
    /// ```
    pub fn strong_count(&self) -> usize {
        self.header().map_or(0, Header::strong)
    }

    /// Number of `Weak` handles to the object, this one included; 0 once the
    /// object is dead (as for `std::sync::Weak`) or for [`Weak::new`].
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let obj = Strong::new(());
    /// let w1 = Strong::downgrade(&obj);
    /// let _w2 = w1.clone();
    /// assert_eq!(w1.weak_count(), 2);
    /// drop(obj);
    /// assert_eq!(w1.weak_count(), 0);
    /// ```
    pub fn weak_count(&self) -> usize {
        self.header().map_or(0, Header::weak_handles)
    }

    /// True when both name the same object, or both came from
    /// [`Weak::new`]. Works after death too.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let obj = Strong::new(());
    /// let a = Strong::downgrade(&obj);
    /// let b = Strong::downgrade(&obj);
    /// drop(obj);
    /// assert!(a.ptr_eq(&b));
    /// ```
    pub fn ptr_eq(&self, other: &Self) -> bool {
        // Addresses only, never vtables (as `Strong::ptr_eq`).
        self.identity() == other.identity()
    }

    /// The identity used by `Eq` and `Hash`: the block's address, which a
    /// `Weak` keeps allocated, so no other object can take it while this
    /// handle lives.
    pub(crate) fn identity(&self) -> usize {
        self.block
            .map_or(0, |block| block.cast::<u8>().as_ptr().addr())
    }

    /// True if this handle names `strong`'s object.
    pub(crate) fn names(&self, strong: &Strong<T>) -> bool {
        self.identity() == Strong::identity(strong)
    }
}

impl<T: ?Sized> Weak<T> {
    /// The block's weak count as stored, the implicit weak included, even
    /// once the object is dead (tests).
    #[cfg(all(test, not(weakrefs_loom)))]
    pub(crate) fn stored_weak_count(&self) -> u32 {
        self.header().map_or(0, Header::stored_weak_count)
    }
}

impl<T: ?Sized> Clone for Weak<T> {
    /// Another handle to the same object.
    fn clone(&self) -> Self {
        if let Some(header) = self.header() {
            header.increment_weak();
        }
        Weak { block: self.block }
    }
}

impl<T: ?Sized> Weak<T> {
    /// Drops `this`, which is most likely its block's last weak reference
    /// (`Header::decrement_weak_expecting_last`, O5′): the implicit weak of
    /// a dying value, or a collection entry's `Weak` (see [`EntryWeak`]).
    #[inline]
    pub(crate) fn drop_expecting_last(this: Self) {
        Weak::drop_expecting_last_with(this, 1);
    }

    /// [`Self::drop_expecting_last`], releasing `refs` references that
    /// `this` stands for: its own, and its object's implicit weak if the
    /// object's death handed it to the collection entry that holds `this`
    /// (`refs` 2, C21).
    #[inline]
    pub(crate) fn drop_expecting_last_with(this: Self, refs: u32) {
        let mut this = std::mem::ManuallyDrop::new(this);
        this.release(Some(refs));
    }

    /// Lets go of this reference: `expecting_last` picks the release that
    /// tries a load first, of that many references.
    #[inline]
    fn release(&mut self, expecting_last: Option<u32>) {
        let Some(block) = self.block else { return };
        // SAFETY: see `header`: our weak count keeps the block live until the
        // decrement below.
        let header = unsafe { ControlBlock::header(block) };
        let last = match expecting_last {
            Some(refs) => header.decrement_weak_expecting_last(refs),
            None => header.decrement_weak(),
        };
        if last {
            // Ours was the last weak reference: our decrement took the
            // count to zero and executed the Acquire fence (O5), or our
            // Acquire load found it ours alone (O5′). The implicit weak (or a never-shared
            // block's one weak reference: `new_cyclic`, `FreeBlock`) is
            // released only after the value was dropped, moved out or found
            // never written, and the layout word written in its place (I3,
            // U2).
            // SAFETY: as just said.
            unsafe { ControlBlock::deallocate(block) };
        }
    }
}

impl<T: ?Sized> Drop for Weak<T> {
    #[inline]
    fn drop(&mut self) {
        self.release(None);
    }
}

/// The `Weak` of a collection entry (a `WeakValueMap` entry's value, a
/// `WeakKeyMap` entry's key, a `WeakSet` member). An entry is dropped once
/// it left its collection, most often because its object died, and then
/// this is the block's last reference: its drop tries a load before the
/// decrement (O5′), and usually frees without a read-modify-write.
#[repr(transparent)]
pub(crate) struct EntryWeak<T: ?Sized>(std::mem::ManuallyDrop<Weak<T>>);

impl<T: ?Sized> EntryWeak<T> {
    pub(crate) fn new(weak: Weak<T>) -> Self {
        EntryWeak(std::mem::ManuallyDrop::new(weak))
    }
}

impl<T: ?Sized> std::ops::Deref for EntryWeak<T> {
    type Target = Weak<T>;

    #[inline]
    fn deref(&self) -> &Weak<T> {
        &self.0
    }
}

impl<T: ?Sized> EntryWeak<T> {
    /// Drops this entry's `Weak`, which stands for `refs` references: its
    /// own, and its object's implicit weak if the object's death handed it
    /// to the entry (`refs` 2, C21): what the entry's hook says
    /// (`Hook::watched_refs`).
    #[inline]
    pub(crate) fn release(self, refs: u32) {
        let mut this = std::mem::ManuallyDrop::new(self);
        // SAFETY: taken once, here; `this` is not dropped.
        Weak::drop_expecting_last_with(unsafe { std::mem::ManuallyDrop::take(&mut this.0) }, refs);
    }
}

impl<T: ?Sized> Drop for EntryWeak<T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: taken once, here; the field is not used again.
        Weak::drop_expecting_last(unsafe { std::mem::ManuallyDrop::take(&mut self.0) });
    }
}

impl<T> Default for Weak<T> {
    /// Same as [`Weak::new`].
    fn default() -> Self {
        Weak::new()
    }
}

impl<T: ?Sized> fmt::Debug for Weak<T> {
    /// `(Weak: alive)` or `(Weak: dead)`; never touches the value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_alive() {
            f.write_str("(Weak: alive)")
        } else {
            f.write_str("(Weak: dead)")
        }
    }
}

impl<T: ?Sized> PartialEq for Weak<T> {
    /// Identity, as [`Weak::ptr_eq`].
    fn eq(&self, other: &Self) -> bool {
        self.ptr_eq(other)
    }
}

impl<T: ?Sized> Eq for Weak<T> {}

impl<T: ?Sized> Hash for Weak<T> {
    /// Hashes the identity, which never changes when the object dies.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.identity().hash(state)
    }
}

impl<T: ?Sized> Unpin for Weak<T> {}
