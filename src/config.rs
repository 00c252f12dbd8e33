//! Configuration errors and the validation rules every builder uses.
//!
//! Every layer is configured through a builder whose `build()` returns
//! `Result<Layer, `[`ConfigError`]`>`. A value outside its allowed range is an error naming the
//! layer, the field, the value given and the range allowed: never a silent clamp, never a
//! panic on user input.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::LayerKind;

/// The instance name used when a builder is not given one.
pub const DEFAULT_NAME: &str = "default";

/// A configuration value outside its allowed range, or a required value missing.
///
/// ```
/// use std::time::Duration;
/// use tower_breakwater::timeout::TimeoutLayer;
///
/// let err = TimeoutLayer::builder().timeout(Duration::ZERO).build().unwrap_err();
/// assert_eq!(err.field(), "timeout");
/// assert_eq!(
///     err.to_string(),
///     "invalid timeout config for `default`: `timeout` = 0ns, expected a duration > 0"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    layer: LayerKind,
    name: Arc<str>,
    field: &'static str,
    value: String,
    expected: &'static str,
}

impl ConfigError {
    pub(crate) fn new(
        layer: LayerKind,
        name: &Arc<str>,
        field: &'static str,
        value: impl fmt::Debug,
        expected: &'static str,
    ) -> Self {
        ConfigError {
            layer,
            name: name.clone(),
            field,
            value: format!("{value:?}"),
            expected,
        }
    }

    /// The kind of layer whose configuration is invalid.
    pub fn layer(&self) -> LayerKind {
        self.layer
    }

    /// The instance name given to the builder (`"default"` if none).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The builder field (method name) whose value is invalid, e.g. `"failure_rate_threshold"`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// The value given, formatted with `Debug` (`"<unset>"` for a missing required value).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The allowed range, in words, e.g. `"a ratio in (0.0, 1.0]"`.
    pub fn expected(&self) -> &'static str {
        self.expected
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} config for `{}`: `{}` = {}, expected {}",
            self.layer, self.name, self.field, self.value, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

/// The value shown for a required field that was never set.
#[derive(Clone, Copy)]
pub(crate) struct Unset;

impl fmt::Debug for Unset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<unset>")
    }
}

/// Validation helpers. Each returns `Ok(value)` or the [`ConfigError`] naming `field`.
#[derive(Clone, Debug)]
pub(crate) struct Validator {
    layer: LayerKind,
    name: Arc<str>,
}

#[allow(dead_code)] // each layer uses the rules it needs
impl Validator {
    /// Validates the instance name itself (non-empty) and returns a validator for the rest.
    pub(crate) fn new(layer: LayerKind, name: Arc<str>) -> Result<Self, ConfigError> {
        let v = Validator { layer, name };
        if v.name.is_empty() {
            return Err(v.error("name", "", "a non-empty instance name"));
        }
        Ok(v)
    }

    /// The validated instance name.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// An error for `field`.
    pub(crate) fn error(
        &self,
        field: &'static str,
        value: impl fmt::Debug,
        expected: &'static str,
    ) -> ConfigError {
        ConfigError::new(self.layer, &self.name, field, value, expected)
    }

    /// A required value that must be present.
    pub(crate) fn required<T>(
        &self,
        field: &'static str,
        value: Option<T>,
        expected: &'static str,
    ) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.error(field, Unset, expected))
    }

    /// A duration strictly greater than zero.
    pub(crate) fn positive_duration(
        &self,
        field: &'static str,
        d: Duration,
    ) -> Result<Duration, ConfigError> {
        if d.is_zero() {
            Err(self.error(field, d, "a duration > 0"))
        } else {
            Ok(d)
        }
    }

    /// A count of at least one.
    pub(crate) fn at_least_one(&self, field: &'static str, n: u64) -> Result<u64, ConfigError> {
        if n == 0 {
            Err(self.error(field, n, "a count >= 1"))
        } else {
            Ok(n)
        }
    }

    /// A ratio in `(0.0, 1.0]` (NaN rejected).
    pub(crate) fn ratio_open_closed(
        &self,
        field: &'static str,
        r: f64,
    ) -> Result<f64, ConfigError> {
        if r > 0.0 && r <= 1.0 {
            Ok(r)
        } else {
            Err(self.error(field, r, "a ratio in (0.0, 1.0]"))
        }
    }

    /// A finite number strictly greater than zero (NaN and infinity rejected).
    pub(crate) fn positive_finite(&self, field: &'static str, x: f64) -> Result<f64, ConfigError> {
        if x.is_finite() && x > 0.0 {
            Ok(x)
        } else {
            Err(self.error(field, x, "a finite number > 0"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Validator {
        Validator::new(LayerKind::CircuitBreaker, "pay".into()).unwrap()
    }

    #[test]
    fn rules_name_field_value_and_range() {
        let e = v()
            .ratio_open_closed("failure_rate_threshold", 1.5)
            .unwrap_err();
        assert_eq!(e.field(), "failure_rate_threshold");
        assert_eq!(e.value(), "1.5");
        assert_eq!(e.expected(), "a ratio in (0.0, 1.0]");
        assert_eq!(
            e.to_string(),
            "invalid circuit_breaker config for `pay`: `failure_rate_threshold` = 1.5, expected a ratio in (0.0, 1.0]"
        );
        assert!(v().ratio_open_closed("r", 0.0).is_err());
        assert!(v().ratio_open_closed("r", f64::NAN).is_err());
        assert_eq!(v().ratio_open_closed("r", 1.0), Ok(1.0));
        assert!(v().positive_duration("d", Duration::ZERO).is_err());
        assert!(v().at_least_one("n", 0).is_err());
        assert!(v().positive_finite("beta", f64::INFINITY).is_err());
        let e = v()
            .required::<u8>("timeout", None, "a duration > 0")
            .unwrap_err();
        assert_eq!(e.value(), "<unset>");
    }

    #[test]
    fn empty_name_is_an_error() {
        let e = Validator::new(LayerKind::Bulkhead, "".into()).unwrap_err();
        assert_eq!(e.field(), "name");
    }
}

/// Settings every layer's builder has: the instance name, the metrics profile, whether to
/// record duration histograms, and event listeners.
#[derive(Clone)]
pub(crate) struct Common {
    pub(crate) name: Arc<str>,
    pub(crate) profile: crate::metrics::MetricsProfile,
    pub(crate) record_durations: bool,
    pub(crate) listeners: Vec<crate::event::Listener>,
    pub(crate) registry: Option<crate::registry::Registry>,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            name: Arc::from(DEFAULT_NAME),
            profile: crate::metrics::MetricsProfile::default(),
            record_durations: false,
            listeners: Vec::new(),
            registry: None,
        }
    }
}

impl fmt::Debug for Common {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Common")
            .field("name", &self.name)
            .field("profile", &self.profile)
            .field("record_durations", &self.record_durations)
            .field("listeners", &self.listeners.len())
            .field("registry", &self.registry.is_some())
            .finish()
    }
}

