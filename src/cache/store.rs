//! The bounded, sharded store of cached entries, the XFetch decision and the random source.

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram};
use foldhash::fast::RandomState;
use hashbrown::HashTable;
use parking_lot::{RwLock, RwLockWriteGuard};
use rand_xoshiro::SplitMix64;
use rand_xoshiro::rand_core::{RngCore, SeedableRng};

use crate::classify::{Classify, Outcome};
use crate::clock::Instant;
use crate::error::BoxError;
use crate::event::{EventKind, Events};

/// A function returning `u`, uniform in `(0.0, 1.0]`.
pub(crate) type RandomFn = Arc<dyn Fn() -> f64 + Send + Sync>;

/// The default random source: the SplitMix64 sequence (Steele, Lea, Flood, "Fast Splittable
/// Pseudorandom Number Generators", OOPSLA 2014, as implemented by `rand_xoshiro`) of a seed,
/// advanced with one atomic add per draw (no lock).
pub(crate) fn splitmix(seed: u64) -> RandomFn {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
    let state = AtomicU64::new(seed);
    Arc::new(move || {
        let s = state.fetch_add(GAMMA, Ordering::Relaxed);
        let x = SplitMix64::seed_from_u64(s).next_u64();
        // 53 random bits, shifted into (0, 1].
        ((x >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    })
}

/// The largest `-ln(u)` over every positive `f64` `u` is 744.44 (`u` = 4.9e-324, the
/// smallest subnormal), so with `r` left a read can refresh early only if
/// `r <= 745 * beta * delta`.
const MAX_MINUS_LN_U: f64 = 745.0;

/// XFetch (Vattani, Chierichetti, Lowenstein, PVLDB 2015): whether a read at `now`, before
/// `expiry`, refreshes early: `now - delta * beta * ln(u) >= expiry`.
///
/// `u` is drawn only when some `u` in `(0, 1]` can trigger a refresh
/// (`r <= 745 * beta * delta`), so reads far from expiry cost no draw. A drawn `u` outside
/// `(0, 1]` (zero, negative, NaN, above 1) counts as `u = 1`: no early refresh.
#[inline]
pub(crate) fn xfetch(
    now: Instant,
    expiry: Instant,
    delta: Duration,
    beta: f64,
    random: &RandomFn,
) -> bool {
    if delta.is_zero() || now >= expiry {
        return false;
    }
    let r = (expiry - now).as_secs_f64();
    let scale = delta.as_secs_f64() * beta;
    if r > scale * MAX_MINUS_LN_U {
        return false;
    }
    let u = random();
    if !(u > 0.0 && u <= 1.0) {
        return false;
    }
    -scale * u.ln() >= r
}

/// The first instant at which a read of an entry stored at `stored`, expiring at `expiry`,
/// with `delta`, can refresh early: `expiry - 746 * beta * delta` (one unit of
/// `beta * delta` beyond [`xfetch`]'s bound, so float rounding never skips a read that could
/// refresh); `expiry` when `delta` is zero. Reads before it skip XFetch entirely; reads after
/// it run [`xfetch`], whose decision is exact.
///
/// Not clamped at `stored`: a read may come at an instant before the entry was stored (each
/// paused tokio runtime has its own clock), and XFetch's condition holds for it too. When
/// the subtraction leaves the clock's range, the window opens at the earliest instant found
/// below `stored` (halving steps), before any read a clock can give in practice.
fn window_start(stored: Instant, expiry: Instant, delta: Duration, beta: f64) -> Instant {
    if delta.is_zero() {
        return expiry;
    }
    let span = Duration::try_from_secs_f64(delta.as_secs_f64() * beta * (MAX_MINUS_LN_U + 1.0))
        .unwrap_or(Duration::MAX);
    expiry.checked_sub(span).unwrap_or_else(|| {
        (0..64)
            .rev()
            .find_map(|s| stored.checked_sub(Duration::from_secs(1 << s)))
            .unwrap_or(stored)
    })
}

/// `at + d`, saturating at about 30 years after `at` (tokio's own "far future") instead of
/// overflowing.
pub(crate) fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(86_400 * 365 * 30)))
        .unwrap_or(at)
}

