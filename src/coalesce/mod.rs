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
//!     .key(|user_id: &u64| Some(*user_id))
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
//!   identical: it returns `Some(key)`, or `None` for a request that must not share a call
//!   (it passes through: its own call to the inner service, not counted, no table entry, no
//!   allocation; its error is the inner error, not a [`SharedError`]). The same shape as the
//!   [cache's](crate::cache::CacheBuilder::key) key function, so
//!   [`HttpKey::key`](crate::http::HttpKey::key) serves both. The key must capture everything
//!   that affects the response. Only the leader's
//!   request is sent upstream: **the other callers' requests are never sent anywhere**, they
//!   get the leader's response. One layer value applied to several routes (or services of the
//!   same response type) **coalesces across them when keys are equal**, so keys should include
//!   what distinguishes routes.
//! - **While a call for key K is in flight**, further requests for K wait for its result.
//!   A caller joins when its response future is **first polled** (the key is computed in
//!   `call`): it becomes the leader if no call for K is in flight, a follower otherwise. A
//!   response future dropped before its first poll never joins, and its request goes nowhere.
//!   When a call ends, its entry leaves the in-flight table before anyone is woken, so the
//!   next request for K starts a new call. Nothing is cached, errors included.
//! - **Cancellation.** The shared call keeps running while at least one caller is attached,
//!   whichever caller started it; no caller ever gets an error because another went away.
//!   When every caller has dropped its future, the shared future is dropped (cancelling the
//!   upstream call) and the key is free. The call never runs twice concurrently for one key.
//! - **Results.** The response is delivered to every caller: each caller clones it on its
//!   own task, holding no lock of the layer (so callers clone in parallel, and a `Clone`
//!   implementation may call back into the layer), and the caller that lets go of the shared
//!   call last takes the original without cloning (when callers take the response at the
//!   same moment, more than one may clone, and the original is then dropped by the last).
//!   Hence the bounds `Response: Clone + Sync` (for a large response, map it to an `Arc<_>`
//!   first, e.g. with `tower::ServiceBuilder::map_response(Arc::new)`, so clones are cheap).
//!   The response type is unchanged, so the layer stacks with others. Coalescing judges no
//!   outcome (successes and errors are shared alike), so it takes no classifier.
//! - **Errors** reach every caller of a keyed request as a [`SharedError`] (`Arc`-shared, `source()` = the inner
//!   error). [`error::find`](crate::error::find) sees through it; reach the inner error by type
//!   with [`find_inner`] or [`SharedError::downcast_ref`]. Every keyed caller gets this
//!   wrapper, even when nobody shared the call, so handling does not depend on timing (a
//!   request without a key gets the inner error itself, always).
//! - **Panics.** The shared future is polled under `catch_unwind`. Every caller but the one
//!   whose poll panicked gets a [`BreakwaterError`](crate::error::BreakwaterError) of kind
//!   [`Panicked`](crate::error::ErrorKind::Panicked); **the caller whose poll panicked gets the
//!   panic itself**, resumed on its task after the others were served (exactly what it would
//!   have got without coalescing, so panic-catching layers and `JoinHandle`s still see it).
//!   Nobody hangs, and the key is free at once. User code that panics elsewhere (a
//!   response's `Clone`, the destructor of an abandoned upstream future, of a request or of
//!   a key) unwinds on the task that ran it, and only there: the call still leaves the
//!   table, its callers are still served, and its metrics (`in_flight_keys`, the followers
//!   histogram) and events are still updated, exactly once. A panic in the
//!   [key function](CoalesceBuilder::key) unwinds out of `call`, before anything joined.
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
//! `S::Response: Clone + Send + Sync + 'static`, `S::Error: Into<BoxError>`,
//! `Req: Send + 'static`, key function `F: Fn(&Req) -> Option<K> + Clone`, key
//! `K: Hash + Eq + Send + 'static`. `Send` and `'static` because
//! the shared call outlives the caller that started it and may be driven from any task;
//! `Sync` on the response because its callers clone the one shared response from their own
//! tasks at the same time, with no lock (as `futures::future::Shared` requires of its
//! output).
//!
//! # Admission and `Clone`
//!
//! Following the crate's [admission rule](crate#the-admission-rule), `poll_ready` always
//! returns `Ready(Ok(()))` and reserves nothing. `call` computes the key and clones the inner
//! service into the response future; a leader's shared call then drives readiness of that
//! **clone** and calls it, so a follower never touches the inner service (it consumes no
//! permit, token or connection of an inner layer; its clone is dropped unused). A request
//! without a key calls the inner service in `call` when it is ready, as every layer does
//! (see the [admission rule](crate#the-admission-rule)). The inner service must be `Clone`
//! (cheaply: once per keyed call); wrap a non-`Clone` service in `tower::buffer::Buffer`.
//!
//! # Metrics, events, snapshots
//!
//! - `breakwater_coalesce_calls_total{name, role}`: calls by `role`, `leader` (went upstream)
//!   or `follower` (shared a call in flight), counted when the caller joins (first poll);
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
//!   insert or remove one entry, never while a future is polled, a waker woken or a hook run.
//!   Entries keep their hash and a per-shard id, so a finished call removes its entry without
//!   its key: no `K: Clone`, no key clone per call. (A general concurrent map such as
//!   `dashmap` removes by key, which would force a key clone per call, an allocation for
//!   string keys; the sharded table is the few lines that avoid it.) The hash is std's
//!   `RandomState` (SipHash), since keys are often built from client input.
//! - **Shared call.** The leader boxes its future (`Pin<Box<dyn Future>>`: pinning it in
//!   place inside shared state would need `unsafe` code, which the crate forbids) and drives
//!   it from its own response future, holding no lock. Shared state, the *slot* (an `Arc`
//!   with a mutex over the phase, the waiter list and the future while nobody drives it, a
//!   write-once cell (`std::sync::OnceLock`) for the value, outside the mutex, and an atomic
//!   count of attached callers), is made only when the first follower arrives. A
//!   driver that leaves puts the future into the slot and wakes one waiter to take it. The
//!   waiter list keeps the first eight waiters' wakers inline in the slot (a vacant entry is
//!   reused), and later ones in an overflow `slab::Slab` (amortized doubling growth); its keys
//!   are stable, and a waiter that leaves is removed in O(1). Entries and slots are independent of the future's type, so one table
//!   serves services with different future types.
//! - **Cost.** A request without a key (`None`) allocates nothing and takes no lock: the
//!   key function, a clone of the inner service, and the inner call. On success, an
//!   uncontended call allocates once (the boxed future) and takes
//!   a shard lock twice (enter, leave); it makes no slot and clones nothing (the value moves
//!   to its only caller). A successful shared call allocates twice (boxed future, slot; the
//!   response and up to eight waiters' wakers are stored in the slot); beyond eight waiters,
//!   the overflow list's growth adds O(log n) allocations (room for four, then eight, ...: 4
//!   in all with fifteen followers); a follower allocates nothing of its own. A failed
//!   call allocates more: one `Arc` for the inner error (shared by its callers) and, per
//!   caller, the box of the returned [`BoxError`](crate::BoxError) (the [`SharedError`] or
//!   the panic error); the inner service's error itself is its own.
//!
//! ## Why no model checker
//!
//! The state of a shared call changes under two kinds of lock, never nested: the shard lock
//! of its entry and, once there is one, the slot's mutex. (1) *Joining* happens under the
//! shard lock: the first follower makes the slot there (counting the leader and itself as
//! attached), later followers increment the count there; a leader still alone ends or
//! abandons its call under that same lock, so no follower can attach to a call that is gone.
//! (2) The attached count drops to zero only under the shard lock while the entry is in the
//! table (a leaving caller that might be the last takes the lock, decrements, and removes the
//! entry if it reached zero), so the last caller is decided exactly and the future is dropped
//! once. (3) *Finishing* removes the entry (shard lock) before storing the value and waking
//! waiters (slot lock), so every caller that attached is woken or finds the value on its
//! next poll, and later callers start a new call. The value is written once into the slot,
//! before the phase turns done under the slot lock, and never changes afterwards; callers
//! read (clone) it holding no lock, and only the caller holding the last reference to the
//! slot (`Arc::try_unwrap`, decided atomically by the reference count) moves it out, when
//! nobody else can read it. No user code runs under either lock (futures and values are
//! moved in and out, and polled, cloned or dropped outside; the one exception is the key's
//! `Eq`, which a map must run under its lock), and the `ended` edge (metrics, events) is
//! run by a drop guard once the entry left the table, so a panic in user code neither
//! poisons the protocol nor skips the edge. (4) Driving is exclusive:
//! the future is held by one caller at a time, taken from or put back into the slot under
//! its lock, and a leaving driver nominates exactly one registered waiter. The multi-thread
//! tests exercise these paths, including a driver leaving while the other thread attaches.

pub(crate) mod core;
mod error;
mod future;
mod layer;
mod service;

#[allow(unused_imports)] // the response cache builds on the core
pub(crate) use self::core::{AnyTable, End, Hooks, Join, Role, Stats, Table};
pub use error::{SharedError, find_inner};
pub use future::ResponseFuture;
pub use layer::{CoalesceBuilder, CoalesceHandle, CoalesceLayer, NoKey};
pub use service::Coalesce;
