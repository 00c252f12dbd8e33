//! The shared computation of a key: one upstream call, timed, then recorded in the store.

use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::Service;

use super::layer::Typed;
use super::store::{Fetched, Store, TtlPolicy};
use crate::classify::Classify;
use crate::clock::Instant;
use crate::error::BoxError;
use crate::upstream::Upstream;

/// Clears the early-refresh flag of its key's entry when dropped before the result was
/// recorded: the upstream call panicked (the coalescing core catches the panic and drops
/// the future) or the computation was dropped unfinished (every caller left, or it was never
/// polled because it joined a call already in flight).
struct Ending<K, R, C, T> {
    typed: Arc<Typed<K, R, C, T>>,
    /// Taken when the result is recorded.
    key: Option<K>,
    /// `Store::end_refresh` for an early refresh; `None` for a fetch (no flag to clear).
    clear: Option<EndRefresh<K, R, C, T>>,
}

/// Clears the refresh flag of a key's entry.
type EndRefresh<K, R, C, T> = fn(&Store<K, R, C, T>, &K);

impl<K, R, C, T> Drop for Ending<K, R, C, T> {
    fn drop(&mut self) {
        if let (Some(key), Some(clear)) = (&self.key, self.clear) {
            clear(&self.typed.store, key);
        }
    }
}

pin_project! {
    /// The future every caller of one fetch or refresh shares (boxed once, by the coalescing
    /// core, when its first caller polls it): the upstream call, timed from its first poll
    /// (XFetch's delta), then judged, recorded in the store, and handed out.
    pub(super) struct Fill<S, Req, K, R, C, T>
    where
        S: Service<Req>,
    {
        #[pin]
        up: Upstream<S, Req>,
        start: Option<Instant>,
        end: Ending<K, R, C, T>,
    }
}

impl<S, Req, K, R, C, T> Fill<S, Req, K, R, C, T>
where
    S: Service<Req>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    R: Clone + Send + Sync + 'static,
    C: Classify<R>,
    T: TtlPolicy<R>,
{
    /// The computation of `key` with `svc` (ready or not) and `req`; `refresh`: an early
    /// refresh, whose flag it clears on every exit.
    pub(super) fn new(
        svc: S,
        req: Req,
        key: K,
        typed: Arc<Typed<K, R, C, T>>,
        refresh: bool,
    ) -> Self {
        Fill {
            up: Upstream::new(svc, req),
            start: None,
            end: Ending {
                typed,
                key: Some(key),
                clear: refresh.then_some(Store::end_refresh as EndRefresh<K, R, C, T>),
            },
        }
    }
}

impl<S, Req, K, R, C, T> Future for Fill<S, Req, K, R, C, T>
where
    S: Service<Req, Response = R>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    R: Clone + Send + Sync + 'static,
    C: Classify<R>,
    T: TtlPolicy<R>,
{
    type Output = Fetched<R>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Fetched<R>> {
        let this = self.project();
        let start = *this.start.get_or_insert_with(Instant::now);
        let res = ready!(this.up.poll(cx)).map_err(Arc::new);
        let store = &this.end.typed.store;
        // User code (classifier, TTL function) runs while the key is still held.
        let verdict = store.judge(&res);
        let key = this.end.key.take().expect("polled after completion");
        store.finish(key, &res, &verdict, start.elapsed());
        Poll::Ready(Fetched {
            res,
            success: verdict.success(),
        })
    }
}
