//! Bulkhead layer: admission in `call`, load shedding, FIFO waiting with a maximum wait,
//! release at completion or drop, panics, gauges, metrics, shared state, config.
#![cfg(feature = "bulkhead")]

mod support;

use std::future::{Future, pending};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use support::{Count, DropGuard, TestRecorder};
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breakwater::bulkhead::{Bulkhead, BulkheadHandle, BulkheadLayer};
use tower_breakwater::error::{self, ErrorKind, LayerKind};
use tower_breakwater::event::EventKind;
use tower_breakwater::{BoxError, ConfigError};

const CALLS: &str = "breakwater_bulkhead_calls_total";
const IN_FLIGHT: &str = "breakwater_bulkhead_in_flight";
const AVAILABLE: &str = "breakwater_bulkhead_available_permits";
const MAX: &str = "breakwater_bulkhead_max_permits";
const WAITING: &str = "breakwater_bulkhead_waiting";
const WAIT: &str = "breakwater_bulkhead_wait_duration_seconds";

/// What the inner service does with a request.
#[derive(Clone, Copy, Debug)]
enum Job {
    /// Sleeps this many milliseconds, then answers `Ok(id)`.
    Sleep(u64),
    /// Sleeps this many milliseconds, then fails.
    Fail(u64),
    /// Panics when first polled.
    Panic,
    /// Never completes.
    Forever,
}

/// An inner service that records which requests reached it, in order, and counts the drops
/// of its futures.
#[derive(Clone, Default)]
struct Probe {
    calls: Count,
    drops: Count,
    order: Arc<Mutex<Vec<u32>>>,
}

type Inner = tower::util::BoxCloneSyncService<(u32, Job), u32, BoxError>;

/// The panics these tests cause on purpose (an inner service, a recorder, a listener, and
/// the future polled after one of those).
const EXPECTED_PANICS: [&str; 4] = [
    "inner panicked",
    "recorder panicked",
    "listener panicked",
    AFTER_PANIC,
];
const AFTER_PANIC: &str = "Bulkhead ResponseFuture polled after a panic";

/// Keeps the expected panics out of the test output; others print.
fn quiet_inner_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.payload().downcast_ref::<&str>();
            if !msg.is_some_and(|m| EXPECTED_PANICS.contains(m)) {
                default(info);
            }
        }));
    });
}

impl Probe {
    fn service(&self) -> Inner {
        quiet_inner_panics();
        let p = self.clone();
        tower::util::BoxCloneSyncService::new(service_fn(move |(id, job): (u32, Job)| {
            p.calls.incr();
            p.order.lock().unwrap().push(id);
            let guard = DropGuard(p.drops.clone());
            async move {
                let _guard = guard;
                match job {
                    Job::Sleep(0) => Ok(id),
                    Job::Fail(0) => Err("inner failure".into()),
                    Job::Sleep(ms) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok(id)
                    }
                    Job::Fail(ms) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Err::<u32, BoxError>("inner failure".into())
                    }
                    Job::Panic => panic!("inner panicked"),
                    Job::Forever => pending().await,
                }
            }
        }))
    }

    fn order(&self) -> Vec<u32> {
        self.order.lock().unwrap().clone()
    }
}

type Fut = Pin<Box<tower_breakwater::bulkhead::ResponseFuture<Inner, (u32, Job)>>>;

fn call(svc: &mut Bulkhead<Inner>, id: u32, job: Job) -> Fut {
    Box::pin(svc.call((id, job)))
}

fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    f.poll(&mut cx)
}

/// Lets spawned tasks run after a time advance.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

fn assert_bulkhead_full(err: &BoxError, name: &str) {
    let ours = error::find(err.as_ref()).expect("our error, not the inner one");
    assert_eq!(ours.kind(), ErrorKind::BulkheadFull);
    assert_eq!(ours.layer(), LayerKind::Bulkhead);
    assert_eq!(ours.name(), name);
}

fn counts(h: &BulkheadHandle) -> (u32, u32, u32) {
    (h.in_flight(), h.waiting(), h.available())
}

#[tokio::test(start_paused = true)]
async fn zero_wait_rejects_at_once_and_a_dropped_call_frees_its_permit_at_once() {
    let probe = Probe::default();
    let layer = BulkheadLayer::builder()
        .name("ledger")
        .max_concurrent_calls(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());
    let start = Instant::now();

    let mut first = call(&mut svc, 1, Job::Forever);
    assert!(poll_once(first.as_mut()).is_pending());
    assert_eq!((probe.calls.get(), counts(&h)), (1, (1, 0, 0)));

    // The permit was taken in `call`: a second call is rejected without reaching inner.
    let err = svc
        .ready()
        .await
        .unwrap()
        .call((2, Job::Sleep(0)))
        .await
        .unwrap_err();
    assert_bulkhead_full(&err, "ledger");
    assert_eq!(probe.calls.get(), 1);
    assert_eq!(err.to_string(), "bulkhead `ledger` is full");

    // Dropping the first call mid-flight drops the inner future and returns the permit.
    assert_eq!(probe.drops.get(), 0);
    drop(first);
    assert_eq!(probe.drops.get(), 1);
    assert_eq!(counts(&h), (0, 0, 1));

    // The next call is admitted with no time advance.
    let mut third = call(&mut svc, 3, Job::Forever);
    assert!(poll_once(third.as_mut()).is_pending());
    assert_eq!((probe.calls.get(), counts(&h)), (2, (1, 0, 0)));
    assert_eq!(Instant::now(), start);
    assert_eq!(h.snapshot().counter("rejected"), Some(1));
}

