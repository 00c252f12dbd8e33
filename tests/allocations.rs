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

#[cfg(feature = "circuit-breaker")]
mod circuit_breaker {
    use super::*;
    use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};

    fn layer(window: SlidingWindow) -> CircuitBreakerLayer {
        CircuitBreakerLayer::builder()
            .sliding_window(window)
            .build()
            .unwrap()
    }

    #[test]
    fn closed_happy_path_allocates_nothing_without_a_recorder() {
        let rt = runtime();
        for window in [
            SlidingWindow::count_based(10),
            SlidingWindow::consecutive_failures(3),
            SlidingWindow::time_based(Duration::from_secs(10)),
        ] {
            let svc = tower::Layer::layer(&layer(window), ready_inner());
            assert_eq!(allocs_per_call(&rt, svc, 1), 0, "{window:?}");
            let svc = tower::Layer::layer(&layer(window), yielding_inner());
            assert_eq!(allocs_per_call(&rt, svc, 1), 0, "{window:?}, yielding");
        }
    }

    #[test]
    fn closed_happy_path_allocates_nothing_with_a_recorder_and_slow_calls() {
        let rt = runtime();
        let rec = TestRecorder::default();
        let layer = rec.install_while(|| {
            CircuitBreakerLayer::builder()
                .sliding_window(SlidingWindow::count_based(10))
                .slow_call_rate_threshold(0.5)
                .build()
                .unwrap()
        });
        let svc = tower::Layer::layer(&layer, yielding_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0);
        assert_eq!(
            rec.counter(
                "breakwater_circuit_breaker_calls_total",
                &[("name", "default"), ("outcome", "success")]
            ),
            Some(100 + 3 * CALLS)
        );
    }
}

#[cfg(feature = "rate-limit")]
mod rate_limit {
    use super::*;
    use tower_breakwater::rate_limit::RateLimitLayer;

    /// Never limits: T = 1 ns, burst 10^6.
    fn direct() -> RateLimitLayer {
        RateLimitLayer::builder()
            .rate(1_000_000_000, Duration::from_secs(1))
            .burst(1_000_000)
            .build()
            .unwrap()
    }

    fn keyed() -> tower_breakwater::rate_limit::KeyedRateLimitLayer<u32, fn(&u32) -> u32> {
        RateLimitLayer::builder()
            .rate(1_000_000_000, Duration::from_secs(1))
            .burst(1_000_000)
            .keyed((|x: &u32| *x % 4) as fn(&u32) -> u32)
            .build()
            .unwrap()
    }

    #[test]
    fn happy_path_allocates_nothing_without_a_recorder() {
        let rt = runtime();
        let svc = tower::Layer::layer(&direct(), ready_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0);
        let svc = tower::Layer::layer(&direct(), yielding_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0, "pending inner");
        // A key already tracked (inserted during the warm-up).
        let svc = tower::Layer::layer(&keyed(), ready_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0, "keyed");
    }

    #[test]
    fn happy_path_allocates_nothing_with_a_recorder() {
        let rt = runtime();
        let rec = TestRecorder::default();
        let layer = rec.install_while(|| {
            RateLimitLayer::builder()
                .name("direct")
                .rate(1_000_000_000, Duration::from_secs(1))
                .burst(1_000_000)
                .build()
                .unwrap()
        });
        let svc = tower::Layer::layer(&layer, yielding_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0);
        let permitted = |name| {
            rec.counter(
                "breakwater_rate_limiter_calls_total",
                &[("name", name), ("outcome", "permitted")],
            )
        };
        assert_eq!(permitted("direct"), Some(100 + 3 * CALLS));
        let keyed = rec.install_while(|| {
            RateLimitLayer::builder()
                .name("keyed")
                .rate(1_000_000_000, Duration::from_secs(1))
                .burst(1_000_000)
                .keyed(|x: &u32| *x)
                .build()
                .unwrap()
        });
        let svc = tower::Layer::layer(&keyed, ready_inner());
        assert_eq!(allocs_per_call(&rt, svc, 7), 0, "keyed, tracked key");
        assert_eq!(permitted("keyed"), Some(100 + 3 * CALLS));
    }
}

