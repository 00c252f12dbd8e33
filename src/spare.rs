//! A per-thread cache of spare references to a layer's shared state, so that the response
//! future of a call can own a reference to that state without touching the `Arc`'s shared
//! reference count. Serves the circuit breaker, the timeout and the bulkhead.
//!
//! Every call's future must own an `Arc` of its layer's state (the breaker records the
//! outcome through it, the timeout's [`Deadline`](crate::timeout::Deadline) and the
//! bulkhead's [`Permit`](crate::bulkhead::Permit) outlive the response future inside a
//! [`WholeBody`](crate::completion::WholeBody) body), and cloning and dropping an `Arc` are
//! two atomic read-modify-writes on a cache line every thread calling the layer writes: most
//! of the cost of a cheap call, and a point of contention across threads. Instead, a finished
//! call parks its reference in a small per-thread cache, and the next call on that thread
//! takes it back: in the steady state no atomic is written at all. Misses (a first call, a
//! future finished on another thread) fall back to an ordinary clone; a full cache drops the
//! reference as usual (so a thread calling more than [`SLOTS`] layers of one kind in turn
//! keeps spares of some and clones for the others). The look-up and the parking run about 50
//! instructions per call more than the clone and drop they replace (counted with callgrind),
//! but no locked instruction and no write to a line other threads share: the atomics' latency
//! and cross-thread contention are what instruction counts do not show.
//!
//! A spare reference must not keep a dropped layer's state alive. Layers, services and
//! handles own the state through an [`Owner`]; when the last of them is dropped, the state is
//! marked closed and this thread's spare references to it are dropped at once. From then on:
//!
//! - a finishing call never parks its reference (it is dropped, and the last one frees the
//!   state);
//! - every other thread drops its spare references to closed states at its next release:
//!   a release loads a global count of closed states (written only when a state closes, so
//!   it stays in every core's cache) and sweeps the cache only when it changed.
//!
//! So the state (and its event listeners and metric handles) is freed once its last owner and
//! its last call in flight are dropped, except for a spare parked on another thread before
//! that, which lasts until that thread next finishes or is refused a call through a layer of
//! the same kind, live or dropped (or exits). A release reads the count of closed states
//! before the state's own flag: a state closing between the two reads is swept at the next
//! release, as its count has moved by then. Registries hold the [`Owner`] weakly, so they never count a spare reference
//! as a live layer.
//!
//! # One implementation for every layer
//!
//! The logic is generic over the state type ([`Spare`]: its closed flag and its cache), and
//! monomorphised per layer, so each layer's hot path is the same code as a hand-written cache
//! for its own type. Rust has no generic statics, so each state type declares its own
//! thread-local with [`impl_spare!`] (a declaration, no logic). Per-type caches rather than
//! one shared, type-erased cache (`Arc<dyn Any>`): a shared cache would cost a type check and
//! a virtual call per hit, and the layers of a stack (one breaker, one timeout, one bulkhead
//! per call) would compete for the same slots. The count of closed states is global: a
//! closed state of any kind makes every cache sweep once at its next release, which only
//! costs a few loads and is as rare as dropping a layer.
//!
//! A call's holder (the breaker's guard, the timeout's response future and
//! [`Deadline`](crate::timeout::Deadline), the bulkhead's [`Permit`](crate::bulkhead::Permit)
//! and queue ticket) keeps an `Option<Arc<T>>` and gives it back with [`release`] in its own
//! `Drop` (a timeout response future dropped unfinished drops its reference as a plain `Arc`),
//! rather than through an RAII wrapper type: the wrapper's drop glue is a function of its own
//! that the compiler does not inline into the holder's, which measured 11 to 26 instructions
//! more per call.

use std::cell::Cell;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::LocalKey;

/// Spare references kept per thread and state type.
pub(crate) const SLOTS: usize = 4;

