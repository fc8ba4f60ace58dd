//! The `arc-swap` feature: `Strong<T>` and `Weak<T>` as arc-swap's
//! reference-counted pointers, so `ArcSwapAny<Strong<T>>` (a hot-swappable
//! slot of the current config, template set, ...) and
//! `ArcSwapAny<Weak<T>>` work as they do with `Arc` and `std::sync::Weak`.
//!
//! ```
//! use arc_swap::ArcSwapAny;
//! use weakrefs::Strong;
//!
//! let current: ArcSwapAny<Strong<String>> = ArcSwapAny::new(Strong::new(String::from("v1")));
//! assert_eq!(**current.load(), "v1");
//! let old = current.swap(Strong::new(String::from("v2")));
//! assert_eq!(*old, "v1");
//! assert_eq!(**current.load(), "v2");
//! ```

use arc_swap::RefCnt;

use crate::strong::Strong;
use crate::weak::Weak;

// SAFETY: arc-swap's contract, as for `Arc`: `into_ptr`/`from_ptr` are
// `Strong::into_raw`/`from_raw`, which hand the handle's strong count over
// and back unchanged; the pointer is the value's address inside the
// object's one allocation, so two handles give the same pointer exactly
// when they name the same object (zero-sized values included: the value
// sits after the counts), and moving a handle never changes it.
unsafe impl<T> RefCnt for Strong<T> {
    type Base = T;

    fn into_ptr(me: Self) -> *mut T {
        Strong::into_raw(me).cast_mut()
    }

    fn as_ptr(me: &Self) -> *mut T {
        Strong::as_ptr(me).cast_mut()
    }

    unsafe fn from_ptr(ptr: *const T) -> Self {
        // SAFETY: arc-swap passes back only pointers from `into_ptr` (or
        // `inc`, which is `into_ptr` of a clone), each once.
        unsafe { Strong::from_raw(ptr) }
    }
}

// SAFETY: as for `Strong`, with the weak count: `into_raw`/`from_raw`
// hand it over and back. `Weak::new()` handles, which name no object, all
// share one dangling pointer that no object has, and `from_raw` turns it
// back into `Weak::new()` (std's `Weak` does the same).
unsafe impl<T> RefCnt for Weak<T> {
    type Base = T;

    fn into_ptr(me: Self) -> *mut T {
        me.into_raw().cast_mut()
    }

    fn as_ptr(me: &Self) -> *mut T {
        Weak::as_ptr(me).cast_mut()
    }

    unsafe fn from_ptr(ptr: *const T) -> Self {
        // SAFETY: as for `Strong`.
        unsafe { Weak::from_raw(ptr) }
    }
}
