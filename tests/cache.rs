//! Response cache: XFetch early refresh (exact windows with an injected `u`), coalesced
//! fetches, serve-stale-on-error with back-off, classifier, capacity, metrics, shared state
//! and config.
#![cfg(feature = "cache")]

mod support;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use support::{Count, TestRecorder};
use tokio::time::{advance, sleep};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breakwater::cache::{
    CacheBuilder, CacheHandle, CacheLayer, FetchError, FixedTtl, RefreshMode,
};
use tower_breakwater::error::LayerKind;

const S: Duration = Duration::from_secs(1);

/// Lets spawned tasks run.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// The upstream: counts calls, takes `delay` (paused time), answers with its call number,
/// or fails while `fail` is set, or panics (before its delay) while `panic` is set.
#[derive(Clone, Default)]
struct Up {
    calls: Count,
    delay_ms: Arc<AtomicU64>,
    fail: Arc<AtomicBool>,
    panic: Arc<AtomicBool>,
}

impl Up {
    fn new(delay: Duration) -> Self {
        let up = Up::default();
        up.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
        up
    }

    fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    fn service(
        &self,
    ) -> impl Service<u64, Response = u64, Error = io::Error, Future: Send> + Clone + Send + 'static
    {
        let up = self.clone();
        service_fn(move |_key: u64| {
            let up = up.clone();
            async move {
                up.calls.incr();
                let n = up.calls.get();
                assert!(!up.panic.load(Ordering::SeqCst), "upstream panics");
                sleep(Duration::from_millis(up.delay_ms.load(Ordering::SeqCst))).await;
                if up.fail.load(Ordering::SeqCst) {
                    Err(io::Error::other("down"))
                } else {
                    Ok(n)
                }
            }
        })
    }
}

/// A settable `u`.
#[derive(Clone)]
struct U(Arc<Mutex<f64>>);

impl U {
    fn new(u: f64) -> Self {
        U(Arc::new(Mutex::new(u)))
    }
    fn get(&self) -> f64 {
        *self.0.lock().unwrap()
    }
}

type Svc = tower::util::BoxCloneService<u64, u64, tower_breakwater::BoxError>;

type Builder = CacheBuilder<u64, u64, fn(&u64) -> Option<u64>, FixedTtl>;

fn key(k: &u64) -> Option<u64> {
    Some(*k)
}

/// Name `c`, TTL 60 s, `beta`, `staleness`, 5 s retry interval, `u` from `u`.
fn builder(u: &U, beta: f64, staleness: Duration) -> Builder {
    let u = u.clone();
    CacheLayer::builder()
        .name("c")
        .key(key as fn(&u64) -> Option<u64>)
        .ttl(60 * S)
        .beta(beta)
        .max_staleness(staleness)
        .stale_retry_interval(5 * S)
        .random(move || u.get())
}

fn service(up: &Up, b: Builder) -> (Svc, CacheHandle) {
    let layer = b.build().unwrap();
    let handle = layer.handle();
    (Svc::new(layer.layer(up.service())), handle)
}

fn cache(up: &Up, u: &U, beta: f64, staleness: Duration) -> (Svc, CacheHandle) {
    service(up, builder(u, beta, staleness))
}

async fn read(svc: &mut Svc) -> Result<u64, tower_breakwater::BoxError> {
    svc.ready().await?.call(1).await
}

/// Reads at once: the response future must be ready on its first poll (a hit).
fn read_now(svc: &mut Svc) -> u64 {
    svc.call(1)
        .now_or_never()
        .expect("a hit is ready at once")
        .unwrap()
}

/// Fills key 1 with an upstream that takes 2 s: stored at t0 + 2 s, expiry at t0 + 62 s;
/// returns with the clock at the store instant.
async fn filled(beta: f64, u: f64) -> (Up, U, Svc, CacheHandle) {
    filled_with(beta, u, |b| b).await
}

/// As `filled`, with more settings.
async fn filled_with(
    beta: f64,
    u: f64,
    more: impl FnOnce(Builder) -> Builder,
) -> (Up, U, Svc, CacheHandle) {
    let up = Up::new(2 * S);
    let u = U::new(u);
    let (mut svc, h) = service(&up, more(builder(&u, beta, Duration::ZERO)));
    assert_eq!(read(&mut svc).await.unwrap(), 1);
    assert_eq!(up.calls.get(), 1);
    (up, u, svc, h)
}

#[tokio::test(start_paused = true)]
async fn xfetch_beta_1_window_is_delta_for_u_e_inverse() {
    let (up, _u, mut svc, h) = filled(1.0, (-1f64).exp()).await;
    // 3 s before expiry: -2 s * ln(1/e) = 2 s < 3 s: no refresh.
    advance(57 * S).await;
    assert_eq!(read_now(&mut svc), 1);
    settle().await;
    assert_eq!(up.calls.get(), 1);
    // 1.5 s before expiry: 2 s >= 1.5 s: one refresh, the cached value returned at once.
    advance(Duration::from_millis(1_500)).await;
    assert_eq!(read_now(&mut svc), 1);
    settle().await;
    assert_eq!(up.calls.get(), 2);
    assert_eq!(h.snapshot().counter("early_refreshes"), Some(1));
    assert_eq!(h.snapshot().counter("hits"), Some(2));
}

