//! Observability under stress: state gauges across every breaker transition, short Open
//! periods between scrapes, gauges under cancellation and panics, duplicate names, dropped
//! instances, panicking listeners, and recorders installed after build.
#![cfg(all(
    feature = "circuit-breaker",
    feature = "bulkhead",
    feature = "rate-limit",
    feature = "coalesce",
    feature = "cache"
))]

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use support::TestRecorder;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::cache::CacheLayer;
use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use tower_breakwater::coalesce::CoalesceLayer;
use tower_breakwater::event::EventKind;
use tower_breakwater::rate_limit::RateLimitLayer;
use tower_breakwater::registry::Registry;

const STATE: &str = "breakwater_circuit_breaker_state";
const STATES: [&str; 5] = ["closed", "open", "half_open", "forced_open", "disabled"];

/// Every gauge write as a scraper running at that instant would see it: the current value
/// of each gauge, the lowest value each gauge ever held, and, after every write to a breaker
/// state gauge, the states then at 1 (recorded whenever more than one is).
#[derive(Clone, Default)]
struct Watch(Arc<Mutex<Seen>>);

#[derive(Default)]
struct Seen {
    value: BTreeMap<String, f64>,
    min: BTreeMap<String, f64>,
    /// States at 1 together, each time it happened.
    doubles: Vec<Vec<String>>,
    /// Gauge descriptions (a Prometheus exporter's `# HELP` lines).
    help: BTreeMap<String, String>,
}

struct WatchedGauge {
    watch: Watch,
    key: String,
    state: Option<String>,
}

impl WatchedGauge {
    fn write(&self, f: impl FnOnce(f64) -> f64) {
        let mut seen = self.watch.0.lock().unwrap();
        let v = f(seen.value.get(&self.key).copied().unwrap_or(0.0));
        seen.value.insert(self.key.clone(), v);
        // Gauges start at 0 before their first write.
        let min = seen.min.entry(self.key.clone()).or_insert(0.0);
        *min = min.min(v);
        if self.state.is_some() {
            let prefix = self.key.split("state=").next().unwrap().to_owned();
            let ones: Vec<String> = seen
                .value
                .iter()
                .filter(|(k, v)| k.starts_with(&prefix) && **v == 1.0)
                .map(|(k, _)| {
                    k.rsplit("state=")
                        .next()
                        .unwrap()
                        .trim_end_matches('}')
                        .to_owned()
                })
                .collect();
            if ones.len() > 1 && seen.doubles.last() != Some(&ones) {
                seen.doubles.push(ones);
            }
        }
    }
}

impl GaugeFn for WatchedGauge {
    fn increment(&self, value: f64) {
        self.write(|v| v + value);
    }
    fn decrement(&self, value: f64) {
        self.write(|v| v - value);
    }
    fn set(&self, value: f64) {
        self.write(|_| value);
    }
}

struct Ignore;
impl CounterFn for Ignore {
    fn increment(&self, _: u64) {}
    fn absolute(&self, _: u64) {}
}

fn key_string(key: &Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Recorder for Watch {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, name: KeyName, _: Option<Unit>, help: SharedString) {
        let mut seen = self.0.lock().unwrap();
        seen.help.insert(name.as_str().to_owned(), help.to_string());
    }
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(Ignore))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let state = (key.name() == STATE)
            .then(|| key.labels().find(|l| l.key() == "state"))
            .flatten()
            .map(|l| l.value().to_owned());
        Gauge::from_arc(Arc::new(WatchedGauge {
            watch: self.clone(),
            key: key_string(key),
            state,
        }))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

impl Watch {
    fn doubles(&self) -> Vec<Vec<String>> {
        self.0.lock().unwrap().doubles.clone()
    }
    /// `(current, lowest ever)` of every gauge whose key contains `part`.
    fn gauges(&self, part: &str) -> Vec<(String, f64, f64)> {
        let seen = self.0.lock().unwrap();
        seen.value
            .iter()
            .filter(|(k, _)| k.contains(part))
            .map(|(k, v)| (k.clone(), *v, seen.min[k]))
            .collect()
    }
}

