//! The shard machinery the collections share (SAFETY.md, section 7).
//!
//! A `ShardedTable<I>` holds items of type `I` (a collection's entry) in
//! shards picked by the top bits of a 64-bit hash. Within a shard, a table
//! of buckets, each an immutable *bucket array* of item pointers, published
//! through a crossbeam-epoch `Atomic`.
//!
//! * **Reads** pin the epoch and follow table → bucket array → items with
//!   Acquire loads; they take no lock and never block (M1).
//! * **Writes** take the shard's mutex, build a new bucket array (copy on
//!   write), publish it with a Release store, and retire what they
//!   unlinked (M2). Retirement happens after the mutex is released, so the
//!   destructors of keys and values, which are user code, never run under
//!   a shard lock.
//! * **Growth** builds a table twice as large whose arrays point at the
//!   same items and publishes it; readers still on the old table find
//!   every item that was there when they loaded it (M3).
//!
//! Items are immutable once published. Replacing one means publishing a
//! new item and retiring the old.

use std::marker::PhantomData;
use std::sync::PoisonError;

use crossbeam_epoch::{Atomic, Guard, Owned, Shared};

use crate::reclaim::{Pinned, Reclaimer};
use crate::sync::{AtomicUsize, CachePadded, Mutex, MutexGuard, Ordering};

/// Shards per table: about four per CPU, a power of two. Two under loom.
fn shard_count() -> usize {
    #[cfg(weakrefs_loom)]
    {
        2
    }
    #[cfg(not(weakrefs_loom))]
    {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        (cpus * 4).next_power_of_two().clamp(4, 256)
    }
}

/// Buckets a new shard starts with (a power of two).
const MIN_BUCKETS: usize = if cfg!(weakrefs_loom) { 1 } else { 8 };

/// An owned item pointer, as stored in bucket arrays.
struct ItemPtr<I>(*mut I);

impl<I> Clone for ItemPtr<I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I> Copy for ItemPtr<I> {}

// An `ItemPtr` is a shared reference to an immutable `I` in all but name;
// the item itself is dropped on whichever thread retires it.
// SAFETY: sending or sharing it is sending or sharing `&I` (needs `Sync`)
// and may end in dropping the `I` elsewhere (needs `Send`).
unsafe impl<I: Send + Sync> Send for ItemPtr<I> {}
// SAFETY: as for `Send`.
unsafe impl<I: Send + Sync> Sync for ItemPtr<I> {}

/// An immutable array of the items whose hashes share a bucket.
struct BucketArray<I> {
    items: Box<[ItemPtr<I>]>,
}

/// One table of buckets; replaced whole when the shard grows.
struct Table<I> {
    buckets: Box<[Atomic<BucketArray<I>>]>,
}

impl<I> Table<I> {
    fn with_buckets(count: usize) -> Self {
        debug_assert!(count.is_power_of_two());
        Table {
            buckets: (0..count).map(|_| Atomic::null()).collect(),
        }
    }

    fn bucket(&self, hash: u64) -> &Atomic<BucketArray<I>> {
        // Low bits pick the bucket; the shard used the high bits.
        &self.buckets[(hash as usize) & (self.buckets.len() - 1)]
    }
}

/// One shard: its current table, its writers' mutex, its item count.
struct Shard<I> {
    table: Atomic<Table<I>>,
    writer: Mutex<()>,
    len: AtomicUsize,
}

/// What a write unlinked, retired after the shard's mutex is released.
pub(crate) struct Garbage<I> {
    items: Vec<ItemPtr<I>>,
    arrays: Vec<*mut BucketArray<I>>,
    tables: Vec<*mut Table<I>>,
}

impl<I> Default for Garbage<I> {
    fn default() -> Self {
        Garbage {
            items: Vec::new(),
            arrays: Vec::new(),
            tables: Vec::new(),
        }
    }
}

/// Items of one collection, sharded; see the module docs.
pub(crate) struct ShardedTable<I> {
    /// Each on its own cache line: a write to one shard's mutex and count
    /// must not invalidate the table pointer readers of its neighbours load.
    shards: Box<[CachePadded<Shard<I>>]>,
    /// `64 - log2(shards)`: the hash's top bits pick the shard.
    shard_shift: u32,
    reclaimer: Reclaimer,
    _items: PhantomData<I>,
}

// SAFETY: the table owns its items (`I: Send` to drop them anywhere) and
// hands out `&I` to any thread (`I: Sync`); everything else is atomics,
// mutexes and epoch-managed pointers.
unsafe impl<I: Send + Sync> Send for ShardedTable<I> {}
// SAFETY: as for `Send`.
unsafe impl<I: Send + Sync> Sync for ShardedTable<I> {}

