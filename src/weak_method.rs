//! `WeakMethod`: a method bound to a weakly held receiver.

use std::fmt;

use crate::strong::Strong;
use crate::weak::Weak;

/// A method bound to a receiver that it does not keep alive, like Python's
/// `weakref.WeakMethod`: the usual shape of an event subscriber that must
/// not outlive the object it notifies.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use weakrefs::{Strong, WeakMethod};
///
/// struct Metrics { hits: AtomicU64 }
///
/// let metrics = Strong::new(Metrics { hits: AtomicU64::new(0) });
/// let on_hit = WeakMethod::new(&metrics, |m: &Metrics, n: u64| {
///     m.hits.fetch_add(n, Ordering::Relaxed)
/// });
/// assert_eq!(on_hit.call(2), Some(0));
/// assert_eq!(metrics.hits.load(Ordering::Relaxed), 2);
///
/// drop(metrics);
/// assert_eq!(on_hit.call(1), None); // the receiver is gone
/// ```
pub struct WeakMethod<T: ?Sized, F> {
    receiver: Weak<T>,
    method: F,
}

impl<T: ?Sized, F> WeakMethod<T, F> {
    /// Binds `method` to `receiver`, holding the receiver weakly.
    ///
    /// ```
    /// let s = weakrefs::Strong::new(String::from("abc"));
    /// let len = weakrefs::WeakMethod::new(&s, |s: &String, ()| s.len());
    /// assert_eq!(len.call(()), Some(3));
    /// ```
    pub fn new(receiver: &Strong<T>, method: F) -> Self {
        WeakMethod {
            receiver: Strong::downgrade(receiver),
            method,
        }
    }

    /// Calls the method on the receiver with `arg`, or returns `None` if
    /// the receiver has died. The receiver stays alive for the call.
    ///
    /// ```
    /// let n = weakrefs::Strong::new(10);
    /// let add = weakrefs::WeakMethod::new(&n, |n: &i32, x: i32| n + x);
    /// assert_eq!(add.call(5), Some(15));
    /// ```
    pub fn call<A, R>(&self, arg: A) -> Option<R>
    where
        F: Fn(&T, A) -> R,
    {
        let receiver = self.receiver.upgrade()?;
        Some((self.method)(&receiver, arg))
    }

    /// True while the receiver is alive.
    ///
    /// ```
    /// let n = weakrefs::Strong::new(1);
    /// let m = weakrefs::WeakMethod::new(&n, |n: &i32, ()| *n);
    /// assert!(m.is_alive());
    /// drop(n);
    /// assert!(!m.is_alive());
    /// ```
    pub fn is_alive(&self) -> bool {
        self.receiver.is_alive()
    }
}

impl<T: ?Sized, F: Clone> Clone for WeakMethod<T, F> {
    fn clone(&self) -> Self {
        WeakMethod {
            receiver: self.receiver.clone(),
            method: self.method.clone(),
        }
    }
}

impl<T: ?Sized, F> fmt::Debug for WeakMethod<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakMethod")
            .field("receiver", &self.receiver)
            .finish_non_exhaustive()
    }
}
