use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::Service;

use super::gcra::Cell;
use super::layer::Core;
use crate::error::{BoxError, BreakwaterError};

/// Where a waiter's reservation lives, to give it back.
pub(super) enum WaiterCell {
    /// The direct limiter's cell, inside [`Core`].
    Direct,
    /// One key's cell of a keyed limiter.
    Keyed(Arc<Cell>),
}

/// A reservation not yet admitted. Dropped before admission, it gives its slot back where it
/// can (see the module docs, "Dropped waiters").
pub(super) struct Waiter {
    core: Arc<Core>,
    cell: WaiterCell,
    /// The TAT this reservation set, and the one it replaced.
    tat: (u64, u64),
    /// When `call` was made, in ns since the base instant.
    called_at: u64,
    admitted: bool,
}

impl Waiter {
    pub(super) fn new(core: Arc<Core>, cell: WaiterCell, tat: (u64, u64), called_at: u64) -> Self {
        core.stats.waiting.fetch_add(1, Ordering::Relaxed);
        core.metrics.waiting.increment(1.0);
        Waiter {
            core,
            cell,
            tat,
            called_at,
            admitted: false,
        }
    }

    fn admit(&mut self) {
        self.admitted = true;
        self.core.record_waited(self.called_at);
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let core = &self.core;
        core.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        core.metrics.waiting.decrement(1.0);
        if self.admitted {
            return;
        }
        core.stats.abandoned.fetch_add(1, Ordering::Relaxed);
        let cell = match &self.cell {
            WaiterCell::Direct => &core.direct,
            WaiterCell::Keyed(cell) => cell,
        };
        if cell.give_back(self.tat.0, self.tat.1) {
            core.stats.given_back.fetch_add(1, Ordering::Relaxed);
            if matches!(self.cell, WaiterCell::Direct) && core.metrics.available.is_some() {
                core.publish_available(core.now_ns());
            }
        }
    }
}

