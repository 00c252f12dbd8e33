//! Layers under both metrics profiles in one test binary, with exact values.
#![cfg(all(feature = "circuit-breaker", feature = "bulkhead"))]

mod support;

use std::time::Duration;

use support::TestRecorder;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use tower_breakwater::metrics::MetricsProfile;

/// The two profiles, with the instance name each test gives the layer built under it.
const PROFILES: [(&str, MetricsProfile); 2] = [
    ("native", MetricsProfile::Breakwater),
    ("r4j", MetricsProfile::Resilience4j),
];

/// Asserts that `instance` has exactly these series with these values (see
/// [`TestRecorder::dump`]), in any order.
#[track_caller]
fn assert_series<S: AsRef<str>>(rec: &TestRecorder, instance: &str, expected: &[S]) {
    let mut expected: Vec<&str> = expected.iter().map(AsRef::as_ref).collect();
    expected.sort();
    assert_eq!(rec.dump(instance), expected, "series of {instance}");
}

/// Asserts the series of the two instances named after their profiles: `lines(names)`, where
/// `names` are the names that instance's profile gives the metrics the resilience4j profile
/// renames (`renamed[0]` for the native one, `renamed[1]` for the other).
#[track_caller]
fn assert_both<const N: usize>(
    rec: &TestRecorder,
    renamed: [[&str; N]; 2],
    lines: impl Fn([&str; N]) -> Vec<String>,
) {
    for ((instance, _), names) in PROFILES.iter().zip(renamed) {
        assert_series(rec, instance, &lines(names));
    }
}

/// Polls a future once with a waker that does nothing.
#[allow(dead_code)] // not every feature set uses it
fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
    std::pin::Pin::new(f).poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

/// A success, a failure (after 10 ms) and a timeout (after 100 ms), with durations on.
#[cfg(feature = "timeout")]
#[tokio::test(start_paused = true)]
async fn a_timeout_under_both_profiles() {
    use tower_breakwater::timeout::TimeoutLayer;

    let rec = TestRecorder::default();
    for (name, profile) in PROFILES {
        let layer = rec.install_while(|| {
            TimeoutLayer::builder()
                .name(name)
                .timeout(Duration::from_millis(100))
                .record_durations(true)
                .metrics_profile(profile)
                .build()
                .unwrap()
        });
        let svc = layer.layer(service_fn(|ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if ms == 10 {
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        }));
        assert!(svc.clone().oneshot(0).await.is_ok());
        assert!(svc.clone().oneshot(10).await.is_err());
        assert!(svc.clone().oneshot(1_000).await.is_err());
    }
    let durations = [
        "breakwater_timeout_call_duration_seconds{outcome=failure} = [0.01]",
        "breakwater_timeout_call_duration_seconds{outcome=ignored} = []",
        "breakwater_timeout_call_duration_seconds{outcome=success} = [0.0]",
        "breakwater_timeout_call_duration_seconds{outcome=timeout} = [0.1]",
    ];
    let mut native = vec![
        "breakwater_timeout_calls_total{outcome=failure} = 1",
        "breakwater_timeout_calls_total{outcome=ignored} = 0",
        "breakwater_timeout_calls_total{outcome=success} = 1",
        "breakwater_timeout_calls_total{outcome=timeout} = 1",
    ];
    native.extend(durations);
    assert_series(&rec, "native", &native);
    // `failure` and `ignored` are both `failed`: one series.
    let mut theirs = vec![
        "resilience4j_timelimiter_calls_total{kind=failed} = 1",
        "resilience4j_timelimiter_calls_total{kind=successful} = 1",
        "resilience4j_timelimiter_calls_total{kind=timeout} = 1",
    ];
    theirs.extend(durations);
    assert_series(&rec, "r4j", &theirs);
}

/// A breaker named after each profile, slow-call detection on (500 ms; a rate threshold of
/// 100% that this script never reaches), one probe in half-open.
fn breaker(rec: &TestRecorder, name: &str, profile: MetricsProfile) -> CircuitBreakerLayer {
    rec.install_while(|| {
        CircuitBreakerLayer::builder()
            .name(name)
            .sliding_window(SlidingWindow::count_based(4))
            .minimum_calls(4)
            .slow_call_rate_threshold(1.0)
            .slow_call_duration(Duration::from_millis(500))
            .permitted_calls_in_half_open(1)
            .wait_in_open(Duration::from_secs(30))
            .metrics_profile(profile)
            .build()
            .unwrap()
    })
}

/// The transitions counter of every (from, to) pair, 0 except those given.
fn transitions(taken: &[(&str, &str)]) -> Vec<String> {
    const STATES: [&str; 5] = ["closed", "open", "half_open", "forced_open", "disabled"];
    let mut out = Vec::new();
    for from in STATES {
        for to in STATES.into_iter().filter(|to| *to != from) {
            let n = taken.iter().filter(|t| **t == (from, to)).count();
            out.push(format!(
                "breakwater_circuit_breaker_transitions_total{{from={from},to={to}}} = {n}"
            ));
        }
    }
    out
}

