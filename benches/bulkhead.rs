//! Bulkhead happy path (a permit is always free), beside tower's `ConcurrencyLimit` and no
//! middleware; then the same shared bulkhead hammered from two OS threads.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{bench_service, ready_inner, runtime};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::{Layer, Service, ServiceExt};
use tower_breakwater::bulkhead::BulkheadLayer;

/// Two OS threads, each with its own current-thread runtime, call clones of one service
/// `iters` times; the time reported is the slower thread's (ns per call per thread).
fn bench_contended<S>(c: &mut Criterion, id: &str, svc: S)
where
    S: Service<u64> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send,
{
    c.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let barrier = Arc::new(Barrier::new(2));
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let mut svc = svc.clone();
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        let rt = runtime();
                        barrier.wait();
                        rt.block_on(async move {
                            let start = std::time::Instant::now();
                            for i in 0..iters {
                                let r = svc.ready().await.unwrap().call(i).await;
                                std::hint::black_box(r.unwrap());
                            }
                            start.elapsed()
                        })
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .max()
                .unwrap_or(Duration::ZERO)
        })
    });
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    bench_service(c, "baseline/service_fn", &rt, ready_inner(), 1);
    let ours = BulkheadLayer::new(1_000).unwrap();
    bench_service(c, "bulkhead/breakwater", &rt, ours.layer(ready_inner()), 1);
    let waiting = BulkheadLayer::builder()
        .max_concurrent_calls(1_000)
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    bench_service(
        c,
        "bulkhead/breakwater+wait_mode",
        &rt,
        waiting.layer(ready_inner()),
        1,
    );
    let theirs = tower::limit::ConcurrencyLimitLayer::new(1_000);
    bench_service(
        c,
        "bulkhead/tower_concurrency_limit",
        &rt,
        theirs.layer(ready_inner()),
        1,
    );

    bench_contended(c, "contended2/breakwater", ours.layer(ready_inner()));
    bench_contended(
        c,
        "contended2/tower_concurrency_limit",
        theirs.layer(ready_inner()),
    );
}

criterion_group!(group, benches);
criterion_main!(group);
