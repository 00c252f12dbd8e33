//! Response cache, adversarial review: the acceptance points of the cache issue re-derived
//! with exact numbers, cancellation, panics, odd configurations, capacity, metrics, delta
//! measurement, classification, back-off, shared state, a multi-thread run and the HTTP
//! storability rules. Each defect these tests found is fixed; the tests keep it fixed.
#![cfg(feature = "cache")]

mod support;

use support::reads::{cached, get};

use std::future::Future;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use support::{Count, DropGuard, TestRecorder};
use tokio::task::JoinHandle;
use tokio::time::{Instant, advance, sleep, sleep_until, timeout};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::cache::{CacheBuilder, CacheHandle, CacheLayer, FixedTtl};
use tower_breakwater::error::{self, ErrorKind};
use tower_breakwater::event::EventKind;

const S: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `-ln(u) = 1`: the early window is exactly `beta * delta`.
fn u_e() -> f64 {
    (-1f64).exp()
}

/// Lets spawned tasks (detached refreshes, readers) run until they wait on something.
async fn run_tasks() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

/// Moves the paused clock to `t`.
async fn at(t: Instant) {
    let now = Instant::now();
    assert!(t >= now, "the clock only moves forward");
    advance(t - now).await;
}

/// What the upstream does on its `n`th call (counted from 1).
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Answers `n` after this many milliseconds.
    Ok(u64),
    /// Fails after this many milliseconds.
    Fail(u64),
    /// Never answers.
    Hang,
    /// Panics after this many milliseconds.
    Panic(u64),
}

/// A scripted upstream: counts calls and drops of its response futures, and answers each
/// call with its number.
#[derive(Clone)]
struct Up {
    calls: Count,
    drops: Count,
    script: Arc<dyn Fn(u64) -> Step + Send + Sync>,
}

impl Up {
    fn new(script: impl Fn(u64) -> Step + Send + Sync + 'static) -> Self {
        Up {
            calls: Count::default(),
            drops: Count::default(),
            script: Arc::new(script),
        }
    }

    fn service(
        &self,
    ) -> impl Service<u64, Response = u64, Error = io::Error, Future: Send> + Clone + Send + 'static
    {
        let up = self.clone();
        service_fn(move |_key: u64| {
            up.calls.incr();
            let n = up.calls.get();
            let step = (up.script)(n);
            let guard = DropGuard(up.drops.clone());
            async move {
                let _guard = guard;
                let wait = |d: u64| async move {
                    if d > 0 {
                        sleep(ms(d)).await;
                    }
                };
                match step {
                    Step::Ok(d) => {
                        wait(d).await;
                        Ok(n)
                    }
                    Step::Fail(d) => {
                        wait(d).await;
                        Err(io::Error::other("down"))
                    }
                    Step::Hang => std::future::pending().await,
                    Step::Panic(d) => {
                        wait(d).await;
                        panic!("upstream panicked on call {n}")
                    }
                }
            }
        })
    }
}

/// A settable `u` for the random source.
#[derive(Clone)]
struct Dial(Arc<AtomicU64>);

impl Dial {
    fn new(u: f64) -> Self {
        Dial(Arc::new(AtomicU64::new(u.to_bits())))
    }
    fn set(&self, u: f64) {
        self.0.store(u.to_bits(), Ordering::SeqCst);
    }
    fn source(&self) -> impl Fn() -> f64 + Send + Sync + 'static {
        let d = self.0.clone();
        move || f64::from_bits(d.load(Ordering::SeqCst))
    }
}

type KeyFn = fn(&u64) -> Option<u64>;

/// Key 0 passes through; every other request is its own key.
fn key_of(k: &u64) -> Option<u64> {
    (*k != 0).then_some(*k)
}

/// Name "r", the key function above, a 60 s TTL, `u = 1` (no early refresh unless a test
/// sets its own source, so that no count depends on a random draw), everything else at its
/// default.
fn base() -> CacheBuilder<u64, u64, KeyFn, FixedTtl> {
    CacheLayer::builder()
        .name("r")
        .key(key_of as KeyFn)
        .ttl(60 * S)
        .random(|| 1.0)
}

/// A read on its own task (so that it can panic or be aborted).
fn spawn_get<S>(svc: &S, k: u64) -> JoinHandle<Result<u64, BoxError>>
where
    S: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let mut svc = svc.clone();
    tokio::spawn(async move { get(&mut svc, k).await })
}

fn counters(h: &CacheHandle) -> [u64; 5] {
    let s = h.snapshot();
    [
        "hits",
        "misses",
        "stale",
        "early_refreshes",
        "refresh_errors",
    ]
    .map(|c| s.counter(c).expect("a cache snapshot counter"))
}

// ---------------------------------------------------------------------------------------
// Acceptance points, re-derived.
// ---------------------------------------------------------------------------------------

/// delta 2 s (the fill takes 2 s), TTL 60 s, `u = e^-1`: the window is `beta * delta`, i.e.
/// 2 s with beta 1 and 4 s with beta 2; checked 100 ms on each side of its edge.
#[tokio::test(start_paused = true)]
async fn xfetch_window_edges_for_beta_1_and_2() {
    for (beta, window) in [(1.0, 2_000u64), (2.0, 4_000)] {
        let up = Up::new(|n| Step::Ok(if n == 1 { 2_000 } else { 0 }));
        let layer = base().beta(beta).random(u_e).build().unwrap();
        let h = layer.handle();
        let mut svc = layer.layer(up.service());
        assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
        let expiry = Instant::now() + 60 * S;
        at(expiry - ms(window + 100)).await;
        assert_eq!(cached(&mut svc, 1), 1);
        run_tasks().await;
        assert_eq!(up.calls.get(), 1, "beta {beta}: outside the window");
        at(expiry - ms(window - 100)).await;
        assert_eq!(cached(&mut svc, 1), 1, "the cached value, at once");
        run_tasks().await;
        assert_eq!(up.calls.get(), 2, "beta {beta}: inside the window");
        // hits, misses, stale, early refreshes, refresh errors
        assert_eq!(counters(&h), [2, 1, 0, 1, 0]);
    }
}

/// `u = 1` never refreshes early, even 1 ms before expiry; at expiry the read is not
/// answered at once but fetches.
#[tokio::test(start_paused = true)]
async fn u_one_never_refreshes_and_the_read_at_expiry_fetches() {
    let up = Up::new(|_| Step::Ok(2_000));
    let layer = base().random(|| 1.0).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    let expiry = Instant::now() + 60 * S;
    for back in [30_000, 2_000, 1_000, 1] {
        at(expiry - ms(back)).await;
        assert_eq!(cached(&mut svc, 1), 1);
    }
    run_tasks().await;
    assert_eq!(up.calls.get(), 1);
    at(expiry).await;
    let mut read = Box::pin(svc.call(1));
    assert!((&mut read).now_or_never().is_none(), "expired: a fetch");
    assert_eq!(read.await.unwrap(), 2);
    assert_eq!(up.calls.get(), 2);
    assert_eq!(counters(&h), [4, 2, 0, 0, 0]);
}

/// Ten reads spread over an early refresh start nothing; after it the new value is served,
/// the old expiry no longer applies, and the next window uses the new expiry and the new
/// delta (1 s: 1.1 s before the new expiry nothing, 0.9 s before one refresh).
#[tokio::test(start_paused = true)]
async fn ten_reads_during_a_refresh_then_new_expiry_and_new_delta() {
    let up = Up::new(|n| {
        Step::Ok(match n {
            1 => 2_000,
            2 => 1_000,
            _ => 0,
        })
    });
    let layer = base().random(u_e).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    let t0 = Instant::now(); // stored; expiry t0 + 60 s, delta 2 s
    at(t0 + ms(58_500)).await;
    assert_eq!(cached(&mut svc, 1), 1);
    run_tasks().await;
    assert_eq!(up.calls.get(), 2);
    for _ in 0..10 {
        advance(ms(50)).await;
        assert_eq!(cached(&mut svc, 1), 1);
    }
    run_tasks().await;
    assert_eq!(up.calls.get(), 2, "reads during the refresh start nothing");
    at(t0 + ms(59_500)).await; // the refresh ends: expiry t0 + 119.5 s, delta 1 s
    run_tasks().await;
    assert_eq!(cached(&mut svc, 1), 2);
    at(t0 + 60 * S).await; // the old expiry
    assert_eq!(cached(&mut svc, 1), 2, "the old expiry is gone");
    at(t0 + ms(118_400)).await;
    assert_eq!(cached(&mut svc, 1), 2);
    run_tasks().await;
    assert_eq!(
        up.calls.get(),
        2,
        "1.1 s before the new expiry: outside the 1 s window"
    );
    at(t0 + ms(118_600)).await;
    assert_eq!(cached(&mut svc, 1), 2);
    run_tasks().await;
    assert_eq!(up.calls.get(), 3);
    assert_eq!(counters(&h), [15, 1, 0, 2, 0]);
}

