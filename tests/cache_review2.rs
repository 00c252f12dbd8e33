//! Response cache, second adversarial review: background outage retries (hung, succeeding,
//! racing with the end of staleness, unstorable), the refresh flag against CLOCK eviction,
//! a panicking staleness function, the refresh timeout in inline mode, negative TTL with a
//! staleness function, lookup counters summing on every path, and a multi-thread run with
//! eviction and refreshes.
#![cfg(feature = "cache")]

mod support;

use support::reads::{cached, counts, get};

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use support::Count;
use tokio::time::{advance, sleep};
use tower::{Layer, Service, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::cache::{CacheBuilder, CacheHandle, CacheLayer, FixedTtl, RefreshMode};
use tower_breakwater::error::{self, ErrorKind};

const S: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Lets spawned tasks (detached refreshes and retries) run until they wait on something.
async fn run_tasks() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

/// What the upstream does on its `n`th call (from 1): `Some(ms)` answers `n` after `ms`
/// milliseconds, `None` fails at once; `u64::MAX` milliseconds never answers.
#[derive(Clone)]
struct Up {
    calls: Count,
    script: Arc<dyn Fn(u64) -> Option<u64> + Send + Sync>,
}

const OK: Option<u64> = Some(0);
const FAIL: Option<u64> = None;
const HANG: Option<u64> = Some(u64::MAX);

impl Up {
    fn new(script: impl Fn(u64) -> Option<u64> + Send + Sync + 'static) -> Self {
        Up {
            calls: Count::default(),
            script: Arc::new(script),
        }
    }

    fn service(
        &self,
    ) -> impl Service<u64, Response = u64, Error = io::Error, Future: Send> + Clone + Send + use<>
    {
        let up = self.clone();
        service_fn(move |_key: u64| {
            up.calls.incr();
            let n = up.calls.get();
            let step = (up.script)(n);
            async move {
                match step {
                    Some(u64::MAX) => std::future::pending().await,
                    Some(d) => {
                        if d > 0 {
                            sleep(ms(d)).await;
                        }
                        Ok(n)
                    }
                    None => Err(io::Error::other("down")),
                }
            }
        })
    }
}

fn entries(h: &CacheHandle) -> f64 {
    h.snapshot().gauge("entries").expect("the entries gauge")
}

/// Every lookup is counted exactly once: hits + misses + stale + negative == reads.
fn assert_lookups(h: &CacheHandle, reads: u64) {
    let [hit, miss, stale, neg, ..] = counts(h);
    assert_eq!(hit + miss + stale + neg, reads, "lookups of {reads} reads");
}

/// Key `k` for request `k`.
fn key(k: &u64) -> Option<u64> {
    Some(*k)
}

type KeyFn = fn(&u64) -> Option<u64>;

/// Name `name`, key `k` for request `k`, a 60 s TTL, no early refresh ([`never_early`]).
fn base(name: &str) -> CacheBuilder<u64, u64, KeyFn, FixedTtl> {
    CacheLayer::builder()
        .name(name)
        .key(key as KeyFn)
        .ttl(60 * S)
        .random(never_early)
}

/// `u = 1`: no read refreshes early unless a test sets its own source, so that no count
/// depends on a random draw.
fn never_early() -> f64 {
    1.0
}

/// [`base`] serving values up to `stale` past expiry, backing off `interval` in outage.
fn outage(
    name: &str,
    stale: Duration,
    interval: Duration,
) -> CacheBuilder<u64, u64, KeyFn, FixedTtl> {
    base(name)
        .max_staleness(stale)
        .stale_retry_interval(interval)
}

/// Call 1 answers, call 2 fails, call 3 hangs, later calls answer.
fn fail_then_hang(n: u64) -> Option<u64> {
    match n {
        1 => OK,
        2 => FAIL,
        3 => HANG,
        _ => OK,
    }
}

/// A retry that hangs until the refresh timeout: every read meanwhile is served stale at
/// once and starts nothing; the timeout is a refresh error and restarts the back-off from
/// the moment it fired; the next retry succeeds and the read after it is fresh.
#[tokio::test(start_paused = true)]
async fn hung_retry_serves_stale_until_its_timeout_then_backs_off_again() {
    let up = Up::new(fail_then_hang);
    let layer = outage("hung", 300 * S, 10 * S)
        .refresh_timeout(20 * S)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    advance(61 * S).await; // t = 61: the fetch fails, the value is served stale
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    assert_eq!(up.calls.get(), 2);
    advance(11 * S).await; // t = 72: back-off over, this read starts the retry (hangs)
    assert_eq!(cached(&mut svc, 1), 1);
    run_tasks().await;
    assert_eq!(up.calls.get(), 3);
    for step in [1, 8, 10] {
        advance(step * S).await; // t = 73, 81, 91: the retry still runs
        assert_eq!(cached(&mut svc, 1), 1);
        run_tasks().await;
    }
    assert_eq!(up.calls.get(), 3);
    assert_eq!(counts(&h)[5], 1, "only the failed fetch so far");
    advance(S).await; // t = 92: the retry times out
    run_tasks().await;
    assert_eq!(counts(&h)[5], 2, "the timed-out retry is a refresh error");
    advance(9 * S).await; // t = 101: back-off runs from 92 to 102
    assert_eq!(cached(&mut svc, 1), 1);
    run_tasks().await;
    assert_eq!(up.calls.get(), 3);
    advance(S).await; // t = 102: the next retry, answers 4
    assert_eq!(cached(&mut svc, 1), 1);
    run_tasks().await;
    assert_eq!(up.calls.get(), 4);
    assert_eq!(cached(&mut svc, 1), 4, "fresh after the retry succeeded");
    // A miss, the failed fetch served stale, six stale reads, one hit.
    assert_eq!(counts(&h)[..4], [1, 1, 7, 0]);
    assert_lookups(&h, 9);
    assert_eq!(counts(&h)[6], 4);
    assert_eq!(entries(&h), 1.0);
}

/// The value stops being servable while a retry is in flight: a read after that joins the
/// retry (no second upstream call) and, when the retry times out, gets a timeout error; the
/// next read fetches.
#[tokio::test(start_paused = true)]
async fn staleness_ends_during_a_retry_reads_join_it_without_a_second_call() {
    let up = Up::new(fail_then_hang);
    let layer = outage("race", 15 * S, S)
        .refresh_timeout(30 * S)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    advance(61 * S).await;
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1); // stale; back-off to 62
    advance(S).await; // t = 62: the retry starts and hangs until 92
    assert_eq!(cached(&mut svc, 1), 1);
    run_tasks().await;
    assert_eq!(up.calls.get(), 3);
    advance(14 * S).await; // t = 76: past 75, nothing servable
    let mut late = svc.clone();
    let reader = tokio::spawn(async move { get(&mut late, 1).await });
    run_tasks().await;
    assert!(!reader.is_finished());
    assert_eq!(up.calls.get(), 3, "joined the retry");
    advance(16 * S).await; // t = 92
    let err = reader.await.unwrap().unwrap_err();
    assert_eq!(
        error::find(&*err).map(|e| e.kind()),
        Some(ErrorKind::Timeout)
    );
    assert_eq!(get(&mut svc, 1).await.unwrap(), 4);
    assert_eq!(counts(&h)[..4], [0, 3, 2, 0]);
    assert_lookups(&h, 5);
}

