//! The recommended stack around the client of one named dependency, in one builder call.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_breakwater::preset::Dependency;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_breakwater::BoxError> {
//! let fraud_api = Dependency::builder("fraud-api")
//!     .call_timeout(Duration::from_millis(250))
//!     .concurrency(8, Duration::from_millis(20))
//!     .rate_limit(150, Duration::from_secs(1), 20, Duration::from_millis(50))
//!     .circuit_breaker(|b| b.wait_in_open(Duration::from_secs(5)))
//!     .build()?;
//! let client = service_fn(|tx: u64| async move { Ok::<_, std::io::Error>(tx % 7 != 0) });
//! let svc = fraud_api.layer(client);
//! assert!(svc.oneshot(1).await?);
//! # Ok(())
//! # }
//! ```
//!
//! # The stack and its order
//!
//! From the caller inwards:
//!
//! 1. **coalescing**, only when asked for ([`coalesce`](DependencyBuilder::coalesce)):
//!    outermost, so callers that share another's call take no permit and no rate token;
//! 2. **an overall deadline** (a [`TimeoutLayer`] named `"<name>:deadline"`), so that limiter
//!    wait + bulkhead wait + call time is bounded; by default the sum of the three maxima;
//! 3. **a rate limiter**, only when asked for ([`rate_limit`](DependencyBuilder::rate_limit));
//! 4. **a bulkhead** ([`concurrency`](DependencyBuilder::concurrency); 64 calls in flight, no
//!    wait, by default), outside the per-call timeout so a permit is held at most that long,
//!    and outside the breaker so its rejections never count against the dependency;
//! 5. **a circuit breaker** ([`circuit_breaker`](DependencyBuilder::circuit_breaker); the
//!    breaker's own defaults unless changed);
//! 6. **a per-call timeout** ([`call_timeout`](DependencyBuilder::call_timeout), 1 s by
//!    default), inside the breaker so slow calls count as failures.
//!
//! Every layer is named after the dependency, so its metric series, errors, events and
//! snapshots carry the dependency's name; the overall deadline's name is suffixed with
//! `:deadline` so its series do not add up with the per-call timeout's. The classifier
//! ([`classifier`](DependencyBuilder::classifier), e.g. the HTTP one) is used by the breaker
//! and the per-call timeout. Metrics profile, registry and listeners given to the preset apply
//! to every layer.
//!
//! The builder's type changes as layers are added ([`Off`] marks an absent optional layer), so
//! the stack is a plain nesting of our services with no `Either` and no `Clone` bound on the
//! response; coalescing, when on, needs `Response: Clone` as it always does. Cache support
//! joins this preset when the cache layer lands.

use std::sync::Arc;
use std::time::Duration;

use tower::Layer;
use tower::layer::util::{Identity, Stack};

use crate::bulkhead::{BulkheadBuilder, BulkheadHandle, BulkheadLayer};
use crate::circuit_breaker::{CircuitBreakerBuilder, CircuitBreakerHandle, CircuitBreakerLayer};
use crate::classify::DefaultClassifier;
use crate::coalesce::{CoalesceBuilder, CoalesceLayer};
use crate::config::ConfigError;
use crate::event::{Event, Listener};
use crate::metrics::MetricsProfile;
use crate::rate_limit::{RateLimitBuilder, RateLimitLayer};
use crate::registry::Registry;
use crate::timeout::{FixedTimeout, TimeoutBuilder, TimeoutLayer};

/// The default per-call timeout of a preset.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// The default maximum of calls in flight of a preset's bulkhead.
pub const DEFAULT_CONCURRENCY: usize = 64;

/// Marks an optional layer that is not in the stack.
#[derive(Debug, Clone, Copy, Default)]
pub struct Off;

/// A layer configured but not yet built: built, and validated, by
/// [`DependencyBuilder::build`].
///
/// Sealed: implemented for [`Off`] and the builders the preset can hold.
pub trait Pending: sealed::Sealed {
    /// The layer it becomes.
    type Layer;

    /// Builds the layer with the preset's name and common settings.
    ///
    /// # Errors
    ///
    /// The layer's [`ConfigError`].
    #[doc(hidden)]
    fn build_layer(self, common: &CommonSettings) -> Result<Self::Layer, ConfigError>;
}

mod sealed {
    pub trait Sealed {}
}

