//! Allocation counts per call on each layer's happy path, with and without a metrics recorder
//! (ours: handles are plain atomics). Counting is per thread (`allocation-counter`), on a
//! current-thread runtime, after a warm-up.

mod support;

use std::time::Duration;

use support::TestRecorder;
use tower::{Service, ServiceExt};

const CALLS: u64 = 1_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Allocations made by `CALLS` calls of `svc`, on one thread, after a warm-up: the
/// difference between a `block_on` running `2 * CALLS` calls and one running `CALLS`, so
/// that what the runtime allocates once per `block_on` does not count.
fn allocs_per_call<S, Req: Clone>(rt: &tokio::runtime::Runtime, mut svc: S, req: Req) -> u64
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let mut run = |n: u64| {
        allocation_counter::measure(|| {
            rt.block_on(async {
                for _ in 0..n {
                    svc.ready().await.unwrap().call(req.clone()).await.unwrap();
                }
            })
        })
        .count_total
    };
    run(100);
    let once = run(CALLS);
    let twice = run(2 * CALLS);
    twice.saturating_sub(once)
}

/// An inner service that answers at once.
fn ready_inner() -> impl Service<u32, Response = u32, Error = std::convert::Infallible> + Clone {
    tower::service_fn(|x: u32| std::future::ready(Ok(x)))
}

/// An inner service that returns `Pending` once before answering (as a real client does).
fn yielding_inner() -> impl Service<u32, Response = u32, Error = std::convert::Infallible> + Clone {
    tower::service_fn(|x: u32| async move {
        tokio::task::yield_now().await;
        Ok(x)
    })
}

#[cfg(feature = "timeout")]
mod timeout {
    use super::*;
    use tower_breakwater::timeout::TimeoutLayer;

    fn layer() -> TimeoutLayer {
        TimeoutLayer::new(Duration::from_secs(1)).unwrap()
    }

    #[test]
    fn happy_path_allocates_nothing_without_a_recorder() {
        let rt = runtime();
        let svc = tower::Layer::layer(&layer(), ready_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0);
        let svc = tower::Layer::layer(&layer(), yielding_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0, "armed timer");
    }

    #[test]
    fn happy_path_allocates_nothing_with_a_recorder() {
        let rt = runtime();
        let rec = TestRecorder::default();
        let layer = rec.install_while(layer);
        let svc = tower::Layer::layer(&layer, yielding_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0);
        assert_eq!(
            rec.counter(
                "breakwater_timeout_calls_total",
                &[("name", "default"), ("outcome", "success")]
            ),
            Some(100 + 3 * CALLS)
        );
    }
}

#[cfg(feature = "bulkhead")]
mod bulkhead {
    use super::*;
    use tower_breakwater::bulkhead::BulkheadLayer;

    fn shedding() -> BulkheadLayer {
        BulkheadLayer::new(1_000).unwrap()
    }

    fn waiting(durations: bool) -> BulkheadLayer {
        waiting_up_to(Duration::from_secs(1), durations)
    }

    fn waiting_up_to(max_wait: Duration, durations: bool) -> BulkheadLayer {
        BulkheadLayer::builder()
            .max_concurrent_calls(1)
            .max_wait(max_wait)
            .record_durations(durations)
            .build()
            .unwrap()
    }

    #[test]
    fn happy_path_allocates_nothing_without_a_recorder() {
        let rt = runtime();
        let svc = tower::Layer::layer(&shedding(), ready_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0);
        let svc = tower::Layer::layer(&shedding(), yielding_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0, "pending inner call");
        // With waiting on (and a wait histogram), a call finding a permit is the same path.
        let svc = tower::Layer::layer(&waiting(true), yielding_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0, "waiting configured");
    }

    #[test]
    fn happy_path_allocates_nothing_with_a_recorder() {
        let rt = runtime();
        let rec = TestRecorder::default();
        let layer = rec.install_while(shedding);
        let svc = tower::Layer::layer(&layer, yielding_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0);
        let name = [("name", "default")];
        assert_eq!(
            rec.counter(
                "breakwater_bulkhead_calls_total",
                &[("name", "default"), ("outcome", "permitted")]
            ),
            Some(100 + 3 * CALLS)
        );
        assert_eq!(
            rec.gauge("breakwater_bulkhead_available_permits", &name),
            Some(1_000.0)
        );
        assert_eq!(rec.gauge("breakwater_bulkhead_in_flight", &name), Some(0.0));
    }

    /// Allocations per round of two concurrent calls on one permit: the first holds it
    /// across the inner `Pending`, so the second (called next) queues behind it.
    fn allocs_per_queued_call(max_wait: Duration) -> u64 {
        let rt = runtime();
        let rec = TestRecorder::default();
        // The wait histogram is off: the test recorder's histogram storage allocates as it
        // fills.
        let layer = rec.install_while(|| waiting_up_to(max_wait, false));
        let svc = tower::Layer::layer(&layer, yielding_inner());
        let run = |n: u64| {
            allocation_counter::measure(|| {
                rt.block_on(async {
                    for _ in 0..n {
                        let a = svc.clone().oneshot(1);
                        let b = svc.clone().oneshot(2);
                        let (a, b) = futures_join(a, b).await;
                        a.unwrap();
                        b.unwrap();
                    }
                })
            })
            .count_total
        };
        run(100);
        let once = run(CALLS);
        let twice = run(2 * CALLS);
        assert_eq!(
            rec.counter(
                "breakwater_bulkhead_calls_total",
                &[("name", "default"), ("outcome", "permitted")]
            ),
            Some(2 * (100 + 3 * CALLS))
        );
        assert_eq!(
            rec.gauge("breakwater_bulkhead_waiting", &[("name", "default")]),
            Some(0.0)
        );
        (twice - once) / CALLS
    }

    /// A queue that has reached its size reuses its slots (tokio's task wakers are
    /// reference counts, not allocations): a queued call allocates only its boxed timer,
    /// and nothing at all without a maximum wait.
    #[test]
    fn a_queued_call_allocates_only_its_timer() {
        assert_eq!(allocs_per_queued_call(Duration::from_secs(1)), 1);
        assert_eq!(
            allocs_per_queued_call(Duration::MAX),
            0,
            "no deadline, no timer"
        );
    }

    /// Polls two futures concurrently on one task, without allocating.
    async fn futures_join<A: std::future::Future, B: std::future::Future>(
        a: A,
        b: B,
    ) -> (A::Output, B::Output) {
        let mut a = std::pin::pin!(a);
        let mut b = std::pin::pin!(b);
        let (mut ra, mut rb) = (None, None);
        std::future::poll_fn(|cx| {
            if ra.is_none() {
                if let std::task::Poll::Ready(v) = a.as_mut().poll(cx) {
                    ra = Some(v);
                }
            }
            if rb.is_none() {
                if let std::task::Poll::Ready(v) = b.as_mut().poll(cx) {
                    rb = Some(v);
                }
            }
            if ra.is_some() && rb.is_some() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        (ra.unwrap(), rb.unwrap())
    }
}
