use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::Service;

use super::layer::Shared;
use crate::clock::{self, Instant};
use crate::completion::{AtResponse, CallEnd, Completion, End, sealed};
use crate::error::{BoxError, BreakwaterError};
use crate::spare;

/// One held bulkhead permit, returned when dropped (RAII), exactly once. With
/// [`whole_body`](super::BulkheadBuilder::whole_body) it is held inside the response's
/// [`BulkheadBody`](super::BulkheadBody) until the body ends, fails or is dropped. Not
/// constructible outside the crate.
pub struct Permit {
    /// `Some` until dropped, then given back to the thread's spare cache (see `spare`).
    shared: Option<Arc<Shared>>,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("bulkhead", &self.shared.as_ref().map(|s| &s.name))
            .finish()
    }
}

impl sealed::Sealed for Permit {}

/// However the call ends, the permit is returned (dropped).
impl CallEnd for Permit {
    #[inline]
    fn end(self, _how: End) {}
}

impl Permit {
    /// Wraps a permit that was just taken from `shared`.
    #[inline]
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Permit {
            shared: Some(shared),
        }
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.release();
            spare::release(shared);
        }
    }
}

/// A place in the waiters' queue. Dropping a live ticket withdraws it, returning a permit
/// that was handed to it in the meantime.
pub(super) struct Ticket {
    /// `Some` until dropped, then given back to the thread's spare cache (see `spare`).
    shared: Option<Arc<Shared>>,
    slot: usize,
    queued_at: Instant,
    live: bool,
}

impl Ticket {
    pub(super) fn new(shared: Arc<Shared>, slot: usize, queued_at: Instant) -> Self {
        Ticket {
            shared: Some(shared),
            slot,
            queued_at,
            live: true,
        }
    }

    #[inline]
    fn shared(&self) -> &Arc<Shared> {
        self.shared.as_ref().expect("present until dropped")
    }

    /// When the maximum wait ends; `None` when it does not fit in an `Instant` (no limit).
    fn deadline(&self) -> Option<Instant> {
        let max_wait = self.shared().max_wait?;
        self.queued_at.checked_add(max_wait)
    }

    /// Records the time spent in the queue (when the histogram is on).
    fn record_wait(&self) {
        if let Some(h) = &self.shared().metrics.wait {
            let waited = clock::now().saturating_duration_since(self.queued_at);
            h.record(waited.as_secs_f64());
        }
    }

    /// The permit, if one was handed over; otherwise registers the waker.
    fn poll(&mut self, cx: &mut Context<'_>) -> Option<Permit> {
        if !self.shared().sem.poll_slot(self.slot, cx.waker()) {
            return None;
        }
        // Owned by an RAII value before any other code runs.
        self.live = false;
        let permit = Permit::new(spare::acquire(self.shared()));
        self.record_wait();
        self.shared().on_granted();
        Some(permit)
    }

