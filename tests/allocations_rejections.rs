//! Allocation counts per call on each layer's rejection path: at most one, the boxed error.
//! Counted per thread (`allocation-counter`) on a current-thread runtime after a warm-up, as
//! the difference between `2n` and `n` calls so one-off runtime allocations do not count.

mod support;

use std::time::Duration;

use support::TestRecorder;
use tower::{Service, ServiceExt};
use tower_breakwater::error::{self, ErrorKind};

const CALLS: u64 = 1_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Allocations per rejected call; asserts every call is rejected with `kind`.
fn allocs_per_rejection<S>(rt: &tokio::runtime::Runtime, mut svc: S, kind: ErrorKind) -> f64
where
    S: Service<u32, Error = tower_breakwater::BoxError>,
{
    let mut run = |n: u64| {
        allocation_counter::measure(|| {
            rt.block_on(async {
                for _ in 0..n {
                    let err = match svc.ready().await.unwrap().call(1).await {
                        Ok(_) => panic!("expected a rejection"),
                        Err(e) => e,
                    };
                    assert_eq!(error::find(err.as_ref()).unwrap().kind(), kind);
                }
            })
        })
        .count_total
    };
    run(100);
    let once = run(CALLS);
    let twice = run(2 * CALLS);
    twice.saturating_sub(once) as f64 / CALLS as f64
}

fn inner() -> impl Service<u32, Response = u32, Error = std::convert::Infallible> + Clone {
    tower::service_fn(|x: u32| std::future::ready(Ok(x)))
}

#[cfg(feature = "circuit-breaker")]
#[test]
fn an_open_breaker_allocates_only_the_boxed_error() {
    use tower_breakwater::circuit_breaker::CircuitBreakerLayer;
    let rt = runtime();
    for rec in [None, Some(TestRecorder::default())] {
        let build = || CircuitBreakerLayer::builder().build().unwrap();
        let layer = match &rec {
            Some(r) => r.install_while(build),
            None => build(),
        };
        layer.handle().force_open();
        let svc = tower::Layer::layer(&layer, inner());
        assert_eq!(allocs_per_rejection(&rt, svc, ErrorKind::CircuitOpen), 1.0);
    }
}

#[cfg(feature = "bulkhead")]
#[test]
fn a_full_bulkhead_allocates_only_the_boxed_error() {
    use tower_breakwater::bulkhead::BulkheadLayer;
    let rt = runtime();
    for rec in [None, Some(TestRecorder::default())] {
        let build = || BulkheadLayer::new(1).unwrap();
        let layer = match &rec {
            Some(r) => r.install_while(build),
            None => build(),
        };
        let mut svc = tower::Layer::layer(
            &layer,
            tower::service_fn(|x: u32| async move {
                std::future::pending::<()>().await;
                Ok::<u32, std::convert::Infallible>(x)
            }),
        );
        // One call holds the only permit for the whole test.
        rt.block_on(svc.ready()).unwrap();
        let mut holder = Box::pin(svc.call(0));
        let waker = std::task::Waker::noop();
        assert!(
            std::future::Future::poll(holder.as_mut(), &mut std::task::Context::from_waker(waker))
                .is_pending()
        );
        assert_eq!(allocs_per_rejection(&rt, svc, ErrorKind::BulkheadFull), 1.0);
        drop(holder);
    }
}

#[cfg(feature = "rate-limit")]
#[test]
fn a_rate_limited_call_allocates_only_the_boxed_error() {
    use tower_breakwater::rate_limit::RateLimitLayer;
    let rt = runtime();
    for rec in [None, Some(TestRecorder::default())] {
        let build = || {
            RateLimitLayer::builder()
                .rate(1, Duration::from_secs(3_600))
                .build()
                .unwrap()
        };
        let layer = match &rec {
            Some(r) => r.install_while(build),
            None => build(),
        };
        let mut svc = tower::Layer::layer(&layer, inner());
        // Spend the one token.
        rt.block_on(async { svc.ready().await.unwrap().call(0).await.unwrap() });
        assert_eq!(allocs_per_rejection(&rt, svc, ErrorKind::RateLimited), 1.0);
    }
}
