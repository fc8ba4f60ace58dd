//! The `arc-swap` feature: `Strong<T>` and `Weak<T>` as arc-swap's
//! reference-counted pointers, so `ArcSwapAny<Strong<T>>` (a hot-swappable
//! slot of the current config, template set, ...) and
//! `ArcSwapAny<Weak<T>>` work as they do with `Arc` and `std::sync::Weak`.
//! For sized `T` only, as with `Arc`: arc-swap keeps a thin pointer
//! (`RefCnt::Base` must be sized), which cannot carry an unsized value's
//! metadata.
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

// arc-swap's contract, as for `Arc`: `into_ptr`/`from_ptr` are
// `Strong::into_raw`/`from_raw`, which hand the handle's strong count over
// and back unchanged; the pointer is the value's address inside the
// object's one allocation, so two `Strong`s give the same pointer exactly
// when they name the same object (zero-sized values included: the value
// sits after the counts), and moving a handle never changes it. `Weak`
// shares those addresses with another count, hence its own `TAG`.
#[cfg_attr(docsrs, doc(cfg(feature = "arc-swap")))]
// SAFETY: as just argued; nothing here panics (SAFETY.md, section 4).
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

// As for `Strong`, with the weak count: `into_raw`/`from_raw`
// hand it over and back. A `Weak` and a `Strong` to one object give the
// same pointer but own different counts, so `Weak` uses its own debt tag
// (`TAG`, arc-swap 1.9.4 on; a cold review showed a `Strong` slot's writer
// paying a `Weak` slot reader's debt with the wrong count without it):
// the value's address is at least 4-aligned (it follows the header's
// two 32-bit counts and its word), so bit 0 is free. `Weak::new()`
// handles, which name no object, map to null, which owns no count, as
// arc-swap's own `Weak` impl does.
#[cfg_attr(docsrs, doc(cfg(feature = "arc-swap")))]
// SAFETY: as just argued; nothing here panics (SAFETY.md, section 4).
unsafe impl<T> RefCnt for Weak<T> {
    type Base = T;

    const TAG: usize = 1;

    fn into_ptr(me: Self) -> *mut T {
        if me.is_unset() {
            return std::ptr::null_mut();
        }
        me.into_raw().cast_mut()
    }

    fn as_ptr(me: &Self) -> *mut T {
        if me.is_unset() {
            return std::ptr::null_mut();
        }
        Weak::as_ptr(me).cast_mut()
    }

    unsafe fn from_ptr(ptr: *const T) -> Self {
        if ptr.is_null() {
            return Weak::new();
        }
        // SAFETY: as for `Strong`.
        unsafe { Weak::from_raw(ptr) }
    }
}
