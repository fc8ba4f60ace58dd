//! `Strong<T>`: the owning handle.

use std::any::Any;
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
/// moment, exactly as with `Arc`. Its death callbacks are handed to the
/// finalizer thread. When that leaves more than 32 768 callbacks queued,
/// process-wide, and not yet run, the drop waits before it returns for the
/// finalizer thread to run those queued ahead of it, for at most 100 ms
/// (10 ms if it makes no progress), so that a flood of deaths cannot grow
/// the queue without end; inside a callback, a load's `init`, a read or a
/// `remove_if` predicate it does not wait, and the end of that scope does
/// instead ([`Stats::backlog_waits`](crate::Stats::backlog_waits)).
/// Comparison, ordering, hashing and
/// formatting delegate to the value, as for `Arc`; use [`Strong::ptr_eq`]
/// for identity. Unlike `Arc`, `==` calls `T::eq` even for two handles to
/// one object when `T: Eq` (`Arc` skips it through specialization, which
/// stable Rust lacks).
///
/// `T` may be unsized: `Strong<str>`, `Strong<[T]>` and
/// `Strong<dyn Trait>` come from the `From` impls (`&str`, `String`,
/// `&[T]`, `Vec<T>`, `[T; N]`, `Box<T>`), from `collect`, or from a sized
/// handle through [`unsize!`](crate::unsize), the stand-in for `Arc`'s
/// implicit coercion:
///
/// ```
/// use std::fmt::Display;
/// use weakrefs::Strong;
///
/// let shown: Strong<dyn Display + Send + Sync> = weakrefs::unsize!(Strong::new(7));
/// let name: Strong<str> = Strong::from("seven");
/// assert_eq!(format!("{shown} {name}"), "7 seven");
/// ```
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
pub struct Strong<T: ?Sized> {
    block: NonNull<ControlBlock<T>>,
    /// Names the block the handle points at. (Drop check comes from
    /// `Strong`'s own `Drop` impl, which, without `#[may_dangle]`, treats
    /// `T` as used when a `Strong<T>` is dropped.)
    _owns: PhantomData<ControlBlock<T>>,
}

// SAFETY: a `Strong<T>` sent to another thread lets that thread read the
// value (`Sync` needed) and maybe drop it (`Send` needed); the counts are
// atomic. The same bounds as `Arc<T>`.
unsafe impl<T: ?Sized + Send + Sync> Send for Strong<T> {}
// SAFETY: `&Strong<T>` gives `&T` (needs `T: Sync`) and can be cloned into
// a `Strong<T>` owned by the other thread (needs `T: Send`), as for `Arc<T>`.
unsafe impl<T: ?Sized + Send + Sync> Sync for Strong<T> {}

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
}

impl<T: ?Sized> Strong<T> {
    /// Wraps a block whose strong count already includes this handle.
    pub(crate) fn from_block(block: NonNull<ControlBlock<T>>) -> Self {
        Strong {
            block,
            _owns: PhantomData,
        }
    }

