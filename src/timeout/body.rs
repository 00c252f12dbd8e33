//! Body-aware completion (`http` feature): the deadline covers the whole response body.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::task::coop::{Unconstrained, unconstrained};
use tokio::time::Sleep;

use super::completion::{Completion, Finish, sealed};
use super::layer::{FAILED, Shared};
use crate::clock::{self, Instant};
use crate::error::BoxError;

/// The completion mode for `http::Response<B>` services where the deadline covers the whole
/// body: a response whose headers arrive in time but whose body is slow or stalls is cut off
/// when the deadline passes, with a [`ErrorKind::Timeout`](crate::error::ErrorKind::Timeout)
/// error from the body and the inner body dropped. Made by
/// [`TimeoutBuilder::whole_body`](super::TimeoutBuilder::whole_body).
///
/// The call is recorded (metrics, `timeouts` counter, event) when the body ends: at its end
/// of stream with the response's classified outcome, at a body error as a failure, at the
/// deadline as a timeout; a body dropped before its end is recorded with the response's
/// outcome. Costs: the clock is read at the first poll of every call (the deadline must be
/// known when the body starts), and a timer is allocated (one `Box`) for a body that returns
/// `Pending`; nothing is allocated or buffered per frame.
#[derive(Debug, Clone, Copy, Default)]
pub struct WholeBody;

impl sealed::Sealed for WholeBody {}

impl<B> Completion<http::Response<B>> for WholeBody
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = http::Response<TimeoutBody<B>>;

    fn needs_start(&self) -> bool {
        true
    }

    fn complete(&self, res: http::Response<B>, finish: Finish<'_>) -> Self::Output {
        let deadline = finish.started.and_then(|s| s.checked_add(finish.timeout));
        let record = Record {
            shared: Some(finish.shared.clone()),
            outcome: finish.outcome,
            started: finish.started,
        };
        res.map(|inner| TimeoutBody {
            state: BodyState::Live { inner },
            sleep: None,
            deadline,
            timeout: finish.timeout,
            record,
        })
    }
}

/// Records the call once, when the body ends or is dropped.
struct Record {
    shared: Option<Arc<Shared>>,
    outcome: usize,
    started: Option<Instant>,
}

impl Record {
    fn elapsed(&self) -> Option<Duration> {
        self.started
            .filter(|_| self.shared.as_ref().is_some_and(|s| s.records_durations()))
            .map(|s| clock::now().saturating_duration_since(s))
    }

    fn finish(&mut self, outcome: usize) {
        let elapsed = self.elapsed();
        if let Some(shared) = self.shared.take() {
            shared.record(outcome, elapsed);
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.finish(self.outcome);
    }
}

pin_project! {
    #[project = BodyProj]
    enum BodyState<B> {
        Live { #[pin] inner: B },
        Done,
    }
}

pin_project! {
    /// A response body under a [`WholeBody`] deadline. Yields the inner body's frames
    /// unchanged; fails with a timeout error when the deadline passes first (the inner body
    /// is dropped then). After the end, an error or the deadline it yields `None`.
    pub struct TimeoutBody<B> {
        #[pin]
        state: BodyState<B>,
        sleep: Option<Pin<Box<Unconstrained<Sleep>>>>,
        deadline: Option<Instant>,
        timeout: Duration,
        record: Record,
    }
}

impl<B> fmt::Debug for TimeoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutBody")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<B> Body for TimeoutBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let BodyProj::Live { inner } = this.state.as_mut().project() else {
            return Poll::Ready(None);
        };
        match inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => return Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => {
                this.state.set(BodyState::Done);
                this.record.finish(FAILED);
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(None) => {
                this.state.set(BodyState::Done);
                let outcome = this.record.outcome;
                this.record.finish(outcome);
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        let Some(deadline) = *this.deadline else {
            return Poll::Pending;
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(unconstrained(tokio::time::sleep_until(deadline))));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.state.set(BodyState::Done);
        let elapsed = this.record.elapsed();
        match this.record.shared.take() {
            Some(shared) => Poll::Ready(Some(Err(shared.timed_out(*this.timeout, elapsed)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            BodyState::Live { inner } => inner.is_end_stream(),
            BodyState::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Live { inner } => inner.size_hint(),
            BodyState::Done => SizeHint::with_exact(0),
        }
    }
}
