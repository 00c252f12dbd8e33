use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::core::{Config, Now, Shared};
use super::metrics::Metrics;
use super::window::{CountWindow, TimeWindow, Window};
use super::{CircuitBreaker, State};
use crate::classify::{DefaultClassifier, ReadsRetryAfter};
use crate::clock;
use crate::completion::AtResponse;
#[cfg(feature = "http")]
use crate::completion::WholeBody;
use crate::config::{Common, ConfigError, common_builder_methods};
use crate::error::LayerKind;
use crate::snapshot::Snapshot;
use crate::spare::Owner;

/// The largest count-based window, and the most buckets of a time-based one.
const MAX_WINDOW: u64 = 1 << 20;

/// The failure model a breaker uses in the Closed state (resilience4j's
/// `SlidingWindowType`, plus the consecutive-failures model of Polly's basic breaker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlidingWindow {
    /// The outcomes of the last `size` recorded calls, truly sliding: each new outcome
    /// evicts the oldest. `size` in `1..=1_048_576`.
    CountBased {
        /// Number of outcomes in the window.
        size: u64,
    },
    /// The outcomes recorded in the last `size`, kept in buckets of `granularity` (which
    /// must divide `size`, with at most 1,048,576 buckets). An outcome counts for at least
    /// `size - granularity` and at most `size` after it was recorded. Costs a clock read
    /// per recorded outcome, and every outcome takes the lock.
    TimeBased {
        /// Length of the window.
        size: Duration,
        /// Length of one bucket.
        granularity: Duration,
    },
    /// Open after `threshold` failures in a row (a success ends the run).
    ConsecutiveFailures {
        /// Failures in a row that open the breaker, `>= 1`.
        threshold: u64,
    },
}

impl SlidingWindow {
    /// A count-based window of the last `size` outcomes.
    pub fn count_based(size: u64) -> Self {
        SlidingWindow::CountBased { size }
    }

    /// A time-based window of the last `size`, in one-second buckets (resilience4j's
    /// granularity).
    pub fn time_based(size: Duration) -> Self {
        SlidingWindow::TimeBased {
            size,
            granularity: Duration::from_secs(1),
        }
    }

    /// A time-based window of the last `size`, in buckets of `granularity`.
    pub fn time_based_with_granularity(size: Duration, granularity: Duration) -> Self {
        SlidingWindow::TimeBased { size, granularity }
    }

    /// Open after `threshold` consecutive failures.
    pub fn consecutive_failures(threshold: u64) -> Self {
        SlidingWindow::ConsecutiveFailures { threshold }
    }
}

/// Builds a [`CircuitBreakerLayer`]; see the [module docs](crate::circuit_breaker) for the
/// semantics and the defaults.
#[derive(Debug)]
#[must_use]
pub struct CircuitBreakerBuilder<C = DefaultClassifier, M = AtResponse> {
    common: Common,
    window: SlidingWindow,
    failure_rate_threshold: f64,
    slow_call_rate_threshold: Option<f64>,
    slow_call_duration: Duration,
    minimum_calls: Option<u64>,
    permitted_in_half_open: u64,
    wait_in_open: Duration,
    backoff: Option<(f64, Duration)>,
    max_time_in_half_open: Option<Duration>,
    retry_after_hold: Option<Duration>,
    classifier: C,
    completion: M,
}

/// Default wait in Open, maximum time in HalfOpen and slow-call duration: 60 s.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

impl Default for CircuitBreakerBuilder {
    fn default() -> Self {
        CircuitBreakerBuilder {
            common: Common::default(),
            window: SlidingWindow::CountBased { size: 100 },
            failure_rate_threshold: 0.5,
            slow_call_rate_threshold: None,
            slow_call_duration: DEFAULT_WAIT,
            minimum_calls: None,
            permitted_in_half_open: 10,
            wait_in_open: DEFAULT_WAIT,
            backoff: None,
            max_time_in_half_open: Some(DEFAULT_WAIT),
            retry_after_hold: None,
            classifier: DefaultClassifier,
            completion: AtResponse,
        }
    }
}

