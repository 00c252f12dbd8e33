//! Review of the admission change: each always-ready layer asks its inner service for
//! readiness once in `call` (no-op waker), calls it there when ready, returns a readiness
//! error as the call's answer, and moves a service that is not ready into the response
//! future (a clone taking its place). The first tests failed on the reviewed change (a
//! service whose readiness failed or panicked kept what it had reserved; the breaker's
//! slow-call clock started in `call`) and pass since the fix; the others pin behaviour that
//! held. That each layer's feature builds alone is checked by `.ci/run`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::FutureExt;
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service, ServiceExt};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::cache::CacheLayer;
use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow, State};
use tower_breakwater::coalesce::CoalesceLayer;
use tower_breakwater::preset::Dependency;
use tower_breakwater::rate_limit::RateLimitLayer;
use tower_breakwater::timeout::TimeoutLayer;

const HOUR: Duration = Duration::from_secs(3_600);

/// An inner service whose `poll_ready` fails once each time `fail` is set (a transient
/// readiness error, such as a pool that could not connect), and panics once each time
/// `panic` is set; otherwise ready. Answers its request at once and counts calls.
#[derive(Clone, Default)]
struct Flaky {
    fail: Arc<AtomicBool>,
    panic: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl Service<u32> for Flaky {
    type Response = u32;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u32, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.panic.swap(false, Ordering::SeqCst) {
            panic!("inner poll_ready panics");
        }
        if self.fail.swap(false, Ordering::SeqCst) {
            return Poll::Ready(Err("transient readiness error".into()));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, r: u32) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(r))
    }
}

/// `ConcurrencyLimit` (one permit) over [`Flaky`]: `ConcurrencyLimit::poll_ready` takes its
/// permit and then polls `Flaky`; when that fails (or panics) the permit stays in that
/// `ConcurrencyLimit` instance until it is called or dropped, which tower allows since a
/// service whose readiness failed is to be discarded.
fn limited() -> (ConcurrencyLimit<Flaky>, Flaky) {
    let flaky = Flaky::default();
    (ConcurrencyLimit::new(flaky.clone(), 1), flaky)
}

/// Coalescing that passes every request through (no key).
fn pass_through_coalesce()
-> impl Layer<ConcurrencyLimit<Flaky>, Service: Service<u32, Response = u32, Error = BoxError> + Clone>
{
    CoalesceLayer::builder()
        .key(|_: &u32| None::<u32>)
        .build()
        .unwrap()
}

