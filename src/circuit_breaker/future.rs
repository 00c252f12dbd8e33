use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower::Service;

use super::core::{Shared, Ticket};
use crate::classify::{Classify, Outcome};
use crate::clock::{self, Instant};
use crate::completion::{AtResponse, CallEnd, Completion, End, sealed};
use crate::error::BoxError;

/// The admission of one call, held by its response future until the call finishes. Dropped
/// unfinished (the caller cancelled, an outer timeout fired, the inner future panicked), it
/// frees the call's half-open probe slot at once, and records a slow call where the call
/// already ran longer than the slow-call duration.
pub(super) struct Guard {
    /// `Some` until dropped; see [`spare`](crate::spare).
    shared: Option<Arc<Shared>>,
    ticket: Ticket,
    started: Option<Instant>,
    armed: bool,
}

impl Guard {
    /// Takes a reference to `shared` (from the thread's spare cache when it has one).
    #[inline]
    pub(super) fn new(shared: &Arc<Shared>, ticket: Ticket) -> Guard {
        Guard {
            shared: Some(crate::spare::acquire(shared)),
            ticket,
            started: None,
            armed: true,
        }
    }

    /// Starts the call's clock at the response future's first poll, for a breaker that
    /// measures durations: time before the caller polls is not the dependency's.
    #[inline]
    fn start(&mut self) {
        if self.started.is_none() && self.shared().timed {
            self.started = Some(clock::now());
        }
    }

    #[inline]
    fn shared(&self) -> &Shared {
        self.shared.as_ref().expect("present until dropped")
    }

    #[inline]
    fn elapsed(&self) -> Option<Duration> {
        self.started
            .map(|s| clock::now().saturating_duration_since(s))
    }

    /// `retry_after`: the delay the result asks for, read only when the breaker needs it.
    #[inline]
    fn finish(&mut self, outcome: Outcome, retry_after: impl FnOnce() -> Option<Duration>) {
        self.armed = false;
        let elapsed = self.elapsed();
        self.shared()
            .complete_with(self.ticket, outcome, elapsed, retry_after);
    }
}

impl Drop for Guard {
    #[inline]
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            let elapsed = self.elapsed();
            self.shared().cancel(self.ticket, elapsed);
        }
        if let Some(shared) = self.shared.take() {
            crate::spare::release(shared);
        }
    }
}

