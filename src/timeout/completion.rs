//! Where a call ends for the timeout: at the response, or at the end of an HTTP body.

use std::sync::Arc;
use std::time::Duration;

use super::layer::Shared;
use crate::clock::{self, Instant};

/// Where a [`Timeout`](super::Timeout)'s deadline stops: [`AtResponse`] (the default) or, for
/// `http::Response` services with the `http` feature, [`WholeBody`](super::WholeBody).
///
/// Sealed: implemented only by this crate's completion modes.
pub trait Completion<Res>: sealed::Sealed + Clone {
    /// The response the caller gets.
    type Output;

    /// `true` when the start instant is needed whatever the duration setting.
    #[doc(hidden)]
    fn needs_start(&self) -> bool;

    /// Turns the inner response into the caller's, recording the call when it ends.
    #[doc(hidden)]
    fn complete(&self, res: Res, finish: Finish<'_>) -> Self::Output;
}

pub(super) mod sealed {
    pub trait Sealed {}
}

/// What a completion needs to record the call. Not constructible outside the crate.
#[derive(Debug)]
pub struct Finish<'a> {
    pub(super) shared: &'a Arc<Shared>,
    pub(super) outcome: usize,
    pub(super) started: Option<Instant>,
    #[cfg_attr(not(feature = "http"), allow(dead_code))] // read by `WholeBody`
    pub(super) timeout: Duration,
}

impl Finish<'_> {
    /// Elapsed time since the start, when it was measured.
    pub(super) fn elapsed(&self) -> Option<Duration> {
        self.started
            .map(|s| clock::now().saturating_duration_since(s))
    }
}

/// The default completion: the call ends when the inner service returns its response; the
/// deadline does not apply to anything the caller does with the response afterwards.
#[derive(Debug, Clone, Copy, Default)]
pub struct AtResponse;

impl sealed::Sealed for AtResponse {}

impl<Res> Completion<Res> for AtResponse {
    type Output = Res;

    #[inline]
    fn needs_start(&self) -> bool {
        false
    }

    #[inline]
    fn complete(&self, res: Res, finish: Finish<'_>) -> Res {
        finish.shared.record(finish.outcome, finish.elapsed());
        res
    }
}