/// A cache that passes every request through (no key).
fn pass_through_cache()
-> impl Layer<ConcurrencyLimit<Flaky>, Service: Service<u32, Response = u32, Error = BoxError> + Clone>
{
    CacheLayer::builder()
        .key(|_: &u32| None::<u32>)
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// How the inner readiness fails once.
#[derive(Clone, Copy)]
enum Fails {
    /// `poll_ready` returns an error.
    WithError,
    /// `poll_ready` panics (caught by the caller, as a server framework's per-request
    /// `catch_unwind` does).
    WithPanic,
}

/// Two clones of one layered service (as two connections of a server hold them). One call
/// on `a` meets a transient readiness failure after `ConcurrencyLimit` took its permit;
/// then a call on `b` must go through: the only thing between them is the one inner
/// permit, which a failed call must not keep. The layer kept the failed inner instance
/// (permit inside) in `a`, where the old design dropped it with the call's clone.
async fn a_readiness_failure_keeps_no_inner_capacity<L>(layer: L, how: Fails)
where
    L: Layer<ConcurrencyLimit<Flaky>>,
    L::Service: Service<u32, Response = u32, Error = BoxError> + Clone,
{
    let (inner, flaky) = limited();
    let mut a = layer.layer(inner);
    let mut b = a.clone();
    match how {
        Fails::WithError => {
            flaky.fail.store(true, Ordering::SeqCst);
            let err = a.ready().await.unwrap().call(1).await.unwrap_err();
            assert_eq!(err.to_string(), "transient readiness error");
        }
        Fails::WithPanic => {
            flaky.panic.store(true, Ordering::SeqCst);
            // Caught around `call` and the first poll: the panic now unwinds out of `call`
            // (it used to come from the first poll, dropping the clone with the future).
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                a.call(1).now_or_never().map(|r| r.is_ok())
            }));
            assert!(caught.is_err(), "the inner panic reaches the caller");
        }
    }
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 0);
    // `a` is idle now; `b` has nothing in flight in front of it.
    let answer = tokio::time::timeout(HOUR, b.ready().await.unwrap().call(2)).await;
    assert_eq!(
        answer.map(|r| r.map_err(|e| e.to_string())),
        Ok(Ok(2)),
        "an idle clone still holds the inner permit its failed call's readiness took"
    );
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn timeout_readiness_error_releases_the_inner_permit() {
    a_readiness_failure_keeps_no_inner_capacity(
        TimeoutLayer::new(2 * HOUR).unwrap(),
        Fails::WithError,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn circuit_breaker_readiness_error_releases_the_inner_permit() {
    a_readiness_failure_keeps_no_inner_capacity(
        CircuitBreakerLayer::builder().build().unwrap(),
        Fails::WithError,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn bulkhead_readiness_error_releases_the_inner_permit() {
    a_readiness_failure_keeps_no_inner_capacity(BulkheadLayer::new(10).unwrap(), Fails::WithError)
        .await;
}

#[tokio::test(start_paused = true)]
async fn rate_limiter_readiness_error_releases_the_inner_permit() {
    a_readiness_failure_keeps_no_inner_capacity(
        RateLimitLayer::builder()
            .rate(1_000, Duration::from_secs(1))
            .build()
            .unwrap(),
        Fails::WithError,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn coalesce_pass_through_readiness_error_releases_the_inner_permit() {
    a_readiness_failure_keeps_no_inner_capacity(pass_through_coalesce(), Fails::WithError).await;
}

#[tokio::test(start_paused = true)]
async fn cache_pass_through_readiness_error_releases_the_inner_permit() {
    a_readiness_failure_keeps_no_inner_capacity(pass_through_cache(), Fails::WithError).await;
}

#[tokio::test(start_paused = true)]
async fn bulkhead_readiness_panic_releases_the_inner_permit() {
    let layer = BulkheadLayer::new(10).unwrap();
    let h = layer.handle();
    a_readiness_failure_keeps_no_inner_capacity(layer, Fails::WithPanic).await;
    assert_eq!(h.available(), 10);
}

#[tokio::test(start_paused = true)]
async fn circuit_breaker_readiness_panic_releases_the_inner_permit() {
    a_readiness_failure_keeps_no_inner_capacity(
        CircuitBreakerLayer::builder().build().unwrap(),
        Fails::WithPanic,
    )
    .await;
}

/// A breaker that opens when half of its last `calls` calls (at least `calls`) ran over 1 s.
fn slow_call_breaker(calls: u64) -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count_based(calls))
        .minimum_calls(calls)
        .slow_call_rate_threshold(0.5)
        .slow_call_duration(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// The breaker's call clock now starts in `call` (it used to start at the first poll, and
/// the timeout's deadline still does: "a future that is never polled consumes no
/// deadline"). Calls made together and awaited later, which a per-call timeout of the same
/// length lets through, are then slow calls for the breaker, and trip it.
#[tokio::test(start_paused = true)]
async fn breaker_time_before_the_first_poll_is_not_call_time() {
    let breaker = slow_call_breaker(2);
    let h = breaker.handle();
    let echo = tower::service_fn(|r: u32| async move { Ok::<_, BoxError>(r) });
    let mut timed = TimeoutLayer::new(Duration::from_secs(1))
        .unwrap()
        .layer(echo);
    let mut guarded = breaker.layer(echo);

    let t = timed.call(1);
    let (a, b) = (guarded.call(1), guarded.call(2));
    tokio::time::advance(Duration::from_secs(2)).await;
    // The timeout's deadline starts at the first poll: the late-polled call succeeds.
    assert_eq!(t.await.unwrap(), 1);
    assert_eq!((a.await.unwrap(), b.await.unwrap()), (1, 2));
    assert_eq!(h.snapshot().gauge("slow_call_rate"), Some(0.0));
    assert_eq!(h.state(), State::Closed);
}

/// A call dropped without ever being polled did not run for the breaker (nothing of it was
/// awaited); the "cancelled after running longer than `slow_call_duration`" rule must not
/// record it as slow.
#[tokio::test(start_paused = true)]
async fn breaker_call_dropped_before_its_first_poll_is_not_slow() {
    let breaker = slow_call_breaker(1);
    let h = breaker.handle();
    let mut svc = breaker.layer(tower::service_fn(
        |r: u32| async move { Ok::<_, BoxError>(r) },
    ));
    let never_polled = svc.call(1);
    tokio::time::advance(Duration::from_secs(2)).await;
    drop(never_polled);
    assert_eq!(h.snapshot().gauge("calls_in_window"), Some(0.0));
    assert_eq!(h.state(), State::Closed);
}

// ---- Behaviour that held (pinned; each can fail) ----

/// Counts wakes.
#[derive(Default)]
struct Wakes(AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// One inner permit, held by `holder` (a `ConcurrencyLimit` made ready and never called).
async fn held_limit() -> (ConcurrencyLimit<Flaky>, ConcurrencyLimit<Flaky>, Flaky) {
    let echo = Flaky::default();
    let inner = ConcurrencyLimit::new(echo.clone(), 1);
    let mut holder = inner.clone();
    holder.ready().await.unwrap();
    (inner, holder, echo)
}

/// Under `layer`: a call that finds the inner service not ready is woken (exactly once)
/// on the waker of its first poll when the permit comes back; a permit freed between
/// `call` (no-op waker) and the first poll is found by that poll; a call dropped before its
/// first poll, or after it, gives its queue place back; dropping the layered service does
/// not strand a call in flight.
async fn not_ready_inner_wakes_the_polling_task<L>(layer: L)
where
    L: Layer<ConcurrencyLimit<Flaky>>,
    L::Service: Service<u32, Response = u32, Error = BoxError>,
{
    // Woken on the first poll's waker.
    let (inner, holder, echo) = held_limit().await;
    let mut svc = layer.layer(inner);
    let mut fut = Box::pin(svc.call(1));
    let wakes = Arc::new(Wakes::default());
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
    drop(holder);
    assert_eq!(
        wakes.0.load(Ordering::SeqCst),
        1,
        "woken when the permit is back"
    );
    assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(1))));
    drop(fut);

    // Freed between `call` and the first poll: found at once.
    let (inner2, holder, _) = held_limit().await;
    let mut svc2 = layer.layer(inner2);
    let fut = svc2.call(2);
    drop(holder);
    assert_eq!(fut.now_or_never().map(|r| r.unwrap()), Some(2));

    // Dropped before its first poll, then after it: the permit goes to the next caller.
    let (inner3, holder, echo3) = held_limit().await;
    let mut svc3 = layer.layer(inner3);
    let unpolled = svc3.call(3);
    let mut polled = Box::pin(svc3.call(4));
    assert!(polled.as_mut().now_or_never().is_none());
    drop(holder);
    drop(unpolled);
    drop(polled);
    assert_eq!(svc3.call(5).now_or_never().map(|r| r.unwrap()), Some(5));
    assert_eq!(
        echo3.calls.load(Ordering::SeqCst),
        1,
        "only the last call reached it"
    );

    // The layered service dropped while a call waits for its readiness.
    let (inner4, holder, _) = held_limit().await;
    let mut svc4 = layer.layer(inner4);
    let mut waiting = Box::pin(svc4.call(6));
    assert!(waiting.as_mut().now_or_never().is_none());
    drop(svc4);
    drop(holder);
    assert_eq!(waiting.now_or_never().map(|r| r.unwrap()), Some(6));
    assert_eq!(echo.calls.load(Ordering::SeqCst), 1);
    drop(svc);
}

#[tokio::test(start_paused = true)]
async fn timeout_wakes_a_not_ready_call() {
    not_ready_inner_wakes_the_polling_task(TimeoutLayer::new(HOUR).unwrap()).await;
}

#[tokio::test(start_paused = true)]
async fn circuit_breaker_wakes_a_not_ready_call() {
    not_ready_inner_wakes_the_polling_task(CircuitBreakerLayer::builder().build().unwrap()).await;
}

#[tokio::test(start_paused = true)]
async fn bulkhead_wakes_a_not_ready_call() {
    let layer = BulkheadLayer::new(4).unwrap();
    let h = layer.handle();
    not_ready_inner_wakes_the_polling_task(layer).await;
    assert_eq!(h.available(), 4);
}

#[tokio::test(start_paused = true)]
async fn rate_limiter_wakes_a_not_ready_call() {
    let layer = RateLimitLayer::builder()
        .rate(1_000, Duration::from_secs(1))
        .burst(100)
        .build()
        .unwrap();
    not_ready_inner_wakes_the_polling_task(layer).await;
}

#[tokio::test(start_paused = true)]
async fn coalesce_pass_through_wakes_a_not_ready_call() {
    not_ready_inner_wakes_the_polling_task(pass_through_coalesce()).await;
}

#[tokio::test(start_paused = true)]
async fn cache_pass_through_wakes_a_not_ready_call() {
    not_ready_inner_wakes_the_polling_task(pass_through_cache()).await;
}

/// The preset over an inner service whose readiness fails once: the call's answer is that
/// error, and every layer accounts for it exactly (the per-call timeout and the deadline
/// count a failure, the breaker a failed call, the bulkhead has its permit back, the rate
/// limiter consumed the call's token).
#[tokio::test(start_paused = true)]
async fn preset_accounts_for_a_readiness_error_in_every_layer() {
    let rec = support::TestRecorder::default();
    let dep = rec.install_while(|| {
        Dependency::builder("dep")
            .rate_limit(10, Duration::from_secs(1), 5, Duration::ZERO)
            .build()
            .unwrap()
    });
    let flaky = Flaky::default();
    let mut svc = dep.layer(flaky.clone());
    flaky.fail.store(true, Ordering::SeqCst);
    let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
    assert_eq!(err.to_string(), "transient readiness error");
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 0);
    for name in ["dep", "dep:deadline"] {
        assert_eq!(
            rec.counter(
                "breakwater_timeout_calls_total",
                &[("name", name), ("outcome", "failure")]
            ),
            Some(1),
            "{name}"
        );
    }
    let breaker = dep.breaker().snapshot();
    assert_eq!(breaker.gauge("calls_in_window"), Some(1.0));
    assert_eq!(breaker.gauge("failure_rate"), Some(1.0));
    assert_eq!(dep.bulkhead().available(), 64);
    assert_eq!(dep.rate_limiter().snapshot().gauge("available"), Some(4.0));
    // The next call goes through.
    assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), 2);
    assert_eq!(dep.breaker().snapshot().gauge("failure_rate"), Some(0.5));
}

#[tokio::test(start_paused = true)]
async fn preset_readiness_error_releases_the_inner_permit() {
    let dep = Dependency::builder("dep").build().unwrap();
    a_readiness_failure_keeps_no_inner_capacity(dep, Fails::WithError).await;
}

/// Ready once, then `Pending` (waking itself at once) on the first poll of each clone, then
/// panicking at the next poll: the readiness of a call that was moved into its response
/// future panics inside that future.
#[derive(Clone, Default)]
struct PanicsWhenPolledAgain {
    polled: bool,
}

impl Service<u32> for PanicsWhenPolledAgain {
    type Response = u32;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u32, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if std::mem::replace(&mut self.polled, true) {
            panic!("inner poll_ready panics in the response future");
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn call(&mut self, r: u32) -> Self::Future {
        std::future::ready(Ok(r))
    }
}

/// A breaker opened by one failure (through a service of its own: the layer's state is
/// shared by every service it makes) whose 1 s wait in Open is over: its next call is its
/// one half-open probe.
async fn breaker_due_for_one_probe() -> CircuitBreakerLayer {
    let breaker = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::consecutive_failures(1))
        .wait_in_open(Duration::from_secs(1))
        .permitted_calls_in_half_open(1)
        .build()
        .unwrap();
    let mut failing = breaker.layer(tower::service_fn(|_: u32| async {
        Err::<u32, BoxError>("down".into())
    }));
    assert!(failing.ready().await.unwrap().call(0).await.is_err());
    assert_eq!(breaker.handle().state(), State::Open);
    tokio::time::advance(Duration::from_secs(1)).await;
    breaker
}

/// A panic in the inner readiness inside the response future returns the bulkhead's permit
/// and frees the breaker's half-open probe slot.
#[tokio::test(start_paused = true)]
async fn a_readiness_panic_in_the_response_future_frees_permit_and_probe_slot() {
    let bulkhead = BulkheadLayer::new(1).unwrap();
    let permits = bulkhead.handle();
    let breaker = breaker_due_for_one_probe().await;
    let h = breaker.handle();
    let mut svc = bulkhead.layer(breaker.layer(PanicsWhenPolledAgain::default()));
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert_eq!(permits.available(), 0);
    // Polled until it panics: in `call` the inner service was polled once already.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..2 {
            assert!(fut.as_mut().now_or_never().is_none());
        }
    }));
    drop(fut);
    assert!(caught.is_err(), "the panic reached the caller");
    assert_eq!(permits.available(), 1);
    assert_eq!(h.state(), State::HalfOpen);
    assert_eq!(h.snapshot().gauge("probes_in_flight"), Some(0.0));
    // The one probe slot is free: the next call is a probe, and its success closes it.
    let mut ok = breaker.layer(tower::service_fn(
        |r: u32| async move { Ok::<_, BoxError>(r) },
    ));
    assert_eq!(ok.ready().await.unwrap().call(2).await.unwrap(), 2);
    assert_eq!(h.state(), State::Closed);
}

