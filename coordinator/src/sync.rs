//! Locks that a panic cannot poison for the rest of the process.
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking the state as it is if a task panicked while holding it: every
/// coordinator state behind a mutex is left consistent between statements, and one
/// panicking build must not fail every later call on the coordinator.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