/// A layer's shared state, whose calls take references with [`acquire`] and give them back
/// with [`release`].
pub(crate) trait Spare: Sized + 'static {
    /// This type's per-thread cache (declared by [`impl_spare!`]).
    fn cache() -> &'static LocalKey<Cache<Self>>;

    /// Marks the state as owned by nothing but calls in flight and spare references (its
    /// last [`Owner`] is being dropped).
    fn close(&self);

    /// `true` once [`close`](Spare::close) ran.
    fn is_closed(&self) -> bool;
}

/// Implements [`Spare`] for the state type `$t` whose closed flag is the atomic boolean at
/// field path `$closed` (std's or loom's `AtomicBool`): a thread-local [`Cache`] of its own,
/// and the flag read and written `Relaxed` (it only decides whether a finishing call parks
/// its reference; the count of closed states orders the sweeps).
macro_rules! impl_spare {
    ($t:ty, $($closed:ident).+) => {
        impl $crate::spare::Spare for $t {
            #[inline]
            fn cache() -> &'static ::std::thread::LocalKey<$crate::spare::Cache<$t>> {
                ::std::thread_local! {
                    static SPARE: $crate::spare::Cache<$t> = const { $crate::spare::Cache::new() };
                }
                &SPARE
            }

            fn close(&self) {
                self.$($closed).+.store(true, ::std::sync::atomic::Ordering::Relaxed);
            }

            #[inline]
            fn is_closed(&self) -> bool {
                self.$($closed).+.load(::std::sync::atomic::Ordering::Relaxed)
            }
        }
    };
}
pub(crate) use impl_spare;

/// One thread's spare references of one state type, and the value of [`CLOSED`] it last
/// swept for.
///
/// Plain cells, no `RefCell`: nothing here is borrowed across other code. `addr[i]` is the
/// address of the state in `slots[i]` (0 when empty), so finding a slot reads integers
/// and moves no `Arc` until the one slot it takes or fills. A reference taken out to be
/// dropped is dropped only once the cache is consistent again: dropping a last reference
/// runs user code (metric handles, event listeners), which may call back in here.
pub(crate) struct Cache<T> {
    slots: [Cell<Option<Arc<T>>>; SLOTS],
    addr: [Cell<usize>; SLOTS],
    swept: Cell<usize>,
}

/// States closed so far in the process (wrapping): a thread whose cache last swept for an
/// older value may hold spares of a closed state. Read by every release, written once per
/// dropped layer: on a cache line of its own so no neighbour's writes evict it.
static CLOSED: Padded = Padded(AtomicUsize::new(0));

#[repr(align(128))]
struct Padded(AtomicUsize);

/// The address a slot records for `arc`.
#[inline]
fn addr<T>(arc: &Arc<T>) -> usize {
    Arc::as_ptr(arc) as usize
}

impl<T> Cache<T> {
    /// An empty cache (the thread-local's initial value).
    pub(crate) const fn new() -> Self {
        Cache {
            slots: [const { Cell::new(None) }; SLOTS],
            addr: [const { Cell::new(0) }; SLOTS],
            swept: Cell::new(0),
        }
    }

    /// Empties slot `i`, returning its reference.
    #[inline]
    fn take(&self, i: usize) -> Option<Arc<T>> {
        self.addr[i].set(0);
        self.slots[i].take()
    }

    /// Fills empty slot `i` (`addr[i]` is 0 exactly when `slots[i]` is `None`, so there is
    /// no previous reference to drop: none is looked for).
    #[inline]
    fn put(&self, i: usize, arc: Arc<T>) {
        self.addr[i].set(addr(&arc));
        let previous = self.slots[i].replace(Some(arc));
        debug_assert!(previous.is_none(), "slot {i} was not empty");
        std::mem::forget(previous);
    }
}

/// The owners' share of a layer's state: layers, services and handles hold an
/// `Arc<Owner<T>>`; calls in flight and spare references hold the `Arc<T>` inside. Dropping
/// the last owner closes the state (see the [module docs](self)).
///
/// Every call reads the pointer inside; it is aligned to a cache line of its own so that
/// neither the `Arc`'s reference counts (written by service clones) nor a neighbouring
/// allocation share its line.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct Owner<T: Spare>(Arc<T>);

