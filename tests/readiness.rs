//! Inner services that are not ready at once, under every always-ready layer: the layer asks
//! the inner service once in `call`; a ready one is called there, one that is not is moved
//! into the response future, which drives its readiness with the task's waker (so what its
//! readiness registered, here a place in a semaphore's queue, is woken, used, and released
//! when that future is dropped); a clone takes its place in the layer's service.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::Semaphore;
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service, ServiceExt};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::circuit_breaker::CircuitBreakerLayer;
use tower_breakwater::rate_limit::RateLimitLayer;
use tower_breakwater::timeout::TimeoutLayer;

/// Request 0 holds until the gate opens; every other request answers itself at once.
#[derive(Clone)]
struct Gated {
    calls: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl Service<u32> for Gated {
    type Response = u32;
    type Error = BoxError;
    type Future = futures_util::future::BoxFuture<'static, Result<u32, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, r: u32) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let gate = self.gate.clone();
        async move {
            if r == 0 {
                gate.acquire().await.expect("gate open").forget();
            }
            Ok(r)
        }
        .boxed()
    }
}

/// Lets the tasks spawned so far run until they wait.
async fn run_tasks() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// The whole scenario under `layer`, over one inner permit (tower's `ConcurrencyLimit`).
async fn not_ready_inner_is_driven_by_the_response_future<L>(layer: L)
where
    L: Layer<ConcurrencyLimit<Gated>>,
    L::Service: Service<u32, Response = u32, Error = BoxError> + Clone + Send + 'static,
    <L::Service as Service<u32>>::Future: Send + 'static,
{
    let gated = Gated {
        calls: Arc::new(AtomicUsize::new(0)),
        gate: Arc::new(Semaphore::new(0)),
    };
    let calls = gated.calls.clone();
    let gate = gated.gate.clone();
    let mut svc = layer.layer(ConcurrencyLimit::new(gated, 1));

    // Ready at once: called in `call`, before the future is polled.
    let holder = svc.ready().await.unwrap().call(0);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "called in `call`");
    let holder = tokio::spawn(holder);
    // Not ready (the one inner permit is held): nothing called until the permit comes back.
    let waiter = tokio::spawn(svc.ready().await.unwrap().call(1));
    run_tasks().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(!waiter.is_finished());
    gate.add_permits(1);
    assert_eq!(holder.await.unwrap().unwrap(), 0);
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        1,
        "woken with the task's waker"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // The service left in the layer holds no reservation: the permit is free for each call.
    assert_eq!(svc.ready().await.unwrap().call(5).await.unwrap(), 5);
    assert_eq!(svc.ready().await.unwrap().call(6).await.unwrap(), 6);
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    // A waiting call dropped after a poll gives its place in the queue back.
    let holder = tokio::spawn(svc.ready().await.unwrap().call(0));
    let mut dropped = Box::pin(svc.ready().await.unwrap().call(1));
    assert!(dropped.as_mut().now_or_never().is_none());
    drop(dropped);
    gate.add_permits(1);
    assert_eq!(holder.await.unwrap().unwrap(), 0);
    assert_eq!(svc.ready().await.unwrap().call(7).await.unwrap(), 7);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        6,
        "the dropped call never reached it"
    );
}

#[tokio::test(start_paused = true)]
async fn timeout() {
    not_ready_inner_is_driven_by_the_response_future(
        TimeoutLayer::new(Duration::from_secs(3_600)).unwrap(),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn circuit_breaker() {
    not_ready_inner_is_driven_by_the_response_future(
        CircuitBreakerLayer::builder().build().unwrap(),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn bulkhead() {
    let layer = BulkheadLayer::new(10).unwrap();
    let h = layer.handle();
    not_ready_inner_is_driven_by_the_response_future(layer).await;
    assert_eq!(h.snapshot().gauge("available"), Some(10.0));
}

#[tokio::test(start_paused = true)]
async fn rate_limiter() {
    not_ready_inner_is_driven_by_the_response_future(
        RateLimitLayer::builder()
            .rate(1_000, Duration::from_secs(1))
            .build()
            .unwrap(),
    )
    .await;
}

/// An inner service whose readiness fails: every layer returns that error, and the breaker
/// counts it as a failed call.
#[derive(Clone)]
struct Broken {
    calls: Arc<AtomicUsize>,
}

impl Service<u32> for Broken {
    type Response = u32;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u32, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Err("inner not ready".into()))
    }

    fn call(&mut self, r: u32) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(r))
    }
}

async fn readiness_error_is_the_answer<L>(layer: L) -> Arc<AtomicUsize>
where
    L: Layer<Broken>,
    L::Service: Service<u32, Response = u32, Error = BoxError>,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = layer.layer(Broken {
        calls: calls.clone(),
    });
    let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
    assert_eq!(err.to_string(), "inner not ready");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    calls
}

#[tokio::test(start_paused = true)]
async fn readiness_errors_are_returned_by_every_layer() {
    readiness_error_is_the_answer(TimeoutLayer::new(Duration::from_secs(1)).unwrap()).await;
    let bulkhead = BulkheadLayer::new(1).unwrap();
    let h = bulkhead.handle();
    readiness_error_is_the_answer(bulkhead).await;
    assert_eq!(h.snapshot().gauge("available"), Some(1.0));
    readiness_error_is_the_answer(
        RateLimitLayer::builder()
            .rate(1, Duration::from_secs(1))
            .build()
            .unwrap(),
    )
    .await;
    let breaker = CircuitBreakerLayer::builder().build().unwrap();
    let h = breaker.handle();
    readiness_error_is_the_answer(breaker).await;
    assert_eq!(h.snapshot().gauge("calls_in_window"), Some(1.0));
    assert_eq!(h.snapshot().gauge("failure_rate"), Some(1.0));
}

/// Fails request 0, panics in `call` on request 1, answers the others.
#[derive(Clone)]
struct PanicsInCall;

impl Service<u32> for PanicsInCall {
    type Response = u32;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u32, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, r: u32) -> Self::Future {
        match r {
            0 => std::future::ready(Err("failed".into())),
            1 => panic!("inner panics in call"),
            r => std::future::ready(Ok(r)),
        }
    }
}

/// The inner service runs inside the breaker's `call`: its panic unwinds out of `call`, and
/// the half-open probe slot that call took is free again at once.
#[tokio::test(start_paused = true)]
async fn an_inner_panic_in_call_frees_the_half_open_probe_slot() {
    use tower_breakwater::circuit_breaker::{SlidingWindow, State};
    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::consecutive_failures(1))
        .wait_in_open(Duration::from_secs(1))
        .permitted_calls_in_half_open(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(PanicsInCall);
    assert!(svc.ready().await.unwrap().call(0).await.is_err());
    assert_eq!(h.state(), State::Open);
    tokio::time::advance(Duration::from_secs(1)).await;
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(svc.call(1))));
    assert!(caught.is_err(), "the panic unwinds out of `call`");
    assert_eq!(h.state(), State::HalfOpen);
    // The one probe slot is free: the next call is admitted (not rejected) and closes it.
    assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), 2);
    assert_eq!(h.state(), State::Closed);
}