/// S, F (slow, 600 ms), S, F opens the breaker at 600 ms (failure rate 50%, slow-call rate
/// 25%); two calls rejected while open; 30 s after opening a probe succeeds and closes it.
#[tokio::test(start_paused = true)]
async fn a_breaker_under_both_profiles() {
    let rec = TestRecorder::default();
    let layers = PROFILES.map(|(name, profile)| breaker(&rec, name, profile));
    let svcs = layers.each_ref().map(|l| {
        l.layer(service_fn(|(fail, slow): (bool, bool)| async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(600)).await;
            }
            if fail {
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        }))
    });
    for svc in &svcs {
        for call in [(false, false), (true, true), (false, false), (true, false)] {
            let _ = svc.clone().oneshot(call).await;
        }
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    for svc in &svcs {
        for _ in 0..2 {
            assert!(svc.clone().oneshot((false, false)).await.is_err());
        }
    }
    let states = |prefix: &str, current: &str| {
        ["closed", "open", "half_open", "forced_open", "disabled"]
            .map(|s| format!("{prefix}{{state={s}}} = {}", u8::from(s == current)))
    };
    let state_ms = |closed: u64, open: u64| {
        ["closed", "open", "half_open", "forced_open", "disabled"].map(|s| {
            let v = match s {
                "closed" => closed,
                "open" => open,
                _ => 0,
            };
            format!("breakwater_circuit_breaker_state_milliseconds_total{{state={s}}} = {v}")
        })
    };
    // The native breaker opened at 600 ms, the r4j one at 1.2 s (its calls ran after the
    // native one's, while it was closed). A snapshot brings the time in state up to date.
    for l in &layers {
        assert_eq!(l.handle().snapshot().state, Some("open"));
    }
    let native = |current: &str, taken: &[(&str, &str)], ms: [String; 5], rates: [&str; 2]| {
        let mut v = vec![
            "breakwater_circuit_breaker_calls_total{outcome=failure} = 2".to_owned(),
            "breakwater_circuit_breaker_calls_total{outcome=ignored} = 0".to_owned(),
            "breakwater_circuit_breaker_calls_total{outcome=rejected} = 2".to_owned(),
            format!(
                "breakwater_circuit_breaker_calls_total{{outcome=success}} = {}",
                if current == "closed" { 3 } else { 2 }
            ),
            format!("breakwater_circuit_breaker_failure_rate{{}} = {}", rates[0]),
            format!(
                "breakwater_circuit_breaker_slow_call_rate{{}} = {}",
                rates[1]
            ),
            "breakwater_circuit_breaker_slow_calls_total{} = 1".to_owned(),
        ];
        v.extend(states("breakwater_circuit_breaker_state", current));
        v.extend(ms);
        v.extend(transitions(taken));
        v
    };
    let theirs = |current: &str,
                  taken: &[(&str, &str)],
                  ms: [String; 5],
                  rates: [&str; 2],
                  successful: &str| {
        let mut v = vec![
            "resilience4j_circuitbreaker_calls_seconds{kind=failed} = [0.0, 0.6]".to_owned(),
            "resilience4j_circuitbreaker_calls_seconds{kind=ignored} = []".to_owned(),
            format!("resilience4j_circuitbreaker_calls_seconds{{kind=successful}} = {successful}"),
            format!(
                "resilience4j_circuitbreaker_failure_rate{{}} = {}",
                rates[0]
            ),
            "resilience4j_circuitbreaker_not_permitted_calls_total{kind=not_permitted} = 2"
                .to_owned(),
            format!(
                "resilience4j_circuitbreaker_slow_call_rate{{}} = {}",
                rates[1]
            ),
            "breakwater_circuit_breaker_slow_calls_total{} = 1".to_owned(),
        ];
        v.extend(states("resilience4j_circuitbreaker_state", current));
        v.extend(ms);
        v.extend(transitions(taken));
        v
    };
    let opened = [("closed", "open")];
    assert_series(
        &rec,
        "native",
        &native("open", &opened, state_ms(600, 2_600), ["0.5", "0.25"]),
    );
    assert_series(
        &rec,
        "r4j",
        &theirs(
            "open",
            &opened,
            state_ms(1_200, 2_000),
            ["50", "25"],
            "[0.0, 0.0]",
        ),
    );
    // At 31.2 s (30 s after the r4j one opened) a probe succeeds and closes each breaker.
    tokio::time::advance(Duration::from_secs(28)).await;
    for svc in &svcs {
        assert!(svc.clone().oneshot((false, false)).await.is_ok());
    }
    let all = [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ];
    assert_series(
        &rec,
        "native",
        &native("closed", &all, state_ms(600, 30_600), ["0", "0"]),
    );
    assert_series(
        &rec,
        "r4j",
        &theirs(
            "closed",
            &all,
            state_ms(1_200, 30_000),
            ["0", "0"],
            "[0.0, 0.0, 0.0]",
        ),
    );
}