/// Metric handles, counts and listeners of one cache instance, registered at build time.
#[derive(Debug)]
pub(crate) struct Instruments {
    pub(crate) name: Arc<str>,
    /// By result: hit, miss, stale, negative.
    pub(crate) lookups: [Counter; 4],
    pub(crate) early: Counter,
    pub(crate) errors: Counter,
    pub(crate) entries: Gauge,
    pub(crate) recompute: Option<Histogram>,
    /// Upstream calls made by fetches, early refreshes and retries.
    pub(crate) fetches: Counter,
    /// Requests passed through uncached (key `None`).
    pub(crate) passed: Counter,
    pub(crate) events: Events,
    /// Snapshot counts: hits, misses, stale, negative, early refreshes, refresh errors,
    /// entries, fetches, passed through.
    pub(crate) counts: [AtomicU64; 9],
}

pub(crate) const HIT: usize = 0;
pub(crate) const MISS: usize = 1;
pub(crate) const STALE: usize = 2;
pub(crate) const NEGATIVE: usize = 3;
pub(crate) const EARLY: usize = 4;
pub(crate) const ERRORS: usize = 5;
pub(crate) const ENTRIES: usize = 6;
pub(crate) const FETCHES: usize = 7;
pub(crate) const PASSED: usize = 8;

/// How a fetch or refresh failed, for its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// An error, or a response the classifier did not call a success: `RefreshFailed`.
    Failed,
    /// The upstream call (or the classifier, or the TTL or staleness function) panicked:
    /// `Panicked`.
    Panicked,
    /// A refresh ran past its deadline: `TimedOut`.
    TimedOut(Duration),
}

impl Instruments {
    #[inline]
    pub(crate) fn lookup(&self, result: usize) {
        self.lookups[result].increment(1);
        self.counts[result].fetch_add(1, Ordering::Relaxed);
        if result == STALE {
            self.events.emit(|| EventKind::StaleServed);
        }
    }

    pub(crate) fn early_refresh(&self) {
        self.early.increment(1);
        self.counts[EARLY].fetch_add(1, Ordering::Relaxed);
        self.events.emit(|| EventKind::EarlyRefresh);
    }

    fn refresh_failed(&self, how: Failure) {
        self.errors.increment(1);
        self.counts[ERRORS].fetch_add(1, Ordering::Relaxed);
        self.events.emit(|| match how {
            Failure::Failed => EventKind::RefreshFailed,
            Failure::Panicked => EventKind::Panicked,
            Failure::TimedOut(after) => EventKind::TimedOut { after },
        });
    }

    /// An upstream call started (a fetch, an early refresh or a retry).
    pub(crate) fn fetched(&self) {
        self.fetches.increment(1);
        self.counts[FETCHES].fetch_add(1, Ordering::Relaxed);
    }

    /// A request passed through uncached.
    #[inline]
    pub(crate) fn passed(&self) {
        self.passed.increment(1);
        self.counts[PASSED].fetch_add(1, Ordering::Relaxed);
    }

    fn entries(&self, added: i64) {
        if added >= 0 {
            self.entries.increment(added as f64);
            self.counts[ENTRIES].fetch_add(added as u64, Ordering::Relaxed);
        } else {
            self.entries.decrement((-added) as f64);
            self.counts[ENTRIES].fetch_sub((-added) as u64, Ordering::Relaxed);
        }
    }
}

/// How an early refresh runs; see the [module docs](crate::cache#modes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RefreshMode {
    /// Detached on the current tokio runtime: the read that starts the refresh returns the
    /// cached value at once (the default).
    #[default]
    Background,
    /// As in the XFetch paper: the read that starts the refresh waits for the new value
    /// (and gets the cached value if the refresh fails); other reads during the refresh
    /// return the cached value at once.
    Inline,
}

/// Settings shared by every store of a layer.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) beta: f64,
    pub(crate) max_staleness: Duration,
    pub(crate) stale_retry_interval: Duration,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) mode: RefreshMode,
    pub(crate) max_entries: usize,
    pub(crate) random: RandomFn,
    /// How long a refresh (early, or a retry during an outage) may run before it fails.
    pub(crate) refresh_timeout: Duration,
}

