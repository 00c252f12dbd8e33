use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::ResponseFuture;
use super::layer::Slots;
use crate::error::BoxError;
use crate::upstream::Upstream;

/// A service that coalesces concurrent identical requests, made by
/// [`CoalesceLayer`](super::CoalesceLayer).
///
/// `K` is the key type, `R` the response type, `F` the key function (`Fn(&Req) ->
/// Option<K>`). `poll_ready` is always ready and reserves nothing; the shared call drives a
/// clone of the inner service, and a request without a key calls it in `call` when it is
/// ready (see the [module docs](crate::coalesce#admission-and-clone)).
///
/// # Panics
///
/// `call` panics when the key function panics (the panic unwinds out of `call`; nothing
/// joined, the request is dropped), and when cloning the inner service panics.
pub struct Coalesce<S, K, R, F> {
    inner: S,
    table: Arc<Slots<K, R>>,
    key: F,
}

impl<S: Clone, K, R, F: Clone> Clone for Coalesce<S, K, R, F> {
    fn clone(&self) -> Self {
        Coalesce {
            inner: self.inner.clone(),
            table: self.table.clone(),
            key: self.key.clone(),
        }
    }
}

impl<S: fmt::Debug, K, R, F> fmt::Debug for Coalesce<S, K, R, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalesce")
            .field("inner", &self.inner)
            .field("name", &self.table.hooks().name)
            .finish_non_exhaustive()
    }
}

impl<S, K, R, F> Coalesce<S, K, R, F> {
    pub(super) fn new(inner: S, table: Arc<Slots<K, R>>, key: F) -> Self {
        Coalesce { inner, table, key }
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

impl<S, K, R, F, Req> Service<Req> for Coalesce<S, K, R, F>
where
    S: Service<Req, Response = R> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    R: Clone + Send + Sync + 'static,
    Req: Send + 'static,
    K: Hash + Eq + Send + 'static,
    F: Fn(&Req) -> Option<K>,
{
    type Response = R;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, K>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match (self.key)(&req) {
            // A follower drops its upstream unused: a clone, never a started call.
            Some(key) => {
                let upstream = Upstream::new(self.inner.clone(), req);
                ResponseFuture::shared(self.table.join(key, upstream))
            }
            // Not coalesced: no table, no metric, no allocation.
            None => ResponseFuture::pass(Upstream::start(&mut self.inner, req)),
        }
    }
}
