//! Machinery under the collections' public faces: the sharded,
//! epoch-protected table they share (`table`), the out-of-line box its
//! items keep keys and values in (`boxed`), what the collections do alike
//! on top of it (`collection`), and the maps' single-flight loads
//! (`single_flight`).

pub(crate) mod boxed;
pub(crate) mod collection;
pub(crate) mod single_flight;
pub(crate) mod table;
