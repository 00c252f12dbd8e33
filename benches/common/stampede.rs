//! Cache stampede simulation on tokio's paused clock, shared by `tests/stampede.rs` (exact
//! counts) and `benches/stampede.rs` (the printed table).
//!
//! One hot key under steady reads: every [`Params::tick`] of virtual time,
//! [`Params::readers_per_tick`] readers (each its own task) ask for the key. The upstream
//! recomputation takes [`Params::recompute`] of virtual time; values live
//! [`Params::ttl`]. Three subjects sit in front of the same upstream:
//!
//! - [`Subject::PlainTtl`]: a map with an expiry per key, no coalescing (every miss goes
//!   upstream), as a hand-rolled cache does;
//! - [`Subject::CoalescedOnly`]: our cache with XFetch's `u` fixed at 1 (never refreshes
//!   early), so only coalescing acts: one upstream call per expiry, readers wait for it;
//! - [`Subject::XFetch`]: our cache with XFetch (beta 1, a seeded random source) and
//!   coalescing: the value is refreshed in the background before it expires.
//!
//! Upstream calls are grouped in **waves**: a call made while no other call is in flight
//! starts a wave, a call made while one is in flight joins it. The first wave is the cold
//! fill (nothing cached yet); every later wave is one expiry (or early refresh) of the value.
//! A read **waited** when its response came at a later virtual instant than its call (a hit
//! answers at the same instant).
//!
//! The tick (2 ms) is even and the recomputation (21 ms) odd, so an upstream call never ends
//! at the instant of a tick and the counts do not depend on which of two tasks woken at one
//! instant runs first.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_breakwater::BoxError;
use tower_breakwater::cache::CacheLayer;

/// The hot key.
pub const KEY: u64 = 7;

/// The shape of one simulation; see the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Readers started at each tick.
    pub readers_per_tick: u64,
    /// Virtual time between ticks.
    pub tick: Duration,
    /// Time to live of a stored value.
    pub ttl: Duration,
    /// Virtual time one upstream recomputation takes (XFetch's delta).
    pub recompute: Duration,
    /// Virtual time over which ticks are started (the last tick is before this).
    pub run: Duration,
}

/// 10 readers every 2 ms (5 per virtual ms), a 1 s TTL, a 21 ms recomputation, 5.232 s:
/// the cold fill plus five whole expiries of a plain TTL cache.
pub const PARAMS: Params = Params {
    readers_per_tick: 10,
    tick: Duration::from_millis(2),
    ttl: Duration::from_secs(1),
    recompute: Duration::from_millis(21),
    run: Duration::from_millis(5_232),
};

/// The seed of XFetch's random source in [`Subject::XFetch`] runs.
pub const SEED: u64 = 42;

/// What sits in front of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A map with expiry, no coalescing.
    PlainTtl,
    /// Our cache, early refresh off (`u` = 1): coalescing alone.
    CoalescedOnly,
    /// Our cache with XFetch (beta 1, seeded) and coalescing.
    XFetch {
        /// Seed of the random source.
        seed: u64,
    },
}

impl Subject {
    /// The subject's name in the table.
    pub fn label(&self) -> &'static str {
        match self {
            Subject::PlainTtl => "(a) plain TTL cache, no coalescing",
            Subject::CoalescedOnly => "(b) breakwater cache, coalescing only (u = 1)",
            Subject::XFetch { .. } => "(c) breakwater cache, XFetch + coalescing",
        }
    }
}

/// What one simulation observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Upstream calls per wave, in order (the first wave is the cold fill).
    pub waves: Vec<u64>,
    /// Virtual instants (since the start) at which each wave began.
    pub wave_starts: Vec<Duration>,
    /// Reads made.
    pub reads: u64,
    /// Reads that waited, in the cold fill's wave (before the first value was stored).
    pub cold_waits: u64,
    /// Reads that waited after the first value was stored.
    pub waits: u64,
    /// The longest wait of a read after the first value was stored.
    pub longest_wait: Duration,
}

impl Report {
    /// Upstream calls in total.
    pub fn calls(&self) -> u64 {
        self.waves.iter().sum()
    }

    /// Waves after the cold fill: expiries (or early refreshes) of the value.
    pub fn expiries(&self) -> u64 {
        self.waves.len().saturating_sub(1) as u64
    }

    /// Upstream calls per expiry (after the cold fill), as `(min, max)`.
    pub fn calls_per_expiry(&self) -> (u64, u64) {
        let later = self.waves.iter().skip(1);
        (
            later.clone().copied().min().unwrap_or(0),
            later.copied().max().unwrap_or(0),
        )
    }
}

#[derive(Default)]
struct Log {
    in_flight: u64,
    waves: Vec<u64>,
    wave_starts: Vec<Duration>,
    /// When the first call ended (the first value was stored then).
    first_stored: Option<Instant>,
}