/// Asserts the series of both bulkheads of maximum 2 (named after their profiles):
/// `[available, in flight, permitted, rejected, waiting]`, and the recorded waits.
#[track_caller]
fn assert_bulkhead(rec: &TestRecorder, v: [u32; 5], waits: &str) {
    let renamed = [
        [
            "breakwater_bulkhead_available_permits",
            "breakwater_bulkhead_max_permits",
        ],
        [
            "resilience4j_bulkhead_available_concurrent_calls",
            "resilience4j_bulkhead_max_allowed_concurrent_calls",
        ],
    ];
    assert_both(rec, renamed, |[available, max]| {
        let calls = "breakwater_bulkhead_calls_total";
        vec![
            format!("{available}{{}} = {}", v[0]),
            format!("{max}{{}} = 2"),
            format!("breakwater_bulkhead_in_flight{{}} = {}", v[1]),
            format!("{calls}{{outcome=permitted}} = {}", v[2]),
            format!("{calls}{{outcome=rejected}} = {}", v[3]),
            format!("breakwater_bulkhead_waiting{{}} = {}", v[4]),
            format!("breakwater_bulkhead_wait_duration_seconds{{}} = {waits}"),
        ]
    });
}

/// Maximum 2 concurrent calls, up to 100 ms of waiting for at most 1 caller: two holders,
/// one waiter that times out, one caller rejected at once (the queue is full), one waiter
/// admitted when the holders end. The wait histogram has the queued callers only.
#[tokio::test(start_paused = true)]
async fn a_bulkhead_under_both_profiles() {
    let rec = TestRecorder::default();
    let mut held = Vec::new();
    for (name, profile) in PROFILES {
        let layer = rec.install_while(|| {
            BulkheadLayer::builder()
                .name(name)
                .max_concurrent_calls(2)
                .max_wait(Duration::from_millis(100))
                .max_waiting(1)
                .record_durations(true)
                .metrics_profile(profile)
                .build()
                .unwrap()
        });
        let (tx, rx) = tokio::sync::watch::channel(false);
        let svc = layer.layer(service_fn(move |_: ()| {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|done| *done).await;
                Ok::<(), BoxError>(())
            }
        }));
        let a = tokio::spawn(svc.clone().oneshot(()));
        let b = tokio::spawn(svc.clone().oneshot(()));
        tokio::task::yield_now().await;
        held.push((svc, tx, a, b));
    }
    assert_bulkhead(&rec, [0, 2, 2, 0, 0], "[]");
    // A waiter, and a caller rejected at once because the queue is full.
    let mut waiters = Vec::new();
    for (svc, ..) in &held {
        waiters.push(tokio::spawn(svc.clone().oneshot(())));
        tokio::task::yield_now().await;
        assert!(svc.clone().oneshot(()).await.is_err());
    }
    assert_bulkhead(&rec, [0, 2, 2, 1, 1], "[]");
    // It times out after 100 ms.
    for w in waiters {
        assert!(w.await.unwrap().is_err());
    }
    assert_bulkhead(&rec, [0, 2, 2, 2, 0], "[0.1]");
    // Another waiter, admitted 40 ms later when the holders end.
    let mut waiters = Vec::new();
    for (svc, ..) in &held {
        waiters.push(tokio::spawn(svc.clone().oneshot(())));
    }
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_millis(40)).await;
    for ((_, tx, a, b), w) in held.into_iter().zip(waiters) {
        tx.send(true).unwrap();
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        w.await.unwrap().unwrap();
    }
    assert_bulkhead(&rec, [2, 0, 3, 2, 0], "[0.04, 0.1]");
}

#[cfg(feature = "rate-limit")]
mod rate_limiter {
    use std::task::Poll;

    use tokio::time::advance;
    use tower_breakwater::rate_limit::{RateLimitBuilder, RateLimitLayer};

    use super::*;

    fn inner() -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + Send {
        service_fn(|x: u32| std::future::ready(Ok::<_, BoxError>(x)))
    }

    /// Registers `f(builder)` under each profile, named after it.
    fn both<L>(
        rec: &TestRecorder,
        f: impl Fn(RateLimitBuilder) -> Result<L, tower_breakwater::ConfigError>,
    ) -> Vec<L> {
        PROFILES
            .iter()
            .map(|(name, profile)| {
                rec.install_while(|| {
                    f(RateLimitLayer::builder()
                        .name(*name)
                        .metrics_profile(*profile))
                    .unwrap()
                })
            })
            .collect()
    }

