//! The coalescing core, independent of tower: an in-flight [`Table`] of shared calls keyed by
//! `K`, and [`Join`], one caller's share of a shared call.
//!
//! Used by the [`Coalesce`](super::Coalesce) service and by the response cache (which also
//! uses the [detached mode](Table::spawn_detached)). The design and the argument for its
//! correctness are in the [module docs](super#design).
//!
//! A shared call runs a future of output `O`; its owner's [`Hooks::complete`] turns that
//! output into the value `T` every caller receives (a clone each; the last caller gets the
//! original).

use std::any::Any;
use std::future::Future;
use std::hash::{BuildHasher, Hash, RandomState};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};
use slab::Slab;

use crate::clock::Instant;

/// The shared future, boxed (its one allocation) so that it can move between callers.
pub(crate) type BoxFuture<O> = Pin<Box<dyn Future<Output = O> + Send>>;

/// The part a caller plays in a shared call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Found no call in flight for its key and started one (went upstream).
    Leader,
    /// Attached to the call in flight for its key.
    Follower,
}

/// How a shared call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The shared future returned a value (a success or an error: the core does not judge).
    Completed,
    /// Polling the shared future panicked.
    Panicked,
    /// Every caller left before the end: the shared future was dropped unfinished.
    Abandoned,
}

/// What the owner of a table (a layer) does at the edges of each shared call. Called outside
/// every lock of the table, on the task that caused the edge.
pub(crate) trait Hooks<O, T>: Send + Sync + 'static {
    /// A caller joined, as `role` (a leader's entry just entered the table).
    fn joined(&self, role: Role);
    /// A shared call ended (its entry left the table); `followers` callers had attached to it
    /// besides its leader.
    fn ended(&self, end: End, followers: u64);
    /// The value the callers of a call whose future returned `out` receive.
    fn complete(&self, out: O) -> T;
    /// The value every caller of a panicked shared call receives (except the driving caller
    /// of a [`Join`] that resumes panics).
    fn panicked(&self) -> T;
}

/// Counts kept by a table, under its shard locks (so they cost no extra shared write).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Callers that started a shared call.
    pub(crate) leaders: u64,
    /// Callers that attached to a call in flight.
    pub(crate) followers: u64,
    /// Shared calls that panicked.
    pub(crate) panics: u64,
    /// Shared calls dropped unfinished because every caller left.
    pub(crate) abandoned: u64,
    /// Keys with a shared call in flight now.
    pub(crate) in_flight: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.leaders += o.leaders;
        self.followers += o.followers;
        self.panics += o.panics;
        self.abandoned += o.abandoned;
        self.in_flight += o.in_flight;
    }
}

/// One key in flight.
struct Entry<K, O, T> {
    hash: u64,
    /// Tells this call from a later one for the same key (unique per shard while in flight).
    id: u64,
    key: K,
    /// Made by the first follower; `None` while the leader is alone.
    slot: Option<Arc<Slot<O, T>>>,
    followers: u64,
}

struct ShardState<K, O, T> {
    map: HashTable<Entry<K, O, T>>,
    next_id: u64,
    stats: Stats,
}

impl<K, O, T> ShardState<K, O, T> {
    /// Removes the entry `(hash, id)` if present, counting how the call ended.
    fn remove(&mut self, hash: u64, id: u64, end: End) -> Option<Entry<K, O, T>> {
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
    hasher: RandomState,
    hooks: H,
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
    fn shard(&self, hash: u64) -> MutexGuard<'_, ShardState<K, O, T>> {
        // hashbrown uses the low bits (bucket) and the top 7 bits (tag); take the shard from
        // the middle.
        self.shards[(hash >> 32) as usize & self.mask].0.lock()
    }

