//! Machinery under the collections' public faces: the sharded,
//! epoch-protected table they share (`table`), what the collections do
//! alike on top of it (`collection`), the maps' single-flight loads
//! (`single_flight`), and `WeakValueMap`'s keep-warm tier (`tier`) with
//! the frequency sketch its admission consults (`sketch`).

pub(crate) mod collection;
pub(crate) mod counters;
pub(crate) mod single_flight;
pub(crate) mod sketch;
pub(crate) mod table;
pub(crate) mod tier;
