use std::any::Any;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::Mutex;
use tower::{Layer, Service};

use super::Cache;
use super::policy::{FixedTtl, StalenessFn, StalenessPolicy, TtlConfig, TtlFn, Unset};
use super::store::{self, Fetched, Instruments, RandomFn, RefreshMode, Settings, Store, TtlPolicy};
use crate::classify::{Classify, DefaultClassifier};
use crate::coalesce::core::{End, Hooks, Role, Table};
use crate::config::{Common, ConfigError, common_builder_methods};
use crate::error::{BoxError, BreakwaterError, ErrorKind, LayerKind};
use crate::metrics::names;
use crate::snapshot::Snapshot;

/// The in-flight table of one store.
pub(super) type Fetches<K, R> = Table<K, Fetched<R>, Fetched<R>, Arc<Instruments>>;

impl<R: Send + 'static> Hooks<Fetched<R>, Fetched<R>> for Arc<Instruments> {
    fn joined(&self, _role: Role) {}

    fn ended(&self, _end: End, _followers: u64) {}

    fn complete(&self, out: Fetched<R>) -> Fetched<R> {
        out
    }

    fn panicked(&self) -> Fetched<R> {
        let e = BreakwaterError::new(ErrorKind::Panicked, LayerKind::Cache, self.name.clone());
        Fetched {
            res: Err(Arc::new(e.into())),
            success: false,
        }
    }
}

/// A store with its in-flight table, shared by every service of one layer for one type set.
pub(super) struct Typed<K, R, C, T> {
    pub(super) store: Store<K, R, C, T>,
    pub(super) fetches: Arc<Fetches<K, R>>,
}

/// The error of a fetch that failed with no stale value to serve: the upstream error, shared
/// by every caller of the fetch and, with a [negative TTL](CacheBuilder::negative_ttl), by
/// every read that gets the remembered failure (one `Arc`, cloned; `source()` is the
/// upstream error; [`error::find`](crate::error::find) sees through it).
///
/// The inner error is the upstream's own, or one of the crate's [`BreakwaterError`]s (layer
/// [`Cache`](LayerKind::Cache), the instance's name): kind
/// [`Panicked`](ErrorKind::Panicked) when the fetch panicked (the upstream call, the
/// classifier, the TTL or staleness function, or the response's `Clone` when the fetch
/// stored it), kind [`Timeout`](ErrorKind::Timeout) when
/// a refresh the read joined ran past the [refresh timeout](CacheBuilder::refresh_timeout).
#[derive(Debug, Clone)]
pub struct FetchError {
    inner: Arc<BoxError>,
}

impl FetchError {
    pub(super) fn new(inner: Arc<BoxError>) -> Self {
        FetchError { inner }
    }

    /// The upstream error, or the crate's own `Panicked` or `Timeout` error (see above).
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &**self.inner
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cache fetch failed: {}", self.inner)
    }
}

impl std::error::Error for FetchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self.inner)
    }
}

/// State shared by a layer, its handle and every service it made.
pub(super) struct LayerState {
    instruments: Arc<Instruments>,
    settings: Settings,
    stores: Mutex<Vec<Arc<dyn Any + Send + Sync>>>,
}

impl fmt::Debug for LayerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerState")
            .field("name", &self.instruments.name)
            .finish_non_exhaustive()
    }
}

/// The default [refresh timeout](CacheBuilder::refresh_timeout): 30 s.
pub const DEFAULT_REFRESH_TIMEOUT: Duration = Duration::from_secs(30);

/// The default capacity: 10,000 entries.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

