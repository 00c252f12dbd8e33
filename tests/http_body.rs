//! Body-aware completion (`http` feature) for the bulkhead and the circuit breaker, and the
//! three `.whole_body()` layers stacked: on the paused clock, with bodies yielding frames
//! over virtual time.
#![cfg(all(
    feature = "http",
    feature = "bulkhead",
    feature = "circuit-breaker",
    feature = "timeout"
))]

mod support;

use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use std::task::{Context, Poll};
use support::body::SlowBody;
use support::{Count, TestRecorder};
use tokio::time::{Instant, advance};

use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::circuit_breaker::{
    CircuitBreakerBuilder, CircuitBreakerLayer, SlidingWindow, State,
};
use tower_breakwater::completion::WholeBody;
use tower_breakwater::error::{self, ErrorKind};
use tower_breakwater::http::HttpClassifier;
use tower_breakwater::timeout::TimeoutLayer;

/// Frames as (delay after the previous one in ms, content).
type Frames = &'static [(u64, &'static str)];

/// An HTTP service answering at once with its status and a body of `frames` over virtual
/// time (then an error when `fail_at_end`); counts the bodies dropped in `drops`.
#[derive(Clone)]
struct Server {
    status: u16,
    frames: Frames,
    fail_at_end: bool,
    drops: Count,
}

impl Service<()> for Server {
    type Response = http::Response<SlowBody>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        let body = SlowBody::new(self.frames, self.fail_at_end, self.drops.clone());
        let mut res = http::Response::new(body);
        *res.status_mut() = StatusCode::from_u16(self.status).unwrap();
        std::future::ready(Ok(res))
    }
}

/// `layer` over a [`Server`].
fn behind<L: Layer<Server>>(
    layer: &L,
    status: u16,
    frames: Frames,
    fail_at_end: bool,
    drops: &Count,
) -> L::Service {
    layer.layer(Server {
        status,
        frames,
        fail_at_end,
        drops: drops.clone(),
    })
}

/// The next data frame, as text.
async fn next_frame<B>(body: &mut B) -> String
where
    B: http_body::Body<Data = bytes::Bytes, Error = BoxError> + Unpin,
{
    let frame = body.frame().await.expect("a frame").expect("no error");
    String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
}

fn kind(err: &BoxError) -> ErrorKind {
    error::find(err.as_ref()).expect("one of ours").kind()
}

// ---- bulkhead ---------------------------------------------------------------------------

fn bulkhead(
    rec: &TestRecorder,
    max: usize,
) -> BulkheadLayer<tower_breakwater::completion::WholeBody> {
    rec.install_while(|| {
        BulkheadLayer::builder()
            .name("bh")
            .max_concurrent_calls(max)
            .whole_body()
            .build()
            .unwrap()
    })
}

fn in_flight_gauge(rec: &TestRecorder) -> Option<f64> {
    rec.gauge("breakwater_bulkhead_in_flight", &[("name", "bh")])
}

#[tokio::test(start_paused = true)]
async fn bulkhead_permit_is_held_until_the_body_ends() {
    let rec = TestRecorder::default();
    let layer = bulkhead(&rec, 2);
    let h = layer.handle();
    let drops = Count::default();
    let svc = behind(&layer, 200, &[(30, "a"), (30, "b")], false, &drops);
    assert_eq!(h.available(), 2);

    let mut body = svc.oneshot(()).await.unwrap().into_body();
    assert_eq!(
        (h.available(), h.in_flight()),
        (1, 1),
        "held past the headers"
    );
    assert_eq!(in_flight_gauge(&rec), Some(1.0));
    assert_eq!(next_frame(&mut body).await, "a");
    assert_eq!(next_frame(&mut body).await, "b");
    assert_eq!(h.available(), 1, "held until the end of stream is seen");
    assert!(body.frame().await.is_none());
    assert_eq!(
        (h.available(), h.in_flight()),
        (2, 0),
        "returned at the end"
    );
    assert_eq!(in_flight_gauge(&rec), Some(0.0));
    assert_eq!(drops.get(), 1, "the inner body is dropped at its end");
    assert!(body.frame().await.is_none());
    drop(body);
    assert_eq!(h.available(), 2, "returned once: never above the maximum");
}