/// A breaker that opens after two failures in a window of two, waits 1 s in Open and
/// closes after one successful probe.
fn small_breaker() -> tower_breakwater::circuit_breaker::CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count_based(2))
        .minimum_calls(2)
        .permitted_calls_in_half_open(1)
        .wait_in_open(Duration::from_secs(1))
}

/// An inner service that fails when asked to.
fn flaky() -> impl Service<bool, Response = (), Error = BoxError, Future: Send> + Clone + Send {
    service_fn(|fail: bool| async move {
        if fail {
            Err::<(), BoxError>("down".into())
        } else {
            Ok(())
        }
    })
}

/// Drives a breaker through every kind of transition (natural and through the handle) and
/// returns the states seen at 1 together by a scraper reading between two gauge writes.
async fn states_seen_together() -> (Vec<Vec<String>>, Vec<(String, f64, f64)>) {
    let watch = Watch::default();
    let layer = metrics::with_local_recorder(&watch, || small_breaker().name("b").build()).unwrap();
    let handle = layer.handle();
    let svc = layer.layer(flaky());
    // closed -> open -> half_open -> open -> half_open -> closed
    for _ in 0..2 {
        let _ = svc.clone().oneshot(true).await;
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let _ = svc.clone().oneshot(true).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    svc.clone().oneshot(false).await.unwrap();
    assert_eq!(handle.state().as_str(), "closed");
    // closed -> forced_open -> closed -> disabled -> open? no: disabled -> closed, and
    // forced_open -> disabled -> forced_open -> closed.
    handle.force_open();
    handle.reset();
    handle.disable();
    handle.reset();
    handle.force_open();
    handle.disable();
    handle.force_open();
    handle.reset();
    assert_eq!(handle.state().as_str(), "closed");
    (watch.doubles(), watch.gauges(STATE))
}

/// The `# HELP` line of a resilience4j-profile rate, which the profile publishes in percent,
/// must not say the value is a ratio from 0.0 to 1.0 (as the native gauge's does).
#[test]
fn resilience4j_rates_are_described_in_percent() {
    let watch = Watch::default();
    let layer = metrics::with_local_recorder(&watch, || {
        small_breaker()
            .name("r4j")
            .metrics_profile(tower_breakwater::metrics::MetricsProfile::Resilience4j)
            .build()
    })
    .unwrap();
    drop(layer);
    let seen = watch.0.lock().unwrap();
    let help = |n: &str| seen.help[n].clone();
    assert_eq!(
        watch_values(&seen, "failure_rate"),
        [(
            "resilience4j_circuitbreaker_failure_rate{name=r4j}".to_owned(),
            0.0
        )]
    );
    for name in [
        "resilience4j_circuitbreaker_failure_rate",
        "resilience4j_circuitbreaker_slow_call_rate",
    ] {
        assert!(!help(name).contains("0.0 to 1.0"), "{name}: {}", help(name));
    }
}

fn watch_values(seen: &Seen, part: &str) -> Vec<(String, f64)> {
    seen.value
        .iter()
        .filter(|(k, _)| k.contains(part))
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// Ends where it should: closed at 1, every other state at 0.
#[tokio::test(start_paused = true)]
async fn state_gauges_end_with_exactly_the_current_state_at_1() {
    let (_, gauges) = states_seen_together().await;
    let current: Vec<(String, f64)> = gauges.into_iter().map(|(k, v, _)| (k, v)).collect();
    let expected: Vec<(String, f64)> = [
        ("closed", 1.0),
        ("disabled", 0.0),
        ("forced_open", 0.0),
        ("half_open", 0.0),
        ("open", 0.0),
    ]
    .map(|(s, v)| (format!("{STATE}{{name=b,state={s}}}"), v))
    .into_iter()
    .collect();
    assert_eq!(current, expected);
}

/// A scrape between two writes of a transition must never see two states at 1: a
/// `state-timeline` panel and `sum(...state) > 1` alerts would show a breaker in two states.
#[tokio::test(start_paused = true)]
async fn state_gauges_never_show_two_states_at_once() {
    let (doubles, _) = states_seen_together().await;
    assert_eq!(doubles, Vec::<Vec<String>>::new());
}

/// A breaker Open for 300 ms between two scrapes 15 s apart: the state gauge shows closed at
/// both scrapes, but the transition counters and the time-in-state counter show the period.
#[tokio::test(start_paused = true)]
async fn an_open_period_shorter_than_a_scrape_interval_still_shows() {
    let rec = TestRecorder::default();
    let layer = rec
        .install_while(|| {
            small_breaker()
                .name("brief")
                .wait_in_open(Duration::from_millis(300))
                .build()
        })
        .unwrap();
    let svc = layer.layer(flaky());
    let scrape = |rec: &TestRecorder| {
        rec.dump("brief")
            .into_iter()
            .filter(|l| {
                (l.contains("transitions_total") || l.contains("milliseconds_total"))
                    && !l.ends_with(" 0")
                    || l.starts_with(STATE) && l.ends_with(" 1")
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        scrape(&rec),
        ["breakwater_circuit_breaker_state{state=closed} = 1"]
    );
    tokio::time::advance(Duration::from_millis(2_000)).await;
    for _ in 0..2 {
        let _ = svc.clone().oneshot(true).await;
    }
    tokio::time::advance(Duration::from_millis(300)).await;
    svc.clone().oneshot(false).await.unwrap();
    tokio::time::advance(Duration::from_millis(12_700)).await;
    assert_eq!(
        scrape(&rec),
        [
            "breakwater_circuit_breaker_state_milliseconds_total{state=closed} = 2000",
            "breakwater_circuit_breaker_state_milliseconds_total{state=open} = 300",
            "breakwater_circuit_breaker_state{state=closed} = 1",
            "breakwater_circuit_breaker_transitions_total{from=closed,to=open} = 1",
            "breakwater_circuit_breaker_transitions_total{from=half_open,to=closed} = 1",
            "breakwater_circuit_breaker_transitions_total{from=open,to=half_open} = 1",
        ]
    );
    // The time in the current state shows at the next snapshot (the debug endpoint).
    let _ = layer.handle().snapshot();
    assert!(rec.dump("brief").contains(
        &"breakwater_circuit_breaker_state_milliseconds_total{state=closed} = 14700".to_owned()
    ));
}

/// Polls a future once with a waker that does nothing.
fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
    std::pin::Pin::new(f).poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

/// Bulkhead of 1 with a queue of 2: a holder whose inner future panics, a waiter dropped while
/// queued, a waiter dropped after admission before its first poll of inner, a caller
/// cancelled while holding. Every gauge returns to its idle value, none ever below 0.
#[tokio::test(start_paused = true)]
async fn bulkhead_gauges_stay_in_range_under_cancellation_and_panics() {
    let watch = Watch::default();
    let layer = metrics::with_local_recorder(&watch, || {
        BulkheadLayer::builder()
            .name("bh")
            .max_concurrent_calls(1)
            .max_waiting(2)
            .max_wait(Duration::from_secs(1))
            .build()
    })
    .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut svc = layer.layer(service_fn(move |panic: bool| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|go| *go).await;
            assert!(!panic, "inner panicked");
            Ok::<(), BoxError>(())
        }
    }));
    let holder = tokio::spawn(svc.clone().oneshot(true));
    tokio::task::yield_now().await;
    let mut queued = Box::pin(svc.call(false));
    assert!(poll_once(&mut queued).is_pending());
    let mut queued2 = Box::pin(svc.call(false));
    assert!(poll_once(&mut queued2).is_pending());
    drop(queued);
    tx.send(true).unwrap();
    assert!(holder.await.unwrap_err().is_panic());
    // The second waiter got the permit; cancel it before it completes.
    assert!(poll_once(&mut queued2).is_ready());
    let (tx2, rx2) = tokio::sync::watch::channel(false);
    let mut held = layer.layer(service_fn(move |_: ()| {
        let mut rx = rx2.clone();
        async move {
            let _ = rx.wait_for(|go| *go).await;
            Ok::<(), BoxError>(())
        }
    }));
    let mut cancelled = Box::pin(held.call(()));
    assert!(poll_once(&mut cancelled).is_pending());
    drop(cancelled);
    drop(tx2);
    let got: Vec<(String, f64, f64)> = watch.gauges("bulkhead");
    let want = [
        ("available_permits", 1.0, 0.0),
        ("in_flight", 0.0, 0.0),
        ("max_permits", 1.0, 0.0),
        ("waiting", 0.0, 0.0),
    ]
    .map(|(n, v, m)| (format!("breakwater_bulkhead_{n}{{name=bh}}"), v, m));
    assert_eq!(got, want);
}

/// An upstream answering its key after 10 ms, panicking for key 0.
fn upstream() -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + Send {
    service_fn(|x: u32| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(x != 0, "upstream bug");
        Ok::<_, BoxError>(x)
    })
}

