//! One call to an inner service driven to its end: readiness of a clone, then the request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

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

pin_project! {
    #[project = StateProj]
    enum State<S, Req, F> {
        // Waiting for the inner clone to be ready; `req` is taken when it is.
        Ready { svc: S, req: Option<Req> },
        Called { #[pin] fut: F },
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
    pub(crate) fn new(svc: S, req: Req) -> Self {
        Upstream::with_on_call(svc, req, ())
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
                StateProj::Done => panic!("upstream call polled after completion"),
            }
        };
        this.state.set(State::Done);
        Poll::Ready(result)
    }
}
