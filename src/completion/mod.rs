//! Where a call ends: at the response (the default), or at the end of an HTTP response body.
//!
//! The timeout, the bulkhead and the circuit breaker each hold something for the length of a
//! call: a deadline, a permit, the breaker's admission (its state period, its half-open probe
//! slot, its start time for the slow-call duration). For most services the call ends when the
//! inner service returns its response. For `http::Response<B>` services it does not: the
//! headers can arrive in time while the body is slow or stalls, and a layer that stops at
//! the headers lets exactly the slow dependency it should contain escape.
//!
//! The three layers therefore share one choice, made with one builder method,
//! `.whole_body()`, and the same two completion modes:
//!
//! | mode | the call ends | the service's response |
//! |---|---|---|
//! | [`AtResponse`] (default) | when the inner service returns its response | the inner response, unchanged |
//! | [`WholeBody`] (`http` feature) | when the body reaches its end of stream, fails, or is dropped | `http::Response<`[`CallBody`]`<B, _>>` |
//!
//! | layer | builder | held until the call ends | at a body error |
//! |---|---|---|---|
//! | [`timeout`](crate::timeout) | [`TimeoutBuilder::whole_body`](crate::timeout::TimeoutBuilder::whole_body) | the deadline (the body is cut off when it passes) and the outcome to record | counted as a `failure` |
//! | [`bulkhead`](crate::bulkhead) | [`BulkheadBuilder::whole_body`](crate::bulkhead::BulkheadBuilder::whole_body) | the permit (returned exactly once) | the permit is returned |
//! | [`circuit_breaker`](crate::circuit_breaker) | [`CircuitBreakerBuilder::whole_body`](crate::circuit_breaker::CircuitBreakerBuilder::whole_body) | the outcome, the duration (slow calls), a half-open probe slot | recorded as a failure |
//!
//! A body dropped before its end (the caller read the headers only, or gave up) ends the call
//! then, with the outcome the response was classified with: the response did arrive, and the
//! time until the drop is the time the call held the layer. A body dropped while a panic
//! unwinds (its poll panicked, or its reader did) ends the call as a panic in the inner call
//! does: no outcome is recorded (the breaker frees a half-open probe slot without a verdict,
//! the timeout counts the call under no outcome), the permit goes back. Layers stack: with a whole-body
//! timeout inside a whole-body breaker, the timeout's error from the body is a body error for
//! the breaker (a failure).
//!
//! # Cost
//!
//! [`AtResponse`] is a zero-sized type whose completion is the same code the layers ran
//! before there was a choice: no allocation, no clock read. [`CallBody`] neither buffers nor
//! allocates per frame: each frame is passed through as the inner body yields it. Per call it
//! allocates nothing for the bulkhead and the breaker (the permit or admission moves into the
//! body); for the timeout it allocates one timer (a boxed `tokio::time::Sleep`, about 100
//! bytes) the first time the body returns `Pending`, reads the clock at the call's first
//! poll (the deadline must be known when the body starts), and reads it once more per
//! frame (a frame read after the deadline is cut off, see [`WholeBody`]).
//!
//! See [`WholeBody`] for an example.

use std::task::{Context, Poll};

use crate::error::BoxError;

#[cfg(feature = "http")]
mod body;

#[cfg(feature = "http")]
pub use body::{CallBody, WholeBody};

/// How a call ended, as told to a layer's [`CallEnd`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The inner service returned its response and the call ends there ([`AtResponse`]).
    Response,
    /// The body reached its end of stream.
    EndOfStream,
    /// Reading the body failed.
    BodyError,
    /// The body was dropped before its end.
    Dropped,
}

/// What a layer holds for one call until the call ends: the timeout's
/// [`Deadline`](crate::timeout::Deadline), the bulkhead's [`Permit`](crate::bulkhead::Permit),
/// the breaker's [`Admission`](crate::circuit_breaker::Admission).
///
/// Sealed: implemented only by this crate's layers. Its value is consumed exactly once, when
/// the call ends (see the [module docs](self)).
pub trait CallEnd: sealed::Sealed {
    /// Ends the call: records its outcome, returns what it held.
    #[doc(hidden)]
    fn end(self, how: End);

    /// A limit on the body's time, polled while the inner body is pending: `Ready(err)` ends
    /// the call with `err` (already recorded; the value is then dropped without
    /// [`end`](Self::end)). No limit by default.
    #[doc(hidden)]
    fn poll_cut(&mut self, _cx: &mut Context<'_>) -> Poll<BoxError> {
        Poll::Pending
    }

    /// The same limit, checked as the inner body yields a frame (the limit may have passed
    /// while nobody polled): `Some(err)` ends the call with `err` (already recorded; the
    /// value is then dropped without [`end`](Self::end)) and the frame is dropped. No limit,
    /// and no clock read, by default.
    #[doc(hidden)]
    #[inline]
    fn cut_now(&mut self) -> Option<BoxError> {
        None
    }
}

/// Where a call ends for the timeout, the bulkhead and the circuit breaker: [`AtResponse`]
/// (the default) or, for `http::Response` services with the `http` feature, [`WholeBody`].
///
/// Sealed: implemented only by this crate's completion modes.
pub trait Completion<Res>: sealed::Sealed + Clone {
    /// The response the caller gets, given what the layer holds for the call.
    type Output<E: CallEnd>;

    /// `true` when the call ends after the response (the timeout then reads the start
    /// instant whatever the duration setting).
    #[doc(hidden)]
    const AFTER_RESPONSE: bool;

    /// Turns the inner response into the caller's; `end` is ended when the call ends.
    #[doc(hidden)]
    fn complete<E: CallEnd>(&self, res: Res, end: E) -> Self::Output<E>;
}

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// The default completion: the call ends when the inner service returns its response; what
/// the caller does with the response afterwards is not part of the call.
#[derive(Debug, Clone, Copy, Default)]
pub struct AtResponse;

impl sealed::Sealed for AtResponse {}

impl<Res> Completion<Res> for AtResponse {
    type Output<E: CallEnd> = Res;

    const AFTER_RESPONSE: bool = false;

    #[inline(always)]
    fn complete<E: CallEnd>(&self, res: Res, end: E) -> Res {
        end.end(End::Response);
        res
    }
}