#[tokio::test(start_paused = true)]
async fn xfetch_beta_2_window_is_twice_delta() {
    let (up, _u, mut svc, _h) = filled(2.0, (-1f64).exp()).await;
    // Window 4 s: 4.5 s before expiry no refresh, 3.5 s before one.
    advance(Duration::from_millis(55_500)).await;
    assert_eq!(read_now(&mut svc), 1);
    settle().await;
    assert_eq!(up.calls.get(), 1);
    advance(S).await;
    assert_eq!(read_now(&mut svc), 1);
    settle().await;
    assert_eq!(up.calls.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn u_one_never_refreshes_early_and_a_read_after_expiry_fetches() {
    let (up, _u, mut svc, h) = filled(1.0, 1.0).await;
    for _ in 0..59 {
        advance(S).await;
        assert_eq!(read_now(&mut svc), 1);
    }
    advance(Duration::from_millis(999)).await; // 1 ms before expiry
    assert_eq!(read_now(&mut svc), 1);
    settle().await;
    assert_eq!(up.calls.get(), 1);
    advance(Duration::from_millis(1)).await; // at expiry: expired
    assert_eq!(read(&mut svc).await.unwrap(), 2);
    assert_eq!(up.calls.get(), 2);
    let s = h.snapshot();
    assert_eq!(
        (s.counter("hits"), s.counter("misses")),
        (Some(60), Some(2))
    );
    assert_eq!(s.counter("early_refreshes"), Some(0));
}

#[tokio::test(start_paused = true)]
async fn ten_reads_during_a_refresh_start_nothing_and_the_new_entry_is_used_after() {
    let (up, _u, mut svc, h) = filled(1.0, (-1f64).exp()).await;
    up.set_delay(3 * S); // the refresh takes 3 s: new delta 3 s
    advance(Duration::from_millis(58_500)).await; // 1.5 s before expiry
    assert_eq!(read_now(&mut svc), 1);
    settle().await;
    assert_eq!(up.calls.get(), 2);
    for _ in 0..10 {
        assert_eq!(read_now(&mut svc), 1);
    }
    settle().await;
    assert_eq!(up.calls.get(), 2, "reads during the refresh start nothing");
    assert_eq!(h.snapshot().counter("early_refreshes"), Some(1));
    advance(3 * S).await; // the refresh completes: stored now, expiry now + 60 s, delta 3 s
    settle().await;
    assert_eq!(read_now(&mut svc), 2);
    // New window, 3 s: 3.5 s before the new expiry nothing, 2.5 s before one refresh.
    advance(Duration::from_millis(56_500)).await;
    assert_eq!(read_now(&mut svc), 2);
    settle().await;
    assert_eq!(up.calls.get(), 2);
    advance(S).await;
    assert_eq!(read_now(&mut svc), 2);
    settle().await;
    assert_eq!(up.calls.get(), 3);
}

#[tokio::test(start_paused = true)]
async fn at_expiry_a_thousand_concurrent_readers_make_one_upstream_call() {
    let (up, _u, svc, h) = filled(1.0, 1.0).await;
    advance(60 * S).await;
    let reads = (0..1_000).map(|_| {
        let mut svc = svc.clone();
        async move { svc.ready().await.unwrap().call(1).await.unwrap() }
    });
    let got = futures_util::future::join_all(reads).await;
    assert!(got.iter().all(|v| *v == 2));
    assert_eq!(up.calls.get(), 2);
    assert_eq!(h.snapshot().counter("misses"), Some(1_001));
}

#[tokio::test(start_paused = true)]
async fn failed_fetches_serve_stale_until_staleness_ends_backing_off_between_tries() {
    let up = Up::new(Duration::ZERO);
    let u = U::new(1.0);
    let (mut svc, h) = cache(&up, &u, 1.0, 30 * S);
    assert_eq!(read(&mut svc).await.unwrap(), 1); // expiry t0 + 60 s
    up.fail.store(true, Ordering::SeqCst);
    advance(60 * S).await;
    let mut tries_at = Vec::new();
    for t in 0..30u64 {
        let before = up.calls.get();
        assert_eq!(read(&mut svc).await.unwrap(), 1, "stale at expiry + {t} s");
        settle().await; // a retry runs in the background
        if up.calls.get() > before {
            tries_at.push(t);
        }
        advance(S).await;
    }
    assert_eq!(tries_at, [0, 5, 10, 15, 20, 25], "one try per 5 s back-off");
    // At expiry + max staleness: never served again.
    assert!(read(&mut svc).await.is_err());
    assert_eq!(up.calls.get(), 8);
    let s = h.snapshot();
    assert_eq!(s.counter("stale"), Some(30));
    assert_eq!(s.counter("refresh_errors"), Some(7));
}

#[tokio::test(start_paused = true)]
async fn a_failed_early_refresh_keeps_the_old_value() {
    let (up, u, mut svc, h) = filled(1.0, (-1f64).exp()).await;
    up.fail.store(true, Ordering::SeqCst);
    advance(Duration::from_millis(58_500)).await;
    assert_eq!(read_now(&mut svc), 1);
    settle().await;
    advance(2 * S).await; // the refresh fails; 0.5 s past expiry, no staleness allowed
    settle().await;
    assert_eq!(up.calls.get(), 2);
    assert_eq!(h.snapshot().counter("refresh_errors"), Some(1));
    *u.0.lock().unwrap() = 1.0;
    up.fail.store(false, Ordering::SeqCst);
    advance(5 * S).await; // past the back-off
    assert_eq!(read(&mut svc).await.unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn errors_and_non_success_responses_are_not_cached_and_none_keys_pass_through() {
    let up = Up::new(Duration::ZERO);
    up.fail.store(true, Ordering::SeqCst);
    let layer = CacheLayer::builder()
        .key(|k: &u64| (*k != 0).then_some(*k))
        .ttl(60 * S)
        .classifier(tower_breakwater::classify::classify_fn(
            |r: Result<&u64, &tower_breakwater::BoxError>| match r {
                Ok(v) if v % 2 == 0 => tower_breakwater::classify::Outcome::Failure,
                Ok(_) => tower_breakwater::classify::Outcome::Success,
                Err(_) => tower_breakwater::classify::Outcome::Failure,
            },
        ))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert!(svc.ready().await.unwrap().call(1).await.is_err()); // call 1 fails
    up.fail.store(false, Ordering::SeqCst);
    // Nothing stored, and no stale value to back off with: goes upstream.
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 2); // even: not stored
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 3); // odd: stored
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 3);
    assert_eq!(svc.ready().await.unwrap().call(0).await.unwrap(), 4); // key None
    assert_eq!(svc.ready().await.unwrap().call(0).await.unwrap(), 5);
    assert_eq!(h.snapshot().gauge("entries"), Some(1.0));
}

#[tokio::test(start_paused = true)]
async fn clones_and_services_of_one_layer_share_the_store() {
    let up = Up::new(Duration::ZERO);
    let layer = CacheLayer::builder()
        .key(|k: &u64| Some(*k))
        .ttl(60 * S)
        .build()
        .unwrap();
    let mut a = layer.layer(up.service());
    let mut b = layer.clone().layer(up.service());
    assert_eq!(a.ready().await.unwrap().call(1).await.unwrap(), 1);
    assert_eq!(b.ready().await.unwrap().call(1).await.unwrap(), 1);
    assert_eq!(up.calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn capacity_one_keeps_the_newest_key() {
    let up = Up::new(Duration::ZERO);
    let layer = CacheLayer::builder()
        .key(|k: &u64| Some(*k))
        .ttl(60 * S)
        .max_entries(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    for k in 1..=3 {
        svc.ready().await.unwrap().call(k).await.unwrap();
        advance(S).await;
    }
    assert_eq!(h.snapshot().gauge("entries"), Some(1.0));
    assert_eq!(svc.ready().await.unwrap().call(3).await.unwrap(), 3); // kept
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 4); // evicted
}

#[tokio::test(start_paused = true)]
async fn metrics_are_exact() {
    let rec = TestRecorder::default();
    let up = Up::new(2 * S);
    let layer = rec.install_while(|| {
        CacheLayer::builder()
            .name("m")
            .key(|k: &u64| Some(*k))
            .ttl(60 * S)
            .recompute_histogram(true)
            .random(|| 1.0)
            .build()
            .unwrap()
    });
    let mut svc = layer.layer(up.service());
    svc.ready().await.unwrap().call(1).await.unwrap();
    svc.ready().await.unwrap().call(1).await.unwrap();
    let l = |r| {
        rec.counter(
            "breakwater_cache_lookups_total",
            &[("name", "m"), ("result", r)],
        )
    };
    assert_eq!(
        (l("hit"), l("miss"), l("stale")),
        (Some(1), Some(1), Some(0))
    );
    assert_eq!(
        rec.gauge("breakwater_cache_entries", &[("name", "m")]),
        Some(1.0)
    );
    assert_eq!(
        rec.histogram(
            "breakwater_cache_recompute_duration_seconds",
            &[("name", "m")]
        ),
        Some(vec![2.0])
    );
}

#[test]
fn bad_config_is_a_config_error() {
    let k = |k: &u64| Some(*k);
    let e = CacheLayer::builder().key(k).build().unwrap_err();
    assert_eq!((e.layer(), e.field()), (LayerKind::Cache, "ttl"));
    let e = CacheLayer::builder()
        .key(k)
        .ttl(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "ttl");
    for beta in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = CacheLayer::builder()
            .key(k)
            .ttl(S)
            .beta(beta)
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "beta");
    }
    let e = CacheLayer::builder()
        .key(k)
        .ttl(S)
        .max_entries(0)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "max_entries");
    let e = CacheLayer::builder()
        .key(k)
        .ttl(S)
        .stale_retry_interval(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "stale_retry_interval");
    let e = CacheLayer::builder()
        .key(k)
        .ttl(S)
        .negative_ttl(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "negative_ttl");
    let e = CacheLayer::builder()
        .key(k)
        .ttl(S)
        .refresh_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "refresh_timeout");
    for beta in [f64::MIN_POSITIVE, f64::MAX] {
        assert!(
            CacheLayer::builder()
                .key(k)
                .ttl(S)
                .beta(beta)
                .build()
                .is_ok()
        );
    }
}