/// At expiry, 1,000 readers on their own tasks make exactly one upstream call and all get
/// its value; each is counted as a miss.
#[tokio::test(start_paused = true)]
async fn at_expiry_a_thousand_reader_tasks_make_one_call() {
    let up = Up::new(|_| Step::Ok(2_000));
    let layer = base().random(|| 1.0).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    advance(60 * S).await;
    let readers: Vec<_> = (0..1_000).map(|_| spawn_get(&svc, 1)).collect();
    run_tasks().await;
    assert_eq!(up.calls.get(), 2);
    advance(2 * S).await;
    for r in readers {
        assert_eq!(r.await.unwrap().unwrap(), 2);
    }
    assert_eq!(up.calls.get(), 2);
    assert_eq!(counters(&h), [0, 1_001, 0, 0, 0]);
    assert_eq!(h.snapshot().gauge("entries"), Some(1.0));
}

/// A failed early refresh: the old value is served (fresh, then stale) until expiry plus the
/// maximum staleness (20 s) and never after; meanwhile the upstream is tried exactly once per
/// back-off interval (5 s). Reads every 500 ms.
#[tokio::test(start_paused = true)]
async fn failed_refresh_serves_old_value_until_staleness_ends_one_try_per_interval() {
    let up = Up::new(|n| {
        if n == 1 {
            Step::Ok(2_000)
        } else {
            Step::Fail(0)
        }
    });
    let layer = base()
        .max_staleness(20 * S)
        .stale_retry_interval(5 * S)
        .random(|| 0.3) // window -ln(0.3) * 2 s = 2.41 s
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    let t0 = Instant::now() - 2 * S; // expiry t0 + 62 s
    at(t0 + 60 * S).await;
    let mut tries = Vec::new();
    while Instant::now() < t0 + 82 * S {
        let before = up.calls.get();
        let t = (Instant::now() - t0).as_millis();
        assert_eq!(get(&mut svc, 1).await.unwrap(), 1, "at t0 + {t} ms");
        run_tasks().await;
        if up.calls.get() > before {
            tries.push(t);
        }
        advance(ms(500)).await;
    }
    assert_eq!(tries, [60_000, 65_000, 70_000, 75_000, 80_000]);
    // Expiry plus the maximum staleness: never served again.
    assert!(get(&mut svc, 1).await.is_err());
    let [hits, misses, stale, early, errors] = counters(&h);
    assert_eq!(
        (hits, early),
        (4, 1),
        "fresh reads at 60, 60.5, 61, 61.5; one refresh"
    );
    assert_eq!(stale, 40, "reads from 62 s to 81.5 s");
    assert_eq!(misses, 2, "the fill and the error");
    assert_eq!(
        errors, 6,
        "the refresh, four fetches while stale, the last fetch"
    );
}

