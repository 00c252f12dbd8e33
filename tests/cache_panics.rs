//! Response cache: panics of user code the cache runs between setting one of an entry's
//! flags (an early refresh or a retry in flight) and handing that flag to the refresh, or
//! while it records a fetched value: the value's `Clone` (storing a fetched value, handing it
//! to a reader), the inner service's `Clone`, and event listeners. Each leaves no flag
//! behind (the next read refreshes exactly once), never hangs a reader, and is recorded like
//! any panic of a fetch. Panics of the key function, the random source, the TTL and
//! staleness functions and the classifier are covered in `cache_review.rs` and
//! `cache_review2.rs`.
#![cfg(feature = "cache")]

mod support;

use support::reads::{cached, get};
use support::tasks::{run_tasks, spawn_get};

use std::future::Future;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use support::Count;
use tokio::time::{advance, sleep};
use tower::{Layer, Service, ServiceExt};
use tower_breakwater::BoxError;
use tower_breakwater::cache::{CacheBuilder, CacheHandle, CacheLayer, FixedTtl, RefreshMode};
use tower_breakwater::classify::{Outcome, classify_fn};
use tower_breakwater::error::{self, ErrorKind};
use tower_breakwater::event::{Event, EventKind};

const S: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Lets a fetch started now (every upstream call takes 10 ms) finish and be recorded.
async fn settle() {
    run_tasks().await;
    advance(ms(10)).await;
    run_tasks().await;
}

/// Makes the `k`th `Clone` from now of whatever shares it panic, once.
#[derive(Clone, Default, Debug)]
struct Fuse(Arc<AtomicU64>);

impl Fuse {
    /// The `k`th clone from now panics (0: none does).
    fn arm(&self, k: u64) {
        self.0.store(k, Ordering::SeqCst);
    }

    /// Clones left before the armed one: 0 once it has panicked.
    fn left(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// One clone of `what`: panics when it is the armed one.
    fn tick(&self, what: &str) {
        let before = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
            .unwrap_or(0);
        assert_ne!(before, 1, "{what}'s Clone panics");
    }
}

/// The cached value: the number of the upstream call that produced it, and a `Clone` that
/// panics on command.
#[derive(Debug)]
struct V {
    n: u64,
    fuse: Fuse,
}

impl Clone for V {
    fn clone(&self) -> V {
        self.fuse.tick("the value");
        V {
            n: self.n,
            fuse: self.fuse.clone(),
        }
    }
}

/// The upstream: answers its `n`th call (from 1) with `V { n }` after 10 ms, or fails when
/// `fails(n)`; its own `Clone` panics on command (`own`), its values' on theirs (`values`).
struct Up {
    calls: Count,
    fails: Arc<dyn Fn(u64) -> bool + Send + Sync>,
    values: Fuse,
    own: Fuse,
}

impl Up {
    fn new(fails: impl Fn(u64) -> bool + Send + Sync + 'static) -> Self {
        Up {
            calls: Count::default(),
            fails: Arc::new(fails),
            values: Fuse::default(),
            own: Fuse::default(),
        }
    }
}

impl Clone for Up {
    fn clone(&self) -> Up {
        self.own.tick("the inner service");
        Up {
            calls: self.calls.clone(),
            fails: self.fails.clone(),
            values: self.values.clone(),
            own: self.own.clone(),
        }
    }
}

impl Service<u64> for Up {
    type Response = V;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<V, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _key: u64) -> Self::Future {
        self.calls.incr();
        let n = self.calls.get();
        let fails = (self.fails)(n);
        let fuse = self.values.clone();
        Box::pin(async move {
            sleep(ms(10)).await;
            match fails {
                true => Err(io::Error::other("down")),
                false => Ok(V { n, fuse }),
            }
        })
    }
}

