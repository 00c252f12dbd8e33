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
        let left = self.count.load(Ordering::Acquire);
        self.grow_at.store(
            left.saturating_mul(2).max(MIN_GROWTH_SWEEP),
            Ordering::Relaxed,
        );
        core.metrics.keys.set(left as f64);
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
        self.decide_new(core, key, t)
    }

    /// The first call of a key not tracked (or tracked by a concurrent caller meanwhile).
    #[cold]
    #[inline(never)]
    fn decide_new(&self, core: &Core, key: K, t: u64) -> Decision {
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
        let count = self.count.load(Ordering::Acquire);
        core.metrics.keys.set(count as f64);
        if count >= self.grow_at.load(Ordering::Relaxed) {
            self.sweep(core, t);
        }
        decision
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