impl<C, M> CircuitBreakerBuilder<C, M> {
    common_builder_methods!();

    /// The failure model in Closed (default: count-based, 100 outcomes).
    pub fn sliding_window(mut self, window: SlidingWindow) -> Self {
        self.window = window;
        self
    }

    /// The failure rate (failures / recorded calls, a ratio in `(0.0, 1.0]`) at or above
    /// which the breaker opens (default 0.5). Also decides half-open periods, in every model.
    pub fn failure_rate_threshold(mut self, ratio: f64) -> Self {
        self.failure_rate_threshold = ratio;
        self
    }

    /// Turns slow-call detection on: the slow-call rate (calls slower than
    /// [`slow_call_duration`](Self::slow_call_duration) / recorded calls, a ratio in
    /// `(0.0, 1.0]`) at or above which the breaker opens. Off by default. Not available with
    /// the consecutive-failures model. Costs two clock reads per call.
    pub fn slow_call_rate_threshold(mut self, ratio: f64) -> Self {
        self.slow_call_rate_threshold = Some(ratio);
        self
    }

    /// A call running longer than this is slow (default 60 s, must be > 0). Used only with
    /// [`slow_call_rate_threshold`](Self::slow_call_rate_threshold).
    pub fn slow_call_duration(mut self, duration: Duration) -> Self {
        self.slow_call_duration = duration;
        self
    }

    /// Recorded calls needed before any rate is evaluated, honoured before the window is
    /// full (default: the window size for a count-based window, 100 for a time-based one).
    /// Must be `>= 1`, and at most the size of a count-based window. Not available with the
    /// consecutive-failures model.
    pub fn minimum_calls(mut self, calls: u64) -> Self {
        self.minimum_calls = Some(calls);
        self
    }

    /// Probe calls per half-open period (default 10, must be `>= 1`): at most this many are
    /// admitted, and in flight, across all clones; their outcomes decide.
    pub fn permitted_calls_in_half_open(mut self, calls: u64) -> Self {
        self.permitted_in_half_open = calls;
        self
    }

    /// The wait in Open before probing (default 60 s, must be > 0); the first wait when
    /// [`exponential_wait`](Self::exponential_wait) is set. A wait ending more than about 584
    /// years after the build (such as `Duration::MAX`) is infinite: rejections carry no
    /// retry-after and only [`reset`](CircuitBreakerHandle::reset) closes the breaker.
    pub fn wait_in_open(mut self, wait: Duration) -> Self {
        self.wait_in_open = wait;
        self
    }

    /// Grows the wait across consecutive trips (trips with no Closed period between them):
    /// the k-th wait is `min(wait_in_open * multiplier^(k-1), max)`. `multiplier` must be
    /// finite and `>= 1.0`, `max >= wait_in_open`. Off by default (a fixed wait).
    pub fn exponential_wait(mut self, multiplier: f64, max: Duration) -> Self {
        self.backoff = Some((multiplier, max));
        self
    }

    /// The maximum time in HalfOpen (default 60 s, must be > 0), counted from the admission
    /// of the period's first probe: when it passes before the probes decide, the breaker
    /// reopens (at the next call, probe outcome or state read). A half-open period with no
    /// probe admitted never expires. `None` waits for the probes forever.
    pub fn max_time_in_half_open(mut self, max: Option<Duration>) -> Self {
        self.max_time_in_half_open = max;
        self
    }

