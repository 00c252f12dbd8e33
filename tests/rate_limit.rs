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

/// Calls made one by one on a keyed or direct service; `Ok` if admitted.
async fn outcomes<S>(svc: &mut S, reqs: &[u32]) -> Vec<Result<(), ErrorKind>>
where
    S: Service<u32, Error = BoxError>,
{
    let mut out = Vec::new();
    for &r in reqs {
        let res = svc.ready().await.unwrap().call(r).await;
        out.push(res.map(|_| ()).map_err(|e| rejection(&e).0));
    }
    out
}

const OK: Result<(), ErrorKind> = Ok(());
const LIMITED: Result<(), ErrorKind> = Err(ErrorKind::RateLimited);
const FULL: Result<(), ErrorKind> = Err(ErrorKind::TooManyKeys);

#[tokio::test(start_paused = true)]
async fn keyed_limits_each_key_on_its_own() {
    // Key = request / 10; 1 per 100 ms with a burst of 2, per key.
    let layer = RateLimitLayer::builder()
        .rate(1, Duration::from_millis(100))
        .burst(2)
        .keyed(|x: &u32| *x / 10)
        .build()
        .unwrap();
    let (_, inner) = recorder(Instant::now());
    let mut svc = layer.layer(inner);
    assert_eq!(
        outcomes(&mut svc, &[1, 2, 3, 11, 12, 13, 24]).await,
        vec![OK, OK, LIMITED, OK, OK, LIMITED, OK]
    );
    let err = svc.ready().await.unwrap().call(5).await.unwrap_err();
    assert_eq!(
        rejection(&err),
        (ErrorKind::RateLimited, Some(Duration::from_millis(100)))
    );
    advance(Duration::from_millis(100)).await;
    assert_eq!(outcomes(&mut svc, &[1, 2, 11]).await, vec![OK, LIMITED, OK]);
    // Keys 0 and 1 are drained; key 2 (one call at 0, TAT = 100 ms) has recovered.
    assert_eq!(layer.handle().tracked_keys(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_custom_hasher_keeps_per_key_limits() {
    use std::hash::{BuildHasherDefault, DefaultHasher};
    let layer = RateLimitLayer::builder()
        .rate(1, Duration::from_secs(1))
        .burst(1)
        .keyed(|x: &u32| *x % 3)
        .hasher(BuildHasherDefault::<DefaultHasher>::default())
        .max_keys(3)
        .build()
        .unwrap();
    let (_, inner) = recorder(Instant::now());
    let mut svc = layer.layer(inner);
    assert_eq!(
        outcomes(&mut svc, &[0, 1, 2, 3, 4, 5]).await,
        vec![OK, OK, OK, LIMITED, LIMITED, LIMITED]
    );
    assert_eq!(layer.handle().tracked_keys(), 3);
}

#[tokio::test(start_paused = true)]
async fn tracked_keys_return_to_zero_after_all_keys_go_idle_and_recover() {
    let rec = TestRecorder::default();
    // T = 100 ms, burst 3: a key drained at t recovers fully at t + 300 ms.
    let layer = rec.install_while(|| {
        RateLimitLayer::builder()
            .name("per-user")
            .rate(1, Duration::from_millis(100))
            .burst(3)
            .keyed(|x: &u32| *x)
            .build()
            .unwrap()
    });
    let gauge = || rec.gauge(KEYS, &[("name", "per-user")]);
    assert_eq!(gauge(), Some(0.0));
    let (_, inner) = recorder(Instant::now());
    let mut svc = layer.layer(inner);
    let handle: RateLimitHandle = layer.handle();
    // Key 7 drained (TAT = 300 ms); keys 0..5 one call each (TAT = 100 ms).
    assert_eq!(outcomes(&mut svc, &[7, 7, 7]).await, vec![OK, OK, OK]);
    outcomes(&mut svc, &[0, 1, 2, 3, 4]).await;
    assert_eq!(gauge(), Some(6.0), "updated by the calls that added keys");
    advance(Duration::from_millis(100)).await;
    // Keys 0..5 recovered at 100 ms (TAT <= now); key 7 not until 300 ms.
    assert_eq!(handle.tracked_keys(), 1);
    assert_eq!(gauge(), Some(1.0));
    advance(Duration::from_millis(199)).await;
    assert_eq!(handle.snapshot().gauge("keys"), Some(1.0));
    advance(Duration::from_millis(1)).await;
    assert_eq!(handle.tracked_keys(), 0);
    assert_eq!(gauge(), Some(0.0));
    // A swept key comes back fully recovered: its whole burst is available.
    assert_eq!(
        outcomes(&mut svc, &[7, 7, 7, 7]).await,
        vec![OK, OK, OK, LIMITED]
    );
}

#[tokio::test(start_paused = true)]
async fn calls_sweep_recovered_keys_after_the_sweep_interval_without_any_read() {
    let rec = TestRecorder::default();
    let layer = rec.install_while(|| {
        RateLimitLayer::builder()
            .rate(1, Duration::from_millis(10))
            .burst(1)
            .keyed(|x: &u32| *x)
            .sweep_interval(Duration::from_millis(500))
            .build()
            .unwrap()
    });
    let gauge = || rec.gauge(KEYS, &[("name", "default")]);
    let (_, inner) = recorder(Instant::now());
    let mut svc = layer.layer(inner);
    outcomes(&mut svc, &(0..100).collect::<Vec<_>>()).await;
    assert_eq!(gauge(), Some(100.0));
    advance(Duration::from_millis(499)).await;
    outcomes(&mut svc, &[1_000]).await;
    assert_eq!(gauge(), Some(101.0), "no sweep before the interval");
    advance(Duration::from_millis(1)).await;
    // This call runs the scheduled sweep: left are key 1000 (TAT = 509 ms) and its own.
    outcomes(&mut svc, &[2_000]).await;
    assert_eq!(gauge(), Some(2.0));
}

#[tokio::test(start_paused = true)]
async fn an_insert_that_doubles_the_key_count_sweeps() {
    let rec = TestRecorder::default();
    // T = 10 ms, burst 1; the scheduled sweep (1 s) never comes due in this test.
    let layer = rec.install_while(|| {
        RateLimitLayer::builder()
            .rate(1, Duration::from_millis(10))
            .burst(1)
            .keyed(|x: &u32| *x)
            .build()
            .unwrap()
    });
    let gauge = || rec.gauge(KEYS, &[("name", "default")]);
    let (_, inner) = recorder(Instant::now());
    let mut svc = layer.layer(inner);
    // The 1,024th key triggers a sweep at t = 0: nothing has recovered yet.
    outcomes(&mut svc, &(0..1_024).collect::<Vec<_>>()).await;
    assert_eq!(gauge(), Some(1_024.0));
    advance(Duration::from_millis(10)).await;
    // Keys 0..1024 recovered at 10 ms; the 2,048th key doubles the count and sweeps them.
    outcomes(&mut svc, &(1_024..2_047).collect::<Vec<_>>()).await;
    assert_eq!(gauge(), Some(2_047.0));
    outcomes(&mut svc, &[2_047]).await;
    assert_eq!(gauge(), Some(1_024.0));
}

#[tokio::test(start_paused = true)]
async fn a_new_key_beyond_max_keys_is_rejected_with_its_own_reason() {
    let rec = TestRecorder::default();
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let layer = rec.install_while(|| {
        RateLimitLayer::builder()
            .name("tenants")
            .rate(1, Duration::from_secs(1))
            .burst(1)
            .keyed(|x: &u32| *x)
            .max_keys(2)
            .on_event(move |e| log.lock().unwrap().push(e.kind()))
            .build()
            .unwrap()
    });
    let (times, inner) = recorder(Instant::now());
    let mut svc = layer.layer(inner);
    assert_eq!(
        outcomes(&mut svc, &[1, 2, 3, 1, 2, 3]).await,
        vec![OK, OK, FULL, LIMITED, LIMITED, FULL]
    );
    assert_eq!(
        times.lock().unwrap().len(),
        2,
        "rejections never reach the inner service"
    );
    let err = svc.ready().await.unwrap().call(4).await.unwrap_err();
    assert_eq!(rejection(&err), (ErrorKind::TooManyKeys, None));
    assert!(err.to_string().contains("maximum number of keys"), "{err}");
    // Live keys are never evicted: key 1 is still limited, not reset.
    advance(Duration::from_millis(999)).await;
    assert_eq!(outcomes(&mut svc, &[1, 5]).await, vec![LIMITED, FULL]);
    // Recovered at 1 s; the next sweep (here: reading the count) frees their places.
    advance(Duration::from_millis(1)).await;
    assert_eq!(layer.handle().tracked_keys(), 0);
    assert_eq!(outcomes(&mut svc, &[5, 6, 7]).await, vec![OK, OK, FULL]);
    let c = |o| rec.counter(CALLS, &[("name", "tenants"), ("outcome", o)]);
    assert_eq!(
        (c("permitted"), c("rejected"), c("too_many_keys")),
        (Some(4), Some(3), Some(5))
    );
    let snap = layer.handle().snapshot();
    assert_eq!(snap.counter("too_many_keys"), Some(5));
    assert_eq!(snap.gauge("keys"), Some(2.0));
    let full = EventKind::Rejected {
        kind: ErrorKind::TooManyKeys,
        retry_after: None,
    };
    let ev = events.lock().unwrap();
    assert_eq!(ev.iter().filter(|e| **e == full).count(), 5);
    assert_eq!(ev.len(), 8);
}

#[tokio::test(start_paused = true)]
async fn keyed_waiters_wait_per_key_and_give_slots_back() {
    let layer = RateLimitLayer::builder()
        .rate(1, Duration::from_millis(100))
        .burst(1)
        .max_wait(Duration::from_secs(1))
        .keyed(|x: &u32| *x % 2)
        .build()
        .unwrap();
    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = layer.layer(inner);
    call(&mut svc, 0).await.await.unwrap();
    call(&mut svc, 1).await.await.unwrap();
    let dropped = call(&mut svc, 2).await; // key 0, emission 100 ms
    let waiter = tokio::spawn(call(&mut svc, 3).await); // key 1, emission 100 ms
    advance(Duration::from_millis(20)).await;
    drop(dropped);
    call(&mut svc, 4).await.await.unwrap(); // key 0 takes the freed slot at 100 ms
    waiter.await.unwrap().unwrap();
    let ms = Duration::from_millis;
    assert_eq!(*times.lock().unwrap(), vec![ms(0), ms(0), ms(100), ms(100)]);
    assert_eq!(layer.handle().snapshot().counter("given_back"), Some(1));
}

#[tokio::test(start_paused = true)]
async fn a_key_is_not_swept_while_it_has_not_recovered_even_with_only_waiters_left() {
    let layer = RateLimitLayer::builder()
        .rate(1, Duration::from_millis(100))
        .burst(1)
        .max_wait(Duration::from_secs(1))
        .keyed(|x: &u32| *x)
        .build()
        .unwrap();
    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = layer.layer(inner);
    call(&mut svc, 1).await.await.unwrap();
    let waiter = tokio::spawn(call(&mut svc, 1).await); // emission 100 ms, TAT 200 ms
    // Sleeping (not `advance`) lets the waiter run at its own tick on the paused clock.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(waiter.is_finished());
    assert_eq!(layer.handle().tracked_keys(), 1);
    waiter.await.unwrap().unwrap();
    // A third call at 150 ms waits for 200 ms: the key's state was kept.
    call(&mut svc, 1).await.await.unwrap();
    let ms = Duration::from_millis;
    assert_eq!(*times.lock().unwrap(), vec![ms(0), ms(100), ms(200)]);
    advance(Duration::from_millis(100)).await;
    assert_eq!(layer.handle().tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn one_layer_applied_to_several_services_shares_one_limiter() {
    let layer = RateLimitLayer::new(3, Duration::from_secs(1)).unwrap();
    let (times, inner) = recorder(Instant::now());
    let mut a = layer.layer(inner.clone());
    let mut b = layer.clone().layer(inner.clone());
    let mut b2 = b.clone();
    assert_eq!(outcomes(&mut a, &[0]).await, vec![OK]);
    assert_eq!(outcomes(&mut b, &[0]).await, vec![OK]);
    assert_eq!(outcomes(&mut b2, &[0, 0]).await, vec![OK, LIMITED]);
    assert_eq!(outcomes(&mut a, &[0]).await, vec![LIMITED]);
    assert_eq!(times.lock().unwrap().len(), 3);
    assert_eq!(layer.handle().snapshot().counter("rejected"), Some(2));

    let keyed = RateLimitLayer::builder()
        .rate(1, Duration::from_secs(1))
        .burst(1)
        .keyed(|x: &u32| *x)
        .build()
        .unwrap();
    let mut a = keyed.layer(inner.clone());
    let mut b = keyed.clone().layer(inner).clone();
    assert_eq!(outcomes(&mut a, &[1, 2]).await, vec![OK, OK]);
    assert_eq!(
        outcomes(&mut b, &[1, 2, 3]).await,
        vec![LIMITED, LIMITED, OK]
    );
    assert_eq!(keyed.handle().tracked_keys(), 3);
}

#[test]
fn calls_need_no_runtime_context_even_when_they_wait() {
    let layer = waiting_layer();
    let calls = Count::default();
    let c = calls.clone();
    let mut svc = layer.layer(service_fn(move |x: u32| {
        c.incr();
        std::future::ready(Ok::<_, BoxError>(x))
    }));
    // Outside any runtime: the second call reserves a slot 100 ms later.
    let first = svc.call(1);
    let second = svc.call(2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    assert_eq!(rt.block_on(first).unwrap(), 1);
    assert_eq!(rt.block_on(second).unwrap(), 2);
    assert_eq!(calls.get(), 2);
    assert_eq!(layer.handle().snapshot().counter("waited"), Some(1));
}

#[test]
fn invalid_configuration_is_a_config_error_naming_the_field() {
    let field = |r: Result<RateLimitLayer, tower_breakwater::ConfigError>| {
        let e = r.unwrap_err();
        assert_eq!(e.layer(), LayerKind::RateLimiter);
        e.field()
    };
    assert_eq!(field(RateLimitLayer::builder().build()), "rate");
    assert_eq!(
        field(RateLimitLayer::new(0, Duration::from_secs(1))),
        "rate"
    );
    assert_eq!(field(RateLimitLayer::new(1, Duration::ZERO)), "rate");
    assert_eq!(field(RateLimitLayer::new(1, Duration::MAX)), "rate");
    let b = || RateLimitLayer::builder().rate(1, Duration::from_secs(1));
    assert_eq!(field(b().burst(0).build()), "burst");
    assert_eq!(field(b().burst(u64::MAX).build()), "burst");
    assert_eq!(field(b().max_wait(Duration::MAX).build()), "max_wait");
    assert_eq!(field(b().name("").build()), "name");
    let e = b().keyed(|x: &u32| *x).max_keys(0).build().unwrap_err();
    assert_eq!((e.field(), e.value()), ("max_keys", "0"));
    let e = b()
        .keyed(|x: &u32| *x)
        .sweep_interval(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "sweep_interval");
    let e = RateLimitLayer::builder().build().unwrap_err();
    assert_eq!(e.value(), "<unset>");
    // Defaults: burst = the rate's count; T rounded up to whole nanoseconds.
    let h = RateLimitLayer::new(7, Duration::from_secs(1))
        .unwrap()
        .handle();
    assert_eq!(
        (h.burst(), h.emission_interval()),
        (7, Duration::from_nanos(142_857_143))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_thread_services_and_clones_share_one_limiter() {
    // 1 per hour: nothing recovers during the test, so counts are exact.
    let layer = RateLimitLayer::builder()
        .rate(1, Duration::from_secs(3_600))
        .burst(100)
        .build()
        .unwrap();
    let calls = Count::default();
    let c = calls.clone();
    let inner = service_fn(move |_: u32| {
        c.incr();
        std::future::ready(Ok::<_, std::convert::Infallible>(()))
    });
    let rejected = Count::default();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let svc = layer.layer(inner.clone());
        let rejected = rejected.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..100 {
                let svc = if j % 2 == 0 {
                    svc.clone()
                } else {
                    svc.clone().clone()
                };
                if svc.oneshot(i).await.is_err() {
                    rejected.incr();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!((calls.get(), rejected.get()), (100, 300));

    // Keyed: 10 keys, at most 5 tracked, burst 3 each.
    let keyed = RateLimitLayer::builder()
        .rate(1, Duration::from_secs(3_600))
        .burst(3)
        .keyed(|x: &u32| *x % 10)
        .max_keys(5)
        .build()
        .unwrap();
    let calls = Count::default();
    let (limited, full) = (Count::default(), Count::default());
    let mut tasks = Vec::new();
    for i in 0..4u32 {
        let c = calls.clone();
        let svc = keyed.layer(service_fn(move |_: u32| {
            c.incr();
            std::future::ready(Ok::<_, std::convert::Infallible>(()))
        }));
        let (limited, full) = (limited.clone(), full.clone());
        tasks.push(tokio::spawn(async move {
            for j in 0..100u32 {
                match svc.clone().oneshot(i * 100 + j).await {
                    Ok(()) => {}
                    Err(e) => match error::find(e.as_ref()).unwrap().kind() {
                        ErrorKind::RateLimited => limited.incr(),
                        ErrorKind::TooManyKeys => full.incr(),
                        k => panic!("{k}"),
                    },
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 5 keys admitted (40 calls each): 3 permitted and 37 limited per key; 5 keys x 40 full.
    assert_eq!((calls.get(), limited.get(), full.get()), (15, 185, 200));
    assert_eq!(keyed.handle().tracked_keys(), 5);
}

// ---- property: the GCRA bound over random arrivals and drops ---------------------------

#[derive(Debug, Clone)]
struct Arrival {
    /// Time since the previous arrival, in ms.
    gap_ms: u64,
    /// Drop the response future this long after the call (possibly while it waits).
    drop_after_ms: Option<u64>,
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (0u64..=40, prop::option::of(0u64..=300)).prop_map(|(gap_ms, drop_after_ms)| Arrival {
        gap_ms,
        drop_after_ms,
    })
}

/// Runs `arrivals` on a paused clock through a limiter of `count` per `period_ms`, `burst`,
/// `max_wait_ms`; returns the emission interval and the admission times (calls that
/// reached the inner service), sorted, in ns since the start.
fn admissions(
    count: u64,
    period_ms: u64,
    burst: u64,
    max_wait_ms: u64,
    arrivals: &[Arrival],
) -> (u64, Vec<u64>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let layer = RateLimitLayer::builder()
            .rate(count, Duration::from_millis(period_ms))
            .burst(burst)
            .max_wait(Duration::from_millis(max_wait_ms))
            .build()
            .unwrap();
        let start = Instant::now();
        let (times, inner) = recorder(start);
        let mut svc = layer.layer(inner);
        let mut tasks = Vec::new();
        for a in arrivals {
            tokio::time::sleep(Duration::from_millis(a.gap_ms)).await;
            let fut = call(&mut svc, 0).await;
            let drop_after = a.drop_after_ms.map(Duration::from_millis);
            tasks.push(tokio::spawn(async move {
                match drop_after {
                    Some(d) => {
                        let _ = tokio::time::timeout(d, fut).await;
                    }
                    None => {
                        let _ = fut.await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut out: Vec<u64> = times
            .lock()
            .unwrap()
            .iter()
            .map(|d| d.as_nanos() as u64)
            .collect();
        out.sort_unstable();
        (layer.handle().emission_interval().as_nanos() as u64, out)
    })
}

const MS: u64 = 1_000_000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// With T a whole number of milliseconds and arrivals on millisecond ticks, emission
    /// times fall on ticks, so admissions happen exactly at them. The bound checked: for
    /// admissions sorted a_0 <= a_1 <= ..., every i <= j has
    /// `j - i + 1 <= burst + floor((a_j - a_i) / T)`; the busiest interval of any length L
    /// starts and ends at admissions, so no interval of length L holds more than
    /// `burst + floor(L / T) <= burst + L x rate` admissions.
    #[test]
    fn admitted_calls_never_exceed_burst_plus_rate_times_interval(
        t_ms in 1u64..=50,
        count in 1u64..=4,
        burst in 1u64..=5,
        max_wait_ms in prop_oneof![Just(0u64), 1u64..=250],
        arrivals in prop::collection::vec(arrival(), 1..60),
    ) {
        let (t, adm) = admissions(count, t_ms * count, burst, max_wait_ms, &arrivals);
        prop_assert_eq!(t, t_ms * MS);
        prop_assert!(!adm.is_empty(), "the first call always conforms");
        for i in 0..adm.len() {
            for j in i..adm.len() {
                let n = (j - i + 1) as u64;
                prop_assert!(
                    n <= burst + (adm[j] - adm[i]) / t,
                    "{} admissions in [{}, {}] ns, T = {}, burst = {}: {:?}",
                    n, adm[i], adm[j], t, burst, adm
                );
            }
        }
    }

    /// Any T (rounded up to whole ns, usually not whole ms): admissions happen at the first
    /// tick at or after the emission times, less than 1 ms late, so admissions within
    /// [a_i, a_j] had emission times within less than (a_j - a_i) + 1 ms:
    /// `j - i + 1 <= burst + floor((a_j - a_i + 1 ms - 1 ns) / T)`.
    #[test]
    fn admitted_calls_respect_the_bound_with_any_emission_interval(
        count in 1u64..=9,
        period_ms in 1u64..=97,
        burst in 1u64..=4,
        max_wait_ms in prop_oneof![Just(0u64), 1u64..=250],
        arrivals in prop::collection::vec(arrival(), 1..60),
    ) {
        // Wait mode needs T >= 1 ms (a ConfigError otherwise, tested elsewhere).
        prop_assume!(max_wait_ms == 0 || period_ms >= count);
        let (t, adm) = admissions(count, period_ms, burst, max_wait_ms, &arrivals);
        prop_assert_eq!(t, (period_ms * MS).div_ceil(count));
        for i in 0..adm.len() {
            for j in i..adm.len() {
                let n = (j - i + 1) as u64;
                prop_assert!(n <= burst + (adm[j] - adm[i] + MS - 1) / t, "{:?}", adm);
            }
        }
    }
}

// ---- regressions ------------------------------------------------------------------------

/// The limiter's representable span: `u64::MAX` ns less its 100-year horizon.
const HORIZON_NS: u64 = 100 * 365 * 86_400 * 1_000_000_000;
const ROOM_NS: u64 = u64::MAX - HORIZON_NS;

#[test]
fn configurations_whose_tat_could_overflow_are_config_errors() {
    let field = |r: Result<RateLimitLayer, tower_breakwater::ConfigError>| r.unwrap_err().field();
    let ns = Duration::from_nanos;
    // The configuration whose TAT used to saturate: T alone leaves no room for a second slot.
    assert_eq!(
        field(
            RateLimitLayer::builder()
                .rate(1, ns(u64::MAX - 1))
                .burst(1)
                .max_wait(ns(u64::MAX))
                .build()
        ),
        "rate"
    );
    assert_eq!(field(RateLimitLayer::new(1, ns(ROOM_NS + 1))), "rate");
    let half = ROOM_NS / 2;
    let b = || RateLimitLayer::builder().rate(1, ns(half));
    // T + tau = 3 x half > room.
    assert_eq!(field(b().burst(3).build()), "burst");
    // T + tau + max_wait = room + 1.
    assert_eq!(
        field(b().burst(2).max_wait(ns(ROOM_NS - 2 * half + 1)).build()),
        "max_wait"
    );
    // Exactly at the limit: accepted.
    let h = b()
        .burst(2)
        .max_wait(ns(ROOM_NS - 2 * half))
        .build()
        .unwrap()
        .handle();
    assert_eq!((h.burst(), h.emission_interval()), (2, ns(half)));
}

/// T = half the room, max_wait = the rest: the largest configuration accepted.
fn widest_layer() -> RateLimitLayer {
    let half = ROOM_NS / 2;
    RateLimitLayer::builder()
        .rate(1, Duration::from_nanos(half))
        .burst(1)
        .max_wait(Duration::from_nanos(ROOM_NS - half))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_given_back_slot_restores_the_exact_tat_even_at_the_widest_configuration() {
    let half = ROOM_NS / 2;
    let layer = widest_layer();
    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = layer.layer(inner);
    call(&mut svc, 0).await.await.unwrap();
    let mut waiter = Box::pin(call(&mut svc, 1).await); // emission T, TAT 2T
    assert!(poll_once(&mut waiter).is_pending());
    drop(waiter);
    assert_eq!(layer.handle().snapshot().counter("given_back"), Some(1));
    advance(Duration::from_millis(1)).await;
    // Back to TAT = T exactly: the third call waits for T (T - 1 ms from now) ...
    let mut third = Box::pin(call(&mut svc, 2).await);
    assert!(poll_once(&mut third).is_pending());
    // ... and the fourth would wait 2T - 1 ms > max_wait: rejected, with that exact wait.
    let err = call(&mut svc, 3).await.await.unwrap_err();
    assert_eq!(
        rejection(&err),
        (
            ErrorKind::RateLimited,
            Some(Duration::from_nanos(2 * half - 1_000_000))
        )
    );
    drop(third);
    assert_eq!(times.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn past_the_horizon_a_tat_that_would_overflow_rejects_instead_of_saturating() {
    let half = ROOM_NS / 2;
    let layer = widest_layer();
    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = layer.layer(inner);
    // 100 years and an hour later, t + 2T no longer fits in u64 nanoseconds.
    advance(Duration::from_nanos(HORIZON_NS) + Duration::from_secs(3_600)).await;
    call(&mut svc, 0).await.await.unwrap(); // TAT = t + T
    // The second call's slot is T away (within max_wait) but its TAT would overflow: it is
    // rejected, not given a saturated TAT.
    let mut second = Box::pin(call(&mut svc, 1).await);
    match poll_once(&mut second) {
        Poll::Ready(Err(e)) => assert_eq!(
            rejection(&e),
            (ErrorKind::RateLimited, Some(Duration::from_nanos(half)))
        ),
        other => panic!("expected a rejection, got {:?}", other.map(|r| r.ok())),
    }
    drop(second);
    // Nothing was given back below the first call's TAT: 1 ms later the slot is T - 1 ms
    // away, and the call is not admitted.
    advance(Duration::from_millis(1)).await;
    let err = call(&mut svc, 2).await.await.unwrap_err();
    assert_eq!(
        rejection(&err),
        (
            ErrorKind::RateLimited,
            Some(Duration::from_nanos(half - 1_000_000))
        )
    );
    assert_eq!(times.lock().unwrap().len(), 1);
    let snap = layer.handle().snapshot();
    assert_eq!(
        (snap.counter("rejected"), snap.counter("abandoned")),
        (Some(2), Some(0))
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_key_finding_the_map_full_sweeps_recovered_keys_at_most_once_per_eighth_interval() {
    let rec = TestRecorder::default();
    // T = 100 ms, burst 1, 2 keys at most; scheduled sweeps every second (the first at 1 s),
    // sweeps for a full map at most every 125 ms.
    let layer = rec.install_while(|| {
        RateLimitLayer::builder()
            .rate(1, Duration::from_millis(100))
            .burst(1)
            .keyed(|x: &u32| *x)
            .max_keys(2)
            .build()
            .unwrap()
    });
    let gauge = || rec.gauge(KEYS, &[("name", "default")]);
    let (times, inner) = recorder(Instant::now());
    let mut svc = layer.layer(inner);
    assert_eq!(outcomes(&mut svc, &[1, 2]).await, vec![OK, OK]);
    // At 0 ms the map is full and nothing has recovered: the sweep frees nothing.
    assert_eq!(outcomes(&mut svc, &[9]).await, vec![FULL]);
    advance(Duration::from_millis(500)).await;
    // Keys 1 and 2 recovered at 100 ms: key 3 finds the map full, sweeps, and gets a place.
    assert_eq!(outcomes(&mut svc, &[3, 4, 5]).await, vec![OK, OK, FULL]);
    assert_eq!(gauge(), Some(2.0));
    // Keys 3 and 4 recover at 600 ms, but the last full-map sweep (500 ms) was less than
    // 125 ms ago: a flood of new keys is rejected without sweeping ...
    advance(Duration::from_millis(124)).await;
    assert_eq!(outcomes(&mut svc, &[5, 6, 7]).await, vec![FULL, FULL, FULL]);
    assert_eq!(gauge(), Some(2.0), "no sweep ran");
    // ... until 625 ms, when one sweeps and takes a freed place.
    advance(Duration::from_millis(1)).await;
    assert_eq!(outcomes(&mut svc, &[5, 6, 7]).await, vec![OK, OK, FULL]);
    assert_eq!(gauge(), Some(2.0));
    assert_eq!(times.lock().unwrap().len(), 6);
    assert_eq!(layer.handle().snapshot().counter("too_many_keys"), Some(6));
}

#[tokio::test(start_paused = true)]
async fn wait_mode_needs_an_emission_interval_of_at_least_one_millisecond() {
    // 10,000 per second (T = 100 us), burst 1, waits up to 10 ms: the timer would release
    // the waiters due within each millisecond together (ten at once). Refused.
    let e = RateLimitLayer::builder()
        .rate(10_000, Duration::from_secs(1))
        .burst(1)
        .max_wait(Duration::from_millis(10))
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "max_wait");
    assert!(e.to_string().contains("reject mode"), "{e}");
    let b = |count, period| {
        RateLimitLayer::builder()
            .rate(count, period)
            .burst(1)
            .max_wait(Duration::from_millis(10))
            .build()
    };
    assert_eq!(
        b(1, Duration::from_nanos(999_999)).unwrap_err().field(),
        "max_wait"
    );
    // T = ceil(1e9 / 1_000_001) ns < 1 ms: refused; T = 1 ms exactly: accepted.
    assert!(b(1_000_001, Duration::from_secs(1)).is_err());
    let exact = b(1_000, Duration::from_secs(1)).unwrap();
    // Reject mode needs no timer: any T is accepted, and honoured to the nanosecond.
    let strict = RateLimitLayer::builder()
        .rate(10_000, Duration::from_secs(1))
        .burst(1)
        .build()
        .unwrap();

    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = exact.layer(inner.clone());
    let mut tasks = Vec::new();
    for i in 0..10 {
        tasks.push(tokio::spawn(call(&mut svc, i).await));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // T = 1 ms, burst 1: one call per millisecond, never two at once.
    let ms = Duration::from_millis;
    assert_eq!(*times.lock().unwrap(), (0..10).map(ms).collect::<Vec<_>>());

    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = strict.layer(inner);
    let mut out = Vec::new();
    for _ in 0..3 {
        out.extend(outcomes(&mut svc, &[0, 0]).await);
        advance(Duration::from_micros(100)).await;
    }
    assert_eq!(out, vec![OK, LIMITED, OK, LIMITED, OK, LIMITED]);
    let us = Duration::from_micros;
    assert_eq!(*times.lock().unwrap(), vec![us(0), us(100), us(200)]);
}

#[tokio::test(start_paused = true)]
async fn in_wait_mode_no_instant_admits_more_than_burst_and_a_wait_overshoots_by_under_1_ms() {
    // T = 1.5 ms, burst 2, waits up to 1.5 ms: emission times 0, 0, 1.5 ms; the waiter due
    // at 1.5 ms runs alone at the 2 ms tick, 0.5 ms after its emission time and its
    // maximum wait.
    let rec = TestRecorder::default();
    let layer = rec.install_while(|| {
        RateLimitLayer::builder()
            .rate(2, Duration::from_millis(3))
            .burst(2)
            .max_wait(Duration::from_micros(1_500))
            .record_durations(true)
            .build()
            .unwrap()
    });
    let start = Instant::now();
    let (times, inner) = recorder(start);
    let mut svc = layer.layer(inner);
    let mut tasks = Vec::new();
    for i in 0..3 {
        tasks.push(tokio::spawn(call(&mut svc, i).await));
    }
    // The fourth would wait 3 ms > 1.5 ms.
    let err = call(&mut svc, 3).await.await.unwrap_err();
    assert_eq!(rejection(&err).1, Some(Duration::from_millis(3)));
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let ms = Duration::from_millis;
    assert_eq!(*times.lock().unwrap(), vec![ms(0), ms(0), ms(2)]);
    assert_eq!(
        rec.histogram(WAIT, &[("name", "default")]).unwrap(),
        vec![0.0, 0.0, 0.002]
    );
}
