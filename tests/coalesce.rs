//! Coalescing layer: one upstream call per key in flight, cancellation, errors, panics,
//! metrics, events, shared state, config; and a multi-thread check on a real runtime.
#![cfg(feature = "coalesce")]

mod support;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use support::{Count, DropGuard, TestRecorder};
use tokio::time::{Instant, sleep};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breakwater::coalesce::{CoalesceLayer, SharedError, find_inner};
use tower_breakwater::error::{self, ErrorKind, LayerKind};
use tower_breakwater::event::EventKind;
use tower_breakwater::metrics::MetricsProfile;
use tower_breakwater::{BoxError, ConfigError};

const CALLS: &str = "breakwater_coalesce_calls_total";
const IN_FLIGHT: &str = "breakwater_coalesce_in_flight_keys";
const FOLLOWERS: &str = "breakwater_coalesce_followers_per_call";

/// Lets spawned tasks run.
async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

/// Awaits `fut`, failing (instead of hanging) if it is not done within an hour of paused
/// time.
async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(3_600), fut)
        .await
        .expect("a caller hung")
}

/// Counts the polls of the future it wraps.
struct Counted<F> {
    fut: F,
    polls: Count,
}

impl<F: Future + Unpin> Future for Counted<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.incr();
        Pin::new(&mut self.fut).poll(cx)
    }
}

/// An inner service: counts calls, keeps a drop guard in each call's future, sleeps `ms`
/// then answers `key * 10`.
fn sleeper(
    ms: u64,
    calls: Count,
    drops: Count,
) -> impl Service<u32, Response = u32, Error = io::Error, Future: Send> + Clone + Send + 'static {
    service_fn(move |key: u32| {
        calls.incr();
        let guard = DropGuard(drops.clone());
        async move {
            let _guard = guard;
            sleep(Duration::from_millis(ms)).await;
            Ok::<_, io::Error>(key * 10)
        }
    })
}

/// A key function of `u32` requests.
type KeyFn = fn(&u32) -> Option<u32>;

/// A coalescing layer of `u32` requests keyed by a plain function.
type U32Layer = CoalesceLayer<u32, u32, KeyFn>;

fn by_key() -> U32Layer {
    CoalesceLayer::builder()
        .key((|k: &u32| Some(*k)) as KeyFn)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_concurrent_requests_reach_inner_once_and_poll_each_waiter_twice() {
    let rec = TestRecorder::default();
    let layer = rec.install_while(|| {
        CoalesceLayer::builder()
            .name("hot-key")
            .key(|k: &u32| Some(*k))
            .followers_histogram(true)
            .build()
            .unwrap()
    });
    let handle = layer.handle();
    let (calls, drops) = (Count::default(), Count::default());
    let mut svc = layer.layer(sleeper(10, calls.clone(), drops.clone()));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(10_000);
    let mut polls = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        let fut = svc.ready().await.unwrap().call(4);
        let p = Count::default();
        polls.push(p.clone());
        tasks.push(tokio::spawn(Counted {
            fut: Box::pin(fut),
            polls: p,
        }));
    }
    settle().await;
    assert_eq!(handle.in_flight_keys(), 1);
    for t in tasks {
        assert_eq!(within(t).await.unwrap().unwrap(), 40);
    }
    assert_eq!(calls.get(), 1);
    assert_eq!(drops.get(), 1);
    assert_eq!(Instant::now() - start, Duration::from_millis(10));
    // The driver: first poll (pending), second poll (ready). Each waiter: register, take.
    assert_eq!(polls.iter().map(Count::get).max(), Some(2));
    assert_eq!(polls.iter().map(Count::get).sum::<u64>(), 20_000);
    let name = ("name", "hot-key");
    assert_eq!(rec.counter(CALLS, &[name, ("role", "leader")]), Some(1));
    assert_eq!(
        rec.counter(CALLS, &[name, ("role", "follower")]),
        Some(9_999)
    );
    assert_eq!(rec.gauge(IN_FLIGHT, &[name]), Some(0.0));
    assert_eq!(rec.histogram(FOLLOWERS, &[name]), Some(vec![9_999.0]));
    let snap = handle.snapshot();
    assert_eq!(snap.layer, LayerKind::Coalesce);
    assert_eq!(snap.counter("leaders"), Some(1));
    assert_eq!(snap.counter("followers"), Some(9_999));
    assert_eq!(snap.counter("panics"), Some(0));
    assert_eq!(snap.gauge("in_flight_keys"), Some(0.0));
}

