//! Every metric the crate emits under [`MetricsProfile::Breakwater`](super::MetricsProfile),
//! grouped by layer. [`ALL`] lists them all.
//!
//! Label values are fixed, lower-case identifiers; each spec's description lists them.

use ::metrics::Unit;

use super::{MetricKind, MetricSpec};

const fn counter(
    name: &'static str,
    unit: Unit,
    labels: &'static [&'static str],
    description: &'static str,
) -> MetricSpec {
    MetricSpec {
        name,
        kind: MetricKind::Counter,
        unit,
        labels,
        description,
    }
}

const fn gauge(
    name: &'static str,
    unit: Unit,
    labels: &'static [&'static str],
    description: &'static str,
) -> MetricSpec {
    MetricSpec {
        name,
        kind: MetricKind::Gauge,
        unit,
        labels,
        description,
    }
}

const fn histogram(
    name: &'static str,
    unit: Unit,
    labels: &'static [&'static str],
    description: &'static str,
) -> MetricSpec {
    MetricSpec {
        name,
        kind: MetricKind::Histogram,
        unit,
        labels,
        description,
    }
}

// ---- timeout ------------------------------------------------------------------------------

/// Calls through a timeout by `outcome`: `success`, `failure`, `ignored` (as the layer's
/// classifier decided) or `timeout` (the deadline passed and the call was cancelled).
pub const TIMEOUT_CALLS: MetricSpec = counter(
    "breakwater_timeout_calls_total",
    Unit::Count,
    &["outcome"],
    "Calls through the timeout by outcome: success, failure, ignored, timeout.",
);

/// Duration of calls through a timeout, from the first poll of the response future to its
/// end, by `outcome` as in [`TIMEOUT_CALLS`]. Opt-in (`record_durations`).
pub const TIMEOUT_CALL_DURATION: MetricSpec = histogram(
    "breakwater_timeout_call_duration_seconds",
    Unit::Seconds,
    &["outcome"],
    "Duration of calls through the timeout by outcome, in seconds.",
);

// ---- circuit breaker ----------------------------------------------------------------------

/// One series per `state` (`closed`, `open`, `half_open`, `forced_open`, `disabled`): 1 for
/// the current state, 0 for the others; all are written on every transition.
pub const CIRCUIT_BREAKER_STATE: MetricSpec = gauge(
    "breakwater_circuit_breaker_state",
    Unit::Count,
    &["state"],
    "1 for the circuit breaker's current state, 0 for the others.",
);

/// State transitions by `from` and `to` state: every Open period shows here even when it is
/// shorter than a scrape interval.
pub const CIRCUIT_BREAKER_TRANSITIONS: MetricSpec = counter(
    "breakwater_circuit_breaker_transitions_total",
    Unit::Count,
    &["from", "to"],
    "Circuit breaker state transitions by from and to state.",
);

/// Time spent in each `state`, in whole milliseconds, brought up to date at every transition
/// and every snapshot.
pub const CIRCUIT_BREAKER_STATE_TIME: MetricSpec = counter(
    "breakwater_circuit_breaker_state_milliseconds_total",
    Unit::Milliseconds,
    &["state"],
    "Time the circuit breaker spent in each state, in milliseconds.",
);

/// Calls by `outcome`: `success`, `failure`, `ignored` (classifier), `rejected` (not
/// permitted: open, forced open, or no half-open probe slot).
pub const CIRCUIT_BREAKER_CALLS: MetricSpec = counter(
    "breakwater_circuit_breaker_calls_total",
    Unit::Count,
    &["outcome"],
    "Calls through the circuit breaker by outcome: success, failure, ignored, rejected.",
);

/// Calls that ran longer than the slow-call duration (whatever their outcome).
pub const CIRCUIT_BREAKER_SLOW_CALLS: MetricSpec = counter(
    "breakwater_circuit_breaker_slow_calls_total",
    Unit::Count,
    &[],
    "Calls slower than the circuit breaker's slow-call duration.",
);

/// The failure rate of the current window, a ratio in 0.0..=1.0, updated as outcomes are
/// recorded.
pub const CIRCUIT_BREAKER_FAILURE_RATE: MetricSpec = gauge(
    "breakwater_circuit_breaker_failure_rate",
    Unit::Count,
    &[],
    "Failure rate of the circuit breaker's window, 0.0 to 1.0.",
);

/// The slow-call rate of the current window, a ratio in 0.0..=1.0.
pub const CIRCUIT_BREAKER_SLOW_CALL_RATE: MetricSpec = gauge(
    "breakwater_circuit_breaker_slow_call_rate",
    Unit::Count,
    &[],
    "Slow-call rate of the circuit breaker's window, 0.0 to 1.0.",
);

