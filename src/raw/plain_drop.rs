//! Which keys drop without running the user's code.
//!
//! A removed entry is dropped where the epoch frees it: inside whatever
//! lookup next collects garbage, on any thread, perhaps inside a user's
//! `Eq` under another shard's lock. A destructor the user wrote could take
//! a lock that thread holds, so an entry whose drop may run user code is
//! moved out and dropped on the finalizer thread instead (SAFETY.md,
//! M10), at the price of two jobs on that one thread per removal: a
//! `WeakValueMap<String, _>` whose values die as fast as they are
//! inserted ran at 1-2.4 M operations a second that way, against 9 M with
//! `u64` keys.
//!
//! Rust cannot ask whether a type's drop glue reaches user code, but it
//! can name the standard types whose drop only frees memory (through the
//! global allocator, which every write here calls anyway): the strings,
//! paths and byte buffers that most caches are keyed by. [`runs_user_code`]
//! says false for those, and for types without drop glue.
//!
//! `WeakValueMap`'s keys use it; `WeakKeyMap`'s values do not. What a
//! thread hands the epoch waits in its own bag until it hands over more
//! (32 functions) or exits, and `flush` cannot reach another thread's bag:
//! an idle thread would keep up to 31 removed values, and a value may be
//! a large buffer, where a key is a name. The finalizer thread pushes its
//! garbage through whenever it goes idle.

use std::any::TypeId;
use std::borrow::Cow;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// True if dropping a `T` may run code the standard library did not
/// write: `T` has drop glue and is none of the types [`frees_only`] names.
/// Folds to a constant once inlined (a `TypeId` is a compile-time value).
#[inline(always)]
pub(crate) fn runs_user_code<T: 'static>() -> bool {
    std::mem::needs_drop::<T>() && !frees_only::<T>()
}

/// True if `T` is a standard type whose drop frees memory and does
/// nothing else: an owned or shared string, path, OS string, C string or
/// buffer of bytes, or a pair of a `String` and an integer or another
/// `String` (common composite keys).
#[inline(always)]
fn frees_only<T: 'static>() -> bool {
    macro_rules! any_of {
        ($($ty:ty),* $(,)?) => {
            false $(|| TypeId::of::<T>() == TypeId::of::<$ty>())*
        };
    }
    any_of!(
        String,
        Box<str>,
        Arc<str>,
        Cow<'static, str>,
        Vec<u8>,
        Box<[u8]>,
        Arc<[u8]>,
        Cow<'static, [u8]>,
        PathBuf,
        Box<Path>,
        Arc<Path>,
        Cow<'static, Path>,
        OsString,
        Box<OsStr>,
        Arc<OsStr>,
        CString,
        Box<CStr>,
        Arc<CStr>,
        (String, String),
        (String, u32),
        (String, u64),
        (String, usize),
        (u32, String),
        (u64, String),
        (usize, String),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Its destructor is the user's.
    struct Audited;

    impl Drop for Audited {
        fn drop(&mut self) {}
    }

    #[test]
    fn the_std_types_that_only_free_memory_are_told_apart_from_the_rest() {
        assert!(!runs_user_code::<u64>(), "no drop glue at all");
        assert!(!runs_user_code::<(u32, char)>(), "no drop glue at all");
        assert!(!runs_user_code::<String>());
        assert!(!runs_user_code::<Arc<str>>());
        assert!(!runs_user_code::<PathBuf>());
        assert!(!runs_user_code::<Vec<u8>>());
        assert!(!runs_user_code::<(String, u64)>());
        assert!(runs_user_code::<Audited>());
        assert!(runs_user_code::<Vec<Audited>>(), "a buffer of user types");
        assert!(
            runs_user_code::<Box<dyn Fn() + Send>>(),
            "a closure's captures"
        );
        assert!(runs_user_code::<Arc<Audited>>());
        assert!(
            runs_user_code::<crate::Strong<u64>>(),
            "a death runs callbacks"
        );
        assert!(
            runs_user_code::<Vec<String>>(),
            "not named: user code assumed"
        );
    }
}
