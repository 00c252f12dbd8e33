use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use ::metrics::{Counter, Gauge};

use super::gcra::{Cell, Gcra, HORIZON};
use super::keyed::{Keys, Sweep};
use super::layer::{Core, KeyedRateLimitLayer, Metrics, RateLimitHandle, RateLimitLayer, Stats};
use crate::clock;
use crate::config::{Common, ConfigError, common_builder_methods};
use crate::error::LayerKind;
use crate::metrics::names;

/// The shortest emission interval `T` allowed in wait mode: 1 ms, tokio's timer resolution
/// (see the [module docs](crate::rate_limit#reject-mode-and-wait-mode)).
const MIN_WAIT_INTERVAL: u64 = 1_000_000;

/// Default [`sweep_interval`](RateLimitBuilder::sweep_interval) of a keyed limiter: 1 s.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Builder marker: a direct limiter (one GCRA state for every call). See
/// [`RateLimitBuilder::keyed`] for the keyed one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Direct;

/// Builder marker: a keyed limiter, one GCRA state per key `K` extracted from each request by
/// `F: Fn(&Req) -> K`. Made by [`RateLimitBuilder::keyed`].
pub struct Keyed<K, F, H = RandomState> {
    extractor: F,
    max_keys: Option<usize>,
    sweep_interval: Duration,
    hasher: H,
    _key: PhantomData<fn() -> K>,
}

impl<K, F, H> fmt::Debug for Keyed<K, F, H> {
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

    /// The sustained rate: `count` calls per `period` (count >= 1, period > 0 and under
    /// `u64::MAX` nanoseconds). The emission interval `T` is `period / count` rounded **up**
    /// to whole nanoseconds, so the enforced rate never exceeds the one asked for. `T` must
    /// be at most `u64::MAX` ns less 100 years (about 484 years; see the
    /// [module docs](crate::rate_limit#the-algorithm)), and at least 1 ms in wait mode.
    pub fn rate(mut self, count: u64, period: Duration) -> Self {
        self.rate = Some((count, period));
        self
    }

    /// The burst size: calls admitted back to back when the limiter is fully recovered
    /// (>= 1; default: the rate's `count`, as in "100 per second" allowing 100 at once). The
    /// burst tolerance is `tau = T * (burst - 1)`; `T + tau` must be at most `u64::MAX` ns
    /// less 100 years.
    pub fn burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst);
        self
    }

    /// The longest a caller may wait for its slot (default zero). Zero is *reject mode*: a
    /// call that does not conform at once is rejected with
    /// [`ErrorKind::RateLimited`](crate::error::ErrorKind::RateLimited). Above zero is *wait mode*: a call whose wait would
    /// exceed `max_wait` is rejected at once; any other reserves its slot in `call` and its
    /// response future sleeps until its emission time, admitted at the first millisecond
    /// timer tick at or after it (so up to 1 ms after `max_wait`). `T + tau + max_wait` must
    /// be at most `u64::MAX` ns less 100 years. Wait mode needs an emission interval `T` of
    /// at least 1 ms (at most 1,000 calls per second): with a shorter one, the millisecond
    /// timer would release more than `burst` waiters at once (see the
    /// [module docs](crate::rate_limit#reject-mode-and-wait-mode)).
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
        // Every TAT of the first HORIZON (100 years) after build() must fit in u64 ns.
        let room = u64::MAX - HORIZON;
        if interval > room {
            return Err(v.error(
                "rate",
                (count, period),
                "an emission interval period / count of at most u64::MAX ns less 100 years \
                 (about 484 years)",
            ));
        }
        let burst = v.at_least_one("burst", self.burst.unwrap_or(count))?;
        let tau = interval
            .checked_mul(burst - 1)
            .filter(|tau| *tau <= room - interval)
            .ok_or_else(|| {
                v.error(
                    "burst",
                    burst,
                    "a burst whose tolerance (burst - 1) x T plus T is at most u64::MAX ns \
                     less 100 years (about 484 years)",
                )
            })?;
        let max_wait = u64::try_from(self.max_wait.as_nanos())
            .ok()
            .filter(|w| *w <= room - interval - tau)
            .ok_or_else(|| {
                v.error(
                    "max_wait",
                    self.max_wait,
                    "a duration such that max_wait + (burst - 1) x T + T is at most u64::MAX ns \
                     less 100 years (about 484 years)",
                )
            })?;
        if max_wait > 0 && interval < MIN_WAIT_INTERVAL {
            return Err(v.error(
                "max_wait",
                self.max_wait,
                "zero (reject mode) when the emission interval period / count is under 1 ms: \
                 timers tick in milliseconds, so waiters due within one millisecond would be \
                 released together, more than `burst` at once",
            ));
        }
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
            wait: reg
                .durations(LayerKind::RateLimiter, self.common.record_durations)
                .then(|| reg.histogram(&names::RATE_LIMITER_WAIT_DURATION, &[])),
            keys: if keyed {
                reg.gauge(&names::RATE_LIMITER_KEYS, &[])
            } else {
                Gauge::noop()
            },
            available: (!keyed && reg.enabled())
                .then(|| reg.gauge(&names::RATE_LIMITER_AVAILABLE, &[])),
            waiting: reg.gauge(&names::RATE_LIMITER_WAITING, &[]),
        };
        metrics.keys.set(0.0);
        metrics.waiting.set(0.0);
        if let Some(g) = &metrics.available {
            g.set(burst as f64);
        }
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
    ///
    /// # Panics
    ///
    /// Never here. A panic of `extractor` unwinds out of the service's `call`, before the
    /// limiter is touched (no key added, no slot taken).
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
                hasher: RandomState::new(),
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
    /// of zero or of `u64::MAX` ns or more, or an emission interval `T` over `u64::MAX` ns
    /// less 100 years; when `burst` is zero or `T + tau` exceeds that; when `T + tau +
    /// max_wait` exceeds that (`max_wait`); when `max_wait` is above zero and `T` under 1 ms
    /// (`max_wait`: wait mode needs `T >= 1 ms`); or when the name is empty.
    pub fn build(self) -> Result<RateLimitLayer, ConfigError> {
        let core = self.build_core(false)?;
        let weak = Arc::downgrade(&core);
        self.common
            .register_fn(move || Some(RateLimitHandle::new(weak.upgrade()?, None).snapshot()));
        Ok(RateLimitLayer { core })
    }
}

