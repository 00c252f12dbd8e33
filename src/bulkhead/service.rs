use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::ResponseFuture;
use super::layer::{Admission, Shared};
use crate::error::BoxError;

/// A service whose calls are limited by a bulkhead, made by
/// [`BulkheadLayer`](super::BulkheadLayer).
///
/// `poll_ready` is always ready and reserves nothing; `call` takes the permit (or queues,
/// or rejects) and each call drives a clone of the inner service (see the
/// [module docs](crate::bulkhead#admission-poll_ready-and-clone)).
#[derive(Debug)]
pub struct Bulkhead<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for Bulkhead<S> {
    fn clone(&self) -> Self {
        Bulkhead {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S> Bulkhead<S> {
    pub(super) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Bulkhead { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req> Service<Req> for Bulkhead<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.shared.admit() {
            Admission::Admitted(permit) => {
                ResponseFuture::admitted(self.inner.clone(), req, permit)
            }
            Admission::Queued(ticket) => ResponseFuture::queued(self.inner.clone(), req, ticket),
            Admission::Rejected(err) => ResponseFuture::rejected(err),
        }
    }
}
