//! The bulkhead's permit counter and its FIFO queue of waiters.
//!
//! # Layout
//!
//! One `AtomicU64` holds the whole admission state: the low 32 bits count the *available*
//! permits, the high 32 bits count the *queued* waiters. A mutex guards the queue itself (an
//! index-linked list stored in a `Vec` whose slots are reused, so a steady-state queue
//! allocates nothing; the `Vec` grows to the longest queue seen and never shrinks).
//!
//! # Invariants
//!
//! 1. `available > 0` implies `waiting == 0`: a permit is never left free while someone
//!    queues for it.
//! 2. `waiting` equals the number of slots linked in the queue whenever the mutex is free;
//!    it only changes while the mutex is held.
//! 3. Every permit is in exactly one place: counted in `available`, held by a caller, or
//!    handed to a queued slot (state `Granted`) that its ticket has not collected yet.
//!
//! # Why the lock-free paths are sound
//!
//! The two paths that run without the mutex are the fast acquire (`available - 1`, only if
//! `waiting == 0 && available > 0`) and the fast release (`available + 1`, only if
//! `waiting == 0`). Both are a single compare-and-swap on the same word that holds
//! `waiting`, so each of them either sees that nobody queues and acts in that very state, or
//! fails and retries (acquire: gives up; release: takes the mutex). Every change of `waiting`
//! is also a compare-and-swap or RMW on that word, made while holding the mutex:
//!
//! - *enqueue* (mutex held): `waiting + 1`, only if `available == 0` in the same CAS
//!   (otherwise the caller takes the free permit instead), so invariant 1 holds;
//! - *hand-off* (mutex held, in a release that saw `waiting > 0`): `waiting - 1`, and the
//!   head slot becomes `Granted`. While `waiting > 0`, invariant 1 gives `available == 0`,
//!   so no lock-free path can succeed and the word is frozen except by mutex holders;
//! - *withdraw* (mutex held): a ticket that times out or is dropped unlinks its own slot and
//!   does `waiting - 1`; if its slot was already `Granted`, it owns that permit and releases
//!   it like any holder (to the next waiter, or back to `available`).
//!
//! Hence a waiter that gives up can never be handed a permit afterwards (its slot is gone),
//! and a permit handed to it before it gave up is returned by the withdrawal: no permit is
//! lost and none is created. A release never adds a permit that is not held (each
//! [`Permit`](super::future) is released exactly once, by its `Drop`).
//!
//! # No code of others under the mutex
//!
//! The semaphore calls nothing it does not own while the mutex is held: metric handles and
//! event listeners are its caller's business (the caller runs them after each operation
//! returns), and wakers are cloned, dropped and woken after unlocking (`poll_slot` clones
//! a new waker between two short critical sections and checks the slot again, so a
//! hand-off in between is collected). Each operation has completed its accounting, and its
//! caller owns the resulting permit or slot through an RAII value, before such code runs:
//! a panic there loses nothing, and code calling back into the bulkhead cannot deadlock.
//!
//! The `loom` tests at the end of this file check the argument: under `cfg(loom)` the
//! atomic and the mutex are loom's, and every interleaving of releases, fast acquires,
//! enqueues, hand-offs and withdrawals is explored; each must end with every permit back and
//! nobody queued. The multi-thread tests in `tests/bulkhead.rs` assert the same counts on a
//! real runtime.
//!
//! # Cost
//!
//! Uncontended, a call that finds a permit costs one CAS to acquire and one CAS to release,
//! with no lock. Under contention the word is one shared cache line written twice per call;
//! on two cores that costs on the order of 100 ns per call, the price of any exact global
//! concurrency limit (a sharded counter would either over-admit or need the same line to
//! steal permits). A call that queues takes the mutex once to queue, at most twice per poll
//! while queued, and once to withdraw; a release takes it only when someone queues.

use std::sync::atomic::Ordering;
use std::task::Waker;

use sync::{AtomicU64, Mutex};

/// The real primitives, or loom's under `cfg(loom)` so that a model checker explores every
/// interleaving of the lock-free paths and the mutex (see the `loom` tests below).
#[cfg(not(loom))]
mod sync {
    pub(super) use parking_lot::Mutex;
    pub(super) use std::sync::atomic::AtomicU64;
}

#[cfg(loom)]
mod sync {
    pub(super) use loom::sync::atomic::AtomicU64;

    #[derive(Debug)]
    pub(super) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(super) fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub(super) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap()
        }
    }
}

const AVAILABLE_MASK: u64 = u32::MAX as u64;
const ONE_WAITER: u64 = 1 << 32;
const NIL: usize = usize::MAX;

#[inline]
fn available(s: u64) -> u32 {
    (s & AVAILABLE_MASK) as u32
}

