//! Outcome classification: one mechanism, shared by every layer, that turns a finished call
//! into [`Outcome::Success`], [`Outcome::Failure`] or [`Outcome::Ignored`].
//!
//! A layer classifies the inner service's result *after* converting its error into a
//! [`BoxError`], so one classifier works for every error type and for results that already
//! passed through other layers of ours. What each layer does with an outcome is its own
//! business (a breaker records failures in its window, a timeout counts them in a metric, a
//! cache stores only successes), but the decision is made here, once, by a [`Classify`]
//! value the user can replace.
//!
//! # The default
//!
//! [`DefaultClassifier`]: `Ok` is a success; an error is a failure, except a *rejection* by one
//! of our own layers further inside the stack (breaker open, bulkhead full, rate limited, too
//! many keys, shed; see [`ErrorKind::is_rejection`](crate::error::ErrorKind::is_rejection)),
//! which is ignored. So a spike rejected by an inner bulkhead does not open an outer breaker:
//! the dependency did not fail, we never called it. A timeout, and a panic caught by
//! coalescing, are failures.
//!
//! # Custom classifiers
//!
//! Any `Fn(Result<&Res, &BoxError>) -> Outcome + Clone + Send + Sync + 'static` is a
//! classifier through [`classify_fn`]:
//!
//! ```
//! use tower_breakwater::classify::{classify_fn, Classify, Outcome};
//!
//! // A response type carrying a status code: 5xx is a failure.
//! struct Resp { status: u16 }
//! let c = classify_fn(|r: Result<&Resp, &tower_breakwater::BoxError>| match r {
//!     Ok(resp) if resp.status >= 500 => Outcome::Failure,
//!     Ok(_) => Outcome::Success,
//!     Err(e) => tower_breakwater::classify::DefaultClassifier.classify_error(e),
//! });
//! assert_eq!(c.classify(Ok(&Resp { status: 503 })), Outcome::Failure);
//! assert_eq!(c.classify(Ok(&Resp { status: 200 })), Outcome::Success);
//! ```

use crate::error::{self, BoxError};

/// The class of a finished call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The dependency did its job.
    Success,
    /// The dependency failed (an error, a timeout, or a response the classifier calls bad).
    Failure,
    /// Neither: the call says nothing about the dependency's health (for example a rejection
    /// by one of our layers further inside the stack). Layers do not record ignored calls
    /// in failure statistics.
    Ignored,
}

impl Outcome {
    /// A stable, lower-case identifier (`"success"`, `"failure"`, `"ignored"`), as used in
    /// metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Ignored => "ignored",
        }
    }
}

/// Decides the [`Outcome`] of a finished call whose response type is `Res`.
///
/// Called once per finished call, on the hot path: implementations should be cheap and must
/// not panic (a panic propagates to the caller whose future was being polled).
pub trait Classify<Res>: Clone + Send + Sync + 'static {
    /// Classifies a result. The error has already been converted into a [`BoxError`].
    fn classify(&self, result: Result<&Res, &BoxError>) -> Outcome;

    /// The delay the dependency asked for before it is called again, measured from now
    /// (for HTTP, the `Retry-After` of a `429` or `503` response, RFC 9110 section 10.2.3);
    /// `None` (the default) when the result asks for none.
    ///
    /// Read only by a circuit breaker with
    /// [`retry_after_hold`](crate::circuit_breaker::CircuitBreakerBuilder::retry_after_hold)
    /// on, and only for a result this classifier called [`Outcome::Failure`] that the
    /// breaker may still record (never for a success, never under a lock). An
    /// implementation should read a clock only when it needs one (an HTTP-date).
    #[inline]
    fn retry_after(&self, result: Result<&Res, &BoxError>) -> Option<std::time::Duration> {
        let _ = result;
        None
    }
}

