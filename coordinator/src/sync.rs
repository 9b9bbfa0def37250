//! Locking that survives a panic elsewhere.
//!
//! The coordinator's mutexes guard caches, counters and plain bookkeeping whose every
//! update is a single assignment or insert, so a panic while one was held leaves nothing
//! half-written: the next user takes the data as it is instead of panicking in turn.
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, ignoring poisoning (see the module doc for why that is sound here).
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