    /// Turns the Retry-After hold on (off by default): when the response whose recorded
    /// outcome opens the breaker (a trip in Closed, or a reopening in HalfOpen) asks for a
    /// delay before the next call, the Open period lasts until that delay has passed, capped
    /// at `max` after the opening, if that is longer than the wait in Open (which it never
    /// shortens). The delay comes from the classifier's
    /// [`Classify::retry_after`](crate::classify::Classify::retry_after): with
    /// [`HttpClassifier`](crate::http::HttpClassifier), the `Retry-After` of a `429` or `503`
    /// response, in delay-seconds or as an HTTP-date (RFC 9110, section 10.2.3). `max` must be
    /// `> 0` and `>= wait_in_open` (a smaller cap could never hold anything); a server asking
    /// for a year is held for `max`. See the
    /// [module docs](crate::circuit_breaker#retry-after-hold).
    ///
    /// Only with a classifier that reports such a delay ([`ReadsRetryAfter`]), set before
    /// this call: with any other the hold could never hold, so this does not compile.
    ///
    /// ```compile_fail
    /// use std::time::Duration;
    /// use tower_breakwater::circuit_breaker::CircuitBreakerLayer;
    ///
    /// // The default classifier never reads Retry-After.
    /// let b = CircuitBreakerLayer::builder().retry_after_hold(Duration::from_secs(600));
    /// ```
    pub fn retry_after_hold(mut self, max: Duration) -> Self
    where
        C: ReadsRetryAfter,
    {
        self.retry_after_hold = Some(max);
        self
    }

    /// Replaces the classifier that decides whether a finished call is a success, a failure
    /// or ignored (default [`DefaultClassifier`]).
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerBuilder<C2, M> {
        self.retype(|_| classifier, |m| m)
    }

    /// For `http::Response` services: the call ends at the end of the response body, not at
    /// its headers (see [`WholeBody`] and [`Admission`](super::Admission)). Its outcome and
    /// its duration (for the slow-call threshold) are measured to the body's end; an error
    /// while reading the body is a failure; a half-open probe holds its slot until the body
    /// ends or is dropped; a body dropped before its end records the outcome the response was
    /// classified with, and the duration up to the drop. Requires the `http` feature.
    #[cfg(feature = "http")]
    pub fn whole_body(self) -> CircuitBreakerBuilder<C, WholeBody> {
        self.retype(|c| c, |_| WholeBody)
    }

    /// The same configuration with another classifier or completion mode.
    fn retype<C2, M2>(
        self,
        classifier: impl FnOnce(C) -> C2,
        completion: impl FnOnce(M) -> M2,
    ) -> CircuitBreakerBuilder<C2, M2> {
        CircuitBreakerBuilder {
            common: self.common,
            window: self.window,
            failure_rate_threshold: self.failure_rate_threshold,
            slow_call_rate_threshold: self.slow_call_rate_threshold,
            slow_call_duration: self.slow_call_duration,
            minimum_calls: self.minimum_calls,
            permitted_in_half_open: self.permitted_in_half_open,
            wait_in_open: self.wait_in_open,
            backoff: self.backoff,
            max_time_in_half_open: self.max_time_in_half_open,
            retry_after_hold: self.retry_after_hold,
            classifier: classifier(self.classifier),
            completion: completion(self.completion),
        }
    }

