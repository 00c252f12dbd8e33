//! Coalescing: the uncontended happy path (every call is a leader: a fresh shared call per
//! call) beside no middleware, a request without a key (passed through), and eight
//! concurrent callers sharing one call (time per caller).

#![allow(missing_docs)] // criterion_group! generates undocumented functions

mod common;

use common::{bench_service, ready_inner, runtime};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::{Layer, Service, ServiceExt};
use tower_breakwater::coalesce::CoalesceLayer;

fn benches(c: &mut Criterion) {
    let rt = runtime();
    bench_service(c, "baseline/service_fn", &rt, ready_inner(), 1);
    let ours = CoalesceLayer::builder()
        .key(|k: &u64| Some(*k))
        .build()
        .unwrap();
    bench_service(
        c,
        "coalesce/breakwater/uncontended",
        &rt,
        ours.layer(ready_inner()),
        1,
    );

    // A request whose key function returns `None`: passed through, beside the baseline.
    let unkeyed = CoalesceLayer::builder()
        .key(|_: &u64| None::<u64>)
        .build()
        .unwrap();
    bench_service(
        c,
        "coalesce/breakwater/no_key_pass_through",
        &rt,
        unkeyed.layer(ready_inner()),
        1,
    );

    // Eight callers of one key per round; the inner call is pending once, so the seven
    // followers attach and wait. Reported per caller.
    let yielding = tower::service_fn(|x: u64| async move {
        tokio::task::yield_now().await;
        Ok::<_, std::convert::Infallible>(x)
    });
    let svc = ours.layer(yielding);
    c.bench_function("coalesce/breakwater/8_callers_per_call", |b| {
        b.iter_custom(|iters| {
            let mut svc = svc.clone();
            rt.block_on(async move {
                let start = std::time::Instant::now();
                for _ in 0..iters.div_ceil(8) {
                    let mut call = || svc.call(1);
                    let r = tokio::join!(
                        call(),
                        call(),
                        call(),
                        call(),
                        call(),
                        call(),
                        call(),
                        call()
                    );
                    std::hint::black_box(r.7.unwrap());
                }
                let _ = svc.ready().await;
                start.elapsed()
            })
        })
    });
}

criterion_group!(group, benches);
criterion_main!(group);
