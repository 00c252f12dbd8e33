//! HTTP integration under the conditions production services meet: `.whole_body()` under
//! cancellation, odd bodies and panics, the three whole-body layers stacked in every order,
//! the Retry-After hold through a whole-body breaker, HTTP classification with a custom
//! failure set, rejection responses from real layers, request keys and the cache rules.
//! Paused clock, exact values.
#![cfg(all(
    feature = "http",
    feature = "timeout",
    feature = "bulkhead",
    feature = "circuit-breaker",
    feature = "rate-limit",
    feature = "cache"
))]

mod support;

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{
    ACCEPT, AUTHORIZATION, CACHE_CONTROL, COOKIE, HOST, RETRY_AFTER, SET_COOKIE, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use support::body::SlowBody;
use support::{Count, DropGuard, TestRecorder};
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::{BulkheadHandle, BulkheadLayer};
use tower_breakwater::circuit_breaker::{
    CircuitBreakerBuilder, CircuitBreakerHandle, CircuitBreakerLayer, SlidingWindow, State,
};
use tower_breakwater::classify::{Classify, Outcome};
use tower_breakwater::completion::WholeBody;
use tower_breakwater::error::{self, ErrorKind};
use tower_breakwater::http::{HttpClassifier, HttpKey, SafeMethod, is_storable};
use tower_breakwater::timeout::TimeoutLayer;

type Bdy = UnsyncBoxBody<Bytes, BoxError>;

// ---- a test upstream ----------------------------------------------------------------------

/// The body an upstream answers with.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// Frames as (delay after the previous frame in ms, content), then an error if `true`.
    Slow(&'static [(u64, &'static str)], bool),
    /// Never yields a frame and never ends.
    Never,
    /// Yields one frame, then panics when polled again.
    PanicsAfterOne,
    /// Empty and says so (`is_end_stream` is `true` from the start).
    Empty,
    /// One data frame, then a trailers frame, then the end; ready at once.
    WithTrailers,
}

/// A body for the shapes [`SlowBody`] does not cover; counts its drops.
struct Odd {
    shape: Shape,
    frames: VecDeque<Frame<Bytes>>,
    polls_after_end: Count,
    _drops: DropGuard,
}

impl Body for Odd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.shape {
            Shape::Never => Poll::Pending,
            Shape::PanicsAfterOne if self.frames.is_empty() => panic!("body poll panicked"),
            _ => match self.frames.pop_front() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None => {
                    self.polls_after_end.incr();
                    Poll::Ready(None)
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.shape, Shape::Empty) || self.frames.is_empty() && !self.never()
    }

    fn size_hint(&self) -> SizeHint {
        match self.shape {
            Shape::Empty => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Odd {
    fn never(&self) -> bool {
        matches!(self.shape, Shape::Never | Shape::PanicsAfterOne)
    }
}

/// What an upstream answers: a status, `Retry-After` values and a body.
#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    retry_after: &'static [&'static str],
    shape: Shape,
}

fn reply(status: u16, shape: Shape) -> Reply {
    Reply {
        status,
        retry_after: &[],
        shape,
    }
}

fn with_retry_after(status: u16, retry_after: &'static [&'static str], shape: Shape) -> Reply {
    Reply {
        status,
        retry_after,
        shape,
    }
}

/// Counters of an upstream: calls that reached it, bodies dropped, polls after the end.
#[derive(Clone, Default)]
struct Upstream {
    calls: Count,
    drops: Count,
    polls_after_end: Count,
}

impl Upstream {
    /// The upstream as a `Clone` service answering each [`Reply`] with its headers at once.
    fn service(
        &self,
    ) -> impl Service<Reply, Response = Response<Bdy>, Error = BoxError, Future: Send> + Clone + use<>
    {
        let me = self.clone();
        service_fn(move |r: Reply| {
            me.calls.incr();
            let body: Bdy = match r.shape {
                Shape::Slow(frames, fail) => SlowBody::new(frames, fail, me.drops.clone())
                    .map_err(BoxError::from)
                    .boxed_unsync(),
                shape => {
                    let frames = match shape {
                        Shape::PanicsAfterOne => VecDeque::from([Frame::data(Bytes::from("a"))]),
                        Shape::WithTrailers => {
                            let mut trailers = HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            VecDeque::from([
                                Frame::data(Bytes::from("a")),
                                Frame::trailers(trailers),
                            ])
                        }
                        _ => VecDeque::new(),
                    };
                    Odd {
                        shape,
                        frames,
                        polls_after_end: me.polls_after_end.clone(),
                        _drops: DropGuard(me.drops.clone()),
                    }
                    .boxed_unsync()
                }
            };
            let mut b = Response::builder().status(r.status);
            for v in r.retry_after {
                // Bytes, so that obs-text (non-ASCII) values can be sent as servers do.
                b = b.header(RETRY_AFTER, HeaderValue::from_bytes(v.as_bytes()).unwrap());
            }
            let res = b.body(body).unwrap();
            async move { Ok::<_, BoxError>(res) }
        })
    }
}

/// Polls `fut` once; `true` when it is pending.
async fn pending_once<F: std::future::Future>(fut: F) -> bool {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_pending())).await
}

/// The error of a call expected to fail.
fn failed<T>(r: Result<T, BoxError>) -> BoxError {
    match r {
        Ok(_) => panic!("the call succeeded"),
        Err(e) => e,
    }
}

/// The body of the response to `r`, the call expected to succeed.
async fn body_of<S, B>(svc: &S, r: Reply) -> B
where
    S: Service<Reply, Response = Response<B>, Error = BoxError> + Clone,
{
    match svc.clone().oneshot(r).await {
        Ok(res) => res.into_body(),
        Err(e) => panic!("the call failed: {e}"),
    }
}