impl<T: Spare> Owner<T> {
    pub(crate) fn new(shared: T) -> Owner<T> {
        Owner(Arc::new(shared))
    }
}

impl<T: Spare> Deref for Owner<T> {
    type Target = Arc<T>;

    #[inline]
    fn deref(&self) -> &Arc<T> {
        &self.0
    }
}

impl<T: Spare> Drop for Owner<T> {
    fn drop(&mut self) {
        self.0.close();
        // Acquire as well: every state whose count precedes this one shows its flag, so
        // the sweep below (which takes this state's spares too) may record the new count.
        let closed = CLOSED.0.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
        // Dropped once the cache is consistent (the last reference runs user code).
        let dead = T::cache().try_with(|cache| sweep(cache, closed));
        drop(dead);
    }
}

/// A reference to `shared`: a spare one from this thread's cache, or a clone.
#[inline]
pub(crate) fn acquire<T: Spare>(shared: &Arc<T>) -> Arc<T> {
    let want = addr(shared);
    T::cache()
        .try_with(|cache| {
            let i = cache.addr.iter().position(|a| a.get() == want)?;
            cache.take(i)
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| Arc::clone(shared))
}

/// Gives a reference back: parked in this thread's cache, or dropped (when its state is
/// closed, or the cache is full). Drops this thread's spares of closed states first when
/// a state has closed since the last sweep.
#[inline]
pub(crate) fn release<T: Spare>(arc: Arc<T>) {
    // The count first, the flag second: a state whose count increment this load misses
    // is swept at a later release (the count will have moved); one whose increment it sees
    // shows its flag below (the flag is set before the count is released).
    let closed = CLOSED.0.load(Ordering::Acquire);
    // Out of the thread's storage (its destructor ran), the closure and `arc` are dropped.
    let _ = T::cache().try_with(|cache| {
        if closed != cache.swept.get() {
            return release_sweeping(cache, arc, closed);
        }
        if arc.is_closed() {
            return drop(arc);
        }
        match cache.addr.iter().position(|a| a.get() == 0) {
            Some(i) => cache.put(i, arc),
            None => release_full(cache, arc),
        }
    });
}

/// For a call that took no reference (a rejection): drops this thread's spares of closed
/// states when a state has closed since the last sweep, as a release does.
#[cfg_attr(
    not(any(feature = "bulkhead", feature = "circuit-breaker")),
    allow(dead_code)
)]
#[cold]
#[inline(never)]
pub(crate) fn tidy<T: Spare>() {
    let closed = CLOSED.0.load(Ordering::Acquire);
    let _ = T::cache().try_with(|cache| {
        if closed != cache.swept.get() {
            drop(sweep(cache, closed));
        }
    });
}

/// [`release`] after a state has closed: drops this thread's spares of closed states,
/// then parks `arc` unless its own state is closed. Drops run once the cache is consistent
/// again (a drop of a last reference runs user code, which may call back in here).
#[cold]
#[inline(never)]
fn release_sweeping<T: Spare>(cache: &Cache<T>, arc: Arc<T>, closed: usize) {
    let dead = sweep(cache, closed);
    if arc.is_closed() {
        drop(arc);
    } else {
        match cache.addr.iter().position(|a| a.get() == 0) {
            Some(i) => cache.put(i, arc),
            None => drop(arc),
        }
    }
    drop(dead);
}

/// Takes this thread's spares of closed states out of the cache, for the caller to drop once
/// the cache is consistent, and records `closed` as swept.
fn sweep<T: Spare>(cache: &Cache<T>, closed: usize) -> [Option<Arc<T>>; SLOTS] {
    let mut dead: [Option<Arc<T>>; SLOTS] = [const { None }; SLOTS];
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
    dead
}

/// The cache is full: replace a reference that nothing else holds (dropped once the cache
/// is consistent again), or else drop `arc`.
#[cold]
#[inline(never)]
fn release_full<T: Spare>(cache: &Cache<T>, arc: Arc<T>) {
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