    /// The block this handle names (its count stays with the handle).
    pub(crate) fn block(this: &Self) -> NonNull<ControlBlock<T>> {
        this.block
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
        // Addresses only: two `Strong<dyn Trait>` to one object may carry
        // different vtables (one per codegen unit), as for `Arc::ptr_eq`.
        this.block.cast::<u8>() == other.block.cast::<u8>()
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
        this.block.cast::<u8>().as_ptr().addr()
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
        // its strong count, so the block is allocated and its value alive.
        Self::from_block(unsafe { ControlBlock::from_live_value_ptr(value) })
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

    /// The object's callback list (in the control block), for `finalize`,
    /// the collections' hooks and their removals' `note_detached`. The
    /// reference lives as long as this handle (C6).
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

impl<T> Strong<T> {
    /// Builds an object whose value holds a [`Weak`] handle to the object
    /// itself, as `Arc::new_cyclic` does: `build` gets the `Weak` before the
    /// value exists. Until `new_cyclic` returns, that `Weak` (and its
    /// clones) does not upgrade; afterwards it names the new object. If
    /// `build` panics, the `Weak`s it made stay dead, and the allocation is
    /// freed with the last of them.
    ///
    /// ```
    /// use weakrefs::{Strong, Weak};
    ///
    /// struct Node {
    ///     me: Weak<Node>,
    ///     name: &'static str,
    /// }
    ///
    /// let node = Strong::new_cyclic(|me| {
    ///     assert!(me.upgrade().is_none()); // not built yet
    ///     Node { me: me.clone(), name: "root" }
    /// });
    /// assert_eq!(node.me.upgrade().unwrap().name, "root");
    /// ```
    pub fn new_cyclic<F: FnOnce(&Weak<T>) -> T>(build: F) -> Self {
        // Strong count 0, weak count 1: `weak` owns the one weak reference,
        // so a panic in `build` drops it and frees the block (whose value
        // was never written: its place holds the layout `deallocate` reads,
        // written by `allocate_uninit`).
        let block = ControlBlock::<T>::allocate_uninit();
        let weak = Weak::from_block(block);
        let value = build(&weak);
        // The value field is allocated and holds only the layout
        // word, which the value may overwrite: `weak`, which becomes the
        // implicit weak below, keeps the block, and the word is written
        // again when the value goes (U2). Nothing reads the field while the
        // strong count is 0 (`upgrade` fails).
        // SAFETY: as just said.
        unsafe { ControlBlock::value_ptr(block).write(value) };
        // The weak reference becomes the implicit weak of the first strong
        // handle, so it is not released.
        std::mem::forget(weak);
        // SAFETY: `weak` kept the block allocated, and we just forgot it.
        unsafe { ControlBlock::header(block) }.publish_first_strong();
        Strong::from_block(block)
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
        // SAFETY: moved out just now, by the value's only user; the
        // implicit weak goes below.
        unsafe { ControlBlock::value_gone(this.block) };
        // The object is dead: its callbacks run and the implicit weak
        // reference goes with the last strong handle.
        drop(AfterDeath(this.block));
        Ok(value)
    }

    /// Returns the value if this is the last `Strong`, and `None`
    /// otherwise, as `Arc::into_inner`: when every holder of a `Strong`
    /// calls it, exactly one of them gets the value, even racing on several
    /// threads (`try_unwrap` could fail for all of them). As for
    /// [`Strong::try_unwrap`], the object dies when the value is taken.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let a = Strong::new(String::from("once"));
    /// let b = a.clone();
    /// let other = std::thread::spawn(move || Strong::into_inner(b));
    /// let mine = Strong::into_inner(a);
    /// let theirs = other.join().unwrap();
    /// assert_eq!(mine.xor(theirs).as_deref(), Some("once"));
    /// ```
    pub fn into_inner(this: Self) -> Option<T> {
        let this = ManuallyDrop::new(this);
        if !this.header().decrement_strong() {
            return None;
        }
        // SAFETY: `decrement_strong` took the count to zero and ran the
        // Acquire fence (O2): we are the value's only user, for good (I1,
        // I2); it is read once and `ManuallyDrop` skips `Strong::drop`.
        let value = unsafe { ptr::read(ControlBlock::value_ptr(this.block)) };
        // SAFETY: moved out just now, by the value's only user; the
        // implicit weak goes below.
        unsafe { ControlBlock::value_gone(this.block) };
        drop(AfterDeath(this.block));
        Some(value)
    }

    /// The value, moved out if this is the only `Strong` and cloned
    /// otherwise, as `Arc::unwrap_or_clone`.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let a = Strong::new(vec![1, 2]);
    /// let b = a.clone();
    /// let mut cloned = Strong::unwrap_or_clone(a); // `b` shares it: a clone
    /// cloned.push(3);
    /// assert_eq!(Strong::unwrap_or_clone(b), [1, 2]); // the last: moved out
    /// ```
    pub fn unwrap_or_clone(this: Self) -> T
    where
        T: Clone,
    {
        Strong::try_unwrap(this).unwrap_or_else(|shared| T::clone(&shared))
    }

    /// A mutable reference to the value, cloning it into a new object first
    /// if any other handle, strong or weak, names this one
    /// (clone-on-write), as `Arc::make_mut`:
    ///
    /// * other `Strong`s: the value is cloned into a new object that this
    ///   handle then names; the others keep the old one;
    /// * only `Weak`s: the value is *moved* into a new object (no clone);
    ///   the old object dies, so those `Weak`s stop upgrading and its death
    ///   callbacks ([`finalize`](crate::finalize), the collections'
    ///   entries) run, as for [`Strong::try_unwrap`]: they belong to the
    ///   object the `Weak`s named, not to the value. The new object has
    ///   none;
    /// * no other handle: the value is mutated in place.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let mut a = Strong::new(String::from("draft"));
    /// let b = a.clone();
    /// Strong::make_mut(&mut a).push_str(" 2"); // clones: `b` is untouched
    /// assert_eq!((a.as_str(), b.as_str()), ("draft 2", "draft"));
    ///
    /// let w = Strong::downgrade(&a);
    /// Strong::make_mut(&mut a).push('!'); // moves: `w` is left dead
    /// assert!(w.upgrade().is_none());
    /// assert_eq!(*a, "draft 2!");
    /// ```
    pub fn make_mut(this: &mut Self) -> &mut T
    where
        T: Clone,
    {
        if !this.header().try_take_last_strong() {
            // Another `Strong` exists: clone. A panicking clone leaves
            // `this` as it was.
            *this = Strong::new(T::clone(&**this));
        } else if this.header().has_weak_handles_when_dead() {
            // Only `Weak`s remain, and they can no longer upgrade (strong
            // is 0, I1): the object dies, the value moves on.
            let old = ManuallyDrop::new(std::mem::replace(
                this,
                // SAFETY: `try_take_last_strong` took the count from 1 to 0
                // and ran the Acquire fence: we are the value's only user,
                // for good (I1, I2). It is read once: `old` is not dropped.
                Strong::new(unsafe { ptr::read(ControlBlock::value_ptr(this.block)) }),
            ));
            // SAFETY: moved out just now, by the value's only user; the
            // implicit weak goes below.
            unsafe { ControlBlock::value_gone(old.block) };
            drop(AfterDeath(old.block));
        } else {
            // No other handle of either kind: put the count back and
            // mutate in place.
            this.header().publish_first_strong();
        }
        // `this` is now the only handle to its object, strong or
        // weak (a fresh object, or one whose weak count was 1 and strong 0
        // until we set it back: nothing could clone or downgrade it), and
        // `&mut this` keeps it so while the borrow lives.
        // SAFETY: as just said.
        unsafe { &mut *ControlBlock::value_ptr(this.block) }
    }
}

/// What follows an object's death, once its value is gone (dropped, or
/// moved out by `try_unwrap`) and the layout word written in its place
/// (`drop_value`, `value_gone`; SAFETY.md, U2): hand its callbacks to the
/// runtime, then release the implicit weak reference, unless the runtime
/// handed it to an entry its death removed (C21). A drop guard, so that a
/// panicking `T::drop` loses neither.
struct AfterDeath<T: ?Sized>(NonNull<ControlBlock<T>>);

impl<T: ?Sized> Drop for AfterDeath<T> {
    fn drop(&mut self) {
        // SAFETY: the implicit weak reference, released below or handed
        // to an entry, keeps the block allocated until then.
        let header = unsafe { ControlBlock::header(self.0) };
        let callbacks = header.callback_list();
        // No registration can race with the death (C6), so an empty list
        // stays empty: objects without callbacks skip the runtime. The
        // implicit weak is offered to an entry whose removal the death
        // makes: the entry then releases it with its own (C21), and we
        // touch the block no more. Taken here, the callbacks reach the
        // runtime without a reference into the block, which that entry's
        // drop may free while the runtime still runs.
        if !callbacks.is_empty() {
            // SAFETY: the object is dead (C6).
            let dead = unsafe { crate::callbacks::Dead::take(callbacks) };
            if crate::callbacks::global().on_death(dead, true) {
                return;
            }
        }
        // Most likely the last weak reference: no `Weak` was made, or
        // none is left (O5′).
        Weak::drop_expecting_last(Weak::from_block(self.0));
    }
}

impl<T: ?Sized> Clone for Strong<T> {
    /// Another handle to the same object.
    #[inline]
    fn clone(&self) -> Self {
        self.header().increment_strong();
        Strong::from_block(self.block)
    }
}

impl<T: ?Sized> Drop for Strong<T> {
    #[inline]
    fn drop(&mut self) {
        if self.header().decrement_strong() {
            self.drop_slow();
        }
    }
}

impl<T: ?Sized> Deref for Strong<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: this handle's strong count keeps the value alive and
        // initialised for as long as `&self`; it is only mutated through
        // `get_mut`, which needs `&mut self` of the sole handle.
        unsafe { &*ControlBlock::value_ptr(self.block) }
    }
}

