use std::fmt;

/// The state of a circuit breaker (resilience4j's state machine).
///
/// `Closed`, `Open` and `HalfOpen` are driven by recorded outcomes and time; `ForcedOpen` and
/// `Disabled` are entered only through the handle
/// ([`force_open`](super::CircuitBreakerHandle::force_open),
/// [`disable`](super::CircuitBreakerHandle::disable)) and left only through it
/// ([`reset`](super::CircuitBreakerHandle::reset) to `Closed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls pass and their outcomes are recorded in the window.
    Closed,
    /// Calls are rejected until the wait in Open has passed.
    Open,
    /// A limited number of probe calls pass; their outcomes decide between Closed and Open.
    HalfOpen,
    /// Every call is rejected until the handle resets the breaker.
    ForcedOpen,
    /// Every call passes and nothing is recorded in the window (calls are still counted in
    /// the metrics) until the handle resets the breaker.
    Disabled,
}

impl State {
    pub(super) const ALL: [State; 5] = [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::ForcedOpen,
        State::Disabled,
    ];

    /// The state as a stable, lower-case identifier (`"closed"`, `"open"`, `"half_open"`,
    /// `"forced_open"`, `"disabled"`), as used in the `state` metric label, in events and in
    /// snapshots.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }

    pub(super) const fn index(self) -> usize {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::ForcedOpen => 3,
            State::Disabled => 4,
        }
    }

    pub(super) const fn from_index(i: u64) -> State {
        match i {
            0 => State::Closed,
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::ForcedOpen,
            _ => State::Disabled,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The hot word: the state, the generation (state period) and the "clean window" bit, read
/// with one atomic load on every call. Written only with the core's lock held.
///
/// Layout: bits 0..3 state index, bit 3 clean, bits 4..64 generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hot(pub(super) u64);

const CLEAN: u64 = 1 << 3;

impl Hot {
    pub(super) const fn new(state: State, generation: u64, clean: bool) -> Hot {
        Hot(state.index() as u64 | if clean { CLEAN } else { 0 } | generation << 4)
    }

    #[inline]
    pub(super) const fn state(self) -> State {
        State::from_index(self.0 & 7)
    }

    #[inline]
    pub(super) const fn generation(self) -> u64 {
        self.0 >> 4
    }

    /// The word meaning "Closed in `generation` with a clean window".
    #[inline]
    pub(super) const fn closed_clean(generation: u64) -> u64 {
        CLEAN | generation << 4
    }
}