fn kind(err: &BoxError) -> ErrorKind {
    error::find(err.as_ref()).expect("one of ours").kind()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ---- the three whole-body layers ----------------------------------------------------------

const WAIT: Duration = Duration::from_secs(5);

/// One permit, whole body.
fn bulkhead(rec: &TestRecorder) -> BulkheadLayer<WholeBody> {
    rec.install_while(|| {
        BulkheadLayer::builder()
            .name("bh")
            .max_concurrent_calls(1)
            .whole_body()
            .build()
            .unwrap()
    })
}

/// Whole body, HTTP classifier, one probe, a wait of 5 s; `f` sets the rest.
fn breaker(
    rec: &TestRecorder,
    f: impl FnOnce(CircuitBreakerBuilder<HttpClassifier>) -> CircuitBreakerBuilder<HttpClassifier>,
) -> CircuitBreakerLayer<HttpClassifier, WholeBody> {
    rec.install_while(|| {
        let b = CircuitBreakerLayer::builder()
            .name("cb")
            .wait_in_open(WAIT)
            .permitted_calls_in_half_open(1)
            .classifier(HttpClassifier::new());
        f(b).whole_body().build().unwrap()
    })
}

/// Opens at the first failure.
fn one_strike(rec: &TestRecorder) -> CircuitBreakerLayer<HttpClassifier, WholeBody> {
    breaker(rec, |b| {
        b.sliding_window(SlidingWindow::consecutive_failures(1))
    })
}

fn timeout(
    rec: &TestRecorder,
) -> TimeoutLayer<tower_breakwater::timeout::FixedTimeout, HttpClassifier, WholeBody> {
    rec.install_while(|| {
        TimeoutLayer::builder()
            .name("to")
            .timeout(ms(100))
            .classifier(HttpClassifier::new())
            .whole_body()
            .build()
            .unwrap()
    })
}

fn cb_calls(rec: &TestRecorder, outcome: &str) -> u64 {
    rec.counter(
        "breakwater_circuit_breaker_calls_total",
        &[("name", "cb"), ("outcome", outcome)],
    )
    .unwrap_or(0)
}

fn to_calls(rec: &TestRecorder, outcome: &str) -> u64 {
    rec.counter(
        "breakwater_timeout_calls_total",
        &[("name", "to"), ("outcome", outcome)],
    )
    .unwrap_or(0)
}

fn probes(h: &CircuitBreakerHandle) -> f64 {
    h.snapshot().gauge("probes_in_flight").unwrap()
}

/// See [`Stack::summary`].
type Summary = (u32, State, (u64, u64), (u64, u64, u64), u64);

/// A bulkhead (1 permit) over a one-strike breaker over a 100 ms timeout, all whole-body,
/// over `up`; with the handles.
struct Stack {
    h: Handles,
    state: CircuitBreakerHandle,
}

impl Stack {
    fn new() -> (
        Stack,
        impl Service<
            Reply,
            Response = Response<impl Body<Data = Bytes, Error = BoxError> + Unpin>,
            Error = BoxError,
        > + Clone,
    ) {
        let rec = TestRecorder::default();
        let (bh, cb, to) = (bulkhead(&rec), one_strike(&rec), timeout(&rec));
        let up = Upstream::default();
        let st = Stack {
            h: Handles {
                permits: bh.handle(),
                rec,
                up: up.clone(),
            },
            state: cb.handle(),
        };
        let svc = ServiceBuilder::new()
            .layer(bh)
            .layer(cb)
            .layer(to)
            .service(up.service());
        (st, svc)
    }

    /// Permits free, breaker state, breaker (success, failure), timeout (success, failure,
    /// timeout), bodies dropped.
    fn summary(&self) -> Summary {
        let (permits, (cb_ok, cb_failed, _), (to_ok, to_failed, timed_out, _)) = self.h.counts();
        (
            permits,
            self.state.state(),
            (cb_ok, cb_failed),
            (to_ok, to_failed, timed_out),
            self.h.up.drops.get(),
        )
    }
}

// ---- whole body under cancellation and odd bodies -----------------------------------------

#[tokio::test(start_paused = true)]
async fn a_response_future_dropped_before_its_headers_holds_nothing() {
    let slow_headers = service_fn(|()| async {
        tokio::time::sleep(secs(10)).await;
        Ok::<_, BoxError>(Response::new(http_body_util::Empty::<Bytes>::new()))
    });
    let rec = TestRecorder::default();
    let (bh, cb, to) = (bulkhead(&rec), one_strike(&rec), timeout(&rec));
    let (permits, state) = (bh.handle(), cb.handle());
    let other = ServiceBuilder::new()
        .layer(bh)
        .layer(cb)
        .layer(to)
        .service(slow_headers);
    let mut fut = Box::pin(other.oneshot(()));
    assert!(pending_once(fut.as_mut()).await);
    assert_eq!(permits.available(), 0);
    advance(ms(50)).await;
    drop(fut);
    assert_eq!(permits.available(), 1);
    assert_eq!(state.state(), State::Closed);
    assert_eq!(
        (cb_calls(&rec, "success"), cb_calls(&rec, "failure")),
        (0, 0),
        "a cancelled call is neither"
    );
    assert_eq!(
        rec.counter(
            "breakwater_timeout_calls_total",
            &[("name", "to"), ("outcome", "success")]
        ),
        Some(0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_dropped_while_its_frame_is_pending_ends_the_call_once() {
    let (st, svc) = Stack::new();
    let mut body = body_of(
        &svc,
        reply(200, Shape::Slow(&[(10, "a"), (50, "b")], false)),
    )
    .await;
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "a"
    );
    // Poll once: the inner body is now waiting for its second frame.
    assert!(pending_once(body.frame()).await);
    advance(ms(20)).await;
    assert_eq!(st.summary(), (0, State::Closed, (0, 0), (0, 0, 0), 0));
    drop(body);
    assert_eq!(
        st.summary(),
        (1, State::Closed, (1, 0), (1, 0, 0), 1),
        "dropped early: the response's outcome, once, permit back, inner body dropped"
    );
    // The permit is really free: the next call is admitted.
    let next = svc
        .oneshot(reply(200, Shape::Slow(&[], false)))
        .await
        .unwrap();
    assert_eq!(st.h.permits.available(), 0);
    drop(next);
    assert_eq!(st.summary(), (1, State::Closed, (2, 0), (2, 0, 0), 2));
}

#[tokio::test(start_paused = true)]
async fn a_body_polled_after_its_end_yields_none_and_releases_nothing_twice() {
    let (st, svc) = Stack::new();
    let mut body = body_of(&svc, reply(200, Shape::Slow(&[(10, "a")], false))).await;
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "a"
    );
    assert!(body.frame().await.is_none());
    for _ in 0..3 {
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }
    drop(body);
    assert_eq!(
        st.summary(),
        (1, State::Closed, (1, 0), (1, 0, 0), 1),
        "one permit (not two), one outcome per layer"
    );
}

#[tokio::test(start_paused = true)]
async fn after_the_end_the_inner_body_is_never_polled_again() {
    let (st, svc) = Stack::new();
    let mut body = body_of(&svc, reply(200, Shape::WithTrailers)).await;
    while body.frame().await.is_some() {}
    for _ in 0..3 {
        assert!(body.frame().await.is_none());
    }
    assert_eq!(
        st.h.up.polls_after_end.get(),
        1,
        "the inner body saw its end once"
    );
    assert_eq!(st.h.up.drops.get(), 1, "dropped at its end, not with ours");
}

#[tokio::test(start_paused = true)]
async fn trailers_pass_through_and_the_call_ends_after_them() {
    let (st, svc) = Stack::new();
    let mut body = body_of(&svc, reply(200, Shape::WithTrailers)).await;
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "a"
    );
    let trailers = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_trailers()
        .unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        st.summary(),
        (0, State::Closed, (0, 0), (0, 0, 0), 0),
        "trailers are a frame, not the end"
    );
    assert!(body.frame().await.is_none());
    assert_eq!(st.summary(), (1, State::Closed, (1, 0), (1, 0, 0), 1));
}

