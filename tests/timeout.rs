//! Timeout layer: deadlines on the paused clock, cancellation, metrics, errors, config.
#![cfg(feature = "timeout")]

mod support;

use std::future::{Future, pending};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use support::{Count, DropGuard, TestRecorder};
use tokio::time::{Instant, advance};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_breakwater::error::{self, BreakwaterError, ErrorKind, LayerKind};
use tower_breakwater::event::EventKind;
use tower_breakwater::timeout::TimeoutLayer;
use tower_breakwater::{BoxError, ConfigError};

const CALLS: &str = "breakwater_timeout_calls_total";

/// Lets spawned tasks run after a time advance.
async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

fn sleeper() -> impl Service<u64, Response = u64, Error = std::io::Error, Future: Send> + Clone {
    service_fn(|ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, std::io::Error>(ms)
    })
}

#[tokio::test(start_paused = true)]
async fn fires_at_the_first_millisecond_at_or_after_the_deadline() {
    // 100.3 ms: tokio rounds up to the 101st millisecond.
    let layer = TimeoutLayer::new(Duration::from_micros(100_300)).unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(sleeper());
    let start = Instant::now();
    let task = tokio::spawn(svc.oneshot(10_000));
    settle().await;
    advance(Duration::from_millis(100)).await;
    settle().await;
    assert!(!task.is_finished(), "fired before the deadline");
    advance(Duration::from_millis(1)).await;
    settle().await;
    assert!(
        task.is_finished(),
        "not fired at the first millisecond after the deadline"
    );
    let err = task.await.unwrap().unwrap_err();
    let ours = error::find(err.as_ref()).unwrap();
    assert_eq!(ours.kind(), ErrorKind::Timeout);
    assert_eq!(ours.layer(), LayerKind::Timeout);
    assert_eq!(ours.elapsed(), Some(Duration::from_micros(100_300)));
    assert_eq!(Instant::now() - start, Duration::from_millis(101));
}

#[tokio::test(start_paused = true)]
async fn exact_millisecond_deadline_fires_exactly_then() {
    let layer = TimeoutLayer::new(Duration::from_millis(50)).unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(sleeper());
    let start = Instant::now();
    let err = svc.clone().oneshot(51).await.unwrap_err();
    assert_eq!(
        error::find(err.as_ref()).unwrap().kind(),
        ErrorKind::Timeout
    );
    assert_eq!(Instant::now() - start, Duration::from_millis(50));
    // A call finishing exactly at the deadline wins: the inner service is polled first.
    let start = Instant::now();
    assert_eq!(svc.oneshot(50).await.unwrap(), 50);
    assert_eq!(Instant::now() - start, Duration::from_millis(50));
}

/// A service that is never ready and counts calls.
#[derive(Clone)]
struct NeverReady(Count);

