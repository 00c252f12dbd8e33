use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::ResponseFuture;
use super::future::WaiterCell;
use super::keyed::Keys;
use super::layer::{Core, Decision};
use crate::error::BoxError;

/// A service whose calls go through one shared GCRA limiter, made by
/// [`RateLimitLayer`](super::RateLimitLayer).
///
/// `poll_ready` is always ready and reserves nothing; an admitted call calls the inner
/// service in `call` when it is ready, else drives its readiness in the response future
/// (see the [module docs](super#admission-poll_ready-and-clone)).
#[derive(Debug)]
pub struct RateLimit<S> {
    inner: S,
    core: Arc<Core>,
}

impl<S: Clone> Clone for RateLimit<S> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            core: self.core.clone(),
        }
    }
}

impl<S> RateLimit<S> {
    pub(super) fn new(inner: S, core: Arc<Core>) -> Self {
        RateLimit { inner, core }
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

impl<S, Req> Service<Req> for RateLimit<S>
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
        let core = &self.core;
        let t = core.now_ns();
        let r = core.direct.reserve(&core.gcra, t);
        if core.metrics.available.is_some() {
            core.publish_available(t);
        }
        let decision = Decision::from_reserve(r, || WaiterCell::Direct);
        core.respond(decision, t, &mut self.inner, req)
    }
}

/// A service whose calls go through one GCRA limiter per key, made by
/// [`KeyedRateLimitLayer`](super::KeyedRateLimitLayer).
///
/// `poll_ready` is always ready and reserves nothing; an admitted call calls the inner
/// service in `call` when it is ready, else drives its readiness in the response future
/// (see the [module docs](super#admission-poll_ready-and-clone)).
///
/// # Panics
///
/// `call` panics when the key extractor panics: it runs first, so the panic unwinds out of
/// `call` with the limiter unchanged (no key added, no slot taken, no lock held).
pub struct KeyedRateLimit<S, K, F, H = RandomState> {
    inner: S,
    core: Arc<Core>,
    keys: Arc<Keys<K, H>>,
    extractor: F,
}

impl<S: Clone, K, F: Clone, H> Clone for KeyedRateLimit<S, K, F, H> {
    fn clone(&self) -> Self {
        KeyedRateLimit {
            inner: self.inner.clone(),
            core: self.core.clone(),
            keys: self.keys.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<S: fmt::Debug, K, F, H> fmt::Debug for KeyedRateLimit<S, K, F, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimit")
            .field("inner", &self.inner)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl<S, K, F, H> KeyedRateLimit<S, K, F, H> {
    pub(super) fn new(inner: S, core: Arc<Core>, keys: Arc<Keys<K, H>>, extractor: F) -> Self {
        KeyedRateLimit {
            inner,
            core,
            keys,
            extractor,
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

impl<S, K, F, H, Req> Service<Req> for KeyedRateLimit<S, K, F, H>
where
    H: BuildHasher + Clone + Send + Sync + 'static,
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    F: Fn(&Req) -> K,
    K: Hash + Eq + Send + Sync + 'static,
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
        let key = (self.extractor)(&req);
        let t = self.core.now_ns();
        let decision = self.keys.decide(&self.core, key, t);
        self.core.respond(decision, t, &mut self.inner, req)
    }
}