/// A retry whose response is a success the TTL function does not store: the key is still
/// in outage (the stored value is served), so the upstream must still be tried at most once
/// per back-off interval.
#[tokio::test(start_paused = true)]
async fn unstorable_retry_success_keeps_the_back_off() {
    let up = Up::new(|n| if n == 2 { FAIL } else { OK });
    let layer = CacheLayer::builder()
        .name("unstorable")
        .key(key as KeyFn)
        .ttl_fn(|r: &u64| (*r == 1).then_some(60 * S))
        .max_staleness(100 * S)
        .stale_retry_interval(10 * S)
        .build()
        .unwrap();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    advance(61 * S).await;
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1); // fails; back-off to 71
    advance(11 * S).await; // t = 72: the retry answers 3, unstorable
    assert_eq!(cached(&mut svc, 1), 1);
    run_tasks().await;
    assert_eq!(up.calls.get(), 3);
    // Either the key still backs off (no call) or the outage is over (the read gets the
    // upstream's answer): never a stale answer for a read that made an upstream call.
    for _ in 0..5 {
        let before = up.calls.get();
        let v = get(&mut svc, 1).await.unwrap();
        run_tasks().await;
        assert!(
            !(v == 1 && up.calls.get() > before),
            "served stale while calling upstream (call {})",
            up.calls.get()
        );
    }
}

