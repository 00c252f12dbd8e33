//! The in-flight table.

use std::any::Any;
use std::future::Future;
use std::hash::{Hash, RandomState};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};

use super::join::{Join, JoinState};
use super::slot::Me;
use super::slot::Slot;
use super::{End, Hooks, Stats};
use crate::clock::Instant;

/// One key in flight.
pub(super) struct Entry<K, O, T> {
    pub(super) hash: u64,
    /// Tells this call from a later one for the same key (unique per shard while in flight).
    pub(super) id: u64,
    pub(super) key: K,
    /// Made by the first follower; `None` while the leader is alone.
    pub(super) slot: Option<Arc<Slot<O, T>>>,
    pub(super) followers: u64,
}

pub(super) struct ShardState<K, O, T> {
    pub(super) map: HashTable<Entry<K, O, T>>,
    pub(super) next_id: u64,
    pub(super) stats: Stats,
}

impl<K, O, T> ShardState<K, O, T> {
    /// Removes the entry `(hash, id)` if present, counting how the call ended.
    pub(super) fn remove(&mut self, hash: u64, id: u64, end: End) -> Option<Entry<K, O, T>> {
        let found = self.map.find_entry(hash, |e| e.id == id).ok()?;
        let (entry, _) = found.remove();
        match end {
            End::Completed => {}
            End::Panicked => self.stats.panics += 1,
            End::Abandoned => self.stats.abandoned += 1,
        }
        Some(entry)
    }
}

/// One shard of the table, alone on its cache lines.
#[repr(align(128))]
struct Shard<K, O, T>(Mutex<ShardState<K, O, T>>);

/// The in-flight table: at most one shared call per key at any time.
///
/// Sharded by the key's hash; each shard is a `hashbrown::HashTable` under a
/// `parking_lot::Mutex` held only to find, insert or remove an entry (never while a future
/// is polled or a waker is woken). Entries store their hash and an id, so removal needs
/// neither the key nor a second hash.
pub(crate) struct Table<K, O, T, H> {
    shards: Box<[Shard<K, O, T>]>,
    mask: usize,
    pub(super) hasher: RandomState,
    pub(super) hooks: H,
}

impl<K, O, T, H> std::fmt::Debug for Table<K, O, T, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl<K, O, T, H> Table<K, O, T, H> {
    /// The owner's hooks.
    pub(crate) fn hooks(&self) -> &H {
        &self.hooks
    }

    #[inline]
    pub(super) fn shard(&self, hash: u64) -> MutexGuard<'_, ShardState<K, O, T>> {
        // hashbrown uses the low bits (bucket) and the top 7 bits (tag); take the shard from
        // the middle.
        self.shards[(hash >> 32) as usize & self.mask].0.lock()
    }

    /// Releases one attachment of a running call that has a slot; returns the entry when
    /// this was the last attachment (the entry is then removed: the call is abandoned).
    pub(super) fn release(&self, slot: &Slot<O, T>, hash: u64, id: u64) -> Option<Entry<K, O, T>> {
        // Not the last: decrement without the shard lock.
        let mut n = slot.attached.load(Ordering::Acquire);
        while n > 1 {
            match slot
                .attached
                .compare_exchange_weak(n, n - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return None,
                Err(now) => n = now,
            }
        }
        // Maybe the last: decide, and remove the entry, under the shard lock, where
        // followers attach.
        let mut shard = self.shard(hash);
        if slot.attached.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        shard.remove(hash, id, End::Abandoned)
    }

    /// The table's counts, summed over its shards (locks each shard in turn; not for the
    /// hot path).
    pub(crate) fn stats(&self) -> Stats {
        let mut total = Stats::default();
        for s in self.shards.iter() {
            let st = s.0.lock();
            total += st.stats;
            total.in_flight += st.map.len() as u64;
        }
        total
    }
}

impl<K, O, T, H> Table<K, O, T, H>
where
    K: Hash + Eq + Send + 'static,
    O: Send + 'static,
    T: Clone + Send + Sync + 'static,
    H: Hooks<O, T>,
{
    /// An empty table with four shards per available core (a power of two, at most 1024).
    pub(crate) fn new(hooks: H) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = (cores * 4).next_power_of_two().clamp(4, 1024);
        let shards = (0..n)
            .map(|_| {
                Shard(Mutex::new(ShardState {
                    map: HashTable::new(),
                    next_id: 0,
                    stats: Stats::default(),
                }))
            })
            .collect();
        Table {
            shards,
            mask: n - 1,
            hasher: RandomState::new(),
            hooks,
        }
    }

    /// A caller's share of the call for `key`. Nothing happens until it is first polled:
    /// then it attaches to the call in flight for `key` (as a follower, dropping `fut`), or
    /// starts one with `fut` (as the leader). A share dropped unpolled never joined.
    pub(crate) fn join<F>(self: &Arc<Self>, key: K, fut: F) -> Join<K, F, O, T, H>
    where
        F: Future<Output = O> + Send + 'static,
    {
        Join {
            table: self.clone(),
            state: JoinState::Init { key, fut },
            hash: 0,
            id: 0,
            me: Me::default(),
            resume_panics: true,
        }
    }

    /// The detached mode: joins the call for `key` (starting it with `fut` if none is in
    /// flight) on behalf of nobody. A task spawned on the current tokio runtime stays
    /// attached until the call ends or `deadline` passes (then it detaches; the call goes on
    /// while other callers remain attached, and is dropped otherwise). A panic of the shared
    /// future is caught and ends the call like any panic; it does not unwind the task.
    ///
    /// A `deadline` already reached (now or earlier, on tokio's clock) when the task first
    /// runs joins nothing: `fut` is dropped unpolled, and no call starts. Checked here too,
    /// so that such a call is not even handed to a task.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    #[allow(dead_code)] // used by the response cache and the tests
    pub(crate) fn spawn_detached<F>(
        self: &Arc<Self>,
        key: K,
        fut: F,
        deadline: Option<Instant>,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = O> + Send + 'static,
    {
        if deadline.is_some_and(|d| d <= Instant::now()) {
            drop((key, fut));
            return tokio::spawn(std::future::ready(()));
        }
        let mut join = self.join(key, fut);
        join.resume_panics = false;
        tokio::spawn(async move {
            match deadline {
                // `timeout_at` polls its future before looking at the clock: look first.
                Some(d) if d <= Instant::now() => drop(join),
                Some(d) => drop(tokio::time::timeout_at(d, join).await),
                None => drop(join.await),
            }
        })
    }
}

/// A table of any key and value type, as stored by a layer that serves several services.
pub(crate) trait AnyTable: Send + Sync + 'static {
    /// The table's counts.
    fn stats(&self) -> Stats;
    /// `self` as `Any`, to downcast to the concrete table.
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<K, O, T, H> AnyTable for Table<K, O, T, H>
where
    K: Hash + Eq + Send + 'static,
    O: Send + 'static,
    T: Clone + Send + Sync + 'static,
    H: Hooks<O, T>,
{
    fn stats(&self) -> Stats {
        Table::stats(self)
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}
