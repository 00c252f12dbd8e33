//! Circuit breaker: the closed happy path for each failure model, the open (rejecting) path,
//! and two threads sharing one breaker, beside no middleware.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

mod common;

use std::time::Duration;

use common::{bench_service, ready_inner, runtime};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::{Layer, Service, ServiceExt};
use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};

fn closed(window: SlidingWindow) -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .sliding_window(window)
        .build()
        .unwrap()
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    bench_service(c, "baseline/service_fn", &rt, ready_inner(), 1);
    let count = closed(SlidingWindow::count_based(100));
    bench_service(
        c,
        "circuit_breaker/closed_count",
        &rt,
        count.layer(ready_inner()),
        1,
    );
    let consecutive = closed(SlidingWindow::consecutive_failures(5));
    bench_service(
        c,
        "circuit_breaker/closed_consecutive",
        &rt,
        consecutive.layer(ready_inner()),
        1,
    );
    let time = closed(SlidingWindow::time_based(Duration::from_secs(10)));
    bench_service(
        c,
        "circuit_breaker/closed_time",
        &rt,
        time.layer(ready_inner()),
        1,
    );
    let slow = CircuitBreakerLayer::builder()
        .slow_call_rate_threshold(1.0)
        .build()
        .unwrap();
    bench_service(
        c,
        "circuit_breaker/closed_count+slow_calls",
        &rt,
        slow.layer(ready_inner()),
        1,
    );

    // The open path: every call rejected (one boxed error each, as for any error).
    let open = closed(SlidingWindow::count_based(100));
    open.handle().force_open();
    let svc = open.layer(ready_inner());
    c.bench_function("circuit_breaker/open_rejecting", |b| {
        b.iter_custom(|iters| {
            let mut svc = svc.clone();
            rt.block_on(async move {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let r = svc.ready().await.unwrap().call(1).await;
                    std::hint::black_box(r.unwrap_err());
                }
                start.elapsed()
            })
        })
    });

    // Two OS threads, each with its own current-thread runtime, calling clones of one
    // breaker: time per call per thread.
    let shared = count.layer(ready_inner());
    c.bench_function("circuit_breaker/closed_count_2_threads", |b| {
        b.iter_custom(|iters| {
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let mut svc = shared.clone();
                    std::thread::spawn(move || {
                        let rt = runtime();
                        rt.block_on(async move {
                            let start = std::time::Instant::now();
                            for _ in 0..iters {
                                let r = svc.ready().await.unwrap().call(1).await;
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
                .unwrap()
        })
    });
}

criterion_group!(group, benches);
criterion_main!(group);
