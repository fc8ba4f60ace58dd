//! Machinery under the collections' public faces: the sharded,
//! epoch-protected table they share (`table`), and the out-of-line box its
//! items keep keys and values in (`boxed`).

pub(crate) mod boxed;
pub(crate) mod collection;
pub(crate) mod table;
