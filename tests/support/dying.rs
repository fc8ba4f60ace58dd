//! An object caught in the middle of its death, shared by the collections'
//! tests: its count is at zero and its value's drop is running, so its
//! death callbacks have not run yet.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::thread::{self, JoinHandle};

use weakrefs::Strong;

/// A value whose drop waits for a message on its channel.
pub struct SlowToDie(Mutex<Receiver<()>>);

impl Drop for SlowToDie {
    fn drop(&mut self) {
        let _ = self.0.lock().unwrap().recv();
    }
}

/// A value whose drop waits until the returned sender sends (or is dropped).
pub fn slow_to_die() -> (SlowToDie, Sender<()>) {
    let (finish, waits) = channel();
    (SlowToDie(Mutex::new(waits)), finish)
}

/// Drops `object`, its last handle, on a new thread, and returns once the
/// object's count is zero: its value's drop is then waiting, and its
/// callbacks have not run.
pub fn start_dying(object: Strong<SlowToDie>) -> JoinHandle<()> {
    let watch = Strong::downgrade(&object);
    let dying = thread::spawn(move || drop(object));
    while watch.is_alive() {
        thread::yield_now();
    }
    dying
}
