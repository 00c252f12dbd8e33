//! The breaker's shared state and state machine.
//!
//! One hot word (state, generation, clean bit) is read lock-free on every call; everything
//! else lives behind one mutex that only the cold paths take (see the module docs of
//! [`circuit_breaker`](super) for which paths are which). Every write to the hot word and to
//! `open_until` happens with the mutex held, so writers are serialised and a lock-free reader
//! only ever acts on a value that was current at the moment it read it.
//!
//! The clock is never read here unless a caller-provided [`Now`] is asked for it, which
//! happens only where the semantics need a time: entering or leaving a timed state, the time
//! window, and snapshots. The loom model drives this core with a fixed [`Now`].

use std::sync::Arc;
use std::time::Duration;

use super::State;
use super::metrics::{Metrics, REJECTED, outcome_index};
use super::state::Hot;
use super::sync::{AtomicBool, AtomicU64, Mutex, Ordering};
use super::window::{Totals, Window, ratio};
use crate::classify::Outcome;
use crate::clock::{self, Instant};
use crate::error::LayerKind;
use crate::event::{EventKind, Events};
use crate::snapshot::Snapshot;

mod transition;

/// Validated configuration.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) failure_rate_threshold: f64,
    /// `Some` turns slow-call detection on.
    pub(super) slow_call_rate_threshold: Option<f64>,
    pub(super) slow_call_duration: Duration,
    /// For the rate-based windows.
    pub(super) minimum_calls: u64,
    pub(super) permitted_in_half_open: u64,
    pub(super) wait_in_open: Duration,
    /// `(multiplier, maximum)` of an exponentially growing wait.
    pub(super) backoff: Option<(f64, Duration)>,
    pub(super) max_time_in_half_open: Option<Duration>,
    /// `Some(max)` turns the Retry-After hold on: an Open period opened by a response asking
    /// for a delay lasts at least that delay, at most `max`.
    pub(super) retry_after_hold: Option<Duration>,
}

/// A lazily read clock: reads tokio's clock at most once, and only if asked.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Now(Option<Instant>);

impl Now {
    /// A `Now` that will read the clock when first asked.
    pub(super) fn lazy() -> Now {
        Now(None)
    }

    /// A `Now` fixed at `at` (already read, or a model's time).
    pub(super) fn at(at: Instant) -> Now {
        Now(Some(at))
    }

    pub(super) fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(clock::now)
    }
}

/// The admission of one call: the generation it was admitted in, and whether it holds a
/// half-open probe slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ticket {
    pub(super) generation: u64,
    pub(super) probe: bool,
}

/// Undoes an admission whose caller never received it, when dropped armed: a listener
/// panicking in `Shared::admit_slow`, or the inner service panicking in `call` before the
/// call's guard exists.
pub(super) struct Undo<'a> {
    shared: &'a Shared,
    ticket: Option<Ticket>,
}

impl<'a> Undo<'a> {
    /// Armed for `ticket`.
    #[inline]
    pub(super) fn new(shared: &'a Shared, ticket: Ticket) -> Self {
        Undo {
            shared,
            ticket: Some(ticket),
        }
    }

    /// The admission was handed over: nothing to undo.
    #[inline]
    pub(super) fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.shared.cancel(t, None);
        }
    }
}

/// Probe bookkeeping of one half-open period.
#[derive(Debug, Default, Clone, Copy)]
struct Probes {
    in_flight: u64,
    totals: Totals,
    /// When the period's first probe was admitted: the start of its maximum time.
    first: Option<Instant>,
}

/// Number of [`State`]s.
const STATES: usize = 5;

/// Everything behind the lock.
#[derive(Debug)]
pub(super) struct Core {
    state: State,
    generation: u64,
    entered: Instant,
    /// Up to when the state-time counters have been brought.
    accounted_to: Instant,
    /// Nanoseconds spent in each state (by [`State::index`]); each state's counter holds the
    /// whole milliseconds of its total, so no period's remainder is lost.
    state_nanos: [u64; STATES],
    window: Window,
    probes: Probes,
    /// Totals that caused the last trip, shown by snapshots while Open.
    tripped: Totals,
    /// Trips since the breaker was last Closed (1 in the first Open period).
    trips: u32,
    /// End of the wait in Open; `None` when effectively infinite (too far to represent in
    /// the lock-free word, about 584 years from the layer's build).
    open_until: Option<Instant>,
    /// The current Open period's end was set by a Retry-After hold (longer than its wait).
    held: bool,
}

