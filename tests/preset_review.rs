//! The dependency preset under odd configurations, cancellation at each layer, panics, the
//! overall deadline's exact bound, and errors found through the whole stack.
#![cfg(feature = "preset")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::Count;
use tokio::time::{Instant, timeout};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::circuit_breaker::{SlidingWindow, State};
use tower_breakwater::config::ConfigError;
use tower_breakwater::error::{self, ErrorKind, LayerKind};
use tower_breakwater::preset::Dependency;
use tower_breakwater::registry::Registry;

const MS: Duration = Duration::from_millis(1);

/// Sleeps `ms` per request and counts calls; `13` and `14` panic while `panic` is set.
fn inner(
    calls: Count,
    panic: Arc<AtomicBool>,
) -> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone {
    service_fn(move |ms: u64| {
        calls.incr();
        let panic = panic.clone();
        async move {
            tokio::time::sleep(MS * ms as u32).await;
            assert!(
                !((ms == 13 || ms == 14) && panic.load(Ordering::SeqCst)),
                "inner panicked"
            );
            Ok::<_, BoxError>(ms)
        }
    })
}

fn sleeper(
    calls: Count,
) -> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone {
    inner(calls, Arc::default())
}

/// Spawns a call of `ms` and lets it take what it admits (token, permit, probe slot).
async fn holding<S>(svc: &S, ms: u64) -> tokio::task::JoinHandle<Result<u64, BoxError>>
where
    S: Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send + 'static,
{
    let holder = tokio::spawn(svc.clone().oneshot(ms));
    tokio::task::yield_now().await;
    holder
}

fn kind(err: &BoxError) -> (ErrorKind, String) {
    let ours = error::find(err.as_ref()).expect("one of ours");
    (ours.kind(), ours.name().to_owned())
}

/// The configured timeout, in seconds, of the registered timeout named `name`.
fn timeout_seconds(registry: &Registry, name: &str) -> Option<f64> {
    registry
        .snapshot()
        .into_iter()
        .find(|s| s.layer == LayerKind::Timeout && s.name == name)
        .and_then(|s| s.gauge("timeout_seconds"))
}

/// The configuration error of a preset with a rate limiter of `count` per second.
fn limiter_error(count: u64, burst: u64, max_wait: Duration) -> ConfigError {
    Dependency::builder("x")
        .rate_limit(count, Duration::from_secs(1), burst, max_wait)
        .build()
        .map(drop)
        .unwrap_err()
}

