//! The error model shared by every layer.
//!
//! # The decision
//!
//! Every service produced by a tower-breakwater layer has `Error = `[`BoxError`]
//! (`Box<dyn std::error::Error + Send + Sync>`), tower's own convention. The inner service's error
//! type only has to be `Into<BoxError>`; an inner error that already is a `BoxError` passes
//! through untouched (no second box), so stacking any number of our layers gives the caller one
//! error type, not `Error<Error<Error<E>>>`.
//!
//! Errors that one of our layers produces itself (a rejection by an open breaker, a full
//! bulkhead, a rate limiter, a load shedder; a timeout) are all one concrete type,
//! [`BreakwaterError`], carrying its [`ErrorKind`], the [`LayerKind`] that produced it, the
//! instance name and, where it has one, the time until a retry can succeed. Telling it apart
//! from the inner service's own error is one call: [`find`] (it also looks through the
//! `source()` chain, in case a layer of someone else wrapped it). The inner service's error
//! stays reachable by `err.downcast_ref::<E>()` on the returned `BoxError`.
//!
//! Why not a typed enum such as `Error<E> { Inner(E), Rejected(..) }`? Because each layer would
//! nest the one inside it, which makes types unwritable after three layers and forces every
//! caller to match on the exact stack order. The price of boxing is one allocation when an
//! error is produced, never on the success path.
//!
//! ```
//! use tower_breakwater::error::{self, BoxError, ErrorKind};
//!
//! fn describe(err: &BoxError) -> String {
//!     match error::find(err.as_ref()) {
//!         Some(e) if e.kind() == ErrorKind::Timeout => format!("{} timed out", e.name()),
//!         Some(e) => format!("rejected by {}: {}", e.name(), e.kind()),
//!         None => format!("dependency failed: {err}"),
//!     }
//! }
//! # let _ = describe;
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A type-erased error: tower's convention, and the `Error` type of every service in this crate.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which kind of layer produced a [`BreakwaterError`], an [`Event`](crate::event::Event) or a
/// [`Snapshot`](crate::snapshot::Snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum LayerKind {
    /// [`timeout`](crate::timeout).
    Timeout,
    /// The circuit breaker.
    CircuitBreaker,
    /// The bulkhead (concurrency limit and load shedding).
    Bulkhead,
    /// The rate limiter (shared or keyed GCRA).
    RateLimiter,
    /// Request coalescing (singleflight).
    Coalesce,
    /// The response cache.
    Cache,
}

impl LayerKind {
    /// The kind as a stable, lower-case identifier (`"timeout"`, `"circuit_breaker"`,
    /// `"bulkhead"`, `"rate_limiter"`, `"coalesce"`, `"cache"`), as used in metric names,
    /// snapshots and events.
    pub const fn as_str(self) -> &'static str {
        match self {
            LayerKind::Timeout => "timeout",
            LayerKind::CircuitBreaker => "circuit_breaker",
            LayerKind::Bulkhead => "bulkhead",
            LayerKind::RateLimiter => "rate_limiter",
            LayerKind::Coalesce => "coalesce",
            LayerKind::Cache => "cache",
        }
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened, for an error produced by one of our layers.
///
/// All kinds but [`Timeout`](ErrorKind::Timeout) and [`Panicked`](ErrorKind::Panicked) are
/// *rejections*: the layer refused the call without running it (see
/// [`is_rejection`](ErrorKind::is_rejection)). The default classifier ignores rejections that
/// come from a layer further inside the stack, and counts timeouts and panics as failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The circuit breaker is open (or forced open, or half-open with every probe slot taken).
    CircuitOpen,
    /// The bulkhead had no permit free and the call could not wait for one.
    BulkheadFull,
    /// The rate limiter had no capacity and the call could not wait for it.
    RateLimited,
    /// A keyed limiter already tracks its maximum number of keys and refused a new key.
    TooManyKeys,
    /// A load shedder refused the call.
    Shed,
    /// The call did not finish before its deadline; it was cancelled.
    Timeout,
    /// The call panicked while shared with other callers (coalescing); the panic was caught
    /// so that no other caller hangs.
    Panicked,
}

impl ErrorKind {
    /// `true` for kinds where the layer refused the call without running it.
    pub const fn is_rejection(self) -> bool {
        !matches!(self, ErrorKind::Timeout | ErrorKind::Panicked)
    }

    /// A stable, lower-case identifier (`"circuit_open"`, `"bulkhead_full"`, `"rate_limited"`,
    /// `"too_many_keys"`, `"shed"`, `"timeout"`, `"panicked"`), as used in metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::BulkheadFull => "bulkhead_full",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::TooManyKeys => "too_many_keys",
            ErrorKind::Shed => "shed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Panicked => "panicked",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error produced by one of tower-breakwater's layers (never by the inner service).
///
/// Cheap to build: the instance name is shared (`Arc<str>`), so making one costs no
/// allocation; boxing it into a [`BoxError`] is the one allocation of a rejection path.
#[derive(Debug, Clone)]
pub struct BreakwaterError {
    kind: ErrorKind,
    layer: LayerKind,
    name: Arc<str>,
    retry_after: Option<Duration>,
    elapsed: Option<Duration>,
}

impl BreakwaterError {
    /// Builds an error of `kind`, as produced by a layer of kind `layer` named `name`.
    ///
    /// Public so that a layer of your own (a custom load shedder, say) can reject calls in a
    /// way our classifiers recognise: an error of a rejection kind from a layer inside a
    /// breaker is ignored by the breaker's default classifier.
    pub fn new(kind: ErrorKind, layer: LayerKind, name: impl Into<Arc<str>>) -> Self {
        BreakwaterError {
            kind,
            layer,
            name: name.into(),
            retry_after: None,
            elapsed: None,
        }
    }