/// Asserts the current and lowest value of the gauge `key` (`metric{labels}`).
#[track_caller]
fn assert_gauge(watch: &Watch, key: &str, current: f64, lowest: f64) {
    assert_eq!(watch.gauges(key), [(key.to_owned(), current, lowest)]);
}

/// Coalescing: a leader cancelled while followers wait, a shared call that panics, an
/// abandoned key. The in-flight keys gauge returns to 0 and never goes below.
#[tokio::test(start_paused = true)]
async fn coalesce_in_flight_keys_stay_in_range_under_cancellation_and_panics() {
    let watch = Watch::default();
    let layer = metrics::with_local_recorder(&watch, || {
        CoalesceLayer::builder()
            .name("co")
            .key(|x: &u32| Some(*x))
            .build()
    })
    .unwrap();
    let mut svc = layer.layer(upstream());
    // Key 1: leader dropped, follower carries on. Key 0: panics. Key 2: abandoned.
    let mut leader = Box::pin(svc.call(1));
    let mut follower = Box::pin(svc.call(1));
    let mut p1 = Box::pin(svc.call(0));
    let mut p2 = Box::pin(svc.call(0));
    let mut gone = Box::pin(svc.call(2));
    for f in [&mut leader, &mut follower, &mut p1, &mut p2, &mut gone] {
        assert!(poll_once(f).is_pending());
    }
    assert_gauge(
        &watch,
        "breakwater_coalesce_in_flight_keys{name=co}",
        3.0,
        0.0,
    );
    drop(leader);
    drop(gone);
    let (a, b, c) = tokio::join!(follower, tokio::spawn(p1), tokio::spawn(p2));
    assert_eq!(a.unwrap(), 1);
    // The caller polling the shared call sees the panic or an error; the other an error.
    let outcomes = [b, c].map(|r| match r {
        Ok(Ok(_)) => "ok",
        Ok(Err(_)) => "error",
        Err(e) if e.is_panic() => "panic",
        Err(_) => "cancelled",
    });
    assert_eq!(outcomes, ["panic", "error"]);
    assert_gauge(
        &watch,
        "breakwater_coalesce_in_flight_keys{name=co}",
        0.0,
        0.0,
    );
}

