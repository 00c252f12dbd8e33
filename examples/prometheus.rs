//! A small resilient client under load, exporting what an on-call engineer needs: Prometheus
//! metrics on `/metrics` (`metrics-exporter-prometheus`, HTTP listener) and a JSON snapshot of
//! every layer on `/debug/resilience` (the crate's registry, `serde` feature).
//!
//! Run: `cargo run --example prometheus --features serde`. It serves on `127.0.0.1:9898`
//! (metrics) and `127.0.0.1:9899` (debug snapshot) for `EXAMPLE_SECONDS` seconds (default 3),
//! while a synthetic dependency fails a third of its calls, has an outage and slows down; then
//! it fetches both
//! endpoints itself, prints a few lines of each, and exits. Point Prometheus at `/metrics` and
//! import `dashboards/tower-breakwater.json` into Grafana to see the same data as panels.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use tower_breakwater::rate_limit::RateLimitLayer;
use tower_breakwater::registry::Registry;
use tower_breakwater::timeout::TimeoutLayer;

/// Serves the registry's snapshot as JSON on every request.
async fn serve_debug(addr: SocketAddr, registry: Registry) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let json = serde_json::to_string_pretty(&registry.snapshot()).unwrap_or_default();
                async move {
                    let mut res = Response::new(Full::new(Bytes::from(json)));
                    res.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(res)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn fetch(url: &str) -> Result<String, BoxError> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let res = client.get(url.parse()?).await?;
    Ok(String::from_utf8(
        res.into_body().collect().await?.to_bytes().to_vec(),
    )?)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let metrics_addr: SocketAddr = ([127, 0, 0, 1], 9898).into();
    let debug_addr: SocketAddr = ([127, 0, 0, 1], 9899).into();
    // The recorder first: layers register their handles when built.
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(metrics_addr)
        .install()?;
    let registry = Registry::new();
    tokio::spawn(serve_debug(debug_addr, registry.clone()));

    let name = "inventory-api";
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::builder()
                .name(name)
                .rate(400, Duration::from_secs(1))
                .registry(&registry)
                .build()?,
        )
        .layer(
            BulkheadLayer::builder()
                .name(name)
                .max_concurrent_calls(16)
                .registry(&registry)
                .build()?,
        )
        .layer(
            CircuitBreakerLayer::builder()
                .name(name)
                .sliding_window(SlidingWindow::count_based(50))
                .wait_in_open(Duration::from_millis(500))
                .registry(&registry)
                .build()?,
        )
        .layer(
            TimeoutLayer::builder()
                .name(name)
                .timeout(Duration::from_millis(50))
                .record_durations(true)
                .registry(&registry)
                .build()?,
        )
        .service(service_fn(|n: u64| async move {
            // A dependency that fails a third of its calls, fails all of them for a while
            // (calls 500 to 700), and gets slower over time (past the 50 ms deadline).
            tokio::time::sleep(Duration::from_millis(5 + n / 25)).await;
            if n % 3 == 0 || (500..700).contains(&n) {
                Err::<u64, BoxError>("inventory unavailable".into())
            } else {
                Ok(n)
            }
        }));

    let seconds = std::env::var("EXAMPLE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3u64);
    let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        tokio::spawn(svc.clone().oneshot(n));
        n += 1;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let metrics = fetch(&format!("http://{metrics_addr}/metrics")).await?;
    println!("GET /metrics (breaker and bulkhead lines):\n");
    for line in metrics.lines().filter(|l| {
        l.starts_with("breakwater_circuit_breaker_calls_total")
            || l.starts_with("breakwater_bulkhead_calls_total")
            || l.starts_with("breakwater_circuit_breaker_transitions_total{") && !l.ends_with(" 0")
    }) {
        println!("{line}");
    }
    println!("\nGET /debug/resilience:\n");
    println!(
        "{}",
        fetch(&format!("http://{debug_addr}/debug/resilience")).await?
    );
    Ok(())
}
