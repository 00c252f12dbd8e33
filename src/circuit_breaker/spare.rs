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

use std::cell::Cell;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::core::Shared;

/// Spare references kept per thread.
pub(super) const SLOTS: usize = 4;

/// One thread's spare references, and the value of [`CLOSED`] it last swept for.
///
/// Plain cells, no `RefCell`: nothing here is borrowed across other code. `addr[i]` is the
/// address of the breaker in `slots[i]` (0 when empty), so finding a slot reads integers
/// and moves no `Arc` until the one slot it takes or fills. A reference taken out to be
/// dropped is dropped only once the cache is consistent again: dropping a last reference
/// runs user code (metric handles, event listeners), which may call back in here.
struct Cache {
    slots: [Cell<Option<Arc<Shared>>>; SLOTS],
    addr: [Cell<usize>; SLOTS],
    swept: Cell<usize>,
}

/// Breakers closed so far in the process (wrapping): a thread whose cache last swept for an
/// older value may hold spares of a closed breaker. Read by every call, written once per
/// dropped breaker: on a cache line of its own so no neighbour's writes evict it.
static CLOSED: Padded = Padded(AtomicUsize::new(0));

#[repr(align(128))]
struct Padded(AtomicUsize);

thread_local! {
    static SPARE: Cache = const {
        Cache {
            slots: [const { Cell::new(None) }; SLOTS],
            addr: [const { Cell::new(0) }; SLOTS],
            swept: Cell::new(0),
        }
    };
}

/// The address a slot records for `arc`.
#[inline]
fn addr(arc: &Arc<Shared>) -> usize {
    Arc::as_ptr(arc) as usize
}

impl Cache {
    /// Empties slot `i`, returning its reference.
    #[inline]
    fn take(&self, i: usize) -> Option<Arc<Shared>> {
        self.addr[i].set(0);
        self.slots[i].take()
    }

    /// Fills empty slot `i`.
    #[inline]
    fn put(&self, i: usize, arc: Arc<Shared>) {
        self.addr[i].set(addr(&arc));
        self.slots[i].set(Some(arc));
    }
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
        // Dropped once the cache is consistent (the last reference runs user code).
        let mut dead: [Option<Arc<Shared>>; SLOTS] = [const { None }; SLOTS];
        let me = addr(&self.0);
        let _ = SPARE.try_with(|cache| {
            for (i, d) in dead.iter_mut().enumerate() {
                if cache.addr[i].get() == me {
                    *d = cache.take(i);
                }
            }
        });
    }
}

/// A reference to `shared`: a spare one from this thread's cache, or a clone.
#[inline]
pub(super) fn acquire(shared: &Arc<Shared>) -> Arc<Shared> {
    let want = addr(shared);
    SPARE
        .try_with(|cache| {
            let i = cache.addr.iter().position(|a| a.get() == want)?;
            cache.take(i)
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| Arc::clone(shared))
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
    // Out of the thread's storage (its destructor ran), the closure and `arc` are dropped.
    let _ = SPARE.try_with(|cache| {
        if closed != cache.swept.get() {
            return release_sweeping(cache, arc, closed);
        }
        match cache.addr.iter().position(|a| a.get() == 0) {
            Some(i) => cache.put(i, arc),
            None => release_full(cache, arc),
        }
    });
}

/// [`release`] after a breaker has closed: drops this thread's spares of closed breakers,
/// then parks `arc`. Drops run once the cache is consistent again (a drop of a last
/// reference runs user code, which may call back in here).
#[cold]
#[inline(never)]
fn release_sweeping(cache: &Cache, arc: Arc<Shared>, closed: usize) {
    let mut dead: [Option<Arc<Shared>>; SLOTS] = [const { None }; SLOTS];
    cache.swept.set(closed);
    for (i, d) in dead.iter_mut().enumerate() {
        if let Some(a) = cache.take(i) {
            if a.is_closed() {
                *d = Some(a);
            } else {
                cache.put(i, a);
            }
        }
    }
    match cache.addr.iter().position(|a| a.get() == 0) {
        Some(i) => cache.put(i, arc),
        None => drop(arc),
    }
    drop(dead);
}

/// The cache is full: replace a reference that nothing else holds (dropped once the cache
/// is consistent again), or else drop `arc`.
#[cold]
#[inline(never)]
fn release_full(cache: &Cache, arc: Arc<Shared>) {
    for i in 0..SLOTS {
        if let Some(a) = cache.take(i) {
            if Arc::strong_count(&a) == 1 {
                cache.put(i, arc);
                return drop(a);
            }
            cache.put(i, a);
        }
    }
    drop(arc);
}
