//! Timeout happy path (the deadline never fires), beside tower's `Timeout` and no middleware.
#![allow(missing_docs)] // criterion_group! generates undocumented functions

mod common;

use std::time::Duration;

use common::{bench_service, ready_inner, runtime, yielding_inner};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::Layer;
use tower_breakwater::timeout::TimeoutLayer;

fn benches(c: &mut Criterion) {
    let rt = runtime();
    bench_service(c, "baseline/service_fn", &rt, ready_inner(), 1);
    let ours = TimeoutLayer::new(Duration::from_secs(1)).unwrap();
    bench_service(c, "timeout/breakwater", &rt, ours.layer(ready_inner()), 1);
    let durations = TimeoutLayer::builder()
        .timeout(Duration::from_secs(1))
        .record_durations(true)
        .build()
        .unwrap();
    bench_service(
        c,
        "timeout/breakwater+durations",
        &rt,
        durations.layer(ready_inner()),
        1,
    );
    let theirs = tower::timeout::TimeoutLayer::new(Duration::from_secs(1));
    bench_service(c, "timeout/tower", &rt, theirs.layer(ready_inner()), 1);
    // An inner service that returns `Pending` once, as a real client does: both timeouts
    // arm their timer.
    bench_service(
        c,
        "timeout/breakwater/pending-once",
        &rt,
        ours.layer(yielding_inner()),
        1,
    );
    bench_service(
        c,
        "timeout/tower/pending-once",
        &rt,
        theirs.layer(yielding_inner()),
        1,
    );
}

criterion_group!(group, benches);
criterion_main!(group);