/// Whole-body mode over an inner service that is not ready at `call`: the deadline (from
/// the first poll) covers the readiness wait and the body, and the bulkhead's permit is
/// held until the body ends (here: cut by the deadline), then returned.
#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn whole_body_over_a_not_ready_inner_covers_wait_and_body() {
    use http_body_util::BodyExt;
    use support::body::SlowBody;
    use tower_breakwater::error::{self, ErrorKind};

    /// Answers at once with a body of two frames, 100 ms apart.
    #[derive(Clone)]
    struct Server;

    impl Service<u32> for Server {
        type Response = http::Response<SlowBody>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Self::Response, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: u32) -> Self::Future {
            let body = SlowBody::new(&[(100, "a"), (100, "b")], false, support::Count::default());
            std::future::ready(Ok(http::Response::new(body)))
        }
    }

    let bulkhead = BulkheadLayer::builder()
        .max_concurrent_calls(1)
        .whole_body()
        .build()
        .unwrap();
    let permits = bulkhead.handle();
    let deadline = TimeoutLayer::builder()
        .timeout(Duration::from_millis(250))
        .whole_body()
        .build()
        .unwrap();
    let inner = ConcurrencyLimit::new(Server, 1);
    let mut holder = inner.clone();
    holder.ready().await.unwrap();
    let mut svc = deadline.layer(bulkhead.layer(inner));

    let start = tokio::time::Instant::now();
    let mut fut = Box::pin(svc.call(1));
    assert!(
        fut.as_mut().now_or_never().is_none(),
        "waits for the inner permit"
    );
    assert_eq!(
        permits.available(),
        0,
        "the bulkhead permit is held while it waits"
    );
    tokio::time::advance(Duration::from_millis(100)).await;
    drop(holder);
    let mut body = fut.await.unwrap().into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "a");
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    assert_eq!(permits.available(), 0, "held while the body streams");
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(
        error::find(err.as_ref()).map(|e| e.kind()),
        Some(ErrorKind::Timeout)
    );
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    assert_eq!(
        permits.available(),
        1,
        "returned when the deadline cut the body"
    );
}