impl<I: Hashed + Send + Sync + 'static> ShardedTable<I> {
    /// A table sized for about `capacity` items.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let shards = shard_count();
        let per_shard = (capacity / shards + 1) * 4 / 3;
        let buckets = per_shard.next_power_of_two().max(MIN_BUCKETS);
        ShardedTable {
            shards: (0..shards)
                .map(|_| {
                    CachePadded::new(Shard {
                        table: Atomic::new(Table::with_buckets(buckets)),
                        writer: Mutex::new(()),
                        len: AtomicUsize::new(0),
                    })
                })
                .collect(),
            shard_shift: 64 - shards.trailing_zeros(),
            reclaimer: Reclaimer::global(),
            _items: PhantomData,
        }
    }

    fn shard(&self, hash: u64) -> &Shard<I> {
        &self.shards[self.shard_index(hash)]
    }

    /// Pins the current thread for reads (M1).
    pub(crate) fn pin(&self) -> Pinned {
        self.reclaimer.pin()
    }

    /// The items in `hash`'s bucket, as seen now. Lock-free (M1).
    pub(crate) fn bucket_items<'g>(&self, hash: u64, pinned: &'g Pinned) -> BucketIter<'g, I> {
        let guard = pinned.guard();
        // Acquire (M1): pairs with the Release store that published the
        // table (construction or growth), so its buckets are initialised.
        let table = self.shard(hash).table.load(Ordering::Acquire, guard);
        // SAFETY: tables are retired only after being replaced, and we are
        // pinned (I7); a shard always has a table.
        let table = unsafe { table.deref() };
        BucketIter::new(table.bucket(hash), guard)
    }

    /// Calls `f` on every item of shard `index`, as seen now (M8).
    pub(crate) fn for_each_in_shard(&self, index: usize, f: impl FnMut(&I)) {
        let pinned = self.pin();
        self.for_each_in_shard_pinned(index, &pinned, f);
    }

    /// As [`Self::for_each_in_shard`], under the caller's pin, so the item
    /// references (and addresses) stay valid for as long as it lasts.
    pub(crate) fn for_each_in_shard_pinned<'g>(
        &self,
        index: usize,
        pinned: &'g Pinned,
        mut f: impl FnMut(&'g I),
    ) {
        let guard = pinned.guard();
        // Acquire (M1): as in `bucket_items`.
        let table = self.shards[index].table.load(Ordering::Acquire, guard);
        // SAFETY: as in `bucket_items`.
        let table = unsafe { table.deref() };
        for bucket in table.buckets.iter() {
            for item in BucketIter::new(bucket, guard) {
                f(item);
            }
        }
    }

    /// Locks `hash`'s shard for writing (M2).
    pub(crate) fn write(&self, hash: u64) -> ShardWriter<'_, I> {
        self.writer_for(self.shard(hash))
    }

    /// Locks shard `index` for writing.
    pub(crate) fn write_shard(&self, index: usize) -> ShardWriter<'_, I> {
        self.writer_for(&self.shards[index])
    }

    fn writer_for<'a>(&'a self, shard: &'a Shard<I>) -> ShardWriter<'a, I> {
        let lock = shard.writer.lock().unwrap_or_else(PoisonError::into_inner);
        ShardWriter {
            table: self,
            shard,
            lock: Some(lock),
            garbage: Garbage::default(),
        }
    }
}

impl<I> ShardedTable<I> {
    /// Total items (live or dead-but-not-yet-removed) across shards.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            // Relaxed: a count; exact once writers are quiet.
            .map(|shard| shard.len.load(Ordering::Relaxed))
            .sum()
    }

    /// Number of shards (for iteration).
    pub(crate) fn shard_len(&self) -> usize {
        self.shards.len()
    }

    /// The shard `hash` belongs to: its top bits.
    pub(crate) fn shard_index(&self, hash: u64) -> usize {
        // `checked_shr`: with one shard the shift is 64.
        hash.checked_shr(self.shard_shift).unwrap_or(0) as usize
    }
}

impl<I> Drop for ShardedTable<I> {
    fn drop(&mut self) {
        // `&mut self`: no reader is pinned on our tables any more, since a
        // reader borrows the table; retired garbage owns itself.
        // SAFETY: nobody else can reach the shards (no guard is needed for
        // exclusive access).
        let guard = unsafe { crossbeam_epoch::unprotected() };
        for shard in self.shards.iter() {
            let table = shard.table.swap(Shared::null(), Ordering::Relaxed, guard);
            if table.is_null() {
                continue;
            }
            // SAFETY: exclusive access; the table, its arrays and its items
            // are ours to free, each once (an item is in exactly one array
            // of the current table).
            unsafe {
                let table = table.into_owned();
                for bucket in table.buckets.iter() {
                    let array = bucket.load(Ordering::Relaxed, guard);
                    if array.is_null() {
                        continue;
                    }
                    let array = array.into_owned();
                    for item in array.items.iter() {
                        drop(Box::from_raw(item.0));
                    }
                }
            }
        }
    }
}

