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

#[tokio::test(start_paused = true)]
async fn a_breaker_under_both_profiles() {
    let rec = TestRecorder::default();
    let build = |name: &str, profile| {
        rec.install_while(|| {
            CircuitBreakerLayer::builder()
                .name(name)
                .sliding_window(SlidingWindow::count_based(4))
                .minimum_calls(4)
                .wait_in_open(Duration::from_secs(30))
                .metrics_profile(profile)
                .build()
                .unwrap()
        })
    };
    for layer in [
        build("native", MetricsProfile::Breakwater),
        build("r4j", MetricsProfile::Resilience4j),
    ] {
        let svc = layer.layer(service_fn(|fail: bool| async move {
            if fail {
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        }));
        // S, F, S, F opens it (50%); then two rejections.
        for fail in [false, true, false, true, false, false] {
            let _ = svc.clone().oneshot(fail).await;
        }
    }
    let n = |metric: &str, labels: &[(&str, &str)]| rec.counter(metric, labels);
    let calls = "breakwater_circuit_breaker_calls_total";
    assert_eq!(
        n(calls, &[("name", "native"), ("outcome", "success")]),
        Some(2)
    );
    assert_eq!(
        n(calls, &[("name", "native"), ("outcome", "failure")]),
        Some(2)
    );
    assert_eq!(
        n(calls, &[("name", "native"), ("outcome", "rejected")]),
        Some(2)
    );
    for (state, v) in [("closed", 0.0), ("open", 1.0), ("half_open", 0.0)] {
        let native = rec.gauge(
            "breakwater_circuit_breaker_state",
            &[("name", "native"), ("state", state)],
        );
        let theirs = rec.gauge(
            "resilience4j_circuitbreaker_state",
            &[("name", "r4j"), ("state", state)],
        );
        assert_eq!((native, theirs), (Some(v), Some(v)), "{state}");
    }
    assert_eq!(
        rec.gauge(
            "breakwater_circuit_breaker_failure_rate",
            &[("name", "native")]
        ),
        Some(0.5)
    );
    assert_eq!(
        rec.gauge(
            "resilience4j_circuitbreaker_failure_rate",
            &[("name", "r4j")]
        ),
        Some(50.0),
        "percent under the resilience4j profile"
    );
    let timer = |kind| {
        rec.histogram(
            "resilience4j_circuitbreaker_calls_seconds",
            &[("name", "r4j"), ("kind", kind)],
        )
        .map(|v| v.len())
    };
    assert_eq!((timer("successful"), timer("failed")), (Some(2), Some(2)));
    assert_eq!(
        n(
            "resilience4j_circuitbreaker_not_permitted_calls_total",
            &[("name", "r4j"), ("kind", "not_permitted")]
        ),
        Some(2)
    );
    assert_eq!(
        n(calls, &[("name", "r4j"), ("outcome", "success")]),
        None,
        "not emitted"
    );
}

#[tokio::test(start_paused = true)]
async fn a_bulkhead_under_both_profiles() {
    let rec = TestRecorder::default();
    let build = |name: &str, profile| {
        rec.install_while(|| {
            BulkheadLayer::builder()
                .name(name)
                .max_concurrent_calls(3)
                .metrics_profile(profile)
                .build()
                .unwrap()
        })
    };
    let mut holders = Vec::new();
    for layer in [
        build("native", MetricsProfile::Breakwater),
        build("r4j", MetricsProfile::Resilience4j),
    ] {
        let mut svc = layer.layer(service_fn(|_: ()| async {
            std::future::pending::<()>().await;
            Ok::<(), BoxError>(())
        }));
        let fut = svc.ready().await.unwrap().call(());
        holders.push(tokio::spawn(fut));
    }
    tokio::task::yield_now().await;
    assert_eq!(
        rec.gauge(
            "breakwater_bulkhead_available_permits",
            &[("name", "native")]
        ),
        Some(2.0)
    );
    assert_eq!(
        rec.gauge(
            "resilience4j_bulkhead_available_concurrent_calls",
            &[("name", "r4j")]
        ),
        Some(2.0)
    );
    assert_eq!(
        rec.gauge(
            "resilience4j_bulkhead_max_allowed_concurrent_calls",
            &[("name", "r4j")]
        ),
        Some(3.0)
    );
    assert_eq!(
        rec.gauge("breakwater_bulkhead_in_flight", &[("name", "r4j")]),
        Some(1.0),
        "metrics without a resilience4j equivalent keep their names"
    );
    for h in holders {
        h.abort();
    }
}
