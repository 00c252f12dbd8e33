use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

use ::metrics::{Counter, Gauge, Histogram};
use parking_lot::Mutex;
use tower::{Layer, Service};

use super::Coalesce;
use super::core::{AnyTable, End, Hooks, Role, Stats, Table};
use super::error::{Failure, SharedError};
use crate::config::{Common, ConfigError, common_builder_methods};
use crate::error::{BoxError, BreakwaterError, ErrorKind, LayerKind};
use crate::event::{EventKind, Events};
use crate::metrics::names;
use crate::snapshot::Snapshot;

/// The value a shared call stores for its callers.
pub(super) type Shared<R> = Result<R, Failure>;

/// The in-flight table of one layer for one key and response type.
pub(super) type Slots<K, R> = Table<K, Result<R, BoxError>, Shared<R>, Arc<Instruments>>;

/// Metric handles and listeners of one coalescing instance, registered at build time.
#[derive(Debug)]
pub(super) struct Instruments {
    pub(super) name: Arc<str>,
    /// By role: leader, follower.
    calls: [Counter; 2],
    in_flight: Gauge,
    followers: Option<Histogram>,
    events: Events,
}

const ROLES: [&str; 2] = ["leader", "follower"];

impl<R: Send + 'static> Hooks<Result<R, BoxError>, Shared<R>> for Arc<Instruments> {
    #[inline]
    fn joined(&self, role: Role) {
        match role {
            Role::Leader => {
                self.calls[0].increment(1);
                self.in_flight.increment(1.0);
            }
            Role::Follower => self.calls[1].increment(1),
        }
    }

    fn ended(&self, end: End, followers: u64) {
        self.in_flight.decrement(1.0);
        if let Some(h) = &self.followers {
            h.record(followers as f64);
        }
        match end {
            End::Completed if followers > 0 => {
                self.events.emit(|| EventKind::Coalesced { followers });
            }
            End::Panicked => self.events.emit(|| EventKind::Panicked),
            _ => {}
        }
    }

    fn complete(&self, out: Result<R, BoxError>) -> Shared<R> {
        out.map_err(|e| Failure::Inner(SharedError::new(self.name.clone(), e)))
    }

    fn panicked(&self) -> Shared<R> {
        Err(Failure::Panicked(BreakwaterError::new(
            ErrorKind::Panicked,
            LayerKind::Coalesce,
            self.name.clone(),
        )))
    }
}

/// State shared by a layer, its handle and every service it made.
pub(super) struct LayerState {
    instruments: Arc<Instruments>,
    /// One table per (key type, response type) the layer was applied to; services of the
    /// same types share one, so requests with equal keys coalesce across them.
    tables: Mutex<Vec<Arc<dyn AnyTable>>>,
}

impl fmt::Debug for LayerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerState")
            .field("name", &self.instruments.name)
            .field("tables", &self.tables.lock().len())
            .finish()
    }
}

impl LayerState {
    /// The table for keys `K` and responses `R`, made on first use. Called from
    /// `Layer::layer`, never per call.
    fn table<K, R>(&self) -> Arc<Slots<K, R>>
    where
        K: Hash + Eq + Send + 'static,
        R: Clone + Send + Sync + 'static,
    {
        let mut tables = self.tables.lock();
        for t in tables.iter() {
            if let Ok(found) = t.clone().as_any().downcast::<Slots<K, R>>() {
                return found;
            }
        }
        let table = Arc::new(Slots::<K, R>::new(self.instruments.clone()));
        tables.push(table.clone());
        table
    }

    fn stats(&self) -> Stats {
        let mut total = Stats::default();
        for t in self.tables.lock().iter() {
            total += t.stats();
        }
        total
    }
}

/// The builder's state before a key function is given.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKey;

/// Builds a [`CoalesceLayer`]; see the [module docs](crate::coalesce).
///
/// Required: [`key`](Self::key) (enforced at compile time: `build()` exists once a key
/// function is set).
#[must_use]
pub struct CoalesceBuilder<Req = (), K = (), F = NoKey> {
    common: Common,
    key: F,
    followers_histogram: bool,
    _types: PhantomData<fn(&Req) -> K>,
}

impl<Req, K, F> fmt::Debug for CoalesceBuilder<Req, K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceBuilder")
            .field("common", &self.common)
            .field("followers_histogram", &self.followers_histogram)
            .finish_non_exhaustive()
    }
}

impl Default for CoalesceBuilder {
    fn default() -> Self {
        CoalesceBuilder {
            common: Common::default(),
            key: NoKey,
            followers_histogram: false,
            _types: PhantomData,
        }
    }
}

impl<Req, K, F> CoalesceBuilder<Req, K, F> {
    common_builder_methods!();