/// Iterates the items of one bucket array.
pub(crate) struct BucketIter<'g, I> {
    items: std::slice::Iter<'g, ItemPtr<I>>,
}

impl<'g, I> BucketIter<'g, I> {
    fn new(bucket: &Atomic<BucketArray<I>>, guard: &'g Guard) -> Self {
        // Acquire (M1, M2): pairs with the Release store that published the
        // array, so the array and its items are initialised.
        let array = bucket.load(Ordering::Acquire, guard);
        // SAFETY: arrays are retired only after being unlinked, and the
        // guard keeps us pinned (I7).
        let items = match unsafe { array.as_ref() } {
            Some(array) => array.items.iter(),
            None => [].iter(),
        };
        BucketIter { items }
    }
}

impl<'g, I> Iterator for BucketIter<'g, I> {
    type Item = &'g I;

    fn next(&mut self) -> Option<&'g I> {
        // SAFETY: items in a reachable array are retired only after the
        // array is replaced; our guard outlives 'g (I7, M1).
        self.items.next().map(|item| unsafe { &*item.0 })
    }
}

/// A locked shard. Changes go live as they are made; what they unlinked is
/// retired when the writer is dropped, after the mutex is released.
pub(crate) struct ShardWriter<'a, I: Hashed + Send + Sync + 'static> {
    table: &'a ShardedTable<I>,
    shard: &'a Shard<I>,
    lock: Option<MutexGuard<'a, ()>>,
    garbage: Garbage<I>,
}

