//! A per-call deadline that covers waiting for the inner service's readiness *and* the
//! response.
//!
//! A slow dependency is dangerous because it holds the caller's resources (tasks, sockets,
//! pool slots, bulkhead permits) for as long as it is slow. [`TimeoutLayer`] bounds that time:
//! when the deadline passes, the inner future is dropped at once (cancelling the call) and
//! the caller gets a [`BreakwaterError`](crate::error::BreakwaterError) of kind
//! [`ErrorKind::Timeout`](crate::error::ErrorKind::Timeout) naming the instance and the
//! deadline that applied.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_breakwater::{error, timeout::TimeoutLayer, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = TimeoutLayer::builder()
//!     .name("fraud-api")
//!     .timeout(Duration::from_millis(250))
//!     .build()?;
//! let svc = ServiceBuilder::new().layer(layer).service(service_fn(|ms: u64| async move {
//!     tokio::time::sleep(Duration::from_millis(ms)).await;
//!     Ok::<_, std::io::Error>(ms)
//! }));
//!
//! assert_eq!(svc.clone().oneshot(10).await?, 10);
//! let err = svc.oneshot(1_000).await.unwrap_err();
//! let ours = error::find(err.as_ref()).expect("a timeout, not an inner error");
//! assert_eq!(ours.name(), "fraud-api");
//! assert_eq!(ours.elapsed(), Some(Duration::from_millis(250)));
//! # Ok(())
//! # }
//! ```
//!
//! # Semantics
//!
//! - **The deadline** is the layer's `timeout`, or, with
//!   [`per_request`](TimeoutBuilder::per_request), a function of the request (falling back to
//!   the layer's `timeout` where it returns `None`). It starts when the response future is
//!   first polled and covers everything that future does: waiting for the inner service to be
//!   ready, then the inner call. A future that is never polled consumes no deadline.
//! - **Happy path cost.** The clock is read, and the timer armed, only when the inner
//!   service does not finish on the first poll; a call that completes at once reads no clock
//!   (unless duration histograms are on) and touches no timer.
//! - **Ordering.** On each poll the inner service is polled before the timer: a response that
//!   is ready in the same poll as the deadline wins.
//! - **Deadlines too large** to add to the current instant are treated as no deadline.
//! - **Nested timeouts (deadline propagation).** While a timeout whose timer is armed polls
//!   its inner service, it publishes its deadline on the thread; a timeout armed during that
//!   poll takes the earlier of its own deadline and the published one. So a per-call timeout
//!   called after waiting in the layers under an overall deadline (a bulkhead's queue, a rate
//!   limiter's wait) fires at the overall deadline itself, *inside* those layers: a circuit
//!   breaker between the two counts the call as a timeout instead of seeing it cancelled from
//!   outside. The error then carries the inner timeout's name and its shortened duration.
//!   Calls on another task (spawned, detached) keep their own deadline. The cost is a
//!   thread-local write and restore per poll of an armed timeout and a thread-local read
//!   when a timer is armed; the happy path (no timer) touches neither. The idea follows
//!   gRPC's deadline propagation, within one task.
//! - **Cooperative scheduling.** The deadline timer is polled outside tokio's task budget, so
//!   an inner future that exhausts the budget on every poll (a body streaming from an
//!   always-ready socket) still times out.
//! - **Runtime.** Like every tokio timer, the deadline needs a runtime with the time driver
//!   (`enable_time` or `enable_all`); without one, arming it panics.
//! - **Not counted.** A call whose response future is dropped before it ends (cancelled by the
//!   caller) is counted under no outcome; neither is one whose inner future panics (the panic
//!   propagates to the caller).
//! - **HTTP bodies.** By default ([`AtResponse`](crate::completion::AtResponse)) the call ends
//!   when the inner service returns its response; for `http::Response` services a slow or
//!   stalled *body* would escape the deadline. With the `http` feature,
//!   [`whole_body`](TimeoutBuilder::whole_body) makes the deadline cover the body too: the
//!   body is cut off with a timeout error when it passes, and the call is recorded at the
//!   body's end ([`Deadline`], [`TimeoutBody`]). The bulkhead and the circuit breaker make
//!   the same choice the same way (see [`completion`](crate::completion)).
//!
//! # Admission and `Clone`
//!
//! Following the crate's [admission rule](crate#the-admission-rule), `poll_ready` always
//! returns `Ready(Ok(()))` and reserves nothing. `call` calls the inner service at once
//! when it is ready; one that is not is driven to readiness inside the response future, so
//! the deadline bounds that wait too, and a **clone** takes its place (see the
//! [admission rule](crate#the-admission-rule)). The inner service must therefore be `Clone`;
//! wrap a non-`Clone` service in `tower::buffer::Buffer` (cloning a `Buffer` allocates, which
//! then happens for each call that finds it not ready).
//!
//! Since `poll_ready` is always ready, the timeout does **not** pass the inner service's
//! backpressure outwards: a layer above it that relies on readiness (a balancer, a
//! `Buffer` worker, tower's `ConcurrencyLimit`) sees a saturated dependency as ready. Put
//! such layers inside the timeout, or bound concurrency with a bulkhead, which rejects or
//! queues in `call`.
//!
//! # Outcomes and metrics
//!
//! Each finished call is classified by the layer's [`Classify`](crate::classify::Classify)
//! value ([`DefaultClassifier`](crate::classify::DefaultClassifier) unless replaced) and
//! counted in `breakwater_timeout_calls_total{name, outcome}` with `outcome` one of `success`,
//! `failure`, `ignored`, `timeout`. With `record_durations(true)`,
//! `breakwater_timeout_call_duration_seconds{name, outcome}` records each call's duration from
//! its first poll. Each timeout also emits [`EventKind::TimedOut`](crate::event::EventKind).
//! The handle's [`snapshot`](TimeoutHandle::snapshot) has the counter `timeouts`.
//!
//! # Shared state
//!
//! A `TimeoutLayer` value owns its state: every service it produces, and every clone of
//! those, count into the same handle and metric handles. A framework that calls `layer()`
//! per route still gets one instance.
//!
//! Each call's response future (then its [`Deadline`], held inside the body with
//! [`whole_body`](TimeoutBuilder::whole_body)) owns a reference to the state, taken from and given
//! back to a small per-thread cache of spare references (as the circuit breaker's): in the steady
//! state a call writes no reference count. A spare does not keep a dropped timeout alive: once its
//! last layer, service and handle is dropped, the state (its event listeners and metric handles) is
//! freed when its last call in flight ends, except that a spare parked earlier on another thread
//! lasts until that thread finishes a call through any timeout (or exits). Registries hold the
//! layer's share weakly and drop it with the last layer, service and handle.

mod completion;
mod future;
mod layer;
mod service;

pub use completion::Deadline;
pub use future::ResponseFuture;
pub use layer::{
    FixedTimeout, PerRequest, TimeoutBuilder, TimeoutHandle, TimeoutLayer, TimeoutPolicy,
};
pub use service::Timeout;

/// The response body of a [`Timeout`] made with
/// [`whole_body`](TimeoutBuilder::whole_body): the inner body under the call's deadline.
#[cfg(feature = "http")]
pub type TimeoutBody<B> = crate::completion::CallBody<B, Deadline>;