/// The upstream: counts calls in waves in `log` and answers after `recompute` of virtual
/// time.
fn upstream(
    log: Arc<Mutex<Log>>,
    recompute: Duration,
    start: Instant,
) -> impl Service<u64, Response = u64, Error = BoxError, Future: Send + 'static> + Clone + Send + 'static
{
    tower::service_fn(move |key: u64| {
        let log = log.clone();
        async move {
            {
                let mut l = log.lock().unwrap();
                if l.in_flight == 0 {
                    l.waves.push(0);
                    l.wave_starts.push(Instant::now() - start);
                }
                l.in_flight += 1;
                *l.waves.last_mut().unwrap() += 1;
            }
            tokio::time::sleep(recompute).await;
            let mut l = log.lock().unwrap();
            l.in_flight -= 1;
            l.first_stored.get_or_insert_with(Instant::now);
            Ok(key)
        }
    })
}

/// A plain TTL cache: a map from key to (value, expiry) in front of the inner service; a
/// miss calls the inner service and stores its answer for `ttl`. No coalescing.
#[derive(Clone)]
pub struct PlainTtl<S> {
    inner: S,
    ttl: Duration,
    map: Arc<Mutex<HashMap<u64, (u64, Instant)>>>,
}

impl<S> PlainTtl<S> {
    /// A cache of `ttl` in front of `inner`.
    pub fn new(inner: S, ttl: Duration) -> Self {
        PlainTtl {
            inner,
            ttl,
            map: Arc::default(),
        }
    }
}

impl<S> Service<u64> for PlainTtl<S>
where
    S: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = u64;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<u64, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> Self::Future {
        let now = Instant::now();
        if let Some(&(value, expiry)) = self.map.lock().unwrap().get(&key) {
            if now < expiry {
                return Box::pin(std::future::ready(Ok(value)));
            }
        }
        let (map, ttl, inner) = (self.map.clone(), self.ttl, self.inner.clone());
        Box::pin(async move {
            let value = inner.oneshot(key).await?;
            map.lock()
                .unwrap()
                .insert(key, (value, Instant::now() + ttl));
            Ok(value)
        })
    }
}

/// Runs one simulation of `subject` under `params`. Needs tokio's clock paused
/// (`#[tokio::test(start_paused = true)]`, or a runtime built with `start_paused(true)`),
/// on a current-thread runtime.
pub async fn simulate(subject: Subject, params: Params) -> Report {
    let start = Instant::now();
    let log = Arc::new(Mutex::new(Log::default()));
    let upstream = upstream(log.clone(), params.recompute, start);
    let builder = || {
        CacheLayer::builder()
            .name("stampede")
            .key(|k: &u64| Some(*k))
            .ttl(params.ttl)
    };
    let reads = match subject {
        Subject::PlainTtl => drive(PlainTtl::new(upstream, params.ttl), params, start).await,
        Subject::CoalescedOnly => {
            let layer = builder().random(|| 1.0).build().expect("valid cache");
            drive(layer.layer(upstream), params, start).await
        }
        Subject::XFetch { seed } => {
            let layer = builder().seed(seed).build().expect("valid cache");
            drive(layer.layer(upstream), params, start).await
        }
    };
    let log = log.lock().unwrap();
    let first_stored = log.first_stored.expect("the cold fill ended");
    let mut report = Report {
        waves: log.waves.clone(),
        wave_starts: log.wave_starts.clone(),
        reads: reads.len() as u64,
        cold_waits: 0,
        waits: 0,
        longest_wait: Duration::ZERO,
    };
    for (called, waited) in reads {
        if waited.is_zero() {
            continue;
        }
        if called < first_stored {
            report.cold_waits += 1;
        } else {
            report.waits += 1;
            report.longest_wait = report.longest_wait.max(waited);
        }
    }
    report
}

/// Starts the readers tick by tick; returns, per read, when it was made and how long it
/// waited for its response.
async fn drive<S>(svc: S, params: Params, start: Instant) -> Vec<(Instant, Duration)>
where
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let mut readers = Vec::new();
    let mut at = start;
    while at < start + params.run {
        tokio::time::sleep_until(at).await;
        for _ in 0..params.readers_per_tick {
            let svc = svc.clone();
            readers.push(tokio::spawn(async move {
                let called = Instant::now();
                let value = svc.oneshot(KEY).await.expect("every read succeeds");
                assert_eq!(value, KEY);
                (called, called.elapsed())
            }));
        }
        at += params.tick;
    }
    let mut reads = Vec::with_capacity(readers.len());
    for r in readers {
        reads.push(r.await.expect("a reader panicked"));
    }
    reads
}

/// The reports as a markdown table.
pub fn table(params: Params, rows: &[(Subject, Report)]) -> String {
    let mut out = format!(
        "Hot key, {} reads every {:?} of virtual time, TTL {:?}, recomputation {:?}, {:?} run\n\n",
        params.readers_per_tick, params.tick, params.ttl, params.recompute, params.run
    );
    out.push_str(
        "| subject | upstream calls | expiries after the cold fill | upstream calls per expiry | \
         reads | reads that waited (cold fill) | reads that waited (after it) | longest wait |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (subject, r) in rows {
        let (min, max) = r.calls_per_expiry();
        let per_expiry = if min == max {
            min.to_string()
        } else {
            format!("{min}..{max}")
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:?} |\n",
            subject.label(),
            r.calls(),
            r.expiries(),
            per_expiry,
            r.reads,
            r.cold_waits,
            r.waits,
            r.longest_wait
        ));
    }
    out
}
