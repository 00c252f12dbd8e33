//! The [`MetricsProfile::Resilience4j`](super::MetricsProfile::Resilience4j) mapping: our
//! metrics under the names and labels resilience4j's Micrometer binders publish to
//! Prometheus, so teams moving from the JVM keep their dashboards and alerts.
//!
//! | ours | resilience4j |
//! |---|---|
//! | `breakwater_timeout_calls_total{outcome}` | `resilience4j_timelimiter_calls_total{kind}`: `success`→`successful`, `failure` and `ignored`→`failed`, `timeout`→`timeout` |
//! | `breakwater_circuit_breaker_state{state}` | `resilience4j_circuitbreaker_state{state}` (same state names) |
//! | `breakwater_circuit_breaker_call_duration_seconds{outcome}` | `resilience4j_circuitbreaker_calls_seconds{kind}`: `successful`, `failed`, `ignored` (a timer: the profile turns the breaker's durations on) |
//! | `breakwater_circuit_breaker_calls_total{outcome="rejected"}` | `resilience4j_circuitbreaker_not_permitted_calls_total{kind="not_permitted"}` |
//! | `breakwater_circuit_breaker_calls_total{outcome=success\|failure\|ignored}` | not emitted (the timer's `_count` has them) |
//! | `breakwater_circuit_breaker_failure_rate` | `resilience4j_circuitbreaker_failure_rate`, in percent (0 to 100) |
//! | `breakwater_circuit_breaker_slow_call_rate` | `resilience4j_circuitbreaker_slow_call_rate`, in percent |
//! | `breakwater_bulkhead_available_permits` | `resilience4j_bulkhead_available_concurrent_calls` |
//! | `breakwater_bulkhead_max_permits` | `resilience4j_bulkhead_max_allowed_concurrent_calls` |
//! | `breakwater_rate_limiter_available_permits` | `resilience4j_ratelimiter_available_permissions` (never negative: a GCRA limiter has no permissions to go below zero) |
//! | `breakwater_rate_limiter_waiting` | `resilience4j_ratelimiter_waiting_threads` (callers waiting, not threads) |
//!
//! The coalescing and cache layers have no resilience4j equivalent: their metrics keep their
//! `breakwater_` names and labels under this profile.
//!
//! Every other metric keeps its `breakwater_` name under this profile, so nothing is lost.
//! Label `name` is the instance name, as in resilience4j.

use super::MetricSpec;
use super::names::*;

/// What a metric becomes under the profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Translation {
    /// Emitted under its own name and labels.
    Keep,
    /// Not emitted (a no-op handle).
    Skip,
    /// Emitted as `name` with at most one label, values multiplied by `scale`, described by
    /// `help` (the native description when `None`).
    Rename {
        name: &'static str,
        label: Option<(&'static str, &'static str)>,
        scale: f64,
        help: Option<&'static str>,
    },
}

const fn rename(name: &'static str, label: Option<(&'static str, &'static str)>) -> Translation {
    Translation::Rename {
        name,
        label,
        scale: 1.0,
        help: None,
    }
}

fn kind(outcome: &str) -> &'static str {
    match outcome {
        "success" => "successful",
        "ignored" => "ignored",
        _ => "failed",
    }
}

/// The description of `resilience4j_timelimiter_calls_total` (its labels differ from ours).
const TIMELIMITER_HELP: &str =
    "Calls through the time limiter by kind: successful, failed, timeout.";

