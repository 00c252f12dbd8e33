//! What the timeout holds for a call until the call ends: its [`Deadline`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::task::coop::{Unconstrained, unconstrained};
use tokio::time::Sleep;

use super::layer::{FAILED, Shared};
use crate::clock::{self, Instant};
use crate::completion::{CallEnd, End, sealed};
use crate::error::BoxError;
use crate::spare;

/// The timeout's hold on one call whose response has arrived: the outcome it was classified
/// with and, when the call ends after the response ([`WholeBody`](crate::completion::WholeBody)),
/// its deadline. Held inside [`TimeoutBody`](super::TimeoutBody); not constructible outside
/// the crate.
///
/// When the call ends it is recorded once: with the response's outcome at the response
/// ([`AtResponse`](crate::completion::AtResponse)), at the body's end of stream or at its
/// drop; as a `failure` at a body error; as a `timeout` when the deadline passes first (the
/// body then fails with a [`BreakwaterError`](crate::BreakwaterError) of kind
/// [`Timeout`](crate::error::ErrorKind::Timeout)). The deadline's timer (one boxed
/// `tokio::time::Sleep`) is allocated the first time the body returns `Pending`.
pub struct Deadline {
    /// `Some` until dropped, then given back to the thread's spare cache (see `spare`).
    shared: Option<Arc<Shared>>,
    outcome: usize,
    started: Option<Instant>,
    timeout: Duration,
    // Polled without tokio's cooperative budget, as the response future's timer.
    sleep: Option<Pin<Box<Unconstrained<Sleep>>>>,
}

impl fmt::Debug for Deadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deadline")
            .field("name", &self.shared().name)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Deadline {
    #[inline]
    pub(super) fn new(
        shared: Arc<Shared>,
        outcome: usize,
        started: Option<Instant>,
        timeout: Duration,
    ) -> Self {
        Deadline {
            shared: Some(shared),
            outcome,
            started,
            timeout,
            sleep: None,
        }
    }

    #[inline]
    fn shared(&self) -> &Shared {
        self.shared.as_ref().expect("present until dropped")
    }

    /// Time since the start, when durations are recorded.
    #[inline]
    fn elapsed(&self) -> Option<Duration> {
        self.started
            .filter(|_| self.shared().records_durations())
            .map(|s| clock::now().saturating_duration_since(s))
    }
}

impl Drop for Deadline {
    #[inline]
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            spare::release(shared);
        }
    }
}

impl sealed::Sealed for Deadline {}

impl CallEnd for Deadline {
    #[inline]
    fn end(self, how: End) {
        let outcome = match how {
            End::BodyError => FAILED,
            End::Response | End::EndOfStream | End::Dropped => self.outcome,
        };
        self.shared().record(outcome, self.elapsed());
    }

    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<BoxError> {
        let Some(deadline) = self.started.and_then(|s| s.checked_add(self.timeout)) else {
            return Poll::Pending;
        };
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(unconstrained(tokio::time::sleep_until(deadline))));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(self.shared().timed_out(self.timeout, self.elapsed()))
    }

    #[inline]
    fn cut_now(&mut self) -> Option<BoxError> {
        let started = self.started?;
        let now = clock::now();
        if now.saturating_duration_since(started) < self.timeout {
            return None;
        }
        let elapsed = self
            .shared()
            .records_durations()
            .then(|| now.saturating_duration_since(started));
        Some(self.shared().timed_out(self.timeout, elapsed))
    }
}
