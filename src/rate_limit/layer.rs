use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram};
use tower::{Layer, Service};

use super::builder::RateLimitBuilder;
use super::future::{ResponseFuture, Waiter, WaiterCell};
use super::gcra::{Cell, Gcra, Reserve};
use super::keyed::{Keys, Sweep};
use super::{KeyedRateLimit, RateLimit};
use crate::clock::{self, Instant};
use crate::config::ConfigError;
use crate::error::{BreakwaterError, ErrorKind, LayerKind};
use crate::event::{EventKind, Events};
use crate::snapshot::Snapshot;
use crate::upstream::{self, Readiness};

/// Metric handles of one limiter, registered at build time.
#[derive(Debug)]
pub(super) struct Metrics {
    pub(super) permitted: Counter,
    pub(super) waited: Counter,
    pub(super) rejected: Counter,
    pub(super) too_many_keys: Counter,
    pub(super) wait: Option<Histogram>,
    pub(super) keys: Gauge,
    /// Direct limiters with metrics on only.
    pub(super) available: Option<Gauge>,
    pub(super) waiting: Gauge,
}

/// Counts of rare events, for snapshots (the per-call `permitted` count lives in metrics
/// only, so that the happy path writes no extra shared cache line).
#[derive(Debug, Default)]
pub(super) struct Stats {
    rejected: AtomicU64,
    too_many_keys: AtomicU64,
    waited: AtomicU64,
    pub(super) abandoned: AtomicU64,
    pub(super) given_back: AtomicU64,
    pub(super) waiting: AtomicU64,
}

/// What a limiter decided for one call.
pub(super) enum Decision {
    Now,
    Wait {
        emission: u64,
        tat: u64,
        prev: u64,
        cell: WaiterCell,
    },
    Reject {
        wait: u64,
    },
    TooManyKeys,
}

impl Decision {
    #[inline]
    pub(super) fn from_reserve(r: Reserve, cell: impl FnOnce() -> WaiterCell) -> Self {
        match r {
            Reserve::Now => Decision::Now,
            Reserve::Wait {
                emission,
                tat,
                prev,
            } => Decision::Wait {
                emission,
                tat,
                prev,
                cell: cell(),
            },
            Reserve::Reject { wait } => Decision::Reject { wait },
        }
    }
}

/// State shared by a layer, its services, their futures and its handle.
#[derive(Debug)]
pub(super) struct Core {
    pub(super) name: Arc<str>,
    pub(super) gcra: Gcra,
    /// Time zero of every TAT.
    pub(super) base: Instant,
    /// The state of the direct (unkeyed) limiter.
    pub(super) direct: Cell,
    pub(super) metrics: Metrics,
    pub(super) events: Events,
    pub(super) stats: Stats,
}

impl Core {
    /// Nanoseconds from the base instant to now (0 before it; saturating far after it).
    #[inline]
    pub(super) fn now_ns(&self) -> u64 {
        let d = clock::now().saturating_duration_since(self.base);
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
    }

    /// Sets the available-permits gauge of a direct limiter to its value at `t` (ns since
    /// base); nothing for a keyed limiter or with metrics off.
    #[inline]
    pub(super) fn publish_available(&self, t: u64) -> u64 {
        let available = self.gcra.available_at(self.direct.tat(), t);
        if let Some(g) = &self.metrics.available {
            g.set(available as f64);
        }
        available
    }

