//! Where small blocks are allocated: callback nodes and handles' control
//! blocks, through a small per-thread cache of freed blocks in front of
//! the global allocator.
//!
//! Every collection entry allocates one hook node and names one control
//! block, and both are usually let go in bursts: a map's removed entries
//! are dropped by the epoch a batch at a time (the entry's hook and the
//! last weak reference to its dead value's block), an object's list frees
//! its settled nodes a compaction at a time. A burst overflows the
//! allocator's own per-thread cache (glibc's tcache keeps seven blocks of
//! a size), so the rest go back through its slower bins, and the next
//! registrations and `Strong::new`s pay for it. This cache keeps up to
//! [`KEEP`] blocks of each small size class a thread freed, and hands them
//! to that thread's next nodes and control blocks.
//!
//! * **Ownership (C16).** A block enters a thread's cache only once
//!   nothing else can reach it: a node after its last reference is gone
//!   and its fields were dropped (`Node::free`), a control block after
//!   its last weak reference (`ControlBlock::deallocate`, I3). A cached
//!   block is reached through that thread's cache alone, and leaves it as
//!   fresh memory for a new node or block, written before it is shared.
//!   No atomics: nothing in a cache is shared.
//! * **Layouts.** Only layouts of 8-byte alignment and a size of at most
//!   [`LARGEST`] bytes, a multiple of 8, are cached, one class per size.
//!   A block is handed out only for its own class, so every block goes
//!   back to the global allocator, eventually, with the layout it was
//!   allocated with. Nodes and control blocks of one size share a class.
//! * **Thread exit.** A thread's cache is emptied when the thread exits;
//!   a block freed or allocated after that (by another thread-local's
//!   destructor) goes straight to the global allocator.
//!
//! * **Bounds.** At most `KEEP` blocks a class a thread: 128 blocks of 8
//!   to 72 bytes, about 45 KiB a thread in the worst case, 3 KiB for
//!   the common 24-byte class (the block of a `Strong<u64>`, and a
//!   collection entry's hook node).
//!
//! Blocks are allocated plainly under loom (the cache has no concurrency
//! to model, and loom tracks its own allocations) and under Miri: a
//! cached block comes back at the same address, so a block used after its
//! free would read a live one and Miri could not see it. The cache's own
//! code still runs under Miri, through its unit tests.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// The largest size cached: a `WeakKeyMap` entry's hook of a sized key
/// and a value of up to three words (a `String`, a `Vec`) fits: nine
/// words (header, vtable, the key's `Weak`, the value, removal).
#[cfg_attr(weakrefs_loom, allow(dead_code))]
const LARGEST: usize = 72;

/// Size classes: 8, 16, ..., `LARGEST` bytes.
#[cfg_attr(weakrefs_loom, allow(dead_code))]
const CLASSES: usize = LARGEST / 8;

/// Blocks kept a class: more than an epoch batch's worth of removed
/// entries' hooks and value blocks (two blocks each, often of one class),
/// little memory (see the module docs' bounds).
#[cfg_attr(weakrefs_loom, allow(dead_code))]
const KEEP: u32 = 128;

/// The class of `layout`, if cached.
#[cfg_attr(any(weakrefs_loom, miri), allow(dead_code))]
#[inline(always)]
pub(crate) fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size();
    (layout.align() == 8 && size != 0 && size <= LARGEST && size % 8 == 0).then(|| size / 8 - 1)
}

/// Allocates a block of `layout` (not zero-sized): a cached block of its
/// class if this thread has one, else from the global allocator.
#[inline]
pub(crate) fn allocate(layout: Layout) -> NonNull<u8> {
    debug_assert!(layout.size() != 0, "blocks are never zero-sized");
    #[cfg(not(any(weakrefs_loom, miri)))]
    if let Some(class) = class_of(layout) {
        if let Some(block) = cache::take(class) {
            return block;
        }
    }
    // SAFETY: `layout` is not zero-sized (nodes and control blocks start
    // with a header).
    let block = unsafe { alloc::alloc(layout) };
    NonNull::new(block).unwrap_or_else(|| alloc::handle_alloc_error(layout))
}

/// Gives back a block `allocate(layout)` returned.
///
/// # Safety
///
/// 1. `block` came from [`allocate`] with this same `layout`.
/// 2. Nothing reaches the block any more, and whatever it held was
///    dropped.
#[inline]
pub(crate) unsafe fn release(block: NonNull<u8>, layout: Layout) {
    #[cfg(not(any(weakrefs_loom, miri)))]
    if let Some(class) = class_of(layout) {
        // SAFETY: the caller's 1 and 2; `class` is `layout`'s.
        if unsafe { cache::keep(class, block) } {
            return;
        }
    }
    // SAFETY: by 1 the block came from the global allocator with `layout`
    // (a cached block of `layout`'s class was allocated with it too, by
    // the layout bullet above), by 2 it is ours to free.
    unsafe { alloc::dealloc(block.as_ptr(), layout) }
}

#[cfg(not(weakrefs_loom))]
#[cfg_attr(miri, allow(dead_code))]
pub(crate) mod cache {
    use super::{Layout, NonNull, CLASSES, KEEP};
    use std::cell::UnsafeCell;
    use std::ptr;

    /// A cached block: its first word links to the next one.
    struct Free {
        next: *mut Free,
    }

    /// One thread's cached blocks, a stack per class.
    struct Cache {
        heads: [*mut Free; CLASSES],
        counts: [u32; CLASSES],
    }

