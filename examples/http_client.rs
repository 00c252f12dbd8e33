//! hyper-util's client behind the HTTP options of tower-breakwater: the HTTP classifier, a
//! whole-body timeout, a bulkhead and a circuit breaker whose calls end at the end of the
//! response body, the Retry-After hold, request keys for coalescing, and rejection responses,
//! against a small local server.
//!
//! ```text
//! cargo run --example http_client
//! ```
//!
//! The server (on `127.0.0.1`, an OS-assigned port) has five routes: `/fast` (a short body at
//! once), `/report` (a short body after 100 ms), `/unavailable` (a 503), `/busy` (a 503 with
//! `Retry-After: 2`) and `/slow-body` (headers at once, then one chunk every 100 ms for a
//! second). The client stack, outermost first:
//!
//! - a bulkhead of 4 permits, held until each response's body ends or is dropped;
//! - a circuit breaker (the last 10 calls, open at 50% failures), recording each call at the
//!   end of its body, with the HTTP classifier (5xx and 429 fail);
//! - a 200 ms timeout covering the whole body (inside the breaker, so a body it cuts off is a
//!   failure for the breaker);
//! - hyper-util's legacy client (a `tower::Service` of `http::Request`).
//!
//! It shows, in under a second: unread bodies holding the bulkhead's permits; concurrent GETs
//! of one URL coalesced into one request ([`HttpKey`]); a 503 counted as a failure; slow
//! bodies cut off by the deadline after their headers arrived, counted as failures until the
//! breaker opens; a second breaker held open past its wait by a 503's `Retry-After`; and
//! rejections (that breaker's, a rate limiter's) turned into the `503`/`429` with
//! `Retry-After` a server would send.

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
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use tower_breakwater::coalesce::CoalesceLayer;
use tower_breakwater::error::{self, ErrorKind};
use tower_breakwater::http::{HttpClassifier, HttpKey, rejection_response};
use tower_breakwater::rate_limit::RateLimitLayer;
use tower_breakwater::timeout::TimeoutLayer;

type ServerBody = BoxBody<Bytes, Infallible>;

/// The server's answer for `path`.
fn route(path: &str) -> Response<ServerBody> {
    let (status, body) = match path {
        "/fast" => (StatusCode::OK, Full::new(Bytes::from("ok")).boxed()),
        "/report" => {
            let report = stream::once(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(Frame::data(Bytes::from("report")))
            });
            (StatusCode::OK, StreamBody::new(report).boxed())
        }
        "/unavailable" | "/busy" => (
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
    if path == "/busy" {
        res.headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(2));
    }
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

/// What a server would answer for our rejection `err`: its status and `Retry-After`.
fn as_response(err: &BoxError) -> String {
    match rejection_response::<()>(err.as_ref()) {
        Some(res) => format!(
            "{} with Retry-After: {}",
            res.status(),
            res.headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
        ),
        None => format!("not ours: {err}"),
    }
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
        .service(client.clone());
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

    // 3. Concurrent GETs of one URL share one request: HttpKey keys them by method, URI,
    //    Authorization and Accept (POST, Cookie or Range requests would pass through). A
    //    shared response must be `Clone`, so the coalesced service reads the body first.
    let read_whole = service_fn({
        let api = api.clone();
        move |req: Request<Empty<Bytes>>| {
            let api = api.clone();
            async move {
                let (parts, body) = api.oneshot(req).await?.into_parts();
                let bytes = body.collect().await?.to_bytes();
                Ok::<_, BoxError>(Response::from_parts(parts, bytes))
            }
        }
    });
    let keys = HttpKey::new();
    let coalesce = CoalesceLayer::builder()
        .name("api")
        .key(move |req: &Request<Empty<Bytes>>| keys.key(req))
        .build()?;
    let shared = coalesce.handle();
    let reports = coalesce.layer(read_whole);
    let report = || {
        let req = Request::get(format!("http://{addr}/report"))
            .body(Empty::new())
            .expect("a valid request");
        reports.clone().oneshot(req)
    };
    let before = seen.load(Ordering::Relaxed);
    let (a, b, c) = tokio::join!(report(), report(), report());
    let same = [a?, b?, c?].iter().all(|r| r.body() == "report");
    let snap = shared.snapshot();
    println!(
        "coalesce: 3 concurrent GETs of /report, same body: {same}, {} request(s) sent \
         (leaders {}, followers {})",
        seen.load(Ordering::Relaxed) - before,
        snap.counter("leaders").unwrap_or_default(),
        snap.counter("followers").unwrap_or_default(),
    );

    // 4. A 503 is a response, but a failure for the breaker (the HTTP classifier).
    let status = get("/unavailable").await?.status();
    let rate = state.snapshot().gauge("failure_rate").unwrap_or_default();
    println!("unavailable: {status} counted as a failure (failure rate {rate:.1})");

    // 5. Slow bodies: the headers come at once, the deadline cuts the body off; each is a
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

    // 6. The Retry-After hold: a breaker that opens at the first failure and waits 100 ms,
    //    but a 503 asking for 2 s holds it open that long (capped at 30 s).
    let held = CircuitBreakerLayer::builder()
        .name("busy")
        .sliding_window(SlidingWindow::consecutive_failures(1))
        .wait_in_open(Duration::from_millis(100))
        .classifier(HttpClassifier::new())
        .retry_after_hold(Duration::from_secs(30))
        .whole_body()
        .build()?;
    let busy_state = held.handle();
    let busy = ServiceBuilder::new().layer(held).service(client.clone());
    let call_busy = || {
        let req = Request::get(format!("http://{addr}/busy"))
            .body(Empty::new())
            .expect("a valid request");
        busy.clone().oneshot(req)
    };
    let status = call_busy().await?.status();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let err = call_busy().await.map(drop).expect_err("held open");
    println!(
        "hold: a {status} with Retry-After: 2 opened `busy`; 150 ms later, past its 100 ms \
         wait, it is still {} ({:?}); a server answers {}",
        busy_state.state().as_str(),
        ours(&err).expect("our rejection"),
        as_response(&err),
    );

    // 7. A rate limiter's rejection (1 call per second) becomes a 429.
    let limited = RateLimitLayer::new(1, Duration::from_secs(1))?.layer(client.clone());
    let fast = || {
        let req = Request::get(format!("http://{addr}/fast"))
            .body(Empty::new())
            .expect("a valid request");
        limited.clone().oneshot(req)
    };
    drop(fast().await?);
    let err = fast().await.map(drop).expect_err("rate limited");
    println!(
        "rate limit: the 2nd call in a second; a server answers {}",
        as_response(&err)
    );

    println!("server saw {} requests", seen.load(Ordering::Relaxed));
    Ok(())
}