pin_project! {
    // Armed on the first poll, so that `call` needs no runtime context.
    #[project = TimerProj]
    enum Timer {
        Unarmed { deadline: Instant },
        Armed { #[pin] sleep: Sleep },
    }
}

pin_project! {
    // A waiter's timer, inner clone and request. Boxed (one allocation per call that waits,
    // for at least a millisecond) so that the response future of calls admitted at once
    // stays small: a timer is over 100 bytes, moved with the future on every call.
    struct Wait<S, Req> {
        #[pin]
        timer: Timer,
        svc: Option<S>,
        req: Option<Req>,
        waiter: Waiter,
    }
}

pin_project! {
    // The hot transitions (ready -> called -> done) use `project_replace` and move the old
    // variant's fields out, so that they are dropped by type, not through the enum's drop
    // glue (a call and a match per transition).
    #[project = StateProj]
    #[project_replace = StateReplace]
    enum State<S, Req, F> {
        // Rejected in `call`, or the inner service failed its readiness there; the error is
        // returned on the first poll.
        Rejected { err: Option<BoxError> },
        // Slot reserved at a later emission time.
        Waiting { wait: Pin<Box<Wait<S, Req>>> },
        // Admitted: driving the inner service's readiness; `req` is taken when it is ready.
        Ready { svc: S, req: Option<Req> },
        Called { #[pin] fut: F },
        Done,
    }
}

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit) and
    /// [`KeyedRateLimit`](super::KeyedRateLimit).
    ///
    /// Resolves to a [`BreakwaterError`] of kind
    /// [`RateLimited`](crate::error::ErrorKind::RateLimited) or
    /// [`TooManyKeys`](crate::error::ErrorKind::TooManyKeys) when the call was rejected in
    /// `call`; otherwise, after sleeping until its emission time if it had to wait, to the
    /// inner service's response or error (boxed). Dropped while waiting, it gives its slot
    /// back where it can (see the [module docs](super#dropped-waiters)).
    ///
    /// # Panics
    ///
    /// When polled again after it returned `Ready`.
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req, S::Future>,
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Rejected { .. } => "rejected",
            State::Waiting { .. } => "waiting",
            State::Ready { .. } => "ready",
            State::Called { .. } => "called",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    /// An admitted call whose inner service was ready in `call`: its inner future.
    #[inline(always)]
    pub(super) fn called(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Called { fut },
        }
    }

    /// An admitted call whose inner service was not ready in `call`: the service, to be
    /// driven to readiness.
    pub(super) fn not_ready(svc: S, req: Req) -> Self {
        ResponseFuture {
            state: State::Ready {
                svc,
                req: Some(req),
            },
        }
    }

    /// An admitted call whose inner service failed its readiness in `call`: the error,
    /// returned on the first poll as a rejection is.
    pub(super) fn failed(err: BoxError) -> Self {
        ResponseFuture {
            state: State::Rejected { err: Some(err) },
        }
    }

    pub(super) fn waiting(deadline: Instant, svc: S, req: Req, waiter: Waiter) -> Self {
        let wait = Box::pin(Wait {
            timer: Timer::Unarmed { deadline },
            svc: Some(svc),
            req: Some(req),
            waiter,
        });
        ResponseFuture {
            state: State::Waiting { wait },
        }
    }

    pub(super) fn rejected(err: BreakwaterError) -> Self {
        ResponseFuture {
            state: State::Rejected {
                err: Some(Box::new(err)),
            },
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Ready { svc, req } => {
                    if let Err(e) = ready!(svc.poll_ready(cx)) {
                        state.set(State::Done);
                        return Poll::Ready(Err(e.into()));
                    }
                    let req = req.take().expect("request present until called");
                    let fut = svc.call(req);
                    // Moving the old fields out drops them by type (no enum drop glue).
                    match state.as_mut().project_replace(State::Called { fut }) {
                        StateReplace::Ready { svc, req } => drop((svc, req)),
                        _ => unreachable!("replaced the ready state"),
                    }
                }
                StateProj::Called { fut } => {
                    let out = ready!(fut.poll(cx));
                    // `project_replace` dropped the pinned future in place; what it returns
                    // for this variant owns nothing, so forgetting it skips the drop glue.
                    let old = state.project_replace(State::Done);
                    match &old {
                        StateReplace::Called { .. } => std::mem::forget(old),
                        _ => unreachable!("replaced the called state"),
                    }
                    return Poll::Ready(out.map_err(Into::into));
                }
                StateProj::Waiting { .. } => ready!(poll_waiting(state.as_mut(), cx)),
                StateProj::Rejected { err } => return rejected(err),
                StateProj::Done => panic!("RateLimit ResponseFuture polled after completion"),
            }
        }
    }
}

/// A waiting future: sleeps until its emission time (arming the timer on the first poll),
/// then admits the call and turns into the `Ready` state.
#[cold]
#[inline(never)]
fn poll_waiting<S, Req, F>(
    mut state: Pin<&mut State<S, Req, F>>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let StateProj::Waiting { wait } = state.as_mut().project() else {
        unreachable!("called in the waiting state")
    };
    let mut w = wait.as_mut().project();
    if let TimerProj::Unarmed { deadline } = w.timer.as_mut().project() {
        let sleep = tokio::time::sleep_until(*deadline);
        w.timer.set(Timer::Armed { sleep });
    }
    if let TimerProj::Armed { sleep } = w.timer.project() {
        ready!(sleep.poll(cx));
    }
    w.waiter.admit();
    let svc = w.svc.take().expect("service present until admitted");
    let req = w.req.take().expect("request present until admitted");
    state.set(State::Ready {
        svc,
        req: Some(req),
    });
    Poll::Ready(())
}

/// The error of a call rejected in `call`, taken on the first poll.
#[cold]
#[inline(never)]
fn rejected<T>(err: &mut Option<BoxError>) -> Poll<Result<T, BoxError>> {
    Poll::Ready(Err(err.take().expect("error present until returned")))
}
