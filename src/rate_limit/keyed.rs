//! The keyed limiter's state: one GCRA cell per key in a sharded concurrent map, swept of
//! keys that have fully recovered. See the [module docs](super#keyed-limiter).

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::future::WaiterCell;
use super::gcra::Cell;
use super::layer::{Core, Decision};

/// Below this many keys, growth alone does not trigger a sweep.
const MIN_GROWTH_SWEEP: usize = 1_024;

/// A sweep run because the map is full runs at most once per `sweep_interval / 8`.
const FULL_SWEEP_DIVISOR: u64 = 8;

/// Below this capacity, a sweep does not shrink the map.
const MIN_SHRINK_CAPACITY: usize = 4_096;

/// The keys of one keyed limiter.
pub(super) struct Keys<K, H> {
    map: DashMap<K, Arc<Cell>, H>,
    /// Keys in `map`: incremented on insert, decremented on removal, each under the key's
    /// shard write lock.
    count: AtomicUsize,
    max_keys: usize,
    /// Nanoseconds between scheduled sweeps.
    interval: u64,
    /// When (ns since base) the next scheduled sweep is due.
    next_sweep: AtomicU64,
    /// The key count at which an insert triggers a sweep (twice the count the last sweep
    /// left, at least [`MIN_GROWTH_SWEEP`]).
    grow_at: AtomicUsize,
    /// The earliest time (ns since base) at which a new key that finds the map full may run
    /// a sweep (see [`FULL_SWEEP_DIVISOR`]).
    next_full_sweep: AtomicU64,
}

/// Sweeping, object-safe so that the (non-generic) handle can do it.
pub(super) trait Sweep: Send + Sync {
    /// Removes every key whose TAT is at or before `now` (fully recovered), updates the keys
    /// gauge, and returns the number of keys left.
    fn sweep(&self, core: &Core, now: u64) -> usize;
}

impl<K, H> Sweep for Keys<K, H>
where
    K: Hash + Eq + Send + Sync + 'static,
    H: BuildHasher + Clone + Send + Sync + 'static,
{
    fn sweep(&self, core: &Core, now: u64) -> usize {
        // `retain` holds each shard's write lock while it visits that shard, so no call is
        // between its lookup and its CAS on a cell being removed: a cell is removed only if
        // its TAT is <= now under that lock, and then it is equivalent to a fresh one.
        self.map.retain(|_, cell| {
            let keep = cell.tat() > now;
            if !keep {
                self.count.fetch_sub(1, Ordering::AcqRel);
            }
            keep
        });
        let left = self.publish_count(core);
        self.grow_at.store(
            left.saturating_mul(2).max(MIN_GROWTH_SWEEP),
            Ordering::Relaxed,
        );
        // `retain` keeps the capacity of the peak: give it back when the keys left would fit
        // in a quarter of it (regrowing costs amortized O(1) per insert, as any growth).
        let capacity = self.map.capacity();
        if capacity >= MIN_SHRINK_CAPACITY && left < capacity / 4 {
            self.map.shrink_to_fit();
        }
        left
    }
}