/// The cache `layer` over `up`, its values read as their call numbers.
fn stack<L>(
    layer: &L,
    up: &Up,
) -> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send + use<L>
where
    L: Layer<Up>,
    L::Service: Service<u64, Response = V, Error = BoxError> + Clone + Send + 'static,
    <L::Service as Service<u64>>::Future: Send,
{
    layer.layer(up.clone()).map_response(|v: V| v.n)
}

/// The layer `builder` builds over `up`: its handle and its service.
fn build(
    builder: CacheBuilder<u64, u64, KeyFn, FixedTtl>,
    up: &Up,
) -> (
    CacheHandle,
    impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send + use<>,
) {
    let layer = builder.build().unwrap();
    (layer.handle(), stack(&layer, up))
}

type KeyFn = fn(&u64) -> Option<u64>;

fn key(k: &u64) -> Option<u64> {
    Some(*k)
}

/// `-ln(u)` = 690.8: with every delta here (10 ms), a read 6.9 s or less before expiry
/// refreshes early, every time the entry may refresh.
fn always_early() -> f64 {
    1e-300
}

/// `u = 1`: no read refreshes early.
fn never_early() -> f64 {
    1.0
}

/// The events of one layer, by kind.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<EventKind>>>);

impl Log {
    fn kinds(&self) -> Vec<EventKind> {
        self.0.lock().unwrap().clone()
    }
}

/// Name `name`, key `k` for request `k`, a 60 s TTL, `random` as the random source, events
/// into `log`.
fn base(name: &str, random: fn() -> f64, log: &Log) -> CacheBuilder<u64, u64, KeyFn, FixedTtl> {
    let log = log.clone();
    CacheLayer::builder()
        .name(name)
        .key(key as KeyFn)
        .ttl(60 * S)
        .random(random)
        .on_event(move |e| log.0.lock().unwrap().push(e.kind()))
}

/// A listener that panics on the first event of `kind` while `armed` is set (and clears it).
fn panics_on(
    kind: EventKind,
    armed: &Arc<AtomicBool>,
) -> impl Fn(&Event<'_>) + Send + Sync + use<> {
    let armed = armed.clone();
    move |e| {
        let fire = e.kind() == kind && armed.swap(false, Ordering::SeqCst);
        assert!(!fire, "the listener panics");
    }
}

/// hits, misses, stale, negative, early refreshes, refresh errors, fetches; entries.
fn counts(h: &CacheHandle) -> ([u64; 7], f64) {
    let entries = h.snapshot().gauge("entries").expect("the entries gauge");
    (support::reads::counts(h), entries)
}

/// The error kind a failed read reports.
fn kind_of(e: &BoxError) -> Option<ErrorKind> {
    error::find(&**e).map(|b| b.kind())
}

/// A read whose `call` must panic (user code run by `call`).
fn call_panics<Svc: Service<u64>>(svc: &mut Svc) -> bool {
    catch_unwind(AssertUnwindSafe(|| drop(svc.call(1)))).is_err()
}

use EventKind::{EarlyRefresh, Panicked, RefreshFailed, StaleServed};

/// Key 1 stored by call 1 at 0.01 (expiring at 60.01), then the clock at 55.01: 5 s left,
/// in the window of every read with [`always_early`].
async fn in_window<Svc>(svc: &mut Svc)
where
    Svc: Service<u64, Response = u64, Error = BoxError>,
{
    assert_eq!(get(svc, 1).await.unwrap(), 1);
    advance(55 * S).await;
}

/// Key 1 stored by call 1 at 0.01 (expiring at 60.01); at 61.01 a fetch (call 2) fails at
/// 61.02 and the stale value is served: in outage (with a 5 s interval) until 66.02, the
/// instant the clock is then at.
async fn outage<Svc>(svc: &mut Svc)
where
    Svc: Service<u64, Response = u64, Error = BoxError>,
{
    assert_eq!(get(svc, 1).await.unwrap(), 1);
    advance(61 * S).await;
    assert_eq!(get(svc, 1).await.unwrap(), 1);
    advance(5 * S).await;
}