impl<T: ?Sized> AsRef<T> for Strong<T> {
    fn as_ref(&self) -> &T {
        self
    }
}

impl<T: ?Sized> Borrow<T> for Strong<T> {
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

impl<T: ?Sized> From<Box<T>> for Strong<T> {
    /// Moves the boxed value into a new object (one allocation, one copy
    /// of the value's bytes), as `Arc::from(Box<T>)`; the box's memory is
    /// freed. This is how an unsized value of any type gets a `Strong`.
    ///
    /// ```
    /// use std::fmt::Display;
    /// use weakrefs::Strong;
    ///
    /// let boxed: Box<dyn Display + Send + Sync> = Box::new(42);
    /// let shown: Strong<dyn Display + Send + Sync> = Strong::from(boxed);
    /// assert_eq!(shown.to_string(), "42");
    /// ```
    fn from(boxed: Box<T>) -> Self {
        Strong::from_block(ControlBlock::from_box(boxed))
    }
}

impl<T: Clone> From<&[T]> for Strong<[T]> {
    /// A new object holding clones of `slice`'s elements. If a clone
    /// panics, the elements cloned so far are dropped and the allocation is
    /// freed.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let names: Strong<[String]> = Strong::from(&[String::from("a"), String::from("b")][..]);
    /// assert_eq!(names.len(), 2);
    /// ```
    fn from(slice: &[T]) -> Self {
        let mut filling = Filling::new(slice.len());
        for element in slice {
            filling.push(element.clone());
        }
        filling.finish()
    }
}

impl<T> From<Vec<T>> for Strong<[T]> {
    /// Moves `vec`'s elements into a new object (one copy of their bytes)
    /// and frees the vector's buffer.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let blob: Strong<[u8]> = Strong::from(vec![1, 2, 3]);
    /// assert_eq!(*blob, [1, 2, 3]);
    /// ```
    fn from(mut vec: Vec<T>) -> Self {
        let len = vec.len();
        let block = ControlBlock::<[T]>::allocate_slice(len);
        // The vector's first `len` elements are initialised; the
        // block's value is `len` uninitialised elements in another
        // allocation. After the copy the block owns them: `set_len(0)`
        // keeps the vector from dropping them too, and its drop only frees
        // its buffer.
        // SAFETY: as just said.
        unsafe {
            ptr::copy_nonoverlapping(
                vec.as_ptr(),
                ControlBlock::value_ptr(block).cast::<T>(),
                len,
            );
            vec.set_len(0);
        }
        Strong::from_block(block)
    }
}

impl<T> FromIterator<T> for Strong<[T]> {
    /// Collects into a new object (through a `Vec`, as `Arc` does for
    /// iterators of unknown length).
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let squares: Strong<[u32]> = (1..=3).map(|n| n * n).collect();
    /// assert_eq!(*squares, [1, 4, 9]);
    /// ```
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Strong::from(iter.into_iter().collect::<Vec<T>>())
    }
}

