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

#[cfg(all(
    feature = "circuit-breaker",
    feature = "bulkhead",
    feature = "rate-limit",
    feature = "coalesce",
    feature = "cache"
))]
#[test]
fn every_layer_kind_joins_the_registry() {
    use tower_breakwater::bulkhead::BulkheadLayer;
    use tower_breakwater::cache::CacheLayer;
    use tower_breakwater::circuit_breaker::CircuitBreakerLayer;
    use tower_breakwater::coalesce::CoalesceLayer;
    use tower_breakwater::error::LayerKind;
    use tower_breakwater::rate_limit::RateLimitLayer;

    let registry = Registry::new();
    let _t = timeout("t", Some(&registry));
    let _b = CircuitBreakerLayer::builder()
        .name("b")
        .registry(&registry)
        .build()
        .unwrap();
    let _h = BulkheadLayer::builder()
        .name("h")
        .max_concurrent_calls(4)
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
    let _c = CoalesceLayer::builder()
        .name("c")
        .key(|x: &u32| Some(*x))
        .registry(&registry)
        .build()
        .unwrap();
    let _m = CacheLayer::builder()
        .name("m")
        .key(|x: &u32| Some(*x))
        .ttl(Duration::from_secs(1))
        .registry(&registry)
        .build()
        .unwrap();
    let kinds: Vec<(String, LayerKind, Option<&str>)> = registry
        .snapshot()
        .into_iter()
        .map(|s| (s.name, s.layer, s.state))
        .collect();
    let kind = |n: &str, k, s| (n.to_owned(), k, s);
    assert_eq!(
        kinds,
        vec![
            kind("t", LayerKind::Timeout, None),
            kind("b", LayerKind::CircuitBreaker, Some("closed")),
            kind("h", LayerKind::Bulkhead, None),
            kind("r", LayerKind::RateLimiter, None),
            kind("k", LayerKind::RateLimiter, None),
            kind("c", LayerKind::Coalesce, None),
            kind("m", LayerKind::Cache, None),
        ]
    );
    drop(keyed);
    assert_eq!(registry.len(), 6);
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

/// The one snapshot of `registry`, serialized.
#[cfg(feature = "serde")]
fn json(registry: &Registry) -> String {
    let all = registry.snapshot();
    assert_eq!(all.len(), 1);
    serde_json::to_string(&all[0]).unwrap()
}

/// Polls a future once with a waker that does nothing.
#[allow(dead_code)] // not every feature set uses it
fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
    std::pin::Pin::new(f).poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

/// Wait mode, T = 100 ms, burst 1, maximum wait 250 ms: one call at once, two waiters, one
/// rejected; 100 ms later the first waiter is admitted and the second dropped (given back);
/// 50 ms later, the snapshot.
#[cfg(all(feature = "serde", feature = "rate-limit"))]
#[tokio::test(start_paused = true)]
async fn a_rate_limiter_snapshot_after_a_scripted_sequence_is_exact_and_serializes() {
    use tower::{Layer, Service, service_fn};
    use tower_breakwater::BoxError;
    use tower_breakwater::rate_limit::RateLimitLayer;

    let registry = Registry::new();
    let layer = RateLimitLayer::builder()
        .name("geo-api")
        .rate(10, Duration::from_secs(1))
        .burst(1)
        .max_wait(Duration::from_millis(250))
        .registry(&registry)
        .build()
        .unwrap();
    let mut svc = layer.layer(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
    let mut calls: Vec<_> = (0..4).map(|x| Box::pin(svc.call(x))).collect();
    assert!(poll_once(&mut calls[0]).is_ready());
    assert!(poll_once(&mut calls[3]).is_ready()); // rejected
    assert_eq!(
        json(&registry),
        r#"{"name":"geo-api","layer":"rate_limiter","state":null,"counters":{"abandoned":0,"given_back":0,"rejected":1,"waited":0},"gauges":{"available":0.0,"wait_seconds":0.3,"waiting":2.0}}"#
    );
    tokio::time::advance(Duration::from_millis(100)).await;
    assert!(poll_once(&mut calls[1]).is_ready());
    drop(calls);
    tokio::time::advance(Duration::from_millis(50)).await;
    assert_eq!(
        json(&registry),
        r#"{"name":"geo-api","layer":"rate_limiter","state":null,"counters":{"abandoned":1,"given_back":1,"rejected":1,"waited":1},"gauges":{"available":0.0,"wait_seconds":0.05,"waiting":0.0}}"#
    );
}

/// Keyed, 1 per second per key, at most 2 keys: keys 1, 1 (rate limited), 2, 3 (too many).
#[cfg(all(feature = "serde", feature = "rate-limit"))]
#[tokio::test(start_paused = true)]
async fn a_keyed_rate_limiter_snapshot_is_exact_and_serializes() {
    use tower::{Layer, ServiceExt, service_fn};
    use tower_breakwater::BoxError;
    use tower_breakwater::rate_limit::RateLimitLayer;

    let registry = Registry::new();
    let layer = RateLimitLayer::builder()
        .name("tenants")
        .rate(1, Duration::from_secs(1))
        .keyed(|x: &u32| *x)
        .max_keys(2)
        .registry(&registry)
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
    for (key, ok) in [(1, true), (1, false), (2, true), (3, false)] {
        assert_eq!(svc.clone().oneshot(key).await.is_ok(), ok, "key {key}");
    }
    assert_eq!(
        json(&registry),
        r#"{"name":"tenants","layer":"rate_limiter","state":null,"counters":{"abandoned":0,"given_back":0,"rejected":1,"too_many_keys":1,"waited":0},"gauges":{"keys":2.0,"waiting":0.0}}"#
    );
}

/// Two holders of a maximum of 2, one waiter, one rejected (the queue of 1 is full).
#[cfg(all(feature = "serde", feature = "bulkhead"))]
#[tokio::test(start_paused = true)]
async fn a_bulkhead_snapshot_is_exact_and_serializes() {
    use tower::{Layer, ServiceExt, service_fn};
    use tower_breakwater::BoxError;
    use tower_breakwater::bulkhead::BulkheadLayer;

    let registry = Registry::new();
    let layer = BulkheadLayer::builder()
        .name("pool")
        .max_concurrent_calls(2)
        .max_wait(Duration::from_millis(250))
        .max_waiting(1)
        .registry(&registry)
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|_: ()| async {
        std::future::pending::<()>().await;
        Ok::<(), BoxError>(())
    }));
    let held: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(())))
        .collect();
    tokio::task::yield_now().await;
    assert!(svc.clone().oneshot(()).await.is_err());
    assert_eq!(
        json(&registry),
        r#"{"name":"pool","layer":"bulkhead","state":null,"counters":{"rejected":1},"gauges":{"available":0.0,"in_flight":2.0,"max_concurrent_calls":2.0,"max_wait_seconds":0.25,"waiting":1.0}}"#
    );
    held.iter().for_each(|h| h.abort());
}

