//! Rate limiter: GCRA on the paused clock (exact times and waits), waiters and their drops,
//! keyed limiting and its sweeps, shared state, metrics, events, config; a property test of
//! the GCRA bound; a multi-thread count test.
#![cfg(feature = "rate-limit")]

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use proptest::prelude::*;
use support::{Count, TestRecorder};
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::error::{self, ErrorKind, LayerKind};
use tower_breakwater::event::EventKind;
use tower_breakwater::rate_limit::{RateLimitHandle, RateLimitLayer};

const CALLS: &str = "breakwater_rate_limiter_calls_total";
const WAIT: &str = "breakwater_rate_limiter_wait_duration_seconds";
const KEYS: &str = "breakwater_rate_limiter_keys";

type Times = Arc<Mutex<Vec<Duration>>>;

/// An inner service that records the time (since `start`) of every call it receives.
fn recorder(
    start: Instant,
) -> (
    Times,
    impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + Send,
) {
    let times: Times = Arc::default();
    let log = times.clone();
    let svc = service_fn(move |x: u32| {
        log.lock().unwrap().push(Instant::now() - start);
        std::future::ready(Ok::<_, BoxError>(x))
    });
    (times, svc)
}

fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    Pin::new(f).poll(&mut cx)
}

/// Calls `svc` now (reserving in `call`) and returns the response future.
async fn call<S: Service<u32>>(svc: &mut S, x: u32) -> S::Future
where
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap();
    svc.call(x)
}

fn rejection(err: &BoxError) -> (ErrorKind, Option<Duration>) {
    let ours = error::find(err.as_ref()).expect("a rejection of ours");
    assert_eq!(ours.layer(), LayerKind::RateLimiter);
    (ours.kind(), ours.retry_after())
}

