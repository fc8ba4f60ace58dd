//! `unsize!`: `Strong<T>` to `Strong<dyn Trait>` (or `Strong<[T]>` from
//! `Strong<[T; N]>`) on stable Rust.
//!
//! `Arc<T>` coerces to `Arc<dyn Trait>` through `CoerceUnsized`, which
//! stable Rust does not let other crates implement. What stable Rust does
//! allow is the unsizing coercion of a *reference* to a struct whose last
//! field is the value: `&ControlBlock<Printer>` to
//! `&ControlBlock<dyn Listener>`. The macro writes that coercion, as the
//! closure `|block| block`, in the caller's code, where the compiler checks
//! that `Printer: Unsize<dyn Listener>`; [`unsize`] hands the closure the
//! handle's block and takes the metadata (vtable or length) of what comes
//! back. Why no safe caller can make it return a wrong pointer: SAFETY.md,
//! U4.

use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::control::{with_metadata_of, ControlBlock};
use crate::strong::Strong;
use crate::weak::Weak;

/// Turns a [`Strong<T>`](crate::Strong) or a [`Weak<T>`](crate::Weak) into
/// a handle of an unsized type that `T` coerces to, taken from the context:
/// the stable stand-in for `Arc<T>`'s implicit coercion to
/// `Arc<dyn Trait>`. The handle's count passes to the new handle, which
/// names the same object (the same data address).
///
/// ```
/// use weakrefs::{Strong, Weak};
///
/// trait Listener: Send + Sync {
///     fn notify(&self, event: &str) -> String;
/// }
///
/// struct Printer;
///
/// impl Listener for Printer {
///     fn notify(&self, event: &str) -> String {
///         format!("printed {event}")
///     }
/// }
///
/// let printer = Strong::new(Printer);
/// let listener: Strong<dyn Listener> = weakrefs::unsize!(printer.clone());
/// let weak: Weak<dyn Listener> = weakrefs::unsize!(Strong::downgrade(&printer));
/// assert_eq!(weak.upgrade().unwrap().notify("start"), "printed start");
/// assert_eq!(listener.notify("stop"), "printed stop");
///
/// let bytes: Strong<[u8]> = weakrefs::unsize!(Strong::new([1, 2, 3]));
/// assert_eq!(bytes.len(), 3);
/// ```
///
/// A `Weak` whose object is dead (or not built yet: `new_cyclic`'s `Weak`
/// inside its closure), or that came from [`Weak::new`](crate::Weak::new),
/// becomes one that names no object: without a live value to coerce there
/// is no metadata to give it (SAFETY.md, U4).
///
/// ```
/// use std::fmt::Debug;
/// use weakrefs::{Strong, Weak};
///
/// let value = Strong::new(5);
/// let weak = Strong::downgrade(&value);
/// drop(value);
/// let weak: Weak<dyn Debug + Send + Sync> = weakrefs::unsize!(weak);
/// assert!(weak.upgrade().is_none());
/// ```
///
/// The target must be one the value coerces to; the compiler checks it:
///
/// ```compile_fail
/// use weakrefs::Strong;
///
/// struct NotDisplay;
/// let shown: Strong<dyn std::fmt::Display> = weakrefs::unsize!(Strong::new(NotDisplay));
/// ```
#[macro_export]
macro_rules! unsize {
    ($handle:expr $(,)?) => {
        $crate::__private::unsize($handle, ::core::marker::PhantomData, |block| block)
    };
}

