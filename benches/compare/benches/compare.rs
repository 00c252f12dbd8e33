//! Per-call overhead of tower-breakwater's layers beside tower's and other resilience crates',
//! in one run, printed as a markdown table. See this member's README for the command.
//!
//! Each category lists our subject first (the reference of its ratios), then the peers.
//! To add one of our layers, build it once and register it with `ours(label, service)` at
//! the top of its category.

use std::convert::Infallible;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use breakwater_compare::{Harness, inner};
use criterion::Criterion;
use tower::{Layer, ServiceBuilder};

/// Never limits at these speeds: 10^9 calls per second for every rate limiter.
const RATE_PER_SEC: u32 = 1_000_000_000;
/// Bulkhead/concurrency-limit capacity: 1000 concurrent calls.
const MAX_CONCURRENT: usize = 1000;
/// Timeout of every timeout subject: 1 s, never fires.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Key every cache subject is asked for (filled before measuring, so every call hits).
const HOT_KEY: u64 = 7;

fn main() {
    let mut criterion = Criterion::default();
    let quick = std::env::var_os("COMPARE_QUICK").is_some_and(|v| v != "0");
    if quick {
        criterion = criterion
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(1))
            .sample_size(30);
    }
    let mut h = Harness::new(criterion.configure_from_args());

    baseline(&mut h);
    timeout(&mut h);
    concurrency(&mut h);
    rate_limit(&mut h);
    breaker(&mut h);
    cache(&mut h);
    coalesce(&mut h);
    stack(&mut h);
    contended(&mut h);

    let mode = if quick { ", COMPARE_QUICK" } else { "" };
    let table = format!("{}{mode}\n\n{}", machine(), h.table());
    println!("\n{table}");
    let path = breakwater_compare::criterion_home().join("breakwater-compare.md");
    if std::fs::write(&path, &table).is_ok() {
        println!("(also written to {})", path.display());
    }
}

/// One line naming the CPU, the cores this run had and the compiler.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cpu}, {cores} cores, {} {}, {}, current-thread tokio runtime, criterion median",
        std::env::consts::OS,
        std::env::consts::ARCH,
        env!("COMPARE_RUSTC_VERSION"),
    )
}

fn baseline(h: &mut Harness) {
    let mut c = h.category("baseline", "baseline");
    c.baseline("no middleware (service_fn)", inner());
    c.baseline_fn("std Instant::now()", async |_| std::time::Instant::now());
    c.baseline_fn("tokio Instant::now()", async |_| {
        tokio::time::Instant::now()
    });
}

fn timeout(h: &mut Harness) {
    let mut c = h.category("timeout", "timeout, never fires (1 s)");
    let ours = tower_breakwater::timeout::TimeoutLayer::new(TIMEOUT).expect("valid timeout");
    c.ours("breakwater timeout", ours.layer(inner()));
    c.peer(
        "tower Timeout",
        tower::timeout::TimeoutLayer::new(TIMEOUT).layer(inner()),
    );
    let limiter = tower_resilience::timelimiter::TimeLimiterLayer::builder()
        .timeout_duration(TIMEOUT)
        .build();
    c.peer("tower-resilience time limiter", limiter.layer(inner()));
}

fn concurrency(h: &mut Harness) {
    let mut c = h.category("bulkhead", "bulkhead with room (1000)");
    c.ours("breakwater bulkhead", breakwater_bulkhead().layer(inner()));
    c.peer(
        "tower ConcurrencyLimit",
        tower::limit::ConcurrencyLimitLayer::new(MAX_CONCURRENT).layer(inner()),
    );
    c.peer(
        "tower-resilience bulkhead",
        resilience_bulkhead().layer(inner()),
    );
}

fn breakwater_bulkhead() -> tower_breakwater::bulkhead::BulkheadLayer {
    tower_breakwater::bulkhead::BulkheadLayer::new(MAX_CONCURRENT).expect("valid bulkhead")
}

fn resilience_bulkhead() -> tower_resilience::bulkhead::BulkheadLayer {
    tower_resilience::bulkhead::BulkheadLayer::builder()
        .max_concurrent_calls(MAX_CONCURRENT)
        .build()
        .expect("valid bulkhead")
}

fn rate_limit(h: &mut Harness) {
    // tower's `RateLimit` registers a timer when built (never polled: it never limits).
    let rt = breakwater_compare::runtime();
    let _timer_context = rt.enter();
    let mut c = h.category("rate-limit", "rate limiter, never limits");
    c.ours(
        "breakwater rate limiter",
        breakwater_rate_limiter().layer(inner()),
    );
    c.peer(
        "tower RateLimit",
        tower::limit::RateLimitLayer::new(RATE_PER_SEC.into(), Duration::from_secs(1))
            .layer(inner()),
    );
    c.peer(
        "tower-resilience rate limiter",
        resilience_rate_limiter().layer(inner()),
    );
    let limiter = governor_limiter();
    c.peer_fn("governor check()", async |_| limiter.check().is_ok());
    c.peer_fn("governor check() + tokio Instant::now()", async |_| {
        black_box(tokio::time::Instant::now());
        limiter.check().is_ok()
    });
}