#[tokio::test(start_paused = true)]
async fn reject_mode_reports_the_exact_time_until_the_next_permit() {
    let rec = TestRecorder::default();
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    // 3 per second: T = ceil(1e9 / 3) = 333_333_334 ns; burst 2: tau = T.
    let layer = rec.install_while(|| {
        RateLimitLayer::builder()
            .name("geo")
            .rate(3, Duration::from_secs(1))
            .burst(2)
            .on_event(move |e| log.lock().unwrap().push(e.kind()))
            .build()
            .unwrap()
    });
    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = layer.layer(inner);
    assert_eq!(
        layer.handle().emission_interval(),
        Duration::from_nanos(333_333_334)
    );
    assert_eq!(layer.handle().snapshot().gauge("available"), Some(2.0));

    svc.ready().await.unwrap().call(1).await.unwrap();
    svc.ready().await.unwrap().call(2).await.unwrap();
    // TAT = 2T; the next call conforms at TAT - tau = T.
    let err = svc.ready().await.unwrap().call(3).await.unwrap_err();
    assert_eq!(
        rejection(&err),
        (
            ErrorKind::RateLimited,
            Some(Duration::from_nanos(333_333_334))
        )
    );
    let snap = layer.handle().snapshot();
    assert_eq!(snap.gauge("available"), Some(0.0));
    assert_eq!(snap.gauge("wait_seconds"), Some(0.333_333_334));

    advance(Duration::from_millis(100)).await;
    let err = svc.ready().await.unwrap().call(4).await.unwrap_err();
    assert_eq!(rejection(&err).1, Some(Duration::from_nanos(233_333_334)));
    // One nanosecond before the slot: 1 ns to go. At the slot: admitted.
    advance(Duration::from_nanos(233_333_333)).await;
    let err = svc.ready().await.unwrap().call(5).await.unwrap_err();
    assert_eq!(rejection(&err).1, Some(Duration::from_nanos(1)));
    advance(Duration::from_nanos(1)).await;
    svc.ready().await.unwrap().call(6).await.unwrap();

    assert_eq!(
        *times.lock().unwrap(),
        vec![
            Duration::ZERO,
            Duration::ZERO,
            Duration::from_nanos(333_333_334)
        ]
    );
    let c = |o| rec.counter(CALLS, &[("name", "geo"), ("outcome", o)]);
    assert_eq!(
        (c("permitted"), c("waited"), c("rejected")),
        (Some(3), Some(0), Some(3))
    );
    assert_eq!(
        c("too_many_keys"),
        None,
        "direct limiters have no key outcome"
    );
    assert_eq!(layer.handle().snapshot().counter("rejected"), Some(3));
    let rejected = |ns| EventKind::Rejected {
        kind: ErrorKind::RateLimited,
        retry_after: Some(Duration::from_nanos(ns)),
    };
    assert_eq!(
        *events.lock().unwrap(),
        vec![rejected(333_333_334), rejected(233_333_334), rejected(1)]
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_are_admitted_at_the_first_millisecond_at_or_after_their_emission_times() {
    let rec = TestRecorder::default();
    // T = 333_333_334 ns, burst 1, waits up to 1.1 s.
    let layer = rec.install_while(|| {
        RateLimitLayer::builder()
            .rate(3, Duration::from_secs(1))
            .burst(1)
            .max_wait(Duration::from_millis(1_100))
            .record_durations(true)
            .build()
            .unwrap()
    });
    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = layer.layer(inner);
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(call(&mut svc, i).await));
    }
    // The fifth would wait 4T = 1_333_333_336 ns > 1.1 s: rejected at once, nothing waits.
    let err = call(&mut svc, 4).await.await.unwrap_err();
    assert_eq!(
        rejection(&err),
        (
            ErrorKind::RateLimited,
            Some(Duration::from_nanos(1_333_333_336))
        )
    );
    assert_eq!(Instant::now(), start);
    assert_eq!(layer.handle().snapshot().gauge("waiting"), Some(3.0));
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Emission times 0, T, 2T, 3T = 0, 333.333334, 666.666668, 1000.000002 ms.
    let ms = Duration::from_millis;
    assert_eq!(
        *times.lock().unwrap(),
        vec![ms(0), ms(334), ms(667), ms(1_001)]
    );
    assert_eq!(Instant::now() - start, ms(1_001));
    let c = |o| rec.counter(CALLS, &[("name", "default"), ("outcome", o)]);
    assert_eq!(
        (c("permitted"), c("waited"), c("rejected")),
        (Some(1), Some(3), Some(1))
    );
    let secs = |m| ms(m).as_secs_f64();
    assert_eq!(
        rec.histogram(WAIT, &[("name", "default")]).unwrap(),
        vec![0.0, secs(334), secs(667), secs(1_001)]
    );
    let snap = layer.handle().snapshot();
    assert_eq!(snap.counter("waited"), Some(3));
    assert_eq!(snap.gauge("waiting"), Some(0.0));
}