    /// Asserts the series of both direct limiters (named after their profiles):
    /// `[available, waiting, permitted, waited, rejected]`, and the recorded waits.
    #[track_caller]
    fn assert_direct(rec: &TestRecorder, v: [u32; 5], waits: &str) {
        let renamed = [
            [
                "breakwater_rate_limiter_available_permits",
                "breakwater_rate_limiter_waiting",
            ],
            [
                "resilience4j_ratelimiter_available_permissions",
                "resilience4j_ratelimiter_waiting_threads",
            ],
        ];
        assert_both(rec, renamed, |[available, waiting]| {
            let calls = "breakwater_rate_limiter_calls_total";
            vec![
                format!("{available}{{}} = {}", v[0]),
                format!("{waiting}{{}} = {}", v[1]),
                format!("{calls}{{outcome=permitted}} = {}", v[2]),
                format!("{calls}{{outcome=waited}} = {}", v[3]),
                format!("{calls}{{outcome=rejected}} = {}", v[4]),
                format!("breakwater_rate_limiter_wait_duration_seconds{{}} = {waits}"),
            ]
        });
    }

    /// Reject mode, 10 per second (T = 100 ms), burst 2: two calls at once, a third rejected,
    /// one more 100 ms later; the available-permits gauge is refreshed by a snapshot.
    #[tokio::test(start_paused = true)]
    async fn a_direct_limiter_in_reject_mode_under_both_profiles() {
        let rec = TestRecorder::default();
        let layers = both(&rec, |b| {
            b.rate(10, Duration::from_secs(1))
                .burst(2)
                .record_durations(true)
                .build()
        });
        for layer in &layers {
            let svc = layer.layer(inner());
            assert!(svc.clone().oneshot(1).await.is_ok());
            assert!(svc.clone().oneshot(2).await.is_ok());
            assert!(svc.clone().oneshot(3).await.is_err());
        }
        assert_direct(&rec, [0, 0, 2, 0, 1], "[0.0, 0.0]");

        // 100 ms later one slot is free: taken, none left (TAT 300 ms, tau 100 ms).
        advance(Duration::from_millis(100)).await;
        for layer in &layers {
            assert!(layer.layer(inner()).oneshot(4).await.is_ok());
        }
        assert_direct(&rec, [0, 0, 3, 0, 1], "[0.0, 0.0, 0.0]");

        // 150 ms later, idle: the gauge keeps its last value until a snapshot refreshes it.
        advance(Duration::from_millis(150)).await;
        assert_direct(&rec, [0, 0, 3, 0, 1], "[0.0, 0.0, 0.0]");
        for layer in &layers {
            assert_eq!(layer.handle().snapshot().gauge("available"), Some(1.0));
        }
        assert_direct(&rec, [1, 0, 3, 0, 1], "[0.0, 0.0, 0.0]");
    }

    /// Wait mode, T = 100 ms, burst 1, maximum wait 250 ms: at t0 one call at once, two
    /// waiters (due at 100 and 200 ms), one rejected (its wait would be 300 ms); the first
    /// waiter is admitted at 100 ms, the second dropped then (it gives its slot back).
    #[tokio::test(start_paused = true)]
    async fn a_direct_limiter_in_wait_mode_under_both_profiles() {
        let rec = TestRecorder::default();
        let layers = both(&rec, |b| {
            b.rate(10, Duration::from_secs(1))
                .burst(1)
                .max_wait(Duration::from_millis(250))
                .record_durations(true)
                .build()
        });
        let mut pending = Vec::new();
        for layer in &layers {
            let mut svc = layer.layer(inner());
            let mut a = Box::pin(svc.call(1));
            let mut b = Box::pin(svc.call(2));
            let mut c = Box::pin(svc.call(3));
            let mut d = Box::pin(svc.call(4));
            assert!(matches!(poll_once(&mut a), Poll::Ready(Ok(1))));
            assert!(poll_once(&mut b).is_pending());
            assert!(poll_once(&mut c).is_pending());
            assert!(matches!(poll_once(&mut d), Poll::Ready(Err(_))));
            pending.push((b, c));
        }
        assert_direct(&rec, [0, 2, 1, 0, 1], "[0.0]");

        advance(Duration::from_millis(100)).await;
        for (b, c) in pending {
            let mut b = b;
            assert!(matches!(poll_once(&mut b), Poll::Ready(Ok(2))));
            drop(c);
        }
        // The dropped waiter was the latest reservation: TAT back to 200 ms, still none
        // available at 100 ms.
        assert_direct(&rec, [0, 0, 1, 1, 1], "[0.0, 0.1]");
        advance(Duration::from_millis(100)).await;
        for layer in &layers {
            let snap = layer.handle().snapshot();
            assert_eq!(
                (snap.counter("abandoned"), snap.counter("given_back")),
                (Some(1), Some(1))
            );
        }
        assert_direct(&rec, [1, 0, 1, 1, 1], "[0.0, 0.1]");
    }

