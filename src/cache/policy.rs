//! The policies a builder is given: TTL ([`TtlConfig`], [`TtlPolicy`]) and per-entry
//! maximum staleness ([`StalenessPolicy`]), sealed.

use std::sync::Arc;
use std::time::Duration;

use super::store::{StaleFn, TtlPolicy};

/// The builder's state before a key function, a TTL or a staleness function is given (no
/// staleness function: every entry's maximum staleness is the configured one).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unset;

/// A fixed TTL, set by [`CacheBuilder::ttl`](super::CacheBuilder::ttl).
#[derive(Debug, Clone, Copy)]
pub struct FixedTtl(pub(super) Duration);

impl<Res> TtlPolicy<Res> for FixedTtl {
    #[inline]
    fn ttl(&self, _res: &Res) -> Option<Duration> {
        Some(self.0)
    }
}

/// A TTL computed from the response, set by
/// [`CacheBuilder::ttl_fn`](super::CacheBuilder::ttl_fn).
#[derive(Debug, Clone, Copy)]
pub struct TtlFn<G>(pub(super) G);

/// A per-response maximum staleness, set by
/// [`CacheBuilder::staleness_fn`](super::CacheBuilder::staleness_fn).
#[derive(Debug, Clone, Copy)]
pub struct StalenessFn<G>(pub(super) G);

impl<Res, G> TtlPolicy<Res> for TtlFn<G>
where
    G: Fn(&Res) -> Option<Duration> + Clone + Send + Sync + 'static,
{
    #[inline]
    fn ttl(&self, res: &Res) -> Option<Duration> {
        (self.0)(res)
    }
}

/// Seals the cache's policy traits: only the builder's own types implement them.
mod sealed {
    pub trait Sealed {}
}
pub(crate) use sealed::Sealed;

impl Sealed for Unset {}
impl Sealed for FixedTtl {}
impl<G> Sealed for TtlFn<G> {}
impl<G> Sealed for StalenessFn<G> {}

/// The TTL state of a builder (checked at `build()`): [`Unset`], [`FixedTtl`] or [`TtlFn`].
/// Sealed: it only names the builder's states, as a bound.
pub trait TtlConfig: Sealed {
    /// `None` when unset; `Some(Some(ttl))` for a fixed TTL; `Some(None)` for a function.
    #[doc(hidden)]
    fn fixed(&self) -> Option<Option<Duration>>;
}

/// A per-response maximum staleness: [`Unset`] (the configured
/// [`max_staleness`](super::CacheBuilder::max_staleness) for every entry) or
/// [`StalenessFn`] (from [`staleness_fn`](super::CacheBuilder::staleness_fn)). Sealed.
///
/// Called once per upstream result that is stored (after the [`TtlPolicy`]), on the task
/// that drove the upstream call; never on the hit path. A panic is a panic of the fetch,
/// as for [`TtlPolicy::ttl`].
pub trait StalenessPolicy<Res>: Sealed + Clone + Send + Sync + 'static {
    /// The function the store calls, or `None` for [`Unset`].
    #[doc(hidden)]
    fn function(&self) -> Option<StaleFn<Res>>;
}

impl<Res> StalenessPolicy<Res> for Unset {
    fn function(&self) -> Option<StaleFn<Res>> {
        None
    }
}

impl<Res, G> StalenessPolicy<Res> for StalenessFn<G>
where
    G: Fn(&Res) -> Option<Duration> + Clone + Send + Sync + 'static,
{
    fn function(&self) -> Option<StaleFn<Res>> {
        let f = self.0.clone();
        Some(Arc::new(f))
    }
}

impl TtlConfig for Unset {
    fn fixed(&self) -> Option<Option<Duration>> {
        None
    }
}

impl TtlConfig for FixedTtl {
    fn fixed(&self) -> Option<Option<Duration>> {
        Some(Some(self.0))
    }
}

impl<G> TtlConfig for TtlFn<G> {
    fn fixed(&self) -> Option<Option<Duration>> {
        Some(None)
    }
}