/// A wait-mode rate limiter: a call that waited for its slot then finds the inner service
/// not ready, and is woken when it becomes ready.
#[tokio::test(start_paused = true)]
async fn rate_limiter_wait_then_not_ready_inner() {
    let limiter = RateLimitLayer::builder()
        .rate(1, Duration::from_secs(1))
        .max_wait(Duration::from_secs(5))
        .build()
        .unwrap();
    let (inner, holder, echo) = held_limit().await;
    let mut svc = limiter.layer(inner);
    let first = tokio::spawn(svc.call(1));
    let second = tokio::spawn(svc.call(2));
    let start = tokio::time::Instant::now();
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(!first.is_finished() && !second.is_finished());
    assert_eq!(echo.calls.load(Ordering::SeqCst), 0);
    drop(holder);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(second.await.unwrap().unwrap(), 2);
    assert_eq!(echo.calls.load(Ordering::SeqCst), 2);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

/// Real threads: many tasks, each with its own clone of a layered stack over two inner
/// permits; every call completes (no wake lost between `call`'s no-op waker and the
/// task's), each reaches the inner service once, and every permit comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_over_a_not_ready_inner_all_complete() {
    let bulkhead = BulkheadLayer::builder()
        .max_concurrent_calls(8)
        .max_wait(Duration::from_secs(3_600))
        .max_waiting(1_000)
        .build()
        .unwrap();
    let permits = bulkhead.handle();
    let breaker = CircuitBreakerLayer::builder().build().unwrap();
    let flaky = Flaky::default();
    let inner = ConcurrencyLimit::new(flaky.clone(), 2);
    let svc = bulkhead.layer(breaker.layer(TimeoutLayer::new(HOUR).unwrap().layer(inner)));
    let tasks: Vec<_> = (0..400u32)
        .map(|i| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                svc.ready().await.unwrap().call(i).await
            })
        })
        .collect();
    let mut sum = 0u64;
    for t in tasks {
        sum += u64::from(t.await.unwrap().unwrap());
    }
    assert_eq!(sum, 399 * 400 / 2);
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 400);
    assert_eq!(permits.available(), 8);
}

