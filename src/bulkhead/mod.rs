//! A bulkhead: a limit on the calls in flight to one dependency, with load shedding or a
//! bounded, first-in-first-out wait for a permit.
//!
//! A dependency that slows down makes calls pile up: every caller waiting on it holds a task,
//! a socket, memory. A bulkhead (the pattern of M. Nygard, *Release It!*, 2007; semantics of
//! resilience4j's semaphore bulkhead: `maxConcurrentCalls`, `maxWaitDuration`) caps the calls
//! holding a *permit* at once; the rest are rejected at once (load shedding, the default) or
//! queue for a bounded time. A rejection is a [`BreakwaterError`](crate::error::BreakwaterError)
//! of kind [`ErrorKind::BulkheadFull`](crate::error::ErrorKind::BulkheadFull) naming the
//! instance.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_breakwater::{bulkhead::BulkheadLayer, error::{self, ErrorKind}, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = BulkheadLayer::builder()
//!     .name("ledger")
//!     .max_concurrent_calls(1)
//!     .build()?; // max_wait zero: reject at once
//! let handle = layer.handle();
//! let mut svc = ServiceBuilder::new().layer(layer).service(service_fn(|ms: u64| async move {
//!     tokio::time::sleep(Duration::from_millis(ms)).await;
//!     Ok::<_, std::io::Error>(ms)
//! }));
//!
//! let slow = svc.ready().await?.call(1_000); // takes the only permit, in `call`
//! assert_eq!(handle.in_flight(), 1);
//! let err = svc.ready().await?.call(1).await.unwrap_err();
//! let ours = error::find(err.as_ref()).expect("our rejection");
//! assert_eq!((ours.kind(), ours.name()), (ErrorKind::BulkheadFull, "ledger"));
//! assert_eq!(slow.await?, 1_000); // completing returns the permit
//! assert_eq!(handle.available(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Semantics
//!
//! - **Admission in `call`.** Following the crate's
//!   [admission rule](crate#the-admission-rule), the permit is taken when `call` is invoked,
//!   in call order; `poll_ready` reserves nothing. When no permit is free, `call` decides at
//!   once: with `max_wait` zero (the default) the call is rejected; with a positive
//!   `max_wait` it joins the back of the queue, unless
//!   [`max_waiting`](BulkheadBuilder::max_waiting) calls already queue, in which case it is
//!   rejected. The rejection is returned by the response future without waiting for the
//!   inner service's readiness, and the inner service is never reached.
//! - **FIFO.** A returned permit goes to the oldest queued call. While anyone queues, a new
//!   call never takes a permit ahead of it.
//! - **The wait** is bounded by `max_wait` from `call`; a queued call still without a permit
//!   then is rejected with `BulkheadFull` and leaves the queue. A permit handed to it before
//!   it observes its deadline is used (the call goes ahead). Tokio rounds the deadline up
//!   to the next millisecond. The deadline is observed by polling the response future (its
//!   `tokio::time` timer is armed at the first poll, which therefore needs a runtime with
//!   the time driver): a queued future that is never polled keeps its place, and a permit
//!   handed to it, until it is polled or dropped.
//! - **Release.** A permit is held until the inner response future *completes* (with a
//!   response or an error), or the inner readiness fails, or the response future is dropped
//!   at any point, whichever comes first: not until the caller drops a finished future.
//!   With [`whole_body`](BulkheadBuilder::whole_body) (`http` feature), a call that returns
//!   an `http::Response` holds its permit until the response's body reaches its end of
//!   stream, fails, or is dropped (see [`completion`](crate::completion)): a dependency
//!   streaming slow bodies is held to the limit too.
//!   Dropping the response future mid-flight drops the inner future with it. A panic
//!   unwinding through `poll` (inner service, metrics recorder, event listener, timer)
//!   returns the permit, or leaves the queue, as it unwinds; a response future polled again
//!   after such a panic panics itself and never reaches the inner service again.
//! - **Giving up never leaks.** A queued call that times out or is dropped leaves the queue
//!   at once, so it is never handed a permit afterwards; a permit handed to it just before is
//!   returned (to the next waiter, or to the free count). See the argument in the
//!   `semaphore` module source, summarised under *Concurrency* below.
//!
//! # Admission, `poll_ready` and `Clone`
//!
//! `poll_ready` always returns `Ready(Ok(()))`. A call that gets a permit in `call` asks the
//! inner service for readiness there and calls it when it is ready; otherwise its response
//! future drives that readiness, holding the permit (so a permit also bounds callers waiting
//! for the inner service), while a **clone** takes the service's place (see the
//! [admission rule](crate#the-admission-rule)). A queued call clones the inner service in
//! `call` and drives the clone once it has a permit. The inner service must therefore be
//! `Clone`; wrap a non-`Clone` service in `tower::buffer::Buffer`. Keep clones cheap: a
//! client handle is usually one `Arc`, whereas a boxed clone service allocates on every
//! clone. A readiness error returns the permit and is the call's answer.
//!
//! # Cost
//!
//! A call that finds a permit free takes no lock, reads no clock and allocates nothing: one
//! compare-and-swap on the permit word in `call`, one when the permit is returned, and no
//! reference-count write (see below). A queued call takes the queue's mutex once to
//! queue, at most twice per poll while it waits and once more to leave the queue early,
//! and reads the clock once; its queue slot is reused from a free list, so a steady queue
//! allocates no slots (the slot vector grows only when the queue is longer than ever
//! before, and never shrinks: it keeps the high-water mark of the queue length, a few
//! dozen bytes per slot), and
//! tokio's task wakers are reference counts. The one allocation of the waiting path is the
//! queued call's timer (a boxed `tokio::time::Sleep`, about 100 bytes), made at its first
//! poll when it has a finite maximum wait: held inline, the timer would make every call's
//! response future about 120 bytes larger, and moving that future costs every admitted call
//! more than one allocation costs a call that waits anyway. With no limit on the wait
//! (`max_wait(Duration::MAX)`), waiting allocates nothing. A rejection allocates one box,
//! for its error.
//! With [`whole_body`](BulkheadBuilder::whole_body), the permit moves into the response's
//! body: nothing more is allocated, per call or per frame.
//!
//! # Concurrency
//!
//! The permit count and the number of queued calls live together in **one `AtomicU64`**; the
//! queue is a `parking_lot` mutex touched only when somebody queues. The lock-free fast paths
//! (take a free permit; return a permit) only succeed when the same word says nobody queues,
//! and every change of the queue length happens under the mutex by a compare-and-swap on
//! that word, so a permit is never free while someone queues, never handed to a call that
//! left the queue, and never counted twice. No code of others runs while the mutex is held
//! (metric handles, event listeners, wakers run after unlocking, and a permit or a place in
//! the queue is owned by an RAII value before they run), so a recorder or listener that
//! panics, or calls back into the bulkhead, neither loses a permit nor deadlocks. The argument is stated in full in the source of
//! the `semaphore` module and checked there with [loom](https://docs.rs/loom) under
//! `cfg(loom)` (every interleaving of releases, fast acquires, enqueues, hand-offs and
//! withdrawals ends with every permit back); the multi-thread tests assert the same counts
//! on a real runtime.
//!
//! Being one word, the permit counter is a point of contention: each admitted call writes
//! that cache line twice (acquire, release). On two cores this costs on the order of 100 ns
//! per call when both hammer the same bulkhead, as for any exact global counter. That is
//! inherent to an exact concurrency limit: sharding the count would either let more than
//! the maximum in, or need the same shared line to move permits between shards.
//!
//! # Metrics, events and the handle
//!
//! - `breakwater_bulkhead_in_flight{name}`, `breakwater_bulkhead_available_permits{name}`,
//!   `breakwater_bulkhead_max_permits{name}`, `breakwater_bulkhead_waiting{name}` (gauges,
//!   counts). They are never adjusted relatively: after each change of the permit word
//!   (the only shared state a call writes), the gauges that change are *set* to values
//!   derived from the word read after the change: `in_flight = max - free`,
//!   `available = free`, `waiting = queued`. Every value written is therefore one the
//!   bulkhead really held, within `0..=max_concurrent_calls` whatever the interleaving of
//!   completions, errors, drops and panics; a writer then reads the word again and writes
//!   again if it changed meanwhile, so the gauges end exact when calls stop. Two instances
//!   with the same name (a configuration reload, say) write the same series: the last
//!   writer's values show, each in range, never a sum. The gauge writes are those of the
//!   relative updates they replace (two per acquire or release, fewer than before on a
//!   hand-off), plus a read of the word that the call has just written.
//! - `breakwater_bulkhead_calls_total{name, outcome}` with `outcome` `permitted` (got a
//!   permit, at once or after queueing) or `rejected`. A queued call dropped by its caller
//!   before it got a permit counts as neither.
//! - `breakwater_bulkhead_wait_duration_seconds{name}` (opt-in, `record_durations(true)`):
//!   for each call that queued, the time from `call` to leaving the queue (permit, timeout or
//!   drop). Calls admitted at once are not recorded (they waited zero and read no clock).
//! - Each rejection emits [`EventKind::Rejected`](crate::event::EventKind::Rejected) with
//!   kind `BulkheadFull`.
//! - [`BulkheadLayer::handle`] gives a [`BulkheadHandle`]: exact live counts
//!   (`in_flight`, `waiting`, `available`) and a [`Snapshot`](crate::snapshot::Snapshot).
//!
//! The bulkhead does not classify outcomes: whatever the inner result, the permit is
//! returned the same way.
//!
//! # Shared state
//!
//! A `BulkheadLayer` value owns its bulkhead: every service it produces, and every clone of
//! those, draws on the same permits. A framework that calls `layer()` per route or per
//! connection still gets one bulkhead. Build separate layers for separate dependencies.
//!
//! Each call's [`Permit`] (held inside the body with [`whole_body`](BulkheadBuilder::whole_body))
//! and queued call owns a reference to the state, taken from and given back to a small per-thread
//! cache of spare references (as the circuit breaker's): in the steady state a call writes no
//! reference count. A spare does not keep a dropped bulkhead alive: once its last layer, service
//! and handle is dropped, the state (its event listeners and metric handles) is freed when its last
//! call in flight ends, except that a spare parked earlier on another thread lasts until that
//! thread finishes or is refused a call through any bulkhead (or exits). Registries hold the layer's share weakly
//! and drop it with the last layer, service and handle.

mod future;
mod layer;
mod semaphore;
mod service;

pub use future::{Permit, ResponseFuture};
pub use layer::{BulkheadBuilder, BulkheadHandle, BulkheadLayer};
pub use service::Bulkhead;

/// The response body of a [`Bulkhead`] made with
/// [`whole_body`](BulkheadBuilder::whole_body): the inner body, holding the call's permit
/// until it ends, fails or is dropped.
#[cfg(feature = "http")]
pub type BulkheadBody<B> = crate::completion::CallBody<B, Permit>;
