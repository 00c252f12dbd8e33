//! Metrics: every name, unit, description and label set the crate emits, in one place.
//!
//! Layers emit through the [`metrics`](https://docs.rs/metrics) facade, so any recorder
//! (Prometheus, StatsD, OpenTelemetry bridges, an in-memory one in tests) receives them.
//!
//! # Naming scheme (the default [`MetricsProfile::Breakwater`])
//!
//! Prometheus conventions: every name starts with `breakwater_` and the layer kind
//! (`breakwater_timeout_…`, `breakwater_circuit_breaker_…`); counters end in `_total`; duration
//! histograms are in seconds and end in `_seconds`; time accumulated in a counter (which the
//! facade makes a `u64`) is in whole milliseconds and ends in `_milliseconds_total`. Every series
//! carries a `name` label with the instance's name (`"default"` unless the builder was given
//! one), so dashboards tell dependencies apart. Two instances built with the same name and kind
//! write the same series: their values add up (counters) or overwrite each other (gauges). Give
//! every instance its own name unless that is what you want.
//!
//! The full list is [`names::ALL`]; the README has it as a table.
//!
//! # When handles are registered
//!
//! A layer registers all of its metric handles once, in its builder's `build()`, with the
//! recorder that is current at that moment (the global one, or a thread-local one set with
//! [`metrics::with_local_recorder`]). Calls then update those handles directly: no lookup by
//! name, no `String` built per call. Consequently **install your recorder before you build
//! your layers**: a layer built before any recorder was installed holds no-op handles and
//! emits nothing for its whole life, even after a recorder is installed later. (Rebuild the
//! layer if you must.) Descriptions (`describe_*`) are sent at the same time.
//!
//! # Profiles and durations
//!
//! The naming scheme is chosen per layer at build time through its builder's
//! `metrics_profile(..)`, never per call, so layers with different profiles coexist in one
//! process. [`MetricsProfile::Off`] registers nothing at all. Duration histograms are opt-in
//! per layer (`record_durations(true)` on its builder), because they cost a clock read or two
//! per call that the layer's own semantics may not need; a profile whose names are timers
//! turns duration recording on for the layers built with it (documented on the profile).

pub mod names;
pub mod resilience4j;

use std::sync::Arc;

use ::metrics::{Counter, Gauge, GaugeFn, Histogram, Key, Label, Level, Metadata, Unit};

use self::resilience4j::Translation;
use crate::error::LayerKind;

/// The naming scheme a layer emits its metrics under, chosen at build time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum MetricsProfile {
    /// The crate's own names (`breakwater_…`), listed in [`names`]. Duration histograms only
    /// when the layer's `record_durations(true)` is set.
    #[default]
    Breakwater,
    /// resilience4j-compatible names and labels (as its Micrometer binders publish them to
    /// Prometheus) where resilience4j has an equivalent, our own names elsewhere; the mapping
    /// is in [`resilience4j`]. resilience4j's breaker call metric is a timer, so this profile
    /// turns duration recording on for circuit breakers built with it.
    Resilience4j,
    /// Register nothing: every handle is a no-op, whatever recorder is installed.
    Off,
}

/// What kind of metric a [`MetricSpec`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// A monotonically increasing `u64`.
    Counter,
    /// A value that goes up and down (`f64`).
    Gauge,
    /// A distribution of observed values (`f64`).
    Histogram,
}

impl MetricKind {
    /// `"counter"`, `"gauge"` or `"histogram"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// One metric the crate emits: its name, kind, unit, labels and meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricSpec {
    /// The full metric name under [`MetricsProfile::Breakwater`].
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The unit of its values.
    pub unit: Unit,
    /// The labels it carries besides `name` (which every series has).
    pub labels: &'static [&'static str],
    /// What it means, as sent to the recorder's `describe_*`.
    pub description: &'static str,
}

static METADATA: Metadata<'static> =
    Metadata::new("tower_breakwater", Level::INFO, Some("tower_breakwater"));

/// Registers handles for one layer instance, with its name label and profile. Used only at
/// build time.
#[derive(Debug, Clone)]
pub(crate) struct Registrar {
    name: Arc<str>,
    profile: MetricsProfile,
}

#[allow(dead_code)] // each layer uses the kinds it needs
impl Registrar {
    pub(crate) fn new(name: Arc<str>, profile: MetricsProfile) -> Self {
        Registrar { name, profile }
    }

    /// `false` when the profile registers nothing.
    pub(crate) fn enabled(&self) -> bool {
        self.profile != MetricsProfile::Off
    }

    /// `true` when a layer of `kind` must record durations: the user asked for them, or the
    /// profile's names include a timer for that layer.
    pub(crate) fn durations(&self, kind: LayerKind, asked: bool) -> bool {
        match self.profile {
            MetricsProfile::Off => false,
            MetricsProfile::Breakwater => asked,
            MetricsProfile::Resilience4j => asked || resilience4j::needs_durations(kind),
        }
    }