#[inline]
fn waiting(s: u64) -> u32 {
    (s >> 32) as u32
}

/// The result of [`Semaphore::acquire_or_enqueue`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Enqueue {
    /// A permit was free: the caller holds it now.
    Acquired,
    /// The caller is queued in this slot; see [`Semaphore::poll_slot`].
    Queued(usize),
    /// The queue already holds its maximum number of waiters.
    Full,
}

#[derive(Debug)]
enum Slot {
    /// Unused; `next` links the free list.
    Free { next: usize },
    /// Queued for a permit.
    Waiting {
        prev: usize,
        next: usize,
        waker: Option<Waker>,
    },
    /// Unlinked from the queue and handed a permit its ticket has not collected yet.
    Granted,
}

/// The FIFO queue: a doubly linked list of slot indices, plus a free list of slots.
#[derive(Debug)]
struct Queue {
    slots: Vec<Slot>,
    head: usize,
    tail: usize,
    free: usize,
}

impl Queue {
    fn push_back(&mut self) -> usize {
        let idx = if self.free != NIL {
            let idx = self.free;
            match self.slots[idx] {
                Slot::Free { next } => self.free = next,
                _ => unreachable!("free list holds a used slot"),
            }
            idx
        } else {
            self.slots.push(Slot::Free { next: NIL });
            self.slots.len() - 1
        };
        self.slots[idx] = Slot::Waiting {
            prev: self.tail,
            next: NIL,
            waker: None,
        };
        if self.tail == NIL {
            self.head = idx;
        } else {
            self.set_next(self.tail, idx);
        }
        self.tail = idx;
        idx
    }

    fn set_next(&mut self, idx: usize, to: usize) {
        match &mut self.slots[idx] {
            Slot::Waiting { next, .. } => *next = to,
            _ => unreachable!("linked slot is not waiting"),
        }
    }

    fn set_prev(&mut self, idx: usize, to: usize) {
        match &mut self.slots[idx] {
            Slot::Waiting { prev, .. } => *prev = to,
            _ => unreachable!("linked slot is not waiting"),
        }
    }

    /// Unlinks a waiting slot and leaves `replacement` in it; returns its waker.
    fn unlink(&mut self, idx: usize, replacement: Slot) -> Option<Waker> {
        let Slot::Waiting { prev, next, waker } =
            std::mem::replace(&mut self.slots[idx], replacement)
        else {
            unreachable!("unlinking a slot that is not waiting")
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.set_next(prev, next);
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.set_prev(next, prev);
        }
        waker
    }

    fn release_slot(&mut self, idx: usize) {
        self.slots[idx] = Slot::Free { next: self.free };
        self.free = idx;
    }
}

/// A counting semaphore with a FIFO queue, lock-free when nobody queues.
///
/// It runs no code of its users while its mutex is held: no metric handle, no listener, no
/// waker (wakers are cloned, dropped and woken after unlocking), so that such code may
/// panic or call back into the bulkhead without corrupting the queue or deadlocking.
#[derive(Debug)]
pub(super) struct Semaphore {
    state: AtomicU64,
    queue: Mutex<Queue>,
}

impl Semaphore {
    pub(super) fn new(permits: u32) -> Self {
        Semaphore {
            state: AtomicU64::new(u64::from(permits)),
            queue: Mutex::new(Queue {
                slots: Vec::new(),
                head: NIL,
                tail: NIL,
                free: NIL,
            }),
        }
    }

    /// Permits free now.
    #[inline]
    pub(super) fn available(&self) -> u32 {
        available(self.state.load(Ordering::Acquire))
    }

    /// Callers queued now.
    #[inline]
    pub(super) fn waiting(&self) -> u32 {
        waiting(self.state.load(Ordering::Acquire))
    }

    /// Takes a permit if one is free and nobody queues (lock-free).
    #[inline]
    pub(super) fn try_acquire(&self) -> bool {
        let mut s = self.state.load(Ordering::Relaxed);
        // With nobody queued the word equals `available`: acquire iff 0 < s <= u32::MAX.
        while s.wrapping_sub(1) < AVAILABLE_MASK {
            match self
                .state
                .compare_exchange_weak(s, s - 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(cur) => s = cur,
            }
        }
        false
    }

