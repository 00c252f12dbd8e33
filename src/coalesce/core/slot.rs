//! What the callers of a call with followers share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use super::BoxFuture;
use super::waiters::Waiters;
use parking_lot::Mutex;

/// A caller's own state in a shared call.
#[derive(Debug, Default)]
pub(super) struct Me {
    /// Key of this caller's waker in the waiter list, while it waits.
    pub(super) waiter: Option<usize>,
    /// This caller has taken its value (or resumed the panic) or left.
    pub(super) done: bool,
}

/// What a waiting caller finds when polled.
pub(super) enum Wait<O> {
    /// The call ended: this caller takes its value with [`Slot::take`], holding no lock.
    Done,
    /// Nobody drives the shared future: this caller takes it and drives.
    Drive(BoxFuture<O>),
}

enum Phase<O> {
    Running {
        /// The shared future while nobody drives it (its driver holds it in its [`Join`]).
        ///
        /// [`Join`]: super::Join
        fut: Option<BoxFuture<O>>,
        /// A caller holds and drives the future.
        driving: bool,
        /// The waiter woken to take over driving, if one is on its way.
        nominee: Option<usize>,
    },
    /// The call ended: its value is in [`Slot::value`].
    Done,
    /// Every caller left; the future was dropped.
    Abandoned,
}

struct SlotState<O> {
    phase: Phase<O>,
    /// Wakers of callers waiting for the value (not the driver's: the future holds that one).
    waiters: Waiters,
}

/// What the callers of a call with followers share: the waiter list, the value once ready,
/// the future while nobody drives it, and the count of attached callers.
///
/// No user code runs under the state lock: the future is moved in and out of it but polled
/// and dropped outside, and the value lives outside it ([`value`](Self::value), written once
/// before the phase turns `Done`), so each caller clones it on its own task with no lock
/// held. Only wakers are cloned, woken or dropped under the lock.
pub(super) struct Slot<O, T> {
    /// Callers attached (the leader and each follower not yet done); incremented only under
    /// the entry's shard lock, and it drops to zero only under it while the entry is in the
    /// table. Meaningful while the call runs.
    pub(super) attached: AtomicUsize,
    /// The value of the finished call, set once by its driver before the phase turns `Done`
    /// (in the slot itself, so a shared call allocates nothing more for it). Dropped with the
    /// slot, when the last caller lets go of it, outside every lock.
    value: OnceLock<T>,
    state: Mutex<SlotState<O>>,
}

impl<O, T> Slot<O, T> {
    /// A slot made by the first follower, while the leader drives.
    pub(super) fn new() -> Self {
        Slot {
            attached: AtomicUsize::new(2),
            value: OnceLock::new(),
            state: Mutex::new(SlotState {
                phase: Phase::Running {
                    fut: None,
                    driving: true,
                    nominee: None,
                },
                waiters: Waiters::new(),
            }),
        }
    }

    /// Whether the state lock is held now (by anyone): for the tests' user code probes.
    #[cfg(test)]
    pub(super) fn is_locked(&self) -> bool {
        self.state.is_locked()
    }
}

impl<O, T: Clone> Slot<O, T> {
    /// Takes this caller's copy of a finished call's value, holding no lock: the caller
    /// holding the last reference to the slot moves the value out, the others clone it (on
    /// their own task, in parallel). When callers take at the same moment, more than one may
    /// clone, and the original is dropped with the slot by the last to let go.
    pub(super) fn take(self: Arc<Self>, me: &mut Me) -> T {
        me.done = true;
        match Arc::try_unwrap(self) {
            Ok(slot) => slot
                .value
                .into_inner()
                .expect("the value is set before the call is done"),
            Err(slot) => slot
                .value
                .get()
                .expect("the value is set before the call is done")
                .clone(),
        }
    }

    pub(super) fn poll_wait(&self, me: &mut Me, cx: &mut Context<'_>) -> Poll<Wait<O>> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        match &mut st.phase {
            Phase::Done => Poll::Ready(Wait::Done),
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
                        let w = st.waiters.get_mut(k);
                        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *w = Some(cx.waker().clone());
                        }
                    }
                    None => me.waiter = Some(st.waiters.insert(cx.waker().clone())),
                }
                Poll::Pending
            }
        }
    }

    /// Stores the value of a finished call (its entry already removed), wakes every waiter,
    /// and returns the driver's own copy (taken as [`take`](Self::take) does, after the
    /// waiters were woken).
    pub(super) fn deliver(self: Arc<Self>, me: &mut Me, out: T) -> T {
        // Nobody can attach any more: with only the driver attached, nobody else will ever
        // look at the value.
        if self.attached.load(Ordering::Acquire) == 1 {
            me.done = true;
            return out;
        }
        if self.value.set(out).is_err() {
            unreachable!("a call ends once");
        }
        let waiters = {
            let mut st = self.state.lock();
            // The running phase holds no future here (the driver holds it).
            st.phase = Phase::Done;
            std::mem::take(&mut st.waiters)
        };
        waiters.wake_all();
        self.take(me)
    }
}

impl<O, T> Slot<O, T> {
    /// A caller leaves before taking its value, handing back the future if it drove.
    /// Returns `true` when the caller still holds an attachment to release (the call is
    /// running), `false` when it was settled here (the call had ended); and the future when
    /// it was not handed back, for the caller to drop outside the lock.
    pub(super) fn leave(
        &self,
        me: &mut Me,
        fut: Option<BoxFuture<O>>,
    ) -> (bool, Option<BoxFuture<O>>) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        match &mut st.phase {
            Phase::Done | Phase::Abandoned => (false, fut),
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
            let next = st.waiters.take_first();
            if let Some((k, w)) = next {
                *nominee = Some(k);
                drop(guard);
                w.wake();
            }
            // No waiter registered: the remaining callers have not been polled since they
            // attached, and the first of them to be polled drives.
        }
    }

    /// The last caller left a running call: takes the future out, for the caller to drop
    /// outside the lock.
    pub(super) fn abandon(&self) -> Option<BoxFuture<O>> {
        let old = std::mem::replace(&mut self.state.lock().phase, Phase::Abandoned);
        match old {
            Phase::Running { fut, .. } => fut,
            _ => None,
        }
    }
}
