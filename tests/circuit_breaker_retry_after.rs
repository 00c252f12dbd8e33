//! Circuit breaker, Retry-After hold (`http` feature): a 429/503 response's `Retry-After`
//! keeps the breaker it opens Open until then, capped; on the paused clock, exact values.
#![cfg(all(feature = "circuit-breaker", feature = "http"))]

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::Response;
use http::header::RETRY_AFTER;
use support::{Count, TestRecorder};
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_breakwater::circuit_breaker::{
    CircuitBreakerBuilder, CircuitBreakerHandle, CircuitBreakerLayer, SlidingWindow, State,
};
use tower_breakwater::error::{self, ErrorKind, LayerKind};
use tower_breakwater::event::EventKind;
use tower_breakwater::http::{HttpClassifier, rejection_response};
use tower_breakwater::{BoxError, ConfigError};

const WAIT: Duration = Duration::from_secs(5);

/// What the upstream answers: a status, `Retry-After` values, after a delay.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    retry_after: Vec<String>,
    after: Duration,
}

fn reply(status: u16, retry_after: &[&str]) -> Reply {
    Reply {
        status,
        retry_after: retry_after.iter().map(|v| (*v).to_owned()).collect(),
        after: Duration::ZERO,
    }
}

fn ok() -> Reply {
    reply(200, &[])
}

/// An HTTP upstream answering each request as it says, counting the calls that reached it.
fn upstream(
    calls: Count,
) -> impl Service<Reply, Response = Response<()>, Error = BoxError, Future: Send> + Clone {
    service_fn(move |r: Reply| {
        calls.incr();
        async move {
            tokio::time::sleep(r.after).await;
            let mut b = Response::builder().status(r.status);
            for v in &r.retry_after {
                b = b.header(RETRY_AFTER, v.as_str());
            }
            Ok::<_, BoxError>(b.body(()).unwrap())
        }
    })
}

type Svc = tower_breakwater::circuit_breaker::CircuitBreaker<
    tower::util::BoxCloneSyncService<Reply, Response<()>, BoxError>,
    HttpClassifier,
>;

/// A breaker over [`upstream`] with the HTTP classifier, one probe per half-open period,
/// a wait of 5 s, and `hold` as the Retry-After hold's maximum (`None`: off).
struct Rig {
    svc: Svc,
    handle: CircuitBreakerHandle,
    calls: Count,
    events: Arc<Mutex<Vec<EventKind>>>,
    t0: Instant,
}

fn rig(window: SlidingWindow, hold: Option<Duration>) -> Rig {
    rig_with(window, hold, |b| b)
}

fn rig_with(
    window: SlidingWindow,
    hold: Option<Duration>,
    more: impl FnOnce(CircuitBreakerBuilder<HttpClassifier>) -> CircuitBreakerBuilder<HttpClassifier>,
) -> Rig {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let mut b = CircuitBreakerLayer::builder()
        .name("pay")
        .sliding_window(window)
        .wait_in_open(WAIT)
        .permitted_calls_in_half_open(1)
        .on_event(move |e| log.lock().unwrap().push(e.kind()))
        .classifier(HttpClassifier::new());
    if let Some(max) = hold {
        b = b.retry_after_hold(max);
    }
    let layer = more(b).build().unwrap();
    let calls = Count::default();
    let inner = tower::util::BoxCloneSyncService::new(upstream(calls.clone()));
    Rig {
        handle: layer.handle(),
        svc: ServiceBuilder::new().layer(layer).service(inner),
        calls,
        events,
        t0: Instant::now(),
    }
}

impl Rig {
    async fn call(&self, r: Reply) -> Result<Response<()>, BoxError> {
        self.svc.clone().oneshot(r).await
    }

    /// Advances the paused clock to `ms` after the rig was built.
    async fn at_ms(&self, ms: u64) {
        let to = self.t0 + Duration::from_millis(ms);
        advance(to - Instant::now()).await;
    }

    /// Calls at the current instant and returns the rejection's retry-after, or `None` when
    /// the call was admitted (it then reached the upstream, which answers 200).
    async fn rejected_for(&self) -> Option<Duration> {
        match self.call(ok()).await {
            Ok(_) => None,
            Err(e) => {
                let ours = error::find(e.as_ref()).expect("our rejection");
                assert_eq!(ours.kind(), ErrorKind::CircuitOpen);
                Some(
                    ours.retry_after()
                        .expect("a rejection in Open has a retry-after"),
                )
            }
        }
    }