/// Builds a [`CacheLayer`]; see the [module docs](crate::cache).
///
/// Required: [`key`](Self::key) (at compile time) and a TTL ([`ttl`](Self::ttl) or
/// [`ttl_fn`](Self::ttl_fn); `build()` returns a [`ConfigError`] without one).
#[must_use]
pub struct CacheBuilder<Req = (), K = (), F = Unset, T = Unset, C = DefaultClassifier, Z = Unset> {
    common: Common,
    key: F,
    ttl: T,
    classifier: C,
    staleness: Z,
    beta: f64,
    max_entries: usize,
    max_staleness: Duration,
    stale_retry_interval: Duration,
    negative_ttl: Option<Duration>,
    mode: RefreshMode,
    random: Option<RandomFn>,
    seed: Option<u64>,
    refresh_timeout: Duration,
    _types: PhantomData<fn(&Req) -> K>,
}

impl<Req, K, F, T, C, Z> fmt::Debug for CacheBuilder<Req, K, F, T, C, Z> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("common", &self.common)
            .field("beta", &self.beta)
            .field("max_entries", &self.max_entries)
            .field("max_staleness", &self.max_staleness)
            .field("stale_retry_interval", &self.stale_retry_interval)
            .field("negative_ttl", &self.negative_ttl)
            .field("mode", &self.mode)
            .field("refresh_timeout", &self.refresh_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for CacheBuilder {
    fn default() -> Self {
        CacheBuilder {
            common: Common::default(),
            key: Unset,
            ttl: Unset,
            classifier: DefaultClassifier,
            staleness: Unset,
            beta: 1.0,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_staleness: Duration::ZERO,
            stale_retry_interval: Duration::from_secs(1),
            negative_ttl: None,
            mode: RefreshMode::Background,
            random: None,
            seed: None,
            refresh_timeout: DEFAULT_REFRESH_TIMEOUT,
            _types: PhantomData,
        }
    }
}

impl<Req, K, F, T, C, Z> CacheBuilder<Req, K, F, T, C, Z> {
    common_builder_methods!();

    /// The key function: `f(&req)` is the cache key of `req`, or `None` to pass the request
    /// through uncached and uncoalesced. The key must capture everything that affects the
    /// response. Called once per call, in `call`; keep it cheap.
    ///
    /// # Panics
    ///
    /// A panic of `f` unwinds out of the service's `call` (nothing changed).
    pub fn key<Req2, K2, F2>(self, f: F2) -> CacheBuilder<Req2, K2, F2, T, C, Z>
    where
        F2: Fn(&Req2) -> Option<K2> + Clone,
        K2: Hash + Eq + Clone + Send + Sync + 'static,
    {
        self.with(|_, ttl, classifier, staleness| (f, ttl, classifier, staleness))
    }

    /// The builder with its key function, TTL, classifier and staleness policy replaced by
    /// `change` of the current ones (the type-changing setters).
    fn with<Req2, K2, F2, T2, C2, Z2>(
        self,
        change: impl FnOnce(F, T, C, Z) -> (F2, T2, C2, Z2),
    ) -> CacheBuilder<Req2, K2, F2, T2, C2, Z2> {
        let (key, ttl, classifier, staleness) =
            change(self.key, self.ttl, self.classifier, self.staleness);
        CacheBuilder {
            common: self.common,
            key,
            ttl,
            classifier,
            staleness,
            beta: self.beta,
            max_entries: self.max_entries,
            max_staleness: self.max_staleness,
            stale_retry_interval: self.stale_retry_interval,
            negative_ttl: self.negative_ttl,
            mode: self.mode,
            random: self.random,
            seed: self.seed,
            refresh_timeout: self.refresh_timeout,
            _types: PhantomData,
        }
    }

    fn with_ttl<T2>(self, ttl: T2) -> CacheBuilder<Req, K, F, T2, C, Z> {
        self.with(|key, _, classifier, staleness| (key, ttl, classifier, staleness))
    }

    /// A fixed time to live: an entry expires `ttl` after it was stored. Must be > 0.
    pub fn ttl(self, ttl: Duration) -> CacheBuilder<Req, K, F, FixedTtl, C, Z> {
        self.with_ttl(FixedTtl(ttl))
    }

    /// A TTL computed from each successful response (e.g. from `Cache-Control: max-age`);
    /// `None` or a zero duration: the response is not stored.
    pub fn ttl_fn<Res, G>(self, f: G) -> CacheBuilder<Req, K, F, TtlFn<G>, C, Z>
    where
        G: Fn(&Res) -> Option<Duration> + Clone + Send + Sync + 'static,
    {
        self.with_ttl(TtlFn(f))
    }

    /// The classifier: only responses it calls [`Success`](crate::classify::Outcome::Success)
    /// are stored; anything else counts as a failed fetch (default [`DefaultClassifier`]).
    pub fn classifier<C2>(self, classifier: C2) -> CacheBuilder<Req, K, F, T, C2, Z> {
        self.with(|key, ttl, _, staleness| (key, ttl, classifier, staleness))
    }

    /// XFetch's `beta`, a finite number > 0 (default 1.0; above 1 refreshes earlier). Else
    /// `build()` returns a [`ConfigError`].
    pub fn beta(mut self, beta: f64) -> Self {
        self.beta = beta;
        self
    }

    /// The capacity, in entries (>= 1; default [`DEFAULT_MAX_ENTRIES`]). See the
    /// [eviction policy](crate::cache#capacity-and-eviction).
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self
    }

    /// How long past its expiry an entry may still be served when the upstream fails
    /// (default zero: never serve stale; `Duration::MAX`: for ever). The limit for every
    /// entry, also when a [`staleness_fn`](Self::staleness_fn) allows more. Past expiry
    /// plus this, reads of a failing key go upstream (coalesced) each time unless a
    /// [`negative_ttl`](Self::negative_ttl) is set.
    pub fn max_staleness(mut self, d: Duration) -> Self {
        self.max_staleness = d;
        self
    }

    /// A per-response maximum staleness: `f(&res)` for each response about to be stored;
    /// `None` means the configured [`max_staleness`](Self::max_staleness). The entry's
    /// limit is the smaller of the two: `max_staleness` is the operator's bound, which a
    /// response can only shorten. With the default `max_staleness` of zero nothing is ever
    /// served stale, whatever `f` returns: to honour what responses allow (such as an HTTP
    /// `stale-if-error=300`), set `max_staleness` to the most you accept (`Duration::MAX`
    /// for no bound of your own).
    ///
    /// For HTTP, pass [`http::stale_allowance`](crate::http::stale_allowance) (RFC 9111
    /// section 4.2.4 and RFC 5861): zero after `must-revalidate`, `proxy-revalidate`,
    /// `no-cache` or `s-maxage`, the `stale-if-error` value when given, else `None`.
    ///
    /// Called as the [`StalenessPolicy`] docs say; a panic is a panic of the fetch.
    pub fn staleness_fn<Res, G>(self, f: G) -> CacheBuilder<Req, K, F, T, C, StalenessFn<G>>
    where
        G: Fn(&Res) -> Option<Duration> + Clone + Send + Sync + 'static,
    {
        self.with(|key, ttl, classifier, _| (key, ttl, classifier, StalenessFn(f)))
    }

    /// The back-off of a key in outage: after a failed fetch or refresh of a key whose
    /// value may still be served (fresh, or expired within its maximum staleness), how long
    /// no request for that key goes upstream (reads get the value meanwhile); then one
    /// retry, in the background. Without a value to serve, only a
    /// [`negative_ttl`](Self::negative_ttl) holds reads back. > 0, default 1 s.
    pub fn stale_retry_interval(mut self, d: Duration) -> Self {
        self.stale_retry_interval = d;
        self
    }

    /// How long a refresh may run, from its first poll (readiness of the inner service
    /// included): an early refresh (either [mode](Self::refresh_mode)) or a retry during an
    /// outage. Past it, the refresh fails with a [`Timeout`](ErrorKind::Timeout) error of
    /// the cache: its upstream future is dropped, the failure is recorded (`refresh_errors`,
    /// a [`TimedOut`](crate::event::EventKind::TimedOut) event, the key's back-off) and the
    /// reads that joined it get the stale value or a [`FetchError`]. So a hung refresh never
    /// pins its key. Fetches of misses have no such deadline (put a timeout layer under the
    /// cache for them). > 0, default [`DEFAULT_REFRESH_TIMEOUT`]. Needs tokio's time driver,
    /// like every tokio timer; outside a tokio runtime (an inline refresh driven by another
    /// executor) the refresh runs without a deadline.
    pub fn refresh_timeout(mut self, d: Duration) -> Self {
        self.refresh_timeout = d;
        self
    }

    /// Remember a failed fetch that left no value to serve (none stored, or past its expiry
    /// plus the maximum staleness) for `ttl`: reads of its key during that time get the
    /// failure (the shared [`FetchError`], or the response the classifier did not call a
    /// success) at once, with no upstream call. > 0; default off: failures are never
    /// stored, and such reads go upstream (coalesced) each time. See
    /// [negative caching](crate::cache#negative-caching).
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }

    /// How early refreshes run: [`RefreshMode::Background`] (the default) or
    /// [`RefreshMode::Inline`] (the read that starts one waits for it, as in the XFetch
    /// paper). See the [modes](crate::cache#modes).
    pub fn refresh_mode(mut self, mode: RefreshMode) -> Self {
        self.mode = mode;
        self
    }

    /// The random source of XFetch: `f()` returns `u`, uniform in `(0.0, 1.0]`. A value
    /// outside that interval (zero, negative, NaN, above 1, infinite) counts as `u = 1`:
    /// that read does not refresh early (nothing panics; a source that returns such values
    /// only turns early refresh off). Called only by reads of a fresh entry close enough to
    /// expiry for some `u` to trigger a refresh, and not while a refresh of that entry is in
    /// flight. Replaces the default seeded source; of `random` and [`seed`](Self::seed), the
    /// one called last wins.
    pub fn random(mut self, f: impl Fn() -> f64 + Send + Sync + 'static) -> Self {
        self.random = Some(Arc::new(f));
        self
    }

    /// The seed of the default random source (SplitMix64, from the `rand_xoshiro` crate),
    /// for reproducible runs; without it, the seed is random. Selects the default source
    /// again if [`random`](Self::random) was called before it.
    pub fn seed(mut self, seed: u64) -> Self {
        self.random = None;
        self.seed = Some(seed);
        self
    }

    /// Same as [`record_durations`](Self::record_durations), which turns
    /// `breakwater_cache_recompute_duration_seconds` on (default off), as for every layer.
    pub fn recompute_histogram(self, on: bool) -> Self {
        self.record_durations(on)
    }
}

