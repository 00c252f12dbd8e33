use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram};
use tower::{Layer, Service};

use super::future::{ResponseFuture, Waiter, WaiterCell};
use super::gcra::{Cell, Gcra, Reserve};
use super::keyed::{Keys, Sweep};
use super::{KeyedRateLimit, RateLimit};
use crate::clock::{self, Instant};
use crate::config::{Common, ConfigError, common_builder_methods};
use crate::error::{BreakwaterError, ErrorKind, LayerKind};
use crate::event::{EventKind, Events};
use crate::metrics::names;
use crate::snapshot::Snapshot;

/// Default [`sweep_interval`](RateLimitBuilder::sweep_interval) of a keyed limiter: 1 s.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Metric handles of one limiter, registered at build time.
#[derive(Debug)]
pub(super) struct Metrics {
    permitted: Counter,
    waited: Counter,
    rejected: Counter,
    too_many_keys: Counter,
    wait: Option<Histogram>,
    pub(super) keys: Gauge,
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
            Reserve::Wait { emission, tat } => Decision::Wait {
                emission,
                tat,
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
    base: Instant,
    /// The state of the direct (unkeyed) limiter.
    pub(super) direct: Cell,
    pub(super) metrics: Metrics,
    events: Events,
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

    /// Turns a decision for a call made at `t` into its response future.
    #[inline]
    pub(super) fn respond<S, Req>(
        self: &Arc<Self>,
        decision: Decision,
        t: u64,
        svc: &S,
        req: Req,
    ) -> ResponseFuture<S, Req>
    where
        S: Service<Req> + Clone,
    {
        match decision {
            Decision::Now => {
                self.metrics.permitted.increment(1);
                if let Some(h) = &self.metrics.wait {
                    h.record(0.0);
                }
                ResponseFuture::ready(svc.clone(), req)
            }
            Decision::Wait {
                emission,
                tat,
                cell,
            } => {
                let deadline = self
                    .base
                    .checked_add(Duration::from_nanos(emission))
                    .unwrap_or_else(far_future);
                let waiter = Waiter::new(self.clone(), cell, tat, t);
                ResponseFuture::waiting(
                    tokio::time::sleep_until(deadline),
                    svc.clone(),
                    req,
                    waiter,
                )
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

    /// Counts a waiter admitted at its emission time; `called_at` in ns since base.
    pub(super) fn record_waited(&self, called_at: u64) {
        self.metrics.waited.increment(1);
        self.stats.waited.fetch_add(1, Ordering::Relaxed);
        if let Some(h) = &self.metrics.wait {
            let waited = self.now_ns().saturating_sub(called_at);
            h.record(Duration::from_nanos(waited).as_secs_f64());
        }
    }
}

fn far_future() -> Instant {
    // As tokio does for "no deadline": about 30 years from now.
    clock::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// Builder marker: a direct limiter (one GCRA state for every call). See
/// [`RateLimitBuilder::keyed`] for the keyed one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Direct;

/// Builder marker: a keyed limiter, one GCRA state per key `K` extracted from each request by
/// `F: Fn(&Req) -> K`. Made by [`RateLimitBuilder::keyed`].
pub struct Keyed<K, F> {
    extractor: F,
    max_keys: Option<usize>,
    sweep_interval: Duration,
    _key: PhantomData<fn() -> K>,
}

impl<K, F> fmt::Debug for Keyed<K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyed")
            .field("max_keys", &self.max_keys)
            .field("sweep_interval", &self.sweep_interval)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RateLimitLayer`] (or, after [`keyed`](Self::keyed), a
/// [`KeyedRateLimitLayer`]); see the [module docs](crate::rate_limit).
///
/// Required: [`rate`](Self::rate). Defaults: burst = the rate's count, maximum wait zero
/// (reject mode).
#[derive(Debug)]
#[must_use]
pub struct RateLimitBuilder<P = Direct> {
    common: Common,
    rate: Option<(u64, Duration)>,
    burst: Option<u64>,
    max_wait: Duration,
    partition: P,
}

impl Default for RateLimitBuilder {
    fn default() -> Self {
        RateLimitBuilder {
            common: Common::default(),
            rate: None,
            burst: None,
            max_wait: Duration::ZERO,
            partition: Direct,
        }
    }
}

impl<P> RateLimitBuilder<P> {
    common_builder_methods!();

    /// The sustained rate: `count` calls per `period` (count >= 1, period > 0 and at most
    /// `u64::MAX` nanoseconds). The emission interval `T` is `period / count` rounded **up**
    /// to whole nanoseconds, so the enforced rate never exceeds the one asked for.
    pub fn rate(mut self, count: u64, period: Duration) -> Self {
        self.rate = Some((count, period));
        self
    }

    /// The burst size: calls admitted back to back when the limiter is fully recovered
    /// (>= 1; default: the rate's `count`, as in "100 per second" allowing 100 at once). The
    /// burst tolerance is `tau = T * (burst - 1)`.
    pub fn burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst);
        self
    }

    /// The longest a caller may wait for its slot (default zero). Zero is *reject mode*: a
    /// call that does not conform at once is rejected with
    /// [`ErrorKind::RateLimited`]. Above zero is *wait mode*: a call whose wait would
    /// exceed `max_wait` is rejected at once; any other reserves its slot in `call` and its
    /// response future sleeps until its emission time (at most `u64::MAX` ns).
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    fn build_core(&self, keyed: bool) -> Result<Arc<Core>, ConfigError> {
        let v = self.common.validator(LayerKind::RateLimiter)?;
        let (count, period) = v.required(
            "rate",
            self.rate,
            "a count >= 1 per period > 0 (e.g. `.rate(100, Duration::from_secs(1))`)",
        )?;
        let period_ns = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
        if count == 0 || period.is_zero() || period_ns == u64::MAX {
            return Err(v.error(
                "rate",
                (count, period),
                "a count >= 1 per period in 1 ns..u64::MAX ns",
            ));
        }
        let interval = period_ns.div_ceil(count);
        let burst = v.at_least_one("burst", self.burst.unwrap_or(count))?;
        let tau = interval.checked_mul(burst - 1).ok_or_else(|| {
            v.error(
                "burst",
                burst,
                "a burst whose tolerance (burst - 1) x period / rate fits in u64 nanoseconds",
            )
        })?;
        let max_wait = u64::try_from(self.max_wait.as_nanos()).map_err(|_| {
            v.error(
                "max_wait",
                self.max_wait,
                "a duration of at most u64::MAX nanoseconds",
            )
        })?;
        let reg = self.common.registrar();
        let calls = |o| reg.counter(&names::RATE_LIMITER_CALLS, &[("outcome", o)]);
        let metrics = Metrics {
            permitted: calls("permitted"),
            waited: calls("waited"),
            rejected: calls("rejected"),
            too_many_keys: if keyed {
                calls("too_many_keys")
            } else {
                Counter::noop()
            },
            wait: (self.common.record_durations && reg.enabled())
                .then(|| reg.histogram(&names::RATE_LIMITER_WAIT_DURATION, &[])),
            keys: if keyed {
                reg.gauge(&names::RATE_LIMITER_KEYS, &[])
            } else {
                Gauge::noop()
            },
        };
        metrics.keys.set(0.0);
        Ok(Arc::new(Core {
            name: v.name().clone(),
            gcra: Gcra {
                interval,
                tau,
                max_wait,
            },
            base: clock::now(),
            direct: Cell::default(),
            metrics,
            events: self.common.events(LayerKind::RateLimiter),
            stats: Stats::default(),
        }))
    }
}

impl RateLimitBuilder<Direct> {
    /// Makes the limiter keyed: `extractor(&req)` gives each request's key, and each key
    /// gets its own GCRA state with this builder's rate, burst and maximum wait. Called once
    /// per call, in `call`; it should be cheap (a key that allocates, such as a `String`
    /// built from the request, makes every call allocate).
    pub fn keyed<Req, K, F>(self, extractor: F) -> RateLimitBuilder<Keyed<K, F>>
    where
        F: Fn(&Req) -> K + Clone,
        K: Hash + Eq + Send + Sync + 'static,
    {
        RateLimitBuilder {
            common: self.common,
            rate: self.rate,
            burst: self.burst,
            max_wait: self.max_wait,
            partition: Keyed {
                extractor,
                max_keys: None,
                sweep_interval: DEFAULT_SWEEP_INTERVAL,
                _key: PhantomData,
            },
        }
    }

    /// Validates the configuration, registers the metric handles with the current recorder
    /// and returns the layer. The limiter starts fully recovered (a full burst available).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field when `rate` is unset, has a zero count or a period
    /// of zero or over `u64::MAX` ns; when `burst` is zero or its tolerance overflows `u64`
    /// nanoseconds; when `max_wait` exceeds `u64::MAX` ns; or when the name is empty.
    pub fn build(self) -> Result<RateLimitLayer, ConfigError> {
        Ok(RateLimitLayer {
            core: self.build_core(false)?,
        })
    }
}

impl<K, F> RateLimitBuilder<Keyed<K, F>>
where
    K: Hash + Eq + Send + Sync + 'static,
{
    /// The most keys tracked at once (>= 1; default unbounded). A call with a new key while
    /// the limiter tracks this many is rejected with [`ErrorKind::TooManyKeys`]; a tracked
    /// key is never evicted to make room (that would let one caller reset another's limit).
    /// Keys that recovered free their place at the next sweep.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.partition.max_keys = Some(max_keys);
        self
    }

    /// How often calls sweep recovered keys (> 0, default [`DEFAULT_SWEEP_INTERVAL`]): the
    /// first call at least this long after the previous sweep runs one. Sweeps also run when
    /// the number of keys doubles since the last one, and whenever the key count is read.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.partition.sweep_interval = interval;
        self
    }

    /// Validates the configuration, registers the metric handles with the current recorder
    /// and returns the layer.
    ///
    /// # Errors
    ///
    /// As [`RateLimitBuilder::build`], and when `max_keys` is zero or `sweep_interval` is
    /// zero or over `u64::MAX` ns.
    pub fn build(self) -> Result<KeyedRateLimitLayer<K, F>, ConfigError> {
        let core = self.build_core(true)?;
        let v = self.common.validator(LayerKind::RateLimiter)?;
        let max_keys = match self.partition.max_keys {
            Some(0) => return Err(v.error("max_keys", 0usize, "a count >= 1")),
            other => other,
        };
        let interval = v.positive_duration("sweep_interval", self.partition.sweep_interval)?;
        let interval = u64::try_from(interval.as_nanos()).map_err(|_| {
            v.error(
                "sweep_interval",
                interval,
                "a duration of at most u64::MAX nanoseconds",
            )
        })?;
        Ok(KeyedRateLimitLayer {
            core,
            keys: Arc::new(Keys::new(max_keys, interval)),
            extractor: self.partition.extractor,
        })
    }
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
pub struct KeyedRateLimitLayer<K, F> {
    pub(super) core: Arc<Core>,
    pub(super) keys: Arc<Keys<K>>,
    extractor: F,
}

impl<K, F: Clone> Clone for KeyedRateLimitLayer<K, F> {
    fn clone(&self) -> Self {
        KeyedRateLimitLayer {
            core: self.core.clone(),
            keys: self.keys.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<K, F> fmt::Debug for KeyedRateLimitLayer<K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimitLayer")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl<K, F> KeyedRateLimitLayer<K, F>
where
    K: Hash + Eq + Send + Sync + 'static,
{
    /// A handle to this limiter, for snapshots and the key count.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            core: self.core.clone(),
            keys: Some(self.keys.clone()),
        }
    }
}

impl<S, K, F: Clone> Layer<S> for KeyedRateLimitLayer<K, F> {
    type Service = KeyedRateLimit<S, K, F>;

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
    /// keyed only: `keys` (as [`tracked_keys`](Self::tracked_keys), which it runs).
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
                let (t, tat) = (core.now_ns(), core.direct.tat());
                snap = snap
                    .with_gauge("available", core.gcra.available_at(tat, t) as f64)
                    .with_gauge(
                        "wait_seconds",
                        Duration::from_nanos(core.gcra.wait_at(tat, t)).as_secs_f64(),
                    );
            }
        }
        snap
    }
}