/// T = 100 ms, burst 1, waits up to 1 s.
fn waiting_layer() -> RateLimitLayer {
    RateLimitLayer::builder()
        .rate(1, Duration::from_millis(100))
        .burst(1)
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_gives_its_slot_back_when_its_reservation_is_the_latest() {
    let layer = waiting_layer();
    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = layer.layer(inner);
    call(&mut svc, 0).await.await.unwrap();
    let mut b = Box::pin(call(&mut svc, 1).await); // emission 100 ms
    assert!(poll_once(&mut b).is_pending());
    advance(Duration::from_millis(50)).await;
    drop(b);
    let snap = layer.handle().snapshot();
    assert_eq!(
        (snap.counter("abandoned"), snap.counter("given_back")),
        (Some(1), Some(1))
    );
    // The next caller takes the freed slot at 100 ms, not 200 ms.
    call(&mut svc, 2).await.await.unwrap();
    let ms = Duration::from_millis;
    assert_eq!(*times.lock().unwrap(), vec![ms(0), ms(100)]);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_that_is_not_the_latest_keeps_its_slot() {
    let layer = waiting_layer();
    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = layer.layer(inner);
    call(&mut svc, 0).await.await.unwrap();
    let b = call(&mut svc, 1).await; // emission 100 ms
    let c = tokio::spawn(call(&mut svc, 2).await); // emission 200 ms
    advance(Duration::from_millis(50)).await;
    drop(b);
    let snap = layer.handle().snapshot();
    assert_eq!(
        (snap.counter("abandoned"), snap.counter("given_back")),
        (Some(1), Some(0))
    );
    // A later reservation exists: giving B's slot back would put D at 200 ms beside C.
    let d = tokio::spawn(call(&mut svc, 3).await);
    c.await.unwrap().unwrap();
    d.await.unwrap().unwrap();
    let ms = Duration::from_millis;
    assert_eq!(*times.lock().unwrap(), vec![ms(0), ms(200), ms(300)]);
}

#[tokio::test(start_paused = true)]
async fn waiters_dropped_latest_first_all_give_their_slots_back() {
    let layer = waiting_layer();
    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = layer.layer(inner);
    call(&mut svc, 0).await.await.unwrap();
    let b = call(&mut svc, 1).await; // 100 ms
    let c = call(&mut svc, 2).await; // 200 ms
    let d = call(&mut svc, 3).await; // 300 ms
    advance(Duration::from_millis(10)).await;
    drop(d);
    drop(c);
    drop(b);
    assert_eq!(layer.handle().snapshot().counter("given_back"), Some(3));
    call(&mut svc, 4).await.await.unwrap();
    assert_eq!(
        *times.lock().unwrap(),
        vec![Duration::ZERO, Duration::from_millis(100)]
    );
}

#[tokio::test(start_paused = true)]
async fn admission_does_not_wait_for_inner_readiness_and_rejections_never_reach_it() {
    let calls = Count::default();
    let layer = waiting_layer();
    let mut svc = layer.layer(NeverReady(calls.clone()));
    // Admitted at once; then drives the inner clone's readiness (forever).
    let mut a = Box::pin(call(&mut svc, 0).await);
    assert!(poll_once(&mut a).is_pending());
    // B reserves 100 ms; admitted at 100 ms, then stuck on readiness; dropped then.
    let mut b = Box::pin(call(&mut svc, 1).await);
    assert!(poll_once(&mut b).is_pending());
    advance(Duration::from_millis(100)).await;
    assert!(poll_once(&mut b).is_pending());
    drop(b);
    let snap = layer.handle().snapshot();
    assert_eq!(snap.counter("waited"), Some(1));
    assert_eq!(
        (snap.counter("abandoned"), snap.counter("given_back")),
        (Some(0), Some(0)),
        "an admitted waiter has used its slot"
    );
    // Reject mode over a never-ready service: the rejection is decided in `call`.
    let strict = RateLimitLayer::new(1, Duration::from_secs(1)).unwrap();
    let mut svc = strict.layer(NeverReady(calls.clone()));
    let mut first = Box::pin(call(&mut svc, 0).await);
    assert!(poll_once(&mut first).is_pending());
    let mut second = Box::pin(call(&mut svc, 1).await);
    match poll_once(&mut second) {
        Poll::Ready(Err(e)) => assert_eq!(
            rejection(&e),
            (ErrorKind::RateLimited, Some(Duration::from_secs(1)))
        ),
        other => panic!(
            "expected an immediate rejection, got {:?}",
            other.map(|r| r.ok())
        ),
    }
    assert_eq!(calls.get(), 0);
}

/// A service that is never ready and counts calls.
#[derive(Clone)]
struct NeverReady(Count);

impl Service<u32> for NeverReady {
    type Response = u32;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u32, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Pending
    }
    fn call(&mut self, x: u32) -> Self::Future {
        self.0.incr();
        std::future::ready(Ok(x))
    }
}
