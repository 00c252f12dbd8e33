//! A fixed loop of calls through each of our layers alone, the four-layer stack and the
//! preset, for instruction counting under callgrind (repeatable on a loaded machine):
//!
//! ```sh
//! cargo build --release -p breakwater-compare --example callgrind_stack
//! for n in 100000 200000; do
//!   valgrind --tool=callgrind --callgrind-out-file=cg.$n \
//!     target/release/examples/callgrind_stack stack $n
//! done
//! ```
//!
//! Instructions per call = (total at 200,000 - total at 100,000) / 100,000. Subjects:
//! `breaker` (closed, count-based window of 100), `rate_limit` (never limiting), `bulkhead`
//! (1,000 permits), `timeout` (1 s, never firing), `stack` (the four, outermost first, as the
//! comparison benchmark), `preset` (`preset::Dependency` with the same settings) and `inner`
//! (the inner service alone). Same settings as `benches/compare.rs`.

use std::hint::black_box;
use std::time::Duration;

use breakwater_compare::inner;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use tower_breakwater::preset::Dependency;
use tower_breakwater::rate_limit::RateLimitLayer;
use tower_breakwater::timeout::TimeoutLayer;

const RATE_PER_SEC: u64 = 1_000_000_000;
const MAX_CONCURRENT: usize = 1000;
const TIMEOUT: Duration = Duration::from_secs(1);

fn breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count_based(100))
        .build()
        .expect("valid circuit breaker")
}

fn rate_limiter() -> RateLimitLayer {
    RateLimitLayer::builder()
        .rate(RATE_PER_SEC, Duration::from_secs(1))
        .build()
        .expect("valid rate limiter")
}

fn bulkhead() -> BulkheadLayer {
    BulkheadLayer::new(MAX_CONCURRENT).expect("valid bulkhead")
}

fn timeout() -> TimeoutLayer {
    TimeoutLayer::new(TIMEOUT).expect("valid timeout")
}

/// Calls `svc` `n` times, each `svc.ready().await?.call(i).await?`.
fn run<S>(mut svc: S, n: u64)
where
    S: Service<u64>,
    S::Error: std::fmt::Debug,
{
    let rt = breakwater_compare::runtime();
    rt.block_on(async {
        for i in 0..n {
            let r = svc.ready().await.expect("ready").call(black_box(i)).await;
            black_box(r.expect("ok"));
        }
    });
}

fn main() {
    let mut args = std::env::args().skip(1);
    let subject = args.next().unwrap_or_else(|| "stack".to_owned());
    let n: u64 = args
        .next()
        .map_or(100_000, |n| n.parse().expect("a number of calls"));
    match subject.as_str() {
        "breaker" => run(breaker().layer(inner()), n),
        "rate_limit" => run(rate_limiter().layer(inner()), n),
        "bulkhead" => run(bulkhead().layer(inner()), n),
        "timeout" => run(timeout().layer(inner()), n),
        "stack" => run(
            ServiceBuilder::new()
                .layer(breaker())
                .layer(rate_limiter())
                .layer(bulkhead())
                .layer(timeout())
                .service(inner()),
            n,
        ),
        "preset" => {
            let preset = Dependency::builder("compare")
                .call_timeout(TIMEOUT)
                .concurrency(MAX_CONCURRENT, Duration::ZERO)
                .rate_limit(
                    RATE_PER_SEC,
                    Duration::from_secs(1),
                    RATE_PER_SEC,
                    Duration::ZERO,
                )
                .circuit_breaker(|b| b.sliding_window(SlidingWindow::count_based(100)))
                .build()
                .expect("valid preset");
            run(preset.layer(inner()), n);
        }
        "inner" => run(inner(), n),
        other => panic!(
            "unknown subject {other}: breaker, rate_limit, bulkhead, timeout, stack, preset or inner"
        ),
    }
}