#[tokio::test(start_paused = true)]
async fn bulkhead_permit_is_returned_when_the_body_is_dropped_unread() {
    let rec = TestRecorder::default();
    let layer = bulkhead(&rec, 1);
    let h = layer.handle();
    let drops = Count::default();
    let svc = behind(&layer, 200, &[(1_000, "never read")], false, &drops);

    let body = svc.clone().oneshot(()).await.unwrap().into_body();
    assert_eq!(h.available(), 0);
    let err = svc.clone().oneshot(()).await.unwrap_err();
    assert_eq!(
        kind(&err),
        ErrorKind::BulkheadFull,
        "the unread body holds the permit"
    );
    advance(Duration::from_secs(5)).await;
    assert_eq!(h.available(), 0, "time alone returns nothing");

    drop(body);
    assert_eq!((drops.get(), h.available(), h.in_flight()), (1, 1, 0));
    assert_eq!(in_flight_gauge(&rec), Some(0.0));
    let body = svc.oneshot(()).await.unwrap().into_body();
    assert_eq!(h.available(), 0, "the returned permit is taken again");
    drop(body);
    assert_eq!(h.available(), 1);
}

#[tokio::test(start_paused = true)]
async fn bulkhead_permit_is_returned_at_a_body_error() {
    let rec = TestRecorder::default();
    let layer = bulkhead(&rec, 1);
    let h = layer.handle();
    let svc = behind(&layer, 200, &[(10, "a")], true, &Count::default());
    let mut body = svc.oneshot(()).await.unwrap().into_body();
    assert_eq!(next_frame(&mut body).await, "a");
    assert_eq!(h.available(), 0);
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "body reset");
    assert_eq!(
        h.available(),
        1,
        "returned at the error, before the body is dropped"
    );
    drop(body);
    assert_eq!(h.available(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_whole_body_the_bulkhead_returns_the_permit_at_the_headers() {
    let layer = BulkheadLayer::new(1).unwrap();
    let h = layer.handle();
    let svc = behind(&layer, 200, &[(100, "late")], false, &Count::default());
    let body = svc.oneshot(()).await.unwrap().into_body();
    assert_eq!(h.available(), 1);
    assert_eq!(body.collect().await.unwrap().to_bytes(), "late");
}

// ---- circuit breaker --------------------------------------------------------------------

const CALLS: &str = "breakwater_circuit_breaker_calls_total";

/// A whole-body breaker named `cb` with the HTTP classifier, configured by `f`.
fn breaker(
    rec: &TestRecorder,
    f: impl FnOnce(CircuitBreakerBuilder<HttpClassifier>) -> CircuitBreakerBuilder<HttpClassifier>,
) -> CircuitBreakerLayer<HttpClassifier, WholeBody> {
    rec.install_while(|| {
        let b = CircuitBreakerLayer::builder()
            .name("cb")
            .classifier(HttpClassifier::new());
        f(b).whole_body().build().unwrap()
    })
}

fn breaker_calls(rec: &TestRecorder, outcome: &str) -> Option<u64> {
    rec.counter(CALLS, &[("name", "cb"), ("outcome", outcome)])
}

fn transitions(rec: &TestRecorder, from: &str, to: &str) -> Option<u64> {
    rec.counter(
        "breakwater_circuit_breaker_transitions_total",
        &[("name", "cb"), ("from", from), ("to", to)],
    )
}

#[tokio::test(start_paused = true)]
async fn breaker_counts_a_body_error_as_a_failure() {
    let rec = TestRecorder::default();
    let layer = breaker(&rec, |b| {
        b.sliding_window(SlidingWindow::count_based(2))
            .failure_rate_threshold(0.5)
    });
    let h = layer.handle();
    let svc = behind(&layer, 200, &[(10, "a")], true, &Count::default());

    let mut body = svc.clone().oneshot(()).await.unwrap().into_body();
    assert_eq!(
        (
            breaker_calls(&rec, "success"),
            breaker_calls(&rec, "failure")
        ),
        (Some(0), Some(0)),
        "a 200 is not recorded at its headers"
    );
    assert_eq!(next_frame(&mut body).await, "a");
    assert!(body.frame().await.unwrap().is_err());
    assert_eq!(
        (
            breaker_calls(&rec, "success"),
            breaker_calls(&rec, "failure")
        ),
        (Some(0), Some(1))
    );
    let s = h.snapshot();
    assert_eq!(
        (s.gauge("calls_in_window"), s.gauge("failure_rate")),
        (Some(1.0), Some(1.0))
    );
    drop(body);
    assert_eq!(breaker_calls(&rec, "failure"), Some(1), "recorded once");

    let collected = svc.oneshot(()).await.unwrap().into_body().collect().await;
    assert!(collected.is_err());
    assert_eq!(breaker_calls(&rec, "failure"), Some(2));
    assert_eq!(h.state(), State::Open, "two failed bodies out of two");
    assert_eq!(transitions(&rec, "closed", "open"), Some(1));
}

/// Opens at 50% slow calls (over 100 ms) among the last 2.
fn slow_breaker(rec: &TestRecorder) -> CircuitBreakerLayer<HttpClassifier, WholeBody> {
    breaker(rec, |b| {
        b.sliding_window(SlidingWindow::count_based(2))
            .slow_call_rate_threshold(0.5)
            .slow_call_duration(Duration::from_millis(100))
    })
}

#[tokio::test(start_paused = true)]
async fn breaker_counts_a_slow_body_as_a_slow_call() {
    let rec = TestRecorder::default();
    let layer = slow_breaker(&rec);
    let h = layer.handle();
    let svc = behind(
        &layer,
        200,
        &[(60, "a"), (60, "b")],
        false,
        &Count::default(),
    );
    let slow = || {
        rec.counter(
            "breakwater_circuit_breaker_slow_calls_total",
            &[("name", "cb")],
        )
    };

    let start = Instant::now();
    let body = svc.clone().oneshot(()).await.unwrap().into_body();
    assert_eq!(Instant::now(), start, "the headers come at once");
    assert_eq!(body.collect().await.unwrap().to_bytes(), "ab");
    assert_eq!(Instant::now() - start, Duration::from_millis(120));
    assert_eq!(slow(), Some(1));
    assert_eq!(
        (
            breaker_calls(&rec, "success"),
            breaker_calls(&rec, "failure")
        ),
        (Some(1), Some(0)),
        "slow, not failed"
    );
    let s = h.snapshot();
    assert_eq!(
        (s.gauge("slow_call_rate"), s.gauge("failure_rate")),
        (Some(1.0), Some(0.0))
    );
    assert_eq!(h.state(), State::Closed, "minimum calls not reached");

    svc.oneshot(())
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(slow(), Some(2));
    assert_eq!(h.state(), State::Open, "two slow bodies out of two");
}

#[tokio::test(start_paused = true)]
async fn without_whole_body_the_breaker_does_not_see_a_slow_body() {
    let rec = TestRecorder::default();
    let layer = rec.install_while(|| {
        CircuitBreakerLayer::builder()
            .name("cb")
            .sliding_window(SlidingWindow::count_based(2))
            .slow_call_rate_threshold(0.5)
            .slow_call_duration(Duration::from_millis(100))
            .build()
            .unwrap()
    });
    let svc = behind(
        &layer,
        200,
        &[(60, "a"), (60, "b")],
        true,
        &Count::default(),
    );
    let collected = svc.oneshot(()).await.unwrap().into_body().collect().await;
    assert!(collected.is_err());
    assert_eq!(
        rec.counter(
            "breakwater_circuit_breaker_slow_calls_total",
            &[("name", "cb")]
        ),
        Some(0)
    );
    assert_eq!(
        (
            breaker_calls(&rec, "success"),
            breaker_calls(&rec, "failure")
        ),
        (Some(1), Some(0))
    );
}

#[tokio::test(start_paused = true)]
async fn breaker_records_the_response_outcome_and_duration_of_a_dropped_body() {
    let rec = TestRecorder::default();
    let layer = slow_breaker(&rec);
    let h = layer.handle();
    let unavailable = behind(&layer, 503, &[(1_000, "x")], false, &Count::default());
    drop(unavailable.oneshot(()).await.unwrap().into_body());
    assert_eq!(
        (
            breaker_calls(&rec, "success"),
            breaker_calls(&rec, "failure")
        ),
        (Some(0), Some(1)),
        "the 503's outcome, at the drop"
    );
    let s = h.snapshot();
    assert_eq!(
        (s.gauge("failure_rate"), s.gauge("slow_call_rate")),
        (Some(1.0), Some(0.0))
    );

    let ok = behind(&layer, 200, &[(1_000, "x")], false, &Count::default());
    let body = ok.oneshot(()).await.unwrap().into_body();
    advance(Duration::from_millis(150)).await;
    drop(body);
    assert_eq!(
        (
            breaker_calls(&rec, "success"),
            breaker_calls(&rec, "failure")
        ),
        (Some(1), Some(1))
    );
    assert_eq!(
        rec.counter(
            "breakwater_circuit_breaker_slow_calls_total",
            &[("name", "cb")]
        ),
        Some(1),
        "held 150 ms before the drop: slow"
    );
    assert_eq!(h.state(), State::Open, "1 failure and 1 slow call out of 2");
}

/// Opens at one failure; one probe per half-open period, after a wait of 1 s.
fn probing(rec: &TestRecorder) -> CircuitBreakerLayer<HttpClassifier, WholeBody> {
    breaker(rec, |b| {
        b.sliding_window(SlidingWindow::consecutive_failures(1))
            .permitted_calls_in_half_open(1)
            .wait_in_open(Duration::from_secs(1))
    })
}

#[tokio::test(start_paused = true)]
async fn a_half_open_probe_holds_its_slot_until_its_body_ends() {
    let rec = TestRecorder::default();
    let layer = probing(&rec);
    let h = layer.handle();
    let failing = behind(&layer, 500, &[], false, &Count::default());
    failing
        .oneshot(())
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(h.state(), State::Open);
    advance(Duration::from_secs(1)).await;
    assert_eq!(h.state(), State::HalfOpen);

    let svc = behind(&layer, 200, &[(50, "a")], false, &Count::default());
    let probe = svc.clone().oneshot(()).await.unwrap().into_body();
    assert_eq!(h.snapshot().gauge("probes_in_flight"), Some(1.0));
    let err = svc.clone().oneshot(()).await.unwrap_err();
    assert_eq!(kind(&err), ErrorKind::CircuitOpen, "the slot is still held");
    assert_eq!(h.state(), State::HalfOpen);

    assert_eq!(probe.collect().await.unwrap().to_bytes(), "a");
    assert_eq!(h.state(), State::Closed, "the probe's body ended well");
    assert_eq!(transitions(&rec, "half_open", "closed"), Some(1));
    assert_eq!(h.snapshot().gauge("probes_in_flight"), Some(0.0));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_body_frees_its_slot() {
    let layer = probing(&TestRecorder::default());
    let h = layer.handle();
    let svc = behind(&layer, 503, &[(50, "a")], false, &Count::default());
    drop(svc.clone().oneshot(()).await.unwrap());
    assert_eq!(h.state(), State::Open);
    advance(Duration::from_secs(1)).await;
    let probe = svc.clone().oneshot(()).await.unwrap();
    assert_eq!(h.snapshot().gauge("probes_in_flight"), Some(1.0));
    drop(probe);
    assert_eq!(
        h.state(),
        State::Open,
        "the probe's 503 decided, at the drop"
    );
    assert_eq!(h.snapshot().gauge("probes_in_flight"), Some(0.0));
}

#[tokio::test(start_paused = true)]
async fn a_body_ending_in_a_later_period_causes_no_transition() {
    let rec = TestRecorder::default();
    let layer = breaker(&rec, |b| {
        b.sliding_window(SlidingWindow::count_based(2))
            .failure_rate_threshold(0.5)
            .wait_in_open(Duration::from_secs(10))
    });
    let h = layer.handle();
    let slow_failing = behind(&layer, 200, &[(500, "a")], true, &Count::default());
    let late = slow_failing.oneshot(()).await.unwrap().into_body();
    let failing = behind(&layer, 502, &[], false, &Count::default());
    for _ in 0..2 {
        drop(failing.clone().oneshot(()).await.unwrap());
    }
    assert_eq!(h.state(), State::Open);
    assert_eq!(transitions(&rec, "closed", "open"), Some(1));

    assert!(late.collect().await.is_err(), "the late body fails");
    assert_eq!(
        breaker_calls(&rec, "failure"),
        Some(3),
        "counted by outcome"
    );
    assert_eq!(
        transitions(&rec, "closed", "open"),
        Some(1),
        "no second opening"
    );
    assert_eq!(h.state(), State::Open);
    let err = failing.oneshot(()).await.unwrap_err();
    assert_eq!(
        error::find(err.as_ref()).unwrap().retry_after(),
        Some(Duration::from_millis(9_500)),
        "the open period was not extended"
    );
}

// ---- the three layers, one mechanism ------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_whole_body_deadline_under_a_whole_body_breaker_and_bulkhead() {
    let rec = TestRecorder::default();
    let bulkhead = bulkhead(&rec, 1);
    let permits = bulkhead.handle();
    let breaker = breaker(&rec, |b| {
        b.sliding_window(SlidingWindow::consecutive_failures(1))
    });
    let state = breaker.handle();
    let timeout = TimeoutLayer::builder()
        .name("deadline")
        .timeout(Duration::from_millis(100))
        .whole_body()
        .build()
        .unwrap();
    let drops = Count::default();
    let stack = ServiceBuilder::new()
        .layer(bulkhead)
        .layer(breaker)
        .layer(timeout);
    let svc = behind(&stack, 200, &[(30, "a"), (90, "b")], false, &drops);

    let start = Instant::now();
    let mut body = svc.oneshot(()).await.unwrap().into_body();
    assert_eq!(next_frame(&mut body).await, "a");
    assert_eq!((permits.available(), state.state()), (0, State::Closed));
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Timeout);
    assert_eq!(Instant::now() - start, Duration::from_millis(100));
    assert_eq!(drops.get(), 1, "the inner body is dropped at the deadline");
    assert_eq!(permits.available(), 1, "the permit is back at the deadline");
    assert_eq!(
        state.state(),
        State::Open,
        "the cut-off body is the breaker's failure"
    );
}
