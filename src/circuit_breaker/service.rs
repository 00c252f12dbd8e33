use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::ResponseFuture;
use super::core::{Shared, Undo};
use super::future::{Admission, Guard, Kind};
use crate::classify::Classify;
use crate::completion::{AtResponse, Completion};
use crate::error::{BoxError, BreakwaterError, ErrorKind, LayerKind};
use crate::spare::Owner;
use crate::upstream::{self, Readiness};

/// A service behind a circuit breaker, made by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// `poll_ready` is always ready and reserves nothing; `call` decides admission, and an
/// admitted call calls the inner service at once when it is ready, or else drives it to
/// readiness in the response future (see the
/// [module docs](crate::circuit_breaker#admission-and-clone)).
#[derive(Debug)]
pub struct CircuitBreaker<S, C, M = AtResponse> {
    inner: S,
    shared: Arc<Owner<Shared>>,
    classifier: C,
    completion: M,
}

impl<S: Clone, C: Clone, M: Clone> Clone for CircuitBreaker<S, C, M> {
    fn clone(&self) -> Self {
        CircuitBreaker {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classifier: self.classifier.clone(),
            completion: self.completion.clone(),
        }
    }
}

impl<S, C, M> CircuitBreaker<S, C, M> {
    pub(super) fn new(inner: S, shared: Arc<Owner<Shared>>, classifier: C, completion: M) -> Self {
        CircuitBreaker {
            inner,
            shared,
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

impl<S, C, M, Req> Service<Req> for CircuitBreaker<S, C, M>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
    M: Completion<S::Response>,
{
    type Response = M::Output<Admission>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C, M>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.shared.admit() {
            Ok(ticket) => {
                // A panic of the inner service in `call` frees the admission. The guard is
                // made after the inner call, straight into the response future: built
                // before it, it would be spilled and copied back (a store-forwarding stall
                // that costs more than the rest of the call).
                let undo = Undo::new(&self.shared, ticket);
                // The inner future is built in the expression that places it (see
                // `upstream::probe`); the guard is made after the inner call, the undo
                // disarmed as it is.
                macro_rules! admitted {
                    ($kind:expr) => {
                        ResponseFuture::admitted(
                            $kind,
                            {
                                undo.disarm();
                                Guard::new(&self.shared, ticket)
                            },
                            self.classifier.clone(),
                            self.completion.clone(),
                        )
                    };
                }
                match upstream::probe(&mut self.inner) {
                    Readiness::Now => admitted!(Kind::Called {
                        fut: self.inner.call(req),
                    }),
                    Readiness::Later(svc) => admitted!(Kind::Ready {
                        svc,
                        req: Some(req),
                    }),
                    Readiness::Failed(err) => admitted!(Kind::Failed { err: Some(err) }),
                }
            }
            Err(retry_after) => ResponseFuture::rejected(
                reject(&self.shared, retry_after),
                self.classifier.clone(),
                self.completion.clone(),
            ),
        }
    }
}

/// Counts a rejection and builds its error.
#[cold]
#[inline(never)]
fn reject(shared: &Shared, retry_after: Option<std::time::Duration>) -> BoxError {
    // A rejected call takes no reference, so it sweeps spares of dropped breakers here.
    crate::spare::tidy::<Shared>();
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