    /// Starts a call answered with `r` after `after`, admitted now, before a trip.
    async fn admit_in_closed(
        &self,
        mut r: Reply,
        after: Duration,
    ) -> tokio::task::JoinHandle<Result<Response<()>, BoxError>> {
        r.after = after;
        let call = tokio::spawn(self.svc.clone().oneshot(r));
        tokio::task::yield_now().await; // the spawned call is admitted
        assert_eq!(self.handle.state(), State::Closed);
        call
    }

    fn hold_gauge(&self) -> Option<f64> {
        self.handle.snapshot().gauge("retry_after_hold_seconds")
    }

    fn events(&self) -> Vec<EventKind> {
        self.events.lock().unwrap().clone()
    }

    /// The holds announced by `HeldOpen` events, in order.
    fn holds(&self) -> Vec<Duration> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                EventKind::HeldOpen { hold } => Some(hold),
                _ => None,
            })
            .collect()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn transition(from: &'static str, to: &'static str) -> EventKind {
    EventKind::StateTransition { from, to }
}

fn rejection() -> impl Fn(&EventKind) -> bool {
    |e| matches!(e, EventKind::Rejected { .. })
}

/// The breaker is probed exactly at `probe_ms`: rejected 1 ms before with 1 ms left, and the
/// call at `probe_ms` reaches the upstream.
async fn probed_exactly_at(r: &Rig, probe_ms: u64) {
    let before = r.calls.get();
    r.at_ms(probe_ms - 1).await;
    assert_eq!(r.rejected_for().await, Some(ms(1)), "1 ms before the probe");
    assert_eq!(
        r.calls.get(),
        before,
        "rejected calls never reach the upstream"
    );
    r.at_ms(probe_ms).await;
    assert_eq!(r.handle.state(), State::HalfOpen);
    assert_eq!(r.rejected_for().await, None, "the probe is admitted");
    assert_eq!(r.calls.get(), before + 1);
    assert_eq!(r.handle.state(), State::Closed, "the probe succeeded");
}

