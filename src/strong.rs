//! `Strong<T>`: the owning handle.

use std::borrow::Borrow;
use std::cmp::Ordering as CmpOrdering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::ptr::{self, NonNull};

use crate::control::ControlBlock;
use crate::weak::Weak;

/// An owning, thread-safe, reference-counted handle, like [`std::sync::Arc`],
/// whose object can also be named by [`Weak`] handles.
///
/// The value is dropped in the thread that drops the last `Strong`, at that
/// moment, exactly as with `Arc`. Comparison, ordering, hashing and
/// formatting delegate to the value, as for `Arc`; use [`Strong::ptr_eq`]
/// for identity.
///
/// # Examples
///
/// ```
/// use weakrefs::Strong;
///
/// let page = Strong::new(String::from("<html>…</html>"));
/// let same_page = Strong::clone(&page);
/// assert!(Strong::ptr_eq(&page, &same_page));
/// assert_eq!(Strong::strong_count(&page), 2);
/// assert_eq!(page.len(), same_page.len()); // Deref to the value
/// ```
///
/// `Strong<T>` is `Send` and `Sync` exactly when `T` is both, like `Arc<T>`:
///
/// ```compile_fail
/// fn needs_send<S: Send>(_: S) {}
/// needs_send(weakrefs::Strong::new(std::rc::Rc::new(1)));
/// ```
///
/// ```compile_fail
/// fn needs_sync<S: Sync>(_: S) {}
/// needs_sync(weakrefs::Strong::new(std::cell::Cell::new(1)));
/// ```
pub struct Strong<T> {
    block: NonNull<ControlBlock<T>>,
    /// This handle owns a share of a `T` (for drop check).
    _owns: PhantomData<ControlBlock<T>>,
}

// SAFETY: a `Strong<T>` sent to another thread lets that thread read the
// value (`Sync` needed) and maybe drop it (`Send` needed); the counts are
// atomic. The same bounds as `Arc<T>`.
unsafe impl<T: Send + Sync> Send for Strong<T> {}
// SAFETY: `&Strong<T>` gives `&T` (needs `T: Sync`) and can be cloned into
// a `Strong<T>` owned by the other thread (needs `T: Send`), as for `Arc<T>`.
unsafe impl<T: Send + Sync> Sync for Strong<T> {}

impl<T> Strong<T> {
    /// Moves `value` into a new object with one strong handle.
    ///
    /// ```
    /// let n = weakrefs::Strong::new(5);
    /// assert_eq!(*n, 5);
    /// ```
    pub fn new(value: T) -> Self {
        Strong {
            block: ControlBlock::allocate(value),
            _owns: PhantomData,
        }
    }

    /// Wraps a block whose strong count already includes this handle.
    pub(crate) fn from_block(block: NonNull<ControlBlock<T>>) -> Self {
        Strong {
            block,
            _owns: PhantomData,
        }
    }

    #[inline(always)]
    fn header(&self) -> &crate::control::Header {
        // SAFETY: this handle holds a strong count, hence the implicit weak,
        // so the block is live for as long as `&self`.
        unsafe { ControlBlock::header(self.block) }
    }

    /// Creates a [`Weak`] handle to the same object.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let doc = Strong::new("parsed document");
    /// let weak = Strong::downgrade(&doc);
    /// assert!(weak.is_alive());
    /// drop(doc);
    /// assert!(weak.upgrade().is_none());
    /// ```
    pub fn downgrade(this: &Self) -> Weak<T> {
        this.header().increment_weak_from_strong();
        Weak::from_block(this.block)
    }

    /// Number of `Strong` handles to this object, this one included.
    ///
    /// Other threads may change it at any moment; use it for statistics.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let a = Strong::new(());
    /// let _b = a.clone();
    /// assert_eq!(Strong::strong_count(&a), 2);
    /// ```
    pub fn strong_count(this: &Self) -> usize {
        this.header().strong()
    }

    /// Number of [`Weak`] handles to this object (Python's
    /// `weakref.getweakrefcount`).
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let a = Strong::new(());
    /// let w = Strong::downgrade(&a);
    /// assert_eq!(Strong::weak_count(&a), 1);
    /// drop(w);
    /// assert_eq!(Strong::weak_count(&a), 0);
    /// ```
    pub fn weak_count(this: &Self) -> usize {
        this.header().weak_handles()
    }

