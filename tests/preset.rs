//! The dependency preset: order of the layers, shared name, the overall deadline.
#![cfg(feature = "preset")]

mod support;

use std::time::Duration;

use support::{Count, TestRecorder};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::circuit_breaker::{SlidingWindow, State};
use tower_breakwater::error::{self, ErrorKind, LayerKind};
use tower_breakwater::preset::Dependency;
use tower_breakwater::registry::Registry;

/// An inner service sleeping `ms` per request and counting calls.
fn sleeper(
    calls: Count,
) -> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone {
    service_fn(move |ms: u64| {
        calls.incr();
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(ms)
        }
    })
}

/// The (name, kind) of every layer in `registry`, in registration order.
fn registered(registry: &Registry) -> Vec<(String, LayerKind)> {
    registry
        .snapshot()
        .into_iter()
        .map(|s| (s.name, s.layer))
        .collect()
}

fn kind(err: &BoxError) -> (ErrorKind, String) {
    let ours = error::find(err.as_ref()).expect("one of ours");
    (ours.kind(), ours.name().to_owned())
}

#[tokio::test(start_paused = true)]
async fn a_slow_dependency_trips_the_breaker_through_the_inner_timeout() {
    let calls = Count::default();
    let layer = Dependency::builder("inventory")
        .call_timeout(Duration::from_millis(100))
        .circuit_breaker(|b| {
            b.sliding_window(SlidingWindow::count_based(4))
                .minimum_calls(4)
                .wait_in_open(Duration::from_secs(10))
        })
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    for _ in 0..4 {
        let err = svc.clone().oneshot(1_000).await.unwrap_err();
        assert_eq!(kind(&err), (ErrorKind::Timeout, "inventory".to_owned()));
    }
    assert_eq!(layer.breaker().state(), State::Open);
    let err = svc.oneshot(1).await.unwrap_err();
    assert_eq!(kind(&err), (ErrorKind::CircuitOpen, "inventory".to_owned()));
    assert_eq!(calls.get(), 4);
}

#[tokio::test(start_paused = true)]
async fn bulkhead_rejections_never_count_against_the_dependency() {
    let calls = Count::default();
    let layer = Dependency::builder("inventory")
        .concurrency(1, Duration::ZERO)
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    let holder = tokio::spawn(svc.clone().oneshot(50));
    tokio::task::yield_now().await;
    for _ in 0..10 {
        let err = svc.clone().oneshot(1).await.unwrap_err();
        assert_eq!(
            kind(&err),
            (ErrorKind::BulkheadFull, "inventory".to_owned())
        );
    }
    assert_eq!(holder.await.unwrap().unwrap(), 50);
    assert_eq!(calls.get(), 1);
    let snap = layer.breaker().snapshot();
    assert_eq!(
        snap.gauge("calls_in_window"),
        Some(1.0),
        "only the holder's success"
    );
    assert_eq!(snap.gauge("failure_rate"), Some(0.0));
}

#[tokio::test(start_paused = true)]
async fn the_overall_deadline_bounds_bulkhead_wait_plus_call() {
    let calls = Count::default();
    let layer = Dependency::builder("inventory")
        .call_timeout(Duration::from_millis(300))
        .concurrency(1, Duration::from_millis(500))
        .deadline(Duration::from_millis(400))
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    let start = Instant::now();
    let holder = tokio::spawn(svc.clone().oneshot(1_000));
    tokio::task::yield_now().await;
    // Queued behind the holder until its call times out at 300 ms, then called; the overall
    // deadline ends it at 400 ms, before its own 300 ms call timeout would: the call timeout,
    // armed inside the deadline's poll, takes the deadline as its own (inside the breaker).
    let err = svc.oneshot(1_000).await.unwrap_err();
    assert_eq!(kind(&err), (ErrorKind::Timeout, "inventory".to_owned()));
    assert_eq!(Instant::now() - start, Duration::from_millis(400));
    let err = holder.await.unwrap().unwrap_err();
    assert_eq!(kind(&err), (ErrorKind::Timeout, "inventory".to_owned()));
    assert_eq!(calls.get(), 2);
    assert_eq!(layer.bulkhead().available(), 1, "every permit came back");
}

