//! The incident this crate exists for, replayed over real HTTP on `127.0.0.1`, with and
//! without tower-breakwater.
//!
//! A checkout service calls a payment service's fraud-check API. During a traffic spike the
//! fraud API, overwhelmed by concurrent requests, queues and slows from ~20 ms to seconds;
//! then it fails outright for a while (slow `503`s). Unprotected callers wait, hold
//! connections and pile up. Protected callers put a deadline on every call and fail fast.
//! A second, cacheable dependency (a merchant risk-profile lookup, a GET) is called by every
//! checkout too. Fraud checks themselves are never coalesced or cached: each transaction is
//! distinct.
//!
//! Run: `cargo run --release --example checkout_incident`. Environment variables change the
//! traffic: `DEMO_RPS` (base checkouts per second, default 100) and `DEMO_PHASE_MS` (length
//! of one phase unit in milliseconds, default 1000; the run is 8 units, twice).

mod load;
mod server;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use tower_breakwater::coalesce::CoalesceLayer;
use tower_breakwater::http::HttpClassifier;
use tower_breakwater::rate_limit::RateLimitLayer;
use tower_breakwater::timeout::TimeoutLayer;

use load::{Phase, Summary};
use server::ServerConfig;

/// An HTTP client as a service, with the body buffered.
type HttpService = BoxCloneService<Request<Full<Bytes>>, Response<Bytes>, BoxError>;

/// A risk-profile answer: status and body, cheap to clone (so coalesced callers share it).
type RiskAnswer = (hyper::StatusCode, Bytes);

/// The risk-profile lookup as a service.
type RiskService = BoxCloneService<Request<Full<Bytes>>, RiskAnswer, BoxError>;

