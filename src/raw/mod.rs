//! Machinery under the collections' public faces: the sharded,
//! epoch-protected table they share (`table`).

pub(crate) mod table;