#[tokio::test(start_paused = true)]
async fn an_empty_body_is_end_stream_and_ends_the_call_read_or_dropped_unpolled() {
    let (st, svc) = Stack::new();
    // Read: a consumer that polls to the end.
    let mut body = body_of(&svc, reply(204, Shape::Empty)).await;
    assert!(body.is_end_stream(), "passed through from the inner body");
    assert_eq!(body.size_hint().exact(), Some(0));
    assert!(body.frame().await.is_none());
    assert_eq!(st.summary(), (1, State::Closed, (1, 0), (1, 0, 0), 1));

    // Dropped unpolled: what hyper does with a body that says it is at its end.
    let res = svc.oneshot(reply(204, Shape::Empty)).await.unwrap();
    assert!(res.body().is_end_stream());
    assert_eq!(st.h.permits.available(), 0);
    drop(res);
    assert_eq!(st.summary(), (1, State::Closed, (2, 0), (2, 0, 0), 2));
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_ends_holds_the_permit_until_the_whole_body_deadline() {
    let (st, svc) = Stack::new();
    let start = Instant::now();
    let mut body = body_of(&svc, reply(200, Shape::Never)).await;
    assert_eq!(st.h.permits.available(), 0);
    let err = failed(svc.clone().oneshot(reply(200, Shape::Never)).await);
    assert_eq!(kind(&err), ErrorKind::BulkheadFull);
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Timeout);
    assert_eq!(Instant::now() - start, ms(100));
    assert_eq!(
        st.summary(),
        (1, State::Open, (0, 1), (0, 0, 1), 1),
        "the deadline's cut is the breaker's failure"
    );
    assert_eq!(st.h.up.calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_never_ending_body_without_a_timeout_holds_the_permit_until_dropped() {
    let rec = TestRecorder::default();
    let bh = bulkhead(&rec);
    let permits = bh.handle();
    let up = Upstream::default();
    let svc = bh.layer(up.service());
    let res = svc.oneshot(reply(200, Shape::Never)).await.unwrap();
    advance(secs(3600)).await;
    assert_eq!(permits.available(), 0, "an hour later: still held");
    drop(res);
    assert_eq!((permits.available(), up.drops.get()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_body_poll_returns_the_permit_and_the_probe_slot() {
    let rec = TestRecorder::default();
    let (bh, cb) = (bulkhead(&rec), one_strike(&rec));
    let (permits, state) = (bh.handle(), cb.handle());
    let up = Upstream::default();
    let svc = ServiceBuilder::new()
        .layer(bh)
        .layer(cb)
        .service(up.service());
    // Open the breaker, then wait for HalfOpen: the next call is the only probe.
    drop(svc.clone().oneshot(reply(500, Shape::Empty)).await.unwrap());
    advance(WAIT).await;
    assert_eq!(state.state(), State::HalfOpen);

    let body = body_of(&svc, reply(200, Shape::PanicsAfterOne)).await;
    assert_eq!((permits.available(), probes(&state)), (0, 1.0));
    let read = tokio::spawn(async move {
        let mut body = body;
        while let Some(f) = body.frame().await {
            f.unwrap();
        }
    });
    assert!(read.await.unwrap_err().is_panic());
    assert_eq!(
        (permits.available(), probes(&state), up.drops.get()),
        (1, 0.0, 2),
        "unwinding returned the permit, the slot, and dropped the inner body"
    );
    assert_eq!(
        state.state(),
        State::HalfOpen,
        "a panic decides nothing (as a panic in the inner call): the next call probes"
    );
    drop(svc.clone().oneshot(reply(200, Shape::Empty)).await.unwrap());
    assert_eq!(state.state(), State::Closed, "that probe decided");
}

/// The response future's docs count a panic in the inner call as a cancellation (neither
/// success nor failure); a body whose poll panics is recorded with the response's outcome.
#[tokio::test(start_paused = true)]
async fn a_panicking_body_is_not_recorded_as_a_success() {
    let (st, svc) = Stack::new();
    let mut body = body_of(&svc, reply(200, Shape::PanicsAfterOne)).await;
    let read = tokio::spawn(async move {
        while let Some(f) = body.frame().await {
            f.unwrap();
        }
    });
    assert!(read.await.unwrap_err().is_panic());
    let (_, _, (cb_success, _), (to_success, _, _), _) = st.summary();
    assert_eq!(
        (cb_success, to_success),
        (0, 0),
        "a panicked call is no success"
    );
}

// ---- the three whole-body layers stacked in every order -----------------------------------

/// See [`Handles::counts`].
type Counts = (u32, (u64, u64, u64), (u64, u64, u64, u64));

/// Handles of one stack; the breaker (count window of 10) never opens here, so every outcome
/// shows in its counters.
struct Handles {
    rec: TestRecorder,
    permits: BulkheadHandle,
    up: Upstream,
}

impl Handles {
    /// Permits free, breaker (success, failure, ignored), timeout (success, failure, timeout,
    /// ignored).
    fn counts(&self) -> Counts {
        (
            self.permits.available(),
            (
                cb_calls(&self.rec, "success"),
                cb_calls(&self.rec, "failure"),
                cb_calls(&self.rec, "ignored"),
            ),
            (
                to_calls(&self.rec, "success"),
                to_calls(&self.rec, "failure"),
                to_calls(&self.rec, "timeout"),
                to_calls(&self.rec, "ignored"),
            ),
        )
    }
}

/// One scenario per way a call ends, through a stack of the three whole-body layers in
/// `order` (outermost first: `b`ulkhead, `c`ircuit breaker, `t`imeout).
async fn every_end<S, B>(order: &str, svc: S, h: &Handles)
where
    S: Service<Reply, Response = Response<B>, Error = BoxError> + Clone,
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let outside = |a: char, b: char| order.find(a).unwrap() < order.find(b).unwrap();
    let call = |r: Reply| svc.clone().oneshot(r);

    // 1. Read to the end.
    let start = Instant::now();
    let body = call(reply(200, Shape::Slow(&[(10, "a"), (10, "b")], false)))
        .await
        .unwrap()
        .into_body();
    assert_eq!(body.collect().await.unwrap().to_bytes(), "ab", "{order}");
    assert_eq!(Instant::now() - start, ms(20), "{order}");
    assert_eq!(h.counts(), (1, (1, 0, 0), (1, 0, 0, 0)), "{order}: read");

    // 2. A body error: a failure for both, whichever is outside.
    let body = call(reply(200, Shape::Slow(&[(10, "a")], true)))
        .await
        .unwrap()
        .into_body();
    let err = body.collect().await.unwrap_err();
    assert!(
        error::find(err.as_ref()).is_none(),
        "{order}: the body's own error"
    );
    assert_eq!(
        h.counts(),
        (1, (1, 1, 0), (1, 1, 0, 0)),
        "{order}: body error"
    );

    // 3. Cut off by the deadline at 100 ms. The breaker sees the timeout's error only when
    //    it is outside the timeout; inside, its body is dropped early (the 200's outcome).
    let start = Instant::now();
    let mut body = call(reply(200, Shape::Slow(&[(60, "a"), (60, "b")], false)))
        .await
        .unwrap()
        .into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "a"
    );
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Timeout, "{order}");
    assert_eq!(Instant::now() - start, ms(100), "{order}");
    let cb = if outside('c', 't') {
        (1, 2, 0)
    } else {
        (2, 1, 0)
    };
    assert_eq!(h.counts(), (1, cb, (1, 1, 1, 0)), "{order}: cut off");
    assert!(body.frame().await.is_none(), "{order}");
    drop(body);
    assert_eq!(h.counts(), (1, cb, (1, 1, 1, 0)), "{order}: recorded once");

    // 4. A body held unread keeps the only permit: the next call is rejected, and only the
    //    layers outside the bulkhead see (and ignore) the rejection.
    let held = call(reply(200, Shape::Slow(&[(10, "a")], false)))
        .await
        .unwrap();
    let err = failed(call(reply(200, Shape::Slow(&[], false))).await);
    assert_eq!(kind(&err), ErrorKind::BulkheadFull, "{order}");
    let cb_ignored = u64::from(outside('c', 'b'));
    let to_ignored = u64::from(outside('t', 'b'));
    assert_eq!(
        h.counts(),
        (0, (cb.0, cb.1, cb_ignored), (1, 1, 1, to_ignored)),
        "{order}: rejected"
    );
    // 5. ... until it is dropped: the response's outcome.
    drop(held);
    assert_eq!(
        h.counts(),
        (1, (cb.0 + 1, cb.1, cb_ignored), (2, 1, 1, to_ignored)),
        "{order}: dropped"
    );
    assert_eq!((h.up.calls.get(), h.up.drops.get()), (4, 4), "{order}");
}

macro_rules! stacked {
    ($h:expr, $x:expr, $y:expr, $z:expr) => {
        ServiceBuilder::new()
            .layer($x)
            .layer($y)
            .layer($z)
            .service($h.up.service())
    };
}

#[tokio::test(start_paused = true)]
async fn whole_body_layers_stacked_in_every_order() {
    for order in ["bct", "btc", "cbt", "ctb", "tbc", "tcb"] {
        let rec = TestRecorder::default();
        let bh = bulkhead(&rec);
        let cb = breaker(&rec, |b| b.sliding_window(SlidingWindow::count_based(10)));
        let to = timeout(&rec);
        let state = cb.handle();
        let h = Handles {
            permits: bh.handle(),
            rec,
            up: Upstream::default(),
        };
        match order {
            "bct" => every_end(order, stacked!(h, bh, cb, to), &h).await,
            "btc" => every_end(order, stacked!(h, bh, to, cb), &h).await,
            "cbt" => every_end(order, stacked!(h, cb, bh, to), &h).await,
            "ctb" => every_end(order, stacked!(h, cb, to, bh), &h).await,
            "tbc" => every_end(order, stacked!(h, to, bh, cb), &h).await,
            "tcb" => every_end(order, stacked!(h, to, cb, bh), &h).await,
            _ => unreachable!(),
        }
        assert_eq!(state.state(), State::Closed, "{order}");
    }
}

// ---- the Retry-After hold through `.whole_body()` -----------------------------------------

/// A whole-body breaker (HTTP classifier, hold capped at 120 s, wait 5 s, one probe) over an
/// upstream, with `window`.
fn held(
    window: SlidingWindow,
) -> (
    CircuitBreakerHandle,
    Upstream,
    impl Service<
        Reply,
        Response = Response<impl Body<Data = Bytes, Error = BoxError> + Unpin>,
        Error = BoxError,
    > + Clone,
) {
    let cb = breaker(&TestRecorder::default(), |b| {
        b.sliding_window(window).retry_after_hold(secs(120))
    });
    let up = Upstream::default();
    (cb.handle(), up.clone(), cb.layer(up.service()))
}

/// Calls now: `None` when admitted (the body is read), or the rejection's retry-after.
async fn rejected_for<S, B>(svc: &S) -> Option<Duration>
where
    S: Service<Reply, Response = Response<B>, Error = BoxError> + Clone,
    B: Body<Data = Bytes, Error = BoxError>,
{
    match svc
        .clone()
        .oneshot(reply(200, Shape::Slow(&[], false)))
        .await
    {
        Ok(res) => {
            res.into_body().collect().await.unwrap();
            None
        }
        Err(e) => {
            let ours = error::find(e.as_ref()).unwrap();
            assert_eq!(ours.kind(), ErrorKind::CircuitOpen);
            Some(ours.retry_after().unwrap())
        }
    }
}

/// A 1 s body after a `503` with `Retry-After: 30`.
const SLOW_503: Reply = Reply {
    status: 503,
    retry_after: &["30"],
    shape: Shape::Slow(&[(1_000, "busy")], false),
};

#[tokio::test(start_paused = true)]
async fn the_hold_is_read_at_the_headers_and_applied_at_the_end_of_the_body() {
    let (h, up, svc) = held(SlidingWindow::consecutive_failures(1));
    let t0 = Instant::now();
    let res = svc.clone().oneshot(SLOW_503).await.unwrap();
    assert_eq!(
        h.state(),
        State::Closed,
        "nothing is recorded at the headers"
    );
    assert_eq!(h.snapshot().gauge("retry_after_hold_seconds"), Some(0.0));
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "busy");
    assert_eq!(Instant::now() - t0, secs(1));
    assert_eq!(h.state(), State::Open, "opened at the end of the body");
    assert_eq!(
        rejected_for(&svc).await,
        Some(secs(30)),
        "30 s from the opening"
    );
    assert_eq!(h.snapshot().gauge("retry_after_hold_seconds"), Some(30.0));
    advance(secs(30) - ms(1)).await;
    assert_eq!(rejected_for(&svc).await, Some(ms(1)));
    advance(ms(1)).await;
    assert_eq!(rejected_for(&svc).await, None, "probed at 31 s");
    assert_eq!((h.state(), up.calls.get()), (State::Closed, 2));
}

#[tokio::test(start_paused = true)]
async fn the_hold_applies_when_the_body_of_the_503_fails_or_is_dropped() {
    for dropped in [false, true] {
        let (h, _, svc) = held(SlidingWindow::consecutive_failures(1));
        let failing = Reply {
            shape: Shape::Slow(&[(1_000, "busy")], !dropped),
            ..SLOW_503
        };
        let body = body_of(&svc, failing).await;
        advance(ms(400)).await;
        if dropped {
            drop(body);
        } else {
            assert!(body.collect().await.is_err());
        }
        assert_eq!(h.state(), State::Open, "dropped: {dropped}");
        assert_eq!(
            rejected_for(&svc).await,
            Some(secs(30)),
            "dropped: {dropped}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_200_whose_body_fails_opens_for_the_wait_only() {
    let (h, _, svc) = held(SlidingWindow::consecutive_failures(1));
    let res = svc
        .clone()
        .oneshot(with_retry_after(
            200,
            &["30"],
            Shape::Slow(&[(10, "a")], true),
        ))
        .await
        .unwrap();
    assert!(res.into_body().collect().await.is_err());
    assert_eq!(h.state(), State::Open);
    assert_eq!(
        rejected_for(&svc).await,
        Some(WAIT),
        "a 200 asks for no delay"
    );
}

#[tokio::test(start_paused = true)]
async fn a_503_with_retry_after_from_a_half_open_probe_reopens_with_the_hold() {
    let (h, up, svc) = held(SlidingWindow::consecutive_failures(1));
    let first = svc.clone().oneshot(reply(500, Shape::Empty)).await.unwrap();
    drop(first);
    assert_eq!(rejected_for(&svc).await, Some(WAIT), "a 500 sets no hold");
    advance(WAIT).await;
    assert_eq!(h.state(), State::HalfOpen);
    let probe = svc.clone().oneshot(SLOW_503).await.unwrap();
    assert_eq!(probes(&h), 1.0);
    let err = failed(svc.clone().oneshot(reply(200, Shape::Empty)).await);
    let ours = error::find(err.as_ref()).unwrap();
    assert_eq!(
        (ours.kind(), ours.retry_after()),
        (ErrorKind::CircuitOpen, None),
        "every probe slot is taken while the probe's body is read"
    );
    probe.into_body().collect().await.unwrap();
    assert_eq!((h.state(), probes(&h)), (State::Open, 0.0));
    assert_eq!(rejected_for(&svc).await, Some(secs(30)));
    advance(secs(30)).await;
    assert_eq!(rejected_for(&svc).await, None);
    assert_eq!(up.calls.get(), 3);
}

#[tokio::test(start_paused = true)]
async fn with_consecutive_failures_only_the_failure_that_opens_it_sets_the_hold() {
    // Two 503s asking for 60 s, then a 500 that opens it: the wait alone.
    let (h, _, svc) = held(SlidingWindow::consecutive_failures(3));
    let slow = |ra: &'static [&'static str], status| {
        with_retry_after(status, ra, Shape::Slow(&[(10, "x")], false))
    };
    for _ in 0..2 {
        let res = svc.clone().oneshot(slow(&["60"], 503)).await.unwrap();
        res.into_body().collect().await.unwrap();
        assert_eq!(h.state(), State::Closed, "asking for a delay opens nothing");
    }
    let res = svc.clone().oneshot(slow(&[], 500)).await.unwrap();
    res.into_body().collect().await.unwrap();
    assert_eq!(rejected_for(&svc).await, Some(WAIT));

    // Two 500s, then a 429 asking for 60 s that opens it: held 60 s.
    let (h, _, svc) = held(SlidingWindow::consecutive_failures(3));
    for status in [500, 500] {
        let res = svc.clone().oneshot(slow(&[], status)).await.unwrap();
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(h.state(), State::Closed);
    let res = svc.clone().oneshot(slow(&["60"], 429)).await.unwrap();
    res.into_body().collect().await.unwrap();
    assert_eq!(rejected_for(&svc).await, Some(secs(60)));
}

#[tokio::test(start_paused = true)]
async fn odd_retry_after_values_through_a_whole_body_breaker() {
    let past = httpdate::fmt_http_date(SystemTime::now() - secs(3_600));
    let past: &'static str = Box::leak(past.into_boxed_str());
    let cases: [(&'static str, Duration); 8] = [
        ("0", WAIT),
        ("4", WAIT),
        ("-5", WAIT),
        ("30 ", secs(30)),
        ("\t30", secs(30)),
        ("18446744073709551615", secs(120)),
        ("\u{0663}\u{0660}", WAIT), // Arabic-Indic "30": not DIGIT
        (past, WAIT),
    ];
    for (value, open_for) in cases {
        let (h, up, svc) = held(SlidingWindow::consecutive_failures(1));
        let values: &'static [&'static str] = Box::leak(Box::new([value]));
        let res = svc
            .clone()
            .oneshot(with_retry_after(
                503,
                values,
                Shape::Slow(&[(10, "x")], false),
            ))
            .await
            .unwrap();
        res.into_body().collect().await.unwrap();
        assert_eq!(h.state(), State::Open, "{value:?}");
        assert_eq!(rejected_for(&svc).await, Some(open_for), "{value:?}");
        advance(open_for).await;
        assert_eq!(rejected_for(&svc).await, None, "{value:?}: probed");
        assert_eq!(up.calls.get(), 2, "{value:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_custom_failure_set_decides_what_opens_it_and_what_can_hold_it() {
    let classifier = HttpClassifier::new()
        .success_status(StatusCode::SERVICE_UNAVAILABLE)
        .success_status(StatusCode::TOO_MANY_REQUESTS)
        .failure_status(StatusCode::NOT_FOUND);
    let cb = breaker(&TestRecorder::default(), |b| {
        b.sliding_window(SlidingWindow::consecutive_failures(1))
            .classifier(classifier)
            .retry_after_hold(secs(120))
    });
    let h = cb.handle();
    let svc = cb.layer(Upstream::default().service());
    for status in [503, 429] {
        let r = with_retry_after(status, &["30"], Shape::Slow(&[], false));
        let res = svc.clone().oneshot(r).await.unwrap();
        res.into_body().collect().await.unwrap();
        assert_eq!(h.state(), State::Closed, "{status} is a success here");
    }
    let r = with_retry_after(404, &["30"], Shape::Slow(&[], false));
    let res = svc.clone().oneshot(r).await.unwrap();
    res.into_body().collect().await.unwrap();
    assert_eq!(h.state(), State::Open, "404 is a failure here");
    assert_eq!(
        rejected_for(&svc).await,
        Some(WAIT),
        "only a 429 or 503 carries a Retry-After"
    );
    let table = [
        (100, Outcome::Success),
        (404, Outcome::Failure),
        (429, Outcome::Success),
        (500, Outcome::Failure),
        (503, Outcome::Success),
        (999, Outcome::Success),
    ];
    for (code, want) in table {
        let res = Response::builder().status(code).body(()).unwrap();
        assert_eq!(classifier.classify(Ok(&res)), want, "{code}");
    }
}

/// A delay-seconds value is `1*DIGIT` with no upper bound: a value beyond `u64` asks for
/// longer than `u64::MAX` seconds, which the cap turns into the maximum hold.
#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_u64_seconds_holds_for_the_maximum() {
    let (_, _, svc) = held(SlidingWindow::consecutive_failures(1));
    let r = with_retry_after(503, &["99999999999999999999999"], Shape::Empty);
    drop(svc.clone().oneshot(r).await.unwrap());
    assert_eq!(
        rejected_for(&svc).await,
        Some(secs(120)),
        "a bigger delay than 18446744073709551615 s, which holds for the maximum"
    );
}

// ---- rejection responses from real layers -------------------------------------------------

/// `(status, Retry-After)` of the rejection response for `err`; `None` when not ours.
fn rendered(err: &BoxError) -> Option<(u16, Option<String>)> {
    tower_breakwater::http::rejection_response::<()>(err.as_ref()).map(|r| {
        (
            r.status().as_u16(),
            r.headers()
                .get(RETRY_AFTER)
                .map(|v| v.to_str().unwrap().to_owned()),
        )
    })
}

#[tokio::test(start_paused = true)]
async fn rejection_responses_for_every_kind_a_layer_returns() {
    let ra = |s: &str| Some(s.to_owned());

    // Circuit breaker: Open (the wait left, rounded up), HalfOpen with every slot taken
    // (unknown), forced open.
    let (h, _, svc) = held(SlidingWindow::consecutive_failures(1));
    drop(svc.clone().oneshot(reply(500, Shape::Empty)).await.unwrap());
    let open = failed(svc.clone().oneshot(reply(200, Shape::Empty)).await);
    assert_eq!(rendered(&open), Some((503, ra("5"))));
    advance(ms(4_200)).await;
    let open = failed(svc.clone().oneshot(reply(200, Shape::Empty)).await);
    assert_eq!(rendered(&open), Some((503, ra("1"))), "0.8 s left");
    advance(ms(800)).await;
    let probe = svc.clone().oneshot(reply(200, Shape::Never)).await.unwrap();
    let busy = failed(svc.clone().oneshot(reply(200, Shape::Empty)).await);
    assert_eq!(rendered(&busy), Some((503, None)), "half-open, no slot");
    drop(probe);
    h.force_open();
    let forced = failed(svc.clone().oneshot(reply(200, Shape::Empty)).await);
    assert_eq!(kind(&forced), ErrorKind::CircuitOpen);
    assert_eq!(rendered(&forced), Some((503, None)), "forced: no end known");

    // Bulkhead full.
    let bh = bulkhead(&TestRecorder::default());
    let svc = bh.layer(Upstream::default().service());
    let held_body = svc.clone().oneshot(reply(200, Shape::Never)).await.unwrap();
    let full = failed(svc.clone().oneshot(reply(200, Shape::Empty)).await);
    assert_eq!(rendered(&full), Some((503, None)));
    drop(held_body);

    // Rate limited (100 ms to the next slot: 1 s) and too many keys (no time known).
    let rl = tower_breakwater::rate_limit::RateLimitLayer::builder()
        .rate(10, secs(1))
        .burst(1)
        .build()
        .unwrap();
    let svc = rl.layer(Upstream::default().service());
    drop(svc.clone().oneshot(reply(200, Shape::Empty)).await.unwrap());
    let limited = failed(svc.clone().oneshot(reply(200, Shape::Empty)).await);
    assert_eq!(kind(&limited), ErrorKind::RateLimited);
    assert_eq!(rendered(&limited), Some((429, ra("1"))));
    let keyed = tower_breakwater::rate_limit::RateLimitLayer::builder()
        .rate(10, secs(1))
        .keyed(|r: &Reply| r.status)
        .max_keys(1)
        .build()
        .unwrap();
    let svc = keyed.layer(Upstream::default().service());
    drop(svc.clone().oneshot(reply(200, Shape::Empty)).await.unwrap());
    let too_many = failed(svc.clone().oneshot(reply(201, Shape::Empty)).await);
    assert_eq!(kind(&too_many), ErrorKind::TooManyKeys);
    assert_eq!(rendered(&too_many), Some((429, None)));

    // Timeout: at the headers and mid-body (a 504, never a Retry-After).
    let slow_headers = service_fn(|()| async {
        tokio::time::sleep(secs(1)).await;
        Ok::<_, BoxError>(Response::new(()))
    });
    let t = TimeoutLayer::new(ms(100)).unwrap().layer(slow_headers);
    let late = failed(t.oneshot(()).await);
    assert_eq!(rendered(&late), Some((504, None)));
    let svc = timeout(&TestRecorder::default()).layer(Upstream::default().service());
    let body = body_of(&svc, reply(200, Shape::Never)).await;
    let cut = body.collect().await.unwrap_err();
    assert_eq!(rendered(&cut), Some((504, None)));

    // Found through a wrapper's `source()`; the dependency's own errors are not ours.
    #[derive(Debug)]
    struct Wrapped(BoxError);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("handler failed")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(self.0.as_ref())
        }
    }
    let wrapped: BoxError = Box::new(Wrapped(limited));
    assert_eq!(rendered(&wrapped), Some((429, ra("1"))));
    assert_eq!(rendered(&"connection reset".into()), None);
}

// ---- request keys ---------------------------------------------------------------------------

fn get(uri: &str) -> http::request::Builder {
    Request::get(uri)
}

fn key_of(k: &HttpKey, b: http::request::Builder) -> Option<tower_breakwater::http::RequestKey> {
    k.key(&b.body(()).unwrap())
}

#[test]
fn unsafe_methods_never_get_a_key_whatever_the_allow_list() {
    let all_safe = HttpKey::new().methods([
        SafeMethod::Get,
        SafeMethod::Head,
        SafeMethod::Options,
        SafeMethod::Trace,
    ]);
    let purge = Method::from_bytes(b"PURGE").unwrap();
    for k in [HttpKey::new(), all_safe.clone()] {
        for m in [
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
            Method::CONNECT,
            purge.clone(),
        ] {
            let req = Request::builder()
                .method(m.clone())
                .uri("https://risk.example/m/1")
                .body(())
                .unwrap();
            assert!(k.key(&req).is_none(), "{m}");
            assert!(!k.allows(&m), "{m}");
        }
    }
    let trace = Request::builder()
        .method(Method::TRACE)
        .uri("https://risk.example/m/1")
        .body(())
        .unwrap();
    assert!(
        HttpKey::new().key(&trace).is_none(),
        "not in the default list"
    );
    assert!(all_safe.key(&trace).is_some());
    let head = key_of(&HttpKey::new(), Request::head("https://risk.example/m/1"));
    let get = key_of(&HttpKey::new(), get("https://risk.example/m/1"));
    assert_ne!(
        head.unwrap(),
        get.unwrap(),
        "HEAD never shares GET's response"
    );
}

#[test]
fn keys_tell_uris_apart_the_way_http_compares_them() {
    let k = HttpKey::new();
    let key = |uri: &str| key_of(&k, get(uri)).unwrap();
    // (two URIs, how many keys they make, why)
    let table: [(&str, &str, usize, &str); 6] = [
        (
            "https://risk.example/m?a=1&b=2",
            "https://risk.example/m?b=2&a=1",
            2,
            "query order is kept: never shares wrongly, at worst shares less",
        ),
        (
            "https://risk.example/m/1",
            "HTTPS://RISK.EXAMPLE/m/1",
            1,
            "scheme and host compare case-insensitively, in Eq and in Hash",
        ),
        (
            "https://risk.example/m/1",
            "https://risk.example/M/1",
            2,
            "the path is case-sensitive",
        ),
        (
            "https://risk.example/m",
            "https://risk.example/m?",
            2,
            "an empty query is a query",
        ),
        (
            "https://risk.example",
            "https://risk.example/",
            1,
            "an empty path is `/`",
        ),
        (
            "https://alice@risk.example/m",
            "https://bob@risk.example/m",
            2,
            "user info is part of the authority",
        ),
    ];
    for (a, b, keys, why) in table {
        let set: HashSet<_> = [key(a), key(b)].into_iter().collect();
        assert_eq!(set.len(), keys, "{a} {b}: {why}");
    }

    // Absolute form versus origin form with `Host`: different keys (never mixed).
    let absolute = key("https://risk.example/m/1");
    let origin = key_of(&k, get("/m/1").header(HOST, "risk.example")).unwrap();
    assert_ne!(absolute, origin);
    assert_eq!(
        origin,
        key_of(&k, get("/m/1").header("HOST", "risk.example")).unwrap(),
        "header names are case-insensitive"
    );
    assert_ne!(
        origin,
        key_of(&k, get("/m/1")).unwrap(),
        "a missing Host is not any Host"
    );
}

#[test]
fn keyed_headers_by_name_case_value_case_and_repetition() {
    let k = HttpKey::new();
    let base = key_of(&k, get("https://r/x").header("Authorization", "Bearer a")).unwrap();
    let upper = HeaderName::from_bytes(b"AUTHORIZATION").unwrap();
    assert_eq!(
        base,
        key_of(&k, get("https://r/x").header(upper, "Bearer a")).unwrap()
    );
    assert_ne!(
        base,
        key_of(&k, get("https://r/x").header(AUTHORIZATION, "bearer a")).unwrap(),
        "values are compared exactly"
    );
    let twice = |name: HeaderName| {
        key_of(
            &k,
            get("https://r/x")
                .header(name.clone(), "a")
                .header(name, "b"),
        )
    };
    assert!(twice(AUTHORIZATION).is_none(), "two Authorization values");
    assert!(twice(ACCEPT).is_none(), "two Accept values");
    assert!(
        twice(HeaderName::from_static("x-trace")).is_some(),
        "repetition of a header outside the key does not matter"
    );
    let comma = key_of(&k, get("https://r/x").header(ACCEPT, "a, b")).unwrap();
    assert_ne!(
        comma,
        key_of(&k, get("https://r/x").header(ACCEPT, "a")).unwrap()
    );
}

/// Two callers of one coalescing layer, identified by their session cookies, fetching the
/// same URL at the same time: the second gets the first one's response.
#[tokio::test(start_paused = true)]
async fn requests_with_different_cookies_are_never_coalesced() {
    let keys = HttpKey::new();
    let layer = tower_breakwater::coalesce::CoalesceLayer::builder()
        .key(move |req: &Request<()>| keys.key(req))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|req: Request<()>| async move {
        tokio::time::sleep(ms(10)).await;
        let who = req.headers()[COOKIE].to_str().unwrap().to_owned();
        Ok::<_, BoxError>(Response::new(Bytes::from(who)))
    }));
    let alice = svc.clone().oneshot(
        get("https://shop.example/orders")
            .header(COOKIE, "sid=alice")
            .body(())
            .unwrap(),
    );
    let bob = svc.clone().oneshot(
        get("https://shop.example/orders")
            .header(COOKIE, "sid=bob")
            .body(())
            .unwrap(),
    );
    let (alice, bob) = tokio::join!(alice, bob);
    assert_eq!(
        (alice.unwrap().into_body(), bob.unwrap().into_body()),
        (Bytes::from("sid=alice"), Bytes::from("sid=bob")),
        "each caller gets their own orders"
    );
}

