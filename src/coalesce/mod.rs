//! Request coalescing ("singleflight"): concurrent identical requests share one upstream call.
//!
//! When a cache is cleared or a popular key expires, thousands of callers ask for the same
//! value at once. [`CoalesceLayer`] sends the first of them upstream (the *leader*) and makes
//! the others (*followers*) wait for its result instead of calling the inner service. It
//! follows the semantics of Go's `golang.org/x/sync/singleflight` (`Group.Do`: one execution
//! per key in flight, its result delivered to every caller, nothing remembered afterwards),
//! with cancellation and panics handled so that no caller pays for another's.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_breakwater::{coalesce::CoalesceLayer, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = CoalesceLayer::builder()
//!     .name("profiles")
//!     .key(|user_id: &u64| *user_id)
//!     .build()?;
//! let handle = layer.handle();
//! let mut svc = ServiceBuilder::new().layer(layer).service(service_fn(|id: u64| async move {
//!     tokio::time::sleep(Duration::from_millis(20)).await;
//!     Ok::<_, std::io::Error>(format!("profile {id}"))
//! }));
//!
//! // Three concurrent requests for user 7: one upstream call, three responses.
//! let a = svc.ready().await?.call(7);
//! let b = svc.ready().await?.call(7);
//! let c = svc.ready().await?.call(7);
//! let (a, b, c) = tokio::join!(a, b, c);
//! assert_eq!((a?, b?, c?).0, "profile 7");
//! let snap = handle.snapshot();
//! assert_eq!((snap.counter("leaders"), snap.counter("followers")), (Some(1), Some(2)));
//! # Ok(())
//! # }
//! ```
//!
//! # Semantics
//!
//! - **Identity.** The [key function](CoalesceBuilder::key) decides which requests are
//!   identical; the key must capture everything that affects the response. Only the leader's
//!   request is sent upstream: **the other callers' requests are never sent anywhere**, they
//!   get the leader's response. One layer value applied to several routes (or services of the
//!   same response type) **coalesces across them when keys are equal**, so keys should include
//!   what distinguishes routes.
//! - **While a call for key K is in flight**, further requests for K wait for its result.
//!   When it ends, its entry leaves the in-flight table before anyone is woken, so the next
//!   request for K starts a new call. Nothing is cached, errors included.
//! - **Cancellation.** The shared call keeps running while at least one caller is attached,
//!   whichever caller started it; no caller ever gets an error because another went away.
//!   When every caller has dropped its future, the shared future is dropped (cancelling the
//!   upstream call) and the key is free. The call never runs twice concurrently for one key.
//! - **Results.** The response is delivered to every caller: all but the last to take it get
//!   a clone, hence the bound `Response: Clone` (for a large response, map it to an `Arc<_>`
//!   first, e.g. with `tower::ServiceBuilder::map_response(Arc::new)`, so clones are cheap).
//!   The response type is unchanged, so the layer stacks with others.
//! - **Errors** reach every caller as a [`SharedError`] (`Arc`-shared, `source()` = the inner
//!   error). [`error::find`](crate::error::find) sees through it; reach the inner error by type
//!   with [`find_inner`] or [`SharedError::downcast_ref`]. Every caller gets this wrapper,
//!   even when nobody shared the call, so handling does not depend on timing.
//! - **Panics.** The shared future is polled under `catch_unwind`. Every caller but the one
//!   whose poll panicked gets a [`BreakwaterError`](crate::error::BreakwaterError) of kind
//!   [`Panicked`](crate::error::ErrorKind::Panicked); **the caller whose poll panicked gets the
//!   panic itself**, resumed on its task after the others were served (exactly what it would
//!   have got without coalescing, so panic-catching layers and `JoinHandle`s still see it).
//!   Nobody hangs, and the key is free at once.
//! - **No busy loop.** Exactly one attached caller *drives* the shared future (polls it with
//!   its own waker); the others register their waker once and are woken only when the result
//!   is ready, or, one of them, when the driver leaves. A waiting caller is therefore polled
//!   at most twice (register, take the result), unless it is picked to take over driving, or
//!   was picked and then overtaken by another caller (then a third poll re-registers it).
//!   A caller future kept alive but never polled again while it drives stalls the call for
//!   every caller of the key, as it would stall its own call: drop futures you stop polling.
//!
//! # Bounds
//!
//! `S: Service<Req> + Clone + Send + 'static`, `S::Future: Send + 'static`,
//! `S::Response: Clone + Send + 'static`, `S::Error: Into<BoxError>`, `Req: Send + 'static`,
//! key `K: Hash + Eq + Send + 'static`. `Send` and `'static` because the shared call outlives
//! the caller that started it and may be driven from any task.
//!
//! # Admission and `Clone`
//!
//! Following the crate's [admission rule](crate#the-admission-rule), `poll_ready` always
//! returns `Ready(Ok(()))` and reserves nothing. The key is computed in `call`; a leader's
//! shared call then drives readiness of a **clone** of the inner service and calls it, so a
//! follower never touches the inner service (it consumes no permit, token or connection of
//! an inner layer). The inner service must be `Clone`; wrap a non-`Clone` service in
//! `tower::buffer::Buffer`.
//!
//! # Metrics, events, snapshots
//!
//! - `breakwater_coalesce_calls_total{name, role}`: calls by `role`, `leader` (went upstream)
//!   or `follower` (shared a call in flight);
//! - `breakwater_coalesce_in_flight_keys{name}`: keys with a shared call in flight;
//! - `breakwater_coalesce_followers_per_call{name}`: followers of each shared call, recorded
//!   when it ends (opt-in: [`followers_histogram(true)`](CoalesceBuilder::followers_histogram)).
//!
//! Events: [`EventKind::Coalesced`](crate::event::EventKind::Coalesced) when a call whose
//! result went to at least one follower ends, and
//! [`EventKind::Panicked`](crate::event::EventKind::Panicked) when a shared call panics.
//! [`CoalesceHandle::snapshot`] has counters `leaders`, `followers`, `panics`, `abandoned`
//! and the gauge `in_flight_keys`.
//!
//! # Shared state
//!
//! A `CoalesceLayer` value owns its state: every service it produces, and every clone of
//! those, share one in-flight table per (key type, response type), so a framework that calls
//! `layer()` per route still coalesces across routes (by key). Independent layers never
//! coalesce with each other.
//!
//! # Design
//!
//! - **In-flight table.** Sharded (four shards per core, a power of two), each shard a
//!   `hashbrown::HashTable` under a `parking_lot::Mutex`. A shard lock is held only to find,
//!   insert or remove one entry (and, for a leader, to build its shared call: a clone of the
//!   inner service and two allocations), never while a future is polled or a waker woken.
//!   Entries keep their hash and are removed by slot identity, so a finished call never
//!   needs its key again: no `K: Clone`, no key clone per call. (A general concurrent map
//!   such as `dashmap` removes by key, which would force a key clone per call; ours is the
//!   few lines that avoid it.) The hash is std's `RandomState` (SipHash), since keys are
//!   often built from client input.
//! - **Shared call.** One `Arc` per call (the slot: a mutex over the phase, the waiter list
//!   and the future; an atomic count of attached callers). The future is stored as
//!   `Pin<Box<F>>`, its concrete type, not a trait object: pinning it in place inside the
//!   shared slot would need `unsafe` code, which the crate forbids, so the box is the second
//!   allocation. While polling, the driver takes the box out of the mutex, so no lock is held
//!   across the poll. The waiter list is a `slab::Slab<Option<Waker>>` (amortized growth;
//!   removal in O(1) when a waiter leaves). The slot is seen through a trait object by the
//!   table, so one table serves services with different future types.
//! - **Cost.** A leader allocates twice (slot and boxed future; the table's own storage grows
//!   amortized and keeps its capacity). A follower allocates nothing of its own; the first
//!   waiters of a call grow its waiter list (one allocation for up to four waiters). The
//!   result moves to the last caller to take it, so an uncontended call clones nothing.
//!
//! ## Why no model checker
//!
//! Every transition of a shared call happens under its slot mutex, except two, both argued
//! here. (1) *Attaching* increments the attached count under the entry's shard lock, and a
//! count can drop to zero only under that same lock while the entry is in the table (a
//! leaving caller that might be the last takes the shard lock, decrements, and removes the
//! entry if it reached zero); so no follower can attach to an abandoned call, and the last
//! caller is decided exactly. (2) *Finishing* removes the entry (shard lock) before storing
//! the value and waking waiters (slot lock), so every caller that attached is either woken or
//! sees the value on its next poll, and callers arriving later start a new call. The value
//! is moved out only by the caller whose decrement took the count to zero, under the slot
//! lock, after which no caller is left to clone it. Locks are never nested (shard and slot
//! locks are taken one at a time), so there is no lock-order deadlock. The multi-thread
//! tests exercise these paths on a real runtime.

mod core;
mod error;
mod future;
mod layer;
mod service;

#[allow(unused_imports)] // the response cache builds on the core
pub(crate) use self::core::{End, Hooks, Join, Role, Stats, Table};
pub use error::{SharedError, find_inner};
pub use future::ResponseFuture;
pub use layer::{CoalesceBuilder, CoalesceHandle, CoalesceLayer, NoKey};
pub use service::Coalesce;
