//! The bounded, sharded store of cached entries, the XFetch decision and the random source.

use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram};
use hashbrown::HashTable;
use parking_lot::RwLock;
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

/// XFetch (Vattani, Chierichetti, Lowenstein, PVLDB 2015): whether a read at `now`, before
/// `expiry`, refreshes early: `now - delta * beta * ln(u) >= expiry`.
///
/// `u` is drawn only when some `u` in `(0, 1]` can trigger a refresh (`-ln(u) <= 745` for
/// every positive `f64`), so reads far from expiry cost no draw.
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
    if r > scale * 745.0 {
        return false;
    }
    let u = random();
    if u.is_nan() || u > 1.0 {
        return false;
    }
    if u <= 0.0 {
        return true;
    }
    -scale * u.ln() >= r
}

/// Metric handles, counts and listeners of one cache instance, registered at build time.
#[derive(Debug)]
pub(crate) struct Instruments {
    pub(crate) name: Arc<str>,
    /// By result: hit, miss, stale.
    pub(crate) lookups: [Counter; 3],
    pub(crate) early: Counter,
    pub(crate) errors: Counter,
    pub(crate) entries: Gauge,
    pub(crate) recompute: Option<Histogram>,
    pub(crate) events: Events,
    /// Snapshot counts: hits, misses, stale, early refreshes, refresh errors, entries.
    pub(crate) counts: [AtomicU64; 6],
}

pub(crate) const HIT: usize = 0;
pub(crate) const MISS: usize = 1;
pub(crate) const STALE: usize = 2;
pub(crate) const EARLY: usize = 3;
pub(crate) const ERRORS: usize = 4;
pub(crate) const ENTRIES: usize = 5;

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

    fn refresh_failed(&self) {
        self.errors.increment(1);
        self.counts[ERRORS].fetch_add(1, Ordering::Relaxed);
        self.events.emit(|| EventKind::RefreshFailed);
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

/// Settings shared by every store of a layer.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) beta: f64,
    pub(crate) max_staleness: Duration,
    pub(crate) stale_retry_interval: Duration,
    pub(crate) max_entries: usize,
    pub(crate) random: RandomFn,
}

/// One cached value.
pub(crate) struct Entry<K, R> {
    hash: u64,
    key: K,
    pub(crate) value: R,
    /// Stored-at plus TTL, on tokio's clock.
    pub(crate) expiry: Instant,
    /// Duration of the computation that produced `value`.
    pub(crate) delta: Duration,
    /// An early refresh of this entry is in flight.
    refreshing: AtomicBool,
    /// After a failure: no upstream call for this key before this instant.
    retry_at: Option<Instant>,
}

/// What a read found.
pub(crate) enum Lookup<R> {
    /// A fresh value; `true` when this read starts an early refresh.
    Hit(R, bool),
    /// An expired value within the maximum staleness, served while backing off.
    Stale(R),
    /// Nothing usable: fetch.
    Fetch,
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
}

/// How long a response may be stored.
pub trait TtlPolicy<Res>: Clone + Send + Sync + 'static {
    /// The TTL of `res`, or `None` to not store it.
    fn ttl(&self, res: &Res) -> Option<Duration>;
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
            hasher: RandomState::new(),
            settings,
            instruments,
            classifier,
            ttl,
        }
    }

    #[inline]
    fn shard(&self, hash: u64) -> &RwLock<HashTable<Entry<K, R>>> {
        &self.shards[(hash >> 32) as usize & self.mask].0
    }

    /// A read at `now` (shard read lock; clones the value).
    #[inline]
    pub(crate) fn lookup(&self, key: &K, now: Instant) -> Lookup<R> {
        let hash = self.hasher.hash_one(key);
        let shard = self.shard(hash).read();
        let Some(e) = shard.find(hash, |e| e.key == *key) else {
            return Lookup::Fetch;
        };
        let backing_off = e.retry_at.is_some_and(|t| now < t);
        if now < e.expiry {
            let s = &self.settings;
            let early = !backing_off
                && !e.refreshing.load(Ordering::Relaxed)
                && xfetch(now, e.expiry, e.delta, s.beta, &s.random)
                && !e.refreshing.swap(true, Ordering::AcqRel);
            return Lookup::Hit(e.value.clone(), early);
        }
        if backing_off && now < e.expiry + self.settings.max_staleness {
            return Lookup::Stale(e.value.clone());
        }
        Lookup::Fetch
    }

    /// The value of `key` if it expired no more than the maximum staleness before `now`.
    pub(crate) fn stale(&self, key: &K, now: Instant) -> Option<R> {
        let hash = self.hasher.hash_one(key);
        let shard = self.shard(hash).read();
        let e = shard.find(hash, |e| e.key == *key)?;
        (now < e.expiry + self.settings.max_staleness).then(|| e.value.clone())
    }

    /// Records the result of an upstream computation for `key` that took `delta`.
    pub(crate) fn finish(&self, key: K, res: &Result<R, BoxError>, delta: Duration) {
        let now = Instant::now();
        let ttl = match self.classifier.classify(res.as_ref()) {
            Outcome::Success => res.as_ref().ok().and_then(|r| self.ttl.ttl(r)),
            _ => {
                self.instruments.refresh_failed();
                let hash = self.hasher.hash_one(&key);
                let mut shard = self.shard(hash).write();
                if let Some(e) = shard.find_mut(hash, |e| e.key == key) {
                    e.refreshing.store(false, Ordering::Relaxed);
                    e.retry_at = Some(now + self.settings.stale_retry_interval);
                }
                return;
            }
        };
        if let Some(h) = &self.instruments.recompute {
            h.record(delta.as_secs_f64());
        }
        let hash = self.hasher.hash_one(&key);
        let mut shard = self.shard(hash).write();
        let (Some(ttl), Ok(value)) = (ttl.filter(|t| !t.is_zero()), res) else {
            if let Some(e) = shard.find_mut(hash, |e| e.key == key) {
                e.refreshing.store(false, Ordering::Relaxed);
            }
            return;
        };
        let entry = Entry {
            hash,
            key,
            value: value.clone(),
            expiry: now + ttl,
            delta,
            refreshing: AtomicBool::new(false),
            retry_at: None,
        };
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