#[tokio::test(start_paused = true)]
async fn coalesced_callers_take_no_permit_and_no_rate_token() {
    let calls = Count::default();
    let layer = Dependency::builder("profiles")
        .concurrency(1, Duration::ZERO)
        .rate_limit(1, Duration::from_secs(10), 1, Duration::ZERO)
        .coalesce(|ms: &u64| Some(*ms))
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    let all: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(20)))
        .collect();
    for t in all {
        assert_eq!(t.await.unwrap().unwrap(), 20);
    }
    assert_eq!(calls.get(), 1);
    // The one token is spent: the next call (new key, nothing in flight) is rate limited.
    let err = svc.oneshot(21).await.unwrap_err();
    assert_eq!(kind(&err), (ErrorKind::RateLimited, "profiles".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn every_layer_carries_the_dependency_name() {
    let registry = Registry::new();
    let _layer = Dependency::builder("fraud")
        .rate_limit(100, Duration::from_secs(1), 10, Duration::ZERO)
        .registry(&registry)
        .build()
        .unwrap();
    assert_eq!(
        registered(&registry),
        vec![
            ("fraud".to_owned(), LayerKind::RateLimiter),
            ("fraud".to_owned(), LayerKind::Bulkhead),
            ("fraud".to_owned(), LayerKind::CircuitBreaker),
            ("fraud".to_owned(), LayerKind::Timeout),
            // Last: its default is computed from the built layers' settings.
            ("fraud:deadline".to_owned(), LayerKind::Timeout),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn with_cache_and_coalescing_every_layer_carries_the_dependency_name() {
    let registry = Registry::new();
    let rec = TestRecorder::default();
    let layer = rec.install_while(|| {
        Dependency::builder("profiles")
            .cache(|c| c.key(|ms: &u64| Some(*ms)).ttl(Duration::from_secs(60)))
            .coalesce(|ms: &u64| Some(*ms))
            .rate_limit(100, Duration::from_secs(1), 10, Duration::ZERO)
            .registry(&registry)
            .build()
            .unwrap()
    });
    assert_eq!(
        registered(&registry),
        vec![
            ("profiles".to_owned(), LayerKind::Cache),
            ("profiles".to_owned(), LayerKind::Coalesce),
            ("profiles".to_owned(), LayerKind::RateLimiter),
            ("profiles".to_owned(), LayerKind::Bulkhead),
            ("profiles".to_owned(), LayerKind::CircuitBreaker),
            ("profiles".to_owned(), LayerKind::Timeout),
            // Last: its default is computed from the built layers' settings.
            ("profiles:deadline".to_owned(), LayerKind::Timeout),
        ]
    );
    assert_eq!(layer.cache().name(), "profiles");
    assert_eq!(layer.coalescer().name(), "profiles");
    assert_eq!(layer.rate_limiter().name(), "profiles");
    // The metric series carry the name label too: one miss, then one hit.
    let svc = layer.layer(sleeper(Count::default()));
    svc.clone().oneshot(5).await.unwrap();
    svc.oneshot(5).await.unwrap();
    let name = ("name", "profiles");
    for result in ["miss", "hit"] {
        assert_eq!(
            rec.counter(
                "breakwater_cache_lookups_total",
                &[name, ("result", result)]
            ),
            Some(1),
            "{result}"
        );
    }
    assert_eq!(
        rec.counter(
            "breakwater_coalesce_calls_total",
            &[name, ("role", "leader")]
        ),
        Some(1)
    );
}

#[tokio::test(start_paused = true)]
async fn cache_hits_take_no_permit_and_no_rate_token() {
    let calls = Count::default();
    // One permit, no wait; two tokens per 10 s, no wait: a hit reaching either would fail.
    let layer = Dependency::builder("profiles")
        .concurrency(1, Duration::ZERO)
        .rate_limit(2, Duration::from_secs(10), 2, Duration::ZERO)
        .cache(|c| c.key(|ms: &u64| Some(*ms)).ttl(Duration::from_secs(60)))
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    assert_eq!(svc.clone().oneshot(20).await.unwrap(), 20, "miss: fetched");
    // A slow call of another key holds the one permit and spends the last token.
    let holder = tokio::spawn(svc.clone().oneshot(1_000));
    tokio::task::yield_now().await;
    assert_eq!(layer.bulkhead().available(), 0);
    let limiter_before = layer.rate_limiter().snapshot();
    assert_eq!(limiter_before.gauge("available"), Some(0.0));
    let start = Instant::now();
    for _ in 0..10 {
        assert_eq!(svc.clone().oneshot(20).await.unwrap(), 20, "hit");
    }
    assert_eq!(Instant::now(), start, "hits answer at once");
    assert_eq!(calls.get(), 2);
    assert_eq!(layer.bulkhead().available(), 0, "the holder's permit only");
    let bulkhead = layer.bulkhead().snapshot();
    assert_eq!(bulkhead.counter("rejected"), Some(0));
    let limiter = layer.rate_limiter().snapshot();
    assert_eq!(limiter, limiter_before, "hits leave the limiter untouched");
    assert_eq!(limiter.counter("rejected"), Some(0));
    let cache = layer.cache().snapshot();
    assert_eq!(
        (cache.counter("hits"), cache.counter("misses")),
        (Some(10), Some(1))
    );
    // A miss does reach the limiter: no token left.
    let err = svc.clone().oneshot(21).await.unwrap_err();
    assert_eq!(kind(&err), (ErrorKind::RateLimited, "profiles".to_owned()));
    assert_eq!(holder.await.unwrap().unwrap(), 1_000);
    assert_eq!(layer.bulkhead().available(), 1);
    assert_eq!(calls.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn under_the_cache_coalescing_shares_the_requests_the_cache_lets_through() {
    let calls = Count::default();
    // Even values ask for a fresh answer: no cache key, still a coalescing key.
    let layer = Dependency::builder("profiles")
        .cache(|c| {
            c.key(|ms: &u64| (ms % 2 == 1).then_some(*ms))
                .ttl(Duration::from_secs(60))
        })
        .coalesce(|ms: &u64| Some(*ms))
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    let fresh: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(20)))
        .collect();
    for t in fresh {
        assert_eq!(t.await.unwrap().unwrap(), 20);
    }
    assert_eq!(calls.get(), 1, "five fresh reads, one upstream call");
    let co = layer.coalescer().snapshot();
    assert_eq!(
        (co.counter("leaders"), co.counter("followers")),
        (Some(1), Some(4))
    );
    let cache = layer.cache().snapshot();
    assert_eq!(
        (cache.counter("hits"), cache.counter("misses")),
        (Some(0), Some(0)),
        "requests without a cache key are not lookups"
    );
    // Concurrent misses of a cached key: the cache coalesces them itself, so the coalescing
    // layer below sees one request (a leader, no follower).
    let misses: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(21)))
        .collect();
    for t in misses {
        assert_eq!(t.await.unwrap().unwrap(), 21);
    }
    assert_eq!(svc.clone().oneshot(21).await.unwrap(), 21);
    assert_eq!(calls.get(), 2);
    let cache = layer.cache().snapshot();
    assert_eq!(
        (cache.counter("hits"), cache.counter("misses")),
        (Some(1), Some(5))
    );
    let co = layer.coalescer().snapshot();
    assert_eq!(
        (co.counter("leaders"), co.counter("followers")),
        (Some(2), Some(4))
    );
}

#[test]
fn invalid_settings_are_config_errors() {
    let err = Dependency::builder("x")
        .call_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!((err.layer(), err.field()), (LayerKind::Timeout, "timeout"));
    let err = Dependency::builder("x")
        .concurrency(0, Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.layer(), LayerKind::Bulkhead);
    let err = Dependency::builder("").build().unwrap_err();
    assert_eq!(err.field(), "name");
    let err = Dependency::builder("x")
        .cache(|c| c.key(|k: &u64| Some(*k)))
        .build()
        .unwrap_err();
    assert_eq!((err.layer(), err.field()), (LayerKind::Cache, "ttl"));
}
