//! With the `tracing` feature, events reach `tracing` with the instance name as a field, at the
//! levels an operator expects: a breaker opening and a panicked shared call at WARN, other
//! transitions at INFO, per-call events (rejections, timeouts, cache refreshes and stale
//! serves, coalesced calls) at DEBUG, rate-limiter waits at TRACE.
#![cfg(all(feature = "tracing", feature = "circuit-breaker", feature = "timeout"))]

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{Layer, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use tower_breakwater::timeout::TimeoutLayer;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Records every event as (level, "field=value ..." for the fields `layer`, `name`, `event`).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(Level, String)>>>);

struct Fields(String);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() != "message" {
            let _ = write!(self.0, "{}={} ", field.name(), value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "event" {
            let _ = write!(self.0, "event={value:?} ");
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        if event.metadata().target() != "tower_breakwater" {
            return;
        }
        let mut f = Fields(String::new());
        event.record(&mut f);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), f.0.trim_end().to_owned()));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Runs `f` on a current-thread runtime with a paused clock, capturing the crate's tracing
/// events; returns them as (level, fields).
fn capture<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F) -> Vec<(Level, String)> {
    let capture = Capture::default();
    tracing::subscriber::with_default(capture.clone(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(f());
    });
    capture.0.lock().unwrap().clone()
}

/// `(level, fields)` pairs as the capture records them.
fn events(expected: &[(Level, &str)]) -> Vec<(Level, String)> {
    expected
        .iter()
        .map(|(l, s)| (*l, (*s).to_owned()))
        .collect()
}

#[test]
fn transitions_and_per_call_events_reach_tracing_at_their_levels() {
    let got = capture(|| async {
        let breaker = CircuitBreakerLayer::builder()
            .name("pay")
            .sliding_window(SlidingWindow::count_based(2))
            .minimum_calls(2)
            .build()
            .unwrap();
        let svc = breaker.layer(service_fn(|_: ()| async {
            Err::<(), BoxError>("down".into())
        }));
        for _ in 0..3 {
            let _ = svc.clone().oneshot(()).await;
        }
        // After the wait in Open, the next call is a probe: half-open at INFO.
        tokio::time::advance(Duration::from_secs(60)).await;
        let _ = svc.clone().oneshot(()).await;
        let timeout = TimeoutLayer::builder()
            .name("inv")
            .timeout(Duration::from_millis(5))
            .build()
            .unwrap();
        let slow = timeout.layer(service_fn(|_: ()| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<(), BoxError>(())
        }));
        let _ = slow.oneshot(()).await;
    });
    assert_eq!(
        got,
        vec![
            (
                Level::WARN,
                r#"layer=circuit_breaker name=pay event=StateTransition { from: "closed", to: "open" }"#
                    .to_owned()
            ),
            (
                Level::DEBUG,
                "layer=circuit_breaker name=pay event=Rejected { kind: CircuitOpen, retry_after: Some(60s) }"
                    .to_owned()
            ),
            (
                Level::INFO,
                r#"layer=circuit_breaker name=pay event=StateTransition { from: "open", to: "half_open" }"#
                    .to_owned()
            ),
            (
                Level::DEBUG,
                "layer=timeout name=inv event=TimedOut { after: 5ms }".to_owned()
            ),
        ]
    );
}

/// Rejections with their reason and retry-after at DEBUG, waits at TRACE.
#[cfg(feature = "rate-limit")]
#[test]
fn rate_limiter_rejections_and_waits() {
    use tower_breakwater::rate_limit::RateLimitLayer;

    let got = capture(|| async {
        let ok = || service_fn(|x: u32| async move { Ok::<_, BoxError>(x) });
        // 10 per second, burst 1, waiting up to 150 ms.
        let waiting = RateLimitLayer::builder()
            .name("geo")
            .rate(10, Duration::from_secs(1))
            .burst(1)
            .max_wait(Duration::from_millis(150))
            .build()
            .unwrap()
            .layer(ok());
        let (a, b, c) = tokio::join!(
            waiting.clone().oneshot(1),
            waiting.clone().oneshot(2),
            waiting.clone().oneshot(3)
        );
        assert_eq!((a.unwrap(), b.unwrap()), (1, 2));
        assert!(c.is_err());
        let keyed = RateLimitLayer::builder()
            .name("tenants")
            .rate(1, Duration::from_secs(1))
            .keyed(|x: &u32| *x)
            .max_keys(1)
            .build()
            .unwrap()
            .layer(ok());
        assert!(keyed.clone().oneshot(1).await.is_ok());
        assert!(keyed.clone().oneshot(2).await.is_err());
    });
    assert_eq!(
        got,
        events(&[
            (
                Level::DEBUG,
                "layer=rate_limiter name=geo event=Rejected { kind: RateLimited, retry_after: Some(200ms) }",
            ),
            (
                Level::TRACE,
                "layer=rate_limiter name=geo event=Waited { waited: 100ms }",
            ),
            (
                Level::DEBUG,
                "layer=rate_limiter name=tenants event=Rejected { kind: TooManyKeys, retry_after: None }",
            ),
        ])
    );
}