/// A read while key 1 backs off: `old` at once, and no upstream call.
async fn backs_off<Svc>(svc: &mut Svc, up: &Up, old: u64)
where
    Svc: Service<u64, Response = u64, Error = BoxError>,
{
    let calls = up.calls.get();
    assert_eq!(cached(svc, 1), old);
    settle().await;
    assert_eq!(up.calls.get(), calls, "no upstream call while backing off");
}

/// A read of key 1 that gets `old` at once and starts exactly one refresh or retry in the
/// background, the next upstream call `n`: then reads get `n`.
async fn refreshes_once<Svc>(svc: &mut Svc, up: &Up, old: u64)
where
    Svc: Service<u64, Response = u64, Error = BoxError>,
{
    let n = up.calls.get() + 1;
    assert_eq!(cached(svc, 1), old);
    settle().await;
    assert_eq!(up.calls.get(), n, "exactly one refresh or retry");
    assert_eq!(cached(svc, 1), n);
}

/// What a read on its own task got: its value, or its error's kind; `None` when its task
/// panicked.
type Got = Option<Result<u64, Option<ErrorKind>>>;

/// Three coalesced reads of key 1, each on its own task (the first drives the fetch), once
/// their fetch is over.
async fn three_reads<Svc>(svc: &Svc) -> Vec<Got>
where
    Svc: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
    Svc::Future: Send,
{
    let readers: Vec<_> = (0..3).map(|_| spawn_get(svc, 1)).collect();
    settle().await;
    let mut got = Vec::new();
    for r in readers {
        got.push(match r.await {
            Err(e) => {
                assert!(e.is_panic(), "a reader's task panicked");
                None
            }
            Ok(res) => Some(res.map_err(|e| kind_of(&e))),
        });
    }
    got
}

// ---------------------------------------------------------------------------------------
// The value's `Clone` while a fetched value is stored.
// ---------------------------------------------------------------------------------------

/// Background early refresh whose new value panics when cloned to be stored: a panicked
/// refresh (one refresh error, one `Panicked` event), the old value kept, the key backs
/// off, and the first read in the window after the back-off starts exactly one refresh.
#[tokio::test(start_paused = true)]
async fn background_refresh_whose_value_panics_when_stored_backs_off_then_refreshes() {
    let up = Up::new(|_| false);
    let log = Log::default();
    let (h, mut svc) = build(base("bg", always_early, &log), &up);
    in_window(&mut svc).await;
    up.values.arm(2); // this read's clone, then the refreshed value's
    assert_eq!(cached(&mut svc, 1), 1); // starts call 2
    settle().await; // call 2 answers at 55.02; storing it panics
    assert_eq!((up.calls.get(), up.values.left()), (2, 0));
    assert_eq!(counts(&h), ([1, 1, 0, 0, 1, 1, 2], 1.0));
    assert_eq!(log.kinds(), [EarlyRefresh, Panicked]);
    advance(ms(490)).await; // 55.51: backing off until 56.02
    backs_off(&mut svc, &up, 1).await;
    advance(S).await; // 56.52
    refreshes_once(&mut svc, &up, 1).await;
    assert_eq!(counts(&h), ([4, 1, 0, 0, 2, 1, 3], 1.0));
    assert_eq!(log.kinds(), [EarlyRefresh, Panicked, EarlyRefresh]);
}

