//! The two clients of the checkout service, unprotected and protected, and one checkout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::CACHE_CONTROL;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::Layer;
use tower::ServiceExt;
use tower::util::BoxCloneService;
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadHandle;
use tower_breakwater::cache::CacheHandle;
use tower_breakwater::circuit_breaker::{CircuitBreakerHandle, SlidingWindow};
use tower_breakwater::coalesce::CoalesceHandle;
use tower_breakwater::http::{HttpClassifier, HttpKey, is_storable, max_age};
use tower_breakwater::preset::Dependency;

use crate::load::Phase;

/// An HTTP client as a service, with the body buffered.
pub type HttpService = BoxCloneService<Request<Full<Bytes>>, Response<Bytes>, BoxError>;

/// The knobs of the protected stack.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Fraud checks per second the rate limiter lets through.
    pub fraud_rate: u64,
    /// Fraud checks in flight the bulkhead allows.
    pub fraud_concurrency: usize,
    /// How long the breaker stays open before probing.
    pub breaker_wait: Duration,
    /// The breaker's count window and its minimum number of calls.
    pub breaker_window: (u64, u64),
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            fraud_rate: 150,
            fraud_concurrency: 8,
            breaker_wait: Duration::from_secs(2),
            breaker_window: (40, 20),
        }
    }
}

/// The clients of one run, with handles on the protected layers.
#[allow(dead_code)] // the handles are read by the integration test
pub struct Clients {
    /// Risk-profile lookups (the body buffered, so responses are cheap to clone and share).
    pub risk: HttpService,
    pub fraud: HttpService,
    pub breaker: Option<CircuitBreakerHandle>,
    pub bulkhead: Option<BulkheadHandle>,
    /// The risk-profile cache.
    pub cache: Option<CacheHandle>,
    /// The coalescing under the risk-profile cache.
    pub coalesce: Option<CoalesceHandle>,
    /// The most fraud checks the client had in flight at once (below every layer).
    pub fraud_client_peak: Arc<AtomicUsize>,
}

fn http_client() -> HttpService {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    BoxCloneService::new(tower::service_fn(move |req: Request<Full<Bytes>>| {
        let client = client.clone();
        async move {
            let (parts, body) = client.request(req).await?.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, BoxError>(Response::from_parts(parts, body))
        }
    }))
}

