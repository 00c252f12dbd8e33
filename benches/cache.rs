//! Response cache: the hit path beside no middleware.
//!
//! With `CACHE_HIT_CALLS=n` set, runs `n` hits (after one filling miss) without criterion
//! and exits: a fixed workload for an instruction counter, e.g.
//! `CACHE_HIT_CALLS=200000 valgrind --tool=callgrind <bench binary>`; the difference of two
//! runs with different `n`, divided by the difference of `n`, is the cost of one hit. With
//! `CACHE_BASELINE=1` too, the same loop calls the inner service alone.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

mod common;

use std::time::Duration;

use common::{bench_service, ready_inner, runtime};
use criterion::{Criterion, criterion_group};
use tower::{Layer, Service, ServiceExt};
use tower_breakwater::cache::CacheLayer;

/// The cache over an inner service that answers at once, one key per `u64`, 1 h TTL.
fn cache() -> impl Service<u64, Response = u64, Error = tower_breakwater::BoxError> + Clone {
    let layer = CacheLayer::builder()
        .key(|k: &u64| Some(*k))
        .ttl(Duration::from_secs(3_600))
        .build()
        .unwrap();
    layer.layer(ready_inner())
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    bench_service(c, "baseline/service_fn", &rt, ready_inner(), 1);
    bench_service(c, "cache/breakwater/hit", &rt, cache(), 1);
}

criterion_group!(group, benches);

/// `n` hits of one key (or calls of the bare inner service), for an instruction counter.
fn hits(n: u64) {
    if std::env::var_os("CACHE_BASELINE").is_some() {
        return calls(ready_inner(), n);
    }
    calls(cache(), n);
}

fn calls<S>(mut svc: S, n: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let rt = runtime();
    rt.block_on(async {
        for _ in 0..=n {
            let r = svc.ready().await.unwrap().call(1).await;
            std::hint::black_box(r.unwrap());
        }
    });
}

fn main() {
    if let Some(n) = std::env::var("CACHE_HIT_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        return hits(n);
    }
    group();
    Criterion::default().configure_from_args().final_summary();
}