#[cfg(feature = "coalesce")]
mod coalesce {
    use super::*;
    use tower_breakwater::coalesce::CoalesceLayer;

    /// As the module's `ready_inner`, with `Send` futures (the shared call may move across
    /// threads).
    fn ready_inner()
    -> impl Service<u32, Response = u32, Error = std::convert::Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        tower::service_fn(|x: u32| std::future::ready(Ok(x)))
    }

    /// As the module's `yielding_inner`, with `Send` futures.
    fn yielding_inner()
    -> impl Service<u32, Response = u32, Error = std::convert::Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        tower::service_fn(|x: u32| async move {
            tokio::task::yield_now().await;
            Ok(x)
        })
    }

    type KeyFn = fn(&u32) -> Option<u32>;

    fn layer() -> CoalesceLayer<u32, u32, KeyFn> {
        CoalesceLayer::builder()
            .key((|k: &u32| Some(*k)) as KeyFn)
            .build()
            .unwrap()
    }

    #[test]
    fn uncontended_leader_allocates_the_boxed_future_only() {
        let rt = runtime();
        let svc = tower::Layer::layer(&layer(), ready_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), CALLS);
        let svc = tower::Layer::layer(&layer(), yielding_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), CALLS, "pending once");
    }

    #[test]
    fn a_request_without_a_key_allocates_nothing() {
        let rt = runtime();
        let rec = TestRecorder::default();
        let layer = rec.install_while(|| {
            CoalesceLayer::builder()
                .key(|_: &u32| None::<u32>)
                .build()
                .unwrap()
        });
        let svc = tower::Layer::layer(&layer, ready_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0);
        let svc = tower::Layer::layer(&layer, yielding_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), 0, "pending once");
        assert_eq!(layer.handle().snapshot().counter("leaders"), Some(0));
    }

    #[test]
    fn uncontended_leader_allocates_the_same_with_a_recorder() {
        let rt = runtime();
        let rec = TestRecorder::default();
        let layer = rec.install_while(layer);
        let svc = tower::Layer::layer(&layer, yielding_inner());
        assert_eq!(allocs_per_call(&rt, svc, 1), CALLS);
        assert_eq!(
            rec.counter(
                "breakwater_coalesce_calls_total",
                &[("name", "default"), ("role", "leader")]
            ),
            Some(100 + 3 * CALLS)
        );
    }

    /// `tokio::join!` of one `call()` per name given, its results as an array.
    macro_rules! join_calls {
        ($call:ident; $($r:ident)+) => {{
            let ($($r,)+) = tokio::join!($({
                let _ = stringify!($r);
                $call()
            }),+);
            [$($r),+]
        }};
    }

    /// Every caller of a shared call got its value.
    fn check<E: std::fmt::Debug>(results: impl IntoIterator<Item = Result<u32, E>>) {
        assert!(results.into_iter().all(|r| r.unwrap() == 1));
    }

    /// Allocations of `ROUNDS` shared calls, each with `n - 1` followers waiting while the
    /// leader's inner call is pending (difference of two runs, as `allocs_per_call` does).
    fn allocs_per_round(rt: &tokio::runtime::Runtime, n: usize) -> u64 {
        const ROUNDS: u64 = 200;
        let mut svc = tower::Layer::layer(&layer(), yielding_inner());
        let mut run = |rounds: u64| {
            allocation_counter::measure(|| {
                rt.block_on(async {
                    for _ in 0..rounds {
                        let mut call = || svc.call(1);
                        match n {
                            2 => check(join_calls!(call; a b)),
                            4 => check(join_calls!(call; a b c d)),
                            8 => check(join_calls!(call; a b c d e f g h)),
                            9 => check(join_calls!(call; a b c d e f g h i)),
                            10 => check(join_calls!(call; a b c d e f g h i j)),
                            16 => check(join_calls!(call; a b c d e f g h i j k l m n o p)),
                            _ => unreachable!(),
                        }
                    }
                })
            })
            .count_total
        };
        run(10);
        let once = run(ROUNDS);
        let twice = run(2 * ROUNDS);
        (twice - once) / ROUNDS
    }

    #[test]
    fn followers_allocate_nothing_of_their_own() {
        let rt = runtime();
        // Boxed future + the slot the first follower makes (the first eight waiters' wakers
        // live inline in it).
        assert_eq!(allocs_per_round(&rt, 2), 2, "one follower");
        assert_eq!(allocs_per_round(&rt, 4), 2, "three followers: no more");
        assert_eq!(allocs_per_round(&rt, 8), 2, "seven followers: no more");
        assert_eq!(allocs_per_round(&rt, 9), 2, "eight followers: inline still");
        // Beyond eight waiters, an overflow list grows by doubling (room for four, then
        // eight, ...): logarithmic in the fan-in. Nine followers: one overflows, one growth;
        // fifteen followers: seven overflow, two growths.
        assert_eq!(allocs_per_round(&rt, 10), 3, "nine followers");
        assert_eq!(allocs_per_round(&rt, 16), 4, "fifteen followers");
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
        // The gauges are written as absolute values, without allocating, and end exact.
        for (gauge, value) in [
            ("breakwater_bulkhead_waiting", 0.0),
            ("breakwater_bulkhead_in_flight", 0.0),
            ("breakwater_bulkhead_available_permits", 1.0),
        ] {
            assert_eq!(rec.gauge(gauge, &[("name", "default")]), Some(value));
        }
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

#[cfg(feature = "cache")]
mod cache {
    use super::*;
    use tower_breakwater::cache::CacheLayer;

    fn svc() -> impl Service<u32, Response = u32, Error = tower_breakwater::BoxError> {
        let layer = CacheLayer::builder()
            .key(|k: &u32| Some(*k))
            .ttl(Duration::from_secs(3_600))
            .build()
            .unwrap();
        tower::Layer::layer(&layer, inner())
    }

    /// As `yielding_inner`, with a `Send` future (fetches run on the coalescing core).
    fn inner() -> impl Service<u32, Response = u32, Error = std::convert::Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        tower::service_fn(|x: u32| async move {
            tokio::task::yield_now().await;
            Ok(x)
        })
    }

    /// A miss boxes the shared fetch once (in the coalescing core); nothing else allocates.
    /// The TTL function stores nothing, so that every call misses.
    #[test]
    fn miss_allocates_one_box() {
        let rt = runtime();
        let layer = CacheLayer::builder()
            .key(|k: &u32| Some(*k))
            .ttl_fn(|_: &u32| None)
            .build()
            .unwrap();
        let h = layer.handle();
        assert_eq!(
            allocs_per_call(&rt, tower::Layer::layer(&layer, inner()), 1),
            CALLS
        );
        assert_eq!(h.snapshot().counter("misses"), Some(100 + 3 * CALLS));
    }

    #[test]
    fn hit_allocates_nothing_without_a_recorder() {
        let rt = runtime();
        // The first call (a miss, in the warm-up) fills the entry; every later call hits.
        assert_eq!(allocs_per_call(&rt, svc(), 1), 0);
    }

    #[test]
    fn hit_allocates_nothing_with_a_recorder() {
        let rt = runtime();
        let rec = TestRecorder::default();
        let svc = rec.install_while(svc);
        assert_eq!(allocs_per_call(&rt, svc, 1), 0);
        assert_eq!(
            rec.counter(
                "breakwater_cache_lookups_total",
                &[("name", "default"), ("result", "hit")]
            ),
            Some(99 + 3 * CALLS)
        );
    }
}