/// The settings a preset gives every layer. Not constructible outside the crate.
#[derive(Clone)]
pub struct CommonSettings {
    name: Arc<str>,
    profile: Option<MetricsProfile>,
    registry: Option<Registry>,
    listeners: Vec<Listener>,
    record_durations: bool,
}

impl std::fmt::Debug for CommonSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommonSettings")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Applies the preset's common settings to one layer builder.
macro_rules! common {
    ($c:expr, $builder:expr, $name:expr) => {{
        let c: &CommonSettings = $c;
        let mut b = $builder.name($name).record_durations(c.record_durations);
        if let Some(p) = c.profile {
            b = b.metrics_profile(p);
        }
        if let Some(r) = &c.registry {
            b = b.registry(r);
        }
        for l in &c.listeners {
            let l = l.clone();
            b = b.on_event(move |e| l(e));
        }
        b
    }};
}

impl sealed::Sealed for Off {}

impl Pending for Off {
    type Layer = Identity;

    fn build_layer(self, _: &CommonSettings) -> Result<Identity, ConfigError> {
        Ok(Identity::new())
    }
}

impl sealed::Sealed for RateLimitBuilder {}

impl Pending for RateLimitBuilder {
    type Layer = RateLimitLayer;

    fn build_layer(self, c: &CommonSettings) -> Result<RateLimitLayer, ConfigError> {
        common!(c, self, c.name.clone()).build()
    }
}

impl<Req, K, F> sealed::Sealed for CoalesceBuilder<Req, K, F> {}

impl<Req, K, F> Pending for CoalesceBuilder<Req, K, F>
where
    F: Fn(&Req) -> K + Clone,
    K: std::hash::Hash + Eq + Send + 'static,
{
    type Layer = CoalesceLayer<Req, K, F>;

    fn build_layer(self, c: &CommonSettings) -> Result<Self::Layer, ConfigError> {
        common!(c, self, c.name.clone()).build()
    }
}

/// The entry point: [`Dependency::builder`].
#[derive(Debug, Clone, Copy)]
pub struct Dependency;

impl Dependency {
    /// A preset for the dependency `name` with the defaults described in the
    /// [module docs](crate::preset).
    pub fn builder(name: impl Into<Arc<str>>) -> DependencyBuilder {
        let name = name.into();
        DependencyBuilder {
            name,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            deadline: None,
            concurrency: (DEFAULT_CONCURRENCY, Duration::ZERO),
            limiter_wait: Duration::ZERO,
            timeout: TimeoutLayer::builder(),
            breaker: CircuitBreakerLayer::builder(),
            bulkhead: BulkheadLayer::builder(),
            classifier: DefaultClassifier,
            rate_limit: Off,
            coalesce: Off,
            profile: None,
            registry: None,
            listeners: Vec::new(),
            record_durations: false,
        }
    }
}

/// Builds a [`DependencyLayer`]; see the [module docs](crate::preset).
///
/// `C` is the classifier of the breaker and per-call timeout, `R` the pending rate limiter
/// ([`Off`] or a [`RateLimitBuilder`]), `K` the pending coalescing layer ([`Off`] or a
/// [`CoalesceBuilder`]).
#[must_use]
pub struct DependencyBuilder<C = DefaultClassifier, R = Off, K = Off> {
    name: Arc<str>,
    call_timeout: Duration,
    deadline: Option<Duration>,
    concurrency: (usize, Duration),
    limiter_wait: Duration,
    timeout: TimeoutBuilder,
    breaker: CircuitBreakerBuilder,
    bulkhead: BulkheadBuilder,
    classifier: C,
    rate_limit: R,
    coalesce: K,
    profile: Option<MetricsProfile>,
    registry: Option<Registry>,
    listeners: Vec<Listener>,
    record_durations: bool,
}