    /// Keyed, 1 per 100 ms per key, at most 2 keys: key 1 twice (the second rejected), key 2,
    /// key 3 (too many keys); 200 ms later key 3 again (a sweep frees both places).
    #[tokio::test(start_paused = true)]
    async fn a_keyed_limiter_under_both_profiles() {
        let rec = TestRecorder::default();
        let layers = both(&rec, |b| {
            b.rate(1, Duration::from_millis(100))
                .keyed(|x: &u32| *x)
                .max_keys(2)
                .build()
        });
        for layer in &layers {
            let svc = layer.layer(inner());
            assert!(svc.clone().oneshot(1).await.is_ok());
            assert!(svc.clone().oneshot(1).await.is_err());
            assert!(svc.clone().oneshot(2).await.is_ok());
            assert!(svc.clone().oneshot(3).await.is_err());
        }
        let series = |waiting: &str, permitted: u32, keys: u32| {
            vec![
                format!("{waiting}{{}} = 0"),
                format!("breakwater_rate_limiter_calls_total{{outcome=permitted}} = {permitted}"),
                "breakwater_rate_limiter_calls_total{outcome=rejected} = 1".to_owned(),
                "breakwater_rate_limiter_calls_total{outcome=too_many_keys} = 1".to_owned(),
                "breakwater_rate_limiter_calls_total{outcome=waited} = 0".to_owned(),
                format!("breakwater_rate_limiter_keys{{}} = {keys}"),
            ]
        };
        assert_series(
            &rec,
            "native",
            &series("breakwater_rate_limiter_waiting", 2, 2),
        );
        assert_series(
            &rec,
            "r4j",
            &series("resilience4j_ratelimiter_waiting_threads", 2, 2),
        );
        advance(Duration::from_millis(200)).await;
        for layer in &layers {
            assert!(layer.layer(inner()).oneshot(3).await.is_ok());
        }
        assert_series(
            &rec,
            "native",
            &series("breakwater_rate_limiter_waiting", 3, 1),
        );
        assert_series(
            &rec,
            "r4j",
            &series("resilience4j_ratelimiter_waiting_threads", 3, 1),
        );
    }
}

#[cfg(feature = "coalesce")]
mod coalesce {
    use tokio::time::{advance, sleep};
    use tower_breakwater::coalesce::CoalesceLayer;

    use super::*;

    /// Key 1 asked three times at once (a leader, two followers), key 2 once, key 3 once and
    /// dropped (abandoned); then everything ends; then key 0 panics upstream with a follower. The resilience4j profile has no
    /// coalescing metrics: both profiles emit the same `breakwater_` series.
    #[tokio::test(start_paused = true)]
    async fn coalescing_under_both_profiles() {
        let rec = TestRecorder::default();
        let mut pending = Vec::new();
        let mut services = Vec::new();
        for (name, profile) in PROFILES {
            let layer = rec.install_while(|| {
                CoalesceLayer::builder()
                    .name(name)
                    .key(|x: &u32| Some(*x))
                    .followers_histogram(true)
                    .metrics_profile(profile)
                    .build()
                    .unwrap()
            });
            let mut svc = layer.layer(service_fn(|x: u32| async move {
                sleep(Duration::from_millis(10)).await;
                assert!(x != 0, "upstream bug");
                Ok::<_, BoxError>(x)
            }));
            services.push(svc.clone());
            let mut calls: Vec<_> = [1, 1, 1, 2, 3]
                .into_iter()
                .map(|k| Box::pin(svc.call(k)))
                .collect();
            for c in &mut calls {
                assert!(poll_once(c).is_pending());
            }
            drop(calls.pop()); // key 3: its only caller leaves, the call is abandoned
            pending.push(calls);
        }
        for name in ["native", "r4j"] {
            assert_series(
                &rec,
                name,
                &[
                    "breakwater_coalesce_calls_total{role=follower} = 2",
                    "breakwater_coalesce_calls_total{role=leader} = 3",
                    "breakwater_coalesce_followers_per_call{} = [0.0]",
                    "breakwater_coalesce_in_flight_keys{} = 2",
                ],
            );
        }
        advance(Duration::from_millis(10)).await;
        for calls in pending {
            let got: Vec<u32> = futures_util::future::join_all(calls)
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
            assert_eq!(got, [1, 1, 1, 2]);
        }
        for name in ["native", "r4j"] {
            assert_series(
                &rec,
                name,
                &[
                    "breakwater_coalesce_calls_total{role=follower} = 2",
                    "breakwater_coalesce_calls_total{role=leader} = 3",
                    "breakwater_coalesce_followers_per_call{} = [0.0, 0.0, 2.0]",
                    "breakwater_coalesce_in_flight_keys{} = 0",
                ],
            );
        }
        // Key 0 panics upstream with one follower: the call still ends in the metrics.
        for svc in services {
            let leader = tokio::spawn(svc.clone().oneshot(0));
            tokio::task::yield_now().await;
            let follower = tokio::spawn(svc.oneshot(0));
            assert!(leader.await.unwrap_err().is_panic());
            assert!(follower.await.unwrap().is_err());
        }
        for name in ["native", "r4j"] {
            assert_series(
                &rec,
                name,
                &[
                    "breakwater_coalesce_calls_total{role=follower} = 3",
                    "breakwater_coalesce_calls_total{role=leader} = 4",
                    "breakwater_coalesce_followers_per_call{} = [0.0, 0.0, 1.0, 2.0]",
                    "breakwater_coalesce_in_flight_keys{} = 0",
                ],
            );
        }
    }