    /// True when both handles name the same object (identity, not value).
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let a = Strong::new(1);
    /// let b = Strong::new(1);
    /// assert!(a == b); // equal values
    /// assert!(!Strong::ptr_eq(&a, &b)); // different objects
    /// ```
    pub fn ptr_eq(this: &Self, other: &Self) -> bool {
        this.block == other.block
    }

    /// Drops `this` unless it is the last handle, which it gives back: a
    /// thread that must not run the value's destructor (a collection's
    /// removal callback, on a dying thread) hands that one elsewhere.
    pub(crate) fn drop_unless_last(this: Self) -> Option<Self> {
        if this.header().decrement_strong_unless_last() {
            std::mem::forget(this);
            None
        } else {
            Some(this)
        }
    }

    /// The object's identity, as [`Weak`]'s `Eq` and `Hash` see it: its
    /// block's address.
    pub(crate) fn identity(this: &Self) -> usize {
        this.block.as_ptr() as usize
    }

    /// A pointer to the value. It stays valid while any `Strong` lives.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let a = Strong::new(7);
    /// let p = Strong::as_ptr(&a);
    /// // SAFETY: `a` keeps the value alive.
    /// assert_eq!(unsafe { *p }, 7);
    /// ```
    pub fn as_ptr(this: &Self) -> *const T {
        ControlBlock::value_ptr(this.block)
    }

    /// Consumes the handle without releasing it and returns a pointer to
    /// the value, as `Arc::into_raw` does. [`Strong::from_raw`] turns it
    /// back into a handle; until then the object cannot die (and leaks if
    /// never turned back).
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let raw = Strong::into_raw(Strong::new(String::from("kept")));
    /// // SAFETY: from `into_raw`, turned back once.
    /// let back = unsafe { Strong::from_raw(raw) };
    /// assert_eq!(*back, "kept");
    /// ```
    pub fn into_raw(this: Self) -> *const T {
        let value = Self::as_ptr(&this);
        std::mem::forget(this);
        value
    }

    /// Rebuilds a handle from [`Strong::into_raw`]'s pointer.
    ///
    /// # Safety
    ///
    /// `value` came from `Strong::<T>::into_raw` (the same `T`), and each
    /// such pointer is turned back once.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let a = Strong::new(1);
    /// let raw = Strong::into_raw(a.clone());
    /// // SAFETY: from `into_raw`, turned back once.
    /// let b = unsafe { Strong::from_raw(raw) };
    /// assert!(Strong::ptr_eq(&a, &b));
    /// ```
    pub unsafe fn from_raw(value: *const T) -> Self {
        // SAFETY: the pointer came from `into_raw`, whose handle still owns
        // its strong count, so the block is allocated.
        Self::from_block(unsafe { ControlBlock::from_value_ptr(value) })
    }

    /// Returns the value if this is the only `Strong`; otherwise gives the
    /// handle back. `Weak` handles do not prevent it: they simply find the
    /// object dead afterwards. The object dies here, so its death callbacks
    /// (see [`finalize`](crate::finalize)) are queued, although the value
    /// lives on in the caller's hands.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let a = Strong::new(String::from("mine"));
    /// let w = Strong::downgrade(&a);
    /// let b = a.clone();
    /// let a = Strong::try_unwrap(a).unwrap_err(); // `b` still shares it
    /// drop(b);
    /// assert_eq!(Strong::try_unwrap(a).unwrap(), "mine");
    /// assert!(w.upgrade().is_none());
    /// ```
    pub fn try_unwrap(this: Self) -> Result<T, Self> {
        if !this.header().try_take_last_strong() {
            return Err(this);
        }
        let this = ManuallyDrop::new(this);
        // It is read exactly once, and `ManuallyDrop` keeps `Strong::drop`
        // from dropping it again.
        // SAFETY: `try_take_last_strong` took the count from 1 to 0 and ran
        // the Acquire fence: we are the value's only user, for good (I1, I2).
        let value = unsafe { ptr::read(ControlBlock::value_ptr(this.block)) };
        // The object is dead: its callbacks run and the implicit weak
        // reference goes with the last strong handle.
        drop(AfterDeath(this.block));
        Ok(value)
    }