impl<Req, K, F, T, C, Z> CacheBuilder<Req, K, F, T, C, Z>
where
    F: Fn(&Req) -> Option<K> + Clone,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: TtlConfig,
{
    /// Validates the configuration, registers the metric handles and returns the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] when the name is empty, no TTL was given or a fixed TTL is zero,
    /// `beta` is not a finite number > 0 (zero, negative, NaN, infinite), `max_entries` is
    /// 0, `stale_retry_interval` or `refresh_timeout` is 0, or a negative TTL is 0.
    pub fn build(self) -> Result<CacheLayer<Req, K, F, T, C, Z>, ConfigError> {
        let v = self.common.validator(LayerKind::Cache)?;
        match self.ttl.fixed() {
            None => return Err(v.error("ttl", "unset", "a TTL: ttl(Duration) or ttl_fn(..)")),
            Some(Some(ttl)) => drop(v.positive_duration("ttl", ttl)?),
            Some(None) => {}
        }
        let beta = v.positive_finite("beta", self.beta)?;
        v.at_least_one("max_entries", self.max_entries as u64)?;
        v.positive_duration("stale_retry_interval", self.stale_retry_interval)?;
        v.positive_duration("refresh_timeout", self.refresh_timeout)?;
        if let Some(ttl) = self.negative_ttl {
            v.positive_duration("negative_ttl", ttl)?;
        }
        let reg = self.common.registrar();
        let lookups = ["hit", "miss", "stale", "negative"]
            .map(|r| reg.counter(&names::CACHE_LOOKUPS, &[("result", r)]));
        let instruments = Instruments {
            name: v.name().clone(),
            lookups,
            early: reg.counter(&names::CACHE_EARLY_REFRESHES, &[]),
            errors: reg.counter(&names::CACHE_REFRESH_ERRORS, &[]),
            entries: reg.gauge(&names::CACHE_ENTRIES, &[]),
            recompute: reg
                .durations(LayerKind::Cache, self.common.record_durations)
                .then(|| reg.histogram(&names::CACHE_RECOMPUTE_DURATION, &[])),
            fetches: reg.counter(&names::CACHE_FETCHES, &[]),
            passed: reg.counter(&names::CACHE_PASSED_THROUGH, &[]),
            events: self.common.events(LayerKind::Cache),
            counts: Default::default(),
        };
        let seed = self
            .seed
            .unwrap_or_else(|| RandomState::new().hash_one(0u64));
        let settings = Settings {
            beta,
            max_staleness: self.max_staleness,
            stale_retry_interval: self.stale_retry_interval,
            negative_ttl: self.negative_ttl,
            mode: self.mode,
            max_entries: self.max_entries,
            random: self.random.unwrap_or_else(|| store::splitmix(seed)),
            refresh_timeout: self.refresh_timeout,
        };
        let state = Arc::new(LayerState {
            instruments: Arc::new(instruments),
            settings,
            stores: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&state);
        self.common.register_fn(move || {
            Some(
                CacheHandle {
                    state: weak.upgrade()?,
                }
                .snapshot(),
            )
        });
        Ok(CacheLayer {
            state,
            key: self.key,
            ttl: self.ttl,
            classifier: self.classifier,
            staleness: self.staleness,
            _types: PhantomData,
        })
    }
}

/// A response cache with XFetch early refresh and serve-stale-on-error; see the
/// [module docs](crate::cache).
///
/// Cheap to clone (one `Arc`, the key function, the TTL policy and the classifier); every
/// clone, and every service it makes, shares one store per response type.
pub struct CacheLayer<Req, K, F, T, C = DefaultClassifier, Z = Unset> {
    state: Arc<LayerState>,
    key: F,
    ttl: T,
    classifier: C,
    staleness: Z,
    _types: PhantomData<fn(&Req) -> K>,
}

impl<Req, K, F: Clone, T: Clone, C: Clone, Z: Clone> Clone for CacheLayer<Req, K, F, T, C, Z> {
    fn clone(&self) -> Self {
        CacheLayer {
            state: self.state.clone(),
            key: self.key.clone(),
            ttl: self.ttl.clone(),
            classifier: self.classifier.clone(),
            staleness: self.staleness.clone(),
            _types: PhantomData,
        }
    }
}

impl<Req, K, F, T, C, Z> fmt::Debug for CacheLayer<Req, K, F, T, C, Z> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl CacheLayer<(), (), Unset, Unset> {
    /// A builder with defaults: name `"default"`, no key function and no TTL (both required),
    /// beta 1.0, [`DEFAULT_MAX_ENTRIES`], no stale serving, a 1 s retry interval, no negative
    /// caching, background refresh with a [`DEFAULT_REFRESH_TIMEOUT`], no staleness function,
    /// a randomly seeded random source, the default classifier and metrics profile.
    pub fn builder() -> CacheBuilder {
        CacheBuilder::default()
    }
}

impl<Req, K, F, T, C, Z> CacheLayer<Req, K, F, T, C, Z> {
    /// A handle to this instance's state, for snapshots.
    pub fn handle(&self) -> CacheHandle {
        CacheHandle {
            state: self.state.clone(),
        }
    }
}

impl<S, Req, K, F, T, C, Z> Layer<S> for CacheLayer<Req, K, F, T, C, Z>
where
    S: Service<Req>,
    S::Response: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    F: Clone,
    T: TtlPolicy<S::Response>,
    C: Classify<S::Response>,
    Z: StalenessPolicy<S::Response>,
{
    type Service = Cache<S, K, S::Response, F, T, C>;

    fn layer(&self, inner: S) -> Self::Service {
        type Of<S, Req, K, T, C> = Typed<K, <S as Service<Req>>::Response, C, T>;
        let mut stores = self.state.stores.lock();
        let found = stores
            .iter()
            .find_map(|s| s.clone().downcast::<Of<S, Req, K, T, C>>().ok());
        let typed = found.unwrap_or_else(|| {
            let mut store = Store::new(
                self.state.settings.clone(),
                self.state.instruments.clone(),
                self.classifier.clone(),
                self.ttl.clone(),
            );
            store.staleness = self.staleness.function();
            let typed = Arc::new(Typed {
                store,
                fetches: Arc::new(Table::new(self.state.instruments.clone())),
            });
            stores.push(typed.clone());
            typed
        });
        Cache::new(inner, typed, self.key.clone())
    }
}

/// A handle to one cache instance, for snapshots. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CacheHandle {
    state: Arc<LayerState>,
}

