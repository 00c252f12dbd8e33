use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::task::coop::{Unconstrained, unconstrained};
use tokio::time::Sleep;
use tower::Service;

use super::completion::Deadline;
use super::layer::{Shared, outcome_index};
use crate::classify::Classify;
use crate::clock::{self, Instant};
use crate::completion::Completion;
use crate::error::BoxError;
use crate::spare;

pin_project! {
    #[project = StateProj]
    pub(super) enum State<S, Req, F> {
        // Waiting for the inner service to be ready; `req` is taken when it is.
        Ready { svc: S, req: Option<Req> },
        Called { #[pin] fut: F },
        // Readiness failed in `call`; returned (and classified) on the first poll.
        Failed { err: Option<BoxError> },
        Done,
    }
}

pin_project! {
    #[project = TimerProj]
    enum Timer {
        // Not armed yet: the inner service has not returned `Pending`.
        Unarmed,
        // Polled without tokio's cooperative budget: an inner future that uses up the task's
        // budget on every poll must not keep the deadline from firing.
        Armed { #[pin] sleep: Unconstrained<Sleep> },
        // The deadline does not fit in an `Instant`: no deadline.
        Never,
    }
}

pin_project! {
    /// The response future of [`Timeout`](super::Timeout).
    ///
    /// Resolves to the inner response, the inner error (boxed), or a
    /// [`BreakwaterError`] of kind [`ErrorKind::Timeout`]. When the deadline passes, the
    /// inner future (or the inner service clone still waiting for readiness) is dropped before
    /// this future returns.
    ///
    /// # Panics
    ///
    /// When polled again after it returned `Ready`; and, as every tokio timer, when the
    /// deadline must be armed (the inner call did not finish on the first poll) on a runtime
    /// built without the time driver (`enable_time` / `enable_all`).
    pub struct ResponseFuture<S, Req, C, M>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req, S::Future>,
        #[pin]
        timer: Timer,
        timeout: Duration,
        // The armed deadline, published to the timeouts this one encloses while it polls.
        deadline: Option<Instant>,
        // First poll, when durations are recorded.
        started: Option<Instant>,
        // From the thread's spare cache (see `spare`); moved into the response's `Deadline`
        // when the inner call returns a response, else given back to the cache when the
        // call ends (dropped as a plain `Arc` when the future is dropped unfinished).
        shared: Option<Arc<Shared>>,
        classifier: C,
        completion: M,
    }
}

impl<S: Service<Req>, Req, C, M> fmt::Debug for ResponseFuture<S, Req, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("name", &self.shared.as_ref().map(|s| &s.name))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<S: Service<Req>, Req, C, M> ResponseFuture<S, Req, C, M> {
    #[inline(always)]
    pub(super) fn new(
        state: State<S, Req, S::Future>,
        timeout: Duration,
        shared: Arc<Shared>,
        classifier: C,
        completion: M,
    ) -> Self {
        ResponseFuture {
            state,
            timer: Timer::Unarmed,
            timeout,
            deadline: None,
            started: None,
            shared: Some(shared),
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
    type Output = Result<M::Output<Deadline>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(shared) = this.shared.as_ref() else {
            panic!("Timeout ResponseFuture polled after completion")
        };
        if this.started.is_none() && (M::AFTER_RESPONSE || shared.records_durations()) {
            *this.started = Some(clock::now());
        }

        // Timeouts polled inside this one (after waits of the layers between them) never
        // outlive its deadline; restored when this poll returns or unwinds.
        let _enclosing = this.deadline.map(enclosing::Scope::enter);

        // 1. The inner service first: a result ready together with the deadline wins.
        let result = loop {
            match this.state.as_mut().project() {
                StateProj::Ready { svc, req } => match svc.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let req = req.take().expect("request present until called");
                        let fut = svc.call(req);
                        this.state.set(State::Called { fut });
                    }
                    Poll::Ready(Err(e)) => break Some(Err(e.into())),
                    Poll::Pending => break None,
                },
                StateProj::Called { fut } => match fut.poll(cx) {
                    Poll::Ready(r) => break Some(r.map_err(Into::into)),
                    Poll::Pending => break None,
                },
                StateProj::Failed { err } => break err.take().map(Err),
                StateProj::Done => panic!("Timeout ResponseFuture polled after completion"),
            }
        };
        if let Some(result) = result {
            this.state.set(State::Done);
            let outcome = outcome_index(this.classifier.classify(result.as_ref()));
            let shared = this.shared.take().expect("present until completion");
            return Poll::Ready(match result {
                Ok(res) => {
                    let deadline = Deadline::new(shared, outcome, *this.started, *this.timeout);
                    Ok(this.completion.complete(res, deadline))
                }
                Err(e) => {
                    let elapsed = this
                        .started
                        .filter(|_| shared.records_durations())
                        .map(|s| clock::now().saturating_duration_since(s));
                    shared.record(outcome, elapsed);
                    spare::release(shared);
                    Err(e)
                }
            });
        }

        // 2. The inner call is pending: arm the timer on the first such poll.
        if let TimerProj::Unarmed = this.timer.as_mut().project() {
            let start = this.started.unwrap_or_else(clock::now);
            let own = start.checked_add(*this.timeout);
            // Inside another timeout's poll: the earlier of the two deadlines.
            let deadline = match (own, enclosing::current()) {
                (Some(own), Some(outer)) if outer < own => {
                    *this.timeout = outer.saturating_duration_since(start);
                    Some(outer)
                }
                (own, outer) => own.or(outer),
            };
            *this.deadline = deadline;
            match deadline {
                Some(deadline) => this.timer.set(Timer::Armed {
                    sleep: unconstrained(tokio::time::sleep_until(deadline)),
                }),
                None => this.timer.set(Timer::Never),
            }
        }
        if let TimerProj::Armed { sleep } = this.timer.project() {
            ready!(sleep.poll(cx));
            // Deadline passed: cancel the inner call now.
            this.state.set(State::Done);
            let shared = this.shared.take().expect("present until completion");
            let elapsed = this
                .started
                .filter(|_| shared.records_durations())
                .map(|s| clock::now().saturating_duration_since(s));
            let err = shared.timed_out(*this.timeout, elapsed);
            spare::release(shared);
            return Poll::Ready(Err(err));
        }
        Poll::Pending
    }
}

/// The deadline of the innermost armed timeout whose poll is running on this thread.
///
/// A timeout publishes its deadline while it polls its inner service, and a timeout armed
/// during that poll takes the earlier of its own deadline and the published one: a per-call
/// timeout under an overall deadline, called after waiting in the layers between them, fires
/// at the overall deadline itself, inside those layers (so a circuit breaker between them
/// counts the call as a timeout rather than seeing it cancelled from outside). A future
/// spawned onto another task is not polled inside the outer poll and keeps its own deadline.
mod enclosing {
    use std::cell::Cell;

    use crate::clock::Instant;

    thread_local! {
        static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    }

    /// The published deadline, if a timeout's poll is running on this thread.
    pub(super) fn current() -> Option<Instant> {
        DEADLINE.with(Cell::get)
    }

    /// Publishes a deadline until dropped (the earlier one stays when nested).
    pub(super) struct Scope(Option<Instant>);

    impl Scope {
        pub(super) fn enter(deadline: Instant) -> Scope {
            DEADLINE.with(|d| {
                let prev = d.get();
                d.set(Some(prev.map_or(deadline, |p| p.min(deadline))));
                Scope(prev)
            })
        }
    }

    impl Drop for Scope {
        fn drop(&mut self) {
            DEADLINE.with(|d| d.set(self.0));
        }
    }
}