    /// The key a metric is registered under, and the factor its values are multiplied by;
    /// `None` when the profile does not emit it.
    fn resolve(
        &self,
        spec: &MetricSpec,
        labels: &[(&'static str, &'static str)],
    ) -> Option<(&'static str, Key, f64, &'static str)> {
        debug_assert_eq!(
            labels.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            spec.labels,
            "labels of {} do not match its spec",
            spec.name
        );
        let name_label = Label::new("name", self.name.clone());
        match self.profile {
            MetricsProfile::Off => None,
            MetricsProfile::Breakwater => Some(self.native(spec, labels, name_label)),
            MetricsProfile::Resilience4j => match resilience4j::translate(spec, labels) {
                Translation::Keep => Some(self.native(spec, labels, name_label)),
                Translation::Skip => None,
                Translation::Rename {
                    name,
                    label,
                    scale,
                    help,
                } => {
                    let mut all = vec![name_label];
                    all.extend(label.map(|(k, v)| Label::new(k, v)));
                    let help = help.unwrap_or(spec.description);
                    Some((name, Key::from_parts(name, all), scale, help))
                }
            },
        }
    }

    fn native(
        &self,
        spec: &MetricSpec,
        labels: &[(&'static str, &'static str)],
        name_label: Label,
    ) -> (&'static str, Key, f64, &'static str) {
        let mut all = Vec::with_capacity(labels.len() + 1);
        all.push(name_label);
        all.extend(labels.iter().map(|(k, v)| Label::new(*k, *v)));
        (
            spec.name,
            Key::from_parts(spec.name, all),
            1.0,
            spec.description,
        )
    }

    /// A counter for `spec` with the given extra labels (in the order of `spec.labels`).
    pub(crate) fn counter(
        &self,
        spec: &'static MetricSpec,
        labels: &[(&'static str, &'static str)],
    ) -> Counter {
        let Some((name, key, _, help)) = self.resolve(spec, labels) else {
            return Counter::noop();
        };
        ::metrics::with_recorder(|r| {
            r.describe_counter(name.into(), Some(spec.unit), help.into());
            r.register_counter(&key, &METADATA)
        })
    }

    /// A gauge for `spec` with the given extra labels (in the order of `spec.labels`).
    pub(crate) fn gauge(
        &self,
        spec: &'static MetricSpec,
        labels: &[(&'static str, &'static str)],
    ) -> Gauge {
        let Some((name, key, scale, help)) = self.resolve(spec, labels) else {
            return Gauge::noop();
        };
        // A ratio scaled by 100 is a percentage.
        let unit = if scale == 100.0 {
            Unit::Percent
        } else {
            spec.unit
        };
        let gauge = ::metrics::with_recorder(|r| {
            r.describe_gauge(name.into(), Some(unit), help.into());
            r.register_gauge(&key, &METADATA)
        });
        if scale == 1.0 {
            gauge
        } else {
            Gauge::from_arc(Arc::new(Scaled {
                inner: gauge,
                scale,
            }))
        }
    }

    /// A histogram for `spec` with the given extra labels (in the order of `spec.labels`).
    pub(crate) fn histogram(
        &self,
        spec: &'static MetricSpec,
        labels: &[(&'static str, &'static str)],
    ) -> Histogram {
        let Some((name, key, _, help)) = self.resolve(spec, labels) else {
            return Histogram::noop();
        };
        ::metrics::with_recorder(|r| {
            r.describe_histogram(name.into(), Some(spec.unit), help.into());
            r.register_histogram(&key, &METADATA)
        })
    }
}

/// A gauge whose values are multiplied by a constant (ratios published as percentages).
struct Scaled {
    inner: Gauge,
    scale: f64,
}

impl GaugeFn for Scaled {
    fn increment(&self, value: f64) {
        self.inner.increment(value * self.scale);
    }

    fn decrement(&self, value: f64) {
        self.inner.decrement(value * self.scale);
    }

    fn set(&self, value: f64) {
        self.inner.set(value * self.scale);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ::metrics::{KeyName, Recorder, SharedString};

    use super::*;

    /// Records the unit of every gauge described.
    #[derive(Default)]
    struct Units(Mutex<Vec<(String, Option<Unit>)>>);

    impl Recorder for Units {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, name: KeyName, unit: Option<Unit>, _: SharedString) {
            self.0
                .lock()
                .unwrap()
                .push((name.as_str().to_owned(), unit));
        }
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn ratios_published_in_percent_are_described_in_percent() {
        let units = Units::default();
        ::metrics::with_local_recorder(&units, || {
            for profile in [MetricsProfile::Breakwater, MetricsProfile::Resilience4j] {
                let reg = Registrar::new("x".into(), profile);
                let _ = reg.gauge(&names::CIRCUIT_BREAKER_FAILURE_RATE, &[]);
                let _ = reg.gauge(&names::BULKHEAD_AVAILABLE, &[]);
            }
        });
        let got = units.0.into_inner().unwrap();
        let expect = |n: &str, u| (n.to_owned(), Some(u));
        assert_eq!(
            got,
            [
                expect("breakwater_circuit_breaker_failure_rate", Unit::Count),
                expect("breakwater_bulkhead_available_permits", Unit::Count),
                expect("resilience4j_circuitbreaker_failure_rate", Unit::Percent),
                expect(
                    "resilience4j_bulkhead_available_concurrent_calls",
                    Unit::Count
                ),
            ]
        );
    }
}
