//! The breaker's state transitions: when the window trips, when half-open ends, the wait in
//! Open, and publishing a transition (hot word, gauges, snapshot accounting, events).

use super::*;

impl Shared {
    /// Moves to Open because of `tripped`, held for `hold` (the delay asked for by the
    /// result whose recording opened it) when that ends later than the wait.
    pub(super) fn open(
        &self,
        core: &mut Core,
        tripped: Totals,
        hold: Option<Duration>,
        now: &mut Now,
        out: &mut Transitions,
    ) {
        core.tripped = tripped;
        self.transition(core, State::Open, now, out);
        if let (Some(delay), Some(max), Some(until)) =
            (hold, self.cfg.retry_after_hold, core.open_until)
        {
            let hold = delay.min(max);
            let held = now.get().checked_add(hold);
            if held.is_none_or(|h| h > until) {
                self.set_open_until(core, held);
                core.held = true;
                out.held = Some(hold);
            }
        }
    }

    /// Sets the end of the Open period (`None`: never) in the core and the lock-free word.
    pub(super) fn set_open_until(&self, core: &mut Core, until: Option<Instant>) {
        let nanos = until.map_or(u64::MAX, |u| self.nanos_since_origin(u));
        // An end the lock-free word cannot represent is infinite on both paths.
        core.open_until = until.filter(|_| nanos != u64::MAX);
        self.open_until.store(nanos, Ordering::Relaxed);
    }

    /// The trip condition in Closed, evaluated after every recorded outcome.
    pub(super) fn trips_closed(&self, window: &Window, t: &Totals) -> bool {
        match window {
            Window::Consecutive { limit, run } => run >= limit,
            _ => {
                t.calls >= self.cfg.minimum_calls
                    && (t.failure_rate() >= self.cfg.failure_rate_threshold
                        || self
                            .cfg
                            .slow_call_rate_threshold
                            .is_some_and(|s| t.slow_rate() >= s))
            }
        }
    }

    /// Decides a half-open period as soon as its result is certain: Open once the failures
    /// (or slow calls) among the N permitted probes reach the threshold whatever the rest do;
    /// Closed once they cannot reach it even if every remaining probe fails (or is slow).
    pub(super) fn decide_half_open(&self, p: &Totals) -> Option<State> {
        let n = self.cfg.permitted_in_half_open;
        let remaining = n - p.calls;
        let slow_t = self.cfg.slow_call_rate_threshold;
        let reached = |bad: u64, t: f64| ratio(bad, n) >= t;
        if reached(p.failures, self.cfg.failure_rate_threshold)
            || slow_t.is_some_and(|t| reached(p.slow, t))
        {
            Some(State::Open)
        } else if !reached(p.failures + remaining, self.cfg.failure_rate_threshold)
            && !slow_t.is_some_and(|t| reached(p.slow + remaining, t))
        {
            Some(State::Closed)
        } else {
            None
        }
    }

    /// The maximum time in HalfOpen has passed since the period's first probe was admitted.
    /// A period in which no probe was admitted never expires (it has nothing to wait for).
    pub(super) fn half_open_expired(&self, core: &Core, now: &mut Now) -> bool {
        match (self.cfg.max_time_in_half_open, core.probes.first) {
            (Some(max), Some(first)) => now.get().saturating_duration_since(first) >= max,
            _ => false,
        }
    }

    /// Applies a transition that time has made due: Open past its wait to HalfOpen, HalfOpen
    /// past its maximum time (counted from its first probe) to Open.
    pub(super) fn apply_due(&self, core: &mut Core, now: &mut Now, out: &mut Transitions) {
        if core.state == State::Open && core.open_until.is_some_and(|u| now.get() >= u) {
            self.transition(core, State::HalfOpen, now, out);
        } else if core.state == State::HalfOpen && self.half_open_expired(core, now) {
            core.tripped = core.probes.totals;
            self.transition(core, State::Open, now, out);
        }
    }

    /// The wait of the `trips`-th consecutive Open period.
    pub(super) fn wait(&self, trips: u32) -> Duration {
        let base = self.cfg.wait_in_open;
        match self.cfg.backoff {
            None => base,
            Some((multiplier, max)) => {
                let exp = i32::try_from(trips.saturating_sub(1)).unwrap_or(i32::MAX);
                let secs = base.as_secs_f64() * multiplier.powi(exp);
                if secs >= max.as_secs_f64() {
                    max
                } else {
                    Duration::from_secs_f64(secs).min(max)
                }
            }
        }
    }

    /// Moves to `to` (a new generation), bringing the metrics up to date.
    pub(super) fn transition(
        &self,
        core: &mut Core,
        to: State,
        now: &mut Now,
        out: &mut Transitions,
    ) {
        let now = now.get();
        let from = core.state;
        self.account(core, now);
        core.entered = now;
        core.state = to;
        core.generation += 1;
        core.held = false;
        match to {
            State::Closed => {
                core.window.reset();
                core.trips = 0;
                self.metrics.set_rates(&Totals::default());
            }
            State::Open => {
                core.trips = core.trips.saturating_add(1);
                self.set_open_until(core, now.checked_add(self.wait(core.trips)));
            }
            State::HalfOpen => {
                core.probes = Probes::default();
                self.metrics.set_rates(&Totals::default());
            }
            State::ForcedOpen | State::Disabled => {}
        }
        if from != to {
            self.metrics.transitions[from.index()][to.index()].increment(1);
            out.push(from, to);
        }
        self.metrics.set_state(to);
        self.publish(core);
    }

    /// Stores the hot word for the core's current state.
    pub(super) fn publish(&self, core: &Core) {
        let clean = core.state == State::Closed && core.window.clean();
        let word = Hot::new(core.state, core.generation, clean).0;
        if self.hot.word.load(Ordering::Relaxed) != word {
            self.hot.word.store(word, Ordering::Release);
        }
    }

    /// Adds the time spent in the current state since it was last accounted. The counter
    /// of a state is the whole milliseconds of the nanoseconds spent in it in total, so the
    /// sub-millisecond remainder of a period is carried to the state's next period.
    pub(super) fn account(&self, core: &mut Core, now: Instant) {
        if now <= core.accounted_to {
            return;
        }
        let nanos =
            u64::try_from(now.duration_since(core.accounted_to).as_nanos()).unwrap_or(u64::MAX);
        core.accounted_to = now;
        let i = core.state.index();
        let before = core.state_nanos[i];
        let after = before.saturating_add(nanos);
        core.state_nanos[i] = after;
        let delta = after / 1_000_000 - before / 1_000_000;
        if delta > 0 {
            self.metrics.state_time[i].increment(delta);
        }
    }

    pub(super) fn emit(&self, out: Transitions) {
        for (from, to) in out.list.into_iter().flatten() {
            self.events.emit(|| EventKind::StateTransition {
                from: from.as_str(),
                to: to.as_str(),
            });
        }
        if let Some(hold) = out.held {
            self.events.emit(|| EventKind::HeldOpen { hold });
        }
    }
}
