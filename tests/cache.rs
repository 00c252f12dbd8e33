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
use tower_breakwater::cache::CacheLayer;
use tower_breakwater::error::LayerKind;

const S: Duration = Duration::from_secs(1);

/// Lets spawned tasks run.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// The upstream: counts calls, takes `delay` (paused time), answers with its call number,
/// or fails while `fail` is set.
#[derive(Clone, Default)]
struct Up {
    calls: Count,
    delay_ms: Arc<AtomicU64>,
    fail: Arc<AtomicBool>,
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

fn cache(
    up: &Up,
    u: &U,
    beta: f64,
    staleness: Duration,
) -> (Svc, tower_breakwater::cache::CacheHandle) {
    let u = u.clone();
    let layer = CacheLayer::builder()
        .name("c")
        .key(|k: &u64| Some(*k))
        .ttl(60 * S)
        .beta(beta)
        .max_staleness(staleness)
        .stale_retry_interval(5 * S)
        .random(move || u.get())
        .build()
        .unwrap();
    let handle = layer.handle();
    (Svc::new(layer.layer(up.service())), handle)
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
async fn filled(beta: f64, u: f64) -> (Up, U, Svc, tower_breakwater::cache::CacheHandle) {
    let up = Up::new(2 * S);
    let u = U::new(u);
    let (mut svc, h) = cache(&up, &u, beta, Duration::ZERO);
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
async fn capacity_is_bounded_evicting_the_earliest_expiry() {
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
}
