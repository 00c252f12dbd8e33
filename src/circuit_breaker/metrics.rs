//! The breaker's metric handles, registered once at build time (specs in
//! [`names`](crate::metrics::names)).

use ::metrics::{Counter, Gauge, Histogram};

use super::State;
use super::window::Totals;
use crate::classify::Outcome;
use crate::metrics::{Registrar, names};

/// Metric handles, registered at build time.
#[derive(Debug)]
pub(super) struct Metrics {
    pub(super) state: [Gauge; 5],
    /// `[from][to]`; the diagonal is never used.
    pub(super) transitions: [[Counter; 5]; 5],
    pub(super) state_time: [Counter; 5],
    /// success, failure, ignored, rejected.
    pub(super) calls: [Counter; 4],
    pub(super) slow_calls: Counter,
    pub(super) failure_rate: Gauge,
    pub(super) slow_call_rate: Gauge,
    pub(super) durations: Option<[Histogram; 3]>,
}

const OUTCOMES: [&str; 4] = ["success", "failure", "ignored", "rejected"];
pub(super) const REJECTED: usize = 3;

pub(super) fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Success => 0,
        Outcome::Failure => 1,
        Outcome::Ignored => 2,
    }
}

impl Metrics {
    pub(super) fn register(reg: &Registrar, durations: bool) -> Metrics {
        let states = State::ALL.map(State::as_str);
        Metrics {
            state: states.map(|s| reg.gauge(&names::CIRCUIT_BREAKER_STATE, &[("state", s)])),
            transitions: states.map(|from| {
                states.map(|to| {
                    if from == to {
                        Counter::noop()
                    } else {
                        reg.counter(
                            &names::CIRCUIT_BREAKER_TRANSITIONS,
                            &[("from", from), ("to", to)],
                        )
                    }
                })
            }),
            state_time: states
                .map(|s| reg.counter(&names::CIRCUIT_BREAKER_STATE_TIME, &[("state", s)])),
            calls: OUTCOMES.map(|o| reg.counter(&names::CIRCUIT_BREAKER_CALLS, &[("outcome", o)])),
            slow_calls: reg.counter(&names::CIRCUIT_BREAKER_SLOW_CALLS, &[]),
            failure_rate: reg.gauge(&names::CIRCUIT_BREAKER_FAILURE_RATE, &[]),
            slow_call_rate: reg.gauge(&names::CIRCUIT_BREAKER_SLOW_CALL_RATE, &[]),
            durations: reg
                .durations(crate::error::LayerKind::CircuitBreaker, durations)
                .then(|| {
                    [OUTCOMES[0], OUTCOMES[1], OUTCOMES[2]].map(|o| {
                        reg.histogram(&names::CIRCUIT_BREAKER_CALL_DURATION, &[("outcome", o)])
                    })
                }),
        }
    }

    /// Every other state's series goes to 0 before the current one goes to 1, so a scrape
    /// between the writes never sees two states at 1 (at most none, for an instant).
    pub(super) fn set_state(&self, current: State) {
        for s in State::ALL.into_iter().filter(|&s| s != current) {
            self.state[s.index()].set(0.0);
        }
        self.state[current.index()].set(1.0);
    }

    pub(super) fn set_rates(&self, t: &Totals) {
        self.failure_rate.set(t.failure_rate());
        self.slow_call_rate.set(t.slow_rate());
    }
}