impl Service<()> for NeverReady {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Pending
    }
    fn call(&mut self, _: ()) -> Self::Future {
        self.0.incr();
        std::future::ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_never_ready_inner_service_times_out() {
    let calls = Count::default();
    let layer = TimeoutLayer::new(Duration::from_millis(200)).unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(NeverReady(calls.clone()));
    let start = Instant::now();
    // Our poll_ready is ready at once: readiness is waited for inside the deadline.
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert_eq!(
        error::find(err.as_ref()).unwrap().kind(),
        ErrorKind::Timeout
    );
    assert_eq!(Instant::now() - start, Duration::from_millis(200));
    assert_eq!(calls.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_inner_future_is_dropped_when_the_deadline_passes() {
    let drops = Count::default();
    let d = drops.clone();
    let inner = service_fn(move |_: ()| {
        let guard = DropGuard(d.clone());
        async move {
            let _guard = guard;
            pending::<()>().await;
            Ok::<(), BoxError>(())
        }
    });
    let layer = TimeoutLayer::new(Duration::from_millis(10)).unwrap();
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);
    let mut fut = Box::pin(svc.call(()));
    assert!(futures_poll_once(&mut fut).is_pending());
    assert_eq!(drops.get(), 0);
    let res = (&mut fut).await;
    assert!(res.is_err());
    // Dropped when the deadline passed, not when the response future is dropped.
    assert_eq!(drops.get(), 1);
    drop(fut);
    assert_eq!(drops.get(), 1);
}

fn futures_poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    Pin::new(f).poll(&mut cx)
}

#[tokio::test(start_paused = true)]
async fn metric_values_after_a_known_sequence_are_exact() {
    let rec = TestRecorder::default();
    let layer = rec.install_while(|| {
        TimeoutLayer::builder()
            .name("fraud")
            .timeout(Duration::from_millis(100))
            .record_durations(true)
            .build()
            .unwrap()
    });
    let inner = service_fn(|(ms, fail, reject): (u64, bool, bool)| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if reject {
            let e = BreakwaterError::new(ErrorKind::BulkheadFull, LayerKind::Bulkhead, "inner");
            return Err::<u64, BoxError>(Box::new(e));
        }
        if fail { Err("boom".into()) } else { Ok(ms) }
    });
    let svc = ServiceBuilder::new().layer(layer.clone()).service(inner);
    for req in [
        (30, false, false),
        (0, false, false),
        (20, true, false),
        (0, false, true),
        (500, false, false),
        (100, false, false),
    ] {
        let _ = svc.clone().oneshot(req).await;
    }
    let c = |outcome| rec.counter(CALLS, &[("name", "fraud"), ("outcome", outcome)]);
    assert_eq!(
        c("success"),
        Some(3),
        "a call ending exactly at the deadline succeeds"
    );
    assert_eq!(c("failure"), Some(1));
    assert_eq!(
        c("ignored"),
        Some(1),
        "an inner rejection is ignored by default"
    );
    assert_eq!(c("timeout"), Some(1));
    let h = |outcome| {
        rec.histogram(
            "breakwater_timeout_call_duration_seconds",
            &[("name", "fraud"), ("outcome", outcome)],
        )
        .unwrap()
    };
    assert_eq!(h("success"), vec![0.03, 0.0, 0.1]);
    assert_eq!(h("failure"), vec![0.02]);
    assert_eq!(h("timeout"), vec![0.1]);
    assert_eq!(h("ignored"), vec![0.0]);
    assert_eq!(layer.handle().snapshot().counter("timeouts"), Some(1));
}

#[tokio::test(start_paused = true)]
async fn durations_are_not_registered_unless_asked_for() {
    let rec = TestRecorder::default();
    let layer = rec.install_while(|| TimeoutLayer::new(Duration::from_millis(5)).unwrap());
    let svc = ServiceBuilder::new().layer(layer).service(sleeper());
    svc.oneshot(1).await.unwrap();
    assert_eq!(rec.names(), vec![CALLS.to_owned()]);
    assert_eq!(
        rec.counter(CALLS, &[("name", "default"), ("outcome", "success")]),
        Some(1)
    );
}

#[derive(Debug)]
struct DbError(u32);
impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "db error {}", self.0)
    }
}
impl std::error::Error for DbError {}

#[tokio::test(start_paused = true)]
async fn stacked_timeouts_over_a_typed_error_give_one_error_type() {
    let inner = service_fn(|fail: bool| async move {
        tokio::time::sleep(Duration::from_millis(if fail { 1 } else { 1_000 })).await;
        if fail { Err(DbError(7)) } else { Ok(()) }
    });
    let outer = TimeoutLayer::builder()
        .name("outer")
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let inner_t = TimeoutLayer::builder()
        .name("inner")
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(outer)
        .layer(inner_t)
        .service(inner);

    // The inner service's own error stays reachable by downcast; it is not ours.
    let err: BoxError = svc.clone().oneshot(true).await.unwrap_err();
    assert!(error::find(err.as_ref()).is_none());
    assert_eq!(err.downcast_ref::<DbError>().unwrap().0, 7);

    // The inner timeout fired first; one call tells which instance.
    let err: BoxError = svc.oneshot(false).await.unwrap_err();
    let ours = error::find(err.as_ref()).unwrap();
    assert_eq!((ours.kind(), ours.name()), (ErrorKind::Timeout, "inner"));
    assert_eq!(ours.elapsed(), Some(Duration::from_millis(100)));
}