/// What [`unsize!`] expands to. Not public API.
///
/// `_target` carries nothing but the output type, which the caller's
/// context fixes: the compiler checks closures after the other arguments,
/// so `U` is known by the time `|block| block` is checked, and the
/// coercion, not unification, makes its return type.
///
/// `coerce` must give back the block it is given, unsized. What safe code
/// can hand back instead is narrow: `ControlBlock` has no public
/// constructor, so every `&ControlBlock` is one this crate lent to such a
/// closure, unsized only by coercions the compiler checked, and borrowck
/// keeps each from outliving the call that lent it. The `for<'a>` bound
/// stops a block from leaving its closure, but not from being returned by
/// a closure nested inside it (for a different object): the address check
/// below is what refuses that (SAFETY.md, U4).
///
/// ```compile_fail
/// use std::fmt::Debug;
/// use std::marker::PhantomData;
/// use weakrefs::Strong;
///
/// // A block cannot leave the closure.
/// let mut kept = None;
/// let _: Strong<dyn Debug> = weakrefs::__private::unsize(Strong::new(1), PhantomData, |block| {
///     kept = Some(block);
///     block
/// });
/// ```
///
/// ```should_panic
/// use std::fmt::Debug;
/// use std::marker::PhantomData;
/// use weakrefs::Strong;
///
/// // A block returned for another object's: refused at run time.
/// let _: Strong<dyn Debug> = weakrefs::__private::unsize(Strong::new(1), PhantomData, |outer| {
///     let _: Strong<dyn Debug> =
///         weakrefs::__private::unsize(Strong::new(2), PhantomData, |_inner| outer);
///     outer
/// });
/// ```
#[doc(hidden)]
pub fn unsize<H, T, U, Out>(
    handle: H,
    _target: PhantomData<Out>,
    coerce: impl for<'a> FnOnce(&'a ControlBlock<T>) -> &'a ControlBlock<U>,
) -> Out
where
    H: Unsizable<T, U, Out>,
    T: ?Sized,
    U: ?Sized,
{
    handle.unsize_with(coerce)
}

/// A handle that [`unsize`] can turn into `Out`, a handle to a `U`.
/// Not public API. Implementing it for other types gains nothing: it has
/// no unsafe contract and `unsize` only calls it.
#[doc(hidden)]
pub trait Unsizable<T: ?Sized, U: ?Sized, Out> {
    /// The handle to the same object, with the metadata `coerce` gives.
    fn unsize_with(
        self,
        coerce: impl for<'a> FnOnce(&'a ControlBlock<T>) -> &'a ControlBlock<U>,
    ) -> Out;
}

impl<T: ?Sized, U: ?Sized> Unsizable<T, U, Strong<U>> for Strong<T> {
    fn unsize_with(
        self,
        coerce: impl for<'a> FnOnce(&'a ControlBlock<T>) -> &'a ControlBlock<U>,
    ) -> Strong<U> {
        let block = Strong::block(&self);
        // SAFETY: `self`'s strong count keeps the block allocated and its
        // value alive for the borrow, and no `&mut` to the value exists
        // (`get_mut` and `make_mut` borrow the handle we own).
        let coerced = NonNull::from(coerce(unsafe { block.as_ref() }));
        // Load-bearing (U4): a live `&ControlBlock` at this address is a
        // view of this very object, whose metadata a checked coercion made.
        assert!(
            coerced.cast::<u8>() == block.cast::<u8>(),
            "unsize!: the coercion must return the block it was given",
        );
        // `coerced` has the right metadata, but the provenance of a shared
        // reference: keep the handle's own pointer, with that metadata.
        let unsized_block = with_metadata_of(block.cast::<u8>(), coerced.as_ptr());
        // The strong count passes from `self` to the new handle.
        std::mem::forget(self);
        Strong::from_block(unsized_block)
    }
}

impl<T: ?Sized, U: ?Sized> Unsizable<T, U, Weak<U>> for Weak<T> {
    fn unsize_with(
        self,
        coerce: impl for<'a> FnOnce(&'a ControlBlock<T>) -> &'a ControlBlock<U>,
    ) -> Weak<U> {
        // The coercion borrows a live value only (I4): a dead or unset
        // `Weak` has none, and becomes one that names no object.
        let Some(strong) = self.upgrade() else {
            return Weak::unset();
        };
        let strong: Strong<U> = strong.unsize_with(coerce);
        // `self`'s weak count passes to a `Weak` with the new metadata; the
        // temporary `Strong` goes (maybe as the last one: then the value
        // is dropped through the new metadata, which describes it too).
        std::mem::forget(self);
        Weak::from_block(Strong::block(&strong))
    }
}