impl<'a, I: Hashed + Send + Sync + 'static> ShardWriter<'a, I> {
    /// The shard's table. Valid while we hold the mutex and until our own
    /// `grow` replaces it (it is then retired only after we unlock).
    fn current_table(&self) -> &'a Table<I> {
        // SAFETY: we hold the writer mutex, so the table cannot be replaced
        // (and so retired) while we use it; it is never null.
        unsafe {
            self.shard
                .table
                // Relaxed: writers are ordered by the mutex.
                .load(Ordering::Relaxed, crossbeam_epoch::unprotected())
                .deref()
        }
    }

    /// The items of `hash`'s bucket (including dead ones).
    pub(crate) fn items(&self, hash: u64) -> impl Iterator<Item = &I> + '_ {
        // SAFETY: under the mutex, nothing we can see is retired.
        let guard = unsafe { crossbeam_epoch::unprotected() };
        BucketIter::new(self.current_table().bucket(hash), guard)
    }

    /// Rewrites every bucket of the shard with the items `keep` accepts.
    /// Returns how many were removed.
    pub(crate) fn retain_all(&mut self, mut keep: impl FnMut(&I) -> bool) -> usize {
        let buckets = self.current_table().buckets.len();
        (0..buckets)
            .map(|index| self.rewrite_bucket_at(index, &mut |item, _| keep(item), None))
            .sum()
    }

    /// Publishes `hash`'s bucket with the items `keep` accepts, plus `add`
    /// if given; the rejected items are retired after unlock. `keep` sees
    /// each old item and the one being added. Returns how many were
    /// removed.
    pub(crate) fn rewrite_bucket(
        &mut self,
        hash: u64,
        mut keep: impl FnMut(&I, Option<&I>) -> bool,
        add: Option<I>,
    ) -> usize {
        let index = (hash as usize) & (self.current_table().buckets.len() - 1);
        self.rewrite_bucket_at(index, &mut keep, add)
    }

    fn rewrite_bucket_at(
        &mut self,
        index: usize,
        keep: &mut impl FnMut(&I, Option<&I>) -> bool,
        add: Option<I>,
    ) -> usize {
        // SAFETY: as in `items`.
        let guard = unsafe { crossbeam_epoch::unprotected() };
        let table = self.current_table();
        let bucket = &table.buckets[index];
        // Relaxed: writers are ordered by the mutex.
        let old = bucket.load(Ordering::Relaxed, guard);
        let mut kept: Vec<ItemPtr<I>> = Vec::new();
        let mut unlinked: Vec<ItemPtr<I>> = Vec::new();
        // Boxed up front: if `keep` panics, the unpublished item is handed to
        // the garbage and so dropped after the unlock (its key's destructor
        // is user code).
        let add = add.map(|item| ItemPtr(Box::into_raw(Box::new(item))));
        /// Hands the unpublished item to the garbage if we unwind before
        /// publishing it.
        struct Unpublished<'g, I>(&'g mut Vec<ItemPtr<I>>, Option<ItemPtr<I>>);
        impl<I> Drop for Unpublished<'_, I> {
            fn drop(&mut self) {
                if let Some(item) = self.1.take() {
                    self.0.push(item);
                }
            }
        }
        let mut pending = Unpublished(&mut self.garbage.items, add);
        // SAFETY: the boxed item is ours until published, and the guard
        // frees it (after the unlock) only if we unwind.
        let add_ref = add.map(|item| unsafe { &*item.0 });
        // Unlinked items are retired only once the new array is published:
        // if `keep` (user code: `Eq`, `Borrow`) panics half-way, nothing
        // still linked may be retired.
        // SAFETY: under the mutex the old array is current and alive.
        if let Some(array) = unsafe { old.as_ref() } {
            for item in array.items.iter() {
                // SAFETY: items of the current array are alive.
                if keep(unsafe { &*item.0 }, add_ref) {
                    kept.push(*item);
                } else {
                    unlinked.push(*item);
                }
            }
        }
        pending.1 = None;
        drop(pending);
        let removed = unlinked.len();
        let added = add.is_some();
        if let Some(item) = add {
            kept.push(item);
        }
        if removed == 0 && !added {
            return 0;
        }
        let new = if kept.is_empty() {
            Shared::null()
        } else {
            Owned::new(BucketArray {
                items: kept.into_boxed_slice(),
            })
            .into_shared(guard)
        };
        // Nothing may fail between the store and the bookkeeping below.
        self.garbage.items.reserve(unlinked.len());
        self.garbage.arrays.reserve(1);
        // Release (M2): publishes the new array and the items it points at
        // to readers' Acquire loads.
        bucket.store(new, Ordering::Release);
        self.garbage.items.extend(unlinked);
        if !old.is_null() {
            self.garbage.arrays.push(old.as_raw().cast_mut());
        }
        // Relaxed: the count is read as a statistic.
        let len = &self.shard.len;
        let count = len.load(Ordering::Relaxed) + usize::from(added) - removed;
        len.store(count, Ordering::Relaxed);
        if added && count > table.buckets.len() / 4 * 3 {
            self.grow(guard);
        }
        removed
    }

    /// Replaces the shard's table with one twice as large that points at
    /// the same items (M3).
    fn grow(&mut self, guard: &Guard) {
        let old = self.current_table();
        let new = Table::with_buckets(old.buckets.len() * 2);
        let mut arrays: Vec<Vec<ItemPtr<I>>> = vec![Vec::new(); new.buckets.len()];
        // Queued only after the swap: if an allocation below panics, the old
        // arrays are still linked and must not be retired.
        let mut old_arrays: Vec<*mut BucketArray<I>> = Vec::with_capacity(old.buckets.len());
        self.garbage.arrays.reserve(old.buckets.len());
        self.garbage.tables.reserve(1);
        for bucket in old.buckets.iter() {
            // Relaxed: writers are ordered by the mutex.
            let array = bucket.load(Ordering::Relaxed, guard);
            // SAFETY: the current table's arrays are alive under the mutex.
            if let Some(array) = unsafe { array.as_ref() } {
                for item in array.items.iter() {
                    // SAFETY: as above, for items.
                    let hash = unsafe { &*item.0 }.hash();
                    arrays[(hash as usize) & (new.buckets.len() - 1)].push(*item);
                }
                old_arrays.push(array as *const _ as *mut _);
            }
        }
        for (bucket, items) in new.buckets.iter().zip(arrays) {
            if !items.is_empty() {
                let array = Owned::new(BucketArray {
                    items: items.into_boxed_slice(),
                });
                // Relaxed: published by the table's Release store below.
                bucket.store(array, Ordering::Relaxed);
            }
        }
        // Release (M3): publishes the new table and its arrays.
        let previous = self
            .shard
            .table
            .swap(Owned::new(new), Ordering::Release, guard);
        self.garbage.arrays.extend(old_arrays);
        self.garbage.tables.push(previous.as_raw().cast_mut());
    }
}

/// Items report the hash they were filed under, so growth can redistribute
/// them without rehashing keys.
pub(crate) trait Hashed {
    fn hash(&self) -> u64;
}

impl<I: Hashed + Send + Sync + 'static> Drop for ShardWriter<'_, I> {
    fn drop(&mut self) {
        drop(self.lock.take());
        let garbage = std::mem::take(&mut self.garbage);
        if garbage.items.is_empty() && garbage.arrays.is_empty() && garbage.tables.is_empty() {
            return;
        }
        let pinned = self.table.pin();
        // SAFETY: everything in `garbage` was unlinked under the mutex (no
        // reader that pins from now on can reach it) and is retired once
        // (I7). Items, arrays and tables were allocated by `Box`/`Owned`.
        unsafe {
            for item in garbage.items {
                pinned.retire(Shared::from(item.0.cast_const()));
            }
            for array in garbage.arrays {
                pinned.retire(Shared::from(array.cast_const()));
            }
            for table in garbage.tables {
                pinned.retire(Shared::from(table.cast_const()));
            }
        }
    }
}