#[tokio::test(start_paused = true)]
async fn calls_failing_or_kept_alive_after_completion_release_exactly_one_permit_each() {
    let rec = TestRecorder::default();
    let probe = Probe::default();
    let layer = rec.install_while(|| BulkheadLayer::new(3).unwrap());
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());
    let gauge = |n| rec.gauge(n, &[("name", "default")]).unwrap();
    let mut kept = Vec::new();
    for round in 0..50u32 {
        let mut futs: Vec<Fut> = (0..3)
            .map(|i| {
                let job = if i % 2 == 0 {
                    Job::Fail(0)
                } else {
                    Job::Sleep(0)
                };
                call(&mut svc, round * 3 + i, job)
            })
            .collect();
        assert_eq!(counts(&h), (3, 0, 0));
        for (i, f) in futs.iter_mut().enumerate() {
            let done = poll_once(f.as_mut());
            assert_eq!(done.map(|r| r.is_ok()), Poll::Ready(i % 2 == 1));
            // Released at completion, while the finished future is still alive.
            assert_eq!(h.available(), i as u32 + 1);
            assert_eq!(gauge(AVAILABLE), f64::from(i as u32 + 1));
            assert_eq!(gauge(IN_FLIGHT), f64::from(2 - i as u32));
        }
        kept.extend(futs);
    }
    assert_eq!(kept.len(), 150);
    assert_eq!(counts(&h), (0, 0, 3));
    drop(kept); // dropping finished futures releases nothing more
    assert_eq!(counts(&h), (0, 0, 3));
    assert_eq!(
        (gauge(AVAILABLE), gauge(IN_FLIGHT), gauge(MAX)),
        (3.0, 0.0, 3.0)
    );
    // Never more than the maximum: three are admitted, the fourth is rejected.
    let mut held: Vec<Fut> = (0..3).map(|i| call(&mut svc, i, Job::Forever)).collect();
    let err = call(&mut svc, 9, Job::Sleep(0)).await.unwrap_err();
    assert_bulkhead_full(&err, "default");
    for f in &mut held {
        assert!(poll_once(f.as_mut()).is_pending());
    }
    assert_eq!(probe.calls.get(), 153);
    assert_eq!(
        rec.counter(CALLS, &[("name", "default"), ("outcome", "permitted")]),
        Some(153)
    );
    assert_eq!(
        rec.counter(CALLS, &[("name", "default"), ("outcome", "rejected")]),
        Some(1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_fails_at_its_max_wait_and_the_holders_permit_is_free_afterwards() {
    let probe = Probe::default();
    let layer = BulkheadLayer::builder()
        .name("kyc")
        .max_concurrent_calls(1)
        .max_wait(Duration::from_millis(100))
        .build()
        .unwrap();
    let h = layer.handle();
    let svc = layer.layer(probe.service());
    let start = Instant::now();
    let holder = tokio::spawn(svc.clone().oneshot((1, Job::Sleep(200))));
    settle().await;
    let waiter = tokio::spawn(svc.clone().oneshot((2, Job::Sleep(0))));
    settle().await;
    assert_eq!(counts(&h), (1, 1, 0));

    advance(Duration::from_millis(99)).await;
    settle().await;
    assert!(!waiter.is_finished());
    advance(Duration::from_millis(1)).await;
    settle().await;
    assert!(waiter.is_finished(), "the waiter gives up at 100 ms");
    let err = waiter.await.unwrap().unwrap_err();
    assert_bulkhead_full(&err, "kyc");
    assert_eq!(Instant::now() - start, Duration::from_millis(100));
    assert_eq!(counts(&h), (1, 0, 0));

    advance(Duration::from_millis(100)).await;
    settle().await;
    assert_eq!(holder.await.unwrap().unwrap(), 1);
    assert_eq!(
        counts(&h),
        (0, 0, 1),
        "the permit went back, not to the gone waiter"
    );
    // At 200 ms a new call is admitted at once.
    let mut svc = svc;
    let mut next = call(&mut svc, 3, Job::Forever);
    assert!(poll_once(next.as_mut()).is_pending());
    assert_eq!(Instant::now() - start, Duration::from_millis(200));
    assert_eq!(probe.order(), vec![1, 3]);
    assert_eq!(counts(&h), (1, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_permit_handed_over_at_the_deadline_is_used_and_never_lost() {
    for holder_first in [true, false] {
        let probe = Probe::default();
        let layer = BulkheadLayer::builder()
            .max_concurrent_calls(1)
            .max_wait(Duration::from_millis(100))
            .build()
            .unwrap();
        let h = layer.handle();
        let mut svc = layer.layer(probe.service());
        let mut holder = call(&mut svc, 1, Job::Sleep(100));
        let mut waiter = call(&mut svc, 2, Job::Sleep(0));
        assert!(poll_once(holder.as_mut()).is_pending());
        assert!(poll_once(waiter.as_mut()).is_pending());
        advance(Duration::from_millis(100)).await;
        // Both the holder's sleep and the waiter's deadline are due now.
        if holder_first {
            assert!(poll_once(holder.as_mut()).is_ready());
            assert_eq!(counts(&h), (1, 0, 0), "handed to the waiter");
            let r = poll_once(waiter.as_mut());
            assert_eq!(r.map(Result::unwrap), Poll::Ready(2), "the grant wins");
            assert_eq!(probe.order(), vec![1, 2]);
        } else {
            match poll_once(waiter.as_mut()) {
                Poll::Ready(Err(e)) => assert_bulkhead_full(&e, "default"),
                other => panic!("expected a rejection: {:?}", other.map(|r| r.is_ok())),
            }
            assert!(poll_once(holder.as_mut()).is_ready());
            assert_eq!(probe.order(), vec![1]);
        }
        assert_eq!(counts(&h), (0, 0, 1), "holder_first = {holder_first}");
    }
}

#[tokio::test(start_paused = true)]
async fn eight_holders_and_eight_timed_out_waiters_leave_eight_permits() {
    let probe = Probe::default();
    let layer = BulkheadLayer::builder()
        .max_concurrent_calls(8)
        .max_wait(Duration::from_millis(50))
        .build()
        .unwrap();
    let h = layer.handle();
    let svc = layer.layer(probe.service());
    let holders: Vec<_> = (0..8)
        .map(|i| tokio::spawn(svc.clone().oneshot((i, Job::Sleep(100)))))
        .collect();
    let waiters: Vec<_> = (8..16)
        .map(|i| tokio::spawn(svc.clone().oneshot((i, Job::Sleep(0)))))
        .collect();
    settle().await;
    assert_eq!(counts(&h), (8, 8, 0));
    advance(Duration::from_millis(50)).await;
    settle().await;
    for w in waiters {
        assert_bulkhead_full(&w.await.unwrap().unwrap_err(), "default");
    }
    assert_eq!(counts(&h), (8, 0, 0));
    advance(Duration::from_millis(50)).await;
    settle().await;
    for hd in holders {
        hd.await.unwrap().unwrap();
    }
    assert_eq!(counts(&h), (0, 0, 8));
    let mut svc = svc;
    let mut new: Vec<Fut> = (16..24).map(|i| call(&mut svc, i, Job::Forever)).collect();
    for f in &mut new {
        assert!(poll_once(f.as_mut()).is_pending());
    }
    assert_eq!(counts(&h), (8, 0, 0));
    assert_eq!(probe.calls.get(), 16, "8 holders + 8 new calls, no waiter");
    assert_eq!(h.snapshot().counter("rejected"), Some(8));
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_in_first_out_in_call_order() {
    let probe = Probe::default();
    let layer = BulkheadLayer::builder()
        .max_concurrent_calls(1)
        .max_wait(Duration::from_secs(10))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());
    let holder = call(&mut svc, 0, Job::Sleep(10));
    // Queued in call order, before anyone polls them.
    let a = call(&mut svc, 1, Job::Sleep(10));
    let b = call(&mut svc, 2, Job::Sleep(10));
    let c = call(&mut svc, 3, Job::Sleep(10));
    assert_eq!(counts(&h), (1, 3, 0));
    // Polled in reverse order: no effect on the order of service.
    let mut futs = [Some(c), Some(b), Some(a), Some(holder)];
    for _ in 0..8 {
        for _ in 0..2 {
            for slot in futs.iter_mut() {
                if let Some(f) = slot {
                    if poll_once(f.as_mut()).is_ready() {
                        *slot = None;
                    }
                }
            }
        }
        if h.waiting() > 0 {
            // A newcomer never overtakes the queue: it queues behind, then leaves.
            let mut late = call(&mut svc, 100, Job::Sleep(0));
            assert!(poll_once(late.as_mut()).is_pending());
        }
        advance(Duration::from_millis(10)).await;
    }
    assert!(futs.iter().all(Option::is_none));
    assert_eq!(probe.order(), vec![0, 1, 2, 3]);
    assert_eq!(counts(&h), (0, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn beyond_max_waiting_a_call_is_rejected_at_once() {
    let rec = TestRecorder::default();
    let probe = Probe::default();
    let layer = rec.install_while(|| {
        BulkheadLayer::builder()
            .name("q")
            .max_concurrent_calls(1)
            .max_wait(Duration::from_secs(1))
            .max_waiting(2)
            .build()
            .unwrap()
    });
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());
    let _holder = call(&mut svc, 0, Job::Forever);
    let _w1 = call(&mut svc, 1, Job::Sleep(0));
    let _w2 = call(&mut svc, 2, Job::Sleep(0));
    let start = Instant::now();
    let err = call(&mut svc, 3, Job::Sleep(0)).await.unwrap_err();
    assert_bulkhead_full(&err, "q");
    assert_eq!(Instant::now(), start, "rejected without waiting");
    assert_eq!(counts(&h), (1, 2, 0));
    assert_eq!(rec.gauge(WAITING, &[("name", "q")]), Some(2.0));
    assert_eq!(
        probe.calls.get(),
        1,
        "only the holder reached the inner service (in `call`, as it was ready)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_before_or_after_its_grant_never_keeps_a_permit() {
    let rec = TestRecorder::default();
    let probe = Probe::default();
    let layer = rec.install_while(|| {
        BulkheadLayer::builder()
            .max_concurrent_calls(1)
            .max_wait(Duration::from_secs(1))
            .build()
            .unwrap()
    });
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());
    let gauge = |n| rec.gauge(n, &[("name", "default")]).unwrap();
    let mut holder = call(&mut svc, 0, Job::Sleep(5));
    let dropped_early = call(&mut svc, 1, Job::Sleep(5));
    let granted = call(&mut svc, 2, Job::Sleep(5));
    let mut last = call(&mut svc, 3, Job::Sleep(5));
    assert_eq!(counts(&h), (1, 3, 0));
    drop(dropped_early);
    assert_eq!(counts(&h), (1, 2, 0));
    assert_eq!(gauge(WAITING), 2.0);

    // The holder completes: its permit is handed to `granted`, which is then dropped before
    // it ever ran: the permit moves on to `last`.
    assert!(poll_once(holder.as_mut()).is_pending());
    advance(Duration::from_millis(5)).await;
    assert!(poll_once(holder.as_mut()).is_ready());
    assert_eq!(counts(&h), (1, 1, 0));
    drop(granted);
    assert_eq!(counts(&h), (1, 0, 0));
    assert_eq!(
        (gauge(IN_FLIGHT), gauge(AVAILABLE), gauge(WAITING)),
        (1.0, 0.0, 0.0)
    );
    assert!(poll_once(last.as_mut()).is_pending());
    advance(Duration::from_millis(5)).await;
    assert_eq!(poll_once(last.as_mut()).map(Result::unwrap), Poll::Ready(3));
    assert_eq!(probe.order(), vec![0, 3]);
    assert_eq!(counts(&h), (0, 0, 1));
    assert_eq!(
        (gauge(IN_FLIGHT), gauge(AVAILABLE), gauge(WAITING)),
        (0.0, 1.0, 0.0)
    );
    assert_eq!(
        rec.counter(CALLS, &[("name", "default"), ("outcome", "permitted")]),
        Some(2),
        "dropped waiters are neither permitted nor rejected"
    );
    assert_eq!(
        rec.counter(CALLS, &[("name", "default"), ("outcome", "rejected")]),
        Some(0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_inner_future_returns_its_permit() {
    let probe = Probe::default();
    let layer = BulkheadLayer::new(1).unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());

    // In a spawned task: the runtime catches the panic and drops the task.
    let task = tokio::spawn(svc.clone().oneshot((1, Job::Panic)));
    assert!(task.await.unwrap_err().is_panic());
    assert_eq!(counts(&h), (0, 0, 1));

    // Caught around a poll, the future kept alive: the permit went back as it unwound.
    let mut fut = call(&mut svc, 2, Job::Panic);
    assert_eq!(h.available(), 0);
    let caught = catch_unwind(AssertUnwindSafe(|| poll_once(fut.as_mut())));
    assert!(caught.is_err());
    assert_eq!(counts(&h), (0, 0, 1));
    drop(fut);
    assert_eq!(counts(&h), (0, 0, 1), "released once, not again on drop");
    assert_eq!(probe.calls.get(), 2);
    assert_eq!(probe.drops.get(), 2);
}

/// A service whose readiness fails, or never comes.
#[derive(Clone)]
struct Unready {
    fail: bool,
}

impl Service<()> for Unready {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.fail {
            Poll::Ready(Err("not ready".into()))
        } else {
            Poll::Pending
        }
    }
    fn call(&mut self, _: ()) -> Self::Future {
        unreachable!("never ready")
    }
}

#[tokio::test(start_paused = true)]
async fn inner_readiness_is_driven_under_the_permit() {
    let layer = BulkheadLayer::new(1).unwrap();
    let h = layer.handle();
    // Our poll_ready is ready at once, even though the inner one never is.
    let mut svc = layer.layer(Unready { fail: false });
    let mut fut = Box::pin(svc.ready().await.unwrap().call(()));
    assert!(poll_once(fut.as_mut()).is_pending());
    assert_eq!(counts(&h), (1, 0, 0));
    drop(fut);
    assert_eq!(counts(&h), (0, 0, 1));
    // A readiness error returns the permit and passes the error through.
    let err = layer
        .layer(Unready { fail: true })
        .oneshot(())
        .await
        .unwrap_err();
    assert!(error::find(err.as_ref()).is_none());
    assert_eq!(err.to_string(), "not ready");
    assert_eq!(counts(&h), (0, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn metric_values_and_wait_durations_after_a_known_sequence_are_exact() {
    let rec = TestRecorder::default();
    let probe = Probe::default();
    let layer = rec.install_while(|| {
        BulkheadLayer::builder()
            .name("fx")
            .max_concurrent_calls(2)
            .max_wait(Duration::from_millis(100))
            .record_durations(true)
            .build()
            .unwrap()
    });
    let svc = layer.layer(probe.service());
    let mut names = rec.names();
    names.sort();
    assert_eq!(names, {
        let mut v = vec![AVAILABLE, CALLS, IN_FLIGHT, MAX, WAIT, WAITING];
        v.sort();
        v
    });
    let g = |n| rec.gauge(n, &[("name", "fx")]).unwrap();
    assert_eq!(
        (g(MAX), g(AVAILABLE), g(IN_FLIGHT), g(WAITING)),
        (2.0, 2.0, 0.0, 0.0)
    );
    // Two holders (30 ms, 300 ms); a waiter served after 30 ms (for 300 ms); a waiter
    // timed out at 100 ms.
    let a = tokio::spawn(svc.clone().oneshot((1, Job::Sleep(30))));
    let b = tokio::spawn(svc.clone().oneshot((2, Job::Sleep(300))));
    settle().await;
    let c = tokio::spawn(svc.clone().oneshot((3, Job::Sleep(300))));
    settle().await;
    let d = tokio::spawn(svc.clone().oneshot((4, Job::Sleep(10))));
    settle().await;
    assert_eq!((g(AVAILABLE), g(IN_FLIGHT), g(WAITING)), (0.0, 2.0, 2.0));
    advance(Duration::from_millis(30)).await;
    settle().await;
    assert_eq!(a.await.unwrap().unwrap(), 1);
    assert_eq!((g(AVAILABLE), g(IN_FLIGHT), g(WAITING)), (0.0, 2.0, 1.0));
    advance(Duration::from_millis(70)).await;
    settle().await;
    assert_bulkhead_full(&d.await.unwrap().unwrap_err(), "fx");
    assert_eq!((g(AVAILABLE), g(IN_FLIGHT), g(WAITING)), (0.0, 2.0, 0.0));
    advance(Duration::from_millis(200)).await;
    settle().await;
    assert_eq!(b.await.unwrap().unwrap(), 2);
    assert_eq!((g(AVAILABLE), g(IN_FLIGHT), g(WAITING)), (1.0, 1.0, 0.0));
    advance(Duration::from_millis(30)).await;
    assert_eq!(c.await.unwrap().unwrap(), 3);
    assert_eq!((g(AVAILABLE), g(IN_FLIGHT), g(WAITING)), (2.0, 0.0, 0.0));
    assert_eq!(probe.order(), vec![1, 2, 3]);
    let c = |o| rec.counter(CALLS, &[("name", "fx"), ("outcome", o)]);
    assert_eq!((c("permitted"), c("rejected")), (Some(3), Some(1)));
    assert_eq!(
        rec.histogram(WAIT, &[("name", "fx")]),
        Some(vec![0.03, 0.1])
    );
}

#[tokio::test(start_paused = true)]
async fn no_wait_histogram_unless_asked_for_and_nothing_with_profile_off() {
    let rec = TestRecorder::default();
    let layer = rec.install_while(|| BulkheadLayer::new(1).unwrap());
    assert!(!rec.names().contains(&WAIT.to_owned()));
    let off = rec.install_while(|| {
        BulkheadLayer::builder()
            .name("off")
            .max_concurrent_calls(1)
            .metrics_profile(tower_breakwater::metrics::MetricsProfile::Off)
            .build()
            .unwrap()
    });
    let probe = Probe::default();
    off.layer(probe.service())
        .oneshot((1, Job::Sleep(0)))
        .await
        .unwrap();
    assert_eq!(rec.gauge(MAX, &[("name", "off")]), None);
    drop(layer);
}

#[tokio::test(start_paused = true)]
async fn one_layer_applied_to_several_services_shares_one_bulkhead() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let layer = BulkheadLayer::builder()
        .name("shared")
        .max_concurrent_calls(2)
        .on_event(move |e| log.lock().unwrap().push((e.name().to_owned(), e.kind())))
        .build()
        .unwrap();
    let (pa, pb) = (Probe::default(), Probe::default());
    let mut a = layer.layer(pa.service());
    let mut b = layer.layer(pb.service());
    let mut b2 = b.clone();
    let _x = call(&mut a, 1, Job::Forever);
    let _y = call(&mut b, 2, Job::Forever);
    let err = call(&mut b2, 3, Job::Sleep(0)).await.unwrap_err();
    assert_bulkhead_full(&err, "shared");
    let err = call(&mut a, 4, Job::Sleep(0)).await.unwrap_err();
    assert_bulkhead_full(&err, "shared");
    assert_eq!(layer.clone().handle().in_flight(), 2);
    let rejected = EventKind::Rejected {
        kind: ErrorKind::BulkheadFull,
        retry_after: None,
    };
    assert_eq!(
        *events.lock().unwrap(),
        vec![
            ("shared".to_owned(), rejected),
            ("shared".to_owned(), rejected)
        ]
    );
    let snap = layer.handle().snapshot();
    assert_eq!(snap.layer, LayerKind::Bulkhead);
    assert_eq!(snap.name, "shared");
    assert_eq!(snap.gauge("in_flight"), Some(2.0));
    assert_eq!(snap.gauge("waiting"), Some(0.0));
    assert_eq!(snap.gauge("available"), Some(0.0));
    assert_eq!(snap.gauge("max_concurrent_calls"), Some(2.0));
    assert_eq!(snap.gauge("max_wait_seconds"), Some(0.0));
    assert_eq!(snap.counter("rejected"), Some(2));
}

/// A small deterministic generator (xorshift64*), so the sequence test needs no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// Random sequences of calls (succeeding, failing, panicking, never ending), polls, drops
/// and time advances: after every step the gauges equal the exact counts; no update ever
/// gives them a value outside `0..=max`; in the end every permit is back.
async fn random_sequences(max_wait: Duration, max_waiting: Option<usize>, seed: u64) {
    let rec = Tracking::default();
    let probe = Probe::default();
    let layer = rec.install_while(|| {
        let b = BulkheadLayer::builder()
            .max_concurrent_calls(3)
            .max_wait(max_wait);
        match max_waiting {
            Some(n) => b.max_waiting(n),
            None => b,
        }
        .build()
        .unwrap()
    });
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());
    let g = |n| rec.gauge(n, "default");
    let mut rng = Rng(seed);
    let mut live: Vec<Fut> = Vec::new();
    let mut finished: Vec<Fut> = Vec::new();
    let mut id = 0;
    for _ in 0..3_000 {
        match rng.below(10) {
            0..=2 => {
                id += 1;
                let job = match rng.below(16) {
                    0 => Job::Panic,
                    1 => Job::Forever,
                    2..=5 => Job::Fail(rng.below(4)),
                    _ => Job::Sleep(rng.below(6)),
                };
                live.push(call(&mut svc, id, job));
            }
            3..=5 if !live.is_empty() => {
                let i = rng.below(live.len() as u64) as usize;
                let r = catch_unwind(AssertUnwindSafe(|| poll_once(live[i].as_mut())));
                if !matches!(r, Ok(Poll::Pending)) {
                    let f = live.swap_remove(i);
                    if rng.below(2) == 0 {
                        finished.push(f); // completed and kept alive
                    }
                }
            }
            6 if !live.is_empty() => {
                let i = rng.below(live.len() as u64) as usize;
                drop(live.swap_remove(i));
            }
            7 => finished.clear(),
            _ => advance(Duration::from_millis(rng.below(4))).await,
        }
        let (in_flight, waiting, available) = counts(&h);
        assert_eq!(in_flight + available, 3);
        assert_eq!(g(IN_FLIGHT), f64::from(in_flight));
        assert_eq!(g(AVAILABLE), f64::from(available));
        assert_eq!(g(WAITING), f64::from(waiting));
        assert!(
            waiting == 0 || available == 0,
            "a permit free while callers queue"
        );
        if let Some(m) = max_waiting {
            assert!(waiting as usize <= m);
        }
    }
    drop(live);
    drop(finished);
    assert_eq!(counts(&h), (0, 0, 3));
    assert_eq!((g(IN_FLIGHT), g(AVAILABLE), g(WAITING)), (0.0, 3.0, 0.0));
    // Not only after each step: no update ever gave a gauge a value out of range.
    let max_waiting = max_waiting.map_or(u32::MAX, |m| u32::try_from(m).unwrap());
    rec.assert_in_range("default", 3, max_waiting);
    let c = |o| {
        rec.rec
            .counter(CALLS, &[("name", "default"), ("outcome", o)])
            .unwrap()
    };
    assert!(c("permitted") + c("rejected") <= id as u64);
    assert!(c("permitted") >= probe.calls.get());
    // The sequence exercised both admission and rejection.
    assert!(
        c("permitted") > 50 && c("rejected") > 10,
        "{} {}",
        c("permitted"),
        c("rejected")
    );
}

#[tokio::test(start_paused = true)]
async fn gauges_stay_exact_and_in_range_over_random_sequences_with_load_shedding() {
    for seed in 1..=4 {
        random_sequences(Duration::ZERO, None, seed).await;
    }
}

#[tokio::test(start_paused = true)]
async fn gauges_stay_exact_and_in_range_over_random_sequences_with_waiting() {
    for seed in 1..=4 {
        random_sequences(Duration::from_millis(5), None, seed).await;
        random_sequences(Duration::from_millis(3), Some(2), seed).await;
    }
}

#[test]
fn invalid_configuration_is_a_config_error_naming_the_field() {
    let err: ConfigError = BulkheadLayer::builder().build().unwrap_err();
    assert_eq!(
        (err.field(), err.value()),
        ("max_concurrent_calls", "<unset>")
    );
    assert_eq!(err.layer(), LayerKind::Bulkhead);
    let err = BulkheadLayer::new(0).unwrap_err();
    assert_eq!((err.field(), err.value()), ("max_concurrent_calls", "0"));
    assert_eq!(
        err.to_string(),
        "invalid bulkhead config for `default`: `max_concurrent_calls` = 0, expected a count in 1..=4294967295"
    );
    if let Ok(big) = usize::try_from(u64::from(u32::MAX) + 1) {
        assert_eq!(
            BulkheadLayer::new(big).unwrap_err().field(),
            "max_concurrent_calls"
        );
    }
    let err = BulkheadLayer::builder()
        .max_concurrent_calls(1)
        .max_waiting(4)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "max_waiting");
    let err = BulkheadLayer::builder()
        .max_concurrent_calls(1)
        .max_wait(Duration::from_millis(1))
        .max_waiting(0)
        .build()
        .unwrap_err();
    assert_eq!((err.field(), err.value()), ("max_waiting", "0"));
    let err = BulkheadLayer::builder()
        .name("")
        .max_concurrent_calls(1)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "name");
}

#[tokio::test(start_paused = true)]
async fn a_huge_max_wait_means_no_limit() {
    let probe = Probe::default();
    let layer = BulkheadLayer::builder()
        .max_concurrent_calls(1)
        .max_wait(Duration::MAX)
        .build()
        .unwrap();
    let svc = layer.layer(probe.service());
    let holder = tokio::spawn(svc.clone().oneshot((1, Job::Sleep(86_400_000))));
    settle().await;
    let waiter = tokio::spawn(svc.oneshot((2, Job::Sleep(0))));
    advance(Duration::from_millis(86_400_000)).await;
    settle().await;
    assert_eq!(holder.await.unwrap().unwrap(), 1);
    assert_eq!(waiter.await.unwrap().unwrap(), 2);
    assert_eq!(layer.handle().available(), 1);
}

/// Real runtime, two worker threads: several services from one layer, many tasks. Counts
/// only: concurrency at the inner service never exceeds the maximum, every call is either
/// permitted or rejected, the gauges (sampled by another thread throughout, and tracked on
/// every update) stay in range and end exact, and every permit is back at the end.
fn multi_thread_run(max_wait: Duration) -> (u64, u64, usize) {
    const MAX: usize = 4;
    const TASKS: u32 = 16;
    const CALLS_PER_TASK: u32 = 300;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let rec = Tracking::default();
    let layer = rec.install_while(|| {
        BulkheadLayer::builder()
            .name("mt")
            .max_concurrent_calls(MAX)
            .max_wait(max_wait)
            .build()
            .unwrap()
    });
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let reached = Count::default();
    let inner = {
        let (current, peak, reached) = (current.clone(), peak.clone(), reached.clone());
        service_fn(move |_: u32| {
            let (current, peak) = (current.clone(), peak.clone());
            reached.incr();
            async move {
                let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                current.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(())
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (rec, stop, sampling) = (rec.clone(), stop.clone(), sampling.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            loop {
                for n in [IN_FLIGHT, AVAILABLE] {
                    let v = rec.gauge(n, "mt");
                    assert!((0.0..=MAX as f64).contains(&v), "{n} = {v}");
                }
                samples += 1;
                sampling.store(true, Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) {
                    return samples;
                }
            }
        })
    };
    // The calls start once the sampler runs, so that it samples during them.
    while !sampling.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    rt.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                // A service per task, as a framework making one per connection would.
                let svc = layer.layer(inner.clone());
                tokio::spawn(async move {
                    let mut rejected = 0u64;
                    for i in 0..CALLS_PER_TASK {
                        match svc.clone().oneshot(t * CALLS_PER_TASK + i).await {
                            Ok(()) => {}
                            Err(e) => {
                                assert_bulkhead_full(&e, "mt");
                                rejected += 1;
                            }
                        }
                    }
                    rejected
                })
            })
            .collect();
        let mut rejected = 0;
        for t in tasks {
            rejected += t.await.unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        let total = u64::from(TASKS * CALLS_PER_TASK);
        assert_eq!(reached.get() + rejected, total);
        let h = layer.handle();
        assert_eq!(counts(&h), (0, 0, MAX as u32));
        let c = |o| {
            rec.rec
                .counter(CALLS, &[("name", "mt"), ("outcome", o)])
                .unwrap()
        };
        assert_eq!((c("permitted"), c("rejected")), (reached.get(), rejected));
        assert_eq!(rec.gauge(IN_FLIGHT, "mt"), 0.0);
        assert_eq!(rec.gauge(AVAILABLE, "mt"), MAX as f64);
        assert_eq!(rec.gauge(WAITING, "mt"), 0.0);
        // Every value ever written, not only the sampled ones.
        rec.assert_in_range("mt", MAX as u32, TASKS);
    });
    assert!(sampler.join().unwrap() > 0);
    let p = peak.load(Ordering::SeqCst);
    assert!((1..=MAX).contains(&p), "peak concurrency {p}");
    let h = layer.handle();
    (
        u64::from(h.in_flight()),
        h.snapshot().counter("rejected").unwrap(),
        p,
    )
}

#[test]
fn multi_thread_load_shedding_never_exceeds_the_maximum() {
    let (in_flight, _rejected, _peak) = multi_thread_run(Duration::ZERO);
    assert_eq!(in_flight, 0);
}

#[test]
fn multi_thread_waiting_admits_every_call_and_never_exceeds_the_maximum() {
    // A maximum wait far longer than the run: nobody is rejected, everyone gets a permit.
    let (in_flight, rejected, _peak) = multi_thread_run(Duration::from_secs(3_600));
    assert_eq!((in_flight, rejected), (0, 0));
}

/// An action a [`Tracking`] recorder runs at the next update of a gauge.
type Hook = Box<dyn FnOnce() + Send>;

/// A recorder that forwards everything to a [`TestRecorder`] and, for every gauge, tracks
/// the lowest and highest value it was ever given (on every update, not only when read). A
/// gauge can be armed with a [`Hook`] that runs once, at its next update, before the value
/// is stored: a panic, or a call back into the bulkhead.
#[derive(Clone, Default)]
struct Tracking {
    rec: TestRecorder,
    gauges: Arc<Mutex<TrackedGauges>>,
}

/// Every gauge registered so far, by key.
type TrackedGauges = Vec<(metrics::Key, Arc<Tracked>)>;

struct Tracked {
    inner: metrics::Gauge,
    /// (value, min, max)
    seen: Mutex<(f64, f64, f64)>,
    hook: Mutex<Option<Hook>>,
}

impl Tracked {
    fn update(&self, f: impl FnOnce(f64) -> f64) {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        let mut seen = self.seen.lock().unwrap();
        let v = f(seen.0);
        *seen = (v, seen.1.min(v), seen.2.max(v));
    }
}

impl metrics::GaugeFn for Tracked {
    fn increment(&self, v: f64) {
        self.update(|x| x + v);
        self.inner.increment(v);
    }
    fn decrement(&self, v: f64) {
        self.update(|x| x - v);
        self.inner.decrement(v);
    }
    fn set(&self, v: f64) {
        self.update(|_| v);
        self.inner.set(v);
    }
}

impl metrics::Recorder for Tracking {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, m: &metrics::Metadata<'_>) -> metrics::Counter {
        self.rec.register_counter(key, m)
    }

    fn register_gauge(&self, key: &metrics::Key, m: &metrics::Metadata<'_>) -> metrics::Gauge {
        let mut gauges = self.gauges.lock().unwrap();
        // Same key, same series (as two instances sharing a name share it in a real recorder).
        if let Some((_, g)) = gauges.iter().find(|(k, _)| k == key) {
            return metrics::Gauge::from_arc(g.clone());
        }
        let tracked = Arc::new(Tracked {
            inner: self.rec.register_gauge(key, m),
            seen: Mutex::new((0.0, f64::INFINITY, f64::NEG_INFINITY)),
            hook: Mutex::new(None),
        });
        gauges.push((key.clone(), tracked.clone()));
        metrics::Gauge::from_arc(tracked)
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        m: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        self.rec.register_histogram(key, m)
    }
}

impl Tracking {
    fn install_while<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self, f)
    }

    fn tracked(&self, gauge: &str, instance: &str) -> Arc<Tracked> {
        let gauges = self.gauges.lock().unwrap();
        let (_, g) = gauges
            .iter()
            .find(|(k, _)| {
                k.name() == gauge
                    && k.labels()
                        .any(|l| l.key() == "name" && l.value() == instance)
            })
            .expect("gauge registered");
        g.clone()
    }

    /// The gauge's current value, as the underlying recorder holds it.
    fn gauge(&self, gauge: &str, instance: &str) -> f64 {
        self.rec.gauge(gauge, &[("name", instance)]).unwrap()
    }

    /// The lowest and the highest value the gauge was ever given.
    fn range(&self, gauge: &str, instance: &str) -> (f64, f64) {
        let (_, lo, hi) = *self.tracked(gauge, instance).seen.lock().unwrap();
        (lo, hi)
    }

    /// Asserts that the in-flight, available and waiting gauges were never given a value
    /// outside `0..=max` (in-flight, available) or `0..=max_waiting` (waiting).
    fn assert_in_range(&self, instance: &str, max: u32, max_waiting: u32) {
        for (g, hi) in [(IN_FLIGHT, max), (AVAILABLE, max), (WAITING, max_waiting)] {
            let (lo_seen, hi_seen) = self.range(g, instance);
            assert!(
                lo_seen >= 0.0 && hi_seen <= f64::from(hi),
                "{g}{{name={instance}}} took values in {lo_seen}..={hi_seen}, outside 0..={hi}"
            );
        }
    }

    /// Runs `hook` once, at the next update of the gauge.
    fn arm(&self, gauge: &str, instance: &str, hook: impl FnOnce() + Send + 'static) {
        *self.tracked(gauge, instance).hook.lock().unwrap() = Some(Box::new(hook));
    }

    /// Makes the next update of the gauge panic.
    fn arm_panic(&self, gauge: &str, instance: &str) {
        self.arm(gauge, instance, || panic!("recorder panicked"));
    }
}

/// A waker that, when woken, polls a response future until it completes (inside `wake`),
/// as an executor running the woken task at once on another thread could.
struct RunOnWake {
    fut: Mutex<Option<Fut>>,
    result: Mutex<Option<u32>>,
}

impl std::task::Wake for RunOnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let mut slot = self.fut.lock().unwrap();
        if let Some(fut) = slot.as_mut() {
            if let Poll::Ready(r) = poll_once(fut.as_mut()) {
                *self.result.lock().unwrap() = Some(r.unwrap());
                *slot = None;
            }
        }
    }
}

/// Counts its wake-ups.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn waiting_layer(rec: &Tracking, name: &str, max: usize, max_wait: Duration) -> BulkheadLayer {
    rec.install_while(|| {
        BulkheadLayer::builder()
            .name(name)
            .max_concurrent_calls(max)
            .max_wait(max_wait)
            .build()
            .unwrap()
    })
}