/// The breaker's admission of one call whose response has arrived: its state period, its
/// half-open probe slot if it holds one, its start (for the slow-call duration) and the
/// outcome its response was classified with. With
/// [`whole_body`](super::CircuitBreakerBuilder::whole_body) it is held inside the response's
/// [`CircuitBreakerBody`](super::CircuitBreakerBody) until the body ends. Not constructible
/// outside the crate.
///
/// When the call ends its outcome is recorded once, with the duration up to then: the
/// response's outcome at the response, at the body's end of stream and at its drop; a
/// failure at a body error. An outcome arriving after the breaker moved to another state
/// period is dropped, as for every call (see the
/// [module docs](crate::circuit_breaker#semantics)).
pub struct Admission {
    /// `None` when the call ended at the response (recorded in place by the future).
    guard: Option<Guard>,
    outcome: Outcome,
    /// The delay the response asked for (see
    /// [`retry_after_hold`](super::CircuitBreakerBuilder::retry_after_hold)), read at the
    /// headers when the response is a failure.
    retry_after: Option<Duration>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("breaker", &self.guard.as_ref().map(|g| &g.shared().name))
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl sealed::Sealed for Admission {}

impl CallEnd for Admission {
    // Always inlined: a call that ended at its response holds no guard here, and inlined
    // this whole function folds away.
    #[inline(always)]
    fn end(self, how: End) {
        let outcome = match how {
            End::BodyError => Outcome::Failure,
            End::Response | End::EndOfStream | End::Dropped => self.outcome,
        };
        if let Some(mut guard) = self.guard {
            let retry_after = self.retry_after;
            guard.finish(outcome, || retry_after);
        }
    }
}

pin_project! {
    #[project = KindProj]
    pub(super) enum Kind<S, Req, F> {
        // Admitted; waiting for the inner service to be ready. `req` is taken when it is.
        Ready { svc: S, req: Option<Req> },
        Called { #[pin] fut: F },
        // An error decided in `call`: a rejection (no guard), or an admitted call whose inner
        // service failed its readiness (the guard held: a failed call).
        Failed { err: Option<BoxError> },
        Done,
    }
}

pin_project! {
    /// The response future of [`CircuitBreaker`](super::CircuitBreaker).
    ///
    /// Resolves to the inner response, the inner error (boxed), or, for a call the breaker
    /// did not permit, a [`BreakwaterError`](crate::error::BreakwaterError) of kind
    /// [`CircuitOpen`](crate::error::ErrorKind::CircuitOpen) (decided in `call`; the inner
    /// service is then never touched). Dropping it before it finishes frees the call's
    /// half-open probe slot at once.
    ///
    /// # Panics
    ///
    /// When polled again after it returned `Ready`.
    pub struct ResponseFuture<S, Req, C, M = AtResponse>
    where
        S: Service<Req>,
    {
        #[pin]
        kind: Kind<S, Req, S::Future>,
        guard: Option<Guard>,
        classifier: C,
        completion: M,
    }
}

impl<S: Service<Req>, Req, C, M> fmt::Debug for ResponseFuture<S, Req, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("admitted", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: Service<Req>, Req, C, M> ResponseFuture<S, Req, C, M> {
    #[inline(always)]
    pub(super) fn admitted(
        kind: Kind<S, Req, S::Future>,
        guard: Guard,
        classifier: C,
        completion: M,
    ) -> Self {
        ResponseFuture {
            kind,
            guard: Some(guard),
            classifier,
            completion,
        }
    }

    pub(super) fn rejected(err: BoxError, classifier: C, completion: M) -> Self {
        ResponseFuture {
            kind: Kind::Failed { err: Some(err) },
            guard: None,
            classifier,
            completion,
        }
    }
}

impl<S, Req, C, M> Future for ResponseFuture<S, Req, C, M>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
    M: Completion<S::Response>,
{
    type Output = Result<M::Output<Admission>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(g) = this.guard.as_mut() {
            g.start();
        }
        let result = loop {
            match this.kind.as_mut().project() {
                KindProj::Ready { svc, req } => match svc.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let req = req.take().expect("request present until called");
                        let fut = svc.call(req);
                        this.kind.set(Kind::Called { fut });
                    }
                    Poll::Ready(Err(e)) => break e.into(),
                    Poll::Pending => return Poll::Pending,
                },
                KindProj::Called { fut } => match fut.poll(cx) {
                    Poll::Ready(Ok(res)) => {
                        this.kind.set(Kind::Done);
                        let outcome = this.classifier.classify(Ok(&res));
                        let (guard, retry_after) = if M::AFTER_RESPONSE {
                            // The delay is read now, while the headers are at hand, and only
                            // for a failure (the only outcome that can open the breaker).
                            let retry_after = match outcome {
                                Outcome::Failure => this.classifier.retry_after(Ok(&res)),
                                _ => None,
                            };
                            (this.guard.take(), retry_after)
                        } else {
                            // Ends here: recorded in place, so the guard stays with this
                            // future and nothing is moved on the hot path.
                            if let Some(g) = this.guard.as_mut() {
                                g.finish(outcome, || this.classifier.retry_after(Ok(&res)));
                            }
                            (None, None)
                        };
                        let admission = Admission {
                            guard,
                            outcome,
                            retry_after,
                        };
                        return Poll::Ready(Ok(this.completion.complete(res, admission)));
                    }
                    Poll::Ready(Err(e)) => break e.into(),
                    Poll::Pending => return Poll::Pending,
                },
                KindProj::Failed { err } => {
                    let err = err.take().expect("error present until returned");
                    if this.guard.is_some() {
                        break err;
                    }
                    this.kind.set(Kind::Done);
                    return Poll::Ready(Err(err));
                }
                KindProj::Done => panic!("CircuitBreaker ResponseFuture polled after completion"),
            }
        };
        this.kind.set(Kind::Done);
        let outcome = this.classifier.classify(Err(&result));
        if let Some(g) = this.guard.as_mut() {
            g.finish(outcome, || this.classifier.retry_after(Err(&result)));
        }
        Poll::Ready(Err(result))
    }
}
