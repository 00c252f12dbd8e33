use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::layer::{Admission, Shared};
use super::{Permit, ResponseFuture};
use crate::completion::{AtResponse, Completion};
use crate::error::BoxError;
use crate::spare::Owner;
use crate::upstream::{self, Readiness};

/// A service whose calls are limited by a bulkhead, made by
/// [`BulkheadLayer`](super::BulkheadLayer).
///
/// `poll_ready` is always ready and reserves nothing; `call` takes the permit (or queues,
/// or rejects); a call with a permit calls the inner service in `call` when it is ready,
/// else drives its readiness in the response future (see the
/// [module docs](crate::bulkhead#admission-poll_ready-and-clone)).
#[derive(Debug)]
pub struct Bulkhead<S, M = AtResponse> {
    inner: S,
    shared: Arc<Owner<Shared>>,
    completion: M,
}

impl<S: Clone, M: Clone> Clone for Bulkhead<S, M> {
    fn clone(&self) -> Self {
        Bulkhead {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            completion: self.completion.clone(),
        }
    }
}

impl<S, M> Bulkhead<S, M> {
    pub(super) fn new(inner: S, shared: Arc<Owner<Shared>>, completion: M) -> Self {
        Bulkhead {
            inner,
            shared,
            completion,
        }
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

impl<S, M, Req> Service<Req> for Bulkhead<S, M>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    M: Completion<S::Response>,
{
    type Response = M::Output<Permit>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, M>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.shared.admit() {
            // The permit is owned before the inner service runs: a panic in it returns it.
            // The inner future is built in the expression that places it (see
            // `upstream::probe`).
            Admission::Admitted(permit) => match upstream::probe(&mut self.inner) {
                Readiness::Now => {
                    ResponseFuture::called(self.inner.call(req), permit, self.completion.clone())
                }
                Readiness::Later(svc) => {
                    ResponseFuture::not_ready(svc, req, permit, self.completion.clone())
                }
                Readiness::Failed(err) => {
                    drop(permit);
                    ResponseFuture::failed(err, self.completion.clone())
                }
            },
            Admission::Queued(ticket) => {
                ResponseFuture::queued(self.inner.clone(), req, ticket, self.completion.clone())
            }
            Admission::Rejected(err) => ResponseFuture::rejected(err, self.completion.clone()),
        }
    }
}