/// Cache: a miss whose fetch is cancelled, a miss whose fetch panics, a filled entry. The
/// entries gauge counts the one entry held and never went below 0.
#[tokio::test(start_paused = true)]
async fn cache_entries_stay_in_range_under_cancellation_and_panics() {
    let watch = Watch::default();
    let layer = metrics::with_local_recorder(&watch, || {
        CacheLayer::builder()
            .name("ca")
            .key(|x: &u32| Some(*x))
            .ttl(Duration::from_secs(60))
            .build()
    })
    .unwrap();
    let mut svc = layer.layer(upstream());
    let mut cancelled = Box::pin(svc.call(7));
    assert!(poll_once(&mut cancelled).is_pending());
    drop(cancelled);
    let panicked = tokio::spawn(svc.clone().oneshot(0)).await;
    assert!(panicked.unwrap_err().is_panic());
    assert_eq!(svc.clone().oneshot(3).await.unwrap(), 3);
    assert_eq!(svc.clone().oneshot(3).await.unwrap(), 3);
    assert_gauge(&watch, "breakwater_cache_entries{name=ca}", 1.0, 0.0);
}

/// Rate limiter in wait mode (10/s, burst 1, wait up to 250 ms): two waiters, one dropped
/// while waiting, one admitted; the waiting gauge returns to 0 and never went below, the
/// available permits gauge never went below 0.
#[tokio::test(start_paused = true)]
async fn rate_limiter_waiting_stays_in_range_under_cancellation() {
    let watch = Watch::default();
    let layer = metrics::with_local_recorder(&watch, || {
        RateLimitLayer::builder()
            .name("rl")
            .rate(10, Duration::from_secs(1))
            .burst(1)
            .max_wait(Duration::from_millis(250))
            .build()
    })
    .unwrap();
    let mut svc = layer.layer(service_fn(|x: u32| {
        std::future::ready(Ok::<_, BoxError>(x))
    }));
    assert_eq!(svc.call(1).await.unwrap(), 1);
    let mut a = Box::pin(svc.call(2));
    let mut b = Box::pin(svc.call(3));
    assert!(poll_once(&mut a).is_pending());
    assert!(poll_once(&mut b).is_pending());
    assert_gauge(&watch, "breakwater_rate_limiter_waiting{name=rl}", 2.0, 0.0);
    drop(a);
    tokio::time::advance(Duration::from_millis(200)).await;
    assert_eq!(b.await.unwrap(), 3);
    let got = watch.gauges("rate_limiter");
    assert_eq!(
        got.iter()
            .map(|(k, v, m)| (k.as_str(), *v, *m))
            .collect::<Vec<_>>(),
        [
            (
                "breakwater_rate_limiter_available_permits{name=rl}",
                0.0,
                0.0
            ),
            ("breakwater_rate_limiter_waiting{name=rl}", 0.0, 0.0),
        ]
    );
}