impl From<&str> for Strong<str> {
    /// A new object holding a copy of `text`.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let template: Strong<str> = Strong::from("<h1>{title}</h1>");
    /// assert!(template.starts_with("<h1>"));
    /// ```
    fn from(text: &str) -> Self {
        let bytes = Strong::<[u8]>::from(text.as_bytes());
        let bytes = ManuallyDrop::new(bytes);
        // The bytes came from a `str`, so they are UTF-8; the handle's
        // strong count passes to the new one.
        Strong::from_block(ControlBlock::into_str(bytes.block))
    }
}

impl From<String> for Strong<str> {
    /// A new object holding a copy of `text`'s bytes.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let name: Strong<str> = Strong::from(String::from("index.html"));
    /// assert_eq!(&*name, "index.html");
    /// ```
    fn from(text: String) -> Self {
        Strong::from(text.as_str())
    }
}

impl Default for Strong<str> {
    /// A new object holding `""`.
    fn default() -> Self {
        Strong::from("")
    }
}

impl<T> Default for Strong<[T]> {
    /// A new object holding no elements.
    fn default() -> Self {
        Strong::from(Vec::new())
    }
}

impl<T, const N: usize> From<[T; N]> for Strong<[T]> {
    /// Moves the array into a new object seen as a slice (one allocation).
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let primes: Strong<[u8]> = Strong::from([2, 3, 5]);
    /// assert_eq!(primes.len(), 3);
    /// ```
    fn from(array: [T; N]) -> Self {
        crate::unsize!(Strong::new(array))
    }
}