#[allow(dead_code)] // each layer uses what it needs
impl Common {
    /// Validates the common settings and returns the validator for the layer's own fields.
    pub(crate) fn validator(&self, layer: LayerKind) -> Result<Validator, ConfigError> {
        Validator::new(layer, self.name.clone())
    }

    /// The registrar for this instance's metric handles.
    pub(crate) fn registrar(&self) -> crate::metrics::Registrar {
        crate::metrics::Registrar::new(self.name.clone(), self.profile)
    }

    /// Adds the instance's shared state to the builder's registry, if one was given.
    pub(crate) fn register<T: crate::registry::SnapshotSource + 'static>(&self, shared: &Arc<T>) {
        if let Some(r) = &self.registry {
            r.register(Arc::downgrade(shared));
        }
    }

    /// Adds an instance to the builder's registry through a snapshot function that returns
    /// `None` once the instance is gone (for state held in more than one `Arc`).
    pub(crate) fn register_fn(
        &self,
        source: impl Fn() -> Option<crate::snapshot::Snapshot> + Send + Sync + 'static,
    ) {
        if let Some(r) = &self.registry {
            r.register_fn(source);
        }
    }

    /// This instance's event listeners.
    pub(crate) fn events(&self, layer: LayerKind) -> crate::event::Events {
        crate::event::Events::new(layer, self.name.clone(), self.listeners.clone())
    }
}

/// The builder methods every layer has, written once. A builder using it has a field
/// `common: crate::config::Common`.
#[allow(unused_macros)] // unused when every layer feature is off
macro_rules! common_builder_methods {
    () => {
        /// Sets the instance name, used as the `name` label of every metric series, in
        /// errors, events and snapshots. Default `"default"`; an empty name is a
        /// [`ConfigError`](crate::config::ConfigError) from `build()`. Instances with equal
        /// names and kinds share metric series.
        pub fn name(mut self, name: impl Into<std::sync::Arc<str>>) -> Self {
            self.common.name = name.into();
            self
        }

        /// Chooses the metric naming scheme (default
        /// [`MetricsProfile::Breakwater`](crate::metrics::MetricsProfile::Breakwater)). Handles
        /// are registered in `build()` with the recorder current then.
        pub fn metrics_profile(mut self, profile: crate::metrics::MetricsProfile) -> Self {
            self.common.profile = profile;
            self
        }

        /// Turns the layer's duration histogram(s) on or off (default off). On, the layer
        /// reads tokio's clock where it needs a start and an end for each measured span.
        pub fn record_durations(mut self, on: bool) -> Self {
            self.common.record_durations = on;
            self
        }

        /// Adds an event listener; see [`event`](crate::event). Listeners are called
        /// synchronously, in the order added, and must not panic.
        pub fn on_event(
            mut self,
            listener: impl Fn(&crate::event::Event<'_>) + Send + Sync + 'static,
        ) -> Self {
            self.common.listeners.push(std::sync::Arc::new(listener));
            self
        }

        /// Adds the instance to `registry` when built, so that
        /// [`Registry::snapshot`](crate::registry::Registry::snapshot) includes it. Off by
        /// default.
        pub fn registry(mut self, registry: &crate::registry::Registry) -> Self {
            self.common.registry = Some(registry.clone());
            self
        }
    };
}
#[allow(unused_imports)]
pub(crate) use common_builder_methods;