    /// Releases one attachment of a running call that has a slot; returns the entry when
    /// this was the last attachment (the entry is then removed: the call is abandoned).
    fn release(&self, slot: &Slot<O, T>, hash: u64, id: u64) -> Option<Entry<K, O, T>> {
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
    T: Clone + Send + 'static,
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
        let mut join = self.join(key, fut);
        join.resume_panics = false;
        tokio::spawn(async move {
            match deadline {
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
    T: Clone + Send + 'static,
    H: Hooks<O, T>,
{
    fn stats(&self) -> Stats {
        Table::stats(self)
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

// ---- the slot: what followers share ----------------------------------------------------------

/// A caller's own state in a shared call.
#[derive(Debug, Default)]
struct Me {
    /// Key of this caller's waker in the waiter list, while it waits.
    waiter: Option<usize>,
    /// This caller has taken its value (or resumed the panic) or left.
    done: bool,
}

/// What a waiting caller finds when polled.
enum Wait<O, T> {
    /// The call ended: this caller's value.
    Value(T),
    /// Nobody drives the shared future: this caller takes it and drives.
    Drive(BoxFuture<O>),
}

enum Phase<O, T> {
    Running {
        /// The shared future while nobody drives it (its driver holds it in its [`Join`]).
        fut: Option<BoxFuture<O>>,
        /// A caller holds and drives the future.
        driving: bool,
        /// The waiter woken to take over driving, if one is on its way.
        nominee: Option<usize>,
    },
    /// The value, until the last caller moves it out.
    Done(Option<T>),
    /// Every caller left; the future was dropped.
    Abandoned,
}

struct SlotState<O, T> {
    phase: Phase<O, T>,
    /// Wakers of callers waiting for the value (not the driver's: the future holds that one).
    waiters: Slab<Option<Waker>>,
}

/// What the callers of a call with followers share: the waiter list, the value once ready,
/// the future while nobody drives it, and the count of attached callers.
struct Slot<O, T> {
    /// Callers attached (the leader and each follower not yet done); incremented only under
    /// the entry's shard lock, and it drops to zero only under it while the entry is in the
    /// table.
    attached: AtomicUsize,
    state: Mutex<SlotState<O, T>>,
}

impl<O, T> Slot<O, T> {
    /// A slot made by the first follower, while the leader drives.
    fn new() -> Self {
        Slot {
            attached: AtomicUsize::new(2),
            state: Mutex::new(SlotState {
                phase: Phase::Running {
                    fut: None,
                    driving: true,
                    nominee: None,
                },
                waiters: Slab::new(),
            }),
        }
    }
}

impl<O, T: Clone> Slot<O, T> {
    /// Takes this caller's copy of a finished call's value: the last caller moves it, the
    /// others clone it. Called under the state lock.
    fn take(&self, out: &mut Option<T>, me: &mut Me) -> T {
        me.done = true;
        if self.attached.fetch_sub(1, Ordering::AcqRel) == 1 {
            out.take()
                .expect("the value stays until the last caller takes it")
        } else {
            out.as_ref()
                .expect("the value stays until the last caller takes it")
                .clone()
        }
    }

    fn poll_wait(&self, me: &mut Me, cx: &mut Context<'_>) -> Poll<Wait<O, T>> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        match &mut st.phase {
            Phase::Done(out) => Poll::Ready(Wait::Value(self.take(out, me))),
            Phase::Abandoned => unreachable!("a call with a caller attached is not abandoned"),
            Phase::Running {
                fut,
                driving,
                nominee,
            } => {
                if !*driving {
                    // Take over from a driver that left.
                    if let Some(k) = me.waiter.take() {
                        st.waiters.try_remove(k);
                    }
                    *nominee = None;
                    *driving = true;
                    let fut = fut
                        .take()
                        .expect("the shared future is in place while nobody drives it");
                    return Poll::Ready(Wait::Drive(fut));
                }
                // Wait: register (or refresh) this caller's waker.
                match me.waiter {
                    Some(k) => {
                        let w = &mut st.waiters[k];
                        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *w = Some(cx.waker().clone());
                        }
                    }
                    None => me.waiter = Some(st.waiters.insert(Some(cx.waker().clone()))),
                }
                Poll::Pending
            }
        }
    }

    /// Stores the value of a finished call (its entry already removed), wakes every waiter,
    /// and returns the driver's own copy.
    fn deliver(&self, me: &mut Me, out: T) -> T {
        // Nobody can attach any more: with only the driver attached, nobody else will ever
        // look at the state.
        if self.attached.load(Ordering::Acquire) == 1 {
            me.done = true;
            return out;
        }
        let waiters = {
            let mut st = self.state.lock();
            st.phase = Phase::Done(Some(out));
            std::mem::take(&mut st.waiters)
        };
        for w in waiters.into_iter().filter_map(|(_, w)| w) {
            w.wake();
        }
        let mut st = self.state.lock();
        match &mut st.phase {
            Phase::Done(out) => self.take(out, me),
            _ => unreachable!("a finished call stays finished"),
        }
    }
}

impl<O, T> Slot<O, T> {
    /// A caller leaves before taking its value, handing back the future if it drove.
    /// Returns `true` when the caller still holds an attachment to release (the call is
    /// running), `false` when it was settled here (the call had ended).
    fn leave(&self, me: &mut Me, fut: Option<BoxFuture<O>>) -> (bool, Option<BoxFuture<O>>) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        match &mut st.phase {
            Phase::Done(_) => {
                // Under the state lock, like `take`, so the last taker is decided exactly.
                self.attached.fetch_sub(1, Ordering::AcqRel);
                (false, fut)
            }
            Phase::Abandoned => (false, fut),
            Phase::Running {
                fut: place,
                driving,
                nominee,
            } => {
                if let Some(k) = me.waiter.take() {
                    st.waiters.try_remove(k);
                    if *nominee == Some(k) {
                        *nominee = None;
                    }
                }
                if fut.is_some() {
                    // The driver leaves: put the future back for the next driver.
                    *place = fut;
                    *driving = false;
                }
                (true, None)
            }
        }
    }

    /// Wakes one waiter to take over driving, when nobody drives and nobody is on the way.
    fn hand_off(&self) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if let Phase::Running {
            driving: false,
            nominee: nominee @ None,
            ..
        } = &mut st.phase
        {
            let next = st
                .waiters
                .iter_mut()
                .find_map(|(k, w)| w.take().map(|w| (k, w)));
            if let Some((k, w)) = next {
                *nominee = Some(k);
                drop(guard);
                w.wake();
            }
            // No waiter registered: the remaining callers have not been polled since they
            // attached, and the first of them to be polled drives.
        }
    }

    /// The last caller left a running call: takes the future out to be dropped.
    fn abandon(&self) -> Option<BoxFuture<O>> {
        match std::mem::replace(&mut self.state.lock().phase, Phase::Abandoned) {
            Phase::Running { fut, .. } => fut,
            _ => None,
        }
    }
}

// ---- one caller -----------------------------------------------------------------------------

enum JoinState<K, F, O, T> {
    /// Not polled yet: not in the table.
    Init { key: K, fut: F },
    /// Holds and drives the shared future; `slot` once known (a follower that took over).
    Driving {
        fut: BoxFuture<O>,
        slot: Option<Arc<Slot<O, T>>>,
    },
    /// A follower waiting for the value.
    Waiting { slot: Arc<Slot<O, T>> },
    /// Resolved, or left.
    Done,
}

/// One caller's share of a shared call: a future resolving to the call's value.
///
/// On its first poll it joins the call in flight for its key, or starts one. Dropping it
/// before it resolves detaches the caller: if it was driving, another attached caller takes
/// over; if it was the last, the shared future is dropped and the entry removed.
///
/// # Panics
///
/// When polled after it returned `Ready`. When it drives the shared future, that future
/// panics, and [`resume_panics`](Self::resume_panics) is set (the default), the panic is
/// resumed on this caller's task (after every other caller got the hooks' `panicked()` value).
pub(crate) struct Join<K, F, O, T, H>
where
    H: Hooks<O, T>,
{
    table: Arc<Table<K, O, T, H>>,
    state: JoinState<K, F, O, T>,
    hash: u64,
    id: u64,
    me: Me,
    /// Resume a panic of the shared future when this caller was the one polling it (`true`
    /// by default; the detached mode turns it off).
    pub(crate) resume_panics: bool,
}

// `F` is never pinned in place: a leader boxes it before its first poll.
impl<K, F, O, T, H: Hooks<O, T>> Unpin for Join<K, F, O, T, H> {}

impl<K, F, O, T, H: Hooks<O, T>> std::fmt::Debug for Join<K, F, O, T, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            JoinState::Init { .. } => "init",
            JoinState::Driving { .. } => "driving",
            JoinState::Waiting { .. } => "waiting",
            JoinState::Done => "done",
        };
        f.debug_struct("Join")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<K, F, O, T, H> Join<K, F, O, T, H>
where
    K: Hash + Eq + Send + 'static,
    F: Future<Output = O> + Send + 'static,
    O: Send + 'static,
    T: Clone + Send + 'static,
    H: Hooks<O, T>,
{
    /// First poll: joins the table as leader or follower.
    fn enter(&mut self, key: K, fut: F) {
        let table = &*self.table;
        let hash = table.hasher.hash_one(&key);
        self.hash = hash;
        let mut guard = table.shard(hash);
        let shard = &mut *guard;
        if let Some(e) = shard.map.find_mut(hash, |e| e.key == key) {
            e.followers += 1;
            let slot = match &e.slot {
                Some(slot) => {
                    slot.attached.fetch_add(1, Ordering::AcqRel);
                    slot.clone()
                }
                None => e.slot.insert(Arc::new(Slot::new())).clone(),
            };
            self.id = e.id;
            shard.stats.followers += 1;
            drop(guard);
            drop(fut);
            self.state = JoinState::Waiting { slot };
            table.hooks.joined(Role::Follower);
            return;
        }
        let id = shard.next_id;
        shard.next_id = id.wrapping_add(1);
        shard.map.insert_unique(
            hash,
            Entry {
                hash,
                id,
                key,
                slot: None,
                followers: 0,
            },
            |e| e.hash,
        );
        shard.stats.leaders += 1;
        drop(guard);
        self.id = id;
        self.state = JoinState::Driving {
            fut: Box::pin(fut),
            slot: None,
        };
        table.hooks.joined(Role::Leader);
    }

    /// The driver ends the call with its future's output (`Err`: it panicked): the entry
    /// leaves the table first, so the next request starts a new call; then every waiter is
    /// served. Returns the driver's own value.
    fn finish(&mut self, out: Result<O, ()>) -> T {
        let table = &*self.table;
        let (out, end) = match out {
            Ok(o) => (table.hooks.complete(o), End::Completed),
            Err(()) => (table.hooks.panicked(), End::Panicked),
        };
        let entry = table
            .shard(self.hash)
            .remove(self.hash, self.id, end)
            .expect("a running call keeps its entry while a caller is attached");
        let followers = entry.followers;
        let mine = match &entry.slot {
            None => {
                self.me.done = true;
                out
            }
            Some(slot) => slot.deliver(&mut self.me, out),
        };
        drop(entry);
        table.hooks.ended(end, followers);
        mine
    }
}

impl<K, F, O, T, H: Hooks<O, T>> Join<K, F, O, T, H> {
    /// This caller leaves before its value: see [`Join`].
    fn leave(&mut self) {
        let (fut, slot) = match std::mem::replace(&mut self.state, JoinState::Done) {
            JoinState::Init { .. } | JoinState::Done => return,
            JoinState::Waiting { slot } => (None, slot),
            JoinState::Driving { fut, slot } => {
                let slot = match slot {
                    Some(slot) => slot,
                    None => {
                        let mut shard = self.table.shard(self.hash);
                        let entry = shard
                            .map
                            .find_mut(self.hash, |e| e.id == self.id)
                            .expect("a running call keeps its entry while a caller is attached");
                        match &entry.slot {
                            Some(slot) => slot.clone(),
                            None => {
                                // Alone: abandon the call.
                                let entry = shard.remove(self.hash, self.id, End::Abandoned);
                                drop(shard);
                                drop(fut);
                                self.me.done = true;
                                if let Some(entry) = entry {
                                    self.table.hooks.ended(End::Abandoned, entry.followers);
                                }
                                return;
                            }
                        }
                    }
                };
                (Some(fut), slot)
            }
        };
        self.me.done = true;
        let (running, unused) = slot.leave(&mut self.me, fut);
        drop(unused);
        if !running {
            return;
        }
        match self.table.release(&slot, self.hash, self.id) {
            Some(entry) => {
                // The last caller left a running call: drop the future, outside every lock.
                drop(slot.abandon());
                let followers = entry.followers;
                drop(entry);
                self.table.hooks.ended(End::Abandoned, followers);
            }
            None => slot.hand_off(),
        }
    }
}

impl<K, F, O, T, H> Future for Join<K, F, O, T, H>
where
    K: Hash + Eq + Send + 'static,
    F: Future<Output = O> + Send + 'static,
    O: Send + 'static,
    T: Clone + Send + 'static,
    H: Hooks<O, T>,
{
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                JoinState::Init { .. } => {
                    let JoinState::Init { key, fut } =
                        std::mem::replace(&mut this.state, JoinState::Done)
                    else {
                        unreachable!()
                    };
                    this.enter(key, fut);
                }
                JoinState::Waiting { slot } => match slot.poll_wait(&mut this.me, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Wait::Value(v)) => {
                        this.state = JoinState::Done;
                        return Poll::Ready(v);
                    }
                    Poll::Ready(Wait::Drive(fut)) => {
                        let slot = slot.clone();
                        this.state = JoinState::Driving {
                            fut,
                            slot: Some(slot),
                        };
                    }
                },
                JoinState::Driving { fut, .. } => {
                    // Drive, holding no lock.
                    let out = match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(out)) => Ok(out),
                        Err(payload) => Err(payload),
                    };
                    let state = std::mem::replace(&mut this.state, JoinState::Done);
                    let (v, payload) = match out {
                        Ok(o) => (this.finish(Ok(o)), None),
                        Err(p) => (this.finish(Err(())), Some(p)),
                    };
                    // Dropped once every caller was served (its destructor is upstream code).
                    drop(state);
                    return match payload {
                        Some(p) if this.resume_panics => {
                            drop(v);
                            resume_unwind(p)
                        }
                        _ => Poll::Ready(v),
                    };
                }
                JoinState::Done => panic!("coalesced call polled after completion"),
            }
        }
    }
}