/// Duration of permitted calls by `outcome` (`success`, `failure`, `ignored`). Opt-in.
pub const CIRCUIT_BREAKER_CALL_DURATION: MetricSpec = histogram(
    "breakwater_circuit_breaker_call_duration_seconds",
    Unit::Seconds,
    &["outcome"],
    "Duration of calls through the circuit breaker by outcome, in seconds.",
);

// ---- bulkhead -----------------------------------------------------------------------------

/// Calls holding a permit now.
pub const BULKHEAD_IN_FLIGHT: MetricSpec = gauge(
    "breakwater_bulkhead_in_flight",
    Unit::Count,
    &[],
    "Calls holding a bulkhead permit.",
);

/// Permits free now (maximum minus in flight).
pub const BULKHEAD_AVAILABLE: MetricSpec = gauge(
    "breakwater_bulkhead_available_permits",
    Unit::Count,
    &[],
    "Bulkhead permits free.",
);

/// The configured maximum of concurrent calls.
pub const BULKHEAD_MAX: MetricSpec = gauge(
    "breakwater_bulkhead_max_permits",
    Unit::Count,
    &[],
    "Configured maximum of concurrent calls through the bulkhead.",
);

/// Callers waiting for a permit now.
pub const BULKHEAD_WAITING: MetricSpec = gauge(
    "breakwater_bulkhead_waiting",
    Unit::Count,
    &[],
    "Callers waiting for a bulkhead permit.",
);

/// Calls by `outcome`: `permitted` (got a permit, at once or after waiting) or `rejected`.
pub const BULKHEAD_CALLS: MetricSpec = counter(
    "breakwater_bulkhead_calls_total",
    Unit::Count,
    &["outcome"],
    "Calls through the bulkhead by outcome: permitted, rejected.",
);

/// Time callers waited for a permit (permitted or not). Opt-in.
pub const BULKHEAD_WAIT_DURATION: MetricSpec = histogram(
    "breakwater_bulkhead_wait_duration_seconds",
    Unit::Seconds,
    &[],
    "Time spent waiting for a bulkhead permit, in seconds.",
);

// ---- rate limiter -------------------------------------------------------------------------

/// Calls by `outcome`: `permitted` (at once), `waited` (permitted after a wait), `rejected`
/// (no capacity within the maximum wait), `too_many_keys` (keyed limiter full).
pub const RATE_LIMITER_CALLS: MetricSpec = counter(
    "breakwater_rate_limiter_calls_total",
    Unit::Count,
    &["outcome"],
    "Calls through the rate limiter by outcome: permitted, waited, rejected, too_many_keys.",
);

/// Time callers waited for their slot. Opt-in.
pub const RATE_LIMITER_WAIT_DURATION: MetricSpec = histogram(
    "breakwater_rate_limiter_wait_duration_seconds",
    Unit::Seconds,
    &[],
    "Time spent waiting for a rate limiter slot, in seconds.",
);

/// Calls a direct (unkeyed) limiter would admit at once, back to back, in `0..=burst`: set
/// when the limiter is built (to the burst), after every call and every give-back of a slot,
/// and by every snapshot. The limiter recovers continuously between calls while this gauge
/// keeps its last value: an idle limiter shows the value of its last call until the next
/// call or snapshot. Not emitted by keyed limiters (each key has its own).
pub const RATE_LIMITER_AVAILABLE: MetricSpec = gauge(
    "breakwater_rate_limiter_available_permits",
    Unit::Count,
    &[],
    "Calls a direct rate limiter would admit at once (0 to burst), as of its last call.",
);

/// Callers waiting for their slot now (wait mode), over every key of a keyed limiter.
pub const RATE_LIMITER_WAITING: MetricSpec = gauge(
    "breakwater_rate_limiter_waiting",
    Unit::Count,
    &[],
    "Callers waiting for their rate limiter slot.",
);

/// Keys a keyed rate limiter tracks now (updated on calls and sweeps).
pub const RATE_LIMITER_KEYS: MetricSpec = gauge(
    "breakwater_rate_limiter_keys",
    Unit::Count,
    &[],
    "Keys tracked by a keyed rate limiter.",
);

// ---- coalesce -----------------------------------------------------------------------------

/// Calls by `role`: `leader` (went upstream) or `follower` (shared a leader's result).
pub const COALESCE_CALLS: MetricSpec = counter(
    "breakwater_coalesce_calls_total",
    Unit::Count,
    &["role"],
    "Coalesced calls by role: leader (went upstream), follower (shared a result).",
);

/// Keys with a shared call in flight now.
pub const COALESCE_IN_FLIGHT: MetricSpec = gauge(
    "breakwater_coalesce_in_flight_keys",
    Unit::Count,
    &[],
    "Keys with a shared call in flight.",
);

