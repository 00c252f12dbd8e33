//! The registry: explicit joining, weak references, one snapshot of everything.
#![cfg(feature = "timeout")]

use std::time::Duration;

use tower_breakwater::registry::Registry;
use tower_breakwater::timeout::TimeoutLayer;

fn timeout(name: &str, registry: Option<&Registry>) -> TimeoutLayer {
    let mut b = TimeoutLayer::builder()
        .name(name)
        .timeout(Duration::from_millis(250));
    if let Some(r) = registry {
        b = b.registry(r);
    }
    b.build().unwrap()
}

#[test]
fn only_layers_given_the_registry_join_it_and_dropped_ones_leave() {
    let registry = Registry::new();
    let a = timeout("a", Some(&registry));
    let b = timeout("b", Some(&registry));
    let _c = timeout("c", None);
    let names: Vec<String> = registry.snapshot().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["a", "b"]);
    let handle = a.handle();
    drop(a);
    assert_eq!(registry.len(), 2, "a handle keeps the instance alive");
    drop(handle);
    drop(b);
    assert_eq!(registry.len(), 0);
    assert!(registry.snapshot().is_empty());
}

#[test]
fn the_global_registry_is_opt_in() {
    let before = Registry::global().len();
    let _quiet = timeout("quiet", None);
    assert_eq!(Registry::global().len(), before);
    let _loud = timeout("loud", Some(Registry::global()));
    assert_eq!(Registry::global().len(), before + 1);
}

#[cfg(feature = "serde")]
#[test]
fn snapshots_serialize_to_the_documented_json() {
    let registry = Registry::new();
    let _a = timeout("fraud-api", Some(&registry));
    let json = serde_json::to_string(&registry.snapshot()).unwrap();
    assert_eq!(
        json,
        r#"[{"name":"fraud-api","layer":"timeout","state":null,"counters":{"timeouts":0},"gauges":{"timeout_seconds":0.25}}]"#
    );
}

#[cfg(all(feature = "circuit-breaker", feature = "rate-limit"))]
#[test]
fn every_layer_kind_joins_the_registry() {
    use tower_breakwater::circuit_breaker::CircuitBreakerLayer;
    use tower_breakwater::error::LayerKind;
    use tower_breakwater::rate_limit::RateLimitLayer;

    let registry = Registry::new();
    let _t = timeout("t", Some(&registry));
    let _b = CircuitBreakerLayer::builder()
        .name("b")
        .registry(&registry)
        .build()
        .unwrap();
    let _r = RateLimitLayer::builder()
        .name("r")
        .rate(10, Duration::from_secs(1))
        .registry(&registry)
        .build()
        .unwrap();
    let keyed = RateLimitLayer::builder()
        .name("k")
        .rate(10, Duration::from_secs(1))
        .keyed(|x: &u32| *x)
        .registry(&registry)
        .build()
        .unwrap();
    let kinds: Vec<(String, LayerKind, Option<&str>)> = registry
        .snapshot()
        .into_iter()
        .map(|s| (s.name, s.layer, s.state))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("t".to_owned(), LayerKind::Timeout, None),
            ("b".to_owned(), LayerKind::CircuitBreaker, Some("closed")),
            ("r".to_owned(), LayerKind::RateLimiter, None),
            ("k".to_owned(), LayerKind::RateLimiter, None),
        ]
    );
    drop(keyed);
    assert_eq!(registry.len(), 3);
}

#[cfg(all(feature = "serde", feature = "circuit-breaker"))]
#[tokio::test(start_paused = true)]
async fn a_breaker_snapshot_after_a_scripted_sequence_is_exact_and_serializes() {
    use tower::{ServiceExt, service_fn};
    use tower_breakwater::BoxError;
    use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};

    let registry = Registry::new();
    let layer = CircuitBreakerLayer::builder()
        .name("payments")
        .sliding_window(SlidingWindow::count_based(4))
        .minimum_calls(4)
        .failure_rate_threshold(0.5)
        .wait_in_open(Duration::from_secs(30))
        .registry(&registry)
        .build()
        .unwrap();
    let svc = tower::Layer::layer(
        &layer,
        service_fn(|fail: bool| async move {
            if fail {
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        }),
    );
    // S, F, S, F: the fourth outcome makes the failure rate 0.5 and opens the breaker.
    for fail in [false, true, false, true] {
        let _ = svc.clone().oneshot(fail).await;
    }
    // Two rejections while open.
    assert!(svc.clone().oneshot(false).await.is_err());
    assert!(svc.clone().oneshot(false).await.is_err());
    tokio::time::advance(Duration::from_millis(1_500)).await;
    let snap = registry.snapshot().remove(0);
    assert_eq!(snap.state, Some("open"));
    assert_eq!(snap.counter("rejected"), Some(2));
    assert_eq!(snap.gauge("failure_rate"), Some(0.5));
    assert_eq!(snap.gauge("calls_in_window"), Some(4.0));
    assert_eq!(snap.gauge("time_in_state_seconds"), Some(1.5));
    let json = serde_json::to_value(&snap).unwrap();
    assert_eq!(json["name"], "payments");
    assert_eq!(json["layer"], "circuit_breaker");
    assert_eq!(json["state"], "open");
    assert_eq!(json["counters"]["rejected"], 2);
    assert_eq!(json["gauges"]["failure_rate"], 0.5);
}