/// Inline early refresh whose new value panics when cloned to be stored: the reader that
/// drives it panics on its task (as for a panicking upstream), a read during it got the old
/// value at once, the failure is recorded and backed off, and the first read in the window
/// after the back-off starts exactly one refresh and waits for its value.
#[tokio::test(start_paused = true)]
async fn inline_refresh_whose_value_panics_when_stored_backs_off_then_refreshes() {
    let up = Up::new(|_| false);
    let log = Log::default();
    let (h, mut svc) = build(
        base("inline", always_early, &log).refresh_mode(RefreshMode::Inline),
        &up,
    );
    in_window(&mut svc).await;
    up.values.arm(3); // the two readers' clones, then the refreshed value's
    let driver = spawn_get(&svc, 1); // starts call 2, answering at 55.02
    run_tasks().await;
    advance(ms(5)).await;
    assert_eq!(cached(&mut svc, 1), 1, "a read during the refresh, at once");
    advance(ms(5)).await;
    run_tasks().await;
    assert!(driver.await.unwrap_err().is_panic());
    assert_eq!((up.calls.get(), up.values.left()), (2, 0));
    assert_eq!(counts(&h), ([2, 1, 0, 0, 1, 1, 2], 1.0));
    advance(S).await; // 56.02: the back-off is over
    let next = spawn_get(&svc, 1); // starts call 3
    settle().await;
    assert_eq!(next.await.unwrap().unwrap(), 3);
    assert_eq!(up.calls.get(), 3);
    assert_eq!(cached(&mut svc, 1), 3);
    assert_eq!(counts(&h), ([4, 1, 0, 0, 2, 1, 3], 1.0));
    assert_eq!(log.kinds(), [EarlyRefresh, Panicked, EarlyRefresh]);
}

/// A miss with three coalesced readers whose value panics when cloned to be stored: the
/// reader driving the fetch panics, the two others get a `Panicked` error (no hang), the
/// panic is a refresh error, nothing is stored, and the next read fetches exactly once.
#[tokio::test(start_paused = true)]
async fn coalesced_miss_whose_value_panics_when_stored_fails_every_reader_once() {
    let up = Up::new(|_| false);
    let log = Log::default();
    let (h, mut svc) = build(base("miss", never_early, &log), &up);
    up.values.arm(1);
    let panicked = Some(Err(Some(ErrorKind::Panicked)));
    assert_eq!(three_reads(&svc).await, [None, panicked, panicked]);
    assert_eq!((up.calls.get(), up.values.left()), (1, 0));
    assert_eq!(counts(&h), ([0, 3, 0, 0, 0, 1, 1], 0.0));
    assert_eq!(log.kinds(), [Panicked]);
    assert_eq!(get(&mut svc, 1).await.unwrap(), 2, "the next read fetches");
    assert_eq!(up.calls.get(), 2);
    assert_eq!(cached(&mut svc, 1), 2);
    assert_eq!(counts(&h), ([1, 4, 0, 0, 0, 1, 2], 1.0));
}

/// A miss with three coalesced readers whose value panics when cloned for the reader that
/// drove the fetch: the value was stored first, so only that reader panics; the two others
/// get the value, and the next read is a hit.
#[tokio::test(start_paused = true)]
async fn coalesced_miss_whose_value_panics_when_handed_to_its_driver_panics_that_reader_only() {
    let up = Up::new(|_| false);
    let log = Log::default();
    let (h, mut svc) = build(base("handed", never_early, &log), &up);
    up.values.arm(2); // the stored clone, then the driver's
    assert_eq!(three_reads(&svc).await, [None, Some(Ok(1)), Some(Ok(1))]);
    assert_eq!((up.calls.get(), up.values.left()), (1, 0));
    assert_eq!(cached(&mut svc, 1), 1);
    assert_eq!(counts(&h), ([1, 3, 0, 0, 0, 0, 1], 1.0));
    assert_eq!(log.kinds(), []);
}