impl<T, const N: usize> TryFrom<Strong<[T]>> for Strong<[T; N]> {
    type Error = Strong<[T]>;

    /// The same object seen as an array if it holds exactly `N` elements;
    /// otherwise the handle back.
    ///
    /// ```
    /// use weakrefs::Strong;
    ///
    /// let slice: Strong<[u32]> = Strong::from(vec![1, 2, 3]);
    /// assert!(Strong::<[u32; 2]>::try_from(slice.clone()).is_err());
    /// let array: Strong<[u32; 3]> = slice.try_into().unwrap();
    /// assert_eq!(*array, [1, 2, 3]);
    /// ```
    fn try_from(slice: Strong<[T]>) -> Result<Self, Self::Error> {
        if slice.len() != N {
            return Err(slice);
        }
        let slice = ManuallyDrop::new(slice);
        // `ControlBlock<[T; N]>` and `ControlBlock<[T]>` of length `N` have
        // one `repr(C)` layout (U1), so the thin cast names the same block;
        // the strong count passes to the new handle.
        Ok(Strong::from_block(
            slice.block.cast::<ControlBlock<[T; N]>>(),
        ))
    }
}

impl Strong<dyn Any + Send + Sync> {
    /// The same object as a `Strong<T>` if its value is a `T`, as
    /// `Arc::downcast`; otherwise the handle back.
    ///
    /// ```
    /// use std::any::Any;
    /// use weakrefs::Strong;
    ///
    /// let any: Strong<dyn Any + Send + Sync> = weakrefs::unsize!(Strong::new(7_i32));
    /// let any = any.downcast::<u32>().unwrap_err();
    /// let number: Strong<i32> = any.downcast().unwrap();
    /// assert_eq!(*number, 7);
    /// ```
    pub fn downcast<T: Any + Send + Sync>(self) -> Result<Strong<T>, Self> {
        if !(*self).is::<T>() {
            return Err(self);
        }
        let this = ManuallyDrop::new(self);
        // The value's dynamic type is `T`, so the block was laid out as a
        // `ControlBlock<T>` (U1: the `dyn` view has the same `repr(C)`
        // offsets); the thin cast drops the vtable and keeps the address
        // and provenance. The strong count passes to the new handle.
        Ok(Strong::from_block(this.block.cast::<ControlBlock<T>>()))
    }
}

