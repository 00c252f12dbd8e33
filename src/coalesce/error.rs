use std::error::Error;
use std::fmt;
use std::sync::Arc;

use crate::error::{BoxError, BreakwaterError};

/// The inner service's error, as every caller of one coalesced call receives it.
///
/// A shared call has one error value and many callers, so the error is shared through an
/// `Arc` and each caller gets a `SharedError` pointing at it (boxed into the
/// [`BoxError`] the service returns). It is the error of *every* caller of a coalescing
/// service whose inner call failed, whether or not other callers actually shared that call,
/// so error handling does not depend on timing.
///
/// Reaching the inner error:
///
/// - [`source()`](Error::source) is the inner error, so [`error::find`](crate::error::find)
///   and any source-chain walker see through it (an inner timeout or rejection by one of our
///   layers is still found);
/// - [`SharedError::downcast_ref`] on the wrapper, or the free function
///   [`find_inner`](super::find_inner) on the returned `BoxError`, gives the inner error by its
///   concrete type;
/// - [`SharedError::inner_arc`] gives a clone of the `Arc` itself, to keep or to pass on.
///
/// Display names the instance only (`shared call of `name` failed`), following the Rust API
/// guidelines for errors with a source: print the chain to see the inner message.
///
/// Errors are never remembered: the next request for the key starts a new call.
#[derive(Clone)]
pub struct SharedError {
    name: Arc<str>,
    inner: Arc<BoxError>,
}

impl SharedError {
    pub(super) fn new(name: Arc<str>, inner: BoxError) -> Self {
        SharedError {
            name,
            inner: Arc::new(inner),
        }
    }

    /// The instance name of the coalescing layer.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The inner service's error (converted into a [`BoxError`]).
    pub fn inner(&self) -> &(dyn Error + Send + Sync + 'static) {
        &**self.inner
    }

    /// The inner error as an `E`, if it is one.
    pub fn downcast_ref<E: Error + 'static>(&self) -> Option<&E> {
        self.inner.downcast_ref::<E>()
    }

    /// The shared inner error itself, for callers that keep it beyond the response.
    pub fn inner_arc(&self) -> Arc<BoxError> {
        self.inner.clone()
    }
}

impl fmt::Debug for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedError")
            .field("name", &self.name)
            .field("inner", &self.inner)
            .finish()
    }
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shared call of `{}` failed", self.name)
    }
}

impl Error for SharedError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&**self.inner)
    }
}

/// Finds an error of type `E` in `err` or in its `source()` chain: the inner service's error
/// behind a [`SharedError`] (and behind any other wrapper that reports its source).
///
/// Takes `&(dyn Error + 'static)`, so pass `err.as_ref()` for a [`BoxError`].
///
/// ```
/// use tower_breakwater::coalesce::find_inner;
/// # let err: tower_breakwater::BoxError = Box::new(std::io::Error::other("refused"));
/// if let Some(io) = find_inner::<std::io::Error>(err.as_ref()) {
///     eprintln!("upstream I/O error: {io}");
/// }
/// ```
pub fn find_inner<'a, E: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a E> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// How a shared call failed, as stored for its callers.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The inner service's error.
    Inner(SharedError),
    /// The shared future panicked (kind [`Panicked`](crate::error::ErrorKind::Panicked)).
    Panicked(BreakwaterError),
}

impl Failure {
    pub(crate) fn into_box(self) -> BoxError {
        match self {
            Failure::Inner(e) => Box::new(e),
            Failure::Panicked(e) => Box::new(e),
        }
    }
}