    /// The key function: `f(&req)` is `Some(key)` for a request that may share a call, or
    /// `None` to pass it through uncoalesced (it gets its own call to the inner service, and
    /// is neither counted nor seen by the in-flight table). Requests with equal keys, made
    /// while a call for that key is in flight, share that call's result and are never sent
    /// upstream themselves.
    ///
    /// The key must capture everything that affects the response (method, path, query,
    /// relevant headers, the caller's identity where responses differ per caller). A layer
    /// applied to several routes coalesces across them when their keys are equal, so include
    /// what tells routes apart. Called once per call, in `call`, before anything else; keep
    /// it cheap (a `u64` or an `Arc<str>` key allocates nothing). It has the shape of the
    /// [cache's](crate::cache::CacheBuilder::key), so one function serves both layers; for
    /// HTTP, [`HttpKey::key`](crate::http::HttpKey::key) (`None` for unsafe methods):
    ///
    /// ```
    /// # #[cfg(feature = "http")] {
    /// use tower_breakwater::coalesce::CoalesceLayer;
    /// use tower_breakwater::http::HttpKey;
    ///
    /// let keys = HttpKey::new();
    /// let layer = CoalesceLayer::builder()
    ///     .key(move |req: &http::Request<()>| keys.key(req))
    ///     .build()
    ///     .unwrap();
    /// # drop(layer); }
    /// ```
    ///
    /// # Panics
    ///
    /// A panic of `f` unwinds out of the service's `call`, before the request joined any
    /// call (it is dropped; no state of the layer changed).
    pub fn key<Req2, K2, F2>(self, f: F2) -> CoalesceBuilder<Req2, K2, F2>
    where
        F2: Fn(&Req2) -> Option<K2> + Clone,
        K2: Hash + Eq + Send + 'static,
    {
        CoalesceBuilder {
            common: self.common,
            key: f,
            followers_histogram: self.followers_histogram,
            _types: PhantomData,
        }
    }

    /// Records `breakwater_coalesce_followers_per_call`, the number of followers of each
    /// shared call, when it ends (default off).
    pub fn followers_histogram(mut self, on: bool) -> Self {
        self.followers_histogram = on;
        self
    }
}

impl<Req, K, F> CoalesceBuilder<Req, K, F>
where
    F: Fn(&Req) -> Option<K> + Clone,
    K: Hash + Eq + Send + 'static,
{
    /// Validates the configuration, registers the metric handles with the current recorder
    /// and returns the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] when the name is empty.
    pub fn build(self) -> Result<CoalesceLayer<Req, K, F>, ConfigError> {
        let v = self.common.validator(LayerKind::Coalesce)?;
        let reg = self.common.registrar();
        let calls = ROLES.map(|r| reg.counter(&names::COALESCE_CALLS, &[("role", r)]));
        let in_flight = reg.gauge(&names::COALESCE_IN_FLIGHT, &[]);
        let followers = (self.followers_histogram && reg.enabled())
            .then(|| reg.histogram(&names::COALESCE_FOLLOWERS, &[]));
        let instruments = Instruments {
            name: v.name().clone(),
            calls,
            in_flight,
            followers,
            events: self.common.events(LayerKind::Coalesce),
        };
        let state = Arc::new(LayerState {
            instruments: Arc::new(instruments),
            tables: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&state);
        self.common.register_fn(move || {
            Some(
                CoalesceHandle {
                    state: weak.upgrade()?,
                }
                .snapshot(),
            )
        });
        Ok(CoalesceLayer {
            state,
            key: self.key,
            _types: PhantomData,
        })
    }
}

/// Coalesces concurrent identical requests into one upstream call; see the
/// [module docs](crate::coalesce).
///
/// `Req` is the request type and `K` the key type of the key function `F` (`Fn(&Req) ->
/// Option<K>`). Cheap to clone
/// (one `Arc` and the key function); every clone, and every service it makes, shares one
/// in-flight table per response type.
pub struct CoalesceLayer<Req, K, F> {
    state: Arc<LayerState>,
    key: F,
    _types: PhantomData<fn(&Req) -> K>,
}

impl<Req, K, F: Clone> Clone for CoalesceLayer<Req, K, F> {
    fn clone(&self) -> Self {
        CoalesceLayer {
            state: self.state.clone(),
            key: self.key.clone(),
            _types: PhantomData,
        }
    }
}

impl<Req, K, F> fmt::Debug for CoalesceLayer<Req, K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceLayer")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl CoalesceLayer<(), (), NoKey> {
    /// A builder with defaults: name `"default"`, no key function (required), the default
    /// metrics profile, no followers histogram, no listener.
    pub fn builder() -> CoalesceBuilder {
        CoalesceBuilder::default()
    }
}

impl<Req, K, F> CoalesceLayer<Req, K, F> {
    /// A handle to this instance's state, for snapshots.
    pub fn handle(&self) -> CoalesceHandle {
        CoalesceHandle {
            state: self.state.clone(),
        }
    }
}

impl<S, Req, K, F> Layer<S> for CoalesceLayer<Req, K, F>
where
    S: Service<Req>,
    S::Response: Clone + Send + Sync + 'static,
    K: Hash + Eq + Send + 'static,
    F: Clone,
{
    type Service = Coalesce<S, K, S::Response, F>;

    fn layer(&self, inner: S) -> Self::Service {
        let table = self.state.table::<K, S::Response>();
        Coalesce::new(inner, table, self.key.clone())
    }
}

/// A handle to one coalescing instance, for snapshots. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CoalesceHandle {
    state: Arc<LayerState>,
}

impl CoalesceHandle {
    /// The instance name.
    pub fn name(&self) -> &str {
        &self.state.instruments.name
    }

    /// Keys with a shared call in flight now, over every service of the layer.
    pub fn in_flight_keys(&self) -> u64 {
        self.state.stats().in_flight
    }

    /// A snapshot: kind `coalesce`, no state; counters `leaders` (calls that went upstream),
    /// `followers` (calls that shared a call in flight), `panics` (shared calls that
    /// panicked) and `abandoned` (shared calls dropped unfinished because every caller left),
    /// all since the layer was built; gauge `in_flight_keys`.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.state.stats();
        Snapshot::new(LayerKind::Coalesce, &self.state.instruments.name)
            .with_counter("leaders", s.leaders)
            .with_counter("followers", s.followers)
            .with_counter("panics", s.panics)
            .with_counter("abandoned", s.abandoned)
            .with_gauge("in_flight_keys", s.in_flight as f64)
    }
}