/// Per-read refresh probability through the public API, default source seeded: `n` keys
/// filled together (delta 2 s), each read once at `r` before expiry; the share that refresh
/// matches `exp(-r / (beta * delta))` within 5 binomial standard deviations
/// (`5 * sqrt(p (1 - p) / n)`).
#[tokio::test(start_paused = true)]
async fn refresh_frequency_through_the_service_matches_exp_minus_r_over_beta_delta() {
    let n = 4_000u64;
    for (beta, r_ms) in [
        (1.0, 500u64),
        (1.0, 2_000),
        (1.0, 4_000),
        (2.0, 1_000),
        (2.0, 4_000),
    ] {
        let up = Up::new(|_| Step::Ok(2_000));
        let layer = base()
            .beta(beta)
            .seed(42)
            .max_entries(4 * n as usize)
            .build()
            .unwrap();
        let h = layer.handle();
        let svc = layer.layer(up.service());
        let fills = (1..=n).map(|k| {
            let mut s = svc.clone();
            async move { get(&mut s, k).await.unwrap() }
        });
        futures_util::future::join_all(fills).await;
        assert_eq!(up.calls.get(), n);
        advance(60 * S - ms(r_ms)).await;
        let mut s = svc.clone();
        for k in 1..=n {
            assert_eq!(cached(&mut s, k), k);
        }
        let p = (-(r_ms as f64 / 1000.0) / (beta * 2.0)).exp();
        let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt();
        let freq = counters(&h)[3] as f64 / n as f64;
        assert!(
            (freq - p).abs() <= tol,
            "beta {beta}, r {r_ms} ms: {freq} vs {p} ± {tol}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Cancellation.
// ---------------------------------------------------------------------------------------

/// The reader that started a miss is aborted mid-call: the reader that joined it takes
/// over, the inner future is not dropped early, and the value is stored.
#[tokio::test(start_paused = true)]
async fn aborted_miss_leader_hands_over_to_the_follower() {
    let up = Up::new(|_| Step::Ok(2_000));
    let layer = base().build().unwrap();
    let mut svc = layer.layer(up.service());
    let leader = spawn_get(&svc, 1);
    run_tasks().await;
    let follower = spawn_get(&svc, 1);
    run_tasks().await;
    leader.abort();
    run_tasks().await;
    assert!(leader.await.unwrap_err().is_cancelled());
    assert_eq!((up.calls.get(), up.drops.get()), (1, 0), "the call goes on");
    advance(2 * S).await;
    assert_eq!(follower.await.unwrap().unwrap(), 1);
    assert_eq!((up.calls.get(), up.drops.get()), (1, 1));
    assert_eq!(
        cached(&mut svc, 1),
        1,
        "stored by the call the follower finished"
    );
}

/// A miss whose only reader is aborted: the inner future is dropped at once, and nothing is
/// left behind: the next read starts a new call and stores its value.
#[tokio::test(start_paused = true)]
async fn a_miss_nobody_waits_for_drops_the_inner_future_and_leaves_nothing() {
    let up = Up::new(|_| Step::Ok(2_000));
    let layer = base().build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    let reader = spawn_get(&svc, 1);
    run_tasks().await;
    reader.abort();
    run_tasks().await;
    assert_eq!((up.calls.get(), up.drops.get()), (1, 1));
    assert_eq!(get(&mut svc, 1).await.unwrap(), 2);
    assert_eq!(cached(&mut svc, 1), 2);
    assert_eq!(h.snapshot().gauge("entries"), Some(1.0));
}

/// A reader of an expired entry whose fetch fails, aborted while the fetch runs: the other
/// reader still gets the stale value.
#[tokio::test(start_paused = true)]
async fn aborted_reader_of_a_failing_fetch_leaves_the_other_reader_its_stale_value() {
    let up = Up::new(|n| {
        if n == 1 {
            Step::Ok(0)
        } else {
            Step::Fail(1_000)
        }
    });
    let layer = base().max_staleness(30 * S).build().unwrap();
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    advance(61 * S).await;
    let a = spawn_get(&svc, 1);
    run_tasks().await;
    let b = spawn_get(&svc, 1);
    run_tasks().await;
    a.abort();
    advance(S).await;
    assert_eq!(b.await.unwrap().unwrap(), 1);
    assert_eq!(up.calls.get(), 2);
}

/// An early refresh that never returns (a hung connection) must not pin the key: once the
/// entry has expired and the readers waiting on that call have given up (a timeout outside
/// the cache), a later reader should go upstream again. The refresh fails at its deadline
/// (the default 30 s refresh timeout, t0 + 90.5 s): a refresh error, and the hung upstream
/// future is dropped.
#[tokio::test(start_paused = true)]
async fn a_hung_early_refresh_pins_the_key_for_ever() {
    let up = Up::new(|n| match n {
        1 => Step::Ok(2_000),
        2 => Step::Hang,
        _ => Step::Ok(0),
    });
    let layer = base().random(|| 0.3).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    let t0 = Instant::now() - 2 * S; // expiry t0 + 62 s
    at(t0 + ms(60_500)).await;
    assert_eq!(cached(&mut svc, 1), 1); // starts the refresh, which hangs
    run_tasks().await;
    assert_eq!(up.calls.get(), 2);
    at(t0 + 63 * S).await;
    assert!(
        timeout(S, get(&mut svc, 1)).await.is_err(),
        "joined the hung call"
    );
    at(t0 + ms(90_499)).await;
    run_tasks().await;
    assert_eq!((up.drops.get(), counters(&h)[4]), (1, 0), "still running");
    at(t0 + ms(90_500)).await;
    run_tasks().await; // the refresh's task sees its deadline
    assert_eq!((up.drops.get(), counters(&h)[4]), (2, 1), "timed out");
    at(t0 + 120 * S).await;
    let later = timeout(S, get(&mut svc, 1)).await;
    assert_eq!(
        (later.ok().and_then(Result::ok), up.calls.get()),
        (Some(3), 3),
        "a minute later the upstream is tried again"
    );
}

/// A miss whose reader is cancelled before the fetch ends is a lookup all the same (it
/// caused an upstream call): counted as a miss when its response future is dropped, so a
/// stampede of readers that all time out does not report zero misses.
#[tokio::test(start_paused = true)]
async fn a_cancelled_miss_is_still_counted_as_a_miss() {
    let up = Up::new(|_| Step::Ok(2_000));
    let layer = base().build().unwrap();
    let h = layer.handle();
    let svc = layer.layer(up.service());
    let readers: Vec<_> = (0..3).map(|_| spawn_get(&svc, 1)).collect();
    run_tasks().await;
    for r in &readers {
        r.abort();
    }
    run_tasks().await;
    assert_eq!(up.calls.get(), 1);
    assert_eq!(counters(&h)[1], 3, "three lookups missed");
}

// ---------------------------------------------------------------------------------------
// Panics.
// ---------------------------------------------------------------------------------------

/// The upstream panics during a miss: the driving reader's task panics, the other reader
/// gets a `Panicked` error at once (no hang), and the key is not poisoned.
#[tokio::test(start_paused = true)]
async fn a_panicking_miss_fails_the_follower_with_panicked_and_the_key_recovers() {
    let up = Up::new(|n| {
        if n == 1 {
            Step::Panic(1_000)
        } else {
            Step::Ok(0)
        }
    });
    let layer = base().build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    let leader = spawn_get(&svc, 1);
    run_tasks().await;
    let follower = spawn_get(&svc, 1);
    run_tasks().await;
    advance(S).await;
    run_tasks().await;
    assert!(leader.await.unwrap_err().is_panic());
    let e = follower.await.unwrap().unwrap_err();
    assert_eq!(
        error::find(&*e).map(|b| b.kind()),
        Some(ErrorKind::Panicked)
    );
    assert_eq!(get(&mut svc, 1).await.unwrap(), 2);
    assert_eq!(cached(&mut svc, 1), 2);
    assert_eq!(h.snapshot().gauge("entries"), Some(1.0));
}

/// A panicking key function unwinds out of `call`; a random source that panics once
/// unwinds out of `call` too and leaves no refresh flag behind: the next read in the
/// window starts the refresh.
#[tokio::test(start_paused = true)]
async fn key_fn_and_random_source_panics_leave_nothing_behind() {
    let up = Up::new(|n| Step::Ok(if n == 1 { 2_000 } else { 0 }));
    let boom = Arc::new(AtomicBool::new(true));
    let b = boom.clone();
    let layer = CacheLayer::builder()
        .key(|k: &u64| {
            assert_ne!(*k, 13, "key function panics");
            Some(*k)
        })
        .ttl(60 * S)
        .random(move || {
            assert!(!b.swap(false, Ordering::SeqCst), "random source panics");
            u_e()
        })
        .build()
        .unwrap();
    let mut svc = layer.layer(up.service());
    assert!(catch_unwind(AssertUnwindSafe(|| drop(svc.call(13)))).is_err());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    advance(59 * S).await; // 1 s before expiry, in the 2 s window
    assert!(catch_unwind(AssertUnwindSafe(|| drop(svc.call(1)))).is_err());
    assert_eq!(up.calls.get(), 1);
    assert_eq!(cached(&mut svc, 1), 1);
    run_tasks().await;
    assert_eq!(up.calls.get(), 2, "the next read in the window refreshes");
}

/// A TTL function or a classifier that panics fails that fetch (the driving reader's task
/// panics) without poisoning the key: the next fetch stores its value.
#[tokio::test(start_paused = true)]
async fn ttl_fn_and_classifier_panics_do_not_poison_the_key() {
    for in_classifier in [false, true] {
        let up = Up::new(|_| Step::Ok(0));
        let boom = Arc::new(AtomicBool::new(true));
        let (b1, b2) = (boom.clone(), boom.clone());
        let layer = CacheLayer::builder()
            .key(key_of as KeyFn)
            .ttl_fn(move |_: &u64| {
                assert!(in_classifier || !b1.swap(false, Ordering::SeqCst), "ttl fn");
                Some(60 * S)
            })
            .classifier(tower_breakwater::classify::classify_fn(
                move |_: Result<&u64, &BoxError>| {
                    assert!(
                        !in_classifier || !b2.swap(false, Ordering::SeqCst),
                        "classifier"
                    );
                    tower_breakwater::classify::Outcome::Success
                },
            ))
            .build()
            .unwrap();
        let mut svc = layer.layer(up.service());
        assert!(spawn_get(&svc, 1).await.unwrap_err().is_panic());
        assert_eq!(get(&mut svc, 1).await.unwrap(), 2);
        assert_eq!(cached(&mut svc, 1), 2);
    }
}

/// Known: an early refresh whose upstream panics leaves the entry's "refresh in flight"
/// flag set, so no other early refresh of that entry starts before it expires.
#[tokio::test(start_paused = true)]
async fn the_refresh_flag_is_cleared_after_a_panicking_refresh() {
    let up = Up::new(|n| match n {
        1 => Step::Ok(2_000),
        2 => Step::Panic(0),
        _ => Step::Ok(0),
    });
    let layer = base().random(|| 0.3).build().unwrap(); // window 2.41 s
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    let t0 = Instant::now() - 2 * S; // expiry t0 + 62 s
    at(t0 + ms(59_800)).await;
    assert_eq!(cached(&mut svc, 1), 1); // the refresh starts and panics
    run_tasks().await;
    assert_eq!(up.calls.get(), 2);
    at(t0 + ms(61_900)).await; // past any 1 s back-off, still fresh, in the window
    assert_eq!(cached(&mut svc, 1), 1);
    run_tasks().await;
    assert_eq!(up.calls.get(), 3, "a new early refresh");
}

/// An upstream that panics during an outage gets the treatment of a failing one: the panic
/// is counted in `refresh_errors` and sets the back-off, so the expired key is tried once
/// per interval (in the background after the first), not on every read.
#[tokio::test(start_paused = true)]
async fn a_panicking_upstream_is_backed_off_like_a_failing_one() {
    let up = Up::new(|n| if n == 1 { Step::Ok(0) } else { Step::Panic(0) });
    let layer = base()
        .max_staleness(30 * S)
        .stale_retry_interval(5 * S)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    advance(60 * S).await;
    for _ in 0..10 {
        drop(spawn_get(&svc, 1).await);
        advance(S).await;
    }
    assert_eq!(
        (up.calls.get() - 1, counters(&h)[4]),
        (2, 2),
        "tries at expiry and 5 s later, each a refresh error"
    );
}

// ---------------------------------------------------------------------------------------
// Odd configurations.
// ---------------------------------------------------------------------------------------

/// `ttl(Duration::MAX)` ("never expires") is accepted by `build()`, and then the first
/// store computes `now + ttl`, which overflows and panics inside the shared fetch: the
/// reader's task panics and nothing is ever cached. Expected: a `ConfigError` at build, or
/// an expiry saturated to "never".
#[tokio::test(start_paused = true)]
async fn a_huge_fixed_ttl_is_rejected_or_never_expires() {
    let up = Up::new(|_| Step::Ok(0));
    match base().ttl(Duration::MAX).build() {
        Err(e) => assert_eq!(e.field(), "ttl"),
        Ok(layer) => {
            let mut svc = layer.layer(up.service());
            let first = spawn_get(&svc, 1).await;
            assert!(first.is_ok(), "the reader's task panicked");
            assert_eq!(cached(&mut svc, 1), 1);
        }
    }
}

/// A TTL function returning `Duration::MAX` (or any TTL past the end of `Instant`'s range)
/// cannot be rejected at build time: it must saturate. Today the fetch panics.
#[tokio::test(start_paused = true)]
async fn a_ttl_fn_returning_duration_max_saturates() {
    let up = Up::new(|_| Step::Ok(0));
    let layer = CacheLayer::builder()
        .key(key_of as KeyFn)
        .ttl_fn(|_: &u64| Some(Duration::MAX))
        .build()
        .unwrap();
    let mut svc = layer.layer(up.service());
    let first = spawn_get(&svc, 1).await;
    assert!(first.is_ok(), "the reader's task panicked");
    assert_eq!(cached(&mut svc, 1), 1);
}

/// `max_staleness(Duration::MAX)` ("serve stale for ever during an outage", a common
/// setting) builds, then the first failed fetch after expiry computes `expiry +
/// max_staleness`, which overflows: the reader panics instead of getting the stale value.
#[tokio::test(start_paused = true)]
async fn an_unbounded_max_staleness_serves_stale_for_ever() {
    let up = Up::new(|n| if n == 1 { Step::Ok(0) } else { Step::Fail(0) });
    let layer = base().max_staleness(Duration::MAX).build().unwrap();
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    advance(3_600 * S).await;
    let stale = spawn_get(&svc, 1).await;
    assert_eq!(stale.ok().and_then(Result::ok), Some(1));
}

/// `stale_retry_interval(Duration::MAX)` builds, then the first failure computes
/// `now + interval`, which overflows inside the shared fetch: the reader panics instead of
/// getting the upstream error.
#[tokio::test(start_paused = true)]
async fn a_huge_retry_interval_is_rejected_or_saturates() {
    let up = Up::new(|n| if n == 1 { Step::Ok(0) } else { Step::Fail(0) });
    match base().stale_retry_interval(Duration::MAX).build() {
        Err(e) => assert_eq!(e.field(), "stale_retry_interval"),
        Ok(layer) => {
            let mut svc = layer.layer(up.service());
            get(&mut svc, 1).await.unwrap();
            advance(60 * S).await;
            let failed = spawn_get(&svc, 1).await;
            assert!(failed.is_ok(), "the reader's task panicked");
            assert!(failed.unwrap().is_err());
        }
    }
}

/// Extreme betas: a tiny beta draws no `u` at all (the window is below a nanosecond); a
/// huge or `f64::MAX` beta refreshes on the first read with `u < 1`, and never with `u = 1`
/// (where `-inf * ln(1)` is NaN).
#[tokio::test(start_paused = true)]
async fn extreme_betas_behave() {
    let draws = Count::default();
    let d = draws.clone();
    let up = Up::new(|n| Step::Ok(if n == 1 { 2_000 } else { 0 }));
    let layer = base()
        .beta(1e-300)
        .random(move || {
            d.incr();
            f64::MIN_POSITIVE
        })
        .build()
        .unwrap();
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    advance(60 * S - ms(1)).await;
    assert_eq!(cached(&mut svc, 1), 1);
    run_tasks().await;
    assert_eq!((draws.get(), up.calls.get()), (0, 1));

    for (beta, u, refreshes) in [
        (1e12, 0.5, true),
        (f64::MAX, 0.5, true),
        (f64::MAX, 1.0, false),
    ] {
        let up = Up::new(|n| Step::Ok(if n == 1 { 2_000 } else { 0 }));
        let layer = base().beta(beta).random(move || u).build().unwrap();
        let mut svc = layer.layer(up.service());
        get(&mut svc, 1).await.unwrap();
        assert_eq!(cached(&mut svc, 1), 1, "60 s before expiry");
        run_tasks().await;
        assert_eq!(
            up.calls.get(),
            1 + u64::from(refreshes),
            "beta {beta}, u {u}"
        );
    }
}

/// The default `max_staleness` of zero: a failed fetch after expiry is an error carrying
/// the upstream error (not one of ours), and no stale value is ever served.
#[tokio::test(start_paused = true)]
async fn zero_staleness_never_serves_stale() {
    let up = Up::new(|n| if n == 1 { Step::Ok(0) } else { Step::Fail(0) });
    let layer = base().build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    advance(60 * S).await;
    let e = get(&mut svc, 1).await.unwrap_err();
    assert!(error::find(&*e).is_none(), "the upstream's error, not ours");
    let src = std::error::Error::source(&*e).expect("a source");
    assert_eq!(src.to_string(), "down");
    assert_eq!(counters(&h), [0, 2, 0, 0, 1]);
}

/// `max_entries(1)`: every new key evicts the previous one; the gauge stays at 1.
#[tokio::test(start_paused = true)]
async fn one_entry_capacity_keeps_only_the_last_key() {
    let rec = TestRecorder::default();
    let up = Up::new(|_| Step::Ok(0));
    let layer = rec.install_while(|| base().max_entries(1).build().unwrap());
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    for k in 1..=100 {
        assert_eq!(get(&mut svc, k).await.unwrap(), k);
        assert_eq!(cached(&mut svc, k), k);
    }
    assert_eq!(get(&mut svc, 1).await.unwrap(), 101, "evicted long ago");
    assert_eq!(h.snapshot().gauge("entries"), Some(1.0));
    assert_eq!(
        rec.gauge("breakwater_cache_entries", &[("name", "r")]),
        Some(1.0)
    );
}

/// `max_entries(3)` with three keys: the store is cut into two shards of
/// `3 / 2 = 1` entry, so it holds at most two entries, and two keys that hash to the same
/// shard evict each other while the cache is far from full.
#[tokio::test(start_paused = true)]
async fn max_entries_three_holds_three_keys() {
    let up = Up::new(|_| Step::Ok(0));
    let layer = base().max_entries(3).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    for k in 1..=3 {
        get(&mut svc, k).await.unwrap();
    }
    for k in 1..=3 {
        let _ = get(&mut svc, k).await.unwrap();
    }
    assert_eq!(
        (h.snapshot().gauge("entries"), up.calls.get()),
        (Some(3.0), 3),
        "three keys fit in three entries"
    );
}

/// Many keys through a small cache: memory stays bounded and the entries gauge is exact
/// (10,000 keys fill every shard of a 64-entry store).
#[tokio::test(start_paused = true)]
async fn ten_thousand_keys_keep_the_gauge_exact_at_capacity() {
    let rec = TestRecorder::default();
    let up = Up::new(|_| Step::Ok(0));
    let layer = rec.install_while(|| base().max_entries(64).build().unwrap());
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    for k in 1..=10_000 {
        get(&mut svc, k).await.unwrap();
    }
    assert_eq!(h.snapshot().gauge("entries"), Some(64.0));
    assert_eq!(
        rec.gauge("breakwater_cache_entries", &[("name", "r")]),
        Some(64.0)
    );
    assert_eq!(cached(&mut svc, 10_000), 10_000, "the last key is held");
}

// ---------------------------------------------------------------------------------------
// Metrics and delta.
// ---------------------------------------------------------------------------------------

/// A scripted sequence, every metric exact in the recorder and the snapshot: a miss (2 s),
/// a hit, an early refresh (0.5 s), a hit on the new value, a failed fetch at expiry served
/// stale, a stale read while backing off, then, the back-off over, a stale read that starts
/// the retry (0 s) in the background, and a hit on its value.
#[tokio::test(start_paused = true)]
async fn scripted_sequence_metrics_are_exact() {
    let rec = TestRecorder::default();
    let dial = Dial::new(1.0);
    let up = Up::new(|n| match n {
        1 => Step::Ok(2_000),
        2 => Step::Ok(500),
        3 => Step::Fail(0),
        _ => Step::Ok(0),
    });
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = events.clone();
    let layer = rec.install_while(|| {
        base()
            .on_event(move |e| log.lock().unwrap().push(e.kind()))
            .max_staleness(30 * S)
            .stale_retry_interval(5 * S)
            .recompute_histogram(true)
            .random(dial.source())
            .build()
            .unwrap()
    });
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    let t0 = Instant::now();
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1); // miss; expiry t0 + 62 s, delta 2 s
    assert_eq!(cached(&mut svc, 1), 1); // hit
    dial.set(u_e());
    at(t0 + 61 * S).await;
    assert_eq!(cached(&mut svc, 1), 1); // hit + early refresh
    run_tasks().await;
    at(t0 + ms(61_500)).await; // refresh stored: expiry t0 + 121.5 s, delta 0.5 s
    run_tasks().await;
    dial.set(1.0);
    assert_eq!(cached(&mut svc, 1), 2); // hit
    at(t0 + ms(121_500)).await;
    assert_eq!(get(&mut svc, 1).await.unwrap(), 2); // failed fetch: stale
    advance(S).await;
    assert_eq!(cached(&mut svc, 1), 2); // stale while backing off
    advance(4 * S).await;
    assert_eq!(cached(&mut svc, 1), 2); // back-off over: stale, the retry in the background
    run_tasks().await;
    assert_eq!(cached(&mut svc, 1), 4); // hit
    assert_eq!(up.calls.get(), 4);
    assert_eq!(counters(&h), [4, 1, 3, 1, 1]);
    let snap = h.snapshot();
    assert_eq!(
        (snap.counter("fetches"), snap.counter("passed_through")),
        (Some(4), Some(0))
    );
    let l = |r| {
        rec.counter(
            "breakwater_cache_lookups_total",
            &[("name", "r"), ("result", r)],
        )
    };
    assert_eq!(
        (l("hit"), l("miss"), l("stale")),
        (Some(4), Some(1), Some(3))
    );
    assert_eq!(
        rec.counter("breakwater_cache_fetches_total", &[("name", "r")]),
        Some(4)
    );
    assert_eq!(
        rec.counter("breakwater_cache_early_refreshes_total", &[("name", "r")]),
        Some(1)
    );
    assert_eq!(
        rec.counter("breakwater_cache_refresh_errors_total", &[("name", "r")]),
        Some(1)
    );
    assert_eq!(
        rec.gauge("breakwater_cache_entries", &[("name", "r")]),
        Some(1.0)
    );
    assert_eq!(
        rec.histogram(
            "breakwater_cache_recompute_duration_seconds",
            &[("name", "r")]
        ),
        Some(vec![2.0, 0.5, 0.0])
    );
    assert_eq!(
        *events.lock().unwrap(),
        [
            EventKind::EarlyRefresh,
            EventKind::RefreshFailed,
            EventKind::StaleServed,
            EventKind::StaleServed,
            EventKind::StaleServed,
        ]
    );
}

/// Every layer turns its duration histogram on with the shared `record_durations(true)`
/// (which presets set); so does the cache, for its recompute histogram
/// (`recompute_histogram` is an alias).
#[tokio::test(start_paused = true)]
async fn record_durations_turns_the_recompute_histogram_on() {
    let rec = TestRecorder::default();
    let up = Up::new(|_| Step::Ok(2_000));
    let layer = rec.install_while(|| base().record_durations(true).build().unwrap());
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    assert_eq!(
        rec.histogram(
            "breakwater_cache_recompute_duration_seconds",
            &[("name", "r")]
        ),
        Some(vec![2.0])
    );
}

/// An inner service that is not ready until an instant (a queue, a rate limiter, a
/// connection pool), then answers through the wrapped service.
struct ReadyAt<S> {
    inner: S,
    at: Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: Clone> Clone for ReadyAt<S> {
    fn clone(&self) -> Self {
        ReadyAt {
            inner: self.inner.clone(),
            at: self.at,
            timer: None,
        }
    }
}

impl<S: Service<u64>> Service<u64> for ReadyAt<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if Instant::now() < self.at {
            let at = self.at;
            let timer = self.timer.get_or_insert_with(|| Box::pin(sleep_until(at)));
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: u64) -> S::Future {
        self.inner.call(req)
    }
}

/// XFetch's delta is the time to recompute the value. Time spent waiting for the inner
/// service's readiness (a full pool, a rate limiter queue) must not count in it, or a
/// congested dependency would get a longer delta, hence earlier and more frequent
/// refreshes: more load exactly when it is overloaded. Here: 10 s waiting for readiness,
/// 2 s computing: delta 2 s.
#[tokio::test(start_paused = true)]
async fn delta_excludes_the_wait_for_inner_readiness() {
    let rec = TestRecorder::default();
    let up = Up::new(|_| Step::Ok(2_000));
    let layer = rec.install_while(|| base().recompute_histogram(true).build().unwrap());
    let inner = ReadyAt {
        inner: up.service(),
        at: Instant::now() + 10 * S,
        timer: None,
    };
    let mut svc = layer.layer(inner);
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    assert_eq!(
        rec.histogram(
            "breakwater_cache_recompute_duration_seconds",
            &[("name", "r")]
        ),
        Some(vec![2.0])
    );
}

/// An early refresh still running at expiry: readers after expiry join it (no second
/// upstream call), get its value, and the entry gets the refresh's own delta (4 s, window
/// 4 s with `u = e^-1`).
#[tokio::test(start_paused = true)]
async fn a_refresh_running_at_expiry_serves_the_post_expiry_readers() {
    let rec = TestRecorder::default();
    let up = Up::new(|n| {
        Step::Ok(match n {
            1 => 2_000,
            2 => 4_000,
            _ => 0,
        })
    });
    let layer = rec.install_while(|| {
        base()
            .recompute_histogram(true)
            .random(u_e)
            .build()
            .unwrap()
    });
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    let t0 = Instant::now() - 2 * S; // expiry t0 + 62 s
    at(t0 + ms(60_500)).await;
    assert_eq!(cached(&mut svc, 1), 1); // refresh until t0 + 64.5 s
    run_tasks().await;
    at(t0 + ms(62_500)).await;
    let readers: Vec<_> = (0..5).map(|_| spawn_get(&svc, 1)).collect();
    run_tasks().await;
    assert_eq!(up.calls.get(), 2, "the readers joined the refresh");
    at(t0 + ms(64_500)).await;
    for r in readers {
        assert_eq!(r.await.unwrap().unwrap(), 2);
    }
    assert_eq!(
        rec.histogram(
            "breakwater_cache_recompute_duration_seconds",
            &[("name", "r")]
        ),
        Some(vec![2.0, 4.0])
    );
    // New expiry t0 + 124.5 s, window 4 s.
    at(t0 + ms(120_400)).await;
    assert_eq!(cached(&mut svc, 1), 2);
    run_tasks().await;
    assert_eq!(up.calls.get(), 2);
    at(t0 + ms(120_600)).await;
    assert_eq!(cached(&mut svc, 1), 2);
    run_tasks().await;
    assert_eq!(up.calls.get(), 3);
    assert_eq!(counters(&h), [3, 6, 0, 2, 0]);
}

// ---------------------------------------------------------------------------------------
// Back-off, pass-through, shared state, runtimes.
// ---------------------------------------------------------------------------------------

/// Without a value to serve (here the default `max_staleness` of zero), the back-off of
/// `stale_retry_interval` does not apply (module docs): during an outage every read of the
/// expired key goes upstream (coalesced), unless a negative TTL is set, which is then the
/// back-off: the failure is remembered and reads get it at once, with no upstream call,
/// until it is forgotten.
#[tokio::test(start_paused = true)]
async fn the_back_off_holds_without_a_stale_value_too() {
    for negative_ttl in [None, Some(5 * S)] {
        let up = Up::new(|n| if n == 1 { Step::Ok(0) } else { Step::Fail(0) });
        let b = base().stale_retry_interval(5 * S);
        let layer = match negative_ttl {
            Some(ttl) => b.negative_ttl(ttl).build().unwrap(),
            None => b.build().unwrap(),
        };
        let h = layer.handle();
        let mut svc = layer.layer(up.service());
        get(&mut svc, 1).await.unwrap();
        advance(60 * S).await;
        let t = Instant::now();
        for _ in 0..5 {
            assert!(get(&mut svc, 1).await.is_err());
            advance(ms(900)).await;
        }
        at(t + 5 * S).await;
        assert!(get(&mut svc, 1).await.is_err());
        let negative = h.snapshot().counter("negative");
        match negative_ttl {
            None => assert_eq!((up.calls.get(), negative), (7, Some(0)), "every read"),
            Some(_) => assert_eq!(
                (up.calls.get(), negative),
                (3, Some(4)),
                "one try, then the next once the failure is forgotten"
            ),
        }
    }
}

/// During an outage, with an upstream that fails slowly (10 s, a connect timeout) and a
/// stale value within the maximum staleness stored: the retry after the back-off runs in
/// the background (stale-while-revalidate, as for early refreshes), and the reader that
/// triggered it and every reader during it are answered with the stale value at once.
#[tokio::test(start_paused = true)]
async fn readers_during_an_outage_retry_get_the_stale_value_at_once() {
    let up = Up::new(|n| {
        if n == 1 {
            Step::Ok(0)
        } else {
            Step::Fail(10_000)
        }
    });
    let layer = base()
        .max_staleness(120 * S)
        .stale_retry_interval(5 * S)
        .build()
        .unwrap();
    let mut svc = layer.layer(up.service());
    get(&mut svc, 1).await.unwrap();
    let t0 = Instant::now(); // expiry t0 + 60 s
    at(t0 + 60 * S).await;
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1); // fails at t0 + 70 s: stale
    at(t0 + 74 * S).await;
    assert_eq!(cached(&mut svc, 1), 1, "backing off: stale at once");
    at(t0 + 75 * S).await;
    let retry = spawn_get(&svc, 1); // the retry, until t0 + 85 s
    run_tasks().await;
    assert_eq!(up.calls.get(), 3);
    advance(S).await;
    let during = svc.call(1).now_or_never();
    assert_eq!(during.and_then(Result::ok), Some(1), "answered at once");
    advance(10 * S).await;
    assert_eq!(retry.await.unwrap().unwrap(), 1);
}

/// Key `None`: every request goes upstream, uncoalesced and uncounted; nothing is stored.
#[tokio::test(start_paused = true)]
async fn key_none_passes_through_uncoalesced_and_uncounted() {
    let up = Up::new(|_| Step::Ok(1_000));
    let layer = base().build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    let (a, b) = (spawn_get(&svc, 0), spawn_get(&svc, 0));
    run_tasks().await;
    assert_eq!(up.calls.get(), 2, "not coalesced");
    advance(S).await;
    let mut got = [a.await.unwrap().unwrap(), b.await.unwrap().unwrap()];
    got.sort_unstable();
    assert_eq!(got, [1, 2]);
    assert_eq!(get(&mut svc, 0).await.unwrap(), 3, "not cached");
    assert_eq!(counters(&h), [0; 5]);
    assert_eq!(h.snapshot().gauge("entries"), Some(0.0));
}

/// One layer applied to two different inner services: one store, one in-flight table and
/// one set of counts (a request made through one service is coalesced with, then served
/// to, the other).
#[tokio::test(start_paused = true)]
async fn a_layer_applied_to_two_services_shares_store_fetches_and_counts() {
    let up = Up::new(|_| Step::Ok(1_000));
    let other_calls = Count::default();
    let oc = other_calls.clone();
    let other = service_fn(move |k: u64| {
        oc.incr();
        async move { Ok::<_, io::Error>(1_000 + k) }
    });
    let layer = base().build().unwrap();
    let mut a = layer.layer(up.service());
    let mut b = layer.clone().layer(other);
    let ra = spawn_get(&a, 1);
    run_tasks().await;
    let rb = spawn_get(&b, 1);
    run_tasks().await;
    advance(S).await;
    assert_eq!(ra.await.unwrap().unwrap(), 1);
    assert_eq!(rb.await.unwrap().unwrap(), 1, "coalesced with a's fetch");
    assert_eq!(cached(&mut b, 1), 1);
    assert_eq!(cached(&mut a, 1), 1);
    assert_eq!((up.calls.get(), other_calls.get()), (1, 0));
    assert_eq!(counters(&layer.clone().handle()), [2, 2, 0, 0, 0]);
}

/// Four worker threads, eight tasks of 500 reads over four keys with a 200 µs TTL on the
/// real clock, so that reads keep crossing expiry (fetches, early refreshes, hits
/// interleaved). Counts only: every read succeeds, every lookup is counted once, each
/// upstream call is a miss's fetch or an early refresh, every inner future is dropped, and
/// the gauge holds the four keys.
#[test]
fn many_threads_across_expiry_keep_the_counts_consistent() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_time()
        .build()
        .unwrap();
    let up = Up::new(|_| Step::Ok(0));
    let layer = base()
        .ttl(Duration::from_micros(200))
        .seed(7)
        .build()
        .unwrap();
    let h = layer.handle();
    let svc = layer.layer(up.service());
    rt.block_on(async {
        let tasks: Vec<_> = (0..8u64)
            .map(|t| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    for i in 0..500u64 {
                        let v = get(&mut svc, (t + i) % 4 + 1).await.unwrap();
                        assert!(v >= 1);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    drop(rt); // ends any detached refresh still running
    let [hits, misses, stale, early, errors] = counters(&h);
    assert_eq!(hits + misses + stale, 4_000);
    assert_eq!((stale, errors), (0, 0));
    assert!(up.calls.get() <= misses + early);
    assert_eq!(up.drops.get(), up.calls.get());
    assert_eq!(h.snapshot().gauge("entries"), Some(4.0));
}

/// A background early refresh needs a tokio runtime to be spawned on: on a hit in the
/// window outside one (a `futures` executor, a sync caller), `call` must not panic; the
/// refresh is skipped and its flag cleared, so the entry still refreshes early from a read
/// inside a runtime.
#[test]
fn an_early_refresh_outside_a_tokio_runtime_does_not_panic() {
    let up = Up::new(|n| Step::Ok(if n == 1 { 1_000 } else { 0 }));
    // -ln(MIN_POSITIVE) = 708: every read within 708 s of expiry refreshes.
    let layer = base().random(|| f64::MIN_POSITIVE).build().unwrap();
    let mut svc = layer.layer(up.service());
    paused_runtime().block_on(async { get(&mut svc, 1).await.unwrap() }); // delta 1 s
    // No runtime here: tokio's clock is the system clock, ~60 s before expiry.
    let hit = catch_unwind(AssertUnwindSafe(|| svc.call(1).now_or_never()));
    assert!(hit.is_ok(), "call panicked outside a runtime");
    paused_runtime().block_on(async {
        assert_eq!(cached(&mut svc, 1), 1);
        run_tasks().await;
    });
    assert_eq!(up.calls.get(), 2, "the entry still refreshes early");
}

/// A paused current-thread runtime (its clock starts at the system clock's now).
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// An early refresh cancelled before it ends (its task dropped with the runtime that ran
/// it: a per-request `block_on` runtime, a shutdown) leaves no refresh flag behind: the
/// entry refreshes early again. Each runtime's paused clock starts at the system clock, so
/// the reads here come at instants before the entry was stored (the first runtime's clock
/// ran 1 s ahead during the fill): the XFetch window must not be cut at the store instant.
#[test]
fn a_cancelled_early_refresh_leaves_no_flag_behind() {
    let up = Up::new(|n| Step::Ok(if n == 1 { 1_000 } else { 10_000 }));
    let layer = base().random(|| f64::MIN_POSITIVE).build().unwrap();
    let mut svc = layer.layer(up.service());
    paused_runtime().block_on(async { get(&mut svc, 1).await.unwrap() }); // delta 1 s
    // Each runtime's clock starts ~60 s before expiry: within the 708 s window.
    paused_runtime().block_on(async {
        assert_eq!(cached(&mut svc, 1), 1);
        run_tasks().await;
    }); // the refresh (10 s) is dropped with its runtime
    assert_eq!((up.calls.get(), up.drops.get()), (2, 2));
    paused_runtime().block_on(async {
        assert_eq!(cached(&mut svc, 1), 1);
        run_tasks().await;
    });
    assert_eq!(up.calls.get(), 3, "the entry refreshes early again");
}

/// Where a probe is armed.
type ProbeSlot = Arc<std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// A value whose clone runs the armed probe, if any (once).
struct Probed {
    n: u64,
    probe: ProbeSlot,
}

impl Clone for Probed {
    fn clone(&self) -> Self {
        let probe = self.probe.lock().unwrap().take();
        if let Some(probe) = probe {
            probe();
        }
        Probed {
            n: self.n,
            probe: self.probe.clone(),
        }
    }
}

/// One read on its own paused runtime.
fn read_blocking<S>(svc: &S, k: u64) -> S::Response
where
    S: Service<u64, Error = BoxError> + Clone,
{
    let mut svc = svc.clone();
    paused_runtime().block_on(async move { svc.ready().await.unwrap().call(k).await.unwrap() })
}

/// The hit path clones the value (user code: an `http::Response` clones its header map)
/// while holding the shard's read lock (and a store clones it under the write lock): a
/// store into that shard waits for the clone to end, and with `parking_lot`'s fair lock,
/// so does every later read of the shard. Probe: during a hit's clone, another thread
/// stores a key into the same (single) shard; it should complete while the clone runs.
/// The 60 s bound (real time) only ends the wait when the store is blocked.
#[test]
fn a_store_completes_while_a_hit_clones_its_value() {
    let probe = Arc::new(std::sync::Mutex::new(None));
    let p = probe.clone();
    let calls = Count::default();
    let c = calls.clone();
    let inner = service_fn(move |k: u64| {
        c.incr();
        let v = Probed {
            n: k,
            probe: p.clone(),
        };
        async move { Ok::<_, io::Error>(v) }
    });
    let layer = CacheLayer::builder()
        .key(key_of as KeyFn)
        .ttl(60 * S)
        .max_entries(1) // one shard
        .build()
        .unwrap();
    let svc = layer.layer(inner);
    assert_eq!(read_blocking(&svc, 1).n, 1);
    let writer_svc = svc.clone();
    let stored_during_clone = Arc::new(AtomicBool::new(false));
    let flag = stored_during_clone.clone();
    let writer = Arc::new(std::sync::Mutex::new(None));
    let w = writer.clone();
    *probe.lock().unwrap() = Some(Box::new(move || {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            assert_eq!(read_blocking(&writer_svc, 2).n, 2);
            let _ = tx.send(()); // fails once the probe stopped waiting
        });
        flag.store(rx.recv_timeout(60 * S).is_ok(), Ordering::SeqCst);
        *w.lock().unwrap() = Some(t);
    }) as Box<dyn FnOnce() + Send>);
    assert_eq!(read_blocking(&svc, 1).n, 1); // the hit: its clone runs the probe
    let t = writer.lock().unwrap().take().expect("the probe ran");
    t.join().unwrap();
    assert_eq!(calls.get(), 2);
    assert!(
        stored_during_clone.load(Ordering::SeqCst),
        "the store waited for the clone"
    );
}

/// A recorder whose gauges run an armed probe on `increment` (the store's entries gauge is
/// incremented right after a new key is stored, before its fetch leaves the in-flight
/// table); counters and histograms are no-ops.
#[derive(Clone, Default)]
struct ProbeRecorder {
    probe: ProbeSlot,
}

struct ProbeGauge(ProbeSlot);

impl metrics::GaugeFn for ProbeGauge {
    fn increment(&self, _: f64) {
        let probe = self.0.lock().unwrap().take();
        if let Some(probe) = probe {
            probe();
        }
    }
    fn decrement(&self, _: f64) {}
    fn set(&self, _: f64) {}
}

impl metrics::Recorder for ProbeRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(Arc::new(ProbeGauge(self.probe.clone())))
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// A fetch stores its value, then leaves the in-flight table. A read on another thread in
/// between sees the fresh entry, sets its refresh flag and spawns a refresh that joins the
/// finishing fetch as a follower: it gets that fetch's value, but the store is never told
/// (only the call that ran `fill` stores and clears the flag), so the new entry's flag
/// stays set and it never refreshes early. Made deterministic with a probe run between the
/// two steps (from the entries gauge's `increment`), and a second runtime on another thread.
#[test]
fn a_refresh_that_joins_a_finishing_fetch_leaves_no_flag_behind() {
    let rec = ProbeRecorder::default();
    let up = Up::new(|_| Step::Ok(1_000));
    let layer = metrics::with_local_recorder(&rec, || {
        base().random(|| f64::MIN_POSITIVE).build().unwrap()
    });
    let mut svc = layer.layer(up.service());
    let prober = svc.clone();
    let other = Arc::new(std::sync::Mutex::new(None));
    let o = other.clone();
    *rec.probe.lock().unwrap() = Some(Box::new(move || {
        let (joined_tx, joined_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let mut s = prober;
            let rt = paused_runtime();
            rt.block_on(async {
                assert_eq!(cached(&mut s, 1), 1, "the value just stored");
                run_tasks().await; // the refresh joins the fetch still in the table
            });
            joined_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            rt.block_on(run_tasks()); // the refresh gets the fetch's value and ends
        });
        joined_rx.recv().unwrap();
        *o.lock().unwrap() = Some((t, go_tx));
    }) as Box<dyn FnOnce() + Send>);
    let rt = paused_runtime();
    rt.block_on(async { assert_eq!(get(&mut svc, 1).await.unwrap(), 1) }); // delta 1 s
    let (t, go) = other.lock().unwrap().take().expect("the probe ran");
    go.send(()).unwrap();
    t.join().unwrap();
    assert_eq!(up.calls.get(), 1, "the refresh shared the fetch");
    rt.block_on(async {
        assert_eq!(cached(&mut svc, 1), 1); // ~60 s before expiry, in the 708 s window
        run_tasks().await;
    });
    assert_eq!(up.calls.get(), 2, "the entry refreshes early");
}

// ---------------------------------------------------------------------------------------
// HTTP: the cache keyed by `HttpKey`, TTL from `is_storable` and `max_age`, classified by
// `HttpClassifier`.
// ---------------------------------------------------------------------------------------

#[cfg(feature = "http")]
mod http_rules {
    use super::*;
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use tower::util::BoxCloneService;
    use tower_breakwater::http::{HttpClassifier, HttpKey, is_storable, max_age, stale_allowance};

    type Res = Response<Bytes>;
    type HttpSvc = BoxCloneService<Request<()>, Res, BoxError>;

    fn res(status: u16, headers: &[(&str, &str)], body: &'static str) -> Res {
        let mut b = Response::builder().status(status);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(Bytes::from_static(body.as_bytes())).unwrap()
    }

    /// An upstream answering each request with `respond(call number, request)`.
    fn upstream(
        calls: &Count,
        respond: impl Fn(u64, &Request<()>) -> Res + Clone + Send + Sync + 'static,
    ) -> impl Service<Request<()>, Response = Res, Error = io::Error, Future: Send>
    + Clone
    + Send
    + 'static {
        let calls = calls.clone();
        service_fn(move |req: Request<()>| {
            calls.incr();
            let out = respond(calls.get(), &req);
            async move { Ok(out) }
        })
    }

    /// The wiring the docs suggest: `HttpKey` keys, a TTL of `max_age` for storable
    /// responses, `HttpClassifier`, each entry's staleness from `stale_allowance`; at most
    /// 30 s of staleness, a 5 s back-off, no early refresh.
    fn http_cache<S>(inner: S) -> (HttpSvc, CacheHandle)
    where
        S: Service<Request<()>, Response = Res, Error = io::Error> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        let keys = HttpKey::new();
        let rules = keys.clone();
        let layer = CacheLayer::builder()
            .name("h")
            .key(move |req: &Request<()>| keys.key(req))
            .ttl_fn(move |res: &Res| is_storable(res, &rules).then(|| max_age(res)).flatten())
            .classifier(HttpClassifier::new())
            .staleness_fn(stale_allowance::<Bytes>)
            .max_staleness(30 * S)
            .stale_retry_interval(5 * S)
            .random(|| 1.0)
            .build()
            .unwrap();
        let h = layer.handle();
        (BoxCloneService::new(layer.layer(inner)), h)
    }

    async fn fetch(svc: &mut HttpSvc, uri: &str, headers: &[(&str, &str)]) -> Res {
        let mut b = Request::get(format!("https://api.example{uri}"));
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        svc.ready()
            .await
            .unwrap()
            .call(b.body(()).unwrap())
            .await
            .unwrap()
    }

    /// `Set-Cookie`, `no-store`, `private`, a `Vary` on a header outside the key, a response
    /// without `max-age` and a 503 are never stored (two reads, two upstream calls); a `Vary`
    /// on key headers (any case) and a plain `max-age` are (one call). The 503 reaches the
    /// caller as a response.
    #[tokio::test(start_paused = true)]
    async fn storability_rules_decide_what_is_cached() {
        let calls = Count::default();
        let inner = upstream(&calls, |_, req| {
            let cc = ("cache-control", "max-age=60");
            match req.uri().path() {
                "/cookie" => res(200, &[cc, ("set-cookie", "sid=1")], "c"),
                "/no-store" => res(200, &[("cache-control", "no-store, max-age=60")], "n"),
                "/private" => res(200, &[("cache-control", "max-age=60, Private")], "p"),
                "/vary-lang" => res(200, &[cc, ("vary", "Accept-Language")], "l"),
                "/vary-key" => res(200, &[cc, ("vary", "ACCEPT, authorization")], "k"),
                "/no-max-age" => res(200, &[], "m"),
                "/503" => res(503, &[cc], "down"),
                _ => res(200, &[cc], "ok"),
            }
        });
        let (mut svc, h) = http_cache(inner);
        let accept = [("accept", "application/json")];
        for (uri, stored) in [
            ("/cookie", false),
            ("/no-store", false),
            ("/private", false),
            ("/vary-lang", false),
            ("/vary-key", true),
            ("/no-max-age", false),
            ("/503", false),
            ("/ok", true),
        ] {
            let before = calls.get();
            let first = fetch(&mut svc, uri, &accept).await;
            let second = fetch(&mut svc, uri, &accept).await;
            assert_eq!(first.status(), second.status(), "{uri}");
            assert_eq!(calls.get() - before, if stored { 1 } else { 2 }, "{uri}");
        }
        assert_eq!(
            fetch(&mut svc, "/503", &accept).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(h.snapshot().gauge("entries"), Some(2.0));
    }

    /// An `Ok(503)` after expiry is a failure: not cached and not replacing the good value,
    /// which is served stale through the back-off, then replaced by the next 200.
    #[tokio::test(start_paused = true)]
    async fn a_503_neither_is_cached_nor_replaces_the_good_value() {
        let calls = Count::default();
        let inner = upstream(&calls, |n, _| match n {
            1 => res(200, &[("cache-control", "max-age=10")], "good"),
            2 => res(503, &[("cache-control", "max-age=60")], "down"),
            _ => res(200, &[("cache-control", "max-age=10")], "fresh"),
        });
        let (mut svc, h) = http_cache(inner);
        assert_eq!(fetch(&mut svc, "/x", &[]).await.body(), "good");
        advance(10 * S).await;
        fetch(&mut svc, "/x", &[]).await; // the 503: see the next test for what it answers
        advance(S).await;
        assert_eq!(fetch(&mut svc, "/x", &[]).await.body(), "good");
        assert_eq!(calls.get(), 2, "backing off");
        advance(4 * S).await;
        // The back-off is over: this read gets the stale value at once and starts the
        // retry in the background, whose 200 replaces it.
        assert_eq!(fetch(&mut svc, "/x", &[]).await.body(), "good");
        run_tasks().await;
        assert_eq!(fetch(&mut svc, "/x", &[]).await.body(), "fresh");
        assert_eq!(fetch(&mut svc, "/x", &[]).await.body(), "fresh");
        assert_eq!(calls.get(), 3);
        assert_eq!(counters(&h)[4], 1, "one refresh error");
    }

    /// Serve-stale-on-error covers "a response the classifier does not call a success"
    /// (module docs), but the response future falls back to the stale value only on an
    /// `Err`: the reader of a post-expiry fetch answered `Ok(503)` gets the 503, although a
    /// good value within the maximum staleness is stored (and is served to the next read).
    #[tokio::test(start_paused = true)]
    async fn a_503_after_expiry_is_answered_with_the_stale_value() {
        let calls = Count::default();
        let inner = upstream(&calls, |n, _| match n {
            1 => res(200, &[("cache-control", "max-age=10")], "good"),
            _ => res(503, &[], "down"),
        });
        let (mut svc, h) = http_cache(inner);
        fetch(&mut svc, "/x", &[]).await;
        advance(10 * S).await;
        let answer = fetch(&mut svc, "/x", &[]).await;
        assert_eq!(
            (answer.status(), answer.body().as_ref()),
            (StatusCode::OK, &b"good"[..])
        );
        assert_eq!(counters(&h)[2], 1, "counted as stale");
    }

    /// A server sending `max-age` = `u64::MAX` (RFC 9111, 1.2.2: a cache must treat an
    /// overflowing delta-seconds as 2^31 s) makes `now + ttl` overflow: the fetch panics,
    /// and the reader's task with it.
    #[tokio::test(start_paused = true)]
    async fn a_huge_max_age_is_capped_not_a_panic() {
        let calls = Count::default();
        let inner = upstream(&calls, |_, _| {
            res(
                200,
                &[("cache-control", "max-age=18446744073709551615")],
                "x",
            )
        });
        let (svc, _h) = http_cache(inner);
        let mut s = svc.clone();
        let first = tokio::spawn(async move { fetch(&mut s, "/big", &[]).await }).await;
        assert!(first.is_ok(), "the reader's task panicked");
        let mut s = svc.clone();
        fetch(&mut s, "/big", &[]).await;
        assert_eq!(calls.get(), 1, "cached");
    }

    /// RFC 9111, 1.2.2: a delta-seconds too large to represent must be taken as 2^31 s;
    /// `max_age` returns `None` (not cacheable) for it.
    #[test]
    fn max_age_beyond_u64_is_two_to_the_31_seconds() {
        let r = res(
            200,
            &[("cache-control", "max-age=99999999999999999999")],
            "",
        );
        assert_eq!(max_age(&r), Some(Duration::from_secs(1 << 31)));
    }

    /// `HttpKey` leaves out `Range` and the conditional headers, and `is_storable` accepts
    /// `206` and `304` (RFC 9111, 3: a cache must not store them unless it understands
    /// them, and this one does not): a partial or empty "not modified" answer to one client
    /// is then served to a plain GET.
    #[tokio::test(start_paused = true)]
    async fn partial_and_not_modified_responses_are_not_served_to_plain_gets() {
        let calls = Count::default();
        let inner = upstream(&calls, |_, req| {
            let cc = [("cache-control", "max-age=60")];
            if req.headers().contains_key("range") {
                res(206, &cc, "part")
            } else if req.headers().contains_key("if-none-match") {
                res(304, &cc, "")
            } else {
                res(200, &cc, "whole")
            }
        });
        let (mut svc, _h) = http_cache(inner);
        fetch(&mut svc, "/file", &[("range", "bytes=0-3")]).await;
        let plain = fetch(&mut svc, "/file", &[]).await;
        fetch(&mut svc, "/doc", &[("if-none-match", "\"v1\"")]).await;
        let plain2 = fetch(&mut svc, "/doc", &[]).await;
        assert_eq!(
            (plain.status().as_u16(), plain2.status().as_u16()),
            (200, 200)
        );
    }

    /// `Age: 50` with `max-age=60` leaves 10 s of freshness (RFC 9111, 4.2.3); wired as the
    /// docs suggest, the cache keeps it 60 s more.
    #[tokio::test(start_paused = true)]
    async fn the_age_header_shortens_the_ttl() {
        let calls = Count::default();
        let inner = upstream(&calls, |_, _| {
            res(200, &[("cache-control", "max-age=60"), ("age", "50")], "x")
        });
        let (mut svc, _h) = http_cache(inner);
        fetch(&mut svc, "/aged", &[]).await;
        advance(11 * S).await;
        fetch(&mut svc, "/aged", &[]).await;
        assert_eq!(calls.get(), 2, "stale after 10 s");
    }

    /// `must-revalidate` (RFC 9111, 5.2.2.2): once stale, a response must not be reused
    /// without validation, even when the origin fails: wired with `stale_allowance` as the
    /// staleness function, such an entry's maximum staleness is zero.
    #[tokio::test(start_paused = true)]
    async fn must_revalidate_responses_are_never_served_stale() {
        let calls = Count::default();
        let c = calls.clone();
        let inner = service_fn(move |_: Request<()>| {
            c.incr();
            let n = c.get();
            async move {
                match n {
                    1 => Ok(res(
                        200,
                        &[("cache-control", "max-age=10, must-revalidate")],
                        "v1",
                    )),
                    _ => Err(io::Error::other("connection refused")),
                }
            }
        });
        let (mut svc, _h) = http_cache(inner);
        fetch(&mut svc, "/strict", &[]).await;
        advance(11 * S).await;
        let req = Request::get("https://api.example/strict").body(()).unwrap();
        let after = svc.ready().await.unwrap().call(req).await;
        assert!(after.is_err(), "served a stale must-revalidate response");
        assert_eq!(calls.get(), 2);
    }
}
