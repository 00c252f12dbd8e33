//! Rate limiting with the generic cell rate algorithm (GCRA): one limiter shared by every
//! clone of a service ([`RateLimitLayer`]), or one per key extracted from each request
//! ([`KeyedRateLimitLayer`]), rejecting at once or letting callers wait up to a maximum.
//!
//! An external API that allows "100 calls per second" is protected by limiting our own
//! calls to it, and an API of ours is protected from one heavy client by limiting per
//! client. The limiter is configured with a **rate** (`count` calls per `period`) and a
//! **burst** (calls allowed back to back when the limiter has been idle).
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_breakwater::{error::{self, ErrorKind}, rate_limit::RateLimitLayer, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! // 10 calls per second, at most 2 back to back; reject when over.
//! let layer = RateLimitLayer::builder()
//!     .name("geo-api")
//!     .rate(10, Duration::from_secs(1))
//!     .burst(2)
//!     .build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|x: u32| async move { Ok::<_, std::io::Error>(x) }));
//!
//! assert_eq!(svc.clone().oneshot(1).await?, 1);
//! assert_eq!(svc.clone().oneshot(2).await?, 2);
//! let err = svc.clone().oneshot(3).await.unwrap_err();
//! let ours = error::find(err.as_ref()).unwrap();
//! assert_eq!(ours.kind(), ErrorKind::RateLimited);
//! // Exact: the next slot opens one emission interval (100 ms) after the first call.
//! assert_eq!(ours.retry_after(), Some(Duration::from_millis(100)));
//!
//! tokio::time::advance(Duration::from_millis(100)).await;
//! assert_eq!(svc.oneshot(4).await?, 4);
//! # Ok(())
//! # }
//! ```
//!
//! # The algorithm
//!
//! GCRA in its *virtual scheduling* form, as specified for ATM traffic policing in ITU-T
//! Recommendation I.371 and the ATM Forum Traffic Management Specification 4.0. Its whole
//! state is one **theoretical arrival time** (TAT): the time at which the limiter would be
//! back to the state "one call just made, at the sustained rate".
//!
//! - The **emission interval** `T = period / count`, rounded **up** to whole nanoseconds (so
//!   the enforced rate is never above the configured one; `3 per second` gives
//!   `T = 333_333_334 ns`).
//! - The **burst tolerance** `tau = T * (burst - 1)`.
//! - A call at time `t` **conforms** if `t >= TAT - tau`; it is then admitted and
//!   `TAT = max(TAT, t) + T`. A non-conforming call changes nothing.
//!
//! In wait mode the same rule gives each call its **emission time** `e = max(t, TAT - tau)`,
//! the first instant at which it conforms; the call is accepted if `e - t <= max_wait`, and
//! then (whether it waits or not) `TAT = max(TAT, t) + T`. Consequences, all exact to the
//! nanosecond: a limiter idle for at least `burst * T` admits `burst` calls at once; admitted
//! calls (at their emission times) never exceed `burst + floor(L / T)` in any interval of
//! length `L`; a rejected call's wait is `TAT - tau - t`.
//!
//! The TAT is a single `AtomicU64` (nanoseconds since an instant taken on tokio's clock in
//! `build()`), updated with one compare-and-swap per admitted call: no lock, no allocation,
//! one clock read per call (the time of the call is an input of the algorithm).
//!
//! **No arithmetic saturates.** A TAT never exceeds `t + T + tau + max_wait` for the `t` of
//! the call that set it, so `build()` requires `T + tau + max_wait` to be at most `u64::MAX`
//! nanoseconds less 100 years (about 484 years; a [`ConfigError`](crate::ConfigError)
//! naming `rate`, `burst` or `max_wait` otherwise): for the first 100 years after `build()`
//! every TAT fits. A limiter older than that rejects (as `RateLimited`, with the time until
//! a call would conform) a call whose new TAT would not fit, rather than clamping the TAT:
//! a clamped TAT would give every later waiter the same emission time and make a give-back
//! restore the wrong value.
//!
//! # Reject mode and wait mode
//!
//! - **Reject mode** ([`max_wait`](RateLimitBuilder::max_wait) zero, the default): a call that
//!   does not conform is rejected at once, in `call`, with a
//!   [`BreakwaterError`](crate::error::BreakwaterError) of kind
//!   [`ErrorKind::RateLimited`](crate::error::ErrorKind::RateLimited) whose
//!   [`retry_after`](crate::error::BreakwaterError::retry_after) is the exact time until a
//!   call would conform (`TAT - tau - t`), suitable for an HTTP `Retry-After` (round up to
//!   whole seconds).
//! - **Wait mode** (`max_wait` > 0): a call whose wait would exceed `max_wait` is rejected at
//!   once in the same way (its `retry_after` is still the time until a call would conform).
//!   Any other call reserves its slot in `call` (TAT advances then, so callers are served in
//!   the order of their calls), and its response future sleeps until the emission time.
//!   tokio's timers have millisecond resolution: a waiter is admitted at the first
//!   millisecond tick at or after its emission time, never before it, and so up to (not
//!   including) 1 ms after it: **a wait may exceed `max_wait` by up to 1 ms** (the wait
//!   histogram records the wait as it happened).
//! - **Wait mode needs `T >= 1 ms`** (at most 1,000 calls per second per limiter or key);
//!   `build()` returns a [`ConfigError`](crate::ConfigError) naming `max_wait` otherwise.
//!   The reason: waiters whose emission times fall within the same millisecond are released
//!   together at its tick, so with `T < 1 ms` up to `burst + ceil(1 ms / T) - 1` calls would
//!   reach the inner service at one instant (ten at once at 10,000 per second with a burst
//!   of 1), silently breaking the configured burst. The alternatives were worse: spacing
//!   waiters on whole ticks would cut the configured rate (to one call per tick at burst 1),
//!   and documenting a larger effective burst would make `burst` mean something else in one
//!   mode. Reject mode needs no timer and honours any `T` to the nanosecond; above 1,000
//!   calls per second, use it (or limit per key).
//! - **Bounds in wait mode** (`T >= 1 ms`, timer firing on its tick): at most `burst` calls
//!   are admitted at any one instant, since they all had emission times within the last
//!   millisecond; in any interval of length `L`, at most `burst + floor((L + 1 ms - 1 ns) /
//!   T)`, which is at most one more than GCRA's `burst + floor(L / T)` (two waiters due
//!   `T = 1.5 ms` apart may run on ticks 1 ms apart), and exactly it when `T` is a whole
//!   number of milliseconds. A runtime too busy to fire its timers on time releases together
//!   every waiter that came due meanwhile, as with any timer-based limiter.
//! - **Cost.** A call admitted at once reads the clock once, does one CAS and allocates
//!   nothing. A call that waits allocates once (its timer, boxed so that the response future
//!   of every other call stays small); it sleeps at least until the next millisecond tick
//!   anyway. A rejection allocates its boxed error.
//!
//! # Dropped waiters
//!
//! A waiter whose response future is dropped before it was admitted (before the poll at
//! which its emission time had come) gives its slot back **exactly when its reservation is
//! still the latest one**: no call has reserved a slot since, so the TAT still equals the
//! value its reservation set. One compare-and-swap then moves the TAT back by `T`, to exactly
//! its value before the reservation, as if the call had never been made, and the next caller
//! is not delayed by the unused slot. Waiters dropped in the reverse order of their
//! reservations (the latest first) thus all give their slots back.
//!
//! When a later call has reserved since, the slot stays consumed (the CAS fails): the later
//! caller already holds its emission time, and moving the TAT back would let a new caller be
//! scheduled at the same instant as it, over the burst. The cost is **per waiter**: each
//! dropped waiter that is not the latest reservation when dropped leaves one unused slot,
//! `T` of capacity (three such waiters cost `3T`). A future dropped after admission, or a call admitted at once, has used
//! its slot. The handle's snapshot counts `abandoned` waiters and those that `given_back`.
//!
//! # Keyed limiter
//!
//! [`RateLimitBuilder::keyed`] takes a key extractor `Fn(&Req) -> K`; each key gets its own
//! TAT with the builder's rate, burst and maximum wait. Keys live in a
//! [`dashmap::DashMap`]: a sharded map whose shards are each behind a reader-writer lock,
//! chosen because a lookup of a tracked key takes one shard's read lock and allocates
//! nothing (no global lock on the hot path), and because its `retain` holds each shard's
//! write lock while it visits it, which makes removing a key atomic with respect to calls of
//! that key (see below); it has no default features to turn off.
//!
//! - **Memory is bounded without user action.** A key whose TAT is at or before now has fully
//!   recovered (its whole burst is available): its state is equivalent to a fresh one, so it
//!   is removed by a **sweep** and recreated, fully recovered, on its next call. Sweeps run on
//!   calls: the first call at least [`sweep_interval`](RateLimitBuilder::sweep_interval)
//!   (default 1 s) after the previous sweep runs one, and an insert that finds the key count
//!   doubled since the last sweep (and at least 1,024) runs one; both are `O(keys)` and
//!   amortized over the calls in between. Reading the key count
//!   ([`RateLimitHandle::tracked_keys`], the snapshot) also sweeps first. The
//!   `breakwater_rate_limiter_keys` gauge is set whenever a call adds a key and after every
//!   sweep, and set again while the key count changed meanwhile, so that concurrent updates
//!   never leave it at an older count than the last one set.
//! - **Memory follows the keys.** A sweep that leaves fewer keys than a quarter of the map's
//!   capacity (and the capacity is at least 4,096) shrinks the map, so memory returns from
//!   the peak distinct-key count to about the keys tracked; growing again costs amortized
//!   O(1) per insert, as any growth.
//! - **Maximum keys** ([`max_keys`](RateLimitBuilder::max_keys), optional): a call with a new
//!   key while the limiter tracks that many keys is rejected with
//!   [`ErrorKind::TooManyKeys`](crate::error::ErrorKind::TooManyKeys) (its own reason, its
//!   own metric outcome). A tracked key is never evicted to make room: that would let one
//!   caller reset another's limit. Keys that have recovered do not hold places: a new key
//!   that finds the map full runs a sweep and tries once more. So that a flood of new keys
//!   at a full map cannot make every call sweep (`O(keys)` each), such sweeps run at most
//!   once per `sweep_interval / 8` (125 ms by default; one caller runs it, the others are
//!   rejected without waiting); a key that recovers just after one frees its place at the
//!   next, at most `sweep_interval / 8` later.
//! - **Cost.** A call with a tracked key: hashing the key, a shard read lock, one CAS, no
//!   allocation. A new key: a shard write lock and one allocation (its state). Keys are
//!   hashed with the standard library's randomly seeded SipHash, which resists hash flooding
//!   by clients that choose their own keys; [`hasher`](RateLimitBuilder::hasher) replaces it
//!   where keys are trusted.
//! - **Panics.** The key extractor runs in `call`, before anything is reserved: if it
//!   panics, the panic unwinds out of `call` to the caller, and the limiter is unchanged (no
//!   key added, no slot taken, no lock held).
//!
//! # Admission, `poll_ready` and `Clone`
//!
//! Following the crate's [admission rule](crate#the-admission-rule), `poll_ready` always
//! returns `Ready(Ok(()))` and reserves nothing; the slot is reserved (or the call rejected)
//! in `call`, without waiting for the inner service. A call admitted at once calls the inner
//! service in `call` when it is ready, and otherwise drives its readiness inside the
//! response future while a **clone** takes its place; a call that must wait clones the
//! inner service in `call` and drives the clone after its wait (see the
//! [admission rule](crate#the-admission-rule)). So the inner service must be `Clone`; wrap a
//! non-`Clone` service in `tower::buffer::Buffer`. A rejected call clones nothing and never
//! reaches the inner service.
//!
//! # Metrics, events and snapshots
//!
//! `breakwater_rate_limiter_calls_total{name, outcome}` with `outcome` one of `permitted`
//! (admitted at once), `waited` (admitted after a wait, counted at admission), `rejected`
//! (rate limited) and, keyed only, `too_many_keys`. With `record_durations(true)`,
//! `breakwater_rate_limiter_wait_duration_seconds{name}` records each admitted call's wait
//! (0 for calls admitted at once). `breakwater_rate_limiter_waiting{name}`: callers waiting
//! for their slot now. Direct only: `breakwater_rate_limiter_available_permits{name}`, the
//! calls that would be admitted at once, back to back (`0..=burst`), set after every call
//! and give-back and by every snapshot (the limiter recovers continuously in between, so an
//! idle limiter shows the value of its last call until the next call or snapshot; setting it
//! costs a gauge store per call when metrics are on, nothing with the `Off` profile). Keyed
//! only: `breakwater_rate_limiter_keys{name}`. Every call admitted after a wait emits
//! [`EventKind::Waited`](crate::event::EventKind::Waited) with its wait. Every
//! rejection emits [`EventKind::Rejected`](crate::event::EventKind::Rejected) with its kind
//! and, for `RateLimited`, its `retry_after`. The outcome of the inner call is not
//! classified: a limiter's outcomes are admissions. See [`RateLimitHandle::snapshot`].
//!
//! # Shared state
//!
//! A layer value owns its limiter: every service it produces, and every clone of those,
//! share one TAT (or one map of keys). A framework that calls `layer()` per route or per
//! connection still gets one limiter. Build independent layers for independent limits.
//!
//! # Concurrency
//!
//! The CAS protocol (concurrent reservations; a give-back racing a reservation) is model
//! checked with loom under every interleaving: `RUSTFLAGS="--cfg loom" cargo test --lib
//! --features rate-limit rate_limit::gcra::loom`. The argument for the general case:
//!
//! The direct limiter's state is one word changed only by compare-and-swap: each admission
//! is a CAS from the TAT it read to a pure function of that TAT and its own `t`, so
//! admissions are linearizable, and a CAS that lost is retried on the fresh value. A
//! give-back is a CAS from exactly the TAT its reservation set back to exactly the TAT that
//! reservation replaced.
//! Reservations only increase the TAT, and give-backs only undo the latest reservation, so
//! the reservations still in effect form a stack; the TAT equals a waiter's value again only
//! if every reservation made after it has been undone (no ABA: a value once passed is reached
//! again only by undoing down to it). The keyed limiter adds only the map, whose removals
//! (under a shard write lock, only of cells with `TAT <= now`) cannot interleave with a
//! call's lookup and CAS (under the same shard's read lock); a waiter that holds its cell
//! outside the lock has `TAT > now` until its emission time, so its cell is not removed
//! before it could give back, and a give-back to a cell removed later has no effect on
//! anyone. The key count is changed only under the shard write lock of the key concerned.

mod builder;
mod future;
mod gcra;
mod keyed;
mod layer;
mod service;

pub use builder::{DEFAULT_SWEEP_INTERVAL, Direct, Keyed, RateLimitBuilder};
pub use future::ResponseFuture;
pub use layer::{KeyedRateLimitLayer, RateLimitHandle, RateLimitLayer};
pub use service::{KeyedRateLimit, RateLimit};
