use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ::metrics::{Counter, Histogram};
use tower::Layer;

use super::Timeout;
use crate::classify::{DefaultClassifier, Outcome};
use crate::completion::AtResponse;
#[cfg(feature = "http")]
use crate::completion::WholeBody;
use crate::config::{Common, ConfigError, common_builder_methods};
use crate::error::{BoxError, BreakwaterError, ErrorKind, LayerKind};
use crate::event::{EventKind, Events};
use crate::metrics::names;
use crate::registry::SnapshotSource;
use crate::snapshot::Snapshot;
use crate::spare::Owner;

/// How a [`Timeout`] picks the deadline of a request.
pub trait TimeoutPolicy<Req>: Clone {
    /// The deadline for `req`, given the layer's configured `default`.
    fn timeout_for(&self, req: &Req, default: Duration) -> Duration;
}

/// The policy of a plain [`TimeoutLayer`]: every request gets the layer's `timeout`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedTimeout;

impl<Req> TimeoutPolicy<Req> for FixedTimeout {
    #[inline]
    fn timeout_for(&self, _req: &Req, default: Duration) -> Duration {
        default
    }
}

/// A per-request deadline: `F: Fn(&Req) -> Option<Duration>`, where `None` falls back to the
/// layer's `timeout`. Made by [`TimeoutBuilder::per_request`]. A per-request zero duration
/// is allowed: the inner service gets one poll, then the call times out.
#[derive(Clone, Copy)]
pub struct PerRequest<F>(F);

impl<F> fmt::Debug for PerRequest<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PerRequest(..)")
    }
}

impl<Req, F> TimeoutPolicy<Req> for PerRequest<F>
where
    F: Fn(&Req) -> Option<Duration> + Clone,
{
    #[inline]
    fn timeout_for(&self, req: &Req, default: Duration) -> Duration {
        (self.0)(req).unwrap_or(default)
    }
}

/// Metric handles of one timeout instance, registered at build time.
#[derive(Debug)]
pub(super) struct TimeoutMetrics {
    /// Indexed by [`outcome_index`].
    calls: [Counter; 4],
    durations: Option<[Histogram; 4]>,
}

const OUTCOMES: [&str; 4] = ["success", "failure", "ignored", "timeout"];
pub(super) const FAILED: usize = 1;
pub(super) const TIMED_OUT: usize = 3;

pub(super) fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Success => 0,
        Outcome::Failure => 1,
        Outcome::Ignored => 2,
    }
}

/// State shared by a layer, its services and their futures. Layers, services and handles
/// hold it through an [`Owner`]; calls hold a spare reference (see [`spare`](crate::spare)).
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) name: Arc<str>,
    pub(super) timeout: Duration,
    pub(super) metrics: TimeoutMetrics,
    pub(super) events: Events,
    timeouts: AtomicU64,
    /// Set when the last layer, service and handle is dropped.
    closed: AtomicBool,
}

crate::spare::impl_spare!(Shared, closed);

impl Shared {
    /// `true` when every call's duration is measured.
    #[inline]
    pub(super) fn records_durations(&self) -> bool {
        self.metrics.durations.is_some()
    }