/// Transitions made under the lock, emitted as events once it is released.
#[derive(Debug, Default)]
pub(super) struct Transitions {
    list: [Option<(State, State)>; 3],
    /// A Retry-After hold applied to the Open period just entered: its length.
    held: Option<Duration>,
}

impl Transitions {
    fn push(&mut self, from: State, to: State) {
        if let Some(slot) = self.list.iter_mut().find(|s| s.is_none()) {
            *slot = Some((from, to));
        }
    }
}

/// The words every call reads, side by side (one cache line).
#[derive(Debug)]
#[repr(C, align(16))]
struct HotLine {
    /// State, generation and clean bit ([`Hot`]).
    word: AtomicU64,
    /// Set when the last layer, service and handle is dropped: a spare reference parked in a
    /// thread's cache is then garbage (see [`spare`](crate::spare)).
    closed: AtomicBool,
}

/// State shared by a layer, its services, their futures and handles.
#[derive(Debug)]
pub(super) struct Shared {
    hot: HotLine,
    /// Nanoseconds from `origin` to the end of the wait in Open; valid while the hot word
    /// says Open.
    open_until: AtomicU64,
    origin: Instant,
    core: Mutex<Core>,
    pub(super) cfg: Config,
    pub(super) name: Arc<str>,
    metrics: Metrics,
    pub(super) events: Events,
    rejected: AtomicU64,
    /// Calls need a start time (slow-call detection or duration histograms).
    pub(super) timed: bool,
}

crate::spare::impl_spare!(Shared, hot.closed);

impl Shared {
    pub(super) fn new(
        cfg: Config,
        window: Window,
        name: Arc<str>,
        metrics: Metrics,
        events: Events,
        origin: Instant,
    ) -> Shared {
        let timed = cfg.slow_call_rate_threshold.is_some() || metrics.durations.is_some();
        let clean = window.clean();
        metrics.set_state(State::Closed);
        metrics.set_rates(&Totals::default());
        Shared {
            hot: HotLine {
                word: AtomicU64::new(Hot::new(State::Closed, 0, clean).0),
                closed: AtomicBool::new(false),
            },
            open_until: AtomicU64::new(0),
            origin,
            core: Mutex::new(Core {
                state: State::Closed,
                generation: 0,
                entered: origin,
                accounted_to: origin,
                state_nanos: [0; STATES],
                window,
                probes: Probes::default(),
                tripped: Totals::default(),
                trips: 0,
                open_until: None,
                held: false,
            }),
            cfg,
            name,
            metrics,
            events,
            rejected: AtomicU64::new(0),
            timed,
        }
    }

    // ---- per call -------------------------------------------------------------------------

    /// Admits a call, or returns the time left in Open (`None` where unknown) for a rejection.
    ///
    /// Closed and Disabled: one atomic load. ForcedOpen: one load. Open: one load and a clock
    /// read, the lock only once the wait has passed. HalfOpen: the lock.
    #[inline]
    pub(super) fn admit(&self) -> Result<Ticket, Option<Duration>> {
        let hot = Hot(self.hot.word.load(Ordering::Acquire));
        match hot.state() {
            State::Closed | State::Disabled => Ok(Ticket {
                generation: hot.generation(),
                probe: false,
            }),
            State::ForcedOpen => Err(None),
            State::Open => {
                let now = clock::now();
                let until = self.open_until.load(Ordering::Relaxed);
                let since = self.nanos_since_origin(now);
                if since < until {
                    // `u64::MAX`: an effectively infinite wait, which has no retry-after (as
                    // on the locked path).
                    return Err((until != u64::MAX).then(|| Duration::from_nanos(until - since)));
                }
                self.admit_slow(&mut Now::at(now))
            }
            State::HalfOpen => self.admit_slow(&mut Now::lazy()),
        }
    }