/// Two breakers with the same name: counters add up (as documented), both are in the
/// registry under that name, and dropping one leaves the other.
#[tokio::test(start_paused = true)]
async fn two_instances_with_the_same_name_add_up_and_leave_the_registry_one_by_one() {
    let rec = TestRecorder::default();
    let registry = Registry::new();
    let build = || {
        rec.install_while(|| small_breaker().name("dup").registry(&registry).build())
            .unwrap()
    };
    let (a, b) = (build(), build());
    let (sa, sb) = (a.layer(flaky()), b.layer(flaky()));
    sa.clone().oneshot(false).await.unwrap();
    sb.clone().oneshot(false).await.unwrap();
    let _ = sb.clone().oneshot(true).await;
    let calls = |o| {
        rec.counter(
            "breakwater_circuit_breaker_calls_total",
            &[("name", "dup"), ("outcome", o)],
        )
    };
    assert_eq!((calls("success"), calls("failure")), (Some(2), Some(1)));
    let names = |r: &Registry| r.snapshot().into_iter().map(|s| s.name).collect::<Vec<_>>();
    assert_eq!(names(&registry), ["dup", "dup"]);
    drop(a);
    assert_eq!(
        names(&registry),
        ["dup", "dup"],
        "a service keeps its instance"
    );
    drop(sa);
    assert_eq!(names(&registry), ["dup"]);
    drop((b, sb));
    assert_eq!(registry.len(), 0);
}

/// A breaker whose listener panics on transitions while `panicking` is set.
fn panicking_listener(rec: &TestRecorder, panicking: &Arc<AtomicBool>) -> CircuitBreakerLayer {
    let p = panicking.clone();
    rec.install_while(|| {
        small_breaker()
            .name("lp")
            .on_event(move |e| {
                if matches!(e.kind(), EventKind::StateTransition { .. }) && p.load(Ordering::SeqCst)
                {
                    panic!("listener bug");
                }
            })
            .build()
    })
    .unwrap()
}

