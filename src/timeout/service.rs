use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::ResponseFuture;
use super::completion::Deadline;
use super::future::State;
use super::layer::{Shared, TimeoutPolicy};
use crate::classify::Classify;
use crate::completion::Completion;
use crate::error::BoxError;
use crate::spare::{self, Owner};
use crate::upstream::{self, Readiness};

/// A service with a per-call deadline, made by [`TimeoutLayer`](super::TimeoutLayer).
///
/// `poll_ready` is always ready and reserves nothing; `call` calls the inner service when it
/// is ready, else the response future drives its readiness under the deadline (see the
/// [module docs](crate::timeout#admission-and-clone)).
#[derive(Debug)]
pub struct Timeout<S, P, C, M> {
    inner: S,
    shared: Arc<Owner<Shared>>,
    policy: P,
    classifier: C,
    completion: M,
}

impl<S: Clone, P: Clone, C: Clone, M: Clone> Clone for Timeout<S, P, C, M> {
    fn clone(&self) -> Self {
        Timeout {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            policy: self.policy.clone(),
            classifier: self.classifier.clone(),
            completion: self.completion.clone(),
        }
    }
}

impl<S, P, C, M> Timeout<S, P, C, M> {
    pub(super) fn new(
        inner: S,
        shared: Arc<Owner<Shared>>,
        policy: P,
        classifier: C,
        completion: M,
    ) -> Self {
        Timeout {
            inner,
            shared,
            policy,
            classifier,
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

impl<S, P, C, M, Req> Service<Req> for Timeout<S, P, C, M>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: TimeoutPolicy<Req>,
    C: Classify<S::Response>,
    M: Completion<S::Response>,
{
    type Response = M::Output<Deadline>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C, M>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let timeout = self.policy.timeout_for(&req, self.shared.timeout);
        let (shared, classifier, completion) = (&self.shared, &self.classifier, &self.completion);
        let future = |state| {
            ResponseFuture::new(
                state,
                timeout,
                spare::acquire(shared),
                classifier.clone(),
                completion.clone(),
            )
        };
        // The inner future is built in the expression that places it (see `upstream::probe`).
        match upstream::probe(&mut self.inner) {
            Readiness::Now => future(State::Called {
                fut: self.inner.call(req),
            }),
            Readiness::Later(svc) => future(State::Ready {
                svc,
                req: Some(req),
            }),
            Readiness::Failed(err) => future(State::Failed { err: Some(err) }),
        }
    }
}