/// `u` tiny: `-ln(u)` is about 690, so any read within 690 deltas of expiry refreshes.
fn tiny_u() -> f64 {
    1e-300
}

/// Capacity 1: the entry whose early refresh is in flight is evicted by another key; the
/// refresh's value is still stored (evicting that key), its flag is clear (a later read in
/// the window refreshes again), and the entries gauge stays exact.
#[tokio::test(start_paused = true)]
async fn refresh_of_an_evicted_entry_stores_its_value_and_the_gauge_stays_exact() {
    // Calls take 10 ms (delta 10 ms: the window opens 6.9 s before expiry); key 2's
    // fetch, call 3, takes 5 ms.
    let up = Up::new(|n| Some(if n == 3 { 5 } else { 10 }));
    let layer = base("evict").max_entries(1).random(tiny_u).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1); // stored at 0.01, expires 60.01
    advance(55 * S).await;
    assert_eq!(cached(&mut svc, 1), 1); // starts the refresh (answers 2 at 55.02)
    run_tasks().await;
    assert_eq!(up.calls.get(), 2);
    assert_eq!(get(&mut svc, 2).await.unwrap(), 3); // stored at 55.015, evicts key 1
    assert_eq!(entries(&h), 1.0);
    assert_eq!(cached(&mut svc, 2), 3);
    advance(ms(5)).await; // 55.02: the refresh stores 2 for key 1, evicting key 2
    run_tasks().await;
    assert_eq!(entries(&h), 1.0);
    assert_eq!(cached(&mut svc, 1), 2);
    assert_eq!(get(&mut svc, 2).await.unwrap(), 4, "key 2 was evicted");
    assert_eq!(entries(&h), 1.0);
    assert_eq!(counts(&h), [3, 3, 0, 0, 1, 0, 4]);
    // Key 1 is fetched again; the re-inserted entry's flag is clear.
    assert_eq!(get(&mut svc, 1).await.unwrap(), 5);
    advance(55 * S).await;
    assert_eq!(cached(&mut svc, 1), 5);
    run_tasks().await;
    assert_eq!(
        up.calls.get(),
        6,
        "the re-inserted entry refreshes in its window"
    );
    assert_eq!(entries(&h), 1.0);
}

/// Key 1's early refresh hangs; meanwhile key 2 evicts key 1 and key 1 is fetched again
/// (joining the refresh in flight, not calling again): the refresh's answer is what the
/// re-inserted entry holds.
#[tokio::test(start_paused = true)]
async fn evicted_during_refresh_a_miss_joins_the_refresh() {
    let up = Up::new(|n| match n {
        1 => Some(10),
        2 => Some(3_000),
        _ => Some(10),
    });
    let layer = base("rejoin")
        .max_entries(1)
        .random(tiny_u)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    advance(55 * S).await;
    assert_eq!(cached(&mut svc, 1), 1); // refresh: call 2, answers 3 s later
    run_tasks().await;
    assert_eq!(get(&mut svc, 2).await.unwrap(), 3); // evicts key 1
    let mut again = svc.clone();
    let reader = tokio::spawn(async move { get(&mut again, 1).await });
    run_tasks().await;
    assert_eq!(up.calls.get(), 3, "the miss joined the refresh");
    advance(3 * S).await;
    assert_eq!(reader.await.unwrap().unwrap(), 2);
    assert_eq!(cached(&mut svc, 1), 2);
    assert_eq!(entries(&h), 1.0);
    // The re-inserted entry's flag is clear: its own window refreshes again.
    advance(54 * S).await;
    assert_eq!(cached(&mut svc, 1), 2);
    run_tasks().await;
    assert_eq!(up.calls.get(), 4);
    assert_eq!(counts(&h)[4], 2);
    assert_lookups(&h, 6);
}

