//! `Boxed<T>`: an owned heap value whose *pointer* a table may copy
//! bitwise while readers hold references to the value.
//!
//! Items move between tables bitwise when a shard rebuilds (SAFETY.md, M3)
//! while lock-free readers still read the old copies. A key stored inline
//! could have interior mutability (an atomic hit counter, a `Mutex`, a
//! `OnceLock`) that a reader's `Eq` writes through `&K` at the moment the
//! writer copies it: a data race. Out of line, only the pointer is copied,
//! and every copy names the one `K`.
//!
//! It is a `Box` without `Box`'s uniqueness: copies of the pointer coexist
//! (only one is ever dropped), so it holds a raw pointer.

use std::fmt;
use std::ops::Deref;
use std::ptr::NonNull;

/// An owned `T` on the heap, dropped with the `Boxed`.
pub(crate) struct Boxed<T> {
    value: NonNull<T>,
}

// SAFETY: owns a `T` as `Box<T>` does.
unsafe impl<T: Send> Send for Boxed<T> {}
// SAFETY: hands out `&T` as `Box<T>` does.
unsafe impl<T: Sync> Sync for Boxed<T> {}

impl<T> Boxed<T> {
    pub(crate) fn new(value: T) -> Self {
        Boxed {
            value: NonNull::from(Box::leak(Box::new(value))),
        }
    }
}

impl<T> Deref for Boxed<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: allocated in `new`, freed only in `drop`, which needs the
        // `Boxed` by value.
        unsafe { self.value.as_ref() }
    }
}

impl<T> Drop for Boxed<T> {
    fn drop(&mut self) {
        // SAFETY: allocated by `Box` in `new`; this is the one drop (the
        // table that copies the pointer drops exactly one copy, M3).
        drop(unsafe { Box::from_raw(self.value.as_ptr()) });
    }
}

impl<T: fmt::Debug> fmt::Debug for Boxed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}
