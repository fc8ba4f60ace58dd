//! Waiting for deferred drops, shared by the collections' tests.
//!
//! A removed entry is dropped once no reader can still see it, which the
//! epoch decides as threads pin and unpin. Other tests in the same binary
//! pin too, and one of their threads descheduled while pinned holds every
//! collection back until it runs again: on a loaded 2-core machine, loops
//! that gave up after a fixed number of rounds ran out first. So these
//! waits end when their condition holds, with a deadline that is a
//! fail-safe against a hung run, not a timing claim; under Miri, whose
//! clock is virtual, a fixed number of rounds bounds them instead.

use std::time::{Duration, Instant};

/// How long a wait may take before the test fails: far beyond any stall
/// seen, so only what never happens reaches it.
const FAIL_SAFE: Duration = Duration::from_secs(60);

/// Rounds under Miri.
const MIRI_ROUNDS: usize = 200;

/// Runs `nudge` (something that pins, retires and flushes, so the epoch
/// moves on) until `done` holds or the fail-safe runs out; returns `done()`.
pub fn until(done: impl Fn() -> bool, mut nudge: impl FnMut()) -> bool {
    let deadline = Instant::now() + FAIL_SAFE;
    let mut rounds = 0;
    while !done() {
        rounds += 1;
        if (cfg!(miri) && rounds > MIRI_ROUNDS) || (!cfg!(miri) && Instant::now() > deadline) {
            return done();
        }
        nudge();
        std::thread::yield_now();
    }
    true
}