/// A staleness function that panics on the refreshed response: the refresh is a panicked
/// refresh error, the old value is kept and served, the key backs off, and the next
/// refresh after the back-off stores its value.
#[tokio::test(start_paused = true)]
async fn staleness_fn_panic_on_refresh_keeps_the_value_and_backs_off() {
    let up = Up::new(|_| Some(10));
    let layer = base("stalepanic")
        .max_staleness(30 * S)
        .staleness_fn(|r: &u64| {
            assert_ne!(*r, 2, "staleness function panics on 2");
            None
        })
        .random(tiny_u)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    advance(55 * S).await; // t = 55.01
    assert_eq!(cached(&mut svc, 1), 1); // refresh, call 2 answers 2 at 55.02: panics
    run_tasks().await;
    advance(ms(10)).await;
    run_tasks().await;
    assert_eq!(counts(&h)[5], 1, "the panic is a refresh error");
    advance(ms(500)).await; // t = 55.52, back-off until 56.02
    assert_eq!(cached(&mut svc, 1), 1);
    run_tasks().await;
    assert_eq!(up.calls.get(), 2);
    advance(S).await; // t = 56.52
    assert_eq!(cached(&mut svc, 1), 1); // refresh, call 3
    run_tasks().await;
    advance(ms(10)).await;
    run_tasks().await;
    assert_eq!(up.calls.get(), 3);
    assert_eq!(cached(&mut svc, 1), 3);
    assert_eq!(counts(&h), [4, 1, 0, 0, 2, 1, 3]);
    assert_eq!(entries(&h), 1.0);
}

/// Inline mode, `u` tiny, a refresh timeout of `timeout`: key 1 stored at 0.01 (expires
/// 60.01), then at 55.01 a read on its own task starts an inline refresh that hangs (call 2).
/// Returns the upstream, the handle, the service and the waiting read.
async fn inline_hung(
    timeout: Duration,
) -> (
    Up,
    CacheHandle,
    impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send + 'static,
    tokio::task::JoinHandle<Result<u64, BoxError>>,
) {
    let up = Up::new(|n| if n == 2 { HANG } else { Some(10) });
    let layer = base("inline")
        .refresh_mode(RefreshMode::Inline)
        .refresh_timeout(timeout)
        .random(tiny_u)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    advance(55 * S).await;
    let mut waiting = svc.clone();
    let reader = tokio::spawn(async move { get(&mut waiting, 1).await });
    run_tasks().await;
    assert_eq!(up.calls.get(), 2);
    (up, h, svc, reader)
}

/// Inline mode with a refresh timeout: the triggering read waits exactly until the
/// timeout and then gets the value it found (still fresh); other reads get it at once.
#[tokio::test(start_paused = true)]
async fn inline_refresh_times_out_and_its_reader_gets_the_value_it_found() {
    let (up, h, mut svc, reader) = inline_hung(3 * S).await;
    assert_eq!(cached(&mut svc, 1), 1);
    advance(ms(2_999)).await;
    assert!(!reader.is_finished());
    advance(ms(1)).await;
    assert_eq!(reader.await.unwrap().unwrap(), 1);
    assert_eq!(up.calls.get(), 2);
    assert_eq!(counts(&h), [2, 1, 0, 0, 1, 1, 2]);
}

/// Inline mode: the refresh hangs past expiry, and the value found is no longer servable
/// (no staleness) when the timeout fires: the triggering read gets the timeout error.
#[tokio::test(start_paused = true)]
async fn inline_refresh_timing_out_after_expiry_gives_its_reader_the_error() {
    let (_up, h, _svc, reader) = inline_hung(10 * S).await;
    advance(10 * S).await;
    let err = reader.await.unwrap().unwrap_err();
    assert_eq!(
        error::find(&*err).map(|e| e.kind()),
        Some(ErrorKind::Timeout)
    );
    assert_eq!(counts(&h)[..4], [1, 1, 0, 0]);
}