    impl Drop for Cache {
        fn drop(&mut self) {
            for class in 0..CLASSES {
                let layout = Layout::from_size_align(8 * (class + 1), 8).expect("a small layout");
                let mut block = self.heads[class];
                while !block.is_null() {
                    // SAFETY: a cached block is ours alone (C16) and holds
                    // its link.
                    let next = unsafe { (*block).next };
                    // SAFETY: allocated by the global allocator with its
                    // class's layout (the module docs' layout bullet), and
                    // nothing else reaches it.
                    unsafe { std::alloc::dealloc(block.cast(), layout) };
                    block = next;
                }
            }
        }
    }

    std::thread_local! {
        static CACHE: UnsafeCell<Cache> = const {
            UnsafeCell::new(Cache {
                heads: [ptr::null_mut(); CLASSES],
                counts: [0; CLASSES],
            })
        };
    }

    /// A cached block of `class`, if this thread has one.
    #[inline]
    pub(super) fn take(class: usize) -> Option<NonNull<u8>> {
        CACHE
            .try_with(|cache| {
                // SAFETY: this thread's cache, borrowed only inside this
                // call and `keep`'s, neither of which re-enters the other.
                let cache = unsafe { &mut *cache.get() };
                let block = NonNull::new(cache.heads[class])?;
                // SAFETY: a cached block is ours alone and holds its link
                // (C16).
                cache.heads[class] = unsafe { (*block.as_ptr()).next };
                cache.counts[class] -= 1;
                Some(block.cast())
            })
            .ok()
            .flatten()
    }

    /// Whether this thread's cache is still there (not yet torn down).
    #[cfg(test)]
    pub(crate) fn alive() -> bool {
        CACHE.try_with(|_| ()).is_ok()
    }

    /// How many blocks of `class` this thread keeps.
    #[cfg(test)]
    pub(crate) fn cached(class: usize) -> u32 {
        // SAFETY: as in `take`.
        CACHE.with(|cache| unsafe { (*cache.get()).counts[class] })
    }

    /// Keeps `block` in this thread's cache unless its class is full (or
    /// the cache is gone): returns whether it did.
    ///
    /// # Safety
    ///
    /// As for `release`, with `class` the class of its layout.
    #[inline]
    pub(super) unsafe fn keep(class: usize, block: NonNull<u8>) -> bool {
        CACHE
            .try_with(|cache| {
                // SAFETY: as in `take`.
                let cache = unsafe { &mut *cache.get() };
                if cache.counts[class] == KEEP {
                    return false;
                }
                let block = block.cast::<Free>().as_ptr();
                // SAFETY: at least a word, aligned to 8 (its class), and
                // unreachable by anyone else (the caller's 2).
                unsafe {
                    block.write(Free {
                        next: cache.heads[class],
                    })
                };
                cache.heads[class] = block;
                cache.counts[class] += 1;
                true
            })
            .unwrap_or(false)
    }
}

#[cfg(all(test, not(weakrefs_loom)))]
mod tests {
    use super::*;

    /// A block of `layout` from the global allocator.
    fn fresh(layout: Layout) -> NonNull<u8> {
        // SAFETY: not zero-sized.
        NonNull::new(unsafe { alloc::alloc(layout) }).expect("memory")
    }

    #[test]
    fn a_kept_block_is_handed_to_the_next_node_of_its_class_only() {
        let layout = Layout::from_size_align(40, 8).unwrap();
        let class = class_of(layout).unwrap();
        let other = class_of(Layout::from_size_align(48, 8).unwrap()).unwrap();
        let block = fresh(layout);
        // SAFETY: from the global allocator with `layout`, holding nothing.
        assert!(unsafe { cache::keep(class, block) });
        assert_eq!(cache::take(other), None, "another class never gets it");
        assert_eq!(cache::take(class), Some(block), "reused");
        assert_eq!(cache::take(class), None, "once");
        // SAFETY: ours again, with its layout.
        unsafe { alloc::dealloc(block.as_ptr(), layout) };
    }

    #[test]
    fn a_class_keeps_at_most_keep_blocks_and_odd_layouts_pass_through() {
        let layout = Layout::from_size_align(24, 8).unwrap();
        let class = class_of(layout).unwrap();
        let blocks: Vec<_> = (0..KEEP + 3).map(|_| fresh(layout)).collect();
        let kept = blocks
            .iter()
            // SAFETY: from the global allocator with `layout`, holding
            // nothing; a block refused is still ours.
            .filter(|&&block| unsafe { cache::keep(class, block) })
            .count();
        assert_eq!(kept as u32, KEEP);
        assert_eq!(cache::cached(class), KEEP);
        for &refused in &blocks[KEEP as usize..] {
            // SAFETY: refused, so still ours, with its layout.
            unsafe { alloc::dealloc(refused.as_ptr(), layout) };
        }
        // The kept ones are freed with the thread's cache (Miri's leak
        // check sees it).
        for layout in [
            Layout::from_size_align(40, 16).unwrap(),
            Layout::from_size_align(LARGEST + 8, 8).unwrap(),
            Layout::from_size_align(12, 4).unwrap(),
        ] {
            assert_eq!(class_of(layout), None, "{layout:?}");
            let block = allocate(layout);
            // SAFETY: from `allocate(layout)`, holding nothing.
            unsafe { release(block, layout) };
        }
    }
}