// ---- the cache with HttpKey and the storability rules ---------------------------------------

#[tokio::test(start_paused = true)]
async fn vary_star_and_vary_outside_the_key_are_never_served_from_the_cache() {
    // Vary value, keyed headers, stored?
    let cases: [(&[&'static str], bool, bool); 8] = [
        (&["*"], true, false),
        (&["Accept, *"], true, false),
        (&[" * "], true, false),
        (&["Accept", "*"], true, false),
        (&["accept"], true, true),
        (&["Accept,,Authorization"], true, true),
        (&["Accept"], false, false),
        (&["Accept-Language"], true, false),
    ];
    for (vary, default_headers, stored) in cases {
        let keys = if default_headers {
            HttpKey::new()
        } else {
            HttpKey::new().headers([])
        };
        let rules = keys.clone();
        let layer = tower_breakwater::cache::CacheLayer::builder()
            .key(move |req: &Request<()>| keys.key(req))
            .ttl_fn(move |res: &Response<Bytes>| {
                is_storable(res, &rules)
                    .then(|| tower_breakwater::http::max_age(res))
                    .flatten()
            })
            .classifier(HttpClassifier::new())
            .build()
            .unwrap();
        let calls = Count::default();
        let upstream = calls.clone();
        let svc = layer.layer(service_fn(move |_: Request<()>| {
            upstream.incr();
            let mut b = Response::builder().header(CACHE_CONTROL, "max-age=60");
            for v in vary {
                b = b.header(VARY, *v);
            }
            let res = b.body(Bytes::from("v")).unwrap();
            async move { Ok::<_, BoxError>(res) }
        }));
        for _ in 0..3 {
            let req = get("https://risk.example/m/1").header(ACCEPT, "application/json");
            let res = svc.clone().oneshot(req.body(()).unwrap()).await.unwrap();
            assert_eq!(res.into_body(), "v");
            advance(secs(1)).await;
        }
        let want = if stored { 1 } else { 3 };
        assert_eq!(
            calls.get(),
            want,
            "Vary {vary:?}, default headers {default_headers}"
        );
    }
}

#[test]
fn set_cookie_and_no_store_are_never_storable_whatever_else_the_response_says() {
    let k = HttpKey::new();
    let res = |headers: &[(HeaderName, &'static str)]| {
        let mut b = Response::builder();
        for (n, v) in headers {
            b = b.header(n, *v);
        }
        b.body(()).unwrap()
    };
    let public = (CACHE_CONTROL, "public, max-age=60");
    assert!(is_storable(&res(std::slice::from_ref(&public)), &k));
    assert!(!is_storable(&res(&[public.clone(), (SET_COOKIE, "")]), &k));
    assert!(!is_storable(
        &res(&[(CACHE_CONTROL, "max-age=60"), (CACHE_CONTROL, "NO-STORE")]),
        &k
    ));
    assert!(!is_storable(
        &res(&[(CACHE_CONTROL, "max-age=60,no-store=\"x\"")]),
        &k
    ));
    assert!(!is_storable(
        &res(&[(CACHE_CONTROL, "s-maxage=60, private")]),
        &k
    ));
}

// ---- the deadline and a reader slower than the dependency -----------------------------------

/// The dependency sent the whole body at once; the caller reads one frame, works for 200 ms,
/// then reads on. The 100 ms whole-body deadline passed before the second read.
#[tokio::test(start_paused = true)]
async fn frames_read_after_the_deadline_are_cut_off() {
    let rec = TestRecorder::default();
    let up = Upstream::default();
    let svc = timeout(&rec).layer(up.service());
    let mut body = body_of(&svc, reply(200, Shape::Slow(&[(0, "a"), (0, "b")], false))).await;
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "a"
    );
    advance(ms(200)).await;
    let second = body.frame().await.unwrap();
    assert!(
        second
            .as_ref()
            .is_err_and(|e| kind(e) == ErrorKind::Timeout),
        "past the deadline: {second:?}"
    );
    assert_eq!(
        (to_calls(&rec, "success"), to_calls(&rec, "timeout")),
        (0, 1)
    );
}

// ---- allocations of the whole-body paths with a body that waits ----------------------------

/// A body of one frame that returns `Pending` once before it (waking itself at once), as a
/// socket read does.
struct Yielding(u8);

impl Body for Yielding {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0 += 1;
        match self.0 {
            1 => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            2 => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"frame"))))),
            _ => Poll::Ready(None),
        }
    }
}

