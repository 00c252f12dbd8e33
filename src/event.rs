//! Typed events: state transitions, rejections, timeouts, refreshes.
//!
//! Every layer's builder takes listeners with `on_event(|event| ...)`; the layer calls each
//! listener synchronously, on the task that caused the event, in the order they were added.
//! A layer with no listener builds no event and reads no clock for one: the whole cost is a
//! check that a slice is empty. With the `tracing` cargo feature, every event is also emitted
//! as a `tracing` event (target `tower_breakwater`, fields `layer`, `name`, `event`):
//! transitions at `WARN` when they open a breaker and `INFO` otherwise (`HeldOpen`, a breaker
//! held open by a `Retry-After`, at `WARN`); a panicked shared call at `WARN` (a bug in the
//! upstream code that every caller of the call pays for); other per-call events (rejections,
//! timeouts, early refreshes, stale serves, refresh failures, coalesced calls) at `DEBUG`, and
//! rate-limiter waits, the most frequent, at `TRACE`.
//!
//! Listeners must be cheap and must not panic: a panicking listener unwinds into the caller
//! that triggered the event.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use tower_breakwater::event::EventKind;
//! use tower_breakwater::timeout::TimeoutLayer;
//!
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = seen.clone();
//! let layer = TimeoutLayer::builder()
//!     .name("fraud-api")
//!     .timeout(Duration::from_millis(200))
//!     .on_event(move |e| {
//!         if let EventKind::TimedOut { after } = e.kind() {
//!             log.lock().unwrap().push((e.name().to_owned(), after));
//!         }
//!     })
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Instant;
use crate::error::{ErrorKind, LayerKind};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// A state machine changed state (states are the layer's own lower-case names, e.g. a
    /// breaker's `"closed"`, `"open"`, `"half_open"`).
    StateTransition {
        /// The state left.
        from: &'static str,
        /// The state entered.
        to: &'static str,
    },
    /// A circuit breaker that has just opened stays Open for `hold`, longer than its own
    /// wait, because the response whose outcome opened it asked for that delay (an HTTP
    /// `Retry-After`, capped by the breaker's configured maximum). Emitted right after the
    /// `StateTransition` to `"open"`, only with the breaker's Retry-After hold on.
    HeldOpen {
        /// Time from this event until the breaker becomes half-open.
        hold: Duration,
    },
    /// The layer refused a call without running it.
    Rejected {
        /// Why.
        kind: ErrorKind,
        /// Time until a retry can succeed, where known.
        retry_after: Option<Duration>,
    },
    /// A call ran past its deadline and was cancelled.
    TimedOut {
        /// The deadline that applied to the call.
        after: Duration,
    },
    /// A call was admitted after waiting for its slot (a rate limiter in wait mode).
    Waited {
        /// How long it waited, on tokio's clock, from `call` to its admission.
        waited: Duration,
    },
    /// A cache started a probabilistic early refresh.
    EarlyRefresh,
    /// A cache served a value past its expiry because the upstream failed.
    StaleServed,
    /// A cache refresh or fetch failed.
    RefreshFailed,
    /// A shared (coalesced) call panicked; its waiters got an error.
    Panicked,
    /// A shared (coalesced) call ended and its result (value or error) went to `followers`
    /// callers besides the one that started it (emitted only when `followers >= 1`).
    Coalesced {
        /// Callers that shared the call without going upstream.
        followers: u64,
    },
}

impl EventKind {
    /// `true` for events that concern one call (logged at `DEBUG` with `tracing`, `TRACE` for
    /// [`Waited`](EventKind::Waited), `WARN` for [`Panicked`](EventKind::Panicked)), `false`
    /// for state changes of the layer itself.
    pub fn is_per_call(&self) -> bool {
        !matches!(
            self,
            EventKind::StateTransition { .. } | EventKind::HeldOpen { .. }
        )
    }
}

/// One event, lent to each listener.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    layer: LayerKind,
    name: &'a str,
    kind: EventKind,
    at: Instant,
}

impl Event<'_> {
    /// The kind of layer that emitted it.
    pub fn layer(&self) -> LayerKind {
        self.layer
    }

    /// The instance name of the layer that emitted it.
    pub fn name(&self) -> &str {
        self.name
    }

    /// What happened.
    pub fn kind(&self) -> EventKind {
        self.kind
    }

    /// When it happened, on tokio's clock (so the paused test clock applies).
    pub fn at(&self) -> Instant {
        self.at
    }
}

/// A listener: called with every event of the layers it was given to.
pub type Listener = Arc<dyn Fn(&Event<'_>) + Send + Sync>;

/// The listeners of one layer instance. Cloning shares them.
#[derive(Clone)]
pub(crate) struct Events {
    layer: LayerKind,
    name: Arc<str>,
    listeners: Arc<[Listener]>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("layer", &self.layer)
            .field("name", &self.name)
            .field("listeners", &self.listeners.len())
            .finish()
    }
}

#[allow(dead_code)] // each layer uses what it needs
impl Events {
    pub(crate) fn new(layer: LayerKind, name: Arc<str>, listeners: Vec<Listener>) -> Self {
        Events {
            layer,
            name,
            listeners: listeners.into(),
        }
    }

    /// `true` when something listens (a listener, or `tracing` with the feature on).
    #[inline]
    pub(crate) fn is_active(&self) -> bool {
        !self.listeners.is_empty() || cfg!(feature = "tracing")
    }

    /// Emits an event. `kind` is only evaluated, and the clock only read, when something
    /// listens.
    #[inline]
    pub(crate) fn emit(&self, kind: impl FnOnce() -> EventKind) {
        if self.is_active() {
            self.emit_slow(kind());
        }
    }

    #[cold]
    #[inline(never)]
    fn emit_slow(&self, kind: EventKind) {
        #[cfg(feature = "tracing")]
        trace_event(self.layer, &self.name, &kind);
        if self.listeners.is_empty() {
            return;
        }
        let event = Event {
            layer: self.layer,
            name: &self.name,
            kind,
            at: crate::clock::now(),
        };
        for l in self.listeners.iter() {
            l(&event);
        }
    }
}

#[cfg(feature = "tracing")]
fn trace_event(layer: LayerKind, name: &str, kind: &EventKind) {
    let layer = layer.as_str();
    match kind {
        EventKind::StateTransition { to, .. } if *to == "open" || *to == "forced_open" => {
            tracing::warn!(target: "tower_breakwater", layer, name, event = ?kind, "state transition")
        }
        EventKind::HeldOpen { .. } => {
            tracing::warn!(target: "tower_breakwater", layer, name, event = ?kind, "held open")
        }
        EventKind::StateTransition { .. } => {
            tracing::info!(target: "tower_breakwater", layer, name, event = ?kind, "state transition")
        }
        EventKind::Panicked => {
            tracing::warn!(target: "tower_breakwater", layer, name, event = ?kind, "call event")
        }
        EventKind::Waited { .. } => {
            tracing::trace!(target: "tower_breakwater", layer, name, event = ?kind, "call event")
        }
        _ => tracing::debug!(target: "tower_breakwater", layer, name, event = ?kind, "call event"),
    }
}
