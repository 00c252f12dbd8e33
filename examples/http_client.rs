//! hyper-util's client behind the HTTP options of tower-breakwater: the HTTP classifier, a
//! whole-body timeout, and a bulkhead and a circuit breaker whose calls end at the end of the
//! response body, against a small local server.
//!
//! ```text
//! cargo run --example http_client
//! ```
//!
//! The server (on `127.0.0.1`, an OS-assigned port) has three routes: `/fast` (a short body at
//! once), `/unavailable` (a 503) and `/slow-body` (headers at once, then one chunk every
//! 100 ms for a second). The client stack, outermost first:
//!
//! - a bulkhead of 4 permits, held until each response's body ends or is dropped;
//! - a circuit breaker (the last 10 calls, open at 50% failures), recording each call at the
//!   end of its body, with the HTTP classifier (5xx and 429 fail);
//! - a 200 ms timeout covering the whole body;
//! - hyper-util's legacy client (a `tower::Service` of `http::Request`).
//!
//! It shows, in about a second: unread bodies holding the bulkhead's permits; a 503 counted
//! as a failure; slow bodies cut off by the deadline after their headers arrived, counted as
//! failures until the breaker opens.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use tower_breakwater::error::{self, ErrorKind};
use tower_breakwater::http::HttpClassifier;
use tower_breakwater::timeout::TimeoutLayer;

type ServerBody = BoxBody<Bytes, Infallible>;

/// The server's answer for `path`.
fn route(path: &str) -> Response<ServerBody> {
    let (status, body) = match path {
        "/fast" => (StatusCode::OK, Full::new(Bytes::from("ok")).boxed()),
        "/unavailable" => (
            StatusCode::SERVICE_UNAVAILABLE,
            Full::new(Bytes::new()).boxed(),
        ),
        "/slow-body" => {
            let chunks = stream::unfold(0, |sent| async move {
                if sent == 10 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((Ok(Frame::data(Bytes::from("chunk"))), sent + 1))
            });
            (StatusCode::OK, StreamBody::new(chunks).boxed())
        }
        _ => (StatusCode::NOT_FOUND, Full::new(Bytes::new()).boxed()),
    };
    let mut res = Response::new(body);
    *res.status_mut() = status;
    res
}

/// Starts the server; returns its address and its count of requests.
async fn start_server() -> std::io::Result<(std::net::SocketAddr, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    count.fetch_add(1, Ordering::Relaxed);
                    let res = route(req.uri().path());
                    async move { Ok::<_, Infallible>(res) }
                });
                // A connection the client drops mid-body ends with an error: expected here.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, seen))
}

/// The kind of our own error in `err`, if it is one.
fn ours(err: &BoxError) -> Option<ErrorKind> {
    error::find(err.as_ref()).map(|e| e.kind())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let (addr, seen) = start_server().await?;
    println!("server on {addr}");

    let bulkhead = BulkheadLayer::builder()
        .name("api")
        .max_concurrent_calls(4)
        .whole_body()
        .build()?;
    let breaker = CircuitBreakerLayer::builder()
        .name("api")
        .sliding_window(SlidingWindow::count_based(10))
        .failure_rate_threshold(0.5)
        .classifier(HttpClassifier::new())
        .whole_body()
        .build()?;
    let timeout = TimeoutLayer::builder()
        .name("api")
        .timeout(Duration::from_millis(200))
        .classifier(HttpClassifier::new())
        .whole_body()
        .build()?;
    let (permits, state, deadline) = (bulkhead.handle(), breaker.handle(), timeout.handle());
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let api = ServiceBuilder::new()
        .layer(bulkhead)
        .layer(breaker)
        .layer(timeout)
        .service(client);
    let get = |path: &str| {
        let req = Request::get(format!("http://{addr}{path}"))
            .body(Empty::new())
            .expect("a valid request");
        api.clone().oneshot(req)
    };

    // 1. Unread bodies hold the bulkhead's permits; dropping them returns the permits.
    let mut unread = Vec::new();
    for _ in 0..4 {
        unread.push(get("/slow-body").await?);
    }
    let fifth = get("/fast").await.map(drop).map_err(|e| ours(&e));
    println!(
        "bulkhead: 4 unread bodies hold {} of 4 permits; a 5th call: {:?}",
        4 - permits.available(),
        fifth.unwrap_err().expect("our rejection"),
    );
    drop(unread);
    println!(
        "bulkhead: bodies dropped, {} of 4 permits free",
        permits.available()
    );

    // 2. Bodies read in full.
    let mut read = 0;
    for _ in 0..8 {
        let body = get("/fast").await?.into_body().collect().await?.to_bytes();
        read += usize::from(body == "ok");
    }
    println!("fast: {read} of 8 bodies read in full");

    // 3. A 503 is a response, but a failure for the breaker (the HTTP classifier).
    let status = get("/unavailable").await?.status();
    let rate = state.snapshot().gauge("failure_rate").unwrap_or_default();
    println!("unavailable: {status} counted as a failure (failure rate {rate:.1})");

    // 4. Slow bodies: the headers come at once, the deadline cuts the body off; each is a
    //    failure for the breaker, until it opens.
    let mut cut_off = 0;
    loop {
        match get("/slow-body").await {
            Ok(res) => match res.into_body().collect().await {
                Err(e) if ours(&e) == Some(ErrorKind::Timeout) => cut_off += 1,
                other => println!("unexpected: {:?}", other.map(|c| c.to_bytes())),
            },
            Err(e) => {
                println!(
                    "slow bodies: {cut_off} cut off mid-body by the 200 ms deadline \
                     (timeouts: {})",
                    deadline.snapshot().counter("timeouts").unwrap_or_default(),
                );
                println!(
                    "breaker: {} at failure rate {:.1}; the next call: {:?}",
                    state.state().as_str(),
                    state.snapshot().gauge("failure_rate").unwrap_or_default(),
                    ours(&e).expect("our rejection"),
                );
                break;
            }
        }
    }
    println!("server saw {} requests", seen.load(Ordering::Relaxed));
    Ok(())
}
