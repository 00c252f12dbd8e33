//! The two synchronisation primitives of the breaker's core, swapped for loom's models under
//! `cfg(loom)` so that the core can be checked exhaustively.

#[cfg(not(loom))]
pub(super) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[cfg(loom)]
pub(super) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A mutex whose `lock` returns the guard directly (`parking_lot`'s mutex is not poisoned by
/// a panic). The one user code run while it is held is the metrics recorder's handles
/// (counters and gauges brought up to date during a transition): a recorder that panics there
/// can leave that transition half-applied. Classifiers and event listeners run without it.
#[derive(Debug)]
pub(super) struct Mutex<T>(
    #[cfg(not(loom))] parking_lot::Mutex<T>,
    #[cfg(loom)] loom::sync::Mutex<T>,
);

#[cfg(not(loom))]
pub(super) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;
#[cfg(loom)]
pub(super) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(super) fn new(value: T) -> Self {
        #[cfg(not(loom))]
        {
            Mutex(parking_lot::Mutex::new(value))
        }
        #[cfg(loom)]
        {
            Mutex(loom::sync::Mutex::new(value))
        }
    }

    #[inline]
    pub(super) fn lock(&self) -> MutexGuard<'_, T> {
        #[cfg(not(loom))]
        {
            self.0.lock()
        }
        #[cfg(loom)]
        {
            self.0.lock().unwrap()
        }
    }
}