    /// The maximum wait passed: withdraw. A permit handed over before the withdrawal is
    /// kept (the call goes ahead); otherwise the call is rejected.
    fn give_up(&mut self) -> Result<Permit, BreakwaterError> {
        self.live = false;
        if self.shared().sem.withdraw(self.slot) {
            // Owned by an RAII value before any other code runs.
            let permit = Permit::new(spare::acquire(self.shared()));
            self.record_wait();
            self.shared().on_granted();
            return Ok(permit);
        }
        self.shared().publish_waiting();
        self.record_wait();
        Err(self.shared().reject())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.live {
            self.live = false;
            if self.shared().sem.withdraw(self.slot) {
                // Handed a permit nobody will use: return it at once.
                drop(Permit::new(spare::acquire(self.shared())));
            } else {
                self.shared().publish_waiting();
            }
            self.record_wait();
        }
        if let Some(shared) = self.shared.take() {
            spare::release(shared);
        }
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateReplace]
    enum State<F> {
        // Queued for a permit (until the ticket's deadline). The ticket is out of its place
        // only while a poll runs: found missing, that poll panicked.
        Waiting { ticket: Option<Ticket> },
        // A permit is held (in `permit`): waiting for the inner service's readiness.
        Ready,
        // A permit is held (in `permit`) while the inner future runs.
        Called { #[pin] fut: F },
        // Boxed at once: it is returned boxed, and the happy path's future stays small.
        Rejected { err: Option<Box<BreakwaterError>> },
        // The inner service failed its readiness in `call` (its permit already returned).
        Failed { err: Option<BoxError> },
        Done,
    }
}

pin_project! {
    /// The response future of [`Bulkhead`](super::Bulkhead).
    ///
    /// Resolves to the inner response, the inner error (boxed), or a [`BreakwaterError`] of
    /// kind [`ErrorKind::BulkheadFull`](crate::error::ErrorKind::BulkheadFull). Holds its
    /// permit (or its place in the queue) from `call` until the inner response completes,
    /// the inner readiness fails, or this future is dropped, whichever comes first. A panic
    /// unwinding through `poll` (from the inner service, a metrics recorder, an event
    /// listener or the timer) releases them too, as it unwinds.
    ///
    /// A queued call's maximum wait counts from `call`, but its timer is armed at its first
    /// poll and the deadline is observed only while it is polled: a queued future that is
    /// never polled keeps its place in the queue (and a permit handed to it) until it is
    /// polled or dropped.
    ///
    /// # Panics
    ///
    /// - When polled again after it returned `Ready`.
    /// - When polled again after a poll that panicked: it never reaches the inner service
    ///   again (its permit went back as the panic unwound), and drops the inner future.
    /// - When a queued call with a finite maximum wait is polled outside a tokio runtime
    ///   whose time driver is enabled (it arms a `tokio::time` timer); its place in the
    ///   queue is given up as that panic unwinds.
    pub struct ResponseFuture<S, Req, M = AtResponse>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future>,
        // The waiter's timer, armed at its first poll. Boxed: inline, tokio's `Sleep` would
        // make every call's future ~120 bytes larger, and moving it costs each admitted call
        // more than this one allocation costs a call that has to wait anyway.
        sleep: Option<Pin<Box<Sleep>>>,
        // The inner service (or a queued call's clone of it), until it is called.
        svc: Option<S>,
        req: Option<Req>,
        permit: Option<Permit>,
        completion: M,
    }
}

