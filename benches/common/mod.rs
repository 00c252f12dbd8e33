//! Shared bench harness: one service built once, called in a loop on a current-thread
//! runtime (`svc.ready().await?.call(req).await?`), as the peers were measured.
#![allow(dead_code)]

use criterion::Criterion;
use tower::{Service, ServiceExt};

/// A current-thread runtime with timers enabled.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Benchmarks `svc` under `id`: per iteration one `ready().await` and one call.
pub fn bench_service<S, Req>(
    c: &mut Criterion,
    id: &str,
    rt: &tokio::runtime::Runtime,
    svc: S,
    req: Req,
) where
    S: Service<Req> + Clone,
    S::Error: std::fmt::Debug,
    Req: Clone,
{
    c.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut svc = svc.clone();
            let req = req.clone();
            rt.block_on(async move {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let r = svc.ready().await.unwrap().call(req.clone()).await;
                    std::hint::black_box(r.unwrap());
                }
                start.elapsed()
            })
        })
    });
}

/// An inner service that answers `Ok` at once.
pub fn ready_inner() -> impl Service<
    u64,
    Response = u64,
    Error = std::convert::Infallible,
    Future = std::future::Ready<Result<u64, std::convert::Infallible>>,
> + Clone {
    tower::service_fn(|x: u64| std::future::ready(Ok(x)))
}

/// An inner service that returns `Pending` once before answering `Ok`.
pub fn yielding_inner()
-> impl Service<u64, Response = u64, Error = std::convert::Infallible> + Clone {
    tower::service_fn(|x: u64| async move {
        tokio::task::yield_now().await;
        Ok(x)
    })
}