/// The three `.whole_body()` layers stacked, the body read frame by frame to its end on every
/// call: the wrapped bodies allocate nothing per frame, and nothing per call while the body
/// never returns `Pending` (the timeout's timer is armed only for a body that does).
#[cfg(all(
    feature = "http",
    feature = "timeout",
    feature = "bulkhead",
    feature = "circuit-breaker"
))]
mod whole_body {
    use super::*;
    use bytes::Bytes;
    use http_body::Body;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceBuilder;
    use tower_breakwater::bulkhead::BulkheadLayer;
    use tower_breakwater::circuit_breaker::CircuitBreakerLayer;
    use tower_breakwater::timeout::TimeoutLayer;

    /// Allocations of `CALLS` calls, each reading its body to the end (the difference of two
    /// runs, as in [`allocs_per_call`]).
    fn allocs_per_read_call<S, B>(rt: &tokio::runtime::Runtime, mut svc: S) -> u64
    where
        S: Service<u32, Response = http::Response<B>>,
        S::Error: std::fmt::Debug,
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Debug,
    {
        let mut run = |n: u64| {
            allocation_counter::measure(|| {
                rt.block_on(async {
                    for i in 0..n {
                        let res = svc.ready().await.unwrap().call(1).await.unwrap();
                        let mut body = res.into_body();
                        let mut frames = 0;
                        while let Some(frame) = body.frame().await {
                            frame.unwrap();
                            frames += 1;
                        }
                        assert_eq!(frames, 1, "call {i}");
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

    #[test]
    fn stacked_whole_body_layers_allocate_nothing_per_call_or_frame() {
        let rt = runtime();
        let rec = TestRecorder::default();
        let (bulkhead, breaker, timeout) = rec.install_while(|| {
            (
                BulkheadLayer::builder()
                    .max_concurrent_calls(10)
                    .whole_body()
                    .build()
                    .unwrap(),
                CircuitBreakerLayer::builder()
                    .slow_call_rate_threshold(0.5)
                    .whole_body()
                    .build()
                    .unwrap(),
                TimeoutLayer::builder()
                    .timeout(Duration::from_secs(1))
                    .whole_body()
                    .build()
                    .unwrap(),
            )
        });
        let permits = bulkhead.handle();
        let svc = ServiceBuilder::new()
            .layer(bulkhead)
            .layer(breaker)
            .layer(timeout)
            .service(tower::service_fn(|_: u32| async {
                tokio::task::yield_now().await;
                let body = Full::new(Bytes::from_static(b"frame"));
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            }));
        assert_eq!(allocs_per_read_call(&rt, svc), 0);
        assert_eq!(permits.available(), 10);
        let success = [("name", "default"), ("outcome", "success")];
        assert_eq!(
            rec.counter("breakwater_circuit_breaker_calls_total", &success),
            Some(100 + 3 * CALLS)
        );
        assert_eq!(
            rec.counter("breakwater_timeout_calls_total", &success),
            Some(100 + 3 * CALLS)
        );
    }
}

#[cfg(all(feature = "circuit-breaker", feature = "http"))]
mod circuit_breaker_retry_after {
    use super::*;
    use tower_breakwater::circuit_breaker::CircuitBreakerLayer;
    use tower_breakwater::http::HttpClassifier;

    /// The Retry-After hold costs nothing on the success path: no header is read.
    #[test]
    fn closed_happy_path_with_the_hold_on_allocates_nothing() {
        let rt = runtime();
        let layer = CircuitBreakerLayer::builder()
            .classifier(HttpClassifier::new())
            .retry_after_hold(Duration::from_secs(600))
            .build()
            .unwrap();
        let inner = tower::service_fn(|status: u16| {
            let mut res = http::Response::new(());
            *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
            std::future::ready(Ok::<_, std::convert::Infallible>(res))
        });
        let svc = tower::Layer::layer(&layer, inner);
        assert_eq!(allocs_per_call(&rt, svc.clone(), 200), 0);
        assert_eq!(allocs_per_call(&rt, svc, 404), 0, "a 4xx is a success");
    }
}