    /// Takes a free permit, or queues the caller at the back unless `max_waiting` callers
    /// already queue.
    pub(super) fn acquire_or_enqueue(&self, max_waiting: u32) -> Enqueue {
        let mut queue = self.queue.lock();
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let (new, acquired) = if waiting(s) == 0 && available(s) > 0 {
                (s - 1, true)
            } else if waiting(s) >= max_waiting {
                return Enqueue::Full;
            } else {
                // Invariant 1: someone queues or nothing is free, so `available == 0`.
                debug_assert_eq!(available(s), 0);
                (s + ONE_WAITER, false)
            };
            match self
                .state
                .compare_exchange(s, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) if acquired => return Enqueue::Acquired,
                Ok(_) => return Enqueue::Queued(queue.push_back()),
                Err(cur) => s = cur,
            }
        }
    }

    /// Returns a held permit: to the head of the queue if someone waits (returns `false`:
    /// the permit stays held, by that waiter), else to the free count (returns `true`).
    #[inline]
    pub(super) fn release(&self) -> bool {
        let mut s = self.state.load(Ordering::Relaxed);
        while waiting(s) == 0 {
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(cur) => s = cur,
            }
        }
        self.release_slow()
    }

    #[cold]
    #[inline(never)]
    fn release_slow(&self) -> bool {
        let mut queue = self.queue.lock();
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if waiting(s) > 0 {
                // Frozen while we hold the mutex (see module docs): hand the permit over.
                let prev = self.state.fetch_sub(ONE_WAITER, Ordering::AcqRel);
                debug_assert_eq!(prev, s);
                let head = queue.head;
                let waker = queue.unlink(head, Slot::Granted);
                drop(queue);
                if let Some(w) = waker {
                    w.wake();
                }
                return false;
            }
            match self
                .state
                .compare_exchange(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(cur) => s = cur,
            }
        }
    }

    /// Checks a queued slot: `true` if it was granted a permit (the slot is freed and the
    /// caller holds the permit now); otherwise stores `waker` to be woken at the hand-off.
    ///
    /// A waker that must be stored is cloned, and the one it replaces dropped, with the
    /// mutex free: the slot is checked again after cloning, so a hand-off in between is
    /// collected, not missed. The mutex is taken at most twice.
    pub(super) fn poll_slot(&self, idx: usize, waker: &Waker) -> bool {
        let old = {
            let mut queue = self.queue.lock();
            match &mut queue.slots[idx] {
                Slot::Granted => {
                    queue.release_slot(idx);
                    return true;
                }
                Slot::Waiting { waker: stored, .. } => match stored {
                    Some(w) if w.will_wake(waker) => return false,
                    _ => stored.take(),
                },
                Slot::Free { .. } => unreachable!("polling a slot that was released"),
            }
        };
        drop(old);
        let new = waker.clone();
        let mut queue = self.queue.lock();
        let unused = match &mut queue.slots[idx] {
            Slot::Granted => {
                queue.release_slot(idx);
                drop(queue);
                drop(new);
                return true;
            }
            // Only this slot's owner stores a waker, and it is here: `stored` is empty.
            Slot::Waiting { waker: stored, .. } => stored.replace(new),
            Slot::Free { .. } => unreachable!("polling a slot that was released"),
        };
        drop(queue);
        drop(unused);
        false
    }

    /// Withdraws a queued slot (its caller gave up or was dropped). Returns `true` if the
    /// slot had already been granted a permit, which the caller now holds and must release.
    pub(super) fn withdraw(&self, idx: usize) -> bool {
        let mut queue = self.queue.lock();
        if let Slot::Granted = queue.slots[idx] {
            queue.release_slot(idx);
            return true;
        }
        let waker = queue.unlink(idx, Slot::Free { next: NIL });
        queue.release_slot(idx);
        self.state.fetch_sub(ONE_WAITER, Ordering::AcqRel);
        drop(queue);
        drop(waker);
        false
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn sem(n: u32) -> Semaphore {
        Semaphore::new(n)
    }

    #[test]
    fn fast_paths_count_exactly() {
        let s = sem(2);
        assert!(s.try_acquire());
        assert!(s.try_acquire());
        assert!(!s.try_acquire());
        assert!(s.release());
        assert_eq!(s.available(), 1);
        assert!(s.release());
        assert_eq!(s.available(), 2);
    }

    #[test]
    fn queue_is_fifo_and_hand_off_skips_withdrawn_slots() {
        let s = sem(1);
        assert!(s.try_acquire());
        let waker = Waker::noop();
        let a = match s.acquire_or_enqueue(10) {
            Enqueue::Queued(i) => i,
            other => panic!("{other:?}"),
        };
        let b = match s.acquire_or_enqueue(10) {
            Enqueue::Queued(i) => i,
            other => panic!("{other:?}"),
        };
        let c = match s.acquire_or_enqueue(10) {
            Enqueue::Queued(i) => i,
            other => panic!("{other:?}"),
        };
        assert_eq!(s.waiting(), 3);
        assert!(!s.try_acquire(), "no barging past the queue");
        assert!(!s.withdraw(b));
        assert_eq!(s.waiting(), 2);
        // Release: goes to `a`, the head.
        assert!(!s.release());
        assert!(s.poll_slot(a, waker));
        assert!(!s.poll_slot(c, waker));
        // `a` done: goes to `c`; `c` gives up after being granted and returns it.
        assert!(!s.release());
        assert!(s.withdraw(c));
        assert_eq!(s.waiting(), 0);
        assert!(s.release());
        assert_eq!(s.available(), 1);
        // Slots are reused: no growth.
        assert_eq!(s.queue.lock().slots.len(), 3);
        assert!(s.try_acquire());
        let d = match s.acquire_or_enqueue(1) {
            Enqueue::Queued(i) => i,
            other => panic!("{other:?}"),
        };
        assert_eq!(s.acquire_or_enqueue(1), Enqueue::Full);
        assert!(s.queue.lock().slots.len() <= 3);
        assert!(!s.withdraw(d));
        assert!(s.release());
        assert_eq!(s.acquire_or_enqueue(1), Enqueue::Acquired);
    }
}