impl<K, F, O, T, H: Hooks<O, T>> Drop for Join<K, F, O, T, H> {
    fn drop(&mut self) {
        if !self.me.done {
            self.leave();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    #[derive(Default)]
    struct Counting {
        leaders: AtomicU64,
        ended: Mutex<Vec<(End, u64)>>,
    }

    impl Hooks<u32, u32> for Arc<Counting> {
        fn joined(&self, role: Role) {
            if role == Role::Leader {
                self.leaders.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn ended(&self, end: End, followers: u64) {
            self.ended.lock().push((end, followers));
        }
        fn complete(&self, out: u32) -> u32 {
            out
        }
        fn panicked(&self) -> u32 {
            u32::MAX
        }
    }

    type TestTable = Table<u8, u32, u32, Arc<Counting>>;

    fn table() -> (Arc<TestTable>, Arc<Counting>) {
        let hooks = Arc::new(Counting::default());
        (Arc::new(Table::new(hooks.clone())), hooks)
    }

    async fn settle() {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }

    /// Polls `fut` once (joining the table), then returns it.
    async fn poll_once<F: Future + Unpin>(mut fut: F) -> F {
        std::future::poll_fn(|cx| {
            assert!(Pin::new(&mut fut).poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        fut
    }

    #[tokio::test(start_paused = true)]
    async fn detached_call_runs_to_completion_without_callers() {
        let (t, hooks) = table();
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        let task = t.spawn_detached(
            1,
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                r.fetch_add(1, Ordering::SeqCst);
                7
            },
            None,
        );
        settle().await;
        // A foreground caller attaches, then leaves: the call goes on.
        let join = poll_once(t.join(1, std::future::pending())).await;
        drop(join);
        settle().await;
        assert_eq!(t.stats().in_flight, 1);
        task.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(
            t.stats(),
            Stats {
                leaders: 1,
                followers: 1,
                panics: 0,
                abandoned: 0,
                in_flight: 0
            }
        );
        assert_eq!(*hooks.ended.lock(), vec![(End::Completed, 1)]);
        assert_eq!(hooks.leaders.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn detached_call_is_dropped_at_its_deadline_when_nobody_else_waits() {
        let (t, hooks) = table();
        let start = Instant::now();
        let task = t.spawn_detached(
            2,
            async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                1
            },
            Some(start + Duration::from_millis(100)),
        );
        task.await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_millis(100));
        assert_eq!(t.stats().in_flight, 0);
        assert_eq!(t.stats().abandoned, 1);
        assert_eq!(*hooks.ended.lock(), vec![(End::Abandoned, 0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn detached_deadline_leaves_the_call_to_attached_callers() {
        let (t, _) = table();
        let start = Instant::now();
        let task = t.spawn_detached(
            3,
            async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                9
            },
            Some(start + Duration::from_millis(100)),
        );
        settle().await;
        let waiter = tokio::spawn(t.join(3, std::future::pending()));
        task.await.unwrap();
        assert_eq!(t.stats().in_flight, 1, "still running for the waiter");
        assert_eq!(waiter.await.unwrap(), 9);
        assert_eq!(Instant::now() - start, Duration::from_millis(300));
        assert_eq!(t.stats().abandoned, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn detached_panic_is_caught_and_shared() {
        let (t, hooks) = table();
        let task = t.spawn_detached(
            4,
            async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                panic!("upstream bug")
            },
            None,
        );
        settle().await;
        let waiter = tokio::spawn(t.join(4, std::future::pending()));
        task.await.expect("the detached task does not unwind");
        assert_eq!(waiter.await.unwrap(), u32::MAX);
        assert_eq!(t.stats().panics, 1);
        assert_eq!(t.stats().in_flight, 0);
        assert_eq!(*hooks.ended.lock(), vec![(End::Panicked, 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unpolled_share_never_joins() {
        let (t, hooks) = table();
        drop(t.join(5, async { 1 }));
        assert_eq!(t.stats(), Stats::default());
        assert!(hooks.ended.lock().is_empty());
    }
}