/// Negative TTL with a staleness function that allows no staleness for this response:
/// the post-expiry fetch fails, nothing may be served, the failure is remembered for the
/// negative TTL (one negative lookup, no upstream call), then fetched again.
#[tokio::test(start_paused = true)]
async fn negative_ttl_after_a_value_the_staleness_fn_made_unservable() {
    let up = Up::new(|n| if n == 2 { FAIL } else { OK });
    let layer = base("neg")
        .max_staleness(100 * S)
        .staleness_fn(|_: &u64| Some(Duration::ZERO))
        .negative_ttl(5 * S)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    advance(60 * S).await; // exactly at expiry: stale_until == expiry
    assert!(get(&mut svc, 1).await.is_err());
    advance(S).await;
    assert!(svc.call(1).now_or_never().expect("at once").is_err());
    assert_eq!(up.calls.get(), 2);
    advance(4 * S).await; // 65: the remembered failure is over
    assert_eq!(get(&mut svc, 1).await.unwrap(), 3);
    assert_eq!(counts(&h), [0, 3, 0, 1, 0, 1, 3]);
    assert_eq!(entries(&h), 1.0);
}

/// A staleness allowance above `max_staleness` is cut to it: served until expiry plus
/// max_staleness, never after.
#[tokio::test(start_paused = true)]
async fn staleness_fn_allowance_is_capped_by_max_staleness() {
    let up = Up::new(|n| if n == 1 { OK } else { FAIL });
    let layer = base("cap")
        .max_staleness(10 * S)
        .staleness_fn(|_: &u64| Some(1_000 * S))
        .stale_retry_interval(100 * S)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    advance(60 * S).await;
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1); // fetch fails, stale
    advance(ms(9_999)).await;
    assert_eq!(cached(&mut svc, 1), 1); // backing off, still servable
    advance(ms(1)).await; // 70: not servable
    assert!(get(&mut svc, 1).await.is_err());
    assert_eq!(up.calls.get(), 3);
    assert_eq!(counts(&h)[..4], [0, 2, 2, 0]);
}

/// Capacity 1 under churn of three keys: every read is a miss, each makes one call, the
/// gauge stays at exactly 1 and the lookups sum.
#[tokio::test(start_paused = true)]
async fn capacity_one_under_churn() {
    let up = Up::new(|_| OK);
    let layer = base("churn").max_entries(1).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    for i in 0..30u64 {
        let k = i % 3 + 1;
        assert_eq!(get(&mut svc, k).await.unwrap(), i + 1);
        assert_eq!(cached(&mut svc, k), i + 1, "the key just stored is held");
        assert_eq!(entries(&h), 1.0);
    }
    assert_eq!(counts(&h), [30, 30, 0, 0, 0, 0, 30]);
}

/// Real runtime, four threads, capacity 4 over 16 keys, a 1 ms TTL, stale serving and
/// early refreshes on every read in the window: counts only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_thread_eviction_and_refreshes_counts_sum() {
    let up = Up::new(|n| if n % 7 == 0 { FAIL } else { OK });
    let layer = CacheLayer::builder()
        .name("mt")
        .key(key as KeyFn)
        .ttl(ms(1))
        .max_staleness(ms(1))
        .stale_retry_interval(ms(1))
        .max_entries(4)
        .random(tiny_u)
        .build()
        .unwrap();
    let h = layer.handle();
    let svc = layer.layer(up.service());
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                for i in 0..2_000u64 {
                    let _ = get(&mut svc, (t * 31 + i * 7) % 16 + 1).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Let detached refreshes and retries end.
    for _ in 0..200 {
        tokio::task::yield_now().await;
        if h.snapshot().counter("fetches") == Some(up.calls.get()) {
            break;
        }
    }
    assert_lookups(&h, 16_000);
    let e = entries(&h);
    assert!(e == 4.0, "entries {e}");
}

