//! The external APIs, played by a real HTTP/1 server on `127.0.0.1` (OS-assigned port):
//!
//! - `POST /fraud-check`: a fixed pool of workers, each request holding one for the base
//!   service time; requests beyond the pool queue (FIFO), so a traffic spike turns into
//!   seconds of latency. During an outage every request takes `outage_delay` and answers
//!   `503 Service Unavailable`: a client that waits that long sees an error, one whose
//!   timeout is shorter sees a timeout.
//! - `GET /merchants/{id}/risk`: a cacheable lookup taking `risk_time`, with
//!   `Cache-Control: max-age=..`.
//!
//! The server counts what it saw: calls per route and the peak number of fraud checks in
//! progress (queued or being served).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How the simulated APIs behave.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Fraud API workers (concurrent requests served; the rest queue).
    pub workers: usize,
    /// Fraud API service time per request outside the outage.
    pub base: Duration,
    /// Fraud API answer time during the outage (then `503`).
    pub outage_delay: Duration,
    /// Risk-profile lookup time.
    pub risk_time: Duration,
    /// `max-age` of risk-profile responses, in seconds.
    pub risk_max_age: u64,
}

/// What the server saw.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub outage: AtomicBool,
    pub fraud_calls: AtomicU64,
    pub risk_calls: AtomicU64,
    in_flight: AtomicUsize,
    pub peak_in_flight: AtomicUsize,
}

impl ServerStats {
    pub fn reset(&self) {
        self.fraud_calls.store(0, Ordering::SeqCst);
        self.risk_calls.store(0, Ordering::SeqCst);
        self.peak_in_flight.store(0, Ordering::SeqCst);
    }
}

struct InFlight<'a>(&'a ServerStats);

impl<'a> InFlight<'a> {
    fn enter(stats: &'a ServerStats) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res
}

async fn handle(
    req: Request<Incoming>,
    cfg: Arc<ServerConfig>,
    stats: Arc<ServerStats>,
    workers: Arc<Semaphore>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    if path == "/fraud-check" {
        stats.fraud_calls.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight::enter(&stats);
        if stats.outage.load(Ordering::SeqCst) {
            // The API's own backend is down: it answers late, and with an error.
            tokio::time::sleep(cfg.outage_delay).await;
            return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, "overloaded"));
        }
        let _worker = workers.acquire().await.expect("never closed");
        tokio::time::sleep(cfg.base).await;
        return Ok(reply(StatusCode::OK, "approved"));
    }
    if path.starts_with("/merchants/") && path.ends_with("/risk") {
        stats.risk_calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(cfg.risk_time).await;
        let mut res = reply(StatusCode::OK, "low");
        let cc = format!("max-age={}", cfg.risk_max_age);
        res.headers_mut()
            .insert(hyper::header::CACHE_CONTROL, cc.parse().expect("valid"));
        return Ok(res);
    }
    Ok(reply(StatusCode::NOT_FOUND, "no such route"))
}

/// Starts the server; it runs until the runtime shuts down.
pub async fn start(cfg: ServerConfig) -> std::io::Result<(SocketAddr, Arc<ServerStats>)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(ServerStats::default());
    let workers = Arc::new(Semaphore::new(cfg.workers));
    let cfg = Arc::new(cfg);
    let st = stats.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (cfg, stats, workers) = (cfg.clone(), st.clone(), workers.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    handle(req, cfg.clone(), stats.clone(), workers.clone())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, stats))
}
