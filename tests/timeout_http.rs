//! Body-aware timeout (`http` feature): the deadline covers the whole response body.
#![cfg(all(feature = "timeout", feature = "http"))]

mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use support::body::SlowBody;
use support::{Count, TestRecorder};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_breakwater::error::{self, ErrorKind};
use tower_breakwater::timeout::TimeoutLayer;

const CALLS: &str = "breakwater_timeout_calls_total";

/// An HTTP service answering at once with headers and a body of frames over virtual time.
fn server(
    frames: &'static [(u64, &'static str)],
    fail_at_end: bool,
    drops: Count,
) -> impl tower::Service<(), Response = http::Response<SlowBody>, Error = std::io::Error, Future: Send>
+ Clone {
    service_fn(move |()| {
        let body = SlowBody::new(frames, fail_at_end, drops.clone());
        async move { Ok::<_, std::io::Error>(http::Response::new(body)) }
    })
}

fn layer(
    rec: &TestRecorder,
) -> TimeoutLayer<
    tower_breakwater::timeout::FixedTimeout,
    tower_breakwater::classify::DefaultClassifier,
    tower_breakwater::completion::WholeBody,
> {
    rec.install_while(|| {
        TimeoutLayer::builder()
            .name("api")
            .timeout(Duration::from_millis(100))
            .whole_body()
            .build()
            .unwrap()
    })
}

fn count(rec: &TestRecorder, outcome: &str) -> Option<u64> {
    rec.counter(CALLS, &[("name", "api"), ("outcome", outcome)])
}

#[tokio::test(start_paused = true)]
async fn the_deadline_fires_mid_body_and_drops_the_inner_body() {
    let rec = TestRecorder::default();
    let drops = Count::default();
    let svc = ServiceBuilder::new().layer(layer(&rec)).service(server(
        &[(30, "a"), (30, "b"), (90, "c")],
        false,
        drops.clone(),
    ));
    let start = Instant::now();
    let mut body = svc.oneshot(()).await.unwrap().into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "a"
    );
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "b"
    );
    assert_eq!(Instant::now() - start, Duration::from_millis(60));
    let err = body.frame().await.unwrap().unwrap_err();
    let ours = error::find(err.as_ref()).unwrap();
    assert_eq!(ours.kind(), ErrorKind::Timeout);
    assert_eq!(ours.name(), "api");
    assert_eq!(Instant::now() - start, Duration::from_millis(100));
    assert_eq!(drops.get(), 1, "the inner body is dropped at the deadline");
    assert!(body.frame().await.is_none());
    drop(body);
    assert_eq!(
        (count(&rec, "timeout"), count(&rec, "success")),
        (Some(1), Some(0))
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_that_ends_in_time_is_recorded_at_its_end() {
    let rec = TestRecorder::default();
    let svc = ServiceBuilder::new().layer(layer(&rec)).service(server(
        &[(40, "a"), (40, "b")],
        false,
        Count::default(),
    ));
    let mut body = svc.oneshot(()).await.unwrap().into_body();
    assert_eq!(
        count(&rec, "success"),
        Some(0),
        "not recorded at the headers"
    );
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "a"
    );
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "b"
    );
    assert!(body.frame().await.is_none());
    assert_eq!(count(&rec, "success"), Some(1));
    drop(body);
    assert_eq!(count(&rec, "success"), Some(1), "recorded once");
}

#[tokio::test(start_paused = true)]
async fn a_body_error_is_a_failure_and_an_early_drop_keeps_the_response_outcome() {
    let rec = TestRecorder::default();
    let l = layer(&rec);
    let failing = ServiceBuilder::new().layer(l.clone()).service(server(
        &[(10, "a")],
        true,
        Count::default(),
    ));
    let collected = failing
        .oneshot(())
        .await
        .unwrap()
        .into_body()
        .collect()
        .await;
    assert!(collected.is_err());
    assert_eq!(count(&rec, "failure"), Some(1));

    let drops = Count::default();
    let abandoned = ServiceBuilder::new().layer(l).service(server(
        &[(10, "a"), (10, "b")],
        false,
        drops.clone(),
    ));
    let body = abandoned.oneshot(()).await.unwrap().into_body();
    drop(body);
    assert_eq!(drops.get(), 1);
    assert_eq!(
        (count(&rec, "success"), count(&rec, "timeout")),
        (Some(1), Some(0))
    );
}

#[tokio::test(start_paused = true)]
async fn without_whole_body_the_deadline_stops_at_the_headers() {
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(100)).unwrap())
        .service(server(&[(500, "late")], false, Count::default()));
    let body = svc.oneshot(()).await.unwrap().into_body();
    let bytes = body.collect().await.unwrap().to_bytes();
    assert_eq!(bytes, "late");
}