impl<S: Service<Req>, Req, M> fmt::Debug for ResponseFuture<S, Req, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } => "waiting",
            State::Ready => "ready",
            State::Called { .. } => "called",
            State::Rejected { .. } => "rejected",
            State::Failed { .. } => "failed",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("holds_permit", &self.permit.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: Service<Req>, Req, M> ResponseFuture<S, Req, M> {
    /// A call with a permit whose inner service was ready in `call`: its inner future.
    #[inline(always)]
    pub(super) fn called(fut: S::Future, permit: Permit, completion: M) -> Self {
        ResponseFuture {
            state: State::Called { fut },
            sleep: None,
            svc: None,
            req: None,
            permit: Some(permit),
            completion,
        }
    }

    /// A call with a permit whose inner service was not ready in `call`: the service, to
    /// be driven to readiness while the permit is held.
    pub(super) fn not_ready(svc: S, req: Req, permit: Permit, completion: M) -> Self {
        ResponseFuture {
            state: State::Ready,
            sleep: None,
            svc: Some(svc),
            req: Some(req),
            permit: Some(permit),
            completion,
        }
    }

    /// A call whose inner service failed its readiness in `call` (its permit returned).
    pub(super) fn failed(err: BoxError, completion: M) -> Self {
        ResponseFuture {
            state: State::Failed { err: Some(err) },
            sleep: None,
            svc: None,
            req: None,
            permit: None,
            completion,
        }
    }

    pub(super) fn queued(svc: S, req: Req, ticket: Ticket, completion: M) -> Self {
        ResponseFuture {
            state: State::Waiting {
                ticket: Some(ticket),
            },
            sleep: None,
            svc: Some(svc),
            req: Some(req),
            permit: None,
            completion,
        }
    }

    pub(super) fn rejected(err: BreakwaterError, completion: M) -> Self {
        ResponseFuture {
            state: State::Rejected {
                err: Some(Box::new(err)),
            },
            sleep: None,
            svc: None,
            req: None,
            permit: None,
            completion,
        }
    }
}

impl<S, Req, M> Future for ResponseFuture<S, Req, M>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    M: Completion<S::Response>,
{
    type Output = Result<M::Output<Permit>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // Whatever this poll holds (its ticket or its permit) is moved into a local while
        // code of others runs: a panic unwinding through the poll drops it, which leaves
        // the queue or returns the permit at once, and leaves the future without it, which
        // the next poll detects: a future that panicked never reaches the inner service
        // again (it would do so without a permit).
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { ticket } => {
                    let Some(mut held) = ticket.take() else {
                        this.state.set(State::Done);
                        *this.svc = None;
                        *this.req = None;
                        *this.sleep = None;
                        polled_after_panic()
                    };
                    let sleep = &mut *this.sleep;
                    // A permit handed over wins over a deadline reached in the same poll.
                    let permit = match held.poll(cx) {
                        Some(permit) => permit,
                        None => {
                            if sleep.is_none() {
                                if let Some(d) = held.deadline() {
                                    *sleep = Some(Box::pin(tokio::time::sleep_until(d)));
                                }
                            }
                            let expired = sleep
                                .as_mut()
                                .is_some_and(|s| s.as_mut().poll(cx).is_ready());
                            if !expired {
                                *ticket = Some(held);
                                return Poll::Pending;
                            }
                            match held.give_up() {
                                Ok(permit) => permit,
                                Err(err) => {
                                    this.state.set(State::Done);
                                    *this.svc = None;
                                    *this.sleep = None;
                                    return Poll::Ready(Err(Box::new(err)));
                                }
                            }
                        }
                    };
                    *this.permit = Some(permit);
                    *this.sleep = None;
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    let Some(permit) = this.permit.take() else {
                        this.state.set(State::Done);
                        *this.svc = None;
                        *this.req = None;
                        polled_after_panic()
                    };
                    let svc = this
                        .svc
                        .as_mut()
                        .expect("inner service present until called");
                    match svc.poll_ready(cx) {
                        Poll::Pending => {
                            *this.permit = Some(permit);
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => {
                            this.state.set(State::Done);
                            *this.svc = None;
                            drop(permit);
                            return Poll::Ready(Err(e.into()));
                        }
                        Poll::Ready(Ok(())) => {
                            let req = this.req.take().expect("request present until called");
                            let fut = svc.call(req);
                            *this.permit = Some(permit);
                            *this.svc = None;
                            this.state.set(State::Called { fut });
                        }
                    }
                }
                StateProj::Called { fut } => {
                    let Some(permit) = this.permit.take() else {
                        this.state.set(State::Done);
                        polled_after_panic()
                    };
                    return match fut.poll(cx) {
                        Poll::Pending => {
                            *this.permit = Some(permit);
                            Poll::Pending
                        }
                        Poll::Ready(result) => {
                            // Completed: drop the inner future, then return the permit now
                            // (or, with `WholeBody`, when the response's body ends), not
                            // when the caller drops this future. `project_replace` drops
                            // the pinned future in place; what it returns for this variant
                            // owns nothing, so forgetting it skips the enum's drop glue.
                            let old = this.state.project_replace(State::Done);
                            debug_assert!(matches!(old, StateReplace::Called { .. }));
                            std::mem::forget(old);
                            Poll::Ready(match result {
                                Ok(res) => Ok(this.completion.complete(res, permit)),
                                Err(e) => {
                                    drop(permit);
                                    Err(e.into())
                                }
                            })
                        }
                    };
                }
                StateProj::Rejected { err } => {
                    let err = err.take().expect("rejection present until returned");
                    this.state.set(State::Done);
                    return Poll::Ready(Err(err));
                }
                StateProj::Failed { err } => {
                    let err = err.take().expect("error present until returned");
                    this.state.set(State::Done);
                    return Poll::Ready(Err(err));
                }
                StateProj::Done => panic!("Bulkhead ResponseFuture polled after completion"),
            }
        }
    }
}

#[cold]
#[inline(never)]
#[track_caller]
fn polled_after_panic() -> ! {
    panic!("Bulkhead ResponseFuture polled after a panic")
}