/// Model checks: every interleaving (loom) of releases, fast acquires, enqueues, hand-offs
/// and withdrawals ends with every permit accounted for, exactly once. Run with
/// `RUSTFLAGS="--cfg loom" CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true cargo test --release
/// --lib bulkhead::semaphore::loom` (debug assertions check the invariants on the way).
#[cfg(all(test, loom))]
mod loom {
    use super::*;
    use ::loom::sync::Arc;
    use ::loom::thread;

    /// Takes a permit or queues for one, then gives up at once (a zero-length maximum
    /// wait), as a waiter whose deadline passes; returns `true` if it ends up holding one.
    fn wait_then_give_up(s: &Semaphore) -> bool {
        match s.acquire_or_enqueue(8) {
            Enqueue::Acquired => true,
            Enqueue::Queued(slot) => {
                assert_no_free_permit_while_queued(s);
                if s.poll_slot(slot, Waker::noop()) {
                    true
                } else {
                    s.withdraw(slot)
                }
            }
            Enqueue::Full => unreachable!("queue bound not reached"),
        }
    }

    /// Invariant 1, read at an arbitrary point of the interleaving.
    fn assert_no_free_permit_while_queued(s: &Semaphore) {
        let st = s.state.load(Ordering::Acquire);
        assert!(
            waiting(st) == 0 || available(st) == 0,
            "a permit is free while callers queue"
        );
    }

    fn assert_all_back(s: &Semaphore, permits: u32) {
        assert_eq!(s.available(), permits);
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn a_waiter_giving_up_while_the_holder_releases_loses_no_permit() {
        ::loom::model(|| {
            let s = Arc::new(Semaphore::new(1));
            assert!(s.try_acquire());
            let holder = {
                let s = s.clone();
                thread::spawn(move || {
                    s.release();
                    assert_no_free_permit_while_queued(&s);
                })
            };
            if wait_then_give_up(&s) {
                s.release();
            }
            holder.join().unwrap();
            assert_all_back(&s, 1);
        });
    }

    #[test]
    fn fast_acquire_enqueue_and_release_race_without_barging_or_loss() {
        ::loom::model(|| {
            let s = Arc::new(Semaphore::new(1));
            assert!(s.try_acquire());
            let holder = {
                let s = s.clone();
                thread::spawn(move || {
                    s.release();
                    assert_no_free_permit_while_queued(&s);
                })
            };
            let fast = {
                let s = s.clone();
                thread::spawn(move || {
                    if s.try_acquire() {
                        // Never while someone queues: invariant 1.
                        s.release();
                    }
                })
            };
            if wait_then_give_up(&s) {
                s.release();
            }
            holder.join().unwrap();
            fast.join().unwrap();
            assert_all_back(&s, 1);
        });
    }

    /// Three threads with several lock operations each: bounded to three preemptions per
    /// execution (loom's recommended bound), which covers the hand-off races above twice.
    #[test]
    fn two_waiters_and_two_releases_hand_off_in_any_order() {
        let mut model = ::loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let s = Arc::new(Semaphore::new(2));
            assert!(s.try_acquire());
            assert!(s.try_acquire());
            let releaser = {
                let s = s.clone();
                thread::spawn(move || {
                    s.release();
                    s.release();
                })
            };
            let waiter = {
                let s = s.clone();
                thread::spawn(move || {
                    if wait_then_give_up(&s) {
                        s.release();
                    }
                })
            };
            if wait_then_give_up(&s) {
                s.release();
            }
            releaser.join().unwrap();
            waiter.join().unwrap();
            assert_all_back(&s, 2);
        });
    }
}