/// Allocations per call of `calls` calls through `svc`, each body read to its end, after a
/// warm-up (the difference of two runs, as tests/allocations.rs measures).
fn allocs_per_call<S, B>(svc: S) -> u64
where
    S: Service<u32, Response = Response<B>, Error = BoxError> + Clone,
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    const CALLS: u64 = 500;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let run = |n: u64| {
        allocation_counter::measure(|| {
            rt.block_on(async {
                for _ in 0..n {
                    let mut s = svc.clone();
                    let res = s.ready().await.unwrap().call(1).await.unwrap();
                    let mut body = res.into_body();
                    while let Some(f) = body.frame().await {
                        f.unwrap();
                    }
                }
            })
        })
        .count_total
    };
    run(50);
    let once = run(CALLS);
    let twice = run(2 * CALLS);
    (twice.saturating_sub(once) as f64 / CALLS as f64).round() as u64
}

#[test]
fn whole_body_costs_with_a_body_that_waits() {
    let inner = service_fn(|_: u32| async {
        Ok::<_, std::convert::Infallible>(Response::new(Yielding(0)))
    });
    let rec = TestRecorder::default();
    let (bh, cb, to) = rec.install_while(|| {
        (
            BulkheadLayer::builder()
                .max_concurrent_calls(4)
                .whole_body()
                .build()
                .unwrap(),
            CircuitBreakerLayer::builder()
                .slow_call_rate_threshold(0.5)
                .classifier(HttpClassifier::new())
                .retry_after_hold(secs(60))
                .whole_body()
                .build()
                .unwrap(),
            TimeoutLayer::builder()
                .timeout(secs(1))
                .whole_body()
                .build()
                .unwrap(),
        )
    });
    let permits = bh.handle();
    let no_timer = ServiceBuilder::new()
        .layer(bh.clone())
        .layer(cb.clone())
        .service(inner);
    assert_eq!(allocs_per_call(no_timer), 0, "bulkhead and breaker");
    let with_timer = ServiceBuilder::new()
        .layer(bh)
        .layer(cb)
        .layer(to)
        .service(inner);
    assert_eq!(
        allocs_per_call(with_timer),
        1,
        "the timeout's timer, armed at the body's first Pending"
    );
    assert_eq!(permits.available(), 4);
}