#[tokio::test(start_paused = true)]
async fn per_request_deadline_overrides_the_default() {
    let layer = TimeoutLayer::builder()
        .timeout(Duration::from_millis(100))
        .per_request(|ms: &u64| (*ms >= 1_000).then_some(Duration::from_millis(2_000)))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(sleeper());
    // Default applies: 150 ms times out at 100 ms.
    let start = Instant::now();
    assert!(svc.clone().oneshot(150).await.is_err());
    assert_eq!(Instant::now() - start, Duration::from_millis(100));
    // Per-request: 1,500 ms completes under its 2 s deadline.
    assert_eq!(svc.oneshot(1_500).await.unwrap(), 1_500);
}

#[tokio::test(start_paused = true)]
async fn one_layer_applied_to_two_services_shares_one_state() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let layer = TimeoutLayer::builder()
        .name("shared")
        .timeout(Duration::from_millis(10))
        .on_event(move |e| log.lock().unwrap().push((e.name().to_owned(), e.kind())))
        .build()
        .unwrap();
    let a = layer.layer_clone(sleeper());
    let b = layer.layer_clone(sleeper());
    assert!(a.oneshot(20).await.is_err());
    assert!(b.oneshot(20).await.is_err());
    assert_eq!(layer.handle().snapshot().counter("timeouts"), Some(2));
    let timed_out = EventKind::TimedOut {
        after: Duration::from_millis(10),
    };
    assert_eq!(
        *events.lock().unwrap(),
        vec![
            ("shared".to_owned(), timed_out),
            ("shared".to_owned(), timed_out)
        ]
    );
}

trait LayerClone<S> {
    type Out;
    fn layer_clone(&self, s: S) -> Self::Out;
}
impl<S, L: tower::Layer<S>> LayerClone<S> for L {
    type Out = L::Service;
    fn layer_clone(&self, s: S) -> L::Service {
        self.layer(s)
    }
}

#[test]
fn invalid_configuration_is_a_config_error_naming_the_field() {
    let err: ConfigError = TimeoutLayer::new(Duration::ZERO).unwrap_err();
    assert_eq!(err.field(), "timeout");
    assert_eq!(err.layer(), LayerKind::Timeout);
    let err = TimeoutLayer::builder().build().unwrap_err();
    assert_eq!((err.field(), err.value()), ("timeout", "<unset>"));
    let err = TimeoutLayer::builder()
        .name("")
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "name");
}

#[tokio::test(start_paused = true)]
async fn a_huge_deadline_means_no_deadline() {
    let layer = TimeoutLayer::new(Duration::MAX).unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(sleeper());
    assert_eq!(svc.oneshot(86_400_000).await.unwrap(), 86_400_000);
}