/// A read as a task of its own (the paused clock moves while it waits).
fn spawn_read(svc: &Svc) -> tokio::task::JoinHandle<Result<u64, tower_breakwater::BoxError>> {
    let mut svc = svc.clone();
    tokio::spawn(async move { read(&mut svc).await })
}

#[tokio::test(start_paused = true)]
async fn inline_refresh_makes_the_starting_read_wait_and_serves_the_others_at_once() {
    let inline = |b: Builder| b.refresh_mode(RefreshMode::Inline);
    let (up, _u, mut svc, h) = filled_with(1.0, (-1f64).exp(), inline).await;
    advance(Duration::from_millis(58_500)).await; // 1.5 s before expiry: in the 2 s window
    let starter = spawn_read(&svc);
    settle().await;
    assert_eq!(up.calls.get(), 2, "the read started one refresh");
    for _ in 0..10 {
        assert_eq!(
            read_now(&mut svc),
            1,
            "reads during the refresh get the current value"
        );
    }
    settle().await;
    assert_eq!(up.calls.get(), 2, "at most one refresh in flight");
    advance(Duration::from_millis(1_999)).await;
    settle().await;
    assert!(
        !starter.is_finished(),
        "the starting read waits for the refresh (2 s)"
    );
    advance(Duration::from_millis(1)).await;
    assert_eq!(starter.await.unwrap().unwrap(), 2, "and gets the new value");
    assert_eq!(read_now(&mut svc), 2);
    let s = h.snapshot();
    assert_eq!(s.counter("early_refreshes"), Some(1));
    assert_eq!(
        (s.counter("hits"), s.counter("misses")),
        (Some(12), Some(1))
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_inline_refresh_gives_the_starting_read_the_value_it_found() {
    let inline = |b: Builder| b.refresh_mode(RefreshMode::Inline);
    let (up, _u, mut svc, h) = filled_with(1.0, (-1f64).exp(), inline).await;
    up.fail.store(true, Ordering::SeqCst);
    up.set_delay(S);
    advance(Duration::from_millis(58_500)).await;
    let starter = spawn_read(&svc);
    settle().await;
    advance(S).await; // the refresh fails, 0.5 s before expiry
    assert_eq!(starter.await.unwrap().unwrap(), 1);
    assert_eq!(read_now(&mut svc), 1, "the good value stays");
    assert_eq!(up.calls.get(), 2);
    let s = h.snapshot();
    assert_eq!(
        (s.counter("refresh_errors"), s.counter("stale")),
        (Some(1), Some(0))
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_inline_refresh_lets_the_next_early_read_start_one() {
    let inline = |b: Builder| b.refresh_mode(RefreshMode::Inline);
    let (up, _u, mut svc, h) = filled_with(1.0, (-1f64).exp(), inline).await;
    advance(Duration::from_millis(58_500)).await;
    let starter = spawn_read(&svc);
    settle().await;
    assert_eq!(up.calls.get(), 2);
    starter.abort(); // the refresh's only caller leaves: the refresh is dropped
    settle().await;
    let again = spawn_read(&svc);
    settle().await;
    assert_eq!(up.calls.get(), 3, "exactly one new refresh");
    assert_eq!(read_now(&mut svc), 1);
    settle().await;
    assert_eq!(up.calls.get(), 3);
    advance(2 * S).await;
    assert_eq!(again.await.unwrap().unwrap(), 3);
    assert_eq!(h.snapshot().counter("early_refreshes"), Some(2));
}

/// A panicking refresh is a failed one: counted in `refresh_errors`, its flag cleared, and
/// its key backs off (5 s) before the next early refresh. Beta 4: an 8 s window.
#[tokio::test(start_paused = true)]
async fn a_panicking_refresh_backs_off_then_the_next_early_read_starts_one() {
    let (up, _u, mut svc, h) = filled(4.0, (-1f64).exp()).await;
    up.panic.store(true, Ordering::SeqCst);
    advance(Duration::from_millis(52_500)).await; // 7.5 s before expiry
    assert_eq!(read_now(&mut svc), 1);
    settle().await; // the refresh's upstream call panics
    assert_eq!(up.calls.get(), 2);
    assert_eq!(h.snapshot().counter("refresh_errors"), Some(1));
    up.panic.store(false, Ordering::SeqCst);
    advance(Duration::from_millis(4_999)).await;
    assert_eq!(read_now(&mut svc), 1);
    settle().await;
    assert_eq!(up.calls.get(), 2, "backing off");
    advance(Duration::from_millis(1)).await;
    assert_eq!(read_now(&mut svc), 1);
    settle().await;
    assert_eq!(up.calls.get(), 3, "exactly one new refresh");
    for _ in 0..5 {
        assert_eq!(read_now(&mut svc), 1);
    }
    settle().await;
    assert_eq!(up.calls.get(), 3, "and only one");
    advance(2 * S).await;
    settle().await;
    assert_eq!(read_now(&mut svc), 3);
    assert_eq!(h.snapshot().counter("early_refreshes"), Some(2));
}

/// Up, failing; a cache with `more` settings, 10 s staleness; the value 1 stored at t0
/// (expiry t0 + 60 s), then the clock at t0 + 70 s (past the staleness) and the upstream
/// down.
async fn expired_and_down(more: impl FnOnce(Builder) -> Builder) -> (Up, Svc, CacheHandle) {
    let up = Up::new(Duration::ZERO);
    let (mut svc, h) = service(&up, more(builder(&U::new(1.0), 1.0, 10 * S)));
    assert_eq!(read(&mut svc).await.unwrap(), 1);
    up.fail.store(true, Ordering::SeqCst);
    advance(70 * S).await;
    (up, svc, h)
}

fn fetch_error(e: &tower_breakwater::BoxError) -> String {
    e.downcast_ref::<FetchError>()
        .expect("a FetchError")
        .inner()
        .to_string()
}

#[tokio::test(start_paused = true)]
async fn without_negative_ttl_every_read_past_staleness_goes_upstream_coalesced() {
    let (up, mut svc, h) = expired_and_down(|b| b).await;
    for n in 2..=4 {
        assert_eq!(fetch_error(&read(&mut svc).await.unwrap_err()), "down");
        assert_eq!(up.calls.get(), n, "each read goes upstream");
    }
    up.set_delay(S);
    let reads: Vec<_> = (0..5).map(|_| spawn_read(&svc)).collect();
    settle().await;
    advance(S).await;
    for r in reads {
        assert!(r.await.unwrap().is_err());
    }
    assert_eq!(up.calls.get(), 5, "concurrent reads share one call");
    assert_eq!(h.snapshot().counter("negative"), Some(0));
}

#[tokio::test(start_paused = true)]
async fn negative_ttl_remembers_a_failure_with_no_value_to_serve() {
    let (up, mut svc, h) = expired_and_down(|b| b.negative_ttl(10 * S)).await;
    let first = read(&mut svc).await.unwrap_err(); // t0 + 70 s: fails, remembered to t0 + 80 s
    assert_eq!(fetch_error(&first), "down");
    assert_eq!(up.calls.get(), 2);
    for _ in 0..9 {
        advance(S).await;
        let e = read(&mut svc).await.unwrap_err();
        assert_eq!(fetch_error(&e), "down", "the remembered error");
    }
    advance(Duration::from_millis(999)).await;
    assert!(read(&mut svc).await.is_err());
    assert_eq!(up.calls.get(), 2, "no upstream call while remembered");
    advance(Duration::from_millis(1)).await; // t0 + 80 s: forgotten
    up.fail.store(false, Ordering::SeqCst);
    assert_eq!(read(&mut svc).await.unwrap(), 3);
    assert_eq!(read(&mut svc).await.unwrap(), 3);
    let s = h.snapshot();
    assert_eq!(s.counter("negative"), Some(10));
    assert_eq!(s.counter("refresh_errors"), Some(1));
    assert_eq!(s.gauge("entries"), Some(1.0));
}

#[tokio::test(start_paused = true)]
async fn negative_ttl_never_replaces_a_value_that_may_be_served() {
    let up = Up::new(Duration::ZERO);
    let more = |b: Builder| b.negative_ttl(30 * S);
    let (mut svc, h) = service(&up, more(builder(&U::new(1.0), 1.0, 10 * S)));
    // A failed first fetch, with nothing stored: remembered.
    up.fail.store(true, Ordering::SeqCst);
    assert!(read(&mut svc).await.is_err());
    assert!(read(&mut svc).await.is_err());
    assert_eq!(up.calls.get(), 1);
    advance(30 * S).await;
    up.fail.store(false, Ordering::SeqCst);
    assert_eq!(read(&mut svc).await.unwrap(), 2); // stored at t0 + 30 s, expiry t0 + 90 s
    up.fail.store(true, Ordering::SeqCst);
    advance(60 * S).await; // expired: the fetch fails, the stale value is served
    assert_eq!(read(&mut svc).await.unwrap(), 2);
    assert_eq!(up.calls.get(), 3);
    advance(5 * S).await; // past the 5 s back-off, within the 10 s staleness
    assert_eq!(read(&mut svc).await.unwrap(), 2); // the retry runs in the background
    settle().await;
    assert_eq!(up.calls.get(), 4);
    advance(5 * S).await; // expiry + staleness: this failure leaves nothing to serve
    assert!(read(&mut svc).await.is_err());
    assert!(read(&mut svc).await.is_err());
    assert_eq!(up.calls.get(), 5);
    let s = h.snapshot();
    assert_eq!(
        (s.counter("negative"), s.counter("stale")),
        (Some(2), Some(2))
    );
}

#[tokio::test(start_paused = true)]
async fn random_values_outside_the_unit_interval_never_refresh_and_never_panic() {
    for bad in [0.0, -1.0, f64::NAN, 1.5, f64::INFINITY, f64::NEG_INFINITY] {
        let (up, _u, mut svc, h) = filled(1.0, bad).await;
        for _ in 0..20 {
            // Reads across the TTL, every one close enough to expiry (745 * delta) to draw `u`.
            advance(Duration::from_millis(2_950)).await;
            assert_eq!(read_now(&mut svc), 1);
        }
        settle().await;
        assert_eq!(up.calls.get(), 1, "u = {bad}");
        assert_eq!(h.snapshot().counter("early_refreshes"), Some(0));
    }
}

#[tokio::test(start_paused = true)]
async fn the_largest_durations_and_beta_neither_overflow_nor_panic() {
    let up = Up::new(S);
    let layer = CacheLayer::builder()
        .key(key as fn(&u64) -> Option<u64>)
        .ttl(Duration::MAX)
        .beta(f64::MAX)
        .max_staleness(Duration::MAX)
        .stale_retry_interval(Duration::MAX)
        .negative_ttl(Duration::MAX)
        .random(|| 1.0)
        .build()
        .unwrap();
    let mut svc = layer.layer(up.service());
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
    advance(86_400 * S).await;
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
    up.fail.store(true, Ordering::SeqCst);
    assert!(svc.ready().await.unwrap().call(2).await.is_err());
    assert!(svc.ready().await.unwrap().call(2).await.is_err());
    assert_eq!(up.calls.get(), 2);
}

// ---------------------------------------------------------------------------------------
// Capacity and eviction (CLOCK).
// ---------------------------------------------------------------------------------------

/// One read of key `k`, awaited.
async fn get(svc: &mut Svc, k: u64) -> u64 {
    svc.ready().await.unwrap().call(k).await.unwrap()
}

/// A cache of `max` entries, TTL 1 day, over `up`.
fn bounded(up: &Up, max: usize) -> (Svc, CacheHandle) {
    let layer = CacheLayer::builder()
        .key(key as fn(&u64) -> Option<u64>)
        .ttl(86_400 * S)
        .max_entries(max)
        .build()
        .unwrap();
    let handle = layer.handle();
    (Svc::new(layer.layer(up.service())), handle)
}

/// A hot key read between inserts keeps its place while `cold` keys stream through a
/// cache of `max` entries; each cold key is inserted one second after the previous one,
/// so the hot key always expires first (an earliest-expiry or FIFO policy evicts it at the
/// first insert beyond capacity). The entries gauge equals `max` at capacity.
async fn hot_key_survives(max: usize, cold: u64) {
    let up = Up::new(Duration::ZERO);
    let (mut svc, h) = bounded(&up, max);
    assert_eq!(get(&mut svc, 0).await, 1);
    for k in 1..=cold {
        advance(S).await;
        assert_eq!(get(&mut svc, k).await, k + 1, "cold key {k} misses");
        assert_eq!(
            get(&mut svc, 0).await,
            1,
            "the hot key hits after cold key {k}"
        );
    }
    assert_eq!(up.calls.get(), cold + 1);
    assert_eq!(h.snapshot().gauge("entries"), Some(max as f64));
    assert_eq!(h.snapshot().counter("hits"), Some(cold));
    // The first cold key was evicted long ago.
    assert_eq!(get(&mut svc, 1).await, cold + 2);
}

#[tokio::test(start_paused = true)]
async fn a_hot_key_read_between_inserts_survives_a_wave_of_cold_inserts() {
    hot_key_survives(4, 100).await;
}

/// As above with several shards (1,024 entries: up to 16 shards of 64).
#[tokio::test(start_paused = true)]
async fn a_hot_key_survives_cold_inserts_across_shards() {
    hot_key_survives(1_024, 5_000).await;
}

/// A cache filled to `max_entries` holds every key (none was evicted on the way) and the
/// gauge says `max_entries`; one more key takes the place of one of them.
#[tokio::test(start_paused = true)]
async fn the_capacity_is_exactly_max_entries() {
    for max in [1usize, 2, 3, 5, 63, 64, 65, 127, 129, 1_000] {
        let up = Up::new(Duration::ZERO);
        let (mut svc, h) = bounded(&up, max);
        for k in 1..=max as u64 {
            get(&mut svc, k).await;
        }
        for k in 1..=max as u64 {
            assert_eq!(get(&mut svc, k).await, k, "max {max}: key {k} held");
        }
        assert_eq!(up.calls.get(), max as u64, "max {max}");
        assert_eq!(h.snapshot().gauge("entries"), Some(max as f64), "max {max}");
        assert_eq!(get(&mut svc, 0).await, max as u64 + 1);
        assert_eq!(
            get(&mut svc, 0).await,
            max as u64 + 1,
            "max {max}: the new key held"
        );
        assert_eq!(h.snapshot().gauge("entries"), Some(max as f64), "max {max}");
    }
}

/// An entry that can no longer be served goes when the eviction hand reaches it, although
/// it was read (no second chance), before any read fresh entry: 64 entries (one shard), all
/// read; key 1 expires (TTL 10 s, no staleness), the others live 1 h. One new key evicts
/// key 1 and keeps the 63 others.
#[tokio::test(start_paused = true)]
async fn an_expired_entry_is_evicted_before_read_fresh_ones() {
    let up = Up::new(Duration::ZERO);
    let layer = CacheLayer::builder()
        .key(key as fn(&u64) -> Option<u64>)
        .ttl_fn(|n: &u64| Some(if *n == 1 { 10 * S } else { 3_600 * S }))
        .max_entries(64)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = Svc::new(layer.layer(up.service()));
    for k in 1..=64 {
        assert_eq!(get(&mut svc, k).await, k);
        assert_eq!(get(&mut svc, k).await, k);
    }
    advance(11 * S).await;
    assert_eq!(get(&mut svc, 65).await, 65);
    for k in 2..=65 {
        assert_eq!(get(&mut svc, k).await, k, "key {k} held");
    }
    assert_eq!(up.calls.get(), 65);
    assert_eq!(h.snapshot().gauge("entries"), Some(64.0));
}

/// One read of key `k` on its own paused runtime, `after` it starts (each runtime's clock
/// starts from the system's).
fn read_blocking(svc: &Svc, k: u64, after: Duration) -> u64 {
    let mut svc = svc.clone();
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(async move {
            advance(after).await;
            get(&mut svc, k).await
        })
}

/// The random source is user code: it runs after the shard lock is released, as the
/// value's `Clone` does. Probe: while a hit draws `u`, another thread stores a key into the
/// same (single) shard; it completes during the draw. The 60 s bound (real time) only ends
/// the wait when the store is blocked; a passing run never waits for it.
#[test]
fn a_store_completes_while_a_hit_draws_u() {
    type Probe = Box<dyn FnOnce() + Send>;
    let armed: Arc<Mutex<Option<Probe>>> = Arc::default();
    let a = armed.clone();
    let up = Up::new(2 * S); // delta 2 s: every read of a 60 s entry draws `u`
    let layer = CacheLayer::builder()
        .key(key as fn(&u64) -> Option<u64>)
        .ttl(60 * S)
        .max_entries(1) // one shard
        .random(move || {
            let probe = a.lock().unwrap().take();
            if let Some(probe) = probe {
                probe();
            }
            1.0
        })
        .build()
        .unwrap();
    let svc = Svc::new(layer.layer(up.service()));
    assert_eq!(read_blocking(&svc, 1, Duration::ZERO), 1);
    let writer_svc = svc.clone();
    let stored = Arc::new(AtomicBool::new(false));
    let flag = stored.clone();
    let writer = Arc::new(Mutex::new(None));
    let w = writer.clone();
    *armed.lock().unwrap() = Some(Box::new(move || {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            assert_eq!(read_blocking(&writer_svc, 2, Duration::ZERO), 2);
            let _ = tx.send(()); // fails once the probe stopped waiting
        });
        flag.store(rx.recv_timeout(60 * S).is_ok(), Ordering::SeqCst);
        *w.lock().unwrap() = Some(t);
    }));
    // The hit, past the 2 s fetch that stored key 1: its draw runs the probe.
    assert_eq!(read_blocking(&svc, 1, 3 * S), 1);
    let t = writer.lock().unwrap().take().expect("the probe ran");
    t.join().unwrap();
    assert_eq!(up.calls.get(), 2);
    assert!(
        stored.load(Ordering::SeqCst),
        "the store waited for the draw"
    );
}

/// The upstream answers with its call number `n` after `delay`; responses `n >= 2` fail.
/// Each entry's staleness is what `allow` says of its response.
fn allowing(
    up: &Up,
    max_staleness: Option<Duration>,
    allow: Option<Duration>,
) -> (Svc, CacheHandle) {
    let b = CacheLayer::builder()
        .name("c")
        .key(key as fn(&u64) -> Option<u64>)
        .ttl(60 * S)
        .stale_retry_interval(5 * S)
        .random(|| 1.0)
        .staleness_fn(move |_: &u64| allow);
    let layer = match max_staleness {
        Some(d) => b.max_staleness(d).build().unwrap(),
        None => b.build().unwrap(),
    };
    let h = layer.handle();
    (Svc::new(layer.layer(up.service())), h)
}

/// An entry's maximum staleness is the smaller of the configured one and its response's
/// allowance (`None`: the configured one); with the default of zero, nothing is served
/// stale whatever the response allows. Each case: stored at t0, the upstream down, reads at
/// expiry + 9 s and expiry + 11 s (past the 5 s back-off each time).
#[tokio::test(start_paused = true)]
async fn the_staleness_of_an_entry_is_the_smaller_of_configured_and_allowed() {
    let cases = [
        // (max_staleness, allowance, stale at +9 s, stale at +11 s)
        (Some(30 * S), Some(10 * S), true, false),
        (Some(10 * S), Some(30 * S), true, false),
        (Some(10 * S), None, true, false),
        (Some(30 * S), Some(Duration::ZERO), false, false),
        (None, Some(300 * S), false, false),
        (Some(Duration::MAX), Some(300 * S), true, true),
    ];
    for (max, allow, at_9, at_11) in cases {
        let up = Up::new(Duration::ZERO);
        let (mut svc, h) = allowing(&up, max, allow);
        assert_eq!(read(&mut svc).await.unwrap(), 1);
        up.fail.store(true, Ordering::SeqCst);
        advance(69 * S).await;
        assert_eq!(
            read(&mut svc).await.ok(),
            at_9.then_some(1),
            "{max:?} {allow:?}"
        );
        settle().await;
        advance(2 * S).await;
        assert_eq!(
            read(&mut svc).await.ok(),
            at_11.then_some(1),
            "{max:?} {allow:?}"
        );
        settle().await;
        let stale = u64::from(at_9) + u64::from(at_11);
        assert_eq!(
            h.snapshot().counter("stale"),
            Some(stale),
            "{max:?} {allow:?}"
        );
    }
}

/// An inline refresh that hangs fails at its refresh timeout (5 s): the read that started
/// it gets the value it found (still within its 30 s of staleness), the failure is counted
/// with a `TimedOut` event, the hung upstream future is dropped, and after the back-off the
/// key retries in the background.
#[tokio::test(start_paused = true)]
async fn a_hung_inline_refresh_times_out_and_its_read_gets_the_value_it_found() {
    use tower_breakwater::event::EventKind;
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let hang = Arc::new(AtomicBool::new(false));
    let (h2, calls, drops) = (hang.clone(), Count::default(), Count::default());
    let (c2, d2) = (calls.clone(), drops.clone());
    let inner = service_fn(move |_k: u64| {
        c2.incr();
        let n = c2.get();
        let hang = h2.load(Ordering::SeqCst);
        let guard = support::DropGuard(d2.clone());
        async move {
            let _guard = guard;
            sleep(2 * S).await;
            if hang {
                std::future::pending::<()>().await;
            }
            Ok::<_, io::Error>(n)
        }
    });
    let layer = CacheLayer::builder()
        .name("c")
        .key(key as fn(&u64) -> Option<u64>)
        .ttl(60 * S)
        .max_staleness(30 * S)
        .stale_retry_interval(5 * S)
        .refresh_timeout(5 * S)
        .refresh_mode(RefreshMode::Inline)
        .random(|| (-1f64).exp())
        .on_event(move |e| log.lock().unwrap().push(e.kind()))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = Svc::new(layer.layer(inner));
    assert_eq!(read(&mut svc).await.unwrap(), 1); // stored at t0 + 2 s, expiry t0 + 62 s
    hang.store(true, Ordering::SeqCst);
    advance(Duration::from_millis(58_500)).await; // 1.5 s before expiry: in the 2 s window
    let starter = spawn_read(&svc);
    settle().await;
    assert_eq!(calls.get(), 2);
    advance(Duration::from_millis(4_999)).await;
    settle().await;
    assert!(!starter.is_finished(), "waits for the refresh");
    advance(Duration::from_millis(1)).await;
    assert_eq!(starter.await.unwrap().unwrap(), 1, "the value it found");
    assert_eq!(drops.get(), 2, "the hung upstream future is dropped");
    let s = h.snapshot();
    assert_eq!(
        (
            s.counter("hits"),
            s.counter("refresh_errors"),
            s.counter("fetches")
        ),
        (Some(1), Some(1), Some(2))
    );
    assert_eq!(
        *events.lock().unwrap(),
        [
            EventKind::EarlyRefresh,
            EventKind::TimedOut { after: 5 * S }
        ]
    );
    // Backing off (stale now) until t0 + 70.5 s, then one retry in the background.
    assert_eq!(read_now(&mut svc), 1);
    advance(5 * S).await;
    hang.store(false, Ordering::SeqCst);
    assert_eq!(read_now(&mut svc), 1);
    settle().await;
    assert_eq!(calls.get(), 3);
    advance(2 * S).await;
    settle().await;
    assert_eq!(read_now(&mut svc), 3);
}

/// `fetches` counts upstream calls, once per shared call: 1,000 concurrent misses of one
/// key are 1,000 misses and one fetch; a request without a key is passed through, counted
/// apart, and no lookup.
#[tokio::test(start_paused = true)]
async fn fetches_count_upstream_calls_and_pass_throughs_are_counted_apart() {
    let up = Up::new(S);
    let layer = CacheLayer::builder()
        .key(|k: &u64| (*k != 0).then_some(*k))
        .ttl(60 * S)
        .build()
        .unwrap();
    let h = layer.handle();
    let svc = layer.layer(up.service());
    let reads = (0..1_000).map(|_| svc.clone().oneshot(1));
    let got = futures_util::future::join_all(reads).await;
    assert!(got.iter().all(|r| *r.as_ref().unwrap() == 1));
    assert_eq!(svc.clone().oneshot(0).await.unwrap(), 2);
    assert_eq!(up.calls.get(), 2);
    let s = h.snapshot();
    assert_eq!(
        ["misses", "hits", "fetches", "passed_through"].map(|c| s.counter(c).unwrap()),
        [1_000, 0, 1, 1]
    );
}

/// Outside a tokio runtime (here a `futures` executor), a read of a key in outage whose
/// back-off is over has no runtime to retry on in the background: it makes the retry itself
/// and waits for it, getting the stale value when it fails; nothing panics and no refresh
/// flag is left (the next read retries again). A 1 ns TTL and back-off: every read finds
/// the entry expired and the back-off over.
#[test]
fn outside_a_runtime_a_read_in_outage_retries_itself() {
    let calls = Count::default();
    let fail = Arc::new(AtomicBool::new(false));
    let (c, f) = (calls.clone(), fail.clone());
    let inner = service_fn(move |_k: u64| {
        c.incr();
        let res = match f.load(Ordering::SeqCst) {
            true => Err(io::Error::other("down")),
            false => Ok(c.get()),
        };
        async move { res }
    });
    let ns = Duration::from_nanos(1);
    let layer = CacheLayer::builder()
        .key(key as fn(&u64) -> Option<u64>)
        .ttl(ns)
        .max_staleness(3_600 * S)
        .stale_retry_interval(ns)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(inner);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut get = || rt.block_on(async { svc.ready().await.unwrap().call(1).await.unwrap() });
    assert_eq!(get(), 1);
    fail.store(true, Ordering::SeqCst);
    assert_eq!(get(), 1, "stale: in outage now");
    drop(rt);
    for n in [3, 4] {
        let got = svc.call(1).now_or_never();
        assert_eq!(got.map(Result::unwrap), Some(1), "the stale value");
        assert_eq!(calls.get(), n, "the read retried");
    }
    let s = h.snapshot();
    assert_eq!(
        (
            s.counter("stale"),
            s.counter("refresh_errors"),
            s.counter("fetches")
        ),
        (Some(3), Some(3), Some(4))
    );
}