impl<K, F, H> RateLimitBuilder<Keyed<K, F, H>>
where
    K: Hash + Eq + Send + Sync + 'static,
    H: BuildHasher + Clone + Send + Sync + 'static,
{
    /// The most keys tracked at once (>= 1; default unbounded). A call with a new key while
    /// the limiter tracks this many is rejected with [`ErrorKind::TooManyKeys`](crate::error::ErrorKind::TooManyKeys); a tracked
    /// key is never evicted to make room (that would let one caller reset another's limit).
    /// Keys that recovered do not hold places: a new key that finds the map full sweeps
    /// them (at most once per `sweep_interval / 8`) and tries once more.
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

    /// Replaces the hasher of the key map (default: the standard library's randomly seeded
    /// SipHash, [`RandomState`], which resists hash flooding). A faster hasher saves a few
    /// nanoseconds per call where keys cannot be chosen by an adversary (for example ids of
    /// authenticated tenants).
    pub fn hasher<H2>(self, hasher: H2) -> RateLimitBuilder<Keyed<K, F, H2>>
    where
        H2: BuildHasher + Clone + Send + Sync + 'static,
    {
        let p = self.partition;
        RateLimitBuilder {
            common: self.common,
            rate: self.rate,
            burst: self.burst,
            max_wait: self.max_wait,
            partition: Keyed {
                extractor: p.extractor,
                max_keys: p.max_keys,
                sweep_interval: p.sweep_interval,
                hasher,
                _key: PhantomData,
            },
        }
    }

    /// Validates the configuration, registers the metric handles with the current recorder
    /// and returns the layer.
    ///
    /// # Errors
    ///
    /// As [`RateLimitBuilder::build`], and when `max_keys` is zero or `sweep_interval` is
    /// zero or over `u64::MAX` ns.
    pub fn build(self) -> Result<KeyedRateLimitLayer<K, F, H>, ConfigError> {
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
        let keys = Arc::new(Keys::new(max_keys, interval, self.partition.hasher));
        let (weak_core, weak_keys) = (Arc::downgrade(&core), Arc::downgrade(&keys));
        self.common.register_fn(move || {
            let keys: Arc<dyn Sweep> = weak_keys.upgrade()?;
            Some(RateLimitHandle::new(weak_core.upgrade()?, Some(keys)).snapshot())
        });
        Ok(KeyedRateLimitLayer {
            core,
            keys,
            extractor: self.partition.extractor,
        })
    }
}