/// A slice block being filled one element at a time. Dropped before
/// `finish` (a panicking clone), it drops the elements written so far and
/// frees the block, so nothing leaks and nothing is dropped twice.
struct Filling<T> {
    block: NonNull<ControlBlock<[T]>>,
    written: usize,
}

impl<T> Filling<T> {
    fn new(len: usize) -> Self {
        Filling {
            block: ControlBlock::allocate_slice(len),
            written: 0,
        }
    }

    /// Writes the next element.
    fn push(&mut self, element: T) {
        let slot = ControlBlock::value_ptr(self.block).cast::<T>();
        assert!(
            self.written < slot_count(self.block),
            "more elements than allocated"
        );
        // SAFETY: `written` is below the length the block was allocated
        // for (checked above), and that slot is not yet initialised.
        unsafe { slot.add(self.written).write(element) };
        self.written += 1;
    }

    /// The finished object; every element must have been written.
    fn finish(self) -> Strong<[T]> {
        assert_eq!(
            self.written,
            slot_count(self.block),
            "fewer elements than allocated"
        );
        let this = ManuallyDrop::new(self);
        Strong::from_block(this.block)
    }
}

/// The number of elements a slice block holds (its metadata).
fn slot_count<T>(block: NonNull<ControlBlock<[T]>>) -> usize {
    ControlBlock::value_ptr(block).len()
}

impl<T> Drop for Filling<T> {
    fn drop(&mut self) {
        let elements = ptr::slice_from_raw_parts_mut(
            ControlBlock::value_ptr(self.block).cast::<T>(),
            self.written,
        );
        // Drops the elements, then frees the block even if one of their
        // destructors panics.
        let _free = FreeBlock(self.block);
        // SAFETY: the first `written` elements were initialised by `push`
        // and are owned by nobody else: the block was never shared.
        unsafe { ptr::drop_in_place(elements) };
    }
}

/// Frees a slice block that was never shared, whose elements are already
/// gone or were never all written.
struct FreeBlock<T>(NonNull<ControlBlock<[T]>>);

impl<T> Drop for FreeBlock<T> {
    fn drop(&mut self) {
        // SAFETY: the block was never shared and its elements are gone;
        // its one weak reference goes just below.
        unsafe { ControlBlock::elements_gone(self.0) };
        // The block's one weak reference (the implicit weak of its one,
        // never published, strong count) is released here: its strong
        // count stays 1, which nobody will ever read.
        drop(Weak::from_block(self.0));
    }
}

impl<T: Default> Default for Strong<T> {
    /// A new object holding `T::default()`.
    fn default() -> Self {
        Strong::new(T::default())
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Strong<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: ?Sized + fmt::Display> fmt::Display for Strong<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&**self, f)
    }
}

impl<T: ?Sized> fmt::Pointer for Strong<T> {
    /// The address of the value, as [`Strong::as_ptr`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Pointer::fmt(&Strong::as_ptr(self), f)
    }
}

impl<T: ?Sized + PartialEq> PartialEq for Strong<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: ?Sized + Eq> Eq for Strong<T> {}

impl<T: ?Sized + PartialOrd> PartialOrd for Strong<T> {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        (**self).partial_cmp(&**other)
    }
}

impl<T: ?Sized + Ord> Ord for Strong<T> {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (**self).cmp(&**other)
    }
}

impl<T: ?Sized + Hash> Hash for Strong<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state)
    }
}

impl<T: ?Sized> Unpin for Strong<T> {}