    /// Without `followers_histogram(true)` the histogram is not registered at all.
    #[tokio::test(start_paused = true)]
    async fn the_followers_histogram_is_opt_in() {
        let rec = TestRecorder::default();
        let layer = rec.install_while(|| {
            CoalesceLayer::builder()
                .name("quiet")
                .key(|x: &u32| Some(*x))
                .metrics_profile(MetricsProfile::Resilience4j)
                .build()
                .unwrap()
        });
        let svc = layer.layer(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
        assert_eq!(svc.oneshot(7).await.unwrap(), 7);
        assert_series(
            &rec,
            "quiet",
            &[
                "breakwater_coalesce_calls_total{role=follower} = 0",
                "breakwater_coalesce_calls_total{role=leader} = 1",
                "breakwater_coalesce_in_flight_keys{} = 0",
            ],
        );
    }
}

#[cfg(feature = "cache")]
mod cache {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::time::{advance, sleep};
    use tower_breakwater::cache::{CacheHandle, CacheLayer};

    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Lets spawned tasks (detached refreshes) run.
    async fn settle() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    /// The upstream: answers its call number after `delay_ms`, or fails while `fail` is set.
    #[derive(Clone, Default)]
    struct Up {
        calls: Arc<AtomicU64>,
        delay_ms: Arc<AtomicU64>,
        fail: Arc<AtomicBool>,
    }

    type Svc = tower::util::BoxCloneService<u64, u64, BoxError>;

    /// A cache named `name` under `profile` over `up`: TTL 60 s, 30 s of staleness, 5 s
    /// back-off, the recompute histogram on, XFetch's `u` read from `u`.
    fn cache(
        rec: &TestRecorder,
        name: &str,
        profile: MetricsProfile,
        up: &Up,
        u: &Arc<Mutex<f64>>,
    ) -> (Svc, CacheHandle) {
        let u = u.clone();
        let layer = rec.install_while(|| {
            CacheLayer::builder()
                .name(name)
                .metrics_profile(profile)
                .key(|k: &u64| Some(*k))
                .ttl(60 * S)
                .max_staleness(30 * S)
                .stale_retry_interval(5 * S)
                .recompute_histogram(true)
                .random(move || *u.lock().unwrap())
                .build()
                .unwrap()
        });
        let handle = layer.handle();
        let up = up.clone();
        let inner = service_fn(move |_k: u64| {
            let up = up.clone();
            async move {
                let n = up.calls.fetch_add(1, Ordering::SeqCst) + 1;
                sleep(Duration::from_millis(up.delay_ms.load(Ordering::SeqCst))).await;
                if up.fail.load(Ordering::SeqCst) {
                    Err::<u64, BoxError>("down".into())
                } else {
                    Ok(n)
                }
            }
        });
        (Svc::new(layer.layer(inner)), handle)
    }

