use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::ResponseFuture;
use super::core::Shared;
use super::future::Guard;
use super::spare::Owner;
use crate::classify::Classify;
use crate::error::{BoxError, BreakwaterError, ErrorKind, LayerKind};

/// A service behind a circuit breaker, made by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// `poll_ready` is always ready and reserves nothing; `call` decides admission, and an
/// admitted call drives a clone of the inner service (see the
/// [module docs](crate::circuit_breaker#admission-and-clone)).
#[derive(Debug)]
pub struct CircuitBreaker<S, C> {
    inner: S,
    shared: Arc<Owner>,
    classifier: C,
}

impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        CircuitBreaker {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<S, C> CircuitBreaker<S, C> {
    pub(super) fn new(inner: S, shared: Arc<Owner>, classifier: C) -> Self {
        CircuitBreaker {
            inner,
            shared,
            classifier,
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

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.shared.admit() {
            Ok(ticket) => ResponseFuture::admitted(
                self.inner.clone(),
                req,
                Guard::new(&self.shared, ticket),
                self.classifier.clone(),
            ),
            Err(retry_after) => {
                ResponseFuture::rejected(reject(&self.shared, retry_after), self.classifier.clone())
            }
        }
    }
}

/// Counts a rejection and builds its error.
#[cold]
#[inline(never)]
fn reject(shared: &Shared, retry_after: Option<std::time::Duration>) -> BoxError {
    shared.rejected(retry_after);
    let mut err = BreakwaterError::new(
        ErrorKind::CircuitOpen,
        LayerKind::CircuitBreaker,
        shared.name.clone(),
    );
    if let Some(after) = retry_after {
        err = err.with_retry_after(after);
    }
    Box::new(err)
}