/// Followers per shared call, recorded when the call ends. Opt-in.
pub const COALESCE_FOLLOWERS: MetricSpec = histogram(
    "breakwater_coalesce_followers_per_call",
    Unit::Count,
    &[],
    "Followers that shared each upstream call.",
);

// ---- cache --------------------------------------------------------------------------------

/// Lookups by `result`: `hit` (fresh), `miss` (absent or expired, fetched), `stale` (served
/// past expiry because the upstream failed), `negative` (a remembered failure, with a
/// negative TTL).
pub const CACHE_LOOKUPS: MetricSpec = counter(
    "breakwater_cache_lookups_total",
    Unit::Count,
    &["result"],
    "Cache lookups by result: hit, miss, stale, negative.",
);

/// Early (XFetch) refreshes started.
pub const CACHE_EARLY_REFRESHES: MetricSpec = counter(
    "breakwater_cache_early_refreshes_total",
    Unit::Count,
    &[],
    "Probabilistic early refreshes started by the cache.",
);

/// Refreshes or fetches that failed.
pub const CACHE_REFRESH_ERRORS: MetricSpec = counter(
    "breakwater_cache_refresh_errors_total",
    Unit::Count,
    &[],
    "Cache refreshes or fetches that failed.",
);

/// Entries held now.
pub const CACHE_ENTRIES: MetricSpec = gauge(
    "breakwater_cache_entries",
    Unit::Count,
    &[],
    "Entries in the cache.",
);

/// Duration of the computations that produced cached values (XFetch's delta).
pub const CACHE_RECOMPUTE_DURATION: MetricSpec = histogram(
    "breakwater_cache_recompute_duration_seconds",
    Unit::Seconds,
    &[],
    "Duration of upstream computations that filled the cache, in seconds.",
);

/// Upstream calls the cache made: fetches of misses, early refreshes and retries during an
/// outage, each counted once however many reads shared it (pass-throughs not included).
pub const CACHE_FETCHES: MetricSpec = counter(
    "breakwater_cache_fetches_total",
    Unit::Count,
    &[],
    "Upstream calls made by the cache: fetches, early refreshes, retries.",
);

/// Requests passed through uncached and uncoalesced (their key function returned `None`).
pub const CACHE_PASSED_THROUGH: MetricSpec = counter(
    "breakwater_cache_passed_through_total",
    Unit::Count,
    &[],
    "Requests the cache passed through uncached (no key).",
);

/// Every metric above.
pub const ALL: &[&MetricSpec] = &[
    &TIMEOUT_CALLS,
    &TIMEOUT_CALL_DURATION,
    &CIRCUIT_BREAKER_STATE,
    &CIRCUIT_BREAKER_TRANSITIONS,
    &CIRCUIT_BREAKER_STATE_TIME,
    &CIRCUIT_BREAKER_CALLS,
    &CIRCUIT_BREAKER_SLOW_CALLS,
    &CIRCUIT_BREAKER_FAILURE_RATE,
    &CIRCUIT_BREAKER_SLOW_CALL_RATE,
    &CIRCUIT_BREAKER_CALL_DURATION,
    &BULKHEAD_IN_FLIGHT,
    &BULKHEAD_AVAILABLE,
    &BULKHEAD_MAX,
    &BULKHEAD_WAITING,
    &BULKHEAD_CALLS,
    &BULKHEAD_WAIT_DURATION,
    &RATE_LIMITER_CALLS,
    &RATE_LIMITER_WAIT_DURATION,
    &RATE_LIMITER_AVAILABLE,
    &RATE_LIMITER_WAITING,
    &RATE_LIMITER_KEYS,
    &COALESCE_CALLS,
    &COALESCE_IN_FLIGHT,
    &COALESCE_FOLLOWERS,
    &CACHE_LOOKUPS,
    &CACHE_EARLY_REFRESHES,
    &CACHE_REFRESH_ERRORS,
    &CACHE_ENTRIES,
    &CACHE_RECOMPUTE_DURATION,
    &CACHE_FETCHES,
    &CACHE_PASSED_THROUGH,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let mut seen = std::collections::HashSet::new();
        for spec in ALL {
            assert!(seen.insert(spec.name), "duplicate {}", spec.name);
            assert!(spec.name.starts_with("breakwater_"), "{}", spec.name);
            assert!(!spec.labels.contains(&"name"), "{}", spec.name);
            match spec.kind {
                MetricKind::Counter => assert!(spec.name.ends_with("_total"), "{}", spec.name),
                MetricKind::Histogram if spec.unit == Unit::Seconds => {
                    assert!(spec.name.ends_with("_seconds"), "{}", spec.name)
                }
                _ => assert!(!spec.name.ends_with("_total"), "{}", spec.name),
            }
            if spec.unit == Unit::Milliseconds {
                assert!(spec.name.ends_with("_milliseconds_total"), "{}", spec.name);
            }
        }
    }
}
