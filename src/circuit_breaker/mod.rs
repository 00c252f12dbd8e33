//! A circuit breaker: stop calling a dependency that is failing, probe it after a wait, and
//! resume when it has recovered.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow, State};
//! use tower_breakwater::{error, error::ErrorKind, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = CircuitBreakerLayer::builder()
//!     .name("payments")
//!     .sliding_window(SlidingWindow::count_based(4))
//!     .failure_rate_threshold(0.5)
//!     .wait_in_open(Duration::from_secs(5))
//!     .build()?;
//! let breaker = layer.handle();
//! let svc = ServiceBuilder::new().layer(layer).service(service_fn(|ok: bool| async move {
//!     if ok { Ok(()) } else { Err(std::io::Error::other("502")) }
//! }));
//!
//! for ok in [false, true, false, true] {
//!     let _ = svc.clone().oneshot(ok).await;
//! }
//! assert_eq!(breaker.state(), State::Open); // 2 failures out of 4: 50%
//!
//! let err = svc.clone().oneshot(true).await.unwrap_err();
//! let ours = error::find(err.as_ref()).unwrap();
//! assert_eq!(ours.kind(), ErrorKind::CircuitOpen);
//! assert_eq!(ours.name(), "payments");
//! assert_eq!(ours.retry_after(), Some(Duration::from_secs(5)));
//!
//! tokio::time::advance(Duration::from_secs(5)).await;
//! assert_eq!(breaker.state(), State::HalfOpen);
//! # Ok(())
//! # }
//! ```
//!
//! # Semantics
//!
//! The state machine, the thresholds and their defaults follow resilience4j's
//! `CircuitBreaker` (<https://resilience4j.readme.io/docs/circuitbreaker>), with the
//! departures listed here.
//!
//! - **States** ([`State`]): Closed, Open, HalfOpen, and, through the
//!   [handle](CircuitBreakerHandle), ForcedOpen (reject all), Disabled (pass all; only the
//!   calls-by-outcome metrics record calls) and reset to Closed.
//! - **Failure models** ([`SlidingWindow`]): count-based (the last N outcomes, truly
//!   sliding: after 1,000 successes in a window of 10 at 50%, exactly 5 failures open it);
//!   time-based (the last T, in buckets of a configurable granularity, one second by
//!   default); consecutive failures (open after K in a row, as Polly's basic breaker).
//! - **Trip condition**, evaluated after *every* recorded outcome, successes included (so a
//!   success that completes a failing window opens it): with at least `minimum_calls`
//!   recorded (honoured before the window is full), the failure rate is at or above
//!   `failure_rate_threshold`, or, with slow-call detection on, the slow-call rate is at or
//!   above `slow_call_rate_threshold`. A slow call is one running longer than
//!   `slow_call_duration`; it counts in the slow-call rate whether it succeeded or failed.
//!   A slow call classified as ignored is counted in `_slow_calls_total` but is not
//!   recorded, so it is in neither the slow-call rate nor a half-open period's probes.
//! - **Open** rejects at once, without calling the inner service, with a
//!   [`BreakwaterError`](crate::error::BreakwaterError) of kind
//!   [`CircuitOpen`](crate::error::ErrorKind::CircuitOpen) carrying the instance name and,
//!   as `retry_after`, the time left in the wait (or in a [Retry-After hold](#retry-after-hold);
//!   none when the wait is effectively
//!   infinite: it ends more than about 584 years after the layer was built, as with
//!   `Duration::MAX`; such a breaker stays Open until reset). The wait is fixed, or grows exponentially
//!   with a cap across consecutive trips ([`exponential_wait`](CircuitBreakerBuilder::exponential_wait)).
//!   Open becomes HalfOpen lazily, at the first call or state read after the wait: there is
//!   no background task.
//! - **HalfOpen** admits `permitted_calls_in_half_open` = N probes per period, at most N in
//!   flight across all clones (later calls are rejected, without a retry-after). The probes'
//!   outcomes decide as soon as the result is certain: Open once the failures (or slow
//!   calls) among N reach the threshold whatever the rest do, Closed once they cannot reach
//!   it even if every remaining probe fails; with N = 1 the one outcome decides. The same
//!   rule applies in the consecutive-failures model. A probe whose future is dropped, or
//!   whose outcome is ignored, frees its slot at once.
//! - **Maximum time in HalfOpen** (60 s by default; resilience4j's
//!   `maxWaitDurationInHalfOpenState`, which is off there by default and counts from
//!   entering HalfOpen). It is counted from the admission of the period's **first probe**:
//!   once that long has passed and the probes have not decided, the breaker reopens
//!   (lazily, at the next call, probe outcome or state read; it counts as a trip for the
//!   exponential wait), so a probe that never completes cannot keep it half-open forever.
//!   A half-open period in which no probe has been admitted never expires: without traffic,
//!   state reads and snapshots (registry scrapes) leave it HalfOpen indefinitely, and the
//!   next call is a probe.
//! - **Generations.** Every state change starts a new state period. A call remembers the
//!   period it was admitted in; its outcome, if it arrives in a later period, is dropped: it
//!   is not recorded in the window, never causes a transition, never extends an Open period
//!   and never counts as a probe (it still shows in the calls-by-outcome counter). So calls
//!   that overhang a trip cause no second "opened" transition.
//! - **Cancelled calls** (future dropped before it finished) count as neither success nor
//!   failure, except that with slow-call detection on, a call cancelled after running
//!   longer than `slow_call_duration` is recorded as a slow call that is not a failure:
//!   a dependency that hangs behind an outer timeout still trips the breaker.
//! - **HTTP bodies.** By default a call ends when the inner service returns its response.
//!   With [`whole_body`](CircuitBreakerBuilder::whole_body) (`http` feature) it ends at the
//!   end of the response body: outcome and duration (slow calls) are measured to there, a
//!   body error is a failure, a probe holds its slot until then, and a body dropped early
//!   records the response's outcome (see [`completion`](crate::completion)).
//! - **Classification** by the layer's [`Classify`](crate::classify::Classify)
//!   ([`DefaultClassifier`](crate::classify::DefaultClassifier): errors are failures, except
//!   rejections by our layers further inside, which are ignored).
//!
//! # Retry-After hold
//!
//! Opt-in with [`retry_after_hold(max)`](CircuitBreakerBuilder::retry_after_hold): a
//! dependency that answers "come back in 30 s" (HTTP `429` or `503` with `Retry-After`, in
//! delay-seconds or as an HTTP-date, RFC 9110 section 10.2.3; anything else is ignored) is
//! not probed before then.
//!
//! - **Which responses.** The delay is read through the classifier's
//!   [`Classify::retry_after`](crate::classify::Classify::retry_after)
//!   ([`HttpClassifier`](crate::http::HttpClassifier) implements it; the breaker itself knows
//!   nothing of HTTP), only from a result classified as a failure, of a call admitted in the
//!   current state period, when its recorded outcome opens the breaker: a trip in Closed, a
//!   reopening in HalfOpen (a decisive failed probe, or a probe finishing past the maximum
//!   time in HalfOpen). Open admits no call, so a response that finds the breaker Open
//!   comes from a call admitted in an earlier period (before the trip, or a probe of an
//!   earlier half-open period): as for every late outcome, it never sets or extends the
//!   hold. One response never forces a Closed breaker open by itself: in Closed only the
//!   window's trip condition opens it, and a response asking for a delay without tripping
//!   it changes nothing.
//! - **How long.** The Open period ends at the later of its wait (fixed or
//!   [exponential](CircuitBreakerBuilder::exponential_wait), unchanged by the hold) and the
//!   opening instant plus the delay capped at `max`; a delay shorter than the wait changes
//!   nothing, and the hold never shortens the wait. Units: the delay is whole seconds from
//!   the response (an HTTP-date is converted with the wall clock, `SystemTime`, read only
//!   for that form); the hold runs on tokio's clock like every other wait. The cap keeps a
//!   server asking for a year from holding the breaker open for a year.
//! - **Afterwards** nothing differs: the breaker becomes HalfOpen lazily at the first call or
//!   state read after the hold, probes as usual, and a probe answered with another
//!   `Retry-After` reopens it with a new hold. The hold counts as the Open period it
//!   extends: one transition, one trip for the exponential wait, and the state gauges and
//!   `_state_milliseconds_total` show Open throughout (no separate state). Rejections during
//!   the hold carry the time left (wait or hold, whichever ends later) as `retry_after`, which
//!   [`rejection_response`](crate::http::rejection_response) turns into a `Retry-After` for
//!   callers of a server.
//! - **Visible** as [`EventKind::HeldOpen`](crate::event::EventKind) (the hold's length, right
//!   after the `StateTransition` to `"open"`, only when the hold outlasts the wait) and the
//!   snapshot gauge `retry_after_hold_seconds` (time left in a hold; 0 when not held; present
//!   only with the option on).
//! - **Cost.** None when off and none on the success path when on: the delay is asked for
//!   only for a failure about to be recorded (after the usual one atomic load, outside the
//!   lock); `HttpClassifier` then compares the status, and only for a `429` or `503` looks
//!   up and parses the header.
//!
//! # Defaults
//!
//! Count-based window of 100, `minimum_calls` = the window size (100 for a time window),
//! failure-rate threshold 0.5, slow-call detection off (slow-call duration 60 s once on),
//! 10 probes in HalfOpen, fixed wait in Open of 60 s, maximum time in HalfOpen 60 s: those of
//! resilience4j, except the maximum time in HalfOpen. Retry-After hold off.
//!
//! # Admission and `Clone`
//!
//! Following the crate's [admission rule](crate#the-admission-rule), `poll_ready` is always
//! ready and reserves nothing; admission (and taking a probe slot) happens in `call`, and a
//! rejection is returned without waiting for the inner service. An admitted call calls the
//! inner service in `call` when it is ready, and otherwise drives its readiness inside the
//! response future while a **clone** takes its place (see the
//! [admission rule](crate#the-admission-rule)), so the inner service must be `Clone` (wrap a
//! non-`Clone` service in `tower::buffer::Buffer`). A readiness error is a failed call.
//!
//! # Cost
//!
//! Closed state, count-based or consecutive model, slow-call detection and duration
//! histograms off: admission is one atomic load; a success is one more atomic load, and
//! when the window holds no failure and is full (the steady state of a healthy dependency)
//! it stores nothing shared at all, because evicting a success for a success changes
//! nothing. No lock, no allocation, no clock read.
//!
//! The response future must own a reference to the breaker (to record a failure), and
//! cloning and dropping an `Arc` per call are two atomic read-modify-writes on a cache line
//! shared by every thread: measured, they were most of the cost of a call (and the point of
//! contention between threads). So a finished future parks its reference in a small
//! per-thread cache (4 slots) and the next call on that thread takes it back; a miss falls
//! back to an ordinary clone. A cached reference does not keep a dropped breaker alive: when
//! its last layer, service and handle is dropped, the spare on that thread is dropped at
//! once, a call finishing later drops its reference instead of caching it, and every other
//! thread drops its spares of dropped breakers at its next finished call (a call loads a
//! process-wide count of dropped layers, written only when one is dropped, and sweeps its
//! cache only when the count changed); registries ignore spares. So a breaker's state, and
//! its event listeners, are freed as soon as its last owner and its last call in flight are
//! dropped, except that a spare parked earlier on another thread, which has been idle since,
//! lasts until that thread finishes or is refused a call through any breaker, or exits.
//!
//! A failure, or any outcome while the window is not clean, takes the breaker's mutex
//! (`parking_lot`), never held across an `.await`, the classifier or an event listener
//! (only the metrics recorder's handles are updated under it). The time-based window reads
//! the clock and takes the mutex for every outcome (its buckets move with time); slow-call
//! detection reads the clock at the first poll and at the end of each call. The Open path
//! reads the clock (for the time left) and allocates its boxed error (the crate's one
//! allocation per error); it takes the lock only once the wait has passed.
//!
//! # Metrics, events, snapshots
//!
//! All `breakwater_circuit_breaker_*`, with a `name` label:
//! `_state{state}` one gauge per state, 1 for the current and 0 for the others, all written
//! on every transition; `_transitions_total{from,to}`; `_state_milliseconds_total{state}`,
//! brought up to date at every transition and every snapshot (each state's counter is the
//! whole milliseconds of the total time spent in that state, kept in nanoseconds, so no
//! period's sub-millisecond remainder is lost and it is within 1 ms of that total); `_calls_total{outcome}` with
//! `success`, `failure`, `ignored` (as classified; cancelled calls are not counted) and
//! `rejected`; `_slow_calls_total` (with slow-call detection on); `_failure_rate` and
//! `_slow_call_rate`, updated as outcomes are recorded (and at snapshots); and, opt-in with
//! `record_durations(true)`, `_call_duration_seconds{outcome}`. Since no background task
//! runs, a transition that time has made due (and so the state gauge) is applied at the
//! next call, state read or snapshot.
//!
//! Every transition emits [`EventKind::StateTransition`](crate::event::EventKind) with the
//! state names of [`State::as_str`], after the breaker's lock is released (a listener may
//! read the handle), followed by [`EventKind::HeldOpen`](crate::event::EventKind) for an
//! Open period held by a [Retry-After](#retry-after-hold); every rejection emits
//! [`EventKind::Rejected`](crate::event::EventKind).
//! The handle's [`snapshot`](CircuitBreakerHandle::snapshot) lists its keys.
//!
//! # Shared state
//!
//! A `CircuitBreakerLayer` value owns its breaker: every service it produces, and every
//! clone of those, share it. A framework that calls `layer()` per route still gets one
//! breaker.
//!
//! # Concurrency and its check
//!
//! The state lives in one mutex-protected core plus one hot `AtomicU64` (state, generation,
//! clean bit) and one `AtomicU64` for the end of the wait in Open. Both atomics are written
//! only with the mutex held, so writers are serialised; lock-free readers act only on a
//! value that was current when they read it: a call admitted on a Closed word just before a
//! trip belongs to the old generation (its outcome is dropped), and a success skipped on a
//! clean word is ordered before any concurrent recording. Probe slots are counted under the
//! mutex. The core takes its notion of time as a parameter, so it is checked with
//! [loom](https://docs.rs/loom) without a clock: probe slots never exceed N across threads,
//! a freed slot is reusable, and a late outcome from an earlier generation never transitions.
//! Run the model with (a separate target directory keeps the normal build intact; the
//! models themselves run in well under a second):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib circuit_breaker::loom
//! ```

mod core;
mod future;
mod layer;
#[cfg(all(test, loom))]
mod loom;
mod metrics;
mod service;
mod state;
mod sync;
mod window;

pub use future::{Admission, ResponseFuture};
pub use layer::{
    CircuitBreakerBuilder, CircuitBreakerHandle, CircuitBreakerLayer, DEFAULT_WAIT, SlidingWindow,
};
pub use service::CircuitBreaker;
pub use state::State;

/// The response body of a [`CircuitBreaker`] made with
/// [`whole_body`](CircuitBreakerBuilder::whole_body): the inner body, recording the call's
/// outcome and duration when it ends, fails or is dropped.
#[cfg(feature = "http")]
pub type CircuitBreakerBody<B> = crate::completion::CallBody<B, Admission>;
