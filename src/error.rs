//! `ReferenceError`: the error of using a dead weak reference.

use std::error::Error;
use std::fmt;

/// The object a [`Weak`](crate::Weak) named has died; returned by
/// [`Weak::try_upgrade`](crate::Weak::try_upgrade).
///
/// The message is Python's: `weakly-referenced object no longer exists`.
///
/// ```
/// use weakrefs::ReferenceError;
///
/// let err: Box<dyn std::error::Error> = Box::new(ReferenceError);
/// assert_eq!(err.to_string(), "weakly-referenced object no longer exists");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ReferenceError;

impl fmt::Display for ReferenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("weakly-referenced object no longer exists")
    }
}

impl Error for ReferenceError {}
