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
//! A spare reference must not keep a dropped breaker alive. Layers, services and handles own
//! the breaker through an [`Owner`]; when the last of them is dropped, the breaker is marked
//! closed and this thread's spare references to it are dropped at once. From then on:
//!
//! - a finishing call never parks its reference (it is dropped, and the last one frees the
//!   breaker);
//! - every other thread drops its spare references to closed breakers at its next release:
//!   a release loads a global count of closed breakers (written only when a breaker
//!   closes, so it stays in every core's cache) and sweeps the cache only when it changed.
//!
//! So the breaker's state (and its event listeners) is freed when its last owner or its last
//! call in flight is dropped, except for a spare parked on another thread before that, which
//! lasts until that thread next finishes a call through any breaker (or exits). The registry
//! holds the [`Owner`] weakly, so it never counts a spare reference as a live breaker.

use std::cell::RefCell;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::core::Shared;

/// Spare references kept per thread.
pub(super) const SLOTS: usize = 4;

type Slots = [Option<Arc<Shared>>; SLOTS];

/// One thread's spare references, and the value of [`CLOSED`] it last swept for.
struct Cache {
    slots: Slots,
    swept: usize,
}

/// Breakers closed so far in the process (wrapping): a thread whose cache last swept for an
/// older value may hold spares of a closed breaker. Read by every call, written once per
/// dropped breaker: on a cache line of its own so no neighbour's writes evict it.
static CLOSED: Padded = Padded(AtomicUsize::new(0));

#[repr(align(128))]
struct Padded(AtomicUsize);

thread_local! {
    static SPARE: RefCell<Cache> = const {
        RefCell::new(Cache { slots: [const { None }; SLOTS], swept: 0 })
    };
}

/// The owners' share of a breaker: layers, services and handles hold an `Arc<Owner>`; calls
/// in flight and spare references hold the `Arc<Shared>` inside. Dropping the last owner
/// closes the breaker (see the [module docs](self)).
///
/// Every call reads the pointer inside; it is aligned to a cache line of its own so that
/// neither the `Arc`'s reference counts (written by service clones) nor a neighbouring
/// allocation share its line.
#[derive(Debug)]
#[repr(align(64))]
pub(super) struct Owner(Arc<Shared>);

impl Owner {
    pub(super) fn new(shared: Shared) -> Owner {
        Owner(Arc::new(shared))
    }
}

impl Deref for Owner {
    type Target = Arc<Shared>;

    #[inline]
    fn deref(&self) -> &Arc<Shared> {
        &self.0
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.close();
        CLOSED.0.fetch_add(1, Ordering::Release);
        // Dropped after the cache is released (the last reference runs user code).
        let mut dead: Slots = [const { None }; SLOTS];
        let _ = SPARE.try_with(|cell| {
            if let Ok(mut cache) = cell.try_borrow_mut() {
                for (slot, d) in cache.slots.iter_mut().zip(dead.iter_mut()) {
                    if slot.as_ref().is_some_and(|a| Arc::ptr_eq(a, &self.0)) {
                        *d = slot.take();
                    }
                }
            }
        });
    }
}

/// A reference to `shared`: a spare one from this thread's cache, or a clone.
#[inline]
pub(super) fn acquire(shared: &Arc<Shared>) -> Arc<Shared> {
    let cached = SPARE
        .try_with(|cell| {
            let mut cache = cell.try_borrow_mut().ok()?;
            cache
                .slots
                .iter_mut()
                .find(|s| s.as_ref().is_some_and(|a| Arc::ptr_eq(a, shared)))?
                .take()
        })
        .ok()
        .flatten();
    cached.unwrap_or_else(|| Arc::clone(shared))
}

/// Gives a reference back: parked in this thread's cache, or dropped (when its breaker is
/// closed, or the cache is full). Drops this thread's spares of closed breakers first when
/// a breaker has closed since the last sweep.
#[inline]
pub(super) fn release(arc: Arc<Shared>) {
    if arc.is_closed() {
        return drop(arc);
    }
    let closed = CLOSED.0.load(Ordering::Acquire);
    // Whatever must be dropped is dropped after the cache is released (dropping the last
    // reference runs user code: metric handles, event listeners).
    let _dropped: Option<Arc<Shared>> = SPARE
        .try_with(|cell| {
            let Ok(mut cache) = cell.try_borrow_mut() else {
                return Some(arc);
            };
            if closed != cache.swept {
                drop(cache);
                return release_sweeping(cell, arc, closed);
            }
            park(&mut cache.slots, arc)
        })
        .unwrap_or(None);
}

/// Parks `arc` in a free slot; returns what must be dropped.
#[inline]
fn park(slots: &mut Slots, arc: Arc<Shared>) -> Option<Arc<Shared>> {
    if let Some(free) = slots.iter_mut().find(|s| s.is_none()) {
        *free = Some(arc);
        return None;
    }
    release_full(slots, arc)
}

/// [`release`] after a breaker has closed: drops this thread's spares of closed breakers
/// (after the cache is released), then parks `arc`.
#[cold]
#[inline(never)]
fn release_sweeping(cell: &RefCell<Cache>, arc: Arc<Shared>, closed: usize) -> Option<Arc<Shared>> {
    let mut dead: Slots = [const { None }; SLOTS];
    let Ok(mut cache) = cell.try_borrow_mut() else {
        return Some(arc);
    };
    cache.swept = closed;
    for (slot, d) in cache.slots.iter_mut().zip(dead.iter_mut()) {
        if slot.as_ref().is_some_and(|a| a.is_closed()) {
            *d = slot.take();
        }
    }
    let rest = park(&mut cache.slots, arc);
    drop(cache);
    drop(dead);
    rest
}

/// The cache is full: replace a reference that nothing else holds, or else give `arc` back
/// to be dropped.
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
