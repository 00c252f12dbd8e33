//! Rate limiter happy path (never limiting), direct and keyed, beside tower's `RateLimit`,
//! no middleware and the clock read the GCRA needs per call.
//!
//! Note: benches build with the dev-dependency tokio, whose `test-util` feature makes
//! `tokio::time::Instant::now()` check for a paused clock on every read; the
//! `clock/tokio_instant_now` line measures that cost here.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

mod common;

use std::time::Duration;

use common::{bench_service, ready_inner, runtime};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::{Layer, Service, ServiceExt};
use tower_breakwater::rate_limit::RateLimitLayer;

fn benches(c: &mut Criterion) {
    let rt = runtime();
    {
        let _guard = rt.enter();
        c.bench_function("clock/tokio_instant_now", |b| {
            b.iter(|| std::hint::black_box(tokio::time::Instant::now()))
        });
        c.bench_function("clock/std_instant_now", |b| {
            b.iter(|| std::hint::black_box(std::time::Instant::now()))
        });
        // The peer comparison (governor's raw `check()` plus one tokio clock read) is in the
        // `benches/compare` workspace member, which keeps peer crates out of this build.
    }
    bench_service(c, "baseline/service_fn", &rt, ready_inner(), 1);
    // T = 1 ns and a burst of 10^6: never limits.
    let builder = || {
        RateLimitLayer::builder()
            .rate(1_000_000_000, Duration::from_secs(1))
            .burst(1_000_000)
    };
    let direct = builder().build().unwrap();
    bench_service(
        c,
        "rate_limit/breakwater",
        &rt,
        direct.layer(ready_inner()),
        1,
    );
    let keyed = builder().keyed(|x: &u64| *x).build().unwrap();
    bench_service(
        c,
        "rate_limit/breakwater_keyed_tracked",
        &rt,
        keyed.layer(ready_inner()),
        1,
    );
    // The same with a multiplicative hasher instead of SipHash (keys not chosen by clients).
    let keyed_fast = builder()
        .keyed(|x: &u64| *x)
        .hasher(std::hash::BuildHasherDefault::<MulHasher>::default())
        .build()
        .unwrap();
    bench_service(
        c,
        "rate_limit/breakwater_keyed_tracked_mul_hasher",
        &rt,
        keyed_fast.layer(ready_inner()),
        1,
    );
    // tower's `RateLimit` is not `Clone` (and its state is per instance): one per sample.
    c.bench_function("rate_limit/tower", |b| {
        b.iter_custom(|iters| {
            let layer = tower::limit::RateLimitLayer::new(u64::MAX, Duration::from_secs(1));
            // Its sleep is created with the service: inside the runtime.
            let _guard = rt.enter();
            let mut svc = layer.layer(ready_inner());
            rt.block_on(async move {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let r = svc.ready().await.unwrap().call(1).await;
                    std::hint::black_box(r.unwrap());
                }
                start.elapsed()
            })
        })
    });
}

/// A hasher for `u64` keys: one multiplication (Fibonacci hashing).
#[derive(Default)]
struct MulHasher(u64);

impl std::hash::Hasher for MulHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

criterion_group!(group, benches);
criterion_main!(group);
