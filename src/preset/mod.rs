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
//! 1. **a response cache**, only when asked for ([`cache`](DependencyBuilder::cache)):
//!    outermost, so a hit (or a stale value served) costs no permit, no rate token, no
//!    breaker call and no timer: it never reaches the layers below;
//! 2. **coalescing**, only when asked for ([`coalesce`](DependencyBuilder::coalesce)):
//!    outside everything that admits, so callers that share another's call take no permit
//!    and no rate token;
//! 3. **an overall deadline** (a [`TimeoutLayer`] named `"<name>:deadline"`), so that limiter
//!    wait + bulkhead wait + call time is bounded; by default the sum of the three maxima;
//! 4. **a rate limiter**, only when asked for ([`rate_limit`](DependencyBuilder::rate_limit));
//! 5. **a bulkhead** ([`concurrency`](DependencyBuilder::concurrency); 64 calls in flight, no
//!    wait, by default), outside the per-call timeout so a permit is held at most that long,
//!    and outside the breaker so its rejections never count against the dependency;
//! 6. **a circuit breaker** ([`circuit_breaker`](DependencyBuilder::circuit_breaker); the
//!    breaker's own defaults unless changed);
//! 7. **a per-call timeout** ([`call_timeout`](DependencyBuilder::call_timeout), 1 s by
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
//! response. Cache and coalescing are off by default because they need `Response: Clone`
//! (every caller of a shared call, and every hit, gets a clone).
//!
//! # The overall deadline and the breaker
//!
//! The deadline sits outside the breaker; a call cut off there would be, for the breaker, a
//! call dropped before it finished (a cancellation, counted neither as a success nor as a
//! failure). The per-call timeout prevents that: it is armed inside the deadline's poll and
//! takes the earlier of its own deadline and the overall one (deadline propagation, see
//! [`timeout`](crate::timeout#semantics)). Hence:
//!
//! - **The default deadline** is the sum of the limiter's maximum wait, the bulkhead's
//!   maximum wait and the call timeout: it never binds before the call timeout does.
//! - **A deadline shorter than the call timeout is a [`ConfigError`]** (field `deadline`).
//! - **A deadline between the call timeout and the sum** bounds what the caller waits more
//!   tightly: a call that waited `w` for its rate-limit slot or its permit has
//!   `deadline - w` left to run, and its call timeout fires then, inside the breaker. The
//!   caller gets an [`ErrorKind::Timeout`] named after the dependency (the call timeout's
//!   name) and the breaker counts a failure, as for any slow call. The overall deadline
//!   itself (named `"<name>:deadline"`) fires only where the waits themselves reach it.
//!
//! [`ErrorKind::Timeout`]: crate::error::ErrorKind::Timeout
//!
//! # Cache and coalescing together
//!
//! The cache coalesces its own misses (concurrent misses of one key make one fetch) and runs
//! at most one early refresh per key, so **under the cache, coalescing with the same key
//! function saves nothing**: each request it sees from the cache is already alone for its
//! key (it only costs one table entry and one boxed future per fetch). It is useful for the
//! requests the cache lets through, those whose *cache* key is `None` while their
//! *coalescing* key is `Some`: requests asking for a fresh answer (`Cache-Control:
//! no-cache`), or responses that may be shared among concurrent callers but not stored.
//! Concurrent such requests then share one upstream call, and may also share a fetch or
//! refresh of the cache in flight for the same coalescing key.
//!
//! So the preset accepts both and places them in that order, cache then coalescing, both
//! above the deadline: `cache → coalesce → deadline → rate limit → bulkhead → breaker →
//! timeout`. Ask for the cache alone when every request it should share has a cache key.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_breakwater::preset::Dependency;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_breakwater::BoxError> {
//! // Merchant ids; id 0 means "read the current profile": never cached, still coalesced.
//! let profiles = Dependency::builder("risk-profile")
//!     .cache(|c| {
//!         c.key(|id: &u64| (*id != 0).then_some(*id))
//!             .ttl(Duration::from_secs(2))
//!             .max_staleness(Duration::from_secs(30))
//!     })
//!     .coalesce(|id: &u64| Some(*id))
//!     .build()?;
//! let handle = profiles.cache();
//! let svc = profiles.layer(service_fn(|id: u64| async move {
//!     Ok::<_, std::io::Error>(format!("profile {id}"))
//! }));
//! assert_eq!(svc.clone().oneshot(7).await?, "profile 7"); // miss
//! assert_eq!(svc.clone().oneshot(7).await?, "profile 7"); // hit: no permit taken
//! assert_eq!(handle.snapshot().counter("hits"), Some(1));
//! # Ok(())
//! # }
//! ```