/// A classifier whose [`Classify::retry_after`] reports the delay a result asks for (for
/// HTTP, the `Retry-After` of a `429` or `503` response), as a circuit breaker's
/// [`retry_after_hold`](crate::circuit_breaker::CircuitBreakerBuilder::retry_after_hold)
/// requires: with a classifier that never reports one, the hold could never hold anything,
/// so turning it on is a compile-time error rather than a setting that silently does
/// nothing.
///
/// A marker with no methods. Implemented by [`HttpClassifier`](crate::http::HttpClassifier);
/// not by [`DefaultClassifier`] nor by [`classify_fn`] classifiers (whose `retry_after` is
/// always `None`). Implement it for a classifier of your own that overrides
/// [`Classify::retry_after`].
///
/// ```
/// # #[cfg(feature = "circuit-breaker")] {
/// use std::time::Duration;
/// use tower_breakwater::BoxError;
/// use tower_breakwater::circuit_breaker::CircuitBreakerLayer;
/// use tower_breakwater::classify::{Classify, DefaultClassifier, Outcome, ReadsRetryAfter};
///
/// /// Replies carry the seconds to wait when the dependency is overloaded.
/// struct Reply { overloaded_for: Option<u64> }
///
/// #[derive(Clone)]
/// struct Backpressure;
///
/// impl Classify<Reply> for Backpressure {
///     fn classify(&self, r: Result<&Reply, &BoxError>) -> Outcome {
///         match r {
///             Ok(reply) if reply.overloaded_for.is_some() => Outcome::Failure,
///             Ok(_) => Outcome::Success,
///             Err(e) => DefaultClassifier.classify_error(e),
///         }
///     }
///     fn retry_after(&self, r: Result<&Reply, &BoxError>) -> Option<Duration> {
///         r.ok()?.overloaded_for.map(Duration::from_secs)
///     }
/// }
///
/// impl ReadsRetryAfter for Backpressure {}
///
/// let layer = CircuitBreakerLayer::builder()
///     .classifier(Backpressure)
///     .retry_after_hold(Duration::from_secs(600))
///     .build();
/// assert!(layer.is_ok());
/// # }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` never reports a Retry-After delay, so a Retry-After hold would never hold",
    label = "the classifier set when `.retry_after_hold(..)` is called",
    note = "set a classifier that reads it first, e.g. `.classifier(HttpClassifier::new()).retry_after_hold(max)`; a classifier of your own that overrides `Classify::retry_after` implements `ReadsRetryAfter`"
)]
pub trait ReadsRetryAfter {}

/// The default classifier: `Ok` is [`Outcome::Success`]; an error is [`Outcome::Failure`],
/// except rejections by our own layers, which are [`Outcome::Ignored`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefaultClassifier;

impl DefaultClassifier {
    /// The default rule for an error alone: [`Outcome::Ignored`] for a rejection by one of our
    /// layers, [`Outcome::Failure`] for anything else (timeouts included). Useful inside a
    /// custom classifier that only changes how responses are judged.
    pub fn classify_error(&self, err: &BoxError) -> Outcome {
        if error::is_rejection(err.as_ref()) {
            Outcome::Ignored
        } else {
            Outcome::Failure
        }
    }
}

impl<Res> Classify<Res> for DefaultClassifier {
    #[inline]
    fn classify(&self, result: Result<&Res, &BoxError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) => self.classify_error(e),
        }
    }
}

/// A classifier made from a closure; see [`classify_fn`].
#[derive(Debug, Clone, Copy)]
pub struct ClassifyFn<F>(F);

/// Makes a classifier from a closure `Fn(Result<&Res, &BoxError>) -> Outcome`.
pub fn classify_fn<F>(f: F) -> ClassifyFn<F> {
    ClassifyFn(f)
}

impl<Res, F> Classify<Res> for ClassifyFn<F>
where
    F: Fn(Result<&Res, &BoxError>) -> Outcome + Clone + Send + Sync + 'static,
{
    #[inline]
    fn classify(&self, result: Result<&Res, &BoxError>) -> Outcome {
        (self.0)(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{BreakwaterError, ErrorKind, LayerKind};

    fn ours(kind: ErrorKind) -> BoxError {
        Box::new(BreakwaterError::new(kind, LayerKind::Bulkhead, "inner"))
    }

    #[test]
    fn default_ignores_inner_rejections_and_fails_the_rest() {
        let c = DefaultClassifier;
        assert_eq!(Classify::<u8>::classify(&c, Ok(&1)), Outcome::Success);
        for kind in [
            ErrorKind::CircuitOpen,
            ErrorKind::BulkheadFull,
            ErrorKind::RateLimited,
            ErrorKind::TooManyKeys,
            ErrorKind::Shed,
        ] {
            assert_eq!(
                Classify::<u8>::classify(&c, Err(&ours(kind))),
                Outcome::Ignored,
                "{kind}"
            );
        }
        assert_eq!(
            Classify::<u8>::classify(&c, Err(&ours(ErrorKind::Timeout))),
            Outcome::Failure
        );
        assert_eq!(
            Classify::<u8>::classify(&c, Err(&ours(ErrorKind::Panicked))),
            Outcome::Failure
        );
        let inner: BoxError = "boom".into();
        assert_eq!(Classify::<u8>::classify(&c, Err(&inner)), Outcome::Failure);
    }
}
