//! Circuit breaker: windows, thresholds, half-open probes, generations, cancellation,
//! metrics, events, handle, config — on the paused clock, with exact values.
#![cfg(feature = "circuit-breaker")]

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use support::{Count, DropGuard, TestRecorder};
use tokio::time::advance;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_breakwater::circuit_breaker::{
    CircuitBreaker, CircuitBreakerBuilder, CircuitBreakerLayer, SlidingWindow, State,
};
use tower_breakwater::error::{self, BreakwaterError, ErrorKind, LayerKind};
use tower_breakwater::event::EventKind;
use tower_breakwater::{BoxError, ConfigError};

/// What the inner service does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Do {
    /// Succeed at once.
    S,
    /// Fail at once.
    F,
    /// Return a rejection of an inner layer (ignored by the default classifier).
    I,
    /// Sleep this many milliseconds, then succeed.
    SlowS(u64),
    /// Sleep this many milliseconds, then fail.
    SlowF(u64),
    /// Panic inside the inner future.
    Panic,
}
use Do::*;

/// An inner service counting the calls that reached it, and the drops of its futures.
#[derive(Clone, Default)]
struct Inner {
    calls: Count,
    drops: Count,
}

impl Service<Do> for Inner {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, d: Do) -> Self::Future {
        self.calls.incr();
        let guard = DropGuard(self.drops.clone());
        Box::pin(async move {
            let _guard = guard;
            match d {
                S => Ok(()),
                F => Err("boom".into()),
                I => Err(Box::new(BreakwaterError::new(
                    ErrorKind::BulkheadFull,
                    LayerKind::Bulkhead,
                    "inner",
                )) as BoxError),
                SlowS(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(())
                }
                SlowF(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Err("slow boom".into())
                }
                Panic => panic!("inner panicked"),
            }
        })
    }
}

type Svc = CircuitBreaker<Inner, tower_breakwater::classify::DefaultClassifier>;

fn count_window(size: u64) -> CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count_based(size))
        .failure_rate_threshold(0.5)
        .wait_in_open(Duration::from_secs(10))
}

fn setup(b: CircuitBreakerBuilder) -> (CircuitBreakerLayer, Svc, Inner) {
    let layer = b.build().unwrap();
    let inner = Inner::default();
    let svc = layer.layer(inner.clone());
    (layer, svc, inner)
}

/// Runs `d` to completion through a clone of `svc`.
async fn run(svc: &Svc, d: Do) -> Result<(), BoxError> {
    svc.clone().oneshot(d).await
}

async fn run_all(svc: &Svc, ds: &[Do]) {
    for d in ds {
        let _ = run(svc, *d).await;
    }
}

fn open_error(r: Result<(), BoxError>) -> BreakwaterError {
    let err = r.expect_err("expected a rejection");
    let ours = error::find(err.as_ref()).expect("one of ours").clone();
    assert_eq!(ours.kind(), ErrorKind::CircuitOpen);
    assert_eq!(ours.layer(), LayerKind::CircuitBreaker);
    ours
}

/// Lets spawned tasks run.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

// ---- windows and thresholds ---------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn window_10_at_half_after_1000_successes_exactly_5_failures_open_it() {
    let (layer, svc, inner) = setup(count_window(10));
    let h = layer.handle();
    for _ in 0..1_000 {
        run(&svc, S).await.unwrap();
    }
    for i in 1..=4 {
        run(&svc, F).await.unwrap_err();
        assert_eq!(h.state(), State::Closed, "opened after {i} failures");
    }
    run(&svc, F).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
    assert_eq!(inner.calls.get(), 1_005);
    open_error(run(&svc, S).await);
    assert_eq!(
        inner.calls.get(),
        1_005,
        "an open breaker does not call inner"
    );
}

#[tokio::test(start_paused = true)]
async fn window_4_min_4_fffs_opens_on_the_success_and_fsss_does_not() {
    let (layer, svc, _) = setup(count_window(4).minimum_calls(4));
    let h = layer.handle();
    run_all(&svc, &[F, F, F]).await;
    assert_eq!(
        h.state(),
        State::Closed,
        "3 calls are below the minimum of 4"
    );
    run(&svc, S).await.unwrap();
    assert_eq!(
        h.state(),
        State::Open,
        "the 4th outcome, a success, opens it"
    );

    let (layer, svc, _) = setup(count_window(4).minimum_calls(4));
    run_all(&svc, &[F, S, S, S]).await;
    assert_eq!(layer.handle().state(), State::Closed);
    assert_eq!(layer.handle().snapshot().gauge("failure_rate"), Some(0.25));
}

