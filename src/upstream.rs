//! One call to an inner service driven to its end: readiness of a clone, then the request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::Service;

use crate::error::BoxError;

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
    /// upstream future of coalesced calls and cache fetches.
    pub(crate) struct Upstream<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req, S::Future>,
    }
}

impl<S: Service<Req>, Req> Upstream<S, Req> {
    pub(crate) fn new(svc: S, req: Req) -> Self {
        Upstream {
            state: State::Ready {
                svc,
                req: Some(req),
            },
        }
    }
}

impl<S, Req> Future for Upstream<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = loop {
            match this.state.as_mut().project() {
                StateProj::Ready { svc, req } => match svc.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let req = req.take().expect("request present until called");
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
