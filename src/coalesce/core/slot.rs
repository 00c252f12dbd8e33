//! What the callers of a call with followers share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use slab::Slab;

use super::BoxFuture;

/// A caller's own state in a shared call.
#[derive(Debug, Default)]
pub(super) struct Me {
    /// Key of this caller's waker in the waiter list, while it waits.
    pub(super) waiter: Option<usize>,
    /// This caller has taken its value (or resumed the panic) or left.
    pub(super) done: bool,
}

/// What a waiting caller finds when polled.
pub(super) enum Wait<O, T> {
    /// The call ended: this caller's value.
    Value(T),
    /// Nobody drives the shared future: this caller takes it and drives.
    Drive(BoxFuture<O>),
}

enum Phase<O, T> {
    Running {
        /// The shared future while nobody drives it (its driver holds it in its [`Join`]).
        fut: Option<BoxFuture<O>>,
        /// A caller holds and drives the future.
        driving: bool,
        /// The waiter woken to take over driving, if one is on its way.
        nominee: Option<usize>,
    },
    /// The value, until the last caller moves it out.
    Done(Option<T>),
    /// Every caller left; the future was dropped.
    Abandoned,
}

struct SlotState<O, T> {
    phase: Phase<O, T>,
    /// Wakers of callers waiting for the value (not the driver's: the future holds that one).
    waiters: Slab<Option<Waker>>,
}

/// What the callers of a call with followers share: the waiter list, the value once ready,
/// the future while nobody drives it, and the count of attached callers.
pub(super) struct Slot<O, T> {
    /// Callers attached (the leader and each follower not yet done); incremented only under
    /// the entry's shard lock, and it drops to zero only under it while the entry is in the
    /// table.
    pub(super) attached: AtomicUsize,
    state: Mutex<SlotState<O, T>>,
}

impl<O, T> Slot<O, T> {
    /// A slot made by the first follower, while the leader drives.
    pub(super) fn new() -> Self {
        Slot {
            attached: AtomicUsize::new(2),
            state: Mutex::new(SlotState {
                phase: Phase::Running {
                    fut: None,
                    driving: true,
                    nominee: None,
                },
                waiters: Slab::new(),
            }),
        }
    }
}

impl<O, T: Clone> Slot<O, T> {
    /// Takes this caller's copy of a finished call's value: the last caller moves it, the
    /// others clone it. Called under the state lock.
    pub(super) fn take(&self, out: &mut Option<T>, me: &mut Me) -> T {
        me.done = true;
        if self.attached.fetch_sub(1, Ordering::AcqRel) == 1 {
            out.take()
                .expect("the value stays until the last caller takes it")
        } else {
            out.as_ref()
                .expect("the value stays until the last caller takes it")
                .clone()
        }
    }

    pub(super) fn poll_wait(&self, me: &mut Me, cx: &mut Context<'_>) -> Poll<Wait<O, T>> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        match &mut st.phase {
            Phase::Done(out) => Poll::Ready(Wait::Value(self.take(out, me))),
            Phase::Abandoned => unreachable!("a call with a caller attached is not abandoned"),
            Phase::Running {
                fut,
                driving,
                nominee,
            } => {
                if !*driving {
                    // Take over from a driver that left.
                    if let Some(k) = me.waiter.take() {
                        st.waiters.try_remove(k);
                    }
                    *nominee = None;
                    *driving = true;
                    let fut = fut
                        .take()
                        .expect("the shared future is in place while nobody drives it");
                    return Poll::Ready(Wait::Drive(fut));
                }
                // Wait: register (or refresh) this caller's waker.
                match me.waiter {
                    Some(k) => {
                        let w = &mut st.waiters[k];
                        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *w = Some(cx.waker().clone());
                        }
                    }
                    None => me.waiter = Some(st.waiters.insert(Some(cx.waker().clone()))),
                }
                Poll::Pending
            }
        }
    }

    /// Stores the value of a finished call (its entry already removed), wakes every waiter,
    /// and returns the driver's own copy.
    pub(super) fn deliver(&self, me: &mut Me, out: T) -> T {
        // Nobody can attach any more: with only the driver attached, nobody else will ever
        // look at the state.
        if self.attached.load(Ordering::Acquire) == 1 {
            me.done = true;
            return out;
        }
        let waiters = {
            let mut st = self.state.lock();
            st.phase = Phase::Done(Some(out));
            std::mem::take(&mut st.waiters)
        };
        for w in waiters.into_iter().filter_map(|(_, w)| w) {
            w.wake();
        }
        let mut st = self.state.lock();
        match &mut st.phase {
            Phase::Done(out) => self.take(out, me),
            _ => unreachable!("a finished call stays finished"),
        }
    }
}

impl<O, T> Slot<O, T> {
    /// A caller leaves before taking its value, handing back the future if it drove.
    /// Returns `true` when the caller still holds an attachment to release (the call is
    /// running), `false` when it was settled here (the call had ended).
    pub(super) fn leave(
        &self,
        me: &mut Me,
        fut: Option<BoxFuture<O>>,
    ) -> (bool, Option<BoxFuture<O>>) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        match &mut st.phase {
            Phase::Done(_) => {
                // Under the state lock, like `take`, so the last taker is decided exactly.
                self.attached.fetch_sub(1, Ordering::AcqRel);
                (false, fut)
            }
            Phase::Abandoned => (false, fut),
            Phase::Running {
                fut: place,
                driving,
                nominee,
            } => {
                if let Some(k) = me.waiter.take() {
                    st.waiters.try_remove(k);
                    if *nominee == Some(k) {
                        *nominee = None;
                    }
                }
                if fut.is_some() {
                    // The driver leaves: put the future back for the next driver.
                    *place = fut;
                    *driving = false;
                }
                (true, None)
            }
        }
    }

    /// Wakes one waiter to take over driving, when nobody drives and nobody is on the way.
    pub(super) fn hand_off(&self) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if let Phase::Running {
            driving: false,
            nominee: nominee @ None,
            ..
        } = &mut st.phase
        {
            let next = st
                .waiters
                .iter_mut()
                .find_map(|(k, w)| w.take().map(|w| (k, w)));
            if let Some((k, w)) = next {
                *nominee = Some(k);
                drop(guard);
                w.wake();
            }
            // No waiter registered: the remaining callers have not been polled since they
            // attached, and the first of them to be polled drives.
        }
    }

    /// The last caller left a running call: takes the future out to be dropped.
    pub(super) fn abandon(&self) -> Option<BoxFuture<O>> {
        match std::mem::replace(&mut self.state.lock().phase, Phase::Abandoned) {
            Phase::Running { fut, .. } => fut,
            _ => None,
        }
    }
}
