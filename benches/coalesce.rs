//! Coalescing happy path, uncontended (every call is a leader: a fresh shared call per call),
//! beside no middleware.

mod common;

use common::{bench_service, ready_inner, runtime};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::Layer;
use tower_breakwater::coalesce::CoalesceLayer;

fn benches(c: &mut Criterion) {
    let rt = runtime();
    bench_service(c, "baseline/service_fn", &rt, ready_inner(), 1);
    let ours = CoalesceLayer::builder().key(|k: &u64| *k).build().unwrap();
    bench_service(
        c,
        "coalesce/breakwater/uncontended",
        &rt,
        ours.layer(ready_inner()),
        1,
    );
}

criterion_group!(group, benches);
criterion_main!(group);