/// A listener that panics on the trip unwinds into the call that tripped the breaker (as
/// documented), and the breaker stays consistent: Open, rejecting, the transition counted.
#[tokio::test(start_paused = true)]
async fn a_listener_panicking_on_the_trip_leaves_the_breaker_open_and_counted() {
    let panicking = Arc::new(AtomicBool::new(true));
    let rec = TestRecorder::default();
    let layer = panicking_listener(&rec, &panicking);
    let handle = layer.handle();
    let svc = layer.layer(flaky());
    let _ = svc.clone().oneshot(true).await;
    let trip = tokio::spawn(svc.clone().oneshot(true)).await;
    assert!(trip.unwrap_err().is_panic());
    assert_eq!(handle.state().as_str(), "open");
    assert!(
        svc.clone().oneshot(false).await.is_err(),
        "rejected while open"
    );
    let counter = |name, labels: &[(&str, &str)]| {
        let mut all = vec![("name", "lp")];
        all.extend_from_slice(labels);
        rec.counter(name, &all)
    };
    assert_eq!(
        [
            counter(
                "breakwater_circuit_breaker_transitions_total",
                &[("from", "closed"), ("to", "open")]
            ),
            counter(
                "breakwater_circuit_breaker_calls_total",
                &[("outcome", "failure")]
            ),
            counter(
                "breakwater_circuit_breaker_calls_total",
                &[("outcome", "rejected")]
            ),
        ],
        [Some(1), Some(2), Some(1)]
    );
    assert_eq!(
        rec.gauge(STATE, &[("name", "lp"), ("state", "open")]),
        Some(1.0)
    );
}

