//! **tower-breakwater**: resilience layers for [`tower`] services, so that one slow or failing
//! dependency cannot take a whole service down.
//!
//! Wrap the client of each external dependency (HTTP, gRPC, database) in the layers it needs:
//!
//! | layer | stops | module |
//! |---|---|---|
//! | timeout | a slow dependency holding callers' resources | [`timeout`] |
//! | circuit breaker | calling a dependency that is failing | [`circuit_breaker`] |
//! | rate limiter (GCRA, shared or keyed) | overwhelming an external API; one client starving others | [`rate_limit`] |
//! | coalescing (singleflight) | identical concurrent requests each going upstream | [`coalesce`] |
//! | response cache (XFetch, serve-stale-on-error) | the thundering herd at cache expiry; outages of the dependency | [`cache`] |
//! | bulkhead, load shedding | one dependency exhausting concurrency | [`bulkhead`] |
//! | the recommended stack for one dependency, in one builder call | all of the above | [`preset`] |
//!
//! Every layer is a `tower::Layer`, usable in `tower::ServiceBuilder`, and shares the same
//! foundations:
//!
//! - **one error type**: every service has `Error = `[`BoxError`]; errors produced by our layers
//!   are [`BreakwaterError`], found in one call with [`error::find`]
//!   (see [`error`]);
//! - **one classification** of finished calls into success, failure or ignored
//!   ([`classify`]);
//! - **one metrics scheme** (`breakwater_*`, a `name` label per instance; see [`metrics`]),
//!   **one event mechanism** ([`event`]) and **one snapshot shape** ([`snapshot`]);
//! - **one configuration rule**: builders whose `build()` returns a [`ConfigError`] naming the
//!   field, never a silent clamp or a panic ([`config`]);
//! - **one clock**: tokio's, so the paused test clock drives every layer ([`clock`]).
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_breakwater::timeout::TimeoutLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_breakwater::BoxError> {
//! let client = service_fn(|id: u32| async move { Ok::<_, std::io::Error>(id * 2) });
//! let svc = ServiceBuilder::new()
//!     .layer(TimeoutLayer::builder().name("risk-profile").timeout(Duration::from_millis(300)).build()?)
//!     .service(client);
//! assert_eq!(svc.oneshot(21).await?, 42);
//! # Ok(())
//! # }
//! ```
//!
//! # The admission rule
//!
//! Layers *admit* a call (take a bulkhead permit, a half-open probe slot, a rate-limiter
//! token) when `call` is invoked, in the order calls are made, never in `poll_ready`.
//! `poll_ready` reserves nothing, so an idle or cloned service holds no capacity (the classic
//! `ConcurrencyLimit`/`Buffer` trap where a service that was made ready but never called holds
//! a permit forever). A rejection (open breaker, full bulkhead with no wait, rate limited in
//! reject mode) is decided in `call` without waiting for the inner service's readiness, and
//! returned through the response future.
//!
//! tower requires `call` to follow a successful `poll_ready` on the same service instance.
//! So an admitted call asks the inner service for readiness once, in `call`, with a no-op
//! waker: a service that is ready (the usual case: HTTP clients, `service_fn`, this crate's
//! own layers) is called there and then, and nothing is cloned. A service that is not ready
//! is moved into the response future, which drives its readiness with the task's waker (so
//! whatever that first poll registered, such as a place in a semaphore's queue, is woken and
//! used, or released when the future is dropped), and a **clone** takes its place in the
//! layer's service. A layer whose response future must wait before it may call the inner
//! service at all (a queued bulkhead call, a wait-mode limiter, a coalesced leader) clones
//! the inner service in `call` and drives that clone after its wait. Hence the `Clone`
//! bound: a clone should be cheap (a client handle is usually one `Arc`). A service whose
//! readiness fails or panics is replaced by a clone and dropped (tower treats it as failed),
//! so whatever it reserved is released. Since the inner service is called in `call`, an
//! inner `call` that needs a runtime context needs it at the layer's `call`, and an inner
//! service that sends its request in `call` sends it even if the response future is never
//! polled (as with any tower middleware that calls its inner service in `call`). Each
//! layer's docs state its `poll_ready` policy.
//!
//! # Shared state
//!
//! A layer value owns its state: every service it produces, and every clone of those, shares
//! that state. A framework that calls `Layer::layer` per route or per connection still gets
//! one breaker, one bulkhead, one limiter per layer value. To get independent instances, build
//! independent layers (and give them different names).
//!
//! # Cargo features
//!
//! One per layer, all on by default: `timeout`, `circuit-breaker`, `bulkhead`, `rate-limit`,
//! `coalesce`, `cache`, and `preset` (the recommended stack). Also on by default: `http` (HTTP
//! classification, `Retry-After`, request keys and rejection responses; see
//! [`http`](mod@http)). Off by default: `serde` (JSON snapshots), `tracing` (emit every event as
//! a `tracing` event too).

pub mod classify;
pub mod clock;
#[cfg(any(feature = "timeout", feature = "bulkhead", feature = "circuit-breaker"))]
pub mod completion;
pub mod config;
pub mod error;
pub mod event;
pub mod metrics;
pub mod registry;
pub mod snapshot;
#[cfg(any(feature = "timeout", feature = "bulkhead", feature = "circuit-breaker"))]
mod spare;
#[cfg(any(
    feature = "timeout",
    feature = "circuit-breaker",
    feature = "bulkhead",
    feature = "rate-limit",
    feature = "coalesce"
))]
mod upstream;

#[cfg(feature = "bulkhead")]
pub mod bulkhead;
#[cfg(feature = "cache")]
pub mod cache;
#[cfg(feature = "circuit-breaker")]
pub mod circuit_breaker;
#[cfg(feature = "coalesce")]
pub mod coalesce;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "preset")]
pub mod preset;
#[cfg(feature = "timeout")]
pub mod timeout;

#[cfg(feature = "rate-limit")]
pub mod rate_limit;

pub use config::ConfigError;
pub use error::{BoxError, BreakwaterError};