/// A call shared with followers at DEBUG; a shared call that panics at WARN.
#[cfg(feature = "coalesce")]
#[test]
fn coalescing_shared_and_panicked_calls() {
    use tower_breakwater::coalesce::CoalesceLayer;

    let got = capture(|| async {
        let layer = CoalesceLayer::builder()
            .name("profiles")
            .key(|x: &u32| Some(*x))
            .build()
            .unwrap();
        let svc = layer.layer(service_fn(|x: u32| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(x != 0, "upstream bug");
            Ok::<_, BoxError>(x)
        }));
        let (a, b, c) = tokio::join!(
            svc.clone().oneshot(7),
            svc.clone().oneshot(7),
            svc.clone().oneshot(7)
        );
        assert_eq!((a.unwrap(), b.unwrap(), c.unwrap()), (7, 7, 7));
        // Key 0 panics: the caller that polled it gets the panic (its task fails), the other
        // an error.
        let first = tokio::spawn(svc.clone().oneshot(0));
        tokio::task::yield_now().await;
        let second = tokio::spawn(svc.clone().oneshot(0));
        assert!(first.await.unwrap_err().is_panic());
        assert!(second.await.unwrap().is_err());
    });
    assert_eq!(
        got,
        events(&[
            (
                Level::DEBUG,
                "layer=coalesce name=profiles event=Coalesced { followers: 2 }",
            ),
            (Level::WARN, "layer=coalesce name=profiles event=Panicked"),
        ])
    );
}

/// An early refresh, then (the upstream down) a failed fetch answered with the stale value
/// and a read during the back-off served stale: all at DEBUG.
#[cfg(feature = "cache")]
#[test]
fn cache_early_refresh_refresh_failure_and_stale_serves() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use tower_breakwater::cache::CacheLayer;

    let got = capture(|| async {
        let u = Arc::new(AtomicU64::new(1f64.to_bits()));
        let draw = u.clone();
        let down = Arc::new(AtomicBool::new(false));
        let fail = down.clone();
        let layer = CacheLayer::builder()
            .name("quotes")
            .key(|k: &u32| Some(*k))
            .ttl(Duration::from_secs(60))
            .max_staleness(Duration::from_secs(30))
            .random(move || f64::from_bits(draw.load(Ordering::SeqCst)))
            .build()
            .unwrap();
        let svc = layer.layer(service_fn(move |k: u32| {
            let fail = fail.load(Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if fail {
                    Err::<u32, BoxError>("down".into())
                } else {
                    Ok(k)
                }
            }
        }));
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1); // stored at 2 s, delta 2 s
        // 1.5 s before expiry with u = 1/e: an early refresh, run in the background.
        tokio::time::advance(Duration::from_millis(58_500)).await;
        u.store((-1f64).exp().to_bits(), Ordering::SeqCst);
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
        u.store(1f64.to_bits(), Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await; // the refresh ends: let it store
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        down.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(60)).await; // expired
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1); // fetch fails: stale
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1); // backing off: stale
    });
    assert_eq!(
        got,
        events(&[
            (Level::DEBUG, "layer=cache name=quotes event=EarlyRefresh"),
            (Level::DEBUG, "layer=cache name=quotes event=RefreshFailed"),
            (Level::DEBUG, "layer=cache name=quotes event=StaleServed"),
            (Level::DEBUG, "layer=cache name=quotes event=StaleServed"),
        ])
    );
}