impl CacheHandle {
    /// The instance name.
    pub fn name(&self) -> &str {
        &self.state.instruments.name
    }

    /// A snapshot: kind `cache`, no state; counters since the layer was built, gauge now.
    ///
    /// Every request with a key is one lookup, counted once in exactly one of `hits`,
    /// `misses`, `stale` and `negative`:
    ///
    /// - `hits`: answered from a fresh entry, counted in `call` (also when it starts an
    ///   early refresh, inline ones included);
    /// - `stale`: answered with an expired value within its maximum staleness: counted in
    ///   `call` for a read while its key backs off or retries in the background, and when
    ///   its response future ends for a read whose fetch failed;
    /// - `misses`: answered by a fetch (absent, or expired with nothing to serve instead),
    ///   counted when its response future ends with the fetch's result, or when it is
    ///   dropped before (a cancelled read is still a miss);
    /// - `negative`: answered with a remembered failure (a negative TTL), counted in `call`.
    ///
    /// And: `early_refreshes`, XFetch refreshes started (counted in `call`); `fetches`,
    /// upstream calls the cache made (fetches of misses, early refreshes and retries: each
    /// counted once, when the inner service is called, however many reads shared it);
    /// `refresh_errors`, fetches, refreshes and retries that failed (an error, a response
    /// the classifier rejected, a panic, or a refresh past its timeout), counted when they
    /// end; `passed_through`, requests with key `None` (sent upstream uncached, counted in
    /// `call`, in no lookup). Gauge `entries`: entries held now, remembered failures
    /// included.
    ///
    /// Without the cache's own coalescing, every miss would be a fetch: `misses` minus the
    /// `fetches` of misses is what it saved (with no early refresh and no outage,
    /// `misses - fetches`).
    pub fn snapshot(&self) -> Snapshot {
        let c = &self.state.instruments.counts;
        let get = |i: usize| c[i].load(Ordering::Relaxed);
        Snapshot::new(LayerKind::Cache, &self.state.instruments.name)
            .with_counter("hits", get(store::HIT))
            .with_counter("misses", get(store::MISS))
            .with_counter("stale", get(store::STALE))
            .with_counter("negative", get(store::NEGATIVE))
            .with_counter("early_refreshes", get(store::EARLY))
            .with_counter("refresh_errors", get(store::ERRORS))
            .with_counter("fetches", get(store::FETCHES))
            .with_counter("passed_through", get(store::PASSED))
            .with_gauge("entries", get(store::ENTRIES) as f64)
    }
}