    /// Validates the configuration, registers the metric handles with the current recorder
    /// and returns the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field when: a threshold is outside `(0.0, 1.0]`; a
    /// window size, `minimum_calls` or `permitted_calls_in_half_open` is 0; `minimum_calls`
    /// exceeds a count-based window; a window is too large; a time window's granularity is 0
    /// or does not divide its size; a duration is 0; the wait multiplier is below 1.0 or not
    /// finite, or its maximum is below `wait_in_open`; the maximum of
    /// [`retry_after_hold`](Self::retry_after_hold) is 0 or below `wait_in_open`; `minimum_calls` or
    /// `slow_call_rate_threshold` is set with the consecutive-failures model; the name is
    /// empty.
    pub fn build(self) -> Result<CircuitBreakerLayer<C, M>, ConfigError> {
        let v = self.common.validator(LayerKind::CircuitBreaker)?;
        let failure_rate_threshold =
            v.ratio_open_closed("failure_rate_threshold", self.failure_rate_threshold)?;
        let slow_call_rate_threshold = self
            .slow_call_rate_threshold
            .map(|r| v.ratio_open_closed("slow_call_rate_threshold", r))
            .transpose()?;
        let slow_call_duration =
            v.positive_duration("slow_call_duration", self.slow_call_duration)?;
        let permitted_in_half_open =
            v.at_least_one("permitted_calls_in_half_open", self.permitted_in_half_open)?;
        let wait_in_open = v.positive_duration("wait_in_open", self.wait_in_open)?;
        if let Some((m, max)) = self.backoff {
            if !(m.is_finite() && m >= 1.0) {
                return Err(v.error("exponential_wait", m, "a finite multiplier >= 1.0"));
            }
            if max < wait_in_open {
                return Err(v.error("exponential_wait", max, "a maximum >= wait_in_open"));
            }
        }
        let retry_after_hold = self
            .retry_after_hold
            .map(|max| {
                let max = v.positive_duration("retry_after_hold", max)?;
                if max < wait_in_open {
                    return Err(v.error("retry_after_hold", max, "a maximum >= wait_in_open"));
                }
                Ok(max)
            })
            .transpose()?;
        let max_time_in_half_open = self
            .max_time_in_half_open
            .map(|d| v.positive_duration("max_time_in_half_open", d))
            .transpose()?;
        if let Some(m) = self.minimum_calls {
            v.at_least_one("minimum_calls", m)?;
        }
        let origin = clock::now();
        let (window, minimum_calls) = match self.window {
            SlidingWindow::CountBased { size } => {
                let size = v.at_least_one("sliding_window", size)?;
                if size > MAX_WINDOW {
                    return Err(v.error("sliding_window", size, "a count in 1..=1048576"));
                }
                let min = self.minimum_calls.unwrap_or(size);
                if min > size {
                    return Err(v.error(
                        "minimum_calls",
                        min,
                        "a count in 1..=the count-based window's size",
                    ));
                }
                (Window::Count(CountWindow::new(size as usize)), min)
            }
            SlidingWindow::TimeBased { size, granularity } => {
                let size = v.positive_duration("sliding_window", size)?;
                let granularity = v.positive_duration("sliding_window", granularity)?;
                let buckets = size.as_nanos() / granularity.as_nanos();
                if size.as_nanos() % granularity.as_nanos() != 0 {
                    return Err(v.error(
                        "sliding_window",
                        (size, granularity),
                        "a granularity that divides the window size",
                    ));
                }
                if buckets > u128::from(MAX_WINDOW) {
                    return Err(v.error(
                        "sliding_window",
                        (size, granularity),
                        "at most 1048576 buckets",
                    ));
                }
                let w = TimeWindow::new(origin, granularity, buckets as usize);
                (Window::Time(w), self.minimum_calls.unwrap_or(100))
            }
            SlidingWindow::ConsecutiveFailures { threshold } => {
                let limit = v.at_least_one("sliding_window", threshold)?;
                if let Some(m) = self.minimum_calls {
                    return Err(v.error(
                        "minimum_calls",
                        m,
                        "unset with the consecutive-failures model",
                    ));
                }
                if let Some(r) = slow_call_rate_threshold {
                    return Err(v.error(
                        "slow_call_rate_threshold",
                        r,
                        "unset with the consecutive-failures model",
                    ));
                }
                (Window::Consecutive { limit, run: 0 }, 1)
            }
        };
        let cfg = Config {
            failure_rate_threshold,
            slow_call_rate_threshold,
            slow_call_duration,
            minimum_calls,
            permitted_in_half_open,
            wait_in_open,
            backoff: self.backoff,
            max_time_in_half_open,
            retry_after_hold,
        };
        let reg = self.common.registrar();
        let metrics = Metrics::register(&reg, self.common.record_durations);
        let events = self.common.events(LayerKind::CircuitBreaker);
        let shared = Arc::new(Owner::new(Shared::new(
            cfg,
            window,
            v.name().clone(),
            metrics,
            events,
            origin,
        )));
        self.common.register(&shared);
        Ok(CircuitBreakerLayer {
            shared,
            classifier: self.classifier,
            completion: self.completion,
        })
    }
}