/// Deadline propagation with inner calls made in `call`: a per-call timeout called after a
/// bulkhead wait, over an inner service that is still not ready then, fires at the outer
/// deadline, inside the bulkhead, with its own name and shortened duration.
#[tokio::test(start_paused = true)]
async fn inner_timeout_after_a_bulkhead_wait_takes_the_outer_deadline() {
    use tower_breakwater::error;

    let outer = TimeoutLayer::builder()
        .name("outer")
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let bulkhead = BulkheadLayer::builder()
        .max_concurrent_calls(1)
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let inner = TimeoutLayer::builder()
        .name("inner")
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let sleeper = tower::service_fn(|ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, BoxError>(ms)
    });
    let limit = ConcurrencyLimit::new(sleeper, 1);
    let mut holder = limit.clone();
    holder.ready().await.unwrap();
    let svc = outer.layer(bulkhead.layer(inner.layer(limit)));
    let start = tokio::time::Instant::now();
    // Holds the bulkhead's permit for 50 ms (its own inner call waits for `holder`).
    let occupant = tokio::spawn(svc.clone().oneshot(5));
    let late = tokio::spawn(svc.clone().oneshot(10_000));
    tokio::time::sleep(Duration::from_millis(30)).await;
    drop(holder); // the occupant runs 5 ms, then `late` gets the bulkhead permit
    assert_eq!(occupant.await.unwrap().unwrap(), 5);
    let err = late.await.unwrap().unwrap_err();
    let ours = error::find(err.as_ref()).expect("a timeout of ours");
    assert_eq!(
        (ours.name(), ours.elapsed()),
        ("inner", Some(Duration::from_millis(65)))
    );
    assert_eq!(start.elapsed(), Duration::from_millis(100));
}