/// The call that finds the wait over makes the breaker half-open and takes a probe slot; a
/// listener panicking on that transition unwinds out of `call` before the slot is guarded,
/// so the slot is never given back and the breaker rejects every call from then on.
#[tokio::test(start_paused = true)]
async fn a_listener_panicking_on_half_open_loses_no_probe_slot() {
    let panicking = Arc::new(AtomicBool::new(true));
    let rec = TestRecorder::default();
    let layer = panicking_listener(&rec, &panicking);
    let handle = layer.handle();
    let svc = layer.layer(flaky());
    for _ in 0..2 {
        let _ = tokio::spawn(svc.clone().oneshot(true)).await;
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let probe = tokio::spawn(svc.clone().oneshot(false)).await;
    assert!(probe.unwrap_err().is_panic());
    panicking.store(false, Ordering::SeqCst);
    assert_eq!(handle.state().as_str(), "half_open");
    assert_eq!(handle.snapshot().gauge("probes_in_flight"), Some(0.0));
    svc.clone().oneshot(false).await.unwrap();
    assert_eq!(handle.state().as_str(), "closed");
}

/// Handles are registered at build: a layer built before the recorder is installed emits
/// nothing to it, even for calls made while it is installed; one built after does.
#[tokio::test(start_paused = true)]
async fn a_recorder_installed_after_build_sees_nothing() {
    let early = small_breaker().name("early").build().unwrap();
    let rec = TestRecorder::default();
    let svc = early.layer(flaky());
    let fut = rec.install_while(|| svc.clone().oneshot(true));
    let _ = fut.await;
    rec.install_while(|| {
        let _ = early.handle().snapshot();
        early.handle().force_open();
    });
    assert_eq!(rec.names(), Vec::<String>::new());
    let _late = rec.install_while(|| small_breaker().name("late").build().unwrap());
    assert_eq!(
        rec.gauge(STATE, &[("name", "late"), ("state", "closed")]),
        Some(1.0)
    );
    assert!(STATES.iter().all(|s| {
        rec.gauge(STATE, &[("name", "early"), ("state", s)])
            .is_none()
    }));
}

/// The Off profile registers nothing, also when calls go through its layers and its
/// breaker changes state.
#[tokio::test(start_paused = true)]
async fn the_off_profile_registers_nothing_even_under_traffic() {
    let rec = TestRecorder::default();
    let layer = rec
        .install_while(|| {
            small_breaker()
                .name("off")
                .record_durations(true)
                .metrics_profile(tower_breakwater::metrics::MetricsProfile::Off)
                .build()
        })
        .unwrap();
    let svc = layer.layer(flaky());
    for fail in [true, true, false] {
        let _ = rec.install_while(|| svc.clone().oneshot(fail)).await;
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let _ = rec.install_while(|| svc.clone().oneshot(false)).await;
    rec.install_while(|| {
        let _ = layer.handle().snapshot();
    });
    assert_eq!(layer.handle().state().as_str(), "closed");
    assert_eq!(rec.names(), Vec::<String>::new());
}

/// With `tracing`, transitions through the handle are logged at the documented levels:
/// forced open at `WARN` (a breaker that rejects everything), disable and reset at `INFO`.
#[cfg(feature = "tracing")]
#[test]
fn handle_transitions_reach_tracing_at_their_levels() {
    use tracing::{Level, Subscriber};

    /// Records the level and the `event` field of every event of the crate.
    #[derive(Clone, Default)]
    struct Levels(Arc<Mutex<Vec<(Level, String)>>>);
    struct EventField(String);
    impl tracing::field::Visit for EventField {
        fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
            if f.name() == "event" {
                self.0 = format!("{v:?}");
            }
        }
    }
    impl Subscriber for Levels {
        fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
            m.target() == "tower_breakwater"
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, e: &tracing::Event<'_>) {
            let mut f = EventField(String::new());
            e.record(&mut f);
            self.0.lock().unwrap().push((*e.metadata().level(), f.0));
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    let levels = Levels::default();
    tracing::subscriber::with_default(levels.clone(), || {
        let handle = small_breaker().name("h").build().unwrap().handle();
        handle.force_open();
        handle.disable();
        handle.reset();
    });
    let t = |from, to| format!("StateTransition {{ from: {from:?}, to: {to:?} }}");
    assert_eq!(
        levels.0.lock().unwrap().clone(),
        [
            (Level::WARN, t("closed", "forced_open")),
            (Level::INFO, t("forced_open", "disabled")),
            (Level::INFO, t("disabled", "closed")),
        ]
    );
}

/// The dashboard's queries read each metric the way its kind asks: counters only through
/// `rate` or `increase`, gauges and summaries never rated, summaries by `quantile`, every
/// selector filtered by the `name` variable (per dependency); the breaker state has a
/// state timeline.
#[test]
fn dashboard_queries_read_each_metric_by_its_kind_per_dependency() {
    use tower_breakwater::metrics::MetricKind;
    use tower_breakwater::metrics::names::ALL;

    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dashboards/tower-breakwater.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut read = Vec::new();
    let mut timeline = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let mut at = 0;
            while let Some(i) = expr[at..].find("breakwater_").map(|i| i + at) {
                let end = expr[i..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(expr.len(), |e| e + i);
                let name = &expr[i..end];
                let kind = ALL.iter().find(|s| s.name == name).unwrap().kind;
                let rated = expr[..i].ends_with("rate(") || expr[..i].ends_with("increase(");
                let selector = &expr[end..end + expr[end..].find('}').unwrap() + 1];
                assert!(selector.starts_with("{name=~\"$name\""), "{expr}");
                let quantile = selector.contains("quantile=");
                assert_eq!(
                    (rated, quantile),
                    (kind == MetricKind::Counter, kind == MetricKind::Histogram),
                    "{expr}"
                );
                read.push(name);
                if panel["type"] == "state-timeline" {
                    timeline.push(name);
                }
                at = end;
            }
        }
    }
    assert_eq!(timeline, ["breakwater_circuit_breaker_state"]);
    read.sort();
    read.dedup();
    assert_eq!(read.len(), ALL.len(), "every metric has a panel");
}

/// The time-in-state counter is brought up to date at transitions and snapshots only (as
/// documented): a breaker forced open for a minute shows no forced-open time until a snapshot
/// (a `/debug/resilience` request) or its next transition.
#[tokio::test(start_paused = true)]
async fn time_in_a_held_state_shows_at_the_next_snapshot_or_transition() {
    let rec = TestRecorder::default();
    let handle = rec
        .install_while(|| small_breaker().name("held").build())
        .unwrap()
        .handle();
    let ms = |state| {
        rec.counter(
            "breakwater_circuit_breaker_state_milliseconds_total",
            &[("name", "held"), ("state", state)],
        )
    };
    handle.force_open();
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(ms("forced_open"), Some(0));
    let _ = handle.snapshot();
    assert_eq!(ms("forced_open"), Some(60_000));
    tokio::time::advance(Duration::from_millis(1_500)).await;
    handle.reset();
    assert_eq!((ms("forced_open"), ms("closed")), (Some(61_500), Some(0)));
}