/// An early refresh hangs across expiry; the value may be served stale for 100 s more. A
/// read after expiry while the refresh runs has a value to serve instead, so it must get it
/// at once (the module docs: only a read "with no value to serve instead" joins the
/// refresh), not wait for the refresh timeout.
#[tokio::test(start_paused = true)]
async fn read_after_expiry_during_hung_early_refresh_gets_stale_at_once() {
    let up = Up::new(|n| if n == 2 { HANG } else { Some(10) });
    let layer = base("hungearly")
        .max_staleness(100 * S)
        .refresh_timeout(30 * S)
        .random(tiny_u)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1); // expires at 60.01
    advance(55 * S).await;
    assert_eq!(cached(&mut svc, 1), 1); // early refresh, hangs until 85.01
    run_tasks().await;
    assert_eq!(up.calls.get(), 2);
    advance(10 * S).await; // 65.01: expired, servable until 160.01
    let answer = svc.call(1).now_or_never();
    assert_eq!(up.calls.get(), 2);
    assert_eq!(
        answer.map(|r| r.unwrap()),
        Some(1),
        "stale value served at once"
    );
    assert_eq!(counts(&h)[..4], [1, 1, 1, 0]);
}

/// A long outage with reads every 500 ms: the upstream is tried once at expiry, then once
/// per back-off interval (each retry in the background, its back-off restarting when it
/// fails), and never after the value stops being servable without a read asking.
#[tokio::test(start_paused = true)]
async fn long_outage_tries_upstream_once_per_interval() {
    let up = Up::new(|n| if n == 1 { OK } else { FAIL });
    let layer = outage("outage", 100 * S, 10 * S).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    advance(60 * S).await;
    for _ in 0..200 {
        // 60.0, 60.5, ..., 159.5: every read is served the stale value.
        assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
        run_tasks().await;
        advance(ms(500)).await;
    }
    // The fetch at 60, retries at 70, 80, ..., 150.
    assert_eq!(up.calls.get(), 11);
    assert_eq!(counts(&h), [0, 1, 200, 0, 0, 10, 11]);
    // 160: nothing servable: the read fetches and gets the error.
    assert!(get(&mut svc, 1).await.is_err());
    assert_eq!(up.calls.get(), 12);
    assert_lookups(&h, 202);
    assert_eq!(entries(&h), 1.0);
}

/// Several shards (capacity 1,000): after 2,000 distinct keys exactly 1,000 are held, the
/// gauge says so, and reading every key finds exactly those (the others would fetch).
#[tokio::test(start_paused = true)]
async fn capacity_is_exact_across_shards() {
    let up = Up::new(|n| if n <= 2_000 { OK } else { HANG });
    let layer = base("shards").max_entries(1_000).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    for k in 1..=2_000u64 {
        assert_eq!(get(&mut svc, k).await.unwrap(), k);
    }
    assert_eq!(entries(&h), 1_000.0);
    let held = (1..=2_000u64)
        .filter(|&k| svc.call(k).now_or_never().is_some())
        .count();
    assert_eq!(held, 1_000);
    assert_eq!(counts(&h)[..2], [1_000, 3_000]);
    assert_eq!(entries(&h), 1_000.0);
}

/// The value stops being servable while a slow retry runs; the retry then succeeds: the
/// read that joined it gets its answer, and the key is fresh again.
#[tokio::test(start_paused = true)]
async fn slow_retry_outliving_staleness_answers_the_reads_that_joined_it() {
    let up = Up::new(|n| match n {
        1 => OK,
        2 => FAIL,
        _ => Some(20_000),
    });
    let layer = outage("slow", 15 * S, S).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(up.service());
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1);
    advance(61 * S).await;
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1); // fails: stale, back-off to 62
    advance(S).await; // 62: the retry starts, answers 3 at 82
    assert_eq!(cached(&mut svc, 1), 1);
    run_tasks().await;
    advance(14 * S).await; // 76: nothing servable
    let mut late = svc.clone();
    let reader = tokio::spawn(async move { get(&mut late, 1).await });
    run_tasks().await;
    assert_eq!(up.calls.get(), 3);
    advance(6 * S).await; // 82
    assert_eq!(reader.await.unwrap().unwrap(), 3);
    assert_eq!(cached(&mut svc, 1), 3);
    assert_eq!(up.calls.get(), 3);
    assert_eq!(counts(&h), [1, 2, 2, 0, 0, 1, 3]);
}