use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;
use tower::layer::util::{Identity, Stack};

use crate::bulkhead::{BulkheadBuilder, BulkheadHandle, BulkheadLayer};
use crate::cache::{CacheBuilder, CacheHandle, CacheLayer, TtlConfig};
use crate::circuit_breaker::{CircuitBreakerBuilder, CircuitBreakerHandle, CircuitBreakerLayer};
use crate::classify::DefaultClassifier;
use crate::coalesce::{CoalesceBuilder, CoalesceHandle, CoalesceLayer};
use crate::config::ConfigError;
use crate::error::LayerKind;
use crate::event::{Event, Listener};
use crate::metrics::MetricsProfile;
use crate::rate_limit::{RateLimitBuilder, RateLimitHandle, RateLimitLayer};
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
    F: Fn(&Req) -> Option<K> + Clone,
    K: Hash + Eq + Send + 'static,
{
    type Layer = CoalesceLayer<Req, K, F>;

    fn build_layer(self, c: &CommonSettings) -> Result<Self::Layer, ConfigError> {
        common!(c, self, c.name.clone()).build()
    }
}

impl<Req, K, F, T, Cl, Z> sealed::Sealed for CacheBuilder<Req, K, F, T, Cl, Z> {}

impl<Req, K, F, T, Cl, Z> Pending for CacheBuilder<Req, K, F, T, Cl, Z>
where
    F: Fn(&Req) -> Option<K> + Clone,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: TtlConfig,
{
    type Layer = CacheLayer<Req, K, F, T, Cl, Z>;

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
        DependencyBuilder {
            base: Base {
                name: name.into(),
                deadline: None,
                limiter_wait: Duration::ZERO,
                timeout: TimeoutLayer::builder().timeout(DEFAULT_CALL_TIMEOUT),
                breaker: CircuitBreakerLayer::builder(),
                bulkhead: BulkheadLayer::builder().max_concurrent_calls(DEFAULT_CONCURRENCY),
                profile: None,
                registry: None,
                listeners: Vec::new(),
                record_durations: false,
            },
            classifier: DefaultClassifier,
            rate_limit: Off,
            coalesce: Off,
            cache: Off,
        }
    }
}

/// The settings that do not change the builder's type. The per-call timeout and the
/// bulkhead's settings live in their builders only, whichever method set them last.
struct Base {
    name: Arc<str>,
    deadline: Option<Duration>,
    limiter_wait: Duration,
    timeout: TimeoutBuilder,
    breaker: CircuitBreakerBuilder,
    bulkhead: BulkheadBuilder,
    profile: Option<MetricsProfile>,
    registry: Option<Registry>,
    listeners: Vec<Listener>,
    record_durations: bool,
}

/// Builds a [`DependencyLayer`]; see the [module docs](crate::preset).
///
/// `C` is the classifier of the breaker and per-call timeout, `R` the pending rate limiter
/// ([`Off`] or a [`RateLimitBuilder`]), `K` the pending coalescing layer ([`Off`] or a
/// [`CoalesceBuilder`]), `Ca` the pending cache ([`Off`] or a [`CacheBuilder`]).
#[must_use]
pub struct DependencyBuilder<C = DefaultClassifier, R = Off, K = Off, Ca = Off> {
    base: Base,
    classifier: C,
    rate_limit: R,
    coalesce: K,
    cache: Ca,
}

impl<C, R, K, Ca> std::fmt::Debug for DependencyBuilder<C, R, K, Ca> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DependencyBuilder")
            .field("name", &self.base.name)
            .field("timeout", &self.base.timeout)
            .field("deadline", &self.base.deadline)
            .field("bulkhead", &self.base.bulkhead)
            .finish_non_exhaustive()
    }
}

impl<C, R, K, Ca> DependencyBuilder<C, R, K, Ca> {
    fn into_parts(self) -> (Base, C, R, K, Ca) {
        (
            self.base,
            self.classifier,
            self.rate_limit,
            self.coalesce,
            self.cache,
        )
    }

    fn from_parts(base: Base, classifier: C, rate_limit: R, coalesce: K, cache: Ca) -> Self {
        DependencyBuilder {
            base,
            classifier,
            rate_limit,
            coalesce,
            cache,
        }
    }

