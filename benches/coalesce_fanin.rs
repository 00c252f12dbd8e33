//! Coalescing fan-in: 1,000 and 10,000 concurrent requests for one key through the coalesce
//! layer. Per sample: the requests are made and polled once (one leader goes upstream, every
//! other caller joins it as a follower), then the upstream call is released and every caller
//! gets the response. Reported: time to resolve all the callers of one fan-in, and the calls
//! that reached upstream per fan-in (checked to be exactly 1, printed once per size).
//!
//! `cargo bench --bench coalesce_fanin -- --warm-up-time 1 --measurement-time 2`

#![allow(missing_docs)] // criterion_group! generates undocumented functions

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::sync::Notify;
use tower::{Layer, Service};
use tower_breakwater::coalesce::{CoalesceHandle, CoalesceLayer};

/// The key every request of a fan-in asks for.
const KEY: u64 = 7;

/// An upstream that counts its calls and answers only once `gate` is notified, so that
/// every caller has joined before the shared call ends.
fn gated_upstream(
    gate: Arc<Notify>,
    calls: Arc<AtomicU64>,
) -> impl Service<u64, Response = u64, Error = std::convert::Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |x: u64| {
        calls.fetch_add(1, Ordering::Relaxed);
        let gate = gate.clone();
        async move {
            gate.notified().await;
            Ok(x)
        }
    })
}

/// The followers counter of the layer's snapshot.
fn followers(handle: &CoalesceHandle) -> u64 {
    handle.snapshot().counter("followers").unwrap_or(0)
}

/// One fan-in of `n` callers; returns the calls that reached upstream.
async fn fan_in<S>(
    svc: &mut S,
    n: usize,
    gate: &Notify,
    calls: &AtomicU64,
    h: &CoalesceHandle,
) -> u64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let before = calls.load(Ordering::Relaxed);
    let followers_before = followers(h);
    let waiting = (n - 1) as u64;
    // `poll_ready` is always ready for this layer: no readiness to drive between calls.
    let futs: Vec<_> = (0..n).map(|_| svc.call(KEY)).collect();
    let mut all = pin!(futures_util::future::join_all(futs));
    // Poll until every caller has joined (one pass in practice), then release upstream.
    while followers(h) - followers_before < waiting {
        std::future::poll_fn(|cx| {
            assert!(all.as_mut().poll(cx).is_pending(), "released too early");
            Poll::Ready(())
        })
        .await;
    }
    gate.notify_one();
    for r in all.await {
        assert_eq!(r.expect("every caller gets the response"), KEY);
    }
    calls.load(Ordering::Relaxed) - before
}

fn benches(c: &mut Criterion) {
    let rt = common::runtime();
    let gate = Arc::new(Notify::new());
    let calls = Arc::new(AtomicU64::new(0));
    let layer = CoalesceLayer::builder()
        .name("fanin")
        .key(|k: &u64| Some(*k))
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(gated_upstream(gate.clone(), calls.clone()));

    let mut g = c.benchmark_group("coalesce_fanin");
    for n in [1_000usize, 10_000] {
        // Once outside the measurement: the upstream calls of one fan-in, and its time.
        let mut probe = svc.clone();
        let start = Instant::now();
        let upstream = rt.block_on(fan_in(&mut probe, n, &gate, &calls, &handle));
        println!(
            "coalesce_fanin/{n}: {upstream} upstream call(s) for {n} concurrent same-key requests, \
             resolved in {:?} (one unmeasured run)",
            start.elapsed()
        );
        assert_eq!(
            upstream, 1,
            "{n} concurrent requests must share one upstream call"
        );

        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let mut svc = svc.clone();
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let upstream = fan_in(&mut svc, n, &gate, &calls, &handle).await;
                        total += start.elapsed();
                        assert_eq!(upstream, 1);
                    }
                    total
                })
            })
        });
    }
    g.finish();
}

criterion_group!(group, benches);
criterion_main!(group);