fn breakwater_rate_limiter() -> tower_breakwater::rate_limit::RateLimitLayer {
    tower_breakwater::rate_limit::RateLimitLayer::builder()
        .rate(u64::from(RATE_PER_SEC), Duration::from_secs(1))
        .build()
        .expect("valid rate limiter")
}

fn breakwater_breaker() -> tower_breakwater::circuit_breaker::CircuitBreakerLayer {
    tower_breakwater::circuit_breaker::CircuitBreakerLayer::builder()
        .sliding_window(tower_breakwater::circuit_breaker::SlidingWindow::count_based(100))
        .build()
        .expect("valid circuit breaker")
}

fn resilience_rate_limiter() -> tower_resilience::ratelimiter::RateLimiterLayer {
    tower_resilience::ratelimiter::RateLimiterLayer::builder()
        .limit_for_period(RATE_PER_SEC as usize)
        .refresh_period(Duration::from_secs(1))
        .build()
        .expect("valid rate limiter")
}

fn governor_limiter() -> Arc<governor::DefaultDirectRateLimiter> {
    let rate = NonZeroU32::new(RATE_PER_SEC).expect("non-zero");
    Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
        rate,
    )))
}

fn breaker(h: &mut Harness) {
    let mut c = h.category("breaker", "circuit breaker, closed, all successes");
    c.ours(
        "breakwater circuit breaker",
        breakwater_breaker().layer(inner()),
    );
    c.peer(
        "tower-resilience circuit breaker",
        resilience_breaker().layer(inner()),
    );
    let failsafe = failsafe_breaker();
    c.peer_fn("failsafe", async |i| {
        failsafe::futures::CircuitBreaker::call(&failsafe, ok(i)).await
    });
    let recloser = recloser_breaker();
    c.peer_fn("recloser", async |i| recloser.call(ok(i)).await);
}

fn ok(i: u64) -> std::future::Ready<Result<u64, Infallible>> {
    std::future::ready(Ok(i))
}

fn resilience_breaker() -> tower_resilience::circuitbreaker::CircuitBreakerLayer {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .sliding_window_size(100)
        .build()
        .expect("valid circuit breaker")
}

fn failsafe_breaker() -> impl failsafe::futures::CircuitBreaker + Clone + Send + Sync {
    failsafe::Config::new().build()
}

fn recloser_breaker() -> recloser::AsyncRecloser {
    recloser::AsyncRecloser::from(recloser::Recloser::default())
}

fn cache(h: &mut Harness) {
    let mut c = h.category("cache", "cache hit").requests(|_| HOT_KEY);
    let (inner, upstream) = counting_inner();
    let mut ours = tower_breakwater::cache::CacheLayer::builder()
        .key(|req: &u64| Some(*req))
        .ttl(Duration::from_secs(3_600))
        .build()
        .expect("valid cache layer")
        .layer(inner);
    fill(&mut ours);
    c.ours("breakwater cache hit", ours);
    check_hits("breakwater cache", &upstream);
    let (upstream_svc, upstream) = counting_inner();
    let mut resilience = tower_resilience::cache::CacheLayer::builder()
        .key_extractor(|req: &u64| *req)
        .build()
        .expect("valid cache")
        .layer(upstream_svc);
    fill(&mut resilience);
    c.peer("tower-resilience cache hit", resilience);
    check_hits("tower-resilience cache", &upstream);
    let moka = moka::future::Cache::<u64, u64>::new(100);
    breakwater_compare::runtime().block_on(moka.insert(HOT_KEY, HOT_KEY));
    c.peer_fn("moka get", async |_| {
        moka.get(&HOT_KEY).await.expect("a hit")
    });
}

/// An inner service like [`inner`] that counts the calls reaching it.
fn counting_inner() -> (
    impl tower::Service<u64, Response = u64, Error = Infallible, Future: Send> + Clone + Send,
    Arc<AtomicU64>,
) {
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let svc = tower::service_fn(move |x: u64| {
        counter.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(x))
    });
    (svc, calls)
}

/// Panics unless the only call that reached upstream was the one that filled the cache (a
/// measurement of misses would be worthless).
fn check_hits(subject: &str, upstream: &AtomicU64) {
    let calls = upstream.load(Ordering::Relaxed);
    assert_eq!(
        calls, 1,
        "{subject}: {calls} calls reached upstream, so not every call hit"
    );
}