#[tokio::test(start_paused = true)]
async fn a_hand_off_to_a_waiter_that_completes_inside_wake_keeps_every_gauge_in_range() {
    let rec = Tracking::default();
    let probe = Probe::default();
    let layer = waiting_layer(&rec, "h", 1, Duration::from_secs(1));
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());
    let mut holder = call(&mut svc, 1, Job::Sleep(0));
    let runner = Arc::new(RunOnWake {
        fut: Mutex::new(Some(call(&mut svc, 2, Job::Sleep(0)))),
        result: Mutex::new(None),
    });
    let waker = std::task::Waker::from(runner.clone());
    {
        let mut waiter = runner.fut.lock().unwrap();
        let waiter = waiter.as_mut().unwrap().as_mut();
        assert!(waiter.poll(&mut Context::from_waker(&waker)).is_pending());
    }
    assert_eq!(counts(&h), (1, 1, 0));
    // The holder completes; the hand-off wakes the waiter, which runs to completion (and
    // returns the permit) before the holder's release has returned.
    assert_eq!(
        poll_once(holder.as_mut()).map(Result::unwrap),
        Poll::Ready(1)
    );
    assert_eq!(*runner.result.lock().unwrap(), Some(2));
    assert_eq!(counts(&h), (0, 0, 1));
    rec.assert_in_range("h", 1, 1);
    assert_eq!(
        (
            rec.gauge(IN_FLIGHT, "h"),
            rec.gauge(AVAILABLE, "h"),
            rec.gauge(WAITING, "h")
        ),
        (0.0, 1.0, 0.0)
    );
}

