//! Parallel iteration over the collections, with the `rayon` feature.
//!
//! `&WeakValueMap`, `&WeakKeyMap` and `&WeakSet` implement rayon's
//! `IntoParallelIterator`, so `use rayon::prelude::*` gives them
//! `par_iter()`. Shards are the unit of work: each is snapshotted under one
//! short pin, as sequential iteration does (M8), and the snapshots are
//! consumed in parallel. Weakly consistent, live members only.

use std::fmt;

use rayon::iter::plumbing::UnindexedConsumer;
use rayon::iter::{IntoParallelIterator, ParallelIterator};

/// A parallel iterator over a collection's live entries, shard by shard
/// (see `par_iter()` on [`WeakValueMap`](crate::WeakValueMap),
/// [`WeakKeyMap`](crate::WeakKeyMap) and [`WeakSet`](crate::WeakSet)).
///
/// ```
/// use rayon::prelude::*;
/// use weakrefs::{Strong, WeakSet};
///
/// let set = WeakSet::new();
/// let members: Vec<_> = (1..=100u64).map(Strong::new).collect();
/// for member in &members {
///     set.insert(member);
/// }
/// let sum: u64 = set.par_iter().map(|member| *member).sum();
/// assert_eq!(sum, 5050);
/// ```
pub struct ParIter<'a, T> {
    shards: usize,
    snapshot: Box<dyn Fn(usize) -> Vec<T> + Send + Sync + 'a>,
}

impl<'a, T> ParIter<'a, T> {
    pub(crate) fn new(
        shards: usize,
        snapshot: impl Fn(usize) -> Vec<T> + Send + Sync + 'a,
    ) -> Self {
        ParIter {
            shards,
            snapshot: Box::new(snapshot),
        }
    }
}

impl<T: Send> ParallelIterator for ParIter<'_, T> {
    type Item = T;

    fn drive_unindexed<C: UnindexedConsumer<T>>(self, consumer: C) -> C::Result {
        let snapshot = &self.snapshot;
        (0..self.shards)
            .into_par_iter()
            .flat_map_iter(snapshot)
            .drive_unindexed(consumer)
    }
}

impl<T> fmt::Debug for ParIter<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParIter")
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}