    /// The per-call timeout (default [`DEFAULT_CALL_TIMEOUT`]); must be > 0. The same
    /// setting as [`TimeoutBuilder::timeout`] in
    /// [`configure_timeout`](Self::configure_timeout): the last call wins.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.base.timeout = self.base.timeout.timeout(timeout);
        self
    }

    /// The overall deadline around limiter wait, bulkhead wait and call (default: the sum of
    /// the limiter's maximum wait, the bulkhead's maximum wait and the call timeout, as the
    /// built layers hold them); must be > 0 and at least the call timeout. A deadline below
    /// the sum cuts off calls that waited; see
    /// [The overall deadline and the breaker](crate::preset#the-overall-deadline-and-the-breaker).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.base.deadline = Some(deadline);
        self
    }

    /// The bulkhead: at most `max` calls in flight, a call waiting at most `max_wait` for a
    /// permit (zero: rejected at once, load shedding). Default: [`DEFAULT_CONCURRENCY`], no
    /// wait. The same settings as [`BulkheadBuilder::max_concurrent_calls`] and
    /// [`BulkheadBuilder::max_wait`] in [`configure_bulkhead`](Self::configure_bulkhead):
    /// the last call wins.
    pub fn concurrency(mut self, max: usize, max_wait: Duration) -> Self {
        self.base.bulkhead = self
            .base
            .bulkhead
            .max_concurrent_calls(max)
            .max_wait(max_wait);
        self
    }

    /// Adds a rate limiter: `count` calls per `period` with a burst of `burst`, a call waiting
    /// at most `max_wait` for its slot (zero: rejected at once). See
    /// [`rate_limit`](crate::rate_limit).
    pub fn rate_limit(
        mut self,
        count: u64,
        period: Duration,
        burst: u64,
        max_wait: Duration,
    ) -> DependencyBuilder<C, RateLimitBuilder, K, Ca> {
        let limiter = RateLimitLayer::builder()
            .rate(count, period)
            .burst(burst)
            .max_wait(max_wait);
        self.base.limiter_wait = max_wait;
        let (base, classifier, _, coalesce, cache) = self.into_parts();
        DependencyBuilder::from_parts(base, classifier, limiter, coalesce, cache)
    }

    /// Adds coalescing, outside every layer that admits (inside the cache when there is one),
    /// keyed by `key`: `Some(key)` for a request that may share a call in flight, `None` to
    /// pass it through (see [`coalesce`](crate::coalesce): the key must capture everything
    /// that affects the response; for HTTP, [`HttpKey::key`](crate::http::HttpKey::key)).
    /// With a cache, see [Cache and coalescing together](crate::preset#cache-and-coalescing-together).
    pub fn coalesce<Req, K2, F>(
        self,
        key: F,
    ) -> DependencyBuilder<C, R, CoalesceBuilder<Req, K2, F>, Ca>
    where
        F: Fn(&Req) -> Option<K2> + Clone,
        K2: Hash + Eq + Send + 'static,
    {
        let coalesce = CoalesceLayer::builder().key(key);
        let (base, classifier, rate_limit, _, cache) = self.into_parts();
        DependencyBuilder::from_parts(base, classifier, rate_limit, coalesce, cache)
    }

    /// Adds a response cache, outermost. `configure` receives the cache's builder with its
    /// defaults ([`CacheLayer::builder`]) and must set at least its key function and a TTL;
    /// every other setting (XFetch's `beta`, `max_entries`, `max_staleness`, the
    /// classifier deciding what is stored, ...) is the cache's own. Its name and common
    /// settings are the preset's. Responses must be `Clone` (a hit returns a clone).
    ///
    /// Its classifier is its own (default [`DefaultClassifier`]: every `Ok` is stored), not
    /// the preset's: what may be stored is a separate question from what counts as a failure.
    /// For HTTP, set [`HttpClassifier`](crate::http::HttpClassifier) in `configure` so a `503`
    /// is never stored.
    #[allow(clippy::type_complexity)] // the cache builder's six type parameters
    pub fn cache<Req, K2, F, T, Cl, Z>(
        self,
        configure: impl FnOnce(CacheBuilder) -> CacheBuilder<Req, K2, F, T, Cl, Z>,
    ) -> DependencyBuilder<C, R, K, CacheBuilder<Req, K2, F, T, Cl, Z>> {
        let cache = configure(CacheLayer::builder());
        let (base, classifier, rate_limit, coalesce, _) = self.into_parts();
        DependencyBuilder::from_parts(base, classifier, rate_limit, coalesce, cache)
    }

    /// The classifier of the breaker and the per-call timeout (default
    /// [`DefaultClassifier`]; for HTTP, [`HttpClassifier`](crate::http::HttpClassifier) with
    /// the `http` feature).
    pub fn classifier<C2>(self, classifier: C2) -> DependencyBuilder<C2, R, K, Ca> {
        let (base, _, rate_limit, coalesce, cache) = self.into_parts();
        DependencyBuilder::from_parts(base, classifier, rate_limit, coalesce, cache)
    }

    /// Changes the circuit breaker's settings (window, thresholds, waits, half-open probes).
    /// Its name, classifier and common settings are the preset's.
    pub fn circuit_breaker(
        mut self,
        configure: impl FnOnce(CircuitBreakerBuilder) -> CircuitBreakerBuilder,
    ) -> Self {
        self.base.breaker = configure(self.base.breaker);
        self
    }

    /// Changes settings of the per-call timeout: its [`timeout`](TimeoutBuilder::timeout) is
    /// the one of [`call_timeout`](Self::call_timeout) (the last call wins). Its name,
    /// classifier and common settings are the preset's (`per_request` is not available here;
    /// use the layers directly for that).
    pub fn configure_timeout(
        mut self,
        configure: impl FnOnce(TimeoutBuilder) -> TimeoutBuilder,
    ) -> Self {
        self.base.timeout = configure(self.base.timeout);
        self
    }

    /// Changes settings of the bulkhead (e.g. `max_waiting`); its `max_concurrent_calls` and
    /// `max_wait` are those of [`concurrency`](Self::concurrency) (the last call wins). Its
    /// name and common settings are the preset's.
    pub fn configure_bulkhead(
        mut self,
        configure: impl FnOnce(BulkheadBuilder) -> BulkheadBuilder,
    ) -> Self {
        self.base.bulkhead = configure(self.base.bulkhead);
        self
    }

    /// The metrics profile of every layer (default
    /// [`MetricsProfile::Breakwater`]).
    pub fn metrics_profile(mut self, profile: MetricsProfile) -> Self {
        self.base.profile = Some(profile);
        self
    }

    /// Adds every layer to `registry`.
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.base.registry = Some(registry.clone());
        self
    }

    /// Adds an event listener to every layer.
    pub fn on_event(mut self, listener: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.base.listeners.push(Arc::new(listener));
        self
    }

    /// Turns every layer's duration histograms on or off (default off).
    pub fn record_durations(mut self, on: bool) -> Self {
        self.base.record_durations = on;
        self
    }
}