    fn nanos_since_origin(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    #[cold]
    pub(super) fn admit_slow(&self, now: &mut Now) -> Result<Ticket, Option<Duration>> {
        let mut out = Transitions::default();
        let result = {
            let mut core = self.core.lock();
            self.apply_due(&mut core, now, &mut out);
            match core.state {
                State::Closed | State::Disabled => Ok(Ticket {
                    generation: core.generation,
                    probe: false,
                }),
                State::Open => Err(core
                    .open_until
                    .map(|u| u.saturating_duration_since(now.get()))),
                State::ForcedOpen => Err(None),
                State::HalfOpen => {
                    let p = &mut core.probes;
                    if p.in_flight + p.totals.calls < self.cfg.permitted_in_half_open {
                        p.in_flight += 1;
                        if p.first.is_none() {
                            p.first = Some(now.get());
                        }
                        Ok(Ticket {
                            generation: core.generation,
                            probe: true,
                        })
                    } else {
                        Err(None)
                    }
                }
            }
        };
        // A listener panicking on a transition must not keep the slot just taken: the
        // caller's guard does not exist yet, so the admission is undone here on unwind.
        let undo = result.ok().map(|t| Undo::new(self, t));
        self.emit(out);
        if let Some(undo) = undo {
            undo.disarm();
        }
        result
    }

    /// Counts a rejected call (metrics, snapshot, event).
    pub(super) fn rejected(&self, retry_after: Option<Duration>) {
        self.metrics.calls[REJECTED].increment(1);
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.events.emit(|| EventKind::Rejected {
            kind: crate::error::ErrorKind::CircuitOpen,
            retry_after,
        });
    }

    fn is_slow(&self, elapsed: Option<Duration>) -> bool {
        self.cfg.slow_call_rate_threshold.is_some()
            && elapsed.is_some_and(|e| e > self.cfg.slow_call_duration)
    }

    /// [`complete_with`](Self::complete_with) for a call whose result asks for no delay.
    #[cfg(all(test, loom))]
    pub(super) fn complete(&self, t: Ticket, outcome: Outcome, elapsed: Option<Duration>) {
        self.complete_with(t, outcome, elapsed, || None);
    }

    /// Records the outcome of a finished call. `elapsed` is `Some` when the call was timed.
    /// `retry_after` gives the delay the result asks for (an HTTP `Retry-After`); it is
    /// called only with the Retry-After hold on, for a failure the breaker may still record
    /// (a non-probe call's generation is checked first), and never under the lock.
    ///
    /// A fast success in a Closed breaker whose window is clean, in the generation it was
    /// admitted in, touches nothing shared (one atomic load); an ignored or stale outcome of
    /// a non-probe call neither.
    #[inline]
    pub(super) fn complete_with(
        &self,
        t: Ticket,
        outcome: Outcome,
        elapsed: Option<Duration>,
        retry_after: impl FnOnce() -> Option<Duration>,
    ) {
        let idx = outcome_index(outcome);
        self.metrics.calls[idx].increment(1);
        if let (Some(h), Some(d)) = (&self.metrics.durations, elapsed) {
            h[idx].record(d.as_secs_f64());
        }
        let slow = self.is_slow(elapsed);
        if slow {
            self.metrics.slow_calls.increment(1);
        }
        if !t.probe {
            let word = self.hot.word.load(Ordering::Acquire);
            if outcome == Outcome::Success && !slow && word == Hot::closed_clean(t.generation) {
                return;
            }
            let hot = Hot(word);
            if outcome == Outcome::Ignored
                || hot.generation() != t.generation
                || hot.state() != State::Closed
            {
                return;
            }
        }
        let hold = if outcome == Outcome::Failure && self.cfg.retry_after_hold.is_some() {
            retry_after()
        } else {
            None
        };
        self.record(t, outcome, slow, hold, &mut Now::lazy());
    }

    /// A call whose future was dropped before it finished: it frees its probe slot, and with
    /// slow-call detection on, a call cancelled after running longer than the slow-call
    /// duration is recorded as a slow call that is not a failure.
    #[cold]
    #[inline(never)]
    pub(super) fn cancel(&self, t: Ticket, elapsed: Option<Duration>) {
        let slow = self.is_slow(elapsed);
        if slow {
            self.metrics.slow_calls.increment(1);
        }
        if !t.probe && !slow {
            return;
        }
        let outcome = if slow {
            Outcome::Success
        } else {
            Outcome::Ignored
        };
        self.record(t, outcome, slow, None, &mut Now::lazy());
    }

    /// Records an outcome under the lock. `hold` is the delay the call's result asked for.
    #[cold]
    pub(super) fn record(
        &self,
        t: Ticket,
        outcome: Outcome,
        slow: bool,
        hold: Option<Duration>,
        now: &mut Now,
    ) {
        let mut out = Transitions::default();
        {
            let mut core = self.core.lock();
            self.record_locked(&mut core, t, outcome, slow, hold, now, &mut out);
        }
        self.emit(out);
    }

    #[allow(clippy::too_many_arguments)] // the outcome's parts, as `record` passes them
    fn record_locked(
        &self,
        core: &mut Core,
        t: Ticket,
        outcome: Outcome,
        slow: bool,
        hold: Option<Duration>,
        now: &mut Now,
        out: &mut Transitions,
    ) {
        if t.generation != core.generation {
            return; // admitted in an earlier state period
        }
        let failure = outcome == Outcome::Failure;
        match core.state {
            State::Closed if outcome != Outcome::Ignored => {
                core.window.record(failure, slow, || now.get());
                let totals = core.window.totals(|| now.get());
                self.metrics.set_rates(&totals);
                if self.trips_closed(&core.window, &totals) {
                    self.open(core, totals, hold, now, out);
                } else {
                    self.publish(core);
                }
            }
            State::HalfOpen if t.probe => {
                core.probes.in_flight -= 1;
                if self.half_open_expired(core, now) {
                    self.open(core, core.probes.totals, hold, now, out);
                    return;
                }
                if outcome == Outcome::Ignored {
                    return;
                }
                let p = &mut core.probes.totals;
                p.calls += 1;
                p.failures += u64::from(failure);
                p.slow += u64::from(slow);
                let p = *p;
                self.metrics.set_rates(&p);
                match self.decide_half_open(&p) {
                    Some(State::Open) => self.open(core, p, hold, now, out),
                    Some(to) => self.transition(core, to, now, out),
                    None => {}
                }
            }
            _ => {}
        }
    }

    // ---- handle ---------------------------------------------------------------------------

    /// The current state, after applying a transition that time has made due.
    pub(super) fn state(&self, now: &mut Now) -> State {
        let mut out = Transitions::default();
        let state = {
            let mut core = self.core.lock();
            self.apply_due(&mut core, now, &mut out);
            core.state
        };
        self.emit(out);
        state
    }

    /// Moves to `to` through the handle (a no-op when already there, except that a reset of
    /// a Closed breaker still clears its window).
    pub(super) fn force(&self, to: State, now: &mut Now) {
        let mut out = Transitions::default();
        {
            let mut core = self.core.lock();
            if core.state != to || to == State::Closed {
                self.transition(&mut core, to, now, &mut out);
            }
        }
        self.emit(out);
    }

    /// Probe slots in use (in flight plus recorded) in the current half-open period.
    #[cfg(loom)]
    pub(super) fn probes_taken(&self) -> u64 {
        let core = self.core.lock();
        core.probes.in_flight + core.probes.totals.calls
    }

    /// Seconds left in a Retry-After hold (infinite for a hold past what the clock can
    /// represent); 0 when the breaker is not held Open.
    fn hold_left(core: &Core, at: Instant) -> f64 {
        match (core.state, core.held, core.open_until) {
            (State::Open, true, Some(u)) => u.saturating_duration_since(at).as_secs_f64(),
            (State::Open, true, None) => f64::INFINITY,
            _ => 0.0,
        }
    }

    pub(super) fn snapshot(&self, now: &mut Now) -> Snapshot {
        let mut out = Transitions::default();
        let snap = {
            let mut core = self.core.lock();
            self.apply_due(&mut core, now, &mut out);
            let at = now.get();
            self.account(&mut core, at);
            let totals = match core.state {
                State::HalfOpen => core.probes.totals,
                State::Open => core.tripped,
                _ => core.window.totals(|| at),
            };
            if matches!(core.state, State::Closed) {
                self.metrics.set_rates(&totals);
            }
            let in_state = at.saturating_duration_since(core.entered);
            let snap = Snapshot::new(LayerKind::CircuitBreaker, &self.name)
                .with_state(core.state.as_str())
                .with_gauge("failure_rate", totals.failure_rate())
                .with_gauge("slow_call_rate", totals.slow_rate())
                .with_gauge("calls_in_window", totals.calls as f64)
                .with_gauge("time_in_state_seconds", in_state.as_secs_f64())
                .with_gauge(
                    "probes_in_flight",
                    if core.state == State::HalfOpen {
                        core.probes.in_flight as f64
                    } else {
                        0.0
                    },
                )
                .with_counter("rejected", self.rejected.load(Ordering::Relaxed));
            if self.cfg.retry_after_hold.is_some() {
                snap.with_gauge("retry_after_hold_seconds", Self::hold_left(&core, at))
            } else {
                snap
            }
        };
        self.emit(out);
        snap
    }
}