/// A fetch after expiry, with a stale value to serve, whose value panics when cloned to be
/// stored: its driving reader panics, the two coalesced readers get the stale value, the
/// panic is a refresh error that puts the key in outage: reads during the back-off get the
/// stale value with no upstream call, and the first read after it starts exactly one retry.
#[tokio::test(start_paused = true)]
async fn post_expiry_fetch_whose_value_panics_when_stored_serves_stale_and_backs_off() {
    let up = Up::new(|_| false);
    let log = Log::default();
    let (h, mut svc) = build(
        base("expired", never_early, &log)
            .max_staleness(30 * S)
            .stale_retry_interval(5 * S),
        &up,
    );
    assert_eq!(get(&mut svc, 1).await.unwrap(), 1); // expires 60.01
    advance(61 * S).await; // 61.01
    up.values.arm(4); // each reader's stale value, then the fetched value's
    // Call 2 answers at 61.02; storing it panics.
    assert_eq!(three_reads(&svc).await, [None, Some(Ok(1)), Some(Ok(1))]);
    assert_eq!((up.calls.get(), up.values.left()), (2, 0));
    assert_eq!(counts(&h), ([0, 2, 2, 0, 0, 1, 2], 1.0));
    advance(S).await; // 62.02: in outage until 66.02
    backs_off(&mut svc, &up, 1).await;
    advance(4 * S).await; // 66.03
    refreshes_once(&mut svc, &up, 1).await;
    assert_eq!(counts(&h), ([1, 2, 4, 0, 0, 1, 3], 1.0));
    let stale = [StaleServed; 4];
    assert_eq!(log.kinds(), [&[Panicked][..], &stale].concat());
}

/// With a negative TTL, a refresh whose response the classifier rejects is cloned to be
/// remembered; when that clone panics, the refresh is a panicked one (one refresh error),
/// the old value is kept, and the first read in the window after the back-off refreshes.
#[tokio::test(start_paused = true)]
async fn a_rejected_refresh_whose_value_panics_when_remembered_backs_off_then_refreshes() {
    let up = Up::new(|_| false);
    let log = Log::default();
    let layer = base("negative", always_early, &log)
        .negative_ttl(10 * S)
        .classifier(classify_fn(|r: Result<&V, &BoxError>| match r {
            Ok(v) if v.n != 2 => Outcome::Success,
            _ => Outcome::Failure,
        }))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = stack(&layer, &up);
    in_window(&mut svc).await;
    up.values.arm(2); // this read's clone, then the rejected response's
    assert_eq!(cached(&mut svc, 1), 1); // starts call 2, rejected
    settle().await;
    assert_eq!((up.calls.get(), up.values.left()), (2, 0));
    assert_eq!(counts(&h), ([1, 1, 0, 0, 1, 1, 2], 1.0));
    assert_eq!(log.kinds(), [EarlyRefresh, Panicked]);
    advance(S).await; // 56.02: the back-off is over
    refreshes_once(&mut svc, &up, 1).await;
    assert_eq!(counts(&h), ([3, 1, 0, 0, 2, 1, 3], 1.0));
}

// ---------------------------------------------------------------------------------------
// User code between the flag and the refresh that takes it over.
// ---------------------------------------------------------------------------------------

/// The value's `Clone` for the read that has just set the entry's early-refresh flag (in
/// either mode): the read unwinds out of `call`, starts nothing, and leaves no flag: the
/// next read in the window starts exactly one refresh.
#[tokio::test(start_paused = true)]
async fn the_value_panicking_for_the_read_that_starts_a_refresh_leaves_no_flag() {
    for mode in [RefreshMode::Background, RefreshMode::Inline] {
        let up = Up::new(|_| false);
        let log = Log::default();
        let (h, mut svc) = build(base("read", always_early, &log).refresh_mode(mode), &up);
        in_window(&mut svc).await;
        up.values.arm(1);
        assert!(call_panics(&mut svc), "{mode:?}");
        assert_eq!((up.calls.get(), up.values.left()), (1, 0), "{mode:?}");
        let next = spawn_get(&svc, 1); // starts call 2
        settle().await;
        let first = if mode == RefreshMode::Inline { 2 } else { 1 };
        assert_eq!(next.await.unwrap().unwrap(), first, "{mode:?}");
        assert_eq!(up.calls.get(), 2, "{mode:?}: exactly one refresh");
        assert_eq!(cached(&mut svc, 1), 2, "{mode:?}");
        assert_eq!(counts(&h), ([2, 1, 0, 0, 1, 0, 2], 1.0), "{mode:?}");
        assert_eq!(log.kinds(), [EarlyRefresh], "{mode:?}");
    }
}