#[tokio::test(start_paused = true)]
async fn a_503_with_retry_after_30s_that_opens_it_holds_it_open_30s_not_the_5s_wait() {
    let r = rig(SlidingWindow::consecutive_failures(1), Some(secs(120)));
    assert_eq!(r.hold_gauge(), Some(0.0));
    let res = r.call(reply(503, &["30"])).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(r.handle.state(), State::Open);
    assert_eq!(r.rejected_for().await, Some(secs(30)));
    assert_eq!(r.hold_gauge(), Some(30.0));

    r.at_ms(5_000).await;
    assert_eq!(r.handle.state(), State::Open, "held past the 5 s wait");
    assert_eq!(r.rejected_for().await, Some(secs(25)));
    assert_eq!(r.hold_gauge(), Some(25.0));
    assert_eq!(r.calls.get(), 1);

    probed_exactly_at(&r, 30_000).await;
    assert_eq!(r.hold_gauge(), Some(0.0));
    let events: Vec<_> = r.events().into_iter().filter(|e| !rejection()(e)).collect();
    assert_eq!(
        events,
        [
            transition("closed", "open"),
            EventKind::HeldOpen { hold: secs(30) },
            transition("open", "half_open"),
            transition("half_open", "closed"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_20s_completing_a_failing_window_holds_it_20s() {
    let r = rig_with(SlidingWindow::count_based(4), Some(secs(60)), |b| {
        b.minimum_calls(4).failure_rate_threshold(0.5)
    });
    for rep in [reply(500, &[]), ok(), ok()] {
        r.call(rep).await.unwrap();
    }
    assert_eq!(r.handle.state(), State::Closed);
    r.call(reply(429, &["20"])).await.unwrap();
    assert_eq!(r.handle.state(), State::Open, "2 failures of 4 trip it");
    assert_eq!(r.rejected_for().await, Some(secs(20)));
    r.at_ms(5_000).await;
    assert_eq!(r.handle.state(), State::Open);
    probed_exactly_at(&r, 20_000).await;
    assert_eq!(r.calls.get(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_on_a_closed_breaker_that_does_not_trip_leaves_it_closed() {
    let r = rig_with(SlidingWindow::count_based(4), Some(secs(3_600)), |b| {
        b.minimum_calls(4).failure_rate_threshold(0.5)
    });
    r.call(reply(429, &["3600"])).await.unwrap();
    assert_eq!(r.handle.state(), State::Closed);
    assert_eq!(
        r.rejected_for().await,
        None,
        "the next call is admitted at once"
    );
    assert_eq!(r.calls.get(), 2);
    assert_eq!(r.hold_gauge(), Some(0.0));
    // A later trip by responses without Retry-After waits only its own 5 s: the 429's delay
    // did not open the breaker, so it holds nothing.
    r.at_ms(1_000).await;
    r.call(reply(500, &[])).await.unwrap();
    r.call(reply(500, &[])).await.unwrap();
    assert_eq!(r.handle.state(), State::Open);
    assert_eq!(r.rejected_for().await, Some(WAIT));
    probed_exactly_at(&r, 6_000).await;
    assert_eq!(r.holds(), []);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_with_retry_after_reopens_it_for_the_delay() {
    let r = rig(SlidingWindow::consecutive_failures(1), Some(secs(120)));
    r.call(reply(500, &[])).await.unwrap();
    assert_eq!(r.rejected_for().await, Some(WAIT), "a plain 500: the wait");
    r.at_ms(5_000).await;
    r.call(reply(503, &["40"])).await.unwrap();
    assert_eq!(r.handle.state(), State::Open, "the probe failed");
    assert_eq!(r.rejected_for().await, Some(secs(40)));
    assert_eq!(r.calls.get(), 2);
    probed_exactly_at(&r, 45_000).await;
    let events: Vec<_> = r.events().into_iter().filter(|e| !rejection()(e)).collect();
    assert_eq!(
        events,
        [
            transition("closed", "open"),
            transition("open", "half_open"),
            transition("half_open", "open"),
            EventKind::HeldOpen { hold: secs(40) },
            transition("open", "half_open"),
            transition("half_open", "closed"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_answering_past_the_maximum_time_in_half_open_holds_the_reopening() {
    let r = rig_with(
        SlidingWindow::consecutive_failures(1),
        Some(secs(120)),
        |b| b.max_time_in_half_open(Some(secs(10))),
    );
    r.call(reply(500, &[])).await.unwrap();
    r.at_ms(5_000).await;
    let mut slow = reply(503, &["30"]);
    slow.after = secs(20);
    let probe = tokio::spawn(r.svc.clone().oneshot(slow));
    tokio::task::yield_now().await; // the probe is admitted at 5 s
    assert_eq!(r.handle.state(), State::HalfOpen);
    r.at_ms(25_000).await;
    assert_eq!(probe.await.unwrap().unwrap().status(), 503);
    assert_eq!(r.handle.state(), State::Open, "reopened by the late probe");
    assert_eq!(r.rejected_for().await, Some(secs(30)), "not the 5 s wait");
    assert_eq!(r.holds(), [secs(30)]);
    probed_exactly_at(&r, 55_000).await;
}

#[tokio::test(start_paused = true)]
async fn the_hold_is_capped_at_its_maximum() {
    let r = rig(SlidingWindow::consecutive_failures(1), Some(secs(60)));
    r.call(reply(503, &["31536000"])).await.unwrap(); // a year
    assert_eq!(r.rejected_for().await, Some(secs(60)));
    assert_eq!(r.hold_gauge(), Some(60.0));
    assert_eq!(r.holds(), [secs(60)]);
    probed_exactly_at(&r, 60_000).await;
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_shorter_than_the_wait_never_shortens_it() {
    // The second trip's wait is 5 s * 10 = 50 s, longer than the probe's 30 s.
    let r = rig_with(
        SlidingWindow::consecutive_failures(1),
        Some(secs(120)),
        |b| b.exponential_wait(10.0, secs(100)),
    );
    r.call(reply(503, &["2"])).await.unwrap();
    assert_eq!(r.rejected_for().await, Some(WAIT), "2 s < the 5 s wait");
    r.at_ms(5_000).await;
    r.call(reply(503, &["30"])).await.unwrap();
    assert_eq!(r.rejected_for().await, Some(secs(50)));
    assert_eq!(r.hold_gauge(), Some(0.0), "not held: the wait is longer");
    probed_exactly_at(&r, 55_000).await;
    assert_eq!(r.holds(), []);
}

#[tokio::test(start_paused = true)]
async fn a_late_503_from_a_call_admitted_before_the_trip_sets_no_hold() {
    let r = rig(SlidingWindow::consecutive_failures(1), Some(secs(120)));
    let late = r.admit_in_closed(reply(503, &["60"]), secs(2)).await;
    r.call(reply(500, &[])).await.unwrap();
    assert_eq!(r.handle.state(), State::Open);
    r.at_ms(2_000).await;
    assert_eq!(late.await.unwrap().unwrap().status(), 503);
    assert_eq!(r.rejected_for().await, Some(secs(3)), "still the 5 s wait");
    assert_eq!(r.hold_gauge(), Some(0.0));
    probed_exactly_at(&r, 5_000).await;
}

#[tokio::test(start_paused = true)]
async fn a_late_503_from_a_call_admitted_before_the_trip_does_not_extend_the_hold() {
    let r = rig(SlidingWindow::consecutive_failures(1), Some(secs(120)));
    let late = r.admit_in_closed(reply(503, &["100"]), secs(10)).await;
    r.call(reply(503, &["30"])).await.unwrap();
    assert_eq!(r.rejected_for().await, Some(secs(30)));
    r.at_ms(10_000).await;
    assert_eq!(late.await.unwrap().unwrap().status(), 503);
    assert_eq!(r.rejected_for().await, Some(secs(20)), "not 100 s");
    probed_exactly_at(&r, 30_000).await;
    assert_eq!(r.holds(), [secs(30)], "one hold, never extended");
}

#[tokio::test(start_paused = true)]
async fn with_the_option_off_retry_after_is_ignored() {
    let r = rig(SlidingWindow::consecutive_failures(1), None);
    r.call(reply(503, &["30"])).await.unwrap();
    assert_eq!(r.rejected_for().await, Some(WAIT));
    assert_eq!(r.hold_gauge(), None, "no hold gauge when off");
    probed_exactly_at(&r, 5_000).await;
    assert_eq!(r.holds(), []);
}

#[tokio::test(start_paused = true)]
async fn an_http_date_retry_after_holds_until_that_date() {
    let r = rig(SlidingWindow::consecutive_failures(1), Some(secs(600)));
    // HTTP-dates have whole seconds and the wall clock moves on between formatting and
    // parsing: the hold is in (119 s, 120 s] while that takes under a second.
    let date = httpdate::fmt_http_date(SystemTime::now() + secs(120));
    r.call(reply(503, &[&date])).await.unwrap();
    let hold = r.rejected_for().await.unwrap();
    assert!(hold > secs(119) && hold <= secs(120), "{hold:?}");
    assert_eq!(r.holds(), [hold]);
    r.at_ms(119_000).await;
    assert_eq!(
        r.handle.state(),
        State::Open,
        "a 5 s wait alone would have ended"
    );
    assert_eq!(r.calls.get(), 1);
    r.at_ms(120_000).await;
    assert_eq!(r.rejected_for().await, None, "the date has passed: probed");
    assert_eq!(r.calls.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_or_unqualified_retry_after_is_ignored() {
    let past = httpdate::fmt_http_date(SystemTime::now() - secs(3_600));
    let cases: Vec<Reply> = vec![
        reply(503, &["soon"]),
        reply(503, &["-30"]),
        reply(503, &["1.5"]),
        reply(503, &["30s"]),
        reply(503, &["Wed, 32 Oct 2099 07:30:00 GMT"]),
        reply(503, &["30", "40"]),
        reply(503, &[&past]),
        reply(500, &["30"]),
        reply(502, &["30"]),
    ];
    for case in cases {
        let r = rig(SlidingWindow::consecutive_failures(1), Some(secs(120)));
        r.call(case.clone()).await.unwrap();
        assert_eq!(r.handle.state(), State::Open, "{case:?}");
        assert_eq!(r.rejected_for().await, Some(WAIT), "{case:?}");
        assert_eq!(r.holds(), [], "{case:?}");
        probed_exactly_at(&r, 5_000).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_rejects_with_the_time_left_in_the_hold_as_retry_after() {
    let r = rig(SlidingWindow::consecutive_failures(1), Some(secs(120)));
    r.call(reply(429, &["30"])).await.unwrap();
    r.at_ms(10_500).await;
    let err = r.call(ok()).await.unwrap_err();
    let res: Response<()> = rejection_response(err.as_ref()).unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()[RETRY_AFTER], "20", "19.5 s left, rounded up");
}

#[tokio::test(start_paused = true)]
async fn a_hold_is_one_open_period_in_the_state_metrics() {
    let rec = TestRecorder::default();
    let r = rec.install_while(|| rig(SlidingWindow::consecutive_failures(1), Some(secs(120))));
    let name = ("name", "pay");
    let state = |s| rec.gauge("breakwater_circuit_breaker_state", &[name, ("state", s)]);
    let moved = |from, to| {
        rec.counter(
            "breakwater_circuit_breaker_transitions_total",
            &[name, ("from", from), ("to", to)],
        )
    };
    r.call(reply(503, &["30"])).await.unwrap();
    r.at_ms(29_999).await;
    assert_eq!(r.handle.state(), State::Open);
    assert_eq!(
        (state("closed"), state("open"), state("half_open")),
        (Some(0.0), Some(1.0), Some(0.0))
    );
    r.at_ms(30_000).await;
    assert_eq!(r.handle.state(), State::HalfOpen);
    assert_eq!(
        (state("closed"), state("open"), state("half_open")),
        (Some(0.0), Some(0.0), Some(1.0))
    );
    assert_eq!(moved("closed", "open"), Some(1));
    assert_eq!(moved("open", "half_open"), Some(1));
    r.handle.snapshot(); // brings the state-time counters up to date
    assert_eq!(
        rec.counter(
            "breakwater_circuit_breaker_state_milliseconds_total",
            &[name, ("state", "open")]
        ),
        Some(30_000)
    );
}

#[test]
fn invalid_hold_configurations_are_config_errors_naming_the_field() {
    let b = || {
        CircuitBreakerLayer::builder()
            .wait_in_open(WAIT)
            .classifier(HttpClassifier::new())
    };
    for bad in [Duration::ZERO, ms(4_999)] {
        let e: ConfigError = b().retry_after_hold(bad).build().unwrap_err();
        assert_eq!(e.layer(), LayerKind::CircuitBreaker);
        assert_eq!(e.field(), "retry_after_hold", "{bad:?}");
    }
    assert!(b().retry_after_hold(WAIT).build().is_ok());
    assert!(b().retry_after_hold(Duration::MAX).build().is_ok());
}

/// A classifier of one's own that reports a delay (and says so with `ReadsRetryAfter`) turns
/// the hold on for any response type; with one that does not, `.retry_after_hold(..)` does
/// not compile (the doc test of `retry_after_hold`).
#[tokio::test(start_paused = true)]
async fn a_classifier_of_ones_own_that_reports_a_delay_holds_the_breaker() {
    use tower_breakwater::classify::{Classify, DefaultClassifier, Outcome, ReadsRetryAfter};

    /// `Some(seconds)`: overloaded, come back after that long.
    #[derive(Clone)]
    struct Overload;
    impl Classify<Option<u64>> for Overload {
        fn classify(&self, r: Result<&Option<u64>, &BoxError>) -> Outcome {
            match r {
                Ok(Some(_)) => Outcome::Failure,
                Ok(None) => Outcome::Success,
                Err(e) => DefaultClassifier.classify_error(e),
            }
        }
        fn retry_after(&self, r: Result<&Option<u64>, &BoxError>) -> Option<Duration> {
            r.ok().copied().flatten().map(Duration::from_secs)
        }
    }
    impl ReadsRetryAfter for Overload {}

    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::consecutive_failures(1))
        .wait_in_open(WAIT)
        .classifier(Overload)
        .retry_after_hold(Duration::from_secs(60))
        .build()
        .unwrap();
    let handle = layer.handle();
    let calls = Count::default();
    let seen = calls.clone();
    let svc = layer.layer(service_fn(move |overloaded_for: Option<u64>| {
        seen.incr();
        async move { Ok::<_, BoxError>(overloaded_for) }
    }));
    assert_eq!(svc.clone().oneshot(Some(30)).await.unwrap(), Some(30));
    assert_eq!(handle.state(), State::Open);
    advance(Duration::from_secs(29)).await;
    let err = svc.clone().oneshot(None).await.unwrap_err();
    assert_eq!(
        error::find(&*err).map(|e| e.kind()),
        Some(ErrorKind::CircuitOpen)
    );
    assert_eq!(
        (handle.state(), calls.get()),
        (State::Open, 1),
        "held past the wait"
    );
    advance(Duration::from_secs(1)).await;
    assert_eq!(svc.clone().oneshot(None).await.unwrap(), None);
    assert_eq!(
        (handle.state(), calls.get()),
        (State::HalfOpen, 2),
        "the probe ran"
    );
}