impl<K, H> Keys<K, H>
where
    K: Hash + Eq + Send + Sync + 'static,
    H: BuildHasher + Clone + Send + Sync + 'static,
{
    pub(super) fn new(max_keys: Option<usize>, interval: u64, hasher: H) -> Self {
        Keys {
            map: DashMap::with_hasher(hasher),
            count: AtomicUsize::new(0),
            max_keys: max_keys.unwrap_or(usize::MAX),
            interval,
            next_sweep: AtomicU64::new(interval),
            grow_at: AtomicUsize::new(MIN_GROWTH_SWEEP),
            next_full_sweep: AtomicU64::new(0),
        }
    }

    /// Sets the keys gauge to the key count, and again while the count changed meanwhile, so
    /// that the gauge is never left at a value older than another thread's: every change of
    /// the count is followed by this, and the last `set` is of a value the count had after
    /// every change whose own `set` came earlier.
    fn publish_count(&self, core: &Core) -> usize {
        let mut count = self.count.load(Ordering::Acquire);
        loop {
            core.metrics.keys.set(count as f64);
            let now = self.count.load(Ordering::Acquire);
            if now == count {
                return count;
            }
            count = now;
        }
    }

    /// Decides a call with `key` at `t` (ns since base).
    #[inline]
    pub(super) fn decide(&self, core: &Core, key: K, t: u64) -> Decision {
        self.maybe_sweep(core, t);
        if let Some(cell) = self.map.get(&key) {
            // Tracked key: a shard read lock, one CAS, no allocation.
            let r = cell.reserve(&core.gcra, t);
            return Decision::from_reserve(r, || WaiterCell::Keyed(Arc::clone(&cell)));
        }
        self.decide_new(core, key, t, true)
    }

    /// The first call of a key not tracked (or tracked by a concurrent caller meanwhile).
    /// When the map is full and `may_sweep`, runs a sweep (see [`Self::full_sweep`]) and
    /// tries once more.
    #[cold]
    #[inline(never)]
    fn decide_new(&self, core: &Core, key: K, t: u64, may_sweep: bool) -> Decision {
        let decision = match self.map.entry(key) {
            Entry::Occupied(o) => {
                let cell = o.get();
                let r = cell.reserve(&core.gcra, t);
                return Decision::from_reserve(r, || WaiterCell::Keyed(Arc::clone(cell)));
            }
            Entry::Vacant(v) => {
                let admitted = self
                    .count
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.max_keys).then_some(n + 1)
                    })
                    .is_ok();
                if !admitted {
                    // Release the shard lock (a sweep takes every shard's) before sweeping.
                    let key = v.into_key();
                    if may_sweep && self.full_sweep(core, t) {
                        return self.decide_new(core, key, t, false);
                    }
                    return Decision::TooManyKeys;
                }
                let cell = Arc::new(Cell::default());
                // A fresh cell is fully recovered: the call conforms at once.
                let r = cell.reserve(&core.gcra, t);
                let d = Decision::from_reserve(r, || WaiterCell::Keyed(Arc::clone(&cell)));
                v.insert(cell);
                d
            }
        };
        // The shard lock is released here.
        let count = self.publish_count(core);
        if count >= self.grow_at.load(Ordering::Relaxed) {
            self.sweep(core, t);
        }
        decision
    }

    /// A sweep for a new key that found the map full, so that keys that have recovered free
    /// their places at once rather than at the next scheduled sweep. At most one per
    /// `sweep_interval / 8` (one caller wins it; the others are rejected without waiting),
    /// so that a flood of new keys cannot make every call sweep. Returns whether it ran.
    #[cold]
    #[inline(never)]
    fn full_sweep(&self, core: &Core, t: u64) -> bool {
        let due = self.next_full_sweep.load(Ordering::Relaxed);
        if t < due {
            return false;
        }
        let next = t.saturating_add((self.interval / FULL_SWEEP_DIVISOR).max(1));
        if self
            .next_full_sweep
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.sweep(core, t);
        true
    }

    /// Runs the scheduled sweep if it is due at `t`; one caller wins it.
    #[inline]
    fn maybe_sweep(&self, core: &Core, t: u64) {
        let due = self.next_sweep.load(Ordering::Relaxed);
        if t >= due {
            self.scheduled_sweep(core, t, due);
        }
    }

    #[cold]
    #[inline(never)]
    fn scheduled_sweep(&self, core: &Core, t: u64, due: u64) {
        let next = t.saturating_add(self.interval);
        if self
            .next_sweep
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.sweep(core, t);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::time::Duration;

    use tower::{Layer, Service, ServiceExt, service_fn};

    use crate::rate_limit::RateLimitLayer;

    /// Memory follows the keys: a sweep that leaves under a quarter of the map's capacity
    /// shrinks it, instead of keeping the capacity of the peak key count forever.
    #[tokio::test(start_paused = true)]
    async fn a_sweep_that_empties_most_of_the_map_shrinks_it() {
        let layer = RateLimitLayer::builder()
            .rate(1, Duration::from_millis(10))
            .burst(1)
            .keyed(|x: &u32| *x)
            .build()
            .unwrap();
        let mut svc = layer.layer(service_fn(|x: u32| async move { Ok::<_, String>(x) }));
        for k in 0..20_000 {
            svc.ready().await.unwrap().call(k).await.unwrap();
        }
        let peak = layer.keys.map.capacity();
        assert!(peak >= 20_000, "{peak}");
        tokio::time::advance(Duration::from_millis(10)).await;
        svc.ready().await.unwrap().call(1_000_000).await.unwrap();
        assert_eq!(layer.handle().tracked_keys(), 1);
        let after = layer.keys.map.capacity();
        assert!(after < super::MIN_SHRINK_CAPACITY, "{after} (peak {peak})");
    }
}