#[tokio::test(start_paused = true)]
async fn the_starting_caller_cancelled_by_an_outer_timeout_leaves_the_call_to_the_others() {
    let (calls, drops) = (Count::default(), Count::default());
    let mut svc = by_key().layer(sleeper(10, calls.clone(), drops.clone()));
    let start = Instant::now();
    let leader = tokio::spawn(tokio::time::timeout(
        Duration::from_millis(5),
        svc.ready().await.unwrap().call(7),
    ));
    let polls = [Count::default(), Count::default()];
    let a = tokio::spawn(Counted {
        fut: Box::pin(svc.ready().await.unwrap().call(7)),
        polls: polls[0].clone(),
    });
    let b = tokio::spawn(Counted {
        fut: Box::pin(svc.ready().await.unwrap().call(7)),
        polls: polls[1].clone(),
    });
    assert!(leader.await.unwrap().is_err(), "the outer timeout fired");
    assert_eq!(Instant::now() - start, Duration::from_millis(5));
    assert_eq!(drops.get(), 0, "the shared call kept running");
    assert_eq!(within(a).await.unwrap().unwrap(), 70);
    assert_eq!(within(b).await.unwrap().unwrap(), 70);
    // Not restarted at 5 ms: the one call finished at 10 ms.
    assert_eq!(Instant::now() - start, Duration::from_millis(10));
    assert_eq!(calls.get(), 1);
    assert_eq!(drops.get(), 1);
    // One waiter took over driving (register, take over, finish); the other: register, take.
    let mut p = [polls[0].get(), polls[1].get()];
    p.sort();
    assert_eq!(p, [2, 3]);
}

#[tokio::test(start_paused = true)]
async fn a_caller_dropped_before_its_first_poll_never_joins_and_the_next_one_leads() {
    let (calls, drops) = (Count::default(), Count::default());
    let mut svc = by_key().layer(sleeper(10, calls.clone(), drops.clone()));
    let first = svc.ready().await.unwrap().call(3);
    let second = svc.ready().await.unwrap().call(3);
    drop(first);
    assert_eq!(within(second).await.unwrap(), 30);
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn all_callers_dropped_drops_the_inner_future_and_frees_the_key() {
    let rec = TestRecorder::default();
    let layer = rec.install_while(by_key);
    let handle = layer.handle();
    let (calls, drops) = (Count::default(), Count::default());
    let mut svc = layer.layer(sleeper(1_000, calls.clone(), drops.clone()));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(tokio::spawn(svc.ready().await.unwrap().call(1)));
    }
    settle().await;
    assert_eq!((calls.get(), drops.get()), (1, 0));
    assert_eq!(handle.in_flight_keys(), 1);
    assert_eq!(rec.gauge(IN_FLIGHT, &[("name", "default")]), Some(1.0));
    for t in &tasks {
        t.abort();
    }
    settle().await;
    assert_eq!(drops.get(), 1, "the inner future was dropped");
    assert_eq!(handle.in_flight_keys(), 0);
    assert_eq!(rec.gauge(IN_FLIGHT, &[("name", "default")]), Some(0.0));
    assert_eq!(handle.snapshot().counter("abandoned"), Some(1));
    // The next request calls the inner service again.
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 10);
    assert_eq!(calls.get(), 2);
    assert_eq!(handle.snapshot().counter("leaders"), Some(2));
}