    /// Counts a finished call; `elapsed` is `Some` when durations are recorded.
    #[inline]
    pub(super) fn record(&self, outcome: usize, elapsed: Option<Duration>) {
        self.metrics.calls[outcome].increment(1);
        if let (Some(h), Some(d)) = (&self.metrics.durations, elapsed) {
            h[outcome].record(d.as_secs_f64());
        }
        if outcome == TIMED_OUT {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a call cut off by its deadline `timeout` and returns the caller's error.
    pub(super) fn timed_out(&self, timeout: Duration, elapsed: Option<Duration>) -> BoxError {
        self.record(TIMED_OUT, elapsed);
        self.events.emit(|| EventKind::TimedOut { after: timeout });
        Box::new(
            BreakwaterError::new(ErrorKind::Timeout, LayerKind::Timeout, self.name.clone())
                .with_elapsed(timeout),
        )
    }
}

/// Builds a [`TimeoutLayer`]; see the [module docs](crate::timeout).
///
/// Required: [`timeout`](Self::timeout) (a duration > 0).
#[derive(Debug)]
#[must_use]
pub struct TimeoutBuilder<P = FixedTimeout, C = DefaultClassifier, M = AtResponse> {
    common: Common,
    timeout: Option<Duration>,
    policy: P,
    classifier: C,
    completion: M,
}

impl Default for TimeoutBuilder {
    fn default() -> Self {
        TimeoutBuilder {
            common: Common::default(),
            timeout: None,
            policy: FixedTimeout,
            classifier: DefaultClassifier,
            completion: AtResponse,
        }
    }
}

impl<P, C, M> TimeoutBuilder<P, C, M> {
    common_builder_methods!();

    /// The deadline of each call, from the first poll of its response future. Must be > 0.
    /// A duration too large to add to tokio's current instant (such as `Duration::MAX`)
    /// means no deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Computes the deadline per request: `f(&req)` returns `Some(duration)` to override the
    /// layer's [`timeout`](Self::timeout) for that request, `None` to keep it. `f` is called
    /// once per call, in `call`.
    pub fn per_request<Req, F>(self, f: F) -> TimeoutBuilder<PerRequest<F>, C, M>
    where
        F: Fn(&Req) -> Option<Duration> + Clone,
    {
        TimeoutBuilder {
            common: self.common,
            timeout: self.timeout,
            policy: PerRequest(f),
            classifier: self.classifier,
            completion: self.completion,
        }
    }

    /// For `http::Response` services: the call ends at the end of the response body, not at
    /// its headers, so the deadline covers the whole body: a body still unfinished when it
    /// passes is cut off with a timeout error (see [`WholeBody`] and [`Deadline`]).
    /// Requires the `http` feature.
    ///
    /// [`Deadline`]: super::Deadline
    #[cfg(feature = "http")]
    pub fn whole_body(self) -> TimeoutBuilder<P, C, WholeBody> {
        TimeoutBuilder {
            common: self.common,
            timeout: self.timeout,
            policy: self.policy,
            classifier: self.classifier,
            completion: WholeBody,
        }
    }

    /// Replaces the classifier that decides the `outcome` label of finished calls (default
    /// [`DefaultClassifier`]).
    pub fn classifier<C2>(self, classifier: C2) -> TimeoutBuilder<P, C2, M> {
        TimeoutBuilder {
            common: self.common,
            timeout: self.timeout,
            policy: self.policy,
            classifier,
            completion: self.completion,
        }
    }

    /// Validates the configuration, registers the metric handles with the current recorder
    /// and returns the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field when `timeout` is unset or zero, or the name is
    /// empty.
    pub fn build(self) -> Result<TimeoutLayer<P, C, M>, ConfigError> {
        let v = self.common.validator(LayerKind::Timeout)?;
        let timeout = v.required("timeout", self.timeout, "a duration > 0")?;
        let timeout = v.positive_duration("timeout", timeout)?;
        let reg = self.common.registrar();
        let calls = OUTCOMES.map(|o| reg.counter(&names::TIMEOUT_CALLS, &[("outcome", o)]));
        let durations = reg
            .durations(LayerKind::Timeout, self.common.record_durations)
            .then(|| {
                OUTCOMES.map(|o| reg.histogram(&names::TIMEOUT_CALL_DURATION, &[("outcome", o)]))
            });
        let shared = Shared {
            name: v.name().clone(),
            timeout,
            metrics: TimeoutMetrics { calls, durations },
            events: self.common.events(LayerKind::Timeout),
            timeouts: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        };
        let shared = Arc::new(Owner::new(shared));
        self.common.register(&shared);
        Ok(TimeoutLayer {
            shared,
            policy: self.policy,
            classifier: self.classifier,
            completion: self.completion,
        })
    }
}

/// Applies a per-call deadline to a service; see the [module docs](crate::timeout).
///
/// Cheap to clone (one `Arc`); every clone, and every service it makes, shares one state.
#[derive(Debug)]
pub struct TimeoutLayer<P = FixedTimeout, C = DefaultClassifier, M = AtResponse> {
    pub(super) shared: Arc<Owner<Shared>>,
    policy: P,
    classifier: C,
    completion: M,
}

impl<P: Clone, C: Clone, M: Clone> Clone for TimeoutLayer<P, C, M> {
    fn clone(&self) -> Self {
        TimeoutLayer {
            shared: self.shared.clone(),
            policy: self.policy.clone(),
            classifier: self.classifier.clone(),
            completion: self.completion.clone(),
        }
    }
}

impl TimeoutLayer {
    /// A builder with defaults: name `"default"`, no timeout set (required), the default
    /// classifier and metrics profile, no duration histogram, no listener.
    pub fn builder() -> TimeoutBuilder {
        TimeoutBuilder::default()
    }

    /// Shorthand for `TimeoutLayer::builder().timeout(timeout).build()`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] when `timeout` is zero.
    pub fn new(timeout: Duration) -> Result<Self, ConfigError> {
        Self::builder().timeout(timeout).build()
    }
}

impl<P, C, M> TimeoutLayer<P, C, M> {
    /// A handle to this instance's state, for snapshots.
    pub fn handle(&self) -> TimeoutHandle {
        TimeoutHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, P: Clone, C: Clone, M: Clone> Layer<S> for TimeoutLayer<P, C, M> {
    type Service = Timeout<S, P, C, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::new(
            inner,
            self.shared.clone(),
            self.policy.clone(),
            self.classifier.clone(),
            self.completion.clone(),
        )
    }
}

/// A handle to one timeout instance, for snapshots. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TimeoutHandle {
    shared: Arc<Owner<Shared>>,
}

impl TimeoutHandle {
    /// The instance name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The configured default deadline.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// A snapshot: kind `timeout`, no state, counter `timeouts` (calls cancelled by the
    /// deadline since the layer was built), gauge `timeout_seconds` (the configured default).
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }
}

/// The registry holds the owners' share weakly: a timeout whose layers, services and handles
/// are all dropped leaves it, whatever calls in flight or spare references remain.
impl SnapshotSource for Owner<Shared> {
    fn snapshot(&self) -> Snapshot {
        Snapshot::new(LayerKind::Timeout, &self.name)
            .with_counter("timeouts", self.timeouts.load(Ordering::Relaxed))
            .with_gauge("timeout_seconds", self.timeout.as_secs_f64())
    }
}
