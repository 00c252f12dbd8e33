use crate::upstream::Upstream;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::Service;

use super::layer::{FetchError, Shared, Typed};
use super::store::{HIT, Instruments, Lookup, MISS, STALE, TtlPolicy};
use crate::classify::Classify;
use crate::clock::Instant;
use crate::coalesce::core::{BoxFuture, Join};
use crate::error::BoxError;

/// A caching service, made by [`CacheLayer`](super::CacheLayer).
///
/// `poll_ready` is always ready and reserves nothing; fetches and refreshes drive a clone of
/// the inner service (see the [module docs](crate::cache#admission-and-clone)).
///
/// # Panics
///
/// `call` panics when the key function panics, and when cloning the inner service panics.
pub struct Cache<S, K, R, F, T, C> {
    inner: S,
    typed: Arc<Typed<K, R, C, T>>,
    key: F,
}

impl<S: Clone, K, R, F: Clone, T, C> Clone for Cache<S, K, R, F, T, C> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
            typed: self.typed.clone(),
            key: self.key.clone(),
        }
    }
}

impl<S: fmt::Debug, K, R, F, T, C> fmt::Debug for Cache<S, K, R, F, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .field("name", &self.typed.store.instruments.name)
            .finish_non_exhaustive()
    }
}

impl<S, K, R, F, T, C> Cache<S, K, R, F, T, C> {
    pub(super) fn new(inner: S, typed: Arc<Typed<K, R, C, T>>, key: F) -> Self {
        Cache { inner, typed, key }
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

/// The shared computation of a key: the upstream call, timed, then stored.
async fn fill<S, Req, K, R, C, T>(
    svc: S,
    req: Req,
    key: K,
    typed: Arc<Typed<K, R, C, T>>,
) -> Result<R, BoxError>
where
    S: Service<Req, Response = R> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    R: Clone + Send + Sync + 'static,
    C: Classify<R>,
    T: TtlPolicy<R>,
{
    let start = Instant::now();
    let res = Upstream::new(svc, req).await;
    typed.store.finish(key, &res, start.elapsed());
    res
}

impl<S, K, R, F, T, C, Req> Service<Req> for Cache<S, K, R, F, T, C>
where
    S: Service<Req, Response = R> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    R: Clone + Send + Sync + 'static,
    Req: Send + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    F: Fn(&Req) -> Option<K>,
    C: Classify<R>,
    T: TtlPolicy<R>,
{
    type Response = R;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, K, R>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(key) = (self.key)(&req) else {
            return ResponseFuture::pass(Upstream::new(self.inner.clone(), req));
        };
        let typed = &self.typed;
        let ins = &typed.store.instruments;
        match typed.store.lookup(&key, Instant::now()) {
            Lookup::Hit(value, early) => {
                ins.lookup(HIT);
                if early {
                    ins.early_refresh();
                    let fut = fill(self.inner.clone(), req, key.clone(), typed.clone());
                    drop(typed.fetches.spawn_detached(key, fut, None));
                }
                ResponseFuture::ready(value)
            }
            Lookup::Stale(value) => {
                ins.lookup(STALE);
                ResponseFuture::ready(value)
            }
            Lookup::Fetch => {
                let fut = fill(self.inner.clone(), req, key.clone(), typed.clone());
                let join = typed
                    .fetches
                    .join(key.clone(), Box::pin(fut) as BoxFuture<_>);
                let typed = typed.clone();
                let stale: StaleFn<K, R> =
                    Box::new(move |key: &K| typed.store.stale(key, Instant::now()));
                ResponseFuture {
                    kind: Kind::Fetch {
                        join,
                        key: Some(key),
                        stale: Some(stale),
                        ins: ins.clone(),
                    },
                }
            }
        }
    }
}

type StaleFn<K, R> = Box<dyn FnOnce(&K) -> Option<R> + Send>;

type FetchJoin<K, R> =
    Join<K, BoxFuture<Result<R, BoxError>>, Result<R, BoxError>, Shared<R>, Arc<Instruments>>;

pin_project! {
    #[project = KindProj]
    enum Kind<S, Req, K, R>
    where
        S: Service<Req>,
        R: Send,
        R: 'static,
    {
        Ready { value: Option<R> },
        Fetch {
            join: FetchJoin<K, R>,
            key: Option<K>,
            stale: Option<StaleFn<K, R>>,
            ins: Arc<Instruments>,
        },
        Pass { #[pin] fut: Upstream<S, Req> },
    }
}

pin_project! {
    /// The response future of [`Cache`]: a cached value (ready at once), a share of the
    /// fetch of its key (then, when the fetch fails, the stale value if one is still within
    /// the maximum staleness, else a [`FetchError`]), or an uncached call.
    ///
    /// # Panics
    ///
    /// When polled after it returned `Ready`; with the panic of the shared fetch when this
    /// caller was polling it.
    pub struct ResponseFuture<S, Req, K, R>
    where
        S: Service<Req>,
        R: Send,
        R: 'static,
    {
        #[pin]
        kind: Kind<S, Req, K, R>,
    }
}

impl<S: Service<Req>, Req, K, R: Send + 'static> fmt::Debug for ResponseFuture<S, Req, K, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S: Service<Req>, Req, K, R: Send + 'static> ResponseFuture<S, Req, K, R> {
    fn ready(value: R) -> Self {
        ResponseFuture {
            kind: Kind::Ready { value: Some(value) },
        }
    }

    fn pass(fut: Upstream<S, Req>) -> Self {
        ResponseFuture {
            kind: Kind::Pass { fut },
        }
    }
}

impl<S, Req, K, R> Future for ResponseFuture<S, Req, K, R>
where
    S: Service<Req, Response = R>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Send + 'static,
    R: Clone + Send + Sync + 'static,
{
    type Output = Result<R, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Ready { value } => {
                Poll::Ready(Ok(value.take().expect("polled after completion")))
            }
            KindProj::Pass { fut } => fut.poll(cx),
            KindProj::Fetch {
                join,
                key,
                stale,
                ins,
            } => {
                let res = std::task::ready!(Pin::new(join).poll(cx));
                Poll::Ready(match res {
                    Ok(v) => {
                        ins.lookup(MISS);
                        Ok(v)
                    }
                    Err(e) => {
                        let key = key.take().expect("polled after completion");
                        let stale = stale.take().expect("polled after completion");
                        match stale(&key) {
                            Some(v) => {
                                ins.lookup(STALE);
                                Ok(v)
                            }
                            None => {
                                ins.lookup(MISS);
                                Err(FetchError::new(e).into())
                            }
                        }
                    }
                })
            }
        }
    }
}