    /// Sets the time from the rejection until a retry can succeed; see
    /// [`retry_after`](Self::retry_after).
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Sets how long the call ran before it was cut off; see [`elapsed`](Self::elapsed).
    pub fn with_elapsed(mut self, elapsed: Duration) -> Self {
        self.elapsed = Some(elapsed);
        self
    }

    /// What happened.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The kind of layer that produced this error.
    pub fn layer(&self) -> LayerKind {
        self.layer
    }

    /// The instance name of the layer that produced this error (`"default"` unless the
    /// layer's builder was given a name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `true` when the layer refused the call without running it; see
    /// [`ErrorKind::is_rejection`].
    pub fn is_rejection(&self) -> bool {
        self.kind.is_rejection()
    }

    /// The time from the rejection until a retry can succeed, where the layer knows it: the
    /// time left in an open breaker's wait, or until a rate limiter's next permit. Suitable
    /// for an HTTP `Retry-After` (round up to whole seconds). `None` where unknown.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// For [`ErrorKind::Timeout`]: how long the call ran before it was cancelled (the
    /// deadline that applied to it). `None` for other kinds.
    pub fn elapsed(&self) -> Option<Duration> {
        self.elapsed
    }
}

impl fmt::Display for BreakwaterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::CircuitOpen => write!(f, "circuit breaker `{}` is open", self.name)?,
            ErrorKind::BulkheadFull => write!(f, "bulkhead `{}` is full", self.name)?,
            ErrorKind::RateLimited => write!(f, "rate limiter `{}` has no capacity", self.name)?,
            ErrorKind::TooManyKeys => write!(
                f,
                "rate limiter `{}` tracks its maximum number of keys",
                self.name
            )?,
            ErrorKind::Shed => write!(f, "`{}` shed the call ({})", self.name, self.layer)?,
            ErrorKind::Timeout => write!(f, "timeout `{}` elapsed", self.name)?,
            ErrorKind::Panicked => write!(f, "shared call of `{}` panicked", self.name)?,
        }
        if let Some(d) = self.elapsed {
            write!(f, " after {d:?}")?;
        }
        if let Some(d) = self.retry_after {
            write!(f, "; retry after {d:?}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BreakwaterError {}

/// Finds the [`BreakwaterError`] in `err` or in its `source()` chain, if one of our layers
/// produced it; `None` if the error is the inner service's own.
///
/// Takes `&(dyn Error + 'static)`, so pass `err.as_ref()` for a [`BoxError`].
pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a BreakwaterError> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<BreakwaterError>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// `true` if `err` (or its `source()` chain) is a rejection by one of our layers; see
/// [`ErrorKind::is_rejection`]. Timeouts are not rejections.
pub fn is_rejection(err: &(dyn std::error::Error + 'static)) -> bool {
    find(err).is_some_and(BreakwaterError::is_rejection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(BoxError);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(self.0.as_ref())
        }
    }

    #[test]
    fn find_looks_through_the_source_chain() {
        let inner: BoxError = Box::new(
            BreakwaterError::new(ErrorKind::RateLimited, LayerKind::RateLimiter, "api")
                .with_retry_after(Duration::from_millis(250)),
        );
        let outer: BoxError = Box::new(Wrapper(inner));
        let found = find(outer.as_ref()).expect("found through source()");
        assert_eq!(found.kind(), ErrorKind::RateLimited);
        assert_eq!(found.name(), "api");
        assert_eq!(found.retry_after(), Some(Duration::from_millis(250)));
        assert!(is_rejection(outer.as_ref()));
    }

    #[test]
    fn inner_errors_are_not_ours() {
        let err: BoxError = "connection refused".into();
        assert!(find(err.as_ref()).is_none());
        assert!(!is_rejection(err.as_ref()));
    }

    #[test]
    fn timeout_and_panic_are_not_rejections() {
        assert!(!ErrorKind::Timeout.is_rejection());
        assert!(!ErrorKind::Panicked.is_rejection());
        for k in [
            ErrorKind::CircuitOpen,
            ErrorKind::BulkheadFull,
            ErrorKind::RateLimited,
            ErrorKind::TooManyKeys,
            ErrorKind::Shed,
        ] {
            assert!(k.is_rejection(), "{k}");
        }
    }

    #[test]
    fn display_names_instance_and_durations() {
        let e = BreakwaterError::new(ErrorKind::Timeout, LayerKind::Timeout, "db")
            .with_elapsed(Duration::from_millis(100));
        assert_eq!(e.to_string(), "timeout `db` elapsed after 100ms");
    }
}
