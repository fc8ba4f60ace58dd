//! Machinery under the collections' public faces: the sharded,
//! epoch-protected table they share (`table`), what the collections do
//! alike on top of it (`collection`), which keys drop without user code
//! (`plain_drop`), the maps' single-flight loads
//! (`single_flight`), `WeakValueMap`'s keep-warm tier (`tier`) with
//! the frequency sketch its admission consults (`sketch`), and the lock
//! each shard's writers take (`shard_lock`).

pub(crate) mod collection;
pub(crate) mod counters;
pub(crate) mod plain_drop;
pub(crate) mod shard_lock;
pub(crate) mod single_flight;
pub(crate) mod sketch;
pub(crate) mod table;
pub(crate) mod tier;

use std::hash::{BuildHasher, Hash, Hasher};

/// `hasher.hash_one(key)`, inlined whole into the caller.
///
/// `BuildHasher::hash_one` is `#[inline]` only as a hint, and the
/// collections' lookups call it from functions large enough that the
/// compiler declined it: `DefaultHasher` then ran its general path for a
/// byte slice of any length (SipHash's tail buffering) on what is most
/// often a key of fixed size. Inlined, that path folds away: a `get` of a
/// `u64` key went from 335 to 278 instructions (callgrind), as many as
/// `scc::HashIndex`'s read (BENCHMARKS.md, reads).
// What `hash_one` does, spelled out so that `inline(always)` covers it.
#[allow(clippy::manual_hash_one)]
#[inline(always)]
pub(crate) fn hash_one<S: BuildHasher, Q: Hash + ?Sized>(hasher: &S, key: &Q) -> u64 {
    let mut state = hasher.build_hasher();
    key.hash(&mut state);
    state.finish()
}