#[tokio::test(start_paused = true)]
async fn minimum_calls_below_the_window_is_honoured_before_it_fills() {
    let (layer, svc, _) = setup(count_window(10).minimum_calls(4));
    let h = layer.handle();
    run_all(&svc, &[F, S, F]).await;
    assert_eq!(h.state(), State::Closed, "3 recorded < minimum 4");
    assert_eq!(h.snapshot().gauge("calls_in_window"), Some(3.0));
    run(&svc, S).await.unwrap();
    assert_eq!(
        h.state(),
        State::Open,
        "2 of 4 with the window not yet full"
    );
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_are_not_recorded() {
    let (layer, svc, _) = setup(count_window(2));
    let h = layer.handle();
    run_all(&svc, &[F, I, I, I]).await;
    assert_eq!(h.snapshot().gauge("calls_in_window"), Some(1.0));
    run(&svc, F).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn time_window_outcomes_older_than_the_window_stop_counting() {
    let time = |min| {
        setup(
            CircuitBreakerLayer::builder()
                .sliding_window(SlidingWindow::time_based(Duration::from_secs(10)))
                .minimum_calls(min),
        )
    };
    // A failure at t = 0 still counts at t = 9.999 s ...
    let (layer, svc, _) = time(2);
    run(&svc, F).await.unwrap_err();
    advance(Duration::from_millis(9_999)).await;
    assert_eq!(
        layer.handle().snapshot().gauge("calls_in_window"),
        Some(1.0)
    );
    run(&svc, F).await.unwrap_err();
    assert_eq!(layer.handle().state(), State::Open);

    // ... and no longer at t = 10 s.
    let (layer, svc, _) = time(2);
    let h = layer.handle();
    run(&svc, F).await.unwrap_err();
    advance(Duration::from_secs(10)).await;
    assert_eq!(h.snapshot().gauge("calls_in_window"), Some(0.0));
    run(&svc, F).await.unwrap_err();
    assert_eq!(h.state(), State::Closed, "the first failure slid out");
    assert_eq!(h.snapshot().gauge("calls_in_window"), Some(1.0));
    // Buckets of finer granularity slide sooner.
    let (layer, svc, _) = setup(CircuitBreakerLayer::builder().sliding_window(
        SlidingWindow::time_based_with_granularity(
            Duration::from_secs(1),
            Duration::from_millis(100),
        ),
    ));
    run(&svc, F).await.unwrap_err();
    advance(Duration::from_millis(999)).await;
    assert_eq!(
        layer.handle().snapshot().gauge("calls_in_window"),
        Some(1.0)
    );
    advance(Duration::from_millis(1)).await;
    assert_eq!(
        layer.handle().snapshot().gauge("calls_in_window"),
        Some(0.0)
    );
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_open_after_k_in_a_row() {
    let (layer, svc, _) = setup(
        CircuitBreakerLayer::builder().sliding_window(SlidingWindow::consecutive_failures(3)),
    );
    let h = layer.handle();
    run_all(&svc, &[F, F, S, F, F, I]).await;
    assert_eq!(h.state(), State::Closed, "the success ended the first run");
    run(&svc, F).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_breaker_even_when_they_succeed() {
    let (layer, svc, _) = setup(
        count_window(4)
            .slow_call_rate_threshold(0.75)
            .slow_call_duration(Duration::from_millis(100)),
    );
    let h = layer.handle();
    // Exactly the slow-call duration is not slow; longer is.
    run_all(&svc, &[SlowS(100), SlowS(101), SlowS(500)]).await;
    assert_eq!(h.state(), State::Closed);
    assert_eq!(h.snapshot().gauge("slow_call_rate"), Some(2.0 / 3.0));
    run(&svc, SlowS(200)).await.unwrap();
    assert_eq!(h.state(), State::Open, "3 slow of 4 = 0.75");
    assert_eq!(h.snapshot().gauge("failure_rate"), Some(0.0));
}

#[tokio::test(start_paused = true)]
async fn a_call_cancelled_after_the_slow_duration_is_recorded_as_slow_not_failed() {
    let rec = TestRecorder::default();
    let (layer, svc, inner) = rec.install_while(|| {
        setup(
            count_window(2)
                .name("hung")
                .slow_call_rate_threshold(1.0)
                .slow_call_duration(Duration::from_millis(100)),
        )
    });
    let h = layer.handle();
    // Cancelled before the slow-call duration: counts as nothing.
    let r = tokio::time::timeout(Duration::from_millis(50), run(&svc, SlowS(10_000))).await;
    assert!(r.is_err());
    assert_eq!(h.snapshot().gauge("calls_in_window"), Some(0.0));
    // Cancelled after it (an outer timeout at 150 ms): a slow call, not a failure.
    for _ in 0..2 {
        let r = tokio::time::timeout(Duration::from_millis(150), run(&svc, SlowS(10_000))).await;
        assert!(r.is_err());
    }
    assert_eq!(
        inner.drops.get(),
        3,
        "every cancelled inner future was dropped"
    );
    assert_eq!(h.state(), State::Open, "2 slow of 2 calls");
    let s = h.snapshot();
    assert_eq!(s.gauge("slow_call_rate"), Some(1.0));
    assert_eq!(s.gauge("failure_rate"), Some(0.0));
    let c = |o| {
        rec.counter(
            "breakwater_circuit_breaker_calls_total",
            &[("name", "hung"), ("outcome", o)],
        )
    };
    assert_eq!((c("success"), c("failure")), (Some(0), Some(0)));
    assert_eq!(
        rec.counter(
            "breakwater_circuit_breaker_slow_calls_total",
            &[("name", "hung")]
        ),
        Some(2)
    );
}

// ---- open ---------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn open_rejects_with_name_and_time_left_then_half_opens_lazily() {
    let (layer, svc, inner) = setup(count_window(2).name("ledger"));
    let h = layer.handle();
    run_all(&svc, &[F, F]).await;
    advance(Duration::from_millis(2_500)).await;
    let e = open_error(run(&svc, S).await);
    assert_eq!(e.name(), "ledger");
    assert_eq!(e.retry_after(), Some(Duration::from_millis(7_500)));
    advance(Duration::from_millis(7_499)).await;
    assert_eq!(
        open_error(run(&svc, S).await).retry_after(),
        Some(Duration::from_millis(1))
    );
    assert_eq!(inner.calls.get(), 2);
    advance(Duration::from_millis(1)).await;
    assert_eq!(
        h.state(),
        State::HalfOpen,
        "a state read applies the due transition"
    );
}

#[tokio::test(start_paused = true)]
async fn exponential_wait_grows_across_consecutive_trips_and_resets_on_close() {
    let (layer, svc, _) = setup(
        count_window(1)
            .wait_in_open(Duration::from_secs(1))
            .exponential_wait(2.0, Duration::from_secs(3))
            .permitted_calls_in_half_open(1),
    );
    let h = layer.handle();
    let retry_after = |r| open_error(r).retry_after().unwrap();
    run(&svc, F).await.unwrap_err();
    let mut wait = retry_after(run(&svc, S).await);
    assert_eq!(wait, Duration::from_secs(1));
    for expected in [2, 3, 3] {
        advance(wait).await;
        run(&svc, F).await.unwrap_err(); // the probe fails
        assert_eq!(h.state(), State::Open);
        wait = retry_after(run(&svc, S).await);
        assert_eq!(wait, Duration::from_secs(expected));
    }
    advance(wait).await;
    run(&svc, S).await.unwrap(); // the probe succeeds
    assert_eq!(h.state(), State::Closed);
    run(&svc, F).await.unwrap_err();
    assert_eq!(retry_after(run(&svc, S).await), Duration::from_secs(1));
}

// ---- half-open ----------------------------------------------------------------------------

async fn half_open(svc: &Svc, layer: &CircuitBreakerLayer) {
    run_all(svc, &[F, F]).await;
    assert_eq!(layer.handle().state(), State::Open);
    advance(Duration::from_secs(10)).await;
    assert_eq!(layer.handle().state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_n_probes_among_m_clones() {
    let (layer, svc, inner) = setup(count_window(2).permitted_calls_in_half_open(3));
    half_open(&svc, &layer).await;
    let before = inner.calls.get();
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(SlowS(1_000))))
        .collect();
    settle().await;
    assert_eq!(
        inner.calls.get() - before,
        3,
        "exactly N probes reached inner"
    );
    assert_eq!(
        layer.handle().snapshot().gauge("probes_in_flight"),
        Some(3.0)
    );
    advance(Duration::from_secs(1)).await;
    let mut rejected = 0;
    for t in tasks {
        if t.await.unwrap().is_err() {
            rejected += 1;
        }
    }
    assert_eq!(rejected, 7);
    assert_eq!(
        layer.handle().state(),
        State::Closed,
        "3 of 3 probes succeeded"
    );
}

#[tokio::test(start_paused = true)]
async fn half_open_decides_as_soon_as_the_result_is_certain() {
    // N = 4 at 50%: two failures reopen at once; three successes close at once.
    let (layer, svc, _) = setup(count_window(2).permitted_calls_in_half_open(4));
    let h = layer.handle();
    half_open(&svc, &layer).await;
    run_all(&svc, &[F, S]).await;
    assert_eq!(h.state(), State::HalfOpen);
    run(&svc, F).await.unwrap_err();
    assert_eq!(
        h.state(),
        State::Open,
        "2 of 4 failed: 50% whatever the rest do"
    );

    advance(Duration::from_secs(10)).await;
    run_all(&svc, &[S, F, S]).await;
    assert_eq!(
        h.state(),
        State::HalfOpen,
        "1 failure + 1 remaining could reach 50%"
    );
    run(&svc, S).await.unwrap();
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_frees_its_slot_at_once() {
    let (layer, svc, inner) = setup(count_window(2).permitted_calls_in_half_open(1));
    half_open(&svc, &layer).await;
    let mut probe = Box::pin(run(&svc, SlowS(60_000)));
    assert!(futures_poll_once(&mut probe).is_pending());
    let before = inner.calls.get();
    open_error(run(&svc, S).await); // the one slot is taken
    drop(probe);
    assert_eq!(
        inner.drops.get(),
        inner.calls.get(),
        "the inner future was dropped"
    );
    run(&svc, S).await.unwrap();
    assert_eq!(
        inner.calls.get(),
        before + 1,
        "the freed slot admitted the next call"
    );
    assert_eq!(layer.handle().state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_panics_frees_its_slot() {
    let (layer, svc, inner) = setup(count_window(2).permitted_calls_in_half_open(1));
    half_open(&svc, &layer).await;
    let before = inner.calls.get();
    let panicked = tokio::spawn(svc.clone().oneshot(Panic)).await;
    assert!(panicked.unwrap_err().is_panic());
    assert_eq!(layer.handle().state(), State::HalfOpen);
    run(&svc, S).await.unwrap();
    assert_eq!(inner.calls.get(), before + 2, "the next call got the slot");
    assert_eq!(layer.handle().state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn an_ignored_probe_outcome_frees_its_slot() {
    let (layer, svc, inner) = setup(count_window(2).permitted_calls_in_half_open(1));
    half_open(&svc, &layer).await;
    let before = inner.calls.get();
    run(&svc, I).await.unwrap_err();
    assert_eq!(layer.handle().state(), State::HalfOpen);
    run(&svc, F).await.unwrap_err();
    assert_eq!(inner.calls.get(), before + 2);
    assert_eq!(layer.handle().state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn the_maximum_time_in_half_open_reopens_it() {
    let (layer, svc, _) = setup(
        count_window(2)
            .permitted_calls_in_half_open(1)
            .max_time_in_half_open(Some(Duration::from_secs(5))),
    );
    let h = layer.handle();
    half_open(&svc, &layer).await;
    let hung = tokio::spawn(svc.clone().oneshot(SlowS(8_000)));
    settle().await;
    advance(Duration::from_millis(4_999)).await;
    assert_eq!(h.state(), State::HalfOpen);
    advance(Duration::from_millis(1)).await;
    assert_eq!(h.state(), State::Open, "the probe never decided within 5 s");
    // The hung probe finishes later, successfully: it belongs to the old period.
    advance(Duration::from_secs(3)).await;
    assert!(hung.await.unwrap().is_ok());
    assert_eq!(h.state(), State::Open);
    assert_eq!(
        open_error(run(&svc, S).await).retry_after(),
        Some(Duration::from_secs(7)),
        "the late success neither closed it nor changed the wait"
    );
}

fn futures_poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    Pin::new(f).poll(&mut cx)
}

// ---- generations --------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_late_failure_from_before_the_trip_causes_no_second_transition() {
    let rec = TestRecorder::default();
    let (layer, svc, _) = rec.install_while(|| setup(count_window(2).name("late")));
    let h = layer.handle();
    let late = tokio::spawn(svc.clone().oneshot(SlowF(3_000)));
    settle().await;
    run_all(&svc, &[F, F]).await;
    assert_eq!(h.state(), State::Open);
    advance(Duration::from_secs(3)).await;
    assert!(late.await.unwrap().is_err(), "the late call failed");
    let opened = rec.counter(
        "breakwater_circuit_breaker_transitions_total",
        &[("name", "late"), ("from", "closed"), ("to", "open")],
    );
    assert_eq!(opened, Some(1));
    assert_eq!(
        open_error(run(&svc, S).await).retry_after(),
        Some(Duration::from_secs(7)),
        "the open period was not extended"
    );
    assert_eq!(
        rec.counter(
            "breakwater_circuit_breaker_calls_total",
            &[("name", "late"), ("outcome", "failure")]
        ),
        Some(3),
        "the late failure still shows in calls by outcome"
    );
    advance(Duration::from_secs(7)).await;
    assert_eq!(h.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn a_late_outcome_does_not_count_as_a_probe() {
    let (layer, svc, _) = setup(count_window(2).permitted_calls_in_half_open(1));
    let h = layer.handle();
    let late = tokio::spawn(svc.clone().oneshot(SlowS(10_500)));
    settle().await;
    run_all(&svc, &[F, F]).await;
    advance(Duration::from_secs(10)).await;
    assert_eq!(h.state(), State::HalfOpen);
    let probe = tokio::spawn(svc.clone().oneshot(SlowF(1_000)));
    settle().await;
    advance(Duration::from_millis(500)).await;
    late.await.unwrap().unwrap();
    assert_eq!(
        h.state(),
        State::HalfOpen,
        "the late success is not a probe"
    );
    advance(Duration::from_millis(500)).await;
    probe.await.unwrap().unwrap_err();
    assert_eq!(h.state(), State::Open);
}

// ---- shared state, handle, events, metrics -------------------------------------------------

#[tokio::test(start_paused = true)]
async fn one_layer_applied_to_two_services_shares_one_state() {
    let layer = count_window(2).build().unwrap();
    let (a_inner, b_inner) = (Inner::default(), Inner::default());
    let a = ServiceBuilder::new()
        .layer(layer.clone())
        .service(a_inner.clone());
    let b = layer.layer(b_inner.clone());
    run(&a, F).await.unwrap_err();
    run(&b, F).await.unwrap_err();
    assert_eq!(layer.handle().state(), State::Open);
    open_error(run(&a, S).await);
    open_error(run(&b.clone(), S).await);
    assert_eq!((a_inner.calls.get(), b_inner.calls.get()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn handle_forces_open_disables_and_resets() {
    let (layer, svc, inner) = setup(count_window(2));
    let h = layer.handle();
    h.force_open();
    assert_eq!(h.state(), State::ForcedOpen);
    let e = open_error(run(&svc, S).await);
    assert_eq!(e.retry_after(), None);
    advance(Duration::from_secs(3_600)).await;
    assert_eq!(
        h.state(),
        State::ForcedOpen,
        "only the handle leaves ForcedOpen"
    );
    h.disable();
    run_all(&svc, &[F, F, F, F]).await;
    assert_eq!(h.state(), State::Disabled);
    assert_eq!(inner.calls.get(), 4);
    h.reset();
    assert_eq!(h.state(), State::Closed);
    run(&svc, F).await.unwrap_err();
    assert_eq!(h.state(), State::Closed, "reset started an empty window");
    run(&svc, F).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
    h.reset();
    run(&svc, S).await.unwrap();
    assert_eq!(h.snapshot().counter("rejected"), Some(1));
}

#[tokio::test(start_paused = true)]
async fn events_report_every_transition_with_state_names() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let (layer, svc, _) = setup(count_window(2).permitted_calls_in_half_open(1).on_event(
        move |e| {
            if let EventKind::StateTransition { from, to } = e.kind() {
                log.lock().unwrap().push((from, to));
            }
        },
    ));
    let h = layer.handle();
    half_open(&svc, &layer).await;
    run(&svc, S).await.unwrap();
    h.force_open();
    h.disable();
    h.reset();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
            ("closed", "forced_open"),
            ("forced_open", "disabled"),
            ("disabled", "closed"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn metrics_after_a_scripted_sequence_are_exact() {
    let rec = TestRecorder::default();
    let (layer, svc, _) = rec.install_while(|| {
        setup(
            count_window(4)
                .name("pay")
                .permitted_calls_in_half_open(1)
                .record_durations(true),
        )
    });
    let h = layer.handle();
    let name = ("name", "pay");
    let state = |s| rec.gauge("breakwater_circuit_breaker_state", &[name, ("state", s)]);
    let all_states = ["closed", "open", "half_open", "forced_open", "disabled"];
    let only = |current: &str| {
        for s in all_states {
            let expected = if s == current { 1.0 } else { 0.0 };
            assert_eq!(state(s), Some(expected), "state {s} while {current}");
        }
    };
    only("closed");
    advance(Duration::from_millis(1_000)).await;
    run_all(&svc, &[S, SlowS(250), I, F]).await;
    assert_eq!(
        rec.gauge("breakwater_circuit_breaker_failure_rate", &[name]),
        Some(1.0 / 3.0)
    );
    run(&svc, F).await.unwrap_err(); // 2 of 4: opens
    only("open");
    open_error(run(&svc, S).await);
    open_error(run(&svc, S).await);
    advance(Duration::from_secs(10)).await;
    run(&svc, SlowS(100)).await.unwrap(); // the probe closes it
    only("closed");
    advance(Duration::from_millis(2_000)).await;
    let snap = h.snapshot();
    assert_eq!(snap.state, Some("closed"));
    assert_eq!(snap.gauge("time_in_state_seconds"), Some(2.0));

    let calls = |o| {
        rec.counter(
            "breakwater_circuit_breaker_calls_total",
            &[name, ("outcome", o)],
        )
    };
    assert_eq!(calls("success"), Some(3));
    assert_eq!(calls("failure"), Some(2));
    assert_eq!(calls("ignored"), Some(1));
    assert_eq!(calls("rejected"), Some(2));
    let tr = |f, t| {
        rec.counter(
            "breakwater_circuit_breaker_transitions_total",
            &[name, ("from", f), ("to", t)],
        )
    };
    assert_eq!(tr("closed", "open"), Some(1));
    assert_eq!(tr("open", "half_open"), Some(1));
    assert_eq!(tr("half_open", "closed"), Some(1));
    assert_eq!(tr("half_open", "open"), Some(0));
    let ms = |s| {
        rec.counter(
            "breakwater_circuit_breaker_state_milliseconds_total",
            &[name, ("state", s)],
        )
    };
    assert_eq!(ms("closed"), Some(1_250 + 2_000));
    assert_eq!(ms("open"), Some(10_000));
    assert_eq!(ms("half_open"), Some(100));
    assert_eq!(ms("forced_open"), Some(0));
    assert_eq!(
        rec.gauge("breakwater_circuit_breaker_failure_rate", &[name]),
        Some(0.0)
    );
    let hist = |o| {
        rec.histogram(
            "breakwater_circuit_breaker_call_duration_seconds",
            &[name, ("outcome", o)],
        )
        .unwrap()
    };
    assert_eq!(hist("success"), vec![0.0, 0.25, 0.1]);
    assert_eq!(hist("failure"), vec![0.0, 0.0]);
    assert_eq!(
        rec.counter("breakwater_circuit_breaker_slow_calls_total", &[name]),
        Some(0),
        "slow-call detection is off"
    );
}

#[test]
fn invalid_configurations_are_config_errors_naming_the_field() {
    let field = |b: CircuitBreakerBuilder| -> &'static str {
        let e: ConfigError = b.build().unwrap_err();
        assert_eq!(e.layer(), LayerKind::CircuitBreaker);
        e.field()
    };
    let b = CircuitBreakerLayer::builder;
    for bad in [0.0, -0.1, 1.01, f64::NAN] {
        assert_eq!(
            field(b().failure_rate_threshold(bad)),
            "failure_rate_threshold"
        );
        assert_eq!(
            field(b().slow_call_rate_threshold(bad)),
            "slow_call_rate_threshold"
        );
    }
    assert!(b().failure_rate_threshold(1.0).build().is_ok());
    assert_eq!(
        field(b().sliding_window(SlidingWindow::count_based(0))),
        "sliding_window"
    );
    assert_eq!(
        field(b().sliding_window(SlidingWindow::time_based(Duration::ZERO))),
        "sliding_window"
    );
    assert_eq!(
        field(
            b().sliding_window(SlidingWindow::time_based_with_granularity(
                Duration::from_secs(10),
                Duration::from_secs(3)
            ))
        ),
        "sliding_window"
    );
    assert_eq!(
        field(b().sliding_window(SlidingWindow::consecutive_failures(0))),
        "sliding_window"
    );
    assert_eq!(
        field(b().permitted_calls_in_half_open(0)),
        "permitted_calls_in_half_open"
    );
    assert_eq!(field(b().minimum_calls(0)), "minimum_calls");
    assert_eq!(
        field(
            b().sliding_window(SlidingWindow::count_based(10))
                .minimum_calls(11)
        ),
        "minimum_calls"
    );
    assert_eq!(
        field(
            b().sliding_window(SlidingWindow::consecutive_failures(3))
                .minimum_calls(2)
        ),
        "minimum_calls"
    );
    assert_eq!(field(b().wait_in_open(Duration::ZERO)), "wait_in_open");
    assert_eq!(
        field(b().exponential_wait(0.5, Duration::from_secs(600))),
        "exponential_wait"
    );
    assert_eq!(
        field(b().exponential_wait(2.0, Duration::from_secs(1))),
        "exponential_wait"
    );
    assert_eq!(
        field(b().max_time_in_half_open(Some(Duration::ZERO))),
        "max_time_in_half_open"
    );
    assert_eq!(field(b().name("")), "name");
}

// ---- real runtime -------------------------------------------------------------------------

#[test]
fn many_threads_share_one_breaker_and_every_call_is_counted() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let rec = TestRecorder::default();
    let (layer, svc, inner) = rec.install_while(|| setup(count_window(100).name("mt")));
    rt.block_on(async {
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    for i in 0..5_000u32 {
                        let d = if (i + t) % 10 == 0 { F } else { S };
                        let _ = svc.clone().oneshot(d).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(inner.calls.get(), 20_000);
    assert_eq!(layer.handle().state(), State::Closed);
    let calls = |o| {
        rec.counter(
            "breakwater_circuit_breaker_calls_total",
            &[("name", "mt"), ("outcome", o)],
        )
    };
    assert_eq!(calls("success"), Some(18_000));
    assert_eq!(calls("failure"), Some(2_000));
    assert_eq!(calls("rejected"), Some(0));
}

/// An inner service whose futures never finish (a hung dependency).
#[derive(Clone, Default)]
struct Hang(Count);

impl Service<()> for Hang {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Pending<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        self.0.incr();
        std::future::pending()
    }
}

#[test]
fn many_threads_get_exactly_n_probes() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count_based(1))
        .permitted_calls_in_half_open(5)
        .wait_in_open(Duration::from_nanos(1))
        .build()
        .unwrap();
    let h = layer.handle();
    let hang = Hang::default();
    let svc = layer.layer(hang.clone());
    // Open it with one failure, through another service of the same layer.
    let failing = layer.layer(tower::service_fn(|()| async {
        Err::<(), BoxError>("boom".into())
    }));
    rt.block_on(failing.oneshot(())).unwrap_err();
    // The 1 ns wait has passed by the time the clock is next read.
    while h.state() != State::HalfOpen {}
    let admitted = rt.block_on(async {
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    let mut futs = Vec::new();
                    let mut rejected = 0;
                    for _ in 0..100 {
                        let mut f = Box::pin(svc.clone().oneshot(()));
                        match futures_poll_once(&mut f) {
                            Poll::Ready(Err(_)) => rejected += 1,
                            Poll::Ready(Ok(())) => unreachable!(),
                            Poll::Pending => futs.push(f),
                        }
                    }
                    (futs, rejected)
                })
            })
            .collect();
        // Every admitted future is kept alive until both tasks are done.
        let mut admitted = Vec::new();
        for t in tasks {
            let (futs, rejected) = t.await.unwrap();
            assert_eq!(futs.len() + rejected, 100);
            admitted.extend(futs);
        }
        admitted
    });
    assert_eq!(admitted.len(), 5);
    assert_eq!(h.snapshot().gauge("probes_in_flight"), Some(5.0));
    drop(admitted); // dropping the probes frees their slots
    assert_eq!(hang.0.get(), 5);
    assert_eq!(h.state(), State::HalfOpen);
    assert_eq!(h.snapshot().gauge("probes_in_flight"), Some(0.0));
}

#[tokio::test(start_paused = true)]
async fn cancelled_calls_count_as_neither_without_slow_call_detection() {
    let (layer, svc, inner) = setup(count_window(2));
    for _ in 0..3 {
        let r = tokio::time::timeout(Duration::from_secs(1), run(&svc, SlowF(5_000))).await;
        assert!(r.is_err());
    }
    assert_eq!(inner.drops.get(), 3);
    let s = layer.handle().snapshot();
    assert_eq!(s.state, Some("closed"));
    assert_eq!(s.gauge("calls_in_window"), Some(0.0));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_breaker_is_freed_as_soon_as_its_last_owner_is_dropped() {
    let freed = Count::default();
    let guard = DropGuard(freed.clone());
    let (layer, svc, _) = setup(count_window(2).on_event(move |_| {
        let _ = &guard;
    }));
    run(&svc, S).await.unwrap(); // parks a spare reference on this thread
    let h = layer.handle();
    drop((layer, svc));
    assert_eq!(freed.get(), 0, "the handle still owns it");
    drop(h);
    assert_eq!(freed.get(), 1, "the spare reference did not keep it alive");
}

#[tokio::test(start_paused = true)]
async fn an_in_flight_call_keeps_a_dropped_breaker_until_it_finishes_then_frees_it() {
    let freed = Count::default();
    let guard = DropGuard(freed.clone());
    let (layer, svc, _) = setup(count_window(2).on_event(move |_| {
        let _ = &guard;
    }));
    run(&svc, S).await.unwrap();
    let call = tokio::spawn(svc.clone().oneshot(SlowF(100)));
    settle().await;
    drop((layer, svc));
    assert_eq!(freed.get(), 0, "the call in flight still needs it");
    advance(Duration::from_millis(100)).await;
    assert!(call.await.unwrap().is_err());
    assert_eq!(freed.get(), 1, "freed when the last call finished");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_breaker_leaves_the_registry_once_its_layer_and_services_are_gone() {
    let registry = tower_breakwater::registry::Registry::new();
    let (layer, svc, _) = setup(count_window(2).name("gone").registry(&registry));
    run_all(&svc, &[S, F, S]).await; // calls served on this thread
    assert_eq!(registry.snapshot().len(), 1);
    drop((layer, svc));
    assert!(registry.snapshot().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_event_channel_closes_once_the_layer_and_services_are_dropped() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (layer, svc, _) = setup(count_window(2).on_event(move |e| {
        if let EventKind::StateTransition { from, to } = e.kind() {
            let _ = tx.send((from, to));
        }
    }));
    run_all(&svc, &[F, F]).await;
    open_error(run(&svc, S).await);
    drop((layer, svc));
    let mut got = Vec::new();
    let drained = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(e) = rx.recv().await {
            got.push(e);
        }
    })
    .await;
    assert!(drained.is_ok(), "the sender outlived the breaker");
    assert_eq!(got, vec![("closed", "open")]);
}

#[tokio::test(start_paused = true)]
async fn a_spare_reference_on_another_thread_is_freed_at_its_next_call() {
    // The breaker served its last call on a worker thread, then is dropped here.
    let freed = Count::default();
    let guard = DropGuard(freed.clone());
    let (layer, svc, _) = setup(count_window(2).on_event(move |_| {
        let _ = &guard;
    }));
    let (other_layer, other_svc, _) = setup(count_window(2));
    let (to_worker, from_main) = std::sync::mpsc::channel::<Option<Svc>>();
    let (done, finished) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        while let Ok(next) = from_main.recv() {
            if let Some(svc) = next {
                rt.block_on(svc.oneshot(S)).unwrap();
            }
            done.send(()).unwrap();
        }
    });
    to_worker.send(Some(svc)).unwrap(); // parks a spare on the worker
    finished.recv().unwrap();
    drop(layer);
    assert_eq!(freed.get(), 0, "parked on the worker");
    to_worker.send(Some(other_svc)).unwrap(); // any finished call there sweeps it
    finished.recv().unwrap();
    assert_eq!(freed.get(), 1);
    drop((to_worker, other_layer));
    worker.join().unwrap();
}

// ---- maximum time in half-open -------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_half_open_period_without_probes_never_expires_into_open() {
    let rec = TestRecorder::default();
    let (layer, svc, inner) = rec.install_while(|| {
        setup(
            count_window(2)
                .name("idle")
                .permitted_calls_in_half_open(1)
                .exponential_wait(2.0, Duration::from_secs(3_600)),
        )
    });
    let h = layer.handle();
    half_open(&svc, &layer).await;
    // An hour without traffic, scraped every 15 s (max time in HalfOpen: 60 s).
    for _ in 0..240 {
        advance(Duration::from_secs(15)).await;
        assert_eq!(h.snapshot().state, Some("half_open"));
        assert_eq!(h.state(), State::HalfOpen);
    }
    let tr = |f, t| {
        rec.counter(
            "breakwater_circuit_breaker_transitions_total",
            &[("name", "idle"), ("from", f), ("to", t)],
        )
    };
    assert_eq!(tr("half_open", "open"), Some(0));
    run(&svc, S)
        .await
        .expect("the probe reaches the inner service");
    assert_eq!(inner.calls.get(), 3);
    assert_eq!(h.state(), State::Closed);
    assert_eq!(tr("half_open", "closed"), Some(1));
    assert_eq!(tr("half_open", "open"), Some(0));
}

#[tokio::test(start_paused = true)]
async fn an_idle_half_open_period_counts_no_trip_for_the_exponential_wait() {
    let (layer, svc, _) = setup(
        count_window(2)
            .permitted_calls_in_half_open(1)
            .exponential_wait(2.0, Duration::from_secs(3_600)),
    );
    half_open(&svc, &layer).await;
    advance(Duration::from_secs(600)).await;
    assert_eq!(layer.handle().state(), State::HalfOpen);
    run(&svc, F).await.unwrap_err(); // the probe fails: the second trip
    assert_eq!(
        open_error(run(&svc, S).await).retry_after(),
        Some(Duration::from_secs(20))
    );
}

#[tokio::test(start_paused = true)]
async fn the_maximum_time_in_half_open_counts_from_the_first_probe() {
    let (layer, svc, inner) = setup(
        count_window(2)
            .permitted_calls_in_half_open(2)
            .max_time_in_half_open(Some(Duration::from_secs(5))),
    );
    let h = layer.handle();
    half_open(&svc, &layer).await;
    advance(Duration::from_secs(30)).await; // idle: no clock runs yet
    assert_eq!(h.state(), State::HalfOpen);
    let hung = tokio::spawn(svc.clone().oneshot(SlowS(8_000)));
    settle().await;
    advance(Duration::from_millis(4_999)).await;
    assert_eq!(h.state(), State::HalfOpen);
    run(&svc, S).await.unwrap(); // the second probe, within the time
    assert_eq!(h.state(), State::HalfOpen, "one probe still undecided");
    advance(Duration::from_millis(1)).await;
    assert_eq!(
        h.state(),
        State::Open,
        "the probes did not decide within 5 s"
    );
    assert_eq!(inner.calls.get(), 4);
    advance(Duration::from_secs(3)).await;
    assert!(hung.await.unwrap().is_ok());
    assert_eq!(h.state(), State::Open);
}

// ---- state time and retry-after -------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn state_time_carries_the_sub_millisecond_remainder_across_periods() {
    let rec = TestRecorder::default();
    let (layer, _svc, _) = rec.install_while(|| setup(count_window(2).name("t")));
    let h = layer.handle();
    for _ in 0..100 {
        advance(Duration::from_micros(1_500)).await;
        h.force_open();
        advance(Duration::from_micros(1_500)).await;
        h.reset();
    }
    let ms = |s| {
        rec.counter(
            "breakwater_circuit_breaker_state_milliseconds_total",
            &[("name", "t"), ("state", s)],
        )
        .unwrap()
    };
    assert_eq!(ms("closed"), 150);
    assert_eq!(ms("forced_open"), 150);
    assert_eq!(ms("closed") + ms("forced_open"), 300);
    advance(Duration::from_micros(700)).await;
    h.snapshot();
    assert_eq!(ms("closed"), 150, "0.7 ms is not a whole millisecond yet");
    advance(Duration::from_micros(300)).await;
    h.snapshot();
    assert_eq!(ms("closed"), 151);
}

#[tokio::test(start_paused = true)]
async fn an_effectively_infinite_wait_has_no_retry_after_on_either_path() {
    for wait in [Duration::MAX, Duration::from_secs(600 * 365 * 86_400)] {
        let (layer, svc, _) = setup(count_window(2).wait_in_open(wait));
        run_all(&svc, &[F, F]).await;
        assert_eq!(open_error(run(&svc, S).await).retry_after(), None);
        advance(Duration::from_secs(86_400)).await;
        assert_eq!(layer.handle().state(), State::Open);
        assert_eq!(open_error(run(&svc, S).await).retry_after(), None);
    }
}