/// An HTTP client that records its peak number of requests in flight.
fn counted_client(peak: Arc<AtomicUsize>) -> HttpService {
    let inner = http_client();
    let now = Arc::new(AtomicUsize::new(0));
    BoxCloneService::new(tower::service_fn(move |req: Request<Full<Bytes>>| {
        let (inner, now, peak) = (inner.clone(), now.clone(), peak.clone());
        async move {
            struct Leave(Arc<AtomicUsize>);
            impl Drop for Leave {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            peak.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            let _leave = Leave(now);
            inner.oneshot(req).await
        }
    }))
}

/// A plain per-request client timeout, as most HTTP clients have (no other protection).
fn with_client_timeout(inner: HttpService, timeout: Duration) -> HttpService {
    BoxCloneService::new(tower::service_fn(move |req: Request<Full<Bytes>>| {
        let call = inner.clone().oneshot(req);
        async move { tokio::time::timeout(timeout, call).await? }
    }))
}

/// The unprotected clients: only a plain 1 s client timeout per request; no deadline across
/// waits, no limit, no breaker, no cache, no coalescing.
pub fn unprotected() -> Clients {
    let peak = Arc::new(AtomicUsize::new(0));
    let timeout = Duration::from_secs(1);
    Clients {
        risk: with_client_timeout(http_client(), timeout),
        fraud: with_client_timeout(counted_client(peak.clone()), timeout),
        breaker: None,
        bulkhead: None,
        cache: None,
        coalesce: None,
        fraud_client_peak: peak,
    }
}

/// The protected clients.
///
/// Fraud checks, through the dependency preset (`tower_breakwater::preset`), outermost first:
/// an overall 400 ms deadline bounds limiter wait + bulkhead wait + call; a rate limiter
/// (GCRA, `fraud_rate` per second, burst 20, waiting at most 50 ms) keeps us below what the
/// API can serve (by default 150/s against the ~200 checks/s of 4 workers x 20 ms: a 25%
/// margin, so that the burst, the API's other callers and its own jitter do not build a queue
/// there); a bulkhead (`fraud_concurrency` in flight, waiting at most 20 ms) caps the
/// concurrency the API sees; a circuit breaker (count window `breaker_window`, failure rate
/// 50%, `breaker_wait` open) fails fast while the API is down, counting 5xx and 429 as
/// failures; a 250 ms timeout inside the breaker so slow calls count as failures, and inside
/// the bulkhead so a permit is held at most that long. No cache and no coalescing: each
/// fraud check is a distinct transaction (a POST).
///
/// Risk-profile lookups (`GET /merchants/{id}/risk`), through the same preset with a cache
/// and coalescing on, outermost first: the cache, keyed by [`HttpKey`] (method, URI,
/// `Authorization`, `Accept`), stores what `Cache-Control` allows for its `max-age`, refreshes
/// entries early with XFetch and serves a stale profile for up to 30 s when the lookup fails;
/// lookups asking for a fresh answer (`Cache-Control: no-cache`, see [`fresh_read`]) bypass
/// it, and the coalescing layer under it makes concurrent ones share one upstream call (and
/// join a fetch or refresh of the cache in flight for the same key); then a 300 ms timeout,
/// a bulkhead of 32, a breaker.
pub fn protected(settings: &Settings) -> Result<Clients, BoxError> {
    let fraud_api = Dependency::builder("fraud-api")
        .deadline(Duration::from_millis(400))
        .rate_limit(
            settings.fraud_rate,
            Duration::from_secs(1),
            20,
            Duration::from_millis(50),
        )
        .concurrency(settings.fraud_concurrency, Duration::from_millis(20))
        .call_timeout(Duration::from_millis(250))
        .classifier(HttpClassifier::new())
        .circuit_breaker(|b| {
            b.sliding_window(SlidingWindow::count_based(settings.breaker_window.0))
                .minimum_calls(settings.breaker_window.1)
                .failure_rate_threshold(0.5)
                .wait_in_open(settings.breaker_wait)
                .permitted_calls_in_half_open(5)
        })
        .build()?;
    let peak = Arc::new(AtomicUsize::new(0));
    let (breaker_handle, bulkhead_handle) =
        (fraud_api.breaker().clone(), fraud_api.bulkhead().clone());
    let fraud = BoxCloneService::new(fraud_api.layer(counted_client(peak.clone())));

    let keys = HttpKey::new();
    let (cache_keys, store_keys) = (keys.clone(), keys.clone());
    let risk_api = Dependency::builder("risk-profile")
        .call_timeout(Duration::from_millis(300))
        .concurrency(32, Duration::from_millis(50))
        .classifier(HttpClassifier::new())
        .cache(move |c| {
            c.key(move |req: &Request<Full<Bytes>>| {
                (!wants_fresh(req)).then(|| cache_keys.key(req)).flatten()
            })
            .ttl_fn(move |res: &Response<Bytes>| {
                is_storable(res, &store_keys)
                    .then(|| max_age(res))
                    .flatten()
            })
            .classifier(HttpClassifier::new())
            .max_staleness(Duration::from_secs(30))
            .max_entries(1_000)
            .seed(7)
        })
        .coalesce(move |req: &Request<Full<Bytes>>| keys.key(req))
        .build()?;
    let (cache_handle, coalesce_handle) = (risk_api.cache(), risk_api.coalescer());
    let risk = BoxCloneService::new(risk_api.layer(http_client()));
    Ok(Clients {
        risk,
        fraud,
        breaker: Some(breaker_handle),
        bulkhead: Some(bulkhead_handle),
        cache: Some(cache_handle),
        coalesce: Some(coalesce_handle),
        fraud_client_peak: peak,
    })
}

/// Whether a lookup asks for a fresh answer (`Cache-Control: no-cache`).
fn wants_fresh<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CACHE_CONTROL)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"))
}

/// The merchants checkouts go to.
pub const MERCHANTS: u64 = 8;

/// Whether checkout `n` reads its merchant's current risk profile (`Cache-Control:
/// no-cache`): one in ten, standing for orders above a review threshold.
pub fn fresh_read(n: u64) -> bool {
    n % 10 == 0
}

/// One checkout: the merchant's risk profile (one of [`MERCHANTS`]), then the fraud check.
pub async fn checkout(
    n: u64,
    base: &str,
    risk: HttpService,
    fraud: HttpService,
) -> Result<(), BoxError> {
    let merchant = n % MERCHANTS;
    let mut req = Request::get(format!("{base}/merchants/{merchant}/risk"));
    if fresh_read(n) {
        req = req.header(CACHE_CONTROL, "no-cache");
    }
    let res = risk.oneshot(req.body(Full::default())?).await?;
    if !res.status().is_success() {
        return Err(format!("risk API answered {}", res.status()).into());
    }
    let req = Request::post(format!("{base}/fraud-check"))
        .body(Full::new(Bytes::from(format!("{{\"tx\":{n}}}"))))?;
    let res = fraud.oneshot(req).await?;
    if !res.status().is_success() {
        return Err(format!("fraud API answered {}", res.status()).into());
    }
    Ok(())
}

/// The incident: normal traffic (1 unit), a spike at three times the rate (3 units), an
/// outage of the fraud API (2 units), recovery (2 units).
pub fn phases(rps: u32, unit: Duration) -> [Phase; 4] {
    [
        Phase {
            name: "normal",
            duration: unit,
            rps,
            outage: false,
        },
        Phase {
            name: "spike",
            duration: unit * 3,
            rps: rps * 3,
            outage: false,
        },
        Phase {
            name: "outage",
            duration: unit * 2,
            rps,
            outage: true,
        },
        Phase {
            name: "recovery",
            duration: unit * 2,
            rps,
            outage: false,
        },
    ]
}