impl<C, R, Req, K2, F, Ca> DependencyBuilder<C, R, CoalesceBuilder<Req, K2, F>, Ca> {
    /// Changes other settings of the coalescing layer (e.g. `followers_histogram`). Its name
    /// and common settings are the preset's.
    pub fn configure_coalesce(
        mut self,
        configure: impl FnOnce(CoalesceBuilder<Req, K2, F>) -> CoalesceBuilder<Req, K2, F>,
    ) -> Self {
        self.coalesce = configure(self.coalesce);
        self
    }
}

/// The layer a [`DependencyBuilder`] with these parts builds.
pub type Built<C, R, K, Ca> =
    DependencyLayer<C, <R as Pending>::Layer, <K as Pending>::Layer, <Ca as Pending>::Layer>;

/// The layer stack a preset builds, outermost last (tower's `Stack` order).
pub type PresetStack<C, R, K, Ca> = Stack<
    TimeoutLayer<FixedTimeout, C>,
    Stack<
        CircuitBreakerLayer<C>,
        Stack<BulkheadLayer, Stack<R, Stack<TimeoutLayer, Stack<K, Stack<Ca, Identity>>>>>,
    >,
>;

impl<C, R, K, Ca> DependencyBuilder<C, R, K, Ca>
where
    C: Clone,
    R: Pending,
    K: Pending,
    Ca: Pending,
    R::Layer: Clone,
    K::Layer: Clone,
    Ca::Layer: Clone,
{
    /// Validates every layer's configuration, registers their metric handles and returns the
    /// stack as one layer. Layers join the registry from the caller inwards, except the
    /// overall deadline, which joins last: its default is computed from the built layers.
    ///
    /// # Errors
    ///
    /// The first layer's [`ConfigError`]: a zero call timeout or deadline, a zero bulkhead
    /// size, an invalid breaker, rate-limiter or cache setting (no TTL, ...), an empty name;
    /// or, for the layer named `"<name>:deadline"` and field `deadline`, a deadline shorter
    /// than the call timeout (the call timeout could never fire, so slow calls would be
    /// cancelled outside the breaker and never count against the dependency).
    pub fn build(self) -> Result<Built<C, R, K, Ca>, ConfigError> {
        let base = self.base;
        let name = base.name.clone();
        let c = CommonSettings {
            name: name.clone(),
            profile: base.profile,
            registry: base.registry.clone(),
            listeners: base.listeners.clone(),
            record_durations: base.record_durations,
        };
        let cache = self.cache.build_layer(&c)?;
        let coalesce = self.coalesce.build_layer(&c)?;
        let rate_limit = self.rate_limit.build_layer(&c)?;
        let bulkhead = common!(&c, base.bulkhead, name.clone()).build()?;
        let breaker = common!(&c, base.breaker, name.clone())
            .classifier(self.classifier.clone())
            .build()?;
        let timeout = common!(&c, base.timeout, name.clone())
            .classifier(self.classifier)
            .build()?;
        let call_timeout = timeout.handle().timeout();
        let bulkhead_handle = bulkhead.handle();
        let deadline = base.deadline.unwrap_or_else(|| {
            call_timeout
                .saturating_add(bulkhead_handle.max_wait())
                .saturating_add(base.limiter_wait)
        });
        let deadline_name: Arc<str> = format!("{name}:deadline").into();
        let deadline_layer = common!(&c, TimeoutLayer::builder(), deadline_name.clone())
            .timeout(deadline)
            .build()?;
        if deadline < call_timeout {
            return Err(ConfigError::new(
                LayerKind::Timeout,
                &deadline_name,
                "deadline",
                deadline,
                "a duration >= the call timeout",
            ));
        }
        let breaker_handle = breaker.handle();
        let parts = Parts {
            rate_limit: rate_limit.clone(),
            coalesce: coalesce.clone(),
            cache: cache.clone(),
        };
        let stack = tower::ServiceBuilder::new()
            .layer(cache)
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
            parts,
        })
    }
}