#[test]
fn odd_limits_are_config_errors_naming_layer_and_field() {
    let huge = Dependency::builder("x").concurrency(usize::MAX, Duration::ZERO);
    let cases = [
        (
            limiter_error(10, 0, Duration::ZERO),
            LayerKind::RateLimiter,
            "burst",
        ),
        (
            limiter_error(0, 1, Duration::ZERO),
            LayerKind::RateLimiter,
            "rate",
        ),
        (
            limiter_error(10, 1, Duration::MAX),
            LayerKind::RateLimiter,
            "max_wait",
        ),
        (
            huge.build().unwrap_err(),
            LayerKind::Bulkhead,
            "max_concurrent_calls",
        ),
    ];
    for (err, layer, field) in cases {
        assert_eq!((err.layer(), err.field()), (layer, field), "{err}");
    }
    let err = Dependency::builder("x")
        .deadline(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(
        (err.layer(), err.field(), err.name()),
        (LayerKind::Timeout, "timeout", "x:deadline")
    );
}

#[tokio::test(start_paused = true)]
async fn huge_durations_saturate_the_default_deadline_and_calls_still_work() {
    let registry = Registry::new();
    let calls = Count::default();
    let layer = Dependency::builder("x")
        .call_timeout(Duration::MAX)
        .concurrency(u32::MAX as usize, Duration::MAX)
        .registry(&registry)
        .build()
        .unwrap();
    assert_eq!(layer.bulkhead().max_concurrent_calls(), u32::MAX);
    assert_eq!(
        timeout_seconds(&registry, "x:deadline"),
        Some(Duration::MAX.as_secs_f64())
    );
    let svc = layer.layer(sleeper(calls.clone()));
    assert_eq!(svc.oneshot(5).await.unwrap(), 5);
    assert_eq!(calls.get(), 1);
    assert_eq!(layer.bulkhead().available(), u32::MAX);
}

#[tokio::test(start_paused = true)]
async fn a_layer_configured_twice_keeps_the_last_setting_and_breaker_settings_compose() {
    let registry = Registry::new();
    let calls = Count::default();
    let layer = Dependency::builder("x")
        .call_timeout(Duration::from_millis(100))
        .rate_limit(1, Duration::from_secs(10), 1, Duration::from_secs(5))
        .rate_limit(100, Duration::from_secs(1), 50, Duration::from_millis(30))
        .concurrency(1, Duration::from_secs(9))
        .concurrency(3, Duration::from_millis(20))
        .circuit_breaker(|b| b.wait_in_open(Duration::from_secs(1)))
        .circuit_breaker(|b| {
            b.sliding_window(SlidingWindow::count_based(2))
                .minimum_calls(2)
        })
        .registry(&registry)
        .build()
        .unwrap();
    let limiter = layer.rate_limiter();
    assert_eq!(
        (limiter.emission_interval(), limiter.burst()),
        (Duration::from_millis(10), 50)
    );
    assert_eq!(
        (
            layer.bulkhead().max_concurrent_calls(),
            layer.bulkhead().max_wait()
        ),
        (3, Duration::from_millis(20))
    );
    // Default deadline from the last waits: 100 + 20 + 30 ms.
    assert_eq!(timeout_seconds(&registry, "x:deadline"), Some(0.15));
    assert_eq!(registry.len(), 5, "one of each layer");
    // Both breaker settings hold: two timeouts open it, it probes after 1 s.
    let svc = layer.layer(sleeper(calls.clone()));
    for _ in 0..2 {
        let err = svc.clone().oneshot(1_000).await.unwrap_err();
        assert_eq!(kind(&err), (ErrorKind::Timeout, "x".to_owned()));
    }
    assert_eq!(layer.breaker().state(), State::Open);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(svc.oneshot(1).await.unwrap(), 1);
    assert_eq!(calls.get(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_limiter_wait_plus_bulkhead_wait_plus_call_exactly() {
    for (deadline, at, name) in [
        // Limiter wait to 200 ms, bulkhead wait to 300 ms (the holder's call times out),
        // then the call: ended at the 500 ms deadline by its own timeout, which takes the
        // enclosing deadline when it is earlier.
        (Some(500), 500, "inventory"),
        // Without one, the default (300 + 500 + 500 ms) never binds: the call's own timeout
        // ends it 300 ms after it started.
        (None, 600, "inventory"),
    ] {
        let calls = Count::default();
        let mut b = Dependency::builder("inventory")
            .call_timeout(Duration::from_millis(300))
            .concurrency(1, Duration::from_millis(500))
            .rate_limit(1, Duration::from_millis(200), 1, Duration::from_millis(500));
        if let Some(d) = deadline {
            b = b.deadline(Duration::from_millis(d));
        }
        let layer = b.build().unwrap();
        let svc = layer.layer(sleeper(calls.clone()));
        let start = Instant::now();
        let holder = holding(&svc, 10_000).await;
        assert_eq!(calls.get(), 1);
        let err = svc.oneshot(10_000).await.unwrap_err();
        assert_eq!(kind(&err), (ErrorKind::Timeout, name.to_owned()));
        assert_eq!(Instant::now() - start, Duration::from_millis(at));
        let err = holder.await.unwrap().unwrap_err();
        assert_eq!(kind(&err), (ErrorKind::Timeout, "inventory".to_owned()));
        assert_eq!(calls.get(), 2, "the waiter reached the dependency");
        assert_eq!(layer.bulkhead().available(), 1);
        assert_eq!(layer.bulkhead().waiting(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn a_deadline_shorter_than_the_call_timeout_is_a_config_error_naming_the_field() {
    // The call timeout could never fire: slow calls would be cancelled outside the breaker
    // and never count against the dependency.
    let err = Dependency::builder("inventory")
        .call_timeout(Duration::from_secs(1))
        .deadline(Duration::from_millis(100))
        .build()
        .map(drop)
        .unwrap_err();
    assert_eq!(
        (err.layer(), err.name(), err.field(), err.value()),
        (
            LayerKind::Timeout,
            "inventory:deadline",
            "deadline",
            "100ms"
        )
    );
    // The call timeout set through configure_timeout is the one compared.
    let err = Dependency::builder("inventory")
        .deadline(Duration::from_millis(100))
        .configure_timeout(|t| t.timeout(Duration::from_millis(101)))
        .build()
        .map(drop)
        .unwrap_err();
    assert_eq!((err.field(), err.value()), ("deadline", "100ms"));
    // A deadline equal to the call timeout lets it fire: four slow calls open the breaker.
    let layer = Dependency::builder("inventory")
        .call_timeout(Duration::from_millis(100))
        .deadline(Duration::from_millis(100))
        .circuit_breaker(|b| {
            b.sliding_window(SlidingWindow::count_based(4))
                .minimum_calls(4)
        })
        .build()
        .unwrap();
    let calls = Count::default();
    let svc = layer.layer(sleeper(calls.clone()));
    for _ in 0..4 {
        let err = svc.clone().oneshot(5_000).await.unwrap_err();
        assert_eq!(kind(&err), (ErrorKind::Timeout, "inventory".to_owned()));
    }
    assert_eq!(calls.get(), 4);
    assert_eq!(
        layer.breaker().state(),
        State::Open,
        "four slow calls in four"
    );
}

#[tokio::test(start_paused = true)]
async fn settings_given_through_configure_are_not_silently_dropped() {
    let registry = Registry::new();
    let layer = Dependency::builder("x")
        .concurrency(2, Duration::from_millis(5))
        .configure_bulkhead(|b| {
            b.max_concurrent_calls(4)
                .max_wait(Duration::from_millis(20))
        })
        .call_timeout(Duration::from_secs(3))
        .configure_timeout(|t| t.timeout(Duration::from_millis(50)))
        .registry(&registry)
        .build()
        .unwrap();
    assert_eq!(layer.bulkhead().max_concurrent_calls(), 4);
    assert_eq!(layer.bulkhead().max_wait(), Duration::from_millis(20));
    assert_eq!(timeout_seconds(&registry, "x"), Some(0.05));
    // The default deadline is the sum of what the built layers hold: 50 + 20 ms.
    assert_eq!(timeout_seconds(&registry, "x:deadline"), Some(0.07));

    // The other way round, the preset's methods win.
    let registry = Registry::new();
    let layer = Dependency::builder("y")
        .configure_bulkhead(|b| {
            b.max_concurrent_calls(4)
                .max_wait(Duration::from_millis(20))
        })
        .concurrency(3, Duration::ZERO)
        .configure_timeout(|t| t.timeout(Duration::from_millis(50)))
        .call_timeout(Duration::from_millis(200))
        .registry(&registry)
        .build()
        .unwrap();
    assert_eq!(layer.bulkhead().max_concurrent_calls(), 3);
    assert_eq!(layer.bulkhead().max_wait(), Duration::ZERO);
    assert_eq!(timeout_seconds(&registry, "y"), Some(0.2));
    assert_eq!(timeout_seconds(&registry, "y:deadline"), Some(0.2));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_limiter_waiter_gives_its_slot_to_the_next_caller() {
    let calls = Count::default();
    let layer = Dependency::builder("x")
        .rate_limit(1, Duration::from_secs(1), 1, Duration::from_secs(2))
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    let start = Instant::now();
    assert_eq!(svc.clone().oneshot(0).await.unwrap(), 0);
    // Waits for the slot at 1 s; dropped at 500 ms.
    let dropped = timeout(Duration::from_millis(500), svc.clone().oneshot(0)).await;
    assert!(dropped.is_err());
    assert_eq!(calls.get(), 1);
    // The next caller takes that slot, at 1 s, not the one after it.
    assert_eq!(svc.oneshot(0).await.unwrap(), 0);
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    assert_eq!(calls.get(), 2);
    let snap = layer.rate_limiter().snapshot();
    assert_eq!(snap.gauge("waiting"), Some(0.0));
}

#[tokio::test(start_paused = true)]
async fn dropped_calls_waiting_for_or_holding_a_permit_return_it() {
    let calls = Count::default();
    let layer = Dependency::builder("x")
        .call_timeout(Duration::from_secs(60))
        .concurrency(1, Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    let holder = holding(&svc, 30_000).await;
    assert_eq!(layer.bulkhead().available(), 0);
    let waiter = timeout(Duration::from_millis(100), svc.clone().oneshot(1)).await;
    assert!(waiter.is_err());
    assert_eq!(
        layer.bulkhead().waiting(),
        0,
        "the dropped waiter left the queue"
    );
    holder.abort();
    assert!(holder.await.unwrap_err().is_cancelled());
    assert_eq!(
        layer.bulkhead().available(),
        1,
        "the holder's permit came back"
    );
    let start = Instant::now();
    assert_eq!(svc.oneshot(7).await.unwrap(), 7);
    assert_eq!(Instant::now() - start, Duration::from_millis(7), "no wait");
    assert_eq!(calls.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_half_open_probe_frees_its_slot() {
    let calls = Count::default();
    let layer = Dependency::builder("x")
        .call_timeout(Duration::from_millis(100))
        .circuit_breaker(|b| {
            b.sliding_window(SlidingWindow::count_based(2))
                .minimum_calls(2)
                .wait_in_open(Duration::from_secs(1))
                .permitted_calls_in_half_open(1)
        })
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    for _ in 0..2 {
        svc.clone().oneshot(1_000).await.unwrap_err();
    }
    assert_eq!(layer.breaker().state(), State::Open);
    tokio::time::advance(Duration::from_secs(1)).await;
    // The only probe slot, taken by a call dropped after 10 ms.
    let probe = timeout(Duration::from_millis(10), svc.clone().oneshot(50)).await;
    assert!(probe.is_err());
    assert_eq!(layer.breaker().state(), State::HalfOpen);
    assert_eq!(svc.oneshot(5).await.unwrap(), 5, "the slot is free again");
    assert_eq!(layer.breaker().state(), State::Closed);
    assert_eq!(calls.get(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_inner_service_hangs_nobody_and_returns_every_permit() {
    let calls = Count::default();
    let panic = Arc::new(AtomicBool::new(true));
    // Odd values are cached; every value is coalesced.
    let layer = Dependency::builder("x")
        .concurrency(2, Duration::ZERO)
        .rate_limit(100, Duration::from_secs(1), 100, Duration::ZERO)
        .cache(|c| {
            c.key(|ms: &u64| (ms % 2 == 1).then_some(*ms))
                .ttl(Duration::from_secs(60))
        })
        .coalesce(|ms: &u64| Some(*ms))
        .build()
        .unwrap();
    let svc = layer.layer(inner(calls.clone(), panic.clone()));
    // 13: concurrent cache misses sharing one fetch; 14: fresh reads sharing one call.
    for ms in [13, 14] {
        let tasks: Vec<_> = (0..3)
            .map(|_| tokio::spawn(timeout(Duration::from_secs(5), svc.clone().oneshot(ms))))
            .collect();
        let (mut panicked, mut told) = (0, 0);
        for t in tasks {
            match t.await {
                Err(join) => {
                    assert!(join.is_panic());
                    panicked += 1;
                }
                Ok(res) => {
                    let err = res.expect("no hang").unwrap_err();
                    assert_eq!(kind(&err), (ErrorKind::Panicked, "x".to_owned()));
                    told += 1;
                }
            }
        }
        assert_eq!(
            (panicked, told),
            (1, 2),
            "the caller running the call panics"
        );
    }
    assert_eq!(
        calls.get(),
        2,
        "each set of concurrent callers shared one call"
    );
    assert_eq!(layer.bulkhead().available(), 2);
    let co = layer.coalescer().snapshot();
    assert_eq!(co.gauge("in_flight_keys"), Some(0.0));
    assert_eq!(layer.breaker().state(), State::Closed);
    panic.store(false, Ordering::SeqCst);
    assert_eq!(svc.clone().oneshot(13).await.unwrap(), 13);
    assert_eq!(svc.clone().oneshot(13).await.unwrap(), 13, "a hit");
    assert_eq!(svc.oneshot(14).await.unwrap(), 14);
    assert_eq!(calls.get(), 4);
    assert_eq!(layer.bulkhead().available(), 2);
}

#[tokio::test(start_paused = true)]
async fn error_find_sees_each_layers_error_through_cache_and_coalescing() {
    let calls = Count::default();
    let layer = Dependency::builder("p")
        .call_timeout(Duration::from_millis(100))
        .concurrency(1, Duration::ZERO)
        .rate_limit(5, Duration::from_secs(10), 5, Duration::ZERO)
        .cache(|c| {
            c.key(|ms: &u64| (ms % 2 == 1).then_some(*ms))
                .ttl(Duration::from_secs(60))
        })
        .coalesce(|ms: &u64| Some(*ms))
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    let p = |k| (k, "p".to_owned());
    // Concurrent slow callers, cached (odd) and fresh (even): each sees the per-call timeout.
    for ms in [1_001, 1_000] {
        let all: Vec<_> = (0..3)
            .map(|_| tokio::spawn(svc.clone().oneshot(ms)))
            .collect();
        for t in all {
            assert_eq!(kind(&t.await.unwrap().unwrap_err()), p(ErrorKind::Timeout));
        }
    }
    assert_eq!(calls.get(), 2);
    // Three tokens left: a slow holder takes one and the one permit; the limiter is outside
    // the bulkhead, so the two calls the bulkhead rejects spend the other two.
    let holder = holding(&svc, 60).await;
    for ms in [3, 4] {
        assert_eq!(
            kind(&svc.clone().oneshot(ms).await.unwrap_err()),
            p(ErrorKind::BulkheadFull)
        );
    }
    assert_eq!(holder.await.unwrap().unwrap(), 60);
    for ms in [5, 6] {
        assert_eq!(
            kind(&svc.clone().oneshot(ms).await.unwrap_err()),
            p(ErrorKind::RateLimited)
        );
    }
    layer.breaker().force_open();
    tokio::time::advance(Duration::from_secs(10)).await;
    for ms in [7, 8] {
        assert_eq!(
            kind(&svc.clone().oneshot(ms).await.unwrap_err()),
            p(ErrorKind::CircuitOpen)
        );
    }
    assert_eq!(calls.get(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_cut_off_by_the_deadline_after_waiting_counts_against_the_dependency() {
    let calls = Count::default();
    let layer = Dependency::builder("inventory")
        .call_timeout(Duration::from_millis(300))
        .concurrency(1, Duration::from_millis(500))
        .deadline(Duration::from_millis(400))
        .circuit_breaker(|b| {
            b.sliding_window(SlidingWindow::count_based(2))
                .minimum_calls(2)
        })
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    let holder = holding(&svc, 10_000).await;
    // Waits 300 ms for the holder's permit, then runs 100 ms until the deadline, which the
    // per-call timeout inside the breaker takes as its own.
    let err = svc.oneshot(10_000).await.unwrap_err();
    assert_eq!(kind(&err), (ErrorKind::Timeout, "inventory".to_owned()));
    let err = holder.await.unwrap().unwrap_err();
    assert_eq!(kind(&err), (ErrorKind::Timeout, "inventory".to_owned()));
    assert_eq!(calls.get(), 2);
    assert_eq!(
        layer.breaker().state(),
        State::Open,
        "two slow calls in two"
    );
}

#[tokio::test(start_paused = true)]
async fn every_layer_emits_its_events_to_the_preset_listener_once_under_the_dependency_name() {
    use std::sync::Mutex;
    let seen: Arc<Mutex<Vec<(LayerKind, String)>>> = Arc::default();
    let log = seen.clone();
    let layer = Dependency::builder("x")
        .call_timeout(Duration::from_millis(100))
        .concurrency(1, Duration::ZERO)
        .rate_limit(2, Duration::from_secs(10), 2, Duration::ZERO)
        .circuit_breaker(|b| {
            b.sliding_window(SlidingWindow::count_based(1))
                .minimum_calls(1)
        })
        .on_event(move |e| {
            if !e.kind().is_per_call()
                || matches!(
                    e.kind(),
                    tower_breakwater::event::EventKind::Rejected { .. }
                        | tower_breakwater::event::EventKind::TimedOut { .. }
                )
            {
                log.lock().unwrap().push((e.layer(), e.name().to_owned()));
            }
        })
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(Count::default()));
    let holder = holding(&svc, 1_000).await;
    svc.clone().oneshot(1).await.unwrap_err(); // bulkhead full
    holder.await.unwrap().unwrap_err(); // timed out: the breaker opens
    svc.clone().oneshot(1).await.unwrap_err(); // rate limited
    let seen = seen.lock().unwrap().clone();
    let x = |l| (l, "x".to_owned());
    assert_eq!(
        seen,
        vec![
            x(LayerKind::Bulkhead),
            x(LayerKind::Timeout),
            x(LayerKind::CircuitBreaker),
            x(LayerKind::RateLimiter),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn without_cache_and_coalescing_responses_need_not_be_clone() {
    /// A response that cannot be cloned.
    #[derive(Debug, PartialEq)]
    struct Receipt(u64);
    let calls = Count::default();
    let counted = calls.clone();
    let layer = Dependency::builder("x")
        .rate_limit(10, Duration::from_secs(1), 10, Duration::ZERO)
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(move |tx: u64| {
        counted.incr();
        async move { Ok::<_, BoxError>(Receipt(tx)) }
    }));
    assert_eq!(svc.oneshot(9).await.unwrap(), Receipt(9));
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_miss_under_the_cache_carries_its_exact_retry_after() {
    let calls = Count::default();
    let layer = Dependency::builder("p")
        .rate_limit(1, Duration::from_secs(10), 1, Duration::ZERO)
        .cache(|c| c.key(|ms: &u64| Some(*ms)).ttl(Duration::from_secs(60)))
        .coalesce(|ms: &u64| Some(*ms))
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    assert_eq!(svc.clone().oneshot(0).await.unwrap(), 0);
    tokio::time::advance(Duration::from_secs(4)).await;
    let err = svc.clone().oneshot(1).await.unwrap_err();
    let ours = error::find(err.as_ref()).unwrap();
    assert_eq!(
        (ours.kind(), ours.layer(), ours.retry_after()),
        (
            ErrorKind::RateLimited,
            LayerKind::RateLimiter,
            Some(Duration::from_secs(6))
        )
    );
    assert_eq!(svc.oneshot(0).await.unwrap(), 0, "a hit needs no token");
    assert_eq!(calls.get(), 1);
}

/// A dependency whose client never becomes ready (a pool that never frees a connection).
#[derive(Clone)]
struct NeverReady;

impl Service<u64> for NeverReady {
    type Response = u64;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u64, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Pending
    }

    fn call(&mut self, req: u64) -> Self::Future {
        std::future::ready(Ok(req))
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_becomes_ready_times_out_and_counts_against_the_dependency() {
    let layer = Dependency::builder("x")
        .call_timeout(Duration::from_millis(100))
        .concurrency(1, Duration::ZERO)
        .cache(|c| c.key(|ms: &u64| Some(*ms)).ttl(Duration::from_secs(60)))
        .circuit_breaker(|b| {
            b.sliding_window(SlidingWindow::count_based(2))
                .minimum_calls(2)
        })
        .build()
        .unwrap();
    let svc = layer.layer(NeverReady);
    let start = Instant::now();
    for ms in [1, 2] {
        let err = timeout(Duration::from_secs(5), svc.clone().oneshot(ms))
            .await
            .expect("bounded by the call timeout")
            .unwrap_err();
        assert_eq!(kind(&err), (ErrorKind::Timeout, "x".to_owned()));
    }
    assert_eq!(Instant::now() - start, Duration::from_millis(200));
    assert_eq!(layer.bulkhead().available(), 1);
    assert_eq!(layer.breaker().state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_or_a_full_bulkhead_serves_the_stale_entry_without_a_call() {
    let calls = Count::default();
    let layer = Dependency::builder("p")
        .concurrency(1, Duration::ZERO)
        .cache(|c| {
            c.key(|ms: &u64| Some(*ms))
                .ttl(Duration::from_secs(1))
                .max_staleness(Duration::from_secs(30))
                .random(|| 1.0)
        })
        .build()
        .unwrap();
    let svc = layer.layer(sleeper(calls.clone()));
    for ms in [1, 3] {
        assert_eq!(svc.clone().oneshot(ms).await.unwrap(), ms);
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    let holder = holding(&svc, 60).await;
    assert_eq!(
        svc.clone().oneshot(1).await.unwrap(),
        1,
        "bulkhead full: stale"
    );
    assert_eq!(holder.await.unwrap().unwrap(), 60);
    layer.breaker().force_open();
    assert_eq!(
        svc.clone().oneshot(3).await.unwrap(),
        3,
        "breaker open: stale"
    );
    let cache = layer.cache().snapshot();
    assert_eq!(
        (cache.counter("misses"), cache.counter("stale")),
        (Some(3), Some(2)),
        "each lookup is one miss or one stale answer"
    );
    assert_eq!(calls.get(), 3);
    assert_eq!(layer.bulkhead().available(), 1);
}