/// Puts a circuit breaker in front of a service; see the
/// [module docs](crate::circuit_breaker).
///
/// Cheap to clone (one `Arc`); every clone, and every service it makes, shares one breaker.
#[derive(Debug)]
pub struct CircuitBreakerLayer<C = DefaultClassifier, M = AtResponse> {
    shared: Arc<Owner<Shared>>,
    classifier: C,
    completion: M,
}

impl<C: Clone, M: Clone> Clone for CircuitBreakerLayer<C, M> {
    fn clone(&self) -> Self {
        CircuitBreakerLayer {
            shared: self.shared.clone(),
            classifier: self.classifier.clone(),
            completion: self.completion.clone(),
        }
    }
}

impl CircuitBreakerLayer {
    /// A builder with the defaults listed in the [module docs](crate::circuit_breaker#defaults).
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder::default()
    }
}

impl<C, M> CircuitBreakerLayer<C, M> {
    /// A handle to this breaker: state, snapshots, manual control.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, C: Clone, M: Clone> Layer<S> for CircuitBreakerLayer<C, M> {
    type Service = CircuitBreaker<S, C, M>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(
            inner,
            self.shared.clone(),
            self.classifier.clone(),
            self.completion.clone(),
        )
    }
}

/// A handle to one circuit breaker: its state, snapshots, and manual control. Cheap to
/// clone. Every method takes the breaker's lock briefly (events are emitted after it is
/// released, so a listener may call the handle).
#[derive(Debug, Clone)]
pub struct CircuitBreakerHandle {
    shared: Arc<Owner<Shared>>,
}

impl CircuitBreakerHandle {
    /// The instance name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The current state, after applying a transition that time has already made due (Open
    /// past its wait becomes HalfOpen; HalfOpen past its maximum time since its first probe
    /// becomes Open).
    pub fn state(&self) -> State {
        self.shared.state(&mut Now::lazy())
    }

    /// A snapshot (applying a due transition first, and bringing the state-time counter up
    /// to date): kind `circuit_breaker`, state as in [`State::as_str`]; gauges
    /// `failure_rate` and `slow_call_rate` (ratios in 0.0..=1.0 of the Closed window, of the
    /// probes in HalfOpen, of the outcomes that tripped it in Open), `calls_in_window`
    /// (recorded calls those rates are over), `time_in_state_seconds`, `probes_in_flight`,
    /// and with [`retry_after_hold`](CircuitBreakerBuilder::retry_after_hold) on,
    /// `retry_after_hold_seconds` (time left in a Retry-After hold, 0 when the breaker is not
    /// held Open); counter `rejected` (calls not permitted since the layer was built).
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot(&mut Now::lazy())
    }

    /// Moves to ForcedOpen: every call is rejected (without a retry-after) until
    /// [`reset`](Self::reset). Outcomes of calls admitted before are dropped.
    pub fn force_open(&self) {
        self.shared.force(State::ForcedOpen, &mut Now::lazy());
    }

    /// Moves to Disabled: every call passes and only the calls-by-outcome metrics record it,
    /// until [`reset`](Self::reset).
    pub fn disable(&self) {
        self.shared.force(State::Disabled, &mut Now::lazy());
    }

    /// Moves to Closed with an empty window, from any state (the wait in Open starts again
    /// from its first value). Outcomes of calls admitted before are dropped.
    pub fn reset(&self) {
        self.shared.force(State::Closed, &mut Now::lazy());
    }
}

/// The registry holds the owners' share weakly: a breaker whose layers, services and handles
/// are all dropped leaves it, whatever calls in flight or spare references remain.
impl crate::registry::SnapshotSource for Owner<Shared> {
    fn snapshot(&self) -> Snapshot {
        Shared::snapshot(self, &mut Now::lazy())
    }
}