#[tokio::test(start_paused = true)]
async fn bulkheads_sharing_a_name_overwrite_each_others_gauges_within_range() {
    let rec = Tracking::default();
    let probe = Probe::default();
    let old = waiting_layer(&rec, "db", 2, Duration::from_secs(1));
    let mut old_svc = old.layer(probe.service());
    let mut a = call(&mut old_svc, 1, Job::Sleep(10));
    let mut b = call(&mut old_svc, 2, Job::Sleep(10));
    let mut w = call(&mut old_svc, 3, Job::Sleep(10));
    for f in [&mut a, &mut b, &mut w] {
        assert!(poll_once(f.as_mut()).is_pending());
    }
    assert_eq!(counts(&old.handle()), (2, 1, 0));
    // A configuration reload: the same name is built again while the old calls run, and
    // both serve calls for a while.
    let new = waiting_layer(&rec, "db", 2, Duration::from_secs(1));
    let mut new_svc = new.layer(probe.service());
    assert_eq!(
        (rec.gauge(IN_FLIGHT, "db"), rec.gauge(AVAILABLE, "db")),
        (0.0, 2.0)
    );
    let mut c = call(&mut new_svc, 4, Job::Sleep(30));
    assert!(poll_once(c.as_mut()).is_pending());
    // The last writer wins: the new instance's state.
    assert_eq!(
        (rec.gauge(IN_FLIGHT, "db"), rec.gauge(AVAILABLE, "db")),
        (1.0, 1.0)
    );
    advance(Duration::from_millis(10)).await;
    for f in [&mut a, &mut b] {
        assert!(poll_once(f.as_mut()).is_ready());
    }
    rec.assert_in_range("db", 2, 1);
    // The old instance wrote last: its own state (the waiter holds the last permit).
    assert_eq!(
        (
            rec.gauge(IN_FLIGHT, "db"),
            rec.gauge(AVAILABLE, "db"),
            rec.gauge(WAITING, "db")
        ),
        (1.0, 1.0, 0.0)
    );
    assert!(poll_once(w.as_mut()).is_pending());
    advance(Duration::from_millis(10)).await;
    assert!(poll_once(w.as_mut()).is_ready());
    assert_eq!(counts(&old.handle()), (0, 0, 2));
    advance(Duration::from_millis(10)).await;
    assert!(poll_once(c.as_mut()).is_ready());
    assert_eq!(counts(&new.handle()), (0, 0, 2));
    assert_eq!(probe.order(), vec![1, 2, 4, 3]);
    rec.assert_in_range("db", 2, 1);
    assert_eq!(
        (
            rec.gauge(IN_FLIGHT, "db"),
            rec.gauge(AVAILABLE, "db"),
            rec.gauge(WAITING, "db")
        ),
        (0.0, 2.0, 0.0)
    );
}