/// A half-open probe whose inner service is not ready holds its probe slot while it waits;
/// dropped before its first poll, or after it, it frees the slot at once.
#[tokio::test(start_paused = true)]
async fn a_probe_waiting_for_inner_readiness_frees_its_slot_when_dropped() {
    let breaker = breaker_due_for_one_probe().await;
    let h = breaker.handle();
    let (inner, holder, echo) = held_limit().await;
    let mut svc = breaker.layer(inner);
    for polled in [false, true] {
        let mut probe = Box::pin(svc.call(1));
        assert_eq!(h.snapshot().gauge("probes_in_flight"), Some(1.0));
        if polled {
            assert!(probe.as_mut().now_or_never().is_none());
        }
        drop(probe);
        assert_eq!(
            h.snapshot().gauge("probes_in_flight"),
            Some(0.0),
            "polled: {polled}"
        );
        assert_eq!(h.state(), State::HalfOpen);
    }
    drop(holder);
    assert_eq!(svc.call(2).await.unwrap(), 2);
    assert_eq!(h.state(), State::Closed);
    assert_eq!(echo.calls.load(Ordering::SeqCst), 1);
}

/// The same service, not a clone: request 1 meets a readiness error (a pass-through request
/// with no key, for the cache and the coalescer), then request 2 of that service is one
/// that drives a clone of the inner service (a cache miss, a coalesced leader, a call that
/// waited for its rate-limit slot), which waits for the permit the failed instance kept.
async fn a_cloning_call_after_a_readiness_error<L>(layer: L)
where
    L: Layer<ConcurrencyLimit<Flaky>>,
    L::Service: Service<u32, Response = u32, Error = BoxError>,
{
    let (inner, flaky) = limited();
    let mut svc = layer.layer(inner);
    flaky.fail.store(true, Ordering::SeqCst);
    let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
    assert_eq!(err.to_string(), "transient readiness error");
    let answer = tokio::time::timeout(HOUR, svc.ready().await.unwrap().call(2)).await;
    assert_eq!(
        answer.map(|r| r.map_err(|e| e.to_string())),
        Ok(Ok(2)),
        "the call waits for the permit its own service's failed instance holds"
    );
}

#[tokio::test(start_paused = true)]
async fn cache_miss_after_a_pass_through_readiness_error_completes() {
    a_cloning_call_after_a_readiness_error(
        CacheLayer::builder()
            .key(|r: &u32| (*r != 1).then_some(*r))
            .ttl(Duration::from_secs(60))
            .build()
            .unwrap(),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn coalesced_call_after_a_pass_through_readiness_error_completes() {
    a_cloning_call_after_a_readiness_error(
        CoalesceLayer::builder()
            .key(|r: &u32| (*r != 1).then_some(*r))
            .build()
            .unwrap(),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn rate_limited_wait_after_a_readiness_error_completes() {
    a_cloning_call_after_a_readiness_error(
        RateLimitLayer::builder()
            .rate(1, Duration::from_secs(1))
            .max_wait(Duration::from_secs(5))
            .build()
            .unwrap(),
    )
    .await;
}