/// The translation of `spec` with extra `labels` (in the spec's order).
pub(crate) fn translate(spec: &MetricSpec, labels: &[(&'static str, &'static str)]) -> Translation {
    let first = labels.first().map(|(_, v)| *v).unwrap_or("");
    match spec.name {
        n if n == TIMEOUT_CALLS.name => {
            let kind = if first == "timeout" {
                "timeout"
            } else {
                kind(first)
            };
            let kind = if kind == "ignored" { "failed" } else { kind };
            Translation::Rename {
                name: "resilience4j_timelimiter_calls_total",
                label: Some(("kind", kind)),
                scale: 1.0,
                help: Some(TIMELIMITER_HELP),
            }
        }
        n if n == CIRCUIT_BREAKER_STATE.name => {
            rename("resilience4j_circuitbreaker_state", Some(("state", first)))
        }
        n if n == CIRCUIT_BREAKER_CALL_DURATION.name => rename(
            "resilience4j_circuitbreaker_calls_seconds",
            Some(("kind", kind(first))),
        ),
        n if n == CIRCUIT_BREAKER_CALLS.name => match first {
            "rejected" => rename(
                "resilience4j_circuitbreaker_not_permitted_calls_total",
                Some(("kind", "not_permitted")),
            ),
            _ => Translation::Skip,
        },
        n if n == CIRCUIT_BREAKER_FAILURE_RATE.name => Translation::Rename {
            name: "resilience4j_circuitbreaker_failure_rate",
            label: None,
            scale: 100.0,
            help: Some("Failure rate of the calls in the sliding window, in percent (0 to 100)."),
        },
        n if n == CIRCUIT_BREAKER_SLOW_CALL_RATE.name => Translation::Rename {
            name: "resilience4j_circuitbreaker_slow_call_rate",
            label: None,
            scale: 100.0,
            help: Some("Slow-call rate of the calls in the sliding window, in percent (0 to 100)."),
        },
        n if n == BULKHEAD_AVAILABLE.name => {
            rename("resilience4j_bulkhead_available_concurrent_calls", None)
        }
        n if n == BULKHEAD_MAX.name => {
            rename("resilience4j_bulkhead_max_allowed_concurrent_calls", None)
        }
        n if n == RATE_LIMITER_AVAILABLE.name => {
            rename("resilience4j_ratelimiter_available_permissions", None)
        }
        n if n == RATE_LIMITER_WAITING.name => {
            rename("resilience4j_ratelimiter_waiting_threads", None)
        }
        _ => Translation::Keep,
    }
}

/// `true` when the profile's names for `layer` include a timer, so the layer must record
/// durations whatever its `record_durations` setting.
pub(crate) fn needs_durations(layer: crate::error::LayerKind) -> bool {
    layer == crate::error::LayerKind::CircuitBreaker
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_outcomes_map_to_timelimiter_kinds() {
        let t = |o| translate(&TIMEOUT_CALLS, &[("outcome", o)]);
        let r = |k| Translation::Rename {
            name: "resilience4j_timelimiter_calls_total",
            label: Some(("kind", k)),
            scale: 1.0,
            help: Some(TIMELIMITER_HELP),
        };
        assert_eq!(t("success"), r("successful"));
        assert_eq!(t("failure"), r("failed"));
        assert_eq!(t("ignored"), r("failed"));
        assert_eq!(t("timeout"), r("timeout"));
        assert_eq!(
            translate(&TIMEOUT_CALL_DURATION, &[("outcome", "success")]),
            Translation::Keep
        );
    }

    #[test]
    fn rate_limiter_gauges_map_and_the_rest_keeps_its_names() {
        assert_eq!(
            translate(&RATE_LIMITER_AVAILABLE, &[]),
            rename("resilience4j_ratelimiter_available_permissions", None)
        );
        assert_eq!(
            translate(&RATE_LIMITER_WAITING, &[]),
            rename("resilience4j_ratelimiter_waiting_threads", None)
        );
        for spec in [
            &RATE_LIMITER_CALLS,
            &RATE_LIMITER_KEYS,
            &COALESCE_CALLS,
            &COALESCE_IN_FLIGHT,
            &CACHE_LOOKUPS,
            &CACHE_ENTRIES,
        ] {
            assert_eq!(translate(spec, &[]), Translation::Keep, "{}", spec.name);
        }
    }

    #[test]
    fn breaker_calls_split_between_timer_and_not_permitted() {
        assert_eq!(
            translate(&CIRCUIT_BREAKER_CALLS, &[("outcome", "success")]),
            Translation::Skip
        );
        assert_eq!(
            translate(&CIRCUIT_BREAKER_CALLS, &[("outcome", "rejected")]),
            rename(
                "resilience4j_circuitbreaker_not_permitted_calls_total",
                Some(("kind", "not_permitted"))
            )
        );
        assert_eq!(
            translate(&CIRCUIT_BREAKER_CALL_DURATION, &[("outcome", "failure")]),
            rename(
                "resilience4j_circuitbreaker_calls_seconds",
                Some(("kind", "failed"))
            )
        );
    }
}