#[tokio::test(start_paused = true)]
async fn callers_dropped_before_any_poll_never_reach_the_inner_service() {
    let (calls, drops) = (Count::default(), Count::default());
    let layer = by_key();
    let mut svc = layer.layer(sleeper(10, calls.clone(), drops.clone()));
    let a = svc.ready().await.unwrap().call(2);
    let b = svc.ready().await.unwrap().call(2);
    drop((a, b));
    assert_eq!(calls.get(), 0);
    assert_eq!(layer.handle().in_flight_keys(), 0);
    assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), 20);
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_call_reaches_every_waiter_and_is_not_remembered() {
    let calls = Count::default();
    let c = calls.clone();
    let inner = service_fn(move |k: u32| {
        c.incr();
        async move {
            sleep(Duration::from_millis(10)).await;
            Err::<u32, _>(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("refused {k}"),
            ))
        }
    });
    let layer = CoalesceLayer::builder()
        .name("ledger")
        .key(|k: &u32| Some(*k))
        .build()
        .unwrap();
    let mut svc = layer.layer(inner);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(tokio::spawn(svc.ready().await.unwrap().call(9)));
    }
    for t in tasks {
        let err: BoxError = within(t).await.unwrap().unwrap_err();
        let shared = err.downcast_ref::<SharedError>().expect("a shared error");
        assert_eq!(shared.name(), "ledger");
        assert_eq!(
            shared.downcast_ref::<io::Error>().unwrap().kind(),
            io::ErrorKind::ConnectionRefused
        );
        let io = find_inner::<io::Error>(err.as_ref()).expect("reachable by type");
        assert_eq!(io.to_string(), "refused 9");
        assert_eq!(
            std::error::Error::source(err.as_ref()).unwrap().to_string(),
            "refused 9"
        );
        assert!(
            error::find(err.as_ref()).is_none(),
            "the inner error is not ours"
        );
        assert_eq!(err.to_string(), "shared call of `ledger` failed");
    }
    assert_eq!(calls.get(), 1);
    // Not remembered: the next request calls the inner service again.
    assert!(svc.ready().await.unwrap().call(9).await.is_err());
    assert_eq!(calls.get(), 2);
    assert_eq!(layer.handle().in_flight_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_inner_rejection_is_still_found_through_the_shared_error() {
    use tower_breakwater::timeout::TimeoutLayer;
    let (calls, drops) = (Count::default(), Count::default());
    let inner = TimeoutLayer::new(Duration::from_millis(5))
        .unwrap()
        .layer(sleeper(10, calls, drops));
    let mut svc = by_key().layer(inner);
    let a = svc.ready().await.unwrap().call(1);
    let b = svc.ready().await.unwrap().call(1);
    let (a, b) = tokio::join!(a, b);
    for err in [a.unwrap_err(), b.unwrap_err()] {
        let ours = error::find(err.as_ref()).expect("the inner timeout");
        assert_eq!(ours.kind(), ErrorKind::Timeout);
        assert_eq!(ours.layer(), LayerKind::Timeout);
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_call_hangs_nobody_and_frees_the_key() {
    let rec = TestRecorder::default();
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let layer = rec.install_while(|| {
        CoalesceLayer::builder()
            .name("buggy")
            .key(|k: &u32| Some(*k))
            .on_event(move |e| log.lock().unwrap().push(e.kind()))
            .build()
            .unwrap()
    });
    let handle = layer.handle();
    let calls = Count::default();
    let c = calls.clone();
    let inner = service_fn(move |k: u32| {
        c.incr();
        let first = c.get() == 1;
        async move {
            sleep(Duration::from_millis(10)).await;
            if first {
                panic!("upstream client bug");
            }
            Ok::<_, io::Error>(k)
        }
    });
    let mut svc = layer.layer(inner);
    let driver = tokio::spawn(svc.ready().await.unwrap().call(5));
    let mut waiters = Vec::new();
    for _ in 0..3 {
        waiters.push(tokio::spawn(svc.ready().await.unwrap().call(5)));
    }
    // The caller whose poll panicked gets the panic itself.
    assert!(within(driver).await.unwrap_err().is_panic());
    // Every other caller resolves with an error naming the panic.
    for w in waiters {
        let err = within(w).await.unwrap().unwrap_err();
        let ours = error::find(err.as_ref()).expect("ours");
        assert_eq!(ours.kind(), ErrorKind::Panicked);
        assert_eq!(ours.layer(), LayerKind::Coalesce);
        assert_eq!(ours.name(), "buggy");
    }
    assert_eq!(rec.gauge(IN_FLIGHT, &[("name", "buggy")]), Some(0.0));
    assert_eq!(handle.in_flight_keys(), 0);
    assert_eq!(handle.snapshot().counter("panics"), Some(1));
    assert_eq!(*events.lock().unwrap(), vec![EventKind::Panicked]);
    // The key is free: the next request succeeds.
    assert_eq!(svc.ready().await.unwrap().call(5).await.unwrap(), 5);
    assert_eq!(calls.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn different_keys_never_wait_for_each_other() {
    let calls = Count::default();
    let c = calls.clone();
    let inner = service_fn(move |k: u32| {
        c.incr();
        async move {
            sleep(Duration::from_millis(u64::from(k))).await;
            Ok::<_, io::Error>(k)
        }
    });
    let layer = by_key();
    let mut svc = layer.layer(inner);
    let start = Instant::now();
    let slow = tokio::spawn(svc.ready().await.unwrap().call(60_000));
    settle().await;
    assert_eq!(svc.ready().await.unwrap().call(0).await.unwrap(), 0);
    assert_eq!(Instant::now(), start, "key 0 answered at once");
    assert_eq!(svc.ready().await.unwrap().call(10).await.unwrap(), 10);
    assert_eq!(Instant::now() - start, Duration::from_millis(10));
    assert!(!slow.is_finished());
    assert_eq!(calls.get(), 3);
    assert_eq!(layer.handle().snapshot().counter("followers"), Some(0));
    assert_eq!(slow.await.unwrap().unwrap(), 60_000);
}

#[tokio::test(start_paused = true)]
async fn the_next_request_after_a_call_ends_starts_a_new_call() {
    let (calls, drops) = (Count::default(), Count::default());
    let mut svc = by_key().layer(sleeper(10, calls.clone(), drops));
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 10);
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 10);
    assert_eq!(calls.get(), 2);
}

#[derive(Clone, Debug, PartialEq)]
struct Req {
    id: u32,
    caller: &'static str,
}

#[tokio::test(start_paused = true)]
async fn followers_requests_are_never_sent_upstream() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let inner = service_fn(move |r: Req| {
        s.lock().unwrap().push(r.clone());
        async move {
            sleep(Duration::from_millis(10)).await;
            Ok::<_, io::Error>(format!("{} for {}", r.id, r.caller))
        }
    });
    let layer = CoalesceLayer::builder()
        .key(|r: &Req| Some(r.id))
        .build()
        .unwrap();
    let mut svc = layer.layer(inner);
    let a = svc.ready().await.unwrap().call(Req {
        id: 1,
        caller: "alice",
    });
    let b = svc.ready().await.unwrap().call(Req {
        id: 1,
        caller: "bob",
    });
    let (a, b) = tokio::join!(a, b);
    // Bob gets the answer to Alice's request: the key must capture what matters.
    assert_eq!(a.unwrap(), "1 for alice");
    assert_eq!(b.unwrap(), "1 for alice");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Req {
            id: 1,
            caller: "alice"
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn services_and_clones_of_one_layer_share_one_table_across_routes() {
    let route = |tag: &'static str, calls: Count| {
        service_fn(move |id: u32| {
            calls.incr();
            async move {
                sleep(Duration::from_millis(10)).await;
                Ok::<_, io::Error>(format!("{tag}{id}"))
            }
        })
    };
    let layer = CoalesceLayer::builder()
        .key(|id: &u32| Some(*id))
        .build()
        .unwrap();
    let (ca, cb) = (Count::default(), Count::default());
    // Two routes with different inner service types, one layer value (cloned, as a router
    // would): equal keys coalesce across them.
    let mut a = layer.layer(route("a", ca.clone()));
    let mut b = layer.clone().layer(route("b", cb.clone()));
    let mut a2 = a.clone();
    let fa = a.ready().await.unwrap().call(1);
    let fb = b.ready().await.unwrap().call(1);
    let fa2 = a2.ready().await.unwrap().call(1);
    let (ra, rb, ra2) = tokio::join!(fa, fb, fa2);
    assert_eq!(
        (ra.unwrap(), rb.unwrap(), ra2.unwrap()),
        ("a1".into(), "a1".into(), "a1".into())
    );
    assert_eq!((ca.get(), cb.get()), (1, 0));
    let snap = layer.handle().snapshot();
    assert_eq!(
        (snap.counter("leaders"), snap.counter("followers")),
        (Some(1), Some(2))
    );
    // Independent layers never coalesce with each other.
    let other = by_key();
    let (c1, c2) = (Count::default(), Count::default());
    let mut x = by_key().layer(sleeper(10, c1.clone(), Count::default()));
    let mut y = other.layer(sleeper(10, c2.clone(), Count::default()));
    let fx = x.ready().await.unwrap().call(1);
    let fy = y.ready().await.unwrap().call(1);
    let (rx, ry) = tokio::join!(fx, fy);
    assert_eq!((rx.unwrap(), ry.unwrap()), (10, 10));
    assert_eq!((c1.get(), c2.get()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn coalesced_event_reports_followers_and_solo_calls_emit_none() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let layer = CoalesceLayer::builder()
        .name("ev")
        .key(|k: &u32| Some(*k))
        .on_event(move |e| {
            assert_eq!((e.layer(), e.name()), (LayerKind::Coalesce, "ev"));
            log.lock().unwrap().push(e.kind());
        })
        .build()
        .unwrap();
    let mut svc = layer.layer(sleeper(10, Count::default(), Count::default()));
    svc.ready().await.unwrap().call(1).await.unwrap();
    assert!(events.lock().unwrap().is_empty());
    let f = [
        svc.ready().await.unwrap().call(1),
        svc.ready().await.unwrap().call(1),
        svc.ready().await.unwrap().call(1),
    ];
    let [a, b, c] = f;
    let _ = tokio::join!(a, b, c);
    assert_eq!(
        *events.lock().unwrap(),
        vec![EventKind::Coalesced { followers: 2 }]
    );
}

#[tokio::test(start_paused = true)]
async fn metric_series_are_registered_at_build_and_off_registers_nothing() {
    let rec = TestRecorder::default();
    let _layer = rec.install_while(|| {
        CoalesceLayer::builder()
            .name("m")
            .key(|k: &u32| Some(*k))
            .followers_histogram(true)
            .build()
            .unwrap()
    });
    assert_eq!(
        rec.names(),
        vec![CALLS, IN_FLIGHT, FOLLOWERS]
            .into_iter()
            .map(String::from)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    assert_eq!(
        rec.counter(CALLS, &[("name", "m"), ("role", "leader")]),
        Some(0)
    );
    assert_eq!(
        rec.counter(CALLS, &[("name", "m"), ("role", "follower")]),
        Some(0)
    );
    let off = TestRecorder::default();
    let _layer = off.install_while(|| {
        CoalesceLayer::builder()
            .key(|k: &u32| Some(*k))
            .metrics_profile(MetricsProfile::Off)
            .followers_histogram(true)
            .build()
            .unwrap()
    });
    assert!(off.names().is_empty());
    // Without the opt-in, no histogram.
    let plain = TestRecorder::default();
    let _layer = plain.install_while(by_key);
    assert_eq!(plain.histogram(FOLLOWERS, &[("name", "default")]), None);
}

#[test]
fn an_empty_name_is_a_config_error() {
    let err: ConfigError = CoalesceLayer::builder()
        .name("")
        .key(|k: &u32| Some(*k))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "name");
    assert_eq!(err.layer(), LayerKind::Coalesce);
}

#[test]
fn accessors_reach_the_inner_service() {
    let layer = by_key();
    let mut svc = layer.layer(sleeper(1, Count::default(), Count::default()));
    let _: &_ = svc.get_ref();
    let _: &mut _ = svc.get_mut();
    let _inner = svc.into_inner();
    assert_eq!(layer.handle().name(), "default");
}

// ---- user code that misbehaves: clones and destructors --------------------------------

/// Polls `fut` once, asserting it is pending (the caller joins its call).
async fn join_now<F: Future + Unpin>(fut: &mut F) {
    std::future::poll_fn(|cx| {
        assert!(Pin::new(&mut *fut).poll(cx).is_pending());
        Poll::Ready(())
    })
    .await;
}

/// A response whose `Clone` calls back into the coalescing layer: it drops another caller's
/// response future of the same call (which takes that call's locks) and reads the handle.
struct Reentrant {
    value: u32,
    victims: Arc<Mutex<Vec<Box<dyn Send>>>>,
    handle: tower_breakwater::coalesce::CoalesceHandle,
    clones: Count,
}

impl Clone for Reentrant {
    fn clone(&self) -> Self {
        self.clones.incr();
        let victim = self.victims.lock().unwrap().pop();
        drop(victim);
        assert_eq!(self.handle.in_flight_keys(), 0, "the call left the table");
        Reentrant {
            value: self.value,
            victims: self.victims.clone(),
            handle: self.handle.clone(),
            clones: self.clones.clone(),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_response_clone_may_call_back_into_the_layer() {
    let layer = by_key();
    let handle = layer.handle();
    let victims: Arc<Mutex<Vec<Box<dyn Send>>>> = Arc::default();
    let (calls, clones) = (Count::default(), Count::default());
    let (c, v, h, n) = (
        calls.clone(),
        victims.clone(),
        handle.clone(),
        clones.clone(),
    );
    let inner = service_fn(move |k: u32| {
        c.incr();
        let r = Reentrant {
            value: k,
            victims: v.clone(),
            handle: h.clone(),
            clones: n.clone(),
        };
        async move {
            sleep(Duration::from_millis(10)).await;
            Ok::<_, io::Error>(r)
        }
    });
    let mut svc = layer.layer(inner);
    let driver = tokio::spawn(svc.ready().await.unwrap().call(2));
    settle().await;
    // A follower that waits, then is dropped by the driver's clone of the response.
    let mut victim = Box::pin(svc.ready().await.unwrap().call(2));
    join_now(&mut victim).await;
    victims.lock().unwrap().push(Box::new(victim));
    let follower = tokio::spawn(svc.ready().await.unwrap().call(2));
    settle().await;
    assert_eq!(handle.snapshot().counter("followers"), Some(2));
    // The driver clones (the follower still holds the value) and that clone drops the
    // victim: no lock of the call is held while user code runs, so nothing deadlocks.
    assert_eq!(within(driver).await.unwrap().unwrap().value, 2);
    assert!(
        victims.lock().unwrap().is_empty(),
        "the clone dropped the victim"
    );
    // The follower, now the last holder, takes the original without cloning.
    assert_eq!(within(follower).await.unwrap().unwrap().value, 2);
    assert_eq!((calls.get(), clones.get()), (1, 1));
}

/// A response whose `Clone` panics (a bug in user code).
#[derive(Debug)]
struct Fragile(u32);

impl Clone for Fragile {
    fn clone(&self) -> Self {
        panic!("response clone bug")
    }
}

#[tokio::test(start_paused = true)]
async fn a_response_clone_panicking_in_the_driver_still_ends_the_call() {
    let rec = TestRecorder::default();
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let layer = rec.install_while(|| {
        CoalesceLayer::builder()
            .name("fragile")
            .key(|k: &u32| Some(*k))
            .followers_histogram(true)
            .on_event(move |e| log.lock().unwrap().push(e.kind()))
            .build()
            .unwrap()
    });
    let handle = layer.handle();
    let calls = Count::default();
    let c = calls.clone();
    let inner = service_fn(move |k: u32| {
        c.incr();
        async move {
            sleep(Duration::from_millis(10)).await;
            Ok::<_, io::Error>(Fragile(k))
        }
    });
    let mut svc = layer.layer(inner);
    let driver = tokio::spawn(svc.ready().await.unwrap().call(3));
    settle().await;
    let follower = tokio::spawn(svc.ready().await.unwrap().call(3));
    // The driver clones its own copy while the follower holds the value: that clone panics,
    // on the driver's task.
    assert!(within(driver).await.unwrap_err().is_panic());
    // The follower was served first, and takes the original.
    assert_eq!(within(follower).await.unwrap().unwrap().0, 3);
    let name = [("name", "fragile")];
    assert_eq!(rec.gauge(IN_FLIGHT, &name), Some(0.0));
    assert_eq!(rec.histogram(FOLLOWERS, &name), Some(vec![1.0]));
    assert_eq!(
        *events.lock().unwrap(),
        vec![EventKind::Coalesced { followers: 1 }]
    );
    assert_eq!(handle.in_flight_keys(), 0);
    // The key is free: a caller alone gets the original, with no clone.
    assert_eq!(svc.ready().await.unwrap().call(3).await.unwrap().0, 3);
    assert_eq!(calls.get(), 2);
    assert_eq!(rec.gauge(IN_FLIGHT, &name), Some(0.0));
}

/// Held by an inner future: panics when dropped before the future finished (a bug in the
/// upstream client's destructor).
struct PanicIfUnfinished(bool);

impl Drop for PanicIfUnfinished {
    fn drop(&mut self) {
        if self.0 {
            panic!("destructor bug in an unfinished upstream call")
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_inner_future_panicking_on_drop_still_ends_the_call() {
    let rec = TestRecorder::default();
    let layer = rec.install_while(|| {
        CoalesceLayer::builder()
            .name("abandoned")
            .key(|k: &u32| Some(*k))
            .followers_histogram(true)
            .build()
            .unwrap()
    });
    let handle = layer.handle();
    let calls = Count::default();
    let c = calls.clone();
    let inner = service_fn(move |k: u32| {
        c.incr();
        async move {
            let mut unfinished = PanicIfUnfinished(true);
            sleep(Duration::from_millis(1_000)).await;
            unfinished.0 = false;
            Ok::<_, io::Error>(k)
        }
    });
    let mut svc = layer.layer(inner);
    let name = [("name", "abandoned")];
    let drop_panics =
        |fut| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(fut))).is_err();

    // The caller alone leaves: the future's destructor panics out of its drop.
    let mut alone = Box::pin(svc.ready().await.unwrap().call(1));
    join_now(&mut alone).await;
    assert_eq!(rec.gauge(IN_FLIGHT, &name), Some(1.0));
    assert!(drop_panics(alone));
    assert_eq!(handle.in_flight_keys(), 0);
    assert_eq!(rec.gauge(IN_FLIGHT, &name), Some(0.0));
    assert_eq!(rec.histogram(FOLLOWERS, &name), Some(vec![0.0]));

    // With a follower: the driver leaves first, then the follower, the last, drops the
    // future and its destructor panics.
    let mut driver = Box::pin(svc.ready().await.unwrap().call(1));
    let mut follower = Box::pin(svc.ready().await.unwrap().call(1));
    join_now(&mut driver).await;
    join_now(&mut follower).await;
    assert_eq!(rec.gauge(IN_FLIGHT, &name), Some(1.0));
    drop(driver);
    assert_eq!(
        rec.gauge(IN_FLIGHT, &name),
        Some(1.0),
        "the follower still waits"
    );
    assert!(drop_panics(follower));
    assert_eq!(handle.in_flight_keys(), 0);
    assert_eq!(rec.gauge(IN_FLIGHT, &name), Some(0.0));
    assert_eq!(rec.histogram(FOLLOWERS, &name), Some(vec![0.0, 1.0]));
    assert_eq!(handle.snapshot().counter("abandoned"), Some(2));

    // The key is free, and the next call finishes.
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
    assert_eq!(calls.get(), 3);
    assert_eq!(rec.gauge(IN_FLIGHT, &name), Some(0.0));
}

// ---- real runtime, two threads (counts only) -------------------------------------------

struct Running<'a>(&'a AtomicU64);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An inner service that tracks, per key, how many calls run at once and the maximum seen.
fn tracking(
    current: Arc<[AtomicU64; 4]>,
    max: Arc<[AtomicU64; 4]>,
    calls: Count,
) -> impl Service<u32, Response = u32, Error = io::Error, Future: Send> + Clone + Send + 'static {
    service_fn(move |k: u32| {
        calls.incr();
        let (current, max) = (current.clone(), max.clone());
        async move {
            let i = k as usize;
            let now = current[i].fetch_add(1, Ordering::SeqCst) + 1;
            max[i].fetch_max(now, Ordering::SeqCst);
            // Leaves the count when done or dropped (a call abandoned by all its callers).
            let _running = Running(&current[i]);
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            Ok::<_, io::Error>(k)
        }
    })
}

#[test]
fn same_key_requests_from_two_threads_never_run_upstream_concurrently() {
    const ROUNDS: u32 = 2_000;
    let current: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let max: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let calls = Count::default();
    let layer = by_key();
    let svc = layer.layer(tracking(current.clone(), max.clone(), calls.clone()));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let mut svc = svc.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    for i in 0..ROUNDS {
                        let k = i % 4;
                        let mut a = Box::pin(svc.call(k));
                        let mut b = Box::pin(svc.call(k));
                        let c = svc.call(k);
                        // `a` leads (or follows the other thread), `b` waits; then `a` is
                        // dropped: whoever was driving hands over, nobody gets an error.
                        let early = std::future::poll_fn(|cx| {
                            let _ = Pin::new(&mut a).poll(cx);
                            Poll::Ready(match Pin::new(&mut b).poll(cx) {
                                Poll::Ready(r) => Some(r),
                                Poll::Pending => None,
                            })
                        })
                        .await;
                        drop(a);
                        let (a, c) = match early {
                            Some(r) => (r, c.await),
                            None => tokio::join!(b, c),
                        };
                        assert_eq!((a.unwrap(), c.unwrap()), (k, k));
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for k in 0..4 {
        assert_eq!(
            max[k].load(Ordering::SeqCst),
            1,
            "key {k} ran twice at once"
        );
        assert_eq!(current[k].load(Ordering::SeqCst), 0);
    }
    let snap = layer.handle().snapshot();
    assert_eq!(snap.counter("leaders"), Some(calls.get()));
    assert_eq!(
        snap.counter("leaders").unwrap() + snap.counter("followers").unwrap(),
        2 * 3 * u64::from(ROUNDS)
    );
    assert_eq!(snap.gauge("in_flight_keys"), Some(0.0));
}

#[test]
fn tasks_on_a_multi_thread_runtime_share_calls_without_overlap() {
    let current: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let max: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let calls = Count::default();
    let layer = by_key();
    let svc = layer.layer(tracking(current.clone(), max.clone(), calls.clone()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..4_000u32 {
            let mut svc = svc.clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let k = i % 4;
                assert_eq!(svc.call(k).await.unwrap(), k);
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(done.load(Ordering::SeqCst), 4_000);
    for k in 0..4 {
        assert_eq!(
            max[k].load(Ordering::SeqCst),
            1,
            "key {k} ran twice at once"
        );
    }
    let snap = layer.handle().snapshot();
    assert_eq!(snap.counter("leaders"), Some(calls.get()));
    assert_eq!(
        snap.counter("leaders").unwrap() + snap.counter("followers").unwrap(),
        4_000
    );
    assert_eq!(snap.gauge("in_flight_keys"), Some(0.0));
}

#[test]
fn services_and_response_futures_are_send() {
    fn send<T: Send + 'static>(_: &T) {}
    let mut svc = by_key().layer(sleeper(1, Count::default(), Count::default()));
    send(&svc);
    let fut = svc.call(1);
    send(&fut);
}

#[tokio::test(start_paused = true)]
async fn waiters_sleep_while_the_driver_is_woken_many_times() {
    // The upstream call wakes its driver 50 times over 50 ms (a chatty client).
    let inner = service_fn(|k: u32| async move {
        for _ in 0..50 {
            sleep(Duration::from_millis(1)).await;
        }
        Ok::<_, io::Error>(k)
    });
    let mut svc = by_key().layer(inner);
    let polls: Vec<Count> = (0..4).map(|_| Count::default()).collect();
    let mut tasks = Vec::new();
    for p in &polls {
        let fut = svc.ready().await.unwrap().call(8);
        tasks.push(tokio::spawn(Counted {
            fut: Box::pin(fut),
            polls: p.clone(),
        }));
    }
    for t in tasks {
        assert_eq!(within(t).await.unwrap().unwrap(), 8);
    }
    // The driver: one poll per wake-up (51); each waiter: register, take.
    let counts: Vec<u64> = polls.iter().map(Count::get).collect();
    assert_eq!(counts, vec![51, 2, 2, 2]);
}

/// A layer named "some" for which request 0 has no key (is never coalesced).
fn nonzero_keys() -> U32Layer {
    CoalesceLayer::builder()
        .name("some")
        .key((|k: &u32| (*k != 0).then_some(*k)) as KeyFn)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_key_pass_through_each_with_its_own_call() {
    let rec = TestRecorder::default();
    let layer = rec.install_while(nonzero_keys);
    let handle = layer.handle();
    let (calls, drops) = (Count::default(), Count::default());
    let mut svc = layer.layer(sleeper(10, calls.clone(), drops.clone()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in [0, 0, 0, 5, 5, 5, 0] {
        tasks.push(tokio::spawn(svc.ready().await.unwrap().call(k)));
    }
    settle().await;
    assert_eq!(handle.in_flight_keys(), 1, "only key 5 is in the table");
    let mut got = Vec::new();
    for t in tasks {
        got.push(within(t).await.unwrap().unwrap());
    }
    assert_eq!(got, vec![0, 0, 0, 50, 50, 50, 0]);
    // Four unkeyed calls, each its own; one shared call for the three requests of key 5.
    assert_eq!(calls.get(), 5);
    assert_eq!(drops.get(), 5);
    assert_eq!(Instant::now() - start, Duration::from_millis(10));
    let snap = handle.snapshot();
    assert_eq!(
        (snap.counter("leaders"), snap.counter("followers")),
        (Some(1), Some(2)),
        "requests without a key are not counted"
    );
    let name = ("name", "some");
    assert_eq!(rec.counter(CALLS, &[name, ("role", "leader")]), Some(1));
    assert_eq!(rec.counter(CALLS, &[name, ("role", "follower")]), Some(2));
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_key_gets_the_inner_error_itself() {
    let inner = service_fn(|k: u32| async move {
        Err::<u32, _>(io::Error::new(io::ErrorKind::NotFound, format!("no {k}")))
    });
    let mut svc = nonzero_keys().layer(inner);
    let err = svc.ready().await.unwrap().call(0).await.unwrap_err();
    assert!(err.downcast_ref::<SharedError>().is_none());
    assert_eq!(
        err.downcast_ref::<io::Error>().unwrap().kind(),
        io::ErrorKind::NotFound
    );
    let err = svc.ready().await.unwrap().call(3).await.unwrap_err();
    let shared = err.downcast_ref::<SharedError>().expect("keyed: shared");
    assert_eq!(shared.inner().to_string(), "no 3");
}

#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn http_keys_coalesce_gets_and_pass_posts_through() {
    use tower_breakwater::http::HttpKey;
    type Req = http::Request<()>;
    let calls = Count::default();
    let c = calls.clone();
    let inner = service_fn(move |req: Req| {
        c.incr();
        async move {
            sleep(Duration::from_millis(10)).await;
            Ok::<_, io::Error>(req.method().to_string())
        }
    });
    let keys = HttpKey::new();
    let layer = CoalesceLayer::builder()
        .key(move |req: &Req| keys.key(req))
        .build()
        .unwrap();
    let svc = layer.layer(inner);
    let get = || {
        http::Request::get("https://risk/merchants/1")
            .body(())
            .unwrap()
    };
    let post = || {
        http::Request::post("https://risk/merchants/1")
            .body(())
            .unwrap()
    };
    let all = [get(), post(), get(), post(), get()].map(|r| tokio::spawn(svc.clone().oneshot(r)));
    let mut got = Vec::new();
    for t in all {
        got.push(within(t).await.unwrap().unwrap());
    }
    assert_eq!(got, ["GET", "POST", "GET", "POST", "GET"]);
    assert_eq!(calls.get(), 3, "one GET, two POSTs");
    let snap = layer.handle().snapshot();
    assert_eq!(
        (snap.counter("leaders"), snap.counter("followers")),
        (Some(1), Some(2))
    );
}