#[tokio::test(start_paused = true)]
async fn both_profiles_coexist_with_exact_values() {
    use tower_breakwater::metrics::MetricsProfile;
    let rec = TestRecorder::default();
    let build = |profile| {
        rec.install_while(|| {
            TimeoutLayer::builder()
                .name("risk")
                .timeout(Duration::from_millis(10))
                .metrics_profile(profile)
                .build()
                .unwrap()
        })
    };
    let native = build(MetricsProfile::Breakwater);
    let r4j = build(MetricsProfile::Resilience4j);
    let off = build(MetricsProfile::Off);
    for layer in [&native, &r4j, &off] {
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service(sleeper());
        svc.clone().oneshot(1).await.unwrap();
        svc.clone().oneshot(20).await.unwrap_err();
        svc.oneshot(30).await.unwrap_err();
    }
    let ours = |o| rec.counter(CALLS, &[("name", "risk"), ("outcome", o)]);
    assert_eq!((ours("success"), ours("timeout")), (Some(1), Some(2)));
    let theirs = |k| {
        rec.counter(
            "resilience4j_timelimiter_calls_total",
            &[("name", "risk"), ("kind", k)],
        )
    };
    assert_eq!(theirs("successful"), Some(1));
    assert_eq!(theirs("timeout"), Some(2));
    assert_eq!(theirs("failed"), Some(0));
    assert_eq!(
        rec.names(),
        vec![
            CALLS.to_owned(),
            "resilience4j_timelimiter_calls_total".to_owned()
        ],
        "the Off profile registers nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn an_inner_future_exhausting_the_coop_budget_still_times_out() {
    // The inner future is always runnable, so the paused clock never auto-advances: the test
    // moves it by hand, then lets the busy task run a bounded number of times.
    let busy = service_fn(|_: ()| async {
        loop {
            tokio::task::coop::consume_budget().await;
        }
        #[allow(unreachable_code)]
        Ok::<(), BoxError>(())
    });
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(10)).unwrap())
        .service(busy);
    let task = tokio::spawn(svc.oneshot(()));
    settle().await;
    assert!(!task.is_finished());
    advance(Duration::from_millis(10)).await;
    for _ in 0..1_000 {
        if task.is_finished() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        task.is_finished(),
        "the deadline did not fire under an exhausted budget"
    );
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(
        error::find(err.as_ref()).unwrap().kind(),
        ErrorKind::Timeout
    );
}

/// A service that waits `wait_ms`, then calls `inner` with `req` (in the same task, or in a
/// spawned one).
fn waits_then_calls<S>(
    wait_ms: u64,
    inner: S,
    spawn: bool,
) -> impl Service<u64, Response = u64, Error = BoxError> + Clone
where
    S: Service<u64, Response = u64, Error = BoxError, Future: Send + 'static>
        + Clone
        + Send
        + 'static,
{
    service_fn(move |req: u64| {
        let inner = inner.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            if spawn {
                tokio::spawn(inner.oneshot(req)).await.unwrap()
            } else {
                inner.oneshot(req).await
            }
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_timeout_called_inside_another_takes_the_earlier_deadline() {
    let inner = ServiceBuilder::new()
        .layer(
            TimeoutLayer::builder()
                .name("call")
                .timeout(Duration::from_secs(1))
                .build()
                .unwrap(),
        )
        .service(sleeper());
    let outer = TimeoutLayer::builder()
        .name("deadline")
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    for (spawn, fired_by) in [(false, "call"), (true, "deadline")] {
        let svc = ServiceBuilder::new()
            .layer(outer.clone())
            .service(waits_then_calls(60, inner.clone(), spawn));
        let start = Instant::now();
        let err = svc.oneshot(10_000).await.unwrap_err();
        let e = error::find(&*err).expect("a breakwater error");
        assert_eq!(
            (e.kind(), e.name(), Instant::now() - start),
            (ErrorKind::Timeout, fired_by, Duration::from_millis(100)),
            "spawned: {spawn}"
        );
    }
    // Alone, the inner timeout keeps its own second.
    let start = Instant::now();
    let err = inner.clone().oneshot(10_000).await.unwrap_err();
    assert_eq!(error::find(&*err).unwrap().name(), "call");
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    // An earlier inner deadline stays its own.
    let svc = ServiceBuilder::new()
        .layer(outer.clone())
        .service(waits_then_calls(
            10,
            ServiceBuilder::new()
                .layer(TimeoutLayer::new(Duration::from_millis(20)).unwrap())
                .service(sleeper()),
            false,
        ));
    let start = Instant::now();
    svc.oneshot(10_000).await.unwrap_err();
    assert_eq!(Instant::now() - start, Duration::from_millis(30));
}