    /// Miss (2 s fetch), hit, hit with an early refresh (2 s, in the background), then with
    /// the upstream down: a read after expiry served stale, another within the back-off
    /// served stale, and a miss of another key that fails. Both profiles emit the same
    /// `breakwater_` series (resilience4j has no cache metrics).
    #[tokio::test(start_paused = true)]
    async fn the_cache_under_both_profiles() {
        for (name, profile) in PROFILES {
            let rec = TestRecorder::default();
            let up = Up::default();
            up.delay_ms.store(2_000, Ordering::SeqCst);
            let u = Arc::new(Mutex::new(1.0));
            let (mut svc, handle) = cache(&rec, name, profile, &up, &u);
            // t = 0: miss, stored at 2 s (expiry 62 s, delta 2 s).
            assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
            assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1); // hit
            assert_series(
                &rec,
                name,
                &[
                    "breakwater_cache_early_refreshes_total{} = 0",
                    "breakwater_cache_entries{} = 1",
                    "breakwater_cache_fetches_total{} = 1",
                    "breakwater_cache_lookups_total{result=hit} = 1",
                    "breakwater_cache_lookups_total{result=miss} = 1",
                    "breakwater_cache_lookups_total{result=negative} = 0",
                    "breakwater_cache_lookups_total{result=stale} = 0",
                    "breakwater_cache_passed_through_total{} = 0",
                    "breakwater_cache_recompute_duration_seconds{} = [2.0]",
                    "breakwater_cache_refresh_errors_total{} = 0",
                ],
            );
            // 1.5 s before expiry with u = 1/e: -2 s * ln(u) = 2 s >= 1.5 s, an early
            // refresh; the read gets the cached value at once.
            advance(Duration::from_millis(58_500)).await;
            *u.lock().unwrap() = (-1f64).exp();
            assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
            *u.lock().unwrap() = 1.0;
            settle().await;
            advance(2 * S).await; // the refresh ends at 62.5 s: expiry 122.5 s
            settle().await;
            assert_eq!(up.calls.load(Ordering::SeqCst), 2);
            assert_series(
                &rec,
                name,
                &[
                    "breakwater_cache_early_refreshes_total{} = 1",
                    "breakwater_cache_entries{} = 1",
                    "breakwater_cache_fetches_total{} = 2",
                    "breakwater_cache_lookups_total{result=hit} = 2",
                    "breakwater_cache_lookups_total{result=miss} = 1",
                    "breakwater_cache_lookups_total{result=negative} = 0",
                    "breakwater_cache_lookups_total{result=stale} = 0",
                    "breakwater_cache_passed_through_total{} = 0",
                    "breakwater_cache_recompute_duration_seconds{} = [2.0, 2.0]",
                    "breakwater_cache_refresh_errors_total{} = 0",
                ],
            );
            // Upstream down, answering at once. At expiry: the fetch fails, stale served.
            up.fail.store(true, Ordering::SeqCst);
            up.delay_ms.store(0, Ordering::SeqCst);
            advance(60 * S).await;
            assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 2);
            // Within the back-off: stale at once, no upstream call.
            advance(S).await;
            assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 2);
            assert_eq!(up.calls.load(Ordering::SeqCst), 3);
            // Another key, nothing stored: a miss that fails.
            assert!(svc.ready().await.unwrap().call(2).await.is_err());
            assert_eq!(up.calls.load(Ordering::SeqCst), 4);
            assert_series(
                &rec,
                name,
                &[
                    "breakwater_cache_early_refreshes_total{} = 1",
                    "breakwater_cache_entries{} = 1",
                    "breakwater_cache_fetches_total{} = 4",
                    "breakwater_cache_lookups_total{result=hit} = 2",
                    "breakwater_cache_lookups_total{result=miss} = 2",
                    "breakwater_cache_lookups_total{result=negative} = 0",
                    "breakwater_cache_lookups_total{result=stale} = 2",
                    "breakwater_cache_passed_through_total{} = 0",
                    "breakwater_cache_recompute_duration_seconds{} = [2.0, 2.0]",
                    "breakwater_cache_refresh_errors_total{} = 2",
                ],
            );
            let snap = handle.snapshot();
            assert_eq!(
                [
                    "hits",
                    "misses",
                    "stale",
                    "early_refreshes",
                    "refresh_errors"
                ]
                .map(|k| snap.counter(k).unwrap()),
                [2, 2, 2, 1, 2]
            );
            assert_eq!(snap.gauge("entries"), Some(1.0));
        }
    }

    /// A lookup that found nothing is a miss whether or not its caller waits for the fetch:
    /// when the upstream hangs and an outer timeout cancels callers, their misses must still
    /// show, or the hit ratio reads 100% during the outage.
    #[tokio::test(start_paused = true)]
    async fn a_miss_whose_caller_leaves_before_the_fetch_ends_is_counted() {
        let rec = TestRecorder::default();
        let up = Up::default();
        up.delay_ms.store(10_000, Ordering::SeqCst);
        let u = Arc::new(Mutex::new(1.0));
        let (mut svc, handle) = cache(&rec, "c", MetricsProfile::Breakwater, &up, &u);
        let mut call = Box::pin(svc.call(1));
        assert!(poll_once(&mut call).is_pending());
        drop(call);
        assert_eq!(up.calls.load(Ordering::SeqCst), 1, "went upstream");
        assert_eq!(
            rec.counter(
                "breakwater_cache_lookups_total",
                &[("name", "c"), ("result", "miss")]
            ),
            Some(1)
        );
        assert_eq!(handle.snapshot().counter("misses"), Some(1));
    }

    /// A cache fetch whose upstream panics is a failed fetch like any other: it counts as a
    /// refresh error and emits an event (`Panicked`, as coalescing does), so that a panicking
    /// upstream is not invisible behind the cache.
    #[tokio::test(start_paused = true)]
    async fn a_cache_fetch_that_panics_counts_as_a_refresh_error_and_emits_an_event() {
        use tower_breakwater::event::EventKind;

        let rec = TestRecorder::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let layer = rec.install_while(|| {
            CacheLayer::builder()
                .name("c")
                .key(|k: &u32| Some(*k))
                .ttl(Duration::from_secs(60))
                .on_event(move |e| log.lock().unwrap().push(e.kind()))
                .build()
                .unwrap()
        });
        let svc = layer.layer(service_fn(|k: u32| async move {
            assert!(k != 0, "upstream bug");
            Ok::<_, BoxError>(k)
        }));
        assert!(tokio::spawn(svc.oneshot(0)).await.unwrap_err().is_panic());
        assert_eq!(
            rec.counter("breakwater_cache_refresh_errors_total", &[("name", "c")]),
            Some(1)
        );
        assert_eq!(*seen.lock().unwrap(), [EventKind::Panicked]);
    }

    /// A fetch answered with a response the classifier does not call a success (an HTTP 503
    /// in an `Ok`) is a failed fetch (module docs, "Serve-stale-on-error"): the caller gets
    /// the stale value and the lookup counts as `stale`, not the failure as a `miss`.
    #[tokio::test(start_paused = true)]
    async fn a_non_success_response_at_expiry_is_answered_stale() {
        use tower_breakwater::classify::{Outcome, classify_fn};

        let rec = TestRecorder::default();
        let layer = rec.install_while(|| {
            CacheLayer::builder()
                .name("c")
                .key(|k: &u64| Some(*k % 2))
                .ttl(60 * S)
                .max_staleness(30 * S)
                .classifier(classify_fn(|r: Result<&u64, &BoxError>| match r {
                    Ok(v) if *v >= 500 => Outcome::Failure,
                    _ => Outcome::Success,
                }))
                .random(|| 1.0)
                .build()
                .unwrap()
        });
        // The request is the response: 1 is stored, 503 is a failure for the same key.
        let svc = layer.layer(service_fn(|k: u64| async move { Ok::<_, BoxError>(k) }));
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
        advance(60 * S).await;
        assert_eq!(svc.clone().oneshot(503).await.unwrap(), 1, "stale served");
        let l = |r| {
            rec.counter(
                "breakwater_cache_lookups_total",
                &[("name", "c"), ("result", r)],
            )
        };
        assert_eq!((l("miss"), l("stale")), (Some(1), Some(1)));
        assert_eq!(
            rec.counter("breakwater_cache_refresh_errors_total", &[("name", "c")]),
            Some(1)
        );
    }
}

