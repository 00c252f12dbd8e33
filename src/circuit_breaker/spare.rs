//! A per-thread cache of spare references to breakers, so that the response future of a call
//! can own a reference to its breaker without touching the `Arc`'s shared reference count.
//!
//! Every admitted call's future must own an `Arc<Shared>` (it needs the breaker to record a
//! failure), and cloning and dropping an `Arc` are two atomic read-modify-writes on a cache
//! line every thread calling the breaker writes: most of the cost of a closed-path call, and a
//! point of contention across threads. Instead, a finished future parks its reference in a
//! small per-thread cache, and the next call on that thread takes it back: in the steady state
//! no atomic is written at all. Misses (a first call, a future finished on another thread)
//! fall back to an ordinary clone; a full cache drops the reference as usual.
//!
//! A cached reference keeps a breaker's state alive after every layer, service and handle of
//! it is gone, until the cache slot is reused: at most [`SLOTS`] breakers per thread. A slot
//! whose breaker is referenced by nothing else is freed whenever the cache is full.

use std::cell::RefCell;
use std::sync::Arc;

use super::core::Shared;

/// Spare references kept per thread.
pub(super) const SLOTS: usize = 4;

type Slots = [Option<Arc<Shared>>; SLOTS];

thread_local! {
    static SPARE: RefCell<Slots> = const { RefCell::new([const { None }; SLOTS]) };
}

/// A reference to `shared`: a spare one from this thread's cache, or a clone.
#[inline]
pub(super) fn acquire(shared: &Arc<Shared>) -> Arc<Shared> {
    let cached = SPARE
        .try_with(|cell| {
            let mut slots = cell.try_borrow_mut().ok()?;
            slots
                .iter_mut()
                .find(|s| s.as_ref().is_some_and(|a| Arc::ptr_eq(a, shared)))?
                .take()
        })
        .ok()
        .flatten();
    cached.unwrap_or_else(|| Arc::clone(shared))
}

/// Gives a reference back: parked in this thread's cache, or dropped.
#[inline]
pub(super) fn release(arc: Arc<Shared>) {
    // Whatever must be dropped is dropped after the cache is released (dropping the last
    // reference runs user code: metric handles, event listeners).
    let _dropped: Option<Arc<Shared>> = SPARE
        .try_with(move |cell| {
            let Ok(mut slots) = cell.try_borrow_mut() else {
                return Some(arc);
            };
            if let Some(free) = slots.iter_mut().find(|s| s.is_none()) {
                *free = Some(arc);
                return None;
            }
            release_full(&mut slots, arc)
        })
        .unwrap_or(None);
}

/// The cache is full: replace a reference that nothing else holds (a dropped breaker), or
/// else give `arc` back to be dropped.
#[cold]
fn release_full(slots: &mut Slots, arc: Arc<Shared>) -> Option<Arc<Shared>> {
    match slots
        .iter_mut()
        .find(|s| s.as_ref().is_some_and(|a| Arc::strong_count(a) == 1))
    {
        Some(dead) => dead.replace(arc),
        None => Some(arc),
    }
}