    /// Turns a decision for a call made at `t` into its response future.
    #[inline]
    pub(super) fn respond<S, Req>(
        self: &Arc<Self>,
        decision: Decision,
        t: u64,
        svc: &mut S,
        req: Req,
    ) -> ResponseFuture<S, Req>
    where
        S: Service<Req> + Clone,
        S::Error: Into<crate::error::BoxError>,
    {
        match decision {
            Decision::Now => {
                self.metrics.permitted.increment(1);
                if let Some(h) = &self.metrics.wait {
                    h.record(0.0);
                }
                // The inner future is built in the expression that places it (see
                // `upstream::probe`).
                match upstream::probe(svc) {
                    Readiness::Now => ResponseFuture::called(svc.call(req)),
                    Readiness::Later(svc) => ResponseFuture::not_ready(svc, req),
                    Readiness::Failed(err) => ResponseFuture::failed(err),
                }
            }
            Decision::Wait {
                emission,
                tat,
                prev,
                cell,
            } => {
                let deadline = self
                    .base
                    .checked_add(Duration::from_nanos(emission))
                    .unwrap_or_else(far_future);
                let waiter = Waiter::new(self.clone(), cell, (tat, prev), t);
                ResponseFuture::waiting(deadline, svc.clone(), req, waiter)
            }
            Decision::Reject { wait } => self.reject(
                ErrorKind::RateLimited,
                Some(Duration::from_nanos(wait)),
                &self.metrics.rejected,
                &self.stats.rejected,
            ),
            Decision::TooManyKeys => self.reject(
                ErrorKind::TooManyKeys,
                None,
                &self.metrics.too_many_keys,
                &self.stats.too_many_keys,
            ),
        }
    }

    #[cold]
    #[inline(never)]
    fn reject<S: Service<Req>, Req>(
        &self,
        kind: ErrorKind,
        retry_after: Option<Duration>,
        counter: &Counter,
        stat: &AtomicU64,
    ) -> ResponseFuture<S, Req> {
        counter.increment(1);
        stat.fetch_add(1, Ordering::Relaxed);
        self.events
            .emit(|| EventKind::Rejected { kind, retry_after });
        let mut err = BreakwaterError::new(kind, LayerKind::RateLimiter, self.name.clone());
        if let Some(after) = retry_after {
            err = err.with_retry_after(after);
        }
        ResponseFuture::rejected(err)
    }

    /// Counts a waiter admitted at its emission time, records its wait and emits
    /// [`EventKind::Waited`]; `called_at` in ns since base.
    pub(super) fn record_waited(&self, called_at: u64) {
        self.metrics.waited.increment(1);
        self.stats.waited.fetch_add(1, Ordering::Relaxed);
        if self.metrics.wait.is_none() && !self.events.is_active() {
            return;
        }
        let waited = Duration::from_nanos(self.now_ns().saturating_sub(called_at));
        if let Some(h) = &self.metrics.wait {
            h.record(waited.as_secs_f64());
        }
        self.events.emit(|| EventKind::Waited { waited });
    }
}

fn far_future() -> Instant {
    // As tokio does for "no deadline": about 30 years from now.
    clock::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// Limits the rate of calls through a service with one shared GCRA state; see the
/// [module docs](crate::rate_limit).
///
/// Cheap to clone (one `Arc`); every clone, every service it makes and every clone of those
/// share one limiter.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    pub(super) core: Arc<Core>,
}

impl RateLimitLayer {
    /// A builder with defaults: name `"default"`, no rate (required), burst = the rate's
    /// count, reject mode, the default metrics profile, no wait histogram, no listener.
    pub fn builder() -> RateLimitBuilder {
        RateLimitBuilder::default()
    }

    /// Shorthand for `RateLimitLayer::builder().rate(count, period).build()`: `count` calls
    /// per `period`, burst `count`, reject mode.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] as from [`RateLimitBuilder::build`].
    pub fn new(count: u64, period: Duration) -> Result<Self, ConfigError> {
        Self::builder().rate(count, period).build()
    }

    /// A handle to this limiter, for snapshots.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            core: self.core.clone(),
            keys: None,
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.core.clone())
    }
}

/// Limits the rate of calls per key; see the [module docs](crate::rate_limit#keyed-limiter).
///
/// Cheap to clone (two `Arc`s and the extractor); every clone, every service it makes and
/// every clone of those share one set of keys.
pub struct KeyedRateLimitLayer<K, F, H = RandomState> {
    pub(super) core: Arc<Core>,
    pub(super) keys: Arc<Keys<K, H>>,
    pub(super) extractor: F,
}