/// A per-response maximum staleness (`None`: the configured one).
pub(crate) type StaleFn<R> = Arc<dyn Fn(&R) -> Option<Duration> + Send + Sync>;

/// The value a shared fetch gives its callers: the response, or the upstream error shared
/// by all of them.
pub(crate) type Shared<R> = Result<R, Arc<BoxError>>;

/// The result of one upstream computation, as every caller of its fetch receives it.
#[derive(Clone)]
pub(crate) struct Fetched<R> {
    pub(crate) res: Shared<R>,
    /// The classifier called it a success.
    pub(crate) success: bool,
}

/// What an entry holds.
enum Stored<R> {
    /// A value.
    Value(R),
    /// A remembered failure (negative caching): an error, or a response the classifier did
    /// not call a success.
    Failed(Shared<R>),
}

/// One cached value or remembered failure.
struct Entry<K, R> {
    hash: u64,
    key: K,
    value: Stored<R>,
    /// A value: stored-at plus TTL; a failure: until when it is remembered. On tokio's clock.
    expiry: Instant,
    /// From this instant to `expiry`, reads run XFetch (see [`window_start`]).
    window: Instant,
    /// `expiry` plus the maximum staleness (saturating): a value is never served from then.
    stale_until: Instant,
    /// Duration of the computation that produced `value`.
    delta: Duration,
    /// An early refresh of this entry is in flight.
    refreshing: AtomicBool,
    /// After a failure: no upstream call for this key before this instant.
    retry_at: Option<Instant>,
}

/// A value a failed fetch may serve instead: the stored value, and the instant from which it
/// may no longer be served.
pub(crate) type Fallback<R> = (R, Instant);

/// What a read found.
pub(crate) enum Lookup<R> {
    /// A fresh value; when this read starts an early refresh, the instant from which the
    /// value may no longer be served (its expiry plus the maximum staleness).
    Hit(R, Option<Instant>),
    /// An expired value within the maximum staleness, served while backing off.
    Stale(R),
    /// A remembered failure.
    Failed(Shared<R>),
    /// Nothing usable: fetch, falling back on the expired value when there is one.
    Fetch(Option<Fallback<R>>),
    /// An expired value within its maximum staleness whose key is in outage (its last fetch
    /// failed) and whose back-off is over: this read set the refresh flag and starts the
    /// retry in the background; it is served the value, like every read while the retry
    /// runs.
    Retry(Fallback<R>),
}

#[repr(align(128))]
struct Shard<K, R>(RwLock<HashTable<Entry<K, R>>>);

/// The store of one layer for one key type, response type, classifier and TTL policy.
pub(crate) struct Store<K, R, C, T> {
    shards: Box<[Shard<K, R>]>,
    mask: usize,
    per_shard: usize,
    hasher: RandomState,
    pub(crate) settings: Settings,
    pub(crate) instruments: Arc<Instruments>,
    classifier: C,
    ttl: T,
    /// The per-response maximum staleness, when set.
    pub(crate) staleness: Option<StaleFn<R>>,
}

/// How long a response may be stored: [`FixedTtl`](super::FixedTtl) (from
/// [`ttl`](super::CacheBuilder::ttl)) or [`TtlFn`](super::TtlFn) (from
/// [`ttl_fn`](super::CacheBuilder::ttl_fn)). Sealed: the builder is the only way to give one.
///
/// Called once per upstream result that the classifier calls a success (a fetch, an early
/// refresh or a retry), on the task that drove the upstream call, before the result is
/// stored or handed to any caller; never on the hit path.
pub trait TtlPolicy<Res>: super::policy::Sealed + Clone + Send + Sync + 'static {
    /// The TTL of `res`: the entry expires that long after it was stored (a sum past the
    /// clock's range saturates at about 30 years). `None` or a zero duration: `res` is
    /// returned to its callers but not stored (the value already stored, if any, stays).
    ///
    /// # Panics
    ///
    /// A panic here is a panic of the fetch: it is caught like a panic of the upstream call
    /// (the driving reader's task panics, the other callers get a
    /// [`Panicked`](crate::error::ErrorKind::Panicked) error, the failure is recorded), and
    /// nothing is stored.
    fn ttl(&self, res: &Res) -> Option<Duration>;
}

