//! The bounded, sharded store of cached entries.

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use parking_lot::{RwLock, RwLockWriteGuard};

use crate::classify::{Classify, Outcome};
use crate::clock::Instant;
use crate::error::BoxError;

pub(crate) use super::instruments::{
    EARLY, ENTRIES, ERRORS, FETCHES, Failure, HIT, Instruments, MISS, NEGATIVE, PASSED, STALE,
};
pub(crate) use super::xfetch::{RandomFn, later, splitmix, window_start, xfetch};

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
    /// Shared so that a read holds the shard lock only to clone the `Arc`: the user's
    /// `Clone` of the value runs after the lock is released.
    value: Arc<Stored<R>>,
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
    /// CLOCK's reference bit: read since the eviction hand last passed. Set by reads only
    /// when clear, so a hot entry's cache line is written once per pass of the hand.
    referenced: AtomicBool,
    /// After a failure: no upstream call for this key before this instant.
    retry_at: Option<Instant>,
}

/// A value a failed fetch may serve instead: the stored value, and the instant from which it
/// may no longer be served.
pub(crate) type Fallback<R> = (R, Instant);

/// The refresh flag of an entry (an early refresh or a retry in flight), set by the read
/// that holds this, for the refresh it is about to start: cleared when dropped, so that user
/// code that panics before that refresh exists (the value's `Clone` for this read, the inner
/// service's, an event listener) leaves no flag behind. [`hand_over`](Self::hand_over) it
/// once the refresh exists: the refresh owns the flag from then on (see [`Fill`]).
///
/// [`Fill`]: super::fill::Fill
#[must_use]
pub(crate) struct Flag<'a, K, R> {
    shard: &'a RwLock<Table<K, R>>,
    hash: u64,
    /// The entry's value when the flag was set: the entry is found by it (a pointer
    /// comparison, no user code), and a flag set since on a newer entry of the key is left
    /// alone.
    value: Arc<Stored<R>>,
    armed: bool,
}

impl<K, R> Flag<'_, K, R> {
    /// The refresh that owns the flag from now on exists.
    pub(crate) fn hand_over(mut self) {
        self.armed = false;
    }
}

impl<K, R> Drop for Flag<'_, K, R> {
    fn drop(&mut self) {
        if self.armed {
            let shard = self.shard.read();
            let found = shard
                .entries
                .find(self.hash, |e| Arc::ptr_eq(&e.value, &self.value));
            if let Some(e) = found {
                e.refreshing.store(false, Ordering::Relaxed);
            }
        }
    }
}

