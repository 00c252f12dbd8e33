//! The one snapshot shape every layer's handle returns.
//!
//! A [`Snapshot`] is a point-in-time copy of one layer instance: its name, its kind, its state
//! (for layers with a state machine) and named counters and gauges. Names of counters and
//! gauges are stable, lower-case identifiers documented on each layer's `snapshot()`. Taking
//! a snapshot is meant for debug endpoints and tests, not for the hot path: it allocates.
//!
//! # JSON
//!
//! With the `serde` feature, `Snapshot` implements `serde::Serialize` with these stable field
//! names (serialized with `serde_json`):
//!
//! ```json
//! {"name":"fraud-api","layer":"circuit_breaker","state":"open",
//!  "counters":{"rejected":12},"gauges":{"failure_rate":0.6}}
//! ```
//!
//! `layer` is [`LayerKind::as_str`]; `state` is `null` for layers without a state machine;
//! `counters` (unsigned integers) and `gauges` (numbers) are objects with keys sorted.

use std::collections::BTreeMap;

use crate::error::LayerKind;

/// A point-in-time copy of one layer instance's state and counters.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The instance name.
    pub name: String,
    /// The kind of layer.
    pub layer: LayerKind,
    /// The current state, for layers with a state machine (e.g. `"closed"`); `None` otherwise.
    pub state: Option<&'static str>,
    /// Monotonic counts since the layer was built (e.g. `"timeouts"`).
    pub counters: BTreeMap<&'static str, u64>,
    /// Current values (e.g. `"in_flight"`, `"failure_rate"` as a ratio in 0.0..=1.0).
    pub gauges: BTreeMap<&'static str, f64>,
}

impl Snapshot {
    /// An empty snapshot for `layer` named `name`.
    pub fn new(layer: LayerKind, name: &str) -> Self {
        Snapshot {
            name: name.to_owned(),
            layer,
            state: None,
            counters: BTreeMap::new(),
            gauges: BTreeMap::new(),
        }
    }

    /// Sets the state; returns `self` for chaining.
    pub fn with_state(mut self, state: &'static str) -> Self {
        self.state = Some(state);
        self
    }

    /// Adds a counter; returns `self` for chaining.
    pub fn with_counter(mut self, key: &'static str, value: u64) -> Self {
        self.counters.insert(key, value);
        self
    }

    /// Adds a gauge; returns `self` for chaining.
    pub fn with_gauge(mut self, key: &'static str, value: f64) -> Self {
        self.gauges.insert(key, value);
        self
    }

    /// A counter by key; `None` if this layer has no such counter.
    pub fn counter(&self, key: &str) -> Option<u64> {
        self.counters.get(key).copied()
    }

    /// A gauge by key; `None` if this layer has no such gauge.
    pub fn gauge(&self, key: &str) -> Option<f64> {
        self.gauges.get(key).copied()
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Snapshot {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Snapshot", 5)?;
        s.serialize_field("name", &self.name)?;
        s.serialize_field("layer", self.layer.as_str())?;
        s.serialize_field("state", &self.state)?;
        s.serialize_field("counters", &self.counters)?;
        s.serialize_field("gauges", &self.gauges)?;
        s.end()
    }
}