/// Key 1 three times at once (a leader, two followers), key 2 once and abandoned, key 0
/// panicking; the snapshot while key 3 is in flight.
#[cfg(all(feature = "serde", feature = "coalesce"))]
#[tokio::test(start_paused = true)]
async fn a_coalescing_snapshot_is_exact_and_serializes() {
    use tower::{Layer, Service, ServiceExt, service_fn};
    use tower_breakwater::BoxError;
    use tower_breakwater::coalesce::CoalesceLayer;

    let registry = Registry::new();
    let layer = CoalesceLayer::builder()
        .name("profiles")
        .key(|x: &u32| Some(*x))
        .registry(&registry)
        .build()
        .unwrap();
    let mut svc = layer.layer(service_fn(|x: u32| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(x != 0, "upstream bug");
        Ok::<_, BoxError>(x)
    }));
    let (a, b, c) = tokio::join!(
        svc.clone().oneshot(1),
        svc.clone().oneshot(1),
        svc.clone().oneshot(1)
    );
    assert_eq!((a.unwrap(), b.unwrap(), c.unwrap()), (1, 1, 1));
    let mut abandoned = Box::pin(svc.call(2));
    assert!(poll_once(&mut abandoned).is_pending());
    drop(abandoned);
    assert!(
        tokio::spawn(svc.clone().oneshot(0))
            .await
            .unwrap_err()
            .is_panic()
    );
    let mut flying = Box::pin(svc.call(3));
    assert!(poll_once(&mut flying).is_pending());
    assert_eq!(
        json(&registry),
        r#"{"name":"profiles","layer":"coalesce","state":null,"counters":{"abandoned":1,"followers":2,"leaders":4,"panics":1},"gauges":{"in_flight_keys":1.0}}"#
    );
}

/// A miss, a hit, then (the upstream failing) a miss of another key that fails, and a
/// request without a key (9), passed through.
#[cfg(all(feature = "serde", feature = "cache"))]
#[tokio::test(start_paused = true)]
async fn a_cache_snapshot_is_exact_and_serializes() {
    use tower::{Layer, ServiceExt, service_fn};
    use tower_breakwater::BoxError;
    use tower_breakwater::cache::CacheLayer;

    let registry = Registry::new();
    let layer = CacheLayer::builder()
        .name("quotes")
        .key(|k: &u32| (*k != 9).then_some(*k))
        .ttl(Duration::from_secs(60))
        .random(|| 1.0)
        .registry(&registry)
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|k: u32| async move {
        if k == 0 {
            Err::<u32, BoxError>("down".into())
        } else {
            Ok(k)
        }
    }));
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
    assert!(svc.clone().oneshot(0).await.is_err());
    assert_eq!(svc.clone().oneshot(9).await.unwrap(), 9);
    assert_eq!(
        json(&registry),
        r#"{"name":"quotes","layer":"cache","state":null,"counters":{"early_refreshes":0,"fetches":2,"hits":1,"misses":2,"negative":0,"passed_through":1,"refresh_errors":1,"stale":0},"gauges":{"entries":1.0}}"#
    );
}