/// What the classifier and the TTL policy said of an upstream result.
pub(crate) struct Verdict {
    success: bool,
    /// The TTL to store it with (a success with a TTL > 0 only).
    ttl: Option<Duration>,
    /// How long past its expiry it may be served: the configured maximum staleness, or the
    /// response's own allowance when smaller.
    stale_for: Duration,
}

impl Verdict {
    pub(crate) fn success(&self) -> bool {
        self.success
    }
}

impl<K, R, C, T> Store<K, R, C, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    R: Clone + Send + Sync + 'static,
    C: Classify<R>,
    T: TtlPolicy<R>,
{
    pub(crate) fn new(
        settings: Settings,
        instruments: Arc<Instruments>,
        classifier: C,
        ttl: T,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut n = (cores * 4).next_power_of_two().clamp(1, 1024);
        while n > settings.max_entries {
            n /= 2;
        }
        let n = n.max(1);
        Store {
            shards: (0..n)
                .map(|_| Shard(RwLock::new(HashTable::new())))
                .collect(),
            mask: n - 1,
            per_shard: settings.max_entries / n,
            hasher: RandomState::default(),
            settings,
            instruments,
            classifier,
            ttl,
            staleness: None,
        }
    }

    #[inline]
    fn shard(&self, hash: u64) -> &RwLock<HashTable<Entry<K, R>>> {
        &self.shards[(hash >> 32) as usize & self.mask].0
    }

    /// A read at `now` (shard read lock; clones the value). A fresh entry before its XFetch
    /// window costs two comparisons beyond the lookup.
    #[inline]
    pub(crate) fn lookup(&self, key: &K, now: Instant) -> Lookup<R> {
        let hash = self.hasher.hash_one(key);
        let shard = self.shard(hash).read();
        let Some(e) = shard.find(hash, |e| e.key == *key) else {
            return Lookup::Fetch(None);
        };
        match &e.value {
            Stored::Value(v) if now < e.expiry => {
                let early = now >= e.window && self.starts_refresh(e, now);
                Lookup::Hit(v.clone(), early.then_some(e.stale_until))
            }
            Stored::Value(v) if now < e.stale_until => match e.retry_at {
                Some(t) if now < t => Lookup::Stale(v.clone()),
                // In outage: one reader starts the retry, every read gets the value.
                Some(_) if e.refreshing.swap(true, Ordering::AcqRel) => Lookup::Stale(v.clone()),
                Some(_) => Lookup::Retry((v.clone(), e.stale_until)),
                None => Lookup::Fetch(Some((v.clone(), e.stale_until))),
            },
            Stored::Failed(f) if now < e.expiry => Lookup::Failed(f.clone()),
            _ => Lookup::Fetch(None),
        }
    }

    /// XFetch for a read at `now` within the window of fresh entry `e`: exactly one reader
    /// sets the entry's refresh flag.
    #[inline(never)]
    fn starts_refresh(&self, e: &Entry<K, R>, now: Instant) -> bool {
        let s = &self.settings;
        e.retry_at.is_none_or(|t| now >= t)
            && !e.refreshing.load(Ordering::Relaxed)
            && xfetch(now, e.expiry, e.delta, s.beta, &s.random)
            && !e.refreshing.swap(true, Ordering::AcqRel)
    }

    /// Classifies an upstream result and computes its TTL (user code: run it while the
    /// caller still holds the key, so that a panic here still clears the refresh flag).
    pub(crate) fn judge(&self, res: &Shared<R>) -> Verdict {
        let success = matches!(
            self.classifier.classify(res.as_ref().map_err(|e| &**e)),
            Outcome::Success
        );
        let ttl = match res {
            Ok(r) if success => self.ttl.ttl(r).filter(|t| !t.is_zero()),
            _ => None,
        };
        let max = self.settings.max_staleness;
        let stale_for = match (res, &self.staleness, ttl) {
            (Ok(r), Some(f), Some(_)) => f(r).map_or(max, |d| d.min(max)),
            _ => max,
        };
        Verdict {
            success,
            ttl,
            stale_for,
        }
    }

    /// Records the result of an upstream computation for `key` that took `delta`.
    pub(crate) fn finish(&self, key: K, res: &Shared<R>, verdict: &Verdict, delta: Duration) {
        let now = Instant::now();
        if !verdict.success {
            return self.failed(key, res, now, Failure::Failed);
        }
        if let Some(h) = &self.instruments.recompute {
            h.record(delta.as_secs_f64());
        }
        let hash = self.hasher.hash_one(&key);
        let mut shard = self.shard(hash).write();
        let (Some(ttl), Ok(value)) = (verdict.ttl, res) else {
            if let Some(e) = shard.find_mut(hash, |e| e.key == key) {
                e.refreshing.store(false, Ordering::Relaxed);
            }
            return;
        };
        let expiry = later(now, ttl);
        let entry = Entry {
            hash,
            key,
            value: Stored::Value(value.clone()),
            expiry,
            window: window_start(now, expiry, delta, self.settings.beta),
            stale_until: later(expiry, verdict.stale_for),
            delta,
            refreshing: AtomicBool::new(false),
            retry_at: None,
        };
        self.put(shard, entry);
    }

    /// A failed computation: the failure is counted, the stored value kept (and, while it
    /// may be served, its key backs off); with a negative TTL, a key with no value left to
    /// serve remembers the failure.
    pub(crate) fn failed(&self, key: K, res: &Shared<R>, now: Instant, how: Failure) {
        self.instruments.refresh_failed(how);
        let s = &self.settings;
        let until = s.negative_ttl.map(|ttl| later(now, ttl));
        let hash = self.hasher.hash_one(&key);
        let mut shard = self.shard(hash).write();
        if let Some(e) = shard.find_mut(hash, |e| e.key == key) {
            e.refreshing.store(false, Ordering::Relaxed);
            e.retry_at = Some(later(now, s.stale_retry_interval));
            let servable = matches!(e.value, Stored::Value(_)) && now < e.stale_until;
            if let (false, Some(until)) = (servable, until) {
                e.value = Stored::Failed(res.clone());
                (e.expiry, e.window, e.stale_until) = (until, until, until);
            }
            return;
        }
        let Some(until) = until else { return };
        let entry = Entry {
            hash,
            key,
            value: Stored::Failed(res.clone()),
            expiry: until,
            window: until,
            stale_until: until,
            delta: Duration::ZERO,
            refreshing: AtomicBool::new(false),
            retry_at: None,
        };
        self.put(shard, entry);
    }

    /// Stores `entry` in its shard (locked), replacing the entry of its key or, in a full
    /// shard, evicting the entry that expires first.
    fn put(&self, mut shard: RwLockWriteGuard<'_, HashTable<Entry<K, R>>>, entry: Entry<K, R>) {
        let hash = entry.hash;
        if let Some(e) = shard.find_mut(hash, |e| e.key == entry.key) {
            *e = entry;
            return;
        }
        let mut added = 1;
        if shard.len() >= self.per_shard {
            // Evict the entry that expires first (an expired one, when there is one).
            let victim = shard.iter().map(|e| (e.expiry, e.hash)).min_by_key(|v| v.0);
            if let Some((expiry, h)) = victim {
                if let Ok(found) = shard.find_entry(h, |e| e.expiry == expiry && e.hash == h) {
                    found.remove();
                    added = 0;
                }
            }
        }
        shard.insert_unique(hash, entry, |e| e.hash);
        drop(shard);
        if added != 0 {
            self.instruments.entries(added);
        }
    }

    /// Clears the refresh flag of `key`'s entry: a refresh that ended without recording a
    /// result (its upstream call panicked, or it was dropped unfinished).
    pub(crate) fn end_refresh(&self, key: &K) {
        let hash = self.hasher.hash_one(key);
        if let Some(e) = self.shard(hash).write().find_mut(hash, |e| e.key == *key) {
            e.refreshing.store(false, Ordering::Relaxed);
        }
    }

    /// Entries held now (locks each shard in turn; not for the hot path).
    #[allow(dead_code)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.read().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the seeded default source, the per-read refresh frequency at remaining time `r`
    /// matches `exp(-r / (beta * delta))` within 5 binomial standard deviations
    /// (`5 * sqrt(p (1 - p) / n)`, n = 20,000 reads per point; a false failure has
    /// probability below 1e-6 per point).
    #[test]
    fn refresh_frequency_matches_exp_minus_r_over_beta_delta() {
        let delta = Duration::from_secs(2);
        let expiry = Instant::now() + Duration::from_secs(100);
        let n = 20_000u32;
        for beta in [1.0, 2.0] {
            let random = splitmix(42);
            for r_ms in [250u64, 1_000, 2_000, 4_000, 8_000] {
                let now = expiry - Duration::from_millis(r_ms);
                let hits = (0..n)
                    .filter(|_| xfetch(now, expiry, delta, beta, &random))
                    .count() as f64;
                let p = (-(r_ms as f64 / 1000.0) / (beta * 2.0)).exp();
                let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt();
                let freq = hits / n as f64;
                assert!(
                    (freq - p).abs() <= tol,
                    "beta {beta}, r {r_ms} ms: {freq} vs {p} ± {tol}"
                );
            }
        }
    }

    #[test]
    fn u_is_in_the_half_open_unit_interval_and_seeded_sources_repeat() {
        let (a, b) = (splitmix(7), splitmix(7));
        for _ in 0..10_000 {
            let u = a();
            assert!(u > 0.0 && u <= 1.0);
            assert_eq!(u.to_bits(), b().to_bits());
        }
    }

    /// The precomputed window never skips a read that some `u` could refresh: with the
    /// smallest positive `u` (-ln u = 744.4), a read 744 * beta * delta before expiry
    /// refreshes, and it lies inside the window; 746 * beta * delta before, nothing can, and
    /// the window opens about there.
    #[test]
    fn the_window_holds_every_read_that_could_refresh() {
        let tiny: RandomFn = Arc::new(|| f64::from_bits(1));
        let stored = Instant::now();
        let delta = Duration::from_millis(1_500);
        for beta in [0.001, 1.0, 3.0] {
            let scale = delta.mul_f64(beta);
            let expiry = stored + scale * 1_000;
            let window = window_start(stored, expiry, delta, beta);
            let could = expiry - scale * 744;
            assert!(window <= could, "beta {beta}");
            assert!(xfetch(could, expiry, delta, beta, &tiny), "beta {beta}");
            let never = expiry - scale * 746;
            assert!(!xfetch(never, expiry, delta, beta, &tiny), "beta {beta}");
            assert!(
                window > expiry - scale * 747,
                "beta {beta}: not needlessly early"
            );
        }
        // A window longer than the entry's life opens before it was stored: a read on
        // another runtime's clock, earlier, still runs XFetch.
        let expiry = stored + Duration::from_secs(10);
        assert_eq!(
            window_start(stored, expiry, delta, 1.0),
            expiry - delta * 746
        );
        // Past the clock's range: before any instant a read can have here.
        assert!(window_start(stored, expiry, delta, f64::MAX) < stored);
        assert_eq!(window_start(stored, expiry, Duration::ZERO, 1.0), expiry);
    }

    #[test]
    fn far_from_expiry_or_zero_delta_draws_nothing() {
        let drawn = Arc::new(AtomicU64::new(0));
        let d = drawn.clone();
        let random: RandomFn = Arc::new(move || {
            d.fetch_add(1, Ordering::Relaxed);
            f64::MIN_POSITIVE
        });
        let expiry = Instant::now() + Duration::from_secs(1_000);
        let now = Instant::now();
        assert!(!xfetch(now, expiry, Duration::from_secs(1), 1.0, &random));
        assert!(!xfetch(now, expiry, Duration::ZERO, 1.0, &random));
        assert_eq!(drawn.load(Ordering::Relaxed), 0);
        assert!(xfetch(now, expiry, Duration::from_secs(2), 1.0, &random));
        assert_eq!(drawn.load(Ordering::Relaxed), 1);
    }
}
