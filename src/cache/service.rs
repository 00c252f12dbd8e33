use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::Service;

use super::fill::Fill;
use super::layer::{FetchError, Typed};
use super::store::{
    Fallback, Fetched, HIT, Instruments, Lookup, MISS, NEGATIVE, RefreshMode, STALE, TtlPolicy,
};
use crate::classify::Classify;
use crate::clock::Instant;
use crate::coalesce::core::{BoxFuture, Join};
use crate::error::BoxError;
use crate::upstream::Upstream;

/// A caching service, made by [`CacheLayer`](super::CacheLayer).
///
/// `poll_ready` is always ready and reserves nothing; fetches and refreshes drive a clone of
/// the inner service (see the [module docs](crate::cache#admission-and-clone)).
///
/// # Panics
///
/// `call` panics when the key function, the random source, the response's `Clone` (for
/// this read's value), cloning the inner service or the key, or an event listener panics;
/// a refresh flag the read had set is cleared, so nothing is left behind.
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

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let Some(key) = (self.key)(&req) else {
            self.typed.store.instruments.passed();
            return ResponseFuture::pass(Upstream::start(&mut self.inner, req));
        };
        let typed = &self.typed;
        let ins = &typed.store.instruments;
        // The fill is boxed here (the core moves a boxed future as it is): one allocation
        // per fetch, and a response future whose size does not grow with the inner service's.
        // `counted`: the read was counted in `call` (an inline refresh's hit).
        let fetch =
            |key: K, fill: Fill<S, Req, K, R, C, T>, fallback, counted: bool| ResponseFuture {
                kind: Kind::Fetch {
                    join: typed.fetches.join(key, Box::pin(fill) as BoxFuture<_>),
                    fallback,
                    tally: Tally {
                        ins: ins.clone(),
                        pending: !counted,
                    },
                },
            };
        // A detached refresh needs a runtime to run on; without one (another executor, a
        // synchronous caller), nothing is spawned.
        let runtime = || tokio::runtime::Handle::try_current().is_ok();
        match typed.store.lookup(&key, Instant::now()) {
            Lookup::Hit(value, None) => {
                ins.lookup(HIT);
                ResponseFuture::ready(Ok(value))
            }
            Lookup::Hit(value, Some((until, flag))) => {
                ins.lookup(HIT);
                let mode = typed.store.settings.mode;
                if mode == RefreshMode::Background && !runtime() {
                    // No runtime: no early refresh; the flag this read set is cleared.
                    drop(flag);
                    return ResponseFuture::ready(Ok(value));
                }
                // User code (the inner service's and the key's `Clone`) runs while `flag`
                // guards the flag this read set; the refresh owns it once it exists.
                let fill = Fill::new(self.inner.clone(), req, key.clone(), typed.clone(), true);
                flag.hand_over();
                ins.early_refresh();
                match mode {
                    RefreshMode::Background => {
                        drop(typed.fetches.spawn_detached(key, fill, None));
                        ResponseFuture::ready(Ok(value))
                    }
                    RefreshMode::Inline => fetch(key, fill, Some((value, until)), true),
                }
            }
            Lookup::Stale(value) => {
                ins.lookup(STALE);
                ResponseFuture::ready(Ok(value))
            }
            Lookup::Retry((value, until), flag) => {
                let fill = Fill::new(self.inner.clone(), req, key.clone(), typed.clone(), true);
                flag.hand_over();
                if runtime() {
                    ins.lookup(STALE);
                    drop(typed.fetches.spawn_detached(key, fill, None));
                    ResponseFuture::ready(Ok(value))
                } else {
                    // No runtime to retry in the background: this read retries and waits.
                    fetch(key, fill, Some((value, until)), false)
                }
            }
            Lookup::Failed(res) => {
                ins.lookup(NEGATIVE);
                ResponseFuture::ready(res.map_err(|e| FetchError::new(e).into()))
            }
            Lookup::Fetch(fallback) => {
                let fill = Fill::new(self.inner.clone(), req, key.clone(), typed.clone(), false);
                fetch(key, fill, fallback, false)
            }
        }
    }
}

/// Counts the lookup of a read that waits for a fetch exactly once: as `stale` or `miss`
/// when it ends, as a `miss` when it is dropped before (unless it was counted in `call`: an
/// inline refresh's hit).
struct Tally {
    ins: Arc<Instruments>,
    pending: bool,
}

impl Tally {
    fn count(&mut self, result: usize) {
        if std::mem::take(&mut self.pending) {
            self.ins.lookup(result);
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.count(MISS);
    }
}

type FetchJoin<K, R> = Join<K, BoxFuture<Fetched<R>>, Fetched<R>, Fetched<R>, Arc<Instruments>>;

pin_project! {
    #[project = KindProj]
    enum Kind<S, Req, K, R>
    where
        S: Service<Req>,
        R: Send,
        R: 'static,
    {
        Ready { res: Option<Result<R, BoxError>> },
        Fetch {
            join: FetchJoin<K, R>,
            // The stored value to serve if the fetch fails, and until when.
            fallback: Option<Fallback<R>>,
            tally: Tally,
        },
        Pass { #[pin] fut: Upstream<S, Req> },
    }
}

pin_project! {
    /// The response future of [`Cache`]: a cached value or remembered failure (ready at
    /// once), a share of the fetch of its key (then, when the fetch fails, the stored value
    /// if it is still within the maximum staleness, else a [`FetchError`]), a share of an
    /// inline early refresh (then, when it fails, the value the read found), or an uncached
    /// call.
    ///
    /// # Panics
    ///
    /// When polled after it returned `Ready`.
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
    #[inline]
    fn ready(res: Result<R, BoxError>) -> Self {
        ResponseFuture {
            kind: Kind::Ready { res: Some(res) },
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
            KindProj::Ready { res } => Poll::Ready(res.take().expect("polled after completion")),
            KindProj::Pass { fut } => fut.poll(cx),
            KindProj::Fetch {
                join,
                fallback,
                tally,
            } => {
                let Fetched { res, success } = std::task::ready!(Pin::new(join).poll(cx));
                let fallback = match success {
                    true => None,
                    false => fallback.take().filter(|(_, until)| Instant::now() < *until),
                };
                let (result, out) = match fallback {
                    Some((v, _)) => (STALE, Ok(v)),
                    None => (MISS, res.map_err(|e| FetchError::new(e).into())),
                };
                tally.count(result);
                Poll::Ready(out)
            }
        }
    }
}