/// An inner service that panics once, in `poll_ready`, in `call` or in its future's
/// `poll`, and counts every time it is reached.
#[derive(Clone)]
struct Bomb {
    at: &'static str,
    armed: Arc<AtomicBool>,
    reached: Count,
}

struct BombFuture {
    bomb: Bomb,
    x: u32,
}

impl Bomb {
    fn reach(&self, here: &str) {
        self.reached.incr();
        if self.at == here && self.armed.swap(false, Ordering::SeqCst) {
            panic!("inner panicked");
        }
    }
}

impl Service<u32> for Bomb {
    type Response = u32;
    type Error = BoxError;
    type Future = BombFuture;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.reach("poll_ready");
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, x: u32) -> BombFuture {
        self.reach("call");
        BombFuture {
            bomb: self.clone(),
            x,
        }
    }
}

impl Future for BombFuture {
    type Output = Result<u32, BoxError>;
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        self.bomb.reach("future");
        Poll::Ready(Ok(self.x))
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("?")
}

#[tokio::test(start_paused = true)]
async fn a_future_polled_again_after_an_inner_panic_never_reaches_the_inner_service() {
    quiet_inner_panics();
    for at in ["poll_ready", "call", "future"] {
        let layer = BulkheadLayer::new(1).unwrap();
        let h = layer.handle();
        let bomb = Bomb {
            at,
            armed: Arc::new(AtomicBool::new(true)),
            reached: Count::default(),
        };
        let mut svc = layer.layer(bomb.clone());
        if at != "future" {
            // A ready inner service is called in `call`: its panic unwinds out of `call`,
            // returning the permit, and no future exists to be polled again.
            let caught = catch_unwind(AssertUnwindSafe(|| drop(svc.call(1))));
            assert!(caught.is_err(), "{at}");
            assert_eq!(counts(&h), (0, 0, 1), "{at}: the permit went back");
            let mut other = Box::pin(svc.call(2));
            assert_eq!(counts(&h), (1, 0, 0), "{at}");
            assert_eq!(
                poll_once(other.as_mut()).map(Result::unwrap),
                Poll::Ready(2)
            );
            assert_eq!(counts(&h), (0, 0, 1), "{at}");
            continue;
        }
        let mut fut = Box::pin(svc.call(1));
        let caught = catch_unwind(AssertUnwindSafe(|| poll_once(fut.as_mut())));
        assert!(caught.is_err(), "{at}");
        assert_eq!(
            counts(&h),
            (0, 0, 1),
            "{at}: the permit went back as it unwound"
        );
        // The permit is taken by another call (which reaches the inner service in `call`);
        // the panicked future is polled again.
        let mut other = Box::pin(svc.call(2));
        let reached = bomb.reached.get();
        assert_eq!(counts(&h), (1, 0, 0));
        let again = catch_unwind(AssertUnwindSafe(|| poll_once(fut.as_mut())));
        let again = again.expect_err("a future that panicked panics when polled again");
        assert_eq!(panic_message(&*again), AFTER_PANIC, "{at}");
        assert_eq!(
            bomb.reached.get(),
            reached,
            "{at}: inner reached without a permit"
        );
        assert_eq!(counts(&h), (1, 0, 0), "{at}");
        drop(fut);
        assert_eq!(counts(&h), (1, 0, 0), "{at}: nothing released twice");
        assert_eq!(
            poll_once(other.as_mut()).map(Result::unwrap),
            Poll::Ready(2)
        );
        assert_eq!(counts(&h), (0, 0, 1), "{at}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_queued_future_polled_again_after_a_panic_never_takes_another_callers_permit() {
    quiet_inner_panics();
    let armed = Arc::new(AtomicBool::new(true));
    let fuse = armed.clone();
    let probe = Probe::default();
    let layer = BulkheadLayer::builder()
        .max_concurrent_calls(1)
        .max_wait(Duration::from_millis(10))
        .on_event(move |_| {
            if fuse.swap(false, Ordering::SeqCst) {
                panic!("listener panicked");
            }
        })
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());
    let mut holder = call(&mut svc, 1, Job::Forever);
    assert!(poll_once(holder.as_mut()).is_pending());
    let mut first = call(&mut svc, 2, Job::Sleep(0));
    assert!(poll_once(first.as_mut()).is_pending());
    advance(Duration::from_millis(10)).await;
    // Its deadline passes; the listener of the rejection panics.
    let caught = catch_unwind(AssertUnwindSafe(|| poll_once(first.as_mut())));
    assert!(caught.is_err());
    assert!(!armed.load(Ordering::SeqCst));
    assert_eq!(counts(&h), (1, 0, 0));
    // A second waiter queues (in the slot the first one left) and is handed the permit.
    let mut second = call(&mut svc, 3, Job::Sleep(0));
    assert!(poll_once(second.as_mut()).is_pending());
    assert_eq!(counts(&h), (1, 1, 0));
    drop(holder);
    assert_eq!(counts(&h), (1, 0, 0));
    let again = catch_unwind(AssertUnwindSafe(|| poll_once(first.as_mut())));
    let again = again.expect_err("a future that panicked panics when polled again");
    assert_eq!(panic_message(&*again), AFTER_PANIC);
    assert_eq!(
        poll_once(second.as_mut()).map(Result::unwrap),
        Poll::Ready(3),
        "the permit handed to the second waiter stays its own"
    );
    assert_eq!(probe.order(), vec![1, 3]);
    assert_eq!(counts(&h), (0, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn a_recorder_panicking_as_a_call_queues_leaves_no_orphan_in_the_queue() {
    quiet_inner_panics();
    let rec = Tracking::default();
    let probe = Probe::default();
    let layer = waiting_layer(&rec, "r", 1, Duration::from_secs(1));
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());
    let mut holder = call(&mut svc, 1, Job::Sleep(5));
    assert!(poll_once(holder.as_mut()).is_pending());
    rec.arm_panic(WAITING, "r");
    let caught = catch_unwind(AssertUnwindSafe(|| call(&mut svc, 2, Job::Sleep(0))));
    assert!(caught.is_err());
    assert_eq!(
        counts(&h),
        (1, 0, 0),
        "the call that panicked left the queue"
    );
    advance(Duration::from_millis(5)).await;
    assert_eq!(
        poll_once(holder.as_mut()).map(Result::unwrap),
        Poll::Ready(1)
    );
    assert_eq!(
        counts(&h),
        (0, 0, 1),
        "the permit went back, not to a lost slot"
    );
    let mut next = call(&mut svc, 3, Job::Sleep(0));
    assert_eq!(poll_once(next.as_mut()).map(Result::unwrap), Poll::Ready(3));
    assert_eq!(probe.order(), vec![1, 3]);
    rec.assert_in_range("r", 1, 1);
    assert_eq!(
        (
            rec.gauge(IN_FLIGHT, "r"),
            rec.gauge(AVAILABLE, "r"),
            rec.gauge(WAITING, "r")
        ),
        (0.0, 1.0, 0.0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_recorder_panicking_as_a_permit_is_returned_leaks_no_permit() {
    quiet_inner_panics();
    for gauge in [IN_FLIGHT, AVAILABLE] {
        let rec = Tracking::default();
        let probe = Probe::default();
        let layer = waiting_layer(&rec, "r", 1, Duration::ZERO);
        let h = layer.handle();
        let mut svc = layer.layer(probe.service());
        let mut fut = call(&mut svc, 1, Job::Sleep(0));
        rec.arm_panic(gauge, "r");
        let caught = catch_unwind(AssertUnwindSafe(|| poll_once(fut.as_mut())));
        assert!(caught.is_err(), "{gauge}");
        assert_eq!(counts(&h), (0, 0, 1), "{gauge}: the permit is back");
        let mut next = call(&mut svc, 2, Job::Sleep(0));
        assert_eq!(poll_once(next.as_mut()).map(Result::unwrap), Poll::Ready(2));
        assert_eq!(counts(&h), (0, 0, 1));
        rec.assert_in_range("r", 1, 0);
        assert_eq!(
            (rec.gauge(IN_FLIGHT, "r"), rec.gauge(AVAILABLE, "r")),
            (0.0, 1.0)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_recorder_panicking_at_a_hand_off_still_wakes_the_waiter() {
    quiet_inner_panics();
    let rec = Tracking::default();
    let probe = Probe::default();
    let layer = waiting_layer(&rec, "r", 1, Duration::MAX);
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());
    let mut holder = call(&mut svc, 1, Job::Sleep(5));
    assert!(poll_once(holder.as_mut()).is_pending());
    let mut waiter = call(&mut svc, 2, Job::Sleep(0));
    let woken = Arc::new(CountingWaker::default());
    let waker = std::task::Waker::from(woken.clone());
    assert!(
        waiter
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );
    advance(Duration::from_millis(5)).await;
    rec.arm_panic(WAITING, "r");
    let caught = catch_unwind(AssertUnwindSafe(|| poll_once(holder.as_mut())));
    assert!(caught.is_err());
    assert_eq!(woken.0.load(Ordering::SeqCst), 1, "the waiter was woken");
    assert_eq!(counts(&h), (1, 0, 0), "handed to the waiter");
    assert_eq!(
        poll_once(waiter.as_mut()).map(Result::unwrap),
        Poll::Ready(2)
    );
    assert_eq!(counts(&h), (0, 0, 1));
    rec.assert_in_range("r", 1, 1);
}

/// A recorder whose gauge calls back into the bulkhead (here: drops a queued call, which
/// leaves the queue) must not deadlock. Run on a thread watched by the test thread, so a
/// deadlock fails the test instead of hanging it.
#[test]
fn a_recorder_calling_back_into_the_bulkhead_does_not_deadlock() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rec = Tracking::default();
        let probe = Probe::default();
        let layer = waiting_layer(&rec, "re", 1, Duration::from_secs(1));
        let h = layer.handle();
        let mut svc = layer.layer(probe.service());
        let _holder = call(&mut svc, 1, Job::Forever);
        let queued = Arc::new(Mutex::new(Some(call(&mut svc, 2, Job::Sleep(0)))));
        assert_eq!(counts(&h), (1, 1, 0));
        let victim = queued.clone();
        rec.arm(WAITING, "re", move || drop(victim.lock().unwrap().take()));
        // Queueing the third call updates the waiting gauge, which drops the second call.
        let _third = call(&mut svc, 3, Job::Sleep(0));
        assert!(queued.lock().unwrap().is_none());
        assert_eq!(counts(&h), (1, 1, 0));
        assert_eq!(rec.gauge(WAITING, "re"), 1.0);
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(Duration::from_secs(60))
        .expect("the call queued while the recorder called back into the bulkhead");
}

/// Outside a runtime with a time driver, a queued call cannot arm its timer: its first poll
/// panics (as documented), and it leaves the queue as that panic unwinds, so the permit
/// goes back to the free count when the holder is done, not to a slot nobody polls.
#[test]
fn a_queued_call_polled_without_a_time_driver_leaves_the_queue_as_it_panics() {
    let probe = Probe::default();
    let layer = BulkheadLayer::builder()
        .max_concurrent_calls(1)
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(probe.service());
    let holder = call(&mut svc, 1, Job::Forever);
    let mut waiter = call(&mut svc, 2, Job::Sleep(0));
    assert_eq!(counts(&h), (1, 1, 0));
    let caught = catch_unwind(AssertUnwindSafe(|| poll_once(waiter.as_mut())));
    assert!(caught.is_err(), "no timer outside a runtime");
    assert_eq!(counts(&h), (1, 0, 0));
    drop(holder);
    assert_eq!(counts(&h), (0, 0, 1));
    let again = catch_unwind(AssertUnwindSafe(|| poll_once(waiter.as_mut())));
    assert_eq!(panic_message(&*again.unwrap_err()), AFTER_PANIC);
    assert_eq!(probe.calls.get(), 1, "the holder only, in `call`");
}
