//! One call to an inner service: started in `call` when the service is ready at once, or
//! driven to readiness by the response future.
//!
//! Every layer here is always ready (`poll_ready` reserves nothing; admission is decided in
//! `call`), so an admitted call must still get the inner service ready before calling it.
//! [`probe`] asks the inner service once, in `call`, with a no-op waker: a service that is
//! ready (the common case: HTTP clients, `service_fn`, this crate's own layers) is called at
//! once and nothing is cloned. A service that is not ready is moved into the response future,
//! which polls it again with the task's waker (so whatever the first poll registered, such
//! as a place in a semaphore's queue, is driven and released by that future), and a clone
//! takes its place in the layer's service. Polling with a different waker than the last is
//! allowed by the `Future` and `Service` contracts: only the last waker must be woken.

use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use pin_project_lite::pin_project;
use tower::Service;

use crate::error::BoxError;

/// What an [`Upstream`] does at the moment it calls the inner service (its readiness
/// reached): nothing for `()` (compiled away), a clock read for the cache's fills.
pub(crate) trait OnCall {
    /// The inner service is about to be called.
    fn on_call(&mut self);
}

impl OnCall for () {
    #[inline(always)]
    fn on_call(&mut self) {}
}

/// The inner service's readiness, asked once in `call`; see [`probe`].
pub(crate) enum Readiness<S> {
    /// Ready: call it now.
    Now,
    /// Not ready: the service itself, to be driven to readiness by the response future (a
    /// clone took its place).
    Later(S),
    /// Its readiness failed.
    Failed(BoxError),
}

/// Asks `svc` for readiness once, with a no-op waker; when it is not ready, replaces it by a
/// clone and hands the original back (see the [module docs](self)).
///
/// A service whose readiness failed or panicked is replaced by a clone too, and dropped (a
/// panic then resumes): whatever it holds, such as a permit of a `ConcurrencyLimit` taken
/// before its own inner service failed, is released, as it was when each call drove a clone
/// of its own; tower treats such a service as failed.
///
/// The caller then builds its response future around `svc.call(req)` in one expression, so
/// that the inner future is written where it lives: moved through an intermediate value,
/// it would be copied once more per layer, and a stack of layers copies every nested
/// future at each level.
#[inline(always)]
pub(crate) fn probe<S, Req>(svc: &mut S) -> Readiness<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
{
    let polled = panic::catch_unwind(AssertUnwindSafe(|| {
        svc.poll_ready(&mut Context::from_waker(Waker::noop()))
    }));
    match polled {
        Ok(Poll::Ready(Ok(()))) => Readiness::Now,
        Ok(Poll::Ready(Err(e))) => {
            drop(take(svc));
            Readiness::Failed(e.into())
        }
        Ok(Poll::Pending) => Readiness::Later(take(svc)),
        Err(payload) => {
            drop(take(svc));
            panic::resume_unwind(payload)
        }
    }
}

/// `svc` itself, a clone taking its place.
#[cold]
#[inline(never)]
fn take<S: Clone>(svc: &mut S) -> S {
    let fresh = svc.clone();
    std::mem::replace(svc, fresh)
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req, F> {
        // Waiting for the inner clone to be ready; `req` is taken when it is.
        Ready { svc: S, req: Option<Req> },
        Called { #[pin] fut: F },
        // Readiness failed in `call`; returned on the first poll.
        Failed { err: Option<BoxError> },
        Done,
    }
}

pin_project! {
    /// One call to the inner service: readiness of a clone of it, then the request. The
    /// upstream future of coalesced calls and cache fetches. `O` is told when the request
    /// is sent ([`OnCall`]; `()` for nothing).
    pub(crate) struct Upstream<S, Req, O = ()>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req, S::Future>,
        on_call: O,
    }
}

impl<S: Service<Req>, Req> Upstream<S, Req> {
    /// A call driving `svc` to readiness first (for a clone made ahead of time).
    #[cfg_attr(not(feature = "coalesce"), allow(dead_code))]
    pub(crate) fn new(svc: S, req: Req) -> Self {
        Upstream::with_on_call(svc, req, ())
    }

    /// A call to `svc`, made at once when it is ready (see [`probe`]).
    #[cfg_attr(not(feature = "coalesce"), allow(dead_code))]
    #[inline]
    pub(crate) fn start(svc: &mut S, req: Req) -> Self
    where
        S: Clone,
        S::Error: Into<BoxError>,
    {
        let state = match probe(svc) {
            Readiness::Now => State::Called { fut: svc.call(req) },
            Readiness::Later(svc) => State::Ready {
                svc,
                req: Some(req),
            },
            Readiness::Failed(err) => State::Failed { err: Some(err) },
        };
        Upstream { state, on_call: () }
    }
}

impl<S: Service<Req>, Req, O> Upstream<S, Req, O> {
    /// A call that tells `on_call` when it sends the request.
    pub(crate) fn with_on_call(svc: S, req: Req, on_call: O) -> Self {
        Upstream {
            state: State::Ready {
                svc,
                req: Some(req),
            },
            on_call,
        }
    }

    /// The [`OnCall`] value.
    #[cfg_attr(not(feature = "cache"), allow(dead_code))]
    pub(crate) fn on_call(&self) -> &O {
        &self.on_call
    }
}

impl<S, Req, O> Future for Upstream<S, Req, O>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    O: OnCall,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = loop {
            match this.state.as_mut().project() {
                StateProj::Ready { svc, req } => match svc.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let req = req.take().expect("request present until called");
                        this.on_call.on_call();
                        let fut = svc.call(req);
                        this.state.set(State::Called { fut });
                    }
                    Poll::Ready(Err(e)) => break Err(e.into()),
                    Poll::Pending => return Poll::Pending,
                },
                StateProj::Called { fut } => match fut.poll(cx) {
                    Poll::Ready(r) => break r.map_err(Into::into),
                    Poll::Pending => return Poll::Pending,
                },
                StateProj::Failed { err } => {
                    break Err(err.take().expect("error present until returned"));
                }
                StateProj::Done => panic!("upstream call polled after completion"),
            }
        };
        this.state.set(State::Done);
        Poll::Ready(result)
    }
}
