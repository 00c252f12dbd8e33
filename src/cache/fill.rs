//! The shared computation of a key: one upstream call, timed, then recorded in the store.

use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::Service;

use super::layer::Typed;
use super::store::{Failure, Fetched, Store, TtlPolicy, later};
use crate::classify::Classify;
use crate::clock::Instant;
use crate::error::{BoxError, BreakwaterError, ErrorKind, LayerKind};
use crate::upstream::{OnCall, Upstream};

/// Ends a computation dropped before its result was recorded: its poll panicked (the
/// coalescing core catches the panic and drops the future: the failure is recorded like any
/// other, as a [`Panicked`](ErrorKind::Panicked) error), or it was dropped unfinished (every
/// caller left, its runtime shut down, or it was never polled because it joined a call
/// already in flight: an early refresh's flag is cleared).
struct Ending<K, R, C, T> {
    typed: Arc<Typed<K, R, C, T>>,
    /// Taken when the result is recorded.
    key: Option<K>,
    /// An early refresh or a retry: it owns its entry's refresh flag.
    refresh: bool,
    /// Set while the computation is polled: still set when it is dropped, the poll panicked.
    polling: bool,
    /// [`ended`] for these types (a function pointer, so that `Drop` needs no bounds).
    end: End<K, R, C, T>,
}

type End<K, R, C, T> = fn(&Store<K, R, C, T>, K, bool, bool);

/// A computation of `key` ended without a result: `panicked`, or dropped (a `refresh` then
/// clears its flag).
fn ended<K, R, C, T>(store: &Store<K, R, C, T>, key: K, panicked: bool, refresh: bool)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    R: Clone + Send + Sync + 'static,
    C: Classify<R>,
    T: TtlPolicy<R>,
{
    if panicked {
        let name = store.instruments.name.clone();
        let e = BreakwaterError::new(ErrorKind::Panicked, LayerKind::Cache, name);
        store.failed(
            key,
            &Err(Arc::new(e.into())),
            Instant::now(),
            Failure::Panicked,
        );
    } else if refresh {
        store.end_refresh(&key);
    }
}

impl<K, R, C, T> Drop for Ending<K, R, C, T> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            (self.end)(&self.typed.store, key, self.polling, self.refresh);
        }
    }
}

/// The instant the inner service was called: XFetch's delta runs from there.
#[derive(Debug, Default)]
struct CalledAt(Option<Instant>);

impl OnCall for CalledAt {
    fn on_call(&mut self) {
        self.0 = Some(Instant::now());
    }
}

pin_project! {
    /// The future every caller of one fetch or refresh shares (boxed once, when its first
    /// caller polls it): the upstream call, then its result judged, recorded in the store,
    /// and handed out. Delta runs from the moment the inner service is called (its
    /// readiness reached) to its response. A refresh also has a deadline, its first poll
    /// plus the refresh timeout.
    pub(super) struct Fill<S, Req, K, R, C, T>
    where
        S: Service<Req>,
    {
        #[pin]
        up: Upstream<S, Req, CalledAt>,
        // The upstream call was counted in `fetches`.
        counted: bool,
        // A refresh's deadline, armed on its first poll (inside a tokio runtime).
        timer: Option<Pin<Box<Sleep>>>,
        polled: bool,
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
    /// refresh or a retry, which owns its entry's refresh flag and has a deadline.
    pub(super) fn new(
        svc: S,
        req: Req,
        key: K,
        typed: Arc<Typed<K, R, C, T>>,
        refresh: bool,
    ) -> Self {
        Fill {
            up: Upstream::with_on_call(svc, req, CalledAt::default()),
            counted: false,
            timer: None,
            polled: false,
            end: Ending {
                typed,
                key: Some(key),
                refresh,
                polling: false,
                end: ended::<K, R, C, T>,
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
        let mut this = self.project();
        let Ending {
            typed,
            key: slot,
            refresh,
            polling,
            ..
        } = &mut *this.end;
        *polling = true;
        let store = &typed.store;
        if !*this.polled {
            *this.polled = true;
            if *refresh && tokio::runtime::Handle::try_current().is_ok() {
                let at = later(Instant::now(), store.settings.refresh_timeout);
                *this.timer = Some(Box::pin(tokio::time::sleep_until(at)));
            }
        }
        let polled = this.up.as_mut().poll(cx);
        let called = this.up.on_call().0;
        if !*this.counted && called.is_some() {
            *this.counted = true;
            store.instruments.fetched();
        }
        let res = match polled {
            Poll::Ready(res) => res.map_err(Arc::new),
            Poll::Pending => match this.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => {
                    let after = store.settings.refresh_timeout;
                    let e = BreakwaterError::new(
                        ErrorKind::Timeout,
                        LayerKind::Cache,
                        store.instruments.name.clone(),
                    )
                    .with_elapsed(after);
                    let res = Err(Arc::new(e.into()));
                    let key = slot.take().expect("polled after completion");
                    *polling = false;
                    store.failed(key, &res, Instant::now(), Failure::TimedOut(after));
                    return Poll::Ready(Fetched {
                        res,
                        success: false,
                    });
                }
                _ => {
                    *polling = false;
                    return Poll::Pending;
                }
            },
        };
        // User code (the classifier, the TTL and staleness functions, the `Clone` of what
        // the store keeps) runs while the key is held: a panic there is recorded as the
        // fetch's failure, which clears the refresh flag.
        let verdict = store.judge(&res);
        let success = verdict.success();
        let key = slot.take().expect("polled after completion");
        *polling = false;
        let delta = called.map_or(Duration::ZERO, |at| Instant::now() - at);
        store.finish(key, verdict, delta);
        Poll::Ready(Fetched { res, success })
    }
}