/// The optional layers, kept for their handles.
#[derive(Clone)]
struct Parts<R, K, Ca> {
    rate_limit: R,
    coalesce: K,
    cache: Ca,
}

/// The preset's stack as one layer, with handles on its stateful parts. Cheap to clone;
/// every service it makes shares one cache, one coalescing table, one breaker, one bulkhead,
/// one limiter.
#[derive(Clone)]
pub struct DependencyLayer<C, R, K, Ca = Identity> {
    stack: PresetStack<C, R, K, Ca>,
    breaker: CircuitBreakerHandle,
    bulkhead: BulkheadHandle,
    parts: Parts<R, K, Ca>,
}

impl<C, R, K, Ca> std::fmt::Debug for DependencyLayer<C, R, K, Ca> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DependencyLayer")
            .field("name", &self.breaker.name())
            .finish_non_exhaustive()
    }
}

impl<C, R, K, Ca> DependencyLayer<C, R, K, Ca> {
    /// The circuit breaker's handle (state, snapshot, force open, reset).
    pub fn breaker(&self) -> &CircuitBreakerHandle {
        &self.breaker
    }

    /// The bulkhead's handle (permits, snapshot).
    pub fn bulkhead(&self) -> &BulkheadHandle {
        &self.bulkhead
    }
}

impl<C, K, Ca> DependencyLayer<C, RateLimitLayer, K, Ca> {
    /// The rate limiter's handle (snapshot), when the preset has one.
    pub fn rate_limiter(&self) -> RateLimitHandle {
        self.parts.rate_limit.handle()
    }
}

impl<C, R, Req, K2, F, Ca> DependencyLayer<C, R, CoalesceLayer<Req, K2, F>, Ca> {
    /// The coalescing layer's handle (snapshot), when the preset has one.
    pub fn coalescer(&self) -> CoalesceHandle {
        self.parts.coalesce.handle()
    }
}

impl<C, R, K, Req, K2, F, T, Cl, Z> DependencyLayer<C, R, K, CacheLayer<Req, K2, F, T, Cl, Z>> {
    /// The cache's handle (snapshot), when the preset has one.
    pub fn cache(&self) -> CacheHandle {
        self.parts.cache.handle()
    }
}

impl<S, C, R, K, Ca> Layer<S> for DependencyLayer<C, R, K, Ca>
where
    PresetStack<C, R, K, Ca>: Layer<S>,
{
    type Service = <PresetStack<C, R, K, Ca> as Layer<S>>::Service;

    fn layer(&self, inner: S) -> Self::Service {
        self.stack.layer(inner)
    }
}