impl<K, F: Clone, H> Clone for KeyedRateLimitLayer<K, F, H> {
    fn clone(&self) -> Self {
        KeyedRateLimitLayer {
            core: self.core.clone(),
            keys: self.keys.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<K, F, H> fmt::Debug for KeyedRateLimitLayer<K, F, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimitLayer")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl<K, F, H> KeyedRateLimitLayer<K, F, H>
where
    K: Hash + Eq + Send + Sync + 'static,
    H: BuildHasher + Clone + Send + Sync + 'static,
{
    /// A handle to this limiter, for snapshots and the key count.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            core: self.core.clone(),
            keys: Some(self.keys.clone()),
        }
    }
}

impl<S, K, F: Clone, H> Layer<S> for KeyedRateLimitLayer<K, F, H> {
    type Service = KeyedRateLimit<S, K, F, H>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedRateLimit::new(
            inner,
            self.core.clone(),
            self.keys.clone(),
            self.extractor.clone(),
        )
    }
}

/// A handle to one limiter (direct or keyed), for snapshots. Cheap to clone.
#[derive(Clone)]
pub struct RateLimitHandle {
    core: Arc<Core>,
    keys: Option<Arc<dyn Sweep>>,
}

impl RateLimitHandle {
    pub(super) fn new(core: Arc<Core>, keys: Option<Arc<dyn Sweep>>) -> Self {
        RateLimitHandle { core, keys }
    }
}

impl fmt::Debug for RateLimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("name", &self.core.name)
            .field("keyed", &self.keys.is_some())
            .finish()
    }
}

impl RateLimitHandle {
    /// The instance name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The emission interval `T`: the rate's period / count, rounded up to whole nanoseconds.
    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos(self.core.gcra.interval)
    }

    /// The burst size.
    pub fn burst(&self) -> u64 {
        self.core.gcra.tau / self.core.gcra.interval + 1
    }

    /// For a keyed limiter, the number of keys tracked now, after sweeping the keys that have
    /// fully recovered (reading the count sweeps, and updates the keys gauge). `0` for a
    /// direct limiter.
    pub fn tracked_keys(&self) -> usize {
        match &self.keys {
            Some(keys) => keys.sweep(&self.core, self.core.now_ns()),
            None => 0,
        }
    }

    /// A snapshot: kind `rate_limiter`, no state.
    ///
    /// Counters (since the layer was built): `rejected` (rate limited), `waited` (admitted
    /// after a wait), `abandoned` (waiters dropped before their slot), `given_back` (of
    /// those, the ones that gave their slot back); keyed only: `too_many_keys`. Calls
    /// admitted at once are counted in the metrics only.
    ///
    /// Gauges: `waiting` (callers waiting for their slot now); direct only: `available`
    /// (calls that would be admitted at once now, back to back, in `0..=burst`) and
    /// `wait_seconds` (time until the next call would be admitted, 0 when one would be now);
    /// keyed only: `keys` (as [`tracked_keys`](Self::tracked_keys), which it runs). A direct
    /// limiter's snapshot also sets the `breakwater_rate_limiter_available_permits` gauge to
    /// its `available` value, so a periodic snapshot (a `/debug/resilience` endpoint, the
    /// registry) keeps that gauge current while the limiter is idle.
    pub fn snapshot(&self) -> Snapshot {
        let core = &self.core;
        let s = &core.stats;
        let mut snap = Snapshot::new(LayerKind::RateLimiter, &core.name)
            .with_counter("rejected", s.rejected.load(Ordering::Relaxed))
            .with_counter("waited", s.waited.load(Ordering::Relaxed))
            .with_counter("abandoned", s.abandoned.load(Ordering::Relaxed))
            .with_counter("given_back", s.given_back.load(Ordering::Relaxed))
            .with_gauge("waiting", s.waiting.load(Ordering::Relaxed) as f64);
        match &self.keys {
            Some(_) => {
                let keys = self.tracked_keys();
                snap = snap
                    .with_counter("too_many_keys", s.too_many_keys.load(Ordering::Relaxed))
                    .with_gauge("keys", keys as f64);
            }
            None => {
                let t = core.now_ns();
                let available = core.publish_available(t);
                let wait = core.gcra.wait_at(core.direct.tat(), t);
                snap = snap
                    .with_gauge("available", available as f64)
                    .with_gauge("wait_seconds", Duration::from_nanos(wait).as_secs_f64());
            }
        }
        snap
    }
}