/// What a read found.
pub(crate) enum Lookup<'a, K, R> {
    /// A fresh value; when this read starts an early refresh, the instant from which the
    /// value may no longer be served (its expiry plus the maximum staleness) and the
    /// entry's refresh flag, set by this read.
    Hit(R, Option<(Instant, Flag<'a, K, R>)>),
    /// An expired value within the maximum staleness, served while backing off.
    Stale(R),
    /// A remembered failure.
    Failed(Shared<R>),
    /// Nothing usable: fetch, falling back on the expired value when there is one.
    Fetch(Option<Fallback<R>>),
    /// An expired value within its maximum staleness whose key is in outage (its last fetch
    /// failed) and whose back-off is over: this read set the refresh flag (given here) and
    /// starts the retry in the background; it is served the value, like every read while
    /// the retry runs.
    Retry(Fallback<R>, Flag<'a, K, R>),
}

/// What a read found, decided under the shard lock; the value is cloned after it.
enum Found {
    /// Fresh, no early refresh.
    Hit,
    /// Fresh, within its XFetch window: expiry, delta, stale-until.
    Window(Instant, Duration, Instant),
    /// Expired, servable, backing off or a retry in flight.
    Stale,
    /// Expired, servable, in outage, back-off over: this read set the flag and retries.
    Retry(Instant),
    /// Expired, servable, not in outage: fetch, falling back on the value.
    Fallback(Instant),
    Failed,
    /// Nothing usable.
    Gone,
}

/// One shard's entries and its CLOCK hand.
struct Table<K, R> {
    entries: HashTable<Entry<K, R>>,
    /// The bucket index the eviction hand points at (taken modulo the bucket count, so
    /// a resized table only moves the hand).
    hand: usize,
}

impl<K, R> Table<K, R> {
    /// CLOCK (Corbató, 1968): from the hand, removes the first entry that can no longer be
    /// served at `now` or that was not read since the hand last passed, clearing the
    /// reference bit of each read entry it passes (its second chance). Every entry passed
    /// without removal had its bit set by a read since the last pass, so the work is paid
    /// for by reads: amortised O(1) per insert (plus empty buckets, at most about one per
    /// entry at hashbrown's load factor). `None` when the table is empty.
    fn evict(&mut self, now: Instant) -> Option<Entry<K, R>> {
        if self.entries.is_empty() {
            return None;
        }
        let buckets = self.entries.num_buckets();
        // After one lap every bit is clear, so a second lap always finds a victim.
        for _ in 0..=2 * buckets {
            let i = self.hand % buckets;
            self.hand = i + 1;
            let Some(e) = self.entries.get_bucket_mut(i) else {
                continue;
            };
            if now < e.stale_until && std::mem::take(e.referenced.get_mut()) {
                continue;
            }
            return self.entries.get_bucket_entry(i).ok().map(|e| e.remove().0);
        }
        None
    }
}

#[repr(align(128))]
struct Shard<K, R>(RwLock<Table<K, R>>);

/// Shards hold at least this many entries on average (fewer shards for small capacities),
/// so that CLOCK in each shard sees enough entries to tell hot from cold.
const MIN_PER_SHARD: usize = 64;

/// The store of one layer for one key type, response type, classifier and TTL policy.
pub(crate) struct Store<K, R, C, T> {
    shards: Box<[Shard<K, R>]>,
    mask: usize,
    /// Entries held or being inserted; bounded by `settings.max_entries` (written on
    /// inserts of new keys only).
    count: AtomicUsize,
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

/// What the classifier and the TTL policy said of an upstream result, and what of it the
/// store keeps.
pub(crate) struct Verdict<R> {
    success: bool,
    /// The TTL to store it with (a success with a TTL > 0 only).
    ttl: Option<Duration>,
    /// How long past its expiry it may be served: the configured maximum staleness, or the
    /// response's own allowance when smaller.
    stale_for: Duration,
    /// What the store keeps, cloned from the result: the value to store (a success with a
    /// TTL), or the failure to remember (a failure, with a negative TTL).
    kept: Option<Arc<Stored<R>>>,
}

impl<R> Verdict<R> {
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
        while n > 1 && settings.max_entries / n < MIN_PER_SHARD {
            n /= 2;
        }
        Store {
            shards: (0..n)
                .map(|_| {
                    Shard(RwLock::new(Table {
                        entries: HashTable::new(),
                        hand: 0,
                    }))
                })
                .collect(),
            mask: n - 1,
            count: AtomicUsize::new(0),
            hasher: RandomState::default(),
            settings,
            instruments,
            classifier,
            ttl,
            staleness: None,
        }
    }

    #[inline]
    fn shard_index(&self, hash: u64) -> usize {
        (hash >> 32) as usize & self.mask
    }

    #[inline]
    fn shard(&self, hash: u64) -> &RwLock<Table<K, R>> {
        &self.shards[self.shard_index(hash)].0
    }

    /// A read at `now`: under the shard read lock, the entry is found, its reference bit
    /// set (when clear) and its `Arc` cloned; the value is cloned after the lock is
    /// released. A fresh entry before its XFetch window costs one comparison beyond the
    /// lookup (its window never opens after its expiry).
    #[inline]
    pub(crate) fn lookup(&self, key: &K, now: Instant) -> Lookup<'_, K, R> {
        let hash = self.hasher.hash_one(key);
        let (value, found) = {
            let shard = self.shard(hash).read();
            let Some(e) = shard.entries.find(hash, |e| e.key == *key) else {
                return Lookup::Fetch(None);
            };
            if !e.referenced.load(Ordering::Relaxed) {
                e.referenced.store(true, Ordering::Relaxed);
            }
            // Before its window (never after its expiry), a value is a plain hit.
            let found = if now < e.window {
                Found::Hit
            } else {
                self.found(e, now)
            };
            (e.value.clone(), found)
        };
        if let (Stored::Value(v), Found::Hit) = (&*value, &found) {
            return Lookup::Hit(v.clone(), None);
        }
        self.found_late(key, hash, value, found, now)
    }

    /// What a read at `now` found in `e`, at or after its window (shard lock held).
    #[inline(never)]
    fn found(&self, e: &Entry<K, R>, now: Instant) -> Found {
        match *e.value {
            Stored::Value(_) if now < e.expiry => {
                if self.may_refresh(e, now) {
                    Found::Window(e.expiry, e.delta, e.stale_until)
                } else {
                    Found::Hit
                }
            }
            Stored::Value(_) if now < e.stale_until => match e.retry_at {
                Some(t) if now < t => Found::Stale,
                // In outage: one reader starts the retry, every read gets the value.
                Some(_) if e.refreshing.swap(true, Ordering::AcqRel) => Found::Stale,
                Some(_) => Found::Retry(e.stale_until),
                // An early refresh still in flight past expiry: the value is served at
                // once rather than making the read wait for the refresh.
                None if e.refreshing.load(Ordering::Relaxed) => Found::Stale,
                None => Found::Fallback(e.stale_until),
            },
            Stored::Failed(_) if now < e.expiry => Found::Failed,
            _ => Found::Gone,
        }
    }

    /// The lookup of a read that is not a plain hit, after the shard lock is released:
    /// XFetch's draw, stale values, remembered failures.
    #[inline(never)]
    fn found_late(
        &self,
        key: &K,
        hash: u64,
        value: Arc<Stored<R>>,
        found: Found,
        now: Instant,
    ) -> Lookup<'_, K, R> {
        match (&*value, found) {
            (_, Found::Gone) => Lookup::Fetch(None),
            (Stored::Failed(f), _) => Lookup::Failed(f.clone()),
            (Stored::Value(v), Found::Window(expiry, delta, until)) => {
                if !self.starts_refresh(key, hash, &value, now, expiry, delta) {
                    return Lookup::Hit(v.clone(), None);
                }
                self.flagged(hash, value)
                    .map_or(Lookup::Fetch(None), |(v, f)| {
                        Lookup::Hit(v, Some((until, f)))
                    })
            }
            (Stored::Value(v), Found::Hit) => Lookup::Hit(v.clone(), None),
            (Stored::Value(v), Found::Stale) => Lookup::Stale(v.clone()),
            (Stored::Value(_), Found::Retry(until)) => self
                .flagged(hash, value)
                .map_or(Lookup::Fetch(None), |(v, f)| Lookup::Retry((v, until), f)),
            (Stored::Value(v), Found::Fallback(until)) => Lookup::Fetch(Some((v.clone(), until))),
            (Stored::Value(_), Found::Failed) => Lookup::Fetch(None),
        }
    }

    /// The value of `value`'s entry, whose refresh flag this read has just set, and that
    /// flag: guarded before the value is cloned (user code), so that a panicking clone
    /// clears it. `None` (the flag cleared) for a remembered failure, which has no flag.
    fn flagged(&self, hash: u64, value: Arc<Stored<R>>) -> Option<(R, Flag<'_, K, R>)> {
        let flag = Flag {
            shard: self.shard(hash),
            hash,
            value,
            armed: true,
        };
        match &*flag.value {
            Stored::Value(v) => Some((v.clone(), flag)),
            Stored::Failed(_) => None,
        }
    }

    /// Whether a read at `now` within the XFetch window of fresh entry `e` may start an
    /// early refresh: none in flight, and not backing off.
    #[inline]
    fn may_refresh(&self, e: &Entry<K, R>, now: Instant) -> bool {
        e.retry_at.is_none_or(|t| now >= t) && !e.refreshing.load(Ordering::Relaxed)
    }

    /// XFetch for a read at `now` of `value` (expiring at `expiry`, with `delta`), run
    /// after the shard lock is released (the random source may be user code); when it
    /// says refresh, exactly one reader sets the flag of the entry, if it still holds
    /// `value`.
    fn starts_refresh(
        &self,
        key: &K,
        hash: u64,
        value: &Arc<Stored<R>>,
        now: Instant,
        expiry: Instant,
        delta: Duration,
    ) -> bool {
        let s = &self.settings;
        xfetch(now, expiry, delta, s.beta, &s.random) && {
            let shard = self.shard(hash).read();
            shard
                .entries
                .find(hash, |e| e.key == *key)
                .is_some_and(|e| {
                    Arc::ptr_eq(&e.value, value) && !e.refreshing.swap(true, Ordering::AcqRel)
                })
        }
    }

    /// Classifies an upstream result, computes its TTL and maximum staleness, and clones
    /// what the store keeps of it. All of it is user code (the classifier, the TTL and
    /// staleness functions, the value's `Clone`): run it while the caller still holds the
    /// key, so that a panic here is recorded as the computation's failure (which clears
    /// the refresh flag), and [`finish`](Self::finish) then runs none before the entry is
    /// in its new state.
    pub(crate) fn judge(&self, res: &Shared<R>) -> Verdict<R> {
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
        let kept = match (res, ttl) {
            (Ok(value), Some(_)) => Some(Arc::new(Stored::Value(value.clone()))),
            _ if !success => self.remember(res),
            _ => None,
        };
        Verdict {
            success,
            ttl,
            stale_for,
            kept,
        }
    }

    /// The failure `res` as a negative TTL remembers it (`None` without one). Clones a
    /// response the classifier rejected (user code); an error is shared, not cloned.
    fn remember(&self, res: &Shared<R>) -> Option<Arc<Stored<R>>> {
        (self.settings.negative_ttl)
            .is_some()
            .then(|| Arc::new(Stored::Failed(res.clone())))
    }

    /// Records the result of an upstream computation for `key` that took `delta`, as
    /// [judged](Self::judge).
    pub(crate) fn finish(&self, key: K, verdict: Verdict<R>, delta: Duration) {
        let now = Instant::now();
        if !verdict.success {
            return self.record_failure(key, verdict.kept, now, Failure::Failed);
        }
        if let Some(h) = &self.instruments.recompute {
            h.record(delta.as_secs_f64());
        }
        let hash = self.hasher.hash_one(&key);
        let (Some(ttl), Some(value)) = (verdict.ttl, verdict.kept) else {
            // A success that is not stored still ends an outage: the next read fetches.
            return self.end_outage(&key);
        };
        let expiry = later(now, ttl);
        let entry = Entry {
            hash,
            key,
            // Cloned by `judge`, before the lock is taken.
            value,
            expiry,
            window: window_start(now, expiry, delta, self.settings.beta),
            stale_until: later(expiry, verdict.stale_for),
            delta,
            refreshing: AtomicBool::new(false),
            referenced: AtomicBool::new(false),
            retry_at: None,
        };
        self.put(self.shard(hash).write(), entry, now);
    }

    /// A computation that failed with `res` (an error: a panic or a timeout, no user code
    /// to run), as [`record_failure`](Self::record_failure) records it.
    pub(crate) fn failed(&self, key: K, res: &Shared<R>, now: Instant, how: Failure) {
        self.record_failure(key, self.remember(res), now, how);
    }

    /// A failed computation: the stored value is kept (and, while it may be served, its key
    /// backs off); with a negative TTL, a key with no value left to serve remembers the
    /// failure (`remembered`, from [`remember`](Self::remember)). Then the failure is
    /// counted and announced: a panicking listener finds the entry in its new state, its
    /// refresh flag cleared.
    fn record_failure(
        &self,
        key: K,
        remembered: Option<Arc<Stored<R>>>,
        now: Instant,
        how: Failure,
    ) {
        let old = self.keep_failure(key, remembered, now);
        self.instruments.refresh_failed(how);
        // The replaced value is dropped (user code) last.
        drop(old);
    }

    /// The entry of `key` after a failure at `now` (see
    /// [`record_failure`](Self::record_failure)). Returns
    /// what the caller drops (user code) after the lock: the value a remembered failure
    /// replaced, or the failure not remembered because a value may still be served.
    fn keep_failure(
        &self,
        key: K,
        remembered: Option<Arc<Stored<R>>>,
        now: Instant,
    ) -> Option<Arc<Stored<R>>> {
        let s = &self.settings;
        let until = s.negative_ttl.map(|ttl| later(now, ttl));
        let hash = self.hasher.hash_one(&key);
        let mut shard = self.shard(hash).write();
        if let Some(e) = shard.entries.find_mut(hash, |e| e.key == key) {
            e.refreshing.store(false, Ordering::Relaxed);
            e.retry_at = Some(later(now, s.stale_retry_interval));
            let servable = matches!(*e.value, Stored::Value(_)) && now < e.stale_until;
            return match (servable, until, remembered) {
                (false, Some(until), Some(failed)) => {
                    (e.expiry, e.window, e.stale_until) = (until, until, until);
                    Some(std::mem::replace(&mut e.value, failed))
                }
                (_, _, unused) => unused,
            };
        }
        let (Some(until), Some(value)) = (until, remembered) else {
            return None;
        };
        let entry = Entry {
            hash,
            key,
            value,
            expiry: until,
            window: until,
            stale_until: until,
            delta: Duration::ZERO,
            refreshing: AtomicBool::new(false),
            referenced: AtomicBool::new(false),
            retry_at: None,
        };
        self.put(shard, entry, now);
        None
    }

    /// Stores `entry` in its shard (`shard`, write-locked by the caller), replacing the
    /// entry of its key; a new key beyond `max_entries`
    /// evicts one entry by CLOCK ([`Table::evict`]) from its own shard or, when that shard
    /// holds nothing else, from the next shard that holds an entry (one lock at a time).
    /// Replaced and evicted entries are dropped after the locks are released.
    fn put(&self, mut shard: RwLockWriteGuard<'_, Table<K, R>>, entry: Entry<K, R>, now: Instant) {
        let hash = entry.hash;
        if let Some(e) = shard.entries.find_mut(hash, |e| e.key == entry.key) {
            let old = std::mem::replace(e, entry);
            drop(shard);
            return drop(old);
        }
        let full = self.count.fetch_add(1, Ordering::Relaxed) >= self.settings.max_entries;
        let mut evicted = if full { shard.evict(now) } else { None };
        shard.entries.insert_unique(hash, entry, |e| e.hash);
        drop(shard);
        if full && evicted.is_none() {
            let own = self.shard_index(hash);
            evicted = (1..=self.shards.len())
                .find_map(|i| self.shards[(own + i) & self.mask].0.write().evict(now));
        }
        if evicted.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.instruments.entries(1);
        }
        drop(evicted);
    }

    /// Clears the refresh flag of `key`'s entry: a refresh that ended without recording a
    /// result (its upstream call panicked, or it was dropped unfinished).
    pub(crate) fn end_refresh(&self, key: &K) {
        let hash = self.hasher.hash_one(key);
        let shard = self.shard(hash).read();
        if let Some(e) = shard.entries.find(hash, |e| e.key == *key) {
            e.refreshing.store(false, Ordering::Relaxed);
        }
    }

    /// Clears the refresh flag and the back-off of `key`'s entry: its upstream answered
    /// with a success the TTL policy does not store.
    fn end_outage(&self, key: &K) {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash).write();
        if let Some(e) = shard.entries.find_mut(hash, |e| e.key == *key) {
            e.refreshing.store(false, Ordering::Relaxed);
            e.retry_at = None;
        }
    }
}