fn risk_answers(
    inner: HttpService,
) -> impl tower::Service<Request<Full<Bytes>>, Response = RiskAnswer, Error = BoxError, Future: Send>
+ Clone {
    inner.map_response(|res: Response<Bytes>| (res.status(), res.into_body()))
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

/// The fraud-check client with protection, outermost first: an overall 400 ms deadline
/// bounds limiter wait + bulkhead wait + call; a rate limiter (GCRA, 150 checks/s, burst 20,
/// waiting at most 50 ms) keeps us under what the API can serve; a bulkhead (8 calls in
/// flight, waiting at most 20 ms) caps the concurrency the API sees; a circuit breaker (count
/// window 40, failure rate 50%, 2 s open) fails fast while it is down, counting 5xx and 429 as
/// failures; a 250 ms timeout inside the breaker so slow calls count as failures, and inside
/// the bulkhead so a permit is held at most that long.
fn protect_fraud(inner: HttpService) -> Result<HttpService, BoxError> {
    let limiter = RateLimitLayer::builder()
        .name("fraud-api")
        .rate(150, Duration::from_secs(1))
        .burst(20)
        .max_wait(Duration::from_millis(50))
        .build()?;
    let bulkhead = BulkheadLayer::builder()
        .name("fraud-api")
        .max_concurrent_calls(8)
        .max_wait(Duration::from_millis(20))
        .build()?;
    let deadline = TimeoutLayer::builder()
        .name("fraud-api-overall")
        .timeout(Duration::from_millis(400))
        .build()?;
    let breaker = CircuitBreakerLayer::builder()
        .name("fraud-api")
        .sliding_window(SlidingWindow::count_based(40))
        .minimum_calls(20)
        .failure_rate_threshold(0.5)
        .wait_in_open(Duration::from_secs(2))
        .permitted_calls_in_half_open(5)
        .classifier(HttpClassifier::new())
        .build()?;
    let timeout = TimeoutLayer::builder()
        .name("fraud-api")
        .timeout(Duration::from_millis(250))
        .classifier(HttpClassifier::new())
        .build()?;
    Ok(BoxCloneService::new(
        ServiceBuilder::new()
            .layer(deadline)
            .layer(limiter)
            .layer(bulkhead)
            .layer(breaker)
            .layer(timeout)
            .service(inner),
    ))
}

/// The risk-profile client with protection: concurrent lookups of one merchant share one
/// upstream call (coalescing, keyed by URI: GETs with no per-user headers here), each with a
/// 300 ms timeout.
fn protect_risk(inner: HttpService) -> Result<RiskService, BoxError> {
    let coalesce = CoalesceLayer::builder()
        .name("risk-profile")
        .key(|req: &Request<Full<Bytes>>| req.uri().clone())
        .build()?;
    let timeout = TimeoutLayer::builder()
        .name("risk-profile")
        .timeout(Duration::from_millis(300))
        .classifier(HttpClassifier::new())
        .build()?;
    let timed = ServiceBuilder::new().layer(timeout).service(inner);
    Ok(BoxCloneService::new(
        ServiceBuilder::new()
            .layer(coalesce)
            .service(risk_answers(BoxCloneService::new(timed))),
    ))
}

async fn checkout(
    n: u64,
    base: &str,
    risk: RiskService,
    fraud: HttpService,
) -> Result<(), BoxError> {
    let merchant = n % 5;
    let req = Request::get(format!("{base}/merchants/{merchant}/risk")).body(Full::default())?;
    let (status, _profile) = risk.oneshot(req).await?;
    if !status.is_success() {
        return Err(format!("risk API answered {status}").into());
    }
    let req = Request::post(format!("{base}/fraud-check"))
        .body(Full::new(Bytes::from(format!("{{\"tx\":{n}}}"))))?;
    let res = fraud.oneshot(req).await?;
    if !res.status().is_success() {
        return Err(format!("fraud API answered {}", res.status()).into());
    }
    Ok(())
}

fn phases(rps: u32, unit: Duration) -> [Phase; 4] {
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

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Install the recorder before building layers: handles are registered at build time.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;

    let rps = env("DEMO_RPS", 100) as u32;
    let unit = Duration::from_millis(env("DEMO_PHASE_MS", 1_000));
    let cfg = ServerConfig {
        workers: 4,
        base: Duration::from_millis(20),
        outage_delay: Duration::from_secs(2),
        risk_time: Duration::from_millis(120),
        risk_max_age: 60,
    };
    let (addr, stats) = server::start(cfg.clone()).await?;
    let base = format!("http://{addr}");
    println!(
        "Fraud API on {addr}: {} workers x {:?} per check (capacity {} checks/s); outage: {:?} then 503",
        cfg.workers,
        cfg.base,
        cfg.workers as u128 * 1_000 / cfg.base.as_millis(),
        cfg.outage_delay
    );
    let phases = phases(rps, unit);
    for p in &phases {
        println!(
            "  phase {:<9} {:>6.1?} at {:>4} checkouts/s{}",
            p.name,
            p.duration,
            p.rps,
            if p.outage { " (fraud API failing)" } else { "" }
        );
    }

    let mut summaries = Vec::new();
    for protected in [false, true] {
        stats.reset();
        let (risk, fraud) = if protected {
            (protect_risk(http_client())?, protect_fraud(http_client())?)
        } else {
            (
                BoxCloneService::new(risk_answers(http_client())),
                http_client(),
            )
        };
        println!(
            "\nrunning {} ...",
            if protected {
                "with tower-breakwater"
            } else {
                "unprotected"
            }
        );
        let records = load::drive(&phases, &stats, |n| {
            let (risk, fraud, base) = (risk.clone(), fraud.clone(), base.clone());
            async move { checkout(n, &base, risk, fraud).await }
        })
        .await;
        summaries.push(Summary::new(&records, &stats));
    }

    println!();
    load::print_table(&[
        ("unprotected", &summaries[0]),
        ("breakwater", &summaries[1]),
    ]);

    println!("\nbreakwater metrics (Prometheus text format; zero-valued counters left out):\n");
    let rendered = prometheus.render();
    let mut lines: Vec<&str> = rendered
        .lines()
        .filter(|l| l.starts_with("breakwater_"))
        .filter(|l| !(l.ends_with(" 0") && (l.contains("_total{") || l.contains("_total "))))
        .collect();
    lines.sort();
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
