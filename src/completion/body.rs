//! Body-aware completion (`http` feature): the call ends at the end of the response body.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::{CallEnd, Completion, End, sealed};
use crate::error::BoxError;

/// The completion mode for `http::Response<B>` services where the call ends at the end of
/// the response body, not at its headers. Chosen with `.whole_body()` on the timeout, the
/// bulkhead and the circuit-breaker builders (see the [module docs](super) for what each
/// layer holds until then).
///
/// The response's body is wrapped in a [`CallBody`], which ends the call (exactly once) when
/// the body yields its end of stream, yields an error, or is dropped, whichever comes first.
///
/// With the timeout, the deadline holds for every frame, however the body is read: it is
/// checked when the inner body is pending (a timer) and again before each frame is handed
/// on, so a frame read after the deadline (the dependency sent it in time, but the caller
/// read slowly) is dropped and the body fails with the timeout's error. The end of stream
/// is not checked: a body whose every frame was handed on in time was read in time. Cost:
/// one clock read (`tokio::time::Instant::now`) per frame, only for a whole-body timeout;
/// the bulkhead and the breaker read no clock per frame.
///
/// ```
/// use std::time::Duration;
/// use http_body_util::{BodyExt, Full};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_breakwater::bulkhead::BulkheadLayer;
/// use tower_breakwater::timeout::TimeoutLayer;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), tower_breakwater::BoxError> {
/// let bulkhead = BulkheadLayer::builder().max_concurrent_calls(1).whole_body().build()?;
/// let permits = bulkhead.handle();
/// let svc = ServiceBuilder::new()
///     .layer(bulkhead)
///     .layer(TimeoutLayer::builder().timeout(Duration::from_secs(1)).whole_body().build()?)
///     .service(service_fn(|()| async {
///         Ok::<_, std::io::Error>(http::Response::new(Full::new(&b"ok"[..])))
///     }));
///
/// let response = svc.oneshot(()).await?;
/// assert_eq!(permits.available(), 0, "held while the body is unread");
/// let bytes = response.into_body().collect().await?.to_bytes();
/// assert_eq!((&bytes[..], permits.available()), (&b"ok"[..], 1));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct WholeBody;

impl sealed::Sealed for WholeBody {}

impl<B> Completion<http::Response<B>> for WholeBody
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output<E: CallEnd> = http::Response<CallBody<B, E>>;

    const AFTER_RESPONSE: bool = true;

    #[inline]
    fn complete<E: CallEnd>(&self, res: http::Response<B>, end: E) -> Self::Output<E> {
        res.map(|inner| CallBody {
            state: State::Live { inner },
            end: Ending(Some(end)),
        })
    }
}

pin_project! {
    #[project = StateProj]
    enum State<B> {
        Live { #[pin] inner: B },
        Done,
    }
}

/// Ends the call it holds when dropped, unless it was ended before.
struct Ending<E: CallEnd>(Option<E>);

impl<E: CallEnd> Ending<E> {
    #[inline]
    fn end(&mut self, how: End) {
        if let Some(end) = self.0.take() {
            end.end(how);
        }
    }
}

impl<E: CallEnd> Drop for Ending<E> {
    #[inline]
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Unwinding (a poll of the inner body panicked, or the reader did): the call is
            // no success. Dropping what the layer holds without ending it is what a panic in
            // the inner call does to the response future: the breaker counts no outcome and
            // frees its probe slot, the timeout counts none, the permit goes back.
            drop(self.0.take());
        } else {
            self.end(End::Dropped);
        }
    }
}

pin_project! {
    /// A response body whose end ends the call of a layer made with `.whole_body()` (see
    /// [`WholeBody`]); `E` is what that layer holds for the call.
    ///
    /// Yields the inner body's frames unchanged, as they come: nothing is buffered, nothing
    /// is allocated per frame. The call ends, exactly once, at the first of: the inner body's
    /// end of stream (recorded with the response's outcome), an error from the inner body
    /// (returned boxed; a failure), a limit the layer puts on the body's time (the timeout's
    /// deadline: a [`BreakwaterError`](crate::BreakwaterError) of kind
    /// [`Timeout`](crate::error::ErrorKind::Timeout), also for a frame that comes after
    /// it), or the drop of this body (the
    /// response's outcome; while a panic unwinds, for instance from the inner body's poll,
    /// no outcome, as for a panic in the inner call, and what the layer held is still
    /// released). The inner body is dropped when the call ends, before what the
    /// layer held is released; afterwards this body yields `None`.
    ///
    /// `Unpin` when `B` is.
    pub struct CallBody<B, E: CallEnd> {
        // Declared first: dropped before what the layer holds is released.
        #[pin]
        state: State<B>,
        end: Ending<E>,
    }
}

impl<B, E: CallEnd> fmt::Debug for CallBody<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallBody")
            .field("ended", &self.end.0.is_none())
            .finish_non_exhaustive()
    }
}

impl<B, E> Body for CallBody<B, E>
where
    B: Body,
    B::Error: Into<BoxError>,
    E: CallEnd,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let StateProj::Live { inner } = this.state.as_mut().project() else {
            return Poll::Ready(None);
        };
        match inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let Some(err) = this.end.0.as_mut().and_then(CallEnd::cut_now) else {
                    return Poll::Ready(Some(Ok(frame)));
                };
                // Past the deadline (already recorded): drop the frame and the inner body,
                // then what the layer held.
                drop(frame);
                this.state.set(State::Done);
                drop(this.end.0.take());
                return Poll::Ready(Some(Err(err)));
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.set(State::Done);
                this.end.end(End::BodyError);
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(None) => {
                this.state.set(State::Done);
                this.end.end(End::EndOfStream);
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        let Some(end) = this.end.0.as_mut() else {
            return Poll::Pending;
        };
        let Poll::Ready(err) = end.poll_cut(cx) else {
            return Poll::Pending;
        };
        // Cut off (already recorded): drop the inner body, then what the layer held.
        this.state.set(State::Done);
        drop(this.end.0.take());
        Poll::Ready(Some(Err(err)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Live { inner } => inner.is_end_stream(),
            State::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Live { inner } => inner.size_hint(),
            State::Done => SizeHint::with_exact(0),
        }
    }
}
