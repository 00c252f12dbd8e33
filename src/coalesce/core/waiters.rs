//! The waiter list of a shared call: wakers keyed by stable indices, the first
//! [`INLINE`] of them inside the slot itself.

use std::task::Waker;

use slab::Slab;

/// Waiters kept inline, in the slot's own allocation: a shared call with up to this many
/// waiting followers allocates nothing for its waiter list.
pub(super) const INLINE: usize = 8;
const _: () = assert!(INLINE <= u8::BITS as usize, "one bit per inline waiter");

/// Wakers of the callers waiting for a shared call's value, keyed by stable indices.
///
/// Keys `0..INLINE` name inline entries (a bit mask marks the registered ones; the lowest
/// vacant one is reused); later keys name entries of an overflow [`Slab`] (its own free
/// list; amortized doubling growth, so `n` waiters beyond [`INLINE`] cost O(log n)
/// allocations). Insertion and removal are O(1) either way, so callers that leave (dropped
/// followers) cost no scan. An entry holds `None` once its waker was taken by
/// [`take_first`](Self::take_first), until its caller removes it.
#[derive(Default)]
pub(super) struct Waiters {
    /// Bit `k` set: inline entry `k` is a registered waiter.
    registered: u8,
    /// The inline waiters' wakers (`None`: vacant, or taken).
    inline: [Option<Waker>; INLINE],
    overflow: Slab<Option<Waker>>,
}

impl Waiters {
    /// An empty list; allocates nothing.
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// Registers a waiter; returns its key, stable until [`try_remove`](Self::try_remove).
    pub(super) fn insert(&mut self, waker: Waker) -> usize {
        let k = self.registered.trailing_ones() as usize;
        if k < INLINE {
            self.registered |= 1 << k;
            self.inline[k] = Some(waker);
            k
        } else {
            INLINE + self.overflow.insert(Some(waker))
        }
    }

    /// The waker entry of a registered waiter.
    ///
    /// # Panics
    ///
    /// When `key` names no registered waiter.
    pub(super) fn get_mut(&mut self, key: usize) -> &mut Option<Waker> {
        match key.checked_sub(INLINE) {
            None => {
                assert!(
                    self.registered & (1 << key) != 0,
                    "a registered waiter's key"
                );
                &mut self.inline[key]
            }
            Some(k) => &mut self.overflow[k],
        }
    }

    /// Removes a waiter, if registered.
    pub(super) fn try_remove(&mut self, key: usize) {
        match key.checked_sub(INLINE) {
            None => {
                self.registered &= !(1 << key);
                self.inline[key] = None;
            }
            Some(k) => {
                self.overflow.try_remove(k);
            }
        }
    }

    /// Takes the waker of the first waiter (lowest key) whose waker is still in place; the
    /// waiter stays registered.
    pub(super) fn take_first(&mut self) -> Option<(usize, Waker)> {
        let inline = self
            .inline
            .iter_mut()
            .enumerate()
            .find_map(|(k, w)| w.take().map(|w| (k, w)));
        inline.or_else(|| {
            self.overflow
                .iter_mut()
                .find_map(|(k, w)| w.take().map(|w| (INLINE + k, w)))
        })
    }

    /// Wakes every waiter whose waker is in place.
    pub(super) fn wake_all(self) {
        let inline = self.inline.into_iter().flatten();
        let overflow = self.overflow.into_iter().filter_map(|(_, w)| w);
        for w in inline.chain(overflow) {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn keys_are_stable_vacancies_are_reused_and_overflow_wakes_too() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut w = Waiters::new();
        let keys: Vec<usize> = (0..INLINE + 3).map(|_| w.insert(waker.clone())).collect();
        assert_eq!(keys, (0..INLINE + 3).collect::<Vec<_>>());
        // Removing an inline and an overflow waiter frees their keys for the next waiters.
        w.try_remove(3);
        w.try_remove(INLINE + 1);
        w.try_remove(INLINE + 1);
        assert_eq!(w.insert(waker.clone()), 3);
        assert_eq!(w.insert(waker.clone()), INLINE + 1);
        // Taken wakers stay registered, in key order.
        for k in 0..INLINE {
            assert_eq!(w.take_first().map(|(k, _)| k), Some(k));
            assert!(w.get_mut(k).is_none());
        }
        assert_eq!(w.take_first().map(|(k, _)| k), Some(INLINE));
        *w.get_mut(INLINE) = Some(waker.clone());
        w.wake_all();
        // The three overflow waiters with their wakers in place.
        assert_eq!(count.0.load(Ordering::Relaxed), 3);
    }
}