/// `MetricsProfile::Off` registers nothing, for every layer.
#[cfg(all(
    feature = "timeout",
    feature = "rate-limit",
    feature = "coalesce",
    feature = "cache"
))]
#[tokio::test(start_paused = true)]
async fn the_off_profile_registers_nothing() {
    use tower_breakwater::cache::CacheLayer;
    use tower_breakwater::coalesce::CoalesceLayer;
    use tower_breakwater::rate_limit::RateLimitLayer;
    use tower_breakwater::timeout::TimeoutLayer;

    let rec = TestRecorder::default();
    let off = MetricsProfile::Off;
    rec.install_while(|| {
        let t = TimeoutLayer::builder()
            .timeout(Duration::from_secs(1))
            .record_durations(true)
            .metrics_profile(off)
            .build()
            .unwrap();
        let b = CircuitBreakerLayer::builder()
            .record_durations(true)
            .metrics_profile(off)
            .build()
            .unwrap();
        let h = BulkheadLayer::builder()
            .max_concurrent_calls(1)
            .metrics_profile(off)
            .build()
            .unwrap();
        let r = RateLimitLayer::builder()
            .rate(1, Duration::from_secs(1))
            .record_durations(true)
            .metrics_profile(off)
            .build()
            .unwrap();
        let k = RateLimitLayer::builder()
            .rate(1, Duration::from_secs(1))
            .keyed(|x: &u32| *x)
            .metrics_profile(off)
            .build()
            .unwrap();
        let c = CoalesceLayer::builder()
            .key(|x: &u32| Some(*x))
            .followers_histogram(true)
            .metrics_profile(off)
            .build()
            .unwrap();
        let m = CacheLayer::builder()
            .key(|x: &u32| Some(*x))
            .ttl(Duration::from_secs(1))
            .recompute_histogram(true)
            .metrics_profile(off)
            .build()
            .unwrap();
        drop((t, b, h, r, k, c, m));
    });
    assert_eq!(rec.names(), Vec::<String>::new());
}