/// Calls `svc` once with [`HOT_KEY`], so that the next calls hit.
fn fill<S>(svc: &mut S)
where
    S: tower::Service<u64>,
    S::Error: std::fmt::Debug,
{
    use tower::ServiceExt;
    let rt = breakwater_compare::runtime();
    rt.block_on(async {
        svc.ready()
            .await
            .expect("ready")
            .call(HOT_KEY)
            .await
            .expect("filled");
    });
}

fn coalesce(h: &mut Harness) {
    let mut c = h.category("coalesce", "coalesce, uncontended (fresh key)");
    let ours = tower_breakwater::coalesce::CoalesceLayer::builder()
        .key(|req: &u64| Some(*req))
        .build()
        .expect("valid coalesce layer");
    c.ours("breakwater coalesce", ours.layer(inner()));
    c.peer(
        "tower-resilience coalesce",
        tower_resilience::coalesce::CoalesceLayer::new(|req: &u64| *req).layer(inner()),
    );
    let group = async_singleflight::Group::<u64, u64, Infallible>::new();
    c.peer_fn("async_singleflight work", async |i| {
        group.work(&i, ok(i)).await.expect("leader's value")
    });
}

fn stack(h: &mut Harness) {
    let mut c = h.category("stack", "breaker + rate limiter + bulkhead + timeout");
    // The same four layers, outermost first, as the peer's stack below.
    c.ours(
        "breakwater 4-layer stack",
        ServiceBuilder::new()
            .layer(breakwater_breaker())
            .layer(breakwater_rate_limiter())
            .layer(breakwater_bulkhead())
            .layer(tower_breakwater::timeout::TimeoutLayer::new(TIMEOUT).expect("valid timeout"))
            .service(inner()),
    );
    // The full preset: overall deadline, rate limiter, bulkhead, breaker, per-call timeout.
    let preset = tower_breakwater::preset::Dependency::builder("compare")
        .call_timeout(TIMEOUT)
        .concurrency(MAX_CONCURRENT, Duration::ZERO)
        .rate_limit(
            u64::from(RATE_PER_SEC),
            Duration::from_secs(1),
            u64::from(RATE_PER_SEC),
            Duration::ZERO,
        )
        .circuit_breaker(|b| {
            b.sliding_window(tower_breakwater::circuit_breaker::SlidingWindow::count_based(100))
        })
        .build()
        .expect("valid preset");
    c.ours("breakwater preset (Dependency)", preset.layer(inner()));
    c.peer(
        "tower-resilience 4-layer stack",
        ServiceBuilder::new()
            .layer(resilience_breaker())
            .layer(resilience_rate_limiter())
            .layer(resilience_bulkhead())
            .layer(
                tower_resilience::timelimiter::TimeLimiterLayer::builder()
                    .timeout_duration(TIMEOUT)
                    .build(),
            )
            .service(inner()),
    );
}

fn contended(h: &mut Harness) {
    let mut c = h.contended("breaker", "2 threads: circuit breaker, closed");
    c.ours(
        "breakwater circuit breaker",
        breakwater_breaker().layer(inner()),
    );
    c.peer(
        "tower-resilience circuit breaker",
        resilience_breaker().layer(inner()),
    );
    let failsafe = failsafe_breaker();
    c.peer_fn("failsafe", || {
        let failsafe = failsafe.clone();
        async move |i| failsafe::futures::CircuitBreaker::call(&failsafe, ok(i)).await
    });
    let recloser = recloser_breaker();
    c.peer_fn("recloser", || {
        let recloser = recloser.clone();
        async move |i| recloser.call(ok(i)).await
    });

    let mut c = h.contended("bulkhead", "2 threads: bulkhead with room (1000)");
    c.ours("breakwater bulkhead", breakwater_bulkhead().layer(inner()));
    c.peer(
        "tower ConcurrencyLimit",
        tower::limit::ConcurrencyLimitLayer::new(MAX_CONCURRENT).layer(inner()),
    );
    c.peer(
        "tower-resilience bulkhead",
        resilience_bulkhead().layer(inner()),
    );

    let mut c = h.contended("rate-limit", "2 threads: rate limiter, never limits");
    c.ours(
        "breakwater rate limiter",
        breakwater_rate_limiter().layer(inner()),
    );
    c.peer(
        "tower-resilience rate limiter",
        resilience_rate_limiter().layer(inner()),
    );
    let limiter = governor_limiter();
    c.peer_fn("governor check() + tokio Instant::now()", || {
        let limiter = limiter.clone();
        async move |_| {
            black_box(tokio::time::Instant::now());
            limiter.check().is_ok()
        }
    });
}
