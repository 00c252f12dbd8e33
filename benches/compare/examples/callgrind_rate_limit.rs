//! A fixed loop of rate-limiter calls for instruction counting under callgrind (instruction
//! counts are repeatable on a loaded machine, unlike times):
//!
//! ```sh
//! cargo build --release -p breakwater-compare --example callgrind_rate_limit
//! for n in 100000 200000; do
//!   valgrind --tool=callgrind --callgrind-out-file=cg.$n \
//!     target/release/examples/callgrind_rate_limit ours $n
//! done
//! ```
//!
//! Instructions per call = (total at 200,000 - total at 100,000) / 100,000, which removes
//! start-up and set-up. Subjects: `ours` (our rate limiter as a tower layer, shared state,
//! never limiting), `governor` (governor's direct `check()` plus one
//! `tokio::time::Instant::now()`, the target's reference), `clock` (the tokio clock read
//! alone) and `inner` (the inner service alone).

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use breakwater_compare::inner;
use tower::{Layer, Service, ServiceExt};

fn main() {
    let mut args = std::env::args().skip(1);
    let subject = args.next().unwrap_or_else(|| "ours".to_owned());
    let n: u64 = args
        .next()
        .map_or(100_000, |n| n.parse().expect("a number of calls"));
    let rt = breakwater_compare::runtime();
    match subject.as_str() {
        "ours" => {
            let layer = tower_breakwater::rate_limit::RateLimitLayer::builder()
                .rate(1_000_000_000, Duration::from_secs(1))
                .build()
                .expect("valid rate limiter");
            let mut svc = layer.layer(inner());
            rt.block_on(async {
                for i in 0..n {
                    let r = svc.ready().await.expect("ready").call(black_box(i)).await;
                    black_box(r.expect("admitted"));
                }
            });
        }
        "governor" => {
            let rate = NonZeroU32::new(1_000_000_000).expect("non-zero");
            let limiter = governor::RateLimiter::direct(governor::Quota::per_second(rate));
            rt.block_on(async {
                for _ in 0..n {
                    black_box(tokio::time::Instant::now());
                    black_box(limiter.check().is_ok());
                }
            });
        }
        "clock" => {
            let _guard = rt.enter();
            for _ in 0..n {
                black_box(tokio::time::Instant::now());
            }
        }
        "inner" => {
            let mut svc = inner();
            rt.block_on(async {
                for i in 0..n {
                    let r = svc.ready().await.expect("ready").call(black_box(i)).await;
                    black_box(r.expect("ok"));
                }
            });
        }
        other => panic!("unknown subject {other}: ours, governor, clock or inner"),
    }
}