impl<C, R, K> std::fmt::Debug for DependencyBuilder<C, R, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DependencyBuilder")
            .field("name", &self.name)
            .field("call_timeout", &self.call_timeout)
            .field("deadline", &self.deadline)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl<C, R, K> DependencyBuilder<C, R, K> {
    /// The per-call timeout (default [`DEFAULT_CALL_TIMEOUT`]); must be > 0.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The overall deadline around limiter wait, bulkhead wait and call (default: the sum of
    /// the limiter's maximum wait, the bulkhead's maximum wait and the call timeout); must be
    /// > 0.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The bulkhead: at most `max` calls in flight, a call waiting at most `max_wait` for a
    /// permit (zero: rejected at once, load shedding). Default: [`DEFAULT_CONCURRENCY`], no
    /// wait.
    pub fn concurrency(mut self, max: usize, max_wait: Duration) -> Self {
        self.concurrency = (max, max_wait);
        self
    }

    /// Adds a rate limiter: `count` calls per `period` with a burst of `burst`, a call waiting
    /// at most `max_wait` for its slot (zero: rejected at once). See
    /// [`rate_limit`](crate::rate_limit).
    pub fn rate_limit(
        self,
        count: u64,
        period: Duration,
        burst: u64,
        max_wait: Duration,
    ) -> DependencyBuilder<C, RateLimitBuilder, K> {
        let limiter = RateLimitLayer::builder()
            .rate(count, period)
            .burst(burst)
            .max_wait(max_wait);
        DependencyBuilder {
            name: self.name,
            call_timeout: self.call_timeout,
            deadline: self.deadline,
            concurrency: self.concurrency,
            limiter_wait: max_wait,
            timeout: self.timeout,
            breaker: self.breaker,
            bulkhead: self.bulkhead,
            classifier: self.classifier,
            rate_limit: limiter,
            coalesce: self.coalesce,
            profile: self.profile,
            registry: self.registry,
            listeners: self.listeners,
            record_durations: self.record_durations,
        }
    }

    /// Adds coalescing, outermost, keyed by `key` (see [`coalesce`](crate::coalesce): the key
    /// must capture everything that affects the response).
    pub fn coalesce<Req, K2, F>(
        self,
        key: F,
    ) -> DependencyBuilder<C, R, CoalesceBuilder<Req, K2, F>>
    where
        F: Fn(&Req) -> K2 + Clone,
        K2: std::hash::Hash + Eq + Send + 'static,
    {
        DependencyBuilder {
            name: self.name,
            call_timeout: self.call_timeout,
            deadline: self.deadline,
            concurrency: self.concurrency,
            limiter_wait: self.limiter_wait,
            timeout: self.timeout,
            breaker: self.breaker,
            bulkhead: self.bulkhead,
            classifier: self.classifier,
            rate_limit: self.rate_limit,
            coalesce: CoalesceLayer::builder().key(key),
            profile: self.profile,
            registry: self.registry,
            listeners: self.listeners,
            record_durations: self.record_durations,
        }
    }

    /// The classifier of the breaker and the per-call timeout (default
    /// [`DefaultClassifier`]; for HTTP, [`HttpClassifier`](crate::http::HttpClassifier) with
    /// the `http` feature).
    pub fn classifier<C2>(self, classifier: C2) -> DependencyBuilder<C2, R, K> {
        DependencyBuilder {
            name: self.name,
            call_timeout: self.call_timeout,
            deadline: self.deadline,
            concurrency: self.concurrency,
            limiter_wait: self.limiter_wait,
            timeout: self.timeout,
            breaker: self.breaker,
            bulkhead: self.bulkhead,
            classifier,
            rate_limit: self.rate_limit,
            coalesce: self.coalesce,
            profile: self.profile,
            registry: self.registry,
            listeners: self.listeners,
            record_durations: self.record_durations,
        }
    }

    /// Changes the circuit breaker's settings (window, thresholds, waits, half-open probes).
    /// Its name, classifier and common settings are the preset's.
    pub fn circuit_breaker(
        mut self,
        configure: impl FnOnce(CircuitBreakerBuilder) -> CircuitBreakerBuilder,
    ) -> Self {
        self.breaker = configure(self.breaker);
        self
    }

    /// Changes other settings of the per-call timeout (e.g. `per_request` is not available
    /// here; use the layers directly for that).
    pub fn configure_timeout(
        mut self,
        configure: impl FnOnce(TimeoutBuilder) -> TimeoutBuilder,
    ) -> Self {
        self.timeout = configure(self.timeout);
        self
    }

    /// Changes other settings of the bulkhead (e.g. `max_waiting`).
    pub fn configure_bulkhead(
        mut self,
        configure: impl FnOnce(BulkheadBuilder) -> BulkheadBuilder,
    ) -> Self {
        self.bulkhead = configure(self.bulkhead);
        self
    }

    /// The metrics profile of every layer (default
    /// [`MetricsProfile::Breakwater`]).
    pub fn metrics_profile(mut self, profile: MetricsProfile) -> Self {
        self.profile = Some(profile);
        self
    }

    /// Adds every layer to `registry`.
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// Adds an event listener to every layer.
    pub fn on_event(mut self, listener: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// Turns every layer's duration histograms on or off (default off).
    pub fn record_durations(mut self, on: bool) -> Self {
        self.record_durations = on;
        self
    }
}

/// The layer stack a preset builds, outermost last (tower's `Stack` order).
pub type PresetStack<C, R, K> = Stack<
    TimeoutLayer<FixedTimeout, C>,
    Stack<
        CircuitBreakerLayer<C>,
        Stack<BulkheadLayer, Stack<R, Stack<TimeoutLayer, Stack<K, Identity>>>>,
    >,
>;

impl<C, R, K> DependencyBuilder<C, R, K>
where
    C: Clone,
    R: Pending,
    K: Pending,
{
    /// Validates every layer's configuration, registers their metric handles and returns the
    /// stack as one layer.
    ///
    /// # Errors
    ///
    /// The first layer's [`ConfigError`]: a zero call timeout or deadline, a zero bulkhead
    /// size, an invalid breaker or rate-limiter setting, an empty name.
    pub fn build(self) -> Result<DependencyLayer<C, R::Layer, K::Layer>, ConfigError> {
        let name = self.name.clone();
        let c = CommonSettings {
            name: name.clone(),
            profile: self.profile,
            registry: self.registry.clone(),
            listeners: self.listeners.clone(),
            record_durations: self.record_durations,
        };
        let coalesce = self.coalesce.build_layer(&c)?;
        let rate_limit = self.rate_limit.build_layer(&c)?;
        let deadline = self.deadline.unwrap_or_else(|| {
            self.call_timeout
                .saturating_add(self.concurrency.1)
                .saturating_add(self.limiter_wait)
        });
        let deadline_layer = common!(&c, TimeoutLayer::builder(), format!("{name}:deadline"))
            .timeout(deadline)
            .build()?;
        let bulkhead = common!(&c, self.bulkhead, name.clone())
            .max_concurrent_calls(self.concurrency.0)
            .max_wait(self.concurrency.1)
            .build()?;
        let breaker = common!(&c, self.breaker, name.clone())
            .classifier(self.classifier.clone())
            .build()?;
        let timeout = common!(&c, self.timeout, name.clone())
            .timeout(self.call_timeout)
            .classifier(self.classifier)
            .build()?;
        let (breaker_handle, bulkhead_handle) = (breaker.handle(), bulkhead.handle());
        let stack = tower::ServiceBuilder::new()
            .layer(coalesce)
            .layer(deadline_layer)
            .layer(rate_limit)
            .layer(bulkhead)
            .layer(breaker)
            .layer(timeout)
            .into_inner();
        Ok(DependencyLayer {
            stack,
            breaker: breaker_handle,
            bulkhead: bulkhead_handle,
        })
    }
}

/// The preset's stack as one layer, with handles on its stateful parts. Cheap to clone;
/// every service it makes shares one breaker, one bulkhead, one limiter.
#[derive(Clone)]
pub struct DependencyLayer<C, R, K> {
    stack: PresetStack<C, R, K>,
    breaker: CircuitBreakerHandle,
    bulkhead: BulkheadHandle,
}

impl<C, R, K> std::fmt::Debug for DependencyLayer<C, R, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DependencyLayer")
            .field("name", &self.breaker.name())
            .finish_non_exhaustive()
    }
}

impl<C, R, K> DependencyLayer<C, R, K> {
    /// The circuit breaker's handle (state, snapshot, force open, reset).
    pub fn breaker(&self) -> &CircuitBreakerHandle {
        &self.breaker
    }

    /// The bulkhead's handle (permits, snapshot).
    pub fn bulkhead(&self) -> &BulkheadHandle {
        &self.bulkhead
    }
}

impl<S, C, R, K> Layer<S> for DependencyLayer<C, R, K>
where
    PresetStack<C, R, K>: Layer<S>,
{
    type Service = <PresetStack<C, R, K> as Layer<S>>::Service;

    fn layer(&self, inner: S) -> Self::Service {
        self.stack.layer(inner)
    }
}
