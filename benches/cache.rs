//! Response cache: the hit path beside no middleware.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

mod common;

use std::time::Duration;

use common::{bench_service, ready_inner, runtime};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::Layer;
use tower_breakwater::cache::CacheLayer;

fn benches(c: &mut Criterion) {
    let rt = runtime();
    bench_service(c, "baseline/service_fn", &rt, ready_inner(), 1);
    let ours = CacheLayer::builder()
        .key(|k: &u64| Some(*k))
        .ttl(Duration::from_secs(3_600))
        .build()
        .unwrap();
    bench_service(c, "cache/breakwater/hit", &rt, ours.layer(ready_inner()), 1);
}

criterion_group!(group, benches);
criterion_main!(group);
