//! What an iterator holds, shared by the collections' tests.

use std::sync::atomic::{AtomicUsize, Ordering};

use weakrefs::flush;

/// Checks what the docs of every collection's `iter` say: the iterator
/// holds a `Strong` to each entry of the shard it has snapshotted until it
/// yields it or is dropped. `iteration` is fresh over a collection of
/// `count` live entries, whose only other handles are `handles`, and
/// `len` is the collection's length. After the first `next()`, with
/// `handles` dropped, the collection keeps exactly the entries the
/// iterator still holds (its `size_hint`), and `callbacks_run`, if given,
/// has counted every other entry's death; once the iterator is dropped,
/// every entry leaves, and every callback has run.
pub fn held_until_dropped<I: Iterator, H>(
    mut iteration: I,
    handles: H,
    count: usize,
    len: impl Fn() -> usize,
    callbacks_run: Option<&AtomicUsize>,
) {
    drop(iteration.next().expect("a live entry"));
    let held = iteration.size_hint().0;
    drop(handles);
    flush();
    assert_eq!(len(), held, "entries the iterator holds");
    if let Some(run) = callbacks_run {
        assert_eq!(run.load(Ordering::SeqCst), count - held);
    }
    drop(iteration);
    flush();
    assert_eq!(len(), 0, "entries left once the iterator is dropped");
    if let Some(run) = callbacks_run {
        assert_eq!(run.load(Ordering::SeqCst), count);
    }
}