    /// A mutable reference to the value if no other handle, strong or weak,
    /// names this object.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let mut a = Strong::new(vec![1]);
    /// Strong::get_mut(&mut a).unwrap().push(2);
    /// let w = Strong::downgrade(&a);
    /// assert!(Strong::get_mut(&mut a).is_none()); // a Weak could upgrade
    /// drop(w);
    /// assert_eq!(*a, [1, 2]);
    /// ```
    pub fn get_mut(this: &mut Self) -> Option<&mut T> {
        if this.header().is_unique() {
            // `&mut self` stops this handle from being cloned or downgraded
            // while the borrow lives.
            // SAFETY: `is_unique` saw no other strong or weak handle while the
            // weak count was locked (I6), and none can be created (above).
            Some(unsafe { &mut *ControlBlock::value_ptr(this.block) })
        } else {
            None
        }
    }

    /// The object's callback list (in the control block), for `finalize`.
    /// The reference lives as long as this handle.
    pub(crate) fn callback_list(this: &Self) -> &crate::callbacks::ObjectCallbacks {
        this.header().callback_list()
    }

    /// The slow half of `drop`: runs in the thread whose decrement took the
    /// strong count to zero.
    #[cold]
    #[inline(never)]
    fn drop_slow(&mut self) {
        // Declared first, dropped last: callbacks and the implicit weak go
        // even if the value's `Drop` panics.
        let _after = AfterDeath(self.block);
        // SAFETY: `decrement_strong` returned true: our decrement took the
        // count to zero and executed the Acquire fence (O2), and it can only
        // do so once per object (I1).
        unsafe { ControlBlock::drop_value(self.block) };
    }
}

/// What follows an object's death, once its value is gone (dropped, or
/// moved out by `try_unwrap`): hand its callbacks to the runtime, then
/// release the implicit weak reference. A drop guard, so that a panicking
/// `T::drop` loses neither.
struct AfterDeath<T>(NonNull<ControlBlock<T>>);

impl<T> Drop for AfterDeath<T> {
    fn drop(&mut self) {
        // SAFETY: the implicit weak reference, released below, keeps the
        // block allocated until then.
        let header = unsafe { ControlBlock::header(self.0) };
        let callbacks = header.callback_list();
        // No registration can race with the death (C6), so an empty list
        // stays empty: objects without callbacks skip the runtime.
        if !callbacks.is_empty() {
            crate::callbacks::global().on_death(callbacks);
        }
        drop(Weak::from_block(self.0));
    }
}

impl<T> Clone for Strong<T> {
    /// Another handle to the same object.
    #[inline]
    fn clone(&self) -> Self {
        self.header().increment_strong();
        Strong::from_block(self.block)
    }
}

impl<T> Drop for Strong<T> {
    #[inline]
    fn drop(&mut self) {
        if self.header().decrement_strong() {
            self.drop_slow();
        }
    }
}

impl<T> Deref for Strong<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: this handle's strong count keeps the value alive and
        // initialised for as long as `&self`; it is only mutated through
        // `get_mut`, which needs `&mut self` of the sole handle.
        unsafe { &*ControlBlock::value_ptr(self.block) }
    }
}

impl<T> AsRef<T> for Strong<T> {
    fn as_ref(&self) -> &T {
        self
    }
}

impl<T> Borrow<T> for Strong<T> {
    fn borrow(&self) -> &T {
        self
    }
}

impl<T> From<T> for Strong<T> {
    /// Same as [`Strong::new`].
    fn from(value: T) -> Self {
        Strong::new(value)
    }
}

impl<T: Default> Default for Strong<T> {
    /// A new object holding `T::default()`.
    fn default() -> Self {
        Strong::new(T::default())
    }
}

impl<T: fmt::Debug> fmt::Debug for Strong<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: fmt::Display> fmt::Display for Strong<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&**self, f)
    }
}

impl<T> fmt::Pointer for Strong<T> {
    /// The address of the value, as [`Strong::as_ptr`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Pointer::fmt(&Strong::as_ptr(self), f)
    }
}

impl<T: PartialEq> PartialEq for Strong<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Eq> Eq for Strong<T> {}

impl<T: PartialOrd> PartialOrd for Strong<T> {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        (**self).partial_cmp(&**other)
    }
}

impl<T: Ord> Ord for Strong<T> {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (**self).cmp(&**other)
    }
}

impl<T: Hash> Hash for Strong<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state)
    }
}

impl<T> Unpin for Strong<T> {}