/// The value's `Clone` for the read that has just set the retry flag of a key in outage:
/// the read unwinds out of `call`, and the next read starts exactly one retry.
#[tokio::test(start_paused = true)]
async fn the_value_panicking_for_the_read_that_starts_a_retry_leaves_no_flag() {
    let up = Up::new(|n| n == 2);
    let log = Log::default();
    let (h, mut svc) = build(
        base("retry", never_early, &log)
            .max_staleness(30 * S)
            .stale_retry_interval(5 * S),
        &up,
    );
    outage(&mut svc).await;
    up.values.arm(1);
    assert!(call_panics(&mut svc));
    assert_eq!((up.calls.get(), up.values.left()), (2, 0));
    refreshes_once(&mut svc, &up, 1).await;
    assert_eq!(counts(&h), ([1, 1, 2, 0, 0, 1, 3], 1.0));
}

/// The inner service's `Clone` (for the refresh's call) after the read set the flag of an
/// early refresh, or of a retry in outage; and an `EarlyRefresh` listener that panics: the
/// read unwinds out of `call`, and the next read starts exactly one refresh or retry. The
/// early refresh is counted once it exists (so not for a panicking inner `Clone`).
#[tokio::test(start_paused = true)]
async fn user_code_panicking_before_the_refresh_exists_leaves_no_flag() {
    for (case, retry) in [("inner", false), ("listener", false), ("inner", true)] {
        let up = Up::new(move |n| retry && n == 2);
        let log = Log::default();
        let boom = Arc::new(AtomicBool::new(false));
        let random = if retry { never_early } else { always_early };
        let builder = base(case, random, &log)
            .max_staleness(30 * S)
            .stale_retry_interval(5 * S)
            .on_event(panics_on(EarlyRefresh, &boom));
        let (h, mut svc) = build(builder, &up);
        match retry {
            true => outage(&mut svc).await,
            false => in_window(&mut svc).await,
        }
        let calls = up.calls.get();
        match case {
            "inner" => up.own.arm(1),
            _ => boom.store(true, Ordering::SeqCst),
        }
        assert!(call_panics(&mut svc), "{case} {retry}");
        assert_eq!(up.calls.get(), calls, "{case} {retry}");
        refreshes_once(&mut svc, &up, 1).await;
        let early = if retry {
            0
        } else {
            2 - u64::from(case == "inner")
        };
        assert_eq!(counts(&h).0[4], early, "{case} {retry}: early refreshes");
    }
}

/// A `RefreshFailed` listener that panics when a background refresh fails: the failure is
/// recorded before the listener runs (the flag cleared, the key backing off), so the first
/// read in the window after the back-off starts exactly one refresh.
#[tokio::test(start_paused = true)]
async fn a_panicking_refresh_failed_listener_leaves_no_flag() {
    let up = Up::new(|n| n == 2);
    let log = Log::default();
    let boom = Arc::new(AtomicBool::new(true));
    let builder = base("failed", always_early, &log).on_event(panics_on(RefreshFailed, &boom));
    let (h, mut svc) = build(builder, &up);
    in_window(&mut svc).await;
    assert_eq!(cached(&mut svc, 1), 1); // starts call 2, failing at 55.02
    settle().await;
    assert!(!boom.load(Ordering::SeqCst), "the listener ran");
    assert_eq!(up.calls.get(), 2);
    assert_eq!(counts(&h), ([1, 1, 0, 0, 1, 1, 2], 1.0));
    advance(ms(490)).await; // 55.51: backing off until 56.02
    backs_off(&mut svc, &up, 1).await;
    advance(S).await; // 56.52
    refreshes_once(&mut svc, &up, 1).await;
    assert_eq!(log.kinds(), [EarlyRefresh, RefreshFailed, EarlyRefresh]);
}
